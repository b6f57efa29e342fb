//! `attack=msr`: MSR accesses Keel must refuse with #GP, as a CPU without the MSR (or with the
//! value out of range) would: writes to IA32_FEATURE_CONTROL, EFER reserved bits, reads and
//! writes of the VMX capability MSRs 0x480-0x493, MSRs nobody defines, an invalid (EXTD without
//! EN) or relocated APIC base, an invalid PAT, non-canonical bases in the MSRs that go straight to
//! the CPU.
//! IA32_FEATURE_CONTROL must read as 1 (locked, VMX off).
//!
//! Prints `hostile64: msr gp=<n>/<n> ok`.

use super::{Tally, GP};
use hostile64::catch::{rdmsr, wrmsr};

const FEATURE_CONTROL: u32 = 0x3a;
const APIC_BASE: u32 = 0x1b;
const PAT: u32 = 0x277;
const SYSENTER_EIP: u32 = 0x176;
const EFER: u32 = 0xc000_0080;
const LSTAR: u32 = 0xc000_0082;
const FS_BASE: u32 = 0xc000_0100;
const KERNEL_GS_BASE: u32 = 0xc000_0102;
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;
/// MSRs no CPU Keel runs on defines for a guest: outside both bitmap ranges, in the hypervisor
/// range (Hyper-V's), AMD's, and gaps.
const UNKNOWN: [u32; 9] = [
    0x1,
    0x2000,
    0x1234_5678,
    0x4000_0000,
    0x4000_0001,
    0xc000_2000,
    0xc001_0000,
    0xdead_beef,
    0xffff_ffff,
];

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("msr", "gp");
    let gp = Some(GP);
    let (f, v) = rdmsr(FEATURE_CONTROL);
    t.expect(format_args!("RDMSR FEATURE_CONTROL"), f, None);
    t.require(format_args!("FEATURE_CONTROL value {v:#x}"), v == 1);
    for v in [0, 1, 5] {
        t.expect(
            format_args!("WRMSR FEATURE_CONTROL={v}"),
            wrmsr(FEATURE_CONTROL, v),
            gp,
        );
    }
    let (f, efer) = rdmsr(EFER);
    t.expect(format_args!("RDMSR EFER"), f, None);
    // Bit 1 reserved, 9 reserved, 12 SVME (AMD), 63 reserved.
    for bit in [1, 9, 12, 63] {
        t.expect(
            format_args!("WRMSR EFER bit {bit}"),
            wrmsr(EFER, efer | 1 << bit),
            gp,
        );
    }
    for msr in 0x480..=0x493 {
        t.expect(format_args!("RDMSR {msr:#x}"), rdmsr(msr).0, gp);
        t.expect(format_args!("WRMSR {msr:#x}"), wrmsr(msr, 0), gp);
    }
    for msr in UNKNOWN {
        t.expect(format_args!("RDMSR {msr:#x}"), rdmsr(msr).0, gp);
        t.expect(format_args!("WRMSR {msr:#x}"), wrmsr(msr, 0), gp);
    }
    // x2APIC enable without the global enable (SDM Table 11-5: invalid); the xAPIC page moved;
    // reserved bits.
    for v in [0xfee0_0500, 0xfed0_0900, 0xfee0_0901] {
        t.expect(
            format_args!("WRMSR APIC_BASE={v:#x}"),
            wrmsr(APIC_BASE, v),
            gp,
        );
    }
    // Memory type 2 is reserved in every PAT entry (SDM Vol. 3A 13.12.2).
    t.expect(
        format_args!("WRMSR PAT type 2"),
        wrmsr(PAT, 0x0007_0406_0007_0402),
        gp,
    );
    for (name, msr) in [
        ("FS_BASE", FS_BASE),
        ("KERNEL_GS_BASE", KERNEL_GS_BASE),
        ("LSTAR", LSTAR),
        ("SYSENTER_EIP", SYSENTER_EIP),
    ] {
        t.expect(
            format_args!("WRMSR {name} non-canonical"),
            wrmsr(msr, NON_CANONICAL),
            gp,
        );
    }
    t.finish()
}
