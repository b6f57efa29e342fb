//! `flood`: writes to its console as fast as it can for `secs=N` seconds of its own time, to show
//! that a flooding guest costs nobody else their timer ticks and that it learns what became of
//! every byte (tests/guests/manifests/flood.toml, tests/tests/console.rs).
//!
//! Each round: one CONSOLE_WRITE of 700 five-byte lines (`cNNN\n`), retried from where Keel
//! stopped until all of it was accepted (a short write means Keel's console for this guest is
//! full); then 20 lines on the UART, which cannot be short (Keel drops what does not fit, counts
//! it and says so); then one PRINT_STATS (EAGAIN while Keel's console has no room for the table).
//! With `stats=only` a round is the PRINT_STATS alone: Keel's table asked for as often as it can be.
//! At the end one line, sent through CONSOLE_WRITE so it cannot be dropped, gives the totals:
//! `flood done: rounds=R hypercall=H short=S uart=U stats=OK/CALLS`, where H counts the bytes
//! Keel accepted through the hypercall and U every byte this guest wrote to THR since it started.

use crate::{required, value};
use guest_common::abi::{EAGAIN, HC_CONSOLE_WRITE, HC_PRINT_STATS, HC_YIELD};
use guest_common::console::Line;
use guest_common::{cpu, pit, say, serial, EXIT_FAILURE};

pub const EXIT_FLOOD: u8 = 0x27;
const LINES_PER_CALL: usize = 700;
/// `cNNN\n`: 700 of them fit in one call (at most 4096 bytes).
const LINE_LEN: usize = 5;
const UART_LINES_PER_ROUND: u64 = 20;

/// Sends all of `bytes` through CONSOLE_WRITE, resuming after each short write (yielding the CPU
/// when Keel took nothing); returns the number of short writes. Any error ends the guest.
fn write_all(bytes: &[u8]) -> u64 {
    let (mut done, mut short) = (0, 0);
    while done < bytes.len() {
        let left = bytes.len() - done;
        match cpu::vmcall(HC_CONSOLE_WRITE, bytes[done..].as_ptr() as usize, left) {
            Ok(n) if n <= left => {
                done += n;
                if n < left {
                    short += 1;
                }
                if n == 0 {
                    let _ = cpu::vmcall(HC_YIELD, 0, 0);
                }
            }
            other => {
                say!("CONSOLE_WRITE of {} bytes returned {:?}", left, other.ok());
                cpu::exit(EXIT_FAILURE)
            }
        }
    }
    short
}

pub fn flood(cmdline: &[u8]) -> ! {
    let secs = required(cmdline, b"secs");
    let stats_only = value(cmdline, b"stats") == Some(b"only");
    let hz = pit::tsc_hz().max(1);
    say!("flood: {} s at tsc {} kHz", secs, hz / 1000);
    let mut call = [0u8; LINES_PER_CALL * LINE_LEN];
    for (i, line) in call.chunks_exact_mut(LINE_LEN).enumerate() {
        line.copy_from_slice(&[
            b'c',
            b'0' + (i / 100) as u8,
            b'0' + (i / 10 % 10) as u8,
            b'0' + (i % 10) as u8,
            b'\n',
        ]);
    }
    let (mut rounds, mut hypercall, mut short, mut stats_ok) = (0u64, 0u64, 0u64, 0u64);
    let t0 = cpu::rdtsc();
    while cpu::rdtsc().wrapping_sub(t0) < secs * hz {
        if !stats_only {
            short += write_all(&call);
            hypercall += call.len() as u64;
            for j in 0..UART_LINES_PER_ROUND {
                say!("u{} {}", rounds, j);
            }
        }
        match cpu::vmcall(HC_PRINT_STATS, 0, 0) {
            Ok(0) => stats_ok += 1,
            Ok(EAGAIN) => {}
            other => {
                say!("PRINT_STATS returned {:?}", other.ok());
                cpu::exit(EXIT_FAILURE)
            }
        }
        rounds += 1;
    }
    let summary = Line::new(format_args!(
        "flood done: rounds={} hypercall={} short={} uart={} stats={}/{}",
        rounds,
        hypercall,
        short,
        serial::bytes_sent(),
        stats_ok,
        rounds
    ));
    write_all(summary.as_bytes());
    cpu::exit(EXIT_FLOOD)
}
