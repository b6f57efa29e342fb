//! Turning a loader's [`InitialState`] into VMCS guest state, and the per-guest execution controls.
//! Pure computations over the `Vmcs` trait, tested on the host with `FakeVmcs`.

use crate::exits::cr::ENTRY_IA32E_MODE;
use crate::loader::{CpuMode, InitialState};
use crate::vmx::controls::ControlError;
use crate::vmx::cr::GuestCr;
use crate::vmx::{Control32, ControlNat, Guest32, Guest64, GuestNat, Segment, Vmcs, VmxCaps};

/// Access rights (SDM 24.4.1, Table 24-2): type, S, DPL, P, L, D/B, G; bit 16 = unusable.
pub mod ar {
    pub const CODE_16: u32 = 0x9b;
    pub const DATA_16: u32 = 0x93;
    pub const CODE_32: u32 = 0xc09b;
    pub const DATA_32: u32 = 0xc093;
    pub const CODE_64: u32 = 0xa09b;
    pub const TSS_BUSY: u32 = 0x8b;
    pub const UNUSABLE: u32 = 1 << 16;
}

/// The guest PAT at power-on (SDM 13.12.4).
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// What the guest sees in CR0/CR4 (the read shadows) after entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shadows {
    pub cr0: u64,
    pub cr4: u64,
}

fn segment<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    seg: Segment,
    selector: u16,
    base: u64,
    limit: u32,
    access: u32,
) {
    vmcs.write(seg.selector(), selector);
    vmcs.write(seg.base(), base);
    vmcs.write(seg.limit(), limit);
    vmcs.write(seg.access_rights(), access);
}

/// Writes the guest-state area for a guest starting in `st` (checked by SDM 27.3.1).
pub fn write_guest_state<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    st: &InitialState,
    cr0: &GuestCr,
    cr4: &GuestCr,
) -> Shadows {
    let data = [
        Segment::Ds,
        Segment::Es,
        Segment::Ss,
        Segment::Fs,
        Segment::Gs,
    ];
    match st.mode {
        CpuMode::Real => {
            let cs = st.code_selector;
            segment(vmcs, Segment::Cs, cs, (cs as u64) << 4, 0xffff, ar::CODE_16);
            for s in data {
                let sel = st.data_selector;
                segment(vmcs, s, sel, (sel as u64) << 4, 0xffff, ar::DATA_16);
            }
            vmcs.write(GuestNat::IdtrBase, 0);
            vmcs.write(Guest32::IdtrLimit, 0x3ff);
        }
        CpuMode::Protected | CpuMode::Long => {
            let code_ar = if st.mode == CpuMode::Long {
                ar::CODE_64
            } else {
                ar::CODE_32
            };
            segment(vmcs, Segment::Cs, st.code_selector, 0, 0xffff_ffff, code_ar);
            for s in data {
                segment(vmcs, s, st.data_selector, 0, 0xffff_ffff, ar::DATA_32);
            }
            vmcs.write(GuestNat::IdtrBase, 0);
            vmcs.write(Guest32::IdtrLimit, 0);
        }
    }
    segment(vmcs, Segment::Tr, 0, 0, 0xff, ar::TSS_BUSY);
    segment(vmcs, Segment::Ldtr, 0, 0, 0, ar::UNUSABLE);
    vmcs.write(GuestNat::GdtrBase, st.gdtr_base);
    vmcs.write(Guest32::GdtrLimit, st.gdtr_limit as u32);

    vmcs.write(GuestNat::Cr0, cr0.real(st.cr0));
    vmcs.write(GuestNat::Cr3, st.cr3);
    vmcs.write(GuestNat::Cr4, cr4.real(st.cr4));
    vmcs.write(ControlNat::Cr0GuestHostMask, cr0.mask());
    vmcs.write(ControlNat::Cr4GuestHostMask, cr4.mask());
    vmcs.write(ControlNat::Cr0ReadShadow, st.cr0);
    vmcs.write(ControlNat::Cr4ReadShadow, st.cr4);
    vmcs.write(Guest64::Ia32Efer, st.efer);
    vmcs.write(Guest64::Ia32Pat, PAT_DEFAULT);
    vmcs.write(Guest64::Ia32Debugctl, 0);
    vmcs.write(Guest64::VmcsLinkPointer, u64::MAX);
    let entry = vmcs.read(Control32::EntryControls);
    let entry = if st.mode == CpuMode::Long {
        entry | ENTRY_IA32E_MODE
    } else {
        entry & !ENTRY_IA32E_MODE
    };
    vmcs.write(Control32::EntryControls, entry);

    vmcs.write(GuestNat::Dr7, 0x400);
    vmcs.write(GuestNat::Rsp, st.rsp);
    vmcs.write(GuestNat::Rip, st.rip);
    vmcs.write(GuestNat::Rflags, st.rflags | 2);
    vmcs.write(GuestNat::PendingDebugExceptions, 0);
    vmcs.write(Guest32::InterruptibilityState, 0);
    vmcs.write(Guest32::ActivityState, 0);
    vmcs.write(Guest32::Ia32SysenterCs, 0);
    vmcs.write(GuestNat::Ia32SysenterEsp, 0);
    vmcs.write(GuestNat::Ia32SysenterEip, 0);
    Shadows {
        cr0: st.cr0,
        cr4: st.cr4,
    }
}

/// The execution controls every Keel guest runs with, computed once from the capability MSRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlSet {
    pub pin: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
    pub preemption_timer: bool,
}

/// Required: everything Keel's isolation depends on (EPT, I/O and MSR bitmaps, HLT and external
/// interrupt exits, unrestricted guest for real-mode guests, a 64-bit host, EFER switching).
/// Optional: what improves guests when present (VPID, RDTSCP/INVPCID/XSAVES pass-through, the
/// preemption timer for the scheduler, virtual NMIs, PAT switching).
pub fn compute_controls(caps: &VmxCaps) -> Result<ControlSet, ControlError> {
    use crate::vmx::controls::*;
    let pin = adjust_controls(
        caps,
        PinBasedControls::EXTERNAL_INTERRUPT_EXITING | PinBasedControls::NMI_EXITING,
        PinBasedControls::VIRTUAL_NMIS | PinBasedControls::ACTIVATE_PREEMPTION_TIMER,
    )?;
    let primary = adjust_controls(
        caps,
        PrimaryControls::HLT_EXITING
            | PrimaryControls::USE_IO_BITMAPS
            | PrimaryControls::USE_MSR_BITMAPS
            | PrimaryControls::ACTIVATE_SECONDARY_CONTROLS
            | PrimaryControls::CR8_LOAD_EXITING
            | PrimaryControls::CR8_STORE_EXITING
            | PrimaryControls::MWAIT_EXITING
            | PrimaryControls::MONITOR_EXITING
            | PrimaryControls::RDPMC_EXITING,
        PrimaryControls::USE_TSC_OFFSETTING,
    )?;
    let secondary = adjust_controls(
        caps,
        SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST,
        SecondaryControls::ENABLE_VPID
            | SecondaryControls::ENABLE_RDTSCP
            | SecondaryControls::ENABLE_INVPCID
            | SecondaryControls::ENABLE_XSAVES,
    )?;
    let exit = adjust_controls(
        caps,
        ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::ACK_INTERRUPT_ON_EXIT
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER,
        ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT,
    )?;
    let entry = adjust_controls(
        caps,
        EntryControls::LOAD_IA32_EFER,
        EntryControls::LOAD_IA32_PAT,
    )?;
    Ok(ControlSet {
        pin: pin.bits(),
        primary: primary.bits(),
        secondary: secondary.bits(),
        exit: exit.bits(),
        entry: entry.bits(),
        preemption_timer: pin.contains(PinBasedControls::ACTIVATE_PREEMPTION_TIMER),
    })
}

/// Writes the execution, exit and entry controls and the addresses of the per-guest structures.
pub fn write_controls<V: Vmcs + ?Sized>(
    vmcs: &mut V,
    c: &ControlSet,
    io_bitmaps: (u64, u64),
    msr_bitmap: u64,
    eptp: u64,
    vpid: u16,
) {
    use crate::vmx::{Control16, Control64};
    vmcs.write(Control32::PinBasedControls, c.pin);
    vmcs.write(Control32::PrimaryProcBasedControls, c.primary);
    vmcs.write(Control32::SecondaryProcBasedControls, c.secondary);
    vmcs.write(Control32::ExitControls, c.exit);
    vmcs.write(Control32::EntryControls, c.entry);
    vmcs.write(Control32::ExceptionBitmap, 0);
    vmcs.write(Control32::PageFaultErrorCodeMask, 0);
    vmcs.write(Control32::PageFaultErrorCodeMatch, 0);
    vmcs.write(Control32::Cr3TargetCount, 0);
    vmcs.write(Control32::ExitMsrStoreCount, 0);
    vmcs.write(Control32::ExitMsrLoadCount, 0);
    vmcs.write(Control32::EntryMsrLoadCount, 0);
    vmcs.write(Control32::EntryInterruptionInfo, 0);
    vmcs.write(Control64::IoBitmapA, io_bitmaps.0);
    vmcs.write(Control64::IoBitmapB, io_bitmaps.1);
    vmcs.write(Control64::MsrBitmaps, msr_bitmap);
    vmcs.write(Control64::EptPointer, eptp);
    vmcs.write(Control64::TscOffset, 0);
    if c.secondary & crate::vmx::controls::SecondaryControls::ENABLE_VPID.bits() != 0 {
        vmcs.write(Control16::Vpid, vpid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::{FakeVmcs, VmxCaps};

    #[test]
    fn bochs_supports_keels_controls() {
        let caps = VmxCaps::bochs_skylake_x();
        let c = compute_controls(&caps).expect("Bochs has every required control");
        use crate::vmx::controls::*;
        assert!(SecondaryControls::from_bits_retain(c.secondary)
            .contains(SecondaryControls::UNRESTRICTED_GUEST | SecondaryControls::ENABLE_EPT));
        assert!(PrimaryControls::from_bits_retain(c.primary)
            .contains(PrimaryControls::HLT_EXITING | PrimaryControls::USE_IO_BITMAPS));
        assert!(c.preemption_timer);
    }

    #[test]
    fn missing_unrestricted_guest_is_named() {
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.procbased2 &= !(1 << (32 + 7));
        let e = compute_controls(&caps).unwrap_err();
        assert!(alloc::format!("{e}").contains("UNRESTRICTED_GUEST"), "{e}");
    }

    #[test]
    fn long_mode_guest_state() {
        let caps = VmxCaps::bochs_skylake_x();
        let st = InitialState {
            mode: CpuMode::Long,
            rip: 0x20_0000,
            rsp: 0x7f_0000,
            rflags: 2,
            rax: 0,
            rbx: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 0x20,
            efer: 0x500,
            gdtr_base: 0x800,
            gdtr_limit: 23,
            code_selector: 8,
            data_selector: 16,
        };
        let mut v = FakeVmcs::new();
        let sh = write_guest_state(
            &mut v,
            &st,
            &GuestCr::cr0(&caps, true),
            &GuestCr::cr4(&caps),
        );
        assert_eq!(sh.cr4, 0x20, "the guest does not see VMXE");
        assert_eq!(
            v.read(GuestNat::Cr4) & (1 << 13),
            1 << 13,
            "the real CR4 has VMXE"
        );
        assert_eq!(v.read(GuestNat::Cr0) & 0x20, 0x20, "NE forced");
        assert_eq!(v.read(Guest32::CsAccessRights), ar::CODE_64);
        assert_ne!(v.read(Control32::EntryControls) & ENTRY_IA32E_MODE, 0);
        assert_eq!(v.read(Guest64::VmcsLinkPointer), u64::MAX);
    }
}
