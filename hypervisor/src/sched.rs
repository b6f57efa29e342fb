//! The round-robin scheduler: which guest runs next on this CPU, and for how long.
//!
//! Pure bookkeeping over guest indices, so it is tested on the host; the run loop in `hypervisor`
//! asks it for the next runnable guest after each time slice.

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
        if let Some(i) = (0..n).find(|&i| runnable(i) && urgent(i)) {
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
}
