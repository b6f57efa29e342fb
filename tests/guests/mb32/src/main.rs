//! mb32: a multiboot 1 kernel (ELF32 with a multiboot header; QEMU's -kernel boots it too). Prints
//! what the multiboot info says (command line, mem_upper, modules), runs the standard checks,
//! turns on PAE paging and IA-32e mode itself (`paging`) and exits with 0x12.
#![no_std]
#![no_main]

mod paging;

use core::arch::global_asm;
use guest_common::console::{c_str, Printable};
use guest_common::{checks, cpu, say, EXIT_FAILURE};

const EXIT_DONE: u8 = 0x12;
/// EAX from a multiboot loader (multiboot spec 3.2).
const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// Info flags and field offsets in u32 units (spec 3.3).
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const MEM_UPPER: usize = 2;
const CMDLINE: usize = 4;
const MODS_COUNT: usize = 5;
const MODS_ADDR: usize = 6;
/// Modules listed at most (the rest are only counted).
const MAX_LISTED_MODULES: u32 = 16;

// The header asks for page-aligned modules and memory information (flags 0 and 1); the address
// fields are not used: the loader reads the ELF program headers.
global_asm!(
    r#"
    .pushsection .multiboot, "a"
    .balign 4
    .long 0x1badb002
    .long 0x00000003
    .long -(0x1badb002 + 0x00000003)
    .popsection

    .pushsection .bss.stack, "aw", @nobits
    .balign 16
mb32_stack:
    .skip 0x10000
mb32_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    mov esp, offset mb32_stack_top
    push ebx
    push eax
    call {main}
    ud2
    .popsection
"#,
    main = sym mb32_main,
);

/// Reads u32 number `index` of the structure at `base`.
fn word(base: usize, index: usize) -> u32 {
    // SAFETY: `base` is a multiboot info or module entry the loader wrote (paging is off, so the
    // address is usable as is); it is only read.
    unsafe { ((base + 4 * index) as *const u32).read_volatile() }
}

fn string(addr: u32) -> &'static [u8] {
    // SAFETY: multiboot strings are NUL-terminated and stay where the loader put them.
    unsafe { c_str(addr as usize as *const u8, 4096) }
}

extern "C" fn mb32_main(magic: u32, info: usize) -> ! {
    checks::init("mb32");
    say!("hello from protected mode");
    if magic != BOOTLOADER_MAGIC {
        say!("bad multiboot magic {:#x}", magic);
        cpu::exit(EXIT_FAILURE);
    }
    let flags = word(info, 0);
    if flags & INFO_CMDLINE != 0 {
        say!("cmdline={}", Printable(string(word(info, CMDLINE))));
    }
    if flags & INFO_MEMORY != 0 {
        say!("mem_upper={}", word(info, MEM_UPPER));
    }
    if flags & INFO_MODS != 0 {
        let count = word(info, MODS_COUNT);
        let mods = word(info, MODS_ADDR) as usize;
        say!("mods={}", count);
        for i in 0..count.min(MAX_LISTED_MODULES) as usize {
            let entry = mods + 16 * i;
            let (start, end) = (word(entry, 0), word(entry, 1));
            say!(
                "module {} size={}",
                Printable(string(word(entry, 2))),
                end.wrapping_sub(start)
            );
        }
    }
    checks::standard();
    paging::run();
    checks::done(EXIT_DONE)
}
