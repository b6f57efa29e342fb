//! `attack=events`: the events Keel delivers must look like the ones the CPU delivers itself.
//!
//! 1. NMIs the guest sends itself through the xAPIC ICR (delivery mode NMI, destination its own
//!    APIC ID) arrive, once per send, with interrupts disabled too (SDM Vol. 3A 11.6.1).
//! 2. An NMI sent from inside the NMI handler waits until the handler's IRET ends the NMI
//!    blocking and then arrives once (SDM Vol. 3A 6.7.1): no nesting, no loss.
//! 3. RF in the RFLAGS image a fault pushes (SDM Vol. 3A 17.3.1.1: the CPU sets it for faults):
//!    Keel's #UD for VMXON and #GP for WRMSR of an MSR nobody defines must push RF = 1 like the
//!    CPU's own #UD (UD2) and #GP (a non-canonical load); INT3, a trap, pushes RF = 0.
//! 4. Single step (SDM Vol. 3A 17.3.1.4): with TF set, an instruction Keel emulates (CPUID) must
//!    be followed by a #DB trap with DR6.BS, its RIP just past the instruction, as a NOP is.
//!    Bochs passes this without Keel's help: it records the single step of an instruction that
//!    exits (CPUID) in the pending-debug-exceptions field and delivers it after the next entry,
//!    where the SDM (28.3.4) has a CPU save nothing for such an exit; the host test
//!    `an_instruction_keel_completes_under_single_step_owes_a_debug_trap` covers that case. Here
//!    the case checks that the trap comes exactly once and where it should.
//!
//! Prints `hostile64: events rf ud2=1 gp=1 int3=0 vmxon=1 wrmsr=1` (what each pushed),
//! `hostile64: events step nop=<traps>,bs=<0|1>,rip+<n> cpuid=...` and then
//! `hostile64: events cases=<n>/<n> ok`.

use super::{Tally, GP, UD};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use guest_common::{cpu, lapic, say};
use hostile64::catch::{self, Fault, InterruptFrame};
use hostile64::fault;

const LAPIC: u64 = 0xfee0_0000;
const APIC_ID: u64 = 0x20;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
/// ICR delivery mode NMI (bits 10:8 = 100b), no shorthand, physical destination.
const NMI: u32 = 4 << 8;
const NMI_VECTOR: u8 = 2;
const BP: u8 = 3;
const RF: u64 = 1 << 16;
const SENDS: u64 = 8;

fn write32(addr: u64, v: u32) {
    // SAFETY: `addr` is in the emulated LAPIC page (identity mapped, uncached): MMIO, not Rust
    // memory.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as in `write32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Sends an NMI to the APIC whose ID is `id`.
fn send_nmi(id: u32) {
    write32(LAPIC + ICR_HIGH, id << 24);
    write32(LAPIC + ICR_LOW, NMI);
}

/// A few instructions for a pending NMI to arrive in (Keel injects it at the VM entry right
/// after the ICR write).
fn settle() {
    for _ in 0..16 {
        core::hint::spin_loop();
    }
}

static NMIS: AtomicU64 = AtomicU64::new(0);
static IN_HANDLER: AtomicBool = AtomicBool::new(false);
static NESTED: AtomicU64 = AtomicU64::new(0);
/// The handler sends one more NMI to this APIC ID (+1; 0 = none) before it returns.
static RESEND_TO: AtomicU64 = AtomicU64::new(0);
/// NMIs counted at the end of the handler that sent one more.
static SEEN_INSIDE: AtomicU64 = AtomicU64::new(0);

extern "x86-interrupt" fn on_nmi(_frame: InterruptFrame) {
    if IN_HANDLER.swap(true, Ordering::SeqCst) {
        NESTED.fetch_add(1, Ordering::SeqCst);
    }
    NMIS.fetch_add(1, Ordering::SeqCst);
    let to = RESEND_TO.swap(0, Ordering::SeqCst);
    if to != 0 {
        send_nmi(to as u32 - 1);
        settle();
        SEEN_INSIDE.store(NMIS.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    IN_HANDLER.store(false, Ordering::SeqCst);
}

const DB_VECTOR: u8 = 1;
const DR6_BS: u64 = 1 << 14;
/// DR6 with no condition recorded (SDM Vol. 3A 17.2.3: bits 31:16 and 11:4 read as 1).
const DR6_CLEAR: u64 = 0xffff_0ff0;

#[no_mangle]
static EVENTS_DB_COUNT: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static EVENTS_DB_RIP: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static EVENTS_DB_DR6: AtomicU64 = AtomicU64::new(0);

// The #DB handler of case 4: records DR6 and the RIP pushed, clears TF in the pushed RFLAGS (so
// stepping stops at the IRET) and returns.
global_asm!(
    r#"
    .pushsection .text.events_db, "ax"
    .globl events_db
events_db:
    push rax
    lock inc qword ptr [rip + EVENTS_DB_COUNT]
    mov rax, dr6
    mov qword ptr [rip + EVENTS_DB_DR6], rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [rip + EVENTS_DB_RIP], rax
    and qword ptr [rsp + 24], -0x101
    pop rax
    iretq
    .popsection
"#
);

extern "C" {
    fn events_db();
}

/// Sets TF with POPFQ, runs `$insn` (the first instruction stepped: the trap after POPFQ's own
/// successor, SDM Vol. 3A 17.3.1.4) and reports (traps, DR6.BS, RIP of the trap minus the
/// address of `$insn`).
macro_rules! step {
    ($insn:literal $(, $($operands:tt)*)?) => {{
        EVENTS_DB_COUNT.store(0, Ordering::SeqCst);
        let start: u64;
        // SAFETY: DR6 is the guest's own; the stepped instruction and the NOPs after it touch no
        // memory; the #DB handler clears TF before returning.
        unsafe {
            asm!(
                "mov dr6, {clear}",
                "lea {start}, [rip + 3f]",
                "pushfq",
                "or qword ptr [rsp], 0x100",
                "popfq",
                "3:",
                $insn,
                "nop",
                "nop",
                clear = in(reg) DR6_CLEAR,
                start = out(reg) start,
                $($($operands)*)?
            )
        };
        (
            EVENTS_DB_COUNT.load(Ordering::SeqCst),
            (EVENTS_DB_DR6.load(Ordering::SeqCst) & DR6_BS) >> 14,
            EVENTS_DB_RIP.load(Ordering::SeqCst).wrapping_sub(start),
        )
    }};
}

fn rf(f: Option<Fault>) -> u64 {
    f.map_or(2, |f| (f.rflags & RF) >> 16)
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("events", "cases");
    cpu::disable_interrupts();
    lapic::enable();
    let id = read32(LAPIC + APIC_ID) >> 24;

    // 1. Through the default NMI gate (catch.rs counts).
    let before = catch::nmis();
    let mut once = 0;
    for i in 1..=SENDS {
        send_nmi(id);
        settle();
        if catch::nmis() - before == i {
            once += 1;
        }
    }
    say!(
        "events nmi sent={} received={}",
        SENDS,
        catch::nmis() - before
    );
    t.require(
        format_args!("an NMI per send ({once}/{SENDS})"),
        once == SENDS,
    );

    // 2. One more NMI sent while the handler of the first runs.
    catch::set_gate(NMI_VECTOR, on_nmi as *const () as u64);
    RESEND_TO.store(u64::from(id) + 1, Ordering::SeqCst);
    send_nmi(id);
    settle();
    let (inside, total, nested) = (
        SEEN_INSIDE.load(Ordering::SeqCst),
        NMIS.load(Ordering::SeqCst),
        NESTED.load(Ordering::SeqCst),
    );
    say!("events nmi in handler: inside={inside} total={total} nested={nested}");
    t.require(
        format_args!("NMI blocked in its handler (inside={inside} nested={nested})"),
        inside == 1 && nested == 0,
    );
    t.require(format_args!("NMI after IRET (total={total})"), total == 2);

    // 3. RF in the pushed RFLAGS.
    let ud2 = fault!("ud2");
    let gp = fault!(
        "mov {x}, qword ptr [{a}]",
        a = in(reg) 0x8000_0000_0000_0000u64,
        x = out(reg) _
    );
    let int3 = fault!("int3");
    let mut region = [0u64; 2];
    let vmxon = fault!("vmxon [{p}]", p = in(reg) region.as_mut_ptr());
    core::hint::black_box(&mut region);
    let wrmsr = fault!("wrmsr", in("ecx") 0xdead_beefu32, in("eax") 0u32, in("edx") 0u32);
    say!(
        "events rf ud2={} gp={} int3={} vmxon={} wrmsr={}",
        rf(ud2),
        rf(gp),
        rf(int3),
        rf(vmxon),
        rf(wrmsr)
    );
    t.expect(format_args!("ud2"), ud2, Some(UD));
    t.expect(format_args!("non-canonical load"), gp, Some(GP));
    t.expect(format_args!("int3"), int3, Some(BP));
    t.expect(format_args!("vmxon"), vmxon, Some(UD));
    t.expect(format_args!("wrmsr 0xdeadbeef"), wrmsr, Some(GP));
    for (case, f, want) in [
        ("ud2", ud2, 1),
        ("non-canonical load", gp, 1),
        ("int3", int3, 0),
        ("vmxon", vmxon, 1),
        ("wrmsr 0xdeadbeef", wrmsr, 1),
    ] {
        t.require(format_args!("RF pushed by {case}"), rf(f) == want);
    }

    // 4. Single step over a native and an emulated instruction (NOP: 1 byte, CPUID: 2).
    catch::set_gate(DB_VECTOR, events_db as *const () as u64);
    let nop = step!("nop");
    let cpuid = step!("cpuid", inout("eax") 0u32 => _, out("ecx") _, out("edx") _);
    say!(
        "events step nop={},bs={},rip+{} cpuid={},bs={},rip+{}",
        nop.0,
        nop.1,
        nop.2,
        cpuid.0,
        cpuid.1,
        cpuid.2
    );
    t.require(
        format_args!("single step over NOP {nop:?}"),
        nop == (1, 1, 1),
    );
    t.require(
        format_args!("single step over CPUID {cpuid:?}"),
        cpuid == (1, 1, 2),
    );
    t.finish()
}
