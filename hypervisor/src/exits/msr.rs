//! RDMSR/WRMSR. The MSR bitmap (SDM 24.6.9) lets the MSRs that VMX already switches, or that Keel
//! switches between guests, go straight to the CPU; every other access exits here and is emulated
//! from the table in [`policy`] or answered with #GP, as a CPU without that MSR would.

use super::{Action, Exception, ExitContext};
use crate::vmx::{Guest64, Vmcs};

pub mod index {
    pub const TSC: u32 = 0x10;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const APIC_BASE: u32 = 0x1b;
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const SPEC_CTRL: u32 = 0x48;
    pub const PRED_CMD: u32 = 0x49;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const MTRR_CAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MCG_CAP: u32 = 0x179;
    pub const MCG_STATUS: u32 = 0x17a;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const VMX_FIRST: u32 = 0x480;
    pub const VMX_LAST: u32 = 0x493;
    pub const TSC_DEADLINE: u32 = 0x6e0;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// MSRs a guest reads and writes without an exit. The VMCS switches the SYSENTER MSRs and the
/// FS/GS bases (SDM 25.3/27.5); Keel saves and restores the SYSCALL MSRs, KERNEL_GS_BASE and
/// TSC_AUX when it switches guests (Keel itself never uses them).
pub const PASSTHROUGH: &[u32] = &[
    index::SYSENTER_CS,
    index::SYSENTER_ESP,
    index::SYSENTER_EIP,
    index::FS_BASE,
    index::GS_BASE,
    index::KERNEL_GS_BASE,
    index::STAR,
    index::LSTAR,
    index::CSTAR,
    index::SFMASK,
    index::TSC_AUX,
];

/// MSRs a guest reads without an exit but whose writes Keel handles. RDMSR of IA32_TSC already
/// includes the TSC offset (SDM 26.3).
pub const READ_PASSTHROUGH: &[u32] = &[index::TSC];

/// Builds the 4 KiB MSR bitmap: read-low, read-high, write-low, write-high quarters; a set bit
/// means "exit" (SDM 24.6.9).
pub fn bitmap() -> [u8; 4096] {
    let mut b = [0xffu8; 4096];
    let mut clear = |msr: u32, write: bool| {
        let (base, bit) = match msr {
            0..=0x1fff => (0, msr),
            0xc000_0000..=0xc000_1fff => (1024, msr - 0xc000_0000),
            _ => return,
        };
        let base = base + if write { 2048 } else { 0 };
        b[base + (bit / 8) as usize] &= !(1 << (bit % 8));
    };
    for &m in PASSTHROUGH {
        clear(m, false);
        clear(m, true);
    }
    for &m in READ_PASSTHROUGH {
        clear(m, false);
    }
    b
}

/// EFER bits a guest may set: SCE, LME, LMA (kept by the CPU), NXE.
const EFER_WRITABLE: u64 = 1 | 1 << 8 | 1 << 10 | 1 << 11;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
pub const APIC_BASE_DEFAULT: u64 = 0xfee0_0000 | APIC_BASE_BSP | APIC_BASE_ENABLE;

fn valid_pat(v: u64) -> bool {
    // Each of the eight entries must be a defined memory type: 0, 1, 4, 5, 6 or 7 (SDM 13.12.2).
    (0..8).all(|i| matches!((v >> (i * 8)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
}

pub fn read<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let msr = cx.guest.regs.rcx as u32;
    let g = &mut *cx.guest;
    let value = match msr {
        index::FEATURE_CONTROL => 1, // locked, VMX off: what a CPU without VMX shows
        index::APIC_BASE => g.apic_base,
        index::EFER => cx.vmcs.read(Guest64::Ia32Efer),
        index::PAT => cx.vmcs.read(Guest64::Ia32Pat),
        index::MISC_ENABLE => g.misc_enable,
        index::MTRR_CAP => 0,
        index::MTRR_DEF_TYPE => g.mtrr_def_type,
        index::PLATFORM_ID | index::BIOS_SIGN_ID | index::MCG_CAP | index::MCG_STATUS => 0,
        index::TSC_DEADLINE => g.platform.tsc_deadline(),
        index::SPEC_CTRL => 0,
        _ => return Action::Inject(Exception::GP0),
    };
    g.regs.rax = value & 0xffff_ffff;
    g.regs.rdx = value >> 32;
    Action::Advance
}

pub fn write<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let msr = cx.guest.regs.rcx as u32;
    let value = (cx.guest.regs.rdx << 32) | (cx.guest.regs.rax & 0xffff_ffff);
    let g = &mut *cx.guest;
    match msr {
        index::EFER => {
            if value & !EFER_WRITABLE != 0 {
                return Action::Inject(Exception::GP0);
            }
            // LMA is the CPU's to set (SDM 2.2.1): keep the current value.
            let lma = cx.vmcs.read(Guest64::Ia32Efer) & (1 << 10);
            cx.vmcs.write(Guest64::Ia32Efer, (value & !(1 << 10)) | lma);
        }
        index::PAT => {
            if !valid_pat(value) {
                return Action::Inject(Exception::GP0);
            }
            cx.vmcs.write(Guest64::Ia32Pat, value);
        }
        index::APIC_BASE => {
            // The xAPIC page stays at its default place; x2APIC is not offered.
            if value & APIC_BASE_X2APIC != 0
                || value & 0xf_ffff_f000 != 0xfee0_0000
                || value & 0x2ff != 0
            {
                return Action::Inject(Exception::GP0);
            }
            g.apic_base = value;
        }
        index::MISC_ENABLE => g.misc_enable = value,
        index::MTRR_DEF_TYPE => {
            if value & !0xcff != 0 {
                return Action::Inject(Exception::GP0);
            }
            g.mtrr_def_type = value
        }
        index::TSC_DEADLINE => g.platform.write_tsc_deadline(value, cx.now),
        // Keel owns time; a guest rewriting its TSC is ignored rather than refused.
        index::TSC | index::BIOS_SIGN_ID | index::MCG_STATUS => {}
        index::SPEC_CTRL | index::PRED_CMD => {}
        _ => return Action::Inject(Exception::GP0),
    }
    Action::Advance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;
    use crate::vmx::ExitReason;

    fn rd(t: &mut TestBed, msr: u32) -> Result<u64, Action> {
        t.guest.regs.rcx = msr as u64;
        match t.run(ExitReason::Rdmsr) {
            Action::Advance => Ok(t.guest.regs.rdx << 32 | t.guest.regs.rax),
            other => Err(other),
        }
    }

    fn wr(t: &mut TestBed, msr: u32, v: u64) -> Action {
        t.guest.regs.rcx = msr as u64;
        t.guest.regs.rax = v & 0xffff_ffff;
        t.guest.regs.rdx = v >> 32;
        t.run(ExitReason::Wrmsr)
    }

    #[test]
    fn vmx_msrs_and_unknown_ones_fault() {
        let mut t = TestBed::new();
        let gp = Err(Action::Inject(Exception::GP0));
        assert_eq!(
            rd(&mut t, index::FEATURE_CONTROL),
            Ok(1),
            "locked with VMX off"
        );
        assert_eq!(
            wr(&mut t, index::FEATURE_CONTROL, 5),
            Action::Inject(Exception::GP0)
        );
        for m in index::VMX_FIRST..=index::VMX_LAST {
            assert_eq!(rd(&mut t, m), gp);
        }
        assert_eq!(rd(&mut t, 0x1234_5678), gp);
        assert_eq!(wr(&mut t, 0xdead, 0), Action::Inject(Exception::GP0));
    }

    #[test]
    fn efer_and_pat_are_validated() {
        let mut t = TestBed::new();
        assert_eq!(
            wr(&mut t, index::EFER, 1 << 20),
            Action::Inject(Exception::GP0),
            "reserved EFER bit"
        );
        assert_eq!(wr(&mut t, index::EFER, 1 << 11 | 1), Action::Advance);
        assert_eq!(rd(&mut t, index::EFER), Ok(1 << 11 | 1));
        assert_eq!(
            wr(&mut t, index::PAT, 0x0007_0406_0007_0406),
            Action::Advance
        );
        assert_eq!(
            wr(&mut t, index::PAT, 0x0007_0406_0007_0402),
            Action::Inject(Exception::GP0)
        );
        assert_eq!(rd(&mut t, index::APIC_BASE), Ok(APIC_BASE_DEFAULT));
        assert_eq!(
            wr(
                &mut t,
                index::APIC_BASE,
                APIC_BASE_DEFAULT | APIC_BASE_X2APIC
            ),
            Action::Inject(Exception::GP0)
        );
    }

    #[test]
    fn bitmap_passes_only_the_listed_msrs() {
        let b = bitmap();
        let exits = |msr: u32, write: bool| {
            let (base, bit) = if msr < 0x2000 {
                (0, msr)
            } else {
                (1024, msr - 0xc000_0000)
            };
            let base = base + if write { 2048 } else { 0 };
            b[base + (bit / 8) as usize] & (1 << (bit % 8)) != 0
        };
        assert!(!exits(index::LSTAR, false) && !exits(index::LSTAR, true));
        assert!(!exits(index::TSC, false) && exits(index::TSC, true));
        assert!(exits(index::EFER, true) && exits(index::FEATURE_CONTROL, false));
        assert!(exits(index::VMX_FIRST, false));
    }
}
