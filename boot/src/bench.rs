//! `keel-boot bench` (`cargo keel bench`): Keel's exit-path benchmark.
//!
//! 1. builds the test guests (bench64.elf and the bare disk bench64-bare.img come from
//!    tests/guests/bench64) and Keel in release with tests/guests/manifests/bench.toml;
//! 2. boots that in Bochs: two bench64 guests time YIELD round trips against each other, then
//!    guest 0 times each operation alone;
//! 3. boots bench64-bare.img in Bochs: the same loop with no hypervisor (the floor);
//! 4. prints a Markdown table: each operation's Keel min/median/max next to the floor, the
//!    KVM-in-Bochs reference of /work/shared/PLATFORM.md and the goal; then the guest switch
//!    measured in Bochs ticks, Keel's memory overhead per guest and the ticks from power-on to
//!    the first guest instruction.
//!
//! The guest lines are `bench: <op> min=.. median=.. max=.. n=..` (bench64's documentation).
//! Bochs' TSC advances one tick per instruction and starts at power-on, and its log stamps every
//! line with that tick count; bench64 reads LAPIC registers at known points (an EPT violation
//! under Keel, which Bochs logs), which is how the host times what no guest clock shows.
//! docs/BENCHMARKS.md explains every figure.
//!
//! `bench --linux` ([`linux`]) is another benchmark: a Linux boot's exits by kind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::cli::ImageArgs;
use crate::emulator::{self, Emulator, Firmware, RunOptions, RunResult};
use crate::image::{self, ImageOptions};

pub mod linux;

/// The manifest `bench` uses unless `--manifest` says otherwise (relative to the workspace root).
pub const DEFAULT_MANIFEST: &str = "tests/guests/manifests/bench.toml";
/// The bare disk image tests/guests/build.sh writes next to the guests.
pub const BARE_IMAGE: &str = "bench64-bare.img";
/// The unstripped kernel of the Keel run, kept in its run directory.
pub const KERNEL_COPY: &str = "keel.elf";
/// Per-boot time limit: a bench boot takes a few seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

/// `cargo keel bench` options (parsed by `cli`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BenchArgs {
    /// `--manifest`, `--files`, `--out`, `--quiet`; always a release build.
    pub build: ImageArgs,
    pub timeout_secs: Option<u64>,
    /// Copy both runs' COM1 to the terminal.
    pub echo: bool,
    /// `--linux`: the Linux boot's exits by kind ([`linux::run`]) instead of the exit-path table.
    pub linux: bool,
}

/// One operation as a guest printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Figure {
    Cycles {
        min: u64,
        median: u64,
        max: u64,
        n: u64,
    },
    /// `n/a (why)`.
    NotApplicable(String),
}

/// Everything one bench64 instance printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    pub id: Option<i64>,
    pub first_rdtsc: Option<u64>,
    /// The `yields=` of its command line.
    pub yields: Option<u64>,
    pub ops: BTreeMap<String, Figure>,
    pub done: bool,
}

/// The bench lines of a COM1 log, by guest: the `[NAME]` prefix Keel puts on guest lines, or ""
/// for the bare run (no prefix).
pub fn parse_serial(serial: &str) -> BTreeMap<String, GuestReport> {
    let mut out: BTreeMap<String, GuestReport> = BTreeMap::new();
    for line in serial.lines() {
        let (guest, rest) = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
            Some((name, rest)) => (name, rest),
            None => ("", line),
        };
        let Some(body) = rest.strip_prefix("bench: ") else {
            continue;
        };
        let report = out.entry(guest.to_string()).or_default();
        if body == "done" {
            report.done = true;
        } else if body.starts_with("mode=") {
            for word in body.split(' ') {
                match word.split_once('=') {
                    Some(("id", v)) => report.id = v.parse().ok(),
                    Some(("first-rdtsc", v)) => report.first_rdtsc = v.parse().ok(),
                    Some(("yields", v)) => report.yields = v.parse().ok(),
                    _ => {}
                }
            }
        } else if let Some((op, figure)) = parse_figure(body) {
            report.ops.insert(op, figure);
        }
    }
    out
}

fn parse_figure(body: &str) -> Option<(String, Figure)> {
    let (op, rest) = body.split_once(' ')?;
    if let Some(why) = rest.strip_prefix("n/a") {
        let why = why.trim().trim_start_matches('(').trim_end_matches(')');
        return Some((op.to_string(), Figure::NotApplicable(why.to_string())));
    }
    let mut values = [None; 4];
    for word in rest.split(' ') {
        let (key, v) = word.split_once('=')?;
        let slot = ["min", "median", "max", "n"]
            .iter()
            .position(|k| *k == key)?;
        values[slot] = Some(v.parse().ok()?);
    }
    let [Some(min), Some(median), Some(max), Some(n)] = values else {
        return None;
    };
    Some((
        op.to_string(),
        Figure::Cycles {
            min,
            median,
            max,
            n,
        },
    ))
}

/// What the Bochs log says about the run: tick counts (= the TSC from power-on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BochsLog {
    /// The BIOS jumps to the boot sector.
    pub boot_sector: Option<u64>,
    /// Keel reads IA32_APIC_BASE while setting up its LAPIC timer: Keel is running.
    pub apic_base_read: Option<u64>,
    /// Every EPT violation: (tick, guest-physical address), in order.
    pub ept_violations: Vec<(u64, u64)>,
}

impl BochsLog {
    pub fn parse(log: &str) -> Self {
        let mut out = Self::default();
        for line in log.lines() {
            // "00034125870i[BIOS  ] Booting from 0000:7c00": 11 digits, the level, the module.
            let Some(tick) = line.get(..11).and_then(|t| t.parse::<u64>().ok()) else {
                continue;
            };
            let Some((_, text)) = line.split_once("] ") else {
                continue;
            };
            if text.starts_with("Booting from") {
                out.boot_sector.get_or_insert(tick);
            } else if text.starts_with("RDMSR: Read") && text.ends_with("from MSR_APICBASE") {
                out.apic_base_read.get_or_insert(tick);
            } else if let Some(rest) = text.strip_prefix("VMEXIT: EPT violation for guest paddr 0x")
            {
                let hex = rest.split(' ').next().unwrap_or("");
                if let Ok(gpa) = u64::from_str_radix(hex, 16) {
                    out.ept_violations.push((tick, gpa));
                }
            }
        }
        out
    }

    /// The tick of the first EPT violation at `gpa`.
    pub fn first_access(&self, gpa: u64) -> Option<u64> {
        self.ept_violations
            .iter()
            .find(|&&(_, g)| g == gpa)
            .map(|&(t, _)| t)
    }
}

/// bench64's landmarks (its `_start` and `landmark()`): LAPIC registers read at known points.
pub mod landmark {
    /// The LAPIC version register, read by the fifth instruction of `_start`.
    pub const FIRST: u64 = 0xfee0_0030;
    /// Instructions of `_start` before that read (RDTSC and three moves).
    pub const FIRST_OFFSET: u64 = 4;
    /// Guest `id` reads this just before its YIELD loop, and the next register just after it.
    pub fn ping_pong_start(id: u64) -> u64 {
        0xfee0_0100 + 0x10 * ((2 * id) % 24)
    }
    pub fn ping_pong_end(id: u64) -> u64 {
        0xfee0_0100 + 0x10 * ((2 * id + 1) % 24)
    }
}

/// The guest switch in Bochs ticks, from the landmarks around the two guests' YIELD loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// Ticks of one switch (yield exit in one guest to the next guest's loop), wall time.
    pub one_way: u64,
    pub switches: u64,
}

/// From guest 1's loop start to guest 0's loop end, every YIELD of either guest hands the CPU to
/// the other: guest 1 yields N times and guest 0 N-1 times (its first YIELD started guest 1), so
/// the window holds 2N-1 switches plus guest 1's landmark read itself (`mmio_read` ticks).
pub fn switch_from_landmarks(log: &BochsLog, yields: u64, mmio_read: u64) -> Option<Switch> {
    let start = log.first_access(landmark::ping_pong_start(1))?;
    let end = log.first_access(landmark::ping_pong_end(0))?;
    let switches = (2 * yields).checked_sub(1).filter(|&s| s > 0)?;
    let window = end.checked_sub(start)?.checked_sub(mmio_read)?;
    Some(Switch {
        one_way: window / switches,
        switches,
    })
}

/// A row of the table: the op key bench64 prints, what it is, the KVM-in-Bochs reference
/// (PLATFORM.md) and the goal.
struct Row {
    op: &'static str,
    what: &'static str,
    kvm: Option<(u64, &'static str)>,
    goal: Option<Goal>,
}

#[derive(Clone, Copy)]
enum Goal {
    AtMost(u64),
    Below(u64),
    /// No VM exit at all: an exit and entry cost hundreds of instructions in Bochs, an
    /// instruction the CPU virtualizes a handful over the floor.
    NoExit,
}

/// What [`Goal::NoExit`] accepts: well under the cheapest exit (about 200).
const NO_EXIT_BELOW: u64 = 100;

impl Goal {
    fn met(self, v: u64) -> bool {
        match self {
            Goal::AtMost(g) => v <= g,
            Goal::Below(g) => v < g,
            Goal::NoExit => v < NO_EXIT_BELOW,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtMost(g) => format!("<= {g}"),
            Goal::Below(g) => format!("< {g}"),
            Goal::NoExit => format!("no VM exit (< {NO_EXIT_BELOW})"),
        }
    }
}

const ROWS: &[Row] = &[
    Row {
        op: "rdtsc",
        what: "nothing (two RDTSC: the measuring floor)",
        kvm: None,
        goal: None,
    },
    Row {
        op: "cpuid",
        what: "CPUID leaf 0",
        kvm: Some((1290, "CPUID exit")),
        goal: Some(Goal::AtMost(130)),
    },
    Row {
        op: "vmcall",
        what: "VMCALL GUEST_ID",
        kvm: Some((1301, "VMCALL")),
        goal: Some(Goal::AtMost(130)),
    },
    Row {
        op: "out",
        what: "OUT to the UART scratch register 0x3ff",
        kvm: Some((2424, "OUT to the in-kernel PIC")),
        goal: Some(Goal::Below(250)),
    },
    Row {
        op: "in",
        what: "IN from the UART scratch register 0x3ff",
        kvm: None,
        goal: Some(Goal::Below(250)),
    },
    Row {
        op: "rdmsr",
        what: "RDMSR IA32_MISC_ENABLE (emulated)",
        kvm: Some((1434, "RDMSR, emulated")),
        goal: Some(Goal::AtMost(150)),
    },
    Row {
        op: "wrmsr",
        what: "WRMSR IA32_MTRR_DEF_TYPE (emulated)",
        kvm: None,
        goal: Some(Goal::AtMost(150)),
    },
    Row {
        op: "mmio-read",
        what: "LAPIC TPR read (MMIO, 0xfee00080)",
        kvm: None,
        goal: Some(Goal::NoExit),
    },
    Row {
        op: "mmio-write",
        what: "LAPIC TPR write (MMIO)",
        kvm: None,
        goal: Some(Goal::NoExit),
    },
    Row {
        op: "cr8-read",
        what: "TPR read by MOV from CR8",
        kvm: None,
        goal: Some(Goal::NoExit),
    },
    Row {
        op: "cr8-write",
        what: "TPR write by MOV to CR8",
        kvm: None,
        goal: Some(Goal::NoExit),
    },
    Row {
        op: "eoi",
        what: "LAPIC EOI (MMIO, nothing in service)",
        kvm: None,
        goal: Some(Goal::NoExit),
    },
    Row {
        op: "deadline",
        what: "WRMSR IA32_TSC_DEADLINE (the armed deadline moved, as Linux's tick does)",
        kvm: None,
        goal: Some(Goal::AtMost(150)),
    },
    Row {
        op: "hlt",
        what: "HLT: TSC deadline to the timer handler",
        kvm: Some((6975, "HLT to user space")),
        goal: Some(Goal::AtMost(300)),
    },
    Row {
        op: "irq",
        what: "interrupt to a running guest: TSC deadline to the timer handler",
        kvm: None,
        goal: Some(Goal::AtMost(300)),
    },
    Row {
        op: "ipi",
        what: "self-IPI: ICR write to the handler",
        kvm: None,
        goal: Some(Goal::AtMost(300)),
    },
];

/// The rows of APIC-register virtualization and of the x2APIC mode (bench64 switches to it
/// last): with it, a read of a register the virtual-APIC page holds, a TPR write and an EOI
/// cost no exit, and a self-IPI is virtualized.
fn apic_rows() -> &'static [Row] {
    &[
        Row {
            op: "apic-read",
            what: "LAPIC LVT timer read (MMIO, 0xfee00320)",
            kvm: None,
            goal: Some(Goal::NoExit),
        },
        Row {
            op: "x2apic-read",
            what: "x2APIC LVT timer read (RDMSR 0x832)",
            kvm: None,
            goal: Some(Goal::NoExit),
        },
        Row {
            op: "x2apic-tpr",
            what: "x2APIC TPR write (WRMSR 0x808)",
            kvm: None,
            goal: Some(Goal::NoExit),
        },
        Row {
            op: "x2apic-eoi",
            what: "x2APIC EOI (WRMSR 0x80B, nothing in service)",
            kvm: None,
            goal: Some(Goal::NoExit),
        },
        Row {
            op: "x2apic-ipi",
            what: "x2APIC self-IPI: SELF IPI write (WRMSR 0x83F) to the handler",
            kvm: None,
            goal: Some(Goal::AtMost(300)),
        },
    ]
}

fn cycles(f: Option<&Figure>) -> Option<(u64, u64, u64)> {
    match f? {
        Figure::Cycles {
            min, median, max, ..
        } => Some((*min, *median, *max)),
        Figure::NotApplicable(_) => None,
    }
}

fn keel_cell(f: Option<&Figure>) -> String {
    match f {
        Some(Figure::Cycles {
            min, median, max, ..
        }) => format!("{min} / **{median}** / {max}"),
        Some(Figure::NotApplicable(why)) => format!("n/a ({why})"),
        None => "missing".into(),
    }
}

fn bare_cell(f: Option<&Figure>) -> String {
    match f {
        Some(Figure::Cycles { median, .. }) => median.to_string(),
        Some(Figure::NotApplicable(_)) => "n/a".into(),
        None => "missing".into(),
    }
}

/// The report `bench` prints: the table, the switch, memory, boot ticks. `keel` is the run with
/// APIC virtualization (where the CPU has it), `keel_off` the same manifest with `[keel] apicv =
/// off`: its Bochs log `keel_log` holds the landmarks (with APIC virtualization the landmark reads
/// are APIC-access exits, which Bochs does not log).
pub fn report(
    keel: &BTreeMap<String, GuestReport>,
    keel_off: &BTreeMap<String, GuestReport>,
    bare: &GuestReport,
    keel_log: &BochsLog,
    bare_log: &BochsLog,
    keel_serial: &str,
) -> String {
    let mut out = String::new();
    // Guest 0 runs the whole suite; the others only the ping-pong.
    let mut guests: Vec<(&String, &GuestReport)> = keel.iter().collect();
    guests.sort_by_key(|(_, r)| r.id.unwrap_or(i64::MAX));
    let empty = GuestReport::default();
    let (main_name, main) = guests
        .first()
        .map(|(n, r)| (n.as_str(), *r))
        .unwrap_or(("?", &empty));
    let main_off = keel_off
        .values()
        .find(|r| r.id == Some(0))
        .unwrap_or(&empty);
    let _ = writeln!(
        out,
        "Guest-observed TSC cycles per operation (Bochs: one tick per instruction), {} samples each.\n",
        cycles_n(main)
    );
    let _ = writeln!(
        out,
        "| operation | Keel min / **median** / max | APIC virtualization off | bare floor (median) | Keel - bare | KVM in Bochs | goal |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in ROWS.iter().chain(apic_rows()) {
        let k = main.ops.get(row.op);
        let off = main_off.ops.get(row.op);
        let b = bare.ops.get(row.op);
        let diff = match (cycles(k), cycles(b)) {
            (Some((_, km, _)), Some((_, bm, _))) => (km as i64 - bm as i64).to_string(),
            _ => "-".into(),
        };
        let kvm = row
            .kvm
            .map_or("-".into(), |(v, what)| format!("{v} ({what})"));
        let goal = match (row.goal, cycles(k)) {
            (Some(g), Some((_, median, _))) => format!(
                "{}: {}",
                g.text(),
                if g.met(median) { "met" } else { "over" }
            ),
            (Some(g), None) => g.text(),
            (None, _) => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} `{}` | {} | {} | {} | {} | {} | {} |",
            row.what,
            row.op,
            keel_cell(k),
            keel_cell(off),
            bare_cell(b),
            diff,
            kvm,
            goal
        );
    }
    for (name, r) in &guests {
        let off = keel_off.get(*name).and_then(|r| r.ops.get("yield"));
        let _ = writeln!(
            out,
            "| YIELD round trip in {name}'s own clock `yield` | {} | {} | {} | - | - | - |",
            keel_cell(r.ops.get("yield")),
            keel_cell(off),
            bare_cell(bare.ops.get("yield")),
        );
    }
    // The landmarks are in the run without APIC virtualization, where each is an EPT violation
    // costing one emulated `mmio-read`.
    let mmio = cycles(main_off.ops.get("mmio-read")).map(|(_, m, _)| m);
    let yields = main_off.yields;
    let switch = match (yields, mmio) {
        (Some(n), Some(m)) => switch_from_landmarks(keel_log, n, m),
        _ => None,
    };
    let yield_median = cycles(main_off.ops.get("yield")).map(|(_, m, _)| m);
    match switch {
        Some(s) => {
            let _ = writeln!(
                out,
                "| guest switch, wall (Bochs log, APIC virtualization off), per switch | - | {} | n/a | - | - | - |\n\
                 | YIELD round trip A->B->A, wall | - | {} | n/a | - | - | - |",
                s.one_way,
                2 * s.one_way
            );
        }
        None => {
            let _ = writeln!(
                out,
                "| guest switch, wall (Bochs log) | - | missing (no ping-pong landmarks in the Bochs log) | n/a | - | - | - |"
            );
        }
    }
    let _ = writeln!(out);
    if let (Some(s), Some(r)) = (switch, yield_median) {
        let _ = writeln!(
            out,
            "Guest switch: {} switches between the landmarks around the ping-pong, {} ticks each. A \
             guest's own clock shows {r} per round trip (the part of the exit and of its next entry \
             before its clock stops and after it restarts: it is stopped while the guest waits). Not \
             seen by either guest: about {} ticks per switch (handling the YIELD, the XSAVE/XRSTOR, \
             MSR, CR2 and debug-register switch, VMPTRLD, the scheduler, the other guest's loop body).\n",
            s.switches,
            s.one_way,
            s.one_way.saturating_sub(r)
        );
    }

    let _ = writeln!(out, "Memory overhead per guest (as Keel prints it):");
    let overhead: Vec<&str> = keel_serial
        .lines()
        .filter(|l| l.starts_with("keel: guest ") && l.contains(" overhead: "))
        .collect();
    if overhead.is_empty() {
        let _ = writeln!(
            out,
            "  Keel printed no `keel: guest N NAME overhead: ...` line. Needed, per guest, at \
             creation (hypervisor.rs Vm::create): VMCS bytes, EPT tables (Ept::tables_used), I/O \
             and MSR bitmap bytes, XSAVE area bytes, device state bytes (size_of Guest plus the \
             heap its Platform allocates)."
        );
    }
    for line in overhead {
        let _ = writeln!(out, "  {}", line.trim_start_matches("keel: "));
    }
    let _ = writeln!(out);

    let _ = writeln!(
        out,
        "Ticks from power-on (Bochs' TSC starts at 0 at power-on and counts instructions):"
    );
    let tick = |v: Option<u64>| v.map_or("missing".into(), |t: u64| t.to_string());
    let _ = writeln!(
        out,
        "  BIOS jumps to the boot sector:             {} (Keel run), {} (bare run)",
        tick(keel_log.boot_sector),
        tick(bare_log.boot_sector)
    );
    let _ = writeln!(
        out,
        "  bare: first instruction of bench64:        {} (its first RDTSC: no TSC offset)",
        tick(bare.first_rdtsc)
    );
    let _ = writeln!(
        out,
        "  Keel: reads IA32_APIC_BASE (LAPIC setup):  {}",
        tick(keel_log.apic_base_read)
    );
    let first = keel_log
        .first_access(landmark::FIRST)
        .map(|t| t.saturating_sub(landmark::FIRST_OFFSET));
    let _ = writeln!(
        out,
        "  Keel: first instruction of guest 0 ({main_name}): {} (Bochs log: its first LAPIC read, less {} instructions)",
        tick(first),
        landmark::FIRST_OFFSET
    );
    if let (Some(f), Some(g)) = (first, main_off.first_rdtsc) {
        let _ = writeln!(
            out,
            "  {main_name}'s own first RDTSC reads {g}: Keel's TSC offset starts each guest's clock \
             at 0 when it creates the guest, here at tick {}; so that RDTSC counts from guest \
             creation, not from power-on.",
            f.saturating_sub(g)
        );
    }
    out
}

fn cycles_n(r: &GuestReport) -> String {
    match r.ops.get("cpuid") {
        Some(Figure::Cycles { n, .. }) => n.to_string(),
        _ => "?".into(),
    }
}

/// A Bochs boot of `image` in `work_dir`.
fn boot(image: &Path, work_dir: &Path, timeout: Duration, echo: bool) -> Result<RunResult> {
    let mut opts = RunOptions::new(image, Firmware::Bios, Emulator::Bochs, work_dir);
    opts.timeout = Some(timeout);
    opts.echo = echo;
    emulator::run(&opts)
}

fn read_log(work_dir: &Path) -> BochsLog {
    BochsLog::parse(&std::fs::read_to_string(work_dir.join("emulator.log")).unwrap_or_default())
}

/// The whole command. `opts` comes from the image options of the command line (release forced).
pub fn run(opts: &ImageOptions, args: &BenchArgs) -> Result<ExitCode> {
    if args.linux {
        return linux::run(opts, args);
    }
    crate::tools::require(Emulator::Bochs, Firmware::Bios)?;
    let mut opts = opts.clone();
    opts.release = true;
    if args.build.manifest.is_none() {
        opts.manifest = opts.root.join(DEFAULT_MANIFEST);
    }
    let work = opts.out.join("bench");
    let guests_dir = match &opts.files {
        Some(dir) => dir.clone(),
        None => {
            let dir = work.join("guests");
            image::build_guests(&opts.root, &dir, opts.quiet)?;
            opts.files = Some(dir.clone());
            dir
        }
    };
    let bare_image = guests_dir.join(BARE_IMAGE);
    if !bare_image.is_file() {
        bail!(
            "{} is missing: tests/guests/build.sh makes it (tests/guests/bench64/build.sh)",
            bare_image.display()
        );
    }
    let images = image::build_images(&opts)?;
    // The same manifest with APIC virtualization off for every guest: its own image.
    let mut off_opts = opts.clone();
    off_opts.out = work.join("apicv-off-image");
    let off_manifest = work.join("apicv-off.toml");
    std::fs::create_dir_all(&work)?;
    let off_text = crate::manifest_file::with_keel_setting(
        &std::fs::read_to_string(&opts.manifest)?,
        "apicv",
        "off",
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", opts.manifest.display()))?;
    std::fs::write(&off_manifest, off_text)?;
    off_opts.manifest = off_manifest;
    let off_images = image::build_images(&off_opts)?;
    let timeout = Duration::from_secs(args.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS));
    emulator::install_interrupt_handler();

    let keel_dir = work.join("keel");
    std::fs::create_dir_all(&keel_dir)?;
    // The kernel with its symbols, next to the disk that boots it, for trace_exits.py: the one in
    // target/ is rebuilt by the next build in this checkout.
    std::fs::copy(&images.kernel, keel_dir.join(KERNEL_COPY))?;
    eprintln!("keel-boot bench: Keel with {}", opts.manifest.display());
    let keel_run = boot(&images.bios, &keel_dir, timeout, args.echo)?;
    eprintln!("keel-boot bench: Keel with APIC virtualization off");
    let off_dir = work.join("keel-apicv-off");
    let off_run = boot(&off_images.bios, &off_dir, timeout, args.echo)?;
    eprintln!("keel-boot bench: bare {}", bare_image.display());
    let bare_dir = work.join("bare");
    let bare_run = boot(&bare_image, &bare_dir, timeout, args.echo)?;
    eprintln!(
        "keel-boot bench: Bochs took {:.1} s (Keel), {:.1} s (Keel, APIC virtualization off) and {:.1} s (bare); run files in {}",
        keel_run.wall.as_secs_f64(),
        off_run.wall.as_secs_f64(),
        bare_run.wall.as_secs_f64(),
        work.display()
    );

    let keel = parse_serial(&keel_run.serial);
    let keel_off = parse_serial(&off_run.serial);
    let bare = parse_serial(&bare_run.serial)
        .remove("")
        .unwrap_or_default();
    print!(
        "{}",
        report(
            &keel,
            &keel_off,
            &bare,
            &read_log(&off_dir),
            &read_log(&bare_dir),
            &keel_run.serial
        )
    );
    let mut problems = Vec::new();
    for (run, dir) in [(&keel, &keel_dir), (&keel_off, &off_dir)] {
        if run.is_empty() || run.values().any(|r| !r.done) {
            problems.push(format!(
                "a Keel run did not finish every guest (files in {})",
                dir.display()
            ));
        }
    }
    if !bare.done {
        problems.push(format!(
            "the bare run did not finish (files in {})",
            bare_dir.display()
        ));
    }
    if keel_run.interrupted || off_run.interrupted || bare_run.interrupted {
        return Ok(ExitCode::from(130));
    }
    if !problems.is_empty() {
        eprintln!("keel-boot bench: {}", problems.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEL: &str = "\
keel: guest 0 bench-a overhead: 35 KiB (VMCS 4, EPT 3 tables, I/O+MSR bitmaps 12, XSAVE 4, devices 3712 B)
[bench-a] bench: mode=keel id=0 first-rdtsc=3413471 cmdline=mode=keel yields=1000
[bench-b] bench: mode=keel id=1 first-rdtsc=788783 cmdline=mode=keel yields=1000
[bench-a] bench: yield min=906 median=906 max=906 n=1000
[bench-b] bench: yield min=900 median=906 max=910 n=1000
[bench-b] bench: done
[bench-a] bench: cpuid min=382 median=382 max=893 n=1000
[bench-a] bench: mmio-read min=2522 median=2522 max=2571 n=1000
[bench-a] bench: done
";

    #[test]
    fn guest_lines_by_guest() {
        let r = parse_serial(KEEL);
        assert_eq!(r.len(), 2);
        let a = &r["bench-a"];
        assert_eq!(a.id, Some(0));
        assert_eq!(a.first_rdtsc, Some(3413471));
        assert_eq!(a.yields, Some(1000));
        assert!(a.done);
        assert_eq!(
            a.ops["cpuid"],
            Figure::Cycles {
                min: 382,
                median: 382,
                max: 893,
                n: 1000
            }
        );
        assert_eq!(cycles(r["bench-b"].ops.get("yield")), Some((900, 906, 910)));
    }

    #[test]
    fn bare_lines_and_not_applicable() {
        let r = parse_serial(
            "bench: vmcall n/a (no hypervisor)\nbench: out min=4 median=4 max=5 n=10\nbench: don",
        );
        let bare = &r[""];
        assert_eq!(
            bare.ops["vmcall"],
            Figure::NotApplicable("no hypervisor".into())
        );
        assert_eq!(cycles(bare.ops.get("out")), Some((4, 4, 5)));
        assert!(!bare.done, "a cut-off last line is not `done`");
        assert!(parse_figure("cpuid min=1 median=x max=2 n=3").is_none());
        assert!(parse_figure("cpuid min=1 max=2 n=3").is_none());
    }

    #[test]
    fn command_line() {
        let argv = ["keel-boot", "bench", "--timeout", "30", "--echo", "--quiet"];
        let Ok(crate::cli::Cmd::Bench(b)) = crate::cli::parse(argv).map(|i| i.cmd) else {
            panic!("bench parses");
        };
        assert_eq!(b.timeout_secs, Some(30));
        assert!(b.echo && b.build.quiet && b.build.release, "always release");
        assert!(!b.linux);
        assert!(crate::cli::parse(["keel-boot", "bench", "--uefi"]).is_err());
        let Ok(crate::cli::Cmd::Bench(b)) =
            crate::cli::parse(["keel-boot", "bench", "--linux"]).map(|i| i.cmd)
        else {
            panic!("bench --linux parses");
        };
        assert!(b.linux && b.build.release);
        let e = crate::cli::parse(["keel-boot", "bench", "--linux", "--manifest", "m.toml"])
            .expect_err("--linux makes its own manifest");
        assert!(
            e.to_string()
                .contains("bench --linux writes its own manifest"),
            "{e}"
        );
    }

    const LOG: &str = "\
00034125870i[BIOS  ] Booting from 0000:7c00
00056490429i[CPU0  ] RDMSR: Read 00000000:fee00900 from MSR_APICBASE
00062923891e[CPU0  ] VMEXIT: EPT violation for guest paddr 0x0000fee00030 laddr 0x00000000fee00030
00063024758e[CPU0  ] VMEXIT: EPT violation for guest paddr 0x0000fee00030 laddr 0x00000000fee00030
00063780624e[CPU0  ] VMEXIT: EPT violation for guest paddr 0x0000fee00100 laddr 0x00000000fee00100
00063784946e[CPU0  ] VMEXIT: EPT violation for guest paddr 0x0000fee00120 laddr 0x00000000fee00120
00066262261e[CPU0  ] VMEXIT: EPT violation for guest paddr 0x0000fee00110 laddr 0x00000000fee00110
00066362577e[CPU0  ] VMEXIT: EPT violation for guest paddr 0x0000fee00130 laddr 0x00000000fee00130
00000000000i[CPU0  ] | RIP=000000800002040b (000000800002040a)
";

    #[test]
    fn bochs_landmarks() {
        let log = BochsLog::parse(LOG);
        assert_eq!(log.boot_sector, Some(34125870));
        assert_eq!(log.apic_base_read, Some(56490429));
        assert_eq!(log.ept_violations.len(), 6);
        assert_eq!(log.first_access(landmark::FIRST), Some(62923891));
        let s = switch_from_landmarks(&log, 1000, 2522).expect("landmarks are there");
        assert_eq!(s.switches, 1999);
        assert_eq!(s.one_way, (66262261 - 63784946 - 2522) / 1999);
        assert!(switch_from_landmarks(&log, 0, 2522).is_none());
        assert!(switch_from_landmarks(&BochsLog::default(), 1000, 0).is_none());
    }

    #[test]
    fn report_has_every_row_and_section() {
        let keel = parse_serial(KEEL);
        let bare = parse_serial("bench: cpuid min=4 median=4 max=4 n=1000\nbench: done\n")
            .remove("")
            .unwrap_or_default();
        let on = parse_serial(&KEEL.replace(
            "mmio-read min=2522 median=2522 max=2571",
            "mmio-read min=9 median=9 max=12",
        ));
        let text = report(
            &on,
            &keel,
            &bare,
            &BochsLog::parse(LOG),
            &BochsLog::default(),
            KEEL,
        );
        assert!(
            text.contains("| CPUID leaf 0 `cpuid` | 382 / **382** / 893 | 382 / **382** / 893 | 4 | 378 | 1290 (CPUID exit) | <= 130: over |"),
            "{text}"
        );
        // Each row with and without APIC virtualization; the TPR without an exit meets its goal.
        assert!(
            text.contains("`mmio-read` | 9 / **9** / 12 | 2522 / **2522** / 2571 | missing | - | - | no VM exit (< 100): met |"),
            "{text}"
        );
        assert!(text.contains("`cr8-write` | missing | missing |"), "{text}");
        assert!(
            text.contains("`x2apic-eoi` | missing | missing |"),
            "{text}"
        );
        // The switch comes from the landmarks of the run without APIC virtualization.
        assert!(text.contains("per switch | - | 1238 |"), "{text}");
        assert!(text.contains("YIELD round trip in bench-b's own clock"));
        assert!(text.contains("guest 0 bench-a overhead: 35 KiB"));
        assert!(text.contains("first instruction of guest 0 (bench-a): 62923887"));
        assert!(text.contains("here at tick 59510416"), "{text}");
    }
}
