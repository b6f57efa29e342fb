//! `attack=x2apic`: the local APIC in x2APIC mode and the CPUID leaves that describe the guest's
//! clocks, as an unmodified kernel uses them (issue 9).
//!
//! 1. CPUID.1:ECX[21] offers x2APIC; the initial APIC ID (CPUID.1:EBX[31:24]) and the x2APIC ID
//!    of leaf 0BH (EDX) are 0.
//! 2. IA32_APIC_BASE (SDM Vol. 3A 11.12.5): the x2APIC MSRs are #GP in xAPIC mode; EN|EXTD enters
//!    x2APIC mode; EXTD without EN and x2APIC -> xAPIC directly are #GP.
//! 3. The registers through RDMSR: ID 0, version 0x50014, LDR 1 (cluster 0, bit 0); the xAPIC
//!    page reads all ones (SDM 11.12.1.2); #GP for write-only (EOI, SELF IPI), absent (DFR, the
//!    ICR's high half) and read-only registers, reserved bits and a non-zero EOI.
//! 4. Interrupts: a SELF IPI (MSR 0x83F) and a fixed IPI to ID 0 through the 64-bit ICR (0x830)
//!    arrive once each, and a one-shot LAPIC timer programmed through MSRs fires once; each
//!    handler ends with an EOI through MSR 0x80B, after which the ISR bit is clear.
//! 5. Clocks: the TSC and the LAPIC timer's rates measured against PIT channel 2 agree within 1%
//!    with CPUID 0x15 (crystal ECX = the timer clock, TSC = ECX * EBX / EAX), 0x16 (base MHz) and
//!    0x40000010 (TSC kHz, timer kHz); leaf 0's maximum covers 0x16.
//! 6. Back through disabled to xAPIC mode: the page answers again (version 0x50014).
//!
//! Prints `hostile64: x2apic tsc=<Hz> timer=<Hz> cpuid15=<EAX>/<EBX>/<ECX>` and then
//! `hostile64: x2apic cases=<n>/<n> ok`.

use super::{cpuid, Tally, GP};
use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};
use guest_common::{cpu, pit, say};
use hostile64::catch::{self, rdmsr, wrmsr, InterruptFrame};

const APIC_BASE: u32 = 0x1b;
const XAPIC: u64 = 0xfee0_0900;
const X2APIC: u64 = XAPIC | 1 << 10;
const DISABLED: u64 = 0xfee0_0100;
const LAPIC_VERSION: u64 = 0xfee0_0030;

// x2APIC registers (SDM Vol. 3A Table 11-6).
const ID: u32 = 0x802;
const VERSION: u32 = 0x803;
const TPR: u32 = 0x808;
const EOI: u32 = 0x80b;
const LDR: u32 = 0x80d;
const DFR: u32 = 0x80e;
const SVR: u32 = 0x80f;
const ISR0: u32 = 0x810;
const ICR: u32 = 0x830;
const LVT_TIMER: u32 = 0x832;
const TIMER_INITIAL: u32 = 0x838;
const TIMER_CURRENT: u32 = 0x839;
const TIMER_DIVIDE: u32 = 0x83e;
const SELF_IPI: u32 = 0x83f;
const LVT_MASKED: u64 = 1 << 16;
const DIVIDE_BY_1: u64 = 0xb;

const SELF_IPI_VECTOR: u8 = 0x51;
const ICR_VECTOR: u8 = 0x52;
const TIMER_VECTOR: u8 = 0x53;
/// The one-shot's count: 1 ms at the 1 GHz timer clock.
const TIMER_COUNT: u64 = 1_000_000;

static SELF_IPIS: AtomicU32 = AtomicU32::new(0);
static ICR_IPIS: AtomicU32 = AtomicU32::new(0);
static TIMER_TICKS: AtomicU32 = AtomicU32::new(0);

/// End of interrupt in x2APIC mode, from a handler (no fault catcher there: it must not fault).
fn eoi() {
    // SAFETY: WRMSR of 0 to the x2APIC EOI register, which exists in x2APIC mode.
    unsafe { asm!("wrmsr", in("ecx") EOI, in("eax") 0u32, in("edx") 0u32, options(nostack)) };
}

extern "x86-interrupt" fn on_self_ipi(_frame: InterruptFrame) {
    SELF_IPIS.fetch_add(1, Ordering::SeqCst);
    eoi();
}

extern "x86-interrupt" fn on_icr_ipi(_frame: InterruptFrame) {
    ICR_IPIS.fetch_add(1, Ordering::SeqCst);
    eoi();
}

extern "x86-interrupt" fn on_timer(_frame: InterruptFrame) {
    TIMER_TICKS.fetch_add(1, Ordering::SeqCst);
    eoi();
}

/// Opens the interrupt window for a while: STI, a few instructions, CLI.
fn window() {
    cpu::enable_interrupts();
    for _ in 0..64 {
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
}

/// Waits with STI; HLT until `count` reaches `want` (or 1000 wake-ups pass).
fn wait_for(count: &AtomicU32, want: u32) {
    for _ in 0..1000 {
        if count.load(Ordering::SeqCst) >= want {
            break;
        }
        // SAFETY: STI; HLT waits for the next interrupt with its handler in place.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// The ISR bit of `vector` (x2APIC ISR registers 0x810-0x817).
fn in_service(vector: u8) -> bool {
    rdmsr(ISR0 + u32::from(vector / 32)).1 & 1 << (vector % 32) != 0
}

/// `got` within 1% of `want`.
fn within_1_percent(got: u64, want: u64) -> bool {
    got.abs_diff(want) * 100 <= want
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("x2apic", "cases");
    let gp = Some(GP);
    cpu::disable_interrupts();
    let tsc_hz = pit::tsc_hz();

    // 1. CPUID.
    let [_, b1, c1, _] = cpuid(1, 0);
    t.require(format_args!("CPUID.1:ECX.x2APIC"), c1 & 1 << 21 != 0);
    t.require(format_args!("initial APIC ID {}", b1 >> 24), b1 >> 24 == 0);
    t.require(format_args!("CPUID.0BH:EDX"), cpuid(0xb, 0)[3] == 0);

    // 2. Entering x2APIC mode.
    t.expect(format_args!("RDMSR ID in xAPIC mode"), rdmsr(ID).0, gp);
    let bad_base = DISABLED | 1 << 10;
    t.expect(
        format_args!("EXTD without EN"),
        wrmsr(APIC_BASE, bad_base),
        gp,
    );
    t.expect(format_args!("enter x2APIC"), wrmsr(APIC_BASE, X2APIC), None);
    let (f, base) = rdmsr(APIC_BASE);
    t.require(
        format_args!("APIC_BASE {base:#x}"),
        f.is_none() && base == X2APIC,
    );
    t.expect(format_args!("x2APIC -> xAPIC"), wrmsr(APIC_BASE, XAPIC), gp);

    // 3. Registers.
    for (name, msr, want) in [
        ("ID", ID, 0),
        ("version", VERSION, 0x50014),
        ("LDR", LDR, 1),
    ] {
        let (f, v) = rdmsr(msr);
        t.require(format_args!("{name} {v:#x}"), f.is_none() && v == want);
    }
    // SAFETY: the xAPIC page is identity mapped; Keel answers it (all ones in x2APIC mode).
    let page = unsafe { core::ptr::read_volatile(LAPIC_VERSION as *const u32) };
    t.require(format_args!("xAPIC page {page:#x}"), page == u32::MAX);
    for msr in [EOI, SELF_IPI, DFR, ICR + 1, 0x809, 0x82f] {
        t.expect(format_args!("RDMSR {msr:#x}"), rdmsr(msr).0, gp);
    }
    for (msr, v) in [
        (ID, 0),
        (VERSION, 0),
        (LDR, 1),
        (EOI, 1),
        (TPR, 0x100),
        (TPR, 1 << 32),
    ] {
        t.expect(format_args!("WRMSR {msr:#x}={v:#x}"), wrmsr(msr, v), gp);
    }
    t.expect(format_args!("SVR enable"), wrmsr(SVR, 0x1ff), None);
    t.expect(format_args!("TPR 0"), wrmsr(TPR, 0), None);

    // 4. Interrupts through the MSRs.
    catch::set_gate(SELF_IPI_VECTOR, on_self_ipi as *const () as u64);
    catch::set_gate(ICR_VECTOR, on_icr_ipi as *const () as u64);
    catch::set_gate(TIMER_VECTOR, on_timer as *const () as u64);
    let vector = u64::from(SELF_IPI_VECTOR);
    t.expect(format_args!("SELF IPI"), wrmsr(SELF_IPI, vector), None);
    window();
    let n = SELF_IPIS.load(Ordering::SeqCst);
    t.require(format_args!("self IPIs {n}"), n == 1);
    t.require(format_args!("ISR after EOI"), !in_service(SELF_IPI_VECTOR));
    // Fixed, physical, destination x2APIC ID 0 in bits 63:32.
    let icr = u64::from(ICR_VECTOR);
    t.expect(format_args!("ICR to ID 0"), wrmsr(ICR, icr), None);
    window();
    let n = ICR_IPIS.load(Ordering::SeqCst);
    t.require(format_args!("ICR IPIs {n}"), n == 1);
    t.require(format_args!("ISR after EOI"), !in_service(ICR_VECTOR));
    let timer = [
        (TIMER_DIVIDE, DIVIDE_BY_1),
        (LVT_TIMER, u64::from(TIMER_VECTOR)),
        (TIMER_INITIAL, TIMER_COUNT),
    ];
    for (msr, v) in timer {
        t.expect(format_args!("WRMSR {msr:#x}={v:#x}"), wrmsr(msr, v), None);
    }
    wait_for(&TIMER_TICKS, 1);
    // Another 3 ms with interrupts on: a one-shot fires once.
    let end = cpu::rdtsc() + tsc_hz * 3 / 1000;
    cpu::enable_interrupts();
    while cpu::rdtsc() < end {
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
    let n = TIMER_TICKS.load(Ordering::SeqCst);
    let (_, current) = rdmsr(TIMER_CURRENT);
    t.require(
        format_args!("timer ticks {n}, count {current}"),
        n == 1 && current == 0,
    );
    t.require(format_args!("ISR after EOI"), !in_service(TIMER_VECTOR));

    // 5. Clocks against the PIT.
    t.expect(
        format_args!("LVT masked"),
        wrmsr(LVT_TIMER, LVT_MASKED),
        None,
    );
    t.expect(
        format_args!("free running"),
        wrmsr(TIMER_INITIAL, u64::from(u32::MAX)),
        None,
    );
    let timer_hz = pit::measure_rate(|| u64::from(u32::MAX) - rdmsr(TIMER_CURRENT).1);
    let max = cpuid(0, 0)[0];
    t.require(format_args!("max basic leaf {max:#x}"), max >= 0x16);
    let [den, num, crystal, _] = cpuid(0x15, 0);
    say!(
        "x2apic tsc={} timer={} cpuid15={}/{}/{}",
        tsc_hz,
        timer_hz,
        den,
        num,
        crystal
    );
    let tsc15 = u64::from(crystal) * u64::from(num) / u64::from(den.max(1));
    t.require(
        format_args!("0x15 TSC {tsc15}"),
        within_1_percent(tsc15, tsc_hz),
    );
    t.require(
        format_args!("0x15 crystal {crystal}"),
        within_1_percent(u64::from(crystal), timer_hz),
    );
    let base_mhz = u64::from(cpuid(0x16, 0)[0] & 0xffff);
    t.require(
        format_args!("0x16 {base_mhz} MHz"),
        within_1_percent(base_mhz * 1_000_000, tsc_hz),
    );
    let [tsc_khz, timer_khz, _, _] = cpuid(0x4000_0010, 0);
    let ok = within_1_percent(u64::from(tsc_khz) * 1000, tsc_hz)
        && within_1_percent(u64::from(timer_khz) * 1000, timer_hz);
    t.require(format_args!("0x40000010 {tsc_khz}/{timer_khz} kHz"), ok);
    let hv_max = cpuid(0x4000_0000, 0)[0];
    t.require(
        format_args!("hypervisor max leaf {hv_max:#x}"),
        hv_max >= 0x4000_0010,
    );
    t.expect(format_args!("timer off"), wrmsr(TIMER_INITIAL, 0), None);

    // 6. Back to xAPIC mode through disabled.
    t.expect(format_args!("disable"), wrmsr(APIC_BASE, DISABLED), None);
    t.expect(format_args!("xAPIC again"), wrmsr(APIC_BASE, XAPIC), None);
    t.expect(format_args!("RDMSR ID in xAPIC mode"), rdmsr(ID).0, gp);
    // SAFETY: as above; the page is the APIC's again.
    let page = unsafe { core::ptr::read_volatile(LAPIC_VERSION as *const u32) };
    t.require(format_args!("xAPIC version {page:#x}"), page == 0x50014);
    t.finish()
}
