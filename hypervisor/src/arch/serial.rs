//! COM1, Keel's console. Keel's log and every guest's console lines go out here.

use uart_16550::SerialPort;

pub struct Com1(SerialPort);

impl crate::log::Sink for Com1 {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.0.send(b'\r');
            }
            self.0.send(b);
        }
    }
}

/// Waits until COM1 has sent everything (LSR bit 6, transmitter empty), so a shutdown right after
/// does not cut off the last byte.
pub fn drain() {
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effect.
        if unsafe { super::cpu::inb(0x3fd) } & 0x40 != 0 {
            return;
        }
    }
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
        *slot = Some(Com1(port));
        if let Some(c) = slot.as_mut() {
            crate::log::set_sink(c);
        }
    }
}
