//! `attack=probe`: touches guest-physical memory outside its RAM. Keel maps nothing there (not
//! its own memory, not another guest's), so the first such access stops the guest with
//! `read|write of guest-physical <addr>, which is neither RAM nor a device`; only the emulated
//! IOAPIC (0xFEC00000) and local APIC (0xFEE00000) pages answer, as devices. An instruction
//! fetch is reported as a read.
//!
//! Two forms:
//! - `addr=<a> how=read|write|exec`: one probe of address `a`;
//! - `from=<i>` (default 0), with ` restart=<k>` that Keel appends when it restarts the guest:
//!   probes the table entries `i + k`, `i + k + 1`, ... until one stops it, so that a guest with
//!   `restart = N` in its manifest sweeps the table one address per life. The table: every 2 MiB
//!   step from the end of RAM to 4 GiB, then 4 GiB, 4 GiB + 2 MiB, 64 GiB and the last 2 MiB below
//!   MAXPHYADDR; entry `n` reads when `n % 3 == 0`, writes when 1, executes when 2. After the last
//!   entry it prints `probe sweep done` and exits with 0x30.
//!
//! Each probe prints `hostile64: probe <n> <how> <addr>` first (`n` = `-` for `addr=`); a probe
//! that comes back prints `hostile64: probe <n> survived: <value>`.

use core::arch::asm;
use guest_common::console::{Line, Printable};
use guest_common::{cpu, say, EXIT_FAILURE};
use hostile64::{args, EXIT_OK};

const MIB2: u64 = 2 << 20;
const HC_CONSOLE_WRITE: usize = 1;
const GIB4: u64 = 4 << 30;
/// The ELF64 loader's page directory for virtual 1-2 GiB (docs/GUESTS.md, guest-physical
/// memory): its first entry is the window through which addresses above 4 GiB are reached.
const WINDOW_PDE: u64 = 0x6000;
const WINDOW_VA: u64 = 0x4000_0000;
/// PDE: present, writable, 2 MiB page, uncached (PWT | PCD).
const PDE_FLAGS: u64 = 0x1 | 0x2 | 0x80 | 0x8 | 0x10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    Read,
    Write,
    Exec,
}

impl How {
    fn name(self) -> &'static str {
        match self {
            How::Read => "read",
            How::Write => "write",
            How::Exec => "exec",
        }
    }
}

/// Guest-physical address bits (CPUID 0x80000008 EAX[7:0]).
fn max_phys_bits() -> u32 {
    cpu::cpuid(0x8000_0008).0 & 0xff
}

/// The sweep's table: the address of entry `n`, if there is one.
fn table(n: u64, ram: u64) -> Option<u64> {
    let low = (GIB4 - ram) / MIB2;
    if n < low {
        return Some(ram + n * MIB2);
    }
    let top = 1u64 << max_phys_bits();
    let high = [GIB4, GIB4 + MIB2, 64 << 30, top - MIB2];
    high.iter()
        .copied()
        .filter(|&a| a + MIB2 <= top)
        .nth((n - low) as usize)
}

/// A virtual address that reaches guest-physical `gpa`: itself below 4 GiB (the loader's identity
/// map), else through the window PDE, which is pointed at `gpa`'s 2 MiB page.
fn reach(gpa: u64) -> u64 {
    if gpa < GIB4 {
        return gpa;
    }
    // SAFETY: the loader's page directory lives at WINDOW_PDE in this guest's RAM; its first
    // entry maps only the window, which nothing else uses. INVLPG drops the old translation.
    unsafe {
        core::ptr::write_volatile(WINDOW_PDE as *mut u64, (gpa & !(MIB2 - 1)) | PDE_FLAGS);
        asm!("invlpg [{}]", in(reg) WINDOW_VA, options(nostack));
    }
    WINDOW_VA + (gpa & (MIB2 - 1))
}

/// One access; returns the value read (or written) if the guest is still running afterwards.
fn touch(gpa: u64, how: How) -> u64 {
    let va = reach(gpa);
    match how {
        // SAFETY (all three): deliberately touches memory the guest does not own; Keel is
        // expected to stop the guest. No Rust object lives at `va`.
        How::Read => unsafe { core::ptr::read_volatile(va as *const u64) },
        How::Write => {
            let v = 0x686f_7374_696c_6521; // "hostile!"
            unsafe { core::ptr::write_volatile(va as *mut u64, v) };
            v
        }
        How::Exec => {
            unsafe { asm!("call {}", in(reg) va, clobber_abi("C")) };
            0
        }
    }
}

fn how_of(n: u64) -> How {
    match n % 3 {
        0 => How::Read,
        1 => How::Write,
        _ => How::Exec,
    }
}

pub fn probe(cmdline: &[u8], ram: u64) -> ! {
    if let Some(addr) = args::word(cmdline, b"addr").and_then(args::parse_number) {
        let how = match args::word(cmdline, b"how").unwrap_or(b"read") {
            b"read" => How::Read,
            b"write" => How::Write,
            b"exec" => How::Exec,
            other => {
                say!("probe: unknown how={}", Printable(other));
                cpu::exit(EXIT_FAILURE)
            }
        };
        say!("probe - {} {:#x}", how.name(), addr);
        let v = touch(addr, how);
        say!("probe - survived: {:#x}", v);
        cpu::exit(EXIT_FAILURE)
    }
    let first = args::number(cmdline, b"from", 0) + args::number(cmdline, b"restart", 0);
    let mut n = first;
    while let Some(addr) = table(n, ram) {
        let how = how_of(n);
        // One hypercall rather than a UART exit per character: the sweep starts once per entry.
        let line = Line::new(format_args!("probe {} {} {:#x}", n, how.name(), addr));
        let _ = cpu::vmcall(
            HC_CONSOLE_WRITE,
            line.as_bytes().as_ptr() as usize,
            line.as_bytes().len(),
        );
        let v = touch(addr, how);
        say!("probe {} survived: {:#x}", n, v);
        n += 1;
    }
    say!("probe sweep done");
    cpu::exit(EXIT_OK)
}
