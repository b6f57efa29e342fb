//! Random code cannot hurt Keel: boots tests/guests/manifests/fuzz.toml in Bochs (fuzz64 and
//! fuzz32, each in user and in kernel mode, next to the witness: tests/guests/fuzz and fuzz32)
//! and checks that Keel stays up
//! and ends, that every fuzzer ran its seeds (restarted by Keel whenever it died), that each
//! death has a reason a guest can cause, and that the witness computed the right checksum.
//!
//! A failing seed is replayed with a manifest whose fuzzer has `cmdline = seed=<n> seeds=1`
//! (docs/SECURITY.md).

use crate::hostile::{expect_keel_unhurt, witness_checksum, WITNESS_ROUNDS};
use keel_tests::{shared_boot, BootSpec, Emulator, Firmware, Manifest, Outcome};
use std::collections::BTreeSet;
use std::time::Duration;

static FUZZ: BootSpec = BootSpec {
    name: "bochs-fuzz",
    manifest: Manifest::File("tests/guests/manifests/fuzz.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: Some(Duration::from_secs(240)),
};

/// The fuzzers of fuzz.toml: name, `restart =`.
const FUZZERS: [(&str, usize); 4] = [
    ("fuzz-user", 40),
    ("fuzz-kernel", 100),
    ("fuzz32-user", 40),
    ("fuzz32-kernel", 100),
];

/// The least number of seeds each fuzzer must have started.
const MIN_SEEDS: usize = 200;

/// Why Keel may stop a guest that runs random code: what the guest did, not a fault of Keel.
/// (String I/O at an unmapped linear address once killed the guest; since d6eb68f it raises
/// #PF in the guest (docs/SECURITY.md, finding 3), so that death is no longer accepted.)
const GUEST_CAUSED: [&str; 4] = [
    "triple fault",
    "which is neither RAM nor a device",
    "HLT with interrupts disabled",
    "by an instruction Keel does not emulate",
];

/// The seed numbers guest `name` announced (`fuzz64: seed <n> <mode>`, `fuzz32: seed ...`).
fn seeds(boot: &Outcome, name: &str) -> BTreeSet<u64> {
    boot.guest_lines(name)
        .filter_map(|l| {
            l.strip_prefix("fuzz64: seed ")
                .or_else(|| l.strip_prefix("fuzz32: seed "))
        })
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn keel_survives_random_code() {
    expect_keel_unhurt(&shared_boot(&FUZZ));
}

#[test]
fn the_witness_keeps_running_next_to_the_fuzzers() {
    let boot = shared_boot(&FUZZ);
    let want = witness_checksum(WITNESS_ROUNDS);
    boot.expect_guest_line("witness", &format!("witness: checksum={want:#018x} ok"));
}

/// How many times Keel restarted guest `name` (its `keel: guest <id> <name>: ... (restart k)` lines).
fn restarts(boot: &Outcome, name: &str) -> usize {
    let mid = format!(" {name}: ");
    boot.lines()
        .filter(|l| l.starts_with("keel: guest ") && l.contains(&mid) && l.contains("(restart "))
        .count()
}

#[test]
fn every_fuzzer_runs_its_seeds_and_ends() {
    let boot = shared_boot(&FUZZ);
    for (name, limit) in FUZZERS {
        let n = seeds(&boot, name).len();
        if n < MIN_SEEDS {
            boot.fail(&format!("{name} started {n} seeds, fewer than {MIN_SEEDS}"));
        }
        // A life that runs all its seeds ends the fuzzer; one whose every life died (kernel-mode
        // streams kill their guest often) ends when Keel has restarted it `limit` times.
        let done = boot.find_line(&format!("keel: guest {name} ended: debug-exit status 0x61"));
        if done.is_none() && restarts(&boot, name) != limit {
            boot.fail(&format!(
                "{name} neither ended nor used up its {limit} restarts"
            ));
        }
    }
}

#[test]
fn a_fuzzer_that_dies_is_restarted_and_dies_only_of_its_own_doing() {
    let boot = shared_boot(&FUZZ);
    for (name, limit) in FUZZERS {
        let stopped = format!("keel: error: guest {name} stopped: ");
        let deaths: Vec<&str> = boot
            .lines()
            .filter_map(|l| l.strip_prefix(stopped.as_str()))
            .collect();
        for why in &deaths {
            if !GUEST_CAUSED.iter().any(|r| why.contains(r)) {
                boot.fail(&format!(
                    "{name} stopped for a reason a guest cannot cause: {why}"
                ));
            }
        }
        let restarts = restarts(&boot, name);
        if restarts != deaths.len().min(limit) {
            boot.fail(&format!(
                "{name} died {} times and was restarted {restarts} times (limit {limit})",
                deaths.len()
            ));
        }
    }
}
