//! `mode=balloon secs=N`: a cooperating guest for Keel's ballooning (docs/HYPERCALLS.md, "Giving
//! memory back").
//!
//! The upper half of its RAM is its balloon: pages it can do without. It fills its RAM from a
//! quarter up with a pattern (each 8-byte word holds its own address, mixed), then every 100 ms of
//! its own time (PIT ticks, halting between them) asks Keel for the balloon target
//! (BALLOON_TARGET) and gives pages from the top of its RAM down (BALLOON_GIVE, at most
//! `BALLOON_MAX_PAGES` a call) or takes them back from the bottom of the balloon up
//! (BALLOON_TAKE), checking that a page taken back reads as zeros. After each change it prints
//!
//! ```text
//! balloon: gave 2048 pages (8192 KiB) in 4 calls, 123456 TSC cycles: 2048 given, target 2048
//! balloon: 12288 KiB intact
//! ```
//!
//! the second line after checking every word of the pattern it still has. It ends with
//! [`EXIT_BALLOON`] after `secs` seconds, or [`guest_common::EXIT_FAILURE`] if a call fails or a
//! word changed.

use crate::timeshare;
use core::sync::atomic::Ordering;
use guest_common::abi::{
    BALLOON_MAX_PAGES, HC_BALLOON_GIVE, HC_BALLOON_GIVEN, HC_BALLOON_TAKE, HC_BALLOON_TARGET,
};
use guest_common::trap::PIT_TICKS;
use guest_common::{console, cpu, pic, say, EXIT_FAILURE};

pub const EXIT_BALLOON: u8 = 0x28;
const PAGE: usize = 4096;
/// Ticks of the 100 Hz PIT between two looks at the target.
const POLL_TICKS: u32 = 10;

/// The pattern word at `addr`.
fn pattern(addr: usize) -> u64 {
    (addr as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6261_6c6c_6f6f_6e21
}

/// The guest's view of its balloon: RAM `ram` bytes long, pages from `ram / 2` up may be given,
/// `given` pages at the top are.
struct Balloon {
    ram: usize,
    given: usize,
}

impl Balloon {
    /// Pages the balloon can hold.
    fn capacity(&self) -> usize {
        self.ram / 2 / PAGE
    }

    /// The first byte of the pages the guest still has in its balloon half (given pages are
    /// [top, ram)).
    fn top(&self) -> usize {
        self.ram - self.given * PAGE
    }

    /// Checks the pattern from `ram / 4` to the given pages: the words the guest still has.
    fn check(&self) -> usize {
        let (from, to) = (self.ram / 4, self.top());
        for addr in (from..to).step_by(8) {
            // SAFETY: guest RAM the guest has (below its given pages), identity-mapped; no Rust
            // object lives there (the image and stack are below RAM / 4).
            let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
            if v != pattern(addr) {
                say!("balloon: word at {:#x} is {:#x}, expected {:#x}", addr, v, pattern(addr));
                cpu::exit(EXIT_FAILURE)
            }
        }
        to - from
    }

    fn fill(from: usize, to: usize) {
        for addr in (from..to).step_by(8) {
            // SAFETY: as in `check`.
            unsafe { core::ptr::write_volatile(addr as *mut u64, pattern(addr)) };
        }
    }

    /// Gives or takes pages until `target` (capped to the balloon's size) are given; returns
    /// (pages moved, calls made).
    fn reach(&mut self, target: usize) -> (usize, usize) {
        let target = target.min(self.capacity());
        let (mut moved, mut calls) = (0, 0);
        while self.given < target {
            let n = (target - self.given).min(BALLOON_MAX_PAGES);
            let at = self.top() - n * PAGE;
            call(HC_BALLOON_GIVE, at, n);
            self.given += n;
            moved += n;
            calls += 1;
        }
        while self.given > target {
            let n = (self.given - target).min(BALLOON_MAX_PAGES);
            let at = self.top();
            call(HC_BALLOON_TAKE, at, n);
            for addr in (at..at + n * PAGE).step_by(8) {
                // SAFETY: pages the guest just took back: RAM it has again.
                let v = unsafe { core::ptr::read_volatile(addr as *const u64) };
                if v != 0 {
                    say!("balloon: taken-back word at {:#x} is {:#x}, not 0", addr, v);
                    cpu::exit(EXIT_FAILURE)
                }
            }
            Self::fill(at, at + n * PAGE);
            self.given -= n;
            moved += n;
            calls += 1;
        }
        (moved, calls)
    }
}

/// A balloon hypercall that must succeed.
fn call(nr: usize, gpa: usize, pages: usize) {
    match cpu::vmcall(nr, gpa, pages) {
        Ok(0) => {}
        Ok(e) => {
            say!("balloon: call {} at {:#x} x{} failed: {}", nr, gpa, pages, e as isize);
            cpu::exit(EXIT_FAILURE)
        }
        Err(_) => {
            say!("balloon: no hypervisor");
            cpu::exit(EXIT_FAILURE)
        }
    }
}

fn query(nr: usize) -> usize {
    cpu::vmcall(nr, 0, 0).unwrap_or(0)
}

pub fn run(ram_size: u64, secs: u64) -> ! {
    console::set_name("balloon");
    if ram_size < 16 << 20 {
        // The pattern starts at RAM / 4, which must lie above the image (at 2 MiB) and stack.
        say!("needs at least 16 MiB of RAM, has {} KiB", ram_size >> 10);
        cpu::exit(EXIT_FAILURE)
    }
    let mut b = Balloon {
        ram: ram_size as usize & !(PAGE - 1),
        given: query(HC_BALLOON_GIVEN),
    };
    Balloon::fill(b.ram / 4, b.top());
    say!(
        "{} KiB of RAM, balloon up to {} pages",
        b.ram >> 10,
        b.capacity()
    );
    let hz = timeshare::start_clock();
    PIT_TICKS.store(0, Ordering::SeqCst);
    let t0 = cpu::rdtsc();
    let mut next_poll = POLL_TICKS;
    loop {
        cpu::wait_for_interrupt();
        let elapsed = cpu::rdtsc().wrapping_sub(t0);
        if elapsed >= secs * hz {
            break;
        }
        if PIT_TICKS.load(Ordering::SeqCst) < next_poll {
            continue;
        }
        next_poll += POLL_TICKS;
        let target = query(HC_BALLOON_TARGET);
        if target.min(b.capacity()) == b.given {
            continue;
        }
        let before = b.given;
        let t = cpu::rdtsc();
        let (moved, calls) = b.reach(target);
        let cycles = cpu::rdtsc().wrapping_sub(t);
        say!(
            "{} {} pages ({} KiB) in {} calls, {} TSC cycles: {} given, target {}",
            if b.given > before { "gave" } else { "took back" },
            moved,
            moved * PAGE / 1024,
            calls,
            cycles,
            b.given,
            target
        );
        if query(HC_BALLOON_GIVEN) != b.given {
            say!("Keel counts {} pages given", query(HC_BALLOON_GIVEN));
            cpu::exit(EXIT_FAILURE)
        }
        say!("{} KiB intact", b.check() / 1024);
    }
    pic::mask_all();
    say!("done: {} pages given, {} KiB intact", b.given, b.check() / 1024);
    cpu::exit(EXIT_BALLOON)
}

/// `mode=balloon-touch`: the hypercalls' answers at their edges, then the defined outcome of
/// touching a page given back. Gives the top page of its RAM, checks that giving it again is
/// EFAULT and taking a page it has is EEXIST, takes it back (zeros), gives it again and reads it:
/// Keel must stop the guest there (docs/HYPERCALLS.md). Reaching the next line is a failure.
pub fn touch(ram_size: u64) -> ! {
    use guest_common::abi::{EEXIST, EFAULT, EINVAL};
    console::set_name("balloon");
    let top = (ram_size as usize & !(PAGE - 1)) - PAGE;
    let expect = |what: &str, nr, gpa, pages, want: usize| {
        let got = cpu::vmcall(nr, gpa, pages).unwrap_or(usize::MAX);
        if got != want {
            say!("{}: {:#x}, expected {:#x}", what, got, want);
            cpu::exit(EXIT_FAILURE)
        }
    };
    // SAFETY: the top page of the guest's RAM, identity-mapped, holding no Rust object.
    unsafe { core::ptr::write_volatile(top as *mut u64, 0x5eed) };
    expect("give unaligned", HC_BALLOON_GIVE, top + 8, 1, EINVAL);
    expect("give past RAM", HC_BALLOON_GIVE, top, 2, EINVAL);
    expect("give", HC_BALLOON_GIVE, top, 1, 0);
    expect("given", HC_BALLOON_GIVEN, 0, 0, 1);
    expect("give again", HC_BALLOON_GIVE, top, 1, EFAULT);
    expect("take one it has", HC_BALLOON_TAKE, top - PAGE, 2, EEXIST);
    expect("take", HC_BALLOON_TAKE, top, 1, 0);
    // SAFETY: taken back: RAM the guest has again.
    let v = unsafe { core::ptr::read_volatile(top as *const u64) };
    if v != 0 {
        say!("a page taken back reads {:#x}, not 0", v);
        cpu::exit(EXIT_FAILURE)
    }
    expect("give", HC_BALLOON_GIVE, top, 1, 0);
    say!("checks passed; reading the page it gave back at {:#x}", top);
    // SAFETY: deliberately reads a page the guest gave away: Keel is expected to stop it.
    let v = unsafe { core::ptr::read_volatile(top as *const u64) };
    say!("read a page it gave back ({:#x}) and was not stopped", v);
    cpu::exit(EXIT_FAILURE)
}
