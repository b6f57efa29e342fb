//! `attack=idtmmio`: the IDT placed on the local APIC page. The #GP of a non-canonical load must
//! then be delivered through "gates" that are APIC registers: on hardware a fault during delivery,
//! in the end a triple fault. Under Keel the gate reads are EPT violations during event delivery
//! (IDT-vectoring information valid), not accesses by the instruction at RIP: Keel must not
//! emulate that instruction, or the ones after it, as the MMIO access. The instructions after the
//! faulting load are a load Keel's decoder takes and UD2, so a Keel that emulates the wrong
//! instructions skips ahead and names their bytes when it gives up.
//!
//! Prints `hostile64: idtmmio` and is stopped by Keel naming the delivery's access: `killed:
//! event delivery touched guest-physical 0xfee000d0, which is device memory (IDT, GDT or stack
//! outside RAM)` (tests/tests/hostile.rs), never with the bytes of the faulting load or of the
//! instructions after it.

use core::arch::asm;
use guest_common::{cpu, say, EXIT_FAILURE};

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let idtr = Idtr {
        limit: 0xfff,
        base: 0xfee0_0000,
    };
    let scratch = 0u32;
    say!("idtmmio");
    // SAFETY: deliberately breaks the guest's interrupt delivery; nothing after the faulting load
    // is meant to run (the guest is stopped), and the load of `scratch` only reads a local.
    unsafe {
        asm!(
            "lidt [{idtr}]",
            "mov eax, dword ptr [rsi]",
            "mov ecx, dword ptr [rdx]",
            "ud2",
            idtr = in(reg) &idtr,
            in("rsi") 0x8000_0000_0000_0000u64,
            in("rdx") &scratch,
            out("eax") _,
            out("ecx") _,
            options(nostack)
        );
    }
    say!("idtmmio: the load did not fault");
    cpu::exit(EXIT_FAILURE)
}
