//! Keel's console log: leveled lines with a fixed prefix, written to whatever sink the boot code
//! installs (COM1 on hardware; host tests install none, and output is discarded).
//!
//! Output waits in a queue ([`OutputQueue`], in `log/queue.rs` with its policy) and leaves as the
//! UART takes it; while guests run nothing ever waits for the UART.
//!
//! Every line Keel prints starts with `keel: `; warnings, errors and fatal errors add their level
//! (`keel: error: ...`) so that a user (and the integration tests) can grep for them. Guest console
//! lines are queued here too ([`write_guest_line`]), with the guest's name as their prefix and
//! under the guest's share of the queue.

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

mod queue;

pub use queue::{wire_len, wire_len_of, ByteRing, OutputQueue, Writer};

/// The console device: COM1 on hardware (`arch::serial`). It only sends bytes; what waits to be
/// sent, and whose it is, lives in Keel's [`OutputQueue`].
pub trait Sink: Send {
    /// How many bytes the device takes right now, without waiting.
    fn ready(&self) -> usize;
    fn send(&mut self, byte: u8);
    /// Waits (briefly) until the device has sent its last byte.
    fn settle(&mut self) {}
}

/// Size of Keel's console queue: 5.7 s of output at 115200 baud.
pub const QUEUE_BYTES: usize = 64 * 1024;

struct Logger {
    sink: Option<&'static mut dyn Sink>,
    min_level: Level,
    queue: OutputQueue<QUEUE_BYTES>,
    /// While guests run, guest output never waits for the UART (it is refused, and waits in the
    /// guest's console buffer); before and after (boot, the final report, a panic) it does.
    /// Keel's own lines always wait for room: only Keel's own output can fill the whole queue
    /// (guests cannot touch its reserve), and dropping "guest stopped" lines would hide what
    /// happened. docs/HYPERCALLS.md, "Console output", says when that happens.
    guests_running: bool,
    /// The monitor's prompt line as it stands on the console (`keel> ` and what was typed so far)
    /// while it is open. A line written meanwhile takes its place (carriage return, erase the
    /// line: ECMA-48 EL) and the prompt line is written again after it, so that guest output keeps
    /// flowing without mixing into what the operator types.
    prompt: Option<alloc::string::String>,
}

/// Carriage return and "erase in line" (ECMA-48 `CSI K`): the prompt line goes away.
const ERASE_LINE: &[u8] = b"\r\x1b[K";

impl Logger {
    /// Moves queued bytes to the device as far as it takes them now.
    fn pump(&mut self) {
        if let Some(sink) = self.sink.as_mut() {
            for _ in 0..sink.ready() {
                match self.queue.pop() {
                    Some(b) => sink.send(b),
                    None => break,
                }
            }
        }
    }

    /// Waits until `who` may queue `len` bytes (a guest only when no guest runs); false if it may
    /// not now.
    fn room(&mut self, who: Writer, len: usize) -> bool {
        while !self.queue.fits(who, len) {
            let may_wait = who == Writer::Keel || !self.guests_running;
            if !may_wait || self.sink.is_none() || self.queue.is_empty() {
                return false;
            }
            self.pump();
        }
        true
    }

    /// Queues one of Keel's lines (`len` wire bytes written by `fill`) and starts sending; false
    /// if it was dropped (and counted) for want of room.
    fn keel_line(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut queue::Appender<QUEUE_BYTES>),
    ) -> bool {
        if self.sink.is_none() {
            return true;
        }
        let need = self.queue.keel_need(len);
        self.room(Writer::Keel, need);
        let ok = self.queue.write_keel(len, fill);
        self.pump();
        ok
    }
}

static LOGGER: Mutex<Logger> = Mutex::new(Logger {
    sink: None,
    min_level: Level::Info,
    queue: OutputQueue::new(),
    guests_running: false,
    prompt: None,
});

/// The prompt line now on the console (`None`: no prompt open); see `Logger::prompt`.
pub fn set_prompt(line: Option<&str>) {
    LOGGER.lock().prompt = line.map(alloc::string::String::from);
}

/// Installs the sink (once, early in boot).
pub fn set_sink(sink: &'static mut dyn Sink) {
    LOGGER.lock().sink = Some(sink);
}

pub fn set_level(level: Level) {
    LOGGER.lock().min_level = level;
}

/// `guests` guests are about to run (0: none runs any more): from now on guest output never
/// waits for the UART, the guests share the guest part of the queue equally and Keel keeps to its
/// reserve (docs/HYPERCALLS.md, "Console output").
pub fn set_guests_running(guests: usize) {
    let mut logger = LOGGER.lock();
    logger.guests_running = guests > 0;
    logger.queue.set_guests(guests);
}

/// Lets the console make progress (called from Keel's run loop between guest slices).
pub fn pump() {
    LOGGER.lock().pump();
}

/// Waits until all console output has been sent.
pub fn flush() {
    let mut logger = LOGGER.lock();
    if logger.sink.is_none() {
        return;
    }
    while !logger.queue.is_empty() {
        logger.pump();
    }
    if let Some(sink) = logger.sink.as_mut() {
        sink.settle();
    }
}

/// True while console output is still queued.
pub fn busy() -> bool {
    !LOGGER.lock().queue.is_empty()
}

/// Writes `bytes` (complete lines) as `who`'s output, whole or not at all: true if queued. While
/// guests run a guest's output never waits for room (false: refused); Keel's waits.
pub fn write_as(who: Writer, bytes: &[u8]) -> bool {
    let mut logger = LOGGER.lock();
    if logger.sink.is_none() {
        return true;
    }
    match who {
        Writer::Keel => logger.keel_line(wire_len(bytes), |w| w.put(bytes)),
        Writer::Guest(_) => {
            let ok = logger.room(who, wire_len(bytes)) && logger.queue.write(who, &[bytes]);
            logger.pump();
            ok
        }
    }
}

/// True if `who` may queue `len` bytes (as sent) now.
pub fn fits(who: Writer, len: usize) -> bool {
    LOGGER.lock().queue.fits(who, len)
}

/// Writes one complete line of guest `id`'s, `prefix` then `body`, if its share of the queue has
/// room for it (or, when no guest runs any more, once it has); false, with nothing written, if not.
pub fn write_guest_line(id: u32, prefix: &str, body: &[u8]) -> bool {
    let mut logger = LOGGER.lock();
    if logger.sink.is_none() {
        return true;
    }
    let who = Writer::Guest(id);
    let prompt = logger.prompt.clone();
    let (before, after): (&[u8], &[u8]) = match &prompt {
        Some(p) => (ERASE_LINE, p.as_bytes()),
        None => (b"", b""),
    };
    let parts = [before, prefix.as_bytes(), body, b"\n", after];
    let len = parts.iter().map(|p| wire_len(p)).sum();
    let ok = logger.room(who, len) && logger.queue.write(who, &parts);
    logger.pump();
    ok
}

#[doc(hidden)]
pub fn log(level: Level, args: fmt::Arguments) {
    let mut logger = LOGGER.lock();
    if level < logger.min_level {
        return;
    }
    let line = format_args!("keel: {}{}\n", level.tag(), args);
    let prompt = logger.prompt.clone();
    let (before, after): (&[u8], &[u8]) = match &prompt {
        Some(p) => (ERASE_LINE, p.as_bytes()),
        None => (b"", b""),
    };
    let len = wire_len(before) + wire_len_of(line) + wire_len(after);
    logger.keel_line(len, |w| {
        w.put(before);
        let _ = w.write_fmt(line);
        w.put(after);
    });
}

/// Used by the panic handler: the lock may be held by the code that panicked. Keel's lines wait
/// for room from now on (nothing else will run).
///
/// # Safety
/// Only call when no other code will run afterwards (the caller halts).
pub unsafe fn force_unlock() {
    // SAFETY: the caller guarantees nothing else uses the logger concurrently any more.
    unsafe { LOGGER.force_unlock() };
    LOGGER.lock().guests_running = false;
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
