//! EPT violations and misconfigurations.
//!
//! Guest RAM is mapped in the guest's EPT; everything else is not, so an access outside RAM exits
//! here. A device that claimed the address on the guest's MMIO bus gets the access (through the
//! instruction emulator in `mmio`); an access to nothing stops the guest, logged with the address.
//! A misconfiguration means Keel built a bad EPT entry: a Keel bug, reported as such.

use super::{Action, ExitContext};
use crate::guest::StopReason;
use crate::vmx::{EptViolationQualification, ReadOnly32, ReadOnly64, ReadOnlyNat, Vmcs};
use alloc::format;

pub fn violation<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let gpa = cx.vmcs.read(ReadOnly64::GuestPhysicalAddr);
    let q =
        EptViolationQualification::from_bits_retain(cx.vmcs.read(ReadOnlyNat::ExitQualification));
    // SDM 28.2.4: valid IDT-vectoring information means the access was part of delivering an
    // event (reading the IDT or GDT, pushing onto the stack), not the instruction at RIP: there
    // is no instruction to emulate, and a guest whose IDT, GDT or stack lies in device memory
    // cannot take the event. Keel stops it rather than guess.
    if cx.vmcs.read(ReadOnly32::IdtVectoringInfo) & (1 << 31) != 0 {
        return Action::Stop(StopReason::Killed(format!(
            "event delivery touched guest-physical {gpa:#x}, which is {} (IDT, GDT or stack outside RAM)",
            if cx.guest.platform.claims_mmio(gpa) { "device memory" } else { "neither RAM nor a device" }
        )));
    }
    // Bit 8 clear with bit 7 set: the access was the CPU reading the guest's own page tables
    // during a walk (SDM Table 28-7), again not an instruction's access.
    if q.contains(EptViolationQualification::GLA_VALID)
        && !q.contains(EptViolationQualification::GLA_TRANSLATION)
    {
        return Action::Stop(StopReason::Killed(format!(
            "the guest's page walk touched guest-physical {gpa:#x} (page tables outside RAM)"
        )));
    }
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

#[cfg(test)]
mod tests {
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::guest::StopReason;
    use crate::vmx::{ExitReason, InterruptionInfo, ReadOnly32, ReadOnly64, VmcsAccess, VmcsField};

    #[test]
    fn an_access_during_event_delivery_is_not_emulated() {
        let mut t = TestBed::new();
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), 0xfee0_0068);
        t.vmcs.write_raw(
            ReadOnly32::IdtVectoringInfo.encoding(),
            InterruptionInfo::hardware_exception(13, true).raw() as u64,
        );
        t.set_qualification(1); // a read
        match t.run(ExitReason::EptViolation) {
            Action::Stop(StopReason::Killed(why)) => {
                assert!(
                    why.contains("event delivery") && why.contains("device memory"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod walk_tests {
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::guest::StopReason;
    use crate::vmx::{ExitReason, ReadOnly64, VmcsAccess, VmcsField};

    #[test]
    fn a_page_walk_into_device_memory_is_not_emulated() {
        let mut t = TestBed::new();
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), 0xfee0_0000);
        t.set_qualification(1 | 1 << 7); // a read, linear address valid, not its translation
        match t.run(ExitReason::EptViolation) {
            Action::Stop(StopReason::Killed(why)) => assert!(why.contains("page walk"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
