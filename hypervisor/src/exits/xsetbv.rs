//! XSETBV: the guest sets XCR0. SDM 13.3 and the XSETBV reference: #GP(0) unless CPL = 0, ECX = 0,
//! bit 0 (x87) set, no bit the CPU does not support, AVX (bit 2) only with SSE (bit 1), the MPX
//! pair (bits 3, 4) together, the AVX-512 trio (bits 5-7) all or none and only with AVX.
//! Components of features CPUID hides (MPX) count as unsupported. Keel does not use extended
//! state itself; the value is loaded into the real XCR0 before the
//! guest next runs.

use super::{Action, Exception, ExitContext};
use crate::vmx::{Guest32, Vmcs};

pub fn valid_xcr0(supported: u64, v: u64) -> bool {
    let avx512 = 0b111 << 5;
    v & 1 != 0
        && v & !supported == 0
        && !(v & 4 != 0 && v & 2 == 0)
        && (v >> 3) & 3 != 1
        && (v >> 3) & 3 != 2
        && (v & avx512 == 0 || (v & avx512 == avx512 && v & 4 != 0))
}

pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let cpl = cx.vmcs.read(Guest32::SsAccessRights) >> 5 & 3;
    let ecx = cx.vcpu.regs.rcx as u32;
    let v = (cx.vcpu.regs.rdx << 32) | (cx.vcpu.regs.rax & 0xffff_ffff);
    let supported = cx.host.xcr0_supported() & !super::cpuid::XCR0_HIDDEN;
    if cpl != 0 || ecx != 0 || !valid_xcr0(supported, v) {
        return Action::Inject(Exception::GP0);
    }
    cx.vcpu.xcr0 = v;
    Action::Advance
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcr0_rules() {
        let sup = 0xe7; // x87, SSE, AVX, AVX-512
        assert!(valid_xcr0(sup, 1));
        assert!(valid_xcr0(sup, 0b111));
        assert!(valid_xcr0(sup, 0xe7));
        assert!(!valid_xcr0(sup, 0), "x87 must stay on");
        assert!(!valid_xcr0(sup, 0b101), "AVX needs SSE");
        assert!(!valid_xcr0(sup, 0b11 | 1 << 5), "AVX-512 all or none");
        assert!(!valid_xcr0(sup, 0x63), "AVX-512 needs AVX");
        assert!(!valid_xcr0(sup, 0b1011), "MPX not supported here");
        assert!(!valid_xcr0(0x1f, 0b1011), "MPX bits go together");
        assert!(valid_xcr0(0x1f, 0b11011));
    }

    #[test]
    fn mpx_state_is_refused_as_cpuid_hides_it() {
        use crate::exits::testing::TestBed;
        use crate::vmx::ExitReason;
        let mut t = TestBed::new();
        t.vcpu.regs.rax = 0xd;
        t.vcpu.regs.rcx = 0;
        t.run(ExitReason::Cpuid);
        let advertised = t.vcpu.regs.rax;
        assert_eq!(
            advertised & 0x18,
            0,
            "BNDREGS/BNDCSR not in CPUID.(0DH,0):EAX"
        );
        for v in [0b1_1011, 0b0_1011, 0b1_0011] {
            t.vcpu.regs.rcx = 0;
            t.vcpu.regs.rax = v;
            t.vcpu.regs.rdx = 0;
            assert_eq!(
                t.run(ExitReason::Xsetbv),
                Action::Inject(Exception::GP0),
                "{v:#x}"
            );
        }
        t.vcpu.regs.rcx = 0;
        t.vcpu.regs.rax = 0b111;
        assert_eq!(t.run(ExitReason::Xsetbv), Action::Advance);
        assert_eq!(t.vcpu.xcr0, 0b111);
    }
}
