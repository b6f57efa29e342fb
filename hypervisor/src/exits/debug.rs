//! The guest's debug registers, and the debug exceptions Keel owes for the I/O it emulates
//! (SDM Vol. 3B chapter 17, "Debug, Branch Profile, TSC, and Intel Resource Director Technology
//! Features": 17.2 debug registers, 17.3 debug exceptions).
//!
//! Where a guest's debug state lives:
//! - DR7 and IA32_DEBUGCTL are in the VMCS: "save debug controls" stores them in the guest-state
//!   area at every VM exit and "load debug controls" loads them at every VM entry (SDM 25.7.1,
//!   25.8.1, 28.3.1, 27.3.2.1). At the exit the CPU leaves DR7 = 400H and IA32_DEBUGCTL = 0 for
//!   Keel (SDM 28.5.1), so no guest breakpoint is armed while Keel runs. Nothing on the exit path
//!   writes the DR7 field; only booting a guest sets it to its power-on value.
//! - DR0-DR3 and DR6 are not in the VMCS. A guest reads and writes them without an exit
//!   (MOV-DR exiting is off) and the CPU matches breakpoints against the real registers, so the
//!   guest's values must be in them while it runs whatever Keel does; intercepting MOV DR would
//!   only add an exit per access (Linux writes DR6 in every #DB handler and DR7 on every switch
//!   to a traced task). Keel therefore switches them with the rest of the state VMX leaves alone
//!   (`hypervisor::SavedState`: saved when a guest is switched out, restored when it is switched
//!   in, set to the power-on values, DR0-DR3 = 0 and DR6 = FFFF0FF0H, when it is (re)booted).
//!   Keel itself never uses DR0-DR3 or DR6.
//! - Breakpoints on what Keel emulates: the CPU does not see the accesses Keel performs on the
//!   guest's behalf. [`Breakpoints::io`] matches the guest's enabled I/O breakpoints (DR7
//!   R/Wn = 10 with CR4.DE = 1, SDM 17.2.4) against the ports of an emulated IN/OUT/INS/OUTS,
//!   [`Breakpoints::data`] its data breakpoints against the memory an emulated INS/OUTS writes or
//!   reads, and [`queue_trap`] has the CPU deliver the trap-class #DB after the instruction (SDM
//!   17.3.1.2) through the pending-debug-exceptions field (SDM 25.4.2, 27.7.3), which sets DR6.Bn
//!   itself.

use super::ExitContext;
use crate::vmx::{GuestNat, Vmcs};

/// DR6 at power-on and after INIT (SDM Vol. 3A, "IA-32 and Intel 64 Processor States Following
/// Power-up, Reset, or INIT"); DR0-DR3 are 0.
pub const DR6_INIT: u64 = 0xffff_0ff0;
/// DR7 at power-on; also what the CPU leaves in DR7 at a VM exit (SDM 28.5.1).
pub const DR7_INIT: u64 = 0x400;

const CR4_DE: u64 = 1 << 3;
/// DR7's enable bits L0-L3 and G0-G3 (SDM 17.2.4): with none set, no breakpoint is armed.
pub const DR7_ENABLES: u64 = 0xff;

/// Bits of the pending-debug-exceptions field (SDM 25.4.2, Table 25-4).
pub mod pending {
    /// B3-B0: breakpoint n's condition was met.
    pub const B_MASK: u64 = 0xf;
    /// At least one data or I/O breakpoint was met and enabled in DR7; without it VM entry
    /// ignores B3-B0 (SDM 27.7.3).
    pub const ENABLED_BREAKPOINT: u64 = 1 << 12;
    /// A single-step trap is pending.
    pub const BS: u64 = 1 << 14;
}

/// DR7's fields for breakpoint `n` (SDM 17.2.4): enabled (Ln or Gn), R/Wn, LENn.
fn breakpoint(dr7: u64, n: usize) -> (bool, u64, u64) {
    let enabled = dr7 >> (2 * n) & 0b11 != 0;
    let rw = dr7 >> (16 + 4 * n) & 0b11;
    let len = dr7 >> (18 + 4 * n) & 0b11;
    (enabled, rw, len)
}

/// Bytes covered by LENn = `len` (SDM 17.2.5): 00 = 1, 01 = 2, 10 = 8, 11 = 4.
fn len_bytes(len: u64) -> u64 {
    match len {
        0b00 => 1,
        0b01 => 2,
        0b10 => 8,
        _ => 4,
    }
}

/// The guest's breakpoints as they stand at an exit, for matching the accesses Keel performs on
/// its behalf. The results are DR6-style masks: bit n = breakpoint n met (B0-B3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breakpoints {
    pub dr7: u64,
    pub cr4: u64,
    /// DR0-DR3.
    pub addresses: [u64; 4],
}

impl Breakpoints {
    /// From the guest's DR7 and CR4 (VMCS) and DR0-DR3 (the CPU's, the guest's own while it is
    /// loaded). The usual case, no breakpoint enabled, costs one VMREAD.
    #[inline]
    pub fn of<V: Vmcs + ?Sized>(cx: &ExitContext<'_, V>) -> Self {
        let dr7 = cx.vmcs.read(GuestNat::Dr7);
        if dr7 & DR7_ENABLES == 0 {
            return Self::default();
        }
        Self {
            dr7,
            cr4: cx.vmcs.read(GuestNat::Cr4),
            addresses: cx.host.breakpoint_addresses(),
        }
    }

    /// The enabled breakpoints whose R/W `accepts` and whose range holds a byte of the `size`
    /// bytes at `first`. SDM 17.2.5: the range is LENn bytes at DRn with its low bits masked by
    /// LENn (the processor enforces alignment that way); any byte of the access in it counts.
    #[inline]
    fn met(&self, first: u64, size: u64, accepts: impl Fn(u64) -> bool) -> u8 {
        // The usual case, no breakpoint enabled: nothing to compare.
        if self.dr7 & DR7_ENABLES == 0 {
            return 0;
        }
        let last = first.saturating_add(size.max(1) - 1);
        let mut hits = 0;
        for (n, &address) in self.addresses.iter().enumerate() {
            let (enabled, rw, len) = breakpoint(self.dr7, n);
            let bytes = len_bytes(len);
            let start = address & !(bytes - 1);
            if enabled && accepts(rw) && first <= start + (bytes - 1) && last >= start {
                hits |= 1 << n;
            }
        }
        hits
    }

    /// I/O breakpoints met by an access of `size` bytes at `port`. SDM 17.2.4: R/Wn = 10 means
    /// "I/O reads or writes" only with CR4.DE = 1 (undefined otherwise: Keel then matches
    /// nothing); I/O addresses are zero-extended for the comparison (SDM 17.2.5).
    #[inline]
    pub fn io(&self, port: u16, size: u8) -> u8 {
        if self.cr4 & CR4_DE == 0 {
            return 0;
        }
        self.met(u64::from(port), u64::from(size), |rw| rw == 0b10)
    }

    /// Data breakpoints met by an access of `size` bytes at linear address `linear` (SDM 17.2.4:
    /// R/Wn = 01 for writes only, 11 for reads or writes).
    #[inline]
    pub fn data(&self, linear: u64, size: u64, write: bool) -> u8 {
        self.met(linear, size, |rw| rw == 0b11 || (write && rw == 0b01))
    }
}

/// Has the CPU deliver a debug exception for breakpoints `hits` (bit n = Bn) after the next VM
/// entry, as a trap on the instruction Keel just completed (SDM 27.7.3: "treated as they would
/// had they been encountered normally in guest execution"; the CPU updates DR6 as it delivers
/// it). Pending debug exceptions already in the field (saved by the exit) are kept.
#[inline]
pub fn queue_trap<V: Vmcs + ?Sized>(vmcs: &mut V, hits: u8) {
    if hits == 0 {
        return;
    }
    let field = vmcs.read(GuestNat::PendingDebugExceptions);
    let bits = u64::from(hits) & pending::B_MASK | pending::ENABLED_BREAKPOINT;
    vmcs.write(GuestNat::PendingDebugExceptions, field | bits);
}

/// Whether the next VM entry delivers a pending debug exception. Injecting an event at that
/// entry would make the CPU ignore it (SDM 27.7.3: the field is only honoured when the entry is
/// not vectoring), and the debug trap has priority over external interrupts anyway (SDM Vol. 3A,
/// "Priority Among Concurrent Exceptions and Interrupts": traps on the previous instruction come
/// before external interrupts): an interrupt waits for an interrupt window instead.
#[inline]
pub fn trap_pending<V: Vmcs + ?Sized>(vmcs: &V) -> bool {
    vmcs.read(GuestNat::PendingDebugExceptions) & (pending::ENABLED_BREAKPOINT | pending::BS) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DR7 with breakpoint `n` enabled locally with R/W `rw` and LEN `len`.
    fn enable(n: usize, rw: u64, len: u64) -> u64 {
        DR7_INIT | 1 << (2 * n) | rw << (16 + 4 * n) | len << (18 + 4 * n)
    }

    const DE: u64 = CR4_DE;

    fn io_breakpoints(dr7: u64, cr4: u64, dr: &[u64; 4], port: u16, size: u8) -> u8 {
        let b = Breakpoints {
            dr7,
            cr4,
            addresses: *dr,
        };
        b.io(port, size)
    }

    /// Each (port, size, breakpoints met) with CR4.DE set.
    fn expect_hits(dr7: u64, dr: [u64; 4], cases: &[(u16, u8, u8)]) {
        for &(port, size, hits) in cases {
            let got = io_breakpoints(dr7, DE, &dr, port, size);
            assert_eq!(got, hits, "{size} bytes at port {port:#x}");
        }
    }

    #[test]
    fn one_byte_io_breakpoint_matches_its_port_only() {
        // A wider access that includes the port meets it (any byte of the access counts).
        let cases = [
            (0x80, 1, 1),
            (0x81, 1, 0),
            (0x7f, 1, 0),
            (0x7f, 2, 1),
            (0x7e, 4, 1),
        ];
        expect_hits(enable(0, 0b10, 0b00), [0x80, 0, 0, 0], &cases);
        expect_hits(enable(0, 0b10, 0b00), [0x80, 0, 0, 0], &[(0x7c, 4, 0)]);
    }

    #[test]
    fn len_masks_the_low_address_bits() {
        // LEN = 2 bytes at 71H covers 70H-71H (the processor masks bit 0).
        let cases = [(0x70, 1, 0b10), (0x71, 1, 0b10), (0x72, 1, 0)];
        expect_hits(enable(1, 0b10, 0b01), [0, 0x71, 0, 0], &cases);
        // LEN = 4 bytes (11) at 3FAH covers 3F8H-3FBH; LEN = 8 bytes (10) at 3F9H covers 3F8H-3FFH.
        let dr7 = enable(2, 0b10, 0b11) | enable(3, 0b10, 0b10);
        let cases = [
            (0x3f8, 1, 0b1100),
            (0x3fb, 1, 0b1100),
            (0x3fc, 1, 0b1000),
            (0x3ff, 1, 0b1000),
            (0x400, 2, 0),
        ];
        expect_hits(dr7, [0, 0, 0x3fa, 0x3f9], &cases);
    }

    #[test]
    fn io_breakpoints_need_cr4_de_an_enable_bit_and_rw_10() {
        let dr = [0x80, 0x80, 0x80, 0x80];
        let io = enable(0, 0b10, 0);
        assert_eq!(io_breakpoints(io, 0, &dr, 0x80, 1), 0, "CR4.DE = 0");
        // Disabled (no L0/G0), or a data breakpoint at the same number: no I/O match.
        assert_eq!(io_breakpoints(io & !0b11, DE, &dr, 0x80, 1), 0);
        for rw in [0b00, 0b01, 0b11] {
            assert_eq!(io_breakpoints(enable(0, rw, 0), DE, &dr, 0x80, 1), 0);
        }
        // G0 alone enables it; every matching enabled breakpoint is reported.
        let global = DR7_INIT | 0b10 | 0b10 << 16;
        assert_eq!(io_breakpoints(global, DE, &dr, 0x80, 1), 0b0001);
        let all = (0..4).fold(DR7_INIT, |d, n| d | enable(n, 0b10, 0));
        assert_eq!(io_breakpoints(all, DE, &dr, 0x80, 1), 0b1111);
        // DRn is compared whole: 10080H is not port 80H.
        assert_eq!(io_breakpoints(io, DE, &[0x1_0080, 0, 0, 0], 0x80, 1), 0);
    }

    #[test]
    fn data_breakpoints_by_access_kind() {
        // DR0: writes to the 4 bytes at 1000H; DR1: reads or writes of the 8 bytes at 2000H;
        // DR2: an I/O breakpoint on port 1000H; DR3: an instruction breakpoint at 2000H.
        let b = Breakpoints {
            dr7: enable(0, 0b01, 0b11)
                | enable(1, 0b11, 0b10)
                | enable(2, 0b10, 0)
                | enable(3, 0b00, 0),
            cr4: DE,
            addresses: [0x1000, 0x2000, 0x1000, 0x2000],
        };
        assert_eq!(b.data(0x1003, 1, true), 0b0001);
        assert_eq!(b.data(0x1000, 4, false), 0, "DR0 watches writes only");
        assert_eq!(b.data(0x0fff, 2, true), 0b0001);
        assert_eq!(b.data(0x2007, 1, false), 0b0010);
        assert_eq!(b.data(0x1ffc, 8, true), 0b0010);
        assert_eq!(b.data(0x2008, 1, true), 0);
        assert_eq!(
            b.io(0x1000, 1),
            0b0100,
            "only the I/O breakpoint sees port 1000H"
        );
        // The top of the address space does not wrap around to 0.
        assert_eq!(b.data(u64::MAX, 8, true), 0);
    }

    #[test]
    fn nothing_on_the_exit_path_rewrites_dr7() {
        // The guest's DR7 is in the VMCS from the exit to the next entry ("save/load debug
        // controls"); a write on the way would reset its breakpoints and DR7.GD.
        use crate::exits::testing::TestBed;
        use crate::vmx::{ExitReason, VmcsField};
        let mut t = TestBed::new();
        t.vmcs.write(GuestNat::Rflags, 0x202);
        for reason in [
            ExitReason::Cpuid,
            ExitReason::IoInstruction,
            ExitReason::Vmcall,
            ExitReason::Rdmsr,
            ExitReason::Wrmsr,
            ExitReason::Hlt,
            ExitReason::PreemptionTimer,
            ExitReason::ExternalInterrupt,
            ExitReason::InterruptWindow,
            ExitReason::ControlRegisterAccess,
            ExitReason::Xsetbv,
            ExitReason::Wbinvd,
            ExitReason::Vmxon,
        ] {
            t.run(reason);
            super::super::inject_pending_interrupt(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
        }
        let dr7 = GuestNat::Dr7.encoding();
        assert!(!t.vmcs.writes.iter().any(|&(e, _)| e == dr7));
    }

    #[test]
    fn an_interrupt_waits_while_a_debug_trap_is_pending() {
        use crate::exits::testing::{TestBed, TEST_TSC_HZ};
        use crate::vmx::controls::PrimaryControls;
        use crate::vmx::Control32;
        let mut t = TestBed::new();
        // 8259A: vectors 20H-27H, only IRQ0 unmasked; the PIT raises IRQ0.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0xfe),
        ] {
            t.vm.platform.io_write(port, 1, v, 0);
        }
        for (port, v) in [(0x43, 0x34), (0x40, 100), (0x40, 0)] {
            t.vm.platform.io_write(port, 1, v, 0);
        }
        t.vm.platform.advance(TEST_TSC_HZ / 100);
        assert!(t.vm.platform.pending_interrupt(0).is_some());
        t.vmcs.write(GuestNat::Rflags, 0x202);
        queue_trap(&mut t.vmcs, 0b0001);
        super::super::inject_pending_interrupt(&mut t.vmcs, &mut t.vcpu, &mut t.vm);
        assert_eq!(
            t.vmcs.read(Control32::EntryInterruptionInfo) >> 31,
            0,
            "not injected"
        );
        let window = PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
        assert_ne!(t.vmcs.read(Control32::PrimaryProcBasedControls) & window, 0);
        assert!(trap_pending(&t.vmcs), "the trap is still delivered");
    }

    #[test]
    fn a_queued_trap_keeps_what_the_exit_saved() {
        let mut v = crate::vmx::FakeVmcs::new();
        queue_trap(&mut v, 0);
        assert!(v.writes.is_empty(), "nothing met: no write");
        assert!(!trap_pending(&v));
        v.set(GuestNat::PendingDebugExceptions, pending::BS);
        queue_trap(&mut v, 0b0101);
        assert_eq!(
            v.read(GuestNat::PendingDebugExceptions),
            pending::BS | pending::ENABLED_BREAKPOINT | 0b0101
        );
        assert!(trap_pending(&v));
    }
}
