//! VMCALL: Keel's hypercall interface (see `abi` and docs/HYPERCALLS.md).
//!
//! Pointers are guest-physical and must lie wholly inside the guest's RAM; anything else is
//! EFAULT, never a fault in Keel. In 16- and 32-bit code only the low 32 bits of the registers
//! count, and the result is truncated to 32 bits.

use super::{Action, ExitContext};
use crate::abi::{hc, status, CONSOLE_WRITE_MAX};
use crate::guest::StopReason;
use crate::vmx::{Guest32, Vmcs};

/// True when the guest runs 64-bit code (IA-32e mode and CS.L = 1, SDM 3.4.5).
fn in_64bit_code<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    crate::mmio::CodeSize::of(vmcs) == crate::mmio::CodeSize::Bits64
}

#[inline]
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    // SDM 25.1.3 / VMCALL: CPL > 0 in the guest still exits; Keel only serves ring 0.
    if cx.vmcs.read(Guest32::SsAccessRights) >> 5 & 3 != 0 {
        return Action::Inject(super::Exception::UD);
    }
    cx.guest.stats.hypercalls += 1;
    let wide = in_64bit_code(cx.vmcs);
    let arg = |v: u64| if wide { v } else { v & 0xffff_ffff };
    let r = cx.guest.regs;
    let (nr, a1, a2) = (arg(r.rax), arg(r.rbx), arg(r.rcx));
    let mut action = Action::Advance;
    let result = match nr {
        hc::CONSOLE_WRITE => {
            if a2 > CONSOLE_WRITE_MAX {
                status::EINVAL
            } else {
                match cx.guest.ram.slice(a1, a2) {
                    Some(bytes) => {
                        let bytes: alloc::vec::Vec<u8> = bytes.to_vec();
                        cx.guest.platform.console().write(&bytes);
                        a2
                    }
                    None => status::EFAULT,
                }
            }
        }
        hc::YIELD => {
            action = Action::Yield;
            status::OK
        }
        hc::GUEST_ID => cx.guest.id as u64,
        hc::SHUTDOWN => return Action::Stop(StopReason::Shutdown(a1)),
        hc::PRINT_STATS => {
            cx.guest.stats_requested = true;
            status::OK
        }
        hc::CPU_TIME => cx.guest.stats.cpu_cycles,
        _ => status::ENOSYS,
    };
    cx.guest.regs.rax = if wide { result } else { result & 0xffff_ffff };
    action
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
        t.guest.ram.bytes()[0x100..0x106].copy_from_slice(b"hello\n");
        t.guest.regs.rax = hc::CONSOLE_WRITE;
        t.guest.regs.rbx = 0x100;
        t.guest.regs.rcx = 6;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Advance);
        assert_eq!(t.guest.regs.rax, 6);
        assert_eq!(
            t.guest.platform.console().take_line().as_deref(),
            Some("hello")
        );

        t.guest.regs.rax = hc::CONSOLE_WRITE;
        t.guest.regs.rbx = t.guest.ram.len() - 2;
        t.guest.regs.rcx = 6;
        t.run(ExitReason::Vmcall);
        assert_eq!(
            t.guest.regs.rax,
            status::EFAULT,
            "buffer past the end of RAM"
        );

        t.guest.regs.rax = hc::CONSOLE_WRITE;
        t.guest.regs.rbx = u64::MAX - 2;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, status::EFAULT, "overflowing pointer");

        t.guest.regs.rax = hc::GUEST_ID;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, t.guest.id as u64);

        t.guest.regs.rax = 0x7777;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, status::ENOSYS);

        t.guest.regs.rax = hc::YIELD;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Yield);
        t.guest.regs.rax = hc::SHUTDOWN;
        t.guest.regs.rbx = 7;
        assert_eq!(
            t.run(ExitReason::Vmcall),
            Action::Stop(StopReason::Shutdown(7))
        );
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
        t.guest.ram.bytes()[0x100..0x103].copy_from_slice(b"hi\n");
        t.guest.regs.rax = 0xdead_0000_0000_0000 | hc::CONSOLE_WRITE;
        t.guest.regs.rbx = 0x1_0000_0000 | 0x100;
        t.guest.regs.rcx = 0xffff_ffff_0000_0000 | 3;
        assert_eq!(t.run(ExitReason::Vmcall), Action::Advance);
        assert_eq!(t.guest.regs.rax, 3);
        assert_eq!(
            t.guest.platform.console().take_line().as_deref(),
            Some("hi")
        );

        t.guest.regs.rax = 0x1_0000_0000 | hc::GUEST_ID;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, u64::from(t.guest.id));

        t.guest.stats.cpu_cycles = 0x1234_5678_9abc_def0;
        t.guest.regs.rax = hc::CPU_TIME;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, 0x9abc_def0, "result cut to 32 bits");

        t.guest.regs.rax = 0xdead_0000_0000_0000 | 0x7777;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, status::ENOSYS & 0xffff_ffff);
    }

    #[test]
    fn cs_l_outside_ia32e_mode_is_not_64_bit_code() {
        // SDM 3.4.5: CS.L counts only in IA-32e mode (EFER.LMA); a protected-mode guest whose CS
        // has L set runs 32-bit code, so only EAX names the hypercall.
        let mut t = TestBed::new();
        t.vmcs.write(crate::vmx::GuestNat::Cr0, 0x11);
        t.vmcs.write(Guest32::CsAccessRights, 0x20_9b | 1 << 14);
        t.guest.regs.rax = 0xdead_0000_0000_0000 | hc::GUEST_ID;
        t.run(ExitReason::Vmcall);
        assert_eq!(t.guest.regs.rax, t.guest.id as u64);
    }
}
