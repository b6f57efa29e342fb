//! The guest's console: the bytes it writes to the UART, to port 0xE9 and with CONSOLE_WRITE, cut
//! into lines that Keel prints with the guest's name in front.
//!
//! The buffer holds at most [`CAPACITY`] bytes of complete lines while they wait for room on
//! Keel's COM1 queue (`log::OutputQueue`). When it is full nothing is lost silently: CONSOLE_WRITE
//! takes only what fits and says how much ([`ConsoleBuffer::offer`], a short write); the UART
//! and port 0xE9 cannot refuse a byte, so a line that finds the buffer full is dropped whole and
//! counted, and a [`ConsoleLine::Dropped`] entry takes its place, which Keel prints as
//! `keel: warn: [NAME] ... N bytes dropped`. Once it drops, the buffer goes on dropping UART lines
//! until it is half empty, so that a flood's losses come in a few large notices rather than one per
//! line.
//!
//! The lines are kept in one byte buffer, not one allocation each: this runs on every exit of a
//! guest that prints, and Keel's allocator walks a free list.

use super::{Device, DeviceContext};
use alloc::borrow::Cow;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Longest line kept whole; a longer one is broken into several.
pub const MAX_LINE: usize = 200;
/// Bytes of complete lines (each counted with its newline) held for Keel: two of the largest
/// CONSOLE_WRITE calls.
pub const CAPACITY: usize = 8 * 1024;

/// What the console holds for Keel to print next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleLine<'a> {
    /// A complete line, without its newline.
    Line(&'a [u8]),
    /// This many bytes were dropped here (the buffer was full when their lines ended).
    Dropped(u64),
}

impl<'a> ConsoleLine<'a> {
    /// The text Keel prints after the guest's prefix (invalid UTF-8 shown as U+FFFD).
    pub fn text(self) -> Cow<'a, str> {
        match self {
            ConsoleLine::Line(l) => String::from_utf8_lossy(l),
            ConsoleLine::Dropped(_) => Cow::Owned(alloc::format!("{self}")),
        }
    }
}

impl fmt::Display for ConsoleLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleLine::Line(l) => f.write_str(&String::from_utf8_lossy(l)),
            ConsoleLine::Dropped(n) => write!(f, "... {n} bytes dropped"),
        }
    }
}

/// Collects console bytes and yields complete lines. NUL and CR are dropped, LF ends a line, and
/// a line reaching [`MAX_LINE`] bytes is ended there (before a UTF-8 sequence it would split).
#[derive(Debug, Default)]
pub struct ConsoleBuffer {
    partial: Vec<u8>,
    /// The unfinished line holds bytes CONSOLE_WRITE accepted: it is kept when it ends.
    partial_promised: bool,
    /// Complete lines, each ended by a newline, from `head` on (what is before was printed).
    text: Vec<u8>,
    head: usize,
    /// The length of each line in `text` from `head` on, without its newline.
    lens: VecDeque<u16>,
    /// Lines stored and lines taken so far: they number the lines.
    stored: u64,
    taken: u64,
    /// Where lines were dropped: (number of the line they came before, bytes), oldest first.
    drops: VecDeque<(u64, u64)>,
    /// UART lines are being dropped until the buffer is half empty.
    dropping: bool,
    dropped: u64,
    bytes: u64,
    /// A byte came by [`ConsoleBuffer::push`] since the last [`ConsoleBuffer::take_pushed`]:
    /// the run loop prints the guest's lines after a port access that wrote some.
    pushed: bool,
}

impl ConsoleBuffer {
    /// An empty console with its room allocated up front (growing it would copy it, on an exit).
    pub fn new() -> Self {
        Self {
            text: Vec::with_capacity(CAPACITY + 2 * MAX_LINE),
            partial: Vec::with_capacity(MAX_LINE),
            ..Self::default()
        }
    }

    /// Bytes of complete lines held.
    fn held(&self) -> usize {
        self.text.len() - self.head
    }

    /// One byte from the UART or port 0xE9: always taken; if it ends a line that finds the
    /// buffer full, that line is dropped and counted.
    pub fn push(&mut self, byte: u8) {
        self.bytes += 1;
        self.pushed = true;
        match byte {
            0 | b'\r' => {}
            b'\n' => self.end_line(self.partial.len(), 1),
            _ => {
                self.partial.push(byte);
                if self.partial.len() >= MAX_LINE {
                    self.end_line(utf8_cut(&self.partial), 0);
                }
            }
        }
    }

    /// True if a byte came by [`ConsoleBuffer::push`] (a UART's, port 0xE9's) since the last
    /// call.
    #[inline]
    pub fn take_pushed(&mut self) -> bool {
        if !self.pushed {
            return false;
        }
        self.pushed = false;
        true
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
    }

    /// Bytes from CONSOLE_WRITE: takes the longest start of `bytes` whose lines fit, and returns
    /// its length. What it takes is never dropped.
    pub fn offer(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            // Whole plain lines (no NUL or CR, shorter than MAX_LINE) are stored as they are:
            // this is what CONSOLE_WRITE almost always carries.
            let room = CAPACITY.saturating_sub(self.held());
            let n = self.store_plain_lines(&bytes[i..], room);
            if n > 0 {
                i += n;
                continue;
            }
            // Bytes that end no line are always taken.
            let plain = bytes[i..]
                .iter()
                .take(MAX_LINE - 1 - self.partial.len())
                .take_while(|&&b| !matches!(b, 0 | b'\r' | b'\n'))
                .count();
            if plain > 0 {
                self.partial.extend_from_slice(&bytes[i..i + plain]);
                self.bytes += plain as u64;
                self.partial_promised = true;
                i += plain;
                continue;
            }
            let b = bytes[i];
            // The line this byte ends costs the unfinished line and a newline; one broken at
            // MAX_LINE at most that, this byte and a newline. Other bytes end no line.
            let cost = match b {
                b'\n' => self.partial.len() + 1,
                0 | b'\r' => 0,
                _ if self.partial.len() + 1 >= MAX_LINE => self.partial.len() + 2,
                _ => 0,
            };
            if cost > 0 && self.held() + cost > CAPACITY {
                return i;
            }
            self.partial_promised = true;
            self.push(b);
            i += 1;
        }
        bytes.len()
    }

    /// Stores the complete plain lines at the start of `bytes` (each ended by a newline, with
    /// no NUL or CR, shorter than MAX_LINE with the unfinished line in front of the first), as
    /// many as fit in `room`; returns how many bytes of `bytes` that took.
    fn store_plain_lines(&mut self, bytes: &[u8], room: usize) -> usize {
        let (mut taken, mut used, mut lines) = (0, 0, 0);
        let mut len = self.partial.len();
        for (j, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' => {
                    if used + len + 1 > room {
                        break;
                    }
                    self.lens.push_back(len as u16); // under MAX_LINE
                    used += len + 1;
                    lines += 1;
                    taken = j + 1;
                    len = 0;
                }
                0 | b'\r' => break,
                _ => {
                    len += 1;
                    if len >= MAX_LINE {
                        break;
                    }
                }
            }
        }
        if taken > 0 {
            // The unfinished line was the start of the first line stored.
            self.text.append(&mut self.partial);
            self.text.extend_from_slice(&bytes[..taken]);
            self.stored += lines;
            self.bytes += taken as u64;
            self.partial_promised = false;
        }
        taken
    }

    /// The oldest entry, if any (it stays until [`pop`](Self::pop)).
    pub fn front(&self) -> Option<ConsoleLine<'_>> {
        match self.drops.front() {
            Some(&(before, n)) if before == self.taken => Some(ConsoleLine::Dropped(n)),
            _ => {
                let len = usize::from(*self.lens.front()?);
                Some(ConsoleLine::Line(&self.text[self.head..self.head + len]))
            }
        }
    }

    /// Removes the oldest entry.
    pub fn pop(&mut self) {
        match self.front() {
            Some(ConsoleLine::Dropped(_)) => {
                self.drops.pop_front();
            }
            Some(ConsoleLine::Line(l)) => {
                self.head += l.len() + 1;
                self.lens.pop_front();
                self.taken += 1;
                // Move what is left to the front once it is the smaller part: each byte moves
                // at most about once.
                if self.head >= self.text.len() / 2 {
                    self.text.drain(..self.head);
                    self.head = 0;
                }
            }
            None => {}
        }
    }

    /// The oldest entry as text (a drop as `... N bytes dropped`).
    pub fn take_line(&mut self) -> Option<String> {
        let text = self.front()?.text().into_owned();
        self.pop();
        Some(text)
    }

    /// What is left of an unfinished line (for the end of a run), if anything.
    pub fn take_partial(&mut self) -> Option<String> {
        self.partial_promised = false;
        if self.partial.is_empty() {
            return None;
        }
        let bytes = core::mem::take(&mut self.partial);
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Ends the unfinished line, if any, as a last complete line (the guest stopped), whatever
    /// room is left.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            self.partial_promised = true;
            self.end_line(self.partial.len(), 0);
        }
    }

    /// Bytes lost because the buffer was full (lines from the UART or port 0xE9).
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// Bytes written to the console so far (including the dropped NULs and CRs, and the bytes
    /// counted in [`dropped_bytes`](Self::dropped_bytes)).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Ends the current line after its first `len` bytes (the rest starts the next line);
    /// `newline` is 1 when a newline byte ended it. A line that finds the buffer full (or still
    /// more than half full after a drop) is dropped, unless CONSOLE_WRITE promised it.
    fn end_line(&mut self, len: usize, newline: u64) {
        let promised = core::mem::replace(&mut self.partial_promised, false);
        let held = self.held();
        if self.dropping && held <= CAPACITY / 2 {
            self.dropping = false;
        }
        if !promised && (self.dropping || held + len + 1 > CAPACITY) {
            self.dropping = true;
            let lost = len as u64 + newline;
            self.dropped += lost;
            match self.drops.back_mut() {
                Some((before, n)) if *before == self.stored => *n += lost,
                _ => self.drops.push_back((self.stored, lost)),
            }
            self.partial.drain(..len);
            return;
        }
        self.text.extend_from_slice(&self.partial[..len]);
        self.text.push(b'\n');
        self.lens.push_back(len as u16); // at most MAX_LINE
        self.partial.drain(..len);
        self.stored += 1;
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

    fn save(&self, w: &mut crate::state::Writer) {
        crate::state::save_empty(w, *b"DCON");
    }

    fn restore(
        &mut self,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<(), crate::state::StateError> {
        crate::state::restore_empty(r, *b"DCON")
    }

    fn io_read(&mut self, _port: u16, _size: u8, _cx: &mut DeviceContext<'_>) -> u32 {
        0xe9
    }

    fn io_write(&mut self, _port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        cx.console().push(value as u8);
    }

    /// Every access: a byte to the console, or the port's fixed answer.
    fn io_quiet(
        &mut self,
        _port: u16,
        write: Option<u8>,
        console: &mut ConsoleBuffer,
    ) -> Option<u8> {
        match write {
            Some(byte) => {
                console.push(byte);
                Some(0)
            }
            None => Some(0xe9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

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

    /// Lines from the UART that find the buffer full are dropped whole, counted, and marked
    /// where they were (before: the oldest lines went, silently).
    #[test]
    fn a_full_buffer_drops_new_uart_lines_and_counts_them() {
        let mut c = ConsoleBuffer::new();
        let line = [b'x'; 63]; // 64 bytes with the newline: 128 of them fill the buffer
        for _ in 0..CAPACITY / 64 {
            c.write(&line);
            c.push(b'\n');
        }
        assert_eq!(c.dropped_bytes(), 0);
        c.write(b"lost 1\nlost 2\n");
        assert_eq!(c.dropped_bytes(), 14);
        // Once dropping, it drops until half empty: one line printed is not enough.
        assert_eq!(c.take_line().map(|l| l.len()), Some(63));
        c.write(b"lost 3\n");
        c.write(&[b'y'; 250]); // a 200-byte break (no newline of the guest's) and 50 left over
        assert_eq!(c.dropped_bytes(), 14 + 7 + 200);
        assert_eq!(c.bytes_written(), (CAPACITY + 14 + 7 + 250) as u64);
        for _ in 1..CAPACITY / 64 {
            assert_eq!(c.take_line().map(|l| l.len()), Some(63));
        }
        assert_eq!(c.front(), Some(ConsoleLine::Dropped(221)));
        assert_eq!(c.take_line().as_deref(), Some("... 221 bytes dropped"));
        // Room again: the rest of the line goes in.
        c.push(b'\n');
        assert_eq!(c.take_line().map(|l| l.len()), Some(50));
        assert_eq!(c.take_line(), None);
    }

    /// CONSOLE_WRITE takes what fits and never loses it, not even to a later UART byte.
    #[test]
    fn offer_takes_what_fits() {
        let mut c = ConsoleBuffer::new();
        let lines: Vec<u8> = b"abc\n".repeat(CAPACITY / 4 + 10);
        let taken = c.offer(&lines);
        // The lines that fit whole, and the start of the next one.
        assert_eq!(taken, CAPACITY + 3);
        assert_eq!(c.offer(&lines[taken..]), 0);
        // The UART ends the promised line: it is kept although the buffer is full.
        c.push(b'\n');
        assert_eq!(c.dropped_bytes(), 0);
        let mut out = 0;
        while let Some(l) = c.take_line() {
            assert_eq!(l, "abc");
            out += 4;
        }
        assert_eq!(out, taken + 1);
        assert_eq!(c.offer(&lines), CAPACITY + 3);
    }

    /// CONSOLE_WRITE's fast path for whole plain lines cuts lines exactly as the UART's byte
    /// path does.
    #[test]
    fn offer_and_push_make_the_same_lines() {
        let long = [b'L'; 450];
        let inputs: [&[u8]; 5] = [
            b"one\ntwo\n\nthree",
            b"cr\r\nnul\0byte\n",
            &long,
            "x€y\n".as_bytes(),
            b"\n\n",
        ];
        let (mut a, mut b) = (ConsoleBuffer::new(), ConsoleBuffer::new());
        for input in inputs {
            assert_eq!(a.offer(input), input.len());
            b.write(input);
        }
        assert_eq!(a.bytes_written(), b.bytes_written());
        loop {
            let (la, lb) = (a.take_line(), b.take_line());
            assert_eq!(la, lb);
            if la.is_none() {
                break;
            }
        }
        assert_eq!(a.take_partial(), b.take_partial());
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
