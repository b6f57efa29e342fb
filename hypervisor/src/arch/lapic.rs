//! Keel's own local APIC: a periodic timer calibrated against the PIT, used as Keel's tick (and as
//! the scheduler's clock where the VMX-preemption timer is missing).

use super::{cpu, idt, paging};
use core::sync::atomic::{AtomicU64, Ordering};

const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;
const LVT_PERIODIC: u32 = 1 << 17;
const LVT_MASKED: u32 = 1 << 16;

static BASE: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU64 = AtomicU64::new(0);

/// What calibration measured.
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    pub tsc_hz: u64,
    pub apic_timer_hz: u64,
    /// APIC timer ticks per TSC cycle, a 32.32 fixed-point number: [`sleep_until`]'s count is a
    /// multiplication, not a 128-bit division between reading the TSC and starting the timer,
    /// by which every wake-up would be that much late.
    apic_per_tsc: u64,
}

fn reg(offset: usize) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) as usize + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: BASE maps the 4 KiB xAPIC page (set in `init`), `offset` is a register in it.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, v: u32) {
    // SAFETY: as in `read`.
    unsafe { reg(offset).write_volatile(v) }
}

/// PIT input clock (Hz), by definition of the 8254 in the PC.
const PIT_HZ: u64 = 1_193_182;

/// Runs PIT channel 2 as a one-shot of `ms` milliseconds and returns (TSC delta, APIC timer
/// ticks) over that time. The channel 2 gate and OUT2 live in port 0x61 (bits 0 and 5).
fn measure(ms: u64) -> (u64, u64) {
    let count = (PIT_HZ * ms / 1000) as u16;
    // SAFETY: PIT and port 0x61 are the standard PC devices; Keel owns them at this point.
    unsafe {
        let p61 = cpu::inb(0x61);
        cpu::outb(0x61, (p61 & !0x02) | 0x01); // gate on, speaker off
        cpu::outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0
        cpu::outb(0x42, count as u8);
        cpu::outb(0x42, (count >> 8) as u8);
        // Restart the count by toggling the gate.
        let p61 = cpu::inb(0x61);
        cpu::outb(0x61, p61 & !0x01);
        cpu::outb(0x61, p61 | 0x01);
        write(REG_TIMER_INIT, u32::MAX);
        let t0 = cpu::rdtsc();
        while cpu::inb(0x61) & 0x20 == 0 {}
        let t1 = cpu::rdtsc();
        let apic = u32::MAX - read(REG_TIMER_CURRENT);
        (t1 - t0, apic as u64)
    }
}

/// Enables the xAPIC, calibrates its timer and starts it periodic at `hz` on [`idt::TIMER_VECTOR`].
pub fn init(hz: u64) -> Calibration {
    // The firmware may leave the legacy 8259A pair enabled with the PIT ticking on IRQ0 (vector 8
    // after a BIOS boot). Keel uses only its local APIC: mask every 8259A line.
    // SAFETY: 0x21/0xA1 are the 8259A mask registers; masking all lines only stops their interrupts.
    unsafe {
        cpu::outb(0x21, 0xff);
        cpu::outb(0xa1, 0xff);
    }
    let base_pa = cpu::rdmsr(cpu::msr::IA32_APIC_BASE) & 0xf_ffff_f000;
    BASE.store(paging::map_mmio(base_pa, 4096), Ordering::Relaxed);
    write(REG_SVR, 0x100 | idt::SPURIOUS_VECTOR as u32);
    write(REG_TIMER_DIVIDE, 0b1011); // divide by 1
    write(REG_LVT_TIMER, LVT_MASKED | idt::TIMER_VECTOR as u32);
    let (tsc, apic) = measure(10);
    let (tsc_hz, apic_timer_hz) = (tsc * 100, apic * 100);
    let ratio = (u128::from(apic_timer_hz) << 32) / u128::from(tsc_hz.max(1));
    let cal = Calibration {
        tsc_hz,
        apic_timer_hz,
        apic_per_tsc: ratio.min(u128::from(u64::MAX)) as u64,
    };
    write(REG_LVT_TIMER, LVT_PERIODIC | idt::TIMER_VECTOR as u32);
    let period = (cal.apic_timer_hz / hz).max(1);
    PERIOD.store(period, Ordering::Relaxed);
    write(REG_TIMER_INIT, period as u32);
    cal
}

/// Sleeps (STI; HLT) until an interrupt arrives, after arming a one-shot timer interrupt for
/// `tsc_deadline` (at most `max_tsc` cycles away). Keel's periodic tick is paused meanwhile and
/// restarted after, so a guest timer that falls due between ticks is not late by a whole tick.
pub fn sleep_until(tsc_deadline: u64, max_tsc: u64, cal: &Calibration) {
    let now = cpu::rdtsc();
    let delta = tsc_deadline.saturating_sub(now).clamp(1, max_tsc);
    let count =
        ((u128::from(delta) * u128::from(cal.apic_per_tsc)) >> 32).clamp(1, u32::MAX as u128);
    write(REG_LVT_TIMER, idt::TIMER_VECTOR as u32); // one-shot
    write(REG_TIMER_INIT, count as u32);
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
    restart_periodic();
}

/// Puts the timer back in periodic mode, unless the periodic tick was turned off.
fn restart_periodic() {
    let period = PERIOD.load(Ordering::Relaxed);
    if period == 0 {
        write(REG_LVT_TIMER, LVT_MASKED | idt::TIMER_VECTOR as u32);
        return;
    }
    write(REG_LVT_TIMER, LVT_PERIODIC | idt::TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, period as u32);
}

/// Turns Keel's periodic tick off: with the VMX-preemption timer ending time slices, the tick
/// would only interrupt guests (an external-interrupt exit each time) for nothing. The timer is
/// still used one-shot to wake Keel from idle.
pub fn stop_periodic() {
    PERIOD.store(0, Ordering::Relaxed);
    restart_periodic();
}

/// Enables an AP's local APIC (the page is mapped already: every CPU sees its own APIC at the
/// same address), its timer masked: an idle AP sleeps until an IPI wakes it.
pub fn init_ap() {
    write(REG_SVR, 0x100 | idt::SPURIOUS_VECTOR as u32);
    write(REG_LVT_TIMER, LVT_MASKED | idt::TIMER_VECTOR as u32);
}

/// ICR delivery status (bit 12): the previous IPI is still being sent.
const ICR_SEND_PENDING: u32 = 1 << 12;
/// ICR level (bit 14): assert.
const ICR_ASSERT: u32 = 1 << 14;
/// ICR delivery modes (bits 10:8).
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_NMI: u32 = 0b100 << 8;
/// ICR destination shorthand (bits 19:18) "self".
const ICR_SELF: u32 = 0b01 << 18;

/// Sends an IPI to the APIC whose ID is `apic_id` (xAPIC: 8-bit destination in ICR[63:56],
/// physical destination mode, no shorthand) and waits until the APIC has sent it (SDM Vol. 3A
/// 11.6.1: the ICR low half is written last, which sends the IPI).
fn send_ipi(apic_id: u32, low: u32) {
    write(REG_ICR_HIGH, (apic_id & 0xff) << 24);
    write(REG_ICR_LOW, low);
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// A fixed interrupt on `vector` to `apic_id` (delivery mode 000).
pub fn send_fixed(apic_id: u32, vector: u8) {
    send_ipi(apic_id, ICR_ASSERT | u32::from(vector));
}

/// An NMI to `apic_id` (delivery mode 100; the vector field is ignored, SDM Vol. 3A 11.6.1).
pub fn send_nmi(apic_id: u32) {
    send_ipi(apic_id, ICR_ASSERT | ICR_NMI);
}

/// A fixed interrupt on `vector` to this CPU, by the "self" shorthand, from Keel's NMI handler
/// (`arch::idt`), which may have interrupted [`send_ipi`] anywhere: the shorthand makes the
/// APIC ignore the destination in ICR[63:56] (SDM Vol. 3A 11.6.1), so the ICR high half the
/// interrupted code may have written is left as it was; the wait before the write lets an IPI
/// it already sent go first (a write while the delivery status is "send pending" is not
/// allowed), and the wait after leaves the ICR idle as `send_ipi` expects it. Nothing when the
/// APIC is not mapped yet (an NMI that early has no kick to carry).
pub fn raise_self_from_nmi(vector: u8) {
    if BASE.load(Ordering::Relaxed) == 0 {
        return;
    }
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 {
        core::hint::spin_loop();
    }
    write(REG_ICR_LOW, ICR_SELF | ICR_ASSERT | u32::from(vector));
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// INIT (edge, assert) to `apic_id`: resets that processor to wait-for-SIPI.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, ICR_ASSERT | ICR_INIT);
}

/// Start-up IPI to `apic_id`: a processor waiting for SIPI starts in real mode at
/// `page_number << 12` (CS = page_number << 8, IP = 0; SDM Vol. 3A 9.4.4.1).
pub fn send_startup(apic_id: u32, page_number: u8) {
    send_ipi(apic_id, ICR_ASSERT | ICR_STARTUP | u32::from(page_number));
}

/// ICR destination shorthand (bits 19:18) "all excluding self".
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;

/// INIT to every processor but this one.
pub fn broadcast_init() {
    send_ipi(0, ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
}

/// Start-up IPI to every processor but this one (see [`send_startup`]).
pub fn broadcast_startup(page_number: u8) {
    send_ipi(
        0,
        ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | u32::from(page_number),
    );
}

pub fn id() -> u32 {
    read(REG_ID) >> 24
}

pub fn eoi() {
    write(REG_EOI, 0);
}

pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Called for Keel's timer vector, from the IDT (interrupts enabled in root mode) or from the
/// VM-exit path (an external-interrupt exit acknowledged on exit).
pub fn on_timer_interrupt() {
    TICKS.fetch_add(1, Ordering::Relaxed);
    eoi();
}
