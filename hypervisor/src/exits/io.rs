//! IN/OUT and INS/OUTS (with REP), all sizes, through the guest's port bus.
//!
//! Keel intercepts every port (the I/O bitmaps are all ones). A port no device claims reads as
//! all-ones and drops writes, like an empty ISA bus, and is counted in the guest's statistics.

use super::{debug, Action, Exception, ExitContext};
use crate::gmem::{self, AccessKind, PagingMode};
use crate::guest::StopReason;
use crate::vmx::{
    Guest32, GuestNat, IoDirection, IoQualification, ReadOnly32, ReadOnlyNat, Segment, Vmcs,
};
use alloc::format;

/// Most string elements moved per exit; the instruction re-executes for the rest, which keeps
/// Keel's time in one exit bounded and lets interrupts in between.
pub const STRING_CHUNK: u64 = 256;

fn port_in<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, port: u16, size: u8) -> u32 {
    match cx.vm.platform.io_read(port, size, cx.now) {
        Some(v) => v,
        None => {
            cx.vcpu.stats.unclaimed_port_accesses += 1;
            u32::MAX
        }
    }
}

fn port_out<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, port: u16, size: u8, value: u32) {
    if !cx.vm.platform.io_write(port, size, value, cx.now) {
        cx.vcpu.stats.unclaimed_port_accesses += 1;
    }
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let raw = cx.vmcs.read(ReadOnlyNat::ExitQualification);
    let Some(q) = IoQualification::decode(raw) else {
        return Action::Stop(StopReason::Killed(format!(
            "undecodable I/O exit qualification {raw:#x}"
        )));
    };
    let (port, size) = (q.port, q.size);
    // The guest's I/O breakpoints this access meets (SDM 17.2.4): a #DB trap is owed once the
    // access is done; a repeated INS/OUTS takes it after its first element (SDM 17.3.1.2).
    let watch = debug::Breakpoints::of(cx);
    let breakpoints = watch.io(port, size);
    let index = if q.direction == IoDirection::In { 7 } else { 6 };
    let index_before = cx.vcpu.regs.get(index);
    let action = if q.string {
        let budget = if breakpoints != 0 { 1 } else { STRING_CHUNK };
        string(cx, &q, budget, &watch)
    } else {
        in_or_out(cx, port, size, q.direction)
    };
    if let Some(stop) = debug_exit(cx) {
        return stop;
    }
    // IN/OUT always access the port; INS/OUTS did if an element moved its index register.
    if !q.string || cx.vcpu.regs.get(index) != index_before {
        debug::queue_trap(cx.vmcs, breakpoints);
    }
    action
}

/// An IN or OUT (not INS/OUTS) of the exit `q` describes: the port access, and RAX for an IN.
/// Shared by [`handle`] and the run loop's tight loop (`exits::fast::handle_port`).
#[inline]
pub(super) fn in_or_out<V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    port: u16,
    size: u8,
    direction: IoDirection,
) -> Action {
    if direction == IoDirection::In {
        let v = port_in(cx, port, size) as u64 & mask(size);
        let rax = &mut cx.vcpu.regs.rax;
        // A 32-bit destination zero-extends into RAX; 8- and 16-bit ones merge.
        *rax = if size == 4 {
            v
        } else {
            (*rax & !mask(size)) | v
        };
    } else {
        let v = (cx.vcpu.regs.rax & mask(size)) as u32;
        port_out(cx, port, size, v);
    }
    Action::Advance
}

/// The stop an access to the debug-exit device asked for (the guest's exit status), if any.
#[inline]
pub(super) fn debug_exit<V: Vmcs + ?Sized>(cx: &ExitContext<'_, V>) -> Option<Action> {
    let status = cx.vm.platform.exit_status()?;
    Some(Action::Stop(StopReason::DebugExit(status)))
}

/// How the guest's CPU forms addresses from segments (SDM 3.4.4, 20.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressingMode {
    /// Real mode and virtual-8086 mode: base + offset, limit checks only.
    Real,
    /// Protected mode, and compatibility mode: limit and type checks, 32-bit linear addresses.
    Protected,
    /// 64-bit mode: no limits, ES/CS/SS/DS bases 0, canonical addresses of 48 bits, or 57
    /// with 5-level paging (CR4.LA57).
    Long64 { linear_bits: u32 },
}

/// The segment a string element is addressed through, as the VMCS holds it (SDM 25.4.1).
struct DataSegment {
    seg: Segment,
    base: u64,
    limit: u64,
    access_rights: u32,
}

const AR_UNUSABLE: u32 = 1 << 16;
const AR_DB: u32 = 1 << 14;
const AR_CODE: u32 = 1 << 3;
/// Writable for data, readable for code.
const AR_RW: u32 = 1 << 1;
const AR_EXPAND_DOWN: u32 = 1 << 2;

impl DataSegment {
    fn read<V: Vmcs + ?Sized>(vmcs: &V, seg: Segment) -> Self {
        Self {
            seg,
            base: vmcs.read(seg.base()),
            limit: vmcs.read(seg.limit()) as u64,
            access_rights: vmcs.read(seg.access_rights()),
        }
    }

    /// The linear address of an element of `len` bytes at `offset`, or the fault the segment
    /// check raises: #SS(0) through SS, #GP(0) otherwise (SDM Vol. 2 INS/OUTS "Protected Mode
    /// Exceptions"). SDM Vol. 3A 5.3: every byte must lie within the limit (above it, up to
    /// 64 KiB or 4 GiB by the B flag, for an expand-down segment); 5.4.1: INS writes, so ES must
    /// be a writable data segment; OUTS reads, so a code segment must be readable; a null
    /// (unusable) segment faults. 3.3.7.1: in 64-bit mode only the canonical check remains.
    fn linear(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        how: AddressingMode,
    ) -> Result<u64, Exception> {
        let fault = Err(if self.seg == Segment::Ss {
            SS0
        } else {
            Exception::GP0
        });
        if let AddressingMode::Long64 { linear_bits } = how {
            let base = match self.seg {
                Segment::Fs | Segment::Gs => self.base,
                _ => 0,
            };
            let la = base.wrapping_add(offset);
            let unused = 64 - linear_bits;
            let canonical = |a: u64| ((a << unused) as i64 >> unused) as u64 == a;
            // An element that would wrap past 2^64 is refused like a non-canonical one.
            return match la.checked_add(len - 1) {
                Some(end) if canonical(la) && canonical(end) => Ok(la),
                _ => fault,
            };
        }
        // Outside 64-bit mode the offset has at most 32 bits (saturating all the same: a guest
        // value must never overflow in Keel).
        let last = offset.saturating_add(len - 1);
        let ar = self.access_rights;
        if how == AddressingMode::Protected {
            let code = ar & AR_CODE != 0;
            let type_ok = if write {
                !code && ar & AR_RW != 0
            } else {
                !code || ar & AR_RW != 0
            };
            if ar & AR_UNUSABLE != 0 || !type_ok {
                return fault;
            }
        }
        let within = if ar & AR_CODE == 0 && ar & AR_EXPAND_DOWN != 0 {
            let upper = if ar & AR_DB != 0 { 0xffff_ffff } else { 0xffff };
            offset > self.limit && last <= upper
        } else {
            last <= self.limit
        };
        if !within {
            return fault;
        }
        Ok(self.base.wrapping_add(offset) & 0xffff_ffff)
    }
}

/// #SS(0): a stack-segment limit violation.
const SS0: Exception = Exception {
    vector: 12,
    error_code: Some(0),
};

const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_AC: u64 = 1 << 18;
const CR0_PE: u64 = 1;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const CS_L: u32 = 1 << 13;

/// INS/OUTS, each element checked as the CPU would before any of its bytes moves: the segment
/// (limit, type, 64-bit rules), then the guest's paging for every page the element touches.
/// A fault leaves RCX, RSI and RDI at the faulting element, so the guest's handler can fix the
/// cause and the instruction restarts there (SDM Vol. 2 REP: string instructions are
/// restartable).
/// Moves at most `budget` elements, and stops after one that meets a data breakpoint in `watch`.
fn string<V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    q: &IoQualification,
    mut budget: u64,
    watch: &debug::Breakpoints,
) -> Action {
    // SDM 28.2.5, Table 28-8: instruction information for INS/OUTS gives the address size (bits
    // 9:7: 0 = 16, 1 = 32, 2 = 64) and, for OUTS, the segment register (bits 17:15: DS or the
    // override). INS always writes ES:[rDI] (SDM Vol. 2 INS: ES cannot be overridden).
    let info = cx.vmcs.read(ReadOnly32::ExitInstructionInfo);
    let addr_mask = match (info >> 7) & 7 {
        0 => 0xffff,
        1 => 0xffff_ffff,
        _ => u64::MAX,
    };
    let size = q.size;
    let step = size as u64;
    let rflags = cx.vmcs.read(GuestNat::Rflags);
    let df = rflags & RFLAGS_DF != 0;
    let maxphyaddr = super::cpuid::guest_maxphyaddr(&*cx.host);
    let mode = PagingMode::of(cx.vmcs, maxphyaddr);
    let how = if mode.cr0 & CR0_PE == 0 || rflags & RFLAGS_VM != 0 {
        AddressingMode::Real
    } else if mode.efer & EFER_LMA != 0 && cx.vmcs.read(Guest32::CsAccessRights) & CS_L != 0 {
        AddressingMode::Long64 {
            linear_bits: if mode.cr4 & CR4_LA57 != 0 { 57 } else { 48 },
        }
    } else {
        AddressingMode::Protected
    };
    let linear_mask = if matches!(how, AddressingMode::Long64 { .. }) {
        u64::MAX
    } else {
        0xffff_ffff
    };
    let is_in = q.direction == IoDirection::In;
    let (index_reg, seg) = if is_in {
        (7u8, Segment::Es)
    } else {
        let seg = match (info >> 15) & 7 {
            0 => Segment::Es,
            1 => Segment::Cs,
            2 => Segment::Ss,
            3 => Segment::Ds,
            4 => Segment::Fs,
            5 => Segment::Gs,
            other => {
                return Action::Stop(StopReason::Killed(format!(
                    "OUTS exit names segment register {other}, which the SDM does not define"
                )))
            }
        };
        (6u8, seg)
    };
    let seg = DataSegment::read(cx.vmcs, seg);
    // CPL is SS.DPL (SDM 5.5); RFLAGS.AC lifts SMAP for these explicit accesses (SDM 4.6.1).
    let kind = AccessKind {
        write: is_in,
        user: cx.vmcs.read(Guest32::SsAccessRights) >> 5 & 3 == 3,
        ac: rflags & RFLAGS_AC != 0,
    };
    let mut count = if q.rep {
        cx.vcpu.regs.rcx & addr_mask
    } else {
        1
    };
    if count == 0 {
        return Action::Advance;
    }
    while count > 0 && budget > 0 {
        let index = cx.vcpu.regs.get(index_reg) & addr_mask;
        let la = match seg.linear(index, step, is_in, how) {
            Ok(la) => la,
            Err(e) => return Action::Inject(e),
        };
        // The access goes through the guest's own page tables with its permissions, each page
        // of the element on its own: a fault is the guest's #PF (CR2 = the address), as if its
        // CPU had done the access itself.
        let pieces = match gmem::access_bytes(&mut cx.vm.ram, &mode, la, step, kind, linear_mask) {
            Ok(p) => p,
            Err(gmem::Fault::Page(pf)) => {
                cx.host.set_guest_cr2(pf.address);
                return Action::Inject(Exception {
                    vector: 14,
                    error_code: Some(pf.error_code),
                });
            }
            Err(gmem::Fault::TableOutsideRam(gpa)) => {
                return Action::Stop(StopReason::Killed(format!(
                    "the guest's page walk touched guest-physical {gpa:#x} (page tables outside \
                     RAM) during string I/O"
                )))
            }
        };
        if let Some((gpa, _)) = pieces.iter().find(|&(gpa, n)| !cx.vm.ram.contains(gpa, n)) {
            return Action::Stop(StopReason::BadMemoryAccess { gpa, write: is_in });
        }
        let mut b = [0u8; 4];
        if is_in {
            b = port_in(cx, q.port, size).to_le_bytes();
        }
        let mut at = 0;
        for (gpa, n) in pieces.iter() {
            let part = at..at + n as usize;
            // Every piece was checked to be RAM above.
            if is_in {
                let _ = cx.vm.ram.write(gpa, &b[part]);
            } else {
                let _ = cx.vm.ram.read(gpa, &mut b[part]);
            }
            at += n as usize;
        }
        if !is_in {
            port_out(cx, q.port, size, u32::from_le_bytes(b));
        }
        let next = if df {
            index.wrapping_sub(step)
        } else {
            index.wrapping_add(step)
        } & addr_mask;
        let old = cx.vcpu.regs.get(index_reg);
        cx.vcpu.regs.set(index_reg, (old & !addr_mask) | next);
        count -= 1;
        budget -= 1;
        // SDM 17.3.1.2: a repeated INS/OUTS traps after the iteration that met a data breakpoint.
        let met = watch.data(la, step, is_in);
        if met != 0 {
            debug::queue_trap(cx.vmcs, met);
            budget = 0;
        }
        if q.rep {
            let rcx = cx.vcpu.regs.rcx;
            cx.vcpu.regs.rcx = (rcx & !addr_mask) | count;
        }
        if cx.vm.platform.exit_status().is_some() {
            break;
        }
    }
    if count > 0 {
        Action::Resume
    } else {
        Action::Advance
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::debug;
    use crate::exits::testing::*;
    use crate::vmx::{ExitReason, Guest64};

    fn io_qual(port: u16, size: u8, is_in: bool, string: bool, rep: bool) -> u64 {
        // SDM Table 28-5.
        (size as u64 - 1)
            | (is_in as u64) << 3
            | (string as u64) << 4
            | (rep as u64) << 5
            | (port as u64) << 16
    }

    #[test]
    fn unclaimed_port_reads_all_ones_and_counts() {
        let mut t = TestBed::new();
        t.vcpu.regs.rax = 0x1234_5678_9abc_def0;
        t.set_qualification(io_qual(0x1234, 1, true, false, false));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(
            t.vcpu.regs.rax, 0x1234_5678_9abc_deff,
            "8-bit IN merges into AL"
        );
        t.set_qualification(io_qual(0x1234, 4, true, false, false));
        t.run(ExitReason::IoInstruction);
        assert_eq!(t.vcpu.regs.rax, 0xffff_ffff, "32-bit IN zero-extends");
        assert_eq!(t.vcpu.stats.unclaimed_port_accesses, 2);
    }

    #[test]
    fn uart_output_reaches_the_console_and_debug_exit_stops() {
        let mut t = TestBed::new();
        for &b in b"hi\n" {
            t.vcpu.regs.rax = b as u64;
            t.set_qualification(io_qual(0x3f8, 1, false, false, false));
            assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        }
        assert_eq!(t.vm.platform.console().take_line().as_deref(), Some("hi"));
        t.vcpu.regs.rax = 0x10;
        t.set_qualification(io_qual(0xf4, 1, false, false, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Stop(StopReason::DebugExit(0x21))
        );
    }

    #[test]
    fn string_io_respects_the_guests_page_tables() {
        let mut t = paged_bed();
        // INSB into read-only page 7: #PF(W|P), CR2 = the address, RIP and RDI unchanged.
        t.vcpu.regs.rdi = 0x7010;
        t.set_qualification(io_qual(0x3f8, 1, true, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0b011));
        assert_eq!((t.host.cr2, t.vcpu.regs.rdi), (0x7010, 0x7010));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7000);
        // OUTSB from page 9, which is not present: #PF(0).
        t.vcpu.regs.rsi = 0x9000;
        t.set_qualification(io_qual(0x3f8, 1, false, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0));
        assert_eq!(t.host.cr2, 0x9000);
        // OUTSB from the read-only page is fine.
        t.vcpu.regs.rsi = 0x7020;
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
    }

    /// Long-mode paging for the string tests: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT
    /// 0x4000 mapping linear page 5 -> 0x9000 and 6 -> 0xb000 (not the physically next page),
    /// 7 -> 0xc000 read-only, 8 -> 0xd000, and nothing at page 9. All user pages; CR0.WP = 1;
    /// 64-bit code.
    fn paged_bed() -> TestBed {
        let mut t = TestBed::new();
        let put = |t: &mut TestBed, at: usize, v: u64| {
            t.vm.ram.bytes()[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut t, 0x1000, 0x2007);
        put(&mut t, 0x2000, 0x3007);
        put(&mut t, 0x3000, 0x4007);
        for (page, pte) in [(5, 0x9007), (6, 0xb007), (7, 0xc005), (8, 0xd007)] {
            put(&mut t, 0x4000 + page * 8, pte);
        }
        t.vmcs.write(GuestNat::Cr0, 0x8001_0011); // PG, WP, PE
        t.vmcs.write(GuestNat::Cr3, 0x1000);
        t.vmcs.write(GuestNat::Cr4, 0x20);
        t.vmcs.write(Guest64::Ia32Efer, 0x500);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(GuestNat::Rip, 0x7000);
        t.long_mode();
        t.set_instruction_info(2 << 7 | 3 << 15); // 64-bit addresses, DS
        t
    }

    /// What an OUTS of `value` to the debug-exit port (0xf4) ends in.
    fn debug_exit(value: u32) -> Action {
        Action::Stop(StopReason::DebugExit(
            crate::devices::debug_exit::exit_status(value),
        ))
    }

    /// Ends the console line with an OUT of '\n' to COM1 and returns it.
    fn console_line(t: &mut TestBed) -> Option<alloc::string::String> {
        t.vcpu.regs.rax = b'\n' as u64;
        t.set_qualification(io_qual(0x3f8, 1, false, false, false));
        t.run(ExitReason::IoInstruction);
        t.vm.platform.console().take_line()
    }

    fn pf(error_code: u32) -> Action {
        Action::Inject(Exception {
            vector: 14,
            error_code: Some(error_code),
        })
    }

    #[test]
    fn an_element_straddling_two_pages_moves_each_byte_through_its_own_page() {
        let mut t = paged_bed();
        // INSW from port 0x80 (reads back 0xab; port 0x81 is unclaimed: 0xff) at the last byte
        // of linear page 5: the low byte lands at 0x9fff, the high byte on page 6 (0xb000).
        t.vm.platform.io_write(0x80, 1, 0xab, 0);
        t.vcpu.regs.rdi = 0x5fff;
        t.set_qualification(io_qual(0x80, 2, true, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        let ram = t.vm.ram.bytes();
        assert_eq!((ram[0x9fff], ram[0xb000], ram[0xa000]), (0xab, 0xff, 0));
        assert_eq!(t.vcpu.regs.rdi, 0x6001);
        // OUTSW of the same two pages to the debug-exit port (takes 16 bits whole).
        t.vm.ram.bytes()[0x9fff] = 0x34;
        t.vm.ram.bytes()[0xa000] = 0x99;
        t.vm.ram.bytes()[0xb000] = 0x12;
        t.vcpu.regs.rsi = 0x5fff;
        t.set_qualification(io_qual(0xf4, 2, false, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), debug_exit(0x1234));
    }

    #[test]
    fn a_fault_on_the_second_page_comes_before_any_byte_moves() {
        let mut t = paged_bed();
        t.vm.ram.bytes()[0xdff8..0xe000].fill(0x5a);
        // INSD at 0x8ffe: page 8 is fine, page 9 is not present. #PF(W), CR2 = the first byte
        // of page 9, nothing written.
        t.vcpu.regs.rdi = 0x8ffe;
        t.set_qualification(io_qual(0x80, 4, true, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0b010));
        assert_eq!((t.host.cr2, t.vcpu.regs.rdi), (0x9000, 0x8ffe));
        assert_eq!(t.vm.ram.bytes()[0xdffe..0xe000], [0x5a, 0x5a]);
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7000);
        // INSW at 0x6fff into read-only page 7 (CR0.WP = 1, CPL 0): #PF(P|W), CR2 = 0x7000.
        t.vm.ram.bytes()[0xbfff] = 0x5a;
        t.vcpu.regs.rdi = 0x6fff;
        t.set_qualification(io_qual(0x80, 2, true, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0b011));
        assert_eq!((t.host.cr2, t.vm.ram.bytes()[0xbfff]), (0x7000, 0x5a));
        // OUTSW from 0x8fff: a read of the missing page, #PF(0), CR2 = 0x9000.
        t.vcpu.regs.rsi = 0x8fff;
        t.set_qualification(io_qual(0xf4, 2, false, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0));
        assert_eq!(t.host.cr2, 0x9000);
        assert_eq!(t.vm.platform.exit_status(), None, "nothing was sent");
    }

    #[test]
    fn a_rep_that_faults_mid_way_stops_at_the_faulting_element() {
        let mut t = paged_bed();
        t.vm.ram.bytes()[0xdff8..0xe000].fill(0x5a);
        t.vm.platform.io_write(0x80, 1, 0xab, 0);
        // REP INSW x3 at 0x8ffb: two elements land, the third straddles into page 9.
        t.vcpu.regs.rdi = 0x8ffb;
        t.vcpu.regs.rcx = 3;
        t.set_qualification(io_qual(0x80, 2, true, true, true));
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0b010));
        assert_eq!(
            t.vm.ram.bytes()[0xdffa..0xe000],
            [0x5a, 0xab, 0xff, 0xab, 0xff, 0x5a]
        );
        assert_eq!((t.vcpu.regs.rdi, t.vcpu.regs.rcx), (0x8fff, 1));
        assert_eq!(t.host.cr2, 0x9000);
        // With DF = 1 a REP OUTSB walks down, from page 6 into page 5 at the boundary.
        t.vmcs.write(GuestNat::Rflags, 2 | 1 << 10);
        t.vm.ram.bytes()[0xb000] = b'b';
        t.vm.ram.bytes()[0x9fff] = b'a';
        t.vcpu.regs.rsi = 0x6000;
        t.vcpu.regs.rcx = 2;
        t.set_qualification(io_qual(0x3f8, 1, false, true, true));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!((t.vcpu.regs.rsi, t.vcpu.regs.rcx), (0x5ffe, 0));
        assert_eq!(console_line(&mut t).as_deref(), Some("ba"));
    }

    #[test]
    fn ins_marks_the_page_dirty_and_respects_smap() {
        let mut t = paged_bed();
        // SDM 4.8: the write sets A and D in the leaf (page 5's PTE at 0x4028), A above it.
        t.vcpu.regs.rdi = 0x5000;
        t.set_qualification(io_qual(0x80, 1, true, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(t.vm.ram.bytes()[0x4028] & 0x60, 0x60);
        assert_eq!(t.vm.ram.bytes()[0x3000] & 0x60, 0x20);
        // SDM 4.6.1: with CR4.SMAP, CPL 0 may not write a user page unless RFLAGS.AC = 1.
        t.vmcs.write(GuestNat::Cr4, 0x20 | 1 << 21);
        t.vcpu.regs.rdi = 0x5000;
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0b011));
        t.vmcs.write(GuestNat::Rflags, 2 | 1 << 18);
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
    }

    /// CR4.DE, DR7 with I/O breakpoint 0 (L0, R/W0 = 10, LEN0 = 1 byte) on port 80H.
    fn io_breakpoint_on_port_80(t: &mut TestBed) {
        t.vmcs.write(GuestNat::Cr4, 0x20 | 1 << 3);
        t.vmcs
            .write(GuestNat::Dr7, debug::DR7_INIT | 1 | 0b10 << 16);
        t.host.dr = [0x80, 0, 0, 0];
        t.vmcs.write(GuestNat::Rip, 0x7000);
        t.set_instruction_length(2);
    }

    const TRAP_B0: u64 = debug::pending::ENABLED_BREAKPOINT | 1;

    /// One I/O exit with no debug exception pending before it: its action, and the
    /// pending-debug-exceptions field after it.
    fn run_io(t: &mut TestBed) -> (Action, u64) {
        t.vmcs.write(GuestNat::PendingDebugExceptions, 0);
        let action = t.run(ExitReason::IoInstruction);
        (action, t.vmcs.read(GuestNat::PendingDebugExceptions))
    }

    #[test]
    fn io_breakpoint_traps_after_an_emulated_in_or_out() {
        let mut t = TestBed::new();
        io_breakpoint_on_port_80(&mut t);
        // OUT 80H: emulated, RIP past it, and a #DB trap pending with B0 (SDM 17.3.1.2).
        t.set_qualification(io_qual(0x80, 1, false, false, false));
        assert_eq!(run_io(&mut t), (Action::Advance, TRAP_B0));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7002);
        // IN of a word at 7FH covers 80H too; OUT 84H meets no breakpoint.
        t.set_qualification(io_qual(0x7f, 2, true, false, false));
        assert_eq!(run_io(&mut t), (Action::Advance, TRAP_B0));
        t.set_qualification(io_qual(0x84, 1, false, false, false));
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
    }

    #[test]
    fn rep_string_io_traps_after_the_first_element() {
        // SDM 17.3.1.2: a repeated INS/OUTS that meets an I/O breakpoint traps after the first
        // iteration; the #DB handler returns to the instruction, which goes on with the rest.
        let mut t = flat32_bed(); // 32-bit addresses, DS, paging off
        io_breakpoint_on_port_80(&mut t);
        t.vcpu.regs.rsi = 0x5000;
        t.vcpu.regs.rcx = 5;
        t.set_qualification(io_qual(0x80, 1, false, true, true));
        assert_eq!(run_io(&mut t), (Action::Resume, TRAP_B0));
        assert_eq!((t.vcpu.regs.rcx, t.vcpu.regs.rsi), (4, 0x5001));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7000);
        // The last element: RIP moves past the instruction, and the trap is pending again.
        t.vcpu.regs.rcx = 1;
        assert_eq!(run_io(&mut t), (Action::Advance, TRAP_B0));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7002);
        // REP with RCX = 0 accesses no port: no trap.
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
    }

    #[test]
    fn rep_insb_traps_after_writing_a_watched_byte() {
        // DR7: L0, R/W0 = 01 (writes), LEN0 = 1 byte at linear 5002H.
        let mut t = flat32_bed(); // paging off, flat segments
        t.vmcs
            .write(GuestNat::Dr7, debug::DR7_INIT | 1 | 0b01 << 16);
        t.host.dr = [0x5002, 0, 0, 0];
        t.vmcs.write(GuestNat::Rip, 0x7000);
        t.set_instruction_info(1 << 7); // 32-bit addresses
        t.vcpu.regs.rdi = 0x5000;
        t.vcpu.regs.rcx = 10;
        t.set_qualification(io_qual(0x1234, 1, true, true, true));
        // Elements 5000H-5002H are written, then the trap; RIP stays on the REP INSB.
        assert_eq!(run_io(&mut t), (Action::Resume, TRAP_B0));
        assert_eq!((t.vcpu.regs.rcx, t.vcpu.regs.rdi), (7, 0x5003));
        assert_eq!(t.vm.ram.bytes()[0x5002], 0xff);
        // The rest runs on without a trap; OUTSB reading the byte does not meet a write breakpoint.
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
        assert_eq!(t.vcpu.regs.rcx, 0);
        t.vcpu.regs.rsi = 0x5002;
        t.set_qualification(io_qual(0x1234, 1, false, true, false));
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
    }

    #[test]
    fn page_tables_outside_ram_stop_the_guest() {
        // As when the CPU's own walk touches them (exits::ept): not a #PF the CPU would not give.
        let mut t = paged_bed();
        t.vmcs.write(GuestNat::Cr3, 0x4000_0000);
        t.vcpu.regs.rdi = 0x5000;
        t.set_qualification(io_qual(0x80, 1, true, true, false));
        match t.run(ExitReason::IoInstruction) {
            Action::Stop(StopReason::Killed(why)) => {
                assert!(
                    why.contains("page walk touched guest-physical 0x40000000"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sixty_four_bit_mode_ignores_es_and_ds_bases_and_checks_canonical_addresses() {
        let mut t = paged_bed();
        // SDM 3.4.4 / 3.3.7.1: in 64-bit mode the ES, DS, SS and CS bases are 0, FS and GS
        // keep theirs, and a non-canonical address is #GP(0) (#SS(0) through SS).
        t.vmcs.write(GuestNat::EsBase, 0x1000);
        t.vmcs.write(GuestNat::DsBase, 0x1000);
        t.vmcs.write(GuestNat::FsBase, 0x1000);
        t.vm.platform.io_write(0x80, 1, 0x42, 0);
        t.vcpu.regs.rdi = 0x5000;
        t.set_qualification(io_qual(0x80, 1, true, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(t.vm.ram.bytes()[0x9000], 0x42, "ES base ignored");
        t.vm.ram.bytes()[0xb000] = 7;
        t.vcpu.regs.rsi = 0x5000;
        t.set_instruction_info(2 << 7 | 4 << 15); // FS:
        t.set_qualification(io_qual(0xf4, 1, false, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            debug_exit(7),
            "FS base 0x1000 + 0x5000 = page 6"
        );
        let mut t = paged_bed();
        t.vcpu.regs.rsi = 0x8000_0000_0000;
        t.set_qualification(io_qual(0xf4, 1, false, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        t.set_instruction_info(2 << 7 | 2 << 15); // SS:
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Inject(SS0));
        assert_eq!(t.vm.platform.exit_status(), None);
        // A word at the very top of the address space does not wrap to 0 (nor panic Keel).
        t.set_instruction_info(2 << 7 | 3 << 15);
        t.vcpu.regs.rsi = u64::MAX;
        t.set_qualification(io_qual(0xf4, 2, false, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        t.set_qualification(io_qual(0xf4, 1, false, true, false));
        t.vcpu.regs.rsi = 0x8000_0000_0000;
        // With 5-level paging (CR4.LA57) addresses are canonical up to bit 56: this one is, and
        // its PML5 entry (0x5000, empty) is not present: #PF(0).
        t.vmcs.write(GuestNat::Cr4, 0x20 | 1 << 12);
        t.vmcs.write(GuestNat::Cr3, 0x5000);
        assert_eq!(t.run(ExitReason::IoInstruction), pf(0));
        assert_eq!(t.host.cr2, 0x8000_0000_0000);
    }

    /// Protected mode without paging, 32-bit code, flat 4 GiB data segments.
    fn flat32_bed() -> TestBed {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x11);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(Guest32::CsAccessRights, 0xc09b);
        for s in [
            Segment::Es,
            Segment::Ss,
            Segment::Ds,
            Segment::Fs,
            Segment::Gs,
        ] {
            t.vmcs.write(s.limit(), 0xffff_ffff);
            t.vmcs.write(s.access_rights(), 0xc093);
        }
        t.set_instruction_info(1 << 7 | 3 << 15); // 32-bit addresses, DS
        t
    }

    #[test]
    fn segment_limits_and_types_are_checked_outside_64_bit_mode() {
        // SDM Vol. 2 INS/OUTS, Vol. 3A 5.3-5.4: #GP(0) for a limit or type violation, #SS(0)
        // when the segment is SS; nothing moves.
        let mut t = flat32_bed();
        t.vmcs.write(Guest32::EsLimit, 0xffff);
        t.vcpu.regs.rdi = 0xffff; // the word's second byte is past the limit
        t.set_qualification(io_qual(0x80, 2, true, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        t.vcpu.regs.rdi = 0xfffe;
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        // INS into a read-only data segment, or an unusable ES.
        t.vmcs.write(Guest32::EsAccessRights, 0xc091);
        t.vcpu.regs.rdi = 0x100;
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        t.vmcs.write(Guest32::EsAccessRights, 1 << 16);
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        // OUTS through SS past its limit: #SS(0); through an execute-only CS: #GP(0); through a
        // readable CS: fine.
        t.vmcs.write(Guest32::SsLimit, 0xfff);
        t.vcpu.regs.rsi = 0x1000;
        t.set_instruction_info(1 << 7 | 2 << 15);
        t.set_qualification(io_qual(0x80, 1, false, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Inject(SS0));
        t.set_instruction_info(1 << 7 | 1 << 15);
        t.vmcs.write(Guest32::CsLimit, 0xffff_ffff);
        t.vmcs.write(Guest32::CsAccessRights, 0xc099);
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        t.vmcs.write(Guest32::CsAccessRights, 0xc09b);
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        // An expand-down data segment (type 7, B = 1): offsets above the limit are valid.
        t.vmcs.write(Guest32::DsAccessRights, 0xc097);
        t.vmcs.write(Guest32::DsLimit, 0x0fff);
        t.set_instruction_info(1 << 7 | 3 << 15);
        t.vcpu.regs.rsi = 0x0fff;
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
        t.vcpu.regs.rsi = 0x1000;
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
    }

    #[test]
    fn address_size_wraps_the_index_and_the_count() {
        // Real mode, 16-bit addresses: DS base 0x10000, SI = 0xffff; REP OUTSB x2 reads
        // 0x1ffff and then 0x10000 (SI wraps to 0); the upper halves of RSI and RCX stay.
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Cr0, 0x10);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(Guest32::CsAccessRights, 0x9b);
        t.vmcs.write(GuestNat::DsBase, 0x1_0000);
        t.vmcs.write(Guest32::DsLimit, 0xffff);
        t.vmcs.write(Guest32::DsAccessRights, 0x93);
        t.set_instruction_info(3 << 15); // 16-bit addresses, DS
        t.vm.ram.bytes()[0x1ffff] = b'y';
        t.vm.ram.bytes()[0x10000] = b'z';
        t.vcpu.regs.rsi = 0xdead_0000_ffff;
        t.vcpu.regs.rcx = 0xbeef_0000_0002;
        t.set_qualification(io_qual(0x3f8, 1, false, true, true));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(
            (t.vcpu.regs.rsi, t.vcpu.regs.rcx),
            (0xdead_0000_0001, 0xbeef_0000_0000)
        );
        // CX = 0 (RCX = 0x1_0000): no element moves, the instruction completes.
        t.vcpu.regs.rcx = 0x1_0000;
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(t.vcpu.regs.rsi, 0xdead_0000_0001);
        assert_eq!(console_line(&mut t).as_deref(), Some("yz"));
        // A word at SI = 0xffff runs past the real-mode limit: #GP(0).
        t.vcpu.regs.rsi = 0xffff;
        t.set_qualification(io_qual(0xf4, 2, false, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception::GP0)
        );
    }

    #[test]
    fn linear_addresses_wrap_at_4_gib_outside_64_bit_mode() {
        // Compatibility mode (EFER.LMA = 1, CS.L = 0): DS base 0xffff_f000 + ESI 0x6800 is
        // linear 0x5800 (SDM 3.4.4: 32-bit effective and linear addresses outside 64-bit mode),
        // page 5 -> 0x9800; not 0x1_0000_5800, which 4-level paging does not map.
        let mut t = paged_bed();
        t.vmcs.write(Guest32::CsAccessRights, 0xc09b);
        t.vmcs.write(GuestNat::DsBase, 0xffff_f000);
        t.vmcs.write(Guest32::DsLimit, 0xffff_ffff);
        t.vmcs.write(Guest32::DsAccessRights, 0xc093);
        t.set_instruction_info(1 << 7 | 3 << 15);
        t.vm.ram.bytes()[0x9800] = 9;
        t.vcpu.regs.rsi = 0x6800;
        t.set_qualification(io_qual(0xf4, 1, false, true, false));
        assert_eq!(t.run(ExitReason::IoInstruction), debug_exit(9));
    }

    #[test]
    fn rep_outsb_walks_memory_in_chunks() {
        let mut t = flat32_bed(); // paging off
        let text = [b'x'; 300];
        t.vm.ram.bytes()[0x5000..0x5000 + 300].copy_from_slice(&text);
        t.vcpu.regs.rsi = 0x5000;
        t.vcpu.regs.rcx = 300;
        t.set_qualification(io_qual(0x3f8, 1, false, true, true));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Resume,
            "first chunk"
        );
        assert_eq!(t.vcpu.regs.rcx, 300 - STRING_CHUNK);
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(t.vcpu.regs.rcx, 0);
        assert_eq!(t.vcpu.regs.rsi, 0x5000 + 300);
        let line = t.vm.platform.console().take_line().unwrap();
        assert!(line.starts_with("xxxx"));
    }
}
