//! CPUID: what a guest learns about "its" processor.
//!
//! Policy: the real CPU's answers, minus what Keel does not virtualize, plus the hypervisor-present
//! bit and Keel's own leaves at 0x4000_0000, with a topology of one thread on one core so that every
//! leaf that describes the package agrees. A feature stays only if every MSR and instruction it
//! implies behaves as on the CPU (`exits::msr` implements or passes through each such MSR, the
//! tests check the two agree): [`HIDDEN`] lists what goes and why; a few more bits follow the
//! guest's own state ([`GuestFeatures`]). docs/GUESTS.md lists the same table.

use super::{Action, ExitContext, Host};
use crate::abi;
use crate::devices::lapic;
use crate::guest::Guest;
use crate::vmx::controls::{PrimaryControls, SecondaryControls};
use crate::vmx::{Control32, Vmcs};

pub mod bit {
    pub const ECX1_MONITOR: u32 = 1 << 3;
    pub const ECX1_VMX: u32 = 1 << 5;
    pub const ECX1_X2APIC: u32 = 1 << 21;
    pub const ECX1_OSXSAVE: u32 = 1 << 27;
    pub const ECX1_HYPERVISOR: u32 = 1 << 31;
    pub const ECX7_OSPKE: u32 = 1 << 4;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const CR4_PKE: u64 = 1 << 22;
    pub const ECX1_TSC_DEADLINE: u32 = 1 << 24;
    pub const EDX1_APIC: u32 = 1 << 9;
    pub const EDX1_HTT: u32 = 1 << 28;
    pub const EBX7_TSC_ADJUST: u32 = 1 << 1;
    pub const EBX7_INVPCID: u32 = 1 << 10;
    pub const ECX7_RDPID: u32 = 1 << 22;
    pub const EDX7_IBRS_IBPB: u32 = 1 << 26;
    pub const EDX7_STIBP: u32 = 1 << 27;
    pub const EDX7_L1D_FLUSH: u32 = 1 << 28;
    pub const EDX7_SSBD: u32 = 1 << 31;
    pub const EAXD1_XSAVES: u32 = 1 << 3;
    pub const EDX81_SYSCALL: u32 = 1 << 11;
    pub const EDX81_NX: u32 = 1 << 20;
    pub const EDX81_RDTSCP: u32 = 1 << 27;
    pub const EDX81_LM: u32 = 1 << 29;
}

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// A feature Keel takes out of the CPU's answer: (leaf, subleaf, register, bits, why).
pub struct Hidden {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: usize,
    pub bits: u32,
    pub why: &'static str,
}

const fn hide(leaf: u32, subleaf: u32, reg: usize, bits: u32, why: &'static str) -> Hidden {
    Hidden {
        leaf,
        subleaf,
        reg,
        bits,
        why,
    }
}

/// Every feature bit Keel hides. Leaves 5, 6, 0xA, 0xF, 0x10, 0x12, 0x14, 0x19, 0x1B, 0x1C and
/// 0x20 (MONITOR, power, PMU, RDT, SGX, PT, Key Locker, PCONFIG, LBR, HRESET) read as zeros.
pub const HIDDEN: &[Hidden] = &[
    hide(1, 0, ECX, 1 << 2, "DTES64: no debug store"),
    hide(1, 0, ECX, 1 << 3, "MONITOR/MWAIT: #UD"),
    hide(1, 0, ECX, 1 << 4, "DS-CPL: no debug store"),
    hide(1, 0, ECX, 1 << 5, "VMX: not offered"),
    hide(1, 0, ECX, 1 << 6, "SMX: GETSEC #UD"),
    hide(1, 0, ECX, 1 << 7, "EIST: no IA32_PERF_CTL"),
    hide(1, 0, ECX, 1 << 8, "TM2: no thermal MSRs"),
    hide(1, 0, ECX, 1 << 10, "CNXT-ID: MISC_ENABLE bit 24 not kept"),
    hide(1, 0, ECX, 1 << 11, "SDBG: no IA32_DEBUG_INTERFACE"),
    hide(1, 0, ECX, 1 << 14, "xTPR: MISC_ENABLE bit 23 not kept"),
    hide(1, 0, ECX, 1 << 15, "PDCM: no IA32_PERF_CAPABILITIES"),
    hide(1, 0, ECX, 1 << 18, "DCA: no IA32_PLATFORM_DCA_CAP"),
    hide(1, 0, EDX, 1 << 21, "DS: no IA32_DS_AREA"),
    hide(1, 0, EDX, 1 << 22, "ACPI: no thermal MSRs"),
    hide(1, 0, EDX, 1 << 28, "HTT: one thread"),
    hide(1, 0, EDX, 1 << 29, "TM: no thermal MSRs"),
    hide(1, 0, EDX, 1 << 31, "PBE: no thermal MSRs"),
    hide(7, 0, EBX, 1 << 2, "SGX: not offered"),
    hide(7, 0, EBX, 1 << 12, "RDT-M: no IA32_QM_EVTSEL/PQR_ASSOC"),
    hide(7, 0, EBX, 1 << 14, "MPX: no IA32_BNDCFGS"),
    hide(7, 0, EBX, 1 << 15, "RDT-A: no IA32_PQR_ASSOC or masks"),
    hide(7, 0, EBX, 1 << 25, "Intel PT: no IA32_RTIT_* MSRs"),
    hide(
        7,
        0,
        ECX,
        1 << 5,
        "WAITPKG: TPAUSE/UMWAIT #UD, no IA32_UMWAIT_CONTROL",
    ),
    hide(7, 0, ECX, 1 << 7, "CET_SS: no CET MSRs"),
    hide(7, 0, ECX, 1 << 13, "TME: no IA32_TME_* MSRs"),
    hide(7, 0, ECX, 1 << 23, "Key Locker: not offered"),
    hide(7, 0, ECX, 1 << 29, "ENQCMD: no IA32_PASID"),
    hide(7, 0, ECX, 1 << 30, "SGX_LC: SGX not offered"),
    hide(7, 0, ECX, 1 << 31, "PKS: no IA32_PKRS"),
    hide(7, 0, EDX, 1 << 5, "UINTR: no IA32_UINTR_* MSRs"),
    hide(7, 0, EDX, 1 << 9, "SRBDS_CTRL: no IA32_MCU_OPT_CTRL"),
    hide(7, 0, EDX, 1 << 13, "TSX_FORCE_ABORT: no MSR 0x10f"),
    hide(7, 0, EDX, 1 << 18, "PCONFIG: #UD"),
    hide(7, 0, EDX, 1 << 19, "arch LBR: no LBR MSRs"),
    hide(7, 0, EDX, 1 << 20, "CET_IBT: no CET MSRs"),
    hide(
        7,
        0,
        EDX,
        1 << 29,
        "ARCH_CAPABILITIES: the host's would name MSRs Keel lacks",
    ),
    hide(
        7,
        0,
        EDX,
        1 << 30,
        "CORE_CAPABILITIES: no split-lock control",
    ),
    hide(7, 1, EAX, 1 << 17, "FRED: no IA32_FRED_* MSRs"),
    hide(7, 1, EAX, 1 << 22, "HRESET: no IA32_HRESET_ENABLE"),
    hide(7, 1, EAX, 1 << 26, "LAM: CR3 bits not checked"),
    hide(
        7,
        2,
        EDX,
        u32::MAX,
        "SPEC_CTRL bits beyond IBRS/STIBP/SSBD: not kept",
    ),
    hide(0xd, 1, EAX, 1 << 4, "XFD: no IA32_XFD"),
    hide(
        0xd,
        1,
        ECX,
        u32::MAX,
        "IA32_XSS: no supervisor state (see exits::msr)",
    ),
    hide(0xd, 1, EDX, u32::MAX, "IA32_XSS: no supervisor state"),
];

/// XCR0 components of hidden features: BNDREGS and BNDCSR (MPX, bits 3 and 4). CPUID.(0DH,0)
/// leaves them out and XSETBV refuses them (`exits::xsetbv`), as on a CPU without MPX.
pub const XCR0_HIDDEN: u64 = 0b11 << 3;

/// Leaves that read as zeros: the features they describe are hidden.
const ZERO_LEAVES: &[u32] = &[5, 6, 0xa, 0xf, 0x10, 0x12, 0x14, 0x19, 0x1b, 0x1c, 0x20];

/// What a guest's CPUID depends on besides the CPU: its CR4 (OSXSAVE, OSPKE), its APIC's global
/// enable (CPUID.1:EDX.APIC, SDM 10.4.3), and the execution controls that decide whether RDTSCP,
/// RDPID, INVPCID, XSAVES and TSC offsetting work in it (SDM 26.3: without them RDTSCP, INVPCID
/// and XSAVES are #UD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestFeatures {
    pub cr4: u64,
    pub apic_enabled: bool,
    pub primary: u32,
    pub secondary: u32,
}

impl GuestFeatures {
    pub fn of<V: Vmcs + ?Sized>(vmcs: &V, guest: &Guest) -> Self {
        Self {
            cr4: super::cr::live_cr4(vmcs, guest),
            apic_enabled: guest.platform.apic_base() & crate::exits::msr::APIC_BASE_ENABLE != 0,
            primary: vmcs.read(Control32::PrimaryProcBasedControls),
            secondary: vmcs.read(Control32::SecondaryProcBasedControls),
        }
    }

    fn secondary(&self, c: SecondaryControls) -> bool {
        self.secondary & c.bits() != 0
    }

    pub fn tsc_offsetting(&self) -> bool {
        self.primary & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0
    }
}

/// The leaves whose answer depends on [`GuestFeatures`]; the others (CPUID 0 among them: the
/// benchmark's exit) skip the VMCS reads.
fn depends_on_guest(leaf: u32) -> bool {
    matches!(leaf, 1 | 7 | 0xd | 0x8000_0001)
}

/// The guest's CPUID(leaf, subleaf) now: what the MSR handlers check a feature against.
pub fn of_guest<V: Vmcs + ?Sized>(
    vmcs: &V,
    guest: &Guest,
    host: &dyn Host,
    leaf: u32,
    subleaf: u32,
) -> [u32; 4] {
    let f = if depends_on_guest(leaf) {
        GuestFeatures::of(vmcs, guest)
    } else {
        GuestFeatures::default()
    };
    policy(host, leaf, subleaf, &f)
}

/// The answer the guest gets for CPUID(leaf, subleaf).
#[inline]
pub fn policy(host: &dyn Host, leaf: u32, subleaf: u32, f: &GuestFeatures) -> [u32; 4] {
    use bit::*;
    let mut r = match leaf {
        abi::CPUID_SIGNATURE_LEAF => {
            let s = abi::SIGNATURE;
            let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            return [abi::CPUID_MAX_LEAF, w(0), w(4), w(8)];
        }
        abi::CPUID_INTERFACE_LEAF => return [abi::ABI_VERSION, 0, 0, 0],
        0x4000_0002..=0x4000_00ff => return [0; 4],
        l if ZERO_LEAVES.contains(&l) => return [0; 4],
        1 => {
            let [a, b, c, d] = host.cpuid(1, 0);
            // OSXSAVE mirrors the guest's own CR4.OSXSAVE, not Keel's (SDM Vol. 2A, CPUID).
            // x2APIC is Keel's own model (`devices::lapic`), whatever the CPU has.
            let c = (c & !ECX1_OSXSAVE) | ECX1_HYPERVISOR | ECX1_X2APIC;
            let c = if f.cr4 & CR4_OSXSAVE != 0 {
                c | ECX1_OSXSAVE
            } else {
                c
            };
            let d = if f.apic_enabled { d } else { d & !EDX1_APIC };
            // EBX: the initial APIC ID (bits 31:24), one logical processor (23:16), CLFLUSH
            // line size and brand index kept.
            let b = (b & 0xffff) | (1 << 16) | (lapic::INITIAL_APIC_ID & 0xff) << 24;
            [a, b, c, d]
        }
        4 => {
            // Deterministic cache parameters: keep the cache, report one core and one thread.
            let [a, b, c, d] = host.cpuid(4, subleaf);
            [a & 0x3fff, b, c, d]
        }
        7 if subleaf == 0 => {
            let [a, mut b, mut c, d] = host.cpuid(7, 0);
            // OSPKE mirrors the guest's CR4.PKE.
            if f.cr4 & CR4_PKE == 0 {
                c &= !ECX7_OSPKE;
            }
            if !f.tsc_offsetting() {
                b &= !EBX7_TSC_ADJUST;
            }
            if !f.secondary(SecondaryControls::ENABLE_INVPCID) {
                b &= !EBX7_INVPCID;
            }
            if !f.secondary(SecondaryControls::ENABLE_RDTSCP) {
                c &= !ECX7_RDPID;
            }
            [a, b, c, d]
        }
        0xd => {
            let mut r = host.cpuid(0xd, subleaf);
            if subleaf == 0 {
                r[EAX] &= !(XCR0_HIDDEN as u32);
            }
            if XCR0_HIDDEN & 1u64.checked_shl(subleaf).unwrap_or(0) != 0 {
                r = [0; 4];
            }
            if subleaf == 1 && !f.secondary(SecondaryControls::ENABLE_XSAVES) {
                r[EAX] &= !EAXD1_XSAVES;
            }
            // A supervisor state component (ECX bit 0): IA32_XSS enables none.
            if subleaf >= 2 && r[ECX] & 1 != 0 {
                r = [0; 4];
            }
            r
        }
        0x8000_0001 => {
            let mut r = host.cpuid(leaf, subleaf);
            if !f.secondary(SecondaryControls::ENABLE_RDTSCP) {
                r[EDX] &= !EDX81_RDTSCP;
            }
            r
        }
        // Extended topology: one thread (level 1, SMT) in one core (level 2); EDX is the
        // x2APIC ID in every subleaf (SDM Vol. 2A, CPUID leaf 0BH).
        0xb | 0x1f => {
            let id = lapic::INITIAL_APIC_ID;
            return match subleaf {
                0 => [0, 1, 1 << 8, id],
                1 => [0, 1, 1 | (2 << 8), id],
                n => [0, 0, n & 0xff, id],
            };
        }
        _ => host.cpuid(leaf, subleaf),
    };
    // ECX selects a subleaf only in the leaves that have them (SDM Vol. 2A, CPUID).
    let has_subleaves = matches!(leaf, 7 | 0xd);
    for h in HIDDEN {
        if h.leaf == leaf && (h.subleaf == subleaf || !has_subleaves) {
            r[h.reg] &= !h.bits;
        }
    }
    r
}

/// Whether the guest's CPUID(leaf, subleaf) register `reg` has `bit` set.
pub fn has<V: Vmcs + ?Sized>(
    vmcs: &V,
    guest: &Guest,
    host: &dyn Host,
    (leaf, subleaf, reg): (u32, u32, usize),
    bit: u32,
) -> bool {
    of_guest(vmcs, guest, host, leaf, subleaf)[reg] & bit != 0
}

/// Register positions for [`has`].
pub const LEAF1_ECX: (u32, u32, usize) = (1, 0, ECX);
pub const LEAF1_EDX: (u32, u32, usize) = (1, 0, EDX);
pub const LEAF7_EBX: (u32, u32, usize) = (7, 0, EBX);
pub const LEAF7_EDX: (u32, u32, usize) = (7, 0, EDX);
pub const LEAFD1_EAX: (u32, u32, usize) = (0xd, 1, EAX);
pub const LEAF81_EDX: (u32, u32, usize) = (0x8000_0001, 0, EDX);

#[inline]
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let leaf = cx.guest.regs.rax as u32;
    let subleaf = cx.guest.regs.rcx as u32;
    let [a, b, c, d] = of_guest(cx.vmcs, cx.guest, cx.host, leaf, subleaf);
    let r = &mut cx.guest.regs;
    // CPUID writes the low 32 bits and clears the upper halves in 64-bit mode.
    r.rax = a as u64;
    r.rbx = b as u64;
    r.rcx = c as u64;
    r.rdx = d as u64;
    Action::Advance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;

    fn features(cr4: u64) -> GuestFeatures {
        GuestFeatures {
            cr4,
            apic_enabled: true,
            primary: 0,
            secondary: 0,
        }
    }

    #[test]
    fn signature_and_bits() {
        let mut t = TestBed::new();
        t.guest.regs.rax = 0x4000_0000;
        assert_eq!(t.run(crate::vmx::ExitReason::Cpuid), Action::Advance);
        let r = t.guest.regs;
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&(r.rbx as u32).to_le_bytes());
        sig[4..8].copy_from_slice(&(r.rcx as u32).to_le_bytes());
        sig[8..].copy_from_slice(&(r.rdx as u32).to_le_bytes());
        assert_eq!(&sig, b"KeelKeelKeel");
        assert_eq!(r.rax, 0x4000_0001);

        t.guest.regs.rax = 1;
        t.run(crate::vmx::ExitReason::Cpuid);
        let c = t.guest.regs.rcx as u32;
        assert_ne!(c & bit::ECX1_HYPERVISOR, 0, "hypervisor bit set");
        assert_eq!(c & bit::ECX1_VMX, 0, "VMX hidden");
        assert_ne!(c & bit::ECX1_X2APIC, 0, "x2APIC emulated");
        assert_eq!((t.guest.regs.rbx >> 16) & 0xff, 1, "one logical processor");
        assert_eq!(t.guest.regs.rdx as u32 & bit::EDX1_HTT, 0);
    }

    #[test]
    fn osxsave_follows_the_guests_cr4() {
        let t = TestBed::new();
        // The fake CPU reports OSXSAVE, as the real one does for Keel (which sets CR4.OSXSAVE).
        assert_ne!(t.host.cpuid(1, 0)[2] & bit::ECX1_OSXSAVE, 0);
        assert_eq!(
            policy(&t.host, 1, 0, &features(0))[2] & bit::ECX1_OSXSAVE,
            0
        );
        assert_ne!(
            policy(&t.host, 1, 0, &features(bit::CR4_OSXSAVE))[2] & bit::ECX1_OSXSAVE,
            0
        );
    }

    #[test]
    fn topology_is_one_thread() {
        let t = TestBed::new();
        assert_eq!(policy(&t.host, 0xb, 0, &features(0))[1], 1);
        assert_eq!(policy(&t.host, 0xb, 1, &features(0))[1], 1);
        assert_eq!(
            policy(&t.host, 0xb, 2, &features(0))[2] >> 8 & 0xff,
            0,
            "level 2 is invalid"
        );
        assert_eq!(
            policy(&t.host, 4, 0, &features(0))[0] >> 14,
            0,
            "no sibling threads or cores"
        );
        assert_eq!(policy(&t.host, 0x4000_0005, 0, &features(0)), [0; 4]);
        // Everything else comes from the CPU.
        assert_eq!(
            policy(&t.host, 0x8000_0000, 0, &features(0)),
            t.host.cpuid(0x8000_0000, 0)
        );
    }

    #[test]
    fn any_subleaf_is_answered() {
        let t = TestBed::new();
        assert_eq!(policy(&t.host, 0xd, 3, &features(0)), [0; 4], "MPX BNDREGS");
        // The fake CPU marks every other subleaf a supervisor component (ECX bit 0): none is
        // enabled in IA32_XSS, so each reads as zeros, however large the subleaf (no shift
        // overflow).
        assert_eq!(t.host.cpuid(0xd, u32::MAX)[2] & 1, 1);
        assert_eq!(policy(&t.host, 0xd, u32::MAX, &features(0)), [0; 4]);
        assert_eq!(policy(&t.host, 0xd, 64, &features(0)), [0; 4]);
    }

    #[test]
    fn only_the_listed_leaves_depend_on_the_guest() {
        let t = TestBed::new();
        let all = GuestFeatures {
            cr4: u64::MAX,
            apic_enabled: true,
            primary: u32::MAX,
            secondary: u32::MAX,
        };
        let leaves = (0..0x30)
            .chain(0x4000_0000..0x4000_0010)
            .chain(0x8000_0000..0x8000_0010);
        for leaf in leaves.filter(|&l| !depends_on_guest(l)) {
            for sub in 0..4 {
                assert_eq!(
                    policy(&t.host, leaf, sub, &all),
                    policy(&t.host, leaf, sub, &GuestFeatures::default()),
                    "leaf {leaf:#x}.{sub}"
                );
            }
        }
    }
}
