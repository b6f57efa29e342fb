//! long64: an ELF64 guest entered in long mode by Keel's ELF loader (RDI = command line, RSI =
//! RAM size, identity page tables). The command line picks a behaviour with `mode=NAME`:
//!
//! | mode       | does                                                     | exit code |
//! |------------|----------------------------------------------------------|-----------|
//! | `good`     | the standard checks (default)                            | 0x13      |
//! | `vmxon`    | VMXON with CR4.VMXE clear: expects #UD                   | 0x20      |
//! | `wild`     | writes guest-physical 0x40000000, outside its RAM        | (stopped) |
//! | `triple`   | zero-limit IDT, INT3: a triple fault                     | (stopped) |
//! | `cr4vmxe`  | sets CR4.VMXE: expects #GP                               | 0x21      |
//! | `spin`     | interrupts off, prints `spin <n>` every 2^20 iterations  | never     |
//! | `ticks`    | counts PIT (100 Hz) and LAPIC timer (1 kHz) interrupts for `cycles=N` TSC cycles (default 10 000 000) | 0x22 |
//! | `crunch`   | CPU-bound for `secs=N` of its own seconds (`timeshare`)  | 0x23      |
//! | `sleeper`  | halts between PIT ticks for `secs=N` (`timeshare`)       | 0x24      |
//! | `clispin`  | spins `cycles=N` TSC cycles with interrupts off          | 0x25      |
//! | `timekeeper` | halts `every=N` s on a LAPIC one-shot, then PRINT_STATS, until `secs=N` | 0x26 |
//! | `balloon`  | gives RAM back to Keel and takes it again as Keel's balloon target says, checking the rest, for `secs=N` (`balloon`) | 0x28 |
//! | `balloon-touch` | checks the balloon calls' errors, then reads a page it gave back (`balloon`) | (stopped) |
//! | `flood`    | floods its console (CONSOLE_WRITE, UART, PRINT_STATS; `stats=only`: PRINT_STATS alone) for `secs=N` (`flood`) | 0x27 |
//!
//! Any failure (unexpected exception, expected fault missing) exits with 0x3f.
#![no_std]
#![no_main]

mod balloon;
mod flood;
mod timeshare;

use core::arch::{asm, global_asm};
use core::sync::atomic::Ordering;
use guest_common::console::Printable;
use guest_common::trap::{self, LAPIC_TICKS, LAPIC_TIMER_VECTOR, PIT_TICKS};
use guest_common::{checks, cpu, lapic, pic, pit, say, EXIT_FAILURE};

const EXIT_DONE: u8 = 0x13;
const EXIT_VMXON_UD: u8 = 0x20;
const EXIT_CR4_VMXE_GP: u8 = 0x21;
const EXIT_TICKS: u8 = 0x22;
const INVALID_OPCODE: u8 = 6;
const GENERAL_PROTECTION: u8 = 13;
/// Far outside any guest's RAM, inside the loader's identity map.
const WILD_ADDRESS: u64 = 0x4000_0000;
/// CR4 bit 13 (SDM Vol. 3A 2.5).
const CR4_VMXE: u64 = 1 << 13;
/// `ticks` mode: how long to count, in TSC cycles of the guest's own time, unless `cycles=N`.
const TICKS_WINDOW: u64 = 10_000_000;
const LAPIC_HZ: u32 = 1000;

global_asm!(
    r#"
    .pushsection .bss.stack, "aw", @nobits
    .balign 16
long64_stack:
    .skip 0x10000
long64_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    lea rsp, [rip + long64_stack_top]
    call {main}
    ud2
    .popsection
"#,
    main = sym long64_main,
);

extern "C" fn long64_main(cmdline: *const u8, ram_size: u64) -> ! {
    checks::init("long64");
    say!("hello from long mode");
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at RDI.
    let cmdline = unsafe { checks::elf_entry_line(cmdline, ram_size) };
    match mode(cmdline) {
        b"good" => {
            checks::standard();
            checks::done(EXIT_DONE)
        }
        b"vmxon" => vmxon(),
        b"wild" => wild(),
        b"triple" => {
            say!("triple");
            trap::triple_fault()
        }
        b"cr4vmxe" => cr4_vmxe(),
        b"spin" => spin(),
        b"ticks" => ticks(param(cmdline, b"cycles").unwrap_or(TICKS_WINDOW)),
        b"crunch" => timeshare::crunch(&plan(cmdline)),
        b"sleeper" => timeshare::sleeper(&plan(cmdline)),
        b"clispin" => timeshare::clispin(required(cmdline, b"cycles")),
        b"timekeeper" => timeshare::timekeeper(&plan(cmdline)),
        b"flood" => flood::flood(cmdline),
        b"balloon" => balloon::run(ram_size, required(cmdline, b"secs")),
        b"balloon-touch" => balloon::touch(ram_size),
        other => {
            say!("unknown mode {}", Printable(other));
            cpu::exit(EXIT_FAILURE)
        }
    }
}

/// The value of the first `mode=` word, or `good`.
fn mode(cmdline: &[u8]) -> &[u8] {
    value(cmdline, b"mode").unwrap_or(b"good")
}

/// The text after `key=` in the first word that starts so.
fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline.split(|&b| b == b' ').find_map(|word| {
        word.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(b"="))
    })
}

/// The decimal number given as `key=N`; a malformed one ends the guest with [`EXIT_FAILURE`].
fn param(cmdline: &[u8], key: &[u8]) -> Option<u64> {
    let text = value(cmdline, key)?;
    let parsed = (!text.is_empty() && text.len() <= 19 && text.iter().all(u8::is_ascii_digit))
        .then(|| text.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')));
    match parsed {
        Some(n) => Some(n),
        None => {
            say!("bad {}={}", Printable(key), Printable(text));
            cpu::exit(EXIT_FAILURE)
        }
    }
}

/// `key=N`, which the mode cannot do without.
fn required(cmdline: &[u8], key: &[u8]) -> u64 {
    param(cmdline, key).unwrap_or_else(|| {
        say!("missing {}=N", Printable(key));
        cpu::exit(EXIT_FAILURE)
    })
}

/// `secs=N` (required) and `every=N` (default 1) for the time-sharing modes.
fn plan(cmdline: &[u8]) -> timeshare::Plan {
    timeshare::Plan {
        secs: required(cmdline, b"secs").max(1),
        every: param(cmdline, b"every").unwrap_or(1).max(1),
    }
}

/// VMXON while CR4.VMXE is clear raises #UD (SDM Vol. 3C 31.3, VMXON "Operation"); a
/// hypervisor must not let the guest reach VMX operation.
fn vmxon() -> ! {
    static REGION_ADDRESS: u64 = 0;
    trap::expect_fault(INVALID_OPCODE, "vmxon -> #UD", EXIT_VMXON_UD);
    // SAFETY: expected to fault; the handler exits the guest.
    unsafe { asm!("vmxon [{}]", in(reg) &REGION_ADDRESS) };
    say!("vmxon did not fault");
    cpu::exit(EXIT_FAILURE)
}

/// Setting CR4.VMXE where VMX is not offered is a #GP (SDM Vol. 3A 2.5 and MOV to CR4).
fn cr4_vmxe() -> ! {
    trap::expect_fault(GENERAL_PROTECTION, "cr4.vmxe -> #GP", EXIT_CR4_VMXE_GP);
    // SAFETY: expected to fault; the handler exits the guest.
    unsafe {
        asm!("mov {t}, cr4", "or {t}, {bit}", "mov cr4, {t}", t = out(reg) _, bit = in(reg) CR4_VMXE)
    };
    say!("cr4.vmxe set without #GP");
    cpu::exit(EXIT_FAILURE)
}

fn wild() -> ! {
    say!("wild write");
    // SAFETY: deliberately writes memory the guest does not own: the identity map covers it, and
    // the hypervisor is expected to stop the guest. No Rust object lives there.
    unsafe { core::ptr::write_volatile(WILD_ADDRESS as *mut u64, 0x574c_4457) };
    say!("wild write was not stopped");
    cpu::exit(EXIT_FAILURE)
}

fn spin() -> ! {
    cpu::disable_interrupts();
    let mut i: u64 = 0;
    loop {
        i = core::hint::black_box(i + 1);
        if i & ((1 << 20) - 1) == 0 {
            say!("spin {}", i >> 20);
        }
    }
}

/// PIT at 100 Hz and the LAPIC timer at 1 kHz (its rate measured on PIT channel 2), counted for
/// `window` TSC cycles.
fn ticks(window: u64) -> ! {
    pic::init();
    pit::start_periodic(checks::PIT_HZ);
    pic::enable_only(1);
    lapic::enable();
    lapic::start_free_running();
    // The LAPIC timer counts down: its complement counts up.
    let per_second = pit::measure_rate(|| u64::from(!lapic::current_count()));
    let count = (per_second / u64::from(LAPIC_HZ)).clamp(1, u64::from(u32::MAX)) as u32;
    say!("lapic timer {} Hz", per_second);
    lapic::start_periodic(LAPIC_TIMER_VECTOR, count);
    PIT_TICKS.store(0, Ordering::SeqCst);
    LAPIC_TICKS.store(0, Ordering::SeqCst);
    let t0 = cpu::rdtsc();
    cpu::enable_interrupts();
    while cpu::rdtsc().wrapping_sub(t0) < window {
        core::hint::spin_loop();
    }
    cpu::disable_interrupts();
    let tsc = cpu::rdtsc().wrapping_sub(t0);
    let (pit_ticks, lapic_ticks) = (
        PIT_TICKS.load(Ordering::SeqCst),
        LAPIC_TICKS.load(Ordering::SeqCst),
    );
    lapic::stop();
    pic::mask_all();
    say!("ticks pit={} lapic={} tsc={}", pit_ticks, lapic_ticks, tsc);
    cpu::exit(EXIT_TICKS)
}
