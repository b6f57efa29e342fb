//! The guest's ACPI tables, built from its [`Board`] (ACPI 6.4, chapter 5).
//!
//! What a PC firmware leaves in memory for the kernel: an RSDP in the BIOS area (where a kernel
//! scanning 0xE0000-0xFFFFF for "RSD PTR " finds it), an RSDT and an XSDT pointing at the FADT and
//! the MADT, the FADT pointing at the FACS and the DSDT. Everything is computed from the board, so
//! the MADT lists the CPUs and the IOAPIC the platform models, and the FADT names the ports the ACPI
//! PM model is registered at. The tables live at guest-physical [`RSDP_ADDR`]..0x100000, which the
//! loaders mark reserved in the guest's memory map.
//!
//! Pure: [`build`] returns the bytes, [`install`] copies them into guest RAM; the tests parse them
//! back.

use crate::devices::board::{Board, PmBlocks, RESET_CONTROL_PORT, RESET_CONTROL_VALUE, SLP_TYP_S5};
use alloc::vec::Vec;
use core::fmt;

/// Where the RSDP (and the tables after it) go: the start of the BIOS read-only area, 16-byte
/// aligned as ACPI 6.4 5.2.5.1 requires of an RSDP found by scanning.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The tables must end below this (the end of the BIOS area, 1 MiB).
pub const AREA_END: u64 = 0x10_0000;

/// The OEM fields of every table header.
const OEM_ID: &[u8; 6] = b"KEEL  ";
const OEM_TABLE_ID: &[u8; 8] = b"KEELPC  ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"KEEL";
const CREATOR_REVISION: u32 = 1;

/// Table sizes (ACPI 6.4).
pub const RSDP_LEN: usize = 36;
pub const HEADER_LEN: usize = 36;
/// FADT revision 6 (ACPI 6.0 and later): 276 bytes, ending with the hypervisor vendor identity.
pub const FADT_LEN: usize = 276;
pub const FADT_REVISION: u8 = 6;
pub const FACS_LEN: usize = 64;

/// FADT flags (ACPI 6.4 Table 5.10).
pub mod fadt_flags {
    pub const WBINVD: u32 = 1 << 0;
    pub const PROC_C1: u32 = 1 << 2;
    /// No fixed-feature power button (there is none to press).
    pub const PWR_BUTTON: u32 = 1 << 4;
    /// No fixed-feature sleep button.
    pub const SLP_BUTTON: u32 = 1 << 5;
    pub const TMR_VAL_EXT: u32 = 1 << 8;
    pub const RESET_REG_SUP: u32 = 1 << 10;
    pub const HW_REDUCED_ACPI: u32 = 1 << 20;
}

/// IA-PC boot architecture flags (ACPI 6.4 Table 5.11).
pub mod boot_arch {
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    pub const I8042: u16 = 1 << 1;
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
}

/// MADT flags and entry types (ACPI 6.4 5.2.12).
pub mod madt {
    pub const PCAT_COMPAT: u32 = 1 << 0;
    pub const LOCAL_APIC: u8 = 0;
    pub const IO_APIC: u8 = 1;
    pub const INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
    pub const LOCAL_APIC_NMI: u8 = 4;
    /// Processor Local APIC flags: Enabled.
    pub const ENABLED: u32 = 1 << 0;
    /// The LINT input wired to NMI on a PC (LINT1).
    pub const NMI_LINT: u8 = 1;
    /// ACPI processor UID meaning "every processor".
    pub const ALL_PROCESSORS: u8 = 0xff;
}

/// The DSDT's AML: `Name (_S5, Package () { 0, 0, 0, 0 })` (ACPI 6.4 7.4.2: SLP_TYPa, SLP_TYPb,
/// two reserved), hand-assembled (ACPI 6.4 20.2: NameOp 0x08, PackageOp 0x12 with a one-byte
/// PkgLength of 8 covering itself, NumElements 4, BytePrefix 0x0A values and ZeroOp 0x00).
pub const DSDT_AML: [u8; 14] = [
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, SLP_TYP_S5, 0x0a, SLP_TYP_S5, 0x00, 0x00,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// Guest RAM ends before the tables do.
    RamTooSmall { needed: u64, ram: u64 },
    /// The tables do not fit in the BIOS area under 1 MiB.
    TooLarge { end: u64 },
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RamTooSmall { needed, ram } => write!(
                f,
                "ACPI tables need RAM up to {needed:#x}, the guest has {ram:#x} bytes"
            ),
            Self::TooLarge { end } => {
                write!(f, "ACPI tables would end at {end:#x}, past the BIOS area")
            }
        }
    }
}

/// Where each table sits, as guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub rsdp: u64,
    pub rsdt: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub facs: u64,
    pub dsdt: u64,
    pub madt: u64,
    pub end: u64,
}

/// The MADT's length for `cpus` CPUs: header, local APIC address and flags, one 8-byte Local APIC
/// entry per CPU, the 12-byte IOAPIC entry, two 10-byte overrides and the 6-byte LINT1 NMI entry.
pub fn madt_len(board: &Board) -> usize {
    HEADER_LEN + 8 + 8 * usize::from(board.cpus) + 12 + 10 * board.overrides.len() + 6
}

fn align(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The tables' places for `board`, packed after the RSDP (16-byte aligned; the FACS 64-byte aligned
/// as ACPI 6.4 5.2.10 requires).
pub fn layout(board: &Board) -> Layout {
    let rsdp = RSDP_ADDR;
    let rsdt = align(rsdp + RSDP_LEN as u64, 16);
    let xsdt = align(rsdt + (HEADER_LEN + 2 * 4) as u64, 16);
    let fadt = align(xsdt + (HEADER_LEN + 2 * 8) as u64, 16);
    let facs = align(fadt + FADT_LEN as u64, 64);
    let dsdt = align(facs + FACS_LEN as u64, 16);
    let madt = align(dsdt + (HEADER_LEN + DSDT_AML.len()) as u64, 16);
    let end = madt + madt_len(board) as u64;
    Layout {
        rsdp,
        rsdt,
        xsdt,
        fadt,
        facs,
        dsdt,
        madt,
        end,
    }
}

/// The 8-bit sum of `bytes` (an ACPI checksum makes it zero).
pub fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// A table under construction: little-endian writes at fixed offsets.
struct Table(Vec<u8>);

impl Table {
    /// A table of `len` bytes with its standard header (ACPI 6.4 5.2.6); the checksum is set by
    /// [`Table::finish`].
    fn new(signature: &[u8; 4], len: usize, revision: u8) -> Self {
        let mut t = Table(alloc::vec![0; len]);
        t.bytes(0, signature);
        t.u32(4, len as u32);
        t.u8(8, revision);
        t.bytes(10, OEM_ID);
        t.bytes(16, OEM_TABLE_ID);
        t.u32(24, OEM_REVISION);
        t.bytes(28, CREATOR_ID);
        t.u32(32, CREATOR_REVISION);
        t
    }

    fn bytes(&mut self, at: usize, b: &[u8]) {
        self.0[at..at + b.len()].copy_from_slice(b);
    }
    fn u8(&mut self, at: usize, v: u8) {
        self.0[at] = v;
    }
    fn u16(&mut self, at: usize, v: u16) {
        self.bytes(at, &v.to_le_bytes());
    }
    fn u32(&mut self, at: usize, v: u32) {
        self.bytes(at, &v.to_le_bytes());
    }
    fn u64(&mut self, at: usize, v: u64) {
        self.bytes(at, &v.to_le_bytes());
    }

    /// A Generic Address Structure (ACPI 6.4 5.2.3.2) for `len` bytes of system I/O at `port`,
    /// accessed `access` bytes at a time (0 = undefined, the legacy PM block convention).
    fn io_gas(&mut self, at: usize, port: u16, len: u8, access: u8) {
        self.u8(at, 1); // Address Space ID: System I/O
        self.u8(at + 1, len * 8); // Register Bit Width
        self.u8(at + 2, 0); // Register Bit Offset
        self.u8(at + 3, access); // Access Size: 1 byte, 2 word, 3 dword
        self.u64(at + 4, u64::from(port));
    }

    /// Sets the checksum byte at `at` so that the bytes `0..end` sum to zero.
    fn checksum(&mut self, at: usize, end: usize) {
        self.0[at] = 0;
        self.0[at] = sum(&self.0[..end]).wrapping_neg();
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len();
        self.checksum(9, len);
        self.0
    }
}

fn rsdp(l: &Layout) -> Vec<u8> {
    // ACPI 6.4 5.2.5.3: the 20-byte ACPI 1.0 part with its checksum, then Length, the XSDT
    // address and the extended checksum over all 36 bytes.
    let mut t = Table(alloc::vec![0; RSDP_LEN]);
    t.bytes(0, b"RSD PTR ");
    t.bytes(9, OEM_ID);
    t.u8(15, 2); // Revision 2: ACPI 2.0 and later
    t.u32(16, l.rsdt as u32);
    t.u32(20, RSDP_LEN as u32);
    t.u64(24, l.xsdt);
    t.checksum(8, 20);
    t.checksum(32, RSDP_LEN);
    t.0
}

fn rsdt(l: &Layout) -> Vec<u8> {
    let mut t = Table::new(b"RSDT", HEADER_LEN + 8, 1);
    t.u32(HEADER_LEN, l.fadt as u32);
    t.u32(HEADER_LEN + 4, l.madt as u32);
    t.finish()
}

fn xsdt(l: &Layout) -> Vec<u8> {
    let mut t = Table::new(b"XSDT", HEADER_LEN + 16, 1);
    t.u64(HEADER_LEN, l.fadt);
    t.u64(HEADER_LEN + 8, l.madt);
    t.finish()
}

/// The FADT (ACPI 6.4 5.2.9, Table 5.9), offsets as listed there.
fn fadt(board: &Board, l: &Layout) -> Vec<u8> {
    let pm = &board.pm;
    let mut t = Table::new(b"FACP", FADT_LEN, FADT_REVISION);
    t.u32(36, l.facs as u32); // FIRMWARE_CTRL
    t.u32(40, l.dsdt as u32); // DSDT
    t.u16(46, u16::from(board.sci_irq)); // SCI_INT
                                         // SMI_CMD (48) stays 0: no SMM, ACPI is always enabled (PM1 SCI_EN reads 1).
    t.u32(56, u32::from(pm.event)); // PM1a_EVT_BLK
    t.u32(64, u32::from(pm.control)); // PM1a_CNT_BLK
    t.u32(76, u32::from(pm.timer)); // PM_TMR_BLK
    t.u8(88, PmBlocks::EVENT_LEN);
    t.u8(89, PmBlocks::CONTROL_LEN);
    t.u8(91, PmBlocks::TIMER_LEN);
    t.u16(96, 101); // P_LVL2_LAT > 100: C2 not supported
    t.u16(98, 1001); // P_LVL3_LAT > 1000: C3 not supported
    t.u8(108, board.rtc_century); // CENTURY
    t.u16(
        109,
        boot_arch::LEGACY_DEVICES | boot_arch::I8042 | boot_arch::VGA_NOT_PRESENT,
    );
    t.u32(
        112,
        fadt_flags::WBINVD
            | fadt_flags::PROC_C1
            | fadt_flags::PWR_BUTTON
            | fadt_flags::SLP_BUTTON
            | fadt_flags::TMR_VAL_EXT
            | fadt_flags::RESET_REG_SUP,
    );
    t.io_gas(116, RESET_CONTROL_PORT, 1, 1); // RESET_REG: byte register 0xCF9
    t.u8(128, RESET_CONTROL_VALUE); // RESET_VALUE
    t.u8(131, 0); // FADT Minor Version: ACPI 6.0
    t.u64(132, l.facs); // X_FIRMWARE_CTRL
    t.u64(140, l.dsdt); // X_DSDT
    t.io_gas(148, pm.event, PmBlocks::EVENT_LEN, 0); // X_PM1a_EVT_BLK
    t.io_gas(172, pm.control, PmBlocks::CONTROL_LEN, 0); // X_PM1a_CNT_BLK
    t.io_gas(208, pm.timer, PmBlocks::TIMER_LEN, 0); // X_PM_TMR_BLK
    t.bytes(268, b"KeelKeel"); // Hypervisor Vendor Identity
    t.finish()
}

/// The FACS (ACPI 6.4 5.2.10): no checksum; hardware signature 0, no waking vector, version 2.
fn facs() -> Vec<u8> {
    let mut t = Table(alloc::vec![0; FACS_LEN]);
    t.bytes(0, b"FACS");
    t.u32(4, FACS_LEN as u32);
    t.u8(32, 2); // Version
    t.0
}

fn dsdt() -> Vec<u8> {
    // Revision 2: integers are 64 bits wide.
    let mut t = Table::new(b"DSDT", HEADER_LEN + DSDT_AML.len(), 2);
    t.bytes(HEADER_LEN, &DSDT_AML);
    t.finish()
}

/// The MADT (ACPI 6.4 5.2.12).
fn madt(board: &Board) -> Vec<u8> {
    let mut t = Table::new(b"APIC", madt_len(board), 5);
    t.u32(HEADER_LEN, board.lapic_base as u32);
    t.u32(HEADER_LEN + 4, madt::PCAT_COMPAT);
    let mut at = HEADER_LEN + 8;
    for (uid, apic_id) in board.apic_ids().enumerate() {
        t.bytes(at, &[madt::LOCAL_APIC, 8, uid as u8, apic_id]);
        t.u32(at + 4, madt::ENABLED);
        at += 8;
    }
    let io = &board.ioapic;
    t.bytes(at, &[madt::IO_APIC, 12, io.id, 0]);
    t.u32(at + 4, io.base as u32);
    t.u32(at + 8, io.gsi_base);
    at += 12;
    for o in &board.overrides {
        t.bytes(at, &[madt::INTERRUPT_SOURCE_OVERRIDE, 10, 0, o.irq]); // bus 0: ISA
        t.u32(at + 4, o.gsi);
        t.u16(at + 8, o.inti_flags());
        at += 10;
    }
    // LINT1 of every processor is the NMI input, flags "as the bus" (ACPI 6.4 5.2.12.7).
    t.bytes(
        at,
        &[
            madt::LOCAL_APIC_NMI,
            6,
            madt::ALL_PROCESSORS,
            0,
            0,
            madt::NMI_LINT,
        ],
    );
    t.finish()
}

/// The tables for `board`: the bytes to place at [`RSDP_ADDR`] and where each table went.
pub fn build(board: &Board) -> Result<(Vec<u8>, Layout), AcpiError> {
    let l = layout(board);
    if l.end > AREA_END {
        return Err(AcpiError::TooLarge { end: l.end });
    }
    let mut out = alloc::vec![0u8; (l.end - RSDP_ADDR) as usize];
    let parts = [
        (l.rsdp, rsdp(&l)),
        (l.rsdt, rsdt(&l)),
        (l.xsdt, xsdt(&l)),
        (l.fadt, fadt(board, &l)),
        (l.facs, facs()),
        (l.dsdt, dsdt()),
        (l.madt, madt(board)),
    ];
    for (at, bytes) in parts {
        let start = (at - RSDP_ADDR) as usize;
        out[start..start + bytes.len()].copy_from_slice(&bytes);
    }
    Ok((out, l))
}

/// Writes the tables for `board` into guest RAM (`ram` is guest-physical 0..) and returns the
/// RSDP's address, for `boot_params.acpi_rsdp_addr`.
pub fn install(ram: &mut [u8], board: &Board) -> Result<u64, AcpiError> {
    let (bytes, l) = build(board)?;
    let ram_len = ram.len() as u64;
    let dest = ram
        .get_mut(RSDP_ADDR as usize..l.end as usize)
        .ok_or(AcpiError::RamTooSmall {
            needed: l.end,
            ram: ram_len,
        })?;
    dest.copy_from_slice(&bytes);
    Ok(l.rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(m: &[u8], at: u64) -> u16 {
        let i = at as usize;
        u16::from_le_bytes([m[i], m[i + 1]])
    }
    fn u32_at(m: &[u8], at: u64) -> u32 {
        let i = at as usize;
        u32::from_le_bytes(m[i..i + 4].try_into().unwrap())
    }
    fn u64_at(m: &[u8], at: u64) -> u64 {
        let i = at as usize;
        u64::from_le_bytes(m[i..i + 8].try_into().unwrap())
    }

    /// The table at `at` in guest memory `m`: checks its signature, that its length is
    /// `len`, its checksum, and the OEM fields; returns its bytes.
    fn table<'a>(m: &'a [u8], at: u64, sig: &[u8; 4], len: usize) -> &'a [u8] {
        let i = at as usize;
        assert_eq!(&m[i..i + 4], sig);
        assert_eq!(u32_at(m, at + 4) as usize, len, "{sig:?} length");
        let t = &m[i..i + len];
        assert_eq!(sum(t), 0, "{sig:?} checksum");
        assert_eq!(&t[10..16], OEM_ID);
        assert_eq!(&t[16..24], OEM_TABLE_ID);
        assert_eq!(&t[28..32], CREATOR_ID);
        t
    }

    /// Finds the RSDP the way a kernel does: "RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF
    /// with a valid ACPI 1.0 checksum.
    fn scan_rsdp(m: &[u8]) -> Option<u64> {
        (0xe_0000..0x10_0000)
            .step_by(16)
            .find(|&a| &m[a..a + 8] == b"RSD PTR " && sum(&m[a..a + 20]) == 0)
            .map(|a| a as u64)
    }

    fn guest(board: &Board) -> Vec<u8> {
        let mut ram = alloc::vec![0u8; board.ram_bytes as usize];
        assert_eq!(install(&mut ram, board), Ok(RSDP_ADDR));
        ram
    }

    #[test]
    fn rsdp_is_found_by_scanning_and_points_at_both_roots() {
        let board = Board::pc(2 << 20, 1);
        let m = guest(&board);
        let rsdp = scan_rsdp(&m).expect("RSDP in the BIOS area");
        assert_eq!(rsdp, RSDP_ADDR);
        let r = &m[rsdp as usize..rsdp as usize + RSDP_LEN];
        assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(r), 0, "extended checksum");
        assert_eq!(&r[9..15], OEM_ID);
        assert_eq!(r[15], 2, "revision");
        assert_eq!(u32_at(r, 20), 36, "length");
        let l = layout(&board);
        assert_eq!(u32_at(r, 16) as u64, l.rsdt);
        assert_eq!(u64_at(r, 24), l.xsdt);

        let rsdt = table(&m, l.rsdt, b"RSDT", 44);
        assert_eq!(
            [u32_at(rsdt, 36) as u64, u32_at(rsdt, 40) as u64],
            [l.fadt, l.madt]
        );
        let xsdt = table(&m, l.xsdt, b"XSDT", 52);
        assert_eq!(xsdt[8], 1, "revision");
        assert_eq!([u64_at(xsdt, 36), u64_at(xsdt, 44)], [l.fadt, l.madt]);
        assert!(l.end <= AREA_END);
        assert_eq!(l.facs % 64, 0, "FACS alignment");
    }

    #[test]
    fn fadt_names_the_pm_blocks_the_board_registers() {
        let board = Board::pc(2 << 20, 1);
        let m = guest(&board);
        let l = layout(&board);
        let f = table(&m, l.fadt, b"FACP", FADT_LEN);
        let f0 = 0u64;
        assert_eq!(f[8], 6, "revision");
        assert_eq!(f[131], 0, "minor version");
        assert_eq!(u32_at(f, f0 + 36) as u64, l.facs);
        assert_eq!(u32_at(f, f0 + 40) as u64, l.dsdt);
        assert_eq!(u64_at(f, f0 + 132), l.facs);
        assert_eq!(u64_at(f, f0 + 140), l.dsdt);
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD: no SMM");
        assert_eq!([f[52], f[53]], [0, 0], "ACPI_ENABLE/DISABLE");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 60), 0, "PM1b_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 68), 0, "PM1b_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
        assert_eq!(u32_at(f, 80), 0, "GPE0_BLK");
        assert_eq!([f[88], f[89], f[90], f[91], f[92]], [4, 2, 0, 4, 0]);
        assert_eq!((u16_at(f, 96), u16_at(f, 98)), (101, 1001));
        assert_eq!(f[108], 0x32, "CENTURY");
        assert_eq!(u16_at(f, 109), 0b111, "legacy devices, 8042, no VGA");
        let flags = u32_at(f, 112);
        assert_eq!(flags, 0x0000_0535);
        assert_eq!(flags & fadt_flags::HW_REDUCED_ACPI, 0);
        // RESET_REG: system I/O, 8 bits at 0xCF9, byte access; RESET_VALUE 6.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), 0xcf9);
        assert_eq!(f[128], 6);
        // X_ blocks: system I/O, the same ports, widths 32/16/32 bits.
        for (at, port, bits) in [(148, 0x600, 32), (172, 0x604, 16), (208, 0x608, 32)] {
            assert_eq!(&f[at..at + 4], &[1, bits, 0, 0], "GAS at {at}");
            assert_eq!(u64_at(f, at as u64 + 4), port);
        }
        for unused in [160, 184, 196, 220, 232, 244, 256] {
            assert_eq!(&f[unused..unused + 12], &[0; 12], "GAS at {unused}");
        }
        assert_eq!(&f[268..276], b"KeelKeel");

        let facs = &m[l.facs as usize..l.facs as usize + FACS_LEN];
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u32_at(facs, 4), 64);
        assert_eq!(facs[32], 2);
    }

    #[test]
    fn dsdt_holds_s5_with_the_soft_off_slp_typ() {
        let board = Board::pc(2 << 20, 1);
        let m = guest(&board);
        let l = layout(&board);
        let d = table(&m, l.dsdt, b"DSDT", HEADER_LEN + 14);
        assert_eq!(d[8], 2, "revision 2: 64-bit integers");
        assert_eq!(
            &d[HEADER_LEN..],
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 8, 4, 0x0a, 0, 0x0a, 0, 0, 0]
        );
        // PkgLength 8 spans from itself to the end of the package.
        assert_eq!(usize::from(d[HEADER_LEN + 6]), d.len() - (HEADER_LEN + 6));
    }

    #[test]
    fn madt_lists_each_cpu_the_ioapic_overrides_and_lint1() {
        for cpus in [1u8, 4] {
            let board = Board::pc(2 << 20, cpus);
            let m = guest(&board);
            let l = layout(&board);
            let len = 44 + 8 * usize::from(cpus) + 12 + 20 + 6;
            let t = table(&m, l.madt, b"APIC", len);
            assert_eq!(u32_at(t, 36), 0xfee0_0000);
            assert_eq!(u32_at(t, 40), 1, "PCAT_COMPAT");
            let mut at = 44;
            for cpu in 0..cpus {
                assert_eq!(&t[at..at + 4], &[0, 8, cpu, cpu], "CPU {cpu}");
                assert_eq!(u32_at(t, at as u64 + 4), 1, "enabled");
                at += 8;
            }
            assert_eq!(&t[at..at + 4], &[1, 12, 0, 0], "IOAPIC id 0");
            assert_eq!(u32_at(t, at as u64 + 4), 0xfec0_0000);
            assert_eq!(u32_at(t, at as u64 + 8), 0, "GSI base");
            at += 12;
            assert_eq!(&t[at..at + 4], &[2, 10, 0, 0], "ISA IRQ0");
            assert_eq!(u32_at(t, at as u64 + 4), 2);
            assert_eq!(u16_at(t, at as u64 + 8), 0x5, "edge, high");
            at += 10;
            assert_eq!(&t[at..at + 4], &[2, 10, 0, 9], "ISA IRQ9 (SCI)");
            assert_eq!(u32_at(t, at as u64 + 4), 9);
            assert_eq!(u16_at(t, at as u64 + 8), 0xf, "level, low");
            at += 10;
            assert_eq!(&t[at..at + 6], &[4, 6, 0xff, 0, 0, 1], "LINT1 NMI");
            assert_eq!(at + 6, len);
        }
    }

    #[test]
    fn install_refuses_ram_that_ends_too_soon() {
        let board = Board::pc(2 << 20, 1);
        let mut small = alloc::vec![0u8; 0xe_0100];
        assert_eq!(
            install(&mut small, &board),
            Err(AcpiError::RamTooSmall {
                needed: layout(&board).end,
                ram: 0xe_0100
            })
        );
        assert!(small.iter().all(|&b| b == 0), "nothing written");
        // 254 CPUs still fit under 1 MiB; the layout grows with the CPU count only.
        let big = Board::pc(2 << 20, 254);
        assert!(build(&big).is_ok());
        assert_eq!(
            layout(&big).end - layout(&board).end,
            8 * 253,
            "8 bytes per extra CPU"
        );
    }
}
