//! 64-bit GDT, IDT and trap stubs.

use super::{
    gate_low, handle, DescriptorTablePointer, Table, CODE_SELECTOR, DATA_DESCRIPTOR, DATA_SELECTOR,
};
use core::arch::{asm, global_asm};

/// Registers as `guest_trap_common` leaves them on the stack, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// One 16-byte stub per vector: push a zero error code where the CPU pushes none (SDM Vol. 3A
// table 6-1: 8, 10-14, 17, 21, 29 and 30 have one), push the vector, join the common path. The
// CPU aligned RSP to 16 before its 40/48-byte frame (SDM 6.14.2), so after 2 + 15 pushes the call
// below sees the ABI's alignment.
global_asm!(
    r#"
    .pushsection .text.traps, "ax"
    .balign 16
    .globl guest_trap_stubs
guest_trap_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec != 8) && ((vec < 10) || (vec > 14)) && (vec != 17) && (vec != 21) && (vec != 29) && (vec != 30)
    pushq $0
    .endif
    pushq $vec
    jmp guest_trap_common
    .set vec, vec + 1
    .endr

guest_trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call guest_trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
    .popsection
"#,
    options(att_syntax)
);

#[no_mangle]
extern "C" fn guest_trap(frame: &mut TrapFrame) {
    frame.rip = handle(frame.vector as u8, frame.error as usize, frame.rip as usize) as u64;
}

/// Null, 64-bit code (L = 1), data.
pub(super) static GDT: Table<[u64; 3]> = Table::new([0, 0x00af_9b00_0000_ffff, DATA_DESCRIPTOR]);
/// u64 words per IDT gate (SDM Vol. 3A 6.14.1).
pub(super) const GATE_WORDS: usize = 2;

/// The interrupt gate for `handler`.
pub(super) fn gate(handler: usize, selector: u16) -> [u64; GATE_WORDS] {
    [gate_low(handler, selector), (handler as u64) >> 32]
}

/// LGDT, reload CS and the data segments with the selectors of [`GDT`], LIDT.
///
/// # Safety
/// Both pointers describe complete, static tables; the gates use [`CODE_SELECTOR`].
pub(super) unsafe fn load_tables(gdtr: &DescriptorTablePointer, idtr: &DescriptorTablePointer) {
    // SAFETY: per the contract above; the far transfer lands on the next instruction.
    unsafe {
        asm!(
            "lgdt ({gdtr})",
            "pushq ${cs}",
            "leaq 2f(%rip), {tmp}",
            "pushq {tmp}",
            "lretq",
            "2:",
            "mov ${ds}, {tmp:e}",
            "mov {tmp:e}, %ds",
            "mov {tmp:e}, %es",
            "mov {tmp:e}, %ss",
            "mov {tmp:e}, %fs",
            "mov {tmp:e}, %gs",
            "lidt ({idtr})",
            gdtr = in(reg) gdtr,
            idtr = in(reg) idtr,
            tmp = out(reg) _,
            cs = const CODE_SELECTOR,
            ds = const DATA_SELECTOR,
            options(att_syntax)
        );
    }
}
