//! CPUID: what a guest learns about "its" processor.
//!
//! Policy: the real CPU's answers, minus what Keel does not virtualize (VMX, SMX, MONITOR/MWAIT,
//! x2APIC, performance monitoring, thermal and power management), plus the hypervisor-present bit
//! and Keel's own leaves at 0x4000_0000, with a topology of one thread on one core so that every
//! leaf that describes the package agrees. docs/GUESTS.md lists the same table.

use super::{Action, ExitContext, Host};
use crate::abi;
use crate::vmx::Vmcs;

pub mod bit {
    pub const ECX1_MONITOR: u32 = 1 << 3;
    pub const ECX1_DS_CPL: u32 = 1 << 4;
    pub const ECX1_VMX: u32 = 1 << 5;
    pub const ECX1_SMX: u32 = 1 << 6;
    pub const ECX1_EIST: u32 = 1 << 7;
    pub const ECX1_TM2: u32 = 1 << 8;
    pub const ECX1_PDCM: u32 = 1 << 15;
    pub const ECX1_X2APIC: u32 = 1 << 21;
    pub const ECX1_OSXSAVE: u32 = 1 << 27;
    pub const ECX1_HYPERVISOR: u32 = 1 << 31;
    pub const ECX7_OSPKE: u32 = 1 << 4;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const CR4_PKE: u64 = 1 << 22;
    pub const EDX1_DS: u32 = 1 << 21;
    pub const EDX1_ACPI: u32 = 1 << 22;
    pub const EDX1_HTT: u32 = 1 << 28;
    pub const EDX1_TM: u32 = 1 << 29;
    pub const EDX1_PBE: u32 = 1 << 31;
    pub const ECX7_WAITPKG: u32 = 1 << 5;
    pub const EBX7_SGX: u32 = 1 << 2;
}

/// The answer the guest gets for CPUID(leaf, subleaf).
#[inline]
pub fn policy(host: &dyn Host, leaf: u32, subleaf: u32, guest_cr4: u64) -> [u32; 4] {
    use bit::*;
    match leaf {
        abi::CPUID_SIGNATURE_LEAF => {
            let s = abi::SIGNATURE;
            let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            [abi::CPUID_MAX_LEAF, w(0), w(4), w(8)]
        }
        abi::CPUID_INTERFACE_LEAF => [abi::ABI_VERSION, 0, 0, 0],
        0x4000_0002..=0x4000_00ff => [0; 4],
        1 => {
            let [a, b, c, d] = host.cpuid(1, 0);
            let c = (c & !(ECX1_MONITOR
                | ECX1_DS_CPL
                | ECX1_VMX
                | ECX1_SMX
                | ECX1_EIST
                | ECX1_TM2
                | ECX1_PDCM
                | ECX1_X2APIC
                | ECX1_OSXSAVE))
                | ECX1_HYPERVISOR;
            // OSXSAVE mirrors the guest's own CR4.OSXSAVE, not Keel's (SDM Vol. 2A, CPUID).
            let c = if guest_cr4 & CR4_OSXSAVE != 0 {
                c | ECX1_OSXSAVE
            } else {
                c
            };
            let d = d & !(EDX1_DS | EDX1_ACPI | EDX1_HTT | EDX1_TM | EDX1_PBE);
            // EBX: initial APIC ID 0 (bits 31:24), one logical processor (23:16), CLFLUSH size kept.
            let b = (b & 0xffff) | (1 << 16);
            [a, b, c, d]
        }
        4 => {
            // Deterministic cache parameters: keep the cache, report one core and one thread.
            let [a, b, c, d] = host.cpuid(4, subleaf);
            [a & 0x3fff, b, c, d]
        }
        // Thermal/power management and MONITOR/MWAIT details: not virtualized.
        5 | 6 => [0; 4],
        7 => {
            let [a, b, c, d] = host.cpuid(7, subleaf);
            if subleaf == 0 {
                // OSPKE mirrors the guest's CR4.PKE.
                let ospke = if guest_cr4 & CR4_PKE != 0 {
                    c & ECX7_OSPKE
                } else {
                    0
                };
                [
                    a,
                    b & !EBX7_SGX,
                    (c & !(ECX7_WAITPKG | ECX7_OSPKE)) | ospke,
                    d,
                ]
            } else {
                [a, b, c, d]
            }
        }
        // Architectural performance monitoring: no virtual PMU.
        0xa => [0; 4],
        // Extended topology: one thread (level 1, SMT) in one core (level 2), x2APIC ID 0.
        0xb | 0x1f => match subleaf {
            0 => [0, 1, 1 << 8, 0],
            1 => [0, 1, 1 | (2 << 8), 0],
            n => [0, 0, n & 0xff, 0],
        },
        _ => host.cpuid(leaf, subleaf),
    }
}

#[inline]
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    let leaf = cx.guest.regs.rax as u32;
    let subleaf = cx.guest.regs.rcx as u32;
    let cr4 = super::cr::live_cr4(cx.vmcs, cx.guest);
    let [a, b, c, d] = policy(cx.host, leaf, subleaf, cr4);
    let r = &mut cx.guest.regs;
    // CPUID writes the low 32 bits and clears the upper halves in 64-bit mode.
    r.rax = a as u64;
    r.rbx = b as u64;
    r.rcx = c as u64;
    r.rdx = d as u64;
    Action::Advance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::*;

    #[test]
    fn signature_and_bits() {
        let mut t = TestBed::new();
        t.guest.regs.rax = 0x4000_0000;
        assert_eq!(t.run(crate::vmx::ExitReason::Cpuid), Action::Advance);
        let r = t.guest.regs;
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&(r.rbx as u32).to_le_bytes());
        sig[4..8].copy_from_slice(&(r.rcx as u32).to_le_bytes());
        sig[8..].copy_from_slice(&(r.rdx as u32).to_le_bytes());
        assert_eq!(&sig, b"KeelKeelKeel");
        assert_eq!(r.rax, 0x4000_0001);

        t.guest.regs.rax = 1;
        t.run(crate::vmx::ExitReason::Cpuid);
        let c = t.guest.regs.rcx as u32;
        assert_ne!(c & bit::ECX1_HYPERVISOR, 0, "hypervisor bit set");
        assert_eq!(c & bit::ECX1_VMX, 0, "VMX hidden");
        assert_eq!(c & bit::ECX1_X2APIC, 0);
        assert_eq!((t.guest.regs.rbx >> 16) & 0xff, 1, "one logical processor");
        assert_eq!(t.guest.regs.rdx as u32 & bit::EDX1_HTT, 0);
    }

    #[test]
    fn osxsave_follows_the_guests_cr4() {
        let t = TestBed::new();
        // The fake CPU reports OSXSAVE, as the real one does for Keel (which sets CR4.OSXSAVE).
        assert_ne!(t.host.cpuid(1, 0)[2] & bit::ECX1_OSXSAVE, 0);
        assert_eq!(policy(&t.host, 1, 0, 0)[2] & bit::ECX1_OSXSAVE, 0);
        assert_ne!(
            policy(&t.host, 1, 0, bit::CR4_OSXSAVE)[2] & bit::ECX1_OSXSAVE,
            0
        );
    }

    #[test]
    fn topology_is_one_thread() {
        let t = TestBed::new();
        assert_eq!(policy(&t.host, 0xb, 0, 0)[1], 1);
        assert_eq!(policy(&t.host, 0xb, 1, 0)[1], 1);
        assert_eq!(
            policy(&t.host, 0xb, 2, 0)[2] >> 8 & 0xff,
            0,
            "level 2 is invalid"
        );
        assert_eq!(
            policy(&t.host, 4, 0, 0)[0] >> 14,
            0,
            "no sibling threads or cores"
        );
        assert_eq!(policy(&t.host, 0x4000_0005, 0, 0), [0; 4]);
        // Everything else comes from the CPU.
        assert_eq!(
            policy(&t.host, 0x8000_0000, 0, 0),
            t.host.cpuid(0x8000_0000, 0)
        );
    }
}
