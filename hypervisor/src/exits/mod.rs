//! VM-exit handling: one module per exit kind, one dispatcher, one place that advances RIP.
//!
//! A handler looks at the exit (through the [`Vmcs`] trait and the guest's saved registers) and
//! returns an [`Action`]; it never touches RIP or the VM-entry event fields itself. [`apply`] turns
//! the action into VMCS writes — advancing RIP by the exit's instruction length and clearing the
//! STI/MOV-SS blocking it leaves behind (SDM 25.4.2) — or queues the exception it asks for in the
//! guest's [`events::EventQueue`]; [`events::commit`] writes the one event the guest gets right
//! before the next VM entry. Those rules live in one spot each. Everything here runs against traits, so the host tests drive it with
//! `vmx::FakeVmcs` and a fake [`Host`].

pub mod apicv;
pub mod cpuid;
pub mod cr;
pub mod debug;
pub mod ept;
pub mod events;
pub mod fast;
pub mod hlt;
pub mod io;
pub mod msr;
pub mod simple;
pub mod task_switch;
pub mod vmcall;
pub mod xsetbv;

#[cfg(test)]
pub(crate) mod testing;

use crate::devices::TimerShot;
use crate::guest::{StopReason, Vcpu, Vm};
use crate::vmx::{ExitReason, Guest32, GuestNat, InterruptionInfo, ReadOnly32, ReadOnlyNat, Vmcs};
use alloc::format;

/// Services of the machine the handlers need, implemented by `arch` and faked in tests.
pub trait Host {
    /// The real CPU's CPUID.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// XCR0 bits this CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
    fn xcr0_supported(&self) -> u64;
    /// An interrupt that arrived for Keel while the guest ran (acknowledged on exit).
    fn host_interrupt(&mut self, vector: u8);
    /// An NMI caused the exit (a kick from another CPU): the host counts it (the NMI blocking the
    /// exit leaves, SDM Vol. 3C 27.1, was ended right after the exit, `arch::vmcs`).
    fn host_nmi(&mut self);
    /// Sets the guest's CR2 (for an injected #PF). VMX does not switch CR2 (SDM 28.3): the
    /// value in the CPU at VM entry is the guest's.
    fn set_guest_cr2(&mut self, value: u64);
    /// The guest's DR0-DR3: VMX does not switch them, Keel does with the guest (`debug`), so the
    /// CPU's are the guest's while it is loaded.
    fn breakpoint_addresses(&self) -> [u64; 4];
}

/// A hardware exception to deliver to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
}

impl Exception {
    pub const UD: Exception = Exception {
        vector: 6,
        error_code: None,
    };
    pub const GP0: Exception = Exception {
        vector: 13,
        error_code: Some(0),
    };
}

/// What should happen after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Re-enter at the same instruction (it was not executed, or it is to be retried).
    Resume,
    /// The instruction was emulated: skip it.
    Advance,
    /// Skip an instruction whose length Keel decoded itself (exits that are not
    /// instruction-caused, such as EPT violations, report no length: SDM 28.2.4).
    AdvanceBy(u8),
    /// Deliver an exception with fault semantics (RIP stays on the instruction).
    Inject(Exception),
    /// HLT was executed: skip it and block until an interrupt is pending.
    Halt,
    /// Skip the instruction and give up the rest of the time slice.
    Yield,
    /// The time slice is over (preemption timer): re-enter later at the same RIP.
    Preempted,
    Stop(StopReason),
}

/// Everything a handler may look at or change.
pub struct ExitContext<'a, V: Vmcs + ?Sized> {
    pub vmcs: &'a mut V,
    /// The vCPU that exited.
    pub vcpu: &'a mut Vcpu,
    /// What it shares with the guest's other vCPUs (RAM, platform, clock).
    pub vm: &'a mut Vm,
    pub host: &'a mut dyn Host,
    /// The guest's virtual TSC at the exit.
    pub now: u64,
}

/// Reads the exit reason (SDM 25.9.1) and runs its handler: [`handle`] for the test bed and
/// whoever does not hold the exit reason yet.
#[inline]
pub fn dispatch<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let raw = cx.vmcs.read(ReadOnly32::ExitReason);
    handle(cx, raw, ExitReason::from_basic(raw as u16))
}

/// Runs the handler of an exit whose exit-reason field reads `raw` (the run loop reads it once
/// and decodes its basic reason, `reason`, once, for this and for its own decisions).
#[inline]
pub fn handle<V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    raw: u32,
    reason: ExitReason,
) -> Action {
    let basic = (raw & 0xffff) as usize;
    cx.vcpu.stats.count_exit(basic as u16);
    if raw & (1 << 31) != 0 {
        // SDM 27.8: a VM-entry failure is reported as an exit with bit 31 set.
        let qual = cx.vmcs.read(ReadOnlyNat::ExitQualification);
        return Action::Stop(StopReason::EntryFailed(format!(
            "{} (exit reason {raw:#x}, qualification {qual:#x})",
            crate::vmx::EntryFailure::from_exit(raw, qual)
        )));
    }
    // The model needs the guest's TPR only where the platform is consulted: the run loop takes
    // it before it looks at the platform after the other exits (a timer that fell due).
    let x2apic_read = reason == ExitReason::Rdmsr && msr::reads_the_apic(cx.vcpu.regs.rcx as u32);
    if may_touch_platform(reason) || x2apic_read {
        apicv::after_exit(&*cx.vmcs, cx.vcpu, cx.vm);
    } else {
        apicv::leave_vtpr(cx.vcpu);
    }
    if may_interrupt_delivery(reason) {
        requeue_interrupted_event(cx.vmcs, cx.vcpu);
    }
    match reason {
        ExitReason::ExternalInterrupt => {
            let info = InterruptionInfo(cx.vmcs.read(ReadOnly32::ExitInterruptionInfo));
            if info.raw() & (1 << 31) != 0 {
                cx.host.host_interrupt(info.vector());
            }
            Action::Resume
        }
        ExitReason::ExceptionOrNmi => {
            // The exception bitmap is empty, so this is an NMI that arrived while the guest ran
            // ("NMI exiting", SDM 25.2): it belongs to the machine, not the guest; it is another
            // CPU's kick (`arch::smp::kick`), which the run loop sees as it sees the fixed-IPI
            // kick's external-interrupt exit (its `kicked`, set under its lock).
            let info = InterruptionInfo(cx.vmcs.read(ReadOnly32::ExitInterruptionInfo));
            if info.kind() == crate::vmx::InterruptionType::Nmi {
                cx.host.host_nmi();
                Action::Resume
            } else {
                Action::Stop(StopReason::Killed(format!(
                    "unexpected exception exit, vector {}",
                    info.vector()
                )))
            }
        }
        ExitReason::TripleFault => Action::Stop(StopReason::TripleFault),
        ExitReason::InterruptWindow | ExitReason::NmiWindow => Action::Resume,
        ExitReason::Cpuid => cpuid::handle(cx),
        ExitReason::Hlt => hlt::handle(cx),
        ExitReason::IoInstruction => io::handle(cx),
        ExitReason::Vmcall => vmcall::handle(cx),
        ExitReason::ControlRegisterAccess => cr::handle(cx),
        ExitReason::Rdmsr => msr::read(cx),
        ExitReason::Wrmsr => msr::write(cx),
        ExitReason::Rdpmc => msr::rdpmc(cx),
        ExitReason::Xsetbv => xsetbv::handle(cx),
        ExitReason::EptViolation => ept::violation(cx),
        ExitReason::EptMisconfiguration => ept::misconfiguration(cx),
        ExitReason::ApicAccess => apicv::access(cx),
        ExitReason::TprBelowThreshold => Action::Resume,
        ExitReason::VirtualizedEoi => apicv::virtualized_eoi(cx),
        ExitReason::ApicWrite => apicv::apic_write(cx),
        ExitReason::PreemptionTimer => Action::Preempted,
        ExitReason::Invd | ExitReason::Wbinvd => simple::cache_flush(cx),
        r if simple::is_vmx_instruction(r) => Action::Inject(Exception::UD),
        ExitReason::Getsec | ExitReason::Monitor | ExitReason::Mwait => {
            Action::Inject(Exception::UD)
        }
        ExitReason::Pause => Action::Advance,
        ExitReason::TaskSwitch => task_switch::handle(cx),
        other => {
            let qual = cx.vmcs.read(ReadOnlyNat::ExitQualification);
            Action::Stop(StopReason::Killed(format!(
                "unhandled exit {other} (qualification {qual:#x})"
            )))
        }
    }
}

/// Whether handling an exit of this kind may have changed the guest's virtual platform (device
/// registers, pending interrupts, timers) or needs it re-checked (an interrupt window opened).
/// The run loop skips all device work after the others.
#[inline]
pub fn may_touch_platform(reason: ExitReason) -> bool {
    !matches!(
        reason,
        ExitReason::Cpuid
            | ExitReason::Vmcall
            | ExitReason::Xsetbv
            | ExitReason::Rdmsr
            | ExitReason::Invd
            | ExitReason::Wbinvd
            | ExitReason::Pause
            | ExitReason::Getsec
            | ExitReason::Monitor
            | ExitReason::Mwait
    ) && !simple::is_vmx_instruction(reason)
}

/// Whether the exit just handled may have changed the guest's platform (see
/// [`may_touch_platform`]), refined by what it did: a port access that changed nothing beyond
/// its device's registers (`Platform::take_ports_quiet`) and a WRMSR of an MSR that does not
/// reach the platform ([`msr::write_reaches_platform`]) count as untouched, so that the run
/// loop skips the interrupt check and the deadlines after them.
#[inline]
pub fn touched_platform(reason: ExitReason, vcpu: &Vcpu, vm: &mut Vm) -> bool {
    match reason {
        ExitReason::IoInstruction => !vm.platform.take_ports_quiet(),
        ExitReason::Wrmsr => msr::write_reaches_platform(vcpu.regs.rcx as u32),
        r => may_touch_platform(r),
    }
}

/// Carries out an action's effect on the VMCS (RIP) and on the guest's event queue (an exception
/// to deliver); the scheduling part of the action is the run loop's.
#[inline]
pub fn apply<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu, action: &Action) {
    match action {
        Action::Halt => {
            let len = vmcs.read(ReadOnly32::ExitInstructionLength) as u64;
            advance_rip(vmcs, len)
        }
        Action::Advance | Action::Yield => complete(vmcs, vcpu),
        Action::AdvanceBy(len) => {
            advance_rip(vmcs, *len as u64);
            complete_instruction(vmcs, vcpu);
        }
        Action::Inject(e) => vcpu.events.exception(*e),
        Action::Resume | Action::Preempted | Action::Stop(_) => {}
    }
}

/// [`Action::Advance`]'s part of [`apply`]: the instruction that caused the exit is completed
/// (RIP past it, STI/MOV-SS blocking ended, RF cleared, the single-step trap queued). For a
/// caller that knows its action is `Advance` (`fast`), without the match on an [`Action`] in
/// memory and the check of whether it owns a string to drop (about 15 instructions an exit).
#[inline(always)]
pub fn complete<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu) {
    let len = vmcs.read(ReadOnly32::ExitInstructionLength) as u64;
    advance_rip(vmcs, len);
    complete_instruction(vmcs, vcpu);
}

/// What completing an instruction does to RFLAGS beyond RIP, which Keel must reproduce for one it
/// emulated:
/// - it clears RF (SDM 17.3.1.1). An EPT-violation exit saves RF = 1, the instruction being
///   restartable (SDM 28.3.3); left set, the next instruction's instruction breakpoint would be
///   missed. Instruction-caused exits save RF = 0.
/// - with TF = 1 (and DEBUGCTL.BTF = 0, which steps branches only), a single-step #DB trap follows
///   it, DR6.BS set (SDM 17.3.1.4). HLT is left out: its trap waits for the halt to end.
#[inline(always)]
fn complete_instruction<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu) {
    let rflags = vmcs.read(GuestNat::Rflags);
    if rflags & RFLAGS_RF != 0 {
        vmcs.write(GuestNat::Rflags, rflags & !RFLAGS_RF);
    }
    if rflags & RFLAGS_TF != 0 && vmcs.read(crate::vmx::Guest64::Ia32Debugctl) & DEBUGCTL_BTF == 0 {
        vcpu.events.debug_trap(PENDING_DEBUG_BS);
    }
}

/// Skips the instruction that caused the exit. SDM 28.2.4: the VM-exit instruction length is valid
/// for the instruction-caused exits Keel emulates. Executing an instruction also ends blocking by
/// STI and by MOV SS (SDM 25.4.2 / 26.6.6.1), which emulation must reproduce. (The single-step
/// trap it owes is `complete_instruction`'s.)
#[inline]
pub fn advance_rip<V: Vmcs + ?Sized>(vmcs: &mut V, len: u64) {
    let rip = vmcs.read(GuestNat::Rip);
    vmcs.write(GuestNat::Rip, rip.wrapping_add(len));
    let blocking = vmcs.read(Guest32::InterruptibilityState);
    if blocking & 0b11 != 0 {
        vmcs.write(Guest32::InterruptibilityState, blocking & !0b11);
    }
}

/// RFLAGS.TF, RFLAGS.IF and RFLAGS.RF (SDM Vol. 1 3.4.3).
pub(crate) const RFLAGS_TF: u64 = 1 << 8;
pub(crate) const RFLAGS_IF: u64 = 1 << 9;
pub(crate) const RFLAGS_RF: u64 = 1 << 16;
const DEBUGCTL_BTF: u64 = 1 << 1;
/// Pending debug exceptions bit 14: single step (SDM 25.4.2, Table 25-4).
const PENDING_DEBUG_BS: u64 = 1 << 14;

/// Exits that can happen while the CPU delivers an event through the guest's IDT, the only ones
/// whose IDT-vectoring information can be valid (SDM 28.2.4): instruction-caused exits such as
/// CPUID or VMCALL never are, and skip the VMREAD.
#[inline]
pub fn may_interrupt_delivery(reason: ExitReason) -> bool {
    matches!(
        reason,
        ExitReason::ExceptionOrNmi
            | ExitReason::ExternalInterrupt
            | ExitReason::TripleFault
            | ExitReason::NmiWindow
            | ExitReason::TaskSwitch
            | ExitReason::EptViolation
            | ExitReason::EptMisconfiguration
            | ExitReason::ApicAccess
            | ExitReason::PreemptionTimer
            | ExitReason::InitSignal
    )
}

/// Re-queues an event whose delivery was cut short by the exit (SDM 28.2.4 "Information for VM
/// exits during event delivery") in the guest's event queue. Call before handling the exit: an
/// exception the handler raises then arose during that delivery, and the queue combines the two
/// (SDM 6.15) instead of one replacing the other.
#[inline]
pub fn requeue_interrupted_event<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu) {
    let idt = InterruptionInfo(vmcs.read(ReadOnly32::IdtVectoringInfo));
    if !idt.valid() {
        return;
    }
    let code = if idt.has_error_code() {
        vmcs.read(ReadOnly32::IdtVectoringErrorCode)
    } else {
        0
    };
    // SDM 28.2.5: for a software interrupt or exception the exit's instruction length is that of
    // the INT n / INT3 / INTO / INT1 whose delivery was interrupted.
    let len = if idt.kind().needs_instruction_length() {
        vmcs.read(ReadOnly32::ExitInstructionLength)
    } else {
        0
    };
    vcpu.events.interrupted(idt, code, len);
}

/// After the guest's platform may have changed: requests the NMI its local APIC holds, and queues
/// its highest-priority pending interrupt if it can take one now (RFLAGS.IF = 1, no STI/MOV-SS
/// blocking, no exception or NMI going in at this entry), otherwise asks for an interrupt-window
/// exit so Keel gets back the moment it can (SDM 26.7.5, 27.2.1.3). [`events::commit`] then
/// writes it.
pub fn inject_pending_interrupt<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu, vm: &mut Vm) {
    use crate::vmx::controls::PrimaryControls;
    use crate::vmx::Control32;
    if vm.platform.take_nmi(vcpu.index) {
        vcpu.events.nmi();
    }
    let window = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
    let primary = vmcs.read(Control32::PrimaryProcBasedControls);
    let held = vcpu.events.held_interrupt();
    // With virtual-interrupt delivery the local APIC's interrupts are posted to the CPU
    // (`apicv::before_entry`), which delivers them itself: only the 8259A's are injected.
    let posted = apicv::delivers_interrupts(vcpu);
    let pending = || {
        if posted {
            vm.platform.pending_pic_interrupt(vcpu.index)
        } else {
            vm.platform.pending_interrupt(vcpu.index)
        }
    };
    let want_window = match held.or_else(pending) {
        None => false,
        // An event of the queue, or a debug trap already pending in the VMCS (an I/O breakpoint
        // of an emulated instruction), comes first and would be lost to an injection.
        Some(_) if vcpu.events.claims_entry(vmcs) || debug::trap_pending(vmcs) => true,
        Some(vector) => {
            if open_to_interrupts(vmcs) {
                if held.is_some() {
                    vcpu.events.take_held_interrupt();
                } else if posted {
                    vm.platform.acknowledge_pic(vcpu.index, vector);
                } else {
                    vm.platform.acknowledge(vcpu.index, vector);
                }
                vcpu.events.interrupt(vector);
                vcpu.stats.interrupts_injected += 1;
                false
            } else {
                true
            }
        }
    };
    let new = if want_window {
        primary | window
    } else {
        primary & !window
    };
    if new != primary {
        vmcs.write(Control32::PrimaryProcBasedControls, new);
    }
}

/// Without virtual-interrupt delivery, whether the guest's state lets the LAPIC timer's expiry
/// be injected the short way at the entry after its VMX-preemption-timer exit (the run loop's
/// `exits::apicv::timer_may_fire`): nothing in the event queue or held (the general look would
/// deliver that first, or wait for a window), no debug trap pending in the VMCS, the 8259A's
/// output down, no interrupt window asked for (the general look would clear the bit), and the
/// guest open to an external interrupt (RFLAGS.IF = 1, no blocking by STI or MOV SS: SDM
/// 27.3.1.5). What the APIC holds is checked when the timer fires
/// ([`inject_timer_now`]). None of it depends on the time: it is told before the run loop
/// waits for the deadline.
#[inline]
pub(crate) fn timer_may_inject<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu, vm: &Vm) -> bool {
    vcpu.events.quiet()
        && vm.platform.pic_output_down()
        && !window_asked(vmcs)
        && open_to_interrupts(vmcs)
        && !debug::trap_pending(vmcs)
}

/// Whether the guest can take an external interrupt at the next entry: RFLAGS.IF = 1 and no
/// blocking by STI or MOV SS (SDM 27.3.1.5).
#[inline(always)]
fn open_to_interrupts<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    vmcs.read(GuestNat::Rflags) & RFLAGS_IF != 0
        && vmcs.read(Guest32::InterruptibilityState) & 0b11 == 0
}

/// Whether interrupt-window exiting is on for the guest: an interrupt waits for the window
/// (SDM 26.7.5).
#[inline(always)]
pub(crate) fn window_asked<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    use crate::vmx::controls::PrimaryControls;
    use crate::vmx::Control32;
    let window = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
    vmcs.read(Control32::PrimaryProcBasedControls) & window != 0
}

/// The LAPIC timer's injected short way once [`timer_may_inject`] said yes: the timer fires as
/// `shot` worked it out and its vector, accepted by the APIC at once
/// (`Platform::fire_shot_injected`), is queued for the entry, what `Platform::advance` and
/// [`inject_pending_interrupt`] make of the same state (a unit test compares the two over
/// random timer set-ups). False, nothing done, when the platform is not as the shot found it:
/// the general look is then the way.
#[inline]
pub(crate) fn inject_timer_now(vcpu: &mut Vcpu, vm: &mut Vm, now: u64, shot: &TimerShot) -> bool {
    let Some(vector) = vm.platform.fire_shot_injected(vcpu.index, now, shot) else {
        return false;
    };
    vcpu.events.interrupt(vector);
    vcpu.stats.interrupts_injected += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::vmx::{Control32, ReadOnly64, VmcsAccess, VmcsField};

    #[test]
    fn vmx_instructions_raise_ud_and_rip_stays() {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Rip, 0x5000);
        for r in [
            ExitReason::Vmxon,
            ExitReason::Vmread,
            ExitReason::Invept,
            ExitReason::Vmlaunch,
        ] {
            assert_eq!(t.run(r), Action::Inject(Exception::UD));
            assert_eq!(t.enter(), Ok(()));
            let info = InterruptionInfo(t.vmcs.read(Control32::EntryInterruptionInfo));
            assert_eq!((info.vector(), info.raw() >> 31), (6, 1));
            assert_eq!(
                t.vmcs.read(GuestNat::Rip),
                0x5000,
                "faults do not advance RIP"
            );
        }
        assert_eq!(t.vcpu.stats.exceptions_injected, 4);
    }

    /// Which exits make the run loop look at the platform again: a WRMSR only of the MSRs that
    /// reach it, an I/O exit only when its access changed something beyond its device.
    #[test]
    fn exits_that_leave_the_platform_alone_say_so() {
        use super::msr::index;
        let mut t = TestBed::new();
        assert!(!touched_platform(ExitReason::Cpuid, &t.vcpu, &mut t.vm));
        assert!(touched_platform(ExitReason::Hlt, &t.vcpu, &mut t.vm));
        for (msr, reaches) in [
            (index::MTRR_DEF_TYPE, false),
            (index::MISC_ENABLE, false),
            (index::EFER, false),
            (index::TSC_DEADLINE, true),
            (index::APIC_BASE, true),
            (index::TSC, true),
            (0x808, true), // the x2APIC TPR
        ] {
            t.vcpu.regs.rcx = u64::from(msr);
            assert_eq!(
                touched_platform(ExitReason::Wrmsr, &t.vcpu, &mut t.vm),
                reaches,
                "MSR {msr:#x}"
            );
        }
        t.vm.platform.take_ports_quiet();
        t.vm.platform.io_write(0x3ff, 1, 1, 0);
        assert!(!touched_platform(
            ExitReason::IoInstruction,
            &t.vcpu,
            &mut t.vm
        ));
        // A console byte drives no line and moves no timer: the run loop prints the lines
        // (`Platform::take_console_written`) without a look.
        t.vm.platform.io_write(0x3f8, 1, u32::from(b'x'), 0);
        assert!(!touched_platform(
            ExitReason::IoInstruction,
            &t.vcpu,
            &mut t.vm
        ));
        assert!(t.vm.platform.take_console_written());
        // The 8259A's mask register: a change.
        t.vm.platform.io_write(0x21, 1, 0xff, 0);
        assert!(touched_platform(
            ExitReason::IoInstruction,
            &t.vcpu,
            &mut t.vm
        ));
    }

    #[test]
    fn outcomes_that_stop_only_the_guest() {
        let mut t = TestBed::new();
        assert_eq!(
            t.run(ExitReason::TripleFault),
            Action::Stop(StopReason::TripleFault)
        );
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), 0x4000_0000);
        t.set_qualification(0b10); // a write
        assert_eq!(
            t.run(ExitReason::EptViolation),
            Action::Stop(StopReason::BadMemoryAccess {
                gpa: 0x4000_0000,
                write: true
            })
        );
        t.set_qualification(0x1234);
        match t.run(ExitReason::Rdtsc) {
            Action::Stop(StopReason::Killed(why)) => {
                assert!(why.contains("RDTSC") && why.contains("0x1234"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn entry_failures_are_decoded() {
        let mut t = TestBed::new();
        t.vmcs
            .write_raw(ReadOnly32::ExitReason.encoding(), (1 << 31) | 33);
        let mut cx = ExitContext {
            vmcs: &mut t.vmcs,
            vcpu: &mut t.vcpu,
            vm: &mut t.vm,
            host: &mut t.host,
            now: 0,
        };
        match dispatch(&mut cx) {
            Action::Stop(StopReason::EntryFailed(why)) => {
                assert!(why.to_lowercase().contains("guest state"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nmis_go_to_keel() {
        let mut t = TestBed::new();
        t.vmcs.write_raw(
            ReadOnly32::ExitInterruptionInfo.encoding(),
            InterruptionInfo::nmi().raw() as u64,
        );
        assert_eq!(t.run(ExitReason::ExceptionOrNmi), Action::Resume);
        assert_eq!(t.host.nmis, 1);
    }

    #[test]
    fn host_interrupts_go_to_keel_and_the_guest_resumes() {
        let mut t = TestBed::new();
        t.vmcs.write_raw(
            ReadOnly32::ExitInterruptionInfo.encoding(),
            InterruptionInfo::external(0x30).raw() as u64,
        );
        assert_eq!(t.run(ExitReason::ExternalInterrupt), Action::Resume);
        assert_eq!(t.host.interrupts, [0x30]);
    }

    #[test]
    fn pending_interrupts_are_injected_or_wait_for_a_window() {
        let mut t = TestBed::new();
        t.raise_pit_irq0();
        assert!(t.vm.platform.pending_interrupt(0).is_some());
        // IF = 0: no injection, interrupt-window exiting armed.
        t.vmcs.write(GuestNat::Rflags, 0x2);
        assert_eq!(t.enter(), Ok(()));
        let window = crate::vmx::controls::PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        assert_ne!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        assert_eq!(t.vmcs.read(Control32::EntryInterruptionInfo) >> 31, 0);
        // IF = 1: injected as an external interrupt at the PIC's vector, window disarmed.
        t.vmcs.write(GuestNat::Rflags, 0x202);
        assert_eq!(t.enter(), Ok(()));
        let info = InterruptionInfo(t.vmcs.read(Control32::EntryInterruptionInfo));
        assert_eq!((info.vector(), info.raw() >> 31), (0x20, 1));
        assert_eq!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        assert_eq!(t.vcpu.stats.interrupts_injected, 1);
    }

    const RF: u64 = 1 << 16;
    const PF: u8 = 14;

    /// The entry's injection: (interruption information, error code if delivered).
    fn injected(t: &TestBed) -> (u32, Option<u32>) {
        let info = t.vmcs.read(Control32::EntryInterruptionInfo);
        let code = (info & (1 << 11) != 0).then(|| t.vmcs.read(Control32::EntryExceptionErrorCode));
        (info, code)
    }

    /// An exit (the preemption timer) that interrupted the delivery of `event`, as the processor
    /// reports it in the IDT-vectoring fields (SDM 28.2.4).
    fn exit_during_delivery(t: &mut TestBed, event: InterruptionInfo, error_code: u32) {
        t.vmcs
            .write_raw(ReadOnly32::IdtVectoringInfo.encoding(), event.raw() as u64);
        t.vmcs.write_raw(
            ReadOnly32::IdtVectoringErrorCode.encoding(),
            error_code as u64,
        );
        assert_eq!(t.run(ExitReason::PreemptionTimer), Action::Preempted);
        t.vmcs.write_raw(ReadOnly32::IdtVectoringInfo.encoding(), 0);
    }

    /// A handler raised `e` while the exit's IDT-vectoring event was pending.
    fn raise(t: &mut TestBed, e: Exception) {
        apply(&mut t.vmcs, &mut t.vcpu, &Action::Inject(e));
    }

    #[test]
    fn a_page_fault_or_contributory_fault_while_delivering_one_is_a_double_fault() {
        // SDM 6.15, Table 6-5: page fault then page fault, page fault then contributory,
        // contributory then contributory -> #DF with error code 0.
        for (first, code, second) in [
            (
                PF,
                2,
                Exception {
                    vector: PF,
                    error_code: Some(0),
                },
            ),
            (PF, 2, Exception::GP0),
            (11, 0x18, Exception::GP0),
        ] {
            let mut t = TestBed::new();
            t.long_mode();
            t.vmcs.write(GuestNat::Cr0, 0x8000_0011);
            exit_during_delivery(
                &mut t,
                InterruptionInfo::hardware_exception(first, true),
                code,
            );
            raise(&mut t, second);
            assert_eq!(t.enter(), Ok(()));
            assert_eq!(
                injected(&t),
                (0x8000_0b08, Some(0)),
                "{first} then {second:?}"
            );
        }
    }

    #[test]
    fn a_fault_while_delivering_a_double_fault_is_a_triple_fault() {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x11);
        exit_during_delivery(&mut t, InterruptionInfo::hardware_exception(8, true), 0);
        raise(&mut t, Exception::GP0);
        assert_eq!(t.enter(), Err(StopReason::TripleFault));
        assert_eq!(t.vmcs.read(Control32::EntryInterruptionInfo) >> 31, 0);
    }

    #[test]
    fn serial_cases_deliver_the_second_exception_and_lose_no_interrupt() {
        // SDM Table 6-5: contributory then page fault, page fault then benign, benign then
        // anything: handled serially. The second exception is delivered; a first one that is an
        // exception recurs when its instruction runs again, so it is dropped.
        for (first, second, want) in [
            (
                13u8,
                Exception {
                    vector: PF,
                    error_code: Some(2),
                },
                (0x8000_0b0e, Some(2)),
            ),
            (PF, Exception::UD, (0x8000_0306, None)),
            (6, Exception::GP0, (0x8000_0b0d, Some(0))),
        ] {
            let mut t = TestBed::new();
            t.vmcs.write(GuestNat::Cr0, 0x11);
            let has_code = crate::vmx::exit::exception_has_error_code(first);
            exit_during_delivery(
                &mut t,
                InterruptionInfo::hardware_exception(first, has_code),
                0,
            );
            raise(&mut t, second);
            assert_eq!(t.enter(), Ok(()));
            assert_eq!(injected(&t), want, "{first} then {second:?}");
        }
        // An external interrupt in flight is not raised again by re-executing anything: it is
        // delivered after the exception, once the guest can take interrupts again.
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x11);
        t.vmcs.write(GuestNat::Rflags, 0x202);
        exit_during_delivery(&mut t, InterruptionInfo::external(0x30), 0);
        raise(&mut t, Exception::GP0);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0b0d, Some(0)));
        // The #GP handler runs with IF = 0 (an interrupt gate); an interrupt-window exit brings
        // Keel back when it sets IF again.
        let window = crate::vmx::controls::PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        assert_ne!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        t.vmcs.write(GuestNat::Rflags, 0x202);
        t.run(ExitReason::InterruptWindow);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0030, None));
        t.run(ExitReason::InterruptWindow);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t).0 >> 31, 0, "delivered once");
    }

    #[test]
    fn an_interrupted_event_is_delivered_again_as_it_was() {
        let mut t = TestBed::new();
        // INT 0x80 (2 bytes) interrupted: software interrupts keep their instruction length
        // (SDM 27.6.1.1, 28.2.4).
        t.set_instruction_length(2);
        exit_during_delivery(&mut t, InterruptionInfo::software_interrupt(0x80), 0);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0480, None));
        assert_eq!(t.vmcs.read(Control32::EntryInstructionLength), 2);
        assert_eq!(t.vmcs.read(GuestNat::Rflags) & RF, 0);
        // An NMI in flight: re-injected, and blocking by NMI (set when its delivery began) is
        // cleared first, or the entry fails (SDM 27.3.1.5).
        let mut t = TestBed::new();
        t.vmcs.write(Guest32::InterruptibilityState, 1 << 3);
        exit_during_delivery(&mut t, InterruptionInfo::nmi(), 0);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0202, None));
        assert_eq!(t.vmcs.read(Guest32::InterruptibilityState) & (1 << 3), 0);
    }

    #[test]
    fn injected_faults_set_rf_and_traps_and_interrupts_do_not() {
        // SDM 27.6.1.1: the RFLAGS pushed is the guest-state field's, RF unchanged; the CPU
        // itself sets RF in the image it pushes for a fault (SDM 17.3.1.1), so Keel must.
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x11);
        t.vmcs.write(GuestNat::Rflags, 0x2);
        assert_eq!(t.run(ExitReason::Vmxon), Action::Inject(Exception::UD));
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0306, None));
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x2 | RF);
        for e in [
            Exception::GP0,
            Exception {
                vector: PF,
                error_code: Some(4),
            },
        ] {
            t.vmcs.write(GuestNat::Rflags, 0x2);
            t.run(ExitReason::Cpuid);
            raise(&mut t, e);
            assert_eq!(t.enter(), Ok(()));
            assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x2 | RF, "{e:?}");
        }
        // A #DB trap (single step, I/O breakpoint): no RF.
        t.vmcs.write(GuestNat::Rflags, 0x2);
        t.run(ExitReason::Cpuid);
        raise(
            &mut t,
            Exception {
                vector: 1,
                error_code: None,
            },
        );
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0301, None));
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x2);
    }

    #[test]
    fn error_codes_only_where_the_entry_checks_allow_them() {
        let mut t = TestBed::new();
        // Real mode (CR0.PE = 0, unrestricted guest): no error code (SDM 27.2.1.3).
        t.vmcs.write(GuestNat::Cr0, 0x10);
        t.run(ExitReason::Cpuid);
        raise(&mut t, Exception::GP0);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_030d, None));
        // #UD never has one, whatever the handler asked.
        t.vmcs.write(GuestNat::Cr0, 0x11);
        t.run(ExitReason::Cpuid);
        raise(
            &mut t,
            Exception {
                vector: 6,
                error_code: Some(0),
            },
        );
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0306, None));
    }

    /// Writes the guest's xAPIC ICR (low half) as an MMIO store would.
    fn send_ipi(t: &mut TestBed, icr_low: u32) {
        assert!(t
            .vm
            .platform
            .mmio_write(0, 0xfee0_0300, 4, icr_low as u64, 0));
    }

    #[test]
    fn a_self_nmi_through_the_icr_is_injected_once() {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Rflags, 0x2);
        send_ipi(&mut t, 0x400); // delivery mode NMI, destination APIC 0 (its own)
        t.run(ExitReason::Pause);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0202, None));
        assert_eq!(t.vmcs.read(GuestNat::Rflags) & RF, 0);
        t.run(ExitReason::Cpuid);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t).0 >> 31, 0);
    }

    #[test]
    fn an_nmi_waits_while_nmis_are_blocked() {
        let mut t = TestBed::new();
        let virtual_nmis = crate::vmx::controls::PinBasedControls::VIRTUAL_NMIS.bits();
        let window = crate::vmx::controls::PrimaryControls::NMI_WINDOW_EXITING.bits();
        t.vmcs.write(Control32::PinBasedControls, virtual_nmis);
        t.vmcs.write(Guest32::InterruptibilityState, 1 << 3);
        send_ipi(&mut t, 0x400);
        t.run(ExitReason::Pause);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t).0 >> 31, 0, "blocked by NMI");
        assert_ne!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        // The guest's IRET ends the blocking: the NMI-window exit delivers it.
        t.vmcs.write(Guest32::InterruptibilityState, 0);
        t.run(ExitReason::NmiWindow);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0202, None));
        assert_eq!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
    }

    #[test]
    fn an_instruction_keel_completes_clears_rf() {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Rip, 0x1000);
        // What an EPT-violation exit saves (SDM 28.3.3); Keel emulates the MMIO access.
        t.vmcs.write(GuestNat::Rflags, 0x2 | RF);
        apply(&mut t.vmcs, &mut t.vcpu, &Action::AdvanceBy(3));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x1003);
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x2);
    }

    #[test]
    fn an_instruction_keel_completes_under_single_step_owes_a_debug_trap() {
        const BS: u64 = 1 << 14;
        let mut t = TestBed::new();
        let virtual_nmis = crate::vmx::controls::PinBasedControls::VIRTUAL_NMIS.bits();
        let nmi_window = crate::vmx::controls::PrimaryControls::NMI_WINDOW_EXITING.bits();
        t.vmcs.write(Control32::PinBasedControls, virtual_nmis);
        t.vmcs.write(GuestNat::Rip, 0x1000);
        t.set_instruction_length(2);
        t.vmcs.write(GuestNat::Rflags, 0x302); // TF, IF
        send_ipi(&mut t, 0x400); // an NMI is pending too
        assert_eq!(t.run(ExitReason::Cpuid), Action::Advance);
        assert_eq!(t.enter(), Ok(()));
        // SDM 17.3.1.4: a #DB trap after the instruction with DR6.BS set. Keel leaves it to the
        // CPU through the pending debug exceptions (SDM 27.7.3), which a vectoring entry would
        // lose: the NMI waits (the trap has priority, SDM 6.9) behind an NMI window.
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x1002);
        assert_eq!(t.vmcs.read(GuestNat::PendingDebugExceptions), BS);
        assert_eq!(injected(&t).0 >> 31, 0);
        assert_ne!(
            t.vmcs.read(Control32::PrimaryProcBasedControls) & nmi_window,
            0
        );
        // The CPU delivered the #DB (clearing the field, TF cleared by its interrupt gate); the
        // NMI-window exit delivers the NMI.
        t.vmcs.write(GuestNat::PendingDebugExceptions, 0);
        t.vmcs.write(GuestNat::Rflags, 0x2);
        t.run(ExitReason::NmiWindow);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0202, None));
        assert_eq!(t.vmcs.read(GuestNat::PendingDebugExceptions), 0);
        // An instruction that faults did not complete: no trap.
        t.vmcs.write(GuestNat::Rflags, 0x302);
        t.run(ExitReason::Vmxon);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), (0x8000_0306, None));
        assert_eq!(t.vmcs.read(GuestNat::PendingDebugExceptions), 0);
        // No TF, no trap.
        t.vmcs.write(GuestNat::Rflags, 0x202);
        t.run(ExitReason::Cpuid);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(t.vmcs.read(GuestNat::PendingDebugExceptions), 0);
    }
}

/// The LAPIC timer's injected short way (`timer_may_inject`, `inject_timer_now`, through the
/// run loop's `apicv::timer_may_fire` and `apicv::fire_timer_now`) against the general look.
#[cfg(test)]
mod inject_timer_tests {
    use super::testing::*;
    use super::*;
    use crate::devices::lapic::LAPIC_BASE;
    use crate::vmx::{Control32, Guest32};

    /// What the run loop does before an entry after an exit that touched the platform, or after
    /// a preemption exit the short way refused (`runloop::before_entry`), without APIC
    /// virtualization; the timer's expiry it works out for the short way.
    fn general_look(t: &mut TestBed, now: u64) -> Option<TimerShot> {
        t.vm.platform.advance(now);
        inject_pending_interrupt(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
        apicv::timer_shot(&t.vcpu, &t.vm)
    }

    fn saved(t: &TestBed) -> alloc::vec::Vec<u8> {
        let mut w = crate::state::Writer::new();
        t.vm.platform.save(&mut w);
        w.into_bytes()
    }

    fn mmio(t: &mut TestBed, offset: u64, value: u64, now: u64) {
        t.vm.platform
            .mmio_write(0, LAPIC_BASE + offset, 4, value, now);
    }

    /// Everything the guest can see or Keel goes on from: the VMCS fields, the model's saved
    /// state, its next deadline, its counters, the event queue and the vCPU's counters.
    fn assert_same(fast: &TestBed, slow: &TestBed, round: usize) {
        assert_eq!(fast.vmcs.fields, slow.vmcs.fields, "round {round}: VMCS");
        assert_eq!(saved(fast), saved(slow), "round {round}: model");
        assert_eq!(
            fast.vm.platform.next_deadline(),
            slow.vm.platform.next_deadline(),
            "round {round}"
        );
        assert_eq!(fast.vm.platform.stats(), slow.vm.platform.stats());
        assert_eq!(fast.vcpu.events, slow.vcpu.events, "round {round}");
        assert_eq!(
            fast.vcpu.stats.interrupts_injected, slow.vcpu.stats.interrupts_injected,
            "round {round}"
        );
    }

    /// Random timer set-ups (one-shot, periodic and TSC-deadline modes, masked or not, legal
    /// and illegal vectors, divide configurations, the APIC software-disabled, another vCPU's
    /// timer due at the same time), with what the guest does meanwhile (takes the injected
    /// interrupt or not, EOIs, TPR writes, self-IPIs, runs with IF = 0 or in an STI shadow, an
    /// NMI through the ICR): after every preemption-timer exit, the short way where it applies
    /// and the general look give the same VMCS, model, deadline, counters and events; and the
    /// short way is taken often enough for that to mean something. Now and then the fast bed
    /// keeps an expiry worked out before the timers changed: the short way must never fire
    /// from it.
    #[test]
    fn an_injected_timer_alone_ends_as_the_general_look() {
        for (seed, cpus) in [(0x2545_f491_4f6c_dd1d, 1), (0x6c8e_9cf5_7093_2bd5, 2)] {
            let mut rng = Rng(seed);
            let mut fast = TestBed::smp(cpus);
            let mut slow = TestBed::smp(cpus);
            let mut now = 1000;
            let mut shot = None;
            for t in [&mut fast, &mut slow] {
                t.enable_lapic();
                if cpus > 1 {
                    // vCPU 1's APIC enabled, its timer in TSC-deadline mode (vector 0x50).
                    t.vm.platform.mmio_write(1, LAPIC_BASE + 0xf0, 4, 0x1ff, 0);
                    t.vm.platform
                        .mmio_write(1, LAPIC_BASE + 0x320, 4, 2 << 17 | 0x50, 0);
                }
                shot = general_look(t, now);
                events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
            }
            let (mut short, mut stale_tries, mut masked) = (0, 0, 0);
            for round in 0..60_000 {
                let guest = rng.below(8);
                // With an expiry worked out, the timers are changed more often (the first
                // eight: its LVT entry, count, divide, TSC deadline, a self-IPI, the SVR).
                let platform = if shot.is_some() && rng.below(2) == 0 {
                    rng.below(8)
                } else {
                    rng.below(16)
                };
                let value = rng.next();
                let other = rng.next();
                let rflags = if rng.below(8) == 0 { 0x2 } else { 0x202 };
                let shadow = if rng.below(16) == 0 { 1 } else { 0 };
                let keep_stale = rng.below(2) == 0;
                let mut stale = false;
                let near = fast.vm.platform.next_deadline().unwrap_or(now);
                let other_at = (other.is_multiple_of(4) && cpus > 1)
                    .then(|| (near + (other >> 32) % 64).saturating_sub(32).max(1));
                for (bed, t) in [&mut fast, &mut slow].into_iter().enumerate() {
                    // The entry delivered what was injected (the valid bit is cleared at
                    // every exit, SDM 28.2.1)...
                    if guest != 0 {
                        t.vmcs.write(Control32::EntryInterruptionInfo, 0);
                    }
                    // ...and the guest ran, now and then with IF = 0 or in an STI shadow.
                    t.vmcs.write(GuestNat::Rflags, rflags);
                    t.vmcs.write(Guest32::InterruptibilityState, shadow);
                    let acted = match guest {
                        // The common case: the handler's EOI, before the platform's change.
                        1..=5 => {
                            mmio(t, 0xb0, 0, now);
                            true
                        }
                        _ => false,
                    };
                    let acted = acted
                        || match platform {
                            0..=3 => {
                                t.change_lapic_timer(platform, value, now);
                                true
                            }
                            4 | 5 => {
                                let at = random_deadline(value, now);
                                t.vm.platform.write_tsc_deadline(0, at, now);
                                true
                            }
                            6 => {
                                // A self-IPI, fixed (some vectors above the timer's, some
                                // below), or now and then an NMI.
                                let icr = match value % 8 {
                                    0 => 4 << 8,
                                    n => [0x40, 0x31, 0xe0, 0x20][(n % 4) as usize],
                                };
                                mmio(t, 0x300, 1 << 18 | icr, now);
                                true
                            }
                            7 => {
                                let svr = if value.is_multiple_of(7) { 0xff } else { 0x1ff };
                                mmio(t, 0xf0, svr, now);
                                true
                            }
                            8 => {
                                let tpr = [0, 0, 0, 0x20, 0x30, 0xf0][(value % 6) as usize];
                                mmio(t, 0x80, tpr, now);
                                true
                            }
                            9 if cpus > 1 => {
                                let at = match value % 3 {
                                    0 => 0,
                                    _ => now + (value >> 20) % 4000,
                                };
                                t.vm.platform.write_tsc_deadline(1, at, now);
                                true
                            }
                            _ => false,
                        };
                    if let Some(at) = other_at {
                        t.vm.platform.write_tsc_deadline(1, at, now);
                    }
                    if acted || other_at.is_some() {
                        let worked_out = general_look(t, now);
                        if bed == 0 {
                            if keep_stale && shot.is_some() {
                                stale = true;
                            } else {
                                shot = worked_out;
                            }
                        }
                        events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
                    }
                }
                assert_same(&fast, &slow, round);
                // The preemption timer brings the guest back: at its timer's deadline when one
                // is set and near, else a little later.
                now = match fast.vm.platform.next_deadline() {
                    Some(d) if d >= now && d - now < 5000 && rng.below(4) != 0 => d,
                    _ => now + rng.below(1500),
                };
                for t in [&mut fast, &mut slow] {
                    t.vmcs.write(Control32::EntryInterruptionInfo, 0);
                    fast::handle_preempted(&t.vmcs, &mut t.vcpu);
                }
                if rflags & RFLAGS_IF == 0 || shadow != 0 {
                    masked += 1;
                }
                let fired = shot.as_ref().is_some_and(|s| fast.fire_timer(now, s));
                if stale {
                    stale_tries += 1;
                    assert!(
                        !fired,
                        "round {round}: fired from an expiry worked out before"
                    );
                }
                if fired {
                    assert!(rflags & RFLAGS_IF != 0 && shadow == 0, "round {round}");
                    short += 1;
                    shot = None;
                } else {
                    shot = general_look(&mut fast, now);
                }
                general_look(&mut slow, now);
                for t in [&mut fast, &mut slow] {
                    events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
                }
                assert_same(&fast, &slow, round);
            }
            assert!(short > 300, "the short way taken {short} times");
            assert!(stale_tries > 20, "a stale expiry tried {stale_tries} times");
            assert!(masked > 1000, "the guest masked {masked} times");
        }
    }
}
