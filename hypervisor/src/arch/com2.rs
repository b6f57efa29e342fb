//! COM2 (0x2F8), Keel's control channel: a polled 16550, 115200 8N1, no interrupts. Keel owns it;
//! guests never reach it (every guest I/O port access exits, and no guest device sits at 0x2F8).
//! The line protocol on top is the run loop's (`runloop::RunLoop::poll_control`), its flow control
//! `credit`'s.
//!
//! Registers and bits: the 16550D datasheet (RBR/THR at +0, IER +1, FCR +2, LCR +3, MCR +4,
//! LSR +5, SCR +7; DLL/DLM at +0/+1 while LCR.DLAB is set).

use super::cpu;
use alloc::collections::VecDeque;

const BASE: u16 = 0x2f8;
const DATA: u16 = BASE;
const IER: u16 = BASE + 1;
const FCR: u16 = BASE + 2;
const LCR: u16 = BASE + 3;
const MCR: u16 = BASE + 4;
const LSR: u16 = BASE + 5;
const SCR: u16 = BASE + 7;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;
/// Bytes the transmit FIFO takes when THRE says it is empty.
const TX_FIFO: usize = 16;
/// Bytes read per poll at most: a flood on the line cannot hold the run loop.
const READ_BURST: usize = 64;

/// COM2, once [`Com2::probe`] found it.
pub struct Com2 {
    pending: usize,
}

impl Com2 {
    /// Brings COM2 up, or `None` when there is no UART at 0x2F8 (its scratch register does not
    /// keep a value: an absent port reads 0xFF, which would look like endless input).
    pub fn probe() -> Option<Self> {
        // SAFETY: port I/O on COM2's registers, which Keel alone uses; the writes configure the
        // UART (or go nowhere when there is none).
        unsafe {
            for v in [0x5a, 0xa5] {
                cpu::outb(SCR, v);
                if cpu::inb(SCR) != v {
                    return None;
                }
            }
            cpu::outb(IER, 0x00);
            cpu::outb(LCR, 0x80);
            cpu::outb(DATA, 0x01); // divisor 1: 115200 baud
            cpu::outb(IER, 0x00);
            cpu::outb(LCR, 0x03); // 8N1
            cpu::outb(FCR, 0xc7); // FIFOs on and cleared
            cpu::outb(MCR, 0x03); // DTR, RTS
                                  // Whatever arrived before Keel listened is no command.
            for _ in 0..READ_BURST {
                if cpu::inb(LSR) & LSR_DATA_READY == 0 {
                    break;
                }
                cpu::inb(DATA);
            }
        }
        Some(Self { pending: 0 })
    }

    /// A received byte, if one is waiting (at most [`READ_BURST`] in a row, then `None` once).
    pub fn read(&mut self) -> Option<u8> {
        if self.pending >= READ_BURST {
            self.pending = 0;
            return None;
        }
        // SAFETY: reading LSR has no side effect; reading RBR takes the byte LSR announced.
        let byte = unsafe {
            if cpu::inb(LSR) & LSR_DATA_READY == 0 {
                None
            } else {
                Some(cpu::inb(DATA))
            }
        };
        match byte {
            Some(_) => self.pending += 1,
            None => self.pending = 0,
        }
        byte
    }

    /// Moves a FIFO's worth of `out` to the transmitter when it is empty; never waits.
    pub fn send(&mut self, out: &mut VecDeque<u8>) {
        // SAFETY: THR takes up to a FIFO's worth of bytes whenever THRE is set.
        unsafe {
            if cpu::inb(LSR) & LSR_THRE == 0 {
                return;
            }
            for _ in 0..TX_FIFO {
                match out.pop_front() {
                    Some(b) => cpu::outb(DATA, b),
                    None => return,
                }
            }
        }
    }
}
