//! `attack=ports`: IN from every port and OUT to every port. Keel traps them all; a port no device
//! claims must read as all ones and ignore writes, and nothing may end or stop the guest.
//!
//! Skipped: reads and writes of 0xf4-0xf7 (isa-debug-exit: a write ends the guest), and writes to
//! the guest's own console (0x3f8-0x3ff, 0xe9) so that its lines still arrive. Prints
//!
//! ```text
//! hostile64: ports in ones=<n>/<total>
//! hostile64: ports not-ones <port>=<value> ...   (up to 8 a line: the claimed ports)
//! hostile64: ports out done
//! hostile64: ports ok                            (wide and string accesses as expected)
//! ```

use super::Tally;
use core::arch::asm;
use guest_common::cpu::{inb, outb};
use guest_common::say;
use hostile64::text::Cursor;

fn skip_read(port: u16) -> bool {
    (0xf4..=0xf7).contains(&port)
}

fn skip_write(port: u16) -> bool {
    skip_read(port) || (0x3f8..=0x3ff).contains(&port) || port == 0xe9
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port I/O touches no memory.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port I/O touches no memory.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack)) };
    v
}

/// Port numbers and values of the ports that did not read 0xff, printed in lines of 8.
struct NotOnes {
    line: [(u16, u8); 8],
    len: usize,
    count: u32,
}

impl NotOnes {
    fn push(&mut self, port: u16, v: u8) {
        self.line[self.len] = (port, v);
        self.len += 1;
        self.count += 1;
        if self.len == self.line.len() {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        let mut text = [0u8; 8 * 14];
        let mut w = Cursor::new(&mut text);
        for (port, v) in &self.line[..self.len] {
            let _ = core::fmt::write(&mut w, format_args!(" {port:#x}={v:#x}"));
        }
        say!("ports not-ones{}", w.as_str());
        self.len = 0;
    }
}

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut ones = 0u32;
    let mut total = 0u32;
    let mut other = NotOnes {
        line: [(0, 0); 8],
        len: 0,
        count: 0,
    };
    for port in 0..=u16::MAX {
        if skip_read(port) {
            continue;
        }
        total += 1;
        match inb(port) {
            0xff => ones += 1,
            v => other.push(port, v),
        }
    }
    other.flush();
    say!("ports in ones={}/{}", ones, total);
    for port in 0..=u16::MAX {
        if !skip_write(port) {
            outb(port, 0);
        }
    }
    say!("ports out done");

    let mut t = Tally::new("ports", "wide");
    // Wide reads of unclaimed ports, including ones that wrap past 0xffff.
    for port in [0x1234u16, 0xfffd, 0xfffe, 0xffff] {
        let v = inl(port);
        t.require(
            format_args!("IN eax from {port:#x} ({v:#x})"),
            v == u32::MAX,
        );
        let v = inw(port);
        t.require(format_args!("IN ax from {port:#x} ({v:#x})"), v == u16::MAX);
    }
    // REP INSB/OUTSB through an unclaimed port, forwards and backwards, longer than one of Keel's
    // string chunks (256 elements).
    let mut buf = [0u8; 600];
    let p = buf.as_mut_ptr();
    // SAFETY: writes 600 bytes of `buf` (forwards from p, then backwards from p + 599).
    unsafe {
        asm!("rep insb", in("dx") 0x1234u16, inout("rdi") p => _, inout("rcx") 600u64 => _,
             options(nostack));
    }
    t.require(format_args!("REP INSB"), buf.iter().all(|&b| b == 0xff));
    buf.fill(0);
    // SAFETY: as above; DF is cleared again before compiled code runs (the ABI requires it).
    unsafe {
        asm!("std", "rep insb", "cld", in("dx") 0x1234u16, inout("rdi") p.add(599) => _,
             inout("rcx") 600u64 => _, options(nostack));
    }
    t.require(
        format_args!("STD; REP INSB"),
        buf.iter().all(|&b| b == 0xff),
    );
    let left: u64;
    // SAFETY: reads 600 bytes of `buf`.
    unsafe {
        asm!("rep outsb", in("dx") 0x1234u16, inout("rsi") p => _, inout("rcx") 600u64 => left,
             options(nostack, readonly));
    }
    t.require(format_args!("REP OUTSB count left {left}"), left == 0);
    core::hint::black_box(&mut buf);
    t.finish()
}
