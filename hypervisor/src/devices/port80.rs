//! Port 0x80, the POST-code port: guests write to it as an I/O delay (Linux's `outb_p`) and
//! firmware writes progress codes. A read returns the last byte written (as on boards with a POST
//! display latch, and as QEMU does not: it returns 0xff — reading it back is the useful choice for
//! debugging a guest, and no driver depends on either).

use super::{ConsoleBuffer, Device, DeviceContext};
use crate::state::{self, Reader, StateError, Writer};

#[derive(Debug, Default)]
pub struct Port80 {
    last: u8,
    writes: u64,
}

impl Port80 {
    /// The last POST code written.
    pub fn last(&self) -> u8 {
        self.last
    }

    /// How many writes the port has seen (each one a guest I/O delay or POST code).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// An access (`write`: the byte of an `OUT`): the latch and the counter, nothing else.
    /// Returns the byte read (0 for a write).
    fn access(&mut self, write: Option<u8>) -> u8 {
        match write {
            Some(value) => {
                self.last = value;
                self.writes += 1;
                0
            }
            None => self.last,
        }
    }
}

crate::codec_struct!(Port80 { last, writes });

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"P80 ";
const STATE_VERSION: u16 = 1;

impl Device for Port80 {
    fn name(&self) -> &'static str {
        "post-code"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |_| Ok(()))
    }

    fn io_read(&mut self, _port: u16, _size: u8, _cx: &mut DeviceContext<'_>) -> u32 {
        u32::from(self.access(None))
    }

    fn io_write(&mut self, _port: u16, _size: u8, value: u32, _cx: &mut DeviceContext<'_>) {
        self.access(Some(value as u8));
    }

    /// Every access ([`Port80::access`]).
    fn io_quiet(
        &mut self,
        _port: u16,
        write: Option<u8>,
        _console: &mut ConsoleBuffer,
    ) -> Option<u8> {
        Some(self.access(write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    #[test]
    fn reads_back_the_last_write() {
        let mut bench = Bench::default();
        let mut p = Port80::default();
        assert_eq!(p.io_read(0x80, 1, &mut bench.cx(0)), 0);
        p.io_write(0x80, 1, 0x1234, &mut bench.cx(0));
        p.io_write(0x80, 1, 0xab, &mut bench.cx(0));
        assert_eq!(p.io_read(0x80, 1, &mut bench.cx(0)), 0xab);
        assert_eq!((p.last(), p.writes()), (0xab, 2));
    }
}
