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
//! watchdog, an interrupt — arrives in `fuzz_trap` on the handlers' own stack, which starts the next
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
use hostile64::fuzz::{self, Run, WATCHDOG};
use hostile64::{report, sse};
use sandbox::{
    KERNEL_CODE, KERNEL_DATA, LAPIC, USER_BASE, USER_CODE16, USER_CODE32, USER_CODE64, USER_DATA,
    USER_DATA16, USER_SIZE,
};

hostile64::entry!(fuzz_main);

const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const CODE_PAGE: usize = 4096;

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

struct State {
    run: Run,
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
    run: Run::new(),
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
    let s = state();
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at RDI.
    unsafe { s.run.start("fuzz64", cmdline) };
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
    let vector = frame[0] as u8;
    s.run.ended(vector);
    if vector != WATCHDOG {
        lapic_write(LAPIC_TIMER_INITIAL, 0);
    }
    // End of interrupt for the watchdog, or for whatever else a seed made pending at the LAPIC.
    lapic_write(LAPIC_EOI, 0);
    start_seed()
}

fn start_seed() -> ! {
    let s = state();
    let (seed, mut rng) = s.run.next_seed();
    let mode = match s.run.mode_index(&mut rng, 3) {
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
        fuzz::filter_kernel(code);
    }
    rest.fill(0);
    for r in s.regs.iter_mut() {
        *r = fuzz::register_value(&mut rng, USER_BASE, USER_SIZE);
    }
    // DX must not name a debug-exit port for an OUT DX in kernel mode (user mode is denied them).
    if (0xf4..=0xf7).contains(&(s.regs[3] & 0xffff)) {
        s.regs[3] ^= 0x100;
    }
    let (cs, ss, rsp, rip) = mode.entry();
    // IRETQ pops RIP, CS, RFLAGS (IF set, IOPL 0), RSP, SS.
    s.frame = [rip, u64::from(cs), 0x202, rsp, u64::from(ss)];
    lapic_write(LAPIC_TIMER_INITIAL, s.run.plan.budget);
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
