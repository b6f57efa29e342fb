//! The ACPI fixed-hardware registers (ACPI 6.4 4.8): the PM1a event block (PM1_STS, PM1_EN), the
//! PM1a control block (PM1_CNT) and the power management timer, at the ports the guest's
//! [`Board`](super::board::Board) gives and the FADT names.
//!
//! - There is no SMM and no SMI_CMD port, so the machine is always in ACPI mode: SCI_EN reads 1
//!   and cannot be cleared (ACPI 6.4 4.8.2.5: without SMI_CMD "the system is always in ACPI mode").
//! - Writing SLP_EN with SLP_TYP = [`SLP_TYP_S5`] (0, the `\_S5` value in the DSDT, as on QEMU's
//!   PIIX4) turns the machine off: the device asks for [`PowerEvent::SoftOff`] and Keel ends the guest. Other sleep types
//!   are not offered in the DSDT and are ignored (the guest keeps running, as if it woke at once
//!   without setting WAK_STS).
//! - The PM timer counts at 3.579545 MHz on the guest's virtual TSC, 32 bits wide (the FADT sets
//!   TMR_VAL_EXT). TMR_STS is set each time bit 31 changes (ACPI 6.4 4.8.3.3); with TMR_EN it
//!   raises the SCI, a level-triggered line (ACPI 6.4 4.8.2.5), which falls when the guest clears
//!   every enabled status bit.
//! - Fixed power and sleep buttons, the RTC alarm and bus-master status are not modelled: their
//!   status bits read 0, their enable bits are kept.
//!
//! Registers are byte-wide here; the platform splits the guest's 16/32-bit accesses, all at the
//! same `now`, so a 32-bit timer read is one consistent value.

use super::board::{PmBlocks, SLP_TYP_S5};
use super::clock::ClockRate;
use super::{Device, DeviceContext, PowerEvent};
use crate::state::{self, Reader, StateError, Writer};

/// The PM timer's clock (ACPI 6.4 4.8.3.3): 3.579545 MHz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// PM1_STS bits (ACPI 6.4 Table 4.16).
pub const TMR_STS: u16 = 1 << 0;
pub const WAK_STS: u16 = 1 << 15;
/// PM1_EN bits (ACPI 6.4 Table 4.17): TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN,
/// PCIEXP_WAKE_DIS.
pub const TMR_EN: u16 = 1 << 0;
const PM1_EN_WRITABLE: u16 = 0x4721;
/// PM1_CNT bits (ACPI 6.4 Table 4.18).
pub const SCI_EN: u16 = 1 << 0;
const BM_RLD: u16 = 1 << 1;
pub const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;

/// The timer's bit that sets TMR_STS when it changes (32-bit timer).
const TIMER_MSB_SHIFT: u32 = 31;

#[derive(Debug)]
pub struct AcpiPm {
    blocks: PmBlocks,
    sci: u8,
    timer: ClockRate,
    /// TMR_STS, last brought up to date at `msb_epoch`.
    tmr_sts: bool,
    /// How many times timer bit 31 had changed when TMR_STS was last brought up to date.
    msb_epoch: u64,
    pm1_en: u16,
    /// BM_RLD and SLP_TYP as last written.
    pm1_cnt: u16,
    /// The level the SCI line was last driven to.
    sci_level: bool,
}

impl AcpiPm {
    /// The PM registers at `blocks`, raising the SCI on ISA line `sci`, on a TSC of `tsc_hz`.
    pub fn new(blocks: PmBlocks, sci: u8, tsc_hz: u64) -> Self {
        AcpiPm {
            blocks,
            sci,
            timer: ClockRate::new(PM_TIMER_HZ, tsc_hz),
            tmr_sts: false,
            msb_epoch: 0,
            pm1_en: 0,
            pm1_cnt: 0,
            sci_level: false,
        }
    }

    /// The port ranges to register: (first, count) for the event, control and timer blocks.
    pub fn ports(&self) -> [(u16, u16); 3] {
        [
            (self.blocks.event, u16::from(PmBlocks::EVENT_LEN)),
            (self.blocks.control, u16::from(PmBlocks::CONTROL_LEN)),
            (self.blocks.timer, u16::from(PmBlocks::TIMER_LEN)),
        ]
    }

    /// The PM timer's value at guest TSC `now`.
    pub fn timer_value(&self, now: u64) -> u32 {
        self.timer.ticks_at(now) as u32
    }

    fn update_status(&mut self, now: u64) {
        let epoch = self.timer.ticks_at(now) >> TIMER_MSB_SHIFT;
        if epoch != self.msb_epoch {
            self.msb_epoch = epoch;
            self.tmr_sts = true;
        }
    }

    fn pm1_sts(&self) -> u16 {
        if self.tmr_sts {
            TMR_STS
        } else {
            0
        }
    }

    fn pm1_cnt(&self) -> u16 {
        self.pm1_cnt | SCI_EN
    }

    /// Drives the SCI: asserted while an enabled status bit is set (SCI_EN is always 1).
    fn update_sci(&mut self, cx: &mut DeviceContext<'_>) {
        let level = self.pm1_sts() & self.pm1_en != 0;
        if level != self.sci_level {
            self.sci_level = level;
            cx.set_irq(self.sci, level);
        }
    }

    /// A write of the PM1_CNT byte `byte` (0 or 1) with `value`.
    fn write_control(&mut self, byte: u16, value: u8, cx: &mut DeviceContext<'_>) {
        let shift = 8 * byte;
        let v = u16::from(value) << shift;
        let kept = (BM_RLD | SLP_TYP_MASK) & (0xff << shift);
        self.pm1_cnt = (self.pm1_cnt & !kept) | (v & kept);
        // ACPI 6.4 4.8.3.2.1: writing SLP_EN enters the sleep state SLP_TYP names.
        if v & SLP_EN != 0 {
            let slp_typ = (self.pm1_cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
            if slp_typ == u16::from(SLP_TYP_S5) {
                cx.request_power(PowerEvent::SoftOff);
            }
        }
    }
}

/// Byte `i` of a little-endian register.
fn byte_of(v: u32, i: u16) -> u32 {
    (v >> (8 * u32::from(i))) & 0xff
}

crate::codec_struct!(AcpiPm {
    blocks,
    sci,
    timer,
    tmr_sts,
    msb_epoch,
    pm1_en,
    pm1_cnt,
    sci_level,
});

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"ACPI";
const STATE_VERSION: u16 = 1;

impl Device for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        let (blocks, sci, timer) = (self.blocks, self.sci, self.timer);
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if (v.blocks, v.sci, v.timer) != (blocks, sci, timer) {
                return Err("ACPI PM registers at other ports, SCI or clock");
            }
            if v.msb_epoch > 1 << 56 {
                return Err("a PM timer epoch beyond 2^56");
            }
            Ok(())
        })
    }

    fn io_read(&mut self, port: u16, _size: u8, cx: &mut DeviceContext<'_>) -> u32 {
        self.update_status(cx.now());
        self.update_sci(cx);
        let b = &self.blocks;
        if let Some(i) = port.checked_sub(b.event).filter(|&i| i < 4) {
            let v = u32::from(self.pm1_sts()) | u32::from(self.pm1_en) << 16;
            byte_of(v, i)
        } else if let Some(i) = port.checked_sub(b.control).filter(|&i| i < 2) {
            byte_of(u32::from(self.pm1_cnt()), i)
        } else if let Some(i) = port.checked_sub(b.timer).filter(|&i| i < 4) {
            byte_of(self.timer_value(cx.now()), i)
        } else {
            0xff
        }
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        self.update_status(cx.now());
        let value = value as u8;
        let b = &self.blocks;
        match (
            port.checked_sub(b.event).filter(|&i| i < 4),
            port.checked_sub(b.control).filter(|&i| i < 2),
        ) {
            // PM1_STS: write 1 to clear (ACPI 6.4 4.8.3.1.1).
            (Some(0), _) if value & TMR_STS as u8 != 0 => self.tmr_sts = false,
            (Some(i @ (2 | 3)), _) => {
                let shift = 8 * (i - 2);
                let mask = PM1_EN_WRITABLE & (0xff << shift);
                self.pm1_en = (self.pm1_en & !mask) | ((u16::from(value) << shift) & mask);
            }
            (None, Some(i)) => self.write_control(i, value, cx),
            // The rest of PM1_STS and the timer are read-only.
            _ => {}
        }
        self.update_sci(cx);
    }

    fn advance(&mut self, cx: &mut DeviceContext<'_>) {
        self.update_status(cx.now());
        self.update_sci(cx);
    }

    /// With TMR_EN set and TMR_STS clear, the next change of timer bit 31 raises the SCI.
    fn next_deadline(&self) -> Option<u64> {
        (self.pm1_en & TMR_EN != 0 && !self.tmr_sts)
            .then(|| self.timer.tsc_at((self.msb_epoch + 1) << TIMER_MSB_SHIFT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::board::Board;
    use crate::devices::testing::Bench;

    const TSC_HZ: u64 = 2_000_000_000;

    fn pm() -> AcpiPm {
        let b = Board::pc(64 << 20, 1);
        AcpiPm::new(b.pm, b.sci_irq, TSC_HZ)
    }

    fn read16(d: &mut AcpiPm, port: u16, bench: &mut Bench, now: u64) -> u16 {
        let lo = d.io_read(port, 1, &mut bench.cx(now));
        let hi = d.io_read(port + 1, 1, &mut bench.cx(now));
        (lo | hi << 8) as u16
    }

    fn write16(d: &mut AcpiPm, port: u16, v: u16, bench: &mut Bench, now: u64) {
        d.io_write(port, 1, u32::from(v & 0xff), &mut bench.cx(now));
        d.io_write(port + 1, 1, u32::from(v >> 8), &mut bench.cx(now));
    }

    fn read32(d: &mut AcpiPm, port: u16, bench: &mut Bench, now: u64) -> u32 {
        (0..4).fold(0, |v, i| {
            v | d.io_read(port + i, 1, &mut bench.cx(now)) << (8 * i)
        })
    }

    #[test]
    fn timer_counts_at_3_579545_mhz_on_the_tsc() {
        let mut bench = Bench::default();
        let mut d = pm();
        assert_eq!(read32(&mut d, 0x608, &mut bench, 0), 0);
        assert_eq!(read32(&mut d, 0x608, &mut bench, TSC_HZ), 3_579_545);
        assert_eq!(read32(&mut d, 0x608, &mut bench, TSC_HZ / 1000), 3_579);
        // 32 bits wide: it wraps after 2^32 ticks (about 20 minutes).
        let wrap = d.timer.tsc_at(1 << 32);
        assert_eq!(read32(&mut d, 0x608, &mut bench, wrap), 0);
        assert_eq!(d.timer_value(wrap - 1), u32::MAX);
        // Writes to the timer are ignored.
        d.io_write(0x608, 1, 0x55, &mut bench.cx(0));
        assert_eq!(read32(&mut d, 0x608, &mut bench, 0), 0);
    }

    #[test]
    fn sci_en_reads_one_and_stays_set() {
        let mut bench = Bench::default();
        let mut d = pm();
        assert_eq!(read16(&mut d, 0x604, &mut bench, 0), SCI_EN);
        write16(&mut d, 0x604, 0, &mut bench, 0);
        assert_eq!(read16(&mut d, 0x604, &mut bench, 0), SCI_EN);
        // BM_RLD and SLP_TYP are kept; GBL_RLS and SLP_EN read 0.
        write16(&mut d, 0x604, 0x0c06, &mut bench, 0);
        assert_eq!(read16(&mut d, 0x604, &mut bench, 0), 0x0c03);
        assert_eq!(bench.power, None);
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off() {
        let mut bench = Bench::default();
        let mut d = pm();
        // Types other than \_S5's (1 is S3 under QEMU, 5 S5 on some chipsets) are ignored.
        for typ in [1u16, 2, 5, 7] {
            write16(&mut d, 0x604, SLP_EN | typ << 10, &mut bench, 0);
            assert_eq!(bench.power, None, "SLP_TYP {typ}");
        }
        // Linux: SLP_TYP first, then SLP_TYP | SLP_EN (acpi_hw_legacy_sleep).
        write16(&mut d, 0x604, 0, &mut bench, 0);
        assert_eq!(bench.power, None, "SLP_TYP alone does not sleep");
        write16(&mut d, 0x604, SLP_EN, &mut bench, 0);
        assert_eq!(bench.power, Some(PowerEvent::SoftOff));
        // QEMU's own idiom, `outw(0x604, 0x2000)`, as one byte write of the high half too.
        let mut bench = Bench::default();
        let mut d = pm();
        d.io_write(0x605, 1, 0x20, &mut bench.cx(0));
        assert_eq!(bench.power, Some(PowerEvent::SoftOff));
    }

    #[test]
    fn pm1_enable_keeps_defined_bits_and_status_is_write_one_to_clear() {
        let mut bench = Bench::default();
        let mut d = pm();
        write16(&mut d, 0x602, 0xffff, &mut bench, 0);
        assert_eq!(read16(&mut d, 0x602, &mut bench, 0), 0x4721);
        assert_eq!(read16(&mut d, 0x600, &mut bench, 0), 0);
        write16(&mut d, 0x602, 0, &mut bench, 0);
        // TMR_STS is set once bit 31 has changed, whether or not TMR_EN is set.
        let flip = d.timer.tsc_at(1 << 31);
        assert_eq!(read16(&mut d, 0x600, &mut bench, flip - 1), 0);
        assert_eq!(read16(&mut d, 0x600, &mut bench, flip), TMR_STS);
        assert_eq!(bench.lines.edges[9], 0, "TMR_EN clear: no SCI");
        write16(&mut d, 0x600, WAK_STS, &mut bench, flip);
        assert_eq!(
            read16(&mut d, 0x600, &mut bench, flip),
            TMR_STS,
            "0 bits kept"
        );
        write16(&mut d, 0x600, TMR_STS, &mut bench, flip);
        assert_eq!(read16(&mut d, 0x600, &mut bench, flip), 0);
    }

    #[test]
    fn timer_overflow_raises_the_sci_until_cleared() {
        let mut bench = Bench::default();
        let mut d = pm();
        assert_eq!(d.next_deadline(), None);
        write16(&mut d, 0x602, TMR_EN, &mut bench, 0);
        let flip = d.timer.tsc_at(1 << 31);
        assert_eq!(d.next_deadline(), Some(flip));
        d.advance(&mut bench.cx(flip));
        assert!(bench.lines.levels[9], "SCI asserted");
        assert_eq!(d.next_deadline(), None, "until TMR_STS is cleared");
        write16(&mut d, 0x600, TMR_STS, &mut bench, flip + 1);
        assert!(!bench.lines.levels[9], "SCI released");
        assert_eq!(d.next_deadline(), Some(d.timer.tsc_at(2 << 31)));
        // Disabling the enable with the status set also drops the line.
        let second = d.timer.tsc_at(2 << 31);
        d.advance(&mut bench.cx(second));
        assert!(bench.lines.levels[9]);
        write16(&mut d, 0x602, 0, &mut bench, second);
        assert!(!bench.lines.levels[9]);
        assert_eq!(bench.lines.edges[9], 2);
    }
}
