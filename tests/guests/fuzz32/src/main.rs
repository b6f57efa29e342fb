//! fuzz32: executes random byte streams in the modes below long mode, one stream per seed, and
//! survives what they do: 32-bit protected-mode user code (CPL 3), virtual-8086 mode (real-mode
//! code at CPL 3), real mode itself, and with `kernel=1` 32-bit protected-mode kernel code.
//!
//! An ELF32 guest: Keel enters it in protected mode with paging off. It builds its own machine
//! (`sandbox`: paging, GDT, TSS, IDT) and the way to real mode and back (`real`), then runs seeds
//! as fuzz64 does (same command line: `seed=`, `seeds=`, `kernel=1`, `budget=`, ` restart=<k>`):
//! a 4 KiB page of random bytes at 0x10000 (the user region, and segment 0x1000 for V86 and real
//! mode), random registers, the local APIC timer as watchdog, then IRETD (or the way down to real
//! mode). Every exception or interrupt (in real mode, every vector of its interrupt table) comes
//! back to `fuzz32_trap`, which counts it and starts the next seed. It prints `fuzz32: seed <n>
//! <mode>` before each seed, `progress` lines every 50 and `fuzz32: done ...` at the end, then
//! exits with 0x30. Real-mode and kernel streams are filtered (`hostile64::fuzz`).
#![no_std]
#![no_main]

mod real;
mod sandbox;

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use hostile64::fuzz::{self, Run, WATCHDOG};
use hostile64::report;
use sandbox::{KERNEL_CODE, KERNEL_DATA, LAPIC, USER_BASE, USER_CODE, USER_DATA, USER_SIZE};

const LAPIC_EOI: u32 = 0xb0;
const LAPIC_SVR: u32 = 0xf0;
const LAPIC_LVT_TIMER: u32 = 0x320;
const LAPIC_TIMER_INITIAL: u32 = 0x380;
const LAPIC_TIMER_DIVIDE: u32 = 0x3e0;
const CODE_PAGE: usize = 4096;
const EFLAGS_IF: u32 = 1 << 9;
const EFLAGS_VM: u32 = 1 << 17;

global_asm!(
    r#"
    .pushsection .bss.stack, "aw", @nobits
    .balign 16
fuzz32_stack:
    .skip 0x10000
fuzz32_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    mov esp, offset fuzz32_stack_top
    push esi
    push edi
    call {main}
    ud2
    .popsection
"#,
    main = sym fuzz32_main,
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    User32,
    V86,
    Real,
    Kernel32,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::User32 => "user32",
            Mode::V86 => "v86",
            Mode::Real => "real",
            Mode::Kernel32 => "kernel32",
        }
    }
}

struct State {
    run: Run,
    mode: Mode,
    regs: [u32; 7],
    /// IRETD frame for protected-mode and V86 seeds.
    frame: [u32; 9],
}

struct Global(UnsafeCell<State>);
// SAFETY: one CPU; the harness runs with interrupts off and never overlaps itself.
unsafe impl Sync for Global {}
static STATE: Global = Global(UnsafeCell::new(State {
    run: Run::new(),
    mode: Mode::User32,
    regs: [0; 7],
    frame: [0; 9],
}));

fn state() -> &'static mut State {
    // SAFETY: see `Global`.
    unsafe { &mut *STATE.0.get() }
}

/// A LAPIC register write as `mov [reg], reg`: Keel's MMIO decoder took no `mov moffs32, eax`
/// (A3), the form the compiler picks for a constant address, before af8f309 (docs/SECURITY.md).
fn lapic_write(reg: u32, v: u32) {
    // SAFETY: the LAPIC page is mapped (uncached) by the sandbox, and identity with paging off;
    // MMIO, not Rust memory.
    unsafe {
        asm!("mov dword ptr [{at}], {v}", at = in(reg) LAPIC + reg, v = in(reg) v,
             options(nostack, preserves_flags))
    }
}

extern "C" fn fuzz32_main(cmdline: *const u8, _ram_size: usize) -> ! {
    let s = state();
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at EDI.
    unsafe { s.run.start("fuzz32", cmdline) };
    sandbox::build();
    real::install();
    sandbox::paging_on();
    // Software-enable the LAPIC (spurious vector 0xff), timer one-shot on WATCHDOG, divide by 1.
    lapic_write(LAPIC_SVR, 0x1ff);
    lapic_write(LAPIC_TIMER_DIVIDE, 0xb);
    lapic_write(LAPIC_LVT_TIMER, u32::from(WATCHDOG));
    start_seed()
}

/// Every way out of a seed ends here, on the handlers' stack with the kernel segments loaded.
#[no_mangle]
pub extern "C" fn fuzz32_trap(vector: u32) -> ! {
    let s = state();
    if s.mode == Mode::Real {
        sandbox::paging_on();
    }
    let vector = vector as u8;
    s.run.ended(vector);
    if vector != WATCHDOG {
        lapic_write(LAPIC_TIMER_INITIAL, 0);
    }
    lapic_write(LAPIC_EOI, 0);
    start_seed()
}

fn start_seed() -> ! {
    let s = state();
    let (seed, mut rng) = s.run.next_seed();
    s.mode = match s.run.mode_index(&mut rng, 3) {
        0 => Mode::User32,
        1 => Mode::V86,
        2 => Mode::Real,
        _ => Mode::Kernel32,
    };
    report!("seed {} {}", seed, s.mode.name());
    // SAFETY: the user region is mapped and belongs to the seeds; no seed runs now.
    let user = unsafe { core::slice::from_raw_parts_mut(USER_BASE as *mut u8, USER_SIZE as usize) };
    let (code, rest) = user.split_at_mut(CODE_PAGE);
    rng.fill(code);
    match s.mode {
        Mode::Kernel32 => fuzz::filter_kernel(code),
        Mode::Real => fuzz::filter_real(code),
        Mode::User32 | Mode::V86 => {}
    }
    rest.fill(0);
    // Pointers are linear in protected mode, offsets in segment 0x1000 in V86 and real mode.
    let base = match s.mode {
        Mode::User32 | Mode::Kernel32 => u64::from(USER_BASE),
        Mode::V86 | Mode::Real => 0,
    };
    for r in s.regs.iter_mut() {
        *r = fuzz::register_value(&mut rng, base, u64::from(USER_SIZE)) as u32;
    }
    // EDX must not name a debug-exit port for an OUT DX (user and V86 code are denied them).
    if (0xf4..=0xf7).contains(&(s.regs[3] & 0xffff)) {
        s.regs[3] ^= 0x100;
    }
    lapic_write(LAPIC_TIMER_INITIAL, s.run.plan.budget);
    let top = USER_BASE + USER_SIZE - 16;
    let seg = u32::from(real::SEED_SEGMENT);
    let (frame, data): (*const u32, u16) = match s.mode {
        Mode::Real => real::enter(&s.regs),
        Mode::User32 => {
            s.frame[..5].copy_from_slice(&[
                USER_BASE,
                u32::from(USER_CODE),
                EFLAGS_IF | 2,
                top,
                u32::from(USER_DATA),
            ]);
            (s.frame.as_ptr(), USER_DATA)
        }
        Mode::V86 => {
            // EIP, CS, EFLAGS (VM, IF), ESP, SS, ES, DS, FS, GS (SDM Vol. 3A 20.2.5).
            s.frame = [
                0,
                seg,
                EFLAGS_VM | EFLAGS_IF | 2,
                0xfff0,
                seg,
                seg,
                seg,
                seg,
                seg,
            ];
            (s.frame.as_ptr(), KERNEL_DATA)
        }
        Mode::Kernel32 => {
            // Same privilege: IRETD pops EIP, CS, EFLAGS only; the frame sits on the seed's stack.
            let at = top as *mut [u32; 3];
            // SAFETY: the top of the user region, which the seed is about to use as its stack.
            unsafe { at.write([USER_BASE, u32::from(KERNEL_CODE), EFLAGS_IF | 2]) };
            (at as *const u32, KERNEL_DATA)
        }
    };
    // SAFETY: the frame is complete for the mode; IRETD leaves the harness for good (every way
    // back is through the IDT onto the handlers' stack).
    unsafe {
        asm!(
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov fs, {null:x}",
            "mov gs, {null:x}",
            "mov esp, ecx",
            "mov ebx, [eax + 4]",
            "mov ecx, [eax + 8]",
            "mov edx, [eax + 12]",
            "mov esi, [eax + 16]",
            "mov edi, [eax + 20]",
            "mov ebp, [eax + 24]",
            "mov eax, [eax]",
            "iretd",
            data = in(reg) u32::from(data),
            null = in(reg) 0u32,
            in("eax") s.regs.as_ptr(),
            in("ecx") frame,
            options(noreturn)
        );
    }
}
