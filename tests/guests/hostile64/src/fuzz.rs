//! What the two fuzzers (fuzz64, fuzz32) share: the plan of seeds from the command line, the
//! filters for streams that run with full privilege, and the count of how seeds ended with its
//! `progress`/`done` lines (docs/SECURITY.md, "The fuzzers").

use crate::args;
use crate::rng::Rng;
use crate::text::Cursor;
use guest_common::console::{self, Line};
use guest_common::cpu;

const HC_CONSOLE_WRITE: usize = 1;
/// Seeds between two `progress` lines.
pub const PROGRESS_EVERY: u64 = 50;
/// The seeds' watchdog: the local APIC timer's vector.
pub const WATCHDOG: u8 = 0x40;

/// Prints one line through the CONSOLE_WRITE hypercall: a seed may have reprogrammed the UART.
pub fn report(args: core::fmt::Arguments) {
    let line = Line::new(args);
    let bytes = line.as_bytes();
    let _ = cpu::vmcall(HC_CONSOLE_WRITE, bytes.as_ptr() as usize, bytes.len());
}

/// `report!("seed {}", n)`: [`report`] with `format_args!`.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => { $crate::fuzz::report(format_args!($($arg)*)) };
}

/// Which seeds this life runs: `seed=<first>` (default 0), `seeds=<count>` (default 250),
/// `kernel=1`, `budget=<LAPIC ticks>` (default 5,000,000), and ` restart=<k>` from Keel: life k
/// runs `first + k * count ..first + (k + 1) * count`.
pub struct Plan {
    pub first: u64,
    pub end: u64,
    pub kernel: bool,
    pub budget: u32,
}

impl Plan {
    pub fn from_cmdline(cmdline: &[u8]) -> Self {
        let count = args::number(cmdline, b"seeds", 250);
        let first =
            args::number(cmdline, b"seed", 0) + args::number(cmdline, b"restart", 0) * count;
        Self {
            first,
            end: first + count,
            kernel: args::number(cmdline, b"kernel", 0) != 0,
            budget: args::number(cmdline, b"budget", 5_000_000).min(u64::from(u32::MAX)) as u32,
        }
    }
}

/// A register value for a seed: a pointer into its region (`base`, `size`), a small number, or
/// anything.
pub fn register_value(rng: &mut Rng, base: u64, size: u64) -> u64 {
    match rng.below(4) {
        0 | 1 => base + rng.below(size),
        2 => rng.below(256),
        _ => rng.next_u64(),
    }
}

const NOP: u8 = 0x90;

/// Streams that run with full privilege must not switch the watchdog off or end the guest on
/// purpose: CLI, POPF and IRET (IF), MOV to a control register (CR8 is the TPR; CR0 changes the
/// mode), LGDT/LIDT and VMCALL (group 7), OUT imm8 to the debug-exit ports 0xf4-0xf7.
pub fn filter_kernel(code: &mut [u8]) {
    for i in 0..code.len() {
        let next = code.get(i + 1).copied().unwrap_or(NOP);
        match (code[i], next) {
            (0xfa | 0x9d | 0xcf, _) | (0x0f, 0x22) | (0xe6 | 0xe7, 0xf4..=0xf7) => code[i] = NOP,
            (0x0f, 0x01) => {
                let modrm = code.get(i + 2).copied().unwrap_or(0);
                let reg = (modrm >> 3) & 7;
                if modrm == 0xc1 || (modrm >> 6 != 3 && (reg == 2 || reg == 3)) {
                    code[i] = NOP;
                }
            }
            _ => {}
        }
    }
}

/// Real mode has no protection at all, so on top of [`filter_kernel`] the segment registers stay
/// where the harness put them (its interrupt table and the way back to protected mode live in
/// the first 64 KiB): no POP/MOV/LDS/LES/LSS/LFS/LGS of a segment register, and no group 7.
pub fn filter_real(code: &mut [u8]) {
    filter_kernel(code);
    for i in 0..code.len() {
        let next = code.get(i + 1).copied().unwrap_or(NOP);
        match (code[i], next) {
            (0x07 | 0x17 | 0x1f | 0x8e | 0xc4 | 0xc5, _)
            | (0x0f, 0x01 | 0xa1 | 0xa9 | 0xb2 | 0xb4 | 0xb5) => code[i] = NOP,
            _ => {}
        }
    }
}

/// A fuzzer's progress through its plan, and how its seeds ended so far.
pub struct Run {
    pub plan: Plan,
    next: u64,
    outcomes: Outcomes,
}

impl Run {
    pub const fn new() -> Self {
        Self {
            plan: Plan {
                first: 0,
                end: 0,
                kernel: false,
                budget: 0,
            },
            next: 0,
            outcomes: Outcomes::new(),
        }
    }

    /// Names the guest's lines, reads the plan from the NUL-terminated command line at
    /// `cmdline` (the ELF entry convention) and prints `cmdline=<text> seeds <a>..<b> kernel=<k>`.
    ///
    /// # Safety
    /// `cmdline` is the command line Keel's ELF loader passed, not yet overwritten.
    pub unsafe fn start(&mut self, name: &'static str, cmdline: *const u8) {
        console::set_name(name);
        // SAFETY: per the contract above.
        let cmdline = unsafe { console::c_str(cmdline, 4096) };
        self.plan = Plan::from_cmdline(cmdline);
        self.next = self.plan.first;
        report(format_args!(
            "cmdline={} seeds {}..{} kernel={}",
            console::Printable(cmdline),
            self.plan.first,
            self.plan.end,
            self.plan.kernel
        ));
    }

    /// The seed that ran last ended with `vector`.
    pub fn ended(&mut self, vector: u8) {
        self.outcomes.count(vector);
    }

    /// The next seed and its PRNG, after a `progress` line every [`PROGRESS_EVERY`] seeds. After
    /// the last seed: the `done` line, and the guest exits with 0x30.
    pub fn next_seed(&mut self) -> (u64, Rng) {
        let first = self.plan.first;
        if self.next >= self.plan.end {
            self.outcomes.report("done", first);
            cpu::exit(crate::EXIT_OK)
        }
        let seed = self.next;
        self.next += 1;
        if seed != first && (seed - first).is_multiple_of(PROGRESS_EVERY) {
            self.outcomes.report("progress", first);
        }
        (seed, Rng::new(seed))
    }

    /// Picks the seed's mode: one of `user` user modes, or with `kernel=1` also the kernel mode
    /// (index `user`).
    pub fn mode_index(&self, rng: &mut Rng, user: u64) -> u64 {
        rng.below(if self.plan.kernel { user + 1 } else { user })
    }
}

impl Default for Run {
    fn default() -> Self {
        Self::new()
    }
}

/// What ended the seeds: an exception or interrupt vector, or the watchdog.
pub struct Outcomes {
    by_vector: [u32; 256],
    watchdog: u32,
}

/// Vectors named in the `progress`/`done` lines; the rest are counted as `other`.
const NAMED: [(usize, &str); 12] = [
    (0, "de"),
    (1, "db"),
    (3, "bp"),
    (5, "br"),
    (6, "ud"),
    (7, "nm"),
    (12, "ss"),
    (13, "gp"),
    (14, "pf"),
    (16, "mf"),
    (17, "ac"),
    (19, "xm"),
];

impl Outcomes {
    pub const fn new() -> Self {
        Self {
            by_vector: [0; 256],
            watchdog: 0,
        }
    }

    pub fn count(&mut self, vector: u8) {
        if vector == WATCHDOG {
            self.watchdog += 1;
        } else {
            self.by_vector[usize::from(vector)] += 1;
        }
    }

    /// `<what> seeds=<n> first=<first> <name>=<count>... watchdog=<n> other=<n>`.
    pub fn report(&self, what: &str, first: u64) {
        let named: u32 = NAMED.iter().map(|&(v, _)| self.by_vector[v]).sum();
        let all: u32 = self.by_vector.iter().sum::<u32>() + self.watchdog;
        let mut text = [0u8; 160];
        let mut w = Cursor::new(&mut text);
        for &(v, name) in NAMED.iter() {
            if self.by_vector[v] != 0 {
                let _ = core::fmt::write(&mut w, format_args!(" {}={}", name, self.by_vector[v]));
            }
        }
        report(format_args!(
            "{} seeds={} first={}{} watchdog={} other={}",
            what,
            all,
            first,
            w.as_str(),
            self.watchdog,
            all - named - self.watchdog
        ));
    }
}

impl Default for Outcomes {
    fn default() -> Self {
        Self::new()
    }
}
