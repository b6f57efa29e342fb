//! The host side of Keel's control channel (COM2): during `cargo keel run` the emulator's COM2 is
//! a pseudo-terminal, and a [`Bridge`] joins it to a unix socket, so `cargo keel ctl` (and the
//! integration tests) can send Keel one command line and read its one-line JSON reply
//! ([`request`]). docs/BOOTING.md, "The monitor and the control channel".
//!
//! One client at a time: a new connection takes over from the previous one. What Keel sends while
//! nobody is connected is dropped.
//!
//! Toward Keel the bridge keeps to Keel's flow control (`keel::credit`): nothing before Keel says
//! it listens, then at most a window of bytes on the way and not acknowledged; the hello and the
//! acknowledgements are taken out of the replies. A client's lines go whole, one at a time; those
//! of a client that gave up and was followed by another, not yet begun, never go.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where `cargo keel run` puts the socket unless told otherwise: `target/keel/control.sock` of
/// the checkout.
pub fn default_socket(workspace: &Path) -> PathBuf {
    crate::image::target_dir(workspace)
        .join("keel")
        .join("control.sock")
}

/// The socket joined to the emulator's COM2 terminal, for the length of a run.
pub struct Bridge {
    /// The window, and whether the bridge is going (`Flow::close`), which every thread watches.
    flow: Arc<Flow>,
    threads: Vec<JoinHandle<()>>,
    path: PathBuf,
}

/// The client connected now.
type Current = Arc<Mutex<Option<UnixStream>>>;

impl Bridge {
    /// Listens on `socket` (replacing a stale one) and copies bytes between its client and
    /// `terminal`, the controlling side of COM2's pseudo-terminal.
    pub fn start(terminal: File, socket: &Path) -> Result<Self> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if UnixStream::connect(socket).is_ok() {
            bail!(
                "{} is in use: another `cargo keel run` has its control channel there (give this one --control PATH)",
                socket.display()
            );
        }
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", socket.display())),
        }
        let listener = UnixListener::bind(socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let current: Current = Arc::new(Mutex::new(None));
        let to_keel = terminal.try_clone()?;
        let flow = Arc::new(Flow::new());
        let accept = {
            let (current, flow) = (current.clone(), flow.clone());
            std::thread::spawn(move || accept_loop(listener, to_keel, current, flow))
        };
        let from_keel = {
            let (current, flow) = (current.clone(), flow.clone());
            std::thread::spawn(move || copy_replies(terminal, current, flow))
        };
        Ok(Self {
            flow,
            threads: vec![accept, from_keel],
            path: socket.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(w) = self.flow.window.lock() {
            if w.total_sent > 0 {
                eprintln!(
                    "keel-boot: control channel: {} bytes to Keel, {} acknowledged, {} acknowledgement timeouts",
                    w.total_sent, w.total_acked, w.timeouts
                );
            }
        }
        self.flow.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, to_keel: File, current: Current, flow: Arc<Flow>) {
    while !flow.closed() {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let (Ok(reader), Ok(mut keel)) = (stream.try_clone(), to_keel.try_clone()) else {
                    continue;
                };
                let client = flow.connected();
                if let Ok(mut c) = current.lock() {
                    *c = Some(stream);
                }
                // The client's lines go to COM2 whole, one at a time, as Keel's window allows; the
                // thread ends with the client, or once another client took over.
                let flow = flow.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(reader);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        // A last line without its newline is no command: it does not go.
                        match reader.read_until(b'\n', &mut line) {
                            Ok(_) if line.ends_with(b"\n") => {}
                            _ => return,
                        }
                        if !flow.send_line(&mut keel, &line, client) {
                            return;
                        }
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// How long the bridge waits for an acknowledgement before it takes the window to be free
/// again: Keel acknowledges within a time slice of its own time (a command line before it runs),
/// and nothing goes before it listens (its hello), so only bytes lost on the line stay
/// unacknowledged. Generous, because an emulator on a loaded host may be many times slower than
/// real time, and acknowledgements that come after it open the window too early.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The sender's side of the flow control (`keel::credit`): how many bytes are on the way to Keel
/// and not yet acknowledged. Pure: the caller says what time it is.
#[derive(Debug)]
struct Window {
    /// Keel said it listens (`keel::credit::HELLO`): nothing goes before.
    listening: bool,
    unacked: usize,
    /// When bytes last went or an acknowledgement last came.
    since: Instant,
    /// Times the window was taken to be free without an acknowledgement.
    timeouts: u64,
    /// Bytes sent and bytes acknowledged over the bridge's life.
    total_sent: u64,
    total_acked: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            listening: false,
            unacked: 0,
            since: now,
            timeouts: 0,
            total_sent: 0,
            total_acked: 0,
        }
    }

    /// Bytes that may be sent now (0 before Keel listens, and while the window is full and not
    /// yet timed out).
    fn room(&mut self, now: Instant) -> usize {
        if !self.listening {
            return 0;
        }
        if self.unacked > 0 && now.saturating_duration_since(self.since) >= ACK_TIMEOUT {
            self.unacked = 0;
            self.timeouts += 1;
        }
        keel::credit::WINDOW - self.unacked
    }

    /// How long until a full window times out (before Keel listens: until it does, which wakes
    /// the waiter).
    fn wait(&self, now: Instant) -> Duration {
        if !self.listening {
            return Duration::MAX;
        }
        ACK_TIMEOUT.saturating_sub(now.saturating_duration_since(self.since))
    }

    fn sent(&mut self, n: usize, now: Instant) {
        self.unacked += n;
        self.total_sent += n as u64;
        self.since = now;
    }

    /// Keel listens now: what went before is lost, and nothing is on the way.
    fn hello(&mut self, now: Instant) {
        self.listening = true;
        self.unacked = 0;
        self.since = now;
    }

    fn acked(&mut self, n: usize, now: Instant) {
        // More than is on the way: acknowledgements of bytes sent before a timeout.
        self.unacked = self.unacked.saturating_sub(n);
        self.total_acked += n as u64;
        self.since = now;
    }
}

/// The [`Window`] shared by the threads that write to Keel and the one that reads its replies.
struct Flow {
    window: Mutex<Window>,
    changed: Condvar,
    /// Clients connected so far: the last one is the client. The lines of one before it that
    /// have not begun to go never go (its request gave up; a reply to it would reach the next).
    clients: AtomicU64,
    /// One line goes to Keel at a time, whole.
    turn: Mutex<()>,
    /// The bridge is going: its threads end, and writers waiting for the window give up.
    closed: AtomicBool,
}

impl Flow {
    fn new() -> Self {
        Self {
            window: Mutex::new(Window::new(Instant::now())),
            changed: Condvar::new(),
            clients: AtomicU64::new(0),
            turn: Mutex::new(()),
            closed: AtomicBool::new(false),
        }
    }

    /// A new client took over; its number.
    fn connected(&self) -> u64 {
        let _w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let client = self.clients.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed.notify_all();
        client
    }

    fn close(&self) {
        let _w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Writes `line` to Keel, never more than the window allows on the way. False when it did
    /// not go, or not whole: `client` was no longer the client before its first byte went, the
    /// bridge closed, or the terminal failed.
    fn send_line(&self, keel: &mut File, line: &[u8], client: u64) -> bool {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let mut data = line;
        let mut begun = false;
        while !data.is_empty() {
            let Some(n) = self.take(data.len(), (!begun).then_some(client)) else {
                return false;
            };
            if keel.write_all(&data[..n]).is_err() {
                return false;
            }
            begun = true;
            data = &data[n..];
        }
        true
    }

    /// Waits for room in the window and takes up to `want` bytes of it; `None` once the bridge
    /// closed, or once client `only_for` (if given) is no longer the client.
    fn take(&self, want: usize, only_for: Option<u64>) -> Option<usize> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let gone = only_for.is_some_and(|c| self.clients.load(Ordering::SeqCst) != c);
            if gone || self.closed() {
                return None;
            }
            let now = Instant::now();
            let timeouts = w.timeouts;
            let room = w.room(now);
            if w.timeouts != timeouts {
                eprintln!(
                    "keel-boot: no acknowledgement from Keel on the control channel for {} s; sending on",
                    ACK_TIMEOUT.as_secs()
                );
            }
            if room > 0 {
                let n = room.min(want);
                w.sent(n, now);
                return Some(n);
            }
            let wait = w
                .wait(now)
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            w = match self.changed.wait_timeout(w, wait) {
                Ok((w, _)) => w,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// What came from Keel besides its text: a hello and acknowledgements.
    fn received(&self, got: keel::credit::Received) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if got.hello {
            w.hello(now);
        }
        if got.acked > 0 {
            w.acked(got.acked, now);
        }
        self.changed.notify_all();
    }
}

fn copy_replies(mut terminal: File, current: Current, flow: Arc<Flow>) {
    let mut buf = [0u8; 4096];
    let mut text = Vec::with_capacity(buf.len());
    while !flow.closed() {
        if !crate::pty::readable(&terminal, 50) {
            continue;
        }
        let n = match terminal.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        text.clear();
        let got = keel::credit::strip_acks(&buf[..n], &mut text);
        if got != keel::credit::Received::default() {
            flow.received(got);
        }
        if text.is_empty() {
            continue;
        }
        if let Ok(mut c) = current.lock() {
            let gone = c
                .as_mut()
                .is_some_and(|client| client.write_all(&text).is_err());
            if gone {
                *c = None;
            }
        }
    }
}

/// Sends one command line to the Keel behind `socket` and returns its reply line (JSON, without
/// the newline). Keel reads COM2 between guest time slices, so the reply may take a moment.
pub fn request(socket: &Path, command: &str, timeout: Duration) -> Result<String> {
    if command.contains(['\n', '\r']) {
        bail!("a command is one line");
    }
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to {} (is `cargo keel run` running? it prints its control socket)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let start = Instant::now();
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => bail!("the control channel closed before Keel replied"),
            Ok(_) if line.ends_with('\n') => {
                let reply = line.trim_end().to_string();
                // Bytes a terminal left on the line before the reply are no reply.
                if reply.starts_with('{') {
                    return Ok(reply);
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "no reply from Keel within {:.0} s",
                    start.elapsed().as_secs_f64()
                )
            }
            Err(e) => return Err(e).context("reading Keel's reply"),
        }
    }
}

/// The value of field `key` of a success reply `{"ok":true,...}` (strings unquoted); an error
/// reply is Keel's error.
pub fn field(reply: &str, key: &str) -> Result<String> {
    let body = reply
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or_else(|| anyhow::anyhow!("not a reply: {reply}"))?;
    if body.starts_with("\"ok\":false") {
        bail!(
            "Keel answered: {}",
            describe(reply).err().unwrap_or_default()
        );
    }
    top_level_fields(body)
        .into_iter()
        .find(|(k, _)| unquote(k) == key)
        .map(|(_, v)| unquote(v))
        .ok_or_else(|| anyhow::anyhow!("Keel's reply has no {key:?}: {reply}"))
}

/// What a snapshot transfer moved, and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: usize,
    pub elapsed: Duration,
}

/// `cargo keel ctl snapshot NAME [paused] --out FILE`: Keel takes the snapshot (`command`), then
/// it comes over in base64 chunks (`snapshot-read`); its CRC-32 and header are checked before it
/// is written to `out`.
pub fn fetch_snapshot(
    socket: &Path,
    command: &str,
    out: &Path,
    timeout: Duration,
) -> Result<Transfer> {
    let start = Instant::now();
    let reply = request(socket, command, timeout)?;
    let size: usize = field(&reply, "bytes")?.parse()?;
    let crc: u32 = field(&reply, "crc32")?.parse()?;
    let mut data = Vec::with_capacity(size);
    let mut tries = 0;
    while data.len() < size {
        let read = request(
            socket,
            &format!("snapshot-read {}", data.len()),
            timeout.min(LINE_TIMEOUT),
        )
        .and_then(|reply| {
            let at: usize = field(&reply, "offset")?.parse()?;
            let chunk = keel::snapshot::base64::decode(&field(&reply, "data")?)
                .ok_or_else(|| anyhow::anyhow!("a chunk that is not base64"))?;
            anyhow::ensure!(at == data.len(), "a chunk for offset {at}");
            Ok(chunk)
        });
        let chunk = match read {
            Ok(chunk) => chunk,
            Err(e) if tries < LINE_TRIES => {
                tries += 1;
                eprintln!("keel-boot: snapshot at {}: {e:#}; asking again", data.len());
                continue;
            }
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            bail!("Keel's snapshot ended at {} of {size} bytes", data.len());
        }
        data.extend_from_slice(&chunk);
    }
    if keel::snapshot::crc32(&data) != crc {
        bail!("the snapshot was damaged on the way (CRC-32 differs)");
    }
    keel::snapshot::describe(&data).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(out, &data).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(Transfer {
        bytes: size,
        elapsed: start.elapsed(),
    })
}

/// How long a snapshot chunk's reply may take, and how often a damaged chunk is sent again.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);
const LINE_TRIES: u32 = 4;

/// Bytes per `restore-data` line: 6 KiB of base64, within Keel's 8 KiB control line.
const RESTORE_CHUNK: usize = 4608;

/// `cargo keel ctl restore NAME FILE [paused]`: sends the snapshot in `file` to Keel, which checks
/// it whole and replaces guest `name` by it (or refuses it, with the reason, changing nothing).
pub fn send_snapshot(
    socket: &Path,
    name: &str,
    file: &Path,
    paused: bool,
    timeout: Duration,
) -> Result<Transfer> {
    let start = Instant::now();
    let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let paused = if paused { " paused" } else { "" };
    let begin = request(
        socket,
        &format!("restore {name} {}{paused}", data.len()),
        timeout,
    )?;
    field(&begin, "guest")?;
    let mut sent = 0;
    for chunk in data.chunks(RESTORE_CHUNK) {
        let line = format!("restore-data {}", keel::snapshot::base64::encode(chunk));
        sent += chunk.len();
        // A line the serial line damaged is refused whole (Keel keeps only whole chunks): it is
        // sent again, and Keel's count says whether it came.
        let mut tries = 0;
        loop {
            let reply = request(socket, &line, timeout.min(LINE_TIMEOUT));
            match reply.map_err(|e| e.to_string()).and_then(|r| {
                field(&r, "received")
                    .map_err(|e| e.to_string())
                    .map(|n| n.parse::<usize>().unwrap_or(0))
            }) {
                Ok(n) if n == sent => break,
                Ok(n) => bail!("Keel has {n} bytes of the snapshot, {sent} were sent"),
                Err(e) if tries < LINE_TRIES => {
                    tries += 1;
                    eprintln!(
                        "keel-boot: chunk at {}: {e}; sending it again",
                        sent - chunk.len()
                    );
                }
                Err(e) => bail!("{e}"),
            }
        }
    }
    let end = request(socket, "restore-end", timeout)?;
    if let Err(e) = describe(&end) {
        bail!("Keel refused the snapshot: {e}");
    }
    Ok(Transfer {
        bytes: data.len(),
        elapsed: start.elapsed(),
    })
}

/// A reply for people: `{"ok":false,"error":"..."}` becomes the error's text; a success is shown
/// as its fields, one `key: value` a line (nested lists and objects stay JSON).
pub fn describe(reply: &str) -> std::result::Result<String, String> {
    let Some(body) = reply.strip_prefix('{').and_then(|r| r.strip_suffix('}')) else {
        return Err(format!("not a reply: {reply}"));
    };
    if let Some(rest) = body.strip_prefix("\"ok\":false,\"error\":") {
        return Err(unquote(rest));
    }
    let Some(rest) = body.strip_prefix("\"ok\":true") else {
        return Err(format!("not a reply: {reply}"));
    };
    let mut out = String::new();
    for (key, value) in top_level_fields(rest.trim_start_matches(',')) {
        out.push_str(&format!("{}: {}\n", unquote(key), unquote(value)));
    }
    Ok(out)
}

/// `"a":1,"b":[..]` split at the commas outside strings, brackets and braces, into (key, value).
fn top_level_fields(s: &str) -> Vec<(&str, &str)> {
    let mut fields = Vec::new();
    let (mut depth, mut in_str, mut escaped, mut start) = (0i32, false, false, 0);
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                fields.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        fields.push(&s[start..]);
    }
    fields
        .into_iter()
        .filter_map(|f| {
            // The key is a string without a colon in it (Keel's keys are plain words).
            let colon = f.find("\":")?;
            Some((&f[..colon + 1], &f[colon + 2..]))
        })
        .collect()
}

/// A JSON string's text (the escapes Keel writes undone); other values as they are.
fn unquote(s: &str) -> String {
    let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return s.to_string();
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                if let Some(c) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    out.push(c);
                }
            }
            Some(c) => out.push(c),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pty::Pty;
    use std::fs::OpenOptions;

    /// A bridge on socket `dir/control.sock` (`dir` a new directory named after `name`) and the
    /// emulator's side of its terminal, where the tests play Keel.
    struct Wire {
        pty: Pty,
        dir: PathBuf,
        socket: PathBuf,
        bridge: Option<Bridge>,
        keel: Option<File>,
    }

    impl Wire {
        fn open(name: &str) -> Result<Self> {
            let pty = Pty::open()?;
            let dir = std::env::temp_dir().join(format!("keel-{name}-{}", std::process::id()));
            let socket = dir.join("control.sock");
            let bridge = Bridge::start(pty.controller()?, &socket)?;
            let keel = OpenOptions::new().read(true).write(true).open(&pty.path)?;
            Ok(Self {
                pty,
                dir,
                socket,
                bridge: Some(bridge),
                keel: Some(keel),
            })
        }

        fn keel(&mut self) -> File {
            self.keel.take().expect("one Keel per wire")
        }
    }

    impl Drop for Wire {
        fn drop(&mut self) {
            drop(self.bridge.take());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// What the thread playing Keel returned.
    fn joined<T>(keel_side: std::thread::JoinHandle<std::io::Result<T>>) -> Result<T> {
        let got = keel_side
            .join()
            .map_err(|_| anyhow::anyhow!("the emulator side panicked"))?;
        Ok(got?)
    }

    /// Nothing goes before Keel says it listens, however long it takes to boot; its hello
    /// forgets what was on the way to a Keel before it.
    #[test]
    fn the_window_opens_with_keels_hello() {
        const W: usize = keel::credit::WINDOW;
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        assert_eq!(w.room(t0), 0);
        assert_eq!(
            w.room(t0 + 10 * ACK_TIMEOUT),
            0,
            "no timeout before the hello"
        );
        assert_eq!(w.timeouts, 0);
        let t1 = t0 + 10 * ACK_TIMEOUT;
        w.hello(t1);
        assert_eq!(w.room(t1), W);
        w.sent(W, t1);
        assert_eq!(w.room(t1), 0);
        // Keel started again: what went to the one before is not waited for.
        w.hello(t1);
        assert_eq!(w.room(t1), W);
        assert_eq!(w.timeouts, 0);
    }

    #[test]
    fn the_window_holds_a_fifo_and_opens_with_acknowledgements_or_a_timeout() {
        const W: usize = keel::credit::WINDOW;
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.hello(t0);
        assert_eq!(w.room(t0), W);
        w.sent(W, t0);
        assert_eq!(w.room(t0), 0);
        let t1 = t0 + Duration::from_millis(5);
        w.acked(1, t1);
        assert_eq!(w.room(t1), 1);
        w.sent(1, t1);
        // An acknowledgement restarts the clock; nothing for a whole timeout frees the window.
        let t2 = t1 + ACK_TIMEOUT - Duration::from_millis(1);
        assert_eq!(w.room(t2), 0);
        assert_eq!(w.wait(t2), Duration::from_millis(1));
        assert_eq!(w.timeouts, 0);
        let t3 = t1 + ACK_TIMEOUT;
        assert_eq!(w.room(t3), W);
        assert_eq!(w.timeouts, 1);
        // Late acknowledgements of what went before the timeout open no more than the window.
        w.sent(1, t3);
        w.acked(W + 5, t3);
        assert_eq!(w.room(t3), W);
        // An idle window (nothing on the way) never times out.
        assert_eq!(w.room(t3 + 10 * ACK_TIMEOUT), W);
        assert_eq!(w.timeouts, 1);
    }

    /// A Keel that reads its FIFO slowly never finds more than the window in it, however long the
    /// line: the bridge sends only what was acknowledged. Its reply reaches the client without
    /// the acknowledgements.
    #[test]
    fn a_slow_reader_never_gets_more_than_its_fifo() -> Result<()> {
        let mut wire = Wire::open("flow")?;
        let socket = wire.socket.clone();
        let mut keel = wire.keel();
        let line: String = (0..300)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let keel_side = std::thread::spawn(move || -> std::io::Result<(Vec<u8>, usize)> {
            keel.write_all(&[keel::credit::HELLO])?;
            let (mut got, mut most) = (Vec::new(), 0);
            let mut buf = [0u8; 256];
            while !got.ends_with(b"\n") {
                // Keel busy with a guest: the FIFO fills meanwhile.
                std::thread::sleep(Duration::from_millis(15));
                if !crate::pty::readable(&keel, 1000) {
                    break;
                }
                let n = keel.read(&mut buf)?;
                most = most.max(n);
                got.extend_from_slice(&buf[..n]);
                let mut acks = std::collections::VecDeque::new();
                keel::credit::acknowledge(n, &mut acks);
                keel.write_all(acks.make_contiguous())?;
            }
            let mut reply = Vec::from(&b"{\"ok\":"[..]);
            reply.push(0xff);
            reply.extend_from_slice(b"true}\n");
            keel.write_all(&reply)?;
            Ok((got, most))
        });
        let reply = request(&socket, &line, Duration::from_secs(20))?;
        assert_eq!(reply, "{\"ok\":true}");
        let (got, most) = joined(keel_side)?;
        assert_eq!(got, format!("{line}\n").as_bytes(), "every byte, in order");
        assert!(
            most <= keel::credit::WINDOW,
            "{most} bytes waited in a 16-byte FIFO"
        );
        Ok(())
    }

    #[test]
    fn replies_are_described_for_people() {
        assert_eq!(
            describe("{\"ok\":false,\"error\":\"no guest \\\"x\\\" (see list)\"}"),
            Err("no guest \"x\" (see list)".to_string())
        );
        assert_eq!(
            describe("{\"ok\":true,\"guest\":\"g,1\",\"regs\":{\"rax\":1,\"rip\":2}}"),
            Ok("guest: g,1\nregs: {\"rax\":1,\"rip\":2}\n".to_string())
        );
        assert_eq!(describe("{\"ok\":true}"), Ok(String::new()));
        assert!(describe("garbage").is_err());
    }

    /// A command sent to the socket reaches the emulator's side of the terminal; the line the
    /// emulator writes back is the reply.
    #[test]
    fn a_request_goes_through_the_terminal_and_back() -> Result<()> {
        let mut wire = Wire::open("ctl")?;
        let socket = wire.socket.clone();
        let mut keel = wire.keel();
        let echo = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
            keel.write_all(&[keel::credit::HELLO])?;
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while !got.ends_with(b"\n") {
                keel.read_exact(&mut b)?;
                got.push(b[0]);
                let mut ack = std::collections::VecDeque::new();
                keel::credit::acknowledge(1, &mut ack);
                keel.write_all(ack.make_contiguous())?;
            }
            keel.write_all(b"{\"ok\":true,\"guest\":\"g0\"}\n")?;
            Ok(got)
        });
        let reply = request(&socket, "pause g0", Duration::from_secs(10))?;
        assert_eq!(reply, "{\"ok\":true,\"guest\":\"g0\"}");
        let sent = joined(echo)?;
        assert_eq!(sent, b"pause g0\n");
        // A second run may not take the socket of a live one.
        let busy = Bridge::start(wire.pty.controller()?, &socket).err();
        assert!(format!("{busy:?}").contains("is in use"), "{busy:?}");
        drop(wire.bridge.take());
        assert!(!socket.exists(), "the socket goes with the run");
        let err = request(&socket, "list", Duration::from_secs(1)).unwrap_err();
        assert!(format!("{err:#}").contains("is `cargo keel run` running?"));
        Ok(())
    }

    /// A Keel that boots: it throws away what reaches it before it listens (as Keel empties
    /// COM2's FIFO), says hello after `boot`, then acknowledges every byte and answers each
    /// line with `{"ok":true,"line":N}`, N counting from 1. Returns the lines it answered.
    fn booting_keel(
        mut keel: File,
        boot: Duration,
        lines: usize,
    ) -> std::thread::JoinHandle<std::io::Result<Vec<String>>> {
        std::thread::spawn(move || {
            let listens = Instant::now() + boot;
            let mut b = [0u8; 64];
            while Instant::now() < listens {
                if crate::pty::readable(&keel, 10) {
                    let _ = keel.read(&mut b)?;
                }
            }
            keel.write_all(&[keel::credit::HELLO])?;
            let (mut got, mut line) = (Vec::new(), Vec::new());
            while got.len() < lines {
                let n = keel.read(&mut b)?;
                let mut ack = std::collections::VecDeque::new();
                keel::credit::acknowledge(n, &mut ack);
                keel.write_all(ack.make_contiguous())?;
                for &c in &b[..n] {
                    if c != b'\n' {
                        line.push(c);
                        continue;
                    }
                    got.push(String::from_utf8_lossy(&line).into_owned());
                    line.clear();
                    keel.write_all(format!("{{\"ok\":true,\"line\":{}}}\n", got.len()).as_bytes())?;
                }
            }
            Ok(got)
        })
    }

    /// A command given while Keel still boots waits for its hello and is answered then, whole:
    /// none of it is lost to the boot, and the bridge never sends into the void.
    #[test]
    fn a_command_given_while_keel_boots_is_answered_once_it_listens() -> Result<()> {
        let mut wire = Wire::open("boots")?;
        let socket = wire.socket.clone();
        let keel = wire.keel();
        let keel_side = booting_keel(keel, Duration::from_millis(400), 1);
        let reply = request(&socket, "list", Duration::from_secs(30))?;
        assert_eq!(reply, "{\"ok\":true,\"line\":1}");
        let got = joined(keel_side)?;
        assert_eq!(got, ["list"]);
        let bridge = wire.bridge.as_ref().expect("running");
        let w = bridge.flow.window.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!((w.total_sent, w.timeouts), (5, 0));
        Ok(())
    }

    /// A client that gave up (its request timed out) before its line went to Keel takes the line
    /// with it: Keel sees only the next client's, whole, and that client gets its reply.
    #[test]
    fn the_lines_of_a_client_that_left_never_reach_keel() -> Result<()> {
        let mut wire = Wire::open("left")?;
        let socket = wire.socket.clone();
        let keel = wire.keel();
        let keel_side = booting_keel(keel, Duration::from_millis(1500), 2);
        let gave_up = request(&socket, "pause g0", Duration::from_millis(300)).unwrap_err();
        assert!(format!("{gave_up:#}").contains("no reply"), "{gave_up:#}");
        let reply = request(&socket, "list", Duration::from_secs(30))?;
        assert_eq!(reply, "{\"ok\":true,\"line\":1}");
        let reply = request(&socket, "stats", Duration::from_secs(30))?;
        assert_eq!(reply, "{\"ok\":true,\"line\":2}");
        let got = joined(keel_side)?;
        assert_eq!(got, ["list", "stats"]);
        Ok(())
    }
}
