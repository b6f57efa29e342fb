//! One guest's virtual PC: the devices on its buses, the interrupt chipset they feed, its console
//! and its exit status.
//!
//! The exit handlers call [`Platform::io_read`], [`Platform::io_write`], [`Platform::mmio_read`]
//! and [`Platform::mmio_write`]; the run loop calls [`Platform::advance`] with the guest's virtual
//! TSC before it looks for an interrupt to inject with [`Platform::pending_interrupt`], injects
//! it, and reports the injection with [`Platform::acknowledge`]. [`Platform::next_deadline`] tells
//! the scheduler when the next timer interrupt is due.

use super::console::DebugConsole;
use super::debug_exit::DebugExit;
use super::pic8259::{self, PicPair};
use super::pit8254::{self, Pit};
use super::port80::Port80;
use super::uart16550::{self, Uart16550};
use super::{
    BusError, ConsoleBuffer, Device, DeviceContext, DeviceId, IrqSink, Latch, MmioBus, PortBus,
    Responder, IRQ_LINES,
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

/// Counters of one platform, for the accounting table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlatformStats {
    /// Per GSI / ISA IRQ line.
    pub lines: [LineStats; IRQ_LINES],
    /// Interrupts injected (acknowledged) into the guest.
    pub acknowledged: u64,
    /// Acknowledgements of a vector no controller was offering (ignored).
    pub stale_acks: u64,
    pub unclaimed_io_reads: u64,
    pub unclaimed_io_writes: u64,
    pub unclaimed_mmio_reads: u64,
    pub unclaimed_mmio_writes: u64,
}

/// The interrupt fabric: line levels and the controllers they lead to.
#[derive(Debug, Default)]
struct Chipset {
    levels: [bool; IRQ_LINES],
    pic: PicPair,
    // Placeholders until the local APIC model lands.
    tpr: u8,
    tsc_deadline: u64,
    stats: PlatformStats,
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
        if rising {
            let stats = &mut self.stats.lines[i];
            stats.raised += 1;
            match pic {
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
    tsc_hz: u64,
    devices: Vec<Box<dyn Device>>,
    ports: PortBus,
    mmio: MmioBus,
    chipset: Chipset,
    console: ConsoleBuffer,
    exit_status: Option<u32>,
}

impl Platform {
    /// A PC with every Keel device at its standard place, on a guest TSC of `tsc_hz`.
    pub fn new(tsc_hz: u64) -> Self {
        let mut p = Platform {
            tsc_hz: tsc_hz.max(1),
            devices: Vec::new(),
            ports: PortBus::default(),
            mmio: MmioBus::default(),
            chipset: Chipset::default(),
            console: ConsoleBuffer::new(),
            exit_status: None,
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
        let pit = Box::new(Pit::new(p.tsc_hz));
        p.attach_builtin(pit, &[(pit8254::CHANNEL0, 4), (pit8254::PORT_61, 1)]);
        p.attach_builtin(Box::new(Port80::default()), &[(0x80, 1)]);
        p.attach_builtin(Box::new(DebugConsole), &[(port::DEBUGCON, 1)]);
        p.attach_builtin(Box::new(DebugExit), &[(port::DEBUG_EXIT, 4)]);
        let com1 = Uart16550::new(port::COM1, uart16550::COM1_IRQ);
        p.attach_builtin(Box::new(com1), &[(port::COM1, 8)]);
        p
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
        self.devices.push(device);
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
        self.call(DeviceId(i), now, |dev, cx| {
            (dev as &mut dyn Any).downcast_mut::<T>().map(|t| f(t, cx))
        })
        .flatten()
    }

    /// Runs `f` on device `id` with a context at time `now`.
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
        );
        Some(f(dev.as_mut(), &mut cx))
    }

    /// Delivers a byte typed at the guest's serial console to COM1's receiver. False if the
    /// receive FIFO overran.
    pub fn push_serial_input(&mut self, byte: u8, now: u64) -> bool {
        self.advance(now);
        self.with_device(now, |uart: &mut Uart16550, cx| uart.push_input(byte, cx))
            .unwrap_or(false)
    }

    /// A guest `IN` of `size` bytes (1, 2 or 4) from `port`; None if no device claims the port
    /// (the caller returns all ones to the guest).
    pub fn io_read(&mut self, port: u16, size: u8, now: u64) -> Option<u32> {
        self.advance(now);
        let Some(first) = self.ports.find(port) else {
            self.chipset.stats.unclaimed_io_reads += 1;
            return None;
        };
        let size = access_size(size);
        if self.takes_wide(first) {
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
    pub fn io_write(&mut self, port: u16, size: u8, value: u32, now: u64) -> bool {
        self.advance(now);
        let Some(first) = self.ports.find(port) else {
            self.chipset.stats.unclaimed_io_writes += 1;
            return false;
        };
        let size = access_size(size);
        if self.takes_wide(first) {
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

    /// A guest load of `size` bytes at `gpa`; None if no device claims it.
    pub fn mmio_read(&mut self, gpa: u64, size: u8, now: u64) -> Option<u64> {
        self.advance(now);
        let Some((r, offset)) = self.mmio.find(gpa) else {
            self.chipset.stats.unclaimed_mmio_reads += 1;
            return None;
        };
        let value = match r {
            Responder::Device(id) => self
                .call(id, now, |dev, cx| dev.mmio_read(offset, size, cx))
                .unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        Some(value)
    }

    /// A guest store of `size` bytes at `gpa`; false if no device claims it.
    pub fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, now: u64) -> bool {
        self.advance(now);
        let Some((r, offset)) = self.mmio.find(gpa) else {
            self.chipset.stats.unclaimed_mmio_writes += 1;
            return false;
        };
        if let Responder::Device(id) = r {
            self.call(id, now, |dev, cx| dev.mmio_write(offset, size, value, cx));
        }
        true
    }

    /// Fires every timer that fell due by `now` (the guest's virtual TSC).
    pub fn advance(&mut self, now: u64) {
        for i in 0..self.devices.len() {
            if self.devices[i].next_deadline().is_some_and(|d| d <= now) {
                self.call(DeviceId(i), now, |dev, cx| dev.advance(cx));
            }
        }
    }

    /// The earliest TSC at which a timer fires.
    pub fn next_deadline(&self) -> Option<u64> {
        self.devices.iter().filter_map(|d| d.next_deadline()).min()
    }

    /// The vector to inject next, if any (call [`Platform::advance`] first).
    pub fn pending_interrupt(&self) -> Option<u8> {
        self.chipset.pic.pending_vector()
    }

    /// Reports that `vector` (from [`Platform::pending_interrupt`]) was injected: the INTA cycle
    /// of the controller that offered it.
    pub fn acknowledge(&mut self, vector: u8) {
        if self.chipset.pic.pending_vector() == Some(vector) {
            self.chipset.pic.acknowledge();
            self.chipset.stats.acknowledged += 1;
        } else {
            self.chipset.stats.stale_acks += 1;
        }
    }

    /// The local APIC's task-priority register (CR8 is its bits 7:4).
    pub fn tpr(&self) -> u8 {
        self.chipset.tpr
    }

    pub fn set_tpr(&mut self, tpr: u8) {
        self.chipset.tpr = tpr;
    }

    /// IA32_TSC_DEADLINE as the guest reads it.
    pub fn tsc_deadline(&self) -> u64 {
        self.chipset.tsc_deadline
    }

    /// A guest write of IA32_TSC_DEADLINE at time `now`.
    pub fn write_tsc_deadline(&mut self, value: u64, now: u64) {
        let _ = now;
        self.chipset.tsc_deadline = value;
    }

    /// The status the guest wrote to the debug-exit port, once it has.
    pub fn exit_status(&self) -> Option<u32> {
        self.exit_status
    }

    pub fn console(&mut self) -> &mut ConsoleBuffer {
        &mut self.console
    }

    pub fn stats(&self) -> PlatformStats {
        self.chipset.stats
    }

    fn takes_wide(&self, r: Responder) -> bool {
        match r {
            Responder::Device(DeviceId(i)) => self.devices.get(i).is_some_and(|d| d.wide_ports()),
            _ => false,
        }
    }

    fn port_read(&mut self, r: Responder, port: u16, size: u8, now: u64) -> u32 {
        match r {
            Responder::Pic | Responder::Elcr => u32::from(self.chipset.pic.read(port)),
            Responder::Device(id) => self
                .call(id, now, |dev, cx| dev.io_read(port, size, cx))
                .unwrap_or(u32::MAX),
            _ => u32::MAX,
        }
    }

    fn port_write(&mut self, r: Responder, port: u16, size: u8, value: u32, now: u64) {
        match r {
            Responder::Pic | Responder::Elcr => self.chipset.pic.write(port, value as u8),
            Responder::Device(id) => {
                self.call(id, now, |dev, cx| dev.io_write(port, size, value, cx));
            }
            Responder::Lapic | Responder::Ioapic => {}
        }
    }
}

/// The access size in bytes: 1, 2 or 4 (anything else is taken as 4).
fn access_size(size: u8) -> u8 {
    match size {
        1 | 2 => size,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::clock::{ClockRate, PIT_HZ};

    const TSC_HZ: u64 = 2_000_000_000;

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
        assert_eq!(p.mmio_read(0x1000, 4, 0), None);
        assert!(!p.mmio_write(0x1000, 4, 0, 0));
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
            while let Some(v) = p.pending_interrupt() {
                p.acknowledge(v);
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
        p.acknowledge(0x30);
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
}
