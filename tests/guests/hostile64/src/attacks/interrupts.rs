//! Attacks with interrupts and time.
//!
//! - `attack=hltcli`: CLI; HLT. Nothing can wake the guest (Keel never sends it an NMI), so Keel
//!   stops it: `HLT with interrupts disabled and no way to wake up`.
//! - `attack=spin cycles=<n>`: CLI, then a busy loop of n TSC cycles of its own clock that never
//!   exits to Keel; then `hostile64: spin done` and exit 0x30. Keel's preemption timer must take
//!   the CPU back every time slice, so a witness next to it finishes first.
//! - `attack=storm cycles=<n>`: with interrupts on, the PIT at its fastest rate (count 1, IRQ0
//!   through the 8259A) for the first n/2 cycles, and self-IPIs through the local APIC's ICR as
//!   fast as it can send them until n cycles have passed; then `hostile64: storm pit=<ticks>
//!   ipi=<received>/<sent>` and exit 0x30. The PIT phase keeps the guest in its IRQ0 handler
//!   (the next tick is always due), so its end is decided in the handler.

use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::trap::{LAPIC_TICKS, LAPIC_TIMER_VECTOR, PIT_VECTOR};
use guest_common::{cpu, lapic, pic, pit, say, EXIT_FAILURE};
use hostile64::catch::{self, InterruptFrame};
use hostile64::{args, EXIT_OK};

/// The ICR's low half (SDM Vol. 3A 11.6.1) in the xAPIC page.
const ICR_LOW: usize = 0xfee0_0300;
/// Destination shorthand "self" (bits 19:18 = 01), fixed delivery.
const ICR_SELF: u32 = 1 << 18;

pub fn hlt_with_interrupts_off(_cmdline: &[u8], _ram: u64) -> ! {
    say!("cli hlt");
    cpu::disable_interrupts();
    // SAFETY: halts; touches no memory.
    unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    say!("hlt returned with interrupts off");
    cpu::exit(EXIT_FAILURE)
}

/// Busy-waits `cycles` TSC cycles without a single exit (RDTSC does not exit under Keel).
fn busy(cycles: u64) {
    let t0 = cpu::rdtsc();
    while cpu::rdtsc().wrapping_sub(t0) < cycles {
        core::hint::spin_loop();
    }
}

pub fn spin(cmdline: &[u8], _ram: u64) -> ! {
    let cycles = args::number(cmdline, b"cycles", 200_000_000);
    say!("spin {} cycles with interrupts off", cycles);
    cpu::disable_interrupts();
    busy(cycles);
    say!("spin done");
    cpu::exit(EXIT_OK)
}

/// The storm's PIT phase: when it ends (TSC), and the ticks taken.
static PIT_END: AtomicU64 = AtomicU64::new(0);
static PIT_STORM_TICKS: AtomicU64 = AtomicU64::new(0);
const MASTER_PIC_DATA: u16 = 0x21;

/// IRQ0 during the storm: count, mask IRQ0 once the PIT phase is over, EOI. At count 1 the next
/// tick is due before this handler returns, so the loop in [`storm`] gets no instruction in
/// until the PIT is masked here (a guest's own livelock, as on hardware).
extern "x86-interrupt" fn storm_tick(_frame: InterruptFrame) {
    PIT_STORM_TICKS.fetch_add(1, Ordering::Relaxed);
    if cpu::rdtsc() >= PIT_END.load(Ordering::Relaxed) {
        cpu::outb(MASTER_PIC_DATA, 0xff);
    }
    pic::eoi(0);
}

pub fn storm(cmdline: &[u8], _ram: u64) -> ! {
    let cycles = args::number(cmdline, b"cycles", 20_000_000);
    say!("storm for {} cycles", cycles);
    catch::set_gate(PIT_VECTOR, storm_tick as *const () as u64);
    lapic::enable();
    pic::init();
    let t0 = cpu::rdtsc();
    PIT_END.store(t0 + cycles / 2, Ordering::SeqCst);
    // Divisor 1: the PIT's fastest rate (1.19 MHz).
    pit::start_periodic(pit::INPUT_HZ);
    pic::enable_only(1);
    let mut sent = 0u64;
    cpu::enable_interrupts();
    while cpu::rdtsc().wrapping_sub(t0) < cycles {
        // SAFETY: the xAPIC page is identity mapped (uncached) and is MMIO, not Rust memory.
        unsafe {
            core::ptr::write_volatile(
                ICR_LOW as *mut u32,
                ICR_SELF | u32::from(LAPIC_TIMER_VECTOR),
            )
        };
        sent += 1;
    }
    cpu::disable_interrupts();
    pic::mask_all();
    say!(
        "storm pit={} ipi={}/{}",
        PIT_STORM_TICKS.load(Ordering::SeqCst),
        LAPIC_TICKS.load(Ordering::SeqCst),
        sent
    );
    cpu::exit(EXIT_OK)
}
