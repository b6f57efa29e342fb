//! `attack=hypercalls calls=<n> seed=<s>`: a flood of VMCALLs with random numbers and arguments.
//! Every register but RAX must come back unchanged, and every result must be the documented one
//! (docs/HYPERCALLS.md): ENOSYS for unknown numbers, EFAULT for CONSOLE_WRITE buffers outside
//! RAM (past its end, straddling it, wrapping around 2^64), EINVAL for lengths over 4096, the
//! caller's id for GUEST_ID, a clock that never goes back for CPU_TIME, 0 for YIELD. SHUTDOWN (4)
//! would end the guest and PRINT_STATS (5) prints Keel's table: the flood never calls those two.
//!
//! Prints `hostile64: hypercalls calls=<n> enosys=<a> efault=<b> einval=<c> other=<d> bad=<e>`,
//! then `hostile64: hypercalls results=<n>/<n> ok`.

use super::Tally;
use guest_common::say;
use hostile64::args;
use hostile64::rng::Rng;

const CONSOLE_WRITE: u64 = 1;
const YIELD: u64 = 2;
const GUEST_ID: u64 = 3;
const SHUTDOWN: u64 = 4;
const PRINT_STATS: u64 = 5;
const CPU_TIME: u64 = 6;
const ENOSYS: u64 = -38i64 as u64;
const EFAULT: u64 = -14i64 as u64;
const EINVAL: u64 = -22i64 as u64;
const CONSOLE_WRITE_MAX: u64 = 4096;

/// VMCALL with every general-purpose register but RSP set from `regs` (RAX = the number, RBX,
/// RCX, RDX, RSI = the arguments, the rest random). Returns RAX and whether all others came back
/// unchanged.
fn vmcall(regs: &[u64; 14]) -> (u64, bool) {
    let mut r = *regs;
    let rax: u64;
    // SAFETY: VMCALL transfers control to Keel, which changes only RAX; RBX cannot be an operand,
    // so it is swapped in and out; every other register is an inout.
    unsafe {
        core::arch::asm!(
            "xchg {b}, rbx",
            "vmcall",
            "xchg {b}, rbx",
            b = inout(reg) r[1],
            inout("rax") r[0] => rax,
            inout("rcx") r[2], inout("rdx") r[3], inout("rsi") r[4], inout("rdi") r[5],
            inout("r8") r[6], inout("r9") r[7], inout("r10") r[8], inout("r11") r[9],
            inout("r12") r[10], inout("r13") r[11], inout("r14") r[12], inout("r15") r[13],
        );
    }
    (rax, r[1..] == regs[1..])
}

/// A call and the result it must get (`None`: any value, judged by the caller).
struct Call {
    regs: [u64; 14],
    expect: Option<u64>,
}

fn random_call(rng: &mut Rng, ram: u64, id: u64) -> Call {
    let mut regs = [0u64; 14];
    regs.iter_mut().for_each(|r| *r = rng.next_u64());
    let expect = match rng.below(9) {
        // An arbitrary 64-bit number (the defined ones are 1..=6).
        0 => {
            if (1..=CPU_TIME).contains(&regs[0]) {
                regs[0] += 100;
            }
            Some(ENOSYS)
        }
        // A small undefined one, or a defined one with garbage in the upper half.
        1 => {
            regs[0] = match rng.below(3) {
                0 => 0,
                1 => CPU_TIME + 1 + rng.below(1000),
                _ => (rng.below(6) + 1) | (1 + rng.below(0xffff)) << 32,
            };
            Some(ENOSYS)
        }
        // CONSOLE_WRITE from past the end of RAM (anywhere up to 2^64).
        2 => {
            regs[0] = CONSOLE_WRITE;
            regs[1] = ram + rng.below(u64::MAX - ram);
            regs[2] = 1 + rng.below(CONSOLE_WRITE_MAX);
            Some(EFAULT)
        }
        // CONSOLE_WRITE straddling the end of RAM.
        3 => {
            regs[0] = CONSOLE_WRITE;
            regs[1] = ram - 1 - rng.below(100);
            regs[2] = 200 + rng.below(CONSOLE_WRITE_MAX - 200);
            Some(EFAULT)
        }
        // CONSOLE_WRITE wrapping around the top of the address space.
        4 => {
            regs[0] = CONSOLE_WRITE;
            regs[1] = u64::MAX - rng.below(CONSOLE_WRITE_MAX);
            regs[2] = CONSOLE_WRITE_MAX;
            Some(EFAULT)
        }
        // CONSOLE_WRITE longer than allowed, from anywhere.
        5 => {
            regs[0] = CONSOLE_WRITE;
            regs[2] = CONSOLE_WRITE_MAX + 1 + rng.below(u64::MAX - CONSOLE_WRITE_MAX - 1);
            Some(EINVAL)
        }
        6 => {
            regs[0] = GUEST_ID;
            Some(id)
        }
        7 => {
            regs[0] = YIELD;
            Some(0)
        }
        _ => {
            regs[0] = CPU_TIME;
            None
        }
    };
    debug_assert!(regs[0] != SHUTDOWN && regs[0] != PRINT_STATS);
    Call { regs, expect }
}

pub fn run(cmdline: &[u8], ram: u64) -> ! {
    let calls = args::number(cmdline, b"calls", 3000);
    let mut rng = Rng::new(args::number(cmdline, b"seed", 1));
    let mut t = Tally::new("hypercalls", "results");
    let mut id_regs = [0u64; 14];
    id_regs[0] = GUEST_ID;
    let (id, _) = vmcall(&id_regs);
    let (mut enosys, mut efault, mut einval, mut other, mut bad) = (0u32, 0u32, 0u32, 0u32, 0u32);
    let mut last_time = 0u64;
    for i in 0..calls {
        let call = random_call(&mut rng, ram, id);
        let (rax, preserved) = vmcall(&call.regs);
        let ok = preserved
            && match call.expect {
                Some(want) => rax == want,
                None => {
                    // CPU_TIME: never backwards.
                    let ok = rax >= last_time;
                    last_time = rax;
                    ok
                }
            };
        match rax {
            ENOSYS => enosys += 1,
            EFAULT => efault += 1,
            EINVAL => einval += 1,
            _ => other += 1,
        }
        if !ok {
            bad += 1;
            if bad <= 5 {
                say!(
                    "hypercalls: call {} rax={:#x} rbx={:#x} rcx={:#x} -> {:#x} (registers kept: {})",
                    i,
                    call.regs[0],
                    call.regs[1],
                    call.regs[2],
                    rax,
                    preserved
                );
            }
        }
    }
    say!(
        "hypercalls calls={} enosys={} efault={} einval={} other={} bad={}",
        calls,
        enosys,
        efault,
        einval,
        other,
        bad
    );
    t.add_counted(calls as u32, calls as u32 - bad);
    t.finish()
}
