//! Thin wrappers over the instructions the guests use. The guests own their whole (virtual)
//! machine, so port I/O is exposed as safe functions: a wrong port write can hang the guest but
//! cannot break Rust's memory safety.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O touches no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// CPUID with ECX = 0: (EAX, EBX, ECX, EDX).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    #[cfg(target_arch = "x86")]
    use core::arch::x86::__cpuid_count;
    #[cfg(target_arch = "x86_64")]
    use core::arch::x86_64::__cpuid_count;
    #[allow(unused_unsafe)]
    // SAFETY: every x86 CPU these guests run on has CPUID.
    let r = unsafe { __cpuid_count(leaf, 0) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

pub fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86")]
    use core::arch::x86::_rdtsc;
    #[cfg(target_arch = "x86_64")]
    use core::arch::x86_64::_rdtsc;
    // SAFETY: RDTSC is available (CR4.TSD is clear) and touches no memory.
    unsafe { _rdtsc() }
}

/// Set by the #UD handler when it skipped a VMCALL (no hypervisor, e.g. plain QEMU).
pub(crate) static VMCALL_UD: AtomicBool = AtomicBool::new(false);

/// VMCALL raised #UD: there is no hypervisor answering hypercalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoHypervisor;

/// Hypercall `nr` with EBX/RBX = `b` and ECX/RCX = `c`; returns EAX/RAX.
pub fn vmcall(nr: usize, b: usize, c: usize) -> Result<usize, NoHypervisor> {
    VMCALL_UD.store(false, Ordering::SeqCst);
    let ret: usize;
    // RBX (x86_64) cannot be named as an operand, so swap the argument in and out of it. If the
    // compiler happens to pick EBX for {b} (possible on x86), the swaps are no-ops.
    // SAFETY: VMCALL only transfers control to the hypervisor, which preserves all registers but
    // RAX; without one it raises #UD, which the trap handler skips.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        asm!("xchg {b}, rbx", "vmcall", "xchg {b}, rbx", b = inout(reg) b => _,
             inout("rax") nr => ret, in("rcx") c);
        #[cfg(target_arch = "x86")]
        asm!("xchg {b}, ebx", "vmcall", "xchg {b}, ebx", b = inout(reg) b => _,
             inout("eax") nr => ret, in("ecx") c);
    }
    if VMCALL_UD.load(Ordering::SeqCst) {
        Err(NoHypervisor)
    } else {
        Ok(ret)
    }
}

/// Ends the guest through the debug-exit port with status (code << 1) | 1; halts forever if
/// nothing is listening there.
pub fn exit(code: u8) -> ! {
    outb(crate::abi::DEBUG_EXIT_PORT, code);
    loop {
        // SAFETY: halting with interrupts off touches no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// `sti; hlt; cli`: waits for one interrupt (STI's one-instruction shadow keeps the interrupt
/// from slipping in between STI and HLT, SDM Vol. 2B "STI").
pub fn wait_for_interrupt() {
    // SAFETY: the IDT is installed before any caller unmasks an interrupt source.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

pub fn enable_interrupts() {
    // SAFETY: see `wait_for_interrupt`.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

pub fn disable_interrupts() {
    // SAFETY: clearing IF has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) }
}
