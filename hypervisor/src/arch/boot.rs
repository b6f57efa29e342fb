//! The boot front end: the only code that reads the bootloader's `BootInfo`. It sets up the heap,
//! hands usable RAM to the frame allocator and describes the machine to the core as a
//! [`MachineInfo`].

use crate::machine::{Firmware, MachineInfo, PhysRange};
use crate::mm;
use alloc::vec::Vec;
use bootloader_api::info::{MemoryRegionKind, Optional};
use bootloader_api::BootInfo;
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub const HEAP_SIZE: u64 = 8 << 20;

/// Bytes of Keel's heap in use (for the per-guest overhead report).
pub fn heap_used() -> usize {
    HEAP.lock().used()
}

#[derive(Debug)]
pub enum BootError {
    NoPhysicalMemoryMapping,
    NoRoomForHeap,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoPhysicalMemoryMapping => {
                write!(f, "the bootloader did not map physical memory")
            }
            Self::NoRoomForHeap => {
                write!(f, "no usable RAM region is large enough for the 8 MiB heap")
            }
        }
    }
}

pub fn machine_from_boot_info(info: &BootInfo) -> Result<MachineInfo, BootError> {
    let phys_offset = match info.physical_memory_offset {
        Optional::Some(o) => o,
        Optional::None => return Err(BootError::NoPhysicalMemoryMapping),
    };
    mm::set_phys_offset(phys_offset);

    let ramdisk = match info.ramdisk_addr {
        Optional::Some(virt) if info.ramdisk_len > 0 => {
            // The bootloader maps the ramdisk at a virtual address; translate it back through the
            // page tables to know which physical range it occupies.
            super::paging::virt_to_phys(virt).map(|pa| PhysRange {
                start: pa,
                end: pa + info.ramdisk_len,
            })
        }
        _ => None,
    };

    // The heap comes first, straight from the memory map, because building `usable` allocates.
    let mut heap_at = None;
    for r in info.memory_regions.iter() {
        if r.kind == MemoryRegionKind::Usable {
            let start = (r.start + 0xfff) & !0xfff;
            if r.end > start && r.end - start >= HEAP_SIZE && start >= 1 << 20 {
                heap_at = Some(start);
                break;
            }
        }
    }
    let heap_pa = heap_at.ok_or(BootError::NoRoomForHeap)?;
    // SAFETY: the range is usable RAM per the memory map, reserved from now on for the heap only,
    // and mapped through the physical-memory offset.
    unsafe {
        HEAP.lock()
            .init(mm::phys_to_virt(heap_pa), HEAP_SIZE as usize)
    };

    let mut usable = Vec::new();
    for r in info
        .memory_regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable)
    {
        let mut range = PhysRange {
            start: r.start,
            end: r.end,
        };
        if range.start <= heap_pa && heap_pa < range.end {
            // Split around the heap.
            let below = PhysRange {
                start: range.start,
                end: heap_pa,
            };
            if !below.is_empty() {
                usable.push(below);
            }
            range.start = heap_pa + HEAP_SIZE;
        }
        if !range.is_empty() {
            usable.push(range);
        }
    }
    // The ramdisk is reported as bootloader memory, not usable, but be safe against overlap.
    if let Some(rd) = ramdisk {
        usable.retain(|r| r.end <= rd.start || r.start >= rd.end);
    }
    mm::FRAMES.lock().add(&usable);

    let rsdp = match info.rsdp_addr {
        Optional::Some(a) => Some(a),
        Optional::None => None,
    };
    let firmware = if is_uefi(info) {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    Ok(MachineInfo {
        firmware,
        usable,
        phys_offset,
        ramdisk,
        rsdp,
    })
}

fn is_uefi(info: &BootInfo) -> bool {
    // The memory map keeps firmware-specific region kinds: UEFI types (boot services code, ACPI
    // NVS, ...) only appear when the UEFI stage booted Keel.
    info.memory_regions
        .iter()
        .any(|r| matches!(r.kind, MemoryRegionKind::UnknownUefi(_)))
}

/// The ramdisk bytes, through the physical-memory mapping.
pub fn ramdisk_bytes(machine: &MachineInfo) -> Option<&'static [u8]> {
    let rd = machine.ramdisk?;
    // SAFETY: the bootloader loaded the ramdisk there and nothing frees or reuses that memory.
    Some(unsafe { core::slice::from_raw_parts(mm::phys_to_virt(rd.start), rd.len() as usize) })
}
