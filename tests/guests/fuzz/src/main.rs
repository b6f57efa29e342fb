//! fuzz64: executes random byte streams, one stream per seed, and survives what they do.
//!
//! Command line: `seed=<first>` (default 0), `seeds=<count>` (default 250), `kernel=1` to also run
//! seeds in kernel mode, `budget=<LAPIC ticks>` per seed (default 5,000,000: 5 ms of Keel's
//! 1 GHz virtual APIC timer), and ` restart=<k>` that Keel appends when it restarts the guest:
//! life k runs the seeds `first + k * count ..`, so a restarted fuzzer goes on with new seeds.
//!
//! Each seed fills a 4 KiB code page with bytes from the PRNG seeded with its number, picks a
//! mode (64-bit, 32-bit or 16-bit user code; with `kernel=1` also 64-bit kernel code), sets the
//! general-purpose registers to random values or pointers into the user region, arms the local
//! APIC timer as a watchdog and jumps there with IRETQ. Whatever ends the seed — an exception, the
//! watchdog, an interrupt — arrives in [`trap`] on the handlers' own stack, which starts the next
//! seed. Before it starts, a seed prints `fuzz64: seed <n> <mode>`; replay one with
//! `cmdline = seed=<n> seeds=1` (docs/SECURITY.md). After the last seed fuzz64 prints
//! `fuzz64: done seeds=<count> first=<n> <outcome>=<count>...` and exits with 0x30; every 50
//! seeds it prints the same counts so far as `fuzz64: progress ...`.
//!
//! Kernel-mode streams are filtered so that they cannot switch the watchdog off or end the guest
//! on purpose: CLI, POPF, IRET, MOV to a control register, LGDT/LIDT, VMCALL and OUT imm8 to
//! 0xf4-0xf7 become NOPs. They can still kill the guest (a triple fault after wrecking its stack,
//! a wild MMIO access): Keel then stops it, and restarts it if the manifest says `restart = N`.
#![no_std]
#![no_main]

mod sandbox;

use core::arch::asm;
use core::cell::UnsafeCell;
use guest_common::console::{self, Line};
use guest_common::cpu;
use hostile64::rng::Rng;
use hostile64::{args, sse, EXIT_OK};
use sandbox::{
    KERNEL_CODE, KERNEL_DATA, LAPIC, USER_BASE, USER_CODE16, USER_CODE32, USER_CODE64, USER_DATA,
    USER_DATA16, USER_SIZE,
};

hostile64::entry!(fuzz_main);

const HC_CONSOLE_WRITE: usize = 1;
/// The watchdog's vector.
const WATCHDOG: u8 = 0x40;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const CODE_PAGE: usize = 4096;
/// Seeds between two `progress` lines (the same counts as `done`, so far).
const PROGRESS_EVERY: u64 = 50;

/// A line through hypercall CONSOLE_WRITE: a seed may have reprogrammed the UART.
macro_rules! report {
    ($($arg:tt)*) => {{
        let line = Line::new(format_args!($($arg)*));
        let bytes = line.as_bytes();
        let _ = cpu::vmcall(HC_CONSOLE_WRITE, bytes.as_ptr() as usize, bytes.len());
    }};
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    User64,
    User32,
    User16,
    Kernel64,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::User64 => "user64",
            Mode::User32 => "user32",
            Mode::User16 => "user16",
            Mode::Kernel64 => "kernel64",
        }
    }

    /// CS, SS (and DS/ES), RSP, RIP for IRETQ.
    fn entry(self) -> (u16, u16, u64, u64) {
        let top = USER_BASE + USER_SIZE - 16;
        match self {
            Mode::User64 => (USER_CODE64, USER_DATA, top, USER_BASE),
            Mode::User32 => (USER_CODE32, USER_DATA, top, USER_BASE),
            // The 16-bit segments have their base at USER_BASE.
            Mode::User16 => (USER_CODE16, USER_DATA16, USER_SIZE - 16, 0),
            Mode::Kernel64 => (KERNEL_CODE, KERNEL_DATA, top, USER_BASE),
        }
    }
}

/// What ended the seeds, by vector; index 256: the watchdog (vector WATCHDOG is counted there).
struct State {
    first: u64,
    end: u64,
    next: u64,
    kernel: bool,
    budget: u32,
    ended_by: [u32; 257],
    /// The FXSAVE image every seed starts from (x87 and SSE in their initial state).
    fx: Fx,
    regs: [u64; 15],
    frame: [u64; 5],
}

#[repr(C, align(16))]
struct Fx([u8; 512]);

struct Global(UnsafeCell<State>);
// SAFETY: one CPU; `trap` and `start_seed` run with interrupts off and never overlap.
unsafe impl Sync for Global {}
static STATE: Global = Global(UnsafeCell::new(State {
    first: 0,
    end: 0,
    next: 0,
    kernel: false,
    budget: 0,
    ended_by: [0; 257],
    fx: Fx([0; 512]),
    regs: [0; 15],
    frame: [0; 5],
}));

fn state() -> &'static mut State {
    // SAFETY: see `Global`: the harness is single-threaded and not reentrant.
    unsafe { &mut *STATE.0.get() }
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the LAPIC page is mapped (uncached) by the sandbox; MMIO, not Rust memory.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, v) }
}

extern "C" fn fuzz_main(cmdline: *const u8, _ram_size: u64) -> ! {
    console::set_name("fuzz64");
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at RDI.
    let cmdline = unsafe { console::c_str(cmdline, 4096) };
    let s = state();
    let count = args::number(cmdline, b"seeds", 250);
    s.first = args::number(cmdline, b"seed", 0) + args::number(cmdline, b"restart", 0) * count;
    s.end = s.first + count;
    s.next = s.first;
    s.kernel = args::number(cmdline, b"kernel", 0) != 0;
    s.budget = args::number(cmdline, b"budget", 5_000_000).min(u64::from(u32::MAX)) as u32;
    report!(
        "cmdline={} seeds {}..{} kernel={}",
        console::Printable(cmdline),
        s.first,
        s.end,
        s.kernel
    );
    sandbox::build();
    sse::enable();
    // SAFETY: FNINIT resets x87 state; FXSAVE64 writes the 512-byte aligned image.
    unsafe { asm!("fninit", "fxsave64 [{}]", in(reg) s.fx.0.as_mut_ptr(), options(nostack)) };
    // Software-enable the LAPIC (spurious vector 0xff), timer one-shot on WATCHDOG, divide by 1.
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_TIMER_DIVIDE, 0xb);
    lapic_write(LAPIC_LVT_TIMER, u32::from(WATCHDOG));
    start_seed()
}

/// Called by the trap stubs with the frame `[vector, error, rip, cs, rflags, rsp, ss]`.
#[no_mangle]
extern "C" fn fuzz_trap(frame: &[u64; 7]) -> ! {
    let s = state();
    let vector = frame[0] as usize;
    if vector == usize::from(WATCHDOG) {
        s.ended_by[256] += 1;
    } else {
        s.ended_by[vector.min(255)] += 1;
        lapic_write(LAPIC_TIMER_INITIAL, 0);
    }
    // End of interrupt for the watchdog, or for whatever else a seed made pending at the LAPIC.
    lapic_write(LAPIC_EOI, 0);
    start_seed()
}

/// Kernel-mode streams must not switch the watchdog off or end the guest on purpose.
fn filter_kernel_code(code: &mut [u8]) {
    const NOP: u8 = 0x90;
    for i in 0..code.len() {
        let next = code.get(i + 1).copied().unwrap_or(NOP);
        match (code[i], next) {
            // CLI, POPF, IRET.
            (0xfa | 0x9d | 0xcf, _) => code[i] = NOP,
            // MOV to CR0-CR15 (CR8 is the TPR).
            (0x0f, 0x22) => code[i] = NOP,
            // Group 7: LGDT/LIDT (memory forms, reg 2 and 3) and VMCALL (0f 01 c1).
            (0x0f, 0x01) => {
                let modrm = code.get(i + 2).copied().unwrap_or(0);
                let reg = (modrm >> 3) & 7;
                if modrm == 0xc1 || (modrm >> 6 != 3 && (reg == 2 || reg == 3)) {
                    code[i] = NOP;
                }
            }
            // OUT imm8 to the debug-exit ports.
            (0xe6 | 0xe7, 0xf4..=0xf7) => code[i] = NOP,
            _ => {}
        }
    }
}

/// A register value: a pointer into the user region, a small number, or anything.
fn register_value(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 | 1 => USER_BASE + rng.below(USER_SIZE),
        2 => rng.below(256),
        _ => rng.next_u64(),
    }
}

fn start_seed() -> ! {
    let s = state();
    if s.next >= s.end {
        finish(s)
    }
    let seed = s.next;
    s.next += 1;
    if seed != s.first && (seed - s.first).is_multiple_of(PROGRESS_EVERY) {
        summary(s, "progress");
    }
    let mut rng = Rng::new(seed);
    let modes = if s.kernel { 4 } else { 3 };
    let mode = match rng.below(modes) {
        0 => Mode::User64,
        1 => Mode::User32,
        2 => Mode::User16,
        _ => Mode::Kernel64,
    };
    report!("seed {} {}", seed, mode.name());
    // SAFETY: the user region is mapped and belongs to the seeds; no seed runs now.
    let user = unsafe { core::slice::from_raw_parts_mut(USER_BASE as *mut u8, USER_SIZE as usize) };
    let (code, rest) = user.split_at_mut(CODE_PAGE);
    rng.fill(code);
    if mode == Mode::Kernel64 {
        filter_kernel_code(code);
    }
    rest.fill(0);
    for r in s.regs.iter_mut() {
        *r = register_value(&mut rng);
    }
    // DX must not name a debug-exit port for an OUT DX in kernel mode (user mode is denied them).
    if (0xf4..=0xf7).contains(&(s.regs[3] & 0xffff)) {
        s.regs[3] ^= 0x100;
    }
    let (cs, ss, rsp, rip) = mode.entry();
    // IRETQ pops RIP, CS, RFLAGS (IF set, IOPL 0), RSP, SS.
    s.frame = [rip, u64::from(cs), 0x202, rsp, u64::from(ss)];
    lapic_write(LAPIC_TIMER_INITIAL, s.budget);
    // SAFETY: the FX image is valid (FXSAVE at start-up); the frame and registers are complete;
    // IRETQ leaves the harness for good (every way back is through the IDT, on the IST stack).
    unsafe {
        asm!(
            "fxrstor64 [{fx}]",
            "mov ds, {sel:x}",
            "mov es, {sel:x}",
            "mov fs, {null:x}",
            "mov gs, {null:x}",
            "mov rsp, rcx",
            "mov rbx, [rax + 8]",
            "mov rcx, [rax + 16]",
            "mov rdx, [rax + 24]",
            "mov rsi, [rax + 32]",
            "mov rdi, [rax + 40]",
            "mov rbp, [rax + 48]",
            "mov r8, [rax + 56]",
            "mov r9, [rax + 64]",
            "mov r10, [rax + 72]",
            "mov r11, [rax + 80]",
            "mov r12, [rax + 88]",
            "mov r13, [rax + 96]",
            "mov r14, [rax + 104]",
            "mov r15, [rax + 112]",
            "mov rax, [rax]",
            "iretq",
            fx = in(reg) s.fx.0.as_ptr(),
            sel = in(reg) u64::from(ss),
            null = in(reg) 0u64,
            in("rax") s.regs.as_ptr(),
            in("rcx") s.frame.as_ptr(),
            options(noreturn)
        );
    }
}

/// Names of the vectors counted in the summary.
const OUTCOMES: [(usize, &str); 12] = [
    (0, "de"),
    (1, "db"),
    (3, "bp"),
    (5, "br"),
    (6, "ud"),
    (7, "nm"),
    (12, "ss"),
    (13, "gp"),
    (14, "pf"),
    (16, "mf"),
    (17, "ac"),
    (19, "xm"),
];

/// `<what> seeds=<n> first=<n> <outcome>=<count>... watchdog=<n> other=<n>`: how the seeds so far
/// ended.
fn summary(s: &State, what: &str) {
    let named: u32 = OUTCOMES.iter().map(|&(v, _)| s.ended_by[v]).sum();
    let all: u32 = s.ended_by.iter().sum();
    let mut text = [0u8; 160];
    let mut w = hostile64::text::Cursor::new(&mut text);
    for &(v, name) in OUTCOMES.iter() {
        if s.ended_by[v] != 0 {
            let _ = core::fmt::write(&mut w, format_args!(" {}={}", name, s.ended_by[v]));
        }
    }
    report!(
        "{} seeds={} first={}{} watchdog={} other={}",
        what,
        all,
        s.first,
        w.as_str(),
        s.ended_by[256],
        all - named - s.ended_by[256]
    );
}

fn finish(s: &State) -> ! {
    summary(s, "done");
    cpu::exit(EXIT_OK)
}
