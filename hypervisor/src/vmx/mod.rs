//! The host-testable half of VMX: typed VMCS fields, capability MSRs, control computations, guest
//! control-register rules, exit decoding and VMX error messages. Nothing here executes a VMX
//! instruction; the hardware layer (`arch::vmx`) implements [`VmcsAccess`] with VMREAD/VMWRITE
//! and tests use [`FakeVmcs`].

pub mod caps;
pub mod controls;
pub mod cr;
pub mod error;
pub mod exit;
pub mod fake;
pub mod fields;

pub use caps::{EptVpidCap, VmxCaps};
pub use controls::{
    adjust, adjust_controls, ControlError, ControlKind, EntryControls, ExitControls,
    PinBasedControls, PrimaryControls, SecondaryControls,
};
pub use cr::{fixed_cr0, fixed_cr4, CrContext, CrFault, CrLoad, CrPolicy, GuestCr};
pub use error::{EntryFailure, GuestStateDetail, VmInstructionError, VmxError};
pub use exit::{
    ActivityState, CrAccessQualification, CrAccessType, EptViolationQualification, ExitReason,
    ExitReasonField, Interruptibility, InterruptionInfo, InterruptionType, IoDirection,
    IoQualification,
};
pub use fake::FakeVmcs;
pub use fields::{
    Control16, Control32, Control64, ControlNat, Guest16, Guest32, Guest64, GuestNat, Host16,
    Host32, Host64, HostNat, ReadOnly32, ReadOnly64, ReadOnlyNat, Segment, Vmcs, VmcsAccess,
    VmcsField, WritableField,
};
