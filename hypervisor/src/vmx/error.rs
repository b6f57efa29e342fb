//! How VMX operations fail, as readable messages: VMX-instruction failures (SDM 31.2, 31.4) and
//! VM-entry failures that surface as exits (SDM 27.8).

use super::exit::{ExitReason, ExitReasonField};
use core::fmt;

numbered_enum! {
    /// VM-instruction error numbers (SDM 31.4, Table 31-1), read from the VM-instruction
    /// error field after a VMfailValid.
    pub enum VmInstructionError: u32 {
        from: from_raw,
        /// The SDM's description; `None` for numbers it does not define.
        text: message,
        VmcallInRoot = 1, "VMCALL executed in VMX root operation";
        VmclearInvalidAddress = 2, "VMCLEAR with invalid physical address";
        VmclearVmxonPointer = 3, "VMCLEAR with VMXON pointer";
        VmlaunchNonClear = 4, "VMLAUNCH with non-clear VMCS";
        VmresumeNonLaunched = 5, "VMRESUME with non-launched VMCS";
        VmresumeAfterVmxoff = 6, "VMRESUME after VMXOFF (VMXOFF and VMXON between VMLAUNCH and VMRESUME)";
        InvalidControlFields = 7, "VM entry with invalid control field(s)";
        InvalidHostState = 8, "VM entry with invalid host-state field(s)";
        VmptrldInvalidAddress = 9, "VMPTRLD with invalid physical address";
        VmptrldVmxonPointer = 10, "VMPTRLD with VMXON pointer";
        VmptrldBadRevision = 11, "VMPTRLD with incorrect VMCS revision identifier";
        UnsupportedComponent = 12, "VMREAD/VMWRITE from/to unsupported VMCS component";
        VmwriteReadOnly = 13, "VMWRITE to read-only VMCS component";
        VmxonInRoot = 15, "VMXON executed in VMX root operation";
        InvalidExecutiveVmcsPointer = 16, "VM entry with invalid executive-VMCS pointer";
        NonLaunchedExecutiveVmcs = 17, "VM entry with non-launched executive VMCS";
        ExecutiveVmcsNotVmxon = 18, "VM entry with executive-VMCS pointer not VMXON pointer (when attempting to deactivate the dual-monitor treatment of SMIs and SMM)";
        VmcallNonClear = 19, "VMCALL with non-clear VMCS (when attempting to activate the dual-monitor treatment of SMIs and SMM)";
        VmcallInvalidExitControls = 20, "VMCALL with invalid VM-exit control fields";
        VmcallBadMsegRevision = 22, "VMCALL with incorrect MSEG revision identifier (when attempting to activate the dual-monitor treatment of SMIs and SMM)";
        VmxoffDualMonitor = 23, "VMXOFF under dual-monitor treatment of SMIs and SMM";
        VmcallInvalidSmmFeatures = 24, "VMCALL with invalid SMM-monitor features (when attempting to activate the dual-monitor treatment of SMIs and SMM)";
        InvalidExecutiveControls = 25, "VM entry with invalid VM-execution control fields in executive VMCS (when attempting to return from SMM)";
        EventsBlockedByMovSs = 26, "VM entry with events blocked by MOV SS";
        InvalidInvOperand = 28, "Invalid operand to INVEPT/INVVPID";
    }
}

impl fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.message() {
            Some(m) => write!(f, "{m} (VM-instruction error {})", self.number()),
            None => write!(f, "unknown VM-instruction error {}", self.number()),
        }
    }
}

/// A failed VMX instruction (SDM 31.2 "Conventions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxError {
    /// CF = 1: there is no current VMCS to hold an error number.
    FailInvalid,
    /// ZF = 1: the error number is in the VM-instruction error field.
    FailValid(VmInstructionError),
}

impl VmxError {
    /// Interprets RFLAGS right after a VMX instruction; `read_error` reads the VM-instruction
    /// error field and is called only for VMfailValid.
    pub fn check(rflags: u64, read_error: impl FnOnce() -> u32) -> Result<(), VmxError> {
        const CF: u64 = 1 << 0;
        const ZF: u64 = 1 << 6;
        if rflags & CF != 0 {
            Err(VmxError::FailInvalid)
        } else if rflags & ZF != 0 {
            Err(VmxError::FailValid(VmInstructionError::from_raw(
                read_error(),
            )))
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FailInvalid => f.write_str("VMfailInvalid (no current VMCS or bad pointer)"),
            Self::FailValid(e) => write!(f, "VMfailValid: {e}"),
        }
    }
}

/// A VMCS region that could not be set up, cleared (VMCLEAR) or made current (VMPTRLD), with
/// its physical address. Ends the guest it belongs to, not Keel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmcsError {
    OutOfMemory,
    Clear(u64, VmxError),
    Load(u64, VmxError),
}

impl fmt::Display for VmcsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory => f.write_str("out of memory for a VMCS"),
            Self::Clear(pa, e) => write!(f, "VMCLEAR of the VMCS at {pa:#x} failed: {e}"),
            Self::Load(pa, e) => write!(f, "VMPTRLD of the VMCS at {pa:#x} failed: {e}"),
        }
    }
}

/// A VM entry that failed after the processor started loading guest state: it is reported as a
/// VM exit with bit 31 of the exit reason set (SDM 27.8). Displayed as what failed, without a
/// "VM entry failed" prefix: `StopReason::EntryFailed` adds that once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFailure {
    /// Exit reason 33: a guest-state check of SDM 27.3.1 failed. The exit qualification says
    /// which kind when the processor knows (SDM 27.8).
    InvalidGuestState(GuestStateDetail),
    /// Exit reason 34: loading entry `entry` (counting from 1) of the VM-entry MSR-load list
    /// failed (SDM 27.4).
    MsrLoading { entry: u64 },
    /// Exit reason 41: a machine-check event during VM entry (SDM 27.9).
    MachineCheck,
    /// Bit 31 set with some other basic reason.
    Other(ExitReason),
}

/// Exit qualification of an invalid-guest-state failure (SDM 27.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStateDetail {
    /// 0 (or 1): no further detail.
    Unspecified,
    /// 2: loading the PDPTEs (PAE paging) failed.
    PdpteLoading,
    /// 3: an NMI was to be injected while blocking by STI was set.
    NmiInjectionWithStiBlocking,
    /// 4: the VMCS link pointer is invalid.
    InvalidVmcsLinkPointer,
    Unknown(u64),
}

impl EntryFailure {
    /// Decodes the raw exit-reason field and exit qualification of a VM-entry failure.
    pub fn from_exit(raw_reason: u32, qualification: u64) -> Self {
        match ExitReasonField::from_raw(raw_reason).basic {
            ExitReason::EntryFailureGuestState => Self::InvalidGuestState(match qualification {
                0 | 1 => GuestStateDetail::Unspecified,
                2 => GuestStateDetail::PdpteLoading,
                3 => GuestStateDetail::NmiInjectionWithStiBlocking,
                4 => GuestStateDetail::InvalidVmcsLinkPointer,
                q => GuestStateDetail::Unknown(q),
            }),
            ExitReason::EntryFailureMsrLoading => Self::MsrLoading {
                entry: qualification,
            },
            ExitReason::EntryFailureMachineCheck => Self::MachineCheck,
            other => Self::Other(other),
        }
    }
}

/// What went wrong; the guest's stop reason (`StopReason::EntryFailed`) says "VM entry failed".
impl fmt::Display for EntryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidGuestState(d) => {
                f.write_str("invalid guest state")?;
                match d {
                    GuestStateDetail::Unspecified => {
                        f.write_str(" (a guest-state check of SDM 27.3.1 failed)")
                    }
                    GuestStateDetail::PdpteLoading => f.write_str(" (loading the PDPTEs)"),
                    GuestStateDetail::NmiInjectionWithStiBlocking => {
                        f.write_str(" (NMI injection while blocking by STI)")
                    }
                    GuestStateDetail::InvalidVmcsLinkPointer => {
                        f.write_str(" (invalid VMCS link pointer)")
                    }
                    GuestStateDetail::Unknown(q) => write!(f, " (qualification {q})"),
                }
            }
            Self::MsrLoading { entry } => {
                write!(f, "loading entry {entry} of the VM-entry MSR-load list")
            }
            Self::MachineCheck => f.write_str("machine-check event"),
            Self::Other(reason) => write!(f, "exit reason {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn instruction_errors() {
        for n in 0..=30 {
            let e = VmInstructionError::from_raw(n);
            assert_eq!(e.number(), n);
            let defined = matches!(n, 1..=13 | 15..=20 | 22..=26 | 28);
            assert_eq!(e.message().is_some(), defined, "error {n}");
        }
        assert_eq!(
            VmInstructionError::from_raw(7).to_string(),
            "VM entry with invalid control field(s) (VM-instruction error 7)"
        );
        assert_eq!(
            VmInstructionError::from_raw(8),
            VmInstructionError::InvalidHostState
        );
        assert_eq!(
            VmInstructionError::from_raw(99).to_string(),
            "unknown VM-instruction error 99"
        );
    }

    #[test]
    fn rflags_conventions() {
        assert_eq!(
            VmxError::check(0x2, || panic!("not read on success")),
            Ok(())
        );
        assert_eq!(
            VmxError::check(0x3, || panic!("not read on VMfailInvalid")),
            Err(VmxError::FailInvalid)
        );
        let e = VmxError::check(0x42, || 5).unwrap_err();
        assert_eq!(
            e,
            VmxError::FailValid(VmInstructionError::VmresumeNonLaunched)
        );
        assert_eq!(
            e.to_string(),
            "VMfailValid: VMRESUME with non-launched VMCS (VM-instruction error 5)"
        );
    }

    #[test]
    fn vmcs_errors_name_the_instruction_and_the_region() {
        let e = VmcsError::Clear(
            0x12_3000,
            VmxError::FailValid(VmInstructionError::VmclearInvalidAddress),
        );
        assert_eq!(
            e.to_string(),
            "VMCLEAR of the VMCS at 0x123000 failed: VMfailValid: VMCLEAR with invalid physical \
             address (VM-instruction error 2)"
        );
        assert_eq!(
            VmcsError::Load(0x5000, VmxError::FailInvalid).to_string(),
            "VMPTRLD of the VMCS at 0x5000 failed: VMfailInvalid (no current VMCS or bad pointer)"
        );
    }

    #[test]
    fn entry_failures() {
        let f = EntryFailure::from_exit(0x8000_0021, 0);
        assert_eq!(
            f,
            EntryFailure::InvalidGuestState(GuestStateDetail::Unspecified)
        );
        assert_eq!(
            f.to_string(),
            "invalid guest state (a guest-state check of SDM 27.3.1 failed)"
        );
        assert_eq!(
            EntryFailure::from_exit(0x8000_0021, 4).to_string(),
            "invalid guest state (invalid VMCS link pointer)"
        );
        assert_eq!(
            EntryFailure::from_exit(0x8000_0022, 3),
            EntryFailure::MsrLoading { entry: 3 }
        );
        assert_eq!(
            EntryFailure::from_exit(0x8000_0022, 3).to_string(),
            "loading entry 3 of the VM-entry MSR-load list"
        );
        assert_eq!(
            EntryFailure::from_exit(0x8000_0029, 0),
            EntryFailure::MachineCheck
        );
        assert_eq!(
            EntryFailure::from_exit(0x8000_000a, 0).to_string(),
            "exit reason CPUID"
        );
    }

    /// The message a guest killed by a VM-entry failure gets, composed as the exit path does:
    /// `dispatch` wraps the decoded failure in `StopReason::EntryFailed`, whose Display adds the
    /// "VM entry failed: " prefix once.
    #[test]
    fn entry_failure_stop_message_has_one_prefix() {
        use crate::exits::testing::TestBed;
        use crate::exits::{dispatch, Action, ExitContext};
        use crate::vmx::{ReadOnly32, ReadOnlyNat, VmcsAccess, VmcsField};
        let mut t = TestBed::new();
        t.vmcs
            .write_raw(ReadOnly32::ExitReason.encoding(), 0x8000_0021);
        t.vmcs
            .write_raw(ReadOnlyNat::ExitQualification.encoding(), 0);
        let mut cx = ExitContext {
            vmcs: &mut t.vmcs,
            vcpu: &mut t.vcpu,
            vm: &mut t.vm,
            host: &mut t.host,
            now: 0,
        };
        let Action::Stop(reason) = dispatch(&mut cx) else {
            panic!("an entry failure stops the guest")
        };
        assert_eq!(
            reason.to_string(),
            "VM entry failed: invalid guest state (a guest-state check of SDM 27.3.1 failed) \
             (exit reason 0x80000021, qualification 0x0)"
        );
        assert_eq!(
            crate::guest::StopReason::EntryFailed(
                EntryFailure::from_exit(0x8000_0022, 2).to_string()
            )
            .to_string(),
            "VM entry failed: loading entry 2 of the VM-entry MSR-load list"
        );
    }
}
