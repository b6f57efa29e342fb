//! Boots Keel in the emulators of this host and checks what it prints. Run with `cargo itest`
//! (or `scripts/test.sh`); a missing emulator fails these tests, it does not skip them.
//!
//! Each `BootSpec` boots once (see `keel_tests::shared_boot`); the tests that read the same boot
//! assert different lines of it, and different boots run in parallel.
//!
//! - `bringup`: Keel alone: VMXON in Bochs (BIOS and UEFI), "no VMX" in QEMU TCG.
//! - `guests`: the manifests of tests/guests: every guest kind, and misbehaving guests.
//! - `hostile`: attacking guests next to a witness (tests/guests/manifests/hostile.toml).
//! - `fuzz`: guests running random code next to a witness (tests/guests/manifests/fuzz.toml).
//! - `scheduler`: time sharing: fair shares, a sleeper's share, timer rates, a CLI spinner
//!   (tests/guests/manifests/sched.toml).
//! - `console`: a guest flooding its console next to a 100 Hz sleeper
//!   (tests/guests/manifests/flood.toml).
//! - `control`: Keel operated over its control channel (COM2) while it runs: list, pause with the
//!   clock stopped, resume, kill, restart, quit with status 0 (tests/guests/manifests/control.toml).
//! - `policy`: weights and caps changed over the control channel while guests run, and the load
//!   policy starting and pausing an on-demand guest (tests/guests/manifests/shares-live.toml,
//!   policy.toml).
//! - `platform`: the PC platform (ACPI, PM timer, PCI, fw_cfg, i8042) as platform32 reads it under
//!   Keel and under QEMU (tests/guests/manifests/platform.toml).
//! - `cleanup`: a time limit stops the emulator and leaves nothing behind.
//! - `smp`: Keel starting the other CPUs of a 4-CPU machine, and leaving out one whose VT-x
//!   set-up fails (tests/guests/manifests/smp-fail.toml).
//! - `linux`: Debian's kernel and a busybox initramfs (fetched with apt at test time) to a shell,
//!   driven over the serial console, next to two of Keel's guests.
//! - `qemu_kernels`: test kernels written for QEMU's -kernel print the same and end the same
//!   under Keel as under QEMU (tests/guests/manifests/qemu-kernels.toml).
//! - `migrate`: a counting guest live-migrated between two Keels, counting on at B with no gap;
//!   a migration whose target goes away leaves it running at A
//!   (tests/guests/manifests/migrate-a.toml, migrate-b.toml).
//! - `snapshot`: a counting guest snapshotted to a file, killed and restored from it, counting on
//!   with no gap; damaged and mismatched snapshots refused (tests/guests/manifests/snapshot.toml).
//! - `walkthrough`: the commands of docs/GUESTS.md's walk-through, run as they stand.

mod balloon;
mod bringup;
mod bulk;
mod cleanup;
mod console;
mod control;
mod fuzz;
mod guests;
mod hostile;
mod linux;
mod migrate;
mod platform;
mod policy;
mod qemu_kernels;
mod scheduler;
mod smp;
mod snapshot;
mod walkthrough;

use keel_tests::Manifest;

/// No guests: these boots check Keel's own bring-up. Keel turns VMX on before it looks at the
/// manifest, then stops because there is nothing to run.
pub const NO_GUESTS: Manifest = Manifest::Inline {
    name: "no-guests",
    text: "# Keel alone: bring-up checks, no guests.\n[keel]\nquantum_ms = 10\n",
};
