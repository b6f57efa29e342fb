//! The reflex: a CPUID answered from the VM-exit stub itself, before the exit reaches the run
//! loop (docs/ARCHITECTURE.md, "The reflex").
//!
//! A CPUID whose leaf the guest's table holds (`exits::cpuid::CpuidTable::get`) changes the
//! guest's registers, its RIP and nothing else. The tight loop's register-only way made it in
//! about 200 instructions, about 70 of them the way back to the run loop's frame and in again and
//! the loop's general work, which such an exit needs none of (the reflex: 130, docs/BENCHMARKS.md).
//! The VM-exit stub tests the exit reason itself ([`may_take`]) and the hardware layer calls
//! [`take`] with the guest's registers saved; when it answers true, the stub loads them again and
//! resumes the guest without returning, so the run loop sees only the exits the reflex declines.
//! The tests' fake CPU calls the same [`take`] after each exit it makes
//! (`runloop::Cpu::enter_with_reflex`), so the run loop's tests run through it too.
//!
//! What the reflex does is what the tight loop would do for the same exit, in the same order:
//! - declined (nothing changed) unless the run loop turned it on for this entry
//!   ([`Reflex::arm`]: no event is queued for the guest), the exit came before the piece's next
//!   deadline (`until`: the slice's end, a guest timer, a halted guest's timer), and the leaf is
//!   in the table;
//! - declined too while the guest's RFLAGS.TF is set (the single-step trap the completed
//!   instruction owes is queued by the loop's way, SDM Vol. 3A 17.3.1.4) or blocking by STI or
//!   MOV SS is in force (which the completion must clear, SDM Vol. 3C 26.6.6.1): both rare, both
//!   left to the loop;
//! - the answer written as CPUID writes it (the low halves of RAX, RBX, RCX, RDX, the upper
//!   halves cleared, SDM Vol. 2A "CPUID"), RIP advanced by the exit's instruction length
//!   (SDM Vol. 3C 28.2.4), RF cleared (SDM Vol. 3A 17.3.1.1);
//! - the VMX-preemption timer armed again for the same target, from a fresh TSC read (it counts
//!   only while the guest runs, SDM Vol. 3C 26.5.1: Keel's time comes off it), with the loop's
//!   rule ([`timer_count`]);
//! - the accounts: the guest's time up to the exit, Keel's time to the next entry, the exit's
//!   count and handling time, kept in the reflex and added to the vCPU's [`GuestStats`] by the
//!   run loop when it next sees an exit ([`Reflex::settle`]), before anything reads them.

use crate::exits::cpuid::{self, CpuidTable};
use crate::exits::{RFLAGS_RF, RFLAGS_TF};
use crate::guest::{GuestRegs, GuestStats};
use crate::vmx::{ExitReason, Guest32, GuestNat, ReadOnly32, Vmcs};

const CPUID: u32 = ExitReason::Cpuid.number() as u32;

/// What the reflex needs of the running piece, and what it owes the accounts. One per host
/// CPU's piece; the run loop sets it before each entry of its tight loop ([`Reflex::arm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reflex {
    /// The guest's CPUID table, for the hardware layer, whose VM-exit stub hands the reflex
    /// this struct alone (`hypervisor::keel_reflex`): written by `Cpu::enter_with_reflex` at
    /// each entry from the table it is given, read only during that call.
    pub table: *const CpuidTable,
    /// Host TSC: the VMX-preemption timer brings the guest back by then (the slice's end, a
    /// guest timer, a halted guest's timer: the run loop's `note_deadline`). An exit at or past
    /// it goes to the run loop.
    pub until: u64,
    /// The VMX-preemption timer's target (`until`, or short of a guest timer's deadline by the
    /// piece's lead), as the run loop's last look worked it out.
    pub armed: u64,
    /// The next exit may be taken here ([`Reflex::arm`]).
    on: bool,
    /// The timer's unit, 2^rate TSC ticks, if the guest runs with it, and the least time the
    /// guest runs before it ([`Reflex::timer`]).
    timer: Option<Timer>,
    /// Host TSC at the last VM entry, the run loop's or the reflex's.
    pub entered_at: u64,
    /// The exits taken since the run loop last settled, the guest's time before them, and
    /// Keel's time on them (in all, and the longest).
    taken: u64,
    guest: u64,
    keel: u64,
    keel_max: u64,
}

impl Default for Reflex {
    fn default() -> Self {
        Self {
            table: core::ptr::null(),
            until: 0,
            armed: 0,
            on: false,
            timer: None,
            entered_at: 0,
            taken: 0,
            guest: 0,
            keel: 0,
            keel_max: 0,
        }
    }
}

/// The VMX-preemption timer as the run loop arms it ([`timer_count`]), with its unit's mask
/// worked out once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Timer {
    rate: u8,
    mask: u64,
    min_gap: u64,
}

impl Reflex {
    /// The VMX-preemption timer's rate and the guest's least run (`LoopConfig`), for a piece.
    pub fn timer(&mut self, rate: Option<u8>, min_gap: u64) {
        self.timer = rate.map(|rate| Timer {
            rate,
            mask: (1 << rate) - 1,
            min_gap,
        });
    }

    /// Turns the reflex on or off for the next entry, made at host TSC `entered_at` with the
    /// VMX-preemption timer armed for [`Reflex::armed`]: `on` when no event waits in the guest's
    /// queue (an entry of the reflex commits none).
    #[inline(always)]
    pub fn arm(&mut self, on: bool, entered_at: u64) {
        self.on = on;
        self.entered_at = entered_at;
    }

    /// Whether exits were taken since the last [`Reflex::settle`].
    #[inline(always)]
    pub fn took(&self) -> bool {
        self.taken != 0
    }

    /// Adds what the exits taken since the last call owe to `stats`, as the loop's way would
    /// have counted each (`GuestStats::count_exit`, `record_exit_cycles`, the guest's and
    /// Keel's time). The last exit stays the loop's own.
    #[cold]
    pub fn settle(&mut self, stats: &mut GuestStats) {
        stats.add_timed_exits(CPUID as u16, self.taken, self.keel, self.keel_max);
        stats.cpu_cycles += self.guest;
        stats.keel_cycles += self.keel;
        self.taken = 0;
        self.guest = 0;
        self.keel = 0;
        self.keel_max = 0;
    }
}

/// The VMX-preemption timer's count for target `armed` from host TSC `t0` (SDM Vol. 3C 26.5.1:
/// it counts down once every 2^rate TSC ticks): at least `min_gap` away, rounded up to the unit,
/// at most u32::MAX. Rounded down it would expire just before the target; one unit more would
/// let a slice run past its quantum.
#[inline(always)]
pub fn timer_count(armed: u64, t0: u64, min_gap: u64, rate: u8) -> u32 {
    timer_count_by(armed, t0, min_gap, rate, (1 << rate) - 1)
}

/// [`timer_count`] with the unit's mask, `2^rate - 1`, worked out already.
#[inline(always)]
fn timer_count_by(armed: u64, t0: u64, min_gap: u64, rate: u8, mask: u64) -> u32 {
    // `armed` past `t0 + min_gap`, else `min_gap`: the same as `armed.max(t0 + min_gap) - t0`
    // without its overflow and saturation checks; the division by the unit as a shift with the
    // remainder's carry.
    let left = if armed > t0.wrapping_add(min_gap) {
        armed.wrapping_sub(t0)
    } else {
        min_gap
    };
    let left = (left >> rate) + u64::from(left & mask != 0);
    left.min(u32::MAX as u64) as u32
}

/// Whether the exit whose exit-reason field reads `raw` is one the reflex may take: the
/// VM-exit stub's first test, made before [`take`] is called (the stub, `arch::vmcs`, makes the
/// same comparison in assembly, with CPUID's number as a constant of the same source).
#[inline(always)]
pub fn may_take(raw: u32) -> bool {
    raw == CPUID
}

/// The exit just taken, a CPUID ([`may_take`]; the guest's registers in `regs`, its VMCS
/// current as `v`, host TSC `t1` read right after it), answered here if the reflex takes it
/// (the module's rules); true if so, and the guest is to be entered again at once. False with
/// nothing changed otherwise: the run loop handles it. `rdtsc` reads the host TSC for the next
/// entry.
#[inline(always)]
pub fn take<V: Vmcs + ?Sized>(
    v: &mut V,
    r: &mut Reflex,
    table: &CpuidTable,
    regs: &mut GuestRegs,
    t1: u64,
    rdtsc: impl FnOnce() -> u64,
) -> bool {
    debug_assert!(may_take(v.read(ReadOnly32::ExitReason)));
    if !r.on || t1 >= r.until {
        return false;
    }
    let Some(answer) = table.get(regs.rax as u32) else {
        return false;
    };
    let rflags = v.read(GuestNat::Rflags);
    if rflags & RFLAGS_TF != 0 || v.read(Guest32::InterruptibilityState) & 0b11 != 0 {
        return false;
    }
    cpuid::answer(regs, answer);
    let len = v.read(ReadOnly32::ExitInstructionLength) as u64;
    let rip = v.read(GuestNat::Rip);
    v.write(GuestNat::Rip, rip.wrapping_add(len));
    if rflags & RFLAGS_RF != 0 {
        v.write(GuestNat::Rflags, rflags & !RFLAGS_RF);
    }
    let t0 = rdtsc();
    if let Some(t) = r.timer {
        v.write_supported(
            Guest32::PreemptionTimerValue,
            timer_count_by(r.armed, t0, t.min_gap, t.rate, t.mask),
        );
    }
    let keel = t0.wrapping_sub(t1);
    r.guest = r.guest.wrapping_add(t1.wrapping_sub(r.entered_at));
    r.keel = r.keel.wrapping_add(keel);
    r.keel_max = r.keel_max.max(keel);
    r.taken += 1;
    r.entered_at = t0;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::TestBed;
    use crate::exits::{self, Action, ExitContext};
    use crate::vmx::{FakeVmcs, VmcsAccess, VmcsField};

    /// A guest's table, filled as its first CPUID fills it.
    fn table(t: &TestBed) -> CpuidTable {
        let mut table = CpuidTable::default();
        let (tsc_hz, cpus) = (t.vm.platform.tsc_hz(), t.vm.platform.cpus() as u32);
        table.fill(&t.host, tsc_hz, cpus);
        table
    }

    fn cpuid_exit(v: &mut FakeVmcs, rip: u64, len: u32, rflags: u64) {
        v.set(ReadOnly32::ExitReason, CPUID);
        v.set(ReadOnly32::ExitInstructionLength, len);
        v.set(GuestNat::Rip, rip);
        v.set(GuestNat::Rflags, rflags);
        v.set(Guest32::InterruptibilityState, 0);
    }

    fn armed(until: u64, armed: u64) -> Reflex {
        let mut r = Reflex {
            until,
            armed,
            ..Reflex::default()
        };
        r.timer(Some(5), 1_000);
        r.arm(true, 100);
        r
    }

    #[test]
    fn a_cpuid_of_the_table_is_answered_completed_and_timed() {
        let t = TestBed::new();
        let table = table(&t);
        let mut v = FakeVmcs::default();
        cpuid_exit(&mut v, 0x1000, 2, 0x2 | RFLAGS_RF);
        let mut regs = GuestRegs {
            rax: 0xdead_0000_0000_0000,
            rbx: u64::MAX,
            ..GuestRegs::default()
        };
        let mut r = armed(1_000_000, 500_000);
        assert!(take(&mut v, &mut r, &table, &mut regs, 400, || 450));
        let want = table.get(0).unwrap();
        assert_eq!(
            [regs.rax, regs.rbx, regs.rcx, regs.rdx],
            want.map(u64::from),
            "CPUID writes the low halves and clears the upper"
        );
        assert_eq!(v.read(GuestNat::Rip), 0x1002);
        assert_eq!(v.read(GuestNat::Rflags), 0x2, "RF cleared");
        // (500,000 - 450) / 32, rounded up.
        assert_eq!(v.read(Guest32::PreemptionTimerValue), 15_611);
        let mut stats = GuestStats::default();
        assert!(r.took());
        r.settle(&mut stats);
        assert_eq!(stats.exits[CPUID as usize], 1);
        assert_eq!(stats.cpu_cycles, 300, "entry at 100, exit at 400");
        assert_eq!(stats.keel_cycles, 50);
        assert_eq!(stats.average_exit_cycles(CPUID as usize), Some(50));
        assert_eq!(r.entered_at, 450);
        assert!(!r.took());
        assert!(may_take(CPUID));
        assert!(!may_take(ExitReason::Vmcall.number() as u32));
    }

    #[test]
    fn what_the_reflex_declines_is_left_as_it_was() {
        let t = TestBed::new();
        let table = table(&t);
        let regs0 = GuestRegs {
            rax: 0x4000_0000,
            ..GuestRegs::default()
        };
        type Change = fn(&mut FakeVmcs, &mut Reflex, &mut GuestRegs);
        let cases: [(&str, Change); 6] = [
            ("off", |_, r, _| r.arm(false, 100)),
            ("at the deadline", |_, r, _| r.until = 400),
            (
                "a leaf the table lacks (leaf 1 follows the guest)",
                |_, _, g| g.rax = 1,
            ),
            ("a leaf past the table", |_, _, g| g.rax = 0x8000_0001),
            ("single-stepped", |v, _, _| {
                v.set(GuestNat::Rflags, 0x2 | RFLAGS_TF)
            }),
            ("in an STI shadow", |v, _, _| {
                v.set(Guest32::InterruptibilityState, 1)
            }),
        ];
        for (what, change) in cases {
            let mut v = FakeVmcs::default();
            cpuid_exit(&mut v, 0x1000, 2, 0x2);
            let mut r = armed(1_000_000, 500_000);
            let mut regs = regs0;
            change(&mut v, &mut r, &mut regs);
            let (v0, r0, g0) = (v.clone(), r.clone(), regs);
            assert!(
                !take(&mut v, &mut r, &table, &mut regs, 400, || 450),
                "{what}"
            );
            assert_eq!((v, r, regs), (v0, r0, g0), "{what}: nothing changed");
        }
    }

    /// The reflex and the tight loop's register-only way leave the same registers and VMCS for
    /// every leaf the table holds, from every code size's RIP and with RF set or clear.
    #[test]
    fn the_reflex_answers_as_the_loops_way_does() {
        let mut t = TestBed::new();
        let table = table(&t);
        let leaves = (0..0x20)
            .chain(0x4000_0000..0x4000_0010)
            .chain(0x8000_0000..0x8000_0010);
        let mut taken = 0;
        for leaf in leaves {
            for rflags in [0x2, 0x2 | RFLAGS_RF, 0x202] {
                let regs0 = GuestRegs {
                    rax: leaf,
                    rcx: 0xffff_ffff_0000_0000,
                    rdx: 7,
                    ..GuestRegs::default()
                };
                let mut v = FakeVmcs::default();
                cpuid_exit(&mut v, 0xffff_ffff_ffff_fffe, 3, rflags);
                let mut regs = regs0;
                let mut r = armed(1_000_000, 500_000);
                if !take(&mut v, &mut r, &table, &mut regs, 400, || 450) {
                    assert!(table.get(leaf as u32).is_none(), "leaf {leaf:#x} declined");
                    continue;
                }
                taken += 1;
                cpuid_exit(&mut t.vmcs, 0xffff_ffff_ffff_fffe, 3, rflags);
                t.vcpu.regs = regs0;
                let cx = &mut ExitContext {
                    vmcs: &mut t.vmcs,
                    vcpu: &mut t.vcpu,
                    vm: &mut t.vm,
                    host: &mut t.host,
                    now: 0,
                };
                assert_eq!(exits::cpuid::handle(cx), Action::Advance);
                exits::complete(&mut t.vmcs, &mut t.vcpu);
                assert_eq!(regs, t.vcpu.regs, "leaf {leaf:#x}");
                for f in [GuestNat::Rip.encoding(), GuestNat::Rflags.encoding()] {
                    assert_eq!(v.read_raw(f), t.vmcs.read_raw(f), "leaf {leaf:#x}, {f:#x}");
                }
            }
        }
        assert!(taken >= 3 * 20, "the table's leaves were taken ({taken})");
    }

    #[test]
    fn the_timer_count_is_the_loops() {
        // At least the minimum gap; rounded up to the unit; capped.
        assert_eq!(timer_count(1_000, 990, 100, 5), 4);
        assert_eq!(timer_count(10_000, 1_000, 100, 5), 282);
        assert_eq!(timer_count(10_024, 1_000, 100, 5), 282);
        assert_eq!(timer_count(10_025, 1_000, 100, 5), 283);
        assert_eq!(timer_count(u64::MAX, 0, 100, 0), u32::MAX);
    }
}
