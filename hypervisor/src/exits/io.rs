//! IN/OUT and INS/OUTS (with REP), all sizes, through the guest's port bus.
//!
//! Keel intercepts every port (the I/O bitmaps are all ones). A port no device claims reads as
//! all-ones and drops writes, like an empty ISA bus, and is counted in the guest's statistics.

use super::{debug, Action, Exception, ExitContext};
use crate::gmem::{self, PagingMode};
use crate::guest::StopReason;
use crate::vmx::{
    Guest32, Guest64, GuestNat, IoDirection, IoQualification, ReadOnly32, ReadOnlyNat, Vmcs,
};
use alloc::format;

/// Most string elements moved per exit; the instruction re-executes for the rest, which keeps
/// Keel's time in one exit bounded and lets interrupts in between.
pub const STRING_CHUNK: u64 = 256;

fn port_in<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, port: u16, size: u8) -> u32 {
    match cx.guest.platform.io_read(port, size, cx.now) {
        Some(v) => v,
        None => {
            cx.guest.stats.unclaimed_port_accesses += 1;
            u32::MAX
        }
    }
}

fn port_out<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>, port: u16, size: u8, value: u32) {
    if !cx.guest.platform.io_write(port, size, value, cx.now) {
        cx.guest.stats.unclaimed_port_accesses += 1;
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
    let index_before = cx.guest.regs.get(index);
    let action = if q.string {
        let budget = if breakpoints != 0 { 1 } else { STRING_CHUNK };
        string(cx, &q, budget, &watch)
    } else if q.direction == IoDirection::In {
        let v = port_in(cx, port, size) as u64 & mask(size);
        let rax = &mut cx.guest.regs.rax;
        // A 32-bit destination zero-extends into RAX; 8- and 16-bit ones merge.
        *rax = if size == 4 {
            v
        } else {
            (*rax & !mask(size)) | v
        };
        Action::Advance
    } else {
        let v = (cx.guest.regs.rax & mask(size)) as u32;
        port_out(cx, port, size, v);
        Action::Advance
    };
    if let Some(status) = cx.guest.platform.exit_status() {
        return Action::Stop(StopReason::DebugExit(status));
    }
    // IN/OUT always access the port; INS/OUTS did if an element moved its index register.
    if !q.string || cx.guest.regs.get(index) != index_before {
        debug::queue_trap(cx.vmcs, breakpoints);
    }
    action
}

/// Moves at most `budget` elements, and stops after one that meets a data breakpoint in `watch`.
fn string<V: Vmcs + ?Sized>(
    cx: &mut ExitContext<'_, V>,
    q: &IoQualification,
    mut budget: u64,
    watch: &debug::Breakpoints,
) -> Action {
    // SDM 28.2.5, Table 28-8: instruction information for INS/OUTS gives the address size (bits
    // 9:7: 0 = 16, 1 = 32, 2 = 64) and, for OUTS, the segment register (bits 17:15).
    let info = cx.vmcs.read(ReadOnly32::ExitInstructionInfo);
    let addr_mask = match (info >> 7) & 7 {
        0 => 0xffff,
        1 => 0xffff_ffff,
        _ => u64::MAX,
    };
    let size = q.size;
    let step = size as u64;
    let df = cx.vmcs.read(GuestNat::Rflags) & (1 << 10) != 0;
    let mode = PagingMode {
        cr0: cx.vmcs.read(GuestNat::Cr0),
        cr3: cx.vmcs.read(GuestNat::Cr3),
        cr4: cx.vmcs.read(GuestNat::Cr4),
        efer: cx.vmcs.read(Guest64::Ia32Efer),
    };
    let is_in = q.direction == IoDirection::In;
    let (index_reg, seg_base) = if is_in {
        // INS always writes ES:[rDI].
        (7u8, cx.vmcs.read(GuestNat::EsBase))
    } else {
        let seg = match (info >> 15) & 7 {
            0 => GuestNat::EsBase,
            1 => GuestNat::CsBase,
            2 => GuestNat::SsBase,
            4 => GuestNat::FsBase,
            5 => GuestNat::GsBase,
            _ => GuestNat::DsBase,
        };
        (6u8, cx.vmcs.read(seg))
    };
    let user = cx.vmcs.read(Guest32::SsAccessRights) >> 5 & 3 == 3;
    let mut count = if q.rep {
        cx.guest.regs.rcx & addr_mask
    } else {
        1
    };
    if count == 0 {
        return Action::Advance;
    }
    while count > 0 && budget > 0 {
        let index = cx.guest.regs.get(index_reg) & addr_mask;
        let la = seg_base.wrapping_add(index);
        // The access goes through the guest's own page tables with its permissions: a fault is
        // the guest's #PF (CR2 = the address), as if its CPU had done the access itself.
        let gpa = match gmem::access(&cx.guest.ram, &mode, la, is_in, user) {
            Ok(gpa) => gpa,
            Err(pf) => {
                cx.host.set_guest_cr2(pf.address);
                return Action::Inject(Exception {
                    vector: 14,
                    error_code: Some(pf.error_code),
                });
            }
        };
        if cx.guest.ram.slice(gpa, step).is_none() {
            return Action::Stop(StopReason::BadMemoryAccess { gpa, write: is_in });
        }
        let at = gpa as usize..(gpa + step) as usize;
        if is_in {
            let v = port_in(cx, q.port, size);
            cx.guest.ram.bytes()[at].copy_from_slice(&v.to_le_bytes()[..size as usize]);
        } else {
            let mut b = [0u8; 4];
            b[..size as usize].copy_from_slice(&cx.guest.ram.bytes()[at]);
            port_out(cx, q.port, size, u32::from_le_bytes(b));
        }
        let next = if df {
            index.wrapping_sub(step)
        } else {
            index.wrapping_add(step)
        } & addr_mask;
        let old = cx.guest.regs.get(index_reg);
        cx.guest.regs.set(index_reg, (old & !addr_mask) | next);
        count -= 1;
        budget -= 1;
        // SDM 17.3.1.2: a repeated INS/OUTS traps after the iteration that met a data breakpoint.
        let met = watch.data(la, step, is_in);
        if met != 0 {
            debug::queue_trap(cx.vmcs, met);
            budget = 0;
        }
        if q.rep {
            let rcx = cx.guest.regs.rcx;
            cx.guest.regs.rcx = (rcx & !addr_mask) | count;
        }
        if cx.guest.platform.exit_status().is_some() {
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
    use crate::vmx::ExitReason;

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
        t.guest.regs.rax = 0x1234_5678_9abc_def0;
        t.set_qualification(io_qual(0x1234, 1, true, false, false));
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(
            t.guest.regs.rax, 0x1234_5678_9abc_deff,
            "8-bit IN merges into AL"
        );
        t.set_qualification(io_qual(0x1234, 4, true, false, false));
        t.run(ExitReason::IoInstruction);
        assert_eq!(t.guest.regs.rax, 0xffff_ffff, "32-bit IN zero-extends");
        assert_eq!(t.guest.stats.unclaimed_port_accesses, 2);
    }

    #[test]
    fn uart_output_reaches_the_console_and_debug_exit_stops() {
        let mut t = TestBed::new();
        for &b in b"hi\n" {
            t.guest.regs.rax = b as u64;
            t.set_qualification(io_qual(0x3f8, 1, false, false, false));
            assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        }
        assert_eq!(
            t.guest.platform.console().take_line().as_deref(),
            Some("hi")
        );
        t.guest.regs.rax = 0x10;
        t.set_qualification(io_qual(0xf4, 1, false, false, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Stop(StopReason::DebugExit(0x21))
        );
    }

    #[test]
    fn string_io_respects_the_guests_page_tables() {
        let mut t = TestBed::new();
        // Long-mode paging: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000, where linear
        // page 5 is read-only (0x9000) and page 6 is not present.
        let put = |t: &mut TestBed, at: usize, v: u64| {
            t.guest.ram.bytes()[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut t, 0x1000, 0x2003);
        put(&mut t, 0x2000, 0x3003);
        put(&mut t, 0x3000, 0x4003);
        put(&mut t, 0x4000 + 5 * 8, 0x9001);
        t.vmcs.write(GuestNat::Cr0, 0x8001_0011); // PG, WP, PE
        t.vmcs.write(GuestNat::Cr3, 0x1000);
        t.vmcs.write(GuestNat::Cr4, 0x20);
        t.vmcs.write(Guest64::Ia32Efer, 0x500);
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(GuestNat::Rip, 0x7000);
        t.set_instruction_info(2 << 7 | 3 << 15); // 64-bit addresses, DS
                                                  // INSB into the read-only page: #PF(W|P), CR2 = the address, RIP and RDI unchanged.
        t.guest.regs.rdi = 0x5010;
        t.set_qualification(io_qual(0x3f8, 1, true, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception {
                vector: 14,
                error_code: Some(0b011)
            })
        );
        assert_eq!((t.host.cr2, t.guest.regs.rdi), (0x5010, 0x5010));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7000);
        // OUTSB from the page that is not present: #PF(0).
        t.guest.regs.rsi = 0x6000;
        t.set_qualification(io_qual(0x3f8, 1, false, true, false));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Inject(Exception {
                vector: 14,
                error_code: Some(0)
            })
        );
        assert_eq!(t.host.cr2, 0x6000);
        // OUTSB from the read-only page is fine.
        t.guest.regs.rsi = 0x5020;
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
        let mut t = TestBed::new();
        io_breakpoint_on_port_80(&mut t);
        t.vmcs.write(GuestNat::Cr0, 0x11); // paging off
        t.vmcs.write(GuestNat::Rflags, 2);
        t.set_instruction_info(1 << 7 | 3 << 15); // 32-bit addresses, DS
        t.guest.regs.rsi = 0x5000;
        t.guest.regs.rcx = 5;
        t.set_qualification(io_qual(0x80, 1, false, true, true));
        assert_eq!(run_io(&mut t), (Action::Resume, TRAP_B0));
        assert_eq!((t.guest.regs.rcx, t.guest.regs.rsi), (4, 0x5001));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7000);
        // The last element: RIP moves past the instruction, and the trap is pending again.
        t.guest.regs.rcx = 1;
        assert_eq!(run_io(&mut t), (Action::Advance, TRAP_B0));
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x7002);
        // REP with RCX = 0 accesses no port: no trap.
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
    }

    #[test]
    fn rep_insb_traps_after_writing_a_watched_byte() {
        // DR7: L0, R/W0 = 01 (writes), LEN0 = 1 byte at linear 5002H.
        let mut t = TestBed::new();
        t.vmcs
            .write(GuestNat::Dr7, debug::DR7_INIT | 1 | 0b01 << 16);
        t.host.dr = [0x5002, 0, 0, 0];
        t.vmcs.write(GuestNat::Cr0, 0x11); // paging off
        t.vmcs.write(GuestNat::Rflags, 2);
        t.vmcs.write(GuestNat::Rip, 0x7000);
        t.set_instruction_info(1 << 7); // 32-bit addresses
        t.guest.regs.rdi = 0x5000;
        t.guest.regs.rcx = 10;
        t.set_qualification(io_qual(0x1234, 1, true, true, true));
        // Elements 5000H-5002H are written, then the trap; RIP stays on the REP INSB.
        assert_eq!(run_io(&mut t), (Action::Resume, TRAP_B0));
        assert_eq!((t.guest.regs.rcx, t.guest.regs.rdi), (7, 0x5003));
        assert_eq!(t.guest.ram.bytes()[0x5002], 0xff);
        // The rest runs on without a trap; OUTSB reading the byte does not meet a write breakpoint.
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
        assert_eq!(t.guest.regs.rcx, 0);
        t.guest.regs.rsi = 0x5002;
        t.set_qualification(io_qual(0x1234, 1, false, true, false));
        assert_eq!(run_io(&mut t), (Action::Advance, 0));
    }

    #[test]
    fn rep_outsb_walks_memory_in_chunks() {
        let mut t = TestBed::new();
        let text = [b'x'; 300];
        t.guest.ram.bytes()[0x5000..0x5000 + 300].copy_from_slice(&text);
        t.vmcs.write(GuestNat::Cr0, 0x11); // paging off
        t.vmcs.write(GuestNat::Rflags, 2);
        t.set_instruction_info(1 << 7 | 3 << 15); // 32-bit addresses, DS
        t.guest.regs.rsi = 0x5000;
        t.guest.regs.rcx = 300;
        t.set_qualification(io_qual(0x3f8, 1, false, true, true));
        assert_eq!(
            t.run(ExitReason::IoInstruction),
            Action::Resume,
            "first chunk"
        );
        assert_eq!(t.guest.regs.rcx, 300 - STRING_CHUNK);
        assert_eq!(t.run(ExitReason::IoInstruction), Action::Advance);
        assert_eq!(t.guest.regs.rcx, 0);
        assert_eq!(t.guest.regs.rsi, 0x5000 + 300);
        let line = t.guest.platform.console().take_line().unwrap();
        assert!(line.starts_with("xxxx"));
    }
}
