//! The guest's event queue: what is to be delivered to it at the next VM entry.
//!
//! Handlers never write the VM-entry event fields. They *request* events: an exception (an
//! [`Action::Inject`](super::Action::Inject) or [`EventQueue::exception`]), an NMI
//! ([`EventQueue::nmi`]); `inject_pending_interrupt` offers the platform's external interrupts,
//! and `dispatch` records the event whose delivery an exit interrupted (IDT-vectoring
//! information, SDM 28.2.4). [`commit`] is the one place that writes one of them to the VMCS,
//! right before VM entry, by the SDM's rules:
//!
//! - An exception raised while an event is being delivered combines with it as the processor's
//!   would (SDM Vol. 3A 6.15, Tables 6-4 and 6-5): contributory or page fault on top of a
//!   contributory fault or page fault gives #DF (error code 0); a contributory fault or page
//!   fault while #DF is delivered is a triple fault, and the guest stops as the processor would
//!   shut down; every other pair is handled serially (see [`EventQueue::exception`]).
//! - A fault-class exception Keel raises gets RF set in the guest's RFLAGS, because the
//!   processor pushes the RFLAGS of the guest-state area unchanged on injection (SDM 27.6.1.1)
//!   while a fault it delivers itself pushes RF = 1 (SDM 17.3.1.1). Traps (#DB, #BP, #OF),
//!   aborts, interrupts and re-delivered events keep RFLAGS as it is.
//! - An error code is delivered only for the vectors the VM-entry checks allow, and only in
//!   protected mode (SDM 27.2.1.3); #DF's is 0.
//! - An interrupted software interrupt or exception keeps its instruction length, so the RIP it
//!   pushes is past the instruction (SDM 27.6.1.1, 28.2.5).
//! - An NMI waits while the guest blocks NMIs (blocking by NMI, STI or MOV SS: SDM 27.3.1.5) and,
//!   with the "virtual NMIs" control, arms NMI-window exiting so Keel is back the moment the
//!   guest's IRET unblocks them (SDM 26.7.6). Without virtual NMIs there is no NMI window and no
//!   virtual-NMI blocking to honour; the NMI goes in at the first entry without STI/MOV-SS
//!   blocking.
//!
//! - A debug trap owed by an instruction Keel completed (single step: [`EventQueue::debug_trap`])
//!   goes through the pending-debug-exceptions field, so the CPU delivers it after VM entry and
//!   updates DR6 itself (SDM 27.7.3); an entry that injects anything would lose it, so NMIs and
//!   interrupts wait behind it (it has their priority anyway, SDM 6.9).
//!
//! Priority at one entry: the exception (or re-delivered event) or debug trap, then an NMI, then
//! an external interrupt (SDM 6.9).

use super::Exception;
use crate::guest::{StopReason, Vcpu};
use crate::vmx::controls::{PinBasedControls, PrimaryControls};
use crate::vmx::exit::{exception_has_error_code, vector};
use crate::vmx::{
    Control32, Guest32, GuestNat, Interruptibility, InterruptionInfo, InterruptionType, Vmcs,
};

use super::RFLAGS_RF;

const CR0_PE: u64 = 1;

/// The classes of SDM Vol. 3A Table 6-4 that decide whether two exceptions make a #DF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExceptionClass {
    /// #DB, NMI, #BP, #OF, #BR, #UD, #NM, #MF, #AC, #MC, #XM, and every interrupt (INTR, INT n).
    Benign,
    /// #DE, #TS, #NP, #SS, #GP, #CP.
    Contributory,
    /// #PF, #VE.
    PageFault,
    /// #DF itself: a contributory fault or page fault during its delivery shuts the CPU down.
    DoubleFault,
}

impl ExceptionClass {
    pub const fn of(vector: u8) -> Self {
        match vector {
            vector::DE | vector::TS..=vector::GP | vector::CP => Self::Contributory,
            vector::PF | vector::VE => Self::PageFault,
            vector::DF => Self::DoubleFault,
            _ => Self::Benign,
        }
    }

    /// The class of an event being delivered: interrupts, NMIs and software-raised exceptions
    /// (INT n, INT3, INTO, INT1) are benign.
    fn of_event(info: InterruptionInfo) -> Self {
        match info.kind() {
            InterruptionType::HardwareException => Self::of(info.vector()),
            _ => Self::Benign,
        }
    }
}

/// Whether the exception is a fault (SDM Vol. 3A Table 6-1), whose handler returns to the
/// faulting instruction: the processor sets RF in the RFLAGS image it pushes for one, so the
/// instruction is not stopped again by an instruction breakpoint (SDM 17.3.1.1). #DB counts as
/// a trap here: the #DB Keel raises (single step, I/O breakpoints) are traps, and an instruction
/// breakpoint, its fault form, pushes RF = 0.
pub const fn is_fault(vector: u8) -> bool {
    matches!(vector, 0 | 5..=7 | 10..=14 | 16 | 17 | 19..=21)
}

/// One event as the VM-entry injection fields hold it (SDM 25.8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Event {
    info: InterruptionInfo,
    error_code: u32,
    /// VM-entry instruction length, used for software interrupts and exceptions.
    instruction_len: u32,
    /// Keel raised it (rather than the processor, whose delivery an exit interrupted): a fault
    /// gets RF, and its error code follows the guest's mode.
    raised: bool,
}

impl Event {
    fn exception(e: Exception) -> Self {
        Self {
            info: InterruptionInfo::hardware_exception(
                e.vector,
                exception_has_error_code(e.vector),
            ),
            error_code: e.error_code.unwrap_or(0),
            instruction_len: 0,
            raised: true,
        }
    }
}

/// What the guest is owed at its next VM entries (one per guest; the SMP work makes it one per
/// vCPU).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventQueue {
    /// The event for the next entry: one an exit interrupted, or an exception Keel raised
    /// (combined with it), or the external interrupt `inject_pending_interrupt` chose.
    next: Option<Event>,
    /// An external interrupt whose delivery an exception interrupted: the processor had accepted
    /// it, so it is delivered once the guest can take interrupts again (the platform no longer
    /// has it pending).
    held_interrupt: Option<u8>,
    /// An NMI is pending (the local APIC latches one).
    nmi: bool,
    /// A fault during the delivery of #DF: the guest is to stop.
    triple_fault: bool,
    /// Pending-debug-exceptions bits for the next entry (SDM 25.4.2, Table 25-4).
    debug_trap: u64,
    /// Keel has NMI-window exiting on for this guest.
    nmi_window: bool,
}

/// The queue as part of a vCPU's state (`vcpu_state`): what it owes the guest survives a
/// snapshot. An event's interruption information is checked by the VM-entry checks when it is
/// injected (a bad one fails that entry and stops the guest, not Keel).
impl crate::state::Codec for InterruptionInfo {
    fn put(&self, w: &mut crate::state::Writer) {
        w.put(&self.0);
    }
    fn get(r: &mut crate::state::Reader<'_>) -> Result<Self, crate::state::StateError> {
        Ok(InterruptionInfo(r.get()?))
    }
}
crate::codec_struct!(Event {
    info,
    error_code,
    instruction_len,
    raised
});
crate::codec_struct!(EventQueue {
    next,
    held_interrupt,
    nmi,
    triple_fault,
    debug_trap,
    nmi_window
});

impl EventQueue {
    /// Requests a hardware exception. If an event is already queued for the next entry (the one
    /// an exit interrupted), the new exception arose while delivering it, and the pair is
    /// combined by SDM Vol. 3A Table 6-5:
    ///
    /// | first \ second | benign | contributory | page fault |
    /// |---|---|---|---|
    /// | benign | serially | serially | serially |
    /// | contributory | serially | #DF | serially |
    /// | page fault | serially | #DF | #DF |
    /// | double fault | serially | triple fault | triple fault |
    ///
    /// "Serially": the second exception is delivered. A first event that is an exception or a
    /// software interrupt is not kept: RIP still points at the instruction that raised it, so it
    /// is raised again when the second exception's handler returns to it. A first event that is
    /// an NMI or an external interrupt would not come back that way, so it is kept and delivered
    /// after the exception, when the guest can take it.
    pub fn exception(&mut self, e: Exception) {
        use ExceptionClass::*;
        // The instruction raised a fault, or its delivery did: it did not complete, and owes no
        // debug trap.
        self.debug_trap = 0;
        if self.triple_fault {
            return;
        }
        let second = Event::exception(e);
        let Some(first) = self.next else {
            self.next = Some(second);
            return;
        };
        match (
            ExceptionClass::of_event(first.info),
            ExceptionClass::of(e.vector),
        ) {
            (DoubleFault, Contributory | PageFault | DoubleFault) => {
                self.next = None;
                self.triple_fault = true;
            }
            (Contributory, Contributory) | (PageFault, Contributory | PageFault) => {
                self.next = Some(Event::exception(Exception {
                    vector: vector::DF,
                    error_code: Some(0),
                }));
            }
            _ => {
                match first.info.kind() {
                    InterruptionType::Nmi => self.nmi = true,
                    InterruptionType::External => self.held_interrupt = Some(first.info.vector()),
                    _ => {}
                }
                self.next = Some(second);
            }
        }
    }

    /// Requests the debug trap an instruction Keel completed owes: `bits` are pending debug
    /// exceptions (SDM 25.4.2, Table 25-4: B3-B0 with bit 12 "enabled breakpoint" for data and
    /// I/O breakpoints, bit 14 BS for single step), delivered by the CPU after the next entry
    /// as a #DB trap that sets the same bits in DR6 (SDM 27.7.3).
    pub fn debug_trap(&mut self, bits: u64) {
        self.debug_trap |= bits;
    }

    /// Requests an NMI (vector 2, interruption type NMI).
    pub fn nmi(&mut self) {
        self.nmi = true;
    }

    /// Records the event whose delivery the exit interrupted (SDM 28.2.4: IDT-vectoring
    /// information), to be delivered again as it was. Runs before the exit's handler.
    pub fn interrupted(&mut self, info: InterruptionInfo, error_code: u32, instruction_len: u32) {
        self.next = Some(Event {
            info: info.for_injection(),
            error_code,
            instruction_len,
            raised: false,
        });
    }

    /// The event an exit interrupted was delivered by Keel (a task switch through a task gate
    /// ends its delivery, SDM 6.12.2): it is not to be delivered again.
    pub fn delivered(&mut self) {
        self.next = None;
    }

    /// Queues an external interrupt the guest can take at this entry (its controller has
    /// acknowledged it).
    pub(super) fn interrupt(&mut self, vector: u8) {
        self.next = Some(Event {
            info: InterruptionInfo::external(vector),
            error_code: 0,
            instruction_len: 0,
            raised: false,
        });
    }

    /// An accepted external interrupt still owed to the guest (see `held_interrupt`).
    pub(super) fn held_interrupt(&self) -> Option<u8> {
        self.held_interrupt
    }

    pub(super) fn take_held_interrupt(&mut self) {
        self.held_interrupt = None;
    }

    /// Whether the next entry already delivers an event (so an external interrupt must wait for
    /// the one after): one is queued, or a pending NMI can go in now.
    pub(super) fn claims_entry<V: Vmcs + ?Sized>(&self, vmcs: &V) -> bool {
        self.next.is_some()
            || self.triple_fault
            || self.debug_trap != 0
            || (self.nmi && nmi_allowed(vmcs))
    }

    /// The interruption information of the queue's next event when it is an external
    /// interrupt and all the queue holds for this entry (no NMI pending or waited for, no debug
    /// trap, no triple fault): [`commit_queued`]'s short way.
    #[inline(always)]
    fn lone_external(&self) -> Option<InterruptionInfo> {
        let e = self.next?;
        let lone = e.info.kind() == InterruptionType::External
            && !e.info.has_error_code()
            && !self.nmi
            && !self.nmi_window
            && !self.triple_fault
            && self.debug_trap == 0;
        lone.then_some(e.info)
    }

    /// Nothing queued, held or waited for: an interrupt may go in at this entry as far as the
    /// queue is concerned (the LAPIC timer's injected short way, `super::timer_may_inject`).
    #[inline(always)]
    pub(super) fn quiet(&self) -> bool {
        self.idle() && self.held_interrupt.is_none()
    }

    /// Nothing for [`commit`] to write at the next entry (the run loop tells it once for the
    /// commit and its reflex, which is on only then: `runloop::reflex`).
    #[inline(always)]
    pub fn idle(&self) -> bool {
        self.next.is_none()
            && !self.nmi
            && !self.triple_fault
            && self.debug_trap == 0
            && !self.nmi_window
    }
}

/// Whether an NMI can be injected now: no blocking by MOV SS or STI (SDM 27.3.1.5, the latter on
/// some processors) and, with virtual NMIs, no virtual-NMI blocking.
fn nmi_allowed<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    let blocking = Interruptibility::from_bits_retain(vmcs.read(Guest32::InterruptibilityState));
    let mut blocked = Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_MOV_SS;
    if virtual_nmis(vmcs) {
        blocked |= Interruptibility::BLOCKING_BY_NMI;
    }
    !blocking.intersects(blocked)
}

fn virtual_nmis<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    vmcs.read(Control32::PinBasedControls) & PinBasedControls::VIRTUAL_NMIS.bits() != 0
}

/// Right before VM entry: writes the one event the guest gets at this entry to the VM-entry
/// injection fields and arms or disarms NMI-window exiting. `Err` means the guest is to stop (a
/// triple fault). Costs no VMCS access when nothing is queued.
#[inline(always)]
pub fn commit<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu) -> Result<(), StopReason> {
    // The common case, nothing queued, in the caller: no call, no saved registers.
    if vcpu.events.idle() {
        return Ok(());
    }
    commit_queued(vmcs, vcpu)
}

/// [`commit`] with something in the queue (not [`EventQueue::idle`]).
#[inline(never)]
pub fn commit_queued<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu) -> Result<(), StopReason> {
    let q = &mut vcpu.events;
    // The next most common case, an external interrupt alone (the one `inject_pending_interrupt`
    // or the LAPIC timer's short way queued): its interruption information is all there is to
    // write (no error code, no instruction length, SDM 25.8.3; no NMI to wait for), as the
    // general way below writes it.
    if let Some(info) = q.lone_external() {
        q.next = None;
        vmcs.write(Control32::EntryInterruptionInfo, info.raw());
        return Ok(());
    }
    commit_general(vmcs, vcpu)
}

/// [`commit_queued`]'s general way: every event the queue can hold.
#[inline(always)]
fn commit_general<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu) -> Result<(), StopReason> {
    let q = &mut vcpu.events;
    if q.triple_fault {
        *q = EventQueue::default();
        return Err(StopReason::TripleFault);
    }
    let mut nmi_window = false;
    if let Some(event) = q.next.take() {
        write(vmcs, event);
        if event.raised {
            vcpu.stats.exceptions_injected += 1;
        }
        nmi_window = q.nmi;
    } else if q.debug_trap != 0 {
        let pending = vmcs.read(GuestNat::PendingDebugExceptions);
        vmcs.write(
            GuestNat::PendingDebugExceptions,
            pending | core::mem::take(&mut q.debug_trap),
        );
        nmi_window = q.nmi;
    } else if q.nmi {
        if nmi_allowed(vmcs) {
            q.nmi = false;
            write(
                vmcs,
                Event {
                    info: InterruptionInfo::nmi(),
                    error_code: 0,
                    instruction_len: 0,
                    raised: true,
                },
            );
        } else {
            nmi_window = true;
        }
    }
    // SDM 26.2.1.1: NMI-window exiting needs virtual NMIs.
    let nmi_window = nmi_window && virtual_nmis(vmcs);
    if nmi_window != q.nmi_window {
        let bit = PrimaryControls::NMI_WINDOW_EXITING.bits();
        let primary = vmcs.read(Control32::PrimaryProcBasedControls);
        let new = if nmi_window {
            primary | bit
        } else {
            primary & !bit
        };
        vmcs.write(Control32::PrimaryProcBasedControls, new);
        q.nmi_window = nmi_window;
    }
    Ok(())
}

/// Writes one event to the VM-entry injection fields (SDM 25.8.3).
fn write<V: Vmcs + ?Sized>(vmcs: &mut V, event: Event) {
    let mut info = event.info;
    let kind = info.kind();
    if event.raised && kind == InterruptionType::HardwareException {
        // SDM 27.2.1.3: with unrestricted guest, no error code in real mode.
        let protected = vmcs.read(GuestNat::Cr0) & CR0_PE != 0;
        info = InterruptionInfo::hardware_exception(
            info.vector(),
            protected && exception_has_error_code(info.vector()),
        );
        if is_fault(info.vector()) {
            let rflags = vmcs.read(GuestNat::Rflags);
            vmcs.write(GuestNat::Rflags, rflags | RFLAGS_RF);
        }
    }
    if kind == InterruptionType::Nmi && !event.raised {
        // An NMI whose delivery an exit interrupted: blocking by NMI was set as its delivery
        // began and must be clear to inject it again (SDM 27.3.1.5).
        let blocking = vmcs.read(Guest32::InterruptibilityState);
        let nmi = Interruptibility::BLOCKING_BY_NMI.bits();
        if blocking & nmi != 0 {
            vmcs.write(Guest32::InterruptibilityState, blocking & !nmi);
        }
    }
    vmcs.write(Control32::EntryInterruptionInfo, info.raw());
    if info.has_error_code() {
        vmcs.write(Control32::EntryExceptionErrorCode, event.error_code);
    }
    if kind.needs_instruction_length() {
        vmcs.write(Control32::EntryInstructionLength, event.instruction_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_classes_follow_table_6_4() {
        let of = |class| {
            (0..32u8)
                .filter(|&v| ExceptionClass::of(v) == class)
                .collect::<alloc::vec::Vec<_>>()
        };
        assert_eq!(of(ExceptionClass::Contributory), [0, 10, 11, 12, 13, 21]);
        assert_eq!(of(ExceptionClass::PageFault), [14, 20]);
        assert_eq!(of(ExceptionClass::DoubleFault), [8]);
        assert_eq!(
            ExceptionClass::of_event(InterruptionInfo::external(13)),
            ExceptionClass::Benign
        );
        let faults: alloc::vec::Vec<u8> = (0..32).filter(|&v| is_fault(v)).collect();
        assert_eq!(faults, [0, 5, 6, 7, 10, 11, 12, 13, 14, 16, 17, 19, 20, 21]);
    }

    /// `commit` (with its short way for an external interrupt alone) against `commit_general`
    /// over random queues: external interrupts, re-injected events of every
    /// type, exceptions raised on them, NMIs, debug traps, with and without virtual NMIs and
    /// NMI blocking: the same VMCS fields, the same queue, the same counters and result; and
    /// the short way is taken.
    #[test]
    fn an_external_interrupt_alone_commits_as_the_general_way() {
        use crate::exits::testing::{Rng, TestBed};
        use crate::vmx::controls::PinBasedControls;
        let mut rng = Rng(0x243f_6a88_85a3_08d3);
        let mut short = 0;
        for round in 0..20_000 {
            let mut a = TestBed::new();
            let pin = if rng.below(2) == 0 {
                PinBasedControls::VIRTUAL_NMIS.bits()
            } else {
                0
            };
            a.vmcs.write(Control32::PinBasedControls, pin);
            a.vmcs
                .write(Guest32::InterruptibilityState, rng.below(16) as u32);
            a.vmcs.write(GuestNat::Cr0, rng.below(2));
            let q = &mut a.vcpu.events;
            for _ in 0..rng.below(3) + 1 {
                match rng.below(8) {
                    0..=2 => q.interrupt(rng.next() as u8),
                    3 => {
                        let kind = rng.below(8) as u32;
                        let info = InterruptionInfo(1 << 31 | kind << 8 | rng.below(256) as u32);
                        q.interrupted(info, rng.next() as u32, rng.below(16) as u32);
                    }
                    4 => q.exception(Exception {
                        vector: [6, 13, 14, 8, 3][rng.below(5) as usize],
                        error_code: rng.below(2).checked_sub(1).map(|_| 0),
                    }),
                    5 => q.nmi(),
                    6 => q.debug_trap(1 << 14),
                    _ => {}
                }
            }
            let mut b = TestBed::new();
            b.vmcs = a.vmcs.clone();
            b.vcpu.events = a.vcpu.events.clone();
            if a.vcpu.events.lone_external().is_some() {
                short += 1;
            }
            let ra = commit(&mut a.vmcs, &mut a.vcpu);
            let rb = if b.vcpu.events.idle() {
                Ok(())
            } else {
                commit_general(&mut b.vmcs, &mut b.vcpu)
            };
            assert_eq!(ra, rb, "round {round}");
            assert_eq!(a.vmcs.fields, b.vmcs.fields, "round {round}");
            assert_eq!(a.vcpu.events, b.vcpu.events, "round {round}");
            assert_eq!(
                a.vcpu.stats.exceptions_injected, b.vcpu.stats.exceptions_injected,
                "round {round}"
            );
        }
        assert!(short > 3000, "the short way taken {short} times");
    }
}
