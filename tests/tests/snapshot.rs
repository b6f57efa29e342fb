//! Snapshots of a running guest (docs/SNAPSHOTS.md): one Bochs boot of
//! tests/guests/manifests/snapshot.toml, driven over the control channel. The counter is
//! snapshotted to a file (left paused), killed, and restored from the file: it goes on counting
//! its seconds with none missing or repeated, and its PIT ticks match its own time. A damaged
//! copy of the file, and the file offered to a guest of another size, are refused with the
//! reason. The same file then boots in a new Keel as a guest of `kind = "snapshot"`, which counts
//! on from the snapshot's second. `cargo itest snapshot -- --nocapture` prints the figures (size,
//! transfer rates).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_boot::control;
use keel_boot::RunOptions;
use keel_tests::{harness_dir, images, Emulator, Firmware, Manifest, Outcome};

use crate::control::{driven_run, wait_for_in_list};
use crate::scheduler::{keel_tsc_hz, pit_ticks_off};

const MANIFEST: Manifest = Manifest::File("tests/guests/manifests/snapshot.toml");
/// The counter's run, in seconds of its own time (snapshot.toml).
const COUNTER_SECS: u64 = 200;

struct Session {
    /// What the session did and saw, in order.
    log: Vec<String>,
    error: Option<String>,
    snapshot: PathBuf,
}

impl Session {
    fn fail(&mut self, why: String) {
        self.log.push(format!("FAILED: {why}"));
        self.error.get_or_insert(why);
    }

    fn send(&mut self, socket: &Path, command: &str) -> String {
        let reply = control::request(socket, command, Duration::from_secs(120))
            .unwrap_or_else(|e| format!("(no reply: {e:#})"));
        self.log.push(format!("{command} -> {reply}"));
        reply
    }
}

fn session() -> Arc<(Outcome, Session)> {
    static ONCE: std::sync::OnceLock<Arc<(Outcome, Session)>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| Arc::new(run_session())).clone()
}

fn run_session() -> (Outcome, Session) {
    let images = images(&MANIFEST).unwrap_or_else(|e| panic!("snapshot: {e}"));
    let work_dir = harness_dir().join("runs").join("bochs-snapshot");
    let socket = work_dir.join("control.sock");
    let mut opts = RunOptions::new(&images.bios, Firmware::Bios, Emulator::Bochs, &work_dir);
    opts.timeout = Some(Duration::from_secs(900));
    opts.control = Some(socket.clone());
    opts.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    let mut s = Session {
        log: Vec::new(),
        error: None,
        snapshot: work_dir.join("counter.snap"),
    };
    let outcome = driven_run("bochs-snapshot", opts, || {
        match wait_for_in_list(&socket, "\"name\":\"other\"", Duration::from_secs(300)) {
            Err(e) => s.fail(format!("Keel never answered: {e}")),
            Ok(()) => {
                drive(&mut s, &socket);
                // Whatever happened, the run ends here.
                s.send(&socket, "quit");
            }
        }
    });
    for line in &s.log {
        println!("{line}");
    }
    (outcome, s)
}

fn drive(s: &mut Session, socket: &Path) {
    // The replies to `list`s sent before Keel listened may still come: they go to nobody once
    // this wait is over (a new connection takes over the channel).
    std::thread::sleep(Duration::from_secs(5));
    let timeout = Duration::from_secs(180);
    let file = s.snapshot.clone();
    match control::fetch_snapshot(socket, "snapshot counter paused", &file, timeout) {
        Ok(t) => s.log.push(format!(
            "snapshot: {} bytes in {:.1} s",
            t.bytes,
            t.elapsed.as_secs_f64()
        )),
        Err(e) => return s.fail(format!("snapshot: {e:#}")),
    }
    let reply = s.send(socket, "kill counter");
    if reply != "{\"ok\":true,\"guest\":\"counter\"}" {
        return s.fail(format!("kill: {reply}"));
    }
    // Damaged: one byte of the middle flipped.
    let mut bytes = std::fs::read(&file).unwrap_or_default();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let damaged = file.with_extension("damaged");
    if let Err(e) = std::fs::write(&damaged, &bytes) {
        return s.fail(format!("cannot write {}: {e}", damaged.display()));
    }
    // (A guest of another size is refused too, with "memory size mismatch": the unit tests and
    // docs/SNAPSHOTS.md; each send here costs a minute of the serial line.)
    let refusals = [("counter", &damaged, "checksum mismatch")];
    for (guest, path, reason) in refusals {
        match control::send_snapshot(socket, guest, path, false, timeout) {
            Ok(_) => return s.fail(format!("{} accepted for {guest}", path.display())),
            Err(e) => {
                let e = format!("{e:#}");
                s.log.push(format!("refused for {guest}: {e}"));
                if !e.contains(reason) {
                    return s.fail(format!("{guest}: refused otherwise than `{reason}`: {e}"));
                }
            }
        }
    }
    match control::send_snapshot(socket, "counter", &file, false, timeout) {
        Ok(t) => s.log.push(format!(
            "restore: {} bytes in {:.1} s",
            t.bytes,
            t.elapsed.as_secs_f64()
        )),
        Err(e) => return s.fail(format!("restore: {e:#}")),
    }
    let ended = "\"name\":\"counter\",\"state\":\"stopped\"";
    if let Err(e) = wait_for_in_list(socket, ended, Duration::from_secs(400)) {
        s.fail(format!("the restored counter did not end: {e}"));
    }
}

/// The seconds the counter printed (`demo: N s, ...`), in order.
fn seconds(boot: &Outcome) -> Vec<u64> {
    boot.guest_lines("counter")
        .filter_map(|l| l.split("demo: ").nth(1))
        .filter_map(|rest| {
            let rest = rest.strip_prefix("done: ").unwrap_or(rest);
            rest.split(" s,").next()?.parse().ok()
        })
        .collect()
}

#[test]
fn a_restored_guest_counts_on_with_no_gap_and_no_repeat() {
    let session = session();
    let (boot, s) = (&session.0, &session.1);
    if let Some(e) = &s.error {
        boot.fail(e);
    }
    boot.expect_in_order(&[
        "keel: guest counter paused",
        "keel: guest counter killed",
        "restored from a snapshot of counter",
        "keel: guest counter resumed",
    ]);
    let got = seconds(boot);
    let expected: Vec<u64> = (1..=COUNTER_SECS).collect();
    if got != expected {
        boot.fail(&format!("the counter printed seconds {got:?}"));
    }
    boot.expect_guest_line("counter", "demo: done:");
    boot.expect_no_keel_failure();
}

/// Its clock went on from the snapshot's: its 100 Hz PIT ticks over its whole run match its
/// own time, the stop between the snapshot and the restore included.
#[test]
fn a_restored_guest_keeps_every_tick_of_its_own_time() {
    let session = session();
    let boot = &session.0;
    if let Some(e) = &session.1.error {
        boot.fail(e);
    }
    let hz = keel_tsc_hz(boot);
    if let Some(wrong) = pit_ticks_off(boot, "counter", hz) {
        boot.fail(&format!("PIT ticks across a restore: {wrong}"));
    }
}

/// The snapshot file booted in a fresh Keel (`kind = "snapshot"`): the counter goes on from the
/// second after the last one it printed before the snapshot, to its end, its ticks still matching
/// its own time.
#[test]
fn a_snapshot_boots_in_a_new_keel_and_counts_on() {
    use keel_tests::{boot_scripted, ScriptedBoot};
    let session = session();
    let (first, s) = (&session.0, &session.1);
    if let Some(e) = &s.error {
        first.fail(e);
    }
    // The seconds printed before the kill: what the snapshot had already done.
    let before_kill: Vec<u64> = {
        let cut = first
            .lines()
            .position(|l| l.contains("keel: guest counter killed"))
            .unwrap_or_else(|| first.fail("no kill"));
        let head: String = first.lines().take(cut).map(|l| format!("{l}\n")).collect();
        head.lines()
            .filter(|l| l.starts_with("[counter] demo: ") && l.contains(" s, "))
            .filter_map(|l| l.split("demo: ").nth(1)?.split(" s,").next()?.parse().ok())
            .collect()
    };
    let last = *before_kill.last().unwrap_or(&0);
    // In this checkout's target directory: other checkouts' test runs on the same machine use
    // the same name.
    let files = harness_dir().join("keel-snapshot-new-keel");
    if let Err(e) = std::fs::create_dir_all(&files)
        .and_then(|()| std::fs::copy(&s.snapshot, files.join("counter.snap")).map(|_| ()))
    {
        first.fail(&format!("cannot copy the snapshot: {e}"));
    }
    let boot = boot_scripted(ScriptedBoot {
        name: "bochs-snapshot-new-keel",
        manifest: "\
# Written by tests/tests/snapshot.rs: the counter's snapshot, booted in a new Keel.
[[guest]]
name = \"counter\"
kind = \"snapshot\"
image = \"counter.snap\"
memory = \"4M\"
",
        files: &files,
        script: Vec::new(),
        memory_mib: 256,
        timeout: Duration::from_secs(600),
    })
    .unwrap_or_else(|e| panic!("bochs-snapshot-new-keel: the boot could not run: {e}"));
    boot.expect_line("restored from a snapshot of counter");
    let got = seconds(&boot);
    let expected: Vec<u64> = (last + 1..=COUNTER_SECS).collect();
    if got != expected {
        boot.fail(&format!(
            "after second {last} the new Keel's counter printed {got:?}"
        ));
    }
    let hz = keel_tsc_hz(&boot);
    if let Some(wrong) = pit_ticks_off(&boot, "counter", hz) {
        boot.fail(&format!("PIT ticks in the new Keel: {wrong}"));
    }
    boot.expect_keel_status(keel_tests::status::COMPLETED);
    boot.expect_no_keel_failure();
}
