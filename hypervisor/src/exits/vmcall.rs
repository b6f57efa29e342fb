//! VMCALL: Keel's hypercall interface (see `abi` and docs/HYPERCALLS.md).
//!
//! Pointers are guest-physical and must lie wholly inside the guest's RAM; anything else is
//! EFAULT, never a fault in Keel. In 16- and 32-bit code only the low 32 bits of the registers
//! count, and the result is truncated to 32 bits.

use super::{Action, ExitContext};
use crate::abi::{hc, status, CONSOLE_WRITE_CHUNK, CONSOLE_WRITE_MAX};
use crate::guest::{StopReason, Vcpu, Vm};
use crate::vmx::{Guest32, Vmcs};

/// True when the guest runs 64-bit code (IA-32e mode and CS.L = 1, SDM 3.4.5).
#[inline(always)]
fn in_64bit_code<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    crate::mmio::CodeSize::of(vmcs) == crate::mmio::CodeSize::Bits64
}

/// The hypercalls that only read a figure of Keel's (GUEST_ID, CPU_TIME, BALLOON_TARGET,
/// BALLOON_GIVEN: `fast::is_register_only`), answered; `None` for any other number.
#[inline(always)]
fn figure(nr: u64, vm: &Vm, vcpu: &Vcpu) -> Option<u64> {
    Some(match nr {
        hc::GUEST_ID => vm.id as u64,
        hc::CPU_TIME => vcpu.stats.cpu_cycles,
        hc::BALLOON_TARGET => vm.ram.balloon.target,
        hc::BALLOON_GIVEN => vm.ram.balloon.given_pages(),
        _ => return None,
    })
}

/// Whether the guest may make a hypercall: SDM 25.1.3 / VMCALL: CPL > 0 in the guest still
/// exits; Keel only serves ring 0 (else #UD). Counted when it may.
#[inline(always)]
fn admitted<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu) -> bool {
    if vmcs.read(Guest32::SsAccessRights) >> 5 & 3 != 0 {
        return false;
    }
    vcpu.stats.hypercalls += 1;
    true
}

/// [`handle`] for a hypercall that only reads a figure ([`figure`]; the caller,
/// `fast::handle_register_only`, checked the number with RAX's upper half clear, so it is the
/// same in any code size): without the general dispatch over every hypercall and its action
/// returned through memory (about 30 instructions, docs/BENCHMARKS.md).
#[inline(always)]
pub fn handle_figure<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    if !admitted(&*cx.vmcs, cx.vcpu) {
        return Action::Inject(super::Exception::UD);
    }
    match figure(cx.vcpu.regs.rax, cx.vm, cx.vcpu) {
        Some(value) => {
            set_result(&*cx.vmcs, cx.vcpu, value);
            Action::Advance
        }
        None => handle_admitted(cx),
    }
}

/// YIELD for the run loop's tight loop (`fast::handle_yield`), once it checked the number with
/// RAX's upper half clear (YIELD in any code size): admitted and counted as [`handle`] admits
/// and counts it, and its result (OK, the same in any code size) in RAX. False, with nothing
/// done, from CPL > 0: the general dispatch then queues the #UD.
#[inline(always)]
pub fn handle_yield<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu) -> bool {
    if !admitted(vmcs, vcpu) {
        return false;
    }
    vcpu.regs.rax = status::OK;
    true
}

#[inline]
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    if !admitted(&*cx.vmcs, cx.vcpu) {
        return Action::Inject(super::Exception::UD);
    }
    handle_admitted(cx)
}

/// [`handle`] once the hypercall is admitted and counted.
#[inline(never)]
fn handle_admitted<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let wide = in_64bit_code(cx.vmcs);
    let arg = |v: u64| if wide { v } else { v & 0xffff_ffff };
    let r = cx.vcpu.regs;
    let (nr, a1, a2) = (arg(r.rax), arg(r.rbx), arg(r.rcx));
    let mut action = Action::Advance;
    let result = match nr {
        hc::CONSOLE_WRITE => {
            if a2 > CONSOLE_WRITE_MAX {
                status::EINVAL
            } else {
                let vm = &mut *cx.vm;
                match vm.ram.slice(a1, a2) {
                    Some(bytes) => {
                        // A short write (docs/HYPERCALLS.md): at most CONSOLE_WRITE_CHUNK bytes,
                        // so that one call's work never holds up another guest's timer; and
                        // only what fits when the console is full, in which case the guest also
                        // gives up its slice, so that Keel's console drains while it waits.
                        let chunk = &bytes[..bytes.len().min(CONSOLE_WRITE_CHUNK as usize)];
                        let taken = vm.platform.console().offer(chunk);
                        if taken < chunk.len() {
                            action = Action::Yield;
                        }
                        taken as u64
                    }
                    None => status::EFAULT,
                }
            }
        }
        hc::YIELD => {
            action = Action::Yield;
            status::OK
        }
        hc::GUEST_ID | hc::CPU_TIME | hc::BALLOON_TARGET | hc::BALLOON_GIVEN => {
            figure(nr, cx.vm, cx.vcpu).unwrap_or(status::ENOSYS)
        }
        hc::SHUTDOWN => return Action::Stop(StopReason::Shutdown(a1)),
        hc::PRINT_STATS => {
            cx.vm.stats_requested = true;
            status::OK
        }
        hc::BALLOON_GIVE | hc::BALLOON_TAKE => {
            use crate::balloon::{check, Op};
            let op = if nr == hc::BALLOON_GIVE {
                Op::Give
            } else {
                Op::Take
            };
            match check(op, a1, a2, &cx.vm.ram) {
                // Carried out by the run loop right after this exit, which puts the result in
                // RAX (`runloop`).
                Ok(req) => {
                    cx.vm.ram.balloon.pending = Some((req, wide));
                    status::OK
                }
                Err(e) => e,
            }
        }
        _ => status::ENOSYS,
    };
    cx.vcpu.regs.rax = arg(result);
    action
}

/// Puts a hypercall's result in RAX (its low 32 bits outside 64-bit code).
fn set_result<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu, result: u64) {
    vcpu.regs.rax = if in_64bit_code(vmcs) {
        result
    } else {
        result & 0xffff_ffff
    };
}

/// PRINT_STATS found no room for the table on Keel's console (the calling guest's share of it
/// holds output not yet sent): nothing was printed, and the call returns EAGAIN instead of 0.
pub fn print_stats_refused<V: Vmcs + ?Sized>(vmcs: &V, vcpu: &mut Vcpu) {
    set_result(vmcs, vcpu, status::EAGAIN);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;
    use crate::vmx::ExitReason;

    #[test]
    fn console_write_id_and_errors() {
        let mut t = TestBed::new();
        t.long_mode();
        t.vm.ram.bytes()[0x100..0x106].copy_from_slice(b"hello\n");
        t.vcpu.regs.rax = hc::CONSOLE_WRITE;
        t.vcpu.regs.rbx = 0x100;
        t.vcpu.regs.rcx = 6;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Advance);
        assert_eq!(t.vcpu.regs.rax, 6);
        assert_eq!(
            t.vm.platform.console().take_line().as_deref(),
            Some("hello")
        );

        t.vcpu.regs.rax = hc::CONSOLE_WRITE;
        t.vcpu.regs.rbx = t.vm.ram.len() - 2;
        t.vcpu.regs.rcx = 6;
        t.run(ExitReason::Vmcall);
        assert_eq!(
            t.vcpu.regs.rax,
            status::EFAULT,
            "buffer past the end of RAM"
        );

        t.vcpu.regs.rax = hc::CONSOLE_WRITE;
        t.vcpu.regs.rbx = u64::MAX - 2;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, status::EFAULT, "overflowing pointer");

        t.vcpu.regs.rax = hc::GUEST_ID;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, t.vm.id as u64);

        t.vcpu.regs.rax = 0x7777;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, status::ENOSYS);

        t.vcpu.regs.rax = hc::YIELD;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Yield);
        t.vcpu.regs.rax = hc::SHUTDOWN;
        t.vcpu.regs.rbx = 7;
        assert_eq!(
            t.run(ExitReason::Vmcall),
            Action::Stop(StopReason::Shutdown(7))
        );
    }

    /// The balloon calls: the target and count answered at once; a GIVE or TAKE checked here
    /// (errors in RAX at once) and, when good, left for the run loop with RAX 0 until then.
    #[test]
    fn balloon_calls_are_checked_then_left_to_the_run_loop() {
        use crate::balloon::{Op, Request};
        let mut t = TestBed::new();
        t.long_mode();
        t.vm.ram.balloon.target = 77;
        let call = |t: &mut TestBed, nr, gpa, pages| {
            t.vcpu.regs.rax = nr;
            t.vcpu.regs.rbx = gpa;
            t.vcpu.regs.rcx = pages;
            assert_eq!(t.run(ExitReason::Vmcall), Action::Advance);
            t.vcpu.regs.rax
        };
        assert_eq!(call(&mut t, hc::BALLOON_TARGET, 0, 0), 77);
        assert_eq!(call(&mut t, hc::BALLOON_GIVEN, 0, 0), 0);
        assert_eq!(call(&mut t, hc::BALLOON_GIVE, 0x1234, 1), status::EINVAL);
        assert_eq!(call(&mut t, hc::BALLOON_GIVE, 0x1000, 0), status::EINVAL);
        let end = t.vm.ram.len();
        assert_eq!(call(&mut t, hc::BALLOON_GIVE, end, 1), status::EINVAL);
        assert_eq!(call(&mut t, hc::BALLOON_TAKE, 0x1000, 1), status::EEXIST);
        assert_eq!(t.vm.ram.balloon.pending, None, "nothing for the run loop");
        assert_eq!(call(&mut t, hc::BALLOON_GIVE, 0x1000, 2), status::OK);
        let give = Request {
            op: Op::Give,
            gpa: 0x1000,
            pages: 2,
        };
        assert_eq!(t.vm.ram.balloon.pending, Some((give, true)));
    }

    /// A CONSOLE_WRITE into a full console is short: it returns what was accepted and ends the
    /// caller's slice, and every accepted byte comes out (issue 8: a 700-line call printed lines
    /// 444-699 and returned "all bytes written").
    #[test]
    fn console_write_is_short_when_the_console_is_full() {
        let mut t = TestBed::new();
        t.long_mode();
        // 700 lines `c000\n`..`c699\n` (one 3500-byte call's worth), three times over in RAM.
        let stream: alloc::vec::Vec<u8> = (0..2100)
            .flat_map(|i: u32| alloc::format!("c{:03}\n", i % 700).into_bytes())
            .collect();
        t.vm.ram.bytes()[0x1000..0x1000 + stream.len()].copy_from_slice(&stream);
        // The guest writes up to 3500 bytes from `from`, as a 700-line call would.
        let write = |t: &mut TestBed, from: u64| {
            t.vcpu.regs.rax = hc::CONSOLE_WRITE;
            t.vcpu.regs.rbx = 0x1000 + from;
            t.vcpu.regs.rcx = 3500;
            let action = t.run(ExitReason::Vmcall);
            (t.vcpu.regs.rax, action)
        };
        // Nobody drains the console meanwhile (Keel's COM1 queue is full). Each call takes at
        // most CONSOLE_WRITE_CHUNK bytes, and the guest goes on from there, until one is short
        // for want of room.
        let mut accepted = 0;
        for _ in 0..8 {
            assert_eq!(
                write(&mut t, accepted),
                (CONSOLE_WRITE_CHUNK, Action::Advance)
            );
            accepted += CONSOLE_WRITE_CHUNK;
        }
        // 8 KiB holds 1638 whole lines (8190 bytes); the next line's `c238` is taken too, but
        // its newline does not fit.
        assert_eq!(write(&mut t, accepted), (2, Action::Yield));
        accepted += 2;
        assert_eq!(accepted, 1638 * 5 + 4);
        assert_eq!(write(&mut t, accepted), (0, Action::Yield));
        let mut out = 0;
        for i in 0..1638 {
            let line = t.vm.platform.console().take_line();
            assert_eq!(line, Some(alloc::format!("c{:03}", i % 700)));
            out += 5;
        }
        assert_eq!(t.vm.platform.console().take_line(), None);
        assert_eq!(
            t.vm.platform.console().take_partial().as_deref(),
            Some("c238")
        );
        assert_eq!(out + 4, accepted, "every accepted byte comes out, no other");
        // Drained: the guest goes on where it stopped.
        assert_eq!(
            write(&mut t, accepted),
            (CONSOLE_WRITE_CHUNK, Action::Advance)
        );
    }

    /// PRINT_STATS returns EAGAIN when Keel could not print the table (before: 0 always, and
    /// Keel waited for COM1 with the other guests' timers due).
    #[test]
    fn print_stats_says_when_it_printed_nothing() {
        let mut t = TestBed::new();
        t.long_mode();
        t.vcpu.regs.rax = hc::PRINT_STATS;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Advance);
        assert!(t.vm.stats_requested);
        assert_eq!(t.vcpu.regs.rax, status::OK);
        print_stats_refused(&t.vmcs, &mut t.vcpu);
        assert_eq!(t.vcpu.regs.rax, status::EAGAIN);
        assert_eq!(status::EAGAIN, -11i64 as u64);
        let mut t = TestBed::new();
        t.vcpu.regs.rax = hc::PRINT_STATS;
        t.run(ExitReason::Vmcall);
        print_stats_refused(&t.vmcs, &mut t.vcpu);
        assert_eq!(t.vcpu.regs.rax, 0xffff_fff5, "EAX in 32-bit code");
    }

    /// In 32-bit code only EAX/EBX/ECX count (values whose upper halves would make them ENOSYS
    /// or EFAULT if read whole) and the result is cut to 32 bits.
    #[test]
    fn protected_mode_truncates() {
        let mut t = TestBed::new();
        assert!(
            !in_64bit_code(&t.vmcs),
            "the test bed starts in 32-bit code"
        );
        t.vm.ram.bytes()[0x100..0x103].copy_from_slice(b"hi\n");
        t.vcpu.regs.rax = 0xdead_0000_0000_0000 | hc::CONSOLE_WRITE;
        t.vcpu.regs.rbx = 0x1_0000_0000 | 0x100;
        t.vcpu.regs.rcx = 0xffff_ffff_0000_0000 | 3;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Advance);
        assert_eq!(t.vcpu.regs.rax, 3);
        assert_eq!(t.vm.platform.console().take_line().as_deref(), Some("hi"));

        t.vcpu.regs.rax = 0x1_0000_0000 | hc::GUEST_ID;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, u64::from(t.vm.id));

        t.vcpu.stats.cpu_cycles = 0x1234_5678_9abc_def0;
        t.vcpu.regs.rax = hc::CPU_TIME;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, 0x9abc_def0, "result cut to 32 bits");

        t.vcpu.regs.rax = 0xdead_0000_0000_0000 | 0x7777;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, status::ENOSYS & 0xffff_ffff);
    }

    #[test]
    fn cs_l_outside_ia32e_mode_is_not_64_bit_code() {
        // SDM 3.4.5: CS.L counts only in IA-32e mode (EFER.LMA); a protected-mode guest whose CS
        // has L set runs 32-bit code, so only EAX names the hypercall.
        let mut t = TestBed::new();
        t.vmcs.write(crate::vmx::GuestNat::Cr0, 0x11);
        t.vmcs.write(Guest32::CsAccessRights, 0x20_9b | 1 << 14);
        t.vcpu.regs.rax = 0xdead_0000_0000_0000 | hc::GUEST_ID;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.vcpu.regs.rax, t.vm.id as u64);
    }
}
