//! VMX operation on this CPU: turning it on (VMXON) and the raw VMX instructions.

use super::cpu::{self, msr};
use crate::mm;
use crate::vmx::{Invalidation, VmxError};
use core::arch::asm;

/// Runs one VMX instruction and turns its status flags into a result (SDM 31.2 "Conventions":
/// VMsucceed clears CF and ZF, VMfailInvalid sets CF, VMfailValid sets ZF and leaves the error
/// number in the current VMCS). CF and ZF are captured with SETC/SETZ in the same asm block as
/// the instruction, so no compiler-generated code can change them in between.
macro_rules! vmx_instruction {
    ($insn:literal, $($operands:tt)*) => {{
        let cf: u8;
        let zf: u8;
        asm!(
            $insn,
            "setc {cf}",
            "setz {zf}",
            $($operands)*
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
        $crate::arch::vmx::status(cf, zf)
    }};
}
pub(crate) use vmx_instruction;

/// The result of a VMX instruction from its CF and ZF (see [`vmx_instruction!`]).
pub(crate) fn status(cf: u8, zf: u8) -> Result<(), VmxError> {
    let rflags = u64::from(cf & 1) | (u64::from(zf & 1) << 6);
    VmxError::check(rflags, read_instruction_error)
}

/// The VM-instruction error field of the current VMCS (SDM 31.4); 0 (no error number) when there
/// is no current VMCS to read it from.
pub(crate) fn read_instruction_error() -> u32 {
    read_field(0x4400).unwrap_or(0) as u32
}

/// VMREAD of field `encoding` of the current VMCS; `None` when it fails (no current VMCS, or no
/// such field).
pub(crate) fn read_field(encoding: u64) -> Option<u64> {
    let value: u64;
    let failed: u8;
    // SAFETY: VMREAD only reads the current VMCS; with none, or with an unsupported field, it
    // fails with CF or ZF set and nothing is read.
    unsafe {
        asm!(
            "vmread {v}, {e}",
            "setbe {f}",
            v = out(reg) value,
            e = in(reg) encoding,
            f = out(reg_byte) failed,
            options(nostack),
        )
    };
    (failed == 0).then_some(value)
}

/// Executes one INVEPT or INVVPID (SDM 31.3) that a [`crate::vmx::FlushPolicy`] chose, with the
/// type operand in a register and the 128-bit descriptor in memory.
pub fn invalidate(inv: &Invalidation) -> Result<(), VmxError> {
    let descriptor = inv.descriptor();
    let kind = inv.kind();
    // SAFETY: VMX root operation (these run after VMXON); the policy only picks types the
    // capability MSR reports and nonzero VPIDs for the single-context type; the descriptor lives
    // on the stack for the duration of the instruction, which only reads it.
    unsafe {
        match inv {
            Invalidation::Ept { .. } => vmx_instruction!(
                "invept {t}, [{d}]",
                t = in(reg) kind,
                d = in(reg) descriptor.as_ptr(),
            ),
            Invalidation::Vpid { .. } => vmx_instruction!(
                "invvpid {t}, [{d}]",
                t = in(reg) kind,
                d = in(reg) descriptor.as_ptr(),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnableError {
    /// CPUID.1:ECX.VMX[bit 5] = 0.
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked with "VMXON outside SMX" clear.
    DisabledInFirmware,
    OutOfMemory,
    /// VMXON itself failed (VMfailInvalid: bad region or revision; VMfailValid: already in VMX
    /// operation).
    VmxonFailed(VmxError),
}

impl core::fmt::Display for EnableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoVmx => write!(f, "no VMX: CPUID.1:ECX.VMX[bit 5] = 0"),
            Self::DisabledInFirmware => {
                write!(f, "VT-x disabled in firmware: IA32_FEATURE_CONTROL is locked with VMXON outside SMX off")
            }
            Self::OutOfMemory => write!(f, "no memory for the VMXON region"),
            Self::VmxonFailed(e) => write!(f, "VMXON failed: {e}"),
        }
    }
}

const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const CR4_VMXE: u64 = 1 << 13;

pub fn has_vmx() -> bool {
    cpu::cpuid(1, 0)[2] & (1 << 5) != 0
}

/// Enters VMX root operation, following SDM 24.7 "Enabling and entering VMX operation":
/// check CPUID, lock IA32_FEATURE_CONTROL if the firmware left it open, apply the CR0/CR4 fixed
/// bits (SDM A.7, A.8), and VMXON a region stamped with the VMCS revision identifier.
/// Returns the VMXON region's physical address.
pub fn enable() -> Result<u64, EnableError> {
    if !has_vmx() {
        return Err(EnableError::NoVmx);
    }
    let fc = cpu::rdmsr(msr::IA32_FEATURE_CONTROL);
    if fc & FEATURE_CONTROL_LOCK == 0 {
        // OVMF leaves the MSR unlocked (seen under Bochs); lock it with VMX enabled.
        crate::info!("IA32_FEATURE_CONTROL unlocked ({fc:#x}): locking with VMXON outside SMX");
        // SAFETY: the MSR exists when CPUID reports VMX, and the lock bit is clear so it is writable.
        unsafe {
            cpu::wrmsr(
                msr::IA32_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            )
        };
    } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(EnableError::DisabledInFirmware);
    }

    // SAFETY: setting the bits VMX requires keeps protected mode and paging as they are.
    unsafe {
        let cr0 = (cpu::read_cr0() | cpu::rdmsr(0x486)) & cpu::rdmsr(0x487);
        cpu::write_cr0(cr0);
        let cr4 = (cpu::read_cr4() | CR4_VMXE | cpu::rdmsr(0x488)) & cpu::rdmsr(0x489);
        cpu::write_cr4(cr4);
    }

    let region = mm::alloc_zeroed_page().ok_or(EnableError::OutOfMemory)?;
    let revision = (cpu::rdmsr(msr::IA32_VMX_BASIC) & 0x7fff_ffff) as u32;
    // SAFETY: `region` is a fresh zeroed frame owned by Keel from now on.
    unsafe { (mm::phys_to_virt(region) as *mut u32).write(revision) };
    // SAFETY: VMX is enabled in CR4 and the region is prepared per SDM 24.11.5.
    unsafe { vmx_instruction!("vmxon [{r}]", r = in(reg) &region,) }
        .map_err(EnableError::VmxonFailed)?;
    Ok(region)
}
