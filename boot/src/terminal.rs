//! The user's terminal during `cargo keel run`: keys go to Keel one by one, as typed.
//!
//! A terminal in its usual (canonical) mode hands a program a line only at Enter, and echoes it;
//! Keel's console keys (Ctrl-A c, Ctrl-A 1, the `keel>` prompt's own line editing and echo) need
//! each key as it is typed and nothing echoed twice. [`KeysAsTyped`] turns canonical mode, echo
//! and the extended input keys (Ctrl-V, Ctrl-O) off while it lives and puts the terminal back as
//! it was when it is dropped, when the run ends by Ctrl-C (which still stops the run: signals stay
//! on), and on a panic. termios(3) and POSIX.1-2017 "General Terminal Interface" describe the
//! flags.

use std::os::fd::RawFd;
use std::sync::Mutex;

use anyhow::Result;

/// The settings to put back (the descriptor and its termios) while a [`KeysAsTyped`] lives: the
/// panic hook reads them.
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// While it lives, the terminal on `fd` passes keys as they are typed, without echo.
pub struct KeysAsTyped {
    fd: RawFd,
    saved: libc::termios,
}

fn termios_of(fd: RawFd) -> Option<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it before it is read.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write; a bad `fd` makes tcgetattr fail, which is checked.
    (unsafe { libc::tcgetattr(fd, &mut t) } == 0).then_some(t)
}

fn set(fd: RawFd, t: &libc::termios) -> bool {
    // SAFETY: tcsetattr reads the valid termios it is given; a bad `fd` makes it fail.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) == 0 }
}

impl KeysAsTyped {
    /// On standard input, when it is a terminal (`None` otherwise: piped input is left alone).
    pub fn on_stdin() -> Result<Option<Self>> {
        // SAFETY: isatty only looks at the descriptor number.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        Self::on(libc::STDIN_FILENO).map(Some)
    }

    /// On the terminal `fd`.
    pub fn on(fd: RawFd) -> Result<Self> {
        let saved = termios_of(fd).ok_or_else(|| {
            anyhow::Error::new(std::io::Error::last_os_error()).context("tcgetattr on the terminal")
        })?;
        let mut keys = saved;
        // Input byte by byte as it comes (VMIN 1, VTIME 0), no echo, no Ctrl-V/Ctrl-O handling;
        // ISIG stays, so Ctrl-C still stops the run, and output processing (NL to CR NL) stays.
        keys.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        keys.c_cc[libc::VMIN] = 1;
        keys.c_cc[libc::VTIME] = 0;
        if !set(fd, &keys) {
            return Err(anyhow::Error::new(std::io::Error::last_os_error())
                .context("tcsetattr on the terminal"));
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
        install_panic_hook();
        Ok(Self { fd, saved })
    }
}

impl Drop for KeysAsTyped {
    fn drop(&mut self) {
        set(self.fd, &self.saved);
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A panic puts the terminal back before the message is printed (once per process).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(saved) = SAVED.lock() {
                if let Some((fd, t)) = saved.as_ref() {
                    set(*fd, t);
                }
            }
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// On a pseudo-terminal: canonical mode and echo go off, signals stay on, and everything is
    /// as before once the guard is dropped.
    #[test]
    fn keys_pass_as_typed_and_the_terminal_is_put_back() -> Result<()> {
        let pty = crate::pty::Pty::open()?;
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pty.path)?;
        let fd = tty.as_raw_fd();
        // A terminal in its usual mode, as a shell leaves it.
        let mut usual = termios_of(fd).expect("a terminal");
        usual.c_lflag |= libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN;
        assert!(set(fd, &usual));
        let before = termios_of(fd).unwrap();
        {
            let _keys = KeysAsTyped::on(fd)?;
            let now = termios_of(fd).unwrap();
            assert_eq!(now.c_lflag & (libc::ICANON | libc::ECHO | libc::IEXTEN), 0);
            assert_ne!(now.c_lflag & libc::ISIG, 0, "Ctrl-C still stops the run");
            assert_eq!(now.c_cc[libc::VMIN], 1);
            assert!(SAVED.lock().unwrap().is_some());
        }
        let after = termios_of(fd).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_cc, before.c_cc);
        assert!(SAVED.lock().unwrap().is_none());
        Ok(())
    }
}
