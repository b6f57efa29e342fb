//! PCI configuration mechanism #1 (PCI Local Bus Specification 3.0, 3.2.2.3.2) with a host bridge
//! at 00:00.0 and nothing else, and the PIIX3/ICH reset control register that shares its ports.
//!
//! - CONFIG_ADDRESS is the dword at 0xCF8: bit 31 enables the translation, bits 23:16 bus, 15:11
//!   device, 10:8 function, 7:2 register. Bits 30:24 and 1:0 are reserved and read 0. Only a dword
//!   access reaches it; smaller accesses to 0xCF8-0xCFB go elsewhere on an ISA bus (Linux's type-1
//!   probe writes a byte to 0xCFB and expects nothing to change) and are ignored here, except:
//! - 0xCF9, byte wide, is the reset control register (Intel PIIX3 datasheet 4.1.5; ICH "RST_CNT"):
//!   writing it with bit 2 (RST_CPU) set resets the machine, as the FADT's RESET_REG (value 6)
//!   and Linux's `reboot=pci` do. Bits 1 (SYS_RST) and 3 (FULL_RST) are kept and read back.
//! - CONFIG_DATA is 0xCFC-0xCFF, any width, at register `(address & 0xFC) + (port - 0xCFC)`.
//!   While bit 31 of CONFIG_ADDRESS is clear, or at any function but 00:00.0, reads return all
//!   ones (no device answers: a master abort) and writes are dropped.
//!
//! The host bridge carries QEMU's i440FX IDs (vendor 0x8086, device 0x1237, revision 2) so a guest
//! sees the chipset it would under QEMU; class 06/00/00 (host bridge), header type 0, no BARs, no
//! capabilities. Writable: the command register's I/O, memory, bus-master, parity, SERR and
//! INTx-disable bits, cache line size, latency timer and interrupt line; everything else is
//! read-only.

use super::board::RESET_CONTROL_PORT;
use super::{size_mask, Device, DeviceContext, PowerEvent, ResetSource};
use crate::state::{self, Reader, StateError, Writer};

pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;
/// The 8 ports this device claims: 0xCF8-0xCFF.
pub const PORTS: u16 = 8;

pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE: u16 = 0x1237;
pub const HOST_BRIDGE_REVISION: u8 = 0x02;

const ENABLE: u32 = 1 << 31;
/// The CONFIG_ADDRESS bits that hold state: enable, bus, device, function, register.
const ADDRESS_BITS: u32 = ENABLE | 0x00ff_fffc;
/// Reset control bits (PIIX3 RC): SYS_RST (1) and FULL_RST (3) are kept; RST_CPU (2) triggers.
const RC_KEPT: u8 = 0b1010;
const RC_RST_CPU: u8 = 1 << 2;

/// Configuration space registers (PCI 3.0 6.1).
mod reg {
    pub const COMMAND: usize = 0x04;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const LATENCY_TIMER: usize = 0x0d;
    pub const INTERRUPT_LINE: usize = 0x3c;
}

#[derive(Debug)]
pub struct PciHost {
    address: u32,
    reset_control: u8,
    /// The host bridge's 256-byte configuration space and which bits of it the guest may write.
    config: [u8; 256],
    writable: [u8; 256],
}

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    pub fn new() -> Self {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
        config[2..4].copy_from_slice(&HOST_BRIDGE_DEVICE.to_le_bytes());
        config[0x08] = HOST_BRIDGE_REVISION;
        // Class code 06/00/00: bridge device, host bridge.
        config[0x0b] = 0x06;
        let mut writable = [0u8; 256];
        // Command: I/O space, memory space, bus master (bits 0-2), parity error response (6),
        // SERR# enable (8), interrupt disable (10).
        writable[reg::COMMAND] = 0x47;
        writable[reg::COMMAND + 1] = 0x05;
        writable[reg::CACHE_LINE_SIZE] = 0xff;
        writable[reg::LATENCY_TIMER] = 0xff;
        writable[reg::INTERRUPT_LINE] = 0xff;
        PciHost {
            address: 0,
            reset_control: 0,
            config,
            writable,
        }
    }

    /// The register offset CONFIG_DATA port `port` reaches, if CONFIG_ADDRESS selects the host
    /// bridge (bus 0, device 0, function 0) with the enable bit set.
    fn host_bridge_offset(&self, port: u16) -> Option<usize> {
        let a = self.address;
        (a & ENABLE != 0 && a & 0x00ff_ff00 == 0)
            .then(|| (a & 0xfc) as usize + usize::from(port - CONFIG_DATA))
    }

    fn config_read(&self, port: u16, size: u8) -> u32 {
        let Some(at) = self.host_bridge_offset(port) else {
            return size_mask(size);
        };
        (0..usize::from(size)).fold(0, |v, i| {
            // Bytes past 0xCFF are not ours: they float high.
            let byte = match port as usize + i <= 0xcff {
                true => u32::from(self.config[at + i]),
                false => 0xff,
            };
            v | byte << (8 * i)
        })
    }

    fn config_write(&mut self, port: u16, size: u8, value: u32) {
        let Some(at) = self.host_bridge_offset(port) else {
            return;
        };
        for i in 0..usize::from(size) {
            if port as usize + i > 0xcff {
                break;
            }
            let b = (value >> (8 * i)) as u8;
            let w = self.writable[at + i];
            self.config[at + i] = (self.config[at + i] & !w) | (b & w);
        }
    }
}

crate::codec_struct!(PciHost {
    address,
    reset_control,
    config,
    writable,
});

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"PCI0";
const STATE_VERSION: u16 = 1;

impl Device for PciHost {
    fn name(&self) -> &'static str {
        "pci-conf1"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        let writable = self.writable;
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if v.writable != writable {
                return Err("a PCI host bridge of another kind");
            }
            Ok(())
        })
    }

    fn wide_ports(&self) -> bool {
        true
    }

    fn io_read(&mut self, port: u16, size: u8, _cx: &mut DeviceContext<'_>) -> u32 {
        match (port, size) {
            (CONFIG_ADDRESS, 4) => self.address,
            (RESET_CONTROL_PORT, 1) => u32::from(self.reset_control),
            (CONFIG_DATA.., _) => self.config_read(port, size),
            _ => size_mask(size),
        }
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        match (port, size) {
            (CONFIG_ADDRESS, 4) => self.address = value & ADDRESS_BITS,
            (RESET_CONTROL_PORT, 1) => {
                let v = value as u8;
                self.reset_control = v & RC_KEPT;
                if v & RC_RST_CPU != 0 {
                    cx.request_power(PowerEvent::Reset(ResetSource::ResetControl));
                }
            }
            (CONFIG_DATA.., _) => self.config_write(port, size, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    fn select(d: &mut PciHost, bench: &mut Bench, bus: u32, dev: u32, func: u32, reg: u32) {
        let a = ENABLE | bus << 16 | dev << 11 | func << 8 | reg;
        d.io_write(CONFIG_ADDRESS, 4, a, &mut bench.cx(0));
    }

    fn read(d: &mut PciHost, bench: &mut Bench, port: u16, size: u8) -> u32 {
        d.io_read(port, size, &mut bench.cx(0))
    }

    #[test]
    fn host_bridge_identifies_itself() {
        let mut bench = Bench::default();
        let mut d = PciHost::new();
        select(&mut d, &mut bench, 0, 0, 0, 0);
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 4), 0x1237_8086);
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 2), 0x8086);
        assert_eq!(read(&mut d, &mut bench, 0xcfe, 2), 0x1237);
        assert_eq!(read(&mut d, &mut bench, 0xcfd, 1), 0x80);
        select(&mut d, &mut bench, 0, 0, 0, 8);
        assert_eq!(
            read(&mut d, &mut bench, 0xcfc, 4),
            0x0600_0002,
            "class, rev"
        );
        select(&mut d, &mut bench, 0, 0, 0, 0xc);
        assert_eq!(read(&mut d, &mut bench, 0xcfe, 1), 0, "header type 0");
        select(&mut d, &mut bench, 0, 0, 0, 0x10);
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 4), 0, "no BAR");
        select(&mut d, &mut bench, 0, 0, 0, 0x34);
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 4), 0, "no capabilities");
        // A word read at 0xCFF: the byte beyond the data window floats high.
        select(&mut d, &mut bench, 0, 0, 0, 0);
        assert_eq!(read(&mut d, &mut bench, 0xcff, 2), 0xff12);
    }

    #[test]
    fn every_other_function_is_absent() {
        let mut bench = Bench::default();
        let mut d = PciHost::new();
        for (bus, dev, func) in [(0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 31, 7), (255, 0, 0)] {
            select(&mut d, &mut bench, bus, dev, func, 0);
            assert_eq!(read(&mut d, &mut bench, 0xcfc, 4), u32::MAX);
            assert_eq!(read(&mut d, &mut bench, 0xcfe, 2), 0xffff);
            assert_eq!(read(&mut d, &mut bench, 0xcfd, 1), 0xff);
            d.io_write(0xcfc, 4, 0, &mut bench.cx(0));
        }
        // Translation disabled: all ones too, and writes go nowhere.
        d.io_write(CONFIG_ADDRESS, 4, 0x0000_0004, &mut bench.cx(0));
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 4), u32::MAX);
        d.io_write(0xcfc, 2, 0x7, &mut bench.cx(0));
        select(&mut d, &mut bench, 0, 0, 0, 4);
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 2), 0);
    }

    #[test]
    fn config_address_keeps_only_defined_bits() {
        let mut bench = Bench::default();
        let mut d = PciHost::new();
        d.io_write(CONFIG_ADDRESS, 4, u32::MAX, &mut bench.cx(0));
        assert_eq!(read(&mut d, &mut bench, CONFIG_ADDRESS, 4), 0x80ff_fffc);
        // Linux's pci_check_type1: a byte to 0xCFB, then 0x80000000 must read back.
        d.io_write(0xcfb, 1, 1, &mut bench.cx(0));
        d.io_write(CONFIG_ADDRESS, 4, 0x8000_0000, &mut bench.cx(0));
        assert_eq!(read(&mut d, &mut bench, CONFIG_ADDRESS, 4), 0x8000_0000);
        // Narrow accesses do not reach CONFIG_ADDRESS.
        d.io_write(CONFIG_ADDRESS, 2, 0x1234, &mut bench.cx(0));
        assert_eq!(read(&mut d, &mut bench, CONFIG_ADDRESS, 4), 0x8000_0000);
        assert_eq!(read(&mut d, &mut bench, CONFIG_ADDRESS, 2), 0xffff);
        assert_eq!(read(&mut d, &mut bench, 0xcfa, 1), 0xff);
    }

    #[test]
    fn only_writable_registers_change() {
        let mut bench = Bench::default();
        let mut d = PciHost::new();
        select(&mut d, &mut bench, 0, 0, 0, 0);
        d.io_write(0xcfc, 4, 0, &mut bench.cx(0));
        assert_eq!(
            read(&mut d, &mut bench, 0xcfc, 4),
            0x1237_8086,
            "IDs read-only"
        );
        select(&mut d, &mut bench, 0, 0, 0, 4);
        d.io_write(0xcfc, 4, u32::MAX, &mut bench.cx(0));
        assert_eq!(
            read(&mut d, &mut bench, 0xcfc, 4),
            0x0000_0547,
            "command only"
        );
        select(&mut d, &mut bench, 0, 0, 0, 0xc);
        d.io_write(0xcfc, 4, u32::MAX, &mut bench.cx(0));
        assert_eq!(read(&mut d, &mut bench, 0xcfc, 4), 0x0000_ffff);
        select(&mut d, &mut bench, 0, 0, 0, 0x3c);
        d.io_write(0xcfc, 1, 0x0b, &mut bench.cx(0));
        d.io_write(0xcfd, 1, 0x01, &mut bench.cx(0));
        assert_eq!(
            read(&mut d, &mut bench, 0xcfc, 2),
            0x000b,
            "interrupt pin read-only"
        );
        assert_eq!(bench.power, None);
    }

    #[test]
    fn reset_control_resets_on_rst_cpu() {
        let mut bench = Bench::default();
        let mut d = PciHost::new();
        d.io_write(0xcf9, 1, 0x02, &mut bench.cx(0));
        assert_eq!(read(&mut d, &mut bench, 0xcf9, 1), 0x02);
        assert_eq!(bench.power, None, "SYS_RST alone selects the reset kind");
        d.io_write(0xcf9, 1, 0x06, &mut bench.cx(0));
        assert_eq!(
            bench.power,
            Some(PowerEvent::Reset(ResetSource::ResetControl))
        );
        assert_eq!(read(&mut d, &mut bench, 0xcf9, 1), 0x02, "RST_CPU reads 0");
        // A dword at 0xCF8 is CONFIG_ADDRESS, never the reset register.
        let mut bench = Bench::default();
        d.io_write(CONFIG_ADDRESS, 4, 0x0000_0600, &mut bench.cx(0));
        assert_eq!(bench.power, None);
    }
}
