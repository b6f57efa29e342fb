//! Code shared by the 32- and 64-bit Rust test guests (pm32, mb32, long64).
//!
//! Everything a guest prints goes through [`say!`], which prefixes the guest's name so that the
//! integration tests can tell guests apart on a shared console. The pieces:
//! - [`serial`]: the 16550 UART at 0x3F8, polled;
//! - [`cpu`]: port I/O, CPUID, RDTSC, VMCALL, the 0xf4 exit port;
//! - [`pic`], [`pit`], [`lapic`]: just enough of the timer hardware for the HLT and tick tests;
//! - [`trap`]: GDT, IDT and the exception/interrupt handler (per architecture);
//! - [`checks`]: the standard sequence every guest runs (see tests/guests/README.md).
#![no_std]

pub mod abi;
pub mod checks;
pub mod console;
pub mod cpu;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod trap;

/// Exit code for any failure (unexpected exception, panic, a fault that should have happened
/// and did not): the guest ends with status (0x3f << 1) | 1 = 0x7f.
pub const EXIT_FAILURE: u8 = 0x3f;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic: {}", info.message());
    cpu::exit(EXIT_FAILURE)
}
