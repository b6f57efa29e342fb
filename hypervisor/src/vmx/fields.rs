//! Typed VMCS fields (SDM Vol. 3 Appendix B, "Field Encoding in VMCS").
//!
//! One enum per Appendix B group. Each group fixes the value type (`u16`, `u32`, `u64`) and
//! whether the field may be written, so that:
//!
//! * a read returns the field's own width (`vmcs.read(Guest32::ActivityState)` is a `u32`);
//! * writing a value of the wrong width does not compile;
//! * writing a read-only (VM-exit information) field does not compile:
//!
//! ```compile_fail,E0277
//! use keel::vmx::{FakeVmcs, ReadOnly32, Vmcs};
//! let mut vmcs = FakeVmcs::new();
//! vmcs.write(ReadOnly32::ExitReason, 0); // error: ReadOnly32 is not a WritableField
//! ```
//!
//! ```compile_fail,E0308
//! use keel::vmx::{FakeVmcs, Guest16, Vmcs};
//! let mut vmcs = FakeVmcs::new();
//! vmcs.write(Guest16::CsSelector, 0u64); // error: a 16-bit field takes a u16
//! ```
//!
//! The same fields with the right types compile:
//!
//! ```
//! use keel::vmx::{FakeVmcs, Guest16, ReadOnly32, Vmcs};
//! let mut vmcs = FakeVmcs::new();
//! vmcs.write(Guest16::CsSelector, 0x08u16);
//! let reason: u32 = vmcs.read(ReadOnly32::ExitReason);
//! assert_eq!(reason, 0);
//! ```
//!
//! An encoding (SDM B, Table B-1 "Structure of VMCS Component Encoding") packs: bit 0 access type
//! (0 = full), bits 9:1 index, bits 11:10 type (control, VM-exit information, guest state, host
//! state), bit 12 reserved, bits 14:13 width (16-bit, 64-bit, 32-bit, natural). Only "full"
//! encodings are listed: Keel runs in 64-bit mode and never needs the "high" halves.

use core::fmt;

/// Width of a field, from bits 14:13 of its encoding (SDM Table B-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldWidth {
    Bits16,
    Bits64,
    Bits32,
    /// Natural width: 64 bits on processors that support Intel 64, which Keel requires.
    Natural,
}

impl FieldWidth {
    pub const fn of(encoding: u32) -> Self {
        match (encoding >> 13) & 3 {
            0 => Self::Bits16,
            1 => Self::Bits64,
            2 => Self::Bits32,
            _ => Self::Natural,
        }
    }

    /// The bits a VMWRITE keeps (SDM 31.3 VMWRITE: excess high bits of the source are ignored).
    pub const fn mask(self) -> u64 {
        match self {
            Self::Bits16 => 0xffff,
            Self::Bits32 => 0xffff_ffff,
            Self::Bits64 | Self::Natural => u64::MAX,
        }
    }
}

/// Type of a field, from bits 11:10 of its encoding (SDM Table B-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Control,
    /// VM-exit information: read-only.
    ReadOnly,
    Guest,
    Host,
}

impl FieldKind {
    pub const fn of(encoding: u32) -> Self {
        match (encoding >> 10) & 3 {
            0 => Self::Control,
            1 => Self::ReadOnly,
            2 => Self::Guest,
            _ => Self::Host,
        }
    }
}

/// The Rust type that holds a field's value; conversions to and from the raw 64-bit VMREAD/VMWRITE
/// operand. Narrowing keeps the low bits, as VMREAD/VMWRITE do.
pub trait FieldValue: Copy {
    fn from_raw(raw: u64) -> Self;
    fn into_raw(self) -> u64;
}

impl FieldValue for u16 {
    fn from_raw(raw: u64) -> Self {
        raw as u16
    }
    fn into_raw(self) -> u64 {
        self.into()
    }
}

impl FieldValue for u32 {
    fn from_raw(raw: u64) -> Self {
        raw as u32
    }
    fn into_raw(self) -> u64 {
        self.into()
    }
}

impl FieldValue for u64 {
    fn from_raw(raw: u64) -> Self {
        raw
    }
    fn into_raw(self) -> u64 {
        self
    }
}

/// A VMCS field: its SDM encoding and the type of its value.
pub trait VmcsField: Copy {
    type Value: FieldValue;
    fn encoding(self) -> u32;
}

/// Fields software may VMWRITE. Not implemented for the `ReadOnly*` groups (VM-exit information,
/// SDM 25.9), so a write to one of them is a compile error.
pub trait WritableField: VmcsField {}

/// Raw access to the current VMCS: implemented by the hardware layer (VMREAD/VMWRITE) and by
/// [`FakeVmcs`](super::FakeVmcs) in tests. Prefer the typed [`Vmcs`] methods.
pub trait VmcsAccess {
    fn read_raw(&self, encoding: u32) -> u64;
    fn write_raw(&mut self, encoding: u32, value: u64);

    /// [`VmcsAccess::read_raw`] of a field every VMX processor has ([`always_present`]), which
    /// the typed [`Vmcs::read`] picks for those fields. With a VMCS current such a VMREAD
    /// cannot fail (SDM Vol. 3C 31.3 "VMREAD": VMfailInvalid only without a current VMCS,
    /// VMfailValid only for a field the processor does not support), so the hardware layer's
    /// handle on the current VMCS leaves its check out. The default is the checked read.
    #[inline(always)]
    fn read_present(&self, encoding: u32) -> u64 {
        self.read_raw(encoding)
    }

    /// [`VmcsAccess::write_raw`] of a writable field every VMX processor has: as
    /// [`VmcsAccess::read_present`] (VMWRITE also fails for a read-only field, which
    /// [`WritableField`] rules out at compile time).
    #[inline(always)]
    fn write_present(&mut self, encoding: u32, value: u64) {
        self.write_raw(encoding, value)
    }

    /// [`VmcsAccess::write_raw`] of a writable field that not every VMX processor has but this
    /// one does, its feature being in use (the VMX-preemption timer value while the run loop arms
    /// the timer): as [`VmcsAccess::write_present`], the hardware layer leaves its check out.
    #[inline(always)]
    fn write_supported_raw(&mut self, encoding: u32, value: u64) {
        self.write_raw(encoding, value)
    }
}

/// Whether every processor with VMX has the field `encoding`: the exit information, the
/// guest's RIP, RSP, RFLAGS, control and debug registers, segment access rights, interruptibility
/// and activity state, IA32_DEBUGCTL, and the entry-event and primary processor-based controls
/// (SDM Vol. 3C Appendix B lists them without a condition; the VMX-preemption timer value,
/// guest interrupt status, IA32_EFER, PAT, the EPT and APIC fields and the rest exist only with
/// their feature). Decided at compile time where the field is a constant, as on the exit path.
#[inline(always)]
pub const fn always_present(encoding: u32) -> bool {
    matches!(
        encoding,
        // VM-exit information (B.3.2, B.4.2): reason, interruption and IDT-vectoring
        // information and error codes, instruction length and information; qualification,
        // guest-linear address.
        0x4402..=0x440e | 0x6400 | 0x640a
        // Guest CR0, CR3, CR4, DR7, RSP, RIP, RFLAGS, pending debug exceptions (B.4.3).
        | 0x6800 | 0x6802 | 0x6804 | 0x681a..=0x6822
        // Guest segment access rights, interruptibility, activity state (B.3.3).
        | 0x4814..=0x4826
        // Guest IA32_DEBUGCTL (B.2.3).
        | 0x2802
        // Primary processor-based controls, VM-entry interruption information, exception
        // error code and instruction length (B.3.1).
        | 0x4002 | 0x4016..=0x401a
    ) && encoding & 1 == 0
}

/// Typed access, provided for every [`VmcsAccess`].
pub trait Vmcs: VmcsAccess {
    #[inline(always)]
    fn read<F: VmcsField>(&self, field: F) -> F::Value {
        let encoding = field.encoding();
        F::Value::from_raw(if always_present(encoding) {
            self.read_present(encoding)
        } else {
            self.read_raw(encoding)
        })
    }

    #[inline(always)]
    fn write<F: WritableField>(&mut self, field: F, value: F::Value) {
        let encoding = field.encoding();
        if always_present(encoding) {
            self.write_present(encoding, value.into_raw())
        } else {
            self.write_raw(encoding, value.into_raw())
        }
    }

    /// [`Vmcs::write`] of a field whose feature is in use ([`VmcsAccess::write_supported_raw`]).
    #[inline(always)]
    fn write_supported<F: WritableField>(&mut self, field: F, value: F::Value) {
        self.write_supported_raw(field.encoding(), value.into_raw())
    }

    /// Read, change, write back.
    fn update<F: WritableField>(&mut self, field: F, change: impl FnOnce(F::Value) -> F::Value) {
        let old = self.read(field);
        self.write(field, change(old));
    }
}

impl<T: VmcsAccess + ?Sized> Vmcs for T {}

macro_rules! vmcs_group {
    (
        $(#[$doc:meta])*
        $name:ident: $value:ty, $width:ident, $kind:ident {
            $( $(#[$vdoc:meta])* $variant:ident = $enc:literal, )+
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum $name {
            $( $(#[$vdoc])* $variant = $enc, )+
        }

        impl $name {
            /// Every field of the group, in encoding order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];
            pub const WIDTH: FieldWidth = FieldWidth::$width;
            pub const KIND: FieldKind = FieldKind::$kind;
            /// (encoding, name) of every field of the group.
            pub const NAMED: &'static [(u32, &'static str)] = &[$(($enc, stringify!($variant)),)+];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => stringify!($variant),)+
                }
            }
        }

        impl VmcsField for $name {
            type Value = $value;
            #[inline(always)]
            fn encoding(self) -> u32 {
                self as u32
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}::{}", stringify!($name), self.name())
            }
        }
    };
}

vmcs_group! {
    /// 16-bit control fields (SDM B.1.1).
    Control16: u16, Bits16, Control {
        Vpid = 0x0000,
        PostedInterruptNotificationVector = 0x0002,
        EptpIndex = 0x0004,
    }
}

vmcs_group! {
    /// 16-bit guest-state fields (SDM B.1.2).
    Guest16: u16, Bits16, Guest {
        EsSelector = 0x0800,
        CsSelector = 0x0802,
        SsSelector = 0x0804,
        DsSelector = 0x0806,
        FsSelector = 0x0808,
        GsSelector = 0x080a,
        LdtrSelector = 0x080c,
        TrSelector = 0x080e,
        InterruptStatus = 0x0810,
        PmlIndex = 0x0812,
    }
}

vmcs_group! {
    /// 16-bit host-state fields (SDM B.1.3).
    Host16: u16, Bits16, Host {
        EsSelector = 0x0c00,
        CsSelector = 0x0c02,
        SsSelector = 0x0c04,
        DsSelector = 0x0c06,
        FsSelector = 0x0c08,
        GsSelector = 0x0c0a,
        TrSelector = 0x0c0c,
    }
}

vmcs_group! {
    /// 64-bit control fields (SDM B.2.1).
    Control64: u64, Bits64, Control {
        IoBitmapA = 0x2000,
        IoBitmapB = 0x2002,
        MsrBitmaps = 0x2004,
        ExitMsrStoreAddr = 0x2006,
        ExitMsrLoadAddr = 0x2008,
        EntryMsrLoadAddr = 0x200a,
        ExecutiveVmcsPointer = 0x200c,
        PmlAddr = 0x200e,
        TscOffset = 0x2010,
        VirtualApicAddr = 0x2012,
        ApicAccessAddr = 0x2014,
        PostedInterruptDescAddr = 0x2016,
        VmFunctionControls = 0x2018,
        EptPointer = 0x201a,
        EoiExitBitmap0 = 0x201c,
        EoiExitBitmap1 = 0x201e,
        EoiExitBitmap2 = 0x2020,
        EoiExitBitmap3 = 0x2022,
        EptpListAddr = 0x2024,
        VmreadBitmapAddr = 0x2026,
        VmwriteBitmapAddr = 0x2028,
        VirtualizationExceptionInfoAddr = 0x202a,
        XssExitingBitmap = 0x202c,
        EnclsExitingBitmap = 0x202e,
        SubPagePermissionTablePointer = 0x2030,
        TscMultiplier = 0x2032,
        TertiaryProcBasedControls = 0x2034,
    }
}

vmcs_group! {
    /// 64-bit read-only data fields (SDM B.2.2).
    ReadOnly64: u64, Bits64, ReadOnly {
        GuestPhysicalAddr = 0x2400,
    }
}

vmcs_group! {
    /// 64-bit guest-state fields (SDM B.2.3).
    Guest64: u64, Bits64, Guest {
        /// Must be all ones unless VMCS shadowing is used (SDM 26.3.1.5).
        VmcsLinkPointer = 0x2800,
        Ia32Debugctl = 0x2802,
        Ia32Pat = 0x2804,
        Ia32Efer = 0x2806,
        Ia32PerfGlobalCtrl = 0x2808,
        Pdpte0 = 0x280a,
        Pdpte1 = 0x280c,
        Pdpte2 = 0x280e,
        Pdpte3 = 0x2810,
        Ia32Bndcfgs = 0x2812,
        Ia32RtitCtl = 0x2814,
    }
}

vmcs_group! {
    /// 64-bit host-state fields (SDM B.2.4).
    Host64: u64, Bits64, Host {
        Ia32Pat = 0x2c00,
        Ia32Efer = 0x2c02,
        Ia32PerfGlobalCtrl = 0x2c04,
    }
}

vmcs_group! {
    /// 32-bit control fields (SDM B.3.1).
    Control32: u32, Bits32, Control {
        PinBasedControls = 0x4000,
        PrimaryProcBasedControls = 0x4002,
        ExceptionBitmap = 0x4004,
        PageFaultErrorCodeMask = 0x4006,
        PageFaultErrorCodeMatch = 0x4008,
        Cr3TargetCount = 0x400a,
        ExitControls = 0x400c,
        ExitMsrStoreCount = 0x400e,
        ExitMsrLoadCount = 0x4010,
        EntryControls = 0x4012,
        EntryMsrLoadCount = 0x4014,
        EntryInterruptionInfo = 0x4016,
        EntryExceptionErrorCode = 0x4018,
        EntryInstructionLength = 0x401a,
        TprThreshold = 0x401c,
        SecondaryProcBasedControls = 0x401e,
        PleGap = 0x4020,
        PleWindow = 0x4022,
    }
}

vmcs_group! {
    /// 32-bit read-only data fields (SDM B.3.2).
    ReadOnly32: u32, Bits32, ReadOnly {
        VmInstructionError = 0x4400,
        ExitReason = 0x4402,
        ExitInterruptionInfo = 0x4404,
        ExitInterruptionErrorCode = 0x4406,
        IdtVectoringInfo = 0x4408,
        IdtVectoringErrorCode = 0x440a,
        ExitInstructionLength = 0x440c,
        ExitInstructionInfo = 0x440e,
    }
}

vmcs_group! {
    /// 32-bit guest-state fields (SDM B.3.3).
    Guest32: u32, Bits32, Guest {
        EsLimit = 0x4800,
        CsLimit = 0x4802,
        SsLimit = 0x4804,
        DsLimit = 0x4806,
        FsLimit = 0x4808,
        GsLimit = 0x480a,
        LdtrLimit = 0x480c,
        TrLimit = 0x480e,
        GdtrLimit = 0x4810,
        IdtrLimit = 0x4812,
        EsAccessRights = 0x4814,
        CsAccessRights = 0x4816,
        SsAccessRights = 0x4818,
        DsAccessRights = 0x481a,
        FsAccessRights = 0x481c,
        GsAccessRights = 0x481e,
        LdtrAccessRights = 0x4820,
        TrAccessRights = 0x4822,
        InterruptibilityState = 0x4824,
        ActivityState = 0x4826,
        Smbase = 0x4828,
        Ia32SysenterCs = 0x482a,
        PreemptionTimerValue = 0x482e,
    }
}

vmcs_group! {
    /// 32-bit host-state field (SDM B.3.4).
    Host32: u32, Bits32, Host {
        Ia32SysenterCs = 0x4c00,
    }
}

vmcs_group! {
    /// Natural-width control fields (SDM B.4.1).
    ControlNat: u64, Natural, Control {
        Cr0GuestHostMask = 0x6000,
        Cr4GuestHostMask = 0x6002,
        Cr0ReadShadow = 0x6004,
        Cr4ReadShadow = 0x6006,
        Cr3Target0 = 0x6008,
        Cr3Target1 = 0x600a,
        Cr3Target2 = 0x600c,
        Cr3Target3 = 0x600e,
    }
}

vmcs_group! {
    /// Natural-width read-only data fields (SDM B.4.2).
    ReadOnlyNat: u64, Natural, ReadOnly {
        ExitQualification = 0x6400,
        IoRcx = 0x6402,
        IoRsi = 0x6404,
        IoRdi = 0x6406,
        IoRip = 0x6408,
        GuestLinearAddr = 0x640a,
    }
}

vmcs_group! {
    /// Natural-width guest-state fields (SDM B.4.3).
    GuestNat: u64, Natural, Guest {
        Cr0 = 0x6800,
        Cr3 = 0x6802,
        Cr4 = 0x6804,
        EsBase = 0x6806,
        CsBase = 0x6808,
        SsBase = 0x680a,
        DsBase = 0x680c,
        FsBase = 0x680e,
        GsBase = 0x6810,
        LdtrBase = 0x6812,
        TrBase = 0x6814,
        GdtrBase = 0x6816,
        IdtrBase = 0x6818,
        Dr7 = 0x681a,
        Rsp = 0x681c,
        Rip = 0x681e,
        Rflags = 0x6820,
        PendingDebugExceptions = 0x6822,
        Ia32SysenterEsp = 0x6824,
        Ia32SysenterEip = 0x6826,
    }
}

vmcs_group! {
    /// Natural-width host-state fields (SDM B.4.4).
    HostNat: u64, Natural, Host {
        Cr0 = 0x6c00,
        Cr3 = 0x6c02,
        Cr4 = 0x6c04,
        FsBase = 0x6c06,
        GsBase = 0x6c08,
        TrBase = 0x6c0a,
        GdtrBase = 0x6c0c,
        IdtrBase = 0x6c0e,
        Ia32SysenterEsp = 0x6c10,
        Ia32SysenterEip = 0x6c12,
        Rsp = 0x6c14,
        Rip = 0x6c16,
    }
}

impl WritableField for Control16 {}
impl WritableField for Guest16 {}
impl WritableField for Host16 {}
impl WritableField for Control64 {}
impl WritableField for Guest64 {}
impl WritableField for Host64 {}
impl WritableField for Control32 {}
impl WritableField for Guest32 {}
impl WritableField for Host32 {}
impl WritableField for ControlNat {}
impl WritableField for GuestNat {}
impl WritableField for HostNat {}

/// Every group with its fields' (encoding, name), for dumps and for the tests.
pub const GROUPS: [(&str, &[(u32, &str)]); 15] = [
    ("Control16", Control16::NAMED),
    ("Guest16", Guest16::NAMED),
    ("Host16", Host16::NAMED),
    ("Control64", Control64::NAMED),
    ("ReadOnly64", ReadOnly64::NAMED),
    ("Guest64", Guest64::NAMED),
    ("Host64", Host64::NAMED),
    ("Control32", Control32::NAMED),
    ("ReadOnly32", ReadOnly32::NAMED),
    ("Guest32", Guest32::NAMED),
    ("Host32", Host32::NAMED),
    ("ControlNat", ControlNat::NAMED),
    ("ReadOnlyNat", ReadOnlyNat::NAMED),
    ("GuestNat", GuestNat::NAMED),
    ("HostNat", HostNat::NAMED),
];

/// The group and name of the field with this encoding (("GuestNat", "Rip")), for VMCS dumps and
/// error logs.
pub fn field_name(encoding: u32) -> Option<(&'static str, &'static str)> {
    GROUPS.iter().find_map(|(group, fields)| {
        fields
            .iter()
            .find(|(e, _)| *e == encoding)
            .map(|(_, name)| (*group, *name))
    })
}

/// A guest segment register and its four VMCS fields (SDM 25.4.1: selector, base, limit, access
/// rights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Ldtr,
    Tr,
}

impl Segment {
    pub const ALL: [Segment; 8] = [
        Self::Es,
        Self::Cs,
        Self::Ss,
        Self::Ds,
        Self::Fs,
        Self::Gs,
        Self::Ldtr,
        Self::Tr,
    ];

    pub const fn selector(self) -> Guest16 {
        match self {
            Self::Es => Guest16::EsSelector,
            Self::Cs => Guest16::CsSelector,
            Self::Ss => Guest16::SsSelector,
            Self::Ds => Guest16::DsSelector,
            Self::Fs => Guest16::FsSelector,
            Self::Gs => Guest16::GsSelector,
            Self::Ldtr => Guest16::LdtrSelector,
            Self::Tr => Guest16::TrSelector,
        }
    }

    pub const fn base(self) -> GuestNat {
        match self {
            Self::Es => GuestNat::EsBase,
            Self::Cs => GuestNat::CsBase,
            Self::Ss => GuestNat::SsBase,
            Self::Ds => GuestNat::DsBase,
            Self::Fs => GuestNat::FsBase,
            Self::Gs => GuestNat::GsBase,
            Self::Ldtr => GuestNat::LdtrBase,
            Self::Tr => GuestNat::TrBase,
        }
    }

    pub const fn limit(self) -> Guest32 {
        match self {
            Self::Es => Guest32::EsLimit,
            Self::Cs => Guest32::CsLimit,
            Self::Ss => Guest32::SsLimit,
            Self::Ds => Guest32::DsLimit,
            Self::Fs => Guest32::FsLimit,
            Self::Gs => Guest32::GsLimit,
            Self::Ldtr => Guest32::LdtrLimit,
            Self::Tr => Guest32::TrLimit,
        }
    }

    pub const fn access_rights(self) -> Guest32 {
        match self {
            Self::Es => Guest32::EsAccessRights,
            Self::Cs => Guest32::CsAccessRights,
            Self::Ss => Guest32::SsAccessRights,
            Self::Ds => Guest32::DsAccessRights,
            Self::Fs => Guest32::FsAccessRights,
            Self::Gs => Guest32::GsAccessRights,
            Self::Ldtr => Guest32::LdtrAccessRights,
            Self::Tr => Guest32::TrAccessRights,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::FakeVmcs;
    use alloc::vec::Vec;

    fn check_group<F: VmcsField + fmt::Debug>(all: &[F], width: FieldWidth, kind: FieldKind) {
        for &f in all {
            let e = f.encoding();
            assert_eq!(FieldWidth::of(e), width, "{f:?} {e:#x} width");
            assert_eq!(FieldKind::of(e), kind, "{f:?} {e:#x} type");
            assert_eq!(e & 1, 0, "{f:?} {e:#x} must be a full encoding");
            assert_eq!(e & (1 << 12), 0, "{f:?} {e:#x} bit 12 is reserved");
            assert_eq!(e >> 15, 0, "{f:?} {e:#x} bits 31:15 are reserved");
        }
    }

    /// Every encoding's width and type bits match the group it sits in (SDM Table B-1), so a
    /// mistyped encoding placed in the wrong group is caught.
    #[test]
    fn encodings_match_their_group() {
        use FieldKind::*;
        use FieldWidth::*;
        check_group(Control16::ALL, Bits16, Control);
        check_group(Guest16::ALL, Bits16, Guest);
        check_group(Host16::ALL, Bits16, Host);
        check_group(Control64::ALL, Bits64, Control);
        check_group(ReadOnly64::ALL, Bits64, ReadOnly);
        check_group(Guest64::ALL, Bits64, Guest);
        check_group(Host64::ALL, Bits64, Host);
        check_group(Control32::ALL, Bits32, Control);
        check_group(ReadOnly32::ALL, Bits32, ReadOnly);
        check_group(Guest32::ALL, Bits32, Guest);
        check_group(Host32::ALL, Bits32, Host);
        check_group(ControlNat::ALL, Natural, Control);
        check_group(ReadOnlyNat::ALL, Natural, ReadOnly);
        check_group(GuestNat::ALL, Natural, Guest);
        check_group(HostNat::ALL, Natural, Host);
        assert_eq!(Guest32::WIDTH, Bits32);
        assert_eq!(ReadOnlyNat::KIND, ReadOnly);
    }

    #[test]
    fn encodings_are_unique_and_named() {
        let mut all: Vec<u32> = GROUPS
            .iter()
            .flat_map(|(_, fields)| fields.iter().map(|(e, _)| *e))
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "two fields share an encoding");
        for (group, fields) in GROUPS {
            for &(e, name) in fields {
                assert_eq!(field_name(e), Some((group, name)));
                let width = match &group[group.len() - 2..] {
                    "16" => FieldWidth::Bits16,
                    "32" => FieldWidth::Bits32,
                    "64" => FieldWidth::Bits64,
                    _ => FieldWidth::Natural,
                };
                assert_eq!(FieldWidth::of(e), width, "{group}::{name}");
            }
        }
    }

    /// Spot checks against the SDM's Appendix B tables for the fields Keel's entry path depends on.
    #[test]
    fn sdm_spot_checks() {
        assert_eq!(Control16::Vpid.encoding(), 0x0000);
        assert_eq!(Control64::EptPointer.encoding(), 0x201a);
        assert_eq!(Control32::SecondaryProcBasedControls.encoding(), 0x401e);
        assert_eq!(ReadOnly32::ExitReason.encoding(), 0x4402);
        assert_eq!(Guest32::PreemptionTimerValue.encoding(), 0x482e);
        assert_eq!(GuestNat::Rip.encoding(), 0x681e);
        assert_eq!(HostNat::Rip.encoding(), 0x6c16);
        assert_eq!(field_name(0x681e), Some(("GuestNat", "Rip")));
        assert_eq!(field_name(0x4c00), Some(("Host32", "Ia32SysenterCs")));
        assert_eq!(field_name(0x0001), None);
        assert_eq!(alloc::format!("{}", Guest64::Ia32Efer), "Guest64::Ia32Efer");
    }

    #[test]
    fn segment_fields_share_an_index() {
        // Selector, limit, access rights and base of one segment use consecutive-by-group indexes:
        // ES is index 0 in each group, CS 1, ... (SDM B.1.2, B.3.3, B.4.3).
        for (i, seg) in Segment::ALL.iter().enumerate() {
            let i = i as u32;
            assert_eq!(seg.selector().encoding(), 0x0800 + 2 * i);
            assert_eq!(seg.limit().encoding(), 0x4800 + 2 * i);
            assert_eq!(seg.access_rights().encoding(), 0x4814 + 2 * i);
            assert_eq!(seg.base().encoding(), 0x6806 + 2 * i);
        }
    }

    #[test]
    fn typed_access_round_trips_and_truncates() {
        let mut vmcs = FakeVmcs::new();
        vmcs.write(Guest16::TrSelector, 0x28);
        vmcs.write(Guest32::CsAccessRights, 0xa09b);
        vmcs.write(GuestNat::Rip, 0xffff_8000_0000_1000);
        assert_eq!(vmcs.read(Guest16::TrSelector), 0x28u16);
        assert_eq!(vmcs.read(Guest32::CsAccessRights), 0xa09bu32);
        assert_eq!(vmcs.read(GuestNat::Rip), 0xffff_8000_0000_1000u64);
        // A raw write wider than the field keeps only the field's width, like VMWRITE.
        vmcs.write_raw(Guest16::CsSelector.encoding(), 0x1234_0010);
        assert_eq!(vmcs.read(Guest16::CsSelector), 0x0010);
        vmcs.update(GuestNat::Rip, |rip| rip + 3);
        assert_eq!(vmcs.read(GuestNat::Rip), 0xffff_8000_0000_1003);
    }

    #[test]
    fn widths() {
        assert_eq!(FieldWidth::of(0x0800).mask(), 0xffff);
        assert_eq!(FieldWidth::of(0x4800).mask(), 0xffff_ffff);
        assert_eq!(FieldWidth::of(0x2800).mask(), u64::MAX);
        assert_eq!(FieldWidth::of(0x6800), FieldWidth::Natural);
    }

    /// The fields whose VMREAD/VMWRITE the hardware layer does not check are those every VMX
    /// processor has: the exit path's, and none that depends on a feature.
    #[test]
    fn unchecked_access_only_for_fields_every_processor_has() {
        let present = [
            ReadOnly32::ExitReason.encoding(),
            ReadOnly32::ExitInstructionLength.encoding(),
            ReadOnly32::ExitInstructionInfo.encoding(),
            ReadOnly32::IdtVectoringInfo.encoding(),
            ReadOnlyNat::ExitQualification.encoding(),
            GuestNat::Rip.encoding(),
            GuestNat::Rflags.encoding(),
            GuestNat::Dr7.encoding(),
            GuestNat::Cr4.encoding(),
            GuestNat::PendingDebugExceptions.encoding(),
            Guest32::InterruptibilityState.encoding(),
            Guest32::SsAccessRights.encoding(),
            Guest64::Ia32Debugctl.encoding(),
            Control32::PrimaryProcBasedControls.encoding(),
            Control32::EntryInterruptionInfo.encoding(),
        ];
        for e in present {
            assert!(always_present(e), "{e:#x}");
        }
        let feature = [
            Guest32::PreemptionTimerValue.encoding(),
            Guest16::InterruptStatus.encoding(),
            Guest16::PmlIndex.encoding(),
            Guest64::Ia32Efer.encoding(),
            Guest64::Ia32Pat.encoding(),
            Guest64::Ia32Debugctl.encoding() + 1, // its high half
            Control32::SecondaryProcBasedControls.encoding(),
            Control32::TprThreshold.encoding(),
            Control64::EptPointer.encoding(),
            ReadOnly64::GuestPhysicalAddr.encoding(),
            Guest32::Smbase.encoding(),
        ];
        for e in feature {
            assert!(!always_present(e), "{e:#x}");
        }
    }
}
