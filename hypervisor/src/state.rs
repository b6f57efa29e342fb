//! Guest state as values: the versioned binary form in which a device (and, later, a vCPU and a
//! whole VM) is written out and brought back, for snapshots, migration and restarts.
//!
//! The encoding is deliberately plain: little-endian integers, booleans as one byte 0 or 1,
//! sequences as a `u32` count then their elements, `Option` as a presence byte then the value.
//! Each device writes one *section*: a four-byte tag naming it, a `u16` version of its layout
//! and the `u32` length of its body. A reader names the tag it expects and the newest version
//! it understands, so a stream from another device, a newer Keel or a cut-off file is refused
//! with a message saying which, never half-applied.
//!
//! Types take part through [`Codec`]. For a struct, [`codec_struct!`] lists its fields; the
//! decoder builds the struct with a literal, so a field added later without being listed there
//! is a compile error rather than state silently lost from snapshots. Decoded state is
//! untrusted input: each device checks what its code relies on (an index in range, a FIFO within
//! its size) before it takes the state over, and refuses it otherwise.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

/// Why a state stream was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The stream ended `needed` bytes short at offset `at`.
    Truncated { at: usize, needed: usize },
    /// A section other than the one expected.
    WrongSection { expected: [u8; 4], found: [u8; 4] },
    /// A section written in a layout newer than this Keel reads.
    Version {
        section: [u8; 4],
        found: u16,
        supported: u16,
    },
    /// A section whose body was not read to its end (a layout mismatch).
    Trailing { section: [u8; 4], left: usize },
    /// A value outside what the type or the device allows.
    Invalid(&'static str),
}

fn tag_str(tag: &[u8; 4]) -> &str {
    core::str::from_utf8(tag).unwrap_or("????")
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { at, needed } => {
                write!(f, "the state ends {needed} byte(s) short at offset {at}")
            }
            Self::WrongSection { expected, found } => write!(
                f,
                "expected the state of `{}`, found `{}`",
                tag_str(expected),
                tag_str(found)
            ),
            Self::Version {
                section,
                found,
                supported,
            } => write!(
                f,
                "`{}` state of version {found}; this Keel reads up to version {supported}",
                tag_str(section)
            ),
            Self::Trailing { section, left } => write!(
                f,
                "`{}` state has {left} byte(s) this Keel does not understand",
                tag_str(section)
            ),
            Self::Invalid(what) => write!(f, "invalid state: {what}"),
        }
    }
}

/// Where state is written.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer with room for `n` bytes (a large stream grows without reallocating).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn put<T: Codec>(&mut self, value: &T) {
        value.put(self);
    }

    /// A section: `tag`, `version`, the body's length, then the body `body` writes.
    pub fn section(&mut self, tag: [u8; 4], version: u16, body: impl FnOnce(&mut Writer)) {
        self.raw(&tag);
        self.put(&version);
        let at = self.buf.len();
        self.put(&0u32);
        body(self);
        let len = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// Where state is read from.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.remaining() < n {
            return Err(StateError::Truncated {
                at: self.at,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    pub fn get<T: Codec>(&mut self) -> Result<T, StateError> {
        T::get(self)
    }

    /// Reads section `tag` (of a version up to `supported`) with `body`, which must consume it
    /// whole; returns what `body` returned. `body` gets the section's version.
    pub fn section<T>(
        &mut self,
        tag: [u8; 4],
        supported: u16,
        body: impl FnOnce(&mut Reader<'a>, u16) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let found: [u8; 4] = self.get()?;
        if found != tag {
            return Err(StateError::WrongSection {
                expected: tag,
                found,
            });
        }
        let version: u16 = self.get()?;
        if version > supported {
            return Err(StateError::Version {
                section: tag,
                found: version,
                supported,
            });
        }
        let len = self.get::<u32>()? as usize;
        let mut inner = Reader::new(self.raw(len)?);
        let value = body(&mut inner, version)?;
        if inner.remaining() != 0 {
            return Err(StateError::Trailing {
                section: tag,
                left: inner.remaining(),
            });
        }
        Ok(value)
    }
}

/// A type that can be written to and read back from a state stream.
pub trait Codec: Sized {
    fn put(&self, w: &mut Writer);
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError>;
}

macro_rules! codec_int {
    ($($t:ty),*) => {$(
        impl Codec for $t {
            fn put(&self, w: &mut Writer) {
                w.raw(&self.to_le_bytes());
            }
            fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
                let bytes = r.raw(core::mem::size_of::<$t>())?;
                let mut a = [0u8; core::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                Ok(<$t>::from_le_bytes(a))
            }
        }
    )*};
}
codec_int!(u8, u16, u32, u64, i64);

impl Codec for usize {
    fn put(&self, w: &mut Writer) {
        w.put(&(*self as u64));
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        usize::try_from(r.get::<u64>()?).map_err(|_| StateError::Invalid("a size beyond usize"))
    }
}

impl Codec for bool {
    fn put(&self, w: &mut Writer) {
        w.put(&u8::from(*self));
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        match r.get::<u8>()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Invalid("a boolean other than 0 or 1")),
        }
    }
}

impl<T: Codec> Codec for Option<T> {
    fn put(&self, w: &mut Writer) {
        w.put(&self.is_some());
        if let Some(v) = self {
            w.put(v);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok(if r.get::<bool>()? {
            Some(r.get()?)
        } else {
            None
        })
    }
}

impl<A: Codec, B: Codec> Codec for (A, B) {
    fn put(&self, w: &mut Writer) {
        w.put(&self.0);
        w.put(&self.1);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok((r.get()?, r.get()?))
    }
}

impl Codec for alloc::string::String {
    fn put(&self, w: &mut Writer) {
        w.put(&(self.len() as u32));
        w.raw(self.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let n = r.get::<u32>()? as usize;
        let bytes = r.raw(n)?;
        core::str::from_utf8(bytes)
            .map(Into::into)
            .map_err(|_| StateError::Invalid("a string that is not UTF-8"))
    }
}

impl<A: Codec, B: Codec, C: Codec> Codec for (A, B, C) {
    fn put(&self, w: &mut Writer) {
        w.put(&self.0);
        w.put(&self.1);
        w.put(&self.2);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok((r.get()?, r.get()?, r.get()?))
    }
}

/// A sequence's element count, checked against what is left in the stream (every element takes
/// at least one byte), so a corrupt count cannot make the reader allocate without bound.
fn count(r: &mut Reader<'_>) -> Result<usize, StateError> {
    let n = r.get::<u32>()? as usize;
    if n > r.remaining() {
        return Err(StateError::Truncated {
            at: r.at,
            needed: n - r.remaining(),
        });
    }
    Ok(n)
}

fn put_seq<'a, T: Codec + 'a>(w: &mut Writer, len: usize, items: impl Iterator<Item = &'a T>) {
    w.put(&(len as u32));
    items.for_each(|v| w.put(v));
}

impl<T: Codec> Codec for Vec<T> {
    fn put(&self, w: &mut Writer) {
        put_seq(w, self.len(), self.iter());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let n = count(r)?;
        (0..n).map(|_| r.get()).collect()
    }
}

impl<T: Codec> Codec for VecDeque<T> {
    fn put(&self, w: &mut Writer) {
        put_seq(w, self.len(), self.iter());
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok(Vec::<T>::get(r)?.into())
    }
}

impl<T: Codec, const N: usize> Codec for [T; N] {
    fn put(&self, w: &mut Writer) {
        self.iter().for_each(|v| w.put(v));
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let items = (0..N).map(|_| r.get()).collect::<Result<Vec<T>, _>>()?;
        items
            .try_into()
            .map_err(|_| StateError::Invalid("an array of the wrong length"))
    }
}

/// `Codec` for a struct with named fields, by listing every field (the decoder's struct literal
/// makes a forgotten field a compile error).
#[macro_export]
macro_rules! codec_struct {
    ($t:ident { $($field:ident),* $(,)? }) => {
        impl $crate::state::Codec for $t {
            fn put(&self, w: &mut $crate::state::Writer) {
                $( w.put(&self.$field); )*
            }
            fn get(r: &mut $crate::state::Reader<'_>) -> Result<Self, $crate::state::StateError> {
                Ok($t { $( $field: r.get()? ),* })
            }
        }
    };
}

/// `Codec` for an enum of unit variants, each written as the byte given.
#[macro_export]
macro_rules! codec_enum {
    ($t:ident { $($variant:ident = $n:literal),* $(,)? }) => {
        impl $crate::state::Codec for $t {
            fn put(&self, w: &mut $crate::state::Writer) {
                let n: u8 = match self { $( $t::$variant => $n ),* };
                w.put(&n);
            }
            fn get(r: &mut $crate::state::Reader<'_>) -> Result<Self, $crate::state::StateError> {
                match r.get::<u8>()? {
                    $( $n => Ok($t::$variant), )*
                    _ => Err($crate::state::StateError::Invalid(concat!(
                        "an unknown ", stringify!($t)
                    ))),
                }
            }
        }
    };
}

/// The state of a device that saves itself whole: its [`Codec`] value in section `tag`, checked
/// with `check` before it replaces the device's.
pub fn save_whole<T: Codec>(w: &mut Writer, tag: [u8; 4], version: u16, value: &T) {
    w.section(tag, version, |w| w.put(value));
}

/// Reads what [`save_whole`] wrote into `target`, if `check` accepts it; `target` is untouched
/// otherwise.
pub fn restore_whole<T: Codec>(
    r: &mut Reader<'_>,
    tag: [u8; 4],
    version: u16,
    target: &mut T,
    check: impl FnOnce(&T) -> Result<(), &'static str>,
) -> Result<(), StateError> {
    let value: T = r.section(tag, version, |r, _| r.get())?;
    check(&value).map_err(StateError::Invalid)?;
    *target = value;
    Ok(())
}

/// A device without state writes an empty section, so that a stream still lists every device
/// in order and a restore into a machine with other devices is refused.
pub fn save_empty(w: &mut Writer, tag: [u8; 4]) {
    w.section(tag, 1, |_| {});
}

/// Reads what [`save_empty`] wrote.
pub fn restore_empty(r: &mut Reader<'_>, tag: [u8; 4]) -> Result<(), StateError> {
    r.section(tag, 1, |_, _| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Mode {
        Off,
        On,
    }
    codec_enum!(Mode { Off = 0, On = 7 });

    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        a: u8,
        b: u64,
        on: bool,
        mode: Mode,
        maybe: Option<(u16, bool)>,
        fifo: VecDeque<u8>,
        regs: [u32; 3],
    }
    codec_struct!(Sample {
        a,
        b,
        on,
        mode,
        maybe,
        fifo,
        regs
    });

    fn sample() -> Sample {
        Sample {
            a: 0x12,
            b: 0x1122_3344_5566_7788,
            on: true,
            mode: Mode::On,
            maybe: Some((0xbeef, false)),
            fifo: [1, 2, 3].into_iter().collect(),
            regs: [7, 8, 9],
        }
    }

    #[test]
    fn a_struct_comes_back_equal() {
        let mut w = Writer::new();
        save_whole(&mut w, *b"SMPL", 1, &sample());
        let mut got = Sample {
            a: 0,
            b: 0,
            on: false,
            mode: Mode::Off,
            maybe: None,
            fifo: VecDeque::new(),
            regs: [0; 3],
        };
        let mut r = Reader::new(w.bytes());
        restore_whole(&mut r, *b"SMPL", 1, &mut got, |_| Ok(())).expect("restores");
        assert_eq!(got, sample());
        assert_eq!(r.remaining(), 0);
    }

    fn saved() -> Vec<u8> {
        let mut w = Writer::new();
        save_whole(&mut w, *b"SMPL", 2, &sample());
        w.into_bytes()
    }

    fn restore(bytes: &[u8], tag: [u8; 4], version: u16) -> Result<Sample, StateError> {
        let mut s = sample();
        s.a = 0;
        restore_whole(&mut Reader::new(bytes), tag, version, &mut s, |v| {
            if v.a == 0x12 {
                Ok(())
            } else {
                Err("a must be 0x12")
            }
        })?;
        Ok(s)
    }

    #[test]
    fn foreign_newer_and_cut_streams_are_refused() {
        let bytes = saved();
        assert_eq!(
            restore(&bytes, *b"OTHR", 2),
            Err(StateError::WrongSection {
                expected: *b"OTHR",
                found: *b"SMPL"
            })
        );
        let e = restore(&bytes, *b"SMPL", 1).expect_err("newer");
        assert_eq!(
            e.to_string(),
            "`SMPL` state of version 2; this Keel reads up to version 1"
        );
        for cut in 0..bytes.len() {
            assert!(
                restore(&bytes[..cut], *b"SMPL", 2).is_err(),
                "cut at {cut} accepted"
            );
        }
    }

    #[test]
    fn bad_values_are_refused_and_leave_the_target_alone() {
        let mut bytes = saved();
        // Section header: tag 4, version 2, length 4; then a, b (8), on.
        let on = 4 + 2 + 4 + 1 + 8;
        bytes[on] = 2;
        assert_eq!(
            restore(&bytes, *b"SMPL", 2),
            Err(StateError::Invalid("a boolean other than 0 or 1"))
        );
        let mut bytes = saved();
        bytes[4 + 2 + 4] = 0x13;
        let mut s = sample();
        let e = restore_whole(&mut Reader::new(&bytes), *b"SMPL", 2, &mut s, |v| {
            (v.a == 0x12).then_some(()).ok_or("a must be 0x12")
        });
        assert_eq!(e, Err(StateError::Invalid("a must be 0x12")));
        assert_eq!(s, sample(), "untouched");
        let mut bytes = saved();
        bytes[on + 1] = 3; // the mode
        assert_eq!(
            restore(&bytes, *b"SMPL", 2),
            Err(StateError::Invalid("an unknown Mode"))
        );
    }

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut w = Writer::new();
        w.put(&u32::MAX);
        assert!(matches!(
            Reader::new(w.bytes()).get::<Vec<u64>>(),
            Err(StateError::Truncated { .. })
        ));
    }

    #[test]
    fn trailing_bytes_in_a_section_are_refused() {
        let mut w = Writer::new();
        w.section(*b"SMPL", 1, |w| {
            w.put(&sample());
            w.put(&0u8);
        });
        assert_eq!(
            restore(w.bytes(), *b"SMPL", 1),
            Err(StateError::Trailing {
                section: *b"SMPL",
                left: 1
            })
        );
    }
}
