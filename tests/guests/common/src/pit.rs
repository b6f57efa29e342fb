//! The 8254 programmable interval timer, channel 0 (IRQ0).

use crate::cpu::outb;

/// Input clock of the PC's 8254 in Hz.
pub const INPUT_HZ: u32 = 1_193_182;
const CHANNEL0: u16 = 0x40;
const COMMAND: u16 = 0x43;
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
