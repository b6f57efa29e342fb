//! The load policy: guests marked `policy = "on-demand"` in the manifest are started while the
//! machine has CPU to spare and paused (or stopped) while it has none (docs/SCHEDULING.md, "The
//! load policy").
//!
//! The machine's load is the share of the CPU's time spent on the guests (in them, and in Keel
//! handling their exits) over a window: the rest is time the CPU slept because every guest was
//! halted, paused or out of its capped budget. At the end of each window the policy compares the
//! window's load with its two thresholds:
//!
//! - under `start_below`, it starts the first on-demand guest it holds (manifest order);
//! - over `stop_above`, it pauses (`action = "pause"`) or stops (`action = "stop"`) the on-demand
//!   guest it started last that is running;
//! - otherwise, or when there is no such guest, it does nothing.
//!
//! One decision per window, and the window starts again after each one, so the next decision
//! sees the load the last one made. The thresholds must leave a gap (`start_below` under
//! `stop_above`), or a guest would be started and paused by turns.
//!
//! Pure bookkeeping on the TSC and the guests' busy cycles, tested on the host; the run loop
//! (`runloop`) feeds it and carries out its decisions.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// What the policy does to an on-demand guest when the load is high.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pause it: it keeps its memory and state, its clock stops; it resumes where it was.
    Pause,
    /// Stop it: it is booted afresh from its image when the policy starts it again.
    Stop,
}

/// The `[keel] policy` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Start a held guest when the load over a window is under this (percent, 0-99).
    pub start_below: u32,
    /// Pause or stop a started guest when the load over a window is over this (percent, 1-100).
    pub stop_above: u32,
    /// The window, in milliseconds (100 ms to 1 hour).
    pub window_ms: u64,
    pub action: Action,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            start_below: 50,
            stop_above: 90,
            window_ms: 2000,
            action: Action::Pause,
        }
    }
}

pub const WINDOW_MIN_MS: u64 = 100;
pub const WINDOW_MAX_MS: u64 = 3_600_000;

impl PolicyConfig {
    /// Sets `key` (of `[keel] policy = { ... }`: `start_below`, `stop_above`, `window`,
    /// `action`) from its manifest text; the message says what is wrong.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "start_below" => {
                self.start_below = percent(value, 0, 99)
                    .ok_or_else(|| alloc::format!("policy.start_below must be a percentage from 0% to 99%, not `{value}`"))?
            }
            "stop_above" => {
                self.stop_above = percent(value, 1, 100)
                    .ok_or_else(|| alloc::format!("policy.stop_above must be a percentage from 1% to 100%, not `{value}`"))?
            }
            "window" => {
                self.window_ms = duration_ms(value)
                    .filter(|ms| (WINDOW_MIN_MS..=WINDOW_MAX_MS).contains(ms))
                    .ok_or_else(|| {
                        alloc::format!(
                            "policy.window must be a duration from 100ms to 3600s (like 2s or 500ms), not `{value}`"
                        )
                    })?
            }
            "action" => {
                self.action = match value {
                    "pause" => Action::Pause,
                    "stop" => Action::Stop,
                    _ => {
                        return Err(alloc::format!(
                            "policy.action must be pause or stop, not `{value}`"
                        ))
                    }
                }
            }
            _ => {
                return Err(alloc::format!(
                "unknown key policy.{key} (the policy takes start_below, stop_above, window and action)"
            ))
            }
        }
        Ok(())
    }

    /// Checks the settings together: the thresholds must leave a gap.
    pub fn check(&self) -> Result<(), String> {
        if self.start_below >= self.stop_above {
            return Err(alloc::format!(
                "policy.start_below ({}%) must be under policy.stop_above ({}%), or guests would be started and paused by turns",
                self.start_below, self.stop_above
            ));
        }
        Ok(())
    }
}

/// A guest's `policy` key: `on-demand` (managed by the load policy) or `none`.
pub fn parse_guest_key(value: &str) -> Result<bool, String> {
    match value {
        "on-demand" => Ok(true),
        "none" => Ok(false),
        _ => Err(alloc::format!(
            "policy must be on-demand or none, not `{value}`"
        )),
    }
}

/// `50%` or `50`, within `min..=max`.
fn percent(value: &str, min: u32, max: u32) -> Option<u32> {
    let n: u32 = value
        .strip_suffix('%')
        .unwrap_or(value)
        .trim()
        .parse()
        .ok()?;
    (min..=max).contains(&n).then_some(n)
}

/// `2s`, `1.5s`, `500ms` (or a bare number of milliseconds), in milliseconds.
fn duration_ms(value: &str) -> Option<u64> {
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.trim().parse().ok();
    }
    let Some(s) = value.strip_suffix('s') else {
        return value.trim().parse().ok();
    };
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let frac_ms: u64 = match frac.len() {
        0 => 0,
        n => frac.parse::<u64>().ok()? * 10u64.pow(3 - n as u32),
    };
    whole.checked_mul(1000)?.checked_add(frac_ms)
}

/// What the policy sees of an on-demand guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Running or halted: it has the CPU when it wants it.
    Active,
    /// Paused (by the policy or the operator).
    Paused,
    /// Stopped (by the policy, the operator, or by itself).
    Stopped,
}

/// What the policy does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Resume a guest the policy paused, or boot one it stopped (or that never ran).
    Start,
    Pause,
    Stop,
}

/// One decision: to do `op` to guest `guest` (its index in the run loop), because the load was
/// `load_permille` over `window_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub guest: usize,
    pub op: Op,
    pub load_permille: u64,
    pub window_ms: u64,
    /// The threshold crossed, in percent.
    pub threshold: u32,
}

impl Decision {
    /// The console line: `load 93% over 2.0 s > 90%: pausing NAME`.
    pub fn describe(&self, name: &str) -> String {
        // The load in whole percent, rounded away from the threshold, so the figure shown is on
        // the side of it that made the decision (29.9% is "29% < 30%", 80.1% "81% > 80%").
        let (cmp, doing, percent) = match self.op {
            Op::Start => ('<', "starting", self.load_permille / 10),
            Op::Pause => ('>', "pausing", self.load_permille.div_ceil(10)),
            Op::Stop => ('>', "stopping", self.load_permille.div_ceil(10)),
        };
        alloc::format!(
            "load {percent}% over {}.{} s {cmp} {}%: {doing} {name}",
            self.window_ms / 1000,
            self.window_ms % 1000 / 100,
            self.threshold
        )
    }
}

/// One on-demand guest.
#[derive(Debug, Clone, Copy)]
struct Managed {
    guest: usize,
    /// The policy holds it (paused or stopped it, or has not started it yet): it may start it.
    held: bool,
    /// When the policy last started it (a counter): the last started is paused first.
    started: u64,
}

/// The load policy of one CPU's run loop.
#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    window: u64,
    managed: Vec<Managed>,
    /// The current window's start: host TSC and the guests' busy cycles then.
    start: Option<(u64, u64)>,
    starts: u64,
}

impl Policy {
    /// The policy over the on-demand guests `managed` (run-loop indices), with a TSC of
    /// `tsc_hz`. It holds them all at first: the run loop keeps them from running until the
    /// policy starts them.
    pub fn new(cfg: PolicyConfig, tsc_hz: u64, managed: impl IntoIterator<Item = usize>) -> Self {
        Policy {
            window: (u128::from(tsc_hz) * u128::from(cfg.window_ms) / 1000).max(1) as u64,
            cfg,
            managed: managed
                .into_iter()
                .map(|guest| Managed {
                    guest,
                    held: true,
                    started: 0,
                })
                .collect(),
            start: None,
            starts: 0,
        }
    }

    pub fn config(&self) -> PolicyConfig {
        self.cfg
    }

    /// The guests it manages.
    pub fn guests(&self) -> impl Iterator<Item = usize> + '_ {
        self.managed.iter().map(|m| m.guest)
    }

    /// True when the current window has ended at `now` (the run loop then calls [`Policy::tick`]).
    pub fn due(&self, now: u64) -> bool {
        match self.start {
            None => true,
            Some((at, _)) => now.saturating_sub(at) >= self.window,
        }
    }

    /// The end of a window at host TSC `now`, with `busy` the guests' busy cycles so far (in the
    /// guests and in Keel for them, all guests added up) and `seen` each on-demand guest's state:
    /// the decision, if any. The run loop carries it out and tells [`Policy::done`].
    pub fn tick(&mut self, now: u64, busy: u64, seen: impl Fn(usize) -> Seen) -> Option<Decision> {
        let Some((at, busy0)) = self.start else {
            self.start = Some((now, busy));
            return None;
        };
        let span = now.saturating_sub(at);
        if span < self.window {
            return None;
        }
        self.start = Some((now, busy));
        // A guest the operator resumed or restarted is no longer the policy's to start; one
        // that stopped by itself stays stopped.
        for m in &mut self.managed {
            if m.held && seen(m.guest) == Seen::Active {
                m.held = false;
            }
        }
        let load_permille =
            (u128::from(busy.saturating_sub(busy0)) * 1000 / u128::from(span)).min(1000) as u64;
        let window_ms = self.cfg.window_ms;
        if load_permille < u64::from(self.cfg.start_below) * 10 {
            let m = self.managed.iter().find(|m| m.held)?;
            return Some(Decision {
                guest: m.guest,
                op: Op::Start,
                load_permille,
                window_ms,
                threshold: self.cfg.start_below,
            });
        }
        if load_permille > u64::from(self.cfg.stop_above) * 10 {
            let m = self
                .managed
                .iter()
                .filter(|m| !m.held && seen(m.guest) == Seen::Active)
                .max_by_key(|m| m.started)?;
            return Some(Decision {
                guest: m.guest,
                op: match self.cfg.action {
                    Action::Pause => Op::Pause,
                    Action::Stop => Op::Stop,
                },
                load_permille,
                window_ms,
                threshold: self.cfg.stop_above,
            });
        }
        None
    }

    /// The run loop carried out `d` (`ok`) or could not (the guest stays as it was).
    pub fn done(&mut self, d: &Decision, ok: bool) {
        if !ok {
            return;
        }
        self.starts += 1;
        let starts = self.starts;
        if let Some(m) = self.managed.iter_mut().find(|m| m.guest == d.guest) {
            match d.op {
                Op::Start => {
                    m.held = false;
                    m.started = starts;
                }
                Op::Pause | Op::Stop => m.held = true,
            }
        }
    }
}

/// The text of a duration in ms as the manifest takes it back (`2s`, `1500ms`).
pub fn window_text(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        alloc::format!("{}s", ms / 1000)
    } else {
        ms.to_string() + "ms"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: u64 = 1_000_000;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            start_below: 50,
            stop_above: 90,
            window_ms: 2000,
            action: Action::Pause,
        }
    }

    /// A machine under the policy: on-demand guests 1 and 2 (guest 0 is not managed), each
    /// adding `each` percent of load when active; `base` percent from the others.
    struct Machine {
        policy: Policy,
        now: u64,
        busy: u64,
        seen: [Seen; 3],
        decisions: Vec<String>,
    }

    impl Machine {
        fn new(cfg: PolicyConfig) -> Self {
            let mut policy = Policy::new(cfg, HZ, [1, 2]);
            // The first window starts at 0.
            assert_eq!(policy.tick(0, 0, |_| Seen::Paused), None);
            Machine {
                policy,
                now: 0,
                busy: 0,
                seen: [Seen::Active, Seen::Paused, Seen::Paused],
                decisions: Vec::new(),
            }
        }

        /// Runs `ms` of time at `load` percent, ticking every 100 ms as the run loop would.
        fn run(&mut self, ms: u64, load: impl Fn(&[Seen; 3]) -> u64) {
            for _ in 0..ms / 100 {
                let step = HZ / 10;
                self.now += step;
                self.busy += step * load(&self.seen) / 100;
                if !self.policy.due(self.now) {
                    continue;
                }
                let seen = self.seen;
                if let Some(d) = self.policy.tick(self.now, self.busy, |g| seen[g]) {
                    self.seen[d.guest] = match d.op {
                        Op::Start => Seen::Active,
                        Op::Pause => Seen::Paused,
                        Op::Stop => Seen::Stopped,
                    };
                    self.decisions.push(d.describe(["a", "b", "c"][d.guest]));
                    self.policy.done(&d, true);
                }
            }
        }
    }

    /// `base` percent from guest 0 plus 20% for each active on-demand guest.
    fn load(base: u64) -> impl Fn(&[Seen; 3]) -> u64 {
        move |seen| base + 20 * seen[1..].iter().filter(|&&s| s == Seen::Active).count() as u64
    }

    #[test]
    fn low_load_starts_the_held_guests_one_window_at_a_time() {
        let mut m = Machine::new(cfg());
        m.run(3000, load(5));
        // One decision after the first 2 s.
        assert_eq!(m.decisions, ["load 5% over 2.0 s < 50%: starting b"]);
        m.run(2000, load(5));
        assert_eq!(m.decisions[1], "load 25% over 2.0 s < 50%: starting c");
        // 45%: between the thresholds, nothing more to start anyway.
        m.run(10_000, load(5));
        assert_eq!(m.decisions.len(), 2, "{:?}", m.decisions);
        assert_eq!(m.seen, [Seen::Active; 3]);
    }

    #[test]
    fn high_load_pauses_the_last_started_first_and_low_load_brings_it_back() {
        let mut m = Machine::new(cfg());
        m.run(4000, load(5));
        assert_eq!(m.seen[1..], [Seen::Active, Seen::Active]);
        // Guest 0 gets busy: 95% + 40%, all of the CPU.
        m.run(2000, load(95));
        assert_eq!(m.decisions[2], "load 100% over 2.0 s > 90%: pausing c");
        m.run(2000, load(95));
        assert_eq!(m.decisions[3], "load 100% over 2.0 s > 90%: pausing b");
        assert_eq!(m.seen[1..], [Seen::Paused, Seen::Paused]);
        // Nothing left to pause: no more decisions while it stays busy.
        m.run(10_000, load(95));
        assert_eq!(m.decisions.len(), 4);
        // Quiet again: b (first in manifest order) comes back first.
        m.run(2000, load(10));
        assert_eq!(m.decisions[4], "load 10% over 2.0 s < 50%: starting b");
    }

    #[test]
    fn loads_between_the_thresholds_change_nothing() {
        let mut m = Machine::new(cfg());
        m.run(20_000, load(70));
        assert!(m.decisions.is_empty(), "{:?}", m.decisions);
        m.run(2000, load(49));
        assert_eq!(m.decisions, ["load 49% over 2.0 s < 50%: starting b"]);
        // 69%: no further start; 89% is not over 90%.
        m.run(10_000, load(49));
        assert_eq!(m.decisions.len(), 1);
        m.run(10_000, load(69));
        assert_eq!(m.decisions.len(), 1);
    }

    #[test]
    fn the_stop_action_stops_and_a_stopped_guest_is_started_again() {
        let mut m = Machine::new(PolicyConfig {
            action: Action::Stop,
            window_ms: 500,
            ..cfg()
        });
        m.run(500, load(0));
        assert_eq!(m.decisions, ["load 0% over 0.5 s < 50%: starting b"]);
        m.run(500, load(100));
        assert_eq!(m.decisions[1], "load 100% over 0.5 s > 90%: stopping b");
        assert_eq!(m.seen[1], Seen::Stopped);
        m.run(500, load(0));
        assert_eq!(m.decisions[2], "load 0% over 0.5 s < 50%: starting b");
    }

    #[test]
    fn guests_the_operator_or_the_guest_changed_are_left_alone() {
        let mut m = Machine::new(cfg());
        // The operator resumes c before the policy started it: it is no longer held, so the
        // policy does not start it (it runs), and may pause it later.
        m.seen[2] = Seen::Active;
        m.run(2000, load(0));
        assert_eq!(m.decisions, ["load 20% over 2.0 s < 50%: starting b"]);
        m.run(10_000, load(0));
        assert_eq!(m.decisions.len(), 1, "{:?}", m.decisions);
        // b ends by itself: it stays stopped; c, running, is paused when the load is high.
        m.seen[1] = Seen::Stopped;
        m.run(2000, load(90));
        assert_eq!(m.decisions[1], "load 100% over 2.0 s > 90%: pausing c");
        m.run(2000, load(0));
        assert_eq!(m.decisions[2], "load 0% over 2.0 s < 50%: starting c");
        assert_eq!(m.seen[1], Seen::Stopped);
    }

    #[test]
    fn a_decision_not_carried_out_is_tried_again_next_window() {
        let mut p = Policy::new(cfg(), HZ, [0]);
        assert_eq!(p.tick(0, 0, |_| Seen::Paused), None);
        let d = p.tick(2 * HZ, 0, |_| Seen::Paused).expect("a start");
        p.done(&d, false);
        assert_eq!(p.tick(3 * HZ, 0, |_| Seen::Paused), None, "mid-window");
        assert_eq!(p.tick(4 * HZ, 0, |_| Seen::Paused), Some(d));
    }

    #[test]
    fn settings_are_read_and_bad_ones_refused() {
        let mut c = PolicyConfig::default();
        c.set("start_below", "30%").unwrap();
        c.set("stop_above", "85").unwrap();
        c.set("window", "1.5s").unwrap();
        c.set("action", "stop").unwrap();
        assert_eq!(
            c,
            PolicyConfig {
                start_below: 30,
                stop_above: 85,
                window_ms: 1500,
                action: Action::Stop
            }
        );
        c.set("window", "250ms").unwrap();
        assert_eq!(c.window_ms, 250);
        assert_eq!(window_text(2000), "2s");
        assert_eq!(window_text(250), "250ms");
        for (key, value, says) in [
            ("start_below", "100%", "from 0% to 99%"),
            ("stop_above", "0%", "from 1% to 100%"),
            ("stop_above", "lots", "not `lots`"),
            ("window", "50ms", "from 100ms to 3600s"),
            ("window", "2h", "not `2h`"),
            ("window", "1.2345s", "like 2s or 500ms"),
            ("action", "kill", "pause or stop"),
            ("threshold", "5%", "unknown key policy.threshold"),
        ] {
            let e = c.set(key, value).unwrap_err();
            assert!(e.contains(says), "{key} = {value}: {e}");
        }
        c.start_below = 85;
        assert!(c.check().unwrap_err().contains("must be under"));
        assert_eq!(parse_guest_key("on-demand"), Ok(true));
        assert_eq!(parse_guest_key("none"), Ok(false));
        assert!(parse_guest_key("always").is_err());
    }

    #[test]
    fn decisions_read_as_the_console_shows_them() {
        let d = Decision {
            guest: 0,
            op: Op::Pause,
            load_permille: 934,
            window_ms: 2000,
            threshold: 90,
        };
        assert_eq!(d.describe("C"), "load 94% over 2.0 s > 90%: pausing C");
        let d = Decision {
            op: Op::Start,
            load_permille: 299,
            threshold: 30,
            ..d
        };
        assert_eq!(d.describe("C"), "load 29% over 2.0 s < 30%: starting C");
    }
}
