//! Extended page tables (SDM 29.3): the guest-physical to host-physical map of each guest.

use bitflags::bitflags;

bitflags! {
    /// Access rights of an EPT entry, bits 2:0 (SDM 29.3.2, Table 29-6).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EptPerms: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
        const RW = Self::READ.bits() | Self::WRITE.bits();
        const RX = Self::READ.bits() | Self::EXECUTE.bits();
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXECUTE.bits();
    }
}
