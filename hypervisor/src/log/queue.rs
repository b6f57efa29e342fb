//! Keel's console output queue and who may use how much of it: a pure data structure, tested on
//! the build host. The serial driver (`arch::serial`) only moves bytes from it to COM1.
//!
//! At 115200 baud COM1 sends 11.5 KB a second, far less than a guest can write, so the queue fills.
//! Nothing ever waits for room while guests run (a wait stalled every guest's timer):
//! - a guest's lines go in whole or not at all ([`OutputQueue::write`] returns false): the guest's
//!   own console buffer holds them meanwhile, and when that is full too, the guest is told
//!   (CONSOLE_WRITE returns short) or its surplus is dropped and counted (UART);
//! - guests share all but [`OutputQueue::RESERVE`] bytes, each at most its equal part of that
//!   share (a guest with nothing queued may always queue one line), so one flooding guest neither
//!   delays another's output for long nor crowds it out;
//! - the reserve is Keel's own (errors, warnings, its accounting table): a guest's flood cannot
//!   crowd them out. While guests run Keel keeps to it in turn (`log` waits for room for Keel's
//!   lines), so Keel's own chatter cannot crowd out the guests either. Should Keel's lines find even that full (`log` waits for room for them, so
//!   only a line that could never fit), they are dropped and counted, and the next line that fits
//!   says how many bytes were lost ([`OutputQueue::write_keel`]).

use core::fmt;

/// Who wrote a piece of queued output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// Keel itself: log lines, the accounting table it prints on its own.
    Keel,
    /// The guest with this id: its console lines, and the table it asked for (PRINT_STATS).
    Guest(u32),
}

/// How many guests are accounted separately; guest ids beyond share a slot (id modulo this).
const SLOTS: usize = 64;
/// Stretches of output by one writer that can be queued at once (consecutive writes of the same
/// writer merge into one).
const RUNS: usize = 1024;
/// Stretches kept for Keel's own lines.
const RUNS_RESERVE: usize = 64;

/// A fixed-size byte queue.
pub struct ByteRing<const N: usize> {
    buf: [u8; N],
    head: usize,
    len: usize,
}

impl<const N: usize> ByteRing<N> {
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            head: 0,
            len: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == N
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Appends a byte; false (and nothing stored) when full.
    pub fn push(&mut self, b: u8) -> bool {
        if self.is_full() {
            return false;
        }
        self.buf[(self.head + self.len) % N] = b;
        self.len += 1;
        true
    }

    /// Appends all of `bytes` if they fit; false (and nothing stored) if not.
    pub fn extend(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > N - self.len {
            return false;
        }
        let tail = (self.head + self.len) % N;
        let first = bytes.len().min(N - tail);
        self.buf[tail..tail + first].copy_from_slice(&bytes[..first]);
        self.buf[..bytes.len() - first].copy_from_slice(&bytes[first..]);
        self.len += bytes.len();
        true
    }

    pub fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let b = self.buf[self.head];
        self.head = (self.head + 1) % N;
        self.len -= 1;
        Some(b)
    }
}

impl<const N: usize> Default for ByteRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// A stretch of queued bytes from one writer: 0 is Keel, `slot + 1` a guest.
#[derive(Debug, Clone, Copy)]
struct Run {
    owner: u8,
    len: u32,
}

impl Writer {
    fn owner(self) -> u8 {
        match self {
            Writer::Keel => 0,
            Writer::Guest(id) => (id as usize % SLOTS) as u8 + 1,
        }
    }
}

/// The console output queue: bytes as they go on the wire (each `\n` sent as `\r\n`), with who
/// wrote each stretch so that each guest's share is known.
pub struct OutputQueue<const N: usize> {
    bytes: ByteRing<N>,
    runs: [Run; RUNS],
    runs_head: usize,
    runs_len: usize,
    /// Bytes each guest slot has in the queue.
    held: [usize; SLOTS],
    /// Bytes of Keel's own in the queue.
    keel_held: usize,
    /// Guests sharing the queue (at least 1).
    guests: usize,
    /// Guests run: Keel keeps to its reserve (a line at a time past it when it holds nothing).
    shared: bool,
    /// Bytes of Keel's own lines dropped and not yet reported.
    keel_dropped: u64,
}

impl<const N: usize> OutputQueue<N> {
    /// Kept for Keel's own lines: a quarter of the queue (16 KiB of 64: several accounting tables).
    pub const RESERVE: usize = N / 4;

    pub const fn new() -> Self {
        Self {
            bytes: ByteRing::new(),
            runs: [Run { owner: 0, len: 0 }; RUNS],
            runs_head: 0,
            runs_len: 0,
            held: [0; SLOTS],
            keel_held: 0,
            guests: 1,
            shared: false,
            keel_dropped: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// How many guests run and share the guest part of the queue (each may hold
    /// `(N - RESERVE) / n`); 0: none runs, and Keel may use the whole queue.
    pub fn set_guests(&mut self, n: usize) {
        self.guests = n.max(1);
        self.shared = n > 0;
    }

    /// The most one guest may hold at once.
    pub fn guest_quota(&self) -> usize {
        (N - Self::RESERVE) / self.guests
    }

    /// Bytes held by a guest's writes.
    pub fn held(&self, guest: u32) -> usize {
        self.held[Writer::Guest(guest).owner() as usize - 1]
    }

    /// Bytes of Keel's own output dropped since the last notice.
    pub fn keel_dropped(&self) -> u64 {
        self.keel_dropped
    }

    /// True if `who` may queue `len` more wire bytes now.
    pub fn fits(&self, who: Writer, len: usize) -> bool {
        let free = N - self.bytes.len();
        let merges = self.runs_len > 0 && self.runs[self.tail()].owner == who.owner();
        match who {
            Writer::Keel => {
                let within =
                    !self.shared || self.keel_held == 0 || self.keel_held + len <= Self::RESERVE;
                len <= free && within && (merges || self.runs_len < RUNS)
            }
            Writer::Guest(id) => {
                let held = self.held(id);
                let guests = self.bytes.len() - self.keel_held;
                len <= free
                    && guests + len <= N - Self::RESERVE
                    && (held == 0 || held + len <= self.guest_quota())
                    && (merges || self.runs_len < RUNS - RUNS_RESERVE)
            }
        }
    }

    /// Queues `parts` (one after the other) as `who`'s output if all of it fits, each `\n` as
    /// `\r\n`; false, with nothing queued, if not. Never waits.
    pub fn write(&mut self, who: Writer, parts: &[&[u8]]) -> bool {
        let len = parts.iter().map(|p| wire_len(p)).sum();
        self.write_with(who, len, |w| parts.iter().for_each(|p| w.put(p)))
    }

    /// Like [`write`](Self::write) for text produced by `fill`, which must come to `len` wire bytes
    /// (see [`wire_len`]); anything beyond is cut off.
    pub fn write_with(
        &mut self,
        who: Writer,
        len: usize,
        fill: impl FnOnce(&mut Appender<N>),
    ) -> bool {
        if !self.fits(who, len) {
            return false;
        }
        let mut w = Appender {
            queue: self,
            who,
            left: len,
        };
        fill(&mut w);
        true
    }

    /// Queues one of Keel's own lines (`len` wire bytes from `fill`). When it does not fit, its
    /// bytes are counted as dropped and false is returned; the next line that fits is preceded
    /// by a warning with the count (if the two fit together).
    pub fn write_keel(&mut self, len: usize, fill: impl FnOnce(&mut Appender<N>)) -> bool {
        let need = self.keel_need(len);
        if !self.fits(Writer::Keel, need) {
            self.keel_dropped += len as u64;
            return false;
        }
        let notice = DropNotice(core::mem::take(&mut self.keel_dropped));
        self.write_with(Writer::Keel, need, |w| {
            if notice.0 > 0 {
                let _ = fmt::Write::write_fmt(w, format_args!("{notice}"));
            }
            fill(w)
        })
    }

    /// Room a line of Keel's of `len` wire bytes needs now: with the warning about dropped output
    /// that must precede it, if any is owed.
    pub fn keel_need(&self, len: usize) -> usize {
        match self.keel_dropped {
            0 => len,
            n => len + wire_len_of(format_args!("{}", DropNotice(n))),
        }
    }

    /// The oldest byte, to go to the UART next.
    pub fn pop(&mut self) -> Option<u8> {
        let b = self.bytes.pop()?;
        let run = &mut self.runs[self.runs_head];
        run.len -= 1;
        if run.owner > 0 {
            self.held[run.owner as usize - 1] -= 1;
        } else {
            self.keel_held -= 1;
        }
        if run.len == 0 {
            self.runs_head = (self.runs_head + 1) % RUNS;
            self.runs_len -= 1;
        }
        Some(b)
    }

    /// Index of the newest run (when there is one).
    fn tail(&self) -> usize {
        (self.runs_head + self.runs_len + RUNS - 1) % RUNS
    }

    /// Appends `bytes` of `owner`'s (room was checked by `fits`).
    fn push(&mut self, owner: u8, bytes: &[u8]) {
        if bytes.is_empty() || !self.bytes.extend(bytes) {
            return;
        }
        let tail = self.tail();
        if self.runs_len == 0
            || self.runs[tail].owner != owner
            || self.runs[tail].len as usize + bytes.len() > u32::MAX as usize
        {
            self.runs[(self.runs_head + self.runs_len) % RUNS] = Run { owner, len: 0 };
            self.runs_len += 1;
        }
        let tail = self.tail();
        self.runs[tail].len += bytes.len() as u32;
        if owner > 0 {
            self.held[owner as usize - 1] += bytes.len();
        } else {
            self.keel_held += bytes.len();
        }
    }
}

impl<const N: usize> Default for OutputQueue<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes into the queue (as `fmt::Write` too) up to the length that was checked.
pub struct Appender<'a, const N: usize> {
    queue: &'a mut OutputQueue<N>,
    who: Writer,
    left: usize,
}

impl<const N: usize> Appender<'_, N> {
    pub fn put(&mut self, bytes: &[u8]) {
        let owner = self.who.owner();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                // The newline that ended the previous piece.
                if self.left < 2 {
                    self.left = 0;
                    return;
                }
                self.left -= 2;
                self.queue.push(owner, b"\r\n");
            }
            let n = line.len().min(self.left);
            self.left -= n;
            self.queue.push(owner, &line[..n]);
        }
    }
}

impl<const N: usize> fmt::Write for Appender<'_, N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

/// Bytes `text` takes on the wire: each `\n` goes out as `\r\n`.
pub fn wire_len(text: &[u8]) -> usize {
    text.len() + text.iter().filter(|&&b| b == b'\n').count()
}

/// [`wire_len`] of formatted text, without storing it (it is formatted once to count, once to
/// queue).
pub fn wire_len_of(args: fmt::Arguments) -> usize {
    struct Count(usize);
    impl fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 += wire_len(s.as_bytes());
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = fmt::write(&mut c, args);
    c.0
}

/// The line that reports Keel's own dropped output.
struct DropNotice(u64);

impl fmt::Display for DropNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "keel: warn: ... {} bytes of Keel's output dropped (console full)",
            self.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    type Q = OutputQueue<1024>;

    fn drain(q: &mut Q) -> Vec<u8> {
        core::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn ring_keeps_order_and_refuses_when_full() {
        let mut r: ByteRing<4> = ByteRing::new();
        assert!(r.is_empty() && r.pop().is_none());
        for b in 1..=4 {
            assert!(r.push(b));
        }
        assert!(r.is_full() && !r.push(9));
        assert_eq!(r.pop(), Some(1));
        assert!(r.push(5), "wraps around");
        assert_eq!(
            (r.pop(), r.pop(), r.pop(), r.pop(), r.pop()),
            (Some(2), Some(3), Some(4), Some(5), None)
        );
        // Several at once, across the end of the buffer, or none if they do not all fit.
        assert!(r.extend(&[6, 7, 8]));
        assert!(!r.extend(&[9, 9]));
        assert!(r.extend(&[9]));
        assert_eq!(
            core::iter::from_fn(|| r.pop()).collect::<Vec<_>>(),
            [6, 7, 8, 9]
        );
    }

    #[test]
    fn lines_go_out_with_crlf_in_order() {
        let mut q = Q::new();
        assert!(q.write(Writer::Keel, &[b"keel: a\n"]));
        assert!(q.write(Writer::Guest(0), &[b"[g] ", b"b", b"\n"]));
        assert_eq!(q.len(), 9 + 7);
        assert_eq!(drain(&mut q), b"keel: a\r\n[g] b\r\n");
        assert!(q.is_empty());
        assert_eq!(q.held(0), 0);
    }

    #[test]
    fn a_guest_gets_its_quota_and_no_more_and_nothing_waits() {
        let mut q = Q::new();
        q.set_guests(2);
        // 768 bytes for guests, 384 each.
        assert_eq!(q.guest_quota(), 384);
        let line = [b'x'; 99]; // 101 bytes on the wire with its \r\n
        let mut taken = 0;
        while q.write(Writer::Guest(0), &[&line, b"\n"]) {
            taken += 1;
        }
        assert_eq!(
            (taken, q.held(0), q.len()),
            (3, 303, 303),
            "a fourth line would pass 384"
        );
        // The refused line was refused whole: nothing of it was queued.
        assert!(!q.write(Writer::Guest(0), &[&line, b"\n"]));
        assert_eq!(q.len(), 303);
        // The other guest still has its own part; Keel has the rest and its reserve.
        assert!(q.write(Writer::Guest(1), &[&line, b"\n"]));
        assert_eq!(q.held(1), 101);
        // Sending the first guest's bytes gives it room again.
        for _ in 0..101 {
            q.pop();
        }
        assert_eq!(q.held(0), 202);
        assert!(q.write(Writer::Guest(0), &[&line, b"\n"]));
    }

    #[test]
    fn guests_never_take_keels_reserve() {
        let mut q = Q::new();
        q.set_guests(64);
        // A guest with nothing queued may queue one line past its quota (16 bytes here), but
        // guests together never go past N - RESERVE = 768.
        let line = [b'x'; 126]; // 128 on the wire
        let mut guest = 0;
        while q.write(Writer::Guest(guest), &[&line, b"\n"]) {
            guest += 1;
        }
        assert_eq!((guest, q.len()), (6, 768));
        assert!(!q.write(Writer::Guest(7), &[b"\n"]));
        // Keel's lines still go in, up to the last byte.
        let keel = [b'k'; 254]; // 256 on the wire
        assert!(q.write_keel(256, |w| w.put(&[&keel[..], b"\n"].concat())));
        assert_eq!(q.len(), 1024);
        assert_eq!(q.keel_dropped(), 0);
    }

    /// While guests run, Keel keeps to its reserve: its own flood of lines leaves the guests'
    /// part free (a guest restarted 2000 times made Keel starve the guests' output).
    #[test]
    fn keel_keeps_to_its_reserve_while_guests_run() {
        let mut q = Q::new();
        q.set_guests(2);
        let line = [b'k'; 98]; // 100 bytes on the wire
        let mut keel = 0;
        while q.fits(Writer::Keel, 100) {
            assert!(q.write_keel(100, |w| w.put(&[&line[..], b"\n"].concat())));
            keel += 1;
        }
        assert_eq!(
            (keel, q.len()),
            (2, 200),
            "reserve 256: a third line would pass it"
        );
        // The guests still have their 768.
        let g = [b'g'; 126]; // 128
        for id in 0..2 {
            for _ in 0..3 {
                assert!(q.write(Writer::Guest(id), &[&g, b"\n"]));
            }
        }
        assert_eq!(q.len(), 200 + 768);
        assert!(!q.write(Writer::Guest(1), &[b"x\n"]));
        // Once no guest runs, Keel may use all of it.
        q.set_guests(0);
        assert!(q.write_keel(56, |w| w.put(&[&[b'k'; 54][..], b"\n"].concat())));
        assert_eq!(q.len(), 1024);
    }

    #[test]
    fn keel_lines_that_do_not_fit_are_counted_and_reported() {
        let mut q = Q::new();
        let fill = [b'k'; 1022];
        assert!(q.write_keel(1024, |w| w.put(&[&fill[..], b"\n"].concat())));
        // Full: this line is dropped, not waited for.
        assert!(!q.write_keel(9, |w| w.put(b"keel: a\n")));
        assert!(!q.write_keel(9, |w| w.put(b"keel: b\n")));
        assert_eq!((q.keel_dropped(), q.len()), (18, 1024));
        drain(&mut q);
        assert!(q.write_keel(9, |w| w.put(b"keel: c\n")));
        assert_eq!(q.keel_dropped(), 0);
        assert_eq!(
            core::str::from_utf8(&drain(&mut q)).ok(),
            Some("keel: warn: ... 18 bytes of Keel's output dropped (console full)\r\nkeel: c\r\n")
        );
    }

    #[test]
    fn wire_length_counts_the_carriage_returns() {
        assert_eq!(wire_len(b"a\nb\n"), 6);
        assert_eq!(wire_len_of(format_args!("{}\n", 12)), 4);
    }
}
