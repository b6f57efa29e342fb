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

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

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
