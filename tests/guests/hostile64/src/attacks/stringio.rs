//! `attack=stringio`: INS/OUTS whose memory operand the guest's own page tables forbid. Keel
//! emulates string I/O itself (it reads and writes guest memory through the guest's page tables),
//! so it must apply the checks the CPU would: a page-fault (#PF, vector 14) and no memory
//! changed, as on hardware (SDM Vol. 3A 4.6).
//!
//! 1. `REP INSB` into a read-only page with CR0.WP = 1 (the loader's 2 MiB page at guest-physical
//!    0 mapped a second time, read-only, at virtual 1 GiB): #PF, and the bytes under it unchanged.
//! 2. `OUTSB` from a linear address no page maps (virtual 512 GiB, PML4 entry 1): #PF.
//! 3. Elements that straddle a page boundary, through a page table of its own at virtual
//!    1 GiB + 2 MiB: page 0 -> buffer page A, page 1 -> buffer page C (not B, the physically next
//!    page), page 2 not present. Each byte must go through its own page (SDM 4.7: the pages of
//!    one access are translated separately):
//!    - `REP INSW` x2 from port 0x80 (reads back the last byte written, 0xab; 0x81 reads 0xff)
//!      at the third-to-last byte of page 0: the second word's high byte lands on C, none on B;
//!    - `INSD` from an unclaimed port (0xffffffff) across the same boundary;
//!    - `REP INSW` x3 at the third-to-last byte of page 1: the first word lands, the second
//!      straddles into the missing page: #PF with error code 2 (a supervisor write to a page
//!      not present), CR2 = the first byte of page 2, nothing of the word written, RDI and RCX
//!      at the faulting element (SDM Vol. 2 REP: restartable).
//!
//! Prints `hostile64: stringio pf=13/13 ok`.

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
    straddling_elements(&mut t);
    t.finish()
}

const PAGE: usize = 4096;
/// The linear window of the straddle cases: PDE 1 of [`WINDOW_PDE`]'s directory.
const STRADDLE_VA: u64 = WINDOW_VA + 0x20_0000;
const SENTINEL: u8 = 0x5a;
const POST_CODE_PORT: u16 = 0x80;

#[repr(C, align(4096))]
struct Pages<const N: usize>([u8; N]);

/// The page table of the straddle window, and pages A, B, C and a guard page D after C.
static mut STRADDLE_PT: Pages<PAGE> = Pages([0; PAGE]);
static mut STRADDLE_BUF: Pages<{ 4 * PAGE }> = Pages([0; 4 * PAGE]);

fn buffer() -> *mut u8 {
    (&raw mut STRADDLE_BUF).cast::<u8>()
}

/// Buffer bytes `at..at + n` (A = 0, B = 4096, C = 8192, D = 12288).
fn bytes(at: usize, n: usize) -> &'static [u8] {
    // SAFETY: inside the static buffer; the string instructions that write it have completed.
    unsafe { core::slice::from_raw_parts(buffer().add(at), n) }
}

fn straddling_elements(t: &mut Tally) {
    const A: usize = 0;
    const C: usize = 2 * PAGE;
    const D: usize = 3 * PAGE;
    let pt = (&raw mut STRADDLE_PT).cast::<u64>();
    // SAFETY: the page table and buffer are this attack's statics (identity mapped: virtual =
    // guest-physical); PDE 1 of the window directory is unused; INVLPG drops stale entries.
    unsafe {
        buffer().write_bytes(SENTINEL, 4 * PAGE);
        pt.write_volatile(buffer() as u64 | 3);
        pt.add(1).write_volatile(buffer().add(C) as u64 | 3);
        pt.add(2).write_volatile(0);
        (WINDOW_PDE as *mut u64)
            .add(1)
            .write_volatile(pt as u64 | 3);
        for page in 0..3 {
            asm!("invlpg [{}]", in(reg) STRADDLE_VA + page * PAGE as u64, options(nostack));
        }
        asm!("out dx, al", in("dx") POST_CODE_PORT, in("al") 0xabu8, options(nostack));
    }
    // REP INSW x2 at A + 0xffd: words at 0xffd and 0xfff, the second straddling into C.
    let (rdi, rcx): (u64, u64);
    let f = fault!(
        "rep insw",
        in("dx") POST_CODE_PORT,
        inout("rdi") STRADDLE_VA + 0xffd => rdi,
        inout("rcx") 2u64 => rcx,
    );
    t.expect(format_args!("REP INSW across a page boundary"), f, None);
    t.require(
        format_args!(
            "bytes {:02x?} {:02x?} {:02x?} after REP INSW across A|C",
            bytes(A + 0xffd, 3),
            bytes(C, 2),
            bytes(PAGE, 1)
        ),
        bytes(A + 0xffd, 3) == [0xab, 0xff, 0xab]
            && bytes(C, 2) == [0xff, SENTINEL]
            && bytes(PAGE, 1) == [SENTINEL],
    );
    t.require(
        format_args!("RDI {rdi:#x} RCX {rcx} after REP INSW across A|C"),
        rdi == STRADDLE_VA + 0x1001 && rcx == 0,
    );
    // INSD from an unclaimed port at A + 0xffe: two bytes on A, two on C.
    // SAFETY: refills the buffer the previous case wrote.
    unsafe { buffer().write_bytes(SENTINEL, 4 * PAGE) };
    let f = fault!(
        "insd",
        in("dx") UNCLAIMED_PORT,
        inout("rdi") STRADDLE_VA + 0xffe => _,
    );
    t.expect(format_args!("INSD across a page boundary"), f, None);
    t.require(
        format_args!(
            "bytes {:02x?} {:02x?} {:02x?} after INSD across A|C",
            bytes(A + 0xffd, 3),
            bytes(C, 3),
            bytes(PAGE, 1)
        ),
        bytes(A + 0xffd, 3) == [SENTINEL, 0xff, 0xff]
            && bytes(C, 3) == [0xff, 0xff, SENTINEL]
            && bytes(PAGE, 1) == [SENTINEL],
    );
    // REP INSW x3 at C + 0xffd: the second word straddles into the missing page 2.
    // SAFETY: as above.
    unsafe { buffer().write_bytes(SENTINEL, 4 * PAGE) };
    let (rdi, rcx): (u64, u64);
    let f = fault!(
        "rep insw",
        in("dx") POST_CODE_PORT,
        inout("rdi") STRADDLE_VA + 0x1ffd => rdi,
        inout("rcx") 3u64 => rcx,
    );
    let cr2: u64;
    // SAFETY: reads CR2, which the #PF set.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    t.expect(format_args!("REP INSW into a missing page"), f, Some(PF));
    t.require(
        format_args!("#PF error code {:?} (a supervisor write, not present)", f),
        f.map(|f| (f.vector, f.error)) == Some((PF, 0b010)),
    );
    t.require(format_args!("CR2 {cr2:#x}"), cr2 == STRADDLE_VA + 0x2000);
    t.require(
        format_args!(
            "bytes {:02x?} {:02x?} after REP INSW into a missing page",
            bytes(C + 0xffd, 3),
            bytes(D, 1)
        ),
        bytes(C + 0xffd, 3) == [0xab, 0xff, SENTINEL] && bytes(D, 1) == [SENTINEL],
    );
    t.require(
        format_args!("RDI {rdi:#x} RCX {rcx} at the faulting element"),
        rdi == STRADDLE_VA + 0x1fff && rcx == 2,
    );
}
