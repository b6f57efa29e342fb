//! Control-register accesses that exit: writes to CR0/CR4 bits Keel owns (SDM 25.1.3: a MOV to CR0
//! or CR4 exits when it would change a bit set in the guest/host mask to a value other than the
//! read shadow), CLTS and LMSW on those bits, and CR8 (the task priority, which Keel keeps virtual).
//!
//! The guest sees its own values through the read shadows; the real registers keep the bits VMX
//! operation requires (SDM 24.8 / A.7, A.8) and never let the guest enable VMX (CR4.VMXE reads as 0
//! and setting it is a #GP, as on a CPU without VMX).

use super::{Action, Exception, ExitContext};
use crate::guest::Guest;
use crate::vmx::cr::{clts, lmsw, CrContext, CrFault, CrLoad};
use crate::vmx::{
    Control32, ControlNat, CrAccessQualification, CrAccessType, Guest32, Guest64, GuestNat,
    ReadOnlyNat, Vmcs,
};

/// VM-entry control "IA-32e mode guest" (SDM 24.8.1).
pub const ENTRY_IA32E_MODE: u32 = 1 << 9;

fn gpr<V: Vmcs + ?Sized>(vmcs: &V, guest: &Guest, index: u8) -> u64 {
    if index == 4 {
        vmcs.read(GuestNat::Rsp)
    } else {
        guest.regs.get(index)
    }
}

/// The CR0 the guest sees now. Bits it owns (clear in the guest/host mask) change without an
/// exit and live only in the VMCS guest CR0; bits Keel owns read from the read shadow (SDM 25.3,
/// MOV from CR0). Keel keeps no copy of its own: one would go stale at the guest's next write of
/// PG, WP, TS or any other guest-owned bit.
pub fn live_cr0<V: Vmcs + ?Sized>(vmcs: &V, guest: &Guest) -> u64 {
    guest.cr0_rules.view(
        vmcs.read(GuestNat::Cr0),
        vmcs.read(ControlNat::Cr0ReadShadow),
    )
}

/// The CR4 the guest sees now (as [`live_cr0`]).
pub fn live_cr4<V: Vmcs + ?Sized>(vmcs: &V, guest: &Guest) -> u64 {
    guest.cr4_rules.view(
        vmcs.read(GuestNat::Cr4),
        vmcs.read(ControlNat::Cr4ReadShadow),
    )
}

/// What a CR write is checked against: the live values, never a copy from an earlier exit.
fn context<V: Vmcs + ?Sized>(vmcs: &V, guest: &Guest) -> CrContext {
    CrContext {
        cr0: live_cr0(vmcs, guest),
        cr4: live_cr4(vmcs, guest),
        efer: vmcs.read(Guest64::Ia32Efer),
        cs_long: vmcs.read(Guest32::CsAccessRights) & (1 << 13) != 0,
    }
}

/// Loads an accepted CR0 write: real value, shadow, and IA-32e mode when LMA changed.
fn load_cr0<V: Vmcs + ?Sized>(vmcs: &mut V, load: CrLoad) {
    if let Some(efer) = load.efer {
        vmcs.write(Guest64::Ia32Efer, efer);
        let lma = efer & crate::vmx::cr::efer::LMA != 0;
        vmcs.update(Control32::EntryControls, |e| {
            if lma {
                e | ENTRY_IA32E_MODE
            } else {
                e & !ENTRY_IA32E_MODE
            }
        });
    }
    vmcs.write(ControlNat::Cr0ReadShadow, load.shadow);
    vmcs.write(GuestNat::Cr0, load.value);
}

fn write_cr0<V: Vmcs + ?Sized>(vmcs: &mut V, guest: &mut Guest, v: u64) -> Action {
    match guest.cr0_rules.write(v, &context(vmcs, guest)) {
        Ok(load) => {
            load_cr0(vmcs, load);
            Action::Advance
        }
        Err(_) => Action::Inject(Exception::GP0),
    }
}

fn write_cr4<V: Vmcs + ?Sized>(vmcs: &mut V, guest: &mut Guest, v: u64) -> Action {
    match guest.cr4_rules.write(v, &context(vmcs, guest)) {
        Ok(load) => {
            vmcs.write(ControlNat::Cr4ReadShadow, load.shadow);
            vmcs.write(GuestNat::Cr4, load.value);
            Action::Advance
        }
        Err(CrFault::ReservedBits(_)) | Err(_) => Action::Inject(Exception::GP0),
    }
}

pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let q = CrAccessQualification::decode(cx.vmcs.read(ReadOnlyNat::ExitQualification));
    let (vmcs, guest) = (&mut *cx.vmcs, &mut *cx.guest);
    match (q.access, q.cr) {
        (CrAccessType::MovToCr, 0) => {
            let v = gpr(vmcs, guest, q.gpr);
            write_cr0(vmcs, guest, v)
        }
        (CrAccessType::MovToCr, 4) => {
            let v = gpr(vmcs, guest, q.gpr);
            write_cr4(vmcs, guest, v)
        }
        (CrAccessType::MovToCr, 8) => {
            let v = gpr(vmcs, guest, q.gpr);
            if v > 15 {
                return Action::Inject(Exception::GP0);
            }
            guest.platform.set_tpr((v as u8) << 4);
            Action::Advance
        }
        (CrAccessType::MovFromCr, 8) => {
            let v = (guest.platform.tpr() >> 4) as u64;
            if q.gpr == 4 {
                vmcs.write(GuestNat::Rsp, v);
            } else {
                guest.regs.set(q.gpr, v);
            }
            Action::Advance
        }
        (CrAccessType::Clts, _) => {
            let v = clts(live_cr0(vmcs, guest));
            write_cr0(vmcs, guest, v)
        }
        (CrAccessType::Lmsw, _) => {
            let v = lmsw(live_cr0(vmcs, guest), q.lmsw_source);
            write_cr0(vmcs, guest, v)
        }
        _ => Action::Inject(Exception::UD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;
    use crate::vmx::cr::GuestCr;
    use crate::vmx::cr::{cr0::*, cr4::*, efer::*};
    use crate::vmx::ExitReason;

    fn mov_to_cr(cr: u64, gpr: u64) -> u64 {
        cr | gpr << 8 // access type 0 = MOV to CR (SDM Table 28-3)
    }

    #[test]
    fn cr4_vmxe_is_refused_and_fixed_bits_stay() {
        let mut t = TestBed::new();
        t.guest.regs.rax = VMXE | PAE;
        t.set_qualification(mov_to_cr(4, 0));
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
        t.guest.regs.rax = PAE;
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(
            t.vmcs.read(ControlNat::Cr4ReadShadow),
            PAE,
            "the guest reads what it wrote"
        );
        assert_eq!(
            t.vmcs.read(GuestNat::Cr4),
            PAE | VMXE,
            "VMXE stays on in the real CR4"
        );
    }

    #[test]
    fn cr0_rules_and_long_mode_activation() {
        let mut t = TestBed::new();
        t.guest.regs.rbx = PG; // PG without PE
        t.set_qualification(mov_to_cr(0, 3));
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
        t.vmcs.write(GuestNat::Cr4, PAE | VMXE);
        t.vmcs.write(Guest64::Ia32Efer, LME);
        t.guest.regs.rbx = PG | PE;
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.vmcs.read(Guest64::Ia32Efer), LME | LMA);
        assert_ne!(t.vmcs.read(Control32::EntryControls) & ENTRY_IA32E_MODE, 0);
        assert_eq!(
            t.vmcs.read(GuestNat::Cr0) & (PG | PE | NE),
            PG | PE | NE,
            "NE forced on"
        );
    }

    /// The guest turned on PAE and paging with writes that do not exit (guest-owned bits): the
    /// VMCS guest CR0/CR4 hold them, the read shadows do not.
    fn paging_enabled_without_exits(t: &mut TestBed) {
        t.vmcs.write(GuestNat::Cr4, PAE | VMXE);
        t.vmcs.write(ControlNat::Cr4ReadShadow, 0);
        t.vmcs
            .write(ControlNat::Cr4GuestHostMask, t.guest.cr4_rules.mask());
        t.vmcs.write(GuestNat::Cr0, PG | PE | NE | ET | TS);
        t.vmcs.write(ControlNat::Cr0ReadShadow, NE | ET);
        t.vmcs
            .write(ControlNat::Cr0GuestHostMask, t.guest.cr0_rules.mask());
        t.vmcs.write(Guest64::Ia32Efer, LME | LMA);
        t.vmcs.write(Control32::EntryControls, ENTRY_IA32E_MODE);
    }

    #[test]
    fn cr0_write_is_checked_against_the_live_cr0_and_cr4() {
        let mut t = TestBed::new();
        paging_enabled_without_exits(&mut t);
        // Clearing NE (a bit Keel owns) exits; PG and PAE are already on.
        t.guest.regs.rax = PG | WP | PE;
        t.set_qualification(mov_to_cr(0, 0));
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.vmcs.read(GuestNat::Cr0), PG | WP | PE | NE | ET);
        assert_eq!(
            t.vmcs.read(ControlNat::Cr0ReadShadow),
            PG | WP | PE | ET,
            "NE reads back as written"
        );
        assert_eq!(t.vmcs.read(Guest64::Ia32Efer), LME | LMA, "still IA-32e");
        assert_ne!(t.vmcs.read(Control32::EntryControls) & ENTRY_IA32E_MODE, 0);
    }

    #[test]
    fn clts_and_lmsw_start_from_the_live_cr0() {
        let mut t = TestBed::new();
        paging_enabled_without_exits(&mut t);
        t.set_qualification(2 << 4); // CLTS (SDM Table 28-3)
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(
            t.vmcs.read(GuestNat::Cr0),
            PG | PE | NE | ET,
            "TS cleared, paging kept"
        );
        // LMSW with source 0x1 | TS (PE, TS): MP and EM clear, paging kept.
        t.set_qualification(3 << 4 | 0x9 << 16);
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.vmcs.read(GuestNat::Cr0), PG | PE | NE | ET | TS);
        assert_eq!(t.vmcs.read(Guest64::Ia32Efer), LME | LMA);
    }

    #[test]
    fn cr4_write_is_checked_against_the_live_cr0() {
        let mut t = TestBed::new();
        paging_enabled_without_exits(&mut t);
        // The guest set WP itself (no exit): CR4.CET is then allowed (SDM 2.5), and refused
        // again once it clears WP.
        let mut caps = crate::vmx::VmxCaps::bochs_skylake_x();
        caps.cr4_fixed1 |= CET;
        t.guest.cr4_rules = GuestCr::cr4(&caps);
        t.vmcs.write(GuestNat::Cr0, PG | PE | NE | ET | WP);
        t.guest.regs.rax = PAE | CET;
        t.set_qualification(mov_to_cr(4, 0));
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.vmcs.read(GuestNat::Cr4), PAE | CET | VMXE);
        t.vmcs.write(GuestNat::Cr0, PG | PE | NE | ET);
        t.vmcs.write(GuestNat::Cr4, PAE | VMXE);
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
    }

    #[test]
    fn cr8_is_the_virtual_tpr() {
        let mut t = TestBed::new();
        t.guest.regs.rcx = 9;
        t.set_qualification(mov_to_cr(8, 1));
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.guest.platform.tpr(), 0x90);
        t.set_qualification(8 | 1 << 4 | 2 << 8); // MOV from CR8 to RDX
        t.run(ExitReason::ControlRegisterAccess);
        assert_eq!(t.guest.regs.rdx, 9);
        t.guest.regs.rcx = 16;
        t.set_qualification(mov_to_cr(8, 1));
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
    }
}
