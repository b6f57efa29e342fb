//! The checks a processor makes on the guest-state area at VM entry (SDM 27.3.1) and on the
//! event-injection fields (SDM 27.2.1.3), run over any [`VmcsAccess`]: tests run them on a
//! [`FakeVmcs`](super::FakeVmcs) (`FakeVmcs::check_entry`) so that a state the CPU would refuse
//! fails on the host, not only in Bochs.
//!
//! Where the SDM allows more than Keel ever writes and the fake cannot check it (a VMCS link
//! pointer other than all ones needs a shadow VMCS in memory), the checker is stricter and says so.
//! Processor-specific parameters (capability MSRs, address widths) come from an [`EntryEnv`].

use super::caps::VmxCaps;
use super::controls::{EntryControls, PinBasedControls, SecondaryControls};
use super::cr::{cr0, cr4, efer, fixed_cr0, fixed_cr4};
use super::fields::{Segment, Vmcs, VmcsAccess};
use super::{Control32, Guest32, Guest64, GuestNat};
use alloc::format;
use alloc::string::String;

/// What the checks depend on besides the VMCS: the capability MSRs and the address widths.
#[derive(Debug, Clone, Copy)]
pub struct EntryEnv {
    pub caps: VmxCaps,
    /// MAXPHYADDR (CPUID.80000008H:EAX[7:0]).
    pub phys_bits: u32,
    /// Linear-address width (48 with 4-level paging).
    pub linear_bits: u32,
}

impl EntryEnv {
    /// Bochs' corei7_skylake_x capability MSRs, 46-bit physical and 48-bit linear addresses.
    pub fn bochs() -> Self {
        Self {
            caps: VmxCaps::bochs_skylake_x(),
            phys_bits: 46,
            linear_bits: 48,
        }
    }
}

/// [`check_guest_state_with`] in [`EntryEnv::bochs`].
pub fn check_guest_state<V: VmcsAccess + ?Sized>(v: &V) -> Result<(), String> {
    check_guest_state_with(v, &EntryEnv::bochs())
}

macro_rules! fail {
    ($section:literal, $($arg:tt)*) => {
        return Err(format!("SDM {}: {}", $section, format_args!($($arg)*)))
    };
}

/// One segment register as the guest-state area holds it (SDM 25.4.1).
#[derive(Debug, Clone, Copy)]
struct Seg {
    name: &'static str,
    selector: u16,
    base: u64,
    limit: u32,
    ar: u32,
}

impl Seg {
    fn read<V: VmcsAccess + ?Sized>(v: &V, s: Segment) -> Self {
        let name = match s {
            Segment::Es => "ES",
            Segment::Cs => "CS",
            Segment::Ss => "SS",
            Segment::Ds => "DS",
            Segment::Fs => "FS",
            Segment::Gs => "GS",
            Segment::Ldtr => "LDTR",
            Segment::Tr => "TR",
        };
        Self {
            name,
            selector: v.read(s.selector()),
            base: v.read(s.base()),
            limit: v.read(s.limit()),
            ar: v.read(s.access_rights()),
        }
    }
    fn kind(&self) -> u32 {
        self.ar & 0xf
    }
    fn s(&self) -> bool {
        self.ar & (1 << 4) != 0
    }
    fn dpl(&self) -> u32 {
        (self.ar >> 5) & 3
    }
    fn present(&self) -> bool {
        self.ar & (1 << 7) != 0
    }
    fn l(&self) -> bool {
        self.ar & (1 << 13) != 0
    }
    fn db(&self) -> bool {
        self.ar & (1 << 14) != 0
    }
    fn g(&self) -> bool {
        self.ar & (1 << 15) != 0
    }
    fn usable(&self) -> bool {
        self.ar & (1 << 16) == 0
    }
    fn rpl(&self) -> u32 {
        u32::from(self.selector & 3)
    }

    /// The rules every usable descriptor shares (SDM 27.3.1.2): reserved bits 11:8 and 31:17 clear,
    /// and a limit that G can express.
    fn common(&self) -> Result<(), String> {
        let (name, ar, limit) = (self.name, self.ar, self.limit);
        if ar & 0xf00 != 0 {
            fail!(
                "27.3.1.2",
                "{name} access rights {ar:#x}: reserved bits 11:8 set"
            );
        }
        if ar & 0xfffe_0000 != 0 {
            fail!(
                "27.3.1.2",
                "{name} access rights {ar:#x}: reserved bits 31:17 set"
            );
        }
        if limit & 0xfff != 0xfff && self.g() {
            fail!("27.3.1.2", "{name} limit {limit:#x} has bits 11:0 not all set, so G must be 0 (access rights {ar:#x})");
        }
        if limit >> 20 != 0 && !self.g() {
            fail!("27.3.1.2", "{name} limit {limit:#x} has bits 31:20 set, so G must be 1 (access rights {ar:#x})");
        }
        Ok(())
    }
}

fn canonical(addr: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// Interruption types (SDM 25.8.3, Table 25-17).
mod event {
    pub const EXTERNAL_INTERRUPT: u32 = 0;
    pub const NMI: u32 = 2;
    pub const HARDWARE_EXCEPTION: u32 = 3;
    pub const SOFTWARE_INTERRUPT: u32 = 4;
    pub const PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const SOFTWARE_EXCEPTION: u32 = 6;
    pub const OTHER_EVENT: u32 = 7;
}

/// Interruptibility-state bits (SDM 25.4.2, Table 25-3).
const BLOCKING_BY_STI: u32 = 1 << 0;
const BLOCKING_BY_MOV_SS: u32 = 1 << 1;
const BLOCKING_BY_SMI: u32 = 1 << 2;
const BLOCKING_BY_NMI: u32 = 1 << 3;

/// Activity states (SDM 25.4.2, Table 25-2).
const ACTIVE: u32 = 0;
const HLT: u32 = 1;
const SHUTDOWN: u32 = 2;
const WAIT_FOR_SIPI: u32 = 3;

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_VM: u64 = 1 << 17;

/// Runs the checks of SDM 27.2.1.3 (event injection) and 27.3.1.1-27.3.1.6 (guest state) in the
/// processor's order and reports the first that fails, naming the section, the field and the value.
pub fn check_guest_state_with<V: VmcsAccess + ?Sized>(v: &V, env: &EntryEnv) -> Result<(), String> {
    let entry = EntryControls::from_bits_retain(v.read(Control32::EntryControls));
    let secondary =
        SecondaryControls::from_bits_retain(v.read(Control32::SecondaryProcBasedControls));
    let pin = PinBasedControls::from_bits_retain(v.read(Control32::PinBasedControls));
    let ug = secondary.contains(SecondaryControls::UNRESTRICTED_GUEST);
    let ia32e = entry.contains(EntryControls::IA32E_MODE_GUEST);
    let cr0v = v.read(GuestNat::Cr0);
    let cr4v = v.read(GuestNat::Cr4);
    let rflags = v.read(GuestNat::Rflags);
    let info = v.read(Control32::EntryInterruptionInfo);
    let valid = info & (1 << 31) != 0;
    let (vector, kind) = (info & 0xff, (info >> 8) & 7);

    check_event_injection(v, env, ug, cr0v)?;

    // SDM 27.3.1.1: control registers, debug registers and MSRs.
    let (one, zero) = fixed_cr0(&env.caps, ug);
    if cr0v & one != one || cr0v & zero != 0 {
        fail!("27.3.1.1", "CR0 {cr0v:#x} violates IA32_VMX_CR0_FIXED0/1 (must be one {one:#x}, must be zero {zero:#x})");
    }
    if cr0v & cr0::PG != 0 && cr0v & cr0::PE == 0 {
        fail!("27.3.1.1", "CR0 {cr0v:#x}: PG set without PE");
    }
    let (one, zero) = fixed_cr4(&env.caps);
    if cr4v & one != one || cr4v & zero != 0 {
        fail!("27.3.1.1", "CR4 {cr4v:#x} violates IA32_VMX_CR4_FIXED0/1 (must be one {one:#x}, must be zero {zero:#x})");
    }
    if cr4v & cr4::CET != 0 && cr0v & cr0::WP == 0 {
        fail!("27.3.1.1", "CR4.CET set with CR0.WP clear");
    }
    if entry.contains(EntryControls::LOAD_DEBUG_CONTROLS) {
        let debugctl = v.read(Guest64::Ia32Debugctl);
        // Defined: LBR (0), BTF (1), TR..FREEZE_WHILE_SMM (6-14), RTM_DEBUG (15).
        if debugctl & !(0b11 | (0x3ff << 6)) != 0 {
            fail!("27.3.1.1", "IA32_DEBUGCTL {debugctl:#x}: reserved bits set");
        }
        let dr7 = v.read(GuestNat::Dr7);
        if dr7 >> 32 != 0 {
            fail!("27.3.1.1", "DR7 {dr7:#x}: bits 63:32 must be 0");
        }
    }
    if ia32e && (cr0v & cr0::PG == 0 || cr4v & cr4::PAE == 0) {
        fail!(
            "27.3.1.1",
            "IA-32e mode guest needs CR0.PG and CR4.PAE (CR0 {cr0v:#x}, CR4 {cr4v:#x})"
        );
    }
    if !ia32e && cr4v & cr4::PCIDE != 0 {
        fail!("27.3.1.1", "CR4.PCIDE set outside IA-32e mode");
    }
    let cr3 = v.read(GuestNat::Cr3);
    if cr3 >> env.phys_bits != 0 {
        fail!(
            "27.3.1.1",
            "CR3 {cr3:#x} exceeds the {}-bit physical-address width",
            env.phys_bits
        );
    }
    for (name, value) in [
        ("IA32_SYSENTER_ESP", v.read(GuestNat::Ia32SysenterEsp)),
        ("IA32_SYSENTER_EIP", v.read(GuestNat::Ia32SysenterEip)),
    ] {
        if !canonical(value, env.linear_bits) {
            fail!("27.3.1.1", "{name} {value:#x} is not canonical");
        }
    }
    if entry.contains(EntryControls::LOAD_IA32_PAT) {
        let pat = v.read(Guest64::Ia32Pat);
        if pat
            .to_le_bytes()
            .iter()
            .any(|b| !matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
        {
            fail!(
                "27.3.1.1",
                "IA32_PAT {pat:#x}: an entry holds a reserved memory type"
            );
        }
    }
    if entry.contains(EntryControls::LOAD_IA32_EFER) {
        let e = v.read(Guest64::Ia32Efer);
        if e & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0 {
            fail!("27.3.1.1", "IA32_EFER {e:#x}: reserved bits set");
        }
        if (e & efer::LMA != 0) != ia32e {
            fail!(
                "27.3.1.1",
                "IA32_EFER.LMA ({}) differs from the IA-32e mode guest entry control ({})",
                e & efer::LMA != 0,
                ia32e
            );
        }
        if cr0v & cr0::PG != 0 && (e & efer::LMA != 0) != (e & efer::LME != 0) {
            fail!(
                "27.3.1.1",
                "IA32_EFER {e:#x}: with CR0.PG set, LMA must equal LME"
            );
        }
    }

    // SDM 27.3.1.2: segment registers.
    let [es, cs, ss, ds, fs, gs, ldtr, tr] = Segment::ALL.map(|s| Seg::read(v, s));
    let v86 = rflags & RFLAGS_VM != 0;
    if tr.selector & 4 != 0 {
        fail!("27.3.1.2", "TR selector {:#x}: TI must be 0", tr.selector);
    }
    if ldtr.usable() && ldtr.selector & 4 != 0 {
        fail!(
            "27.3.1.2",
            "LDTR selector {:#x}: TI must be 0",
            ldtr.selector
        );
    }
    if !v86 && !ug && ss.rpl() != cs.rpl() {
        fail!(
            "27.3.1.2",
            "SS.RPL {} differs from CS.RPL {}",
            ss.rpl(),
            cs.rpl()
        );
    }
    let data = [ss, ds, es, fs, gs];
    if v86 {
        for s in [cs, ss, ds, es, fs, gs] {
            if s.base != u64::from(s.selector) << 4 || s.limit != 0xffff || s.ar != 0xf3 {
                fail!("27.3.1.2", "virtual-8086 mode: {} must have base selector*16, limit 0xffff, access rights 0xf3 (selector {:#x}, base {:#x}, limit {:#x}, access rights {:#x})", s.name, s.selector, s.base, s.limit, s.ar);
            }
        }
    }
    for s in [tr, fs, gs] {
        if !canonical(s.base, env.linear_bits) {
            fail!("27.3.1.2", "{} base {:#x} is not canonical", s.name, s.base);
        }
    }
    if ldtr.usable() && !canonical(ldtr.base, env.linear_bits) {
        fail!("27.3.1.2", "LDTR base {:#x} is not canonical", ldtr.base);
    }
    for s in [cs, ss, ds, es] {
        if (s.name == "CS" || s.usable()) && s.base >> 32 != 0 {
            fail!(
                "27.3.1.2",
                "{} base {:#x}: bits 63:32 must be 0",
                s.name,
                s.base
            );
        }
    }
    if !v86 {
        check_code_and_data(&cs, &data, ug, ia32e, cr0v)?;
    }
    // TR (SDM 27.3.1.2): a busy TSS, always usable.
    let tss_ok = if ia32e {
        tr.kind() == 11
    } else {
        matches!(tr.kind(), 3 | 11)
    };
    if !tss_ok {
        fail!(
            "27.3.1.2",
            "TR access rights {:#x}: type {} is not a busy {}TSS",
            tr.ar,
            tr.kind(),
            if ia32e { "64-bit " } else { "16- or 32-bit " }
        );
    }
    if tr.s() || !tr.present() || !tr.usable() {
        fail!(
            "27.3.1.2",
            "TR access rights {:#x}: must be a present (P = 1), usable system descriptor (S = 0)",
            tr.ar
        );
    }
    tr.common()?;
    if ldtr.usable() {
        if ldtr.kind() != 2 || ldtr.s() || !ldtr.present() {
            fail!("27.3.1.2", "LDTR access rights {:#x}: a usable LDTR must be a present LDT descriptor (type 2, S = 0, P = 1)", ldtr.ar);
        }
        ldtr.common()?;
    }

    // SDM 27.3.1.3: descriptor-table registers.
    for (name, base, limit) in [
        (
            "GDTR",
            v.read(GuestNat::GdtrBase),
            v.read(Guest32::GdtrLimit),
        ),
        (
            "IDTR",
            v.read(GuestNat::IdtrBase),
            v.read(Guest32::IdtrLimit),
        ),
    ] {
        if !canonical(base, env.linear_bits) {
            fail!("27.3.1.3", "{name} base {base:#x} is not canonical");
        }
        if limit >> 16 != 0 {
            fail!("27.3.1.3", "{name} limit {limit:#x}: bits 31:16 must be 0");
        }
    }

    // SDM 27.3.1.4: RIP and RFLAGS.
    let rip = v.read(GuestNat::Rip);
    if !(ia32e && cs.l()) {
        if rip >> 32 != 0 {
            fail!(
                "27.3.1.4",
                "RIP {rip:#x}: bits 63:32 must be 0 outside 64-bit mode"
            );
        }
    } else {
        let high = rip >> env.linear_bits;
        if high != 0 && high != u64::MAX >> env.linear_bits {
            fail!(
                "27.3.1.4",
                "RIP {rip:#x}: bits 63:{} must be identical",
                env.linear_bits
            );
        }
    }
    const RFLAGS_RESERVED: u64 = !0x3f_ffff | (1 << 15) | (1 << 5) | (1 << 3);
    if rflags & RFLAGS_RESERVED != 0 {
        fail!(
            "27.3.1.4",
            "RFLAGS {rflags:#x}: reserved bits 63:22, 15, 5 or 3 set"
        );
    }
    if rflags & 2 == 0 {
        fail!("27.3.1.4", "RFLAGS {rflags:#x}: bit 1 must be 1");
    }
    if v86 && (ia32e || cr0v & cr0::PE == 0) {
        fail!(
            "27.3.1.4",
            "RFLAGS.VM set in IA-32e mode or with CR0.PE clear"
        );
    }
    if valid && kind == event::EXTERNAL_INTERRUPT && rflags & RFLAGS_IF == 0 {
        fail!(
            "27.3.1.4",
            "injecting external interrupt {vector:#x} with RFLAGS.IF clear"
        );
    }

    // SDM 27.3.1.5: non-register state.
    let activity = v.read(Guest32::ActivityState);
    let supported = match activity {
        ACTIVE => true,
        HLT => env.caps.activity_hlt(),
        SHUTDOWN => env.caps.misc & (1 << 7) != 0,
        WAIT_FOR_SIPI => env.caps.activity_wait_for_sipi(),
        _ => false,
    };
    if !supported {
        fail!(
            "27.3.1.5",
            "activity state {activity} is not one this processor supports"
        );
    }
    if activity == HLT && ss.dpl() != 0 {
        fail!("27.3.1.5", "HLT activity state with SS.DPL {}", ss.dpl());
    }
    let intr = v.read(Guest32::InterruptibilityState);
    if activity != ACTIVE && intr & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0 {
        fail!(
            "27.3.1.5",
            "activity state {activity} with blocking by STI or MOV SS ({intr:#x})"
        );
    }
    if valid {
        let allowed = match activity {
            ACTIVE => true,
            HLT => match kind {
                event::EXTERNAL_INTERRUPT | event::NMI => true,
                event::HARDWARE_EXCEPTION => matches!(vector, 1 | 18),
                event::OTHER_EVENT => vector == 0,
                _ => false,
            },
            SHUTDOWN => kind == event::NMI || (kind == event::HARDWARE_EXCEPTION && vector == 18),
            _ => false,
        };
        if !allowed {
            fail!("27.3.1.5", "event type {kind} vector {vector} cannot be injected into activity state {activity}");
        }
    }
    // Bit 4 (enclave interruption) needs SGX, which Keel's processors do not offer.
    if intr & !0xf != 0 {
        fail!(
            "27.3.1.5",
            "interruptibility state {intr:#x}: reserved bits 31:4 set"
        );
    }
    if intr & BLOCKING_BY_STI != 0 && intr & BLOCKING_BY_MOV_SS != 0 {
        fail!(
            "27.3.1.5",
            "interruptibility state {intr:#x}: blocking by STI and by MOV SS together"
        );
    }
    if intr & BLOCKING_BY_STI != 0 && rflags & RFLAGS_IF == 0 {
        fail!("27.3.1.5", "blocking by STI with RFLAGS.IF clear");
    }
    if valid
        && kind == event::EXTERNAL_INTERRUPT
        && intr & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0
    {
        fail!(
            "27.3.1.5",
            "injecting an external interrupt while blocked by STI or MOV SS ({intr:#x})"
        );
    }
    if valid && kind == event::NMI {
        if intr & BLOCKING_BY_MOV_SS != 0 {
            fail!("27.3.1.5", "injecting an NMI while blocked by MOV SS");
        }
        // SDM 27.8: some processors refuse this too (exit qualification 3).
        if intr & BLOCKING_BY_STI != 0 {
            fail!("27.3.1.5", "injecting an NMI while blocked by STI");
        }
        if pin.contains(PinBasedControls::VIRTUAL_NMIS) && intr & BLOCKING_BY_NMI != 0 {
            fail!(
                "27.3.1.5",
                "injecting a virtual NMI while blocking by NMI is set"
            );
        }
    }
    if intr & BLOCKING_BY_SMI != 0 {
        fail!("27.3.1.5", "blocking by SMI set outside SMM");
    }
    let pending = v.read(GuestNat::PendingDebugExceptions);
    const PENDING_RESERVED: u64 = (0xff << 4) | (1 << 13) | (1 << 15) | !0x1_ffff;
    if pending & PENDING_RESERVED != 0 {
        fail!(
            "27.3.1.5",
            "pending debug exceptions {pending:#x}: reserved bits set"
        );
    }
    if intr & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0 || activity == HLT {
        let btf = v.read(Guest64::Ia32Debugctl) & 2 != 0;
        let bs = pending & (1 << 14) != 0;
        if bs != (rflags & RFLAGS_TF != 0 && !btf) {
            fail!("27.3.1.5", "pending debug exceptions {pending:#x}: BS must be set exactly when RFLAGS.TF = 1 and DEBUGCTL.BTF = 0");
        }
    }
    let link = v.read(Guest64::VmcsLinkPointer);
    if link != u64::MAX {
        fail!(
            "27.3.1.5",
            "VMCS link pointer {link:#x}: Keel has no shadow VMCS, so it must be all ones"
        );
    }

    // SDM 27.3.1.6: PDPTEs, loaded from the VMCS under EPT with PAE paging outside IA-32e mode.
    if cr0v & cr0::PG != 0
        && cr4v & cr4::PAE != 0
        && !ia32e
        && secondary.contains(SecondaryControls::ENABLE_EPT)
    {
        for (i, f) in [
            Guest64::Pdpte0,
            Guest64::Pdpte1,
            Guest64::Pdpte2,
            Guest64::Pdpte3,
        ]
        .into_iter()
        .enumerate()
        {
            let e = v.read(f);
            if e & 1 != 0 && (e & 0x1e6 != 0 || e >> env.phys_bits != 0) {
                fail!("27.3.1.6", "PDPTE{i} {e:#x}: reserved bits set");
            }
        }
    }
    Ok(())
}

/// CS and the data segments outside virtual-8086 mode (SDM 27.3.1.2, "Access-rights fields").
fn check_code_and_data(
    cs: &Seg,
    data: &[Seg; 5],
    ug: bool,
    ia32e: bool,
    cr0v: u64,
) -> Result<(), String> {
    let ss = &data[0];
    let cs_ok = matches!(cs.kind(), 9 | 11 | 13 | 15) || (ug && cs.kind() == 3);
    if !cs_ok {
        fail!(
            "27.3.1.2",
            "CS access rights {:#x}: type {} is not an accessed code segment{}",
            cs.ar,
            cs.kind(),
            if ug {
                " or accessed read/write data"
            } else {
                ""
            }
        );
    }
    if !cs.s() || !cs.present() {
        fail!(
            "27.3.1.2",
            "CS access rights {:#x}: must be a present (P = 1) code or data descriptor (S = 1)",
            cs.ar
        );
    }
    match cs.kind() {
        3 if cs.dpl() != 0 => {
            fail!(
                "27.3.1.2",
                "CS type 3 (unrestricted guest) with DPL {}",
                cs.dpl()
            )
        }
        9 | 11 if cs.dpl() != ss.dpl() => fail!(
            "27.3.1.2",
            "non-conforming CS with DPL {} differs from SS.DPL {}",
            cs.dpl(),
            ss.dpl()
        ),
        13 | 15 if cs.dpl() > ss.dpl() => fail!(
            "27.3.1.2",
            "conforming CS with DPL {} above SS.DPL {}",
            cs.dpl(),
            ss.dpl()
        ),
        _ => {}
    }
    if ia32e && cs.l() && cs.db() {
        fail!(
            "27.3.1.2",
            "CS access rights {:#x}: L and D/B both set in IA-32e mode",
            cs.ar
        );
    }
    cs.common()?;
    if ss.usable() && !matches!(ss.kind(), 3 | 7) {
        fail!(
            "27.3.1.2",
            "SS access rights {:#x}: type {} is not a read/write data segment",
            ss.ar,
            ss.kind()
        );
    }
    if !ug && ss.dpl() != ss.rpl() {
        fail!(
            "27.3.1.2",
            "SS.DPL {} differs from its selector's RPL {}",
            ss.dpl(),
            ss.rpl()
        );
    }
    if (cs.kind() == 3 || cr0v & cr0::PE == 0) && ss.dpl() != 0 {
        fail!(
            "27.3.1.2",
            "SS.DPL {} must be 0 in real mode or with a type-3 CS",
            ss.dpl()
        );
    }
    for s in data.iter().filter(|s| s.usable()) {
        if s.kind() & 1 == 0 {
            fail!(
                "27.3.1.2",
                "{} access rights {:#x}: type {} is not accessed",
                s.name,
                s.ar,
                s.kind()
            );
        }
        if s.kind() & 8 != 0 && s.kind() & 2 == 0 {
            fail!(
                "27.3.1.2",
                "{} access rights {:#x}: an execute-only code segment",
                s.name,
                s.ar
            );
        }
        if !s.s() || !s.present() {
            fail!("27.3.1.2", "{} access rights {:#x}: a usable segment must be a present (P = 1) code or data descriptor (S = 1)", s.name, s.ar);
        }
        if s.name != "SS" && !ug && s.kind() <= 11 && s.dpl() < s.rpl() {
            fail!(
                "27.3.1.2",
                "{} DPL {} below its selector's RPL {}",
                s.name,
                s.dpl(),
                s.rpl()
            );
        }
        s.common()?;
    }
    Ok(())
}

/// The VM-entry event-injection fields (SDM 27.2.1.3).
fn check_event_injection<V: VmcsAccess + ?Sized>(
    v: &V,
    env: &EntryEnv,
    ug: bool,
    cr0v: u64,
) -> Result<(), String> {
    let info = v.read(Control32::EntryInterruptionInfo);
    if info & (1 << 31) == 0 {
        return Ok(());
    }
    let (vector, kind) = (info & 0xff, (info >> 8) & 7);
    let deliver = info & (1 << 11) != 0;
    if info & 0x7fff_f000 != 0 {
        fail!(
            "27.2.1.3",
            "VM-entry interruption information {info:#x}: reserved bits 30:12 set"
        );
    }
    match kind {
        1 => fail!("27.2.1.3", "interruption type 1 is reserved ({info:#x})"),
        event::NMI if vector != 2 => {
            fail!("27.2.1.3", "NMI injection with vector {vector} (must be 2)")
        }
        event::HARDWARE_EXCEPTION if vector > 31 => {
            fail!(
                "27.2.1.3",
                "hardware exception with vector {vector} (must be 0-31)"
            )
        }
        // Type 7 is "other event": only the pending MTF VM exit, vector 0, and only with the
        // monitor trap flag control allowed (IA32_VMX_PROCBASED_CTLS bit 59).
        event::OTHER_EVENT if vector != 0 || env.caps.procbased & (1 << (32 + 27)) == 0 => {
            fail!(
                "27.2.1.3",
                "other-event injection (type 7) with vector {vector}"
            )
        }
        _ => {}
    }
    // Error code iff a protected-mode hardware exception that pushes one (#DF, #TS, #NP, #SS,
    // #GP, #PF, #AC).
    let wants_code = (!ug || cr0v & cr0::PE != 0)
        && kind == event::HARDWARE_EXCEPTION
        && matches!(vector, 8 | 10..=14 | 17);
    if deliver != wants_code {
        fail!(
            "27.2.1.3",
            "deliver-error-code is {} for type {kind} vector {vector} (must be {})",
            deliver as u8,
            wants_code as u8
        );
    }
    if deliver {
        let code = v.read(Control32::EntryExceptionErrorCode);
        if code >> 16 != 0 {
            fail!(
                "27.2.1.3",
                "VM-entry exception error code {code:#x}: bits 31:16 must be 0"
            );
        }
    }
    if matches!(
        kind,
        event::SOFTWARE_INTERRUPT
            | event::PRIVILEGED_SOFTWARE_EXCEPTION
            | event::SOFTWARE_EXCEPTION
    ) {
        let len = v.read(Control32::EntryInstructionLength);
        let zero_ok = env.caps.misc & (1 << 30) != 0;
        if len > 15 || (len == 0 && !zero_ok) {
            fail!(
                "27.2.1.3",
                "VM-entry instruction length {len} for a software event (must be 1-15)"
            );
        }
    }
    Ok(())
}
