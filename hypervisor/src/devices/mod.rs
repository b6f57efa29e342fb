//! The per-guest virtual platform: the PC devices a guest finds at its I/O ports and MMIO ranges.
//!
//! Every model here is a plain state machine driven by register accesses and by the guest's
//! virtual time (`now`, in TSC ticks); none of them touches hardware, so each one is unit-tested on
//! the build host. docs/DEVICES.md describes what each model does and does not do.
//!
//! How the pieces fit:
//! - A model that sits on the bus implements [`Device`]. [`platform::Platform`] keeps the models
//!   in a list and registers each one's port ranges on a [`PortBus`] (MMIO ranges on an
//!   [`MmioBus`]), so adding a device means registering it in `Platform::new`; the exit handlers
//!   only ever call `Platform::io_read`/`io_write`/`mmio_read`/`mmio_write`.
//! - A device raises and lowers its interrupt lines through the [`DeviceContext`] it is handed on
//!   every call (`cx.raise_irq(4)`). Lines are numbered as ISA IRQs / GSIs (0-23); the platform
//!   routes them to the 8259A pair and the IOAPIC, which feeds the local APIC.
//! - The interrupt controllers (PIC pair, IOAPIC, LAPIC) are the platform's own chipset rather
//!   than bus devices: every line leads to them and they talk to each other (EOI broadcast, ExtINT).
//!   Their windows are still entries on the buses, with [`Responder`] naming them.

pub mod acpi_pm;
pub mod board;
pub mod clock;
pub mod console;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pci;
pub mod pic8259;
pub mod pit8254;
pub mod platform;
pub mod port80;
pub mod rtc;
pub mod uart16550;

pub use clock::{ClockRate, Schedule};
pub use console::ConsoleBuffer;
pub use lapic::ShotWay;
pub use platform::{LineStats, Platform, PlatformStats, StartSignal, TimerShot};

use alloc::vec::Vec;
use core::any::Any;
use core::fmt;

/// Number of interrupt lines the platform routes: GSIs 0-23 (the IOAPIC's pins); 0-15 are also
/// the ISA IRQs wired to the 8259A pair.
pub const IRQ_LINES: usize = 24;

/// A model on the port or MMIO bus.
///
/// Port accesses arrive one byte at a time unless [`Device::wide_ports`] says otherwise: the
/// platform splits a 16/32-bit access into byte accesses at successive ports, which is what an
/// 8-bit ISA device sees of a wide `IN`/`OUT`. MMIO accesses arrive whole, with the offset from the
/// start of the registered range.
pub trait Device: Any + Send {
    /// A short name for logs and the bus table.
    fn name(&self) -> &'static str;

    /// A read of `size` bytes at `port`. The default is an open bus (all ones).
    fn io_read(&mut self, port: u16, size: u8, cx: &mut DeviceContext<'_>) -> u32 {
        let _ = (port, size, cx);
        u32::MAX
    }

    /// A write of `size` bytes at `port`. The default ignores it.
    fn io_write(&mut self, port: u16, size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        let _ = (port, size, value, cx);
    }

    /// A read of `size` bytes at `offset` into the device's MMIO range.
    fn mmio_read(&mut self, offset: u64, size: u8, cx: &mut DeviceContext<'_>) -> u64 {
        let _ = (offset, size, cx);
        u64::MAX
    }

    /// A write of `size` bytes at `offset` into the device's MMIO range.
    fn mmio_write(&mut self, offset: u64, size: u8, value: u64, cx: &mut DeviceContext<'_>) {
        let _ = (offset, size, value, cx);
    }

    /// A byte access at `port` (`write`: the byte of an `OUT`, None for an `IN`) made without a
    /// context, when the device can tell before it starts that the access reads or writes its
    /// registers, and at most a byte to the guest's console, and nothing else: it drives no
    /// line, touches no exit status or power request, moves no timer (its
    /// [`Device::next_deadline`] stays as it was) and needs no time. Then the device makes it
    /// and returns the byte read (0 for a write), leaving itself and the console exactly as
    /// [`Device::io_read`]/[`Device::io_write`] would have; otherwise it returns None with
    /// nothing changed, and the platform makes the access the ordinary way. The default makes
    /// none this way.
    fn io_quiet(
        &mut self,
        port: u16,
        write: Option<u8>,
        console: &mut ConsoleBuffer,
    ) -> Option<u8> {
        let _ = (port, write, console);
        None
    }

    /// True if the device takes 16/32-bit port accesses whole instead of byte by byte.
    fn wide_ports(&self) -> bool {
        false
    }

    /// Brings the device's timers up to `cx.now()`, raising the interrupts that fell due. The
    /// platform calls it only once [`Device::next_deadline`] has come, so everything a device
    /// does on its own (without a register access) must be announced there.
    fn advance(&mut self, cx: &mut DeviceContext<'_>) {
        let _ = cx;
    }

    /// The earliest TSC value at which [`Device::advance`] has something to do.
    fn next_deadline(&self) -> Option<u64> {
        None
    }

    /// Writes the device's state as one section of a state stream ([`crate::state`]):
    /// everything needed to bring the device back as it is (registers, FIFOs, latches, timers,
    /// whose deadlines are on the guest's own clock). Required, so that no device is left out
    /// of a snapshot by default.
    fn save(&self, w: &mut crate::state::Writer);

    /// Takes over what [`Device::save`] wrote, after checking it as the untrusted input it is
    /// (indexes in range, FIFOs within their size, the same clocks and ports as this device's);
    /// on an error the device is unchanged.
    fn restore(&mut self, r: &mut crate::state::Reader<'_>)
        -> Result<(), crate::state::StateError>;
}

/// Where a device's interrupt lines go. The platform's chipset implements it; tests use a recorder.
pub trait IrqSink {
    /// Drives line `line` (a GSI, 0-23) to `level` (true = asserted). Lines beyond 23 are ignored.
    fn set_line(&mut self, line: u8, level: bool);
    /// Records that `count` timer ticks on `line` were folded into an interrupt already raised
    /// (the coalescing policy in docs/DEVICES.md), for the statistics.
    fn ticks_coalesced(&mut self, line: u8, count: u64);
}

/// What a guest asked its board to do to the whole machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// Soft off (ACPI S5): SLP_EN written with the `\_S5` SLP_TYP in PM1 control.
    SoftOff,
    /// A hard reset of the machine.
    Reset(ResetSource),
}

/// Which register reset the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetSource {
    /// The i8042's output port bit 0 (the CPU reset line), pulsed by command 0xFE.
    I8042,
    /// The reset control register at port 0xCF9 (also the FADT's RESET_REG).
    ResetControl,
}

impl fmt::Display for PowerEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SoftOff => "powered off (ACPI S5)",
            Self::Reset(ResetSource::I8042) => "reset (i8042 reset line)",
            Self::Reset(ResetSource::ResetControl) => "reset (reset control register 0xCF9)",
        })
    }
}

/// What a device may reach while it handles an access or a timer: the time, its interrupt lines,
/// the guest's console, the guest's exit status and its power requests.
pub struct DeviceContext<'a> {
    now: u64,
    irq: &'a mut dyn IrqSink,
    console: &'a mut ConsoleBuffer,
    exit_status: &'a mut Option<u32>,
    power: &'a mut Option<PowerEvent>,
    /// Whether the device reached beyond its own registers and the console: drove a line, set
    /// an exit status or asked for a power event ([`DeviceContext::reached_out`]).
    reached_out: bool,
}

impl<'a> DeviceContext<'a> {
    pub fn new(
        now: u64,
        irq: &'a mut dyn IrqSink,
        console: &'a mut ConsoleBuffer,
        exit_status: &'a mut Option<u32>,
        power: &'a mut Option<PowerEvent>,
    ) -> Self {
        DeviceContext {
            now,
            irq,
            console,
            exit_status,
            power,
            reached_out: false,
        }
    }

    /// Whether the device drove one of its lines, set an exit status or asked for a power event
    /// through this context: when it did none of these (and its timer is as it was), the access
    /// changed nothing outside the device and the console, and the platform need not look again
    /// at interrupts or deadlines.
    pub fn reached_out(&self) -> bool {
        self.reached_out
    }

    /// The guest's virtual time in TSC ticks.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Asserts line `line`. An edge-triggered receiver sees a rising edge if it was low.
    pub fn raise_irq(&mut self, line: u8) {
        self.reached_out = true;
        self.irq.set_line(line, true);
    }

    /// Deasserts line `line`.
    pub fn lower_irq(&mut self, line: u8) {
        self.reached_out = true;
        self.irq.set_line(line, false);
    }

    /// Drives line `line` to `level`.
    pub fn set_irq(&mut self, line: u8, level: bool) {
        self.reached_out = true;
        self.irq.set_line(line, level);
    }

    /// A rising then falling edge: how the timers signal a tick on an edge-triggered line.
    pub fn pulse_irq(&mut self, line: u8) {
        self.reached_out = true;
        self.irq.set_line(line, true);
        self.irq.set_line(line, false);
    }

    /// Counts `count` ticks on `line` that were folded into one interrupt.
    pub fn ticks_coalesced(&mut self, line: u8, count: u64) {
        if count > 0 {
            self.irq.ticks_coalesced(line, count);
        }
    }

    /// The guest's console. A byte pushed is no change for [`DeviceContext::reached_out`]: the
    /// buffer notes it for the run loop's print (`ConsoleBuffer::take_pushed`).
    pub fn console(&mut self) -> &mut ConsoleBuffer {
        self.console
    }

    /// Records the guest's exit status (the debug-exit device); the first one written wins.
    pub fn set_exit_status(&mut self, status: u32) {
        self.reached_out = true;
        if self.exit_status.is_none() {
            *self.exit_status = Some(status);
        }
    }

    /// Asks for the machine to be powered off or reset; the first request wins. The run loop
    /// acts on it after the access that made it.
    pub fn request_power(&mut self, event: PowerEvent) {
        self.reached_out = true;
        if self.power.is_none() {
            *self.power = Some(event);
        }
    }
}

/// The answer of a controller to a rising interrupt edge, for the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latch {
    /// A new request was latched (an IRR bit went from 0 to 1).
    New,
    /// The same request was still pending: this edge merges into it (coalesced).
    AlreadyPending,
    /// The input is masked: the edge is dropped (or parked behind the mask).
    Masked,
}

impl Latch {
    /// The better of two controllers' answers for the same edge (the line reaches both the 8259A
    /// and the IOAPIC; the guest normally masks one of them).
    pub fn either(self, other: Latch) -> Latch {
        match (self, other) {
            (Latch::New, _) | (_, Latch::New) => Latch::New,
            (Latch::AlreadyPending, _) | (_, Latch::AlreadyPending) => Latch::AlreadyPending,
            _ => Latch::Masked,
        }
    }
}

/// Identifies a device in its platform's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceId(pub usize);

/// Who answers an access to a bus range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Responder {
    /// The 8259A pair (0x20/0x21, 0xA0/0xA1).
    Pic,
    /// The edge/level control registers of the pair (0x4D0/0x4D1).
    Elcr,
    /// The local APIC's xAPIC MMIO page.
    Lapic,
    /// The IOAPIC's MMIO window.
    Ioapic,
    /// A [`Device`] in the platform's list.
    Device(DeviceId),
}

/// One registered range: `len` addresses from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub len: u64,
    pub responder: Responder,
    pub name: &'static str,
}

impl Mapping {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusError {
    /// The range has no addresses or runs past the end of the address space.
    BadRange { start: u64, len: u64 },
    /// The range overlaps one registered before, named here.
    Overlap {
        start: u64,
        len: u64,
        with: &'static str,
    },
    /// The port bus's table cannot name the responder: a device numbered
    /// [`MAX_PORT_DEVICES`] or beyond.
    Full,
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::BadRange { start, len } => write!(f, "bad range {start:#x}+{len:#x}"),
            BusError::Overlap { start, len, with } => {
                write!(f, "range {start:#x}+{len:#x} overlaps {with}")
            }
            BusError::Full => write!(
                f,
                "no room in the port table for another device ({MAX_PORT_DEVICES} at most)"
            ),
        }
    }
}

/// Non-overlapping address ranges kept sorted, each naming its responder.
#[derive(Debug, Clone, Default)]
struct RangeMap {
    ranges: Vec<Mapping>,
}

impl RangeMap {
    fn register(&mut self, m: Mapping, limit: u64) -> Result<(), BusError> {
        let bad = BusError::BadRange {
            start: m.start,
            len: m.len,
        };
        if m.len == 0
            || m.start
                .checked_add(m.len - 1)
                .is_none_or(|last| last > limit)
        {
            return Err(bad);
        }
        let at = self.ranges.partition_point(|r| r.start < m.start);
        let clash = [at.checked_sub(1), Some(at)]
            .into_iter()
            .flatten()
            .filter_map(|i| self.ranges.get(i))
            .find(|r| r.start < m.end() && m.start < r.end());
        if let Some(r) = clash {
            return Err(BusError::Overlap {
                start: m.start,
                len: m.len,
                with: r.name,
            });
        }
        self.ranges.insert(at, m);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let at = self.ranges.partition_point(|r| r.start <= addr);
        let r = self.ranges.get(at.checked_sub(1)?)?;
        (addr < r.end()).then(|| (r, addr - r.start))
    }
}

/// The most devices a [`PortBus`] names: its table names a responder in a byte, 1 to 4 the
/// chipset's, 5 and up the devices ([`Responder::code`]).
pub const MAX_PORT_DEVICES: usize = 251;

/// The first code of a device in a port table.
const FIRST_DEVICE_CODE: u8 = 5;

impl Responder {
    /// The responder's code in a port table (0 stands for none), if it has one: a device
    /// numbered below [`MAX_PORT_DEVICES`] or one of the chipset's.
    fn code(self) -> Option<u8> {
        match self {
            Responder::Pic => Some(1),
            Responder::Elcr => Some(2),
            Responder::Lapic => Some(3),
            Responder::Ioapic => Some(4),
            Responder::Device(DeviceId(n)) => u8::try_from(n).ok()?.checked_add(FIRST_DEVICE_CODE),
        }
    }

    /// The responder of code `code` ([`Responder::code`]); None for 0.
    fn from_code(code: u8) -> Option<Responder> {
        Some(match code {
            0 => return None,
            1 => Responder::Pic,
            2 => Responder::Elcr,
            3 => Responder::Lapic,
            4 => Responder::Ioapic,
            n => Responder::Device(DeviceId(usize::from(n - FIRST_DEVICE_CODE))),
        })
    }
}

/// The I/O port map of one guest: the ranges, and a two-level table built from them that finds
/// a port's responder by index (a directory of 256 entries, one per block of 256 ports, naming
/// the block's page of responder codes; the blocks without a device all name page 0, which
/// names none), so that the exit path pays two loads instead of a search (docs/BENCHMARKS.md).
#[derive(Debug, Clone)]
pub struct PortBus {
    map: RangeMap,
    /// Block `port >> 8`'s page in `pages`; 0, the empty page, for a block no device claims.
    dir: [u16; 256],
    /// Per port of a block: its responder's code ([`Responder::code`]), 0 for none. Page 0 is
    /// all zeros.
    pages: Vec<[u8; 256]>,
}

impl Default for PortBus {
    fn default() -> Self {
        Self {
            map: RangeMap::default(),
            dir: [0; 256],
            pages: alloc::vec![[0; 256]],
        }
    }
}

impl PortBus {
    /// Claims `count` ports from `first` for `responder`. Nothing is claimed if the range is
    /// empty, runs past port 0xFFFF or overlaps a range claimed before, or if the table cannot
    /// name the responder.
    pub fn register(
        &mut self,
        first: u16,
        count: u16,
        responder: Responder,
        name: &'static str,
    ) -> Result<(), BusError> {
        let m = Mapping {
            start: u64::from(first),
            len: u64::from(count),
            responder,
            name,
        };
        if responder.code().is_none() {
            return Err(BusError::Full);
        }
        self.map.register(m, u64::from(u16::MAX))?;
        self.rebuild();
        Ok(())
    }

    /// The table from the ranges (at registration only: a guest's devices are attached when its
    /// platform is built).
    fn rebuild(&mut self) {
        self.dir = [0; 256];
        self.pages.truncate(1);
        for m in &self.map.ranges {
            // `register` takes only responders with a code.
            let code = m.responder.code().unwrap_or(0);
            for port in m.start..m.end() {
                let block = (port >> 8) as usize;
                if self.dir[block] == 0 {
                    // At most 256 blocks besides page 0: the number fits 16 bits.
                    self.pages.push([0; 256]);
                    self.dir[block] = (self.pages.len() - 1) as u16;
                }
                let page = usize::from(self.dir[block]);
                self.pages[page][(port & 0xff) as usize] = code;
            }
        }
    }

    /// The responder's code at `port` (0 for none).
    #[inline]
    fn code(&self, port: u16) -> u8 {
        let [low, high] = port.to_le_bytes();
        let page = self.pages.get(usize::from(self.dir[usize::from(high)]));
        page.map_or(0, |page| page[usize::from(low)])
    }

    /// Who answers at `port`.
    #[inline]
    pub fn find(&self, port: u16) -> Option<Responder> {
        Responder::from_code(self.code(port))
    }

    /// The device that answers at `port`, if a [`Device`] does (not the chipset).
    #[inline]
    pub fn device(&self, port: u16) -> Option<DeviceId> {
        let n = self.code(port).checked_sub(FIRST_DEVICE_CODE)?;
        Some(DeviceId(usize::from(n)))
    }

    /// Every registered range in address order (for the docs and the per-guest table).
    pub fn mappings(&self) -> &[Mapping] {
        &self.map.ranges
    }
}

/// The MMIO map of one guest (guest-physical addresses that are not RAM).
#[derive(Debug, Clone, Default)]
pub struct MmioBus {
    map: RangeMap,
}

impl MmioBus {
    /// Claims `len` bytes from guest-physical `base` for `responder`.
    pub fn register(
        &mut self,
        base: u64,
        len: u64,
        responder: Responder,
        name: &'static str,
    ) -> Result<(), BusError> {
        let m = Mapping {
            start: base,
            len,
            responder,
            name,
        };
        self.map.register(m, u64::MAX)
    }

    /// Who answers at `gpa`, and the offset into its range.
    pub fn find(&self, gpa: u64) -> Option<(Responder, u64)> {
        self.map.find(gpa).map(|(m, off)| (m.responder, off))
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.map.ranges
    }
}

/// The bits an access of `size` bytes carries (1, 2 or 4; anything else is treated as 4).
pub fn size_mask(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

#[cfg(test)]
mod state_tests;

#[cfg(test)]
pub(crate) mod testing {
    //! A stand-in for the platform when one device is tested alone.
    use super::*;
    use alloc::vec::Vec;

    /// Records what a device does to its lines.
    #[derive(Debug, Default)]
    pub struct LineLog {
        pub levels: [bool; IRQ_LINES],
        /// Rising edges seen per line.
        pub edges: [u64; IRQ_LINES],
        pub coalesced: [u64; IRQ_LINES],
        /// Every (line, level) change in order.
        pub changes: Vec<(u8, bool)>,
    }

    impl IrqSink for LineLog {
        fn set_line(&mut self, line: u8, level: bool) {
            let Some(old) = self.levels.get_mut(usize::from(line)) else {
                return;
            };
            if *old != level {
                self.changes.push((line, level));
                if level {
                    self.edges[usize::from(line)] += 1;
                }
            }
            *old = level;
        }

        fn ticks_coalesced(&mut self, line: u8, count: u64) {
            if let Some(c) = self.coalesced.get_mut(usize::from(line)) {
                *c += count;
            }
        }
    }

    /// Everything a [`DeviceContext`] borrows.
    #[derive(Debug, Default)]
    pub struct Bench {
        pub lines: LineLog,
        pub console: ConsoleBuffer,
        pub exit_status: Option<u32>,
        pub power: Option<PowerEvent>,
    }

    impl Bench {
        pub fn cx(&mut self, now: u64) -> DeviceContext<'_> {
            DeviceContext::new(
                now,
                &mut self.lines,
                &mut self.console,
                &mut self.exit_status,
                &mut self.power,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Responder = Responder::Device(DeviceId(0));
    const B: Responder = Responder::Device(DeviceId(1));

    #[test]
    fn port_bus_finds_registered_ranges() {
        let mut bus = PortBus::default();
        bus.register(0x3f8, 8, A, "uart").unwrap();
        bus.register(0x20, 2, B, "pic").unwrap();
        assert_eq!(bus.find(0x3f8), Some(A));
        assert_eq!(bus.find(0x3ff), Some(A));
        assert_eq!(bus.find(0x400), None);
        assert_eq!(bus.find(0x3f7), None);
        assert_eq!(bus.find(0x21), Some(B));
        assert_eq!(bus.find(0), None);
        assert_eq!(bus.mappings()[0].name, "pic");
    }

    /// The table finds every port of every range, in blocks of 256 ports the ranges share or
    /// cross, and nothing outside them; a range registered later moves the others' indexes.
    #[test]
    fn port_bus_table_agrees_with_the_ranges() {
        let mut bus = PortBus::default();
        let ranges = [(0x3f8, 8), (0xfe, 4), (0x20, 2), (0xcf8, 8), (0xffff, 1)];
        for (i, (first, count)) in ranges.into_iter().enumerate() {
            let r = Responder::Device(DeviceId(i));
            bus.register(first, count, r, "dev").unwrap();
        }
        for port in 0..=u16::MAX {
            let want = ranges
                .iter()
                .position(|&(f, c)| {
                    u32::from(port) >= u32::from(f) && u32::from(port) < u32::from(f) + u32::from(c)
                })
                .map(|i| Responder::Device(DeviceId(i)));
            assert_eq!(bus.find(port), want, "port {port:#x}");
        }
    }

    /// A range over every block of 256 ports (all 65,535 ports from 0, then port 0xFFFF): each
    /// block gets a page of its own besides the empty one, and every port is found.
    #[test]
    fn port_bus_table_covers_every_block() {
        let mut bus = PortBus::default();
        bus.register(0, u16::MAX, A, "all").unwrap();
        bus.register(u16::MAX, 1, B, "last").unwrap();
        for port in 0..u16::MAX {
            assert_eq!(bus.find(port), Some(A), "port {port:#x}");
        }
        assert_eq!(bus.find(u16::MAX), Some(B));
        assert_eq!(bus.device(0x3f8), Some(DeviceId(0)));
    }

    #[test]
    fn port_bus_names_devices_only() {
        let mut bus = PortBus::default();
        bus.register(0x20, 2, Responder::Pic, "pic").unwrap();
        bus.register(0x3f8, 8, B, "uart").unwrap();
        assert_eq!(bus.find(0x20), Some(Responder::Pic));
        assert_eq!(bus.device(0x20), None);
        assert_eq!(bus.device(0x3ff), Some(DeviceId(1)));
        assert_eq!(bus.device(0x400), None);
    }

    /// Devices 0 to 250 and the chipset are named, each by its own code; device 251 is
    /// refused with nothing claimed; a device may hold any number of ranges.
    #[test]
    fn port_bus_names_251_devices() {
        let mut bus = PortBus::default();
        for i in 0..MAX_PORT_DEVICES as u16 {
            let r = Responder::Device(DeviceId(usize::from(i)));
            bus.register(i * 2, 1, r, "one").unwrap();
        }
        use Responder::{Elcr, Ioapic, Lapic, Pic};
        let chipset = [Pic, Elcr, Lapic, Ioapic];
        for (i, r) in chipset.into_iter().enumerate() {
            bus.register(0x2000 + i as u16, 1, r, "chipset").unwrap();
        }
        let next = Responder::Device(DeviceId(MAX_PORT_DEVICES));
        assert_eq!(bus.register(0x1000, 1, next, "more"), Err(BusError::Full));
        assert_eq!(bus.find(0x1000), None);
        for i in 0..MAX_PORT_DEVICES as u16 {
            let id = DeviceId(usize::from(i));
            assert_eq!(bus.find(i * 2), Some(Responder::Device(id)));
            assert_eq!(bus.device(i * 2), Some(id));
            assert_eq!(bus.find(i * 2 + 1), None);
        }
        for (i, r) in chipset.into_iter().enumerate() {
            assert_eq!(bus.find(0x2000 + i as u16), Some(r));
            assert_eq!(bus.device(0x2000 + i as u16), None);
        }
        for i in 0..300 {
            bus.register(0x3000 + i * 2, 1, A, "many").unwrap();
        }
        assert_eq!(bus.find(0x3000 + 299 * 2), Some(A));
    }

    #[test]
    fn port_bus_rejects_overlaps_and_empty_ranges() {
        let mut bus = PortBus::default();
        bus.register(0x40, 4, A, "pit").unwrap();
        assert_eq!(
            bus.register(0x43, 1, B, "x"),
            Err(BusError::Overlap {
                start: 0x43,
                len: 1,
                with: "pit"
            })
        );
        assert!(bus.register(0x3c, 5, B, "x").is_err());
        assert!(bus.register(0x30, 0x20, B, "x").is_err());
        assert!(bus.register(0x50, 0, B, "x").is_err());
        bus.register(0x3c, 4, B, "below").unwrap();
        bus.register(0x44, 1, B, "above").unwrap();
        bus.register(0xffff, 1, B, "last").unwrap();
        assert_eq!(bus.find(0xffff), Some(B));
    }

    #[test]
    fn mmio_bus_gives_offsets() {
        let mut bus = MmioBus::default();
        bus.register(0xfee0_0000, 0x1000, Responder::Lapic, "lapic")
            .unwrap();
        bus.register(0xfec0_0000, 0x1000, Responder::Ioapic, "ioapic")
            .unwrap();
        assert_eq!(bus.find(0xfee0_0300), Some((Responder::Lapic, 0x300)));
        assert_eq!(bus.find(0xfec0_0010), Some((Responder::Ioapic, 0x10)));
        assert_eq!(bus.find(0xfee0_1000), None);
        assert!(bus.register(u64::MAX, 2, A, "wrap").is_err());
    }

    #[test]
    fn latch_prefers_new_then_pending() {
        use Latch::*;
        assert_eq!(Masked.either(New), New);
        assert_eq!(AlreadyPending.either(Masked), AlreadyPending);
        assert_eq!(Masked.either(Masked), Masked);
    }

    #[test]
    fn context_keeps_first_exit_status_and_pulses() {
        let mut bench = testing::Bench::default();
        let mut cx = bench.cx(5);
        assert_eq!(cx.now(), 5);
        cx.set_exit_status(3);
        cx.set_exit_status(7);
        cx.pulse_irq(4);
        cx.pulse_irq(99);
        assert_eq!(bench.exit_status, Some(3));
        assert_eq!(bench.lines.edges[4], 1);
        assert!(!bench.lines.levels[4]);
    }
}
