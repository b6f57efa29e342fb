//! The description of the machine one guest sees: its CPUs, its interrupt controllers and how the
//! ISA interrupts reach them, where the ACPI, PCI, i8042 and fw_cfg registers sit, and its RAM.
//!
//! Not to be confused with `crate::machine`, which describes the host Keel itself runs on. A
//! [`Board`] is the one source both sides of the guest's platform are built from:
//! [`Platform::for_board`](super::Platform::for_board) registers the device models at these
//! addresses, and `crate::acpi` writes the tables that tell the guest's kernel about them, so the
//! tables and the devices cannot disagree.

/// Where the first local APIC sits (SDM 10.4.1: the IA32_APIC_BASE reset value).
pub const LAPIC_BASE: u64 = super::lapic::LAPIC_BASE;
/// Where the IOAPIC sits (the PC and QEMU default).
pub const IOAPIC_BASE: u64 = super::ioapic::IOAPIC_BASE;
/// The ACPI PM register block, at QEMU's PIIX4/ICH9 base 0x600.
pub const PM_BASE: u16 = 0x600;
/// The ISA IRQ the ACPI SCI is wired to (the PIIX4/ICH convention, and what QEMU uses).
pub const SCI_IRQ: u8 = 9;
/// PCI configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC-0xCFF.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// The PIIX3/ICH reset control register (inside the CONFIG_ADDRESS dword, byte accesses only).
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// The value written to [`RESET_CONTROL_PORT`] for a hard reset (SRST | RCPU).
pub const RESET_CONTROL_VALUE: u8 = 0x06;
/// The i8042 keyboard controller: data port 0x60, status/command port 0x64.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// QEMU's fw_cfg on x86: selector 0x510 (16-bit), data 0x511 (8-bit).
pub const FW_CFG_PORT: u16 = 0x510;

/// The polarity of an interrupt input, as the MPS INTI flags (ACPI 6.4 Table 5.50) encode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polarity {
    /// As the bus defines it (ISA: active high).
    Bus,
    High,
    Low,
}

/// The trigger mode of an interrupt input, as the MPS INTI flags encode it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// As the bus defines it (ISA: edge).
    Bus,
    Edge,
    Level,
}

/// An ISA IRQ that does not arrive on the IOAPIC pin of the same number or with ISA's polarity
/// and trigger mode (an ACPI Interrupt Source Override, ACPI 6.4 5.2.12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqOverride {
    pub irq: u8,
    pub gsi: u32,
    pub polarity: Polarity,
    pub trigger: Trigger,
}

impl IrqOverride {
    /// The MPS INTI flags: polarity in bits 1:0 (00 bus, 01 high, 11 low), trigger mode in bits
    /// 3:2 (00 bus, 01 edge, 11 level).
    pub fn inti_flags(&self) -> u16 {
        let polarity = match self.polarity {
            Polarity::Bus => 0b00,
            Polarity::High => 0b01,
            Polarity::Low => 0b11,
        };
        let trigger = match self.trigger {
            Trigger::Bus => 0b00,
            Trigger::Edge => 0b01,
            Trigger::Level => 0b11,
        };
        polarity | trigger << 2
    }
}

/// The IOAPIC: its APIC ID, MMIO base and the first GSI of its pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicDesc {
    pub id: u8,
    pub base: u64,
    pub gsi_base: u32,
}

/// The ACPI fixed-hardware register blocks (ACPI 6.4 4.8.3) as I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmBlocks {
    /// PM1a event block: PM1_STS (2 bytes) then PM1_EN (2 bytes).
    pub event: u16,
    /// PM1a control block (2 bytes).
    pub control: u16,
    /// The PM timer (4 bytes).
    pub timer: u16,
}

crate::codec_struct!(PmBlocks {
    event,
    control,
    timer
});

impl PmBlocks {
    pub const EVENT_LEN: u8 = 4;
    pub const CONTROL_LEN: u8 = 2;
    pub const TIMER_LEN: u8 = 4;
}

/// The SLP_TYP value of the soft-off state: `\_S5` in the DSDT gives it, and the PM1 control
/// model powers the guest off when the guest writes it with SLP_EN. 0, as QEMU's PIIX4 PM
/// (its `\_S5` is {0, 0, 0, 0}), so test kernels that power QEMU off with `outw(0x604, 0x2000)`
/// power Keel's guest off too.
pub const SLP_TYP_S5: u8 = 0;

/// The guest's machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    /// Bytes of RAM from guest-physical 0.
    pub ram_bytes: u64,
    /// Number of CPUs; CPU n has local APIC ID n and ACPI processor UID n.
    pub cpus: u8,
    pub lapic_base: u64,
    pub ioapic: IoApicDesc,
    /// Every ISA IRQ that is not identity-mapped with ISA's edge/high signalling.
    pub overrides: [IrqOverride; 2],
    pub sci_irq: u8,
    pub pm: PmBlocks,
    /// The century byte's index in CMOS (0 = none); the RTC model keeps it at 0x32.
    pub rtc_century: u8,
}

impl Board {
    /// The PC Keel gives every guest: `ram_bytes` of RAM and `cpus` CPUs, an IOAPIC at
    /// 0xFEC00000 with GSIs 0-23, ISA IRQs 0-15 on GSIs 0-15 except IRQ0 (the PIT) on GSI 2, the
    /// SCI on IRQ 9 (level, active low: the SCI's signalling in ACPI 6.4 5.2.9, SCI_INT), the PM
    /// blocks at 0x600.
    pub fn pc(ram_bytes: u64, cpus: u8) -> Self {
        Board {
            ram_bytes,
            cpus: cpus.max(1),
            lapic_base: LAPIC_BASE,
            ioapic: IoApicDesc {
                id: 0,
                base: IOAPIC_BASE,
                gsi_base: 0,
            },
            overrides: [
                IrqOverride {
                    irq: 0,
                    gsi: 2,
                    polarity: Polarity::High,
                    trigger: Trigger::Edge,
                },
                IrqOverride {
                    irq: SCI_IRQ,
                    gsi: u32::from(SCI_IRQ),
                    polarity: Polarity::Low,
                    trigger: Trigger::Level,
                },
            ],
            sci_irq: SCI_IRQ,
            pm: PmBlocks {
                event: PM_BASE,
                control: PM_BASE + 4,
                timer: PM_BASE + 8,
            },
            rtc_century: 0x32,
        }
    }

    /// The local APIC IDs of the CPUs, in processor order.
    pub fn apic_ids(&self) -> impl Iterator<Item = u8> {
        0..self.cpus
    }

    /// The GSI ISA IRQ `irq` arrives on.
    pub fn gsi_for_irq(&self, irq: u8) -> u32 {
        self.overrides
            .iter()
            .find(|o| o.irq == irq)
            .map_or(self.ioapic.gsi_base + u32::from(irq), |o| o.gsi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic;

    #[test]
    fn inti_flags_follow_the_mps_encoding() {
        let b = Board::pc(64 << 20, 1);
        assert_eq!(b.overrides[0].inti_flags(), 0x0005, "edge, active high");
        assert_eq!(b.overrides[1].inti_flags(), 0x000f, "level, active low");
        let bus = IrqOverride {
            irq: 1,
            gsi: 1,
            polarity: Polarity::Bus,
            trigger: Trigger::Bus,
        };
        assert_eq!(bus.inti_flags(), 0);
    }

    /// The IOAPIC model routes the lines the way the description (and so the MADT) says.
    #[test]
    fn the_ioapic_model_wires_isa_irqs_as_described() {
        let b = Board::pc(64 << 20, 1);
        for irq in 0..16u8 {
            assert_eq!(
                u32::from(ioapic::pin_for_line(irq)),
                b.gsi_for_irq(irq) - b.ioapic.gsi_base,
                "IRQ {irq}"
            );
        }
        assert_eq!(b.gsi_for_irq(0), 2);
        assert_eq!(b.gsi_for_irq(9), 9);
        assert_eq!(b.apic_ids().collect::<alloc::vec::Vec<_>>(), [0]);
        assert_eq!(Board::pc(1 << 20, 0).cpus, 1);
    }
}
