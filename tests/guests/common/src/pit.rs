//! The 8254 programmable interval timer: channel 0 as the IRQ0 tick, channel 2 to measure the
//! rate of other clocks (TSC, LAPIC timer).

use crate::cpu::{self, inb, outb};

/// Input clock of the PC's 8254 in Hz.
pub const INPUT_HZ: u32 = 1_193_182;
const CHANNEL0: u16 = 0x40;
const CHANNEL2: u16 = 0x42;
const COMMAND: u16 = 0x43;
/// Port 0x61: bit 0 gates channel 2, bit 1 connects its output to the speaker.
const PORT_61: u16 = 0x61;
const PORT_61_GATE2: u8 = 1 << 0;
const PORT_61_SPEAKER: u8 = 1 << 1;
/// Mode/command byte: channel 2, lobyte/hibyte access, mode 0 (interrupt on terminal count), binary.
const CHANNEL2_ONE_SHOT: u8 = (0b10 << 6) | (0b11 << 4);
/// Counter latch command for channel 2 (access bits 00).
const LATCH_CHANNEL2: u8 = 0b10 << 6;
/// Length of a [`measure_rate`] window in PIT clocks: 49 152, about 41 ms, well inside the
/// 65 535 clocks channel 2 takes to run out.
pub const MEASURE_CLOCKS: u16 = 0xc000;
/// Mode/command byte: channel 0 (bits 7-6), lobyte/hibyte access (5-4), mode 2 (3-1), binary (0).
const CHANNEL0_RATE_GENERATOR: u8 = (0b11 << 4) | (0b010 << 1);

/// Channel 0, lobyte/hibyte access, mode 2 (rate generator), binary: an IRQ0 `hz` times a second.
pub fn start_periodic(hz: u32) {
    let divisor = (INPUT_HZ + hz / 2) / hz.max(1);
    let divisor = divisor.clamp(1, 0xffff) as u16;
    outb(COMMAND, CHANNEL0_RATE_GENERATOR);
    outb(CHANNEL0, divisor as u8);
    outb(CHANNEL0, (divisor >> 8) as u8);
}

/// The rate in Hz of `counter` (any counter that counts up), measured against PIT channel 2 over
/// [`MEASURE_CLOCKS`] PIT clocks (about 41 ms) by busy polling.
///
/// Channel 2 runs once down from 0xffff (mode 0, gate on through port 0x61 bit 0, speaker off);
/// each end of the window reads `counter` and latches the PIT count back to back, so both ends
/// carry the same small offset, which cancels. Nothing here waits for an interrupt: a late timer
/// interrupt (the guest was not running, or the hypervisor was busy) cannot skew the result,
/// which is why the guests calibrate this way rather than by counting IRQ0 ticks.
pub fn measure_rate(mut counter: impl FnMut() -> u64) -> u64 {
    outb(PORT_61, (inb(PORT_61) & !PORT_61_SPEAKER) | PORT_61_GATE2);
    outb(COMMAND, CHANNEL2_ONE_SHOT);
    outb(CHANNEL2, 0xff);
    outb(CHANNEL2, 0xff);
    let (c0, p0) = (counter(), channel2_count());
    let (c1, p1) = loop {
        let sample = (counter(), channel2_count());
        if p0.wrapping_sub(sample.1) >= MEASURE_CLOCKS {
            break sample;
        }
    };
    outb(PORT_61, inb(PORT_61) & !PORT_61_GATE2);
    let clocks = u64::from(p0.wrapping_sub(p1)).max(1);
    (u128::from(c1.wrapping_sub(c0)) * u128::from(INPUT_HZ) / u128::from(clocks)) as u64
}

/// The TSC's rate in Hz ([`measure_rate`]).
pub fn tsc_hz() -> u64 {
    measure_rate(cpu::rdtsc)
}

/// Channel 2's current count (counter latch command, then LSB and MSB).
fn channel2_count() -> u16 {
    outb(COMMAND, LATCH_CHANNEL2);
    let lo = inb(CHANNEL2);
    let hi = inb(CHANNEL2);
    u16::from_le_bytes([lo, hi])
}
