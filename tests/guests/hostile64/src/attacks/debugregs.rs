//! `attack=debugregs`: the debug registers (SDM Vol. 3B 17.2) belong to the guest that wrote them.
//!
//! 1. At its start the guest finds the power-on values (SDM Vol. 3A, "IA-32 and Intel 64
//!    Processor States Following Power-up, Reset, or INIT"): DR0-DR3 = 0, DR6 = FFFF0FF0H,
//!    DR7 = 400H, not what another guest left there: `debugregs reset=6/6 ok`.
//! 2. `rounds=<n> seed=<s>`: each round writes a pattern of its own into DR0-DR3, the writable
//!    bits of DR6 and DR7 (no breakpoint enabled), yields, and counts the rounds after which all
//!    six read back unchanged: `debugregs kept=<n>/<n> ok`. hostile.toml runs it as two guests
//!    with different seeds (`dr-a`, `dr-b`), which read each other's values when Keel did not switch
//!    them, and DR7 came back as 400H after every exit when the VMCS did not carry it.
//!    `settle=<n>`: yield n times first, so the other guests have written theirs. `die=1`: after
//!    the rounds, set all six once more and die (a read past the end of RAM); restarted by Keel
//!    (`restart=1` on the command line), the guest must find the power-on values again.
//! 3. `traps=1`: breakpoints keep working across VM exits, and fire for I/O that Keel emulates
//!    (`debugregs traps=8/8 ok`), each #DB seen by a handler of the guest's own that records the
//!    RIP it returns to and DR6:
//!    - a data-write breakpoint (DR7 L0, R/W0 = 01, LEN0 = 8 bytes) armed before a CPUID (an exit):
//!      the write after it traps, DR6.B0, RIP after the write (SDM 17.3.1.2);
//!    - DR7.GD set before a CPUID: the next MOV from DR0 faults, DR6.BD, RIP on the MOV, and GD
//!      is clear afterwards (17.3.1.3);
//!    - with CR4.DE = 1, an I/O breakpoint on port 80H (R/W0 = 10, LEN0 = 1): OUT 80H traps with
//!      DR6.B0 and RIP after the OUT (17.2.4, 17.3.1.2);
//!    - an I/O breakpoint on 70H with LEN1 = 2 bytes: IN from 71H traps with DR6.B1 (17.2.5);
//!    - the same breakpoints and OUT 84H: no #DB;
//!    - a data-write breakpoint on a byte that INSB (emulated by Keel) stores: #DB with DR6.B0,
//!      RIP after the INSB;
//!    - RFLAGS.TF set over a CPUID (emulated by Keel): the first #DB comes after the CPUID with
//!      DR6.BS (17.3.1.4).
//!
//! Exits with 0x30 when every count is complete.

use super::{Tally, HC_YIELD};
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::{cpu, say, EXIT_FAILURE};
use hostile64::args;
use hostile64::catch::{self, InterruptFrame};

/// DR6 and DR7 at power-on.
const DR6_INIT: u64 = 0xffff_0ff0;
const DR7_INIT: u64 = 0x400;
/// The DR6 bits software can change: B0-B3, BD, BS, BT (SDM 17.2.3).
const DR6_WRITABLE: u64 = 0xe00f;
const DR6_B0: u64 = 1 << 0;
const DR6_B1: u64 = 1 << 1;
const DR6_BD: u64 = 1 << 13;
const DR6_BS: u64 = 1 << 14;
const DR7_GD: u64 = 1 << 13;
const CR4_DE: u64 = 1 << 3;
const DB: u8 = 1;
/// No device claims it (docs/HYPERCALLS.md): reads FFH.
const UNCLAIMED_PORT: u16 = 0x1234;

macro_rules! dr_access {
    ($($n:literal),*) => {
        fn read_dr(n: u8) -> u64 {
            let v: u64;
            match n {
                // SAFETY: reading a debug register at CPL 0 has no side effect (DR7.GD is clear
                // whenever this is called).
                $($n => unsafe { asm!(concat!("mov {}, dr", $n), out(reg) v, options(nomem, nostack)) },)*
                _ => unreachable!(),
            }
            v
        }

        fn write_dr(n: u8, v: u64) {
            match n {
                // SAFETY: the values written enable breakpoints only on this guest's own variable and
                // ports, and only in the cases below that expect their #DB.
                $($n => unsafe { asm!(concat!("mov dr", $n, ", {}"), in(reg) v, options(nostack)) },)*
                _ => unreachable!(),
            }
        }
    };
}
dr_access!(0, 1, 2, 3, 6, 7);

/// What this guest keeps in the debug registers in `round`: DR0-DR3, DR6, DR7.
fn pattern(seed: u64, round: u64) -> [u64; 6] {
    let tag = 0x0000_4000_0000_0000 | (seed & 0xff) << 32 | (round & 0xffff) << 8;
    let dr6 = DR6_INIT | ((seed + round) & 0xf) | (seed & 7) << 13;
    // R/Wn is 01 or 11 (data breakpoints; 10 needs CR4.DE), LENn anything, no Ln/Gn set.
    let mix = (seed.wrapping_mul(0x9e37) ^ round.wrapping_mul(0x79b9)) & 0xffff;
    let dr7 = DR7_INIT | (seed & 1) << 8 | (mix | 0x1111) << 16;
    [tag, tag | 1, tag | 2, tag | 3, dr6, dr7]
}

const REGS: [u8; 6] = [0, 1, 2, 3, 6, 7];

fn read_all() -> [u64; 6] {
    REGS.map(read_dr)
}

/// DR6 as read keeps only the writable bits of what was written.
fn visible(n: u8, v: u64) -> u64 {
    if n == 6 {
        v & DR6_WRITABLE
    } else {
        v
    }
}

pub fn run(cmdline: &[u8], ram: u64) -> ! {
    // Let the other guests run first, so that their values would be in the registers by now.
    for _ in 0..args::number(cmdline, b"settle", 0) {
        let _ = cpu::vmcall(HC_YIELD, 0, 0);
    }
    let mut reset = Tally::new("debugregs", "reset");
    let now = read_all();
    let init = [0, 0, 0, 0, DR6_INIT, DR7_INIT];
    for ((n, got), want) in REGS.iter().zip(now).zip(init) {
        reset.require(format_args!("DR{n} at start ({got:#x})"), got == want);
    }
    let ok = reset.report();

    let seed = args::number(cmdline, b"seed", 1);
    let rounds = args::number(cmdline, b"rounds", 40);
    let mut kept = Tally::new("debugregs", "kept");
    for round in 0..rounds {
        let want = pattern(seed, round);
        for (&n, &v) in REGS.iter().zip(want.iter()) {
            write_dr(n, v);
        }
        let _ = cpu::vmcall(HC_YIELD, 0, 0);
        let got = read_all();
        let changed = REGS
            .iter()
            .zip(got.iter().zip(want.iter()))
            .find(|(&n, (&g, &w))| visible(n, g) != visible(n, w));
        match changed {
            Some((n, (g, w))) => kept.require(
                format_args!("round {round}: DR{n} {g:#x} (wrote {w:#x})"),
                false,
            ),
            None => kept.require(format_args!("round {round}"), true),
        }
    }
    write_dr(7, DR7_INIT);
    let ok = kept.report() && ok;
    if args::number(cmdline, b"die", 0) != 0 && args::number(cmdline, b"restart", 0) == 0 {
        // Die with values of its own in every debug register: Keel restarts the guest (manifest
        // `restart`), whose first life must not show through.
        for (&n, &v) in REGS.iter().zip(pattern(seed, rounds).iter()) {
            write_dr(n, v);
        }
        say!("debugregs dies with DR0-DR3, DR6, DR7 set");
        // SAFETY: reads the first byte past the guest's RAM: Keel stops the guest (EPT violation).
        unsafe { core::ptr::read_volatile(ram as *const u8) };
        cpu::exit(EXIT_FAILURE)
    }

    let mut traps = Tally::new("debugregs", "traps");
    if args::number(cmdline, b"traps", 0) != 0 {
        breakpoints(&mut traps);
    }
    if traps.all_good() && ok {
        traps.finish()
    } else {
        traps.report();
        cpu::exit(EXIT_FAILURE)
    }
}

/// What the guest's #DB handler saw: how many, the RIP it returned to, DR6.
static DB_COUNT: AtomicU64 = AtomicU64::new(0);
static DB_RIP: AtomicU64 = AtomicU64::new(0);
static DB_DR6: AtomicU64 = AtomicU64::new(0);

/// Counts every #DB and records the first one's return RIP and DR6.
extern "x86-interrupt" fn on_debug(frame: InterruptFrame) {
    if DB_COUNT.fetch_add(1, Ordering::SeqCst) == 0 {
        DB_RIP.store(frame.rip, Ordering::SeqCst);
        DB_DR6.store(read_dr(6), Ordering::SeqCst);
    }
}

/// The variable the data breakpoint watches.
#[repr(align(8))]
struct Watched(AtomicU64);
static WATCHED: Watched = Watched(AtomicU64::new(0));

/// Forces a VM exit (CPUID always exits, SDM 26.1.2).
fn exit_to_keel() {
    let _ = cpu::cpuid(0);
}

/// Starts a case: no #DB seen, DR6 as at power-on.
fn arm() {
    DB_COUNT.store(0, Ordering::SeqCst);
    DB_RIP.store(0, Ordering::SeqCst);
    DB_DR6.store(0, Ordering::SeqCst);
    write_dr(6, DR6_INIT);
}

/// One #DB with DR6 & `bits` == `bits`, returning to `rip`; or none when `rip` is `None`.
fn check(t: &mut Tally, case: &str, rip: Option<u64>, bits: u64) {
    let count = DB_COUNT.load(Ordering::SeqCst);
    let (got_rip, dr6) = (DB_RIP.load(Ordering::SeqCst), DB_DR6.load(Ordering::SeqCst));
    let ok = match rip {
        Some(rip) => count == 1 && got_rip == rip && dr6 & bits == bits,
        None => count == 0,
    };
    t.require(
        format_args!(
            "{case}: {count} #DB at {got_rip:#x} (want {:#x}), DR6 {dr6:#x}",
            rip.unwrap_or(0)
        ),
        ok,
    );
}

fn breakpoints(t: &mut Tally) {
    catch::set_gate(DB, on_debug as *const () as u64);

    // A data-write breakpoint armed before an exit.
    arm();
    write_dr(0, WATCHED.0.as_ptr() as u64);
    write_dr(7, DR7_INIT | 1 | 0b01 << 16 | 0b10 << 18);
    exit_to_keel();
    let after: u64;
    // SAFETY: writes the watched variable; the #DB handler returns after the write.
    unsafe {
        asm!("lea {after}, [rip + 2f]", "mov qword ptr [{p}], {v}", "2:",
             after = out(reg) after, p = in(reg) WATCHED.0.as_ptr(), v = in(reg) 0x5a5au64,
             options(nostack))
    };
    write_dr(7, DR7_INIT);
    check(t, "data write after CPUID", Some(after), DR6_B0);

    // DR7.GD armed before an exit: the next debug-register access faults (the CPU clears GD as
    // it delivers the #DB, so the MOV then completes).
    arm();
    write_dr(7, DR7_INIT | DR7_GD);
    exit_to_keel();
    let at: u64;
    // SAFETY: MOV from DR0 at CPL 0; the #DB handler returns to it once GD is clear.
    unsafe {
        asm!("lea {at}, [rip + 2f]", "2:", "mov {x}, dr0",
             at = out(reg) at, x = out(reg) _, options(nomem, nostack))
    };
    check(t, "DR7.GD after CPUID", Some(at), DR6_BD);
    t.require(
        format_args!("DR7.GD cleared by the #DB"),
        read_dr(7) & DR7_GD == 0,
    );

    // I/O breakpoints: port 80H (1 byte) in DR0, ports 70H-71H (2 bytes) in DR1.
    let cr4: u64;
    // SAFETY: CR4.DE only changes how DR7 R/W = 10 is read (SDM 2.5); Keel lets the guest own it.
    unsafe {
        asm!("mov {c}, cr4", "or {c}, {de}", "mov cr4, {c}", c = out(reg) cr4, de = in(reg) CR4_DE,
             options(nomem, nostack))
    };
    let _ = cr4;
    write_dr(0, 0x80);
    write_dr(1, 0x70);
    write_dr(
        7,
        DR7_INIT | 1 | 0b10 << 16 | 1 << 2 | 0b10 << 20 | 0b01 << 22,
    );

    arm();
    let after: u64;
    // SAFETY: port 80H is Keel's POST-code port (docs/DEVICES.md): writing it has no effect.
    unsafe {
        asm!("lea {after}, [rip + 2f]", "out 0x80, al", "2:",
             after = out(reg) after, in("al") 0x42u8, options(nomem, nostack))
    };
    check(t, "OUT 80H", Some(after), DR6_B0);

    arm();
    let after: u64;
    // SAFETY: reads the RTC data port; nothing depends on the value.
    unsafe {
        asm!("lea {after}, [rip + 2f]", "in al, 0x71", "2:",
             after = out(reg) after, out("al") _, options(nomem, nostack))
    };
    check(t, "IN 71H (LEN1 = 2 at 70H)", Some(after), DR6_B1);

    arm();
    // SAFETY: port 84H is unclaimed: the write is dropped.
    unsafe { asm!("out 0x84, al", in("al") 0u8, options(nomem, nostack)) };
    check(t, "OUT 84H", None, 0);

    // A data-write breakpoint on memory that Keel writes for the guest: INSB's destination.
    arm();
    write_dr(0, WATCHED.0.as_ptr() as u64);
    write_dr(7, DR7_INIT | 1 | 0b01 << 16);
    let after: u64;
    // SAFETY: INSB stores one byte (FFH from an unclaimed port) into the watched variable.
    unsafe {
        asm!("lea {after}, [rip + 2f]", "insb", "2:",
             after = out(reg) after, in("dx") UNCLAIMED_PORT,
             inout("rdi") WATCHED.0.as_ptr() => _, options(nostack))
    };
    check(t, "INSB into a watched byte", Some(after), DR6_B0);

    write_dr(7, DR7_INIT);

    // Single-stepping over an instruction Keel emulates: the first #DB comes right after the
    // CPUID (DR6.BS), not after the instruction that follows it (SDM 17.3.1.4). TF is set by
    // POPF, which itself is not stepped; the steps after the CPUID until TF is clear again are
    // counted but not checked.
    arm();
    let after: u64;
    // SAFETY: TF only makes the CPU raise #DB after each instruction, which `on_debug` takes;
    // RBX, which CPUID writes, is saved around it; the flags are restored with TF clear.
    unsafe {
        asm!("lea {after}, [rip + 2f]", "push rbx", "pushfq", "or qword ptr [rsp], 0x100",
             "popfq", "cpuid", "2:", "pushfq", "and qword ptr [rsp], -0x101", "popfq", "pop rbx",
             after = out(reg) after, inout("eax") 0u32 => _, out("ecx") _, out("edx") _)
    };
    let (count, rip) = (
        DB_COUNT.load(Ordering::SeqCst),
        DB_RIP.load(Ordering::SeqCst),
    );
    let dr6 = DB_DR6.load(Ordering::SeqCst);
    t.require(
        format_args!(
            "TF over CPUID: first #DB at {rip:#x} (want {after:#x}), DR6 {dr6:#x}, {count} in all"
        ),
        count >= 1 && rip == after && dr6 & DR6_BS != 0,
    );
    catch::install();
}
