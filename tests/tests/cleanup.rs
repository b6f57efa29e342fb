//! A run that hits its time limit: the emulator and its helpers are stopped, and nothing is left
//! behind (no processes, no X server lock files).

use keel_tests::{BootSpec, Emulator, Firmware};

use crate::NO_GUESTS;

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
