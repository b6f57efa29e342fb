//! COM1, Keel's console. Keel's log and every guest's console lines go out here.

use super::cpu;
use crate::log::ByteRing;
use uart_16550::SerialPort;

const THR: u16 = 0x3f8;
const LSR: u16 = 0x3fd;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
/// The 16550's transmit FIFO (enabled by `SerialPort::init`): this many bytes go in at once when
/// THRE says it is empty.
const TX_FIFO: usize = 16;

/// COM1 with an output queue: writers append and return; the bytes leave as the UART takes them,
/// from `pump` (Keel's run loop) or when a writer finds the queue full.
pub struct Com1 {
    _port: SerialPort,
    queue: ByteRing<{ 64 * 1024 }>,
}

fn lsr() -> u8 {
    // SAFETY: reading COM1's line status register has no side effect.
    unsafe { cpu::inb(LSR) }
}

impl Com1 {
    /// Sends up to one FIFO's worth if the transmitter is empty; true if it sent anything.
    fn send_some(&mut self) -> bool {
        if self.queue.is_empty() || lsr() & LSR_THRE == 0 {
            return false;
        }
        for _ in 0..TX_FIFO {
            match self.queue.pop() {
                // SAFETY: THR takes a byte whenever THRE is set (and the FIFO has room).
                Some(b) => unsafe { cpu::outb(THR, b) },
                None => break,
            }
        }
        true
    }

    fn push(&mut self, b: u8) {
        while !self.queue.push(b) {
            // Full: wait for the UART rather than drop Keel's own messages.
            self.send_some();
        }
    }
}

impl crate::log::Sink for Com1 {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.push(b'\r');
            }
            self.push(b);
        }
        self.send_some();
    }

    fn pump(&mut self) {
        self.send_some();
    }

    fn flush(&mut self) {
        while !self.queue.is_empty() {
            self.send_some();
        }
        for _ in 0..1_000_000 {
            if lsr() & LSR_TEMT != 0 {
                return;
            }
        }
    }

    fn busy(&self) -> bool {
        !self.queue.is_empty()
    }
}

/// Waits until COM1 has sent everything, so a shutdown right after does not cut off output.
pub fn drain() {
    crate::log::flush();
}

/// A byte typed on COM1, if one is waiting (LSR bit 0, data ready).
pub fn try_read() -> Option<u8> {
    // SAFETY: reading COM1's line status and receive registers has no side effect beyond taking
    // the received byte, which is what the caller wants.
    unsafe {
        if super::cpu::inb(0x3fd) & 1 != 0 {
            Some(super::cpu::inb(0x3f8))
        } else {
            None
        }
    }
}

/// Brings up COM1 (115200 8N1) and makes it the log sink.
pub fn init() {
    static mut COM1: Option<Com1> = None;
    // SAFETY: 0x3F8 is the standard COM1 base; this runs once, on the boot CPU, before anything
    // else uses the port or the static.
    unsafe {
        let mut port = SerialPort::new(0x3f8);
        port.init();
        let slot = &mut *core::ptr::addr_of_mut!(COM1);
        *slot = Some(Com1 {
            _port: port,
            queue: ByteRing::new(),
        });
        if let Some(c) = slot.as_mut() {
            crate::log::set_sink(c);
        }
    }
}
