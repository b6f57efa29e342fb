//! Keel's guest ABI, mirrored from hypervisor/src/abi.rs (the guests do not link the hypervisor
//! crate). docs/GUESTS.md describes it.

/// CPUID leaf with the hypervisor signature in EBX:ECX:EDX.
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// Hypercall numbers (EAX/RAX for VMCALL).
pub const HC_CONSOLE_WRITE: usize = 1;
/// Give up the rest of the time slice.
pub const HC_YIELD: usize = 2;
pub const HC_GUEST_ID: usize = 3;
/// Keel prints its accounting table (one row per guest).
pub const HC_PRINT_STATS: usize = 5;
/// TSC cycles the calling guest has run so far.
pub const HC_CPU_TIME: usize = 6;
/// Ballooning (docs/HYPERCALLS.md "Giving memory back"): pages Keel asks the guest to have given
/// back in all.
pub const HC_BALLOON_TARGET: usize = 7;
/// Give RCX pages from guest-physical RBX back to Keel.
pub const HC_BALLOON_GIVE: usize = 8;
/// Take RCX given pages at guest-physical RBX back (they read as zeros).
pub const HC_BALLOON_TAKE: usize = 9;
/// Pages given back and not taken again.
pub const HC_BALLOON_GIVEN: usize = 10;
/// Statuses of the balloon calls: -22, -14, -17.
pub const EINVAL: usize = -22isize as usize;
pub const EFAULT: usize = -14isize as usize;
pub const EEXIST: usize = -17isize as usize;
/// Most pages one BALLOON_GIVE or BALLOON_TAKE moves.
pub const BALLOON_MAX_PAGES: usize = 512;
/// PRINT_STATS's answer while Keel's console has no room for the table: -11 (nothing printed).
pub const EAGAIN: usize = -11isize as usize;
/// A number Keel does not define: must fail with ENOSYS.
pub const HC_UNKNOWN: usize = 0x7777;
/// -38 as a register value: the low 32 bits of the 64-bit status in 32-bit guests.
pub const ENOSYS: usize = -38isize as usize;
/// QEMU's isa-debug-exit port, which Keel models too.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
