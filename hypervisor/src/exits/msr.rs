//! RDMSR/WRMSR. The MSR bitmap (SDM 24.6.9) lets the MSRs that VMX already switches, or that Keel
//! switches between guests, go straight to the CPU; every other access exits here and is emulated
//! from the table in [`policy`] or answered with #GP, as a CPU without that MSR would.

use super::{Action, Exception, ExitContext};
use crate::vmx::{Control64, Guest64, Vmcs};

pub mod index {
    pub const TSC: u32 = 0x10;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const APIC_BASE: u32 = 0x1b;
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const TSC_ADJUST: u32 = 0x3b;
    pub const SPEC_CTRL: u32 = 0x48;
    pub const PRED_CMD: u32 = 0x49;
    pub const FLUSH_CMD: u32 = 0x10b;
    pub const XSS: u32 = 0xda0;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const MTRR_CAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MCG_CAP: u32 = 0x179;
    pub const MCG_STATUS: u32 = 0x17a;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const DEBUGCTL: u32 = 0x1d9;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const VMX_FIRST: u32 = 0x480;
    pub const VMX_LAST: u32 = 0x493;
    pub const TSC_DEADLINE: u32 = 0x6e0;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// MSRs a guest reads and writes without an exit. The VMCS switches the SYSENTER MSRs and the
/// FS/GS bases (SDM 25.3/27.5); Keel saves and restores the SYSCALL MSRs, KERNEL_GS_BASE and
/// TSC_AUX when it switches guests (Keel itself never uses them).
pub const PASSTHROUGH: &[u32] = &[
    index::SYSENTER_CS,
    index::SYSENTER_ESP,
    index::SYSENTER_EIP,
    index::FS_BASE,
    index::GS_BASE,
    index::KERNEL_GS_BASE,
    index::STAR,
    index::LSTAR,
    index::CSTAR,
    index::SFMASK,
    index::TSC_AUX,
];

/// MSRs a guest reads without an exit but whose writes Keel handles. RDMSR of IA32_TSC already
/// includes the TSC offset (SDM 26.3).
pub const READ_PASSTHROUGH: &[u32] = &[index::TSC];

/// Write-only command MSRs the CPU carries out for the guest when it has them: IA32_PRED_CMD
/// (IBPB, CPUID.7.EDX[26]) and IA32_FLUSH_CMD (L1D flush, CPUID.7.EDX[28]). They hold no state to
/// switch, and the CPU refuses their reserved bits itself. Without the feature the writes exit
/// and are #GP (an emulator may implement the MSR without enumerating it: Bochs' skylake_x has
/// PRED_CMD but no IBPB bit). Reads always exit and are #GP: both are write-only.
pub const WRITE_PASSTHROUGH: &[(u32, u32)] = &[
    (index::PRED_CMD, super::cpuid::bit::EDX7_IBRS_IBPB),
    (index::FLUSH_CMD, super::cpuid::bit::EDX7_L1D_FLUSH),
];

/// Builds the 4 KiB MSR bitmap: read-low, read-high, write-low, write-high quarters; a set bit
/// means "exit" (SDM 24.6.9). `edx7` is the CPU's CPUID.7.EDX (the guest's, for these bits).
pub fn bitmap(edx7: u32) -> [u8; 4096] {
    let mut b = [0xffu8; 4096];
    let mut clear = |msr: u32, write: bool| {
        let (base, bit) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
            _ => return,
        };
        let base = base + if write { 2048 } else { 0 };
        b[base + (bit / 8) as usize] &= !(1 << (bit % 8));
    };
    for &m in PASSTHROUGH {
        clear(m, false);
        clear(m, true);
    }
    for &m in READ_PASSTHROUGH {
        clear(m, false);
    }
    for &(m, feature) in WRITE_PASSTHROUGH {
        if edx7 & feature != 0 {
            clear(m, true);
        }
    }
    b
}

pub use crate::devices::lapic::APIC_BASE_ENABLE;
use crate::devices::lapic::{APIC_BASE_BSP, X2APIC_MSRS};
/// IA32_MISC_ENABLE at reset as Keel offers it: fast strings (bit 0) on, BTS (11) and PEBS (12)
/// unavailable (read-only; CPUID hides DS). Only bit 0 may change: the other writable bits
/// (SpeedStep 16, MONITOR FSM 18, CPUID limit 22, xTPR 23, XD disable 34) belong to features
/// CPUID hides or that Keel does not apply, so changing one is #GP (SDM Vol. 4, Table 2-2).
pub const MISC_ENABLE_DEFAULT: u64 = 1 | 1 << 11 | 1 << 12;
const MISC_ENABLE_WRITABLE: u64 = 1;

pub const APIC_BASE_DEFAULT: u64 = 0xfee0_0000 | APIC_BASE_BSP | APIC_BASE_ENABLE;

fn valid_pat(v: u64) -> bool {
    // Each of the eight entries must be a defined memory type: 0, 1, 4, 5, 6 or 7 (SDM 13.12.2).
    (0..8).all(|i| matches!((v >> (i * 8)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
}

/// IA32_MTRR_DEF_TYPE: type (7:0) one of UC, WC, WT, WP, WB, FE (10), E (11); anything else is
/// #GP (SDM 13.11.2.1, 13.11.7.1).
fn valid_mtrr_def_type(v: u64) -> bool {
    v & !0xcff == 0 && matches!(v & 0xff, 0 | 1 | 4 | 5 | 6)
}

/// IA32_SPEC_CTRL bits the guest's CPUID.7.EDX enumerates: IBRS (bit 0) with IBRS/IBPB (26),
/// STIBP (1) with STIBP (27), SSBD (2) with SSBD (31). Intel's "Speculative Execution Side
/// Channel Mitigations": the MSR exists if any is set; every other bit is reserved (#GP).
pub fn spec_ctrl_bits(edx7: u32) -> u64 {
    use super::cpuid::bit::{EDX7_IBRS_IBPB, EDX7_SSBD, EDX7_STIBP};
    [(EDX7_IBRS_IBPB, 1), (EDX7_STIBP, 2), (EDX7_SSBD, 4)]
        .into_iter()
        .filter(|&(feature, _)| edx7 & feature != 0)
        .fold(0, |bits, (_, b)| bits | b)
}

/// IA32_EFER bits the guest's CPUID.80000001H:EDX allows: SCE with SYSCALL, LME and LMA with
/// LM, NXE with NX (SDM 2.2.1, Vol. 4 Table 2-2); the rest are reserved.
fn efer_bits(edx81: u32) -> u64 {
    use super::cpuid::bit::{EDX81_LM, EDX81_NX, EDX81_SYSCALL};
    use crate::vmx::cr::efer::{LMA, LME, NXE, SCE};
    [(EDX81_SYSCALL, SCE), (EDX81_LM, LME | LMA), (EDX81_NX, NXE)]
        .into_iter()
        .filter(|&(feature, _)| edx81 & feature != 0)
        .fold(0, |bits, (_, b)| bits | b)
}

/// IA32_TSC_DEADLINE in the guest's TSC (its own adjustments included) from the timer's deadline
/// in Keel's clock for it, and back. 0 means disarmed both ways; a deadline before the clock's
/// start is already due (1).
fn deadline_to_guest(platform: u64, adjust: u64) -> u64 {
    if platform == 0 {
        0
    } else {
        platform.wrapping_add(adjust)
    }
}

fn deadline_to_platform(guest: u64, adjust: u64) -> u64 {
    if guest == 0 {
        return 0;
    }
    let v = i128::from(guest) - i128::from(adjust as i64);
    v.clamp(1, i128::from(u64::MAX)) as u64
}

/// Sets IA32_TSC_ADJUST: the guest's TSC moves by the same amount (SDM 17.17.3), through the
/// VMCS TSC offset; Keel's clock for its devices (`Vm::tsc_offset`) does not. An armed
/// TSC-deadline timer keeps its deadline in the guest's TSC.
fn set_tsc_adjust<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    (g, vm): (&mut crate::guest::Vcpu, &mut crate::guest::Vm),
    v: u64,
    now: u64,
) {
    let deadline = deadline_to_guest(vm.platform.tsc_deadline(g.index), g.tsc_adjust);
    g.tsc_adjust = v;
    vmcs.write(Control64::TscOffset, g.vmcs_tsc_offset(vm.tsc_offset));
    if deadline != 0 {
        vm.platform
            .write_tsc_deadline(g.index, deadline_to_platform(deadline, v), now);
    }
}

/// WRMSR of IA32_TSC_DEADLINE as [`write`] makes it, when it fires nothing
/// (`Platform::move_tsc_deadline`): true, the timer moved or disarmed. False, with nothing
/// done, when the guest's CPUID does not advertise the timer (#GP, [`write`]'s to raise) or
/// the write fires it.
pub fn move_deadline<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> bool {
    if !super::cpuid::tsc_deadline(&*cx.vmcs, cx.vcpu, cx.vm, &*cx.host) {
        return false;
    }
    let g = &*cx.vcpu;
    let value = (g.regs.rdx << 32) | (g.regs.rax & 0xffff_ffff);
    let v = deadline_to_platform(value, g.tsc_adjust);
    cx.vm.platform.move_tsc_deadline(g.index, v, cx.now)
}

/// RDPMC: the guest has no performance counters (CPUID leaf 0xA is zero, PDCM hidden), so every
/// counter index is invalid: #GP(0) (SDM Vol. 2B, RDPMC). Without "RDPMC exiting" it would read
/// the CPU's own counters, which count for whatever ran before.
pub fn rdpmc<V: Vmcs + ?Sized>(_cx: &mut ExitContext<'_, V>) -> Action {
    Action::Inject(Exception::GP0)
}

/// IA32_DEBUGCTL.BTF (SDM 17.4.1): TF single-steps on branches.
const DEBUGCTL_BTF: u64 = 1 << 1;

pub fn read<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    use super::cpuid::{bit, has, tsc_deadline, LEAF7_EBX, LEAFD1_EAX};
    let msr = cx.vcpu.regs.rcx as u32;
    if X2APIC_MSRS.contains(&msr) {
        // The x2APIC's registers (`devices::lapic`: #GP outside x2APIC mode, for absent and
        // write-only registers).
        return match cx.vm.platform.x2apic_read(cx.vcpu.index, msr, cx.now) {
            Ok(value) => {
                let g = &mut *cx.vcpu;
                g.regs.rax = value & 0xffff_ffff;
                g.regs.rdx = value >> 32;
                Action::Advance
            }
            Err(_) => Action::Inject(Exception::GP0),
        };
    }
    let (vmcs, g, vm, host) = (&*cx.vmcs, &*cx.vcpu, &*cx.vm, &*cx.host);
    let value = match msr {
        index::FEATURE_CONTROL => 1, // locked, VMX off: what a CPU without VMX shows
        index::APIC_BASE => vm.platform.apic_base(g.index),
        index::EFER => vmcs.read(Guest64::Ia32Efer),
        index::PAT => vmcs.read(Guest64::Ia32Pat),
        index::DEBUGCTL => vmcs.read(Guest64::Ia32Debugctl),
        index::MISC_ENABLE => g.misc_enable,
        index::MTRR_CAP => 0,
        index::MTRR_DEF_TYPE => g.mtrr_def_type,
        index::PLATFORM_ID | index::BIOS_SIGN_ID | index::MCG_CAP | index::MCG_STATUS => 0,
        // From the guest's CPUID table: leaf 1 worked out afresh costs about 450 instructions.
        index::TSC_DEADLINE if tsc_deadline(vmcs, g, vm, host) => {
            deadline_to_guest(vm.platform.tsc_deadline(g.index), g.tsc_adjust)
        }
        index::TSC_ADJUST if has(vmcs, g, vm, host, LEAF7_EBX, bit::EBX7_TSC_ADJUST) => {
            g.tsc_adjust
        }
        index::SPEC_CTRL
            if spec_ctrl_bits(super::cpuid::of_guest(vmcs, g, vm, host, 7, 0)[3]) != 0 =>
        {
            g.spec_ctrl
        }
        // No supervisor state component is enabled (CPUID.(EAX=0DH,ECX=1):ECX/EDX are 0).
        index::XSS if has(vmcs, g, vm, host, LEAFD1_EAX, bit::EAXD1_XSAVES) => 0,
        _ => return Action::Inject(Exception::GP0),
    };
    let g = &mut *cx.vcpu;
    g.regs.rax = value & 0xffff_ffff;
    g.regs.rdx = value >> 32;
    Action::Advance
}

/// Whether a RDMSR of `msr` reads the local APIC (its x2APIC registers, the TPR and the PPR among
/// them): the model must have the guest's TPR from VTPR first.
pub fn reads_the_apic(msr: u32) -> bool {
    X2APIC_MSRS.contains(&msr)
}

/// Whether a WRMSR of `msr` can reach the guest's platform: the local APIC's MSRs (x2APIC
/// registers, IA32_APIC_BASE, IA32_TSC_DEADLINE) and the TSC ones, which move the clock the
/// device timers run on. After the others the run loop skips the platform.
pub fn write_reaches_platform(msr: u32) -> bool {
    X2APIC_MSRS.contains(&msr)
        || matches!(
            msr,
            index::APIC_BASE | index::TSC_DEADLINE | index::TSC | index::TSC_ADJUST
        )
}

pub fn write<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    use super::cpuid::{bit, has, of_guest, tsc_deadline, LEAF7_EBX, LEAFD1_EAX};
    use crate::vmx::cr::{cr0::PG, efer::LMA, efer::LME};
    let msr = cx.vcpu.regs.rcx as u32;
    let value = (cx.vcpu.regs.rdx << 32) | (cx.vcpu.regs.rax & 0xffff_ffff);
    if X2APIC_MSRS.contains(&msr) {
        // #GP outside x2APIC mode, for read-only and absent registers and reserved bits.
        return match cx
            .vm
            .platform
            .x2apic_write(cx.vcpu.index, msr, value, cx.now)
        {
            Ok(()) => Action::Advance,
            Err(_) => Action::Inject(Exception::GP0),
        };
    }
    let (vmcs, host) = (&mut *cx.vmcs, &*cx.host);
    let (g, vm) = (&mut *cx.vcpu, &mut *cx.vm);
    match msr {
        index::EFER => {
            if value & !efer_bits(of_guest(vmcs, g, vm, host, 0x8000_0001, 0)[3]) != 0 {
                return Action::Inject(Exception::GP0);
            }
            let old = vmcs.read(Guest64::Ia32Efer);
            // SDM 10.8.5 and WRMSR: changing LME while CR0.PG = 1 is #GP (otherwise the next
            // VM entry would fail its EFER/CR0 consistency checks, SDM 27.3.1.1).
            if (value ^ old) & LME != 0 && super::cr::live_cr0(vmcs, g) & PG != 0 {
                return Action::Inject(Exception::GP0);
            }
            // LMA is the CPU's to set (SDM 2.2.1): keep the current value.
            vmcs.write(Guest64::Ia32Efer, (value & !LMA) | (old & LMA));
        }
        index::PAT => {
            if !valid_pat(value) {
                return Action::Inject(Exception::GP0);
            }
            vmcs.write(Guest64::Ia32Pat, value);
        }
        index::APIC_BASE => {
            // The xAPIC page stays at its default place (a write that moves it is #GP: Keel
            // does not relocate it); bits 7:0 and 9 are reserved, BSP is read-only. EN and EXTD
            // change the mode by the rules of SDM 11.12.5 (`devices::lapic`), or #GP.
            if value & !0xfff != 0xfee0_0000 || value & 0x2ff != 0 {
                return Action::Inject(Exception::GP0);
            }
            if vm.platform.set_apic_base(g.index, value).is_err() {
                return Action::Inject(Exception::GP0);
            }
        }
        // SDM 17.4.1: of IA32_DEBUGCTL only BTF (single-step on branches) is offered: LBR, BTS
        // and the PMU freeze bits need MSRs Keel hides (CPUID DS, PDCM, leaf 0AH), and setting an
        // unsupported bit is #GP like a reserved one. The VMCS loads it while the guest runs
        // ("load debug controls", SDM 27.3.2.1).
        index::DEBUGCTL => {
            if value & !DEBUGCTL_BTF != 0 {
                return Action::Inject(Exception::GP0);
            }
            vmcs.write(Guest64::Ia32Debugctl, value);
        }
        index::MISC_ENABLE => {
            if (value ^ g.misc_enable) & !MISC_ENABLE_WRITABLE != 0 {
                return Action::Inject(Exception::GP0);
            }
            g.misc_enable = value
        }
        index::MTRR_DEF_TYPE => {
            if !valid_mtrr_def_type(value) {
                return Action::Inject(Exception::GP0);
            }
            g.mtrr_def_type = value
        }
        // From the guest's CPUID table: leaf 1 worked out afresh costs about 450 instructions.
        index::TSC_DEADLINE if tsc_deadline(vmcs, g, vm, host) => {
            let v = deadline_to_platform(value, g.tsc_adjust);
            vm.platform.write_tsc_deadline(g.index, v, cx.now)
        }
        index::TSC_ADJUST if has(vmcs, g, vm, host, LEAF7_EBX, bit::EBX7_TSC_ADJUST) => {
            set_tsc_adjust(vmcs, (g, vm), value, cx.now)
        }
        // SDM 17.17.3: a write of the TSC changes IA32_TSC_ADJUST by the same amount. The exit
        // happened at Keel's time `now` for the guest, where its TSC read now + TSC_ADJUST.
        index::TSC if has(vmcs, g, vm, host, LEAF7_EBX, bit::EBX7_TSC_ADJUST) => {
            set_tsc_adjust(vmcs, (g, vm), value.wrapping_sub(cx.now), cx.now)
        }
        // Without TSC offsetting the guest's TSC is the CPU's and cannot be moved.
        index::TSC | index::BIOS_SIGN_ID | index::MCG_STATUS => {}
        index::SPEC_CTRL => {
            let bits = spec_ctrl_bits(of_guest(vmcs, g, vm, host, 7, 0)[3]);
            if bits == 0 || value & !bits != 0 {
                return Action::Inject(Exception::GP0);
            }
            // Loaded into the real MSR before the guest runs again (`hypervisor`).
            g.spec_ctrl = value;
        }
        index::XSS if has(vmcs, g, vm, host, LEAFD1_EAX, bit::EAXD1_XSAVES) => {
            // SDM 13.3: bits not enumerated in CPUID.(EAX=0DH,ECX=1):EDX:ECX are #GP; Keel
            // enumerates none, so only 0 is accepted.
            if value != 0 {
                return Action::Inject(Exception::GP0);
            }
        }
        _ => return Action::Inject(Exception::GP0),
    }
    Action::Advance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;
    use crate::vmx::ExitReason;

    /// IA32_DEBUGCTL (SDM 17.4.1) exists on every Intel 64 CPU: Linux reads it unguarded. It
    /// lives in the VMCS (load/save debug controls); only BTF is offered, since Keel offers no
    /// LBR, BTS or PMU MSRs (the other bits #GP, as reserved bits do).
    #[test]
    fn debugctl_keeps_btf_and_refuses_what_keel_lacks() {
        let mut t = TestBed::new();
        assert_eq!(rd(&mut t, index::DEBUGCTL), Ok(0));
        assert_eq!(wr(&mut t, index::DEBUGCTL, 1 << 1), Action::Advance);
        assert_eq!(t.vmcs.read(Guest64::Ia32Debugctl), 1 << 1);
        assert_eq!(rd(&mut t, index::DEBUGCTL), Ok(1 << 1));
        for bad in [1u64, 1 << 6, 1 << 7, 1 << 14, 1 << 32] {
            assert_eq!(
                wr(&mut t, index::DEBUGCTL, bad | 1 << 1),
                Action::Inject(Exception::GP0),
                "DEBUGCTL {bad:#x}"
            );
        }
        assert_eq!(
            rd(&mut t, index::DEBUGCTL),
            Ok(1 << 1),
            "a refused write changes nothing"
        );
    }

    fn rd(t: &mut TestBed, msr: u32) -> Result<u64, Action> {
        t.vcpu.regs.rcx = msr as u64;
        match t.run(ExitReason::Rdmsr) {
            Action::Advance => Ok(t.vcpu.regs.rdx << 32 | t.vcpu.regs.rax),
            other => Err(other),
        }
    }

    fn wr(t: &mut TestBed, msr: u32, v: u64) -> Action {
        t.vcpu.regs.rcx = msr as u64;
        t.vcpu.regs.rax = v & 0xffff_ffff;
        t.vcpu.regs.rdx = v >> 32;
        t.run(ExitReason::Wrmsr)
    }

    #[test]
    fn vmx_msrs_and_unknown_ones_fault() {
        let mut t = TestBed::new();
        let gp = Err(Action::Inject(Exception::GP0));
        assert_eq!(
            rd(&mut t, index::FEATURE_CONTROL),
            Ok(1),
            "locked with VMX off"
        );
        assert_eq!(
            wr(&mut t, index::FEATURE_CONTROL, 5),
            Action::Inject(Exception::GP0)
        );
        for m in index::VMX_FIRST..=index::VMX_LAST {
            assert_eq!(rd(&mut t, m), gp);
        }
        assert_eq!(rd(&mut t, 0x1234_5678), gp);
        assert_eq!(wr(&mut t, 0xdead, 0), Action::Inject(Exception::GP0));
    }

    #[test]
    fn efer_and_pat_are_validated() {
        let mut t = TestBed::new();
        assert_eq!(
            wr(&mut t, index::EFER, 1 << 20),
            Action::Inject(Exception::GP0),
            "reserved EFER bit"
        );
        assert_eq!(wr(&mut t, index::EFER, 1 << 11 | 1), Action::Advance);
        assert_eq!(rd(&mut t, index::EFER), Ok(1 << 11 | 1));
        assert_eq!(
            wr(&mut t, index::PAT, 0x0007_0406_0007_0406),
            Action::Advance
        );
        assert_eq!(
            wr(&mut t, index::PAT, 0x0007_0406_0007_0402),
            Action::Inject(Exception::GP0)
        );
        assert_eq!(rd(&mut t, index::APIC_BASE), Ok(APIC_BASE_DEFAULT));
        // EXTD without EN is the invalid state of SDM Table 11-5.
        assert_eq!(
            wr(
                &mut t,
                index::APIC_BASE,
                0xfee0_0000 | APIC_BASE_BSP | 1 << 10
            ),
            Action::Inject(Exception::GP0)
        );
    }

    #[test]
    fn x2apic_mode_through_wrmsr_and_its_msrs() {
        let mut t = TestBed::new();
        let x2apic = APIC_BASE_DEFAULT | 1 << 10;
        // CPUID offers x2APIC (SDM 11.12.1: CPUID.1:ECX[21]) with APIC ID 0 in leaf 1 and 0BH.
        assert_ne!(cpuid(&mut t, 1, 0)[2] & 1 << 21, 0);
        assert_eq!(cpuid(&mut t, 1, 0)[1] >> 24, 0);
        assert_eq!(cpuid(&mut t, 0xb, 0)[3], 0);
        // xAPIC mode: the MSRs are #GP.
        assert_eq!(rd(&mut t, 0x803), Err(GP));
        assert_eq!(wr(&mut t, index::APIC_BASE, x2apic), Action::Advance);
        assert_eq!(rd(&mut t, index::APIC_BASE), Ok(x2apic));
        assert_eq!(rd(&mut t, 0x803), Ok(0x50014));
        assert_eq!(rd(&mut t, 0x802), Ok(0));
        // x2APIC -> xAPIC directly is #GP; through disabled it works.
        assert_eq!(wr(&mut t, index::APIC_BASE, APIC_BASE_DEFAULT), GP);
        assert_eq!(rd(&mut t, index::APIC_BASE), Ok(x2apic));
        // SVR on, TPR, self IPI through ICR and SELF IPI; EOI with a non-zero value is #GP.
        assert_eq!(wr(&mut t, 0x80f, 0x1ff), Action::Advance);
        assert_eq!(wr(&mut t, 0x83f, 0x61), Action::Advance);
        assert_eq!(t.vm.platform.pending_interrupt(0), Some(0x61));
        t.vm.platform.acknowledge(0, 0x61);
        assert_eq!(wr(&mut t, 0x80b, 1), GP);
        assert_eq!(wr(&mut t, 0x80b, 0), Action::Advance);
        assert_eq!(rd(&mut t, 0x80b), Err(GP), "EOI is write-only");
        assert_eq!(wr(&mut t, 0x830, 0x62), Action::Advance);
        assert_eq!(t.vm.platform.pending_interrupt(0), Some(0x62));
        assert_eq!(rd(&mut t, 0x830), Ok(0x62));
        assert_eq!(wr(&mut t, 0x808, 1 << 32), GP, "reserved upper half");
        assert_eq!(rd(&mut t, 0x80e), Err(GP), "no DFR");
        // The xAPIC page does not answer as an APIC in x2APIC mode.
        assert_eq!(
            t.vm.platform.mmio_read(0, 0xfee0_0030, 4, 0),
            Some(0xffff_ffff)
        );
        assert_eq!(wr(&mut t, index::APIC_BASE, 0xfee0_0100), Action::Advance);
        assert_eq!(rd(&mut t, 0x803), Err(GP));
        assert_eq!(
            wr(&mut t, index::APIC_BASE, APIC_BASE_DEFAULT),
            Action::Advance
        );
        assert_eq!(t.vm.platform.mmio_read(0, 0xfee0_0030, 4, 0), Some(0x50014));
    }

    fn exits_in(b: &[u8; 4096], msr: u32, write: bool) -> bool {
        let (base, bit) = if msr < 0x2000 {
            (0, msr)
        } else {
            (1024, msr - 0xc000_0000)
        };
        let base = base + if write { 2048 } else { 0 };
        b[base + (bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    #[test]
    fn bitmap_passes_only_the_listed_msrs() {
        let b = bitmap(0);
        let exits = |msr: u32, write: bool| exits_in(&b, msr, write);
        assert!(!exits(index::LSTAR, false) && !exits(index::LSTAR, true));
        assert!(!exits(index::TSC, false) && exits(index::TSC, true));
        assert!(exits(index::EFER, true) && exits(index::FEATURE_CONTROL, false));
        assert!(exits(index::VMX_FIRST, false));
    }

    use crate::vmx::controls::{PrimaryControls, SecondaryControls};
    use crate::vmx::cr::{cr0, efer};
    use crate::vmx::{Control32, Control64, GuestNat};

    const GP: Action = Action::Inject(Exception::GP0);

    fn cpuid(t: &mut TestBed, leaf: u32, subleaf: u32) -> [u32; 4] {
        t.vcpu.regs.rax = leaf.into();
        t.vcpu.regs.rcx = subleaf.into();
        assert_eq!(t.run(ExitReason::Cpuid), Action::Advance);
        let r = t.vcpu.regs;
        [r.rax, r.rbx, r.rcx, r.rdx].map(|v| v as u32)
    }

    /// The execution controls Keel asks for when the CPU has them.
    fn with_controls(t: &mut TestBed) {
        t.vmcs.write(
            Control32::PrimaryProcBasedControls,
            PrimaryControls::USE_TSC_OFFSETTING.bits(),
        );
        t.vmcs.write(
            Control32::SecondaryProcBasedControls,
            (SecondaryControls::ENABLE_RDTSCP
                | SecondaryControls::ENABLE_INVPCID
                | SecondaryControls::ENABLE_XSAVES)
                .bits(),
        );
    }

    #[test]
    fn tsc_adjust_and_tsc_writes_move_each_other() {
        let mut t = TestBed::new();
        with_controls(&mut t);
        assert_ne!(cpuid(&mut t, 7, 0)[1] & 2, 0, "TSC_ADJUST advertised");
        t.vm.tsc_offset = 0x1_0000;
        assert_eq!(rd(&mut t, 0x3b), Ok(0));
        // SDM 17.17.3: a write of IA32_TSC_ADJUST adds the difference to the TSC...
        assert_eq!(wr(&mut t, 0x3b, 1000), Action::Advance);
        assert_eq!(rd(&mut t, 0x3b), Ok(1000));
        assert_eq!(t.vmcs.read(Control64::TscOffset), 0x1_0000 + 1000);
        // ... and a write of IA32_TSC adds its change to IA32_TSC_ADJUST. The exit happened at
        // the guest's time 0 (Keel's clock), where its TSC read 1000.
        assert_eq!(wr(&mut t, index::TSC, 5000), Action::Advance);
        assert_eq!(rd(&mut t, 0x3b), Ok(5000));
        assert_eq!(t.vmcs.read(Control64::TscOffset), 0x1_0000 + 5000);
        // Keel's device clock is not moved: the platform still runs on the guest's own time.
        assert_eq!(t.vm.tsc_offset, 0x1_0000);
        // IA32_TSC_DEADLINE is in the guest's TSC, the timer in Keel's clock.
        let lapic = 0xfee0_0000;
        t.vm.platform.mmio_write(0, lapic + 0xf0, 4, 0x1ff, 0);
        t.vm.platform
            .mmio_write(0, lapic + 0x320, 4, 2 << 17 | 0x30, 0);
        assert_eq!(wr(&mut t, index::TSC_DEADLINE, 9000), Action::Advance);
        assert_eq!(t.vm.platform.tsc_deadline(0), 4000);
        assert_eq!(rd(&mut t, index::TSC_DEADLINE), Ok(9000));
        // Moving the TSC keeps the deadline where the guest put it, in its TSC.
        assert_eq!(wr(&mut t, 0x3b, 6000), Action::Advance);
        assert_eq!(rd(&mut t, index::TSC_DEADLINE), Ok(9000));
        assert_eq!(t.vm.platform.tsc_deadline(0), 3000);
    }

    #[test]
    fn spec_ctrl_keeps_what_cpuid_advertises() {
        let mut t = TestBed::new();
        assert_eq!(rd(&mut t, index::SPEC_CTRL), Ok(0));
        // IBRS, STIBP, SSBD (CPUID.7.EDX bits 26, 27, 31).
        for v in [1, 2, 4, 7, 0] {
            assert_eq!(wr(&mut t, index::SPEC_CTRL, v), Action::Advance);
            assert_eq!(rd(&mut t, index::SPEC_CTRL), Ok(v));
        }
        for bad in [1 << 3, 1 << 7, 1 << 10, 1 << 32, 1 << 63] {
            assert_eq!(wr(&mut t, index::SPEC_CTRL, bad), GP, "{bad:#x}");
        }
        // Only STIBP on this CPU: IBRS and SSBD are reserved.
        let mut t = TestBed::new();
        t.host.leaves.push(((7, 0), [0, 0, 0, 1 << 27]));
        assert_eq!(wr(&mut t, index::SPEC_CTRL, 2), Action::Advance);
        assert_eq!(wr(&mut t, index::SPEC_CTRL, 1), GP);
        assert_eq!(wr(&mut t, index::SPEC_CTRL, 4), GP);
        // None of them: no MSR.
        let mut t = TestBed::new();
        t.host.leaves.push(((7, 0), [0; 4]));
        assert_eq!(rd(&mut t, index::SPEC_CTRL), Err(GP));
        assert_eq!(wr(&mut t, index::SPEC_CTRL, 0), GP);
    }

    #[test]
    fn pred_cmd_and_flush_cmd_are_write_only_commands_for_the_cpu() {
        // The CPU executes IBPB and the L1D flush itself and refuses reserved bits itself (or
        // the whole MSR when it lacks the feature, which the guest's CPUID then hides too).
        let b = bitmap(u32::MAX);
        assert!(!exits_in(&b, index::PRED_CMD, true));
        assert!(!exits_in(&b, index::FLUSH_CMD, true));
        let mut t = TestBed::new();
        assert_eq!(rd(&mut t, index::PRED_CMD), Err(GP), "write-only");
        assert_eq!(rd(&mut t, index::FLUSH_CMD), Err(GP), "write-only");
        // A CPU that does not enumerate them: the writes exit and are #GP.
        let b = bitmap(1 << 26);
        assert!(!exits_in(&b, index::PRED_CMD, true));
        assert!(exits_in(&b, index::FLUSH_CMD, true));
        assert_eq!(wr(&mut t, index::FLUSH_CMD, 1), GP);
        assert_eq!(wr(&mut t, index::PRED_CMD, 1), GP);
    }

    #[test]
    fn efer_lme_cannot_change_while_paging_is_on() {
        let mut t = TestBed::new();
        t.vmcs
            .write(GuestNat::Cr0, cr0::PG | cr0::PE | cr0::NE | cr0::ET);
        t.vmcs
            .write(Guest64::Ia32Efer, efer::LME | efer::LMA | efer::SCE);
        // SDM 10.8.5 / WRMSR: LME changes with CR0.PG = 1 are #GP.
        assert_eq!(wr(&mut t, index::EFER, efer::LMA | efer::SCE), GP);
        assert_eq!(
            t.vmcs.read(Guest64::Ia32Efer),
            efer::LME | efer::LMA | efer::SCE
        );
        // LMA is the processor's: a write that leaves it out keeps it.
        assert_eq!(
            wr(&mut t, index::EFER, efer::LME | efer::NXE),
            Action::Advance
        );
        assert_eq!(
            rd(&mut t, index::EFER),
            Ok(efer::LME | efer::LMA | efer::NXE)
        );
        // Paging off: LME may change.
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, cr0::PE | cr0::NE | cr0::ET);
        assert_eq!(wr(&mut t, index::EFER, efer::LME), Action::Advance);
        assert_eq!(wr(&mut t, index::EFER, 0), Action::Advance);
        // 32-bit paging on, LME off: setting it is refused too.
        t.vmcs
            .write(GuestNat::Cr0, cr0::PG | cr0::PE | cr0::NE | cr0::ET);
        assert_eq!(wr(&mut t, index::EFER, efer::LME), GP);
    }

    #[test]
    fn efer_bits_need_their_cpuid_feature() {
        // CPUID.80000001H:EDX: SYSCALL (11) for SCE, NX (20) for NXE, LM (29) for LME.
        let mut t = TestBed::new();
        t.host.leaves.push(((0x8000_0001, 0), [0, 0, 0, 1 << 29]));
        assert_eq!(wr(&mut t, index::EFER, efer::NXE), GP);
        assert_eq!(wr(&mut t, index::EFER, efer::SCE), GP);
        assert_eq!(wr(&mut t, index::EFER, efer::LME), Action::Advance);
        t.host.leaves[0].1[3] = 1 << 20 | 1 << 11;
        assert_eq!(wr(&mut t, index::EFER, efer::LME), GP);
        assert_eq!(
            wr(&mut t, index::EFER, efer::NXE | efer::SCE),
            Action::Advance
        );
    }

    #[test]
    fn ia32_xss_holds_no_supervisor_state() {
        let mut t = TestBed::new();
        with_controls(&mut t);
        let d1 = cpuid(&mut t, 0xd, 1);
        assert_ne!(d1[0] & 1 << 3, 0, "XSAVES advertised");
        assert_eq!((d1[2], d1[3]), (0, 0), "no IA32_XSS bits supported");
        assert_eq!(cpuid(&mut t, 0xd, 8), [0; 4], "no PT state component");
        assert_eq!(rd(&mut t, index::XSS), Ok(0));
        assert_eq!(wr(&mut t, index::XSS, 0), Action::Advance);
        for bad in [1 << 8, 1 << 11, 1 << 0, 1 << 63] {
            assert_eq!(wr(&mut t, index::XSS, bad), GP, "{bad:#x}");
        }
        // Without the "enable XSAVES/XRSTORS" control XSAVES is #UD in the guest (SDM 26.3).
        let mut t = TestBed::new();
        assert_eq!(cpuid(&mut t, 0xd, 1)[0] & 1 << 3, 0);
        assert_eq!(rd(&mut t, index::XSS), Err(GP));
    }

    #[test]
    fn clearing_apic_base_enable_removes_the_apic() {
        let mut t = TestBed::new();
        let apic = |t: &mut TestBed| cpuid(t, 1, 0)[3] & 1 << 9 != 0;
        assert!(apic(&mut t));
        assert_eq!(wr(&mut t, index::APIC_BASE, 0xfee0_0100), Action::Advance);
        assert_eq!(rd(&mut t, index::APIC_BASE), Ok(0xfee0_0100));
        assert!(!apic(&mut t), "CPUID.1:EDX.APIC follows IA32_APIC_BASE.EN");
        assert_eq!(
            t.vm.platform.mmio_read(0, 0xfee0_0030, 4, 0),
            Some(0xffff_ffff),
            "no APIC version register"
        );
        assert_eq!(
            wr(&mut t, index::APIC_BASE, APIC_BASE_DEFAULT),
            Action::Advance
        );
        assert!(apic(&mut t));
        assert_eq!(t.vm.platform.mmio_read(0, 0xfee0_0030, 4, 0), Some(0x50014));
    }

    #[test]
    fn the_tsc_deadline_msr_follows_the_cpu_before_and_after_the_guest_asks_cpuid() {
        // The guest's CPUID table keeps the bit from its first CPUID exit on; before it, a guest
        // that never ran CPUID sees what CPUID would tell it all the same.
        let with = |ecx: u32| {
            let mut t = TestBed::new();
            t.host
                .leaves
                .push(((1, 0), [0x50654, 0x800, ecx, 0xbfeb_fbff]));
            let (r, w) = (
                rd(&mut t, index::TSC_DEADLINE),
                wr(&mut t, index::TSC_DEADLINE, 5),
            );
            let told = cpuid(&mut t, 1, 0)[2] & (1 << 24) != 0;
            let after = rd(&mut t, index::TSC_DEADLINE).is_ok();
            let written = wr(&mut t, index::TSC_DEADLINE, 5) == Action::Advance;
            (r.is_ok(), w == Action::Advance, told, after, written)
        };
        assert_eq!(with(1 << 24), (true, true, true, true, true));
        assert_eq!(with(!(1 << 24)), (false, false, false, false, false));
    }

    /// A CPUID feature and the MSRs it implies: (name, leaf, subleaf, register, bits, MSRs,
    /// whether they take writes). Every MSR here must answer exactly when the guest's CPUID
    /// advertises the feature.
    type Feature = (&'static str, u32, u32, usize, u32, &'static [u32], bool);
    const FEATURE_MSRS: &[Feature] = &[
        ("TSC_ADJUST", 7, 0, 1, 1 << 1, &[0x3b], true),
        ("IBRS/IBPB", 7, 0, 3, 1 << 26, &[0x48], true),
        ("XSAVES", 0xd, 1, 0, 1 << 3, &[0xda0], true),
        ("TSC-deadline", 1, 0, 2, 1 << 24, &[0x6e0], true),
        ("APIC", 1, 0, 3, 1 << 9, &[0x1b], true),
        ("PAT", 1, 0, 3, 1 << 16, &[0x277], true),
        ("MTRR", 1, 0, 3, 1 << 12, &[0x2ff], true),
        ("MTRR cap", 1, 0, 3, 1 << 12, &[0xfe], false),
        ("MCA", 1, 0, 3, 1 << 14, &[0x179], false),
        ("PDCM", 1, 0, 2, 1 << 15, &[0x345], true),
        ("DS", 1, 0, 3, 1 << 21, &[0x600], true),
        ("EIST", 1, 0, 2, 1 << 7, &[0x198, 0x199], true),
        ("ACPI", 1, 0, 3, 1 << 22, &[0x19a, 0x19b, 0x19c], true),
        ("SDBG", 1, 0, 2, 1 << 11, &[0xc80], true),
        ("DCA", 1, 0, 2, 1 << 18, &[0x1f8, 0x1f9], true),
        (
            "PMU",
            0xa,
            0,
            0,
            0xff,
            &[0xc1, 0x186, 0x309, 0x38d, 0x38f],
            true,
        ),
        ("RDT-M", 7, 0, 1, 1 << 12, &[0xc8d, 0xc8e, 0xc8f], true),
        ("MPX", 7, 0, 1, 1 << 14, &[0xd90], true),
        ("RDT-A", 7, 0, 1, 1 << 15, &[0xc8f, 0xc90], true),
        ("PT", 7, 0, 1, 1 << 25, &[0x560, 0x570, 0x571], true),
        ("WAITPKG", 7, 0, 2, 1 << 5, &[0xe1], true),
        ("CET_SS", 7, 0, 2, 1 << 7, &[0x6a0, 0x6a2, 0x6a4], true),
        ("TME", 7, 0, 2, 1 << 13, &[0x981, 0x982], true),
        ("ENQCMD", 7, 0, 2, 1 << 29, &[0xd93], true),
        ("SGX_LC", 7, 0, 2, 1 << 30, &[0x8c], true),
        ("PKS", 7, 0, 2, 1 << 31, &[0x6e1], true),
        ("SRBDS_CTRL", 7, 0, 3, 1 << 9, &[0x123], true),
        ("TSX_FORCE_ABORT", 7, 0, 3, 1 << 13, &[0x10f], true),
        ("arch LBR", 7, 0, 3, 1 << 19, &[0x14ce], true),
        ("CET_IBT", 7, 0, 3, 1 << 20, &[0x6a0, 0x6a2], true),
        ("ARCH_CAPABILITIES", 7, 0, 3, 1 << 29, &[0x10a], false),
        ("CORE_CAPABILITIES", 7, 0, 3, 1 << 30, &[0xcf], false),
        ("HRESET", 7, 1, 0, 1 << 22, &[0x17da], true),
        ("XFD", 0xd, 1, 0, 1 << 4, &[0x1c4, 0x1c5], true),
    ];

    /// Checks every row on one CPU; returns how many features the guest was offered.
    fn cpuid_and_msrs_agree(t: &mut TestBed) -> usize {
        let mut offered = 0;
        for &(name, leaf, subleaf, reg, bits, msrs, writable) in FEATURE_MSRS {
            let advertised = cpuid(t, leaf, subleaf)[reg] & bits != 0;
            offered += usize::from(advertised);
            for &msr in msrs {
                let got = rd(t, msr);
                assert_eq!(got.is_ok(), advertised, "{name}: RDMSR {msr:#x} -> {got:?}");
                if let Ok(v) = got {
                    let want = if writable { Action::Advance } else { GP };
                    assert_eq!(wr(t, msr, v), want, "{name}: WRMSR {msr:#x} of {v:#x}");
                } else {
                    assert_eq!(wr(t, msr, 0), GP, "{name}: WRMSR {msr:#x}");
                }
            }
        }
        offered
    }

    #[test]
    fn every_msr_a_cpuid_feature_implies_answers_exactly_when_advertised() {
        // A CPU with every feature, Keel's controls available: only what Keel implements stays.
        let mut t = TestBed::new();
        with_controls(&mut t);
        assert_eq!(cpuid_and_msrs_agree(&mut t), 9);
        // The same CPU without TSC offsetting or the XSAVES control: those two go.
        let mut t = TestBed::new();
        assert_eq!(cpuid_and_msrs_agree(&mut t), 7);
        // A CPU without leaf-7 and XSAVE features.
        let mut t = TestBed::new();
        with_controls(&mut t);
        t.host.leaves.push(((7, 0), [0; 4]));
        t.host.leaves.push(((0xd, 1), [0; 4]));
        assert_eq!(cpuid_and_msrs_agree(&mut t), 6);
    }

    #[test]
    fn instructions_keel_cannot_run_for_the_guest_are_hidden() {
        // Without "enable RDTSCP"/"enable INVPCID" those instructions are #UD (SDM 26.3): the
        // guest must not see RDTSCP, RDPID or INVPCID.
        let mut t = TestBed::new();
        assert_eq!(cpuid(&mut t, 0x8000_0001, 0)[3] & 1 << 27, 0, "RDTSCP");
        assert_eq!(cpuid(&mut t, 7, 0)[2] & 1 << 22, 0, "RDPID");
        assert_eq!(cpuid(&mut t, 7, 0)[1] & 1 << 10, 0, "INVPCID");
        with_controls(&mut t);
        assert_ne!(cpuid(&mut t, 0x8000_0001, 0)[3] & 1 << 27, 0, "RDTSCP");
        assert_ne!(cpuid(&mut t, 7, 0)[2] & 1 << 22, 0, "RDPID");
        assert_ne!(cpuid(&mut t, 7, 0)[1] & 1 << 10, 0, "INVPCID");
        // TSC_AUX then goes straight to the CPU (and is switched between guests).
        assert!(PASSTHROUGH.contains(&index::TSC_AUX));
    }

    #[test]
    fn rdpmc_is_gp_without_a_pmu() {
        let mut t = TestBed::new();
        assert_eq!(cpuid(&mut t, 0xa, 0), [0; 4]);
        t.vcpu.regs.rcx = 0;
        assert_eq!(t.run(ExitReason::Rdpmc), GP);
        t.vcpu.regs.rcx = 1 << 30; // fixed-function counter 0
        assert_eq!(t.run(ExitReason::Rdpmc), GP);
    }

    #[test]
    fn misc_enable_agrees_with_cpuid() {
        let mut t = TestBed::new();
        // Fast strings on; BTS (11) and PEBS (12) unavailable, as CPUID hides DS; no SpeedStep
        // (16), MONITOR FSM (18) or CPUID limit (22): CPUID hides those features or ignores them.
        assert_eq!(rd(&mut t, index::MISC_ENABLE), Ok(0x1801));
        assert_eq!(wr(&mut t, index::MISC_ENABLE, 0x1800), Action::Advance);
        assert_eq!(rd(&mut t, index::MISC_ENABLE), Ok(0x1800));
        for bit in [11, 12, 16, 18, 22, 23, 24, 34] {
            assert_eq!(
                wr(&mut t, index::MISC_ENABLE, 0x1801 ^ 1 << bit),
                GP,
                "bit {bit}"
            );
        }
        assert_eq!(rd(&mut t, index::MISC_ENABLE), Ok(0x1800));
    }

    #[test]
    fn mtrr_def_type_and_apic_base_refuse_what_no_cpu_takes() {
        let mut t = TestBed::new();
        // SDM 13.11.2.1: memory types 2, 3 and 7 are reserved in an MTRR.
        for ty in [2, 3, 7, 8] {
            assert_eq!(
                wr(&mut t, index::MTRR_DEF_TYPE, 1 << 11 | ty),
                GP,
                "type {ty}"
            );
        }
        assert_eq!(
            wr(&mut t, index::MTRR_DEF_TYPE, 1 << 11 | 6),
            Action::Advance
        );
        assert_eq!(rd(&mut t, index::MTRR_DEF_TYPE), Ok(0x806));
        // The xAPIC page stays at 0xFEE00000: no base bit above bit 35 either.
        assert_eq!(
            wr(&mut t, index::APIC_BASE, APIC_BASE_DEFAULT | 1 << 40),
            GP
        );
        assert_eq!(rd(&mut t, index::APIC_BASE), Ok(APIC_BASE_DEFAULT));
    }
}
