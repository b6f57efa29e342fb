//! The exits APIC virtualization brings (`vmx::apicv`), and keeping the local APIC model and the
//! virtual-APIC page in step around every exit.
//!
//! - "TPR below threshold" (SDM 30.1.2, trap-like: the instruction that lowered VTPR has
//!   completed): nothing to emulate; the run loop then finds the interrupt the TPR let through.
//! - "APIC access" (SDM 30.4, 28.2.1 Table 28-6 for the qualification): an access to the xAPIC page
//!   the CPU does not virtualize. A data read or write by an instruction is emulated through the
//!   local APIC model, exactly as an EPT violation there is without APIC virtualization; an
//!   instruction fetch or an access during event delivery or a page walk stops the guest with
//!   the reasons `exits::ept` gives for the same accesses.

use super::{Action, ExitContext};
use crate::devices::lapic::X2APIC_MSRS;
#[cfg(test)]
use crate::devices::lapic::{APIC_BASE_ENABLE, APIC_BASE_EXTD};
use crate::devices::platform::ApicView;
use crate::devices::{ShotWay, TimerShot};
use crate::guest::{StopReason, Vcpu, Vm};
use crate::vmx::apicv::VirtualApic;
use crate::vmx::{ReadOnly64, ReadOnlyNat, Vmcs};
use alloc::format;

/// APIC-access exit qualification, bits 15:12: how the page was accessed (SDM Table 28-6).
mod access_type {
    pub const LINEAR_READ: u64 = 0;
    pub const LINEAR_WRITE: u64 = 1;
    pub const LINEAR_FETCH: u64 = 2;
    pub const LINEAR_EVENT_DELIVERY: u64 = 3;
    pub const PHYSICAL_EVENT_DELIVERY: u64 = 10;
    pub const PHYSICAL_FETCH_OR_WALK: u64 = 15;
}

/// After an exit that reaches the platform, before its handler: the model takes the TPR the
/// guest left in VTPR (CR8 and MMIO TPR writes do not exit), before anything looks at its
/// priorities.
///
/// With virtual-interrupt delivery the model takes IRR and ISR from VIRR and VISR too: the
/// CPU delivered interrupts and virtualized EOIs while the guest ran, and everything that reads
/// the model after the exit (a register read, PPR, the next interrupt, a snapshot) must see
/// that. Skipped when nothing can have changed: both were empty at the entry and the guest
/// interrupt status still reads RVI = SVI = 0 (`VirtualApic::unchanged`).
#[inline]
pub fn after_exit<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu, vm: &mut Vm) {
    take(vcpu, vm, |a| a.unchanged(vmcs));
}

/// [`after_exit`]'s work; the vectors are taken unless `unchanged` says the CPU left them as
/// they were.
#[inline]
fn take(vcpu: &mut Vcpu, vm: &mut Vm, unchanged: impl FnOnce(&VirtualApic) -> bool) {
    if let Some(a) = &mut vcpu.apicv {
        a.vtpr_unread = false;
        if !a.features().tpr_shadow {
            // Virtual-interrupt delivery needs the TPR shadow (SDM 27.2.1.1): nothing to take.
            return;
        }
        let mut l = vm.platform.apic_view(vcpu.index);
        let vtpr = a.vtpr();
        if l.tpr() != vtpr {
            l.set_tpr(vtpr);
        }
        if a.features().virtual_interrupt_delivery && !unchanged(a) {
            let (irr, isr) = a.take_vectors();
            l.set_vectors(&irr, &isr);
        }
    }
}

/// With APIC-register virtualization in xAPIC mode, a write of the ICR's high half stays on the
/// page without an exit (SDM 30.4.3.2): the model takes it before it sends an IPI, before its
/// registers are written to the page (which would overwrite it) and before a snapshot.
fn take_icr_high(a: &VirtualApic, l: &mut ApicView<'_>) {
    if a.features().register_virtualization && a.accesses_virtualized() {
        let high = a.register(ICR_HIGH);
        if l.icr_high() != high {
            l.set_icr_high(high);
        }
    }
}

/// Offsets of the ICR's halves on the xAPIC page (SDM Table 11-1).
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: usize = 0x310;

/// After an exit that does not reach the platform (CPUID, VMCALL, ...): VTPR is taken later,
/// by [`take_unread`], if the platform is looked at before the next exit that reaches it.
#[inline]
pub fn leave_vtpr(vcpu: &mut Vcpu) {
    if let Some(a) = &mut vcpu.apicv {
        a.vtpr_unread = true;
    }
}

/// Before the run loop looks at the platform (a timer fell due, a slice starts): the TPR (and
/// with virtual-interrupt delivery IRR and ISR) the guest left on the virtual-APIC page since
/// the last exit that took them. Not later than that: a handler may have changed the model's
/// TPR since (an x2APIC TPR write), which VTPR gets at the next entry.
#[inline]
pub fn take_unread<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu, vm: &mut Vm) {
    if vcpu.apicv.as_ref().is_some_and(|a| a.vtpr_unread) {
        take(vcpu, vm, |a| a.unchanged(vmcs));
    }
}

/// [`take_unread`] with the guest's VMCS not at hand (before a snapshot): the vectors are taken
/// whether or not they changed.
pub fn take_unread_vtpr(vcpu: &mut Vcpu, vm: &mut Vm) {
    if vcpu.apicv.as_ref().is_some_and(|a| a.vtpr_unread) {
        take(vcpu, vm, |_| false);
    }
    if let Some(a) = &vcpu.apicv {
        take_icr_high(a, &mut vm.platform.apic_view(vcpu.index));
    }
}

/// Before an entry that follows a device access (the model may have changed its TPR, its IRR or
/// its mode): VTPR, the TPR threshold and "virtualize APIC accesses" from the model. Inlined
/// into the run loop's one platform look (a call costs every general exit about 26 more with
/// APIC virtualization off, where this is one test, measured).
#[inline(always)]
pub fn before_entry<V: Vmcs + ?Sized>(vmcs: &mut V, vcpu: &mut Vcpu, vm: &mut Vm) {
    let cpu = vcpu.index;
    let Some(a) = &mut vcpu.apicv else {
        return;
    };
    // The vCPU's APIC looked up once for all of it.
    let mut l = vm.platform.apic_view(cpu);
    a.before_entry(vmcs, l.tpr(), || l.highest_irr(), l.mode());
    if a.features().virtual_interrupt_delivery {
        let (irr, isr, tmr, enabled, summaries) = l.vectors();
        let rvi = a.post(vmcs, (irr, isr), summaries, tmr, enabled);
        // From here the CPU owns them until the next exit; what arrives meanwhile (from a
        // sibling on another host CPU) is merged at that exit (`Lapic::set_vectors`).
        l.posted();
        // The entry recognizes a virtual interrupt when RVI[7:4] > VPPR[7:4] (SDM 27.3.2.5,
        // 30.2.1); VPPR is the model's PPR (the same TPR and highest in-service vector,
        // SDM 30.1.3).
        if rvi >> 4 > l.ppr() >> 4 {
            hold_while_masked(vmcs);
        }
    }
    if a.features().register_virtualization {
        // The registers the guest reads without an exit (SDM 30.4.2, 30.5): those the model
        // changed, and in x2APIC mode the PPR (an xAPIC read of the PPR exits).
        if a.x2apic_virtualized() {
            a.set_vppr(l.ppr());
        }
        if l.page_stale() {
            take_icr_high(a, &mut l);
            if let Some(image) = l.take_page_image() {
                a.mirror(&image);
            }
        } else if let Some(icr) = l.take_icr() {
            // An IPI sent: one register, not the whole image.
            a.mirror(&[icr]);
        }
    }
}

/// Before an entry at which the CPU will recognize a virtual interrupt: if the guest has
/// RFLAGS.IF = 0, arms interrupt-window exiting, under which the CPU recognizes none (SDM
/// 30.2.1: a virtual interrupt is recognized only while "interrupt-window exiting" is 0). The
/// window exit comes once the guest sets IF and has no STI/MOV-SS blocking (SDM 26.7.5), and the
/// next entry lets the CPU recognize and deliver it (`exits::inject_pending_interrupt` clears
/// the window then).
///
/// On silicon a recognized virtual interrupt waits for IF = 1 anyway (SDM 30.2.2), so this
/// costs one exit and changes nothing the guest sees. It is for Bochs 2.7: while the guest has
/// IF = 0 with "external-interrupt exiting" set, a physical interrupt arriving for the host
/// CPU (a kick from another host CPU) makes it deliver the recognized virtual interrupt
/// instead of exiting, IF = 0 or not (its `InterruptAcknowledge` checks that the virtual
/// interrupt is pending, not that it is unmasked). A Linux guest then took its serial
/// interrupt inside a CLI section and deadlocked on the port lock it held (docs/SECURITY.md).
/// A virtual interrupt the guest makes recognizable itself while it runs with IF = 0 after an
/// entry with IF = 1 (an EOI or a TPR write below a pending vector, a self-IPI) is not
/// covered here (no exit tells Keel of it): kicks are NMIs for that (`arch::smp::kick`), so
/// no physical maskable interrupt reaches the CPU in guest mode; with fixed-IPI kicks (no
/// virtual NMIs) it stays open.
#[inline]
fn hold_while_masked<V: Vmcs + ?Sized>(vmcs: &mut V) {
    use crate::vmx::controls::PrimaryControls;
    use crate::vmx::{Control32, GuestNat};
    if vmcs.read(GuestNat::Rflags) & super::RFLAGS_IF != 0 {
        return;
    }
    let window = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
    let primary = vmcs.read(Control32::PrimaryProcBasedControls);
    if primary & window == 0 {
        vmcs.write(Control32::PrimaryProcBasedControls, primary | window);
    }
}

/// Whether the last post to `vcpu`'s virtual-APIC page (virtual-interrupt delivery) left
/// vectors there that only a platform look takes back: until one, [`timer_shot`] finds no
/// shot and the timer's exit goes the general way.
#[inline]
pub fn post_outstanding(vcpu: &Vcpu) -> bool {
    vcpu.apicv
        .as_ref()
        .is_some_and(|a| a.features().virtual_interrupt_delivery && !a.idle())
}

/// After an exit that changed nothing of the APIC's vectors (a TSC-deadline move), with the
/// last post outstanding ([`post_outstanding`]): when the guest took and ended every vector
/// posted (RVI = SVI = 0, so VIRR and VISR are empty: `VirtualApic::unchanged`) and none
/// arrived for the model since the post, the model takes the empty vectors and the page counts
/// as posted empty, what the platform look's take and post would make of it. The guest's TPR
/// is left in VTPR for the next look, as after a register-only exit. False, nothing changed,
/// otherwise: the look is the way.
#[inline]
pub fn settle_empty<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu, vm: &mut Vm) -> bool {
    let Some(a) = &mut vcpu.apicv else {
        return false;
    };
    if !a.features().virtual_interrupt_delivery
        || a.idle()
        || vmcs.read(crate::vmx::Guest16::InterruptStatus) != 0
        || !vm.platform.apic_view(vcpu.index).settle_empty()
    {
        return false;
    }
    a.posted_empty();
    true
}

/// The guest's LAPIC timer expiry worked out ahead at a platform look (after [`before_entry`]),
/// for [`fire_timer_now`] after the VMX-preemption-timer exit it is armed for: with
/// virtual-interrupt delivery and a page the post left empty (else the short way is not taken
/// anyway), `Platform::timer_shot`.
///
/// Without APIC virtualization the expiry is injected instead (`ShotWay::Injected`,
/// `super::inject_timer_now`). With the TPR shadow but no virtual-interrupt delivery there is
/// no shot: the guest's TPR is in VTPR, and the general look is the way.
#[inline]
pub fn timer_shot(vcpu: &Vcpu, vm: &Vm) -> Option<TimerShot> {
    let way = match &vcpu.apicv {
        None => ShotWay::Injected,
        Some(a) if a.features().virtual_interrupt_delivery && a.idle() => ShotWay::Posted {
            mirrored: a.features().register_virtualization,
        },
        Some(_) => return None,
    };
    vm.platform.timer_shot(vcpu.index, way)
}

/// The platform look before the entry after a VMX-preemption-timer exit (`exits::fast`),
/// made short when the guest's local APIC timer is all that fell due by `now` (the guest's
/// TSC) and all there is to deliver: with virtual-interrupt delivery, the page and the model as
/// the last post left them with nothing pending or in service (`VirtualApic::unchanged`,
/// `Lapic::timer_alone_vector`), no interrupt held in the event queue, the 8259A's output down
/// and no interrupt window asked for. Then the guest's TPR is taken, the timer fires as `shot`
/// (from [`timer_shot`] at the last platform look) worked it out (`Platform::fire_shot`, which
/// refuses if any timer changed since) and its vector is posted as one VIRR word and RVI
/// (`VirtualApic::post_one`): what [`take_unread`], `Platform::advance`,
/// `exits::inject_pending_interrupt` and [`before_entry`] make of the same state, without
/// their general checks (a unit test compares the two over random timer set-ups). False when
/// the case is another; the general look is then the way (the TPR it may have taken already
/// is taken again as the same).
///
/// The short way comes in two parts: this one, whether the guest's state is the case it
/// handles, which does not depend on the time and is made before the run loop waits for the
/// deadline (`runloop::catch_up`, which changes nothing it looks at); and [`fire_timer_now`],
/// the post, after the wait: the interrupt's way in after its deadline.
///
/// Without APIC virtualization the short way injects the vector instead
/// (`super::timer_may_inject`, `super::inject_timer_now`).
#[inline]
pub fn timer_may_fire<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &Vcpu, vm: &Vm) -> bool {
    let Some(a) = &vcpu.apicv else {
        return super::timer_may_inject(vmcs, vcpu, vm);
    };
    if !a.features().virtual_interrupt_delivery
        || !a.unchanged(vmcs)
        || vcpu.events.held_interrupt().is_some()
        || !vm.platform.pic_output_down()
    {
        return false;
    }
    // `inject_pending_interrupt` would clear the window bit with nothing to wait for.
    if super::window_asked(vmcs) {
        return false;
    }
    // With IF = 0 the vector is to wait behind the interrupt window (`hold_while_masked`),
    // which the general look arms.
    vmcs.read(crate::vmx::GuestNat::Rflags) & super::RFLAGS_IF != 0
}

/// The short way's post (above) once [`timer_may_fire`] said yes, with nothing changed since.
#[inline]
pub fn fire_timer_now<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    vcpu: &mut Vcpu,
    vm: &mut Vm,
    now: u64,
    shot: &TimerShot,
) -> bool {
    let cpu = vcpu.index;
    let Some(a) = &mut vcpu.apicv else {
        return super::inject_timer_now(vcpu, vm, now, shot);
    };
    // `take_unread` of a page found unchanged: the TPR alone (written out rather than calling
    // `take`, whose second look at `vcpu.apicv` and the TPR-shadow test cost `irq` 5 more),
    // given to the APIC by `fire_shot`, which looks it up once for that and the timer.
    a.vtpr_unread = false;
    let Some(vector) = vm.platform.fire_shot(cpu, now, shot, a.vtpr()) else {
        return false;
    };
    a.post_one(vmcs, vector);
    // What `before_entry` writes besides the post: VPPR in x2APIC mode with register
    // virtualization (the page image and the ICR are not stale, `Lapic::timer_alone_vector`);
    // VTPR, the TPR threshold (0 with virtual-interrupt delivery) and the APIC-mode controls
    // are as the last entry left them, the TPR having come from VTPR and the mode unchanged
    // (it changes only by an exit that reaches the platform, after which the general look runs).
    if a.features().register_virtualization && a.x2apic_virtualized() {
        a.set_vppr(vm.platform.apic_view(cpu).ppr());
    }
    true
}

/// Whether the CPU delivers the local APIC's interrupts itself (virtual-interrupt delivery):
/// then Keel injects only the 8259A's (`exits::inject_pending_interrupt`).
#[inline]
pub fn delivers_interrupts(vcpu: &Vcpu) -> bool {
    vcpu.apicv
        .as_ref()
        .is_some_and(|a| a.features().virtual_interrupt_delivery)
}

/// A virtualized-EOI exit (SDM 30.1.4, trap-like; the qualification is the vector): the CPU
/// has cleared the vector from VISR (the model took that in `after_exit`) and exits because its
/// EOI-exit bit is set, the vector being level triggered: the EOI goes on to the IOAPIC.
pub fn virtualized_eoi<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let vector = cx.vmcs.read(ReadOnlyNat::ExitQualification) as u8;
    cx.vm.platform.virtualized_eoi(cx.vcpu.index, vector);
    Action::Resume
}

/// An APIC-write exit (SDM 30.4.3.3, trap-like; bits 11:0 of the qualification are the page
/// offset): the guest's write is on the virtual-APIC page, and the CPU leaves its effect to
/// Keel, which the model carries out as it does an emulated write (the next entry writes back
/// what the model made of it, `before_entry`). With virtual-interrupt delivery that is an ICR
/// write the CPU does not turn into a self-IPI itself (SDM 30.4.3.3: an IPI to another
/// destination, a self-IPI by destination instead of shorthand, an NMI): a fixed interrupt to this
/// vCPU lands in the model's IRR, which the next entry posts into VIRR. With APIC-register
/// virtualization it is also a write of the ID, LDR, DFR, SVR, ESR, an LVT entry or the timer
/// (SDM 30.4.3.2). In x2APIC mode it is a SELF IPI of a vector below 16, which the CPU does
/// not virtualize (SDM 30.5): the model's SELF IPI register takes the 64 bits it wrote.
pub fn apic_write<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let offset = cx.vmcs.read(ReadOnlyNat::ExitQualification) & 0xff0;
    let Some(a) = &cx.vcpu.apicv else {
        return Action::Stop(StopReason::Killed(format!(
            "APIC-write exit at offset {offset:#x} without APIC virtualization"
        )));
    };
    let value = a.register(offset as usize);
    let cpu = cx.vcpu.index;
    if a.x2apic_virtualized() {
        let msr = *X2APIC_MSRS.start() + (offset >> 4) as u32;
        let value = a.register64(offset as usize);
        // Trap-like: the WRMSR has completed, and the CPU checked what it virtualizes (bits
        // 63:8 of a SELF IPI are 0); a write the model refuses has no effect.
        let _ = cx.vm.platform.x2apic_write(cpu, msr, value, cx.now);
        return Action::Resume;
    }
    if offset == ICR_LOW {
        take_icr_high(a, &mut cx.vm.platform.apic_view(cpu));
    }
    let gpa = cx.vm.platform.board().lapic_base + offset;
    cx.vm
        .platform
        .mmio_write(cpu, gpa, 4, u64::from(value), cx.now);
    Action::Resume
}

/// An APIC-access VM exit. The messages for the accesses Keel does not emulate are those of
/// `exits::ept` for the same accesses to an unmapped device page.
pub fn access<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let q = cx.vmcs.read(ReadOnlyNat::ExitQualification);
    let kind = (q >> 12) & 0xf;
    // Bits 11:0 are the page offset of a linear access; a guest-physical access reports its
    // address in the guest-physical address field (SDM 28.2.1, Table 28-6; 28.2.4).
    let gpa = if kind >= access_type::PHYSICAL_EVENT_DELIVERY {
        cx.vmcs.read(ReadOnly64::GuestPhysicalAddr)
    } else {
        cx.vm.platform.board().lapic_base + (q & 0xfff)
    };
    match kind {
        access_type::LINEAR_READ | access_type::LINEAR_WRITE => crate::mmio::emulate(cx, gpa),
        access_type::LINEAR_FETCH => {
            Action::Stop(StopReason::BadMemoryAccess { gpa, write: false })
        }
        access_type::LINEAR_EVENT_DELIVERY | access_type::PHYSICAL_EVENT_DELIVERY => {
            Action::Stop(StopReason::Killed(format!(
                "event delivery touched guest-physical {gpa:#x}, which is device memory (IDT, GDT \
                 or stack outside RAM)"
            )))
        }
        access_type::PHYSICAL_FETCH_OR_WALK => Action::Stop(StopReason::Killed(format!(
            "the guest's page walk touched guest-physical {gpa:#x} (page tables outside RAM)"
        ))),
        other => Action::Stop(StopReason::Killed(format!(
            "APIC-access exit of access type {other} at {gpa:#x}, which Keel does not handle"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::guest::StopReason;
    use crate::vmx::apicv::{summary, ApicvFeatures};
    use crate::vmx::controls::PrimaryControls;
    use crate::vmx::{
        Control32, Control64, ExitReason, Guest16, GuestNat, ReadOnly64, Vmcs, VmcsAccess,
        VmcsField,
    };

    fn with_apicv() -> TestBed {
        let mut t = TestBed::new();
        t.enable_apicv(ApicvFeatures {
            tpr_shadow: true,
            virtualize_apic_accesses: true,
            virtual_interrupt_delivery: false,
            ..ApicvFeatures::default()
        });
        t
    }

    /// VIRR's word for vectors 0x60-0x7f.
    const VIRR_3: usize = crate::vmx::apicv::VIRR + 3 * 16;

    fn with_vid() -> TestBed {
        TestBed::with_virtual_interrupt_delivery()
    }

    fn vapic(t: &TestBed) -> &crate::vmx::apicv::VirtualApic {
        t.vcpu.apicv.as_ref().unwrap()
    }

    /// RVI (bits 7:0) and SVI (15:8) of the guest interrupt status.
    fn rvi_svi(t: &TestBed) -> (u8, u8) {
        let s = t.vmcs.read(Guest16::InterruptStatus);
        (s as u8, (s >> 8) as u8)
    }

    fn window_armed(t: &TestBed) -> bool {
        let window = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        t.vmcs.read(Control32::PrimaryProcBasedControls) & window != 0
    }

    /// With virtual-interrupt delivery an interrupt for the local APIC is posted into VIRR and
    /// RVI, whether the guest can take it now or not: no injection (the CPU delivers it when it
    /// can, SDM 30.2.1), and an interrupt window only while the guest has IF = 0.
    #[test]
    fn interrupts_are_posted_into_the_virtual_irr() {
        for rflags in [0x202, 0x2] {
            let mut t = with_vid();
            t.self_ipi(0x51);
            t.vmcs.write(GuestNat::Rflags, rflags);
            t.enter().unwrap();
            assert_eq!(t.injected(), None, "RFLAGS {rflags:#x}");
            // With IF = 0 the window holds it back (the test after this one says why).
            assert_eq!(window_armed(&t), rflags == 0x2, "RFLAGS {rflags:#x}");
            assert_eq!(vapic(&t).vectors().0[2], 1 << 0x11, "VIRR");
            assert_eq!(rvi_svi(&t), (0x51, 0));
            assert_eq!(t.vm.platform.stats().acknowledged, 0);
        }
    }

    /// What the CPU did while the guest ran (delivered 0x51: VIRR to VISR) is what the model
    /// reads at the next exit: IRR, ISR and PPR through the guest's register reads, and the next
    /// entry keeps SVI.
    /// An interrupt posted at an entry where the guest has RFLAGS.IF = 0 (here right after a
    /// CLI at which a kick from another host CPU brought it out) is still posted, and the entry
    /// arms interrupt-window exiting, which keeps the CPU from recognizing it until the guest
    /// sets IF (SDM 30.2.1). Without it, Bochs 2.7 delivers a recognized virtual interrupt
    /// with IF = 0 at the next physical interrupt (its `InterruptAcknowledge`), which is how
    /// the Linux stress test's vCPU took the serial interrupt inside a CLI section. At the
    /// window exit (IF = 1) the window is off again and the vector goes in.
    #[test]
    fn an_interrupt_posted_while_the_guest_masks_interrupts_waits_for_its_window() {
        let mut t = with_vid();
        t.self_ipi(0x51);
        t.vmcs.write(GuestNat::Rflags, 0x2);
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0x51, 0), "still posted");
        assert!(window_armed(&t), "IF = 0: the window holds it back");
        assert_eq!(t.injected(), None);
        // The guest executes STI: the interrupt-window exit.
        t.vmcs.write(GuestNat::Rflags, 0x202);
        assert_eq!(t.run(ExitReason::InterruptWindow), Action::Resume);
        t.enter().unwrap();
        assert!(!window_armed(&t), "IF = 1: the CPU delivers it");
        assert_eq!(rvi_svi(&t), (0x51, 0));
        assert_eq!(t.injected(), None);

        // A vector the TPR holds back is not recognized (RVI[7:4] <= VPPR[7:4]): no window.
        let mut t = with_vid();
        let base = crate::devices::lapic::LAPIC_BASE;
        t.vm.platform.mmio_write(0, base + 0x80, 4, 0x60, 0);
        t.self_ipi(0x51);
        t.vmcs.write(GuestNat::Rflags, 0x2);
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0x51, 0));
        assert!(!window_armed(&t), "0x51 is below the TPR's class");
    }

    /// The short look after a preemption-timer exit (`timer_may_fire`, `fire_timer_now`) leaves
    /// an entry with IF = 0 to the general look, which arms the window for the timer's vector.
    #[test]
    fn the_short_timer_look_leaves_a_masked_guest_to_the_general_one() {
        let mut t = with_vid();
        let base = crate::devices::lapic::LAPIC_BASE;
        t.vmcs.write(GuestNat::Rflags, 0x2);
        t.enter().unwrap();
        // One-shot timer, vector 0x40, count 1, divide by 1.
        t.vm.platform.mmio_write(0, base + 0x3e0, 4, 0xb, 0);
        t.vm.platform.mmio_write(0, base + 0x320, 4, 0x40, 0);
        t.vm.platform.mmio_write(0, base + 0x380, 4, 1, 0);
        t.enter().unwrap();
        let shot = super::timer_shot(&t.vcpu, &t.vm).expect("the timer alone is due");
        crate::exits::fast::handle_preempted(&t.vmcs, &mut t.vcpu);
        let now = 1_000_000;
        assert!(!t.fire_timer(now, &shot));
        t.vm.platform.advance(now);
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0x40, 0));
        assert!(window_armed(&t));
    }

    #[test]
    fn the_model_reads_irr_isr_and_ppr_the_cpu_left() {
        let mut t = with_vid();
        t.self_ipi(0x51);
        t.self_ipi(0x32);
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0x51, 0));
        // The CPU delivers 0x51.
        let a = t.vcpu.apicv.as_mut().unwrap();
        let mut irr = [0u32; 8];
        irr[1] = 1 << 0x12;
        let mut isr = [0u32; 8];
        isr[2] = 1 << 0x11;
        let summaries = (summary(&irr), summary(&isr));
        a.post(
            &mut crate::vmx::FakeVmcs::new(),
            (&irr, &isr),
            summaries,
            &[0; 8],
            true,
        );
        t.run(ExitReason::PreemptionTimer);
        let base = crate::devices::lapic::LAPIC_BASE;
        let read = |t: &mut TestBed, off: u64| t.vm.platform.mmio_read(0, base + off, 4, 0);
        assert_eq!(read(&mut t, 0x120), Some(1 << 0x11), "ISR 0x40-0x5f");
        assert_eq!(read(&mut t, 0x220), Some(0), "IRR 0x40-0x5f");
        assert_eq!(read(&mut t, 0x210), Some(1 << 0x12), "IRR 0x20-0x3f");
        assert_eq!(read(&mut t, 0xa0), Some(0x50), "PPR");
        assert_eq!(
            t.vm.platform.pending_interrupt(0),
            None,
            "0x32 is below PPR"
        );
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0x32, 0x51));
    }

    /// Nothing posted and nothing in service: the exits skip taking the vectors, unless the
    /// guest interrupt status says the CPU changed them (a self-IPI it virtualized, SDM 30.1.5).
    #[test]
    fn a_self_ipi_the_cpu_virtualized_reaches_the_model() {
        let mut t = with_vid();
        t.enter().unwrap();
        assert!(vapic(&t).unchanged(&t.vmcs));
        // The CPU posts 0x61 itself (ICR write with the "self" shorthand) while IF = 0.
        t.vcpu
            .apicv
            .as_mut()
            .unwrap()
            .write_register(VIRR_3, 1 << 1);
        t.vmcs.write(Guest16::InterruptStatus, 0x61);
        assert!(!vapic(&t).unchanged(&t.vmcs));
        t.run(ExitReason::Cpuid);
        t.enter().unwrap();
        assert_eq!(
            t.vm.platform.apic_vectors(0).0[3],
            1 << 1,
            "the model's IRR"
        );
        assert_eq!(rvi_svi(&t), (0x61, 0));
    }

    /// A snapshot taken after the CPU delivered an interrupt (and an exit that left the page
    /// unread) holds it in service: restored into a fresh platform and a fresh virtual-APIC page,
    /// the next entry gives the CPU the same ISR and SVI.
    #[test]
    fn a_snapshot_keeps_what_the_cpu_had_in_service() {
        let mut t = with_vid();
        t.self_ipi(0x51);
        t.enter().unwrap();
        // The CPU delivers 0x51 (VIRR to VISR, SVI 0x51), then a CPUID exit leaves it unread.
        let mut isr = [0u32; 8];
        isr[2] = 1 << 0x11;
        let a = t.vcpu.apicv.as_mut().unwrap();
        a.post(
            &mut crate::vmx::FakeVmcs::new(),
            (&[0; 8], &isr),
            (0, summary(&isr)),
            &[0; 8],
            true,
        );
        t.vmcs.write(Guest16::InterruptStatus, 0x5100);
        t.run(ExitReason::Cpuid);
        super::take_unread_vtpr(&mut t.vcpu, &mut t.vm);
        let mut w = crate::state::Writer::new();
        t.vm.platform.save(&mut w);
        let bytes = w.into_bytes();
        let mut u = with_vid();
        u.vm.platform
            .restore(&mut crate::state::Reader::new(&bytes))
            .unwrap();
        u.vcpu.apicv.as_mut().unwrap().reset();
        u.enter().unwrap();
        assert_eq!(vapic(&u).vectors(), ([0; 8], isr));
        assert_eq!(rvi_svi(&u), (0, 0x51));
    }

    /// The EOI-exit bitmap is the model's TMR: a level-triggered vector's EOI exits (and goes
    /// to the IOAPIC), an edge-triggered one's stays in the CPU.
    #[test]
    fn level_triggered_vectors_set_their_eoi_exit_bit() {
        let mut tmr = [0u32; 8];
        tmr[2] = 1 << 0x11; // 0x51
        tmr[7] = 1 << 31; // 0xff
        assert_eq!(
            crate::vmx::apicv::eoi_exit_bitmap(&tmr),
            [0, 1 << 0x11, 0, 1 << 63]
        );
        let mut t = with_vid();
        t.enter().unwrap();
        assert_eq!(t.vmcs.read(Control64::EoiExitBitmap1), 0);
        // A level-triggered message from the IOAPIC for 0x51.
        t.vm.platform.mmio_write(0, 0xfec0_0000, 4, 0x10 + 2 * 4, 0);
        t.vm.platform.mmio_write(0, 0xfec0_0010, 4, 0x8051, 0);
        t.vm.platform.io_write(0x3f8 + 4, 1, 0x08, 0);
        t.vm.platform.io_write(0x3f8 + 1, 1, 0x01, 0);
        t.vm.platform.push_serial_input(b'a', 0);
        t.enter().unwrap();
        assert_eq!(t.vmcs.read(Control64::EoiExitBitmap1), 1 << 0x11);
        assert_eq!(rvi_svi(&t).0, 0x51);
        // Delivered and EOI'd by the CPU; the EOI exits (qualification: the vector). The line
        // is still up (the byte is unread): the IOAPIC sends it again.
        t.vcpu.apicv.as_mut().unwrap().post(
            &mut crate::vmx::FakeVmcs::new(),
            (&[0; 8], &[0; 8]),
            (0, 0),
            &[0; 8],
            true,
        );
        t.set_qualification(0x51);
        assert_eq!(t.run(ExitReason::VirtualizedEoi), Action::Resume);
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t).0, 0x51);
        assert_eq!(t.injected(), None);
    }

    /// An ICR write the CPU does not virtualize (a self-IPI by destination, not shorthand) is on
    /// the virtual-APIC page at the APIC-write exit: the model sends it, and the next entry posts
    /// it.
    #[test]
    fn a_self_ipi_through_the_apic_write_exit_is_posted() {
        let mut t = with_vid();
        t.enter().unwrap();
        let rip = t.vmcs.read(GuestNat::Rip);
        // The CPU wrote the ICR (fixed, physical destination 0 = this APIC, vector 0x61) to
        // the virtual-APIC page; the ICR's high half (destination 0) went to the model.
        t.vcpu.apicv.as_mut().unwrap().write_register(0x300, 0x61);
        t.set_qualification(0x300);
        assert_eq!(t.run(ExitReason::ApicWrite), Action::Resume);
        assert_eq!(
            t.vmcs.read(GuestNat::Rip),
            rip,
            "trap-like: nothing to skip"
        );
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0x61, 0));
        assert_eq!(t.injected(), None);
    }

    /// The 8259A's interrupts still go in by injection (they are not the local APIC's).
    #[test]
    fn the_8259a_is_still_injected() {
        let mut t = with_vid();
        // Virtual wire: LINT0 ExtINT, the 8259A's IRQ0 (vector 0x20) through the PIT.
        let base = crate::devices::lapic::LAPIC_BASE;
        t.vm.platform.mmio_write(0, base + 0x350, 4, 0x700, 0);
        t.raise_pit_irq0();
        t.self_ipi(0x51);
        t.vmcs.write(GuestNat::Rflags, 0x202);
        t.enter().unwrap();
        assert_eq!(t.injected(), Some(0x20));
        assert_eq!(rvi_svi(&t).0, 0x51, "the APIC's own interrupt is posted");
        assert_eq!(t.vm.platform.stats().acknowledged, 1);
    }

    /// A MOV to CR8 or a virtualized MMIO write leaves the TPR in VTPR: the model sees it at the
    /// next exit that reaches the platform, and before the next injection check whatever the
    /// exit was (a CPUID exit leaves the platform alone).
    #[test]
    fn the_model_reads_the_tpr_the_guest_left_in_vtpr() {
        let mut t = with_apicv();
        t.vcpu.apicv.as_mut().unwrap().set_vtpr(0xa0);
        t.run(ExitReason::Cpuid);
        t.enter().unwrap();
        assert_eq!(t.vm.platform.tpr(0), 0xa0);
        t.vcpu.apicv.as_mut().unwrap().set_vtpr(0x90);
        t.set_qualification(8 | 1 << 4);
        t.run(ExitReason::ControlRegisterAccess);
        assert_eq!(t.vm.platform.tpr(0), 0x90, "taken before the handler");
        // Lowered below the threshold: a trap-like exit, nothing to skip.
        t.vcpu.apicv.as_mut().unwrap().set_vtpr(0x10);
        let rip = t.vmcs.read(GuestNat::Rip);
        assert_eq!(t.run(ExitReason::TprBelowThreshold), Action::Resume);
        assert_eq!(t.vmcs.read(GuestNat::Rip), rip);
        assert_eq!(t.vm.platform.tpr(0), 0x10);
    }

    /// The interrupt a raised TPR holds back: the threshold is its class, and once the guest's
    /// TPR drops below it (a TPR-below-threshold exit) it is injected.
    #[test]
    fn an_interrupt_held_back_by_the_tpr_comes_when_the_tpr_drops() {
        let mut t = with_apicv();
        t.enable_lapic();
        t.vcpu.apicv.as_mut().unwrap().set_vtpr(0x80);
        t.run(ExitReason::Cpuid);
        t.self_ipi(0x51);
        t.vmcs.write(GuestNat::Rflags, 0x202);
        t.enter().unwrap();
        assert_eq!(t.injected(), None, "TPR 0x80 holds vector 0x51 back");
        assert_eq!(t.vmcs.read(Control32::TprThreshold), 5);
        t.vcpu.apicv.as_mut().unwrap().set_vtpr(0x40);
        assert_eq!(t.run(ExitReason::TprBelowThreshold), Action::Resume);
        t.enter().unwrap();
        assert_eq!(t.injected(), Some(0x51));
        assert_eq!(t.vmcs.read(Control32::TprThreshold), 0);
    }

    /// In x2APIC mode a RDMSR of the TPR exits (no x2APIC virtualization): it reads the TPR the
    /// guest left in VTPR by MOV to CR8, although RDMSR does not otherwise reach the platform.
    #[test]
    fn an_x2apic_tpr_read_sees_the_tpr_cr8_left_in_vtpr() {
        let mut t = with_apicv();
        t.long_mode();
        t.vm.platform
            .set_apic_base(
                0,
                0xfee0_0000 | super::APIC_BASE_ENABLE | super::APIC_BASE_EXTD | 1 << 8,
            )
            .unwrap();
        t.vcpu.apicv.as_mut().unwrap().set_vtpr(0x70);
        t.set_instruction_length(2);
        t.vcpu.regs.rcx = 0x808;
        assert_eq!(t.run(ExitReason::Rdmsr), Action::Advance);
        assert_eq!(t.vcpu.regs.rax, 0x70);
    }

    /// An x2APIC TPR write goes to the model (it exits); the next entry gives the CPU the value.
    #[test]
    fn a_tpr_the_model_changed_reaches_vtpr() {
        let mut t = with_apicv();
        t.vm.platform.set_tpr(0, 0x30);
        t.enter().unwrap();
        assert_eq!(t.vcpu.apicv.as_ref().unwrap().vtpr(), 0x30);
    }

    /// Reads of other registers than the TPR exit and are emulated like an EPT violation there.
    #[test]
    fn other_registers_are_emulated_through_the_model() {
        let mut t = with_apicv();
        // Real mode, CS:IP = 0x1000:0x100, DS based at the APIC page.
        t.real_mode(0x1_0000, 0x100);
        t.vmcs.write(GuestNat::DsBase, 0xfee0_0000);
        // mov eax, [bx] (66 8B 07) with BX = 0x30: the version register.
        t.vcpu.regs.rbx = 0x30;
        t.vm.ram.write(0x10100, &[0x66, 0x8b, 0x07]);
        t.set_qualification(0x030); // a linear read at offset 30H
        assert_eq!(t.run(ExitReason::ApicAccess), Action::AdvanceBy(3));
        assert_eq!(t.vcpu.regs.rax as u32, crate::devices::lapic::LAPIC_VERSION);
    }

    /// With the xAPIC page mapped, a load that starts on it and runs past its end faults on the
    /// next page first: it still goes to the APIC whole, at its start; a load wholly on the next
    /// page is no device's.
    #[test]
    fn an_access_across_the_end_of_the_apic_page_is_the_apics() {
        for (bx, apicv, want) in [
            (0xffe, true, Action::AdvanceBy(3)),
            (
                0x1000,
                true,
                Action::Stop(StopReason::BadMemoryAccess {
                    gpa: 0xfee0_1000,
                    write: false,
                }),
            ),
            (
                0xffe,
                false,
                Action::Stop(StopReason::BadMemoryAccess {
                    gpa: 0xfee0_1000,
                    write: false,
                }),
            ),
        ] {
            let mut t = if apicv { with_apicv() } else { TestBed::new() };
            t.real_mode(0x1_0000, 0x100);
            t.vmcs.write(GuestNat::DsBase, 0xfee0_0000);
            // mov eax, [bx] (66 8B 07).
            t.vcpu.regs.rbx = bx;
            t.vm.ram.write(0x10100, &[0x66, 0x8b, 0x07]);
            t.vmcs
                .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), 0xfee0_1000);
            t.set_qualification(1 | 3 << 7); // a read, linear address valid and translated
            assert_eq!(
                t.run(ExitReason::EptViolation),
                want,
                "BX {bx:#x}, apicv {apicv}"
            );
        }
    }

    #[test]
    fn fetches_and_event_delivery_stop_the_guest() {
        let mut t = with_apicv();
        t.set_qualification(2 << 12 | 0x10);
        assert_eq!(
            t.run(ExitReason::ApicAccess),
            Action::Stop(StopReason::BadMemoryAccess {
                gpa: 0xfee0_0010,
                write: false
            })
        );
        t.vmcs
            .write_raw(ReadOnly64::GuestPhysicalAddr.encoding(), 0xfee0_00d0);
        for (kind, what) in [
            (
                3,
                "event delivery touched guest-physical 0xfee000d0, which is device memory",
            ),
            (
                10,
                "event delivery touched guest-physical 0xfee000d0, which is device memory",
            ),
            (15, "page walk touched guest-physical 0xfee000d0"),
        ] {
            t.set_qualification(kind << 12 | 0xd0);
            match t.run(ExitReason::ApicAccess) {
                Action::Stop(StopReason::Killed(why)) => assert!(why.contains(what), "{why}"),
                other => panic!("{other:?}"),
            }
        }
    }
}

/// APIC-register virtualization and the x2APIC mode's virtualization at the exits.
#[cfg(test)]
mod register_tests {
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::vmx::apicv::{ApicvFeatures, VirtualApic};
    use crate::vmx::controls::SecondaryControls;
    use crate::vmx::{Control32, ExitReason, Guest16, Vmcs};
    use alloc::boxed::Box;

    /// Everything Bochs offers, the MSR bitmap included.
    fn with_all() -> TestBed {
        let mut t = TestBed::new();
        t.enable_apicv(ApicvFeatures {
            tpr_shadow: true,
            virtualize_apic_accesses: true,
            virtual_interrupt_delivery: true,
            register_virtualization: true,
            virtualize_x2apic: true,
        });
        let bitmap = Box::leak(Box::new([0xffu8; 4096]));
        // SAFETY: a leaked page that belongs to this test alone.
        unsafe { vapic_mut(&mut t).set_msr_bitmap(bitmap) };
        t
    }

    fn vapic_mut(t: &mut TestBed) -> &mut VirtualApic {
        t.vcpu.apicv.as_mut().unwrap()
    }

    fn page(t: &TestBed, offset: usize) -> u32 {
        t.vcpu.apicv.as_ref().unwrap().register(offset)
    }

    /// The guest writes `value` at `offset` of the xAPIC page, which the CPU puts on the
    /// virtual-APIC page; `exits` says whether an APIC-write exit follows (SDM 30.4.3.2).
    fn guest_writes(t: &mut TestBed, offset: usize, value: u32, exits: bool) {
        vapic_mut(t).write_register(offset, value);
        if exits {
            t.set_qualification(offset as u64);
            assert_eq!(t.run(ExitReason::ApicWrite), Action::Resume);
        }
        t.enter().unwrap();
    }

    /// The guest reads the page without exits: after the first entry it holds the model's
    /// registers, and a write the model changes (an LVT entry, masked while the APIC is
    /// software-disabled, SDM 11.4.7.2) reads back as the model made it.
    #[test]
    fn the_page_holds_the_models_registers() {
        let mut t = with_all();
        t.enter().unwrap();
        assert_eq!(page(&t, 0x30), crate::devices::lapic::LAPIC_VERSION);
        assert_eq!(page(&t, 0xe0), u32::MAX, "DFR at reset");
        assert_eq!(page(&t, 0xf0), 0xff, "SVR at reset");
        assert_eq!(page(&t, 0x350), 0x700, "LINT0: ExtINT");
        guest_writes(&mut t, 0x320, 0x40, true);
        assert_eq!(page(&t, 0x320), 0x1_0040, "masked by the model");
        guest_writes(&mut t, 0xf0, 0x1ff, true);
        guest_writes(&mut t, 0x320, 0x2_0040, true);
        assert_eq!(page(&t, 0x320), 0x2_0040);
        // The LDR keeps bits 31:24 only.
        guest_writes(&mut t, 0xd0, 0x0312_3456, true);
        assert_eq!(page(&t, 0xd0), 0x0300_0000);
    }

    /// A write of the ICR's high half stays on the page (no exit); the ICR write that follows
    /// (an APIC-write exit: a destination, not the self shorthand) is sent with it.
    #[test]
    fn the_icr_destination_the_guest_left_on_the_page_is_used() {
        let mut t = with_all();
        t.enable_lapic();
        t.enter().unwrap();
        // Destination 5: no such APIC, nothing arrives.
        guest_writes(&mut t, 0x310, 0x0500_0000, false);
        guest_writes(&mut t, 0x300, 0x61, true);
        assert_eq!(t.vmcs.read(Guest16::InterruptStatus) as u8, 0);
        // Destination 0: this APIC.
        guest_writes(&mut t, 0x310, 0, false);
        guest_writes(&mut t, 0x300, 0x61, true);
        assert_eq!(t.vmcs.read(Guest16::InterruptStatus) as u8, 0x61);
        assert_eq!(t.vm.platform.icr_high(0), 0);
    }

    /// After an ICR write the page reads the ICR as the model keeps it (reserved bits 13 and
    /// 16-17 and the delivery status clear, SDM 10.6.1), and only the ICR is written again: a
    /// register the guest wrote to the page meanwhile without an exit stays as it is.
    #[test]
    fn an_ipi_writes_the_icr_back_alone() {
        let mut t = with_all();
        t.enable_lapic();
        t.enter().unwrap();
        guest_writes(&mut t, 0x310, 0x0500_0000, false);
        vapic_mut(&mut t).write_register(0x3e0, 0xdead);
        guest_writes(&mut t, 0x300, 0x3_3061, true);
        assert_eq!(page(&t, 0x300), 0x61);
        assert_eq!(page(&t, 0x3e0), 0xdead, "not rewritten from the model");
        // Any other register write rewrites the whole page.
        guest_writes(&mut t, 0x320, 0x1_0040, true);
        assert_eq!(page(&t, 0x3e0), 0);
    }

    /// In x2APIC mode the next entry turns "virtualize x2APIC mode" on (and "virtualize APIC
    /// accesses" off), the page holds the x2APIC ID and LDR, and a SELF IPI of an illegal vector
    /// (an APIC-write exit at 3F0H, SDM 30.5) reaches the model, which sets ESR bit 5.
    #[test]
    fn x2apic_mode_is_virtualized() {
        let mut t = with_all();
        t.enable_lapic();
        t.enter().unwrap();
        let x2apic = 0xfee0_0000 | 1 << 8 | 1 << 10 | 1 << 11;
        t.vm.platform.set_apic_base(0, x2apic).unwrap();
        t.enter().unwrap();
        let s =
            SecondaryControls::from_bits_retain(t.vmcs.read(Control32::SecondaryProcBasedControls));
        assert!(s.contains(SecondaryControls::VIRTUALIZE_X2APIC_MODE));
        assert!(!s.contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES));
        assert_eq!(
            (page(&t, 0x20), page(&t, 0xd0)),
            (0, 1),
            "x2APIC ID and LDR"
        );
        // VPPR (RDMSR 0x80A) is the model's PPR.
        t.vm.platform.set_tpr(0, 0x50);
        t.enter().unwrap();
        assert_eq!(page(&t, 0xa0), 0x50);
        vapic_mut(&mut t).write_register(0x3f0, 5);
        t.set_qualification(0x3f0);
        assert_eq!(t.run(ExitReason::ApicWrite), Action::Resume);
        assert_eq!(t.vm.platform.x2apic_write(0, 0x828, 0, 0), Ok(()));
        assert_eq!(t.vm.platform.x2apic_read(0, 0x828, 0), Ok(1 << 5));
        // A 64-bit ICR written through the model is on the page as RDMSR 830H reads it.
        assert_eq!(
            t.vm.platform.x2apic_write(0, 0x830, 7 << 32 | 0x62, 0),
            Ok(())
        );
        t.enter().unwrap();
        assert_eq!(
            t.vcpu.apicv.as_ref().unwrap().register64(0x300),
            7 << 32 | 0x62
        );
        // Back to xAPIC mode through disabled.
        t.vm.platform.set_apic_base(0, 0xfee0_0100).unwrap();
        t.vm.platform.set_apic_base(0, 0xfee0_0900).unwrap();
        t.enter().unwrap();
        let s =
            SecondaryControls::from_bits_retain(t.vmcs.read(Control32::SecondaryProcBasedControls));
        assert!(!s.contains(SecondaryControls::VIRTUALIZE_X2APIC_MODE));
        assert!(s.contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES));
        assert_eq!(t.vcpu.apicv.as_ref().unwrap().register64(0x300) >> 32, 0);
    }
}

/// A guest with two vCPUs, each with its own virtual-APIC page and MSR bitmap: interrupts
/// between them and the EOIs of each (vCPU 1 runs on another host CPU while vCPU 0's exits are
/// handled: the bed swaps between them).
#[cfg(test)]
mod smp_tests {
    use crate::exits::testing::*;
    use crate::exits::Action;
    use crate::vmx::apicv::{ApicvFeatures, VirtualApic, VIRR, VISR};
    use crate::vmx::controls::SecondaryControls;
    use crate::vmx::{Control32, Control64, ExitReason, Guest16, Vmcs};
    use alloc::boxed::Box;

    const ALL: ApicvFeatures = ApicvFeatures::ALL;

    /// vCPU 0 in the bed, vCPU 1 beside it; both have run once.
    fn bed() -> (TestBed, Sibling) {
        let mut t = TestBed::smp(2);
        let mut s = TestBed::sibling(1);
        for _ in 0..2 {
            t.enable_apicv(ALL);
            let bitmap = Box::leak(Box::new([0xffu8; 4096]));
            // SAFETY: a leaked page that belongs to this test's vCPU alone.
            unsafe { vapic_mut(&mut t).set_msr_bitmap(bitmap) };
            t.enable_lapic();
            t.enter().unwrap();
            t.swap(&mut s);
        }
        (t, s)
    }

    fn vapic(t: &TestBed) -> &VirtualApic {
        t.vcpu.apicv.as_ref().unwrap()
    }

    fn vapic_mut(t: &mut TestBed) -> &mut VirtualApic {
        t.vcpu.apicv.as_mut().unwrap()
    }

    /// RVI (bits 7:0) and SVI (15:8) of the guest interrupt status.
    fn rvi_svi(t: &TestBed) -> (u8, u8) {
        let s = t.vmcs.read(Guest16::InterruptStatus);
        (s as u8, (s >> 8) as u8)
    }

    fn has(words: &[u32; 8], vector: u8) -> bool {
        words[usize::from(vector >> 5)] & 1 << (vector & 31) != 0
    }

    /// The bed's vCPU writes the ICR on its page: the destination half stays there, the low
    /// half exits (APIC write, SDM 30.4.3.2).
    fn send(t: &mut TestBed, dest: u8, icr_low: u32) {
        let a = vapic_mut(t);
        a.write_register(0x310, u32::from(dest) << 24);
        a.write_register(0x300, icr_low);
        t.set_qualification(0x300);
        assert_eq!(t.run(ExitReason::ApicWrite), Action::Resume);
    }

    /// What the CPU does while the guest runs, without exits: `deliver` moves the highest
    /// VIRR vector to VISR (SDM 30.2.2), `eoi` clears the highest VISR vector (SDM 30.1.4);
    /// RVI and SVI follow.
    fn cpu(t: &mut TestBed, deliver: bool) {
        let (mut irr, mut isr) = vapic(t).vectors();
        let top = |w: &[u32; 8]| crate::devices::lapic::highest(w);
        let v = if deliver { top(&irr) } else { top(&isr) }.unwrap();
        let (from, to) = if deliver {
            (&mut irr, Some(&mut isr))
        } else {
            (&mut isr, None)
        };
        from[usize::from(v >> 5)] &= !(1 << (v & 31));
        if let Some(to) = to {
            to[usize::from(v >> 5)] |= 1 << (v & 31);
        }
        let a = vapic_mut(t);
        for i in 0..8 {
            a.write_register(VIRR + 16 * i, irr[i]);
            a.write_register(VISR + 16 * i, isr[i]);
        }
        let status = u16::from(top(&isr).unwrap_or(0)) << 8 | u16::from(top(&irr).unwrap_or(0));
        t.vmcs.write(Guest16::InterruptStatus, status);
    }

    /// vCPU 0 sends `vector` to vCPU 1, which takes it at its next entry (the bed runs vCPU 1
    /// then, the vector in service).
    fn sibling_takes(t: &mut TestBed, s: &mut Sibling, vector: u32) {
        send(t, 1, vector);
        t.swap(s);
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        cpu(t, true);
    }

    /// vCPU 0 sends vector 0x61 to APIC 1: it lands in vCPU 1's model, and in its VIRR and RVI
    /// at its next entry (after the exit the run loop's kick causes); vCPU 0's page and RVI
    /// stay as they were.
    #[test]
    fn an_ipi_to_a_sibling_lands_in_its_virtual_irr_at_its_next_entry() {
        let (mut t, mut s) = bed();
        send(&mut t, 1, 0x61);
        assert_eq!(t.vm.platform.take_kicked(), 1 << 1, "vCPU 1 is kicked");
        t.enter().unwrap();
        assert_eq!(rvi_svi(&t), (0, 0), "not the sender's");
        assert!(!has(&vapic(&t).vectors().0, 0x61));
        t.swap(&mut s);
        assert!(!has(&vapic(&t).vectors().0, 0x61), "not while it runs");
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        assert!(has(&vapic(&t).vectors().0, 0x61));
        assert_eq!(rvi_svi(&t), (0x61, 0));
        assert_eq!(t.injected(), None, "posted, not injected");
    }

    /// While vCPU 1 runs (its CPU owns VIRR and VISR), vCPU 0 sends it 0x61 again, which vCPU 1
    /// took meanwhile, and 0x72: at vCPU 1's exit both stay pending beside what its CPU did.
    #[test]
    fn an_ipi_that_arrives_while_the_sibling_runs_is_not_lost() {
        let (mut t, mut s) = bed();
        sibling_takes(&mut t, &mut s, 0x61);
        assert_eq!(rvi_svi(&t), (0, 0x61));
        t.swap(&mut s);
        send(&mut t, 1, 0x61);
        send(&mut t, 1, 0x72);
        t.swap(&mut s);
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        let (irr, isr) = vapic(&t).vectors();
        assert!(has(&irr, 0x61) && has(&irr, 0x72), "{irr:x?}");
        assert!(has(&isr, 0x61));
        assert_eq!(rvi_svi(&t), (0x72, 0x61));
    }

    /// Each vCPU has a vector in service; vCPU 1's EOI (virtualized, no exit) clears its own
    /// ISR, in the model at its next exit, and nothing of vCPU 0's.
    #[test]
    fn an_eoi_touches_only_its_own_vcpus_apic() {
        let (mut t, mut s) = bed();
        t.self_ipi(0x51);
        t.enter().unwrap();
        cpu(&mut t, true);
        send(&mut t, 1, 0x61);
        t.enter().unwrap();
        t.swap(&mut s);
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        cpu(&mut t, true);
        assert_eq!(rvi_svi(&t), (0, 0x61));
        cpu(&mut t, false);
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        let base = crate::devices::lapic::LAPIC_BASE;
        let isr = |t: &mut TestBed, c: usize, word: u64| {
            t.vm.platform.mmio_read(c, base + 0x100 + 16 * word, 4, 0)
        };
        assert_eq!(isr(&mut t, 1, 3), Some(0), "vCPU 1's ISR");
        assert_eq!(rvi_svi(&t), (0, 0));
        t.swap(&mut s);
        assert_eq!(isr(&mut t, 0, 2), Some(1 << 0x11), "vCPU 0's ISR");
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        assert!(has(&vapic(&t).vectors().1, 0x51));
        assert_eq!(rvi_svi(&t), (0, 0x51));
    }

    /// A level-triggered IOAPIC interrupt routed to APIC 1 (COM1's, vector 0x45): vCPU 1's
    /// EOI-exit bitmap holds it, so its EOI exits and reaches the IOAPIC; vCPU 0's does not.
    #[test]
    fn the_eoi_exit_bitmap_is_the_routed_vcpus() {
        let (mut t, mut s) = bed();
        let ioapic = crate::devices::ioapic::IOAPIC_BASE;
        // Pin 4: vector 0x45, level triggered, to APIC 1.
        for (reg, v) in [(0x19u64, 1u64 << 24), (0x18, 0x8045)] {
            t.vm.platform.mmio_write(0, ioapic, 4, reg, 0);
            t.vm.platform.mmio_write(0, ioapic + 0x10, 4, v, 0);
        }
        // COM1: OUT2, receive interrupts on; a byte arrives.
        for (port, v) in [(0x3fcu16, 0x08u32), (0x3f9, 0x01)] {
            assert!(t.vm.platform.io_write(port, 1, v, 0));
        }
        t.vm.platform.push_serial_input(b'k', 0);
        t.enter().unwrap();
        assert_eq!(t.vmcs.read(Control64::EoiExitBitmap1), 0, "vCPU 0's");
        assert_eq!(rvi_svi(&t), (0, 0));
        t.swap(&mut s);
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        assert_eq!(t.vmcs.read(Control64::EoiExitBitmap1), 1 << (0x45 - 64));
        assert_eq!(rvi_svi(&t), (0x45, 0));
    }

    /// ("virtualize APIC accesses", "virtualize x2APIC mode") in the bed's VMCS.
    fn controls(t: &TestBed) -> (bool, bool) {
        let s =
            SecondaryControls::from_bits_retain(t.vmcs.read(Control32::SecondaryProcBasedControls));
        (
            s.contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES),
            s.contains(SecondaryControls::VIRTUALIZE_X2APIC_MODE),
        )
    }

    /// vCPU 0 turns on x2APIC mode, vCPU 1 stays in xAPIC mode: each VMCS has its own controls
    /// and each MSR bitmap its own x2APIC part.
    #[test]
    fn one_vcpu_in_x2apic_mode_and_one_in_xapic_mode() {
        let (mut t, mut s) = bed();
        let x2apic = 0xfee0_0000 | 1 << 10 | 1 << 11;
        t.vm.platform.set_apic_base(0, x2apic | 1 << 8).unwrap();
        t.enter().unwrap();
        assert_eq!(controls(&t), (false, true));
        assert!(vapic(&t).x2apic_virtualized());
        assert_eq!(vapic(&t).register(0x20), 0, "x2APIC ID 0");
        t.swap(&mut s);
        t.run(ExitReason::PreemptionTimer);
        t.enter().unwrap();
        assert_eq!(controls(&t), (true, false));
        assert!(!vapic(&t).x2apic_virtualized());
        assert_eq!(vapic(&t).register(0x20), 1 << 24, "xAPIC ID 1");
    }

    /// vCPU 0 sends INIT to vCPU 1 while vCPU 1 runs with a vector in service: what its CPU
    /// left on the page is from before the INIT, and its APIC stays reset.
    #[test]
    fn an_init_while_the_sibling_runs_drops_what_its_page_held() {
        let (mut t, mut s) = bed();
        sibling_takes(&mut t, &mut s, 0x61);
        t.swap(&mut s);
        send(&mut t, 1, 0x4500);
        t.swap(&mut s);
        t.run(ExitReason::PreemptionTimer);
        let base = crate::devices::lapic::LAPIC_BASE;
        assert_eq!(
            t.vm.platform.mmio_read(1, base + 0x130, 4, 0),
            Some(0),
            "ISR"
        );
        t.enter().unwrap();
        assert_eq!(vapic(&t).vectors(), ([0; 8], [0; 8]));
        assert_eq!(rvi_svi(&t), (0, 0));
    }

    /// A guest snapshotted with vCPU 0 in x2APIC mode and vCPU 1 in xAPIC mode, vCPU 1 with an
    /// IPI that arrived while it ran, and restored into fresh virtual APICs (closed MSR bitmaps,
    /// xAPIC controls): at its first entry each vCPU is virtualized in its own mode with its own
    /// registers on its own page, and the IPI is posted to vCPU 1.
    #[test]
    fn a_restored_guest_has_each_vcpus_apic_at_its_first_entry() {
        let (mut t, mut s) = bed();
        let base = crate::devices::lapic::LAPIC_BASE;
        let x2apic = 0xfee0_0000 | 1 << 8 | 1 << 10 | 1 << 11;
        t.vm.platform.set_apic_base(0, x2apic).unwrap();
        assert_eq!(t.vm.platform.x2apic_write(0, 0x832, 0x1_0045, 0), Ok(()));
        t.vm.platform.mmio_write(1, base + 0x320, 4, 0x1_0046, 0);
        t.enter().unwrap();
        // To APIC 1, vector 0x61, while vCPU 1 runs.
        assert_eq!(
            t.vm.platform.x2apic_write(0, 0x830, 1 << 32 | 0x61, 0),
            Ok(())
        );
        // Paused: what each CPU held goes to the model, which is saved.
        super::take_unread_vtpr(&mut t.vcpu, &mut t.vm);
        t.swap(&mut s);
        t.run(ExitReason::PreemptionTimer);
        super::take_unread_vtpr(&mut t.vcpu, &mut t.vm);
        let mut w = crate::state::Writer::new();
        t.vm.platform.save(&mut w);
        let bytes = w.into_bytes();
        let (mut u, mut us) = bed();
        u.vm.platform
            .restore(&mut crate::state::Reader::new(&bytes))
            .unwrap();
        for _ in 0..2 {
            vapic_mut(&mut u).reset();
            assert!(!vapic(&u).x2apic_virtualized());
            u.enter().unwrap();
            u.swap(&mut us);
        }
        assert_eq!(controls(&u), (false, true), "vCPU 0: x2APIC");
        assert_eq!(
            (vapic(&u).register(0x320), vapic(&u).register(0xd0)),
            (0x1_0045, 1)
        );
        assert_eq!(rvi_svi(&u), (0, 0));
        u.swap(&mut us);
        assert_eq!(controls(&u), (true, false), "vCPU 1: xAPIC");
        assert_eq!(
            (vapic(&u).register(0x320), vapic(&u).register(0x20)),
            (0x1_0046, 1 << 24)
        );
        assert!(has(&vapic(&u).vectors().0, 0x61));
        assert_eq!(rvi_svi(&u), (0x61, 0));
    }
}

/// The short look after a preemption-timer exit (`timer_may_fire`, `fire_timer_now`) against
/// the general one.
#[cfg(test)]
mod fire_timer_tests {
    use super::*;
    use crate::devices::lapic::LAPIC_BASE;
    use crate::exits::testing::*;
    use crate::vmx::apicv::{ApicvFeatures, VIRR, VISR};
    use crate::vmx::{Guest16, Vmcs};

    /// A bed with `cpus` vCPUs (the bed runs vCPU 0; the others' APICs only keep timers).
    fn bed(register_virtualization: bool, cpus: u8) -> TestBed {
        let mut t = TestBed::smp(cpus);
        t.enable_apicv(ApicvFeatures {
            tpr_shadow: true,
            virtualize_apic_accesses: true,
            virtual_interrupt_delivery: true,
            register_virtualization,
            ..Default::default()
        });
        t.enable_lapic();
        t
    }

    /// What the run loop does before an entry after an exit that touched the platform, or
    /// after a preemption exit the short way refused (`runloop::before_entry`), then the commit;
    /// the timer's expiry it works out for the short way.
    fn general_look(t: &mut TestBed, now: u64) -> Option<TimerShot> {
        take_unread(&t.vmcs, &mut t.vcpu, &mut t.vm);
        t.vm.platform.advance(now);
        crate::exits::inject_pending_interrupt(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
        before_entry(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
        timer_shot(&t.vcpu, &t.vm)
    }

    fn words(t: &TestBed, base: usize) -> [u32; 8] {
        let a = t.vcpu.apicv.as_ref().unwrap();
        core::array::from_fn(|i| a.register(base + i * 16))
    }

    fn top(w: &[u32; 8]) -> u8 {
        crate::devices::lapic::highest(w).unwrap_or(0)
    }

    fn put(t: &mut TestBed, base: usize, w: &[u32; 8]) {
        let a = t.vcpu.apicv.as_mut().unwrap();
        for (i, &word) in w.iter().enumerate() {
            a.write_register(base + i * 16, word);
        }
    }

    fn set_status(t: &mut TestBed, rvi: u8, svi: u8) {
        t.vmcs.write(
            Guest16::InterruptStatus,
            u16::from(svi) << 8 | u16::from(rvi),
        );
    }

    /// The CPU delivers the highest vector of VIRR (SDM 30.2.2): VIRR to VISR, RVI the next
    /// highest, SVI the vector, VPPR its class.
    fn cpu_delivers(t: &mut TestBed) {
        let (mut irr, mut isr) = (words(t, VIRR), words(t, VISR));
        let v = top(&irr);
        if v == 0 {
            return;
        }
        irr[usize::from(v >> 5)] &= !(1 << (v & 31));
        isr[usize::from(v >> 5)] |= 1 << (v & 31);
        put(t, VIRR, &irr);
        put(t, VISR, &isr);
        t.vcpu
            .apicv
            .as_mut()
            .unwrap()
            .write_register(0xa0, u32::from(v & 0xf0));
        set_status(t, top(&irr), v);
    }

    /// The guest's EOI, virtualized (SDM 30.1.4): the highest VISR vector cleared, SVI the next.
    fn cpu_eoi(t: &mut TestBed) {
        let mut isr = words(t, VISR);
        let v = top(&isr);
        if v == 0 {
            return;
        }
        isr[usize::from(v >> 5)] &= !(1 << (v & 31));
        put(t, VISR, &isr);
        let rvi = t.vmcs.read(Guest16::InterruptStatus) as u8;
        set_status(t, rvi, top(&isr));
    }

    fn mmio(t: &mut TestBed, offset: u64, value: u64, now: u64) {
        t.vm.platform
            .mmio_write(0, LAPIC_BASE + offset, 4, value, now);
    }

    fn saved(t: &TestBed) -> alloc::vec::Vec<u8> {
        let mut w = crate::state::Writer::new();
        t.vm.platform.save(&mut w);
        w.into_bytes()
    }

    /// Everything the guest can see or Keel goes on from: the VMCS fields, the virtual-APIC
    /// page, the model's saved state, its next deadline, its counters and the event queue.
    fn assert_same(fast: &TestBed, slow: &TestBed, round: usize) {
        assert_eq!(fast.vmcs.fields, slow.vmcs.fields, "round {round}: VMCS");
        let (a, b) = (
            fast.vcpu.apicv.as_ref().unwrap(),
            slow.vcpu.apicv.as_ref().unwrap(),
        );
        for offset in (0..0x400).step_by(16) {
            assert_eq!(
                a.register(offset),
                b.register(offset),
                "round {round}: page {offset:#x}"
            );
        }
        assert_eq!(saved(fast), saved(slow), "round {round}: model");
        assert_eq!(
            fast.vm.platform.next_deadline(),
            slow.vm.platform.next_deadline(),
            "round {round}"
        );
        assert_eq!(fast.vm.platform.stats(), slow.vm.platform.stats());
        assert_eq!(fast.vcpu.events, slow.vcpu.events, "round {round}");
    }

    /// Random timer set-ups (one-shot, periodic and TSC-deadline modes, masked or not, legal
    /// and illegal vectors, divide configurations, the APIC software-disabled), with what the
    /// guest does meanwhile (deliveries, EOIs, TPR writes, self-IPIs, current-count reads):
    /// after every preemption-timer exit, the short look where it applies and the general look
    /// give the same VMCS, page, model, deadline, counters and events; and the short way is
    /// taken often enough for that to mean something. The fast bed makes a TSC-deadline move
    /// that fires nothing as the run loop's tight loop does (no look, or [`settle_empty`] of an
    /// outstanding post), and that is taken often enough too.
    #[test]
    fn a_timer_fired_alone_ends_as_the_general_look() {
        for (seed, register_virtualization, cpus) in [
            (0x2545_f491_4f6c_dd1d, false, 1),
            (0x9e37_79b9, true, 1),
            (0x6c8e_9cf5_7093_2bd5, false, 2),
        ] {
            let mut rng = Rng(seed);
            let mut fast = bed(register_virtualization, cpus);
            let mut slow = bed(register_virtualization, cpus);
            if cpus > 1 {
                for t in [&mut fast, &mut slow] {
                    // vCPU 1's APIC enabled, its timer in TSC-deadline mode (vector 0x50).
                    t.vm.platform.mmio_write(1, LAPIC_BASE + 0xf0, 4, 0x1ff, 0);
                    t.vm.platform
                        .mmio_write(1, LAPIC_BASE + 0x320, 4, 2 << 17 | 0x50, 0);
                }
            }
            let mut now = 1000;
            let mut shot = None;
            for t in [&mut fast, &mut slow] {
                shot = general_look(t, now);
                crate::exits::events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
            }
            let (mut short, mut stale_tries, mut settled) = (0, 0, 0);
            for round in 0..30_000 {
                // What the guest does while it runs, then what its exits do to the platform
                // (each followed by the general look, as the run loop makes it).
                let guest = rng.below(8);
                // With an expiry worked out, the timers are changed more often (the first
                // eight: its LVT entry, count, divide, TSC deadline, a self-IPI, the SVR).
                let platform = if shot.is_some() && rng.below(2) == 0 {
                    rng.below(8)
                } else {
                    rng.below(32)
                };
                let value = rng.next();
                // With two vCPUs, vCPU 1's timer now and then set within 32 ticks of the
                // earliest deadline, so that both fall due at the same exit.
                let other = rng.next();
                // The guest runs with IF = 0 now and then (the short look refuses those).
                let rflags = if rng.below(8) == 0 { 0x2 } else { 0x202 };
                // Now and then the fast bed keeps the expiry worked out before the timers
                // changed (as if the look after the change had not worked it out again): the
                // short way must never fire from it.
                let keep_stale = rng.below(2) == 0;
                let mut stale = false;
                let mut moved = false;
                let near = fast.vm.platform.next_deadline().unwrap_or(now);
                let other_at = (other.is_multiple_of(4) && cpus > 1)
                    .then(|| (near + (other >> 32) % 64).saturating_sub(32).max(1));
                for (bed, t) in [&mut fast, &mut slow].into_iter().enumerate() {
                    t.vmcs.write(crate::vmx::GuestNat::Rflags, rflags);
                    match guest {
                        0 => cpu_delivers(t),
                        1 => cpu_eoi(t),
                        2..=6 => {
                            // The common case: every interrupt posted is handled.
                            for _ in 0..3 {
                                cpu_delivers(t);
                                cpu_eoi(t);
                            }
                        }
                        7 => {
                            let vtpr = [0, 0, 0x20, 0x40, 0xf0][(value % 5) as usize];
                            t.vcpu.apicv.as_mut().unwrap().write_register(0x80, vtpr);
                        }
                        _ => {}
                    }
                    if let Some(at) = other_at {
                        t.vm.platform.write_tsc_deadline(1, at, now);
                    }
                    // The exit that makes the platform's change leaves the guest's TPR for
                    // the look to take (`leave_vtpr`, as every exit does).
                    leave_vtpr(&mut t.vcpu);
                    let acted = match platform {
                        0..=3 => {
                            t.change_lapic_timer(platform, value, now);
                            true
                        }
                        4 | 5 => {
                            let at = random_deadline(value, now);
                            // The fast bed takes the run loop's way for a move that fires
                            // nothing (`exits::fast::handle_deadline`): no look, unless the
                            // last post is outstanding and not found all taken and ended.
                            if bed == 0 {
                                moved = t.vm.platform.move_tsc_deadline(0, at, now);
                            }
                            if bed == 1 || !moved {
                                t.vm.platform.write_tsc_deadline(0, at, now);
                            }
                            true
                        }
                        6 => {
                            let vector = [0x40, 0x31, 0xe0][(value % 3) as usize];
                            mmio(t, 0x300, 1 << 18 | vector, now);
                            true
                        }
                        8 if cpus > 1 => {
                            // vCPU 1's timer: a deadline near ours, or disarmed.
                            let at = match value % 3 {
                                0 => 0,
                                _ => now + (value >> 20) % 4000,
                            };
                            t.vm.platform.write_tsc_deadline(1, at, now);
                            true
                        }
                        7 => {
                            // Software disable (every LVT masked) now and then, enable again.
                            let svr = if value.is_multiple_of(7) { 0xff } else { 0x1ff };
                            mmio(t, 0xf0, svr, now);
                            true
                        }
                        _ => false,
                    };
                    if bed == 0 && moved && other_at.is_none() {
                        if post_outstanding(&t.vcpu) {
                            if settle_empty(&t.vmcs, &mut t.vcpu, &mut t.vm) {
                                settled += 1;
                            } else {
                                general_look(t, now);
                            }
                        }
                        // The shot is worked out at the timer's exit (`Piece::shot_stale`),
                        // from the platform as this left it.
                        shot = timer_shot(&t.vcpu, &t.vm);
                        crate::exits::events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
                    } else if acted || other_at.is_some() {
                        let worked_out = general_look(t, now);
                        if bed == 0 {
                            if keep_stale && shot.is_some() {
                                stale = true;
                            } else {
                                shot = worked_out;
                            }
                        }
                        crate::exits::events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
                    }
                }
                // The deadline's way leaves the guest's TPR in VTPR and the page as it was
                // until the next look: the beds agree again after the timer's exit.
                if !moved {
                    assert_same(&fast, &slow, round);
                }
                if platform == 8 {
                    // The guest reads the current count (an exit that reaches the platform).
                    let read =
                        |t: &mut TestBed| t.vm.platform.mmio_read(0, LAPIC_BASE + 0x390, 4, now);
                    assert_eq!(read(&mut fast), read(&mut slow), "round {round}");
                    for (bed, t) in [&mut fast, &mut slow].into_iter().enumerate() {
                        let worked_out = general_look(t, now);
                        if bed == 0 && !stale {
                            shot = worked_out;
                        }
                        crate::exits::events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
                    }
                }
                // The preemption timer brings the guest back: at its timer's deadline when one
                // is set and near, else a little later.
                now = match fast.vm.platform.next_deadline() {
                    Some(d) if d >= now && d - now < 5000 && rng.below(4) != 0 => d,
                    _ => now + rng.below(1500),
                };
                crate::exits::fast::handle_preempted(&fast.vmcs, &mut fast.vcpu);
                crate::exits::fast::handle_preempted(&slow.vmcs, &mut slow.vcpu);
                let fired = shot.as_ref().is_some_and(|s| fast.fire_timer(now, s));
                if stale {
                    stale_tries += 1;
                    assert!(
                        !fired,
                        "round {round}: fired from an expiry worked out before"
                    );
                }
                if fired {
                    short += 1;
                    shot = None;
                } else {
                    shot = general_look(&mut fast, now);
                }
                general_look(&mut slow, now);
                for t in [&mut fast, &mut slow] {
                    crate::exits::events::commit(&mut t.vmcs, &mut t.vcpu).unwrap();
                }
                // The VMCS's record of writes differs by design (fewer writes); its fields not.
                assert_same(&fast, &slow, round);
            }
            assert!(short > 200, "the short way taken {short} times");
            assert!(settled > 100, "an outstanding post settled {settled} times");
            assert!(stale_tries > 20, "a stale expiry tried {stale_tries} times");
        }
    }
}
