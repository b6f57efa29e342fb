//! A vCPU's state as a value: [`VcpuState::capture`] reads everything that makes up a vCPU
//! between two VM exits (its VMCS guest-state area, the control-register shadows, the
//! general-purpose registers, the registers VMX does not switch, its extended state, the MSRs
//! Keel emulates for it, its event queue and its run state), and [`VcpuState::restore`] puts it
//! back into a vCPU, this one or another Keel's, after checking it as the untrusted input it is.
//!
//! Capture and restore go through the [`Vmcs`] trait and plain buffers, so they are tested on
//! the build host with `FakeVmcs`; `hypervisor::VmHw` supplies the real VMCS, the saved
//! registers and the XSAVE page. The local APIC, which lives with the VM's platform (the IOAPIC
//! and the other vCPUs write into it), is saved with the platform (`devices::Platform::save`).

use crate::exits::events::EventQueue;
use crate::exits::xsetbv::valid_xcr0;
use crate::guest::{GuestRegs, RunState, Vcpu};
use crate::state::{Codec, Reader, StateError, Writer};
use crate::vmx::controls::{EntryControls, PrimaryControls};
use crate::vmx::{Control32, ControlNat, Guest16, Guest32, Guest64, GuestNat, Vmcs};
use alloc::vec::Vec;

/// The VMCS guest-state fields a vCPU's state holds (SDM 25.4.1 registers, 25.4.2 non-register
/// state): every segment register whole (selector, base, limit, access rights, LDTR and TR
/// included), GDTR/IDTR, CR0/CR3/CR4, DR7, RSP/RIP/RFLAGS, the SYSENTER MSRs, IA32_DEBUGCTL,
/// IA32_PAT and IA32_EFER, the PDPTEs (PAE paging with EPT loads them from here, SDM 27.3.2.4),
/// the activity and interruptibility states and the pending debug exceptions. Left out: the
/// VMCS link pointer (always all ones for Keel), the VMX-preemption timer (armed afresh before
/// every entry), SMBASE, and the fields of features Keel does not give guests (PML, virtual
/// interrupt delivery, IA32_PERF_GLOBAL_CTRL, IA32_BNDCFGS, IA32_RTIT_CTL).
pub const GUEST_FIELDS: [u32; 58] = [
    Guest16::EsSelector as u32,
    Guest16::CsSelector as u32,
    Guest16::SsSelector as u32,
    Guest16::DsSelector as u32,
    Guest16::FsSelector as u32,
    Guest16::GsSelector as u32,
    Guest16::LdtrSelector as u32,
    Guest16::TrSelector as u32,
    Guest64::Ia32Debugctl as u32,
    Guest64::Ia32Pat as u32,
    Guest64::Ia32Efer as u32,
    Guest64::Pdpte0 as u32,
    Guest64::Pdpte1 as u32,
    Guest64::Pdpte2 as u32,
    Guest64::Pdpte3 as u32,
    Guest32::EsLimit as u32,
    Guest32::CsLimit as u32,
    Guest32::SsLimit as u32,
    Guest32::DsLimit as u32,
    Guest32::FsLimit as u32,
    Guest32::GsLimit as u32,
    Guest32::LdtrLimit as u32,
    Guest32::TrLimit as u32,
    Guest32::GdtrLimit as u32,
    Guest32::IdtrLimit as u32,
    Guest32::EsAccessRights as u32,
    Guest32::CsAccessRights as u32,
    Guest32::SsAccessRights as u32,
    Guest32::DsAccessRights as u32,
    Guest32::FsAccessRights as u32,
    Guest32::GsAccessRights as u32,
    Guest32::LdtrAccessRights as u32,
    Guest32::TrAccessRights as u32,
    Guest32::InterruptibilityState as u32,
    Guest32::ActivityState as u32,
    Guest32::Ia32SysenterCs as u32,
    GuestNat::Cr0 as u32,
    GuestNat::Cr3 as u32,
    GuestNat::Cr4 as u32,
    GuestNat::EsBase as u32,
    GuestNat::CsBase as u32,
    GuestNat::SsBase as u32,
    GuestNat::DsBase as u32,
    GuestNat::FsBase as u32,
    GuestNat::GsBase as u32,
    GuestNat::LdtrBase as u32,
    GuestNat::TrBase as u32,
    GuestNat::GdtrBase as u32,
    GuestNat::IdtrBase as u32,
    GuestNat::Dr7 as u32,
    GuestNat::Rsp as u32,
    GuestNat::Rip as u32,
    GuestNat::Rflags as u32,
    GuestNat::PendingDebugExceptions as u32,
    GuestNat::Ia32SysenterEsp as u32,
    GuestNat::Ia32SysenterEip as u32,
    // The CR0/CR4 read shadows: the values the guest sees (SDM 25.6.6).
    ControlNat::Cr0ReadShadow as u32,
    ControlNat::Cr4ReadShadow as u32,
];

/// The registers VMX leaves alone, as `hypervisor::SavedState` keeps them while the vCPU is
/// switched out (SDM 27.3/28.3 switch none of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SwitchedRegs {
    /// KERNEL_GS_BASE, STAR, LSTAR, CSTAR, SFMASK, TSC_AUX, in `hypervisor::SWITCHED_MSRS` order.
    pub msrs: [u64; 6],
    pub cr2: u64,
    /// DR0, DR1, DR2, DR3, DR6.
    pub debug: [u64; 5],
}
crate::codec_struct!(SwitchedRegs { msrs, cr2, debug });

/// The index in [`SwitchedRegs::msrs`] of the MSRs that take only canonical addresses
/// (KERNEL_GS_BASE, LSTAR, CSTAR: WRMSR raises #GP otherwise, SDM Vol. 4 Table 2-2) and of the
/// ones whose bits 63:32 are reserved (SFMASK, TSC_AUX).
const CANONICAL_MSRS: [usize; 3] = [0, 2, 3];
const LOW_HALF_MSRS: [usize; 2] = [4, 5];

/// What this CPU offers a vCPU's state: checked at restore, so that state from a CPU with other
/// features is refused instead of faulting in Keel (XRSTOR, XSETBV and WRMSR raise #GP on values
/// the CPU does not support).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuEnv {
    /// The extended-state layout.
    pub xsave: XsaveLayout,
    /// The IA32_SPEC_CTRL bits guests may set (`exits::msr::spec_ctrl_bits`).
    pub spec_ctrl_bits: u64,
    /// The CR0/CR4 guest/host masks Keel's rules give (`vmx::cr::GuestCr::mask`).
    pub cr_masks: (u64, u64),
}

/// Where the components of the extended state are in the XSAVE area (standard form, SDM
/// 13.4-13.5): the legacy region (x87 and SSE, 512 bytes) and the XSAVE header (64 bytes), then
/// component i >= 2 at CPUID.(EAX=0DH,ECX=i):EBX, CPUID.(EAX=0DH,ECX=i):EAX bytes long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsaveLayout {
    /// The CPU has XSAVE (else the area is an FXSAVE image: x87 and SSE only).
    pub xsave: bool,
    /// The XCR0 bits guests may set (CPUID.(EAX=0DH,ECX=0):EDX:EAX, less what Keel hides).
    pub supported: u64,
    /// (component, offset, size) of every supported component from 2 up.
    pub components: Vec<(u8, u32, u32)>,
}

/// The legacy region and the XSAVE header (SDM 13.4.1, 13.4.2).
const LEGACY: usize = 512;
const HEADER_END: usize = 576;
/// MXCSR in the legacy region (SDM Table 10-2); its bits 31:16 are reserved (FXRSTOR and XRSTOR
/// raise #GP if one is set, SDM 10.5.1.1).
const MXCSR: usize = 24;

impl XsaveLayout {
    fn component(&self, c: u8) -> Option<(u32, u32)> {
        self.components
            .iter()
            .find(|(n, _, _)| *n == c)
            .map(|&(_, o, s)| (o, s))
    }

    /// The bytes of the area that hold the state of the components in `xcr0` (x87 and SSE are
    /// always there: a guest with XCR0 = 1 still uses SSE registers).
    fn extent(&self, xcr0: u64) -> usize {
        if !self.xsave {
            return LEGACY;
        }
        (2..64u8)
            .filter(|c| xcr0 & (1 << c) != 0)
            .filter_map(|c| self.component(c))
            .map(|(o, s)| (o + s) as usize)
            .fold(HEADER_END, usize::max)
    }
}

/// A vCPU's extended state: the part of its XSAVE area (standard form) that holds the
/// components its XCR0 enables, with where each of those components was on the CPU that saved
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XsaveImage {
    /// Saved by XSAVE (else FXSAVE).
    pub xsave: bool,
    pub components: Vec<(u8, u32, u32)>,
    pub bytes: Vec<u8>,
}
crate::codec_struct!(XsaveImage {
    xsave,
    components,
    bytes
});

impl Codec for GuestRegs {
    fn put(&self, w: &mut Writer) {
        for i in 0..16u8 {
            if i != 4 {
                w.put(&self.get(i));
            }
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        let mut regs = GuestRegs::default();
        for i in 0..16u8 {
            if i != 4 {
                regs.set(i, r.get()?);
            }
        }
        Ok(regs)
    }
}

/// A vCPU's run state in a snapshot: a stopped vCPU has none (a stopped guest is not captured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedRun {
    Runnable,
    Halted,
    WaitForSipi,
}
crate::codec_enum!(SavedRun {
    Runnable = 0,
    Halted = 1,
    WaitForSipi = 2
});

impl SavedRun {
    /// The run state to save; a paused vCPU saves what it will be when resumed.
    fn of(state: &RunState) -> Option<Self> {
        match state {
            RunState::Runnable | RunState::Paused { halted: false } => Some(Self::Runnable),
            RunState::Halted | RunState::Paused { halted: true } => Some(Self::Halted),
            RunState::WaitForSipi => Some(Self::WaitForSipi),
            RunState::Stopped(_) => None,
        }
    }

    pub fn run_state(self) -> RunState {
        match self {
            Self::Runnable => RunState::Runnable,
            Self::Halted => RunState::Halted,
            Self::WaitForSipi => RunState::WaitForSipi,
        }
    }
}

/// The state of one vCPU, as it is between two VM exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// Its index in the guest (its APIC ID).
    pub index: u32,
    pub run: SavedRun,
    pub regs: GuestRegs,
    /// (encoding, value) of each of [`GUEST_FIELDS`], in that order.
    pub fields: Vec<(u32, u64)>,
    /// The CR0 and CR4 guest/host masks it ran with (they must be this Keel's).
    pub cr_masks: (u64, u64),
    /// VM-entry control "IA-32e mode guest" (SDM 25.8.1): the guest is in long mode.
    pub ia32e: bool,
    /// The NMI-window and interrupt-window exiting controls as they were (the event queue knows
    /// it asked for the NMI window).
    pub windows: u32,
    pub switched: SwitchedRegs,
    pub xsave: XsaveImage,
    pub xcr0: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    pub tsc_adjust: u64,
    pub spec_ctrl: u64,
    pub events: EventQueue,
}
crate::codec_struct!(VcpuState {
    index,
    run,
    regs,
    fields,
    cr_masks,
    ia32e,
    windows,
    switched,
    xsave,
    xcr0,
    misc_enable,
    mtrr_def_type,
    tsc_adjust,
    spec_ctrl,
    events
});

/// The section of a vCPU's state.
pub const TAG: [u8; 4] = *b"VCPU";
pub const VERSION: u16 = 1;

const WINDOW_BITS: u32 =
    PrimaryControls::NMI_WINDOW_EXITING.bits() | PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
const IA32E: u32 = EntryControls::IA32E_MODE_GUEST.bits();

fn canonical(v: u64) -> bool {
    // 48-bit linear addresses: bits 63:47 all equal (SDM 3.3.7.1).
    let top = v >> 47;
    top == 0 || top == (1 << 17) - 1
}

impl VcpuState {
    /// Reads vCPU `vcpu`'s state: its VMCS `vmcs` (loaded), the registers VMX does not switch
    /// (`switched`, saved while it is switched out) and its XSAVE area `area`. None for a vCPU
    /// that has stopped.
    pub fn capture<V: Vmcs + ?Sized>(
        vmcs: &V,
        vcpu: &Vcpu,
        switched: &SwitchedRegs,
        area: &[u8],
        layout: &XsaveLayout,
    ) -> Option<Self> {
        let run = SavedRun::of(&vcpu.state)?;
        let end = layout.extent(vcpu.xcr0).min(area.len());
        let components = layout
            .components
            .iter()
            .copied()
            .filter(|&(c, _, _)| vcpu.xcr0 & (1 << c) != 0)
            .collect();
        Some(Self {
            index: vcpu.index as u32,
            run,
            regs: vcpu.regs,
            fields: GUEST_FIELDS
                .iter()
                .map(|&e| (e, vmcs.read_raw(e)))
                .collect(),
            cr_masks: (
                vmcs.read(ControlNat::Cr0GuestHostMask),
                vmcs.read(ControlNat::Cr4GuestHostMask),
            ),
            ia32e: vmcs.read(Control32::EntryControls) & IA32E != 0,
            windows: vmcs.read(Control32::PrimaryProcBasedControls) & WINDOW_BITS,
            switched: *switched,
            xsave: XsaveImage {
                xsave: layout.xsave,
                components,
                bytes: area[..end].to_vec(),
            },
            xcr0: vcpu.xcr0,
            misc_enable: vcpu.misc_enable,
            mtrr_def_type: vcpu.mtrr_def_type,
            tsc_adjust: vcpu.tsc_adjust,
            spec_ctrl: vcpu.spec_ctrl,
            events: vcpu.events.clone(),
        })
    }

    /// Checks the state against what this CPU and Keel can take, before anything is changed:
    /// the values that would fault in Keel (XCR0, the extended state's header and MXCSR, the
    /// MSRs and debug registers Keel loads itself) and the features the state needs.
    pub fn check(&self, env: &CpuEnv) -> Result<(), StateError> {
        let bad = StateError::Invalid;
        if self.fields.len() != GUEST_FIELDS.len()
            || self.fields.iter().zip(GUEST_FIELDS).any(|(f, e)| f.0 != e)
        {
            return Err(bad("a vCPU's VMCS fields differ from this Keel's list"));
        }
        if self.cr_masks != env.cr_masks {
            return Err(bad(
                "the vCPU ran with other CR0/CR4 rules (a CPU with other VMX fixed bits)",
            ));
        }
        if self.windows & !WINDOW_BITS != 0 {
            return Err(bad("execution controls beyond the interrupt windows"));
        }
        let x = &self.xsave;
        if x.xsave != env.xsave.xsave {
            return Err(bad(
                "extended state saved by XSAVE on one CPU and FXSAVE on the other",
            ));
        }
        let supported = if env.xsave.xsave {
            env.xsave.supported
        } else {
            0b11
        };
        if !valid_xcr0(supported | 1, self.xcr0) {
            return Err(bad("XCR0 has extended-state components this CPU lacks"));
        }
        for &(c, o, s) in &x.components {
            if c >= 64 || self.xcr0 & (1 << c) == 0 {
                return Err(bad(
                    "a saved extended-state component its XCR0 does not enable",
                ));
            }
            if env.xsave.component(c) != Some((o, s)) {
                return Err(bad(
                    "an extended-state component lies elsewhere on this CPU",
                ));
            }
        }
        if x.bytes.len() != env.xsave.extent(self.xcr0) {
            return Err(bad("an XSAVE area of the wrong size for its XCR0"));
        }
        let mxcsr = u32::from_le_bytes([
            x.bytes[MXCSR],
            x.bytes[MXCSR + 1],
            x.bytes[MXCSR + 2],
            x.bytes[MXCSR + 3],
        ]);
        if mxcsr >> 16 != 0 {
            return Err(bad("MXCSR with reserved bits set"));
        }
        if x.xsave && x.bytes[LEGACY + 8..HEADER_END].iter().any(|&b| b != 0) {
            // XCOMP_BV (standard form only) and the reserved header bytes (SDM 13.8.1).
            return Err(bad("an XSAVE header with reserved bytes set"));
        }
        let s = &self.switched;
        if CANONICAL_MSRS.iter().any(|&i| !canonical(s.msrs[i]))
            || LOW_HALF_MSRS.iter().any(|&i| s.msrs[i] >> 32 != 0)
        {
            return Err(bad("a SYSCALL or TSC_AUX MSR value the CPU refuses"));
        }
        if s.debug[4] >> 32 != 0 {
            return Err(bad("DR6 with bits 63:32 set"));
        }
        if self.spec_ctrl & !env.spec_ctrl_bits != 0 {
            return Err(bad("IA32_SPEC_CTRL bits this CPU does not offer"));
        }
        Ok(())
    }

    /// Puts the state into vCPU `vcpu`: its VMCS `vmcs` (loaded, with Keel's controls already
    /// written), its switched registers and its XSAVE area `area`. Check it first ([`check`]).
    ///
    /// [`check`]: VcpuState::check
    pub fn apply<V: Vmcs + ?Sized>(
        &self,
        vmcs: &mut V,
        vcpu: &mut Vcpu,
        switched: &mut SwitchedRegs,
        area: &mut [u8],
    ) {
        for &(e, v) in &self.fields {
            vmcs.write_raw(e, v);
        }
        // The masks the shadows go with (checked equal to this Keel's rules).
        vmcs.write(ControlNat::Cr0GuestHostMask, self.cr_masks.0);
        vmcs.write(ControlNat::Cr4GuestHostMask, self.cr_masks.1);
        vmcs.update(Control32::EntryControls, |c| {
            if self.ia32e {
                c | IA32E
            } else {
                c & !IA32E
            }
        });
        vmcs.update(Control32::PrimaryProcBasedControls, |c| {
            (c & !WINDOW_BITS) | self.windows
        });
        *switched = self.switched;
        area.fill(0);
        let n = self.xsave.bytes.len().min(area.len());
        area[..n].copy_from_slice(&self.xsave.bytes[..n]);
        if self.xsave.xsave && n >= HEADER_END {
            // Components outside the guest's XCR0 come back in their init state (XSTATE_BV
            // clear, SDM 13.8.1): their bytes were not saved.
            let mut bv = [0u8; 8];
            bv.copy_from_slice(&area[LEGACY..LEGACY + 8]);
            let bv = u64::from_le_bytes(bv) & (self.xcr0 | 0b11);
            area[LEGACY..LEGACY + 8].copy_from_slice(&bv.to_le_bytes());
        }
        vcpu.regs = self.regs;
        vcpu.state = self.run.run_state();
        // A vCPU halted with interrupts off stays deaf to them after the restore too.
        vcpu.halted_masked = vmcs.read(GuestNat::Rflags) & 1 << 9 == 0;
        vcpu.xcr0 = self.xcr0;
        vcpu.misc_enable = self.misc_enable;
        vcpu.mtrr_def_type = self.mtrr_def_type;
        vcpu.tsc_adjust = self.tsc_adjust;
        vcpu.spec_ctrl = self.spec_ctrl;
        vcpu.events = self.events.clone();
    }

    /// Writes the state as section `VCPU`.
    pub fn save(&self, w: &mut Writer) {
        crate::state::save_whole(w, TAG, VERSION, self);
    }

    /// Reads what [`VcpuState::save`] wrote.
    pub fn load(r: &mut Reader<'_>) -> Result<Self, StateError> {
        r.section(TAG, VERSION, |r, _| r.get())
    }
}

#[cfg(test)]
mod tests;
