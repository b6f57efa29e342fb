//! QEMU's isa-debug-exit device at port 0xF4: a write of `v` ends the guest with exit status
//! `(v << 1) | 1`, exactly as `-device isa-debug-exit,iobase=0xf4,iosize=0x04` ends QEMU, so a
//! test guest written for QEMU reports its result unchanged under Keel.

use super::{size_mask, Device, DeviceContext};

#[derive(Debug, Default)]
pub struct DebugExit;

/// The exit status a write of `value` produces.
pub fn exit_status(value: u32) -> u32 {
    (value << 1) | 1
}

impl Device for DebugExit {
    fn name(&self) -> &'static str {
        "isa-debug-exit"
    }

    fn save(&self, w: &mut crate::state::Writer) {
        crate::state::save_empty(w, *b"DBGX");
    }

    fn restore(
        &mut self,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<(), crate::state::StateError> {
        crate::state::restore_empty(r, *b"DBGX")
    }

    /// Takes 8/16/32-bit writes whole, like QEMU's device with iosize 4.
    fn wide_ports(&self) -> bool {
        true
    }

    fn io_read(&mut self, _port: u16, size: u8, _cx: &mut DeviceContext<'_>) -> u32 {
        size_mask(size)
    }

    fn io_write(&mut self, _port: u16, size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        cx.set_exit_status(exit_status(value & size_mask(size)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    #[test]
    fn write_sets_qemu_style_status() {
        let mut bench = Bench::default();
        let mut d = DebugExit;
        assert_eq!(d.io_read(0xf4, 1, &mut bench.cx(0)), 0xff);
        d.io_write(0xf4, 1, 0x1_31, &mut bench.cx(0));
        assert_eq!(bench.exit_status, Some(0x63));
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(0x10), 0x21);
    }
}
