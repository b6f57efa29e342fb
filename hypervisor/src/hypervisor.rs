//! The top of Keel on real hardware: bring the CPU into VMX operation, build the guests the ramdisk
//! asks for and run them until they have all ended.

use crate::arch::host::{Frames, RealHost};
use crate::arch::vmcs::{CurrentVmcs, LoadedVmcs, VmcsRegion};
use crate::arch::{self, cpu, lapic, vmx, ExitCode};
use crate::archive::{self, Archive};
use crate::devices::Platform;
use crate::ept::{Ept, EptPerms, MemType};
use crate::exits;
use crate::exits::cpuid::CpuidTable;
use crate::guest::{GuestRam, GuestRegs, RunState, StopReason, Vcpu, Vm};
use crate::loader::{self, LoadRequest};
use crate::machine::MachineInfo;
use crate::manifest::{self, GuestConfig};
use crate::mm;
use crate::runloop::migrate::MigrateHw;
use crate::runloop::reflex::{self, Reflex};
use crate::runloop::{Cpu, LoopConfig, RunLoop, Slot};
use crate::snapshot::{self, Fingerprint, GuestInfo};
use crate::vcpu::{self, ControlSet};
use crate::vcpu_state::{CpuEnv, SwitchedRegs, VcpuState, XsaveLayout};
use crate::vmx::apicv::{ApicvFeatures, VirtualApic};
use crate::vmx::controls::{PrimaryControls, SecondaryControls};
use crate::vmx::invalidate::vcpu_vpid;
use crate::vmx::{FlushPolicy, Vmcs, VmxCaps, VmxError};
use crate::{error, fatal, info};
use alloc::string::String;
use alloc::vec::Vec;

/// Keel's own tick rate (Hz).
pub const TICK_HZ: u64 = 100;

pub fn run(machine: MachineInfo) -> ! {
    info!(
        "firmware {:?}, {} MiB usable RAM in {} ranges, ramdisk {}",
        machine.firmware,
        machine.usable_bytes() >> 20,
        machine.usable.len(),
        match machine.ramdisk {
            Some(r) => alloc::format!("{} KiB at {:#x}", r.len() >> 10, r.start),
            None => alloc::string::String::from("none"),
        }
    );
    report_cpu();
    let cal = lapic::init(TICK_HZ);
    info!(
        "LAPIC {} timer calibrated: TSC {} kHz, APIC timer {} kHz, tick {} Hz",
        lapic::id(),
        cal.tsc_hz / 1000,
        cal.apic_timer_hz / 1000,
        TICK_HZ
    );
    match vmx::enable() {
        Ok(region) => {
            info!("VMXON ok (region at {region:#x})");
            arch::smp::set_boot_vmxon(region);
            if cpu::has_xsave() {
                cpu::enable_xsave();
                // Each guest's extended state lives in one 4 KiB page (SavedState).
                let size = cpu::cpuid(0xd, 0)[2];
                if size > 4096 {
                    fatal!("this CPU's XSAVE image is {size} bytes; Keel keeps 4096 per guest");
                    arch::exit(ExitCode::VmxSetupFailed)
                }
            }
        }
        Err(e) => {
            fatal!("{e}");
            arch::exit(match e {
                vmx::EnableError::NoVmx => ExitCode::NoVmx,
                vmx::EnableError::DisabledInFirmware => ExitCode::VmxDisabledInFirmware,
                _ => ExitCode::VmxSetupFailed,
            })
        }
    }
    let caps = VmxCaps::read(cpu::rdmsr);
    info!("{caps}");
    // Translations cached before Keel (firmware, a previous VMM) may carry the EPTPs and VPIDs
    // Keel's guests will use: drop them all before the first guest runs (SDM 29.4.3.1, 29.4.3.3).
    for inv in FlushPolicy::at_vmxon(&caps) {
        if let Err(e) = vmx::invalidate(&inv) {
            fatal!("{inv} at VMXON failed: {e}");
            arch::exit(ExitCode::VmxSetupFailed)
        }
    }
    let controls = match vcpu::compute_controls(&caps) {
        Ok(c) => c,
        Err(e) => {
            fatal!("{e}");
            arch::exit(ExitCode::VmxSetupFailed)
        }
    };
    // Kicks between CPUs are NMIs where every guest has virtual NMIs (`arch::smp::kick`).
    let virtual_nmis = controls.pin & crate::vmx::controls::PinBasedControls::VIRTUAL_NMIS.bits();
    arch::smp::kick_by_nmi(virtual_nmis != 0);
    if virtual_nmis == 0 {
        info!("no virtual NMIs: kicks between CPUs are fixed IPIs");
    }
    let (xapic, x2apic) = ApicvFeatures::select(&caps, true).describe();
    info!("APIC virtualization: {xapic}; {x2apic}");
    if controls.preemption_timer {
        lapic::stop_periodic();
        info!("time slices by the VMX-preemption timer; Keel's periodic tick is off");
    } else {
        info!("no VMX-preemption timer: time slices end on Keel's {TICK_HZ} Hz LAPIC tick");
    }
    let Some(archive_bytes) = arch::boot::ramdisk_bytes(&machine) else {
        fatal!("no ramdisk: build the image with `cargo keel image` so it carries guests");
        arch::exit(ExitCode::NoGuests)
    };
    let manifest = match Archive::parse(archive_bytes)
        .map_err(|e| alloc::format!("{e}"))
        .and_then(|a| {
            let text = a
                .get(archive::MANIFEST_NAME)
                .ok_or_else(|| String::from("the ramdisk has no manifest"))?;
            let text = core::str::from_utf8(text)
                .map_err(|_| String::from("the manifest is not UTF-8"))?;
            manifest::parse(text)
                .map(|m| (a, m))
                .map_err(|e| alloc::format!("{e}"))
        }) {
        Ok(m) => m,
        Err(e) => {
            fatal!("bad ramdisk: {e}");
            arch::exit(ExitCode::NoGuests)
        }
    };
    let (archive, manifest) = manifest;
    match manifest.selftest {
        Some(manifest::SelfTest::Panic) => panic!("self-test: a panic requested by the manifest"),
        Some(manifest::SelfTest::Fault) => {
            info!("self-test: executing UD2 in Keel");
            // SAFETY: UD2 raises #UD, which Keel's IDT reports before it stops the machine.
            unsafe { core::arch::asm!("ud2") };
        }
        None => {}
    }
    // The other CPUs: each with its own tables and VMXON, then idle until the run loop starts.
    arch::smp::start_aps(&machine, &caps, manifest.fail_vmx_on_cpu, cal.tsc_hz);
    // The CPUs that run vCPUs: every one in VMX operation (`arch::smp::online`, the boot CPU
    // first); the run loop numbers them 0, 1, ... in that order.
    let hosts: Vec<&'static arch::smp::PerCpu> = arch::smp::online().collect();
    let mut slots = Vec::new();
    for (id, cfg) in manifest.guests.iter().enumerate() {
        let setup = match guest_setup(cfg, archive, &caps, &controls) {
            Ok(s) => s,
            Err(e) => {
                error!("guest {}: not started: {e}", cfg.name);
                continue;
            }
        };
        let pins = match crate::runloop::pins_on(cfg.cpus, cpu_mask(&hosts)) {
            Ok(p) => p.map(|m| host_mask(&hosts, m)),
            Err(n) => {
                crate::warn!(
                    "guest {}: cpus names CPU {n}, which runs no vCPUs: it may run on every CPU",
                    cfg.name
                );
                None
            }
        };
        match VmHw::create(id as u32, setup, cal.tsc_hz) {
            Ok(slot) => slots.push(slot.with_pins(pins)),
            Err(e) => error!("guest {}: not started: {e}", cfg.name),
        }
    }
    if slots.is_empty() {
        fatal!("no guest could be started");
        arch::exit(ExitCode::NoGuests)
    }
    let quantum = cal.tsc_hz * manifest.quantum_ms as u64 / 1000;
    info!(
        "running {} guests, quantum {} ms ({} TSC cycles)",
        slots.len(),
        manifest.quantum_ms,
        quantum
    );
    let config = LoopConfig::new(
        quantum,
        cal.tsc_hz,
        controls
            .preemption_timer
            .then(|| caps.preemption_timer_rate()),
        controls.primary & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0,
    );
    let com2 = arch::com2::Com2::probe();
    match com2 {
        Some(_) => info!("control channel on COM2 (0x2f8), monitor on COM1: Ctrl-A c"),
        None => info!("no COM2: no control channel; monitor on COM1: Ctrl-A c"),
    }
    // The bulk disk: the primary IDE channel's slave (docs/SNAPSHOTS.md, "The bulk disk").
    let bulk = match crate::ata::Ata::identify(arch::ata::Primary, crate::ata::Drive::Slave) {
        Ok(d) => {
            info!(
                "bulk disk: {} KiB on the primary IDE channel's slave",
                d.sectors() / 2
            );
            Some(d)
        }
        Err(e) => {
            info!("no bulk disk: {e}");
            None
        }
    };
    let cpu = RealCpu {
        host: RealHost,
        cal,
        cpus: hosts
            .iter()
            .map(|&p| CpuHw {
                percpu: p,
                spec_ctrl: 0,
                left: false,
                left_msrs: [0; 6],
            })
            .collect(),
        on: 0,
        xsave: cpu::has_xsave().then(cpu::xcr0_supported),
        com2,
        bulk,
    };
    // The on-demand guests, under the load policy (`policy`).
    let on_demand: Vec<usize> = (0..slots.len())
        .filter(|&i| slots[i].hw.setup.cfg.on_demand)
        .collect();
    let n = hosts.len();
    let mut runner = Runner::new(cpu, config, slots).with_hosts(n);
    if !on_demand.is_empty() {
        let policy = crate::policy::Policy::new(manifest.policy, cal.tsc_hz, on_demand);
        runner = runner.with_policy(policy);
    }
    crate::log::set_guests_running(runner.slots.len());
    let shared = LOOP.call_once(|| SharedLoop(crate::ticket::TicketLock::new(runner)));
    if n == 1 {
        // One CPU: the loop never lets go of its lock (`RunLoop::step`), and no other CPU kicks
        // this one, so no exit looks for an NMI kick (`arch::vmcs`). An NMI from elsewhere (the
        // platform) then stays blocked until Keel's next IRET, which nothing here waits for.
        arch::smp::kick_by_nmi(false);
        shared.0.lock().run();
    } else {
        info!("the run loop runs on {n} CPUs");
        arch::smp::start_loop(ap_main);
        run_host(0, &cal);
    }
    let mut runner = shared.0.lock();
    crate::log::set_guests_running(0);
    runner.report();
    runner.flush_control();
    // Only the operator's `quit`, with no guest failed, is a success; runs that end by themselves
    // keep their status.
    arch::exit(if runner.quit_requested() && !runner.any_failed() {
        ExitCode::Quit
    } else {
        ExitCode::Completed
    })
}

/// The CPU numbers (`cpus =` in a manifest) of the loop's CPUs, a bit each.
fn cpu_mask(hosts: &[&'static arch::smp::PerCpu]) -> u64 {
    hosts
        .iter()
        .map(|p| p.cpu().index)
        .filter(|&i| i < 64)
        .fold(0, |m, i| m | 1 << i)
}

/// A mask of CPU numbers as the run loop numbers its CPUs (its host CPU `h` is `hosts[h]`).
fn host_mask(hosts: &[&'static arch::smp::PerCpu], cpus: u64) -> u64 {
    hosts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.cpu().index < 64 && cpus & (1 << p.cpu().index) != 0)
        .fold(0, |m, (h, _)| m | 1 << h)
}

/// The run loop shared by every CPU, behind one lock taken around `finish` and `begin`; guest
/// mode (`Detached::enter`) runs outside it, so guests execute in parallel while their exits are
/// handled one at a time. A ticket lock: the CPUs get it in the order they asked, so none
/// waits behind the others for long; a CPU waiting for it reads COM1 meanwhile ([`lock_loop`]).
struct SharedLoop(crate::ticket::TicketLock<Runner>);

/// The loop's lock for a CPU back from guest mode or from sleep. While other CPUs have it, the
/// keys waiting in COM1's FIFO are stashed (`arch::serial::stash_keys`): one CPU's turn with the
/// lock may outlast the FIFO, and the loop reads COM1 only at each turn.
fn lock_loop(shared: &SharedLoop) -> crate::ticket::TicketGuard<'_, Runner> {
    shared.0.lock_while(arch::serial::stash_keys)
}

// SAFETY: the loop's data (guests, their RAM views and hardware) is only reached with the lock
// held, except a vCPU's VMCS and its registers' copy, which only the CPU that runs it touches
// between `detach` and `reattach` (`arch::vmcs::Detached`).
unsafe impl Sync for SharedLoop {}
// SAFETY: as for `Sync`.
unsafe impl Send for SharedLoop {}

static LOOP: spin::Once<SharedLoop> = spin::Once::new();

/// Where an AP goes when the run loop starts (`arch::smp::start_loop`): its place in the loop,
/// by its position among the CPUs online, and then the loop, until every guest has stopped.
fn ap_main(me: &'static arch::smp::PerCpu) {
    let Some(shared) = LOOP.get() else {
        return;
    };
    let (h, cal) = {
        let g = shared.0.lock();
        let h = g.cpu.cpus.iter().position(|c| core::ptr::eq(c.percpu, me));
        (h, g.cpu.cal)
    };
    if let Some(h) = h {
        run_host(h, &cal);
    }
}

/// Host CPU `h`'s loop: `begin`, then the guest (without the lock), then `finish`, until every
/// guest has stopped; it sleeps in HLT, interrupts on, until a kick or its timer when it has
/// nothing to run.
fn run_host(h: usize, cal: &lapic::Calibration) {
    let Some(shared) = LOOP.get() else {
        return;
    };
    // The lock is let go only for guest mode and for sleep: an exit's `finish` and the next
    // entry's `begin` are one turn with it, so a vCPU waits for it once per exit.
    let mut g = lock_loop(shared);
    loop {
        match g.begin(h) {
            crate::runloop::Turn::Done => return,
            crate::runloop::Turn::Sleep { wake, max } => {
                drop(g);
                lapic::sleep_until(wake, max, cal);
                g = lock_loop(shared);
            }
            crate::runloop::Turn::Enter => {
                let Some((mut d, mut regs)) = g.detach(h) else {
                    g.finish(h);
                    continue;
                };
                drop(g);
                let entered = d.enter(&mut regs);
                let exited_at = cpu::rdtsc();
                g = lock_loop(shared);
                g.reattach(h, d, regs, entered, exited_at);
                g.finish(h);
            }
        }
    }
}

/// The real machine behind the run loop: RDTSC, VMPTRLD, VMLAUNCH/VMRESUME, XSAVE/XRSTOR and
/// the other registers VMX does not switch, the LAPIC timer for idle sleep, COM1 for keys. The
/// loop's calls for host CPU `h` are made on that CPU (`Cpu::on_host`), so each acts on the CPU
/// it runs on; what is kept per CPU is in `cpus[h]`.
pub struct RealCpu {
    host: RealHost,
    cal: lapic::Calibration,
    /// One per CPU of the run loop (its host CPU `h` is `cpus[h]`).
    cpus: Vec<CpuHw>,
    /// The host CPU the loop acts for now: the one executing.
    on: usize,
    /// Every XCR0 component the CPU supports, if it has XSAVE (looked up once, not at each
    /// guest switch).
    xsave: Option<u64>,
    /// The control channel's UART, if the machine has one (CPU 0's alone: only it polls it).
    com2: Option<arch::com2::Com2>,
    /// The bulk disk, if the machine has one.
    bulk: Option<crate::ata::Ata<arch::ata::Primary>>,
}

/// What Keel keeps of one CPU that runs vCPUs.
struct CpuHw {
    percpu: &'static arch::smp::PerCpu,
    /// What Keel last wrote to this CPU's IA32_SPEC_CTRL (0, its reset value, until a guest sets
    /// it).
    spec_ctrl: u64,
    /// What the last save of a vCPU's registers left in this CPU, until the next restore: XCR0
    /// set to every supported component, and the switched MSRs as read (`left_msrs`), while
    /// nothing else has run there. The restore that follows (a guest switch) skips the XSETBV and
    /// the WRMSRs of values already there: both guests' SYSCALL MSRs are often equal (the same
    /// kernel), and a WRMSR costs far more than the compare on silicon.
    left: bool,
    left_msrs: [u64; 6],
}

/// The run loop on the real machine.
pub type Runner = RunLoop<RealCpu>;

/// The reflex (`runloop::reflex::take`), called by the VM-exit stub (`arch::vmcs`) at an exit
/// the reflex may take (`reflex::may_take`, which the stub tests itself), right after it saved
/// the guest's registers in `regs`, with host interrupts off: true, and the stub resumes the
/// guest at once. `r` is the reflex `RealCpu::enter_with_reflex` entered with.
#[no_mangle]
extern "C" fn keel_reflex(r: *mut Reflex, regs: *mut GuestRegs) -> bool {
    let t1 = cpu::rdtsc();
    // SAFETY: the stub passes the reflex `enter_with_reflex` was given, alive and lent to it for
    // the call, with the guest's CPUID table it wrote there, and the registers of the guest whose
    // VMCS is current (`LoadedVmcs::enter_with_reflex`): nothing else uses any of them until the
    // stub returns or resumes the guest.
    let (r, regs, mut v) = unsafe { (&mut *r, &mut *regs, CurrentVmcs::new()) };
    // SAFETY: as above.
    let table = unsafe { &*r.table };
    reflex::take(&mut v, r, table, regs, t1, cpu::rdtsc)
}

impl Cpu for RealCpu {
    type Vcpu = VmHw;
    type Loaded<'a> = LoadedVmcs<'a>;
    type Detached = arch::vmcs::Detached;

    fn rdtsc(&mut self) -> u64 {
        cpu::rdtsc()
    }

    fn save(&mut self, vm: &mut VmHw, cpu: usize) {
        if let (Some(c), Some(h)) = (vm.cpus.get_mut(cpu), self.cpus.get_mut(self.on)) {
            c.saved.save(self.xsave, &mut h.left_msrs);
            h.left = true;
        }
    }

    fn restore(&mut self, vm: &mut VmHw, cpu: usize, xcr0: u64) {
        if let (Some(c), Some(h)) = (vm.cpus.get(cpu), self.cpus.get_mut(self.on)) {
            let left = core::mem::take(&mut h.left).then_some(&h.left_msrs);
            c.saved.restore(self.xsave, xcr0, left);
        }
    }

    fn load<'a>(&mut self, vm: &'a mut VmHw, cpu: usize) -> Result<LoadedVmcs<'a>, String> {
        let c = vm.cpus.get_mut(cpu).ok_or("no such vCPU")?;
        c.vmcs.load().map_err(|e| alloc::format!("{e}"))
    }

    #[inline(always)]
    fn enter(&mut self, vmcs: &mut LoadedVmcs<'_>, regs: &mut GuestRegs) -> Result<(), VmxError> {
        vmcs.enter(regs)
    }

    #[inline(always)]
    fn enter_with_reflex(
        &mut self,
        vmcs: &mut LoadedVmcs<'_>,
        regs: &mut GuestRegs,
        r: &mut Reflex,
        table: &CpuidTable,
    ) -> Result<u32, VmxError> {
        r.table = table;
        // SAFETY: `r` is what `keel_reflex` takes, with the table it reads, both alive until the
        // call returns.
        unsafe { vmcs.enter_with_reflex(regs, r as *mut Reflex as *mut ()) }
    }

    fn release(&mut self, vm: &mut VmHw, cpu: usize) -> Result<(), String> {
        let c = vm.cpus.get_mut(cpu).ok_or("no such vCPU")?;
        c.vmcs.clear().map_err(|e| alloc::format!("{e}"))
    }

    fn host(&mut self) -> &mut dyn exits::Host {
        &mut self.host
    }

    fn load_xcr0(&mut self, xcr0: u64) {
        if let Some(h) = self.cpus.get_mut(self.on) {
            h.left = false;
        }
        // SAFETY: `exits::xsetbv` only stores values valid for this CPU.
        unsafe { cpu::xsetbv0(xcr0) };
    }

    fn load_spec_ctrl(&mut self, value: u64) {
        if let Some(c) = self.cpus.get_mut(self.on) {
            load_spec_ctrl(&mut c.spec_ctrl, value);
        }
    }

    fn on_host(&mut self, h: usize) {
        self.on = h;
    }

    fn kick(&mut self, h: usize) {
        if let Some(c) = self.cpus.get(h) {
            arch::smp::kick(c.percpu);
        }
    }

    fn detach(&mut self, vm: &mut VmHw, cpu: usize) -> Result<arch::vmcs::Detached, String> {
        let c = vm.cpus.get_mut(cpu).ok_or("no such vCPU")?;
        drop(c.vmcs.load().map_err(|e| alloc::format!("{e}"))?);
        Ok(c.vmcs.detach())
    }

    fn reattach(&mut self, vm: &mut VmHw, cpu: usize, d: arch::vmcs::Detached) {
        if let Some(c) = vm.cpus.get_mut(cpu) {
            c.vmcs.reattach(d);
        }
    }

    fn flush_ept(&mut self, hw: &mut VmHw) -> Result<(), String> {
        hw.invalidate_ept(hw.ept.eptp())
    }

    fn flush_vpid(&mut self, hw: &mut VmHw, id: u32, cpu: usize) -> Result<(), String> {
        hw.invalidate_vpid(vcpu_vpid(id, cpu))
    }

    fn sleep_until(&mut self, wake: u64, max: u64) {
        lapic::sleep_until(wake, max, &self.cal);
    }

    fn boot(
        &mut self,
        hw: &mut VmHw,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        restarts: u32,
    ) -> Result<(), String> {
        hw.boot(vm, vcpus, restarts)
    }

    fn snapshot(
        &mut self,
        hw: &mut VmHw,
        vm: &Vm,
        vcpus: &[Vcpu],
        clock: u64,
    ) -> Result<Vec<u8>, String> {
        hw.snapshot(vm, vcpus, clock)
    }

    fn restore_snapshot(
        &mut self,
        hw: &mut VmHw,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        stream: &[u8],
    ) -> Result<u64, String> {
        hw.restore_snapshot(vm, vcpus, stream)
    }

    fn console_key(&mut self) -> Option<u8> {
        if self.cpus.len() == 1 {
            // One CPU: no other waits for the loop's lock, so nothing is stashed and no read
            // is to be kept apart from another's; the UART's byte straight (the stash's
            // protocol cost a guest switch about 40 instructions, docs/BENCHMARKS.md).
            return arch::serial::read_alone();
        }
        arch::serial::try_read()
    }

    fn control_byte(&mut self) -> Option<u8> {
        self.com2.as_mut()?.read()
    }

    fn control_send(&mut self, out: &mut alloc::collections::VecDeque<u8>) {
        match self.com2.as_mut() {
            Some(c) => c.send(out),
            None => out.clear(),
        }
    }

    fn balloon(
        &mut self,
        hw: &mut VmHw,
        vm: &mut Vm,
        req: crate::balloon::Request,
    ) -> Result<u64, String> {
        let out = crate::balloon::apply(req, &mut vm.ram, &mut hw.ept, &mut FramePool);
        if let Some(stale) = out.stale {
            hw.invalidate_ept(stale.eptp)?;
        }
        Ok(out.status)
    }

    fn release_ram(&mut self, hw: &mut VmHw, vm: &mut Vm) {
        if let Err(e) = hw.release_ram(vm) {
            error!("guest {}: {e}", vm.name);
        }
    }

    fn memory_pool(&self) -> Option<(u64, u64)> {
        let f = mm::FRAMES.lock();
        Some((f.free_bytes(), f.total_bytes()))
    }

    fn migration(&mut self) -> Option<&mut dyn MigrateHw<VmHw>> {
        Some(self)
    }
}

impl MigrateHw<VmHw> for RealCpu {
    fn dirty_pages(
        &mut self,
        hw: &mut VmHw,
        vm: &Vm,
        dirty: &mut crate::migrate::PageSet,
        begin: bool,
    ) -> Result<(), String> {
        hw.dirty_pages(vm, dirty, begin)
    }

    fn end_tracking(&mut self, hw: &mut VmHw, vm: &Vm) -> Result<u64, String> {
        hw.end_tracking(vm)
    }

    fn describe(
        &mut self,
        hw: &mut VmHw,
        vm: &Vm,
        vcpus: usize,
        clock: u64,
    ) -> Result<(Fingerprint, GuestInfo), String> {
        Ok((hw.fingerprint(vcpus), hw.guest_info(vm, vcpus, clock)))
    }

    fn state(
        &mut self,
        hw: &mut VmHw,
        vm: &Vm,
        vcpus: &[Vcpu],
        clock: u64,
    ) -> Result<Vec<u8>, String> {
        let states = hw.capture(vcpus)?;
        let mut w = crate::state::Writer::new();
        snapshot::write_guest(&mut w, &hw.guest_info(vm, vcpus.len(), clock));
        vm.platform.save(&mut w);
        snapshot::write_vcpus(&mut w, &states);
        Ok(w.into_bytes())
    }

    fn incoming_ram(&mut self, hw: &mut VmHw, vm: &mut Vm) -> Result<(), String> {
        hw.whole_ram(vm)?;
        vm.ram.bytes().fill(0);
        Ok(())
    }

    fn restore_state(
        &mut self,
        hw: &mut VmHw,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        stream: &[u8],
    ) -> Result<u64, String> {
        hw.restore(vm, vcpus, stream, true)
    }

    fn bulk(&mut self) -> Option<&mut dyn crate::bulk::Disk> {
        self.bulk.as_mut().map(|d| d as &mut dyn crate::bulk::Disk)
    }
}

/// Keel's frame pool as ballooning uses it.
struct FramePool;

impl crate::balloon::Pool for FramePool {
    fn free(&mut self, hpa: u64, len: u64) {
        mm::free_pages(hpa, len);
    }

    fn claim(&mut self, hpa: u64) -> bool {
        mm::FRAMES.lock().claim(hpa, mm::PAGE_SIZE)
    }

    fn alloc(&mut self) -> Option<crate::balloon::Frame> {
        let hpa = mm::alloc_zeroed_page()?;
        Some(crate::balloon::Frame {
            hpa,
            ptr: mm::phys_to_virt(hpa),
        })
    }
}

/// One guest on the hardware: each vCPU's VMCS and saved registers, and the structures the
/// VMCSs point to. The hardware-independent [`Vm`] and [`Vcpu`]s and their places in the
/// schedule are in its `runloop::Slot`.
pub struct VmHw {
    /// vCPU i's hardware is `cpus[i]`.
    cpus: Vec<VcpuHw>,
    ept: Ept<Frames>,
    setup: Setup,
    /// The guest's RAM (`guest.ram` views it), while it has RAM: from its boot until it stops for
    /// good ([`VmHw::release_ram`]). Last, so it is given back after everything that refers to it
    /// when a `VmHw` is dropped (a guest refused at boot, before it could give pages back; its
    /// `Guest` goes first).
    ram_block: Option<mm::OwnedPages>,
}

/// One vCPU on the hardware.
struct VcpuHw {
    /// Loaded (VMPTRLD) for each use: its handle is the only way to read or write it.
    vmcs: VmcsRegion,
    /// Register state that VMX does not switch, saved while another vCPU runs.
    saved: SavedState,
    /// Its pages of APIC virtualization, when its guest runs with it.
    apic: Option<VcpuApic>,
}

/// A vCPU's own pages of APIC virtualization (`vmx::apicv`): its virtual-APIC page (its local
/// APIC's registers, SDM 30.1.1), and with x2APIC virtualization its own MSR bitmap, a copy of
/// the guest's whose x2APIC part is open while this vCPU's APIC is in x2APIC mode (its siblings'
/// may not be).
struct VcpuApic {
    vapic: mm::OwnedPages,
    msr_bitmap: Option<mm::OwnedPages>,
}

impl VcpuApic {
    /// The pages for a vCPU of the guest `setup` describes (None without APIC virtualization).
    fn new(setup: &Setup) -> Result<Option<Self>, String> {
        if !setup.apicv.any() {
            return Ok(None);
        }
        let page = || mm::OwnedPages::zeroed_page().ok_or("out of memory");
        let vapic = page()?;
        let msr_bitmap = if setup.apicv.virtualize_x2apic {
            let b = page()?;
            // SAFETY: a fresh frame owned by this vCPU, and the guest's bitmap, a frame of its
            // `Setup`; both mapped at phys_to_virt.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    mm::phys_to_virt(setup.msr_bitmap.pa()),
                    mm::phys_to_virt(b.pa()),
                    4096,
                )
            };
            Some(b)
        } else {
            None
        };
        Ok(Some(Self { vapic, msr_bitmap }))
    }

    /// The view of these pages the vCPU's exits use (`Vcpu::apicv`), for `features` and the
    /// guest's APIC-access page at `access_pa`.
    fn view(&self, features: ApicvFeatures, access_pa: u64) -> VirtualApic {
        // SAFETY: the virtual-APIC page is this vCPU's alone, a zeroed frame mapped at
        // phys_to_virt; it outlives the view (a `Slot` drops its `Vcpu`s before its hardware).
        let mut a = unsafe {
            VirtualApic::new(
                &mut *mm::phys_to_virt(self.vapic.pa()).cast::<[u8; 4096]>(),
                self.vapic.pa(),
                access_pa,
                features,
            )
        };
        if let Some(b) = &self.msr_bitmap {
            // SAFETY: this vCPU's own MSR bitmap (its VMCS's alone, `fresh_vmcs`), which outlives
            // the view as above.
            unsafe { a.set_msr_bitmap(&mut *mm::phys_to_virt(b.pa()).cast::<[u8; 4096]>()) };
        }
        a
    }
}

/// The MSRs in `exits::msr::PASSTHROUGH` that the VMCS does not switch.
const SWITCHED_MSRS: [u32; 6] = [
    exits::msr::index::KERNEL_GS_BASE,
    exits::msr::index::STAR,
    exits::msr::index::LSTAR,
    exits::msr::index::CSTAR,
    exits::msr::index::SFMASK,
    exits::msr::index::TSC_AUX,
];

/// A guest's share of the CPU that VMX leaves alone (SDM 27.3/28.3 switch neither the extended
/// state, nor XCR0, nor these MSRs, nor CR2, nor DR0-DR3 and DR6): saved when the guest is
/// switched out, restored when it is switched in. Keel itself never touches any of it (it is
/// built without SSE and sets no breakpoints; `exits::debug` has why the debug registers are
/// switched rather than intercepted).
struct SavedState {
    /// Physical address of a 4 KiB XSAVE area (zeroed = every component in its init state).
    xsave_pa: u64,
    msrs: [u64; 6],
    cr2: u64,
    /// DR0, DR1, DR2, DR3, DR6.
    debug: [u64; 5],
}

/// DR0-DR3 and DR6 at power-on (SDM Vol. 3A, "IA-32 and Intel 64 Processor States Following
/// Power-up, Reset, or INIT").
const DEBUG_INIT: [u64; 5] = [0, 0, 0, 0, exits::debug::DR6_INIT];

impl SavedState {
    fn new() -> Option<Self> {
        Some(Self {
            xsave_pa: mm::alloc_zeroed_page()?,
            msrs: [0; 6],
            cr2: 0,
            debug: DEBUG_INIT,
        })
    }

    /// The saved registers as a vCPU state holds them (`vcpu_state`).
    fn switched(&self) -> SwitchedRegs {
        SwitchedRegs {
            msrs: self.msrs,
            cr2: self.cr2,
            debug: self.debug,
        }
    }

    fn set_switched(&mut self, r: &SwitchedRegs) {
        self.msrs = r.msrs;
        self.cr2 = r.cr2;
        self.debug = r.debug;
    }

    /// The XSAVE area, while the vCPU is switched out (nothing else writes it then).
    fn area(&mut self) -> &mut [u8] {
        // SAFETY: the guest's own 4 KiB page, mapped at phys_to_virt; `&mut self` is the only
        // access to it while its vCPU is switched out (`save` and `restore` need `self` too).
        unsafe { core::slice::from_raw_parts_mut(mm::phys_to_virt(self.xsave_pa), 4096) }
    }

    /// Back to power-on: extended state in its init state, MSRs and CR2 zero, DR0-DR3 zero and
    /// DR6 = FFFF0FF0H.
    fn reset(&mut self) {
        // SAFETY: the area is this guest's own page.
        unsafe { core::ptr::write_bytes(mm::phys_to_virt(self.xsave_pa), 0, 4096) };
        self.msrs = [0; 6];
        self.cr2 = 0;
        self.debug = DEBUG_INIT;
    }

    /// Saves the guest's registers. Extended state is saved whole, every component the CPU has,
    /// whatever the guest's XCR0: a guest with XCR0 = x87 may still use SSE (its state is
    /// component 1 all the same), so Keel widens XCR0 while it saves and restores (SDM 13.7-13.8).
    /// `xsave`: every XCR0 component the CPU supports, if it has XSAVE. The MSRs are also
    /// written to `left` (what stays in the CPU: `CpuHw::left`).
    fn save(&mut self, xsave: Option<u64>, left: &mut [u64; 6]) {
        if let Some(all) = xsave {
            // SAFETY: a page-aligned 4 KiB area owned by this guest (the full XSAVE image of
            // this CPU fits: CPUID.(EAX=0DH,ECX=0):ECX, checked at boot); XCR0 = every supported
            // component is a valid XCR0.
            unsafe {
                cpu::xsetbv0(all);
                cpu::xsave(mm::phys_to_virt(self.xsave_pa), all);
            }
        } else {
            // SAFETY: as above; FXSAVE covers x87 and SSE, all a CPU without XSAVE has.
            unsafe { cpu::fxsave(mm::phys_to_virt(self.xsave_pa)) };
        }
        for k in 0..SWITCHED_MSRS.len() {
            let v = cpu::rdmsr(SWITCHED_MSRS[k]);
            (self.msrs[k], left[k]) = (v, v);
        }
        self.cr2 = cpu::read_cr2();
        self.debug = cpu::read_debug_registers();
    }

    /// `left`: what the last save left in this CPU, if nothing ran there since.
    fn restore(&self, xsave: Option<u64>, xcr0: u64, left: Option<&[u64; 6]>) {
        if let Some(all) = xsave {
            // SAFETY: the area was written by `save` or is zeroed (every component then takes
            // its init state); the guest's XCR0 was validated by the XSETBV handler (or is the
            // x87-only power-on value).
            unsafe {
                if left.is_none() {
                    cpu::xsetbv0(all);
                }
                cpu::xrstor(mm::phys_to_virt(self.xsave_pa), all);
                cpu::xsetbv0(xcr0);
            }
        } else {
            // SAFETY: a zeroed FXSAVE image has MXCSR = 0, a valid value; otherwise `save` wrote it.
            unsafe { cpu::fxrstor(mm::phys_to_virt(self.xsave_pa)) };
        }
        for (k, (&v, &msr)) in self.msrs.iter().zip(SWITCHED_MSRS.iter()).enumerate() {
            if left.is_some_and(|l| l[k] == v) {
                continue;
            }
            // SAFETY: the values were read from the same MSRs (or are 0, their reset value);
            // TSC_AUX and the SYSCALL MSRs take any value Keel saved.
            unsafe { cpu::wrmsr(msr, v) };
        }
        // SAFETY: CR2 does not affect Keel.
        unsafe { cpu::write_cr2(self.cr2) };
        // SAFETY: values read from the same registers (DR6 bits 63:32 read as 0) or the power-on
        // values; Keel's DR7 (400H since the last exit, or since boot) enables no breakpoint.
        unsafe { cpu::write_debug_registers(&self.debug) };
    }
}

/// Its XSAVE page goes back with the guest (a guest refused at boot keeps nothing, issue 8).
impl Drop for SavedState {
    fn drop(&mut self) {
        mm::free_pages(self.xsave_pa, mm::PAGE_SIZE);
    }
}

/// The per-guest I/O and MSR bitmaps (every port exits; MSRs per `exits::msr`). Each page is
/// owned by the `Setup`, so a guest that is not started gives them back.
fn guest_setup(
    cfg: &GuestConfig,
    archive: Archive<'static>,
    caps: &VmxCaps,
    controls: &ControlSet,
) -> Result<Setup, String> {
    let page = || mm::OwnedPages::zeroed_page().ok_or("out of memory");
    let (io_a, io_b, msr) = (page()?, page()?, page()?);
    // SAFETY: three fresh frames owned by this guest's `Setup`.
    unsafe {
        core::ptr::write_bytes(mm::phys_to_virt(io_a.pa()), 0xff, 4096);
        core::ptr::write_bytes(mm::phys_to_virt(io_b.pa()), 0xff, 4096);
        core::ptr::copy_nonoverlapping(
            exits::msr::bitmap(cpu::cpuid(7, 0)[3]).as_ptr(),
            mm::phys_to_virt(msr.pa()),
            4096,
        );
    }
    // APIC virtualization where the CPU has it and the manifest does not turn it off, for any
    // number of vCPUs: the controls (`vmx::apicv`) and the guest's APIC-access page, all ones
    // (what a vCPU whose APIC is not in xAPIC mode reads there); each vCPU's own pages come
    // with it (`VcpuHw::apic`).
    let apicv = ApicvFeatures::select(caps, cfg.apicv != Some(false));
    let mut controls = *controls;
    (controls.primary, controls.secondary) = apicv
        .apply(caps, controls.primary, controls.secondary)
        .map_err(|e| alloc::format!("{e}"))?;
    let apic_access = if apicv.virtualize_apic_accesses {
        Some(page()?)
    } else {
        None
    };
    Ok(Setup {
        cfg: cfg.clone(),
        archive,
        caps: *caps,
        controls,
        io_bitmaps: (io_a, io_b),
        msr_bitmap: msr,
        apicv,
        apic_access,
    })
}

struct Overhead {
    vcpus: usize,
    ept_tables: usize,
    /// The APIC-access page and every vCPU's virtual-APIC page and MSR bitmap.
    apic_pages: usize,
    /// Heap bytes: the guest's bookkeeping and device models.
    device_bytes: usize,
}

impl Overhead {
    fn total(&self) -> usize {
        // VMCS and XSAVE area per vCPU, two I/O bitmaps and the MSR bitmap are one page each, and
        // so are the pages of APIC virtualization.
        (2 * self.vcpus + 2 + 1 + self.apic_pages + self.ept_tables) * 4096 + self.device_bytes
    }
}

/// What is fixed for a guest's whole life: where its image comes from and what the CPU allows.
pub struct Setup {
    cfg: GuestConfig,
    archive: Archive<'static>,
    caps: VmxCaps,
    controls: ControlSet,
    io_bitmaps: (mm::OwnedPages, mm::OwnedPages),
    msr_bitmap: mm::OwnedPages,
    /// APIC virtualization for this guest, and its APIC-access page with "virtualize APIC
    /// accesses" (one for all its vCPUs: its EPT maps the xAPIC page there, SDM 30.4).
    apicv: ApicvFeatures,
    apic_access: Option<mm::OwnedPages>,
}

impl Setup {
    /// The APIC-access page all ones, at each boot or restore of the guest: what a vCPU whose
    /// APIC is not in xAPIC mode reads at 0xFEE00000, as the model gives it (stores it made
    /// there in a previous life are gone).
    fn clear_apic_access(&self) {
        if let Some(access) = &self.apic_access {
            // SAFETY: a frame of this guest's `Setup`, mapped at phys_to_virt, that no Rust
            // reference covers; only this guest's EPT maps it (and the CPU reads it only for a
            // vCPU of this guest whose accesses are not virtualized), so nothing else sees it.
            unsafe { core::ptr::write_bytes(mm::phys_to_virt(access.pa()), 0xff, 4096) };
        }
    }
}

impl VmHw {
    /// Allocates everything a guest needs (RAM, EPT, bitmaps, VMCS, save area) and boots it. Each
    /// of them is owned by a value that gives it back when dropped, so when any step fails (the
    /// image is refused, say) the guest keeps nothing.
    fn create(id: u32, setup: Setup, tsc_hz: u64) -> Result<Slot<Self>, String> {
        let heap_before = arch::boot::heap_used();
        let cfg = &setup.cfg;
        // Its RAM comes with its boot (`acquire_ram`): now, or at `start` for autostart = off.
        let ram = GuestRam::none();
        let mut ept =
            Ept::new(Frames, setup.caps.ept_1g_pages()).map_err(|e| alloc::format!("{e}"))?;
        // Dirty flags from the start, for live migration (`ept::Ept::take_dirty`): the EPTP is
        // in every VMCS of the guest, so it is chosen once.
        ept.set_accessed_dirty(setup.caps.ept_accessed_dirty());
        if let Some(access) = &setup.apic_access {
            // The xAPIC page, in this guest's EPT only: its accesses are virtualized or exit
            // (SDM 30.4); the page itself holds all ones.
            ept.map(
                crate::devices::lapic::LAPIC_BASE,
                access.pa(),
                mm::PAGE_SIZE,
                EptPerms::READ | EptPerms::WRITE,
                MemType::WriteBack,
            )
            .map_err(|e| alloc::format!("{e}"))?;
        }
        let mut cpus = Vec::new();
        for _ in 0..cfg.vcpus.max(1) {
            cpus.push(VcpuHw {
                vmcs: VmcsRegion::new(setup.caps.revision_id())
                    .map_err(|e| alloc::format!("{e}"))?,
                saved: SavedState::new().ok_or("out of memory")?,
                apic: VcpuApic::new(&setup)?,
            });
        }
        let board = crate::devices::board::Board::pc(cfg.memory, cfg.vcpus.max(1));
        let mut guest = Vm {
            id,
            name: cfg.name.clone(),
            ram,
            platform: Platform::for_board(board, tsc_hz),
            stats_requested: false,
            tsc_offset: 0,
            clock_seen: 0,
            cpuid: Default::default(),
        };
        // The CPUID answers that depend on nothing the guest changes, computed once.
        let (guest_hz, cpus_n) = (guest.platform.tsc_hz(), guest.platform.cpus() as u32);
        guest.cpuid.fill(&RealHost, guest_hz, cpus_n);
        let mut vcpus: Vec<Vcpu> = (0..cpus.len()).map(|c| Vcpu::new(c, &setup.caps)).collect();
        let access_pa = setup.apic_access.as_ref().map_or(0, |a| a.pa());
        for (vcpu, hw) in vcpus.iter_mut().zip(&cpus) {
            vcpu.apicv = hw.apic.as_ref().map(|p| p.view(setup.apicv, access_pa));
        }
        let vm = Self {
            cpus,
            ept,
            setup,
            ram_block: None,
        };
        let restart_limit = vm.setup.cfg.restart;
        let share = crate::sched::Share {
            weight: vm.setup.cfg.weight,
            cap_percent: vm.setup.cfg.cap,
        };
        let mut slot = Slot::new(guest, vcpus, vm, restart_limit).with_share(share);
        if slot.hw.setup.cfg.autostart {
            slot.hw.boot(&mut slot.vm, &mut slot.vcpus, 0)?;
        } else {
            for v in &mut slot.vcpus {
                v.state = RunState::Stopped(crate::guest::StopReason::NotStarted);
            }
            info!(
                "guest {id} {}: autostart = off: waits for `start` ({} MiB of RAM then)",
                slot.vm.name,
                cfg_memory_mib(&slot.hw.setup.cfg)
            );
        }
        if slot.hw.setup.cfg.refuse {
            // Dropping `vm` gives back everything allocated above, as for any refusal.
            return Err("refused on request (selftest = refuse)".into());
        }
        // The guest's heap share: its device models, buffers and bookkeeping (the `Slot` itself
        // is in the caller's vector and counted by size).
        let heap = arch::boot::heap_used().saturating_sub(heap_before)
            + core::mem::size_of::<Slot<VmHw>>();
        let o = Overhead {
            vcpus: slot.vcpus.len(),
            ept_tables: slot.hw.ept.tables_used(),
            apic_pages: usize::from(slot.hw.setup.apic_access.is_some())
                + slot
                    .hw
                    .cpus
                    .iter()
                    .filter_map(|c| c.apic.as_ref())
                    .map(|p| 1 + usize::from(p.msr_bitmap.is_some()))
                    .sum::<usize>(),
            device_bytes: heap,
        };
        info!(
            "guest {id} {} overhead: {} KiB ({} vCPUs: VMCS 4 and XSAVE 4 each; EPT {} tables, I/O+MSR bitmaps 12, APIC pages {}, devices and bookkeeping {} B)",
            slot.vm.name,
            o.total() >> 10,
            o.vcpus,
            o.ept_tables,
            o.apic_pages * 4,
            o.device_bytes
        );
        if !slot.hw.setup.apicv.any() {
            info!("guest {id} {}: APIC virtualization off", slot.vm.name);
        }
        Ok(slot)
    }

    /// (Re)starts the guest from its image: fresh RAM contents, devices, registers and VMCS.
    /// `restarts` counts its earlier deaths.
    fn boot(&mut self, g: &mut Vm, vcpus: &mut [Vcpu], restarts: u32) -> Result<(), String> {
        self.whole_ram(g)?;
        let setup = &self.setup;
        let mut cfg = setup.cfg.clone();
        if restarts > 0 {
            // The manifest parser checked that the last restart's command line fits the loaders.
            cfg.cmdline = manifest::restart_cmdline(&cfg.cmdline, restarts);
        }
        let archive = setup.archive;
        let image = archive
            .get(&cfg.image)
            .ok_or_else(|| alloc::format!("image {} is not in the ramdisk", cfg.image))?;
        if cfg.kind == manifest::GuestKind::Snapshot {
            // Restored rather than booted (a restart restores it again): it goes on from its
            // snapshot, its clock too.
            let offsetting = setup.controls.primary & PrimaryControls::USE_TSC_OFFSETTING.bits();
            let clock = self.restore_snapshot(g, vcpus, image)?;
            if offsetting != 0 {
                g.tsc_offset = clock.wrapping_sub(cpu::rdtsc());
            }
            g.clock_seen = clock;
            return Ok(());
        }
        let mut modules = Vec::new();
        for m in &cfg.modules {
            let data = setup
                .archive
                .get(manifest::module_file(m))
                .ok_or_else(|| alloc::format!("module {m} is not in the ramdisk"))?;
            modules.push((m.as_str(), data));
        }
        g.ram.bytes().fill(0);
        let req = LoadRequest {
            cfg: &cfg,
            image,
            modules: &modules,
            guest_id: g.id,
        };
        let st = loader::load(g.ram.bytes(), &req).map_err(|e| alloc::format!("{e}"))?;
        if matches!(
            cfg.kind,
            manifest::GuestKind::Multiboot | manifest::GuestKind::Linux
        ) {
            // What QEMU's firmware leaves for a multiboot kernel, and what Linux reads through
            // boot_params.acpi_rsdp_addr: ACPI tables in the BIOS area, which both memory maps
            // reserve (multiboot 0xA0000-0x100000, Linux's e820 0x90000-0x100000).
            crate::acpi::install(g.ram.bytes(), g.platform.board())
                .map_err(|e| alloc::format!("{e}"))?;
        }

        g.clock_seen = 0;
        g.tsc_offset = if setup.controls.primary & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0 {
            0u64.wrapping_sub(cpu::rdtsc())
        } else {
            0
        };
        g.platform = Platform::for_board(g.platform.board().clone(), g.platform.tsc_hz());
        setup.clear_apic_access();
        let id = g.id;
        let eptp = self.ept.eptp();
        for (c, (hw, vcpu)) in self.cpus.iter_mut().zip(vcpus.iter_mut()).enumerate() {
            let mut v = fresh_vmcs(hw, setup, eptp, id, c)?;
            vcpu.reset();
            if let Some(a) = &mut vcpu.apicv {
                // Power-on: TPR 0 in the model (`g.platform`, made afresh above) and in VTPR.
                a.reset();
                a.write_fields(&mut v);
            }
            if c == 0 {
                vcpu::write_guest_state(&mut v, &st, &vcpu.cr0_rules, &vcpu.cr4_rules);
                vcpu.regs = GuestRegs {
                    rax: st.rax,
                    rbx: st.rbx,
                    rcx: st.rcx,
                    rdx: st.rdx,
                    rsi: st.rsi,
                    rdi: st.rdi,
                    ..Default::default()
                };
            } else {
                // An application processor waits for its SIPI (SDM 8.4.1), which writes its
                // guest state (`runloop`); meanwhile it holds the INIT state.
                let init = loader::InitialState::startup_ipi(0);
                vcpu::write_guest_state(&mut v, &init, &vcpu.cr0_rules, &vcpu.cr4_rules);
                vcpu.state = RunState::WaitForSipi;
            }
            v.write(
                crate::vmx::Control64::TscOffset,
                vcpu.vmcs_tsc_offset(g.tsc_offset),
            );
            drop(v);
            hw.saved.reset();
        }
        info!(
            "guest {id} {}: {:?} {} KiB image, {} MiB RAM at {:#x}, {} vCPU{}, entry {:?} mode at {:#x}{}",
            cfg.name,
            cfg.kind,
            image.len() >> 10,
            cfg.memory >> 20,
            g.ram.hpa,
            vcpus.len(),
            if vcpus.len() == 1 { "" } else { "s" },
            st.mode,
            st.rip,
            if restarts > 0 {
                alloc::format!(" (restart {restarts})")
            } else {
                String::new()
            }
        );
        Ok(())
    }
}

fn cfg_memory_mib(cfg: &GuestConfig) -> u64 {
    cfg.memory >> 20
}

impl VmHw {
    /// The INVEPT that drops what the processor cached under `eptp` (SDM 29.4.3.1), after RAM
    /// left this guest's EPT.
    fn invalidate_ept(&self, eptp: u64) -> Result<(), String> {
        if let Some(inv) = self.flush_policy().for_ept(eptp) {
            vmx::invalidate(&inv).map_err(|e| alloc::format!("{inv} failed: {e}"))?;
        }
        Ok(())
    }

    /// The INVVPID that drops what this CPU cached under `vpid` (linear and combined mappings,
    /// SDM 29.4.3.1), before a vCPU that ran on another CPU since runs here again. Nothing
    /// when the guest runs without VPIDs: every VM entry and exit then invalidates them.
    fn invalidate_vpid(&self, vpid: u16) -> Result<(), String> {
        if let Some(inv) = self.flush_policy().for_vpid(vpid) {
            vmx::invalidate(&inv).map_err(|e| alloc::format!("{inv} failed: {e}"))?;
        }
        Ok(())
    }

    /// Which INVEPT and INVVPID types this guest's controls and the processor allow.
    fn flush_policy(&self) -> FlushPolicy {
        let secondary = SecondaryControls::from_bits_retain(self.setup.controls.secondary);
        FlushPolicy::new(
            &self.setup.caps,
            secondary.contains(SecondaryControls::ENABLE_EPT),
            secondary.contains(SecondaryControls::ENABLE_VPID),
        )
    }

    /// Makes the guest's RAM one whole block of its own, for a boot or a restore: a guest that
    /// gave pages back (they may be another guest's now) gets a fresh block, as one that has none
    /// yet (never started, or killed). Its balloon starts again from nothing.
    fn whole_ram(&mut self, g: &mut Vm) -> Result<(), String> {
        if self.ram_block.is_some() && !g.ram.balloon.is_pristine() {
            self.release_ram(g)?;
        }
        if self.ram_block.is_none() {
            self.acquire_ram(g)?;
        }
        g.ram.balloon.target = 0;
        g.ram.balloon.round = Default::default();
        Ok(())
    }

    /// Gives the guest a block of RAM of its size, mapped in its EPT, or says why not: "not
    /// enough memory: need X, free Y" (Y may be X or more, in pieces too small: a guest's RAM is
    /// one 2 MiB-aligned block).
    fn acquire_ram(&mut self, g: &mut Vm) -> Result<(), String> {
        const ALIGN: u64 = 2 << 20;
        let size = self.setup.cfg.memory;
        let block = mm::OwnedPages::alloc(size, ALIGN).ok_or_else(|| {
            let f = mm::FRAMES.lock();
            let (free, largest) = (f.free_bytes(), f.largest_block(ALIGN));
            let mut why = alloc::format!(
                "not enough memory: need {} MiB, free {} MiB",
                size >> 20,
                free >> 20
            );
            if free >= size {
                why.push_str(&alloc::format!(
                    " (the largest 2 MiB-aligned block is {} MiB)",
                    largest >> 20
                ));
            }
            why
        })?;
        let hpa = block.pa();
        self.ept
            .map(0, hpa, size, EptPerms::RWX, MemType::WriteBack)
            .map_err(|e| alloc::format!("{e}"))?;
        // SAFETY: the block was just allocated for this guest alone and is mapped at
        // phys_to_virt; the guest owns it until `release_ram`.
        let mem = unsafe { core::slice::from_raw_parts_mut(mm::phys_to_virt(hpa), size as usize) };
        // SAFETY: as above.
        g.ram = unsafe { GuestRam::new(mem, hpa) };
        self.ram_block = Some(block);
        Ok(())
    }

    /// Gives the guest's RAM back to the pool: what it has of its block and the frames of pages
    /// it took back elsewhere (`balloon::release`). Its EPT maps no RAM afterwards and the
    /// processor holds no translation of it; `g.ram` is empty.
    fn release_ram(&mut self, g: &mut Vm) -> Result<(), String> {
        let Some(block) = self.ram_block.take() else {
            return Ok(());
        };
        match crate::balloon::release(&mut g.ram, &mut self.ept, &mut FramePool) {
            Ok(stale) => {
                // `balloon::release` freed the block, in the parts the guest still had.
                let _ = block.into_raw();
                g.ram = GuestRam::none();
                match stale {
                    Some(s) => self.invalidate_ept(s.eptp),
                    None => Ok(()),
                }
            }
            Err(e) => {
                // Its EPT still maps the RAM: the block stays the guest's (not reused).
                self.ram_block = Some(block);
                Err(alloc::format!(
                    "its RAM cannot be unmapped ({e}); it stays allocated"
                ))
            }
        }
    }
}

/// Stops every vCPU of a guest a restore left unable to run, with the reason; returns it.
fn restore_failed(vcpus: &mut [Vcpu], e: String) -> String {
    for v in vcpus.iter_mut() {
        v.state = RunState::Stopped(StopReason::Killed(alloc::format!("restore failed: {e}")));
    }
    e
}

/// Clears vCPU `c`'s VMCS and loads it with Keel's controls and host state, for a guest booting
/// or being restored (guest `id`, EPT pointer `eptp`).
fn fresh_vmcs<'a>(
    hw: &'a mut VcpuHw,
    setup: &Setup,
    eptp: u64,
    id: u32,
    c: usize,
) -> Result<LoadedVmcs<'a>, String> {
    let secondary = SecondaryControls::from_bits_retain(setup.controls.secondary);
    let policy = FlushPolicy::new(
        &setup.caps,
        secondary.contains(SecondaryControls::ENABLE_EPT),
        secondary.contains(SecondaryControls::ENABLE_VPID),
    );
    // A VMCS that cannot be cleared or loaded ends this guest (the caller reports why), not Keel.
    hw.vmcs.clear().map_err(|e| alloc::format!("{e}"))?;
    let mut v = hw.vmcs.load().map_err(|e| alloc::format!("{e}"))?;
    let vpid = vcpu_vpid(id, c);
    // The vCPU's own MSR bitmap with x2APIC virtualization, else the guest's.
    let msr_bitmap = match hw.apic.as_ref().and_then(|a| a.msr_bitmap.as_ref()) {
        Some(b) => b.pa(),
        None => setup.msr_bitmap.pa(),
    };
    vcpu::write_controls(
        &mut v,
        &setup.controls,
        (setup.io_bitmaps.0.pa(), setup.io_bitmaps.1.pa()),
        msr_bitmap,
        eptp,
        vpid,
    );
    // Nothing cached under this guest's EPTP or its vCPUs' VPIDs may outlive its previous life or
    // another guest's use of the same tags (vmx::invalidate).
    for inv in policy.at_guest_boot(eptp, vpid) {
        vmx::invalidate(&inv).map_err(|e| alloc::format!("{inv} failed: {e}"))?;
    }
    arch::vmcs::write_host_state(&mut v);
    Ok(v)
}

/// Where this CPU keeps each extended-state component (CPUID.(EAX=0DH,ECX=i), SDM 13.2), of those
/// guests may enable.
fn xsave_layout() -> XsaveLayout {
    if !cpu::has_xsave() {
        return XsaveLayout {
            xsave: false,
            supported: 0b11,
            components: Vec::new(),
        };
    }
    let supported = cpu::xcr0_supported() & !exits::cpuid::XCR0_HIDDEN;
    let components = (2..64u32)
        .filter(|c| supported & (1 << c) != 0)
        .map(|c| {
            let [size, offset, _, _] = cpu::cpuid(0xd, c);
            (c as u8, offset, size)
        })
        .collect();
    XsaveLayout {
        xsave: true,
        supported,
        components,
    }
}

impl VmHw {
    /// What the guest sees of this CPU (`snapshot::fingerprint`).
    fn fingerprint(&self, vcpus: usize) -> Fingerprint {
        snapshot::fingerprint(
            &RealHost,
            self.setup.controls.primary,
            self.setup.controls.secondary,
            vcpus as u32,
            xsave_layout(),
        )
    }

    /// The guest's snapshot (`snapshot::write`): every vCPU, its platform and RAM, and its
    /// `clock` (guest time when it stopped). Its vCPUs must be switched out (their registers in
    /// their `SavedState`s) and not run meanwhile.
    fn snapshot(&mut self, vm: &Vm, vcpus: &[Vcpu], clock: u64) -> Result<Vec<u8>, String> {
        let states = self.capture(vcpus)?;
        let mut platform = crate::state::Writer::new();
        vm.platform.save(&mut platform);
        // The stream is held in Keel's heap: its size is known before it is made.
        let mut page = [0u8; snapshot::PAGE_SIZE];
        let pages = (0..vm.ram.len() / snapshot::PAGE_SIZE as u64)
            .filter(|n| {
                vm.ram
                    .read(n * snapshot::PAGE_SIZE as u64, &mut page)
                    .is_some()
                    && page.iter().any(|&b| b != 0)
            })
            .count();
        let mut vcpu_bytes = crate::state::Writer::new();
        states.iter().for_each(|s| s.save(&mut vcpu_bytes));
        let state = platform.bytes().len() + vcpu_bytes.bytes().len();
        let size = snapshot::estimate(pages, state);
        if size > snapshot::STREAM_MAX {
            return Err(alloc::format!(
                "{}",
                snapshot::SnapshotError::TooLarge {
                    size,
                    max: snapshot::STREAM_MAX
                }
            ));
        }
        let guest = self.guest_info(vm, vcpus.len(), clock);
        Ok(snapshot::write(
            env!("CARGO_PKG_VERSION"),
            &self.fingerprint(vcpus.len()),
            &guest,
            |gpa, page| {
                if vm.ram.read(gpa, page).is_none() {
                    page.fill(0);
                }
            },
            platform.bytes(),
            &states,
            size,
        ))
    }

    /// Every vCPU's state (switched out, not running meanwhile).
    fn capture(&mut self, vcpus: &[Vcpu]) -> Result<Vec<VcpuState>, String> {
        let layout = xsave_layout();
        let mut states = Vec::new();
        for (hw, vcpu) in self.cpus.iter_mut().zip(vcpus) {
            let switched = hw.saved.switched();
            let v = hw.vmcs.load().map_err(|e| alloc::format!("{e}"))?;
            let state = VcpuState::capture(&v, vcpu, &switched, hw.saved.area(), &layout)
                .ok_or("the guest has stopped")?;
            states.push(state);
        }
        Ok(states)
    }

    /// The guest as a snapshot describes it, with its clock `clock`.
    fn guest_info(&self, vm: &Vm, vcpus: usize, clock: u64) -> GuestInfo {
        let cfg = &self.setup.cfg;
        GuestInfo {
            name: cfg.name.clone(),
            kind: alloc::format!("{:?}", cfg.kind).to_lowercase(),
            memory: cfg.memory,
            vcpus: vcpus as u32,
            tsc_hz: vm.platform.tsc_hz(),
            clock,
        }
    }

    /// Live migration's dirty tracking (`runloop::migrate::MigrateHw::dirty_pages`): the guest's
    /// RAM is split to 4 KiB EPT pages when a migration begins (its 2 MiB pages would make every
    /// write dirty 512 pages) and stays split until the migration ends with the guest still here
    /// ([`VmHw::end_tracking`] merges it back); each collection clears
    /// the flags it read and invalidates the EPT, so the processor walks the tables (and sets
    /// the flags) again on the next write (SDM 29.3.5, 29.4.3.1).
    fn dirty_pages(
        &mut self,
        vm: &Vm,
        dirty: &mut crate::migrate::PageSet,
        begin: bool,
    ) -> Result<(), String> {
        if !self.ept.accessed_dirty() {
            return Err("this CPU's EPT has no accessed and dirty flags (IA32_VMX_EPT_VPID_CAP bit 21): live migration is not possible here".into());
        }
        let len = vm.ram.len();
        if len == 0 {
            return Err("the guest has no RAM".into());
        }
        let fmt = |e: crate::ept::EptError| alloc::format!("{e}");
        if begin {
            let _split = self.ept.split_to_4k(0, len).map_err(fmt)?;
        }
        let page = snapshot::PAGE_SIZE as u64;
        let stale = self
            .ept
            .take_dirty(0, len, &mut |gpa| {
                if !begin {
                    dirty.insert(gpa / page);
                }
            })
            .map_err(fmt)?;
        self.invalidate_ept(stale.eptp)
    }

    /// The end of a migration that left the guest here (`MigrateHw::end_tracking`): the page
    /// tables the split made go where all 512 entries still map a 2 MiB block alike (a page the
    /// balloon took keeps its split), then INVEPT, then the old tables back to the pool (no
    /// cached entry may lead into them once they serve something else, SDM 29.4.3.1).
    fn end_tracking(&mut self, vm: &Vm) -> Result<u64, String> {
        let len = vm.ram.len();
        if len == 0 {
            return Ok(0);
        }
        let merged = self
            .ept
            .merge_to_2m(0, len)
            .map_err(|e| alloc::format!("{e}"))?;
        self.invalidate_ept(merged.stale.eptp)?;
        self.ept.free_retired();
        Ok(merged.pages)
    }

    /// Replaces the guest by the one in `stream` (`snapshot::parse`): its RAM, platform and every
    /// vCPU, with Keel's controls and host state written afresh. Everything is checked before
    /// anything changes, so a refused snapshot leaves the guest as it was. Returns the guest's
    /// clock at the snapshot (the caller sets the guest's TSC offset from it); the vCPUs' run
    /// states are the snapshot's.
    fn restore_snapshot(
        &mut self,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        stream: &[u8],
    ) -> Result<u64, String> {
        self.restore(vm, vcpus, stream, false)
    }

    /// [`VmHw::restore_snapshot`]; with `keep_ram`, the guest's RAM is left as it is (a live
    /// migration wrote it, the stream has no pages).
    fn restore(
        &mut self,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        stream: &[u8],
        keep_ram: bool,
    ) -> Result<u64, String> {
        let here = self.fingerprint(vcpus.len());
        let snap = snapshot::parse(stream, &here).map_err(|e| alloc::format!("{e}"))?;
        let cfg = &self.setup.cfg;
        if snap.guest.memory != cfg.memory {
            return Err(alloc::format!(
                "{}",
                snapshot::SnapshotError::MemoryMismatch {
                    snapshot: snap.guest.memory,
                    guest: cfg.memory
                }
            ));
        }
        if snap.guest.vcpus as usize != vcpus.len() {
            return Err(alloc::format!(
                "{}",
                snapshot::SnapshotError::VcpusMismatch {
                    snapshot: snap.guest.vcpus,
                    guest: vcpus.len() as u32
                }
            ));
        }
        let env = CpuEnv {
            xsave: here.xsave.clone(),
            spec_ctrl_bits: exits::msr::spec_ctrl_bits(
                here.cpuid
                    .iter()
                    .find(|e| (e.0, e.1) == (7, 0))
                    .map_or(0, |e| e.2[3]),
            ),
            cr_masks: (vcpus[0].cr0_rules.mask(), vcpus[0].cr4_rules.mask()),
        };
        for state in &snap.vcpus {
            state.check(&env).map_err(|e| alloc::format!("{e}"))?;
        }
        let mut platform = Platform::for_board(vm.platform.board().clone(), snap.guest.tsc_hz);
        platform
            .restore(&mut crate::state::Reader::new(snap.platform))
            .map_err(|e| alloc::format!("{e}"))?;
        // Checked whole: the guest is replaced from here on. Its RAM is one whole block again
        // (a killed guest has none; one that ballooned gets a fresh one).
        if keep_ram {
            if self.ram_block.is_none() {
                return Err(restore_failed(vcpus, "the guest has no RAM".into()));
            }
        } else if let Err(e) = self.whole_ram(vm) {
            // Its RAM went back to the pool and no block could be had: it cannot run. (If its
            // RAM could not be unmapped, it still has it and runs on as it was.)
            return Err(match self.ram_block {
                None => restore_failed(vcpus, e),
                Some(_) => e,
            });
        }
        if !keep_ram {
            vm.ram.bytes().fill(0);
        }
        for (gpa, data) in &snap.pages {
            vm.ram.write(*gpa, data);
        }
        *platform.console() = core::mem::take(vm.platform.console());
        vm.platform = platform;
        let (id, eptp) = (vm.id, self.ept.eptp());
        self.setup.clear_apic_access();
        // A guest half replaced cannot go on.
        self.load_vcpus(vm, vcpus, &snap.vcpus, id, eptp)
            .map_err(|e| restore_failed(vcpus, e))?;
        info!(
            "guest {id} {}: restored from a snapshot of {} ({} KiB, {} pages of RAM, Keel {})",
            vm.name,
            snap.guest.name,
            stream.len() >> 10,
            snap.pages.len(),
            snap.keel_version
        );
        Ok(snap.guest.clock)
    }

    /// Each vCPU's VMCS afresh with its state from `states` (checked), for `restore_snapshot`.
    fn load_vcpus(
        &mut self,
        vm: &Vm,
        vcpus: &mut [Vcpu],
        states: &[VcpuState],
        id: u32,
        eptp: u64,
    ) -> Result<(), String> {
        for (c, ((hw, vcpu), state)) in self
            .cpus
            .iter_mut()
            .zip(vcpus.iter_mut())
            .zip(states)
            .enumerate()
        {
            vcpu.reset();
            let mut switched = SwitchedRegs::default();
            let area = {
                let mut v = fresh_vmcs(hw, &self.setup, eptp, id, c)?;
                if let Some(a) = &mut vcpu.apicv {
                    // VTPR from the restored model; the threshold and the xAPIC-page control
                    // follow at the first entry (`exits::apicv::before_entry`).
                    a.reset();
                    a.set_vtpr(vm.platform.tpr(c));
                    a.write_fields(&mut v);
                }
                v.write(crate::vmx::Guest64::VmcsLinkPointer, u64::MAX);
                let mut area = [0u8; 4096];
                state.apply(&mut v, vcpu, &mut switched, &mut area);
                area
            };
            hw.saved.set_switched(&switched);
            hw.saved.area().copy_from_slice(&area);
        }
        Ok(())
    }
}

/// Gives the CPU the running guest's IA32_SPEC_CTRL (a guest's IBRS, STIBP or SSBD must hold
/// while it runs, and not be left to the next guest to read). The guest's writes exit
/// (`exits::msr`); Keel runs with the value of the guest it last ran.
fn load_spec_ctrl(loaded: &mut u64, value: u64) {
    if *loaded != value {
        // SAFETY: `exits::msr` accepts only bits this CPU enumerates in CPUID.7.EDX, so the MSR
        // exists and takes the value; Keel's own code does not depend on it.
        unsafe { cpu::wrmsr(exits::msr::index::SPEC_CTRL, value) };
        *loaded = value;
    }
}

impl Runner {
    /// Adds a guest while the others run: it is scheduled from the next pick on.
    pub fn add_guest(&mut self, setup: Setup, tsc_hz: u64) -> Result<u32, String> {
        // Past every id in use: guests refused at boot leave gaps, so `slots.len()` could repeat
        // an id (and with it a VPID).
        let id = self.slots.iter().map(|s| s.vm.id + 1).max().unwrap_or(0);
        // `create` makes the new guest's VMCS current: the guest whose state is in the CPU now
        // is switched out first, so its extended state and MSRs are kept.
        self.switch_out();
        let slot = VmHw::create(id, setup, tsc_hz)?;
        self.slots.push(slot);
        Ok(id)
    }
}

fn report_cpu() {
    let id = raw_cpuid::CpuId::new();
    let vendor = id.get_vendor_info();
    let brand = id.get_processor_brand_string();
    let (family, model) = id
        .get_feature_info()
        .map(|f| (f.family_id(), f.model_id()))
        .unwrap_or((0, 0));
    info!(
        "CPU {} {} family {family:#x} model {model:#x}",
        vendor.as_ref().map(|v| v.as_str()).unwrap_or("?"),
        brand.as_ref().map(|b| b.as_str().trim()).unwrap_or("")
    );
}
