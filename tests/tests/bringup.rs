//! Keel alone, without guests: VMX bring-up where there is VMX (Bochs), the "no VMX" stop where
//! there is none (QEMU TCG).

use keel_tests::{shared_boot, BootSpec, Emulator, Firmware};

use crate::NO_GUESTS;

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
