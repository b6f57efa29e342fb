//! EPT violations and misconfigurations.
//!
//! Guest RAM is mapped in the guest's EPT; everything else is not, so an access outside RAM exits
//! here. A device that claimed the address on the guest's MMIO bus gets the access (through the
//! instruction emulator in `mmio`); an access to nothing stops the guest, logged with the address.
//! A misconfiguration means Keel built a bad EPT entry: a Keel bug, reported as such.

use super::{Action, ExitContext};
use crate::guest::StopReason;
use crate::vmx::{EptViolationQualification, ReadOnly64, ReadOnlyNat, Vmcs};
use alloc::format;

pub fn violation<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let gpa = cx.vmcs.read(ReadOnly64::GuestPhysicalAddr);
    let q =
        EptViolationQualification::from_bits_retain(cx.vmcs.read(ReadOnlyNat::ExitQualification));
    if cx.guest.platform.claims_mmio(gpa) && !q.contains(EptViolationQualification::FETCH) {
        return crate::mmio::emulate(cx, gpa);
    }
    Action::Stop(StopReason::BadMemoryAccess {
        gpa,
        write: q.contains(EptViolationQualification::WRITE),
    })
}

pub fn misconfiguration<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let gpa = cx.vmcs.read(ReadOnly64::GuestPhysicalAddr);
    crate::error!(
        "KEEL BUG: EPT misconfiguration at guest-physical {gpa:#x} in guest {}",
        cx.guest.name
    );
    Action::Stop(StopReason::Killed(format!(
        "EPT misconfiguration at {gpa:#x} (a Keel bug)"
    )))
}
