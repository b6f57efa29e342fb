//! A 16550A UART (COM1 at 0x3F8-0x3FF, IRQ4), the guest's serial console.
//!
//! Register model after the PC16550D datasheet (National Semiconductor, now Texas Instruments
//! SNLS378: Table II registers; Table IV interrupt identification; section 8.6 FIFO interrupt mode
//! operation: the trigger level and the character timeout). Transmission is instantaneous: a byte written to THR goes
//! to the guest's console at once, so LSR always shows THRE and TEMT and the THRE interrupt
//! re-arms right after each write. Received bytes come from [`Uart16550::push_input`] into a
//! 16-byte FIFO (one byte with the FIFOs off).
//!
//! The UART's interrupt output reaches IRQ4 only while MCR.OUT2 is set and loopback is off: on the
//! IBM PC the INTRPT pin drives the ISA line through a buffer enabled by the ~OUT2 pin, and the
//! datasheet disconnects OUT2 from its pin in loopback mode. Linux's 8250 driver sets OUT2 on PCs.

use super::{ConsoleBuffer, Device, DeviceContext};
use crate::state::{self, Reader, StateError, Writer};
use alloc::collections::VecDeque;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u8 = 4;
/// Depth of the receive FIFO.
pub const FIFO_SIZE: usize = 16;

// Register offsets from the base port.
const RBR_THR_DLL: u16 = 0;
const IER_DLM: u16 = 1;
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;

// IER bits.
const IER_RDA: u8 = 1 << 0;
const IER_THRE: u8 = 1 << 1;
const IER_RLS: u8 = 1 << 2;
const IER_MSI: u8 = 1 << 3;

// IIR interrupt identifications (bits 3:1 with bit 0 clear), highest priority first.
const IIR_NONE: u8 = 0x01;
const IIR_RLS: u8 = 0x06;
const IIR_RDA: u8 = 0x04;
const IIR_TIMEOUT: u8 = 0x0c;
const IIR_THRE: u8 = 0x02;
const IIR_MSI: u8 = 0x00;
/// IIR bits 7:6 read 11 while the FIFOs are enabled.
const IIR_FIFO_ENABLED: u8 = 0xc0;

// FCR bits.
const FCR_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RX: u8 = 1 << 1;

const LCR_DLAB: u8 = 1 << 7;

// MCR bits.
const MCR_DTR: u8 = 1 << 0;
const MCR_RTS: u8 = 1 << 1;
const MCR_OUT1: u8 = 1 << 2;
const MCR_OUT2: u8 = 1 << 3;
const MCR_LOOP: u8 = 1 << 4;

// LSR bits.
const LSR_DR: u8 = 1 << 0;
const LSR_OE: u8 = 1 << 1;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;

// MSR bits: status in 7:4, deltas in 3:0.
const MSR_CTS: u8 = 1 << 4;
const MSR_DSR: u8 = 1 << 5;
const MSR_RI: u8 = 1 << 6;
const MSR_DCD: u8 = 1 << 7;
/// Outside loopback the modem lines show a connected peer: CTS, DSR and DCD asserted.
const MSR_CONNECTED: u8 = MSR_CTS | MSR_DSR | MSR_DCD;

#[derive(Debug)]
pub struct Uart16550 {
    base: u16,
    irq: u8,
    rx: VecDeque<u8>,
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    /// LSR error bits (OE, PE, FE, BI) latched until LSR is read.
    lsr_errors: u8,
    /// MSR delta bits (3:0) latched until MSR is read.
    msr_deltas: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    /// The THRE interrupt condition: set when THR empties, cleared by an IIR read that reports it
    /// or by a THR write.
    thre_pending: bool,
    /// The level last driven on the interrupt line.
    irq_level: bool,
    tx_bytes: u64,
    rx_lost: u64,
}

impl Uart16550 {
    pub fn new(base: u16, irq: u8) -> Self {
        Uart16550 {
            base,
            irq,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            lsr_errors: 0,
            msr_deltas: 0,
            scr: 0,
            // 115200 baud with the PC's 1.8432 MHz crystal until the guest programs it.
            dll: 1,
            dlm: 0,
            thre_pending: false,
            irq_level: false,
            tx_bytes: 0,
            rx_lost: 0,
        }
    }

    /// COM1 as every PC has it.
    pub fn com1() -> Self {
        Self::new(COM1_BASE, COM1_IRQ)
    }

    pub fn base(&self) -> u16 {
        self.base
    }

    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// The baud-rate divisor latch (baud = 115200 / divisor).
    pub fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.dll, self.dlm])
    }

    /// Bytes the guest has transmitted.
    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes
    }

    /// Received bytes lost to a full FIFO (overrun).
    pub fn rx_lost(&self) -> u64 {
        self.rx_lost
    }

    /// Delivers a byte to the receiver, as if it arrived on the line. Returns false if it overran
    /// the FIFO (LSR.OE is set; with the FIFOs on the new byte is lost, with them off it replaces
    /// the unread one, as in the datasheet).
    pub fn push_input(&mut self, byte: u8, cx: &mut DeviceContext<'_>) -> bool {
        let accepted = self.receive(byte);
        self.update_irq(cx);
        accepted
    }

    /// Whether the receiver can take another byte without an overrun.
    pub fn rx_room(&self) -> bool {
        self.rx.len() < self.rx_capacity()
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_SIZE
        } else {
            1
        }
    }

    /// Receiver FIFO trigger level (FCR bits 7:6).
    fn rx_trigger(&self) -> usize {
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    fn receive(&mut self, byte: u8) -> bool {
        if self.rx.len() < self.rx_capacity() {
            self.rx.push_back(byte);
            return true;
        }
        self.lsr_errors |= LSR_OE;
        self.rx_lost += 1;
        if !self.fifo_enabled() {
            self.rx.clear();
            self.rx.push_back(byte);
        }
        false
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// MSR bits 7:4. In loopback the modem outputs feed the inputs (datasheet, MCR bit 4): RTS to
    /// CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD.
    fn modem_status(&self) -> u8 {
        if !self.loopback() {
            return MSR_CONNECTED;
        }
        let m = self.mcr;
        let bit = |mask: u8, to: u8| if m & mask != 0 { to } else { 0 };
        bit(MCR_RTS, MSR_CTS)
            | bit(MCR_DTR, MSR_DSR)
            | bit(MCR_OUT1, MSR_RI)
            | bit(MCR_OUT2, MSR_DCD)
    }

    /// Latches the MSR delta bits for a change of the modem status from `old` to `new`.
    fn note_modem_change(&mut self, old: u8, new: u8) {
        let changed = old ^ new;
        if changed & MSR_CTS != 0 {
            self.msr_deltas |= 1 << 0;
        }
        if changed & MSR_DSR != 0 {
            self.msr_deltas |= 1 << 1;
        }
        // TERI: the trailing edge of RI only.
        if old & MSR_RI != 0 && new & MSR_RI == 0 {
            self.msr_deltas |= 1 << 2;
        }
        if changed & MSR_DCD != 0 {
            self.msr_deltas |= 1 << 3;
        }
    }

    /// The pending interrupt of highest priority (datasheet Table IV), as IIR bits 3:0.
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RLS != 0 && self.lsr_errors != 0 {
            IIR_RLS
        } else if self.ier & IER_RDA != 0 && self.rx.len() >= self.rx_trigger() {
            IIR_RDA
        } else if self.ier & IER_RDA != 0 && self.fifo_enabled() && !self.rx.is_empty() {
            // Below the trigger level: the character timeout. Keel reports it at once instead of
            // after four character times.
            IIR_TIMEOUT
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else if self.ier & IER_MSI != 0 && self.msr_deltas != 0 {
            IIR_MSI
        } else {
            IIR_NONE
        }
    }

    /// The level of the interrupt line: a pending interrupt, gated by OUT2, and none in
    /// loopback mode (the line is then disconnected: datasheet, MCR bit 4).
    fn line_level(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && !self.loopback() && self.interrupt_id() != IIR_NONE
    }

    fn update_irq(&mut self, cx: &mut DeviceContext<'_>) {
        let level = self.line_level();
        if level != self.irq_level {
            self.irq_level = level;
            cx.set_irq(self.irq, level);
        }
    }

    /// An access to a register that is storage and nothing more (`write`: the byte written, None
    /// for a read): SCR, LCR, the divisor latch while DLAB is set, and reads of IER and MCR.
    /// Such an access changes no FIFO, no interrupt condition and no modem line. Returns the
    /// byte read (0 for a write), or None, with nothing done, for any other access.
    fn plain_register(&mut self, reg: u16, write: Option<u8>) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        let slot = match reg {
            RBR_THR_DLL if dlab => &mut self.dll,
            IER_DLM if dlab => &mut self.dlm,
            IER_DLM | MCR if write.is_some() => return None,
            IER_DLM => &mut self.ier,
            LCR => &mut self.lcr,
            MCR => &mut self.mcr,
            SCR => &mut self.scr,
            _ => return None,
        };
        match write {
            Some(value) => {
                *slot = value;
                Some(0)
            }
            None => Some(*slot),
        }
    }

    /// True if reading `reg` now changes nothing (its value aside): RBR with nothing received,
    /// IIR not reporting THRE (reading that acknowledges it), LSR with no error to clear, MSR
    /// with no change to clear (datasheet, the register descriptions). The plain registers
    /// answer before this is asked.
    fn read_changes_nothing(&self, reg: u16) -> bool {
        match reg {
            RBR_THR_DLL => self.rx.is_empty(),
            IIR_FCR => self.interrupt_id() != IIR_THRE,
            LSR => self.lsr_errors == 0,
            MSR => self.msr_deltas == 0,
            _ => false,
        }
    }

    fn read_register(&mut self, reg: u16) -> u8 {
        if let Some(value) = self.plain_register(reg, None) {
            return value;
        }
        match reg {
            RBR_THR_DLL => self.rx.pop_front().unwrap_or(0),
            IIR_FCR => {
                let id = self.interrupt_id();
                if id == IIR_THRE {
                    self.thre_pending = false;
                }
                let fifo = if self.fifo_enabled() {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                id | fifo
            }
            LSR => {
                let dr = if self.rx.is_empty() { 0 } else { LSR_DR };
                let lsr = dr | self.lsr_errors | LSR_THRE | LSR_TEMT;
                self.lsr_errors = 0;
                lsr
            }
            MSR => {
                let msr = self.modem_status() | self.msr_deltas;
                self.msr_deltas = 0;
                msr
            }
            _ => 0xff,
        }
    }

    /// A write of THR (DLAB clear): the byte is sent at once, so THR is empty again, which is a
    /// new THRE condition. Returns the byte for the console; None in loopback, where the
    /// receiver took it.
    fn transmit(&mut self, value: u8) -> Option<u8> {
        self.tx_bytes += 1;
        self.thre_pending = true;
        if self.loopback() {
            self.receive(value);
            None
        } else {
            Some(value)
        }
    }

    fn write_register(&mut self, reg: u16, value: u8, cx: &mut DeviceContext<'_>) {
        if self.plain_register(reg, Some(value)).is_some() {
            return;
        }
        match reg {
            RBR_THR_DLL => {
                if let Some(byte) = self.transmit(value) {
                    cx.console().push(byte);
                }
            }
            IER_DLM => {
                let old = self.ier;
                self.ier = value & 0x0f;
                // Enabling the THRE interrupt while THR is empty (always, here) raises it.
                if old & IER_THRE == 0 && self.ier & IER_THRE != 0 {
                    self.thre_pending = true;
                }
            }
            IIR_FCR => {
                let enable = value & FCR_ENABLE;
                if enable != self.fcr & FCR_ENABLE || value & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
                // Bits 0, 3 (DMA mode) and 7:6 (trigger) are kept; 1 and 2 self-clear.
                self.fcr = if enable != 0 { value & 0xc9 } else { 0 };
            }
            MCR => {
                let old = self.modem_status();
                self.mcr = value & 0x1f;
                let new = self.modem_status();
                self.note_modem_change(old, new);
            }
            // LSR and MSR writes are for factory testing; ignored.
            LSR | MSR => {}
            _ => {}
        }
    }
}

crate::codec_struct!(Uart16550 {
    base,
    irq,
    rx,
    ier,
    fcr,
    lcr,
    mcr,
    lsr_errors,
    msr_deltas,
    scr,
    dll,
    dlm,
    thre_pending,
    irq_level,
    tx_bytes,
    rx_lost,
});

/// The section of this device's state (`crate::state`).
const STATE_TAG: [u8; 4] = *b"UART";
const STATE_VERSION: u16 = 1;

impl Device for Uart16550 {
    fn name(&self) -> &'static str {
        "uart16550"
    }

    fn save(&self, w: &mut Writer) {
        state::save_whole(w, STATE_TAG, STATE_VERSION, self);
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<(), StateError> {
        let (base, irq) = (self.base, self.irq);
        state::restore_whole(r, STATE_TAG, STATE_VERSION, self, |v| {
            if (v.base, v.irq) != (base, irq) {
                return Err("a UART at other ports or on another IRQ");
            }
            if v.rx.len() > FIFO_SIZE {
                return Err("a UART receive FIFO beyond 16 bytes");
            }
            Ok(())
        })
    }

    fn io_read(&mut self, port: u16, _size: u8, cx: &mut DeviceContext<'_>) -> u32 {
        let value = self.read_register(port.wrapping_sub(self.base) & 7);
        self.update_irq(cx);
        u32::from(value)
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, cx: &mut DeviceContext<'_>) {
        self.write_register(port.wrapping_sub(self.base) & 7, value as u8, cx);
        self.update_irq(cx);
    }

    /// The plain registers ([`Uart16550::plain_register`]), the reads that change nothing now
    /// and a byte sent whose new THRE condition leaves the line as it is
    /// ([`Uart16550::quiet_status_or_send`]), while the line already stands where `update_irq`
    /// puts it: `io_read`/`io_write` would drive nothing.
    fn io_quiet(
        &mut self,
        port: u16,
        write: Option<u8>,
        console: &mut ConsoleBuffer,
    ) -> Option<u8> {
        if self.line_level() != self.irq_level {
            return None;
        }
        let reg = port.wrapping_sub(self.base) & 7;
        if let Some(v) = self.plain_register(reg, write) {
            return Some(v);
        }
        self.quiet_status_or_send(reg, write, console)
    }
}

impl Uart16550 {
    /// [`Device::io_quiet`] past the plain registers: a read that changes nothing now
    /// ([`Uart16550::read_changes_nothing`]: a polled console's line-status read), or a byte
    /// sent whose new THRE condition leaves the line as it is (THRE's interrupt off, as a polled
    /// console has it). A call of its own, so that a plain register's access saves no
    /// registers for it.
    #[inline(never)]
    fn quiet_status_or_send(
        &mut self,
        reg: u16,
        write: Option<u8>,
        console: &mut ConsoleBuffer,
    ) -> Option<u8> {
        match write {
            None if self.read_changes_nothing(reg) => Some(self.read_register(reg)),
            // DLAB is clear here: `plain_register` took the divisor latch.
            Some(value) if reg == RBR_THR_DLL && !self.loopback() => {
                let was = core::mem::replace(&mut self.thre_pending, true);
                if self.line_level() != self.irq_level {
                    self.thre_pending = was;
                    return None;
                }
                if let Some(byte) = self.transmit(value) {
                    console.push(byte);
                }
                Some(0)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Bench;

    struct Rig {
        uart: Uart16550,
        bench: Bench,
    }

    impl Rig {
        fn new() -> Self {
            Rig {
                uart: Uart16550::com1(),
                bench: Bench::default(),
            }
        }
        fn read(&mut self, reg: u16) -> u8 {
            self.uart.io_read(COM1_BASE + reg, 1, &mut self.bench.cx(0)) as u8
        }
        fn write(&mut self, reg: u16, value: u8) {
            let v = u32::from(value);
            self.uart
                .io_write(COM1_BASE + reg, 1, v, &mut self.bench.cx(0));
        }
        fn push(&mut self, byte: u8) -> bool {
            self.uart.push_input(byte, &mut self.bench.cx(0))
        }
        fn irq(&self) -> bool {
            self.bench.lines.levels[usize::from(COM1_IRQ)]
        }
    }

    #[test]
    fn transmit_goes_to_the_console() {
        let mut r = Rig::new();
        assert_eq!(r.read(LSR), LSR_THRE | LSR_TEMT);
        for b in b"ok\r\n" {
            r.write(RBR_THR_DLL, *b);
        }
        assert_eq!(r.bench.console.take_line().as_deref(), Some("ok"));
        assert_eq!(r.uart.tx_bytes(), 4);
        assert_eq!(r.read(LSR), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn divisor_latch_is_behind_dlab() {
        let mut r = Rig::new();
        r.write(IER_DLM, 0x05);
        r.write(LCR, 0x80 | 0x03);
        r.write(RBR_THR_DLL, 0x0c);
        r.write(IER_DLM, 0x00);
        assert_eq!((r.read(RBR_THR_DLL), r.read(IER_DLM)), (0x0c, 0x00));
        r.write(LCR, 0x03);
        assert_eq!(r.uart.divisor(), 12);
        assert_eq!(r.read(IER_DLM), 0x05);
        assert_eq!(r.read(LCR), 0x03);
        assert_eq!(
            r.bench.console.bytes_written(),
            0,
            "DLL write is not a THR write"
        );
        r.write(SCR, 0x5a);
        assert_eq!(r.read(SCR), 0x5a);
    }

    #[test]
    fn thre_interrupt_follows_ier_iir_and_thr() {
        let mut r = Rig::new();
        r.write(MCR, MCR_OUT2);
        assert_eq!(r.read(IIR_FCR), IIR_NONE);
        r.write(IER_DLM, IER_THRE);
        assert!(r.irq());
        assert_eq!(r.read(IIR_FCR), IIR_THRE);
        // Reading IIR with THRE reported clears it.
        assert!(!r.irq());
        assert_eq!(r.read(IIR_FCR), IIR_NONE);
        // A THR write empties at once and raises it again: a new edge.
        r.write(RBR_THR_DLL, b'x');
        assert!(r.irq());
        assert_eq!(r.bench.lines.edges[4], 2);
        r.write(IER_DLM, 0);
        assert!(!r.irq());
    }

    #[test]
    fn irq_needs_out2() {
        let mut r = Rig::new();
        r.write(IER_DLM, IER_THRE);
        assert!(!r.irq());
        r.write(MCR, MCR_OUT2);
        assert!(r.irq());
        r.write(MCR, 0);
        assert!(!r.irq());
    }

    #[test]
    fn receive_fifo_trigger_timeout_and_overrun() {
        let mut r = Rig::new();
        r.write(MCR, MCR_OUT2);
        r.write(IIR_FCR, 0x41); // FIFO on, trigger level 4
        r.write(IER_DLM, IER_RDA | IER_RLS);
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        assert!(r.push(b'a'));
        assert!(r.irq());
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_TIMEOUT);
        for b in b"bcd" {
            r.push(*b);
        }
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_RDA);
        assert_eq!(r.read(LSR) & LSR_DR, LSR_DR);
        for _ in 4..FIFO_SIZE {
            assert!(r.push(b'z'));
        }
        assert!(!r.push(b'!'));
        assert_eq!(r.uart.rx_lost(), 1);
        // Line status outranks received data.
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_RLS);
        assert_eq!(r.read(LSR) & LSR_OE, LSR_OE);
        assert_eq!(r.read(LSR) & LSR_OE, 0, "LSR read clears OE");
        assert_eq!(r.read(RBR_THR_DLL), b'a');
        let mut rest = 0;
        while r.read(LSR) & LSR_DR != 0 {
            r.read(RBR_THR_DLL);
            rest += 1;
        }
        assert_eq!(rest, FIFO_SIZE - 1);
        assert!(!r.irq());
        assert_eq!(r.read(RBR_THR_DLL), 0);
    }

    /// What Linux's 8250 driver does with a 16550A in interrupt mode: FIFO with trigger level 8
    /// (FCR 0x81), IER = RDI | RLSI | THRI, OUT2. A few typed bytes (below the trigger) show as
    /// the character timeout (IIR 0xCC), which outranks THRE (Table IV); reading them while
    /// LSR.DR clears it and leaves THRE to report (IIR 0xC2).
    #[test]
    fn linux_interrupt_mode_receive_then_transmit() {
        let mut r = Rig::new();
        r.write(IIR_FCR, 0x81);
        r.write(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        r.write(IER_DLM, IER_RDA | IER_RLS | IER_THRE);
        assert!(r.uart.rx_room());
        for b in b"ls\r" {
            assert!(r.push(*b));
        }
        assert!(r.irq());
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_TIMEOUT);
        let mut got = alloc::vec::Vec::new();
        while r.read(LSR) & LSR_DR != 0 {
            got.push(r.read(RBR_THR_DLL));
        }
        assert_eq!(got, b"ls\r");
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_THRE);
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        assert!(!r.irq());
        // Eight bytes reach the trigger level: received data available, not the timeout.
        for b in 0..8 {
            r.push(b);
        }
        assert_eq!(r.read(IIR_FCR), IIR_FIFO_ENABLED | IIR_RDA);
        r.read(RBR_THR_DLL);
        assert_eq!(
            r.read(IIR_FCR),
            IIR_FIFO_ENABLED | IIR_TIMEOUT,
            "below the trigger again"
        );
        for _ in 0..7 {
            r.read(RBR_THR_DLL);
        }
        assert!(!r.irq());
        // A full FIFO has no room: Keel holds further bytes instead of overrunning it.
        for b in 0..FIFO_SIZE as u8 {
            r.push(b);
        }
        assert!(!r.uart.rx_room());
    }

    #[test]
    fn without_fifo_the_newest_byte_overwrites() {
        let mut r = Rig::new();
        assert!(r.push(1));
        assert!(!r.push(2));
        assert_eq!(r.read(RBR_THR_DLL), 2);
        assert_eq!(r.read(LSR) & (LSR_OE | LSR_DR), LSR_OE);
    }

    #[test]
    fn fifo_disable_clears_and_iir_shows_fifo_bits() {
        let mut r = Rig::new();
        r.write(IIR_FCR, 0xc7);
        assert_eq!(r.read(IIR_FCR) & 0xc0, 0xc0);
        r.push(7);
        r.write(IIR_FCR, 0);
        assert_eq!(r.read(IIR_FCR), IIR_NONE);
        assert_eq!(r.read(LSR) & LSR_DR, 0);
    }

    #[test]
    fn loopback_as_linux_probes_it() {
        let mut r = Rig::new();
        r.write(IER_DLM, IER_THRE | IER_RDA);
        // Linux's autoconfig: MCR = LOOP | OUT2 | RTS (0x1a), then expects MSR & 0xf0 == 0x90.
        r.write(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
        assert_eq!(r.read(MSR) & 0xf0, MSR_DCD | MSR_CTS);
        r.write(RBR_THR_DLL, 0x55);
        assert_eq!(r.bench.console.bytes_written(), 0);
        assert!(!r.irq(), "interrupt output is cut in loopback");
        assert_eq!(r.read(RBR_THR_DLL), 0x55);
        r.write(MCR, MCR_OUT2);
        assert!(r.irq(), "THRE still pending once loopback ends");
    }

    #[test]
    fn modem_status_interrupt_and_deltas() {
        let mut r = Rig::new();
        assert_eq!(r.read(MSR), MSR_CONNECTED);
        r.write(IER_DLM, IER_MSI);
        r.write(MCR, MCR_LOOP | MCR_OUT1);
        // Entering loopback drops CTS, DSR, DCD (deltas) and raises RI.
        assert_eq!(r.read(IIR_FCR), IIR_MSI);
        assert_eq!(r.read(MSR), MSR_RI | 0x0b);
        r.write(MCR, MCR_LOOP);
        assert_eq!(r.read(MSR), 0x04, "trailing edge of RI");
        assert_eq!(r.read(MSR), 0);
        assert_eq!(r.read(IIR_FCR), IIR_NONE);
    }
}
