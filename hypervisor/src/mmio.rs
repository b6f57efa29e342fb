//! Emulation of the guest instruction that touched a device's MMIO page.
//!
//! An EPT violation says which guest-physical address was accessed but not the data or the size
//! (and, not being instruction-caused, gives no instruction length: SDM 28.2.4), so Keel fetches
//! the instruction at CS:RIP through the guest's page tables and decodes it. Device drivers reach
//! registers with plain moves, so the decoder handles the MOV family (88, 89, 8A, 8B, C6, C7,
//! A0-A3 with an absolute offset, 0F B6/B7 MOVZX) with every prefix, ModRM, SIB and displacement
//! form, and the operand- and address-size rules of 16-, 32- and 64-bit code ([`CodeSize`]);
//! anything else stops the guest with the bytes in the message rather than guessing.

use crate::exits::{Action, ExitContext};
use crate::gmem::{self, PagingMode};
use crate::guest::{GuestRegs, StopReason};
use crate::vmx::{Guest32, Guest64, GuestNat, Vmcs};
use alloc::format;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// A general-purpose register by number; `high_byte` selects AH/CH/DH/BH.
    Reg {
        index: u8,
        high_byte: bool,
    },
    Imm(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioOp {
    /// Device register -> register; `zero_extend` for MOVZX and 32-bit destinations.
    Read {
        dst: Operand,
        size: u8,
        dst_size: u8,
    },
    Write {
        src: Operand,
        size: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    pub op: MmioOp,
    pub len: u8,
}

/// The default operand and address size of the code the guest runs (SDM Vol. 1 3.6, Vol. 3A
/// 3.4.5: CS.L in IA-32e mode selects 64-bit code, else CS.D 32-bit; real and virtual-8086 mode
/// are 16-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSize {
    Bits16,
    Bits32,
    Bits64,
}

impl CodeSize {
    /// The guest's code size from its VMCS state: real mode (CR0.PE = 0) and virtual-8086 mode
    /// (RFLAGS.VM) are 16-bit whatever CS holds (SDM 20.1); CS.L counts only in IA-32e mode
    /// (EFER.LMA); otherwise CS.D says 32 or 16.
    pub fn of<V: Vmcs + ?Sized>(vmcs: &V) -> Self {
        const CR0_PE: u64 = 1;
        const RFLAGS_VM: u64 = 1 << 17;
        const EFER_LMA: u64 = 1 << 10;
        const CS_L: u32 = 1 << 13;
        const CS_D: u32 = 1 << 14;
        let cs = vmcs.read(Guest32::CsAccessRights);
        if vmcs.read(GuestNat::Cr0) & CR0_PE == 0 || vmcs.read(GuestNat::Rflags) & RFLAGS_VM != 0 {
            Self::Bits16
        } else if vmcs.read(Guest64::Ia32Efer) & EFER_LMA != 0 && cs & CS_L != 0 {
            Self::Bits64
        } else if cs & CS_D != 0 {
            Self::Bits32
        } else {
            Self::Bits16
        }
    }
}

/// Decodes one instruction of `code`-sized code.
///
/// Operand size (SDM Vol. 1 3.6, Table 3-4; Vol. 2 2.2.1.2): 16 in 16-bit code and 32 in 32- and
/// 64-bit code by default, 0x66 switches between 16 and 32, REX.W makes it 64 whatever 0x66
/// says. Address size: 16, 32 or 64 by default, 0x67 switches 16 <-> 32 outside 64-bit code and
/// 64 -> 32 in it. The address size picks the ModRM forms (16-bit: Vol. 2 Table 2-1, no SIB,
/// disp16; 32/64-bit: Table 2-2/2-3 with SIB and disp32) and the width of a moffs offset.
pub fn decode(bytes: &[u8], code: CodeSize) -> Option<Decoded> {
    let long = code == CodeSize::Bits64;
    let mut i = 0;
    let mut opsize_prefix = false;
    let mut addr_prefix = false;
    let mut rex = 0u8;
    loop {
        let b = *bytes.get(i)?;
        match b {
            0x66 => opsize_prefix = true,
            0x67 => addr_prefix = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0xf2 | 0xf3 => {}
            0x40..=0x4f if long => {
                rex = b;
                i += 1;
                continue;
            }
            _ => break,
        }
        // SDM Vol. 2 2.2.1: a REX prefix counts only immediately before the opcode.
        rex = 0;
        i += 1;
    }
    let rex_w = rex & 8 != 0;
    let rex_r = (rex & 4) << 1;
    let wide = match (code, opsize_prefix) {
        (CodeSize::Bits64, _) if rex_w => 8,
        (CodeSize::Bits16, false) | (CodeSize::Bits32 | CodeSize::Bits64, true) => 2,
        _ => 4,
    };
    let addr_bytes = match (code, addr_prefix) {
        (CodeSize::Bits16, false) | (CodeSize::Bits32, true) => 2,
        (CodeSize::Bits64, false) => 8,
        _ => 4,
    };
    let mut opcode = *bytes.get(i)? as u16;
    i += 1;
    if opcode == 0x0f {
        opcode = 0x0f00 | *bytes.get(i)? as u16;
        i += 1;
    }
    // MOV AL/eAX <-> moffs (A0-A3): no ModRM, an absolute offset of the address size follows
    // (SDM Vol. 2B, MOV).
    if (0xa0..=0xa3).contains(&opcode) {
        let len = i + addr_bytes;
        if len > 15 || len > bytes.len() {
            return None;
        }
        let rax = Operand::Reg {
            index: 0,
            high_byte: false,
        };
        let size = if opcode & 1 == 0 { 1 } else { wide };
        let op = if opcode < 0xa2 {
            MmioOp::Read {
                dst: rax,
                size,
                dst_size: size,
            }
        } else {
            MmioOp::Write { src: rax, size }
        };
        return Some(Decoded { op, len: len as u8 });
    }
    let modrm = *bytes.get(i)?;
    i += 1;
    let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | rex_r, modrm & 7);
    if md == 3 {
        return None; // a register operand cannot fault on MMIO
    }
    // Addressing bytes: SIB and displacement (SDM Vol. 2, 2.1.5 Tables 2-1 to 2-3). REX.B
    // extends the base register but not which forms take a SIB or a displacement.
    if addr_bytes == 2 {
        i += match md {
            0 if rm == 6 => 2,
            1 => 1,
            2 => 2,
            _ => 0,
        };
    } else {
        if rm == 4 {
            let sib = *bytes.get(i)?;
            i += 1;
            if md == 0 && sib & 7 == 5 {
                i += 4;
            }
        }
        i += match md {
            0 if rm == 5 => 4,
            1 => 1,
            2 => 4,
            _ => 0,
        };
    }
    let reg8 = |r: u8| Operand::Reg {
        index: if rex == 0 && (4..8).contains(&r) {
            r - 4
        } else {
            r
        },
        high_byte: rex == 0 && (4..8).contains(&r),
    };
    let regw = |r: u8| Operand::Reg {
        index: r,
        high_byte: false,
    };
    let imm = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at + n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let (op, extra) = match opcode {
        0x88 => (
            MmioOp::Write {
                src: reg8(reg),
                size: 1,
            },
            0,
        ),
        0x89 => (
            MmioOp::Write {
                src: regw(reg),
                size: wide,
            },
            0,
        ),
        0x8a => (
            MmioOp::Read {
                dst: reg8(reg),
                size: 1,
                dst_size: 1,
            },
            0,
        ),
        0x8b => (
            MmioOp::Read {
                dst: regw(reg),
                size: wide,
                dst_size: wide,
            },
            0,
        ),
        0xc6 if reg & 7 == 0 => (
            MmioOp::Write {
                src: Operand::Imm(imm(i, 1)?),
                size: 1,
            },
            1,
        ),
        0xc7 if reg & 7 == 0 => {
            let n = if wide == 2 { 2 } else { 4 };
            let mut v = imm(i, n)?;
            if wide == 8 && v & 0x8000_0000 != 0 {
                v |= 0xffff_ffff_0000_0000; // imm32 sign-extended to 64 bits
            }
            (
                MmioOp::Write {
                    src: Operand::Imm(v),
                    size: wide,
                },
                n,
            )
        }
        0x0fb6 => (
            MmioOp::Read {
                dst: regw(reg),
                size: 1,
                dst_size: wide,
            },
            0,
        ),
        0x0fb7 => (
            MmioOp::Read {
                dst: regw(reg),
                size: 2,
                dst_size: wide,
            },
            0,
        ),
        _ => return None,
    };
    let len = i + extra;
    if len > 15 || len > bytes.len() {
        return None;
    }
    Some(Decoded { op, len: len as u8 })
}

fn size_mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

fn read_operand(regs: &GuestRegs, rsp: u64, op: Operand) -> u64 {
    match op {
        Operand::Imm(v) => v,
        Operand::Reg { index, high_byte } => {
            let v = if index == 4 && !high_byte {
                rsp
            } else {
                regs.get(index)
            };
            if high_byte {
                v >> 8
            } else {
                v
            }
        }
    }
}

/// Writes a read result into a register with x86's merge rules: 8/16-bit destinations keep the
/// other bits, 32-bit ones zero the upper half.
fn write_register(old: u64, value: u64, size: u8, high_byte: bool) -> u64 {
    match (size, high_byte) {
        (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (old & !0xff) | (value & 0xff),
        (2, _) => (old & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    }
}

/// Reads up to `out.len()` instruction bytes at guest-linear `la`, one page walk per page
/// touched (an instruction may straddle two pages that are not physically adjacent); stops
/// early at a page that is not mapped. Returns how many bytes were read.
fn fetch(
    ram: &crate::guest::GuestRam,
    mode: &PagingMode,
    la: u64,
    linear_mask: u64,
    out: &mut [u8],
) -> usize {
    let mut got = 0;
    while got < out.len() {
        let at = la.wrapping_add(got as u64) & linear_mask;
        let in_page = (4096 - (at & 0xfff)) as usize;
        let n = in_page.min(out.len() - got);
        let Some(pa) = gmem::translate(ram, mode, at) else {
            break;
        };
        let Some(src) = ram.slice(pa, n as u64) else {
            break;
        };
        out[got..got + n].copy_from_slice(src);
        got += n;
    }
    got
}

pub fn emulate<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, gpa: u64) -> Action {
    let mode = PagingMode {
        cr0: cx.vmcs.read(GuestNat::Cr0),
        cr3: cx.vmcs.read(GuestNat::Cr3),
        cr4: cx.vmcs.read(GuestNat::Cr4),
        efer: cx.vmcs.read(Guest64::Ia32Efer),
    };
    let code = CodeSize::of(cx.vmcs);
    let rip = cx.vmcs.read(GuestNat::Rip);
    // Linear addresses are 32 bits outside 64-bit code (SDM 3.4.4), so CS base + EIP wraps.
    let linear_mask = if code == CodeSize::Bits64 {
        u64::MAX
    } else {
        0xffff_ffff
    };
    let la = cx.vmcs.read(GuestNat::CsBase).wrapping_add(rip);
    let mut bytes = [0u8; 15];
    let got = fetch(&cx.guest.ram, &mode, la, linear_mask, &mut bytes);
    let Some(d) = decode(&bytes[..got], code) else {
        return Action::Stop(StopReason::Killed(format!(
            "MMIO access to {gpa:#x} by an instruction Keel does not emulate: {:02x?}",
            &bytes[..got.min(8)]
        )));
    };
    let now = cx.now;
    match d.op {
        MmioOp::Read {
            dst,
            size,
            dst_size,
        } => {
            let v = cx
                .guest
                .platform
                .mmio_read(gpa, size, now)
                .unwrap_or(u64::MAX)
                & size_mask(size);
            if let Operand::Reg { index, high_byte } = dst {
                if index == 4 && !high_byte {
                    let old = cx.vmcs.read(GuestNat::Rsp);
                    cx.vmcs
                        .write(GuestNat::Rsp, write_register(old, v, dst_size, false));
                } else {
                    let old = cx.guest.regs.get(index);
                    cx.guest
                        .regs
                        .set(index, write_register(old, v, dst_size, high_byte));
                }
            }
        }
        MmioOp::Write { src, size } => {
            let rsp = cx.vmcs.read(GuestNat::Rsp);
            let v = read_operand(&cx.guest.regs, rsp, src) & size_mask(size);
            cx.guest.platform.mmio_write(gpa, size, v, now);
        }
    }
    Action::AdvanceBy(d.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_moves_drivers_use() {
        // mov dword [rax+0xb0], ecx  (89 88 b0 00 00 00)
        let d = decode(&[0x89, 0x88, 0xb0, 0, 0, 0], CodeSize::Bits64).unwrap();
        assert_eq!(
            d,
            Decoded {
                op: MmioOp::Write {
                    src: Operand::Reg {
                        index: 1,
                        high_byte: false
                    },
                    size: 4
                },
                len: 6
            }
        );
        // mov eax, [rip+disp32]  (8b 05 xx xx xx xx)
        let d = decode(&[0x8b, 0x05, 1, 2, 3, 4], CodeSize::Bits64).unwrap();
        assert_eq!(d.len, 6);
        assert_eq!(
            d.op,
            MmioOp::Read {
                dst: Operand::Reg {
                    index: 0,
                    high_byte: false
                },
                size: 4,
                dst_size: 4
            }
        );
        // mov r9, [rdx]  (4c 8b 0a)
        let d = decode(&[0x4c, 0x8b, 0x0a], CodeSize::Bits64).unwrap();
        assert_eq!(
            d.op,
            MmioOp::Read {
                dst: Operand::Reg {
                    index: 9,
                    high_byte: false
                },
                size: 8,
                dst_size: 8
            }
        );
        // mov dword [rbx + rcx*4 + 0x10], 0x12345678  (c7 44 8b 10 78 56 34 12)
        let d = decode(
            &[0xc7, 0x44, 0x8b, 0x10, 0x78, 0x56, 0x34, 0x12],
            CodeSize::Bits64,
        )
        .unwrap();
        assert_eq!(
            d,
            Decoded {
                op: MmioOp::Write {
                    src: Operand::Imm(0x1234_5678),
                    size: 4
                },
                len: 8
            }
        );
        // movzx eax, byte [rsi]  (0f b6 06)
        let d = decode(&[0x0f, 0xb6, 0x06], CodeSize::Bits64).unwrap();
        assert_eq!(
            d.op,
            MmioOp::Read {
                dst: Operand::Reg {
                    index: 0,
                    high_byte: false
                },
                size: 1,
                dst_size: 4
            }
        );
        // 16-bit: mov ax, [0x1234] in real mode (8b 06 34 12)
        let d = decode(&[0x8b, 0x06, 0x34, 0x12], CodeSize::Bits16).unwrap();
        assert_eq!(
            (d.len, d.op),
            (
                4,
                MmioOp::Read {
                    dst: Operand::Reg {
                        index: 0,
                        high_byte: false
                    },
                    size: 2,
                    dst_size: 2
                }
            )
        );
        // mov ah, [ebx] in 32-bit code (8a 23)
        let d = decode(&[0x8a, 0x23], CodeSize::Bits32).unwrap();
        assert_eq!(
            d.op,
            MmioOp::Read {
                dst: Operand::Reg {
                    index: 0,
                    high_byte: true
                },
                size: 1,
                dst_size: 1
            }
        );
        // mov qword [rax], imm32 sign-extended (48 c7 00 ff ff ff ff)
        let d = decode(
            &[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff],
            CodeSize::Bits64,
        )
        .unwrap();
        assert_eq!(
            d.op,
            MmioOp::Write {
                src: Operand::Imm(u64::MAX),
                size: 8
            }
        );
    }

    #[test]
    fn decodes_moves_with_an_absolute_offset() {
        // mov eax, [0xfee00080] in 64-bit code: A1 + 8-byte offset.
        let mut b = alloc::vec![0xa1];
        b.extend_from_slice(&0xfee0_0080u64.to_le_bytes());
        let d = decode(&b, CodeSize::Bits64).unwrap();
        assert_eq!(
            d,
            Decoded {
                op: MmioOp::Read {
                    dst: Operand::Reg {
                        index: 0,
                        high_byte: false
                    },
                    size: 4,
                    dst_size: 4
                },
                len: 9
            }
        );
        // mov [0xfee000b0], eax with 0x67 in 64-bit code: 4-byte offset.
        let d = decode(&[0x67, 0xa3, 0xb0, 0, 0xe0, 0xfe], CodeSize::Bits64).unwrap();
        assert_eq!(
            d,
            Decoded {
                op: MmioOp::Write {
                    src: Operand::Reg {
                        index: 0,
                        high_byte: false
                    },
                    size: 4
                },
                len: 6
            }
        );
        // mov [moffs], rax with REX.W; mov al, [moffs16] in real mode.
        let mut b = alloc::vec![0x48, 0xa3];
        b.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            decode(&b, CodeSize::Bits64).unwrap().op,
            MmioOp::Write {
                src: Operand::Reg {
                    index: 0,
                    high_byte: false
                },
                size: 8
            }
        );
        assert_eq!(
            decode(&[0xa0, 0x34, 0x12], CodeSize::Bits16).unwrap().len,
            3
        );
        assert_eq!(
            decode(&[0xa1, 1, 2], CodeSize::Bits64),
            None,
            "truncated offset"
        );
    }

    /// (R/W, size, destination size, length), as [`shape`] gives it.
    type Shape = (char, u8, u8, u8);

    /// What a test compares: the access (R = read into a register, W = write), its size, the
    /// destination size of a read, and the instruction length.
    fn shape(d: Option<Decoded>) -> Option<Shape> {
        d.map(|d| match d.op {
            MmioOp::Read { size, dst_size, .. } => ('R', size, dst_size, d.len),
            MmioOp::Write { size, .. } => ('W', size, size, d.len),
        })
    }

    /// Operand and address size over the three code sizes and the 0x66/0x67/REX prefixes (SDM
    /// Vol. 1 3.6 Table 3-4, Vol. 2 2.2.1.2 and Table 2-1 for 16-bit ModRM), each row: code
    /// size, bytes, (R/W, size, destination size, length).
    #[test]
    fn operand_and_address_sizes_follow_the_code_size_and_prefixes() {
        use CodeSize::*;
        #[rustfmt::skip]
        let rows: &[(CodeSize, &[u8], Shape)] = &[
            // 16-bit code: 16-bit operands, 0x66 makes them 32-bit.
            (Bits16, &[0x89, 0x07], ('W', 2, 2, 2)),                       // mov [bx], ax
            (Bits16, &[0x66, 0x89, 0x07], ('W', 4, 4, 3)),                 // mov [bx], eax
            (Bits16, &[0x8b, 0x06, 0x34, 0x12], ('R', 2, 2, 4)),           // mov ax, [0x1234]
            (Bits16, &[0x66, 0x8b, 0x06, 0x34, 0x12], ('R', 4, 4, 5)),     // mov eax, [0x1234]
            (Bits16, &[0x8b, 0x04], ('R', 2, 2, 2)),                       // mov ax, [si]: no SIB
            (Bits16, &[0x8b, 0x44, 0x10], ('R', 2, 2, 3)),                 // [si+disp8]
            (Bits16, &[0x8b, 0x84, 0x10, 0x20], ('R', 2, 2, 4)),           // [si+disp16]
            (Bits16, &[0x8b, 0x46, 0x10], ('R', 2, 2, 3)),                 // [bp+disp8]
            (Bits16, &[0xc7, 0x06, 0x34, 0x12, 0x78, 0x56], ('W', 2, 2, 6)), // imm16
            (Bits16, &[0xc7, 0x87, 0x10, 0x20, 0x78, 0x56], ('W', 2, 2, 6)), // [bx+disp16], imm16
            (Bits16, &[0x66, 0xc7, 0x06, 0x34, 0x12, 1, 2, 3, 4], ('W', 4, 4, 9)), // imm32
            // 0x67 in 16-bit code: 32-bit addressing (SIB, disp32).
            (Bits16, &[0x67, 0x8b, 0x05, 1, 2, 3, 4], ('R', 2, 2, 7)),
            (Bits16, &[0x67, 0x8b, 0x04, 0x24], ('R', 2, 2, 4)),
            (Bits16, &[0x66, 0x67, 0xc7, 0x05, 0x80, 0, 0xe0, 0xfe, 1, 2, 3, 4], ('W', 4, 4, 12)),
            (Bits16, &[0x67, 0x66, 0x8b, 0x05, 0x80, 0, 0xe0, 0xfe], ('R', 4, 4, 8)),
            // moffs: an address-size offset.
            (Bits16, &[0xa1, 0x80, 0x00], ('R', 2, 2, 3)),
            (Bits16, &[0x66, 0xa1, 0x80, 0x00], ('R', 4, 4, 4)),
            (Bits16, &[0x67, 0xa1, 0x80, 0, 0xe0, 0xfe], ('R', 2, 2, 6)),
            (Bits16, &[0x66, 0x67, 0xa3, 0x80, 0, 0xe0, 0xfe], ('W', 4, 4, 7)),
            (Bits16, &[0xa2, 0x80, 0x00], ('W', 1, 1, 3)),
            // MOVZX: the destination takes the operand size.
            (Bits16, &[0x0f, 0xb7, 0x07], ('R', 2, 2, 3)),
            (Bits16, &[0x66, 0x0f, 0xb6, 0x07], ('R', 1, 4, 4)),
            // 32-bit code: 0x66 makes operands 16-bit, 0x67 addresses 16-bit.
            (Bits32, &[0x89, 0x07], ('W', 4, 4, 2)),
            (Bits32, &[0x66, 0x89, 0x07], ('W', 2, 2, 3)),
            (Bits32, &[0x8b, 0x05, 1, 2, 3, 4], ('R', 4, 4, 6)),
            (Bits32, &[0x67, 0x8b, 0x06, 0x34, 0x12], ('R', 4, 4, 5)),
            (Bits32, &[0x67, 0x8b, 0x04], ('R', 4, 4, 3)),
            (Bits32, &[0x66, 0xc7, 0x05, 1, 2, 3, 4, 0x78, 0x56], ('W', 2, 2, 9)),
            (Bits32, &[0xc7, 0x04, 0x24, 1, 2, 3, 4], ('W', 4, 4, 7)),
            (Bits32, &[0xa1, 0x80, 0, 0xe0, 0xfe], ('R', 4, 4, 5)),
            (Bits32, &[0x67, 0xa1, 0x80, 0x00], ('R', 4, 4, 4)),
            (Bits32, &[0x66, 0x67, 0xa3, 0x80, 0x00], ('W', 2, 2, 5)),
            // 64-bit code: REX.W wins over 0x66; 0x67 makes addresses 32-bit (same ModRM forms).
            (Bits64, &[0x89, 0x07], ('W', 4, 4, 2)),
            (Bits64, &[0x66, 0x89, 0x07], ('W', 2, 2, 3)),
            (Bits64, &[0x48, 0x89, 0x07], ('W', 8, 8, 3)),
            (Bits64, &[0x66, 0x48, 0x89, 0x07], ('W', 8, 8, 4)),
            // A REX followed by a legacy prefix is ignored (SDM Vol. 2 2.2.1).
            (Bits64, &[0x48, 0x66, 0x89, 0x07], ('W', 2, 2, 4)),
            (Bits64, &[0x67, 0x8b, 0x05, 1, 2, 3, 4], ('R', 4, 4, 7)),
            (Bits64, &[0x67, 0x8b, 0x04, 0x24], ('R', 4, 4, 4)),
            (Bits64, &[0x41, 0x8b, 0x04, 0x24], ('R', 4, 4, 4)),           // [r12]: SIB
            (Bits64, &[0x41, 0x8b, 0x45, 0x00], ('R', 4, 4, 4)),           // [r13+0]
            (Bits64, &[0x66, 0xc7, 0x00, 0x34, 0x12], ('W', 2, 2, 5)),
            (Bits64, &[0x48, 0xc7, 0x00, 1, 2, 3, 4], ('W', 8, 8, 7)),
            (Bits64, &[0xa1, 0x80, 0, 0xe0, 0xfe, 0, 0, 0, 0], ('R', 4, 4, 9)),
            (Bits64, &[0x67, 0xa1, 0x80, 0, 0xe0, 0xfe], ('R', 4, 4, 6)),
            (Bits64, &[0x66, 0xa1, 0x80, 0, 0xe0, 0xfe, 0, 0, 0, 0], ('R', 2, 2, 10)),
            (Bits64, &[0x48, 0x0f, 0xb7, 0x07], ('R', 2, 8, 4)),
        ];
        let mut wrong = alloc::vec::Vec::new();
        for &(code, bytes, want) in rows {
            let got = shape(decode(bytes, code));
            if got != Some(want) {
                wrong.push(alloc::format!(
                    "{code:?} {bytes:02x?}: {got:?}, want {want:?}"
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn immediates_follow_the_operand_size() {
        // 16-bit code, 0x66 0x67: mov dword [disp32], imm32 (the instruction).
        let d = decode(
            &[
                0x66, 0x67, 0xc7, 0x05, 0x80, 0, 0xe0, 0xfe, 0x78, 0x56, 0x34, 0x12,
            ],
            CodeSize::Bits16,
        );
        assert_eq!(
            d.map(|d| d.op),
            Some(MmioOp::Write {
                src: Operand::Imm(0x1234_5678),
                size: 4
            })
        );
        // 32-bit code, 0x66: imm16, not sign-extended.
        let d = decode(&[0x66, 0xc7, 0x00, 0xff, 0xff], CodeSize::Bits32);
        assert_eq!(
            d.map(|d| d.op),
            Some(MmioOp::Write {
                src: Operand::Imm(0xffff),
                size: 2
            })
        );
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert_eq!(
            decode(&[0x01, 0x00], CodeSize::Bits64),
            None,
            "ADD to memory"
        );
        assert_eq!(
            decode(&[0x89, 0xc0], CodeSize::Bits64),
            None,
            "register form"
        );
        assert_eq!(
            decode(&[0x89, 0x80, 0, 0], CodeSize::Bits64),
            None,
            "truncated displacement"
        );
        assert_eq!(decode(&[], CodeSize::Bits64), None);
    }

    #[test]
    fn fetch_walks_once_per_page_and_stops_at_a_hole() {
        let mem: &'static mut [u8] = alloc::vec![0u8; 0x10000].leak();
        // SAFETY: the leaked buffer belongs to this test alone.
        let mut ram = unsafe { crate::guest::GuestRam::new(mem, 0) };
        for (i, b) in ram.bytes()[0x1ff8..0x2010].iter_mut().enumerate() {
            *b = i as u8;
        }
        let off = PagingMode {
            cr0: 1,
            cr3: 0,
            cr4: 0,
            efer: 0,
        };
        let mut out = [0u8; 15];
        assert_eq!(
            fetch(&ram, &off, 0x1ffa, u64::MAX, &mut out),
            15,
            "crosses a page boundary"
        );
        assert_eq!(out[..3], [2, 3, 4]);
        assert_eq!(out[14], 16);
        assert_eq!(
            fetch(&ram, &off, 0xfffa, u64::MAX, &mut out),
            6,
            "stops where RAM ends"
        );
    }

    #[test]
    fn fetch_follows_the_page_tables_across_a_page_boundary() {
        let mem: &'static mut [u8] = alloc::vec![0u8; 0x10000].leak();
        // SAFETY: the leaked buffer belongs to this test alone.
        let mut ram = unsafe { crate::guest::GuestRam::new(mem, 0) };
        // 32-bit paging: PD 0x1000 -> PT 0x2000; linear page 0 -> 0x5000, page 1 -> 0x3000.
        ram.bytes()[0x1000..0x1004].copy_from_slice(&0x2003u32.to_le_bytes());
        ram.bytes()[0x2000..0x2004].copy_from_slice(&0x5003u32.to_le_bytes());
        ram.bytes()[0x2004..0x2008].copy_from_slice(&0x3003u32.to_le_bytes());
        ram.bytes()[0x5ffd..0x6000].copy_from_slice(&[0x66, 0x67, 0xc7]);
        ram.bytes()[0x3000..0x3009].copy_from_slice(&[0x05, 0x80, 0, 0xe0, 0xfe, 1, 2, 3, 4]);
        ram.bytes()[0x6000] = 0xcc; // the physically next byte, not the instruction's
        let paged = PagingMode {
            cr0: 0x8000_0001,
            cr3: 0x1000,
            cr4: 0,
            efer: 0,
        };
        let mut out = [0u8; 15];
        assert_eq!(fetch(&ram, &paged, 0xffd, 0xffff_ffff, &mut out), 15);
        assert_eq!(
            decode(&out, CodeSize::Bits16).map(|d| d.len),
            Some(12),
            "{out:02x?}"
        );
    }

    #[test]
    fn register_merge_rules() {
        assert_eq!(
            write_register(0xffff_ffff_ffff_ffff, 0x12, 1, false),
            0xffff_ffff_ffff_ff12
        );
        assert_eq!(
            write_register(0xffff_ffff_ffff_ffff, 0x12, 1, true),
            0xffff_ffff_ffff_12ff
        );
        assert_eq!(
            write_register(0xffff_ffff_ffff_ffff, 0x1234, 4, false),
            0x1234
        );
    }
}
