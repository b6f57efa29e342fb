//! Snapshots through the bulk disk (docs/SNAPSHOTS.md, "The bulk disk"): one Bochs boot of
//! tests/guests/manifests/bulk.toml with a bulk disk, driven over the control channel. A guest
//! with 12 MiB of patterned RAM is snapshotted through the disk (a stream of over 12 MiB: the
//! serial path stops at 2 MiB), a damaged copy of the file is refused with the guest left
//! running, and the file is restored: the guest then checks every word of its pattern.
//! `cargo itest bulk -- --nocapture` prints the figures (size, times).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_boot::bulk::Keel;
use keel_boot::control;
use keel_boot::migrate::Socket;
use keel_boot::RunOptions;
use keel_tests::{harness_dir, images, Emulator, Firmware, Manifest, Outcome};

use crate::control::{driven_run, wait_for_in_list, wait_for_list};

const MANIFEST: Manifest = Manifest::File("tests/guests/manifests/bulk.toml");

/// What the session did and saw, and the snapshot's size.
struct Session {
    log: Vec<String>,
    error: Option<String>,
    snapshot: PathBuf,
    bulk: PathBuf,
    size: usize,
}

impl Session {
    fn fail(&mut self, why: String) {
        self.log.push(format!("FAILED: {why}"));
        self.error.get_or_insert(why);
    }

    /// `guest`'s snapshot through the disk into [`Session::snapshot`] (left paused if `paused`);
    /// false when it failed.
    fn take(&mut self, path: &Path, guest: &str, paused: bool) -> bool {
        let (bulk, out) = (self.bulk.clone(), self.snapshot.clone());
        let channel = &mut socket(path);
        let k = &mut Keel {
            channel,
            bulk: &bulk,
        };
        match keel_boot::bulk::fetch_snapshot(k, guest, paused, &out) {
            Ok(t) => {
                self.size = t.bytes;
                self.log.push(format!(
                    "{guest} snapshot through the disk: {} bytes in {:.1} s",
                    t.bytes,
                    t.elapsed.as_secs_f64()
                ));
                true
            }
            Err(e) => {
                self.fail(format!("snapshot: {e:#}"));
                false
            }
        }
    }

    /// Restores `guest` from `file` through the disk: Keel's refusal as the error.
    fn give(&mut self, path: &Path, guest: &str, file: &Path) -> Result<(), String> {
        let bulk = self.bulk.clone();
        let channel = &mut socket(path);
        let k = &mut Keel {
            channel,
            bulk: &bulk,
        };
        let t = keel_boot::bulk::send_snapshot(k, guest, file).map_err(|e| format!("{e:#}"))?;
        self.log.push(format!(
            "{guest} restore through the disk: {} bytes in {:.1} s (checked, then written)",
            t.bytes,
            t.elapsed.as_secs_f64()
        ));
        Ok(())
    }

    /// `command`'s reply, which must be ok.
    fn ok(&mut self, socket: &Path, command: &str) -> bool {
        let reply = control::request(socket, command, Duration::from_secs(120))
            .unwrap_or_else(|e| format!("(no reply: {e:#})"));
        self.log.push(format!("{command} -> {reply}"));
        let ok = reply.starts_with("{\"ok\":true");
        if !ok {
            self.fail(format!("{command}: {reply}"));
        }
        ok
    }
}

fn session() -> Arc<(Outcome, Session)> {
    static ONCE: std::sync::OnceLock<Arc<(Outcome, Session)>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| Arc::new(run_session())).clone()
}

fn run_session() -> (Outcome, Session) {
    let images = images(&MANIFEST).unwrap_or_else(|e| panic!("bulk: {e}"));
    let work_dir = harness_dir().join("runs").join("bochs-bulk");
    let socket = work_dir.join("control.sock");
    let bulk = work_dir.join("bulk.img");
    let _ = std::fs::create_dir_all(&work_dir);
    let _ = std::fs::remove_file(&bulk);
    let mut opts = RunOptions::new(&images.bios, Firmware::Bios, Emulator::Bochs, &work_dir);
    opts.timeout = Some(Duration::from_secs(1500));
    opts.control = Some(socket.clone());
    opts.bulk = Some(bulk.clone());
    opts.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    let mut s = Session {
        log: Vec::new(),
        error: None,
        snapshot: work_dir.join("filler.snap"),
        bulk,
        size: 0,
    };
    let outcome = driven_run("bochs-bulk", opts, || {
        match wait_for_in_list(&socket, "\"name\":\"keeper\"", Duration::from_secs(300)) {
            Err(e) => s.fail(format!("Keel never answered: {e}")),
            Ok(()) => {
                drive(&mut s, &socket);
                s.ok(&socket, "quit");
            }
        }
    });
    for line in &s.log {
        println!("{line}");
    }
    (outcome, s)
}

/// A socket with room for a piece's round trip.
fn socket(path: &Path) -> Socket<'_> {
    Socket {
        path,
        timeout: Duration::from_secs(300),
    }
}

fn drive(s: &mut Session, socket: &Path) {
    // Time for the guest to fill its RAM (and for stale `list` replies to drain).
    std::thread::sleep(Duration::from_secs(20));
    if !s.take(socket, "filler", false) {
        return;
    }
    let mut bytes = std::fs::read(&s.snapshot).unwrap_or_default();
    // A byte of a page in the middle flipped, the end checksum made to match: the page's own
    // CRC-32 refuses it.
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let end = bytes.len() - 4;
    let crc = crc32(&bytes[..bytes.len() - 14]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
    let damaged = s.snapshot.with_extension("damaged");
    if let Err(e) = std::fs::write(&damaged, &bytes) {
        return s.fail(format!("cannot write {}: {e}", damaged.display()));
    }
    match s.give(socket, "filler", &damaged) {
        Ok(()) => return s.fail("the damaged snapshot was accepted".into()),
        Err(e) => {
            s.log.push(format!("damaged copy refused: {e}"));
            if !e.contains("checksum mismatch in the page at") {
                return s.fail(format!(
                    "refused otherwise than by the page's checksum: {e}"
                ));
            }
        }
    }
    // Running or halted between its timer ticks: not stopped, not paused.
    let alive = |r: &str| {
        ["running", "halted"]
            .iter()
            .any(|st| r.contains(&format!("\"name\":\"filler\",\"state\":\"{st}\"")))
    };
    if let Err(e) = wait_for_list(socket, alive, Duration::from_secs(60)) {
        return s.fail(format!(
            "after the refused restore the guest is not running: {e}"
        ));
    }
    let file = s.snapshot.clone();
    if let Err(e) = s.give(socket, "filler", &file) {
        return s.fail(format!("restore: {e}"));
    }
    if s.ok(socket, "balloon filler 12M") {
        std::thread::sleep(Duration::from_secs(30));
    }
}

#[test]
fn a_snapshot_larger_than_the_serial_limit_goes_through_the_disk_and_restores_whole() {
    let session = session();
    let (boot, s) = (&session.0, &session.1);
    if let Some(e) = &s.error {
        boot.fail(e);
    }
    if s.size <= 12 << 20 {
        boot.fail(&format!(
            "a snapshot of {} bytes: the guest's 12 MiB of pattern are not all in it",
            s.size
        ));
    }
    boot.expect_in_order(&[
        "keel: bulk disk: ",
        "[filler] balloon: 16384 KiB of RAM",
        "keel: guest filler paused",
        "keel: guest filler resumed",
        "keel: guest filler killed",
        "restored from a snapshot of filler",
        "[filler] balloon: gave 1024 pages (4096 KiB)",
        "[filler] balloon: 8192 KiB intact",
    ]);
    boot.expect_no_keel_failure();
}

/// CRC-32 (IEEE 802.3, reflected), bit by bit: to forge a snapshot's end checksum.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The Linux guest of the tests below: Debian's kernel and busybox, one vCPU; the sleeper keeps
/// Keel going while linux is killed for a restore or not yet migrated in.
const LINUX: &str = "\
[[guest]]
name = \"linux\"
kind = \"linux\"
image = \"vmlinuz\"
initrd = \"initrd\"
memory = \"128M\"
cmdline = \"console=ttyS0 cryptomgr.notests\"
";
const KEEPER: &str = "
[[guest]]
name = \"keeper\"
kind = \"elf\"
image = \"long64.elf\"
memory = \"4M\"
cmdline = \"mode=sleeper secs=100000 every=1000\"
";

/// A Linux guest (Debian's kernel, busybox) snapshotted through the bulk disk in the middle of
/// its shell session and restored into the same Keel: it answers the next command typed.
mod linux {
    use super::*;
    use keel_boot::debian::{self, INIT_MARKER};
    use keel_tests::{scripted_options, ScriptedBoot, Step};

    const NAME: &str = "bochs-bulk-linux";
    fn session() -> Arc<(Outcome, Session)> {
        static ONCE: std::sync::OnceLock<Arc<(Outcome, Session)>> = std::sync::OnceLock::new();
        ONCE.get_or_init(|| Arc::new(run())).clone()
    }

    fn run() -> (Outcome, Session) {
        let files = debian::linux_files(&harness_dir().join("debian"))
            .unwrap_or_else(|e| panic!("{NAME}: {e}"));
        let secs = Duration::from_secs;
        let script = vec![
            Step::new(INIT_MARKER, "echo A-$((0+1))\r", secs(600)),
            // The test snapshots and restores linux here (below), from this thread's other side.
            Step::new("A-1", "", secs(120)),
            Step::new(
                "restored from a snapshot of linux",
                "echo B-$((1+1))\r",
                secs(1500),
            ),
            Step::new("B-2", "uname -r; echo C-$((2+1))\r", secs(300)),
        ];
        let manifest = format!("# Written by tests/tests/bulk.rs (linux).\n{LINUX}{KEEPER}");
        let mut opts = scripted_options(ScriptedBoot {
            name: NAME,
            manifest: &manifest,
            files: &files.dir,
            script,
            memory_mib: 512,
            timeout: secs(2400),
        })
        .unwrap_or_else(|e| panic!("{NAME}: {e}"));
        let work_dir = opts.work_dir.clone();
        let socket = work_dir.join("control.sock");
        let bulk = work_dir.join("bulk.img");
        let _ = std::fs::create_dir_all(&work_dir);
        let _ = std::fs::remove_file(&bulk);
        opts.control = Some(socket.clone());
        opts.bulk = Some(bulk.clone());
        let mut s = Session {
            log: Vec::new(),
            error: None,
            snapshot: work_dir.join("linux.snap"),
            bulk,
            size: 0,
        };
        let serial = work_dir.join("serial.log");
        // An earlier run's log would answer the waits below before this run has begun.
        let _ = std::fs::remove_file(&serial);
        let outcome = driven_run(NAME, opts, || {
            match wait_for_line(&serial, "[linux] A-1", secs(1500)) {
                Err(e) => s.fail(e),
                Ok(()) => snapshot_and_restore(&mut s, &socket),
            }
            if s.error.is_none() {
                if let Err(e) = wait_for_line(&serial, "[linux] C-3", secs(600)) {
                    s.fail(e);
                }
            }
            // Whatever happened, the run ends here.
            s.ok(&socket, "quit");
        });
        for line in &s.log {
            println!("{line}");
        }
        (outcome, s)
    }

    /// Waits until the run's serial log has a line starting with `start`.
    pub(super) fn wait_for_line(serial: &Path, start: &str, limit: Duration) -> Result<(), String> {
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            // Lossy: a guest's console may carry bytes that are not UTF-8.
            let bytes = std::fs::read(serial).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            if text.lines().any(|l| l.trim_end().starts_with(start)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Err(format!("no line `{start}` within {}s", limit.as_secs()))
    }

    fn snapshot_and_restore(s: &mut Session, socket: &Path) {
        if s.take(socket, "linux", true) {
            let file = s.snapshot.clone();
            if let Err(e) = s.give(socket, "linux", &file) {
                s.fail(format!("restore: {e}"));
            }
        }
    }

    #[test]
    fn a_linux_shell_snapshotted_and_restored_answers_the_next_command() {
        let session = session();
        let (boot, s) = (&session.0, &session.1);
        if let Some(e) = &s.error {
            boot.fail(e);
        }
        boot.expect_script_done();
        boot.expect_in_order(&[
            "[linux] A-1",
            "keel: guest linux paused",
            "keel: guest linux killed",
            "restored from a snapshot of linux",
            "[linux] B-2",
            "[linux] C-3",
        ]);
        boot.expect_no_keel_failure();
    }
}

/// A Linux guest live-migrated mid-shell between two Bochs runs, the stream through both bulk
/// disks: it answers the next command typed on B. `--nocapture` prints the figures.
mod linux_migrate {
    use super::*;
    use keel_boot::debian::{self, INIT_MARKER};
    use keel_boot::migrate::{self as mig, Transport};
    use keel_tests::{scripted_options, ScriptedBoot, Step};

    struct Runs {
        a: Outcome,
        b: Outcome,
        s: Session,
        report: Option<mig::Report>,
    }

    fn session() -> Arc<Runs> {
        static ONCE: std::sync::OnceLock<Arc<Runs>> = std::sync::OnceLock::new();
        ONCE.get_or_init(|| Arc::new(run())).clone()
    }

    /// A run named `name` of `manifest` with `script` on its console, a control channel and a
    /// bulk disk: its options, socket, bulk file and serial log.
    fn options(
        name: &'static str,
        manifest: &str,
        script: Vec<Step>,
    ) -> (RunOptions, PathBuf, PathBuf, PathBuf) {
        let files = debian::linux_files(&harness_dir().join("debian"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut opts = scripted_options(ScriptedBoot {
            name,
            manifest,
            files: &files.dir,
            script,
            memory_mib: 512,
            timeout: Duration::from_secs(2400),
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let dir = opts.work_dir.clone();
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::remove_file(dir.join("bulk.img"));
        // An earlier run's log would answer the waits before this run has begun.
        let _ = std::fs::remove_file(dir.join("serial.log"));
        opts.control = Some(dir.join("control.sock"));
        opts.bulk = Some(dir.join("bulk.img"));
        (
            opts,
            dir.join("control.sock"),
            dir.join("bulk.img"),
            dir.join("serial.log"),
        )
    }

    fn run() -> Runs {
        let secs = Duration::from_secs;
        let (opts_a, sock_a, bulk_a, serial_a) = options(
            "bochs-bulk-migrate-a",
            &format!("{LINUX}{KEEPER}"),
            vec![
                Step::new(INIT_MARKER, "echo A-$((0+1))\r", secs(600)),
                Step::new("A-1", "", secs(120)),
            ],
        );
        let (opts_b, sock_b, bulk_b, serial_b) = options(
            "bochs-bulk-migrate-b",
            &format!("{LINUX}autostart = false\n{KEEPER}"),
            vec![
                Step::new("guest linux migrated in", "echo B-$((1+1))\r", secs(2000)),
                Step::new("B-2", "uname -r; echo C-$((2+1))\r", secs(300)),
            ],
        );
        let mut s = Session {
            log: Vec::new(),
            error: None,
            snapshot: PathBuf::new(),
            bulk: bulk_a.clone(),
            size: 0,
        };
        let mut report = None;
        let run_b = std::thread::spawn(move || keel_boot::run(&opts_b));
        let a = driven_run("bochs-bulk-migrate-a", opts_a, || {
            let up = linux::wait_for_line(&serial_a, "[linux] A-1", secs(900))
                .and_then(|()| wait_for_in_list(&sock_b, "\"name\":\"keeper\"", secs(300)));
            if let Err(e) = up {
                s.fail(e);
            } else {
                let timeout = secs(300);
                let mut a = Socket {
                    path: &sock_a,
                    timeout,
                };
                let mut b = Socket {
                    path: &sock_b,
                    timeout,
                };
                let disks = Transport::Disk {
                    a: &bulk_a,
                    b: &bulk_b,
                };
                let log = &mut s.log;
                match mig::migrate_over("linux", &mut a, &mut b, disks, &mut |l| {
                    log.push(l.to_string())
                }) {
                    Ok(r) => {
                        s.log.push(mig::describe("linux", &r));
                        report = Some(r);
                        if let Err(e) = linux::wait_for_line(&serial_b, "[linux] C-3", secs(600)) {
                            s.fail(e);
                        }
                    }
                    Err(e) => s.fail(format!("migration: {e:#}")),
                }
            }
            s.ok(&sock_b, "quit");
            s.ok(&sock_a, "quit");
        });
        let b = match run_b.join() {
            Ok(Ok(result)) => Outcome {
                name: "bochs-bulk-migrate-b",
                result,
            },
            Ok(Err(e)) => panic!("bochs-bulk-migrate-b: the run failed: {e:#}"),
            Err(_) => panic!("bochs-bulk-migrate-b: the run panicked"),
        };
        eprintln!("{}", b.summary());
        for line in &s.log {
            println!("{line}");
        }
        Runs { a, b, s, report }
    }

    #[test]
    fn a_linux_shell_migrated_through_the_disks_answers_the_next_command_on_b() {
        let r = session();
        if let Some(e) = &r.s.error {
            r.a.fail(e);
        }
        r.b.expect_script_done();
        r.a.expect_in_order(&["[linux] A-1", "keel: guest linux migrated away"]);
        r.b.expect_in_order(&[
            "keel: guest linux migrated in",
            "[linux] B-2",
            "[linux] C-3",
        ]);
        let Some(report) = &r.report else {
            r.a.fail("no migration report");
        };
        if report.clock_a != report.clock_b {
            r.b.fail(&format!(
                "the guest's clock was {} at the pause on A, {} at its start on B",
                report.clock_a, report.clock_b
            ));
        }
        r.a.expect_no_keel_failure();
        r.b.expect_no_keel_failure();
    }
}
