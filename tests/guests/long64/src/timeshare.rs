//! The time-sharing modes: the guests of the demo (`tests/guests/manifests/demo.toml`) and of
//! the scheduler test (`sched.toml`, asserted by `tests/tests/scheduler.rs`).
//!
//! Every guest measures time with its own TSC, whose rate it first measures against 10 periods of
//! its PIT at 100 Hz (halting meanwhile). Under Keel that TSC is the guest's virtual clock: it
//! stops while the guest waits for the CPU and runs while it is halted (docs/SCHEDULING.md). So a
//! CPU-bound guest's "second" is a second of CPU it was given, while a mostly-halting guest's
//! second is close to a second of the machine's time.
//!
//! | mode      | does                                                                 | exit |
//! |-----------|----------------------------------------------------------------------|------|
//! | `crunch`  | computes for `secs=N` seconds, PIT ticks counted meanwhile            | 0x23 |
//! | `sleeper` | halts between PIT ticks for `secs=N` seconds                          | 0x24 |
//! | `clispin` | spins `cycles=N` TSC cycles with interrupts disabled, no exits        | 0x25 |
//! | `timekeeper` | halts on a LAPIC one-shot for `every=N` seconds, then PRINT_STATS, until `secs=N` | 0x26 |
//!
//! crunch and sleeper print `demo: <s> s, ...` once per second of their time (`every=N`: every
//! N seconds), then `demo: done ...`.

use core::sync::atomic::Ordering;
use guest_common::abi::{HC_CPU_TIME, HC_PRINT_STATS};
use guest_common::trap::{LAPIC_TICKS, LAPIC_TIMER_VECTOR, PIT_TICKS};
use guest_common::{console, cpu, lapic, pic, pit, say};

pub const EXIT_CRUNCH: u8 = 0x23;
pub const EXIT_SLEEPER: u8 = 0x24;
pub const EXIT_CLISPIN: u8 = 0x25;
pub const EXIT_TIMEKEEPER: u8 = 0x26;
/// The PIT rate every time-sharing guest runs at.
const PIT_HZ: u32 = 100;
/// crunch: work steps between two looks at the clock.
const STEPS_PER_CHECK: u64 = 1024;

/// What a time-sharing guest was asked to do (from its command line).
pub struct Plan {
    /// How long to run, in seconds of the guest's own time.
    pub secs: u64,
    /// Print a progress line (timekeeper: ask for Keel's table) every this many seconds.
    pub every: u64,
}

impl Plan {
    /// The first second at which a line is printed.
    fn first(&self) -> u64 {
        self.every.min(self.secs)
    }
}

/// Measures the TSC rate, then starts the PIT at 100 Hz on IRQ0 (vector 0x20), the only unmasked
/// line; returns the TSC rate.
pub(crate) fn start_clock() -> u64 {
    let hz = pit::tsc_hz();
    pic::init();
    pit::start_periodic(PIT_HZ);
    pic::enable_only(1);
    say!("tsc {} kHz", hz / 1000);
    hz.max(1)
}

/// TSC cycles run so far as Keel counts them (hypercall CPU_TIME); 0 without a hypervisor.
fn cpu_time() -> u64 {
    cpu::vmcall(HC_CPU_TIME, 0, 0).map_or(0, |c| c as u64)
}

/// `part / whole` in hundredths of a percent.
fn basis_points(part: u64, whole: u64) -> u64 {
    (u128::from(part) * 10_000 / u128::from(whole.max(1))) as u64
}

/// A `x.yy%` value for `say!`.
struct Percent(u64);

impl core::fmt::Display for Percent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:02}%", self.0 / 100, self.0 % 100)
    }
}

/// One step of xorshift64: the "work" a cruncher does.
fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^ (x << 17)
}

/// CPU-bound: xorshift steps with interrupts on (the PIT ticks are counted meanwhile) for
/// `plan.secs` seconds of the guest's own time.
pub fn crunch(plan: &Plan) -> ! {
    console::set_name("demo");
    let hz = start_clock();
    let (mut x, mut iterations, mut next) = (0x9e37_79b9_7f4a_7c15u64, 0u64, plan.first());
    PIT_TICKS.store(0, Ordering::SeqCst);
    let t0 = cpu::rdtsc();
    cpu::enable_interrupts();
    loop {
        for _ in 0..STEPS_PER_CHECK {
            x = core::hint::black_box(xorshift(x));
        }
        iterations += STEPS_PER_CHECK;
        let elapsed = cpu::rdtsc().wrapping_sub(t0);
        if elapsed < next * hz {
            continue;
        }
        let ticks = PIT_TICKS.load(Ordering::SeqCst);
        if next >= plan.secs {
            cpu::disable_interrupts();
            say!(
                "done: {} s, {} iterations, {} PIT ticks, tsc={} cpu={}",
                next,
                iterations,
                ticks,
                elapsed,
                cpu_time()
            );
            pic::mask_all();
            cpu::exit(EXIT_CRUNCH)
        }
        say!("{} s, {} iterations, {} PIT ticks", next, iterations, ticks);
        next = plan.secs.min(next + plan.every);
    }
}

/// Mostly halted: wakes on each PIT tick, counts it, halts again, for `plan.secs` seconds of its
/// own time. Each progress line gives its CPU use (CPU_TIME over its own elapsed time).
pub fn sleeper(plan: &Plan) -> ! {
    console::set_name("demo");
    let hz = start_clock();
    let (mut wakeups, mut next) = (0u64, plan.first());
    PIT_TICKS.store(0, Ordering::SeqCst);
    let t0 = cpu::rdtsc();
    loop {
        cpu::wait_for_interrupt();
        wakeups += 1;
        let elapsed = cpu::rdtsc().wrapping_sub(t0);
        if elapsed < next * hz {
            continue;
        }
        // The whole run, calibration included: the guest's TSC started at 0.
        let cpu_share = Percent(basis_points(cpu_time(), cpu::rdtsc()));
        let ticks = PIT_TICKS.load(Ordering::SeqCst);
        if next >= plan.secs {
            say!(
                "done: {} s, {} PIT ticks, {} wakeups, tsc={} cpu {}",
                next,
                ticks,
                wakeups,
                elapsed,
                cpu_share
            );
            pic::mask_all();
            cpu::exit(EXIT_SLEEPER)
        }
        with_interrupts(|| say!("{} s, {} PIT ticks, cpu {}", next, ticks, cpu_share));
        next = plan.secs.min(next + plan.every);
    }
}

/// Halts `plan.every` seconds at a time on a LAPIC timer one-shot (one interrupt per wait, none in
/// between), then has Keel print its accounting table (PRINT_STATS); ends after `plan.secs`.
pub fn timekeeper(plan: &Plan) -> ! {
    console::set_name("demo");
    lapic::enable();
    lapic::start_free_running_slow();
    let lapic_hz = pit::measure_rate(|| u64::from(!lapic::current_count()));
    let hz = pit::tsc_hz().max(1);
    say!(
        "tsc {} kHz, lapic timer / 128 {} kHz",
        hz / 1000,
        lapic_hz / 1000
    );
    let t0 = cpu::rdtsc();
    let mut at = 0;
    while at < plan.secs {
        let wait = plan.every.min(plan.secs - at);
        at += wait;
        let count = (lapic_hz * wait).clamp(1, u64::from(u32::MAX)) as u32;
        let before = LAPIC_TICKS.load(Ordering::SeqCst);
        lapic::start_one_shot_slow(LAPIC_TIMER_VECTOR, count);
        while LAPIC_TICKS.load(Ordering::SeqCst) == before {
            cpu::wait_for_interrupt();
        }
        let elapsed = cpu::rdtsc().wrapping_sub(t0);
        say!("{} s (tsc={}): Keel, print your table", at, elapsed);
        let _ = cpu::vmcall(HC_PRINT_STATS, 0, 0);
    }
    let cpu_share = Percent(basis_points(cpu_time(), cpu::rdtsc()));
    say!(
        "done: {} s, {} wakeups, cpu {}",
        at,
        plan.secs.div_ceil(plan.every),
        cpu_share
    );
    lapic::stop();
    cpu::exit(EXIT_TIMEKEEPER)
}

/// Runs `f` with interrupts on. A line on the UART costs two exits per byte, long enough under an
/// emulator for several timer periods to pass: with interrupts off those ticks would merge into
/// one (docs/DEVICES.md, tick coalescing) and the count would come up short.
fn with_interrupts(f: impl FnOnce()) {
    cpu::enable_interrupts();
    f();
    cpu::disable_interrupts();
}

/// Interrupts off and no exits at all for `cycles` TSC cycles of the guest's own time: only
/// Keel's preemption timer can give the CPU to anyone else meanwhile.
pub fn clispin(cycles: u64) -> ! {
    say!("cli spin: {} cycles with interrupts off", cycles);
    cpu::disable_interrupts();
    let (mut x, mut iterations) = (1u64, 0u64);
    let t0 = cpu::rdtsc();
    let elapsed = loop {
        x = core::hint::black_box(xorshift(x));
        iterations += 1;
        let elapsed = cpu::rdtsc().wrapping_sub(t0);
        if elapsed >= cycles {
            break elapsed;
        }
    };
    say!(
        "cli spin done: {} iterations, tsc={} cpu={}",
        iterations,
        elapsed,
        cpu_time()
    );
    cpu::exit(EXIT_CLISPIN)
}
