//! Surviving the faults an attack provokes on purpose.
//!
//! [`install`] points the 32 exception vectors of the IDT that `guest_common::trap::install`
//! loaded at stubs of this module (interrupt vectors keep the common handlers: PIT, LAPIC timer).
//! [`fault!`](crate::fault) arms a resume address just after the instruction under test; if the
//! instruction faults, the stub records the vector and error code and returns to that address
//! instead of to the faulting instruction. A fault while nothing is armed is a real failure: it is
//! printed as `NAME: unexpected exception vec=.. err=.. rip=..` and the guest exits with
//! `guest_common::EXIT_FAILURE`. Vector 2, the NMI, is an interrupt rather than a fault: its
//! stub counts it ([`nmis`]) and returns.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_common::{cpu, say, EXIT_FAILURE};

/// Where the armed instruction resumes after a fault; 0 while nothing is armed.
#[no_mangle]
pub static HOSTILE_RESUME: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static HOSTILE_VECTOR: AtomicU64 = AtomicU64::new(NO_FAULT);
#[no_mangle]
static HOSTILE_ERROR: AtomicU64 = AtomicU64::new(0);
/// The RFLAGS image the fault pushed.
#[no_mangle]
static HOSTILE_RFLAGS: AtomicU64 = AtomicU64::new(0);
/// NMIs taken through the default NMI gate.
#[no_mangle]
static HOSTILE_NMIS: AtomicU64 = AtomicU64::new(0);
const NO_FAULT: u64 = u64::MAX;

/// Bytes per stub in `hostile_catch_stubs`.
const STUB_SIZE: u64 = 32;

// One stub per exception vector: record the error code (SDM Vol. 3A table 6-1: vectors 8, 10-14,
// 17, 21, 29, 30 push one) and the vector, then resume at HOSTILE_RESUME if it is armed.
global_asm!(
    r#"
    .pushsection .text.catch, "ax"
    .balign 32
    .globl hostile_catch_stubs
hostile_catch_stubs:
    .set vec, 0
    .rept 32
    .balign 32
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pop qword ptr [rip + HOSTILE_ERROR]
    .else
    mov qword ptr [rip + HOSTILE_ERROR], 0
    .endif
    mov qword ptr [rip + HOSTILE_VECTOR], vec
    jmp hostile_catch_common
    .set vec, vec + 1
    .endr

hostile_catch_common:
    push rax
    mov rax, qword ptr [rsp + 24]
    mov qword ptr [rip + HOSTILE_RFLAGS], rax
    mov rax, qword ptr [rip + HOSTILE_RESUME]
    test rax, rax
    jz 1f
    mov qword ptr [rsp + 8], rax
    mov qword ptr [rip + HOSTILE_RESUME], 0
    pop rax
    iretq
1:
    mov rdi, qword ptr [rip + HOSTILE_VECTOR]
    mov rsi, qword ptr [rip + HOSTILE_ERROR]
    mov rdx, qword ptr [rsp + 8]
    and rsp, -16
    call {unexpected}
    ud2

    .globl hostile_nmi_counter
hostile_nmi_counter:
    lock inc qword ptr [rip + HOSTILE_NMIS]
    iretq
    .popsection
"#,
    unexpected = sym unexpected,
);

extern "C" {
    static hostile_catch_stubs: u8;
    static hostile_nmi_counter: u8;
}

extern "C" fn unexpected(vector: u64, error: u64, rip: u64) -> ! {
    say!(
        "unexpected exception vec={} err={:#x} rip={:#x}",
        vector,
        error,
        rip
    );
    cpu::exit(EXIT_FAILURE)
}

/// The operand of SIDT (SDM Vol. 3A 6.10).
#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

/// The frame the CPU pushes for an interrupt without error code (SDM Vol. 3A 6.14.2), as an
/// `extern "x86-interrupt"` handler receives it.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Points gate `vector` of the loaded IDT at `handler` (a 64-bit interrupt gate, present, DPL 0:
/// SDM Vol. 3A 6.14.1). The guest must not take that vector while its gate changes.
pub fn set_gate(vector: u8, handler: u64) {
    let mut idtr = Idtr { limit: 0, base: 0 };
    let cs: u16;
    // SAFETY: SIDT stores 10 bytes into `idtr`; reading CS has no effect.
    unsafe {
        asm!("sidt [{}]", in(reg) &mut idtr, options(nostack, preserves_flags));
        asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags));
    }
    let gate = idtr.base as *mut u64;
    let low =
        (handler & 0xffff) | u64::from(cs) << 16 | 0x8e << 40 | ((handler >> 16) & 0xffff) << 48;
    // SAFETY: the common IDT has 256 16-byte gates and this CPU is its only user.
    unsafe {
        gate.add(2 * usize::from(vector)).write_volatile(low);
        gate.add(2 * usize::from(vector) + 1)
            .write_volatile(handler >> 32);
    }
}

/// Points the exception vectors 0-31 of the loaded IDT (`guest_common::trap::install` first) at
/// this module's stubs, and the NMI (vector 2) at a counter.
pub fn install() {
    let stubs = core::ptr::addr_of!(hostile_catch_stubs) as u64;
    for vector in 0..32u8 {
        set_gate(vector, stubs + STUB_SIZE * u64::from(vector));
    }
    set_gate(2, core::ptr::addr_of!(hostile_nmi_counter) as u64);
}

/// NMIs the default NMI gate has taken.
pub fn nmis() -> u64 {
    HOSTILE_NMIS.load(Ordering::SeqCst)
}

/// A fault that the armed instruction raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error: u64,
    /// The RFLAGS image pushed with it (RF is bit 16).
    pub rflags: u64,
}

/// Arms the catcher; [`fault!`](crate::fault) calls it.
pub fn arm() {
    HOSTILE_VECTOR.store(NO_FAULT, Ordering::SeqCst);
}

/// The fault since [`arm`], if any, and disarms.
pub fn take() -> Option<Fault> {
    HOSTILE_RESUME.store(0, Ordering::SeqCst);
    let v = HOSTILE_VECTOR.swap(NO_FAULT, Ordering::SeqCst);
    (v != NO_FAULT).then(|| Fault {
        vector: v as u8,
        error: HOSTILE_ERROR.load(Ordering::SeqCst),
        rflags: HOSTILE_RFLAGS.load(Ordering::SeqCst),
    })
}

/// Runs the instructions (assembly strings, Intel syntax) with the catcher armed and returns the
/// fault they raised, if any: `fault!("vmxon [{p}]", p = in(reg) &region)`. Extra arguments are
/// `asm!` operands; the instructions must fall through to their end when they do not fault.
#[macro_export]
macro_rules! fault {
    ($($insn:literal),+ $(, $($operands:tt)*)?) => {{
        $crate::catch::arm();
        // SAFETY: the instructions are expected to fault (the catcher resumes after them) or to
        // complete; callers pass operands for every register they read or write.
        unsafe {
            core::arch::asm!(
                "lea {resume_at}, [rip + 2f]",
                "mov qword ptr [rip + HOSTILE_RESUME], {resume_at}",
                $($insn,)+
                "2:",
                resume_at = out(reg) _,
                $($($operands)*)?
            )
        };
        $crate::catch::take()
    }};
}

/// RDMSR with the catcher armed: the fault it raised (if any) and the value it read.
pub fn rdmsr(msr: u32) -> (Option<Fault>, u64) {
    let (lo, hi): (u32, u32);
    let f = crate::fault!("rdmsr", in("ecx") msr, inout("eax") 0u32 => lo, inout("edx") 0u32 => hi);
    (f, u64::from(hi) << 32 | u64::from(lo))
}

/// WRMSR with the catcher armed: the fault it raised, if any.
pub fn wrmsr(msr: u32, v: u64) -> Option<Fault> {
    crate::fault!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32)
}
