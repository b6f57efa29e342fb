//! The MC146818-compatible real-time clock and CMOS RAM (index port 0x70, data port 0x71, IRQ8).
//!
//! After the Motorola MC146818A and Dallas DS12887 datasheets: time and date registers 0x00-0x09
//! (with the alarm at 0x01/0x03/0x05), BCD or binary and 12- or 24-hour formats (register B DM
//! and 24/12 bits), register A (UIP, divider, periodic rate), B (SET, PIE, AIE, UIE, DM, 24/12,
//! DSE), C (IRQF, PF, AF, UF; read to clear) and D (VRT), 114 bytes of RAM, and the century byte at
//! 0x32 (the IBM PC convention the ACPI FADT points at). Bit 7 of the index port is the PC's NMI
//! mask, kept for [`Rtc::nmi_masked`].
//!
//! The clock is the guest's virtual time: Unix seconds at a base TSC, set with
//! [`Rtc::set_wall_clock`]. Register C's flags are computed when read or when an enabled one
//! may raise IRQ8; IRQF (and so IRQ8) is high while a flag and its enable are both set, as in the
//! datasheet, so a guest that never reads register C gets one interrupt. UIP reads 1 during the
//! last 244 us of each second. Not modelled: the divider-chain control bits of register A (stored
//! only), daylight saving (DSE), the square-wave output and the extended 256-byte bank.

use super::clock::{ClockRate, RTC_HZ};
use super::{ConsoleBuffer, Device, DeviceContext};
use crate::state::{self, Reader, StateError, Writer};

pub const RTC_INDEX: u16 = 0x70;
pub const RTC_DATA: u16 = 0x71;
pub const RTC_IRQ: u8 = 8;
/// The wall clock a new platform starts at: 2026-01-01 00:00:00 UTC.
pub const DEFAULT_EPOCH: u64 = 1_767_225_600;

const SECONDS: usize = 0x00;
const SECONDS_ALARM: usize = 0x01;
const MINUTES: usize = 0x02;
const MINUTES_ALARM: usize = 0x03;
const HOURS: usize = 0x04;
const HOURS_ALARM: usize = 0x05;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

const A_UIP: u8 = 1 << 7;
const B_SET: u8 = 1 << 7;
const B_PIE: u8 = 1 << 6;
const B_AIE: u8 = 1 << 5;
const B_UIE: u8 = 1 << 4;
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;
const C_IRQF: u8 = 1 << 7;
const C_PF: u8 = 1 << 6;
const C_AF: u8 = 1 << 5;
const C_UF: u8 = 1 << 4;
const D_VRT: u8 = 1 << 7;

/// RTC ticks per second and per UIP window (244 us = 8 ticks of 32.768 kHz).
const SECOND: u64 = RTC_HZ;
const UIP_TICKS: u64 = 8;
const DAY_SECONDS: u64 = 86_400;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 0 = Sunday.
    pub weekday: u8,
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), by 400-year eras.
fn civil_from_days(days: u64) -> (u32, u8, u8) {
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of each year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153; // month from March = 0
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year as u32, month, day)
}

/// The inverse of [`civil_from_days`]; dates before 1970 give 0.
fn days_from_civil(year: u32, month: u8, day: u8) -> u64 {
    let month = u64::from(month.clamp(1, 12));
    let year = u64::from(year) - u64::from(month <= 2);
    let era = year / 400;
    let year_of_era = year % 400;
    let mp = (month + 9) % 12;
    let day_of_year = (153 * mp + 2) / 5 + u64::from(day.max(1)) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}

impl DateTime {
    pub fn from_unix(seconds: u64) -> Self {
        let days = seconds / DAY_SECONDS;
        let rest = seconds % DAY_SECONDS;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rest / 3600) as u8,
            minute: (rest / 60 % 60) as u8,
            second: (rest % 60) as u8,
            weekday: ((days + 4) % 7) as u8, // 1970-01-01 was a Thursday
        }
    }

    pub fn to_unix(&self) -> u64 {
        days_from_civil(self.year, self.month, self.day) * DAY_SECONDS
            + u64::from(self.hour.min(23)) * 3600
            + u64::from(self.minute.min(59)) * 60
            + u64::from(self.second.min(59))
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).saturating_mul(10).saturating_add(v & 0x0f)
}

#[derive(Debug, Clone)]
pub struct Rtc {
    clock: ClockRate,
    index: u8,
    nmi_masked: bool,
    cmos: [u8; 128],
    /// Unix seconds at RTC tick `base_tick` (the start of a second).
    base_seconds: u64,
    base_tick: u64,
    /// RTC tick up to which the flags in register C are up to date.
    evaluated: u64,
    irq_level: bool,
}

impl Rtc {
    /// An access to the index port: the register number and the NMI mask (bit 7), written, and
    /// an open read (the port is write-only). None, with nothing done, for the data port.
    fn index_access(&mut self, port: u16, write: Option<u8>) -> Option<u8> {
        if port == RTC_DATA {
            return None;
        }
        match write {
            Some(value) => {
                self.index = value & 0x7f;
                self.nmi_masked = value & 0x80 != 0;
                Some(0)
            }
            None => Some(0xff),
        }
    }

    /// An RTC at [`DEFAULT_EPOCH`] at TSC 0: 24-hour BCD, no interrupts, 1024 Hz periodic rate
    /// selected (register A 0x26, as PC firmware leaves it).
    pub fn new(tsc_hz: u64) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26;
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        Rtc {
            clock: ClockRate::new(RTC_HZ, tsc_hz),
            index: 0,
            nmi_masked: false,
            cmos,
            base_seconds: DEFAULT_EPOCH,
            base_tick: 0,
            evaluated: 0,
            irq_level: false,
        }
    }

    /// Sets the clock to `unix_seconds` at guest TSC `now`.
    pub fn set_wall_clock(&mut self, unix_seconds: u64, now: u64) {
        let t = self.clock.ticks_at(now);
        self.base_seconds = unix_seconds;
        self.base_tick = t;
        self.evaluated = t;
    }

    /// The clock's Unix time at TSC `now`.
    pub fn unix_time(&self, now: u64) -> u64 {
        self.seconds_at(self.clock.ticks_at(now))
    }

    /// Bit 7 of the last index written to port 0x70.
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    /// CMOS RAM byte `index` as stored (0x0e-0x7f are the battery-backed RAM that outlives a
    /// reset; 0x00-0x0d are the clock's registers, read through the ports).
    pub fn cmos(&self, index: u8) -> u8 {
        self.cmos.get(usize::from(index)).copied().unwrap_or(0xff)
    }

    /// A CMOS RAM byte (for the loader: memory sizes and the like).
    pub fn set_cmos(&mut self, index: u8, value: u8) {
        if let Some(b) = self
            .cmos
            .get_mut(usize::from(index))
            .filter(|_| index > 0x0d)
        {
            *b = value;
        }
    }

    fn seconds_at(&self, t: u64) -> u64 {
        self.base_seconds + t.saturating_sub(self.base_tick) / SECOND
    }

    fn setting(&self) -> bool {
        self.cmos[REG_B] & B_SET != 0
    }

    /// Periodic interrupt period in RTC ticks (register A rate select), if any.
    fn period(&self) -> Option<u64> {
        match self.cmos[REG_A] & 0x0f {
            0 => None,
            1 => Some(128), // 256 Hz, same as rate 8
            2 => Some(256), // 128 Hz, same as rate 9
            rate => Some(1 << (rate - 1)),
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    /// Writes the time at `seconds` into the clock registers, in the current format.
    fn store_time(&mut self, seconds: u64) {
        let dt = DateTime::from_unix(seconds);
        self.cmos[SECONDS] = self.encode(dt.second);
        self.cmos[MINUTES] = self.encode(dt.minute);
        self.cmos[HOURS] = self.encode_hour(dt.hour);
        self.cmos[WEEKDAY] = self.encode(dt.weekday + 1);
        self.cmos[DAY] = self.encode(dt.day);
        self.cmos[MONTH] = self.encode(dt.month);
        self.cmos[YEAR] = self.encode((dt.year % 100) as u8);
        self.cmos[CENTURY] = self.encode((dt.year / 100) as u8);
    }

    /// The time the clock registers hold (after the guest set them).
    fn stored_time(&self) -> u64 {
        let century = match self.decode(self.cmos[CENTURY]) {
            c @ 19..=99 => u32::from(c),
            _ => 20,
        };
        DateTime {
            year: century * 100 + u32::from(self.decode(self.cmos[YEAR]) % 100),
            month: self.decode(self.cmos[MONTH]),
            day: self.decode(self.cmos[DAY]),
            hour: self.decode_hour(self.cmos[HOURS]),
            minute: self.decode(self.cmos[MINUTES]),
            second: self.decode(self.cmos[SECONDS]),
            weekday: 0,
        }
        .to_unix()
    }

    /// Does the time `seconds` match the alarm (0xC0-0xFF in a field means "any")?
    fn alarm_matches(&self, seconds: u64) -> bool {
        let dt = DateTime::from_unix(seconds);
        let field = |alarm: u8, now: u8| alarm >= 0xc0 || alarm == now;
        field(self.cmos[SECONDS_ALARM], self.encode(dt.second))
            && field(self.cmos[MINUTES_ALARM], self.encode(dt.minute))
            && field(self.cmos[HOURS_ALARM], self.encode_hour(dt.hour))
    }

    /// How many multiples of `period` past the base fall in (a, b].
    fn events_between(&self, a: u64, b: u64, period: u64) -> u64 {
        let since = |t: u64| t.saturating_sub(self.base_tick) / period;
        since(b) - since(a)
    }

    /// Brings register C up to RTC tick `t` and drives IRQ8 from it.
    fn update(&mut self, t: u64, cx: &mut DeviceContext<'_>) {
        let a = self.evaluated;
        if t > a {
            self.evaluated = t;
            let mut flags = 0;
            let periodic = self.period().map_or(0, |p| self.events_between(a, t, p));
            if periodic > 0 {
                flags |= C_PF;
            }
            if !self.setting() {
                let updates = self.events_between(a, t, SECOND);
                if updates > 0 {
                    flags |= C_UF;
                    // Each update ends a second; look at the last day of them for an alarm.
                    let last = self.seconds_at(t);
                    let first = last + 1 - updates.min(DAY_SECONDS);
                    if (first..=last).any(|s| self.alarm_matches(s)) {
                        flags |= C_AF;
                    }
                }
            }
            if self.cmos[REG_B] & B_PIE != 0 && periodic > 0 {
                // Ticks that found IRQ8 still up, or that fell due together, merge into one.
                let merged = if self.irq_level {
                    periodic
                } else {
                    periodic - 1
                };
                cx.ticks_coalesced(RTC_IRQ, merged);
            }
            self.cmos[REG_C] |= flags;
        }
        self.sync_irq(cx);
    }

    /// IRQF = PF.PIE + AF.AIE + UF.UIE; IRQ8 follows it.
    fn sync_irq(&mut self, cx: &mut DeviceContext<'_>) {
        let enables = self.cmos[REG_B] & (B_PIE | B_AIE | B_UIE);
        let irqf = self.cmos[REG_C] & enables & (C_PF | C_AF | C_UF) != 0;
        if irqf != self.irq_level {
            self.irq_level = irqf;
            cx.set_irq(RTC_IRQ, irqf);
        }
    }

    fn read_data(&mut self, t: u64, cx: &mut DeviceContext<'_>) -> u8 {
        let index = usize::from(self.index);
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                if !self.setting() {
                    self.store_time(self.seconds_at(t));
                }
                self.cmos[index]
            }
            REG_A => {
                let in_second = t.saturating_sub(self.base_tick) % SECOND;
                let uip = !self.setting() && in_second >= SECOND - UIP_TICKS;
                self.cmos[REG_A] | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                self.update(t, cx);
                let irqf = if self.irq_level { C_IRQF } else { 0 };
                let value = self.cmos[REG_C] | irqf;
                self.cmos[REG_C] = 0;
                self.sync_irq(cx);
                value
            }
            _ => self.cmos.get(index).copied().unwrap_or(0xff),
        }
    }

    fn write_data(&mut self, value: u8, t: u64, cx: &mut DeviceContext<'_>) {
        // Flags up to now are judged under the settings being replaced.
        self.update(t, cx);
        let index = usize::from(self.index);
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => {
                if self.setting() {
                    self.cmos[index] = value;
                } else {
                    // Setting a field of a running clock: the others keep the current time.
                    self.store_time(self.seconds_at(t));
                    self.cmos[index] = value;
                    let phase = t.saturating_sub(self.base_tick) % SECOND;
                    self.base_seconds = self.stored_time();
                    self.base_tick = t - phase;
                }
            }
            REG_A => self.cmos[REG_A] = value & 0x7f,
            REG_B => {
                let was_setting = self.setting();
                let mut value = value;
                if value & B_SET != 0 {
                    // SET stops updates and clears UIE (DS12887).
                    value &= !B_UIE;
                    if !was_setting {
                        self.store_time(self.seconds_at(t));
                    }
                }
                self.cmos[REG_B] = value;
                if was_setting && !self.setting() {
                    self.base_seconds = self.stored_time();
                    self.base_tick = t;
                }
                self.sync_irq(cx);
            }
            REG_C | REG_D => {} // read-only
            _ => {
                if let Some(b) = self.cmos.get_mut(index) {
                    *b = value;
                }
            }
        }
    }

    /// The next RTC tick at which an enabled flag can rise.
    fn next_event(&self) -> Option<u64> {
        if self.irq_level {
            return None; // IRQ8 stays up until register C is read
        }
        let b = self.cmos[REG_B];
        let next_multiple = |p: u64| {
            let since = self.evaluated.saturating_sub(self.base_tick) / p;
            self.base_tick + (since + 1) * p
        };
        let periodic = self.period().filter(|_| b & B_PIE != 0).map(next_multiple);
        let update = (b & (B_UIE | B_AIE) != 0 && !self.setting()).then(|| next_multiple(SECOND));
        periodic.into_iter().chain(update).min()
    }
}

crate::codec_struct!(Rtc {
    clock,
    index,
    nmi_masked,
    cmos,
    base_seconds,
    base_tick,
    evaluated,
    irq_level,
});

/// Seconds since 1970 a restored clock may hold (2^40: 34,000 years), and RTC ticks of the
/// guest's clock (2^56): beyond any real run, far from overflowing the clock's sums.
const STATE_SECONDS_MAX: u64 = 1 << 40;
const STATE_TICKS_MAX: u64 = 1 << 56;

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"RTC0";
const STATE_VERSION: u16 = 1;

impl Device for Rtc {
    fn name(&self) -> &'static str {
        "rtc-cmos"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        let clock = self.clock;
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if v.clock != clock {
                return Err("the RTC's clock differs from this machine's");
            }
            if v.index > 0x7f {
                return Err("a CMOS index above 0x7f");
            }
            if v.base_seconds > STATE_SECONDS_MAX
                || v.base_tick > STATE_TICKS_MAX
                || v.evaluated > STATE_TICKS_MAX
            {
                return Err("an RTC time beyond what Keel keeps");
            }
            Ok(())
        })
    }

    fn io_read(&mut self, port: u16, _size: u8, cx: &mut DeviceContext<'_>) -> u32 {
        if let Some(value) = self.index_access(port, None) {
            return u32::from(value);
        }
        let t = self.clock.ticks_at(cx.now());
        u32::from(self.read_data(t, cx))
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        let value = value as u8;
        if self.index_access(port, Some(value)).is_none() {
            let t = self.clock.ticks_at(cx.now());
            self.write_data(value, t, cx);
        }
    }

    /// The index port ([`Rtc::index_access`]). The data port needs the time.
    fn io_quiet(
        &mut self,
        port: u16,
        write: Option<u8>,
        _console: &mut ConsoleBuffer,
    ) -> Option<u8> {
        self.index_access(port, write)
    }

    fn advance(&mut self, cx: &mut DeviceContext<'_>) {
        let t = self.clock.ticks_at(cx.now());
        self.update(t, cx);
    }

    fn next_deadline(&self) -> Option<u64> {
        Some(self.clock.tsc_at(self.next_event()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    /// One TSC tick per RTC tick.
    const TSC_HZ: u64 = RTC_HZ;

    struct Rig {
        rtc: Rtc,
        bench: Bench,
    }

    impl Rig {
        fn new() -> Self {
            Rig {
                rtc: Rtc::new(TSC_HZ),
                bench: Bench::default(),
            }
        }
        fn read(&mut self, reg: usize, now: u64) -> u8 {
            let mut cx = self.bench.cx(now);
            self.rtc.io_write(RTC_INDEX, 1, reg as u32, &mut cx);
            self.rtc.io_read(RTC_DATA, 1, &mut cx) as u8
        }
        fn write(&mut self, reg: usize, value: u8, now: u64) {
            let mut cx = self.bench.cx(now);
            self.rtc.io_write(RTC_INDEX, 1, reg as u32, &mut cx);
            self.rtc.io_write(RTC_DATA, 1, u32::from(value), &mut cx);
        }
        fn advance(&mut self, now: u64) {
            let mut cx = self.bench.cx(now);
            self.rtc.advance(&mut cx);
        }
        fn irq(&self) -> bool {
            self.bench.lines.levels[usize::from(RTC_IRQ)]
        }
    }

    #[test]
    fn calendar_conversions() {
        let dt = DateTime::from_unix(DEFAULT_EPOCH);
        assert_eq!((dt.year, dt.month, dt.day, dt.weekday), (2026, 1, 1, 4));
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let leap = DateTime::from_unix(1_709_210_096);
        assert_eq!((leap.year, leap.month, leap.day), (2024, 2, 29));
        assert_eq!(
            (leap.hour, leap.minute, leap.second, leap.weekday),
            (12, 34, 56, 4)
        );
        assert_eq!(leap.to_unix(), 1_709_210_096);
        assert_eq!(DateTime::from_unix(0).to_unix(), 0);
        for days in [0u64, 59, 365, 10_957, 11_016, 47_482, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn reads_the_time_in_bcd_and_binary() {
        let mut r = Rig::new();
        r.rtc.set_wall_clock(1_709_210_096, 0);
        assert_eq!(r.read(SECONDS, 0), 0x56);
        assert_eq!(r.read(MINUTES, 0), 0x34);
        assert_eq!(r.read(HOURS, 0), 0x12);
        assert_eq!(r.read(WEEKDAY, 0), 5);
        assert_eq!(r.read(DAY, 0), 0x29);
        assert_eq!(r.read(MONTH, 0), 0x02);
        assert_eq!(r.read(YEAR, 0), 0x24);
        assert_eq!(r.read(CENTURY, 0), 0x20);
        assert_eq!(r.read(SECONDS, 5 * SECOND + 10), 0x01, "time advances");
        r.write(REG_B, B_24H | B_BINARY, 5 * SECOND);
        assert_eq!(r.read(SECONDS, 5 * SECOND), 1);
        assert_eq!(r.read(YEAR, 5 * SECOND), 24);
        // 12-hour mode: 12:35 is 12 PM.
        r.write(REG_B, B_BINARY, 60 * SECOND);
        assert_eq!(r.read(HOURS, 60 * SECOND), 0x80 | 12);
        assert_eq!(r.read(REG_D, 0), D_VRT);
    }

    #[test]
    fn set_mode_freezes_and_sets_the_clock() {
        let mut r = Rig::new();
        r.write(REG_B, B_SET | B_24H | B_UIE, 0);
        assert_eq!(r.read(REG_B, 0), B_SET | B_24H, "SET clears UIE");
        // 1999-12-31 23:59:58 in BCD.
        for (reg, v) in [(SECONDS, 0x58), (MINUTES, 0x59), (HOURS, 0x23), (DAY, 0x31)] {
            r.write(reg, v, 0);
        }
        for (reg, v) in [(MONTH, 0x12), (YEAR, 0x99), (CENTURY, 0x19)] {
            r.write(reg, v, 0);
        }
        assert_eq!(r.read(SECONDS, 10 * SECOND), 0x58, "frozen while SET");
        r.write(REG_B, B_24H, 10 * SECOND);
        assert_eq!(r.rtc.unix_time(10 * SECOND), 946_684_798);
        assert_eq!(r.read(SECONDS, 12 * SECOND), 0x00);
        assert_eq!(r.read(YEAR, 12 * SECOND), 0x00);
        assert_eq!(r.read(CENTURY, 12 * SECOND), 0x20);
    }

    #[test]
    fn writing_one_field_of_a_running_clock() {
        let mut r = Rig::new();
        r.write(MINUTES, 0x30, SECOND / 2);
        assert_eq!(r.rtc.unix_time(SECOND / 2), DEFAULT_EPOCH + 30 * 60);
        assert_eq!(
            r.rtc.unix_time(SECOND),
            DEFAULT_EPOCH + 30 * 60 + 1,
            "phase kept"
        );
    }

    #[test]
    fn uip_is_set_just_before_each_update() {
        let mut r = Rig::new();
        assert_eq!(r.read(REG_A, 0), 0x26);
        assert_eq!(r.read(REG_A, SECOND - UIP_TICKS - 1) & A_UIP, 0);
        assert_eq!(r.read(REG_A, SECOND - UIP_TICKS) & A_UIP, A_UIP);
        assert_eq!(r.read(REG_A, SECOND) & A_UIP, 0);
    }

    #[test]
    fn periodic_interrupt_needs_register_c_reads() {
        let mut r = Rig::new();
        r.write(REG_A, 0x26, 0); // 1024 Hz: every 32 ticks
        r.write(REG_B, B_24H | B_PIE, 0);
        assert_eq!(r.rtc.next_deadline(), Some(32));
        r.advance(32);
        assert!(r.irq());
        assert_eq!(r.rtc.next_deadline(), None, "IRQ8 stays up until C is read");
        r.advance(100);
        assert_eq!(r.read(REG_C, 100), C_IRQF | C_PF);
        assert!(!r.irq());
        assert_eq!(r.bench.lines.coalesced[8], 2, "ticks at 64 and 96 merged");
        assert_eq!(r.read(REG_C, 100), 0);
        assert_eq!(r.rtc.next_deadline(), Some(128));
        // Without PIE, PF is still set but no interrupt.
        r.write(REG_B, B_24H, 100);
        r.advance(200);
        assert!(!r.irq());
        assert_eq!(r.read(REG_C, 200), C_PF);
        assert_eq!(r.bench.lines.edges[8], 1);
    }

    #[test]
    fn enabling_pie_with_pf_set_raises_irq8() {
        let mut r = Rig::new();
        r.write(REG_B, B_24H, 0);
        r.write(REG_B, B_24H | B_PIE, 50); // PF from the tick at 32 is pending
        assert!(r.irq());
        r.write(REG_B, B_24H, 51);
        assert!(!r.irq(), "IRQF follows the enables");
    }

    #[test]
    fn update_and_alarm_interrupts() {
        let mut r = Rig::new();
        r.write(REG_A, 0x20, 0); // no periodic interrupt
        r.write(SECONDS_ALARM, 0x03, 0);
        r.write(MINUTES_ALARM, 0xc0, 0);
        r.write(HOURS_ALARM, 0xff, 0);
        r.write(REG_B, B_24H | B_UIE, 0);
        assert_eq!(r.rtc.next_deadline(), Some(SECOND));
        r.advance(SECOND);
        assert!(r.irq());
        assert_eq!(r.read(REG_C, SECOND), C_IRQF | C_UF);
        r.write(REG_B, B_24H | B_AIE, SECOND);
        r.advance(2 * SECOND);
        assert!(!r.irq(), "00:00:02 is not the alarm");
        r.read(REG_C, 2 * SECOND);
        r.advance(3 * SECOND);
        assert!(r.irq());
        assert_eq!(r.read(REG_C, 3 * SECOND), C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn nmi_mask_and_cmos_ram() {
        let mut r = Rig::new();
        let mut cx = r.bench.cx(0);
        r.rtc.io_write(RTC_INDEX, 1, 0x8f, &mut cx);
        assert!(r.rtc.nmi_masked());
        r.rtc.io_write(RTC_DATA, 1, 0x5a, &mut cx);
        assert_eq!(r.rtc.io_read(RTC_INDEX, 1, &mut cx), 0xff);
        r.rtc.io_write(RTC_INDEX, 1, 0x0f, &mut cx);
        assert!(!r.rtc.nmi_masked());
        assert_eq!(r.rtc.io_read(RTC_DATA, 1, &mut cx), 0x5a);
        r.rtc.set_cmos(0x34, 0x12);
        r.rtc.set_cmos(0x0c, 0xff); // not RAM: ignored
        assert_eq!(r.read(0x34, 0), 0x12);
        r.write(REG_D, 0, 0);
        assert_eq!(r.read(REG_D, 0), D_VRT);
    }
}
