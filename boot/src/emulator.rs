//! Booting a disk image in an emulator and watching it: COM1 is followed live (optionally echoed to
//! stdout), port 0xE9 is captured, and the run ends when the emulator exits, when Keel has printed
//! its `keel: exit status N` line, or at the time limit.
//!
//! The emulator runs in a process group of its own, so a time limit or a Ctrl-C stops exactly
//! the processes this run started (Bochs, and the Xvfb server of its `xvfb-run`), never another
//! user's emulator.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::console::{self, Com1, FileTail};
use crate::pty::Pty;
use crate::tools::{self, HostTools};
use crate::{bochs, qemu};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    /// Bochs with its VMX emulation: the VT-x platform when the host has no nested VT-x.
    Bochs,
    /// QEMU with TCG: no VMX, so Keel stops with "no VMX". Fast; tests the boot path.
    Qemu,
    /// QEMU with KVM and `-cpu host`: real VT-x, on an Intel host with nested virtualization.
    QemuKvm,
}

impl Emulator {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bochs" => Some(Self::Bochs),
            "qemu" | "qemu-tcg" => Some(Self::Qemu),
            "qemu-kvm" | "kvm" => Some(Self::QemuKvm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bochs => "bochs",
            Self::Qemu => "qemu",
            Self::QemuKvm => "qemu-kvm",
        }
    }

    /// A time limit that leaves room on a busy 2-core machine.
    pub fn default_timeout(self, firmware: Firmware) -> Duration {
        Duration::from_secs(match (self, firmware) {
            (Self::Bochs, Firmware::Bios) => 300,
            (Self::Bochs, Firmware::Uefi) => 600,
            (Self::Qemu, _) => 120,
            (Self::QemuKvm, _) => 60,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bios => "bios",
            Self::Uefi => "uefi",
        }
    }
}

/// KVM is only worth using when it can give Keel VMX: `/dev/kvm` must exist and the host CPU must
/// show `vmx` (an AMD host or a software KVM such as kvm_pvm has none). Otherwise Bochs.
pub fn choose_emulator(kvm_device: bool, cpuinfo: &str) -> Emulator {
    if kvm_device && tools::cpu_has_vmx(cpuinfo) {
        Emulator::QemuKvm
    } else {
        Emulator::Bochs
    }
}

/// The best emulator on this host (see [`choose_emulator`]).
pub fn best_emulator() -> Emulator {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    choose_emulator(Path::new("/dev/kvm").exists(), &cpuinfo)
}

/// Processors of the emulated machine unless `--cpus` says otherwise.
pub const DEFAULT_CPUS: u32 = 1;

/// How to run one boot.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The disk image: keel-bios.img or keel-uefi.img to match `firmware`.
    pub image: PathBuf,
    pub firmware: Firmware,
    pub emulator: Emulator,
    /// `None`: no limit.
    pub timeout: Option<Duration>,
    pub memory_mib: u32,
    pub bochs_ips: u64,
    pub bochs_cpu: String,
    /// Processors of the emulated machine (Bochs `cpu: count`, QEMU `-smp`).
    pub cpus: u32,
    /// Where the run keeps its files (serial.log, e9.log, emulator.log/.stdout/.stderr, the
    /// bochsrc, the disk copy). Created if needed; files of an earlier run there are replaced.
    pub work_dir: PathBuf,
    /// Copy COM1 to stdout as it arrives.
    pub echo: bool,
    /// Connect COM1 to a pseudo-terminal and forward this process's stdin to it, so the user can
    /// type to Keel. Off: COM1 goes straight to a file and nothing can be typed.
    pub console_input: bool,
    /// A scripted session on COM1 (expect a line, type a reply), instead of this process's stdin.
    /// A step that times out stops the run (`RunResult::script_failed`).
    pub script: Vec<console::Step>,
    /// The time between two bytes the script types.
    pub type_pace: Duration,
    /// Keel's control channel: COM2 on a pseudo-terminal joined to a unix socket at this path
    /// (`control::Bridge`) for the length of the run. `None`: no COM2.
    pub control: Option<PathBuf>,
    /// Keel's bulk disk (docs/SNAPSHOTS.md, "The bulk disk"): a raw file attached as the primary
    /// channel's second ATA disk (Bochs `ata0-slave`, QEMU IDE index 1), made
    /// [`BULK_FILE_BYTES`] long if it does not exist. `None`: no bulk disk.
    pub bulk: Option<PathBuf>,
}

/// The size of a bulk disk file made by a run: 8 cylinders of 16 heads and 63 sectors (a whole
/// CHS geometry, which Bochs wants of a flat image), room for a 1 MiB piece and its header.
pub const BULK_FILE_BYTES: u64 = 8 * 16 * 63 * 512;

/// Makes the bulk disk file if it does not exist (zeros, [`BULK_FILE_BYTES`]); a file that
/// exists must be a whole number of sectors. Returns its absolute path.
pub fn bulk_file(path: &Path) -> Result<PathBuf> {
    let path =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    match std::fs::metadata(&path) {
        Ok(m) if m.len() % 512 != 0 || m.len() < 2 * 512 => bail!(
            "bulk disk {} is {} bytes: not a whole number of 512-byte sectors (at least 2)",
            path.display(),
            m.len()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f =
                File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            f.set_len(BULK_FILE_BYTES)
                .with_context(|| format!("cannot size {}", path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    Ok(path)
}

impl RunOptions {
    pub fn new(image: &Path, firmware: Firmware, emulator: Emulator, work_dir: &Path) -> Self {
        Self {
            image: image.to_path_buf(),
            firmware,
            emulator,
            timeout: Some(emulator.default_timeout(firmware)),
            memory_mib: 256,
            bochs_ips: bochs::DEFAULT_IPS,
            bochs_cpu: bochs::DEFAULT_CPU_MODEL.into(),
            cpus: DEFAULT_CPUS,
            work_dir: work_dir.to_path_buf(),
            echo: false,
            console_input: false,
            script: Vec::new(),
            type_pace: Duration::from_millis(20),
            control: None,
            bulk: None,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// COM1 as text, CR and NUL bytes removed.
    pub serial: String,
    /// Port 0xE9 as text.
    pub e9: String,
    /// QEMU's exit status (`(code << 1) | 1` after isa-debug-exit); `None` when this tool stopped
    /// it, and always for Bochs, whose status says nothing about the guest.
    pub exit_code: Option<i32>,
    /// N from Keel's last `keel: exit status N` line.
    pub keel_status: Option<u32>,
    pub timed_out: bool,
    /// The run was cut short by Ctrl-C (SIGINT/SIGTERM/SIGHUP to this tool).
    pub interrupted: bool,
    /// The end of the Bochs log or of QEMU's standard error.
    pub emulator_log_tail: String,
    pub wall: Duration,
    /// From the start of the emulator to the first complete line on COM1 (the bootloader's).
    pub first_serial_line_after: Option<Duration>,
    /// From the start of the emulator to the first line Keel printed.
    pub first_keel_line_after: Option<Duration>,
    pub work_dir: PathBuf,
    /// When each step of `RunOptions::script` saw its line (from the start of the emulator).
    pub script_matched_at: Vec<Duration>,
    /// The step that saw no line in time, as a sentence.
    pub script_failed: Option<String>,
}

impl RunResult {
    /// The run's verdict as a process exit status: QEMU's own status if it ended by itself,
    /// otherwise the status Keel printed.
    /// Keel's status 0 (the operator's `quit`, nothing failed) is the one QEMU cannot give: its
    /// isa-debug-exit always ends with an odd status (3 then).
    pub fn status(&self) -> Option<i32> {
        if self.keel_status == Some(KEEL_SUCCESS) {
            return Some(0);
        }
        self.exit_code
            .or(self.keel_status.and_then(|s| i32::try_from(s).ok()))
    }

    /// True when both QEMU's status and Keel's line exist and disagree.
    pub fn status_mismatch(&self) -> bool {
        match (self.exit_code, self.keel_status) {
            (Some(QEMU_AFTER_SUCCESS), Some(KEEL_SUCCESS)) => false,
            (Some(code), Some(keel)) => i64::from(code) != i64::from(keel),
            _ => false,
        }
    }

    /// Lines of COM1 that contain `needle`.
    pub fn serial_lines_with<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = &'a str> {
        self.serial.lines().filter(move |l| l.contains(needle))
    }
}

/// Keel's status after `quit` with no guest failed (`ExitCode::Quit`), and QEMU's then.
pub const KEEL_SUCCESS: u32 = 0;
const QEMU_AFTER_SUCCESS: i32 = (1 << 1) | 1;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP end a run cleanly (the emulator is in its own process group
/// and does not see the terminal's Ctrl-C). For command-line front ends; call once.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The files of one run.
struct RunFiles {
    serial: PathBuf,
    e9: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Bochs' log file (QEMU has none: its messages go to stderr).
    log: PathBuf,
}

fn prepare(
    opts: &RunOptions,
    tools: &HostTools,
    terminal: Option<&Path>,
    com2: Option<&Path>,
) -> Result<(Command, RunFiles)> {
    // The emulator runs in the work directory, so every path it gets must be absolute.
    let dir = &std::path::absolute(&opts.work_dir)
        .with_context(|| format!("cannot resolve {}", opts.work_dir.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = RunFiles {
        serial: dir.join("serial.log"),
        e9: dir.join("e9.log"),
        stdout: dir.join("emulator.stdout"),
        stderr: dir.join("emulator.stderr"),
        log: dir.join("emulator.log"),
    };
    for f in [
        &files.serial,
        &files.e9,
        &files.stdout,
        &files.stderr,
        &files.log,
    ] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", f.display())),
        }
    }
    if !opts.image.is_file() {
        bail!("disk image {} does not exist", opts.image.display());
    }
    let com1 = match terminal {
        Some(tty) => Com1::Terminal(tty.to_path_buf()),
        None => Com1::File(files.serial.clone()),
    };
    let bulk = opts.bulk.as_deref().map(bulk_file).transpose()?;
    let mut cmd = match tools {
        HostTools::Bochs {
            bochs,
            xvfb_run,
            rom,
            vga_rom,
        } => {
            let cfg = bochs::BochsConfig {
                memory_mib: opts.memory_mib,
                ips: opts.bochs_ips,
                cpu_model: opts.bochs_cpu.clone(),
                cpus: opts.cpus,
                rom: rom.clone(),
                vga_rom: vga_rom.clone(),
                disk: dir.join("disk.img"),
                com1,
                com2: com2.map(Path::to_path_buf),
                bulk: bulk.clone(),
                log: files.log.clone(),
            };
            bochs_command(opts, dir, &cfg, xvfb_run, bochs)?
        }
        HostTools::Qemu { qemu, ovmf } => {
            let cfg = qemu::QemuConfig {
                kvm: opts.emulator == Emulator::QemuKvm,
                memory_mib: opts.memory_mib,
                cpus: opts.cpus,
                disk: std::path::absolute(&opts.image)?,
                ovmf: None,
                com1,
                com2: com2.map(Path::to_path_buf),
                bulk: bulk.clone(),
                e9_out: files.e9.clone(),
            };
            qemu_command(dir, cfg, qemu, ovmf.as_ref())?
        }
    };
    let stderr = File::create(&files.stderr)
        .with_context(|| format!("cannot create {}", files.stderr.display()))?;
    cmd.stderr(stderr);
    Ok((cmd, files))
}

fn bochs_command(
    opts: &RunOptions,
    dir: &Path,
    cfg: &bochs::BochsConfig,
    xvfb_run: &Path,
    bochs_bin: &Path,
) -> Result<Command> {
    // Bochs locks the image it opens (and leaves IMAGE.lock behind when killed), so each run
    // boots its own copy.
    std::fs::copy(&opts.image, &cfg.disk).with_context(|| {
        format!(
            "cannot copy {} to {}",
            opts.image.display(),
            cfg.disk.display()
        )
    })?;
    let _ = std::fs::remove_file(dir.join("disk.img.lock"));
    if let Some(bulk) = &cfg.bulk {
        // Bochs' lock of a run that was killed.
        let mut lock = bulk.clone().into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(lock);
    }
    for p in [&cfg.rom, &cfg.vga_rom, &cfg.disk, cfg.com1.path(), &cfg.log]
        .into_iter()
        .chain(cfg.com2.as_deref())
        .chain(cfg.bulk.as_deref())
    {
        if !bochs::rc_safe(p) {
            bail!(
                "{} cannot go into a bochsrc (quote, comma or newline)",
                p.display()
            );
        }
    }
    let rc = dir.join("bochsrc");
    let cmds = dir.join("bochs-debugger-cmds");
    std::fs::write(&rc, bochs::bochsrc(cfg))
        .with_context(|| format!("cannot write {}", rc.display()))?;
    std::fs::write(&cmds, "c\n").with_context(|| format!("cannot write {}", cmds.display()))?;
    let mut cmd = bochs::command(xvfb_run, bochs_bin, &rc, &cmds);
    cmd.current_dir(dir);
    Ok(cmd)
}

fn qemu_command(
    dir: &Path,
    mut cfg: qemu::QemuConfig,
    qemu_bin: &Path,
    ovmf: Option<&(PathBuf, PathBuf)>,
) -> Result<Command> {
    if let Some((code, vars_template)) = ovmf {
        // UEFI writes its variable store; each run starts from the pristine template.
        let vars = dir.join("ovmf-vars.fd");
        std::fs::copy(vars_template, &vars).with_context(|| {
            format!(
                "cannot copy {} to {}",
                vars_template.display(),
                vars.display()
            )
        })?;
        cfg.ovmf = Some((code.clone(), vars));
    }
    for p in [&cfg.disk, cfg.com1.path(), &cfg.e9_out]
        .into_iter()
        .chain(cfg.com2.as_deref())
        .chain(cfg.bulk.as_deref())
    {
        if !qemu::path_ok(p) {
            bail!(
                "QEMU cannot take the path {} (it holds a comma)",
                p.display()
            );
        }
    }
    let mut cmd = Command::new(qemu_bin);
    cmd.args(qemu::args(&cfg));
    Ok(cmd)
}

/// Processes in process group `pgid` whose command name is one of `names`, read from /proc.
fn group_members_named(pgid: i32, names: &[&str]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split at the last ')'.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let name = &stat[open + 1..close];
            let pgrp = stat[close + 1..].split_whitespace().nth(2);
            names.contains(&name) && pgrp.and_then(|p| p.parse::<i32>().ok()) == Some(pgid)
        })
        .collect()
}

fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops this run's emulator. Bochs runs under `xvfb-run`: stopping Bochs alone lets `xvfb-run`
/// shut its X server down and remove its files; only if that does not happen is the whole process
/// group (which holds nothing but this run's processes) killed.
fn stop(child: &mut Child, emulator: Emulator) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let pgid = child.id() as i32;
    let leaf = match emulator {
        // Debian's /usr/bin/bochs is a script that execs `bochs-bin`.
        Emulator::Bochs => group_members_named(pgid, &["bochs", "bochs-bin"]),
        Emulator::Qemu | Emulator::QemuKvm => vec![pgid],
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        for &pid in &leaf {
            // SAFETY: plain kill(2) on a process of this run's own process group.
            unsafe { libc::kill(pid, sig) };
        }
        if let Some(status) = wait_until(child, Duration::from_secs(2)) {
            return Some(status);
        }
    }
    // Reached only when no emulator process was found in the group or it did not go away; the X
    // server may then leave its lock file in /tmp.
    // SAFETY: a negative pid names the process group created for this child alone.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    wait_until(child, Duration::from_secs(5))
}

/// Plays `script` against the text of COM1 so far: types the replies of the steps that matched.
/// A sentence naming the step if one timed out.
fn follow_script(
    script: &mut console::Script,
    serial: &str,
    start: Instant,
    typist: &crate::pty::Typist,
) -> Option<String> {
    loop {
        match script.poll(serial, start.elapsed()) {
            console::Cue::Send { bytes, .. } => typist.send(bytes),
            console::Cue::Wait | console::Cue::Done => return None,
            console::Cue::TimedOut { step } => {
                let s = &script.steps()[step];
                return Some(format!(
                    "script step {step}: no COM1 line containing {:?} within {:.0} s",
                    s.expect,
                    s.timeout.as_secs_f64()
                ));
            }
        }
    }
}

/// Boots `opts.image` and watches it; see the module documentation.
pub fn run(opts: &RunOptions) -> Result<RunResult> {
    let tools = tools::require(opts.emulator, opts.firmware)?;
    let scripted = !opts.script.is_empty();
    let pty = if opts.console_input || scripted {
        let pty = Pty::open()?;
        crate::pty::check_path(&pty.path)?;
        Some(pty)
    } else {
        None
    };
    // COM2's terminal and its socket live as long as this function: the bridge is dropped (and
    // its socket removed) when the run ends.
    let control = match &opts.control {
        Some(socket) => {
            let pty = Pty::open()?;
            crate::pty::check_path(&pty.path)?;
            let bridge = crate::control::Bridge::start(pty.controller()?, socket)?;
            Some((pty, bridge))
        }
        None => None,
    };
    let (mut cmd, files) = prepare(
        opts,
        &tools,
        pty.as_ref().map(|p| p.path.as_path()),
        control.as_ref().map(|(p, _)| p.path.as_path()),
    )?;
    // With a terminal, this tool writes serial.log itself from what the emulator sends.
    let pump_stop = Arc::new(AtomicBool::new(false));
    // While the user's keys go to COM1, they go as typed (no Enter needed, no local echo); the
    // terminal is put back when this function returns.
    let mut _keys_as_typed = None;
    let pump = match &pty {
        Some(pty) => {
            let pump = pty.copy_output_to(&files.serial, pump_stop.clone())?;
            if !scripted {
                pty.forward_stdin()?;
                _keys_as_typed = crate::terminal::KeysAsTyped::on_stdin()?;
            }
            Some(pump)
        }
        None => None,
    };
    let stdout = File::create(&files.stdout)
        .with_context(|| format!("cannot create {}", files.stdout.display()))?;
    cmd.stdin(Stdio::null()).stdout(stdout).process_group(0);

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    let mut tail = FileTail::new(&files.serial);
    let mut result = RunResult {
        work_dir: opts.work_dir.clone(),
        ..RunResult::default()
    };
    let mut echo = std::io::stdout();
    let mut status_seen: Option<Instant> = None;
    let mut script = console::Script::new(opts.script.clone());
    let typist = match (&pty, scripted) {
        (Some(pty), true) => Some(pty.typist(opts.type_pace)?),
        _ => None,
    };
    let exit_status = loop {
        let exited = child.try_wait().context("cannot wait for the emulator")?;
        let new = tail.poll().context("cannot read the serial log")?;
        if !new.is_empty() {
            let text = console::clean(&new);
            if opts.echo {
                let _ = echo.write_all(text.as_bytes());
                let _ = echo.flush();
            }
            result.serial.push_str(&text);
            let now = start.elapsed();
            if result.first_serial_line_after.is_none() && result.serial.contains('\n') {
                result.first_serial_line_after = Some(now);
            }
            if result.first_keel_line_after.is_none()
                // `contains`: Keel's first line can follow the bootloader's last one without a
                // newline (the UART reset drops the bootloader's final byte).
                && console::complete_lines(&result.serial).any(|l| l.contains("keel: "))
            {
                result.first_keel_line_after = Some(now);
            }
        }
        if exited.is_some() {
            break exited;
        }
        if let Some(typist) = &typist {
            if let Some(failed) = follow_script(&mut script, &result.serial, start, typist) {
                result.script_failed = Some(failed);
                break stop(&mut child, opts.emulator);
            }
        }
        if status_seen.is_none() && console::keel_status(&result.serial).is_some() {
            status_seen = Some(Instant::now());
        }
        if let Some(seen) = status_seen {
            // Bochs cannot report the status and is stopped at once; QEMU leaves through
            // isa-debug-exit right after the line, and is given a moment to report its status.
            let grace = match opts.emulator {
                Emulator::Bochs => Duration::ZERO,
                Emulator::Qemu | Emulator::QemuKvm => Duration::from_secs(3),
            };
            if seen.elapsed() >= grace {
                break stop(&mut child, opts.emulator);
            }
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            result.interrupted = true;
            break stop(&mut child, opts.emulator);
        }
        if opts.timeout.is_some_and(|t| start.elapsed() >= t) {
            result.timed_out = true;
            break stop(&mut child, opts.emulator);
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    result.wall = start.elapsed();
    result.script_matched_at = script.matched_at.clone();
    pump_stop.store(true, Ordering::SeqCst);
    if let Some(pump) = pump {
        let _ = pump.join();
    }
    // Whatever arrived between the last poll and the end.
    let mut rest = console::clean(&tail.poll().unwrap_or_default());
    // The emulator is gone, so a last line without its newline is complete. (Bochs may stop with
    // the final byte still in the emulated UART's transmitter.)
    let last = rest.chars().last().or(result.serial.chars().last());
    if last.is_some_and(|c| c != '\n') {
        rest.push('\n');
    }
    if opts.echo {
        let _ = echo.write_all(rest.as_bytes());
        let _ = echo.flush();
    }
    result.serial.push_str(&rest);
    result.keel_status = console::keel_status(&result.serial);
    result.exit_code = match opts.emulator {
        // Bochs' own status (1 after the "Shutdown" port, too) says nothing about the guest.
        Emulator::Bochs => None,
        // A status only counts when QEMU ended by itself, not by a signal from `stop`.
        Emulator::Qemu | Emulator::QemuKvm => {
            exit_status.and_then(|s| if s.signal().is_some() { None } else { s.code() })
        }
    };
    result.e9 = match opts.emulator {
        Emulator::Bochs => {
            bochs::e9_from_stdout(&std::fs::read_to_string(&files.stdout).unwrap_or_default())
        }
        Emulator::Qemu | Emulator::QemuKvm => {
            console::clean(&std::fs::read(&files.e9).unwrap_or_default())
        }
    };
    if opts.emulator == Emulator::Bochs {
        let _ = std::fs::write(&files.e9, &result.e9);
    }
    result.emulator_log_tail = match opts.emulator {
        Emulator::Bochs => console::file_tail(&files.log, 30),
        Emulator::Qemu | Emulator::QemuKvm => console::file_tail(&files.stderr, 30),
    };
    if result.keel_status.is_none() && opts.emulator == Emulator::Bochs {
        // xvfb-run and Bochs' start-up report their errors on stderr, not in the log.
        let err = console::file_tail(&files.stderr, 10);
        if !err.is_empty() {
            result
                .emulator_log_tail
                .push_str("--- emulator stderr ---\n");
            result.emulator_log_tail.push_str(&err);
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD_PVM: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor\n";
    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme vmx ept tsc\n";

    #[test]
    fn kvm_only_with_vmx() {
        assert_eq!(choose_emulator(true, AMD_PVM), Emulator::Bochs);
        assert_eq!(choose_emulator(false, INTEL), Emulator::Bochs);
        assert_eq!(choose_emulator(true, INTEL), Emulator::QemuKvm);
        // "vmx" must be a whole flag, not part of another word.
        assert_eq!(choose_emulator(true, "flags\t: vmxfake\n"), Emulator::Bochs);
    }

    #[test]
    fn names_round_trip() {
        for e in [Emulator::Bochs, Emulator::Qemu, Emulator::QemuKvm] {
            assert_eq!(Emulator::parse(e.name()), Some(e));
        }
        assert_eq!(Emulator::parse("vbox"), None);
    }

    #[test]
    fn verdict_prefers_the_emulator_status() {
        let mut r = RunResult {
            keel_status: Some(33),
            ..RunResult::default()
        };
        assert_eq!(r.status(), Some(33));
        assert!(!r.status_mismatch());
        r.exit_code = Some(33);
        assert!(!r.status_mismatch());
        r.exit_code = Some(0);
        assert_eq!(r.status(), Some(0));
        assert!(r.status_mismatch());
        // `quit`: Keel says 0, QEMU can only say 3.
        let quit = RunResult {
            keel_status: Some(0),
            exit_code: Some(3),
            ..RunResult::default()
        };
        assert_eq!(quit.status(), Some(0));
        assert!(!quit.status_mismatch());
    }

    #[test]
    fn missing_image_is_reported() {
        let dir = std::env::temp_dir().join(format!("keel-boot-noimg-{}", std::process::id()));
        let opts = RunOptions::new(&dir.join("none.img"), Firmware::Bios, Emulator::Qemu, &dir);
        let tools = HostTools::Qemu {
            qemu: "qemu-system-x86_64".into(),
            ovmf: None,
        };
        let e = prepare(&opts, &tools, None, None)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("none.img does not exist")),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
