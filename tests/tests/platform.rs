//! The PC platform of a guest (devices::board, acpi.rs, docs/DEVICES.md): platform32 reads it
//! under Keel in Bochs and under QEMU TCG with `-kernel`, and the facts both machines share must
//! read the same. Facts that differ by design (QEMU's firmware tables and chipset are richer than
//! Keel's) are listed in tests/guests/README.md and not compared.

use keel_tests::{shared_boot, BootSpec, Emulator, Firmware, Manifest, Outcome};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

static PLATFORM: BootSpec = BootSpec {
    name: "bochs-bios-platform",
    manifest: Manifest::File("tests/guests/manifests/platform.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

/// The lines platform32 prints alike under QEMU (`-m 64`, one CPU) and under Keel.
const SHARED_FACTS: [&str; 23] = [
    "platform32: acpi rsdp found",
    "platform32: madt lapic_addr=0xfee00000 pcat_compat=1",
    "platform32: madt cpu uid=0 apic_id=0 enabled=1",
    "platform32: madt ioapic id=0 addr=0xfec00000 gsi_base=0",
    "platform32: madt irq0 gsi=2",
    "platform32: madt nmi uid=0xff lint=1",
    "platform32: fadt sci=9 pm1a_evt=0x600 pm1a_cnt=0x604 pm_tmr=0x608 pm_tmr_len=4",
    "platform32: dsdt _S5 slp_typ=0",
    "platform32: pm timer advances=yes",
    "platform32: pci conf1 address=0x80000000",
    "platform32: pci 00:00.0 id=8086:1237 class=060000",
    "platform32: pci 00:1f.0 id=ffffffff",
    "platform32: pci 01:00.0 id=ffffffff",
    "platform32: fw_cfg signature=QEMU",
    "platform32: fw_cfg cpus=1",
    "platform32: fw_cfg max_cpus=1",
    "platform32: fw_cfg ram=67108864",
    "platform32: i8042 selftest=55",
    "platform32: i8042 kbd_test=00",
    "platform32: i8042 kbd_reset=fa aa",
    "platform32: powering off",
    "platform32: hello from protected mode",
    "platform32: table FACP",
];

/// Builds the guests once for the QEMU runs; the directory they are in.
fn built_guests() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = keel_boot::image::workspace_root();
        let dir = keel_tests::harness_dir().join("platform-qemu");
        keel_boot::image::build_guests(&root, &dir, true).expect("building the guests");
        dir
    })
}

/// platform32's output under `qemu-system-x86_64 -kernel` (TCG, `-m 64`) with command line
/// `append`, and QEMU's exit status. With `reboot` false QEMU stops at a reset (`-no-reboot`).
fn qemu(append: &str, reboot: bool) -> (Vec<String>, i32) {
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg("qemu-system-x86_64");
    cmd.args(["-display", "none", "-serial", "stdio", "-m", "64"]);
    cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    if !reboot {
        cmd.arg("-no-reboot");
    }
    cmd.arg("-kernel")
        .arg(built_guests().join("platform32.elf"));
    cmd.args(["-append", append]);
    let out = cmd
        .output()
        .expect("qemu-system-x86_64 runs (apt-get install qemu-system-x86)");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = text.lines().map(|l| l.trim_end().to_string()).collect();
    (lines, out.status.code().unwrap_or(-1))
}

/// The plain run (no reset), shared by the tests that compare it.
fn qemu_run() -> &'static (Vec<String>, i32) {
    static RUN: OnceLock<(Vec<String>, i32)> = OnceLock::new();
    RUN.get_or_init(|| qemu("", false))
}

#[track_caller]
fn expect_checksums_ok(lines: impl Iterator<Item = String>, who: &str) {
    let tables: Vec<String> = lines.filter(|l| l.contains(": table ")).collect();
    assert!(tables.len() >= 4, "{who}: too few tables: {tables:?}");
    for t in &tables {
        assert!(t.ends_with("checksum ok"), "{who}: {t}");
    }
}

#[test]
fn qemu_and_keel_show_the_same_platform() {
    let (qemu, status) = qemu_run();
    assert_eq!(*status, 0, "QEMU powered off through ACPI: {qemu:#?}");
    let boot: &Outcome = &shared_boot(&PLATFORM);
    for fact in SHARED_FACTS {
        assert!(
            qemu.iter().any(|l| l.starts_with(fact)),
            "QEMU did not print `{fact}`: {qemu:#?}"
        );
        boot.expect_guest_line("platform32", fact);
    }
    expect_checksums_ok(qemu.iter().cloned(), "QEMU");
    expect_checksums_ok(boot.guest_lines("platform32").map(String::from), "Keel");
}

#[test]
fn keel_tables_are_its_own() {
    let boot = shared_boot(&PLATFORM);
    for line in [
        "platform32: acpi rsdp rev=2 oem=KEEL",
        "platform32: table XSDT len=52 rev=1 checksum ok",
        "platform32: table FACP len=276 rev=6 checksum ok",
        "platform32: table APIC len=90 rev=5 checksum ok",
        "platform32: table DSDT len=50 rev=2 checksum ok",
        "platform32: madt override irq=0 gsi=2 flags=0x5",
        "platform32: madt override irq=9 gsi=9 flags=0xf",
        "platform32: fadt flags=0x535 tmr_val_ext=1 smi_cmd=0x0",
        "platform32: fadt reset_reg space=1 addr=0xcf9 value=0x6",
        "platform32: pm1 sci_en=1",
        "platform32: fw_cfg id=1",
        "platform32: fw_cfg files=0",
    ] {
        boot.expect_guest_line("platform32", line);
    }
}

#[test]
fn acpi_power_off_ends_the_guest_cleanly_next_to_another() {
    let boot = shared_boot(&PLATFORM);
    boot.expect_line("keel: guest platform32 ended: powered off (ACPI S5)");
    boot.expect_line("keel: guest platform32 status 0x0: powered off (ACPI S5)");
    boot.expect_no_guest_line("platform32", "still running");
    boot.expect_guest_line("mb32", "mb32: done");
    boot.expect_line(&format!("keel: guest mb32 status {:#x}", (0x12 << 1) | 1));
    boot.expect_no_line("keel: error");
    boot.expect_no_keel_failure();
    boot.expect_keel_status(keel_tests::status::COMPLETED);
}

/// Exit code platform32 writes to port 0xf4 when it is back from a reset.
const RESET_DONE: u32 = 0x15;

#[test]
fn both_reset_registers_boot_the_guest_again_as_under_qemu() {
    let boot = shared_boot(&PLATFORM);
    for (guest, via, event) in [
        ("kbdreset", "i8042", "reset (i8042 reset line)"),
        ("cf9reset", "cf9", "reset (reset control register 0xCF9)"),
    ] {
        let (qemu, status) = qemu(&format!("reset={via}"), true);
        let expected = [
            "platform32: hello from protected mode".to_string(),
            format!("platform32: resetting via {via}"),
            "platform32: hello from protected mode".to_string(),
            format!("platform32: back from a reset via {via}"),
        ];
        assert_eq!(qemu, expected, "QEMU, reset via {via}");
        assert_eq!(
            status as u32,
            (RESET_DONE << 1) | 1,
            "QEMU, reset via {via}"
        );
        let prefix = keel_tests::guest_prefix(guest);
        boot.expect_in_order(&[
            &format!("{prefix}{}", expected[0]),
            &format!("{prefix}{}", expected[1]),
            &format!("keel: guest {guest}: {event}: booting it again"),
            &format!("{prefix}{}", expected[2]),
            &format!("{prefix}{}", expected[3]),
        ]);
        boot.expect_no_guest_line(guest, "still running");
        boot.expect_line(&format!(
            "keel: guest {guest} status {:#x}",
            (RESET_DONE << 1) | 1
        ));
    }
}
