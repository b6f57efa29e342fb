//! `attack=apic`: abuse of the emulated local APIC and IOAPIC pages. Every access goes through
//! Keel's MMIO instruction decoder and the device models, so none may crash Keel, and no IPI may
//! leave the guest (a witness with interrupts enabled would count it).
//!
//! 1. Reads every LAPIC register as a dword, plus byte, word and qword reads at odd offsets and a
//!    dword read that runs past the end of the page.
//! 2. Writes read-only and reserved registers, a byte to the ICR, EOIs with nothing in service.
//! 3. Sends IPIs: fixed, NMI, INIT, SIPI and SMI to all-but-self and to every physical destination
//!    1-255, fixed to all-including-self and to self, illegal vectors 0-15 to self.
//! 4. Selects every IOAPIC register (0-255), reads it, writes zeros and all-ones to it.
//!
//! Prints `hostile64: apic accesses=<n> ipis=<m> self=<k>` (k: fixed IPIs it received itself,
//! at least 1: the two fixed IPIs to itself share one IRR bit). Then, 5., it stores an XMM register into the ICR with MOVDQU, which Keel's decoder
//! does not emulate (`apic movdqu to the ICR`): Keel stops the guest with `killed: MMIO access to
//! 0xfee00300 by an instruction Keel does not emulate: [..]`.

use core::arch::asm;
use core::sync::atomic::Ordering;
use guest_common::trap::{LAPIC_TICKS, LAPIC_TIMER_VECTOR};
use guest_common::{cpu, lapic, say, EXIT_FAILURE};
use hostile64::sse;

const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;
const IOWIN: u64 = 0x10;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
/// Destination shorthands (ICR bits 19:18).
const SELF: u32 = 1 << 18;
const ALL: u32 = 2 << 18;
const ALL_BUT_SELF: u32 = 3 << 18;
/// Delivery modes (ICR bits 10:8).
const FIXED: u32 = 0;
const SMI: u32 = 2 << 8;
const NMI: u32 = 4 << 8;
const INIT: u32 = 5 << 8;
const SIPI: u32 = 6 << 8;

fn write32(addr: u64, v: u32) {
    // SAFETY: `addr` is in the emulated LAPIC or IOAPIC page (identity mapped, uncached): MMIO,
    // not Rust memory.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as in `write32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Reads of odd sizes and alignments with explicit MOVs (an unaligned Rust read would be UB).
fn odd_reads() -> u32 {
    let (a, b, c, d, e): (u8, u8, u16, u64, u32);
    // SAFETY: loads from the LAPIC page, which Keel emulates; the last one starts 2 bytes before
    // the end of the page and reads on into the next (unmapped) one.
    unsafe {
        asm!(
            "mov {a}, byte ptr [{base} + 0x20]",
            "mov {b}, byte ptr [{base} + 0x23]",
            "mov {c:x}, word ptr [{base} + 0x301]",
            "mov {d}, qword ptr [{base} + 0xff8]",
            "mov {e:e}, dword ptr [{base} + 0xffe]",
            base = in(reg) LAPIC,
            a = out(reg_byte) a, b = out(reg_byte) b, c = out(reg) c, d = out(reg) d,
            e = out(reg) e,
            options(nostack, readonly)
        );
    }
    core::hint::black_box((a, b, c, d, e));
    5
}

fn ipi(high: u32, low: u32) {
    write32(LAPIC + ICR_HIGH, high);
    write32(LAPIC + ICR_LOW, low);
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    cpu::disable_interrupts();
    lapic::enable();
    let mut accesses = 0u32;
    for offset in (0..0x1000).step_by(16) {
        core::hint::black_box(read32(LAPIC + offset));
        accesses += 1;
    }
    accesses += odd_reads();
    // Version, PPR, ISR, TMR, IRR (read-only), two reserved offsets, EOI twice.
    for offset in [0x30, 0xa0, 0x100, 0x180, 0x200, 0x3f0, 0xff0, 0xb0, 0xb0] {
        write32(LAPIC + offset, u32::MAX);
        accesses += 1;
    }
    // SAFETY: a byte store into the ICR (the SDM leaves its effect undefined; Keel drops it).
    unsafe { core::ptr::write_volatile((LAPIC + ICR_LOW) as *mut u8, 0x30) };
    accesses += 1;

    let vector = u32::from(LAPIC_TIMER_VECTOR);
    let mut ipis = 0u32;
    for mode in [FIXED | vector, NMI, INIT, SIPI | 0x10, SMI] {
        ipi(0, ALL_BUT_SELF | mode);
        ipis += 1;
    }
    for dest in 1..=255u32 {
        ipi(dest << 24, FIXED | vector);
        ipi(dest << 24, NMI);
        ipis += 2;
    }
    for v in 0..16 {
        ipi(0, SELF | v);
        ipis += 1;
    }
    ipi(0, ALL | vector);
    ipi(0, SELF | vector);
    ipis += 2;

    for reg in 0..=255u32 {
        write32(IOAPIC, reg);
        core::hint::black_box(read32(IOAPIC + IOWIN));
        write32(IOAPIC + IOWIN, 0);
        write32(IOAPIC + IOWIN, u32::MAX);
        accesses += 4;
    }

    // Take the IPIs sent to self (vector 0x30: counted and acknowledged by the common handler).
    let before = LAPIC_TICKS.load(Ordering::SeqCst);
    for _ in 0..4 {
        cpu::enable_interrupts();
        core::hint::spin_loop();
        cpu::disable_interrupts();
    }
    let received = LAPIC_TICKS.load(Ordering::SeqCst) - before;
    say!("apic accesses={} ipis={} self={}", accesses, ipis, received);

    sse::enable();
    say!("apic movdqu to the ICR");
    // SAFETY: a 16-byte store into the LAPIC page that Keel does not emulate: it stops the guest.
    unsafe { asm!("movdqu [{}], xmm0", in(reg) LAPIC + ICR_LOW, options(nostack)) };
    say!("apic movdqu was not stopped");
    cpu::exit(EXIT_FAILURE)
}
