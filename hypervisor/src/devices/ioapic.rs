//! The I/O APIC (MMIO at 0xFEC00000): 24 input pins, each with a redirection entry that turns
//! its line into an APIC message.
//!
//! After the Intel 82093AA I/O APIC datasheet (order no. 290566): IOREGSEL at offset 0x00, IOWIN
//! at 0x10; registers ID (0x00), version (0x01), arbitration ID (0x02) and the redirection table
//! (0x10-0x3F, two 32-bit halves per pin). Edge-triggered pins send a message on each rising edge
//! while unmasked; level-triggered pins send one while asserted and unmasked with remote IRR
//! clear, set remote IRR, and send again after the EOI for their vector if still asserted.
//!
//! Keel's wiring: GSI n is ISA IRQ n, except that the PIT's IRQ0 arrives on pin 2 (the usual
//! interrupt source override, ISA IRQ0 -> GSI 2, which QEMU and PC firmware also report). Lines
//! carry the logical state "asserted": the polarity bit is stored and read back but not applied.
//! The delivery-status bit always reads idle (messages are delivered at once).

use super::lapic::{ApicMessage, MessageSink};
use super::Latch;

pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const IOAPIC_PINS: usize = 24;
/// Version register: version 0x11, maximum redirection entry 23.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;

// Redirection entry bits.
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL_TRIGGERED: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Guest-writable bits: vector, delivery mode, destination mode, polarity, trigger mode, mask,
/// destination. Delivery status (12) and remote IRR (14) are read-only.
const WRITABLE: u64 = 0xff00_0000_0001_afff;

/// The GSI pin an ISA line arrives on (IRQ0 -> pin 2, the rest identity).
pub fn pin_for_line(line: u8) -> u8 {
    if line == 0 {
        2
    } else {
        line
    }
}

#[derive(Debug, Clone)]
pub struct IoApic {
    id: u8,
    ioregsel: u8,
    redirection: [u64; IOAPIC_PINS],
    /// Asserted pins, one bit each.
    asserted: u32,
}

crate::codec_struct!(IoApic {
    id,
    ioregsel,
    redirection,
    asserted
});

impl IoApic {
    /// Writes the IOAPIC's state (section `IOAP`, `crate::state`).
    pub fn save(&self, w: &mut crate::state::Writer) {
        crate::state::save_whole(w, *b"IOAP", 1, self);
    }

    /// Takes over what [`IoApic::save`] wrote; unchanged on an error.
    pub fn restore(
        &mut self,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<(), crate::state::StateError> {
        crate::state::restore_whole(r, *b"IOAP", 1, self, |v| {
            if v.asserted >> IOAPIC_PINS != 0 {
                return Err("an IOAPIC pin beyond its 24");
            }
            Ok(())
        })
    }
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// Reset state: ID 0, every entry masked and edge triggered.
    pub fn new() -> Self {
        IoApic {
            id: 0,
            ioregsel: 0,
            redirection: [MASKED; IOAPIC_PINS],
            asserted: 0,
        }
    }

    /// Redirection entry of `pin`, for tests and the stats table.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    fn message(entry: u64) -> ApicMessage {
        ApicMessage {
            vector: entry as u8,
            delivery_mode: ((entry >> 8) & 7) as u8,
            logical: entry & (1 << 11) != 0,
            destination: (entry >> 56) as u8,
            level_triggered: entry & LEVEL_TRIGGERED != 0,
        }
    }

    /// Sends the message of level-triggered `pin` if it is asserted, unmasked and not waiting for
    /// an EOI.
    fn service_level(&mut self, pin: usize, sink: &mut impl MessageSink) -> Latch {
        let entry = self.redirection[pin];
        if entry & MASKED != 0 || self.asserted & (1 << pin) == 0 {
            return Latch::Masked;
        }
        if entry & REMOTE_IRR != 0 {
            return Latch::AlreadyPending;
        }
        let latch = sink.deliver(Self::message(entry));
        if latch != Latch::Masked {
            self.redirection[pin] |= REMOTE_IRR;
        }
        latch
    }

    /// Drives input `pin` to `level`. Returns what a rising edge led to.
    pub fn set_pin(&mut self, pin: u8, level: bool, sink: &mut impl MessageSink) -> Latch {
        let pin = usize::from(pin);
        if pin >= IOAPIC_PINS {
            return Latch::Masked;
        }
        let bit = 1u32 << pin;
        let rising = level && self.asserted & bit == 0;
        if level {
            self.asserted |= bit;
        } else {
            self.asserted &= !bit;
        }
        let entry = self.redirection[pin];
        if entry & LEVEL_TRIGGERED != 0 {
            return self.service_level(pin, sink);
        }
        if !rising || entry & MASKED != 0 {
            return Latch::Masked;
        }
        sink.deliver(Self::message(entry))
    }

    /// The local APIC's EOI broadcast for `vector`: clears remote IRR of the level-triggered
    /// entries with that vector and re-sends those still asserted.
    pub fn eoi(&mut self, vector: u8, sink: &mut impl MessageSink) {
        for pin in 0..IOAPIC_PINS {
            let entry = self.redirection[pin];
            if entry as u8 == vector && entry & LEVEL_TRIGGERED != 0 && entry & REMOTE_IRR != 0 {
                self.redirection[pin] &= !REMOTE_IRR;
                self.service_level(pin, sink);
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARBITRATION => u32::from(self.id & 0x0f) << 24,
            REG_VERSION => IOAPIC_VERSION,
            r if r >= REG_REDIRECTION => {
                let i = usize::from(r - REG_REDIRECTION);
                let Some(entry) = self.redirection.get(i / 2) else {
                    return 0;
                };
                if i % 2 == 0 {
                    *entry as u32
                } else {
                    (*entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32, sink: &mut impl MessageSink) {
        match self.ioregsel {
            REG_ID => self.id = ((value >> 24) & 0x0f) as u8,
            r if r >= REG_REDIRECTION => {
                let i = usize::from(r - REG_REDIRECTION);
                let pin = i / 2;
                let Some(old) = self.redirection.get(pin).copied() else {
                    return;
                };
                let new = if i % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut entry = (new & WRITABLE) | (old & REMOTE_IRR);
                if entry & LEVEL_TRIGGERED == 0 {
                    entry &= !REMOTE_IRR;
                }
                self.redirection[pin] = entry;
                if entry & LEVEL_TRIGGERED != 0 {
                    // Unmasking an asserted level input delivers it now.
                    self.service_level(pin, sink);
                }
            }
            _ => {} // version and arbitration ID are read-only
        }
    }

    /// An MMIO load at `offset` from the base.
    pub fn mmio_read(&mut self, offset: u64, size: u8) -> u64 {
        let value = match offset & !3 {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let value = u64::from(value) >> (8 * (offset & 3));
        match size {
            1 => value & 0xff,
            2 => value & 0xffff,
            _ => value,
        }
    }

    /// An MMIO store at `offset` from the base; IOWIN takes 32-bit stores only.
    pub fn mmio_write(&mut self, offset: u64, size: u8, value: u64, sink: &mut impl MessageSink) {
        match offset {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN if size >= 4 => self.write_register(value as u32, sink),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// Records messages and answers like an APIC whose IRR bit for each vector is clear until
    /// the test clears `pending`.
    #[derive(Default)]
    struct Bus {
        sent: Vec<ApicMessage>,
        pending: Vec<u8>,
    }

    impl MessageSink for Bus {
        fn deliver(&mut self, msg: ApicMessage) -> Latch {
            self.sent.push(msg);
            if self.pending.contains(&msg.vector) {
                Latch::AlreadyPending
            } else {
                self.pending.push(msg.vector);
                Latch::New
            }
        }
    }

    fn write_entry(io: &mut IoApic, bus: &mut Bus, pin: u8, entry: u64) {
        io.mmio_write(IOREGSEL, 4, u64::from(REG_REDIRECTION + 2 * pin + 1), bus);
        io.mmio_write(IOWIN, 4, entry >> 32, bus);
        io.mmio_write(IOREGSEL, 4, u64::from(REG_REDIRECTION + 2 * pin), bus);
        io.mmio_write(IOWIN, 4, entry & 0xffff_ffff, bus);
    }

    fn read_reg(io: &mut IoApic, bus: &mut Bus, reg: u8) -> u32 {
        io.mmio_write(IOREGSEL, 4, u64::from(reg), bus);
        io.mmio_read(IOWIN, 4) as u32
    }

    #[test]
    fn identification_registers() {
        let (mut io, mut bus) = (IoApic::new(), Bus::default());
        assert_eq!(read_reg(&mut io, &mut bus, REG_VERSION), 0x0017_0011);
        io.mmio_write(IOREGSEL, 4, 0, &mut bus);
        io.mmio_write(IOWIN, 4, 0x0200_0000, &mut bus);
        assert_eq!(read_reg(&mut io, &mut bus, REG_ID), 0x0200_0000);
        assert_eq!(read_reg(&mut io, &mut bus, REG_ARBITRATION), 0x0200_0000);
        assert_eq!(io.mmio_read(IOREGSEL, 4), u64::from(REG_ARBITRATION));
        // Past the last entry (0x3f) reads 0.
        assert_eq!(read_reg(&mut io, &mut bus, 0x40), 0);
    }

    #[test]
    fn redirection_round_trip_keeps_read_only_bits() {
        let (mut io, mut bus) = (IoApic::new(), Bus::default());
        assert_eq!(
            read_reg(&mut io, &mut bus, 0x10 + 2 * 23),
            0x1_0000,
            "masked at reset"
        );
        write_entry(&mut io, &mut bus, 5, 0x0300_0000_0000_f931 | (1 << 12));
        assert_eq!(
            read_reg(&mut io, &mut bus, 0x10 + 10),
            0xa931,
            "bits 12 and 14 read-only"
        );
        assert_eq!(read_reg(&mut io, &mut bus, 0x10 + 11), 0x0300_0000);
    }

    #[test]
    fn edge_pins_send_on_rising_edges_while_unmasked() {
        let (mut io, mut bus) = (IoApic::new(), Bus::default());
        assert_eq!(io.set_pin(4, true, &mut bus), Latch::Masked);
        io.set_pin(4, false, &mut bus);
        write_entry(&mut io, &mut bus, 4, 0x0100_0000_0000_0834);
        assert_eq!(io.set_pin(4, true, &mut bus), Latch::New);
        assert_eq!(io.set_pin(4, true, &mut bus), Latch::Masked, "no edge");
        io.set_pin(4, false, &mut bus);
        assert_eq!(io.set_pin(4, true, &mut bus), Latch::AlreadyPending);
        let m = bus.sent[0];
        assert_eq!((m.vector, m.logical, m.destination), (0x34, true, 1));
        assert!(!m.level_triggered);
        assert_eq!(bus.sent.len(), 2);
    }

    #[test]
    fn level_pins_wait_for_eoi() {
        let (mut io, mut bus) = (IoApic::new(), Bus::default());
        write_entry(&mut io, &mut bus, 10, 0xa040);
        assert_eq!(io.set_pin(10, true, &mut bus), Latch::New);
        assert_eq!(read_reg(&mut io, &mut bus, 0x10 + 20) & (1 << 14), 1 << 14);
        bus.pending.clear();
        io.eoi(0x40, &mut bus);
        assert_eq!(bus.sent.len(), 2, "still asserted: sent again");
        io.set_pin(10, false, &mut bus);
        bus.pending.clear();
        io.eoi(0x40, &mut bus);
        assert_eq!(bus.sent.len(), 2);
        assert_eq!(read_reg(&mut io, &mut bus, 0x10 + 20) & (1 << 14), 0);
        io.eoi(0x41, &mut bus);
        assert_eq!(bus.sent.len(), 2);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let (mut io, mut bus) = (IoApic::new(), Bus::default());
        write_entry(&mut io, &mut bus, 11, 0x1_a051);
        io.set_pin(11, true, &mut bus);
        assert!(bus.sent.is_empty());
        write_entry(&mut io, &mut bus, 11, 0xa051);
        assert_eq!(bus.sent.len(), 1);
        assert!(bus.sent[0].level_triggered);
    }

    #[test]
    fn isa_irq0_arrives_on_pin_2() {
        assert_eq!(pin_for_line(0), 2);
        assert_eq!(pin_for_line(1), 1);
        assert_eq!(pin_for_line(8), 8);
    }
}
