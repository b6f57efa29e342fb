//! A pseudo-terminal for COM1, so that the user can type into Keel's console during
//! `cargo keel run` (Keel reads keys such as `s` for its statistics from COM1).
//!
//! The emulator gets the terminal side (Bochs `com1: mode=term`, QEMU `-serial /dev/pts/N`);
//! this tool keeps the controlling side, copies everything Keel writes into `serial.log` (so the
//! rest of a run, which follows that file, works as with `mode=file`), and forwards its own
//! standard input. The terminal is raw: bytes pass unchanged in both directions.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

pub struct Pty {
    master: File,
    /// Held open so that the terminal does not hang up before the emulator opens it or after it
    /// closes it.
    _slave: File,
    /// The terminal's path, e.g. /dev/pts/3.
    pub path: PathBuf,
}

fn os_error(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

impl Pty {
    pub fn open() -> Result<Self> {
        // SAFETY: posix_openpt has no pointer arguments; the result is checked before use.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        if fd < 0 {
            return Err(os_error("cannot open a pseudo-terminal (posix_openpt)"));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let master = unsafe { File::from_raw_fd(fd) };
        // SAFETY: both take the valid master descriptor only.
        if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
            return Err(os_error("cannot unlock the pseudo-terminal"));
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is writable for its whole length, which is passed along.
        if unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) } != 0 {
            return Err(os_error("cannot name the pseudo-terminal (ptsname_r)"));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let path = unsafe { CStr::from_ptr(name.as_ptr()) };
        let path = PathBuf::from(path.to_string_lossy().into_owned());
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        make_raw(&slave)?;
        Ok(Self {
            master,
            _slave: slave,
            path,
        })
    }

    /// The controlling side of the terminal (what the emulator writes comes out of it; what is
    /// written to it, the emulator's UART receives).
    pub fn controller(&self) -> Result<File> {
        Ok(self.master.try_clone()?)
    }

    /// Starts copying what the emulator writes to `log` (appending) until `stop` is set; the
    /// thread drains what is pending before it ends.
    pub fn copy_output_to(&self, log: &Path, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
        let mut master = self.master.try_clone()?;
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        Ok(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let stopping = stop.load(Ordering::SeqCst);
                if !readable(&master, if stopping { 0 } else { 50 }) {
                    if stopping {
                        return;
                    }
                    continue;
                }
                match master.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if out.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }))
    }

    /// Forwards this process's standard input to the emulator's COM1, on a thread that ends with
    /// the input (or the process).
    pub fn forward_stdin(&self) -> Result<()> {
        let mut master = self.master.try_clone()?;
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || master.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }
}

/// Types what it is sent into the terminal, one byte every `pace`: an emulated 16550 holds 16
/// bytes, and Keel reads its COM1 only between guest time slices.
pub struct Typist {
    tx: std::sync::mpsc::Sender<Vec<u8>>,
}

impl Typist {
    pub fn send(&self, bytes: Vec<u8>) {
        // The thread only ends when this sender is dropped or the terminal fails.
        let _ = self.tx.send(bytes);
    }
}

impl Pty {
    /// A [`Typist`] for this terminal.
    pub fn typist(&self, pace: std::time::Duration) -> Result<Typist> {
        let mut master = self.master.try_clone()?;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            while let Ok(bytes) = rx.recv() {
                for b in bytes {
                    if master.write_all(&[b]).is_err() {
                        return;
                    }
                    std::thread::sleep(pace);
                }
            }
        });
        Ok(Typist { tx })
    }
}

/// Whether `file` has bytes to read within `timeout_ms`.
pub(crate) fn readable(file: &File, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and the count says one.
    let ready = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    ready > 0 && pfd.revents & libc::POLLIN != 0
}

/// No echo, no line editing, no CR/LF translation: the emulator's UART sees the bytes typed.
fn make_raw(tty: &File) -> Result<()> {
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it before it is used.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal and `t` is a valid termios to write.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(os_error("tcgetattr on the pseudo-terminal"));
    }
    // SAFETY: cfmakeraw edits the struct it is given; tcsetattr reads it.
    unsafe { libc::cfmakeraw(&mut t) };
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(os_error("tcsetattr on the pseudo-terminal"));
    }
    Ok(())
}

/// Refuses terminals whose path would not fit a bochsrc or a QEMU argument.
pub fn check_path(path: &Path) -> Result<()> {
    let s = path.to_string_lossy();
    if s.contains(['"', ',', '\n']) {
        bail!("unusable pseudo-terminal path {s}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn bytes_go_both_ways() -> Result<()> {
        let pty = Pty::open()?;
        check_path(&pty.path)?;
        let dir = std::env::temp_dir().join(format!("keel-pty-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("serial.log");
        let _ = std::fs::remove_file(&log);
        let stop = Arc::new(AtomicBool::new(false));
        let pump = pty.copy_output_to(&log, stop.clone())?;

        // The emulator's side: what it writes lands in the log unchanged (raw: no CRLF).
        let mut emulator = OpenOptions::new().read(true).write(true).open(&pty.path)?;
        emulator.write_all(b"keel: hi\n")?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read(&log).unwrap_or_default() != b"keel: hi\n" {
            assert!(Instant::now() < deadline, "output did not reach the log");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Our side: what we write is what the emulator's UART reads.
        let mut master = pty.master.try_clone()?;
        master.write_all(b"s")?;
        let mut got = [0u8; 1];
        emulator.read_exact(&mut got)?;
        assert_eq!(&got, b"s");

        stop.store(true, Ordering::SeqCst);
        pump.join()
            .map_err(|_| anyhow::anyhow!("pump thread panicked"))?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
