//! The run loop of one CPU: which guest runs next and for how long, what happens around each VM
//! entry (interrupt injection, the one event commit, the VMX-preemption timer), what an exit's
//! [`Action`] means for the schedule, and the clocks and accounts of every guest.
//!
//! Everything it needs from the machine comes in through [`Cpu`]: the clock (RDTSC), the state
//! switch between guests (the registers VMX does not switch, VMPTRLD), VM entry, VMCS access,
//! idle sleep, and the odd register write (XCR0, IA32_SPEC_CTRL). `hypervisor::RealCpu` is the
//! hardware; the tests below drive the loop with a fake CPU whose guests execute scripts, through
//! the cases that have gone wrong before (docs/SCHEDULING.md).

use crate::devices::console::ConsoleLine;
use crate::devices::TimerShot;
use crate::exits::cpuid::CpuidTable;
use crate::exits::fast::{ApicExit, PortExit, Way};
use crate::exits::{self, Action, ExitContext, Host};
use crate::guest::{GuestRegs, GuestStats, RunState, StopReason, Vcpu, Vm};
use crate::log::Writer;
use crate::sched::{RoundRobin, Share, Shares};
use crate::vmx::{Control64, ExitReason, Guest32, ReadOnly32, Vmcs, VmxError};
use crate::{error, info};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// A guest's own timers may bring it back to Keel at most this often: every 1/20000 s (50 us).
pub const MIN_TIMER_GAP_DIVISOR: u64 = 20_000;

/// CPU 0's housekeeping at a pick runs at most every 1/1000 s (1 ms) while no key waits, unless a
/// vCPU is to be settled or CPU 0 is to sleep ([`RunLoop::pick_turn`]).
pub const HOUSEKEEPING_GAP_DIVISOR: u64 = 1000;

/// TSC ticks by which the VMX-preemption timer is armed short of a guest timer's deadline
/// (`arm_entry`). The timer counts only from the VM entry (SDM 26.5.1), which comes after the
/// TSC read it is armed from by the rest of `arm_entry`, the run loop's way to the entry and
/// the entry's own instructions: 80 instructions in the release build, one Bochs tick each
/// (`trace_exits.py --ops irq`); on silicon the VM entry alone takes more TSC ticks than this.
/// Armed for the full time, the timer expired that much after the deadline, and the guest's
/// interrupt came that much later. Armed shorter, an exit that still comes before the deadline
/// (a way to the entry shorter than counted) waits for it in Keel (`catch_up`), at most this
/// long: never the minimum gap of a re-armed timer, and never an interrupt before its deadline
/// (a guest's timer fires only when Keel's clock, read after the exit, has reached it).
pub const ENTRY_LEAD: u64 = 64;

/// How early, in TSC ticks, the run loop on one CPU aims to read the exit of a VMX-preemption
/// timer armed for a guest timer (`learned_lead`): a little before the deadline, which Keel then
/// waits for (`catch_up`), so that the interrupt goes in at its deadline rather than the exit's
/// way into Keel after it.
pub const LEAD_MARGIN: u64 = 16;

/// The lead the preemption timer is armed with short of a guest timer's deadline, learned on one
/// CPU from the timer exits it brings (the way from the TSC read it is armed from to the entry,
/// SDM 26.5.1's count starting there, and the exit's way back until Keel is ready to wait: this
/// machine's and this build's). From `lead`, after an exit aimed at `due - lead` after which
/// Keel was ready at `ready`: half the way to being ready [`LEAD_MARGIN`] before `due`, never
/// more than `max`. Ready late, the lead grows; early (Keel waits meanwhile), it shrinks.
pub fn learned_lead(lead: u64, due: u64, ready: u64, max: u64) -> u64 {
    let target = due.saturating_sub(LEAD_MARGIN);
    let next = if ready > target {
        lead.saturating_add((ready - target).div_ceil(2))
    } else {
        lead.saturating_sub((target - ready) / 2)
    };
    next.min(max)
}

/// The machine as the run loop uses it. Implemented by the hardware (`hypervisor::RealCpu`) and by
/// the tests' fake.
pub trait Cpu {
    /// A guest's share of the hardware: its EPT, RAM block and image, and each vCPU's VMCS and
    /// saved registers (everything of the guest that is not in its [`Vm`] and [`Vcpu`]s).
    type Vcpu;
    /// A vCPU's VMCS made current on this CPU ([`Cpu::load`]): the only way to read or write it,
    /// and to enter the vCPU.
    type Loaded<'a>: Vmcs
    where
        Self::Vcpu: 'a;

    /// What entering a vCPU needs away from the loop and its lock (on the hardware, its VMCS's
    /// launch state; the VMCS stays current on the CPU): [`RunLoop::detach`], [`RunLoop::reattach`].
    type Detached;

    /// The host TSC.
    fn rdtsc(&mut self) -> u64;
    /// Saves the registers VMX does not switch (extended state, XCR0's domain, CR2, DR0-DR3/DR6,
    /// the SYSCALL MSRs) into vCPU `cpu` of `hw`: it is being switched out.
    fn save(&mut self, hw: &mut Self::Vcpu, cpu: usize);
    /// Loads what [`Cpu::save`] saved, and the vCPU's XCR0: it is being switched in.
    fn restore(&mut self, hw: &mut Self::Vcpu, cpu: usize, xcr0: u64);
    /// Makes vCPU `cpu`'s VMCS the current one (VMPTRLD) and hands out the handle to it.
    fn load<'a>(&mut self, hw: &'a mut Self::Vcpu, cpu: usize) -> Result<Self::Loaded<'a>, String>;
    /// Enters the guest of `vmcs` (VMLAUNCH the first time after a boot, else VMRESUME) and
    /// returns at its next VM exit, with its general-purpose registers back in `regs`.
    fn enter(&mut self, vmcs: &mut Self::Loaded<'_>, regs: &mut GuestRegs) -> Result<(), VmxError>;
    /// [`Cpu::enter`] with the reflex (`reflex::take`) answering the exits it takes on the way:
    /// returns at the first exit it declines, with its exit-reason field. The hardware calls the
    /// reflex from the VM-exit stub, without returning here between the exits it takes; this
    /// default (the tests' fake) calls it after each exit [`Cpu::enter`] returns at.
    fn enter_with_reflex(
        &mut self,
        vmcs: &mut Self::Loaded<'_>,
        regs: &mut GuestRegs,
        r: &mut reflex::Reflex,
        table: &CpuidTable,
    ) -> Result<u32, VmxError> {
        loop {
            self.enter(vmcs, regs)?;
            let raw = vmcs.read(ReadOnly32::ExitReason);
            if !reflex::may_take(raw) {
                return Ok(raw);
            }
            let t1 = self.rdtsc();
            if !reflex::take(vmcs, r, table, regs, t1, || self.rdtsc()) {
                return Ok(raw);
            }
        }
    }
    /// The machine services the exit handlers use.
    fn host(&mut self) -> &mut dyn Host;
    /// Loads XCR0 after the guest changed it with XSETBV (validated by `exits::xsetbv`).
    fn load_xcr0(&mut self, xcr0: u64);
    /// Gives the CPU the running guest's IA32_SPEC_CTRL (written only when it differs).
    fn load_spec_ctrl(&mut self, value: u64);
    /// Sleeps until host TSC `wake` (at most `max` cycles from now) or an interrupt for Keel.
    fn sleep_until(&mut self, wake: u64, max: u64);
    /// (Re)starts the guest from its image: fresh RAM, devices, registers and VMCSs. vCPU 0
    /// starts at the image's entry; the others wait for a SIPI ([`RunState::WaitForSipi`]).
    /// `restarts` counts earlier deaths (it picks the command line).
    fn boot(
        &mut self,
        hw: &mut Self::Vcpu,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        restarts: u32,
    ) -> Result<(), String>;
    /// The guest's snapshot (`snapshot`), its vCPUs switched out and not running; `clock` is the
    /// guest's time when it stopped.
    fn snapshot(
        &mut self,
        hw: &mut Self::Vcpu,
        vm: &Vm,
        vcpus: &[Vcpu],
        clock: u64,
    ) -> Result<Vec<u8>, String> {
        let _ = (hw, vm, vcpus, clock);
        Err("snapshots need the hardware".into())
    }
    /// Replaces the guest by the snapshot `stream`, checked whole first (a refused one changes
    /// nothing); returns the guest's clock at the snapshot. The vCPUs take the snapshot's run
    /// states.
    fn restore_snapshot(
        &mut self,
        hw: &mut Self::Vcpu,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        stream: &[u8],
    ) -> Result<u64, String> {
        let _ = (hw, vm, vcpus, stream);
        Err("snapshots need the hardware".into())
    }
    /// A key typed on Keel's console, if any.
    fn console_key(&mut self) -> Option<u8>;
    /// A byte from the control channel (COM2), if any.
    fn control_byte(&mut self) -> Option<u8>;
    /// Moves to the control channel's transmitter as much of `out` as it takes now, without
    /// waiting.
    fn control_send(&mut self, out: &mut alloc::collections::VecDeque<u8>);
    /// Carries out a guest's checked BALLOON_GIVE or BALLOON_TAKE (`balloon`) on its EPT and
    /// Keel's pool, invalidating what the EPT change left stale; returns the status for the
    /// guest, or why the guest cannot go on (an INVEPT that failed).
    fn balloon(
        &mut self,
        _hw: &mut Self::Vcpu,
        _vm: &mut Vm,
        _req: crate::balloon::Request,
    ) -> Result<u64, String> {
        Ok(crate::abi::status::ENOSYS)
    }
    /// The calls that follow act for host CPU `h` (the hardware has one `Cpu` per CPU; the
    /// tests' fake plays several).
    fn on_host(&mut self, _h: usize) {}
    /// Interrupts host CPU `h`: out of HLT, or out of guest mode (an IPI to a CPU in VMX
    /// non-root operation is an external-interrupt exit).
    fn kick(&mut self, _h: usize) {}
    /// VMCLEAR of vCPU `cpu`'s VMCS on the CPU it leaves, so that another CPU may load it
    /// (SDM Vol. 3C 25.11.1); its next entry is a VMLAUNCH.
    fn release(&mut self, _hw: &mut Self::Vcpu, _cpu: usize) -> Result<(), String> {
        Ok(())
    }
    /// Makes vCPU `cpu`'s VMCS current on this CPU and hands out what entering it takes, for an
    /// entry made without the loop's lock.
    fn detach(&mut self, hw: &mut Self::Vcpu, cpu: usize) -> Result<Self::Detached, String>;
    /// Takes back what [`Cpu::detach`] handed out, after the entry (its launch state).
    fn reattach(&mut self, hw: &mut Self::Vcpu, cpu: usize, d: Self::Detached);
    /// INVEPT of the guest's EPT on this CPU, which may hold translations from before its EPT
    /// last changed (SDM Vol. 3C 29.4.3.1: EPT-derived translations outlive VM exits and VMCS
    /// switches; [`Slot::ept_changed`]).
    fn flush_ept(&mut self, _hw: &mut Self::Vcpu) -> Result<(), String> {
        Ok(())
    }
    /// INVVPID of vCPU `cpu`'s VPID on this CPU, which may hold its linear and combined
    /// translations from an earlier run here: INVLPG, MOV to CR3 and INVPCID the guest executed
    /// on another CPU since invalidated them only there (SDM Vol. 3C 29.4.3.1), so they may be
    /// stale ([`Seat::tlb_on`]).
    /// `id` is the guest's (`Vm::id`), whose vCPUs' VPIDs follow from it.
    fn flush_vpid(&mut self, _hw: &mut Self::Vcpu, _id: u32, _cpu: usize) -> Result<(), String> {
        Ok(())
    }
    /// Gives a stopped guest's RAM back to the pool (it gets RAM again when booted).
    fn release_ram(&mut self, _hw: &mut Self::Vcpu, _vm: &mut Vm) {}
    /// Keel's pool of memory for guests: (free bytes, total bytes), if known.
    fn memory_pool(&self) -> Option<(u64, u64)> {
        None
    }
    /// What live migration needs of the hardware (`runloop::migrate`), where it can be had.
    fn migration(&mut self) -> Option<&mut dyn migrate::MigrateHw<Self::Vcpu>> {
        None
    }
}

/// What the loop needs to know about the CPU's VMX features and Keel's configuration.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Length of a time slice in TSC cycles (`quantum_ms` in the manifest).
    pub quantum: u64,
    /// The host TSC rate.
    pub tsc_hz: u64,
    /// `Some(rate)` when slices end by the VMX-preemption timer, which counts TSC >> rate
    /// (IA32_VMX_MISC[4:0]); `None` when Keel's periodic tick ends them.
    pub preemption_timer: Option<u8>,
    /// The guests run with TSC offsetting ("use TSC offsetting"), so their clocks can be stopped.
    pub tsc_offsetting: bool,
    /// [`LoopConfig::min_gap`], worked out once (it is read at every entry).
    min_gap: u64,
}

impl LoopConfig {
    pub fn new(
        quantum: u64,
        tsc_hz: u64,
        preemption_timer: Option<u8>,
        tsc_offsetting: bool,
    ) -> Self {
        LoopConfig {
            quantum,
            tsc_hz,
            preemption_timer,
            tsc_offsetting,
            min_gap: tsc_hz / MIN_TIMER_GAP_DIVISOR,
        }
    }

    /// The least a guest runs before one of its own timers brings it back to Keel, in TSC cycles
    /// ([`MIN_TIMER_GAP_DIVISOR`]).
    #[inline(always)]
    pub fn min_gap(&self) -> u64 {
        self.min_gap
    }
}

/// One guest in the run loop: what its vCPUs share, each vCPU with its place in the schedule,
/// and its hardware.
pub struct Slot<V> {
    pub vm: Vm,
    /// vCPU i has APIC ID i; vCPU 0 is the bootstrap processor.
    pub vcpus: Vec<Vcpu>,
    /// Each vCPU's place in the schedule.
    seats: Vec<Seat>,
    /// Declared after `vm`, so it is dropped after it: the real one owns the RAM `vm.ram` views.
    pub hw: V,
    /// Host TSC since which the guest has been runnable but none of its vCPUs has had the CPU.
    /// Its clock does not advance meanwhile: when one of its vCPUs runs again, the wait is taken
    /// out of its TSC offset, so its timers keep their programmed rate in its own time and no
    /// ticks pile up while others run. Time spent halted does pass (the guest asked to wait).
    /// The clock is the guest's, not a vCPU's: its vCPUs' TSCs stay in step. docs/ARCHITECTURE.md,
    /// "Time".
    waiting_since: Option<u64>,
    /// Host TSC at which the operator paused it. Its clock stops meanwhile, halted or not: on
    /// resume the pause is taken out of its TSC offset (a runnable guest's through
    /// `waiting_since`), so no tick falls due during the pause and none is lost after it.
    paused_since: Option<u64>,
    /// How many times the guest has been restarted after dying.
    restarts: u32,
    /// How many restarts it may have (manifest key `restart`).
    restart_limit: u32,
    /// Its weight and cap (read by `RunLoop::new`).
    share: Share,
    /// The host CPUs its vCPUs may run on, a bit each (manifest `cpus`), if pinned.
    pins: Option<u64>,
    /// Counts its boots and restores: a host CPU whose vCPU was replaced meanwhile (by a command
    /// on another CPU) drops its slice at the exit.
    epoch: u32,
    /// Acts on the whole guest that one of its vCPUs asked for (a stop, a balloon call) or the
    /// load policy decided while others of its vCPUs ran on other CPUs: they wait until none
    /// does (its vCPUs are not picked meanwhile, and those in guest mode are kicked out), so no
    /// CPU runs the guest while its RAM, EPT or VMCSs change.
    deferred: Vec<Deferred>,
    /// Counts the changes to its EPT that may leave translations cached on a CPU stale (RAM
    /// given back by ballooning or at a stop, dirty flags cleared by migration, a new boot or
    /// restore): a CPU that last ran the guest under an older count runs INVEPT before its next
    /// entry of it (`HostCpu::ept_seen`), so every CPU that may hold the guest's translations
    /// drops them, not only the one that made the change (SDM Vol. 3C 29.4.3.1).
    ept_gen: u32,
    /// The host CPUs its vCPUs have run on, a bit each (the first 64).
    ran_on: u64,
}

/// An act on a whole guest put off until none of its vCPUs is on another CPU ([`Slot::deferred`]).
#[derive(Debug, Clone)]
enum Deferred {
    /// The guest stops (and restarts, if it may).
    Stop(StopReason),
    /// vCPU .0's BALLOON_GIVE or BALLOON_TAKE.
    Balloon(usize),
    /// Its RAM goes back to the pool (stopped for good by the load policy).
    ReleaseRam,
}

/// The pins a guest keeps on a machine whose CPUs in `up` (a bit each) run vCPUs: `pins` if
/// every CPU it lists is up, else `Err` with the first that is not (the guest may then run on
/// every CPU: a manifest written for a bigger machine still boots).
pub fn pins_on(pins: Option<u64>, up: u64) -> Result<Option<u64>, u32> {
    match pins {
        Some(m) if m & !up != 0 => Err((m & !up).trailing_zeros()),
        _ => Ok(pins),
    }
}

/// One vCPU of a guest and what it shares, as its entries and exits use them.
struct Parts<'a> {
    vm: &'a mut Vm,
    vcpu: &'a mut Vcpu,
    seat: &'a mut Seat,
    waiting_since: &'a mut Option<u64>,
}

/// One vCPU's place in the schedule.
#[derive(Debug, Default, Clone)]
struct Seat {
    /// Host TSC at which the vCPU executed HLT (for its halted-time account).
    halted_since: Option<u64>,
    /// What was left of its time slice when a woken vCPU cut it short.
    slice_left: Option<u64>,
    /// Woken from HLT by an interrupt and not run since: scheduled ahead of the rotation, so a
    /// timer interrupt reaches a waiting vCPU within its period even while others compute.
    woken: bool,
    /// With several host CPUs: host TSC at which its last slice ended (0: first in line, cut
    /// short for a woken vCPU or not run yet). Among vCPUs equally below their shares the CPUs
    /// pick the one that has waited longest (`sched::pick_fairest`); a shared rotation cursor
    /// would skip a vCPU pinned to a CPU that never picks at its turn.
    left_at: u64,
    /// An INIT came while it was on another CPU: its registers are reset at its exit there
    /// (until then that CPU holds them), and it waits for a SIPI.
    init_pending: bool,
    /// An IPI a sibling sent it and that it has not been entered with yet: host TSC of the
    /// sender's exit, and the sender's host CPU ([`Figures`]).
    ipi_sent: Option<(u64, usize)>,
    /// The host CPU it last ran on.
    last_host: Option<usize>,
    /// Where several CPUs run vCPUs: the host CPU whose cached translations under this vCPU's
    /// VPID are current (it ran there last, and since its last INVVPID there); any other CPU's
    /// may be stale, and one that runs it next invalidates its VPID first
    /// ([`Cpu::flush_vpid`]). None after a boot or a restore.
    tlb_on: Option<usize>,
    /// Its virtual time: CPU time over its guest's weight (`sched::advance`), what the picks over
    /// several host CPUs go by.
    vtime: u64,
    /// Its guest's platform is as the last look before its entry left it (bar the time): its
    /// last slice ended at an exit that touched nothing (a YIELD, a CPUID at the slice's end),
    /// and nothing on the host has reached the guest since. Only for a guest of one vCPU on
    /// one host CPU (a sibling's exits reach the same platform), and taken back by whatever
    /// reaches guests from outside their exits ([`RunLoop::platforms_reached`]: the
    /// housekeeping's keys, monitor commands, the load policy). Its next piece then makes the
    /// platform look at its first entry only if one of its timers fell due meanwhile
    /// (`before_entry`), as the tight loop does after a register-only exit.
    untouched: bool,
}

impl<V> Slot<V> {
    /// A freshly booted guest, runnable from the next pick on.
    pub fn new(vm: Vm, vcpus: Vec<Vcpu>, hw: V, restart_limit: u32) -> Self {
        Self {
            vm,
            seats: vec![Seat::default(); vcpus.len()],
            vcpus,
            hw,
            waiting_since: None,
            paused_since: None,
            restarts: 0,
            restart_limit,
            share: Share::default(),
            pins: None,
            epoch: 0,
            deferred: Vec::new(),
            ept_gen: 0,
            ran_on: 0,
        }
    }

    /// Its EPT changed in a way that may leave other CPUs' cached translations stale: each CPU
    /// runs INVEPT before it next enters the guest ([`Slot::ept_gen`]).
    fn ept_changed(&mut self) {
        self.ept_gen = self.ept_gen.wrapping_add(1);
    }

    /// The guest's claim on the CPU (manifest `weight` and `cap`; `sched::Shares`).
    pub fn with_share(mut self, share: Share) -> Self {
        self.share = share;
        self
    }

    /// Pins the guest's vCPUs to the host CPUs in `pins` (bit n for CPU n; `None`: any CPU).
    pub fn with_pins(mut self, pins: Option<u64>) -> Self {
        self.pins = pins;
        self
    }

    /// True if its vCPUs may run on host CPU `h`.
    fn may_run_on(&self, h: usize) -> bool {
        self.pins.is_none_or(|m| h < 64 && m & (1 << h) != 0)
    }

    /// The guest's bootstrap processor, vCPU 0: its run state is the guest's (it stops, and
    /// every vCPU with it, when the guest stops).
    pub fn bsp(&self) -> &Vcpu {
        &self.vcpus[0]
    }

    /// True while the guest has not stopped.
    fn live(&self) -> bool {
        self.bsp().state.is_live()
    }

    /// vCPU `c`'s hardware, and what the loop uses of the guest around its entries.
    fn parts(&mut self, c: usize) -> (&mut V, Parts<'_>) {
        (
            &mut self.hw,
            Parts {
                vm: &mut self.vm,
                vcpu: &mut self.vcpus[c],
                seat: &mut self.seats[c],
                waiting_since: &mut self.waiting_since,
            },
        )
    }

    /// Wakes vCPU `c` if it is halted and an interrupt (or NMI) is pending for it: runnable, and
    /// ahead of the rotation at the next pick.
    fn wake(&mut self, c: usize, now: u64) {
        let (vcpu, seat) = (&mut self.vcpus[c], &mut self.seats[c]);
        // A HLT with interrupts off ends only with an NMI (or INIT, `start_signals`).
        let interrupt = !vcpu.halted_masked && self.vm.platform.pending_interrupt(c).is_some();
        if vcpu.state != RunState::Halted || !interrupt && !self.vm.platform.nmi_pending(c) {
            return;
        }
        vcpu.state = RunState::Runnable;
        if let Some(since) = seat.halted_since.take() {
            vcpu.stats.halted_cycles += now.saturating_sub(since);
        }
        self.waiting_since.get_or_insert(now);
        seat.woken = true;
    }
}

/// The guests of one CPU and the loop that runs them. The schedule is over vCPUs: every vCPU of
/// every guest takes its turn ([`RunLoop::seats`] numbers them guest by guest).
pub struct RunLoop<C: Cpu> {
    pub slots: Vec<Slot<C::Vcpu>>,
    pub cpu: C,
    sched: RoundRobin,
    /// Weights and caps: each guest's slice length and capped budget (`sched::Shares`).
    shares: Shares,
    cfg: LoopConfig,
    /// The host CPUs that run vCPUs (CPU 0 first): what each runs, whose registers are in it.
    /// A vCPU's VMCS is loaded afresh for each use, so which VMCS is current is never remembered.
    hosts: Vec<HostCpu>,
    /// The host CPU the loop acts for now (the one whose calls these are).
    acting: usize,
    /// A command (or the load policy) may have loaded VMCSs or registers of vCPUs that no CPU
    /// runs: host CPU 0 settles them at its next turn.
    unsettled: bool,
    /// Which guest gets the bytes typed on COM1 (`focus`).
    focus: crate::focus::Focus,
    /// The operator's side: the console prompt, the control channel and the monitor behind both.
    ops: Operator,
    /// The load policy over the on-demand guests, if any (`policy`).
    policy: Option<crate::policy::Policy>,
    /// Every vCPU in schedule order, rebuilt at each pick (kept for its allocation).
    seat_list: Vec<(usize, usize)>,
    /// With several host CPUs: IPI delivery and guest switch times, on one CPU and across CPUs.
    figures: Figures,
    /// CPU 0's last housekeeping at a pick ([`Chores`]).
    chores: Chores,
}

/// When CPU 0's housekeeping at a pick (the console, the control channel, held monitor lines,
/// the log and the guests' console lines to COM1's queue) last ended, and how long it took, in
/// host TSC: a pick puts it off when a halted vCPU's timer would fall due before it ended
/// ([`RunLoop::pick_turn`]). Next to guests flooding their consoles it took longer than a
/// 100 Hz tick's period in Bochs.
#[derive(Debug, Default, Clone, Copy)]
struct Chores {
    at: u64,
    took: u64,
}

/// The earliest timers of the guests with a halted vCPU (host TSC), found once at a pick
/// ([`RunLoop::halted_due`]) for whichever of its looks needs them: whether the housekeeping is
/// put off, when the picked vCPU's slice must end for another guest (`Piece::others_due`), and
/// how long CPU 0 may sleep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct HaltedDue {
    /// The earliest, and its guest.
    first: Option<(u64, usize)>,
    /// The earliest of every other guest's.
    second: Option<u64>,
}

impl HaltedDue {
    /// Guest `j`'s first timer falls due at `d`.
    fn add(&mut self, d: u64, j: usize) {
        match self.first {
            Some((f, _)) if f <= d => self.second = Some(self.second.map_or(d, |e| e.min(d))),
            _ => {
                self.second = self.first.map(|(f, _)| f);
                self.first = Some((d, j));
            }
        }
    }

    /// The earliest of every guest's but `except`'s.
    fn except(&self, except: Option<usize>) -> Option<u64> {
        match self.first {
            Some((d, j)) if Some(j) != except => Some(d),
            Some(_) => self.second,
            None => None,
        }
    }
}

/// What IPI delivery and guest switches cost with several host CPUs, in host TSC cycles, each
/// as (count, sum): `[0]` on one CPU, `[1]` across CPUs. An IPI's delivery runs from the
/// sender's exit to the target's next entry (on the sender's CPU, or on another: kicked awake or
/// out of guest mode); a switch from the exit that ends a CPU's slice to the first entry of the
/// next vCPU it picks without sleeping (one that last ran there, or one that moved from another
/// CPU). Printed at the end (`RunLoop::report`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Figures {
    pub ipi: [(u64, u64); 2],
    pub switch: [(u64, u64); 2],
}

impl Figures {
    fn text(pairs: &[(u64, u64); 2], same: &str, cross: &str) -> String {
        let cell = |(n, sum): (u64, u64), what: &str| {
            alloc::format!(
                "{what} {n} x avg {} cycles",
                sum.checked_div(n).unwrap_or(0)
            )
        };
        alloc::format!("{}, {}", cell(pairs[0], same), cell(pairs[1], cross))
    }
}

/// What the run loop keeps for the monitor (`monitor`): the `keel>` prompt on COM1, the lines
/// from COM2 and the replies waiting to go out there, `top`, and whether `quit` was given.
struct Operator {
    monitor: Option<crate::monitor::Monitor>,
    prompt: crate::monitor::Prompt,
    channel: crate::monitor::LineReader,
    /// Replies for COM2 not yet sent (one JSON object per line), after the hello
    /// (`credit::HELLO`) at first.
    reply: alloc::collections::VecDeque<u8>,
    /// `top` runs: the host TSC of its next refresh.
    top: Option<u64>,
    quit: bool,
    /// Host TSC of the loop's first turn: the monitor's first rates count from there.
    started: Option<u64>,
    /// The last snapshot taken (`snapshot NAME`), read out over the control channel.
    kept: Option<Vec<u8>>,
    /// A snapshot coming in over the control channel: for guest .0, .1 bytes, resumed after if .3.
    incoming: Option<(usize, usize, Vec<u8>, bool)>,
    /// A live migration in progress, out of or into this Keel (`runloop::migrate`).
    migration: Option<migrate::Migration>,
    /// Monitor lines that wait until no other CPU runs a vCPU ([`RunLoop::quiet`]): a command
    /// may read or replace any guest's VMCSs, registers and RAM, which a CPU in guest mode holds.
    /// Other CPUs end their slices at their next exit and pick nothing while any wait.
    held: alloc::collections::VecDeque<(Origin, crate::monitor::ChannelLine)>,
    /// Host TSC until which COM2 is read every millisecond: its receive FIFO holds 16 bytes, 1.4
    /// ms at 115200 baud, and a time slice is longer. Set for a while after each byte received,
    /// so a long line (a snapshot chunk) is not lost to an overrun once it has begun.
    control_busy_until: u64,
    /// Keys read from COM1 and not yet handled ([`RunLoop::take_keys`]): COM1's receive FIFO holds
    /// 16 bytes, and a host that pastes or types into an emulator may deliver them faster than a
    /// time slice, so they are taken out of the FIFO at every piece's end and handled at the pick.
    keys: alloc::collections::VecDeque<u8>,
}

/// Keys kept beyond this many are dropped (counted in the log): nobody types that far ahead.
const KEYS_MAX: usize = 4096;

/// Where a monitor line came from: its reply goes back there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The `keel>` prompt on COM1.
    Console,
    /// The control channel (COM2).
    Channel,
}

/// Replies waiting for COM2 beyond this many bytes are dropped whole (nobody reads them).
const REPLY_MAX: usize = 64 * 1024;

impl<C: Cpu> RunLoop<C> {
    pub fn new(cpu: C, cfg: LoopConfig, slots: Vec<Slot<C::Vcpu>>) -> Self {
        let slots_len = slots.len();
        let shares = Shares::new(cfg.quantum, slots.iter().map(|s| s.share).collect());
        Self {
            slots,
            cpu,
            sched: RoundRobin::new(cfg.quantum),
            shares,
            cfg,
            hosts: alloc::vec![HostCpu::default()],
            acting: 0,
            unsettled: false,
            focus: crate::focus::Focus::new(slots_len),
            ops: Operator {
                monitor: None,
                prompt: Default::default(),
                channel: Default::default(),
                // Keel listens from its first turn: the sender may begin (`credit::HELLO`).
                reply: [crate::credit::HELLO].into(),
                top: None,
                quit: false,
                started: None,
                kept: None,
                incoming: None,
                migration: None,
                held: Default::default(),
                control_busy_until: 0,
                keys: Default::default(),
            },
            policy: None,
            seat_list: Vec::new(),
            figures: Figures::default(),
            chores: Chores::default(),
        }
    }

    /// The IPI delivery and guest switch times so far ([`Figures`]).
    pub fn figures(&self) -> Figures {
        self.figures
    }

    /// The loop on `n` host CPUs (1 by default), numbered 0..n; CPU 0 keeps the console, the
    /// control channel and the log. Each calls [`RunLoop::begin`], [`RunLoop::enter`] and
    /// [`RunLoop::finish`] for itself.
    pub fn with_hosts(mut self, n: usize) -> Self {
        self.hosts.resize_with(n.max(1), HostCpu::default);
        self.shares.set_hosts(self.hosts.len());
        self
    }

    /// How many host CPUs run vCPUs.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// The vCPU (guest, vCPU) host CPU `h` runs, if any.
    pub fn running_on(&self, h: usize) -> Option<(usize, usize)> {
        self.hosts.get(h)?.running.as_ref().map(|r| r.seat)
    }

    /// True once the operator gave `quit`.
    pub fn quit_requested(&self) -> bool {
        self.ops.quit
    }

    /// True when some guest stopped by a failure ([`StopReason::is_failure`]).
    pub fn any_failed(&self) -> bool {
        self.slots.iter().any(|s| {
            s.vcpus
                .iter()
                .any(|v| matches!(&v.state, RunState::Stopped(r) if r.is_failure()))
        })
    }

    /// Every vCPU of every guest, in schedule order: (guest, vCPU).
    fn seats(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            v.extend((0..s.vcpus.len()).map(|c| (i, c)));
        }
        v
    }

    /// Runs until every guest has stopped (every vCPU on host CPU 0).
    pub fn run(&mut self) {
        while self.step() {}
    }

    /// One turn of host CPU 0: wake the halted vCPUs whose interrupts came, then run one time
    /// slice, or sleep if every live vCPU is halted. False when every guest has stopped.
    pub fn step(&mut self) -> bool {
        match self.pick_turn(0) {
            Turn::Done => false,
            Turn::Sleep { wake, max } => {
                self.cpu.sleep_until(wake, max);
                self.hosts[0].wake_due = self.cpu.rdtsc() >= wake;
                true
            }
            Turn::Enter => {
                while self.run_piece(0) {}
                true
            }
        }
    }

    /// Runs host CPU `h`'s piece of a slice as one CPU alone does: its vCPU's VMCS loaded once,
    /// then entry, exit, entry ... with nothing else in between (the loop's lock is never let go
    /// of, so no other CPU can have changed what `begin` and `finish` look at). True if the
    /// slice goes on with a new piece. The same work as `begin`, `enter` and `finish`, without
    /// their VMCS loads and checks at every exit.
    fn run_piece(&mut self, h: usize) -> bool {
        let cfg = self.cfg;
        let Some(((i, c), p, hw, g)) = running_parts(&mut self.hosts, &mut self.slots, h) else {
            return false;
        };
        p.reflex.timer(cfg.preemption_timer, cfg.min_gap());
        let next = match self.cpu.load(hw, c) {
            Ok(mut v) => 'slice: loop {
                if let Err(reason) = before_entry(&mut self.cpu, &mut v, g.vm, g.vcpu, p, cfg) {
                    break Next::End(SliceEnd::Stop(reason));
                }
                // The tight loop: entries, the register-only exits and the port accesses that
                // change nothing beyond their device (`exits::fast`) until an exit that needs
                // more, or the first at or past the piece's next deadline. A port access that
                // reached further leaves done (`handled`), for the general follow-up.
                let (raw, handled) = loop {
                    // The CPUIDs the reflex answers come and go inside the call
                    // (`runloop::reflex`); their accounts are added here.
                    let entered = self.cpu.enter_with_reflex(
                        &mut v,
                        &mut g.vcpu.regs,
                        &mut p.reflex,
                        &g.vm.cpuid,
                    );
                    let t1 = self.cpu.rdtsc();
                    if p.reflex.took() {
                        p.reflex.settle(&mut g.vcpu.stats);
                    }
                    g.vcpu.stats.cpu_cycles += t1 - p.reflex.entered_at;
                    p.now = t1;
                    let raw = match entered {
                        Ok(raw) => raw,
                        Err(e) => {
                            break 'slice Next::End(SliceEnd::Stop(StopReason::EntryFailed(
                                alloc::format!("{e}"),
                            )))
                        }
                    };
                    let regs = &g.vcpu.regs;
                    let way = exits::fast::way(raw, regs.rax, regs.rcx);
                    if t1 >= p.reflex.until || way == Way::General {
                        // The VMX-preemption timer inside the slice, with no halted guest's
                        // timer due: usually one of this guest's own timers fell due. Its
                        // follow-up is the platform look that `before_entry` makes anyway (the
                        // timer fired, the interrupt posted or injected), not the general
                        // dispatch's (`after_exit`: nothing for the schedule, no console, no
                        // device reached by the exit itself).
                        let go_on = raw == exits::fast::PREEMPTED
                            && t1 < p.deadline
                            && p.others_due.is_none_or(|d| t1 < d)
                            && g.vcpu.state == RunState::Runnable
                            && !g.vm.stats_requested
                            && g.vm.ram.balloon.pending.is_none();
                        if go_on {
                            exits::fast::handle_preempted(&v, g.vcpu);
                            // Whether the guest's state lets its timer fire the short way
                            // (`exits::apicv::timer_may_fire`) is told before the wait for the
                            // deadline, which changes none of it: after the deadline only the
                            // post is left.
                            // The timer's expiry is worked out here, once its exit came
                            // (`Piece::shot_stale`): the platform is as the last look left it.
                            let may_fire = exits::apicv::timer_may_fire(&v, g.vcpu, g.vm) && {
                                if core::mem::take(&mut p.shot_stale) {
                                    p.shot = exits::apicv::timer_shot(g.vcpu, g.vm);
                                }
                                p.shot.is_some()
                            };
                            // Then Keel is ready to wait. An exit armed for the guest timer's
                            // deadline less the lead, for the full time (not the minimum gap),
                            // teaches the lead how early that was (`learned_lead`).
                            let ready = self.cpu.rdtsc();
                            let min_gap = cfg.min_gap();
                            // The wait is for the lead this exit was armed with, not the one
                            // it teaches: a lead shortened here would leave an exit armed
                            // early unwaited for, and the look would find the timer not yet
                            // due and re-arm for the minimum gap past it.
                            let armed_lead = p.lead;
                            if let Some(due) = p.timer_due.filter(|&due| {
                                may_fire
                                    && p.reflex.armed.saturating_add(p.lead) == due
                                    && p.reflex.armed > p.reflex.entered_at + min_gap
                            }) {
                                // Capped at the minimum gap (the least a guest runs between
                                // two timer exits): in Bochs the way holds the shot's working
                                // out (`Piece::shot_stale`), about 190 of its 500 ticks.
                                p.lead = learned_lead(p.lead, due, ready, min_gap);
                            }
                            catch_up(&mut self.cpu, g.vcpu, p, ready, armed_lead);
                            let now = g.vm.now(p.now);
                            let fired = may_fire
                                && p.shot.as_ref().is_some_and(|shot| {
                                    exits::apicv::fire_timer_now(&mut v, g.vcpu, g.vm, now, shot)
                                });
                            if !fired {
                                p.touched = true;
                                continue 'slice;
                            }
                            // Fired: the shot is spent (the post leaves the page not idle,
                            // so the next look works out the next one).
                            p.shot = None;
                            // The guest's APIC timer alone fell due and is posted: the rest
                            // of `before_entry`'s look, its next deadline.
                            p.touched = false;
                            note_deadline(g.vm, p, min_gap);
                            if let Err(reason) = arm_entry(&mut self.cpu, &mut v, g.vcpu, p, cfg) {
                                break 'slice Next::End(SliceEnd::Stop(reason));
                            }
                            continue;
                        }
                        // A YIELD: the slice ends here, as the general follow-up would end it
                        // (`after_exit`: the console lines the guest left printed, its clock
                        // stopped from the exit, the next pick deciding). From CPL > 0 it
                        // goes the general way (#UD).
                        if exits::fast::is_yield(raw, g.vcpu.regs.rax)
                            && exits::fast::handle_yield(&mut v, g.vcpu)
                        {
                            print_and_pump(g.vm);
                            *g.waiting_since = Some(t1);
                            p.touched = false;
                            break 'slice Next::End(SliceEnd::Over);
                        }
                        // Without APIC virtualization, an access to the local APIC's page, or a
                        // RDMSR or WRMSR of an x2APIC register, that the APIC makes alone
                        // (`exits::fast::handle_apic`, `handle_x2apic`): nothing for the look, as
                        // after a CPUID. A store (EOI or TPR) changed what the timer's short way
                        // looks at in the APIC (`Lapic::timer_alone_vector`): the shot is worked
                        // out afresh. Tested here, among the general exits, rather than as a way
                        // of its own: a fifth way cost the others (measured).
                        let apic = exits::fast::may_be_apic_alone(raw, g.vcpu.regs.rcx);
                        if apic && t1 < p.reflex.until && g.vcpu.apicv.is_none() {
                            let now = g.vm.now(t1);
                            let mut cx = ExitContext {
                                vmcs: &mut v,
                                vcpu: &mut *g.vcpu,
                                vm: &mut *g.vm,
                                host: self.cpu.host(),
                                now,
                            };
                            let done = if raw == exits::fast::EPT_VIOLATION {
                                exits::fast::handle_apic(&mut cx)
                            } else {
                                exits::fast::handle_x2apic(&mut cx, raw)
                            };
                            match done {
                                ApicExit::General => break (raw, None),
                                ApicExit::Loaded => {}
                                ApicExit::Stored => note_shot(p),
                            }
                            p.touched = false;
                            if let Err(reason) = arm_entry(&mut self.cpu, &mut v, g.vcpu, p, cfg) {
                                break 'slice Next::End(SliceEnd::Stop(reason));
                            }
                            continue;
                        }
                        break (raw, None);
                    }
                    let now = g.vm.now(t1);
                    if way == Way::Registers {
                        let host = self.cpu.host();
                        exits::fast::handle_register_only_parts(
                            &mut v, g.vcpu, g.vm, host, now, raw,
                        );
                    } else {
                        let mut cx = ExitContext {
                            vmcs: &mut v,
                            vcpu: &mut *g.vcpu,
                            vm: &mut *g.vm,
                            host: self.cpu.host(),
                            now,
                        };
                        if way == Way::Deadline {
                            // The guest's TSC deadline moved: its next timer, and the shot worked
                            // out for it, follow.
                            if !exits::fast::handle_deadline(&mut cx) {
                                break (raw, None);
                            }
                            if exits::apicv::post_outstanding(g.vcpu)
                                && !exits::apicv::settle_empty(&v, g.vcpu, g.vm)
                            {
                                // The timer's short way needs a page the last post left empty. A
                                // tick's handler that moves the deadline has usually taken and
                                // ended what was posted (`settle_empty`); otherwise the look
                                // before the entry takes it back and posts afresh, as after the
                                // general dispatch.
                                p.touched = true;
                                continue 'slice;
                            }
                            note_deadline(g.vm, p, cfg.min_gap());
                            note_shot(p);
                        } else {
                            match exits::fast::handle_port(&mut cx) {
                                PortExit::Quiet => {
                                    // A console byte is quiet too (no line, no timer): its lines
                                    // are printed as after the general dispatch.
                                    if g.vm.platform.take_console_written() {
                                        print_and_pump(g.vm);
                                    }
                                }
                                PortExit::Changed(done) => break (raw, Some(done)),
                                PortExit::General => break (raw, None),
                            }
                        }
                    }
                    // Nothing but registers (and a device's own) changed: no platform look
                    // before the next entry.
                    p.touched = false;
                    if let Err(reason) = arm_entry(&mut self.cpu, &mut v, g.vcpu, p, cfg) {
                        break 'slice Next::End(SliceEnd::Stop(reason));
                    }
                };
                let parts = Parts {
                    vm: &mut *g.vm,
                    vcpu: &mut *g.vcpu,
                    seat: &mut *g.seat,
                    waiting_since: &mut *g.waiting_since,
                };
                match after_exit(&mut self.cpu, &mut v, parts, c, p, (raw, handled), false) {
                    Next::Go => continue,
                    other => break other,
                }
            },
            Err(e) => Next::End(SliceEnd::Stop(StopReason::Killed(e))),
        };
        // `Go` never comes here: the slice went on above.
        self.follow(h, (i, c), next) && self.hosts[h].running.is_some()
    }

    /// Host CPU `h`'s next VM entry, prepared (inject, the one event commit, the preemption
    /// timer): the entry of the vCPU it is running, or of a vCPU picked now (one no other CPU
    /// runs). `Turn::Sleep` when it has nothing to run, `Turn::Done` when every guest stopped.
    /// [`RunLoop::enter`] runs the guest, [`RunLoop::finish`] dispatches its exit; the three,
    /// interleaved over CPUs, are the loop of every CPU (docs/SCHEDULING.md, "Host CPUs").
    pub fn begin(&mut self, h: usize) -> Turn {
        if self.hosts.len() > 1 {
            // COM1's receive FIFO lasts 1.4 ms at 115200 baud: it is read at every turn of the
            // loop, on whichever CPU has it (CPU 0 may be in guest mode or waiting for the lock
            // that long), into `Operator::keys`, which CPU 0 acts on in order.
            self.acting = h;
            self.cpu.on_host(h);
            self.take_keys();
        }
        let turn = loop {
            if self.hosts[h].running.is_none() {
                match self.pick_turn(h) {
                    Turn::Enter => {}
                    other => break other,
                }
            }
            if self.prepare(h) {
                break Turn::Enter;
            }
        };
        // The last thing before the lock is let go (an exit's `finish` and this are one turn
        // with it): what this turn's device work raised for vCPUs of other CPUs.
        if self.hosts.len() > 1 {
            self.place_raised(h);
        }
        turn
    }

    /// The wakes, the housekeeping (host CPU 0 only: the console, the control channel, the log,
    /// the load policy) and the pick of host CPU `h`, which runs no vCPU.
    fn pick_turn(&mut self, h: usize) -> Turn {
        self.acting = h;
        self.cpu.on_host(h);
        self.hosts[h].asleep = false;
        self.hosts[h].kicked = false;
        // The wakes come first: the halted vCPUs whose interrupts came by now are runnable, and
        // the timers of those still halted are looked at once for the whole pick (`HaltedDue`).
        let early = core::mem::take(&mut self.hosts[h].wake_due) && !self.unsettled;
        let mut now = self.cpu.rdtsc();
        let (mut live, woke, mut due) = self.wake_halted(now);
        // CPU 0's housekeeping (the console, the control channel, held monitor lines, the log,
        // the guests' console lines) is put off at a pick in three cases, and never once it last
        // ended a quantum ago (nor while a command left vCPUs to settle): so two are at most a
        // quantum and a slice apart, however many picks in a row would put it off.
        // - The idle fast path: CPU 0 slept until the time it was to wake, or its slice was cut
        //   short for a woken vCPU (`SliceEnd::Interrupted`), and a halted vCPU's interrupt has
        //   come (its guest's timer): it is picked before the housekeeping, so the interrupt is
        //   not late by it. A wake that woke nobody (a timer whose line is masked) does it.
        // - A halted vCPU's timer falls due before it would end (by how long it took last time):
        //   that vCPU's interrupt would wait for it. A housekeeping shorter than the minimum gap
        //   Keel keeps between a guest's timer exits is not worth the look.
        // - It ran less than `HOUSEKEEPING_GAP_DIVISOR`'s millisecond ago and no key waits: guests
        //   that switch often (YIELD, short halts) do not pay it at every switch. COM1's FIFO is
        //   emptied at every piece's end and here, COM2's (16 bytes, 1.4 ms at 115200 baud) lasts
        //   longer than the gap, and the log and the replies wait at most that long.
        //   Before CPU 0 sleeps it runs all the same (below).
        let since = now.saturating_sub(self.chores.at);
        let may_put_off = h == 0 && !self.unsettled && since < self.sched.quantum;
        let soon = may_put_off
            && !(early && woke)
            && since < self.cfg.tsc_hz / HOUSEKEEPING_GAP_DIVISOR
            && self.ops.keys.is_empty();
        let put_off =
            may_put_off && ((early && woke) || soon || self.chores_would_delay(&due, now));
        if h == 0 && put_off {
            // Not the housekeeping, but COM1's FIFO emptied: keys must not overflow it meanwhile.
            self.take_keys();
        }
        if h == 0 && !put_off {
            self.housekeeping(h, now);
            self.platforms_reached();
            // A command may have changed any guest, and timers fell due meanwhile.
            now = self.chores.at;
            (live, _, due) = self.wake_halted(now);
        }
        if h == 0 {
            self.ops.started.get_or_insert(now);
            if self.policy_turn(now) {
                self.platforms_reached();
                (live, _, due) = self.wake_halted(now);
            }
        }
        if !live {
            return Turn::Done;
        }
        if !self.ops.held.is_empty() {
            // Monitor lines wait for the other CPUs to leave guest mode: nobody starts a slice.
            self.hosts[h].asleep = true;
            let poll = self.cfg.tsc_hz / 10_000;
            return Turn::Sleep {
                wake: now + poll,
                max: if h == 0 { poll } else { self.sched.quantum },
            };
        }
        self.shares.refill(now);
        // The list of every vCPU, kept from the last pick unless a guest was added since: guests
        // are only ever appended (`slots`), and a guest's vCPUs are fixed when it is created.
        let mut seats = core::mem::take(&mut self.seat_list);
        let last = self
            .slots
            .len()
            .checked_sub(1)
            .map(|i| (i, self.slots[i].vcpus.len()));
        if seats.last().map(|&(i, c)| (i, c + 1)) != last {
            seats = self.seats();
        }
        debug_assert_eq!(seats, self.seats());
        if self.hosts.len() > 1 {
            self.catch_up(&seats);
        }
        let slots = &self.slots;
        let shares = &self.shares;
        let hosts = &self.hosts;
        // With one host CPU, the one picking runs nothing: no vCPU is taken.
        let alone = hosts.len() == 1;
        // The run state first: the test that most often fails, and one slot looked up once.
        let runnable = |k: usize| {
            let Some((s, i, c)) = seats.get(k).and_then(|&(i, c)| Some((slots.get(i)?, i, c)))
            else {
                return false;
            };
            s.vcpus
                .get(c)
                .is_some_and(|v| v.state == RunState::Runnable)
                && s.live()
                && s.deferred.is_empty()
                && shares.may_run(i)
                && s.may_run_on(h)
                && (alone || !hosts.iter().any(|o| o.runs((i, c))))
        };
        let woken = |k: usize| {
            seats
                .get(k)
                .and_then(|&(i, c)| slots.get(i)?.seats.get(c))
                .is_some_and(|seat| seat.woken)
        };
        let picked = if hosts.len() == 1 {
            self.sched.pick_urgent_first(seats.len(), runnable, woken)
        } else {
            // Woken first, then the one furthest below its share of the machine.
            let candidates = (0..seats.len()).filter(|&k| runnable(k)).map(|k| {
                let seat = &slots[seats[k].0].seats[seats[k].1];
                let candidate = crate::sched::Candidate {
                    vtime: seat.vtime,
                    woken: seat.woken,
                    // An interrupted vCPU is first in line (`end_slice`).
                    interrupted: seat.left_at == 0,
                    here: seat.last_host == Some(h),
                    left_at: seat.left_at,
                };
                (k, candidate)
            });
            crate::sched::pick_fairest(candidates, self.cfg.quantum * crate::sched::AFFINITY_QUANTA)
        };
        let picked = picked.map(|k| seats[k]);
        self.seat_list = seats;
        match picked {
            Some(seat) => {
                self.start_slice(h, seat, Some(due));
                if self.hosts[h].running.is_some() {
                    Turn::Enter
                } else {
                    // It stopped before its first entry (its VMCS could not be loaded).
                    self.pick_turn(h)
                }
            }
            None if soon && !self.chores_would_delay(&due, now) => {
                // Nothing to run, and the housekeeping was put off only because it ran a moment
                // ago: it runs before CPU 0 sleeps (the log, replies and console lines would
                // wait for the wake otherwise), and the pick again after it.
                self.chores.at = 0;
                self.pick_turn(h)
            }
            None => {
                // Every live vCPU is halted or taken: sleep until the earliest guest timer (or at
                // most one quantum, in case an interrupt source has no deadline).
                let t0 = self.cpu.rdtsc();
                let mut wake = due.except(None).unwrap_or(t0 + self.sched.quantum);
                // A capped guest that used its budget runs again when the next period starts.
                if self.shares.any_cap() {
                    wake = wake.min(self.shares.period_end());
                }
                // While console output or a control-channel reply is queued, wake often enough
                // to keep the UART busy (16 bytes of FIFO last 1.4 ms at 115200 baud).
                let max = if h == 0
                    && (crate::log::busy() || !self.ops.reply.is_empty() || self.control_busy())
                {
                    self.cfg.tsc_hz / 1000
                } else {
                    self.sched.quantum
                };
                self.hosts[h].asleep = true;
                self.hosts[h].switch_from = None;
                Turn::Sleep { wake, max }
            }
        }
    }

    /// Whether CPU 0's housekeeping, begun at `now`, would end after a halted vCPU's timer falls
    /// due (by how long it took last time), one that is worth the look: longer than the minimum
    /// gap Keel keeps between a guest's timer exits.
    fn chores_would_delay(&self, due: &HaltedDue, now: u64) -> bool {
        self.chores.took >= self.cfg.min_gap()
            && due
                .except(None)
                .is_some_and(|d| d <= now.saturating_add(self.chores.took))
    }

    /// CPU 0's housekeeping at a pick (`now`): the console, the control channel, held monitor
    /// lines, vCPUs left to settle, the log and the guests' console lines to COM1's queue.
    fn housekeeping(&mut self, h: usize, now: u64) {
        self.poll_console();
        self.poll_control();
        self.run_held();
        if core::mem::take(&mut self.unsettled) {
            (0..self.slots.len()).for_each(|i| self.settle(h, i));
        }
        crate::log::pump();
        // Console lines that found no room on COM1's queue before (stopped guests' too).
        for s in &mut self.slots {
            print_console(&mut s.vm, PRINT_BUDGET);
        }
        let t1 = self.cpu.rdtsc();
        self.chores = Chores {
            at: t1,
            took: t1.saturating_sub(now),
        };
    }

    /// Brings every vCPU that wants the CPU to within `sched::LAG_QUANTA` of virtual time of the
    /// one furthest ahead (`sched::catch_up`): time it did not want (halted, paused, capped, not
    /// yet started) is no claim on the machine's future.
    fn catch_up(&mut self, seats: &[(usize, usize)]) {
        let wants = |s: &Slot<C::Vcpu>, i: usize, c: usize| {
            s.live()
                && s.vcpus[c].state == RunState::Runnable
                && s.deferred.is_empty()
                && self.shares.may_run(i)
        };
        let ahead = seats
            .iter()
            .filter(|&&(i, c)| wants(&self.slots[i], i, c))
            .map(|&(i, c)| self.slots[i].seats[c].vtime)
            .max();
        let Some(ahead) = ahead else {
            return;
        };
        let lag = self.cfg.quantum.saturating_mul(crate::sched::LAG_QUANTA);
        for &(i, c) in seats {
            if wants(&self.slots[i], i, c) {
                let seat = &mut self.slots[i].seats[c];
                seat.vtime = crate::sched::catch_up(seat.vtime, ahead, lag);
            }
        }
    }

    /// Wakes the halted vCPUs whose interrupts came by host TSC `now` (their guests' timers
    /// advanced to it): whether any guest is live, whether a vCPU woke, and the first timers of
    /// the guests with a vCPU still halted (as [`RunLoop::halted_due`] finds them, in the same
    /// pass).
    fn wake_halted(&mut self, now: u64) -> (bool, bool, HaltedDue) {
        let (mut live, mut woke, mut due) = (false, false, HaltedDue::default());
        for (j, s) in self.slots.iter_mut().enumerate() {
            // A runnable guest waiting for its turn has its clock stopped (see
            // `Slot::waiting_since`); only halted vCPUs need their timers checked here. (A
            // stopped guest has none: all its vCPUs stop with it.)
            if !s.vcpus.iter().any(|v| v.state == RunState::Halted) {
                live = live || s.live();
                continue;
            }
            live = true;
            let t = s.vm.now_seen(now);
            s.vm.platform.advance(t);
            let mut still = false;
            for c in 0..s.vcpus.len() {
                let halted = s.vcpus[c].state == RunState::Halted;
                s.wake(c, now);
                let state = &s.vcpus[c].state;
                woke |= halted && *state == RunState::Runnable;
                still |= *state == RunState::Halted;
            }
            if still {
                if let Some(d) = s.vm.first_timer() {
                    due.add(d, j);
                }
            }
        }
        (live, woke, due)
    }

    /// The first timers of the guests with a halted vCPU ([`HaltedDue`]): when a running vCPU
    /// must make room, or when Keel must wake from idle. Stopped and paused guests do not count.
    fn halted_due(&self) -> HaltedDue {
        let mut due = HaltedDue::default();
        for (j, s) in self.slots.iter().enumerate() {
            if !s.live() || !s.vcpus.iter().any(|v| v.state == RunState::Halted) {
                continue;
            }
            if let Some(d) = s.vm.first_timer() {
                due.add(d, j);
            }
        }
        due
    }

    /// Switches vCPU `seat`'s registers into host CPU `h` if they are not there: the previous
    /// vCPU's are saved, this one's restored.
    fn switch_to(&mut self, h: usize, seat: (usize, usize)) {
        if self.hosts[h].in_cpu == Some(seat) {
            return;
        }
        self.switch_out_of(h);
        let (i, c) = seat;
        let s = &mut self.slots[i];
        self.cpu.restore(&mut s.hw, c, s.vcpus[c].xcr0);
        self.hosts[h].in_cpu = Some(seat);
    }

    /// Saves the registers of the vCPU in the CPU the loop acts on, if any: before another
    /// vCPU's are loaded, or a new guest boots.
    pub fn switch_out(&mut self) {
        self.switch_out_of(self.acting);
    }

    /// Saves the registers of the vCPU in host CPU `h`, if any.
    fn switch_out_of(&mut self, h: usize) {
        if let Some((i, c)) = self.hosts[h].in_cpu.take() {
            self.cpu.save(&mut self.slots[i].hw, c);
        }
    }

    /// Marks vCPU `seat` as running on host CPU `h` and starts its time slice (or what is left of
    /// one).
    fn start_slice(&mut self, h: usize, seat: (usize, usize), due: Option<HaltedDue>) {
        let (i, c) = seat;
        if h < 64 {
            self.slots[i].ran_on |= 1 << h;
        }
        if self.hosts.len() > 1 {
            let gen = self.slots[i].ept_gen;
            let seen = &mut self.hosts[h].ept_seen;
            if seen.len() < self.slots.len() {
                seen.resize(self.slots.len(), 0);
            }
            if seen[i] != gen {
                if let Err(e) = self.cpu.flush_ept(&mut self.slots[i].hw) {
                    self.stop_or_defer(h, i, StopReason::Killed(e));
                    return;
                }
                self.hosts[h].ept_seen[i] = gen;
            }
            // The guest's INVLPGs and CR3 writes on other CPUs since it last ran here did not
            // reach this CPU's TLB (SDM Vol. 3C 29.4.3.1), nor did its boot's INVVPID: the
            // vCPU's VPID is invalidated here first. (EPT-derived translations are `ept_gen`'s.)
            if self.slots[i].seats[c].tlb_on != Some(h) {
                let s = &mut self.slots[i];
                if let Err(e) = self.cpu.flush_vpid(&mut s.hw, s.vm.id, c) {
                    self.stop_or_defer(h, i, StopReason::Killed(e));
                    return;
                }
                self.slots[i].seats[c].tlb_on = Some(h);
            }
        }
        self.switch_to(h, seat);
        // Its weight in quanta (or what a woken vCPU left of that), no more than a capped
        // guest's budget has left.
        let allowed = self.shares.slice(i);
        let left = self.slots[i].seats[c]
            .slice_left
            .take()
            .map_or(allowed, |left| left.min(allowed));
        // What is left of the slice is held from a capped budget while it runs.
        self.shares.hold(i, left);
        let epoch = self.slots[i].epoch;
        // Built once, in its place.
        let piece = self.plan_piece(h, seat, left, due);
        self.hosts[h].running = Some(Running {
            seat,
            epoch,
            left,
            piece,
        });
    }

    /// Starts a piece of host CPU `h`'s slice. While the control channel is busy its FIFO is read
    /// every millisecond: the slice runs in pieces of at most that, the same vCPU going on after
    /// each read, so its length (the guest's weight) is what it would have been. `due`: the
    /// halted guests' timers if the pick found them with nothing changed since.
    fn start_piece(&mut self, h: usize, due: Option<HaltedDue>) -> bool {
        let Some(r) = self.hosts[h].running.as_ref() else {
            return false;
        };
        let (seat, left) = (r.seat, r.left);
        let piece = self.plan_piece(h, seat, left, due);
        if let Some(r) = self.hosts[h].running.as_mut() {
            r.piece = piece;
        }
        true
    }

    /// The next piece of vCPU `(i, c)`'s slice on host CPU `h`, of which `left` cycles are left
    /// ([`RunLoop::start_piece`]).
    #[inline(always)]
    fn plan_piece(
        &mut self,
        h: usize,
        (i, c): (usize, usize),
        left: u64,
        due: Option<HaltedDue>,
    ) -> Piece {
        let cfg = self.cfg;
        let busy = h == 0 && self.control_busy();
        let piece = if busy {
            left.min(cfg.tsc_hz / 1000)
        } else {
            left
        };
        let ran_before = self.slots[i].vcpus[c].stats.cpu_cycles;
        // When a halted vCPU's timer falls due, this slice ends early so that vCPU can run.
        let others_due = due.unwrap_or_else(|| self.halted_due()).except(Some(i));
        if self.hosts.len() > 1 && self.elsewhere(h, i).is_some() {
            // Another of its vCPUs is on a CPU: the guest's clock has been running (a wake
            // meanwhile marked it waiting), and its other VMCSs hold the offset as it is.
            self.slots[i].waiting_since = None;
        }
        let t0 = self.cpu.rdtsc();
        let s = &mut self.slots[i];
        s.seats[c].woken = false;
        let untouched = core::mem::take(&mut s.seats[c].untouched);
        // The guest's clock restarts at the piece's first entry (`Piece::start_at_entry`), with the
        // VMCS loaded for it: whatever the loop does until then is not the guest's time.
        let waited = if cfg.tsc_offsetting {
            s.waiting_since.take()
        } else {
            s.waiting_since = None;
            None
        };
        let xcr0 = s.vcpus[c].xcr0;
        // Learned only where the tight loop waits for an early timer exit (`run_piece`, one
        // CPU); the loop of several CPUs has no such wait and keeps the fixed lead.
        let lead = self.hosts[h].lead.0;
        Piece {
            lead,
            whole: piece == left,
            t0,
            ran_before,
            others_due,
            fresh: true,
            len: piece,
            waited,
            offsetting: cfg.tsc_offsetting,
            touched: !untouched,
            xcr0,
            ..Piece::default()
        }
    }

    /// Host CPU `h`'s piece of a slice ended by `end`: it is charged to the guest, and the slice
    /// goes on with a new piece (true) or ends (false).
    fn piece_ended(&mut self, h: usize, end: SliceEnd) -> bool {
        let host = &mut self.hosts[h];
        let Some(r) = host.running.as_mut() else {
            return false;
        };
        let (i, c) = r.seat;
        // What the piece learned of the preemption timer's lead (`learned_lead`).
        host.lead = Lead(r.piece.lead);
        if r.piece.fresh {
            // It never entered: the time it waited is still to come off its clock.
            if let Some(since) = r.piece.waited.take() {
                self.slots[i].waiting_since.get_or_insert(since);
            }
        }
        let ran = self.slots[i].vcpus[c].stats.cpu_cycles - r.piece.ran_before;
        self.shares.charge(i, ran);
        let seat = &mut self.slots[i].seats[c];
        seat.vtime = crate::sched::advance(seat.vtime, ran, self.shares.weight(i));
        // The slice is measured as one would be: by the clock, Keel's exits included.
        let elapsed = self.cpu.rdtsc().saturating_sub(r.piece.t0).max(1);
        self.shares.release(i, elapsed.min(r.left));
        r.left = r.left.saturating_sub(elapsed);
        let (whole, left) = (r.piece.whole, r.left);
        // The piece ran to its end (not given up before it: a YIELD, a monitor line waiting).
        let ran_out = r.piece.now >= r.piece.deadline;
        if h == 0 {
            self.take_keys();
        }
        if matches!(end, SliceEnd::Interrupted) {
            // A halted vCPU's timer fell due (or an IPI woke one): it runs before the
            // housekeeping, which in Bochs next to flooding guests took longer than a 100 Hz
            // tick's period.
            self.hosts[h].wake_due = true;
        }
        if !whole && ran_out && matches!(end, SliceEnd::Over) {
            self.poll_control();
            // A command may have paused, stopped or replaced it meanwhile.
            let s = &self.slots[i];
            if left != 0 && s.live() && s.vcpus[c].state == RunState::Runnable {
                self.start_signals(i);
                self.switch_to(h, (i, c));
                return self.start_piece(h, None);
            }
        }
        self.end_slice(h, end);
        false
    }

    /// Host CPU `h`'s slice ended by `end`: the vCPU leaves the CPU, and the loop acts on how it
    /// ended.
    fn end_slice(&mut self, h: usize, end: SliceEnd) {
        // What it needs of the slice, read in place: the slice (and its piece) is not moved out.
        let Some(r) = self.hosts[h].running.as_ref() else {
            return;
        };
        let ((i, c), left, fresh, touched, now) =
            (r.seat, r.left, r.piece.fresh, r.piece.touched, r.piece.now);
        self.hosts[h].running = None;
        self.shares.release(i, left);
        self.acting = h;
        // Left at an exit that touched nothing of its platform (`Seat::untouched`).
        let untouched = self.hosts.len() == 1
            && self.slots[i].vcpus.len() == 1
            && matches!(end, SliceEnd::Over)
            && !fresh
            && !touched;
        if let Some(seat) = self.slots[i].seats.get_mut(c) {
            seat.untouched = untouched;
            if core::mem::take(&mut seat.init_pending) {
                // The INIT that came while it ran here: its registers are back in the loop now.
                let v = &mut self.slots[i].vcpus[c];
                if v.state.is_live() {
                    v.reset();
                    v.state = RunState::WaitForSipi;
                }
            }
        }
        if self.hosts.len() > 1 {
            // The guest's clock stops only once none of its vCPUs is on a CPU: from this exit,
            // if this vCPU was the last (not from an earlier wake or exit, while others ran).
            let elsewhere = self.elsewhere(h, i).is_some();
            let s = &mut self.slots[i];
            s.waiting_since = match s.waiting_since {
                _ if elsewhere => None,
                Some(since) => Some(since.max(now)),
                None => None,
            };
            self.hosts[h].switch_from = Some(now);
            // An interrupted vCPU is first in line again (`RoundRobin::interrupted` with one CPU).
            let left_at = match end {
                SliceEnd::Interrupted => 0,
                _ => self.cpu.rdtsc(),
            };
            if let Some(seat) = self.slots[i].seats.get_mut(c) {
                seat.left_at = left_at;
            }
        }
        // INIT and SIPI the vCPU sent to its siblings (ICR writes): their run states change.
        self.start_signals(i);
        match end {
            SliceEnd::Over => {}
            SliceEnd::Interrupted => self.sched.interrupted(),
            SliceEnd::Stop(reason) => self.stop_or_defer(h, i, reason),
            SliceEnd::StatsRequested => self.print_stats_for((i, c)),
            SliceEnd::Balloon => self.defer_or_act(h, i, Deferred::Balloon(c)),
        }
        // The last of the guest's vCPUs on another CPU may have left: what waited for that.
        if !self.slots[i].deferred.is_empty() && self.elsewhere(h, i).is_none() {
            for act in core::mem::take(&mut self.slots[i].deferred) {
                self.act(i, act);
            }
        }
        if self.hosts.len() > 1 {
            // A guest booted again has vCPU 0's registers in this CPU, a vCPU started has its
            // VMCS loaded here.
            self.settle(h, i);
            self.kick_idle();
        }
    }

    /// vCPU `seat` leaves host CPU `h`, where several CPUs run vCPUs: its registers are saved and
    /// its VMCS cleared (VMCLEAR), so that any CPU may load it next (SDM Vol. 3C 25.11.1: a VMCS
    /// is current on one CPU at a time; its next entry is a VMLAUNCH). With one CPU it stays
    /// loaded and its registers stay in the CPU until another vCPU needs them.
    fn leave(&mut self, h: usize, seat: (usize, usize)) {
        let (i, c) = seat;
        if self.hosts[h].in_cpu == Some(seat) {
            self.switch_out_of(h);
        }
        if let Err(e) = self.cpu.release(&mut self.slots[i].hw, c) {
            // Its VMCS may still be cached on this CPU: nobody may load it elsewhere.
            error!("guest {}: vCPU {c}: {e}", self.slots[i].vm.name);
            for v in self.slots[i].vcpus.iter_mut() {
                let _ = v
                    .state
                    .stop(StopReason::Killed(alloc::format!("VMCLEAR failed: {e}")));
            }
        }
    }

    /// Where several CPUs run vCPUs: leaves host CPU `h` holding no vCPU's state but the one it
    /// runs. The registers in it are saved, and every VMCS of guest `i` it may have loaded (to
    /// boot, restore, start or inspect a vCPU) is cleared, unless a CPU runs that vCPU (its
    /// VMCS is active there, or here for `h`'s own). VMCLEAR of an inactive VMCS only sets its
    /// launch state to clear (SDM Vol. 3C 25.11.3), so clearing them all is safe.
    fn settle(&mut self, h: usize, i: usize) {
        if self.hosts.len() == 1 {
            return;
        }
        let own = self.running_on(h);
        if self.hosts[h].in_cpu.is_some() && self.hosts[h].in_cpu != own {
            self.switch_out_of(h);
        }
        for c in 0..self.slots[i].vcpus.len() {
            if self.host_of((i, c)).is_none() {
                self.leave(h, (i, c));
            }
        }
    }

    /// Prepares host CPU `h`'s next entry: the interrupts and the event to inject, the
    /// VMX-preemption timer. False when the slice ended instead (an event that cannot be
    /// delivered stops the guest).
    fn prepare(&mut self, h: usize) -> bool {
        self.acting = h;
        self.cpu.on_host(h);
        let cfg = self.cfg;
        let Some(((_, c), p, hw, g)) = running_parts(&mut self.hosts, &mut self.slots, h) else {
            return false;
        };
        let prepared = match self.cpu.load(hw, c) {
            Ok(mut v) => before_entry(&mut self.cpu, &mut v, g.vm, g.vcpu, p, cfg),
            Err(e) => Err(StopReason::Killed(e)),
        };
        match prepared {
            Ok(()) => {
                self.note_entry(h);
                true
            }
            Err(reason) => self.piece_ended(h, SliceEnd::Stop(reason)) && self.prepare(h),
        }
    }

    /// Host CPU `h` is about to enter its vCPU: the IPI it was sent and the switch to it, if
    /// any, are timed ([`Figures`]).
    fn note_entry(&mut self, h: usize) {
        let Some(r) = self.hosts[h].running.as_ref() else {
            return;
        };
        let ((i, c), at) = (r.seat, r.piece.reflex.entered_at);
        let Some(seat) = self.slots[i].seats.get_mut(c) else {
            return;
        };
        let f = &mut self.figures;
        if let Some((sent, from)) = seat.ipi_sent.take() {
            let e = &mut f.ipi[usize::from(from != h)];
            *e = (e.0 + 1, e.1 + at.saturating_sub(sent));
        }
        if let Some(t) = self.hosts[h].switch_from.take() {
            let e = &mut f.switch[usize::from(seat.last_host.is_some_and(|k| k != h))];
            *e = (e.0 + 1, e.1 + at.saturating_sub(t));
        }
        seat.last_host = Some(h);
    }

    /// Runs host CPU `h`'s vCPU until its next VM exit (the entry [`RunLoop::begin`] prepared).
    pub fn enter(&mut self, h: usize) {
        let Some((i, c)) = self.act_for(h) else {
            return;
        };
        let s = &mut self.slots[i];
        let vcpu = &mut s.vcpus[c];
        let failed = match self.cpu.load(&mut s.hw, c) {
            Ok(mut v) => self
                .cpu
                .enter(&mut v, &mut vcpu.regs)
                .err()
                .map(|e| alloc::format!("{e}")),
            Err(e) => Some(e),
        };
        let t1 = self.cpu.rdtsc();
        self.exited(h, failed, t1);
    }

    /// Host CPU `h`'s prepared entry (after [`RunLoop::begin`] said [`Turn::Enter`]), handed out
    /// so that the CPU enters the guest without the loop's lock: what the hardware needs, and a
    /// copy of the vCPU's registers, which the CPU alone holds until [`RunLoop::reattach`]
    /// (nothing else may change them meanwhile: an INIT waits for the vCPU's exit). `None` when
    /// there is no entry to make (its VMCS could not be loaded: [`RunLoop::finish`] ends the
    /// slice).
    pub fn detach(&mut self, h: usize) -> Option<(C::Detached, GuestRegs)> {
        let (i, c) = self.act_for(h)?;
        let s = &mut self.slots[i];
        match self.cpu.detach(&mut s.hw, c) {
            Ok(d) => Some((d, s.vcpus[c].regs)),
            Err(e) => {
                let t1 = self.cpu.rdtsc();
                self.exited(h, Some(e), t1);
                None
            }
        }
    }

    /// Host CPU `h` is back from the entry [`RunLoop::detach`] handed out, at host TSC
    /// `exited_at`, with the vCPU's registers `regs`; `entered` says whether VMLAUNCH/VMRESUME
    /// failed. [`RunLoop::finish`] dispatches the exit.
    pub fn reattach(
        &mut self,
        h: usize,
        d: C::Detached,
        regs: GuestRegs,
        entered: Result<(), VmxError>,
        exited_at: u64,
    ) {
        let Some((i, c)) = self.act_for(h) else {
            return;
        };
        let s = &mut self.slots[i];
        self.cpu.reattach(&mut s.hw, c, d);
        s.vcpus[c].regs = regs;
        self.exited(h, entered.err().map(|e| alloc::format!("{e}")), exited_at);
    }

    /// The calls that follow are host CPU `h`'s: the vCPU it runs, if any.
    fn act_for(&mut self, h: usize) -> Option<(usize, usize)> {
        self.acting = h;
        self.cpu.on_host(h);
        Some(self.hosts[h].running.as_ref()?.seat)
    }

    /// Host CPU `h`'s vCPU left guest mode at host TSC `t1` (or could not enter: `failed`).
    ///
    /// With several host CPUs the exit waited for the loop's lock from `t1` to now (another CPU
    /// held it: a pick, another guest's exit, a command). That wait is Keel's, not the guest's,
    /// as a wait for the CPU is: if none of the guest's vCPUs is on another CPU (its clock is
    /// this vCPU's alone), the wait comes off the guest's clock (its TSC offset, written at the
    /// next entry), so two readings of its PIT, LAPIC timer or TSC a few exits apart are as far
    /// apart as the guest's own time between them, however busy the other CPUs are. A guest
    /// with vCPUs on other CPUs keeps its clock running: they see it.
    fn exited(&mut self, h: usize, failed: Option<String>, t1: u64) {
        let now = self.cpu.rdtsc();
        let Some((i, c)) = self.hosts[h].running.as_ref().map(|r| r.seat) else {
            return;
        };
        let elsewhere = self.hosts.len() > 1 && self.elsewhere(h, i).is_some();
        let Some(r) = self.hosts[h].running.as_mut() else {
            return;
        };
        let p = &mut r.piece;
        self.slots[i].vcpus[c].stats.cpu_cycles += t1.saturating_sub(p.reflex.entered_at);
        p.entry_failed = failed;
        let vm = &mut self.slots[i].vm;
        if self.cfg.tsc_offsetting && !elsewhere {
            // Back to the exit's time, or to the latest time another CPU used meanwhile (a wake
            // of a halted sibling, a key), whichever is later.
            let floor = vm.now(t1).max(vm.clock_seen);
            let waited = vm.now(now).saturating_sub(floor);
            if waited != 0 {
                vm.tsc_offset = vm.tsc_offset.wrapping_sub(waited);
                // Its timers fall due later in host time by as much: the deadline kept is early,
                // so at worst one platform look finds nothing due and takes the new one.
                p.offset_moved = true;
            }
        }
        vm.now_seen(now);
        p.now = now;
    }

    /// Dispatches the VM exit of host CPU `h`'s vCPU and accounts for it: true if the slice goes
    /// on (call [`RunLoop::begin`] for its next entry), false if it ended.
    pub fn finish(&mut self, h: usize) -> bool {
        self.acting = h;
        self.cpu.on_host(h);
        if self.hosts.len() > 1 {
            // As in `begin`: COM1 is read at every turn, whichever CPU has the loop.
            self.take_keys();
        }
        let kicked = core::mem::take(&mut self.hosts[h].kicked);
        let Some(r) = self.hosts[h].running.as_mut() else {
            return false;
        };
        let (i, c) = r.seat;
        if r.epoch != self.slots[i].epoch {
            // Booted again or restored while it ran here: what it did is dropped with the old
            // guest, and so are its registers in this CPU.
            self.shares.release(i, r.left);
            self.hosts[h].running = None;
            self.hosts[h].in_cpu = None;
            return false;
        }
        let p = &mut r.piece;
        if let Some(e) = p.entry_failed.take() {
            return self.piece_ended(h, SliceEnd::Stop(StopReason::EntryFailed(e)));
        }
        let now = p.now;
        let (hw, g) = self.slots[i].parts(c);
        let next = match self.cpu.load(hw, c) {
            Ok(mut v) => {
                let raw = v.read(ReadOnly32::ExitReason);
                after_exit(&mut self.cpu, &mut v, g, c, p, (raw, None), kicked)
            }
            Err(e) => Next::End(SliceEnd::Stop(StopReason::Killed(e))),
        };
        let next = match next {
            // Monitor lines wait for this CPU, or an act on the whole guest does: it leaves now.
            // (An IPI it sent is in its targets' APICs: a halted one wakes at the next pick.)
            Next::Go | Next::Ipi(_)
                if !self.ops.held.is_empty() || !self.slots[i].deferred.is_empty() =>
            {
                self.slots[i].waiting_since.get_or_insert(now);
                Next::End(SliceEnd::Over)
            }
            next => next,
        };
        self.follow(h, (i, c), next)
    }

    /// What host CPU `h` does after vCPU `seat`'s exit, by `next`: true if its slice goes on.
    fn follow(&mut self, h: usize, seat: (usize, usize), next: Next) -> bool {
        let (i, c) = seat;
        match next {
            Next::Go => true,
            Next::End(end) => self.piece_ended(h, end),
            Next::Ipi(targets) => {
                let now = self.hosts[h].running.as_ref().map_or(0, |r| r.piece.now);
                for (t, seat) in self.slots[i].seats.iter_mut().enumerate().take(64) {
                    if targets & (1 << t) != 0 {
                        seat.ipi_sent.get_or_insert((now, h));
                    }
                }
                if self.place_ipis(h, i, targets) {
                    return true;
                }
                // The sender makes room for its targets on this CPU: they run next, and it
                // gets the rest of its slice after them.
                let Some(r) = self.hosts[h].running.as_mut() else {
                    return false;
                };
                let (s, p) = (&mut self.slots[i], &r.piece);
                s.waiting_since = Some(p.now);
                s.seats[c].slice_left = Some(p.deadline.saturating_sub(p.now));
                self.piece_ended(h, SliceEnd::Interrupted)
            }
        }
    }

    /// An IPI from a vCPU of guest `i` on host CPU `h` reached the vCPUs in `targets` (a bit
    /// each): one running on another CPU is kicked out of guest mode there, to take it at its
    /// next entry; one it woke (or started) is handed to a sleeping CPU, kicked awake for it.
    /// False when a target is left with no CPU to run on: the sender then makes room.
    fn place_ipis(&mut self, h: usize, i: usize, targets: u64) -> bool {
        if self.hosts.len() == 1 {
            return false;
        }
        self.start_signals(i);
        // The vCPUs started have their VMCSs loaded here: cleared, for any CPU to take them.
        self.settle(h, i);
        let now = self.cpu.rdtsc();
        let mut placed = true;
        for t in 0..self.slots[i].vcpus.len().min(64) {
            if targets & (1 << t) == 0 {
                continue;
            }
            if !self.reach(h, (i, t), now) {
                continue;
            }
            match self.sleeping_host_for(i) {
                Some(k) => self.kick_host(k),
                None => placed = false,
            }
        }
        placed
    }

    /// An interrupt came for vCPU `seat` (an IPI, a device's): if another CPU runs it, that CPU
    /// is kicked out of guest mode to take it at its next entry (host CPU `h`'s own takes it at
    /// its next entry anyway); if it is halted, it is woken. True if it is runnable and on no
    /// CPU: it needs one.
    fn reach(&mut self, h: usize, seat: (usize, usize), now: u64) -> bool {
        if let Some(k) = self.host_of(seat) {
            if k != h {
                self.kick_host(k);
            }
            return false;
        }
        let (i, t) = seat;
        let s = &mut self.slots[i];
        if s.vcpus[t].state == RunState::Halted {
            let at = s.vm.now_seen(now);
            s.vm.platform.advance(at);
            s.wake(t, now);
        }
        s.vcpus[t].state == RunState::Runnable
    }

    /// A sleeping host CPU that may run guest `i`'s vCPUs, if any.
    fn sleeping_host_for(&self, i: usize) -> Option<usize> {
        let slot = &self.slots[i];
        (0..self.hosts.len()).find(|&k| self.hosts[k].asleep && slot.may_run_on(k))
    }

    /// Where several CPUs run vCPUs: the vCPUs a device interrupt reached since the last look
    /// (an IOAPIC message, the 8259A's INTR: `Platform::take_raised`; raised by an exit's port
    /// or MMIO access, a timer that fell due, a key pushed into a UART) are told, as an IPI's
    /// targets are ([`RunLoop::place_ipis`]): one in guest mode on another CPU is kicked out to
    /// take the interrupt at its next entry, a halted one is woken, and a sleeping CPU is kicked
    /// awake for one that is runnable and on no CPU. Host CPU `h`'s own vCPU takes it at its
    /// next entry already (its platform is looked at after the exit or the pick that raised it).
    /// Without this the interrupt waited for the target's slice to end, or for its CPU's sleep
    /// to end: up to a quantum.
    fn place_raised(&mut self, h: usize) {
        let now = self.cpu.rdtsc();
        for i in 0..self.slots.len() {
            let raised = self.slots[i].vm.platform.take_raised();
            if raised == 0 || !self.slots[i].live() {
                continue;
            }
            for t in 0..self.slots[i].vcpus.len().min(64) {
                if raised & (1 << t) == 0 {
                    continue;
                }
                if !self.reach(h, (i, t), now) || !self.shares.may_run(i) {
                    continue;
                }
                if let Some(k) = self.sleeping_host_for(i) {
                    self.kick_host(k);
                }
            }
        }
    }

    /// The host CPU running vCPU `seat`, if any.
    fn host_of(&self, seat: (usize, usize)) -> Option<usize> {
        self.hosts.iter().position(|o| o.runs(seat))
    }

    /// Interrupts host CPU `h`: out of guest mode (its vCPU's run state and interrupts are looked
    /// at again at its next exit) or out of its sleep.
    fn kick_host(&mut self, h: usize) {
        let o = &mut self.hosts[h];
        o.asleep = false;
        if o.running.is_some() {
            o.kicked = true;
        }
        self.cpu.kick(h);
    }

    /// Kicks every host CPU running a vCPU of guest `i`: it was paused, stopped or replaced.
    fn kick_guest(&mut self, i: usize) {
        for h in 0..self.hosts.len() {
            if self.hosts[h]
                .running
                .as_ref()
                .is_some_and(|r| r.seat.0 == i)
            {
                self.kick_host(h);
            }
        }
    }

    /// Wakes a sleeping host CPU for each runnable vCPU that no CPU runs.
    fn kick_idle(&mut self) {
        if self.hosts.len() == 1 {
            return;
        }
        let mut waiting: Vec<usize> = self
            .seats()
            .into_iter()
            .filter(|&(i, c)| {
                let s = &self.slots[i];
                s.live()
                    && s.vcpus[c].state == RunState::Runnable
                    && self.shares.may_run(i)
                    && self.host_of((i, c)).is_none()
            })
            .map(|(i, _)| i)
            .collect();
        for k in 0..self.hosts.len() {
            if !self.hosts[k].asleep {
                continue;
            }
            // A sleeping CPU is woken for a vCPU it may run.
            if let Some(n) = waiting.iter().position(|&i| self.slots[i].may_run_on(k)) {
                waiting.swap_remove(n);
                self.kick_host(k);
            }
        }
    }
    /// Acts on the INIT and STARTUP IPIs guest `i`'s vCPUs sent each other (SDM 10.6.1, 8.4.4):
    /// INIT puts an application processor in wait-for-SIPI, whatever it was doing; a STARTUP
    /// IPI starts one that waits, in real mode at CS = vector << 8 (base vector << 12), IP 0,
    /// with the registers of the INIT state (SDM 9.1.1, Table 9-1). A SIPI to a vCPU not
    /// waiting for one is ignored, as the processor ignores it; INIT to the bootstrap processor
    /// is ignored too (Keel does not model its reset through INIT).
    #[inline]
    fn start_signals(&mut self, i: usize) {
        if self.slots[i].vm.platform.start_signals_pending() {
            self.take_start_signals(i);
        }
    }

    /// [`RunLoop::start_signals`] when there are some.
    #[inline(never)]
    fn take_start_signals(&mut self, i: usize) {
        while let Some((c, signal)) = self.slots[i].vm.platform.take_start_signal() {
            // A target in guest mode on another CPU leaves it at its next exit (its run state
            // is looked at there).
            let elsewhere = self.host_of((i, c)).filter(|&k| k != self.acting);
            let s = &mut self.slots[i];
            let Some(vcpu) = s.vcpus.get_mut(c) else {
                continue;
            };
            if c == 0 || !vcpu.state.is_live() {
                continue;
            }
            match signal {
                crate::devices::StartSignal::Init => {
                    s.seats[c] = Seat::default();
                    if let Some(k) = elsewhere {
                        // Its registers are with that CPU until its exit: reset there
                        // (`end_slice`). It leaves at that exit (its run state says so).
                        s.seats[c].init_pending = true;
                        vcpu.state = RunState::WaitForSipi;
                        self.kick_host(k);
                    } else {
                        vcpu.reset();
                        vcpu.state = RunState::WaitForSipi;
                    }
                }
                crate::devices::StartSignal::Startup(vector) => {
                    // One INITed while in guest mode on another CPU has not left it yet: its
                    // VMCS is still active there, and the SIPI is ignored as one that comes too
                    // soon after the INIT (guests wait 10 ms between the two, SDM 8.4.4.1).
                    if vcpu.state != RunState::WaitForSipi || elsewhere.is_some() {
                        continue;
                    }
                    let state = crate::loader::InitialState::startup_ipi(vector);
                    match self.cpu.load(&mut s.hw, c) {
                        Ok(mut v) => {
                            crate::vcpu::write_guest_state(
                                &mut v,
                                &state,
                                &vcpu.cr0_rules,
                                &vcpu.cr4_rules,
                            );
                            v.write(Control64::TscOffset, vcpu.vmcs_tsc_offset(s.vm.tsc_offset));
                            vcpu.regs = GuestRegs::default();
                            vcpu.state = RunState::Runnable;
                            s.seats[c].woken = true;
                            s.waiting_since.get_or_insert(self.cpu.rdtsc());
                        }
                        Err(e) => {
                            error!("guest {}: vCPU {c} cannot start: {e}", s.vm.name);
                        }
                    }
                }
            }
        }
    }

    /// The PRINT_STATS hypercall of vCPU `seat`. The table counts against the caller's share of
    /// Keel's console; when that has no room, the call says so. A table about as long as the last
    /// one must fit, or it is not even put together (a guest asking for it in a loop would keep
    /// Keel formatting tables nobody sees).
    fn print_stats_for(&mut self, seat: (usize, usize)) {
        let (i, c) = seat;
        let who = Writer::Guest(self.slots[i].vm.id);
        let last = LAST_TABLE.load(core::sync::atomic::Ordering::Relaxed);
        let now = self.cpu.rdtsc();
        if crate::log::fits(who, last) && print_stats(self.slots.iter(), who, now) {
            return;
        }
        // The answer goes back through the VMCS (it depends on the guest's mode).
        let s = &mut self.slots[i];
        let refused = match self.cpu.load(&mut s.hw, c) {
            Ok(v) => {
                exits::vmcall::print_stats_refused(&v, &mut s.vcpus[c]);
                None
            }
            Err(e) => Some(e),
        };
        if let Some(e) = refused {
            self.stop_or_defer(self.acting, i, StopReason::Killed(e));
        }
    }

    /// The BALLOON_GIVE or BALLOON_TAKE of vCPU `seat`: carried out now, its status in RAX (the
    /// VMCALL was already skipped).
    fn balloon_call(&mut self, seat: (usize, usize)) {
        let (i, c) = seat;
        let s = &mut self.slots[i];
        let Some((req, wide)) = s.vm.ram.balloon.pending.take() else {
            return;
        };
        let t0 = self.cpu.rdtsc();
        let done = self.cpu.balloon(&mut s.hw, &mut s.vm, req);
        let cycles = self.cpu.rdtsc().saturating_sub(t0);
        // Keel's work for the guest, as its exits' handling is.
        s.vcpus[c].stats.keel_cycles += cycles;
        // Pages left or joined its EPT: every other CPU that ran it runs INVEPT before it enters
        // it again (this one's INVEPT was part of the call).
        s.ept_changed();
        match done {
            Ok(status) => {
                s.vcpus[c].regs.rax = if wide { status } else { status & 0xffff_ffff };
                if s.vm.ram.balloon.count_call(cycles) {
                    let b = &s.vm.ram.balloon;
                    info!(
                        "guest {}: balloon target reached: {} pages given back, {} K in use ({} calls, {} cycles in Keel)",
                        s.vm.name,
                        b.given_pages(),
                        s.vm.ram.resident() >> 10,
                        b.round.calls,
                        b.round.cycles
                    );
                }
            }
            Err(e) => self.stop(i, StopReason::Killed(e)),
        }
    }
}
/// One host CPU as the loop sees it.
#[derive(Default)]
struct HostCpu {
    /// The vCPU it runs (its time slice in progress), if any: that vCPU is "on" this CPU, and no
    /// other CPU picks it.
    running: Option<Running>,
    /// The vCPU (guest, vCPU) whose registers (those VMX does not switch) are in this CPU.
    in_cpu: Option<(usize, usize)>,
    /// It found nothing to run and sleeps: a vCPU made runnable kicks it.
    asleep: bool,
    /// Kicked out of guest mode: at its vCPU's next exit the interrupts to inject are looked at
    /// again.
    kicked: bool,
    /// Each guest's [`Slot::ept_gen`] when this CPU last ran INVEPT for it (or 0).
    ept_seen: Vec<u32>,
    /// Host TSC of the exit that ended its last slice, until its next vCPU's first entry (none
    /// if it slept in between): a guest switch ([`Figures`]).
    switch_from: Option<u64>,
    /// A halted vCPU's time to wake came: it slept until then (not woken early by a key or a
    /// kick), or its slice was cut short for it (`SliceEnd::Interrupted`). Its next pick takes
    /// the fast path ([`RunLoop::pick_turn`]): the woken vCPU first, the housekeeping after.
    wake_due: bool,
    /// The preemption timer's lead short of a guest timer's deadline as this CPU learned it
    /// ([`learned_lead`]; only the loop of one CPU learns).
    lead: Lead,
}

/// A host CPU's preemption-timer lead ([`learned_lead`]), [`ENTRY_LEAD`] to begin with.
#[derive(Clone, Copy)]
struct Lead(u64);

impl Default for Lead {
    fn default() -> Self {
        Lead(ENTRY_LEAD)
    }
}

impl HostCpu {
    fn runs(&self, seat: (usize, usize)) -> bool {
        self.running.as_ref().is_some_and(|r| r.seat == seat)
    }
}

/// What a host CPU reports between its turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A vCPU's entry is prepared: [`RunLoop::enter`], then [`RunLoop::finish`].
    Enter,
    /// Nothing to run: sleep until host TSC `wake` (at most `max` cycles from now) or a kick.
    Sleep { wake: u64, max: u64 },
    /// Every guest has stopped.
    Done,
}

/// A time slice in progress on a host CPU.
#[derive(Clone)]
struct Running {
    seat: (usize, usize),
    /// The guest's [`Slot::epoch`] when the slice began.
    epoch: u32,
    /// What is left of the slice, by the clock.
    left: u64,
    piece: Piece,
}

/// A piece of a time slice (the whole slice unless the control channel is busy): `piece`
/// cycles long, cut short at `others_due` (the earliest timer of a halted guest).
#[derive(Clone, Default)]
struct Piece {
    /// The piece is the rest of the slice.
    whole: bool,
    /// Host TSC at its start, and the vCPU's guest time before it (what it is charged).
    t0: u64,
    ran_before: u64,
    others_due: Option<u64>,
    /// Not entered yet: its first entry starts it (`Piece::start_at_entry`), `len` cycles long, and
    /// takes the time the guest `waited` (host TSC since) out of its clock.
    fresh: bool,
    len: u64,
    waited: Option<u64>,
    /// The guests run with TSC offsetting (`LoopConfig::tsc_offsetting`).
    offsetting: bool,
    /// The guest's TSC offset changed since the last entry: the VMCS is to hold the new one.
    offset_moved: bool,
    deadline: u64,
    /// The guest's platform is only consulted when it may have changed: after an exit that
    /// reached a device, or when one of its timers falls due. CPUID, VMCALL and the like then
    /// cost no device work at all (docs/BENCHMARKS.md).
    touched: bool,
    timer_due: Option<u64>,
    /// The guest's LAPIC timer expiry as of the last platform look, for the short way after
    /// the preemption-timer exit armed for it (`exits::apicv::fire_timer_now`). Worked out at
    /// that exit, not at the look (`shot_stale`): a guest that moves its deadline before it
    /// expires (Linux's TSC deadline, at every tick it reprograms) would pay it at every move.
    shot: Option<TimerShot>,
    /// The last look found a guest timer set: `shot` is to be worked out at the timer's exit,
    /// from the platform as that look left it (only register-only exits and port accesses that
    /// stay in their device, which move no timer, come between).
    shot_stale: bool,
    /// How far short of a guest timer's deadline the preemption timer is armed: the host CPU's
    /// [`Lead`], which the tight loop of one CPU learns ([`learned_lead`]; it stays
    /// [`ENTRY_LEAD`] with several).
    lead: u64,
    /// The time of the last exit serves for the timer checks. Time in the guest (entry to exit)
    /// is its cpu time; Keel's handling of its exits (exit to next entry) is kept apart.
    now: u64,
    /// Whether the guest exited in this piece: the time to the next entry is then Keel's
    /// handling of that exit (`GuestStats::exit_cycles`).
    after_exit: bool,
    /// The XCR0 in the CPU.
    xcr0: u64,
    /// When the preemption timer brings the guest back (`Reflex::until`), its target
    /// (`Reflex::armed`) and the host TSC at the last VM entry (`Reflex::entered_at`) are the
    /// reflex's, which makes entries of its own. Why the last entry failed, if it did.
    reflex: reflex::Reflex,
    entry_failed: Option<String>,
}

/// How a time slice ended: what the loop does next.
enum SliceEnd {
    /// Used up, given up (YIELD, HLT), or the guest's own doing: the next pick decides.
    Over,
    /// Cut short for a halted guest whose timer fell due: the guest gets the rest of it next.
    Interrupted,
    /// The guest stops (or is booted again).
    Stop(StopReason),
    /// The guest asked for the accounting table (PRINT_STATS).
    StatsRequested,
    /// The guest gave pages back or took them again (BALLOON_GIVE, BALLOON_TAKE).
    Balloon,
}

/// Host CPU `h`'s slice in progress, if any: its vCPU, the piece, the vCPU's hardware and what
/// the loop uses of its guest.
#[allow(clippy::type_complexity)]
fn running_parts<'a, V>(
    hosts: &'a mut [HostCpu],
    slots: &'a mut [Slot<V>],
    h: usize,
) -> Option<((usize, usize), &'a mut Piece, &'a mut V, Parts<'a>)> {
    let r = hosts.get_mut(h)?.running.as_mut()?;
    let (i, c) = r.seat;
    let (hw, g) = slots.get_mut(i)?.parts(c);
    Some(((i, c), &mut r.piece, hw, g))
}

/// What follows a VM exit.
enum Next {
    /// The next entry of the same vCPU.
    Go,
    /// The piece of the slice ended.
    End(SliceEnd),
    /// The vCPU sent an IPI to these siblings (a bit each; fixed, NMI, INIT or SIPI).
    Ipi(u64),
}

/// The work before a VM entry of `vcpu` (its VMCS loaded as `v`): the interrupts and the one
/// event commit, and the VMX-preemption timer armed. An event that cannot be delivered stops
/// the guest (the reason).
fn before_entry<C: Cpu>(
    cpu: &mut C,
    v: &mut C::Loaded<'_>,
    vm: &mut Vm,
    vcpu: &mut Vcpu,
    p: &mut Piece,
    cfg: LoopConfig,
) -> Result<(), StopReason> {
    // Whether to look at the platform, and at which host TSC's time of the guest's.
    let fresh = p.fresh;
    let (look, at) = if fresh {
        // A piece's first entry. The guest's clock restarts (`Piece::start_at_entry`) at the
        // time it stopped (`Piece::waited`; at most now, should another CPU's TSC be ahead),
        // and the platform look is made before, at that same time of the guest's: the guest's
        // clock then holds none of Keel's work on it, and no timer is looked at against a
        // time the guest has not reached. A platform as its last look left it
        // (`Seat::untouched`) is looked at only if one of its timers fell due meanwhile.
        let now = cpu.rdtsc();
        let since = p.waited.map_or(now, |since| since.min(now));
        (
            p.touched || vm.first_timer().is_some_and(|d| since >= d),
            since,
        )
    } else {
        if core::mem::take(&mut p.offset_moved) {
            // The exit's wait for the loop's lock came off the guest's clock (`RunLoop::exited`).
            v.write(Control64::TscOffset, vcpu.vmcs_tsc_offset(vm.tsc_offset));
        }
        (p.touched || p.timer_due.is_some_and(|d| p.now >= d), p.now)
    };
    // One copy of each part for both ways.
    if look {
        platform_look(v, vcpu, vm, vm.now(at));
    }
    if fresh {
        p.start_at_entry(cpu, v, (&mut *vm, &*vcpu));
    }
    if look || fresh {
        // The deadlines in host time (by the restarted clock at a first entry).
        note_deadline(vm, p, cfg.min_gap());
    }
    if look {
        note_shot(p);
    }
    // The minimum gap keeps a guest's own fast timer from bringing it back at every entry (a
    // livelock); a piece's first entry is one per piece, so a timer of its own due as the piece
    // starts (its clock stopped just short of it) fires then, not a minimum gap late. Not so for
    // another guest's timer or the slice's end: the guest runs at least the gap first.
    if fresh && p.timer_due.is_some_and(|d| d == p.reflex.until) {
        return arm_first_entry(cpu, v, vcpu, p, cfg);
    }
    arm_entry(cpu, v, vcpu, p, cfg)
}

/// [`arm_entry`] at a piece's first entry, when the guest's own timer is what it comes back
/// for: without the minimum gap ([`before_entry`]). A call of its own, so that every other
/// entry's way stays as it was.
#[inline(never)]
fn arm_first_entry<C: Cpu>(
    cpu: &mut C,
    v: &mut C::Loaded<'_>,
    vcpu: &mut Vcpu,
    p: &mut Piece,
    cfg: LoopConfig,
) -> Result<(), StopReason> {
    arm_entry_after(cpu, v, vcpu, p, cfg, 0)
}

/// The platform look before an entry of `vcpu`, at the guest's time `now`: its timers advanced,
/// the interrupt to inject (or the window asked for), the virtual-APIC page posted.
#[inline(always)]
fn platform_look<V: Vmcs + ?Sized>(v: &mut V, vcpu: &mut Vcpu, vm: &mut Vm, now: u64) {
    // The guest's TPR for the model, if the last exits left it in VTPR.
    exits::apicv::take_unread(v, &mut *vcpu, &mut *vm);
    vm.platform.advance(now);
    exits::inject_pending_interrupt(v, &mut *vcpu, &mut *vm);
    exits::apicv::before_entry(v, &mut *vcpu, &mut *vm);
}

/// After a look: the guest's LAPIC timer expiry for the short way (`exits::apicv::timer_shot`)
/// is to be worked out at the timer's exit while a guest timer is set (`Piece::shot_stale`);
/// the one of an earlier look is dropped.
#[inline(always)]
fn note_shot(p: &mut Piece) {
    // `None` written in place: a value built apart and copied in costs a copy of the whole
    // shot (15 instructions of `rep movsq` at every look, measured).
    if p.shot.is_some() {
        p.shot = None;
    }
    p.shot_stale = p.timer_due.is_some();
}

/// After a VMX-preemption-timer exit that came before the guest timer's deadline by no more than
/// the lead it was armed with (`lead`, `Piece::lead` at the arming): waits for the deadline, so
/// that the look that follows finds the timer due rather than re-arming for the minimum gap. The
/// wait is Keel's time in the accounts. `ready`: the TSC when Keel got ready to wait.
#[inline(always)]
fn catch_up<C: Cpu>(cpu: &mut C, vcpu: &mut Vcpu, p: &mut Piece, ready: u64, lead: u64) {
    let Some(due) = p.timer_due else {
        return;
    };
    if p.now < due && due - p.now <= lead {
        let mut t = ready;
        while t < due {
            core::hint::spin_loop();
            t = cpu.rdtsc();
        }
        vcpu.stats.keel_cycles += t - p.now;
        p.now = t;
    }
}

/// The piece's next deadline after a look at `vm`'s platform: the guest's next timer, the time
/// to come back, and the VMX-preemption timer's target for it (`arm_entry`: worked out here,
/// once per look, rather than at every entry; `min_gap` is the guest's least run).
#[inline(always)]
fn note_deadline(vm: &Vm, p: &mut Piece, min_gap: u64) {
    p.timer_due = vm.first_timer();
    // Come back at the end of the slice, when one of the guest's own timers falls due, or
    // when a halted guest's does, whichever is first.
    p.reflex.until = [p.timer_due, p.others_due]
        .into_iter()
        .flatten()
        .fold(p.deadline, u64::min);
    // Short of a guest timer's deadline by the lead (the way to the entry, and on one CPU the
    // exit's way back: [`learned_lead`]); the slice's end and a halted guest's timer as they
    // are, and a guest timer within the minimum gap of the slice's end too (the wait for it,
    // `catch_up`, would take the slice on past the guest's interrupt rather than end it there).
    p.reflex.armed = match p.timer_due {
        Some(d) if d == p.reflex.until && d.saturating_add(min_gap) <= p.deadline => {
            d.saturating_sub(p.lead)
        }
        _ => p.reflex.until,
    };
}

/// The last of the work before a VM entry of `vcpu`, after every exit (the register-only ones
/// of `exits::fast` included): the one event commit, the VMX-preemption timer armed, and the
/// accounts of Keel's time.
#[inline(always)]
fn arm_entry<C: Cpu>(
    cpu: &mut C,
    v: &mut C::Loaded<'_>,
    vcpu: &mut Vcpu,
    p: &mut Piece,
    cfg: LoopConfig,
) -> Result<(), StopReason> {
    arm_entry_after(cpu, v, vcpu, p, cfg, cfg.min_gap())
}

/// [`arm_entry`] with the least time the guest runs before its timer brings it back.
#[inline(always)]
fn arm_entry_after<C: Cpu>(
    cpu: &mut C,
    v: &mut C::Loaded<'_>,
    vcpu: &mut Vcpu,
    p: &mut Piece,
    cfg: LoopConfig,
    min_gap: u64,
) -> Result<(), StopReason> {
    // The one place an event is written to the VM-entry fields (exits::events): `commit`'s own
    // test, made here so that the reflex gets its answer too. (`commit` returning it instead
    // cost the HLT and interrupt rows 9 to 15 without APIC virtualization, measured.)
    let idle = vcpu.events.idle();
    if !idle {
        exits::events::commit_queued(v, &mut *vcpu)?;
    }
    // The timer is armed afresh before every entry, from a fresh TSC read: it only counts while
    // the guest runs (SDM 26.5.1), so Keel's own time since the last exit must come off it, or a
    // guest timer fires that much late and ticks are lost.
    let t0 = cpu.rdtsc();
    if let Some(rate) = cfg.preemption_timer {
        // The guest runs at least `min_gap` before the timer brings it back, so a timer faster
        // than Keel can deliver (a PIT programmed with count 1 ticks every 0.84 us) cannot
        // livelock it in back-to-back exits: its ticks are coalesced instead
        // (docs/SCHEDULING.md). Its target is the last look's (`note_deadline`).
        v.write_supported(
            Guest32::PreemptionTimerValue,
            reflex::timer_count(p.reflex.armed, t0, min_gap, rate),
        );
    }
    vcpu.stats.keel_cycles += t0 - p.now;
    if p.after_exit {
        let last = vcpu.stats.last_exit;
        vcpu.stats.record_exit_cycles(last, t0 - p.now);
    }
    p.after_exit = true;
    // The reflex may take the exits of this entry if their entries commit nothing: no event is
    // left queued. (One injected now is in the VM-entry fields, delivered at this entry; every
    // VM exit clears their valid bit, SDM Vol. 3C 28.2, so the reflex's entries inject nothing.)
    p.reflex.arm(idle, t0);
    Ok(())
}

impl Piece {
    /// Starts the piece at its first entry, `vcpu`'s VMCS loaded as `v` for that entry: its
    /// IA32_SPEC_CTRL in the CPU, the guest's clock restarted (the time it waited taken out of
    /// its TSC offset) and the piece's deadline counted from now. Done here rather than when the
    /// piece is planned, so that the loop's work in between (the pick, the register switch) is
    /// neither in the guest's clock nor a second VMCS load.
    fn start_at_entry<C: Cpu>(&mut self, cpu: &mut C, v: &mut C::Loaded<'_>, g: (&mut Vm, &Vcpu)) {
        let (vm, vcpu) = g;
        self.fresh = false;
        cpu.load_spec_ctrl(vcpu.spec_ctrl);
        let start = cpu.rdtsc();
        if let Some(since) = self.waited.take() {
            // Saturating: on a machine whose CPUs' TSCs are not in step, `since` (another CPU's)
            // may be ahead.
            vm.tsc_offset = vm.tsc_offset.wrapping_sub(start.saturating_sub(since));
        }
        if self.offsetting {
            // Written at every slice: the clock may have stopped since this vCPU's last one,
            // while the guest waited with another of its vCPUs runnable.
            v.write(Control64::TscOffset, vcpu.vmcs_tsc_offset(vm.tsc_offset));
        }
        self.deadline = start + self.len;
        self.reflex.until = self.deadline;
        self.reflex.armed = self.deadline;
        self.now = start;
        self.reflex.entered_at = start;
    }
}

/// The dispatch of vCPU `c`'s VM exit (its VMCS loaded as `v`, its exit-reason field read as
/// `raw_reason`) and what follows it. `handled`: an exit the tight loop already handled, counted
/// and completed, which touched the platform (`exits::fast::PortExit::Changed`); the follow-up
/// continues from its action. `kicked`: another CPU kicked this one out of guest mode (an
/// IPI for it, a command on its guest).
fn after_exit<C: Cpu>(
    cpu: &mut C,
    v: &mut C::Loaded<'_>,
    g: Parts<'_>,
    c: usize,
    p: &mut Piece,
    (raw_reason, handled): (u32, Option<exits::fast::Handled>),
    kicked: bool,
) -> Next {
    let Parts {
        vm,
        vcpu,
        seat,
        waiting_since,
    } = g;
    let now = p.now;
    let guest_now = vm.now(now);
    let reason = ExitReason::from_basic(raw_reason as u16);
    let action = match handled {
        Some(done) => done.action(),
        None => {
            let mut cx = ExitContext {
                vmcs: &mut *v,
                vcpu: &mut *vcpu,
                vm: &mut *vm,
                host: cpu.host(),
                now: guest_now,
            };
            exits::handle(&mut cx, raw_reason, reason)
        }
    };
    let touched = match handled {
        Some(_) => true,
        None => {
            exits::apply(v, &mut *vcpu, &action);
            exits::touched_platform(reason, &*vcpu, &mut *vm)
        }
    };
    // A kick means another CPU changed what this vCPU should be given.
    p.touched = touched || kicked;
    // A power-off or reset the guest asked its board for (ACPI S5, i8042, port 0xCF9).
    if let Some(event) = touched.then(|| vm.platform.take_power_event()).flatten() {
        return Next::End(SliceEnd::Stop(StopReason::Board(event)));
    }
    // Console output (a hypercall's, or a port access's: quiet as it is, `touched` may be false).
    let console = vm.platform.take_console_written();
    if touched || console || reason == ExitReason::Vmcall {
        print_and_pump(vm);
    }
    if reason == ExitReason::Xsetbv && vcpu.xcr0 != p.xcr0 {
        // The guest executed XSETBV (validated by its handler): load it for the next entry.
        cpu.load_xcr0(vcpu.xcr0);
        p.xcr0 = vcpu.xcr0;
    }
    if reason == ExitReason::Wrmsr && vcpu.regs.rcx as u32 == crate::exits::msr::index::SPEC_CTRL {
        cpu.load_spec_ctrl(vcpu.spec_ctrl);
    }
    // Paused, stopped or sent back to wait-for-SIPI from another CPU while it ran: it leaves at
    // this exit (a HLT it executed meanwhile is remembered by its pause).
    if vcpu.state != RunState::Runnable {
        if action == Action::Halt && vcpu.state == (RunState::Paused { halted: false }) {
            vcpu.state = RunState::Paused { halted: true };
            seat.halted_since = Some(now);
        } else if vcpu.state.is_live() {
            *waiting_since = Some(now);
        }
        return Next::End(SliceEnd::Over);
    }
    // An IPI to another vCPU of the guest (fixed, NMI, INIT or SIPI): the target is woken (or
    // started) and run without waiting for the sender's quantum to run out, on a CPU of its own
    // or on this one (the sender's slice then ends; a vCPU waiting in HLT for an IPI does not
    // wait).
    if touched {
        let targets = vm.platform.take_kicked() & !(1 << c);
        if targets != 0 && !matches!(action, Action::Halt | Action::Stop(_)) {
            return Next::Ipi(targets);
        }
    }
    if vm.stats_requested {
        vm.stats_requested = false;
        *waiting_since = Some(cpu.rdtsc());
        // The table is printed after the exit.
        return Next::End(SliceEnd::StatsRequested);
    }
    if vm.ram.balloon.pending.is_some() {
        *waiting_since = Some(cpu.rdtsc());
        // Its EPT is changed after the exit, with the VMCS no longer loaded.
        return Next::End(SliceEnd::Balloon);
    }
    let deadline = p.deadline;
    match action {
        // A halted guest's timer fell due. Not only the preemption timer brings this guest back
        // then: one that exits more often than every `min_gap` (a guest writing its UART)
        // re-arms it at each entry and would never let it expire.
        Action::Resume
        | Action::Advance
        | Action::AdvanceBy(_)
        | Action::Inject(_)
        | Action::Preempted
            if p.others_due.is_some_and(|d| now >= d) =>
        {
            *waiting_since = Some(now);
            // It gets the CPU back next, but only for what was left of its slice: otherwise a
            // guest woken every few ms would hand the same CPU hog a fresh quantum each time
            // and starve the others.
            seat.slice_left = Some(deadline.saturating_sub(now));
            Next::End(SliceEnd::Interrupted)
        }
        Action::Resume | Action::Advance | Action::AdvanceBy(_) | Action::Inject(_) => {
            if now >= deadline {
                *waiting_since = Some(now);
                Next::End(SliceEnd::Over)
            } else {
                Next::Go
            }
        }
        Action::Halt => {
            vcpu.state = RunState::Halted;
            seat.halted_since = Some(now);
            Next::End(SliceEnd::Over)
        }
        Action::Preempted if now < deadline => Next::Go,
        Action::Yield | Action::Preempted => {
            *waiting_since = Some(now);
            Next::End(SliceEnd::Over)
        }
        Action::Stop(reason) => Next::End(SliceEnd::Stop(reason)),
    }
}

impl<C: Cpu> RunLoop<C> {
    /// A host CPU other than `h` running a vCPU of guest `i`, if any.
    fn elsewhere(&self, h: usize, i: usize) -> Option<usize> {
        (0..self.hosts.len()).find(|&k| {
            k != h
                && self.hosts[k]
                    .running
                    .as_ref()
                    .is_some_and(|r| r.seat.0 == i)
        })
    }

    /// True when no host CPU but the acting one runs a vCPU: a monitor command may then touch
    /// any guest's VMCSs, registers and RAM.
    fn quiet(&self) -> bool {
        (0..self.hosts.len()).all(|k| k == self.acting || self.hosts[k].running.is_none())
    }

    /// `act` on guest `i` now if none of its vCPUs is on a CPU other than `h`, else once none is
    /// ([`Slot::deferred`]): those CPUs are kicked out of guest mode and leave at their exit.
    fn defer_or_act(&mut self, h: usize, i: usize, act: Deferred) {
        if self.elsewhere(h, i).is_none() {
            self.act(i, act);
            return;
        }
        self.slots[i].deferred.push(act);
        for k in 0..self.hosts.len() {
            if k != h
                && self.hosts[k]
                    .running
                    .as_ref()
                    .is_some_and(|r| r.seat.0 == i)
            {
                self.kick_host(k);
            }
        }
    }

    /// Guest `i` stops by `reason` ([`RunLoop::stop`]) once none of its vCPUs is on a CPU other
    /// than `h`: its RAM and VMCSs change then.
    fn stop_or_defer(&mut self, h: usize, i: usize, reason: StopReason) {
        self.defer_or_act(h, i, Deferred::Stop(reason));
    }

    /// Carries out `act` on guest `i`, none of whose vCPUs is on another CPU.
    fn act(&mut self, i: usize, act: Deferred) {
        match act {
            // A stop that came first wins: nothing more happens to a stopped guest.
            Deferred::Stop(reason) if self.slots[i].live() => self.stop(i, reason),
            Deferred::Stop(_) => {}
            Deferred::Balloon(c) => self.balloon_call((i, c)),
            Deferred::ReleaseRam => {
                let s = &mut self.slots[i];
                if !s.live() {
                    self.cpu.release_ram(&mut s.hw, &mut s.vm);
                    s.ept_changed();
                }
            }
        }
    }

    /// Guest `i` (the one in the CPU) stops: it is booted again if it reset its board or if it
    /// died and has restarts left, otherwise it stops for good.
    fn stop(&mut self, i: usize, reason: StopReason) {
        let g = &mut self.slots[i].vm;
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
        let s = &mut self.slots[i];
        // A reset starts the guest again as a PC would, whatever its restart budget, with its
        // CMOS RAM kept (battery-backed on a PC).
        if let StopReason::Board(crate::devices::PowerEvent::Reset(_)) = reason {
            let platform = s.vm.platform.after_reset();
            s.epoch = s.epoch.wrapping_add(1);
            s.ept_changed();
            match self
                .cpu
                .boot(&mut s.hw, &mut s.vm, &mut s.vcpus, s.restarts)
            {
                Ok(()) => {
                    s.vm.platform = platform;
                    s.waiting_since = None;
                    s.seats.iter_mut().for_each(|seat| *seat = Seat::default());
                    self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
                    self.hosts[self.acting].in_cpu = Some((i, 0));
                    return;
                }
                Err(e) => error!("guest {}: reboot failed: {e}", s.vm.name),
            }
            // `boot` reset every vCPU's saved registers: vCPU 0's (power-on values) are in the
            // CPU's place now, as after a successful boot.
            self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
            self.hosts[self.acting].in_cpu = Some((i, 0));
        }
        if died && s.restarts < s.restart_limit {
            s.restarts += 1;
            // What the guest printed and Keel has not yet sent, and its console's counts, outlive
            // the restart (`boot` gives it a new platform).
            let console = core::mem::take(s.vm.platform.console());
            s.epoch = s.epoch.wrapping_add(1);
            let booted = self
                .cpu
                .boot(&mut s.hw, &mut s.vm, &mut s.vcpus, s.restarts);
            *s.vm.platform.console() = console;
            match booted {
                Ok(()) => {
                    // Its extended state, XCR0 and MSRs go back to their power-on values too.
                    s.waiting_since = None;
                    s.seats.iter_mut().for_each(|seat| *seat = Seat::default());
                    self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
                    self.hosts[self.acting].in_cpu = Some((i, 0));
                    return;
                }
                Err(e) => error!("guest {}: restart failed: {e}", s.vm.name),
            }
            // `boot` reset every vCPU's saved registers: vCPU 0's (power-on values) are in the
            // CPU's place now, as after a successful boot.
            self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
            self.hosts[self.acting].in_cpu = Some((i, 0));
        }
        for vcpu in &mut s.vcpus {
            vcpu.state = RunState::Stopped(reason.clone());
        }
        self.cpu.release_ram(&mut s.hw, &mut s.vm);
        s.ept_changed();
    }

    /// Pauses a guest: it keeps its state and is not scheduled until resumed.
    pub fn pause(&mut self, id: usize) -> Result<(), String> {
        self.platforms_reached();
        let now = self.cpu.rdtsc();
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        for vcpu in &mut s.vcpus {
            if vcpu.state != RunState::WaitForSipi {
                vcpu.state.pause().map_err(|e| alloc::format!("{e}"))?;
            }
        }
        s.paused_since = Some(now);
        info!("guest {} paused", s.vm.name);
        self.kick_guest(id);
        Ok(())
    }

    /// Resumes a paused guest where it was (running or in HLT), its clock as it was at the pause.
    pub fn resume(&mut self, id: usize) -> Result<(), String> {
        self.platforms_reached();
        let now = self.cpu.rdtsc();
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        for vcpu in s.vcpus.iter_mut() {
            if vcpu.state != RunState::WaitForSipi {
                vcpu.state.resume().map_err(|e| alloc::format!("{e}"))?;
            }
        }
        let paused = now.saturating_sub(s.paused_since.take().unwrap_or(now));
        if !s.vcpus.iter().any(|v| v.state == RunState::Runnable) {
            // A halted guest's clock runs while it waits; the pause comes off it here. Its VMCS
            // gets the new offset at its next slice, and the pause is no halted time.
            if self.cfg.tsc_offsetting {
                s.vm.tsc_offset = s.vm.tsc_offset.wrapping_sub(paused);
            }
            for seat in &mut s.seats {
                if let Some(since) = seat.halted_since.as_mut() {
                    *since = since.saturating_add(paused).min(now);
                }
            }
        } else {
            // A runnable guest's clock stopped when it last left the CPU (`waiting_since`), which
            // covers the pause; one paused before its first slice has no such mark yet.
            if s.waiting_since.is_none() && self.cfg.tsc_offsetting {
                s.vm.tsc_offset = s.vm.tsc_offset.wrapping_sub(paused);
            }
            s.waiting_since.get_or_insert(now);
        }
        info!("guest {} resumed", s.vm.name);
        self.kick_idle();
        Ok(())
    }

    /// The snapshot of guest `id` (`snapshot`): it is paused while its state is read, and
    /// resumed after if it was running and `resume` is set. Its clock is the one it had when it
    /// stopped: a runnable guest's stopped when it last left the CPU, a halted one's at the pause.
    pub fn snapshot(&mut self, id: usize, resume: bool) -> Result<Vec<u8>, String> {
        let s = self.slots.get(id).ok_or("no such guest")?;
        if !s.live() {
            return Err("the guest has stopped".into());
        }
        let was_paused = matches!(s.bsp().state, RunState::Paused { .. });
        if !was_paused {
            self.pause(id)?;
        }
        let clock = self.paused_clock(id);
        let s = &mut self.slots[id];
        let taken = self.cpu.snapshot(&mut s.hw, &s.vm, &s.vcpus, clock);
        if !was_paused && resume {
            self.resume(id)?;
        }
        taken
    }

    /// The clock of paused guest `id` (switched out here): a runnable guest's stopped when it
    /// last left the CPU, a halted one's at the pause.
    fn paused_clock(&mut self, id: usize) -> u64 {
        self.switch_out();
        let s = &mut self.slots[id];
        let runnable = s
            .vcpus
            .iter()
            .any(|v| v.state == RunState::Paused { halted: false });
        let paused_at = s.paused_since.unwrap_or(0);
        let stopped_at = if runnable {
            s.waiting_since.unwrap_or(paused_at)
        } else {
            paused_at
        };
        // The model is what is saved: the TPR and vectors the CPU held at the last exit go to it.
        for vcpu in &mut s.vcpus {
            exits::apicv::take_unread_vtpr(vcpu, &mut s.vm);
        }
        s.vm.now(stopped_at)
    }

    /// Replaces guest `id` (running, paused or stopped) by the snapshot `stream`, of a guest of
    /// the same memory size and vCPUs. Its clock goes on from the snapshot's; it runs from the
    /// next pick if `resume`, else it stays paused. A snapshot that is refused leaves the guest
    /// as it was.
    pub fn restore(&mut self, id: usize, stream: &[u8], resume: bool) -> Result<(), String> {
        self.restore_with(id, resume, |cpu, s| {
            cpu.restore_snapshot(&mut s.hw, &mut s.vm, &mut s.vcpus, stream)
        })
    }

    /// [`RunLoop::restore`] with the guest's state put in place by `apply`, which returns the
    /// guest's clock.
    fn restore_with(
        &mut self,
        id: usize,
        resume: bool,
        apply: impl FnOnce(&mut C, &mut Slot<C::Vcpu>) -> Result<u64, String>,
    ) -> Result<(), String> {
        self.platforms_reached();
        self.slots.get(id).ok_or("no such guest")?;
        self.switch_out();
        let s = &mut self.slots[id];
        let clock = apply(&mut self.cpu, s)?;
        s.epoch = s.epoch.wrapping_add(1);
        s.ept_changed();
        let now = self.cpu.rdtsc();
        s.vm.clock_seen = clock;
        if self.cfg.tsc_offsetting {
            s.vm.tsc_offset = clock.wrapping_sub(now);
        }
        for (vcpu, seat) in s.vcpus.iter_mut().zip(&mut s.seats) {
            *seat = Seat::default();
            if vcpu.state == RunState::Halted {
                seat.halted_since = Some(now);
            }
            if vcpu.state != RunState::WaitForSipi {
                vcpu.state.pause().map_err(|e| alloc::format!("{e}"))?;
            }
        }
        s.paused_since = Some(now);
        s.waiting_since = s
            .vcpus
            .iter()
            .any(|v| v.state == RunState::Paused { halted: false })
            .then_some(now);
        info!("guest {} restored (paused)", s.vm.name);
        if resume {
            self.resume(id)?;
        }
        Ok(())
    }

    /// Stops a guest for good (an operator's kill: no restart).
    pub fn kill(&mut self, id: usize) -> Result<(), String> {
        self.stop_for_good(id, "kill")?;
        info!("guest {} killed", self.slots[id].vm.name);
        Ok(())
    }

    /// Stops guest `id` without a restart, by the operator's or the load policy's `why`. Its
    /// memory goes back to the pool and can host another guest (its next start takes RAM afresh).
    fn stop_for_good(&mut self, id: usize, why: &'static str) -> Result<(), String> {
        self.platforms_reached();
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        for vcpu in s.vcpus.iter_mut() {
            vcpu.state
                .stop(StopReason::Operator(why))
                .map_err(|e| alloc::format!("{e}"))?;
        }
        self.kick_guest(id);
        // Its RAM goes back only once no CPU runs it any more (a CPU in guest mode still
        // reaches that RAM through its EPT).
        self.defer_or_act(self.acting, id, Deferred::ReleaseRam);
        Ok(())
    }

    /// Reads the keys typed on COM1: Ctrl-A commands for Keel (statistics, pause and resume all,
    /// focus, the `keel>` prompt), lines typed at the prompt for the monitor, every other byte for
    /// the focused guest's 16550 (`focus`), which gets them as its receive FIFO has room; a halted
    /// guest wakes for the receive interrupt as for its timers.
    fn poll_console(&mut self) {
        use crate::focus::Key;
        use crate::monitor::PromptKey;
        self.take_keys();
        while let Some(byte) = self.ops.keys.pop_front() {
            if self.ops.top.take().is_some() {
                // Any key ends `top`.
                self.prompt_again();
                self.show_prompt();
                continue;
            }
            let key = match self.ops.prompt.key(byte) {
                PromptKey::Pass(b) => self.focus.typed(b),
                PromptKey::Prefixed(b) => {
                    let slots = &self.slots;
                    let running = |i: usize| slots[i].live();
                    self.focus.command(b, running)
                }
                PromptKey::Opened => {
                    console_text(
                        "keel monitor: `help` lists the commands, `exit` or Ctrl-A c leaves\n",
                    );
                    self.prompt_again();
                    Key::None
                }
                PromptKey::Closed => {
                    crate::log::set_prompt(None);
                    console_text("\n");
                    Key::None
                }
                PromptKey::Echo(b) => {
                    console_text(core::str::from_utf8(&[b]).unwrap_or(""));
                    Key::None
                }
                PromptKey::Erase => {
                    console_text("\x08 \x08");
                    Key::None
                }
                PromptKey::Line(line) => {
                    console_text("\n");
                    crate::log::set_prompt(None);
                    self.run_or_hold(Origin::Console, crate::monitor::ChannelLine::Command(line));
                    Key::None
                }
                PromptKey::None => Key::None,
            };
            self.show_prompt();
            match key {
                Key::Stats => {
                    // Only when the console has room for it now: Keel's lines wait for room, and
                    // the guests would wait with them.
                    let table = self.readable_table();
                    if crate::log::fits(Writer::Keel, crate::log::wire_len(table.as_bytes())) {
                        console_text(&table);
                    } else {
                        info!("statistics: the console is busy; ask again in a moment");
                    }
                }
                Key::Pause => (0..self.slots.len()).for_each(|i| {
                    let _ = self.pause(i);
                }),
                Key::Resume => (0..self.slots.len()).for_each(|i| {
                    let _ = self.resume(i);
                }),
                Key::Focus(i) => info!("input goes to {}", self.slots[i].vm.name),
                // Ctrl-A c is the prompt's (`monitor::Prompt`), so the focus never sees it.
                Key::Monitor | Key::Guest(..) | Key::None => {}
            }
        }
        if let Some(due) = self.ops.top {
            let now = self.cpu.rdtsc();
            if now >= due {
                let reply = self.command("list", crate::monitor::Form::Text);
                console_text(&reply.text);
                self.ops.top = Some(now + self.cfg.tsc_hz);
            }
        }
        if self.focus.pending() == 0 || self.slots.is_empty() {
            return;
        }
        let now = self.cpu.rdtsc();
        let s = &mut self.slots[self.focus.current()];
        let running = s.live();
        let g = &mut s.vm;
        let t = g.now_seen(now);
        self.focus.deliver(running, |b| {
            g.platform.serial_input_room(t) && g.platform.push_serial_input(b, t)
        });
    }

    /// Tells the console what the prompt line shows now (nothing while `top` runs or the prompt
    /// is closed), so other lines are written around it (`log::set_prompt`).
    fn show_prompt(&self) {
        match (self.ops.prompt.is_open(), self.ops.top) {
            (true, None) => {
                crate::log::set_prompt(Some(&alloc::format!("keel> {}", self.ops.prompt.line())))
            }
            _ => crate::log::set_prompt(None),
        }
    }

    /// `keel> ` on the console, while the prompt is open.
    fn prompt_again(&self) {
        if self.ops.prompt.is_open() {
            console_text("keel> ");
        }
    }

    /// Moves the keys waiting in COM1's receive FIFO into [`Operator::keys`], without acting on
    /// them: cheap enough for any point of the loop. For a second after a key, the serial lines
    /// are read every millisecond, as while the control channel is busy (`control_busy`).
    fn take_keys(&mut self) {
        let mut dropped = 0u32;
        while let Some(byte) = self.cpu.console_key() {
            if self.ops.keys.len() < KEYS_MAX {
                self.ops.keys.push_back(byte);
            } else {
                dropped += 1;
            }
            // A second: the next line typed (or pasted) finds the lines read every millisecond
            // from its first key, whatever backlog the host's terminal hands over at once.
            self.ops.control_busy_until = self.cpu.rdtsc() + self.cfg.tsc_hz;
        }
        if dropped > 0 {
            crate::warn!("console: {dropped} keys dropped ({KEYS_MAX} were waiting)");
        }
    }

    /// Reads the control channel (COM2): each line is a monitor command, answered with one JSON
    /// object on one line; the replies go out as COM2 takes them.
    fn poll_control(&mut self) {
        let mut read = 0;
        while let Some(byte) = self.cpu.control_byte() {
            read += 1;
            self.ops.control_busy_until = self.cpu.rdtsc() + self.cfg.tsc_hz / 10;
            let Some(line) = self.ops.channel.push(byte) else {
                continue;
            };
            // A line is acknowledged before it runs: a restore may take a while (`credit`).
            crate::credit::acknowledge(core::mem::take(&mut read), &mut self.ops.reply);
            self.cpu.control_send(&mut self.ops.reply);
            self.run_or_hold(Origin::Channel, line);
        }
        // The sender may send as many again (`credit`: the FIFO cannot overrun).
        crate::credit::acknowledge(read, &mut self.ops.reply);
        if !self.ops.reply.is_empty() {
            self.cpu.control_send(&mut self.ops.reply);
        }
    }

    /// Runs monitor line `line` now if no other CPU runs a vCPU and no line waits, else holds it
    /// until none does ([`Operator::held`]): the CPUs running vCPUs are kicked out of guest mode.
    fn run_or_hold(&mut self, from: Origin, line: crate::monitor::ChannelLine) {
        if self.ops.held.is_empty() && self.quiet() {
            self.run_line(from, line);
            return;
        }
        self.ops.held.push_back((from, line));
        for k in 0..self.hosts.len() {
            if k != self.acting && self.hosts[k].running.is_some() {
                self.kick_host(k);
            }
        }
    }

    /// Runs the lines held for the other CPUs to leave guest mode, once none runs a vCPU; the
    /// CPUs asleep meanwhile are woken for the vCPUs waiting.
    fn run_held(&mut self) {
        if self.ops.held.is_empty() || !self.quiet() {
            return;
        }
        while let Some((from, line)) = self.ops.held.pop_front() {
            self.run_line(from, line);
        }
        self.kick_idle();
    }

    /// Runs monitor line `line` and sends its reply where it came from.
    fn run_line(&mut self, from: Origin, line: crate::monitor::ChannelLine) {
        use crate::monitor::{ChannelLine, Form};
        match (from, line) {
            (Origin::Channel, line) => {
                let reply = match line {
                    ChannelLine::Command(line) => self.command(&line, Form::Json),
                    ChannelLine::TooLong => crate::monitor::too_long(),
                };
                if self.ops.reply.len() + reply.text.len() <= REPLY_MAX {
                    self.ops.reply.extend(reply.text.as_bytes());
                }
            }
            (Origin::Console, ChannelLine::Command(line)) => {
                let reply = self.command(&line, Form::Text);
                console_text(&reply.text);
                if reply.top {
                    let now = self.cpu.rdtsc();
                    self.ops.top = Some(now + self.cfg.tsc_hz);
                } else {
                    self.prompt_again();
                }
                self.show_prompt();
            }
            (Origin::Console, ChannelLine::TooLong) => {}
        }
    }

    /// True while the control channel is in the middle of a line or a transfer
    /// (`Operator::control_busy_until`): COM2 is then read every millisecond.
    fn control_busy(&mut self) -> bool {
        self.ops.control_busy_until != 0 && self.cpu.rdtsc() < self.ops.control_busy_until
    }

    /// Sends the control channel's last replies (after `quit`): waits, boundedly, for COM2.
    pub fn flush_control(&mut self) {
        for _ in 0..1_000_000 {
            if self.ops.reply.is_empty() {
                return;
            }
            self.cpu.control_send(&mut self.ops.reply);
        }
    }

    /// Runs one monitor command against this loop.
    fn command(&mut self, line: &str, form: crate::monitor::Form) -> crate::monitor::Reply {
        let mut monitor = match self.ops.monitor.take() {
            Some(m) => m,
            None => crate::monitor::Monitor::new(self.ops.started.unwrap_or(0)),
        };
        let reply = monitor.execute(line, self, form);
        self.unsettled = true;
        self.platforms_reached();
        self.ops.monitor = Some(monitor);
        reply
    }

    /// Something from outside the guests' own exits may have reached their platforms (a key, a
    /// command, the load policy): every vCPU's next piece makes the platform look at its first
    /// entry ([`Seat::untouched`]).
    fn platforms_reached(&mut self) {
        for seat in self.slots.iter_mut().flat_map(|s| s.seats.iter_mut()) {
            seat.untouched = false;
        }
    }

    /// Boots guest `i` afresh from its image (the monitor's `restart` and `start`).
    fn reboot(&mut self, i: usize) -> Result<(), String> {
        self.unsettled = true;
        self.switch_out();
        let s = &mut self.slots[i];
        let before = s.bsp().state.clone();
        let console = core::mem::take(s.vm.platform.console());
        s.epoch = s.epoch.wrapping_add(1);
        s.ept_changed();
        let booted = self
            .cpu
            .boot(&mut s.hw, &mut s.vm, &mut s.vcpus, s.restarts);
        *s.vm.platform.console() = console;
        if let Err(e) = booted {
            for v in s.vcpus.iter_mut() {
                v.state = match &before {
                    // A stopped guest that could not start (no memory for it yet) stays as it was.
                    RunState::Stopped(r) => RunState::Stopped(r.clone()),
                    _ => {
                        RunState::Stopped(StopReason::Killed(alloc::format!("restart failed: {e}")))
                    }
                };
            }
            return Err(e);
        }
        s.waiting_since = None;
        s.paused_since = None;
        s.seats.iter_mut().for_each(|seat| *seat = Seat::default());
        self.kick_guest(i);
        let s = &mut self.slots[i];
        self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
        self.hosts[self.acting].in_cpu = Some((i, 0));
        if before == RunState::Stopped(StopReason::NotStarted) {
            info!("guest {} started", s.vm.name);
        } else {
            info!("guest {} booted again", s.vm.name);
        }
        Ok(())
    }

    /// The statistics table (`monitor::table`) over the time since the loop started.
    fn readable_table(&mut self) -> String {
        use crate::monitor::MonitorTarget;
        let now = self.cpu.rdtsc();
        let elapsed = now.saturating_sub(self.ops.started.unwrap_or(now));
        let rows: Vec<_> = self
            .guests()
            .into_iter()
            .zip(&self.slots)
            .map(|(g, s)| {
                let c = s.vm.platform.console_ref();
                (g, (c.bytes_written(), c.dropped_bytes()))
            })
            .collect();
        let cpus = self.hosts.len() as u64;
        crate::monitor::table::readable(&rows, elapsed, self.cfg.tsc_hz, cpus)
    }

    /// The final statistics table and one status line per guest.
    pub fn report(&mut self) {
        crate::log::set_prompt(None);
        // No guest runs any more: the last console lines wait for room now.
        for s in &mut self.slots {
            print_console(&mut s.vm, usize::MAX);
        }
        let table = self.readable_table();
        console_text(&table);
        for s in &self.slots {
            if let RunState::Stopped(r) = &s.bsp().state {
                info!("guest {} status {:#x}: {r}", s.vm.name, r.status());
            }
        }
        if self.hosts.len() > 1 {
            for s in &self.slots {
                let cpus: Vec<String> = (0..64)
                    .filter(|h| s.ran_on & (1 << h) != 0)
                    .map(|h| alloc::format!("{h}"))
                    .collect();
                info!(
                    "guest {}: its vCPUs ran on {} host CPUs: {}",
                    s.vm.name,
                    cpus.len(),
                    cpus.join(" ")
                );
            }
            let f = self.figures;
            info!(
                "IPI delivery: {}",
                Figures::text(&f.ipi, "same CPU", "across CPUs")
            );
            info!(
                "guest switch: {}",
                Figures::text(&f.switch, "same CPU", "moved from another CPU")
            );
        }
    }
}

/// About this many bytes of a guest's lines (as sent, with its prefix) move to COM1's queue at a
/// time (an exit, a turn of the run loop): more than COM1 sends meanwhile (16 bytes every
/// 1.4 ms), and little enough that Keel's work on them never holds up a timer that falls due
/// (700 lines moved at once took 100 ms of Bochs' time, 256 bytes of short lines 9 ms).
const PRINT_BUDGET: usize = 128;

/// The guest's lines printed after an exit that wrote some ([`print_console`], about
/// [`PRINT_BUDGET`] bytes), and the log pumped toward COM1 if any went.
#[inline]
fn print_and_pump(g: &mut Vm) {
    if print_console(g, PRINT_BUDGET) {
        crate::log::pump();
    }
}

/// Prints the guest's complete console lines, about `budget` bytes of them (at least one line),
/// while its share of Keel's console has room (the rest waits in its console buffer); true if it
/// printed any.
#[inline]
fn print_console(g: &mut Vm, budget: usize) -> bool {
    // Checked where it is called (after every VMCALL): most print nothing.
    if g.platform.console().front().is_none() {
        return false;
    }
    print_console_lines(g, budget)
}

fn print_console_lines(g: &mut Vm, budget: usize) -> bool {
    let mut printed = false;
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

/// Monitor output on Keel's console (replies, echo, the prompt): Keel's, as its log lines.
fn console_text(text: &str) {
    crate::log::write_as(Writer::Keel, text.as_bytes());
}

impl<C: Cpu> crate::monitor::MonitorTarget for RunLoop<C> {
    fn now(&mut self) -> u64 {
        self.cpu.rdtsc()
    }

    fn tsc_hz(&self) -> u64 {
        self.cfg.tsc_hz
    }

    fn host_cpus(&self) -> u64 {
        self.hosts.len() as u64
    }

    fn guests(&self) -> Vec<crate::monitor::GuestView> {
        use crate::monitor::{GuestView, State};
        self.slots
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let (state, stop_reason) = match &s.bsp().state {
                    RunState::Runnable | RunState::WaitForSipi => (State::Running, None),
                    RunState::Halted => (State::Halted, None),
                    RunState::Paused { .. } => (State::Paused, None),
                    RunState::Stopped(r) => (State::Stopped, Some(alloc::format!("{r}"))),
                };
                GuestView {
                    id,
                    name: s.vm.name.clone(),
                    state,
                    stop_reason,
                    vcpus: s.vcpus.len() as u32,
                    memory: s.vm.ram.resident(),
                    stats: GuestStats::sum(s.vcpus.iter().map(|v| &v.stats)),
                    share: self.shares.get(id),
                }
            })
            .collect()
    }

    fn regs(&mut self, id: usize) -> Result<Vec<(&'static str, u64)>, String> {
        use crate::vmx::{Guest64, GuestNat};
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        if !s.live() {
            return Err("the guest has stopped".into());
        }
        // The bootstrap processor's registers.
        let r = s.vcpus[0].regs;
        let v = self.cpu.load(&mut s.hw, 0)?;
        Ok(alloc::vec![
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("rsp", v.read(GuestNat::Rsp)),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
            ("rip", v.read(GuestNat::Rip)),
            ("rflags", v.read(GuestNat::Rflags)),
            ("cr0", v.read(GuestNat::Cr0)),
            ("cr3", v.read(GuestNat::Cr3)),
            ("cr4", v.read(GuestNat::Cr4)),
            ("efer", v.read(Guest64::Ia32Efer)),
        ])
    }

    fn control(&mut self, id: usize, op: crate::monitor::Control) -> Result<(), String> {
        use crate::monitor::Control;
        let live = self.slots.get(id).ok_or("no such guest")?.live();
        match op {
            Control::Pause => self.pause(id),
            Control::Resume => self.resume(id),
            Control::Kill => self.kill(id),
            Control::Restart => self.reboot(id),
            Control::Start if live => Err("the guest is running (restart boots it again)".into()),
            Control::Start => self.reboot(id),
            Control::Console if !live => Err("the guest has stopped".into()),
            Control::Console => {
                self.focus.move_to(id);
                self.ops.prompt.close();
                info!("input goes to {}", self.slots[id].vm.name);
                Ok(())
            }
        }
    }

    fn balloon(&mut self, id: usize, keep: u64) -> Result<crate::monitor::BalloonView, String> {
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        if !s.live() {
            return Err("the guest has stopped".into());
        }
        let ram = &mut s.vm.ram;
        ram.balloon
            .set_target(crate::balloon::target_for(keep, ram.len())?);
        info!(
            "guest {}: balloon target {} KiB ({} pages to give back, {} given)",
            s.vm.name,
            keep >> 10,
            ram.balloon.target,
            ram.balloon.given_pages()
        );
        Ok(self.balloon_view(id))
    }

    fn memory_pool(&self) -> Option<(u64, u64)> {
        self.cpu.memory_pool()
    }

    fn snapshot(&mut self, id: usize, resume: bool) -> Result<(usize, u32), String> {
        // The previous one goes first: two need not fit in the heap together.
        self.ops.kept = None;
        let stream = RunLoop::snapshot(self, id, resume)?;
        let answer = (stream.len(), crate::snapshot::crc32(&stream));
        self.ops.kept = Some(stream);
        Ok(answer)
    }

    fn snapshot_read(&mut self, offset: usize, len: usize) -> Result<Vec<u8>, String> {
        let kept = self.ops.kept.as_ref().ok_or("no snapshot taken")?;
        let from = offset.min(kept.len());
        Ok(kept[from..(from + len).min(kept.len())].to_vec())
    }

    fn restore_begin(
        &mut self,
        id: usize,
        size: Option<usize>,
        resume: bool,
    ) -> Result<(), String> {
        self.slots.get(id).ok_or("no such guest")?;
        self.ops.incoming = None;
        match size {
            None => {
                let kept = self.ops.kept.take().ok_or("no snapshot kept")?;
                let done = RunLoop::restore(self, id, &kept, resume);
                self.ops.kept = Some(kept);
                done
            }
            Some(n) if n > crate::snapshot::STREAM_MAX => Err(alloc::format!(
                "{}",
                crate::snapshot::SnapshotError::TooLarge {
                    size: n,
                    max: crate::snapshot::STREAM_MAX
                }
            )),
            Some(n) => {
                // Room for it before it comes: the kept snapshot makes way.
                self.ops.kept = None;
                self.ops.incoming = Some((id, n, Vec::with_capacity(n), resume));
                Ok(())
            }
        }
    }

    fn restore_data(&mut self, data: &[u8]) -> Result<usize, String> {
        let (_, size, buf, _) = self.ops.incoming.as_mut().ok_or("no restore begun")?;
        if buf.len() + data.len() > *size {
            self.ops.incoming = None;
            return Err("more bytes than announced: restore abandoned".into());
        }
        buf.extend_from_slice(data);
        Ok(buf.len())
    }

    fn restore_end(&mut self) -> Result<(), String> {
        let (id, size, buf, resume) = self.ops.incoming.take().ok_or("no restore begun")?;
        if buf.len() != size {
            return Err(alloc::format!(
                "{} of {size} bytes came: restore abandoned",
                buf.len()
            ));
        }
        RunLoop::restore(self, id, &buf, resume)
    }

    fn migrate(&mut self, op: crate::migrate::Op<'_>) -> Result<crate::migrate::Answer, String> {
        let answer = self.migrate_step(op);
        // A round's dirty collection cleared EPT dirty flags (and an incoming guest's RAM was
        // mapped): every CPU runs INVEPT before it enters the guests again, so the flags are
        // set afresh by the next writes (SDM Vol. 3C 29.3.5).
        self.slots.iter_mut().for_each(Slot::ept_changed);
        answer
    }

    fn quit(&mut self) {
        self.ops.quit = true;
        self.ops.prompt.close();
        self.ops.top = None;
        for s in &mut self.slots {
            for v in s.vcpus.iter_mut() {
                let _ = v.state.stop(StopReason::Operator("quit"));
            }
        }
        (0..self.slots.len()).for_each(|i| self.kick_guest(i));
        info!("quit: every guest stopped");
    }

    fn set_share(&mut self, id: usize, share: Share) -> Result<(), String> {
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        s.share = share;
        self.shares.set(id, share);
        match share.cap_percent {
            Some(cap) => info!("guest {}: weight {}, cap {cap}%", s.vm.name, share.weight),
            None => info!("guest {}: weight {}, no cap", s.vm.name, share.weight),
        }
        Ok(())
    }
}

impl<C: Cpu> RunLoop<C> {
    /// Guest `id`'s balloon as `balloon` reports it.
    fn balloon_view(&self, id: usize) -> crate::monitor::BalloonView {
        let ram = &self.slots[id].vm.ram;
        crate::monitor::BalloonView {
            target_pages: ram.balloon.target,
            given_pages: ram.balloon.given_pages(),
            resident: ram.resident(),
        }
    }
}

/// The length of the last accounting table, as sent.
static LAST_TABLE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// Prints the accounting table ([`stats_table`]) as `who`'s output, whole or not at all: false
/// if it did not fit.
fn print_stats<'a, V: 'a>(
    guests: impl Iterator<Item = &'a Slot<V>>,
    who: Writer,
    now: u64,
) -> bool {
    let t = stats_table(guests, now);
    LAST_TABLE.store(
        crate::log::wire_len(t.as_bytes()),
        core::sync::atomic::Ordering::Relaxed,
    );
    crate::log::write_as(who, t.as_bytes())
}

/// The accounting table: per guest its cycles, exits, interrupts and state, its exits by reason
/// and its console's bytes. `now`: the host TSC, printed last (`keel: host tsc N`), so that what
/// guests used between two tables can be set against the machine's time that passed (the
/// guests' own clocks stop while they wait for a CPU).
fn stats_table<'a, V: 'a>(guests: impl Iterator<Item = &'a Slot<V>>, now: u64) -> String {
    use core::fmt::Write;
    let guests: Vec<&Slot<V>> = guests.collect();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "keel: {:<16} {:>14} {:>14} {:>14} {:>10} {:>10} {:>8}",
        "guest", "cpu cycles", "keel cycles", "halted cycles", "exits", "irqs", "state"
    );
    for s in &guests {
        // The guest's row: its vCPUs' counts added up; its state is its bootstrap processor's.
        let state = match &s.bsp().state {
            RunState::Runnable | RunState::WaitForSipi => "run",
            RunState::Halted => "halted",
            RunState::Paused { .. } => "paused",
            RunState::Stopped(_) => "stopped",
        };
        let stats = GuestStats::sum(s.vcpus.iter().map(|v| &v.stats));
        let _ = writeln!(
            t,
            "keel: {:<16} {:>14} {:>14} {:>14} {:>10} {:>10} {:>8}",
            s.vm.name,
            stats.cpu_cycles,
            stats.keel_cycles,
            stats.halted_cycles,
            stats.total_exits(),
            stats.interrupts_injected,
            state
        );
    }
    for s in &guests {
        let stats = GuestStats::sum(s.vcpus.iter().map(|v| &v.stats));
        let _ = writeln!(
            t,
            "keel: exits of {}: {}",
            s.vm.name,
            stats.exits_by_reason()
        );
    }
    for s in &guests {
        let c = s.vm.platform.console_ref();
        let _ = writeln!(
            t,
            "keel: console of {}: {} bytes, {} dropped",
            s.vm.name,
            c.bytes_written(),
            c.dropped_bytes()
        );
    }
    let _ = writeln!(t, "keel: host tsc {now}");
    t
}

pub mod migrate;
mod policy;
pub mod reflex;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
