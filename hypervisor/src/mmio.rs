//! Emulation of the guest instruction that touched a device's MMIO page.
//!
//! An EPT violation says which guest-physical address was accessed but not the data or the size
//! (and, not being instruction-caused, gives no instruction length: SDM 28.2.4), so Keel fetches
//! the instruction at CS:RIP through the guest's page tables and decodes it. Device drivers reach
//! registers with plain moves, so the decoder handles the MOV family (88, 89, 8A, 8B, C6, C7,
//! A0-A3 with an absolute offset, 0F B6/B7 MOVZX) with every prefix, ModRM, SIB and displacement form; anything else stops the
//! guest with the bytes in the message rather than guessing.

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

/// Decodes one instruction. `long` = 64-bit code; `default32` = CS.D (32-bit default operand and
/// address size outside long mode).
pub fn decode(bytes: &[u8], long: bool, default32: bool) -> Option<Decoded> {
    let mut i = 0;
    let mut opsize16 = false;
    let mut addr_override = false;
    let mut rex = 0u8;
    loop {
        match *bytes.get(i)? {
            0x66 => opsize16 = true,
            0x67 => addr_override = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0xf2 | 0xf3 => {}
            b @ 0x40..=0x4f if long => {
                rex = b;
                i += 1;
                break;
            }
            _ => break,
        }
        i += 1;
    }
    let rex_w = rex & 8 != 0;
    let rex_r = (rex & 4) << 1;
    let wide = if rex_w {
        8
    } else if opsize16 {
        2
    } else if long || default32 {
        4
    } else {
        2
    };
    let addr32 = if long {
        true
    } else {
        default32 != addr_override
    };
    let mut opcode = *bytes.get(i)? as u16;
    i += 1;
    if opcode == 0x0f {
        opcode = 0x0f00 | *bytes.get(i)? as u16;
        i += 1;
    }
    // MOV AL/eAX <-> moffs (A0-A3): no ModRM, an absolute offset of the address size follows
    // (SDM Vol. 2B, MOV: 8 bytes in 64-bit mode, 4 with a 0x67 prefix there or in 32-bit code).
    if (0xa0..=0xa3).contains(&opcode) {
        let offset_len = if long {
            if addr_override {
                4
            } else {
                8
            }
        } else if addr32 {
            4
        } else {
            2
        };
        let len = i + offset_len;
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
    // Addressing bytes: SIB and displacement (SDM Vol. 2, 2.1.5 tables 2-1/2-2).
    if addr32 {
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
    } else {
        i += match md {
            0 if rm == 6 => 2,
            1 => 1,
            2 => 2,
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
/// touched; stops early at a page that is not mapped. Returns how many bytes were read.
fn fetch(ram: &crate::guest::GuestRam, mode: &PagingMode, la: u64, out: &mut [u8]) -> usize {
    let mut got = 0;
    while got < out.len() {
        let at = la.wrapping_add(got as u64);
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
    let cs_ar = cx.vmcs.read(Guest32::CsAccessRights);
    let long = cs_ar & (1 << 13) != 0;
    let default32 = cs_ar & (1 << 14) != 0;
    let rip = cx.vmcs.read(GuestNat::Rip);
    let la = cx.vmcs.read(GuestNat::CsBase).wrapping_add(rip);
    let mut bytes = [0u8; 15];
    let got = fetch(&cx.guest.ram, &mode, la, &mut bytes);
    let Some(d) = decode(&bytes[..got], long, default32) else {
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
        let d = decode(&[0x89, 0x88, 0xb0, 0, 0, 0], true, false).unwrap();
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
        let d = decode(&[0x8b, 0x05, 1, 2, 3, 4], true, false).unwrap();
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
        let d = decode(&[0x4c, 0x8b, 0x0a], true, false).unwrap();
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
            true,
            false,
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
        let d = decode(&[0x0f, 0xb6, 0x06], true, false).unwrap();
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
        let d = decode(&[0x8b, 0x06, 0x34, 0x12], false, false).unwrap();
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
        let d = decode(&[0x8a, 0x23], false, true).unwrap();
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
        let d = decode(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff], true, false).unwrap();
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
        let d = decode(&b, true, false).unwrap();
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
        let d = decode(&[0x67, 0xa3, 0xb0, 0, 0xe0, 0xfe], true, false).unwrap();
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
            decode(&b, true, false).unwrap().op,
            MmioOp::Write {
                src: Operand::Reg {
                    index: 0,
                    high_byte: false
                },
                size: 8
            }
        );
        assert_eq!(decode(&[0xa0, 0x34, 0x12], false, false).unwrap().len, 3);
        assert_eq!(decode(&[0xa1, 1, 2], true, false), None, "truncated offset");
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert_eq!(decode(&[0x01, 0x00], true, false), None, "ADD to memory");
        assert_eq!(decode(&[0x89, 0xc0], true, false), None, "register form");
        assert_eq!(
            decode(&[0x89, 0x80, 0, 0], true, false),
            None,
            "truncated displacement"
        );
        assert_eq!(decode(&[], true, false), None);
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
            fetch(&ram, &off, 0x1ffa, &mut out),
            15,
            "crosses a page boundary"
        );
        assert_eq!(out[..3], [2, 3, 4]);
        assert_eq!(out[14], 16);
        assert_eq!(
            fetch(&ram, &off, 0xfffa, &mut out),
            6,
            "stops where RAM ends"
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
