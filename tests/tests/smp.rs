//! Keel on a machine with several CPUs: it finds them in the firmware's MADT, starts each with
//! INIT-SIPI-SIPI, turns VMX on there and reports one line per CPU; a CPU whose VT-x set-up fails
//! (on purpose: `[keel] fail_vmx_on_cpu = 2`) is left out and everything else carries on.

use keel_tests::{shared_boot_on, status, BootSpec, Emulator, Firmware, Manifest, Outcome};

use crate::scheduler::Table;
use crate::NO_GUESTS;

/// Bochs `cpu: count=4`: the boot CPU and three APs, APIC IDs 0-3.
const CPUS: u32 = 4;

static FOUR_CPUS: BootSpec = BootSpec {
    name: "bochs-bios-4cpus",
    manifest: NO_GUESTS,
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

static FOUR_CPUS_UEFI: BootSpec = BootSpec {
    name: "bochs-uefi-4cpus",
    manifest: NO_GUESTS,
    emulator: Emulator::Bochs,
    firmware: Firmware::Uefi,
    timeout: None,
};

static CPU2_FAILS: BootSpec = BootSpec {
    name: "bochs-bios-4cpus-cpu2-fails",
    manifest: Manifest::File("tests/guests/manifests/smp-fail.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

/// Bochs' VMCS revision identifier (IA32_VMX_BASIC[30:0]) for its VMX emulation.
const BOCHS_VMCS_REVISION: &str = "0x2b";

fn vmx_on(cpu: u32) -> String {
    format!("keel: cpu {cpu} (APIC {cpu}): VMX on, revision {BOCHS_VMCS_REVISION}")
}

/// The MADT line, one line per AP in APIC order, then the count: all after the boot CPU's VMXON.
#[track_caller]
fn expect_all_cpus_up(boot: &Outcome) {
    let mut lines = vec![
        "keel: VMXON ok".to_string(),
        "keel: host CPUs: 4 in the MADT; boot cpu 0 (APIC 0), starting 3 more".to_string(),
    ];
    lines.extend((1..CPUS).map(vmx_on));
    lines.push("keel: 4 of 4 CPUs up with VMX on, in ".to_string());
    let needles: Vec<&str> = lines.iter().map(String::as_str).collect();
    boot.expect_in_order(&needles);
    for cpu in 1..CPUS {
        let line = boot.expect_line(&format!("keel: cpu {cpu} (APIC {cpu}): "));
        if line != vmx_on(cpu) {
            boot.fail(&format!("cpu {cpu}: `{line}`"));
        }
    }
    expect_woken(boot, "keel: 4 of 4 CPUs up with VMX on, in ", 3);
    boot.expect_no_line("keel: warn: ");
}

/// The summary line starts with `prefix` and says that all `aps` APs woke to a kick IPI.
#[track_caller]
fn expect_woken(boot: &Outcome, prefix: &str, aps: u32) {
    let line = boot.expect_line(prefix);
    let woke = format!(" ms; {aps} of {aps} APs woke to a kick IPI");
    if !line.ends_with(&woke) {
        boot.fail(&format!("`{line}` does not end with `{woke}`"));
    }
}

#[test]
fn bochs_bios_starts_three_aps_with_vmx() {
    let boot = shared_boot_on(&FOUR_CPUS, Some(CPUS));
    expect_all_cpus_up(&boot);
    // Nothing to run afterwards: the manifest has no guests.
    boot.expect_line("keel: fatal: no guest could be started");
    boot.expect_keel_status(status::NO_GUESTS);
}

/// OVMF under Bochs installs no ACPI tables (it builds them from QEMU's fw_cfg, which Bochs does
/// not have), so the bootloader hands over no RSDP: Keel finds the APs by broadcast INIT-SIPI-SIPI.
/// They number themselves in the order they arrive, so each APIC ID 1-3 must be up under some
/// number 1-3, each number once.
#[test]
fn bochs_uefi_without_acpi_finds_the_aps_by_broadcast() {
    let boot = shared_boot_on(&FOUR_CPUS_UEFI, Some(CPUS));
    boot.expect_in_order(&[
        "keel: firmware Uefi",
        "keel: VMXON ok",
        "keel: warn: host CPUs: the bootloader found no ACPI RSDP; finding the others by broadcast INIT-SIPI-SIPI",
        "keel: host CPUs: 3 APs answered the broadcast",
        "keel: 4 of 4 CPUs up with VMX on, in ",
        "keel: fatal: no guest could be started",
    ]);
    let mut numbers = Vec::new();
    for apic in 1..CPUS {
        let suffix = format!(" (APIC {apic}): VMX on, revision {BOCHS_VMCS_REVISION}");
        let Some(line) = boot
            .lines()
            .find(|l| l.starts_with("keel: cpu ") && l.ends_with(&suffix))
        else {
            boot.fail(&format!("no `keel: cpu N{suffix}` line"));
        };
        numbers.push(line["keel: cpu ".len()..line.len() - suffix.len()].to_string());
    }
    numbers.sort();
    if numbers != ["1", "2", "3"] {
        boot.fail(&format!("the APs were numbered {numbers:?}"));
    }
    expect_woken(&boot, "keel: 4 of 4 CPUs up with VMX on, in ", 3);
    boot.expect_keel_status(status::NO_GUESTS);
}

/// The guests of smp-fail.toml (kinds.toml's) and the code each writes to port 0xf4.
const GUESTS: [(&str, u32); 4] = [
    ("real16", 0x10),
    ("pm32", 0x11),
    ("mb32", 0x12),
    ("long64", 0x13),
];

#[test]
fn a_cpu_whose_vmx_setup_fails_is_left_out_and_the_guests_run() {
    let boot = shared_boot_on(&CPU2_FAILS, Some(CPUS));
    boot.expect_in_order(&[
        "keel: host CPUs: 4 in the MADT; boot cpu 0 (APIC 0), starting 3 more",
        &vmx_on(1),
        "keel: warn: cpu 2 (APIC 2): VT-x setup failed: simulated by the manifest (fail_vmx_on_cpu = 2)",
        &vmx_on(3),
        "keel: 3 of 4 CPUs up with VMX on, in ",
        "keel: running 4 guests",
    ]);
    boot.expect_no_line("keel: cpu 2 (APIC 2): VMX on");
    expect_woken(&boot, "keel: 3 of 4 CPUs up with VMX on, in ", 2);
    // The three CPUs up ran the guests, the one that failed none.
    boot.expect_line("keel: the run loop runs on 3 CPUs");
    let used: u32 = GUESTS
        .iter()
        .map(|(g, _)| host_cpus_used(&boot, g))
        .max()
        .unwrap_or(0);
    if used < 2 {
        boot.fail("every guest ran on one CPU");
    }
    for (guest, code) in GUESTS {
        let ended = format!("keel: guest {guest} ");
        let status = format!("status {:#x}", (code << 1) | 1);
        if !boot
            .lines()
            .any(|l| l.starts_with(&ended) && l.contains(&status))
        {
            boot.fail(&format!("no `{ended}... {status}` line"));
        }
    }
    boot.expect_keel_unhurt();
}

static SMP_GUESTS: BootSpec = BootSpec {
    name: "bochs-bios-4cpus-smp-guests",
    manifest: Manifest::File("tests/guests/manifests/smp-guests.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

/// Guests with 1, 2 and 4 vCPUs (7 in all, more than the machine's 4 CPUs): every vCPU of each
/// starts (the others through their bootstrap processor's INIT and SIPI), reports with its own
/// APIC ID, takes the IPI of the one before it, and the counter all of them incremented with
/// LOCK XADD comes out exact.
#[test]
fn guests_with_1_2_and_4_vcpus_start_count_and_send_each_other_ipis() {
    let boot = shared_boot_on(&SMP_GUESTS, Some(CPUS));
    for (guest, n) in [("smp1", 1u32), ("smp2", 2), ("smp4", 4)] {
        boot.expect_guest_line(guest, &format!("smp32: {n} vCPUs"));
        for id in 0..n {
            boot.expect_guest_line(guest, &format!("smp32: cpu {id} of {n} up"));
            let from = (id + n - 1) % n;
            boot.expect_guest_line(
                guest,
                &format!("smp32: cpu {id} counted 200000 and took the IPI of cpu {from}"),
            );
        }
        boot.expect_guest_line(
            guest,
            &format!("smp32: counter {} = {n} x 200000", n * 200_000),
        );
        if boot.guest_lines(guest).any(|l| l.contains("FAILED")) {
            boot.fail(&format!("guest {guest} reported a failure"));
        }
        let prefix = format!("keel: guest {guest} ");
        if !boot
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("status 0x43"))
        {
            boot.fail(&format!("no `{prefix}... status 0x43` line"));
        }
        // The APs ran vCPUs: a guest with several vCPUs had them on several CPUs.
        if n > 1 && host_cpus_used(&boot, guest) < 2 {
            boot.fail(&format!("guest {guest}'s {n} vCPUs all ran on one CPU"));
        }
    }
    boot.expect_keel_unhurt();
}

/// How many host CPUs guest `guest`'s vCPUs ran on, from Keel's closing line
/// `keel: guest NAME: its vCPUs ran on N host CPUs: ...`.
#[track_caller]
fn host_cpus_used(boot: &Outcome, guest: &str) -> u32 {
    let prefix = format!("keel: guest {guest}: its vCPUs ran on ");
    let line = boot.expect_line(&prefix);
    line[prefix.len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| boot.fail(&format!("cannot read `{line}`")))
}

static SMP_FAIR: BootSpec = BootSpec {
    name: "bochs-bios-4cpus-smp-fair",
    manifest: Manifest::File("tests/guests/manifests/smp-fair.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

/// The guests of smp-fair.toml and their vCPUs: 7 CPU-bound vCPUs in all.
const FAIR_GUESTS: [(&str, u32); 3] = [("smp1", 1), ("smp2", 2), ("smp4", 4)];
/// What the timekeeper prints right before its PRINT_STATS, at 3 s.
const FAIR_SNAPSHOT: &str = "[timekeeper] demo: 3 s";

/// Guests with 1, 2 and 4 CPU-bound vCPUs: every vCPU gets 1/7 of the CPU, within 2%. Keel's
/// table at the timekeeper's snapshot (all seven vCPUs computing) gives each guest's CPU time;
/// each guest's own vCPUs report, from Keel's per-vCPU account (hypercall CPU_TIME), how that
/// time split among them over their common spin. A vCPU's share is the product of the two.
#[test]
fn cpu_bound_vcpus_of_guests_with_1_2_and_4_vcpus_get_equal_shares() {
    let boot = shared_boot_on(&SMP_FAIR, Some(CPUS));
    let lines: Vec<&str> = boot.lines().collect();
    let Some(snapshot) = Table::parse(&lines, FAIR_SNAPSHOT) else {
        boot.fail(&format!("no accounting table after `{FAIR_SNAPSHOT}`"));
    };
    let guest_cpu = |guest: &str| {
        snapshot
            .cpu(guest)
            .unwrap_or_else(|| boot.fail(&format!("no cpu cycles for {guest} in the snapshot")))
    };
    let total: u64 = FAIR_GUESTS.iter().map(|(g, _)| guest_cpu(g)).sum();
    let vcpus: u32 = FAIR_GUESTS.iter().map(|(_, n)| n).sum();
    let fair = 1.0 / f64::from(vcpus);
    let mut shares = Vec::new();
    for (guest, n) in FAIR_GUESTS {
        let spun: Vec<u64> = (0..n)
            .map(|id| {
                let prefix = format!("smp32: spin: cpu {id} ran ");
                let line = boot.expect_guest_line(guest, &prefix);
                line[line.find(&prefix).unwrap_or(0) + prefix.len()..]
                    .trim_end_matches(" cycles")
                    .parse()
                    .unwrap_or_else(|_| boot.fail(&format!("{guest}: cannot read `{line}`")))
            })
            .collect();
        let guest_spun: u64 = spun.iter().sum::<u64>().max(1);
        let guest_share = guest_cpu(guest) as f64 / total.max(1) as f64;
        for (id, cycles) in spun.iter().enumerate() {
            let share = guest_share * *cycles as f64 / guest_spun as f64;
            eprintln!(
                "figure: {guest} vCPU {id}: {cycles} cycles of its guest's {guest_spun} over the spin; \
                 {:.3}% of the CPU, {:+.2}% from 1/{vcpus}",
                100.0 * share,
                100.0 * (share / fair - 1.0)
            );
            shares.push((format!("{guest} vCPU {id}"), share));
        }
        let prefix = format!("keel: guest {guest} ");
        if !boot
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("status 0x43"))
        {
            boot.fail(&format!("no `{prefix}... status 0x43` line"));
        }
    }
    let off: Vec<String> = shares
        .iter()
        .filter(|(_, share)| (share / fair - 1.0).abs() > 0.02)
        .map(|(who, share)| format!("{who}: {:.3}%", 100.0 * share))
        .collect();
    if !off.is_empty() {
        boot.fail(&format!(
            "vCPUs more than 2% from their fair share {:.3}%: {}",
            100.0 * fair,
            off.join(", ")
        ));
    }
    boot.expect_keel_unhurt();
}

static SMP_PINGPONG: BootSpec = BootSpec {
    name: "bochs-bios-4cpus-smp-pingpong",
    manifest: Manifest::File("tests/guests/manifests/smp-pingpong.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: None,
};

/// The `(count, average)` of one cell of Keel's `keel: WHAT: same CPU N x avg C cycles, ...`.
#[track_caller]
fn figure_cell(boot: &Outcome, line: &str, cell: &str) -> (u64, u64) {
    let Some(at) = line.find(cell) else {
        boot.fail(&format!("`{line}` has no `{cell}`"));
    };
    let mut words = line[at + cell.len()..].split_whitespace();
    let n = words.next().and_then(|w| w.parse().ok());
    let avg = words.nth(2).and_then(|w| w.parse().ok());
    match (n, avg) {
        (Some(n), Some(avg)) => (n, avg),
        _ => boot.fail(&format!("cannot read `{cell}` in `{line}`")),
    }
}

/// Two guests ping-pong 200 IPIs between their two vCPUs, one pinned to CPU 0 and one free:
/// every IPI arrives (both end with 0x43), the pinned one's on its CPU and the free one's across
/// CPUs, and Keel's times for both are printed as figures (docs/BENCHMARKS.md).
#[test]
fn ipis_between_vcpus_arrive_on_one_cpu_and_across_cpus() {
    let boot = shared_boot_on(&SMP_PINGPONG, Some(CPUS));
    for guest in ["pp-one", "pp-many"] {
        boot.expect_guest_line(guest, "smp32: pingpong: 200 round trips");
        let prefix = format!("keel: guest {guest} ");
        if !boot
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains("status 0x43"))
        {
            boot.fail(&format!("no `{prefix}... status 0x43` line"));
        }
    }
    if host_cpus_used(&boot, "pp-one") != 1 {
        boot.fail("pp-one, pinned to CPU 0, ran elsewhere");
    }
    let ipi = boot.expect_line("keel: IPI delivery: ").to_string();
    let switch = boot.expect_line("keel: guest switch: ").to_string();
    let (same, same_avg) = figure_cell(&boot, &ipi, "same CPU ");
    let (cross, cross_avg) = figure_cell(&boot, &ipi, "across CPUs ");
    eprintln!("figure: IPI delivery on one CPU: {same} IPIs, avg {same_avg} cycles");
    eprintln!("figure: IPI delivery across CPUs: {cross} IPIs, avg {cross_avg} cycles");
    let (n, avg) = figure_cell(&boot, &switch, "same CPU ");
    eprintln!("figure: guest switch on one CPU: {n} switches, avg {avg} cycles");
    let (n, avg) = figure_cell(&boot, &switch, "moved from another CPU ");
    eprintln!("figure: guest switch to a vCPU from another CPU: {n} switches, avg {avg} cycles");
    // pp-one's 400 IPIs stay on CPU 0; pp-many's go across CPUs (or to the sender's CPU when
    // none sleeps).
    if same < 400 || cross == 0 {
        boot.fail(&format!("{same} IPIs on one CPU, {cross} across CPUs"));
    }
    boot.expect_keel_unhurt();
}
