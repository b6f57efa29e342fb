//! The local APIC timer in xAPIC mode at its default base 0xFEE00000 (SDM Vol. 3A 11.4, 11.5.4).
//! Long64 reaches it through the loader's identity map (uncached there); 32-bit guests run with
//! paging off.

const BASE: usize = 0xfee0_0000;
const EOI: usize = 0xb0;
const SPURIOUS: usize = 0xf0;
const LVT_TIMER: usize = 0x320;
const INITIAL_COUNT: usize = 0x380;
const CURRENT_COUNT: usize = 0x390;
const DIVIDE_CONFIG: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b1011: divide by 1.
const DIVIDE_BY_1: u32 = 0xb;
/// Divide configuration 0b1010: divide by 128 (SDM Vol. 3A figure 11-10).
const DIVIDE_BY_128: u32 = 0xa;
pub const SPURIOUS_VECTOR: u8 = 0xff;

fn write(reg: usize, v: u32) {
    // SAFETY: the LAPIC page is identity mapped (or paging is off) and is MMIO, not Rust memory.
    unsafe { core::ptr::write_volatile((BASE + reg) as *mut u32, v) }
}

fn read(reg: usize) -> u32 {
    // SAFETY: as in `write`.
    unsafe { core::ptr::read_volatile((BASE + reg) as *const u32) }
}

const ID: usize = 0x20;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
/// ICR delivery status (bit 12): the previous IPI is still being sent.
const ICR_PENDING: u32 = 1 << 12;

/// This processor's APIC ID (xAPIC ID register bits 31:24).
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Sends an IPI through the ICR (SDM Vol. 3A 11.6.1): `low` is the ICR's low half (vector,
/// delivery mode, level, shorthand), `dest` the physical destination APIC ID. Waits until the
/// previous one has gone.
pub fn send_ipi(dest: u8, low: u32) {
    // black_box keeps the load a plain MOV: folded into the test it became BT on the MMIO page,
    // an instruction Keel's MMIO emulation does not take.
    while core::hint::black_box(read(ICR_LOW)) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
    write(ICR_HIGH, u32::from(dest) << 24);
    write(ICR_LOW, low);
}

/// Software-enables the APIC (SVR bit 8) with the spurious vector 0xff.
pub fn enable() {
    write(SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// Starts a masked one-shot count down from u32::MAX, for calibration.
pub fn start_free_running() {
    write(DIVIDE_CONFIG, DIVIDE_BY_1);
    write(LVT_TIMER, LVT_MASKED);
    write(INITIAL_COUNT, u32::MAX);
}

/// As [`start_free_running`] with the clock divided by 128, for long one-shots: at a 1 GHz timer
/// clock a count lasts up to 9 minutes instead of 4 seconds.
pub fn start_free_running_slow() {
    write(DIVIDE_CONFIG, DIVIDE_BY_128);
    write(LVT_TIMER, LVT_MASKED);
    write(INITIAL_COUNT, u32::MAX);
}

/// One interrupt on `vector` after `count` ticks of the timer clock divided by 128 (the rate
/// [`start_free_running_slow`] lets one measure).
pub fn start_one_shot_slow(vector: u8, count: u32) {
    write(DIVIDE_CONFIG, DIVIDE_BY_128);
    write(LVT_TIMER, u32::from(vector));
    write(INITIAL_COUNT, count.max(1));
}

pub fn current_count() -> u32 {
    read(CURRENT_COUNT)
}

/// Periodic interrupts on `vector` every `count` timer ticks.
pub fn start_periodic(vector: u8, count: u32) {
    write(DIVIDE_CONFIG, DIVIDE_BY_1);
    write(LVT_TIMER, LVT_PERIODIC | u32::from(vector));
    write(INITIAL_COUNT, count.max(1));
}

pub fn stop() {
    write(LVT_TIMER, LVT_MASKED);
    write(INITIAL_COUNT, 0);
}

pub fn eoi() {
    write(EOI, 0);
}
