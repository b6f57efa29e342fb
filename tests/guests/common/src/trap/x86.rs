//! 32-bit GDT, IDT and trap stubs.

use super::{
    gate_low, handle, DescriptorTablePointer, Table, CODE_SELECTOR, DATA_DESCRIPTOR, DATA_SELECTOR,
};
use core::arch::{asm, global_asm};

/// Registers as `guest_trap_common` leaves them on the stack (PUSHA order), lowest address first.
/// No ESP/SS: traps from ring 0 do not switch stacks.
#[repr(C)]
pub struct TrapFrame {
    pub edi: u32,
    pub esi: u32,
    pub ebp: u32,
    pub esp_at_pusha: u32,
    pub ebx: u32,
    pub edx: u32,
    pub ecx: u32,
    pub eax: u32,
    pub vector: u32,
    pub error: u32,
    pub eip: u32,
    pub cs: u32,
    pub eflags: u32,
}

// One 16-byte stub per vector, as in the 64-bit version (error codes: SDM Vol. 3A table 6-1).
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
    pushl $0
    .endif
    pushl $vec
    jmp guest_trap_common
    .set vec, vec + 1
    .endr

guest_trap_common:
    pusha
    push %esp
    cld
    call guest_trap
    add $4, %esp
    popa
    add $8, %esp
    iret
    .popsection
"#,
    options(att_syntax)
);

#[no_mangle]
extern "C" fn guest_trap(frame: &mut TrapFrame) {
    frame.eip = handle(frame.vector as u8, frame.error as usize, frame.eip as usize) as u32;
}

/// Null, 32-bit code (D = 1), data.
pub(super) static GDT: Table<[u64; 3]> = Table::new([0, 0x00cf_9b00_0000_ffff, DATA_DESCRIPTOR]);
/// u64 words per IDT gate (SDM Vol. 3A 6.11).
pub(super) const GATE_WORDS: usize = 1;

/// The interrupt gate for `handler`.
pub(super) fn gate(handler: usize, selector: u16) -> [u64; GATE_WORDS] {
    [gate_low(handler, selector)]
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
            "ljmp ${cs}, $2f",
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
