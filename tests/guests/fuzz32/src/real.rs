//! The way to real mode and back, for real-mode seeds.
//!
//! Real-mode code can only run below 1 MiB + 64 KiB, and the harness is linked at 2 MiB, so this
//! block is assembled here and copied to [`BASE`] at start-up: the real-mode interrupt table's 256
//! entries point at its 16-byte stubs (after a small data area: the GDTR for the way back, the
//! real-mode IDTR, the seed's registers), which return to protected mode and jump to the common trap
//! path with the vector in EAX. [`enter`] turns paging off, goes through the 16-bit protected-mode
//! segments into real mode, loads the seed's registers from the block and IRETs into the seed at
//! 1000:0000 with interrupts enabled. The seed's stream is filtered (`hostile64::fuzz::
//! filter_real`) so that its segment registers stay 0x1000: it cannot reach the table or this
//! block except through a far jump.

use core::arch::{asm, global_asm};

/// Where the block is copied, and its real-mode segment.
pub const BASE: u32 = 0x8000;
const SEGMENT: u16 = (BASE >> 4) as u16;
/// The seeds' segment: the user region at 0x10000.
pub const SEED_SEGMENT: u16 = 0x1000;
const USER: u32 = crate::sandbox::USER_BASE;
const REACH: u32 = crate::sandbox::REAL_MODE_REACH;
const HLT: u8 = 0xf4;

global_asm!(
    r#"
    .pushsection .rodata.fuzz32_real, "a"
    .balign 64
    .globl fuzz32_real_start
fuzz32_real_start:
    .code16
    // Data first, at fixed offsets (LLVM does not take label differences in memory operands):
    // 0 GDTR for the way back, 8 IDTR of real mode, 16 the seed's EAX..EBP.
    .word 0
    .long 0
    .balign 8
    .word 0x3ff
    .long 0
    .balign 16
    .globl fuzz32_real_regs
fuzz32_real_regs:
    .skip 28
    .balign 64
fuzz32_real_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    mov eax, vec
    jmp fuzz32_real_common
    .set vec, vec + 1
    .endr

fuzz32_real_common:
    lgdt cs:[0]
    mov ecx, cr0
    or ecx, 1
    mov cr0, ecx
    .byte 0x66, 0xea
    .long fuzz32_trap_common
    .word {kernel_code}

fuzz32_real_enter:
    mov ax, {data16}
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov eax, cr0
    and eax, 0xfffffffe
    mov cr0, eax
    .byte 0xea
    .word fuzz32_real_mode - fuzz32_real_start
    .word {segment}
fuzz32_real_mode:
    lidt cs:[8]
    mov ax, {seed_segment}
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, 0xfff0
    push 0x0202
    push {seed_segment}
    push 0
    mov eax, cs:[16]
    mov ebx, cs:[20]
    mov ecx, cs:[24]
    mov edx, cs:[28]
    mov esi, cs:[32]
    mov edi, cs:[36]
    mov ebp, cs:[40]
    iret

    .globl fuzz32_real_end
fuzz32_real_end:
    .code32
    .popsection
"#,
    kernel_code = const crate::sandbox::KERNEL_CODE,
    data16 = const crate::sandbox::DATA16,
    segment = const SEGMENT,
    seed_segment = const SEED_SEGMENT,
);

extern "C" {
    static fuzz32_real_start: u8;
    static fuzz32_real_regs: u8;
    static fuzz32_real_end: u8;
}

/// Offset of the first stub in the block (after the data); stub `v` is 16 bytes further each.
const STUBS: u32 = 64;

/// Where `symbol` of the block is once copied to [`BASE`].
fn in_copy(symbol: *const u8) -> u32 {
    BASE + (symbol as u32 - core::ptr::addr_of!(fuzz32_real_start) as u32)
}

/// Copies the block to [`BASE`], points every real-mode vector at its stub and stores the GDTR
/// the stubs reload. Paging must be off or map page 0 and the block writable.
pub fn install() {
    let start = core::ptr::addr_of!(fuzz32_real_start);
    let len = core::ptr::addr_of!(fuzz32_real_end) as usize - start as usize;
    // SAFETY: everything below 0x110000 is guest RAM the harness no longer needs (the ELF
    // loader's GDT and command line are used up, its stack is at the top of RAM, the image at
    // 2 MiB); the block (about 4.3 KiB) is copied from the image; paging is still off.
    unsafe {
        // HLT everywhere a real-mode seed may jump but the table, this block and its own
        // segment: with interrupts on it waits for the watchdog, with them off Keel stops the
        // guest; either way the seed ends (random bytes there could clear IF and loop).
        for (from, to) in [
            (0x400, BASE),
            (BASE + 0x1000, USER),
            (USER + 0x1_0000, REACH),
        ] {
            core::ptr::write_bytes(from as *mut u8, HLT, (to - from) as usize);
        }
        core::ptr::copy_nonoverlapping(start, BASE as *mut u8, len);
        for v in 0..256u32 {
            // The table starts at address 0, which Rust may not write through a pointer.
            asm!("mov dword ptr [{at}], {entry}", at = in(reg) v * 4,
                 entry = in(reg) u32::from(SEGMENT) << 16 | (STUBS + v * 16), options(nostack));
        }
        let gdtr = crate::sandbox::gdtr();
        let at = BASE as *mut u8;
        at.cast::<u16>().write_unaligned(gdtr.limit);
        at.add(2).cast::<u32>().write_unaligned(gdtr.base);
    }
}

/// Leaves protected mode for the seed at 1000:0000 with `regs` = EAX, EBX, ECX, EDX, ESI, EDI,
/// EBP. Every way back is a real-mode vector, whose stub returns to the trap path.
pub fn enter(regs: &[u32; 7]) -> ! {
    // SAFETY: the block is installed; the code runs identity mapped, so turning paging off keeps
    // executing it; the 16-bit code segment is based at BASE, where `fuzz32_real_enter` is.
    unsafe {
        let at = in_copy(core::ptr::addr_of!(fuzz32_real_regs)) as *mut [u32; 7];
        at.write_volatile(*regs);
        asm!(
            "mov eax, cr0",
            "and eax, 0x7fffffff",
            "mov cr0, eax",
            ".byte 0xea",
            ".long fuzz32_real_enter - fuzz32_real_start",
            ".word {code16}",
            code16 = const crate::sandbox::CODE16,
            options(noreturn)
        );
    }
}
