//! Privileged CPU primitives: port I/O, MSRs, control registers, CPUID, TSC.

use core::arch::asm;

/// # Safety
/// Port I/O can reconfigure hardware; callers own the device they talk to.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// # Safety
/// See [`outb`].
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

#[inline]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: Keel only reads MSRs whose presence it checked (CPUID / VMX capability bits).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}

/// # Safety
/// Writing an MSR changes processor behaviour; the caller knows the MSR exists and the value is valid.
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    }
}

#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// # Safety
/// The new value must keep the kernel running (paging, protection on).
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) }
}

pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// # Safety
/// See [`write_cr0`].
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) }
}

pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: CPUID is available on every x86_64 CPU.
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

pub mod msr {
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
}

/// CPUID.1:ECX.XSAVE, read once (CPUID is slow on hardware and exits when Keel itself runs nested).
pub fn has_xsave() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    static XSAVE: AtomicU8 = AtomicU8::new(2);
    match XSAVE.load(Ordering::Relaxed) {
        2 => {
            let v = cpuid(1, 0)[2] & (1 << 26) != 0;
            XSAVE.store(v as u8, Ordering::Relaxed);
            v
        }
        v => v != 0,
    }
}

/// Sets CR4.OSXSAVE so Keel may use XSAVE/XRSTOR/XSETBV to switch guests' extended state.
pub fn enable_xsave() {
    // SAFETY: only called when CPUID reports XSAVE; setting OSXSAVE does not affect Keel's code.
    unsafe { write_cr4(read_cr4() | (1 << 18)) };
}

/// Every XCR0 component this CPU supports (CPUID.(EAX=0DH,ECX=0):EDX:EAX, SDM 13.2).
pub fn xcr0_supported() -> u64 {
    use core::sync::atomic::{AtomicU64, Ordering};
    static ALL: AtomicU64 = AtomicU64::new(0);
    let v = ALL.load(Ordering::Relaxed);
    if v != 0 {
        return v;
    }
    let [a, _, _, d] = cpuid(0xd, 0);
    let v = ((d as u64) << 32 | a as u64) | 1;
    ALL.store(v, Ordering::Relaxed);
    v
}

/// # Safety
/// `area` is a 16-byte aligned 512-byte FXSAVE area.
pub unsafe fn fxsave(area: *mut u8) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
}

/// # Safety
/// `area` holds a valid FXSAVE image.
pub unsafe fn fxrstor(area: *const u8) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags)) };
}

/// # Safety
/// `v` must be a valid XCR0 for this CPU (checked by `exits::xsetbv::valid_xcr0`).
pub unsafe fn xsetbv0(v: u64) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("xsetbv", in("ecx") 0, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// # Safety
/// `area` is a 64-byte aligned XSAVE area large enough for the components in XCR0.
pub unsafe fn xsave(area: *mut u8, mask: u64) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("xsave64 [{}]", in(reg) area, in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// # Safety
/// `area` holds a valid XSAVE image (or is zeroed: every component then takes its init state).
pub unsafe fn xrstor(area: *const u8, mask: u64) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("xrstor64 [{}]", in(reg) area, in("eax") mask as u32, in("edx") (mask >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Writes CR2 (the guest's last page-fault address survives guest switches this way).
///
/// # Safety
/// CR2 has no effect on Keel; any value is safe.
pub unsafe fn write_cr2(v: u64) {
    // SAFETY: per the caller's contract.
    unsafe { asm!("mov cr2, {}", in(reg) v, options(nostack, preserves_flags)) }
}

/// DR0, DR1, DR2, DR3 and DR6 (SDM Vol. 3B 17.2).
pub fn read_debug_registers() -> [u64; 5] {
    let (dr0, dr1, dr2, dr3, dr6): (u64, u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effect; DR7.GD is clear in Keel (the
    // CPU sets DR7 to 400H at every VM exit, SDM 28.5.1), so no #DB.
    unsafe {
        asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3", "mov {}, dr6",
             out(reg) dr0, out(reg) dr1, out(reg) dr2, out(reg) dr3, out(reg) dr6,
             options(nomem, nostack, preserves_flags))
    }
    [dr0, dr1, dr2, dr3, dr6]
}

/// Loads DR0-DR3 and DR6 (in that order in `v`).
///
/// # Safety
/// DR6 bits 63:32 must be 0 (else #GP). Breakpoints at the new addresses fire only if DR7
/// enables them, and Keel's DR7 enables none (400H after every VM exit).
pub unsafe fn write_debug_registers(v: &[u64; 5]) {
    // SAFETY: per the caller's contract.
    unsafe {
        asm!("mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}", "mov dr6, {}",
             in(reg) v[0], in(reg) v[1], in(reg) v[2], in(reg) v[3], in(reg) v[4],
             options(nomem, nostack, preserves_flags))
    }
}

/// Ends the blocking of NMIs that a VM exit caused by an NMI leaves behind (SDM Vol. 3C 27.1: an
/// NMI that causes a VM exit blocks later NMIs once the exit completes, as its delivery would
/// have), by the one thing that ends it, an IRET (SDM Vol. 3A 6.7.1): an IRETQ to the next
/// instruction, through a frame of the current SS:RSP, RFLAGS and CS. An NMI that arrived
/// meanwhile was held pending and is taken right after it.
pub fn unblock_nmis() {
    // SAFETY: the frame pushed is the current state, so IRETQ returns to label 2 with the same
    // stack pointer, flags and segments; the stack use is within what `asm!` allows without
    // `nostack` (no red zone is touched).
    unsafe {
        asm!(
            "mov {sp}, rsp",
            "xor {tmp:e}, {tmp:e}",
            "mov {tmp:x}, ss",
            "push {tmp}",
            "push {sp}",
            "pushfq",
            "xor {tmp:e}, {tmp:e}",
            "mov {tmp:x}, cs",
            "push {tmp}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            sp = out(reg) _,
            tmp = out(reg) _,
        )
    }
}
