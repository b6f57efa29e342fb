//! hostile64: an ELF64 guest that attacks Keel, one attack per guest, chosen with `attack=NAME`
//! on its command line. Each attack prints `hostile64: ...` lines that tests/tests/hostile.rs
//! asserts, and either exits through port 0xf4 with 0x30 (status 0x61) when every case had its
//! documented outcome, with 0x3f (status 0x7f) when one did not, or is stopped by Keel on
//! purpose. docs/SECURITY.md has the table of attacks and their outcomes.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

mod attacks;

use guest_common::console::Printable;
use guest_common::{checks, cpu, say, EXIT_FAILURE};
use hostile64::{args, catch};

hostile64::entry!(hostile_main);

extern "C" fn hostile_main(cmdline: *const u8, ram_size: u64) -> ! {
    checks::init("hostile64");
    // SAFETY: the ELF entry convention puts a NUL-terminated command line at RDI.
    let line = unsafe { guest_common::console::c_str(cmdline, 4096) };
    // `quiet=1` skips the `cmdline=` line: the probe sweep starts thousands of times.
    let cmdline = if args::number(line, b"quiet", 0) != 0 {
        line
    } else {
        // SAFETY: as above.
        unsafe { checks::elf_entry_line(cmdline, ram_size) }
    };
    catch::install();
    let attack = args::word(cmdline, b"attack").unwrap_or(b"");
    match attacks::find(attack) {
        Some(run) => run(cmdline, ram_size),
        None => {
            say!("unknown attack {}", Printable(attack));
            cpu::exit(EXIT_FAILURE)
        }
    }
}
