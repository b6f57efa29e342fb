//! What a multiboot kernel that builds its own page tables does, in the order Keel must get right
//! (issue 8, items 0 and 5): turn on PAE and paging with writes that do not exit, then write CR0
//! with a bit Keel owns (NE) changed, which exits and is checked against the live CR0/CR4.
//!
//! 1. PAE paging: CR4.PAE (no exit), CR3 = a PDPT, then CR0 = PG|PE with NE cleared in the same
//!    write. Keel emulates it and must load the four PDPTEs from CR3 (SDM 4.4.1): if it does not,
//!    the next fetch page-faults with no handler and the guest dies.
//! 2. IA-32e mode: EFER.LME, a PML4, CR0.PG (no exit) into compatibility mode; then CR0 =
//!    PG|WP|PE (NE cleared): no #GP "long mode without PAE", NE reads back clear, LMA set; CLTS
//!    and LMSW keep paging on. Then back out to protected mode without paging.
//!
//! Prints `own paging ok cr0=<as read in IA-32e mode> efer=<EFER there>` or `own paging BAD ...`.

use core::arch::asm;
use guest_common::{cpu, say};

const CR0_PE: u32 = 1 << 0;
const CR0_MP: u32 = 1 << 1;
const CR0_TS: u32 = 1 << 3;
const CR0_ET: u32 = 1 << 4;
const CR0_NE: u32 = 1 << 5;
const CR0_WP: u32 = 1 << 16;
const CR0_PG: u32 = 1 << 31;
const CR4_PAE: u32 = 1 << 5;
const EFER: u32 = 0xc000_0080;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry bits: present, writable, 2 MiB page.
const P: u64 = 1;
const RW: u64 = 2;
const PS: u64 = 1 << 7;

#[repr(C, align(4096))]
struct Tables {
    /// Four page directories of 2 MiB pages: an identity map of the low 4 GiB.
    pd: [[u64; 512]; 4],
    /// IA-32e: PML4 and its PDPT (RW allowed).
    pml4: [u64; 512],
    pdpt_long: [u64; 512],
    /// PAE: the four PDPTEs (bits 2:1 reserved, so P only).
    pdpt_pae: [u64; 4],
}

static mut TABLES: Tables = Tables {
    pd: [[0; 512]; 4],
    pml4: [0; 512],
    pdpt_long: [0; 512],
    pdpt_pae: [0; 4],
};

fn read_cr0() -> u32 {
    let v: u32;
    // SAFETY: reading CR0 has no side effect.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// # Safety
/// The new value must keep the code and data in use mapped.
unsafe fn write_cr0(v: u32) {
    // SAFETY: the caller keeps what runs mapped.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: EFER exists on every CPU these guests run on.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only EFER.LME is changed, with paging off.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nomem, nostack))
    };
}

pub fn run() {
    cpu::disable_interrupts();
    // SAFETY: the guest runs alone on its CPU with interrupts off; nothing else uses TABLES.
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    for (i, pd) in t.pd.iter_mut().enumerate() {
        for (j, e) in pd.iter_mut().enumerate() {
            *e = ((i as u64) << 30 | (j as u64) << 21) | P | RW | PS;
        }
        t.pdpt_pae[i] = pd.as_ptr() as u64 | P;
        t.pdpt_long[i] = pd.as_ptr() as u64 | P | RW;
    }
    t.pml4[0] = t.pdpt_long.as_ptr() as u64 | P | RW;
    let (pdpt_pae, pml4) = (t.pdpt_pae.as_ptr() as u32, t.pml4.as_ptr() as u32);
    // Protected mode without paging, NE on: so that clearing NE below changes a bit Keel owns.
    let base = (read_cr0() & !(CR0_PG | CR0_TS)) | CR0_NE;
    // SAFETY: paging stays off.
    unsafe { write_cr0(base) };

    // 1. PAE paging, entered by an emulated CR0 write.
    // SAFETY: the PDPT maps the low 4 GiB one to one, this code and its stack included.
    unsafe {
        asm!("mov cr3, {}", "mov {t}, cr4", "or {t}, {pae}", "mov cr4, {t}",
             in(reg) pdpt_pae, t = out(reg) _, pae = const CR4_PAE, options(nostack));
        write_cr0((base | CR0_PG) & !CR0_NE);
    }
    let pae_cr0 = read_cr0();
    // Back to no paging and NE on (the last write exits: NE is Keel's).
    // SAFETY: turning paging off in identity-mapped code.
    unsafe {
        write_cr0(base & !CR0_NE);
        write_cr0(base);
    }

    // 2. IA-32e mode: LME, then PG with nothing Keel owns changed (no exit).
    wrmsr(EFER, rdmsr(EFER) | EFER_LME);
    // SAFETY: the PML4 maps the low 4 GiB one to one; CS stays a 32-bit segment
    // (compatibility mode).
    unsafe {
        asm!("mov cr3, {}", in(reg) pml4, options(nostack));
        write_cr0(base | CR0_PG);
        write_cr0(CR0_PG | CR0_WP | CR0_PE);
    }
    let long_cr0 = read_cr0();
    let long_efer = rdmsr(EFER);
    // SAFETY: CLTS and LMSW leave PG and PE alone.
    unsafe {
        asm!("clts", options(nomem, nostack));
        asm!("lmsw {0:x}", in(reg) (CR0_PE | CR0_MP) as u16, options(nomem, nostack));
    }
    let after_lmsw = read_cr0();
    // Leave IA-32e mode from compatibility mode: paging off (exits: NE back on), LME off.
    // SAFETY: identity-mapped code; CS is not a 64-bit segment.
    unsafe { write_cr0(base) };
    wrmsr(EFER, rdmsr(EFER) & !EFER_LME);
    let out_efer = rdmsr(EFER);
    let ok = pae_cr0 == (base | CR0_PG) & !CR0_NE
        && long_cr0 == CR0_PG | CR0_WP | CR0_ET | CR0_PE
        && long_efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
        && after_lmsw == CR0_PG | CR0_WP | CR0_ET | CR0_MP | CR0_PE
        && out_efer & (EFER_LME | EFER_LMA) == 0
        && read_cr0() == base;
    say!(
        "own paging {} cr0={long_cr0:#x} efer={long_efer:#x} pae_cr0={pae_cr0:#x} lmsw={after_lmsw:#x}",
        if ok { "ok" } else { "BAD" }
    );
    cpu::enable_interrupts();
}
