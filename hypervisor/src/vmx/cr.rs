//! Guest CR0 and CR4 under VMX: the bits the processor fixes in VMX operation, which of them Keel
//! owns (guest/host mask), what the guest reads instead (read shadow), and the emulation of a
//! guest's MOV to CR0/CR4, LMSW and CLTS once one of those exits.
//!
//! The model: the guest has a *view* of each register (what it last wrote, what it reads). The
//! *real* value in the VMCS guest-state area is the view with the fixed bits forced (SDM 24.8
//! "Restrictions on VMX Operation", A.7, A.8). Bits in the mask are host-owned: a guest read
//! returns the shadow's copy, and a guest write that would change one exits (SDM 26.3 "Changes to
//! Instruction Behavior in VMX Non-Root Operation", MOV to CR0/CR4).

use super::caps::VmxCaps;
use core::fmt;

/// CR0 bits (SDM 2.5 "Control Registers").
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
    /// Every architecturally defined bit; the other bits of 31:0 are reserved and ignored on
    /// writes, bits 63:32 are reserved and #GP when set.
    pub const DEFINED: u64 = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG;
}

/// CR4 bits (SDM 2.5).
pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const LA57: u64 = 1 << 12;
    pub const VMXE: u64 = 1 << 13;
    pub const SMXE: u64 = 1 << 14;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const PCIDE: u64 = 1 << 17;
    pub const OSXSAVE: u64 = 1 << 18;
    pub const SMEP: u64 = 1 << 20;
    pub const SMAP: u64 = 1 << 21;
    pub const PKE: u64 = 1 << 22;
    pub const CET: u64 = 1 << 23;
    pub const PKS: u64 = 1 << 24;
}

/// IA32_EFER bits (SDM 2.2.1 "Extended Feature Enable Register").
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// (must be one, must be zero) for guest CR0 (SDM A.7; SDM 27.3.1.1: with "unrestricted guest"
/// PE and PG may be 0).
pub fn fixed_cr0(caps: &VmxCaps, unrestricted: bool) -> (u64, u64) {
    let mut one = caps.cr0_fixed0;
    if unrestricted {
        one &= !(cr0::PE | cr0::PG);
    }
    (one, !caps.cr0_fixed1)
}

/// CR4 bits that enable features `exits::cpuid` hides from every guest: SMXE (SMX), CET
/// (CET_SS/CET_IBT), PKS, UINTR (bit 25), LAM_SUP (bit 28), FRED (bit 32). Setting one is #GP, as
/// on a CPU without the feature (SDM 2.5); they read as 0.
pub const HIDDEN_CR4: u64 = cr4::SMXE | cr4::CET | cr4::PKS | 1 << 25 | 1 << 28 | 1 << 32;

/// (must be one, must be zero) for guest CR4 (SDM A.8). CR4.VMXE is always among the ones.
pub fn fixed_cr4(caps: &VmxCaps) -> (u64, u64) {
    (caps.cr4_fixed0 | cr4::VMXE, !caps.cr4_fixed1)
}

/// Guest/host mask and read shadow for one control register (VMCS fields
/// `Cr0GuestHostMask`/`Cr0ReadShadow`, `Cr4GuestHostMask`/`Cr4ReadShadow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrPolicy {
    pub mask: u64,
    pub shadow: u64,
}

/// What to write after a guest's control-register write was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrLoad {
    /// The real value for the VMCS guest CR0/CR4 field.
    pub value: u64,
    /// The new read shadow (the guest's view).
    pub shadow: u64,
    /// The new guest IA32_EFER when the write switched IA-32e mode on or off (LMA follows CR0.PG
    /// while LME is set, SDM 10.8.5). The caller also sets or clears the "IA-32e mode guest"
    /// entry control to match.
    pub efer: Option<u64>,
}

/// The guest state a control-register write is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrContext {
    /// The guest's view of CR0 and CR4 before the write.
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    /// CS.L: the guest runs 64-bit code.
    pub cs_long: bool,
}

/// A write the processor would refuse with #GP(0) (SDM Vol. 2 "MOV—Move to/from Control
/// Registers", Protected Mode Exceptions). The caller injects #GP(0) and leaves RIP alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrFault {
    /// Reserved or unsupported bits set (for CR4 this includes VMXE: Keel does not offer VMX).
    ReservedBits(u64),
    PagingWithoutProtection,
    NotWriteThroughWithoutCacheDisable,
    LongModeWithoutPae,
    PagingOffIn64BitCode,
    WpClearWithCet,
    PaeClearInLongMode,
    PcideOutsideLongMode,
    La57ChangeInLongMode,
    CetWithoutWp,
}

impl fmt::Display for CrFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReservedBits(bits) => write!(f, "reserved or unsupported bits {bits:#x} set"),
            Self::PagingWithoutProtection => f.write_str("CR0.PG set with CR0.PE clear"),
            Self::NotWriteThroughWithoutCacheDisable => f.write_str("CR0.NW set with CR0.CD clear"),
            Self::LongModeWithoutPae => {
                f.write_str("CR0.PG set with EFER.LME set and CR4.PAE clear")
            }
            Self::PagingOffIn64BitCode => f.write_str("CR0.PG cleared in 64-bit code"),
            Self::WpClearWithCet => f.write_str("CR0.WP cleared with CR4.CET set"),
            Self::PaeClearInLongMode => f.write_str("CR4.PAE cleared in IA-32e mode"),
            Self::PcideOutsideLongMode => f.write_str("CR4.PCIDE set outside IA-32e mode"),
            Self::La57ChangeInLongMode => f.write_str("CR4.LA57 changed in IA-32e mode"),
            Self::CetWithoutWp => f.write_str("CR4.CET set with CR0.WP clear"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Cr0,
    Cr4,
}

/// The rules for one guest control register, computed once from the capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCr {
    which: Which,
    pub must_be_one: u64,
    pub must_be_zero: u64,
    /// Bits the guest sets only in its view (the read shadow), never in the real register.
    pub shadowed: u64,
}

/// CR0.CD and NW: VM entry and VM exit never load them (SDM 27.3.2.1, 28.5.1), so a guest that
/// owned them would turn caching off in the CPU for Keel and for every guest after it, and the
/// others would read its CD. Keel keeps them: the guest sees what it wrote, caching stays on
/// (with EPT the memory type comes from EPT and PAT: SDM 29.3.7, "EPT and Memory Typing").
pub const SHADOWED_CR0: u64 = cr0::CD | cr0::NW;

impl GuestCr {
    pub fn cr0(caps: &VmxCaps, unrestricted: bool) -> Self {
        let (must_be_one, must_be_zero) = fixed_cr0(caps, unrestricted);
        Self {
            which: Which::Cr0,
            must_be_one,
            must_be_zero,
            shadowed: SHADOWED_CR0,
        }
    }

    /// The CR4 rules: VMX's fixed bits, plus the bits of features the guest's CPUID hides
    /// ([`HIDDEN_CR4`]), which it may not set either.
    pub fn cr4(caps: &VmxCaps) -> Self {
        let (must_be_one, must_be_zero) = fixed_cr4(caps);
        Self {
            which: Which::Cr4,
            must_be_one,
            must_be_zero: must_be_zero | HIDDEN_CR4,
            shadowed: 0,
        }
    }

    /// Host-owned bits: every fixed bit (CR4.VMXE among them) and the shadowed ones. A guest
    /// write that changes one exits; a read returns the shadow's copy.
    pub fn mask(&self) -> u64 {
        self.must_be_one | self.must_be_zero | self.shadowed
    }

    /// The real register (VMCS guest field) for the guest's view `view`.
    pub fn real(&self, view: u64) -> u64 {
        (view | self.must_be_one) & !self.must_be_zero & !self.shadowed
    }

    /// Mask and shadow for a guest whose view is `view`.
    pub fn policy(&self, view: u64) -> CrPolicy {
        CrPolicy {
            mask: self.mask(),
            shadow: view,
        }
    }

    /// What the guest reads: its own bits from the real value, host-owned bits from the shadow.
    pub fn view(&self, real: u64, shadow: u64) -> u64 {
        let mask = self.mask();
        (real & !mask) | (shadow & mask)
    }

    /// Checks a value the guest writes (or an initial value Keel chooses) and computes the real
    /// value, the shadow, and any change of EFER.LMA. `Err` means: inject #GP(0).
    ///
    /// Not checked here: CR4.PCIDE against CR3[11:0], and features the guest's CPUID hides
    /// (the caller masks those out of `must_be_zero`'s complement if it hides any).
    pub fn write(&self, value: u64, ctx: &CrContext) -> Result<CrLoad, CrFault> {
        match self.which {
            Which::Cr0 => self.write_cr0(value, ctx),
            Which::Cr4 => self.write_cr4(value, ctx),
        }
    }

    fn write_cr0(&self, value: u64, ctx: &CrContext) -> Result<CrLoad, CrFault> {
        let reserved = value & ((0xffff_ffff << 32) | (self.must_be_zero & cr0::DEFINED));
        if reserved != 0 {
            return Err(CrFault::ReservedBits(reserved));
        }
        let set = |bit| value & bit != 0;
        if set(cr0::PG) && !set(cr0::PE) {
            return Err(CrFault::PagingWithoutProtection);
        }
        if set(cr0::NW) && !set(cr0::CD) {
            return Err(CrFault::NotWriteThroughWithoutCacheDisable);
        }
        let paging_was_on = ctx.cr0 & cr0::PG != 0;
        let lme = ctx.efer & efer::LME != 0;
        if set(cr0::PG) && !paging_was_on && lme && ctx.cr4 & cr4::PAE == 0 {
            return Err(CrFault::LongModeWithoutPae);
        }
        if !set(cr0::PG) && paging_was_on && ctx.cs_long {
            return Err(CrFault::PagingOffIn64BitCode);
        }
        if !set(cr0::WP) && ctx.cr4 & cr4::CET != 0 {
            return Err(CrFault::WpClearWithCet);
        }
        // ET is hardwired to 1; other reserved bits of 31:0 are ignored.
        let view = (value & cr0::DEFINED) | cr0::ET;
        let lma = lme && set(cr0::PG);
        let new_efer = if lma {
            ctx.efer | efer::LMA
        } else {
            ctx.efer & !efer::LMA
        };
        let efer = (new_efer != ctx.efer).then_some(new_efer);
        Ok(CrLoad {
            value: self.real(view),
            shadow: view,
            efer,
        })
    }

    fn write_cr4(&self, value: u64, ctx: &CrContext) -> Result<CrLoad, CrFault> {
        let reserved = value & (self.must_be_zero | cr4::VMXE);
        if reserved != 0 {
            return Err(CrFault::ReservedBits(reserved));
        }
        let set = |bit| value & bit != 0;
        let long_mode = ctx.efer & efer::LMA != 0;
        if long_mode && !set(cr4::PAE) {
            return Err(CrFault::PaeClearInLongMode);
        }
        if set(cr4::PCIDE) && ctx.cr4 & cr4::PCIDE == 0 && !long_mode {
            return Err(CrFault::PcideOutsideLongMode);
        }
        if long_mode && (value ^ ctx.cr4) & cr4::LA57 != 0 {
            return Err(CrFault::La57ChangeInLongMode);
        }
        if set(cr4::CET) && ctx.cr0 & cr0::WP == 0 {
            return Err(CrFault::CetWithoutWp);
        }
        Ok(CrLoad {
            value: self.real(value),
            shadow: value,
            efer: None,
        })
    }
}

/// The CR0 view after `LMSW source`: it loads CR0 bits 3:0 (PE, MP, EM, TS) but cannot clear PE
/// (SDM Vol. 2 "LMSW—Load Machine Status Word").
pub fn lmsw(cr0_view: u64, source: u16) -> u64 {
    let low = u64::from(source) & 0xf;
    (cr0_view & !0xf) | low | (cr0_view & cr0::PE)
}

/// The CR0 view after `CLTS` (clears TS).
pub fn clts(cr0_view: u64) -> u64 {
    cr0_view & !cr0::TS
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn bochs() -> VmxCaps {
        VmxCaps::bochs_skylake_x()
    }

    #[test]
    fn fixed_bits_from_bochs() {
        let caps = bochs();
        assert_eq!(
            fixed_cr0(&caps, false),
            (0x8000_0021, 0xffff_ffff_0000_0000)
        );
        assert_eq!(fixed_cr0(&caps, true), (0x20, 0xffff_ffff_0000_0000));
        assert_eq!(fixed_cr4(&caps), (0x2000, !0x0037_27ff));
        assert_eq!(GuestCr::cr0(&caps, true).mask(), 0xffff_ffff_6000_0020);
        let cr4 = GuestCr::cr4(&caps);
        assert_ne!(cr4.mask() & cr4::VMXE, 0);
        assert_ne!(cr4.mask() & cr4::UMIP, 0, "Bochs' skylake_x lacks UMIP");
        assert_eq!(cr4.mask() & cr4::PAE, 0);
    }

    #[test]
    fn real_mode_start_and_protected_mode_switch() {
        let cr0 = GuestCr::cr0(&bochs(), true);
        let ctx = CrContext::default();
        // Reset state: the guest sees ET only; the real CR0 also has NE.
        let load = cr0.write(0, &ctx).unwrap();
        assert_eq!(load.shadow, cr0::ET);
        assert_eq!(load.value, cr0::ET | cr0::NE);
        assert_eq!(cr0.view(load.value, load.shadow), cr0::ET);
        assert_eq!(load.efer, None);
        // MOV CR0 with PE: real keeps NE forced, the view shows what the guest wrote.
        let ctx = CrContext {
            cr0: load.shadow,
            ..ctx
        };
        let load = cr0.write(0x11, &ctx).unwrap();
        assert_eq!((load.value, load.shadow), (0x31, 0x11));
        assert_eq!(cr0.view(load.value, load.shadow), 0x11);
        // The guest setting NE itself is seen.
        let load = cr0.write(0x31, &ctx).unwrap();
        assert_eq!((load.value, load.shadow), (0x31, 0x31));
    }

    #[test]
    fn cache_disable_is_the_guests_view_only() {
        // SDM 27.3.2.1 / 28.5.1: VM entry and exit never load CR0.CD and NW, so a guest that
        // owned them would set them in the CPU for Keel and every guest after it.
        let cr0 = GuestCr::cr0(&bochs(), true);
        assert_eq!(cr0.mask() & (cr0::CD | cr0::NW), cr0::CD | cr0::NW);
        let load = cr0.write(0x6000_0011, &CrContext::default()).unwrap();
        assert_eq!(load.shadow, 0x6000_0011, "the guest reads what it wrote");
        assert_eq!(load.value, 0x31, "caching stays on in the real CR0");
        assert_eq!(cr0.real(0x6000_0011), 0x31);
        assert_eq!(cr0.view(load.value, load.shadow), 0x6000_0011);
    }

    #[test]
    fn without_unrestricted_guest_pe_and_pg_are_forced() {
        let cr0 = GuestCr::cr0(&bochs(), false);
        let load = cr0.write(cr0::ET, &CrContext::default()).unwrap();
        assert_eq!(load.value, 0x8000_0031);
        assert_eq!(cr0.view(load.value, load.shadow), cr0::ET);
    }

    #[test]
    fn cr0_faults() {
        let cr0 = GuestCr::cr0(&bochs(), true);
        let ctx = CrContext {
            cr0: 0x11,
            ..Default::default()
        };
        assert_eq!(
            cr0.write(1 << 32 | 0x11, &ctx),
            Err(CrFault::ReservedBits(1 << 32))
        );
        assert_eq!(
            cr0.write(cr0::PG | cr0::ET, &ctx),
            Err(CrFault::PagingWithoutProtection)
        );
        assert_eq!(
            cr0.write(cr0::NW | 0x11, &ctx),
            Err(CrFault::NotWriteThroughWithoutCacheDisable)
        );
        assert!(cr0.write(cr0::NW | cr0::CD | 0x11, &ctx).is_ok());
        // Reserved bits of 31:0 are dropped, not faulted.
        assert_eq!(cr0.write(0x11 | (1 << 8), &ctx).unwrap().shadow, 0x11);
    }

    #[test]
    fn entering_and_leaving_long_mode() {
        let cr0 = GuestCr::cr0(&bochs(), true);
        let mut ctx = CrContext {
            cr0: 0x11,
            cr4: cr4::PAE,
            efer: efer::LME,
            cs_long: false,
        };
        let load = cr0.write(0x8000_0011, &ctx).unwrap();
        assert_eq!(load.efer, Some(efer::LME | efer::LMA));
        assert_eq!(load.value, 0x8000_0031);

        // Without PAE the processor refuses.
        ctx.cr4 = 0;
        assert_eq!(
            cr0.write(0x8000_0011, &ctx),
            Err(CrFault::LongModeWithoutPae)
        );

        // Leaving paging from compatibility mode clears LMA; from 64-bit code it faults.
        ctx = CrContext {
            cr0: 0x8000_0011,
            cr4: cr4::PAE,
            efer: efer::LME | efer::LMA,
            cs_long: false,
        };
        assert_eq!(cr0.write(0x11, &ctx).unwrap().efer, Some(efer::LME));
        ctx.cs_long = true;
        assert_eq!(cr0.write(0x11, &ctx), Err(CrFault::PagingOffIn64BitCode));
        // Paging on without LME: no EFER change.
        ctx = CrContext {
            cr0: 0x11,
            ..Default::default()
        };
        assert_eq!(cr0.write(0x8000_0011, &ctx).unwrap().efer, None);
    }

    #[test]
    fn cr4_writes() {
        let cr4r = GuestCr::cr4(&bochs());
        let ctx = CrContext::default();
        let want = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::PGE;
        let load = cr4r.write(want, &ctx).unwrap();
        assert_eq!(load.value, want | cr4::VMXE);
        assert_eq!(load.shadow, want);
        assert_eq!(cr4r.view(load.value, load.shadow), want);
        assert_eq!(
            cr4r.write(want | cr4::VMXE, &ctx),
            Err(CrFault::ReservedBits(cr4::VMXE))
        );
        assert_eq!(
            cr4r.write(cr4::UMIP, &ctx),
            Err(CrFault::ReservedBits(cr4::UMIP))
        );
        assert_eq!(
            cr4r.write(cr4::PCIDE, &ctx),
            Err(CrFault::PcideOutsideLongMode)
        );
        let long = CrContext {
            cr0: 0x8001_0011,
            cr4: cr4::PAE,
            efer: efer::LME | efer::LMA,
            cs_long: true,
        };
        assert_eq!(cr4r.write(0, &long), Err(CrFault::PaeClearInLongMode));
        assert!(cr4r.write(cr4::PAE | cr4::PCIDE, &long).is_ok());
        assert_eq!(
            cr4r.write(cr4::PAE | cr4::LA57, &long),
            Err(CrFault::ReservedBits(cr4::LA57)),
            "Bochs' skylake_x has no LA57"
        );
        let mut caps = bochs();
        caps.cr4_fixed1 |= cr4::LA57;
        assert_eq!(
            GuestCr::cr4(&caps).write(cr4::PAE | cr4::LA57, &long),
            Err(CrFault::La57ChangeInLongMode)
        );
    }

    #[test]
    fn lmsw_and_clts() {
        assert_eq!(lmsw(0x8000_0031, 0x0), 0x8000_0031 & !0xe);
        assert_eq!(lmsw(0x30, 0xf), 0x3f);
        assert_eq!(lmsw(0x31, 0xe) & cr0::PE, cr0::PE, "LMSW cannot clear PE");
        assert_eq!(
            lmsw(0x30, 0xfff0),
            0x30,
            "only bits 3:0 of the source count"
        );
        assert_eq!(clts(0x3b), 0x33);
    }

    #[test]
    fn fault_messages() {
        assert_eq!(
            CrFault::ReservedBits(0x2000).to_string(),
            "reserved or unsupported bits 0x2000 set"
        );
        assert_eq!(
            CrFault::LongModeWithoutPae.to_string(),
            "CR0.PG set with EFER.LME set and CR4.PAE clear"
        );
    }
}
