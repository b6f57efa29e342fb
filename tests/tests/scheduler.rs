//! The scheduler and virtual-time checks: one Bochs boot of `tests/guests/manifests/sched.toml`
//! (seven long64 guests, docs/SCHEDULING.md), several tests reading it. A module of the
//! `emulators` test target (`cargo itest scheduler -- --nocapture`); the measured shares and tick
//! counts are printed, and `--nocapture` shows them when the tests pass.
//!
//! What the guests do (tests/guests/long64/src/timeshare.rs):
//! - cpu1-cpu3: CPU-bound for 12 s of their own time each;
//! - sleeper: PIT at 100 Hz, halts between ticks for 40 s;
//! - ticks: PIT at 100 Hz and LAPIC timer at 1 kHz counted over 50 000 000 TSC cycles;
//! - clispin: 30 000 000 TSC cycles with interrupts off and no exits;
//! - timekeeper: halts 10 s on one LAPIC one-shot, then PRINT_STATS: the snapshot table.
use std::collections::HashMap;
use std::time::Duration;

use keel_tests::{guest_prefix, shared_boot_on, BootSpec, Emulator, Firmware, Manifest, Outcome};

static SCHED: BootSpec = BootSpec {
    name: "bochs-sched",
    manifest: Manifest::File("tests/guests/manifests/sched.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    // About 10-20 s on an idle machine; the limit leaves room for a loaded one.
    timeout: Some(Duration::from_secs(240)),
};

const CPU_BOUND: [&str; 3] = ["cpu1", "cpu2", "cpu3"];
/// Every guest and the status Keel reports when it ends: `(code << 1) | 1` for the exit code the
/// guest writes to port 0xf4 (long64: crunch 0x23, sleeper 0x24, ticks 0x22, clispin 0x25,
/// timekeeper 0x26).
const STATUSES: [(&str, u32); 7] = [
    ("cpu1", 0x47),
    ("cpu2", 0x47),
    ("cpu3", 0x47),
    ("sleeper", 0x49),
    ("ticks", 0x45),
    ("clispin", 0x4b),
    ("timekeeper", 0x4d),
];
/// Keel's status when every guest ran to its end (`ExitCode::Completed`, 0 << 1 | 1).
const COMPLETED: u32 = keel_tests::status::COMPLETED;
/// What the timekeeper prints right before its PRINT_STATS.
const SNAPSHOT_MARKER: &str = "[timekeeper] demo: 10 s";
/// What shares.toml's timekeeper prints right before its PRINT_STATS at 5 s and at 20 s of its
/// time: the cap is measured between the two.
const CAP_FROM_MARKER: &str = "[timekeeper] demo: 5 s";
const CAP_TO_MARKER: &str = "[timekeeper] demo: 20 s";

/// One `print_stats` table: column name -> value, per guest, in manifest order.
#[derive(Debug)]
pub(crate) struct Table {
    rows: Vec<(String, HashMap<String, String>)>,
    /// The host TSC the table was made at (its last line, `keel: host tsc N`).
    tsc: Option<u64>,
}

impl Table {
    /// The first table that starts after the first line containing `after` (from the start when
    /// `after` is empty). Columns are named by the header, whose names are separated by two or more
    /// spaces (`cpu cycles`, `halted cycles`); a row's values by whitespace.
    pub(crate) fn parse(lines: &[&str], after: &str) -> Option<Table> {
        let start = lines.iter().position(|l| l.contains(after))?;
        let body: Vec<&str> = lines[start..]
            .iter()
            .map(|l| l.strip_prefix("keel: ").unwrap_or(""))
            .collect();
        let header = body
            .iter()
            .position(|l| l.starts_with("guest ") && l.contains("cpu cycles"))?;
        let columns: Vec<String> = body[header]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        let rows = body[header + 1..]
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .take_while(|values| {
                values.len() == columns.len() && values[1].bytes().all(|b| b.is_ascii_digit())
            })
            .map(|values| {
                let row = columns
                    .iter()
                    .cloned()
                    .zip(values.iter().map(|v| v.to_string()))
                    .collect();
                (values[0].to_string(), row)
            })
            .collect();
        let tsc = body[header..]
            .iter()
            .find_map(|l| l.strip_prefix("host tsc "))
            .and_then(|n| n.trim().parse().ok());
        Some(Table { rows, tsc })
    }

    fn get(&self, guest: &str, column: &str) -> Option<&str> {
        let (_, row) = self.rows.iter().find(|(name, _)| name == guest)?;
        row.get(column).map(String::as_str)
    }

    pub(crate) fn cpu(&self, guest: &str) -> Option<u64> {
        self.get(guest, "cpu cycles")?.parse().ok()
    }

    fn total_cpu(&self) -> u64 {
        self.rows
            .iter()
            .filter_map(|(name, _)| self.cpu(name))
            .sum()
    }

    /// Each guest's cpu cycles and share of the table's total, for the test output.
    fn shares(&self) -> String {
        let total = self.total_cpu().max(1);
        self.rows
            .iter()
            .map(|(name, row)| {
                let cpu = self.cpu(name).unwrap_or(0);
                format!(
                    "  {name:<12} {cpu:>12} cpu cycles {:>6.2}%  {}\n",
                    100.0 * cpu as f64 / total as f64,
                    row.get("state").map_or("?", String::as_str)
                )
            })
            .collect()
    }
}

/// The scheduler's tests measure how one CPU is shared out (its slices, weights, caps and
/// clocks), so they boot a machine with one CPU; the weights and caps are checked on two CPUs
/// as well (`weights_and_caps_share_two_cpus_...`), and sharing several CPUs among the vCPUs of
/// SMP guests is tests/tests/smp.rs's.
const ONE_CPU: Option<u32> = Some(1);

fn boot() -> std::sync::Arc<Outcome> {
    shared_boot_on(&SCHED, ONE_CPU)
}

/// The statistics table Keel prints when it ends: per guest, its state and CPU % of the run.
pub(crate) struct FinalTable {
    pub(crate) rows: Vec<(String, String, f64)>,
}

impl FinalTable {
    /// The last table: the rows between its header (after `keel: statistics over`) and the
    /// first `keel: exits of` line.
    pub(crate) fn parse(boot: &Outcome) -> FinalTable {
        let lines: Vec<&str> = boot.lines().collect();
        let Some(start) = lines
            .iter()
            .rposition(|l| l.starts_with("keel: statistics over "))
        else {
            boot.fail("no final statistics table")
        };
        let rows = lines[start + 2..]
            .iter()
            .take_while(|l| !l.starts_with("keel: exits of "))
            .map(|l| {
                let v: Vec<&str> = l.split_whitespace().collect();
                match (v.get(1), v.get(2), v.get(3).and_then(|c| c.parse().ok())) {
                    (Some(name), Some(state), Some(cpu)) => {
                        (name.to_string(), state.to_string(), cpu)
                    }
                    _ => boot.fail(&format!("cannot read the final table's row `{l}`")),
                }
            })
            .collect();
        FinalTable { rows }
    }

    pub(crate) fn cpu_percent(&self, guest: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.0 == guest).map(|r| r.2)
    }
}

/// The snapshot (the table PRINT_STATS printed) and the final table Keel prints at its end.
fn tables(boot: &Outcome) -> (Table, FinalTable) {
    let lines: Vec<&str> = boot.lines().collect();
    let Some(snapshot) = Table::parse(&lines, SNAPSHOT_MARKER) else {
        boot.fail(&format!(
            "no accounting table after `{SNAPSHOT_MARKER}` (the PRINT_STATS snapshot)"
        ))
    };
    let last = FinalTable::parse(boot);
    for rows in [snapshot.rows.len(), last.rows.len()] {
        if rows != STATUSES.len() {
            boot.fail(&format!(
                "a table has {rows} rows, expected {}: {:?} / {:?}",
                STATUSES.len(),
                snapshot.rows.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                last.rows.iter().map(|r| &r.0).collect::<Vec<_>>()
            ));
        }
    }
    (snapshot, last)
}

/// The decimal number after `key=` in `line`.
pub(crate) fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(&format!("{key}="))? + key.len() + 1..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The TSC rate Keel measured on the real PIT at boot (`... calibrated: TSC 9999 kHz ...`), in Hz:
/// the guests' TSCs run at this rate (offset, never scaled), and their device models count time
/// from it.
pub(crate) fn keel_tsc_hz(boot: &Outcome) -> f64 {
    let line = boot.expect_line("timer calibrated: TSC ");
    let khz = line
        .split("TSC ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    match khz {
        Some(khz) => khz * 1000.0,
        None => boot.fail(&format!("cannot read the TSC rate from `{line}`")),
    }
}

#[test]
fn every_guest_ends_with_its_own_status() {
    let boot = boot();
    boot.expect_keel_status(COMPLETED);
    for (guest, status) in STATUSES {
        boot.expect_line(&format!("keel: guest {guest} status {status:#x}:"));
    }
    // Keel's own failures (it prints `keel: fatal: PANIC at ...`, never "panic"), a guest Keel
    // stopped (`keel: error: guest NAME stopped: ...`), and the guests' own failure reports
    // (`NAME: exception vec=...`, `NAME: panic: ...`, tests/guests/README.md).
    boot.expect_keel_unhurt();
    boot.expect_no_line(" stopped: ");
    boot.expect_no_line(": exception vec=");
    boot.expect_no_line(": panic: ");
}

#[test]
fn cpu_bound_guests_share_the_cpu_equally() {
    let boot = boot();
    let (snapshot, last) = tables(&boot);
    println!("snapshot (PRINT_STATS from the timekeeper at 10 s of its time):");
    print!("{}", snapshot.shares());
    println!("final table:");
    for (name, state, cpu) in &last.rows {
        println!("  {name:<12} {cpu:>6.2}% of the run  {state}");
    }
    let mut cycles = Vec::new();
    for guest in CPU_BOUND {
        // The snapshot is only a fairness measurement if all three were still competing.
        if snapshot.get(guest, "state") != Some("run") {
            boot.fail(&format!(
                "{guest} was not running at the snapshot: {:?}",
                snapshot.get(guest, "state")
            ));
        }
        match snapshot.cpu(guest) {
            Some(c) => cycles.push((guest, c)),
            None => boot.fail(&format!("no cpu cycles for {guest} in the snapshot")),
        }
    }
    let mean = cycles.iter().map(|&(_, c)| c as f64).sum::<f64>() / cycles.len() as f64;
    let quantum = 0.01 * keel_tsc_hz(&boot);
    println!(
        "cpu-bound guests at the snapshot: mean {mean:.0} cycles ({:.0} quanta of 10 ms each)",
        mean / quantum
    );
    let mut off = Vec::new();
    for &(guest, c) in &cycles {
        let deviation = (c as f64 - mean) / mean;
        println!(
            "  {guest}: {c} cycles, {:+.2}% from the mean",
            100.0 * deviation
        );
        if deviation.abs() > 0.02 {
            off.push(format!("{guest} {c} ({:+.2}%)", 100.0 * deviation));
        }
    }
    if !off.is_empty() {
        boot.fail(&format!(
            "cpu-bound guests more than 2% from their mean {mean:.0} cycles at the snapshot: {}",
            off.join(", ")
        ));
    }
}

#[test]
fn the_mostly_halting_guest_uses_under_one_percent() {
    let boot = boot();
    let (snapshot, last) = tables(&boot);
    let (sleeper, total) = (
        snapshot.cpu("sleeper").unwrap_or(u64::MAX),
        snapshot.total_cpu(),
    );
    let share = sleeper as f64 / total.max(1) as f64;
    println!(
        "snapshot: sleeper {sleeper} of {total} cpu cycles = {:.3}%",
        100.0 * share
    );
    if share >= 0.01 {
        boot.fail(&format!(
            "snapshot: the sleeper used {:.3}% of the cpu cycles (limit 1%)",
            100.0 * share
        ));
    }
    // The final table gives each guest's CPU % of the whole run.
    match last.cpu_percent("sleeper") {
        Some(p) if p < 1.0 => println!("final table: sleeper {p:.2}% of the CPU"),
        other => boot.fail(&format!(
            "final table: the sleeper used {other:?}% of the CPU (limit 1%)"
        )),
    }
    if let Some(done) = boot.find_line("[sleeper] demo: done:") {
        println!("sleeper: {done}");
    }
}

#[test]
fn pit_and_lapic_ticks_follow_the_guests_own_clock() {
    let boot = boot();
    let line = boot.expect_line("[ticks] long64: ticks pit=");
    let (Some(pit), Some(lapic), Some(tsc)) =
        (field(line, "pit"), field(line, "lapic"), field(line, "tsc"))
    else {
        boot.fail(&format!("cannot read `{line}`"))
    };
    let hz = keel_tsc_hz(&boot);
    let seconds = tsc as f64 / hz;
    println!(
        "ticks guest: {tsc} TSC cycles at {hz:.0} Hz = {seconds:.4} s of its own time; \
         pit={pit} (expected {:.2}), lapic={lapic} (expected {:.2})",
        100.0 * seconds,
        1000.0 * seconds
    );
    let mut wrong = Vec::new();
    for (name, count, rate) in [("PIT", pit, 100.0), ("LAPIC", lapic, 1000.0)] {
        let expected = rate * seconds;
        // Counting periodic ticks over a window that starts and ends at arbitrary points of the
        // period can see one tick more or fewer than rate x time (the fencepost): allow 1% of the
        // expected count plus that one tick.
        let allowed = 0.01 * expected + 1.0;
        let error = count as f64 - expected;
        println!(
            "  {name}: {count} ticks, {:+.3}% from {rate} Hz (allowed {allowed:.1} ticks)",
            100.0 * error / expected
        );
        if error.abs() > allowed {
            wrong.push(format!(
                "{name} {count} ticks, expected {expected:.1} +- {allowed:.1}"
            ));
        }
    }
    if !wrong.is_empty() {
        boot.fail(&format!(
            "tick counts off over {seconds:.4} s: {}",
            wrong.join("; ")
        ));
    }
}

/// The number right before `what` in `line` (`3986 PIT ticks`).
fn count_before(line: &str, what: &str) -> Option<u64> {
    let head = &line[..line.find(what)?];
    head.rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Checks the 100 Hz PIT tick count in a timeshare guest's `demo: done:` line against its own
/// time (`tsc=` at Keel's TSC rate `hz`); prints the figures, and returns what is wrong, if
/// anything.
pub(crate) fn pit_ticks_off(boot: &Outcome, guest: &str, hz: f64) -> Option<String> {
    let line = boot.expect_guest_line(guest, "demo: done:");
    let (Some(ticks), Some(tsc)) = (count_before(line, " PIT ticks"), field(line, "tsc")) else {
        boot.fail(&format!("cannot read {guest}'s `{line}`"))
    };
    let expected = 100.0 * tsc as f64 / hz;
    // As in the ticks guest: 1% of the expected count plus the +-1 tick fencepost.
    let allowed = 0.01 * expected + 1.0;
    let error = ticks as f64 - expected;
    println!(
        "{guest}: {ticks} PIT ticks in {:.4} s of its own time, expected {expected:.1} ({:+.2}%)",
        tsc as f64 / hz,
        100.0 * error / expected
    );
    (error.abs() > allowed)
        .then(|| format!("{guest} {ticks}, expected {expected:.1} +- {allowed:.1}"))
}

/// Beyond the ticks guest: the CPU-bound guests (whose clocks stop while they wait) and the
/// sleeper (whose clock runs while it is halted, and whose ticks must wake it in time) count
/// their 100 Hz PIT ticks over their own time too, each in its `done:` line.
#[test]
fn every_guest_counts_its_pit_ticks_in_its_own_time() {
    let boot = boot();
    let hz = keel_tsc_hz(&boot);
    let wrong: Vec<String> = CPU_BOUND
        .iter()
        .chain(&["sleeper"])
        .filter_map(|guest| pit_ticks_off(&boot, guest, hz))
        .collect();
    if !wrong.is_empty() {
        boot.fail(&format!("PIT tick counts off: {}", wrong.join("; ")));
    }
}

#[test]
fn the_cli_spinner_does_not_starve_the_others() {
    let boot = boot();
    let start = "[clispin] long64: cli spin: ";
    let end = "[clispin] long64: cli spin done:";
    boot.expect_in_order(&[start, end]);
    let lines: Vec<&str> = boot.lines().collect();
    let from = lines.iter().position(|l| l.contains(start)).unwrap_or(0);
    let to = lines.iter().position(|l| l.contains(end)).unwrap_or(0);
    let during = &lines[from..to];
    // Every other guest must have run while the spinner held interrupts off: only Keel's
    // preemption timer could take the CPU from it.
    for guest in ["cpu1", "cpu2", "cpu3", "sleeper", "ticks"] {
        let printed = during
            .iter()
            .filter(|l| l.starts_with(&guest_prefix(guest)))
            .count();
        println!("while clispin spun: {guest} printed {printed} line(s)");
        if printed == 0 {
            boot.fail(&format!(
                "{guest} printed nothing while clispin spun with interrupts off"
            ));
        }
    }
    let done = lines[to];
    println!("clispin: {done}");
    match (field(done, "tsc"), field(done, "cpu")) {
        (Some(tsc), Some(cpu)) if tsc >= 30_000_000 => {
            println!("clispin: {tsc} cycles of its own time, {cpu} cycles on the CPU per Keel")
        }
        _ => boot.fail(&format!(
            "clispin ended early or said so unreadably: `{done}`"
        )),
    }
    // The others ended too (their statuses: every_guest_ends_with_its_own_status).
    for guest in CPU_BOUND.iter().chain(&["sleeper", "ticks"]) {
        boot.expect_line(&format!("keel: guest {guest} ended"));
    }
    boot.expect_line("keel: guest clispin ended");
}

static SHARES: BootSpec = BootSpec {
    name: "bochs-shares",
    manifest: Manifest::File("tests/guests/manifests/shares.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: Some(Duration::from_secs(300)),
};

/// shares.toml on two host CPUs: the shares are of the whole machine's time (docs/SCHEDULING.md,
/// "Weights and caps"), so the same manifest gives the same split.
static SHARES_2CPUS: BootSpec = BootSpec {
    name: "bochs-shares-2cpus",
    ..SHARES
};

/// Weights 1:2:1 and a 10% cap (shares.toml; the capped guest's fair share would be 20%) on one
/// CPU: in the timekeeper's snapshot at 10 s of its time, the weighted guests' CPU time is 1:2:1
/// within 2%, and between its snapshots at 5 s and 20 s the capped guest had 10% of the CPU time
/// that passed, within 2% of that.
#[test]
fn weights_and_caps_share_the_cpu_as_the_manifest_says() {
    weights_and_caps_hold(&shared_boot_on(&SHARES, ONE_CPU), 1);
}

/// The same on two host CPUs: 1:2:1 within 2%, and the capped guest 10% of both CPUs' time.
#[test]
fn weights_and_caps_share_two_cpus_as_the_manifest_says() {
    weights_and_caps_hold(&shared_boot_on(&SHARES_2CPUS, Some(2)), 2);
}

fn weights_and_caps_hold(boot: &Outcome, cpus: u32) {
    let lines: Vec<&str> = boot.lines().collect();
    let Some(snapshot) = Table::parse(&lines, SNAPSHOT_MARKER) else {
        boot.fail(&format!("no accounting table after `{SNAPSHOT_MARKER}`"))
    };
    println!("snapshot (PRINT_STATS from the timekeeper at 10 s of its time):");
    print!("{}", snapshot.shares());
    let cpu = |g: &str| match snapshot.cpu(g) {
        Some(c) => c as f64,
        None => boot.fail(&format!("no cpu cycles for {g} in the snapshot")),
    };
    let unit = (cpu("light") + cpu("heavy") + cpu("light2")) / 4.0;
    for (g, w) in [("light", 1.0), ("heavy", 2.0), ("light2", 1.0)] {
        let off = (cpu(g) - w * unit) / (w * unit);
        println!(
            "  {g}: weight {w}: {:.0} cycles, {:+.2}% from its share",
            cpu(g),
            off * 100.0
        );
        if off.abs() > 0.02 {
            boot.fail(&format!(
                "{g} is {:+.2}% from its weighted share",
                off * 100.0
            ));
        }
    }
    // The cap is measured between the timekeeper's snapshots at 5 s and at 20 s of its time, so
    // that what the guests ran before the timekeeper started (it starts last) counts in neither
    // the capped guest's cycles nor the time that passed, which is the host TSC's between the
    // two tables on every CPU (the guests' own clocks, the timekeeper's too, stop while they wait
    // for a CPU). Neither table falls on a period's start: the window's ends may cut up to a
    // period's budget (0.7% of the window's) either way, which is why it is 15 s long.
    let window = [CAP_FROM_MARKER, CAP_TO_MARKER].map(|m| match Table::parse(&lines, m) {
        Some(t) => t,
        None => boot.fail(&format!("no accounting table after `{m}`")),
    });
    let delta = |g: &str, c: &str| {
        let at = |t: &Table| t.get(g, c).and_then(|v| v.parse::<f64>().ok());
        match (at(&window[0]), at(&window[1])) {
            (Some(a), Some(b)) => b - a,
            _ => boot.fail(&format!("no {c} for {g} in both tables")),
        }
    };
    let elapsed = match (window[0].tsc, window[1].tsc) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 * f64::from(cpus),
        t => boot.fail(&format!("no host TSCs in order in the two tables: {t:?}")),
    };
    let capped = delta("capped", "cpu cycles") / elapsed;
    println!(
        "  capped, from 5 s to 20 s: {:.2}% of {elapsed:.0} cycles on {cpus} CPU(s) (cap 10%)",
        capped * 100.0,
    );
    if (capped - 0.10).abs() / 0.10 > 0.02 {
        boot.fail(&format!(
            "the capped guest had {:.2}% of the CPU, cap 10%",
            capped * 100.0
        ));
    }
    boot.expect_keel_unhurt();
}
