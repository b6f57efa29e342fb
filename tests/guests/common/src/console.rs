//! Named output lines: `say!("hello")` in the guest named pm32 prints `pm32: hello\n`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// A `&'static str` that can be set at run time (the guest name, the line an expected fault
/// prints). Single CPU, so relaxed atomics are enough.
pub struct StaticStr {
    ptr: AtomicPtr<u8>,
    len: AtomicUsize,
}

impl StaticStr {
    pub const fn new() -> Self {
        Self {
            ptr: AtomicPtr::new(core::ptr::null_mut()),
            len: AtomicUsize::new(0),
        }
    }

    pub fn set(&self, s: &'static str) {
        self.len.store(0, Ordering::Relaxed);
        self.ptr.store(s.as_ptr() as *mut u8, Ordering::Relaxed);
        self.len.store(s.len(), Ordering::Relaxed);
    }

    pub fn get(&self) -> &'static str {
        let ptr = self.ptr.load(Ordering::Relaxed);
        if ptr.is_null() {
            return "";
        }
        let len = self.len.load(Ordering::Relaxed);
        // SAFETY: ptr and len were taken together from a `&'static str` in `set` (len is zeroed
        // while ptr changes, and this is a single-CPU guest).
        unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(ptr, len)) }
    }
}

impl Default for StaticStr {
    fn default() -> Self {
        Self::new()
    }
}

static NAME: StaticStr = StaticStr::new();

/// Sets the prefix of every line.
pub fn set_name(name: &'static str) {
    NAME.set(name);
}

pub fn name() -> &'static str {
    NAME.get()
}

/// One formatted output line in a fixed buffer (longer text is cut).
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// `NAME: <args>\n`.
    pub fn new(args: fmt::Arguments) -> Self {
        let mut line = Self {
            buf: [0; 256],
            len: 0,
        };
        let _ = write!(line, "{}: {}", name(), args);
        line.len = line.len.min(line.buf.len() - 1);
        line.buf[line.len] = b'\n';
        line.len += 1;
        line
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints one line on the UART.
pub fn say(args: fmt::Arguments) {
    crate::serial::write(Line::new(args).as_bytes());
}

/// `say!("x={}", 1)` prints `NAME: x=1` and a newline on the UART.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::say(format_args!($($arg)*)) };
}

/// Shows bytes as text, with anything unprintable as '.'.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// The bytes of the NUL-terminated string at `ptr`, at most `max` of them.
///
/// # Safety
/// `ptr` must point to readable memory up to its NUL or `max` bytes, left alone while in use
/// (a command line or multiboot string the loader wrote).
pub unsafe fn c_str<'a>(ptr: *const u8, max: usize) -> &'a [u8] {
    if ptr.is_null() {
        return &[];
    }
    let mut len = 0;
    // SAFETY: the caller guarantees the bytes up to the NUL (or `max`) are readable.
    while len < max && unsafe { ptr.add(len).read_volatile() } != 0 {
        len += 1;
    }
    // SAFETY: as above, and `len` bytes were just read.
    unsafe { core::slice::from_raw_parts(ptr, len) }
}
