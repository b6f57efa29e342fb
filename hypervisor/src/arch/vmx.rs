//! VMX operation on this CPU: turning it on (VMXON) and the raw VMX instructions.

use super::cpu::{self, msr};
use crate::mm;
use core::arch::asm;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnableError {
    /// CPUID.1:ECX.VMX[bit 5] = 0.
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked with "VMXON outside SMX" clear.
    DisabledInFirmware,
    OutOfMemory,
    /// VMXON itself failed (RFLAGS.CF or ZF set).
    VmxonFailed,
}

impl core::fmt::Display for EnableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoVmx => write!(f, "no VMX: CPUID.1:ECX.VMX[bit 5] = 0"),
            Self::DisabledInFirmware => {
                write!(f, "VT-x disabled in firmware: IA32_FEATURE_CONTROL is locked with VMXON outside SMX off")
            }
            Self::OutOfMemory => write!(f, "no memory for the VMXON region"),
            Self::VmxonFailed => write!(f, "VMXON failed"),
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
    let ok = unsafe { vmx_instr_ok(|| asm!("vmxon [{}]", in(reg) &region, options(nostack))) };
    if ok {
        Ok(region)
    } else {
        Err(EnableError::VmxonFailed)
    }
}

/// Runs one VMX instruction and reports success (VMsucceed: CF = ZF = 0, SDM 31.2).
///
/// # Safety
/// The closure executes a VMX instruction whose operands the caller validated.
#[inline(always)]
unsafe fn vmx_instr_ok(f: impl FnOnce()) -> bool {
    f();
    let flags: u64;
    // SAFETY: reading RFLAGS right after the instruction.
    unsafe { asm!("pushfq; pop {}", out(reg) flags) };
    flags & 0x41 == 0
}
