//! The interface Keel presents to guests: CPUID identification leaves, hypercall numbers and
//! status codes, and the well-known I/O ports. docs/HYPERCALLS.md is the user-facing copy; keep
//! them in step.
//!
//! Hypercall convention: the guest executes `VMCALL` with the call number in RAX and arguments in
//! RBX, RCX, RDX, RSI (EAX/EBX/... in 32-bit and 16-bit code). The result comes back in RAX; values
//! above `u64::MAX - 4095` are negative error codes (in 32-bit mode the low 32 bits of the same
//! value). All other registers are preserved.

/// CPUID leaf 0x4000_0000: EAX = highest Keel leaf, EBX:ECX:EDX = "KeelKeelKeel".
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// CPUID leaf 0x4000_0001: EAX = hypercall ABI version, EBX = feature bits (none defined yet).
pub const CPUID_INTERFACE_LEAF: u32 = 0x4000_0001;
/// CPUID leaf 0x4000_0010, the timing leaf other hypervisors (VMware, ACRN) define at this
/// number: EAX = the guest's TSC frequency in kHz, EBX = the local APIC timer's input (bus)
/// clock in kHz, ECX = EDX = 0.
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
/// The highest hypervisor leaf (leaf 0x4000_0000's EAX).
pub const CPUID_MAX_LEAF: u32 = CPUID_TIMING_LEAF;
pub const SIGNATURE: &[u8; 12] = b"KeelKeelKeel";
pub const ABI_VERSION: u32 = 1;

/// Hypercall numbers (RAX).
pub mod hc {
    /// Write RCX bytes at guest-physical RBX to the guest's console. Returns the bytes accepted:
    /// at most `CONSOLE_WRITE_CHUNK`, fewer (possibly 0) when the guest's console is full (which
    /// also ends the caller's time slice); the caller continues with the rest.
    pub const CONSOLE_WRITE: u64 = 1;
    /// Give up the rest of this time slice. Returns 0.
    pub const YIELD: u64 = 2;
    /// Returns the caller's guest id (its index in the manifest).
    pub const GUEST_ID: u64 = 3;
    /// Stop the calling guest with exit status RBX. Does not return.
    pub const SHUTDOWN: u64 = 4;
    /// Print the accounting table of every guest on Keel's console. Returns 0, or EAGAIN when
    /// Keel's console has no room for it now (nothing printed).
    pub const PRINT_STATS: u64 = 5;
    /// Returns the TSC cycles this guest has been given so far (its CPU time).
    pub const CPU_TIME: u64 = 6;
    /// Ballooning (`balloon`, docs/HYPERCALLS.md "Giving memory back"): returns how many 4 KiB
    /// pages Keel asks the guest to have given back in all (0: keep everything).
    pub const BALLOON_TARGET: u64 = 7;
    /// Gives RCX pages of RAM from guest-physical RBX (4 KiB aligned) back to Keel. Returns 0 or
    /// EINVAL (unaligned, empty, more than `BALLOON_MAX_PAGES`, or not wholly RAM), EFAULT (a
    /// page was given already), ENOMEM (Keel had no table to split a large page with). All or
    /// nothing. Touching a given page afterwards stops the guest.
    pub const BALLOON_GIVE: u64 = 8;
    /// Takes RCX given pages at guest-physical RBX back; they read as zeros. Returns 0 or EINVAL
    /// (as for GIVE), EEXIST (a page in the range was not given), ENOMEM (Keel has no free
    /// memory for them now: nothing taken). All or nothing.
    pub const BALLOON_TAKE: u64 = 9;
    /// Returns the number of 4 KiB pages the guest has given back and not taken again.
    pub const BALLOON_GIVEN: u64 = 10;
}

/// Hypercall status codes (as two's-complement negatives in RAX).
pub mod status {
    pub const OK: u64 = 0;
    /// Unknown hypercall number.
    pub const ENOSYS: u64 = -38i64 as u64;
    /// A pointer argument names memory the guest does not own.
    pub const EFAULT: u64 = -14i64 as u64;
    /// An argument is out of range.
    pub const EINVAL: u64 = -22i64 as u64;
    /// Not now: Keel's console has no room (PRINT_STATS); try again later.
    pub const EAGAIN: u64 = -11i64 as u64;
    /// Keel has no memory for the request now (BALLOON_TAKE, BALLOON_GIVE).
    pub const ENOMEM: u64 = -12i64 as u64;
    /// The range holds a page in the wrong state (BALLOON_TAKE of a page the guest has).
    pub const EEXIST: u64 = -17i64 as u64;
}

/// Ports every guest sees.
pub mod port {
    /// QEMU's isa-debug-exit: writing v ends the guest with status (v << 1) | 1.
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// COM1, the guest's virtual 16550.
    pub const COM1: u16 = 0x3f8;
    /// Bochs/QEMU debug console; bytes written go to the guest's console like COM1.
    pub const DEBUGCON: u16 = 0xe9;
}

/// Largest CONSOLE_WRITE length allowed (EINVAL above).
pub const CONSOLE_WRITE_MAX: u64 = 4096;
/// Most bytes one CONSOLE_WRITE takes: a longer call is a short write, to be continued with the
/// rest (Keel's work per call stays small enough never to hold up another guest's timer).
pub const CONSOLE_WRITE_CHUNK: u64 = 1024;

/// Most pages one BALLOON_GIVE or BALLOON_TAKE moves (2 MiB): Keel's work per call stays small
/// enough never to hold up another guest's timer; larger balloons take several calls.
pub const BALLOON_MAX_PAGES: u64 = 512;
