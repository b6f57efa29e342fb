//! The 8254 programmable interval timer (ports 0x40-0x43) and the PC's port 0x61.
//!
//! After the Intel 8254 datasheet (order no. 231164): three 16-bit down counters on a 1.193182 MHz
//! clock; access modes LSB, MSB and LSB-then-MSB; the counter latch command and the read-back
//! command (status and count); binary or BCD counting; modes 0-5. Channel 0 drives IRQ0;
//! channel 2's gate is port 0x61 bit 0 and its OUT shows at port 0x61 bit 5, which is how Linux
//! and most firmware calibrate the TSC. Channel 1 (DRAM refresh, historically) counts but drives
//! nothing.
//!
//! Counters are not stepped: each one remembers the PIT tick at which it started counting and
//! computes its value and OUT from the guest's current time on every read. Simplifications:
//! - The one-clock delay between writing a count and the counter loading it is not modelled
//!   (the count starts at the write).
//! - A new count written in mode 2 or 3 while counting restarts the period at once (the datasheet
//!   loads it at the end of the current period); Linux always writes a control word first.
//! - Mode 3 with an odd count splits the period into (N+1)/2 clocks high and (N-1)/2 low and
//!   counts down by two in each half; the exact odd-count sequence of the datasheet is not kept.
//! - Channel 0's OUT reaches IRQ0 as one pulse per rising edge (see docs/DEVICES.md for the
//!   coalescing of missed edges).

use super::clock::{ClockRate, Schedule, PIT_HZ};
use super::{Device, DeviceContext};
use crate::state::{self, Codec, Reader, StateError, Writer};

pub const CHANNEL0: u16 = 0x40;
pub const CHANNEL2: u16 = 0x42;
pub const CONTROL: u16 = 0x43;
/// NMI status and control / speaker port (PIIX4 datasheet 12.7.1).
pub const PORT_61: u16 = 0x61;
pub const PIT_IRQ: u8 = 0;

/// Port 0x61 bits.
const P61_GATE2: u8 = 1 << 0;
const P61_WRITABLE: u8 = 0x0f;
const P61_REFRESH: u8 = 1 << 4;
const P61_OUT2: u8 = 1 << 5;
/// The refresh request bit toggles every 15.085 us, about 18 PIT clocks.
const REFRESH_TICKS: u64 = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Lsb,
    Msb,
    LsbMsb,
}

impl Access {
    fn from_bits(rw: u8) -> Access {
        match rw {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::LsbMsb,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::LsbMsb => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// No count written since the control word.
    Idle,
    /// Counting since PIT tick `start`.
    Counting { start: u64 },
    /// Count loaded, counting held after `elapsed` ticks (gate low).
    Held { elapsed: u64 },
    /// Modes 1 and 5: count loaded, waiting for a rising edge on the gate.
    AwaitTrigger,
}

#[derive(Debug, Clone)]
struct Channel {
    /// Mode 0-5 (control word values 6 and 7 are modes 2 and 3).
    mode: u8,
    /// The mode bits as written, for the read-back status.
    mode_bits: u8,
    access: Access,
    bcd: bool,
    /// The count in clocks, 1..=65536 (a written 0 means 65536, or 10000 in BCD).
    reload: u64,
    run: Run,
    gate: bool,
    /// LSB-then-MSB write: the LSB already written.
    pending_lsb: Option<u8>,
    /// LSB-then-MSB read of the live count: the MSB comes next.
    read_msb_next: bool,
    /// A latched count and whether its MSB is the next byte.
    latched_count: Option<(u16, bool)>,
    latched_status: Option<u8>,
    /// Status bit 6: a count was written but not yet loaded into the counter.
    null_count: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            mode_bits: 0,
            access: Access::LsbMsb,
            bcd: false,
            reload: 0x1_0000,
            run: Run::Idle,
            gate,
            pending_lsb: None,
            read_msb_next: false,
            latched_count: None,
            latched_status: None,
            null_count: true,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// Ticks the counter has counted at PIT tick `t`, if it is counting at all.
    fn elapsed(&self, t: u64) -> Option<u64> {
        match self.run {
            Run::Counting { start } => Some(t.saturating_sub(start)),
            Run::Held { elapsed } => Some(elapsed),
            Run::Idle | Run::AwaitTrigger => None,
        }
    }

    /// The counting element and OUT at PIT tick `t`.
    fn state_at(&self, t: u64) -> (u64, bool) {
        let n = self.reload;
        let Some(e) = self.elapsed(t) else {
            // Before counting starts OUT is low in mode 0 and high in every other mode.
            return (n % self.modulus(), self.mode != 0);
        };
        let held_high = matches!(self.run, Run::Held { .. }) && matches!(self.mode, 2 | 3);
        let wrap = |v: i128| v.rem_euclid(i128::from(self.modulus())) as u64;
        let (count, out) = match self.mode {
            0 | 1 => (wrap(i128::from(n) - i128::from(e)), e >= n),
            4 | 5 => (wrap(i128::from(n) - i128::from(e)), e != n),
            2 => {
                let p = e % n;
                (n - p, p + 1 != n)
            }
            _ => {
                let high = n.div_ceil(2);
                let p = e % n;
                if p < high {
                    (n - 2 * p, true)
                } else {
                    (n - 2 * (p - high), false)
                }
            }
        };
        (count % self.modulus(), out || held_high)
    }

    fn count_register(&self, t: u64) -> u16 {
        let count = self.state_at(t).0;
        if self.bcd {
            to_bcd(count)
        } else {
            count as u16
        }
    }

    fn status(&self, t: u64) -> u8 {
        let out = if self.state_at(t).1 { 0x80 } else { 0 };
        let null = if self.null_count { 0x40 } else { 0 };
        out | null | (self.access.bits() << 4) | (self.mode_bits << 1) | u8::from(self.bcd)
    }

    fn control_word(&mut self, rw: u8, mode_bits: u8, bcd: bool) {
        self.access = Access::from_bits(rw);
        self.mode_bits = mode_bits;
        self.mode = if mode_bits >= 6 {
            mode_bits - 4
        } else {
            mode_bits
        };
        self.bcd = bcd;
        self.run = Run::Idle;
        self.pending_lsb = None;
        self.read_msb_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.null_count = true;
    }

    fn latch_count(&mut self, t: u64) {
        // A second latch command before the first is read is ignored.
        if self.latched_count.is_none() {
            self.latched_count = Some((self.count_register(t), false));
        }
    }

    fn latch_status(&mut self, t: u64) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(t));
        }
    }

    fn read(&mut self, t: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        let [lsb, msb] = match self.latched_count {
            Some((count, _)) => count.to_le_bytes(),
            None => self.count_register(t).to_le_bytes(),
        };
        let msb_next = match self.latched_count {
            Some((_, msb_next)) => msb_next,
            None => self.read_msb_next,
        };
        let (byte, done) = match self.access {
            Access::Lsb => (lsb, true),
            Access::Msb => (msb, true),
            Access::LsbMsb if msb_next => (msb, true),
            Access::LsbMsb => (lsb, false),
        };
        match self.latched_count {
            Some(_) if done => self.latched_count = None,
            Some((count, _)) => self.latched_count = Some((count, true)),
            None => self.read_msb_next = self.access == Access::LsbMsb && !done,
        }
        byte
    }

    /// A data-port write; returns true when a complete count was loaded.
    fn write(&mut self, value: u8, t: u64) -> bool {
        let raw = match (self.access, self.pending_lsb) {
            (Access::Lsb, _) => u16::from(value),
            (Access::Msb, _) => u16::from(value) << 8,
            (Access::LsbMsb, None) => {
                self.pending_lsb = Some(value);
                if self.mode == 0 {
                    // Mode 0: writing the first byte stops the count (datasheet, mode 0).
                    self.run = Run::Idle;
                }
                return false;
            }
            (Access::LsbMsb, Some(lsb)) => u16::from_le_bytes([lsb, value]),
        };
        self.pending_lsb = None;
        let count = if self.bcd {
            from_bcd(raw)
        } else {
            u64::from(raw)
        };
        self.reload = if count == 0 { self.modulus() } else { count };
        self.null_count = false;
        self.run = match self.mode {
            1 | 5 => Run::AwaitTrigger,
            _ if self.gate => Run::Counting { start: t },
            _ => Run::Held { elapsed: 0 },
        };
        true
    }

    fn set_gate(&mut self, gate: bool, t: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        self.run = match (self.run, self.mode, gate) {
            (Run::Idle, _, _) => Run::Idle,
            // Rising edge: modes 1, 2, 3 and 5 (re)start from the full count.
            (_, 1 | 2 | 3 | 5, true) => Run::Counting { start: t },
            // Modes 0 and 4 resume where they stopped.
            (Run::Held { elapsed }, _, true) => Run::Counting {
                start: t.saturating_sub(elapsed),
            },
            // Falling edge: modes 0, 2, 3 and 4 hold the count; 1 and 5 ignore it.
            (Run::Counting { start }, 0 | 2 | 3 | 4, false) => Run::Held {
                elapsed: t.saturating_sub(start),
            },
            (run, _, _) => run,
        };
    }

    /// When OUT rises next, as a schedule in PIT ticks (channel 0 turns it into IRQ0).
    fn out_edges(&self) -> Option<Schedule> {
        let Run::Counting { start } = self.run else {
            return None;
        };
        let n = self.reload;
        match self.mode {
            0 | 1 => Some(Schedule::once(start + n)),
            4 | 5 => Some(Schedule::once(start + n + 1)),
            _ => Some(Schedule::periodic(start + n, n)),
        }
    }
}

fn to_bcd(v: u64) -> u16 {
    let v = v % 10_000;
    (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
}

fn from_bcd(v: u16) -> u64 {
    // Digits above 9 are not valid BCD; they are taken at face value.
    (0..4)
        .rev()
        .fold(0, |acc, d| acc * 10 + u64::from((v >> (4 * d)) & 0xf))
}

/// The 8254 and port 0x61.
#[derive(Debug, Clone)]
pub struct Pit {
    clock: ClockRate,
    channels: [Channel; 3],
    /// Port 0x61 bits 3:0.
    port61: u8,
    /// Channel 0's next IRQ0 edges, in PIT ticks.
    irq: Option<Schedule>,
}

impl Pit {
    /// A PIT whose clock runs against a TSC of `tsc_hz`. No channel counts until programmed.
    pub fn new(tsc_hz: u64) -> Self {
        Pit {
            clock: ClockRate::new(PIT_HZ, tsc_hz),
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            irq: None,
        }
    }

    /// The value of channel `ch`'s counting element at TSC `now`.
    pub fn count(&self, ch: usize, now: u64) -> Option<u16> {
        let c = self.channels.get(ch)?;
        Some(c.count_register(self.clock.ticks_at(now)))
    }

    /// Channel `ch`'s OUT at TSC `now`.
    pub fn out(&self, ch: usize, now: u64) -> bool {
        let t = self.clock.ticks_at(now);
        self.channels.get(ch).is_some_and(|c| c.state_at(t).1)
    }

    fn control(&mut self, value: u8, t: u64) {
        let sc = value >> 6;
        let rw = (value >> 4) & 3;
        if sc == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status, bits 3:1 select
            // channels 2, 1, 0.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x10 == 0 {
                    ch.latch_status(t);
                }
                if value & 0x20 == 0 {
                    ch.latch_count(t);
                }
            }
            return;
        }
        let ch = &mut self.channels[usize::from(sc)];
        if rw == 0 {
            ch.latch_count(t);
        } else {
            ch.control_word(rw, (value >> 1) & 7, value & 1 != 0);
            if sc == 0 {
                self.irq = None;
            }
        }
    }

    fn read_port61(&self, t: u64) -> u8 {
        let out2 = if self.channels[2].state_at(t).1 {
            P61_OUT2
        } else {
            0
        };
        let refresh = if (t / REFRESH_TICKS) & 1 != 0 {
            P61_REFRESH
        } else {
            0
        };
        self.port61 | refresh | out2
    }
}

crate::codec_enum!(Access {
    Lsb = 1,
    Msb = 2,
    LsbMsb = 3
});

impl Codec for Run {
    fn put(&self, w: &mut Writer) {
        match *self {
            Run::Idle => w.put(&0u8),
            Run::Counting { start } => {
                w.put(&1u8);
                w.put(&start);
            }
            Run::Held { elapsed } => {
                w.put(&2u8);
                w.put(&elapsed);
            }
            Run::AwaitTrigger => w.put(&3u8),
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok(match r.get::<u8>()? {
            0 => Run::Idle,
            1 => Run::Counting { start: r.get()? },
            2 => Run::Held { elapsed: r.get()? },
            3 => Run::AwaitTrigger,
            _ => return Err(StateError::Invalid("an unknown PIT counting state")),
        })
    }
}

crate::codec_struct!(Channel {
    mode,
    mode_bits,
    access,
    bcd,
    reload,
    run,
    gate,
    pending_lsb,
    read_msb_next,
    latched_count,
    latched_status,
    null_count,
});
crate::codec_struct!(Pit {
    clock,
    channels,
    port61,
    irq
});

/// The section of the PIT's state (docs/DEVICES.md).
const STATE_TAG: [u8; 4] = *b"PIT0";
const STATE_VERSION: u16 = 1;
/// PIT ticks of the guest's clock a restored counter may have started at or counted: far
/// beyond any real run (2^56 ticks are 640 years at 1.19 MHz), far from overflowing the sums
/// the counter's arithmetic makes.
const STATE_TICKS_MAX: u64 = 1 << 56;

impl Channel {
    /// What the channel's arithmetic relies on: a mode of the 8254 and a count it can hold.
    fn check(&self) -> Result<(), &'static str> {
        if self.mode > 5 {
            return Err("a PIT mode above 5");
        }
        if !(1..=0x1_0000).contains(&self.reload) {
            return Err("a PIT count outside 1..=0x10000");
        }
        match self.run {
            Run::Counting { start: t } | Run::Held { elapsed: t } if t > STATE_TICKS_MAX => {
                Err("a PIT counter beyond 2^56 ticks")
            }
            _ => Ok(()),
        }
    }
}

impl Device for Pit {
    fn name(&self) -> &'static str {
        "pit8254"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        let clock = self.clock;
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if v.clock != clock {
                return Err("the PIT's clock differs from this machine's");
            }
            v.channels.iter().try_for_each(Channel::check)
        })
    }

    fn io_read(&mut self, port: u16, _size: u8, cx: &mut DeviceContext<'_>) -> u32 {
        let t = self.clock.ticks_at(cx.now());
        let value = match port {
            CHANNEL0..=CHANNEL2 => self.channels[usize::from(port - CHANNEL0)].read(t),
            PORT_61 => self.read_port61(t),
            _ => 0xff, // the control word register cannot be read
        };
        u32::from(value)
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        let t = self.clock.ticks_at(cx.now());
        let value = value as u8;
        match port {
            CHANNEL0..=CHANNEL2 => {
                let i = usize::from(port - CHANNEL0);
                let loaded = self.channels[i].write(value, t);
                if i == 0 && (loaded || self.channels[0].run == Run::Idle) {
                    self.irq = self.channels[0].out_edges();
                }
            }
            CONTROL => self.control(value, t),
            PORT_61 => {
                self.port61 = value & P61_WRITABLE;
                self.channels[2].set_gate(value & P61_GATE2 != 0, t);
            }
            _ => {}
        }
    }

    fn advance(&mut self, cx: &mut DeviceContext<'_>) {
        let t = self.clock.ticks_at(cx.now());
        if let Some(missed) = self.irq.as_mut().and_then(|s| s.fire(t)) {
            cx.pulse_irq(PIT_IRQ);
            cx.ticks_coalesced(PIT_IRQ, missed);
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        let tick = self.irq.as_ref()?.next()?;
        Some(self.clock.tsc_at(tick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    /// One TSC tick per PIT clock keeps the arithmetic of the tests plain.
    const TSC_HZ: u64 = PIT_HZ;

    struct Rig {
        pit: Pit,
        bench: Bench,
    }

    impl Rig {
        fn new() -> Self {
            Rig {
                pit: Pit::new(TSC_HZ),
                bench: Bench::default(),
            }
        }
        fn out(&mut self, port: u16, value: u8, now: u64) {
            let mut cx = self.bench.cx(now);
            self.pit.io_write(port, 1, u32::from(value), &mut cx);
        }
        fn inb(&mut self, port: u16, now: u64) -> u8 {
            let mut cx = self.bench.cx(now);
            self.pit.io_read(port, 1, &mut cx) as u8
        }
        fn read16(&mut self, port: u16, now: u64) -> u16 {
            let lo = self.inb(port, now);
            u16::from_le_bytes([lo, self.inb(port, now)])
        }
        fn advance(&mut self, now: u64) {
            let mut cx = self.bench.cx(now);
            self.pit.advance(&mut cx);
        }
    }

    #[test]
    fn mode2_counts_down_and_reloads() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x34, 0); // ch0, lohi, mode 2
        r.out(CHANNEL0, 100, 0);
        r.out(CHANNEL0, 0, 0);
        assert_eq!(r.read16(CHANNEL0, 0), 100);
        assert_eq!(r.read16(CHANNEL0, 30), 70);
        assert_eq!(r.read16(CHANNEL0, 99), 1);
        assert!(!r.pit.out(0, 99), "OUT low for the last clock");
        assert_eq!(r.read16(CHANNEL0, 100), 100);
        assert!(r.pit.out(0, 100));
        assert_eq!(r.read16(CHANNEL0, 250), 50);
    }

    #[test]
    fn mode0_one_shot_raises_out_and_keeps_counting() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x30, 0); // ch0, lohi, mode 0
        assert!(!r.pit.out(0, 0));
        r.out(CHANNEL0, 10, 0);
        r.out(CHANNEL0, 0, 0);
        assert_eq!(r.pit.next_deadline(), Some(10));
        r.advance(9);
        assert_eq!(r.bench.lines.edges[0], 0);
        r.advance(10);
        assert_eq!(r.bench.lines.edges[0], 1);
        assert!(r.pit.out(0, 10));
        assert_eq!(r.read16(CHANNEL0, 12), 0xfffe, "wraps after terminal count");
        r.advance(1_000_000);
        assert_eq!(r.bench.lines.edges[0], 1, "one shot");
        assert_eq!(r.pit.next_deadline(), None);
    }

    #[test]
    fn mode0_first_byte_stops_counting() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x30, 0);
        r.out(CHANNEL0, 10, 0);
        r.out(CHANNEL0, 0, 0);
        r.out(CHANNEL0, 20, 5);
        assert_eq!(r.pit.next_deadline(), None);
        r.out(CHANNEL0, 0, 8);
        assert_eq!(r.pit.next_deadline(), Some(28));
    }

    #[test]
    fn mode3_square_wave() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x36, 0); // ch0, lohi, mode 3
        r.out(CHANNEL0, 10, 0);
        r.out(CHANNEL0, 0, 0);
        let outs: Vec<bool> = (0..10).map(|t| r.pit.out(0, t)).collect();
        assert_eq!(
            outs,
            [true, true, true, true, true, false, false, false, false, false]
        );
        assert_eq!(r.pit.count(0, 0), Some(10));
        assert_eq!(r.pit.count(0, 2), Some(6));
        assert_eq!(r.pit.count(0, 5), Some(10));
        assert_eq!(r.pit.count(0, 9), Some(2));
        // Rising edges every 10 clocks.
        r.advance(10);
        r.advance(20);
        assert_eq!(r.bench.lines.edges[0], 2);
    }

    #[test]
    fn control_values_6_and_7_alias_modes_2_and_3() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x3c, 0); // mode bits 110
        r.out(CHANNEL0, 4, 0);
        r.out(CHANNEL0, 0, 0);
        assert!(!r.pit.out(0, 3));
        r.out(CONTROL, 0xe2, 0); // read-back status of ch0
        assert_eq!(
            r.inb(CHANNEL0, 0) & 0x0e,
            0x0c,
            "status keeps the bits as written"
        );
    }

    #[test]
    fn access_modes_lsb_msb() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x54, 0); // ch1, LSB only, mode 2
        r.out(0x41, 0x12, 0);
        assert_eq!(r.inb(0x41, 2), 0x10);
        assert_eq!(r.inb(0x41, 2), 0x10, "LSB only: no flip-flop");
        r.out(CONTROL, 0x64, 0); // ch1, MSB only, mode 2
        r.out(0x41, 0x02, 0); // count 0x200
        assert_eq!(r.inb(0x41, 0x101), 0x00);
        assert_eq!(r.pit.count(1, 0x101), Some(0xff));
    }

    #[test]
    fn counter_latch_freezes_the_value_until_read() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x34, 0);
        r.out(CHANNEL0, 0x00, 0);
        r.out(CHANNEL0, 0x10, 0); // 0x1000
        r.out(CONTROL, 0x00, 0x10); // latch ch0
        r.out(CONTROL, 0x00, 0x20); // ignored: already latched
        assert_eq!(r.inb(CHANNEL0, 0x30), 0xf0);
        assert_eq!(r.inb(CHANNEL0, 0x40), 0x0f);
        // Unlatched again: the live count.
        assert_eq!(r.read16(CHANNEL0, 0x50), 0x1000 - 0x50);
    }

    #[test]
    fn read_back_status_then_count() {
        let mut r = Rig::new();
        r.out(CONTROL, 0xb0, 0); // ch2, lohi, mode 0
        r.out(CONTROL, 0xe8, 0); // read-back status of ch2
        assert_eq!(
            r.inb(CHANNEL2, 0),
            0x70,
            "OUT low, null count, lohi, mode 0"
        );
        r.out(PORT_61, 0x01, 0); // gate high
        r.out(CHANNEL2, 0x00, 0);
        r.out(CHANNEL2, 0x01, 0); // 256
        r.out(CONTROL, 0xc8, 0x10); // count and status
        assert_eq!(r.inb(CHANNEL2, 0), 0x30, "count loaded");
        assert_eq!(r.read16(CHANNEL2, 0x50), 0xf0, "latched at 0x10");
        r.out(CONTROL, 0xe8, 0x200); // status only
        assert_eq!(
            r.inb(CHANNEL2, 0x200),
            0xb0,
            "OUT high after terminal count"
        );
    }

    #[test]
    fn bcd_counting() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x35, 0); // ch0, lohi, mode 2, BCD
        r.out(CHANNEL0, 0x00, 0);
        r.out(CHANNEL0, 0x10, 0); // BCD 1000
        assert_eq!(r.read16(CHANNEL0, 1), 0x0999);
        assert_eq!(r.pit.next_deadline(), Some(1000));
        assert_eq!((to_bcd(1234), from_bcd(0x1234)), (0x1234, 1234));
    }

    /// Linux's pit_calibrate_tsc: gate on, speaker off, channel 2 mode 0, then poll port 0x61
    /// bit 5 until OUT2 goes high.
    #[test]
    fn channel2_out_shows_on_port_61() {
        let mut r = Rig::new();
        let v = r.inb(PORT_61, 0);
        r.out(PORT_61, (v & !0x02) | 0x01, 0);
        r.out(CONTROL, 0xb0, 0);
        r.out(CHANNEL2, 0xff, 0);
        r.out(CHANNEL2, 0xff, 0); // 65535
        assert_eq!(r.inb(PORT_61, 1000) & P61_OUT2, 0);
        assert_eq!(r.inb(PORT_61, 65_534) & P61_OUT2, 0);
        assert_eq!(r.inb(PORT_61, 65_535) & P61_OUT2, P61_OUT2);
        assert_eq!(r.inb(PORT_61, 65_535) & 0x0f, 0x01);
        // Channel 2 raises no interrupt.
        assert_eq!(r.pit.next_deadline(), None);
    }

    #[test]
    fn gate_low_holds_mode0_and_restarts_mode2() {
        let mut r = Rig::new();
        r.out(PORT_61, 0x01, 0);
        r.out(CONTROL, 0xb0, 0);
        r.out(CHANNEL2, 100, 0);
        r.out(CHANNEL2, 0, 0);
        r.out(PORT_61, 0x00, 40); // gate low at 40: count holds at 60
        assert_eq!(r.pit.count(2, 500), Some(60));
        r.out(PORT_61, 0x01, 500);
        assert_eq!(r.pit.count(2, 510), Some(50));
        assert!(r.pit.out(2, 560));

        r.out(CONTROL, 0xb4, 600); // mode 2
        r.out(CHANNEL2, 100, 600);
        r.out(CHANNEL2, 0, 600);
        r.out(PORT_61, 0x00, 650);
        assert_eq!(r.pit.count(2, 700), Some(50));
        assert!(r.pit.out(2, 749), "OUT forced high while the gate is low");
        r.out(PORT_61, 0x01, 800); // rising gate reloads
        assert_eq!(r.pit.count(2, 810), Some(90));
    }

    #[test]
    fn mode1_waits_for_a_gate_trigger() {
        let mut r = Rig::new();
        r.out(CONTROL, 0xb2, 0); // ch2, lohi, mode 1
        r.out(CHANNEL2, 50, 0);
        r.out(CHANNEL2, 0, 0);
        assert!(r.pit.out(2, 100), "OUT high until triggered");
        r.out(PORT_61, 0x01, 100);
        assert!(!r.pit.out(2, 120));
        assert!(r.pit.out(2, 150));
    }

    #[test]
    fn missed_periodic_edges_are_coalesced() {
        let mut r = Rig::new();
        r.out(CONTROL, 0x34, 0);
        r.out(CHANNEL0, 100, 0);
        r.out(CHANNEL0, 0, 0);
        r.advance(1050); // edges at 100..=1000: one pulse, nine coalesced
        assert_eq!(r.bench.lines.edges[0], 1);
        assert_eq!(r.bench.lines.coalesced[0], 9);
        assert_eq!(r.pit.next_deadline(), Some(1100));
    }

    #[test]
    fn refresh_bit_toggles() {
        let mut r = Rig::new();
        let a = r.inb(PORT_61, 0) & P61_REFRESH;
        let b = r.inb(PORT_61, REFRESH_TICKS) & P61_REFRESH;
        assert_ne!(a, b);
    }
}
