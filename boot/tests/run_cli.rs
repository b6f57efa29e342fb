//! `keel-boot run` on a host without the emulator: it must name what is missing and its Debian
//! package, before building or starting anything.

use std::process::Command;

const KEEL_BOOT: &str = env!("CARGO_BIN_EXE_keel-boot");

#[test]
fn missing_emulator_is_named_with_its_package() {
    let dir = std::env::temp_dir().join(format!("keel-run-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("keel-bios.img");
    std::fs::write(&image, [0u8; 512]).expect("write image");
    for (emulator, program, package) in [
        ("bochs", "program `bochs`", "Debian package: bochs"),
        ("bochs", "program `xvfb-run`", "Debian package: xvfb"),
        (
            "qemu",
            "program `qemu-system-x86_64`",
            "Debian package: qemu-system-x86",
        ),
    ] {
        let out = Command::new(KEEL_BOOT)
            .args(["run", "--emulator", emulator, "--image"])
            .arg(&image)
            .env("PATH", dir.join("empty-path"))
            .output()
            .expect("run keel-boot");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("{program} ({package})")),
            "{emulator}: {err}"
        );
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stand-in for QEMU that boots nothing and waits, as an emulator in the firmware's silent
/// seconds does; `dir` goes first on PATH.
fn fake_qemu(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let qemu = dir.join("qemu-system-x86_64");
    std::fs::write(&qemu, "#!/bin/sh\nexec sleep 600\n").expect("write the fake QEMU");
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Ctrl-C during a run stops the emulator and ends with 130 and one line, not the report of a
/// failed run (the emulator's log, port 0xE9, the run directory: 47 lines before).
#[test]
fn ctrl_c_stops_the_emulator_quietly() {
    let dir = std::env::temp_dir().join(format!("keel-run-ctrlc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    fake_qemu(&dir);
    let image = dir.join("keel-bios.img");
    std::fs::write(&image, [0u8; 512]).expect("write image");
    let path = format!("{}:/usr/bin:/bin", dir.display());
    let child = Command::new(KEEL_BOOT)
        .args(["run", "--emulator", "qemu", "--no-input", "--image"])
        .arg(&image)
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start keel-boot");
    // Wait for the emulator to be started, then interrupt as the terminal's Ctrl-C does.
    let work = dir.join(format!("run-qemu-bios.{}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !work.join("emulator.stderr").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("keel-boot ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with("keel-boot: booting "), "{err}");
    assert_eq!(
        lines[1],
        "keel-boot: QEMU: waiting for the firmware (BIOS); Keel's first line usually comes after ~1.5 s"
    );
    assert!(
        lines[2].starts_with("keel-boot: interrupted: qemu stopped after "),
        "{err}"
    );
    assert!(!work.exists(), "the run's directory is removed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Outside a checkout `image` says where it looked and how to name one; `--workspace` must name
/// a Keel checkout.
#[test]
fn outside_a_checkout_the_error_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("keel-run-nows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = Command::new(KEEL_BOOT)
        .arg("image")
        .current_dir(&dir)
        .env_remove("KEEL_WORKSPACE")
        .output()
        .expect("run keel-boot");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "keel-boot: error: {} is not inside a Keel checkout (no Cargo.toml whose [workspace] \
             members include \"hypervisor\" there or above): run this in your checkout, or name \
             it with --workspace DIR or KEEL_WORKSPACE=DIR\n",
            dir.display()
        )
    );
    let out = Command::new(KEEL_BOOT)
        .args(["image", "--workspace"])
        .arg(&dir)
        .output()
        .expect("run keel-boot");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(": not a Keel checkout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--version`, and `--help` for every subcommand, on stdout with status 0.
#[test]
fn version_and_help() {
    let out = Command::new(KEEL_BOOT)
        .arg("--version")
        .output()
        .expect("run keel-boot");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("keel-boot {}\n", env!("CARGO_PKG_VERSION"))
    );
    for sub in ["image", "run", "flash", "bench"] {
        let out = Command::new(KEEL_BOOT)
            .args([sub, "--help"])
            .output()
            .expect("run keel-boot");
        assert_eq!(out.status.code(), Some(0), "{sub}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(&format!("Usage: cargo keel {sub}")), "{help}");
    }
}

/// `flash` refuses a device that is not a USB disk before it builds anything: here, outside a
/// checkout, a build would have failed first with the workspace error.
#[test]
fn flash_checks_the_device_before_building() {
    let dir = std::env::temp_dir().join(format!("keel-run-flash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = Command::new(KEEL_BOOT)
        .args(["flash", "/dev/null", "--yes"])
        .current_dir(&dir)
        .env_remove("KEEL_WORKSPACE")
        .output()
        .expect("run keel-boot");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "keel-boot: error: refusing /dev/null: it is a character device, not a block device (give \
         the whole USB disk, e.g. /dev/sdb)\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
