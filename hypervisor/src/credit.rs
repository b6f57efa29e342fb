//! Credit-based flow control on the control channel (COM2), both ends' share of it.
//!
//! COM2 is polled and its receive FIFO holds 16 bytes: a byte that arrives while the FIFO is full
//! is lost (an overrun, 16550D datasheet, LSR bit 1). So the sender (the host's bridge) never has
//! more than [`WINDOW`] bytes on the way that Keel has not acknowledged, and Keel
//! acknowledges every byte it takes from the FIFO: however slowly Keel reads (an emulator that
//! falls behind its host), the FIFO cannot overrun.
//!
//! An acknowledgement is one byte, `0xF7 + n` for `n` bytes read (1 to [`ACK_MAX`]): 0xF8 to 0xFF.
//! Those bytes never occur in UTF-8 (RFC 3629, section 1), and Keel's replies are Rust strings, so
//! the receiver can take them out of the reply stream wherever they fall, also inside a reply line.
//!
//! Keel's first byte, once it listens, is [`HELLO`] (0xF7, not UTF-8 either): whatever the sender
//! sent before it is lost (Keel empties the FIFO as it brings COM2 up, and a byte that came while
//! no Keel ran is no command), so the sender sends nothing until it has seen it, and takes nothing
//! to be on the way once it has. A Keel that starts again (the machine was reset) says it again.

use alloc::collections::VecDeque;

/// Bytes the sender may have sent and not had acknowledged. The receive FIFO holds 16, but Bochs
/// (2.7) still logged receive FIFO overflows with 16 on the way (about 150 in a 80 KiB restore;
/// the cause in the emulator is not known), and none with 4: a quarter of the FIFO.
pub const WINDOW: usize = 4;

/// The most bytes one acknowledgement byte stands for.
pub const ACK_MAX: usize = 8;

const ACK_BASE: u8 = 0xff - ACK_MAX as u8;

/// Keel listens: nothing sent before this byte reached it, and nothing is on the way.
pub const HELLO: u8 = ACK_BASE;

/// What [`strip_acks`] found in the byte stream from Keel besides its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Received {
    /// Bytes acknowledged since the last [`HELLO`] (or in all, without one).
    pub acked: usize,
    /// Keel said [`HELLO`]: the window starts afresh before `acked` is counted.
    pub hello: bool,
}

/// Queues the acknowledgement of `read` bytes ahead of everything in `out` (a reply being sent
/// must not hold it up); nothing for 0.
pub fn acknowledge(mut read: usize, out: &mut VecDeque<u8>) {
    while read > 0 {
        let n = read.min(ACK_MAX);
        out.push_front(ACK_BASE + n as u8);
        read -= n;
    }
}

/// How many bytes `byte` acknowledges, if it is an acknowledgement.
pub fn acknowledged(byte: u8) -> Option<usize> {
    (byte > ACK_BASE).then(|| usize::from(byte - ACK_BASE))
}

/// Copies `data` to `text` without its acknowledgement and [`HELLO`] bytes; returns what they
/// said.
pub fn strip_acks(data: &[u8], text: &mut alloc::vec::Vec<u8>) -> Received {
    let mut got = Received::default();
    for &b in data {
        match acknowledged(b) {
            Some(n) => got.acked += n,
            None if b == HELLO => {
                got = Received {
                    acked: 0,
                    hello: true,
                }
            }
            None => text.push(b),
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn an_acknowledgement_goes_ahead_of_the_reply_and_counts_every_byte() {
        let mut out: VecDeque<u8> = b"{\"ok\":true}\n".iter().copied().collect();
        acknowledge(19, &mut out);
        // 8 + 8 + 3, all in front of the reply.
        assert_eq!(out.len(), 12 + 3);
        let mut text = Vec::new();
        let bytes: Vec<u8> = out.iter().copied().collect();
        assert_eq!(strip_acks(&bytes[..3], &mut text).acked, 19);
        assert!(text.is_empty());
        assert_eq!(strip_acks(&bytes, &mut text).acked, 19);
        assert_eq!(text, b"{\"ok\":true}\n");
        let mut none = VecDeque::new();
        acknowledge(0, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn no_text_byte_is_taken_for_an_acknowledgement() {
        // Every character's UTF-8 form, control characters and the highest code point included.
        let text = "a\u{1}\u{7f}\u{80}é€\u{fffd}\u{10ffff}\n";
        let mut kept = Vec::new();
        assert_eq!(strip_acks(text.as_bytes(), &mut kept), Received::default());
        assert_eq!(kept, text.as_bytes());
        assert_eq!(acknowledged(0xf8), Some(1));
        assert_eq!(acknowledged(0xff), Some(ACK_MAX));
        assert_eq!(acknowledged(HELLO), None);
    }

    /// A hello starts the count afresh: acknowledgements before it were a Keel's that is gone.
    #[test]
    fn a_hello_is_taken_out_and_restarts_the_count() {
        let mut text = Vec::new();
        let stream = [0xf9, b'x', HELLO, 0xf8, b'y', 0xfa];
        let got = strip_acks(&stream, &mut text);
        assert_eq!(
            got,
            Received {
                acked: 1 + 3,
                hello: true
            }
        );
        assert_eq!(text, b"xy");
        assert!(core::str::from_utf8(&[HELLO]).is_err(), "never in a reply");
    }

    /// Acknowledgements inside a reply line, split anywhere, come out whole and leave the line.
    #[test]
    fn acknowledgements_interleaved_with_a_reply_are_taken_out() {
        let mut stream = Vec::from(&b"{\"ok\":"[..]);
        stream.push(0xff);
        stream.extend_from_slice(b"true}");
        stream.push(0xf9);
        stream.push(b'\n');
        let mut text = Vec::new();
        let acked: usize = stream
            .chunks(3)
            .map(|c| strip_acks(c, &mut text).acked)
            .sum();
        assert_eq!(acked, ACK_MAX + 2);
        assert_eq!(text, b"{\"ok\":true}\n");
    }
}
