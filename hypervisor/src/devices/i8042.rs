//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command), with a keyboard
//! on its first port and nothing on its auxiliary (mouse) port. Enough of it for an operating
//! system's probe (Linux's `i8042` and `atkbd` drivers) to find a working controller and keyboard
//! without timeouts, and for the guest to reset the machine through it.
//!
//! The controller (IBM PC/AT Technical Reference, "Keyboard controller"; the commands below are the
//! ones every compatible implements):
//! - Status (read 0x64): bit 0 output buffer full, bit 1 input buffer full (always 0: a write is
//!   handled at once), bit 2 system flag (set: "POST passed"), bit 3 last write was a command,
//!   bit 4 keyboard not inhibited, bit 5 the output byte is from the auxiliary port, bit 6 timeout.
//! - Output buffer (read 0x60): a queue of bytes from the controller and the devices; reading
//!   takes the head. When the head comes from the keyboard (or the controller) and the command
//!   byte's bit 0 is set, IRQ1 is raised; from the auxiliary port with bit 1 set, IRQ12. The line
//!   falls when the byte is read (both are ISA edge-triggered lines).
//! - Commands (write 0x64): 0x20 read / 0x60 write the command byte; 0xA7/0xA8 disable/enable the
//!   auxiliary port, 0xA9 auxiliary interface test (0x00 = ok), 0xAA self-test (0x55),
//!   0xAB keyboard interface test (0x00), 0xAD/0xAE disable/enable the keyboard, 0xD0 read /
//!   0xD1 write the output port, 0xD2/0xD3 write a byte into the output buffer as if from the
//!   keyboard / auxiliary device, 0xD4 send the next byte to the auxiliary device, 0xF0-0xFF pulse
//!   output port lines low for bits clear in the low nibble. Pulsing bit 0, the CPU reset line
//!   (0xFE), or writing the output port with bit 0 clear resets the machine. A20 (output port
//!   bit 1) is always on in Keel's guests; writes to it are ignored. Unknown commands are ignored.
//! - The keyboard answers what QEMU's PS/2 keyboard answers: 0xFF reset -> FA AA, 0xF2 identify
//!   -> FA AB 83 (AB 41 while the controller translates scan codes), 0xEE echo -> EE, 0xF0 get/set
//!   scan code set, 0xED LEDs and 0xF3 typematic with their argument bytes, the rest of
//!   0xF4-0xFD -> FA; unknown bytes -> FE (resend). It never sends a key.
//! - The auxiliary port has no device: a byte sent with 0xD4 comes back as FE with the timeout
//!   bit, which is how a controller reports an absent device and lets the mouse probe give up at
//!   once.

use super::board::{I8042_COMMAND_PORT, I8042_DATA_PORT};
use super::{Device, DeviceContext, PowerEvent, ResetSource};
use crate::state::{self, Reader, StateError, Writer};
use alloc::collections::VecDeque;

pub const KEYBOARD_IRQ: u8 = 1;
pub const AUX_IRQ: u8 = 12;

/// Status register bits.
pub mod status {
    pub const OUTPUT_FULL: u8 = 1 << 0;
    pub const SYSTEM: u8 = 1 << 2;
    pub const COMMAND: u8 = 1 << 3;
    pub const UNLOCKED: u8 = 1 << 4;
    pub const AUX_DATA: u8 = 1 << 5;
    pub const TIMEOUT: u8 = 1 << 6;
}

/// Command byte bits.
pub mod ctr {
    pub const KBD_INT: u8 = 1 << 0;
    pub const AUX_INT: u8 = 1 << 1;
    pub const SYSTEM: u8 = 1 << 2;
    pub const KBD_DISABLE: u8 = 1 << 4;
    pub const AUX_DISABLE: u8 = 1 << 5;
    pub const XLATE: u8 = 1 << 6;
}

/// The command byte after POST: keyboard interrupt, system flag, auxiliary port disabled, scan
/// code translation (what a PC BIOS leaves).
const CTR_AT_BOOT: u8 = ctr::KBD_INT | ctr::SYSTEM | ctr::AUX_DISABLE | ctr::XLATE;
/// The output port: bit 0 CPU reset line (high = running), bit 1 A20.
const OUTPUT_PORT: u8 = 0b11;

/// Keyboard answers.
const ACK: u8 = 0xfa;
const RESEND: u8 = 0xfe;
const BAT_OK: u8 = 0xaa;

/// Longest queue kept: a guest that never reads loses the newest bytes, not memory.
const QUEUE_MAX: usize = 16;

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The controller itself or the keyboard (IRQ1).
    Keyboard,
    /// The auxiliary port (IRQ12), with the timeout bit if no device answered.
    Aux { timeout: bool },
}

/// What the next byte written to port 0x60 is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A byte for the keyboard.
    Keyboard,
    CommandByte,
    OutputPort,
    KeyboardOutput,
    AuxOutput,
    AuxDevice,
    /// The argument of the keyboard command given.
    KeyboardArgument(u8),
}

#[derive(Debug)]
pub struct I8042 {
    ctr: u8,
    last_was_command: bool,
    expect: Expect,
    out: VecDeque<(u8, Source)>,
    /// The level IRQ1 / IRQ12 were last driven to.
    irq_levels: (bool, bool),
    scan_set: u8,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        I8042 {
            ctr: CTR_AT_BOOT,
            last_was_command: false,
            expect: Expect::Keyboard,
            out: VecDeque::new(),
            irq_levels: (false, false),
            scan_set: 2,
        }
    }

    /// The port ranges to register.
    pub fn ports() -> [(u16, u16); 2] {
        [(I8042_DATA_PORT, 1), (I8042_COMMAND_PORT, 1)]
    }

    fn push(&mut self, byte: u8, from: Source) {
        if self.out.len() < QUEUE_MAX {
            self.out.push_back((byte, from));
        }
    }

    fn status(&self) -> u8 {
        let mut s = status::SYSTEM | status::UNLOCKED;
        if self.last_was_command {
            s |= status::COMMAND;
        }
        match self.out.front() {
            Some((_, Source::Keyboard)) => s |= status::OUTPUT_FULL,
            Some((_, Source::Aux { timeout })) => {
                s |= status::OUTPUT_FULL | status::AUX_DATA;
                if *timeout {
                    s |= status::TIMEOUT;
                }
            }
            None => {}
        }
        s
    }

    /// Drives IRQ1/IRQ12 from the head of the output buffer and the command byte.
    fn update_irqs(&mut self, cx: &mut DeviceContext<'_>) {
        let (kbd, aux) = match self.out.front() {
            Some((_, Source::Keyboard)) => (self.ctr & ctr::KBD_INT != 0, false),
            Some((_, Source::Aux { .. })) => (false, self.ctr & ctr::AUX_INT != 0),
            None => (false, false),
        };
        if kbd != self.irq_levels.0 {
            cx.set_irq(KEYBOARD_IRQ, kbd);
        }
        if aux != self.irq_levels.1 {
            cx.set_irq(AUX_IRQ, aux);
        }
        self.irq_levels = (kbd, aux);
    }

    fn command(&mut self, cmd: u8, cx: &mut DeviceContext<'_>) {
        let reply = |d: &mut Self, b: u8| d.push(b, Source::Keyboard);
        match cmd {
            0x20 => reply(self, self.ctr),
            0x60 => self.expect = Expect::CommandByte,
            0xa7 => self.ctr |= ctr::AUX_DISABLE,
            0xa8 => self.ctr &= !ctr::AUX_DISABLE,
            0xa9 | 0xab => reply(self, 0x00),
            0xaa => reply(self, 0x55),
            0xad => self.ctr |= ctr::KBD_DISABLE,
            0xae => self.ctr &= !ctr::KBD_DISABLE,
            0xd0 => {
                // Bits 4 and 5 mirror the output buffer full for the keyboard / auxiliary port.
                let mut v = OUTPUT_PORT;
                match self.out.front() {
                    Some((_, Source::Keyboard)) => v |= 1 << 4,
                    Some((_, Source::Aux { .. })) => v |= 1 << 5,
                    None => {}
                }
                reply(self, v)
            }
            0xd1 => self.expect = Expect::OutputPort,
            0xd2 => self.expect = Expect::KeyboardOutput,
            0xd3 => self.expect = Expect::AuxOutput,
            0xd4 => self.expect = Expect::AuxDevice,
            // Pulse output port bits 3:0 low where the command's bits are 0; bit 0 is reset.
            0xf0..=0xff if cmd & 1 == 0 => {
                cx.request_power(PowerEvent::Reset(ResetSource::I8042));
            }
            _ => {}
        }
    }

    fn keyboard(&mut self, byte: u8) {
        let ack = |d: &mut Self| d.push(ACK, Source::Keyboard);
        match byte {
            0xff => {
                ack(self);
                self.scan_set = 2;
                self.push(BAT_OK, Source::Keyboard);
            }
            0xf2 => {
                ack(self);
                self.push(0xab, Source::Keyboard);
                let id = if self.ctr & ctr::XLATE != 0 {
                    0x41
                } else {
                    0x83
                };
                self.push(id, Source::Keyboard);
            }
            0xee => self.push(0xee, Source::Keyboard),
            0xed | 0xf0 | 0xf3 => {
                ack(self);
                self.expect = Expect::KeyboardArgument(byte);
            }
            0xf4..=0xfd => ack(self),
            _ => self.push(RESEND, Source::Keyboard),
        }
    }

    fn keyboard_argument(&mut self, cmd: u8, arg: u8) {
        self.push(ACK, Source::Keyboard);
        if cmd == 0xf0 {
            match arg {
                0 => self.push(self.scan_set, Source::Keyboard),
                1..=3 => self.scan_set = arg,
                _ => {}
            }
        }
    }

    fn data(&mut self, byte: u8, cx: &mut DeviceContext<'_>) {
        match core::mem::replace(&mut self.expect, Expect::Keyboard) {
            Expect::Keyboard => self.keyboard(byte),
            Expect::KeyboardArgument(cmd) => self.keyboard_argument(cmd, byte),
            Expect::CommandByte => self.ctr = byte,
            Expect::OutputPort => {
                if byte & 1 == 0 {
                    cx.request_power(PowerEvent::Reset(ResetSource::I8042));
                }
            }
            Expect::KeyboardOutput => self.push(byte, Source::Keyboard),
            Expect::AuxOutput => self.push(byte, Source::Aux { timeout: false }),
            Expect::AuxDevice => self.push(RESEND, Source::Aux { timeout: true }),
        }
    }
}

impl state::Codec for Source {
    fn put(&self, w: &mut Writer) {
        match *self {
            Source::Keyboard => w.put(&0u8),
            Source::Aux { timeout } => w.put(&(1 + u8::from(timeout))),
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok(match r.get::<u8>()? {
            0 => Source::Keyboard,
            1 => Source::Aux { timeout: false },
            2 => Source::Aux { timeout: true },
            _ => return Err(StateError::Invalid("an unknown i8042 byte source")),
        })
    }
}

impl state::Codec for Expect {
    fn put(&self, w: &mut Writer) {
        let (n, arg) = match *self {
            Expect::Keyboard => (0u8, 0u8),
            Expect::CommandByte => (1, 0),
            Expect::OutputPort => (2, 0),
            Expect::KeyboardOutput => (3, 0),
            Expect::AuxOutput => (4, 0),
            Expect::AuxDevice => (5, 0),
            Expect::KeyboardArgument(c) => (6, c),
        };
        w.put(&(n, arg));
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, StateError> {
        Ok(match r.get::<(u8, u8)>()? {
            (0, 0) => Expect::Keyboard,
            (1, 0) => Expect::CommandByte,
            (2, 0) => Expect::OutputPort,
            (3, 0) => Expect::KeyboardOutput,
            (4, 0) => Expect::AuxOutput,
            (5, 0) => Expect::AuxDevice,
            (6, c) => Expect::KeyboardArgument(c),
            _ => return Err(StateError::Invalid("an unknown i8042 data-port state")),
        })
    }
}

crate::codec_struct!(I8042 {
    ctr,
    last_was_command,
    expect,
    out,
    irq_levels,
    scan_set,
});

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"8042";
const STATE_VERSION: u16 = 1;

impl Device for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if v.out.len() > QUEUE_MAX {
                return Err("an i8042 output queue beyond 16 bytes");
            }
            Ok(())
        })
    }

    fn io_read(&mut self, port: u16, _size: u8, cx: &mut DeviceContext<'_>) -> u32 {
        let v = if port == I8042_COMMAND_PORT {
            self.status()
        } else {
            // An empty buffer reads the last byte again on real parts; 0 is as good.
            let v = self.out.pop_front().map_or(0, |(b, _)| b);
            self.update_irqs(cx);
            v
        };
        u32::from(v)
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        let byte = value as u8;
        self.last_was_command = port == I8042_COMMAND_PORT;
        if port == I8042_COMMAND_PORT {
            // A new command abandons a data byte the previous one was waiting for.
            self.expect = Expect::Keyboard;
            self.command(byte, cx);
        } else {
            self.data(byte, cx);
        }
        self.update_irqs(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    fn cmd(d: &mut I8042, bench: &mut Bench, c: u8) {
        d.io_write(0x64, 1, u32::from(c), &mut bench.cx(0));
    }
    fn data(d: &mut I8042, bench: &mut Bench, b: u8) {
        d.io_write(0x60, 1, u32::from(b), &mut bench.cx(0));
    }
    fn status(d: &mut I8042, bench: &mut Bench) -> u8 {
        d.io_read(0x64, 1, &mut bench.cx(0)) as u8
    }
    /// Everything in the output buffer, read the way a driver does (status, then data).
    fn drain(d: &mut I8042, bench: &mut Bench) -> alloc::vec::Vec<u8> {
        let mut v = alloc::vec::Vec::new();
        while status(d, bench) & status::OUTPUT_FULL != 0 {
            v.push(d.io_read(0x60, 1, &mut bench.cx(0)) as u8);
        }
        v
    }

    #[test]
    fn self_tests_and_command_byte() {
        let mut bench = Bench::default();
        let mut d = I8042::new();
        assert_eq!(
            status(&mut d, &mut bench),
            0x14,
            "empty, system flag, unlocked"
        );
        cmd(&mut d, &mut bench, 0xaa);
        assert_eq!(status(&mut d, &mut bench), 0x1d);
        assert_eq!(drain(&mut d, &mut bench), [0x55]);
        cmd(&mut d, &mut bench, 0xab);
        cmd(&mut d, &mut bench, 0xa9);
        assert_eq!(drain(&mut d, &mut bench), [0x00, 0x00]);
        cmd(&mut d, &mut bench, 0x20);
        assert_eq!(drain(&mut d, &mut bench), [0x65]);
        cmd(&mut d, &mut bench, 0x60);
        data(&mut d, &mut bench, 0x47);
        assert_eq!(status(&mut d, &mut bench) & status::COMMAND, 0, "data last");
        cmd(&mut d, &mut bench, 0xa7);
        cmd(&mut d, &mut bench, 0xad);
        cmd(&mut d, &mut bench, 0x20);
        assert_eq!(drain(&mut d, &mut bench), [0x77]);
        cmd(&mut d, &mut bench, 0xa8);
        cmd(&mut d, &mut bench, 0xae);
        cmd(&mut d, &mut bench, 0x20);
        assert_eq!(drain(&mut d, &mut bench), [0x47]);
        assert_eq!(bench.power, None);
    }

    #[test]
    fn keyboard_answers_like_qemus() {
        let mut bench = Bench::default();
        let mut d = I8042::new();
        data(&mut d, &mut bench, 0xff);
        assert_eq!(drain(&mut d, &mut bench), [0xfa, 0xaa]);
        data(&mut d, &mut bench, 0xf2);
        assert_eq!(drain(&mut d, &mut bench), [0xfa, 0xab, 0x41], "translated");
        cmd(&mut d, &mut bench, 0x60);
        data(&mut d, &mut bench, 0x07);
        data(&mut d, &mut bench, 0xf2);
        assert_eq!(drain(&mut d, &mut bench), [0xfa, 0xab, 0x83]);
        data(&mut d, &mut bench, 0xed);
        data(&mut d, &mut bench, 0x07);
        data(&mut d, &mut bench, 0xf0);
        data(&mut d, &mut bench, 0x00);
        data(&mut d, &mut bench, 0xee);
        data(&mut d, &mut bench, 0xf4);
        data(&mut d, &mut bench, 0x12);
        assert_eq!(
            drain(&mut d, &mut bench),
            [0xfa, 0xfa, 0xfa, 0xfa, 0x02, 0xee, 0xfa, 0xfe]
        );
    }

    #[test]
    fn aux_loopback_works_and_the_absent_mouse_times_out() {
        let mut bench = Bench::default();
        let mut d = I8042::new();
        cmd(&mut d, &mut bench, 0xd3);
        data(&mut d, &mut bench, 0x5a);
        assert_eq!(status(&mut d, &mut bench), 0x35, "aux data");
        assert_eq!(drain(&mut d, &mut bench), [0x5a]);
        cmd(&mut d, &mut bench, 0xd4);
        data(&mut d, &mut bench, 0xf2);
        assert_eq!(status(&mut d, &mut bench), 0x75, "aux, timeout");
        assert_eq!(drain(&mut d, &mut bench), [0xfe]);
        cmd(&mut d, &mut bench, 0xd2);
        data(&mut d, &mut bench, 0x1c);
        assert_eq!(status(&mut d, &mut bench), 0x15);
        assert_eq!(drain(&mut d, &mut bench), [0x1c]);
    }

    #[test]
    fn output_raises_irq1_or_irq12_as_the_command_byte_allows() {
        let mut bench = Bench::default();
        let mut d = I8042::new();
        cmd(&mut d, &mut bench, 0xaa);
        assert!(bench.lines.levels[1], "KBD_INT set at boot");
        drain(&mut d, &mut bench);
        assert!(!bench.lines.levels[1], "falls when read");
        // AUX_INT clear: the loopback byte raises nothing.
        cmd(&mut d, &mut bench, 0xd3);
        data(&mut d, &mut bench, 0xa5);
        assert!(!bench.lines.levels[12]);
        drain(&mut d, &mut bench);
        cmd(&mut d, &mut bench, 0x60);
        data(&mut d, &mut bench, ctr::AUX_INT);
        cmd(&mut d, &mut bench, 0xd3);
        data(&mut d, &mut bench, 0xa5);
        assert!(bench.lines.levels[12]);
        assert!(!bench.lines.levels[1]);
        drain(&mut d, &mut bench);
        assert!(!bench.lines.levels[12]);
        assert_eq!((bench.lines.edges[1], bench.lines.edges[12]), (1, 1));
    }

    #[test]
    fn reset_line_resets_the_machine() {
        let reset = Some(PowerEvent::Reset(ResetSource::I8042));
        for pulse in [0xfe, 0xf0, 0xfa] {
            let mut bench = Bench::default();
            cmd(&mut I8042::new(), &mut bench, pulse);
            assert_eq!(bench.power, reset, "{pulse:#x}");
        }
        let mut bench = Bench::default();
        let mut d = I8042::new();
        cmd(&mut d, &mut bench, 0xff);
        cmd(&mut d, &mut bench, 0xfd);
        assert_eq!(bench.power, None, "bit 0 not pulsed");
        cmd(&mut d, &mut bench, 0xd0);
        assert_eq!(drain(&mut d, &mut bench), [0x03]);
        cmd(&mut d, &mut bench, 0xd1);
        data(&mut d, &mut bench, 0x03);
        assert_eq!(bench.power, None, "A20 and reset high");
        cmd(&mut d, &mut bench, 0xd1);
        data(&mut d, &mut bench, 0x02);
        assert_eq!(bench.power, reset);
    }
}
