//! `attack=stringio`: INS/OUTS whose memory operand the guest's own page tables forbid. Keel
//! emulates string I/O itself (it reads and writes guest memory through the guest's page tables),
//! so it must apply the checks the CPU would: a page-fault (#PF, vector 14) and no memory
//! changed, as on hardware (SDM Vol. 3A 4.6).
//!
//! 1. `REP INSB` into a read-only page with CR0.WP = 1 (the loader's 2 MiB page at guest-physical
//!    0 mapped a second time, read-only, at virtual 1 GiB): #PF, and the bytes under it unchanged.
//! 2. `OUTSB` from a linear address no page maps (virtual 512 GiB, PML4 entry 1): #PF.
//!
//! Prints `hostile64: stringio pf=3/3 ok`.

use super::Tally;
use core::arch::asm;
use hostile64::fault;

const PF: u8 = 14;
/// The loader's page directory for virtual 1-2 GiB; its first entry is free for this attack.
const WINDOW_PDE: u64 = 0x6000;
const WINDOW_VA: u64 = 0x4000_0000;
/// PDE: present, 2 MiB page, read-only (no RW bit).
const PDE_READ_ONLY: u64 = 0x1 | 0x80;
/// Guest-physical (and identity-mapped virtual) scratch bytes the INSB targets through the
/// read-only alias: where the loader puts multiboot information, unused by an ELF64 guest.
const TARGET: u64 = 0x9000;
const CR0_WP: u64 = 1 << 16;
/// PML4 entry 1 is not present in the loader's tables.
const UNMAPPED: u64 = 0x80_0000_0000;
const UNCLAIMED_PORT: u16 = 0x1234;

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("stringio", "pf");
    // SAFETY: TARGET lies in the loader's area below the image, unused by this guest; the
    // window PDE maps only the alias; INVLPG drops a stale translation; WP makes the read-only
    // mapping binding for CPL 0.
    unsafe {
        core::ptr::write_bytes(TARGET as *mut u8, 0x5a, 64);
        core::ptr::write_volatile(WINDOW_PDE as *mut u64, PDE_READ_ONLY);
        asm!("invlpg [{}]", in(reg) WINDOW_VA, options(nostack));
        asm!("mov {t}, cr0", "or {t}, {wp}", "mov cr0, {t}", t = out(reg) _, wp = in(reg) CR0_WP,
             options(nostack));
    }
    let f = fault!(
        "rep insb",
        in("dx") UNCLAIMED_PORT,
        inout("rdi") WINDOW_VA + TARGET => _,
        inout("rcx") 64u64 => _,
    );
    t.expect(format_args!("REP INSB into a read-only page"), f, Some(PF));
    // SAFETY: reads the 64 bytes written above through the identity map.
    let intact = unsafe { core::slice::from_raw_parts(TARGET as *const u8, 64) }
        .iter()
        .all(|&b| b == 0x5a);
    t.require(format_args!("memory under the read-only page"), intact);
    let f = fault!(
        "outsb",
        in("dx") UNCLAIMED_PORT,
        inout("rsi") UNMAPPED => _,
    );
    t.expect(format_args!("OUTSB from an unmapped page"), f, Some(PF));
    t.finish()
}
