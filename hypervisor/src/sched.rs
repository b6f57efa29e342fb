//! The scheduler: which vCPU runs next on a host CPU, and for how long.
//!
//! Pure bookkeeping over guest indices, so it is tested on the host; the run loop in `hypervisor`
//! asks it for the next runnable vCPU after each time slice. One host CPU goes round robin
//! ([`RoundRobin`]); several pick by virtual time ([`pick_fairest`]), so that weights and caps
//! ([`Shares`]) are shares of the whole machine however many CPUs it has.

/// Round-robin over `n` guests.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    last: Option<usize>,
    /// Length of a time slice in TSC cycles.
    pub quantum: u64,
    pub switches: u64,
    /// The last guest's slice was cut short by a woken guest: give it the CPU back next.
    repeat: bool,
}

impl RoundRobin {
    pub fn new(quantum: u64) -> Self {
        Self {
            last: None,
            quantum,
            switches: 0,
            repeat: false,
        }
    }

    /// The guest to run next: a runnable `urgent` one (just woken by an interrupt) first, without
    /// moving the round-robin position, so the rotation of the others is not disturbed; otherwise
    /// the next runnable guest after the one that ran last.
    pub fn pick_urgent_first(
        &mut self,
        n: usize,
        runnable: impl Fn(usize) -> bool,
        urgent: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        // `urgent` first: it is the cheaper test, and rarely true.
        if let Some(i) = (0..n).find(|&i| urgent(i) && runnable(i)) {
            self.switches += 1;
            return Some(i);
        }
        self.pick(n, runnable)
    }

    /// The guest that ran last was interrupted before its slice ended so that a woken guest could
    /// run: the next rotation pick returns it again instead of moving on.
    pub fn interrupted(&mut self) {
        self.repeat = true;
    }

    /// The next runnable guest after the one that ran last, wrapping around; the same guest again
    /// only if no other is runnable.
    pub fn pick(&mut self, n: usize, runnable: impl Fn(usize) -> bool) -> Option<usize> {
        if n == 0 {
            return None;
        }
        if core::mem::take(&mut self.repeat) {
            if let Some(l) = self.last.filter(|&l| l < n && runnable(l)) {
                return Some(l);
            }
        }
        let start = self.last.map(|l| l + 1).unwrap_or(0);
        let next = (0..n).map(|k| (start + k) % n).find(|&i| runnable(i))?;
        if self.last != Some(next) {
            self.switches += 1;
        }
        self.last = Some(next);
        Some(next)
    }
}

/// Virtual time, for the picks over several host CPUs: each vCPU's CPU time divided by its
/// guest's weight (in TSC cycles of a weight-1 vCPU). The CPU that picks takes the runnable vCPU
/// with the least, the one furthest below its share of the machine, so that CPU-bound vCPUs get
/// CPU time in proportion to their weights whichever CPUs they run on. On one CPU the round
/// robin with slices of `weight` quanta ([`RoundRobin`], [`Shares::slice`]) is the same rule:
/// every turn adds one quantum to a vCPU's virtual time.
pub fn advance(vtime: u64, ran: u64, weight: u32) -> u64 {
    vtime.saturating_add(ran / u64::from(weight.clamp(1, WEIGHT_MAX)))
}

/// How far, in quanta of virtual time, a vCPU that wants the CPU may be behind the one furthest
/// ahead ([`catch_up`]). Between CPU-bound vCPUs that share the machine by their weights the
/// spread stays within about one slice (each is picked when it is the least); more means it did
/// not want the CPU meanwhile (halted, paused, out of its capped budget, new) or could not get
/// more (a weight above what one vCPU can use on one CPU), and that is no claim on the future.
pub const LAG_QUANTA: u64 = 3;

/// `vtime` brought up to no more than `lag` behind `ahead` (the virtual time of the vCPU furthest
/// ahead among those that want the CPU): a vCPU back from a halt, a pause or its cap gets the CPU
/// first for a while, not until it has made up all the time it did not want.
pub fn catch_up(vtime: u64, ahead: u64, lag: u64) -> u64 {
    vtime.max(ahead.saturating_sub(lag))
}

/// The affinity margin of [`pick_fairest`] over several host CPUs, in quanta of virtual time: a
/// vCPU that last ran on the picking CPU goes before one up to this much further below its
/// share. A slice adds about a quantum to a CPU-bound vCPU's virtual time, so a smaller margin
/// keeps almost no vCPU where it was: 7 CPU-bound vCPUs on 4 CPUs on the fake CPU moved at 1230
/// of 2876 guest switches with half a quantum (as with none), at 246 with one quantum, equally
/// fair (`runloop::tests`, `vcpus_stay_on_their_cpu_...`).
pub const AFFINITY_QUANTA: u64 = 1;

/// A runnable vCPU as [`pick_fairest`] weighs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Its virtual time ([`advance`]).
    pub vtime: u64,
    /// Woken from HLT by an interrupt and not run since: ahead of everyone.
    pub woken: bool,
    /// Its slice was cut short for a woken vCPU: it gets the rest next.
    pub interrupted: bool,
    /// It last ran on the CPU that picks: its VMCS and caches are there.
    pub here: bool,
    /// Host TSC at which its last slice ended: the longer wait goes first among equals.
    pub left_at: u64,
}

/// The vCPU a host CPU runs next among `candidates` (index, what it weighs): a woken one first,
/// then one whose slice was cut short, then the one with the least virtual time. Among those
/// within `near` of the least, one that last ran on this CPU is preferred (affinity: a move to
/// another CPU costs a VMCLEAR and a VMPTRLD, and cold caches); a vCPU passed over that way is
/// at most `near` ahead of its share, and is picked once it falls further behind.
pub fn pick_fairest<I>(candidates: I, near: u64) -> Option<usize>
where
    I: Iterator<Item = (usize, Candidate)> + Clone,
{
    let key = |c: &Candidate| (!c.woken, !c.interrupted, c.vtime, c.left_at);
    let (best, first) = candidates.clone().min_by_key(|(_, c)| key(c))?;
    if first.woken || first.interrupted || first.here {
        return Some(best);
    }
    let bound = first.vtime.saturating_add(near);
    candidates
        .filter(|(_, c)| c.here && !c.woken && !c.interrupted && c.vtime <= bound)
        .min_by_key(|(_, c)| key(c))
        .map_or(Some(best), |(k, _)| Some(k))
}

/// A guest's claim on the CPU (manifest `weight` and `cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Relative weight, 1..=[`WEIGHT_MAX`]: among guests that all want the CPU, each gets CPU
    /// time in proportion to its weight (its time slice is `weight` quanta).
    pub weight: u32,
    /// The most CPU time the guest may use, summed over its vCPUs, in percent of the machine's
    /// (every host CPU that runs vCPUs; 1..=100), even when CPUs would otherwise idle (a hard
    /// cap, as Xen's credit scheduler has it). `None`: no cap.
    pub cap_percent: Option<u32>,
}

pub const WEIGHT_MAX: u32 = 64;

impl Default for Share {
    fn default() -> Self {
        Share {
            weight: 1,
            cap_percent: None,
        }
    }
}

/// The accounting period over which caps are enforced, in quanta: a capped guest's budget is
/// `cap` percent of it, refilled at each period's start. Ten 10 ms quanta give caps a 100 ms
/// period: short enough that a capped guest's use never bunches up for long, long enough that a
/// cap of a few percent is still a whole number of slices' worth of cycles.
pub const CAP_PERIOD_QUANTA: u64 = 10;

/// Weights and caps over the guests of the machine: how long each may run now, whether a capped
/// one has used its budget, and when budgets come back. Pure bookkeeping on the TSC, host-tested.
/// A capped guest's budget is its percentage of a period of every host CPU (`hosts` times the
/// period), used by all its vCPUs on any CPU.
#[derive(Debug, Clone)]
pub struct Shares {
    quantum: u64,
    period: u64,
    period_start: u64,
    /// The host CPUs that run vCPUs: the machine a cap is a percentage of.
    hosts: u64,
    shares: alloc::vec::Vec<Share>,
    /// CPU cycles each guest used in the current period.
    used: alloc::vec::Vec<u64>,
    /// Cycles held for each guest's slices in progress ([`Shares::hold`]): with several CPUs its
    /// vCPUs may run at once, and each slice may only take what the others left of the budget.
    held: alloc::vec::Vec<u64>,
}

impl Shares {
    pub fn new(quantum: u64, shares: alloc::vec::Vec<Share>) -> Self {
        let quantum = quantum.max(1);
        Shares {
            quantum,
            period: quantum.saturating_mul(CAP_PERIOD_QUANTA),
            period_start: 0,
            hosts: 1,
            used: alloc::vec![0; shares.len()],
            held: alloc::vec![0; shares.len()],
            shares,
        }
    }

    /// The machine has `n` host CPUs running vCPUs: caps are percentages of all of them.
    pub fn set_hosts(&mut self, n: usize) {
        self.hosts = (n as u64).max(1);
    }

    /// Guest `i`'s budget per period, if capped: its percentage of the period on every CPU.
    fn budget(&self, i: usize) -> Option<u64> {
        let cap = self.shares.get(i)?.cap_percent?;
        let machine = u128::from(self.period) * u128::from(self.hosts);
        Some((machine * u128::from(cap) / 100) as u64)
    }

    /// What guest `i` used of its budget, with what its slices in progress hold.
    fn taken(&self, i: usize) -> u64 {
        let used = self.used.get(i).copied().unwrap_or(0);
        used.saturating_add(self.held.get(i).copied().unwrap_or(0))
    }

    /// Starts a new period (budgets back) when `now` is past the current one. What a capped
    /// guest ran beyond its budget (its last slice cannot stop at the budget's exact cycle) is
    /// carried into the next periods as a debt, so over time it gets its cap and no more; unused
    /// budget is not carried.
    pub fn refill(&mut self, now: u64) {
        if now.saturating_sub(self.period_start) < self.period {
            return;
        }
        let periods = (now - self.period_start) / self.period;
        self.period_start += periods * self.period;
        for i in 0..self.used.len() {
            let back = self
                .budget(i)
                .map_or(u64::MAX, |b| b.saturating_mul(periods));
            self.used[i] = self.used[i].saturating_sub(back);
        }
    }

    /// True unless guest `i` has used its capped budget for this period (or its vCPUs running
    /// now hold the rest of it).
    pub fn may_run(&self, i: usize) -> bool {
        match self.budget(i) {
            Some(b) => i < self.used.len() && self.taken(i) < b,
            None => true,
        }
    }

    /// How long guest `i` may run from now: its weight in quanta, no further than what is left
    /// of its budget (and of a capped guest's period: its budget comes back only then).
    pub fn slice(&self, i: usize) -> u64 {
        let slice = self.quantum.saturating_mul(u64::from(self.weight(i)));
        match self.budget(i) {
            Some(b) => slice.min(b.saturating_sub(self.taken(i))),
            None => slice,
        }
    }

    /// A slice of guest `i` that may run `cycles` starts: they are held from its budget until
    /// [`Shares::release`], so that its other vCPUs, starting slices on other CPUs meanwhile,
    /// take only what is left (each CPU's slice is charged only at its end).
    pub fn hold(&mut self, i: usize, cycles: u64) {
        if let Some(h) = self.held.get_mut(i) {
            *h = h.saturating_add(cycles);
        }
    }

    /// The slice that held `cycles` of guest `i`'s budget ended (what it ran is charged).
    pub fn release(&mut self, i: usize, cycles: u64) {
        if let Some(h) = self.held.get_mut(i) {
            *h = h.saturating_sub(cycles);
        }
    }

    /// Guest `i` ran `cycles` on a CPU.
    pub fn charge(&mut self, i: usize, cycles: u64) {
        if let Some(u) = self.used.get_mut(i) {
            *u = u.saturating_add(cycles);
        }
    }

    /// Guest `i`'s weight, 1..=[`WEIGHT_MAX`].
    pub fn weight(&self, i: usize) -> u32 {
        self.shares
            .get(i)
            .map_or(1, |s| s.weight.clamp(1, WEIGHT_MAX))
    }

    /// When the current period ends and capped guests get their budgets back: the CPU has
    /// nothing better to do than sleep until then when only capped guests want it.
    pub fn period_end(&self) -> u64 {
        self.period_start.saturating_add(self.period)
    }

    /// Guest `i`'s weight and cap.
    pub fn get(&self, i: usize) -> Share {
        self.shares.get(i).copied().unwrap_or_default()
    }

    /// Gives guest `i` a new weight and cap (the monitor's `weight` and `cap`): its next slice
    /// has the new length; what it used of the current period still counts against a new cap.
    pub fn set(&mut self, i: usize, share: Share) {
        if let Some(s) = self.shares.get_mut(i) {
            *s = share;
        }
    }

    /// True if any guest has a cap (the run loop then watches period ends).
    pub fn any_cap(&self) -> bool {
        self.shares.iter().any(|s| s.cap_percent.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_over_runnable_guests() {
        let mut s = RoundRobin::new(100);
        let all = |_| true;
        let order: alloc::vec::Vec<_> = (0..6).map(|_| s.pick(3, all).unwrap()).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
        // Guest 1 blocked: 2, 0, 2, 0 ...
        let order: alloc::vec::Vec<_> = (0..4).map(|_| s.pick(3, |i| i != 1).unwrap()).collect();
        assert_eq!(order, [0, 2, 0, 2]);
        assert_eq!(s.pick(3, |_| false), None);
        assert_eq!(s.pick(0, all), None);
    }

    #[test]
    fn woken_guests_go_first_without_disturbing_the_rotation() {
        let mut s = RoundRobin::new(100);
        assert_eq!(s.pick(4, |i| i < 3), Some(0));
        // Guest 3 wakes up: it runs next, then the rotation continues with guest 1.
        assert_eq!(s.pick_urgent_first(4, |_| true, |i| i == 3), Some(3));
        assert_eq!(s.pick_urgent_first(4, |i| i < 3, |_| false), Some(1));
        assert_eq!(s.pick_urgent_first(4, |i| i < 3, |_| false), Some(2));
        // Guest 2 is interrupted by guest 3 waking: it gets the CPU back afterwards.
        s.interrupted();
        assert_eq!(s.pick_urgent_first(4, |_| true, |i| i == 3), Some(3));
        assert_eq!(s.pick_urgent_first(4, |i| i < 3, |_| false), Some(2));
        assert_eq!(s.pick_urgent_first(4, |i| i < 3, |_| false), Some(0));
    }

    #[test]
    fn a_lone_guest_keeps_running_without_switches() {
        let mut s = RoundRobin::new(100);
        for _ in 0..5 {
            assert_eq!(s.pick(4, |i| i == 2), Some(2));
        }
        assert_eq!(s.switches, 1);
    }

    /// A fake CPU that runs CPU-bound guests by the rules for `total` cycles: what share each gets.
    fn shares_of(shares: alloc::vec::Vec<Share>, total: u64) -> alloc::vec::Vec<f64> {
        let quantum = 1000;
        let n = shares.len();
        let mut rr = RoundRobin::new(quantum);
        let mut sh = Shares::new(quantum, shares);
        let (mut now, mut used) = (0u64, alloc::vec![0u64; n]);
        while now < total {
            sh.refill(now);
            match rr.pick(n, |i| sh.may_run(i)) {
                Some(i) => {
                    let ran = sh.slice(i).min(total - now);
                    sh.charge(i, ran);
                    used[i] += ran;
                    now += ran;
                }
                None => now = sh.period_end().min(total),
            }
        }
        used.iter()
            .map(|&u| u as f64 * 100.0 / total as f64)
            .collect()
    }

    fn share(weight: u32, cap: Option<u32>) -> Share {
        Share {
            weight,
            cap_percent: cap,
        }
    }

    #[test]
    fn weights_divide_the_cpu_in_proportion() {
        let got = shares_of(
            alloc::vec![share(1, None), share(2, None), share(1, None)],
            4_000_000,
        );
        for (g, want) in got.iter().zip([25.0, 50.0, 25.0]) {
            assert!((g - want).abs() < 0.5, "{got:?}");
        }
    }

    #[test]
    fn a_cap_holds_even_when_the_cpu_would_idle() {
        let got = shares_of(alloc::vec![share(1, Some(25))], 4_000_000);
        assert!((got[0] - 25.0).abs() < 0.5, "{got:?}");
        let got = shares_of(
            alloc::vec![share(1, Some(10)), share(1, None), share(1, None)],
            4_000_000,
        );
        for (g, want) in got.iter().zip([10.0, 45.0, 45.0]) {
            assert!((g - want).abs() < 0.5, "{got:?}");
        }
    }

    #[test]
    fn a_cap_above_the_fair_share_changes_nothing() {
        let got = shares_of(alloc::vec![share(1, Some(60)), share(1, None)], 4_000_000);
        assert!((got[0] - 50.0).abs() < 0.5, "{got:?}");
    }

    #[test]
    fn budgets_come_back_each_period() {
        let mut sh = Shares::new(100, alloc::vec![share(4, Some(30))]);
        assert_eq!(
            sh.slice(0),
            300,
            "the cap's 300 of the 1000-cycle period, not 4 quanta"
        );
        sh.charge(0, 300);
        assert!(!sh.may_run(0));
        assert_eq!(sh.period_end(), 1000);
        sh.refill(999);
        assert!(!sh.may_run(0));
        sh.refill(2500);
        assert!(sh.may_run(0));
        assert_eq!(sh.period_end(), 3000);
        // 40 cycles beyond the budget are owed in the next period.
        sh.charge(0, 340);
        sh.refill(3000);
        assert_eq!(sh.slice(0), 260);
    }

    fn candidate(vtime: u64, here: bool) -> Candidate {
        Candidate {
            vtime,
            here,
            left_at: 1,
            ..Candidate::default()
        }
    }

    #[test]
    fn the_least_virtual_time_goes_first_and_a_vcpu_near_it_keeps_its_cpu() {
        let pick = |c: &[Candidate], near| pick_fairest(c.iter().copied().enumerate(), near);
        assert_eq!(pick(&[], 10), None);
        // The least virtual time; within `near` of it, the one that last ran here.
        let c = [
            candidate(500, false),
            candidate(520, true),
            candidate(400, false),
        ];
        assert_eq!(pick(&c, 100), Some(2));
        assert_eq!(pick(&c, 120), Some(1));
        // A woken vCPU, then an interrupted one, go before any.
        let mut c = [
            candidate(900, false),
            candidate(800, false),
            candidate(100, true),
        ];
        c[1].interrupted = true;
        assert_eq!(pick(&c, 1000), Some(1));
        c[0].woken = true;
        assert_eq!(pick(&c, 1000), Some(0));
    }

    #[test]
    fn virtual_time_runs_slower_by_the_weight_and_a_lag_is_made_up_only_in_part() {
        assert_eq!(advance(1000, 600, 1), 1600);
        assert_eq!(advance(1000, 600, 3), 1200);
        assert_eq!(advance(1000, 600, 0), 1600, "weight 0 counts as 1");
        assert_eq!(catch_up(100, 5000, 300), 4700);
        assert_eq!(catch_up(4900, 5000, 300), 4900);
        assert_eq!(catch_up(0, 100, 300), 0);
    }

    #[test]
    fn a_cap_is_a_share_of_every_cpu_and_running_slices_hold_their_part() {
        // 10% of a 1000-cycle period on two CPUs: 200 cycles.
        let mut sh = Shares::new(100, alloc::vec![share(4, Some(10))]);
        sh.set_hosts(2);
        assert_eq!(sh.slice(0), 200);
        // One vCPU's slice holds 150 of them: another may start with the 50 left.
        sh.hold(0, 150);
        assert_eq!(sh.slice(0), 50);
        sh.hold(0, 50);
        assert!(!sh.may_run(0));
        // The first ran 100 and ended: what it did not run comes back.
        sh.charge(0, 100);
        sh.release(0, 150);
        assert_eq!(sh.slice(0), 50);
        sh.release(0, 50);
        assert_eq!(sh.slice(0), 100);
    }
}
