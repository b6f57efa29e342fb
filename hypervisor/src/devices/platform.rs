//! One guest's virtual PC: the devices on its buses, the interrupt chipset they feed, its console
//! and its exit status.
//!
//! The exit handlers call [`Platform::io_read`], [`Platform::io_write`], [`Platform::mmio_read`]
//! and [`Platform::mmio_write`]; the run loop calls [`Platform::advance`] with the guest's virtual
//! TSC before it looks for an interrupt to inject with [`Platform::pending_interrupt`], injects
//! it, and reports the injection with [`Platform::acknowledge`]. [`Platform::next_deadline`] tells
//! the scheduler when the next timer interrupt is due.

use super::acpi_pm::AcpiPm;
use super::board::Board;
use super::console::DebugConsole;
use super::debug_exit::DebugExit;
use super::fw_cfg::FwCfg;
use super::i8042::I8042;
use super::ioapic::{self, IoApic};
use super::lapic::{self, delivery, ApicMessage, Lapic, MessageSink, ShotWay};
use super::pci::{self, PciHost};
use super::pic8259::{self, PicPair};
use super::pit8254::{self, Pit};
use super::port80::Port80;
use super::rtc::{self, Rtc};
use super::uart16550::{self, Uart16550};
use super::{
    BusError, ConsoleBuffer, Device, DeviceContext, DeviceId, IrqSink, Latch, MmioBus, PortBus,
    PowerEvent, Responder, IRQ_LINES,
};
use crate::abi::port;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::any::Any;

/// What happened on one interrupt line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Rising edges (assertions) of the line.
    pub raised: u64,
    /// Timer ticks that did not become an interrupt of their own: ticks that fell due together
    /// (caught up in one `advance`) and edges that met the previous request still pending.
    pub coalesced: u64,
    /// Edges that found the line masked at every controller.
    pub masked: u64,
}

/// A vCPU's local APIC vectors as APIC virtualization posts them ([`Platform::apic_vectors`]): IRR,
/// ISR, TMR, whether the APIC is enabled, and which words of IRR and ISR are non-zero.
pub type ApicVectors<'a> = (&'a [u32; 8], &'a [u32; 8], &'a [u32; 8], bool, (u8, u8));

/// One vCPU's local APIC for APIC virtualization ([`Platform::apic_view`]): its TPR, mode, IRR,
/// ISR and TMR, and the registers the virtual-APIC page mirrors; none of them a timer or a
/// message.
pub struct ApicView<'a>(&'a mut Lapic);

impl ApicView<'_> {
    /// The task-priority register (`Lapic::tpr`).
    #[inline]
    pub fn tpr(&self) -> u8 {
        self.0.tpr()
    }

    /// The TPR the guest left in VTPR (`Lapic::set_tpr`).
    #[inline]
    pub fn set_tpr(&mut self, tpr: u8) {
        self.0.set_tpr(tpr);
    }

    /// The highest vector pending in IRR (`Lapic::highest_irr`).
    #[inline]
    pub fn highest_irr(&self) -> Option<u8> {
        self.0.highest_irr()
    }

    /// IA32_APIC_BASE's mode (`Lapic::mode`).
    #[inline]
    pub fn mode(&self) -> lapic::ApicMode {
        self.0.mode()
    }

    /// The processor priority (`Lapic::ppr`).
    #[inline]
    pub fn ppr(&self) -> u8 {
        self.0.ppr()
    }

    /// As [`Platform::apic_vectors`].
    #[inline]
    pub fn vectors(&self) -> ApicVectors<'_> {
        let (irr, isr, tmr) = self.0.vectors();
        (irr, isr, tmr, self.0.enabled(), self.0.vector_summaries())
    }

    /// As [`Platform::set_apic_vectors`].
    #[inline]
    pub fn set_vectors(&mut self, irr: &[u32; 8], isr: &[u32; 8]) {
        self.0.set_vectors(irr, isr);
    }

    /// As [`Platform::apic_vectors_posted`].
    #[inline]
    pub fn posted(&mut self) {
        self.0.posted();
    }

    /// `Lapic::settle_empty`: the posted vectors were all taken and ended.
    #[inline]
    pub fn settle_empty(&mut self) -> bool {
        self.0.settle_empty()
    }

    /// As [`Platform::apic_page_stale`].
    #[inline]
    pub fn page_stale(&self) -> bool {
        self.0.page_stale()
    }

    /// As [`Platform::take_apic_page_image`].
    #[inline]
    pub fn take_page_image(&mut self) -> Option<[(usize, u32); lapic::PAGE_IMAGE_LEN]> {
        self.0.take_page_stale().then(|| self.0.page_image())
    }

    /// As [`Platform::take_apic_icr`].
    #[inline]
    pub fn take_icr(&mut self) -> Option<(usize, u32)> {
        self.0.take_icr_stale()
    }

    /// As [`Platform::icr_high`].
    #[inline]
    pub fn icr_high(&self) -> u32 {
        self.0.icr_high()
    }

    /// As [`Platform::set_icr_high`].
    #[inline]
    pub fn set_icr_high(&mut self, value: u32) {
        self.0.set_icr_high(value);
    }
}

/// Counters of one platform, for the accounting table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlatformStats {
    /// Per GSI / ISA IRQ line.
    pub lines: [LineStats; IRQ_LINES],
    /// The local APIC timer: `raised` counts expiries that set an IRR bit.
    pub lapic_timer: LineStats,
    /// Interrupts injected (acknowledged) into the guest.
    pub acknowledged: u64,
    /// Acknowledgements of a vector no controller was offering (ignored).
    pub stale_acks: u64,
    pub unclaimed_io_reads: u64,
    pub unclaimed_io_writes: u64,
    pub unclaimed_mmio_reads: u64,
    pub unclaimed_mmio_writes: u64,
}

/// The interrupt fabric: line levels and the controllers they lead to. Every ISA line goes to
/// the 8259A pair and to the IOAPIC (IRQ0 on pin 2); the IOAPIC sends to the local APICs its
/// redirection entries name; the 8259A's INTR reaches a CPU through LINT0 in ExtINT mode (or
/// directly while its local APIC is globally disabled). Each vCPU has its own local APIC
/// (`lapics[i]` is vCPU i's, APIC ID i); they live here, with the VM, because the IOAPIC and the
/// other vCPUs' ICRs write into them.
#[derive(Debug)]
struct Chipset {
    levels: [bool; IRQ_LINES],
    pic: PicPair,
    ioapic: IoApic,
    lapics: Apics,
    /// INIT and SIPI messages for vCPUs, in the order sent: the run loop acts on them.
    starts: Vec<(usize, StartSignal)>,
    /// vCPUs an IPI reached since the run loop last looked (a bit each).
    kicked: u64,
    stats: PlatformStats,
}

/// An INIT or STARTUP IPI for a vCPU (SDM 10.6.1, 8.4.4): what changes its run state, which the
/// run loop owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartSignal {
    /// INIT: the vCPU waits for a SIPI (its APIC is already reset).
    Init,
    /// STARTUP with this vector: a vCPU waiting for SIPI starts in real mode at vector << 12.
    Startup(u8),
}

/// Every vCPU's local APIC: the destination of IOAPIC messages and IPIs; and the vCPUs an
/// IOAPIC message or the 8259A's INTR reached since the run loop last looked (a bit each,
/// [`Platform::take_raised`]).
#[derive(Debug)]
struct Apics(Vec<Lapic>, u64);

impl Apics {
    /// The vCPUs a message for `destination` reaches (SDM 10.6.2), `broadcast` being the
    /// all-processors destination of the addressing mode.
    fn targets(&self, destination: u32, logical: bool, broadcast: u32) -> u64 {
        let mut set = 0;
        for (i, l) in self.0.iter().enumerate() {
            if destination == broadcast || l.matches_id(destination, logical) {
                set |= 1 << i;
            }
        }
        set
    }

    /// Of the vCPUs in `set`, the one lowest-priority delivery picks: the lowest TPR, the lowest
    /// APIC ID among equals (SDM 10.6.2.4 leaves the arbitration to the model).
    fn lowest_priority(&self, set: u64) -> u64 {
        (0..self.0.len())
            .filter(|&i| set & (1 << i) != 0 && self.0[i].enabled())
            .min_by_key(|&i| self.0[i].tpr())
            .map_or(0, |i| 1 << i)
    }
}

impl MessageSink for Apics {
    /// A message from the IOAPIC, to the APICs its destination names.
    fn deliver(&mut self, msg: ApicMessage) -> Latch {
        let mut set = self.targets(u32::from(msg.destination), msg.logical, 0xff);
        if msg.delivery_mode == delivery::LOWEST_PRIORITY {
            set = self.lowest_priority(set);
        }
        let mut latch = Latch::Masked;
        for (i, l) in self.0.iter_mut().enumerate() {
            if set & (1 << i) != 0 {
                let got = l.deliver(msg);
                if got != Latch::Masked {
                    // Even one it holds pending: the CPU running that vCPU may lack it
                    // (`Lapic::accept`).
                    self.1 |= 1 << i;
                }
                latch = match (latch, got) {
                    (Latch::New, _) | (_, Latch::New) => Latch::New,
                    (Latch::AlreadyPending, _) | (_, Latch::AlreadyPending) => {
                        Latch::AlreadyPending
                    }
                    _ => Latch::Masked,
                };
            }
        }
        latch
    }
}

/// Which controller offers the interrupt to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Lapic,
    Pic,
}

impl Chipset {
    fn new(cpus: u8, tsc_hz: u64) -> Self {
        Chipset {
            levels: [false; IRQ_LINES],
            pic: PicPair::new(),
            ioapic: IoApic::new(),
            lapics: Apics(
                (0..cpus.max(1))
                    .map(|id| Lapic::for_cpu(id, tsc_hz))
                    .collect(),
                0,
            ),
            starts: Vec::new(),
            kicked: 0,
            stats: PlatformStats::default(),
        }
    }

    /// The interrupt vCPU `cpu` would take next: its local APIC's highest IRR vector above PPR,
    /// else the 8259A's if its INTR gets through.
    fn pending(&self, cpu: usize) -> Option<(Source, u8)> {
        let lapic = self.lapics.0.get(cpu)?;
        if let Some(v) = lapic.deliverable() {
            return Some((Source::Lapic, v));
        }
        if lapic.accepts_pic_intr() {
            return self.pic.pending_vector().map(|v| (Source::Pic, v));
        }
        None
    }

    fn lapic_write(&mut self, cpu: usize, offset: u64, size: u8, value: u64, now: u64) {
        let Some(lapic) = self.lapics.0.get_mut(cpu) else {
            return;
        };
        if let Some(vector) = lapic.mmio_write(offset, size, value, now) {
            self.ioapic.eoi(vector, &mut self.lapics);
        }
        self.route_ipis(cpu);
    }

    /// Delivers the IPIs vCPU `from` sent to other processors through its ICR (SDM 10.6.1):
    /// fixed and lowest-priority interrupts set the targets' IRR (edge triggered), NMIs make
    /// one pending, INIT resets the targets' APICs and STARTUP carries its vector; both go to
    /// the run loop as [`StartSignal`]s. An INIT level de-assert (INIT with level 0, trigger
    /// level) only synchronises arbitration IDs and does nothing here.
    fn route_ipis(&mut self, from: usize) {
        while let Some(ipi) = self.lapics.0.get_mut(from).and_then(Lapic::take_ipi) {
            let all_others = ((1u64 << self.lapics.0.len()) - 1) & !(1 << from);
            let set = match ipi.shorthand() {
                0 => {
                    let broadcast = if ipi.x2apic { u32::MAX } else { 0xff };
                    let set = self
                        .lapics
                        .targets(ipi.destination(), ipi.logical(), broadcast)
                        & !(1 << from);
                    if ipi.delivery_mode() == delivery::LOWEST_PRIORITY {
                        self.lapics.lowest_priority(set)
                    } else {
                        set
                    }
                }
                // The sender's own part of "all including self" was delivered by its APIC.
                _ => all_others,
            };
            let deassert = ipi.icr_low & (1 << 14) == 0 && ipi.icr_low & (1 << 15) != 0;
            for to in (0..self.lapics.0.len()).filter(|i| set & (1 << i) != 0) {
                let lapic = &mut self.lapics.0[to];
                match ipi.delivery_mode() {
                    // Vectors 0-15 set the receiver's "receive illegal vector" (`accept`).
                    delivery::FIXED | delivery::LOWEST_PRIORITY if lapic.enabled() => {
                        lapic.accept(ipi.vector(), false);
                    }
                    delivery::NMI if lapic.enabled() => {
                        lapic.raise_nmi();
                    }
                    delivery::INIT if !deassert => {
                        lapic.init();
                        self.starts.push((to, StartSignal::Init));
                    }
                    delivery::STARTUP => self.starts.push((to, StartSignal::Startup(ipi.vector()))),
                    _ => continue, // SMI, ExtINT, a disabled APIC: nothing arrives
                }
                self.kicked |= 1 << to;
            }
        }
    }
}

impl IrqSink for Chipset {
    fn set_line(&mut self, line: u8, level: bool) {
        let i = usize::from(line);
        let Some(old) = self.levels.get_mut(i) else {
            return;
        };
        let rising = level && !*old;
        *old = level;
        let pic = if i < 16 {
            self.pic.set_irq(line, level)
        } else {
            Latch::Masked
        };
        if pic == Latch::New {
            // The 8259A's INTR goes to the vCPUs whose LINT0 takes it (`Chipset::pending`).
            for (c, l) in self.lapics.0.iter().enumerate() {
                if l.accepts_pic_intr() {
                    self.lapics.1 |= 1 << c;
                }
            }
        }
        let pin = ioapic::pin_for_line(line);
        let io = self.ioapic.set_pin(pin, level, &mut self.lapics);
        if rising {
            let stats = &mut self.stats.lines[i];
            stats.raised += 1;
            match pic.either(io) {
                Latch::New => {}
                Latch::AlreadyPending => stats.coalesced += 1,
                Latch::Masked => stats.masked += 1,
            }
        }
    }

    fn ticks_coalesced(&mut self, line: u8, count: u64) {
        if let Some(s) = self.stats.lines.get_mut(usize::from(line)) {
            s.coalesced += count;
        }
    }
}

/// The virtual PC of one guest.
pub struct Platform {
    board: Board,
    tsc_hz: u64,
    devices: Vec<Box<dyn Device>>,
    ports: PortBus,
    mmio: MmioBus,
    chipset: Chipset,
    console: ConsoleBuffer,
    exit_status: Option<u32>,
    /// A power-off or reset the guest asked for, until the run loop takes it.
    power: Option<PowerEvent>,
    /// The earliest timer deadline, recomputed after every operation that can change a timer
    /// (device accesses, firings, TSC-deadline writes), so that `advance` and `next_deadline`
    /// cost nothing on the many exits that touch no device.
    next: Option<u64>,
    /// Each device's next deadline as it last reported it (`Device::next_deadline`, a function
    /// of the device's own state), taken after every call into the device ([`Platform::call`],
    /// the only way its state changes) and after a restore; and the earliest of them. So a
    /// local APIC timer that fires, or an access to one device, does not ask every device
    /// again (`advance`, `refresh`).
    deadlines: Vec<Option<u64>>,
    devices_next: Option<u64>,
    /// Whether the port access in progress reached beyond its device's registers (a line, the
    /// console, a timer, the 8259A) or a timer fired: then the deadline is recomputed.
    access_changed: bool,
    /// False once a port access changed something beyond its device, or a timer fired, since
    /// the last [`Platform::take_ports_quiet`].
    ports_quiet: bool,
    /// The last port access ([`Platform::take_ports_quiet`]) reached beyond its device: the
    /// next one does not try the quiet way ([`Platform::io_quiet`]), an attempt that costs
    /// about 20 instructions where it fails (a guest driving a device whose every access moves
    /// its line). Only a hint: the ordinary way gives the same result either way. A console
    /// byte is no such access: its writer's next access, the line-status read, is quiet.
    loud: bool,
    /// Counts the changes of the timers' deadlines (each `refresh`, each device deadline
    /// kept anew): a [`TimerShot`] stands only in the epoch it was worked out in.
    epoch: u32,
}

/// A vCPU's LAPIC timer expiry worked out ahead ([`Platform::timer_shot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerShot {
    lapic: lapic::TimerShot,
    /// Before this TSC no other timer of the platform falls due.
    others: u64,
    /// The earliest deadline after the expiry.
    next: Option<u64>,
    epoch: u32,
}

impl TimerShot {
    /// Whether the shot may fire at `now` on a platform at `epoch`: at or past the APIC timer's
    /// deadline, before any other timer's and before a second expiry of its own, and no timer
    /// of the platform changed since it was worked out.
    #[inline(always)]
    fn due(&self, now: u64, epoch: u32) -> bool {
        let s = &self.lapic;
        s.at <= now && now < self.others && now < s.single_before && epoch == self.epoch
    }
}

impl Platform {
    /// A one-CPU PC with every Keel device at its standard place, on a guest TSC of `tsc_hz`, for
    /// callers that do not know the guest's RAM (fw_cfg reports 0 bytes).
    pub fn new(tsc_hz: u64) -> Self {
        Self::for_board(Board::pc(0, 1), tsc_hz)
    }

    /// The PC `board` describes, on a guest TSC of `tsc_hz`: the chipset and the ACPI, PCI, i8042
    /// and fw_cfg models at the places the board gives (and `crate::acpi` reports).
    pub fn for_board(board: Board, tsc_hz: u64) -> Self {
        let chipset = Chipset::new(board.cpus, tsc_hz);
        let mut p = Platform {
            board,
            tsc_hz: tsc_hz.max(1),
            devices: Vec::new(),
            deadlines: Vec::new(),
            devices_next: None,
            ports: PortBus::default(),
            mmio: MmioBus::default(),
            chipset,
            console: ConsoleBuffer::new(),
            exit_status: None,
            power: None,
            next: None,
            access_changed: false,
            ports_quiet: true,
            loud: false,
            epoch: 0,
        };
        let chipset_ports = [
            (pic8259::MASTER_CMD, Responder::Pic, "pic8259 master"),
            (pic8259::SLAVE_CMD, Responder::Pic, "pic8259 slave"),
            (pic8259::ELCR_MASTER, Responder::Elcr, "elcr"),
        ];
        for (first, responder, name) in chipset_ports {
            let registered = p.ports.register(first, 2, responder, name);
            debug_assert!(registered.is_ok());
        }
        let chipset_mmio = [
            (
                p.board.lapic_base,
                lapic::LAPIC_SIZE,
                Responder::Lapic,
                "lapic",
            ),
            (
                p.board.ioapic.base,
                ioapic::IOAPIC_SIZE,
                Responder::Ioapic,
                "ioapic",
            ),
        ];
        for (base, len, responder, name) in chipset_mmio {
            let registered = p.mmio.register(base, len, responder, name);
            debug_assert!(registered.is_ok());
        }
        let rtc = Box::new(Rtc::new(p.tsc_hz));
        p.attach_builtin(rtc, &[(rtc::RTC_INDEX, 2)]);
        let pit = Box::new(Pit::new(p.tsc_hz));
        p.attach_builtin(pit, &[(pit8254::CHANNEL0, 4), (pit8254::PORT_61, 1)]);
        p.attach_builtin(Box::new(Port80::default()), &[(0x80, 1)]);
        p.attach_builtin(Box::new(DebugConsole), &[(port::DEBUGCON, 1)]);
        p.attach_builtin(Box::new(DebugExit), &[(port::DEBUG_EXIT, 4)]);
        let com1 = Uart16550::new(port::COM1, uart16550::COM1_IRQ);
        p.attach_builtin(Box::new(com1), &[(port::COM1, 8)]);
        let pm = AcpiPm::new(p.board.pm, p.board.sci_irq, p.tsc_hz);
        let pm_ports = pm.ports();
        p.attach_builtin(Box::new(pm), &pm_ports);
        p.attach_builtin(
            Box::new(PciHost::new()),
            &[(pci::CONFIG_ADDRESS, pci::PORTS)],
        );
        p.attach_builtin(Box::new(I8042::new()), &I8042::ports());
        let fw_cfg = FwCfg::new(&p.board);
        p.attach_builtin(Box::new(fw_cfg), &FwCfg::ports());
        p
    }

    /// The platform after a reset of the machine: every device at its power-on state but the
    /// CMOS RAM (0x0E-0x7F), which is battery-backed on a PC and keeps its contents across a
    /// reset, as QEMU's does.
    pub fn after_reset(&self) -> Platform {
        let mut p = Platform::for_board(self.board.clone(), self.tsc_hz);
        if let Some(old) = self.device::<Rtc>() {
            let nvram: Vec<(u8, u8)> = (0x0e..0x80).map(|i| (i, old.cmos(i))).collect();
            p.with_device(0, |rtc: &mut Rtc, _| {
                for (i, v) in nvram {
                    rtc.set_cmos(i, v);
                }
            });
        }
        p
    }

    /// Writes the state of the whole virtual PC (section `PLAT`, `crate::state`): the interrupt
    /// lines, the 8259A pair, the IOAPIC, every vCPU's local APIC and every device, in the order
    /// `for_board` builds them. Its timers are on the guest's clock (`guest::Vm::now`). What Keel
    /// keeps for itself is left out: the guest's console lines not yet printed, the statistics.
    pub fn save(&self, w: &mut crate::state::Writer) {
        w.section(*b"PLAT", 1, |w| {
            w.put(&self.tsc_hz);
            w.put(&self.chipset.levels);
            self.chipset.pic.save(w);
            self.chipset.ioapic.save(w);
            w.put(&(self.chipset.lapics.0.len() as u32));
            for l in &self.chipset.lapics.0 {
                l.save(w);
            }
            w.put(&self.exit_status);
            w.put(&(self.devices.len() as u32));
            for d in &self.devices {
                d.save(w);
            }
        });
    }

    /// Takes over what [`Platform::save`] wrote, if it is the state of a PC like this one (the
    /// same guest TSC rate, vCPUs and devices); on an error the platform is unchanged. The
    /// guest's console lines not yet printed stay.
    pub fn restore(
        &mut self,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<(), crate::state::StateError> {
        use crate::state::StateError;
        let mut fresh = Platform::for_board(self.board.clone(), self.tsc_hz);
        if fresh.devices.len() != self.devices.len() {
            return Err(StateError::Invalid(
                "a platform with devices beyond the board's cannot be restored",
            ));
        }
        r.section(*b"PLAT", 1, |r, _| {
            if r.get::<u64>()? != fresh.tsc_hz {
                return Err(StateError::Invalid(
                    "the guest's TSC rate differs from this platform's",
                ));
            }
            let c = &mut fresh.chipset;
            c.levels = r.get()?;
            c.pic.restore(r)?;
            c.ioapic.restore(r)?;
            if r.get::<u32>()? as usize != c.lapics.0.len() {
                return Err(StateError::Invalid("a different number of local APICs"));
            }
            for l in &mut c.lapics.0 {
                l.restore(r)?;
            }
            fresh.exit_status = r.get()?;
            if r.get::<u32>()? as usize != fresh.devices.len() {
                return Err(StateError::Invalid("a different set of devices"));
            }
            for d in &mut fresh.devices {
                d.restore(r)?;
            }
            Ok(())
        })?;
        fresh.console = core::mem::take(&mut self.console);
        fresh.deadlines = fresh.devices.iter().map(|d| d.next_deadline()).collect();
        fresh.devices_next = fresh.deadlines.iter().flatten().copied().min();
        fresh.refresh();
        *self = fresh;
        Ok(())
    }

    /// The machine this platform models (the ACPI tables are built from it).
    pub fn board(&self) -> &Board {
        &self.board
    }

    /// Takes the power-off or reset the guest asked for, if any (the run loop acts on it).
    pub fn take_power_event(&mut self) -> Option<PowerEvent> {
        self.power.take()
    }

    fn attach_builtin(&mut self, device: Box<dyn Device>, ports: &[(u16, u16)]) {
        let attached = self.attach(device, ports, &[]);
        debug_assert!(attached.is_ok(), "built-in devices overlap: {attached:?}");
    }

    /// Puts `device` on the buses at `ports` (first, count) and `mmio` (base, length). Nothing is
    /// registered if any range clashes.
    pub fn attach(
        &mut self,
        device: Box<dyn Device>,
        ports: &[(u16, u16)],
        mmio: &[(u64, u64)],
    ) -> Result<DeviceId, BusError> {
        let id = DeviceId(self.devices.len());
        let name = device.name();
        let mut port_bus = self.ports.clone();
        for &(first, count) in ports {
            port_bus.register(first, count, Responder::Device(id), name)?;
        }
        let mut mmio_bus = self.mmio.clone();
        for &(base, len) in mmio {
            mmio_bus.register(base, len, Responder::Device(id), name)?;
        }
        self.ports = port_bus;
        self.mmio = mmio_bus;
        self.deadlines.push(device.next_deadline());
        self.devices.push(device);
        self.devices_next = self.deadlines.iter().flatten().copied().min();
        self.refresh();
        Ok(id)
    }

    /// The guest TSC rate the platform converts device clocks against.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    pub fn port_bus(&self) -> &PortBus {
        &self.ports
    }

    pub fn mmio_bus(&self) -> &MmioBus {
        &self.mmio
    }

    /// The first device of type `T`.
    pub fn device<T: Device>(&self) -> Option<&T> {
        self.devices
            .iter()
            .find_map(|d| (d.as_ref() as &dyn Any).downcast_ref::<T>())
    }

    /// Runs `f` on the first device of type `T` with a context at time `now`.
    pub fn with_device<T: Device, R>(
        &mut self,
        now: u64,
        f: impl FnOnce(&mut T, &mut DeviceContext<'_>) -> R,
    ) -> Option<R> {
        let i = self
            .devices
            .iter()
            .position(|d| (d.as_ref() as &dyn Any).is::<T>())?;
        let r = self
            .call(DeviceId(i), now, |dev, cx| {
                (dev as &mut dyn Any).downcast_mut::<T>().map(|t| f(t, cx))
            })
            .flatten();
        self.refresh();
        r
    }

    /// Runs `f` on device `id` with a context at time `now`.
    #[inline]
    fn call<R>(
        &mut self,
        id: DeviceId,
        now: u64,
        f: impl FnOnce(&mut dyn Device, &mut DeviceContext<'_>) -> R,
    ) -> Option<R> {
        let dev = self.devices.get_mut(id.0)?;
        let mut cx = DeviceContext::new(
            now,
            &mut self.chipset,
            &mut self.console,
            &mut self.exit_status,
            &mut self.power,
        );
        let r = f(dev.as_mut(), &mut cx);
        let deadline = dev.next_deadline();
        if let Some(kept) = self.deadlines.get_mut(id.0) {
            if *kept != deadline {
                *kept = deadline;
                self.devices_next = self.deadlines.iter().flatten().copied().min();
                self.epoch = self.epoch.wrapping_add(1);
            }
        }
        Some(r)
    }

    /// Delivers a byte typed at the guest's serial console to COM1's receiver. False if the
    /// receive FIFO overran.
    pub fn push_serial_input(&mut self, byte: u8, now: u64) -> bool {
        self.advance(now);
        self.with_device(now, |uart: &mut Uart16550, cx| uart.push_input(byte, cx))
            .unwrap_or(false)
    }

    /// Whether COM1's receiver takes another byte now without an overrun.
    pub fn serial_input_room(&mut self, now: u64) -> bool {
        self.with_device(now, |uart: &mut Uart16550, _| uart.rx_room())
            .unwrap_or(false)
    }

    /// A guest `IN` of `size` bytes (1, 2 or 4) from `port`; None if no device claims the port
    /// (the caller returns all ones to the guest).
    #[inline]
    pub fn io_read(&mut self, port: u16, size: u8, now: u64) -> Option<u32> {
        self.access_changed = false;
        let r = self.io_read_inner(port, size, now);
        self.after_port_access();
        r
    }

    /// A guest byte `IN` (`write` None) or `OUT` at `port` made by its device alone, without the
    /// context ([`Device::io_quiet`]), when nothing but the device's own registers (and the
    /// guest's console, which the run loop prints after it) can change:
    /// no timer is due by `now` (none fires first, as [`Platform::io_read`] would fire it),
    /// nothing changed since the last [`Platform::take_ports_quiet`] (which then stays true,
    /// as after the same access made the ordinary way) and the device says the access reaches
    /// nothing else. Returns the byte read (0 for a write); None, with nothing done, for any
    /// other access (a wide one, the chipset's, a port no device claims), which the caller
    /// makes through `io_read`/`io_write`.
    #[inline]
    pub fn io_quiet(&mut self, port: u16, size: u8, write: Option<u8>, now: u64) -> Option<u8> {
        if self.loud || size != 1 || !self.ports_quiet || self.next.is_some_and(|d| d <= now) {
            return None;
        }
        let id = self.ports.device(port)?;
        self.devices
            .get_mut(id.0)?
            .io_quiet(port, write, &mut self.console)
    }

    /// After a port access: the earliest deadline again if the access may have moved it.
    #[inline]
    fn after_port_access(&mut self) {
        if self.access_changed {
            self.refresh();
            self.ports_quiet = false;
        }
    }

    /// True if no port access since the last call changed anything beyond its device's own
    /// registers (no line driven, no timer moved, no 8259A access; a console byte is none of
    /// these, [`Platform::take_console_written`]) and no timer fired: the run loop then skips
    /// the injection check and the deadlines after an I/O exit. Starts counting afresh.
    pub fn take_ports_quiet(&mut self) -> bool {
        let quiet = core::mem::replace(&mut self.ports_quiet, true);
        self.loud = !quiet;
        quiet
    }

    /// True if a port access wrote to the guest's console since the last call (a byte to a
    /// UART's transmitter, the debug console): the run loop prints the guest's lines. Such an
    /// access alone is still quiet ([`Platform::take_ports_quiet`]): it drives no line and
    /// moves no timer, so no look at the platform follows it.
    #[inline]
    pub fn take_console_written(&mut self) -> bool {
        self.console.take_pushed()
    }

    /// The access itself, inlined into [`Platform::io_read`] with the device's call, so that
    /// the exit path pays one call for a byte access to a device (docs/BENCHMARKS.md).
    #[inline]
    fn io_read_inner(&mut self, port: u16, size: u8, now: u64) -> Option<u32> {
        self.advance_if_due(now);
        let Some(first) = self.ports.find(port) else {
            self.chipset.stats.unclaimed_io_reads += 1;
            return None;
        };
        let size = access_size(size);
        // A byte access goes to `first` whole, as a wide one to a device that takes it.
        if size == 1 || self.takes_wide(first) {
            return Some(self.port_read(first, port, size, now) & super::size_mask(size));
        }
        // An 8-bit device sees a wide access as byte accesses at successive ports.
        let mut value = 0;
        for i in 0..size {
            let p = port.wrapping_add(u16::from(i));
            let byte = match self.ports.find(p) {
                Some(r) => self.port_read(r, p, 1, now) & 0xff,
                None => 0xff,
            };
            value |= byte << (8 * i);
        }
        Some(value)
    }

    /// A guest `OUT` of `size` bytes to `port`; false if no device claims the port.
    #[inline]
    pub fn io_write(&mut self, port: u16, size: u8, value: u32, now: u64) -> bool {
        self.access_changed = false;
        let r = self.io_write_inner(port, size, value, now);
        self.after_port_access();
        r
    }

    /// As [`Platform::io_read_inner`].
    #[inline]
    fn io_write_inner(&mut self, port: u16, size: u8, value: u32, now: u64) -> bool {
        self.advance_if_due(now);
        let Some(first) = self.ports.find(port) else {
            self.chipset.stats.unclaimed_io_writes += 1;
            return false;
        };
        let size = access_size(size);
        if size == 1 || self.takes_wide(first) {
            self.port_write(first, port, size, value & super::size_mask(size), now);
            return true;
        }
        for i in 0..size {
            let p = port.wrapping_add(u16::from(i));
            if let Some(r) = self.ports.find(p) {
                self.port_write(r, p, 1, (value >> (8 * i)) & 0xff, now);
            }
        }
        true
    }

    /// True if an access at guest-physical `gpa` belongs to a device (not to RAM or nothing).
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        self.mmio.find(gpa).is_some()
    }

    /// A load of `size` bytes at `gpa` by vCPU `cpu` (the local APIC page is each vCPU's own);
    /// None if no device claims it.
    pub fn mmio_read(&mut self, cpu: usize, gpa: u64, size: u8, now: u64) -> Option<u64> {
        let r = self.mmio_read_inner(cpu, gpa, size, now);
        self.refresh();
        r
    }

    fn mmio_read_inner(&mut self, cpu: usize, gpa: u64, size: u8, now: u64) -> Option<u64> {
        self.advance(now);
        let Some((r, offset)) = self.mmio.find(gpa) else {
            self.chipset.stats.unclaimed_mmio_reads += 1;
            return None;
        };
        let value = match r {
            Responder::Device(id) => self
                .call(id, now, |dev, cx| dev.mmio_read(offset, size, cx))
                .unwrap_or(u64::MAX),
            Responder::Lapic => match self.chipset.lapics.0.get_mut(cpu) {
                Some(lapic) => lapic.mmio_read(offset, size, now),
                None => u64::MAX,
            },
            Responder::Ioapic => self.chipset.ioapic.mmio_read(offset, size),
            Responder::Pic | Responder::Elcr => u64::MAX,
        };
        Some(value)
    }

    /// Whether vCPU `cpu`'s MMIO access at `gpa` (a store if `store`) is one its local APIC
    /// makes alone at `now` ([`Platform::apic_access_alone`]), after which a look at the
    /// platform would find as little to do as before it: the address on the APIC's page, no
    /// timer due by `now` (none fires first, as [`Platform::mmio_read`] would fire it), no
    /// interrupt pending for the vCPU (from its APIC or the 8259A: a look would inject it or ask
    /// for a window), and an access that changes nothing beyond the APIC's registers and lets
    /// no vector through (`Lapic::access_stays_here`).
    #[inline]
    pub fn apic_access_quiet(&self, cpu: usize, gpa: u64, store: bool, now: u64) -> bool {
        let offset = gpa.wrapping_sub(self.board.lapic_base);
        offset < lapic::LAPIC_SIZE
            && (self.chipset.lapics.0.get(cpu)).is_some_and(|l| l.access_stays_here(offset, store))
            && self.nothing_for_a_look(cpu, now)
    }

    /// What the APIC's quiet accesses ([`Platform::apic_access_quiet`],
    /// [`Platform::x2apic_access_quiet`]) need beside the access itself: no timer due by `now`
    /// (none fires first, as the ordinary access would fire it) and no interrupt pending for vCPU
    /// `cpu` from its APIC or the 8259A (a look would inject it or ask for a window).
    #[inline(always)]
    fn nothing_for_a_look(&self, cpu: usize, now: u64) -> bool {
        !self.next.is_some_and(|d| d <= now) && self.chipset.pending(cpu).is_none()
    }

    /// The access [`Platform::apic_access_quiet`] allowed, made by the APIC alone: the value
    /// loaded (`store` None), or 0 once `store` is stored. What [`Platform::mmio_read`] and
    /// [`Platform::mmio_write`] would do, less the timers' advance (none is due) and the
    /// deadlines taken again (none moved): so a [`TimerShot`] worked out before stays good.
    #[inline]
    pub fn apic_access_alone(
        &mut self,
        cpu: usize,
        gpa: u64,
        size: u8,
        store: Option<u64>,
        now: u64,
    ) -> u64 {
        debug_assert!(self.apic_access_quiet(cpu, gpa, store.is_some(), now));
        let offset = gpa.wrapping_sub(self.board.lapic_base);
        let Some(l) = self.chipset.lapics.0.get_mut(cpu) else {
            return u64::MAX;
        };
        match store {
            None => l.mmio_read(offset, size, now),
            Some(value) => {
                // No EOI message to send (`Lapic::access_stays_here`), no IPI to route.
                let level_eoi = l.mmio_write(offset, size, value, now);
                debug_assert!(level_eoi.is_none());
                0
            }
        }
    }

    /// [`Platform::apic_access_quiet`] for vCPU `cpu`'s RDMSR (`store` None) or WRMSR of
    /// x2APIC register `msr` (`Lapic::x2apic_stays_here`).
    #[inline]
    pub fn x2apic_access_quiet(&self, cpu: usize, msr: u32, store: Option<u64>, now: u64) -> bool {
        (self.chipset.lapics.0.get(cpu)).is_some_and(|l| l.x2apic_stays_here(msr, store))
            && self.nothing_for_a_look(cpu, now)
    }

    /// The access [`Platform::x2apic_access_quiet`] allowed, made by the APIC alone: the value
    /// read (`store` None), or 0 once `store` is written. [`Platform::x2apic_read`] and
    /// [`Platform::x2apic_write`] less the timers' advance and the deadlines taken again, as
    /// [`Platform::apic_access_alone`].
    #[inline]
    pub fn x2apic_access_alone(
        &mut self,
        cpu: usize,
        msr: u32,
        store: Option<u64>,
        now: u64,
    ) -> u64 {
        debug_assert!(self.x2apic_access_quiet(cpu, msr, store, now));
        let Some(l) = self.chipset.lapics.0.get_mut(cpu) else {
            return 0;
        };
        match store {
            None => l.x2apic_read(msr, now).unwrap_or(0),
            Some(value) => {
                let done = l.x2apic_write(msr, value, now);
                debug_assert_eq!(done, Ok(None));
                0
            }
        }
    }

    /// A store of `size` bytes at `gpa` by vCPU `cpu`; false if no device claims it.
    pub fn mmio_write(&mut self, cpu: usize, gpa: u64, size: u8, value: u64, now: u64) -> bool {
        let r = self.mmio_write_inner(cpu, gpa, size, value, now);
        self.refresh();
        r
    }

    fn mmio_write_inner(&mut self, cpu: usize, gpa: u64, size: u8, value: u64, now: u64) -> bool {
        self.advance(now);
        let Some((r, offset)) = self.mmio.find(gpa) else {
            self.chipset.stats.unclaimed_mmio_writes += 1;
            return false;
        };
        let chipset = &mut self.chipset;
        match r {
            Responder::Device(id) => {
                self.call(id, now, |dev, cx| dev.mmio_write(offset, size, value, cx));
            }
            Responder::Lapic => chipset.lapic_write(cpu, offset, size, value, now),
            Responder::Ioapic => {
                chipset
                    .ioapic
                    .mmio_write(offset, size, value, &mut chipset.lapics)
            }
            Responder::Pic | Responder::Elcr => {}
        }
        true
    }

    /// Fires every timer that fell due by `now` (the guest's virtual TSC).
    pub fn advance(&mut self, now: u64) {
        if !self.next.is_some_and(|d| d <= now) {
            return;
        }
        if self.devices_next.is_some_and(|d| d <= now) {
            for i in 0..self.devices.len() {
                if self.deadlines[i].is_some_and(|d| d <= now) {
                    self.call(DeviceId(i), now, |dev, cx| dev.advance(cx));
                }
            }
        }
        for lapic in &mut self.chipset.lapics.0 {
            lapic.advance(now);
        }
        self.refresh();
        self.ports_quiet = false;
    }

    /// vCPU `cpu`'s LAPIC timer expiry worked out ahead (`Lapic::timer_shot`), when the run loop
    /// arms the VMX-preemption timer after a look at the platform: the expiry's vector when it is
    /// all the APIC holds for the guest the way `way` gives it (`Lapic::timer_alone_vector`), the
    /// time before which no other timer (a device's kept deadline, another APIC's) falls due, and
    /// the earliest deadline after it. [`Platform::fire_shot`] (posted) or
    /// [`Platform::fire_shot_injected`] carries it out.
    #[inline(always)]
    pub fn timer_shot(&self, cpu: usize, way: ShotWay) -> Option<TimerShot> {
        let lapics = &self.chipset.lapics.0;
        let lapic = lapics.get(cpu)?.timer_shot(way)?;
        let others = lapics
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != cpu)
            .filter_map(|(_, l)| l.next_deadline())
            .chain(self.devices_next)
            .min();
        let own_after = lapic.next_after();
        Some(TimerShot {
            lapic,
            others: others.unwrap_or(u64::MAX),
            next: others.into_iter().chain(own_after).min(),
            epoch: self.epoch,
        })
    }

    /// The short way of [`Platform::advance`] for the run loop before vCPU `cpu`'s entry, when
    /// the timer that fell due by `now` is that vCPU's local APIC timer alone, as `shot` worked
    /// it out: `now` at or past its deadline, before any other timer's and before a second
    /// expiry of its own, and no timer of the platform changed since (its deadlines were not
    /// taken again, `refresh`, and the APIC's timer is as it was, `Lapic::fire_shot`). The APIC
    /// is looked up once: it takes the guest's `tpr` first (whatever follows: the caller has
    /// taken it from VTPR), then the timer fires as `Lapic::advance` would fire it, the earliest
    /// deadline is the one the shot worked out, and the APIC's vectors count as posted
    /// (`Lapic::posted`); the vector it set in IRR, the only one there, is returned for the
    /// caller to post (`exits::apicv::fire_timer_now`). None, with nothing done but the TPR, in
    /// every other case: then `advance` is the way.
    #[inline]
    pub fn fire_shot(&mut self, cpu: usize, now: u64, shot: &TimerShot, tpr: u8) -> Option<u8> {
        let epoch = self.epoch;
        let l = self.lapic_mut(cpu);
        if l.tpr() != tpr {
            l.set_tpr(tpr);
        }
        let s = &shot.lapic;
        if !shot.due(now, epoch) || !l.fire_shot(s) {
            return None;
        }
        l.posted();
        self.shot_fired(shot);
        Some(s.vector)
    }

    /// What a fired shot leaves of the platform, as [`Platform::advance`] would: the earliest
    /// deadline the shot worked out, the timers changed (the epoch), the ports' record of no
    /// change spent.
    #[inline(always)]
    fn shot_fired(&mut self, shot: &TimerShot) {
        self.next = shot.next;
        self.epoch = self.epoch.wrapping_add(1);
        self.ports_quiet = false;
    }

    /// The short way of [`Platform::advance`] and the acknowledge after it
    /// ([`Platform::pending_interrupt`], [`Platform::acknowledge`]) for the run loop before vCPU
    /// `cpu`'s entry without virtual-interrupt delivery, when the timer that fell due by `now`
    /// is that vCPU's local APIC timer alone, as `shot` (worked out for `ShotWay::Injected`)
    /// found it, and the interrupt it raises is the one to inject: the checks of
    /// [`Platform::fire_shot`] (the time, no timer changed since), the 8259A's output down (it
    /// would come first), the APIC still as the shot found it, then the timer fires and its
    /// vector goes from IRR to ISR (`Lapic::fire_shot_injected`), the INTA cycle counted. The
    /// vector is returned for the caller to inject (`exits::apicv::fire_timer_now`). None, with
    /// nothing done, in every other case: then `advance` is the way.
    #[inline]
    pub fn fire_shot_injected(&mut self, cpu: usize, now: u64, shot: &TimerShot) -> Option<u8> {
        if !shot.due(now, self.epoch)
            || !self.chipset.pic.output_down()
            || !self.lapic_mut(cpu).fire_shot_injected(&shot.lapic)
        {
            return None;
        }
        self.chipset.stats.acknowledged += 1;
        self.shot_fired(shot);
        Some(shot.lapic.vector)
    }

    /// Whether the 8259A's INTR output is down (no request it would offer a CPU).
    pub fn pic_output_down(&self) -> bool {
        self.chipset.pic.output_down()
    }

    /// The earliest TSC at which a timer fires.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next
    }

    /// Recomputes the cached earliest deadline from every timer.
    fn refresh(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        debug_assert_eq!(
            self.deadlines,
            self.devices
                .iter()
                .map(|d| d.next_deadline())
                .collect::<Vec<_>>(),
            "a device changed outside `Platform::call`"
        );
        let lapics = self
            .chipset
            .lapics
            .0
            .iter()
            .filter_map(|l| l.next_deadline());
        self.next = self.devices_next.into_iter().chain(lapics).min();
    }

    /// The vector to inject into vCPU `cpu` next, if any (call [`Platform::advance`] first):
    /// its local APIC's highest IRR vector above PPR, else the 8259A's vector if its INTR
    /// reaches that vCPU.
    pub fn pending_interrupt(&self, cpu: usize) -> Option<u8> {
        self.chipset.pending(cpu).map(|(_, v)| v)
    }

    /// Reports that `vector` (from [`Platform::pending_interrupt`]) was injected into vCPU
    /// `cpu`: the INTA cycle of the controller that offered it (IRR to ISR). A vector no
    /// controller offers is counted in `stale_acks` and otherwise ignored.
    pub fn acknowledge(&mut self, cpu: usize, vector: u8) {
        let c = &mut self.chipset;
        match c.pending(cpu) {
            Some((Source::Lapic, v)) if v == vector => c.lapics.0[cpu].acknowledge(v),
            Some((Source::Pic, v)) if v == vector => {
                c.pic.acknowledge();
            }
            _ => {
                c.stats.stale_acks += 1;
                return;
            }
        }
        c.stats.acknowledged += 1;
    }

    /// With virtual-interrupt delivery the CPU takes the local APIC's interrupts itself
    /// (`exits::apicv`): the 8259A's vector for vCPU `cpu`, if its INTR reaches it, is all that
    /// is left to inject.
    pub fn pending_pic_interrupt(&self, cpu: usize) -> Option<u8> {
        // Checked before every entry with virtual-interrupt delivery, and the 8259A's output is
        // down nearly always (masked by a guest that uses the local APIC): no look-up of the
        // vCPU's APIC and its LINT0, no priority resolver then.
        if self.chipset.pic.output_down() {
            return None;
        }
        let lapic = self.chipset.lapics.0.get(cpu)?;
        if lapic.accepts_pic_intr() {
            self.chipset.pic.pending_vector()
        } else {
            None
        }
    }

    /// Reports that the 8259A's `vector` (from [`Platform::pending_pic_interrupt`]) was injected
    /// into vCPU `cpu`: its INTA cycle. A vector the 8259A no longer offers is counted in
    /// `stale_acks`.
    pub fn acknowledge_pic(&mut self, cpu: usize, vector: u8) {
        let offered = self.pending_pic_interrupt(cpu) == Some(vector);
        let c = &mut self.chipset;
        if offered {
            c.pic.acknowledge();
            c.stats.acknowledged += 1;
        } else {
            c.stats.stale_acks += 1;
        }
    }

    /// vCPU `cpu`'s IRR, ISR and TMR (`Lapic::vectors`), whether its APIC is globally enabled
    /// (a disabled APIC delivers nothing, SDM 11.4.3), and which words of IRR and ISR are
    /// non-zero (`Lapic::vector_summaries`).
    pub fn apic_vectors(&self, cpu: usize) -> ApicVectors<'_> {
        let l = self.lapic(cpu);
        let (irr, isr, tmr) = l.vectors();
        (irr, isr, tmr, l.enabled(), l.vector_summaries())
    }

    /// vCPU `cpu`'s registers for the virtual-APIC page (`Lapic::page_image`), if any may have
    /// changed since the last call: what APIC-register virtualization lets the guest read without
    /// an exit.
    pub fn take_apic_page_image(
        &mut self,
        cpu: usize,
    ) -> Option<[(usize, u32); lapic::PAGE_IMAGE_LEN]> {
        let l = self.lapic_mut(cpu);
        l.take_page_stale().then(|| l.page_image())
    }

    /// vCPU `cpu`'s ICR low half for the virtual-APIC page, (offset, value), if it alone changed
    /// since the page was last written (`Lapic::take_icr_stale`).
    pub fn take_apic_icr(&mut self, cpu: usize) -> Option<(usize, u32)> {
        self.lapic_mut(cpu).take_icr_stale()
    }

    /// Whether [`Platform::take_apic_page_image`] would give an image now.
    pub fn apic_page_stale(&self, cpu: usize) -> bool {
        self.lapic(cpu).page_stale()
    }

    /// vCPU `cpu`'s local APIC mode (IA32_APIC_BASE.EN and EXTD).
    pub fn apic_mode(&self, cpu: usize) -> lapic::ApicMode {
        self.lapic(cpu).mode()
    }

    /// vCPU `cpu`'s processor priority (SDM 11.8.3.1).
    pub fn ppr(&self, cpu: usize) -> u8 {
        self.lapic(cpu).ppr()
    }

    /// vCPU `cpu`'s ICR destination half (`Lapic::icr_high`).
    pub fn icr_high(&self, cpu: usize) -> u32 {
        self.lapic(cpu).icr_high()
    }

    /// The ICR destination half the guest wrote without an exit (`Lapic::set_icr_high`).
    pub fn set_icr_high(&mut self, cpu: usize, value: u32) {
        self.lapic_mut(cpu).set_icr_high(value);
    }

    /// vCPU `cpu`'s IRR and ISR as the CPU left them (`Lapic::set_vectors`).
    pub fn set_apic_vectors(&mut self, cpu: usize, irr: &[u32; 8], isr: &[u32; 8]) {
        self.lapic_mut(cpu).set_vectors(irr, isr);
    }

    /// vCPU `cpu`'s IRR and ISR ([`Platform::apic_vectors`]) are on its virtual-APIC page now
    /// (`Lapic::posted`).
    pub fn apic_vectors_posted(&mut self, cpu: usize) {
        self.lapic_mut(cpu).posted();
    }

    /// The CPU virtualized the guest's EOI of `vector` and exited because the vector is level
    /// triggered (its EOI-exit bit, SDM 30.1.4): the EOI goes on to the IOAPIC, as the model's
    /// own EOI does (SDM 11.8.5).
    pub fn virtualized_eoi(&mut self, cpu: usize, vector: u8) {
        if self.lapic(cpu).level_triggered(vector) {
            let c = &mut self.chipset;
            c.ioapic.eoi(vector, &mut c.lapics);
        }
        self.refresh();
    }

    /// vCPU `cpu`'s local APIC; the APIC of vCPU 0 for an index past the last (the callers pass
    /// their own vCPU's index, which the board's CPU count covers).
    fn lapic(&self, cpu: usize) -> &Lapic {
        let l = &self.chipset.lapics.0;
        l.get(cpu).unwrap_or(&l[0])
    }

    /// vCPU `cpu`'s local APIC, for tests that set up its state directly.
    #[cfg(test)]
    pub(crate) fn lapic_for_tests(&mut self, cpu: usize) -> &mut Lapic {
        self.lapic_mut(cpu)
    }

    fn lapic_mut(&mut self, cpu: usize) -> &mut Lapic {
        let l = &mut self.chipset.lapics.0;
        let i = if cpu < l.len() { cpu } else { 0 };
        &mut l[i]
    }

    /// vCPU `cpu`'s local APIC as APIC virtualization sees it before an entry and after an exit
    /// (`exits::apicv`): looked up once for all the registers it reads and writes, not once per
    /// register (docs/BENCHMARKS.md). Nothing it offers moves a timer, drives a line or sends
    /// a message, so the platform's kept deadlines stay true without a `refresh`.
    #[inline]
    pub fn apic_view(&mut self, cpu: usize) -> ApicView<'_> {
        ApicView(self.lapic_mut(cpu))
    }

    /// How many vCPUs (local APICs) the platform has.
    pub fn cpus(&self) -> usize {
        self.chipset.lapics.0.len()
    }

    /// Whether vCPU `cpu` has an NMI pending (it wakes a halted vCPU).
    pub fn nmi_pending(&self, cpu: usize) -> bool {
        self.lapic(cpu).nmi_pending()
    }

    /// Takes a pending NMI of vCPU `cpu` for injection (IOAPIC or ICR NMI delivery).
    pub fn take_nmi(&mut self, cpu: usize) -> bool {
        self.lapic_mut(cpu).take_nmi()
    }

    /// Whether INITs or STARTUPs wait for [`Platform::take_start_signal`].
    #[inline]
    pub fn start_signals_pending(&self) -> bool {
        !self.chipset.starts.is_empty()
    }

    /// Takes the oldest INIT or STARTUP IPI sent to a vCPU, with the vCPU's index.
    pub fn take_start_signal(&mut self) -> Option<(usize, StartSignal)> {
        let s = &mut self.chipset.starts;
        (!s.is_empty()).then(|| s.remove(0))
    }

    /// The vCPUs (a bit each) that an IPI reached since the last call.
    pub fn take_kicked(&mut self) -> u64 {
        core::mem::take(&mut self.chipset.kicked)
    }

    /// The vCPUs a device interrupt reached since the last call (a bit each): an IOAPIC message
    /// accepted by their local APICs, or the 8259A's INTR through LINT0. With vCPUs on several
    /// host CPUs the run loop kicks those in guest mode elsewhere and wakes the halted ones
    /// (`RunLoop::place_raised`), as it does for IPIs ([`Platform::take_kicked`]).
    pub fn take_raised(&mut self) -> u64 {
        core::mem::take(&mut self.chipset.lapics.1)
    }

    /// The local APIC's task-priority register (CR8 is its bits 7:4, SDM 10.8.6.1).
    pub fn tpr(&self, cpu: usize) -> u8 {
        self.lapic(cpu).tpr()
    }

    pub fn set_tpr(&mut self, cpu: usize, tpr: u8) {
        self.lapic_mut(cpu).set_tpr(tpr);
    }

    /// The local APIC's highest pending IRR vector, whether PPR lets it through or not.
    pub fn highest_irr(&self, cpu: usize) -> Option<u8> {
        self.lapic(cpu).highest_irr()
    }

    /// IA32_TSC_DEADLINE as the guest reads it (0 outside TSC-deadline mode).
    pub fn tsc_deadline(&self, cpu: usize) -> u64 {
        self.lapic(cpu).tsc_deadline()
    }

    /// A guest write of IA32_TSC_DEADLINE at time `now` (the MSR exit handler calls this).
    pub fn write_tsc_deadline(&mut self, cpu: usize, value: u64, now: u64) {
        self.lapic_mut(cpu).write_tsc_deadline(value, now);
        self.refresh();
    }

    /// [`Platform::write_tsc_deadline`] of a write that fires nothing
    /// (`Lapic::deadline_write_is_quiet`: the timer moved or disarmed, none of its deadlines
    /// passed): true, and only the timer's deadline changed (the platform's next deadline with
    /// it). False, with nothing done, for a write that fires the timer.
    pub fn move_tsc_deadline(&mut self, cpu: usize, value: u64, now: u64) -> bool {
        if !self.lapic_mut(cpu).move_tsc_deadline(value, now) {
            return false;
        }
        self.refresh();
        true
    }

    /// IA32_APIC_BASE as the guest reads it.
    pub fn apic_base(&self, cpu: usize) -> u64 {
        self.lapic(cpu).apic_base()
    }

    /// A guest write of IA32_APIC_BASE's EN and EXTD bits (`Lapic::write_apic_base`).
    pub fn set_apic_base(&mut self, cpu: usize, value: u64) -> Result<(), lapic::GpFault> {
        let r = self.lapic_mut(cpu).write_apic_base(value);
        self.refresh();
        r
    }

    /// RDMSR of an x2APIC register (`Lapic::x2apic_read`).
    pub fn x2apic_read(&mut self, cpu: usize, msr: u32, now: u64) -> Result<u64, lapic::GpFault> {
        self.advance(now);
        let r = self.lapic_mut(cpu).x2apic_read(msr, now);
        self.refresh();
        r
    }

    /// WRMSR of an x2APIC register; a level-triggered EOI goes on to the IOAPIC, an ICR write
    /// to the vCPUs it names.
    pub fn x2apic_write(
        &mut self,
        cpu: usize,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<(), lapic::GpFault> {
        self.advance(now);
        let cpu = if cpu < self.cpus() { cpu } else { 0 };
        let c = &mut self.chipset;
        let r = c.lapics.0[cpu].x2apic_write(msr, value, now);
        if let Ok(Some(vector)) = r {
            c.ioapic.eoi(vector, &mut c.lapics);
        }
        c.route_ipis(cpu);
        self.refresh();
        r.map(|_| ())
    }

    /// Sets the guest's wall clock (the RTC) to `unix_seconds` at guest TSC `now`.
    pub fn set_wall_clock(&mut self, unix_seconds: u64, now: u64) {
        self.with_device(now, |rtc: &mut Rtc, _| {
            rtc.set_wall_clock(unix_seconds, now)
        });
    }

    /// True while the guest has NMIs masked through bit 7 of port 0x70.
    pub fn nmi_masked(&self) -> bool {
        self.device::<Rtc>().is_some_and(|rtc| rtc.nmi_masked())
    }

    /// The status the guest wrote to the debug-exit port, once it has.
    pub fn exit_status(&self) -> Option<u32> {
        self.exit_status
    }

    pub fn console(&mut self) -> &mut ConsoleBuffer {
        &mut self.console
    }

    /// The console, to read its counts.
    pub fn console_ref(&self) -> &ConsoleBuffer {
        &self.console
    }

    pub fn stats(&self) -> PlatformStats {
        let timer = self.chipset.lapics.0.iter().map(|l| l.timer_stats()).fold(
            lapic::TimerStats::default(),
            |a, t| lapic::TimerStats {
                fired: a.fired + t.fired,
                coalesced: a.coalesced + t.coalesced,
            },
        );
        PlatformStats {
            lapic_timer: LineStats {
                raised: timer.fired,
                coalesced: timer.coalesced,
                masked: 0,
            },
            ..self.chipset.stats
        }
    }

    fn takes_wide(&self, r: Responder) -> bool {
        match r {
            Responder::Device(DeviceId(i)) => self.devices.get(i).is_some_and(|d| d.wide_ports()),
            _ => false,
        }
    }

    #[inline]
    fn port_read(&mut self, r: Responder, port: u16, size: u8, now: u64) -> u32 {
        match r {
            // A read may acknowledge (poll mode, OCW3): it counts as a change.
            Responder::Pic | Responder::Elcr => {
                self.access_changed = true;
                u32::from(self.chipset.pic.read(port))
            }
            Responder::Device(id) => self
                .call_watched(id, now, |dev, cx| dev.io_read(port, size, cx))
                .unwrap_or(u32::MAX),
            _ => u32::MAX,
        }
    }

    #[inline]
    fn port_write(&mut self, r: Responder, port: u16, size: u8, value: u32, now: u64) {
        match r {
            Responder::Pic | Responder::Elcr => {
                self.access_changed = true;
                self.chipset.pic.write(port, value as u8)
            }
            Responder::Device(id) => {
                self.call_watched(id, now, |dev, cx| dev.io_write(port, size, value, cx));
            }
            Responder::Lapic | Responder::Ioapic => {}
        }
    }

    /// [`Platform::call`] for a port access, noting in `access_changed` whether the device
    /// reached beyond its registers ([`DeviceContext::reached_out`]) or moved its timer.
    #[inline]
    fn call_watched<R>(
        &mut self,
        id: DeviceId,
        now: u64,
        f: impl FnOnce(&mut dyn Device, &mut DeviceContext<'_>) -> R,
    ) -> Option<R> {
        // `call` takes the device's deadline again after the access.
        let before = *self.deadlines.get(id.0)?;
        let (r, reached_out) = self.call(id, now, |dev, cx| {
            let r = f(dev, cx);
            (r, cx.reached_out())
        })?;
        if reached_out || self.deadlines.get(id.0).copied().flatten() != before {
            self.access_changed = true;
        }
        Some(r)
    }
}

impl Platform {
    /// [`Platform::advance`] when a timer is due by `now`: its test inlined where a port access
    /// begins, the firing called only then.
    #[inline(always)]
    fn advance_if_due(&mut self, now: u64) {
        if self.next.is_some_and(|d| d <= now) {
            self.advance(now);
        }
    }
}

/// The access size in bytes: 1, 2 or 4 (anything else is taken as 4).
#[inline]
fn access_size(size: u8) -> u8 {
    match size {
        1 | 2 => size,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::clock::{ClockRate, LAPIC_TIMER_HZ, PIT_HZ};

    const TSC_HZ: u64 = 2_000_000_000;

    #[test]
    fn platform_can_move_between_cpus() {
        fn assert_send<T: Send>() {}
        assert_send::<Platform>();
    }

    fn saved(p: &Platform) -> Vec<u8> {
        let mut w = crate::state::Writer::new();
        p.save(&mut w);
        w.into_bytes()
    }

    /// Every byte access to every port a device claims, made without the context
    /// (`io_quiet`) on one PC and the ordinary way on another in the same state: where the
    /// device makes it quietly, both read the same byte and end in the same state with the
    /// same deadline and nothing changed beyond the device (`take_ports_quiet`); where it
    /// does not, nothing is done. From a fresh PC, the UART's divisor latch open, the UART's
    /// line raised (OUT2 and THRE enabled), the PIT counting, the UART in loopback with its
    /// receiver overrun, and THRE's interrupt acknowledged. The scratch register, port 0x80, the
    /// CMOS index, the UART's reads that change nothing (LSR, IIR, MSR, an empty RBR) and a byte
    /// it sends that leaves its line as it is take it, the console written as the ordinary way
    /// writes it; a byte that raises THRE's interrupt or goes round in loopback, a read that
    /// clears something (IIR's THRE, LSR's errors, a received byte), the PIT and the chipset's
    /// ports do not; nor does any access while a timer is due or after a change the run loop
    /// has not taken yet.
    #[test]
    fn quiet_port_accesses_end_as_the_ordinary_ones() {
        let setups: [fn(&mut Platform); 6] = [
            |_| {},
            |p| {
                p.io_write(0x3fb, 1, 0x80, 0);
            },
            |p| {
                p.io_write(0x3fc, 1, 0x08, 0);
                p.io_write(0x3f9, 1, 0x02, 0);
            },
            |p| {
                p.io_write(0x43, 1, 0x34, 0);
                p.io_write(0x40, 1, 0x00, 0);
                p.io_write(0x40, 1, 0x10, 0);
            },
            |p| {
                // Loopback, no FIFO: a second byte overruns the first (LSR's OE).
                p.io_write(0x3fc, 1, 0x10, 0);
                p.io_write(0x3f8, 1, 0x41, 0);
                p.io_write(0x3f8, 1, 0x42, 0);
            },
            |p| {
                // THRE's interrupt on, acknowledged by reading IIR: the line down until the
                // next byte sent.
                p.io_write(0x3fc, 1, 0x08, 0);
                p.io_write(0x3f9, 1, 0x02, 0);
                p.io_read(0x3fa, 1, 0);
            },
        ];
        let fresh = |setup: fn(&mut Platform)| {
            let mut p = Platform::new(TSC_HZ);
            setup(&mut p);
            p.take_ports_quiet();
            // The quiet way tried whatever the set-up's last access was (`loud` is only a hint
            // of whether to try it; tested at the end).
            p.loud = false;
            p
        };
        let ports: Vec<u16> = fresh(|_| {})
            .port_bus()
            .mappings()
            .iter()
            .flat_map(|m| m.start as u16..=(m.start + m.len - 1) as u16)
            .collect();
        let mut quiet = Vec::new();
        for (n, &setup) in setups.iter().enumerate() {
            for &port in &ports {
                for write in [None, Some(0x00), Some(0x5a), Some(0x83), Some(0xff)] {
                    let mut a = fresh(setup);
                    let mut b = fresh(setup);
                    let before = saved(&a);
                    let Some(got) = a.io_quiet(port, 1, write, 1) else {
                        assert_eq!(saved(&a), before, "{port:#x} {write:?}: nothing done");
                        continue;
                    };
                    let want = match write {
                        Some(v) => {
                            assert!(b.io_write(port, 1, u32::from(v), 1));
                            0
                        }
                        None => b.io_read(port, 1, 1).unwrap(),
                    };
                    let at = alloc::format!("setup {n}, port {port:#x}, {write:?}");
                    assert_eq!(u32::from(got), want, "{at}");
                    assert_eq!(saved(&a), saved(&b), "{at}: device state");
                    assert_eq!(
                        a.console_ref().bytes_written(),
                        b.console_ref().bytes_written(),
                        "{at}: the console"
                    );
                    assert_eq!(a.take_console_written(), b.take_console_written(), "{at}");
                    assert_eq!(a.next_deadline(), b.next_deadline(), "{at}");
                    assert!(b.take_ports_quiet(), "{at}: the ordinary way is quiet too");
                    assert!(a.take_ports_quiet(), "{at}");
                    quiet.push((n, port, write.is_some()));
                }
            }
        }
        for (port, write) in [(0x3ff, false), (0x3ff, true), (0x80, true), (0x70, true)] {
            assert!(quiet.contains(&(0, port, write)), "{port:#x}");
        }
        // The divisor latch, and the scratch register with the UART's line up.
        assert!(quiet.contains(&(1, 0x3f8, true)));
        assert!(quiet.contains(&(2, 0x3ff, true)));
        // The reads that change nothing: RBR with nothing received, IIR, LSR and MSR.
        for port in [0x3f8, 0x3fa, 0x3fd, 0x3fe] {
            assert!(quiet.contains(&(0, port, false)), "{port:#x}");
        }
        // The debug console: a byte written, the port's answer read.
        assert!(quiet.contains(&(0, 0xe9, true)));
        assert!(quiet.contains(&(0, 0xe9, false)));
        // A byte sent with THRE's interrupt off, or with the line up already.
        assert!(quiet.contains(&(0, 0x3f8, true)));
        assert!(quiet.contains(&(2, 0x3f8, true)));
        // IER's write (THRE), and the writes of IIR (FCR), LSR and MSR.
        for port in [0x3f9, 0x3fa, 0x3fd, 0x3fe] {
            assert!(!quiet.contains(&(0, port, true)), "{port:#x}");
        }
        // IIR acknowledging THRE (the line up, setup 2); a received byte, LSR's overrun and a
        // byte sent in loopback (setup 4); a byte sent that raises THRE's interrupt (setup 5).
        assert!(!quiet.contains(&(2, 0x3fa, false)));
        assert!(!quiet.contains(&(4, 0x3f8, false)));
        assert!(!quiet.contains(&(4, 0x3fd, false)));
        assert!(!quiet.contains(&(4, 0x3f8, true)));
        assert!(!quiet.contains(&(5, 0x3f8, true)));
        for port in [0x40, 0x43, 0x20, 0x21, 0x71, 0xf4] {
            assert!(
                !quiet.iter().any(|&(n, p, _)| n == 0 && p == port),
                "{port:#x}"
            );
        }
        // A timer due: fired first the ordinary way. A change not yet taken: kept for the run
        // loop.
        let mut p = fresh(setups[3]);
        let due = p.next_deadline().unwrap();
        assert!(p.io_quiet(0x3ff, 1, Some(1), due - 1).is_some());
        assert_eq!(p.io_quiet(0x3ff, 1, Some(1), due), None);
        p.io_read(0x21, 1, 0);
        assert_eq!(p.io_quiet(0x3ff, 1, Some(1), 0), None);
        assert!(!p.take_ports_quiet());
        // Right after an access that reached further (the 8259A's read above) the quiet way is
        // not tried (`Platform::loud`); once an access ends quiet the ordinary way, it is again.
        assert_eq!(p.io_quiet(0x3ff, 1, Some(2), 0), None);
        assert!(p.io_write(0x3ff, 1, 3, 0));
        assert!(p.take_ports_quiet());
        assert!(p.io_quiet(0x3ff, 1, Some(4), 0).is_some());
        assert_eq!(p.io_read(0x3ff, 1, 0), Some(4), "the quiet write made");
        // A console byte changes nothing the quiet way looks at, and its writer's line-status
        // read next is quiet too.
        p.io_write(0x3f8, 1, u32::from(b'k'), 0);
        assert!(p.take_ports_quiet());
        assert!(p.take_console_written());
        assert_eq!(
            p.io_quiet(0x3fd, 1, None, 0),
            Some(0x60),
            "THRE and TEMT, nothing received"
        );
        // Wide accesses go the ordinary way.
        assert_eq!(fresh(|_| {}).io_quiet(0x3fe, 2, None, 0), None);
    }

    /// A two-vCPU PC with its PIT counting, vCPU 1's LAPIC timer periodic, an IOAPIC entry
    /// programmed and a CMOS byte written, moved into a fresh PC: the same state, the same
    /// deadlines, the same interrupts from then on; state from another PC is refused whole.
    #[test]
    fn the_whole_platform_moves_into_a_fresh_one() {
        use crate::devices::lapic::LAPIC_BASE;
        let board = Board::pc(16 << 20, 2);
        let mut p = Platform::for_board(board.clone(), TSC_HZ);
        for (port, v) in [
            (0x43, 0x34),
            (0x40, 0xe8),
            (0x40, 0x03),
            (0x70, 0x30),
            (0x71, 0x5a),
        ] {
            p.io_write(port, 1, v, 0);
        }
        p.mmio_write(1, LAPIC_BASE + 0xf0, 4, 0x1ff, 10);
        p.mmio_write(1, LAPIC_BASE + 0x3e0, 4, 0xb, 10);
        p.mmio_write(1, LAPIC_BASE + 0x320, 4, 0x2_0040, 10);
        p.mmio_write(1, LAPIC_BASE + 0x380, 4, 50_000, 10);
        p.advance(1_000_000);
        let state = saved(&p);
        let fresh = Platform::for_board(board.clone(), TSC_HZ);
        assert_ne!(saved(&fresh), state);
        let mut q = Platform::for_board(board.clone(), TSC_HZ);
        q.restore(&mut crate::state::Reader::new(&state))
            .expect("its own state");
        assert_eq!(saved(&q), state);
        assert_eq!(q.next_deadline(), p.next_deadline());
        assert_eq!(
            q.pending_interrupt(1),
            Some(0x40),
            "the timer's interrupt came along"
        );
        for t in [3_000_000, 7_000_000, 20_000_000] {
            p.advance(t);
            q.advance(t);
            for cpu in 0..2 {
                assert_eq!(p.pending_interrupt(cpu), q.pending_interrupt(cpu), "{t}");
            }
            assert_eq!(p.next_deadline(), q.next_deadline());
        }
        let mut other = Platform::for_board(board.clone(), TSC_HZ / 2);
        let before = saved(&other);
        assert!(other
            .restore(&mut crate::state::Reader::new(&state))
            .is_err());
        assert_eq!(saved(&other), before, "refused and unchanged");
        let mut one_cpu = Platform::for_board(Board::pc(16 << 20, 1), TSC_HZ);
        assert_eq!(
            one_cpu.restore(&mut crate::state::Reader::new(&state)),
            Err(crate::state::StateError::Invalid(
                "a different number of local APICs"
            ))
        );
        let mut q = Platform::for_board(board, TSC_HZ);
        assert!(q
            .restore(&mut crate::state::Reader::new(&state[..state.len() - 3]))
            .is_err());
    }

    #[test]
    fn builtin_map_has_the_standard_ports() {
        let p = Platform::new(TSC_HZ);
        let names: Vec<_> = p.port_bus().mappings().iter().map(|m| m.name).collect();
        assert!(names.contains(&"uart16550"));
        assert!(p.port_bus().find(0x3ff).is_some());
        assert!(p.port_bus().find(0xf4).is_some());
        assert!(p.port_bus().find(0xe9).is_some());
        assert!(p.port_bus().find(0x80).is_some());
    }

    #[test]
    fn unclaimed_ports_are_counted() {
        let mut p = Platform::new(TSC_HZ);
        assert_eq!(p.io_read(0x1234, 1, 0), None);
        assert!(!p.io_write(0x1234, 2, 0, 0));
        assert_eq!(p.mmio_read(0, 0x1000, 4, 0), None);
        assert!(!p.mmio_write(0, 0x1000, 4, 0, 0));
        let s = p.stats();
        assert_eq!(
            (s.unclaimed_io_reads, s.unclaimed_io_writes),
            (1, 1),
            "{s:?}"
        );
        assert_eq!((s.unclaimed_mmio_reads, s.unclaimed_mmio_writes), (1, 1));
    }

    #[test]
    fn serial_and_debugcon_reach_the_console() {
        let mut p = Platform::new(TSC_HZ);
        for b in b"abc\n" {
            assert!(p.io_write(port::COM1, 1, u32::from(*b), 0));
        }
        p.io_write(port::DEBUGCON, 1, u32::from(b'z'), 0);
        assert_eq!(p.console().take_line().as_deref(), Some("abc"));
        assert_eq!(p.console().take_partial().as_deref(), Some("z"));
    }

    #[test]
    fn debug_exit_reports_status() {
        let mut p = Platform::new(TSC_HZ);
        assert_eq!(p.exit_status(), None);
        p.io_write(port::DEBUG_EXIT, 4, 0x10, 0);
        assert_eq!(p.exit_status(), Some(0x21));
    }

    #[test]
    fn wide_access_to_byte_devices_is_split() {
        let mut p = Platform::new(TSC_HZ);
        // LCR (0x3fb) = 0x03, MCR (0x3fc) = 0x0b in one 16-bit OUT.
        p.io_write(0x3fb, 2, 0x0b03, 0);
        assert_eq!(p.io_read(0x3fb, 1, 0), Some(0x03));
        assert_eq!(p.io_read(0x3fc, 1, 0), Some(0x0b));
        assert_eq!(p.io_read(0x3fb, 2, 0), Some(0x0b03));
        // A word read across the end of COM1: the unclaimed byte reads 0xff.
        p.io_write(0x3ff, 1, 0x42, 0);
        assert_eq!(p.io_read(0x3ff, 2, 0), Some(0xff42));
        // Port 0x80 reads back what was written.
        p.io_write(0x80, 1, 0x99, 0);
        assert_eq!(p.io_read(0x80, 1, 0), Some(0x99));
    }

    #[test]
    fn serial_input_raises_irq4() {
        let mut p = Platform::new(TSC_HZ);
        p.io_write(port::COM1 + 4, 1, 0x08, 0); // OUT2
        p.io_write(port::COM1 + 1, 1, 0x01, 0); // RX data interrupt
        assert!(p.push_serial_input(b'q', 0));
        assert_eq!(p.stats().lines[4].raised, 1);
        assert_eq!(p.io_read(port::COM1, 1, 0), Some(u32::from(b'q')));
    }

    /// Linux-style 8259A setup: vectors 0x30/0x38, cascade, everything masked but `unmask`.
    fn init_pic(p: &mut Platform, master_mask: u8) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, master_mask),
            (0xa1, 0xff),
        ] {
            assert!(p.io_write(port, 1, u32::from(v), 0));
        }
    }

    /// Runs the guest's side of interrupt handling from TSC `from` to `to` in steps of `step`:
    /// advance, inject everything pending, EOI the way `eoi` says. Returns the vectors injected.
    fn run(
        p: &mut Platform,
        from: u64,
        to: u64,
        step: u64,
        mut eoi: impl FnMut(&mut Platform, u8, u64),
    ) -> Vec<u8> {
        let mut got = Vec::new();
        let mut now = from;
        while now <= to {
            p.advance(now);
            while let Some(v) = p.pending_interrupt(0) {
                p.acknowledge(0, v);
                got.push(v);
                eoi(p, v, now);
            }
            now += step;
        }
        got
    }

    /// Channel 0 in mode 2 (rate generator) with `divisor`, programmed at TSC 0. (A 16-bit OUT to
    /// 0x40 would write channel 1's port too, as on an ISA bus.)
    fn pit_periodic(p: &mut Platform, divisor: u16) {
        let [lo, hi] = divisor.to_le_bytes();
        p.io_write(0x43, 1, 0x34, 0);
        p.io_write(0x40, 1, u32::from(lo), 0);
        p.io_write(0x40, 1, u32::from(hi), 0);
    }

    fn pic_eoi(p: &mut Platform, _v: u8, now: u64) {
        p.io_write(0x20, 1, 0x20, now);
    }

    #[test]
    fn pit_at_100hz_gives_100_interrupts_a_second() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xfa);
        pit_periodic(&mut p, (PIT_HZ / 100) as u16);
        let got = run(&mut p, 0, TSC_HZ, TSC_HZ / 1000, pic_eoi);
        assert_eq!(got.len(), 100);
        assert!(got.iter().all(|&v| v == 0x30));
        let s = p.stats();
        assert_eq!((s.lines[0].raised, s.lines[0].coalesced), (100, 0));
        assert_eq!(s.acknowledged, 100);
    }

    #[test]
    fn pit_period_is_exact_against_the_tsc() {
        // Linux's LATCH for HZ=100 is 11932: the 100th tick comes 20 us after one second.
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xfa);
        pit_periodic(&mut p, 11932);
        assert_eq!(run(&mut p, 0, TSC_HZ, TSC_HZ / 1000, pic_eoi).len(), 99);
        let tenth = TSC_HZ / 10_000;
        assert_eq!(
            run(&mut p, TSC_HZ + tenth, TSC_HZ + tenth, 1, pic_eoi).len(),
            1
        );
        assert_eq!(p.next_deadline(), Some(PIT.tsc_at(101 * 11932)));
    }

    const PIT: ClockRate = ClockRate::new(PIT_HZ, TSC_HZ);

    #[test]
    fn unacknowledged_ticks_are_coalesced() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xfa);
        pit_periodic(&mut p, 11931);
        // The guest takes the first interrupt but never sends EOI: later ticks stay in IRR.
        let got = run(&mut p, 0, TSC_HZ, TSC_HZ / 1000, |_, _, _| {});
        assert_eq!(got, [0x30]);
        let s = p.stats().lines[0];
        assert_eq!(s.raised, 100);
        assert_eq!(
            s.coalesced, 98,
            "one delivered, one waiting in IRR, 98 merged"
        );
        // A jump of a whole second: one edge, the rest counted as coalesced.
        p.io_write(0x20, 1, 0x20, TSC_HZ);
        p.acknowledge(0, 0x30);
        p.io_write(0x20, 1, 0x20, TSC_HZ);
        p.advance(2 * TSC_HZ);
        let s = p.stats().lines[0];
        assert_eq!((s.raised, s.coalesced), (101, 98 + 99));
    }

    #[test]
    fn masked_ticks_are_counted() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xff);
        pit_periodic(&mut p, 11931);
        assert!(run(&mut p, 0, TSC_HZ / 10, TSC_HZ / 1000, pic_eoi).is_empty());
        assert_eq!(p.stats().lines[0].masked, 10);
    }

    #[test]
    fn elcr_and_pic_ports_are_on_the_bus() {
        let mut p = Platform::new(TSC_HZ);
        p.io_write(0x4d0, 2, 0x0c20, 0);
        assert_eq!(p.io_read(0x4d0, 1, 0), Some(0x20));
        assert_eq!(p.io_read(0x4d1, 1, 0), Some(0x0c));
        init_pic(&mut p, 0x5a);
        assert_eq!(p.io_read(0x21, 1, 0), Some(0x5a));
        assert_eq!(p.io_read(0xa1, 1, 0), Some(0xff));
    }

    const LAPIC: u64 = lapic::LAPIC_BASE;
    const IOAPIC: u64 = ioapic::IOAPIC_BASE;

    fn lapic_eoi(p: &mut Platform, _v: u8, now: u64) {
        p.mmio_write(0, LAPIC + 0xb0, 4, 0, now);
    }

    fn enable_lapic(p: &mut Platform) {
        p.mmio_write(0, LAPIC + 0xf0, 4, 0x1ff, 0);
    }

    fn ioapic_route(p: &mut Platform, pin: u64, entry: u64) {
        p.mmio_write(0, IOAPIC, 4, 0x10 + 2 * pin + 1, 0);
        p.mmio_write(0, IOAPIC + 0x10, 4, entry >> 32, 0);
        p.mmio_write(0, IOAPIC, 4, 0x10 + 2 * pin, 0);
        p.mmio_write(0, IOAPIC + 0x10, 4, entry & 0xffff_ffff, 0);
    }

    #[test]
    fn lapic_timer_at_1khz_gives_1000_interrupts_a_second() {
        let mut p = Platform::new(TSC_HZ);
        enable_lapic(&mut p);
        let ticks_per_ms = LAPIC_TIMER_HZ / 16 / 1000;
        p.mmio_write(0, LAPIC + 0x3e0, 4, 0x3, 0); // divide by 16
        p.mmio_write(0, LAPIC + 0x320, 4, 0x2_00ec, 0); // periodic, vector 0xec
        p.mmio_write(0, LAPIC + 0x380, 4, ticks_per_ms, 0);
        assert_eq!(p.next_deadline(), Some(TSC_HZ / 1000));
        let got = run(&mut p, 0, TSC_HZ, TSC_HZ / 4000, lapic_eoi);
        assert_eq!(got.len(), 1000);
        assert!(got.iter().all(|&v| v == 0xec));
        let s = p.stats();
        assert_eq!((s.lapic_timer.raised, s.lapic_timer.coalesced), (1000, 0));
        // The current count runs down between ticks.
        let half = p.mmio_read(0, LAPIC + 0x390, 4, TSC_HZ + TSC_HZ / 2000);
        assert_eq!(half, Some(ticks_per_ms / 2));
    }

    #[test]
    fn tsc_deadline_through_the_platform() {
        let mut p = Platform::new(TSC_HZ);
        enable_lapic(&mut p);
        p.mmio_write(0, LAPIC + 0x320, 4, 0x4_00d0, 0);
        p.write_tsc_deadline(0, 5_000, 0);
        assert_eq!(p.tsc_deadline(0), 5_000);
        assert_eq!(p.next_deadline(), Some(5_000));
        assert_eq!(run(&mut p, 0, 10_000, 1_000, lapic_eoi), [0xd0]);
        assert_eq!(p.tsc_deadline(0), 0);
    }

    #[test]
    fn pit_through_the_ioapic_on_pin_2() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xff); // the guest masks the 8259A and uses the IOAPIC
        enable_lapic(&mut p);
        ioapic_route(&mut p, 2, 0x41);
        pit_periodic(&mut p, (PIT_HZ / 100) as u16);
        let got = run(&mut p, 0, TSC_HZ, TSC_HZ / 1000, lapic_eoi);
        assert_eq!(got.len(), 100);
        assert!(got.iter().all(|&v| v == 0x41));
        let s = p.stats().lines[0];
        assert_eq!((s.raised, s.coalesced, s.masked), (100, 0, 0));
    }

    #[test]
    fn level_triggered_ioapic_line_and_eoi_broadcast() {
        let mut p = Platform::new(TSC_HZ);
        enable_lapic(&mut p);
        ioapic_route(&mut p, 4, 0x8051); // COM1, level triggered, vector 0x51
        p.io_write(port::COM1 + 4, 1, 0x08, 0); // OUT2
        p.io_write(port::COM1 + 1, 1, 0x01, 0); // RX interrupt
        p.io_write(port::COM1 + 2, 1, 0x01, 0); // FIFO on, trigger level 1
        p.push_serial_input(b'a', 0);
        p.push_serial_input(b'b', 0);
        assert_eq!(p.pending_interrupt(0), Some(0x51));
        p.acknowledge(0, 0x51);
        // The handler reads one byte and sends EOI: the line is still up, so it comes again.
        assert_eq!(p.io_read(port::COM1, 1, 0), Some(u32::from(b'a')));
        lapic_eoi(&mut p, 0x51, 0);
        assert_eq!(p.pending_interrupt(0), Some(0x51));
        p.acknowledge(0, 0x51);
        assert_eq!(p.io_read(port::COM1, 1, 0), Some(u32::from(b'b')));
        lapic_eoi(&mut p, 0x51, 0);
        assert_eq!(p.pending_interrupt(0), None);
    }

    /// With virtual-interrupt delivery the CPU moves the vector to ISR and clears it at the EOI
    /// (`set_apic_vectors` takes that in); the EOI of a level-triggered vector exits and goes on
    /// to the IOAPIC, which sends it again while the line is up.
    #[test]
    fn a_virtualized_eoi_of_a_level_vector_reaches_the_ioapic() {
        let mut p = Platform::new(TSC_HZ);
        enable_lapic(&mut p);
        ioapic_route(&mut p, 4, 0x8051); // COM1, level triggered, vector 0x51
        p.io_write(port::COM1 + 4, 1, 0x08, 0);
        p.io_write(port::COM1 + 1, 1, 0x01, 0);
        p.io_write(port::COM1 + 2, 1, 0x01, 0);
        p.push_serial_input(b'a', 0);
        p.push_serial_input(b'b', 0);
        let (irr, _, tmr, enabled, _) = p.apic_vectors(0);
        assert!(enabled && irr[2] == 1 << 0x11 && tmr[2] == 1 << 0x11);
        // Posted to the CPU at the entry.
        p.apic_vectors_posted(0);
        assert_eq!(
            p.pending_pic_interrupt(0),
            None,
            "the 8259A's line is masked"
        );
        // The CPU delivers 0x51 (VIRR to VISR), the handler reads a byte, EOI virtualization
        // clears VISR and exits for the level-triggered vector.
        p.set_apic_vectors(0, &[0; 8], &[0, 0, 1 << 0x11, 0, 0, 0, 0, 0]);
        assert_eq!(p.mmio_read(0, LAPIC + 0xa0, 4, 0), Some(0x50), "PPR");
        assert_eq!(p.io_read(port::COM1, 1, 0), Some(u32::from(b'a')));
        p.set_apic_vectors(0, &[0; 8], &[0; 8]);
        assert_eq!(
            p.pending_interrupt(0),
            None,
            "remote IRR holds it until the EOI"
        );
        p.virtualized_eoi(0, 0x51);
        assert_eq!(p.pending_interrupt(0), Some(0x51), "the line is still up");
    }

    #[test]
    fn lint0_gates_the_8259a() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xfa);
        pit_periodic(&mut p, 100);
        p.advance(PIT.tsc_at(100));
        assert_eq!(p.pending_interrupt(0), Some(0x30), "virtual wire at reset");
        enable_lapic(&mut p);
        p.mmio_write(0, LAPIC + 0x350, 4, 0x1_0700, 0); // mask LINT0
        assert_eq!(p.pending_interrupt(0), None);
        // A globally disabled local APIC passes the 8259A straight through.
        assert_eq!(p.set_apic_base(0, lapic::LAPIC_BASE), Ok(()));
        assert_eq!(p.pending_interrupt(0), Some(0x30));
        assert_eq!(p.apic_base(0) & lapic::APIC_BASE_ENABLE, 0);
    }

    /// A PC with `cpus` vCPUs, every APIC software-enabled.
    fn smp(cpus: u8) -> Platform {
        let mut p = Platform::for_board(Board::pc(0, cpus), TSC_HZ);
        for c in 0..usize::from(cpus) {
            assert!(p.mmio_write(c, LAPIC + 0xf0, 4, 0x1ff, 0));
        }
        p
    }

    fn icr(p: &mut Platform, from: usize, dest: u8, low: u32) {
        p.mmio_write(from, LAPIC + 0x310, 4, u64::from(dest) << 24, 0);
        p.mmio_write(from, LAPIC + 0x300, 4, u64::from(low), 0);
    }

    #[test]
    fn each_vcpu_has_its_own_apic_and_ipis_reach_the_ones_they_name() {
        let mut p = smp(4);
        for c in 0..4 {
            assert_eq!(p.mmio_read(c, LAPIC + 0x20, 4, 0), Some((c as u64) << 24));
        }
        assert_ne!(p.apic_base(0) & lapic::APIC_BASE_BSP, 0);
        assert_eq!(
            p.apic_base(1) & lapic::APIC_BASE_BSP,
            0,
            "only vCPU 0 is the BSP"
        );
        // Fixed, physical destination 2, from vCPU 0.
        icr(&mut p, 0, 2, 0x41);
        assert_eq!(
            (0..4).map(|c| p.pending_interrupt(c)).collect::<Vec<_>>(),
            [None, None, Some(0x41), None]
        );
        assert_eq!(p.take_kicked(), 0b100);
        p.acknowledge(2, 0x41);
        // Its EOI, or 0x41 in service would hold back 0x42 (same priority class).
        p.mmio_write(2, LAPIC + 0xb0, 4, 0, 0);
        // All excluding self (shorthand 3), from vCPU 1.
        icr(&mut p, 1, 0, 3 << 18 | 0x42);
        assert_eq!(
            (0..4).map(|c| p.pending_interrupt(c)).collect::<Vec<_>>(),
            [Some(0x42), None, Some(0x42), Some(0x42)]
        );
        // NMI to 3; INIT then STARTUP to 1, in order; an INIT de-assert does nothing.
        icr(&mut p, 0, 3, 4 << 8);
        assert!(p.nmi_pending(3) && !p.nmi_pending(0));
        icr(&mut p, 0, 1, 5 << 8 | 1 << 14);
        icr(&mut p, 0, 1, 5 << 8 | 1 << 15);
        icr(&mut p, 0, 1, 6 << 8 | 1 << 14 | 0x9a);
        assert_eq!(p.take_start_signal(), Some((1, StartSignal::Init)));
        assert_eq!(p.take_start_signal(), Some((1, StartSignal::Startup(0x9a))));
        assert_eq!(p.take_start_signal(), None);
    }

    #[test]
    fn the_ioapic_sends_to_the_apic_its_entry_names() {
        let mut p = smp(2);
        let ioapic = crate::devices::ioapic::IOAPIC_BASE;
        // Pin 1 (IRQ1, the keyboard's): vector 0x51 to APIC 1, edge, unmasked.
        for (reg, v) in [(0x13u64, 1u64 << 24), (0x12, 0x51)] {
            p.mmio_write(0, ioapic, 4, reg, 0);
            p.mmio_write(0, ioapic + 0x10, 4, v, 0);
        }
        p.chipset.set_line(1, true);
        assert_eq!(
            (p.pending_interrupt(0), p.pending_interrupt(1)),
            (None, Some(0x51))
        );
    }

    #[test]
    fn lapic_vectors_outrank_the_8259a() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xfa);
        enable_lapic(&mut p);
        p.mmio_write(0, LAPIC + 0x350, 4, 0x700, 0); // LINT0 ExtINT
        pit_periodic(&mut p, 100);
        p.mmio_write(0, LAPIC + 0x300, 4, 0x4_0060, 0); // self-IPI 0x60
        p.advance(PIT.tsc_at(100));
        assert_eq!(p.pending_interrupt(0), Some(0x60));
        p.acknowledge(0, 0x30);
        assert_eq!(p.stats().stale_acks, 1, "not the vector on offer");
        p.acknowledge(0, 0x60);
        assert_eq!(p.pending_interrupt(0), Some(0x30), "ExtINT ignores PPR");
        p.acknowledge(0, 0x30);
        assert_eq!(p.pending_interrupt(0), None);
        assert_eq!(p.stats().acknowledged, 2);
    }

    #[test]
    fn rtc_periodic_interrupt_through_the_slave_pic() {
        let mut p = Platform::new(TSC_HZ);
        init_pic(&mut p, 0xfb);
        p.io_write(0xa1, 1, 0xfe, 0); // unmask IRQ8
        p.io_write(0x70, 1, 0x0a, 0);
        p.io_write(0x71, 1, 0x2f, 0); // 2 Hz
        p.io_write(0x70, 1, 0x0b, 0);
        p.io_write(0x71, 1, 0x42, 0); // PIE, 24 h
                                      // The handler reads register C, then EOIs slave and master.
        let got = run(&mut p, 0, TSC_HZ, TSC_HZ / 100, |p, _, now| {
            p.io_write(0x70, 1, 0x0c, now);
            p.io_read(0x71, 1, now);
            p.io_write(0xa0, 1, 0x20, now);
            p.io_write(0x20, 1, 0x20, now);
        });
        assert_eq!(got, [0x38, 0x38]);
        assert_eq!(p.stats().lines[8].raised, 2);
    }

    #[test]
    fn wall_clock_and_nmi_mask() {
        let mut p = Platform::new(TSC_HZ);
        p.set_wall_clock(1_709_210_096, 0); // 2024-02-29 12:34:56
        p.io_write(0x70, 1, 0x80, 0);
        assert!(p.nmi_masked());
        assert_eq!(p.io_read(0x71, 1, 3 * TSC_HZ), Some(0x59));
        p.io_write(0x70, 1, 0x09, 0);
        assert!(!p.nmi_masked());
        assert_eq!(p.io_read(0x71, 1, 0), Some(0x24));
    }

    #[test]
    fn chipset_mmio_is_claimed() {
        let p = Platform::new(TSC_HZ);
        assert!(p.claims_mmio(0xfee0_0030));
        assert!(p.claims_mmio(0xfec0_0010));
        assert!(!p.claims_mmio(0xfed0_0000));
    }

    /// The ports and addresses the ACPI tables give are the ones the models answer at.
    #[test]
    fn acpi_tables_and_devices_agree() {
        let board = Board::pc(64 << 20, 1);
        let mut ram = alloc::vec![0u8; 1 << 20];
        crate::acpi::install(&mut ram, &board).unwrap();
        let l = crate::acpi::layout(&board);
        let fadt = &ram[l.fadt as usize..];
        let word = |t: &[u8], at: usize| u32::from_le_bytes(t[at..at + 4].try_into().unwrap());
        let (evt, cnt, tmr) = (
            word(fadt, 56) as u16,
            word(fadt, 64) as u16,
            word(fadt, 76) as u16,
        );
        let sci = u16::from_le_bytes([fadt[46], fadt[47]]);
        let mut p = Platform::for_board(board, TSC_HZ);
        // The PM timer at PM_TMR_BLK runs at 3.579545 MHz; a dword read is one value.
        assert_eq!(p.io_read(tmr, 4, TSC_HZ), Some(3_579_545));
        assert_eq!(p.io_read(cnt, 2, 0), Some(1), "SCI_EN");
        // TMR_EN, then the timer's bit 31 flips: the SCI line of SCI_INT rises.
        p.io_write(evt + 2, 2, 1, 0);
        let flip = ClockRate::new(3_579_545, TSC_HZ).tsc_at(1 << 31);
        p.advance(flip);
        assert_eq!(p.io_read(evt, 2, flip), Some(1), "TMR_STS");
        assert_eq!(p.stats().lines[usize::from(sci)].raised, 1);
        // The MADT's IOAPIC ID and address are the model's.
        let madt = &ram[l.madt as usize..];
        let io = 44 + 8;
        assert_eq!(madt[io], 1, "IOAPIC entry");
        let base = u64::from(word(madt, io + 4));
        p.mmio_write(0, base, 4, 0, 0);
        assert_eq!(
            p.mmio_read(0, base + 0x10, 4, 0),
            Some(u64::from(madt[io + 2]) << 24)
        );
        assert_eq!(u64::from(word(madt, 36)), lapic::LAPIC_BASE);
        assert!(p.claims_mmio(u64::from(word(madt, 36))));
        // Soft off through PM1a_CNT, as Linux writes it: a word write.
        assert_eq!(p.take_power_event(), None);
        p.io_write(cnt, 2, 0x2000, 0); // QEMU's poweroff idiom
        assert_eq!(p.take_power_event(), Some(PowerEvent::SoftOff));
        assert_eq!(p.take_power_event(), None, "taken once");
    }

    #[test]
    fn pci_i8042_and_fw_cfg_answer_through_the_buses() {
        let mut p = Platform::for_board(Board::pc(96 << 20, 1), TSC_HZ);
        p.io_write(0xcf8, 4, 0x8000_0000, 0);
        assert_eq!(p.io_read(0xcf8, 4, 0), Some(0x8000_0000));
        assert_eq!(p.io_read(0xcfc, 4, 0), Some(0x1237_8086));
        p.io_write(0xcf8, 4, 0x8000_0800, 0); // 00:01.0
        assert_eq!(p.io_read(0xcfc, 4, 0), Some(u32::MAX));
        // i8042 self-test.
        p.io_write(0x64, 1, 0xaa, 0);
        assert_eq!(p.io_read(0x64, 1, 0).map(|s| s & 1), Some(1));
        assert_eq!(p.io_read(0x60, 1, 0), Some(0x55));
        // fw_cfg: a word write selects (it must not be split into a data write at 0x511).
        p.io_write(0x510, 2, 0x03, 0);
        let ram: Vec<u32> = (0..8).filter_map(|_| p.io_read(0x511, 1, 0)).collect();
        assert_eq!(ram, [0, 0, 0, 6, 0, 0, 0, 0], "96 MiB");
        p.io_write(0x510, 2, 0x00, 0);
        let sig: Vec<u32> = (0..4).filter_map(|_| p.io_read(0x511, 1, 0)).collect();
        assert_eq!(sig, [0x51, 0x45, 0x4d, 0x55]);
        assert_eq!(p.io_read(0x514, 4, 0), None, "no DMA port");
        // Both resets.
        p.io_write(0x64, 1, 0xfe, 0);
        assert_eq!(
            p.take_power_event(),
            Some(PowerEvent::Reset(super::super::ResetSource::I8042))
        );
        p.io_write(0xcf9, 1, 0x06, 0);
        assert_eq!(
            p.take_power_event(),
            Some(PowerEvent::Reset(super::super::ResetSource::ResetControl))
        );
    }

    #[test]
    fn a_reset_keeps_cmos_ram_and_nothing_else() {
        let mut p = Platform::for_board(Board::pc(32 << 20, 1), TSC_HZ);
        p.io_write(0x70, 1, 0x40, 0);
        p.io_write(0x71, 1, 0xa5, 0);
        p.io_write(0x70, 1, 0x0b, 0);
        p.io_write(0x71, 1, 0x06, 0); // register B: binary, 24 h
        p.io_write(0x64, 1, 0xaa, 0); // an i8042 reply waiting
        let mut q = p.after_reset();
        q.io_write(0x70, 1, 0x40, 0);
        assert_eq!(q.io_read(0x71, 1, 0), Some(0xa5), "CMOS RAM kept");
        q.io_write(0x70, 1, 0x0b, 0);
        assert_eq!(
            q.io_read(0x71, 1, 0),
            Some(0x02),
            "register B back to reset"
        );
        assert_eq!(q.io_read(0x64, 1, 0), Some(0x14), "i8042 empty");
        assert_eq!(q.board(), p.board());
        assert_eq!(q.tsc_hz(), TSC_HZ);
    }

    #[test]
    fn attach_rejects_a_clash_and_registers_nothing() {
        let mut p = Platform::new(TSC_HZ);
        let before = p.port_bus().mappings().len();
        let r = p.attach(Box::new(Port80::default()), &[(0x500, 1), (0x3f8, 1)], &[]);
        assert!(matches!(
            r,
            Err(BusError::Overlap {
                with: "uart16550",
                ..
            })
        ));
        assert_eq!(p.port_bus().mappings().len(), before);
        assert_eq!(p.io_read(0x500, 1, 0), None);
        let id = p.attach(
            Box::new(Port80::default()),
            &[(0x500, 1)],
            &[(0xd000_0000, 16)],
        );
        assert!(id.is_ok());
        assert!(p.claims_mmio(0xd000_000f));
        assert!(!p.claims_mmio(0xd000_0010));
    }
    /// The accesses after which the run loop may skip the injection check and the deadlines are
    /// exactly those that change nothing beyond their device's registers.
    #[test]
    fn port_accesses_say_whether_they_changed_anything_beyond_their_device() {
        let mut p = Platform::new(TSC_HZ);
        p.take_ports_quiet();
        // The UART's scratch register, port 0x80, an unclaimed port: nothing else changes.
        p.io_write(0x3ff, 1, 0x42, 0);
        assert_eq!(p.io_read(0x3ff, 1, 0), Some(0x42));
        p.io_write(0x80, 1, 0x99, 0);
        p.io_read(0x1234, 1, 0);
        assert!(p.take_ports_quiet());
        assert!(!p.take_console_written());
        // A byte to the console: no line, no timer, but lines to print.
        p.io_write(port::COM1, 1, u32::from(b'a'), 0);
        assert!(p.take_ports_quiet());
        assert!(p.take_console_written());
        assert!(!p.take_console_written(), "each take starts afresh");
        // The 8259A (a read may acknowledge).
        p.io_read(0x21, 1, 0);
        assert!(!p.take_ports_quiet());
        assert!(p.take_ports_quiet(), "each take starts afresh");
        // Enabling the UART's THR-empty interrupt with OUT2 raises IRQ 4: a line moved.
        p.io_write(port::COM1 + 4, 1, 0x08, 0);
        assert!(p.take_ports_quiet(), "OUT2 alone raises nothing");
        p.io_write(port::COM1 + 1, 1, 0x02, 0);
        assert!(!p.take_ports_quiet());
        // The 8259A (its reads may acknowledge) and a PIT programmed to tick (a new deadline).
        p.io_read(0x21, 1, 0);
        assert!(!p.take_ports_quiet());
        p.io_write(0x43, 1, 0x34, 0);
        p.io_write(0x40, 1, 0x00, 0);
        p.io_write(0x40, 1, 0x10, 0);
        assert!(!p.take_ports_quiet());
        assert!(p.next_deadline().is_some(), "the PIT's deadline was taken");
        // A timer that fires counts too, whoever advanced the platform.
        let due = p.next_deadline().unwrap();
        p.advance(due);
        assert!(!p.take_ports_quiet());
    }
}
