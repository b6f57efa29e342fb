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
    /// Gives a stopped guest's RAM back to the pool (it gets RAM again when booted).
    fn release_ram(&mut self, _hw: &mut Self::Vcpu, _vm: &mut Vm) {}
    /// Keel's pool of memory for guests: (free bytes, total bytes), if known.
    fn memory_pool(&self) -> Option<(u64, u64)> {
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
        }
    }

    /// The guest's claim on the CPU (manifest `weight` and `cap`; `sched::Shares`).
    pub fn with_share(mut self, share: Share) -> Self {
        self.share = share;
        self
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
    /// The vCPU (guest, vCPU) whose registers (those VMX does not switch) are in the CPU. Its
    /// VMCS is loaded afresh at each of its slices, so which VMCS is current is never remembered.
    in_cpu: Option<(usize, usize)>,
    /// Which guest gets the bytes typed on COM1 (`focus`).
    focus: crate::focus::Focus,
    /// The operator's side: the console prompt, the control channel and the monitor behind both.
    ops: Operator,
    /// The load policy over the on-demand guests, if any (`policy`).
    policy: Option<crate::policy::Policy>,
}

/// What the run loop keeps for the monitor (`monitor`): the `keel>` prompt on COM1, the lines
/// from COM2 and the replies waiting to go out there, `top`, and whether `quit` was given.
struct Operator {
    monitor: Option<crate::monitor::Monitor>,
    prompt: crate::monitor::Prompt,
    channel: crate::monitor::LineReader,
    /// Replies for COM2 not yet sent (one JSON object per line).
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
    /// Host TSC until which COM2 is read every millisecond: its receive FIFO holds 16 bytes, 1.4
    /// ms at 115200 baud, and a time slice is longer. Set for a while after each byte received,
    /// so a long line (a snapshot chunk) is not lost to an overrun once it has begun.
    control_busy_until: u64,
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
            in_cpu: None,
            focus: crate::focus::Focus::new(slots_len),
            ops: Operator {
                monitor: None,
                prompt: Default::default(),
                channel: Default::default(),
                reply: Default::default(),
                top: None,
                quit: false,
                started: None,
                kept: None,
                incoming: None,
                control_busy_until: 0,
            },
            policy: None,
        }
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

    /// Runs until every guest has stopped.
    pub fn run(&mut self) {
        while self.step() {}
    }

    /// One turn of the loop: wake the halted vCPUs whose interrupts came, then run one time
    /// slice, or sleep if every live vCPU is halted. False when every guest has stopped.
    pub fn step(&mut self) -> bool {
        self.poll_console();
        self.poll_control();
        crate::log::pump();
        // Console lines that found no room on COM1's queue before (stopped guests' too).
        for s in &mut self.slots {
            print_console(&mut s.vm, PRINT_BUDGET);
        }
        let now = self.cpu.rdtsc();
        self.ops.started.get_or_insert(now);
        self.policy_turn(now);
        let mut live = 0;
        for s in &mut self.slots {
            if !s.live() {
                continue;
            }
            live += 1;
            // A runnable guest waiting for its turn has its clock stopped (see
            // `Slot::waiting_since`); only halted vCPUs need their timers checked here.
            if !s.vcpus.iter().any(|v| v.state == RunState::Halted) {
                continue;
            }
            s.vm.platform.advance(s.vm.now(now));
            for (c, (vcpu, seat)) in s.vcpus.iter_mut().zip(&mut s.seats).enumerate() {
                if vcpu.state == RunState::Halted && s.vm.platform.pending_interrupt(c).is_some()
                    || vcpu.state == RunState::Halted && s.vm.platform.nmi_pending(c)
                {
                    vcpu.state = RunState::Runnable;
                    if let Some(since) = seat.halted_since.take() {
                        vcpu.stats.halted_cycles += now.saturating_sub(since);
                    }
                    s.waiting_since.get_or_insert(now);
                    seat.woken = true;
                }
            }
        }
        if live == 0 {
            return false;
        }
        self.shares.refill(now);
        let seats = self.seats();
        let slots = &self.slots;
        let shares = &self.shares;
        match self.sched.pick_urgent_first(
            seats.len(),
            |k| {
                let (i, c) = seats[k];
                slots[i].live()
                    && slots[i].vcpus[c].state == RunState::Runnable
                    && shares.may_run(i)
            },
            |k| slots[seats[k].0].seats[seats[k].1].woken,
        ) {
            Some(k) => self.run_slice(seats[k]),
            None => {
                // Every live vCPU is halted: sleep until the earliest guest timer (or at most
                // one quantum, in case an interrupt source has no deadline).
                let t0 = self.cpu.rdtsc();
                let mut wake = self
                    .earliest_halted_deadline(None)
                    .unwrap_or(t0 + self.sched.quantum);
                // A capped guest that used its budget runs again when the next period starts.
                if self.shares.any_cap() {
                    wake = wake.min(self.shares.period_end());
                }
                // While console output or a control-channel reply is queued, wake often enough
                // to keep the UART busy (16 bytes of FIFO last 1.4 ms at 115200 baud).
                let max = if crate::log::busy() || !self.ops.reply.is_empty() || self.control_busy()
                {
                    self.cfg.tsc_hz / 1000
                } else {
                    self.sched.quantum
                };
                self.cpu.sleep_until(wake, max);
            }
        }
        true
    }

    /// The host TSC at which the first timer of a guest with a halted vCPU (other than guest
    /// `except`) falls due: when a running vCPU must make room, or when Keel must wake from idle.
    /// Stopped and paused guests do not count.
    fn earliest_halted_deadline(&self, except: Option<usize>) -> Option<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(j, s)| {
                Some(*j) != except
                    && s.live()
                    && s.vcpus.iter().any(|v| v.state == RunState::Halted)
            })
            .filter_map(|(_, s)| s.vm.platform.next_deadline().map(|d| s.vm.host_time(d)))
            .min()
    }

    /// Switches vCPU `seat`'s registers in if they are not in the CPU: the previous vCPU's are
    /// saved, this one's restored.
    fn switch_to(&mut self, seat: (usize, usize)) {
        if self.in_cpu == Some(seat) {
            return;
        }
        self.switch_out();
        let (i, c) = seat;
        let s = &mut self.slots[i];
        self.cpu.restore(&mut s.hw, c, s.vcpus[c].xcr0);
        self.in_cpu = Some(seat);
    }

    /// Saves the registers of the vCPU in the CPU, if any: before another vCPU's are loaded,
    /// or a new guest boots.
    pub fn switch_out(&mut self) {
        if let Some((i, c)) = self.in_cpu.take() {
            self.cpu.save(&mut self.slots[i].hw, c);
        }
    }

    /// Runs vCPU `seat` for one time slice (or what is left of one).
    fn run_slice(&mut self, seat: (usize, usize)) {
        let (i, c) = seat;
        self.switch_to(seat);
        // Its weight in quanta (or what a woken vCPU left of that), no more than a capped
        // guest's budget has left.
        let allowed = self.shares.slice(i);
        let mut left = self.slots[i].seats[c]
            .slice_left
            .take()
            .map_or(allowed, |left| left.min(allowed));
        let cfg = self.cfg;
        let end = loop {
            // While the control channel is busy its FIFO is read every millisecond: the slice
            // runs in pieces of at most that, the same vCPU going on after each read, so its
            // length (the guest's weight) is what it would have been.
            let busy = self.control_busy();
            let piece = if busy {
                left.min(cfg.tsc_hz / 1000)
            } else {
                left
            };
            let ran_before = self.slots[i].vcpus[c].stats.cpu_cycles;
            // When a halted vCPU's timer falls due, this slice ends early so that vCPU can run.
            let others_due = self.earliest_halted_deadline(Some(i));
            let t0 = self.cpu.rdtsc();
            let end = slice(&mut self.cpu, &mut self.slots[i], c, cfg, piece, others_due);
            let ran = self.slots[i].vcpus[c].stats.cpu_cycles - ran_before;
            self.shares.charge(i, ran);
            let whole = piece == left;
            // The slice is measured as one would be: by the clock, Keel's exits included.
            left = left.saturating_sub(self.cpu.rdtsc().saturating_sub(t0).max(1));
            if whole || !matches!(end, SliceEnd::Over) {
                break end;
            }
            self.poll_control();
            // A command may have paused, stopped or replaced it meanwhile.
            let s = &self.slots[i];
            if left == 0 || !s.live() || s.vcpus[c].state != RunState::Runnable {
                break end;
            }
            self.start_signals(i);
            self.switch_to(seat);
        };
        // INIT and SIPI the vCPU sent to its siblings (ICR writes): their run states change.
        self.start_signals(i);
        match end {
            SliceEnd::Over => {}
            SliceEnd::Interrupted => self.sched.interrupted(),
            SliceEnd::Stop(reason) => self.stop(i, reason),
            SliceEnd::StatsRequested => self.print_stats_for(seat),
            SliceEnd::Balloon => self.balloon_call(seat),
        }
    }

    /// Acts on the INIT and STARTUP IPIs guest `i`'s vCPUs sent each other (SDM 10.6.1, 8.4.4):
    /// INIT puts an application processor in wait-for-SIPI, whatever it was doing; a STARTUP
    /// IPI starts one that waits, in real mode at CS = vector << 8 (base vector << 12), IP 0,
    /// with the registers of the INIT state (SDM 9.1.1, Table 9-1). A SIPI to a vCPU not
    /// waiting for one is ignored, as the processor ignores it; INIT to the bootstrap processor
    /// is ignored too (Keel does not model its reset through INIT).
    fn start_signals(&mut self, i: usize) {
        let s = &mut self.slots[i];
        while let Some((c, signal)) = s.vm.platform.take_start_signal() {
            let Some(vcpu) = s.vcpus.get_mut(c) else {
                continue;
            };
            if c == 0 || !vcpu.state.is_live() {
                continue;
            }
            match signal {
                crate::devices::StartSignal::Init => {
                    vcpu.reset();
                    vcpu.state = RunState::WaitForSipi;
                    s.seats[c] = Seat::default();
                }
                crate::devices::StartSignal::Startup(vector) => {
                    if vcpu.state != RunState::WaitForSipi {
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
        if crate::log::fits(who, last) && print_stats(self.slots.iter(), who) {
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
            self.stop(i, StopReason::Killed(e));
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

/// One time slice of the guest in `s`, `quantum` cycles long, cut short at `others_due` (the
/// earliest timer of a halted guest). Its registers are in the CPU; its VMCS is loaded here, and
/// every access to it goes through that handle.
fn slice<C: Cpu>(
    cpu: &mut C,
    s: &mut Slot<C::Vcpu>,
    c: usize,
    cfg: LoopConfig,
    quantum: u64,
    others_due: Option<u64>,
) -> SliceEnd {
    let mut v = match cpu.load(&mut s.hw, c) {
        Ok(v) => v,
        Err(e) => return SliceEnd::Stop(StopReason::Killed(e)),
    };
    let (vm, vcpu, seat, waiting_since) = (
        &mut s.vm,
        &mut s.vcpus[c],
        &mut s.seats[c],
        &mut s.waiting_since,
    );
    cpu.load_spec_ctrl(vcpu.spec_ctrl);
    let start = cpu.rdtsc();
    seat.woken = false;
    if cfg.tsc_offsetting {
        if let Some(since) = waiting_since.take() {
            vm.tsc_offset = vm.tsc_offset.wrapping_sub(start - since);
        }
        // Written at every slice: the clock may have stopped since this vCPU's last one, while
        // the guest waited with another of its vCPUs runnable.
        v.write(Control64::TscOffset, vcpu.vmcs_tsc_offset(vm.tsc_offset));
    } else {
        *waiting_since = None;
    }
    let deadline = start + quantum;
    let min_gap = cfg.tsc_hz / MIN_TIMER_GAP_DIVISOR;
    let mut xcr0 = vcpu.xcr0;
    // The guest's platform is only consulted when it may have changed: after an exit that
    // reached a device, or when one of its timers falls due. CPUID, VMCALL and the like then
    // cost no device work at all (docs/BENCHMARKS.md).
    let mut touched = true;
    let mut timer_due: Option<u64> = None;
    let mut until = deadline;
    // The time of the last exit serves for the timer checks. Time in the guest (entry to exit)
    // is its cpu time; Keel's handling of its exits (exit to next entry) is kept apart.
    let mut now = start;
    // Whether the guest exited in this slice: the time to the next entry is then Keel's handling
    // of that exit (`GuestStats::exit_cycles`).
    let mut after_exit = false;
    loop {
        if touched || timer_due.is_some_and(|d| now >= d) {
            // The guest's TPR for the model, if the last exits left it in VTPR.
            exits::apicv::take_unread_vtpr(&mut *vcpu, &mut *vm);
            vm.platform.advance(vm.now(now));
            exits::inject_pending_interrupt(&mut v, &mut *vcpu, &mut *vm);
            exits::apicv::before_entry(&mut v, &mut *vcpu, &mut *vm);
            timer_due = vm.platform.next_deadline().map(|d| vm.host_time(d));
            // Come back at the end of the slice, when one of the guest's own timers falls
            // due, or when a halted guest's does, whichever is first.
            until = [timer_due, others_due]
                .into_iter()
                .flatten()
                .fold(deadline, u64::min);
        }
        // The one place an event is written to the VM-entry fields (exits::events).
        if let Err(reason) = exits::events::commit(&mut v, &mut *vcpu) {
            return SliceEnd::Stop(reason);
        }
        // The timer is armed afresh before every entry, from a fresh TSC read: it only
        // counts while the guest runs (SDM 26.5.1), so Keel's own time since the last exit
        // must come off it, or a guest timer fires that much late and ticks are lost.
        let t0 = cpu.rdtsc();
        if let Some(rate) = cfg.preemption_timer {
            // The guest runs at least `min_gap` before the timer brings it back, so a timer
            // faster than Keel can deliver (a PIT programmed with count 1 ticks every 0.84 us)
            // cannot livelock it in back-to-back exits: its ticks are coalesced instead
            // (docs/SCHEDULING.md).
            // Rounded up to the timer's unit of 2^rate TSC ticks (SDM 26.5.1): rounded down it
            // would expire just before `until`, find nothing due and be re-armed for `min_gap`,
            // by which the guest's timer interrupt would come late; one unit more would let a
            // slice run past its quantum.
            let left = until.max(t0 + min_gap).saturating_sub(t0);
            let left = left.div_ceil(1 << rate);
            v.write(
                Guest32::PreemptionTimerValue,
                left.min(u32::MAX as u64) as u32,
            );
        }
        vcpu.stats.keel_cycles += t0 - now;
        if after_exit {
            let last = vcpu.stats.last_exit;
            vcpu.stats.record_exit_cycles(last, t0 - now);
        }
        after_exit = true;
        let entered = cpu.enter(&mut v, &mut vcpu.regs);
        let t1 = cpu.rdtsc();
        vcpu.stats.cpu_cycles += t1 - t0;
        now = t1;
        if let Err(e) = entered {
            return SliceEnd::Stop(StopReason::EntryFailed(alloc::format!("{e}")));
        }
        let guest_now = vm.now(t1);
        let raw_reason = v.read(ReadOnly32::ExitReason);
        let reason = ExitReason::from_basic(raw_reason as u16);
        let action = {
            let mut cx = ExitContext {
                vmcs: &mut v,
                vcpu: &mut *vcpu,
                vm: &mut *vm,
                host: cpu.host(),
                now: guest_now,
            };
            exits::handle(&mut cx, raw_reason, reason)
        };
        exits::apply(&mut v, &mut *vcpu, &action);
        touched = exits::touched_platform(reason, &*vcpu, &mut *vm);
        // A power-off or reset the guest asked its board for (ACPI S5, i8042, port 0xCF9).
        if let Some(event) = touched.then(|| vm.platform.take_power_event()).flatten() {
            return SliceEnd::Stop(StopReason::Board(event));
        }
        if (touched || reason == ExitReason::Vmcall) && print_console(&mut *vm, PRINT_BUDGET) {
            crate::log::pump();
        }
        if reason == ExitReason::Xsetbv && vcpu.xcr0 != xcr0 {
            // The guest executed XSETBV (validated by its handler): load it for the next entry.
            cpu.load_xcr0(vcpu.xcr0);
            xcr0 = vcpu.xcr0;
        }
        if reason == ExitReason::Wrmsr
            && vcpu.regs.rcx as u32 == crate::exits::msr::index::SPEC_CTRL
        {
            cpu.load_spec_ctrl(vcpu.spec_ctrl);
        }
        // An IPI to another vCPU of the guest (fixed, NMI, INIT or SIPI) ends the slice, so the
        // target is woken (or started) and runs next, and the sender right after it: a vCPU
        // waiting in HLT for an IPI does not wait for the sender's quantum to run out.
        if touched
            && vm.platform.take_kicked() & !(1 << c) != 0
            && !matches!(action, Action::Halt | Action::Stop(_))
        {
            *waiting_since = Some(now);
            seat.slice_left = Some(deadline.saturating_sub(now));
            return SliceEnd::Interrupted;
        }
        if vm.stats_requested {
            vm.stats_requested = false;
            *waiting_since = Some(cpu.rdtsc());
            // The table is printed after the exit.
            return SliceEnd::StatsRequested;
        }
        if vm.ram.balloon.pending.is_some() {
            *waiting_since = Some(cpu.rdtsc());
            // Its EPT is changed after the exit, with the VMCS no longer loaded.
            return SliceEnd::Balloon;
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
                *waiting_since = Some(now);
                // It gets the CPU back next, but only for what was left of its slice:
                // otherwise a guest woken every few ms would hand the same CPU hog a fresh
                // quantum each time and starve the others.
                seat.slice_left = Some(deadline.saturating_sub(now));
                return SliceEnd::Interrupted;
            }
            Action::Resume | Action::Advance | Action::AdvanceBy(_) | Action::Inject(_) => {
                if now >= deadline {
                    *waiting_since = Some(now);
                    return SliceEnd::Over;
                }
            }
            Action::Halt => {
                vcpu.state = RunState::Halted;
                seat.halted_since = Some(now);
                return SliceEnd::Over;
            }
            Action::Preempted if now < deadline => {}
            Action::Yield | Action::Preempted => {
                *waiting_since = Some(now);
                return SliceEnd::Over;
            }
            Action::Stop(reason) => return SliceEnd::Stop(reason),
        }
    }
}

impl<C: Cpu> RunLoop<C> {
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
            match self
                .cpu
                .boot(&mut s.hw, &mut s.vm, &mut s.vcpus, s.restarts)
            {
                Ok(()) => {
                    s.vm.platform = platform;
                    s.waiting_since = None;
                    s.seats.iter_mut().for_each(|seat| *seat = Seat::default());
                    self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
                    self.in_cpu = Some((i, 0));
                    return;
                }
                Err(e) => error!("guest {}: reboot failed: {e}", s.vm.name),
            }
            // `boot` reset every vCPU's saved registers: vCPU 0's (power-on values) are in the
            // CPU's place now, as after a successful boot.
            self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
            self.in_cpu = Some((i, 0));
        }
        if died && s.restarts < s.restart_limit {
            s.restarts += 1;
            // What the guest printed and Keel has not yet sent, and its console's counts, outlive
            // the restart (`boot` gives it a new platform).
            let console = core::mem::take(s.vm.platform.console());
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
                    self.in_cpu = Some((i, 0));
                    return;
                }
                Err(e) => error!("guest {}: restart failed: {e}", s.vm.name),
            }
            // `boot` reset every vCPU's saved registers: vCPU 0's (power-on values) are in the
            // CPU's place now, as after a successful boot.
            self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
            self.in_cpu = Some((i, 0));
        }
        for vcpu in &mut s.vcpus {
            vcpu.state = RunState::Stopped(reason.clone());
        }
        self.cpu.release_ram(&mut s.hw, &mut s.vm);
    }

    /// Pauses a guest: it keeps its state and is not scheduled until resumed.
    pub fn pause(&mut self, id: usize) -> Result<(), String> {
        let now = self.cpu.rdtsc();
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        for vcpu in &mut s.vcpus {
            if vcpu.state != RunState::WaitForSipi {
                vcpu.state.pause().map_err(|e| alloc::format!("{e}"))?;
            }
        }
        s.paused_since = Some(now);
        info!("guest {} paused", s.vm.name);
        Ok(())
    }

    /// Resumes a paused guest where it was (running or in HLT), its clock as it was at the pause.
    pub fn resume(&mut self, id: usize) -> Result<(), String> {
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
        let clock = s.vm.now(stopped_at);
        let taken = self.cpu.snapshot(&mut s.hw, &s.vm, &s.vcpus, clock);
        if !was_paused && resume {
            self.resume(id)?;
        }
        taken
    }

    /// Replaces guest `id` (running, paused or stopped) by the snapshot `stream`, of a guest of
    /// the same memory size and vCPUs. Its clock goes on from the snapshot's; it runs from the
    /// next pick if `resume`, else it stays paused. A snapshot that is refused leaves the guest
    /// as it was.
    pub fn restore(&mut self, id: usize, stream: &[u8], resume: bool) -> Result<(), String> {
        self.slots.get(id).ok_or("no such guest")?;
        self.switch_out();
        let s = &mut self.slots[id];
        let clock = self
            .cpu
            .restore_snapshot(&mut s.hw, &mut s.vm, &mut s.vcpus, stream)?;
        let now = self.cpu.rdtsc();
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
        let s = self.slots.get_mut(id).ok_or("no such guest")?;
        for vcpu in s.vcpus.iter_mut() {
            vcpu.state
                .stop(StopReason::Operator(why))
                .map_err(|e| alloc::format!("{e}"))?;
        }
        self.cpu.release_ram(&mut s.hw, &mut s.vm);
        Ok(())
    }

    /// Reads the keys typed on COM1: Ctrl-A commands for Keel (statistics, pause and resume all,
    /// focus, the `keel>` prompt), lines typed at the prompt for the monitor, every other byte for
    /// the focused guest's 16550 (`focus`), which gets them as its receive FIFO has room; a halted
    /// guest wakes for the receive interrupt as for its timers.
    fn poll_console(&mut self) {
        use crate::focus::Key;
        use crate::monitor::PromptKey;
        while let Some(byte) = self.cpu.console_key() {
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
                    let reply = self.command(&line, crate::monitor::Form::Text);
                    console_text(&reply.text);
                    if reply.top {
                        let now = self.cpu.rdtsc();
                        self.ops.top = Some(now + self.cfg.tsc_hz);
                    } else {
                        self.prompt_again();
                    }
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
        let t = g.now(now);
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

    /// Reads the control channel (COM2): each line is a monitor command, answered with one JSON
    /// object on one line; the replies go out as COM2 takes them.
    fn poll_control(&mut self) {
        use crate::monitor::ChannelLine;
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
            let reply = match line {
                ChannelLine::Command(line) => self.command(&line, crate::monitor::Form::Json),
                ChannelLine::TooLong => crate::monitor::too_long(),
            };
            if self.ops.reply.len() + reply.text.len() <= REPLY_MAX {
                self.ops.reply.extend(reply.text.as_bytes());
            }
        }
        // The sender may send as many again (`credit`: the FIFO cannot overrun).
        crate::credit::acknowledge(read, &mut self.ops.reply);
        if !self.ops.reply.is_empty() {
            self.cpu.control_send(&mut self.ops.reply);
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
        self.ops.monitor = Some(monitor);
        reply
    }

    /// Boots guest `i` afresh from its image (the monitor's `restart` and `start`).
    fn reboot(&mut self, i: usize) -> Result<(), String> {
        self.switch_out();
        let s = &mut self.slots[i];
        let before = s.bsp().state.clone();
        let console = core::mem::take(s.vm.platform.console());
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
        self.cpu.restore(&mut s.hw, 0, s.vcpus[0].xcr0);
        self.in_cpu = Some((i, 0));
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
        crate::monitor::table::readable(&rows, elapsed, self.cfg.tsc_hz)
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

    fn quit(&mut self) {
        self.ops.quit = true;
        self.ops.prompt.close();
        self.ops.top = None;
        for s in &mut self.slots {
            for v in s.vcpus.iter_mut() {
                let _ = v.state.stop(StopReason::Operator("quit"));
            }
        }
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

/// Prints the accounting table as `who`'s output, whole or not at all: false if it did not fit.
fn print_stats<'a, V: 'a>(guests: impl Iterator<Item = &'a Slot<V>>, who: Writer) -> bool {
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
    LAST_TABLE.store(
        crate::log::wire_len(t.as_bytes()),
        core::sync::atomic::Ordering::Relaxed,
    );
    crate::log::write_as(who, t.as_bytes())
}

mod policy;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
