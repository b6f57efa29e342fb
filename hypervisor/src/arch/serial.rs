//! COM1, Keel's console. Keel's log and every guest's console lines go out here; what waits to be
//! sent (and the policy of who may queue how much) is `log::OutputQueue`, this is only the device.

use super::cpu;
use uart_16550::SerialPort;

const THR: u16 = 0x3f8;
const LSR: u16 = 0x3fd;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
/// The 16550's transmit FIFO (enabled by `SerialPort::init`): this many bytes go in at once when
/// THRE says it is empty.
const TX_FIFO: usize = 16;

pub struct Com1 {
    _port: SerialPort,
}

fn lsr() -> u8 {
    // SAFETY: reading COM1's line status register has no side effect.
    unsafe { cpu::inb(LSR) }
}

impl crate::log::Sink for Com1 {
    fn ready(&self) -> usize {
        if lsr() & LSR_THRE != 0 {
            TX_FIFO
        } else {
            0
        }
    }

    fn send(&mut self, byte: u8) {
        // SAFETY: THR takes a byte whenever THRE was set and the FIFO has room (`ready`).
        unsafe { cpu::outb(THR, byte) }
    }

    fn settle(&mut self) {
        wait_until_sent();
    }
}

/// Waits (boundedly) until the transmitter is empty: every byte written has gone out.
fn wait_until_sent() {
    for _ in 0..1_000_000 {
        if lsr() & LSR_TEMT != 0 {
            return;
        }
    }
}

/// Waits until COM1 has sent everything, so a shutdown right after does not cut off output.
pub fn drain() {
    crate::log::flush();
}

/// COM1's receiver, read by the run loop's holder at each turn ([`try_read`]) and by the CPUs
/// waiting for the loop's lock ([`stash_keys`]), one CPU at a time, the loop first; the keys the
/// waiters read wait in its stash. The logger writes THR meanwhile: a different register, and
/// each port access is one bus cycle; LCR is written only by [`init`], before any other CPU runs.
static KEYS: crate::focus::KeyReader<256> = crate::focus::KeyReader::new();

/// The byte in COM1's receiver, if one is waiting (LSR bit 0, data ready).
fn receive() -> Option<u8> {
    if lsr() & LSR_DATA_READY == 0 {
        return None;
    }
    // SAFETY: reading the receive register takes the received byte, which is what the caller
    // wants; it has no other effect.
    Some(unsafe { cpu::inb(THR) })
}

/// A byte typed on COM1, if one is waiting: those stashed first, then the UART's, in the order
/// typed. For the run loop's holder: the waiters leave the UART to it (`focus::KeyReader`).
pub fn try_read() -> Option<u8> {
    KEYS.read(receive)
}

/// A byte typed on COM1, if one is waiting, for a run loop on one CPU: no other CPU reads COM1
/// or stashes its keys ([`stash_keys`] runs only on CPUs waiting for the loop's lock).
pub fn read_alone() -> Option<u8> {
    receive()
}

/// Moves what waits in COM1's receive FIFO into the stash, unless the loop reads COM1 or another
/// CPU does now: for a CPU waiting for the run loop's lock, so the 16-byte FIFO does not overflow
/// while another CPU holds the lock (1.4 ms at 115200 baud).
pub fn stash_keys() {
    KEYS.stash(receive);
}

/// Brings up COM1 (115200 8N1) and makes it the log sink.
pub fn init() {
    static mut COM1: Option<Com1> = None;
    // SAFETY: 0x3F8 is the standard COM1 base; this runs once, on the boot CPU, before anything
    // else uses the port or the static.
    unsafe {
        // The bootloader's last byte (its final newline) may still be in the transmitter, and
        // `init` clears the FIFO: let it go out first, or Keel's first line joins that line.
        wait_until_sent();
        let mut port = SerialPort::new(0x3f8);
        port.init();
        let slot = &mut *core::ptr::addr_of_mut!(COM1);
        *slot = Some(Com1 { _port: port });
        if let Some(c) = slot.as_mut() {
            crate::log::set_sink(c);
        }
    }
}
