//! `keel-boot bench --linux` (`cargo keel bench --linux`): what a Linux boot costs Keel, exit
//! kind by exit kind.
//!
//! Boots Debian's cloud kernel with the busybox initramfs the Linux test uses ([`crate::debian`])
//! as the only guest (one vCPU, one emulated CPU) in Bochs, twice: with APIC virtualization and
//! with `[keel] apicv = "off"`. When the shell has answered its first command, the guest's
//! exit statistics are read over the control channel (`stats linux`, JSON: docs/BOOTING.md) and
//! Keel is told to `quit`. The report gives, per exit reason, the count, Keel's instructions per
//! exit (average and maximum, over the exits after which the guest went on in the same slice)
//! and their total, then the boot's totals: exits, instructions in the guest and in Keel.
//!
//! With one emulated CPU, Bochs' TSC advances one tick per instruction, so Keel's cycle counts
//! are instruction counts (halted time is not: Bochs' clock runs on while its CPU is halted).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::cli::LinuxArgs;
use crate::console::Step;
use crate::emulator::{self, Emulator, Firmware, RunOptions, RunResult};
use crate::image::{self, ImageOptions};
use crate::{control, debian};

/// The guest's RAM (as in the Linux test).
pub const GUEST_MEMORY: u64 = 192 << 20;
/// Its command line: the console on Keel's 16550, and no crypto self-tests (1.2e9 instructions
/// in Bochs, docs/GUESTS.md).
pub const CMDLINE: &str = "console=ttyS0 cryptomgr.notests";
/// What the bench types once /init has started: the shell's answer is the end of the boot.
pub const FIRST_COMMAND: &str = "echo KEEL-BENCH-$((6*7))\r";
/// The line of that answer (the typed command's echo shows `$((6*7))`, not this).
pub const SHELL_ANSWER: &str = "[linux] KEEL-BENCH-42";
/// Per-boot time limit: /init comes about 1.1e9 instructions after power-on, minutes of Bochs on
/// a loaded machine.
pub const DEFAULT_TIMEOUT_SECS: u64 = 900;
/// How long Keel has to answer a control command (it reads COM2 between time slices).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// One exit reason of the `stats` reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExitKind {
    pub reason: String,
    pub number: u64,
    pub count: u64,
    /// How many of them Keel timed: those after which the guest went on in the same slice.
    pub timed: u64,
    pub avg_cycles: Option<u64>,
    pub max_cycles: Option<u64>,
}

impl ExitKind {
    /// Keel's cycles over the timed exits (the average times their number: the reply gives
    /// the average rounded down, so this is low by less than `timed`).
    pub fn total_cycles(&self) -> Option<u64> {
        self.avg_cycles.map(|a| a.saturating_mul(self.timed))
    }
}

/// The `stats NAME` reply over the control channel: the fields the report uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestStats {
    pub guest: String,
    pub exits_total: u64,
    pub exits: Vec<ExitKind>,
    pub interrupts_injected: u64,
    pub halted_cycles: u64,
    /// In the guest: VM entry to VM exit.
    pub cpu_cycles: u64,
    /// In Keel, handling the guest's exits: VM exit to the next VM entry.
    pub keel_cycles: u64,
    pub tsc_hz: u64,
}

#[derive(Deserialize)]
struct Reply {
    ok: bool,
    error: Option<String>,
    #[serde(flatten)]
    stats: Option<GuestStats>,
}

/// Reads a `stats NAME` reply; Keel's `{"ok":false,"error":...}` becomes its error.
pub fn parse_stats(reply: &str) -> Result<GuestStats> {
    let r: Reply = serde_json::from_str(reply).with_context(|| format!("not a reply: {reply}"))?;
    if !r.ok {
        bail!("Keel answered: {}", r.error.unwrap_or_default());
    }
    r.stats
        .ok_or_else(|| anyhow!("the stats reply lacks fields: {reply}"))
}

/// Whether COM1's text so far holds the shell's answer as a complete line.
pub fn shell_answered(serial: &str) -> bool {
    serial
        .split_inclusive('\n')
        .any(|l| l.ends_with('\n') && l.trim_end() == SHELL_ANSWER)
}

/// The thousands of `n` separated by commas (the tables' counts run to the billions).
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), grouped)
}

/// The report: one table of exit kinds (both runs side by side, by count in the first run),
/// then the totals of each run.
pub fn report(runs: &[(&str, &GuestStats)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Linux to its shell's first answer, per exit reason. Keel's instructions per exit (avg, max) \
         and their total cover the exits after which the guest went on in the same slice (`timed`); \
         an exit that ends the slice (HLT, the end of the quantum) has none.\n"
    );
    let mut head = String::from("| exit reason |");
    let mut rule = String::from("|---|");
    for (name, _) in runs {
        let _ = write!(
            head,
            " count ({name}) | timed | Keel avg | Keel max | Keel total |"
        );
        rule.push_str("---|---|---|---|---|");
    }
    let _ = writeln!(out, "{head}\n{rule}");
    // Every reason any run saw, by count in the first run, then by number.
    let mut reasons: Vec<(u64, String)> = Vec::new();
    for (_, s) in runs {
        for e in &s.exits {
            if !reasons.iter().any(|(n, _)| *n == e.number) {
                reasons.push((e.number, e.reason.clone()));
            }
        }
    }
    let count_in_first = |number: u64| {
        runs.first()
            .and_then(|(_, s)| s.exits.iter().find(|e| e.number == number))
            .map_or(0, |e| e.count)
    };
    reasons.sort_by_key(|&(n, _)| (std::cmp::Reverse(count_in_first(n)), n));
    for (number, reason) in &reasons {
        let mut row = format!("| {reason} |");
        for (_, s) in runs {
            match s.exits.iter().find(|e| e.number == *number) {
                Some(e) => {
                    let _ = write!(
                        row,
                        " {} | {} | {} | {} | {} |",
                        grouped(e.count),
                        grouped(e.timed),
                        opt(e.avg_cycles),
                        opt(e.max_cycles),
                        opt(e.total_cycles())
                    );
                }
                None => row.push_str(" 0 | 0 | - | - | - |"),
            }
        }
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| totals | exits | instructions in the guest | instructions in Keel | Keel per exit | Keel share | interrupts injected | halted (ticks) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (name, s) in runs {
        let busy = s.cpu_cycles + s.keel_cycles;
        let share = if busy == 0 {
            "-".to_string()
        } else {
            format!("{:.1} %", s.keel_cycles as f64 * 100.0 / busy as f64)
        };
        let per_exit = s
            .keel_cycles
            .checked_div(s.exits_total)
            .map_or("-".into(), grouped);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {per_exit} | {share} | {} | {} |",
            grouped(s.exits_total),
            grouped(s.cpu_cycles),
            grouped(s.keel_cycles),
            grouped(s.interrupts_injected),
            grouped(s.halted_cycles)
        );
    }
    out
}

/// Waits (polling `serial_log`) for the shell's answer, then asks Keel for the guest's
/// statistics and tells it to quit. Gives up when `stop` is set (the run ended) or after
/// `timeout`.
fn sample_then_quit(
    serial_log: &Path,
    socket: &Path,
    stop: &AtomicBool,
    timeout: Duration,
) -> Result<String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read(serial_log).unwrap_or_default();
        if shell_answered(&String::from_utf8_lossy(&text)) {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            bail!("the run ended before the shell answered `{FIRST_COMMAND}`");
        }
        if start.elapsed() >= timeout {
            bail!("no `{SHELL_ANSWER}` line within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let stats = control::request(socket, "stats linux", CONTROL_TIMEOUT)?;
    control::request(socket, "quit", CONTROL_TIMEOUT)?;
    Ok(stats)
}

/// One boot of `image` in `work_dir`: the run and Keel's `stats linux` reply.
fn boot_and_sample(
    image: &Path,
    work_dir: &Path,
    machine_mib: u32,
    timeout: Duration,
    echo: bool,
) -> Result<(RunResult, Result<String>)> {
    let mut opts = RunOptions::new(image, Firmware::Bios, Emulator::Bochs, work_dir);
    opts.timeout = Some(timeout);
    opts.echo = echo;
    opts.cpus = 1;
    opts.memory_mib = machine_mib;
    opts.script = vec![Step::new(debian::INIT_MARKER, FIRST_COMMAND, timeout)];
    let socket = work_dir.join("control.sock");
    opts.control = Some(socket.clone());
    let serial_log = work_dir.join("serial.log");
    // A serial.log of an earlier run here must not be taken for this one's.
    let _ = std::fs::remove_file(&serial_log);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || sample_then_quit(&serial_log, &socket, &stop, timeout))
    };
    let run = emulator::run(&opts);
    stop.store(true, Ordering::SeqCst);
    let sample = sampler
        .join()
        .unwrap_or_else(|_| Err(anyhow!("the sampling thread panicked")));
    Ok((run?, sample))
}

/// The images of the Linux guest under `dir`, with APIC virtualization or without.
fn linux_images(
    opts: &ImageOptions,
    files: &debian::LinuxFiles,
    dir: &Path,
    apicv_off: bool,
) -> Result<image::Images> {
    let linux = LinuxArgs {
        kernel: files.dir.join("vmlinuz"),
        initrd: Some(files.dir.join("initrd")),
        cmdline: CMDLINE.into(),
        memory: GUEST_MEMORY,
        vcpus: 1,
    };
    let (manifest, guest_files) = image::write_linux_guest(dir, &linux)?;
    if apicv_off {
        let text = std::fs::read_to_string(&manifest)?;
        let off = crate::manifest_file::with_keel_setting(&text, "apicv", "off")
            .map_err(|e| anyhow!("{}: {e}", manifest.display()))?;
        std::fs::write(&manifest, off)?;
    }
    let mut opts = opts.clone();
    opts.manifest = manifest;
    opts.files = Some(guest_files);
    opts.out = dir.join("image");
    image::build_images(&opts)
}

/// `cargo keel bench --linux`. `opts` comes from the image options of the command line
/// (release forced); its manifest and files are not used.
pub fn run(opts: &ImageOptions, args: &super::BenchArgs) -> Result<ExitCode> {
    crate::tools::require(Emulator::Bochs, Firmware::Bios)?;
    let mut opts = opts.clone();
    opts.release = true;
    let files =
        debian::linux_files(&debian::default_cache(&opts.root)).map_err(|e| anyhow!("{e}"))?;
    let work = opts.out.join("bench-linux");
    let timeout = Duration::from_secs(args.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS));
    emulator::install_interrupt_handler();
    let mut results = Vec::new();
    let mut problems = Vec::new();
    for (name, off) in [("APIC virtualization", false), ("apicv off", true)] {
        let dir = work.join(if off { "apicv-off" } else { "apicv" });
        let images = linux_images(&opts, &files, &dir, off)?;
        let ramdisk = std::fs::metadata(&images.ramdisk)?.len();
        let machine = image::linux_machine_mib(GUEST_MEMORY, ramdisk);
        eprintln!(
            "keel-boot bench --linux: {} ({}) with {name}",
            files.package, files.release
        );
        let (run, sample) =
            boot_and_sample(&images.bios, &dir.join("run"), machine, timeout, args.echo)?;
        eprintln!(
            "keel-boot bench --linux: Bochs took {:.1} s; run files in {}",
            run.wall.as_secs_f64(),
            run.work_dir.display()
        );
        if run.interrupted {
            return Ok(ExitCode::from(130));
        }
        match sample.and_then(|reply| parse_stats(&reply)) {
            Ok(stats) => results.push((name, stats)),
            Err(e) => problems.push(format!(
                "{name}: {e:#} (files in {})",
                run.work_dir.display()
            )),
        }
    }
    let runs: Vec<(&str, &GuestStats)> = results.iter().map(|(n, s)| (*n, s)).collect();
    if !runs.is_empty() {
        println!(
            "{} with busybox, {} MiB, 1 vCPU, `{CMDLINE}`; Bochs, one CPU.\n",
            files.package,
            GUEST_MEMORY >> 20
        );
        print!("{}", report(&runs));
    }
    if !problems.is_empty() {
        eprintln!("keel-boot bench --linux: {}", problems.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as Keel's monitor writes it (hypervisor/src/monitor.rs, `stats`).
    const REPLY: &str = r#"{"ok":true,"guest":"linux","state":"halted","exits_total":1030,"exits":[{"reason":"I/O instruction","number":30,"count":600,"timed":590,"avg_cycles":1200,"max_cycles":90000},{"reason":"HLT","number":12,"count":30,"timed":0},{"reason":"EPT violation","number":48,"count":400,"timed":400,"avg_cycles":2500,"max_cycles":4000}],"interrupts_injected":77,"halted_cycles":5000000,"cpu_cycles":500000000,"keel_cycles":2000000,"tsc_hz":9999000,"memory":201326592,"weight":1}"#;

    #[test]
    fn the_stats_reply_is_read() {
        let s = parse_stats(REPLY).expect("a good reply");
        assert_eq!(s.guest, "linux");
        assert_eq!(s.exits_total, 1030);
        assert_eq!(s.exits.len(), 3);
        assert_eq!(s.exits[0].total_cycles(), Some(590 * 1200));
        assert_eq!(s.exits[1].avg_cycles, None, "HLT ends the slice: not timed");
        assert_eq!(s.exits[1].total_cycles(), None);
        assert_eq!((s.cpu_cycles, s.keel_cycles), (500_000_000, 2_000_000));
        let e = parse_stats(r#"{"ok":false,"error":"no guest \"linux\" (see list)"}"#)
            .expect_err("Keel's error");
        assert_eq!(
            e.to_string(),
            "Keel answered: no guest \"linux\" (see list)"
        );
        assert!(parse_stats(r#"{"ok":true,"guest":"linux"}"#).is_err());
        assert!(parse_stats("keel: not json").is_err());
    }

    #[test]
    fn the_boot_ends_at_the_shells_answer_not_at_its_echo() {
        let echo = "[linux] keel-sh# echo KEEL-BENCH-$((6*7))\n";
        assert!(!shell_answered(echo));
        assert!(
            !shell_answered(&format!("{echo}{SHELL_ANSWER}")),
            "line not complete"
        );
        assert!(shell_answered(&format!(
            "{echo}{SHELL_ANSWER}\r\n[linux] keel-sh# "
        )));
    }

    #[test]
    fn the_report_has_a_row_per_reason_and_the_totals() {
        let on = parse_stats(REPLY).unwrap();
        let mut off = on.clone();
        off.exits.retain(|e| e.number != 48);
        off.exits.push(ExitKind {
            reason: "APIC write".into(),
            number: 56,
            count: 5,
            timed: 5,
            avg_cycles: Some(300),
            max_cycles: Some(310),
        });
        let text = report(&[("on", &on), ("off", &off)]);
        assert!(
            text.contains("| I/O instruction | 600 | 590 | 1,200 | 90,000 | 708,000 | 600 | 590 | 1,200 | 90,000 | 708,000 |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| EPT violation | 400 | 400 | 2,500 | 4,000 | 1,000,000 | 0 | 0 | - | - | - |"
            ),
            "{text}"
        );
        assert!(text.contains("| HLT | 30 | 0 | - | - | - |"), "{text}");
        assert!(text.contains("| APIC write | 0 | 0 | - | - | - | 5 | 5 | 300 | 310 | 1,500 |"));
        // By count in the first run: I/O, EPT violation, HLT, then the reason only the second saw.
        let order: Vec<usize> = ["| I/O", "| EPT", "| HLT", "| APIC write"]
            .iter()
            .map(|r| text.find(r).expect("row"))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(
            text.contains(
                "| on | 1,030 | 500,000,000 | 2,000,000 | 1,941 | 0.4 % | 77 | 5,000,000 |"
            ),
            "{text}"
        );
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567_890), "1,234,567,890");
    }
}
