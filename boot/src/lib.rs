//! keel-boot: the host side of Keel.
//!
//! - [`image`]: builds the kernel and the guests, packs the ramdisk archive (manifest + files)
//!   and writes BIOS and UEFI disk images with the `bootloader` crate.
//! - [`emulator`]: boots an image in Bochs, QEMU (TCG) or QEMU with KVM, follows COM1 and port
//!   0xE9, and reports Keel's exit status ([`emulator::run`] returns a [`RunResult`]).
//! - [`debian`]: fetches Debian's cloud kernel and busybox-static with apt and builds the
//!   initramfs around busybox (the Linux test, the demo and `bench --linux` boot these).
//! - [`linux`]: turns a Linux bzImage or vmlinux into the kernel image Keel loads (`kind = linux`).
//! - [`control`]: the control channel's socket (joined to the emulator's COM2) and its client,
//!   `cargo keel ctl`.
//! - [`flash`]: writes an image to a USB stick after checking it is the right kind of device.
//! - [`bench`]: `cargo keel bench`, the exit-path benchmark (docs/BENCHMARKS.md).
//! - [`tools`]: which host programs and firmware files each run needs, and their Debian packages.
//!
//! The integration tests (crate `keel-tests`) drive the same functions as the command line.
//! docs/BOOTING.md is the user's guide.

pub mod bench;
pub mod bochs;
pub mod bulk;
pub mod cli;
pub mod console;
pub mod control;
pub mod debian;
pub mod emulator;
pub mod flash;
pub mod image;
pub mod linux;
pub mod manifest_file;
pub mod migrate;
pub mod pty;
pub mod qemu;
pub mod terminal;
pub mod tools;

pub use emulator::{best_emulator, run, Emulator, Firmware, RunOptions, RunResult};
pub use image::{build_images, workspace_root, ImageOptions, Images};
