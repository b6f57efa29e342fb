//! keel-tests: the integration-test harness. It builds Keel images with `keel-boot`, boots them
//! in Bochs or QEMU under a time limit, and checks the lines Keel prints on COM1 and its exit
//! status. When a check fails it prints the last 40 serial lines and the end of the emulator's log.
//!
//! Bochs is slow, so a boot is meant to be shared: declare one [`BootSpec`] per manifest and
//! emulator, and let many `#[test]`s call [`shared_boot`] on it; the first one boots, the others
//! wait for that boot and assert on the same output. Different boots run in parallel because
//! libtest runs tests on several threads.
//!
//! The emulator tests live in `tests/emulators.rs` behind the `emulators` feature (`cargo itest`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use keel_boot::console::Step;
use keel_boot::{console, image, ImageOptions, RunOptions};
pub use keel_boot::{Emulator, Firmware, Images, RunResult};

/// Processors of the emulated machine in a test boot that does not name its count: Keel starts
/// the others at every boot, so every test also checks that AP bring-up leaves the rest intact.
pub const DEFAULT_TEST_CPUS: u32 = 2;

/// Debian's kernel and busybox for the Linux tests (kept in `keel-boot`, whose `bench --linux`
/// boots the same files).
pub use keel_boot::debian;

/// How many serial lines a failure report shows.
pub const REPORT_LINES: usize = 40;

/// The ramdisk a boot gets.
#[derive(Debug, Clone, Copy)]
pub enum Manifest {
    /// Manifest text that names no files (for checks of Keel itself); `name` keys the image cache.
    Inline {
        name: &'static str,
        text: &'static str,
    },
    /// A manifest file in the repository, relative to the workspace root; the guests it names
    /// are built with tests/guests/build.sh.
    File(&'static str),
}

impl Manifest {
    fn key(&self) -> String {
        match self {
            Manifest::Inline { name, .. } => format!("inline-{name}"),
            Manifest::File(path) => format!(
                "file-{}",
                path.trim_end_matches(".toml")
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            ),
        }
    }
}

/// One boot: a manifest, an emulator, a firmware.
#[derive(Debug, Clone, Copy)]
pub struct BootSpec {
    /// Names the boot in reports and its run directory; unique per spec.
    pub name: &'static str,
    pub manifest: Manifest,
    pub emulator: Emulator,
    pub firmware: Firmware,
    /// `None`: the emulator's default (see `Emulator::default_timeout`).
    pub timeout: Option<Duration>,
}

/// Where the harness keeps manifests, images and run files: `target/keel-tests`.
pub fn harness_dir() -> PathBuf {
    image::target_dir(&image::workspace_root()).join("keel-tests")
}

type Slot<T> = Arc<OnceLock<Result<T, String>>>;

/// The slot for `key` in `map`, created empty on first use. The map's lock is held only for the
/// lookup, so different keys are computed in parallel while equal keys wait for one result.
fn slot<T>(map: &Mutex<HashMap<String, Slot<T>>>, key: &str) -> Slot<T> {
    let mut map = map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    map.entry(key.to_string()).or_default().clone()
}

/// Whether the suite runs without APIC virtualization (`KEEL_TEST_APICV=off`).
fn apicv_off() -> bool {
    std::env::var("KEEL_TEST_APICV").is_ok_and(|v| v == "off")
}

fn build_images(manifest: &Manifest) -> Result<Images, String> {
    let root = image::workspace_root();
    let dir = harness_dir();
    // KEEL_TEST_APICV=off runs every boot without APIC virtualization: `[keel] apicv = "off"` is
    // added to each manifest (a guest's own `apicv` key still wins), so the suite checks the
    // emulated path too.
    let apicv_off = apicv_off();
    let key = if apicv_off {
        format!("{}-apicv-off", manifest.key())
    } else {
        manifest.key()
    };
    let out = dir.join("images").join(&key);
    let write = |name: &str, text: &str| {
        let path = dir.join("manifests").join(format!("{name}.toml"));
        std::fs::create_dir_all(dir.join("manifests"))
            .and_then(|()| std::fs::write(&path, text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    let manifest_path = match manifest {
        Manifest::Inline { name, text } => write(name, text)?,
        Manifest::File(rel) => root.join(rel),
    };
    let manifest_path = if apicv_off {
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
        let off = keel_boot::manifest_file::with_keel_setting(&text, "apicv", "off")
            .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
        write(&key, &off)?
    } else {
        manifest_path
    };
    let mut opts = ImageOptions::new(&root);
    opts.manifest = manifest_path;
    opts.out = out;
    opts.quiet = true;
    keel_boot::build_images(&opts).map_err(|e| format!("building the images failed: {e:#}"))
}

/// The images for `manifest`, built once per test process.
pub fn images(manifest: &Manifest) -> Result<Images, String> {
    static IMAGES: OnceLock<Mutex<HashMap<String, Slot<Images>>>> = OnceLock::new();
    let map = IMAGES.get_or_init(Default::default);
    slot(map, &manifest.key())
        .get_or_init(|| build_images(manifest))
        .clone()
}

/// What one boot printed, with the checks tests make on it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: &'static str,
    pub result: RunResult,
}

/// Boots `spec` now (no sharing). Errors are setup failures: a build that failed, a missing
/// emulator. A guest that misbehaves is an `Outcome` whose checks fail.
pub fn boot(spec: &BootSpec) -> Result<Outcome, String> {
    boot_on(spec, None)
}

/// [`boot`] on a machine with `cpus` processors (`None`: the runner's default).
pub fn boot_on(spec: &BootSpec, cpus: Option<u32>) -> Result<Outcome, String> {
    let images = images(&spec.manifest)?;
    let image = match spec.firmware {
        Firmware::Bios => &images.bios,
        Firmware::Uefi => &images.uefi,
    };
    let work_dir = harness_dir().join("runs").join(spec.name);
    let mut opts = RunOptions::new(image, spec.firmware, spec.emulator, &work_dir);
    if spec.timeout.is_some() {
        opts.timeout = spec.timeout;
    }
    // KEEL_TEST_CPUS=N boots every spec that does not name its CPU count on N processors.
    let from_env = std::env::var("KEEL_TEST_CPUS")
        .ok()
        .and_then(|v| v.parse().ok());
    opts.cpus = cpus.or(from_env).unwrap_or(DEFAULT_TEST_CPUS);

    run_and_summarize(spec.name, opts)
}

/// Runs `opts` (echoing COM1 with `KEEL_TEST_ECHO`) and prints the outcome's summary line.
fn run_and_summarize(name: &'static str, mut opts: RunOptions) -> Result<Outcome, String> {
    opts.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    let result = keel_boot::run(&opts).map_err(|e| format!("{name}: {e:#}"))?;
    let outcome = Outcome { name, result };
    eprintln!("{}", outcome.summary());
    Ok(outcome)
}

/// Boots `spec` once per test process and hands every caller the same outcome. A setup failure
/// fails every test that shares the boot, each with the same message.
#[track_caller]
pub fn shared_boot(spec: &'static BootSpec) -> Arc<Outcome> {
    shared_boot_on(spec, None)
}

/// [`shared_boot`] on a machine with `cpus` processors; `spec.name` still keys the boot.
#[track_caller]
pub fn shared_boot_on(spec: &'static BootSpec, cpus: Option<u32>) -> Arc<Outcome> {
    static BOOTS: OnceLock<Mutex<HashMap<String, Slot<Arc<Outcome>>>>> = OnceLock::new();
    let map = BOOTS.get_or_init(Default::default);
    let result = slot(map, spec.name)
        .get_or_init(|| boot_on(spec, cpus).map(Arc::new))
        .clone();
    match result {
        Ok(outcome) => outcome,
        Err(e) => panic!("{}: the boot could not run: {e}", spec.name),
    }
}

/// A boot whose COM1 is driven by a script: each [`Step`] waits for a line, then types its reply
/// into Keel's console (which hands it to the focused guest's 16550). The manifest's files come
/// from `files` (the guests of tests/guests are built into it too). A step that sees no line in
/// time ends the run: `RunResult::script_failed` says which.
pub struct ScriptedBoot<'a> {
    pub name: &'static str,
    /// Manifest text; the files it names are in `files`.
    pub manifest: &'a str,
    pub files: &'a std::path::Path,
    pub script: Vec<Step>,
    pub memory_mib: u32,
    pub timeout: Duration,
}

/// Runs a [`ScriptedBoot`] in Bochs (BIOS). Errors are setup failures.
pub fn boot_scripted(b: ScriptedBoot<'_>) -> Result<Outcome, String> {
    let name = b.name;
    run_and_summarize(name, scripted_options(b)?)
}

/// [`boot_scripted`] on a machine with `cpus` processors (Keel runs vCPUs on each).
pub fn boot_scripted_on(b: ScriptedBoot<'_>, cpus: u32) -> Result<Outcome, String> {
    let name = b.name;
    let mut opts = scripted_options(b)?;
    opts.cpus = cpus;
    run_and_summarize(name, opts)
}

/// A [`ScriptedBoot`] that must run to its script's end, on `cpus` processors (`None`: the
/// default, as [`boot_scripted`]): a setup failure panics with the boot's name, a step that saw
/// no line in time fails the test with the run's report.
#[track_caller]
pub fn run_script(b: ScriptedBoot<'_>, cpus: Option<u32>) -> Outcome {
    let name = b.name;
    let outcome = match cpus {
        Some(n) => boot_scripted_on(b, n),
        None => boot_scripted(b),
    }
    .unwrap_or_else(|e| panic!("{name}: the boot could not run: {e}"));
    outcome.expect_script_done();
    outcome
}

/// The run options of a [`ScriptedBoot`], its images built: for a run that adds to them (a
/// control channel, a bulk disk) before it starts.
pub fn scripted_options(b: ScriptedBoot<'_>) -> Result<RunOptions, String> {
    let root = image::workspace_root();
    let dir = harness_dir();
    image::build_guests(&root, b.files, true).map_err(|e| {
        format!(
            "building the test guests into {} failed: {e:#}",
            b.files.display()
        )
    })?;
    // KEEL_TEST_APICV=off: as for the other boots (`build_images`), under a name of its own.
    let (name, text) = if apicv_off() {
        let off = keel_boot::manifest_file::with_keel_setting(b.manifest, "apicv", "off")
            .map_err(|e| format!("{}: {e}", b.name))?;
        (format!("{}-apicv-off", b.name), off)
    } else {
        (b.name.to_string(), b.manifest.to_string())
    };
    let manifest = dir.join("manifests").join(format!("{name}.toml"));
    std::fs::create_dir_all(dir.join("manifests"))
        .and_then(|()| std::fs::write(&manifest, text))
        .map_err(|e| format!("cannot write {}: {e}", manifest.display()))?;
    let mut opts = ImageOptions::new(&root);
    opts.manifest = manifest;
    opts.files = Some(b.files.to_path_buf());
    opts.out = dir.join("images").join(&name);
    opts.quiet = true;
    let images =
        keel_boot::build_images(&opts).map_err(|e| format!("building the images failed: {e:#}"))?;
    let work_dir = dir.join("runs").join(&name);
    let mut run = RunOptions::new(&images.bios, Firmware::Bios, Emulator::Bochs, &work_dir);
    // One CPU (the keys typed reach Keel at the turns of one CPU), or N with KEEL_TEST_CPUS=N:
    // typed keys with several CPUs reading COM1 (`boot_scripted_on` names its count itself).
    if let Some(n) = std::env::var("KEEL_TEST_CPUS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        run.cpus = n;
    }
    run.timeout = Some(b.timeout);
    run.memory_mib = b.memory_mib;
    run.script = b.script;
    run.echo = std::env::var_os("KEEL_TEST_ECHO").is_some();
    Ok(run)
}

/// Keel's exit statuses: `(code << 1) | 1` for each `ExitCode` of hypervisor/src/arch/mod.rs,
/// as printed in `keel: exit status N` and reported by QEMU's isa-debug-exit.
pub mod status {
    /// `ExitCode::Completed` (0x00): every guest ran to its end (whatever each guest's own end).
    pub const COMPLETED: u32 = 1;
    /// `ExitCode::NoVmx` (0x10).
    pub const NO_VMX: u32 = (0x10 << 1) | 1;
    /// `ExitCode::NoGuests` (0x13): no ramdisk, a bad one, no guest in the manifest or none
    /// that could start.
    pub const NO_GUESTS: u32 = (0x13 << 1) | 1;
    /// `ExitCode::Panic` (0x1f): a panic or a CPU exception in Keel.
    pub const PANIC: u32 = (0x1f << 1) | 1;
    /// `ExitCode::Quit`: the operator's `quit` with no guest failed, the one success (Keel prints
    /// 0; QEMU's isa-debug-exit can only end with 3 then).
    pub const QUIT: u32 = 0;
}

/// What Keel prints, and only prints, when Keel itself failed: a fatal line (a panic is
/// `keel: fatal: PANIC at ...`, a CPU exception `keel: fatal: CPU exception in Keel: ...`), a
/// `KEEL BUG` report, a guest stopped for a Keel bug, and a guest the CPU refused to enter (a
/// state Keel failed to check). Each is the exact text of the kernel's format string (the unit
/// test `failure_markers_are_what_keel_prints` checks them against hypervisor/src).
pub const KEEL_FAILURE_MARKERS: [&str; 4] = [
    "keel: fatal: ",
    "KEEL BUG: ",
    "(a Keel bug)",
    " stopped: VM entry failed: ",
];

/// How Keel prefixes a guest's console lines on COM1.
pub fn guest_prefix(name: &str) -> String {
    format!("[{name}] ")
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

impl Outcome {
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.result.serial.lines()
    }

    /// The first COM1 line that contains `needle`.
    pub fn find_line(&self, needle: &str) -> Option<&str> {
        self.lines().find(|l| l.contains(needle))
    }

    /// One line for logs: status, wall time, times to the first lines.
    pub fn summary(&self) -> String {
        let r = &self.result;
        format!(
            "[{}] keel status {}, emulator status {}, {}{:.1} s wall (first serial line {}, first Keel line {})",
            self.name,
            r.keel_status.map_or("none".into(), |s| s.to_string()),
            r.exit_code.map_or("none".into(), |s| s.to_string()),
            if r.timed_out { "TIMED OUT, " } else { "" },
            r.wall.as_secs_f64(),
            secs(r.first_serial_line_after),
            secs(r.first_keel_line_after),
        )
    }

    /// The failure report: summary, the last serial lines, the emulator log's end, port 0xE9.
    pub fn report(&self) -> String {
        let r = &self.result;
        let mut out = format!("{}\nrun files: {}\n", self.summary(), r.work_dir.display());
        out.push_str(&format!("--- last {REPORT_LINES} lines of COM1 ---\n"));
        out.push_str(&console::tail_lines(&r.serial, REPORT_LINES));
        if !r.emulator_log_tail.is_empty() {
            out.push_str("--- end of the emulator log ---\n");
            out.push_str(&r.emulator_log_tail);
        }
        if !r.e9.is_empty() {
            out.push_str("--- port 0xE9 ---\n");
            out.push_str(&console::tail_lines(&r.e9, 20));
        }
        out
    }

    #[track_caller]
    pub fn fail(&self, why: &str) -> ! {
        panic!("{}: {why}\n{}", self.name, self.report())
    }

    /// Fails unless a scripted boot's every step saw its line in time
    /// (`RunResult::script_failed` names the one that did not).
    #[track_caller]
    pub fn expect_script_done(&self) {
        if let Some(failed) = &self.result.script_failed {
            self.fail(failed);
        }
    }

    /// The first line containing `needle`; fails the test if there is none.
    #[track_caller]
    pub fn expect_line(&self, needle: &str) -> &str {
        match self.find_line(needle) {
            Some(line) => line,
            None => self.fail(&format!("no COM1 line contains `{needle}`")),
        }
    }

    /// Fails the test if any line contains `needle`.
    #[track_caller]
    pub fn expect_no_line(&self, needle: &str) {
        if let Some(line) = self.find_line(needle) {
            self.fail(&format!("unexpected COM1 line `{line}`"));
        }
    }

    /// The console lines of guest `name` (Keel prints them as `[name] text`), prefix removed.
    pub fn guest_lines<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let prefix = guest_prefix(name);
        self.lines()
            .filter_map(move |l| l.strip_prefix(prefix.as_str()))
    }

    /// The first console line of guest `name` that contains `needle`; fails the test if none.
    #[track_caller]
    pub fn expect_guest_line(&self, name: &str, needle: &str) -> &str {
        match self.guest_lines(name).find(|l| l.contains(needle)) {
            Some(line) => line,
            None => self.fail(&format!(
                "guest {name} printed no line containing `{needle}`"
            )),
        }
    }

    /// Fails if guest `name` printed a line containing `needle`.
    #[track_caller]
    pub fn expect_no_guest_line(&self, name: &str, needle: &str) {
        if let Some(line) = self.guest_lines(name).find(|l| l.contains(needle)) {
            self.fail(&format!("guest {name} printed `{line}`"));
        }
    }

    /// Fails if a line containing `bad` comes before the first line containing `marker` (or
    /// anywhere, if `marker` never appears).
    #[track_caller]
    pub fn expect_none_before(&self, bad: &str, marker: &str) {
        for line in self.lines() {
            if line.contains(marker) {
                return;
            }
            if line.contains(bad) {
                self.fail(&format!("`{line}` came before `{marker}`"));
            }
        }
    }

    /// Fails unless the lines containing the needles appear, in this order.
    #[track_caller]
    pub fn expect_in_order(&self, needles: &[&str]) {
        let mut lines = self.lines();
        for needle in needles {
            if !lines.any(|l| l.contains(needle)) {
                self.fail(&format!(
                    "`{needle}` missing or out of order in {needles:?}"
                ));
            }
        }
    }

    /// Keel's `keel: exit status N` line must say `status`.
    #[track_caller]
    pub fn expect_keel_status(&self, status: u32) {
        if self.result.timed_out {
            self.fail("timed out");
        }
        if self.result.keel_status != Some(status) {
            self.fail(&format!(
                "expected `keel: exit status {status}`, got {:?}",
                self.result.keel_status
            ));
        }
    }

    /// Keel printed none of its failure markers ([`KEEL_FAILURE_MARKERS`]).
    #[track_caller]
    pub fn expect_no_keel_failure(&self) {
        for marker in KEEL_FAILURE_MARKERS {
            self.expect_no_line(marker);
        }
    }

    /// Keel ran to its end with every guest done ([`status::COMPLETED`]), printing none of its
    /// failure markers.
    #[track_caller]
    pub fn expect_keel_unhurt(&self) {
        self.expect_no_keel_failure();
        self.expect_keel_status(status::COMPLETED);
    }

    /// The emulator's own exit status (QEMU's isa-debug-exit status) must be `code`.
    #[track_caller]
    pub fn expect_exit_code(&self, code: i32) {
        if self.result.exit_code != Some(code) {
            self.fail(&format!(
                "expected the emulator to exit with {code}, got {:?}",
                self.result.exit_code
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn outcome(serial: &str) -> Outcome {
        Outcome {
            name: "sample",
            result: RunResult {
                serial: serial.into(),
                keel_status: console::keel_status(serial),
                emulator_log_tail: "bochs: the end\n".into(),
                ..RunResult::default()
            },
        }
    }

    fn failure(f: impl FnOnce()) -> String {
        let err = catch_unwind(AssertUnwindSafe(f)).expect_err("the check should fail");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn passing_checks() {
        let o =
            outcome("INFO : 4th Stage\nkeel: VMXON ok (region at 0x1000)\nkeel: exit status 1\n");
        assert_eq!(
            o.expect_line("VMXON ok"),
            "keel: VMXON ok (region at 0x1000)"
        );
        o.expect_no_line("fatal");
        o.expect_in_order(&["4th Stage", "VMXON ok", "exit status"]);
        o.expect_none_before("fatal", "VMXON ok");
        o.expect_keel_status(1);
        o.expect_keel_unhurt();
    }

    #[test]
    fn failure_report_has_the_last_40_lines_and_the_log() {
        let serial: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let o = outcome(&serial);
        let msg = failure(|| {
            o.expect_line("VMXON ok");
        });
        assert!(msg.contains("no COM1 line contains `VMXON ok`"), "{msg}");
        assert!(
            msg.contains("line 60\n") && msg.contains("line 99\n"),
            "{msg}"
        );
        assert!(!msg.contains("line 59\n"), "more than 40 lines: {msg}");
        assert!(msg.contains("bochs: the end"), "{msg}");
    }

    #[test]
    fn failing_checks() {
        let o = outcome("keel: b\nkeel: a\nkeel: exit status 33\n");
        assert!(failure(|| o.expect_in_order(&["a", "b"])).contains("out of order"));
        assert!(failure(|| o.expect_keel_status(1)).contains("got Some(33)"));
        assert!(failure(|| o.expect_exit_code(33)).contains("got None"));
        assert!(failure(|| o.expect_no_line("keel: a")).contains("unexpected COM1 line"));
        assert!(failure(|| o.expect_none_before("keel: a", "status")).contains("came before"));
        assert!(failure(|| o.expect_none_before("keel: a", "never")).contains("came before"));
        let o = outcome("keel: starting\n");
        assert!(failure(|| o.expect_keel_unhurt()).contains("got None"));
        let o = outcome("keel: exit status 39\n");
        assert!(failure(|| o.expect_keel_unhurt()).contains("got Some(39)"));
    }

    /// Each line Keel prints when Keel failed trips the check; guest lines that merely talk
    /// about panics or bugs do not.
    #[test]
    fn keel_failures_are_caught_by_their_exact_text() {
        for line in [
            "keel: fatal: PANIC at hypervisor/src/x.rs:1:2: oops",
            "keel: fatal: CPU exception in Keel: #UD invalid opcode",
            "keel: fatal: bad ramdisk: archive entry 2 has the name of an earlier entry",
            "keel: error: KEEL BUG: EPT misconfiguration at guest-physical 0x1000 in guest g",
            "keel: error: guest g stopped: killed: EPT misconfiguration at 0x1000 (a Keel bug)",
            "keel: error: guest g stopped: VM entry failed: invalid guest state (exit reason 33)",
        ] {
            let o = outcome(&format!(
                "keel: running 1 guests\n{line}\nkeel: exit status 1\n"
            ));
            let msg = failure(|| o.expect_keel_unhurt());
            assert!(
                msg.contains(&format!("unexpected COM1 line `{line}`")),
                "{msg}"
            );
        }
        outcome("[g] g: panic: a guest's own\n[g] g: KEEL BUG hunt\nkeel: exit status 1\n")
            .expect_keel_unhurt();
    }

    /// The markers and statuses are the kernel's own text: a change there that these miss
    /// would make every negative check pass vacuously.
    #[test]
    fn failure_markers_are_what_keel_prints() {
        let src = image::workspace_root().join("hypervisor/src");
        let read =
            |f: &str| std::fs::read_to_string(src.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let (log, ept, guest, main, arch, hv) = (
            read("log.rs"),
            read("exits/ept.rs"),
            read("guest.rs"),
            read("main.rs"),
            read("arch/mod.rs"),
            read("runloop.rs"),
        );
        assert!(log.contains(r#"format_args!("keel: {}{}\n", level.tag(), args)"#));
        assert!(log.contains(r#"Level::Fatal => "fatal: ""#));
        assert!(main.contains(r#"fatal!("PANIC at {}:{}: {}""#));
        assert!(ept.contains(r#""KEEL BUG: EPT misconfiguration"#));
        assert!(ept.contains(r#"(a Keel bug)""#));
        assert!(hv.contains(r#"error!("guest {} stopped: {reason}", g.name)"#));
        assert!(guest.contains(r#"Self::EntryFailed(why) => write!(f, "VM entry failed: {why}")"#));
        for (code, value) in [
            ("Completed = 0x00", status::COMPLETED),
            ("NoVmx = 0x10", status::NO_VMX),
            ("NoGuests = 0x13", status::NO_GUESTS),
            ("Panic = 0x1f", status::PANIC),
        ] {
            assert!(arch.contains(code), "ExitCode {code} changed");
            let n = u32::from_str_radix(&code[code.len() - 2..], 16).unwrap_or(u32::MAX);
            assert_eq!((n << 1) | 1, value, "{code}");
        }
        assert!(arch.contains("let status = ((code as u32) << 1) | 1;"));
    }

    #[test]
    fn guest_lines_are_split_by_prefix() {
        let o = outcome("[a] a: hello\n[ab] ab: hello\nkeel: [a] not a guest line\n[a] a: done\n");
        assert_eq!(
            o.guest_lines("a").collect::<Vec<_>>(),
            ["a: hello", "a: done"]
        );
        assert_eq!(o.expect_guest_line("ab", "hello"), "ab: hello");
        o.expect_no_guest_line("ab", "done");
        assert!(failure(|| {
            o.expect_guest_line("ab", "done");
        })
        .contains("guest ab printed no line containing `done`"));
        assert!(failure(|| o.expect_no_guest_line("a", "done")).contains("printed `a: done`"));
    }

    #[test]
    fn manifest_keys_are_file_names() {
        assert_eq!(
            Manifest::File("tests/guests/manifests/demo.toml").key(),
            "file-tests_guests_manifests_demo"
        );
        assert_eq!(
            Manifest::Inline {
                name: "no-guests",
                text: ""
            }
            .key(),
            "inline-no-guests"
        );
    }

    #[test]
    fn equal_keys_share_one_computation() {
        let map: Mutex<HashMap<String, Slot<u32>>> = Mutex::default();
        let calls = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    slot(&map, "k").get_or_init(|| {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok(7)
                    });
                });
            }
        });
        assert_eq!(calls.into_inner(), 1);
        assert_eq!(slot(&map, "k").get().cloned(), Some(Ok(7)));
    }
}
