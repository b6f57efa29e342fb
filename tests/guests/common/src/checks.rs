//! The sequence every guest runs, printing the lines the integration tests look for
//! (tests/guests/README.md lists them).

use crate::abi::{CPUID_SIGNATURE_LEAF, ENOSYS, HC_CONSOLE_WRITE, HC_GUEST_ID, HC_UNKNOWN};
use crate::console::{Line, Printable};
use crate::cpu::{self, cpuid, rdtsc, vmcall};
use crate::trap::{PIT_TICKS, PIT_VECTOR};
use crate::{pic, pit, say};
use core::sync::atomic::Ordering;

/// CPUID(0) round trips measured for `cpuid cycles=`.
pub const CPUID_SAMPLES: usize = 64;
/// PIT rate for the HLT test.
pub const PIT_HZ: u32 = 100;

/// Serial port, GDT and IDT, guest name: call first.
pub fn init(name: &'static str) {
    crate::console::set_name(name);
    crate::serial::init();
    crate::trap::install();
}

/// cpuid, vmcall, via hypercall, enosys, cpuid cycles, hlt: the common part of every guest's
/// run, after its `hello from <mode>` line.
pub fn standard() {
    cpuid_line();
    hypercall_lines();
    say!("cpuid cycles={}", cpuid_cycles());
    if hlt_woken_by_timer() {
        say!("hlt ok");
    } else {
        say!("hlt BAD");
    }
}

/// `cpuid sig=<leaf 0x40000000 EBX:ECX:EDX> hv=<CPUID.1:ECX[31]> vmx=<CPUID.1:ECX[5]>`.
pub fn cpuid_line() {
    let (_, b, c, d) = cpuid(CPUID_SIGNATURE_LEAF);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    let (_, _, ecx, _) = cpuid(1);
    say!(
        "cpuid sig={} hv={} vmx={}",
        Printable(&sig),
        (ecx >> 31) & 1,
        (ecx >> 5) & 1
    );
}

/// GUEST_ID, one CONSOLE_WRITE of `NAME: via hypercall`, and an unknown number that must give
/// ENOSYS. Without a hypervisor each VMCALL prints `vmcall #UD` instead (see [`crate::trap`]).
pub fn hypercall_lines() {
    if let Ok(id) = vmcall(HC_GUEST_ID, 0, 0) {
        say!("vmcall id={}", id);
    }
    // Paging is off or identity, so the buffer's address is its guest-physical address.
    let line = Line::new(format_args!("via hypercall"));
    let bytes = line.as_bytes();
    let _ = vmcall(HC_CONSOLE_WRITE, bytes.as_ptr() as usize, bytes.len());
    match vmcall(HC_UNKNOWN, 0, 0) {
        Ok(ENOSYS) => say!("enosys ok"),
        Ok(other) => say!("enosys BAD {:#x}", other),
        Err(_) => {}
    }
}

/// Median TSC cycles of [`CPUID_SAMPLES`] CPUID(0) round trips (CPUID serialises, so no fences).
pub fn cpuid_cycles() -> u64 {
    let mut samples = [0u64; CPUID_SAMPLES];
    for s in samples.iter_mut() {
        let t0 = rdtsc();
        core::hint::black_box(cpuid(0));
        *s = rdtsc().wrapping_sub(t0);
    }
    samples.sort_unstable();
    (samples[CPUID_SAMPLES / 2 - 1] + samples[CPUID_SAMPLES / 2]) / 2
}

/// PIC remapped to 0x20, PIT channel 0 at 100 Hz, IRQ0 unmasked, `sti; hlt`: true if the tick
/// handler ran. IRQ0 is masked again afterwards.
pub fn hlt_woken_by_timer() -> bool {
    let before = PIT_TICKS.load(Ordering::SeqCst);
    pic::init();
    pit::start_periodic(PIT_HZ);
    pic::enable_only(1 << (PIT_VECTOR - pic::BASE_VECTOR));
    cpu::wait_for_interrupt();
    let woken = PIT_TICKS.load(Ordering::SeqCst) != before;
    pic::mask_all();
    woken
}

/// Prints `cmdline=<text> ram=<bytes>` from the ELF entry registers (EDI/RDI, ESI/RSI) and
/// returns the command line.
///
/// # Safety
/// `cmdline` is the NUL-terminated string Keel's ELF loader passed.
pub unsafe fn elf_entry_line(cmdline: *const u8, ram_size: u64) -> &'static [u8] {
    // SAFETY: per the contract above.
    let cmdline = unsafe { crate::console::c_str(cmdline, 4096) };
    say!("cmdline={} ram={}", Printable(cmdline), ram_size);
    cmdline
}

/// `done`, then the exit port with the guest's code.
pub fn done(exit_code: u8) -> ! {
    say!("done");
    cpu::exit(exit_code)
}
