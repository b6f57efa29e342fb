//! Keel running the guests of tests/guests (their output contract is in tests/guests/README.md):
//! one guest of every kind, and a set of guests that misbehave on purpose next to a good one.

use keel_tests::{shared_boot, BootSpec, Emulator, Firmware, Manifest, Outcome};

static KINDS: BootSpec = BootSpec {
    name: "bochs-bios-kinds",
    manifest: Manifest::File("tests/guests/manifests/kinds.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

static ISOLATION: BootSpec = BootSpec {
    name: "bochs-bios-isolation",
    manifest: Manifest::File("tests/guests/manifests/isolation.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

static REFUSED: BootSpec = BootSpec {
    name: "bochs-bios-refused",
    manifest: Manifest::File("tests/guests/manifests/refused.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

static DEMO_UEFI: BootSpec = BootSpec {
    name: "bochs-uefi-demo",
    manifest: Manifest::File("tests/guests/manifests/demo.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Uefi,
    timeout: None,
};

/// Keel's status when every guest ran to its end: `ExitCode::Completed` (0) as `(0 << 1) | 1`.
const COMPLETED: u32 = keel_tests::status::COMPLETED;

/// The guests of kinds.toml in manifest order (their guest ids): name (the manifest's and
/// the guest's own), the mode it says hello from, the code it writes to port 0xf4.
const KIND_GUESTS: [(&str, &str, u32); 4] = [
    ("real16", "real mode", 0x10),
    ("pm32", "protected mode", 0x11),
    ("mb32", "protected mode", 0x12),
    ("long64", "long mode", 0x13),
];

/// Keel reports how a guest ended on a line `keel: guest NAME ended: debug-exit status 0xNN`.
#[track_caller]
fn expect_guest_status(boot: &Outcome, guest: &str, port_f4_code: u32) {
    let status = format!("status {:#x}", (port_f4_code << 1) | 1);
    let prefix = format!("keel: guest {guest} ");
    if !boot
        .lines()
        .any(|l| l.starts_with(&prefix) && l.contains(&status))
    {
        boot.fail(&format!("no `{prefix}... {status}` line"));
    }
}

/// Keel's report of a guest it stopped: `keel: error: guest NAME stopped: WHY`.
#[track_caller]
fn expect_guest_stopped(boot: &Outcome, guest: &str, why: &str) {
    let line = boot.expect_line(&format!("keel: error: guest {guest} stopped"));
    if !line.contains(why) {
        boot.fail(&format!(
            "guest {guest} was stopped, but not for `{why}`: `{line}`"
        ));
    }
}

#[test]
fn every_kind_says_hello_in_its_own_mode() {
    let boot = shared_boot(&KINDS);
    for (name, mode, _) in KIND_GUESTS {
        boot.expect_guest_line(name, &format!("{name}: hello from {mode}"));
    }
}

#[test]
fn every_kind_sees_keel_through_cpuid_and_hypercalls() {
    let boot = shared_boot(&KINDS);
    for (id, (name, _, _)) in KIND_GUESTS.iter().enumerate() {
        boot.expect_guest_line(name, "cpuid sig=KeelKeelKeel hv=1 vmx=0");
        boot.expect_guest_line(name, &format!("{name}: vmcall id={id}"));
        boot.expect_guest_line(name, "via hypercall");
        boot.expect_guest_line(name, "enosys ok");
    }
}

#[test]
fn every_kind_wakes_from_hlt_on_the_timer() {
    let boot = shared_boot(&KINDS);
    for (name, _, _) in KIND_GUESTS {
        boot.expect_guest_line(name, "hlt ok");
    }
}

#[test]
fn every_kind_ends_with_its_own_status() {
    let boot = shared_boot(&KINDS);
    for (name, _, code) in KIND_GUESTS {
        boot.expect_in_order(&[
            &format!("[{name}] {name}: hello"),
            &format!("[{name}] {name}: done"),
        ]);
        expect_guest_status(&boot, name, code);
    }
    boot.expect_keel_status(COMPLETED);
}

#[test]
fn guests_get_their_command_lines_and_memory() {
    let boot = shared_boot(&KINDS);
    boot.expect_guest_line("pm32", "cmdline=pm32 says hi ram=16777216");
    boot.expect_guest_line("long64", "cmdline=mode=good ram=16777216");
    // QEMU's convention: the kernel's file name, then the command line (docs/GUESTS.md).
    boot.expect_guest_line("mb32", "cmdline=mb32.elf mb32 says hi");
    boot.expect_guest_line("mb32", "mods=1");
    let module = boot.expect_guest_line("mb32", "module real16.bin size=");
    let size = module
        .rsplit('=')
        .next()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if !size.is_some_and(|s| s > 0) {
        boot.fail(&format!("bad module size in `{module}`"));
    }
}

/// mb32 turns on PAE paging and IA-32e mode itself, each time with a CR0 write that clears NE
/// (Keel's bit, so it exits): Keel must load the PDPTEs and check the write against the live
/// CR0/CR4, not a copy from the guest's start (issue 8, items 0 and 5).
#[test]
fn a_kernel_that_enables_paging_itself_keeps_running() {
    let boot = shared_boot(&KINDS);
    boot.expect_guest_line(
        "mb32",
        "own paging ok cr0=0x80010011 efer=0x500 pae_cr0=0x80000011 lmsw=0x80010013",
    );
    expect_guest_status(&boot, "mb32", 0x12);
}

#[test]
fn no_kind_reports_a_failure() {
    let boot = shared_boot(&KINDS);
    for (name, _, _) in KIND_GUESTS {
        for bad in ["BAD", "exception", "panic", "#UD"] {
            boot.expect_no_guest_line(name, bad);
        }
    }
    boot.expect_no_line("keel: error");
    boot.expect_no_keel_failure();
}

#[test]
fn faulting_guests_are_contained_and_the_good_one_finishes() {
    let boot = shared_boot(&ISOLATION);
    boot.expect_guest_line("vmxon", "vmxon -> #UD");
    expect_guest_status(&boot, "vmxon", 0x20);
    boot.expect_guest_line("cr4vmxe", "cr4.vmxe -> #GP");
    expect_guest_status(&boot, "cr4vmxe", 0x21);
    boot.expect_guest_line("wild", "wild write");
    expect_guest_stopped(&boot, "wild", "0x40000000");
    boot.expect_guest_line("triple", "long64: triple");
    expect_guest_stopped(&boot, "triple", "triple fault");
    boot.expect_guest_line("good", "long64: done");
    expect_guest_status(&boot, "good", 0x13);
    boot.expect_keel_unhurt();
}

#[test]
fn demo_completes_under_uefi() {
    let boot = shared_boot(&DEMO_UEFI);
    boot.expect_line("keel: firmware Uefi");
    boot.expect_keel_unhurt();
    boot.expect_no_line("keel: error");
}

/// Issue 8 item 9: a guest refused at boot kept its 200 MiB (and its EPT, VMCS, XSAVE and bitmap
/// pages), so the next guest found "no 64 MiB of RAM left".
#[test]
fn a_refused_guest_gives_its_memory_back() {
    let boot = shared_boot(&REFUSED);
    let refused = boot.expect_line("keel: error: guest toobig: not started:");
    if !refused.contains("refused on request (selftest = refuse)") {
        boot.fail(&format!("toobig refused for another reason: `{refused}`"));
    }
    boot.expect_no_line("guest after: not started");
    boot.expect_guest_line("after", "long64: hello from long mode");
    boot.expect_guest_line("after", "cmdline=mode=good ram=67108864");
    expect_guest_status(&boot, "after", 0x13);
    boot.expect_keel_status(COMPLETED);
    boot.expect_no_line("keel: fatal");
}
