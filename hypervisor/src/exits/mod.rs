//! VM-exit handling: one module per exit kind, one dispatcher, one place that advances RIP.
//!
//! A handler looks at the exit (through the [`Vmcs`] trait and the guest's saved registers) and
//! returns an [`Action`]; it never touches RIP or the VM-entry event fields itself. [`apply`] turns
//! the action into VMCS writes — advancing RIP by the exit's instruction length and clearing the
//! STI/MOV-SS blocking it leaves behind (SDM 25.4.2), or injecting an exception — so those rules
//! live in one spot. Everything here runs against traits, so the host tests drive it with
//! `vmx::FakeVmcs` and a fake [`Host`].

pub mod cpuid;
pub mod cr;
pub mod ept;
pub mod hlt;
pub mod io;
pub mod msr;
pub mod simple;
pub mod vmcall;
pub mod xsetbv;

#[cfg(test)]
pub(crate) mod testing;

use crate::guest::{Guest, StopReason};
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
    /// An NMI that arrived while the guest ran.
    fn host_nmi(&mut self);
    /// Sets the guest's CR2 (for an injected #PF). VMX does not switch CR2 (SDM 28.3): the
    /// value in the CPU at VM entry is the guest's.
    fn set_guest_cr2(&mut self, value: u64);
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
    pub guest: &'a mut Guest,
    pub host: &'a mut dyn Host,
    /// The guest's virtual TSC at the exit.
    pub now: u64,
}

/// Decodes the exit reason and runs its handler.
#[inline]
pub fn dispatch<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let raw = cx.vmcs.read(ReadOnly32::ExitReason);
    let reason = crate::vmx::ExitReasonField::from_raw(raw).basic;
    let basic = (raw & 0xffff) as usize;
    cx.guest.stats.last_exit = basic as u16;
    if let Some(slot) = cx.guest.stats.exits.get_mut(basic) {
        *slot += 1;
    }
    if raw & (1 << 31) != 0 {
        // SDM 27.8: a VM-entry failure is reported as an exit with bit 31 set.
        let qual = cx.vmcs.read(ReadOnlyNat::ExitQualification);
        return Action::Stop(StopReason::EntryFailed(format!(
            "{} (exit reason {raw:#x}, qualification {qual:#x})",
            crate::vmx::EntryFailure::from_exit(raw, qual)
        )));
    }
    if may_interrupt_delivery(reason) {
        requeue_interrupted_event(cx.vmcs);
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
            // ("NMI exiting", SDM 25.2): it belongs to the machine, not the guest.
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
        ExitReason::PreemptionTimer => Action::Preempted,
        ExitReason::Invd | ExitReason::Wbinvd => simple::cache_flush(cx),
        r if simple::is_vmx_instruction(r) => Action::Inject(Exception::UD),
        ExitReason::Getsec | ExitReason::Monitor | ExitReason::Mwait => {
            Action::Inject(Exception::UD)
        }
        ExitReason::Pause => Action::Advance,
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

/// Carries out an action's effect on the VMCS (RIP, event injection); the scheduling part of the
/// action is the run loop's.
#[inline]
pub fn apply<V: Vmcs + ?Sized>(vmcs: &mut V, guest: &mut Guest, action: &Action) {
    match action {
        Action::Advance | Action::Halt | Action::Yield => {
            let len = vmcs.read(ReadOnly32::ExitInstructionLength) as u64;
            advance_rip(vmcs, len)
        }
        Action::AdvanceBy(len) => advance_rip(vmcs, *len as u64),
        Action::Inject(e) => {
            inject_exception(vmcs, *e);
            guest.stats.exceptions_injected += 1;
        }
        Action::Resume | Action::Preempted | Action::Stop(_) => {}
    }
}

/// Skips the instruction that caused the exit. SDM 28.2.4: the VM-exit instruction length is valid
/// for the instruction-caused exits Keel emulates. Executing an instruction also ends blocking by
/// STI and by MOV SS (SDM 25.4.2 / 26.6.6.1), which emulation must reproduce.
#[inline]
pub fn advance_rip<V: Vmcs + ?Sized>(vmcs: &mut V, len: u64) {
    let rip = vmcs.read(GuestNat::Rip);
    vmcs.write(GuestNat::Rip, rip.wrapping_add(len));
    let blocking = vmcs.read(Guest32::InterruptibilityState);
    if blocking & 0b11 != 0 {
        vmcs.write(Guest32::InterruptibilityState, blocking & !0b11);
    }
}

/// Queues a hardware exception for the next VM entry (SDM 26.6 "Event injection").
pub fn inject_exception<V: Vmcs + ?Sized>(vmcs: &mut V, e: Exception) {
    let info = InterruptionInfo::hardware_exception(e.vector, e.error_code.is_some());
    vmcs.write(crate::vmx::Control32::EntryInterruptionInfo, info.raw());
    if let Some(code) = e.error_code {
        vmcs.write(crate::vmx::Control32::EntryExceptionErrorCode, code);
    }
}

const RFLAGS_IF: u64 = 1 << 9;

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
/// exits during event delivery"; 27.2.3 allows entering with it in the injection field). Call
/// before handling the exit, so a handler's own injection wins only when nothing was in flight.
#[inline]
pub fn requeue_interrupted_event<V: Vmcs + ?Sized>(vmcs: &mut V) {
    use crate::vmx::Control32;
    let idt = vmcs.read(ReadOnly32::IdtVectoringInfo);
    if idt & (1 << 31) == 0 {
        return;
    }
    vmcs.write(Control32::EntryInterruptionInfo, idt & !(1 << 12));
    if idt & (1 << 11) != 0 {
        let code = vmcs.read(ReadOnly32::IdtVectoringErrorCode);
        vmcs.write(Control32::EntryExceptionErrorCode, code);
    }
    let len = vmcs.read(ReadOnly32::ExitInstructionLength);
    vmcs.write(Control32::EntryInstructionLength, len);
}

/// Before each VM entry: inject the guest's highest-priority pending interrupt if it can take one
/// now (RFLAGS.IF = 1, no STI/MOV-SS blocking, no event already queued), otherwise ask for an
/// interrupt-window exit so Keel gets back the moment it can (SDM 26.7.5, 27.2.1.3).
pub fn inject_pending_interrupt<V: Vmcs + ?Sized>(vmcs: &mut V, guest: &mut Guest) {
    use crate::vmx::controls::PrimaryControls;
    use crate::vmx::Control32;
    let window = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
    let primary = vmcs.read(Control32::PrimaryProcBasedControls);
    let queued = vmcs.read(Control32::EntryInterruptionInfo) & (1 << 31) != 0;
    let want_window = match guest.platform.pending_interrupt() {
        None => false,
        Some(_) if queued => true,
        Some(vector) => {
            let open = vmcs.read(GuestNat::Rflags) & RFLAGS_IF != 0
                && vmcs.read(Guest32::InterruptibilityState) & 0b11 == 0;
            if open {
                guest.platform.acknowledge(vector);
                vmcs.write(
                    Control32::EntryInterruptionInfo,
                    InterruptionInfo::external(vector).raw(),
                );
                guest.stats.interrupts_injected += 1;
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
            let info = InterruptionInfo(t.vmcs.read(Control32::EntryInterruptionInfo));
            assert_eq!((info.vector(), info.raw() >> 31), (6, 1));
            assert_eq!(
                t.vmcs.read(GuestNat::Rip),
                0x5000,
                "faults do not advance RIP"
            );
        }
        assert_eq!(t.guest.stats.exceptions_injected, 4);
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
            guest: &mut t.guest,
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
        // Program the guest's PIC (vector base 0x20, IRQ0 unmasked) and raise IRQ0 via the PIT.
        for (port, v) in [
            (0x20u16, 0x11u32),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0xfe),
        ] {
            assert!(t.guest.platform.io_write(port, 1, v, 0));
        }
        t.guest.platform.io_write(0x43, 1, 0x34, 0);
        t.guest.platform.io_write(0x40, 1, 100, 0);
        t.guest.platform.io_write(0x40, 1, 0, 0);
        t.guest.platform.advance(TEST_TSC_HZ / 100);
        assert!(t.guest.platform.pending_interrupt().is_some());
        // IF = 0: no injection, interrupt-window exiting armed.
        t.vmcs.write(GuestNat::Rflags, 0x2);
        inject_pending_interrupt(&mut t.vmcs, &mut t.guest);
        let window = crate::vmx::controls::PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        assert_ne!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        assert_eq!(t.vmcs.read(Control32::EntryInterruptionInfo) >> 31, 0);
        // IF = 1: injected as an external interrupt at the PIC's vector, window disarmed.
        t.vmcs.write(GuestNat::Rflags, 0x202);
        inject_pending_interrupt(&mut t.vmcs, &mut t.guest);
        let info = InterruptionInfo(t.vmcs.read(Control32::EntryInterruptionInfo));
        assert_eq!((info.vector(), info.raw() >> 31), (0x20, 1));
        assert_eq!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        assert_eq!(t.guest.stats.interrupts_injected, 1);
    }
}
