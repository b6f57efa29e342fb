//! The machine the random code runs in, built once at start-up: page tables, GDT, TSS and IDT of
//! fuzz64's own, so that whatever a seed does ends in [`crate::trap`] on a stack it cannot reach.
//!
//! - Paging: the 4 MiB of RAM identity mapped in 4 KiB pages. The 64 KiB user region
//!   ([`USER_BASE`]) is the only user-accessible memory: code page, data, stack. Page 0 is not
//!   mapped. The harness's own memory is supervisor-only; the page holding these tables is also
//!   read-only (CR0.WP = 1), so a kernel-mode seed cannot rewrite them by accident. The local
//!   APIC page is mapped (supervisor, uncached) for the watchdog timer. Nothing else is mapped:
//!   a stray access is a #PF, not an exit to Keel.
//! - GDT: kernel code and data, user code for 64-, 32- and 16-bit code (the 16-bit code and data
//!   segments have their base at the user region and a 64 KiB limit), user data, the TSS.
//! - TSS: IST1 for every vector (a seed's RSP is never used by a handler); an I/O permission
//!   bitmap that lets user-mode seeds reach every port but 0xf4-0xf7 (the debug-exit port would
//!   end the guest).
//! - IDT: all 256 vectors are interrupt gates (DPL 0, IST1) to stubs that record the vector and
//!   call `fuzz_trap`.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

/// The user region: code page first, stack at the top.
pub const USER_BASE: u64 = 0x10_0000;
pub const USER_SIZE: u64 = 0x1_0000;
pub const LAPIC: u64 = 0xfee0_0000;

pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_CODE32: u16 = 0x18 | 3;
pub const USER_DATA: u16 = 0x20 | 3;
pub const USER_CODE64: u16 = 0x28 | 3;
pub const USER_CODE16: u16 = 0x30 | 3;
pub const USER_DATA16: u16 = 0x38 | 3;
const TSS_SELECTOR: u16 = 0x40;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const USER: u64 = 4;
const UNCACHED: u64 = 0x8 | 0x10;

/// Segment descriptors (SDM Vol. 3A 3.4.5), accessed bits preset (the GDT page is read-only).
const GDT_INIT: [u64; 8] = [
    0,
    0x00af_9b00_0000_ffff, // kernel code, 64-bit
    0x00cf_9300_0000_ffff, // kernel data
    0x00cf_fb00_0000_ffff, // user code, 32-bit, flat
    0x00cf_f300_0000_ffff, // user data, flat
    0x00af_fb00_0000_ffff, // user code, 64-bit
    0x0000_fb10_0000_ffff, // user code, 16-bit, base USER_BASE, limit 64 KiB
    0x0000_f310_0000_ffff, // user data, 16-bit, base USER_BASE, limit 64 KiB
];

/// The 64-bit TSS (SDM Vol. 3A 8.7) and its I/O permission bitmap with the terminating byte.
#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
    iomap: [u8; 8192],
    iomap_end: u8,
}

/// Everything the CPU reads while a seed runs, page aligned: made read-only once loaded.
#[repr(C, align(4096))]
struct Tables {
    pml4: [u64; 512],
    pdpt: [u64; 512],
    pd_low: [u64; 512],
    pd_apic: [u64; 512],
    pt_low: [[u64; 512]; 2],
    pt_apic: [u64; 512],
    idt: [u64; 512],
    gdt: [u64; 512],
    tss: Tss,
}

struct Shared<T>(UnsafeCell<T>);
// SAFETY: one CPU; written only by `build`, before any of it is loaded.
unsafe impl<T> Sync for Shared<T> {}

static TABLES: Shared<Tables> = Shared(UnsafeCell::new(Tables {
    pml4: [0; 512],
    pdpt: [0; 512],
    pd_low: [0; 512],
    pd_apic: [0; 512],
    pt_low: [[0; 512]; 2],
    pt_apic: [0; 512],
    idt: [0; 512],
    gdt: [0; 512],
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: 0,
        iomap: [0; 8192],
        iomap_end: 0xff,
    },
}));

/// The handlers' stack (IST1 and RSP0).
#[repr(C, align(16))]
struct Stack([u8; 0x4000]);
static TRAP_STACK: Shared<Stack> = Shared(UnsafeCell::new(Stack([0; 0x4000])));

// One 16-byte stub per vector: an error code of 0 where the CPU pushes none (SDM Vol. 3A table
// 6-1), then the vector; the common part reloads the kernel data segments (a seed may have left
// anything in them) and calls `fuzz_trap(&frame)`, which never returns.
global_asm!(
    r#"
    .pushsection .text.fuzz_traps, "ax"
    .balign 16
    .globl fuzz_trap_stubs
fuzz_trap_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec != 8) && ((vec < 10) || (vec > 14)) && (vec != 17) && (vec != 21) && (vec != 29) && (vec != 30)
    push 0
    .endif
    push vec
    jmp fuzz_trap_common
    .set vec, vec + 1
    .endr

fuzz_trap_common:
    cld
    mov ax, {data}
    mov ss, ax
    mov ds, ax
    mov es, ax
    mov rdi, rsp
    and rsp, -16
    call fuzz_trap
    ud2
    .popsection
"#,
    data = const KERNEL_DATA,
);

extern "C" {
    static fuzz_trap_stubs: u8;
}
const STUB_SIZE: u64 = 16;

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn addr<T>(p: *const T) -> u64 {
    p as u64
}

/// Builds the tables, loads GDT, TSS and IDT, switches to the new page tables and turns on
/// CR0.WP. Call once, with interrupts off, before the first seed.
pub fn build() {
    let t = TABLES.0.get();
    // SAFETY: nothing has loaded the tables yet; this CPU is their only user.
    let t = unsafe { &mut *t };
    let stack_top = addr(TRAP_STACK.0.get()) + core::mem::size_of::<Stack>() as u64;
    t.tss.rsp[0] = stack_top;
    t.tss.ist[0] = stack_top;
    t.tss.iomap_base = core::mem::offset_of!(Tss, iomap) as u16;
    for port in 0xf4..=0xf7usize {
        t.tss.iomap[port / 8] |= 1 << (port % 8);
    }
    t.gdt[..GDT_INIT.len()].copy_from_slice(&GDT_INIT);
    let tss = addr(core::ptr::addr_of!(t.tss));
    let limit = core::mem::size_of::<Tss>() as u64 - 1;
    // Available 64-bit TSS, present (SDM Vol. 3A 8.2.3).
    t.gdt[8] = (limit & 0xffff)
        | (tss & 0xff_ffff) << 16
        | 0x89 << 40
        | ((limit >> 16) & 0xf) << 48
        | ((tss >> 24) & 0xff) << 56;
    t.gdt[9] = tss >> 32;
    let stubs = addr(core::ptr::addr_of!(fuzz_trap_stubs));
    for v in 0..256 {
        let h = stubs + STUB_SIZE * v as u64;
        // Interrupt gate, DPL 0, present, IST1 (SDM Vol. 3A 6.14.1).
        t.idt[2 * v] = (h & 0xffff)
            | u64::from(KERNEL_CODE) << 16
            | 1 << 32
            | 0x8e << 40
            | ((h >> 16) & 0xffff) << 48;
        t.idt[2 * v + 1] = h >> 32;
    }
    let tables = addr(t as *const Tables);
    let tables_end = tables + core::mem::size_of::<Tables>() as u64;
    for (i, pte) in t.pt_low.iter_mut().flatten().enumerate() {
        let pa = i as u64 * 4096;
        *pte = if pa == 0 {
            0
        } else if (USER_BASE..USER_BASE + USER_SIZE).contains(&pa) {
            pa | PRESENT | WRITABLE | USER
        } else if (tables..tables_end).contains(&pa) {
            pa | PRESENT
        } else {
            pa | PRESENT | WRITABLE
        };
    }
    t.pt_apic[0] = LAPIC | PRESENT | WRITABLE | UNCACHED;
    let upper = PRESENT | WRITABLE | USER;
    t.pd_low[0] = addr(t.pt_low[0].as_ptr()) | upper;
    t.pd_low[1] = addr(t.pt_low[1].as_ptr()) | upper;
    t.pd_apic[((LAPIC >> 21) & 511) as usize] = addr(t.pt_apic.as_ptr()) | PRESENT | WRITABLE;
    t.pdpt[0] = addr(t.pd_low.as_ptr()) | upper;
    t.pdpt[3] = addr(t.pd_apic.as_ptr()) | PRESENT | WRITABLE;
    t.pml4[0] = addr(t.pdpt.as_ptr()) | upper;
    let gdtr = Pointer {
        limit: (10 * 8 - 1) as u16,
        base: addr(t.gdt.as_ptr()),
    };
    let idtr = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: addr(t.idt.as_ptr()),
    };
    let cr3 = addr(t.pml4.as_ptr());
    // SAFETY: complete tables: the GDT keeps the loader's selectors' meaning (0x08 code64, 0x10
    // data); LTR marks the TSS busy while the GDT is still writable (the loader's identity map);
    // the new page tables map all of the harness, its stacks and this code where they are now.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
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
            "mov cr3, {cr3}",
            "mov {tmp}, cr0",
            "or {tmp}, {wp}",
            "mov cr0, {tmp}",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cr3 = in(reg) cr3,
            tmp = out(reg) _,
            cs = const KERNEL_CODE,
            ds = const KERNEL_DATA,
            tss = const TSS_SELECTOR,
            wp = const 1u64 << 16,
        );
    }
}
