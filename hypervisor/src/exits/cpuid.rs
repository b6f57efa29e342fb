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
use crate::devices::clock::LAPIC_TIMER_HZ;
use crate::guest::{Vcpu, Vm};
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

/// The least highest basic leaf the guest is told (CPUID.0:EAX): Keel answers the TSC leaves 0x15
/// and 0x16 itself, whatever the CPU has.
pub const MIN_MAX_BASIC_LEAF: u32 = 0x16;

/// Leaves that read as zeros: the features they describe are hidden.
const ZERO_LEAVES: &[u32] = &[5, 6, 0xa, 0xf, 0x10, 0x12, 0x14, 0x19, 0x1b, 0x1c, 0x20];

/// What a guest's CPUID depends on besides the CPU: its CR4 (OSXSAVE, OSPKE), its APIC's global
/// enable (CPUID.1:EDX.APIC, SDM 10.4.3), the execution controls that decide whether RDTSCP,
/// RDPID, INVPCID, XSAVES and TSC offsetting work in it (SDM 26.3: without them RDTSCP, INVPCID
/// and XSAVES are #UD), and the rate of its TSC (its platform's: the rate its device models run
/// at; 0 if unknown), for the leaves 0x15, 0x16 and 0x4000_0010; and which vCPU asks, of how
/// many (its initial APIC ID and the topology, leaves 1, 4 and 0xB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestFeatures {
    pub cr4: u64,
    pub apic_enabled: bool,
    pub primary: u32,
    pub secondary: u32,
    pub tsc_hz: u64,
    /// The vCPU's initial APIC ID (its index).
    pub apic_id: u32,
    /// How many vCPUs the guest has (0 is taken as 1).
    pub cpus: u32,
}

impl GuestFeatures {
    pub fn of<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu, vm: &Vm) -> Self {
        Self {
            cr4: super::cr::live_cr4(vmcs, vcpu),
            apic_enabled: vm.platform.apic_base(vcpu.index) & crate::exits::msr::APIC_BASE_ENABLE
                != 0,
            primary: vmcs.read(Control32::PrimaryProcBasedControls),
            secondary: vmcs.read(Control32::SecondaryProcBasedControls),
            tsc_hz: vm.platform.tsc_hz(),
            apic_id: vcpu.index as u32,
            cpus: vm.platform.cpus() as u32,
        }
    }

    fn secondary(&self, c: SecondaryControls) -> bool {
        self.secondary & c.bits() != 0
    }

    pub fn tsc_offsetting(&self) -> bool {
        self.primary & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0
    }
}

/// The leaves whose answer depends on the VMCS part of [`GuestFeatures`]; the others (CPUID 0
/// among them: the benchmark's exit) skip the VMCS reads. The TSC rate costs no VMCS read and is
/// always filled in.
fn depends_on_guest(leaf: u32) -> bool {
    matches!(leaf, 1 | 7 | 0xd | 0x8000_0001)
}

/// The guest's CPUID(leaf, subleaf) now: what the MSR handlers check a feature against.
pub fn of_guest<V: Vmcs + ?Sized>(
    vmcs: &V,
    vcpu: &Vcpu,
    vm: &Vm,
    host: &dyn Host,
    leaf: u32,
    subleaf: u32,
) -> [u32; 4] {
    let f = if depends_on_guest(leaf) {
        GuestFeatures::of(vmcs, vcpu, vm)
    } else {
        GuestFeatures {
            tsc_hz: vm.platform.tsc_hz(),
            apic_id: vcpu.index as u32,
            cpus: vm.platform.cpus() as u32,
            ..GuestFeatures::default()
        }
    };
    policy(host, leaf, subleaf, &f)
}

/// MAXPHYADDR as the guest's CPUID reports it (leaf 8000_0008H EAX[7:0], which depends on nothing
/// of the guest's state): the width the reserved bits of its paging entries start at (SDM 4.1.4).
pub fn guest_maxphyaddr(host: &dyn Host) -> u8 {
    policy(host, 0x8000_0008, 0, &GuestFeatures::default())[0] as u8
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
        abi::CPUID_TIMING_LEAF => {
            let khz = |hz: u64| u32::try_from(hz / 1000).unwrap_or(u32::MAX);
            return [khz(f.tsc_hz), khz(LAPIC_TIMER_HZ), 0, 0];
        }
        0x4000_0002..=0x4000_00ff => return [0; 4],
        l if ZERO_LEAVES.contains(&l) => return [0; 4],
        0 => {
            let mut r = host.cpuid(0, 0);
            r[EAX] = r[EAX].max(MIN_MAX_BASIC_LEAF);
            return r;
        }
        0x15 => return tsc_leaf(f.tsc_hz),
        0x16 => {
            // Processor base and maximum frequency, and the bus (reference) clock, in MHz
            // (bits 15:0): the TSC's rate, and the LAPIC timer's input clock.
            let mhz = |hz: u64| ((hz + 500_000) / 1_000_000).min(0xffff) as u32;
            return match f.tsc_hz {
                0 => [0; 4],
                hz => [mhz(hz), mhz(hz), mhz(LAPIC_TIMER_HZ), 0],
            };
        }
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
            // EBX: the vCPU's initial APIC ID (bits 31:24), the package's logical processors
            // (23:16; EDX.HTT stays hidden, so software takes the topology from leaf 0BH),
            // CLFLUSH line size and brand index kept. The vCPUs are cores of one package, one
            // thread each.
            let n = f.cpus.max(1);
            let b = (b & 0xffff) | (n.min(0xff) << 16) | (f.apic_id & 0xff) << 24;
            [a, b, c, d]
        }
        4 => {
            // Deterministic cache parameters: keep the cache; EAX[31:26] is the package's cores
            // less one (one per vCPU), and one thread shares each cache (25:14 = 0).
            let [a, b, c, d] = host.cpuid(4, subleaf);
            let cores = f.cpus.clamp(1, 64) - 1;
            [
                (a & 0x3fff) | if a & 0x1f != 0 { cores << 26 } else { 0 },
                b,
                c,
                d,
            ]
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
        // Extended topology: one thread (level 1, SMT) per core, the guest's vCPUs the cores of
        // one package (level 2: EBX their number, EAX the bits the x2APIC ID shifts to reach the
        // package ID); EDX is the vCPU's x2APIC ID in every subleaf (SDM Vol. 2A, CPUID leaf
        // 0BH). Leaf 0x1F (V2 topology) exists only up to the guest's highest basic leaf.
        0x1f if host.cpuid(0, 0)[EAX] < 0x1f => {
            return policy(host, MIN_MAX_BASIC_LEAF, subleaf, f);
        }
        0xb | 0x1f => {
            let id = f.apic_id;
            let n = f.cpus.max(1);
            let shift = u32::BITS - (n - 1).leading_zeros();
            return match subleaf {
                0 => [0, 1, 1 << 8, id],
                1 => [shift, n, 1 | (2 << 8), id],
                n => [0, 0, n & 0xff, id],
            };
        }
        l if l < 0x4000_0000 => {
            // A basic leaf the CPU does not have: zeros up to the guest's highest, the highest
            // basic leaf's answer above it (SDM Vol. 2A, CPUID), as on the CPU.
            let host_max = host.cpuid(0, 0)[EAX];
            if l <= host_max {
                host.cpuid(leaf, subleaf)
            } else if l <= MIN_MAX_BASIC_LEAF {
                return [0; 4];
            } else {
                return policy(host, host_max.max(MIN_MAX_BASIC_LEAF), subleaf, f);
            }
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

/// Leaf 0x15 for a TSC of `tsc_hz` (SDM Vol. 2A, CPUID leaf 15H: TSC = ECX * EBX / EAX): the core
/// crystal clock in ECX is the local APIC timer's input clock, as on the CPUs that enumerate it,
/// so a guest learns the timer's rate as well (Linux 6.1 sets `lapic_timer_period` from it); the
/// ratio EBX/EAX is the best fraction for the TSC whose numerator keeps `crystal kHz * EBX` below
/// 2^32, because Linux 6.1's `native_calibrate_tsc` computes the TSC in kHz that way in 32-bit
/// arithmetic. Zeros when the rate is unknown (the leaf then enumerates nothing).
fn tsc_leaf(tsc_hz: u64) -> [u32; 4] {
    let crystal_khz = LAPIC_TIMER_HZ / 1000;
    let max_numerator = u64::from(u32::MAX) / crystal_khz;
    match best_fraction(tsc_hz, LAPIC_TIMER_HZ, max_numerator, u64::from(u32::MAX)) {
        Some((num, den)) => [den as u32, num as u32, LAPIC_TIMER_HZ as u32, 0],
        None => [0; 4],
    }
}

/// The fraction p/q closest to `n/d` with 1 <= p <= `max_p` and 1 <= q <= `max_q`: the last
/// continued-fraction convergent within the bounds, or the semiconvergent after it when that is
/// closer. None if n or d is 0.
fn best_fraction(n: u64, d: u64, max_p: u64, max_q: u64) -> Option<(u64, u64)> {
    if n == 0 || d == 0 {
        return None;
    }
    let (max_p, max_q) = (u128::from(max_p), u128::from(max_q));
    // Convergents h(k-2)/k(k-2) and h(k-1)/k(k-1), starting from 0/1 and 1/0.
    let (mut p0, mut q0, mut p1, mut q1) = (0u128, 1u128, 1u128, 0u128);
    let (mut num, mut den) = (u128::from(n), u128::from(d));
    while den != 0 {
        let a = num / den;
        let (p2, q2) = (a * p1 + p0, a * q1 + q0);
        if p2 > max_p || q2 > max_q {
            // The largest t < a that stays within bounds gives the semiconvergent.
            let t = [(max_p - p0) / p1.max(1), (max_q - q0) / q1.max(1)]
                .into_iter()
                .min()
                .unwrap_or(0);
            let (ps, qs) = (t * p1 + p0, t * q1 + q0);
            // Closer to n/d: |ps/qs - n/d| < |p1/q1 - n/d|, both sides multiplied by d*qs*q1.
            let (x, y) = (u128::from(n), u128::from(d));
            let closer = (ps * y).abs_diff(x * qs) * q1 < (p1 * y).abs_diff(x * q1) * qs;
            if t > 0 && (q1 == 0 || closer) {
                (p1, q1) = (ps, qs);
            }
            break;
        }
        (p0, q0, p1, q1) = (p1, q1, p2, q2);
        (num, den) = (den, num - a * den);
    }
    (p1 >= 1 && q1 >= 1).then_some((p1 as u64, q1 as u64))
}

/// Whether the guest's CPUID(leaf, subleaf) register `reg` has `bit` set.
pub fn has<V: Vmcs + ?Sized>(
    vmcs: &V,
    vcpu: &Vcpu,
    vm: &Vm,
    host: &dyn Host,
    (leaf, subleaf, reg): (u32, u32, usize),
    bit: u32,
) -> bool {
    of_guest(vmcs, vcpu, vm, host, leaf, subleaf)[reg] & bit != 0
}

/// Register positions for [`has`].
pub const LEAF1_ECX: (u32, u32, usize) = (1, 0, ECX);
pub const LEAF1_EDX: (u32, u32, usize) = (1, 0, EDX);
pub const LEAF7_EBX: (u32, u32, usize) = (7, 0, EBX);
pub const LEAF7_EDX: (u32, u32, usize) = (7, 0, EDX);
pub const LEAFD1_EAX: (u32, u32, usize) = (0xd, 1, EAX);
pub const LEAF81_EDX: (u32, u32, usize) = (0x8000_0001, 0, EDX);

/// Basic leaves whose answer depends on neither the guest's state nor ECX (SDM Vol. 2A, CPUID:
/// none of them has subleaves) nor the vCPU that asks: bit n for leaf n. Leaves 1, 4, 7, 0xB, 0xD
/// and 0x1F are left out (they follow the guest's CR4 or controls, take a subleaf, or name the
/// vCPU).
const TABLE_BASIC: u32 = 1 << 0
    | 1 << 2
    | 1 << 3
    | 1 << 5
    | 1 << 6
    | 1 << 9
    | 1 << 0xa
    | 1 << 0xf
    | 1 << 0x10
    | 1 << 0x12
    | 1 << 0x14
    | 1 << 0x15
    | 1 << 0x16;
/// Keel's leaves in the table: 0x4000_0000 up to the timing leaf.
const TABLE_KEEL: usize = (abi::CPUID_TIMING_LEAF - abi::CPUID_SIGNATURE_LEAF) as usize + 1;
/// Extended leaves in the table: 0x8000_0000 and 0x8000_0002-0x8000_0008 (0x8000_0001 follows
/// the guest's controls).
const TABLE_EXT: usize = 9;

/// A guest's answers to the leaves that depend only on the CPU and on what the guest was built
/// with (its TSC rate, its vCPU count): [`policy`]'s answers, computed at the guest's first CPUID
/// exit and then read by index, so that the common leaves cost neither the policy's checks nor a
/// CPUID of the real CPU (itself an exit when Keel runs nested). The other leaves still go
/// through [`of_guest`].
#[derive(Debug, Clone, Default)]
pub struct CpuidTable {
    filled: bool,
    /// The basic leaves the table holds: `TABLE_BASIC` once filled, none before (one test in
    /// [`CpuidTable::get`] for both, on the run loop's reflex).
    basic_held: u32,
    basic: [[u32; 4]; 0x17],
    keel: [[u32; 4]; TABLE_KEEL],
    ext: [[u32; 4]; TABLE_EXT],
    /// CPUID.1:ECX.TSC_DEADLINE[bit 24] as the guest is told it: leaf 1 is not in the table (its
    /// OSXSAVE, APIC and APIC ID bits follow the guest), but this bit depends on the CPU alone,
    /// and IA32_TSC_DEADLINE (the MSR Linux writes most) checks it at every access.
    tsc_deadline: bool,
}

impl CpuidTable {
    /// Computes every leaf of the table for a guest of `tsc_hz` and `cpus` vCPUs.
    pub fn fill(&mut self, host: &dyn Host, tsc_hz: u64, cpus: u32) {
        let f = GuestFeatures {
            tsc_hz,
            cpus,
            ..GuestFeatures::default()
        };
        for (leaf, r) in self.basic.iter_mut().enumerate() {
            if TABLE_BASIC & (1 << leaf) != 0 {
                *r = policy(host, leaf as u32, 0, &f);
            }
        }
        for (i, r) in self.keel.iter_mut().enumerate() {
            *r = policy(host, abi::CPUID_SIGNATURE_LEAF + i as u32, 0, &f);
        }
        for (i, r) in self.ext.iter_mut().enumerate() {
            *r = policy(host, 0x8000_0000 + i as u32, 0, &f);
        }
        self.tsc_deadline = policy(host, 1, 0, &f)[ECX] & bit::ECX1_TSC_DEADLINE != 0;
        self.filled = true;
        self.basic_held = TABLE_BASIC;
    }

    /// Whether the guest's CPUID.1:ECX advertises the TSC-deadline timer (SDM Vol. 3A 11.5.4.1:
    /// without it IA32_TSC_DEADLINE is #GP); None until the table is filled (the guest's first
    /// CPUID exit), when [`has`] tells.
    #[inline]
    pub fn tsc_deadline(&self) -> Option<bool> {
        self.filled.then_some(self.tsc_deadline)
    }

    pub fn filled(&self) -> bool {
        self.filled
    }

    /// The answer for `leaf` if the table holds it.
    #[inline]
    pub fn get(&self, leaf: u32) -> Option<&[u32; 4]> {
        match leaf {
            0..=0x16 if self.basic_held & (1 << leaf) != 0 => Some(&self.basic[leaf as usize]),
            _ if !self.filled => None,
            0x8000_0000 | 0x8000_0002..=0x8000_0008 => {
                Some(&self.ext[(leaf - 0x8000_0000) as usize])
            }
            l if l.wrapping_sub(abi::CPUID_SIGNATURE_LEAF) < TABLE_KEEL as u32 => {
                Some(&self.keel[(l - abi::CPUID_SIGNATURE_LEAF) as usize])
            }
            _ => None,
        }
    }
}

/// Whether the guest's CPUID advertises the TSC-deadline timer: from its table once filled
/// ([`CpuidTable::tsc_deadline`]), else worked out.
#[inline]
pub fn tsc_deadline<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu, vm: &Vm, host: &dyn Host) -> bool {
    vm.cpuid
        .tsc_deadline()
        .unwrap_or_else(|| has(vmcs, vcpu, vm, host, LEAF1_ECX, bit::ECX1_TSC_DEADLINE))
}

#[inline]
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let leaf = cx.vcpu.regs.rax as u32;
    let subleaf = cx.vcpu.regs.rcx as u32;
    if !cx.vm.cpuid.filled() {
        let (tsc_hz, cpus) = (cx.vm.platform.tsc_hz(), cx.vm.platform.cpus() as u32);
        cx.vm.cpuid.fill(&*cx.host, tsc_hz, cpus);
    }
    // Written from the table in place: an answer copied out of either source first went
    // through the stack (8 instructions an exit, docs/BENCHMARKS.md).
    match cx.vm.cpuid.get(leaf) {
        Some(r) => answer(&mut cx.vcpu.regs, r),
        None => {
            let r = of_guest(cx.vmcs, cx.vcpu, cx.vm, cx.host, leaf, subleaf);
            answer(&mut cx.vcpu.regs, &r)
        }
    }
    Action::Advance
}

/// CPUID's answer in the guest's registers: it writes the low 32 bits of RAX, RBX, RCX and RDX
/// and clears their upper halves in 64-bit mode (SDM Vol. 2A, CPUID).
#[inline(always)]
pub(crate) fn answer(r: &mut crate::guest::GuestRegs, &[a, b, c, d]: &[u32; 4]) {
    r.rax = a as u64;
    r.rbx = b as u64;
    r.rcx = c as u64;
    r.rdx = d as u64;
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
            tsc_hz: 0,
            apic_id: 0,
            cpus: 1,
        }
    }

    #[test]
    fn each_vcpu_reads_its_own_apic_id_and_the_guests_cpu_count() {
        let t = TestBed::new();
        let vcpu = |apic_id, cpus| GuestFeatures {
            apic_id,
            cpus,
            ..features(0)
        };
        let leaf1 = policy(&t.host, 1, 0, &vcpu(2, 4));
        assert_eq!(leaf1[EBX] >> 24, 2, "initial APIC ID");
        assert_eq!(
            (leaf1[EBX] >> 16) & 0xff,
            4,
            "logical processors in the package"
        );
        let one = policy(&t.host, 1, 0, &vcpu(0, 1));
        assert_eq!((one[EBX] >> 24, one[EBX] >> 16 & 0xff), (0, 1));
        // Leaf 0BH: SMT level one thread, core level 4 vCPUs behind a 2-bit shift; EDX the ID.
        assert_eq!(policy(&t.host, 0xb, 0, &vcpu(3, 4)), [0, 1, 1 << 8, 3]);
        assert_eq!(policy(&t.host, 0xb, 1, &vcpu(3, 4)), [2, 4, 1 | 2 << 8, 3]);
        assert_eq!(policy(&t.host, 0xb, 1, &vcpu(0, 1)), [0, 1, 1 | 2 << 8, 0]);
        assert_eq!(
            policy(&t.host, 4, 0, &vcpu(1, 4))[EAX] >> 26,
            3,
            "cores less one"
        );
    }

    #[test]
    fn signature_and_bits() {
        let mut t = TestBed::new();
        t.vcpu.regs.rax = 0x4000_0000;
        assert_eq!(t.run(crate::vmx::ExitReason::Cpuid), Action::Advance);
        let r = t.vcpu.regs;
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&(r.rbx as u32).to_le_bytes());
        sig[4..8].copy_from_slice(&(r.rcx as u32).to_le_bytes());
        sig[8..].copy_from_slice(&(r.rdx as u32).to_le_bytes());
        assert_eq!(&sig, b"KeelKeelKeel");
        assert_eq!(r.rax, 0x4000_0010, "up to the timing leaf");

        t.vcpu.regs.rax = 1;
        t.run(crate::vmx::ExitReason::Cpuid);
        let c = t.vcpu.regs.rcx as u32;
        assert_ne!(c & bit::ECX1_HYPERVISOR, 0, "hypervisor bit set");
        assert_eq!(c & bit::ECX1_VMX, 0, "VMX hidden");
        assert_ne!(c & bit::ECX1_X2APIC, 0, "x2APIC emulated");
        assert_eq!((t.vcpu.regs.rbx >> 16) & 0xff, 1, "one logical processor");
        assert_eq!(t.vcpu.regs.rdx as u32 & bit::EDX1_HTT, 0);
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

    /// What Linux 6.1's `native_calibrate_tsc` computes from leaf 0x15, in its own 32-bit
    /// arithmetic: `crystal_khz * ebx_numerator / eax_denominator` (a product past 2^32 wraps).
    fn linux_tsc_khz(leaf15: [u32; 4]) -> u32 {
        let [den, num, crystal_hz, _] = leaf15;
        (crystal_hz / 1000).wrapping_mul(num) / den
    }

    fn at_tsc(tsc_hz: u64) -> GuestFeatures {
        GuestFeatures {
            tsc_hz,
            ..features(0)
        }
    }

    #[test]
    fn tsc_leaves_describe_the_guests_tsc_and_apic_timer() {
        let t = TestBed::new();
        // Leaf 0x15: the core crystal clock is the LAPIC timer's input clock (1 GHz), so Linux
        // takes its timer period from it without calibrating; the ratio gives the TSC.
        let l15 = policy(&t.host, 0x15, 0, &at_tsc(10_000_000));
        assert_eq!(l15, [100, 1, 1_000_000_000, 0]);
        assert_eq!(linux_tsc_khz(l15), 10_000);
        assert_eq!(
            policy(&t.host, 0x15, 0, &at_tsc(3_000_000_000)),
            [1, 3, 1_000_000_000, 0]
        );
        // A calibrated, odd rate: the best fraction whose numerator keeps Linux's 32-bit product
        // in range (crystal kHz * numerator < 2^32): within 1 ppm and Linux's whole kHz.
        for hz in [2_893_417_123u64, 1_999_999_999, 4_700_000_001, 123_456_789] {
            let l15 = policy(&t.host, 0x15, 0, &at_tsc(hz));
            assert!(u64::from(l15[1]) * 1_000_000 < 1 << 32, "{hz}: {l15:?}");
            let khz = u64::from(linux_tsc_khz(l15));
            assert!(
                (khz * 1000).abs_diff(hz) <= 1000 + hz / 1_000_000,
                "{hz}: {khz} kHz"
            );
        }
        // Leaf 0x16: base and maximum frequency in MHz, and the bus (LAPIC timer) clock.
        assert_eq!(
            policy(&t.host, 0x16, 0, &at_tsc(2_893_417_123)),
            [2893, 2893, 1000, 0]
        );
        // The hypervisor timing leaf: TSC and LAPIC timer in kHz.
        assert_eq!(
            policy(&t.host, 0x4000_0010, 0, &at_tsc(2_893_417_123)),
            [2_893_417, 1_000_000, 0, 0]
        );
        // No rate known: the leaves say so with zeros (Linux then calibrates).
        assert_eq!(policy(&t.host, 0x15, 0, &at_tsc(0)), [0; 4]);
    }

    #[test]
    fn max_leaves_cover_the_tsc_leaves() {
        let mut t = TestBed::new();
        // A CPU whose highest basic leaf is 0xD (Bochs' older models).
        t.host
            .leaves
            .push(((0, 0), [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]));
        let f = at_tsc(3_000_000_000);
        let l0 = policy(&t.host, 0, 0, &f);
        assert_eq!(l0, [0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]);
        // Leaves the CPU does not have up to the new maximum read as zeros; above it, as the
        // highest basic leaf (SDM Vol. 2A, CPUID: "If a value entered for CPUID.EAX is higher
        // than the maximum input value for basic or extended function...").
        assert_eq!(policy(&t.host, 0xe, 0, &f), [0; 4]);
        assert_eq!(policy(&t.host, 0x13, 0, &f), [0; 4]);
        assert_eq!(policy(&t.host, 0x17, 0, &f), policy(&t.host, 0x16, 0, &f));
        assert_eq!(policy(&t.host, 0x1f, 0, &f), policy(&t.host, 0x16, 0, &f));
        // A CPU with more basic leaves keeps its maximum.
        t.host.leaves[0].1[0] = 0x1f;
        assert_eq!(policy(&t.host, 0, 0, &f)[0], 0x1f);
        assert_eq!(policy(&t.host, 0x1f, 0, &f), [0, 1, 1 << 8, 0]);
        // Keel's hypervisor leaves end at the timing leaf.
        assert_eq!(policy(&t.host, 0x4000_0000, 0, &f)[0], 0x4000_0010);
        assert_eq!(policy(&t.host, 0x4000_0002, 0, &f), [0; 4]);
        assert_eq!(policy(&t.host, 0x4000_0011, 0, &f), [0; 4]);
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
            tsc_hz: 0,
            apic_id: 0,
            cpus: 1,
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
    #[test]
    fn the_table_answers_what_the_policy_does() {
        let t = TestBed::new();
        let mut table = CpuidTable::default();
        assert_eq!(table.get(0), None, "an empty table answers nothing");
        table.fill(&t.host, TEST_TSC_HZ, 2);
        // Whatever the guest's CR4, APIC and controls: the table's leaves depend on none of them.
        let states = [
            GuestFeatures::default(),
            GuestFeatures {
                cr4: u64::MAX,
                apic_enabled: true,
                primary: u32::MAX,
                secondary: u32::MAX,
                ..GuestFeatures::default()
            },
        ];
        let leaves = (0..0x30)
            .chain(0x4000_0000..0x4000_0020)
            .chain(0x8000_0000..0x8000_0010);
        let mut held = 0;
        for leaf in leaves {
            let Some(&r) = table.get(leaf) else { continue };
            held += 1;
            assert!(!depends_on_guest(leaf), "leaf {leaf:#x}");
            for f in states {
                let f = GuestFeatures {
                    tsc_hz: TEST_TSC_HZ,
                    cpus: 2,
                    apic_id: 1,
                    ..f
                };
                assert_eq!(r, policy(&t.host, leaf, 0, &f), "leaf {leaf:#x}");
            }
        }
        // 0, 2, 3, 5, 6, 9, 0xA, 0xF, 0x10, 0x12, 0x14, 0x15, 0x16; Keel's 17; 8 extended.
        assert_eq!(held, 13 + 17 + 8);
        for leaf in [1, 4, 7, 0xb, 0xd, 0x1f, 0x17, 0x8000_0001, 0x4000_0011] {
            assert_eq!(table.get(leaf), None, "leaf {leaf:#x} is not in the table");
        }
    }

    #[test]
    fn a_cpuid_exit_answers_from_the_table_and_the_policy() {
        use crate::vmx::ExitReason;
        let mut t = TestBed::new();
        t.set_instruction_length(2);
        // A CPU whose leaf 2 is recognisable: the guest gets it through the table.
        t.host.leaves.push(((2, 0), [0x11, 0x22, 0x33, 0x44]));
        t.vcpu.regs.rax = 2;
        assert_eq!(t.run(ExitReason::Cpuid), Action::Advance);
        assert!(t.vm.cpuid.filled(), "filled at the first CPUID exit");
        let r = &t.vcpu.regs;
        assert_eq!([r.rax, r.rbx, r.rcx, r.rdx], [0x11, 0x22, 0x33, 0x44]);
        // Leaf 1 follows the guest's CR4 (OSXSAVE), through the policy.
        t.vcpu.regs.rax = 1;
        t.vcpu.regs.rcx = 0;
        t.run(ExitReason::Cpuid);
        assert_eq!(t.vcpu.regs.rcx as u32 & bit::ECX1_OSXSAVE, 0);
        // The signature leaf, from the table: "KeelKeelKeel"-style text of `abi::SIGNATURE`.
        t.vcpu.regs.rax = abi::CPUID_SIGNATURE_LEAF as u64;
        t.run(ExitReason::Cpuid);
        assert_eq!(t.vcpu.regs.rax as u32, abi::CPUID_MAX_LEAF);
        assert_eq!(
            (t.vcpu.regs.rbx as u32).to_le_bytes(),
            [
                abi::SIGNATURE[0],
                abi::SIGNATURE[1],
                abi::SIGNATURE[2],
                abi::SIGNATURE[3]
            ]
        );
    }
}
