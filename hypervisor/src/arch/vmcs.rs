//! The hardware side of a VMCS: allocating and loading it, VMREAD/VMWRITE, the host-state area,
//! and the assembly that enters the guest and comes back on a VM exit.

use super::vmx::vmx_instruction;
use super::{cpu, gdt, idt};
use crate::guest::GuestRegs;
use crate::mm;
use crate::vmx::{
    Host16, Host32, Host64, HostNat, ReadOnly32, Vmcs, VmcsAccess, VmcsError, VmxError,
};
use core::arch::{asm, global_asm};
use core::mem::offset_of;

/// A VMCS made current on this CPU by VMPTRLD ([`VmcsRegion::load`]): the only way to read or
/// write a VMCS (VMREAD/VMWRITE act on the current one, SDM 25.11.2) and to enter its guest.
/// Which VMCS is current is never implicit: whoever holds the handle loaded it, and it borrows
/// the region, which cannot be cleared or loaded again meanwhile.
pub struct LoadedVmcs<'a> {
    region: &'a mut VmcsRegion,
}

/// The VMCS current on this CPU, whichever it is: the handle of code that runs where a
/// [`LoadedVmcs`] cannot reach, the reflex called from the VM-exit stub (`keel_reflex`), which
/// knows that the VMCS of the exit is current (SDM Vol. 3C 28: a VM exit leaves the current
/// VMCS as it was).
pub struct CurrentVmcs(());

impl CurrentVmcs {
    /// # Safety
    /// A VMCS is current on this CPU for as long as the handle lives, and no other handle to it
    /// is used meanwhile.
    pub unsafe fn new() -> Self {
        Self(())
    }
}

impl VmcsAccess for LoadedVmcs<'_> {
    #[inline(always)]
    fn read_raw(&self, encoding: u32) -> u64 {
        CurrentVmcs(()).read_raw(encoding)
    }

    #[inline(always)]
    fn write_raw(&mut self, encoding: u32, value: u64) {
        CurrentVmcs(()).write_raw(encoding, value)
    }

    #[inline(always)]
    fn read_present(&self, encoding: u32) -> u64 {
        CurrentVmcs(()).read_present(encoding)
    }

    #[inline(always)]
    fn write_present(&mut self, encoding: u32, value: u64) {
        CurrentVmcs(()).write_present(encoding, value)
    }

    #[inline(always)]
    fn write_supported_raw(&mut self, encoding: u32, value: u64) {
        CurrentVmcs(()).write_supported_raw(encoding, value)
    }
}

// The handle's VMREAD and VMWRITE: the VMCS is current while a `CurrentVmcs` or a `LoadedVmcs`
// exists.
impl VmcsAccess for CurrentVmcs {
    #[inline(always)]
    fn read_raw(&self, encoding: u32) -> u64 {
        let value: u64;
        let failed: u8;
        // SAFETY: VMREAD of a field of the current VMCS; failure is reported through CF/ZF
        // (SDM 31.2), tested with SETBE so the hot path has no PUSHF.
        unsafe {
            asm!("vmread {v}, {e}", "setbe {f}", v = out(reg) value, e = in(reg) encoding as u64, f = out(reg_byte) failed, options(nostack))
        };
        if failed != 0 {
            vm_instruction_failed("VMREAD", encoding);
        }
        value
    }

    #[inline(always)]
    fn write_raw(&mut self, encoding: u32, value: u64) {
        let failed: u8;
        // SAFETY: VMWRITE of a field of the current VMCS; failure is reported through CF/ZF.
        unsafe {
            asm!("vmwrite {e}, {v}", "setbe {f}", e = in(reg) encoding as u64, v = in(reg) value, f = out(reg_byte) failed, options(nostack))
        };
        if failed != 0 {
            vm_instruction_failed("VMWRITE", encoding);
        }
    }

    #[inline(always)]
    fn read_present(&self, encoding: u32) -> u64 {
        debug_assert!(crate::vmx::always_present(encoding));
        let value: u64;
        // SAFETY: VMREAD of a field every VMX processor has (`vmx::always_present`) from the
        // current VMCS (this handle exists only while it is current): it cannot fail (SDM Vol.
        // 3C 31.3), so its flags need no test.
        unsafe {
            asm!("vmread {v}, {e}", v = out(reg) value, e = in(reg) encoding as u64, options(nostack))
        };
        value
    }

    #[inline(always)]
    fn write_present(&mut self, encoding: u32, value: u64) {
        debug_assert!(crate::vmx::always_present(encoding));
        self.write_supported_raw(encoding, value)
    }

    #[inline(always)]
    fn write_supported_raw(&mut self, encoding: u32, value: u64) {
        // SAFETY: VMWRITE of a writable field this processor has (every VMX processor, or one
        // whose feature is in use) to the current VMCS: as `read_present`, it cannot fail.
        unsafe {
            asm!("vmwrite {e}, {v}", e = in(reg) encoding as u64, v = in(reg) value, options(nostack))
        };
    }
}

/// A failed VMREAD/VMWRITE is a Keel bug (wrong encoding or no current VMCS): stop loudly.
#[cold]
fn vm_instruction_failed(what: &str, encoding: u32) -> ! {
    let name = crate::vmx::fields::field_name(encoding);
    let err: u64;
    let invalid: u8;
    // SAFETY: reading the VM-instruction error field; with no current VMCS this fails too (CF=1).
    unsafe {
        asm!("vmread {v}, {e}", "setc {f}", v = out(reg) err, e = in(reg) 0x4400u64, f = out(reg_byte) invalid, options(nostack))
    };
    if invalid != 0 {
        panic!("{what} {encoding:#x} {name:?} failed: no current VMCS (VMfailInvalid)");
    }
    // VMfailValid: the error number is in the current VMCS (SDM 31.4).
    panic!(
        "{what} {encoding:#x} {name:?} failed: {}",
        crate::vmx::VmInstructionError::from_raw(err as u32)
    );
}

/// A VMCS region in Keel's memory. Dropping it VMCLEARs it (so the processor holds no cached
/// state that it could later write into the frame, SDM 25.11.1) and gives the frame back.
pub struct VmcsRegion {
    pub pa: u64,
    /// Its launch state (SDM 25.11.3): "launched" after a VMLAUNCH, "clear" after a VMCLEAR.
    launched: bool,
    /// The IA32_GS_BASE (the `arch::smp::PerCpu` address, so which CPU) whose GS base, GDTR and
    /// TR base its host-state area holds: a load on another CPU writes that CPU's (0: none yet).
    host_gs: u64,
}

impl VmcsRegion {
    pub fn new(revision: u32) -> Result<Self, VmcsError> {
        let pa = mm::alloc_zeroed_page().ok_or(VmcsError::OutOfMemory)?;
        // SAFETY: a fresh frame owned by this region; SDM 25.2: the first 31 bits hold the revision.
        unsafe { (mm::phys_to_virt(pa) as *mut u32).write(revision) };
        let mut r = Self {
            pa,
            launched: false,
            host_gs: 0,
        };
        // VMCLEAR initialises the region's launch state (SDM 25.11.3). On failure `r` is dropped,
        // which tries once more and keeps the frame out of the pool if that fails too.
        r.clear()?;
        Ok(r)
    }

    /// VMCLEAR: writes back any cached state, makes the VMCS current on no CPU, and makes the
    /// next entry a VMLAUNCH (SDM 25.11.3). What unbinds a VMCS from a CPU before another loads
    /// it (SDM 25.11.1).
    pub fn clear(&mut self) -> Result<(), VmcsError> {
        // SAFETY: the region is a 4 KiB-aligned frame owned by this value, stamped with this
        // CPU's revision; VMCLEAR only writes the region itself.
        unsafe { vmx_instruction!("vmclear [{p}]", p = in(reg) &self.pa,) }
            .map_err(|e| VmcsError::Clear(self.pa, e))?;
        self.launched = false;
        Ok(())
    }

    /// VMPTRLD: makes this the current VMCS, and hands out the one way to use it. A VMCS that is
    /// current on this CPU already is not loaded again: VMPTRST says so (SDM Vol. 3C 31.3,
    /// VMPTRST stores the current-VMCS pointer; a VMCLEAR of the current VMCS makes it invalid,
    /// so a cleared region is always loaded afresh). The run loop uses a vCPU's VMCS around each
    /// of its exits, and this keeps that at one VMPTRLD a slice.
    pub fn load(&mut self) -> Result<LoadedVmcs<'_>, VmcsError> {
        let mut current: u64 = u64::MAX;
        // SAFETY: VMPTRST writes the 8 bytes of `current` and nothing else; it is valid in VMX
        // root operation at CPL 0, which is where Keel runs after VMXON.
        unsafe {
            asm!("vmptrst [{p}]", p = in(reg) &mut current, options(nostack));
        }
        if current == self.pa {
            return Ok(LoadedVmcs { region: self });
        }
        // SAFETY: the region was VMCLEARed with the right revision id; VMPTRLD only makes it
        // current.
        unsafe { vmx_instruction!("vmptrld [{p}]", p = in(reg) &self.pa,) }
            .map_err(|e| VmcsError::Load(self.pa, e))?;
        let here = cpu::rdmsr(cpu::msr::IA32_GS_BASE);
        let mut v = LoadedVmcs { region: self };
        if v.region.host_gs != here {
            // Last used on another CPU: a VM exit must come back to this one's tables.
            write_cpu_host_state(&mut v);
        }
        Ok(v)
    }

    /// Its launch state, for an entry made away from the region ([`Detached`]).
    pub fn detach(&mut self) -> Detached {
        Detached {
            launched: self.launched,
        }
    }

    /// Takes back the launch state an entry through `d` left ([`Detached::enter`]).
    pub fn reattach(&mut self, d: Detached) {
        self.launched = d.launched;
    }
}

/// What entering a vCPU whose VMCS is current on this CPU needs, held by the CPU that runs it,
/// outside the run loop's lock (`hypervisor::run_host`): the VMCS's launch state. The VMCS
/// itself stays current on this CPU from the load that preceded [`VmcsRegion::detach`] until
/// [`VmcsRegion::reattach`].
pub struct Detached {
    launched: bool,
}

impl Detached {
    /// Enters the guest of the VMCS current on this CPU (VMLAUNCH if it is clear, else
    /// VMRESUME) and returns at its next VM exit, as [`LoadedVmcs::enter`] does.
    ///
    /// The invariant this relies on (docs/ARCHITECTURE.md, "Host CPUs"): between `detach` and
    /// `reattach`, the run loop marks the vCPU as on this CPU, and no code anywhere loads,
    /// clears, reads or writes a VMCS a CPU's mark holds, nor its registers, except that CPU (a
    /// monitor command waits until no other CPU runs a vCPU; a guest-wide act waits until none
    /// of the guest's vCPUs is on another CPU). So the current VMCS here is still the one
    /// loaded under the lock, and `regs` is this CPU's own copy of the vCPU's registers.
    pub fn enter(&mut self, regs: &mut GuestRegs) -> Result<(), VmxError> {
        // SAFETY: the current VMCS is the detached vCPU's, loaded on this CPU and complete (the
        // invariant above keeps every other CPU off it and off its registers).
        unsafe { enter_current(&mut self.launched, regs, core::ptr::null_mut()).map(|_| ()) }
    }
}

impl Drop for VmcsRegion {
    fn drop(&mut self) {
        match self.clear() {
            Ok(()) => mm::free_pages(self.pa, mm::PAGE_SIZE),
            // The processor may still hold state it writes back here: the frame is not reused.
            Err(e) => crate::error!("{e}: its frame is not given back"),
        }
    }
}

/// Writes the host-state area (SDM 25.5, checked by 27.2.2-27.2.4): where the CPU returns to on
/// every VM exit: Keel's own CR0/CR3/CR4, segments, descriptor tables and the exit entry point.
pub fn write_host_state(vmcs: &mut LoadedVmcs<'_>) {
    let sel = gdt::selectors();
    vmcs.write(HostNat::Cr0, cpu::read_cr0());
    vmcs.write(HostNat::Cr3, cpu::read_cr3());
    vmcs.write(HostNat::Cr4, cpu::read_cr4());
    vmcs.write(Host16::CsSelector, sel.code.0);
    vmcs.write(Host16::SsSelector, sel.data.0);
    vmcs.write(Host16::DsSelector, sel.data.0);
    vmcs.write(Host16::EsSelector, sel.data.0);
    vmcs.write(Host16::FsSelector, 0);
    vmcs.write(Host16::GsSelector, 0);
    vmcs.write(Host16::TrSelector, sel.tss.0);
    vmcs.write(HostNat::FsBase, cpu::rdmsr(cpu::msr::IA32_FS_BASE));
    write_cpu_host_state(vmcs);
    vmcs.write(HostNat::IdtrBase, idt::idt_base());
    vmcs.write(
        Host32::Ia32SysenterCs,
        cpu::rdmsr(cpu::msr::IA32_SYSENTER_CS) as u32,
    );
    vmcs.write(
        HostNat::Ia32SysenterEsp,
        cpu::rdmsr(cpu::msr::IA32_SYSENTER_ESP),
    );
    vmcs.write(
        HostNat::Ia32SysenterEip,
        cpu::rdmsr(cpu::msr::IA32_SYSENTER_EIP),
    );
    vmcs.write(Host64::Ia32Efer, cpu::rdmsr(cpu::msr::IA32_EFER));
    vmcs.write(Host64::Ia32Pat, cpu::rdmsr(cpu::msr::IA32_PAT));
    vmcs.write(HostNat::Rip, keel_vm_exit as *const () as u64);
}

/// The host-state fields that differ between CPUs (SDM Vol. 3C 25.5, loaded at every VM exit
/// by 28.5.1-28.5.2): GS base (each CPU's `PerCpu`), GDTR base and TR base (each CPU's GDT and
/// TSS). The selectors, control registers, IDT and MSRs are the same on every CPU (an AP copies
/// the boot CPU's CR0, CR4, PAT and EFER, and loads the same GDT layout and IDT), so a VMCS
/// moving to another CPU needs only these three rewritten after its VMPTRLD there.
fn write_cpu_host_state(vmcs: &mut LoadedVmcs<'_>) {
    let gs = cpu::rdmsr(cpu::msr::IA32_GS_BASE);
    vmcs.write(HostNat::GsBase, gs);
    vmcs.write(HostNat::TrBase, gdt::tss_base());
    vmcs.write(HostNat::GdtrBase, gdt::gdt_base());
    vmcs.region.host_gs = gs;
}

unsafe extern "C" {
    /// Enters the guest (VMLAUNCH if `launched` is 0, else VMRESUME) with the GPRs in `regs`.
    /// Returns after a VM exit the exit-reason field with bit 32 set (the guest's GPRs are back
    /// in `regs`) or, if the VM entry instruction itself failed, RFLAGS as it left it (bit 32
    /// clear; never 0: bit 1 is always set), whose CF and ZF say how (SDM 31.2). With a `reflex`
    /// that is not null, an exit it may take first calls `keel_reflex(reflex, regs)`: while it
    /// answers true, the guest is entered again (VMRESUME) at once, and the call returns at the
    /// first exit it does not take.
    fn keel_vm_enter(regs: *mut GuestRegs, launched: u64, reflex: *mut ()) -> u64;
    fn keel_vm_exit();
}

// The register offsets come from `GuestRegs` itself (`offset_of!` as `const` operands), so a
// reordered or resized struct changes the assembly with it. HOST_RSP is written on every entry
// so that the exit path finds this frame whatever the caller's stack depth: the `regs` pointer
// on top, then the `reflex` pointer, then the six callee-saved registers. Eight words: HOST_RSP
// is 8 short of a multiple of 16 (the caller's RSP was, after its call), so the call of
// `keel_reflex` moves RSP down one word first (the System V ABI's alignment).
global_asm!(
    ".global keel_vm_enter",
    "keel_vm_enter:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdx",
    "push rdi",
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    // A failed VMWRITE (no current VMCS) takes the failure path with its flags (SDM 31.2).
    "jbe 3f",
    "test rsi, rsi",
    "mov rax, [rdi + {rax}]",
    "mov rcx, [rdi + {rcx}]",
    "mov rdx, [rdi + {rdx}]",
    "mov rbx, [rdi + {rbx}]",
    "mov rbp, [rdi + {rbp}]",
    "mov rsi, [rdi + {rsi}]",
    "mov r8,  [rdi + {r8}]",
    "mov r9,  [rdi + {r9}]",
    "mov r10, [rdi + {r10}]",
    "mov r11, [rdi + {r11}]",
    "mov r12, [rdi + {r12}]",
    "mov r13, [rdi + {r13}]",
    "mov r14, [rdi + {r14}]",
    "mov r15, [rdi + {r15}]",
    "mov rdi, [rdi + {rdi}]",
    "jnz 2f",
    "vmlaunch",
    "jmp 3f",
    "2:",
    "vmresume",
    "3:",
    // Only reached when VMLAUNCH/VMRESUME (or the VMWRITE of HOST_RSP) failed: RFLAGS first,
    // before anything changes it.
    "pushfq",
    "pop rax",
    "pop rdi",
    "pop rdx",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    ".global keel_vm_exit",
    "keel_vm_exit:",
    // The guest's registers into `regs`: the ones a call may change first (the System V ABI's
    // caller-saved ones), then, on the way back to the run loop, RBX, RBP and R12-R15, which a
    // call of `keel_reflex` leaves as they were (callee-saved).
    "push rdi",
    "mov rdi, [rsp + 8]",
    "mov [rdi + {rax}], rax",
    "mov [rdi + {rcx}], rcx",
    "mov [rdi + {rdx}], rdx",
    "mov [rdi + {rsi}], rsi",
    "mov [rdi + {r8}], r8",
    "mov [rdi + {r9}], r9",
    "mov [rdi + {r10}], r10",
    "mov [rdi + {r11}], r11",
    "pop rax",
    "mov [rdi + {rdi}], rax",
    // The exit reason, returned (RCX until then). The reflex, if there is one and the exit is
    // one it may take (`runloop::reflex::may_take`: a CPUID, basic exit reason 10 with bits
    // 16-31 clear): `keel_reflex(reflex, regs)`, with RSP 16-byte aligned. It reads RAX and RCX
    // from `regs` and writes RAX, RBX, RCX and RDX there. True, and the guest is entered again
    // with those and the caller-saved registers from `regs`, the callee-saved ones as they are.
    // A failed VMRESUME leaves as the entry's failure above. False: as any other exit.
    "mov ecx, {exit_reason}",
    "vmread rcx, rcx",
    "cmp ecx, {reflex_reason}",
    "jne 4f",
    "mov rax, [rsp + 8]",
    "test rax, rax",
    "jz 4f",
    "mov rsi, rdi",
    "mov rdi, rax",
    "sub rsp, 8",
    "call keel_reflex",
    "add rsp, 8",
    "mov rdi, [rsp]",
    "test al, al",
    "jz 5f",
    "mov rax, [rdi + {rax}]",
    "mov rcx, [rdi + {rcx}]",
    "mov rdx, [rdi + {rdx}]",
    "mov rbx, [rdi + {rbx}]",
    "mov rsi, [rdi + {rsi}]",
    "mov r8,  [rdi + {r8}]",
    "mov r9,  [rdi + {r9}]",
    "mov r10, [rdi + {r10}]",
    "mov r11, [rdi + {r11}]",
    "mov rdi, [rdi + {rdi}]",
    "vmresume",
    "jmp 3b",
    "5:",
    "mov ecx, {reflex_reason}",
    "4:",
    "mov [rdi + {rbx}], rbx",
    "mov [rdi + {rbp}], rbp",
    "mov [rdi + {r12}], r12",
    "mov [rdi + {r13}], r13",
    "mov [rdi + {r14}], r14",
    "mov [rdi + {r15}], r15",
    "pop rdi",
    "pop rdx",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "bts rcx, 32",
    "mov rax, rcx",
    "ret",
    host_rsp = const HostNat::Rsp as u32,
    exit_reason = const ReadOnly32::ExitReason as u32,
    reflex_reason = const crate::vmx::ExitReason::Cpuid.number() as u32,
    rax = const offset_of!(GuestRegs, rax),
    rcx = const offset_of!(GuestRegs, rcx),
    rdx = const offset_of!(GuestRegs, rdx),
    rbx = const offset_of!(GuestRegs, rbx),
    rbp = const offset_of!(GuestRegs, rbp),
    rsi = const offset_of!(GuestRegs, rsi),
    rdi = const offset_of!(GuestRegs, rdi),
    r8 = const offset_of!(GuestRegs, r8),
    r9 = const offset_of!(GuestRegs, r9),
    r10 = const offset_of!(GuestRegs, r10),
    r11 = const offset_of!(GuestRegs, r11),
    r12 = const offset_of!(GuestRegs, r12),
    r13 = const offset_of!(GuestRegs, r13),
    r14 = const offset_of!(GuestRegs, r14),
    r15 = const offset_of!(GuestRegs, r15),
);

impl LoadedVmcs<'_> {
    /// Enters the guest once (VMLAUNCH if the VMCS is clear, else VMRESUME) and returns when it
    /// exits. `Err` says how VMLAUNCH/VMRESUME itself failed (VMfailInvalid, or VMfailValid with
    /// the VM-instruction error, SDM 31.2).
    #[inline(always)]
    pub fn enter(&mut self, regs: &mut GuestRegs) -> Result<(), VmxError> {
        // SAFETY: this VMCS is current (the handle exists) and holds a complete guest and host
        // state (written by the caller).
        unsafe { enter_current(&mut self.region.launched, regs, core::ptr::null_mut()).map(|_| ()) }
    }

    /// [`LoadedVmcs::enter`], with `keel_reflex(reflex, regs)` called first at each VM exit it
    /// may take (a CPUID): the guest is entered again at once while it answers true. Returns the
    /// exit-reason field of the exit it did not take.
    ///
    /// # Safety
    /// `reflex` is what `keel_reflex` expects, valid until the call returns; `keel_reflex`
    /// changes the VMCS and `regs` only as an exit handler would.
    #[inline(always)]
    pub unsafe fn enter_with_reflex(
        &mut self,
        regs: &mut GuestRegs,
        reflex: *mut (),
    ) -> Result<u32, VmxError> {
        // SAFETY: as `enter`; `reflex` is the caller's promise.
        unsafe { enter_current(&mut self.region.launched, regs, reflex) }
    }
}

/// VMLAUNCH (`launched` false) or VMRESUME of the current VMCS, back at its next VM exit with
/// the guest's registers in `regs` and the exit-reason field returned (with a `reflex`, the next
/// exit it does not take: `keel_vm_enter`).
///
/// # Safety
/// The VMCS current on this CPU holds a complete guest and host state, `launched` is its launch
/// state, and no other CPU uses it meanwhile.
// Inlined: a call of its own (and the saved register it needs) cost every exit 6 instructions
// (docs/BENCHMARKS.md).
#[inline(always)]
unsafe fn enter_current(
    launched: &mut bool,
    regs: &mut GuestRegs,
    reflex: *mut (),
) -> Result<u32, VmxError> {
    // SAFETY: the caller's promise; `regs` is valid for the duration of the call.
    let out = unsafe { keel_vm_enter(regs, *launched as u64, reflex) };
    if out >> 32 == 0 {
        // VMLAUNCH, VMRESUME or the VMWRITE before them failed: CF or ZF tells how (SDM 31.2).
        let failed = VmxError::check(out, super::vmx::read_instruction_error);
        return Err(failed.err().unwrap_or(VmxError::FailInvalid));
    }
    // SDM 27.11: the launch state becomes "launched" after a VMLAUNCH that did not fail.
    *launched = true;
    // Only where kicks are NMIs: with one CPU nobody kicks (`hypervisor::run`), and the check's
    // VMREAD cost every exit about 9 instructions (docs/BENCHMARKS.md).
    if super::smp::kicks_are_nmis() {
        end_nmi_blocking_after_an_nmi_exit();
    }
    Ok(out as u32)
}

/// After a VM exit caused by an NMI (basic exit reason 0, interruption type NMI: a kick,
/// `arch::smp::kick`), NMIs stay blocked until the next IRET (SDM Vol. 3C 27.1): ended here,
/// right after the exit, so that no path that drops an exit (a vCPU replaced while it ran)
/// leaves the next kick waiting for this CPU's next interrupt handler. One VMREAD on the other
/// exits.
fn end_nmi_blocking_after_an_nmi_exit() {
    use crate::vmx::{ExitReason, ExitReasonField, InterruptionInfo, InterruptionType};
    use crate::vmx::{ReadOnly32, VmcsField};
    let read = |field: ReadOnly32| super::vmx::read_field(u64::from(field.encoding()));
    let nmi_exit = read(ReadOnly32::ExitReason).is_some_and(|r| {
        let r = ExitReasonField::from_raw(r as u32);
        r.basic == ExitReason::ExceptionOrNmi && !r.entry_failure
    }) && read(ReadOnly32::ExitInterruptionInfo).is_some_and(|i| {
        let info = InterruptionInfo(i as u32);
        info.valid() && info.kind() == InterruptionType::Nmi
    });
    if nmi_exit {
        super::cpu::unblock_nmis();
    }
}

// `keel_vm_enter`/`keel_vm_exit` move whole 8-byte registers at the offsets above: every field must
// be a u64 (the struct is exactly 15 of them, RSP lives in the VMCS), and the frame layout of
// `regs` on the stack is what `keel_vm_exit` reads back.
const _: () = assert!(core::mem::size_of::<GuestRegs>() == 15 * 8);
const _: () = assert!(core::mem::align_of::<GuestRegs>() == 8);
