//! Keel's console log: leveled lines with a fixed prefix, written to whatever sink the boot code
//! installs (COM1 on hardware, a buffer in host tests).
//!
//! Every line Keel prints starts with `keel: `; warnings, errors and fatal errors add their level
//! (`keel: error: ...`) so that a user (and the integration tests) can grep for them. Guest console
//! output does not go through here: it is printed by the guest console code with the guest's name
//! as its prefix.

use core::fmt::{self, Write};
use spin::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Debug => "debug: ",
            Level::Info => "",
            Level::Warn => "warn: ",
            Level::Error => "error: ",
            Level::Fatal => "fatal: ",
        }
    }
}

/// Where log bytes go. Implemented by the serial driver in `arch`.
pub trait Sink: Send {
    fn write_bytes(&mut self, bytes: &[u8]);
    /// Moves queued bytes to the device as far as it can take them now, without waiting.
    fn pump(&mut self) {}
    /// Waits until every queued byte has left.
    fn flush(&mut self) {}
    /// True while bytes wait to be sent.
    fn busy(&self) -> bool {
        false
    }
}

/// A fixed-size byte queue: console output waits here so that Keel never stalls guests on a slow
/// UART (at 115200 baud one byte takes 87 us; a line of output took 5 ms of polling).
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

/// Lets the console make progress (called from Keel's run loop between guest slices).
pub fn pump() {
    if let Some(sink) = LOGGER.lock().sink.as_mut() {
        sink.pump();
    }
}

/// Waits until all console output has been sent.
pub fn flush() {
    if let Some(sink) = LOGGER.lock().sink.as_mut() {
        sink.flush();
    }
}

/// True while console output is still queued.
pub fn busy() -> bool {
    LOGGER.lock().sink.as_ref().is_some_and(|s| s.busy())
}

struct Logger {
    sink: Option<&'static mut dyn Sink>,
    min_level: Level,
}

static LOGGER: Mutex<Logger> = Mutex::new(Logger {
    sink: None,
    min_level: Level::Info,
});

/// Installs the sink (once, early in boot).
pub fn set_sink(sink: &'static mut dyn Sink) {
    LOGGER.lock().sink = Some(sink);
}

pub fn set_level(level: Level) {
    LOGGER.lock().min_level = level;
}

/// Writes raw bytes to the console under the log lock, so they never interleave with a log line.
pub fn write_raw(bytes: &[u8]) {
    if let Some(sink) = LOGGER.lock().sink.as_mut() {
        sink.write_bytes(bytes);
    }
}

/// Writes one complete line, `prefix` then `body`, under the lock.
pub fn write_line(prefix: &str, body: &[u8]) {
    if let Some(sink) = LOGGER.lock().sink.as_mut() {
        sink.write_bytes(prefix.as_bytes());
        sink.write_bytes(body);
        sink.write_bytes(b"\n");
    }
}

struct SinkWriter<'a>(&'a mut dyn Sink);

impl Write for SinkWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn log(level: Level, args: fmt::Arguments) {
    let mut logger = LOGGER.lock();
    if level < logger.min_level {
        return;
    }
    if let Some(sink) = logger.sink.as_mut() {
        let mut w = SinkWriter(&mut **sink);
        let _ = writeln!(w, "keel: {}{}", level.tag(), args);
    }
}

/// Used by the panic handler: the lock may be held by the code that panicked.
///
/// # Safety
/// Only call when no other code will run afterwards (the caller halts).
pub unsafe fn force_unlock() {
    // SAFETY: the caller guarantees nothing else uses the logger concurrently any more.
    unsafe { LOGGER.force_unlock() };
}

#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Info, format_args!($($t)*)) } }
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Warn, format_args!($($t)*)) } }
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Error, format_args!($($t)*)) } }
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Debug, format_args!($($t)*)) } }
#[macro_export]
macro_rules! fatal { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Fatal, format_args!($($t)*)) } }

#[cfg(test)]
mod tests {
    use super::ByteRing;

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
    }
}
