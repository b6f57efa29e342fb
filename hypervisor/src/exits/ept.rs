//! EPT violations and misconfigurations.
//!
//! Guest RAM is mapped in the guest's EPT; everything else is not, so an access outside RAM exits
//! here. A device that claimed the address on the guest's MMIO bus gets the access (through the
//! instruction emulator in `mmio`); an access to nothing stops the guest, logged with the address.
//! A misconfiguration means Keel built a bad EPT entry: a Keel bug, reported as such.
//!
//! A page of RAM the guest gave back (BALLOON_GIVE, `balloon`) is not mapped either: touching it
//! in any way (an instruction, a page walk, event delivery) stops the guest with that reason.

use super::{Action, ExitContext};
use crate::guest::StopReason;
use crate::vmx::{EptViolationQualification, ReadOnly32, ReadOnly64, ReadOnlyNat, Vmcs};
use alloc::format;

pub fn violation<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let gpa = cx.vmcs.read(ReadOnly64::GuestPhysicalAddr);
    let q =
        EptViolationQualification::from_bits_retain(cx.vmcs.read(ReadOnlyNat::ExitQualification));
    if gpa < cx.vm.ram.len() && cx.vm.ram.balloon.is_given(gpa / crate::balloon::PAGE) {
        return Action::Stop(StopReason::Killed(format!(
            "{} guest-physical {gpa:#x}, a page it gave back (BALLOON_GIVE)",
            if q.contains(EptViolationQualification::FETCH) {
                "executed at"
            } else if q.contains(EptViolationQualification::WRITE) {
                "wrote"
            } else {
                "read"
            }
        )));
    }
    // SDM 28.2.4: valid IDT-vectoring information means the access was part of delivering an
    // event (reading the IDT or GDT, pushing onto the stack), not the instruction at RIP: there
    // is no instruction to emulate, and a guest whose IDT, GDT or stack lies in device memory
    // cannot take the event. Keel stops it rather than guess.
    if cx.vmcs.read(ReadOnly32::IdtVectoringInfo) & (1 << 31) != 0 {
        return Action::Stop(StopReason::Killed(format!(
            "event delivery touched guest-physical {gpa:#x}, which is {} (IDT, GDT or stack outside RAM)",
            if cx.vm.platform.claims_mmio(gpa) { "device memory" } else { "neither RAM nor a device" }
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
    if cx.vm.platform.claims_mmio(gpa) && !q.contains(EptViolationQualification::FETCH) {
        return crate::mmio::emulate(cx, gpa);
    }
    // The page after the xAPIC page, while that one is mapped for APIC virtualization: an access
    // that starts on the APIC page and runs past its end (`mmio::emulate_spill`).
    let apic_page = cx.vm.platform.board().lapic_base;
    if gpa == apic_page + 0x1000
        && cx
            .vcpu
            .apicv
            .as_ref()
            .is_some_and(|a| a.features().virtualize_apic_accesses)
        && !q.contains(EptViolationQualification::FETCH)
    {
        return crate::mmio::emulate_spill(cx, gpa);
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
        cx.vm.name
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
mod balloon_tests {
    use crate::balloon::{apply, check, fake::FakePool, Op};
    use crate::ept::{Ept, EptPerms, FakeTables, MemType};
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::guest::StopReason;
    use crate::vmx::{ExitReason, ReadOnly64, VmcsAccess, VmcsField};

    /// A guest that touches a page it gave back is stopped, and says so; its other pages, and
    /// addresses past its RAM, keep their own outcomes.
    #[test]
    fn touching_a_given_page_stops_the_guest() {
        let mut t = TestBed::new();
        let (hpa, len) = (t.vm.ram.hpa, t.vm.ram.len());
        let mut ept = Ept::new(FakeTables::new(), false).unwrap();
        ept.map(0, hpa, len, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let req = check(Op::Give, 0x5000, 1, &t.vm.ram).unwrap();
        let out = apply(req, &mut t.vm.ram, &mut ept, &mut FakePool::new());
        assert_eq!(out.status, 0);
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), 0x5008);
        t.set_qualification(2); // a write
        match t.run(ExitReason::EptViolation) {
            Action::Stop(StopReason::Killed(why)) => assert_eq!(
                why,
                "wrote guest-physical 0x5008, a page it gave back (BALLOON_GIVE)"
            ),
            other => panic!("{other:?}"),
        }
        let past = t.vm.ram.len() + 0x5008;
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), past);
        assert_eq!(
            t.run(ExitReason::EptViolation),
            Action::Stop(StopReason::BadMemoryAccess {
                gpa: past,
                write: true
            })
        );
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

#[cfg(test)]
mod code_size_tests {
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::vmx::{
        ExitReason, Guest32, Guest64, GuestNat, ReadOnly64, Vmcs, VmcsAccess, VmcsField,
    };

    const TPR: u64 = 0xfee0_0080;

    /// An EPT violation at `gpa` (a write or a read) by the instruction at CS:IP, which is
    /// placed in RAM first.
    fn mmio_exit(t: &mut TestBed, gpa: u64, write: bool, code: &[u8]) -> Action {
        let la = (t.vmcs.read(GuestNat::CsBase) + t.vmcs.read(GuestNat::Rip)) as usize;
        t.vm.ram.bytes()[la..la + code.len()].copy_from_slice(code);
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), gpa);
        // SDM Table 28-7: bit 0 read, bit 1 write, bits 7-8 linear address valid, translated.
        t.set_qualification(if write { 2 } else { 1 } | 3 << 7);
        t.run(ExitReason::EptViolation)
    }

    fn tpr(t: &mut TestBed) -> u64 {
        t.vm.platform.mmio_read(0, TPR, 4, 0).unwrap_or(u64::MAX)
    }

    /// SDM 17.2.4: a data breakpoint on an operand Keel emulated as an MMIO access traps after
    /// the instruction, as it would had the CPU made the access (before: no #DB at all).
    #[test]
    fn a_data_breakpoint_on_an_emulated_mmio_access_traps() {
        let mut t = TestBed::new();
        // Real mode, CS:IP = 0:0x100, DS base 0xfee00000 (a big-real-mode data segment).
        t.vmcs.write(GuestNat::Cr0, 0x10);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(Guest32::CsAccessRights, 0x9b);
        t.vmcs.write(GuestNat::Rip, 0x100);
        t.vmcs.write(GuestNat::DsBase, 0xfee0_0000);
        // DR0 = the TPR's linear address, L0, R/W0 = 11 (reads or writes), LEN0 = 4 bytes.
        t.host.dr = [TPR, 0, 0, 0];
        t.vmcs
            .write(GuestNat::Dr7, 0x400 | 1 | 0b11 << 16 | 0b11 << 18);
        // mov [0x80], ax (89 06 80 00): a 16-bit write of the TPR.
        assert_eq!(
            mmio_exit(&mut t, TPR, true, &[0x89, 0x06, 0x80, 0]),
            Action::AdvanceBy(4)
        );
        let b0 = crate::exits::debug::pending::ENABLED_BREAKPOINT | 1;
        assert_eq!(t.vmcs.read(GuestNat::PendingDebugExceptions), b0);
        // A write-only breakpoint (R/W0 = 01) does not see a read.
        t.vmcs.write(GuestNat::PendingDebugExceptions, 0);
        t.vmcs
            .write(GuestNat::Dr7, 0x400 | 1 | 0b01 << 16 | 0b11 << 18);
        t.vmcs.write(GuestNat::Rip, 0x100);
        assert_eq!(
            mmio_exit(&mut t, TPR, false, &[0x8b, 0x06, 0x80, 0]),
            Action::AdvanceBy(4)
        );
        assert_eq!(t.vmcs.read(GuestNat::PendingDebugExceptions), 0);
    }

    #[test]
    fn sixteen_bit_code_reaches_the_apic_with_32_bit_moves() {
        // Real mode (SDM 20.1: 16-bit operands and addresses), CS = 0x1000, IP = 0x100.
        let mut t = TestBed::new();
        t.real_mode(0x1_0000, 0x100);
        // mov dword [dword 0xfee00080], 0x20 (66 67 C7 05 disp32 imm32): 12 bytes, the whole
        // 32-bit value reaches the TPR.
        let store = [0x66, 0x67, 0xc7, 0x05, 0x80, 0, 0xe0, 0xfe, 0x20, 0, 0, 0];
        assert_eq!(mmio_exit(&mut t, TPR, true, &store), Action::AdvanceBy(12));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x10c);
        assert_eq!(tpr(&mut t), 0x20);
        // mov eax, [dword 0xfee00080] (66 67 8B 05 disp32): a 32-bit read, 8 bytes.
        t.vcpu.regs.rax = 0xffff_ffff_ffff_ffff;
        let load = [0x66, 0x67, 0x8b, 0x05, 0x80, 0, 0xe0, 0xfe];
        assert_eq!(mmio_exit(&mut t, TPR, false, &load), Action::AdvanceBy(8));
        assert_eq!(t.vcpu.regs.rax, 0x20);
        // mov [bx], eax (66 89 07) with EAX = 0x30, BX = 0x80, DS based at the APIC page: a
        // 32-bit store, 3 bytes.
        t.vmcs.write(GuestNat::DsBase, 0xfee0_0000);
        t.vcpu.regs.rbx = 0x80;
        t.vcpu.regs.rax = 0x30;
        assert_eq!(
            mmio_exit(&mut t, TPR, true, &[0x66, 0x89, 0x07]),
            Action::AdvanceBy(3)
        );
        assert_eq!(tpr(&mut t), 0x30);
        // mov ax, [0x80] (8B 06 disp16): a 16-bit read merges into AX.
        t.vcpu.regs.rax = 0xffff_ffff_ffff_0000;
        assert_eq!(
            mmio_exit(&mut t, TPR, false, &[0x8b, 0x06, 0x80, 0x00]),
            Action::AdvanceBy(4)
        );
        assert_eq!(t.vcpu.regs.rax, 0xffff_ffff_ffff_0030);
    }

    #[test]
    fn cs_l_counts_only_in_ia32e_mode() {
        // SDM 3.4.5: CS.L is meaningful only in IA-32e mode; a protected-mode guest with L set
        // and D clear runs 16-bit code, where 66 89 07 stores 32 bits.
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x11);
        t.vmcs.write(Guest64::Ia32Efer, 0);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(Guest32::CsAccessRights, 0x209b);
        t.vmcs.write(GuestNat::Rip, 0x100);
        t.vmcs.write(GuestNat::DsBase, 0xfee0_0000);
        t.vcpu.regs.rbx = 0x80;
        t.vcpu.regs.rax = 0x40;
        assert_eq!(
            mmio_exit(&mut t, TPR, true, &[0x66, 0x89, 0x07]),
            Action::AdvanceBy(3)
        );
        assert_eq!(tpr(&mut t), 0x40);
    }

    /// Protected mode without paging, 32-bit code, flat segments.
    fn flat32() -> TestBed {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x11);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(Guest32::CsAccessRights, 0xc09b);
        t.vmcs.write(GuestNat::Rip, 0x100);
        t
    }

    fn killed(a: Action) -> alloc::string::String {
        match a {
            Action::Stop(crate::guest::StopReason::Killed(why)) => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_access_that_crosses_into_the_apic_page_is_not_emulated_whole() {
        // mov [edi], eax with EDI = 0xfedffffe: two bytes below the APIC page, two on it. The
        // EPT violation names the APIC page's first byte; writing all four bytes there would
        // put EAX's low half into APIC offset 0 and lose the bytes for the page below.
        let mut t = flat32();
        t.vcpu.regs.rdi = 0xfedf_fffe;
        t.vcpu.regs.rax = 0x1122_3344;
        let why = killed(mmio_exit(&mut t, 0xfee0_0000, true, &[0x89, 0x07]));
        assert!(why.contains("cross a page boundary"), "{why}");
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x100);
    }

    #[test]
    fn an_instruction_whose_operand_is_not_the_faulting_address_is_not_emulated() {
        // The decoded operand (DS:[EBX+8] = 0xfee00048) is not at the page offset the CPU
        // reported (0x80): the bytes at RIP are not the instruction that faulted.
        let mut t = flat32();
        t.vcpu.regs.rbx = 0xfee0_0040;
        let why = killed(mmio_exit(&mut t, TPR, false, &[0x8b, 0x43, 0x08]));
        assert!(
            why.contains("0xfee00048") && why.contains("a Keel bug"),
            "{why}"
        );
        // With EBX = 0xfee00078 it is the TPR: emulated.
        t.vcpu.regs.rbx = 0xfee0_0078;
        assert_eq!(
            mmio_exit(&mut t, TPR, false, &[0x8b, 0x43, 0x08]),
            Action::AdvanceBy(3)
        );
    }
}
