//! The primary IDE channel's ports for `crate::ata`: the command block at 1F0h, the control
//! block's alternate status at 3F6h (the legacy ISA addresses of ATA8-APT's compatibility mode).
//! Keel alone uses them; guests' port I/O exits and reaches only Keel's device models.

use super::cpu;
use crate::ata::{AtaBus, Reg, SECTOR};
use core::arch::asm;

const BASE: u16 = 0x1f0;
const ALT_STATUS: u16 = 0x3f6;

/// The primary channel.
pub struct Primary;

impl AtaBus for Primary {
    fn read(&mut self, reg: Reg) -> u8 {
        // SAFETY: reading an ATA register of the channel Keel owns; Status clears the device's
        // interrupt, which Keel does not use (nIEN is not relied on: the IRQ is masked).
        unsafe { cpu::inb(BASE + reg as u16) }
    }

    fn write(&mut self, reg: Reg, value: u8) {
        // SAFETY: a register write on the channel Keel owns; `crate::ata` follows the protocol.
        unsafe { cpu::outb(BASE + reg as u16, value) }
    }

    fn alt_status(&mut self) -> u8 {
        // SAFETY: reading the alternate status has no side effect.
        unsafe { cpu::inb(ALT_STATUS) }
    }

    fn read_data(&mut self, block: &mut [u8; SECTOR]) {
        // SAFETY: REP INSW moves 256 words from the data register into `block` (512 bytes,
        // exclusively borrowed); the device announced the block with DRQ. DF is clear (the
        // Rust ABI's guarantee).
        unsafe {
            asm!("rep insw", in("dx") BASE, inout("rdi") block.as_mut_ptr() => _,
                inout("rcx") SECTOR / 2 => _, options(nostack, preserves_flags))
        }
    }

    fn write_data(&mut self, block: &[u8; SECTOR]) {
        // SAFETY: REP OUTSW moves 256 words of `block` to the data register; the device asked
        // for the block with DRQ.
        unsafe {
            asm!("rep outsw", in("dx") BASE, inout("rsi") block.as_ptr() => _,
                inout("rcx") SECTOR / 2 => _, options(nostack, preserves_flags, readonly))
        }
    }
}
