//! Exits with a one-line answer.

use super::{Action, ExitContext};
use crate::vmx::{ExitReason, Vmcs};

/// VMX instructions executed by a guest: VMX is not offered (CPUID hides it, CR4.VMXE cannot be
/// set), so each raises #UD as on a CPU without VMX (SDM 25.1.3 makes them all exit).
pub fn is_vmx_instruction(r: ExitReason) -> bool {
    matches!(
        r,
        ExitReason::Vmclear
            | ExitReason::Vmlaunch
            | ExitReason::Vmptrld
            | ExitReason::Vmptrst
            | ExitReason::Vmread
            | ExitReason::Vmresume
            | ExitReason::Vmwrite
            | ExitReason::Vmxoff
            | ExitReason::Vmxon
            | ExitReason::Invept
            | ExitReason::Invvpid
            | ExitReason::Vmfunc
    )
}

/// INVD and WBINVD: guest RAM is write-back cacheable host memory that Keel never maps
/// uncached, so there is nothing to flush on the guest's behalf; INVD (which would discard
/// dirty lines, possibly Keel's) is treated as WBINVD.
pub fn cache_flush<V: Vmcs + ?Sized>(_cx: &mut ExitContext<'_, V>) -> Action {
    Action::Advance
}
