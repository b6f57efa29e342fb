//! Test kernels written for QEMU (`qemu-system-x86_64 -kernel K -initrd "M1 args,M2" -append
//! "..." -device isa-debug-exit`) run under Keel unmodified: the same kernel file, modules and
//! command line run once under QEMU (TCG, no Keel) and once as a Keel guest in Bochs
//! (tests/guests/manifests/qemu-kernels.toml), and both must print the same lines and end
//! with the same status. Where they differ Keel is wrong: QEMU is the reference.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_tests::{harness_dir, shared_boot, BootSpec, Emulator, Firmware, Manifest};

static QEMU_KERNELS: BootSpec = BootSpec {
    name: "bochs-bios-qemu-kernels",
    manifest: Manifest::File("tests/guests/manifests/qemu-kernels.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

/// qk32 as the manifest runs it, in QEMU's terms. QEMU's CPU gets Intel's vendor string, as
/// Keel's guests see: for an AMD one QEMU 7.1+ adds a reserved entry at 1012 GiB to the map.
const KERNEL: &str = "qk32.elf";
const APPEND: &str = "one two=2";
const INITRD: &str = "real16.bin alpha beta,pm32.elf";
const MEMORY_MIB: &str = "32";
/// qk32 writes 0x2a to the isa-debug-exit port when every step ran.
const DONE_STATUS: i32 = (0x2a << 1) | 1;

struct QemuRun {
    lines: Vec<String>,
    status: Option<i32>,
}

/// Runs `KERNEL` under QEMU TCG from `dir` (so its file name is `qk32.elf`, as in the
/// manifest), COM1 to a file, for at most a minute.
fn run_qemu(dir: &Path) -> QemuRun {
    let serial = dir.join("qemu-com1.txt");
    let _ = std::fs::remove_file(&serial);
    let mut child = Command::new("qemu-system-x86_64")
        .current_dir(dir)
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "qemu64,vendor=GenuineIntel",
            "-m",
            MEMORY_MIB,
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-kernel", KERNEL, "-append", APPEND, "-initrd", INITRD])
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-system-x86_64 (apt-get install qemu-system-x86): {e}")
        });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    QemuRun {
        lines: text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect(),
        status,
    }
}

/// The guest files as tests/guests/build.sh makes them, in a directory of this test's own.
fn guest_files() -> std::path::PathBuf {
    let dir = harness_dir()
        .join("qemu-kernels")
        .join(format!("guests.{}", std::process::id()));
    let root = keel_boot::image::workspace_root();
    keel_boot::image::build_guests(&root, &dir, true)
        .unwrap_or_else(|e| panic!("building the guests failed: {e:#}"));
    dir
}

#[test]
fn qk32_prints_the_same_under_keel_as_under_qemu() {
    let dir = guest_files();
    let qemu = run_qemu(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let keel = shared_boot(&QEMU_KERNELS);
    let keel_lines: Vec<&str> = keel.guest_lines("qk32").collect();
    let report = |why: &str| -> ! {
        keel.fail(&format!(
            "{why}\n--- QEMU (status {:?}) ---\n{}\n",
            qemu.status,
            qemu.lines.join("\n")
        ))
    };
    if qemu.status != Some(DONE_STATUS)
        || qemu.lines.last().map(String::as_str) != Some("qk32: done")
    {
        report("qk32 did not run to its end under QEMU: the reference itself failed");
    }
    if keel_lines != qemu.lines {
        let first = keel_lines
            .iter()
            .zip(&qemu.lines)
            .position(|(k, q)| k != q)
            .unwrap_or(keel_lines.len().min(qemu.lines.len()));
        report(&format!(
            "Keel and QEMU differ from line {} on: Keel {:?}, QEMU {:?}",
            first + 1,
            keel_lines.get(first),
            qemu.lines.get(first)
        ));
    }
    // The same exit status: QEMU's process status, Keel's report of the guest's debug-exit.
    keel.expect_line(&format!(
        "keel: guest qk32 ended: debug-exit status {DONE_STATUS:#x}"
    ));
    keel.expect_keel_unhurt();
}
