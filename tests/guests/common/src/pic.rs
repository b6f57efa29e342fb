//! The two 8259A interrupt controllers, remapped to vectors 0x20-0x2f (8259A datasheet: ICW1-ICW4
//! initialisation sequence; OCW1 masks, OCW2 non-specific EOI).

use crate::cpu::outb;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;
/// Vector of IRQ0.
pub const BASE_VECTOR: u8 = 0x20;
const EOI: u8 = 0x20;

/// ICW1-4 on both chips: edge triggered, cascaded (slave on IRQ2), 8086 mode; everything masked.
pub fn init() {
    outb(MASTER_CMD, 0x11); // ICW1: init, ICW4 follows
    outb(SLAVE_CMD, 0x11);
    outb(MASTER_DATA, BASE_VECTOR); // ICW2: vector base
    outb(SLAVE_DATA, BASE_VECTOR + 8);
    outb(MASTER_DATA, 0x04); // ICW3: slave on IRQ2
    outb(SLAVE_DATA, 0x02); // ICW3: slave identity 2
    outb(MASTER_DATA, 0x01); // ICW4: 8086 mode
    outb(SLAVE_DATA, 0x01);
    mask_all();
}

/// OCW1: only the IRQs whose bits are set in `enabled` (0-7, master) pass; the slave stays masked.
pub fn enable_only(enabled: u8) {
    outb(MASTER_DATA, !enabled);
    outb(SLAVE_DATA, 0xff);
}

pub fn mask_all() {
    enable_only(0);
}

/// Non-specific EOI for `irq`.
pub fn eoi(irq: u8) {
    if irq >= 8 {
        outb(SLAVE_CMD, EOI);
    }
    outb(MASTER_CMD, EOI);
}
