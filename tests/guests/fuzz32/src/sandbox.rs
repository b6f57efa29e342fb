//! fuzz32's protected-mode machine, built once: 32-bit paging, GDT, TSS and IDT of its own, so
//! that whatever a protected-mode or virtual-8086 seed does ends in `fuzz32_trap` on the
//! handlers' stack (docs/SECURITY.md, "The fuzzers").
//!
//! - Paging (4 KiB pages, identity): the first 4 MiB and the local APIC page. The 64 KiB user
//!   region ([`USER_BASE`], also the real-mode and V86 segment 0x1000) is the only user-accessible
//!   memory; the harness's tables and everything real-mode code can reach (below 0x110000, but
//!   the user region and the page of the real-mode block at [`crate::real::BASE`], where the
//!   harness writes each real-mode seed's registers) are read-only (CR0.WP).
//! - GDT: flat kernel and user code/data, the TSS, and the 16-bit code/data segments the way to
//!   real mode goes through.
//! - TSS: ESP0 = the handlers' stack; an I/O permission bitmap that lets user and V86 code reach
//!   every port but the debug-exit ports 0xf4-0xf7.
//! - IDT: 256 32-bit interrupt gates (DPL 0) to stubs that pass the vector to `fuzz32_trap`.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

pub const USER_BASE: u32 = 0x1_0000;
pub const USER_SIZE: u32 = 0x1_0000;
pub const LAPIC: u32 = 0xfee0_0000;

pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_CODE: u16 = 0x18 | 3;
pub const USER_DATA: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
/// 16-bit code based at the real-mode block, and 16-bit data: the way down to real mode.
pub const CODE16: u16 = 0x30;
pub const DATA16: u16 = 0x38;

const PRESENT: u32 = 1;
const WRITABLE: u32 = 2;
const USER: u32 = 4;
const UNCACHED: u32 = 0x8 | 0x10;
/// Real-mode addresses end at FFFF:FFFF = 0x10FFEF.
pub const REAL_MODE_REACH: u32 = 0x11_0000;
pub const CR0_PG: u32 = 1 << 31;
pub const CR0_WP: u32 = 1 << 16;

/// Descriptors (SDM Vol. 3A 3.4.5), accessed bits preset: the GDT page is read-only.
const GDT_INIT: [u64; 8] = [
    0,
    0x00cf_9b00_0000_ffff,                                    // kernel code
    0x00cf_9300_0000_ffff,                                    // kernel data
    0x00cf_fb00_0000_ffff,                                    // user code
    0x00cf_f300_0000_ffff,                                    // user data
    0,                                                        // TSS, filled in
    0x0000_9b00_0000_ffff | (crate::real::BASE as u64) << 16, // 16-bit code at the real-mode block
    0x0000_9300_0000_ffff,                                    // 16-bit data, base 0
];

/// The 32-bit TSS (SDM Vol. 3A 8.2.1) with its I/O permission bitmap and terminating byte.
#[repr(C, packed)]
struct Tss {
    link: u32,
    esp0: u32,
    ss0: u32,
    unused: [u32; 22],
    trap: u16,
    iomap_base: u16,
    iomap: [u8; 8192],
    iomap_end: u8,
}

#[repr(C, align(4096))]
struct Tables {
    pd: [u32; 1024],
    pt_low: [u32; 1024],
    pt_apic: [u32; 1024],
    idt: [u64; 256],
    gdt: [u64; 8],
    tss: Tss,
}

pub struct Shared<T>(pub UnsafeCell<T>);
// SAFETY: one CPU; the harness runs with interrupts off and is not reentrant.
unsafe impl<T> Sync for Shared<T> {}

static TABLES: Shared<Tables> = Shared(UnsafeCell::new(Tables {
    pd: [0; 1024],
    pt_low: [0; 1024],
    pt_apic: [0; 1024],
    idt: [0; 256],
    gdt: [0; 8],
    tss: Tss {
        link: 0,
        esp0: 0,
        ss0: 0,
        unused: [0; 22],
        trap: 0,
        iomap_base: 0,
        iomap: [0; 8192],
        iomap_end: 0xff,
    },
}));

#[repr(C, align(16))]
struct Stack([u8; 0x4000]);
static TRAP_STACK: Shared<Stack> = Shared(UnsafeCell::new(Stack([0; 0x4000])));

/// The top of the handlers' stack.
pub fn trap_stack_top() -> u32 {
    TRAP_STACK.0.get() as u32 + core::mem::size_of::<Stack>() as u32
}

// One 16-byte stub per vector; the common part reloads the kernel segments and stack (a seed,
// or the way back from real mode, may have left anything) and calls `fuzz32_trap(vector)`.
global_asm!(
    r#"
    .pushsection .text.fuzz32_traps, "ax"
    .balign 16
    .globl fuzz32_trap_stubs
fuzz32_trap_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    mov eax, vec
    jmp fuzz32_trap_common
    .set vec, vec + 1
    .endr

    .globl fuzz32_trap_common
fuzz32_trap_common:
    cld
    mov cx, {data}
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    mov ss, cx
    mov esp, dword ptr [{stack_top}]
    push eax
    call {trap}
    ud2
    .popsection
"#,
    data = const KERNEL_DATA,
    stack_top = sym TRAP_STACK_TOP,
    trap = sym crate::fuzz32_trap,
);

/// Read by the trap stubs (an immediate would need a relocation the stub cannot compute).
#[no_mangle]
static mut TRAP_STACK_TOP: u32 = 0;

extern "C" {
    static fuzz32_trap_stubs: u8;
}

#[repr(C, packed)]
pub struct Pointer {
    pub limit: u16,
    pub base: u32,
}

/// The IDTR of protected mode, for the way back from real mode.
pub fn idtr() -> Pointer {
    // SAFETY: only the address is taken.
    let t = unsafe { &*TABLES.0.get() };
    Pointer {
        limit: (256 * 8 - 1) as u16,
        base: t.idt.as_ptr() as u32,
    }
}

pub fn gdtr() -> Pointer {
    // SAFETY: only the address is taken.
    let t = unsafe { &*TABLES.0.get() };
    Pointer {
        limit: (8 * 8 - 1) as u16,
        base: t.gdt.as_ptr() as u32,
    }
}

pub fn cr3() -> u32 {
    // SAFETY: only the address is taken.
    unsafe { (*TABLES.0.get()).pd.as_ptr() as u32 }
}

/// Builds the tables and loads GDT, TSS and IDT with paging still off. [`paging_on`] follows.
pub fn build() {
    // SAFETY: nothing has loaded the tables yet; this CPU is their only user.
    let t = unsafe { &mut *TABLES.0.get() };
    let top = trap_stack_top();
    // SAFETY: written once, before any trap can happen.
    unsafe { TRAP_STACK_TOP = top };
    t.tss.esp0 = top;
    t.tss.ss0 = u32::from(KERNEL_DATA);
    t.tss.iomap_base = core::mem::offset_of!(Tss, iomap) as u16;
    for port in 0xf4..=0xf7usize {
        t.tss.iomap[port / 8] |= 1 << (port % 8);
    }
    t.gdt.copy_from_slice(&GDT_INIT);
    let tss = core::ptr::addr_of!(t.tss) as u64;
    let limit = core::mem::size_of::<Tss>() as u64 - 1;
    // Available 32-bit TSS, present (SDM Vol. 3A 8.2.2).
    t.gdt[5] = (limit & 0xffff)
        | (tss & 0xff_ffff) << 16
        | 0x89 << 40
        | ((limit >> 16) & 0xf) << 48
        | ((tss >> 24) & 0xff) << 56;
    let stubs = core::ptr::addr_of!(fuzz32_trap_stubs) as u64;
    for (v, gate) in t.idt.iter_mut().enumerate() {
        let h = stubs + 16 * v as u64;
        // 32-bit interrupt gate, present, DPL 0 (SDM Vol. 3A 6.11).
        *gate = (h & 0xffff) | u64::from(KERNEL_CODE) << 16 | 0x8e << 40 | (h >> 16) << 48;
    }
    let tables = t as *const Tables as u32;
    let tables_end = tables + core::mem::size_of::<Tables>() as u32;
    for (i, pte) in t.pt_low.iter_mut().enumerate() {
        let pa = i as u32 * 4096;
        *pte = if (USER_BASE..USER_BASE + USER_SIZE).contains(&pa) {
            pa | PRESENT | WRITABLE | USER
        } else if (tables..tables_end).contains(&pa)
            || (pa < REAL_MODE_REACH && pa != crate::real::BASE)
        {
            // Read-only: these tables, and what real-mode code can reach (the interrupt table,
            // HLT everywhere else: `real::install`), so kernel seeds cannot plant code there.
            pa | PRESENT
        } else {
            pa | PRESENT | WRITABLE
        };
    }
    t.pt_apic[((LAPIC >> 12) & 1023) as usize] = LAPIC | PRESENT | WRITABLE | UNCACHED;
    t.pd[0] = t.pt_low.as_ptr() as u32 | PRESENT | WRITABLE | USER;
    t.pd[(LAPIC >> 22) as usize] = t.pt_apic.as_ptr() as u32 | PRESENT | WRITABLE;
    let (gdtr, idtr) = (gdtr(), idtr());
    // SAFETY: complete tables whose selectors 0x08/0x10 mean what the loader's did; paging is
    // off, so the GDT is still writable when LTR marks the TSS busy.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [2f]",
            "push {tmp}",
            "retf",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            tmp = out(reg) _,
            cs = const KERNEL_CODE,
            ds = const KERNEL_DATA,
            tss = const TSS_SELECTOR,
        );
    }
}

/// CR3 = the sandbox's page directory, CR0.PG and CR0.WP on, the protected-mode IDT loaded:
/// after start-up and after every real-mode seed.
pub fn paging_on() {
    let idtr = idtr();
    // SAFETY: the page tables identity map all of the harness (code, data, stacks).
    unsafe {
        asm!(
            "lidt [{idtr}]",
            "mov cr3, {cr3}",
            "mov {tmp}, cr0",
            "or {tmp}, {bits}",
            "mov cr0, {tmp}",
            idtr = in(reg) &idtr,
            cr3 = in(reg) cr3(),
            tmp = out(reg) _,
            bits = const CR0_PG | CR0_WP,
        );
    }
}
