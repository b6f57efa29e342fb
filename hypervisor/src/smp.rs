//! The host's processors: which ones Keel starts, in what order, and what it says about each.
//! This is the logic half, tested on the build host; `arch::smp` does the starting (INIT-SIPI-SIPI,
//! the real-mode trampoline, each CPU's tables and VMXON) and keeps the per-CPU state.
//!
//! Numbering: the boot CPU is cpu 0; the others (application processors, APs) get 1, 2, ... in
//! the order the firmware's MADT lists them. A CPU's number is Keel's, its APIC ID the hardware's.

use crate::firmware::madt::MadtCpu;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// The most CPUs Keel runs on (the boot CPU included). Each costs its tables, stacks and VMXON
/// region (about 310 KiB).
pub const MAX_CPUS: usize = 64;

/// The largest APIC ID Keel can reach: it drives its local APIC in xAPIC mode, whose ICR names a
/// destination with 8 bits, and 0xFF is the broadcast ID (SDM Vol. 3A 11.6.1).
pub const MAX_XAPIC_ID: u32 = 0xfe;

/// One CPU Keel runs on (or tries to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    pub index: u32,
    pub apic_id: u32,
}

impl fmt::Display for HostCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu {} (APIC {})", self.index, self.apic_id)
    }
}

/// Why a processor the MADT lists is not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftOut {
    /// Neither Enabled nor Online Capable.
    Disabled,
    /// Its APIC ID needs x2APIC mode.
    NeedsX2apic,
    /// The MADT lists its APIC ID twice.
    Duplicate,
    /// More than [`MAX_CPUS`].
    TooMany,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disabled => write!(f, "disabled in the MADT"),
            Self::NeedsX2apic => {
                write!(f, "its APIC ID needs x2APIC mode, which Keel does not use")
            }
            Self::Duplicate => write!(f, "listed twice in the MADT"),
            Self::TooMany => write!(f, "Keel runs on at most {MAX_CPUS} CPUs"),
        }
    }
}

/// What Keel will do with the processors of the MADT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub boot: HostCpu,
    /// The APs to start, numbered from 1.
    pub aps: Vec<HostCpu>,
    /// (APIC ID, why) for every listed processor Keel leaves out.
    pub left_out: Vec<(u32, LeftOut)>,
    /// Whether the MADT lists the boot CPU itself (it should; Keel runs on it regardless).
    pub boot_listed: bool,
}

/// Decides which processors to start: every usable one the MADT lists except the boot CPU
/// (`boot_apic_id`), up to `max_cpus` CPUs in all.
pub fn plan(cpus: &[MadtCpu], boot_apic_id: u32, max_cpus: usize) -> Plan {
    let mut p = Plan {
        boot: HostCpu {
            index: 0,
            apic_id: boot_apic_id,
        },
        aps: Vec::new(),
        left_out: Vec::new(),
        boot_listed: false,
    };
    let mut seen: Vec<u32> = Vec::new();
    for c in cpus {
        let why = if c.apic_id == boot_apic_id && !p.boot_listed {
            p.boot_listed = true;
            seen.push(c.apic_id);
            continue;
        } else if seen.contains(&c.apic_id) {
            LeftOut::Duplicate
        } else if !c.usable() {
            LeftOut::Disabled
        } else if c.apic_id > MAX_XAPIC_ID {
            LeftOut::NeedsX2apic
        } else if p.aps.len() + 1 >= max_cpus {
            LeftOut::TooMany
        } else {
            seen.push(c.apic_id);
            p.aps.push(HostCpu {
                index: p.aps.len() as u32 + 1,
                apic_id: c.apic_id,
            });
            continue;
        };
        p.left_out.push((c.apic_id, why));
    }
    p
}

/// How an AP's bring-up ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// In VMX root operation; `revision` is its VMCS revision identifier (IA32_VMX_BASIC[30:0]).
    VmxOn { revision: u32 },
    /// It runs Keel, but its VT-x set-up failed: it is left out.
    VmxFailed(String),
    /// It never reported back after INIT-SIPI-SIPI (and was sent INIT again to park it).
    NoAnswer,
    /// Keel could not prepare it (no memory for its stacks or tables).
    NotStarted(&'static str),
}

/// The one console line Keel prints per AP.
pub fn report_line(cpu: &HostCpu, outcome: &Outcome) -> String {
    match outcome {
        Outcome::VmxOn { revision } => alloc::format!("{cpu}: VMX on, revision {revision:#x}"),
        Outcome::VmxFailed(why) => alloc::format!("{cpu}: VT-x setup failed: {why}"),
        Outcome::NoAnswer => {
            alloc::format!("{cpu}: did not answer INIT-SIPI-SIPI; left out")
        }
        Outcome::NotStarted(why) => alloc::format!("{cpu}: not started: {why}"),
    }
}

/// Why the VT-x set-up of CPU `index` must fail on purpose (the manifest's `fail_vmx_on_cpu`),
/// if it must.
pub fn simulated_failure(index: u32, fail_vmx_on_cpu: Option<u32>) -> Option<String> {
    (fail_vmx_on_cpu == Some(index))
        .then(|| alloc::format!("simulated by the manifest (fail_vmx_on_cpu = {index})"))
}

/// A flat 4 GiB segment descriptor (G = 1, limit 0xFFFFF) with `base`, access byte `access` and
/// flags nibble `flags` (SDM Vol. 3A 3.4.5), for the AP start-up trampoline's temporary GDT.
pub const fn flat_segment(base: u32, access: u8, flags: u8) -> u64 {
    let base = base as u64;
    0xffff
        | (base & 0xff_ffff) << 16
        | (access as u64) << 40
        | 0xf << 48
        | (flags as u64) << 52
        | (base >> 24) << 56
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(apic_id: u32, enabled: bool, online_capable: bool) -> MadtCpu {
        MadtCpu {
            apic_id,
            uid: apic_id,
            enabled,
            online_capable,
            x2apic: apic_id > 0xfe,
        }
    }

    fn cpu(index: u32, apic_id: u32) -> HostCpu {
        HostCpu { index, apic_id }
    }

    #[test]
    fn four_cpus_boot_first() {
        let madt: Vec<_> = (0..4).map(|i| listed(i, true, false)).collect();
        let p = plan(&madt, 0, MAX_CPUS);
        assert_eq!(p.boot, cpu(0, 0));
        assert!(p.boot_listed);
        assert_eq!(p.aps, [cpu(1, 1), cpu(2, 2), cpu(3, 3)]);
        assert!(p.left_out.is_empty());
    }

    /// The boot CPU need not be APIC 0 nor listed first; the APs keep the MADT's order.
    #[test]
    fn boot_cpu_anywhere() {
        let madt = [
            listed(4, true, false),
            listed(2, true, false),
            listed(6, true, false),
        ];
        let p = plan(&madt, 2, MAX_CPUS);
        assert_eq!(p.boot, cpu(0, 2));
        assert_eq!(p.aps, [cpu(1, 4), cpu(2, 6)]);
        let p = plan(&madt, 9, MAX_CPUS);
        assert!(!p.boot_listed);
        assert_eq!(p.aps, [cpu(1, 4), cpu(2, 2), cpu(3, 6)]);
    }

    #[test]
    fn what_is_left_out() {
        let madt = [
            listed(0, true, false),
            listed(1, false, false),
            listed(2, false, true),
            listed(2, true, false),
            listed(0, true, false),
            listed(0xff, true, false),
            listed(300, true, false),
            listed(5, true, false),
            listed(6, true, false),
        ];
        let p = plan(&madt, 0, 3);
        assert_eq!(p.aps, [cpu(1, 2), cpu(2, 5)]);
        assert_eq!(
            p.left_out,
            [
                (1, LeftOut::Disabled),
                (2, LeftOut::Duplicate),
                (0, LeftOut::Duplicate),
                (0xff, LeftOut::NeedsX2apic),
                (300, LeftOut::NeedsX2apic),
                (6, LeftOut::TooMany),
            ]
        );
        // A single-CPU limit starts no AP.
        assert_eq!(plan(&madt, 0, 1).aps, []);
    }

    #[test]
    fn report_lines() {
        let c = cpu(2, 4);
        assert_eq!(
            report_line(&c, &Outcome::VmxOn { revision: 0x4 }),
            "cpu 2 (APIC 4): VMX on, revision 0x4"
        );
        assert_eq!(
            report_line(
                &c,
                &Outcome::VmxFailed("simulated by the manifest (fail_vmx_on_cpu = 2)".into())
            ),
            "cpu 2 (APIC 4): VT-x setup failed: simulated by the manifest (fail_vmx_on_cpu = 2)"
        );
        assert_eq!(
            report_line(&c, &Outcome::NoAnswer),
            "cpu 2 (APIC 4): did not answer INIT-SIPI-SIPI; left out"
        );
        assert_eq!(
            report_line(&c, &Outcome::NotStarted("no memory for its stacks")),
            "cpu 2 (APIC 4): not started: no memory for its stacks"
        );
        assert_eq!(
            LeftOut::NeedsX2apic.to_string(),
            "its APIC ID needs x2APIC mode, which Keel does not use"
        );
    }

    #[test]
    fn trampoline_descriptors() {
        // 64-bit code (L = 1, G = 1), base 0: the usual long-mode code descriptor.
        assert_eq!(flat_segment(0, 0x9a, 0xa), 0x00af_9a00_0000_ffff);
        // 32-bit code and data (D/B = 1, G = 1) based at a trampoline page.
        assert_eq!(flat_segment(0x8000, 0x9a, 0xc), 0x00cf_9a00_8000_ffff);
        assert_eq!(flat_segment(0x9_f000, 0x92, 0xc), 0x00cf_9209_f000_ffff);
        assert_eq!(flat_segment(0x1234_5678, 0x92, 0xc), 0x12cf_9234_5678_ffff);
    }

    #[test]
    fn the_failure_switch_names_one_cpu() {
        assert_eq!(simulated_failure(1, Some(2)), None);
        assert_eq!(simulated_failure(2, None), None);
        assert_eq!(
            simulated_failure(2, Some(2)).as_deref(),
            Some("simulated by the manifest (fail_vmx_on_cpu = 2)")
        );
    }
}
