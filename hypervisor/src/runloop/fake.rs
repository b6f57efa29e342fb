//! A fake CPU for the run loop's tests. Its clock advances by a fixed cost at every RDTSC (Keel's
//! own work) and by what the guests execute; each guest runs a script of operations with cycle
//! costs and the exits they cause, stops early when the VMX-preemption timer the loop armed runs
//! out, and takes the interrupts the loop injects by running its handler script. Every entry is
//! recorded, so the tests see what ran when, what it was given, and what its clock read.

use super::{Cpu, Slot};
use crate::exits::testing::{FakeHost, TestBed};
use crate::exits::Host;
use crate::guest::{GuestRegs, RunState, Vcpu, Vm};
use crate::vmx::controls::PrimaryControls;
use crate::vmx::{
    Control32, Control64, ExitReason, FakeVmcs, Guest32, GuestNat, ReadOnly32, ReadOnlyNat, Vmcs,
    VmcsAccess, VmxError,
};
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

/// The TSC rate of the fake machine (Bochs' is about the same).
pub const TSC_HZ: u64 = crate::exits::testing::TEST_TSC_HZ;
/// What each RDTSC costs: Keel's own work between two reads of the clock.
pub const KEEL_COST: u64 = 10;
/// The clock at the start of a test: far from 0, so a wrong offset shows.
pub const START: u64 = 1_000_000_000;

/// One thing a fake guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Executes this many cycles of code that causes no exit (the preemption timer may cut it;
    /// the rest runs when the guest is entered again).
    Run(u64),
    /// HLT.
    Hlt,
    /// `OUT imm8, AL`: a byte to a port.
    Out(u16, u8),
    /// CPUID leaf 0.
    Cpuid,
    /// VMCALL with RAX = the hypercall number.
    Hypercall(u64),
    /// A triple fault.
    TripleFault,
    /// WRMSR of (MSR, value): the x2APIC's registers (`0x800..`) among others.
    Wrmsr(u32, u64),
    /// WRMSR of IA32_TSC_DEADLINE: the guest's TSC at the instruction plus this many cycles
    /// (a deadline already passed when negative).
    Deadline(i64),
    /// STI: sets RFLAGS.IF (no exit). An application processor starts with it clear.
    Sti,
    /// VMCALL with RAX, RBX and RCX: a balloon hypercall (number, guest-physical, pages).
    Balloon(u64, u64, u64),
}

/// A guest's behaviour.
#[derive(Debug, Clone)]
pub struct Program {
    /// Executed in order; at the end the guest goes back to `main[repeat_from]`, or spins for
    /// ever if `None`.
    pub main: Vec<Op>,
    pub repeat_from: Option<usize>,
    /// Executed on each injected external interrupt, then the guest returns to where it was.
    pub handler: Vec<Op>,
    /// RFLAGS (0x202: interrupts on; 0x2: off).
    pub rflags: u64,
}

impl Program {
    /// Computes for ever; an interrupt costs 200 cycles and an EOI.
    pub fn compute() -> Self {
        Self {
            main: alloc::vec![Op::Run(u64::MAX)],
            repeat_from: None,
            handler: alloc::vec![Op::Run(200), Op::Out(0x20, 0x20)],
            rflags: 0x202,
        }
    }

    /// Runs 1,000 cycles, then makes hypercall `nr` (a YIELD, say), for ever.
    pub fn calling(nr: u64) -> Self {
        Self {
            main: alloc::vec![Op::Run(1_000), Op::Hypercall(nr)],
            repeat_from: Some(0),
            ..Self::compute()
        }
    }

    /// Halts between interrupts; each interrupt costs `handler` cycles and an EOI to the master
    /// 8259A.
    pub fn sleeper(handler: u64) -> Self {
        Self {
            main: alloc::vec![Op::Hlt],
            repeat_from: Some(0),
            handler: alloc::vec![Op::Run(handler), Op::Out(0x20, 0x20)],
            rflags: 0x202,
        }
    }

    /// Runs `ops` once, then spins.
    pub fn once(ops: &[Op]) -> Self {
        Self {
            main: ops.to_vec(),
            repeat_from: None,
            handler: alloc::vec![Op::Run(100), Op::Out(0x20, 0x20)],
            rflags: 0x202,
        }
    }

    /// The same program after a setup that initialises the 8259A pair (IRQ0 at vector 0x20,
    /// every other line masked) and starts PIT channel 0 in mode 2 (rate generator) with
    /// `count`: [`PIT_SETUP_EXITS`] OUTs, the count's high byte last.
    pub fn with_pit(mut self, count: u16) -> Self {
        let setup = [
            Op::Out(0x20, 0x11),
            Op::Out(0x21, 0x20),
            Op::Out(0x21, 0x04),
            Op::Out(0x21, 0x01),
            Op::Out(0x21, 0xfe),
            Op::Out(0xa0, 0x11),
            Op::Out(0xa1, 0x28),
            Op::Out(0xa1, 0x02),
            Op::Out(0xa1, 0x01),
            Op::Out(0xa1, 0xff),
            Op::Out(0x43, 0x34),
            Op::Out(0x40, count as u8),
            Op::Out(0x40, (count >> 8) as u8),
        ];
        self.main.splice(0..0, setup);
        self.repeat_from = self.repeat_from.map(|i| i + setup.len());
        self
    }
}

/// How many exits [`Program::with_pit`]'s setup takes.
pub const PIT_SETUP_EXITS: usize = 13;

/// Where a fake guest is in its program.
#[derive(Debug, Clone, Copy, Default)]
struct Cursor {
    pc: usize,
    /// Cycles left of a `Run` the preemption timer cut short.
    left: Option<u64>,
}

/// One vCPU of a guest on the fake CPU: its VMCS and where it is in its program.
pub struct FakeCore {
    pub vmcs: FakeVmcs,
    pub launched: bool,
    /// The host CPU its VMCS is active on (loaded there and not cleared since), if any.
    pub active_on: Option<usize>,
    pub program: Program,
    main: Cursor,
    /// In the interrupt handler (where, in the handler's ops).
    handler: Option<Cursor>,
    /// The guest's paging as of its last entry (a number no other entry has, `FakeCpu::tlb`):
    /// every run may change its page tables and invalidate what it cached (INVLPG, MOV to CR3),
    /// which reaches only the CPU it runs on (SDM Vol. 3C 29.4.3.1).
    paging: u64,
}

impl FakeCore {
    fn new(program: Program) -> Self {
        Self {
            vmcs: FakeVmcs::new(),
            launched: false,
            active_on: None,
            program,
            main: Cursor::default(),
            handler: None,
            paging: 0,
        }
    }
}

/// A guest's hardware on the fake CPU: one [`FakeCore`] per vCPU.
pub struct FakeVcpu {
    pub id: usize,
    pub cores: Vec<FakeCore>,
    pub boots: u32,
    /// The balloon requests carried out for it, and how often its RAM went back to the pool.
    pub balloon_calls: Vec<crate::balloon::Request>,
    pub released: u32,
}

/// A fake vCPU's VMCS, loaded: (guest, vCPU) and its core.
pub struct FakeLoaded<'a>(usize, usize, &'a mut FakeCore);

impl VmcsAccess for FakeLoaded<'_> {
    fn read_raw(&self, encoding: u32) -> u64 {
        self.2.vmcs.read_raw(encoding)
    }

    fn write_raw(&mut self, encoding: u32, value: u64) {
        self.2.vmcs.write_raw(encoding, value)
    }
}

/// One VM entry as the fake CPU saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub guest: usize,
    /// The vCPU of the guest.
    pub vcpu: usize,
    /// The host CPU it ran on.
    pub host: usize,
    /// Host TSC at VM entry and at the VM exit.
    pub start: u64,
    pub end: u64,
    /// The guest's TSC at entry (host TSC + the VMCS TSC offset).
    pub guest_start: u64,
    /// The external interrupt injected at this entry.
    pub injected: Option<u8>,
    pub exit: ExitReason,
}

impl Entry {
    pub fn guest_end(&self) -> u64 {
        self.guest_start + (self.end - self.start)
    }
}

pub struct FakeCpu {
    pub clock: u64,
    /// The VMX-preemption timer's rate (it counts TSC >> rate), or none.
    pub timer_rate: Option<u8>,
    pub trace: Vec<Entry>,
    /// (host TSC when Keel went to sleep, wake, max) of each idle sleep.
    pub sleeps: Vec<(u64, u64, u64)>,
    pub keys: VecDeque<u8>,
    /// Bytes arriving on the control channel, and what Keel sent back on it.
    pub control_in: VecDeque<u8>,
    pub control_out: Vec<u8>,
    /// What each look at the control channel costs (`Cpu::control_byte`): it stands for the
    /// housekeeping of CPU 0's picks (on the machine, moving the guests' console lines and
    /// Keel's own to COM1's queue), which a woken guest's interrupt must not wait for.
    pub control_cost: u64,
    pub spec_ctrl_writes: Vec<u64>,
    pub host: FakeHost,
    /// The host CPU the loop acts for (`Cpu::on_host`): the fake plays each of them in turn.
    pub on: usize,
    /// On each host CPU: the vCPU (guest, vCPU) whose VMCS is current. And how many VMPTRLDs
    /// there were (a load of the VMCS that is current already is none).
    current: Vec<Option<(usize, usize)>>,
    pub loads: u64,
    /// How many times a VMCS handle was asked for (`Cpu::load`), current already or not: on
    /// the hardware each is a VMPTRST at least.
    pub handles: u64,
    /// On each host CPU: the vCPU whose registers (those VMX does not switch) are in it.
    in_cpu: Vec<Option<(usize, usize)>>,
    /// The host CPUs kicked, in order, and when (the fake clock at each kick); how many
    /// VMCLEARs there were.
    pub kicks: Vec<usize>,
    pub kicked_at: Vec<u64>,
    pub releases: u64,
    /// The INVEPTs of a guest's EPT: (host CPU, guest).
    pub ept_flushes: Vec<(usize, usize)>,
    /// On each host CPU: the translations it caches under each vCPU's VPID, as the paging of
    /// the vCPU's run there that cached them ([`FakeCore::paging`]); INVVPID drops them.
    tlb: Vec<alloc::collections::BTreeMap<(usize, usize), u64>>,
    /// Numbers the entries for [`FakeCore::paging`].
    pagings: u64,
    /// The INVVPIDs of a vCPU's VPID: (host CPU, guest, vCPU).
    pub vpid_flushes: Vec<(usize, usize, usize)>,
    /// The entries that found translations of their vCPU's VPID in the CPU from a run older
    /// than its last (the vCPU ran on another CPU since, or its guest booted again): the guest
    /// would have used mappings it had changed and invalidated elsewhere.
    pub stale_entries: Vec<Entry>,
    /// What every balloon request returns.
    pub balloon_status: u64,
    /// Set: every boot fails with this (no memory for the guest, say).
    pub boot_error: Option<String>,
    /// Set: the CPU can migrate guests (`Cpu::migration`), with this fake of the hardware.
    pub migrate: Option<super::migrate::tests::FakeMigrate>,
}

impl FakeCpu {
    pub fn new() -> Self {
        Self {
            clock: START,
            timer_rate: Some(0),
            trace: Vec::new(),
            sleeps: Vec::new(),
            keys: VecDeque::new(),
            control_in: VecDeque::new(),
            control_out: Vec::new(),
            control_cost: 0,
            spec_ctrl_writes: Vec::new(),
            host: TestBed::new().host,
            on: 0,
            current: alloc::vec![None],
            loads: 0,
            handles: 0,
            in_cpu: alloc::vec![None],
            kicks: Vec::new(),
            kicked_at: Vec::new(),
            releases: 0,
            ept_flushes: Vec::new(),
            tlb: alloc::vec![Default::default()],
            pagings: 0,
            vpid_flushes: Vec::new(),
            stale_entries: Vec::new(),
            balloon_status: 0,
            boot_error: None,
            migrate: None,
        }
    }

    /// A guest running `program` on this CPU, created now (its clock reads 0).
    pub fn guest(&self, id: usize, program: Program, restart_limit: u32) -> Slot<FakeVcpu> {
        self.smp_guest(id, alloc::vec![program], restart_limit)
    }

    /// A guest with one vCPU per program (vCPU 0 runs the first), created now. The others wait
    /// for a SIPI.
    pub fn smp_guest(
        &self,
        id: usize,
        programs: Vec<Program>,
        restart_limit: u32,
    ) -> Slot<FakeVcpu> {
        let bed = TestBed::new();
        let mut vm = bed.vm;
        vm.id = id as u32;
        vm.name = alloc::format!("g{id}");
        vm.platform = platform(programs.len());
        let caps = crate::vmx::VmxCaps::bochs_skylake_x();
        let mut vcpus: Vec<Vcpu> = (0..programs.len()).map(|c| Vcpu::new(c, &caps)).collect();
        let mut hw = FakeVcpu {
            id,
            cores: programs.into_iter().map(FakeCore::new).collect(),
            boots: 0,
            balloon_calls: Vec::new(),
            released: 0,
        };
        power_on(&mut hw, &mut vm, &mut vcpus, self.clock);
        Slot::new(vm, vcpus, hw, restart_limit)
    }

    /// The entries of vCPU `vcpu` of guest `id`, in order.
    pub fn vcpu_entries(&self, id: usize, vcpu: usize) -> impl Iterator<Item = &Entry> {
        self.trace
            .iter()
            .filter(move |e| e.guest == id && e.vcpu == vcpu)
    }

    /// The entries of guest `id`, in order.
    pub fn entries(&self, id: usize) -> impl Iterator<Item = &Entry> {
        self.trace.iter().filter(move |e| e.guest == id)
    }

    /// Runs the guest from its current position until it exits; returns the exit and its
    /// instruction length.
    fn execute(
        &mut self,
        vcpu: &mut FakeCore,
        regs: &mut GuestRegs,
        budget: u64,
    ) -> (ExitReason, u64) {
        let mut budget = budget;
        loop {
            let in_handler = vcpu.handler.is_some();
            let ops = match vcpu.handler {
                Some(_) => &vcpu.program.handler,
                None => &vcpu.program.main,
            };
            let cursor = match vcpu.handler.as_mut() {
                Some(c) => c,
                None => &mut vcpu.main,
            };
            let op = match ops.get(cursor.pc) {
                Some(&op) => op,
                // The handler's IRET: back to the interrupted code.
                None if in_handler => {
                    vcpu.handler = None;
                    continue;
                }
                None if vcpu.program.repeat_from.is_some() => {
                    cursor.pc = vcpu.program.repeat_from.unwrap_or(0);
                    continue;
                }
                None => Op::Run(u64::MAX),
            };
            if !matches!(op, Op::Run(_)) {
                cursor.pc += 1;
            }
            let qual = |port: u16| (port as u64) << 16 | 1 << 6;
            let (reason, len) = match op {
                Op::Run(n) => {
                    let rest = cursor.left.take().unwrap_or(n);
                    if rest <= budget {
                        budget -= rest;
                        self.clock += rest;
                        cursor.pc += 1;
                        continue;
                    }
                    self.clock += budget;
                    cursor.left = Some(rest - budget);
                    return (ExitReason::PreemptionTimer, 0);
                }
                Op::Hlt => (ExitReason::Hlt, 1),
                Op::Out(port, value) => {
                    regs.rax = value as u64;
                    vcpu.vmcs.set(ReadOnlyNat::ExitQualification, qual(port));
                    (ExitReason::IoInstruction, 2)
                }
                Op::Cpuid => {
                    regs.rax = 0;
                    regs.rcx = 0;
                    (ExitReason::Cpuid, 2)
                }
                Op::Hypercall(nr) => {
                    regs.rax = nr;
                    (ExitReason::Vmcall, 3)
                }
                Op::Balloon(nr, gpa, pages) => {
                    (regs.rax, regs.rbx, regs.rcx) = (nr, gpa, pages);
                    (ExitReason::Vmcall, 3)
                }
                Op::TripleFault => (ExitReason::TripleFault, 0),
                Op::Sti => {
                    let rflags = vcpu.vmcs.read(GuestNat::Rflags);
                    vcpu.vmcs.set(GuestNat::Rflags, rflags | 1 << 9);
                    continue;
                }
                Op::Deadline(delta) => {
                    let tsc = self
                        .clock
                        .wrapping_add(vcpu.vmcs.read(Control64::TscOffset));
                    let value = tsc.wrapping_add_signed(delta);
                    regs.rcx = crate::exits::msr::index::TSC_DEADLINE.into();
                    regs.rax = value & 0xffff_ffff;
                    regs.rdx = value >> 32;
                    (ExitReason::Wrmsr, 2)
                }
                Op::Wrmsr(msr, value) => {
                    regs.rcx = msr as u64;
                    regs.rax = value & 0xffff_ffff;
                    regs.rdx = value >> 32;
                    (ExitReason::Wrmsr, 2)
                }
            };
            // An exiting instruction takes one cycle.
            self.clock += 1;
            return (reason, len);
        }
    }
}

/// A fake guest's platform: a PC with `cpus` CPUs.
fn platform(cpus: usize) -> crate::devices::Platform {
    let board = crate::devices::board::Board::pc(0, cpus as u8);
    crate::devices::Platform::for_board(board, TSC_HZ)
}

/// The guest at power-on, created at host TSC `clock`: each vCPU's program from the start, a
/// fresh VMCS with RFLAGS and the TSC offset, registers and platform at reset; vCPU 0 runnable,
/// the others waiting for a SIPI.
fn power_on(hw: &mut FakeVcpu, vm: &mut Vm, vcpus: &mut [Vcpu], clock: u64) {
    vm.tsc_offset = 0u64.wrapping_sub(clock);
    vm.clock_seen = 0;
    vm.platform = platform(vcpus.len());
    for (c, (core, vcpu)) in hw.cores.iter_mut().zip(vcpus.iter_mut()).enumerate() {
        core.vmcs = FakeVmcs::new();
        core.launched = false;
        core.active_on = None;
        core.main = Cursor::default();
        core.handler = None;
        // A paging no CPU cached: what any CPU holds of the old life is stale.
        core.paging = 0;
        core.vmcs.set(GuestNat::Rflags, core.program.rflags);
        vcpu.reset();
        core.vmcs
            .set(Control64::TscOffset, vcpu.vmcs_tsc_offset(vm.tsc_offset));
        if c > 0 {
            vcpu.state = RunState::WaitForSipi;
        }
    }
}

impl FakeCpu {
    /// A guest's RAM, EPT or VMCSs change (`what`): none of its vCPUs may be on another host
    /// CPU, where it could be in guest mode (its VMCS is active there until it leaves).
    fn none_elsewhere(&self, hw: &FakeVcpu, what: &str) {
        for (c, core) in hw.cores.iter().enumerate() {
            assert!(
                core.active_on.is_none_or(|k| k == self.on),
                "{what} of guest {} on host CPU {} while its vCPU {c} is active on CPU {:?}",
                hw.id,
                self.on,
                core.active_on
            );
        }
    }
}

impl Cpu for FakeCpu {
    type Vcpu = FakeVcpu;
    type Loaded<'a> = FakeLoaded<'a>;
    type Detached = ();

    fn rdtsc(&mut self) -> u64 {
        self.clock += KEEL_COST;
        self.clock
    }

    fn save(&mut self, hw: &mut FakeVcpu, cpu: usize) {
        let h = self.on;
        assert_eq!(
            self.in_cpu[h],
            Some((hw.id, cpu)),
            "saved a vCPU that is not in host CPU {h}"
        );
        self.in_cpu[h] = None;
    }

    fn restore(&mut self, hw: &mut FakeVcpu, cpu: usize, _xcr0: u64) {
        let (h, me) = (self.on, (hw.id, cpu));
        assert!(
            self.in_cpu[h].is_none() || self.in_cpu[h] == Some(me),
            "vCPU {me:?} restored over vCPU {:?}, which was not saved",
            self.in_cpu[h]
        );
        let elsewhere = self.in_cpu.iter().position(|&o| o == Some(me));
        assert!(
            elsewhere.is_none_or(|k| k == h),
            "vCPU {me:?} restored on host CPU {h} while its registers are in CPU {elsewhere:?}"
        );
        self.in_cpu[h] = Some(me);
    }

    fn load<'a>(&mut self, hw: &'a mut FakeVcpu, cpu: usize) -> Result<FakeLoaded<'a>, String> {
        let (h, me) = (self.on, (hw.id, cpu));
        let id = hw.id;
        let core = hw.cores.get_mut(cpu).ok_or("no such vCPU")?;
        // SDM Vol. 3C 25.11.1: a VMCS is active on one CPU at a time; another may load it only
        // once that one cleared it.
        assert!(
            core.active_on.is_none_or(|k| k == h),
            "VMPTRLD on host CPU {h} of vCPU {me:?}, still active on CPU {:?}",
            core.active_on
        );
        core.active_on = Some(h);
        self.handles += 1;
        if self.current[h] != Some(me) {
            self.current[h] = Some(me);
            self.loads += 1;
        }
        Ok(FakeLoaded(id, cpu, core))
    }

    fn on_host(&mut self, h: usize) {
        if self.current.len() <= h {
            self.current.resize(h + 1, None);
            self.in_cpu.resize(h + 1, None);
            self.tlb.resize(h + 1, Default::default());
        }
        self.on = h;
    }

    fn kick(&mut self, h: usize) {
        self.kicks.push(h);
        self.kicked_at.push(self.clock);
    }

    fn detach(&mut self, hw: &mut FakeVcpu, cpu: usize) -> Result<(), String> {
        self.load(hw, cpu).map(|_| ())
    }

    fn reattach(&mut self, _hw: &mut FakeVcpu, _cpu: usize, _d: ()) {}

    fn flush_ept(&mut self, hw: &mut FakeVcpu) -> Result<(), String> {
        self.ept_flushes.push((self.on, hw.id));
        Ok(())
    }

    fn flush_vpid(&mut self, hw: &mut FakeVcpu, _id: u32, cpu: usize) -> Result<(), String> {
        self.tlb[self.on].remove(&(hw.id, cpu));
        self.vpid_flushes.push((self.on, hw.id, cpu));
        Ok(())
    }

    fn release(&mut self, hw: &mut FakeVcpu, cpu: usize) -> Result<(), String> {
        let (h, me) = (self.on, (hw.id, cpu));
        let core = hw.cores.get_mut(cpu).ok_or("no such vCPU")?;
        assert!(
            core.active_on.is_none_or(|k| k == h),
            "VMCLEAR on CPU {h} of {me:?}, active on CPU {:?}",
            core.active_on
        );
        core.active_on = None;
        core.launched = false;
        if self.current[h] == Some(me) {
            self.current[h] = None;
        }
        self.releases += 1;
        Ok(())
    }

    fn enter(&mut self, vmcs: &mut FakeLoaded<'_>, regs: &mut GuestRegs) -> Result<(), VmxError> {
        let me = (vmcs.0, vmcs.1);
        let vcpu = &mut *vmcs.2;
        let h = self.on;
        assert_eq!(
            self.current[h],
            Some(me),
            "entered a vCPU whose VMCS is not current"
        );
        assert_eq!(
            self.in_cpu[h],
            Some(me),
            "entered a vCPU with another's registers"
        );
        let start = self.clock;
        let guest_start = start.wrapping_add(vcpu.vmcs.read(Control64::TscOffset));
        // SDM 27.6: the event in the VM-entry interruption-information field is delivered first.
        let info = vcpu.vmcs.read(Control32::EntryInterruptionInfo);
        let mut injected = None;
        if info & 1 << 31 != 0 {
            vcpu.vmcs
                .set(Control32::EntryInterruptionInfo, info & !(1 << 31));
            if (info >> 8) & 7 == 0 {
                injected = Some(info as u8);
                vcpu.handler = Some(Cursor::default());
            }
        }
        let window = vcpu.vmcs.read(Control32::PrimaryProcBasedControls)
            & PrimaryControls::INTERRUPT_WINDOW_EXITING.bits()
            != 0;
        let (reason, len) = if window && injected.is_none() && vcpu.program.rflags & 1 << 9 != 0 {
            // SDM 26.7.5: an open interrupt window exits before the first instruction.
            (ExitReason::InterruptWindow, 0)
        } else {
            let budget = match self.timer_rate {
                Some(rate) => (vcpu.vmcs.read(Guest32::PreemptionTimerValue) as u64) << rate,
                None => u64::MAX,
            };
            self.execute(vcpu, regs, budget)
        };
        vcpu.vmcs
            .set(ReadOnly32::ExitReason, reason.number() as u32);
        vcpu.vmcs.set(ReadOnly32::ExitInstructionLength, len as u32);
        vcpu.launched = true;
        let entry = Entry {
            guest: me.0,
            vcpu: me.1,
            host: h,
            start,
            end: self.clock,
            guest_start,
            injected,
            exit: reason,
        };
        // What this CPU cached of the vCPU's paging must be from its last run (wherever that
        // was): else it is from before changes made elsewhere.
        if self.tlb[h].get(&me).is_some_and(|&p| p != vcpu.paging) {
            self.stale_entries.push(entry);
        }
        self.pagings += 1;
        vcpu.paging = self.pagings;
        self.tlb[h].insert(me, vcpu.paging);
        self.trace.push(entry);
        Ok(())
    }

    fn host(&mut self) -> &mut dyn Host {
        &mut self.host
    }

    fn load_xcr0(&mut self, _xcr0: u64) {}

    fn load_spec_ctrl(&mut self, value: u64) {
        if self.spec_ctrl_writes.last() != Some(&value) {
            self.spec_ctrl_writes.push(value);
        }
    }

    fn sleep_until(&mut self, wake: u64, max: u64) {
        self.sleeps.push((self.clock, wake, max));
        // As `arch::lapic::sleep_until`: at least one cycle, at most `max`.
        self.clock += wake.saturating_sub(self.clock).clamp(1, max);
    }

    fn boot(
        &mut self,
        hw: &mut FakeVcpu,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        _restarts: u32,
    ) -> Result<(), String> {
        if let Some(e) = &self.boot_error {
            return Err(e.clone());
        }
        self.none_elsewhere(hw, "boot");
        hw.boots += 1;
        power_on(hw, vm, vcpus, self.clock);
        // As `hypervisor::VmHw::boot`: each vCPU's VPID invalidated on this CPU (only).
        let (on, id) = (self.on, hw.id);
        self.tlb[on].retain(|&(g, _), _| g != id);
        self.current[self.on] = Some((hw.id, 0));
        Ok(())
    }

    fn console_key(&mut self) -> Option<u8> {
        self.keys.pop_front()
    }

    fn control_byte(&mut self) -> Option<u8> {
        self.clock += self.control_cost;
        self.control_in.pop_front()
    }

    fn balloon(
        &mut self,
        hw: &mut FakeVcpu,
        _vm: &mut Vm,
        req: crate::balloon::Request,
    ) -> Result<u64, String> {
        self.none_elsewhere(hw, "balloon call");
        hw.balloon_calls.push(req);
        Ok(self.balloon_status)
    }

    fn release_ram(&mut self, hw: &mut FakeVcpu, _vm: &mut Vm) {
        self.none_elsewhere(hw, "release of its RAM");
        hw.released += 1;
    }

    fn migration(&mut self) -> Option<&mut dyn super::migrate::MigrateHw<FakeVcpu>> {
        self.migrate
            .as_mut()
            .map(|m| m as &mut dyn super::migrate::MigrateHw<FakeVcpu>)
    }

    fn control_send(&mut self, out: &mut VecDeque<u8>) {
        // A transmitter that takes 16 bytes (a FIFO's worth) at a time.
        for _ in 0..16 {
            match out.pop_front() {
                Some(b) => self.control_out.push(b),
                None => return,
            }
        }
    }
}
