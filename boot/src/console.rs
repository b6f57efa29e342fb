//! Reading what Keel prints: following a log file that an emulator appends to, cleaning UART bytes
//! into text, and finding the `keel: exit status N` line that ends every run.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where an emulator's COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Com1 {
    /// Written to this file; nothing can be typed.
    File(PathBuf),
    /// Attached to this terminal (a pseudo-terminal held by this tool): output and input.
    Terminal(PathBuf),
}

impl Com1 {
    pub fn path(&self) -> &Path {
        match self {
            Com1::File(p) | Com1::Terminal(p) => p,
        }
    }
}

/// Keel prints this, then the decimal status, as its last line before it stops the machine. The
/// number is the value QEMU's isa-debug-exit reports: `(code << 1) | 1`.
pub const STATUS_PREFIX: &str = "keel: exit status ";

/// Turns raw serial bytes into text: drops carriage returns (the UART driver writes CRLF) and NUL
/// bytes (one appears after the 16550 loopback self-test under Bochs), and replaces invalid UTF-8.
pub fn clean(bytes: &[u8]) -> String {
    let kept: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != 0)
        .collect();
    String::from_utf8_lossy(&kept).into_owned()
}

/// The complete lines of `text`: a trailing line without its newline is still being written.
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// The status of the last complete `keel: exit status N` line, if Keel has printed one.
pub fn keel_status(text: &str) -> Option<u32> {
    complete_lines(text)
        .filter_map(|line| {
            let at = line.find(STATUS_PREFIX)?;
            let rest = &line[at + STATUS_PREFIX.len()..];
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .map_or(rest, |end| &rest[..end]);
            digits.parse().ok()
        })
        .last()
}

/// The last `n` lines of `text`, for failure reports.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut out = lines[from..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// One step of a scripted console session: wait for a complete COM1 line that contains `expect`
/// (after the line the previous step matched), then type `send` on COM1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub expect: String,
    pub send: Vec<u8>,
    /// From the previous step's match (or the start of the run) to this step's line.
    pub timeout: Duration,
}

impl Step {
    pub fn new(expect: &str, send: &str, timeout: Duration) -> Self {
        Self {
            expect: expect.into(),
            send: send.as_bytes().to_vec(),
            timeout,
        }
    }
}

/// What a [`Script`] wants done now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cue {
    /// Keep watching.
    Wait,
    /// Step `step` matched: type these bytes.
    Send { step: usize, bytes: Vec<u8> },
    /// Step `step` saw no line with its text in time.
    TimedOut { step: usize },
    /// Every step has matched.
    Done,
}

/// "Expect line X, then send Y", step after step, against the growing text of COM1.
#[derive(Debug, Clone)]
pub struct Script {
    steps: Vec<Step>,
    next: usize,
    /// Where the next search starts: just after the line the last step matched.
    from: usize,
    /// When the last step matched (run time).
    since: Duration,
    /// When each step matched (run time), in step order.
    pub matched_at: Vec<Duration>,
}

impl Script {
    pub fn new(steps: Vec<Step>) -> Self {
        Self {
            steps,
            next: 0,
            from: 0,
            since: Duration::ZERO,
            matched_at: Vec::new(),
        }
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Looks at `text` (all of COM1 so far) at run time `now`: the next step's cue. Call again
    /// after a `Send`: several steps may match the same text.
    pub fn poll(&mut self, text: &str, now: Duration) -> Cue {
        let Some(step) = self.steps.get(self.next) else {
            return Cue::Done;
        };
        let end = text.rfind('\n').map_or(0, |i| i + 1);
        let mut at = self.from.min(end);
        for line in text[at..end].split_inclusive('\n') {
            at += line.len();
            if line.contains(step.expect.as_str()) {
                let i = self.next;
                self.next += 1;
                self.from = at;
                self.since = now;
                self.matched_at.push(now);
                return Cue::Send {
                    step: i,
                    bytes: step.send.clone(),
                };
            }
        }
        if now.saturating_sub(self.since) > step.timeout {
            return Cue::TimedOut { step: self.next };
        }
        Cue::Wait
    }
}

/// Follows a file that another process appends to (Bochs' COM1 file, QEMU's `-serial file:`).
/// The file may not exist yet when following starts.
pub struct FileTail {
    path: PathBuf,
    offset: u64,
}

impl FileTail {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    /// The bytes appended since the last call (empty when there are none or the file is missing).
    pub fn poll(&mut self) -> io::Result<Vec<u8>> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut new = Vec::new();
        file.read_to_end(&mut new)?;
        self.offset += new.len() as u64;
        Ok(new)
    }
}

/// The last `max_lines` lines of a file as cleaned text (empty if it cannot be read), for failure
/// reports. Reads at most the last 64 KiB.
pub fn file_tail(path: &Path, max_lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    tail_lines(&clean(&bytes), max_lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_matches_lines_in_order_and_times_out() {
        let secs = Duration::from_secs;
        let mut script = Script::new(vec![
            Step::new("login:", "root\r", secs(10)),
            Step::new("# ", "uname -r\r", secs(10)),
            Step::new("6.1", "", secs(5)),
        ]);
        assert_eq!(
            script.poll("boot\nlogin:", secs(1)),
            Cue::Wait,
            "no newline yet"
        );
        let text = "boot\nlogin:\n";
        let send = |step: usize, s: &str| Cue::Send {
            step,
            bytes: s.as_bytes().to_vec(),
        };
        assert_eq!(script.poll(text, secs(2)), send(0, "root\r"));
        // The line step 0 matched is not searched again.
        assert_eq!(script.poll("boot\nlogin:\nPassword:\n", secs(3)), Cue::Wait);
        let text = "boot\nlogin:\n/ # uname -r\n6.1.0-57\n";
        assert_eq!(script.poll(text, secs(4)), send(1, "uname -r\r"));
        assert_eq!(script.poll(text, secs(4)), send(2, ""));
        assert_eq!(script.poll(text, secs(100)), Cue::Done);
        assert_eq!(script.matched_at, vec![secs(2), secs(4), secs(4)]);

        let mut late = Script::new(vec![Step::new("never", "", secs(5))]);
        assert_eq!(late.poll("x\n", secs(5)), Cue::Wait);
        assert_eq!(late.poll("x\n", secs(6)), Cue::TimedOut { step: 0 });
    }

    #[test]
    fn clean_drops_cr_and_nul() {
        assert_eq!(clean(b"\0keel: hi\r\nnext\r\n"), "keel: hi\nnext\n");
        assert_eq!(clean(&[b'a', 0xff, b'b']), "a\u{fffd}b");
    }

    #[test]
    fn status_needs_a_complete_line() {
        assert_eq!(keel_status("keel: VMXON ok\nkeel: exit status 3"), None);
        assert_eq!(
            keel_status("keel: VMXON ok\nkeel: exit status 33\n"),
            Some(33)
        );
        assert_eq!(keel_status("keel: exit status 1\n"), Some(1));
    }

    #[test]
    fn status_takes_the_last_line_and_ignores_junk() {
        let text =
            "keel: exit status 5\nguest: keel: exit status x\nkeel: exit status 33 (no VMX)\n";
        assert_eq!(keel_status(text), Some(33));
        assert_eq!(keel_status("keel: exit status\n"), None);
        assert_eq!(keel_status(""), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail_lines("a\nb", 5), "a\nb\n");
        assert_eq!(tail_lines("", 5), "");
    }

    #[test]
    fn file_tail_follows_appends() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("keel-boot-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("serial.log");
        let _ = std::fs::remove_file(&path);
        let mut tail = FileTail::new(&path);
        assert!(tail.poll()?.is_empty(), "missing file reads as empty");
        std::fs::write(&path, b"one\n")?;
        assert_eq!(tail.poll()?, b"one\n");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
        io::Write::write_all(&mut f, b"two\n")?;
        assert_eq!(tail.poll()?, b"two\n");
        assert!(tail.poll()?.is_empty());
        assert_eq!(file_tail(&path, 1), "two\n");
        std::fs::remove_dir_all(&dir)
    }
}
