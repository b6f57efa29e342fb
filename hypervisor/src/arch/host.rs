//! The real machine behind `exits::Host`, and Keel's physical frames behind `ept::TableAlloc`.

use super::{cpu, idt, lapic};
use crate::mm;

pub struct RealHost;

impl crate::exits::Host for RealHost {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpu::cpuid(leaf, subleaf)
    }

    fn xcr0_supported(&self) -> u64 {
        cpu::xcr0_supported()
    }

    fn host_nmi(&mut self) {
        // Another CPU kicked this one out of guest mode with an NMI (`arch::smp::kick`).
        super::smp::on_kick_exit();
    }

    fn set_guest_cr2(&mut self, value: u64) {
        // SAFETY: Keel never takes page faults of its own, so CR2 is the guest's until entry.
        unsafe { cpu::write_cr2(value) };
    }

    fn breakpoint_addresses(&self) -> [u64; 4] {
        let [dr0, dr1, dr2, dr3, _] = cpu::read_debug_registers();
        [dr0, dr1, dr2, dr3]
    }

    fn host_interrupt(&mut self, vector: u8) {
        if vector == idt::TIMER_VECTOR {
            lapic::on_timer_interrupt();
        } else if vector == idt::KICK_VECTOR {
            // Another CPU kicked this one out of guest mode (`arch::smp::kick`).
            super::smp::on_kick();
        } else if vector != idt::SPURIOUS_VECTOR {
            crate::warn!("unexpected host interrupt vector {vector:#x}");
            lapic::eoi();
        }
    }
}

/// EPT tables from Keel's frame allocator, reached through the physical-memory mapping.
pub struct Frames;

impl crate::ept::TableAlloc for Frames {
    fn alloc_table(&mut self) -> Option<u64> {
        mm::alloc_zeroed_page()
    }

    fn table(&mut self, hpa: u64) -> &mut [u64; 512] {
        // SAFETY: `hpa` is a table frame this allocator handed out; Keel is single-threaded while
        // it edits EPT tables.
        unsafe { &mut *(mm::phys_to_virt(hpa) as *mut [u64; 512]) }
    }

    fn free_table(&mut self, hpa: u64) {
        mm::free_pages(hpa, mm::PAGE_SIZE);
    }
}
