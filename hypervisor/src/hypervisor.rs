//! The top of Keel on real hardware: bring the CPU into VMX operation, build the guests the ramdisk
//! asks for and run them until they have all ended.

use crate::arch::host::{Frames, RealHost};
use crate::arch::vmcs::{CurrentVmcs, VmcsRegion};
use crate::arch::{self, cpu, lapic, vmx, ExitCode};
use crate::archive::{self, Archive};
use crate::devices::console::ConsoleLine;
use crate::devices::Platform;
use crate::ept::{Ept, EptPerms, MemType};
use crate::exits::{self, Action, ExitContext};
use crate::focus::{Focus, Key};
use crate::guest::{Guest, GuestRam, GuestRegs, GuestStats, RunState, StopReason};
use crate::loader::{self, LoadRequest};
use crate::log::Writer;
use crate::machine::MachineInfo;
use crate::manifest::{self, GuestConfig};
use crate::mm;
use crate::sched::RoundRobin;
use crate::vcpu::{self, ControlSet};
use crate::vmx::controls::{PrimaryControls, SecondaryControls};
use crate::vmx::cr::GuestCr;
use crate::vmx::invalidate::guest_vpid;
use crate::vmx::{ExitReason, FlushPolicy, Guest32, Vmcs, VmxCaps};
use crate::{error, fatal, info};
use alloc::string::String;
use alloc::vec::Vec;

/// A guest's own timers may bring it back to Keel at most this often: every 1/20000 s (50 us).
const MIN_TIMER_GAP_DIVISOR: u64 = 20_000;

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
    let mut vms = Vec::new();
    for (id, cfg) in manifest.guests.iter().enumerate() {
        let setup = match guest_setup(cfg, archive, &caps, &controls) {
            Ok(s) => s,
            Err(e) => {
                error!("guest {}: not started: {e}", cfg.name);
                continue;
            }
        };
        match Vm::create(id as u32, setup, cal.tsc_hz) {
            Ok(vm) => vms.push(vm),
            Err(e) => error!("guest {}: not started: {e}", cfg.name),
        }
    }
    if vms.is_empty() {
        fatal!("no guest could be started");
        arch::exit(ExitCode::NoGuests)
    }
    let quantum = cal.tsc_hz * manifest.quantum_ms as u64 / 1000;
    info!(
        "running {} guests, quantum {} ms ({} TSC cycles)",
        vms.len(),
        manifest.quantum_ms,
        quantum
    );
    let vms_len = vms.len();
    let mut runner = Runner {
        vms,
        sched: RoundRobin::new(quantum),
        loaded: None,
        caps,
        controls,
        cal,
        spec_ctrl: 0,
        focus: Focus::new(vms_len),
    };
    crate::log::set_guests_running(runner.vms.len());
    runner.run();
    crate::log::set_guests_running(0);
    runner.report();
    arch::exit(ExitCode::Completed)
}

/// One guest on the hardware: its VMCS and the structures the VMCS points to, plus the
/// hardware-independent [`Guest`].
pub struct Vm {
    guest: Guest,
    vmcs: VmcsRegion,
    launched: bool,
    ept: Ept<Frames>,
    /// Register state that VMX does not switch, saved while another guest runs.
    saved: SavedState,
    /// Host TSC since which the guest has been runnable but waiting for the CPU. Its clock does
    /// not advance meanwhile: when it runs again, the wait is taken out of its TSC offset, so its
    /// timers keep their programmed rate in its own time and no ticks pile up while others run.
    /// Time spent halted does pass (the guest asked to wait). docs/ARCHITECTURE.md, "Time".
    waiting_since: Option<u64>,
    setup: Setup,
    /// Host TSC at which the guest executed HLT (for its halted-time account).
    halted_since: Option<u64>,
    /// What was left of its time slice when a woken guest cut it short.
    slice_left: Option<u64>,
    /// How many times the guest has been restarted after dying (manifest key `restart`).
    restarts: u32,
    /// Woken from HLT by an interrupt and not run since: scheduled ahead of the rotation, so a
    /// timer interrupt reaches a waiting guest within its period even while others compute.
    woken: bool,
    /// The guest's RAM (`guest.ram` views it). Last, so it is given back after everything that
    /// refers to it when a `Vm` is dropped (a guest refused at boot).
    ram_block: mm::OwnedPages,
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
    fn save(&mut self) {
        if cpu::has_xsave() {
            let all = cpu::xcr0_supported();
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
        for (slot, &msr) in self.msrs.iter_mut().zip(SWITCHED_MSRS.iter()) {
            *slot = cpu::rdmsr(msr);
        }
        self.cr2 = cpu::read_cr2();
        self.debug = cpu::read_debug_registers();
    }

    fn restore(&self, xcr0: u64) {
        if cpu::has_xsave() {
            let all = cpu::xcr0_supported();
            // SAFETY: the area was written by `save` or is zeroed (every component then takes
            // its init state); the guest's XCR0 was validated by the XSETBV handler (or is the
            // x87-only power-on value).
            unsafe {
                cpu::xsetbv0(all);
                cpu::xrstor(mm::phys_to_virt(self.xsave_pa), all);
                cpu::xsetbv0(xcr0);
            }
        } else {
            // SAFETY: a zeroed FXSAVE image has MXCSR = 0, a valid value; otherwise `save` wrote it.
            unsafe { cpu::fxrstor(mm::phys_to_virt(self.xsave_pa)) };
        }
        for (&v, &msr) in self.msrs.iter().zip(SWITCHED_MSRS.iter()) {
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
    Ok(Setup {
        cfg: cfg.clone(),
        archive,
        caps: *caps,
        controls: *controls,
        io_bitmaps: (io_a, io_b),
        msr_bitmap: msr,
    })
}

struct Overhead {
    ept_tables: usize,
    /// Heap bytes: the guest's bookkeeping and device models.
    device_bytes: usize,
}

impl Overhead {
    fn total(&self) -> usize {
        // VMCS, two I/O bitmaps, the MSR bitmap and the XSAVE area are one page each.
        (1 + 2 + 1 + 1 + self.ept_tables) * 4096 + self.device_bytes
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
}

impl Vm {
    /// Allocates everything a guest needs (RAM, EPT, bitmaps, VMCS, save area) and boots it. Each
    /// of them is owned by a value that gives it back when dropped, so when any step fails (the
    /// image is refused, say) the guest keeps nothing.
    fn create(id: u32, setup: Setup, tsc_hz: u64) -> Result<Self, String> {
        let heap_before = arch::boot::heap_used();
        let cfg = &setup.cfg;
        let ram_block = mm::OwnedPages::alloc(cfg.memory, 2 << 20)
            .ok_or_else(|| alloc::format!("no {} MiB of RAM left", cfg.memory >> 20))?;
        let hpa = ram_block.pa();
        // SAFETY: the block was just allocated for this guest alone and is mapped at phys_to_virt.
        let mem =
            unsafe { core::slice::from_raw_parts_mut(mm::phys_to_virt(hpa), cfg.memory as usize) };
        // SAFETY: as above: the guest owns the block until it is destroyed.
        let ram = unsafe { GuestRam::new(mem, hpa) };
        let mut ept =
            Ept::new(Frames, setup.caps.ept_1g_pages()).map_err(|e| alloc::format!("{e}"))?;
        ept.map(
            0,
            hpa,
            cfg.memory,
            EptPerms::READ | EptPerms::WRITE | EptPerms::EXECUTE,
            MemType::WriteBack,
        )
        .map_err(|e| alloc::format!("{e}"))?;
        let vmcs = VmcsRegion::new(setup.caps.revision_id()).map_err(|e| alloc::format!("{e}"))?;
        let saved = SavedState::new().ok_or("out of memory")?;
        let guest = Guest {
            id,
            name: cfg.name.clone(),
            ram,
            platform: Platform::for_board(crate::devices::board::Board::pc(cfg.memory, 1), tsc_hz),
            regs: GuestRegs::default(),
            state: RunState::Runnable,
            stats: GuestStats::default(),
            cr0_rules: GuestCr::cr0(&setup.caps, true),
            cr4_rules: GuestCr::cr4(&setup.caps),
            misc_enable: exits::msr::MISC_ENABLE_DEFAULT,
            mtrr_def_type: 0,
            xcr0: 1,
            stats_requested: false,
            tsc_offset: 0,
            events: Default::default(),
            tsc_adjust: 0,
            spec_ctrl: 0,
        };
        let mut vm = Self {
            guest,
            vmcs,
            launched: false,
            ept,
            saved,
            waiting_since: None,
            woken: false,
            setup,
            slice_left: None,
            halted_since: None,
            restarts: 0,
            ram_block,
        };
        vm.boot()?;
        if vm.setup.cfg.refuse {
            // Dropping `vm` gives back everything allocated above, as for any refusal.
            return Err("refused on request (selftest = refuse)".into());
        }
        // The guest's heap share: its device models, buffers and bookkeeping (the `Vm` itself is
        // in the caller's vector and counted by size).
        let heap = arch::boot::heap_used().saturating_sub(heap_before) + core::mem::size_of::<Vm>();
        let o = Overhead {
            ept_tables: vm.ept.tables_used(),
            device_bytes: heap,
        };
        info!(
            "guest {id} {} overhead: {} KiB (VMCS 4, EPT {} tables, I/O+MSR bitmaps 12, XSAVE 4, devices and bookkeeping {} B)",
            vm.guest.name,
            o.total() >> 10,
            o.ept_tables,
            o.device_bytes
        );
        Ok(vm)
    }

    /// (Re)starts the guest from its image: fresh RAM contents, devices, registers and VMCS.
    /// Leaves this guest's VMCS current on the CPU.
    fn boot(&mut self) -> Result<(), String> {
        let setup = &self.setup;
        let mut cfg = setup.cfg.clone();
        if self.restarts > 0 {
            // The manifest parser checked that the last restart's command line fits the loaders.
            cfg.cmdline = manifest::restart_cmdline(&cfg.cmdline, self.restarts);
        }
        let image = setup
            .archive
            .get(&cfg.image)
            .ok_or_else(|| alloc::format!("image {} is not in the ramdisk", cfg.image))?;
        let mut modules = Vec::new();
        for m in &cfg.modules {
            let data = setup
                .archive
                .get(manifest::module_file(m))
                .ok_or_else(|| alloc::format!("module {m} is not in the ramdisk"))?;
            modules.push((m.as_str(), data));
        }
        let g = &mut self.guest;
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

        // A VMCS that cannot be cleared or loaded ends this guest (the caller reports why), not
        // Keel.
        self.vmcs.clear().map_err(|e| alloc::format!("{e}"))?;
        self.vmcs.load().map_err(|e| alloc::format!("{e}"))?;
        self.launched = false;
        let mut v = CurrentVmcs;
        let id = g.id;
        let vpid = guest_vpid(id);
        let eptp = self.ept.eptp();
        vcpu::write_controls(
            &mut v,
            &setup.controls,
            (setup.io_bitmaps.0.pa(), setup.io_bitmaps.1.pa()),
            setup.msr_bitmap.pa(),
            eptp,
            vpid,
        );
        // Nothing cached under this guest's EPTP or VPID may outlive its previous life or another
        // guest's use of the same tags (vmx::invalidate).
        let secondary = SecondaryControls::from_bits_retain(setup.controls.secondary);
        let policy = FlushPolicy::new(
            &setup.caps,
            secondary.contains(SecondaryControls::ENABLE_EPT),
            secondary.contains(SecondaryControls::ENABLE_VPID),
        );
        for inv in policy.at_guest_boot(eptp, vpid) {
            vmx::invalidate(&inv).map_err(|e| alloc::format!("{inv} failed: {e}"))?;
        }
        arch::vmcs::write_host_state(&mut v);
        vcpu::write_guest_state(&mut v, &st, &g.cr0_rules, &g.cr4_rules);
        g.tsc_offset = if setup.controls.primary & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0 {
            0u64.wrapping_sub(cpu::rdtsc())
        } else {
            0
        };
        g.tsc_adjust = 0;
        g.spec_ctrl = 0;
        v.write(crate::vmx::Control64::TscOffset, g.vmcs_tsc_offset());
        g.regs = GuestRegs {
            rax: st.rax,
            rbx: st.rbx,
            rcx: st.rcx,
            rdx: st.rdx,
            rsi: st.rsi,
            rdi: st.rdi,
            ..Default::default()
        };
        g.platform = Platform::for_board(g.platform.board().clone(), g.platform.tsc_hz());
        g.state = RunState::Runnable;
        g.misc_enable = exits::msr::MISC_ENABLE_DEFAULT;
        g.mtrr_def_type = 0;
        g.xcr0 = 1;
        g.events = Default::default();
        self.saved.reset();
        self.waiting_since = None;
        info!(
            "guest {id} {}: {:?} {} KiB image, {} MiB RAM at {:#x}, entry {:?} mode at {:#x}{}",
            cfg.name,
            cfg.kind,
            image.len() >> 10,
            cfg.memory >> 20,
            self.ram_block.pa(),
            st.mode,
            st.rip,
            if self.restarts > 0 {
                alloc::format!(" (restart {})", self.restarts)
            } else {
                String::new()
            }
        );
        Ok(())
    }
}

pub struct Runner {
    vms: Vec<Vm>,
    sched: RoundRobin,
    /// Index of the VMCS currently loaded on the CPU.
    loaded: Option<usize>,
    caps: VmxCaps,
    controls: ControlSet,
    cal: lapic::Calibration,
    /// What Keel last wrote to the real IA32_SPEC_CTRL (0, its reset value, until a guest sets it).
    spec_ctrl: u64,
    /// Which guest gets the bytes typed on COM1.
    focus: Focus,
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
        // Past every id in use: guests refused at boot leave gaps, so `vms.len()` could repeat
        // an id (and with it a VPID).
        let id = self.vms.iter().map(|vm| vm.guest.id + 1).max().unwrap_or(0);
        // `create` makes the new guest's VMCS current: the guest whose state is in the CPU now
        // is switched out first, so its extended state and MSRs are kept.
        if let Some(prev) = self.loaded.take() {
            let p = &mut self.vms[prev];
            p.saved.save();
        }
        let vm = Vm::create(id, setup, tsc_hz)?;
        self.vms.push(vm);
        Ok(id)
    }

    /// Pauses a guest: it keeps its state and is not scheduled until resumed.
    pub fn pause(&mut self, id: usize) -> Result<(), String> {
        let vm = self.vms.get_mut(id).ok_or("no such guest")?;
        vm.guest.state.pause().map_err(|e| alloc::format!("{e}"))?;
        info!("guest {} paused", vm.guest.name);
        Ok(())
    }

    pub fn resume(&mut self, id: usize) -> Result<(), String> {
        let vm = self.vms.get_mut(id).ok_or("no such guest")?;
        vm.guest.state.resume().map_err(|e| alloc::format!("{e}"))?;
        // Its clock stopped while paused, as while waiting for the CPU.
        vm.waiting_since.get_or_insert(cpu::rdtsc());
        info!("guest {} resumed", vm.guest.name);
        Ok(())
    }

    /// Stops a guest for good (an operator's kill: no restart).
    pub fn kill(&mut self, id: usize) -> Result<(), String> {
        let vm = self.vms.get_mut(id).ok_or("no such guest")?;
        vm.guest
            .state
            .stop(StopReason::Killed("by the operator".into()))
            .map_err(|e| alloc::format!("{e}"))?;
        info!("guest {} killed", vm.guest.name);
        Ok(())
    }

    /// Keys typed on Keel's console (COM1): `s` prints the accounting table, `p` pauses every
    /// running guest, `r` resumes every paused one. The management monitor will grow from here.
    /// Reads the keys typed on COM1: Ctrl-A commands for Keel, every other byte for the focused
    /// guest's 16550 (see `focus`), which gets them as its receive FIFO has room.
    fn poll_console(&mut self) {
        while let Some(byte) = arch::serial::try_read() {
            let vms = &self.vms;
            let running = |i: usize| !matches!(vms[i].guest.state, RunState::Stopped(_));
            match self.focus.key(byte, running) {
                Key::Stats => {
                    print_stats(self.vms.iter().map(|vm| &vm.guest), Writer::Keel);
                }
                Key::Pause => (0..self.vms.len()).for_each(|i| {
                    let _ = self.pause(i);
                }),
                Key::Resume => (0..self.vms.len()).for_each(|i| {
                    let _ = self.resume(i);
                }),
                Key::Focus(i) => info!("input goes to {}", self.vms[i].guest.name),
                // The monitor is not part of this loop (yet): Ctrl-A c does nothing here.
                Key::Monitor | Key::Guest(..) | Key::None => {}
            }
        }
        if self.focus.pending() == 0 {
            return;
        }
        let now = cpu::rdtsc();
        let g = &mut self.vms[self.focus.current()].guest;
        let t = g.now(now);
        let running = !matches!(g.state, RunState::Stopped(_));
        // A halted guest wakes for the receive interrupt in `run`, as for its timers.
        self.focus.deliver(running, |b| {
            g.platform.serial_input_room(t) && g.platform.push_serial_input(b, t)
        });
    }

    /// The host TSC at which the first timer of a halted guest (other than `except`) falls due:
    /// when a running guest must make room, or when Keel must wake from idle. Stopped and paused
    /// guests do not count.
    fn earliest_halted_deadline(&self, except: Option<usize>) -> Option<u64> {
        self.vms
            .iter()
            .enumerate()
            .filter(|(j, vm)| Some(*j) != except && vm.guest.state == RunState::Halted)
            .filter_map(|(_, vm)| {
                vm.guest
                    .platform
                    .next_deadline()
                    .map(|d| vm.guest.host_time(d))
            })
            .min()
    }

    fn run(&mut self) {
        loop {
            self.poll_console();
            crate::log::pump();
            // Console lines that found no room on COM1's queue before (stopped guests' too).
            for vm in &mut self.vms {
                print_console(&mut vm.guest, PRINT_BUDGET);
            }
            let now = cpu::rdtsc();
            let mut live = 0;
            for vm in &mut self.vms {
                let g = &mut vm.guest;
                if matches!(g.state, RunState::Stopped(_)) {
                    continue;
                }
                live += 1;
                // A runnable guest waiting for its turn has its clock stopped (see
                // `Vm::waiting_since`); only halted guests need their timers checked here.
                if g.state == RunState::Halted {
                    g.platform.advance(g.now(now));
                    if g.platform.pending_interrupt().is_some() {
                        g.state = RunState::Runnable;
                        if let Some(since) = vm.halted_since.take() {
                            g.stats.halted_cycles += now.saturating_sub(since);
                        }
                        vm.waiting_since = Some(now);
                        vm.woken = true;
                    }
                }
            }
            if live == 0 {
                return;
            }
            let vms = &self.vms;
            match self.sched.pick_urgent_first(
                vms.len(),
                |i| vms[i].guest.state == RunState::Runnable,
                |i| vms[i].woken,
            ) {
                Some(i) => self.run_slice(i),
                None => {
                    // Every live guest is halted: sleep until the earliest guest timer (or at
                    // most one quantum, in case an interrupt source has no deadline).
                    let t0 = cpu::rdtsc();
                    let wake = self
                        .earliest_halted_deadline(None)
                        .unwrap_or(t0 + self.sched.quantum);
                    // While console output is queued, wake often enough to keep the UART busy
                    // (16 bytes of FIFO last 1.4 ms at 115200 baud).
                    let max = if crate::log::busy() {
                        self.cal.tsc_hz / 1000
                    } else {
                        self.sched.quantum
                    };
                    lapic::sleep_until(wake, max, &self.cal);
                }
            }
        }
    }

    fn run_slice(&mut self, i: usize) {
        if self.loaded != Some(i) {
            if let Some(prev) = self.loaded {
                let p = &mut self.vms[prev];
                p.saved.save();
            }
            let vm = &self.vms[i];
            vm.saved.restore(vm.guest.xcr0);
            if let Err(e) = vm.vmcs.load() {
                self.loaded = None;
                self.stop(i, StopReason::Killed(alloc::format!("{e}")));
                return;
            }
            self.loaded = Some(i);
        }
        let quantum = self.vms[i].slice_left.take().unwrap_or(self.sched.quantum);
        // When a halted guest's timer falls due, this slice ends early so that guest can run.
        let others_due = self.earliest_halted_deadline(Some(i));
        let rate = self.caps.preemption_timer_rate();
        let use_timer = self.controls.preemption_timer;
        let use_offsetting =
            self.controls.primary & PrimaryControls::USE_TSC_OFFSETTING.bits() != 0;
        let vm = &mut self.vms[i];
        load_spec_ctrl(&mut self.spec_ctrl, vm.guest.spec_ctrl);
        let mut v = CurrentVmcs;
        let start = cpu::rdtsc();
        vm.woken = false;
        if let Some(since) = vm.waiting_since.take() {
            if use_offsetting {
                vm.guest.tsc_offset = vm.guest.tsc_offset.wrapping_sub(start - since);
                v.write(crate::vmx::Control64::TscOffset, vm.guest.vmcs_tsc_offset());
            }
        }
        let deadline = start + quantum;
        let min_gap = self.cal.tsc_hz / MIN_TIMER_GAP_DIVISOR;
        let mut xcr0 = vm.guest.xcr0;
        // The guest's platform is only consulted when it may have changed: after an exit that
        // reached a device, or when one of its timers falls due. CPUID, VMCALL and the like then
        // cost no device work at all (docs/BENCHMARKS.md).
        let mut touched = true;
        let mut timer_due: Option<u64> = None;
        let mut until = deadline;
        // The time of the last exit serves for the timer checks. Time in the guest (entry to exit)
        // is its cpu time; Keel's handling of its exits (exit to next entry) is kept apart.
        let mut now = start;
        loop {
            if touched || timer_due.is_some_and(|d| now >= d) {
                vm.guest.platform.advance(vm.guest.now(now));
                exits::inject_pending_interrupt(&mut v, &mut vm.guest);
                timer_due = vm
                    .guest
                    .platform
                    .next_deadline()
                    .map(|d| vm.guest.host_time(d));
                // Come back at the end of the slice, when one of the guest's own timers falls
                // due, or when a halted guest's does, whichever is first.
                until = [timer_due, others_due]
                    .into_iter()
                    .flatten()
                    .fold(deadline, u64::min);
            }
            // The one place an event is written to the VM-entry fields (exits::events).
            if let Err(reason) = exits::events::commit(&mut v, &mut vm.guest) {
                self.stop(i, reason);
                return;
            }
            // The timer is armed afresh before every entry, from a fresh TSC read: it only
            // counts while the guest runs (SDM 26.5.1), so Keel's own time since the last exit
            // must come off it, or a guest timer fires that much late and ticks are lost.
            let t0 = cpu::rdtsc();
            if use_timer {
                // The guest runs at least `min_gap` before the timer brings it back, so a timer
                // faster than Keel can deliver (a PIT programmed with count 1 ticks every 0.84 us)
                // cannot livelock it in back-to-back exits: its ticks are coalesced instead
                // (docs/SCHEDULING.md).
                let left = until.max(t0 + min_gap).saturating_sub(t0) >> rate;
                v.write(
                    Guest32::PreemptionTimerValue,
                    left.min(u32::MAX as u64) as u32,
                );
            }
            vm.guest.stats.keel_cycles += t0 - now;
            let entered = arch::vmcs::enter(&mut vm.guest.regs, vm.launched);
            let t1 = cpu::rdtsc();
            vm.guest.stats.cpu_cycles += t1 - t0;
            now = t1;
            if let Err(e) = entered {
                self.stop(i, StopReason::EntryFailed(alloc::format!("{e}")));
                return;
            }
            vm.launched = true;
            let guest_now = vm.guest.now(t1);
            let action = {
                let mut host = RealHost;
                let mut cx = ExitContext {
                    vmcs: &mut v,
                    guest: &mut vm.guest,
                    host: &mut host,
                    now: guest_now,
                };
                exits::dispatch(&mut cx)
            };
            exits::apply(&mut v, &mut vm.guest, &action);
            let reason = ExitReason::from_basic(vm.guest.stats.last_exit);
            touched = exits::may_touch_platform(reason);
            // A power-off or reset the guest asked its board for (ACPI S5, i8042, port 0xCF9).
            if let Some(event) = touched
                .then(|| vm.guest.platform.take_power_event())
                .flatten()
            {
                self.stop(i, StopReason::Board(event));
                return;
            }
            if (touched || reason == ExitReason::Vmcall)
                && print_console(&mut vm.guest, PRINT_BUDGET)
            {
                crate::log::pump();
            }
            if reason == ExitReason::Xsetbv && vm.guest.xcr0 != xcr0 {
                // The guest executed XSETBV (validated by its handler): load it for the next entry.
                // SAFETY: `exits::xsetbv` only stores values valid for this CPU.
                unsafe { cpu::xsetbv0(vm.guest.xcr0) };
                xcr0 = vm.guest.xcr0;
            }
            if reason == ExitReason::Wrmsr {
                load_spec_ctrl(&mut self.spec_ctrl, vm.guest.spec_ctrl);
            }
            if vm.guest.stats_requested {
                vm.guest.stats_requested = false;
                vm.waiting_since = Some(cpu::rdtsc());
                break;
            }
            match action {
                // A halted guest's timer fell due. Not only the preemption timer brings this
                // guest back then: one that exits more often than every `min_gap` (a guest
                // writing its UART) re-arms it at each entry and would never let it expire.
                Action::Resume
                | Action::Advance
                | Action::AdvanceBy(_)
                | Action::Inject(_)
                | Action::Preempted
                    if others_due.is_some_and(|d| now >= d) =>
                {
                    vm.waiting_since = Some(now);
                    // It gets the CPU back next, but only for what was left of its slice:
                    // otherwise a guest woken every few ms would hand the same CPU hog a fresh
                    // quantum each time and starve the others.
                    vm.slice_left = Some(deadline.saturating_sub(now));
                    self.sched.interrupted();
                    return;
                }
                Action::Resume | Action::Advance | Action::AdvanceBy(_) | Action::Inject(_) => {
                    if now >= deadline {
                        vm.waiting_since = Some(now);
                        return;
                    }
                }
                Action::Halt => {
                    vm.guest.state = RunState::Halted;
                    vm.halted_since = Some(now);
                    return;
                }
                Action::Preempted if now < deadline => {}
                Action::Yield | Action::Preempted => {
                    vm.waiting_since = Some(now);
                    return;
                }
                Action::Stop(reason) => {
                    self.stop(i, reason);
                    return;
                }
            }
        }
        // Only the PRINT_STATS hypercall leaves the loop this way. The table counts against the
        // caller's share of Keel's console; when that has no room, the call says so.
        // A table about as long as the last one must fit, or it is not even put together (a guest
        // asking for it in a loop would keep Keel formatting tables nobody sees).
        let who = Writer::Guest(self.vms[i].guest.id);
        let last = LAST_TABLE.load(core::sync::atomic::Ordering::Relaxed);
        if !(crate::log::fits(who, last) && print_stats(self.vms.iter().map(|vm| &vm.guest), who)) {
            exits::vmcall::print_stats_refused(&v, &mut self.vms[i].guest);
        }
    }

    fn stop(&mut self, i: usize, reason: StopReason) {
        let g = &mut self.vms[i].guest;
        g.platform.console().finish();
        print_console(g, PRINT_BUDGET);
        match &reason {
            StopReason::Board(crate::devices::PowerEvent::Reset(_)) => {
                info!("guest {}: {reason}: booting it again", g.name)
            }
            StopReason::DebugExit(_) | StopReason::Shutdown(_) | StopReason::Board(_) => {
                info!("guest {} ended: {reason}", g.name)
            }
            _ => error!("guest {} stopped: {reason}", g.name),
        }
        let died = !matches!(
            reason,
            StopReason::DebugExit(_) | StopReason::Shutdown(_) | StopReason::Board(_)
        );
        let vm = &mut self.vms[i];
        // A reset starts the guest again as a PC would, whatever its restart budget, with its
        // CMOS RAM kept (battery-backed on a PC).
        if let StopReason::Board(crate::devices::PowerEvent::Reset(_)) = reason {
            let platform = vm.guest.platform.after_reset();
            match vm.boot() {
                Ok(()) => {
                    vm.guest.platform = platform;
                    vm.saved.restore(vm.guest.xcr0);
                    self.loaded = Some(i);
                    return;
                }
                Err(e) => error!("guest {}: reboot failed: {e}", vm.guest.name),
            }
            self.loaded = Some(i);
        }
        if died && vm.restarts < vm.setup.cfg.restart {
            vm.restarts += 1;
            // What the guest printed and Keel has not yet sent, and its console's counts, outlive
            // the restart (`boot` gives it a new platform).
            let console = core::mem::take(vm.guest.platform.console());
            let booted = vm.boot();
            *vm.guest.platform.console() = console;
            match booted {
                Ok(()) => {
                    // `boot` made this guest's VMCS current; its extended state, XCR0 and MSRs
                    // go back to their power-on values too.
                    vm.saved.restore(vm.guest.xcr0);
                    self.loaded = Some(i);
                    return;
                }
                Err(e) => error!("guest {}: restart failed: {e}", vm.guest.name),
            }
            self.loaded = Some(i);
        }
        vm.guest.state = RunState::Stopped(reason);
    }

    fn report(&mut self) {
        // No guest runs any more: the last console lines wait for room now.
        for vm in &mut self.vms {
            print_console(&mut vm.guest, usize::MAX);
        }
        print_stats(self.vms.iter().map(|vm| &vm.guest), Writer::Keel);
        for vm in &self.vms {
            let g = &vm.guest;
            if let RunState::Stopped(r) = &g.state {
                info!("guest {} status {:#x}: {r}", g.name, r.status());
            }
        }
    }
}

/// About this many bytes of a guest's lines (as sent, with its prefix) move to COM1's queue at a
/// time (an exit, a turn of the run loop): more than COM1 sends meanwhile (16 bytes every
/// 1.4 ms), and little enough that Keel's work on them never holds up a timer that falls due
/// (700 lines moved at once took 100 ms of Bochs' time, 256 bytes of short lines 9 ms).
const PRINT_BUDGET: usize = 128;

/// Prints the guest's complete console lines, about `budget` bytes of them (at least one line),
/// while its share of Keel's console has room (the rest waits in its console buffer); true if it
/// printed any.
fn print_console(g: &mut Guest, budget: usize) -> bool {
    let mut printed = false;
    if g.platform.console().front().is_none() {
        return false;
    }
    let mut left = budget;
    let prefix = alloc::format!("[{}] ", g.name);
    while let Some(entry) = g.platform.console().front() {
        let text = entry.text();
        let ok = match entry {
            ConsoleLine::Line(_) => crate::log::write_guest_line(g.id, &prefix, text.as_bytes()),
            // Keel's own words, charged to the guest whose output was lost.
            ConsoleLine::Dropped(_) => crate::log::write_guest_line(
                g.id,
                &alloc::format!("keel: warn: {prefix}"),
                text.as_bytes(),
            ),
        };
        if !ok {
            break;
        }
        left = left.saturating_sub(prefix.len() + text.len() + 2);
        g.platform.console().pop();
        printed = true;
        if left == 0 {
            break;
        }
    }
    printed
}

/// The length of the last accounting table, as sent.
static LAST_TABLE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Prints the accounting table as `who`'s output, whole or not at all: false if it did not fit.
fn print_stats<'a>(guests: impl Iterator<Item = &'a Guest>, who: Writer) -> bool {
    use core::fmt::Write;
    let guests: Vec<&Guest> = guests.collect();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "keel: {:<16} {:>14} {:>14} {:>14} {:>10} {:>10} {:>8}",
        "guest", "cpu cycles", "keel cycles", "halted cycles", "exits", "irqs", "state"
    );
    for g in &guests {
        let state = match &g.state {
            RunState::Runnable => "run",
            RunState::Halted => "halted",
            RunState::Paused { .. } => "paused",
            RunState::Stopped(_) => "stopped",
        };
        let _ = writeln!(
            t,
            "keel: {:<16} {:>14} {:>14} {:>14} {:>10} {:>10} {:>8}",
            g.name,
            g.stats.cpu_cycles,
            g.stats.keel_cycles,
            g.stats.halted_cycles,
            g.stats.total_exits(),
            g.stats.interrupts_injected,
            state
        );
    }
    for g in &guests {
        let _ = writeln!(
            t,
            "keel: exits of {}: {}",
            g.name,
            g.stats.exits_by_reason()
        );
    }
    for g in &guests {
        let c = g.platform.console_ref();
        let _ = writeln!(
            t,
            "keel: console of {}: {} bytes, {} dropped",
            g.name,
            c.bytes_written(),
            c.dropped_bytes()
        );
    }
    LAST_TABLE.store(
        crate::log::wire_len(t.as_bytes()),
        core::sync::atomic::Ordering::Relaxed,
    );
    crate::log::write_as(who, t.as_bytes())
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
