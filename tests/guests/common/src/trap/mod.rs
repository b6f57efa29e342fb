//! Exceptions and interrupts: each architecture file installs a flat GDT and a 256-entry IDT
//! whose stubs save the registers and call [`handle`]; this file decides what a trap means.
//!
//! - IRQ0 (vector 0x20) counts [`PIT_TICKS`] and sends the 8259A an EOI; the LAPIC timer (vector
//!   0x30) counts [`LAPIC_TICKS`]; spurious interrupts (IRQ7 = 0x27, LAPIC 0xff) are ignored.
//! - #UD on a VMCALL (no hypervisor: plain QEMU) prints `NAME: vmcall #UD` and skips the 3-byte
//!   instruction, so the guests double as QEMU smoke tests.
//! - A fault announced with [`expect_fault`] prints its line and exits with its code.
//! - Anything else prints `NAME: exception vec=.. err=.. rip=..` and exits with
//!   [`crate::EXIT_FAILURE`].

#[cfg(target_arch = "x86")]
mod x86;
#[cfg(target_arch = "x86")]
pub use x86::*;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

use crate::console::StaticStr;
use crate::cpu::{self, VMCALL_UD};
use crate::{lapic, pic, say};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

pub const PIT_VECTOR: u8 = pic::BASE_VECTOR;
pub const LAPIC_TIMER_VECTOR: u8 = 0x30;
const INVALID_OPCODE: u8 = 6;
const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];

pub static PIT_TICKS: AtomicU32 = AtomicU32::new(0);
pub static LAPIC_TICKS: AtomicU32 = AtomicU32::new(0);
/// The fixed IPI the SMP guest's processors send each other.
pub const IPI_VECTOR: u8 = 0x40;
/// IPIs on [`IPI_VECTOR`] taken, per receiving APIC ID (0-15).
pub static IPIS: [AtomicU32; 16] = [const { AtomicU32::new(0) }; 16];

/// No fault expected: a value no vector has.
const NO_VECTOR: u32 = u32::MAX;
static EXPECTED_VECTOR: AtomicU32 = AtomicU32::new(NO_VECTOR);
static EXPECTED_LINE: StaticStr = StaticStr::new();
static EXPECTED_EXIT: AtomicU8 = AtomicU8::new(0);

/// The next exception `vector` is the test's success: print `line` and exit with `exit_code`.
pub fn expect_fault(vector: u8, line: &'static str, exit_code: u8) {
    EXPECTED_LINE.set(line);
    EXPECTED_EXIT.store(exit_code, Ordering::SeqCst);
    EXPECTED_VECTOR.store(u32::from(vector), Ordering::SeqCst);
}

/// Handles trap `vector` raised at `ip`; returns where to resume.
pub(crate) fn handle(vector: u8, error: usize, ip: usize) -> usize {
    match vector {
        PIT_VECTOR => {
            PIT_TICKS.fetch_add(1, Ordering::Relaxed);
            pic::eoi(0);
        }
        LAPIC_TIMER_VECTOR => {
            LAPIC_TICKS.fetch_add(1, Ordering::Relaxed);
            lapic::eoi();
        }
        IPI_VECTOR => {
            if let Some(n) = IPIS.get(usize::from(lapic::id())) {
                n.fetch_add(1, Ordering::SeqCst);
            }
            lapic::eoi();
        }
        // Spurious: no EOI (8259A datasheet; SDM Vol. 3A 11.9).
        0x27 | lapic::SPURIOUS_VECTOR => {}
        0x21..=0x2f => {
            say!("irq vector {:#x}", vector);
            pic::eoi(vector - pic::BASE_VECTOR);
        }
        v if u32::from(v) == EXPECTED_VECTOR.load(Ordering::SeqCst) => {
            say!("{}", EXPECTED_LINE.get());
            cpu::exit(EXPECTED_EXIT.load(Ordering::SeqCst));
        }
        INVALID_OPCODE if code_at(ip) == VMCALL => {
            say!("vmcall #UD");
            VMCALL_UD.store(true, Ordering::SeqCst);
            return ip + VMCALL.len();
        }
        _ => {
            say!("exception vec={} err={:#x} rip={:#x}", vector, error, ip);
            cpu::exit(crate::EXIT_FAILURE);
        }
    }
    ip
}

/// The three bytes at `ip`.
fn code_at(ip: usize) -> [u8; 3] {
    // SAFETY: `ip` is the address of the instruction that just faulted, so it is mapped and
    // readable (paging off, or the identity map); code is not Rust-owned data being mutated.
    unsafe { core::ptr::read_volatile(ip as *const [u8; 3]) }
}

/// A table the CPU reads (GDT, IDT): written once at install time on a single CPU.
#[repr(C, align(16))]
pub(crate) struct Table<T>(UnsafeCell<T>);

// SAFETY: only the bootstrap processor writes the tables, once, before any processor loads them
// (smp32's other processors only load them, `load`).
unsafe impl<T> Sync for Table<T> {}

impl<T> Table<T> {
    pub(crate) const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    pub(crate) fn get(&self) -> *mut T {
        self.0.get()
    }

    /// The table's limit for LGDT/LIDT: its size minus one.
    pub(crate) const fn limit(&self) -> u16 {
        (core::mem::size_of::<T>() - 1) as u16
    }
}

/// The operand of LGDT/LIDT: limit and linear base (SDM Vol. 3A 3.5.1, 6.10).
#[repr(C, packed)]
pub(crate) struct DescriptorTablePointer {
    pub(crate) limit: u16,
    pub(crate) base: usize,
}

extern "C" {
    /// 256 stubs of [`STUB_SIZE`] bytes, one per vector (in the architecture file's assembly).
    static guest_trap_stubs: u8;
}

/// Bytes per trap stub.
const STUB_SIZE: usize = 16;
/// The IDT: 256 gates of `GATE_WORDS` u64 each.
static IDT: Table<[u64; 256 * GATE_WORDS]> = Table::new([0; 256 * GATE_WORDS]);

/// Loads the guest's own flat GDT (a multiboot loader's GDTR may be invalid, spec 3.2) and an
/// IDT whose every vector leads to [`handle`].
pub fn install() {
    let stubs = core::ptr::addr_of!(guest_trap_stubs) as usize;
    let idt = IDT.get();
    for vector in 0..256 {
        let words = gate(stubs + STUB_SIZE * vector, CODE_SELECTOR);
        for (i, word) in words.into_iter().enumerate() {
            // SAFETY: single CPU, and the IDT is not loaded yet while it is written.
            unsafe { (*idt)[GATE_WORDS * vector + i] = word };
        }
    }
    load();
}

/// Loads the GDT and IDT [`install`] filled in: on another processor of an SMP guest, after the
/// bootstrap processor installed them.
pub fn load() {
    let gdtr = DescriptorTablePointer {
        limit: GDT.limit(),
        base: GDT.get() as usize,
    };
    let idtr = DescriptorTablePointer {
        limit: IDT.limit(),
        base: IDT.get() as usize,
    };
    // SAFETY: both tables are static, complete and use the selectors `load_tables` loads.
    unsafe { load_tables(&gdtr, &idtr) };
}

/// Loads an IDT with limit 0 and executes INT3: the #BP cannot be delivered (#GP), nor can the
/// #GP (#DF), nor the #DF: a triple fault (SDM Vol. 3A 6.15, interrupt 8).
pub fn triple_fault() -> ! {
    let idtr = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: deliberately ends the guest; nothing after it runs.
    unsafe {
        core::arch::asm!("lidt ({0})", "int3", in(reg) &idtr, options(att_syntax, noreturn));
    }
}

/// The low 8 bytes of an interrupt gate: the whole 32-bit gate, or the first half of a 64-bit one
/// (SDM Vol. 3A 6.11 and 6.14.1): present, DPL 0, type 0xe (interrupt gate, IF cleared on entry).
pub(crate) fn gate_low(handler: usize, selector: u16) -> u64 {
    let h = handler as u64;
    (h & 0xffff) | (u64::from(selector) << 16) | (0x8e << 40) | (((h >> 16) & 0xffff) << 48)
}

/// Flat 4 GiB data descriptor, accessed, writable (SDM Vol. 3A 3.4.5).
pub(crate) const DATA_DESCRIPTOR: u64 = 0x00cf_9300_0000_ffff;
pub(crate) const CODE_SELECTOR: u16 = 0x08;
pub(crate) const DATA_SELECTOR: u16 = 0x10;
