//! The guest's console: the bytes it writes to the UART and to port 0xE9, cut into lines that Keel
//! prints with the guest's name in front.

use super::{Device, DeviceContext};
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

/// Longest line kept whole; a longer one is broken into several.
pub const MAX_LINE: usize = 200;
/// Complete lines held before the oldest are dropped (if Keel does not drain the buffer).
pub const MAX_QUEUED_LINES: usize = 256;

/// Collects console bytes and yields complete lines. NUL and CR are dropped, LF ends a line, and
/// a line reaching [`MAX_LINE`] bytes is ended there (before a UTF-8 sequence it would split).
#[derive(Debug, Default)]
pub struct ConsoleBuffer {
    partial: Vec<u8>,
    lines: VecDeque<String>,
    dropped_lines: u64,
    bytes: u64,
}

impl ConsoleBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, byte: u8) {
        self.bytes += 1;
        match byte {
            0 | b'\r' => {}
            b'\n' => self.end_line(self.partial.len()),
            _ => {
                self.partial.push(byte);
                if self.partial.len() >= MAX_LINE {
                    self.end_line(utf8_cut(&self.partial));
                }
            }
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
    }

    /// The oldest complete line, without its newline.
    pub fn take_line(&mut self) -> Option<String> {
        self.lines.pop_front()
    }

    /// What is left of an unfinished line (for the end of a run), if anything.
    pub fn take_partial(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let bytes = core::mem::take(&mut self.partial);
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Lines lost because the queue was full.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    /// Bytes written to the console so far (including the dropped NULs and CRs).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Ends the current line after its first `len` bytes; the rest starts the next line.
    fn end_line(&mut self, len: usize) {
        let rest = self.partial.split_off(len);
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial = rest;
        if self.lines.len() >= MAX_QUEUED_LINES {
            self.lines.pop_front();
            self.dropped_lines += 1;
        }
        self.lines.push_back(line);
    }
}

/// Where to break a full line: its length, or the start of a UTF-8 sequence left unfinished at
/// its end (so that a multi-byte character moves whole to the next line).
fn utf8_cut(line: &[u8]) -> usize {
    let tail = line.len().saturating_sub(3);
    for i in (tail..line.len()).rev() {
        let b = line[i];
        if b & 0xc0 == 0x80 {
            continue; // a continuation byte: keep looking for the lead byte
        }
        let need = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        let cut = if line.len() - i < need { i } else { line.len() };
        return if cut == 0 { line.len() } else { cut };
    }
    line.len()
}

/// The Bochs/QEMU debug console at port 0xE9: every byte written goes to the console; a read
/// returns 0xE9, which is how guests detect the port.
#[derive(Debug, Default)]
pub struct DebugConsole;

impl Device for DebugConsole {
    fn name(&self) -> &'static str {
        "debugcon"
    }

    fn io_read(&mut self, _port: u16, _size: u8, _cx: &mut DeviceContext<'_>) -> u32 {
        0xe9
    }

    fn io_write(&mut self, _port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        cx.console().push(value as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;
    use alloc::string::ToString;

    #[test]
    fn lines_drop_nul_and_cr() {
        let mut c = ConsoleBuffer::new();
        c.write(b"hello\r\n\0wor");
        assert_eq!(c.take_line().as_deref(), Some("hello"));
        assert_eq!(c.take_line(), None);
        c.write(b"ld\n\n");
        assert_eq!(c.take_line().as_deref(), Some("world"));
        assert_eq!(c.take_line().as_deref(), Some(""));
        assert_eq!(c.take_partial(), None);
        c.write(b"end");
        assert_eq!(c.take_partial().as_deref(), Some("end"));
        assert_eq!(c.take_partial(), None);
        assert_eq!(c.bytes_written(), 18);
    }

    #[test]
    fn long_lines_are_broken_at_200_bytes() {
        let mut c = ConsoleBuffer::new();
        c.write(&[b'a'; 450]);
        c.push(b'\n');
        assert_eq!(c.take_line().map(|l| l.len()), Some(200));
        assert_eq!(c.take_line().map(|l| l.len()), Some(200));
        assert_eq!(c.take_line().map(|l| l.len()), Some(50));
        assert_eq!(c.take_line(), None);
    }

    #[test]
    fn a_break_never_splits_a_utf8_character() {
        let mut c = ConsoleBuffer::new();
        c.write(&[b'x'; 198]);
        c.write("é€".as_bytes()); // 2 + 3 bytes: é fits (200), € moves on
        c.push(b'\n');
        let first = c.take_line().unwrap_or_default();
        assert_eq!(first.len(), 200);
        assert!(first.ends_with('é'));
        assert_eq!(c.take_line().as_deref(), Some("€"));

        let mut c = ConsoleBuffer::new();
        c.write(&[b'x'; 199]);
        c.write("€".as_bytes());
        assert_eq!(c.take_line().map(|l| l.len()), Some(199));
        assert_eq!(c.take_partial().as_deref(), Some("€"));
    }

    #[test]
    fn full_queue_drops_the_oldest_line() {
        let mut c = ConsoleBuffer::new();
        for i in 0..MAX_QUEUED_LINES + 2 {
            c.write(i.to_string().as_bytes());
            c.push(b'\n');
        }
        assert_eq!(c.dropped_lines(), 2);
        assert_eq!(c.take_line().as_deref(), Some("2"));
    }

    #[test]
    fn debug_console_writes_bytes() {
        let mut bench = Bench::default();
        let mut d = DebugConsole;
        for b in b"hi\n" {
            d.io_write(0xe9, 1, u32::from(*b), &mut bench.cx(0));
        }
        assert_eq!(d.io_read(0xe9, 1, &mut bench.cx(0)), 0xe9);
        assert_eq!(bench.console.take_line().as_deref(), Some("hi"));
    }
}
