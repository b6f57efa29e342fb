//! `attack=moffs`: the local APIC through `MOV EAX, moffs` and `MOV moffs, EAX` (opcodes A1 and
//! A3: an absolute address in the instruction, no ModRM). Compilers pick this form for a
//! constant address, so 32-bit kernels use it for the APIC (fuzz32 hit it); a CPU runs it like any
//! other MOV, so Keel's MMIO emulation must too.
//!
//! Reads the version register (A1), writes the task priority (A3) and reads it back with an
//! ordinary MOV. Prints `hostile64: moffs mmio=3/3 ok`.

use super::Tally;
use core::arch::asm;
use guest_common::lapic;

const VERSION: u64 = 0xfee0_0030;
const TPR: u64 = 0xfee0_0080;

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("moffs", "mmio");
    lapic::enable();
    let version: u32;
    // SAFETY: loads a LAPIC register (MMIO, identity mapped) into EAX.
    unsafe {
        asm!("movabs eax, dword ptr [{0}]", const VERSION, out("eax") version, options(nostack))
    };
    // Version 0x14-0x1f in bits 7:0 for an xAPIC (SDM Vol. 3A 11.4.8).
    t.require(
        format_args!("version {version:#x} through A1"),
        version & 0xf0 == 0x10,
    );
    // SAFETY: stores EAX into the TPR (MMIO); the guest runs with interrupts off.
    unsafe { asm!("movabs dword ptr [{0}], eax", const TPR, in("eax") 0x20u32, options(nostack)) };
    t.require(format_args!("the store through A3 arrived"), true);
    // SAFETY: an ordinary load of the TPR.
    let tpr = unsafe { core::ptr::read_volatile(TPR as *const u32) };
    t.require(
        format_args!("TPR {tpr:#x} after the A3 store of 0x20"),
        tpr == 0x20,
    );
    t.finish()
}
