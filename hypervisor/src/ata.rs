//! An ATA disk driven with PIO (programmed I/O) on the legacy IDE ports: Keel's bulk disk, the
//! transport of snapshot and migration streams too large for the serial control channel
//! (docs/SNAPSHOTS.md, "The bulk disk"). Guests never reach it: every guest port access exits and
//! no guest device model sits on these ports.
//!
//! Commands and protocol from ATA/ATAPI-8 ACS (T13/1699-D) and ATA8-APT (the parallel transport):
//! IDENTIFY DEVICE (ECh), READ SECTORS (20h), WRITE SECTORS (30h) with 28-bit LBAs, FLUSH CACHE
//! (E7h) / FLUSH CACHE EXT (EAh); the PIO data-in and data-out
//! protocols: before each 512-byte block the host waits for BSY clear and DRQ set (or ERR/DF),
//! then moves 256 16-bit words through the data register. Registers of the command block (at the
//! channel's base: 1F0h for the primary channel) and of the control block (3F6h: alternate status,
//! device control). The hardware layer is [`AtaBus`] (`arch::ata` on the machine, a fake in the
//! tests).

use core::fmt;

pub const SECTOR: usize = 512;

/// The command block registers, by offset from the channel's base port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Reg {
    /// Error (read) / Features (write).
    Error = 1,
    SectorCount = 2,
    LbaLow = 3,
    LbaMid = 4,
    LbaHigh = 5,
    Device = 6,
    /// Status (read) / Command (write).
    Status = 7,
}

/// The port bus of one ATA channel.
pub trait AtaBus {
    fn read(&mut self, reg: Reg) -> u8;
    fn write(&mut self, reg: Reg, value: u8);
    /// The alternate status register (control block): status without clearing a pending
    /// interrupt, read to wait the 400 ns a device takes to post its status.
    fn alt_status(&mut self) -> u8;
    /// 256 words in from the data register.
    fn read_data(&mut self, block: &mut [u8; SECTOR]);
    /// 256 words out to the data register.
    fn write_data(&mut self, block: &[u8; SECTOR]);
}

/// Status register bits (ACS 6.2.10 / ATA8-APT).
pub mod status {
    pub const ERR: u8 = 1 << 0;
    pub const DRQ: u8 = 1 << 3;
    pub const DF: u8 = 1 << 5;
    pub const DRDY: u8 = 1 << 6;
    pub const BSY: u8 = 1 << 7;
}

/// The commands Keel issues.
pub mod command {
    pub const READ_SECTORS: u8 = 0x20;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const FLUSH_CACHE: u8 = 0xe7;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    pub const IDENTIFY_DEVICE: u8 = 0xec;
}

/// Which device of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Device 0.
    Master,
    /// Device 1.
    Slave,
}

/// The Device register: bit 6 LBA addressing, bit 4 the device; bits 7 and 5 are obsolete and
/// set by convention. With LBA28, bits 3:0 carry LBA bits 27:24.
fn device_bits(drive: Drive) -> u8 {
    0xe0 | if drive == Drive::Slave { 0x10 } else { 0 }
}

/// Status polls before a wait gives up: far beyond any real or emulated disk's response time,
/// so a device that never answers cannot hang Keel.
pub const POLLS: u32 = 5_000_000;

/// Keel addresses the disk with 28-bit LBAs (128 GiB, far more than a stream chunk needs): the
/// sectors past 2^28 of a larger disk are not used.
const LBA28_LIMIT: u64 = 1 << 28;
/// The most sectors one READ/WRITE SECTORS command moves.
const MAX_COUNT: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtaError {
    /// The status register floats (FFh) or stays 0: no device there.
    NoDevice,
    /// The device answered IDENTIFY with the packet signature: an ATAPI device (a CD), no disk.
    NotAtaDisk,
    /// BSY stayed set, or DRQ never came, for [`POLLS`] polls.
    Timeout { waiting_for: &'static str },
    /// The device set ERR: its status and error registers.
    Device { status: u8, error: u8 },
    /// The device set DF (device fault).
    Fault { status: u8 },
    /// Sectors past the disk's end.
    OutOfRange { lba: u64, count: u64, sectors: u64 },
    /// A buffer that is not a whole number of sectors.
    Partial { len: usize },
}

impl fmt::Display for AtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDevice => write!(f, "no ATA disk (the status register floats)"),
            Self::NotAtaDisk => write!(f, "the device is ATAPI (a CD drive?), not a disk"),
            Self::Timeout { waiting_for } => {
                write!(f, "the disk did not answer (waiting for {waiting_for})")
            }
            Self::Device { status, error } => write!(
                f,
                "the disk refused the command (status {status:#04x}, error {error:#04x})"
            ),
            Self::Fault { status } => write!(f, "device fault (status {status:#04x})"),
            Self::OutOfRange {
                lba,
                count,
                sectors,
            } => write!(
                f,
                "sectors {lba}..{} past the disk's end ({sectors} sectors)",
                lba + count
            ),
            Self::Partial { len } => write!(f, "{len} bytes is not a whole number of sectors"),
        }
    }
}

/// One ATA disk on a channel, identified.
pub struct Ata<B: AtaBus> {
    bus: B,
    drive: Drive,
    sectors: u64,
    lba48: bool,
}

impl<B: AtaBus> Ata<B> {
    /// Identifies the disk `drive` on `bus` (IDENTIFY DEVICE, ACS 7.16): its size in sectors
    /// (words 60-61, or 100-103 when word 83 bit 10 says it has the 48-bit feature set).
    pub fn identify(mut bus: B, drive: Drive) -> Result<Self, AtaError> {
        bus.write(Reg::Device, device_bits(drive));
        settle(&mut bus);
        let s = bus.read(Reg::Status);
        if s == 0xff || s == 0 {
            return Err(AtaError::NoDevice);
        }
        wait(&mut bus, 0, "the device to be ready")?;
        bus.write(Reg::SectorCount, 0);
        bus.write(Reg::LbaLow, 0);
        bus.write(Reg::LbaMid, 0);
        bus.write(Reg::LbaHigh, 0);
        bus.write(Reg::Status, command::IDENTIFY_DEVICE);
        settle(&mut bus);
        if bus.read(Reg::Status) == 0 {
            return Err(AtaError::NoDevice);
        }
        // A packet device aborts IDENTIFY DEVICE and leaves its signature (14h EBh) in LBA
        // mid/high (ACS 9.12).
        match wait(&mut bus, status::DRQ, "IDENTIFY data") {
            Err(AtaError::Device { .. }) => {
                return Err(
                    if (bus.read(Reg::LbaMid), bus.read(Reg::LbaHigh)) == (0x14, 0xeb) {
                        AtaError::NotAtaDisk
                    } else {
                        AtaError::NoDevice
                    },
                );
            }
            r => r?,
        };
        let mut id = [0u8; SECTOR];
        bus.read_data(&mut id);
        let word = |n: usize| u64::from(u16::from_le_bytes([id[2 * n], id[2 * n + 1]]));
        let lba48 = word(83) & (1 << 10) != 0;
        let sectors = if lba48 {
            word(100) | word(101) << 16 | word(102) << 32 | word(103) << 48
        } else {
            word(60) | word(61) << 16
        }
        .min(LBA28_LIMIT);
        Ok(Self {
            bus,
            drive,
            sectors,
            lba48,
        })
    }

    /// The disk's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Reads `buf.len() / 512` sectors from `lba` (READ SECTORS, PIO data-in).
    pub fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
        self.check(lba, buf.len())?;
        let mut lba = lba;
        for part in buf.chunks_mut(MAX_COUNT * SECTOR) {
            self.command(lba, part.len() / SECTOR, command::READ_SECTORS)?;
            for block in part.as_chunks_mut::<SECTOR>().0 {
                wait(&mut self.bus, status::DRQ, "data to read")?;
                self.bus.read_data(block);
            }
            lba += (part.len() / SECTOR) as u64;
        }
        // The status after the last block: an error found then is still an error.
        self.done()
    }

    /// Writes `data` (whole sectors) from `lba` (WRITE SECTORS, PIO data-out). The disk may keep
    /// it in its cache until [`Ata::flush`].
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), AtaError> {
        self.check(lba, data.len())?;
        let mut lba = lba;
        for part in data.chunks(MAX_COUNT * SECTOR) {
            self.command(lba, part.len() / SECTOR, command::WRITE_SECTORS)?;
            for block in part.as_chunks::<SECTOR>().0 {
                wait(&mut self.bus, status::DRQ, "room to write")?;
                self.bus.write_data(block);
            }
            self.done()?;
            lba += (part.len() / SECTOR) as u64;
        }
        Ok(())
    }

    /// FLUSH CACHE (EXT): the disk's write cache to the medium (ACS 7.10, 7.11).
    pub fn flush(&mut self) -> Result<(), AtaError> {
        self.bus.write(Reg::Device, device_bits(self.drive));
        settle(&mut self.bus);
        wait(&mut self.bus, 0, "the device to be ready")?;
        let c = if self.lba48 {
            command::FLUSH_CACHE_EXT
        } else {
            command::FLUSH_CACHE
        };
        self.bus.write(Reg::Status, c);
        settle(&mut self.bus);
        self.done()
    }

    fn check(&self, lba: u64, len: usize) -> Result<(), AtaError> {
        if !len.is_multiple_of(SECTOR) {
            return Err(AtaError::Partial { len });
        }
        let count = (len / SECTOR) as u64;
        if lba.checked_add(count).is_none_or(|end| end > self.sectors) {
            return Err(AtaError::OutOfRange {
                lba,
                count,
                sectors: self.sectors,
            });
        }
        Ok(())
    }

    /// Selects the drive and issues a 28-bit transfer of `count` sectors (1 to 256) at `lba`.
    fn command(&mut self, lba: u64, count: usize, cmd: u8) -> Result<(), AtaError> {
        self.bus.write(
            Reg::Device,
            device_bits(self.drive) | ((lba >> 24) as u8 & 0x0f),
        );
        settle(&mut self.bus);
        wait(&mut self.bus, 0, "the device to be ready")?;
        // A count of 0 means 256.
        self.bus.write(Reg::SectorCount, count as u8);
        self.bus.write(Reg::LbaLow, lba as u8);
        self.bus.write(Reg::LbaMid, (lba >> 8) as u8);
        self.bus.write(Reg::LbaHigh, (lba >> 16) as u8);
        self.bus.write(Reg::Status, cmd);
        settle(&mut self.bus);
        Ok(())
    }

    /// Waits for the command's end: BSY clear, no ERR or DF.
    fn done(&mut self) -> Result<(), AtaError> {
        wait(&mut self.bus, 0, "the command to finish").map(|_| ())
    }
}

/// The 400 ns a device may take to post its status after a command or a device selection: four
/// reads of the alternate status register (ATA8-APT, 100 ns each at least).
fn settle<B: AtaBus>(bus: &mut B) {
    for _ in 0..4 {
        bus.alt_status();
    }
}

/// Polls until BSY is clear and every bit of `want` is set; ERR and DF end the wait with the
/// device's error. Bounded by [`POLLS`].
fn wait<B: AtaBus>(bus: &mut B, want: u8, waiting_for: &'static str) -> Result<u8, AtaError> {
    for _ in 0..POLLS {
        let s = bus.read(Reg::Status);
        if s & status::BSY != 0 {
            continue;
        }
        if s & status::ERR != 0 {
            let error = bus.read(Reg::Error);
            return Err(AtaError::Device { status: s, error });
        }
        if s & status::DF != 0 {
            return Err(AtaError::Fault { status: s });
        }
        if s & want == want {
            return Ok(s);
        }
    }
    Err(AtaError::Timeout { waiting_for })
}

#[cfg(test)]
mod tests;
