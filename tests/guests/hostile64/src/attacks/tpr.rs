//! `attack=tpr`: the task priority through CR8 and through the xAPIC page, which Keel either
//! emulates on every access or leaves to the CPU's APIC virtualization (manifest `apicv`): the
//! guest must not see a difference.
//!
//! 1. CR8 and the MMIO TPR are one register (SDM Vol. 3A 11.8.6.1: CR8[3:0] = TPR[7:4]): a CR8
//!    write reads back through the page and the other way round; PPR follows the TPR.
//! 2. A self-IPI of vector 0x51 while the TPR is 0x50 stays in IRR (its class is not above the
//!    TPR's, 11.8.3.1); lowering the TPR through CR8 to 0x40 delivers it before the next
//!    instruction (the instruction after MOV CR8 sees the handler's count).
//! 3. The same through the MMIO TPR.
//!
//! Prints `hostile64: tpr checks=N/N ok` and exits 0x30.

use super::Tally;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::{cpu, lapic};
use hostile64::catch::{self, InterruptFrame};

const TPR: u64 = 0xfee0_0080;
const PPR: u64 = 0xfee0_00a0;
const ICR_LOW: u64 = 0xfee0_0300;
/// IRR bits 95:64 (vector 0x51 is bit 17 of it).
const IRR2: u64 = 0xfee0_0220;
const VECTOR: u8 = 0x51;
/// Destination shorthand "self" (ICR bits 19:18 = 01), fixed delivery.
const ICR_SELF: u32 = 1 << 18;

static RECEIVED: AtomicU64 = AtomicU64::new(0);

extern "x86-interrupt" fn received(_frame: InterruptFrame) {
    RECEIVED.fetch_add(1, Ordering::SeqCst);
    lapic::eoi();
}

fn read32(addr: u64) -> u32 {
    // SAFETY: a register of the xAPIC page (identity mapped, uncached): MMIO, not Rust memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write32(addr: u64, v: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn write_cr8(v: u64) {
    // SAFETY: CR8 is the task priority; the handler this attack installs takes what it lets in.
    unsafe { asm!("mov cr8, {}", in(reg) v, options(nostack)) };
}

fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reads the task priority.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nostack)) };
    v
}

/// Lowers the TPR with `mov cr8` and returns the handler's count as the very next instruction
/// reads it.
fn lower_cr8_and_count(v: u64) -> u64 {
    let n: u64;
    // SAFETY: as in `write_cr8`; the load reads an atomic the handler writes.
    unsafe {
        asm!("mov cr8, {v}", "mov {n}, qword ptr [{c}]", v = in(reg) v, n = out(reg) n,
             c = in(reg) RECEIVED.as_ptr(), options(nostack))
    };
    n
}

/// As [`lower_cr8_and_count`], through the MMIO TPR.
fn lower_mmio_and_count(v: u32) -> u64 {
    let n: u64;
    // SAFETY: a store to the TPR (MMIO); the load reads an atomic the handler writes.
    unsafe {
        asm!("mov dword ptr [{t}], {v:e}", "mov {n}, qword ptr [{c}]", t = in(reg) TPR,
             v = in(reg) v, n = out(reg) n, c = in(reg) RECEIVED.as_ptr(), options(nostack))
    };
    n
}

fn pending() -> bool {
    read32(IRR2) & (1 << (VECTOR & 31)) != 0
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("tpr", "checks");
    catch::set_gate(VECTOR, received as *const () as u64);
    lapic::enable();
    write_cr8(8);
    let tpr = read32(TPR);
    t.require(format_args!("TPR {tpr:#x} after CR8 = 8"), tpr == 0x80);
    write32(TPR, 0x6f);
    let cr8 = read_cr8();
    t.require(format_args!("CR8 {cr8} after TPR = 0x6f"), cr8 == 6);
    let ppr = read32(PPR);
    t.require(format_args!("PPR {ppr:#x} with TPR 0x6f"), ppr == 0x6f);

    cpu::enable_interrupts();
    for (how, expect) in [("CR8", 1u64), ("MMIO", 2)] {
        write_cr8(5);
        write32(ICR_LOW, ICR_SELF | u32::from(VECTOR));
        for _ in 0..1000 {
            core::hint::spin_loop();
        }
        let got = RECEIVED.load(Ordering::SeqCst);
        t.require(
            format_args!("{how}: vector 0x51 held back by TPR 0x50 ({got} received)"),
            got == expect - 1 && pending(),
        );
        let seen = if how == "CR8" {
            lower_cr8_and_count(4)
        } else {
            lower_mmio_and_count(0x40)
        };
        t.require(
            format_args!("{how}: vector 0x51 delivered as the TPR dropped to 0x40 ({seen} seen)"),
            seen == expect && !pending(),
        );
    }
    cpu::disable_interrupts();
    t.finish()
}
