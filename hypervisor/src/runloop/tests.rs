//! The run loop driven on the fake CPU through the cases that went wrong before
//! (docs/SCHEDULING.md, "Problems the test found"): unfair shares, lost and late ticks, timer
//! storms, a guest woken while another holds the CPU, clocks that run while a guest waits.

use super::fake::{Entry, FakeCpu, Op, Program, KEEL_COST, PIT_SETUP_EXITS, TSC_HZ};
use super::*;
use crate::devices::clock::PIT_HZ;
use alloc::vec;

/// 10 ms, Keel's default.
const QUANTUM: u64 = TSC_HZ / 100;
const MIN_GAP: u64 = TSC_HZ / MIN_TIMER_GAP_DIVISOR;
/// PIT channel 0 counts for 100 Hz (99.998 Hz) and for about 132.6 Hz, whose ticks fall at every
/// phase of a 10 ms slice.
const PIT_100HZ: u16 = 11932;
const PIT_132HZ: u16 = 9000;

fn config() -> LoopConfig {
    LoopConfig::new(QUANTUM, TSC_HZ, Some(0), true)
}

fn rig(programs: Vec<Program>) -> RunLoop<FakeCpu> {
    smp_rig(programs.into_iter().map(|p| vec![p]).collect())
}

/// PIT period of `count` in TSC cycles.
fn period(count: u16) -> f64 {
    count as f64 * TSC_HZ as f64 / PIT_HZ as f64
}

/// Steps the loop until `done` (within two quanta).
fn step_until(rl: &mut RunLoop<FakeCpu>, done: impl Fn(&RunLoop<FakeCpu>) -> bool) {
    let end = rl.cpu.clock + 2 * QUANTUM;
    while !done(rl) {
        assert!(rl.cpu.clock < end, "not done within two quanta");
        assert!(rl.step(), "every guest stopped");
    }
}

/// Runs the loop until the fake clock has advanced by `cycles`.
fn run_for(rl: &mut RunLoop<FakeCpu>, cycles: u64) {
    let end = rl.cpu.clock + cycles;
    while rl.cpu.clock < end {
        assert!(rl.step(), "every guest stopped");
    }
}

/// Checks that guest `i`, which started its PIT with `count` ([`Program::with_pit`]), took every
/// tick that fell due (all but those too recent to have been delivered) and no more, each within
/// the minimum gap of its time in the guest's own time.
fn every_tick_on_time(rl: &RunLoop<FakeCpu>, i: usize, count: u16) {
    every_tick_within(rl, i, count, MIN_GAP + 10 * KEEL_COST)
}

/// [`every_tick_on_time`] with each tick at most `slack` cycles late.
fn every_tick_within(rl: &RunLoop<FakeCpu>, i: usize, count: u16, slack: u64) {
    // The PIT starts counting when the count's last byte is written: at the guest's time of that
    // exit's handling (the RDTSC after the exit).
    let started = rl
        .cpu
        .entries(i)
        .nth(PIT_SETUP_EXITS - 1)
        .unwrap()
        .guest_end()
        + KEEL_COST;
    // Its time now: a halted guest's clock runs on; a runnable one's stopped when it last exited.
    let now = match rl.slots[i].vcpus[0].state {
        RunState::Halted => rl.slots[i].vm.now(rl.cpu.clock),
        _ => rl.cpu.entries(i).last().unwrap().guest_end() + KEEL_COST,
    };
    let own = now - started;
    let ticks: Vec<&Entry> = rl.cpu.entries(i).filter(|e| e.injected.is_some()).collect();
    let due = (own as f64 / period(count)) as usize;
    let surely_delivered = ((own - MIN_GAP - 10 * KEEL_COST) as f64 / period(count)) as usize;
    assert!(
        (surely_delivered..=due).contains(&ticks.len()),
        "guest {i}: {} ticks, {due} due",
        ticks.len()
    );
    assert!(ticks.iter().all(|e| e.injected == Some(0x20)));
    assert_eq!(
        rl.slots[i].vm.platform.stats().lines[0].coalesced,
        0,
        "no tick lost"
    );
    for (k, e) in ticks.iter().enumerate() {
        let due = started + ((k + 1) as f64 * period(count)).ceil() as u64;
        let late = e.guest_start as i64 - due as i64;
        assert!(
            (0..=slack as i64).contains(&late),
            "guest {i} tick {k}: {late} cycles late"
        );
    }
}

fn cpu_cycles(rl: &RunLoop<FakeCpu>, i: usize) -> u64 {
    rl.slots[i].vcpus[0].stats.cpu_cycles
}

/// Each value's distance from their mean, as a fraction of it.
fn spread(values: &[u64]) -> Vec<f64> {
    let mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
    values.iter().map(|&v| (v as f64 - mean) / mean).collect()
}

/// The entries of the guests in `ids`, grouped into time slices: consecutive entries of one
/// guest, with the entries of the other guests (a woken sleeper) in between left out.
fn slices(trace: &[Entry], ids: &[usize]) -> Vec<(usize, Vec<Entry>)> {
    let mut out: Vec<(usize, Vec<Entry>)> = Vec::new();
    for e in trace.iter().filter(|e| ids.contains(&e.guest)) {
        match out.last_mut() {
            Some((g, entries)) if *g == e.guest => entries.push(*e),
            _ => out.push((e.guest, vec![*e])),
        }
    }
    out
}

/// Every slice of the guests in `ids` but the last (still running) holds one quantum of guest
/// time, less Keel's work around its entries.
fn whole_slices_hold_a_quantum(trace: &[Entry], ids: &[usize]) {
    let all = slices(trace, ids);
    for (g, entries) in &all[..all.len() - 1] {
        let ran: u64 = entries.iter().map(|e| e.end - e.start).sum();
        assert!(
            ran <= QUANTUM && ran > QUANTUM - 20 * KEEL_COST * entries.len() as u64,
            "guest {g}: {ran} cycles in {} entries",
            entries.len()
        );
    }
}

#[test]
fn three_cpu_bound_guests_get_equal_shares() {
    let mut rl = rig(vec![Program::compute(); 3]);
    // 300 slices: 100 each.
    for _ in 0..300 {
        assert!(rl.step());
    }
    let cycles: Vec<u64> = (0..3).map(|i| cpu_cycles(&rl, i)).collect();
    for d in spread(&cycles) {
        assert!(d.abs() < 0.01, "shares {cycles:?}");
    }
    // Each ran 100 quanta in the guest, less Keel's own time around each entry.
    for (i, &c) in cycles.iter().enumerate() {
        assert!(
            c <= 100 * QUANTUM && c > 100 * QUANTUM * 99 / 100,
            "guest {i}: {c}"
        );
        let s = &rl.slots[i].vcpus[0].stats;
        assert_eq!(
            s.total_exits(),
            100,
            "guest {i}: one preemption-timer exit a slice"
        );
    }
    assert_eq!(
        rl.cpu.trace[..4]
            .iter()
            .map(|e| e.guest)
            .collect::<Vec<_>>(),
        [0, 1, 2, 0]
    );
    // Each slice loads its guest's VMCS (VMPTRLD) and reaches it only through that handle.
    assert_eq!(rl.cpu.loads, 300);
}

/// The first catch of the Bochs scheduler test (commit 9b8ba3a: +65.7% / -6.7% / -59.1%): a
/// guest whose slice a waking sleeper cut short got a whole new quantum.
#[test]
fn cpu_bound_guests_stay_fair_while_a_sleeper_wakes_in_their_slices() {
    let mut programs = vec![Program::compute(); 3];
    programs.push(Program::sleeper(200).with_pit(PIT_132HZ));
    let mut rl = rig(programs);
    run_for(&mut rl, 6 * TSC_HZ);
    let cycles: Vec<u64> = (0..3).map(|i| cpu_cycles(&rl, i)).collect();
    for d in spread(&cycles) {
        assert!(d.abs() < 0.01, "shares {cycles:?}");
    }
    let total: u64 = (0..4).map(|i| cpu_cycles(&rl, i)).sum();
    let sleeper = cpu_cycles(&rl, 3) as f64 / total as f64;
    assert!(sleeper < 0.01, "the sleeper's share {sleeper}");
}

#[test]
fn a_halted_guest_gets_every_tick_on_time_while_others_compute() {
    let mut programs = vec![Program::compute(); 2];
    programs.push(Program::sleeper(200).with_pit(PIT_100HZ));
    let mut rl = rig(programs);
    run_for(&mut rl, 2 * TSC_HZ);
    // Its clock ran with the machine's while it was halted, and stopped only between its
    // wake-ups and its first instruction after them.
    let own_time = rl.slots[2].vm.now(rl.cpu.clock);
    let elapsed = rl.cpu.clock - super::fake::START;
    assert!(
        own_time <= elapsed && own_time > elapsed * 999 / 1000,
        "{own_time} of {elapsed}"
    );
    every_tick_on_time(&rl, 2, PIT_100HZ);
    // The other two shared the rest equally.
    let cycles = [cpu_cycles(&rl, 0), cpu_cycles(&rl, 1)];
    assert!(spread(&cycles)[0].abs() < 0.01, "{cycles:?}");
}

#[test]
fn a_woken_guest_runs_first_and_the_interrupted_guest_gets_the_rest_of_its_slice() {
    let mut programs = vec![Program::compute(); 2];
    programs.push(Program::sleeper(200).with_pit(PIT_132HZ));
    let mut rl = rig(programs);
    run_for(&mut rl, TSC_HZ);
    let trace = &rl.cpu.trace;
    let mut interrupted = 0;
    for (n, e) in trace
        .iter()
        .enumerate()
        .filter(|(_, e)| e.injected.is_some())
    {
        // The sleeper's wake-up ran right after the exit that made room for it, and the guest
        // that made room ran right after the sleeper halted again.
        let before = trace[n - 1];
        assert_ne!(before.guest, 2);
        assert!(
            e.start - before.end < 10 * KEEL_COST,
            "{before:?} then {e:?}"
        );
        let back = trace[n + 1..].iter().find(|x| x.guest != 2).unwrap();
        if before.exit == ExitReason::PreemptionTimer && back.guest == before.guest {
            interrupted += 1;
        }
    }
    assert!(interrupted > 100, "{interrupted} slices cut short");
    // Every whole slice holds one quantum of guest time, whether a wake-up cut it or not.
    whole_slices_hold_a_quantum(trace, &[0, 1]);
}

/// A PIT programmed with count 1 is due every 0.84 us: without the minimum gap every entry of
/// its guest exited at once (a livelock of back-to-back exits).
#[test]
fn a_timer_that_is_always_due_does_not_livelock_its_guest() {
    let mut storm = Program::once(&[Op::Run(1_000_000), Op::Out(0xf4, 0x21)]);
    // Interrupts off: the interrupt stays pending and the timer always due.
    storm.rflags = 0x2;
    let mut rl = rig(vec![storm.with_pit(1), Program::compute()]);
    for _ in 0..1_000 {
        if !rl.slots[0].vcpus[0].state.is_live() {
            break;
        }
        assert!(rl.step());
    }
    assert_eq!(
        rl.slots[0].vcpus[0].state,
        RunState::Stopped(StopReason::DebugExit(0x43)),
        "the storm's guest finished its work"
    );
    let s = &rl.slots[0].vcpus[0].stats;
    // Every entry ran at least the minimum gap, but the last of each slice and its first (a
    // slice's first entry comes back at once for a timer of the guest's own due then).
    let slices = 1_000_000 / QUANTUM + 1;
    assert!(
        s.total_exits() <= 1_000_000 / MIN_GAP + 3 * slices,
        "{} exits",
        s.total_exits()
    );
    let share = s.cpu_cycles as f64 / (s.cpu_cycles + s.keel_cycles) as f64;
    assert!(share > 0.9, "{share} of its time in the guest");
    // The other guest had its turns meanwhile.
    assert!(cpu_cycles(&rl, 1) >= 1_000_000 - QUANTUM);
}

/// A runnable guest's clock stops while another has the CPU, and while it is paused: its timers
/// keep their rate in its own time.
#[test]
fn clocks_stop_while_a_guest_waits_and_while_it_is_paused() {
    let mut rl = rig(vec![Program::compute(); 2]);
    let gaps = |rl: &RunLoop<FakeCpu>| -> Vec<u64> {
        let mine: Vec<&Entry> = rl.cpu.entries(0).collect();
        mine.windows(2)
            .map(|w| w[1].guest_start - w[0].guest_end())
            .collect()
    };
    for _ in 0..10 {
        assert!(rl.step());
    }
    assert!(
        gaps(&rl).iter().all(|&g| g < 10 * KEEL_COST),
        "{:?}",
        gaps(&rl)
    );
    rl.pause(0).unwrap();
    let paused_at = rl.cpu.trace.len();
    run_for(&mut rl, 20 * QUANTUM);
    assert!(
        rl.cpu.trace[paused_at..].iter().all(|e| e.guest == 1),
        "a paused guest ran"
    );
    rl.resume(0).unwrap();
    for _ in 0..4 {
        assert!(rl.step());
    }
    assert!(rl.cpu.trace[paused_at..].iter().any(|e| e.guest == 0));
    let gaps = gaps(&rl);
    assert!(gaps.iter().all(|&g| g < 10 * KEEL_COST), "{gaps:?}");
    // The console keys do the same for every guest.
    rl.cpu.keys.extend(b"\x01p"); // Ctrl-A p
    let before = rl.cpu.trace.len();
    assert!(rl.step());
    assert_eq!(
        rl.cpu.trace.len(),
        before,
        "nothing runs while all are paused"
    );
    // Keys came: the serial lines are read every millisecond for a while (`take_keys`).
    assert_eq!(rl.cpu.sleeps.last().map(|s| s.2), Some(TSC_HZ / 1000));
    rl.cpu.keys.extend(b"\x01r"); // Ctrl-A r
    assert!(rl.step());
    // The slice runs in pieces of a millisecond while keys come (`take_keys`).
    assert!(rl.cpu.trace.len() > before, "the guests run again");
}

#[test]
fn stopped_guests_never_run_again() {
    let cpu = FakeCpu::new();
    let slots = vec![
        cpu.guest(0, Program::once(&[Op::Run(250_000), Op::Out(0xf4, 1)]), 0),
        cpu.guest(1, Program::compute(), 0),
        // Dies twice: booted again once (its restart budget), then stopped.
        cpu.guest(2, Program::once(&[Op::Run(50_000), Op::TripleFault]), 1),
    ];
    let mut rl = RunLoop::new(cpu, config(), slots);
    run_for(&mut rl, 20 * QUANTUM);
    rl.kill(1).unwrap();
    let killed_at = rl.cpu.trace.len();
    let mut steps = 0;
    while rl.step() {
        steps += 1;
        assert!(steps < 1000, "the loop did not end");
    }
    let state = |i: usize| rl.slots[i].vcpus[0].state.clone();
    assert_eq!(state(0), RunState::Stopped(StopReason::DebugExit(3)));
    assert_eq!(state(1), RunState::Stopped(StopReason::Operator("kill")));
    assert_eq!(state(2), RunState::Stopped(StopReason::TripleFault));
    assert_eq!(rl.slots[2].hw.boots, 1);
    let last = |i: usize| rl.cpu.trace.iter().rposition(|e| e.guest == i).unwrap();
    assert_eq!(rl.cpu.trace[last(0)].exit, ExitReason::IoInstruction);
    assert!(last(1) < killed_at);
    assert_eq!(rl.cpu.trace[last(2)].exit, ExitReason::TripleFault);
    let deaths = rl
        .cpu
        .entries(2)
        .filter(|e| e.exit == ExitReason::TripleFault)
        .count();
    assert_eq!(deaths, 2);
    // Its 250 000 cycles and the OUT, plus the RDTSC that ends each entry's account.
    let entries = rl.cpu.entries(0).count() as u64;
    assert_eq!(
        rl.slots[0].vcpus[0].stats.cpu_cycles,
        250_000 + 1 + entries * KEEL_COST
    );
}

/// With every guest halted Keel sleeps until the earliest guest timer, and no longer.
#[test]
fn idle_sleeps_until_the_earliest_halted_timer() {
    let mut rl = rig(vec![
        Program::sleeper(200).with_pit(PIT_100HZ),
        Program::sleeper(200).with_pit(PIT_132HZ),
    ]);
    run_for(&mut rl, TSC_HZ / 2);
    assert!(rl.cpu.sleeps.len() > 100);
    for &(at, wake, max) in &rl.cpu.sleeps {
        assert_eq!(max, QUANTUM);
        assert!(
            wake > at && wake - at <= period(PIT_100HZ) as u64 + 1,
            "{at} {wake}"
        );
    }
    // Woken at the deadline it slept to, each guest takes its tick.
    every_tick_on_time(&rl, 0, PIT_100HZ);
    every_tick_on_time(&rl, 1, PIT_132HZ);
    assert_eq!(
        rl.cpu.spec_ctrl_writes,
        [0],
        "IA32_SPEC_CTRL is written only when it changes"
    );
}

/// A guest takes its own timer's ticks on time whether it exits often (CPUID: no device work
/// after it, so the loop must consult its platform when a timer falls due) or never (the
/// preemption timer must bring it back for them); and a halted guest's ticks are on time while
/// a guest that exits more often than the minimum gap has the CPU (its preemption timer, re-armed
/// at every entry, never expires: the loop must look at the halted guests' deadlines after every
/// exit).
#[test]
fn every_guest_gets_its_ticks_on_time_whether_the_running_one_exits_often_or_never() {
    let busy = Program {
        main: vec![Op::Run(300), Op::Cpuid],
        repeat_from: Some(0),
        ..Program::compute()
    };
    let mut rl = rig(vec![
        busy.with_pit(PIT_100HZ),
        Program::compute().with_pit(PIT_132HZ),
        Program::sleeper(200).with_pit(PIT_132HZ),
    ]);
    run_for(&mut rl, TSC_HZ);
    every_tick_on_time(&rl, 0, PIT_100HZ);
    every_tick_on_time(&rl, 1, PIT_132HZ);
    every_tick_on_time(&rl, 2, PIT_132HZ);
    let cpuid = rl.slots[0].vcpus[0].stats.exits[ExitReason::Cpuid.number() as usize];
    assert!(cpuid > 10_000, "{cpuid} CPUID exits");
}

/// A computing guest's own timer that falls due inside its slice brings it back by the
/// VMX-preemption timer, which the tight loop follows with the platform look alone
/// (`exits::fast::handle_preempted`, no general dispatch): the tick goes in at the next entry,
/// in the same slice, on time; every preemption exit is counted once and its handling timed;
/// the slices still hold a quantum each.
#[test]
fn a_guests_own_timer_inside_its_slice_is_taken_there_and_every_preemption_counted() {
    let mut rl = rig(vec![
        Program::compute().with_pit(PIT_132HZ),
        Program::compute().with_pit(PIT_100HZ),
    ]);
    run_for(&mut rl, TSC_HZ);
    every_tick_on_time(&rl, 0, PIT_132HZ);
    every_tick_on_time(&rl, 1, PIT_100HZ);
    let trace = &rl.cpu.trace;
    let preempted = ExitReason::PreemptionTimer.number() as usize;
    for i in 0..2 {
        let st = &rl.slots[i].vcpus[0].stats;
        let traced = rl
            .cpu
            .entries(i)
            .filter(|e| e.exit == ExitReason::PreemptionTimer)
            .count() as u64;
        assert_eq!(st.exits[preempted], traced, "guest {i}: each counted once");
        // The handling of those inside a slice is timed (up to the next entry).
        let inside = trace
            .windows(2)
            .filter(|w| w[0].guest == i && w[1].guest == i)
            .filter(|w| w[0].exit == ExitReason::PreemptionTimer)
            .collect::<Vec<_>>();
        assert!(
            st.exits_timed[preempted] >= inside.len() as u64,
            "guest {i}"
        );
        // Ticks taken in the slice they fell due in: right after its own preemption exit.
        let in_slice = inside.iter().filter(|w| w[1].injected.is_some()).count();
        assert!(
            in_slice > 30,
            "guest {i}: {in_slice} ticks inside its slices"
        );
    }
    whole_slices_hold_a_quantum(trace, &[0, 1]);
}

/// The same with port accesses the tight loop completes (`exits::fast::handle_port`: the UART's
/// scratch register changes nothing beyond the UART): counted, the device left as the guest
/// wrote it, every tick of its own PIT and of the other guests on time, a quantum each. An OUT
/// that reaches further (a byte to the console) goes on to the general follow-up, in the slice.
#[test]
fn quiet_port_accesses_keep_ticks_counters_and_devices() {
    let busy = Program {
        main: vec![
            Op::Run(300),
            Op::Out(0x3ff, 0x5a),
            Op::Run(300),
            Op::Out(0x3ff, 0xa5),
        ],
        repeat_from: Some(0),
        ..Program::compute()
    };
    let printer = Program {
        main: vec![Op::Run(1000), Op::Out(0x3f8, b'k'), Op::Out(0x3f8, b'\n')],
        repeat_from: Some(0),
        ..Program::compute()
    };
    let mut rl = rig(vec![
        busy.with_pit(PIT_100HZ),
        Program::sleeper(200).with_pit(PIT_132HZ),
        printer.with_pit(PIT_132HZ),
    ]);
    run_for(&mut rl, TSC_HZ);
    every_tick_on_time(&rl, 0, PIT_100HZ);
    every_tick_on_time(&rl, 1, PIT_132HZ);
    every_tick_on_time(&rl, 2, PIT_132HZ);
    let io = ExitReason::IoInstruction.number() as usize;
    let outs = |i: usize| rl.slots[i].vcpus[0].stats.exits[io];
    let entries = |i: usize| rl.cpu.entries(i).count() as u64;
    // Every exit of the busy guest but its preemptions is one of its OUTs: no access lost or
    // counted twice.
    let preempted = rl
        .cpu
        .entries(0)
        .filter(|e| e.exit == ExitReason::PreemptionTimer)
        .count() as u64;
    assert_eq!(outs(0), entries(0) - preempted, "every OUT counted once");
    assert!(outs(0) > 10_000, "{} OUTs", outs(0));
    let last = rl
        .cpu
        .entries(0)
        .filter(|e| e.exit == ExitReason::IoInstruction)
        .count();
    // Less the setup and an EOI per tick: the OUTs of the main loop, alternating.
    let ticks = rl.cpu.entries(0).filter(|e| e.injected.is_some()).count();
    let expected = if (last - PIT_SETUP_EXITS - ticks) % 2 == 1 {
        0x5a
    } else {
        0xa5
    };
    let outs_2 = outs(2);
    let now = rl.slots[0].vm.now(rl.cpu.clock);
    let scratch = rl.slots[0].vm.platform.io_read(0x3ff, 1, now);
    assert_eq!(
        scratch,
        Some(expected),
        "the UART holds the last value written"
    );
    let uart = rl.slots[2]
        .vm
        .platform
        .device::<crate::devices::uart16550::Uart16550>();
    let sent = uart.map(|u| u.tx_bytes()).unwrap_or(0);
    // Its OUTs: the setup, an EOI per tick, and the console bytes.
    let ticks = rl.cpu.entries(2).filter(|e| e.injected.is_some()).count() as u64;
    assert_eq!(
        sent,
        outs_2 - PIT_SETUP_EXITS as u64 - ticks,
        "every console byte went out"
    );
}

/// The VMX-preemption timer counts in units of 2^rate TSC cycles (SDM 26.5.1): armed for a
/// guest timer's deadline, it must not expire before it (rounded down, it did, found nothing due
/// and was re-armed for the minimum gap: each tick came up to that much late).
#[test]
fn a_coarse_preemption_timer_does_not_make_ticks_late() {
    const RATE: u8 = 5;
    let mut cpu = FakeCpu::new();
    cpu.timer_rate = Some(RATE);
    let slots = vec![cpu.smp_guest(0, vec![Program::compute().with_pit(PIT_132HZ)], 0)];
    let cfg = LoopConfig {
        preemption_timer: Some(RATE),
        ..config()
    };
    let mut rl = RunLoop::new(cpu, cfg, slots);
    run_for(&mut rl, TSC_HZ / 2);
    every_tick_within(&rl, 0, PIT_132HZ, (1 << RATE) + 10 * KEEL_COST);
}

/// YIELD gives the rest of the slice to the next guest; PRINT_STATS does too (the table is
/// printed after the caller's exit).
#[test]
fn yield_and_print_stats_end_the_slice() {
    let mut rl = rig(vec![
        Program::calling(crate::abi::hc::YIELD),
        Program::calling(crate::abi::hc::PRINT_STATS),
        Program::compute(),
    ]);
    for _ in 0..30 {
        assert!(rl.step());
    }
    let all = slices(&rl.cpu.trace, &[0, 1, 2]);
    assert_eq!(all.len(), 30, "one guest after the other");
    for (g, entries) in &all {
        let ran: u64 = entries.iter().map(|e| e.end - e.start).sum();
        if *g < 2 {
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].exit, ExitReason::Vmcall);
            assert_eq!(ran, 1_000 + 1);
        } else {
            assert!(ran > QUANTUM * 99 / 100, "{ran}");
        }
    }
    // Their clocks stop while they wait, as after a slice that ran out.
    let mine: Vec<&Entry> = rl.cpu.entries(1).collect();
    assert!(mine
        .windows(2)
        .all(|w| w[1].guest_start - w[0].guest_end() < 10 * KEEL_COST));
}

/// The accounting table (PRINT_STATS) has a row per guest with its cycles as its statistics
/// hold them, and ends with the host TSC it was made at: what guests used between two tables is
/// set against the machine's time by it (their own clocks stop while they wait for the CPU).
#[test]
fn the_accounting_table_counts_each_guest_and_ends_with_the_host_tsc() {
    let mut rl = rig(vec![Program::compute(), Program::compute()]);
    for _ in 0..6 {
        assert!(rl.step());
    }
    let now = rl.cpu.clock;
    let t = stats_table(rl.slots.iter(), now);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("keel: guest "), "{t}");
    for (k, s) in rl.slots.iter().enumerate() {
        let v: Vec<&str> = lines[1 + k].split_whitespace().collect();
        assert_eq!(v[1], s.vm.name, "{t}");
        assert_eq!(v[2], s.vcpus[0].stats.cpu_cycles.to_string(), "{t}");
        assert_eq!(v[3], s.vcpus[0].stats.keel_cycles.to_string(), "{t}");
        assert!(s.vcpus[0].stats.cpu_cycles > 0);
    }
    assert_eq!(
        lines.last(),
        Some(&format!("keel: host tsc {now}").as_str())
    );
}

/// A YIELD gives up the slice also while the slice runs in pieces (a key typed in the last
/// second, or the control channel busy: `start_piece`). It did not: the piece ended at the
/// YIELD, and the next piece went to the same vCPU, which kept the CPU to its quantum's end.
#[test]
fn a_yield_gives_up_the_slice_while_keys_come_too() {
    let mut rl = rig(vec![Program::calling(crate::abi::hc::YIELD); 2]);
    for _ in 0..4 {
        assert!(rl.step());
    }
    rl.cpu.keys.extend(b"x");
    let from = rl.cpu.trace.len();
    for _ in 0..20 {
        assert!(rl.step());
    }
    let after = &rl.cpu.trace[from..];
    assert!(after.len() >= 20);
    for w in after.windows(2) {
        assert_ne!(w[0].guest, w[1].guest, "a YIELD kept the CPU: {w:?}");
    }
}

/// The switch at a slice's end costs one VMCS handle per slice on one host CPU: the piece is
/// started at its first entry with the VMCS loaded for it (`Piece::start_at_entry`), not
/// loaded once to start it and again to enter it. The guests' clocks stop from the exit that
/// ends a slice to the next slice's first entry, as before.
#[test]
fn a_slice_loads_its_vmcs_once_and_its_guest_clock_restarts_at_its_entry() {
    let mut rl = rig(vec![Program::calling(crate::abi::hc::YIELD); 2]);
    for _ in 0..4 {
        assert!(rl.step());
    }
    let (handles, entries) = (rl.cpu.handles, rl.cpu.trace.len());
    for _ in 0..20 {
        assert!(rl.step());
    }
    assert_eq!(rl.cpu.trace.len() - entries, 20, "one entry a slice");
    assert_eq!(rl.cpu.handles - handles, 20, "one VMCS handle a slice");
    for g in 0..2 {
        let mine: Vec<&Entry> = rl.cpu.entries(g).collect();
        // From the YIELD's exit to the next entry: the exit's own clock read and the one that
        // arms the preemption timer at the entry.
        let gaps: Vec<u64> = mine
            .windows(2)
            .map(|w| w[1].guest_start - w[0].guest_end())
            .collect();
        assert!(gaps.iter().all(|&g| g <= 2 * KEEL_COST), "{gaps:?}");
    }
}

/// A guest that yields (an exit that touches nothing of its platform) starts its next slice
/// without the platform look (`Seat::untouched`), but not when something reached it while it
/// waited: a key typed for it, whose UART raises IRQ 4 (routed by the IOAPIC to its APIC as
/// 0x44), comes at its next entry; and a tick of its PIT that fell due while it waited is
/// taken at once too.
#[test]
fn a_yielding_guest_gets_what_reached_it_while_it_waited_at_its_next_entry() {
    let mut main = x2apic_on().to_vec();
    // MCR.OUT2, then IER.ERBFI: a received byte raises IRQ 4.
    main.extend([Op::Out(0x3fc, 0x08), Op::Out(0x3f9, 0x01)]);
    let from = main.len();
    main.extend([Op::Run(1_000), Op::Hypercall(crate::abi::hc::YIELD)]);
    let yielder = Program {
        main,
        repeat_from: Some(from),
        handler: vec![Op::Run(100), Op::Wrmsr(X2APIC_EOI, 0)],
        rflags: 0x202,
    };
    let mut rl = rig(vec![
        yielder,
        Program::calling(crate::abi::hc::YIELD),
        Program::calling(crate::abi::hc::YIELD).with_pit(PIT_132HZ),
    ]);
    let base = crate::devices::board::IOAPIC_BASE;
    let p = &mut rl.slots[0].vm.platform;
    for (reg, value) in [(0x19, 0u64), (0x18, 0x44)] {
        p.mmio_write(0, base, 4, reg, 0);
        p.mmio_write(0, base + 0x10, 4, value, 0);
    }
    run_for(&mut rl, 5 * TSC_HZ / 1000);
    assert!(
        rl.cpu.entries(0).all(|e| e.injected.is_none()),
        "nothing to take yet"
    );
    let typed = rl.cpu.clock;
    rl.cpu.keys.extend(b"x");
    run_for(&mut rl, 5 * TSC_HZ / 1000);
    let got = rl
        .cpu
        .entries(0)
        .find(|e| e.injected == Some(0x44))
        .copied()
        .expect("the key's interrupt never came");
    // The keys are taken within the housekeeping's millisecond.
    assert!(
        got.start - typed < 2 * TSC_HZ / 1000,
        "the key's interrupt came {} cycles after it was typed",
        got.start - typed
    );
    let yields = |rl: &RunLoop<FakeCpu>| {
        rl.cpu
            .entries(0)
            .filter(|e| e.exit == ExitReason::Vmcall)
            .count()
    };
    assert!(yields(&rl) > 20, "it yielded {} times", yields(&rl));
    every_tick_on_time(&rl, 2, PIT_132HZ);
}

/// A guest added while the others run (`hypervisor::Runner::add_guest` appends a slot) is
/// scheduled from the next pick on: the loop's list of vCPUs, kept from pick to pick, grows
/// with it.
#[test]
fn a_guest_added_while_others_run_gets_its_turns() {
    let mut rl = rig(vec![Program::compute(); 2]);
    for _ in 0..4 {
        assert!(rl.step());
    }
    let added = rl.cpu.guest(2, Program::compute(), 0);
    rl.slots.push(added);
    let before = rl.cpu.trace.len();
    for _ in 0..6 {
        assert!(rl.step());
    }
    let ran: Vec<usize> = slices(&rl.cpu.trace[before..], &[0, 1, 2])
        .iter()
        .map(|(g, _)| *g)
        .collect();
    // Guest 1 ran last: the rotation goes on with the new guest.
    assert_eq!(ran, vec![2, 0, 1, 2, 0, 1]);
}

/// A guest paused while halted has its clock stopped too (issue 12: a halted guest paused 3 s
/// lost 3,639 of 6,001 ticks): after the resume its PIT ticks keep their rate in its own time,
/// with none coalesced and no burst of ticks that fell due during the pause.
#[test]
fn a_guest_paused_while_halted_loses_no_tick() {
    let mut rl = rig(vec![
        Program::sleeper(1_000).with_pit(PIT_100HZ),
        Program::compute(),
    ]);
    run_for(&mut rl, 50 * QUANTUM);
    // Pause it while it waits in HLT.
    while rl.slots[0].vcpus[0].state != RunState::Halted {
        assert!(rl.step());
    }
    rl.pause(0).unwrap();
    let paused_at = rl.cpu.trace.len();
    run_for(&mut rl, 300 * QUANTUM);
    assert!(rl.cpu.trace[paused_at..].iter().all(|e| e.guest == 1));
    rl.resume(0).unwrap();
    let resumed_at = rl.cpu.trace.len();
    run_for(&mut rl, 50 * QUANTUM);
    every_tick_on_time(&rl, 0, PIT_100HZ);
    // The first entry after the resume delivers one tick, not the 300 that would have fallen
    // due while it was paused.
    let after: Vec<&Entry> = rl.cpu.trace[resumed_at..]
        .iter()
        .filter(|e| e.guest == 0 && e.injected.is_some())
        .collect();
    assert!(after.len() <= 51, "{} ticks in 50 quanta", after.len());
    // Its halted time does not count the pause.
    let halted = rl.slots[0].vcpus[0].stats.halted_cycles;
    assert!(halted < 110 * QUANTUM, "halted {halted} cycles");
}

/// Each kind of exit the guest came back from in the same slice has its handling time counted:
/// the sum, how many, the longest.
#[test]
fn exit_handling_time_is_counted_by_reason() {
    let mut rl = rig(vec![Program::once(&[Op::Cpuid, Op::Cpuid, Op::Cpuid])]);
    for _ in 0..2 {
        assert!(rl.step());
    }
    let st = &rl.slots[0].vcpus[0].stats;
    let cpuid = ExitReason::Cpuid.number() as usize;
    assert_eq!(st.exits[cpuid], 3);
    assert_eq!(st.exits_timed[cpuid], 3);
    let avg = st.average_exit_cycles(cpuid).unwrap();
    assert!(
        avg >= KEEL_COST && avg <= st.exit_cycles_max[cpuid],
        "{avg}"
    );
}

/// The replies on the control channel so far, one per line (acknowledgements taken out).
fn replies(rl: &RunLoop<FakeCpu>) -> Vec<String> {
    let mut text = Vec::new();
    crate::credit::strip_acks(&rl.cpu.control_out, &mut text);
    String::from_utf8_lossy(&text)
        .lines()
        .map(String::from)
        .collect()
}

/// Runs the loop until `n` replies are complete (COM2 takes 16 bytes per turn of the loop).
fn until_replies(rl: &mut RunLoop<FakeCpu>, n: usize) {
    for _ in 0..10_000 {
        if rl.cpu.control_out.iter().filter(|&&b| b == b'\n').count() >= n {
            return;
        }
        assert!(rl.step());
    }
    panic!("{n} replies never came: {:?}", replies(rl));
}

fn send(rl: &mut RunLoop<FakeCpu>, line: &str) {
    rl.cpu.control_in.extend(line.bytes());
    rl.cpu.control_in.push_back(b'\n');
}

/// The control channel drives the loop: pause stops a guest (and its clock), resume brings it
/// back, kill stops it for good, start boots it again, quit stops everything; every line gets
/// one JSON reply, sent a FIFO at a time without holding up the guests.
#[test]
fn the_control_channel_operates_the_guests() {
    let mut rl = rig(vec![Program::compute(), Program::compute()]);
    run_for(&mut rl, 4 * QUANTUM);
    send(&mut rl, "pause g0");
    assert!(rl.step());
    assert_eq!(
        rl.slots[0].vcpus[0].state,
        RunState::Paused { halted: false }
    );
    let paused_at = rl.cpu.trace.len();
    run_for(&mut rl, 10 * QUANTUM);
    assert!(rl.cpu.trace[paused_at..].iter().all(|e| e.guest == 1));
    send(&mut rl, "list");
    until_replies(&mut rl, 2);
    let r = replies(&rl);
    assert_eq!(r[0], "{\"ok\":true,\"guest\":\"g0\"}");
    assert!(
        r[1].starts_with("{\"ok\":true,\"guests\":[{\"id\":0,\"name\":\"g0\",\"state\":\"paused\""),
        "{}",
        r[1]
    );
    send(&mut rl, "resume g0");
    send(&mut rl, "kill g1");
    send(&mut rl, "start g1");
    send(&mut rl, "start g0");
    until_replies(&mut rl, 6);
    let r = replies(&rl);
    assert_eq!(
        r[2..4],
        [
            "{\"ok\":true,\"guest\":\"g0\"}",
            "{\"ok\":true,\"guest\":\"g1\"}"
        ]
    );
    assert_eq!(r[4], "{\"ok\":true,\"guest\":\"g1\"}");
    assert_eq!(
        r[5],
        "{\"ok\":false,\"error\":\"start g0: the guest is running (restart boots it again)\"}"
    );
    assert_eq!(rl.slots[1].hw.boots, 1, "started again after the kill");
    assert_eq!(rl.slots[1].vcpus[0].state, RunState::Runnable);
    assert!(!rl.quit_requested());
    send(&mut rl, "quit");
    while rl.step() {}
    rl.flush_control();
    assert_eq!(replies(&rl)[6], "{\"ok\":true,\"quit\":true}");
    assert!(rl.quit_requested());
    assert!(!rl.any_failed(), "quit and kill are no failures");
    assert!(rl
        .slots
        .iter()
        .all(|s| s.vcpus[0].state == RunState::Stopped(StopReason::Operator("quit"))));
}

/// Keel's first byte on the control channel says it listens (`credit::HELLO`): the sender holds
/// its lines until then, since what came before is lost. It comes once, before any other byte,
/// with no line asked for.
#[test]
fn the_control_channel_says_hello_first_and_once() {
    let mut rl = rig(vec![Program::compute()]);
    assert!(rl.step());
    assert_eq!(rl.cpu.control_out, [crate::credit::HELLO]);
    send(&mut rl, "list");
    until_replies(&mut rl, 1);
    let hellos = rl.cpu.control_out.iter();
    assert_eq!(hellos.filter(|&&b| b == crate::credit::HELLO).count(), 1);
}

/// Every byte Keel takes from COM2 is acknowledged (`credit`), and the acknowledgement goes out
/// ahead of a long reply still being sent, so the sender's window opens again at once.
#[test]
fn the_control_channel_acknowledges_what_it_read_ahead_of_replies() {
    let mut rl = rig(vec![Program::compute()]);
    run_for(&mut rl, 2 * QUANTUM);
    send(&mut rl, "help");
    assert!(rl.step());
    let acked = |rl: &RunLoop<FakeCpu>| -> usize {
        rl.cpu
            .control_out
            .iter()
            .filter_map(|&b| crate::credit::acknowledged(b))
            .sum()
    };
    assert_eq!(acked(&rl), 5, "help and its newline");
    assert!(
        rl.cpu.control_out[1..2]
            .iter()
            .all(|&b| crate::credit::acknowledged(b).is_some()),
        "the acknowledgement comes first after the hello: {:?}",
        rl.cpu.control_out
    );
    // The help text is many FIFOs long; a line sent meanwhile is acknowledged before its end.
    send(&mut rl, "list g0 and a line of twenty-odd bytes");
    assert!(rl.step());
    let help_end = rl.cpu.control_out.iter().position(|&b| b == b'\n');
    let before_end = &rl.cpu.control_out[..help_end.unwrap_or(rl.cpu.control_out.len())];
    let acked_before_end: usize = before_end
        .iter()
        .filter_map(|&b| crate::credit::acknowledged(b))
        .sum();
    assert_eq!(acked_before_end, 5 + 39, "{help_end:?}");
    until_replies(&mut rl, 2);
    let r = replies(&rl);
    assert!(r[0].starts_with("{\"ok\":true"), "{}", r[0]);
    assert!(r[1].starts_with("{\"ok\":false"), "{}", r[1]);
    assert_eq!(acked(&rl), 5 + 39, "each byte acknowledged once");
}

/// Ctrl-A c opens the prompt; a line typed there runs (the guests keep running meanwhile), other
/// bytes no longer reach the guest, and `exit` gives the keyboard back.
#[test]
fn the_console_prompt_runs_commands_and_leaves_the_guests_running() {
    let mut rl = rig(vec![
        Program::sleeper(100).with_pit(PIT_100HZ),
        Program::compute(),
    ]);
    run_for(&mut rl, 2 * QUANTUM);
    rl.cpu.keys.extend(b"\x01cpause g1\r");
    let before = rl.cpu.trace.len();
    run_for(&mut rl, 10 * QUANTUM);
    assert!(matches!(
        rl.slots[1].vcpus[0].state,
        RunState::Paused { .. }
    ));
    assert!(
        rl.cpu.trace[before..].iter().any(|e| e.guest == 0),
        "g0 ran"
    );
    assert_eq!(
        rl.focus.pending(),
        0,
        "the typed line did not go to the guest"
    );
    rl.cpu.keys.extend(b"resume 1\rexit\rx");
    run_for(&mut rl, 2 * QUANTUM);
    assert_ne!(
        rl.slots[1].vcpus[0].state,
        RunState::Paused { halted: false }
    );
    assert!(!rl.ops.prompt.is_open());
    // After `exit`, bytes go to the focused guest again (g0 took the `x`: its FIFO had room).
    assert_eq!(rl.focus.dropped, 0);
    // `console g1` moves the keyboard and closes the prompt.
    // (Keys are handled at a pick's housekeeping: the next one, or the one after when the
    // next runs a woken sleeper first.)
    rl.cpu.keys.extend(b"\x01cconsole g1\r");
    step_until(&mut rl, |rl| {
        rl.ops.keys.is_empty() && rl.cpu.keys.is_empty()
    });
    assert_eq!(rl.focus.current(), 1);
    assert!(!rl.ops.prompt.is_open());
    // `top` shows the list every second until a key.
    rl.cpu.keys.extend(b"\x01ctop\r");
    step_until(&mut rl, |rl| {
        rl.ops.keys.is_empty() && rl.cpu.keys.is_empty()
    });
    assert!(rl.ops.top.is_some());
    rl.cpu.keys.push_back(b'q');
    step_until(&mut rl, |rl| {
        rl.ops.keys.is_empty() && rl.cpu.keys.is_empty()
    });
    assert!(rl.ops.top.is_none());
    assert_eq!(rl.focus.pending(), 0, "the key that ended top went nowhere");
}

/// A guest that failed (here: a triple fault, no restarts) makes `quit` end without success.
#[test]
fn quit_after_a_failure_is_no_success() {
    let mut rl = rig(vec![Program::once(&[Op::TripleFault]), Program::compute()]);
    run_for(&mut rl, 3 * QUANTUM);
    send(&mut rl, "quit");
    while rl.step() {}
    assert!(rl.quit_requested());
    assert!(rl.any_failed());
}

/// A guest paused before it ever ran starts with its clock where the pause found it.
#[test]
fn a_guest_paused_before_its_first_slice_starts_near_zero() {
    let mut rl = rig(vec![Program::compute(), Program::compute()]);
    rl.pause(0).unwrap();
    run_for(&mut rl, 20 * QUANTUM);
    rl.resume(0).unwrap();
    while rl.cpu.entries(0).next().is_none() {
        assert!(rl.step());
    }
    let first = rl.cpu.entries(0).next().unwrap().guest_start;
    assert!(
        first < 100 * KEEL_COST,
        "its clock read {first} at its first entry"
    );
}

// ----- Guests with several vCPUs -----

/// IA32_APIC_BASE, the x2APIC's SVR, EOI and ICR MSRs (SDM 11.12.1.2).
const APIC_BASE: u32 = 0x1b;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_ICR: u32 = 0x830;

/// A vCPU turning its APIC on in x2APIC mode, software enabled (SVR bit 8).
fn x2apic_on() -> [Op; 2] {
    [
        Op::Wrmsr(APIC_BASE, 0xfee0_0000 | 1 << 11 | 1 << 10),
        Op::Wrmsr(X2APIC_SVR, 0x1ff),
    ]
}

/// The x2APIC's LVT timer register (SDM Vol. 3A Table 11-6).
const X2APIC_LVT_TIMER: u32 = 0x832;

/// A guest in x2APIC mode whose LAPIC timer is in TSC-deadline mode (vector 0x40) and that then
/// runs `ops`; its handler ends each interrupt with an x2APIC EOI.
fn deadline_guest(ops: &[Op]) -> Program {
    let mut main = x2apic_on().to_vec();
    main.extend([Op::Wrmsr(X2APIC_LVT_TIMER, 2 << 17 | 0x40), Op::Sti]);
    main.extend_from_slice(ops);
    Program {
        main,
        repeat_from: None,
        handler: vec![Op::Run(100), Op::Wrmsr(X2APIC_EOI, 0)],
        rflags: 0x202,
    }
}

/// Guest 0's WRMSR exits (not the handler's EOI: the exit of the entry that injected) and the
/// entries that injected its timer's vector 0x40.
fn deadline_writes_and_ticks(rl: &RunLoop<FakeCpu>) -> (Vec<Entry>, Vec<Entry>) {
    let entries = || rl.cpu.entries(0).copied();
    let writes = entries()
        .filter(|e| e.exit == ExitReason::Wrmsr && e.injected.is_none())
        .collect();
    let ticks = entries().filter(|e| e.injected == Some(0x40)).collect();
    (writes, ticks)
}

/// A guest that keeps moving its TSC deadline ahead before it falls due, as Linux's tick does
/// (the tight loop makes those writes, `exits::fast::handle_deadline`), gets no interrupt from
/// the deadlines it moved, and one at the deadline it let stand, within the minimum gap, also
/// when it moved it nearer; a deadline written in the past fires at once.
#[test]
fn a_moved_tsc_deadline_fires_at_its_new_time_only() {
    let mut main = Vec::new();
    for _ in 0..50 {
        main.extend([Op::Deadline(4_000), Op::Run(3_000)]);
    }
    // A deadline far ahead, then moved nearer: the loop must come back for the nearer one.
    main.extend([Op::Deadline(40_000), Op::Run(1_000), Op::Deadline(2_500)]);
    main.extend([Op::Run(10_000), Op::Deadline(-5), Op::Run(u64::MAX)]);
    let mut rl = rig(vec![deadline_guest(&main), Program::compute()]);
    run_for(&mut rl, 8 * QUANTUM);
    let (writes, ticks) = deadline_writes_and_ticks(&rl);
    // The APIC base, the SVR, the LVT, then each deadline.
    assert_eq!(writes.len(), 3 + 50 + 3, "every deadline written");
    assert_eq!(ticks.len(), 2, "{ticks:?}");
    // The deadline left standing: 2,500 after the guest's TSC at its WRMSR (its exit's end
    // less the instruction's cycle).
    let due = writes[writes.len() - 2].guest_end() - 1 + 2_500;
    let late = ticks[0].guest_start as i64 - due as i64;
    assert!(
        (0..=(MIN_GAP + 10 * KEEL_COST) as i64).contains(&late),
        "{late} cycles late"
    );
    // The one in the past: at the entry after its WRMSR.
    let past = writes[writes.len() - 1];
    let next = rl
        .cpu
        .entries(0)
        .find(|e| e.start > past.end)
        .copied()
        .expect("an entry after the last write");
    assert_eq!(next.injected, Some(0x40));
}

/// A TSC deadline that falls due right after the guest's slice starts (its clock stopped just
/// short of it at the last slice's end) fires then, not a minimum gap late: the minimum gap
/// keeps a guest's own fast timer from livelocking it in back-to-back exits, which the first
/// entry of a slice, one per slice, cannot. Deadlines of many lengths next to another guest's
/// slices, so that some fall due at every point of a slice, its first cycles among them.
#[test]
fn a_deadline_due_as_the_slice_starts_fires_on_time() {
    let mut main = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut delays = Vec::new();
    for _ in 0..400 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let d = 2_000 + x % 40_000;
        delays.push(d);
        main.extend([Op::Deadline(d as i64), Op::Run(d + 3_000)]);
    }
    main.push(Op::Run(u64::MAX));
    let mut rl = rig(vec![deadline_guest(&main), Program::compute()]);
    run_for(&mut rl, 600 * QUANTUM);
    let (writes, ticks) = deadline_writes_and_ticks(&rl);
    assert_eq!(ticks.len(), delays.len(), "a tick for every deadline");
    let mut worst = 0;
    // After the APIC base, the SVR and the LVT, each deadline.
    for ((w, d), t) in writes.iter().skip(3).zip(&delays).zip(&ticks) {
        let due = w.guest_end() - 1 + d;
        let late = t.guest_start as i64 - due as i64;
        assert!(late >= 0, "{late}: early");
        worst = worst.max(late);
    }
    assert!(
        worst <= (MIN_GAP / 4) as i64,
        "a tick {worst} cycles late (minimum gap {MIN_GAP})"
    );
}

/// An x2APIC ICR command to APIC `dest`: delivery mode `mode` (5 INIT, 6 STARTUP, 0 fixed),
/// level asserted.
fn ipi(dest: u32, mode: u64, vector: u8) -> Op {
    Op::Wrmsr(
        X2APIC_ICR,
        u64::from(dest) << 32 | 1 << 14 | mode << 8 | u64::from(vector),
    )
}

/// The bootstrap processor of an SMP guest: its APIC on, INIT and SIPI (vector 0x9a) to each of
/// `aps`, then `then`.
fn starter(aps: u32, then: &[Op]) -> Program {
    let mut main = x2apic_on().to_vec();
    for ap in 1..=aps {
        main.push(ipi(ap, 5, 0));
        main.push(ipi(ap, 6, 0x9a));
    }
    main.extend_from_slice(then);
    Program {
        main,
        repeat_from: None,
        handler: vec![Op::Run(100), Op::Wrmsr(X2APIC_EOI, 0)],
        rflags: 0x202,
    }
}

/// An application processor that turns its APIC on, then halts between interrupts, each
/// handled in 100 cycles and an x2APIC EOI.
fn ap_sleeper() -> Program {
    let mut main = x2apic_on().to_vec();
    main.push(Op::Sti);
    main.push(Op::Hlt);
    Program {
        main,
        repeat_from: Some(3),
        handler: vec![Op::Run(100), Op::Wrmsr(X2APIC_EOI, 0)],
        rflags: 0x202,
    }
}

/// The exit of guest 0's BSP for its fifth WRMSR: after [`starter`]`(1, ..)`'s four (APIC base,
/// SVR, INIT, SIPI), the first of its own.
fn fifth_wrmsr_of_the_bsp(rl: &RunLoop<FakeCpu>) -> Entry {
    rl.cpu
        .vcpu_entries(0, 0)
        .filter(|e| e.exit == ExitReason::Wrmsr)
        .nth(4)
        .copied()
        .expect("the BSP wrote its fifth MSR")
}

/// The BSP's WRMSR that sent vector 0x40 to AP 1 and the AP's entry that took it, which must
/// follow within 20 of Keel's steps.
fn ipi_0x40_taken_at_once(rl: &RunLoop<FakeCpu>) -> (Entry, Entry) {
    let sent = fifth_wrmsr_of_the_bsp(rl);
    (sent, taken_at_once(rl, sent, 0x40))
}

/// AP 1's entry that took `vector`, which must follow the BSP's exit `sent` (that sent or
/// raised it) within 20 of Keel's steps.
fn taken_at_once(rl: &RunLoop<FakeCpu>, sent: Entry, vector: u8) -> Entry {
    let got = rl
        .cpu
        .vcpu_entries(0, 1)
        .find(|e| e.injected == Some(vector))
        .copied()
        .unwrap_or_else(|| panic!("AP 1 never took vector {vector:#x}"));
    assert!(
        got.start > sent.end && got.start - sent.end < 20 * KEEL_COST,
        "vector {vector:#x} reached AP 1 {} cycles after it was sent (kicks {:?})",
        got.start.wrapping_sub(sent.end),
        rl.cpu.kicks
    );
    got
}

fn smp_rig(guests: Vec<Vec<Program>>) -> RunLoop<FakeCpu> {
    let cpu = FakeCpu::new();
    let slots = guests
        .into_iter()
        .enumerate()
        .map(|(i, p)| cpu.smp_guest(i, p, 0))
        .collect();
    RunLoop::new(cpu, config(), slots)
}

#[test]
fn application_processors_wait_for_sipi_and_start_in_real_mode_at_its_vector() {
    use crate::vmx::{GuestNat, Segment};
    // The BSP computes for a while before it starts its APs: until then they must not run.
    let mut rl = smp_rig(vec![vec![
        starter(0, &[Op::Run(3 * QUANTUM)]),
        Program::compute(),
        Program::compute(),
    ]]);
    run_for(&mut rl, 2 * QUANTUM);
    assert_eq!(
        rl.cpu.vcpu_entries(0, 1).count(),
        0,
        "AP 1 ran without a SIPI"
    );
    assert_eq!(rl.slots[0].vcpus[1].state, RunState::WaitForSipi);

    // Now one that starts AP 1 only: AP 2 keeps waiting.
    let mut rl = smp_rig(vec![vec![
        starter(1, &[Op::Run(u64::MAX)]),
        Program::compute(),
        Program::compute(),
    ]]);
    run_for(&mut rl, 4 * QUANTUM);
    let first = rl.cpu.vcpu_entries(0, 1).next().expect("AP 1 never ran");
    let sipi = rl.cpu.vcpu_entries(0, 0).nth(3).unwrap();
    assert_eq!(sipi.exit, ExitReason::Wrmsr);
    assert!(
        first.start - sipi.end < 20 * KEEL_COST,
        "AP 1 started {} cycles after the SIPI",
        first.start - sipi.end
    );
    assert_eq!(rl.cpu.vcpu_entries(0, 2).count(), 0, "AP 2 had no SIPI");
    assert_eq!(rl.slots[0].vcpus[2].state, RunState::WaitForSipi);
    let vmcs = &rl.slots[0].hw.cores[1].vmcs;
    assert_eq!(vmcs.read(Segment::Cs.selector()), 0x9a00);
    assert_eq!(vmcs.read(Segment::Cs.base()), 0x9a000);
    // Both running vCPUs share the CPU evenly from then on.
    let a = rl.slots[0].vcpus[0].stats.cpu_cycles;
    let b = rl.slots[0].vcpus[1].stats.cpu_cycles;
    assert!(b > QUANTUM, "AP 1 ran {b} cycles, the BSP {a}");
    assert_eq!(
        vmcs.read(GuestNat::Rflags) & 1 << 9,
        0,
        "IF clear after INIT-SIPI"
    );
}

#[test]
fn a_fixed_ipi_wakes_a_halted_vcpu_without_waiting_for_the_senders_slice() {
    // The BSP starts AP 1, computes 2 quanta, sends vector 0x40 to APIC 1, and computes on.
    let mut rl = smp_rig(vec![
        vec![
            starter(
                1,
                &[Op::Run(2 * QUANTUM), ipi(1, 0, 0x40), Op::Run(u64::MAX)],
            ),
            ap_sleeper(),
        ],
        vec![Program::compute()],
    ]);
    run_for(&mut rl, 8 * QUANTUM);
    let (_, got) = ipi_0x40_taken_at_once(&rl);
    // Once AP 1 has handled it and halted again, the sender gets the CPU back, for the rest of
    // its slice, before guest 1's turn.
    let back = rl
        .cpu
        .trace
        .iter()
        .find(|e| e.start > got.end && (e.guest, e.vcpu) != (0, 1))
        .unwrap();
    assert_eq!((back.guest, back.vcpu), (0, 0));
}

#[test]
fn a_vcpu_halted_with_interrupts_off_stays_halted_when_an_interrupt_comes() {
    // AP 1 parks as an OS parks a processor: HLT with RFLAGS.IF = 0 (an AP starts with IF
    // clear). The BSP then sends it a fixed IPI and computes on. HLT with IF = 0 is left only
    // by an NMI, SMI or INIT (SDM Vol. 3A 9.1.1, Vol. 2A HLT): AP 1 must not run again, and
    // must not take the CPU from the others.
    let parked = Program {
        main: [&x2apic_on()[..], &[Op::Hlt]].concat(),
        repeat_from: Some(2),
        handler: vec![Op::Run(100), Op::Wrmsr(X2APIC_EOI, 0)],
        rflags: 0x2,
    };
    let mut rl = smp_rig(vec![
        vec![
            starter(
                1,
                &[Op::Run(2 * QUANTUM), ipi(1, 0, 0x40), Op::Run(u64::MAX)],
            ),
            parked,
        ],
        vec![Program::compute()],
    ]);
    run_for(&mut rl, 60 * QUANTUM);
    let sent = fifth_wrmsr_of_the_bsp(&rl);
    let after = rl
        .cpu
        .vcpu_entries(0, 1)
        .filter(|e| e.start > sent.end)
        .count();
    assert_eq!(after, 0, "AP 1 was entered {after} times after the IPI");
    assert_eq!(rl.slots[0].vcpus[1].state, RunState::Halted);
    let bsp = rl.slots[0].vcpus[0].stats.cpu_cycles;
    let other = rl.slots[1].vcpus[0].stats.cpu_cycles;
    let off = bsp.abs_diff(other) as f64 / other as f64;
    assert!(off < 0.05, "BSP ran {bsp} cycles, guest 1 {other}");
}

/// Checks that vCPUs (0, 0), (0, 1) and (1, 0) had the same guest time, within 2%; returns
/// the mean.
fn three_equal_shares(rl: &RunLoop<FakeCpu>) -> u64 {
    let shares: Vec<u64> = [(0, 0), (0, 1), (1, 0)]
        .iter()
        .map(|&(g, c)| rl.slots[g].vcpus[c].stats.cpu_cycles)
        .collect();
    let mean = shares.iter().sum::<u64>() / 3;
    for s in &shares {
        let off = s.abs_diff(mean) as f64 / mean as f64;
        assert!(
            off < 0.02,
            "shares {shares:?}: one is {:.1}% off",
            off * 100.0
        );
    }
    mean
}

#[test]
fn every_vcpu_of_every_guest_gets_an_equal_share() {
    // Guest 0 with two computing vCPUs, guest 1 with one: three equal shares.
    let mut rl = smp_rig(vec![
        vec![starter(1, &[Op::Run(u64::MAX)]), Program::compute()],
        vec![Program::compute()],
    ]);
    run_for(&mut rl, 300 * QUANTUM);
    three_equal_shares(&rl);
}

#[test]
fn init_sends_a_running_ap_back_to_wait_for_sipi() {
    // The BSP starts AP 1, lets it compute for 3 of its own quanta, then sends it INIT.
    let mut rl = smp_rig(vec![vec![
        starter(1, &[Op::Run(3 * QUANTUM), ipi(1, 5, 0), Op::Run(u64::MAX)]),
        Program::compute(),
    ]]);
    run_for(&mut rl, 12 * QUANTUM);
    assert_eq!(rl.slots[0].vcpus[1].state, RunState::WaitForSipi);
    let init = fifth_wrmsr_of_the_bsp(&rl);
    assert!(
        rl.cpu.vcpu_entries(0, 1).any(|e| e.end < init.start),
        "AP 1 ran before"
    );
    assert!(
        rl.cpu.vcpu_entries(0, 1).all(|e| e.start < init.end),
        "AP 1 ran after its INIT"
    );
    // The BSP alone has the CPU now.
    assert!(rl.slots[0].vcpus[0].state.is_live());
}

#[test]
fn a_triple_fault_on_one_vcpu_stops_the_whole_guest_and_only_it() {
    let mut rl = smp_rig(vec![
        vec![
            starter(1, &[Op::Run(u64::MAX)]),
            Program::once(&[Op::Run(50_000), Op::TripleFault]),
        ],
        vec![Program::compute()],
    ]);
    run_for(&mut rl, 10 * QUANTUM);
    for v in &rl.slots[0].vcpus {
        assert_eq!(v.state, RunState::Stopped(StopReason::TripleFault));
    }
    assert_eq!(rl.slots[1].vcpus[0].state, RunState::Runnable);
    let stopped = rl.cpu.trace.iter().rposition(|e| e.guest == 0).unwrap();
    assert!(rl.cpu.trace[stopped + 1..].iter().all(|e| e.guest == 1));
}

// ----- Weights and caps -----

/// CPU-bound guests with the given shares, run for `quanta` quanta: each one's share of the
/// CPU in percent.
fn cpu_shares(shares: &[crate::sched::Share], quanta: u64) -> Vec<f64> {
    let cpu = FakeCpu::new();
    let slots = shares
        .iter()
        .enumerate()
        .map(|(i, &sh)| cpu.guest(i, Program::compute(), 0).with_share(sh))
        .collect();
    let mut rl = RunLoop::new(cpu, config(), slots);
    let start = rl.cpu.clock;
    run_for(&mut rl, quanta * QUANTUM);
    let total = (rl.cpu.clock - start) as f64;
    rl.slots
        .iter()
        .map(|s| s.vcpus[0].stats.cpu_cycles as f64 * 100.0 / total)
        .collect()
}

fn share(weight: u32, cap_percent: Option<u32>) -> crate::sched::Share {
    crate::sched::Share {
        weight,
        cap_percent,
    }
}

/// Weights 1:2:1 give the CPU-bound guests 25/50/25% of it (Keel's own time taken off evenly):
/// within 2% of their shares.
#[test]
fn weights_divide_the_cpu_in_proportion() {
    let got = cpu_shares(&[share(1, None), share(2, None), share(1, None)], 400);
    let busy: f64 = got.iter().sum();
    for (g, w) in got.iter().zip([1.0, 2.0, 1.0]) {
        let want = busy * w / 4.0;
        assert!((g - want).abs() / want < 0.02, "{got:?}");
    }
}

/// A guest capped at 25% gets 25% even when the CPU would idle, and next to uncapped guests the
/// rest is theirs.
#[test]
fn a_cap_holds_alone_and_next_to_others() {
    let got = cpu_shares(&[share(1, Some(25))], 400);
    assert!((got[0] - 25.0).abs() < 0.5, "{got:?}");
    let got = cpu_shares(&[share(1, Some(10)), share(1, None), share(1, None)], 400);
    assert!((got[0] - 10.0).abs() < 0.5, "{got:?}");
    assert!((got[1] - got[2]).abs() / got[1] < 0.02, "{got:?}");
    assert!(got[1] > 40.0, "{got:?}");
}

/// `weight` and `cap` over the control channel change the shares of running guests: measured
/// over a window after the change, within 2% of the new shares.
#[test]
fn weights_and_caps_change_at_run_time() {
    let mut rl = rig(vec![
        Program::compute(),
        Program::compute(),
        Program::compute(),
    ]);
    run_for(&mut rl, 30 * QUANTUM);
    let window = |rl: &mut RunLoop<FakeCpu>| {
        let before: Vec<u64> = (0..3).map(|i| cpu_cycles(rl, i)).collect();
        let start = rl.cpu.clock;
        run_for(rl, 400 * QUANTUM);
        let total = (rl.cpu.clock - start) as f64;
        (0..3)
            .map(|i| (cpu_cycles(rl, i) - before[i]) as f64 * 100.0 / total)
            .collect::<Vec<f64>>()
    };
    send(&mut rl, "weight g1 3");
    until_replies(&mut rl, 1);
    assert_eq!(
        replies(&rl)[0],
        "{\"ok\":true,\"guest\":\"g1\",\"weight\":3}"
    );
    let got = window(&mut rl);
    let busy: f64 = got.iter().sum();
    for (g, w) in got.iter().zip([1.0, 3.0, 1.0]) {
        let want = busy * w / 5.0;
        assert!((g - want).abs() / want < 0.02, "weights 1:3:1: {got:?}");
    }
    send(&mut rl, "cap g2 10%");
    until_replies(&mut rl, 2);
    // For 100 ms after a control-channel byte Keel reads COM2 every millisecond, and a capped
    // guest runs over its cap by about 2% of that time meanwhile; the window starts after it.
    run_for(&mut rl, 10 * QUANTUM);
    let got = window(&mut rl);
    assert!((got[2] - 10.0).abs() / 10.0 < 0.02, "cap 10%: {got:?}");
    assert!((got[1] / got[0] - 3.0).abs() / 3.0 < 0.02, "{got:?}");
    send(&mut rl, "cap g2 off");
    send(&mut rl, "weight g1 1");
    until_replies(&mut rl, 4);
    let got = window(&mut rl);
    let busy: f64 = got.iter().sum();
    for g in &got {
        assert!(
            (g - busy / 3.0).abs() / (busy / 3.0) < 0.02,
            "equal again: {got:?}"
        );
    }
}

// ----- The load policy -----

/// An on-demand sleeper waits paused while a CPU-bound guest keeps the load at 100%; paused, the
/// hog leaves the CPU idle and the policy starts the sleeper; resumed, it brings the load over
/// the threshold and the policy pauses the sleeper again. One decision per window.
#[test]
fn the_load_policy_starts_and_pauses_on_demand_guests() {
    use crate::policy::{Action, Policy, PolicyConfig};
    let cfg = PolicyConfig {
        start_below: 30,
        stop_above: 80,
        window_ms: 200,
        action: Action::Pause,
    };
    let policy = Policy::new(cfg, TSC_HZ, [1]);
    let mut rl = rig(vec![
        Program::compute(),
        Program::sleeper(200).with_pit(PIT_100HZ),
    ])
    .with_policy(policy);
    let window = TSC_HZ / 5;
    let state = |rl: &RunLoop<FakeCpu>| rl.slots[1].vcpus[0].state.clone();
    assert_eq!(state(&rl), RunState::Paused { halted: false });
    run_for(&mut rl, 5 * window);
    assert_eq!(
        state(&rl),
        RunState::Paused { halted: false },
        "the load is 100%"
    );
    assert_eq!(
        rl.cpu.entries(1).count(),
        0,
        "held before its first instruction"
    );
    rl.pause(0).unwrap();
    run_for(&mut rl, 2 * window + QUANTUM);
    assert!(
        matches!(state(&rl), RunState::Halted | RunState::Runnable),
        "started once the CPU idled: {:?}",
        state(&rl)
    );
    assert!(rl.cpu.entries(1).count() > 0);
    rl.resume(0).unwrap();
    run_for(&mut rl, 2 * window + QUANTUM);
    assert!(
        matches!(state(&rl), RunState::Paused { .. }),
        "paused at 100% load: {:?}",
        state(&rl)
    );
    // Nothing more to pause; the hog goes on alone.
    run_for(&mut rl, 5 * window);
    assert!(matches!(state(&rl), RunState::Paused { .. }));
}

/// The load is of the whole machine: one CPU-bound guest on two host CPUs is 50%, under a
/// `start_below` of 60%, and the on-demand guest starts.
#[test]
fn the_load_policy_measures_the_load_of_every_host_cpu() {
    use crate::policy::{Action, Policy, PolicyConfig};
    let cfg = PolicyConfig {
        start_below: 60,
        stop_above: 90,
        window_ms: 200,
        action: Action::Pause,
    };
    let mut rl = rig(vec![
        Program::compute(),
        Program::sleeper(200).with_pit(PIT_100HZ),
    ])
    .with_policy(Policy::new(cfg, TSC_HZ, [1]));
    let mut hosts = Hosts::new(&mut rl, 2);
    let state = |rl: &RunLoop<FakeCpu>| rl.slots[1].vcpus[0].state.clone();
    assert_eq!(state(&rl), RunState::Paused { halted: false });
    hosts.run_for(&mut rl, TSC_HZ);
    assert!(
        matches!(state(&rl), RunState::Halted | RunState::Runnable),
        "not started at half the machine's load: {:?}",
        state(&rl)
    );
}

/// With `action = stop` the guest is stopped (no failure) and booted afresh when the load falls.
#[test]
fn the_stop_action_stops_and_reboots() {
    use crate::policy::{Action, Policy, PolicyConfig};
    let cfg = PolicyConfig {
        start_below: 30,
        stop_above: 80,
        window_ms: 200,
        action: Action::Stop,
    };
    let mut rl = rig(vec![Program::compute(), Program::compute()]).with_policy(Policy::new(
        cfg,
        TSC_HZ,
        [1],
    ));
    let window = TSC_HZ / 5;
    rl.pause(0).unwrap();
    run_for(&mut rl, window + QUANTUM);
    assert_eq!(rl.slots[1].vcpus[0].state, RunState::Runnable);
    // The on-demand guest is CPU-bound itself: it brings the load over 80% and is stopped.
    run_for(&mut rl, window);
    assert_eq!(
        rl.slots[1].vcpus[0].state,
        RunState::Stopped(StopReason::Operator("policy"))
    );
    assert_eq!(
        rl.slots[1].hw.released, 1,
        "its memory went back to the pool"
    );
    assert!(!rl.any_failed());
    run_for(&mut rl, window);
    assert_eq!(rl.slots[1].vcpus[0].state, RunState::Runnable);
    assert_eq!(rl.slots[1].hw.boots, 1, "booted afresh");
}

/// A BALLOON_GIVE that passes its checks is carried out by the CPU after the exit, its status in
/// the caller's RAX; one that fails them never gets there. A killed guest's memory, and one that
/// ends, goes back to the pool.
#[test]
fn balloon_calls_reach_the_cpu_and_stopped_guests_give_their_memory_back() {
    use crate::abi::{hc, status};
    use crate::balloon::{Op as BOp, Request};
    let mut cpu = FakeCpu::new();
    cpu.balloon_status = status::ENOMEM;
    let give = |gpa, pages| Op::Balloon(hc::BALLOON_GIVE, gpa, pages);
    let slots = vec![
        cpu.guest(
            0,
            Program::once(&[Op::Run(1000), give(0x10000, 4), Op::Run(1000)]),
            0,
        ),
        cpu.guest(
            1,
            Program::once(&[Op::Run(1000), give(0x10001, 1), Op::Run(1000)]),
            0,
        ),
        cpu.guest(2, Program::once(&[Op::Run(1000), Op::Out(0xf4, 1)]), 0),
    ];
    let mut rl = RunLoop::new(cpu, config(), slots);
    run_for(&mut rl, 5 * QUANTUM);
    let rax = |rl: &RunLoop<FakeCpu>, i: usize| rl.slots[i].vcpus[0].regs.rax;
    assert_eq!(
        rl.slots[0].hw.balloon_calls,
        [Request {
            op: BOp::Give,
            gpa: 0x10000,
            pages: 4
        }]
    );
    assert_eq!(rax(&rl, 0) as u32, status::ENOMEM as u32);
    assert!(rl.slots[1].hw.balloon_calls.is_empty());
    assert_eq!(rax(&rl, 1) as u32, status::EINVAL as u32);
    assert_eq!(rl.slots[0].vcpus[0].state, RunState::Runnable, "it goes on");
    // Guest 2 ended by itself, guest 1 is killed: both gave their memory back, once.
    assert_eq!(rl.slots[2].hw.released, 1);
    assert_eq!(rl.slots[1].hw.released, 0);
    rl.kill(1).unwrap();
    assert_eq!(rl.slots[1].hw.released, 1);
    assert_eq!(rl.slots[0].hw.released, 0);
}

/// `start` of a guest that waits for it (autostart = off) and cannot have its memory yet leaves
/// it waiting, not failed; once memory is there, it starts.
#[test]
fn a_start_without_memory_leaves_the_guest_waiting() {
    use crate::monitor::{Control, MonitorTarget};
    let cpu = FakeCpu::new();
    let mut waiting = cpu.guest(1, Program::compute(), 0);
    for v in &mut waiting.vcpus {
        v.state = RunState::Stopped(StopReason::NotStarted);
    }
    let slots = vec![cpu.guest(0, Program::compute(), 0), waiting];
    let mut rl = RunLoop::new(cpu, config(), slots);
    run_for(&mut rl, 2 * QUANTUM);
    rl.cpu.boot_error = Some("not enough memory: need 16 MiB, free 7 MiB".into());
    assert_eq!(
        rl.control(1, Control::Start),
        Err("not enough memory: need 16 MiB, free 7 MiB".into())
    );
    assert_eq!(
        rl.slots[1].vcpus[0].state,
        RunState::Stopped(StopReason::NotStarted)
    );
    assert!(!rl.any_failed());
    rl.cpu.boot_error = None;
    rl.control(1, Control::Start).unwrap();
    assert!(rl.slots[1].vcpus[0].state.is_live());
    run_for(&mut rl, 4 * QUANTUM);
    assert!(rl.cpu.entries(1).count() > 0, "it runs");
}

/// What a host CPU of [`Hosts`] does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostStep {
    /// Calls `begin`.
    Ready,
    /// Its guest ran until a VM exit at its clock: calls `finish` (after waiting for the lock).
    Exited,
    /// Its exit waited for the loop's lock until its clock: calls `finish` now.
    Locked,
    /// Sleeps until its clock reaches this, or a kick.
    Asleep(u64),
}

/// A host CPU's entry in progress: the vCPU's registers, how the entry went, when it exited.
type Away = (
    crate::guest::GuestRegs,
    Result<(), crate::vmx::VmxError>,
    u64,
);

/// Several host CPUs over the one fake: each has its own clock, and the one that is furthest
/// behind acts next (its `begin`, the guest's run to its exit, its `finish`), so their turns
/// interleave as they would in parallel. A kick wakes a sleeping CPU at the kicker's time; a
/// CPU in guest mode sees it at its vCPU's next exit.
struct Hosts {
    /// Each CPU's entry in progress: the vCPU's registers, how the entry went, when it exited.
    away: Vec<Option<Away>>,
    clocks: Vec<u64>,
    steps: Vec<HostStep>,
    kicks_seen: usize,
    /// How long each CPU waits for the loop's lock after a VM exit (another CPU holds it),
    /// while the others act.
    lock_wait: u64,
}

impl Hosts {
    fn new(rl: &mut RunLoop<FakeCpu>, n: usize) -> Self {
        let mut taken = core::mem::replace(rl, smp_rig(vec![]));
        taken = taken.with_hosts(n);
        *rl = taken;
        Self {
            away: vec![None; n],
            clocks: vec![rl.cpu.clock; n],
            steps: vec![HostStep::Ready; n],
            kicks_seen: 0,
            lock_wait: 0,
        }
    }

    /// The host CPU that acts next, and when.
    fn next(&self) -> (usize, u64) {
        (0..self.clocks.len())
            .map(|h| match self.steps[h] {
                HostStep::Asleep(until) => (h, until),
                _ => (h, self.clocks[h]),
            })
            .min_by_key(|&(_, t)| t)
            .unwrap()
    }

    /// Runs every host CPU until all their clocks have passed `until`.
    fn run_until(&mut self, rl: &mut RunLoop<FakeCpu>, until: u64) {
        loop {
            let (h, t) = self.next();
            if t >= until {
                // The entries in progress are accounted for (their `finish` comes later), so the
                // tests read every vCPU's time up to its last exit.
                // Each back at its own exit's time, with no wait for the lock.
                let clock = rl.cpu.clock;
                for k in 0..self.away.len() {
                    if let Some((regs, entered, at)) = self.away[k].take() {
                        rl.cpu.clock = at;
                        rl.reattach(k, (), regs, entered, at);
                    }
                }
                rl.cpu.clock = rl.cpu.clock.max(clock);
                return;
            }
            rl.cpu.clock = t;
            match self.steps[h] {
                HostStep::Asleep(_) | HostStep::Ready => match rl.begin(h) {
                    Turn::Enter => {
                        // As the hardware does it: the entry handed out, the guest run on this
                        // CPU's copy of its registers, and given back at the `finish` step,
                        // while the other CPUs act in between.
                        self.away[h] = rl.detach(h).map(|((), mut regs)| {
                            let (i, c) = rl.running_on(h).expect("a vCPU to enter");
                            let s = &mut rl.slots[i];
                            let mut v = rl.cpu.load(&mut s.hw, c).expect("its VMCS loads");
                            let entered = rl.cpu.enter(&mut v, &mut regs);
                            (regs, entered, rl.cpu.clock)
                        });
                        self.steps[h] = HostStep::Exited;
                    }
                    Turn::Sleep { wake, max } => {
                        let now = rl.cpu.clock;
                        self.steps[h] =
                            HostStep::Asleep(now + wake.saturating_sub(now).clamp(1, max));
                    }
                    Turn::Done => panic!("every guest stopped"),
                },
                HostStep::Exited if self.lock_wait > 0 => {
                    // Another CPU holds the lock: the others act meanwhile.
                    self.steps[h] = HostStep::Locked;
                    self.clocks[h] = t + self.lock_wait;
                    continue;
                }
                HostStep::Exited | HostStep::Locked => {
                    if let Some((regs, entered, at)) = self.away[h].take() {
                        rl.reattach(h, (), regs, entered, at);
                    }
                    rl.finish(h);
                    self.steps[h] = HostStep::Ready;
                }
            }
            self.clocks[h] = rl.cpu.clock;
            // Kicks wake sleeping CPUs at the time they were made (one made in `begin` comes
            // before the guest's run that moved the clock since).
            let kicks = rl.cpu.kicks.iter().zip(&rl.cpu.kicked_at);
            for (&k, &at) in kicks.skip(self.kicks_seen) {
                if let HostStep::Asleep(_) = self.steps[k] {
                    self.steps[k] = HostStep::Asleep(at);
                }
            }
            self.kicks_seen = rl.cpu.kicks.len();
        }
    }

    fn run_for(&mut self, rl: &mut RunLoop<FakeCpu>, cycles: u64) {
        let end = self.clocks.iter().copied().min().unwrap() + cycles;
        self.run_until(rl, end);
    }
}

/// The entries of one vCPU that overlap in time on two host CPUs, if any.
fn overlapping_entries(trace: &[Entry]) -> Option<(Entry, Entry)> {
    for (n, a) in trace.iter().enumerate() {
        for b in &trace[n + 1..] {
            if (a.guest, a.vcpu) == (b.guest, b.vcpu)
                && a.host != b.host
                && a.start < b.end
                && b.start < a.end
            {
                return Some((*a, *b));
            }
        }
    }
    None
}

/// The guest's TSC from each exit of `seat` to its next entry: the time its clock ran while
/// Keel had it out of guest mode.
fn clock_gaps(rl: &RunLoop<FakeCpu>, seat: (usize, usize)) -> Vec<u64> {
    let entries: Vec<&Entry> = rl.cpu.vcpu_entries(seat.0, seat.1).collect();
    entries
        .windows(2)
        .map(|w| w[1].guest_start.wrapping_sub(w[0].guest_end()))
        .collect()
}

/// A vCPU that exits every 1,000 cycles (CPUID), for good.
fn cpuid_loop() -> Program {
    Program {
        main: vec![Op::Run(1_000), Op::Cpuid],
        repeat_from: Some(0),
        ..Program::compute()
    }
}

#[test]
fn a_vcpu_waiting_for_the_loop_lock_does_not_see_its_clock_run() {
    // One guest with one vCPU that exits every 1,000 cycles, on two host CPUs, each exit
    // waiting 5,000 cycles (half a millisecond) for the loop's lock (another CPU's long exit holds it): the wait
    // is Keel's, like a wait for the CPU, so the guest's clock does not run through it. (It
    // did: every PIT or LAPIC timer reading two exits apart in the guest was off by the wait,
    // and the hostile x2apic guest measured its LAPIC timer 2-6% off against its PIT.)
    let mut rl = smp_rig(vec![vec![cpuid_loop()]]);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.lock_wait = 5_000;
    hosts.run_for(&mut rl, 20 * QUANTUM);
    let gaps = clock_gaps(&rl, (0, 0));
    assert!(gaps.len() > 100, "{} entries", gaps.len());
    let worst = gaps.iter().copied().max().unwrap();
    assert!(
        worst < 100 * KEEL_COST,
        "the guest's clock ran {worst} cycles from an exit to its next entry"
    );
}

/// Guest 0 with two computing vCPUs, guest 1 with one, on two host CPUs, run for `quanta`.
fn three_vcpus_on_two_host_cpus(quanta: u64) -> RunLoop<FakeCpu> {
    let mut rl = smp_rig(vec![
        vec![starter(1, &[Op::Run(u64::MAX)]), Program::compute()],
        vec![Program::compute()],
    ]);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, quanta * QUANTUM);
    rl
}

#[test]
fn two_host_cpus_share_three_vcpus_evenly_and_never_run_one_on_both() {
    let rl = three_vcpus_on_two_host_cpus(300);
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
    // Both CPUs computed all the time: each vCPU had 2/3 of one CPU.
    let mean = three_equal_shares(&rl);
    assert!(
        mean > 300 * QUANTUM * 2 / 3 * 98 / 100,
        "the CPUs idled: mean share {mean}"
    );
    // Three vCPUs cannot share two CPUs without moving: some ran on both, each move through a
    // VMCLEAR on the CPU it left (the fake refuses a VMPTRLD of a VMCS still active elsewhere)
    // and a VMLAUNCH after. (Each slice ends with a VMCLEAR where several CPUs run vCPUs.)
    let moved = [(0, 0), (0, 1), (1, 0)].iter().any(|&seat| {
        let mut on = rl
            .cpu
            .trace
            .iter()
            .filter(|e| (e.guest, e.vcpu) == seat)
            .map(|e| e.host);
        let first = on.next();
        on.any(|h| Some(h) != first)
    });
    assert!(moved, "no vCPU moved");
    assert!(rl.cpu.releases >= 200, "{} VMCLEARs", rl.cpu.releases);
}

#[test]
fn a_vcpu_back_on_a_cpu_never_uses_translations_cached_there_before_it_ran_elsewhere() {
    // Three computing vCPUs on two host CPUs: they move. A guest's INVLPG and MOV to CR3
    // invalidate its cached translations on the CPU it runs on only (SDM Vol. 3C 29.4.3.1): what
    // a CPU cached under a vCPU's VPID before the vCPU ran on the other CPU may map pages the
    // guest has since unmapped or moved (a freed kernel stack, a page-table page), so the CPU it
    // comes back to must run INVVPID first. A vCPU that stays needs none.
    let rl = three_vcpus_on_two_host_cpus(100);
    let trace = &rl.cpu.trace;
    let moves = trace
        .iter()
        .enumerate()
        .filter(|&(n, e)| {
            let before = trace[..n]
                .iter()
                .rev()
                .find(|b| (b.guest, b.vcpu) == (e.guest, e.vcpu));
            before.is_none_or(|b| b.host != e.host)
        })
        .count();
    assert!(moves > 20, "{moves} moves");
    let stale = &rl.cpu.stale_entries;
    assert!(
        stale.is_empty(),
        "{} of {} entries ran on stale translations, the first {:?}",
        stale.len(),
        trace.len(),
        stale.first()
    );
    assert_eq!(rl.cpu.vpid_flushes.len(), moves, "one INVVPID per move");
}

#[test]
fn keys_are_taken_from_com1_by_whichever_host_cpu_has_the_loop_before_its_fifo_fills() {
    // Two guests on two host CPUs: one computes through whole slices (no exit for a quantum),
    // the other exits every 1,000 cycles. A line typed on COM1 arrives at 115200 baud, and the
    // UART's 16-byte receive FIFO overflows (keys lost) unless read within 16 characters'
    // time: whichever CPU runs the loop must read it, not CPU 0 alone at its slice ends. Each
    // line comes after a quiet second (no read-every-millisecond left from the last).
    let mut rl = smp_rig(vec![vec![Program::compute()], vec![cpuid_loop()]]);
    let mut hosts = Hosts::new(&mut rl, 2);
    let fifo_time = TSC_HZ * 16 * 10 / 115_200;
    hosts.run_for(&mut rl, 3 * QUANTUM);
    let mut typed = Vec::new();
    for round in 0..4u8 {
        let line: Vec<u8> = (0..16).map(|k| b'a' + (round * 16 + k) % 26).collect();
        rl.cpu.keys.extend(line.iter().copied());
        typed.extend(line);
        hosts.run_for(&mut rl, fifo_time);
        assert!(
            rl.cpu.keys.is_empty(),
            "line {round}: {} of 16 keys still in COM1's FIFO after {fifo_time} cycles",
            rl.cpu.keys.len()
        );
        hosts.run_for(&mut rl, TSC_HZ + QUANTUM / 3);
    }
    // Every key is on its way to the focused guest (guest 0, which never reads its UART: past
    // what its FIFO took, they wait for room in Keel), in the order typed.
    assert_eq!(rl.focus.current(), 0);
    let pending = rl.focus.pending_bytes();
    assert!(
        pending.len() >= typed.len() - 16,
        "{} keys lost",
        typed.len() - 16 - pending.len()
    );
    assert!(
        typed.ends_with(&pending),
        "{pending:?} is not the end of {typed:?}"
    );
}

#[test]
fn a_vcpu_woken_by_an_ipi_while_the_other_cpu_sleeps_runs_there_at_once() {
    // The BSP starts AP 1, which halts; the BSP computes 2 quanta, sends vector 0x40 to APIC 1,
    // and computes on. Host CPU 1 sleeps once the AP halts.
    let mut rl = smp_rig(vec![vec![
        starter(
            1,
            &[Op::Run(2 * QUANTUM), ipi(1, 0, 0x40), Op::Run(u64::MAX)],
        ),
        ap_sleeper(),
    ]]);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, 6 * QUANTUM);
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
    let (sent, got) = ipi_0x40_taken_at_once(&rl);
    assert_ne!(got.host, sent.host, "the AP took the sender's CPU");
    assert!(rl.cpu.kicks.contains(&got.host), "kicks {:?}", rl.cpu.kicks);
    // The sender kept its CPU: its next entry follows its exit at once.
    let next = rl
        .cpu
        .vcpu_entries(0, 0)
        .find(|e| e.start > sent.end)
        .unwrap();
    assert_eq!(next.host, sent.host);
    assert!(next.start - sent.end < 20 * KEEL_COST);
}

/// AP 1's entry in progress on another host CPU when the BSP's exit `sent` happened.
fn ap_in_guest_mode_on_another_cpu_at(rl: &RunLoop<FakeCpu>, sent: Entry) -> Entry {
    let during = rl
        .cpu
        .vcpu_entries(0, 1)
        .find(|e| e.start < sent.end && e.end > sent.end)
        .copied()
        .expect("AP 1 was not in guest mode then");
    assert_ne!(during.host, sent.host);
    during
}

/// An application processor that turns its APIC on and interrupts, and computes.
fn ap_computer() -> Program {
    let mut main = x2apic_on().to_vec();
    main.push(Op::Sti);
    main.push(Op::Run(u64::MAX));
    Program {
        main,
        repeat_from: None,
        handler: vec![Op::Run(100), Op::Wrmsr(X2APIC_EOI, 0)],
        rflags: 0x202,
    }
}

#[test]
fn an_ipi_to_a_vcpu_running_on_another_cpu_kicks_it_and_comes_at_its_next_entry() {
    let mut rl = smp_rig(vec![vec![
        starter(
            1,
            &[Op::Run(QUANTUM / 2), ipi(1, 0, 0x41), Op::Run(u64::MAX)],
        ),
        ap_computer(),
    ]]);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, 4 * QUANTUM);
    let sent = fifth_wrmsr_of_the_bsp(&rl);
    // The AP was in guest mode on the other CPU when the IPI was sent.
    let during = ap_in_guest_mode_on_another_cpu_at(&rl, sent);
    assert!(
        rl.cpu.kicks.contains(&during.host),
        "kicks {:?}",
        rl.cpu.kicks
    );
    let next = rl
        .cpu
        .vcpu_entries(0, 1)
        .find(|e| e.start >= during.end)
        .unwrap();
    assert_eq!(next.injected, Some(0x41), "not at its next entry: {next:?}");
    // The sender was not held up.
    assert!(rl.slots[0].vcpus[0].stats.cpu_cycles > 3 * QUANTUM);
}

/// COM1's IRQ 4 routed by the IOAPIC to APIC 1 (edge, fixed, physical) as vector 0x44, and the
/// UART's interrupt output enabled (MCR.OUT2): the guest's IER write that enables the THRE
/// interrupt (THR is always empty) raises it.
fn route_com1_to_apic_1(rl: &mut RunLoop<FakeCpu>) {
    let base = crate::devices::board::IOAPIC_BASE;
    let p = &mut rl.slots[0].vm.platform;
    for (reg, value) in [(0x19, 1u64 << 24), (0x18, 0x44)] {
        p.mmio_write(0, base, 4, reg, 0);
        p.mmio_write(0, base + 0x10, 4, value, 0);
    }
}

/// The BSP's ops that raise COM1's interrupt: OUT2 on, then IER.ETBEI (the THRE interrupt).
const RAISE_IRQ4: [Op; 2] = [Op::Out(0x3fc, 0x08), Op::Out(0x3f9, 0x02)];

/// The BSP's OUT that raised IRQ 4 (its second OUT, the IER write).
fn irq4_raised(rl: &RunLoop<FakeCpu>) -> Entry {
    rl.cpu
        .vcpu_entries(0, 0)
        .filter(|e| e.exit == ExitReason::IoInstruction)
        .nth(1)
        .copied()
        .expect("the BSP wrote IER")
}

#[test]
fn a_device_interrupt_for_a_vcpu_running_on_another_cpu_kicks_it_and_comes_at_its_next_entry() {
    // As an IPI does: the IOAPIC's message (a UART's IRQ 4 that the sender's port write raised,
    // routed to the other vCPU) kicks the CPU in guest mode with the target, which takes it at its
    // next entry. (It did not: the target took it only when its slice ended, up to a quantum
    // later, or at its next exit that reached the platform.)
    let mut then = vec![Op::Run(QUANTUM / 2)];
    then.extend(RAISE_IRQ4);
    then.push(Op::Run(u64::MAX));
    let mut rl = smp_rig(vec![vec![starter(1, &then), ap_computer()]]);
    route_com1_to_apic_1(&mut rl);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, 4 * QUANTUM);
    let sent = irq4_raised(&rl);
    let during = ap_in_guest_mode_on_another_cpu_at(&rl, sent);
    // Its CPU was kicked when IRQ 4 was raised (the fake runs a guest to its next exit
    // regardless; on the hardware the kick is that exit, an external interrupt).
    let kicked = rl
        .cpu
        .kicks
        .iter()
        .zip(&rl.cpu.kicked_at)
        .any(|(&k, &at)| k == during.host && at >= sent.end && at - sent.end < 20 * KEEL_COST);
    assert!(
        kicked,
        "no kick of CPU {} when IRQ 4 was raised at {}: kicks {:?} at {:?}",
        during.host, sent.end, rl.cpu.kicks, rl.cpu.kicked_at
    );
    let next = rl
        .cpu
        .vcpu_entries(0, 1)
        .find(|e| e.start >= during.end)
        .unwrap();
    assert_eq!(next.injected, Some(0x44), "not at its next entry: {next:?}");
}

#[test]
fn a_device_interrupt_for_a_halted_vcpu_wakes_it_on_the_sleeping_cpu_at_once() {
    // The AP halts and its host CPU sleeps; the BSP raises IRQ 4, routed to the AP: the sleeping
    // CPU is kicked awake for it, as for an IPI. (It slept on until its timer, a quantum.)
    let mut then = vec![Op::Run(2 * QUANTUM)];
    then.extend(RAISE_IRQ4);
    then.push(Op::Run(u64::MAX));
    let mut rl = smp_rig(vec![vec![starter(1, &then), ap_sleeper()]]);
    route_com1_to_apic_1(&mut rl);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, 6 * QUANTUM);
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
    let sent = irq4_raised(&rl);
    let got = taken_at_once(&rl, sent, 0x44);
    assert_ne!(got.host, sent.host, "the AP took the sender's CPU");
    assert!(rl.cpu.kicks.contains(&got.host), "kicks {:?}", rl.cpu.kicks);
}

#[test]
fn a_pause_of_a_guest_running_on_another_cpu_takes_effect_at_its_next_exit() {
    let mut rl = smp_rig(vec![vec![Program::compute()], vec![Program::compute()]]);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, QUANTUM / 2);
    // Guest 0 runs on one CPU, guest 1 on the other.
    let h = (0..2).find(|&h| rl.running_on(h) == Some((0, 0))).unwrap();
    rl.pause(0).unwrap();
    assert!(rl.cpu.kicks.contains(&h), "kicks {:?}", rl.cpu.kicks);
    let paused_at = rl.cpu.clock;
    hosts.run_for(&mut rl, 4 * QUANTUM);
    // Its entry in progress ends at its next exit; none follows.
    let after: Vec<Entry> = rl
        .cpu
        .vcpu_entries(0, 0)
        .filter(|e| e.end > paused_at)
        .copied()
        .collect();
    assert!(after.len() <= 1, "guest 0 ran on: {after:?}");
    assert_eq!(
        rl.slots[0].vcpus[0].state,
        RunState::Paused { halted: false }
    );
    assert_ne!(rl.running_on(h), Some((0, 0)), "its CPU still holds it");
    // Guest 1 went on, on either CPU.
    let ran = rl.slots[1].vcpus[0].stats.cpu_cycles;
    rl.resume(0).unwrap();
    hosts.run_for(&mut rl, 4 * QUANTUM);
    assert!(rl.slots[1].vcpus[0].stats.cpu_cycles > ran);
    assert!(rl
        .cpu
        .vcpu_entries(0, 0)
        .any(|e| e.start > rl.cpu.clock - 3 * QUANTUM));
}

#[test]
fn a_pinned_guest_runs_only_on_its_cpus_and_the_others_fill_the_rest() {
    // Guest 0 pinned to CPU 1, guests 1 and 2 anywhere, on two CPUs.
    let mut rl = smp_rig(vec![vec![Program::compute()]; 3]);
    rl.slots[0] = core::mem::replace(&mut rl.slots[0], rl.cpu.guest(0, Program::compute(), 0))
        .with_pins(Some(0b10));
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, 60 * QUANTUM);
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
    assert!(
        rl.cpu.entries(0).count() > 10,
        "{:?}",
        rl.cpu
            .trace
            .iter()
            .map(|e| (e.guest, e.host, e.end - e.start))
            .take(20)
            .collect::<Vec<_>>()
    );
    assert!(
        rl.cpu.entries(0).all(|e| e.host == 1),
        "guest 0 ran on CPU 0"
    );
    // The unpinned guests took CPU 0 whenever guest 0 had CPU 1: CPU 0 never idled.
    let mut cpu0 = 0;
    for i in 1..3 {
        cpu0 += rl
            .cpu
            .entries(i)
            .filter(|e| e.host == 0)
            .map(|e| e.end - e.start)
            .sum::<u64>();
    }
    assert!(
        cpu0 > 60 * QUANTUM * 98 / 100,
        "CPU 0 ran guests {cpu0} cycles"
    );
}

#[test]
fn a_pin_to_a_cpu_that_is_not_up_falls_back_to_every_cpu() {
    assert_eq!(pins_on(None, 0b1), Ok(None));
    assert_eq!(pins_on(Some(0b11), 0b111), Ok(Some(0b11)));
    assert_eq!(pins_on(Some(0b1010), 0b0011), Err(3));
}

/// The BSP of guest 0 starts AP 1, computes `before` cycles, then does `then`; AP 1 computes.
/// Guest 1 computes. Three vCPUs on two host CPUs, so each CPU holds guest 0 at times.
fn two_cpus_with(before: u64, then: &[Op]) -> (RunLoop<FakeCpu>, Hosts) {
    let mut main = vec![Op::Run(before)];
    main.extend_from_slice(then);
    main.push(Op::Run(u64::MAX));
    let mut rl = smp_rig(vec![
        vec![starter(1, &main), ap_computer()],
        vec![Program::compute()],
    ]);
    let hosts = Hosts::new(&mut rl, 2);
    (rl, hosts)
}

#[test]
fn a_guest_stopped_by_one_vcpu_gives_its_ram_back_only_once_its_others_left_guest_mode() {
    // The fake refuses a release of RAM (or a boot, or a balloon call) while a vCPU of the guest
    // is active on another CPU, where it may be in guest mode.
    let (mut rl, mut hosts) = two_cpus_with(3 * QUANTUM / 2, &[Op::TripleFault]);
    hosts.run_for(&mut rl, 20 * QUANTUM);
    assert!(matches!(
        rl.slots[0].bsp().state,
        RunState::Stopped(StopReason::TripleFault)
    ));
    assert_eq!(rl.slots[0].hw.released, 1, "its RAM went back once");
    assert!(rl.slots[0].deferred.is_empty());
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
    // Guest 1 has both CPUs now, one at a time.
    assert_eq!(rl.slots[1].vcpus[0].state, RunState::Runnable);
}

#[test]
fn after_a_balloon_call_every_cpu_runs_invept_before_it_enters_the_guest_again() {
    use crate::abi::hc;
    let give = Op::Balloon(hc::BALLOON_GIVE, 0x10000, 4);
    let (mut rl, mut hosts) = two_cpus_with(3 * QUANTUM / 2, &[give]);
    hosts.run_for(&mut rl, 2 * QUANTUM);
    let before = rl.cpu.trace.len();
    hosts.run_for(&mut rl, 20 * QUANTUM);
    assert_eq!(rl.slots[0].hw.balloon_calls.len(), 1);
    assert_eq!(rl.slots[0].ept_gen, 1);
    // Each host CPU that entered guest 0 after the call flushed its EPT translations first.
    for h in 0..2 {
        let entered = rl.cpu.trace[before..]
            .iter()
            .any(|e| e.host == h && e.guest == 0);
        let flushed = rl.cpu.ept_flushes.contains(&(h, 0));
        assert!(
            !entered || flushed,
            "host CPU {h} entered guest 0 without INVEPT; flushes {:?}",
            rl.cpu.ept_flushes
        );
        assert!(entered, "host CPU {h} never ran guest 0 again");
    }
    // Once per CPU and change, not at every entry.
    assert!(rl.cpu.ept_flushes.len() <= 2, "{:?}", rl.cpu.ept_flushes);
}

#[test]
fn monitor_lines_wait_until_no_other_cpu_runs_a_vcpu() {
    // `regs` loads a VMCS: the fake refuses that while it is active on another CPU.
    let (mut rl, mut hosts) = two_cpus_with(u64::MAX / 4, &[]);
    hosts.run_for(&mut rl, 4 * QUANTUM);
    for line in ["regs 0", "regs 1"] {
        rl.cpu.control_in.extend(line.bytes());
        rl.cpu.control_in.push_back(b'\n');
    }
    hosts.run_for(&mut rl, 6 * QUANTUM);
    let out = String::from_utf8_lossy(&rl.cpu.control_out).into_owned();
    assert_eq!(out.matches("\"rip\"").count(), 2, "{out}");
    assert!(rl.ops.held.is_empty());
    // And the guests ran on after.
    let late = rl
        .cpu
        .trace
        .iter()
        .filter(|e| e.start > rl.cpu.clock - QUANTUM);
    assert!(late.count() > 0);
}

/// The BSP computes and sends AP 1 an IPI every half quantum; the AP sleeps between them (each
/// wake marks the guest as waiting while the BSP runs on the other CPU); guest 1 computes, so the
/// CPUs are contended; every exit waits `lock_wait` for the loop's lock. What one vCPU read of
/// the guest's TSC before another's entry, that one reads at least.
fn clock_never_runs_backwards_across_vcpus(lock_wait: u64) {
    let mut then = Vec::new();
    for _ in 0..40 {
        then.push(Op::Run(QUANTUM / 2));
        then.push(ipi(1, 0, 0x40));
    }
    let (mut rl, mut hosts) = two_cpus_with(QUANTUM / 4, &then);
    hosts.lock_wait = lock_wait;
    hosts.run_for(&mut rl, 30 * QUANTUM);
    let entries: Vec<Entry> = rl.cpu.entries(0).copied().collect();
    assert!(entries
        .iter()
        .any(|e| e.vcpu == 1 && e.injected == Some(0x40)));
    for a in &entries {
        for b in entries.iter().filter(|b| b.start >= a.end) {
            assert!(
                b.guest_start >= a.guest_end(),
                "vCPU {} entered at guest time {} after vCPU {} left at {}",
                b.vcpu,
                b.guest_start,
                a.vcpu,
                a.guest_end()
            );
        }
    }
}

#[test]
fn a_guests_clock_never_runs_backwards_across_its_vcpus_on_several_cpus() {
    clock_never_runs_backwards_across_vcpus(0);
}

#[test]
fn a_guests_clock_never_runs_backwards_when_its_vcpus_exits_wait_for_the_lock() {
    // A wait comes off the guest's clock only as far as no other vCPU of it saw the clock
    // meanwhile (one that ran, exited, and left its CPU during the wait).
    clock_never_runs_backwards_across_vcpus(QUANTUM / 20);
}

#[test]
fn an_init_to_a_vcpu_in_guest_mode_on_another_cpu_resets_it_at_its_exit() {
    // The BSP sends AP 1 an INIT while the AP computes on the other CPU, which holds its
    // registers until that entry's exit: the reset comes after, not before (where the CPU's
    // registers, handed back at the exit, would overwrite it).
    let (mut rl, mut hosts) = two_cpus_with(QUANTUM / 2, &[ipi(1, 5, 0)]);
    hosts.run_for(&mut rl, 8 * QUANTUM);
    // It was in guest mode on the other CPU at the INIT.
    let sent = rl
        .cpu
        .vcpu_entries(0, 0)
        .find(|e| e.exit == crate::vmx::ExitReason::Wrmsr && e.start > super::fake::START + QUANTUM)
        .copied()
        .expect("the BSP's INIT");
    assert!(rl
        .cpu
        .vcpu_entries(0, 1)
        .any(|e| e.start < sent.end && e.end > sent.end && e.host != sent.host));
    let ap = &rl.slots[0].vcpus[1];
    assert_eq!(ap.state, RunState::WaitForSipi);
    assert_eq!(ap.regs, crate::guest::GuestRegs::default());
    assert!(!rl.slots[0].seats[1].init_pending);
}

// ----- Weights and caps over several host CPUs -----

/// Guests of one vCPU each with the given shares, CPU-bound, on `hosts` host CPUs for `quanta`
/// quanta: the loop, and when the measured window started (after a warm-up of 20 quanta).
fn machine_rig(
    shares: &[crate::sched::Share],
    pins: &[Option<u64>],
    hosts: usize,
) -> (RunLoop<FakeCpu>, Hosts) {
    let cpu = FakeCpu::new();
    let slots = shares
        .iter()
        .enumerate()
        .map(|(i, &sh)| {
            cpu.guest(i, Program::compute(), 0)
                .with_share(sh)
                .with_pins(pins.get(i).copied().flatten())
        })
        .collect();
    let mut rl = RunLoop::new(cpu, config(), slots);
    let hosts = Hosts::new(&mut rl, hosts);
    (rl, hosts)
}

/// Each guest's CPU time over a window of `quanta` quanta (after a warm-up of 20), in percent of
/// the machine's time (every host CPU's).
fn machine_window(rl: &mut RunLoop<FakeCpu>, hosts: &mut Hosts, quanta: u64) -> Vec<f64> {
    hosts.run_for(rl, 20 * QUANTUM);
    let guest_cycles = |rl: &RunLoop<FakeCpu>| -> Vec<u64> {
        rl.slots
            .iter()
            .map(|s| s.vcpus.iter().map(|v| v.stats.cpu_cycles).sum())
            .collect()
    };
    let before = guest_cycles(rl);
    let start = hosts.clocks.iter().copied().min().unwrap();
    hosts.run_for(rl, quanta * QUANTUM);
    let end = hosts.clocks.iter().copied().min().unwrap();
    let machine = ((end - start) * hosts.clocks.len() as u64) as f64;
    guest_cycles(rl)
        .iter()
        .zip(before)
        .map(|(&a, b)| (a - b) as f64 * 100.0 / machine)
        .collect()
}

/// Checks that the guests' shares `got` are in proportion to `weights`, each within 2% of its
/// share of what they had together.
fn in_proportion(got: &[f64], weights: &[f64]) {
    let busy: f64 = got.iter().sum();
    let total: f64 = weights.iter().sum();
    for (g, w) in got.iter().zip(weights) {
        let want = busy * w / total;
        assert!(
            (g - want).abs() / want < 0.02,
            "weights {weights:?}: got {got:?}"
        );
    }
}

#[test]
fn weights_divide_two_and_four_cpus_in_proportion() {
    // Two CPUs: weights 2, 1, 1, 1 give 40/20/20/20% of the machine (0.8 and 0.4 of a CPU).
    let sh = [
        share(2, None),
        share(1, None),
        share(1, None),
        share(1, None),
    ];
    let (mut rl, mut hosts) = machine_rig(&sh, &[], 2);
    let got = machine_window(&mut rl, &mut hosts, 400);
    in_proportion(&got, &[2.0, 1.0, 1.0, 1.0]);
    assert!(got.iter().sum::<f64>() > 98.0, "the CPUs idled: {got:?}");
    // Four CPUs, eight guests: weights 2, 2 and six of 1.
    let mut sh = vec![share(2, None); 2];
    sh.extend([share(1, None); 6]);
    let (mut rl, mut hosts) = machine_rig(&sh, &[], 4);
    let got = machine_window(&mut rl, &mut hosts, 400);
    in_proportion(&got, &[2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    assert!(got.iter().sum::<f64>() > 98.0, "the CPUs idled: {got:?}");
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
}

#[test]
fn a_weight_no_vcpu_can_use_leaves_the_rest_to_the_others() {
    // Two CPUs, weights 8, 1, 1: the weight-8 guest's share (1.6 CPUs) is more than its one
    // vCPU can run; it has one CPU, and the other two share the other evenly.
    let sh = [share(8, None), share(1, None), share(1, None)];
    let (mut rl, mut hosts) = machine_rig(&sh, &[], 2);
    let got = machine_window(&mut rl, &mut hosts, 400);
    assert!(got[0] > 49.0, "{got:?}");
    in_proportion(&got[1..], &[1.0, 1.0]);
}

#[test]
fn a_cap_is_a_share_of_the_whole_machine_on_two_and_four_cpus() {
    for hosts_n in [2, 4] {
        // Capped at 10% of the machine next to uncapped guests (its fair share: 1/4 of 2 CPUs,
        // 1/6 of 4).
        let mut sh = vec![share(1, Some(10))];
        sh.extend(vec![share(1, None); if hosts_n == 2 { 3 } else { 5 }]);
        let (mut rl, mut hosts) = machine_rig(&sh, &[], hosts_n);
        let got = machine_window(&mut rl, &mut hosts, 400);
        assert!((got[0] - 10.0).abs() < 0.1, "{hosts_n} CPUs: {got:?}");
        in_proportion(&got[1..], &vec![1.0; sh.len() - 1]);
        assert!(got.iter().sum::<f64>() > 98.0, "the CPUs idled: {got:?}");
    }
}

#[test]
fn a_capped_guest_alone_leaves_the_cpus_idle_beyond_its_cap() {
    // One vCPU capped at 10% of two CPUs: 20% of one, and the CPUs sleep the rest.
    let (mut rl, mut hosts) = machine_rig(&[share(1, Some(10))], &[], 2);
    let got = machine_window(&mut rl, &mut hosts, 400);
    assert!((got[0] - 10.0).abs() < 0.1, "{got:?}");
    // Two vCPUs of one guest capped at 10% of two CPUs, running at once on both: together no
    // more than the cap (each slice takes only what the other's left of the budget).
    let cpu = FakeCpu::new();
    let slot = cpu
        .smp_guest(
            0,
            vec![starter(1, &[Op::Run(u64::MAX)]), Program::compute()],
            0,
        )
        .with_share(share(1, Some(10)));
    let mut rl = RunLoop::new(cpu, config(), vec![slot]);
    let mut hosts = Hosts::new(&mut rl, 2);
    let got = machine_window(&mut rl, &mut hosts, 400);
    assert!((got[0] - 10.0).abs() < 0.1, "{got:?}");
    let both = |c| rl.cpu.vcpu_entries(0, c).count();
    assert!(both(0) > 10 && both(1) > 10, "{} and {}", both(0), both(1));
}

#[test]
fn a_vcpu_woken_while_another_cpu_idles_runs_there_at_once() {
    // Two CPUs: one CPU-bound guest, and a 100 Hz sleeper that last ran on the CPU the cruncher
    // has now. The idle CPU takes every tick, on time; the cruncher is never cut short.
    let cpu = FakeCpu::new();
    let slots = vec![
        cpu.guest(0, Program::compute(), 0),
        cpu.guest(1, Program::sleeper(200).with_pit(PIT_100HZ), 0),
    ];
    let mut rl = RunLoop::new(cpu, config(), slots);
    let mut hosts = Hosts::new(&mut rl, 2);
    hosts.run_for(&mut rl, TSC_HZ);
    every_tick_on_time(&rl, 1, PIT_100HZ);
    let ticks: Vec<&Entry> = rl.cpu.entries(1).filter(|e| e.injected.is_some()).collect();
    assert!(ticks.len() > 90, "{} ticks", ticks.len());
    // The cruncher ran all but a few of Keel's cycles of the second.
    let cruncher = cpu_cycles(&rl, 0);
    assert!(cruncher > TSC_HZ * 99 / 100, "{cruncher}");
    let hosts_of_ticks: Vec<usize> = ticks.iter().map(|e| e.host).collect();
    for e in rl.cpu.entries(0) {
        assert!(
            !ticks
                .iter()
                .any(|t| t.host == e.host && t.start > e.start && t.end < e.end),
            "a tick ran inside the cruncher's slice on CPU {}: {hosts_of_ticks:?}",
            e.host
        );
    }
}

#[test]
fn pins_hold_with_weights_on_four_cpus() {
    // Four CPUs: guest 0 (weight 2) pinned to CPUs 2-3, guest 1 pinned to CPU 3, five others
    // anywhere.
    let mut sh = vec![share(2, None), share(1, None)];
    sh.extend([share(1, None); 5]);
    let (mut rl, mut hosts) = machine_rig(&sh, &[Some(0b1100), Some(0b1000)], 4);
    let got = machine_window(&mut rl, &mut hosts, 400);
    assert!(
        rl.cpu.entries(0).all(|e| e.host >= 2),
        "guest 0 left CPUs 2-3"
    );
    assert!(rl.cpu.entries(1).all(|e| e.host == 3), "guest 1 left CPU 3");
    assert_eq!(overlapping_entries(&rl.cpu.trace), None);
    // No CPU idled, and the weights held among the guests the pins do not hold back: 2:1.
    assert!(got.iter().sum::<f64>() > 98.0, "the CPUs idled: {got:?}");
    let mut rest = vec![got[0]];
    rest.extend(&got[2..]);
    in_proportion(&rest, &[2.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
}

#[test]
fn vcpus_stay_on_their_cpu_when_no_other_is_further_below_its_share() {
    // Seven equal vCPUs on four CPUs: fair within 2% of 1/7 each, and most picks keep a vCPU on
    // the CPU it last ran on (each move costs a VMCLEAR and a VMPTRLD). Without the preference
    // 1230 of 2876 guest switches moved a vCPU; with it 246.
    let (mut rl, mut hosts) = machine_rig(&[share(1, None); 7], &[], 4);
    let got = machine_window(&mut rl, &mut hosts, 700);
    let f = rl.figures();
    let (same, cross) = (f.switch[0].0, f.switch[1].0);
    std::println!("guest switches: {same} on the same CPU, {cross} across CPUs; {got:?}");
    in_proportion(&got, &[1.0; 7]);
    assert!(
        cross * 10 < same + cross,
        "{cross} of {} switches moved a vCPU",
        same + cross
    );
}

/// The idle fast path (`RunLoop::pick_turn`): CPU 0 slept until a halted guest's timer, and at
/// the wake that guest runs before the housekeeping. A key typed during the sleep is read at the
/// next pick (when the guest halts again), not before the guest's interrupt.
#[test]
fn a_timer_wake_runs_the_guest_before_the_housekeeping() {
    let mut rl = rig(vec![Program::sleeper(200).with_pit(PIT_100HZ)]);
    while rl.cpu.sleeps.is_empty() {
        assert!(rl.step());
    }
    let entries = rl.cpu.trace.len();
    rl.cpu.keys.push_back(b'x');
    assert!(rl.step(), "the wake");
    let woken = &rl.cpu.trace[entries..];
    assert!(
        woken.iter().any(|e| e.injected.is_some()),
        "the guest took its tick at the wake: {woken:?}"
    );
    assert!(
        rl.cpu.keys.is_empty(),
        "the key left COM1's FIFO at the wake"
    );
    assert_eq!(rl.ops.keys.len(), 1, "but waits for the next pick");
    assert!(rl.step());
    assert!(rl.ops.keys.is_empty(), "and is handled there");
    run_for(&mut rl, TSC_HZ / 10);
    every_tick_on_time(&rl, 0, PIT_100HZ);
}

/// A halted guest's timer that ends another guest's slice: the next pick runs the woken guest
/// before CPU 0's housekeeping (the console, the control channel, the log), as a timer wake
/// from idle does. In Bochs the housekeeping next to two flooding guests (their console lines
/// moved to COM1's queue) took up to 100,000 cycles, and a 100 Hz sleeper woken after it lost
/// PIT ticks (`tests/tests/console.rs` with APIC virtualization off: 494 of 501).
#[test]
fn a_timer_that_ends_a_slice_runs_its_guest_before_the_housekeeping() {
    let mut rl = rig(vec![
        Program::sleeper(200).with_pit(PIT_100HZ),
        Program::compute(),
    ]);
    // Every other tick falls due just after the computing guest's quantum ends (the two
    // periods are equal): a pick's housekeeping then is put off, as it would have ended after
    // the tick (`Chores`).
    rl.cpu.control_cost = period(PIT_100HZ) as u64 / 3;
    run_for(&mut rl, TSC_HZ / 2);
    every_tick_on_time(&rl, 0, PIT_100HZ);
    // The housekeeping still runs: a key typed is read and goes to the focused guest.
    rl.cpu.keys.push_back(b'k');
    run_for(&mut rl, 2 * QUANTUM);
    assert!(rl.cpu.keys.is_empty() && rl.ops.keys.is_empty());
}

/// Two halted guests whose timers fall due close together: the one a timer wake finds due is
/// picked at once, the other still gets its turn, and neither tick is late.
#[test]
fn a_timer_wake_leaves_the_other_sleepers_their_turn() {
    let mut rl = rig(vec![Program::sleeper(200).with_pit(PIT_100HZ); 2]);
    run_for(&mut rl, TSC_HZ / 2);
    every_tick_on_time(&rl, 0, PIT_100HZ);
    every_tick_on_time(&rl, 1, PIT_100HZ);
}

/// A timer wake that wakes nobody (the guest's PIT ticks on a masked line) does the housekeeping
/// at once: the fast path never leaves the console unread for a sleeper that stays asleep.
#[test]
fn a_timer_wake_that_wakes_nobody_does_the_housekeeping() {
    let mut program = Program::sleeper(200).with_pit(PIT_100HZ);
    let unmask = program
        .main
        .iter()
        .position(|op| matches!(op, Op::Out(0x21, 0xfe)));
    program.main[unmask.unwrap()] = Op::Out(0x21, 0xff);
    let mut rl = rig(vec![program]);
    while rl.cpu.sleeps.is_empty() {
        assert!(rl.step());
    }
    rl.cpu.keys.push_back(b'x');
    assert!(rl.step());
    assert!(rl.cpu.keys.is_empty(), "the key was read at the wake");
    assert!(
        !rl.cpu.trace.iter().any(|e| e.injected.is_some()),
        "the masked line woke nobody"
    );
}

/// When CPU 0's housekeepings ended while the loop ran for `cycles`: the last one before, then
/// each that ran.
fn housekeeping_ends(rl: &mut RunLoop<FakeCpu>, cycles: u64) -> Vec<u64> {
    let end = rl.cpu.clock + cycles;
    let mut ends = vec![rl.chores.at];
    while rl.cpu.clock < end {
        assert!(rl.step(), "every guest stopped");
        if rl.chores.at != ends[ends.len() - 1] {
            ends.push(rl.chores.at);
        }
    }
    ends
}

/// The longest time between two of CPU 0's housekeepings (by when each ended) while the loop
/// runs for `cycles`.
fn longest_without_housekeeping(rl: &mut RunLoop<FakeCpu>, cycles: u64) -> u64 {
    let ends = housekeeping_ends(rl, cycles);
    let since_last = rl.cpu.clock - ends[ends.len() - 1];
    ends.windows(2)
        .map(|w| w[1] - w[0])
        .fold(since_last, u64::max)
}

/// Sleepers whose handlers outlast the gaps between the others' ticks: each woken one's slice is
/// cut short by the next one's tick, and the picks that follow take the wake's fast path, one
/// after another. The housekeeping still runs at least once a quantum: no pick puts it off once
/// it last ended a quantum ago, so two are at most a quantum and a slice (another quantum) apart.
#[test]
fn chains_of_woken_picks_keep_the_housekeeping_within_a_quantum() {
    // 20 Hz, each tick's handler 20 ms: six of them want more than the CPU has. (Before the
    // bound, the housekeeping waited 4 quanta here.)
    let mut rl = rig(vec![Program::sleeper(TSC_HZ / 50).with_pit(59659); 6]);
    run_for(&mut rl, TSC_HZ / 10);
    let longest = longest_without_housekeeping(&mut rl, TSC_HZ);
    assert!(
        longest <= 2 * QUANTUM + 100 * KEEL_COST,
        "the housekeeping waited {longest} cycles ({} quanta)",
        longest as f64 / QUANTUM as f64
    );
}

/// Guests that YIELD to each other every 1,000 cycles: CPU 0's housekeeping runs about once a
/// millisecond, not at each of their switches (`HOUSEKEEPING_GAP_DIVISOR`), and a key typed is
/// still handled at the next pick.
#[test]
fn guests_that_switch_often_pay_the_housekeeping_once_a_millisecond() {
    let mut rl = rig(vec![Program::calling(crate::abi::hc::YIELD); 2]);
    run_for(&mut rl, TSC_HZ / 100);
    let picks = rl.sched.switches;
    let ends = housekeeping_ends(&mut rl, TSC_HZ / 10);
    for gap in ends.windows(2).map(|w| w[1] - w[0]) {
        assert!(gap >= TSC_HZ / 1000, "again after {gap} cycles");
        assert!(gap <= TSC_HZ / 1000 + 2_000, "only after {gap} cycles");
    }
    let runs = ends.len() as u64 - 1;
    let picks = rl.sched.switches - picks;
    assert!(picks > 10 * runs, "{runs} housekeepings at {picks} picks");
    // Each a millisecond and at most a slice after the last.
    assert!((90..=100).contains(&runs), "{runs} housekeepings in 100 ms");
    rl.cpu.keys.push_back(b'k');
    assert!(rl.step() && rl.step());
    assert!(rl.cpu.keys.is_empty() && rl.ops.keys.is_empty());
}

/// The halted guests' timers found once at a pick serve every guest's look: the earliest of the
/// others' for the guest that holds the earliest, ties included.
#[test]
fn halted_due_gives_the_earliest_of_the_other_guests() {
    let due = HaltedDue {
        first: Some((5, 2)),
        second: Some(5),
    };
    assert_eq!(due.except(None), Some(5));
    assert_eq!(due.except(Some(2)), Some(5));
    assert_eq!(due.except(Some(0)), Some(5));
    let due = HaltedDue {
        first: Some((5, 2)),
        second: None,
    };
    assert_eq!(due.except(Some(2)), None);
    assert_eq!(HaltedDue::default().except(None), None);
}

/// The wakes find the halted guests' timers in the same pass (`RunLoop::wake_halted`): what a
/// look of its own finds after them, at every pick of sleepers at 100 and 132 Hz next to a
/// computing guest.
#[test]
fn the_wakes_find_the_timers_a_look_of_their_own_finds() {
    let mut rl = rig(vec![
        Program::sleeper(200).with_pit(PIT_100HZ),
        Program::sleeper(3_000).with_pit(PIT_132HZ),
        Program::compute(),
        Program::sleeper(50_000).with_pit(PIT_132HZ),
    ]);
    let (mut found, end) = (0, rl.cpu.clock + TSC_HZ / 5);
    while rl.cpu.clock < end {
        assert!(rl.step());
        let now = rl.cpu.clock;
        let (_, _, due) = rl.wake_halted(now);
        assert_eq!(due, rl.halted_due());
        found += usize::from(due.second.is_some());
    }
    assert!(found > 10, "two halted guests with timers at {found} looks");
}

/// The preemption timer's lead on one CPU (`learned_lead`): with a fixed way from the timer's
/// expiry to Keel being ready to wait, it settles where Keel is ready `LEAD_MARGIN` before the
/// deadline (so the guest's interrupt goes in at its deadline, not the way's length after it),
/// from below and from above; it never passes its cap; and a way that changes is followed.
#[test]
fn the_timer_lead_settles_where_keel_is_ready_just_before_the_deadline() {
    use crate::runloop::{learned_lead, ENTRY_LEAD, LEAD_MARGIN};
    let due = 1_000_000;
    // The exit comes at `due - lead + way` (the timer armed `lead` short), Keel is ready then.
    let settle = |mut lead: u64, way: u64, max: u64| {
        for _ in 0..64 {
            lead = learned_lead(lead, due, due - lead + way, max);
        }
        lead
    };
    for way in [40, 100, 130, 2_000] {
        for start in [0, ENTRY_LEAD, 5_000] {
            let lead = settle(start, way, 10_000);
            let ready = due - lead + way;
            assert!(
                ready < due && due - ready <= LEAD_MARGIN + 1,
                "way {way}, from {start}: lead {lead}, ready {} before the deadline",
                due - ready
            );
        }
    }
    // Capped: a way longer than the cap leaves the lead at it (the exit is then late).
    assert_eq!(settle(ENTRY_LEAD, 50_000, 10_000), 10_000);
    // A way that shortens: the lead follows it down.
    let long = settle(ENTRY_LEAD, 400, 10_000);
    let short = settle(long, 100, 10_000);
    assert!(short < long && due - (due - short + 100) <= LEAD_MARGIN + 1);
    // Never below zero, however early the exit.
    assert_eq!(learned_lead(10, due, 0, 10_000), 0);
}
