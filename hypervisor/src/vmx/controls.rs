//! The VM-execution, VM-exit and VM-entry controls (SDM 25.6.1-25.6.2, 25.7.1, 25.8.1) and the
//! computation of the values to write from what Keel needs and what the processor allows
//! (SDM Appendix A.3-A.5).
//!
//! Section numbers follow the SDM editions from 2023 on (Vol. 3C chapters 24-31); older editions
//! number the same chapters one lower.

use super::caps::VmxCaps;
use bitflags::{bitflags, Flags};
use core::fmt;

bitflags! {
    /// Pin-based VM-execution controls (SDM 25.6.1, Table 25-5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PinBasedControls: u32 {
        const EXTERNAL_INTERRUPT_EXITING = 1 << 0;
        const NMI_EXITING = 1 << 3;
        const VIRTUAL_NMIS = 1 << 5;
        const ACTIVATE_PREEMPTION_TIMER = 1 << 6;
        const PROCESS_POSTED_INTERRUPTS = 1 << 7;
        const _ = !0;
    }
}

bitflags! {
    /// Primary processor-based VM-execution controls (SDM 25.6.2, Table 25-6).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PrimaryControls: u32 {
        const INTERRUPT_WINDOW_EXITING = 1 << 2;
        const USE_TSC_OFFSETTING = 1 << 3;
        const HLT_EXITING = 1 << 7;
        const INVLPG_EXITING = 1 << 9;
        const MWAIT_EXITING = 1 << 10;
        const RDPMC_EXITING = 1 << 11;
        const RDTSC_EXITING = 1 << 12;
        const CR3_LOAD_EXITING = 1 << 15;
        const CR3_STORE_EXITING = 1 << 16;
        const ACTIVATE_TERTIARY_CONTROLS = 1 << 17;
        const CR8_LOAD_EXITING = 1 << 19;
        const CR8_STORE_EXITING = 1 << 20;
        const USE_TPR_SHADOW = 1 << 21;
        const NMI_WINDOW_EXITING = 1 << 22;
        const MOV_DR_EXITING = 1 << 23;
        const UNCONDITIONAL_IO_EXITING = 1 << 24;
        const USE_IO_BITMAPS = 1 << 25;
        const MONITOR_TRAP_FLAG = 1 << 27;
        const USE_MSR_BITMAPS = 1 << 28;
        const MONITOR_EXITING = 1 << 29;
        const PAUSE_EXITING = 1 << 30;
        const ACTIVATE_SECONDARY_CONTROLS = 1 << 31;
        const _ = !0;
    }
}

bitflags! {
    /// Secondary processor-based VM-execution controls (SDM 25.6.2, Table 25-7).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SecondaryControls: u32 {
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        const ENABLE_EPT = 1 << 1;
        const DESCRIPTOR_TABLE_EXITING = 1 << 2;
        const ENABLE_RDTSCP = 1 << 3;
        const VIRTUALIZE_X2APIC_MODE = 1 << 4;
        const ENABLE_VPID = 1 << 5;
        const WBINVD_EXITING = 1 << 6;
        const UNRESTRICTED_GUEST = 1 << 7;
        const APIC_REGISTER_VIRTUALIZATION = 1 << 8;
        const VIRTUAL_INTERRUPT_DELIVERY = 1 << 9;
        const PAUSE_LOOP_EXITING = 1 << 10;
        const RDRAND_EXITING = 1 << 11;
        const ENABLE_INVPCID = 1 << 12;
        const ENABLE_VM_FUNCTIONS = 1 << 13;
        const VMCS_SHADOWING = 1 << 14;
        const ENABLE_ENCLS_EXITING = 1 << 15;
        const RDSEED_EXITING = 1 << 16;
        const ENABLE_PML = 1 << 17;
        const EPT_VIOLATION_VE = 1 << 18;
        const CONCEAL_VMX_FROM_PT = 1 << 19;
        const ENABLE_XSAVES = 1 << 20;
        const MODE_BASED_EXECUTE_CONTROL = 1 << 22;
        const SUB_PAGE_WRITE_PERMISSIONS = 1 << 23;
        const PT_USES_GUEST_PHYSICAL_ADDRESSES = 1 << 24;
        const USE_TSC_SCALING = 1 << 25;
        const ENABLE_USER_WAIT_AND_PAUSE = 1 << 26;
        const ENABLE_PCONFIG = 1 << 27;
        const ENABLE_ENCLV_EXITING = 1 << 28;
        const _ = !0;
    }
}

bitflags! {
    /// Primary VM-exit controls (SDM 25.7.1, Table 25-13).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ExitControls: u32 {
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        const HOST_ADDRESS_SPACE_SIZE = 1 << 9;
        const LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 12;
        const ACK_INTERRUPT_ON_EXIT = 1 << 15;
        const SAVE_IA32_PAT = 1 << 18;
        const LOAD_IA32_PAT = 1 << 19;
        const SAVE_IA32_EFER = 1 << 20;
        const LOAD_IA32_EFER = 1 << 21;
        const SAVE_PREEMPTION_TIMER = 1 << 22;
        const CLEAR_IA32_BNDCFGS = 1 << 23;
        const CONCEAL_VMX_FROM_PT = 1 << 24;
        const CLEAR_IA32_RTIT_CTL = 1 << 25;
        const CLEAR_IA32_LBR_CTL = 1 << 26;
        const LOAD_CET_STATE = 1 << 28;
        const LOAD_PKRS = 1 << 29;
        const _ = !0;
    }
}

bitflags! {
    /// VM-entry controls (SDM 25.8.1, Table 25-15).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EntryControls: u32 {
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        const IA32E_MODE_GUEST = 1 << 9;
        const ENTRY_TO_SMM = 1 << 10;
        const DEACTIVATE_DUAL_MONITOR_TREATMENT = 1 << 11;
        const LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13;
        const LOAD_IA32_PAT = 1 << 14;
        const LOAD_IA32_EFER = 1 << 15;
        const LOAD_IA32_BNDCFGS = 1 << 16;
        const CONCEAL_VMX_FROM_PT = 1 << 17;
        const LOAD_IA32_RTIT_CTL = 1 << 18;
        const LOAD_CET_STATE = 1 << 20;
        const LOAD_IA32_LBR_CTL = 1 << 21;
        const LOAD_PKRS = 1 << 22;
        const _ = !0;
    }
}

/// The five 32-bit control words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    PinBased,
    Primary,
    Secondary,
    Exit,
    Entry,
}

impl ControlKind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::PinBased => "pin-based VM-execution",
            Self::Primary => "primary processor-based VM-execution",
            Self::Secondary => "secondary processor-based VM-execution",
            Self::Exit => "VM-exit",
            Self::Entry => "VM-entry",
        }
    }

    /// The VMCS field that holds this control word.
    pub const fn field(self) -> super::fields::Control32 {
        use super::fields::Control32;
        match self {
            Self::PinBased => Control32::PinBasedControls,
            Self::Primary => Control32::PrimaryProcBasedControls,
            Self::Secondary => Control32::SecondaryProcBasedControls,
            Self::Exit => Control32::ExitControls,
            Self::Entry => Control32::EntryControls,
        }
    }

    /// The SDM name of bit `bit` of this control word, if it has one.
    pub fn bit_name(self, bit: u32) -> Option<&'static str> {
        fn find<C: Flags<Bits = u32>>(bit: u32) -> Option<&'static str> {
            let value = 1u32.checked_shl(bit)?;
            C::FLAGS
                .iter()
                .find(|f| f.value().bits() == value && !f.name().is_empty())
                .map(|f| f.name())
        }
        match self {
            Self::PinBased => find::<PinBasedControls>(bit),
            Self::Primary => find::<PrimaryControls>(bit),
            Self::Secondary => find::<SecondaryControls>(bit),
            Self::Exit => find::<ExitControls>(bit),
            Self::Entry => find::<EntryControls>(bit),
        }
    }

    /// (allowed-0 settings, allowed-1 settings) of this control word: a bit set in the first
    /// must be 1, a bit clear in the second must be 0. The TRUE_* MSR is used when BASIC bit 55
    /// says it exists (SDM A.2); the secondary controls have none (SDM A.3.3).
    pub fn allowed(self, caps: &VmxCaps) -> (u32, u32) {
        let t = caps.true_controls();
        let msr = match self {
            Self::PinBased if t => caps.true_pinbased,
            Self::PinBased => caps.pinbased,
            Self::Primary if t => caps.true_procbased,
            Self::Primary => caps.procbased,
            Self::Secondary => caps.procbased2,
            Self::Exit if t => caps.true_exit,
            Self::Exit => caps.exit,
            Self::Entry if t => caps.true_entry,
            Self::Entry => caps.entry,
        };
        (msr as u32, (msr >> 32) as u32)
    }
}

/// Controls Keel requires that the processor cannot set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlError {
    pub kind: ControlKind,
    /// Every required bit the processor does not allow to be 1.
    pub missing: u32,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this processor does not support the {} control",
            self.kind.name()
        )?;
        if self.missing.count_ones() > 1 {
            f.write_str("s")?;
        }
        let mut first = true;
        for bit in (0..32).filter(|b| self.missing & (1 << b) != 0) {
            f.write_str(if first { " " } else { ", " })?;
            first = false;
            match self.kind.bit_name(bit) {
                Some(name) => write!(f, "{name} (bit {bit})")?,
                None => write!(f, "bit {bit}")?,
            }
        }
        Ok(())
    }
}

/// The value of a control word: the bits the processor forces to 1, the `required` bits (an error
/// names any it cannot set) and the `optional` bits it allows (others dropped silently).
/// SDM 27.2.1.1 checks these against the capability MSRs at VM entry; SDM A.3-A.5 give the rule.
pub fn adjust(
    caps: &VmxCaps,
    kind: ControlKind,
    required: u32,
    optional: u32,
) -> Result<u32, ControlError> {
    let (must_be_one, may_be_one) = kind.allowed(caps);
    let missing = required & !may_be_one;
    if missing != 0 {
        return Err(ControlError { kind, missing });
    }
    Ok(must_be_one | required | (optional & may_be_one))
}

/// A bitflags type that is one of the five control words.
pub trait ControlWord: Flags<Bits = u32> + Copy {
    const KIND: ControlKind;
}

impl ControlWord for PinBasedControls {
    const KIND: ControlKind = ControlKind::PinBased;
}
impl ControlWord for PrimaryControls {
    const KIND: ControlKind = ControlKind::Primary;
}
impl ControlWord for SecondaryControls {
    const KIND: ControlKind = ControlKind::Secondary;
}
impl ControlWord for ExitControls {
    const KIND: ControlKind = ControlKind::Exit;
}
impl ControlWord for EntryControls {
    const KIND: ControlKind = ControlKind::Entry;
}

/// Typed [`adjust`]: `adjust_controls(&caps, PrimaryControls::HLT_EXITING, PrimaryControls::empty())`.
/// The result keeps the processor's unnamed default1 bits.
pub fn adjust_controls<C: ControlWord>(
    caps: &VmxCaps,
    required: C,
    optional: C,
) -> Result<C, ControlError> {
    adjust(caps, C::KIND, required.bits(), optional.bits()).map(C::from_bits_retain)
}

/// Whether the processor allows `controls` to be 1 (all of them).
pub fn can_set<C: ControlWord>(caps: &VmxCaps, controls: C) -> bool {
    let (_, may_be_one) = C::KIND.allowed(caps);
    controls.bits() & !may_be_one == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::VmcsField;
    use alloc::string::ToString;

    fn bochs() -> VmxCaps {
        VmxCaps::bochs_skylake_x()
    }

    #[test]
    fn uses_true_msrs_when_present() {
        let caps = bochs();
        // TRUE_PROCBASED low half 0x04006172 lets CR3-load/store exiting (bits 15, 16) be 0.
        let v = adjust(&caps, ControlKind::Primary, 0, 0).unwrap();
        assert_eq!(v, 0x0400_6172);
        assert_eq!(v & PrimaryControls::CR3_LOAD_EXITING.bits(), 0);
        // Without bit 55 the ordinary MSR forces them on.
        let mut old = caps;
        old.basic &= !(1 << 55);
        let v = adjust(&old, ControlKind::Primary, 0, 0).unwrap();
        assert_eq!(v, 0x0401_e172);
        assert_ne!(v & PrimaryControls::CR3_STORE_EXITING.bits(), 0);
    }

    #[test]
    fn required_and_optional_bits() {
        let caps = bochs();
        let want = PrimaryControls::HLT_EXITING
            | PrimaryControls::USE_IO_BITMAPS
            | PrimaryControls::USE_MSR_BITMAPS
            | PrimaryControls::ACTIVATE_SECONDARY_CONTROLS;
        let v = adjust_controls(&caps, want, PrimaryControls::USE_TSC_OFFSETTING).unwrap();
        assert!(v.contains(want | PrimaryControls::USE_TSC_OFFSETTING));
        // The default1 bits 1, 4-6, 8, 26 stay set.
        assert_eq!(v.bits() & 0x0400_0172, 0x0400_0172);

        let v = adjust_controls(
            &caps,
            ExitControls::HOST_ADDRESS_SPACE_SIZE | ExitControls::ACK_INTERRUPT_ON_EXIT,
            ExitControls::SAVE_IA32_EFER | ExitControls::LOAD_IA32_EFER,
        )
        .unwrap();
        assert!(v.contains(ExitControls::LOAD_IA32_EFER | ExitControls::HOST_ADDRESS_SPACE_SIZE));
        // TRUE_EXIT lets "save debug controls" (bit 2) be 0.
        assert!(!v.contains(ExitControls::SAVE_DEBUG_CONTROLS));
    }

    #[test]
    fn unsupported_optional_bits_are_dropped() {
        let caps = bochs();
        // Bochs' secondary MSR does not allow bit 22 (mode-based execute control).
        let v = adjust_controls(
            &caps,
            SecondaryControls::ENABLE_EPT,
            SecondaryControls::MODE_BASED_EXECUTE_CONTROL | SecondaryControls::ENABLE_RDTSCP,
        )
        .unwrap();
        assert_eq!(
            v,
            SecondaryControls::ENABLE_EPT | SecondaryControls::ENABLE_RDTSCP
        );
    }

    #[test]
    fn unsupported_required_bit_is_named() {
        let caps = bochs();
        let err = adjust_controls(
            &caps,
            SecondaryControls::ENABLE_EPT | SecondaryControls::MODE_BASED_EXECUTE_CONTROL,
            SecondaryControls::empty(),
        )
        .unwrap_err();
        assert_eq!(err.kind, ControlKind::Secondary);
        assert_eq!(err.missing, 1 << 22);
        assert_eq!(
            err.to_string(),
            "this processor does not support the secondary processor-based VM-execution \
             control MODE_BASED_EXECUTE_CONTROL (bit 22)"
        );
        let err = adjust(&caps, ControlKind::Secondary, (1 << 30) | (1 << 22), 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this processor does not support the secondary processor-based VM-execution \
             controls MODE_BASED_EXECUTE_CONTROL (bit 22), bit 30"
        );
    }

    #[test]
    fn no_secondary_controls_without_the_msr() {
        let mut caps = bochs();
        caps.procbased2 = 0;
        let err = adjust_controls(
            &caps,
            SecondaryControls::UNRESTRICTED_GUEST,
            SecondaryControls::empty(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("UNRESTRICTED_GUEST (bit 7)"));
        assert!(!can_set(&caps, SecondaryControls::ENABLE_EPT));
        assert!(can_set(&bochs(), SecondaryControls::ENABLE_EPT));
    }

    #[test]
    fn preemption_timer_and_entry_controls() {
        let caps = bochs();
        let pin = adjust_controls(
            &caps,
            PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING,
            PinBasedControls::ACTIVATE_PREEMPTION_TIMER | PinBasedControls::VIRTUAL_NMIS,
        )
        .unwrap();
        assert_eq!(pin.bits(), 0x16 | 0x1 | 0x8 | 0x20 | 0x40);
        let entry = adjust_controls(
            &caps,
            EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_IA32_EFER,
            EntryControls::empty(),
        )
        .unwrap();
        assert_eq!(entry.bits(), 0x11fb | (1 << 9) | (1 << 15));
    }

    #[test]
    fn bit_names() {
        assert_eq!(ControlKind::Primary.bit_name(7), Some("HLT_EXITING"));
        assert_eq!(
            ControlKind::Exit.bit_name(9),
            Some("HOST_ADDRESS_SPACE_SIZE")
        );
        assert_eq!(ControlKind::Entry.bit_name(9), Some("IA32E_MODE_GUEST"));
        assert_eq!(ControlKind::PinBased.bit_name(1), None);
        assert_eq!(ControlKind::PinBased.bit_name(40), None);
        assert_eq!(ControlKind::Secondary.field().encoding(), 0x401e);
    }
}
