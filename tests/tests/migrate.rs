//! Live migration between two Keels (docs/SNAPSHOTS.md, "Live migration"): two Bochs runs of
//! tests/guests/manifests/migrate-a.toml and migrate-b.toml, driven over their control channels
//! as `cargo keel migrate` drives them. First a migration whose B goes away midway (B's
//! emulator is killed before the tenth stream line of round 0): the counter keeps counting on A.
//! Then, to a new B, a migration that completes: the counter's seconds go on on B where they
//! stopped on A, none missing or repeated, and A's copy is gone. `cargo itest migrate --
//! --nocapture` prints the figures (rounds, pages, downtime, total time).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use keel_boot::control;
use keel_boot::migrate::{self as mig, Channel, Socket};
use keel_boot::{RunOptions, RunResult};
use keel_tests::{harness_dir, images, Emulator, Firmware, Manifest, Outcome};

use crate::control::wait_for_in_list;

/// A Bochs run in its thread.
type Run = JoinHandle<Result<RunResult, String>>;

const A: Manifest = Manifest::File("tests/guests/manifests/migrate-a.toml");
const B: Manifest = Manifest::File("tests/guests/manifests/migrate-b.toml");

struct Session {
    log: Vec<String>,
    error: Option<String>,
    report: Option<mig::Report>,
}

impl Session {
    fn fail(&mut self, why: String) {
        self.log.push(format!("FAILED: {why}"));
        self.error.get_or_insert(why);
    }

    fn send(&mut self, socket: &Path, command: &str) -> String {
        let reply = control::request(socket, command, Duration::from_secs(60))
            .unwrap_or_else(|e| format!("(no reply: {e:#})"));
        self.log.push(format!("{command} -> {reply}"));
        reply
    }
}

/// The three runs: A, the B that went away, the B the counter moved to.
struct Runs {
    a: Outcome,
    /// The killed B's run, if the runner still made a result of it.
    gone: Option<Outcome>,
    b: Outcome,
    s: Session,
}

fn session() -> Arc<Runs> {
    static ONCE: std::sync::OnceLock<Arc<Runs>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| Arc::new(run_session())).clone()
}

/// Starts a Bochs run of `manifest` with its control socket at `name`/control.sock.
fn start(manifest: &Manifest, name: &str) -> (PathBuf, Run) {
    let images = images(manifest).unwrap_or_else(|e| panic!("migrate: {e}"));
    let work_dir = harness_dir().join("runs").join(name);
    let socket = work_dir.join("control.sock");
    let mut opts = RunOptions::new(&images.bios, Firmware::Bios, Emulator::Bochs, &work_dir);
    opts.timeout = Some(Duration::from_secs(1500));
    opts.control = Some(socket.clone());
    opts.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    (
        socket,
        std::thread::spawn(move || keel_boot::run(&opts).map_err(|e| format!("{e:#}"))),
    )
}

fn finish(name: &'static str, run: Run) -> Outcome {
    let result = match run.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{name}: the run failed: {e}"),
        Err(_) => panic!("{name}: the run panicked"),
    };
    let outcome = Outcome { name, result };
    eprintln!("{}", outcome.summary());
    outcome
}

fn migrate(from: &Path, to: &Path, log: &mut Vec<String>) -> Result<mig::Report, String> {
    let timeout = Duration::from_secs(60);
    let mut a = Socket {
        path: from,
        timeout,
    };
    let mut b = Socket { path: to, timeout };
    mig::migrate("counter", &mut a, &mut b, &mut |line| {
        log.push(line.to_string())
    })
    .map_err(|e| format!("{e:#}"))
}

fn run_session() -> Runs {
    // Built one after the other: the builds share the target directory.
    images(&A).unwrap_or_else(|e| panic!("migrate: {e}"));
    images(&B).unwrap_or_else(|e| panic!("migrate: {e}"));
    let (sock_a, run_a) = start(&A, "bochs-migrate-a");
    let (sock_gone, run_gone) = start(&B, "bochs-migrate-gone");
    let mut s = Session {
        log: Vec::new(),
        error: None,
        report: None,
    };
    let ready = "\"name\":\"other\"";
    let up = wait_for_in_list(&sock_a, ready, Duration::from_secs(400))
        .and_then(|()| wait_for_in_list(&sock_gone, ready, Duration::from_secs(400)));
    if let Err(e) = up {
        s.fail(format!("Keel never answered: {e}"));
    } else {
        std::thread::sleep(Duration::from_secs(5));
        interrupted(&mut s, &sock_a, &sock_gone);
    }
    let gone = match run_gone.join() {
        Ok(Ok(result)) => Some(Outcome {
            name: "bochs-migrate-gone",
            result,
        }),
        // Killed: the run may end without a result.
        _ => None,
    };
    let (sock_b, run_b) = start(&B, "bochs-migrate-b");
    // Waited for even after a failure, so that its `quit` reaches it (a run never told to quit
    // lasts to its timeout).
    match wait_for_in_list(&sock_b, ready, Duration::from_secs(400)) {
        Err(e) => s.fail(format!("the second B never answered: {e}")),
        Ok(()) if s.error.is_none() => {
            std::thread::sleep(Duration::from_secs(5));
            completed(&mut s, &sock_a, &sock_b);
        }
        Ok(()) => {}
    }
    s.send(&sock_b, "quit");
    s.send(&sock_a, "quit");
    let b = finish("bochs-migrate-b", run_b);
    let a = finish("bochs-migrate-a", run_a);
    for line in &s.log {
        println!("{line}");
    }
    Runs { a, gone, b, s }
}

/// The `migrate-data` line of round 0 before which B's emulator is killed: round 0 carries about
/// a hundred of them, so B goes away in its midst however fast the lines go.
const KILL_AT_LINE: u32 = 10;

/// B's control channel, whose emulator is killed (not told to quit over the channel, which
/// carries the migration's lines) before the [`KILL_AT_LINE`]th stream line reaches it.
struct GoesAway<'a> {
    channel: Socket<'a>,
    name: &'static str,
    lines: u32,
    killed: Option<Result<Vec<i32>, String>>,
}

impl Channel for GoesAway<'_> {
    fn ask(&mut self, command: &str) -> anyhow::Result<String> {
        if command.starts_with("migrate-data ") {
            self.lines += 1;
            if self.lines == KILL_AT_LINE {
                self.killed = Some(kill_emulator(self.name));
            }
        }
        self.channel.ask(command)
    }
}

/// A migration whose B is killed during round 0: the counter runs on at A.
fn interrupted(s: &mut Session, a: &Path, b: &Path) {
    let timeout = Duration::from_secs(60);
    let mut from = Socket { path: a, timeout };
    let mut to = GoesAway {
        channel: Socket { path: b, timeout },
        name: "bochs-migrate-gone",
        lines: 0,
        killed: None,
    };
    let mut log = Vec::new();
    let r = mig::migrate("counter", &mut from, &mut to, &mut |line| {
        log.push(line.to_string())
    })
    .map_err(|e| format!("{e:#}"));
    s.log.extend(log);
    match to.killed {
        None => s.fail(format!(
            "the migration sent {} stream lines to B, fewer than the {KILL_AT_LINE} it was to be killed at",
            to.lines
        )),
        Some(Err(e)) => s.fail(e),
        Some(Ok(pids)) => s.log.push(format!(
            "killed the emulator of bochs-migrate-gone before stream line {KILL_AT_LINE} (pids {pids:?})"
        )),
    }
    match r {
        Ok(_) => s.fail("a migration whose B was killed midway completed".into()),
        Err(e) => {
            s.log.push(format!("interrupted migration: {e}"));
            if !e.contains("the guest runs on at A") {
                s.fail(format!("A was not told to abort: {e}"));
            }
        }
    }
    if let Err(e) = wait_for_in_list(
        a,
        "\"name\":\"counter\",\"state\":\"running\"",
        Duration::from_secs(60),
    ) {
        s.fail(format!("the counter does not run on at A: {e}"));
    }
}

/// Kills the emulator of run `name` (started by [`start`]): every process whose command line
/// names its bochsrc (Bochs, and xvfb-run around it), found in /proc. The pids killed.
fn kill_emulator(name: &str) -> Result<Vec<i32>, String> {
    let rc = std::path::absolute(harness_dir().join("runs").join(name).join("bochsrc"))
        .expect("an absolute path");
    let rc = rc.to_string_lossy().into_owned();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(|arg| arg == rc.as_bytes()) {
            // SAFETY: kill(2) on a process of this user's test run; no memory is involved.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
    }
    if killed.is_empty() {
        Err(format!("no emulator of {name} to kill"))
    } else {
        Ok(killed)
    }
}

/// A migration that completes: the counter runs at B, A's copy is gone.
fn completed(s: &mut Session, a: &Path, b: &Path) {
    let mut log = Vec::new();
    let r = migrate(a, b, &mut log);
    s.log.extend(log);
    match r {
        Err(e) => return s.fail(format!("migration: {e}")),
        Ok(report) => {
            s.log.push(mig::describe("counter", &report));
            s.report = Some(report);
        }
    }
    if let Err(e) = wait_for_in_list(
        b,
        "\"name\":\"counter\",\"state\":\"running\"",
        Duration::from_secs(60),
    ) {
        s.fail(format!("the counter does not run at B: {e}"));
    }
    if let Err(e) = wait_for_in_list(
        a,
        "\"name\":\"counter\",\"state\":\"stopped\"",
        Duration::from_secs(60),
    ) {
        s.fail(format!("the counter still runs at A: {e}"));
    }
    // Its seconds at B, for the check.
    std::thread::sleep(Duration::from_secs(60));
}

/// The seconds the counter printed (`demo: N s, ...`), in order.
fn seconds(boot: &Outcome) -> Vec<u64> {
    boot.guest_lines("counter")
        .filter_map(|l| l.split("demo: ").nth(1))
        .filter_map(|rest| rest.split(" s,").next()?.parse().ok())
        .collect()
}

fn checked() -> Arc<Runs> {
    let runs = session();
    if let Some(e) = &runs.s.error {
        runs.a.fail(e);
    }
    runs
}

#[test]
fn a_migrated_guest_counts_on_at_b_with_no_gap_and_no_repeat() {
    let runs = checked();
    let (on_a, on_b) = (seconds(&runs.a), seconds(&runs.b));
    if on_b.is_empty() {
        runs.b.fail("the counter printed nothing at B");
    }
    let mut all = on_a.clone();
    all.extend(&on_b);
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    if all != expected {
        runs.b.fail(&format!(
            "the counter printed {on_a:?} at A, then {on_b:?} at B"
        ));
    }
    runs.b.expect_line("migrated in");
    runs.b.expect_no_line("demo: done");
    runs.b.expect_no_keel_failure();
    runs.a.expect_no_keel_failure();
    let r = runs.s.report.as_ref().expect("a report");
    println!(
        "migration: {} (resent {}, downtime {:.1} s, A's TSC {} paused, total {:.1} s)",
        mig::describe("counter", r),
        r.resent,
        r.downtime.as_secs_f64(),
        r.paused_tsc,
        r.total.as_secs_f64()
    );
    assert_eq!(
        r.clock_a, r.clock_b,
        "the guest's clock goes on from the pause"
    );
}

#[test]
fn a_migration_whose_target_goes_away_leaves_the_guest_running() {
    let runs = checked();
    runs.a.expect_in_order(&[
        "keel: guest counter: migrating out",
        "keel: guest counter: migration aborted, it runs on",
        // Its 4 MiB, split to 4 KiB EPT pages for the migration, are two 2 MiB pages again.
        "keel: guest counter: 2 2 MiB EPT pages restored after the migration",
        "keel: guest counter: migrating out",
        "keel: guest counter migrated away",
    ]);
    if let Some(gone) = &runs.gone {
        gone.expect_no_line("migrated in");
    }
}

#[test]
fn a_migrated_guest_is_gone_from_a() {
    let runs = checked();
    let stopped_at = runs
        .a
        .lines()
        .position(|l| l.contains("guest counter migrated away"))
        .unwrap_or_else(|| runs.a.fail("no `migrated away`"));
    let after: Vec<&str> = runs
        .a
        .lines()
        .skip(stopped_at)
        .filter(|l| l.starts_with("[counter]"))
        .collect();
    if !after.is_empty() {
        runs.a.fail(&format!(
            "the counter printed at A after it left: {after:?}"
        ));
    }
}
