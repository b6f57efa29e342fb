//! witness64: the guest that must not notice the attacks running next to it.
//!
//! It fills 64 KiB with a PRNG stream, then runs `rounds=N` (default 48) rounds of a simple
//! hash that reads and rewrites every word, and prints
//!
//! ```text
//! witness: round <r>/<N>            every 8 rounds
//! witness: checksum=<hex> ok        then exits with 0x30
//! ```
//!
//! The checksum depends on every word and every round, so a write into its RAM by anyone else
//! changes it; tests/tests/hostile.rs recomputes it on the host. The witness runs with interrupts
//! enabled but programs no interrupt source: an interrupt that reaches it (another guest's IPI or
//! timer leaking in) is counted, and `ok` becomes `BAD stray interrupts pit=.. lapic=..`. With
//! `xmm=1` it also loads a pattern into XMM0-XMM15 and checks after every round that the registers
//! still hold it (`witness: xmm intact`, or `witness: xmm<n> clobbered: <hex>` and `BAD xmm`): no
//! other guest may see or change its SSE state.
#![no_std]
#![no_main]

use core::sync::atomic::Ordering;
use guest_common::trap::{LAPIC_TICKS, PIT_TICKS};
use guest_common::{checks, cpu, say, EXIT_FAILURE};
use hostile64::rng::Rng;
use hostile64::{args, sse, EXIT_OK};

hostile64::entry!(witness_main);

/// 64 KiB of u64 words.
const WORDS: usize = 8192;
const SEED: u64 = 0x5749_544e_4553_5321;
const DEFAULT_ROUNDS: u64 = 48;
const PROGRESS_EVERY: u64 = 8;
/// The 64-bit FNV prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The buffer the rounds rewrite; only this CPU touches it.
struct Buffer(core::cell::UnsafeCell<[u64; WORDS]>);
// SAFETY: single CPU, no interrupt handler touches it.
unsafe impl Sync for Buffer {}
static BUF: Buffer = Buffer(core::cell::UnsafeCell::new([0; WORDS]));

extern "C" fn witness_main(cmdline: *const u8, ram_size: u64) -> ! {
    checks::init("witness");
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at RDI.
    let cmdline = unsafe { checks::elf_entry_line(cmdline, ram_size) };
    let rounds = args::number(cmdline, b"rounds", DEFAULT_ROUNDS);
    let check_xmm = args::number(cmdline, b"xmm", 0) != 0;
    // SAFETY: the only reference to the buffer for the rest of the run.
    let buf = unsafe { &mut *BUF.0.get() };
    let mut rng = Rng::new(SEED);
    buf.iter_mut().for_each(|w| *w = rng.next_u64());
    let pattern = xmm_pattern();
    if check_xmm {
        sse::enable();
        sse::load(&pattern);
    }
    let mut xmm_bad = false;
    cpu::enable_interrupts();
    let mut h = 0u64;
    for r in 0..rounds {
        for w in buf.iter_mut() {
            h = (h ^ *w)
                .wrapping_mul(FNV_PRIME)
                .rotate_left(29)
                .wrapping_add(r);
            *w = w.rotate_left(7) ^ h;
        }
        if check_xmm && !xmm_bad {
            if let Some((reg, value)) = sse::first_difference(&pattern) {
                say!("xmm{} clobbered: {:#034x}", reg, value);
                xmm_bad = true;
            }
        }
        if (r + 1) % PROGRESS_EVERY == 0 {
            say!("round {}/{}", r + 1, rounds);
        }
    }
    cpu::disable_interrupts();
    let checksum = buf.iter().fold(h, |c, &w| c.rotate_left(1) ^ w);
    let (pit, lapic) = (
        PIT_TICKS.load(Ordering::SeqCst),
        LAPIC_TICKS.load(Ordering::SeqCst),
    );
    if check_xmm && !xmm_bad {
        say!("xmm intact");
    }
    if pit != 0 || lapic != 0 {
        say!(
            "checksum={:#018x} BAD stray interrupts pit={} lapic={}",
            checksum,
            pit,
            lapic
        );
        cpu::exit(EXIT_FAILURE)
    } else if xmm_bad {
        say!("checksum={:#018x} BAD xmm", checksum);
        cpu::exit(EXIT_FAILURE)
    }
    say!("checksum={:#018x} ok", checksum);
    cpu::exit(EXIT_OK)
}

/// What the witness keeps in XMMn: recognisable ("WITN") in another guest's registers.
fn xmm_pattern() -> sse::Registers {
    let mut r = [[0u64; 2]; 16];
    for (n, v) in r.iter_mut().enumerate() {
        *v = [
            0x5749_544e_0000_0000 | n as u64,
            0x5749_544e_786d_6d00 | n as u64,
        ];
    }
    r
}
