//! `keel-boot` (`cargo keel ...`): build images, boot them in an emulator, flash a USB stick.
//! See `cargo keel --help` and docs/BOOTING.md.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use keel_boot::cli::{self, Cmd, FlashArgs, ImageArgs, RunArgs};
use keel_boot::emulator::{self, Emulator, Firmware, RunOptions};
use keel_boot::image::{self, ImageOptions, Images};
use keel_boot::{console, flash};

/// `run`'s exit status when the time limit hit, as timeout(1) does.
const EXIT_TIMEOUT: u8 = 124;
/// `run`'s exit status when interrupted (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

fn image_options(b: &ImageArgs, workspace: Option<&Path>) -> Result<ImageOptions> {
    let root = image::locate_workspace(workspace)?;
    let mut opts = ImageOptions::new(&root);
    if let Some(m) = &b.manifest {
        opts.manifest = m.clone();
    }
    opts.files = b.files.clone();
    opts.release = b.release;
    opts.out = b
        .out
        .clone()
        .unwrap_or_else(|| image::default_out_dir(&root, b.release));
    opts.quiet = b.quiet;
    if let Some(linux) = &b.linux {
        let (manifest, files) = image::write_linux_guest(&opts.out, linux)?;
        opts.manifest = manifest;
        opts.files = Some(files);
    }
    Ok(opts)
}

/// What the user waits for between the emulator's start and Keel's first line: the firmware,
/// which prints little or nothing. The figures are those of docs/BOOTING.md, "Measurements".
fn firmware_wait(emulator: Emulator, firmware: Firmware) -> String {
    let (who, after) = match (emulator, firmware) {
        (Emulator::Bochs, Firmware::Bios) => ("Bochs", "~1 s"),
        (Emulator::Bochs, Firmware::Uefi) => ("Bochs", "~10 s"),
        (Emulator::Qemu, Firmware::Bios) => ("QEMU", "~1.5 s"),
        (Emulator::Qemu, Firmware::Uefi) => ("QEMU", "~5 s"),
        // Not measured (the project's machines have no VT-x): KVM runs the firmware at native
        // speed, faster than TCG.
        (Emulator::QemuKvm, _) => ("QEMU/KVM", "~1 s"),
    };
    let fw = match firmware {
        Firmware::Bios => "BIOS",
        Firmware::Uefi => "UEFI",
    };
    format!("{who}: waiting for the firmware ({fw}); Keel's first line usually comes after {after}")
}

fn build(b: &ImageArgs, workspace: Option<&Path>) -> Result<Images> {
    let opts = image_options(b, workspace)?;
    let images = image::build_images(&opts)?;
    eprintln!(
        "keel-boot: {} guest(s) [{}] from {}\n  BIOS image: {}\n  UEFI image: {}",
        images.guests.len(),
        images.guests.join(", "),
        opts.manifest.display(),
        images.bios.display(),
        images.uefi.display()
    );
    Ok(images)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn run(r: &RunArgs, workspace: Option<&Path>) -> Result<ExitCode> {
    let firmware = if r.uefi {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };
    let emulator = r.emulator.unwrap_or_else(emulator::best_emulator);
    // Check the emulator before spending a build on it.
    keel_boot::tools::require(emulator, firmware)?;
    let (image, out) = match &r.image {
        Some(path) if !path.is_file() => bail!(
            "--image {}: no such file (`cargo keel image` builds the images and prints where they \
             are; without --image, `run` builds and boots in one go)",
            path.display()
        ),
        Some(path) => {
            let out = path.parent().map(PathBuf::from).unwrap_or_default();
            (path.clone(), out)
        }
        None => {
            let images = build(&r.build, workspace)?;
            let out = images.bios.parent().map(PathBuf::from).unwrap_or_default();
            let image = match firmware {
                Firmware::Bios => images.bios,
                Firmware::Uefi => images.uefi,
            };
            (image, out)
        }
    };
    let kept = r.work_dir.is_some();
    let work_dir = r.work_dir.clone().unwrap_or_else(|| {
        out.join(format!(
            "run-{}-{}.{}",
            emulator.name(),
            firmware.name(),
            std::process::id()
        ))
    });
    let mut opts = RunOptions::new(&image, firmware, emulator, &work_dir);
    if let Some(t) = r.timeout_secs {
        opts.timeout = (t > 0).then(|| Duration::from_secs(t));
    }
    if let Some(m) = r.memory_mib {
        opts.memory_mib = m;
    } else if let (Some(linux), None) = (&r.build.linux, &r.image) {
        // Room for the guest, the ramdisk and Keel (docs/BOOTING.md, `--linux`).
        let ramdisk = std::fs::metadata(out.join("ramdisk.keelarc")).map_or(0, |m| m.len());
        opts.memory_mib = image::linux_machine_mib(linux.memory, ramdisk);
        if emulator == emulator::Emulator::Bochs && opts.memory_mib > cli::BOCHS_MAX_MEMORY_MIB {
            bail!(
                "a {} MiB Linux guest needs a {} MiB machine, more than Bochs' {} MiB: use a smaller --linux-memory",
                linux.memory >> 20,
                opts.memory_mib,
                cli::BOCHS_MAX_MEMORY_MIB
            );
        }
    }
    if let Some(n) = r.cpus {
        opts.cpus = n;
    }
    if let Some(ips) = r.ips {
        opts.bochs_ips = ips;
    }
    if let Some(cpu) = &r.cpu {
        opts.bochs_cpu = cpu.clone();
    }
    let socket = match &r.control {
        Some(p) => p.clone(),
        None => {
            let default = keel_boot::control::default_socket(&image::locate_workspace(workspace)?);
            // Another run has the default one: this run's gets its process id.
            if std::os::unix::net::UnixStream::connect(&default).is_ok() {
                default.with_file_name(format!("control-{}.sock", std::process::id()))
            } else {
                default
            }
        }
    };
    opts.control = Some(socket.clone());
    opts.bulk = r.bulk.clone();
    opts.echo = !r.no_echo;
    opts.console_input = !r.no_input && std::io::stdin().is_terminal();
    eprintln!(
        "keel-boot: booting {} in {} ({}), time limit {}; control channel (`cargo keel ctl`) on {}",
        image.display(),
        emulator.name(),
        firmware.name(),
        opts.timeout
            .map_or("none".into(), |t| format!("{} s", t.as_secs())),
        socket.display()
    );
    if !r.build.quiet {
        eprintln!("keel-boot: {}", firmware_wait(emulator, firmware));
    }
    emulator::install_interrupt_handler();
    let result = emulator::run(&opts)?;
    if result.interrupted {
        // Ctrl-C: the user knows why the run ended; one line, not the failure report.
        let newline = if std::io::stderr().is_terminal() {
            "\n"
        } else {
            ""
        };
        eprintln!(
            "{newline}keel-boot: interrupted: {} stopped after {:.1} s",
            emulator.name(),
            result.wall.as_secs_f64()
        );
        if !kept {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    eprintln!(
        "keel-boot: {} after {:.1} s (first serial line {}, first Keel line {})",
        match (result.keel_status, result.exit_code) {
            (Some(s), _) => format!("Keel exit status {s}"),
            (None, Some(c)) => format!("{} exited with {c}, no Keel status line", emulator.name()),
            (None, None) => "no Keel status line".into(),
        },
        result.wall.as_secs_f64(),
        secs(result.first_serial_line_after),
        secs(result.first_keel_line_after),
    );
    if result.status_mismatch() {
        eprintln!(
            "keel-boot: warning: QEMU exited with {:?} but Keel printed status {:?}",
            result.exit_code, result.keel_status
        );
    }
    let failed = result.timed_out || result.keel_status.is_none();
    if failed {
        if result.timed_out {
            eprintln!("keel-boot: timed out; the emulator was stopped");
        }
        if !result.emulator_log_tail.is_empty() {
            eprintln!(
                "keel-boot: end of the emulator log:\n{}",
                result.emulator_log_tail
            );
        }
        if !result.e9.is_empty() {
            eprintln!(
                "keel-boot: port 0xE9 output:\n{}",
                console::tail_lines(&result.e9, 20)
            );
        }
        eprintln!("keel-boot: the run's files are in {}", work_dir.display());
    } else if !kept {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(if result.timed_out {
        ExitCode::from(EXIT_TIMEOUT)
    } else if result.keel_status.is_none() {
        // QEMU ends with 0 after a triple fault (-no-reboot): without Keel's line it is a failure.
        ExitCode::FAILURE
    } else {
        run_status(result.status())
    })
}

/// `run`'s exit status for Keel's (or QEMU's) status: 0 when Keel completed (status 1, `(0 << 1)
/// | 1`: every guest ran to its end), so that shells and CI read a good run as success; any other
/// status as it is.
fn run_status(status: Option<i32>) -> ExitCode {
    match status {
        Some(COMPLETED) => ExitCode::SUCCESS,
        Some(s) => ExitCode::from(u8::try_from(s).unwrap_or(u8::MAX)),
        None => ExitCode::FAILURE,
    }
}

/// Keel's status when every guest ran to its end (`arch::ExitCode::Completed`, 0, on port 0xF4).
const COMPLETED: i32 = 1;

/// `cargo keel migrate`: prints each round, then the figures.
fn migrate(m: &cli::MigrateArgs) -> Result<ExitCode> {
    use keel_boot::migrate::{self as mig, Socket};
    let timeout = Duration::from_secs(m.timeout_secs);
    let mut a = Socket {
        path: &m.from,
        timeout,
    };
    let mut b = Socket {
        path: &m.to,
        timeout,
    };
    let transport = match &m.bulk {
        Some((from, to)) => mig::Transport::Disk { a: from, b: to },
        None => mig::Transport::Serial,
    };
    let report = mig::migrate_over(&m.name, &mut a, &mut b, transport, &mut |line| {
        println!("{line}")
    })?;
    println!("{}", mig::describe(&m.name, &report));
    Ok(ExitCode::SUCCESS)
}

/// `cargo keel ctl`: sends the command, prints the reply (as JSON with --json).
fn ctl(c: &cli::CtlArgs, workspace: Option<&Path>) -> Result<ExitCode> {
    let socket = match &c.control {
        Some(p) => p.clone(),
        None => keel_boot::control::default_socket(&image::locate_workspace(workspace)?),
    };
    let timeout = Duration::from_secs(c.timeout_secs);
    let words: Vec<&str> = c.command.split_whitespace().collect();
    let rate = |t: keel_boot::control::Transfer| {
        format!(
            "{} bytes in {:.1} s ({:.1} KiB/s)",
            t.bytes,
            t.elapsed.as_secs_f64(),
            t.bytes as f64 / 1024.0 / t.elapsed.as_secs_f64().max(1e-3)
        )
    };
    if let Some(bulk) = &c.bulk {
        let mut channel = keel_boot::migrate::Socket {
            path: &socket,
            timeout,
        };
        let mut k = keel_boot::bulk::Keel {
            channel: &mut channel,
            bulk,
        };
        match (words.as_slice(), &c.out) {
            (["snapshot", name, rest @ ..], Some(out)) if matches!(rest, [] | ["paused"]) => {
                let t = keel_boot::bulk::fetch_snapshot(&mut k, name, !rest.is_empty(), out)?;
                println!("snapshot written to {}: {}", out.display(), rate(t));
            }
            (["restore", name, file], _) => {
                let t = keel_boot::bulk::send_snapshot(&mut k, name, Path::new(file))?;
                println!("{name} restored from {file}: {}", rate(t));
            }
            _ => {
                bail!("--bulk goes with `snapshot NAME [paused] --out FILE` or `restore NAME FILE`")
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    match (words.as_slice(), &c.out) {
        (["snapshot", ..], Some(out)) => {
            let t = keel_boot::control::fetch_snapshot(&socket, &c.command, out, timeout)?;
            println!("snapshot written to {}: {}", out.display(), rate(t));
            return Ok(ExitCode::SUCCESS);
        }
        (["snapshot", ..], None) if c.json => {}
        (["snapshot", ..], None) => {
            bail!("snapshot NAME needs --out FILE (the snapshot is written there)")
        }
        (["restore", name, file, rest @ ..], _)
            if file.parse::<usize>().is_err() && matches!(rest, [] | ["paused"]) =>
        {
            let t = keel_boot::control::send_snapshot(
                &socket,
                name,
                Path::new(file),
                !rest.is_empty(),
                timeout,
            )?;
            println!("{name} restored from {file}: {}", rate(t));
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let reply = keel_boot::control::request(&socket, &c.command, timeout)?;
    let described = keel_boot::control::describe(&reply);
    if c.json {
        println!("{reply}");
    } else if let Ok(text) = &described {
        print!("{text}");
    }
    match described {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("keel-boot: Keel answered: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn flash_cmd(f: &FlashArgs, workspace: Option<&Path>) -> Result<ExitCode> {
    // The device is checked before a build is spent on it (and again before writing).
    flash::check_device(&f.device, &flash::SystemView::live()?, f.force)?;
    let image = match &f.image {
        Some(p) => p.clone(),
        None => {
            let images = build(&f.build, workspace)?;
            if f.bios {
                images.bios
            } else {
                images.uefi
            }
        }
    };
    if !image.is_file() {
        bail!("image {} does not exist", image.display());
    }
    let opts = flash::FlashOptions {
        image,
        device: f.device.clone(),
        force: f.force,
        yes: f.yes,
    };
    let stdin = std::io::stdin();
    flash::flash(&opts, &mut stdin.lock(), &mut std::io::stderr())?;
    eprintln!(
        "keel-boot: wrote {} to {}",
        opts.image.display(),
        opts.device.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let inv = match cli::parse(std::env::args_os()) {
        Ok(inv) => inv,
        // --help and --version (status 0), or a usage error with its hint (status 2).
        Err(e) => e.exit(),
    };
    let ws = inv.workspace.as_deref();
    let result = match inv.cmd {
        Cmd::Image(b) => build(&b, ws).map(|_| ExitCode::SUCCESS),
        Cmd::Run(r) => run(&r, ws),
        Cmd::Flash(f) => flash_cmd(&f, ws),
        Cmd::Bench(b) => {
            image_options(&b.build, ws).and_then(|opts| keel_boot::bench::run(&opts, &b))
        }
        Cmd::Ctl(c) => ctl(&c, ws),
        Cmd::Migrate(m) => migrate(&m),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel-boot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `run` says while the firmware is silent: the figures of docs/BOOTING.md.
    #[test]
    fn firmware_wait_names_the_usual_delay() {
        assert_eq!(
            firmware_wait(Emulator::Bochs, Firmware::Bios),
            "Bochs: waiting for the firmware (BIOS); Keel's first line usually comes after ~1 s"
        );
        assert_eq!(
            firmware_wait(Emulator::Bochs, Firmware::Uefi),
            "Bochs: waiting for the firmware (UEFI); Keel's first line usually comes after ~10 s"
        );
    }

    /// A good run is a success to the shell; every other ending keeps its number.
    #[test]
    fn a_completed_run_exits_0() {
        assert_eq!(run_status(Some(1)), ExitCode::SUCCESS);
        assert_eq!(run_status(Some(39)), ExitCode::from(39));
        assert_eq!(run_status(Some(300)), ExitCode::from(255));
        assert_eq!(run_status(None), ExitCode::FAILURE);
    }
}
