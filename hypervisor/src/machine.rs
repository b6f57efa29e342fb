//! What the boot path tells the core about the machine. The core never looks at bootloader data:
//! `arch::boot` translates the bootloader's `BootInfo` into this, and a later boot path (a
//! multiboot entry, a UEFI application) would only have to fill in the same struct.

use alloc::vec::Vec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Debug, Clone)]
pub struct MachineInfo {
    pub firmware: Firmware,
    /// Usable RAM (not holding the kernel, the bootloader's page tables or the ramdisk).
    pub usable: Vec<PhysRange>,
    /// Virtual address at which all physical memory is mapped.
    pub phys_offset: u64,
    /// The ramdisk (guest archive) in physical memory, if one was loaded.
    pub ramdisk: Option<PhysRange>,
    pub rsdp: Option<u64>,
}

impl MachineInfo {
    pub fn usable_bytes(&self) -> u64 {
        self.usable.iter().map(|r| r.len()).sum()
    }
}
