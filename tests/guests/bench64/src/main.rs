//! bench64: Keel's benchmark guest. It times single operations with RDTSC, each one many times,
//! and prints one machine-readable line per operation:
//!
//! ```text
//! bench: <op> min=<cycles> median=<cycles> max=<cycles> n=<samples>
//! bench: <op> n/a (<why>)
//! ```
//!
//! The median is the middle element of the sorted samples (index n/2). Every figure is the
//! difference of two RDTSC readings around the operation, so it includes the second RDTSC and
//! the one or two instructions that set the operation up: the `rdtsc` line (nothing between the
//! two readings) and the bare run (no hypervisor) show that floor. docs/BENCHMARKS.md explains
//! the figures; `cargo keel bench` runs everything and prints the table.
//!
//! Command line words: `mode=keel` (default: a Keel guest) or `mode=bare` (booted by bench64-boot
//! with no hypervisor; the VMX-only operations print n/a and the device operations reach Bochs'
//! own devices), `yields=N` (YIELD round trips of the two-guest ping-pong, default 1000).
//!
//! Under Keel, guest 0 runs the ping-pong with the other guests, then the whole suite alone; every
//! other guest runs only the ping-pong and exits. The first line also reports `first-rdtsc`: the
//! TSC read by the first instruction of `_start`.
//!
//! Landmarks for the host: Bochs logs every EPT violation with its tick count (its TSC, which
//! starts at power-on), and a LAPIC register read is an EPT violation under Keel. So `_start`
//! reads the LAPIC version register with its fifth instruction, and each guest reads an ISR/TMR/IRR
//! register of its own just before and just after its YIELD loop ([`landmark`]): `cargo keel
//! bench` finds those lines in Bochs' log to time what no guest clock shows (the first guest
//! instruction after power-on, the whole ping-pong). The reads have no effect on the LAPIC.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::abi::HC_GUEST_ID;
use guest_common::console::{c_str, Printable};
use guest_common::{checks, cpu, lapic, pic, say};

/// Status `(0x30 << 1) | 1` under Keel.
const EXIT_DONE: u8 = 0x30;
/// Samples kept per operation (a longer ping-pong keeps the last ones).
const SAMPLES: usize = 1000;
/// Untimed runs of each operation first, so one-time costs (first touch of a page, of a device)
/// do not count.
const WARMUP: usize = 8;
const DEFAULT_YIELDS: usize = 1000;
const HC_YIELD: usize = 2;
/// The 16550's scratch register: a device register with no side effect, in Keel and in Bochs.
const UART_SCRATCH: u16 = 0x3ff;
const MSR_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const LAPIC_TPR: usize = 0xfee0_0080;
const LAPIC_EOI: usize = 0xfee0_00b0;
const LAPIC_ICR_LOW: usize = 0xfee0_0300;
const LAPIC_LVT_TIMER: usize = 0xfee0_0320;
/// The first of the 24 read-only registers ISR, TMR and IRR (0x100-0x270) used as landmarks.
const LAPIC_LANDMARKS: usize = 0xfee0_0100;
/// LVT timer mode bits 18:17 = 10b: TSC-deadline (SDM Vol. 3A 11.5.4.1).
const LVT_TSC_DEADLINE: u32 = 0b10 << 17;
/// ICR destination shorthand 01b: self; delivery mode fixed (SDM Vol. 3A 11.6.1).
const ICR_SELF_FIXED: u32 = 1 << 18;
const TIMER_VECTOR: u8 = 0x40;
const IPI_VECTOR: u8 = 0x41;
/// The self-IPI in x2APIC mode, whose handler ends with an x2APIC EOI.
const X2APIC_IPI_VECTOR: u8 = 0x42;
/// IA32_APIC_BASE.EXTD: x2APIC mode (SDM Vol. 3A 11.12.1).
const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EXTD: u64 = 1 << 10;
/// x2APIC registers (SDM Vol. 3A Table 11-6).
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_SELF_IPI: u32 = 0x83f;
/// How far ahead the HLT test arms the TSC deadline: far more than arming and halting cost
/// under Keel, so the guest is always halted when it falls due.
const HLT_DELAY: u64 = 20_000;
/// How far ahead the `deadline` row moves the TSC deadline: far enough that it never falls due
/// while the row runs (a guest's timer moved before it fires, as Linux's tick does).
const FAR_DELAY: u64 = 1 << 40;
/// Bochs stops when this string is written to port 0x8900 (the bare run's exit).
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
const UART_LSR: u16 = 0x3fd;
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;

/// TSC at the first instruction of `_start`.
static FIRST_TSC: AtomicU64 = AtomicU64::new(0);
/// TSC at the entry of the timer / IPI handler (0: not run yet).
static TIMER_TSC: AtomicU64 = AtomicU64::new(0);
static IPI_TSC: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .pushsection .bss.stack, "aw", @nobits
    .balign 16
bench_stack:
    .skip 0x10000
bench_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    rdtsc
    mov dword ptr [rip + {first}], eax
    mov dword ptr [rip + {first} + 4], edx
    mov eax, 0xfee00030                 # landmark: the LAPIC version register
    mov eax, dword ptr [rax]
    lea rsp, [rip + bench_stack_top]
    call {main}
    ud2
    .popsection

    # Interrupt handlers that only note the TSC at their entry in SLOT and send the LAPIC an EOI.
    .macro BENCH_STAMP name, slot
    .globl \name
\name:
    push rax
    push rdx
    rdtsc
    mov dword ptr [rip + \slot], eax
    mov dword ptr [rip + \slot + 4], edx
    mov eax, 0xfee000b0
    mov dword ptr [rax], 0
    pop rdx
    pop rax
    iretq
    .endm

    .pushsection .text.bench_traps, "ax"
    BENCH_STAMP bench_timer_entry, {timer}
    BENCH_STAMP bench_ipi_entry, {ipi}

    # The same in x2APIC mode, where the EOI is WRMSR 0x80B of 0.
    .globl bench_x2apic_ipi_entry
bench_x2apic_ipi_entry:
    push rax
    push rcx
    push rdx
    rdtsc
    mov dword ptr [rip + {ipi}], eax
    mov dword ptr [rip + {ipi} + 4], edx
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq
    .popsection
"#,
    first = sym FIRST_TSC,
    main = sym bench_main,
    timer = sym TIMER_TSC,
    ipi = sym IPI_TSC,
);

extern "C" {
    fn bench_timer_entry();
    fn bench_ipi_entry();
    fn bench_x2apic_ipi_entry();
    /// guest-common's 16-byte trap stubs, one per vector (trap/x86_64.rs).
    static guest_trap_stubs: u8;
}

/// `rdtsc; <op>; rdtsc`: the low 32 bits of the difference. The op's register operands follow
/// the instruction strings.
macro_rules! timed {
    ($($op:literal),* $(; $($operands:tt)*)?) => {{
        let cycles: u32;
        // SAFETY: each op is one instruction on a register or on a device the guest owns; the
        // operand list names every register it changes.
        unsafe {
            asm!(
                "rdtsc",
                "mov {t0:e}, eax",
                $($op,)*
                "rdtsc",
                "sub eax, {t0:e}",
                t0 = out(reg) _,
                out("eax") cycles,
                out("edx") _,
                $($($operands)*)?
            );
        }
        cycles
    }};
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Keel,
    Bare,
}

extern "C" fn bench_main(cmdline: *const u8, _ram_size: u64) -> ! {
    checks::init("bench");
    install_idt();
    // SAFETY: Keel's ELF loader and bench64-boot both put a NUL-terminated command line at RDI.
    let cmdline = unsafe { c_str(cmdline, 4096) };
    let mode = match word(cmdline, b"mode=") {
        Some(b"bare") => Mode::Bare,
        _ => Mode::Keel,
    };
    let yields = word(cmdline, b"yields=")
        .and_then(|w| core::str::from_utf8(w).ok()?.parse().ok())
        .unwrap_or(DEFAULT_YIELDS);
    let id = match mode {
        Mode::Keel => cpu::vmcall(HC_GUEST_ID, 0, 0).ok(),
        Mode::Bare => None,
    };
    say!(
        "mode={} id={} first-rdtsc={} cmdline={}",
        if mode == Mode::Bare { "bare" } else { "keel" },
        id.map_or(-1, |i| i as i64),
        FIRST_TSC.load(Ordering::Relaxed),
        Printable(cmdline)
    );
    if let Some(id) = id {
        ping_pong(yields, id as usize);
        if id != 0 {
            say!("done");
            cpu::exit(EXIT_DONE);
        }
    }
    suite(mode);
    say!("done");
    match mode {
        Mode::Keel => cpu::exit(EXIT_DONE),
        Mode::Bare => bochs_shutdown(),
    }
}

/// The value of the first word starting with `key`.
fn word<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|&b| b == b' ')
        .find_map(|w| w.strip_prefix(key))
}

/// YIELD round trips, each in this guest's own clock. Keel stops a runnable guest's clock while it
/// waits for the CPU, so a round trip shows only this guest's share of the exit and entry, not the
/// other guests' time nor the switch work done while no guest's clock runs (docs/BENCHMARKS.md).
/// The landmarks around the loop let the host time the whole ping-pong in Bochs ticks.
fn ping_pong(yields: usize, id: usize) {
    let mut samples = [0u32; SAMPLES];
    landmark(2 * id);
    for i in 0..yields {
        // `i % SAMPLES` (not a branch) keeps every iteration the same instructions, so a longer
        // run differs from a shorter one by whole round trips only.
        samples[i % SAMPLES] = timed!("mov eax, {nr}", "vmcall"; nr = const HC_YIELD);
    }
    landmark(2 * id + 1);
    report("yield", &mut samples[..yields.min(SAMPLES)]);
}

/// Reads LAPIC landmark register `k` (0xfee00100 + 0x10 * (k % 24)), an EPT violation that Bochs
/// logs with its tick count.
fn landmark(k: usize) {
    let address = LAPIC_LANDMARKS + 0x10 * (k % 24);
    // SAFETY: the LAPIC page is identity mapped (uncached); ISR, TMR and IRR are read-only.
    unsafe { core::ptr::read_volatile(address as *const u32) };
}

fn suite(mode: Mode) {
    let keel = mode == Mode::Keel;
    // Every 8259A input masked (the BIOS left the PIT on IRQ0 in the bare run); LAPIC on.
    pic::init();
    lapic::enable();
    measure("rdtsc", || timed!());
    measure("cpuid", cpuid0);
    if keel {
        measure(
            "vmcall",
            || timed!("mov eax, {nr}", "vmcall"; nr = const HC_GUEST_ID),
        );
    } else {
        say!("vmcall n/a (no hypervisor)");
    }
    // RDTSC takes EDX, so the port number goes into DX inside the timed window.
    measure(
        "out",
        || timed!("mov edx, {p}", "out dx, al"; p = const UART_SCRATCH),
    );
    measure(
        "in",
        || timed!("mov edx, {p}", "in al, dx"; p = const UART_SCRATCH),
    );
    measure("rdmsr", || timed!("rdmsr"; in("ecx") MSR_MISC_ENABLE));
    let def_type = rdmsr(MSR_MTRR_DEF_TYPE);
    measure("wrmsr", || {
        timed!("mov eax, {lo:e}", "mov edx, {hi:e}", "wrmsr";
               in("ecx") MSR_MTRR_DEF_TYPE, lo = in(reg) def_type as u32,
               hi = in(reg) (def_type >> 32) as u32)
    });
    measure(
        "mmio-read",
        || timed!("mov {v:e}, dword ptr [{a}]"; a = in(reg) LAPIC_TPR, v = out(reg) _),
    );
    measure(
        "mmio-write",
        || timed!("mov dword ptr [{a}], {v:e}"; a = in(reg) LAPIC_TPR, v = in(reg) 0u32),
    );
    measure("cr8-read", || timed!("mov {v}, cr8"; v = out(reg) _));
    measure("cr8-write", || timed!("mov cr8, {v}"; v = in(reg) 0u64));
    // Nothing in service: the EOI changes nothing, it only has to reach the APIC.
    measure(
        "eoi",
        || timed!("mov dword ptr [{a}], {v:e}"; a = in(reg) LAPIC_EOI, v = in(reg) 0u32),
    );
    mmio_write(LAPIC_LVT_TIMER, LVT_TSC_DEADLINE | u32::from(TIMER_VECTOR));
    measure("deadline", move_deadline);
    // Disarmed (SDM Vol. 3A 11.5.4.1: a write of 0), so the far deadline cannot fire later.
    wrmsr(MSR_TSC_DEADLINE, 0);
    measure("hlt", hlt_wake);
    measure("irq", timer_while_running);
    measure("ipi", self_ipi);
    x2apic_suite();
    if !keel {
        say!("yield n/a (no hypervisor)");
    }
}

/// A plain register read in xAPIC mode, then the APIC in x2APIC mode (it stays there): a
/// register read, a TPR write, an EOI and a self-IPI through the MSRs. Last, as nothing after
/// it may use the xAPIC page.
fn x2apic_suite() {
    measure(
        "apic-read",
        || timed!("mov {v:e}, dword ptr [{a}]"; a = in(reg) LAPIC_LVT_TIMER, v = out(reg) _),
    );
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EXTD);
    measure(
        "x2apic-read",
        || timed!("rdmsr"; in("ecx") X2APIC_LVT_TIMER),
    );
    measure(
        "x2apic-tpr",
        || timed!("xor eax, eax", "xor edx, edx", "wrmsr"; in("ecx") X2APIC_TPR),
    );
    // Nothing in service, as for `eoi`.
    measure(
        "x2apic-eoi",
        || timed!("xor eax, eax", "xor edx, edx", "wrmsr"; in("ecx") X2APIC_EOI),
    );
    measure("x2apic-ipi", x2apic_self_ipi);
}

/// A self-IPI through the x2APIC SELF IPI register: the cycles from before the WRMSR to the
/// handler's first RDTSC.
fn x2apic_self_ipi() -> u32 {
    IPI_TSC.store(0, Ordering::SeqCst);
    let t0: u32;
    // SAFETY: the IDT sends the vector to `bench_x2apic_ipi_entry`, which preserves every
    // register; the stack has no red zone on this target.
    unsafe {
        asm!(
            "sti",
            "rdtsc",
            "mov {t0:e}, eax",
            "mov eax, {v:e}",
            "xor edx, edx",
            "wrmsr",
            t0 = out(reg) t0,
            v = in(reg) u32::from(X2APIC_IPI_VECTOR),
            in("ecx") X2APIC_SELF_IPI,
            out("eax") _,
            out("edx") _,
        );
    }
    while IPI_TSC.load(Ordering::SeqCst) == 0 {
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
    (IPI_TSC.load(Ordering::SeqCst) as u32).wrapping_sub(t0)
}

/// Runs `op` [`WARMUP`] times untimed, then [`SAMPLES`] times, and prints its line.
fn measure(name: &str, mut op: impl FnMut() -> u32) {
    for _ in 0..WARMUP {
        op();
    }
    let mut samples = [0u32; SAMPLES];
    for s in samples.iter_mut() {
        *s = op();
    }
    report(name, &mut samples);
}

fn report(name: &str, samples: &mut [u32]) {
    samples.sort_unstable();
    let n = samples.len();
    if n == 0 {
        say!("{} n/a (no samples)", name);
        return;
    }
    say!(
        "{} min={} median={} max={} n={}",
        name,
        samples[0],
        samples[n / 2],
        samples[n - 1],
        n
    );
}

/// CPUID leaf 0. RBX cannot be an asm operand, so it is saved outside the timed window.
fn cpuid0() -> u32 {
    let cycles: u32;
    // SAFETY: CPUID changes only EAX-EDX; RBX is restored.
    unsafe {
        asm!(
            "mov {saved}, rbx",
            "rdtsc",
            "mov {t0:e}, eax",
            "xor eax, eax",
            "cpuid",
            "rdtsc",
            "sub eax, {t0:e}",
            "mov rbx, {saved}",
            saved = out(reg) _,
            t0 = out(reg) _,
            out("eax") cycles,
            out("ecx") _,
            out("edx") _,
        );
    }
    cycles
}

/// The armed TSC deadline moved [`FAR_DELAY`] ahead of now: one WRMSR of IA32_TSC_DEADLINE in
/// TSC-deadline mode, the write Linux's tick makes most often.
fn move_deadline() -> u32 {
    let deadline = cpu::rdtsc() + FAR_DELAY;
    timed!("mov eax, {lo:e}", "mov edx, {hi:e}", "wrmsr";
           in("ecx") MSR_TSC_DEADLINE, lo = in(reg) deadline as u32,
           hi = in(reg) (deadline >> 32) as u32)
}

/// HLT until a LAPIC TSC-deadline interrupt armed [`HLT_DELAY`] cycles ahead: the cycles from the
/// deadline to the handler's first RDTSC (the wake latency).
fn hlt_wake() -> u32 {
    TIMER_TSC.store(0, Ordering::SeqCst);
    let deadline = cpu::rdtsc() + HLT_DELAY;
    wrmsr(MSR_TSC_DEADLINE, deadline);
    while TIMER_TSC.load(Ordering::SeqCst) == 0 {
        cpu::wait_for_interrupt();
    }
    TIMER_TSC.load(Ordering::SeqCst).wrapping_sub(deadline) as u32
}

/// A LAPIC TSC-deadline interrupt armed [`HLT_DELAY`] cycles ahead while the guest runs (a spin
/// with interrupts enabled, no HLT): the cycles from the deadline to the handler's first RDTSC,
/// which is the latency of an interrupt injected into a running guest.
fn timer_while_running() -> u32 {
    TIMER_TSC.store(0, Ordering::SeqCst);
    let deadline = cpu::rdtsc() + HLT_DELAY;
    wrmsr(MSR_TSC_DEADLINE, deadline);
    cpu::enable_interrupts();
    while TIMER_TSC.load(Ordering::SeqCst) == 0 {
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
    TIMER_TSC.load(Ordering::SeqCst).wrapping_sub(deadline) as u32
}

/// A fixed self-IPI through the ICR: the cycles from before the ICR write to the handler's first
/// RDTSC.
fn self_ipi() -> u32 {
    IPI_TSC.store(0, Ordering::SeqCst);
    let t0: u32;
    // SAFETY: the IDT sends the IPI vector to `bench_ipi_entry`, which preserves every register;
    // the stack has no red zone on this target.
    unsafe {
        asm!(
            "sti",
            "rdtsc",
            "mov {t0:e}, eax",
            "mov dword ptr [{icr}], {v:e}",
            t0 = out(reg) t0,
            icr = in(reg) LAPIC_ICR_LOW,
            v = in(reg) ICR_SELF_FIXED | u32::from(IPI_VECTOR),
            out("eax") _,
            out("edx") _,
        );
    }
    while IPI_TSC.load(Ordering::SeqCst) == 0 {
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
    (IPI_TSC.load(Ordering::SeqCst) as u32).wrapping_sub(t0)
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an MSR that both Keel and Bochs implement.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writes an MSR that both Keel and Bochs implement, with a valid value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack))
    };
}

fn mmio_write(address: usize, v: u32) {
    // SAFETY: the LAPIC page is identity mapped (uncached) and is MMIO, not Rust memory.
    unsafe { core::ptr::write_volatile(address as *mut u32, v) }
}

/// This guest's IDT: guest-common's stubs for every vector but the two this benchmark times,
/// which go to handlers that only take the TSC.
fn install_idt() {
    static IDT: Table = Table(core::cell::UnsafeCell::new([0; 512]));
    let stubs = core::ptr::addr_of!(guest_trap_stubs) as usize;
    let idt = IDT.0.get();
    for vector in 0..256 {
        let handler = match vector as u8 {
            TIMER_VECTOR => bench_timer_entry as *const () as usize,
            IPI_VECTOR => bench_ipi_entry as *const () as usize,
            X2APIC_IPI_VECTOR => bench_x2apic_ipi_entry as *const () as usize,
            _ => stubs + 16 * vector,
        };
        let h = handler as u64;
        // A present 64-bit interrupt gate, DPL 0, selector 0x08 (SDM Vol. 3A 6.14.1).
        let low = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48);
        // SAFETY: single CPU; the table is not loaded while it is written.
        unsafe {
            (*idt)[2 * vector] = low;
            (*idt)[2 * vector + 1] = h >> 32;
        }
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (256 * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the table is complete and static; its gates use the code selector loaded by
    // `checks::init` (guest-common's GDT).
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack)) };
}

#[repr(C, align(16))]
struct Table(core::cell::UnsafeCell<[u64; 512]>);

// SAFETY: written once on a single CPU before it is loaded.
unsafe impl Sync for Table {}

/// Bochs' shutdown port: writing "Shutdown" ends the emulator (the bare run has no debug-exit).
/// The UART is drained first (LSR bit 6, transmitter empty), or the last line loses its end.
fn bochs_shutdown() -> ! {
    while cpu::inb(UART_LSR) & LSR_TRANSMITTER_EMPTY == 0 {
        core::hint::spin_loop();
    }
    for &b in b"Shutdown" {
        cpu::outb(BOCHS_SHUTDOWN_PORT, b);
    }
    loop {
        cpu::disable_interrupts();
        // SAFETY: halting touches no memory.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}
