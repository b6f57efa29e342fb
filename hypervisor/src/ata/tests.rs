use super::*;
use alloc::vec;
use alloc::vec::Vec;

/// A disk on the slave position of a channel, as the device side of ATA8-APT behaves: commands
/// through the register file, PIO blocks through the data register, BSY for a few polls after
/// each command.
struct FakeDisk {
    media: Vec<u8>,
    lba48: bool,
    regs: [u8; 8],
    selected_slave: bool,
    /// Polls the device stays busy for after a command.
    busy_polls: u32,
    busy: u32,
    /// A transfer in progress: sectors left, the next LBA, whether it is a write.
    transfer: Option<(u64, u64, bool)>,
    identify: Option<[u8; SECTOR]>,
    status: u8,
    error: u8,
    commands: Vec<u8>,
    flushed: usize,
    /// Fails every READ/WRITE with ERR and this error.
    fail: Option<u8>,
    /// Never leaves BSY.
    stuck: bool,
    atapi: bool,
}

impl FakeDisk {
    fn new(sectors: usize, lba48: bool) -> Self {
        Self {
            media: (0..sectors * SECTOR).map(|i| (i % 251) as u8).collect(),
            lba48,
            regs: [0; 8],
            selected_slave: false,
            busy_polls: 3,
            busy: 0,
            transfer: None,
            identify: None,
            status: status::DRDY,
            error: 0,
            commands: Vec::new(),
            flushed: 0,
            fail: None,
            stuck: false,
            atapi: false,
        }
    }

    fn lba(&self) -> (u64, u64) {
        let r = &self.regs;
        let lba = u64::from(r[3])
            | u64::from(r[4]) << 8
            | u64::from(r[5]) << 16
            | u64::from(r[6] & 0x0f) << 24;
        let n = u64::from(r[2]);
        (lba, if n == 0 { 256 } else { n })
    }

    fn run(&mut self, cmd: u8) {
        self.commands.push(cmd);
        self.busy = self.busy_polls;
        self.error = 0;
        self.status = status::DRDY;
        match cmd {
            command::IDENTIFY_DEVICE if self.atapi => {
                self.status |= status::ERR;
                self.error = 0x04;
                self.regs[4] = 0x14;
                self.regs[5] = 0xeb;
            }
            command::IDENTIFY_DEVICE => {
                let mut id = [0u8; SECTOR];
                let sectors = (self.media.len() / SECTOR) as u64;
                let mut put =
                    |w: usize, v: u16| id[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
                put(60, sectors.min(0x0fff_ffff) as u16);
                put(61, (sectors.min(0x0fff_ffff) >> 16) as u16);
                if self.lba48 {
                    put(83, 1 << 10);
                    for k in 0..4 {
                        put(100 + k, (sectors >> (16 * k)) as u16);
                    }
                }
                self.identify = Some(id);
                self.status |= status::DRQ;
            }
            command::READ_SECTORS | command::WRITE_SECTORS => {
                if let Some(e) = self.fail {
                    self.status |= status::ERR;
                    self.error = e;
                    return;
                }
                let write = cmd == command::WRITE_SECTORS;
                let (lba, n) = self.lba();
                self.transfer = Some((n, lba, write));
                self.status |= status::DRQ;
            }
            command::FLUSH_CACHE | command::FLUSH_CACHE_EXT => self.flushed += 1,
            _ => {
                self.status |= status::ERR;
                self.error = 0x04; // ABRT
            }
        }
    }

    /// One block moved: the next, or the end of the command.
    fn block_done(&mut self) {
        if let Some((left, lba, write)) = self.transfer {
            if left > 1 {
                self.transfer = Some((left - 1, lba + 1, write));
                self.busy = self.busy_polls;
            } else {
                self.transfer = None;
                self.status &= !status::DRQ;
            }
        }
    }
}

impl AtaBus for &mut FakeDisk {
    fn read(&mut self, reg: Reg) -> u8 {
        if !self.selected_slave {
            return 0xff; // no master on this bus
        }
        match reg {
            Reg::Status => {
                if self.stuck {
                    return status::BSY;
                }
                if self.busy > 0 {
                    self.busy -= 1;
                    return status::BSY;
                }
                self.status
            }
            Reg::Error => self.error,
            r => self.regs[r as usize],
        }
    }

    fn write(&mut self, reg: Reg, value: u8) {
        match reg {
            Reg::Device => {
                self.selected_slave = value & 0x10 != 0;
                self.regs[6] = value;
            }
            Reg::Status => self.run(value),
            r => {
                self.regs[r as usize] = value;
            }
        }
    }

    fn alt_status(&mut self) -> u8 {
        self.status
    }

    fn read_data(&mut self, block: &mut [u8; SECTOR]) {
        if let Some(id) = self.identify.take() {
            block.copy_from_slice(&id);
            self.status &= !status::DRQ;
            return;
        }
        let Some((_, lba, false)) = self.transfer else {
            panic!("a data read with no read in progress");
        };
        let at = lba as usize * SECTOR;
        block.copy_from_slice(&self.media[at..at + SECTOR]);
        self.block_done();
    }

    fn write_data(&mut self, block: &[u8; SECTOR]) {
        let Some((_, lba, true)) = self.transfer else {
            panic!("a data write with no write in progress");
        };
        let at = lba as usize * SECTOR;
        self.media[at..at + SECTOR].copy_from_slice(block);
        self.block_done();
    }
}

#[test]
fn identify_gives_the_size_in_both_addressing_modes() {
    let mut d = FakeDisk::new(300, false);
    assert_eq!(Ata::identify(&mut d, Drive::Slave).unwrap().sectors(), 300);
    let mut d = FakeDisk::new(300, true);
    assert_eq!(Ata::identify(&mut d, Drive::Slave).unwrap().sectors(), 300);
}

#[test]
fn an_absent_disk_or_a_cd_drive_is_refused() {
    let mut d = FakeDisk::new(8, false);
    assert_eq!(
        Ata::identify(&mut d, Drive::Master).err(),
        Some(AtaError::NoDevice)
    );
    let mut d = FakeDisk::new(8, false);
    d.atapi = true;
    assert_eq!(
        Ata::identify(&mut d, Drive::Slave).err(),
        Some(AtaError::NotAtaDisk)
    );
}

#[test]
fn reads_and_writes_round_trip_across_command_boundaries() {
    for lba48 in [false, true] {
        let mut d = FakeDisk::new(700, lba48);
        let mut ata = Ata::identify(&mut d, Drive::Slave).unwrap();
        // 600 sectors: three commands (256 + 256 + 88).
        let data: Vec<u8> = (0..600 * SECTOR).map(|i| (i * 7 % 253) as u8).collect();
        ata.write(50, &data).unwrap();
        ata.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        ata.read(50, &mut back).unwrap();
        assert_eq!(back, data);
        let d = &ata.bus;
        assert_eq!(&d.media[50 * SECTOR..650 * SECTOR], &data[..]);
        // Sector 49 and 650 are untouched.
        assert_eq!(d.media[49 * SECTOR], ((49 * SECTOR) % 251) as u8);
        assert_eq!(d.media[650 * SECTOR], ((650 * SECTOR) % 251) as u8);
        assert_eq!(d.flushed, 1);
        let expect: &[u8] = if lba48 {
            &[0xec, 0x30, 0x30, 0x30, 0xea, 0x20, 0x20, 0x20]
        } else {
            &[0xec, 0x30, 0x30, 0x30, 0xe7, 0x20, 0x20, 0x20]
        };
        assert_eq!(d.commands, expect);
    }
}

#[test]
fn the_device_error_is_reported() {
    let mut d = FakeDisk::new(16, false);
    let mut ata = Ata::identify(&mut d, Drive::Slave).unwrap();
    ata.bus.fail = Some(0x40); // UNC: uncorrectable data
    let mut buf = [0u8; SECTOR];
    assert_eq!(
        ata.read(3, &mut buf),
        Err(AtaError::Device {
            status: status::DRDY | status::ERR,
            error: 0x40
        })
    );
}

#[test]
fn a_disk_that_stays_busy_ends_in_a_timeout_not_a_hang() {
    let mut d = FakeDisk::new(16, false);
    let mut ata = Ata::identify(&mut d, Drive::Slave).unwrap();
    ata.bus.stuck = true;
    assert!(matches!(
        ata.write(0, &[0u8; SECTOR]),
        Err(AtaError::Timeout { .. })
    ));
}

#[test]
fn transfers_past_the_end_or_of_partial_sectors_are_refused_before_any_command() {
    let mut d = FakeDisk::new(16, false);
    let mut ata = Ata::identify(&mut d, Drive::Slave).unwrap();
    let mut buf = vec![0u8; 2 * SECTOR];
    assert_eq!(
        ata.read(15, &mut buf),
        Err(AtaError::OutOfRange {
            lba: 15,
            count: 2,
            sectors: 16
        })
    );
    assert_eq!(
        ata.write(0, &[0u8; 100]),
        Err(AtaError::Partial { len: 100 })
    );
    assert_eq!(ata.bus.commands, [command::IDENTIFY_DEVICE]);
}
