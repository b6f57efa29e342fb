//! The VMX capability MSRs (SDM Vol. 3 Appendix A, "VMX Capability Reporting Facility"), read
//! once at start-up into a plain struct that the control, CR and EPT computations query.

use bitflags::bitflags;
use core::fmt;

/// Capability MSR numbers (SDM Appendix A; Vol. 4 Table 2-2).
pub mod msr {
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

bitflags! {
    /// IA32_VMX_EPT_VPID_CAP (SDM A.10, "VPID and EPT Capabilities").
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EptVpidCap: u64 {
        const EXECUTE_ONLY = 1 << 0;
        const PAGE_WALK_4 = 1 << 6;
        const PAGE_WALK_5 = 1 << 7;
        const MEMORY_TYPE_UC = 1 << 8;
        const MEMORY_TYPE_WB = 1 << 14;
        const PAGES_2M = 1 << 16;
        const PAGES_1G = 1 << 17;
        const INVEPT = 1 << 20;
        const ACCESSED_DIRTY = 1 << 21;
        const ADVANCED_EXIT_INFO = 1 << 22;
        const SUPERVISOR_SHADOW_STACK = 1 << 23;
        const INVEPT_SINGLE_CONTEXT = 1 << 25;
        const INVEPT_ALL_CONTEXT = 1 << 26;
        const INVVPID = 1 << 32;
        const INVVPID_INDIVIDUAL_ADDRESS = 1 << 40;
        const INVVPID_SINGLE_CONTEXT = 1 << 41;
        const INVVPID_ALL_CONTEXT = 1 << 42;
        const INVVPID_SINGLE_CONTEXT_RETAINING_GLOBALS = 1 << 43;
        const _ = !0;
    }
}

/// The raw capability MSRs. An MSR the processor does not implement reads as 0 here, which
/// allows no 1-settings at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmxCaps {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// 0 unless the primary controls allow "activate secondary controls".
    pub procbased2: u64,
    /// 0 unless the secondary controls allow "enable EPT" or "enable VPID".
    pub ept_vpid_cap: u64,
    /// The TRUE_* MSRs: 0 unless IA32_VMX_BASIC bit 55 is set.
    pub true_pinbased: u64,
    pub true_procbased: u64,
    pub true_exit: u64,
    pub true_entry: u64,
}

/// IA32_VMX_PROCBASED_CTLS bit 31 (allowed-1 half): "activate secondary controls".
const ACTIVATE_SECONDARY: u64 = 1 << (32 + 31);
/// IA32_VMX_PROCBASED_CTLS2 allowed-1 bits for "enable EPT" (1) and "enable VPID" (5).
const SECONDARY_EPT: u64 = 1 << (32 + 1);
const SECONDARY_VPID: u64 = 1 << (32 + 5);
const SECONDARY_UNRESTRICTED: u64 = 1 << (32 + 7);
/// IA32_VMX_PINBASED_CTLS allowed-1 bit 6: "activate VMX-preemption timer".
const PIN_PREEMPTION_TIMER: u64 = 1 << (32 + 6);

/// The capability MSRs of Bochs 2.7 (`cpu: model=corei7_skylake_x`, built with `--enable-vmx=2`),
/// for tests. Measured there (docs/PLATFORM.md): BASIC, the CR0/CR4 fixed MSRs, PROCBASED2 and
/// EPT_VPID_CAP. The must-be-one (low) halves of the pin/primary/exit/entry MSRs and their TRUE
/// variants are Bochs' constants; their may-be-one (high) halves and MISC are what Bochs derives
/// for that model, not yet measured.
pub const BOCHS_SKYLAKE_X: [(u32, u64); 16] = [
    (msr::IA32_VMX_BASIC, 0x00d8_1000_0000_002b),
    (msr::IA32_VMX_PINBASED_CTLS, 0x0000_00ff_0000_0016),
    (msr::IA32_VMX_PROCBASED_CTLS, 0xfff9_fffe_0401_e172),
    (msr::IA32_VMX_EXIT_CTLS, 0x007f_ffff_0003_6dff),
    (msr::IA32_VMX_ENTRY_CTLS, 0x0000_ffff_0000_11ff),
    (msr::IA32_VMX_MISC, 0x0004_01e0),
    (msr::IA32_VMX_CR0_FIXED0, 0x8000_0021),
    (msr::IA32_VMX_CR0_FIXED1, 0xffff_ffff),
    (msr::IA32_VMX_CR4_FIXED0, 0x2000),
    (msr::IA32_VMX_CR4_FIXED1, 0x0037_27ff),
    (msr::IA32_VMX_PROCBASED_CTLS2, 0x0217_7fff_0000_0000),
    (msr::IA32_VMX_EPT_VPID_CAP, 0x0f01_0633_4141),
    (msr::IA32_VMX_TRUE_PINBASED_CTLS, 0x0000_00ff_0000_0016),
    (msr::IA32_VMX_TRUE_PROCBASED_CTLS, 0xfff9_fffe_0400_6172),
    (msr::IA32_VMX_TRUE_EXIT_CTLS, 0x007f_ffff_0003_6dfb),
    (msr::IA32_VMX_TRUE_ENTRY_CTLS, 0x0000_ffff_0000_11fb),
];

impl VmxCaps {
    /// Reads the capability MSRs through `rdmsr`. MSRs that exist only with some capability are
    /// read only when it is reported, so `rdmsr` is never asked for one that would #GP:
    /// PROCBASED2 needs "activate secondary controls" allowed (SDM A.3.3), EPT_VPID_CAP needs
    /// "enable EPT" or "enable VPID" allowed (SDM A.10), the TRUE_* MSRs need BASIC bit 55
    /// (SDM A.1).
    pub fn read(mut rdmsr: impl FnMut(u32) -> u64) -> Self {
        let mut caps = VmxCaps {
            basic: rdmsr(msr::IA32_VMX_BASIC),
            pinbased: rdmsr(msr::IA32_VMX_PINBASED_CTLS),
            procbased: rdmsr(msr::IA32_VMX_PROCBASED_CTLS),
            exit: rdmsr(msr::IA32_VMX_EXIT_CTLS),
            entry: rdmsr(msr::IA32_VMX_ENTRY_CTLS),
            misc: rdmsr(msr::IA32_VMX_MISC),
            cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1),
            ..Default::default()
        };
        if caps.procbased & ACTIVATE_SECONDARY != 0 {
            caps.procbased2 = rdmsr(msr::IA32_VMX_PROCBASED_CTLS2);
            if caps.procbased2 & (SECONDARY_EPT | SECONDARY_VPID) != 0 {
                caps.ept_vpid_cap = rdmsr(msr::IA32_VMX_EPT_VPID_CAP);
            }
        }
        if caps.true_controls() {
            caps.true_pinbased = rdmsr(msr::IA32_VMX_TRUE_PINBASED_CTLS);
            caps.true_procbased = rdmsr(msr::IA32_VMX_TRUE_PROCBASED_CTLS);
            caps.true_exit = rdmsr(msr::IA32_VMX_TRUE_EXIT_CTLS);
            caps.true_entry = rdmsr(msr::IA32_VMX_TRUE_ENTRY_CTLS);
        }
        caps
    }

    /// [`read`](Self::read) from a table of (MSR, value); MSRs missing from it read as 0.
    pub fn from_table(table: &[(u32, u64)]) -> Self {
        Self::read(|index| {
            table
                .iter()
                .find(|(i, _)| *i == index)
                .map_or(0, |&(_, v)| v)
        })
    }

    /// The Bochs capabilities of [`BOCHS_SKYLAKE_X`], for tests.
    pub fn bochs_skylake_x() -> Self {
        Self::from_table(&BOCHS_SKYLAKE_X)
    }

    /// VMCS revision identifier, stamped into VMXON and VMCS regions (SDM A.1: bits 30:0).
    pub fn revision_id(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Bytes to allocate for a VMXON or VMCS region (SDM A.1: bits 44:32, at most 4096).
    pub fn vmcs_region_size(&self) -> usize {
        ((self.basic >> 32) & 0x1fff) as usize
    }

    /// BASIC bit 48: VMXON/VMCS/bitmap addresses are limited to 32 bits.
    pub fn addresses_limited_to_32_bits(&self) -> bool {
        self.basic & (1 << 48) != 0
    }

    /// Memory type the processor uses to access the VMCS (SDM A.1: bits 53:50).
    pub fn vmcs_memory_type(&self) -> u8 {
        ((self.basic >> 50) & 0xf) as u8
    }

    /// The VMCS is accessed write-back (type 6), which is what Keel's memory is.
    pub fn vmcs_write_back(&self) -> bool {
        self.vmcs_memory_type() == 6
    }

    /// BASIC bit 54: VM exits due to INS/OUTS report the instruction-information field.
    pub fn ins_outs_info(&self) -> bool {
        self.basic & (1 << 54) != 0
    }

    /// BASIC bit 55: the TRUE_* control MSRs exist and say which default1 controls may be 0.
    pub fn true_controls(&self) -> bool {
        self.basic & (1 << 55) != 0
    }

    /// The VMX-preemption timer counts down by 1 each time TSC bit `rate` changes (SDM A.6:
    /// MISC bits 4:0), i.e. once every 2^rate TSC ticks.
    pub fn preemption_timer_rate(&self) -> u8 {
        (self.misc & 0x1f) as u8
    }

    /// MISC bit 5: VM exits store EFER.LMA into the "IA-32e mode guest" entry control.
    pub fn exit_stores_lma(&self) -> bool {
        self.misc & (1 << 5) != 0
    }

    /// MISC bit 6: VM entry may leave the guest in the HLT activity state.
    pub fn activity_hlt(&self) -> bool {
        self.misc & (1 << 6) != 0
    }

    /// MISC bit 8: the wait-for-SIPI activity state is supported (for parked application
    /// processors).
    pub fn activity_wait_for_sipi(&self) -> bool {
        self.misc & (1 << 8) != 0
    }

    /// Number of CR3-target values supported (SDM A.6: MISC bits 24:16).
    pub fn cr3_target_count(&self) -> u32 {
        ((self.misc >> 16) & 0x1ff) as u32
    }

    /// Recommended maximum number of entries in each MSR load/store list: 512 * (N + 1) with N in
    /// MISC bits 27:25 (SDM A.6).
    pub fn max_msr_list_entries(&self) -> u32 {
        512 * (((self.misc >> 25) & 7) as u32 + 1)
    }

    pub fn secondary_controls(&self) -> bool {
        self.procbased & ACTIVATE_SECONDARY != 0
    }

    pub fn preemption_timer(&self) -> bool {
        self.pinbased & PIN_PREEMPTION_TIMER != 0
    }

    pub fn ept(&self) -> bool {
        self.procbased2 & SECONDARY_EPT != 0
    }

    pub fn vpid(&self) -> bool {
        self.procbased2 & SECONDARY_VPID != 0
    }

    pub fn unrestricted_guest(&self) -> bool {
        self.procbased2 & SECONDARY_UNRESTRICTED != 0
    }

    pub fn ept_vpid(&self) -> EptVpidCap {
        EptVpidCap::from_bits_retain(self.ept_vpid_cap)
    }

    /// EPT as Keel builds it: a 4-level walk, write-back paging structures and some INVEPT type
    /// (SDM A.10, 29.3).
    pub fn ept_usable(&self) -> bool {
        let c = self.ept_vpid();
        self.ept()
            && c.contains(EptVpidCap::PAGE_WALK_4 | EptVpidCap::MEMORY_TYPE_WB | EptVpidCap::INVEPT)
            && c.intersects(EptVpidCap::INVEPT_SINGLE_CONTEXT | EptVpidCap::INVEPT_ALL_CONTEXT)
    }

    /// EPT may map 1 GiB pages (PDPTE leaves).
    pub fn ept_1g_pages(&self) -> bool {
        self.ept_vpid().contains(EptVpidCap::PAGES_1G)
    }

    /// EPT accessed and dirty flags can be enabled (EPTP bit 6; SDM A.10, bit 21): what live
    /// migration tracks the pages a guest writes by.
    pub fn ept_accessed_dirty(&self) -> bool {
        self.ept_vpid().contains(EptVpidCap::ACCESSED_DIRTY)
    }

    /// EPT may map 2 MiB pages (PDE leaves).
    pub fn ept_2m_pages(&self) -> bool {
        self.ept_vpid().contains(EptVpidCap::PAGES_2M)
    }

    /// VPIDs can be used and flushed: "enable VPID" allowed and INVVPID with the single- or
    /// all-context type.
    pub fn vpid_usable(&self) -> bool {
        let c = self.ept_vpid();
        self.vpid()
            && c.contains(EptVpidCap::INVVPID)
            && c.intersects(EptVpidCap::INVVPID_SINGLE_CONTEXT | EptVpidCap::INVVPID_ALL_CONTEXT)
    }
}

/// One line for the boot log, e.g.
/// `VMX rev 0x2b, VMCS 4096 B WB, true controls, unrestricted guest, EPT 4-level WB 2M 1G A/D INVEPT single all, VPID INVVPID single all, preemption timer 2^0`.
impl fmt::Display for VmxCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VMX rev {:#x}, VMCS {} B {}",
            self.revision_id(),
            self.vmcs_region_size(),
            if self.vmcs_write_back() { "WB" } else { "UC" }
        )?;
        if self.true_controls() {
            f.write_str(", true controls")?;
        }
        if self.unrestricted_guest() {
            f.write_str(", unrestricted guest")?;
        }
        let c = self.ept_vpid();
        let flag = |f: &mut fmt::Formatter<'_>, bit: EptVpidCap, name: &str| {
            if c.contains(bit) {
                write!(f, " {name}")
            } else {
                Ok(())
            }
        };
        if self.ept() {
            f.write_str(", EPT")?;
            flag(f, EptVpidCap::PAGE_WALK_4, "4-level")?;
            flag(f, EptVpidCap::MEMORY_TYPE_WB, "WB")?;
            flag(f, EptVpidCap::PAGES_2M, "2M")?;
            flag(f, EptVpidCap::PAGES_1G, "1G")?;
            flag(f, EptVpidCap::ACCESSED_DIRTY, "A/D")?;
            flag(f, EptVpidCap::INVEPT, "INVEPT")?;
            flag(f, EptVpidCap::INVEPT_SINGLE_CONTEXT, "single")?;
            flag(f, EptVpidCap::INVEPT_ALL_CONTEXT, "all")?;
        } else {
            f.write_str(", no EPT")?;
        }
        if self.vpid() {
            f.write_str(", VPID")?;
            flag(f, EptVpidCap::INVVPID, "INVVPID")?;
            flag(f, EptVpidCap::INVVPID_SINGLE_CONTEXT, "single")?;
            flag(f, EptVpidCap::INVVPID_ALL_CONTEXT, "all")?;
        }
        if self.preemption_timer() {
            write!(f, ", preemption timer 2^{}", self.preemption_timer_rate())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;
    use core::cell::RefCell;

    #[test]
    fn bochs_basic() {
        let caps = VmxCaps::bochs_skylake_x();
        assert_eq!(caps.revision_id(), 0x2b);
        assert_eq!(caps.vmcs_region_size(), 4096);
        assert_eq!(caps.vmcs_memory_type(), 6);
        assert!(caps.vmcs_write_back());
        assert!(caps.true_controls());
        assert!(caps.ins_outs_info());
        assert!(!caps.addresses_limited_to_32_bits());
        assert_eq!(caps.preemption_timer_rate(), 0);
        assert!(caps.activity_hlt());
        assert_eq!(caps.cr3_target_count(), 4);
        assert_eq!(caps.max_msr_list_entries(), 512);
    }

    #[test]
    fn bochs_features() {
        let caps = VmxCaps::bochs_skylake_x();
        assert!(caps.secondary_controls());
        assert!(caps.ept());
        assert!(caps.vpid());
        assert!(caps.unrestricted_guest());
        assert!(caps.preemption_timer());
        assert!(caps.ept_usable());
        assert!(caps.vpid_usable());
        assert!(caps.ept_2m_pages());
        assert!(caps.ept_1g_pages());
        let c = caps.ept_vpid();
        assert!(c.contains(EptVpidCap::EXECUTE_ONLY | EptVpidCap::ACCESSED_DIRTY));
        assert!(c.contains(EptVpidCap::INVEPT_SINGLE_CONTEXT | EptVpidCap::INVEPT_ALL_CONTEXT));
        assert!(!c.contains(EptVpidCap::PAGE_WALK_5));
        assert!(!c.contains(EptVpidCap::ADVANCED_EXIT_INFO));
    }

    #[test]
    fn bochs_summary() {
        assert_eq!(
            VmxCaps::bochs_skylake_x().to_string(),
            "VMX rev 0x2b, VMCS 4096 B WB, true controls, unrestricted guest, \
             EPT 4-level WB 2M 1G A/D INVEPT single all, VPID INVVPID single all, \
             preemption timer 2^0"
        );
    }

    /// Reads only what exists: a CPU without secondary controls and without true controls is
    /// never asked for PROCBASED2, EPT_VPID_CAP or the TRUE_* MSRs.
    #[test]
    fn optional_msrs_are_not_read_when_absent() {
        let read = RefCell::new(Vec::new());
        let caps = VmxCaps::read(|index| {
            read.borrow_mut().push(index);
            match index {
                msr::IA32_VMX_BASIC => 0x0000_1000_0000_0001, // no bit 55
                msr::IA32_VMX_PROCBASED_CTLS => 0x7fff_fffe_0401_e172, // no bit 63
                0x481..=0x489 => 0,
                _ => panic!("MSR {index:#x} read though absent"),
            }
        });
        assert_eq!(read.borrow().len(), 10);
        assert!(!caps.true_controls());
        assert!(!caps.secondary_controls());
        assert!(!caps.ept() && !caps.ept_usable() && !caps.unrestricted_guest());
        assert_eq!(caps.procbased2, 0);
        assert_eq!(caps.to_string(), "VMX rev 0x1, VMCS 4096 B UC, no EPT");
    }

    #[test]
    fn ept_vpid_cap_needs_ept_or_vpid() {
        // Secondary controls exist but allow neither EPT nor VPID: EPT_VPID_CAP is not read.
        let caps = VmxCaps::read(|index| match index {
            msr::IA32_VMX_PROCBASED_CTLS => 1 << 63,
            msr::IA32_VMX_PROCBASED_CTLS2 => 1 << (32 + 7),
            msr::IA32_VMX_EPT_VPID_CAP => panic!("EPT_VPID_CAP read though absent"),
            _ => 0,
        });
        assert!(caps.unrestricted_guest());
        assert!(!caps.ept());
        assert_eq!(caps.ept_vpid_cap, 0);
    }

    #[test]
    fn ept_unusable_without_wb_or_invept() {
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.ept_vpid_cap &= !EptVpidCap::MEMORY_TYPE_WB.bits();
        assert!(!caps.ept_usable());
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.ept_vpid_cap &=
            !(EptVpidCap::INVEPT_SINGLE_CONTEXT | EptVpidCap::INVEPT_ALL_CONTEXT).bits();
        assert!(!caps.ept_usable());
    }
}
