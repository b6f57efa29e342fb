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
