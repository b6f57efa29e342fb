//! Weights, caps and the load policy on a running Keel, driven over its control channel (COM2):
//! - `weights_and_caps_*`: three CPU-bound guests (tests/guests/manifests/shares-live.toml) get
//!   `weight b 3`, then `cap c 10%`, then both back, and after each change their shares are
//!   measured over a window of snapshots from `list` (one reply holds every guest's cycles);
//! - `the_load_policy_*`: a CPU-bound hog and an on-demand helper
//!   (tests/guests/manifests/policy.toml): the test pauses and resumes the hog, and the policy
//!   starts and pauses the helper, each decision logged with the load.
//!
//! A module of the `emulators` test target: `cargo itest policy -- --nocapture` shows the figures.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_boot::RunOptions;
use keel_tests::{harness_dir, images, Emulator, Firmware, Manifest, Outcome};

use crate::control::{wait_for_list, Session};

/// Boots `manifest` with a control channel, runs `drive` against it, and returns the boot with
/// the session.
fn live_boot(
    name: &'static str,
    manifest: &Manifest,
    guests: &[&str],
    drive: impl FnOnce(&mut Session, &Path),
) -> (Outcome, Session) {
    let images = images(manifest).unwrap_or_else(|e| panic!("{name}: {e}"));
    let work_dir = harness_dir().join("runs").join(name);
    let socket = work_dir.join("control.sock");
    let mut opts = RunOptions::new(&images.bios, Firmware::Bios, Emulator::Bochs, &work_dir);
    opts.timeout = Some(Duration::from_secs(900));
    opts.control = Some(socket.clone());
    opts.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    let run = std::thread::spawn(move || keel_boot::run(&opts));
    let mut s = Session {
        exchanges: Vec::new(),
        error: None,
    };
    let all_there = |r: &str| {
        guests
            .iter()
            .all(|g| r.contains(&format!("\"name\":\"{g}\"")))
    };
    match wait_for_list(&socket, all_there, Duration::from_secs(300)) {
        Err(e) => s.error = Some(format!("Keel never answered: {e}")),
        Ok(()) => drive(&mut s, &socket),
    }
    if !s
        .exchanges
        .last()
        .is_some_and(|(cmd, reply, _)| cmd == "quit" && reply.contains("\"ok\":true"))
    {
        // Whatever went wrong, end the run.
        s.send(&socket, "quit");
    }
    let result = match run.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{name}: the run failed: {e:#}"),
        Err(_) => panic!("{name}: the run panicked"),
    };
    let outcome = Outcome { name, result };
    eprintln!("{}", outcome.summary());
    for (cmd, reply, t) in &s.exchanges {
        let reply: String = reply.chars().take(300).collect();
        println!("{:>6.0} ms  {cmd:<16} {reply}", t.as_secs_f64() * 1000.0);
    }
    (outcome, s)
}

/// Sends `command` until its reply passes `fits` (at most three times): a reply that came too
/// late for an earlier request (`wait_for_list` gives up on one after 3 s) may come first.
fn ask(s: &mut Session, socket: &Path, command: &str, fits: impl Fn(&str) -> bool) -> String {
    let mut reply = String::new();
    for _ in 0..3 {
        reply = s.send(socket, command);
        if fits(&reply) {
            break;
        }
    }
    reply
}

/// The number after `"key":` in guest `guest`'s object of a `list` reply.
fn guest_field(list: &str, guest: &str, key: &str) -> Option<u64> {
    let at = list.find(&format!("\"name\":\"{guest}\""))?;
    let object = &list[at..at + list[at..].find('}')?];
    let k = format!("\"{key}\":");
    let rest = &object[object.find(&k)? + k.len()..];
    rest.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

// ----- Weights and caps at run time -----

const SHARES_LIVE: Manifest = Manifest::File("tests/guests/manifests/shares-live.toml");
const ABC: [&str; 3] = ["a", "b", "c"];
/// Each measurement spans at least this much of Keel's time (seconds of the TSC): a capped
/// guest's budget comes in 100 ms periods, so a window's edges can be off by 10 ms of its use.
const WINDOW_S: u64 = 10;

/// One phase's figures: each guest's cpu cycles over the window, and the window's reference
/// (every guest's cpu and keel cycles: the CPU never idles while three guests compute), and the
/// time that passed.
struct Window {
    label: &'static str,
    cpu: [f64; 3],
    reference: f64,
    /// The host TSC's advance over the window: the time a cap is a percentage of (the
    /// reference leaves out Keel's own work between slices, the monitor's included).
    elapsed: f64,
}

/// One `list`: each guest's cpu cycles, every guest's cpu and keel cycles added up, and the host
/// TSC of the sample.
fn snapshot(s: &mut Session, socket: &Path) -> Option<([u64; 3], u64, u64)> {
    let list = ask(s, socket, "list", |r| r.contains("\"tsc\":"));
    let mut cpu = [0; 3];
    let mut total = 0;
    for (i, g) in ABC.iter().enumerate() {
        cpu[i] = guest_field(&list, g, "cpu_cycles")?;
        total += cpu[i] + guest_field(&list, g, "keel_cycles")?;
    }
    // `"tsc":N` follows the guests (the memory pool's fields may come after it).
    let tsc = list
        .rsplit("\"tsc\":")
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((cpu, total, tsc))
}

/// Measures a window of at least [`WINDOW_S`] seconds of Keel's time.
fn measure(s: &mut Session, socket: &Path, tsc_hz: u64, label: &'static str) -> Option<Window> {
    let (cpu0, total0, tsc0) = snapshot(s, socket)?;
    let end = Instant::now() + Duration::from_secs(600);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(2));
        let (cpu1, total1, tsc1) = snapshot(s, socket)?;
        if total1 - total0 >= WINDOW_S * tsc_hz {
            return Some(Window {
                label,
                cpu: std::array::from_fn(|i| (cpu1[i] - cpu0[i]) as f64),
                reference: (total1 - total0) as f64,
                elapsed: (tsc1 - tsc0) as f64,
            });
        }
    }
    None
}

fn shares_session() -> Arc<(Outcome, Session, Vec<Window>)> {
    static ONCE: std::sync::OnceLock<Arc<(Outcome, Session, Vec<Window>)>> =
        std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let mut windows = Vec::new();
        let (boot, s) = live_boot("bochs-shares-live", &SHARES_LIVE, &ABC, |s, socket| {
            let stats = ask(s, socket, "stats a", |r| r.contains("\"tsc_hz\":"));
            let Some(tsc_hz) = stats
                .split("\"tsc_hz\":")
                .nth(1)
                .and_then(|r| r.split([',', '}']).next())
                .and_then(|n| n.parse::<u64>().ok())
            else {
                s.error = Some(format!("no tsc_hz in `stats a`: {stats}"));
                return;
            };
            let steps: [(&[&str], &'static str); 3] = [
                (&["weight b 3"], "weights 1:3:1"),
                (&["cap c 10%"], "weights 1:3:1, c capped at 10%"),
                (&["cap c off", "weight b 1"], "back to 1:1:1, no cap"),
            ];
            for (commands, label) in steps {
                for c in commands {
                    let guest =
                        format!("\"guest\":\"{}\"", &c[c.find(' ').unwrap_or(0) + 1..][..1]);
                    let reply = ask(s, socket, c, |r| r.contains(&guest));
                    if !reply.starts_with("{\"ok\":true") {
                        s.error.get_or_insert(format!("`{c}`: {reply}"));
                        return;
                    }
                }
                match measure(s, socket, tsc_hz, label) {
                    Some(w) => windows.push(w),
                    None => {
                        s.error
                            .get_or_insert(format!("no window measured for {label}"));
                        return;
                    }
                }
            }
            s.expect(socket, "quit", "{\"ok\":true,\"quit\":true}");
        });
        Arc::new((boot, s, windows))
    })
    .clone()
}

/// Weights and caps set over the control channel while three CPU-bound guests run: after
/// `weight b 3` they share the CPU 1:3:1, after `cap c 10%` c has 10% of the CPU and a:b stay
/// 1:3, and after `cap c off` and `weight b 1` they are equal again; each within 2% of its
/// share over a window of at least 10 s.
#[test]
fn weights_and_caps_set_over_the_control_channel_hold_within_two_percent() {
    let session = shares_session();
    let (boot, s, windows) = (&session.0, &session.1, &session.2);
    s.fail_on_error(boot);
    let mut wrong = Vec::new();
    let wants: [[Option<f64>; 3]; 3] = [
        [Some(1.0), Some(3.0), Some(1.0)],
        [Some(1.0), Some(3.0), None],
        [Some(1.0), Some(1.0), Some(1.0)],
    ];
    for (w, want) in windows.iter().zip(wants) {
        println!(
            "{}: {:.2} s of Keel's time",
            w.label,
            w.reference / keel_tests_tsc(s)
        );
        // Weights: each weighted guest's share of the weighted guests' cycles.
        let weighted: f64 = (0..3)
            .filter(|&i| want[i].is_some())
            .map(|i| w.cpu[i])
            .sum();
        let weights: f64 = want.iter().flatten().sum();
        for i in 0..3 {
            let Some(weight) = want[i] else { continue };
            let expected = weighted * weight / weights;
            let off = (w.cpu[i] - expected) / expected;
            println!(
                "  {}: {:.0} cycles, weight {weight}: {:+.2}% from its share",
                ABC[i],
                w.cpu[i],
                off * 100.0
            );
            if off.abs() > 0.02 {
                wrong.push(format!(
                    "{}: {} {:+.2}% from its share",
                    w.label,
                    ABC[i],
                    off * 100.0
                ));
            }
        }
        if want[2].is_none() {
            let share = w.cpu[2] / w.elapsed;
            println!(
                "  c: {:.2}% of the time that passed, {:.2}% of the guests' cpu and keel cycles (cap 10%)",
                share * 100.0,
                w.cpu[2] / w.reference * 100.0
            );
            if (share - 0.10).abs() / 0.10 > 0.02 {
                wrong.push(format!(
                    "{}: c had {:.2}% of the CPU",
                    w.label,
                    share * 100.0
                ));
            }
        }
    }
    if windows.len() != 3 {
        wrong.push(format!("{} of 3 windows measured", windows.len()));
    }
    if !wrong.is_empty() {
        boot.fail(&wrong.join("; "));
    }
    boot.expect_in_order(&[
        "keel: guest b: weight 3, no cap",
        "keel: guest c: weight 1, cap 10%",
        "keel: guest c: weight 1, no cap",
        "keel: guest b: weight 1, no cap",
    ]);
    boot.expect_no_keel_failure();
}

/// The TSC rate from the session's `stats a` reply.
fn keel_tests_tsc(s: &Session) -> f64 {
    s.exchanges
        .iter()
        .filter(|(cmd, _, _)| cmd == "stats a")
        .find_map(|(_, r, _)| r.contains("\"tsc_hz\":").then_some(r))
        .and_then(|r| r.split("\"tsc_hz\":").nth(1))
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1.0)
}

// ----- The load policy -----

const POLICY: Manifest = Manifest::File("tests/guests/manifests/policy.toml");

fn policy_session() -> Arc<(Outcome, Session)> {
    static ONCE: std::sync::OnceLock<Arc<(Outcome, Session)>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let (boot, s) = live_boot("bochs-policy", &POLICY, &["hog", "helper"], |s, socket| {
            // The hog keeps the load at 100%: the helper stays held for several windows.
            s.expect_state(socket, "helper", "paused");
            std::thread::sleep(Duration::from_secs(5));
            s.expect_state(socket, "helper", "paused");
            s.expect(socket, "pause hog", "{\"ok\":true,\"guest\":\"hog\"}");
            let started = |r: &str| {
                r.contains("\"name\":\"helper\",\"state\":\"halted\"")
                    || r.contains("\"name\":\"helper\",\"state\":\"running\"")
            };
            if let Err(e) = wait_for_list(socket, started, Duration::from_secs(120)) {
                s.error
                    .get_or_insert(format!("the helper never started: {e}"));
                return;
            }
            s.expect(socket, "resume hog", "{\"ok\":true,\"guest\":\"hog\"}");
            let paused = |r: &str| r.contains("\"name\":\"helper\",\"state\":\"paused\"");
            if let Err(e) = wait_for_list(socket, paused, Duration::from_secs(120)) {
                s.error
                    .get_or_insert(format!("the helper was not paused again: {e}"));
                return;
            }
            // Stable: the hog alone, nothing more to pause or start.
            std::thread::sleep(Duration::from_secs(5));
            s.expect_state(socket, "helper", "paused");
            s.expect(socket, "quit", "{\"ok\":true,\"quit\":true}");
        });
        Arc::new((boot, s))
    })
    .clone()
}

/// The load figure of a decision line: `policy: load 93% over ...`.
fn load_of(line: &str) -> Option<u32> {
    line.split("policy: load ")
        .nth(1)?
        .split('%')
        .next()?
        .parse()
        .ok()
}

/// The helper (on demand) is held while the hog keeps the load at 100%, started when the hog's
/// pause leaves the CPU idle, and paused again when the hog is back: exactly those two
/// decisions, in that order, each logged with a load on the right side of its threshold.
#[test]
fn the_load_policy_starts_and_pauses_the_on_demand_guest() {
    let session = policy_session();
    let (boot, s) = (&session.0, &session.1);
    s.fail_on_error(boot);
    boot.expect_line("keel: policy: on-demand guests start under 30% load and are paused over 80%, the load measured over 1s");
    boot.expect_line("keel: policy: helper waits for the load to be under 30%");
    let decisions: Vec<&str> = boot
        .lines()
        .filter(|l| l.starts_with("keel: policy: load "))
        .collect();
    for d in &decisions {
        println!("{d}");
    }
    let ok = decisions.len() == 2
        && decisions[0].ends_with("< 30%: starting helper")
        && decisions[0].contains(" over 1.0 s ")
        && load_of(decisions[0]).is_some_and(|l| l < 30)
        && decisions[1].ends_with("> 80%: pausing helper")
        && load_of(decisions[1]).is_some_and(|l| l > 80);
    if !ok {
        boot.fail(&format!("policy decisions: {decisions:?}"));
    }
    boot.expect_in_order(&[
        "keel: guest hog paused",
        "keel: policy: load ",
        "keel: guest helper resumed",
        "keel: guest hog resumed",
        "keel: policy: load ",
        "keel: guest helper paused",
    ]);
    boot.expect_no_keel_failure();
}
