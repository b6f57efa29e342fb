//! QEMU's firmware configuration interface (QEMU docs/specs/fw_cfg.rst) at its x86 I/O ports:
//! the 16-bit selector at 0x510 and the 8-bit data register at 0x511, so a test kernel written for
//! `qemu-system-x86_64` finds the items it reads there.
//!
//! - A 16-bit write to 0x510 selects an item and rewinds the data offset to 0. Each byte read from
//!   the data register returns the next byte of the item; past its end, and for a key that names
//!   no item, it reads 0.
//! - As in QEMU's x86 "combined" port, a byte read at 0x510 is a data read too, and byte writes
//!   (data writes, unsupported since QEMU 2.4) are ignored; other widths read all ones.
//! - No DMA interface: FW_CFG_ID reads 1 (the traditional interface only) and port 0x514 is not
//!   claimed.
//!
//! Items, little-endian unless said: FW_CFG_SIGNATURE "QEMU", FW_CFG_ID 1, FW_CFG_UUID (16 zero
//! bytes: no UUID was given), FW_CFG_RAM_SIZE (u64), FW_CFG_NOGRAPHIC 1 (u16: there is no display),
//! FW_CFG_NB_CPUS and FW_CFG_MAX_CPUS (u16), and FW_CFG_FILE_DIR: a big-endian count followed by
//! {size: u32 BE, select: u16 BE, reserved: u16, name: [u8; 56]} entries — empty, as Keel offers no
//! named files.

use super::board::{Board, FW_CFG_PORT};
use super::{size_mask, Device, DeviceContext};
use crate::state::{self, Reader, StateError, Writer};
use alloc::vec::Vec;

/// Selector keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const FILE_DIR: u16 = 0x19;
}

/// FW_CFG_ID bit 0: the traditional (non-DMA) interface.
pub const ID_TRADITIONAL: u32 = 1;
pub const SELECTOR: u16 = FW_CFG_PORT;
pub const DATA: u16 = FW_CFG_PORT + 1;

#[derive(Debug)]
pub struct FwCfg {
    items: Vec<(u16, Vec<u8>)>,
    /// Index into `items` of the selected item (None: no such key).
    selected: Option<usize>,
    offset: usize,
}

impl FwCfg {
    /// The items QEMU would give a guest with `board`'s RAM and CPUs.
    pub fn new(board: &Board) -> Self {
        let cpus = u16::from(board.cpus);
        let items = alloc::vec![
            (key::SIGNATURE, b"QEMU".to_vec()),
            (key::ID, ID_TRADITIONAL.to_le_bytes().to_vec()),
            (key::UUID, alloc::vec![0; 16]),
            (key::RAM_SIZE, board.ram_bytes.to_le_bytes().to_vec()),
            (key::NOGRAPHIC, 1u16.to_le_bytes().to_vec()),
            (key::NB_CPUS, cpus.to_le_bytes().to_vec()),
            (key::MAX_CPUS, cpus.to_le_bytes().to_vec()),
            (key::FILE_DIR, 0u32.to_be_bytes().to_vec()),
        ];
        FwCfg {
            items,
            selected: None,
            offset: 0,
        }
    }

    /// The ports to register: selector and data.
    pub fn ports() -> [(u16, u16); 1] {
        [(SELECTOR, 2)]
    }

    fn select(&mut self, key: u16) {
        self.selected = self.items.iter().position(|(k, _)| *k == key);
        self.offset = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let item = self.selected.and_then(|i| self.items.get(i));
        let byte = item.and_then(|(_, data)| data.get(self.offset)).copied();
        if byte.is_some() {
            self.offset += 1;
        }
        byte.unwrap_or(0)
    }
}

crate::codec_struct!(FwCfg {
    items,
    selected,
    offset
});

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"FWCF";
const STATE_VERSION: u16 = 1;

impl Device for FwCfg {
    fn name(&self) -> &'static str {
        "fw_cfg"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if v.selected.is_some_and(|i| i >= v.items.len()) {
                return Err("an fw_cfg selection beyond its items");
            }
            Ok(())
        })
    }

    /// The selector is a 16-bit register: it must see the guest's word write whole.
    fn wide_ports(&self) -> bool {
        true
    }

    fn io_read(&mut self, _port: u16, size: u8, _cx: &mut DeviceContext<'_>) -> u32 {
        match size {
            1 => u32::from(self.next_byte()),
            _ => size_mask(size),
        }
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32, _cx: &mut DeviceContext<'_>) {
        if port == SELECTOR && size == 2 {
            self.select(value as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    fn read_item(d: &mut FwCfg, bench: &mut Bench, key: u16, len: usize) -> Vec<u8> {
        d.io_write(SELECTOR, 2, u32::from(key), &mut bench.cx(0));
        (0..len)
            .map(|_| d.io_read(DATA, 1, &mut bench.cx(0)) as u8)
            .collect()
    }

    #[test]
    fn items_come_from_the_board() {
        let mut bench = Bench::default();
        let mut d = FwCfg::new(&Board::pc(128 << 20, 3));
        assert_eq!(read_item(&mut d, &mut bench, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, &mut bench, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(
            read_item(&mut d, &mut bench, key::RAM_SIZE, 8),
            (128u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut d, &mut bench, key::NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut d, &mut bench, key::MAX_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut d, &mut bench, key::NOGRAPHIC, 2), [1, 0]);
        assert_eq!(read_item(&mut d, &mut bench, key::UUID, 16), [0; 16]);
        // An empty file directory: a big-endian count of 0.
        assert_eq!(read_item(&mut d, &mut bench, key::FILE_DIR, 4), [0; 4]);
    }

    #[test]
    fn reads_past_the_end_and_of_unknown_keys_are_zero() {
        let mut bench = Bench::default();
        let mut d = FwCfg::new(&Board::pc(64 << 20, 1));
        assert_eq!(
            read_item(&mut d, &mut bench, key::SIGNATURE, 6),
            [b'Q', b'E', b'M', b'U', 0, 0]
        );
        for k in [0x06, 0x20, 0x4000, 0x8000, 0xffff] {
            assert_eq!(read_item(&mut d, &mut bench, k, 2), [0, 0], "key {k:#x}");
        }
        // Selecting again rewinds; a byte read at the selector port is a data read too.
        d.io_write(SELECTOR, 2, 0, &mut bench.cx(0));
        assert_eq!(d.io_read(SELECTOR, 1, &mut bench.cx(0)), u32::from(b'Q'));
        assert_eq!(d.io_read(DATA, 1, &mut bench.cx(0)), u32::from(b'E'));
    }

    #[test]
    fn only_word_writes_to_the_selector_select() {
        let mut bench = Bench::default();
        let mut d = FwCfg::new(&Board::pc(64 << 20, 1));
        d.io_write(SELECTOR, 2, u32::from(key::NB_CPUS), &mut bench.cx(0));
        // Byte writes (data writes) and wide reads change nothing.
        d.io_write(SELECTOR, 1, 0, &mut bench.cx(0));
        d.io_write(DATA, 1, 0, &mut bench.cx(0));
        d.io_write(DATA, 2, 0, &mut bench.cx(0));
        assert_eq!(d.io_read(DATA, 2, &mut bench.cx(0)), 0xffff);
        assert_eq!(d.io_read(DATA, 4, &mut bench.cx(0)), u32::MAX);
        assert_eq!(d.io_read(DATA, 1, &mut bench.cx(0)), 1);
    }
}
