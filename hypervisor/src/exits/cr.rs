//! Control-register accesses that exit: writes to CR0/CR4 bits Keel owns (SDM 25.1.3: a MOV to CR0
//! or CR4 exits when it would change a bit set in the guest/host mask to a value other than the
//! read shadow), CLTS and LMSW on those bits, and CR8 (the task priority, which Keel keeps virtual).
//!
//! The guest sees its own values through the read shadows; the real registers keep the bits VMX
//! operation requires (SDM 24.8 / A.7, A.8) and never let the guest enable VMX (CR4.VMXE reads as 0
//! and setting it is a #GP, as on a CPU without VMX).

use super::{Action, Exception, ExitContext, Host};
use crate::guest::{Vcpu, Vm};
use crate::vmx::cr::{clts, lmsw, CrContext, CrLoad};
use crate::vmx::{
    Control32, ControlNat, CrAccessQualification, CrAccessType, Guest32, Guest64, GuestNat,
    ReadOnlyNat, Vmcs,
};

/// VM-entry control "IA-32e mode guest" (SDM 24.8.1).
pub const ENTRY_IA32E_MODE: u32 = 1 << 9;

fn gpr<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu, index: u8) -> u64 {
    if index == 4 {
        vmcs.read(GuestNat::Rsp)
    } else {
        vcpu.regs.get(index)
    }
}

/// The CR0 the guest sees now. Bits it owns (clear in the guest/host mask) change without an
/// exit and live only in the VMCS guest CR0; bits Keel owns read from the read shadow (SDM 25.3,
/// MOV from CR0). Keel keeps no copy of its own: one would go stale at the guest's next write of
/// PG, WP, TS or any other guest-owned bit.
pub fn live_cr0<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu) -> u64 {
    vcpu.cr0_rules.view(
        vmcs.read(GuestNat::Cr0),
        vmcs.read(ControlNat::Cr0ReadShadow),
    )
}

/// The CR4 the guest sees now (as [`live_cr0`]).
pub fn live_cr4<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu) -> u64 {
    vcpu.cr4_rules.view(
        vmcs.read(GuestNat::Cr4),
        vmcs.read(ControlNat::Cr4ReadShadow),
    )
}

/// What a CR write is checked against: the live values, never a copy from an earlier exit.
fn context<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu) -> CrContext {
    CrContext {
        cr0: live_cr0(vmcs, vcpu),
        cr4: live_cr4(vmcs, vcpu),
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

/// Bits of a present PAE-paging PDPTE that must be 0: 2:1, 8:5 and MAXPHYADDR up to 63
/// (SDM 4.4.1, Table 4-8).
fn pdpte_reserved(maxphyaddr: u32) -> u64 {
    0x1e6 | !((1u64 << maxphyaddr.min(52)) - 1)
}

/// SDM 4.4.1: a MOV to CR0 or CR4 that leaves the processor in PAE paging (CR0.PG = 1,
/// CR4.PAE = 1, EFER.LMA = 0) loads the four PDPTEs from the 32-byte table at CR3[31:5]; with EPT
/// the processor uses the VMCS guest PDPTE fields at the next VM entry (SDM 27.3.2.4), so Keel
/// writes them. A present entry with a reserved bit set, or a table outside guest RAM (the bus
/// would read all ones), makes the instruction fault with #GP(0) before anything changes.
fn load_pdptes<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    vm: &Vm,
    host: &dyn Host,
    cr0: u64,
    cr4: u64,
    efer: u64,
) -> Result<(), ()> {
    use crate::vmx::cr::{cr0::PG, cr4::PAE, efer::LMA};
    if cr0 & PG == 0 || cr4 & PAE == 0 || efer & LMA != 0 {
        return Ok(());
    }
    let table = vmcs.read(GuestNat::Cr3) & 0xffff_ffe0;
    let reserved = pdpte_reserved(host.cpuid(0x8000_0008, 0)[0] & 0xff);
    let mut pdptes = [0u64; 4];
    for (i, e) in pdptes.iter_mut().enumerate() {
        *e = vm.ram.read_u64(table + 8 * i as u64).ok_or(())?;
        if *e & 1 != 0 && *e & reserved != 0 {
            return Err(());
        }
    }
    let fields = [
        Guest64::Pdpte0,
        Guest64::Pdpte1,
        Guest64::Pdpte2,
        Guest64::Pdpte3,
    ];
    for (f, e) in fields.into_iter().zip(pdptes) {
        vmcs.write(f, e);
    }
    Ok(())
}

fn write_cr0<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    (vcpu, vm): (&Vcpu, &Vm),
    host: &dyn Host,
    v: u64,
) -> Action {
    let ctx = context(vmcs, vcpu);
    let Ok(load) = vcpu.cr0_rules.write(v, &ctx) else {
        return Action::Inject(Exception::GP0);
    };
    let efer = load.efer.unwrap_or(ctx.efer);
    if load_pdptes(vmcs, vm, host, load.shadow, ctx.cr4, efer).is_err() {
        return Action::Inject(Exception::GP0);
    }
    load_cr0(vmcs, load);
    Action::Advance
}

fn write_cr4<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    (vcpu, vm): (&Vcpu, &Vm),
    host: &dyn Host,
    v: u64,
) -> Action {
    let ctx = context(vmcs, vcpu);
    let Ok(load) = vcpu.cr4_rules.write(v, &ctx) else {
        return Action::Inject(Exception::GP0);
    };
    if load_pdptes(vmcs, vm, host, ctx.cr0, load.shadow, ctx.efer).is_err() {
        return Action::Inject(Exception::GP0);
    }
    vmcs.write(ControlNat::Cr4ReadShadow, load.shadow);
    vmcs.write(GuestNat::Cr4, load.value);
    Action::Advance
}

pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let q = CrAccessQualification::decode(cx.vmcs.read(ReadOnlyNat::ExitQualification));
    let (vmcs, vcpu, vm, host) = (&mut *cx.vmcs, &mut *cx.vcpu, &mut *cx.vm, &*cx.host);
    match (q.access, q.cr) {
        (CrAccessType::MovToCr, 0) => {
            let v = gpr(vmcs, vcpu, q.gpr);
            write_cr0(vmcs, (&*vcpu, &*vm), host, v)
        }
        (CrAccessType::MovToCr, 4) => {
            let v = gpr(vmcs, vcpu, q.gpr);
            write_cr4(vmcs, (&*vcpu, &*vm), host, v)
        }
        (CrAccessType::MovToCr, 8) => {
            let v = gpr(vmcs, vcpu, q.gpr);
            if v > 15 {
                return Action::Inject(Exception::GP0);
            }
            vm.platform.set_tpr(vcpu.index, (v as u8) << 4);
            Action::Advance
        }
        (CrAccessType::MovFromCr, 8) => {
            let v = (vm.platform.tpr(vcpu.index) >> 4) as u64;
            if q.gpr == 4 {
                vmcs.write(GuestNat::Rsp, v);
            } else {
                vcpu.regs.set(q.gpr, v);
            }
            Action::Advance
        }
        (CrAccessType::Clts, _) => {
            let v = clts(live_cr0(vmcs, vcpu));
            write_cr0(vmcs, (&*vcpu, &*vm), host, v)
        }
        (CrAccessType::Lmsw, _) => {
            let v = lmsw(live_cr0(vmcs, vcpu), q.lmsw_source);
            write_cr0(vmcs, (&*vcpu, &*vm), host, v)
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
        t.vcpu.regs.rax = VMXE | PAE;
        t.set_qualification(mov_to_cr(4, 0));
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
        t.vcpu.regs.rax = PAE;
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
        t.vcpu.regs.rbx = PG; // PG without PE
        t.set_qualification(mov_to_cr(0, 3));
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
        t.vmcs.write(GuestNat::Cr4, PAE | VMXE);
        t.vmcs.write(Guest64::Ia32Efer, LME);
        t.vcpu.regs.rbx = PG | PE;
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
            .write(ControlNat::Cr4GuestHostMask, t.vcpu.cr4_rules.mask());
        t.vmcs.write(GuestNat::Cr0, PG | PE | NE | ET | TS);
        t.vmcs.write(ControlNat::Cr0ReadShadow, NE | ET);
        t.vmcs
            .write(ControlNat::Cr0GuestHostMask, t.vcpu.cr0_rules.mask());
        t.vmcs.write(Guest64::Ia32Efer, LME | LMA);
        t.vmcs.write(Control32::EntryControls, ENTRY_IA32E_MODE);
    }

    #[test]
    fn cr0_write_is_checked_against_the_live_cr0_and_cr4() {
        let mut t = TestBed::new();
        paging_enabled_without_exits(&mut t);
        // Clearing NE (a bit Keel owns) exits; PG and PAE are already on.
        t.vcpu.regs.rax = PG | WP | PE;
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
    fn live_values_have_the_guests_bits_and_keels_shadowed_ones() {
        let mut t = TestBed::new();
        paging_enabled_without_exits(&mut t);
        t.vmcs.write(ControlNat::Cr0ReadShadow, ET);
        assert_eq!(
            live_cr0(&t.vmcs, &t.vcpu),
            PG | PE | ET | TS,
            "NE as shadowed"
        );
        assert_eq!(live_cr4(&t.vmcs, &t.vcpu), PAE, "VMXE hidden");
    }

    #[test]
    fn cr4_bits_of_hidden_features_are_gp() {
        let mut t = TestBed::new();
        let mut caps = crate::vmx::VmxCaps::bochs_skylake_x();
        caps.cr4_fixed1 |= CET | PKS;
        t.vcpu.cr4_rules = GuestCr::cr4(&caps);
        t.vmcs.write(GuestNat::Cr0, PE | NE | ET | WP);
        t.set_qualification(mov_to_cr(4, 0));
        for bit in [CET, PKS, SMXE] {
            t.vcpu.regs.rax = PAE | bit;
            assert_eq!(
                t.run(ExitReason::ControlRegisterAccess),
                Action::Inject(Exception::GP0),
                "{bit:#x}"
            );
        }
    }

    /// A 32-bit guest with PAE on and paging off, its PDPT at 0x1000 (CR3).
    fn pae_guest(t: &mut TestBed, pdptes: [u64; 4]) {
        t.vmcs.write(GuestNat::Cr4, PAE | VMXE);
        t.vmcs
            .write(ControlNat::Cr4GuestHostMask, t.vcpu.cr4_rules.mask());
        t.vmcs.write(GuestNat::Cr0, PE | NE | ET);
        t.vmcs.write(ControlNat::Cr0ReadShadow, NE | ET);
        t.vmcs
            .write(ControlNat::Cr0GuestHostMask, t.vcpu.cr0_rules.mask());
        t.vmcs.write(GuestNat::Cr3, 0x1000);
        for (i, e) in pdptes.iter().enumerate() {
            let at = 0x1000 + i * 8;
            t.vm.ram.bytes()[at..at + 8].copy_from_slice(&e.to_le_bytes());
        }
    }

    #[test]
    fn pae_paging_loads_the_pdptes() {
        let mut t = TestBed::new();
        pae_guest(&mut t, [0x2001, 0x3001, 0, 0x5000]);
        // PG on and NE off in one write (NE is Keel's: it exits). SDM 4.4.1: the PDPTEs load.
        t.vcpu.regs.rax = PG | PE;
        t.set_qualification(mov_to_cr(0, 0));
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        let pdptes = [
            Guest64::Pdpte0,
            Guest64::Pdpte1,
            Guest64::Pdpte2,
            Guest64::Pdpte3,
        ]
        .map(|f| t.vmcs.read(f));
        assert_eq!(pdptes, [0x2001, 0x3001, 0, 0x5000]);
        assert_eq!(t.vmcs.read(GuestNat::Cr0), PG | PE | NE | ET);
    }

    #[test]
    fn a_present_pdpte_with_reserved_bits_is_gp() {
        // Bits 2:1 and 8:5 are reserved in a present PAE PDPTE, and so is every bit from
        // MAXPHYADDR up (the fake CPU reports 39).
        for bad in [0x4003, 0x4021, 0x4101, 1 << 39 | 1, 1 << 63 | 1] {
            let mut t = TestBed::new();
            pae_guest(&mut t, [0x2001, 0, bad, 0]);
            t.vcpu.regs.rax = PG | PE;
            t.set_qualification(mov_to_cr(0, 0));
            assert_eq!(
                t.run(ExitReason::ControlRegisterAccess),
                Action::Inject(Exception::GP0),
                "PDPTE {bad:#x}"
            );
            assert_eq!(t.vmcs.read(GuestNat::Cr0), PE | NE | ET, "CR0 unchanged");
            assert_eq!(t.vmcs.read(Guest64::Pdpte0), 0);
        }
        // A not-present entry may hold anything.
        let mut t = TestBed::new();
        pae_guest(&mut t, [0x2001, 0xffff_fffe, 0, 0]);
        t.vcpu.regs.rax = PG | PE;
        t.set_qualification(mov_to_cr(0, 0));
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.vmcs.read(Guest64::Pdpte1), 0xffff_fffe);
    }

    #[test]
    fn cr8_is_the_virtual_tpr() {
        let mut t = TestBed::new();
        t.vcpu.regs.rcx = 9;
        t.set_qualification(mov_to_cr(8, 1));
        assert_eq!(t.run(ExitReason::ControlRegisterAccess), Action::Advance);
        assert_eq!(t.vm.platform.tpr(0), 0x90);
        t.set_qualification(8 | 1 << 4 | 2 << 8); // MOV from CR8 to RDX
        t.run(ExitReason::ControlRegisterAccess);
        assert_eq!(t.vcpu.regs.rdx, 9);
        t.vcpu.regs.rcx = 16;
        t.set_qualification(mov_to_cr(8, 1));
        assert_eq!(
            t.run(ExitReason::ControlRegisterAccess),
            Action::Inject(Exception::GP0)
        );
    }
}
