//! The 16550 UART at COM1 (0x3F8), programmed for 115200 8N1 and driven by polling.

use crate::cpu::{inb, outb};
use core::sync::atomic::{AtomicU64, Ordering};

const COM1: u16 = 0x3f8;
/// Register offsets from the base port.
const DATA: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
/// LSR bit 5: the transmit holding register is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Divisor 1 (115200 baud), 8 data bits, no parity, 1 stop bit, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + IER, 0x00);
    outb(COM1 + LCR, 0x80); // DLAB: the next two writes set the divisor
    outb(COM1 + DATA, 0x01);
    outb(COM1 + IER, 0x00);
    outb(COM1 + LCR, 0x03);
    outb(COM1 + FCR, 0xc7);
    outb(COM1 + MCR, 0x03);
}

/// Bytes written to THR since boot (the flood guest accounts for every byte it sent).
static SENT: AtomicU64 = AtomicU64::new(0);

/// How many bytes [`write_byte`] has sent so far.
pub fn bytes_sent() -> u64 {
    SENT.load(Ordering::Relaxed)
}

pub fn write_byte(b: u8) {
    SENT.fetch_add(1, Ordering::Relaxed);
    while inb(COM1 + LSR) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(COM1 + DATA, b);
}

pub fn write(bytes: &[u8]) {
    bytes.iter().copied().for_each(write_byte);
}
