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
use crate::vmx::{Guest32, Guest64, GuestNat, Segment, Vmcs};
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

/// Where the instruction's memory operand is: segment and effective address (SDM Vol. 1 3.7.5,
/// Vol. 2 2.1.5). Registers by number (REX-extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// The segment: an override prefix, else SS for an rSP or rBP base, else DS (SDM Vol. 1
    /// 3.7.4).
    pub segment: Segment,
    pub base: Option<u8>,
    /// Index register and scale factor (1, 2, 4 or 8).
    pub index: Option<(u8, u8)>,
    /// The displacement or moffs offset, sign-extended from its width (a moffs offset is not
    /// signed, but it has the address size, so the sum is masked to it anyway).
    pub disp: u64,
    /// RIP-relative (64-bit code, ModRM 00 101): the displacement counts from the next
    /// instruction.
    pub rip_relative: bool,
    /// Address size in bytes: 2, 4 or 8.
    pub addr_bytes: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    pub op: MmioOp,
    pub len: u8,
    pub mem: MemOperand,
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

/// The form nearly every MMIO access of a driver takes, decoded straight (about 30 instructions
/// where [`decode`]'s general way takes 175, measured): MOV r/m, r or MOV r, r/m of the default
/// width (0x89, 0x8B; SDM Vol. 2B, MOV) in 32- or 64-bit code, with no prefix but a REX, and a
/// memory operand of a base register alone with no displacement, a disp8 or a disp32 (Vol. 2
/// Table 2-2: ModRM mod 00-10, r/m not 100 (SIB) nor mod 00 r/m 101 (disp32 alone, RIP-relative
/// in 64-bit code)). `decode` gives the same for these bytes (a unit test compares the two over
/// random instructions); None for every other form, which `decode` then takes its general way.
#[inline]
fn decode_plain_mov(bytes: &[u8], code: CodeSize) -> Option<Decoded> {
    let (rex, at) = match (code, *bytes.first()?) {
        (CodeSize::Bits16, _) => return None,
        (CodeSize::Bits64, b @ 0x40..=0x4f) => (b, 1),
        _ => (0, 0),
    };
    let opcode = *bytes.get(at)?;
    let modrm = *bytes.get(at + 1)?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if !(opcode == 0x89 || opcode == 0x8b) || md == 3 || rm == 4 || (md == 0 && rm == 5) {
        return None;
    }
    let at = at + 2;
    let (disp, disp_len) = match md {
        0 => (0, 0),
        1 => (*bytes.get(at)? as i8 as u64, 1),
        _ => (
            i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as u64,
            4,
        ),
    };
    // REX.B extends the base, REX.R the register (Vol. 2 2.2.1.2); an rBP base defaults to SS
    // (Vol. 1 3.7.4; r/m 100, which would be rSP, takes a SIB and is not this form).
    let base = rm | (rex & 1) << 3;
    let reg = Operand::Reg {
        index: (modrm >> 3) & 7 | (rex & 4) << 1,
        high_byte: false,
    };
    let size = if rex & 8 != 0 { 8 } else { 4 };
    let op = if opcode == 0x89 {
        MmioOp::Write { src: reg, size }
    } else {
        MmioOp::Read {
            dst: reg,
            size,
            dst_size: size,
        }
    };
    Some(Decoded {
        op,
        len: (at + disp_len) as u8,
        mem: MemOperand {
            segment: if base == 5 { Segment::Ss } else { Segment::Ds },
            base: Some(base),
            index: None,
            disp,
            rip_relative: false,
            addr_bytes: if code == CodeSize::Bits64 { 8 } else { 4 },
        },
    })
}

/// Decodes one instruction of `code`-sized code.
///
/// Operand size (SDM Vol. 1 3.6, Table 3-4; Vol. 2 2.2.1.2): 16 in 16-bit code and 32 in 32- and
/// 64-bit code by default, 0x66 switches between 16 and 32, REX.W makes it 64 whatever 0x66
/// says. Address size: 16, 32 or 64 by default, 0x67 switches 16 <-> 32 outside 64-bit code and
/// 64 -> 32 in it. The address size picks the ModRM forms (16-bit: Vol. 2 Table 2-1, no SIB,
/// disp16; 32/64-bit: Table 2-2/2-3 with SIB and disp32) and the width of a moffs offset.
#[inline]
pub fn decode(bytes: &[u8], code: CodeSize) -> Option<Decoded> {
    decode_plain_mov(bytes, code).or_else(|| decode_general(bytes, code))
}

/// [`decode`]'s general way: every form it knows.
fn decode_general(bytes: &[u8], code: CodeSize) -> Option<Decoded> {
    let long = code == CodeSize::Bits64;
    let mut i = 0;
    let mut opsize_prefix = false;
    let mut addr_prefix = false;
    let mut rex = 0u8;
    let mut segment = None;
    loop {
        let b = *bytes.get(i)?;
        match b {
            0x66 => opsize_prefix = true,
            0x67 => addr_prefix = true,
            0x26 => segment = Some(Segment::Es),
            0x2e => segment = Some(Segment::Cs),
            0x36 => segment = Some(Segment::Ss),
            0x3e => segment = Some(Segment::Ds),
            0x64 => segment = Some(Segment::Fs),
            0x65 => segment = Some(Segment::Gs),
            0xf2 | 0xf3 => {}
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
    let rex_x = (rex & 2) << 2;
    let rex_b = (rex & 1) << 3;
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
    let le = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at + n)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    // A displacement of `n` bytes at `at`, sign-extended.
    let disp = |at: usize, n: usize| -> Option<u64> {
        let shift = 64 - 8 * n as u32;
        Some((((le(at, n)? << shift) as i64) >> shift) as u64)
    };
    let mut mem = MemOperand {
        segment: Segment::Ds,
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        addr_bytes: addr_bytes as u8,
    };
    // MOV AL/eAX <-> moffs (A0-A3): no ModRM, an absolute offset of the address size follows
    // (SDM Vol. 2B, MOV).
    if (0xa0..=0xa3).contains(&opcode) {
        let len = i + addr_bytes;
        if len > 15 || len > bytes.len() {
            return None;
        }
        mem.disp = le(i, addr_bytes)?;
        mem.segment = segment.unwrap_or(Segment::Ds);
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
        return Some(Decoded {
            op,
            len: len as u8,
            mem,
        });
    }
    let modrm = *bytes.get(i)?;
    i += 1;
    let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | rex_r, modrm & 7);
    if md == 3 {
        return None; // a register operand cannot fault on MMIO
    }
    // Addressing bytes: SIB and displacement (SDM Vol. 2, 2.1.5 Tables 2-1 to 2-3). REX.B
    // extends the base register but not which forms take a SIB or a displacement.
    const BX: u8 = 3;
    const SP: u8 = 4;
    const BP: u8 = 5;
    const SI: u8 = 6;
    const DI: u8 = 7;
    let disp_len = if addr_bytes == 2 {
        // Table 2-1: [BX+SI], [BX+DI], [BP+SI], [BP+DI], [SI], [DI], [BP] (disp16 alone with
        // mod 00), [BX].
        let (base, index) = match rm {
            0 => (Some(BX), Some(SI)),
            1 => (Some(BX), Some(DI)),
            2 => (Some(BP), Some(SI)),
            3 => (Some(BP), Some(DI)),
            4 => (Some(SI), None),
            5 => (Some(DI), None),
            6 if md == 0 => (None, None),
            6 => (Some(BP), None),
            _ => (Some(BX), None),
        };
        mem.base = base;
        mem.index = index.map(|r| (r, 1));
        match md {
            0 if rm == 6 => 2,
            1 => 1,
            2 => 2,
            _ => 0,
        }
    } else {
        let mut n = match md {
            0 if rm == 5 => 4,
            1 => 1,
            2 => 4,
            _ => 0,
        };
        if rm == 4 {
            let sib = *bytes.get(i)?;
            i += 1;
            let (scale, index, base) = (1 << (sib >> 6), ((sib >> 3) & 7) | rex_x, sib & 7);
            if index != SP {
                mem.index = Some((index, scale));
            }
            if md == 0 && base == BP {
                n = 4; // no base, disp32
            } else {
                mem.base = Some(base | rex_b);
            }
        } else if md == 0 && rm == 5 {
            // disp32 alone outside 64-bit code, RIP-relative in it (Table 2-7).
            mem.rip_relative = long;
        } else {
            mem.base = Some(rm | rex_b);
        }
        n
    };
    mem.disp = if disp_len > 0 { disp(i, disp_len)? } else { 0 };
    i += disp_len;
    // SS is the default segment for an rSP or rBP base (SDM Vol. 1 3.7.4; REX.B makes it R12 or
    // R13, whose default is DS, which no matter in 64-bit code).
    let stack_based = matches!(mem.base, Some(SP | BP));
    mem.segment = segment.unwrap_or(if stack_based {
        Segment::Ss
    } else {
        Segment::Ds
    });
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
                src: Operand::Imm(le(i, 1)?),
                size: 1,
            },
            1,
        ),
        0xc7 if reg & 7 == 0 => {
            let n = if wide == 2 { 2 } else { 4 };
            let mut v = le(i, n)?;
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
    Some(Decoded {
        op,
        len: len as u8,
        mem,
    })
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

/// The linear address of a decoded memory operand (SDM Vol. 1 3.7.5: base + index * scale +
/// displacement, truncated to the address size; RIP-relative from the next instruction; Vol. 3A
/// 3.4.4: plus the segment's base, of which 64-bit code uses only FS and GS; linear addresses
/// are 32 bits outside 64-bit code).
fn operand_linear_address<V: Vmcs + ?Sized>(
    vmcs: &V,
    regs: &GuestRegs,
    d: &Decoded,
    code: CodeSize,
    rip: u64,
) -> u64 {
    let m = &d.mem;
    let reg = |r: u8| {
        if r == 4 {
            vmcs.read(GuestNat::Rsp)
        } else {
            regs.get(r)
        }
    };
    let mut ea = m.disp;
    if let Some(b) = m.base {
        ea = ea.wrapping_add(reg(b));
    }
    if let Some((x, scale)) = m.index {
        ea = ea.wrapping_add(reg(x).wrapping_mul(u64::from(scale)));
    }
    if m.rip_relative {
        ea = ea.wrapping_add(rip.wrapping_add(u64::from(d.len)));
    }
    let ea = ea & size_mask(m.addr_bytes);
    let base = match (code, m.segment) {
        (CodeSize::Bits64, Segment::Fs | Segment::Gs)
        | (CodeSize::Bits16 | CodeSize::Bits32, _) => vmcs.read(m.segment.base()),
        (CodeSize::Bits64, _) => 0,
    };
    let la = base.wrapping_add(ea);
    if code == CodeSize::Bits64 {
        la
    } else {
        la & 0xffff_ffff
    }
}

/// The longest x86 instruction, in bytes (SDM Vol. 2A 2.3.11).
const MAX_INSTRUCTION: usize = 15;

/// Reads up to [`MAX_INSTRUCTION`] instruction bytes at guest-linear `la`, one page walk per
/// page touched (an instruction may straddle two pages that are not physically adjacent); stops
/// early at a page that is not mapped. Returns how many bytes were read.
fn fetch(
    ram: &crate::guest::GuestRam,
    mode: &PagingMode,
    la: u64,
    linear_mask: u64,
    out: &mut [u8; MAX_INSTRUCTION],
) -> usize {
    let start = la & linear_mask;
    // All of it on one page (the usual case): one walk, one read.
    if 4096 - (start & 0xfff) >= MAX_INSTRUCTION as u64 {
        if let Some(bytes) = gmem::translate(ram, mode, start).and_then(|pa| ram.read_array(pa)) {
            *out = bytes;
            return MAX_INSTRUCTION;
        }
    }
    let mut got = 0;
    while got < out.len() {
        let at = la.wrapping_add(got as u64) & linear_mask;
        let in_page = (4096 - (at & 0xfff)) as usize;
        let n = in_page.min(out.len() - got);
        let Some(pa) = gmem::translate(ram, mode, at) else {
            break;
        };
        if ram.read(pa, &mut out[got..got + n]).is_none() {
            break;
        }
        got += n;
    }
    got
}

/// Emulates the access at RIP, which the CPU reported at guest-physical `gpa` (the first byte it
/// touched on the device page).
pub fn emulate<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, gpa: u64) -> Action {
    emulate_at::<false, V>(cx, Reported::Exact(gpa), false)
}

/// [`emulate`] for the tight loop's quiet way (`exits::fast::handle_apic`): the access, a store
/// if `store` (as the CPU reported it), made by the vCPU's local APIC alone
/// (`Platform::apic_access_alone`), which the caller found quiet for it
/// (`Platform::apic_access_quiet`). Every check of [`emulate`] is made first. Anything but
/// [`Action::AdvanceBy`] means nothing was done: a reason to stop the guest, or
/// [`Action::Resume`] for an instruction whose access goes the other way than the CPU reported
/// (not the one that faulted), which the general dispatch then handles.
pub fn emulate_alone<V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    gpa: u64,
    store: bool,
) -> Action {
    emulate_at::<true, V>(cx, Reported::Exact(gpa), store)
}

/// Emulates the access at RIP, which the CPU reported at `next_page` (a page start): with APIC
/// virtualization the xAPIC page is mapped (to the APIC-access page), so an access that starts
/// on it and runs past its end faults on the page after it first (EPT violations come before
/// APIC-access exits, SDM 30.4.1). Such an access goes to the device whole, at its own start,
/// as when the device page was unmapped; any other access there is not a device's.
pub fn emulate_spill<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, next_page: u64) -> Action {
    emulate_at::<false, V>(cx, Reported::SpilledInto(next_page), false)
}

/// Where the CPU said the access was.
#[derive(Clone, Copy)]
enum Reported {
    Exact(u64),
    SpilledInto(u64),
}

/// The emulation; `ALONE` for [`emulate_alone`] (`store` then the direction reported).
// One body for both ways, made twice by the compiler and inlined into each caller: cut into a
// decode returned and an access made after it, it cost every general MMIO exit about 45
// instructions (docs/BENCHMARKS.md, "The quiet APIC accesses").
#[inline(always)]
fn emulate_at<const ALONE: bool, V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    reported: Reported,
    store: bool,
) -> Action {
    let (Reported::Exact(gpa) | Reported::SpilledInto(gpa)) = reported;
    // The CPU has fetched the instruction through these page tables, so their entries have no
    // reserved bits: no need to ask CPUID for MAXPHYADDR (52 checks none).
    let mode = PagingMode::of(cx.vmcs, 52);
    let code = CodeSize::of(cx.vmcs);
    let rip = cx.vmcs.read(GuestNat::Rip);
    // Linear addresses are 32 bits outside 64-bit code (SDM 3.4.4), so CS base + EIP wraps.
    let linear_mask = if code == CodeSize::Bits64 {
        u64::MAX
    } else {
        0xffff_ffff
    };
    let la = cx.vmcs.read(GuestNat::CsBase).wrapping_add(rip);
    let mut bytes = [0u8; MAX_INSTRUCTION];
    let got = fetch(&cx.vm.ram, &mode, la, linear_mask, &mut bytes);
    let Some(d) = decode(&bytes[..got], code) else {
        return Action::Stop(StopReason::Killed(format!(
            "MMIO access to {gpa:#x} by an instruction Keel does not emulate: {:02x?}",
            &bytes[..got.min(8)]
        )));
    };
    // SDM 28.2.4 gives the guest-physical address of the access, not its size or where it
    // started: recompute the operand's linear address and check that the access starts at the
    // reported page offset. Otherwise the bytes at RIP are not the instruction that faulted, or
    // the access straddles into the device page from the page below (the EPT violation then
    // names the device page's first byte, and emulating the access whole there would put the
    // wrong bytes into the device and lose those for the page below). An access that starts on
    // the device page and runs past its end goes to the device whole, which ignores the bytes
    // beyond its registers (the `apic` hostile attack reads across the APIC page's end).
    let operand_la = operand_linear_address(cx.vmcs, &cx.vcpu.regs, &d, code, rip);
    let gpa = match reported {
        Reported::Exact(_) => gpa,
        Reported::SpilledInto(next) => {
            let size = match d.op {
                MmioOp::Read { size, .. } | MmioOp::Write { size, .. } => u64::from(size),
            };
            let start = operand_la & 0xfff;
            if start + size <= 0x1000 {
                return Action::Stop(StopReason::BadMemoryAccess {
                    gpa: next,
                    write: matches!(d.op, MmioOp::Write { .. }),
                });
            }
            next - 0x1000 + start
        }
    };
    if operand_la & 0xfff != gpa & 0xfff {
        let size = match d.op {
            MmioOp::Read { size, .. } | MmioOp::Write { size, .. } => u64::from(size),
        };
        let code_bytes = &bytes[..d.len as usize];
        // Crossing into the device page is the guest's doing; any other mismatch means Keel
        // decoded the instruction wrongly, and says so.
        let why = if (operand_la & 0xfff) + size > 0x1000 && gpa & 0xfff == 0 {
            format!(
                "by an instruction Keel does not emulate: {size} bytes at linear {operand_la:#x} \
                 cross a page boundary into the device page, which Keel does not split: \
                 {code_bytes:02x?}"
            )
        } else {
            format!(
                "not emulated: Keel decoded the instruction at RIP ({code_bytes:02x?}) as an \
                 access at linear {operand_la:#x}, which does not match (a Keel bug)"
            )
        };
        return Action::Stop(StopReason::Killed(format!("MMIO access to {gpa:#x} {why}")));
    }
    if ALONE && matches!(d.op, MmioOp::Write { .. }) != store {
        return Action::Resume;
    }
    let now = cx.now;
    match d.op {
        MmioOp::Read {
            dst,
            size,
            dst_size,
        } => {
            let platform = &mut cx.vm.platform;
            let cpu = cx.vcpu.index;
            let v = if ALONE {
                platform.apic_access_alone(cpu, gpa, size, None, now)
            } else {
                platform.mmio_read(cpu, gpa, size, now).unwrap_or(u64::MAX)
            } & size_mask(size);
            if let Operand::Reg { index, high_byte } = dst {
                if index == 4 && !high_byte {
                    let old = cx.vmcs.read(GuestNat::Rsp);
                    cx.vmcs
                        .write(GuestNat::Rsp, write_register(old, v, dst_size, false));
                } else {
                    let old = cx.vcpu.regs.get(index);
                    cx.vcpu
                        .regs
                        .set(index, write_register(old, v, dst_size, high_byte));
                }
            }
        }
        MmioOp::Write { src, size } => {
            let rsp = cx.vmcs.read(GuestNat::Rsp);
            let v = read_operand(&cx.vcpu.regs, rsp, src) & size_mask(size);
            let cpu = cx.vcpu.index;
            if ALONE {
                cx.vm
                    .platform
                    .apic_access_alone(cpu, gpa, size, Some(v), now);
            } else {
                cx.vm.platform.mmio_write(cpu, gpa, size, v, now);
            }
        }
    }
    // SDM 17.2.4: a data breakpoint on the operand traps after the instruction, as when the CPU
    // makes the access itself (17.3.1.2: data breakpoints are traps).
    let (size, write) = match d.op {
        MmioOp::Read { size, .. } => (size, false),
        MmioOp::Write { size, .. } => (size, true),
    };
    let met = crate::exits::debug::Breakpoints::of(cx).data(operand_la, u64::from(size), write);
    crate::exits::debug::queue_trap(cx.vmcs, met);
    Action::AdvanceBy(d.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain MOV's straight decode ([`decode_plain_mov`]) against the general one, over
    /// random instructions of every code size whose first bytes are drawn from prefixes, REX,
    /// the MOV opcodes and their neighbours, and every ModRM and SIB: wherever the straight
    /// decode answers, the general one answers the same; and it answers for each of its forms.
    #[test]
    fn the_plain_mov_decodes_as_the_general_decoder() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let firsts = [
            0x40, 0x41, 0x44, 0x48, 0x49, 0x4c, 0x4f, 0x66, 0x67, 0x65, 0xf0, 0x88, 0x89, 0x8a,
            0x8b, 0xc7, 0x0f,
        ];
        let mut answered = [0usize; 3];
        for _ in 0..200_000 {
            let code =
                [CodeSize::Bits16, CodeSize::Bits32, CodeSize::Bits64][(next() % 3) as usize];
            let mut bytes = [0u8; 15];
            for b in bytes.iter_mut() {
                *b = next() as u8;
            }
            let n = (next() % 3) as usize;
            for b in bytes.iter_mut().take(n) {
                *b = firsts[(next() % firsts.len() as u64) as usize];
            }
            if next() % 2 == 0 {
                bytes[n] = [0x89, 0x8b][(next() % 2) as usize];
            }
            let len = 1 + (next() % 15) as usize;
            let bytes = &bytes[..len];
            if let Some(d) = decode_plain_mov(bytes, code) {
                assert_eq!(
                    decode_general(bytes, code),
                    Some(d),
                    "{bytes:02x?} in {code:?}"
                );
                answered[(d.mem.disp != 0) as usize + (d.len > 4) as usize] += 1;
            }
        }
        assert!(answered.iter().all(|&n| n > 1000), "{answered:?}");
    }

    #[test]
    fn decodes_the_moves_drivers_use() {
        // mov dword [rax+0xb0], ecx  (89 88 b0 00 00 00)
        let d = decode(&[0x89, 0x88, 0xb0, 0, 0, 0], CodeSize::Bits64).unwrap();
        assert_eq!(
            (d.op, d.len),
            (
                MmioOp::Write {
                    src: Operand::Reg {
                        index: 1,
                        high_byte: false
                    },
                    size: 4
                },
                6
            )
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
            (d.op, d.len),
            (
                MmioOp::Write {
                    src: Operand::Imm(0x1234_5678),
                    size: 4
                },
                8
            )
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
            (d.op, d.len),
            (
                MmioOp::Read {
                    dst: Operand::Reg {
                        index: 0,
                        high_byte: false
                    },
                    size: 4,
                    dst_size: 4
                },
                9
            )
        );
        // mov [0xfee000b0], eax with 0x67 in 64-bit code: 4-byte offset.
        let d = decode(&[0x67, 0xa3, 0xb0, 0, 0xe0, 0xfe], CodeSize::Bits64).unwrap();
        assert_eq!(
            (d.op, d.len),
            (
                MmioOp::Write {
                    src: Operand::Reg {
                        index: 0,
                        high_byte: false
                    },
                    size: 4
                },
                6
            )
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

    /// The operand's linear address over addressing forms, segments and address sizes (SDM Vol. 2
    /// Tables 2-1 to 2-3, Vol. 1 3.7.4 default segments). Each row: code size, bytes, linear
    /// address, with RAX 0x1000, RCX 2, RBX 0x3000, RSP 0x7000, RBP 0x5000, RSI 0x10, RDI 0x20,
    /// R12 0xc000, R13 0xd000, RIP 0x400; DS based at 0x10_0000, SS at 0x20_0000, FS at
    /// 0x30_0000, ES at 0x40_0000.
    #[test]
    fn operands_are_found_at_their_linear_address() {
        use crate::vmx::FakeVmcs;
        use CodeSize::*;
        let mut v = FakeVmcs::new();
        v.write(GuestNat::Rsp, 0x7000);
        for (seg, base) in [
            (Segment::Ds, 0x10_0000),
            (Segment::Ss, 0x20_0000),
            (Segment::Fs, 0x30_0000),
            (Segment::Es, 0x40_0000),
        ] {
            v.write(seg.base(), base);
        }
        let regs = GuestRegs {
            rax: 0x1000,
            rcx: 2,
            rbx: 0x3000,
            rbp: 0x5000,
            rsi: 0x10,
            rdi: 0x20,
            r12: 0xc000,
            r13: 0xd000,
            ..GuestRegs::default()
        };
        #[rustfmt::skip]
        let rows: &[(CodeSize, &[u8], u64)] = &[
            (Bits16, &[0x8b, 0x00], 0x10_3010),                      // [bx+si]
            (Bits16, &[0x8b, 0x42, 0x08], 0x20_5018),                // [bp+si+8]: SS
            (Bits16, &[0x8b, 0x46, 0xfe], 0x20_4ffe),                // [bp-2]: SS
            (Bits16, &[0x8b, 0x06, 0x34, 0x12], 0x10_1234),          // [0x1234]
            (Bits16, &[0x8b, 0x87, 0xff, 0xff], 0x10_2fff),          // [bx-1] (disp16)
            (Bits16, &[0x26, 0x8b, 0x05], 0x40_0020),                // es:[di]
            (Bits16, &[0x8b, 0x85, 0xf0, 0xff], 0x10_0010),          // [di-0x10]
            (Bits16, &[0x67, 0x8b, 0x44, 0x8b, 0x10], 0x10_3018),    // [ebx+ecx*4+0x10]
            (Bits32, &[0x8b, 0x44, 0x24, 0x04], 0x20_7004),          // [esp+4]: SS
            (Bits32, &[0x8b, 0x04, 0x8d, 0, 1, 0, 0], 0x10_0108),    // [ecx*4+0x100]
            (Bits32, &[0x8b, 0x05, 0x80, 0, 0xe0, 0xfe], 0xfef0_0080), // DS + disp32
            (Bits32, &[0x64, 0xa1, 0x80, 0, 0, 0], 0x30_0080),        // fs:moffs32
            (Bits32, &[0x67, 0x8b, 0x47, 0xf0], 0x10_2ff0),           // [bx-0x10], 16-bit
            (Bits64, &[0x8b, 0x05, 0x10, 0, 0, 0], 0x416),            // [rip+0x10]
            (Bits64, &[0x41, 0x8b, 0x04, 0x24], 0xc000),              // [r12]: no segment base
            (Bits64, &[0x41, 0x8b, 0x45, 0x08], 0xd008),              // [r13+8]
            (Bits64, &[0x42, 0x8b, 0x04, 0x20], 0x1000 + 0xc000),     // [rax+r12]
            (Bits64, &[0x64, 0x8b, 0x03], 0x30_3000),                 // fs:[rbx]
            (Bits64, &[0x8b, 0x44, 0x24, 0xf8], 0x6ff8),              // [rsp-8]
            (Bits64, &[0x67, 0x8b, 0x43, 0xff], 0x2fff),              // [ebx-1]
        ];
        let mut wrong = alloc::vec::Vec::new();
        for &(code, bytes, want) in rows {
            let got =
                decode(bytes, code).map(|d| operand_linear_address(&v, &regs, &d, code, 0x400));
            if got != Some(want) {
                wrong.push(alloc::format!(
                    "{code:?} {bytes:02x?}: {got:x?}, want {want:#x}"
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
            maxphyaddr: 40,
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
            maxphyaddr: 40,
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
