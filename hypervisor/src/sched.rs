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
}

impl RoundRobin {
    pub fn new(quantum: u64) -> Self {
        Self {
            last: None,
            quantum,
            switches: 0,
        }
    }

    /// The next runnable guest after the one that ran last, wrapping around; the same guest again
    /// only if no other is runnable.
    pub fn pick(&mut self, n: usize, runnable: impl Fn(usize) -> bool) -> Option<usize> {
        if n == 0 {
            return None;
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
    fn a_lone_guest_keeps_running_without_switches() {
        let mut s = RoundRobin::new(100);
        for _ in 0..5 {
            assert_eq!(s.pick(4, |i| i == 2), Some(2));
        }
        assert_eq!(s.switches, 1);
    }
}
