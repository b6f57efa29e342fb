//! The PC's two cascaded 8259A programmable interrupt controllers (master 0x20/0x21 with IRQ0-7,
//! slave 0xA0/0xA1 with IRQ8-15 on the master's IR2) and the PIIX edge/level control registers
//! (ELCR, 0x4D0/0x4D1).
//!
//! After the Intel 8259A datasheet (order no. 231468): ICW1-ICW4 initialization, OCW1 masks, OCW2
//! EOI and rotation commands, OCW3 register select, poll and special mask mode; auto-EOI;
//! special fully nested mode; level-triggered inputs (ICW1.LTIM or the ELCR, Intel 82371AB PIIX4
//! datasheet 12.2.1.8). An INTA cycle with no request left yields the spurious IRQ7 (IRQ15 on the
//! slave) without setting an ISR bit.
//!
//! Not modelled: 8080/8085 (MCS-80) mode (the vector base comes from ICW2 either way) and buffered
//! mode (ICW4.BUF), which only concern the bus.

use super::Latch;

pub const MASTER_CMD: u16 = 0x20;
pub const MASTER_DATA: u16 = 0x21;
pub const SLAVE_CMD: u16 = 0xa0;
pub const SLAVE_DATA: u16 = 0xa1;
pub const ELCR_MASTER: u16 = 0x4d0;
pub const ELCR_SLAVE: u16 = 0x4d1;
/// The master input the slave's INT output drives.
pub const CASCADE_IRQ: u8 = 2;

/// ELCR bits that can be set: IRQ0, 1, 2, 8 and 13 are always edge triggered (PIIX4 12.2.1.8).
const ELCR_MASTER_WRITABLE: u8 = 0xf8;
const ELCR_SLAVE_WRITABLE: u8 = 0xde;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// Initialized: data port writes are OCW1.
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// The level of each input, for edge detection.
    input: u8,
    elcr: u8,
    elcr_writable: u8,
    /// ICW2: the vector of IR0 (bits 7:3).
    base: u8,
    /// The input with the highest priority (rotation moves it).
    highest: u8,
    init: Init,
    needs_icw4: bool,
    single: bool,
    /// ICW1.LTIM: every input level triggered.
    level_all: bool,
    icw3: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    is_master: bool,
}

impl Chip {
    fn new(is_master: bool, base: u8) -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0xff,
            input: 0,
            elcr: 0,
            elcr_writable: if is_master {
                ELCR_MASTER_WRITABLE
            } else {
                ELCR_SLAVE_WRITABLE
            },
            base,
            highest: 0,
            init: Init::Ready,
            needs_icw4: true,
            single: false,
            level_all: false,
            icw3: if is_master {
                1 << CASCADE_IRQ
            } else {
                CASCADE_IRQ
            },
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            is_master,
        }
    }

    fn level_triggered(&self, irq: u8) -> bool {
        self.level_all || self.elcr & (1 << irq) != 0
    }

    /// The input of highest priority among `bits`: the bits rotated so that the input of
    /// highest priority (`highest`) is bit 0, then the lowest set bit, which is the first in
    /// priority order (IR `highest`, `highest` + 1, ... IR7, IR0, ...), instead of a scan.
    fn first_by_priority(&self, bits: u8) -> Option<u8> {
        if bits == 0 {
            return None;
        }
        let rank = bits.rotate_right(u32::from(self.highest)).trailing_zeros() as u8;
        Some((self.highest + rank) & 7)
    }

    /// Priority rank of `irq`: 0 is the highest.
    fn rank(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.highest) & 7
    }

    /// The request the chip presents on INT: the highest unmasked IRR bit that outranks every
    /// in-service level (datasheet: "Priority Resolver").
    fn output(&self) -> Option<u8> {
        let irq = self.first_by_priority(self.irr & !self.imr)?;
        let mut blocking = self.isr;
        if self.special_mask {
            // Special mask mode: masked levels in service do not hold lower ones back.
            blocking &= !self.imr;
        }
        if self.is_master && self.special_fully_nested {
            // SFNM: the slave's own priority logic orders its requests.
            blocking &= !(1 << CASCADE_IRQ);
        }
        match self.first_by_priority(blocking) {
            Some(in_service) if self.rank(in_service) <= self.rank(irq) => None,
            _ => Some(irq),
        }
    }

    fn set_input(&mut self, irq: u8, level: bool) -> Latch {
        let bit = 1 << irq;
        let rising = level && self.input & bit == 0;
        let was_requested = self.irr & bit != 0;
        if level {
            self.input |= bit;
        } else {
            self.input &= !bit;
        }
        if self.level_triggered(irq) {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if rising {
            self.irr |= bit;
        }
        if self.imr & bit != 0 {
            Latch::Masked
        } else if was_requested {
            Latch::AlreadyPending
        } else {
            Latch::New
        }
    }

    /// The INTA cycle for `irq`: IRR to ISR (or straight through with auto-EOI).
    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.highest = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if !self.level_triggered(irq) {
            self.irr &= !bit;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            self.icw1(value);
        } else if value & 0x08 != 0 {
            self.ocw3(value);
        } else {
            self.ocw2(value);
        }
    }

    /// ICW1 starts initialization: clears IMR and ISR, resets the edge sense (a line already high
    /// needs a new rising edge), priority, special mask mode and the read select to IRR.
    fn icw1(&mut self, value: u8) {
        self.needs_icw4 = value & 0x01 != 0;
        self.single = value & 0x02 != 0;
        self.level_all = value & 0x08 != 0;
        self.init = Init::Icw2;
        self.imr = 0;
        self.isr = 0;
        self.irr &= self.input & self.level_mask();
        self.highest = 0;
        self.special_mask = false;
        self.read_isr = false;
        self.poll = false;
        if !self.needs_icw4 {
            // ICW4 not sent: all its bits are zero.
            self.auto_eoi = false;
            self.special_fully_nested = false;
        }
        self.rotate_on_auto_eoi = false;
    }

    fn level_mask(&self) -> u8 {
        if self.level_all {
            0xff
        } else {
            self.elcr
        }
    }

    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            // Non-specific EOI, with or without rotation.
            0b001 | 0b101 => {
                if let Some(irq) = self.first_by_priority(self.isr) {
                    self.isr &= !(1 << irq);
                    if value & 0x80 != 0 {
                        self.highest = (irq + 1) & 7;
                    }
                }
            }
            // Specific EOI, with or without rotation.
            0b011 | 0b111 => {
                self.isr &= !(1 << level);
                if value & 0x80 != 0 {
                    self.highest = (level + 1) & 7;
                }
            }
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            // Set priority: `level` becomes the lowest.
            0b110 => self.highest = (level + 1) & 7,
            _ => {} // 0b010: no operation
        }
    }

    fn ocw3(&mut self, value: u8) {
        if value & 0x04 != 0 {
            self.poll = true;
        }
        if value & 0x02 != 0 {
            self.read_isr = value & 0x01 != 0;
        }
        if value & 0x40 != 0 {
            self.special_mask = value & 0x20 != 0;
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            Init::Ready => self.imr = value,
            Init::Icw2 => {
                self.base = value & 0xf8;
                self.init = if !self.single {
                    Init::Icw3
                } else if self.needs_icw4 {
                    Init::Icw4
                } else {
                    Init::Ready
                };
            }
            Init::Icw3 => {
                self.icw3 = value;
                self.init = if self.needs_icw4 {
                    Init::Icw4
                } else {
                    Init::Ready
                };
            }
            Init::Icw4 => {
                self.auto_eoi = value & 0x02 != 0;
                self.special_fully_nested = value & 0x10 != 0;
                self.init = Init::Ready;
            }
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

/// The master/slave pair and its ELCR.
#[derive(Debug, Clone)]
pub struct PicPair {
    master: Chip,
    slave: Chip,
    spurious: u64,
}

crate::codec_enum!(Init {
    Ready = 0,
    Icw2 = 1,
    Icw3 = 2,
    Icw4 = 3
});
crate::codec_struct!(Chip {
    irr,
    isr,
    imr,
    input,
    elcr,
    elcr_writable,
    base,
    highest,
    init,
    needs_icw4,
    single,
    level_all,
    icw3,
    auto_eoi,
    rotate_on_auto_eoi,
    special_fully_nested,
    special_mask,
    read_isr,
    poll,
    is_master,
});
crate::codec_struct!(PicPair {
    master,
    slave,
    spurious
});

impl PicPair {
    /// Writes the pair's state (section `PIC2`, `crate::state`).
    pub fn save(&self, w: &mut crate::state::Writer) {
        crate::state::save_whole(w, *b"PIC2", 1, self);
    }

    /// Takes over what [`PicPair::save`] wrote: each chip in its place (master, slave), with
    /// the ELCR bits the chipset lets software change; unchanged on an error.
    pub fn restore(
        &mut self,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<(), crate::state::StateError> {
        let fixed = |c: &Chip| (c.is_master, c.elcr_writable);
        let (master, slave) = (fixed(&self.master), fixed(&self.slave));
        crate::state::restore_whole(r, *b"PIC2", 1, self, |v| {
            if (fixed(&v.master), fixed(&v.slave)) != (master, slave) {
                return Err("a PIC pair wired otherwise");
            }
            if v.master.highest > 7 || v.slave.highest > 7 {
                return Err("a PIC priority beyond IR7");
            }
            Ok(())
        })
    }
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// The pair as a PC BIOS leaves it: master vectors 0x08-0x0F, slave 0x70-0x77, cascade on
    /// IR2, edge triggered — but every input masked, since no firmware of Keel's wants interrupts.
    pub fn new() -> Self {
        PicPair {
            master: Chip::new(true, 0x08),
            slave: Chip::new(false, 0x70),
            spurious: 0,
        }
    }

    /// Drives ISA line `irq` (0-15). Returns what the controller made of a rising edge.
    pub fn set_irq(&mut self, irq: u8, level: bool) -> Latch {
        let latch = match irq {
            0..=7 => self.master.set_input(irq, level),
            8..=15 => self.slave.set_input(irq - 8, level),
            _ => return Latch::Masked,
        };
        self.update_cascade();
        latch
    }

    /// The slave's INT output is the level on the master's IR2.
    fn update_cascade(&mut self) {
        let out = self.slave.output().is_some();
        self.master.set_input(CASCADE_IRQ, out);
    }

    /// True when the master has no unmasked request latched: its INT output is down, whatever
    /// is in service and however the priorities rotate (the priority resolver presents only
    /// unmasked IRR bits, datasheet: "Priority Resolver"; the slave reaches the CPU only through
    /// the master's IR2). Two loads and an AND, not the resolver: for the check before every VM
    /// entry (`Platform::pending_pic_interrupt`).
    #[inline]
    pub fn output_down(&self) -> bool {
        self.master.irr & !self.master.imr == 0
    }

    /// True while the master's INT output is asserted.
    pub fn has_interrupt(&self) -> bool {
        self.master.output().is_some()
    }

    /// The vector the next INTA would return, if a request is presented (no spurious vectors).
    pub fn pending_vector(&self) -> Option<u8> {
        let irq = self.master.output()?;
        if irq == CASCADE_IRQ && !self.master.single {
            let sirq = self.slave.output()?;
            return Some(self.slave.base | sirq);
        }
        Some(self.master.base | irq)
    }

    /// An interrupt-acknowledge cycle: returns the vector and moves the request into service.
    /// With no request it returns the master's IRQ7 vector (the slave's IRQ15 if the slave's
    /// request vanished), a spurious interrupt that sets no ISR bit.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.master.output() {
            None => {
                self.spurious += 1;
                self.master.base | 7
            }
            Some(irq) if irq == CASCADE_IRQ && !self.master.single => {
                self.master.acknowledge(irq);
                match self.slave.output() {
                    Some(sirq) => {
                        self.slave.acknowledge(sirq);
                        self.slave.base | sirq
                    }
                    None => {
                        self.spurious += 1;
                        self.slave.base | 7
                    }
                }
            }
            Some(irq) => {
                self.master.acknowledge(irq);
                self.master.base | irq
            }
        };
        self.update_cascade();
        vector
    }

    /// Spurious INTA cycles so far.
    pub fn spurious(&self) -> u64 {
        self.spurious
    }

    /// Port read at 0x20/0x21/0xA0/0xA1/0x4D0/0x4D1.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            MASTER_CMD | SLAVE_CMD => {
                let is_master = port == MASTER_CMD;
                let chip = if is_master { &self.master } else { &self.slave };
                if chip.poll {
                    return self.poll(is_master);
                }
                chip.read_command()
            }
            MASTER_DATA => self.master.imr,
            SLAVE_DATA => self.slave.imr,
            ELCR_MASTER => self.master.elcr,
            ELCR_SLAVE => self.slave.elcr,
            _ => 0xff,
        }
    }

    /// Poll command read: acknowledges the highest request of that chip and returns 0x80 | level,
    /// or 0 if none (datasheet: "The Poll Command").
    fn poll(&mut self, is_master: bool) -> u8 {
        let chip = if is_master {
            &mut self.master
        } else {
            &mut self.slave
        };
        chip.poll = false;
        let result = match chip.output() {
            Some(irq) => {
                chip.acknowledge(irq);
                0x80 | irq
            }
            None => 0,
        };
        self.update_cascade();
        result
    }

    /// Port write at 0x20/0x21/0xA0/0xA1/0x4D0/0x4D1.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_CMD => self.master.write_command(value),
            MASTER_DATA => self.master.write_data(value),
            SLAVE_CMD => self.slave.write_command(value),
            SLAVE_DATA => self.slave.write_data(value),
            ELCR_MASTER => self.master.elcr = value & self.master.elcr_writable,
            ELCR_SLAVE => self.slave.elcr = value & self.slave.elcr_writable,
            _ => {}
        }
        // A level input that became level triggered, or that was re-enabled, is requested again.
        for chip in [&mut self.master, &mut self.slave] {
            let level = chip.level_mask() & chip.input;
            chip.irr |= level;
        }
        self.update_cascade();
    }

    /// The vector bases programmed by ICW2 (master, slave).
    pub fn vector_bases(&self) -> (u8, u8) {
        (self.master.base, self.slave.base)
    }

    /// The interrupt masks (master, slave).
    pub fn masks(&self) -> (u8, u8) {
        (self.master.imr, self.slave.imr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The priority scan the rotation replaces: IR `highest`, `highest` + 1, ... in turn.
    fn scanned_first(highest: u8, bits: u8) -> Option<u8> {
        (0..8)
            .map(|p| (highest + p) & 7)
            .find(|&irq| bits & (1 << irq) != 0)
    }

    /// The priority resolver by the scan: the first unmasked request, unless a level in service
    /// (not masked, in special mask mode; not the cascade, in special fully nested mode) ranks
    /// at or above it.
    fn scanned_output(c: &Chip) -> Option<u8> {
        let irq = scanned_first(c.highest, c.irr & !c.imr)?;
        let mut blocking = c.isr;
        if c.special_mask {
            blocking &= !c.imr;
        }
        if c.is_master && c.special_fully_nested {
            blocking &= !(1 << CASCADE_IRQ);
        }
        let rank = |i: u8| i.wrapping_sub(c.highest) & 7;
        match scanned_first(c.highest, blocking) {
            Some(in_service) if rank(in_service) <= rank(irq) => None,
            _ => Some(irq),
        }
    }

    #[test]
    fn priority_by_rotation_is_the_scan() {
        // Every rotation and every set of requests.
        for highest in 0..8 {
            let mut c = Chip::new(true, 0x08);
            c.highest = highest;
            for bits in 0..=255u8 {
                assert_eq!(
                    c.first_by_priority(bits),
                    scanned_first(highest, bits),
                    "highest {highest} bits {bits:#x}"
                );
            }
        }
        // The resolver over pseudo-random states: requests, in service, masks, rotation, special
        // mask and special fully nested mode.
        let mut x = 0x243f_6a88_85a3_08d3u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut c = Chip::new(x & 1 != 0, 0x08);
            c.irr = (x >> 8) as u8;
            c.isr = (x >> 16) as u8 & (x >> 24) as u8;
            c.imr = (x >> 32) as u8 & (x >> 40) as u8;
            c.highest = (x >> 48) as u8 & 7;
            c.special_mask = x & 2 != 0;
            c.special_fully_nested = x & 4 != 0;
            assert_eq!(c.output(), scanned_output(&c), "{c:?}");
        }
    }

    #[test]
    fn output_down_means_no_request_presented() {
        // Random pairs (requests, in service, masks, rotation, modes of both chips, the
        // cascade kept by `update_cascade`): whenever the quick test says the output is down,
        // the resolver presents nothing (the general path's answer).
        let mut x = 0x1319_8a2e_0370_7344u64;
        let mut down = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut p = PicPair::new();
            for (c, y) in [(&mut p.master, x), (&mut p.slave, x.rotate_left(29))] {
                c.irr = (y >> 8) as u8 & (y >> 56) as u8;
                c.isr = (y >> 16) as u8 & (y >> 24) as u8;
                c.imr = (y >> 32) as u8 | (y >> 40) as u8;
                c.highest = (y >> 48) as u8 & 7;
                c.special_mask = y & 2 != 0;
                c.special_fully_nested = y & 4 != 0;
            }
            p.update_cascade();
            if p.output_down() {
                down += 1;
                assert_eq!(p.pending_vector(), None, "{p:?}");
                assert!(!p.has_interrupt(), "{p:?}");
            }
        }
        // Both cases occur.
        assert!(down > 1000 && down < 19_000, "{down}");
    }

    /// Linux's init_8259A: ICW1 0x11, ICW2 base, ICW3 cascade, ICW4 0x01, on both chips.
    fn linux_init(p: &mut PicPair, auto_eoi: bool) {
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        p.write(MASTER_DATA, 0xff);
        p.write(SLAVE_DATA, 0xff);
        p.write(MASTER_CMD, 0x11);
        p.write(MASTER_DATA, 0x30);
        p.write(MASTER_DATA, 1 << CASCADE_IRQ);
        p.write(MASTER_DATA, icw4);
        p.write(SLAVE_CMD, 0x11);
        p.write(SLAVE_DATA, 0x38);
        p.write(SLAVE_DATA, CASCADE_IRQ);
        p.write(SLAVE_DATA, 0x01);
        p.write(MASTER_DATA, 0xfb); // everything masked but the cascade
        p.write(SLAVE_DATA, 0xff);
    }

    fn pulse(p: &mut PicPair, irq: u8) -> Latch {
        let l = p.set_irq(irq, true);
        p.set_irq(irq, false);
        l
    }

    #[test]
    fn reset_state_is_masked_with_bios_bases() {
        let mut p = PicPair::new();
        assert_eq!(p.vector_bases(), (0x08, 0x70));
        assert_eq!(pulse(&mut p, 0), Latch::Masked);
        assert_eq!(p.pending_vector(), None);
        assert_eq!(p.read(MASTER_DATA), 0xff);
    }

    #[test]
    fn init_sequence_sets_bases_and_masks() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        assert_eq!(p.vector_bases(), (0x30, 0x38));
        assert_eq!(p.masks(), (0xfb, 0xff));
        assert_eq!(p.read(MASTER_DATA), 0xfb);
        // OCW1 after init goes to IMR, not to ICW registers.
        p.write(MASTER_DATA, 0xfa);
        assert_eq!(p.masks(), (0xfa, 0xff));
        assert_eq!(p.vector_bases(), (0x30, 0x38));
    }

    #[test]
    fn single_mode_without_icw4_skips_icw3_and_icw4() {
        let mut p = PicPair::new();
        p.write(MASTER_CMD, 0x12); // single, no ICW4
        p.write(MASTER_DATA, 0x40);
        p.write(MASTER_DATA, 0x00); // already OCW1
        assert_eq!(p.masks().0, 0x00);
        assert_eq!(p.vector_bases().0, 0x40);
    }

    #[test]
    fn edge_interrupt_ack_and_eoi() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0xfa); // unmask IRQ0
        assert_eq!(pulse(&mut p, 0), Latch::New);
        assert_eq!(pulse(&mut p, 0), Latch::AlreadyPending);
        assert_eq!(p.pending_vector(), Some(0x30));
        p.write(MASTER_CMD, 0x0a); // OCW3: read IRR
        assert_eq!(p.read(MASTER_CMD), 0x01);
        assert_eq!(p.acknowledge(), 0x30);
        assert_eq!(p.read(MASTER_CMD), 0x00);
        p.write(MASTER_CMD, 0x0b); // OCW3: read ISR
        assert_eq!(p.read(MASTER_CMD), 0x01);
        // In service: a new edge is latched but not presented until EOI.
        pulse(&mut p, 0);
        assert_eq!(p.pending_vector(), None);
        p.write(MASTER_CMD, 0x20); // non-specific EOI
        assert_eq!(p.read(MASTER_CMD), 0x00);
        assert_eq!(p.pending_vector(), Some(0x30));
    }

    #[test]
    fn priority_and_nesting() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0x00);
        pulse(&mut p, 4);
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x33);
        // IRQ4 ranks below IRQ3 in service.
        assert_eq!(p.pending_vector(), None);
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x31, "IRQ1 preempts IRQ3");
        p.write(MASTER_CMD, 0x20); // EOI clears the highest in service: IRQ1
        p.write(MASTER_CMD, 0x0b);
        assert_eq!(p.read(MASTER_CMD), 0x08);
        p.write(MASTER_CMD, 0x63); // specific EOI for IRQ3
        assert_eq!(p.acknowledge(), 0x34);
    }

    #[test]
    fn rotation_and_set_priority() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0x00);
        p.write(MASTER_CMD, 0xc4); // set priority: IRQ4 lowest, so IRQ5 highest
        pulse(&mut p, 3);
        pulse(&mut p, 6);
        assert_eq!(p.acknowledge(), 0x36);
        p.write(MASTER_CMD, 0xa0); // rotate on non-specific EOI: IRQ6 becomes lowest
        assert_eq!(p.acknowledge(), 0x33);
    }

    #[test]
    fn cascade_delivers_slave_vectors() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(SLAVE_DATA, 0xfe); // unmask IRQ8
        pulse(&mut p, 8);
        assert_eq!(p.pending_vector(), Some(0x38));
        assert_eq!(p.acknowledge(), 0x38);
        pulse(&mut p, 8);
        assert_eq!(p.pending_vector(), None, "IR2 in service on the master");
        p.write(SLAVE_CMD, 0x20);
        assert_eq!(p.pending_vector(), None, "master EOI still missing");
        p.write(MASTER_CMD, 0x20);
        assert_eq!(p.acknowledge(), 0x38);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut p = PicPair::new();
        linux_init(&mut p, true);
        p.write(MASTER_DATA, 0xfe);
        pulse(&mut p, 0);
        assert_eq!(p.acknowledge(), 0x30);
        p.write(MASTER_CMD, 0x0b);
        assert_eq!(p.read(MASTER_CMD), 0);
        pulse(&mut p, 0);
        assert_eq!(p.pending_vector(), Some(0x30));
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        assert_eq!(p.acknowledge(), 0x37);
        p.write(MASTER_CMD, 0x0b);
        assert_eq!(p.read(MASTER_CMD), 0, "a spurious IRQ7 sets no ISR bit");
        // A level request that goes away after the master saw the cascade.
        p.write(ELCR_SLAVE, 0x02);
        p.write(SLAVE_DATA, 0xfd);
        p.set_irq(9, true);
        assert_eq!(p.pending_vector(), Some(0x39));
        p.slave.irr = 0; // the request vanishes mid-cycle, leaving IR2 latched
        assert_eq!(p.acknowledge(), 0x3f);
        assert_eq!(p.spurious(), 2);
    }

    #[test]
    fn elcr_level_mode_keeps_request_until_line_drops() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(ELCR_MASTER, 0xff);
        assert_eq!(p.read(ELCR_MASTER), 0xf8, "IRQ0-2 cannot be level");
        p.write(ELCR_SLAVE, 0xff);
        assert_eq!(p.read(ELCR_SLAVE), 0xde, "IRQ8 and IRQ13 cannot be level");
        p.write(MASTER_DATA, 0xf7 & 0xfb); // unmask IRQ3
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), 0x33);
        p.write(MASTER_CMD, 0x20);
        assert_eq!(
            p.pending_vector(),
            Some(0x33),
            "still asserted: requested again"
        );
        p.set_irq(3, false);
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn special_mask_mode_lets_lower_levels_through() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0x00);
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x31);
        pulse(&mut p, 5);
        assert_eq!(p.pending_vector(), None);
        p.write(MASTER_DATA, 0x02); // mask IRQ1 (in service)
        p.write(MASTER_CMD, 0x68); // OCW3: set special mask
        assert_eq!(p.pending_vector(), Some(0x35));
        p.write(MASTER_CMD, 0x48); // reset special mask
        assert_eq!(p.pending_vector(), None);
    }

    #[test]
    fn poll_command_acknowledges() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0x00);
        p.write(MASTER_CMD, 0x0c);
        assert_eq!(p.read(MASTER_CMD), 0x00);
        pulse(&mut p, 6);
        p.write(MASTER_CMD, 0x0c);
        assert_eq!(p.read(MASTER_CMD), 0x86);
        p.write(MASTER_CMD, 0x0b);
        assert_eq!(p.read(MASTER_CMD), 0x40);
    }

    #[test]
    fn icw1_resets_edge_sense() {
        let mut p = PicPair::new();
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0x00);
        p.set_irq(4, true);
        linux_init(&mut p, false);
        p.write(MASTER_DATA, 0x00);
        assert_eq!(p.pending_vector(), None);
        p.set_irq(4, true);
        assert_eq!(p.pending_vector(), None, "no new rising edge");
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.pending_vector(), Some(0x34));
    }
}
