//! Boots Keel in the emulators of this host and checks what it prints. Run with `cargo itest`
//! (or `scripts/test.sh`); a missing emulator fails these tests, it does not skip them.
//!
//! Each `BootSpec` boots once (see `keel_tests::shared_boot`); tests that read the same boot
//! assert different lines of it.

use keel_tests::{shared_boot, BootSpec, Emulator, Firmware, Manifest};

/// No guests: these boots check Keel's own bring-up. Keel turns VMX on before it looks at the
/// manifest, then stops because there is nothing to run.
const NO_GUESTS: Manifest = Manifest::Inline {
    name: "no-guests",
    text: "# Keel alone: bring-up checks, no guests.\n[keel]\nquantum_ms = 10\n",
};

/// Status of a run that ended in `ExitCode::NoVmx` (0x10): QEMU's isa-debug-exit reports
/// (0x10 << 1) | 1.
const NO_VMX_STATUS: u32 = (0x10 << 1) | 1;
const NO_VMX_LINE: &str = "keel: fatal: no VMX: CPUID.1:ECX.VMX[bit 5] = 0";

static BOCHS_BIOS: BootSpec = BootSpec {
    name: "bochs-bios",
    manifest: NO_GUESTS,
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

static BOCHS_UEFI: BootSpec = BootSpec {
    name: "bochs-uefi",
    manifest: NO_GUESTS,
    emulator: Emulator::Bochs,
    firmware: Firmware::Uefi,
    timeout: None,
};

static QEMU_BIOS: BootSpec = BootSpec {
    name: "qemu-tcg-bios",
    manifest: NO_GUESTS,
    emulator: Emulator::Qemu,
    firmware: Firmware::Bios,
    timeout: None,
};

static QEMU_UEFI: BootSpec = BootSpec {
    name: "qemu-tcg-uefi",
    manifest: NO_GUESTS,
    emulator: Emulator::Qemu,
    firmware: Firmware::Uefi,
    timeout: None,
};

#[test]
fn bochs_bios_reaches_vmxon() {
    let boot = shared_boot(&BOCHS_BIOS);
    boot.expect_in_order(&["keel: Keel", "keel: VMXON ok", "keel: exit status"]);
    boot.expect_some_keel_status();
}

#[test]
fn bochs_bios_reports_its_machine() {
    let boot = shared_boot(&BOCHS_BIOS);
    boot.expect_line("keel: firmware Bios");
    boot.expect_line("keel: CPU GenuineIntel");
    boot.expect_line("timer calibrated");
    boot.expect_none_before("keel: fatal", "keel: VMXON ok");
    boot.expect_no_line("PANIC");
}

#[test]
fn bochs_uefi_reaches_vmxon() {
    let boot = shared_boot(&BOCHS_UEFI);
    boot.expect_in_order(&["keel: firmware Uefi", "keel: VMXON ok", "keel: exit status"]);
    boot.expect_some_keel_status();
    boot.expect_none_before("keel: fatal", "keel: VMXON ok");
    boot.expect_no_line("PANIC");
}

#[test]
fn qemu_tcg_bios_reports_no_vmx() {
    let boot = shared_boot(&QEMU_BIOS);
    boot.expect_line(NO_VMX_LINE);
    boot.expect_keel_status(NO_VMX_STATUS);
    boot.expect_exit_code(NO_VMX_STATUS as i32);
    boot.expect_no_line("keel: VMXON ok");
}

#[test]
fn qemu_tcg_uefi_reports_no_vmx() {
    let boot = shared_boot(&QEMU_UEFI);
    boot.expect_line("keel: firmware Uefi");
    boot.expect_line(NO_VMX_LINE);
    boot.expect_keel_status(NO_VMX_STATUS);
    boot.expect_exit_code(NO_VMX_STATUS as i32);
}

/// Cut off long before OVMF reaches Keel (about 10 s).
static BOCHS_UEFI_CUT_SHORT: BootSpec = BootSpec {
    name: "bochs-uefi-timeout",
    manifest: NO_GUESTS,
    emulator: Emulator::Bochs,
    firmware: Firmware::Uefi,
    timeout: Some(std::time::Duration::from_secs(2)),
};

/// Command lines of the running processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmd| cmd.contains(needle))
        .collect()
}

/// Whether `pid` is running (a zombie, killed but not yet reaped, is not).
fn running(pid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|close| stat[close + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// X server lock files (/tmp/.X<n>-lock) whose server process is gone.
fn stale_x_locks() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".X") && n.ends_with("-lock"))
        .filter(|n| {
            let pid = std::fs::read_to_string(format!("/tmp/{n}")).unwrap_or_default();
            let pid = pid.trim();
            !pid.is_empty() && !running(pid)
        })
        .collect()
}

#[test]
fn a_timeout_stops_bochs_and_xvfb_run() {
    let stale_before = stale_x_locks();
    let boot = match keel_tests::boot(&BOCHS_UEFI_CUT_SHORT) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    if !boot.result.timed_out {
        boot.fail("a 2 s limit did not time out");
    }
    if boot.result.keel_status.is_some() {
        boot.fail("Keel finished within 2 s in Bochs UEFI: pick a shorter limit");
    }
    let rc = boot.result.work_dir.join("bochsrc");
    let left = processes_mentioning(&rc.to_string_lossy());
    if !left.is_empty() {
        boot.fail(&format!(
            "processes still running after the timeout: {left:?}"
        ));
    }
    // Stopping Bochs lets xvfb-run stop its X server, which removes its lock; killing the whole
    // group instead leaves the lock behind.
    let new_stale: Vec<String> = stale_x_locks()
        .into_iter()
        .filter(|l| !stale_before.contains(l))
        .collect();
    if !new_stale.is_empty() {
        boot.fail(&format!(
            "the X server was killed without cleanup: {new_stale:?} left in /tmp"
        ));
    }
}
