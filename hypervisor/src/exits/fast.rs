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
//! IN and OUT ([`handle_port`]) are made there too, since only the device can tell whether the
//! access reaches beyond its registers: beforehand for a byte access it makes alone
//! (`Device::io_quiet`), afterwards for the others. One that did not is completed like the
//! register-only exits; one that did leaves the loop done ([`Handled`]) and the general
//! follow-up continues from it. INS/OUTS, REP and armed breakpoints keep the general path.
//!
//! So is a WRMSR of IA32_TSC_DEADLINE that fires nothing ([`handle_deadline`]): it moves only
//! the guest's next timer, which the loop takes again without a platform look. [`way`] tells
//! the three apart with one test of the exit reason. Among the exits it leaves to the general
//! way the loop still tries one kind, without APIC virtualization ([`may_be_apic_alone`]): an
//! access to the local APIC's page ([`handle_apic`]) or a RDMSR or WRMSR of an x2APIC register
//! ([`handle_x2apic`]) that the APIC makes alone: a load, or an EOI or TPR store while no vector
//! waits in IRR.
//!
//! The handlers are the general ones, and so are the rules of completing an instruction
//! ([`super::apply`]: RIP advanced by the exit's instruction length, RF cleared, the single-step
//! trap queued when TF is set, STI/MOV-SS blocking cleared: SDM Vol. 3C 28.2.4, 26.6.6.1; Vol. 3A
//! 17.3.1.1, 17.3.1.4) and the exit counters `stats` shows.

use super::{apicv, cpuid, debug, io, msr, vmcall, Action, ExitContext};
use crate::abi::hc;
use crate::vmx::{
    EptViolationQualification, ExitReason, GuestNat, IoDirection, IoQualification, ReadOnly32,
    ReadOnly64, ReadOnlyNat, Vmcs,
};

const CPUID: u32 = ExitReason::Cpuid.number() as u32;
const VMCALL: u32 = ExitReason::Vmcall.number() as u32;
/// The exit reason of RDMSR (an x2APIC register's read among them, [`handle_x2apic`]).
pub const RDMSR: u32 = ExitReason::Rdmsr.number() as u32;
/// The exit reason of RDMSR's partner, WRMSR: also the one of a TSC-deadline move
/// ([`handle_deadline`]).
pub const WRMSR: u32 = ExitReason::Wrmsr.number() as u32;
/// The exit reason of IN, OUT, INS and OUTS ([`handle_port`]).
pub const IO: u32 = ExitReason::IoInstruction.number() as u32;
/// The exit reason of an EPT violation, an MMIO access among them ([`handle_apic`]).
pub const EPT_VIOLATION: u32 = ExitReason::EptViolation.number() as u32;
/// The exit reason of a VMX-preemption timer that ran out ([`handle_preempted`]).
pub const PREEMPTED: u32 = ExitReason::PreemptionTimer.number() as u32;

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

/// What the tight loop makes of an exit, told from the exit reason and the registers alone
/// ([`way`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Register-only ([`is_register_only`], [`handle_register_only`]).
    Registers,
    /// IN or OUT ([`handle_port`]: the device tells).
    Port,
    /// WRMSR of IA32_TSC_DEADLINE ([`handle_deadline`]: the value tells).
    Deadline,
    /// The general dispatch.
    General,
}

/// [`Way`] of the exit whose exit-reason field reads `raw`, given the vCPU's RAX and RCX: one
/// test of the reason for the tight loop's three ways.
#[inline]
pub fn way(raw: u32, rax: u64, rcx: u64) -> Way {
    match raw {
        IO => Way::Port,
        WRMSR if rcx as u32 == msr::index::TSC_DEADLINE => Way::Deadline,
        _ if is_register_only(raw, rax, rcx) => Way::Registers,
        _ => Way::General,
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
    handle_register_only_parts(cx.vmcs, cx.vcpu, cx.vm, cx.host, cx.now, raw);
}

/// [`handle_register_only`] from the context's parts, for the run loop's tight loop: each
/// handler gets a context of its own, so that the one inlined (CPUID's) keeps it in registers
/// rather than in a frame the others' calls need (12 stores and their loads at every exit,
/// docs/BENCHMARKS.md).
#[inline(always)]
pub fn handle_register_only_parts<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    vcpu: &mut crate::guest::Vcpu,
    vm: &mut crate::guest::Vm,
    host: &mut dyn super::Host,
    now: u64,
    raw: u32,
) {
    vcpu.stats.count_exit(raw as u16);
    apicv::leave_vtpr(vcpu);
    macro_rules! cx {
        () => {
            &mut ExitContext {
                vmcs: &mut *vmcs,
                vcpu: &mut *vcpu,
                vm: &mut *vm,
                host: &mut *host,
                now,
            }
        };
    }
    let action = match raw {
        CPUID => cpuid::handle(cx!()),
        VMCALL => vmcall::handle_figure(cx!()),
        RDMSR => msr::read(cx!()),
        _ => msr::write(cx!()),
    };
    debug_assert!(matches!(action, Action::Advance | Action::Inject(_)));
    match action {
        Action::Advance => super::complete(vmcs, vcpu),
        other => super::apply(vmcs, vcpu, &other),
    }
}

/// A WRMSR of IA32_TSC_DEADLINE ([`Way::Deadline`]), for the tight loop: made there if
/// it moves or disarms the guest's TSC-deadline timer without firing it (`msr::move_deadline`),
/// then counted and completed as the general dispatch does. Only the timer's deadline changed,
/// so the caller takes the guest's next timer from the platform again (the piece's deadlines)
/// and makes no platform look: Linux moves its tick's deadline at most of its timer
/// interrupts and idle entries, far more often than it lets one fire. False, with nothing done
/// or counted, for a write that fires the timer or faults: the general dispatch makes it.
#[inline]
pub fn handle_deadline<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> bool {
    debug_assert_eq!(cx.vcpu.regs.rcx as u32, msr::index::TSC_DEADLINE);
    if !msr::move_deadline(cx) {
        return false;
    }
    cx.vcpu.stats.count_exit(WRMSR as u16);
    apicv::leave_vtpr(cx.vcpu);
    super::complete(cx.vmcs, cx.vcpu);
    true
}

/// Whether the exit whose exit-reason field reads `raw` is a VMCALL of YIELD, given the vCPU's
/// RAX (with its upper half clear, the number is YIELD in any code size).
#[inline]
pub fn is_yield(raw: u32, rax: u64) -> bool {
    raw == VMCALL && rax == hc::YIELD
}

/// A YIELD ([`is_yield`]) for the tight loop: counted, answered and completed as the general
/// dispatch does (`vmcall::handle`, then `super::apply` of `Action::Yield`), so that the loop
/// goes straight to the slice's end without the general dispatch over every exit and every
/// hypercall (about 180 instructions of a guest switch, docs/BENCHMARKS.md). A YIELD touches
/// nothing of the platform (`super::may_touch_platform`). False, with nothing done or counted,
/// from CPL > 0: the general dispatch queues the #UD.
#[inline]
pub fn handle_yield<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut crate::guest::Vcpu) -> bool {
    if !vmcall::handle_yield(&*vmcs, vcpu) {
        return false;
    }
    vcpu.stats.count_exit(VMCALL as u16);
    apicv::leave_vtpr(vcpu);
    super::complete(vmcs, vcpu);
    true
}

/// A VMX-preemption-timer exit (exit reason [`PREEMPTED`]) inside the slice, for the tight loop:
/// all the general handler does for it (`super::handle`: there is no instruction to complete
/// and nothing to emulate) without the general follow-up. It is counted; an event whose
/// delivery the exit cut short goes back into the guest's event queue (SDM Vol. 3C 28.2.4: the
/// preemption timer can end an event's delivery); the TPR (and the vectors) the guest left on
/// the virtual-APIC page stay there until the platform look that follows, which the caller
/// makes before the next entry (`apicv::take_unread`, as after every exit that may touch the
/// platform: a timer of the guest's has usually fallen due).
#[inline]
pub fn handle_preempted<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut crate::guest::Vcpu) {
    vcpu.stats.count_exit(PREEMPTED as u16);
    apicv::leave_vtpr(vcpu);
    super::requeue_interrupted_event(vmcs, vcpu);
}

/// What the tight loop made of an I/O exit ([`handle_port`]). Small and `Copy`: it leaves the
/// loop with the exit, and an [`Action`] (whose stop reasons carry strings) would be copied on
/// the way at the cost of every general exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortExit {
    /// Not one the loop completes (INS/OUTS with or without REP, an armed breakpoint in DR7, a
    /// qualification the SDM does not define): nothing done, the general dispatch handles it.
    General,
    /// Done, counted and completed, and the device changed nothing beyond its own registers (no
    /// line driven, no timer moved, no exit status, no power request: the platform's
    /// `take_ports_quiet`): the guest is entered again as after a register-only exit, once the
    /// guest's console lines are printed if the access wrote some (`take_console_written`).
    Quiet,
    /// Done, counted and completed (its action applied), but the access reached beyond its
    /// device: the general follow-up continues from [`Handled::action`], the platform touched.
    Changed(Handled),
}

/// A port access the tight loop completed whose follow-up is the general one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handled {
    /// The exit status the guest wrote to the debug-exit device, which stops it.
    pub debug_exit: Option<u32>,
}

impl Handled {
    /// The action the general handler returns for the same access (`io::handle`).
    pub fn action(self) -> Action {
        match self.debug_exit {
            Some(status) => Action::Stop(crate::guest::StopReason::DebugExit(status)),
            None => Action::Advance,
        }
    }
}

/// An IN or OUT (exit reason [`IO`]) handled in the tight loop: the exit qualification read
/// once and decoded once, and the access made by the device alone when it says the access stays
/// in its registers (`Platform::io_quiet`), else through the port table with the general
/// handler's own code (`io::in_or_out`), so the device, RAX, RIP and the counters end as the
/// general dispatch leaves them. INS/OUTS (and REP) keep the general path, which checks segments,
/// paging and data breakpoints, and so does any access while DR7 enables a breakpoint (the I/O
/// breakpoints of SDM 17.2.4, which need CR4.DE and DR0-DR3): one VMREAD tells.
// Not inlined into the run loop: inlined, it made every general exit about 27 instructions
// longer (measured, docs/BENCHMARKS.md), against about 15 that the call costs a port access.
#[inline(never)]
pub fn handle_port<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> PortExit {
    let Some(q) = IoQualification::decode(cx.vmcs.read(ReadOnlyNat::ExitQualification)) else {
        return PortExit::General;
    };
    if q.string || cx.vmcs.read(GuestNat::Dr7) & debug::DR7_ENABLES != 0 {
        return PortExit::General;
    }
    cx.vcpu.stats.count_exit(IO as u16);
    // A byte access the device makes from its registers alone (`Platform::io_quiet`: no timer
    // due, no line, no deadline moved; at most a byte to the console, which the run loop
    // prints) ends here, as `io::in_or_out` would end it: the device in the same state, RAX
    // merged for an IN.
    let platform = &mut cx.vm.platform;
    let regs = &mut cx.vcpu.regs;
    let quiet = match q.direction {
        IoDirection::In => platform
            .io_quiet(q.port, q.size, None, cx.now)
            .map(|v| regs.rax = regs.rax & !0xff | u64::from(v)),
        IoDirection::Out => platform
            .io_quiet(q.port, q.size, Some(regs.rax as u8), cx.now)
            .map(drop),
    };
    if quiet.is_some() {
        // Such an access reads nothing of the LAPIC model and drives nothing into it, so the
        // model may take the guest's TPR (and IRR and ISR) later, as after a CPUID: before the
        // run loop next looks at the platform (`apicv::take_unread`) or the next exit that
        // reaches it (`after_exit`, below), whichever comes first.
        apicv::leave_vtpr(cx.vcpu);
        super::complete(cx.vmcs, cx.vcpu);
        return PortExit::Quiet;
    }
    port_by_the_platform(cx, q.port, q.size, q.direction)
}

/// [`handle_port`]'s access that its device does not make alone, made the ordinary way
/// (`io::in_or_out`). A call of its own, so that a quiet access does not save and restore
/// the registers this one needs (docs/BENCHMARKS.md).
#[inline(never)]
#[cold]
fn port_by_the_platform<V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    port: u16,
    size: u8,
    direction: IoDirection,
) -> PortExit {
    // As the general dispatch does before any exit that reaches the platform: the model takes
    // the guest's TPR (and with virtual-interrupt delivery its IRR and ISR) before a device can
    // drive a line into it.
    apicv::after_exit(&*cx.vmcs, cx.vcpu, cx.vm);
    io::in_or_out(cx, port, size, direction);
    let done = Handled {
        debug_exit: cx.vm.platform.exit_status(),
    };
    if done.debug_exit.is_none() {
        // `Action::Advance`'s completion; a stop leaves RIP on the instruction.
        super::complete(cx.vmcs, cx.vcpu);
    }
    if cx.vm.platform.take_ports_quiet() && done.debug_exit.is_none() {
        PortExit::Quiet
    } else {
        PortExit::Changed(done)
    }
}

/// Whether a general exit (reason `raw`, the vCPU's RCX) may be an APIC access the APIC makes
/// alone ([`handle_apic`], [`handle_x2apic`]): an EPT violation, an x2APIC register's read (the
/// only RDMSR that leaves the register-only way), or a WRMSR of the x2APIC's TPR or EOI (the
/// only ones that can be quiet: ICR and SELF IPI writes leave for the general way without the
/// call).
#[inline(always)]
pub fn may_be_apic_alone(raw: u32, rcx: u64) -> bool {
    match raw {
        EPT_VIOLATION | RDMSR => true,
        WRMSR => matches!(rcx as u32, X2APIC_TPR | X2APIC_EOI),
        _ => false,
    }
}

/// The x2APIC's TPR and EOI MSRs (SDM Table 11-6).
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;

/// What the tight loop made of an APIC access ([`handle_apic`], [`handle_x2apic`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicExit {
    /// Not an access the local APIC makes alone: nothing done, the general dispatch handles it.
    General,
    /// A load (from the APIC's page, or a RDMSR), made, counted and completed: nothing changed.
    Loaded,
    /// An EOI or TPR store (or one the APIC drops), made, counted and completed: the APIC's
    /// ISR or TPR may have changed, and nothing else did.
    Stored,
}

/// An EPT violation handled in the tight loop when it is an instruction's access to the local
/// APIC's page, without APIC virtualization (no virtual-APIC page: every xAPIC access is
/// emulated, docs/DEVICES.md), that the APIC makes alone (`Platform::apic_access_quiet`: no
/// timer due, a load, or an EOI or TPR store while IRR is empty and the vector an EOI retires is
/// edge triggered). Such an access changes nothing that the run loop's look at the platform acts
/// on (no vector becomes deliverable, no line, timer, IPI or EOI message), so the guest is
/// entered again as after a CPUID. Every check of the general handler (`ept::violation`:
/// an instruction's data access, not the CPU's page walk or event delivery; the instruction
/// decoded and its operand found at the reported address, `mmio::emulate_alone`) is made
/// before the access; any that fails leaves the exit to the general dispatch, with nothing
/// done, which then fails it the same way. The access and its completion are the general
/// handler's.
// Not inlined into the run loop, as `handle_port` is not: every general exit would pay for it.
#[inline(never)]
pub fn handle_apic<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> ApicExit {
    use EptViolationQualification as Q;
    // With a virtual-APIC page the xAPIC's accesses do not come here (with the TPR shadow alone,
    // the model's TPR is the page's): the other devices' MMIO leaves at once.
    if cx.vcpu.apicv.is_some() {
        return ApicExit::General;
    }
    let gpa = cx.vmcs.read(ReadOnly64::GuestPhysicalAddr);
    let q = Q::from_bits_retain(cx.vmcs.read(ReadOnlyNat::ExitQualification));
    let store = q.contains(Q::WRITE);
    // The APIC's answer first: most accesses it refuses (an ICR write, another device's
    // register) leave here for the general dispatch after a few instructions.
    if !cx
        .vm
        .platform
        .apic_access_quiet(cx.vcpu.index, gpa, store, cx.now)
    {
        return ApicExit::General;
    }
    let instruction_data = q.contains(Q::GLA_VALID | Q::GLA_TRANSLATION) && !q.contains(Q::FETCH);
    // A page of RAM given back (BALLOON_GIVE) is `ept::violation`'s to stop the guest for.
    let ram = &cx.vm.ram;
    let given_back = gpa < ram.len() && ram.balloon.is_given(gpa / crate::balloon::PAGE);
    // Nothing queued or held for the next entry either (the look would deliver it, or ask for a
    // window), and the general handler's checks.
    if !cx.vcpu.events.quiet()
        || !instruction_data
        || given_back
        || cx.vmcs.read(ReadOnly32::IdtVectoringInfo) & (1 << 31) != 0
    {
        return ApicExit::General;
    }
    let action = crate::mmio::emulate_alone(cx, gpa, store);
    if !matches!(action, Action::AdvanceBy(_)) {
        return ApicExit::General;
    }
    cx.vcpu.stats.count_exit(EPT_VIOLATION as u16);
    super::apply(cx.vmcs, cx.vcpu, &action);
    if store {
        ApicExit::Stored
    } else {
        ApicExit::Loaded
    }
}

/// A RDMSR or WRMSR of an x2APIC register (exit reason `raw`, [`RDMSR`] or [`WRMSR`]) handled
/// in the tight loop without APIC virtualization when the APIC makes it alone
/// (`Platform::x2apic_access_quiet`): [`handle_apic`]'s rule through the MSR interface (a
/// register read, or an EOI or TPR write while IRR is empty and the EOI's vector edge
/// triggered, with nothing pending, queued or due), and only an access that succeeds (a #GP
/// goes the general way). Completed as `msr::read` and `msr::write` complete it: EDX:EAX for a
/// read, then RIP and the rest ([`super::complete`]).
#[inline(never)]
pub fn handle_x2apic<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, raw: u32) -> ApicExit {
    if cx.vcpu.apicv.is_some() {
        return ApicExit::General;
    }
    let regs = &cx.vcpu.regs;
    let msr = regs.rcx as u32;
    let store = (raw == WRMSR).then_some(regs.rdx << 32 | regs.rax & 0xffff_ffff);
    let (platform, cpu) = (&mut cx.vm.platform, cx.vcpu.index);
    // The APIC's answer first, as in `handle_apic`; then nothing queued or held.
    if !platform.x2apic_access_quiet(cpu, msr, store, cx.now) || !cx.vcpu.events.quiet() {
        return ApicExit::General;
    }
    let value = platform.x2apic_access_alone(cpu, msr, store, cx.now);
    let g = &mut *cx.vcpu;
    g.stats.count_exit(raw as u16);
    if store.is_some() {
        super::complete(cx.vmcs, g);
        return ApicExit::Stored;
    }
    g.regs.rax = value & 0xffff_ffff;
    g.regs.rdx = value >> 32;
    super::complete(cx.vmcs, g);
    ApicExit::Loaded
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
        same_as_dispatch(|t| t.vcpu.regs.rax = hc::BALLOON_TARGET, ExitReason::Vmcall);
        same_as_dispatch(|t| t.vcpu.regs.rax = hc::BALLOON_GIVEN, ExitReason::Vmcall);
        // From CPL 3 (SS.DPL): #UD, not an answer.
        same_as_dispatch(
            |t| {
                t.vcpu.regs.rax = hc::GUEST_ID;
                let ss = t.vmcs.read(Guest32::SsAccessRights);
                t.vmcs.set(Guest32::SsAccessRights, ss | 3 << 5);
            },
            ExitReason::Vmcall,
        );
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

    /// A VMX-preemption-timer exit handled by the tight loop (`handle_preempted`, then the
    /// platform look before the entry) against the general dispatch of the same exit: with an
    /// external interrupt's delivery cut short by the exit (SDM 28.2.4) and a TPR the guest
    /// wrote to the virtual-APIC page without an exit, both count it once, requeue the
    /// interrupt and enter with it, and give the model the guest's TPR.
    #[test]
    fn a_preemption_timer_exit_in_the_loop_ends_as_the_general_dispatch_does() {
        use crate::vmx::{Control32, InterruptionInfo};
        let mut fast = TestBed::with_virtual_interrupt_delivery();
        let mut slow = TestBed::with_virtual_interrupt_delivery();
        for t in [&mut fast, &mut slow] {
            t.long_mode();
            t.enter().unwrap();
            t.vmcs.set(GuestNat::Rip, 0x1000);
            t.vmcs.set(GuestNat::Rflags, 0x202);
            t.vmcs.set(ReadOnly32::ExitReason, PREEMPTED);
            t.vmcs.set(
                ReadOnly32::IdtVectoringInfo,
                InterruptionInfo::external(0x30).raw(),
            );
            // VTPR: what a guest's MOV to CR8 leaves on the page.
            t.vcpu.apicv.as_mut().unwrap().write_register(0x80, 0x20);
        }
        handle_preempted(&fast.vmcs, &mut fast.vcpu);
        let action = dispatch(&mut cx(&mut slow));
        assert_eq!(action, Action::Preempted);
        crate::exits::apply(&mut slow.vmcs, &mut slow.vcpu, &action);
        assert_eq!(fast.vcpu.stats.exits, slow.vcpu.stats.exits);
        assert_eq!(fast.vcpu.stats.exits[PREEMPTED as usize], 1);
        assert_eq!(fast.vcpu.stats.last_exit, slow.vcpu.stats.last_exit);
        assert_eq!(fast.vcpu.events, slow.vcpu.events);
        for t in [&mut fast, &mut slow] {
            t.enter().unwrap();
            assert_eq!(
                t.vm.platform.tpr(0),
                0x20,
                "the guest's TPR reached the model"
            );
        }
        let info = |t: &TestBed| t.vmcs.read(Control32::EntryInterruptionInfo);
        assert_eq!(info(&fast), info(&slow));
        assert_eq!(info(&fast), InterruptionInfo::external(0x30).raw());
        assert_eq!(
            fast.vmcs.read(GuestNat::Rip),
            0x1000,
            "no instruction to complete"
        );
    }

    /// A YIELD by the tight loop (`handle_yield`) against the general dispatch: the same RAX,
    /// RIP, RFLAGS, blocking, counters and events, in 64-bit and in 32-bit code (RAX's upper
    /// half as the guest left it); from CPL 3 nothing is done here and the dispatch queues #UD.
    #[test]
    fn a_yield_in_the_loop_ends_as_the_general_dispatch_does() {
        for (wide, rax) in [
            (true, hc::YIELD),
            (false, hc::YIELD),
            (false, 1 << 32 | hc::YIELD),
        ] {
            let mut fast = TestBed::new();
            let mut slow = TestBed::new();
            for t in [&mut fast, &mut slow] {
                if wide {
                    t.long_mode();
                }
                t.vcpu.regs.rax = rax;
                t.vmcs.set(ReadOnly32::ExitReason, VMCALL);
                t.vmcs.set(ReadOnly32::ExitInstructionLength, 3);
                t.vmcs.set(GuestNat::Rip, 0x1000);
                t.vmcs.set(GuestNat::Rflags, 0x1_0302); // RF, TF, IF
                t.vmcs.set(Guest32::InterruptibilityState, 1);
            }
            let fast_way = is_yield(VMCALL, rax);
            assert_eq!(fast_way, rax == hc::YIELD, "{rax:#x}");
            if !fast_way {
                continue;
            }
            assert!(handle_yield(&mut fast.vmcs, &mut fast.vcpu));
            let action = dispatch(&mut cx(&mut slow));
            assert_eq!(action, Action::Yield);
            crate::exits::apply(&mut slow.vmcs, &mut slow.vcpu, &action);
            for f in [GuestNat::Rip, GuestNat::Rflags] {
                assert_eq!(fast.vmcs.read(f), slow.vmcs.read(f), "{f:?}");
            }
            assert_eq!(fast.vmcs.read(GuestNat::Rip), 0x1003);
            assert_eq!(
                fast.vmcs.read(Guest32::InterruptibilityState),
                slow.vmcs.read(Guest32::InterruptibilityState)
            );
            assert_eq!(fast.vcpu.regs, slow.vcpu.regs);
            assert_eq!(fast.vcpu.regs.rax, 0, "OK");
            assert_eq!(fast.vcpu.stats.exits, slow.vcpu.stats.exits);
            assert_eq!(fast.vcpu.stats.exits[VMCALL as usize], 1);
            assert_eq!(fast.vcpu.stats.hypercalls, slow.vcpu.stats.hypercalls);
            assert_eq!(fast.vcpu.stats.last_exit, slow.vcpu.stats.last_exit);
            assert_eq!(
                fast.vcpu.events, slow.vcpu.events,
                "TF: #DB queued both ways"
            );
        }
        // From CPL 3: nothing done or counted; the dispatch queues #UD.
        let mut t = TestBed::new();
        t.long_mode();
        t.vcpu.regs.rax = hc::YIELD;
        let ss = t.vmcs.read(Guest32::SsAccessRights);
        t.vmcs.set(Guest32::SsAccessRights, ss | 3 << 5);
        t.vmcs.set(ReadOnly32::ExitReason, VMCALL);
        t.vmcs.set(GuestNat::Rip, 0x1000);
        assert!(!handle_yield(&mut t.vmcs, &mut t.vcpu));
        assert!(t.vcpu.stats.exits.iter().all(|&n| n == 0), "not counted");
        assert_eq!(t.vcpu.stats.hypercalls, 0);
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x1000);
        assert_eq!(dispatch(&mut cx(&mut t)), Action::Inject(Exception::UD));
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

    /// A WRMSR of IA32_TSC_DEADLINE of `value` at the guest's time `now`, the timer armed for
    /// `armed` (in TSC-deadline mode when `deadline_mode`), by [`handle_deadline`] (as the run
    /// loop makes it) and by the general dispatch. Returns whether the loop made it; if so, both
    /// leave the same LAPIC and platform, registers, RIP, RFLAGS, interruptibility, counters and
    /// events; if not, nothing was done or counted.
    fn deadline_same_as_dispatch(
        armed: u64,
        value: u64,
        now: u64,
        deadline_mode: bool,
        cpuid_ecx: Option<u32>,
    ) -> bool {
        let mut fast = TestBed::new();
        let mut slow = TestBed::new();
        for t in [&mut fast, &mut slow] {
            t.long_mode();
            if let Some(ecx) = cpuid_ecx {
                t.host
                    .leaves
                    .push(((1, 0), [0x50654, 0x800, ecx, 0xbfeb_fbff]));
            }
            let lapic = 0xfee0_0000;
            t.vm.platform.mmio_write(0, lapic + 0xf0, 4, 0x1ff, 0);
            let mode = if deadline_mode { 2 << 17 } else { 0 };
            t.vm.platform
                .mmio_write(0, lapic + 0x320, 4, mode | 0x30, 0);
            t.vm.platform.write_tsc_deadline(0, armed, 0);
            t.vmcs.set(ReadOnly32::ExitReason, WRMSR);
            t.vmcs.set(ReadOnly32::ExitInstructionLength, 2);
            t.vmcs.set(GuestNat::Rip, 0x1000);
            t.vmcs.set(GuestNat::Rflags, 0x1_0302); // RF, TF, IF
            t.vmcs.set(Guest32::InterruptibilityState, 1); // STI blocking
            t.vcpu.regs.rcx = msr::index::TSC_DEADLINE.into();
            t.vcpu.regs.rax = value & 0xffff_ffff;
            t.vcpu.regs.rdx = value >> 32;
        }
        let before = saved(&fast);
        let at = |t: &mut TestBed| {
            let mut c = cx(t);
            c.now = now;
            handle_deadline(&mut c)
        };
        if !at(&mut fast) {
            assert_eq!(saved(&fast), before, "nothing done");
            assert!(fast.vcpu.stats.exits.iter().all(|&n| n == 0), "not counted");
            assert_eq!(fast.vmcs.read(GuestNat::Rip), 0x1000);
            return false;
        }
        let mut c = cx(&mut slow);
        c.now = now;
        let action = dispatch(&mut c);
        crate::exits::apply(&mut slow.vmcs, &mut slow.vcpu, &action);
        assert_eq!(saved(&fast), saved(&slow), "the platform");
        assert_eq!(
            fast.vm.platform.next_deadline(),
            slow.vm.platform.next_deadline()
        );
        for f in [GuestNat::Rip, GuestNat::Rflags] {
            assert_eq!(fast.vmcs.read(f), slow.vmcs.read(f), "{f:?}");
        }
        assert_eq!(
            fast.vmcs.read(Guest32::InterruptibilityState),
            slow.vmcs.read(Guest32::InterruptibilityState)
        );
        assert_eq!(fast.vcpu.regs, slow.vcpu.regs);
        assert_eq!(fast.vcpu.stats.exits, slow.vcpu.stats.exits);
        assert_eq!(fast.vcpu.stats.last_exit, slow.vcpu.stats.last_exit);
        assert_eq!(fast.vcpu.events, slow.vcpu.events);
        true
    }

    #[test]
    fn a_tsc_deadline_move_in_the_loop_ends_as_the_general_dispatch_does() {
        let tsc_deadline = Some(1 << 24);
        // Moved ahead, armed ahead, disarmed; ignored outside TSC-deadline mode.
        assert!(deadline_same_as_dispatch(0, 9000, 100, true, tsc_deadline));
        assert!(deadline_same_as_dispatch(
            9000,
            12_000,
            100,
            true,
            tsc_deadline
        ));
        assert!(deadline_same_as_dispatch(9000, 0, 100, true, tsc_deadline));
        assert!(deadline_same_as_dispatch(0, 9000, 100, false, tsc_deadline));
        // A write that fires the timer (a deadline passed, or the armed one passed meanwhile)
        // needs the look for its interrupt; one CPUID does not allow is #GP: the general way.
        assert!(!deadline_same_as_dispatch(
            9000,
            50,
            100,
            true,
            tsc_deadline
        ));
        assert!(!deadline_same_as_dispatch(
            9000,
            100,
            100,
            true,
            tsc_deadline
        ));
        assert!(!deadline_same_as_dispatch(
            50,
            9000,
            100,
            true,
            tsc_deadline
        ));
        assert!(!deadline_same_as_dispatch(0, 9000, 100, true, Some(0)));
        // Only that MSR goes this way (ECX: RCX's upper half is not the MSR's).
        assert_eq!(way(WRMSR, 0, 0x6e0), Way::Deadline);
        assert_eq!(way(WRMSR, 0, 1 << 32 | 0x6e0), Way::Deadline);
        assert_eq!(way(WRMSR, 0, 0x1b), Way::General);
        assert_eq!(way(RDMSR, 0, 0x6e0), Way::Registers);
        assert_eq!(way(WRMSR, 0, 0x2ff), Way::Registers);
        assert_eq!(way(IO, 0, 0), Way::Port);
        assert_eq!(way(CPUID, 0, 0), Way::Registers);
        assert_eq!(way(PREEMPTED, 0, 0), Way::General);
    }

    /// An I/O exit's qualification (SDM Table 28-5): size, direction, string, REP, port.
    fn io_qual(port: u16, size: u8, is_in: bool, string: bool, rep: bool) -> u64 {
        (size as u64 - 1)
            | (is_in as u64) << 3
            | (string as u64) << 4
            | (rep as u64) << 5
            | (port as u64) << 16
    }

    fn saved(t: &TestBed) -> alloc::vec::Vec<u8> {
        let mut w = crate::state::Writer::new();
        t.vm.platform.save(&mut w);
        w.into_bytes()
    }

    /// Runs the I/O exit `qual` with RAX = `rax` once by [`handle_port`] (as the run loop does:
    /// the general follow-up continues from a `Changed` action) and once by the general dispatch,
    /// from the same state twice over (the second access sees the first's device state): both
    /// leave the same device state, console, registers, RIP, RFLAGS, interruptibility,
    /// counters, events and "platform touched". Returns what the fast path made of each.
    fn port_same_as_dispatch(setup: impl Fn(&mut TestBed), qual: u64, rax: u64) -> [PortExit; 2] {
        let mut fast = TestBed::new();
        let mut slow = TestBed::new();
        for t in [&mut fast, &mut slow] {
            t.long_mode();
            setup(t);
        }
        let mut outcomes = [PortExit::General, PortExit::General];
        for outcome in &mut outcomes {
            for t in [&mut fast, &mut slow] {
                t.vmcs.set(ReadOnly32::ExitReason, IO);
                t.vmcs.set(ReadOnlyNat::ExitQualification, qual);
                t.vmcs.set(ReadOnly32::ExitInstructionLength, 2);
                t.vmcs.set(GuestNat::Rflags, 0x1_0302); // RF, TF, IF
                t.vmcs.set(Guest32::InterruptibilityState, 2); // MOV-SS blocking
                t.vcpu.regs.rax = rax;
            }
            *outcome = handle_port(&mut cx(&mut fast));
            let fast_touched = match outcome {
                PortExit::General => {
                    let action = dispatch(&mut cx(&mut fast));
                    crate::exits::apply(&mut fast.vmcs, &mut fast.vcpu, &action);
                    crate::exits::touched_platform(
                        ExitReason::IoInstruction,
                        &fast.vcpu,
                        &mut fast.vm,
                    )
                }
                PortExit::Quiet => false,
                PortExit::Changed(_) => true,
            };
            let action = dispatch(&mut cx(&mut slow));
            crate::exits::apply(&mut slow.vmcs, &mut slow.vcpu, &action);
            let slow_touched =
                crate::exits::touched_platform(ExitReason::IoInstruction, &slow.vcpu, &mut slow.vm);
            if let PortExit::Changed(done) = outcome {
                assert_eq!(
                    done.action(),
                    action,
                    "{qual:#x}: the action the follow-up gets"
                );
            }
            assert_eq!(fast_touched, slow_touched, "{qual:#x}: platform touched");
            for f in [
                GuestNat::Rip,
                GuestNat::Rflags,
                GuestNat::PendingDebugExceptions,
            ] {
                assert_eq!(fast.vmcs.read(f), slow.vmcs.read(f), "{qual:#x}: {f:?}");
            }
            assert_eq!(
                fast.vmcs.read(Guest32::InterruptibilityState),
                slow.vmcs.read(Guest32::InterruptibilityState)
            );
            assert_eq!(fast.vcpu.regs, slow.vcpu.regs, "{qual:#x}");
            assert_eq!(fast.vcpu.stats.exits, slow.vcpu.stats.exits);
            assert_eq!(fast.vcpu.stats.last_exit, slow.vcpu.stats.last_exit);
            assert_eq!(
                fast.vcpu.stats.unclaimed_port_accesses,
                slow.vcpu.stats.unclaimed_port_accesses
            );
            assert_eq!(fast.vcpu.events, slow.vcpu.events, "{qual:#x}");
            assert_eq!(saved(&fast), saved(&slow), "{qual:#x}: device state");
            assert_eq!(
                fast.vm.platform.console().take_line(),
                slow.vm.platform.console().take_line()
            );
            assert_eq!(fast.vm.platform.stats(), slow.vm.platform.stats());
            assert_eq!(
                fast.vm.platform.take_console_written(),
                slow.vm.platform.take_console_written(),
                "{qual:#x}: console lines to print"
            );
        }
        outcomes
    }

    /// The state of one round of [`an_apic_access_in_the_loop_ends_as_the_general_dispatch_does`]:
    /// the local APIC's, the 8259A's, the guest's flags and the access.
    struct ApicRound {
        /// Through the x2APIC's MSRs (RDMSR/WRMSR exits) rather than the xAPIC page.
        x2apic: bool,
        /// The APIC in x2APIC mode (else an MSR access is a #GP).
        x2apic_mode: bool,
        irr: Option<u8>,
        in_service: alloc::vec::Vec<(u8, bool)>,
        tpr: u8,
        pit: bool,
        timer: Option<(u64, u64)>,
        rflags: u64,
        blocking: u32,
        offset: u64,
        code: [u8; 2],
        qualification: u64,
        rbx_skew: u64,
        rax: u64,
        /// The last look's time, and the exit's.
        looked: u64,
        now: u64,
    }

    impl ApicRound {
        fn random(r: &mut Rng) -> Self {
            const OFFSETS: [u64; 14] = [
                0x80, 0x80, 0xb0, 0xb0, 0xb0, 0x20, 0x30, 0xa0, 0x100, 0x200, 0x320, 0x390, 0x300,
                0x84,
            ];
            let vector = |r: &mut Rng| 0x20 + r.below(0xe0) as u8;
            let looked = TEST_TSC_HZ / 100 + r.below(TEST_TSC_HZ / 50);
            let in_service = (0..r.below(3))
                .map(|_| (vector(r), r.below(4) == 0))
                .collect();
            // mov eax, [ebx]; mov [ebx], eax; mov [ebx], al.
            let code = [[0x8b, 0x03], [0x89, 0x03], [0x88, 0x03]][r.below(3) as usize];
            let store = code[0] != 0x8b;
            // SDM Table 28-7: bit 0 read, 1 write, 2 fetch, 7 linear address valid, 8 the
            // access an instruction's (not the CPU's page walk). Now and then one that is not
            // an instruction's data access, or that names the other direction.
            let mut qualification = if store { 2 } else { 1 } | 3 << 7;
            match r.below(12) {
                0 => qualification |= 4,
                1 => qualification &= !(1 << 8),
                2 => qualification ^= 3,
                _ => {}
            }
            let x2apic = r.below(2) == 0;
            // Through the MSRs: a byte for the TPR, 0 for the EOI (anything else is a #GP),
            // most times.
            let rax = if x2apic && r.below(4) != 0 {
                if store && r.below(2) == 0 {
                    0
                } else {
                    r.below(0x100)
                }
            } else {
                r.next()
            };
            Self {
                x2apic,
                x2apic_mode: x2apic && r.below(8) != 0,
                irr: (r.below(3) == 0).then(|| vector(r)),
                in_service,
                tpr: [0, 0, 0x10, 0x40, 0xff][r.below(5) as usize],
                pit: r.below(3) == 0,
                timer: (r.below(3) == 0).then(|| (r.next(), r.next())),
                rflags: 0x1_0002 | r.below(2) << 9 | u64::from(r.below(5) == 0) << 8,
                blocking: [0, 0, 0, 1, 2][r.below(5) as usize],
                offset: OFFSETS[r.below(OFFSETS.len() as u64) as usize],
                code,
                qualification,
                rbx_skew: if r.below(16) == 0 { 0x10 } else { 0 },
                rax,
                looked,
                now: looked + r.below(TEST_TSC_HZ / 200),
            }
        }

        /// The state as the run loop's last look before the exit left it, then the exit.
        fn set_up(&self, t: &mut TestBed) {
            use crate::devices::lapic::{APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_BASE_EXTD};
            let base = crate::devices::lapic::LAPIC_BASE;
            t.vmcs.write(GuestNat::Cr0, 0x11);
            t.vmcs.write(Guest32::CsAccessRights, 0xc09b);
            if self.x2apic_mode {
                let on = base | APIC_BASE_BSP | APIC_BASE_ENABLE;
                t.vm.platform.set_apic_base(0, on).unwrap();
                t.vm.platform.set_apic_base(0, on | APIC_BASE_EXTD).unwrap();
            }
            let write = |t: &mut TestBed, offset: u64, value: u64| {
                if self.x2apic_mode {
                    let msr = 0x800 + (offset >> 4) as u32;
                    t.vm.platform.x2apic_write(0, msr, value, 0).unwrap();
                } else {
                    t.vm.platform.mmio_write(0, base + offset, 4, value, 0);
                }
            };
            // Software-enabled, spurious vector 0xFF; LINT0 in ExtINT mode: the 8259A's INTR
            // reaches the vCPU (the virtual wire).
            write(t, 0xf0, 0x1ff);
            write(t, 0x350, 0x700);
            if self.pit {
                t.raise_pit_irq0();
            }
            if let Some((kind, value)) = self.timer {
                if self.x2apic_mode {
                    // The xAPIC page is closed in x2APIC mode: the LVT entry and count by MSR.
                    let vector = [0x30, 0x31, 0xec, 0xff][(value % 4) as usize];
                    write(t, 0x320, vector | ((value >> 8) % 2) << 17);
                    write(t, 0x380, 1 + (value >> 16) % 3000);
                } else {
                    t.change_lapic_timer(kind % 4, value, 0);
                }
            }
            let lapic = t.vm.platform.lapic_for_tests(0);
            for &(v, level) in &self.in_service {
                lapic.accept(v, level);
                lapic.acknowledge(v);
            }
            write(t, 0x80, u64::from(self.tpr));
            if let Some(v) = self.irr {
                // A fixed IPI to self (shorthand 01).
                write(t, 0x300, 1 << 18 | u64::from(v));
            }
            t.vmcs.write(GuestNat::Rflags, self.rflags);
            t.vmcs.write(Guest32::InterruptibilityState, self.blocking);
            // The last look, and the entry it made.
            t.vm.platform.advance(self.looked);
            crate::exits::inject_pending_interrupt(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
            let _ = crate::exits::events::commit(&mut t.vmcs, &mut t.vcpu);
            // The exit: the entry's event delivered, the instruction at CS:EIP 0x100.
            let entry = crate::vmx::Control32::EntryInterruptionInfo;
            let info = t.vmcs.read(entry);
            t.vmcs.write(entry, info & !(1 << 31));
            t.vmcs.write(GuestNat::Rip, 0x100);
            t.vcpu.regs.rax = self.rax;
            t.vcpu.regs.rdx = self.rax >> 40;
            t.vmcs.set(ReadOnly32::IdtVectoringInfo, 0);
            if self.x2apic {
                // RDMSR (0F 32) or WRMSR (0F 30) of the register.
                let store = self.code[0] != 0x8b;
                t.vcpu.regs.rcx = 0x800 + (self.offset >> 4);
                t.vmcs
                    .set(ReadOnly32::ExitReason, if store { WRMSR } else { RDMSR });
                t.set_instruction_length(2);
                return;
            }
            t.vm.ram.bytes()[0x100..0x102].copy_from_slice(&self.code);
            let gpa = base + self.offset;
            t.vcpu.regs.rbx = gpa + self.rbx_skew;
            t.vmcs.set(ReadOnly32::ExitReason, EPT_VIOLATION);
            t.vmcs.set(ReadOnly64::GuestPhysicalAddr, gpa);
            t.set_qualification(self.qualification);
        }

        /// The tight loop's way: the run loop's choice between the two handlers.
        fn fast(&self, t: &mut TestBed) -> ApicExit {
            let raw = t.vmcs.read(ReadOnly32::ExitReason);
            let mut cx = ExitContext {
                vmcs: &mut t.vmcs,
                vcpu: &mut t.vcpu,
                vm: &mut t.vm,
                host: &mut t.host,
                now: self.now,
            };
            if raw == EPT_VIOLATION {
                handle_apic(&mut cx)
            } else {
                handle_x2apic(&mut cx, raw)
            }
        }
    }

    /// The general way after an exit: the dispatch, the action applied, and (the platform being
    /// touched: any but an x2APIC register's read) the run loop's look before the next entry.
    fn general_with_look(t: &mut TestBed, now: u64) -> Action {
        let raw = t.vmcs.read(ReadOnly32::ExitReason);
        let action = dispatch(&mut ExitContext {
            vmcs: &mut t.vmcs,
            vcpu: &mut t.vcpu,
            vm: &mut t.vm,
            host: &mut t.host,
            now,
        });
        crate::exits::apply(&mut t.vmcs, &mut t.vcpu, &action);
        let reason = ExitReason::from_basic(raw as u16);
        if crate::exits::touched_platform(reason, &t.vcpu, &mut t.vm) {
            t.vm.platform.advance(now);
            crate::exits::inject_pending_interrupt(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
        }
        action
    }

    /// An access to the local APIC's page (without APIC virtualization) made by
    /// [`handle_apic`] and entered again with no look at the platform, against the general
    /// dispatch and the look after it, from the same state: after the run loop's last look
    /// (the 8259A's IRQ0 raised or not, a LAPIC timer set or not, due by the exit or not,
    /// vectors waiting in IRR or in service, edge or level triggered, TPR, the guest open to
    /// interrupts or not, TF), the loads, stores and byte stores of 14 registers, and now and
    /// then an exit that is not an instruction's data access, that names the other direction,
    /// or whose operand is elsewhere; and the same registers read and written through the
    /// x2APIC's MSRs (values a WRMSR takes and values that are a #GP, and now and then with the
    /// APIC in xAPIC mode, where every such access is a #GP). Both leave the same
    /// registers, RIP, RFLAGS, interruptibility, pending debug exceptions, events, interrupt
    /// window, exit counts, platform state (every register of the APIC) and next deadline, and
    /// commit the same event at the next entry.
    #[test]
    fn an_apic_access_in_the_loop_ends_as_the_general_dispatch_does() {
        let mut r = Rng(0x5eed_a91c);
        let mut ways = [[0usize; 3]; 2];
        for round in 0..8000 {
            let a = ApicRound::random(&mut r);
            let mut fast = TestBed::new();
            let mut slow = TestBed::new();
            a.set_up(&mut fast);
            a.set_up(&mut slow);
            let way = a.fast(&mut fast);
            ways[usize::from(a.x2apic)][way as usize] += 1;
            let slow_action = general_with_look(&mut slow, a.now);
            match way {
                ApicExit::General => {
                    general_with_look(&mut fast, a.now);
                }
                ApicExit::Loaded | ApicExit::Stored => {
                    let done = [Action::AdvanceBy(2), Action::Advance];
                    assert!(done.contains(&slow_action), "{slow_action:?}");
                    assert_eq!(way == ApicExit::Stored, a.code[0] != 0x8b);
                }
            }
            let x2 = if a.x2apic { "x2APIC " } else { "" };
            let what = alloc::format!("round {round}: {way:?} {x2}at {:#x}", a.offset);
            for f in [
                GuestNat::Rip,
                GuestNat::Rflags,
                GuestNat::PendingDebugExceptions,
            ] {
                assert_eq!(fast.vmcs.read(f), slow.vmcs.read(f), "{what}: {f:?}");
            }
            let controls = crate::vmx::Control32::PrimaryProcBasedControls;
            assert_eq!(fast.vmcs.read(controls), slow.vmcs.read(controls), "{what}");
            assert_eq!(
                fast.vmcs.read(Guest32::InterruptibilityState),
                slow.vmcs.read(Guest32::InterruptibilityState),
                "{what}"
            );
            assert_eq!(fast.vcpu.regs, slow.vcpu.regs, "{what}");
            assert_eq!(fast.vcpu.stats.exits, slow.vcpu.stats.exits, "{what}");
            assert_eq!(fast.vcpu.stats.last_exit, slow.vcpu.stats.last_exit);
            assert_eq!(
                fast.vcpu.stats.interrupts_injected, slow.vcpu.stats.interrupts_injected,
                "{what}"
            );
            assert_eq!(fast.vcpu.events, slow.vcpu.events, "{what}");
            assert_eq!(saved(&fast), saved(&slow), "{what}: platform state");
            assert_eq!(
                fast.vm.platform.next_deadline(),
                slow.vm.platform.next_deadline(),
                "{what}"
            );
            let entry = crate::vmx::Control32::EntryInterruptionInfo;
            let f = crate::exits::events::commit(&mut fast.vmcs, &mut fast.vcpu);
            let s = crate::exits::events::commit(&mut slow.vmcs, &mut slow.vcpu);
            assert_eq!(f, s, "{what}");
            assert_eq!(fast.vmcs.read(entry), slow.vmcs.read(entry), "{what}");
        }
        // Every way is taken through both interfaces, the quiet ones often.
        assert!(ways.iter().flatten().all(|&n| n > 150), "{ways:?}");
    }

    /// A byte to the UART's transmitter (how Linux writes its console) drives no line and moves
    /// no timer: quiet in the loop as in the general dispatch, with its lines left for the run
    /// loop to print (`Platform::take_console_written`), in order and whole.
    #[test]
    fn a_console_byte_is_quiet_and_leaves_its_lines_to_print() {
        let qual = io_qual(0x3f8, 1, false, false, false);
        let quiet = [PortExit::Quiet, PortExit::Quiet];
        assert_eq!(port_same_as_dispatch(|_| {}, qual, u64::from(b'k')), quiet);
        let mut t = TestBed::new();
        t.long_mode();
        t.vmcs.set(ReadOnly32::ExitReason, IO);
        t.vmcs.set(ReadOnlyNat::ExitQualification, qual);
        t.vmcs.set(ReadOnly32::ExitInstructionLength, 1);
        for &b in b"ok\nno" {
            t.vcpu.regs.rax = u64::from(b);
            assert_eq!(handle_port(&mut cx(&mut t)), PortExit::Quiet);
            assert!(t.vm.platform.take_console_written(), "{b:#x}");
        }
        assert_eq!(t.vm.platform.console().take_line().as_deref(), Some("ok"));
        assert_eq!(t.vm.platform.console().take_line(), None, "no line yet");
        // The UART's scratch register: quiet, nothing to print.
        t.vmcs.set(
            ReadOnlyNat::ExitQualification,
            io_qual(0x3ff, 1, false, false, false),
        );
        assert_eq!(handle_port(&mut cx(&mut t)), PortExit::Quiet);
        assert!(!t.vm.platform.take_console_written());
    }

    #[test]
    fn port_accesses_in_the_loop_end_as_the_general_dispatch_does() {
        let quiet = [PortExit::Quiet, PortExit::Quiet];
        let nothing = |_: &mut TestBed| {};
        // bench64's: the UART's scratch register, written then read; 16- and 32-bit reads of
        // the UART (byte accesses at successive ports); a port no device claims.
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x3ff, 1, false, false, false), 0x5a),
            quiet
        );
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x3ff, 1, true, false, false), !0),
            quiet
        );
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x3fe, 2, true, false, false), !0),
            quiet
        );
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x3fc, 4, true, false, false), 7),
            quiet
        );
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x1234, 4, true, false, false), 7),
            quiet
        );
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x1234, 2, false, false, false), 7),
            quiet
        );
        // CMOS index then data (RTC: registers only).
        assert_eq!(
            port_same_as_dispatch(nothing, io_qual(0x70, 1, false, false, false), 0x30),
            quiet
        );
    }

    /// A quiet OUT in the loop with the guest's TPR and a vector requested on the virtual-APIC
    /// page: the model takes them before the run loop's next look at the platform (as after a
    /// CPUID), and the next exit that reaches the platform takes them before its device can
    /// drive a line (the general dispatch's `after_exit`).
    #[test]
    fn a_quiet_port_access_leaves_the_guests_tpr_for_the_next_look() {
        for next_exit_reaches_the_platform in [false, true] {
            let mut t = TestBed::with_virtual_interrupt_delivery();
            t.long_mode();
            t.enter().unwrap();
            t.vcpu.apicv.as_mut().unwrap().write_register(0x80, 0x20);
            t.vmcs.set(ReadOnly32::ExitReason, IO);
            t.vmcs.set(
                ReadOnlyNat::ExitQualification,
                io_qual(0x3ff, 1, false, false, false),
            );
            t.vmcs.set(ReadOnly32::ExitInstructionLength, 1);
            t.vmcs.set(GuestNat::Rip, 0x1000);
            t.vcpu.regs.rax = 0x5a;
            assert_eq!(handle_port(&mut cx(&mut t)), PortExit::Quiet);
            assert_eq!(t.vmcs.read(GuestNat::Rip), 0x1001);
            if next_exit_reaches_the_platform {
                // The 8259A's mask register: the device's access, the general follow-up.
                t.vmcs.set(
                    ReadOnlyNat::ExitQualification,
                    io_qual(0x21, 1, false, false, false),
                );
                assert!(matches!(handle_port(&mut cx(&mut t)), PortExit::Changed(_)));
                assert_eq!(
                    t.vm.platform.tpr(0),
                    0x20,
                    "taken before the device's access"
                );
            } else {
                t.enter().unwrap();
                assert_eq!(t.vm.platform.tpr(0), 0x20, "taken before the look");
            }
        }
    }

    #[test]
    fn port_accesses_that_reach_further_continue_into_the_follow_up() {
        let nothing = |_: &mut TestBed| {};
        let changed = |o: &[PortExit; 2]| o.iter().all(|o| matches!(o, PortExit::Changed(_)));
        // The 8259A (a read may acknowledge), the PIT's timer moved, the debug-exit device.
        assert!(changed(&port_same_as_dispatch(
            nothing,
            io_qual(0x20, 1, false, false, false),
            0x20
        )));
        assert!(changed(&port_same_as_dispatch(
            nothing,
            io_qual(0x21, 1, true, false, false),
            0
        )));
        let pit = |t: &mut TestBed| {
            t.vm.platform.io_write(0x43, 1, 0x34, 0);
            t.vm.platform.take_ports_quiet();
        };
        // Channel 0's count, low byte then high byte: the second starts it (its deadline moves).
        let out = port_same_as_dispatch(pit, io_qual(0x40, 1, false, false, false), 0x10);
        assert!(
            matches!(
                out,
                [
                    PortExit::Quiet,
                    PortExit::Changed(Handled { debug_exit: None })
                ]
            ),
            "{out:?}"
        );
        let out = port_same_as_dispatch(nothing, io_qual(0xf4, 1, false, false, false), 0x10);
        assert_eq!(
            out[0],
            PortExit::Changed(Handled {
                debug_exit: Some(0x21)
            })
        );
        // The UART's interrupt line: enabled (OUT2, IER.THRE), then raised by its IER write.
        let uart_irq = |t: &mut TestBed| {
            t.vm.platform.io_write(0x3fc, 1, 0x08, 0);
            t.vm.platform.take_ports_quiet();
        };
        let out = port_same_as_dispatch(uart_irq, io_qual(0x3f9, 1, false, false, false), 0x02);
        assert!(
            matches!(out[0], PortExit::Changed(Handled { debug_exit: None })),
            "{out:?}"
        );
    }

    #[test]
    fn string_io_and_armed_breakpoints_keep_the_general_path() {
        for (qual, dr7) in [
            (io_qual(0x3ff, 1, true, true, false), 0), // INSB
            (io_qual(0x3ff, 1, false, true, true), 0), // REP OUTSB
            (io_qual(0x3ff, 1, false, false, false), 0x400 | 1 << 1), // G0 armed
            (io_qual(0x3ff, 1, false, false, false), 0x400 | 1 << 6), // L3 armed
            (2, 0), // size encoding 2: not defined (SDM Table 28-5)
        ] {
            let mut t = TestBed::new();
            t.vmcs.set(ReadOnlyNat::ExitQualification, qual);
            t.vmcs.set(GuestNat::Dr7, dr7);
            t.vmcs.set(GuestNat::Rip, 0x1000);
            t.vcpu.regs.rax = 0x5a;
            assert_eq!(
                handle_port(&mut cx(&mut t)),
                PortExit::General,
                "{qual:#x} {dr7:#x}"
            );
            assert!(t.vcpu.stats.exits.iter().all(|&n| n == 0), "not counted");
            assert_eq!(t.vmcs.read(GuestNat::Rip), 0x1000, "not completed");
            let mut untouched = TestBed::new();
            assert_eq!(saved(&t), saved(&untouched), "no access made");
            assert!(untouched.vm.platform.take_ports_quiet());
        }
    }
}
