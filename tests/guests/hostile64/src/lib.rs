//! What the hostile, witness and fuzz guests share (docs/SECURITY.md describes them); `catch`,
//! `sse` and `entry!` are for the 64-bit guests only, the rest also builds for fuzz32:
//! - [`entry!`]: the `_start` of an ELF64 guest, with its own stack;
//! - [`args`]: `key=value` words of the command line;
//! - [`fuzz`]: the seed plan, stream filters and outcome counts of the fuzzers;
//! - [`catch`]: resuming after a fault an attack provokes on purpose, with the vector recorded;
//! - [`rng`]: a small deterministic PRNG, so every run and every seed can be replayed;
//! - [`sse`]: XMM registers as state that must survive guest switches;
//! - [`text`]: formatting into a fixed buffer.
#![no_std]

pub mod args;
#[cfg(target_arch = "x86_64")]
pub mod catch;
pub mod fuzz;
pub mod rng;
#[cfg(target_arch = "x86_64")]
pub mod sse;
pub mod text;

/// Exit code of an attack or witness that saw what it should: status (0x30 << 1) | 1 = 0x61.
pub const EXIT_OK: u8 = 0x30;

/// Defines `_start` for an ELF64 guest linked by `link.rs`: switches to a 64 KiB stack of its own
/// in .bss (Keel's ELF loader passes one at the top of RAM, but the guests do not rely on it) and
/// calls `$main(cmdline: *const u8, ram_size: u64) -> !` (RDI and RSI as the loader set them).
#[cfg(target_arch = "x86_64")]
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        core::arch::global_asm!(
            r#"
            .pushsection .bss.stack, "aw", @nobits
            .balign 16
        guest_stack:
            .skip 0x10000
        guest_stack_top:
            .popsection

            .pushsection .text.start, "ax"
            .globl _start
        _start:
            lea rsp, [rip + guest_stack_top]
            call {main}
            ud2
            .popsection
            "#,
            main = sym $main,
        );
    };
}
