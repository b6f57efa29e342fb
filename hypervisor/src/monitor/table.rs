//! The table Keel prints when it ends (and on Ctrl-A s): per guest its CPU share, time halted,
//! exits per second, interrupts injected and memory, then its most frequent exit kinds with
//! their rates and Keel's average and longest handling of each, and its console's account.
//! docs/SCHEDULING.md, "Statistics", shows one.

use super::GuestView;
use crate::guest::EXIT_REASONS;
use crate::vmx::ExitReason;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// How many exit kinds a guest's line names (the most frequent).
pub const TOP_EXITS: usize = 4;

/// One guest's console account: bytes that reached the console, bytes dropped.
pub type ConsoleCount = (u64, u64);

/// The table over `elapsed` TSC cycles at `hz`, one `keel: ` line each. A guest's `cpu %` is its
/// share of the machine's time over them: of `cpus` host CPUs' (as its cap is).
pub fn readable(guests: &[(GuestView, ConsoleCount)], elapsed: u64, hz: u64, cpus: u64) -> String {
    let elapsed = elapsed.max(1);
    let machine = elapsed.saturating_mul(cpus.max(1));
    let hz = hz.max(1);
    let mut t = String::new();
    let tenths = |n: u64| alloc::format!("{}.{:01}", n / 10, n % 10);
    let hundredths = |n: u64| alloc::format!("{}.{:02}", n / 100, n % 100);
    let _ = writeln!(
        t,
        "keel: statistics over {} s:",
        tenths(mul_div(elapsed, 10, hz))
    );
    let _ = writeln!(
        t,
        "keel: {:<16} {:<8} {:>7} {:>10} {:>9} {:>10} {:>8}",
        "guest", "state", "cpu %", "halted s", "exits/s", "irqs", "memory"
    );
    for (g, _) in guests {
        let s = &g.stats;
        let _ = writeln!(
            t,
            "keel: {:<16} {:<8} {:>7} {:>10} {:>9} {:>10} {:>6} M",
            g.name,
            g.state.name(),
            hundredths(mul_div(s.cpu_cycles, 10_000, machine)),
            hundredths(mul_div(s.halted_cycles, 100, hz)),
            mul_div(s.total_exits(), hz, elapsed),
            s.interrupts_injected,
            g.memory >> 20
        );
    }
    for (g, _) in guests {
        let s = &g.stats;
        let mut kinds: Vec<usize> = (0..EXIT_REASONS).filter(|&r| s.exits[r] > 0).collect();
        kinds.sort_by(|a, b| s.exits[*b].cmp(&s.exits[*a]).then(a.cmp(b)));
        let more = kinds.len().saturating_sub(TOP_EXITS);
        let parts: Vec<String> = kinds
            .iter()
            .take(TOP_EXITS)
            .map(|&r| {
                let mut p = alloc::format!(
                    "{} {}/s",
                    ExitReason::from_basic(r as u16),
                    mul_div(s.exits[r], hz, elapsed)
                );
                if let Some(avg) = s.average_exit_cycles(r) {
                    let _ = write!(p, " (avg {avg}, max {} cycles)", s.exit_cycles_max[r]);
                }
                p
            })
            .collect();
        let _ = write!(
            t,
            "keel: exits of {}: {}",
            g.name,
            if parts.is_empty() {
                String::from("none")
            } else {
                parts.join(", ")
            }
        );
        match more {
            0 => t.push('\n'),
            n => {
                let _ = writeln!(t, ", {n} more kinds (stats {})", g.name);
            }
        }
    }
    for (g, (bytes, dropped)) in guests {
        let _ = writeln!(
            t,
            "keel: console of {}: {bytes} bytes, {dropped} dropped",
            g.name
        );
    }
    t
}

/// `a * b / c` without overflow (0 when `c` is 0).
fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return 0;
    }
    (u128::from(a) * u128::from(b) / u128::from(c)).min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestStats;
    use crate::monitor::State;

    const HZ: u64 = 1_000_000;

    fn guest(name: &str, state: State, stats: GuestStats) -> GuestView {
        GuestView {
            id: 0,
            name: name.into(),
            state,
            stop_reason: None,
            vcpus: 1,
            memory: 4 << 20,
            stats,
            share: Default::default(),
        }
    }

    #[test]
    fn the_table_gives_shares_rates_and_handling_times() {
        let mut busy = GuestStats {
            cpu_cycles: 2_500_000, // a quarter of 10 s
            interrupts_injected: 1000,
            ..Default::default()
        };
        busy.exits[30] = 2000; // I/O instruction
        busy.record_exit_cycles(30, 1000);
        busy.record_exit_cycles(30, 3000);
        busy.exits[52] = 500; // VMX-preemption timer expired
        let mut idle = GuestStats {
            cpu_cycles: 1234,
            halted_cycles: 9_500_000,
            ..Default::default()
        };
        for (r, n) in [(10, 5), (12, 4), (18, 3), (28, 2), (31, 1)] {
            idle.exits[r] = n;
        }
        let t = readable(
            &[
                (guest("busy", State::Stopped, busy), (100, 0)),
                (guest("idle", State::Halted, idle), (7, 3)),
            ],
            10 * HZ,
            HZ,
            1,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "keel: statistics over 10.0 s:");
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row,
            ["keel:", "busy", "stopped", "25.00", "0.00", "250", "1000", "4", "M"]
        );
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(row[1..7], ["idle", "halted", "0.01", "9.50", "1", "0"]);
        assert_eq!(
            lines[4],
            "keel: exits of busy: I/O instruction 200/s (avg 2000, max 3000 cycles), \
             VMX-preemption timer expired 50/s"
        );
        assert!(
            lines[5].starts_with("keel: exits of idle: CPUID 0/s, HLT 0/s, VMCALL 0/s, ")
                && lines[5].ends_with(", 1 more kinds (stats idle)"),
            "{}",
            lines[5]
        );
        assert_eq!(lines[6], "keel: console of busy: 100 bytes, 0 dropped");
        assert_eq!(lines[7], "keel: console of idle: 7 bytes, 3 dropped");
        assert_eq!(lines.len(), 8);
    }
}
