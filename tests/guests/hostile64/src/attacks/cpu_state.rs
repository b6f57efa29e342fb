//! Attacks on processor state Keel owns or switches between guests.
//!
//! - `attack=cr`: control-register writes Keel must refuse with #GP (CR4.VMXE and SMXE, reserved
//!   bits of CR0/CR4/CR8, mode-breaking combinations), and CR4.VMXE must read as 0.
//! - `attack=xsetbv`: invalid XCR0 values and ECX != 0 raise #GP; valid ones load.
//! - `attack=cache`: INVD and WBINVD complete (Keel must not run a real INVD for a guest).
//! - `attack=sse`: loads its own pattern into XMM0-XMM15, yields, and counts the times it finds
//!   another value there when it runs again (`sse leaks=<n>`); next to `witness64 xmm=1` this shows
//!   whether Keel switches SSE state between guests.

use super::{Tally, GP, HC_YIELD};
use core::arch::asm;
use guest_common::{cpu, say};
use hostile64::{args, fault, sse, EXIT_OK};

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const CR4_SMXE: u64 = 1 << 14;
const CR4_OSXSAVE: u64 = 1 << 18;
/// CPUID.1:ECX bits (SDM Vol. 2A, CPUID).
const CPUID_XSAVE: u32 = 1 << 26;
const CPUID_OSXSAVE: u32 = 1 << 27;

fn read_cr0() -> u64 {
    let v;
    // SAFETY: reading CR0 has no side effect.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn read_cr4() -> u64 {
    let v;
    // SAFETY: reading CR4 has no side effect.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn control_registers(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("cr", "gp");
    let (cr0, cr4) = (read_cr0(), read_cr4());
    t.require(
        format_args!("CR4.VMXE as read ({cr4:#x})"),
        cr4 & CR4_VMXE == 0,
    );
    let gp = Some(GP);
    let cr4_cases = [
        ("CR4.VMXE", cr4 | CR4_VMXE),
        ("CR4.SMXE", cr4 | CR4_SMXE),
        ("CR4 bit 15", cr4 | 1 << 15),
        ("CR4 bit 31", cr4 | 1 << 31),
        ("CR4 bit 63", cr4 | 1 << 63),
        ("CR4.PAE clear in long mode", cr4 & !CR4_PAE),
    ];
    for (case, v) in cr4_cases {
        t.expect(
            format_args!("{case}"),
            fault!("mov cr4, {v}", v = in(reg) v),
            gp,
        );
    }
    let cr0_cases = [
        ("CR0 bit 32", cr0 | 1 << 32),
        ("CR0 bit 63", cr0 | 1 << 63),
        ("CR0.NW without CD", (cr0 | CR0_NW) & !CR0_CD),
        ("CR0.PG clear in 64-bit code", cr0 & !CR0_PG),
        ("CR0.PE clear with PG set", cr0 & !CR0_PE),
    ];
    for (case, v) in cr0_cases {
        t.expect(
            format_args!("{case}"),
            fault!("mov cr0, {v}", v = in(reg) v),
            gp,
        );
    }
    for v in [16u64, 1 << 63] {
        t.expect(
            format_args!("CR8={v:#x}"),
            fault!("mov cr8, {v}", v = in(reg) v),
            gp,
        );
    }
    // The same registers written back unchanged must not fault.
    t.expect(
        format_args!("CR0 rewritten"),
        fault!("mov cr0, {v}", v = in(reg) cr0),
        None,
    );
    t.expect(
        format_args!("CR4 rewritten"),
        fault!("mov cr4, {v}", v = in(reg) cr4),
        None,
    );
    t.require(format_args!("CR4 after the attack"), read_cr4() == cr4);
    t.finish()
}

fn set_xcr(ecx: u32, v: u64) -> Option<hostile64::catch::Fault> {
    fault!("xsetbv", in("ecx") ecx, in("eax") v as u32, in("edx") (v >> 32) as u32)
}

fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: CR4.OSXSAVE is set before this is called.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

pub fn xsetbv(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("xsetbv", "gp");
    let (_, _, ecx, _) = cpu::cpuid(1);
    if ecx & CPUID_XSAVE == 0 {
        say!("xsetbv: no XSAVE on this CPU");
        t.require(format_args!("CPUID.1:ECX.XSAVE"), false);
        t.finish()
    }
    // CPUID.1:ECX.OSXSAVE mirrors the guest's own CR4.OSXSAVE (SDM Vol. 2A, CPUID): still 0 here.
    t.require(
        format_args!("CPUID.1:ECX.OSXSAVE before CR4.OSXSAVE is set"),
        ecx & CPUID_OSXSAVE == 0,
    );
    let cr4 = read_cr4() | CR4_OSXSAVE;
    t.expect(
        format_args!("set CR4.OSXSAVE"),
        fault!("mov cr4, {v}", v = in(reg) cr4),
        None,
    );
    let (sup_lo, _, _, sup_hi) = cpu::cpuid(0xd);
    let supported = u64::from(sup_hi) << 32 | u64::from(sup_lo);
    let gp = Some(GP);
    t.expect(format_args!("XSETBV ECX=1"), set_xcr(1, 1), gp);
    t.expect(
        format_args!("XSETBV ECX=0xffffffff"),
        set_xcr(u32::MAX, 1),
        gp,
    );
    t.expect(format_args!("XCR0=0 (x87 off)"), set_xcr(0, 0), gp);
    t.expect(format_args!("XCR0=2 (x87 off)"), set_xcr(0, 2), gp);
    t.expect(format_args!("XCR0=5 (AVX without SSE)"), set_xcr(0, 5), gp);
    t.expect(format_args!("XCR0 bit 63"), set_xcr(0, 1 | 1 << 63), gp);
    let unsupported = !supported & !(1 << 63);
    let bit = unsupported.isolate_lowest_one();
    t.expect(
        format_args!("XCR0 unsupported bit {bit:#x} (supported {supported:#x})"),
        set_xcr(0, 1 | bit),
        gp,
    );
    t.expect(format_args!("XCR0=3"), set_xcr(0, 3), None);
    t.require(format_args!("XGETBV after XCR0=3"), xgetbv0() == 3);
    t.expect(format_args!("XCR0=1"), set_xcr(0, 1), None);
    t.require(format_args!("XGETBV after XCR0=1"), xgetbv0() == 1);
    t.finish()
}

pub fn cache(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("cache", "completed");
    for _ in 0..3 {
        t.expect(format_args!("WBINVD"), fault!("wbinvd"), None);
        t.expect(format_args!("INVD"), fault!("invd"), None);
    }
    t.finish()
}

/// What the attacker keeps in XMMn ("ATTACK"): recognisably not the witness's pattern.
fn attacker_pattern() -> sse::Registers {
    let mut r = [[0u64; 2]; 16];
    for (n, v) in r.iter_mut().enumerate() {
        *v = [0x4154_5441_434b_0000 | n as u64; 2];
    }
    r
}

pub fn sse(cmdline: &[u8], _ram: u64) -> ! {
    let rounds = args::number(cmdline, b"rounds", 200);
    let pattern = attacker_pattern();
    sse::enable();
    let mut leaks = 0u64;
    for round in 0..rounds {
        sse::load(&pattern);
        // YIELD: let the other guests run before looking again.
        let _ = cpu::vmcall(HC_YIELD, 0, 0);
        if let Some((reg, value)) = sse::first_difference(&pattern) {
            if leaks == 0 {
                say!(
                    "sse: round {}: xmm{} changed while switched out: {:#034x}",
                    round,
                    reg,
                    value
                );
            }
            leaks += 1;
        }
    }
    say!("sse leaks={} rounds={}", leaks, rounds);
    cpu::exit(EXIT_OK)
}
