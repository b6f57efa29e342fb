//! Starting the host's other CPUs (application processors, APs) and each CPU's own state.
//!
//! The bootloader starts only the boot CPU. Keel finds the others in the firmware's MADT
//! (`firmware::madt`), decides which to start (`smp::plan`), and starts them one at a time with
//! INIT-SIPI-SIPI (SDM Vol. 3A 9.4.4.1, the universal start-up algorithm: INIT, 10 ms, SIPI,
//! 200 us, SIPI); on a machine without a MADT it broadcasts the same sequence and lets the APs
//! that answer number themselves ([`start_by_broadcast`]). An AP wakes in real mode in a trampoline page below 1 MiB, switches to protected
//! and then long mode with the boot CPU's page tables (the page is identity-mapped meanwhile),
//! and calls [`ap_entry`] on its own stack. There it loads its own GDT/TSS (IST stacks), the shared
//! IDT, enables its local APIC, and enters VMX operation with its own VMXON region. A CPU whose
//! VT-x set-up fails is reported and left out. Each AP then waits in HLT with interrupts on, to be
//! kicked by an IPI once the scheduler runs vCPUs there.
//!
//! Every CPU reaches its own state through one [`PerCpu`], whose address is in IA32_GS_BASE
//! (Keel never uses GS otherwise; VM exits restore it from the VMCS host-state area, which
//! `arch::vmcs::write_host_state` fills from the MSR).

use super::gdt::CpuTables;
use super::{cpu, idt, lapic, paging, vmx};
use crate::firmware::madt::{self, PhysMemory};
use crate::machine::MachineInfo;
use crate::mm;
use crate::smp::{self, HostCpu, Outcome, MAX_CPUS};
use crate::vmx::{FlushPolicy, VmxCaps};
use crate::{info, warn};
use alloc::boxed::Box;
use alloc::string::ToString;
use alloc::vec::Vec;
use core::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// Each AP's stack (the boot CPU's is the bootloader's, of the same size).
const AP_STACK_SIZE: u64 = 256 * 1024;

/// The APIC ID of an AP started by broadcast, until it reads its own.
const UNKNOWN_APIC: u32 = u32::MAX;

/// Without a MADT, Keel starts the APs by broadcast with room for this many; more are parked.
const BROADCAST_SLOTS: usize = 7;

/// One CPU's state. `#[repr(C)]` with `this` first, so `gs:[0]` is the structure's own address.
#[repr(C)]
pub struct PerCpu {
    this: *const PerCpu,
    index: u32,
    /// Its APIC ID; [`UNKNOWN_APIC`] until an AP started by broadcast reports its own.
    apic_id: AtomicU32,
    tables: &'static CpuTables,
    /// Set by the AP as soon as it runs on its own stack: it no longer reads the trampoline.
    alive: AtomicBool,
    outcome: spin::Once<Outcome>,
    /// Physical address of its VMXON region (0 while not in VMX operation).
    vmxon: AtomicU64,
    /// Kick IPIs it has taken ([`kick`]).
    kicks: AtomicU64,
}

// SAFETY: `this` only ever points at the structure itself, which lives as long as Keel; the
// other fields are atomics, `Once` and shared references.
unsafe impl Sync for PerCpu {}
// SAFETY: as for `Sync`.
unsafe impl Send for PerCpu {}

impl PerCpu {
    fn leak(cpu: HostCpu, tables: &'static CpuTables) -> &'static PerCpu {
        let p: &'static mut PerCpu = Box::leak(Box::new(PerCpu {
            this: core::ptr::null(),
            index: cpu.index,
            apic_id: AtomicU32::new(cpu.apic_id),
            tables,
            alive: AtomicBool::new(false),
            outcome: spin::Once::new(),
            vmxon: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
        }));
        p.this = p as *const PerCpu;
        p
    }

    /// Its number and APIC ID.
    pub fn cpu(&self) -> HostCpu {
        HostCpu {
            index: self.index,
            apic_id: self.apic_id.load(Ordering::Acquire),
        }
    }

    /// Physical address of its VMXON region, once it is in VMX operation.
    pub fn vmxon_region(&self) -> Option<u64> {
        match self.vmxon.load(Ordering::Acquire) {
            0 => None,
            pa => Some(pa),
        }
    }

    /// How many kick IPIs it has taken.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Acquire)
    }

    /// Base of its TSS (for the VMCS host-state area).
    pub fn tss_base(&self) -> u64 {
        self.tables.tss_base()
    }
}

/// The CPUs in VMX operation, by their index.
static ONLINE: [AtomicPtr<PerCpu>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

/// Every CPU that runs Keel with VMX on, boot CPU first.
pub fn online() -> impl Iterator<Item = &'static PerCpu> {
    ONLINE.iter().filter_map(|p| {
        // SAFETY: non-null entries are leaked `PerCpu`s, never freed.
        unsafe { p.load(Ordering::Acquire).as_ref() }
    })
}

/// Whether kicks are NMIs ([`kick`]); set once before the run loop starts ([`kick_by_nmi`]).
static KICK_BY_NMI: AtomicBool = AtomicBool::new(false);

/// Makes [`kick`] send NMIs (`on`) or fixed IPIs on [`idt::KICK_VECTOR`]. NMIs need the
/// "virtual NMIs" control on every CPU (Keel requires "NMI exiting"): without it an NMI Keel
/// injects into a guest blocks physical NMIs until the next VM exit, since the guest's IRET
/// then leaves that blocking alone (SDM Vol. 3C 25.3 "IRET", 26.6.1), and a kick would wait
/// for an exit of another cause. Every CPU has the boot CPU's VMX capabilities
/// (`vmx_setup`), so the boot CPU decides for all.
pub fn kick_by_nmi(on: bool) {
    KICK_BY_NMI.store(on, Ordering::Release);
}

/// Whether kicks are NMIs ([`kick_by_nmi`]).
pub fn kicks_are_nmis() -> bool {
    KICK_BY_NMI.load(Ordering::Acquire)
}

/// Kicks `cpu`: out of guest mode at once, out of HLT, or, in Keel with interrupts off, at its
/// next STI or VM entry. An NMI ([`kick_by_nmi`]) or else a fixed IPI on
/// [`idt::KICK_VECTOR`].
///
/// Why NMIs: Bochs 2.7, in guest mode with a virtual interrupt recognized while the guest
/// has RFLAGS.IF = 0, delivers that interrupt when a physical maskable interrupt arrives,
/// IF = 0 or not (`exits::apicv::hold_while_masked`); it takes an NMI first, so with NMI kicks
/// no maskable interrupt reaches a CPU in guest mode from another CPU.
///
/// No kick is lost or late. The kicker has set the target's `kicked` under the run loop's
/// lock before it sends (`RunLoop::kick_host`); the target reads it under that lock after its
/// VM exit. Where the NMI finds the target:
/// - in guest mode: a VM exit (exit reason 0, NMI exiting), after which `arch::vmcs` ends the
///   NMI blocking the exit leaves at once ([`super::cpu::unblock_nmis`]) and `exits::handle`
///   counts the kick;
/// - in Keel (between an exit and the next entry, its lock let go or not, or asleep in HLT):
///   the IDT's NMI handler turns it into a pending fixed self-IPI on `KICK_VECTOR`
///   ([`on_kick_nmi`]), taken at once if interrupts are on (the NMI wakes the HLT; one
///   between the STI and the HLT returns past the HLT, `arch::idt`), else kept
///   pending with IF = 0 until the next VM entry, after which "external-interrupt exiting"
///   makes it a VM exit before the guest's first instruction (SDM Vol. 3C 25.2): the
///   guarantee a fixed-IPI kick had by itself;
/// - between an NMI-caused exit and its IRETQ, NMIs blocked: held pending by the CPU (SDM
///   Vol. 3A 6.7.1) and taken after the IRETQ, in Keel, as above (several kicks meanwhile
///   may become one: one is all the target needs, `kicked` being a flag).
///
/// The self-IPI reaches guest mode only at such an entry, the case the fixed IPI had too.
pub fn kick(cpu: &PerCpu) {
    if kicks_are_nmis() {
        lapic::send_nmi(cpu.cpu().apic_id);
    } else {
        lapic::send_fixed(cpu.cpu().apic_id, idt::KICK_VECTOR);
    }
}

/// An NMI taken in Keel (the IDT's vector 2, on its own IST stack): a kick ([`kick`]) that
/// found the CPU in VMX root operation, made a pending fixed self-IPI on
/// [`idt::KICK_VECTOR`], which [`on_kick`] counts when it is taken. Safe at any instruction:
/// it takes no lock and touches only the ICR ([`lapic::raise_self_from_nmi`]). An NMI of another
/// origin (Keel sets up none: no watchdog) costs at most one spurious kick.
pub fn on_kick_nmi() {
    lapic::raise_self_from_nmi(idt::KICK_VECTOR);
}

/// The kick vector's handler: counts the kick on the CPU that took it.
pub fn on_kick() {
    if let Some(p) = this_cpu() {
        p.kicks.fetch_add(1, Ordering::AcqRel);
    }
    lapic::eoi();
}

/// A kick that came as an NMI to a CPU in guest mode (a VM exit, `exits::handle`): counts it.
/// The blocking of NMIs the exit left was ended right after it (`arch::vmcs`, with
/// [`super::cpu::unblock_nmis`]).
pub fn on_kick_exit() {
    if let Some(p) = this_cpu() {
        p.kicks.fetch_add(1, Ordering::AcqRel);
    }
}

/// The calling CPU's state; `None` before [`start_aps`] set it up on the boot CPU.
pub fn this_cpu() -> Option<&'static PerCpu> {
    let p = cpu::rdmsr(cpu::msr::IA32_GS_BASE) as *const PerCpu;
    // SAFETY: GS base is 0 or the address of a leaked `PerCpu` (set in `install`).
    unsafe { p.as_ref() }
}

fn install(p: &'static PerCpu) {
    // SAFETY: Keel does not use GS otherwise; guests' GS bases are switched by the VMCS.
    unsafe { cpu::wrmsr(cpu::msr::IA32_GS_BASE, p as *const PerCpu as u64) };
}

fn register(p: &'static PerCpu) {
    if let Some(slot) = ONLINE.get(p.index as usize) {
        slot.store(p as *const PerCpu as *mut PerCpu, Ordering::Release);
    }
}

/// The boot CPU's VMXON region, until its `PerCpu` exists.
static BOOT_VMXON: AtomicU64 = AtomicU64::new(0);

/// Records the boot CPU's VMXON region (its `vmx::enable` ran before any `PerCpu` existed).
pub fn set_boot_vmxon(pa: u64) {
    BOOT_VMXON.store(pa, Ordering::Relaxed);
}

/// What every AP copies from the boot CPU.
struct BootState {
    caps: VmxCaps,
    cr0: u64,
    cr4: u64,
    pat: u64,
    fail_vmx_on_cpu: Option<u32>,
}

static BOOT: spin::Once<BootState> = spin::Once::new();

const CR4_PCIDE: u64 = 1 << 17;
const CR4_VMXE: u64 = 1 << 13;
/// EFER.SCE, LME and NXE: what an AP takes over (LMA is the processor's to set).
const EFER_COPIED: u64 = (1 << 0) | (1 << 8) | (1 << 11);

/// Physical memory as the parser reads it: through the physical-memory mapping, page by page
/// checked to be mapped, so a bad table address is an error, not a page fault.
struct MappedMemory;

impl PhysMemory for MappedMemory {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        let Some(end) = pa.checked_add(buf.len() as u64) else {
            return false;
        };
        if end > 1 << 52 {
            return false;
        }
        let mut page = pa & !(mm::PAGE_SIZE - 1);
        while page < end {
            if paging::virt_to_phys(mm::phys_to_virt(page) as u64) != Some(page) {
                return false;
            }
            page += mm::PAGE_SIZE;
        }
        // SAFETY: every page of the range is mapped (checked above); the bytes are copied out.
        let src = unsafe { core::slice::from_raw_parts(mm::phys_to_virt(pa), buf.len()) };
        buf.copy_from_slice(src);
        true
    }
}

/// Starts every AP the MADT lists (see the module documentation) and returns how many CPUs are
/// in VMX operation, the boot CPU included. Called once, on the boot CPU, after its own VMXON.
pub fn start_aps(
    machine: &MachineInfo,
    caps: &VmxCaps,
    fail_vmx_on_cpu: Option<u32>,
    tsc_hz: u64,
) -> usize {
    let t0 = cpu::rdtsc();
    let boot = PerCpu::leak(
        HostCpu {
            index: 0,
            apic_id: lapic::id(),
        },
        super::gdt::boot_tables(),
    );
    boot.vmxon
        .store(BOOT_VMXON.load(Ordering::Relaxed), Ordering::Release);
    install(boot);
    register(boot);
    BOOT.call_once(|| BootState {
        caps: *caps,
        cr0: cpu::read_cr0(),
        cr4: cpu::read_cr4(),
        pat: cpu::rdmsr(cpu::msr::IA32_PAT),
        fail_vmx_on_cpu,
    });
    let madt = match madt::find_madt(&MappedMemory, machine.rsdp) {
        Ok(m) => m,
        Err(e @ (madt::AcpiError::NoRsdp | madt::AcpiError::NoMadt)) => {
            warn!("host CPUs: {e}; finding the others by broadcast INIT-SIPI-SIPI");
            return match Trampoline::install() {
                Ok(t) => finish(start_by_broadcast(&t, tsc_hz), t0, tsc_hz),
                Err(e) => {
                    warn!("cannot start the other CPUs: {e}; Keel runs on the boot CPU alone");
                    1
                }
            };
        }
        Err(e) => {
            warn!("host CPUs: {e}; Keel runs on the boot CPU alone");
            return 1;
        }
    };
    let plan = smp::plan(&madt.cpus, boot.cpu().apic_id, MAX_CPUS);
    info!(
        "host CPUs: {} in the MADT; boot {}, starting {} more",
        madt.cpus.len(),
        plan.boot,
        plan.aps.len()
    );
    for (apic_id, why) in &plan.left_out {
        warn!("host CPU with APIC {apic_id} left out: {why}");
    }
    if let Some(n) = fail_vmx_on_cpu.filter(|&n| n as usize > plan.aps.len()) {
        warn!("fail_vmx_on_cpu = {n} names no AP of this machine: nothing fails");
    }
    if plan.aps.is_empty() {
        return 1;
    }
    let trampoline = match Trampoline::install() {
        Ok(t) => t,
        Err(e) => {
            warn!("cannot start the other CPUs: {e}; Keel runs on the boot CPU alone");
            return 1;
        }
    };
    let mut tried = 0;
    for ap in &plan.aps {
        let (outcome, percpu) = start_one(&trampoline, *ap, tsc_hz);
        report(*ap, outcome, percpu);
        tried += 1;
    }
    finish(tried, t0, tsc_hz)
}

/// Prints the AP's line and registers it if it is in VMX operation.
fn report(ap: HostCpu, outcome: Outcome, percpu: Option<&'static PerCpu>) {
    let line = smp::report_line(&ap, &outcome);
    match (outcome, percpu) {
        (Outcome::VmxOn { .. }, Some(p)) => {
            info!("{line}");
            register(p);
        }
        _ => warn!("{line}"),
    }
}

/// After `tried` APs: kicks each one that is up and prints the summary line. Returns how many
/// CPUs are in VMX operation.
fn finish(tried: usize, t0: u64, tsc_hz: u64) -> usize {
    let ms = (cpu::rdtsc() - t0) * 1000 / tsc_hz.max(1);
    let up = online().count();
    // Each AP idles in HLT: one kick each shows that an IPI reaches it there.
    let mut woke = 0;
    for p in online().filter(|p| p.index != 0) {
        let before = p.kicks();
        kick(p);
        if wait_for(10_000, tsc_hz, || p.kicks() > before) {
            woke += 1;
        } else {
            warn!("{}: took no kick IPI within 10 ms", p.cpu());
        }
    }
    info!(
        "{up} of {} CPUs up with VMX on, in {ms} ms; {woke} of {} APs woke to a kick IPI",
        tried + 1,
        up - 1
    );
    up
}

/// An AP's stack and `PerCpu`, ready before it starts.
fn prepare_ap(ap: HostCpu) -> Result<(u64, &'static PerCpu), &'static str> {
    let tables = CpuTables::for_ap().ok_or("no memory for its TSS stacks")?;
    let stack = mm::FRAMES
        .lock()
        .alloc(AP_STACK_SIZE, mm::PAGE_SIZE)
        .ok_or("no memory for its stack")?;
    Ok((
        mm::phys_to_virt(stack) as u64 + AP_STACK_SIZE,
        PerCpu::leak(ap, tables),
    ))
}

/// Starts the APs of a machine that has no MADT (OVMF under Bochs installs no ACPI tables): INIT,
/// SIPI, SIPI to all processors but this one (SDM Vol. 3A 9.4.4.1, which broadcasts too). Each
/// AP takes the next of [`BROADCAST_SLOTS`] prepared stacks in the trampoline, in the order they
/// arrive, and reports its own APIC ID. Returns how many APs answered.
fn start_by_broadcast(t: &Trampoline, tsc_hz: u64) -> usize {
    let mut slots = Vec::new();
    for i in 0..BROADCAST_SLOTS {
        let ap = HostCpu {
            index: i as u32 + 1,
            apic_id: UNKNOWN_APIC,
        };
        match prepare_ap(ap) {
            Ok(slot) => slots.push(slot),
            Err(_) => break,
        }
    }
    t.prepare(&slots);
    lapic::broadcast_init();
    wait_us(10_000, tsc_hz);
    lapic::broadcast_startup(t.page_number());
    wait_us(200, tsc_hz);
    lapic::broadcast_startup(t.page_number());
    // Let them arrive: until no new AP has taken a slot for 20 ms (or 200 ms in all).
    let end = cpu::rdtsc() + ALIVE_TIMEOUT_US * tsc_hz / 1_000_000;
    let mut seen = t.arrived();
    while cpu::rdtsc() < end {
        wait_us(20_000, tsc_hz);
        let now = t.arrived();
        if now == seen && now > 0 {
            break;
        }
        seen = now;
    }
    let arrived = t.arrived() as usize;
    info!("host CPUs: {arrived} APs answered the broadcast");
    if arrived > slots.len() {
        warn!(
            "{} more CPUs answered than Keel had stacks for ({}); they stay halted",
            arrived - slots.len(),
            slots.len()
        );
    }
    for (_, percpu) in slots.iter().take(arrived) {
        let outcome = if wait_for(SETUP_TIMEOUT_US, tsc_hz, || percpu.outcome.is_completed()) {
            percpu.outcome.get().cloned().unwrap_or(Outcome::NoAnswer)
        } else {
            Outcome::NoAnswer
        };
        report(percpu.cpu(), outcome, Some(percpu));
    }
    // The stacks nobody took go back (their small tables stay).
    for (stack_top, _) in slots.iter().skip(arrived) {
        let virt = stack_top - AP_STACK_SIZE;
        let pa = virt - mm::phys_to_virt(0) as u64;
        mm::free_pages(pa, AP_STACK_SIZE);
    }
    arrived.min(slots.len())
}

/// Busy-waits `us` microseconds of the boot CPU's TSC.
fn wait_us(us: u64, tsc_hz: u64) {
    let end = cpu::rdtsc() + us * tsc_hz / 1_000_000;
    while cpu::rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Waits up to `us` microseconds for `done`.
fn wait_for(us: u64, tsc_hz: u64, done: impl Fn() -> bool) -> bool {
    let end = cpu::rdtsc() + us * tsc_hz / 1_000_000;
    loop {
        if done() {
            return true;
        }
        if cpu::rdtsc() >= end {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// How long an AP may take from the second SIPI to running Rust code, and then to finish its
/// VT-x set-up (generous: Bochs runs several CPUs in turns).
const ALIVE_TIMEOUT_US: u64 = 200_000;
const SETUP_TIMEOUT_US: u64 = 2_000_000;

fn start_one(t: &Trampoline, ap: HostCpu, tsc_hz: u64) -> (Outcome, Option<&'static PerCpu>) {
    let (stack_top, percpu) = match prepare_ap(ap) {
        Ok(slot) => slot,
        Err(why) => return (Outcome::NotStarted(why), None),
    };
    t.prepare(&[(stack_top, percpu)]);
    // SDM Vol. 3A 9.4.4.1: INIT, wait 10 ms, SIPI, wait 200 us, SIPI (the second is ignored by a
    // processor that already left wait-for-SIPI; it is skipped when the AP has checked in).
    lapic::send_init(ap.apic_id);
    wait_us(10_000, tsc_hz);
    lapic::send_startup(ap.apic_id, t.page_number());
    let alive = || percpu.alive.load(Ordering::Acquire);
    if !wait_for(200, tsc_hz, alive) {
        lapic::send_startup(ap.apic_id, t.page_number());
    }
    if !wait_for(ALIVE_TIMEOUT_US, tsc_hz, alive) {
        // Park it in wait-for-SIPI, so it cannot wake later on the next AP's trampoline data.
        lapic::send_init(ap.apic_id);
        return (Outcome::NoAnswer, None);
    }
    if !wait_for(SETUP_TIMEOUT_US, tsc_hz, || percpu.outcome.is_completed()) {
        return (Outcome::NoAnswer, None);
    }
    let outcome = percpu.outcome.get().cloned().unwrap_or(Outcome::NoAnswer);
    (outcome, Some(percpu))
}

/// Where an AP lands after its start-up trampoline, on its own stack, in long mode with the boot
/// CPU's page tables but still the trampoline's GDT and no IDT.
extern "C" fn ap_entry(percpu: &'static PerCpu) -> ! {
    percpu.tables.load();
    idt::init();
    install(percpu);
    percpu.alive.store(true, Ordering::Release);
    let Some(boot) = BOOT.get() else {
        // Unreachable: `start_aps` sets BOOT before it starts any AP.
        super::halt_forever()
    };
    // SAFETY: the boot CPU's CR0, CR4 (less VMXE, which VMXON's set-up sets) and PAT run Keel
    // there; this processor is of the same kind and uses the same page tables.
    unsafe {
        cpu::write_cr0(boot.cr0);
        cpu::write_cr4(boot.cr4 & !CR4_VMXE);
        cpu::wrmsr(cpu::msr::IA32_PAT, boot.pat);
    }
    lapic::init_ap();
    let outcome = match lapic::id() {
        id if id == percpu.cpu().apic_id => vmx_setup(percpu, boot),
        // Started by broadcast: it tells Keel who it is.
        id if percpu
            .apic_id
            .compare_exchange(UNKNOWN_APIC, id, Ordering::AcqRel, Ordering::Acquire)
            .is_ok() =>
        {
            vmx_setup(percpu, boot)
        }
        // The MADT and the hardware disagree: this is not the CPU Keel meant to start.
        id => Outcome::VmxFailed(alloc::format!("it answered as APIC {id}")),
    };
    let up = matches!(outcome, Outcome::VmxOn { .. });
    percpu.outcome.call_once(|| outcome);
    loop {
        // Woken by an IPI (or an NMI): the run loop may have started.
        x86_64::instructions::interrupts::enable_and_hlt();
        x86_64::instructions::interrupts::disable();
        if let Some(run) = LOOP_ENTRY.get().filter(|_| up) {
            run(percpu);
        }
    }
}

/// What every AP in VMX operation runs once the run loop starts ([`start_loop`]).
static LOOP_ENTRY: spin::Once<fn(&'static PerCpu)> = spin::Once::new();

/// Starts `run` on every AP in VMX operation (each is kicked out of its HLT for it); it returns
/// when the AP has nothing more to do, and the AP waits in HLT again.
pub fn start_loop(run: fn(&'static PerCpu)) {
    LOOP_ENTRY.call_once(|| run);
    for p in online().filter(|p| p.index != 0) {
        kick(p);
    }
}

/// This CPU's VMX bring-up: the checks and VMXON of `vmx::enable`, then the all-context INVEPT and
/// INVVPID that the boot CPU runs after its own VMXON (SDM 29.4.3.1, 29.4.3.3).
fn vmx_setup(percpu: &PerCpu, boot: &BootState) -> Outcome {
    if let Some(why) = smp::simulated_failure(percpu.index, boot.fail_vmx_on_cpu) {
        return Outcome::VmxFailed(why);
    }
    if !vmx::has_vmx() {
        return Outcome::VmxFailed(vmx::EnableError::NoVmx.to_string());
    }
    // VMCSs will move between CPUs: they must all take the same controls and revision.
    let caps = VmxCaps::read(cpu::rdmsr);
    if caps != boot.caps {
        return Outcome::VmxFailed("its VMX capability MSRs differ from the boot CPU's".into());
    }
    let region = match vmx::enable() {
        Ok(r) => r,
        Err(e) => return Outcome::VmxFailed(e.to_string()),
    };
    percpu.vmxon.store(region, Ordering::Release);
    for inv in FlushPolicy::at_vmxon(&caps) {
        if let Err(e) = vmx::invalidate(&inv) {
            return Outcome::VmxFailed(alloc::format!("{inv} at VMXON failed: {e}"));
        }
    }
    Outcome::VmxOn {
        revision: (cpu::rdmsr(cpu::msr::IA32_VMX_BASIC) & 0x7fff_ffff) as u32,
    }
}

// The start-up trampoline. It is copied to a page P below 1 MiB and runs there:
// - 16-bit real mode, CS = P >> 4, IP = 0: load the temporary GDT, set CR0.PE, far jump to a
//   32-bit code segment whose base is P (so the code needs no absolute addresses);
// - 32-bit protected mode: CR4 (PAE), CR3, EFER.LME, CR0.PG: IA-32e mode, still executing at
//   P + offset, which the identity mapping makes the same linear address; far return to the
//   64-bit code segment (base 0) at the absolute address P + offset;
// - 64-bit mode: load the stack and the `PerCpu` pointer from the parameters and call
//   `ap_entry`.
// The parameters at the end (`TrampolineParams`) are written by the boot CPU for each AP.
core::arch::global_asm!(
    r#"
.pushsection .text.keel_ap_trampoline, "ax"
.balign 16
.global keel_ap_trampoline
keel_ap_trampoline:
.code16
    cli
    cld
    mov ax, cs
    mov ds, ax
    mov es, ax
    mov ss, ax
    lgdt [0x100 + 32]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    # jmp 0x08:(.Lkeel_ap_pm32 - keel_ap_trampoline), ptr16:16
    .byte 0xea
    .word .Lkeel_ap_pm32 - keel_ap_trampoline
    .word 0x08
.code32
.Lkeel_ap_pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, [0x100 + 52]
    mov cr4, eax
    mov eax, [0x100 + 48]
    mov cr3, eax
    mov ecx, 0xc0000080
    mov eax, [0x100 + 56]
    xor edx, edx
    wrmsr
    mov eax, [0x100 + 44]
    mov cr0, eax
    # jmp far [0x100 + 60]: m16:32 = (P + 0x80, 0x18), no stack needed (APs started by
    # broadcast run this at the same time).
    .byte 0xff, 0x2d
    .long 0x100 + 60
.code64
# The 64-bit part starts at offset 0x80 (the far pointer above holds the page's address + 0x80).
.org 0x80
.Lkeel_ap_lm64:
    # Take the next slot: its stack and its PerCpu; past the last one, halt for good.
    mov eax, 1
    lock xadd dword ptr [rip + .Lkeel_ap_counter], eax
    cmp eax, dword ptr [rip + .Lkeel_ap_capacity]
    jae 2f
    mov rbx, qword ptr [rip + .Lkeel_ap_stacks]
    mov rsp, qword ptr [rbx + rax * 8]
    mov rbx, qword ptr [rip + .Lkeel_ap_args]
    mov rdi, qword ptr [rbx + rax * 8]
    call qword ptr [rip + .Lkeel_ap_entry]
2:
    cli
    hlt
    jmp 2b
# The parameters sit at offset 0x100 of the page (the section holds the trampoline alone, and
# the code above refers to them by these offsets).
.org 0x100
.global keel_ap_trampoline_params
keel_ap_trampoline_params:
    .quad 0, 0, 0, 0
.Lkeel_ap_gdtr:
    .word 0
    .long 0
    .word 0
.Lkeel_ap_base:
    .long 0
.Lkeel_ap_cr0:
    .long 0
.Lkeel_ap_cr3:
    .long 0
.Lkeel_ap_cr4:
    .long 0
.Lkeel_ap_efer:
    .long 0
.Lkeel_ap_far64:
    .long 0
    .word 0
    .word 0
.Lkeel_ap_counter:
    .long 0
.Lkeel_ap_capacity:
    .long 0
    .long 0
.Lkeel_ap_stacks:
    .quad 0
.Lkeel_ap_args:
    .quad 0
.Lkeel_ap_entry:
    .quad 0
.global keel_ap_trampoline_end
keel_ap_trampoline_end:
.popsection
"#
);

unsafe extern "C" {
    static keel_ap_trampoline: u8;
    static keel_ap_trampoline_params: u8;
    static keel_ap_trampoline_end: u8;
}

const PARAMS_LEN: usize = 104;
/// Where the 64-bit code starts in the page (`.org 0x80` above).
const LM64_OFFSET: u32 = 0x80;

/// The trampoline's parameters, laid out as the assembly above reserves them.
#[repr(C)]
struct TrampolineParams {
    /// Null, 32-bit code (base P), data (base P), 64-bit code.
    gdt: [u64; 4],
    gdtr_limit: u16,
    /// The GDT's linear address, as two halves (the field is not 4-byte aligned).
    gdtr_base: [u16; 2],
    _pad0: u16,
    base: u32,
    cr0: u32,
    cr3: u32,
    cr4: u32,
    efer: u32,
    /// The far pointer (offset, selector) to the 64-bit code.
    far64_offset: u32,
    far64_selector: u16,
    _pad1: u16,
    /// Slots taken so far (LOCK XADD by each AP) and how many there are.
    counter: u32,
    capacity: u32,
    _pad2: u32,
    /// Addresses of the tables of stack tops and of `PerCpu` pointers, one entry per slot.
    stacks: u64,
    args: u64,
    entry: u64,
}

// The offsets the assembly reads (from 0x100): gdtr +32, cr0 +44, cr3 +48, cr4 +52, efer +56,
// far64 +60; counter, capacity, stacks, args and entry by their labels.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(TrampolineParams, gdtr_limit) == 32);
    assert!(offset_of!(TrampolineParams, gdtr_base) == 34);
    assert!(offset_of!(TrampolineParams, base) == 40);
    assert!(offset_of!(TrampolineParams, cr0) == 44);
    assert!(offset_of!(TrampolineParams, cr3) == 48);
    assert!(offset_of!(TrampolineParams, cr4) == 52);
    assert!(offset_of!(TrampolineParams, efer) == 56);
    assert!(offset_of!(TrampolineParams, far64_offset) == 60);
    assert!(offset_of!(TrampolineParams, far64_selector) == 64);
    assert!(offset_of!(TrampolineParams, counter) == 68);
    assert!(offset_of!(TrampolineParams, capacity) == 72);
    assert!(offset_of!(TrampolineParams, stacks) == 80);
    assert!(offset_of!(TrampolineParams, args) == 88);
    assert!(offset_of!(TrampolineParams, entry) == 96);
    assert!(size_of::<TrampolineParams>() == PARAMS_LEN);
};

/// The trampoline page, identity-mapped while it exists, and the slot tables it points to.
struct Trampoline {
    pa: u64,
    slots: spin::Mutex<(Vec<u64>, Vec<u64>)>,
}

impl Trampoline {
    fn install() -> Result<Self, &'static str> {
        let cr3 = cpu::read_cr3() & !0xfff;
        if cr3 >> 32 != 0 {
            return Err("the page tables lie above 4 GiB, out of reach of 32-bit code");
        }
        let (start, params, end) = (
            core::ptr::addr_of!(keel_ap_trampoline) as usize,
            core::ptr::addr_of!(keel_ap_trampoline_params) as usize,
            core::ptr::addr_of!(keel_ap_trampoline_end) as usize,
        );
        // The code reads its parameters at offset 0x100; the top of the page is the 32-bit
        // code's stack (two pushes).
        if params - start != 0x100 || end - params != PARAMS_LEN || end - start > 4096 {
            return Err("the trampoline does not fit its page");
        }
        let pa = mm::FRAMES
            .lock()
            .alloc_below(mm::PAGE_SIZE, mm::PAGE_SIZE, 1 << 20)
            .ok_or("no free page below 1 MiB")?;
        paging::map_identity(pa)?;
        // SAFETY: the code bytes are Keel's own text; the page is Keel's, just allocated.
        unsafe {
            core::ptr::copy_nonoverlapping(start as *const u8, mm::phys_to_virt(pa), end - start)
        };
        let base = pa as u32;
        let gdt_linear = base + (params - start) as u32;
        let p = TrampolineParams {
            gdt: [
                0,
                smp::flat_segment(base, 0x9a, 0xc),
                smp::flat_segment(base, 0x92, 0xc),
                smp::flat_segment(0, 0x9a, 0xa),
            ],
            gdtr_limit: 31,
            gdtr_base: [gdt_linear as u16, (gdt_linear >> 16) as u16],
            _pad0: 0,
            base,
            cr0: cpu::read_cr0() as u32,
            cr3: cr3 as u32,
            cr4: (cpu::read_cr4() & !(CR4_VMXE | CR4_PCIDE)) as u32,
            efer: (cpu::rdmsr(cpu::msr::IA32_EFER) & EFER_COPIED) as u32,
            far64_offset: base + LM64_OFFSET,
            far64_selector: 0x18,
            _pad1: 0,
            counter: 0,
            capacity: 0,
            _pad2: 0,
            stacks: 0,
            args: 0,
            entry: ap_entry as *const () as u64,
        };
        let t = Self {
            pa,
            slots: spin::Mutex::new((Vec::new(), Vec::new())),
        };
        // SAFETY: the parameters block lies inside the page, 8-byte aligned like the assembly's.
        unsafe { t.params().write_volatile(p) };
        Ok(t)
    }

    fn params(&self) -> *mut TrampolineParams {
        let off = core::ptr::addr_of!(keel_ap_trampoline_params) as usize
            - core::ptr::addr_of!(keel_ap_trampoline) as usize;
        // SAFETY: `off` lies inside the page (checked in `install`).
        unsafe { mm::phys_to_virt(self.pa).add(off) as *mut TrampolineParams }
    }

    /// Sets the slots (stack top, `PerCpu`) of the next APs to start, in the order they arrive.
    fn prepare(&self, slots: &[(u64, &'static PerCpu)]) {
        let mut tables = self.slots.lock();
        tables.0 = slots.iter().map(|s| s.0).collect();
        tables.1 = slots.iter().map(|s| s.1 as *const PerCpu as u64).collect();
        let p = self.params();
        // SAFETY: the block is inside the page; no AP runs the trampoline now (the previous one
        // checked in, or was parked with INIT). The tables live in `self.slots` until the next
        // `prepare` or the end of the bring-up.
        unsafe {
            core::ptr::addr_of_mut!((*p).counter).write_volatile(0);
            core::ptr::addr_of_mut!((*p).capacity).write_volatile(slots.len() as u32);
            core::ptr::addr_of_mut!((*p).stacks).write_volatile(tables.0.as_ptr() as u64);
            core::ptr::addr_of_mut!((*p).args).write_volatile(tables.1.as_ptr() as u64);
        }
        fence(Ordering::SeqCst);
    }

    /// How many APs have taken a slot (or tried to, past the last one).
    fn arrived(&self) -> u32 {
        let p = self.params();
        // SAFETY: the counter lies inside the page, 4-byte aligned; APs change it only with LOCK
        // XADD, so an aligned read sees a whole value.
        let counter = unsafe { &*(core::ptr::addr_of!((*p).counter) as *const AtomicU32) };
        counter.load(Ordering::Acquire)
    }

    /// The SIPI vector: the page number of the trampoline.
    fn page_number(&self) -> u8 {
        (self.pa >> 12) as u8
    }
}

impl Drop for Trampoline {
    /// The page stays reserved (low memory is scarce, and a CPU restart would need it again);
    /// only its identity mapping goes.
    fn drop(&mut self) {
        paging::unmap_identity(self.pa);
    }
}
