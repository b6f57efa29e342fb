//! Memory given back and the guest lifecycle, driven over the control channel: one Bochs boot of
//! tests/guests/manifests/balloon.toml on a 64 MiB machine, whose pool cannot hold every guest
//! at once. `start late` (12 MiB) fails for want of memory until `balloon big 16M` has the
//! balloon guest (long64 mode=balloon, 32 MiB) give 16 MiB back; then `late` starts in that
//! memory and runs to its end.
//! `late2` starts in the memory of the killed `other`. Finally `balloon big 32M` has `big` take
//! its memory back (it reads as zeros, its other memory intact), and `toucher` checks the balloon
//! calls' errors and is stopped when it reads a page it gave back. A module of the `emulators` test
//! target: `cargo itest balloon -- --nocapture` shows the exchanges and Keel's balloon lines with
//! their cycle counts.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_tests::{Manifest, Outcome};

use crate::control::{channel_session, wait_for_list, Session};

const MANIFEST: Manifest = Manifest::File("tests/guests/manifests/balloon.toml");
const MIB: u64 = 1 << 20;

/// The boot and the session, once per test process.
fn session() -> Arc<(Outcome, Session)> {
    static ONCE: std::sync::OnceLock<Arc<(Outcome, Session)>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| Arc::new(run_session())).clone()
}

fn run_session() -> (Outcome, Session) {
    let (outcome, s) = channel_session(
        "bochs-balloon",
        &MANIFEST,
        Some(64),
        "\"name\":\"big\",\"state\":\"halted\"",
        drive,
    );
    for line in outcome
        .lines()
        .filter(|l| l.contains("balloon target") || l.contains("] balloon: "))
    {
        println!("{line}");
    }
    (outcome, s)
}

/// The number after `"key":` in a JSON reply.
fn number(reply: &str, key: &str) -> Option<u64> {
    let at = reply.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = reply[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// `guest`'s `"memory"` in a `list` reply.
fn memory_of(list: &str, guest: &str) -> Option<u64> {
    let at = list.find(&format!("\"name\":\"{guest}\""))?;
    number(&list[at..], "memory")
}

/// Fails the session (once) with `why` unless `ok`.
fn check(s: &mut Session, ok: bool, why: impl FnOnce() -> String) {
    if !ok && s.error.is_none() {
        s.error = Some(why());
    }
}

fn drive(s: &mut Session, socket: &Path) {
    let list = s.send(socket, "list");
    let free = number(&list, "memory_free").unwrap_or(u64::MAX);
    check(s, free < 12 * MIB, || {
        format!("the test needs less than 12 MiB free for `late` at first: {list}")
    });
    // No room for `late` yet, and the reply says how much there is.
    let reply = s.send(socket, "start late");
    let want = "{\"ok\":false,\"error\":\"start late: not enough memory: need 12 MiB, free ";
    check(s, reply.starts_with(want), || {
        format!("start late: {reply}")
    });
    s.expect_state(socket, "late", "stopped");
    // `big` is asked to keep 16 MiB of its 32: 4096 pages.
    let t = Instant::now();
    let reply = s.send(socket, "balloon big 16M");
    check(s, number(&reply, "target_pages") == Some(4096), || {
        format!("balloon big 16M: {reply}")
    });
    // `big` halts again only once it has given its pages and checked the rest of its memory
    // (it computes meanwhile): its line saying so is out then.
    let settled = |r: &str, memory: u64| {
        memory_of(r, "big") == Some(memory) && r.contains("\"name\":\"big\",\"state\":\"halted\"")
    };
    let given = |r: &str| settled(r, 16 * MIB);
    if let Err(e) = wait_for_list(socket, given, Duration::from_secs(120)) {
        check(s, false, || format!("big did not give 16 MiB back: {e}"));
        return;
    }
    println!(
        "balloon round (command to `list` showing it): {:?}",
        t.elapsed()
    );
    let list = s.send(socket, "list");
    let after = number(&list, "memory_free").unwrap_or(0);
    check(s, after >= free + 16 * MIB, || {
        format!("the pool did not grow by 16 MiB from {free}: {list}")
    });
    s.expect(socket, "start late", "{\"ok\":true,\"guest\":\"late\"}");
    // Kill `other`, and `late2` starts in its memory.
    let reply = s.send(socket, "start late2");
    check(s, reply.contains("not enough memory"), || {
        format!("start late2 before the kill: {reply}")
    });
    s.expect(socket, "kill other", "{\"ok\":true,\"guest\":\"other\"}");
    s.expect(socket, "start late2", "{\"ok\":true,\"guest\":\"late2\"}");
    let ended = |r: &str| {
        ["late", "late2"].iter().all(|g| {
            r.contains(&format!(
                "\"name\":\"{g}\",\"state\":\"stopped\",\"vcpus\":1,\"memory\":0"
            ))
        }) && r.contains("debug-exit status 0x49")
    };
    if let Err(e) = wait_for_list(socket, ended, Duration::from_secs(200)) {
        check(s, false, || format!("late and late2 did not end: {e}"));
    }
    // `big` takes its 16 MiB back (the pool has room again).
    s.send(socket, "balloon big 32M");
    let back = |r: &str| settled(r, 32 * MIB);
    if let Err(e) = wait_for_list(socket, back, Duration::from_secs(120)) {
        check(s, false, || {
            format!("big did not take its memory back: {e}")
        });
    }
    // A guest that reads a page it gave back is stopped, with that reason.
    s.expect(
        socket,
        "start toucher",
        "{\"ok\":true,\"guest\":\"toucher\"}",
    );
    let stopped = |r: &str| r.contains("a page it gave back (BALLOON_GIVE)");
    if let Err(e) = wait_for_list(socket, stopped, Duration::from_secs(60)) {
        check(s, false, || format!("toucher was not stopped: {e}"));
    }
    s.expect(socket, "quit", "{\"ok\":true,\"quit\":true}");
}

#[test]
fn a_ballooned_guest_makes_room_for_another() {
    let session = session();
    let (boot, s) = (&session.0, &session.1);
    s.fail_on_error(boot);
    boot.expect_in_order(&[
        "keel: guest 2 late: autostart = off",
        "keel: guest big: balloon target reached: 4096 pages given back, 16384 K in use (8 calls,",
        "[big] balloon: gave 4096 pages (16384 KiB) in 8 calls",
        "[big] balloon: 8192 KiB intact",
        "keel: guest late started",
        "keel: guest late ended: debug-exit status 0x49",
    ]);
    boot.expect_in_order(&[
        "keel: guest other killed",
        "keel: guest late2 started",
        "keel: guest late2 ended: debug-exit status 0x49",
    ]);
    boot.expect_in_order(&[
        "keel: guest big: balloon target reached: 0 pages given back, 32768 K in use (8 calls,",
        "[big] balloon: took back 4096 pages (16384 KiB) in 8 calls",
        "[big] balloon: 24576 KiB intact",
    ]);
    boot.expect_line("keel: guest other status 0x0: stopped by the operator (kill)");
    boot.expect_in_order(&[
        "[toucher] balloon: checks passed; reading the page it gave back at 0x3ff000",
        "keel: error: guest toucher stopped: killed: read guest-physical 0x3ff000, a page it gave back (BALLOON_GIVE)",
    ]);
    boot.expect_no_line("and was not stopped");
    boot.expect_no_keel_failure();
}
