//! `attack=cpuidmsr`: what CPUID advertises and what the MSRs and instructions do must agree
//! (issue 8, item 6). For each feature in [`FEATURES`], every MSR it implies must read (and, if
//! writable, take back the value read) without a fault when CPUID advertises the feature, and
//! raise #GP when CPUID hides it. Then the behaviours behind the advertised bits:
//!
//! - IA32_TSC_ADJUST (SDM 17.17.3): a WRMSR of IA32_TSC moves TSC_ADJUST by the same amount, and
//!   writing TSC_ADJUST back moves the TSC back.
//! - IA32_SPEC_CTRL keeps each advertised bit (IBRS, STIBP, SSBD) and refuses reserved ones;
//!   IA32_PRED_CMD is write-only.
//! - IA32_XSS: only 0 (no supervisor state is enumerated).
//! - EFER.LME cannot be cleared while paging is on.
//! - IA32_APIC_BASE.EN clear: CPUID.1:EDX.APIC reads 0 and the xAPIC page reads all ones; set
//!   again: the APIC is back (version register 0x50014).
//! - RDPMC is #GP (no PMU: leaf 0xA is 0).
//!
//! Prints `hostile64: cpuidmsr agree=<n>/<n> ok`.

use super::{cpuid, Tally, GP};
use hostile64::catch::{rdmsr, wrmsr};
use hostile64::fault;

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// (name, leaf, subleaf, register, bits, MSRs, writable): the same table as the host test
/// `exits::msr::tests::FEATURE_MSRS`.
type Feature = (&'static str, u32, u32, usize, u32, &'static [u32], bool);
const FEATURES: &[Feature] = &[
    ("TSC_ADJUST", 7, 0, EBX, 1 << 1, &[0x3b], true),
    ("IBRS/IBPB", 7, 0, EDX, 1 << 26, &[0x48], true),
    ("XSAVES", 0xd, 1, EAX, 1 << 3, &[0xda0], true),
    ("TSC-deadline", 1, 0, ECX, 1 << 24, &[0x6e0], true),
    ("APIC", 1, 0, EDX, 1 << 9, &[0x1b], true),
    ("PAT", 1, 0, EDX, 1 << 16, &[0x277], true),
    ("MTRR", 1, 0, EDX, 1 << 12, &[0x2ff], true),
    ("MTRR cap", 1, 0, EDX, 1 << 12, &[0xfe], false),
    ("MCA", 1, 0, EDX, 1 << 14, &[0x179], false),
    ("PDCM", 1, 0, ECX, 1 << 15, &[0x345], true),
    ("DS", 1, 0, EDX, 1 << 21, &[0x600], true),
    ("EIST", 1, 0, ECX, 1 << 7, &[0x198, 0x199], true),
    ("ACPI", 1, 0, EDX, 1 << 22, &[0x19a, 0x19b, 0x19c], true),
    ("SDBG", 1, 0, ECX, 1 << 11, &[0xc80], true),
    ("DCA", 1, 0, ECX, 1 << 18, &[0x1f8, 0x1f9], true),
    (
        "PMU",
        0xa,
        0,
        EAX,
        0xff,
        &[0xc1, 0x186, 0x309, 0x38d, 0x38f],
        true,
    ),
    ("RDT-M", 7, 0, EBX, 1 << 12, &[0xc8d, 0xc8e, 0xc8f], true),
    ("MPX", 7, 0, EBX, 1 << 14, &[0xd90], true),
    ("RDT-A", 7, 0, EBX, 1 << 15, &[0xc8f, 0xc90], true),
    ("PT", 7, 0, EBX, 1 << 25, &[0x560, 0x570, 0x571], true),
    ("WAITPKG", 7, 0, ECX, 1 << 5, &[0xe1], true),
    ("CET_SS", 7, 0, ECX, 1 << 7, &[0x6a0, 0x6a2, 0x6a4], true),
    ("TME", 7, 0, ECX, 1 << 13, &[0x981, 0x982], true),
    ("ENQCMD", 7, 0, ECX, 1 << 29, &[0xd93], true),
    ("SGX_LC", 7, 0, ECX, 1 << 30, &[0x8c], true),
    ("PKS", 7, 0, ECX, 1 << 31, &[0x6e1], true),
    ("SRBDS_CTRL", 7, 0, EDX, 1 << 9, &[0x123], true),
    ("TSX_FORCE_ABORT", 7, 0, EDX, 1 << 13, &[0x10f], true),
    ("arch LBR", 7, 0, EDX, 1 << 19, &[0x14ce], true),
    ("CET_IBT", 7, 0, EDX, 1 << 20, &[0x6a0, 0x6a2], true),
    ("ARCH_CAPABILITIES", 7, 0, EDX, 1 << 29, &[0x10a], false),
    ("CORE_CAPABILITIES", 7, 0, EDX, 1 << 30, &[0xcf], false),
    ("HRESET", 7, 1, EAX, 1 << 22, &[0x17da], true),
    ("XFD", 0xd, 1, EAX, 1 << 4, &[0x1c4, 0x1c5], true),
];

const TSC: u32 = 0x10;
const APIC_BASE: u32 = 0x1b;
const TSC_ADJUST: u32 = 0x3b;
const SPEC_CTRL: u32 = 0x48;
const PRED_CMD: u32 = 0x49;
const XSS: u32 = 0xda0;
const EFER: u32 = 0xc000_0080;
const EFER_LME: u64 = 1 << 8;
const LAPIC_VERSION: u64 = 0xfee0_0030;
/// 2^40 TSC ticks: far beyond anything the guest's own time adds during the check.
const JUMP: u64 = 1 << 40;
/// The guest's time between its RDTSC and the WRMSR's exit, at most (Bochs: a few thousand).
const SLACK: u64 = 100_000_000;

fn read32(addr: u64) -> u32 {
    // SAFETY: the xAPIC page is identity mapped; an access to it is MMIO Keel answers.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn tsc() -> u64 {
    guest_common::cpu::rdtsc()
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("cpuidmsr", "agree");
    let gp = Some(GP);
    for &(name, leaf, subleaf, reg, bits, msrs, writable) in FEATURES {
        let advertised = cpuid(leaf, subleaf)[reg] & bits != 0;
        for &msr in msrs {
            let (f, v) = rdmsr(msr);
            let want = if advertised { None } else { gp };
            t.expect(format_args!("{name}: RDMSR {msr:#x}"), f, want);
            let (v, want) = match (advertised, writable) {
                (true, true) => (v, None),
                _ => (0, gp),
            };
            t.expect(
                format_args!("{name}: WRMSR {msr:#x}={v:#x}"),
                wrmsr(msr, v),
                want,
            );
        }
    }

    // IA32_TSC_ADJUST follows IA32_TSC writes, and moves the TSC itself.
    if cpuid(7, 0)[EBX] & 2 != 0 {
        let (_, before) = rdmsr(TSC_ADJUST);
        let t0 = tsc();
        t.expect(format_args!("WRMSR TSC"), wrmsr(TSC, t0 + JUMP), None);
        let t1 = tsc();
        let (_, after) = rdmsr(TSC_ADJUST);
        let moved = after.wrapping_sub(before);
        t.require(
            format_args!("TSC_ADJUST moved by {moved:#x}"),
            moved <= JUMP && moved > JUMP - SLACK,
        );
        t.require(format_args!("TSC after the write {t1:#x}"), t1 >= t0 + JUMP);
        t.expect(
            format_args!("WRMSR TSC_ADJUST back"),
            wrmsr(TSC_ADJUST, before),
            None,
        );
        let t2 = tsc();
        t.require(format_args!("TSC moved back {t2:#x}"), t2 < t0 + SLACK);
    } else {
        t.require(format_args!("TSC_ADJUST advertised on Bochs"), false);
    }

    // IA32_SPEC_CTRL: each advertised bit reads back; every other bit is #GP.
    let edx7 = cpuid(7, 0)[EDX];
    let mut bits = 0;
    for (feature, bit) in [(1 << 26, 1), (1 << 27, 2), (1 << 31, 4)] {
        if edx7 & feature != 0 {
            bits |= bit;
        }
    }
    if bits != 0 {
        for b in [1u64, 2, 4] {
            let want = if bits & b != 0 { None } else { gp };
            t.expect(
                format_args!("WRMSR SPEC_CTRL={b}"),
                wrmsr(SPEC_CTRL, b),
                want,
            );
            if bits & b != 0 {
                let (f, v) = rdmsr(SPEC_CTRL);
                t.require(
                    format_args!("SPEC_CTRL read back {v:#x}"),
                    f.is_none() && v == b,
                );
            }
        }
        for b in [1u64 << 3, 1 << 10, 1 << 32] {
            t.expect(
                format_args!("WRMSR SPEC_CTRL={b:#x}"),
                wrmsr(SPEC_CTRL, b),
                gp,
            );
        }
        t.expect(format_args!("WRMSR SPEC_CTRL=0"), wrmsr(SPEC_CTRL, 0), None);
    }
    let ibpb = if edx7 & 1 << 26 != 0 { None } else { gp };
    t.expect(
        format_args!("WRMSR PRED_CMD=IBPB"),
        wrmsr(PRED_CMD, 1),
        ibpb,
    );
    t.expect(format_args!("RDMSR PRED_CMD"), rdmsr(PRED_CMD).0, gp);

    // IA32_XSS holds no supervisor state.
    if cpuid(0xd, 1)[EAX] & 1 << 3 != 0 {
        for b in [1u64 << 8, 1 << 11, 1 << 12] {
            t.expect(format_args!("WRMSR XSS={b:#x}"), wrmsr(XSS, b), gp);
        }
        let [_, _, c, d] = cpuid(0xd, 1);
        t.require(
            format_args!("CPUID.(0DH,1) ECX={c:#x} EDX={d:#x}"),
            c == 0 && d == 0,
        );
    }

    // EFER.LME is frozen while paging is on.
    let (_, efer) = rdmsr(EFER);
    t.expect(
        format_args!("WRMSR EFER without LME"),
        wrmsr(EFER, efer & !EFER_LME),
        gp,
    );
    t.expect(
        format_args!("WRMSR EFER unchanged"),
        wrmsr(EFER, efer),
        None,
    );

    // IA32_APIC_BASE.EN off: no APIC in CPUID, nothing behind the xAPIC page; on: it is back.
    let (_, base) = rdmsr(APIC_BASE);
    t.expect(
        format_args!("WRMSR APIC_BASE.EN=0"),
        wrmsr(APIC_BASE, base & !(1 << 11)),
        None,
    );
    let apic = cpuid(1, 0)[EDX] & 1 << 9;
    t.require(
        format_args!("CPUID.1:EDX.APIC {apic:#x} while disabled"),
        apic == 0,
    );
    let v = read32(LAPIC_VERSION);
    t.require(
        format_args!("APIC version {v:#x} while disabled"),
        v == u32::MAX,
    );
    t.expect(
        format_args!("WRMSR APIC_BASE.EN=1"),
        wrmsr(APIC_BASE, base),
        None,
    );
    let apic = cpuid(1, 0)[EDX] & 1 << 9;
    t.require(
        format_args!("CPUID.1:EDX.APIC {apic:#x} enabled"),
        apic != 0,
    );
    let v = read32(LAPIC_VERSION);
    t.require(format_args!("APIC version {v:#x}"), v == 0x50014);

    // No PMU: RDPMC of counter 0 and of fixed counter 0.
    for ecx in [0u32, 1 << 30] {
        t.expect(
            format_args!("RDPMC {ecx:#x}"),
            fault!("rdpmc", in("ecx") ecx, out("eax") _, out("edx") _),
            gp,
        );
    }
    t.finish()
}
