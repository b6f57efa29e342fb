//! Register-only exits: the ones whose handling reads and writes the vCPU's registers and VMCS
//! and nothing else (no device, no timer, no other vCPU, nothing the run loop acts on after the
//! exit). The run loop handles them in a tight loop next to the VM entry ([`handle`]), without
//! the general dispatch's follow-ups: no platform look, no deadline, no schedule decision (its
//! slice's deadline is checked before, from the exit's TSC), no event commit unless one is
//! queued. Which exits qualify is decided from the exit reason and the registers alone, before
//! the handler runs:
//!
//! - CPUID (every leaf: the table, or the policy over the guest's state);
//! - VMCALL of GUEST_ID, CPU_TIME, BALLOON_TARGET and BALLOON_GIVEN (answers in RAX); the
//!   others print, give up the slice, stop the guest or change its memory;
//! - RDMSR and WRMSR of an MSR that does not reach the platform (`msr::reads_the_apic`,
//!   `msr::write_reaches_platform`), and not IA32_SPEC_CTRL, whose write the run loop loads.
//!
//! The handlers are the general ones, and so are the rules of completing an instruction
//! ([`super::apply`]: RIP advanced by the exit's instruction length, RF cleared, the single-step
//! trap queued when TF is set, STI/MOV-SS blocking cleared: SDM Vol. 3C 28.2.4, 26.6.6.1; Vol. 3A
//! 17.3.1.1, 17.3.1.4) and the exit counters `stats` shows.

use super::{apicv, cpuid, msr, vmcall, Action, ExitContext};
use crate::abi::hc;
use crate::vmx::{ExitReason, Vmcs};

const CPUID: u32 = ExitReason::Cpuid.number() as u32;
const VMCALL: u32 = ExitReason::Vmcall.number() as u32;
const RDMSR: u32 = ExitReason::Rdmsr.number() as u32;
const WRMSR: u32 = ExitReason::Wrmsr.number() as u32;

/// Whether the exit whose exit-reason field reads `raw` touches only registers, given the
/// vCPU's RAX and RCX (the hypercall number, the MSR index).
#[inline]
pub fn is_register_only(raw: u32, rax: u64, rcx: u64) -> bool {
    // Bits 16-31 (entry failure, exit from VMX root, pending MTF, enclave) go the general way.
    match raw {
        CPUID => true,
        // The number is the same in any code size when RAX's upper half is clear.
        VMCALL => matches!(
            rax,
            hc::GUEST_ID | hc::CPU_TIME | hc::BALLOON_TARGET | hc::BALLOON_GIVEN
        ),
        RDMSR => !msr::reads_the_apic(rcx as u32),
        WRMSR => {
            let m = rcx as u32;
            !msr::write_reaches_platform(m) && m != msr::index::SPEC_CTRL
        }
        _ => false,
    }
}

/// Handles the exit whose exit-reason field reads `raw` if it touches only registers
/// ([`is_register_only`]): counted, handled and completed (RIP and the rest, or the exception
/// queued). False, with nothing done, for any other exit.
#[inline]
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, raw: u32) -> bool {
    let regs = &cx.vcpu.regs;
    if !is_register_only(raw, regs.rax, regs.rcx) {
        return false;
    }
    handle_register_only(cx, raw);
    true
}

/// [`handle`] for an exit the caller found register-only ([`is_register_only`]) itself.
#[inline]
pub fn handle_register_only<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, raw: u32) {
    let stats = &mut cx.vcpu.stats;
    stats.last_exit = raw as u16;
    if let Some(slot) = stats.exits.get_mut(raw as usize) {
        *slot += 1;
    }
    apicv::leave_vtpr(cx.vcpu);
    let action = match raw {
        CPUID => cpuid::handle(cx),
        VMCALL => vmcall::handle(cx),
        RDMSR => msr::read(cx),
        _ => msr::write(cx),
    };
    debug_assert!(matches!(action, Action::Advance | Action::Inject(_)));
    super::apply(cx.vmcs, cx.vcpu, &action);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;
    use crate::exits::{dispatch, Exception};
    use crate::vmx::{FakeVmcs, Guest32, GuestNat, ReadOnly32};

    fn cx(t: &mut TestBed) -> ExitContext<'_, FakeVmcs> {
        ExitContext {
            vmcs: &mut t.vmcs,
            vcpu: &mut t.vcpu,
            vm: &mut t.vm,
            host: &mut t.host,
            now: 0,
        }
    }

    /// Runs exit `reason` once by the fast path and once by the general dispatch from the same
    /// state: both give the same registers, RIP, RFLAGS, interruptibility, counters and events.
    fn same_as_dispatch(setup: impl Fn(&mut TestBed), reason: ExitReason) {
        let mut fast = TestBed::new();
        let mut slow = TestBed::new();
        for t in [&mut fast, &mut slow] {
            t.long_mode();
            setup(t);
            t.vmcs.set(ReadOnly32::ExitReason, reason.number() as u32);
            t.vmcs.set(ReadOnly32::ExitInstructionLength, 3);
            t.vmcs.set(GuestNat::Rip, 0x1000);
            t.vmcs.set(GuestNat::Rflags, 0x1_0302); // RF, TF, IF
            t.vmcs.set(Guest32::InterruptibilityState, 1); // STI blocking
        }
        let raw = reason.number() as u32;
        assert!(handle(&mut cx(&mut fast), raw), "{reason} is register-only");
        let action = dispatch(&mut cx(&mut slow));
        crate::exits::apply(&mut slow.vmcs, &mut slow.vcpu, &action);
        for f in [GuestNat::Rip, GuestNat::Rflags] {
            assert_eq!(fast.vmcs.read(f), slow.vmcs.read(f), "{reason}: {f:?}");
        }
        assert_eq!(
            fast.vmcs.read(Guest32::InterruptibilityState),
            slow.vmcs.read(Guest32::InterruptibilityState)
        );
        assert_eq!(fast.vcpu.regs, slow.vcpu.regs, "{reason}");
        assert_eq!(fast.vcpu.stats.exits, slow.vcpu.stats.exits);
        assert_eq!(fast.vcpu.stats.last_exit, slow.vcpu.stats.last_exit);
        assert_eq!(fast.vcpu.events, slow.vcpu.events, "{reason}");
    }

    #[test]
    fn register_only_exits_complete_as_the_general_dispatch_does() {
        same_as_dispatch(|t| t.vcpu.regs.rax = 0, ExitReason::Cpuid);
        same_as_dispatch(|t| t.vcpu.regs.rax = 0x4000_0000, ExitReason::Cpuid);
        same_as_dispatch(|t| t.vcpu.regs.rax = hc::GUEST_ID, ExitReason::Vmcall);
        same_as_dispatch(|t| t.vcpu.regs.rax = hc::CPU_TIME, ExitReason::Vmcall);
        // IA32_MISC_ENABLE, IA32_MTRR_DEF_TYPE (as bench64 does), an absent MSR (#GP).
        same_as_dispatch(|t| t.vcpu.regs.rcx = 0x1a0, ExitReason::Rdmsr);
        same_as_dispatch(
            |t| {
                t.vcpu.regs.rcx = 0x2ff;
                t.vcpu.regs.rax = 0xc06;
            },
            ExitReason::Wrmsr,
        );
        same_as_dispatch(|t| t.vcpu.regs.rcx = 0x1234_5678, ExitReason::Rdmsr);
    }

    #[test]
    fn a_single_step_trap_and_a_fault_are_queued_not_lost() {
        let mut t = TestBed::new();
        t.long_mode();
        t.vmcs.set(ReadOnly32::ExitInstructionLength, 2);
        t.vmcs.set(GuestNat::Rflags, 0x302); // TF
        assert!(handle(&mut cx(&mut t), CPUID));
        assert_ne!(
            t.vcpu.events,
            crate::exits::events::EventQueue::default(),
            "TF: the #DB trap is queued"
        );
        let mut t = TestBed::new();
        t.long_mode();
        t.vcpu.regs.rcx = 0x1234_5678;
        assert!(handle(&mut cx(&mut t), RDMSR));
        let mut expected = crate::exits::events::EventQueue::default();
        expected.exception(Exception::GP0);
        assert_eq!(t.vcpu.events, expected, "#GP for an absent MSR");
    }

    #[test]
    fn exits_that_reach_more_than_registers_go_the_general_way() {
        let cases = [
            (VMCALL, hc::CONSOLE_WRITE, 0),
            (VMCALL, hc::YIELD, 0),
            (VMCALL, hc::SHUTDOWN, 0),
            (VMCALL, hc::PRINT_STATS, 0),
            (VMCALL, hc::BALLOON_GIVE, 0),
            (VMCALL, 1 << 32 | hc::GUEST_ID, 0),
            (RDMSR, 0, 0x802), // x2APIC ID
            (WRMSR, 0, 0x6e0), // IA32_TSC_DEADLINE
            (WRMSR, 0, 0x1b),  // IA32_APIC_BASE
            (WRMSR, 0, 0x10),  // IA32_TSC
            (WRMSR, 0, msr::index::SPEC_CTRL as u64),
            (ExitReason::IoInstruction.number() as u32, 0, 0),
            (ExitReason::Hlt.number() as u32, 0, 0),
            (ExitReason::Xsetbv.number() as u32, 0, 0),
            (1 << 31 | CPUID, 0, 0), // a VM-entry failure
        ];
        for (raw, rax, rcx) in cases {
            assert!(
                !is_register_only(raw, rax, rcx),
                "{raw:#x} {rax:#x} {rcx:#x}"
            );
            let mut t = TestBed::new();
            t.vcpu.regs.rax = rax;
            t.vcpu.regs.rcx = rcx;
            assert!(!handle(&mut cx(&mut t), raw));
            assert!(t.vcpu.stats.exits.iter().all(|&n| n == 0), "not counted");
        }
    }
}
