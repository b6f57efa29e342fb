//! Keel operated over its control channel (COM2, `cargo keel ctl`'s socket) while it runs: one
//! Bochs boot of tests/guests/manifests/control.toml driven by `list`, `pause`, `resume`,
//! `stats`, `kill`, `restart`, `start` and `quit`. A module of the `emulators` test target:
//! `cargo itest control -- --nocapture` shows the figures (the round trip of a command).
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_boot::control;
use keel_boot::RunOptions;
use keel_tests::{harness_dir, images, Emulator, Firmware, Manifest, Outcome};

use crate::scheduler::{keel_tsc_hz, pit_ticks_off};

const MANIFEST: Manifest = Manifest::File("tests/guests/manifests/control.toml");

/// Asks `list` until `done(reply)` holds (Bochs writes its COM1 file in blocks, so the channel,
/// not serial.log, says what Keel is doing now). A request sent before Keel listens on COM2 is
/// lost (Keel empties the UART when it takes it over) and is simply asked again.
pub(crate) fn wait_for_list(
    socket: &Path,
    done: impl Fn(&str) -> bool,
    limit: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let (mut replies, mut last_reply, mut errors, mut last_error) = (0, None, 0, None);
    while start.elapsed() < limit {
        match control::request(socket, "list", Duration::from_secs(3)) {
            Ok(reply) if done(&reply) => return Ok(()),
            Ok(reply) => {
                replies += 1;
                last_reply = Some((start.elapsed(), reply));
            }
            Err(e) => {
                errors += 1;
                last_error = Some((start.elapsed(), format!("{e:#}")));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let at = |x: Option<(Duration, String)>| match x {
        Some((t, what)) => format!("at {:.1} s: {what}", t.as_secs_f64()),
        None => "none".to_string(),
    };
    Err(format!(
        "not there within {limit:?}; {replies} other replies, the last {}; {errors} failed, the last {}",
        at(last_reply),
        at(last_error)
    ))
}

/// [`wait_for_list`] until the reply contains `needle`; the error names it.
pub(crate) fn wait_for_in_list(socket: &Path, needle: &str, limit: Duration) -> Result<(), String> {
    wait_for_list(socket, |r| r.contains(needle), limit).map_err(|e| format!("{needle} {e}"))
}

/// Runs `opts` (a Bochs run with a control channel) while `drive` operates it from this thread;
/// the run's outcome once the emulator ended. `name` names the run in panics and the summary.
pub(crate) fn driven_run(name: &'static str, opts: RunOptions, drive: impl FnOnce()) -> Outcome {
    let run = std::thread::spawn(move || keel_boot::run(&opts));
    drive();
    let result = match run.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{name}: the run failed: {e:#}"),
        Err(_) => panic!("{name}: the run panicked"),
    };
    let outcome = Outcome { name, result };
    eprintln!("{}", outcome.summary());
    outcome
}

/// What happened on the channel, for the checks after the run.
pub(crate) struct Session {
    /// (command, reply, round trip).
    pub(crate) exchanges: Vec<(String, String, Duration)>,
    pub(crate) error: Option<String>,
}

impl Session {
    pub(crate) fn send(&mut self, socket: &Path, command: &str) -> String {
        let t = Instant::now();
        let reply = control::request(socket, command, Duration::from_secs(60))
            .unwrap_or_else(|e| format!("(no reply: {e:#})"));
        self.exchanges
            .push((command.to_string(), reply.clone(), t.elapsed()));
        reply
    }

    pub(crate) fn expect(&mut self, socket: &Path, command: &str, reply: &str) {
        let got = self.send(socket, command);
        if got != reply && self.error.is_none() {
            self.error = Some(format!("`{command}`: {got}, expected {reply}"));
        }
    }

    /// The state `list` shows for `guest`.
    pub(crate) fn state_of(&mut self, socket: &Path, guest: &str) -> String {
        let list = self.send(socket, "list");
        let key = format!("\"name\":\"{guest}\",\"state\":\"");
        list.find(&key)
            .map(|at| {
                list[at + key.len()..]
                    .split('"')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_else(|| format!("(not in {list})"))
    }

    /// Fails the test with the first thing that went wrong on the channel during `boot`, if any.
    pub(crate) fn fail_on_error(&self, boot: &Outcome) {
        if let Some(e) = &self.error {
            boot.fail(e);
        }
    }

    pub(crate) fn expect_state(&mut self, socket: &Path, guest: &str, state: &str) {
        let got = self.state_of(socket, guest);
        if got != state && self.error.is_none() {
            self.error = Some(format!("{guest} is {got}, expected {state}"));
        }
    }
}

/// The boot and the session, once per test process.
fn session() -> Arc<(Outcome, Session)> {
    static ONCE: std::sync::OnceLock<Arc<(Outcome, Session)>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| Arc::new(run_session())).clone()
}

fn run_session() -> (Outcome, Session) {
    channel_session("bochs-control", &MANIFEST, None, "\"name\":\"idle\"", drive)
}

/// Boots `manifest` in Bochs (`memory_mib` for the machine, else the default) with the control
/// channel on, waits until `list` shows `ready`, has `drive` give its commands, and returns the
/// run's outcome (named `run`, as its directory of run files) with the exchanges, which it prints.
pub(crate) fn channel_session(
    run: &'static str,
    manifest: &Manifest,
    memory_mib: Option<u32>,
    ready: &str,
    drive: fn(&mut Session, &Path),
) -> (Outcome, Session) {
    let images = images(manifest).unwrap_or_else(|e| panic!("{run}: {e}"));
    let work_dir = harness_dir().join("runs").join(run);
    let socket = work_dir.join("control.sock");
    let mut opts = RunOptions::new(&images.bios, Firmware::Bios, Emulator::Bochs, &work_dir);
    opts.timeout = Some(Duration::from_secs(400));
    if let Some(m) = memory_mib {
        opts.memory_mib = m;
    }
    opts.control = Some(socket.clone());
    opts.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    let emulator = std::thread::spawn(move || keel_boot::run(&opts));
    let mut s = Session {
        exchanges: Vec::new(),
        error: None,
    };
    match wait_for_list(&socket, |r| r.contains(ready), Duration::from_secs(300)) {
        Err(e) => s.error = Some(format!("Keel never answered: {e}")),
        Ok(()) => drive(&mut s, &socket),
    }
    let result = match emulator.join() {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("{run}: the run failed: {e:#}"),
        Err(_) => panic!("{run}: the run panicked"),
    };
    let outcome = Outcome { name: run, result };
    eprintln!("{}", outcome.summary());
    for (cmd, reply, t) in &s.exchanges {
        println!("{:>6.0} ms  {cmd:<16} {reply}", t.as_secs_f64() * 1000.0);
    }
    (outcome, s)
}

fn drive(s: &mut Session, socket: &Path) {
    // Keel answers while the guests still start (every one runs then); the sleeper comes to wait
    // in HLT between its ticks within a few seconds.
    let halted = "\"name\":\"sleeper\",\"state\":\"halted\"";
    if let Err(e) = wait_for_list(socket, |r| r.contains(halted), Duration::from_secs(60)) {
        s.error
            .get_or_insert(format!("the sleeper never halted: {e}"));
    }
    s.expect_state(socket, "cpu", "running");
    // Paused while it waits in HLT, for a few seconds of wall time: its clock stops.
    s.expect(
        socket,
        "pause sleeper",
        "{\"ok\":true,\"guest\":\"sleeper\"}",
    );
    s.expect_state(socket, "sleeper", "paused");
    s.expect(
        socket,
        "pause sleeper",
        "{\"ok\":false,\"error\":\"pause sleeper: the guest is already paused\"}",
    );
    std::thread::sleep(Duration::from_secs(4));
    s.expect(
        socket,
        "resume sleeper",
        "{\"ok\":true,\"guest\":\"sleeper\"}",
    );
    s.expect(socket, "kill cpu", "{\"ok\":true,\"guest\":\"cpu\"}");
    s.expect_state(socket, "cpu", "stopped");
    s.expect(socket, "restart cpu", "{\"ok\":true,\"guest\":\"cpu\"}");
    s.expect_state(socket, "cpu", "running");
    s.expect(
        socket,
        "start cpu",
        "{\"ok\":false,\"error\":\"start cpu: the guest is running (restart boots it again)\"}",
    );
    s.expect(
        socket,
        "pause nobody",
        "{\"ok\":false,\"error\":\"no guest \\\"nobody\\\" (see list)\"}",
    );
    let stats = s.send(socket, "stats sleeper");
    if !stats.starts_with("{\"ok\":true,\"guest\":\"sleeper\",") || !stats.contains("\"HLT\"") {
        s.error.get_or_insert(format!("stats sleeper: {stats}"));
    }
    // The sleeper ends by itself (60 s of its own time); then everything stops on `quit`.
    let ended = "\"name\":\"sleeper\",\"state\":\"stopped\"";
    if let Err(e) = wait_for_list(socket, |r| r.contains(ended), Duration::from_secs(200)) {
        s.error
            .get_or_insert(format!("the sleeper did not end: {e}"));
    }
    s.expect(socket, "quit", "{\"ok\":true,\"quit\":true}");
}

#[test]
fn commands_over_the_control_channel_operate_the_guests() {
    let session = session();
    let (boot, s) = (&session.0, &session.1);
    s.fail_on_error(boot);
    boot.expect_line("keel: control channel on COM2");
    boot.expect_line("keel: guest sleeper paused");
    boot.expect_line("keel: guest sleeper resumed");
    boot.expect_line("keel: guest cpu killed");
    boot.expect_line("keel: guest cpu booted again");
    boot.expect_line("keel: guest idle status 0x0: stopped by the operator (quit)");
    boot.expect_no_keel_failure();
}

/// `quit` with no guest failed is the one run that ends with status 0.
#[test]
fn quit_ends_keel_with_success() {
    let session = session();
    let boot = &session.0;
    boot.expect_keel_status(keel_tests::status::QUIT);
    assert_eq!(boot.result.status(), Some(0));
}

/// The sleeper was paused in HLT for seconds, and still counts its 100 Hz ticks exactly over
/// its own time: its clock stopped while it was paused (before the fix a halted guest paused
/// 3 s lost 3,639 of 6,001 ticks).
#[test]
fn a_paused_sleeper_keeps_every_tick_of_its_own_time() {
    let session = session();
    let boot = &session.0;
    let hz = keel_tsc_hz(boot);
    if let Some(wrong) = pit_ticks_off(boot, "sleeper", hz) {
        boot.fail(&format!("PIT ticks after a pause: {wrong}"));
    }
}

/// The same monitor on Keel's console: Ctrl-A c opens the `keel>` prompt on COM1, commands typed
/// there act (the guests keep running and printing), and `quit` typed there ends Keel with 0.
#[test]
fn the_console_prompt_takes_the_same_commands() {
    use keel_tests::{run_script, ScriptedBoot, Step};
    const PROMPT_MANIFEST: &str = "\
# Written by tests/tests/control.rs: the monitor's prompt on COM1.
[[guest]]
name = \"ticker\"
kind = \"elf\"
image = \"long64.elf\"
memory = \"4M\"
cmdline = \"mode=sleeper secs=300\"

[[guest]]
name = \"cpu\"
kind = \"elf\"
image = \"long64.elf\"
memory = \"4M\"
cmdline = \"mode=crunch secs=300\"
";
    let secs = Duration::from_secs;
    // In this checkout's target directory: other checkouts' test runs on the same machine use
    // the same name.
    let files = harness_dir().join("keel-control-prompt-guests");
    let script = vec![
        Step::new("keel: running 2 guests", "\x01c", secs(300)),
        Step::new(
            "keel monitor: `help` lists the commands",
            "pause cpu\r",
            secs(60),
        ),
        Step::new("keel: guest cpu paused", "list\r", secs(60)),
        Step::new("cpu              paused", "", secs(60)),
        // The ticker goes on printing while the prompt is open.
        Step::new("[ticker] demo:", "quit\r", secs(60)),
        Step::new("keel: exit status 0", "", secs(60)),
    ];
    let boot = run_script(
        ScriptedBoot {
            name: "bochs-control-prompt",
            manifest: PROMPT_MANIFEST,
            files: &files,
            script,
            memory_mib: 256,
            timeout: secs(500),
        },
        None,
    );
    boot.expect_in_order(&[
        "keel> pause cpu",
        "keel: guest cpu paused",
        "keel> list",
        "keel> quit",
        "keel: quit: every guest stopped",
    ]);
    boot.expect_keel_status(keel_tests::status::QUIT);
    boot.expect_no_keel_failure();
}
