//! pm32: an ELF32 guest entered in 32-bit protected mode by Keel's ELF loader (EDI = command line,
//! ESI = RAM size, paging off). Runs the standard checks and exits with 0x11.
#![no_std]
#![no_main]

use core::arch::global_asm;
use guest_common::{checks, say};

const EXIT_DONE: u8 = 0x11;

global_asm!(
    r#"
    .pushsection .bss.stack, "aw", @nobits
    .balign 16
pm32_stack:
    .skip 0x10000
pm32_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    mov esp, offset pm32_stack_top
    push esi
    push edi
    call {main}
    ud2
    .popsection
"#,
    main = sym pm32_main,
);

extern "C" fn pm32_main(cmdline: *const u8, ram_size: usize) -> ! {
    checks::init("pm32");
    say!("hello from protected mode");
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at EDI.
    unsafe { checks::elf_entry_line(cmdline, ram_size as u64) };
    checks::standard();
    checks::done(EXIT_DONE)
}
