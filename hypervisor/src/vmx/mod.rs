//! The host-testable half of VMX: typed VMCS fields, capability MSRs, control computations, guest
//! control-register rules, exit decoding and VMX error messages. Nothing here executes a VMX
//! instruction; the hardware layer (`arch::vmx`) implements [`VmcsAccess`] with VMREAD/VMWRITE
//! and tests use [`FakeVmcs`].

/// An enum of the numbers a VMX field reports, with the SDM's text for each, plus `Unknown(n)` for
/// numbers the SDM does not define (or that came later): `from` builds it from the number,
/// `number()` gives the number back, `text` names the accessor of the SDM text.
macro_rules! numbered_enum {
    (
        $(#[$doc:meta])*
        pub enum $name:ident: $int:ty {
            from: $from:ident,
            $(#[$text_doc:meta])*
            text: $text:ident,
            $( $variant:ident = $num:literal, $msg:literal; )+
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $variant, )+
            Unknown($int),
        }

        impl $name {
            #[inline]
            pub const fn $from(number: $int) -> Self {
                match number {
                    $( $num => Self::$variant, )+
                    n => Self::Unknown(n),
                }
            }

            #[inline]
            pub const fn number(self) -> $int {
                match self {
                    $( Self::$variant => $num, )+
                    Self::Unknown(n) => n,
                }
            }

            $(#[$text_doc])*
            pub const fn $text(self) -> Option<&'static str> {
                match self {
                    $( Self::$variant => Some($msg), )+
                    Self::Unknown(_) => None,
                }
            }
        }
    };
}

pub mod apicv;
pub mod caps;
pub mod controls;
pub mod cr;
pub mod error;
pub mod exit;
pub mod fake;
pub mod fields;
pub mod guest_state;
pub mod invalidate;

pub use caps::{EptVpidCap, VmxCaps};
pub use controls::{
    adjust, adjust_controls, ControlError, ControlKind, EntryControls, ExitControls,
    PinBasedControls, PrimaryControls, SecondaryControls,
};
pub use cr::{fixed_cr0, fixed_cr4, CrContext, CrFault, CrLoad, CrPolicy, GuestCr};
pub use error::{EntryFailure, GuestStateDetail, VmInstructionError, VmcsError, VmxError};
pub use exit::{
    ActivityState, CrAccessQualification, CrAccessType, EptViolationQualification, ExitReason,
    ExitReasonField, Interruptibility, InterruptionInfo, InterruptionType, IoDirection,
    IoQualification,
};
pub use fake::FakeVmcs;
pub use fields::{
    always_present, Control16, Control32, Control64, ControlNat, Guest16, Guest32, Guest64,
    GuestNat, Host16, Host32, Host64, HostNat, ReadOnly32, ReadOnly64, ReadOnlyNat, Segment, Vmcs,
    VmcsAccess, VmcsField, WritableField,
};
pub use guest_state::{check_guest_state, check_guest_state_with, EntryEnv};
pub use invalidate::{FlushPolicy, Invalidation};
