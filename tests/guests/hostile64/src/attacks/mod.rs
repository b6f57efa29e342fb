//! The attacks, one module per kind, and the tally they report with.

mod apic;
mod cpu_state;
mod cpuidmsr;
mod debugregs;
mod events;
mod hypercalls;
mod interrupts;
mod memory;
mod mmio16;
mod moffs;
mod msr;
mod ports;
mod stringio;
mod tables;
mod tpr;
mod vmx;
mod x2apic;

use core::fmt;
use guest_common::{cpu, say, EXIT_FAILURE};
use hostile64::catch::Fault;
use hostile64::EXIT_OK;

/// CPUID(leaf, subleaf) as [EAX, EBX, ECX, EDX].
fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// An attack: gets the command line and the RAM size, never returns.
pub type Attack = fn(&[u8], u64) -> !;

/// `attack=NAME` -> the attack (docs/SECURITY.md describes each).
const ATTACKS: &[(&[u8], Attack)] = &[
    (b"vmx", vmx::run),
    (b"cr", cpu_state::control_registers),
    (b"msr", msr::run),
    (b"cpuidmsr", cpuidmsr::run),
    (b"xsetbv", cpu_state::xsetbv),
    (b"cache", cpu_state::cache),
    (b"sse", cpu_state::sse),
    (b"ports", ports::run),
    (b"stringio", stringio::run),
    (b"hltcli", interrupts::hlt_with_interrupts_off),
    (b"spin", interrupts::spin),
    (b"storm", interrupts::storm),
    (b"apic", apic::run),
    (b"moffs", moffs::run),
    (b"mmio16", mmio16::run),
    (b"idtmmio", tables::run),
    (b"hypercalls", hypercalls::run),
    (b"probe", memory::probe),
    (b"events", events::run),
    (b"debugregs", debugregs::run),
    (b"x2apic", x2apic::run),
    (b"tpr", tpr::run),
];

pub fn find(name: &[u8]) -> Option<Attack> {
    ATTACKS.iter().find(|(n, _)| *n == name).map(|&(_, a)| a)
}

/// Hypercall YIELD (docs/HYPERCALLS.md).
pub const HC_YIELD: usize = 2;

pub const UD: u8 = 6;
pub const GP: u8 = 13;

/// An expected outcome: an exception vector, or completing without one.
struct Outcome(Option<u8>);

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("no fault"),
            Some(UD) => f.write_str("#UD"),
            Some(GP) => f.write_str("#GP"),
            Some(v) => write!(f, "vector {v}"),
        }
    }
}

/// Counts the cases of one attack that had their documented outcome. Each case that did not is
/// printed as `hostile64: <attack>: <case> -> <got>, expected <outcome>`; [`Tally::finish`]
/// prints `hostile64: <attack> <label>=<good>/<total> ok|BAD` and exits.
pub struct Tally {
    attack: &'static str,
    label: &'static str,
    total: u32,
    good: u32,
}

impl Tally {
    pub fn new(attack: &'static str, label: &'static str) -> Self {
        Self {
            attack,
            label,
            total: 0,
            good: 0,
        }
    }

    /// One case: `got` is what the instruction raised, `expected` the vector it must raise
    /// (`None`: it must complete).
    pub fn expect(&mut self, case: fmt::Arguments, got: Option<Fault>, expected: Option<u8>) {
        self.check(case, got.map(|f| f.vector), expected)
    }

    fn check(&mut self, case: fmt::Arguments, got: Option<u8>, expected: Option<u8>) {
        self.total += 1;
        if got == expected {
            self.good += 1;
        } else {
            say!(
                "{}: {} -> {}, expected {}",
                self.attack,
                case,
                Outcome(got),
                Outcome(expected)
            );
        }
    }

    /// A case judged by the caller (a value read back, a count).
    pub fn require(&mut self, case: fmt::Arguments, ok: bool) {
        self.total += 1;
        if ok {
            self.good += 1;
        } else {
            say!("{}: {} is wrong", self.attack, case);
        }
    }

    /// Cases the caller counted (and reported as it saw fit).
    pub fn add_counted(&mut self, total: u32, good: u32) {
        self.total += total;
        self.good += good;
    }

    pub fn all_good(&self) -> bool {
        self.good == self.total
    }

    /// Prints `hostile64: <attack> <label>=<good>/<total> ok|BAD`; true if all were good.
    pub fn report(&self) -> bool {
        let ok = self.all_good();
        say!(
            "{} {}={}/{} {}",
            self.attack,
            self.label,
            self.good,
            self.total,
            if ok { "ok" } else { "BAD" }
        );
        ok
    }

    pub fn finish(self) -> ! {
        let ok = self.report();
        cpu::exit(if ok { EXIT_OK } else { EXIT_FAILURE })
    }
}
