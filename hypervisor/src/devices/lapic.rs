//! The guest's local APIC: xAPIC mode (MMIO page at 0xFEE00000) and x2APIC mode (MSRs
//! 0x800-0x8FF).
//!
//! After the Intel SDM Vol. 3A chapter 11 ("Advanced Programmable Interrupt Controller"; chapter
//! 10 in editions before 2023): ID, version, TPR/PPR (11.8.3.1), EOI (11.8.5), LDR/DFR and logical
//! destinations (11.6.2), SVR software enable (11.4.7.2), ISR/TMR/IRR (11.8.4), ESR (11.5.3), ICR
//! (11.6.1), the LVT (11.5.1) and the timer in one-shot, periodic and TSC-deadline modes (11.5.4);
//! x2APIC (11.12): the mode transitions of IA32_APIC_BASE (11.12.5), the MSR interface with its
//! #GP rules (11.12.1, Table 11-6), the 32-bit ID and derived logical ID (11.12.10), the 64-bit
//! ICR (11.12.9) and SELF IPI (11.12.11).
//!
//! Each vCPU has one, with its index as APIC ID. Interrupts it sends to other processors are
//! recorded ([`Lapic::take_ipi`]) and delivered by the VM's interrupt fabric
//! (`devices::platform`), which owns every vCPU's APIC.
//! The timer's input clock is [`LAPIC_TIMER_HZ`]. Not modelled: the arbitration priority register
//! (reads 0), the thermal and performance-counter sources (their LVT entries are plain storage),
//! relocation of the MMIO page, focus checking, INIT and SIPI to oneself.

use super::clock::{ClockRate, Schedule, LAPIC_TIMER_HZ};
use super::Latch;
use alloc::vec::Vec;

/// Guest-physical base of the xAPIC page (IA32_APIC_BASE reset value, SDM 10.4.4).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;
/// Version register: version 0x14 (an integrated xAPIC), max LVT entry 5 (six entries), no EOI
/// broadcast suppression.
pub const LAPIC_VERSION: u32 = 0x0005_0014;

/// IA32_APIC_BASE bits (SDM 11.4.4, 11.12.1): BSP, EXTD (x2APIC mode), EN (global enable).
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// The x2APIC's MSRs: MSR 0x800 + n is the register at offset n * 16 of the xAPIC page
/// (SDM 11.12.1.2).
pub const X2APIC_MSRS: core::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// The initial APIC ID of a guest's bootstrap processor, vCPU 0 (CPUID.1:EBX[31:24],
/// CPUID.0BH:EDX); vCPU n has APIC ID n.
pub const INITIAL_APIC_ID: u32 = 0;

/// The x2APIC MSR of the timer's current count: the one readable register whose value is not
/// stored but computed at the read, so APIC-register virtualization cannot serve it.
pub const X2APIC_TIMER_CURRENT: u32 = 0x839;
/// How many registers [`Lapic::page_image`] gives.
pub const PAGE_IMAGE_LEN: usize = 25;

// Register offsets (SDM Table 10-1).
const ID: u64 = 0x020;
const VERSION: u64 = 0x030;
const TPR: u64 = 0x080;
const APR: u64 = 0x090;
const PPR: u64 = 0x0a0;
const EOI: u64 = 0x0b0;
const RRD: u64 = 0x0c0;
const LDR: u64 = 0x0d0;
const DFR: u64 = 0x0e0;
const SVR: u64 = 0x0f0;
const ISR0: u64 = 0x100;
const TMR0: u64 = 0x180;
const IRR0: u64 = 0x200;
const IRR_LAST: u64 = 0x270;
const ESR: u64 = 0x280;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const LVT_ERROR: u64 = 0x370;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3e0;
/// x2APIC only (SDM 11.12.11).
const SELF_IPI: u64 = 0x3f0;

// LVT indices, in register order from 0x320.
const TIMER: usize = 0;
const LINT0: usize = 3;
const LINT1: usize = 4;
const ERROR: usize = 5;
/// Writable bits of each LVT entry (SDM Figure 10-8): timer, thermal, performance, LINT0, LINT1,
/// error.
const LVT_WRITABLE: [u32; 6] = [0x7_00ff, 0x1_07ff, 0x1_07ff, 0x1_a7ff, 0x1_a7ff, 0x1_00ff];
const LVT_MASKED: u32 = 1 << 16;

const SVR_ENABLE: u32 = 1 << 8;

// ESR bits (SDM Figure 10-9).
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// Bits of the low ICR dword that exist (vector, delivery mode, destination mode, level, trigger
/// mode, shorthand); the xAPIC's delivery status (12) is read-only, and absent in x2APIC mode
/// (SDM 11.12.9).
const ICR_LOW_BITS: u32 = 0x000c_cfff;

/// A register access the APIC refuses: #GP (RDMSR/WRMSR in x2APIC mode, WRMSR of
/// IA32_APIC_BASE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpFault;

/// The APIC's mode, from IA32_APIC_BASE.EN and EXTD (SDM Table 11-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicMode {
    Disabled,
    XApic,
    X2Apic,
}

/// Delivery modes (SDM 10.5.1, 10.6.1).
pub mod delivery {
    pub const FIXED: u8 = 0;
    pub const LOWEST_PRIORITY: u8 = 1;
    pub const SMI: u8 = 2;
    pub const NMI: u8 = 4;
    pub const INIT: u8 = 5;
    pub const STARTUP: u8 = 6;
    pub const EXTINT: u8 = 7;
}

/// Recorded IPIs beyond which older ones are dropped.
const MAX_RECORDED_IPIS: usize = 16;

/// An interrupt message on the APIC bus (from the IOAPIC, or an IPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicMessage {
    pub vector: u8,
    pub delivery_mode: u8,
    /// Logical (true) or physical destination mode.
    pub logical: bool,
    pub destination: u8,
    /// Level triggered (sets the TMR bit, asks for an EOI broadcast).
    pub level_triggered: bool,
}

/// What receives APIC messages: the local APIC, or a recorder in tests.
pub trait MessageSink {
    fn deliver(&mut self, msg: ApicMessage) -> Latch;
}

/// An ICR command that names processors other than this one (recorded, not delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    pub icr_low: u32,
    /// xAPIC: the destination in bits 31:24; x2APIC: the 32-bit destination.
    pub icr_high: u32,
    /// Sent in x2APIC mode.
    pub x2apic: bool,
}

impl Ipi {
    pub fn vector(&self) -> u8 {
        self.icr_low as u8
    }
    pub fn delivery_mode(&self) -> u8 {
        ((self.icr_low >> 8) & 7) as u8
    }
    /// Destination shorthand: 0 none, 1 self, 2 all including self, 3 all excluding self.
    pub fn shorthand(&self) -> u8 {
        ((self.icr_low >> 18) & 3) as u8
    }
    /// Logical (true) or physical destination mode.
    pub fn logical(&self) -> bool {
        self.icr_low & (1 << 11) != 0
    }
    /// The destination field: 8 bits in xAPIC mode, 32 in x2APIC mode.
    pub fn destination(&self) -> u32 {
        if self.x2apic {
            self.icr_high
        } else {
            self.icr_high >> 24
        }
    }
    /// SDM Table 11-3 ("Valid Combinations for the Pentium 4 and Intel Xeon Processors' Local
    /// xAPIC Interrupt Command Register"), which x2APIC mode keeps: the "self" and "all including
    /// self" shorthands go with fixed delivery only. The SDM leaves the effect of an invalid
    /// combination undefined; Keel sends nothing.
    pub fn valid(&self) -> bool {
        !matches!(self.shorthand(), 1 | 2) || self.delivery_mode() == delivery::FIXED
    }
}

/// Timer mode, LVT timer bits 18:17 (SDM 10.5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// Timer counters: how often it fired into IRR, and ticks folded into a pending one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerStats {
    pub fired: u64,
    pub coalesced: u64,
}

/// The LAPIC timer's next expiry, worked out ahead ([`Lapic::timer_shot`]): valid while the timer
/// is as it was ([`Lapic::fire_shot`] checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerShot {
    lvt: u32,
    tsc_deadline: u64,
    schedule: Option<Schedule>,
    after: Option<Schedule>,
    /// The TSC at which the timer fires.
    pub at: u64,
    /// The TSC from which a second expiry would be due (the following one of a periodic timer,
    /// also its next deadline after this one; `u64::MAX` for the other modes).
    pub single_before: u64,
    /// The vector its expiry sets in IRR.
    pub vector: u8,
}

impl TimerShot {
    /// The timer's deadline after the expiry: the following one of a periodic timer.
    pub fn next_after(&self) -> Option<u64> {
        self.after.is_some().then_some(self.single_before)
    }
}

/// How a timer shot's vector reaches the guest ([`Lapic::timer_shot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShotWay {
    /// Posted to the virtual-APIC page (virtual-interrupt delivery); `mirrored`: the page
    /// mirrors the APIC's registers (APIC-register virtualization).
    Posted { mirrored: bool },
    /// Injected at the VM entry (no virtual-interrupt delivery): accepted by the processor as
    /// the APIC offers it.
    Injected,
}

#[derive(Debug, Clone)]
pub struct Lapic {
    clock: ClockRate,
    apic_base: u64,
    /// The xAPIC ID register's 8 bits (writable in xAPIC mode).
    id: u8,
    /// The x2APIC ID (read-only; the vCPU's initial APIC ID).
    x2apic_id: u32,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    irr: Vectors,
    isr: Vectors,
    tmr: Vectors,
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    /// Count modes: the LAPIC-clock tick at which the current count started from the initial.
    timer_start: Option<u64>,
    /// Count modes: the next expiry, in LAPIC-clock ticks.
    timer_schedule: Option<Schedule>,
    /// TSC-deadline mode: IA32_TSC_DEADLINE (0 = disarmed).
    tsc_deadline: u64,
    nmi_pending: bool,
    ipis: Vec<Ipi>,
    timer_stats: TimerStats,
    /// Whether a register of [`Lapic::page_image`] may have changed since it was last taken.
    page_stale: Stale,
    /// Whether the ICR's low half changed since the page was last written, and nothing else
    /// of [`Lapic::page_image`] ([`Lapic::take_icr_stale`]): an IPI sent.
    icr_stale: Stale,
    /// With virtual-interrupt delivery: what the CPU's copy of IRR and ISR (on the vCPU's
    /// virtual-APIC page) lacks since they were last posted there ([`Lapic::posted`]), for
    /// [`Lapic::set_vectors`] to merge.
    since_post: SincePost,
}

/// What happened to an APIC since its IRR and ISR were last posted to the virtual-APIC page
/// (no part of its saved state: a restored APIC posts afresh before its vCPU runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SincePost {
    /// The vectors accepted since (a sibling's IPI, an IOAPIC interrupt, the timer while
    /// another vCPU advanced the platform): the CPU has not seen them.
    Arrived([u32; 8]),
    /// The APIC was reset (INIT, a disable): what the page holds is from before.
    Reset,
}

impl crate::state::Codec for SincePost {
    fn put(&self, _w: &mut crate::state::Writer) {}
    fn get(_r: &mut crate::state::Reader<'_>) -> Result<Self, crate::state::StateError> {
        Ok(SincePost::Reset)
    }
}

/// A flag that is no part of the APIC's saved state: a restored APIC reads as stale, so the
/// virtual-APIC page is written afresh from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stale(bool);

impl crate::state::Codec for Stale {
    fn put(&self, _w: &mut crate::state::Writer) {}
    fn get(_r: &mut crate::state::Reader<'_>) -> Result<Self, crate::state::StateError> {
        Ok(Stale(true))
    }
}

crate::codec_struct!(Ipi {
    icr_low,
    icr_high,
    x2apic
});
crate::codec_struct!(TimerStats { fired, coalesced });
crate::codec_struct!(Lapic {
    clock,
    apic_base,
    id,
    x2apic_id,
    tpr,
    ldr,
    dfr,
    svr,
    irr,
    isr,
    tmr,
    esr,
    esr_pending,
    icr_low,
    icr_high,
    lvt,
    timer_initial,
    timer_divide,
    timer_start,
    timer_schedule,
    tsc_deadline,
    nmi_pending,
    ipis,
    timer_stats,
    page_stale,
    icr_stale,
    since_post
});

/// IPIs a vCPU may have sent and the platform not yet routed: the run loop routes them after
/// every APIC write, so a saved APIC holds at most a few.
const STATE_IPIS_MAX: usize = 64;

impl Lapic {
    /// Writes the APIC's state (section `LAPC`, `crate::state`): its registers, its pending
    /// interrupts and its timer, whose start and next expiry are on the guest's own clock (the
    /// LAPIC timer's ticks of the guest TSC), so a guest restored with its clock resumes its
    /// timer where it was, with no jump.
    pub fn save(&self, w: &mut crate::state::Writer) {
        crate::state::save_whole(w, *b"LAPC", 1, self);
    }

    /// Takes over what [`Lapic::save`] wrote, if it is this vCPU's APIC (the same x2APIC ID, the
    /// same clock); unchanged on an error.
    pub fn restore(
        &mut self,
        r: &mut crate::state::Reader<'_>,
    ) -> Result<(), crate::state::StateError> {
        let (clock, x2apic_id) = (self.clock, self.x2apic_id);
        crate::state::restore_whole(r, *b"LAPC", 1, self, |v| {
            if v.clock != clock {
                return Err("the local APIC's clock differs from this machine's");
            }
            if v.x2apic_id != x2apic_id {
                return Err("the local APIC of another vCPU");
            }
            if v.ipis.len() > STATE_IPIS_MAX {
                return Err("more unsent IPIs than a local APIC holds");
            }
            if v.timer_divide & !0xb != 0 || v.lvt.iter().any(|l| l >> 19 != 0) {
                return Err("local APIC registers with reserved bits set");
            }
            Ok(())
        })
    }
}

impl Lapic {
    /// The bootstrap processor's APIC (ID 0) as firmware hands it over: globally enabled,
    /// software-disabled (SVR 0xFF), LINT0 in ExtINT and LINT1 in NMI delivery (virtual-wire mode,
    /// MP spec 3.6.2.2), so the 8259A's interrupts reach the CPU until the guest takes over.
    pub fn new(tsc_hz: u64) -> Self {
        Self::for_cpu(INITIAL_APIC_ID as u8, tsc_hz)
    }

    /// The APIC of vCPU `id` (its APIC ID) at power-on. Only the bootstrap processor (ID 0) has
    /// IA32_APIC_BASE.BSP and the virtual-wire LINT0/LINT1 set-up the firmware leaves; an
    /// application processor's LVT entries are all masked (SDM 10.4.7.1), so the 8259A's INTR
    /// reaches the BSP only.
    pub fn for_cpu(id: u8, tsc_hz: u64) -> Self {
        let bsp = u32::from(id) == INITIAL_APIC_ID;
        let mut l = Lapic {
            clock: ClockRate::new(LAPIC_TIMER_HZ, tsc_hz),
            apic_base: LAPIC_BASE | APIC_BASE_ENABLE | if bsp { APIC_BASE_BSP } else { 0 },
            id,
            x2apic_id: u32::from(id),
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            irr: Vectors::EMPTY,
            isr: Vectors::EMPTY,
            tmr: Vectors::EMPTY,
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer_start: None,
            timer_schedule: None,
            tsc_deadline: 0,
            nmi_pending: false,
            ipis: Vec::new(),
            timer_stats: TimerStats::default(),
            page_stale: Stale(true),
            icr_stale: Stale(false),
            since_post: SincePost::Reset,
        };
        l.reset();
        if bsp {
            l.lvt[LINT0] = u32::from(delivery::EXTINT) << 8;
            l.lvt[LINT1] = u32::from(delivery::NMI) << 8;
        }
        l
    }

    /// An INIT IPI arrived (SDM 10.4.7.3): the APIC goes back to its power-up state but keeps
    /// its ID and IA32_APIC_BASE; a pending NMI and unsent IPIs go too.
    pub fn init(&mut self) {
        self.reset();
        self.nmi_pending = false;
        self.ipis.clear();
    }

    /// An NMI arrived from another processor's ICR: pending until taken.
    pub fn raise_nmi(&mut self) -> Latch {
        if core::mem::replace(&mut self.nmi_pending, true) {
            Latch::AlreadyPending
        } else {
            Latch::New
        }
    }

    /// Whether this APIC takes fixed interrupts and NMIs at all (globally enabled, SDM 10.4.3).
    pub fn enabled(&self) -> bool {
        self.globally_enabled()
    }

    /// The power-up state of SDM 10.4.7.1 (kept: the ID and IA32_APIC_BASE).
    fn reset(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = 0xff;
        self.irr = Vectors::EMPTY;
        self.isr = Vectors::EMPTY;
        self.tmr = Vectors::EMPTY;
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer_start = None;
        self.timer_schedule = None;
        self.tsc_deadline = 0;
        self.page_stale = Stale(true);
        self.since_post = SincePost::Reset;
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// IA32_APIC_BASE as the guest reads it.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// The mode IA32_APIC_BASE selects.
    pub fn mode(&self) -> ApicMode {
        match (
            self.globally_enabled(),
            self.apic_base & APIC_BASE_EXTD != 0,
        ) {
            (false, _) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        }
    }

    /// A guest write of IA32_APIC_BASE's EN and EXTD bits (the caller checks the base address
    /// and reserved bits). The base address stays at 0xFEE00000 and the BSP flag is kept.
    ///
    /// SDM 11.12.5 (Figure 11-27): the legal transitions are disabled -> xAPIC, xAPIC -> x2APIC
    /// and xAPIC or x2APIC -> disabled; x2APIC -> xAPIC, disabled -> x2APIC and EXTD without EN
    /// are #GP. Disabling puts the APIC in its power-up state (SDM 11.4.3) and passes the
    /// 8259A's INTR straight to the CPU; entering x2APIC mode keeps the registers except the ID
    /// (the x2APIC ID), the LDR (derived from it) and the ICR's destination half (11.12.5.1).
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), GpFault> {
        let new = match (value & APIC_BASE_ENABLE != 0, value & APIC_BASE_EXTD != 0) {
            (false, false) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
            (false, true) => return Err(GpFault),
        };
        match (self.mode(), new) {
            (ApicMode::X2Apic, ApicMode::XApic) | (ApicMode::Disabled, ApicMode::X2Apic) => {
                return Err(GpFault)
            }
            (ApicMode::XApic, ApicMode::X2Apic) => {
                self.id = self.x2apic_id as u8;
                self.icr_high = 0;
            }
            (ApicMode::XApic | ApicMode::X2Apic, ApicMode::Disabled) => self.reset(),
            _ => {}
        }
        let bits = APIC_BASE_ENABLE | APIC_BASE_EXTD;
        self.apic_base = (self.apic_base & !bits) | (value & bits);
        // The ID, the LDR and the ICR's destination have another layout in x2APIC mode.
        self.page_stale = Stale(true);
        Ok(())
    }

    fn globally_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Writes TPR (also how a MOV to CR8 lands: CR8[3:0] is TPR[7:4], SDM 10.8.6.1).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = tpr;
    }

    /// Processor priority (SDM 10.8.3.1).
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    pub fn timer_stats(&self) -> TimerStats {
        self.timer_stats
    }

    /// True if the 8259A's INTR output reaches the CPU: the APIC is globally disabled, or LINT0
    /// is unmasked in ExtINT mode (virtual wire).
    pub fn accepts_pic_intr(&self) -> bool {
        let lint0 = self.lvt[LINT0];
        !self.globally_enabled()
            || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == u32::from(delivery::EXTINT))
    }

    /// The vector to deliver: the highest IRR vector whose priority class exceeds PPR's
    /// (SDM 10.8.3.1).
    pub fn deliverable(&self) -> Option<u8> {
        if !self.globally_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (v & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The highest vector pending in IRR, deliverable or not (for the TPR threshold of APIC
    /// virtualization, `vmx::apicv`).
    pub fn highest_irr(&self) -> Option<u8> {
        self.irr.highest()
    }

    /// The 256-bit IRR, ISR and TMR (SDM 11.8.4), for APIC virtualization
    /// (`exits::apicv`): the interrupts Keel posts to the CPU, those it has in service, and those
    /// whose EOI must reach the IOAPIC.
    pub fn vectors(&self) -> (&[u32; 8], &[u32; 8], &[u32; 8]) {
        (&self.irr.words, &self.isr.words, &self.tmr.words)
    }

    /// Which words of IRR and ISR ([`Lapic::vectors`]) are non-zero: bit i for word i, kept
    /// with the vectors (no scan).
    pub fn vector_summaries(&self) -> (u8, u8) {
        (self.irr.summary, self.isr.summary)
    }

    /// Takes IRR and ISR from the CPU that owned them while the guest ran (virtual-interrupt
    /// delivery moves vectors from one to the other, EOI virtualization clears ISR bits and
    /// self-IPI virtualization sets IRR bits, without Keel: SDM 30.1.4, 30.1.5, 30.2). The
    /// vectors accepted since they were posted ([`Lapic::posted`]), while the vCPU ran (a
    /// sibling's IPI, an IOAPIC interrupt, sent from another host CPU), stay pending: the
    /// CPU's copy lacks them, even one it delivered from an earlier post meanwhile. After a
    /// reset since the post the CPU's copy is stale and the model's stands.
    pub fn set_vectors(&mut self, irr: &[u32; 8], isr: &[u32; 8]) {
        let SincePost::Arrived(arrived) = self.since_post else {
            return;
        };
        self.irr = Vectors::from_words(core::array::from_fn(|i| irr[i] | arrived[i]));
        self.isr = Vectors::from_words(*isr);
    }

    /// The CPU's copy of IRR and ISR, posted ([`Lapic::posted`]), was found empty: the guest
    /// took and ended every vector posted. When nothing arrived since the post, the model takes
    /// that (as [`Lapic::set_vectors`] of empty ones and [`Lapic::posted`] would) and true. False,
    /// with nothing changed, when a vector arrived since (the CPU lacks it: a post must give it)
    /// or the APIC was reset since.
    pub fn settle_empty(&mut self) -> bool {
        if !self.nothing_since_post() {
            return false;
        }
        self.irr = Vectors::from_words([0; 8]);
        self.isr = Vectors::from_words([0; 8]);
        true
    }

    /// Whether IRR and ISR were posted ([`Lapic::posted`]) with no vector accepted and no reset
    /// since. Eight ORs, not a comparison of the arrays (which is a call of `memcmp`, about 50
    /// instructions in Bochs).
    #[inline]
    fn nothing_since_post(&self) -> bool {
        matches!(self.since_post, SincePost::Arrived(a) if a.iter().fold(0, |s, w| s | w) == 0)
    }

    /// IRR and ISR were posted to the CPU as [`Lapic::vectors`] gives them: from here on the
    /// CPU owns them while the vCPU runs, and [`Lapic::set_vectors`] merges what arrives.
    pub fn posted(&mut self) {
        self.since_post = SincePost::Arrived([0; 8]);
    }

    /// Whether a vector in service is level triggered (its TMR bit), so that its EOI goes on
    /// to the IOAPIC (SDM 11.8.5).
    pub fn level_triggered(&self, vector: u8) -> bool {
        self.tmr.test(vector)
    }

    /// The processor accepted `vector`: IRR to ISR (SDM 10.8.4).
    pub fn acknowledge(&mut self, vector: u8) {
        self.irr.clear(vector);
        self.isr.set(vector);
    }

    /// Whether an NMI is pending.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Takes a pending NMI (from the IOAPIC, LINT1 or an ICR NMI to self).
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi_pending)
    }

    /// Takes the oldest recorded IPI to other processors.
    pub fn take_ipi(&mut self) -> Option<Ipi> {
        (!self.ipis.is_empty()).then(|| self.ipis.remove(0))
    }

    /// A fixed interrupt arrives: sets IRR (and TMR for level triggered). Vectors 0-15 are
    /// illegal and set ESR bit 6 instead (SDM 10.5.3).
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> Latch {
        if vector < 16 {
            self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return Latch::Masked;
        }
        if self.tmr.test(vector) != level_triggered {
            self.page_stale = Stale(true);
        }
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        if let SincePost::Arrived(arrived) = &mut self.since_post {
            // Even one the model holds pending: the CPU may have delivered it since the post.
            arrived[usize::from(vector >> 5)] |= 1 << (vector & 31);
        }
        if self.irr.test(vector) {
            return Latch::AlreadyPending;
        }
        self.irr.set(vector);
        Latch::New
    }

    /// Records an error and raises the error LVT if it is unmasked (SDM 10.5.3).
    fn error(&mut self, bits: u32) {
        let new = bits & !self.esr_pending;
        self.esr_pending |= bits;
        let lvt = self.lvt[ERROR];
        if new != 0 && lvt & LVT_MASKED == 0 && lvt as u8 >= 16 {
            self.irr.set(lvt as u8);
        }
    }

    /// Does a message for `destination` (8 bits: from the IOAPIC, or an xAPIC IPI) reach this
    /// APIC (SDM 11.6.2)? 0xFF is the broadcast.
    pub fn matches(&self, destination: u8, logical: bool) -> bool {
        destination == 0xff || self.matches_id(u32::from(destination), logical)
    }

    /// Whether `destination` names this APIC: its ID, or its logical ID by the LDR and DFR in
    /// xAPIC mode (11.6.2.2) or by the x2APIC's cluster and bit (11.12.10.2).
    pub fn matches_id(&self, destination: u32, logical: bool) -> bool {
        let x2apic = self.mode() == ApicMode::X2Apic;
        match (x2apic, logical) {
            (true, false) => return destination == self.x2apic_id,
            (false, false) => return destination == u32::from(self.id),
            (true, true) => {
                let ldr = self.x2apic_ldr();
                return destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0;
            }
            (false, true) => {}
        }
        let destination = destination as u8;
        let ldr = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            ldr & destination != 0 // flat model: a bit per APIC
        } else {
            // Cluster model: cluster in bits 7:4, a bit per APIC in 3:0.
            ldr >> 4 == destination >> 4 && ldr & destination & 0x0f != 0
        }
    }

    /// End of interrupt: clears the highest ISR bit; returns its vector if it was level
    /// triggered, for the EOI broadcast to the IOAPIC (SDM 10.8.5).
    pub fn eoi(&mut self) -> Option<u8> {
        let v = self.isr.highest()?;
        self.isr.clear(v);
        self.tmr.test(v).then_some(v)
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[TIMER] >> 17) & 3 {
            0 => TimerMode::OneShot,
            2 => TimerMode::TscDeadline,
            // 11b is reserved; treated as periodic.
            _ => TimerMode::Periodic,
        }
    }

    /// The divide configuration as a divisor (SDM Figure 10-10: bits 3, 1:0).
    fn timer_divisor(&self) -> u64 {
        let code = ((self.timer_divide >> 1) & 4) | (self.timer_divide & 3);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// Starts counting down from the initial count at LAPIC tick `t` (0 stops the timer).
    fn arm_count(&mut self, t: u64) {
        if self.timer_initial == 0 || self.timer_mode() == TimerMode::TscDeadline {
            self.timer_start = None;
            self.timer_schedule = None;
            return;
        }
        let period = u64::from(self.timer_initial) * self.timer_divisor();
        self.timer_start = Some(t);
        self.timer_schedule = Some(match self.timer_mode() {
            TimerMode::Periodic => Schedule::periodic(t + period, period),
            _ => Schedule::once(t + period),
        });
    }

    /// The current-count register at LAPIC tick `t`.
    fn current_count(&self, t: u64) -> u32 {
        let Some(start) = self.timer_start else {
            return 0;
        };
        let initial = u64::from(self.timer_initial);
        let elapsed = t.saturating_sub(start) / self.timer_divisor();
        let count = match self.timer_mode() {
            TimerMode::Periodic => initial - elapsed % initial,
            TimerMode::OneShot => initial.saturating_sub(elapsed),
            TimerMode::TscDeadline => 0,
        };
        count as u32
    }

    /// IA32_TSC_DEADLINE as the guest reads it: 0 outside TSC-deadline mode and once it fired.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// A guest write of IA32_TSC_DEADLINE at TSC `now`: arms the timer for TSC `value` (0
    /// disarms). Ignored outside TSC-deadline mode (SDM 10.5.4.1).
    pub fn write_tsc_deadline(&mut self, value: u64, now: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            // An armed deadline already passed fired before the write moved it.
            self.advance(now);
            self.tsc_deadline = value;
            // A deadline already passed fires at the next advance.
            self.advance(now);
        }
    }

    /// Whether a write of IA32_TSC_DEADLINE of `value` at `now` fires nothing
    /// ([`Lapic::write_tsc_deadline`]): outside TSC-deadline mode it is ignored; in it, with no
    /// armed deadline passed, 0 disarms the timer and a deadline still ahead only moves it
    /// (SDM Vol. 3A 11.5.4.1). Then the write changes no register, line or vector, only the
    /// timer's next deadline.
    pub fn deadline_write_is_quiet(&self, value: u64, now: u64) -> bool {
        self.timer_mode() != TimerMode::TscDeadline || self.deadline_only_moves(value, now)
    }

    /// In TSC-deadline mode: no armed deadline passed, and `value` disarms or lies ahead.
    #[inline]
    fn deadline_only_moves(&self, value: u64, now: u64) -> bool {
        (self.tsc_deadline == 0 || self.tsc_deadline > now) && (value == 0 || value > now)
    }

    /// [`Lapic::write_tsc_deadline`] of a write that fires nothing
    /// ([`Lapic::deadline_write_is_quiet`]), checked and made in one step: true, and the
    /// deadline moved or disarmed (or, outside TSC-deadline mode, the write ignored); false, with
    /// nothing done, for a write that fires the timer.
    #[inline]
    pub fn move_tsc_deadline(&mut self, value: u64, now: u64) -> bool {
        if self.timer_mode() != TimerMode::TscDeadline {
            return true;
        }
        let moves = self.deadline_only_moves(value, now);
        if moves {
            self.tsc_deadline = value;
        }
        moves
    }

    /// Raises the timer's LVT vector (unless masked); `missed` more expiries were folded in.
    fn timer_fired(&mut self, missed: u64) {
        let lvt = self.lvt[TIMER];
        if lvt & LVT_MASKED != 0 {
            return;
        }
        self.timer_stats.fired += 1;
        self.timer_stats.coalesced += missed;
        if self.accept(lvt as u8, false) == Latch::AlreadyPending {
            self.timer_stats.coalesced += 1;
        }
    }

    /// The vector a timer expiry would set in IRR, if nothing else of the APIC changes with it
    /// and it is all the APIC holds for the guest, the way `way` gives it: the APIC globally
    /// enabled, the timer's LVT entry unmasked with a legal vector (16-255, SDM 11.5.3) that is
    /// not marked level triggered in the TMR (the timer's interrupt is edge triggered: its
    /// acceptance leaves the TMR, so the EOI-exit bitmap and the page image, unchanged), IRR
    /// and ISR empty and no NMI pending. Then:
    /// - [`ShotWay::Posted`]: nothing accepted since the last post ([`Lapic::posted`]) and,
    ///   when the page mirrors the registers (`mirrored`: APIC-register virtualization), none
    ///   of them nor the ICR changed since they were taken. The expiry is one vector to post
    ///   ([`Platform::fire_shot`](super::Platform::fire_shot)).
    /// - [`ShotWay::Injected`]: the vector's priority class above the TPR's. With ISR empty
    ///   the PPR is the TPR (SDM 11.8.3.1), so the vector is the one the APIC offers the
    ///   processor (SDM 11.8.4) and is accepted at once
    ///   ([`Platform::fire_shot_injected`](super::Platform::fire_shot_injected)).
    #[inline]
    pub fn timer_alone_vector(&self, way: ShotWay) -> Option<u8> {
        let lvt = self.lvt[TIMER];
        let vector = lvt as u8;
        let alone = self.globally_enabled()
            && lvt & LVT_MASKED == 0
            && vector >= 16
            && !self.tmr.test(vector)
            && self.irr.summary == 0
            && self.isr.summary == 0
            && !self.nmi_pending;
        let quiet = alone
            && match way {
                ShotWay::Posted { mirrored } => {
                    self.nothing_since_post()
                        && !(mirrored && (self.page_stale.0 || self.icr_stale.0))
                }
                ShotWay::Injected => vector & 0xf0 > self.tpr & 0xf0,
            };
        quiet.then_some(vector)
    }

    /// The timer's next expiry worked out ahead, for the VMX-preemption timer armed for it
    /// (`runloop::note_deadline`): the TSC at which it fires, its vector, and what the expiry
    /// leaves (the timer's next deadline, its schedule), when [`Lapic::timer_alone_vector`]
    /// says the expiry is that vector alone. [`Lapic::fire_shot`] carries it out, but only while
    /// the LVT entry and the timer's count or deadline are as they were here.
    #[inline(always)]
    pub fn timer_shot(&self, way: ShotWay) -> Option<TimerShot> {
        let at = self.next_deadline()?;
        let vector = self.timer_alone_vector(way)?;
        let (after, single_before) = match self.timer_mode() {
            TimerMode::TscDeadline => (None, u64::MAX),
            _ => {
                // `advance` at a tick before `next + period`: one expiry, none missed
                // (`Schedule::fire`); the first TSC of that tick is `tsc_at`'s.
                let mut s = self.timer_schedule?;
                let next = s.next()?;
                s.fire(next)?;
                match s.next() {
                    Some(n) => (Some(s), self.clock.tsc_at(n)),
                    None => (None, u64::MAX),
                }
            }
        };
        // A saturated clock's deadline is never reached (`advance` would find nothing due).
        (at != u64::MAX).then_some(TimerShot {
            lvt: self.lvt[TIMER],
            tsc_deadline: self.tsc_deadline,
            schedule: self.timer_schedule,
            after,
            at,
            single_before,
            vector,
        })
    }

    /// The timer's expiry as `shot` worked it out (`now` at or past `shot.at`, before
    /// `shot.single_before`), if the timer is still as it was then (the LVT entry, the TSC
    /// deadline, the count's schedule): the state [`Lapic::advance`] leaves, its counter, and the
    /// vector in IRR. The rest of what the shot was worked out from ([`Lapic::timer_alone_vector`]:
    /// IRR and ISR empty, nothing accepted since the post, no NMI) changes only by the platform's
    /// own calls, after which the run loop works the shot out again. False, nothing done, if
    /// the timer changed since.
    #[inline]
    pub fn fire_shot(&mut self, shot: &TimerShot) -> bool {
        if self.lvt[TIMER] != shot.lvt
            || self.tsc_deadline != shot.tsc_deadline
            || self.timer_schedule != shot.schedule
        {
            return false;
        }
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline = 0;
        } else {
            self.timer_schedule = shot.after;
        }
        // `timer_fired`'s work for an unmasked, edge-triggered vector whose IRR bit is clear
        // (`accept`: a new vector, TMR left clear; its record since the post is cleared by the
        // post that follows, `posted`).
        self.timer_stats.fired += 1;
        self.irr.set(shot.vector);
        true
    }

    /// [`Lapic::fire_shot`] for a shot worked out for [`ShotWay::Injected`], the vector then
    /// accepted by the processor at once (IRR to ISR, SDM 11.8.4), if the APIC is still as the
    /// shot found it: besides the timer, what [`Lapic::timer_alone_vector`] looks at may have
    /// changed since by another vCPU's work (an IPI, an IOAPIC message, an NMI), which no look
    /// of this vCPU's followed. False, nothing done, otherwise.
    #[inline]
    pub fn fire_shot_injected(&mut self, shot: &TimerShot) -> bool {
        if self.timer_alone_vector(ShotWay::Injected) != Some(shot.vector) || !self.fire_shot(shot)
        {
            return false;
        }
        self.acknowledge(shot.vector);
        true
    }

    /// Fires the timer if it fell due by TSC `now`.
    pub fn advance(&mut self, now: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            if self.tsc_deadline != 0 && now >= self.tsc_deadline {
                self.tsc_deadline = 0;
                self.timer_fired(0);
            }
            return;
        }
        let t = self.clock.ticks_at(now);
        let fired = self.timer_schedule.as_mut().and_then(|s| s.fire(t));
        if let Some(missed) = fired {
            if self.timer_schedule.is_some_and(|s| s.next().is_none()) {
                self.timer_schedule = None;
            }
            self.timer_fired(missed);
        }
    }

    /// The TSC at which the timer fires next (None while it is masked: a masked expiry raises
    /// nothing and is consumed at the next advance).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.lvt[TIMER] & LVT_MASKED != 0 {
            return None;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => (self.tsc_deadline != 0).then_some(self.tsc_deadline),
            _ => Some(self.clock.tsc_at(self.timer_schedule?.next()?)),
        }
    }

    /// A 32-bit register read at `offset` in the page.
    fn read_register(&self, offset: u64, now: u64) -> u32 {
        match offset {
            ID => u32::from(self.id) << 24,
            VERSION => LAPIC_VERSION,
            TPR => u32::from(self.tpr),
            APR | EOI | RRD => 0,
            PPR => u32::from(self.ppr()),
            LDR => self.ldr,
            DFR => self.dfr,
            SVR => self.svr,
            0x100..=0x170 => self.isr.words[((offset - ISR0) >> 4) as usize],
            0x180..=0x1f0 => self.tmr.words[((offset - TMR0) >> 4) as usize],
            0x200..=0x270 => self.irr.words[((offset - IRR0) >> 4) as usize],
            ESR => self.esr,
            // Delivery status (bit 12) always reads idle: IPIs are delivered at once.
            ICR_LOW => self.icr_low & !(1 << 12),
            ICR_HIGH => self.icr_high,
            LVT_TIMER..=LVT_ERROR => self.lvt[((offset - LVT_TIMER) >> 4) as usize],
            TIMER_INITIAL => self.timer_initial,
            TIMER_CURRENT => self.current_count(self.clock.ticks_at(now)),
            TIMER_DIVIDE => self.timer_divide,
            _ => 0,
        }
    }

    /// A 32-bit register write. Returns the vector of a level-triggered EOI to broadcast.
    fn write_register(&mut self, offset: u64, value: u32, now: u64) -> Option<u8> {
        let t = self.clock.ticks_at(now);
        if offset == ICR_LOW {
            // An IPI changes no other register of the page (a self-IPI that changes the TMR
            // marks it in `accept`): the ICR alone is written again.
            self.icr_stale = Stale(true);
        } else {
            self.page_stale = Stale(true);
        }
        match offset {
            ID => self.id = (value >> 24) as u8,
            TPR => self.tpr = value as u8,
            EOI => return self.eoi(),
            LDR => self.ldr = value & 0xff00_0000,
            DFR => self.dfr = value | 0x0fff_ffff,
            SVR => {
                self.svr = value & 0x3ff;
                if !self.software_enabled() {
                    // Software disable masks every LVT entry (SDM 10.4.7.2).
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            ESR => self.esr = core::mem::take(&mut self.esr_pending),
            ICR_LOW => {
                self.icr_low = value & ICR_LOW_BITS;
                self.send_ipi();
            }
            ICR_HIGH => self.icr_high = value & 0xff00_0000,
            LVT_TIMER..=LVT_ERROR => {
                let i = ((offset - LVT_TIMER) >> 4) as usize;
                let mut v = value & LVT_WRITABLE[i];
                if !self.software_enabled() {
                    v |= LVT_MASKED;
                }
                // Keep the read-only remote IRR of LINT0/LINT1.
                v |= self.lvt[i] & !LVT_WRITABLE[i] & (1 << 14);
                let old_mode = self.timer_mode();
                self.lvt[i] = v;
                if i == TIMER && self.timer_mode() != old_mode {
                    // Switching into or out of TSC-deadline mode disarms the timer (10.5.4.1).
                    let deadline_switch = old_mode == TimerMode::TscDeadline
                        || self.timer_mode() == TimerMode::TscDeadline;
                    if deadline_switch {
                        self.tsc_deadline = 0;
                        self.timer_initial = 0;
                        self.arm_count(t);
                    } else if let Some(next) = self.timer_schedule.and_then(|s| s.next()) {
                        // One-shot <-> periodic: the countdown in progress runs out as it
                        // would have; what follows it changes.
                        let period = u64::from(self.timer_initial) * self.timer_divisor();
                        self.timer_start = Some(next.saturating_sub(period));
                        self.timer_schedule = Some(match self.timer_mode() {
                            TimerMode::Periodic => Schedule::periodic(next, period),
                            _ => Schedule::once(next),
                        });
                    }
                }
            }
            TIMER_INITIAL => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.timer_initial = value;
                    self.arm_count(t);
                }
            }
            TIMER_DIVIDE => {
                let count = self.current_count(t);
                self.timer_divide = value & 0xb;
                if self.timer_schedule.is_some() && count != 0 {
                    // Keep the current count; the rest of the period runs at the new rate.
                    let done = u64::from(self.timer_initial - count) * self.timer_divisor();
                    self.arm_count(t.saturating_sub(done));
                }
            }
            _ => {} // read-only or reserved
        }
        None
    }

    /// Acts on the ICR just written (SDM 11.6.1, 11.12.9). Self-directed fixed and NMI
    /// interrupts are delivered; everything aimed at other processors is recorded. With one vCPU
    /// an INIT or SIPI to all excluding self finds nobody: it is accepted and does nothing (the
    /// delivery status reads idle at once).
    fn send_ipi(&mut self) {
        let ipi = Ipi {
            icr_low: self.icr_low,
            icr_high: self.icr_high,
            x2apic: self.mode() == ApicMode::X2Apic,
        };
        if !ipi.valid() {
            return;
        }
        let (to_self, to_others) = match ipi.shorthand() {
            1 => (true, false),
            2 => (true, true),
            3 => (false, true),
            _ => {
                let dest = ipi.destination();
                let broadcast = if ipi.x2apic { u32::MAX } else { 0xff };
                let me = dest == broadcast || self.matches_id(dest, ipi.logical());
                (me, dest == broadcast || !me)
            }
        };
        if to_others {
            if self.ipis.len() >= MAX_RECORDED_IPIS {
                self.ipis.remove(0);
            }
            self.ipis.push(ipi);
        }
        if !to_self {
            return;
        }
        match ipi.delivery_mode() {
            delivery::FIXED | delivery::LOWEST_PRIORITY => self.self_ipi(ipi.vector()),
            delivery::NMI => self.nmi_pending = true,
            _ => {} // SMI, INIT, SIPI to oneself: not modelled
        }
    }

    /// A fixed, edge-triggered interrupt to oneself (an ICR command or x2APIC SELF IPI).
    /// Vectors 0-15 set "send illegal vector" instead (SDM 11.5.3).
    fn self_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
        } else {
            self.accept(vector, false);
        }
    }

    /// RDMSR of x2APIC register `msr` (SDM 11.12.1.2, Table 11-6). #GP outside x2APIC mode, for
    /// an MSR of the range that names no register (APR, RRD, DFR, the ICR's high half, CMCI:
    /// this APIC has six LVT entries), and for the write-only EOI and SELF IPI.
    pub fn x2apic_read(&self, msr: u32, now: u64) -> Result<u64, GpFault> {
        let offset = x2apic_offset(msr)?;
        if self.mode() != ApicMode::X2Apic || !x2apic_readable(msr) {
            return Err(GpFault);
        }
        Ok(match offset {
            ID => u64::from(self.x2apic_id),
            LDR => u64::from(self.x2apic_ldr()),
            ICR_LOW => u64::from(self.icr_high) << 32 | u64::from(self.icr_low),
            _ => u64::from(self.read_register(offset, now)),
        })
    }

    /// The registers that APIC-register virtualization reads from the virtual-APIC page without
    /// an exit (SDM Vol. 3C 30.4.2 for the xAPIC page, 30.5 for RDMSR in x2APIC mode), as
    /// (page offset, value) in the current mode's layout, leaving out those kept there apart:
    /// the TPR, the PPR, the ISR and the IRR (`vmx::apicv`). In x2APIC mode a RDMSR reads 64
    /// bits at offset (MSR & 0xFF) << 4, so the ICR's destination half is at 304H and the ID and
    /// LDR are the x2APIC ones; 310H and the DFR, which x2APIC mode lacks, hold 0.
    pub fn page_image(&self) -> [(usize, u32); PAGE_IMAGE_LEN] {
        let x2apic = self.mode() == ApicMode::X2Apic;
        let (id, ldr, dfr, icr_high) = if x2apic {
            (self.x2apic_id, self.x2apic_ldr(), 0, 0)
        } else {
            (u32::from(self.id) << 24, self.ldr, self.dfr, self.icr_high)
        };
        let icr_destination = if x2apic { self.icr_high } else { 0 };
        let mut image = [(0, 0); PAGE_IMAGE_LEN];
        let fixed = [
            (ID, id),
            (LDR, ldr),
            (DFR, dfr),
            (ICR_HIGH, icr_high),
            (ICR_LOW + 4, icr_destination),
        ];
        let stored = [VERSION, SVR, ESR, ICR_LOW, TIMER_INITIAL, TIMER_DIVIDE]
            .into_iter()
            .chain((0..8).map(|i| TMR0 + 16 * i))
            .chain((0..6).map(|i| LVT_TIMER + 16 * i))
            .map(|offset| (offset, self.read_register(offset, 0)));
        for (slot, (offset, value)) in image.iter_mut().zip(fixed.into_iter().chain(stored)) {
            *slot = (offset as usize, value);
        }
        image
    }

    /// Whether [`Lapic::page_image`] may have changed since [`Lapic::take_page_stale`].
    pub fn page_stale(&self) -> bool {
        self.page_stale.0
    }

    /// Takes the news that [`Lapic::page_image`] may have changed since the last call (the
    /// image holds the ICR too).
    pub fn take_page_stale(&mut self) -> bool {
        self.icr_stale = Stale(false);
        core::mem::replace(&mut self.page_stale, Stale(false)).0
    }

    /// The ICR's low half as the page must read it, if it is all of [`Lapic::page_image`] that
    /// changed since the page was last written (an xAPIC ICR write: the guest's value is on the
    /// page, the model's masks its reserved bits and delivery status, SDM 10.6.1).
    pub fn take_icr_stale(&mut self) -> Option<(usize, u32)> {
        core::mem::replace(&mut self.icr_stale, Stale(false))
            .0
            .then(|| (ICR_LOW as usize, self.read_register(ICR_LOW, 0)))
    }

    /// The ICR's destination half (xAPIC mode: bits 31:24; x2APIC: the 32-bit destination).
    pub fn icr_high(&self) -> u32 {
        self.icr_high
    }

    /// The ICR's destination half as the guest wrote it to the virtual-APIC page, where
    /// APIC-register virtualization leaves a write of 310H without an exit (SDM 30.4.3.2: the
    /// CPU clears bytes 2:0 there as the model does, so the page already reads what it holds).
    pub fn set_icr_high(&mut self, value: u32) {
        self.icr_high = value & 0xff00_0000;
    }

    /// WRMSR of x2APIC register `msr`. #GP as for [`Lapic::x2apic_read`], for read-only
    /// registers, and for a value with a reserved bit set (SDM 11.12.1.3: RsvdZ; bits 63:32 of
    /// every register but the ICR; an EOI or ESR write of anything but 0). Returns the vector
    /// of a level-triggered EOI for the IOAPIC.
    pub fn x2apic_write(&mut self, msr: u32, value: u64, now: u64) -> Result<Option<u8>, GpFault> {
        let offset = x2apic_offset(msr)?;
        if self.mode() != ApicMode::X2Apic {
            return Err(GpFault);
        }
        let defined: u64 = match offset {
            TPR | SELF_IPI => 0xff,
            // Vector, software enable, focus checking; no EOI-broadcast suppression (the
            // version register does not offer it), so bit 12 is reserved too.
            SVR => 0x3ff,
            EOI | ESR => 0,
            // Delivery status (12) and remote IRR (14, LINT0/1) are read-only but defined.
            LVT_TIMER..=LVT_ERROR => {
                let i = ((offset - LVT_TIMER) >> 4) as usize;
                let remote_irr = if i == LINT0 || i == LINT1 { 1 << 14 } else { 0 };
                u64::from(LVT_WRITABLE[i] | 1 << 12 | remote_irr)
            }
            TIMER_INITIAL => u64::from(u32::MAX),
            TIMER_DIVIDE => 0xb,
            ICR_LOW => 0xffff_ffff_0000_0000 | u64::from(ICR_LOW_BITS & !(1 << 12)),
            _ => return Err(GpFault), // read-only or absent
        };
        if value & !defined != 0 {
            return Err(GpFault);
        }
        match offset {
            ICR_LOW => {
                self.icr_low = value as u32;
                self.icr_high = (value >> 32) as u32;
                self.page_stale = Stale(true);
                self.send_ipi();
                Ok(None)
            }
            SELF_IPI => {
                self.self_ipi(value as u8);
                Ok(None)
            }
            _ => Ok(self.write_register(offset, value as u32, now)),
        }
    }

    /// The logical x2APIC ID (SDM 11.12.10.2): cluster ID[19:4] in bits 31:16, a bit for
    /// ID[3:0] in bits 15:0.
    fn x2apic_ldr(&self) -> u32 {
        (self.x2apic_id >> 4) << 16 | 1 << (self.x2apic_id & 0xf)
    }

    /// Whether an MMIO access at `offset` (a store if `store`) changes nothing but this APIC's
    /// own registers, and nothing that would make the run loop's look at the platform do
    /// something (`exits::inject_pending_interrupt`): then the tight loop makes it without that
    /// look (`exits::fast::handle_apic`). Never while an NMI is pending (the look takes it).
    /// Otherwise that holds for
    /// - a load: [`Lapic::mmio_read`] changes nothing;
    /// - a store to TPR or EOI while IRR holds no vector: a lower TPR or PPR then lets nothing
    ///   through (SDM 11.8.3.1, 11.8.4), and an EOI whose vector (the highest in ISR, if any)
    ///   is edge triggered sends no EOI message to the IOAPIC (TMR clear, SDM 11.8.5). Dropped
    ///   (a narrow or unaligned store, or any in x2APIC mode, SDM 11.12.1.2), it changes nothing.
    ///
    /// Any other store may send an IPI, move the timer or change an LVT entry: not quiet.
    #[inline]
    pub fn access_stays_here(&self, offset: u64, store: bool) -> bool {
        if store {
            let register = offset & !0xf;
            let edge_eoi = || self.isr.highest().is_none_or(|v| !self.tmr.test(v));
            if !((register == TPR || register == EOI && edge_eoi()) && self.irr.summary == 0) {
                return false;
            }
        }
        !self.nmi_pending
    }

    /// [`Lapic::access_stays_here`] for a RDMSR (`store` None) or WRMSR of x2APIC register
    /// `msr`, and only where it succeeds: in x2APIC mode, a register RDMSR reads
    /// ([`x2apic_readable`]), or a store to TPR of bits 7:0 alone or to EOI of 0 (SDM 11.12.1.2:
    /// other bits, or another value, are a #GP, which goes the general way).
    #[inline]
    pub fn x2apic_stays_here(&self, msr: u32, store: Option<u64>) -> bool {
        let Ok(offset) = x2apic_offset(msr) else {
            return false;
        };
        let succeeds = match store {
            None => x2apic_readable(msr),
            Some(value) => offset == TPR && value <= 0xff || offset == EOI && value == 0,
        };
        succeeds
            && self.mode() == ApicMode::X2Apic
            && self.access_stays_here(offset, store.is_some())
    }

    /// An MMIO load of `size` bytes at `offset`. Registers are 32 bits wide at 16-byte
    /// boundaries (SDM 10.4.1); a narrower load inside the first 4 bytes reads part of one.
    /// While the APIC is globally disabled (IA32_APIC_BASE.EN clear) the processor has none
    /// (SDM 11.4.3): the page reads as an empty bus, all ones. In x2APIC mode the page behaves
    /// the same way (SDM 11.12.1.2: "similar to that of a legacy xAPIC in globally disabled
    /// state"); the registers are MSRs then.
    pub fn mmio_read(&mut self, offset: u64, size: u8, now: u64) -> u64 {
        if self.mode() != ApicMode::XApic {
            return u64::MAX >> (64 - 8 * u32::from(size.clamp(1, 8)));
        }
        let within = offset & 0xf;
        if within >= 4 {
            return 0;
        }
        let reg = u64::from(self.read_register(offset & 0xff0, now));
        let value = reg >> (8 * within);
        match size {
            1 => value & 0xff,
            2 => value & 0xffff,
            _ => value,
        }
    }

    /// An MMIO store. Only aligned 32-bit (or wider: the low 32 bits) stores reach a register;
    /// others are dropped, their effect being undefined in the SDM. Returns the vector of a
    /// level-triggered EOI for the IOAPIC.
    ///
    /// Dropped while the APIC is globally disabled or in x2APIC mode (see [`Lapic::mmio_read`]).
    pub fn mmio_write(&mut self, offset: u64, size: u8, value: u64, now: u64) -> Option<u8> {
        if self.mode() != ApicMode::XApic || offset & 0xf != 0 || size < 4 || offset >= LAPIC_SIZE {
            return None;
        }
        self.write_register(offset, value as u32, now)
    }
}

impl MessageSink for Lapic {
    /// A message from the IOAPIC.
    fn deliver(&mut self, msg: ApicMessage) -> Latch {
        if !self.globally_enabled() || !self.matches(msg.destination, msg.logical) {
            return Latch::Masked;
        }
        match msg.delivery_mode {
            delivery::FIXED | delivery::LOWEST_PRIORITY => {
                self.accept(msg.vector, msg.level_triggered)
            }
            delivery::NMI => {
                let was = core::mem::replace(&mut self.nmi_pending, true);
                if was {
                    Latch::AlreadyPending
                } else {
                    Latch::New
                }
            }
            // ExtINT through the IOAPIC, SMI and INIT are not modelled.
            _ => Latch::Masked,
        }
    }
}

/// Whether RDMSR of x2APIC MSR `msr` reads a register in x2APIC mode (SDM 11.12.1.2, Table
/// 11-6): not for the write-only EOI and SELF IPI, nor for the MSRs that name no register (APR,
/// RRD, DFR, the ICR's high half, CMCI: this APIC has six LVT entries).
pub fn x2apic_readable(msr: u32) -> bool {
    match x2apic_offset(msr) {
        Ok(offset) => matches!(
            offset,
            ID | VERSION
                | TPR
                | PPR
                | LDR
                | SVR
                | ISR0..=IRR_LAST
                | ESR
                | ICR_LOW
                | LVT_TIMER..=LVT_ERROR
                | TIMER_INITIAL
                | TIMER_CURRENT
                | TIMER_DIVIDE
        ),
        Err(_) => false,
    }
}

/// The xAPIC page offset of x2APIC MSR `msr` (#GP outside 0x800-0x8FF).
fn x2apic_offset(msr: u32) -> Result<u64, GpFault> {
    if X2APIC_MSRS.contains(&msr) {
        Ok(u64::from(msr - X2APIC_MSRS.start()) << 4)
    } else {
        Err(GpFault)
    }
}

/// A 256-bit vector register (IRR, ISR or TMR: SDM Vol. 3A 11.8.4) that keeps, next to its eight
/// words, which of them are non-zero: the highest vector set is then two leading-zero counts
/// (the summary's, then the word's) instead of a scan over the words, on every question the
/// run loop asks (`deliverable`, `ppr`, `eoi`), and setting or clearing a vector keeps the
/// summary in step. Saved as the eight words alone (the summary follows from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vectors {
    words: [u32; 8],
    /// Bit i: `words[i]` is non-zero.
    summary: u8,
}

impl Vectors {
    const EMPTY: Vectors = Vectors {
        words: [0; 8],
        summary: 0,
    };

    fn from_words(words: [u32; 8]) -> Self {
        let summary = (0..8).fold(0, |s, i| s | u8::from(words[i] != 0) << i);
        Vectors { words, summary }
    }

    fn set(&mut self, v: u8) {
        let i = usize::from(v >> 5);
        self.words[i] |= 1 << (v & 31);
        self.summary |= 1 << i;
    }

    fn clear(&mut self, v: u8) {
        let i = usize::from(v >> 5);
        self.words[i] &= !(1 << (v & 31));
        if self.words[i] == 0 {
            self.summary &= !(1 << i);
        }
    }

    fn test(&self, v: u8) -> bool {
        self.words[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }

    fn highest(&self) -> Option<u8> {
        if self.summary == 0 {
            return None;
        }
        let i = 7 - self.summary.leading_zeros() as u8;
        Some(i * 32 + (31 - self.words[usize::from(i)].leading_zeros() as u8))
    }
}

impl crate::state::Codec for Vectors {
    fn put(&self, w: &mut crate::state::Writer) {
        self.words.put(w);
    }
    fn get(r: &mut crate::state::Reader<'_>) -> Result<Self, crate::state::StateError> {
        Ok(Vectors::from_words(r.get()?))
    }
}

/// The highest vector set in a 256-bit register given as its eight words, by a scan: the four
/// 64-bit halves from the top, a leading-zero count on the first that is not zero. The tests
/// check the kept summaries (`Vectors`, `vmx::apicv::VirtualApic::post`) against it.
#[cfg(test)]
pub fn highest(regs: &[u32; 8]) -> Option<u8> {
    let mut i = 4;
    while i > 0 {
        i -= 1;
        let w = u64::from(regs[2 * i + 1]) << 32 | u64::from(regs[2 * i]);
        if w != 0 {
            return Some(i as u8 * 64 + (63 - w.leading_zeros() as u8));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One TSC tick per LAPIC-clock tick keeps the arithmetic of the tests plain.
    const TSC_HZ: u64 = LAPIC_TIMER_HZ;

    fn enabled() -> Lapic {
        let mut l = Lapic::new(TSC_HZ);
        l.mmio_write(SVR, 4, 0x1ff, 0);
        l
    }

    fn read(l: &mut Lapic, off: u64, now: u64) -> u32 {
        l.mmio_read(off, 4, now) as u32
    }

    #[test]
    fn identification_and_reset_values() {
        let mut l = Lapic::new(TSC_HZ);
        assert_eq!(read(&mut l, VERSION, 0), 0x50014);
        assert_eq!(read(&mut l, ID, 0), 0);
        assert_eq!(read(&mut l, SVR, 0), 0xff);
        assert_eq!(read(&mut l, DFR, 0), u32::MAX);
        assert_eq!(read(&mut l, LVT_TIMER, 0), LVT_MASKED);
        assert_eq!(read(&mut l, 0x350, 0), 0x700, "LINT0 ExtINT");
        assert_eq!(l.apic_base(), 0xfee0_0900);
        assert!(l.accepts_pic_intr());
        l.mmio_write(ID, 4, 0x0300_0000, 0);
        assert_eq!(read(&mut l, ID, 0), 0x0300_0000);
        assert_eq!(l.mmio_read(VERSION, 1, 0), 0x14);
        assert_eq!(l.mmio_read(VERSION + 2, 1, 0), 0x05);
        assert_eq!(l.mmio_read(VERSION + 4, 4, 0), 0);
    }

    #[test]
    fn irr_isr_priority_and_eoi() {
        let mut l = enabled();
        assert_eq!(l.accept(0x31, false), Latch::New);
        assert_eq!(l.accept(0x31, false), Latch::AlreadyPending);
        l.accept(0x52, false);
        assert_eq!(read(&mut l, IRR0 + 0x10, 0), 1 << 17);
        assert_eq!(read(&mut l, IRR0 + 0x20, 0), 1 << 18);
        assert_eq!(l.deliverable(), Some(0x52));
        l.acknowledge(0x52);
        assert_eq!(read(&mut l, ISR0 + 0x20, 0), 1 << 18);
        assert_eq!(l.ppr(), 0x50);
        // 0x31 is in a lower class than the one in service.
        assert_eq!(l.deliverable(), None);
        l.accept(0x5f, false);
        assert_eq!(l.deliverable(), None, "same class as PPR: held");
        l.accept(0x61, false);
        assert_eq!(l.deliverable(), Some(0x61));
        assert_eq!(l.mmio_write(EOI, 4, 0, 0), None);
        assert_eq!(l.ppr(), 0);
        assert_eq!(l.deliverable(), Some(0x61));
    }

    #[test]
    fn tpr_blocks_lower_classes() {
        let mut l = enabled();
        l.accept(0x45, false);
        l.mmio_write(TPR, 4, 0x40, 0);
        assert_eq!(l.deliverable(), None);
        assert_eq!(read(&mut l, PPR, 0), 0x40);
        l.set_tpr(0x30);
        assert_eq!(l.deliverable(), Some(0x45));
        assert_eq!(read(&mut l, TPR, 0), 0x30);
    }

    #[test]
    fn level_triggered_eoi_is_reported_for_broadcast() {
        let mut l = enabled();
        l.accept(0x41, true);
        assert_eq!(read(&mut l, TMR0 + 0x20, 0), 1 << 1);
        l.acknowledge(0x41);
        assert_eq!(l.mmio_write(EOI, 4, 0, 0), Some(0x41));
    }

    #[test]
    fn illegal_vectors_set_esr_and_raise_the_error_lvt() {
        let mut l = enabled();
        l.mmio_write(LVT_ERROR, 4, 0xfe, 0);
        assert_eq!(l.accept(3, false), Latch::Masked);
        // ESR shows the error after a write (SDM 10.5.3: write before read).
        assert_eq!(read(&mut l, ESR, 0), 0);
        l.mmio_write(ESR, 4, 0, 0);
        assert_eq!(read(&mut l, ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(l.deliverable(), Some(0xfe));
        l.mmio_write(ICR_LOW, 4, 0x4_0005, 0); // fixed vector 5 to self
        l.mmio_write(ESR, 4, 0, 0);
        assert_eq!(read(&mut l, ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
    }

    #[test]
    fn self_ipi_and_recorded_ipis() {
        let mut l = enabled();
        l.mmio_write(ICR_LOW, 4, 0x4_0040, 0); // shorthand self, fixed 0x40
        assert_eq!(l.deliverable(), Some(0x40));
        assert_eq!(l.take_ipi(), None);
        l.mmio_write(ICR_HIGH, 4, 0x0100_0000, 0);
        l.mmio_write(ICR_LOW, 4, 0x0000_4500, 0); // INIT to APIC 1
        let ipi = l.take_ipi();
        assert_eq!(
            ipi.map(|i| (i.delivery_mode(), i.destination())),
            Some((5, 1))
        );
        assert_eq!(read(&mut l, ICR_HIGH, 0), 0x0100_0000);
        l.mmio_write(ICR_HIGH, 4, 0, 0);
        l.mmio_write(ICR_LOW, 4, 0x0000_0400, 0); // NMI to APIC 0 (us)
        assert!(l.take_nmi());
        assert!(!l.take_nmi());
        assert_eq!(l.take_ipi(), None);
        l.mmio_write(ICR_LOW, 4, 0x000c_0050, 0); // all excluding self
        assert_eq!(l.take_ipi().map(|i| i.shorthand()), Some(3));
        assert_eq!(l.deliverable(), Some(0x40));
    }

    #[test]
    fn logical_destinations() {
        let mut l = enabled();
        l.mmio_write(LDR, 4, 0x0200_0000, 0);
        assert!(l.matches(0x02, true));
        assert!(l.matches(0x03, true));
        assert!(!l.matches(0x01, true));
        l.mmio_write(DFR, 4, 0x0fff_ffff, 0); // cluster model
        assert_eq!(read(&mut l, DFR, 0), 0x0fff_ffff);
        l.mmio_write(LDR, 4, 0x1200_0000, 0); // cluster 1, member bit 1
        assert!(l.matches(0x12, true));
        assert!(!l.matches(0x22, true));
        assert!(l.matches(0xff, true));
        assert!(l.matches(0, false));
        assert!(!l.matches(1, false));
    }

    #[test]
    fn software_disable_masks_the_lvt() {
        let mut l = enabled();
        l.mmio_write(LVT_TIMER, 4, 0x20030, 0);
        assert_eq!(read(&mut l, LVT_TIMER, 0), 0x20030);
        l.mmio_write(SVR, 4, 0xff, 0);
        assert_eq!(read(&mut l, LVT_TIMER, 0), 0x30030);
        l.mmio_write(LVT_TIMER, 4, 0x20030, 0);
        assert_eq!(read(&mut l, LVT_TIMER, 0) & LVT_MASKED, LVT_MASKED);
        assert!(!l.accepts_pic_intr(), "LINT0 masked too");
    }

    #[test]
    fn global_disable_resets_and_passes_the_pic_through() {
        let mut l = enabled();
        l.accept(0x40, false);
        l.write_apic_base(LAPIC_BASE).unwrap();
        assert_eq!(l.apic_base(), LAPIC_BASE | APIC_BASE_BSP);
        assert!(l.accepts_pic_intr());
        assert_eq!(l.deliverable(), None);
        assert_eq!(
            l.deliver(ApicMessage {
                vector: 0x40,
                delivery_mode: 0,
                logical: false,
                destination: 0,
                level_triggered: false
            }),
            Latch::Masked
        );
        l.write_apic_base(LAPIC_BASE | APIC_BASE_ENABLE).unwrap();
        assert_eq!(read(&mut l, SVR, 0), 0xff);
        assert_eq!(read(&mut l, IRR0 + 0x20, 0), 0);
    }

    #[test]
    fn a_globally_disabled_apic_leaves_its_page() {
        let mut l = enabled();
        l.mmio_write(TPR, 4, 0x20, 0);
        l.write_apic_base(LAPIC_BASE).unwrap();
        // SDM 10.4.3: with IA32_APIC_BASE.EN clear the processor has no APIC; the page reads as
        // an empty bus (all ones) and takes no writes.
        assert_eq!(l.mmio_read(VERSION, 4, 0), 0xffff_ffff);
        assert_eq!(l.mmio_read(ID, 1, 0), 0xff);
        l.mmio_write(SVR, 4, 0x1ff, 0);
        l.mmio_write(TPR, 4, 0x30, 0);
        assert_eq!(
            l.tpr(),
            0,
            "reset when disabled, and the write went nowhere"
        );
        l.write_apic_base(LAPIC_BASE | APIC_BASE_ENABLE).unwrap();
        assert_eq!(read(&mut l, VERSION, 0), 0x50014);
        assert_eq!(read(&mut l, SVR, 0), 0xff, "back from its reset state");
    }

    #[test]
    fn divide_configuration() {
        let mut l = enabled();
        for (code, div) in [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xa, 128),
            (0xb, 1),
        ] {
            l.mmio_write(TIMER_DIVIDE, 4, code, 0);
            assert_eq!(l.timer_divisor(), div);
        }
    }

    #[test]
    fn one_shot_counts_down_and_fires_once() {
        let mut l = enabled();
        l.mmio_write(TIMER_DIVIDE, 4, 0x3, 0); // /16
        l.mmio_write(LVT_TIMER, 4, 0x30, 0);
        l.mmio_write(TIMER_INITIAL, 4, 1000, 100);
        assert_eq!(read(&mut l, TIMER_CURRENT, 100), 1000);
        assert_eq!(read(&mut l, TIMER_CURRENT, 100 + 16 * 250), 750);
        assert_eq!(l.next_deadline(), Some(100 + 16_000));
        l.advance(100 + 15_999);
        assert_eq!(l.deliverable(), None);
        l.advance(100 + 16_000);
        assert_eq!(l.deliverable(), Some(0x30));
        assert_eq!(read(&mut l, TIMER_CURRENT, 200_000), 0);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(
            l.timer_stats(),
            TimerStats {
                fired: 1,
                coalesced: 0
            }
        );
        // Writing 0 stops a running timer.
        l.mmio_write(TIMER_INITIAL, 4, 50, 300_000);
        l.mmio_write(TIMER_INITIAL, 4, 0, 300_001);
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn periodic_reloads_and_coalesces() {
        let mut l = enabled();
        l.mmio_write(TIMER_DIVIDE, 4, 0xb, 0); // /1
        l.mmio_write(LVT_TIMER, 4, 0x2_0040, 0);
        l.mmio_write(TIMER_INITIAL, 4, 100, 0);
        assert_eq!(read(&mut l, TIMER_CURRENT, 250), 50);
        l.advance(100);
        l.advance(350); // 200 and 300 together: one more, merged into the pending IRR bit
        let s = l.timer_stats();
        assert_eq!((s.fired, s.coalesced), (2, 2));
        assert_eq!(l.next_deadline(), Some(400));
    }

    #[test]
    fn switching_periodic_to_one_shot_finishes_the_current_count() {
        let mut l = enabled();
        l.mmio_write(TIMER_DIVIDE, 4, 0xb, 0);
        l.mmio_write(LVT_TIMER, 4, 0x2_0040, 0);
        l.mmio_write(TIMER_INITIAL, 4, 100, 0);
        l.advance(100);
        l.advance(250);
        l.mmio_write(LVT_TIMER, 4, 0x40, 250);
        assert_eq!(read(&mut l, TIMER_CURRENT, 260), 40);
        assert_eq!(l.next_deadline(), Some(300));
        l.advance(300);
        assert_eq!(l.next_deadline(), None);
        assert_eq!(read(&mut l, TIMER_CURRENT, 310), 0);
    }

    #[test]
    fn masked_timer_counts_but_raises_nothing() {
        let mut l = enabled();
        l.mmio_write(LVT_TIMER, 4, 0x3_0040, 0); // periodic, masked
        l.mmio_write(TIMER_INITIAL, 4, 10, 0);
        assert_eq!(l.next_deadline(), None);
        l.advance(1000);
        assert_eq!(l.deliverable(), None);
        l.mmio_write(LVT_TIMER, 4, 0x2_0040, 1000);
        assert_eq!(l.timer_stats().fired, 0);
        assert!(l.next_deadline().is_some_and(|d| d > 1000));
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut l = enabled();
        l.write_tsc_deadline(5000, 0);
        assert_eq!(l.tsc_deadline(), 0, "ignored outside deadline mode");
        l.mmio_write(LVT_TIMER, 4, 0x4_00ef, 0);
        l.mmio_write(TIMER_INITIAL, 4, 100, 0);
        assert_eq!(read(&mut l, TIMER_INITIAL, 0), 0, "initial count ignored");
        l.write_tsc_deadline(5000, 10);
        assert_eq!(l.tsc_deadline(), 5000);
        assert_eq!(l.next_deadline(), Some(5000));
        l.advance(4999);
        assert_eq!(l.deliverable(), None);
        l.advance(5000);
        assert_eq!(l.deliverable(), Some(0xef));
        assert_eq!(l.tsc_deadline(), 0, "cleared when it fires");
        // A deadline in the past fires at once; 0 disarms.
        l.acknowledge(0xef);
        l.eoi();
        l.write_tsc_deadline(100, 6000);
        assert_eq!(l.deliverable(), Some(0xef));
        l.write_tsc_deadline(9000, 6000);
        l.write_tsc_deadline(0, 6000);
        assert_eq!(l.next_deadline(), None);
        // Leaving deadline mode disarms.
        l.write_tsc_deadline(9000, 6000);
        l.mmio_write(LVT_TIMER, 4, 0xef, 6000);
        assert_eq!(l.next_deadline(), None);
    }

    #[test]
    fn a_deadline_moved_after_it_passed_has_fired_first() {
        // SDM Vol. 3A 11.5.4.1: the timer fires when the TSC reaches the deadline. A write of
        // IA32_TSC_DEADLINE made after that (the model not advanced since) moves the next
        // deadline; the expiry that came before it stays pending.
        let mut l = enabled();
        l.mmio_write(LVT_TIMER, 4, 0x4_00ef, 0);
        l.write_tsc_deadline(1000, 0);
        l.write_tsc_deadline(9000, 1500);
        assert_eq!(l.deliverable(), Some(0xef), "the expiry at 1000");
        assert_eq!(l.next_deadline(), Some(9000));
        // A write before the deadline only moves it.
        l.acknowledge(0xef);
        l.eoi();
        l.write_tsc_deadline(12_000, 8000);
        assert_eq!(l.deliverable(), None);
        assert_eq!(l.next_deadline(), Some(12_000));
        // Only a write that fires nothing is quiet: outside deadline mode, 0, or ahead of now.
        assert!(l.deadline_write_is_quiet(11_001, 11_000));
        assert!(l.deadline_write_is_quiet(0, 11_000));
        assert!(!l.deadline_write_is_quiet(11_000, 11_000));
        assert!(!l.deadline_write_is_quiet(5, 11_000));
        // ... and not while the armed one is due: it fires.
        assert!(!l.deadline_write_is_quiet(20_000, 12_000));
        l.mmio_write(LVT_TIMER, 4, 0xef, 12_000);
        assert!(l.deadline_write_is_quiet(5, 12_000));
    }

    /// A TSC-deadline move made in one step ends as the checked write does: for every timer mode
    /// (the deadline mode masked too), armed deadline, written value and time around them,
    /// either it declines with the APIC as it was and the write would not be quiet, or it
    /// leaves the APIC as `write_tsc_deadline` does.
    #[test]
    fn a_deadline_moved_in_one_step_ends_as_the_write() {
        for lvt in [0x4_00ef, 0x5_00ef, 0x2_00ef, 0x00ef] {
            for armed in [0, 1000, 2000] {
                for now in [0, 999, 1000, 1500, 2000, 2500] {
                    for value in [0, 1, 999, 1000, 1001, 3000] {
                        let mut before = enabled();
                        before.mmio_write(LVT_TIMER, 4, lvt, 0);
                        before.write_tsc_deadline(armed, 0);
                        let mut moved = before.clone();
                        let mut written = before.clone();
                        let at =
                            alloc::format!("lvt {lvt:#x} armed {armed} now {now} value {value}");
                        let quiet = before.deadline_write_is_quiet(value, now);
                        assert_eq!(moved.move_tsc_deadline(value, now), quiet, "{at}");
                        let target = if quiet {
                            written.write_tsc_deadline(value, now);
                            &written
                        } else {
                            &before
                        };
                        assert_eq!(
                            alloc::format!("{moved:?}"),
                            alloc::format!("{target:?}"),
                            "{at}"
                        );
                    }
                }
            }
        }
    }

    /// The timer's expiry is one vector to post only while nothing else is pending, in service,
    /// arrived since the post, mirrored stale or an NMI, and its vector legal, unmasked and
    /// edge-triggered in the TMR (a level-triggered IOAPIC vector of the same number leaves its
    /// TMR bit set: the timer's acceptance would clear it and change the EOI-exit bitmap).
    #[test]
    fn a_timer_alone_has_nothing_else_to_post() {
        let mut l = enabled();
        l.mmio_write(LVT_TIMER, 4, 0x4_0030, 0);
        // Reset since the last post (`enabled` wrote the SVR of a fresh APIC): not alone.
        assert_eq!(l.timer_alone_vector(POSTED), None);
        l.posted();
        assert_eq!(l.timer_alone_vector(POSTED), Some(0x30));
        // The SVR and LVT writes left the mirrored image stale.
        assert_eq!(l.timer_alone_vector(MIRRORED), None);
        l.take_page_stale();
        assert_eq!(l.timer_alone_vector(MIRRORED), Some(0x30));
        l.mmio_write(LVT_TIMER, 4, 0x5_0030, 0); // masked
        l.take_page_stale();
        assert_eq!(l.timer_alone_vector(MIRRORED), None);
        l.mmio_write(LVT_TIMER, 4, 0x4_0008, 0); // illegal vector
        assert_eq!(l.timer_alone_vector(POSTED), None);
        l.mmio_write(LVT_TIMER, 4, 0x4_0030, 0);
        // A level-triggered interrupt of the same vector, delivered and EOIed: TMR stays.
        assert_eq!(l.accept(0x30, true), Latch::New);
        l.posted();
        assert_eq!(l.timer_alone_vector(POSTED), None, "pending");
        l.acknowledge(0x30);
        assert_eq!(l.timer_alone_vector(POSTED), None, "in service");
        assert_eq!(l.eoi(), Some(0x30));
        assert_eq!(l.timer_alone_vector(POSTED), None, "level in the TMR");
        l.mmio_write(LVT_TIMER, 4, 0x4_0031, 0);
        assert_eq!(l.timer_alone_vector(POSTED), Some(0x31));
        // Arrived since the post (while another CPU ran the platform), and an NMI.
        l.accept(0x40, false);
        l.acknowledge(0x40);
        l.eoi();
        assert_eq!(l.timer_alone_vector(POSTED), None, "arrived since the post");
        l.posted();
        assert_eq!(l.raise_nmi(), Latch::New);
        assert_eq!(l.timer_alone_vector(POSTED), None, "NMI");
        l.take_nmi();
        assert_eq!(l.timer_alone_vector(POSTED), Some(0x31));
    }

    const POSTED: ShotWay = ShotWay::Posted { mirrored: false };
    const MIRRORED: ShotWay = ShotWay::Posted { mirrored: true };

    /// Injected, the timer's expiry is one vector accepted at once while nothing else is
    /// pending, in service or an NMI, its vector legal, unmasked and edge-triggered, and its
    /// priority class above the TPR's (SDM 11.8.3.1: with ISR empty the PPR is the TPR); what
    /// the last post left does not matter. The shot then ends with the vector in service.
    #[test]
    fn a_timer_alone_is_injected_above_the_tpr() {
        let mut l = enabled();
        l.mmio_write(LVT_TIMER, 4, 0x4_0031, 0);
        // Never posted (no virtual-interrupt delivery): alone all the same.
        assert_eq!(l.timer_alone_vector(POSTED), None);
        assert_eq!(l.timer_alone_vector(ShotWay::Injected), Some(0x31));
        for (tpr, alone) in [
            (0x20, true),
            (0x2f, true),
            (0x30, false),
            (0x3f, false),
            (0xf0, false),
        ] {
            l.set_tpr(tpr);
            assert_eq!(
                l.timer_alone_vector(ShotWay::Injected).is_some(),
                alone,
                "TPR {tpr:#x}"
            );
        }
        l.set_tpr(0);
        l.accept(0x40, false);
        assert_eq!(l.timer_alone_vector(ShotWay::Injected), None, "pending");
        l.acknowledge(0x40);
        assert_eq!(l.timer_alone_vector(ShotWay::Injected), None, "in service");
        l.eoi();
        l.raise_nmi();
        assert_eq!(l.timer_alone_vector(ShotWay::Injected), None, "NMI");
        l.take_nmi();
        l.mmio_write(LVT_TIMER, 4, 0x5_0031, 0);
        assert_eq!(l.timer_alone_vector(ShotWay::Injected), None, "masked");
        // A TSC-deadline shot, fired: the vector goes straight to ISR, the deadline disarmed.
        l.mmio_write(LVT_TIMER, 4, 0x4_0031, 0);
        l.write_tsc_deadline(500, 0);
        let shot = l.timer_shot(ShotWay::Injected).expect("armed alone");
        assert_eq!((shot.at, shot.vector), (500, 0x31));
        assert!(l.fire_shot_injected(&shot));
        assert_eq!(
            (l.highest_irr(), l.isr.highest(), l.tsc_deadline),
            (None, Some(0x31), 0)
        );
        // The same shot again: the timer changed (disarmed) and the vector is in service.
        assert!(!l.fire_shot_injected(&shot));
        // Armed again, then the TPR raised over it before the expiry: declined, nothing done.
        l.eoi();
        l.write_tsc_deadline(900, 0);
        let shot = l.timer_shot(ShotWay::Injected).expect("armed alone");
        l.set_tpr(0x30);
        assert!(!l.fire_shot_injected(&shot));
        assert_eq!(
            (l.highest_irr(), l.isr.highest(), l.tsc_deadline),
            (None, None, 900)
        );
    }

    /// IA32_APIC_BASE in each mode: disabled, xAPIC, x2APIC.
    const DISABLED: u64 = LAPIC_BASE | APIC_BASE_BSP;
    const XAPIC: u64 = DISABLED | APIC_BASE_ENABLE;
    const X2APIC: u64 = XAPIC | APIC_BASE_EXTD;

    fn x2apic() -> Lapic {
        let mut l = Lapic::new(TSC_HZ);
        assert_eq!(l.write_apic_base(X2APIC), Ok(()));
        assert_eq!(l.x2apic_write(0x80f, 0x1ff, 0), Ok(None));
        l
    }

    #[test]
    fn apic_base_transitions_follow_the_x2apic_state_diagram() {
        // SDM 11.12.5 (Figure 11-27): xAPIC -> x2APIC, x2APIC -> disabled -> xAPIC; x2APIC ->
        // xAPIC directly and EXTD without EN are #GP, and a refused write changes nothing.
        let mut l = Lapic::new(TSC_HZ);
        assert_eq!(l.write_apic_base(DISABLED | APIC_BASE_EXTD), Err(GpFault));
        assert_eq!(l.apic_base(), XAPIC);
        assert_eq!(l.write_apic_base(X2APIC), Ok(()));
        assert_eq!(l.apic_base(), X2APIC);
        assert_eq!(l.write_apic_base(XAPIC), Err(GpFault));
        assert_eq!(l.write_apic_base(DISABLED | APIC_BASE_EXTD), Err(GpFault));
        assert_eq!(l.apic_base(), X2APIC);
        assert_eq!(l.write_apic_base(DISABLED), Ok(()));
        assert_eq!(l.apic_base(), DISABLED);
        // Disabled -> x2APIC directly is not a legal transition either.
        assert_eq!(l.write_apic_base(X2APIC), Err(GpFault));
        assert_eq!(l.write_apic_base(XAPIC), Ok(()));
        assert_eq!(l.write_apic_base(X2APIC), Ok(()));
        // Rewriting the current state is no transition.
        assert_eq!(l.write_apic_base(X2APIC), Ok(()));
    }

    #[test]
    fn x2apic_msrs_answer_only_in_x2apic_mode() {
        let mut l = enabled();
        assert_eq!(l.x2apic_read(0x803, 0), Err(GpFault), "xAPIC mode: #GP");
        assert_eq!(l.x2apic_write(0x808, 0x20, 0), Err(GpFault));
        l.write_apic_base(X2APIC).unwrap();
        assert_eq!(l.x2apic_read(0x803, 0), Ok(0x50014));
        // SDM 11.12.1.2: in x2APIC mode the MMIO page behaves as a globally disabled xAPIC's.
        assert_eq!(l.mmio_read(VERSION, 4, 0), 0xffff_ffff);
        l.mmio_write(TPR, 4, 0x70, 0);
        assert_eq!(l.tpr(), 0);
        // Leaving through disabled: back to the page, in its reset state.
        l.x2apic_write(0x808, 0x30, 0).unwrap();
        l.write_apic_base(DISABLED).unwrap();
        assert_eq!(l.x2apic_read(0x803, 0), Err(GpFault));
        l.write_apic_base(XAPIC).unwrap();
        assert_eq!(read(&mut l, VERSION, 0), 0x50014);
        assert_eq!(read(&mut l, TPR, 0), 0);
        assert_eq!(read(&mut l, SVR, 0), 0xff);
    }

    #[test]
    fn x2apic_id_ldr_and_version_are_read_only() {
        let mut l = enabled();
        l.mmio_write(ID, 4, 0x0500_0000, 0); // an xAPIC ID the x2APIC does not keep
        l.mmio_write(LDR, 4, 0x0800_0000, 0);
        l.mmio_write(ICR_HIGH, 4, 0x0300_0000, 0);
        l.write_apic_base(X2APIC).unwrap();
        // SDM 11.12.5.1: the x2APIC ID is the initial APIC ID (the vCPU's, 0), the LDR is
        // derived from it (11.12.10.2: cluster ID[19:4] in 31:16, bit ID[3:0] in 15:0) and the
        // ICR's destination half is not kept.
        assert_eq!(l.x2apic_read(0x802, 0), Ok(0));
        assert_eq!(l.x2apic_read(0x80d, 0), Ok(1));
        assert_eq!(l.x2apic_read(0x830, 0), Ok(0));
        for msr in [
            0x802, 0x803, 0x80a, 0x80d, 0x810, 0x817, 0x818, 0x820, 0x827, 0x839,
        ] {
            assert_eq!(
                l.x2apic_write(msr, 0, 0),
                Err(GpFault),
                "{msr:#x} read-only"
            );
        }
    }

    #[test]
    fn x2apic_registers_that_do_not_exist_are_gp() {
        let mut l = x2apic();
        // SDM Table 11-6: no APR, RRD, DFR, ICR high half, CMCI (no LVT entry 6 here) or the
        // unnamed MSRs of the range.
        for msr in [
            0x800, 0x801, 0x804, 0x807, 0x809, 0x80c, 0x80e, 0x82f, 0x831, 0x83a, 0x83d, 0x840,
            0x8ff,
        ] {
            assert_eq!(l.x2apic_read(msr, 0), Err(GpFault), "RDMSR {msr:#x}");
            assert_eq!(l.x2apic_write(msr, 0, 0), Err(GpFault), "WRMSR {msr:#x}");
        }
        // Write-only registers: EOI and SELF IPI.
        assert_eq!(l.x2apic_read(0x80b, 0), Err(GpFault));
        assert_eq!(l.x2apic_read(0x83f, 0), Err(GpFault));
    }

    #[test]
    fn x2apic_reserved_bits_are_gp() {
        let mut l = x2apic();
        // SDM 11.12.1.3: a non-zero write to a reserved bit is #GP; the register keeps its value.
        let cases: &[(u32, u64)] = &[
            (0x808, 0x100),   // TPR 31:8
            (0x808, 1 << 32), // upper half of a 32-bit register
            (0x80f, 1 << 12), // SVR: no EOI-broadcast suppression
            (0x80f, 1 << 13),
            (0x80b, 1),       // EOI: only 0
            (0x828, 1),       // ESR: only 0
            (0x832, 1 << 19), // LVT timer
            (0x835, 1 << 17), // LVT LINT0
            (0x837, 1 << 8),  // LVT error has no delivery mode
            (0x83e, 0x4),     // divide configuration: bits 0, 1, 3
            (0x830, 1 << 13), // ICR
            (0x830, 1 << 12), // ICR: no delivery status in x2APIC mode
            (0x830, 1 << 20),
            (0x83f, 0x100), // SELF IPI: vector only
        ];
        for &(msr, v) in cases {
            assert_eq!(
                l.x2apic_write(msr, v, 0),
                Err(GpFault),
                "WRMSR {msr:#x} of {v:#x}"
            );
        }
        assert_eq!(l.x2apic_read(0x808, 0), Ok(0));
        assert_eq!(l.x2apic_read(0x80f, 0), Ok(0x1ff));
        assert_eq!(l.deliverable(), None);
        // The read-only delivery status and remote IRR bits of an LVT entry are defined bits:
        // writing them is allowed and has no effect.
        assert_eq!(
            l.x2apic_write(0x835, 1 << 12 | 1 << 14 | 0x700, 0),
            Ok(None)
        );
        assert_eq!(l.x2apic_read(0x835, 0), Ok(0x700));
    }

    #[test]
    fn x2apic_tpr_eoi_and_self_ipi() {
        let mut l = x2apic();
        assert_eq!(l.x2apic_write(0x83f, 0x51, 0), Ok(None));
        assert_eq!(l.x2apic_read(0x820 + 2, 0), Ok(1 << 17), "IRR bit 0x51");
        assert_eq!(l.deliverable(), Some(0x51));
        l.acknowledge(0x51);
        assert_eq!(l.x2apic_read(0x810 + 2, 0), Ok(1 << 17), "ISR bit 0x51");
        assert_eq!(l.x2apic_read(0x80a, 0), Ok(0x50), "PPR");
        assert_eq!(l.x2apic_write(0x808, 0x60, 0), Ok(None));
        assert_eq!(l.x2apic_read(0x808, 0), Ok(0x60));
        assert_eq!(l.x2apic_write(0x80b, 0, 0), Ok(None));
        assert_eq!(l.x2apic_read(0x810 + 2, 0), Ok(0));
        // A level-triggered vector's EOI is reported for the IOAPIC's broadcast.
        l.x2apic_write(0x808, 0, 0).unwrap();
        l.accept(0x41, true);
        l.acknowledge(0x41);
        assert_eq!(l.x2apic_write(0x80b, 0, 0), Ok(Some(0x41)));
        // SELF IPI of an illegal vector: ESR "send illegal vector" (SDM 11.5.3).
        l.x2apic_write(0x83f, 5, 0).unwrap();
        l.x2apic_write(0x828, 0, 0).unwrap();
        assert_eq!(
            l.x2apic_read(0x828, 0),
            Ok(u64::from(ESR_SEND_ILLEGAL_VECTOR))
        );
    }

    #[test]
    fn x2apic_icr_is_one_64_bit_register() {
        let mut l = x2apic();
        // Fixed 0x44 to x2APIC ID 0 (ourselves), physical.
        assert_eq!(l.x2apic_write(0x830, 0x44, 0), Ok(None));
        assert_eq!(l.deliverable(), Some(0x44));
        assert_eq!(l.take_ipi(), None);
        // Fixed 0x45 to x2APIC ID 0x100: somebody else, whose 8 low bits are ours.
        l.x2apic_write(0x830, 0x100 << 32 | 0x45, 0).unwrap();
        assert_eq!(l.x2apic_read(0x830, 0), Ok(0x100 << 32 | 0x45));
        assert_eq!(l.take_ipi().map(|i| i.icr_high), Some(0x100));
        assert_eq!(l.x2apic_read(0x820 + 2, 0), Ok(1 << 4), "only 0x44 pending");
        // Logical: cluster 0, bit 0 is us; cluster 1, bit 0 is not.
        l.x2apic_write(0x830, 1 << 32 | 1 << 11 | 0x46, 0).unwrap();
        l.x2apic_write(0x830, 0x1_0001 << 32 | 1 << 11 | 0x47, 0)
            .unwrap();
        assert_eq!(l.x2apic_read(0x820 + 2, 0), Ok(1 << 4 | 1 << 6));
        // Broadcast 0xFFFFFFFF reaches us too.
        l.x2apic_write(0x830, 0xffff_ffff << 32 | 0x48, 0).unwrap();
        assert_eq!(l.x2apic_read(0x820 + 2, 0), Ok(1 << 4 | 1 << 6 | 1 << 8));
    }

    #[test]
    fn x2apic_timer_through_msrs() {
        let mut l = x2apic();
        l.x2apic_write(0x83e, 0xb, 0).unwrap(); // divide by 1
        l.x2apic_write(0x832, 0x2_0040, 0).unwrap(); // periodic, vector 0x40
        l.x2apic_write(0x838, 100, 0).unwrap();
        assert_eq!(l.x2apic_read(0x838, 0), Ok(100));
        assert_eq!(l.x2apic_read(0x839, 30), Ok(70));
        l.advance(100);
        assert_eq!(l.deliverable(), Some(0x40));
        assert_eq!(l.next_deadline(), Some(200));
    }

    #[test]
    fn invalid_icr_shorthand_combinations_do_nothing() {
        // SDM Table 11-3: "self" and "all including self" are valid with fixed delivery only.
        let mut l = enabled();
        for (mode, shorthand) in [(4, 1), (5, 1), (6, 1), (1, 1), (4, 2), (5, 2), (6, 2)] {
            l.mmio_write(ICR_LOW, 4, shorthand << 18 | mode << 8 | 0x30, 0);
            assert!(!l.take_nmi(), "mode {mode} shorthand {shorthand}");
            assert_eq!(l.take_ipi(), None, "mode {mode} shorthand {shorthand}");
            assert_eq!(l.deliverable(), None);
        }
        // NMI to ourselves by destination (no shorthand) is valid.
        l.mmio_write(ICR_LOW, 4, 4 << 8, 0);
        assert!(l.take_nmi());
    }

    #[test]
    fn init_sipi_broadcasts_find_no_other_cpu() {
        // A QEMU test kernel probing for APs: INIT, SIPI, SIPI to all excluding self. One vCPU:
        // nothing starts, nothing is raised here, and the ICR reads idle each time.
        let mut l = enabled();
        for icr in [0x000c_4500, 0x000c_4608, 0x000c_4608] {
            l.mmio_write(ICR_LOW, 4, icr, 0);
            assert_eq!(
                read(&mut l, ICR_LOW, 0) & 1 << 12,
                0,
                "delivery status idle"
            );
            assert_eq!(l.deliverable(), None);
            assert!(!l.take_nmi());
            l.mmio_write(ESR, 4, 0, 0);
            assert_eq!(read(&mut l, ESR, 0), 0, "no error");
        }
    }

    /// The scan the kept summaries replace: the highest set bit, word by word from the top.
    fn scanned(regs: &[u32; 8]) -> Option<u8> {
        (0..256usize)
            .rev()
            .find(|&v| regs[v / 32] & (1 << (v % 32)) != 0)
            .map(|v| v as u8)
    }

    use crate::exits::testing::Rng;

    #[test]
    fn highest_vector() {
        let mut r = [0u32; 8];
        assert_eq!(highest(&r), None);
        r[1] = 1; // vector 0x20
        r[7] = 1 << 31; // vector 0xff
        assert_eq!(highest(&r), Some(0xff));
        r[7] = 0;
        assert_eq!(highest(&r), Some(0x20));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            // Sparse words, so that every word position is the highest one now and then.
            let words: [u32; 8] = core::array::from_fn(|_| {
                if rng.next().is_multiple_of(3) {
                    rng.next() as u32
                } else {
                    0
                }
            });
            assert_eq!(highest(&words), scanned(&words), "{words:x?}");
        }
    }

    /// Random sequences of sets and clears: the kept summary answers as the scan of the words
    /// does after every step, and a register rebuilt from its words (as a restore does) too.
    #[test]
    fn kept_highest_vector_agrees_with_the_scan() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..200 {
            let mut v = Vectors::EMPTY;
            for _ in 0..300 {
                // Few distinct vectors, so that clears often empty a word.
                let vector = (rng.next() % 256) as u8
                    & if rng.next().is_multiple_of(2) {
                        0xe3
                    } else {
                        0xff
                    };
                if rng.next().is_multiple_of(3) {
                    v.clear(vector);
                    assert!(!v.test(vector));
                } else {
                    v.set(vector);
                    assert!(v.test(vector));
                }
                assert_eq!(v.highest(), scanned(&v.words));
                assert_eq!(Vectors::from_words(v.words), v);
            }
        }
    }

    /// The APIC's answers that rest on the kept summaries (deliverable, PPR, EOI) follow the
    /// rules of SDM Vol. 3A 11.8.3-11.8.5 computed from the plain registers, over random
    /// interrupts, acknowledgements, TPR writes and EOIs.
    #[test]
    fn deliverable_ppr_and_eoi_follow_the_registers() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let mut l = enabled();
        for step in 0..5000 {
            match rng.next() % 4 {
                0 => {
                    let _ = l.accept(16 + (rng.next() % 240) as u8, rng.next().is_multiple_of(4));
                }
                1 => {
                    if let Some(v) = l.deliverable() {
                        l.acknowledge(v);
                    }
                }
                2 => l.set_tpr((rng.next() % 256) as u8),
                _ => {
                    // EOI clears the highest ISR bit; a level-triggered one goes on to the IOAPIC.
                    let mut expected = l.isr.words;
                    let top = scanned(&expected);
                    if let Some(v) = top {
                        expected[usize::from(v / 32)] &= !(1 << (v % 32));
                    }
                    let level = top.filter(|&v| l.tmr.test(v));
                    assert_eq!(l.eoi(), level, "step {step}");
                    assert_eq!(l.isr.words, expected, "step {step}");
                }
            }
            let isrv = scanned(&l.isr.words).unwrap_or(0);
            let ppr = if l.tpr() >> 4 >= isrv >> 4 {
                l.tpr()
            } else {
                isrv & 0xf0
            };
            assert_eq!(l.ppr(), ppr, "step {step}");
            let irrv = scanned(&l.irr.words);
            assert_eq!(l.highest_irr(), irrv, "step {step}");
            assert_eq!(
                l.deliverable(),
                irrv.filter(|v| v & 0xf0 > ppr & 0xf0),
                "step {step}"
            );
        }
    }

    fn image_value(l: &Lapic, offset: u64) -> Option<u32> {
        l.page_image()
            .iter()
            .find(|&&(o, _)| o == offset as usize)
            .map(|&(_, v)| v)
    }

    /// What APIC-register virtualization reads from the virtual-APIC page is what the model
    /// reads, in each mode's layout (SDM 30.4.2, 30.5), and is reported stale after every
    /// change of it.
    #[test]
    fn the_page_image_is_what_the_registers_read() {
        let mut l = enabled();
        assert!(
            l.take_page_stale(),
            "a new APIC has not been written to a page yet"
        );
        assert!(!l.take_page_stale());
        l.mmio_write(LDR, 4, 0x0312_3456, 0);
        l.mmio_write(LVT_TIMER, 4, 0x2_0040, 0);
        l.mmio_write(ICR_HIGH, 4, 0x0700_0000, 0);
        assert!(l.take_page_stale());
        let offsets: Vec<usize> = l.page_image().iter().map(|&(o, _)| o).collect();
        for offset in [
            ID,
            VERSION,
            LDR,
            DFR,
            SVR,
            ESR,
            ICR_LOW,
            ICR_HIGH,
            TIMER_INITIAL,
        ] {
            assert!(offsets.contains(&(offset as usize)), "{offset:#x}");
            assert_eq!(
                image_value(&l, offset),
                Some(read(&mut l, offset, 0)),
                "{offset:#x}"
            );
        }
        for i in 0..8 {
            assert_eq!(image_value(&l, TMR0 + 16 * i), Some(0));
        }
        assert_eq!(image_value(&l, LVT_TIMER), Some(0x2_0040));
        assert_eq!(image_value(&l, LDR), Some(0x0300_0000));
        // A level-triggered vector changes the TMR: stale; the same again does not.
        l.accept(0x61, true);
        assert!(l.take_page_stale());
        assert_eq!(image_value(&l, TMR0 + 0x30), Some(1 << 1));
        l.eoi();
        l.accept(0x61, true);
        assert!(!l.take_page_stale());
        // x2APIC mode: RDMSR reads 64 bits at (MSR & 0xFF) << 4.
        assert_eq!(l.write_apic_base(X2APIC), Ok(()));
        assert!(l.take_page_stale());
        assert_eq!(l.x2apic_write(0x830, 5 << 32 | 0x4_0051, 0), Ok(None));
        assert!(l.take_page_stale());
        assert_eq!(image_value(&l, ID), Some(0));
        assert_eq!(image_value(&l, LDR), Some(1));
        assert_eq!(image_value(&l, DFR), Some(0));
        assert_eq!(image_value(&l, ICR_LOW), Some(0x4_0051));
        assert_eq!(image_value(&l, ICR_LOW + 4), Some(5));
        assert_eq!(image_value(&l, ICR_HIGH), Some(0));
        // A restored APIC is stale (its page is written afresh).
        let mut w = crate::state::Writer::new();
        l.save(&mut w);
        let bytes = w.into_bytes();
        let mut m = Lapic::new(TSC_HZ);
        m.take_page_stale();
        m.restore(&mut crate::state::Reader::new(&bytes)).unwrap();
        assert!(m.take_page_stale());
    }

    /// The x2APIC MSRs RDMSR reads (Table 11-6), which the MSR bitmap lets through with
    /// APIC-register virtualization (`vmx::apicv`).
    #[test]
    fn x2apic_readable_registers() {
        let l = x2apic();
        for msr in X2APIC_MSRS {
            assert_eq!(
                x2apic_readable(msr),
                l.x2apic_read(msr, 0).is_ok(),
                "{msr:#x}"
            );
        }
        assert!(!x2apic_readable(0x7ff) && !x2apic_readable(0x900));
        assert!(x2apic_readable(X2APIC_TIMER_CURRENT));
    }

    /// The ICR's destination half the CPU left on the page (a write of 310H does not exit, and
    /// the CPU clears bytes 2:0 there, SDM 30.4.3.2): the model takes it, and the page needs no
    /// rewrite for it.
    #[test]
    fn icr_high_from_the_page() {
        let mut l = enabled();
        l.take_page_stale();
        l.set_icr_high(0x0123_4567);
        assert_eq!(l.icr_high(), 0x0100_0000);
        assert!(!l.take_page_stale());
        assert_eq!(l.take_icr_stale(), None);
    }
}
