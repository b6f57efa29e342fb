//! Decoding what a VM exit reports: the exit reason (SDM 25.9.1, Appendix C), the exit
//! qualification of the exits Keel handles (SDM 28.2.1), event information for VM-exit and
//! IDT-vectoring interruption fields and for VM-entry injection (SDM 25.8.3, 25.9.2, 25.9.3), and
//! the guest interruptibility and activity states (SDM 25.4.2).

use crate::ept::EptPerms;
use bitflags::bitflags;
use core::fmt;

numbered_enum! {
    /// Basic exit reasons (SDM Appendix C, Table C-1). Numbers without a name in the SDM
    /// (35, 38, 42, 71) and later additions are `Unknown`.
    pub enum ExitReason: u16 {
        from: from_basic,
        /// The SDM's name for the exit ("I/O instruction"); `None` for unknown numbers.
        text: name,
        ExceptionOrNmi = 0, "Exception or non-maskable interrupt (NMI)";
        ExternalInterrupt = 1, "External interrupt";
        TripleFault = 2, "Triple fault";
        InitSignal = 3, "INIT signal";
        StartupIpi = 4, "Start-up IPI (SIPI)";
        IoSmi = 5, "I/O system-management interrupt (SMI)";
        OtherSmi = 6, "Other SMI";
        InterruptWindow = 7, "Interrupt window";
        NmiWindow = 8, "NMI window";
        TaskSwitch = 9, "Task switch";
        Cpuid = 10, "CPUID";
        Getsec = 11, "GETSEC";
        Hlt = 12, "HLT";
        Invd = 13, "INVD";
        Invlpg = 14, "INVLPG";
        Rdpmc = 15, "RDPMC";
        Rdtsc = 16, "RDTSC";
        Rsm = 17, "RSM";
        Vmcall = 18, "VMCALL";
        Vmclear = 19, "VMCLEAR";
        Vmlaunch = 20, "VMLAUNCH";
        Vmptrld = 21, "VMPTRLD";
        Vmptrst = 22, "VMPTRST";
        Vmread = 23, "VMREAD";
        Vmresume = 24, "VMRESUME";
        Vmwrite = 25, "VMWRITE";
        Vmxoff = 26, "VMXOFF";
        Vmxon = 27, "VMXON";
        ControlRegisterAccess = 28, "Control-register accesses";
        MovDr = 29, "MOV DR";
        IoInstruction = 30, "I/O instruction";
        Rdmsr = 31, "RDMSR";
        Wrmsr = 32, "WRMSR";
        EntryFailureGuestState = 33, "VM-entry failure due to invalid guest state";
        EntryFailureMsrLoading = 34, "VM-entry failure due to MSR loading";
        Mwait = 36, "MWAIT";
        MonitorTrapFlag = 37, "Monitor trap flag";
        Monitor = 39, "MONITOR";
        Pause = 40, "PAUSE";
        EntryFailureMachineCheck = 41, "VM-entry failure due to machine-check event";
        TprBelowThreshold = 43, "TPR below threshold";
        ApicAccess = 44, "APIC access";
        VirtualizedEoi = 45, "Virtualized EOI";
        GdtrIdtrAccess = 46, "Access to GDTR or IDTR";
        LdtrTrAccess = 47, "Access to LDTR or TR";
        EptViolation = 48, "EPT violation";
        EptMisconfiguration = 49, "EPT misconfiguration";
        Invept = 50, "INVEPT";
        Rdtscp = 51, "RDTSCP";
        PreemptionTimer = 52, "VMX-preemption timer expired";
        Invvpid = 53, "INVVPID";
        Wbinvd = 54, "WBINVD or WBNOINVD";
        Xsetbv = 55, "XSETBV";
        ApicWrite = 56, "APIC write";
        Rdrand = 57, "RDRAND";
        Invpcid = 58, "INVPCID";
        Vmfunc = 59, "VMFUNC";
        Encls = 60, "ENCLS";
        Rdseed = 61, "RDSEED";
        PmlFull = 62, "Page-modification log full";
        Xsaves = 63, "XSAVES";
        Xrstors = 64, "XRSTORS";
        Pconfig = 65, "PCONFIG";
        SppEvent = 66, "SPP-related event";
        Umwait = 67, "UMWAIT";
        Tpause = 68, "TPAUSE";
        Loadiwkey = 69, "LOADIWKEY";
        Enclv = 70, "ENCLV";
        EnqcmdPasidFailure = 72, "ENQCMD PASID translation failure";
        EnqcmdsPasidFailure = 73, "ENQCMDS PASID translation failure";
        BusLock = 74, "Bus lock";
        InstructionTimeout = 75, "Instruction timeout";
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "exit reason {}", self.number()),
        }
    }
}

/// The 32-bit exit-reason field, decoded (SDM 25.9.1, Table 25-18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReasonField {
    pub basic: ExitReason,
    /// Bit 27: the exit happened in enclave mode.
    pub enclave: bool,
    /// Bit 28: a monitor-trap-flag exit is pending.
    pub pending_mtf: bool,
    /// Bit 29: the exit came from VMX root operation (SMM monitor only).
    pub from_root: bool,
    /// Bit 31: VM entry failed (SDM 27.8); the guest never ran.
    pub entry_failure: bool,
}

impl ExitReasonField {
    pub const fn from_raw(raw: u32) -> Self {
        Self {
            basic: ExitReason::from_basic(raw as u16),
            enclave: raw & (1 << 27) != 0,
            pending_mtf: raw & (1 << 28) != 0,
            from_root: raw & (1 << 29) != 0,
            entry_failure: raw & (1 << 31) != 0,
        }
    }
}

impl fmt::Display for ExitReasonField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.basic, self.basic.number())?;
        if self.entry_failure {
            f.write_str(", VM-entry failure")?;
        }
        if self.enclave {
            f.write_str(", in enclave")?;
        }
        if self.pending_mtf {
            f.write_str(", MTF pending")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDirection {
    Out,
    In,
}

/// Exit qualification of an I/O-instruction exit (SDM 28.2.1, Table 28-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoQualification {
    /// Access size in bytes: 1, 2 or 4.
    pub size: u8,
    pub direction: IoDirection,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// The port came from an immediate operand (else from DX).
    pub immediate: bool,
    pub port: u16,
}

impl IoQualification {
    /// `None` for a size encoding the SDM does not define (bits 2:0 other than 0, 1, 3).
    pub const fn decode(qualification: u64) -> Option<Self> {
        let size = match qualification & 7 {
            0 => 1,
            1 => 2,
            3 => 4,
            _ => return None,
        };
        Some(Self {
            size,
            direction: if qualification & (1 << 3) != 0 {
                IoDirection::In
            } else {
                IoDirection::Out
            },
            string: qualification & (1 << 4) != 0,
            rep: qualification & (1 << 5) != 0,
            immediate: qualification & (1 << 6) != 0,
            port: (qualification >> 16) as u16,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrAccessType {
    MovToCr,
    MovFromCr,
    Clts,
    Lmsw,
}

/// Exit qualification of a control-register access (SDM 28.2.1, Table 28-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrAccessQualification {
    /// The control register (0, 3, 4 or 8; 0 for CLTS and LMSW).
    pub cr: u8,
    pub access: CrAccessType,
    /// LMSW with a memory operand (else a register).
    pub lmsw_memory: bool,
    /// General-purpose register of a MOV CR, in the SDM's order: 0 RAX, 1 RCX, 2 RDX, 3 RBX,
    /// 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15.
    pub gpr: u8,
    /// LMSW source data.
    pub lmsw_source: u16,
}

impl CrAccessQualification {
    pub const fn decode(qualification: u64) -> Self {
        Self {
            cr: (qualification & 0xf) as u8,
            access: match (qualification >> 4) & 3 {
                0 => CrAccessType::MovToCr,
                1 => CrAccessType::MovFromCr,
                2 => CrAccessType::Clts,
                _ => CrAccessType::Lmsw,
            },
            lmsw_memory: qualification & (1 << 6) != 0,
            gpr: ((qualification >> 8) & 0xf) as u8,
            lmsw_source: (qualification >> 16) as u16,
        }
    }
}

/// Names of the general-purpose registers by the index exit qualifications and instruction
/// information use.
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

bitflags! {
    /// Exit qualification of an EPT violation (SDM 28.2.1, Table 28-7).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EptViolationQualification: u64 {
        /// The access was a data read.
        const READ = 1 << 0;
        /// The access was a data write.
        const WRITE = 1 << 1;
        /// The access was an instruction fetch.
        const FETCH = 1 << 2;
        /// The guest-physical address was readable (AND of bit 0 over the walk).
        const READABLE = 1 << 3;
        const WRITABLE = 1 << 4;
        const EXECUTABLE = 1 << 5;
        /// Executable for user-mode linear addresses (mode-based execute control).
        const USER_EXECUTABLE = 1 << 6;
        /// The guest-linear-address field is valid.
        const GLA_VALID = 1 << 7;
        /// With GLA_VALID: the access was to the translation of the linear address (not to a
        /// guest paging-structure entry).
        const GLA_TRANSLATION = 1 << 8;
        const USER_MODE_LINEAR = 1 << 9;
        const WRITABLE_LINEAR = 1 << 10;
        const EXECUTE_DISABLE_LINEAR = 1 << 11;
        /// NMI unblocking due to IRET.
        const NMI_UNBLOCKING = 1 << 12;
        const SHADOW_STACK = 1 << 13;
        const SUPERVISOR_SHADOW_STACK = 1 << 14;
        const GUEST_PAGING_VERIFICATION = 1 << 15;
        const ASYNCHRONOUS = 1 << 16;
        const _ = !0;
    }
}

impl EptViolationQualification {
    /// The kinds of access attempted.
    pub fn attempted(self) -> EptPerms {
        EptPerms::from_bits_truncate((self.bits() & 7) as u8)
    }

    /// The permissions the translation granted.
    pub fn allowed(self) -> EptPerms {
        EptPerms::from_bits_truncate(((self.bits() >> 3) & 7) as u8)
    }

    /// True when nothing mapped the address (no permission at all), as opposed to an access
    /// the mapping forbids.
    pub fn not_present(self) -> bool {
        self.allowed().is_empty()
    }
}

/// Exception vectors (SDM Vol. 3 6.3.1, Table 6-1).
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const MC: u8 = 18;
    pub const XM: u8 = 19;
    pub const VE: u8 = 20;
    pub const CP: u8 = 21;
}

/// Whether the processor pushes an error code for this exception vector (SDM 6.13; the VM-entry
/// check of SDM 27.2.1.3 asks for "deliver error code" exactly for these, in protected mode).
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21)
}

/// Mnemonic of an exception vector ("#GP"), if it is one.
pub const fn exception_name(v: u8) -> Option<&'static str> {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "", "#TS", "#NP", "#SS",
        "#GP", "#PF", "", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    if (v as usize) < NAMES.len() && !NAMES[v as usize].is_empty() {
        Some(NAMES[v as usize])
    } else {
        None
    }
}

/// Interruption type, bits 10:8 of an interruption-information field (SDM Table 25-17, 25-19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptionType {
    External = 0,
    Reserved = 1,
    Nmi = 2,
    HardwareException = 3,
    SoftwareInterrupt = 4,
    PrivilegedSoftwareException = 5,
    SoftwareException = 6,
    Other = 7,
}

impl InterruptionType {
    const fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => Self::External,
            1 => Self::Reserved,
            2 => Self::Nmi,
            3 => Self::HardwareException,
            4 => Self::SoftwareInterrupt,
            5 => Self::PrivilegedSoftwareException,
            6 => Self::SoftwareException,
            _ => Self::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::External => "external interrupt",
            Self::Reserved => "reserved type",
            Self::Nmi => "NMI",
            Self::HardwareException => "hardware exception",
            Self::SoftwareInterrupt => "software interrupt",
            Self::PrivilegedSoftwareException => "privileged software exception",
            Self::SoftwareException => "software exception",
            Self::Other => "other event",
        }
    }

    /// Software-initiated events, for which VM entry needs the instruction length
    /// (SDM 27.2.1.3).
    pub const fn needs_instruction_length(self) -> bool {
        matches!(
            self,
            Self::SoftwareInterrupt | Self::PrivilegedSoftwareException | Self::SoftwareException
        )
    }
}

/// An interruption-information field: VM-entry injection (SDM 25.8.3), VM-exit interruption
/// information (25.9.2) and IDT-vectoring information (25.9.3) share this layout: bits 7:0
/// vector, 10:8 type, 11 error code valid, 12 NMI unblocking due to IRET (exits only), 31 valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InterruptionInfo(pub u32);

impl InterruptionInfo {
    const ERROR_CODE: u32 = 1 << 11;
    const NMI_UNBLOCKING: u32 = 1 << 12;
    const VALID: u32 = 1 << 31;

    /// Nothing to inject (valid bit clear).
    pub const NONE: Self = Self(0);

    pub const fn new(vector: u8, kind: InterruptionType, error_code: bool) -> Self {
        let ec = if error_code { Self::ERROR_CODE } else { 0 };
        Self(Self::VALID | ec | ((kind as u32) << 8) | vector as u32)
    }

    pub const fn external(vector: u8) -> Self {
        Self::new(vector, InterruptionType::External, false)
    }

    pub const fn nmi() -> Self {
        Self::new(vector::NMI, InterruptionType::Nmi, false)
    }

    /// A hardware exception; `error_code` should be [`exception_has_error_code`] for the vector
    /// when the guest is in protected mode, false in real mode.
    pub const fn hardware_exception(vector: u8, error_code: bool) -> Self {
        Self::new(vector, InterruptionType::HardwareException, error_code)
    }

    /// `INT n`.
    pub const fn software_interrupt(vector: u8) -> Self {
        Self::new(vector, InterruptionType::SoftwareInterrupt, false)
    }

    /// `INT3` (#BP) or `INTO` (#OF).
    pub const fn software_exception(vector: u8) -> Self {
        Self::new(vector, InterruptionType::SoftwareException, false)
    }

    /// `INT1` (ICEBP).
    pub const fn privileged_software_exception(vector: u8) -> Self {
        Self::new(vector, InterruptionType::PrivilegedSoftwareException, false)
    }

    pub const fn raw(self) -> u32 {
        self.0
    }

    pub const fn vector(self) -> u8 {
        self.0 as u8
    }

    pub const fn kind(self) -> InterruptionType {
        InterruptionType::from_bits(self.0 >> 8)
    }

    pub const fn has_error_code(self) -> bool {
        self.0 & Self::ERROR_CODE != 0
    }

    pub const fn valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    /// On exits: the event was an NMI-blocking IRET's fault, and blocking by NMI must be set
    /// again before re-entry (SDM 28.2.3).
    pub const fn nmi_unblocking_due_to_iret(self) -> bool {
        self.0 & Self::NMI_UNBLOCKING != 0
    }

    /// The same event as an injection: IDT-vectoring information re-injected at VM entry
    /// (SDM 28.2.4) keeps vector, type and error-code bit but not bit 12.
    pub const fn for_injection(self) -> Self {
        Self(self.0 & (Self::VALID | Self::ERROR_CODE | 0x7ff))
    }
}

impl fmt::Display for InterruptionInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.valid() {
            return f.write_str("none");
        }
        let kind = self.kind();
        write!(f, "{} vector {}", kind.name(), self.vector())?;
        if matches!(
            kind,
            InterruptionType::HardwareException | InterruptionType::SoftwareException
        ) {
            if let Some(name) = exception_name(self.vector()) {
                write!(f, " ({name})")?;
            }
        }
        if self.has_error_code() {
            f.write_str(" with error code")?;
        }
        Ok(())
    }
}

bitflags! {
    /// Guest interruptibility state (SDM 25.4.2, Table 25-3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Interruptibility: u32 {
        const BLOCKING_BY_STI = 1 << 0;
        const BLOCKING_BY_MOV_SS = 1 << 1;
        const BLOCKING_BY_SMI = 1 << 2;
        const BLOCKING_BY_NMI = 1 << 3;
        const ENCLAVE_INTERRUPTION = 1 << 4;
        const _ = !0;
    }
}

impl Interruptibility {
    /// An external interrupt can be delivered right now as far as these bits go (RFLAGS.IF is
    /// checked separately).
    pub fn allows_interrupt(self) -> bool {
        !self.intersects(Self::BLOCKING_BY_STI | Self::BLOCKING_BY_MOV_SS)
    }

    /// An NMI can be delivered (SDM 27.3.1.5: not with MOV-SS or NMI blocking).
    pub fn allows_nmi(self) -> bool {
        !self.intersects(Self::BLOCKING_BY_MOV_SS | Self::BLOCKING_BY_NMI)
    }
}

/// Guest activity state (SDM 25.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityState {
    Active = 0,
    Hlt = 1,
    Shutdown = 2,
    WaitForSipi = 3,
}

impl ActivityState {
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Active),
            1 => Some(Self::Hlt),
            2 => Some(Self::Shutdown),
            3 => Some(Self::WaitForSipi),
            _ => None,
        }
    }

    pub const fn raw(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn exit_reason_numbers_round_trip() {
        for n in 0..=80u16 {
            let r = ExitReason::from_basic(n);
            assert_eq!(r.number(), n);
            let unnamed = matches!(n, 35 | 38 | 42 | 71) || n > 75;
            assert_eq!(r.name().is_none(), unnamed, "exit reason {n}");
        }
        assert_eq!(ExitReason::from_basic(10), ExitReason::Cpuid);
        assert_eq!(ExitReason::from_basic(30), ExitReason::IoInstruction);
        assert_eq!(ExitReason::from_basic(48), ExitReason::EptViolation);
        assert_eq!(ExitReason::from_basic(52), ExitReason::PreemptionTimer);
        assert_eq!(ExitReason::from_basic(75), ExitReason::InstructionTimeout);
    }

    #[test]
    fn exit_reason_display() {
        assert_eq!(ExitReason::IoInstruction.to_string(), "I/O instruction");
        assert_eq!(ExitReason::Vmcall.to_string(), "VMCALL");
        assert_eq!(ExitReason::Unknown(38).to_string(), "exit reason 38");
    }

    #[test]
    fn exit_reason_field() {
        let f = ExitReasonField::from_raw(0x8000_0021);
        assert_eq!(f.basic, ExitReason::EntryFailureGuestState);
        assert!(f.entry_failure && !f.enclave && !f.pending_mtf && !f.from_root);
        assert_eq!(
            f.to_string(),
            "VM-entry failure due to invalid guest state (33), VM-entry failure"
        );
        let f = ExitReasonField::from_raw(0x1800_000c);
        assert_eq!(f.basic, ExitReason::Hlt);
        assert!(f.enclave && f.pending_mtf && !f.entry_failure);
        let f = ExitReasonField::from_raw(0x2000_0000 | 77);
        assert!(f.from_root);
        assert_eq!(f.basic, ExitReason::Unknown(77));
    }

    #[test]
    fn io_qualification() {
        // OUT DX, AL to 0x3f8.
        let q = IoQualification::decode(0x03f8_0000).unwrap();
        assert_eq!(
            q,
            IoQualification {
                size: 1,
                direction: IoDirection::Out,
                string: false,
                rep: false,
                immediate: false,
                port: 0x3f8
            }
        );
        // IN EAX, 0x71 (immediate).
        let q = IoQualification::decode(0x0071_0000 | 0x40 | 0x8 | 3).unwrap();
        assert_eq!(
            (q.size, q.direction, q.immediate, q.port),
            (4, IoDirection::In, true, 0x71)
        );
        // REP OUTSW to DX = 0x1f0.
        let q = IoQualification::decode(0x01f0_0000 | 0x20 | 0x10 | 1).unwrap();
        assert_eq!((q.size, q.string, q.rep, q.port), (2, true, true, 0x1f0));
        assert_eq!(IoQualification::decode(2), None);
        assert_eq!(IoQualification::decode(7), None);
    }

    #[test]
    fn cr_access_qualification() {
        // MOV CR3, R12.
        let q = CrAccessQualification::decode(0x0c03);
        assert_eq!((q.cr, q.access, q.gpr), (3, CrAccessType::MovToCr, 12));
        assert_eq!(GPR_NAMES[q.gpr as usize], "r12");
        // MOV RBX, CR4 ... (from CR).
        let q = CrAccessQualification::decode(0x0314);
        assert_eq!((q.cr, q.access, q.gpr), (4, CrAccessType::MovFromCr, 3));
        // CLTS.
        assert_eq!(
            CrAccessQualification::decode(0x20).access,
            CrAccessType::Clts
        );
        // LMSW with memory operand, source 0x0001.
        let q = CrAccessQualification::decode(0x0001_0070);
        assert_eq!(q.access, CrAccessType::Lmsw);
        assert!(q.lmsw_memory);
        assert_eq!(q.lmsw_source, 1);
    }

    #[test]
    fn ept_violation_qualification() {
        // A write to a read-only, executable page, with a valid linear address.
        let q = EptViolationQualification::from_bits_retain(0x2 | 0x8 | 0x20 | 0x80 | 0x100);
        assert_eq!(q.attempted(), EptPerms::WRITE);
        assert_eq!(q.allowed(), EptPerms::READ | EptPerms::EXECUTE);
        assert!(!q.not_present());
        assert!(q.contains(EptViolationQualification::GLA_VALID));
        assert!(q.contains(EptViolationQualification::GLA_TRANSLATION));
        // A fetch from nothing.
        let q = EptViolationQualification::from_bits_retain(0x4);
        assert_eq!(q.attempted(), EptPerms::EXECUTE);
        assert!(q.not_present());
    }

    #[test]
    fn interruption_info_constructors() {
        let gp = InterruptionInfo::hardware_exception(vector::GP, true);
        assert_eq!(gp.raw(), 0x8000_0b0d);
        assert_eq!(gp.vector(), 13);
        assert_eq!(gp.kind(), InterruptionType::HardwareException);
        assert!(gp.has_error_code() && gp.valid());
        assert_eq!(
            gp.to_string(),
            "hardware exception vector 13 (#GP) with error code"
        );
        assert_eq!(InterruptionInfo::external(0x20).raw(), 0x8000_0020);
        assert_eq!(InterruptionInfo::nmi().raw(), 0x8000_0202);
        assert_eq!(
            InterruptionInfo::software_interrupt(0x80).raw(),
            0x8000_0480
        );
        assert_eq!(
            InterruptionInfo::privileged_software_exception(1).raw(),
            0x8000_0501
        );
        assert_eq!(InterruptionInfo::software_exception(3).raw(), 0x8000_0603);
        assert_eq!(InterruptionInfo::NONE.to_string(), "none");
        assert!(InterruptionType::SoftwareInterrupt.needs_instruction_length());
        assert!(!InterruptionType::HardwareException.needs_instruction_length());
    }

    #[test]
    fn interruption_info_decoding() {
        // A #PF during event delivery with NMI unblocking: re-injection drops bit 12.
        let info = InterruptionInfo(0x8000_1b0e);
        assert_eq!(info.kind(), InterruptionType::HardwareException);
        assert!(info.nmi_unblocking_due_to_iret());
        assert_eq!(info.for_injection().raw(), 0x8000_0b0e);
        assert_eq!(InterruptionInfo(0x0000_0b0e).to_string(), "none");
    }

    #[test]
    fn error_code_vectors() {
        let with: alloc::vec::Vec<u8> = (0..32).filter(|&v| exception_has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21]);
        assert_eq!(exception_name(14), Some("#PF"));
        assert_eq!(exception_name(9), None);
        assert_eq!(exception_name(200), None);
    }

    #[test]
    fn interruptibility_and_activity() {
        let sti = Interruptibility::BLOCKING_BY_STI;
        assert!(!sti.allows_interrupt() && sti.allows_nmi());
        let nmi = Interruptibility::BLOCKING_BY_NMI;
        assert!(nmi.allows_interrupt() && !nmi.allows_nmi());
        assert!(Interruptibility::empty().allows_interrupt());
        assert_eq!(ActivityState::from_raw(1), Some(ActivityState::Hlt));
        assert_eq!(ActivityState::from_raw(4), None);
        assert_eq!(ActivityState::WaitForSipi.raw(), 3);
    }
}
