//! `attack=mmio16`: the local APIC from 16-bit code. In a 16-bit code segment (compatibility mode,
//! CS.D = 0) the default operand and address sizes are 16 bits, 0x66 makes an operand 32-bit and
//! 0x67 an address 32-bit (SDM Vol. 1 3.6, Table 3-4), and the instruction's length follows
//! (a disp32 and an imm32 instead of a disp16 and an imm16). Keel decodes the instruction that
//! touched the APIC page itself, so it must apply those rules: a 32-bit store must reach the
//! APIC (16-bit ones are dropped), a 32-bit load must not be truncated, and the guest must go on
//! at the next instruction, not in the middle of this one.
//!
//! The attack loads a GDT with a 16-bit code segment based at [`hostile_mmio16_start`], far-calls
//! it, and the 16-bit block (flat 4 GiB DS, interrupts off) runs:
//! 1. `66 67 C7 05 disp32 imm32`: TPR = 0x50, then `66 67 8B 05 disp32`: EAX = TPR -> ECX;
//! 2. `66 67 89 07` (EDI = the TPR's address): TPR = 0x60, then `67 8B 17`: DX = TPR (a 16-bit
//!    load keeps EDX's upper half);
//! 3. `66 67 A1 moffs32`: EAX = TPR -> ESI;
//! 4. EAX = 0xdeadbeef (only reached if every length was right), `66 CB` back to 64-bit code.
//!
//! Prints `hostile64: mmio16 mmio=5/5 ok`.

use super::Tally;
use core::arch::{asm, global_asm};
use guest_common::lapic;

const TPR: u32 = 0xfee0_0080;
/// The selector of the 16-bit code segment: entry 3 of the GDT this attack loads.
const CODE16: u16 = 0x18;

global_asm!(
    r#"
    .pushsection .text.mmio16, "ax"
    .balign 16
    .globl hostile_mmio16_start
hostile_mmio16_start:
    .byte 0x66, 0x67, 0xc7, 0x05
    .long {tpr}
    .long 0x50
    .byte 0x66, 0x67, 0x8b, 0x05
    .long {tpr}
    .byte 0x66, 0x89, 0xc1
    .byte 0x66, 0xb8
    .long 0x60
    .byte 0x66, 0x67, 0x89, 0x07
    .byte 0x67, 0x8b, 0x17
    .byte 0x66, 0x67, 0xa1
    .long {tpr}
    .byte 0x66, 0x89, 0xc6
    .byte 0x66, 0xb8
    .long 0xdeadbeef
    .byte 0x66, 0xcb
    .popsection
"#,
    tpr = const TPR,
);

extern "C" {
    static hostile_mmio16_start: u8;
}

/// The operand of LGDT/SGDT in 64-bit mode (SDM Vol. 3A 3.5.1).
#[repr(C, packed)]
struct Gdtr {
    limit: u16,
    base: u64,
}

#[repr(C, align(16))]
struct Gdt([u64; 4]);

static mut GDT: Gdt = Gdt([0; 4]);

/// A 16-bit code segment (type 0xb: execute/read, accessed; P, DPL 0; D = L = G = 0) of 64 KiB
/// at `base` (SDM Vol. 3A 3.4.5).
fn code16_descriptor(base: u32) -> u64 {
    let base = u64::from(base);
    0xffff | (base & 0xff_ffff) << 16 | 0x9b << 40 | (base >> 24) << 56
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("mmio16", "mmio");
    lapic::enable();
    let start = core::ptr::addr_of!(hostile_mmio16_start) as u64;
    let mut old = Gdtr { limit: 0, base: 0 };
    // SAFETY: SGDT stores 10 bytes; the guest's GDT (null, 64-bit code 0x08, data 0x10) is
    // copied into GDT, which only this function touches, before LGDT loads it with the same
    // selectors plus the 16-bit code segment.
    unsafe {
        asm!("sgdt [{}]", in(reg) &mut old, options(nostack, preserves_flags));
        let gdt = (&raw mut GDT).cast::<u64>();
        for i in 0..3 {
            gdt.add(i).write((old.base as *const u64).add(i).read());
        }
        gdt.add(3).write(code16_descriptor(start as u32));
        let new = Gdtr {
            limit: 4 * 8 - 1,
            base: gdt as u64,
        };
        asm!("lgdt [{}]", in(reg) &new, options(nostack, preserves_flags));
    }
    // m16:32 far pointer: offset 0 in the 16-bit segment.
    let far: [u16; 3] = [0, 0, CODE16];
    let (eax, ecx, edx, esi): (u64, u64, u64, u64);
    // SAFETY: CALL FAR (FF /3, m16:32) pushes a 32-bit CS:EIP on the stack (identity mapped,
    // below 4 GiB) and enters the 16-bit block, which returns with a 32-bit RETF; interrupts are
    // off, so no event arrives in 16-bit code. DS = SS = 0x10: flat. The block writes only the
    // registers named here (their upper halves are undefined after compatibility mode).
    unsafe {
        asm!(
            "cli",
            "mov ax, 0x10",
            "mov ds, ax",
            ".byte 0xff, 0x1e", // call far [rsi]
            in("rsi") far.as_ptr(),
            in("edi") TPR,
            inout("edx") 0xdead_0000u32 as u64 => edx,
            out("eax") eax,
            out("ecx") ecx,
            lateout("rsi") esi,
        );
    }
    let (eax, ecx, edx, esi) = (eax as u32, ecx as u32, edx as u32, esi as u32);
    t.require(
        format_args!("ECX {ecx:#x} after 66 67 C7 / 66 67 8B (TPR 0x50)"),
        ecx == 0x50,
    );
    t.require(
        format_args!("EDX {edx:#x} after 66 67 89 / 67 8B (TPR 0x60, upper half kept)"),
        edx == 0xdead_0060,
    );
    t.require(
        format_args!("ESI {esi:#x} after 66 67 A1 (TPR 0x60)"),
        esi == 0x60,
    );
    t.require(
        format_args!("EAX {eax:#x}: the block ran to its end"),
        eax == 0xdead_beef,
    );
    // SAFETY: an ordinary 32-bit load of the TPR in 64-bit code.
    let tpr = unsafe { core::ptr::read_volatile(TPR as u64 as *const u32) };
    t.require(
        format_args!("TPR {tpr:#x} read in 64-bit code"),
        tpr == 0x60,
    );
    t.finish()
}
