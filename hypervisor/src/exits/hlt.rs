//! HLT: the vCPU waits for an interrupt. The scheduler blocks it until one is pending; HLT with
//! RFLAGS.IF = 0 can only be left by an NMI (or INIT). In a guest with one vCPU the only NMIs are
//! those it sends itself through its local APIC, which are injected before its next instruction
//! unless it blocks NMIs (exits/events.rs): none can arrive during this HLT, so that guest is
//! stopped. With several vCPUs another one may send the NMI or INIT (an OS parks processors
//! with CLI; HLT), so the vCPU only halts.

use super::{Action, ExitContext, RFLAGS_IF};
use crate::guest::StopReason;
use crate::vmx::{GuestNat, Vmcs};

pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let masked = cx.vmcs.read(GuestNat::Rflags) & RFLAGS_IF == 0;
    if masked && cx.vm.platform.cpus() == 1 {
        return Action::Stop(StopReason::HaltedForever);
    }
    cx.vcpu.halted_masked = masked;
    Action::Halt
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;
    use crate::vmx::ExitReason;

    #[test]
    fn hlt_blocks_or_stops() {
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Rflags, 0x202);
        t.vmcs.write(GuestNat::Rip, 0x1000);
        t.set_instruction_length(1);
        assert_eq!(t.run(ExitReason::Hlt), Action::Halt);
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x1001, "RIP moves past HLT");
        t.vmcs.write(GuestNat::Rflags, 0x2);
        assert_eq!(
            t.run(ExitReason::Hlt),
            Action::Stop(StopReason::HaltedForever)
        );
        // With a second vCPU, which may send it an NMI or INIT, it waits.
        let board = crate::devices::board::Board::pc(0, 2);
        t.vm.platform = crate::devices::Platform::for_board(board, TEST_TSC_HZ);
        assert_eq!(t.run(ExitReason::Hlt), Action::Halt);
    }
}
