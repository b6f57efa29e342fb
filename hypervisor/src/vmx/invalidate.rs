//! Which cached translations Keel must invalidate, and when: the decisions behind INVEPT and
//! INVVPID, as plain values the hardware layer (`arch::vmx::invalidate`) executes and tests check.
//!
//! The processor caches guest-physical mappings tagged by EPTP and linear/combined mappings tagged
//! by VPID (SDM 29.4.1). Those tags outlive a guest: a restarted guest gets its old VPID back, and
//! a new guest's EPT root may be a frame a destroyed guest's EPT used, so stale translations could
//! reach memory the guest no longer owns. Hence:
//! - at VMXON: all-context INVEPT and INVVPID, in case firmware or a previous VMM left mappings
//!   tagged with tags Keel will reuse (SDM 29.4.3.3 for the guidance on reusing VPIDs, 29.4.3.1
//!   for EPTPs);
//! - when a guest (re)boots: single-context INVEPT for its EPTP and single-context INVVPID for its
//!   VPID;
//! - when a live EPT loses or changes entries: single-context INVEPT (SDM 29.4.3.1).
//!
//! Only the types IA32_VMX_EPT_VPID_CAP reports are used (SDM A.10); a type the processor lacks is
//! replaced by the wider all-context type when that exists, since an unsupported type makes the
//! instruction fail with "invalid operand to INVEPT/INVVPID" (SDM 31.3).

use super::caps::{EptVpidCap, VmxCaps};
use alloc::vec::Vec;
use core::fmt;

/// The INVEPT type operand (SDM 31.3, "INVEPT": 1 single-context, 2 all-context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum InveptType {
    SingleContext = 1,
    AllContext = 2,
}

/// The INVVPID type operand (SDM 31.3, "INVVPID": 0 individual-address, 1 single-context,
/// 2 all-context, 3 single-context retaining globals). Keel uses the two it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum InvvpidType {
    SingleContext = 1,
    AllContext = 2,
}

/// One invalidation to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// INVEPT; `eptp` is only looked at for the single-context type.
    Ept { kind: InveptType, eptp: u64 },
    /// INVVPID; `vpid` is only looked at for the single-context type.
    Vpid { kind: InvvpidType, vpid: u16 },
}

impl Invalidation {
    /// The type operand (a 64-bit register).
    pub fn kind(&self) -> u64 {
        match *self {
            Self::Ept { kind, .. } => kind as u64,
            Self::Vpid { kind, .. } => kind as u64,
        }
    }

    /// The 128-bit memory descriptor, low quadword first.
    /// SDM 31.3 "INVEPT": bits 63:0 the EPTP, bits 127:64 reserved (0).
    /// SDM 31.3 "INVVPID": bits 15:0 the VPID, bits 63:16 reserved (0), bits 127:64 the linear
    /// address (used by the individual-address type only, so 0 here).
    pub fn descriptor(&self) -> [u64; 2] {
        match *self {
            Self::Ept { eptp, .. } => [eptp, 0],
            Self::Vpid { vpid, .. } => [u64::from(vpid), 0],
        }
    }
}

impl fmt::Display for Invalidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Ept {
                kind: InveptType::SingleContext,
                eptp,
            } => write!(f, "INVEPT single-context EPTP {eptp:#x}"),
            Self::Ept {
                kind: InveptType::AllContext,
                ..
            } => f.write_str("INVEPT all-context"),
            Self::Vpid {
                kind: InvvpidType::SingleContext,
                vpid,
            } => write!(f, "INVVPID single-context VPID {vpid}"),
            Self::Vpid {
                kind: InvvpidType::AllContext,
                ..
            } => f.write_str("INVVPID all-context"),
        }
    }
}

/// The VPID of guest `id`: 1..=0xffff (VPID 0 is Keel's own, SDM 27.2.1.1). Past 65535 guests
/// VPIDs repeat, which is safe because every boot invalidates its VPID first.
pub fn guest_vpid(id: u32) -> u16 {
    (id % 0xffff) as u16 + 1
}

/// The VPID of vCPU `index` of guest `id`: each vCPU its own, because the vCPUs of one guest run
/// different address spaces on the same CPU and a shared tag would let one use the other's cached
/// translations (SDM 29.1). Guest `id`'s vCPUs take the VPIDs after guest `id - 1`'s
/// (`crate::manifest::MAX_VCPUS` each); like [`guest_vpid`], they repeat after 65535, safe
/// because every boot invalidates its VPIDs first.
pub fn vcpu_vpid(id: u32, index: usize) -> u16 {
    let n = u64::from(id) * u64::from(crate::manifest::MAX_VCPUS) + index as u64;
    (n % 0xffff) as u16 + 1
}

/// What this processor can invalidate and whether Keel's guests run with VPIDs, from the
/// capability MSRs and the secondary controls Keel chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushPolicy {
    caps: EptVpidCap,
    ept: bool,
    vpid: bool,
}

impl FlushPolicy {
    /// `ept_enabled`/`vpid_enabled`: whether the guests' secondary controls have "enable EPT" and
    /// "enable VPID". INVEPT and INVVPID exist only when the capability MSR says so (SDM A.10
    /// bits 20 and 32).
    pub fn new(caps: &VmxCaps, ept_enabled: bool, vpid_enabled: bool) -> Self {
        let c = caps.ept_vpid();
        Self {
            caps: c,
            ept: ept_enabled && c.contains(EptVpidCap::INVEPT),
            vpid: vpid_enabled && c.contains(EptVpidCap::INVVPID),
        }
    }

    /// Right after VMXON, before any guest runs: every EPT- and VPID-tagged mapping goes. Uses
    /// only the all-context types (there is no context to name yet); whatever the processor lacks
    /// is left to the single-context invalidations each guest gets at boot. INVEPT and INVVPID
    /// exist whenever the processor reports them, whether or not Keel's guests use VPIDs.
    pub fn at_vmxon(caps: &VmxCaps) -> Vec<Invalidation> {
        let c = caps.ept_vpid();
        let mut out = Vec::new();
        if c.contains(EptVpidCap::INVEPT | EptVpidCap::INVEPT_ALL_CONTEXT) {
            out.push(Invalidation::Ept {
                kind: InveptType::AllContext,
                eptp: 0,
            });
        }
        if c.contains(EptVpidCap::INVVPID | EptVpidCap::INVVPID_ALL_CONTEXT) {
            out.push(Invalidation::Vpid {
                kind: InvvpidType::AllContext,
                vpid: 0,
            });
        }
        out
    }

    /// After the EPT whose pointer is `eptp` was built or lost entries: single-context when the
    /// processor has it, else all-context.
    pub fn for_ept(&self, eptp: u64) -> Option<Invalidation> {
        let ept = |kind, eptp| Invalidation::Ept { kind, eptp };
        self.narrowest(
            self.ept,
            [
                EptVpidCap::INVEPT_SINGLE_CONTEXT,
                EptVpidCap::INVEPT_ALL_CONTEXT,
            ],
            [
                ept(InveptType::SingleContext, eptp),
                ept(InveptType::AllContext, 0),
            ],
        )
    }

    /// Before a guest with `vpid` runs from a fresh start: nothing it cached under that VPID in a
    /// previous life (or another guest did) may survive. VPID 0 is Keel's own and never a guest's
    /// (SDM 27.2.1.1: "enable VPID" requires a nonzero VPID; single-context INVVPID of 0 fails).
    pub fn for_vpid(&self, vpid: u16) -> Option<Invalidation> {
        let inv = |kind, vpid| Invalidation::Vpid { kind, vpid };
        self.narrowest(
            self.vpid && vpid != 0,
            [
                EptVpidCap::INVVPID_SINGLE_CONTEXT,
                EptVpidCap::INVVPID_ALL_CONTEXT,
            ],
            [
                inv(InvvpidType::SingleContext, vpid),
                inv(InvvpidType::AllContext, 0),
            ],
        )
    }

    /// The first of `[single, all]` whose type the processor reports, if `wanted`.
    fn narrowest(
        &self,
        wanted: bool,
        types: [EptVpidCap; 2],
        invalidations: [Invalidation; 2],
    ) -> Option<Invalidation> {
        if !wanted {
            return None;
        }
        types
            .into_iter()
            .zip(invalidations)
            .find(|(t, _)| self.caps.contains(*t))
            .map(|(_, inv)| inv)
    }

    /// When a guest (re)boots with `eptp` and `vpid`.
    pub fn at_guest_boot(&self, eptp: u64, vpid: u16) -> Vec<Invalidation> {
        self.for_ept(eptp)
            .into_iter()
            .chain(self.for_vpid(vpid))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vcpu_has_its_own_vpid_and_none_is_keels() {
        let mut seen = alloc::collections::BTreeSet::new();
        for id in 0..8 {
            for c in 0..usize::from(crate::manifest::MAX_VCPUS) {
                let v = vcpu_vpid(id, c);
                assert_ne!(v, 0, "VPID 0 is Keel's");
                assert!(seen.insert(v), "guest {id} vCPU {c} repeats VPID {v}");
            }
        }
        assert_ne!(vcpu_vpid(u32::MAX, 15), 0);
    }
    use alloc::string::ToString;
    use alloc::vec;

    const EPTP: u64 = 0x1234_5000 | (3 << 3) | 6;
    const ALL_CONTEXT: [Invalidation; 2] = [
        Invalidation::Ept {
            kind: InveptType::AllContext,
            eptp: 0,
        },
        Invalidation::Vpid {
            kind: InvvpidType::AllContext,
            vpid: 0,
        },
    ];

    fn caps_with(bits: EptVpidCap) -> VmxCaps {
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.ept_vpid_cap = bits.bits();
        caps
    }

    #[test]
    fn bochs_gets_single_context_at_boot_and_all_context_at_vmxon() {
        let caps = VmxCaps::bochs_skylake_x();
        assert_eq!(FlushPolicy::at_vmxon(&caps), ALL_CONTEXT.to_vec());
        let p = FlushPolicy::new(&caps, true, true);
        assert_eq!(
            p.at_guest_boot(EPTP, 4),
            vec![
                Invalidation::Ept {
                    kind: InveptType::SingleContext,
                    eptp: EPTP
                },
                Invalidation::Vpid {
                    kind: InvvpidType::SingleContext,
                    vpid: 4
                },
            ]
        );
    }

    #[test]
    fn only_reported_types_are_used() {
        let base = EptVpidCap::INVEPT | EptVpidCap::INVVPID;
        // All-context only: boots fall back to it.
        let p = FlushPolicy::new(
            &caps_with(base | EptVpidCap::INVEPT_ALL_CONTEXT | EptVpidCap::INVVPID_ALL_CONTEXT),
            true,
            true,
        );
        assert_eq!(p.at_guest_boot(EPTP, 2), ALL_CONTEXT.to_vec());
        // Single-context only: nothing to do at VMXON, single-context at boot.
        let caps = caps_with(
            base | EptVpidCap::INVEPT_SINGLE_CONTEXT | EptVpidCap::INVVPID_SINGLE_CONTEXT,
        );
        assert_eq!(FlushPolicy::at_vmxon(&caps), vec![]);
        let p = FlushPolicy::new(&caps, true, true);
        assert_eq!(p.at_guest_boot(EPTP, 2).len(), 2);
        // The instructions themselves missing (bits 20 and 32): never executed.
        let caps = caps_with(
            EptVpidCap::INVEPT_SINGLE_CONTEXT
                | EptVpidCap::INVEPT_ALL_CONTEXT
                | EptVpidCap::INVVPID_SINGLE_CONTEXT
                | EptVpidCap::INVVPID_ALL_CONTEXT,
        );
        assert_eq!(FlushPolicy::at_vmxon(&caps), vec![]);
        assert_eq!(
            FlushPolicy::new(&caps, true, true).at_guest_boot(EPTP, 2),
            vec![]
        );
    }

    #[test]
    fn no_vpid_flush_without_vpids_or_for_vpid_0() {
        let caps = VmxCaps::bochs_skylake_x();
        let p = FlushPolicy::new(&caps, true, false);
        assert_eq!(
            p.at_guest_boot(EPTP, 1),
            vec![Invalidation::Ept {
                kind: InveptType::SingleContext,
                eptp: EPTP
            }]
        );
        assert_eq!(FlushPolicy::new(&caps, true, true).for_vpid(0), None);
    }

    /// Removing EPT entries hands back the EPTP whose cached translations are stale; the policy
    /// turns it into the single-context INVEPT for exactly that EPT.
    #[test]
    fn an_unmap_asks_for_invept_of_its_ept() {
        use crate::ept::{Ept, EptPerms, FakeTables, MemType};
        let mut e = Ept::new(FakeTables::new(), false).unwrap();
        e.map(0, 0x4000_0000, 4 << 20, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let stale = e.unmap(0x1000, 0x1000).unwrap();
        let p = FlushPolicy::new(&VmxCaps::bochs_skylake_x(), true, true);
        assert_eq!(
            p.for_ept(stale.eptp),
            Some(Invalidation::Ept {
                kind: InveptType::SingleContext,
                eptp: e.eptp()
            })
        );
    }

    #[test]
    fn vpids_are_never_0() {
        assert_eq!(guest_vpid(0), 1);
        assert_eq!(guest_vpid(3), 4);
        assert_eq!(guest_vpid(0xfffe), 0xffff);
        assert_eq!(guest_vpid(0xffff), 1);
        assert_eq!(guest_vpid(u32::MAX), (u32::MAX % 0xffff) as u16 + 1);
    }

    #[test]
    fn descriptors_and_types() {
        let e = Invalidation::Ept {
            kind: InveptType::SingleContext,
            eptp: EPTP,
        };
        assert_eq!((e.kind(), e.descriptor()), (1, [EPTP, 0]));
        let v = Invalidation::Vpid {
            kind: InvvpidType::SingleContext,
            vpid: 0xbeef,
        };
        assert_eq!((v.kind(), v.descriptor()), (1, [0xbeef, 0]));
        let all = Invalidation::Vpid {
            kind: InvvpidType::AllContext,
            vpid: 0,
        };
        assert_eq!((all.kind(), all.descriptor()), (2, [0, 0]));
        assert_eq!(e.to_string(), "INVEPT single-context EPTP 0x1234501e");
        assert_eq!(v.to_string(), "INVVPID single-context VPID 48879");
    }
}
