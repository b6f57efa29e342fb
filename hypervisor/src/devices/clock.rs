//! Device clocks on the guest's virtual time.
//!
//! Every model runs on one time base, the guest's TSC (`now`). A device whose input clock has
//! another rate (the 8254's 1.193182 MHz, the RTC's 32.768 kHz, the LAPIC timer's bus clock) sees
//! that clock as `ClockRate::ticks_at(now)`: the number of its own ticks since TSC 0, computed
//! exactly in 128-bit arithmetic, so a device never drifts against the TSC however long it runs.

/// The 8254 PIT's input clock (IBM PC: 14.31818 MHz / 12).
pub const PIT_HZ: u64 = 1_193_182;
/// The MC146818 RTC's time base (a 32.768 kHz crystal, divider chain setting 010).
pub const RTC_HZ: u64 = 32_768;
/// The local APIC timer's input clock (the "bus clock" the divide configuration divides).
///
/// Keel fixes it at 1 GHz, as KVM does, rather than tying it to the host's TSC: a guest's timer
/// arithmetic then does not depend on the machine it runs on. CPUID leaf 0x15 reports this as the
/// core crystal clock (ECX), which is how Linux learns the timer rate without calibrating it.
pub const LAPIC_TIMER_HZ: u64 = 1_000_000_000;

/// The LAPIC timer's input clock in Hz, for CPUID leaf 0x15/0x16.
pub const fn lapic_timer_hz() -> u64 {
    LAPIC_TIMER_HZ
}

/// Converts between TSC ticks and the ticks of a device clock of `hz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockRate {
    hz: u64,
    tsc_hz: u64,
}

impl ClockRate {
    /// A clock of `hz` against a TSC of `tsc_hz` (a zero rate is taken as 1 Hz).
    pub const fn new(hz: u64, tsc_hz: u64) -> Self {
        ClockRate {
            hz: if hz == 0 { 1 } else { hz },
            tsc_hz: if tsc_hz == 0 { 1 } else { tsc_hz },
        }
    }

    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// Whole device ticks elapsed from TSC 0 to TSC `tsc`.
    pub fn ticks_at(&self, tsc: u64) -> u64 {
        let t = u128::from(tsc) * u128::from(self.hz) / u128::from(self.tsc_hz);
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// The first TSC value at which `ticks_at` reaches `ticks` (saturating at `u64::MAX`).
    pub fn tsc_at(&self, ticks: u64) -> u64 {
        let t = (u128::from(ticks) * u128::from(self.tsc_hz)).div_ceil(u128::from(self.hz));
        u64::try_from(t).unwrap_or(u64::MAX)
    }
}

crate::codec_struct!(ClockRate { hz, tsc_hz });

/// When a timer fires next, in ticks of its own clock: once, or every `period` ticks.
///
/// [`Schedule::fire`] implements the coalescing policy shared by all the timers: however many
/// firings fell due since the last call, the device raises one interrupt, and the others are
/// returned as `missed` so the device can count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    next: u64,
    period: u64,
}

impl Schedule {
    /// Fires once at tick `at`.
    pub fn once(at: u64) -> Self {
        Schedule {
            next: at,
            period: 0,
        }
    }

    /// Fires at `first`, `first + period`, ... (a zero period is taken as 1).
    pub fn periodic(first: u64, period: u64) -> Self {
        Schedule {
            next: first,
            period: period.max(1),
        }
    }

    /// The tick of the next firing, if any is left.
    pub fn next(&self) -> Option<u64> {
        (self.next != u64::MAX).then_some(self.next)
    }

    /// If a firing is due at tick `now`, consumes every due firing and returns how many beyond
    /// the first were missed; None if nothing is due. A one-shot schedule fires once only.
    pub fn fire(&mut self, now: u64) -> Option<u64> {
        if self.next == u64::MAX || now < self.next {
            return None;
        }
        if self.period == 0 {
            self.next = u64::MAX;
            return Some(0);
        }
        let missed = (now - self.next) / self.period;
        self.next = self
            .next
            .saturating_add(self.period.saturating_mul(missed + 1));
        Some(missed)
    }
}

crate::codec_struct!(Schedule { next, period });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_is_exact_and_monotonic() {
        let pit = ClockRate::new(PIT_HZ, 3_000_000_000);
        assert_eq!(pit.ticks_at(3_000_000_000), PIT_HZ);
        assert_eq!(pit.ticks_at(0), 0);
        for ticks in [1u64, 2, 11_931, 1_193_182, 1 << 40] {
            let t = pit.tsc_at(ticks);
            assert_eq!(pit.ticks_at(t), ticks);
            assert_eq!(pit.ticks_at(t - 1), ticks - 1);
        }
        // A clock faster than the TSC.
        let lapic = ClockRate::new(LAPIC_TIMER_HZ, 10_000_000);
        assert_eq!(lapic.ticks_at(1), 100);
        assert_eq!(lapic.tsc_at(150), 2);
        assert_eq!(lapic.tsc_at(u64::MAX), u64::MAX / 100 + 1);
    }

    #[test]
    fn zero_rates_do_not_divide_by_zero() {
        let c = ClockRate::new(0, 0);
        assert_eq!(c.ticks_at(5), 5);
        assert_eq!(c.tsc_at(5), 5);
    }

    #[test]
    fn one_shot_fires_once() {
        let mut s = Schedule::once(10);
        assert_eq!(s.next(), Some(10));
        assert_eq!(s.fire(9), None);
        assert_eq!(s.fire(50), Some(0));
        assert_eq!(s.next(), None);
        assert_eq!(s.fire(100), None);
    }

    #[test]
    fn periodic_coalesces_missed_ticks() {
        let mut s = Schedule::periodic(10, 10);
        assert_eq!(s.fire(10), Some(0));
        assert_eq!(s.next(), Some(20));
        assert_eq!(s.fire(19), None);
        // 20, 30, 40 and 50 fall due together: one fires, three are missed.
        assert_eq!(s.fire(55), Some(3));
        assert_eq!(s.next(), Some(60));
    }
}
