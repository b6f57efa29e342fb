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

pub(crate) fn segment<V: Vmcs + ?Sized>(
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

    vmcs.write(GuestNat::Dr7, crate::exits::debug::DR7_INIT);
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
/// interrupt exits, unrestricted guest for real-mode guests, a 64-bit host, EFER switching, and
/// DR7/IA32_DEBUGCTL switching: "save/load debug controls", default1 controls every VMX processor
/// has, SDM A.4/A.5 and `exits::debug`).
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
    let mut secondary = adjust_controls(
        caps,
        SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST,
        SecondaryControls::ENABLE_VPID
            | SecondaryControls::ENABLE_RDTSCP
            | SecondaryControls::ENABLE_INVPCID
            | SecondaryControls::ENABLE_XSAVES,
    )?;
    // A VPID is reused when its guest restarts: only with INVVPID to flush it (SDM A.10), or the
    // new life would see the old one's cached translations.
    if !caps.vpid_usable() {
        secondary.remove(SecondaryControls::ENABLE_VPID);
    }
    let exit = adjust_controls(
        caps,
        ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_DEBUG_CONTROLS
            | ExitControls::ACK_INTERRUPT_ON_EXIT
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER,
        ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT,
    )?;
    let entry = adjust_controls(
        caps,
        EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_DEBUG_CONTROLS,
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

    /// VPIDs are reused (a restarted guest gets its old one), so they are only enabled when
    /// INVVPID can flush them (SDM A.10).
    #[test]
    fn vpids_only_with_invvpid() {
        use crate::vmx::controls::SecondaryControls;
        use crate::vmx::EptVpidCap;
        let caps = VmxCaps::bochs_skylake_x();
        let c = compute_controls(&caps).unwrap();
        assert!(SecondaryControls::from_bits_retain(c.secondary)
            .contains(SecondaryControls::ENABLE_VPID));
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.ept_vpid_cap &=
            !(EptVpidCap::INVVPID_SINGLE_CONTEXT | EptVpidCap::INVVPID_ALL_CONTEXT).bits();
        let c = compute_controls(&caps).unwrap();
        assert!(!SecondaryControls::from_bits_retain(c.secondary)
            .contains(SecondaryControls::ENABLE_VPID));
    }

    #[test]
    fn debug_registers_travel_in_the_vmcs() {
        // DR7 and IA32_DEBUGCTL are saved at every exit and loaded at every entry (SDM 25.7.1,
        // 25.8.1); without these controls the guest's DR7 is 400H after any exit (SDM 28.5.1).
        use crate::vmx::controls::*;
        let c = compute_controls(&VmxCaps::bochs_skylake_x()).unwrap();
        assert!(ExitControls::from_bits_retain(c.exit).contains(ExitControls::SAVE_DEBUG_CONTROLS));
        assert!(
            EntryControls::from_bits_retain(c.entry).contains(EntryControls::LOAD_DEBUG_CONTROLS)
        );
        let mut v = FakeVmcs::new();
        write_controls(&mut v, &c, (0x1000, 0x2000), 0x3000, 0x4000, 1);
        assert_ne!(
            v.read(Control32::ExitControls) & ExitControls::SAVE_DEBUG_CONTROLS.bits(),
            0
        );
        assert_ne!(
            v.read(Control32::EntryControls) & EntryControls::LOAD_DEBUG_CONTROLS.bits(),
            0
        );
    }

    #[test]
    fn missing_unrestricted_guest_is_named() {
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.procbased2 &= !(1 << (32 + 7));
        let e = compute_controls(&caps).unwrap_err();
        assert!(alloc::format!("{e}").contains("UNRESTRICTED_GUEST"), "{e}");
    }

    use crate::loader::elf::build::{elf, Seg};
    use crate::loader::test_util::config;
    use crate::loader::LoadRequest;
    use crate::manifest::GuestKind;
    use crate::vmx::controls::SecondaryControls;
    use crate::vmx::{Control32, Segment};
    use alloc::vec;
    use alloc::vec::Vec;

    const RAM: u64 = 16 << 20;
    const EM_386: u16 = 3;
    const EM_X86_64: u16 = 62;

    /// What a loader makes of `image` for a guest of `kind`.
    fn loaded(kind: GuestKind, image: &[u8]) -> InitialState {
        let cfg = config(kind, RAM, "x");
        let mut ram = vec![0u8; RAM as usize];
        let req = LoadRequest {
            cfg: &cfg,
            image,
            modules: &[],
            guest_id: 0,
        };
        crate::loader::load(&mut ram, &req).expect("the loader accepts the image")
    }

    /// An ELF32 kernel at 1 MiB whose text starts with a multiboot header (magic, flags
    /// page-align | memory-info, checksum).
    fn multiboot_image() -> Vec<u8> {
        let mut text = Vec::new();
        for w in [0x1bad_b002u32, 3, 0u32.wrapping_sub(0x1bad_b002 + 3)] {
            text.extend_from_slice(&w.to_le_bytes());
        }
        text.extend_from_slice(&[0xf4; 16]);
        elf(false, EM_386, 0x10_000c, &[Seg::at(0x10_0000, &text, 0)])
    }

    /// The initial state of every loader and CPU mode: flat (real mode), ELF32 (protected mode),
    /// multiboot (protected mode, EBX = info) and ELF64 (long mode on identity tables).
    fn every_initial_state() -> [(&'static str, InitialState); 4] {
        let code = [0xf4; 16];
        [
            ("flat", loaded(GuestKind::Flat, &[0xfa, 0xf4, 0xeb, 0xfe])),
            (
                "elf32",
                loaded(
                    GuestKind::Elf,
                    &elf(false, EM_386, 0x20_0000, &[Seg::at(0x20_0000, &code, 0)]),
                ),
            ),
            (
                "multiboot",
                loaded(GuestKind::Multiboot, &multiboot_image()),
            ),
            (
                "elf64",
                loaded(
                    GuestKind::Elf,
                    &elf(true, EM_X86_64, 0x20_0000, &[Seg::at(0x20_0000, &code, 0)]),
                ),
            ),
        ]
    }

    /// A VMCS as `Vm::boot` fills it: Keel's controls for Bochs, then the guest state.
    fn entered(st: &InitialState) -> (FakeVmcs, Shadows) {
        let caps = VmxCaps::bochs_skylake_x();
        let c = compute_controls(&caps).unwrap();
        let mut v = FakeVmcs::new();
        write_controls(&mut v, &c, (0x1000, 0x2000), 0x3000, 0x4000 | 0x1e, 1);
        let sh = write_guest_state(&mut v, st, &GuestCr::cr0(&caps, true), &GuestCr::cr4(&caps));
        (v, sh)
    }

    /// SDM 27.3.1: the state every loader starts a guest in passes the processor's guest-state
    /// checks, in the mode the loader chose.
    #[test]
    fn every_loader_state_passes_the_entry_checks() {
        let modes = [
            CpuMode::Real,
            CpuMode::Protected,
            CpuMode::Protected,
            CpuMode::Long,
        ];
        for ((name, st), mode) in every_initial_state().into_iter().zip(modes) {
            assert_eq!(st.mode, mode, "{name}");
            let (v, sh) = entered(&st);
            assert_eq!(v.check_entry(), Ok(()), "{name}: {st:?}");
            let long = v.read(Control32::EntryControls) & ENTRY_IA32E_MODE != 0;
            assert_eq!(long, mode == CpuMode::Long, "{name}: IA-32e mode guest");
            // The guest sees its own CR0/CR4, not the bits VMX forces (VMXE, NE).
            assert_eq!((sh.cr0, sh.cr4), (st.cr0, st.cr4), "{name}");
            assert_eq!(v.read(ControlNat::Cr4ReadShadow) & (1 << 13), 0, "{name}");
        }
    }

    /// Every CPU mode on its own, with the loaders' conventions but none of their memory
    /// layout: the checker is about the mode, not the image.
    #[test]
    fn every_cpu_mode_passes_the_entry_checks() {
        let states = every_initial_state();
        for mode in [CpuMode::Real, CpuMode::Protected, CpuMode::Long] {
            let (_, st) = states.iter().find(|(_, s)| s.mode == mode).unwrap();
            let (v, _) = entered(st);
            assert_eq!(v.check_entry(), Ok(()), "{mode:?}");
        }
    }

    fn state(name: &str) -> InitialState {
        every_initial_state()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    #[track_caller]
    fn refused(v: &FakeVmcs, section: &str, what: &str) {
        let e = v.check_entry().expect_err(&alloc::format!(
            "the checker refuses a state without: {what}"
        ));
        assert!(
            e.starts_with(&alloc::format!("SDM {section}: ")) && e.contains(what),
            "{e}"
        );
    }

    /// Negative tests: states a real CPU refuses are refused here too, with the rule named.
    #[test]
    fn long_mode_without_the_ia32e_entry_control_is_refused() {
        let (mut v, _) = entered(&state("elf64"));
        v.update(Control32::EntryControls, |e| e & !ENTRY_IA32E_MODE);
        refused(&v, "27.3.1.1", "IA32_EFER.LMA (true) differs");
    }

    #[test]
    fn unusable_tr_is_refused() {
        for name in ["flat", "elf32", "elf64"] {
            let (mut v, _) = entered(&state(name));
            v.write(Segment::Tr.access_rights(), ar::TSS_BUSY | ar::UNUSABLE);
            refused(&v, "27.3.1.2", "usable system descriptor");
        }
    }

    #[test]
    fn rflags_bit_1_clear_is_refused() {
        let (mut v, _) = entered(&state("elf32"));
        v.write(GuestNat::Rflags, 0);
        refused(&v, "27.3.1.4", "bit 1 must be 1");
    }

    #[test]
    fn more_broken_states_are_refused() {
        type Break = fn(&mut FakeVmcs);
        let cases: [(&str, Break, &str, &str); 9] = [
            (
                "elf64",
                |v| v.write(Guest64::Ia32Efer, 0x400),
                "27.3.1.1",
                "LMA must equal LME",
            ),
            (
                "elf32",
                |v| v.write(GuestNat::Cr0, 0x8000_0030),
                "27.3.1.1",
                "PG set without PE",
            ),
            (
                "elf64",
                |v| v.write(Segment::Cs.access_rights(), ar::CODE_64 | (1 << 14)),
                "27.3.1.2",
                "L and D/B both set",
            ),
            (
                "elf32",
                |v| v.write(Segment::Ds.access_rights(), 0xc092),
                "27.3.1.2",
                "not accessed",
            ),
            (
                "elf32",
                |v| v.write(Segment::Cs.limit(), 0xffff_f000),
                "27.3.1.2",
                "so G must be 0",
            ),
            (
                "flat",
                |v| {
                    v.write(Segment::Cs.access_rights(), ar::CODE_16 | (3 << 5));
                    v.write(Segment::Ss.access_rights(), ar::DATA_16 | (3 << 5));
                },
                "27.3.1.2",
                "must be 0 in real mode",
            ),
            (
                "elf64",
                |v| v.write(GuestNat::Rip, 0x1_0000_0000_0000),
                "27.3.1.4",
                "must be identical",
            ),
            (
                "elf32",
                |v| v.write(GuestNat::Rip, 0x1_0000_0000),
                "27.3.1.4",
                "bits 63:32 must be 0",
            ),
            (
                "elf32",
                |v| v.write(Guest32::GdtrLimit, 0x1_0000),
                "27.3.1.3",
                "bits 31:16",
            ),
        ];
        for (name, break_it, section, what) in cases {
            let (mut v, _) = entered(&state(name));
            break_it(&mut v);
            refused(&v, section, what);
        }
    }

    #[test]
    fn interruptibility_and_activity_rules() {
        let (mut v, _) = entered(&state("elf64"));
        v.write(Guest32::InterruptibilityState, 1);
        refused(&v, "27.3.1.5", "blocking by STI with RFLAGS.IF clear");
        v.write(GuestNat::Rflags, 0x202);
        assert_eq!(v.check_entry(), Ok(()));
        v.write(Guest32::InterruptibilityState, 3);
        refused(&v, "27.3.1.5", "STI and by MOV SS together");
        v.write(Guest32::InterruptibilityState, 0);
        v.write(Guest32::ActivityState, 1);
        assert_eq!(v.check_entry(), Ok(()), "HLT at CPL 0");
        v.write(Guest32::ActivityState, 4);
        refused(&v, "27.3.1.5", "activity state 4");
        v.write(Guest32::ActivityState, 0);
        v.write(Guest64::VmcsLinkPointer, 0);
        refused(&v, "27.3.1.5", "VMCS link pointer");
    }

    /// SDM 27.2.1.3: valid vector/type pairs and the error-code rule.
    #[test]
    fn event_injection_rules() {
        const VALID: u32 = 1 << 31;
        const CODE: u32 = 1 << 11;
        let hw = |vector: u32| VALID | (3 << 8) | vector;
        let (mut v, _) = entered(&state("elf32"));
        let ok = [
            hw(13) | CODE,
            hw(14) | CODE,
            hw(6),
            hw(8) | CODE,
            VALID | (2 << 8) | 2,
        ];
        for info in ok {
            v.write(Control32::EntryInterruptionInfo, info);
            assert_eq!(v.check_entry(), Ok(()), "{info:#x}");
        }
        let bad: [(u32, &str); 6] = [
            (hw(13), "deliver-error-code is 0"),
            (hw(6) | CODE, "deliver-error-code is 1"),
            (VALID | (2 << 8) | 3, "NMI injection with vector 3"),
            (hw(32), "vector 32"),
            (VALID | (1 << 8) | 3, "type 1 is reserved"),
            (VALID | (1 << 12) | (3 << 8) | 6, "reserved bits 30:12"),
        ];
        for (info, what) in bad {
            v.write(Control32::EntryInterruptionInfo, info);
            refused(&v, "27.2.1.3", what);
        }
        // Real mode (unrestricted guest, CR0.PE = 0): no error code, even for #GP.
        let (mut v, _) = entered(&state("flat"));
        v.write(Control32::EntryInterruptionInfo, hw(13));
        assert_eq!(v.check_entry(), Ok(()));
        // A software interrupt needs its instruction length.
        v.write(Control32::EntryInterruptionInfo, VALID | (4 << 8) | 0x21);
        refused(&v, "27.2.1.3", "instruction length 0");
        v.write(Control32::EntryInstructionLength, 2);
        assert_eq!(v.check_entry(), Ok(()));
        // An external interrupt needs RFLAGS.IF.
        v.write(Control32::EntryInterruptionInfo, VALID | 0x20);
        refused(&v, "27.3.1.4", "RFLAGS.IF clear");
    }

    /// The checker sees the controls Keel chose: without "unrestricted guest" a real-mode state
    /// is refused (CR0.PE and PG are then fixed to 1).
    #[test]
    fn real_mode_needs_unrestricted_guest() {
        let (mut v, _) = entered(&state("flat"));
        v.update(Control32::SecondaryProcBasedControls, |s| {
            s & !SecondaryControls::UNRESTRICTED_GUEST.bits()
        });
        refused(&v, "27.3.1.1", "IA32_VMX_CR0_FIXED0/1");
    }
}
