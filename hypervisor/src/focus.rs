//! Keel's console keyboard: which guest gets the bytes typed on COM1 (the focus), and the escape
//! key that reaches Keel itself. docs/BOOTING.md "Keel's console keys" is the user's table; this is
//! its one implementation, a plain state machine so the host tests can drive it.
//!
//! Every byte goes to the focused guest's 16550 receiver, except Ctrl-A ([`ESCAPE`]), which makes
//! the next byte a command for Keel:
//!
//! | after Ctrl-A  | does                                                         |
//! |---------------|--------------------------------------------------------------|
//! | `1`..`9`      | focus guest 1..9 (manifest order)                            |
//! | `n`           | focus the next guest still running (wraps around)            |
//! | `s`           | Keel's statistics table                                      |
//! | `p` / `r`     | pause / resume every guest                                   |
//! | `c`           | Keel's monitor (`keel>` prompt)                              |
//! | Ctrl-A        | a literal Ctrl-A for the focused guest                       |
//! | anything else | ignored                                                      |
//!
//! The focus starts on the first guest (every Keel guest has a 16550 at COM1). Keel prints
//! `keel: input goes to NAME` when it moves; bytes typed for a guest that has stopped are dropped.

use alloc::collections::VecDeque;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Ctrl-A: the next byte is for Keel.
pub const ESCAPE: u8 = 0x01;

/// What one typed byte asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// A byte for the focused guest (index).
    Guest(usize, u8),
    /// The focus moved to this guest.
    Focus(usize),
    Stats,
    Pause,
    Resume,
    Monitor,
    /// Nothing to do (the escape itself, an unknown command, a focus that did not change).
    None,
}

/// Bytes typed for one guest beyond what its receive FIFO takes now: the keyboard is faster than
/// a guest that is not running, and a real line would lose them (overrun, LSR.OE), so Keel holds
/// them until the FIFO has room, as a terminal with flow control would.
pub const PENDING_MAX: usize = 4096;

#[derive(Debug)]
pub struct Focus {
    guests: usize,
    current: usize,
    escaped: bool,
    /// Bytes for `current` that its receiver has not taken yet.
    pending: VecDeque<u8>,
    /// Bytes dropped because `pending` was full or the guest had stopped.
    pub dropped: u64,
}

impl Focus {
    /// The focus for `guests` guests, on the first.
    pub fn new(guests: usize) -> Self {
        Focus {
            guests,
            current: 0,
            escaped: false,
            pending: VecDeque::new(),
            dropped: 0,
        }
    }

    /// The guest that gets the keyboard.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Decodes one byte from COM1. `running(i)` says whether guest `i` can still take input
    /// (`n` skips the others). Bytes for the guest are queued: take them with
    /// [`Focus::deliver`].
    pub fn key(&mut self, byte: u8, running: impl Fn(usize) -> bool) -> Key {
        if !self.escaped {
            if byte == ESCAPE {
                self.escaped = true;
                return Key::None;
            }
            return self.typed(byte);
        }
        self.escaped = false;
        self.command(byte, running)
    }

    /// A byte typed for the focused guest (queued: take them with [`Focus::deliver`]). With
    /// `monitor::Prompt` in front of this (it owns the escape there), its `PromptKey::Pass`
    /// bytes come here and its `PromptKey::Prefixed` ones to [`Focus::command`].
    pub fn typed(&mut self, byte: u8) -> Key {
        self.for_guest(byte)
    }

    /// The key typed after Ctrl-A (see the table above).
    pub fn command(&mut self, byte: u8, running: impl Fn(usize) -> bool) -> Key {
        match byte {
            ESCAPE => self.for_guest(ESCAPE),
            b'1'..=b'9' => self.move_to(usize::from(byte - b'1')),
            b'n' => {
                let next = (1..=self.guests)
                    .map(|k| (self.current + k) % self.guests.max(1))
                    .find(|&i| running(i));
                match next {
                    Some(i) => self.move_to(i),
                    None => Key::None,
                }
            }
            b's' => Key::Stats,
            b'p' => Key::Pause,
            b'r' => Key::Resume,
            b'c' => Key::Monitor,
            _ => Key::None,
        }
    }

    fn for_guest(&mut self, byte: u8) -> Key {
        if self.pending.len() >= PENDING_MAX {
            self.dropped += 1;
            return Key::None;
        }
        self.pending.push_back(byte);
        Key::Guest(self.current, byte)
    }

    /// Gives the keyboard to guest `i` (Ctrl-A digit, the monitor's `console NAME`).
    pub fn move_to(&mut self, i: usize) -> Key {
        if i >= self.guests || i == self.current {
            return Key::None;
        }
        self.current = i;
        // What was typed for the guest before is not for the new one.
        self.dropped += self.pending.len() as u64;
        self.pending.clear();
        Key::Focus(i)
    }

    /// Hands the pending bytes to the focused guest's receiver: `offer(byte)` is false when the
    /// receiver has no room (the byte stays pending). A guest that has stopped (`running` false)
    /// loses them.
    pub fn deliver(&mut self, running: bool, mut offer: impl FnMut(u8) -> bool) {
        if !running {
            self.dropped += self.pending.len() as u64;
            self.pending.clear();
            return;
        }
        while let Some(&b) = self.pending.front() {
            if !offer(b) {
                return;
            }
            self.pending.pop_front();
        }
    }

    /// Bytes waiting for the focused guest's FIFO.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The bytes waiting for the focused guest, oldest first.
    #[cfg(test)]
    pub fn pending_bytes(&self) -> alloc::vec::Vec<u8> {
        self.pending.iter().copied().collect()
    }
}

/// Keys read from COM1 ahead of the run loop (by a CPU waiting for its lock, `ticket`), oldest
/// first: the loop takes these before reading the UART again, so the order typed is kept.
pub type KeyStash<const N: usize> = crate::log::ByteRing<N>;

/// Fills `stash` from `read` (COM1's receiver) until it is full or `read` has nothing: when full
/// it takes no more, and the UART's FIFO holds the rest.
pub fn stash_keys<const N: usize>(stash: &mut KeyStash<N>, mut read: impl FnMut() -> Option<u8>) {
    while !stash.is_full() {
        match read() {
            Some(b) => {
                stash.push(b);
            }
            None => return,
        }
    }
}

/// COM1's receiver as two kinds of CPU read it: the run loop's holder ([`KeyReader::read`], at
/// each turn) and the CPUs waiting for the loop's lock ([`KeyReader::stash`], while they wait).
/// One CPU at a time reads the UART (the stash's lock), so no byte is read twice or out of order.
///
/// The loop goes first: while it wants to read, no waiter starts a read, so it waits at most for
/// the reads already started, one per waiting CPU. A plain lock for both would let the waiters,
/// which read in a tight loop, take it in turns forever: the holder never reads, never lets go of
/// the loop's lock, and the waiters wait for that lock for ever (4-CPU boots in Bochs hung so).
pub struct KeyReader<const N: usize> {
    stash: spin::Mutex<KeyStash<N>>,
    /// How many CPUs want to read for the loop now ([`Want`]).
    wanted: AtomicUsize,
}

impl<const N: usize> KeyReader<N> {
    pub const fn new() -> Self {
        Self {
            stash: spin::Mutex::new(KeyStash::new()),
            wanted: AtomicUsize::new(0),
        }
    }

    /// The loop's read: a key stashed, else the UART's (`uart`), in the order typed.
    pub fn read(&self, mut uart: impl FnMut() -> Option<u8>) -> Option<u8> {
        let want = self.want();
        loop {
            if let Some(key) = want.try_read(&mut uart) {
                return key;
            }
            core::hint::spin_loop();
        }
    }

    /// The loop's wish to read, for as long as the token lives: no waiter starts a read
    /// meanwhile.
    pub fn want(&self) -> Want<'_, N> {
        // SeqCst, with the load in `stash`: a waiter that looks after this sees it. One that
        // looked before may still start a read, once.
        self.wanted.fetch_add(1, Ordering::SeqCst);
        Want { reader: self }
    }

    /// A waiting CPU's read: what `uart` has goes to the stash, unless the loop wants to read or
    /// another CPU reads the UART now.
    pub fn stash(&self, uart: impl FnMut() -> Option<u8>) {
        if self.wanted.load(Ordering::SeqCst) != 0 {
            return;
        }
        if let Some(mut stash) = self.stash.try_lock() {
            stash_keys(&mut stash, uart);
        }
    }
}

impl<const N: usize> Default for KeyReader<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// The run loop's wish to read COM1 ([`KeyReader::want`]).
pub struct Want<'a, const N: usize> {
    reader: &'a KeyReader<N>,
}

impl<const N: usize> Drop for Want<'_, N> {
    fn drop(&mut self) {
        self.reader.wanted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<const N: usize> Want<'_, N> {
    /// One try: `Some(key)` (the key may be `None`: nothing typed) if no other CPU reads the
    /// UART now, `None` if one does.
    pub fn try_read(&self, uart: impl FnMut() -> Option<u8>) -> Option<Option<u8>> {
        let mut stash = self.reader.stash.try_lock()?;
        Some(stash.pop().or_else(uart))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn the_stash_keeps_keys_in_order_and_leaves_what_does_not_fit_in_the_uart() {
        let mut uart: VecDeque<u8> = (0..10).collect();
        let mut stash = KeyStash::<4>::new();
        stash_keys(&mut stash, || uart.pop_front());
        assert!(stash.is_full());
        assert_eq!(uart.len(), 6, "read past the stash's room");
        assert_eq!((stash.pop(), stash.pop()), (Some(0), Some(1)));
        stash_keys(&mut stash, || uart.pop_front());
        let mut out = Vec::new();
        // The loop's read: the stash first, then the UART.
        while let Some(b) = stash.pop().or_else(|| uart.pop_front()) {
            out.push(b);
        }
        assert_eq!(out, (2..10).collect::<Vec<u8>>());
        assert!(!stash.push(0) || stash.pop() == Some(0));
    }

    #[test]
    fn the_loops_read_gets_the_uart_as_soon_as_the_waiter_reading_it_is_done() {
        // What hung 4-CPU boots in Bochs: CPU 0 holds the loop's lock and reads COM1 at its
        // turn, CPUs 1..3 wait for the lock and read COM1 meanwhile. Bochs runs the CPUs in turns
        // of a few instructions, and each time CPU 0 came to try, one of the others was in the
        // middle of its read: CPU 0 never got COM1, so never let go of the loop's lock. Here
        // the loop tries once at each waiter's turn: in the middle of the waiter's read if it
        // reads, after its turn if not.
        let keys = KeyReader::<16>::new();
        let want = keys.want();
        let mut got = None;
        let mut waiter_reads = 0;
        'turns: for _ in 0..100 {
            for _waiter in 0..3 {
                let mut read = false;
                keys.stash(|| {
                    read = true;
                    waiter_reads += 1;
                    assert_eq!(want.try_read(|| Some(b'x')), None, "two CPUs read the UART");
                    None
                });
                if !read {
                    if let Some(key) = want.try_read(|| Some(b'k')) {
                        got = Some(key);
                        break 'turns;
                    }
                }
            }
        }
        assert_eq!(got, Some(Some(b'k')), "the loop never got COM1");
        assert!(
            waiter_reads <= 3,
            "waiters read COM1 {waiter_reads} times ahead of the loop"
        );
        drop(want);
        // Once the loop has read, the waiters read again.
        let mut uart: VecDeque<u8> = b"ab".iter().copied().collect();
        keys.stash(|| uart.pop_front());
        assert!(
            uart.is_empty(),
            "a waiter left COM1 alone with the loop done"
        );
        assert_eq!(keys.read(|| None), Some(b'a'));
        assert_eq!(keys.read(|| Some(b'c')), Some(b'b'));
        assert_eq!(keys.read(|| Some(b'c')), Some(b'c'));
    }

    fn all(_: usize) -> bool {
        true
    }

    #[test]
    fn plain_bytes_go_to_the_first_guest() {
        let mut f = Focus::new(3);
        assert_eq!(f.key(b's', all), Key::Guest(0, b's'));
        assert_eq!(f.key(b'\r', all), Key::Guest(0, b'\r'));
        assert_eq!(f.pending(), 2);
    }

    #[test]
    fn escape_commands() {
        let mut f = Focus::new(3);
        assert_eq!(f.key(ESCAPE, all), Key::None);
        assert_eq!(f.key(b's', all), Key::Stats);
        for (c, k) in [
            (b'p', Key::Pause),
            (b'r', Key::Resume),
            (b'c', Key::Monitor),
        ] {
            assert_eq!(f.key(ESCAPE, all), Key::None);
            assert_eq!(f.key(c, all), k);
        }
        // Unknown command: swallowed, and the escape is over.
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'x', all), Key::None);
        assert_eq!(f.key(b'x', all), Key::Guest(0, b'x'));
        // Ctrl-A twice sends one Ctrl-A.
        f.key(ESCAPE, all);
        assert_eq!(f.key(ESCAPE, all), Key::Guest(0, ESCAPE));
        // The same, split as the monitor's prompt splits it.
        assert_eq!(f.command(b'2', all), Key::Focus(1));
        assert_eq!(f.typed(b'x'), Key::Guest(1, b'x'));
    }

    #[test]
    fn digits_and_next_move_the_focus() {
        let mut f = Focus::new(3);
        f.key(b'a', all);
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'3', all), Key::Focus(2));
        assert_eq!(f.pending(), 0, "bytes for guest 1 are not given to guest 3");
        assert_eq!(f.dropped, 1);
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'4', all), Key::None, "no fourth guest");
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'3', all), Key::None, "already there");
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'n', all), Key::Focus(0), "wraps around");
        // `n` skips guests that have stopped.
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'n', |i| i != 1), Key::Focus(2));
        f.key(ESCAPE, all);
        assert_eq!(f.key(b'n', |_| false), Key::None);
        assert_eq!(f.current(), 2);
    }

    #[test]
    fn delivery_waits_for_room_and_drops_for_a_stopped_guest() {
        let mut f = Focus::new(1);
        for b in b"uname -r\r" {
            f.key(*b, all);
        }
        let mut got = Vec::new();
        f.deliver(true, |b| {
            got.push(b);
            got.len() <= 4
        });
        assert_eq!(got, b"uname", "the fifth byte found no room");
        got.pop();
        f.deliver(true, |b| {
            got.push(b);
            true
        });
        assert_eq!(got, b"uname -r\r");
        f.key(b'x', all);
        f.deliver(false, |_| true);
        assert_eq!((f.pending(), f.dropped), (0, 1));
    }
}
