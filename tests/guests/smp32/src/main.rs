//! smp32: an ELF32 guest with several vCPUs (`vcpus = N` in its manifest), entered in 32-bit
//! protected mode on its bootstrap processor. It reads the vCPU count from CPUID.1:EBX[23:16],
//! starts every other vCPU with INIT and two STARTUP IPIs (SDM Vol. 3A 9.4.4.1) into a real-mode
//! trampoline at 0x8000 that switches to protected mode, and then every vCPU:
//! - reports `cpu K of N up` (K its APIC ID, from its local APIC and CPUID.1:EBX[31:24], which
//!   must agree);
//! - adds 1 to a shared counter ROUNDS times with LOCK XADD;
//! - sends a fixed IPI (vector 0x40) to the next vCPU (APIC ID K+1 mod N) and waits in STI; HLT
//!   until its own arrives;
//! The bootstrap processor then checks that the counter is exactly N x ROUNDS and exits with
//! 0x21, or 0x3f on any failure.
//!
//! With `mode=spin` on its command line, every vCPU instead computes once all are up, until the
//! bootstrap processor has seen SPIN_CYCLES of the guest's clock pass; each reads its own CPU time
//! (hypercall CPU_TIME, Keel's account of that vCPU) when the spin starts and when it ends, and the
//! bootstrap processor prints `spin: cpu K ran C cycles` for every vCPU (the fairness test,
//! tests/tests/smp.rs) and exits with 0x21.
//!
//! With `mode=pingpong`, once all are up, vCPU 0 sends vCPU 1 a fixed IPI and waits in HLT for
//! one back, PINGPONGS times, while vCPU 1 answers each (the IPI delivery figures: Keel times each
//! IPI from the sender's exit to the target's entry, on one CPU or across CPUs), and exits with
//! 0x21 after `pingpong: N round trips`.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use guest_common::abi::HC_CPU_TIME;
use guest_common::{checks, console, cpu, lapic, say, trap};

const EXIT_DONE: u8 = 0x21;
/// Increments per vCPU.
const ROUNDS: u32 = 200_000;
/// Where the trampoline is copied: STARTUP vector 0x08 (SDM 10.6.1: the AP starts at
/// vector << 12 in real mode).
const TRAMPOLINE: usize = 0x8000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;
/// ICR low halves: INIT (delivery mode 5) and STARTUP (6), level assert; fixed (0) to a vector.
const ICR_INIT: u32 = 5 << 8 | 1 << 14;
const ICR_STARTUP: u32 = 6 << 8 | 1 << 14;

/// `mode=spin`: how long the vCPUs compute, in cycles of the guest's clock (its TSC, which
/// runs only while one of its vCPUs has the CPU: with N vCPUs, each gets about 1/N of it).
const SPIN_CYCLES: u64 = 40_000_000;
/// `mode=pingpong`: how many IPI round trips vCPUs 0 and 1 make.
const PINGPONGS: u32 = 200;
/// The most vCPUs this guest starts (the AP stacks are sized for it).
const MAX_CPUS: u32 = 16;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static UP: AtomicU32 = AtomicU32::new(0);
static READY: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);
static CPUS: AtomicU32 = AtomicU32::new(1);
static FAILED: AtomicBool = AtomicBool::new(false);
/// `mode=spin` was given.
static SPIN: AtomicBool = AtomicBool::new(false);
/// `mode=pingpong` was given.
static PINGPONG: AtomicBool = AtomicBool::new(false);
/// Set by the bootstrap processor when SPIN_CYCLES have passed: every vCPU stops computing.
static STOP: AtomicBool = AtomicBool::new(false);
/// Each vCPU's CPU time over its spin, by APIC ID.
static SPUN: [AtomicU32; MAX_CPUS as usize] = [const { AtomicU32::new(0) }; MAX_CPUS as usize];
/// One line at a time on the shared UART.
static SAY_LOCK: AtomicBool = AtomicBool::new(false);

macro_rules! say_locked {
    ($($arg:tt)*) => {{
        while SAY_LOCK
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        say!($($arg)*);
        SAY_LOCK.store(false, Ordering::Release);
    }};
}

global_asm!(
    r#"
    .pushsection .bss.stack, "aw", @nobits
    .balign 16
smp32_stack:
    .skip 0x10000
smp32_stack_top:
    .balign 16
smp32_ap_stacks:
    .skip 16 * 0x4000
    .popsection

    .pushsection .data.smp32, "aw"
    .balign 8
smp32_ap_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00cf93000000ffff
smp32_ap_next:
    .long 0
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    mov $smp32_stack_top, %esp
    push %esi
    push %edi
    call {main}
    ud2

    // Copied to 0x8000; runs in real mode with CS = 0x0800, IP = 0.
    .globl smp32_tramp_start, smp32_tramp_end
    .code16
smp32_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (smp32_tramp_gdtr - smp32_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $smp32_ap_pm
    .balign 4
smp32_tramp_gdtr:
    .word 23
    .long smp32_ap_gdt
smp32_tramp_end:

    .code32
smp32_ap_pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $1, %eax
    lock xadd %eax, smp32_ap_next
    inc %eax
    shl $14, %eax
    add $smp32_ap_stacks, %eax
    mov %eax, %esp
    call {ap_main}
    ud2
    .popsection
"#,
    main = sym smp32_main,
    ap_main = sym smp32_ap_main,
    options(att_syntax)
);

extern "C" {
    static smp32_tramp_start: u8;
    static smp32_tramp_end: u8;
}

extern "C" fn smp32_main(cmdline: *const u8, _ram_size: usize) -> ! {
    checks::init("smp32");
    trap::install();
    lapic::enable();
    // SAFETY: the loader passes its NUL-terminated command line, left alone while the guest runs.
    let cmdline = unsafe { console::c_str(cmdline, 4096) };
    let spin = cmdline
        .split(|&b| b == b' ')
        .any(|word| word == b"mode=spin");
    SPIN.store(spin, Ordering::SeqCst);
    let pingpong = cmdline
        .split(|&b| b == b' ')
        .any(|word| word == b"mode=pingpong");
    PINGPONG.store(pingpong, Ordering::SeqCst);
    let cpus = (cpu::cpuid(1).1 >> 16) & 0xff;
    let cpus = cpus.clamp(1, MAX_CPUS);
    CPUS.store(cpus, Ordering::SeqCst);
    say_locked!("{} vCPUs", cpus);
    if cpus > 1 {
        let start = core::ptr::addr_of!(smp32_tramp_start) as usize;
        let len = core::ptr::addr_of!(smp32_tramp_end) as usize - start;
        // SAFETY: 0x8000.. is guest RAM that nothing else uses (the loader's tables end at
        // 0x6000, the image is at 2 MiB); the trampoline is position independent up to its
        // absolute jump into this image.
        unsafe { core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len) };
        for ap in 1..cpus as u8 {
            lapic::send_ipi(ap, ICR_INIT);
            lapic::send_ipi(ap, ICR_STARTUP | SIPI_VECTOR);
            // The second SIPI of the MP protocol: a started processor ignores it.
            lapic::send_ipi(ap, ICR_STARTUP | SIPI_VECTOR);
        }
        while UP.load(Ordering::SeqCst) < cpus - 1 {
            core::hint::spin_loop();
        }
    }
    work();
    while DONE.load(Ordering::SeqCst) < cpus {
        core::hint::spin_loop();
    }
    if pingpong {
        say_locked!("pingpong: {} round trips", PINGPONGS);
        if FAILED.load(Ordering::SeqCst) {
            say_locked!("FAILED");
            cpu::exit(guest_common::EXIT_FAILURE);
        }
        checks::done(EXIT_DONE)
    }
    if spin {
        for (id, spun) in SPUN.iter().enumerate().take(cpus as usize) {
            say_locked!(
                "spin: cpu {} ran {} cycles",
                id,
                spun.load(Ordering::SeqCst)
            );
        }
        if FAILED.load(Ordering::SeqCst) {
            say_locked!("FAILED");
            cpu::exit(guest_common::EXIT_FAILURE);
        }
        checks::done(EXIT_DONE)
    }
    let total = COUNTER.load(Ordering::SeqCst);
    say_locked!("counter {} = {} x {}", total, cpus, ROUNDS);
    if total != cpus * ROUNDS || FAILED.load(Ordering::SeqCst) {
        say_locked!("FAILED");
        cpu::exit(guest_common::EXIT_FAILURE);
    }
    checks::done(EXIT_DONE)
}

extern "C" fn smp32_ap_main() -> ! {
    trap::load();
    lapic::enable();
    UP.fetch_add(1, Ordering::SeqCst);
    work();
    loop {
        // SAFETY: parks this processor; interrupts are off, nothing wakes it but NMI or INIT.
        unsafe { asm!("cli", "hlt") };
    }
}

/// What every vCPU does once up.
fn work() {
    let cpus = CPUS.load(Ordering::SeqCst);
    let id = lapic::id();
    let cpuid_id = (cpu::cpuid(1).1 >> 24) as u8;
    if id != cpuid_id {
        say_locked!("cpu {}: CPUID says APIC ID {}", id, cpuid_id);
        FAILED.store(true, Ordering::SeqCst);
    }
    say_locked!("cpu {} of {} up", id, cpus);
    cpu::enable_interrupts();
    // Everyone's APIC and IDT are ready before anyone sends an IPI.
    READY.fetch_add(1, Ordering::SeqCst);
    while READY.load(Ordering::SeqCst) < cpus {
        core::hint::spin_loop();
    }
    if SPIN.load(Ordering::SeqCst) {
        spin(id);
        DONE.fetch_add(1, Ordering::SeqCst);
        return;
    }
    if PINGPONG.load(Ordering::SeqCst) {
        if cpus >= 2 && id < 2 {
            ping_pong(id);
        }
        DONE.fetch_add(1, Ordering::SeqCst);
        return;
    }
    for _ in 0..ROUNDS {
        COUNTER.fetch_add(1, Ordering::SeqCst);
    }
    let next = ((u32::from(id) + 1) % cpus) as u8;
    lapic::send_ipi(next, u32::from(trap::IPI_VECTOR));
    wait_for_ipis(id, 1);
    let from = (u32::from(id) + cpus - 1) % cpus;
    say_locked!(
        "cpu {} counted {} and took the IPI of cpu {}",
        id,
        ROUNDS,
        from
    );
    DONE.fetch_add(1, Ordering::SeqCst);
}

/// `mode=pingpong`: vCPU 0 sends, vCPU 1 answers, PINGPONGS times; each waits in HLT for its
/// turn.
fn ping_pong(id: u8) {
    let other = 1 - id;
    for n in 0..PINGPONGS {
        if id == 0 {
            lapic::send_ipi(other, u32::from(trap::IPI_VECTOR));
        }
        wait_for_ipis(id, n + 1);
        if id == 1 {
            lapic::send_ipi(other, u32::from(trap::IPI_VECTOR));
        }
    }
}

/// Waits in STI; HLT until vCPU `id` has taken `n` IPIs.
fn wait_for_ipis(id: u8, n: u32) {
    let mine = &trap::IPIS[usize::from(id)];
    while mine.load(Ordering::SeqCst) < n {
        // STI's one-instruction shadow: the IPI cannot slip in between the check and the HLT.
        // SAFETY: waits for an interrupt; the IDT handles IPI_VECTOR.
        unsafe {
            asm!("cli", "cmpl {n:e}, ({p})", "jae 2f", "sti", "hlt", "2:", "sti", p = in(reg) mine.as_ptr(), n = in(reg) n, options(att_syntax))
        };
    }
}

/// `mode=spin`: computes until the bootstrap processor (APIC ID 0) has seen SPIN_CYCLES of the
/// guest's clock pass, and records the CPU time Keel accounted to this vCPU meanwhile. Each vCPU
/// reads its start when it first runs after the barrier and its end when it first runs after the
/// stop, so the readings of all of them frame the same stretch of the guest's life (to within the
/// slice the bootstrap processor is in).
fn spin(id: u8) {
    let Some(start) = cpu_time() else {
        return;
    };
    let t0 = cpu::rdtsc();
    let mut x = u32::from(id);
    while !STOP.load(Ordering::SeqCst) {
        for _ in 0..1000 {
            x = core::hint::black_box(x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223));
        }
        if id == 0 && cpu::rdtsc().wrapping_sub(t0) >= SPIN_CYCLES {
            STOP.store(true, Ordering::SeqCst);
        }
    }
    let Some(end) = cpu_time() else {
        return;
    };
    if let Some(spun) = SPUN.get(usize::from(id)) {
        spun.store(end.wrapping_sub(start), Ordering::SeqCst);
    }
}

/// This vCPU's CPU time in cycles (the low 32 bits in 32-bit code), or None (and the guest
/// fails) without a hypervisor that answers CPU_TIME.
fn cpu_time() -> Option<u32> {
    match cpu::vmcall(HC_CPU_TIME, 0, 0) {
        Ok(cycles) => Some(cycles as u32),
        Err(_) => {
            say_locked!("spin: no hypervisor answers CPU_TIME");
            FAILED.store(true, Ordering::SeqCst);
            STOP.store(true, Ordering::SeqCst);
            None
        }
    }
}
