//! Keel alone, without guests: VMX bring-up where there is VMX (Bochs), the "no VMX" stop where
//! there is none (QEMU TCG).

use keel_tests::{shared_boot, status, BootSpec, Emulator, Firmware, Outcome};

use crate::NO_GUESTS;

/// Status of a run that ended in `ExitCode::NoVmx` (0x10): QEMU's isa-debug-exit reports
/// (0x10 << 1) | 1.
const NO_VMX_STATUS: u32 = status::NO_VMX;
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
    // Nothing to run: the manifest has no guests.
    boot.expect_keel_status(status::NO_GUESTS);
}

/// Keel's first line is a line of its own, not glued to the bootloader's last one (resetting
/// the UART while the bootloader's final newline was in its FIFO once dropped that newline).
#[test]
fn keels_first_line_starts_a_line() {
    for spec in [&BOCHS_BIOS, &QEMU_BIOS] {
        let boot = shared_boot(spec);
        if !boot.lines().any(|l| l.starts_with("keel: Keel ")) {
            boot.fail("no COM1 line starts with `keel: Keel `");
        }
    }
}

#[test]
fn bochs_bios_reports_its_machine() {
    let boot = shared_boot(&BOCHS_BIOS);
    boot.expect_line("keel: firmware Bios");
    boot.expect_line("keel: CPU GenuineIntel");
    boot.expect_line("timer calibrated");
    expect_only_the_no_guests_failure(&boot);
}

/// A boot without guests ends with `NoGuests`: its one fatal line is "no guest could be started",
/// after VMXON; anything else Keel prints when it fails is a failure of the bring-up.
#[track_caller]
fn expect_only_the_no_guests_failure(boot: &Outcome) {
    const NO_GUESTS_LINE: &str = "keel: fatal: no guest could be started";
    boot.expect_in_order(&["keel: VMXON ok", NO_GUESTS_LINE]);
    for marker in keel_tests::KEEL_FAILURE_MARKERS {
        if let Some(line) = boot
            .lines()
            .find(|l| l.contains(marker) && *l != NO_GUESTS_LINE)
        {
            boot.fail(&format!("unexpected COM1 line `{line}`"));
        }
    }
    boot.expect_keel_status(status::NO_GUESTS);
}

#[test]
fn bochs_uefi_reaches_vmxon() {
    let boot = shared_boot(&BOCHS_UEFI);
    boot.expect_in_order(&["keel: firmware Uefi", "keel: VMXON ok", "keel: exit status"]);
    expect_only_the_no_guests_failure(&boot);
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

/// Keel's own failure paths, triggered on purpose by the manifest (`[keel] selftest = ...`): a
/// Keel bug must end with a readable report on COM1 and `ExitCode::Panic` (0x1f: status 63).
const PANIC_STATUS: u32 = status::PANIC;

static SELFTEST_PANIC: BootSpec = BootSpec {
    name: "bochs-selftest-panic",
    manifest: keel_tests::Manifest::Inline {
        name: "selftest-panic",
        text: "[keel]\nselftest = \"panic\"\n",
    },
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

static SELFTEST_FAULT: BootSpec = BootSpec {
    name: "bochs-selftest-fault",
    manifest: keel_tests::Manifest::Inline {
        name: "selftest-fault",
        text: "[keel]\nselftest = \"fault\"\n",
    },
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

#[test]
fn a_keel_panic_prints_file_line_and_message_then_stops() {
    let boot = shared_boot(&SELFTEST_PANIC);
    let line = boot.expect_line("keel: fatal: PANIC at hypervisor/src/");
    if !line.contains(".rs:") || !line.contains("self-test: a panic requested by the manifest") {
        boot.fail(&format!(
            "the panic line lacks file:line or the message: `{line}`"
        ));
    }
    boot.expect_keel_status(PANIC_STATUS);
}

#[test]
fn a_cpu_exception_in_keel_is_reported_with_its_registers() {
    let boot = shared_boot(&SELFTEST_FAULT);
    boot.expect_in_order(&[
        "keel: self-test: executing UD2 in Keel",
        "keel: fatal: CPU exception in Keel: #UD invalid opcode",
        "keel: fatal:   rip 0x",
        "keel: fatal:   cr0 0x",
    ]);
    boot.expect_keel_status(PANIC_STATUS);
}
