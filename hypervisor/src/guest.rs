//! What Keel knows about one guest apart from the hardware, in two parts: the [`Vm`] all its vCPUs
//! share (memory, virtual platform, clock) and each [`Vcpu`] (registers between exits, CR rules,
//! emulated MSRs, event queue, run state, accounting). Everything here is plain data so
//! the exit handlers that work on it are tested on the build host.

use crate::devices::Platform;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

/// The guest general-purpose registers that VMX does not keep in the VMCS (RSP and RIP are VMCS
/// guest-state fields, SDM 25.4.1). The layout is fixed: the VM-entry/exit assembly in
/// `arch::vmcs` indexes it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl GuestRegs {
    /// Register by the x86 encoding used in exit qualifications (0 = RAX, 1 = RCX, ... 15 = R15).
    /// RSP (4) lives in the VMCS and is handled by the caller.
    pub fn get(&self, index: u8) -> u64 {
        match index & 15 {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            15 => self.r15,
            _ => 0,
        }
    }

    pub fn set(&mut self, index: u8, v: u64) {
        let slot = match index & 15 {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return,
        };
        *slot = v;
    }
}

/// Why a guest stopped running for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// It wrote v to the debug-exit port: status (v << 1) | 1.
    DebugExit(u32),
    /// It asked with the SHUTDOWN hypercall.
    Shutdown(u64),
    /// It turned its machine off (ACPI S5: status 0, as QEMU exits) or reset it (Keel boots it
    /// again; this stays its reason only if that fails).
    Board(crate::devices::PowerEvent),
    TripleFault,
    /// It touched guest-physical memory that holds neither RAM nor a device.
    BadMemoryAccess {
        gpa: u64,
        write: bool,
    },
    /// HLT with interrupts disabled and nothing that could wake it.
    HaltedForever,
    /// An exit Keel does not handle, or a state it refuses to continue from.
    Killed(String),
    /// The CPU refused to enter it (VM-entry failure: a Keel bug or a state Keel failed to check).
    EntryFailed(String),
    /// The operator stopped it (the monitor's `kill` or `quit`).
    Operator(&'static str),
    /// `autostart = false` in the manifest: it waits for the operator's `start`.
    NotStarted,
}

impl StopReason {
    /// The status reported for the guest at the end of the run.
    pub fn status(&self) -> u32 {
        match self {
            StopReason::DebugExit(s) => *s,
            StopReason::Shutdown(v) => (*v as u32) << 1 | 1,
            _ => 0,
        }
    }

    /// True when the guest ended by a failure (its own or Keel's), not by its own choice or the
    /// operator's: `quit` ends Keel with success only when no guest stopped this way.
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            StopReason::DebugExit(_)
                | StopReason::Shutdown(_)
                | StopReason::Board(_)
                | StopReason::Operator(_)
                | StopReason::NotStarted
        )
    }
}

impl core::fmt::Display for StopReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::DebugExit(s) => write!(f, "debug-exit status {s:#x}"),
            Self::Shutdown(v) => write!(f, "shutdown hypercall ({v})"),
            Self::Board(event) => write!(f, "{event}"),
            Self::TripleFault => write!(f, "triple fault"),
            Self::BadMemoryAccess { gpa, write } => {
                write!(
                    f,
                    "{} of guest-physical {gpa:#x}, which is neither RAM nor a device",
                    if *write { "write" } else { "read" }
                )
            }
            Self::HaltedForever => write!(f, "HLT with interrupts disabled and no way to wake up"),
            Self::Killed(why) => write!(f, "killed: {why}"),
            Self::EntryFailed(why) => write!(f, "VM entry failed: {why}"),
            Self::Operator(cmd) => write!(f, "stopped by the operator ({cmd})"),
            Self::NotStarted => write!(f, "not started (autostart = false): `start` boots it"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Runnable,
    /// Executed HLT; runnable again when an interrupt is pending for it.
    Halted,
    /// An application processor after power-on or INIT (SDM 8.4.1, 10.6.1): not scheduled until
    /// a STARTUP IPI starts it.
    WaitForSipi,
    /// Paused from the management API; not scheduled until resumed. `halted` remembers whether
    /// it was waiting in HLT, so resuming puts it back exactly where it was.
    Paused {
        halted: bool,
    },
    Stopped(StopReason),
}

/// Number of basic exit reasons counted one by one (SDM Appendix C goes to 75).
pub const EXIT_REASONS: usize = 80;

#[derive(Debug, Clone)]
pub struct GuestStats {
    pub exits: [u64; EXIT_REASONS],
    /// TSC cycles spent running the guest (from VM entry to VM exit).
    pub cpu_cycles: u64,
    /// TSC cycles Keel spent handling the guest's exits (from VM exit to the next entry).
    pub keel_cycles: u64,
    /// TSC cycles the guest spent halted.
    pub halted_cycles: u64,
    pub interrupts_injected: u64,
    pub exceptions_injected: u64,
    pub unclaimed_port_accesses: u64,
    pub hypercalls: u64,
    /// Basic reason of the most recent exit.
    pub last_exit: u16,
    /// Keel's handling time of the exits after which the guest went on in the same time slice
    /// (host TSC from the VM exit to the next VM entry), by basic reason: the sum, how many
    /// exits it covers, and the longest. An exit that ends the slice (HLT, the end of the
    /// quantum) has no such time: what follows it is the next guest's.
    pub exit_cycles: [u64; EXIT_REASONS],
    pub exits_timed: [u64; EXIT_REASONS],
    pub exit_cycles_max: [u64; EXIT_REASONS],
}

impl Default for GuestStats {
    fn default() -> Self {
        Self {
            exits: [0; EXIT_REASONS],
            cpu_cycles: 0,
            keel_cycles: 0,
            halted_cycles: 0,
            interrupts_injected: 0,
            exceptions_injected: 0,
            unclaimed_port_accesses: 0,
            hypercalls: 0,
            last_exit: 0,
            exit_cycles: [0; EXIT_REASONS],
            exits_timed: [0; EXIT_REASONS],
            exit_cycles_max: [0; EXIT_REASONS],
        }
    }
}

impl GuestStats {
    /// The counts of several vCPUs added up (the last exit is the first one's).
    pub fn sum<'a>(all: impl Iterator<Item = &'a GuestStats>) -> GuestStats {
        let mut t = GuestStats::default();
        for (n, s) in all.enumerate() {
            for (a, b) in t.exits.iter_mut().zip(s.exits.iter()) {
                *a += b;
            }
            t.cpu_cycles += s.cpu_cycles;
            t.keel_cycles += s.keel_cycles;
            t.halted_cycles += s.halted_cycles;
            t.interrupts_injected += s.interrupts_injected;
            t.exceptions_injected += s.exceptions_injected;
            t.unclaimed_port_accesses += s.unclaimed_port_accesses;
            t.hypercalls += s.hypercalls;
            for r in 0..EXIT_REASONS {
                t.exit_cycles[r] += s.exit_cycles[r];
                t.exits_timed[r] += s.exits_timed[r];
                t.exit_cycles_max[r] = t.exit_cycles_max[r].max(s.exit_cycles_max[r]);
            }
            if n == 0 {
                t.last_exit = s.last_exit;
            }
        }
        t
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }

    /// An exit of basic reason `reason` came: counted, and the last exit (whose handling time
    /// [`GuestStats::record_exit_cycles`] takes at the next entry). Every exit path counts
    /// through this, the general dispatch and each of the tight loop's ways.
    #[inline(always)]
    pub fn count_exit(&mut self, reason: u16) {
        self.last_exit = reason;
        if let Some(slot) = self.exits.get_mut(usize::from(reason)) {
            *slot += 1;
        }
    }

    /// Keel took `cycles` to handle an exit of basic reason `reason` before entering the guest
    /// again.
    pub fn record_exit_cycles(&mut self, reason: u16, cycles: u64) {
        let r = usize::from(reason);
        if r < EXIT_REASONS {
            self.exit_cycles[r] += cycles;
            self.exits_timed[r] += 1;
            self.exit_cycles_max[r] = self.exit_cycles_max[r].max(cycles);
        }
    }

    /// `count` exits of basic reason `reason` came and were handled in `cycles` in all, the
    /// longest in `longest`: as many [`GuestStats::count_exit`]s and
    /// [`GuestStats::record_exit_cycles`] at once, the last exit left as it was (the run loop's
    /// reflex, which keeps its exits' accounts until the loop sees the next one).
    pub fn add_timed_exits(&mut self, reason: u16, count: u64, cycles: u64, longest: u64) {
        let r = usize::from(reason);
        if r < EXIT_REASONS {
            self.exits[r] += count;
            self.exit_cycles[r] += cycles;
            self.exits_timed[r] += count;
            self.exit_cycles_max[r] = self.exit_cycles_max[r].max(longest);
        }
    }

    /// The average handling time of exits of basic reason `reason`, if any was timed.
    pub fn average_exit_cycles(&self, reason: usize) -> Option<u64> {
        let n = *self.exits_timed.get(reason)?;
        (n > 0).then(|| self.exit_cycles[reason] / n)
    }

    /// "I/O instruction 340, CPUID 12, ...": the non-zero exit counts, most frequent first.
    pub fn exits_by_reason(&self) -> String {
        let mut v: alloc::vec::Vec<(usize, u64)> = self
            .exits
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, n)| n > 0)
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let parts: alloc::vec::Vec<String> = v
            .iter()
            .map(|&(r, n)| alloc::format!("{} {n}", crate::vmx::ExitReason::from_basic(r as u16)))
            .collect();
        if parts.is_empty() {
            String::from("none")
        } else {
            parts.join(", ")
        }
    }
}

/// Guest RAM: guest-physical 0..len, backed by one contiguous host block, less the pages the
/// guest gave back and with the ones it took again on other frames (`balloon`).
///
/// Every vCPU of a guest reaches this memory, and the guest itself writes it from every vCPU while
/// Keel reads it, so Keel never holds a Rust reference into it across an exit: the accessors copy
/// bytes in and out through the raw pointer ([`GuestRam::read`], [`GuestRam::write`]), which stays
/// sound when another CPU touches the same bytes at the same time (the guest sees a torn value, as
/// it would from a device doing DMA). Only [`GuestRam::bytes`] hands out a slice, and it takes
/// `&mut self`: for the loaders, while the guest is being (re)built and none of its vCPUs runs.
/// The accessors refuse a range with a page the guest gave back (`balloon`).
pub struct GuestRam {
    base: *mut u8,
    len: usize,
    /// Host-physical address of guest-physical 0 (of the block).
    pub hpa: u64,
    /// The pages given back or moved, and the balloon target.
    pub balloon: crate::balloon::PageMap,
    /// The pages Keel wrote, a bit each, while a migration logs them ([`GuestRam::log_writes`]).
    written: Option<alloc::boxed::Box<[AtomicU64]>>,
}

/// Pages of the write log are 4 KiB, as the EPT's and a migration's.
const PAGE_BYTES: u64 = 4096;

// SAFETY: a `GuestRam` is a view of memory owned by its guest; every access through a shared
// reference is a raw-pointer copy (no reference into guest memory is ever formed from `&self`).
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// # Safety
    /// `mem` must be memory owned by this guest alone for as long as the `GuestRam` lives.
    pub unsafe fn new(mem: &'static mut [u8], hpa: u64) -> Self {
        Self {
            base: mem.as_mut_ptr(),
            len: mem.len(),
            hpa,
            balloon: Default::default(),
            written: None,
        }
    }

    /// No RAM: a guest not started yet, or whose memory went back to the pool. Every access is
    /// refused.
    pub fn none() -> Self {
        Self {
            base: core::ptr::NonNull::dangling().as_ptr(),
            len: 0,
            hpa: 0,
            balloon: Default::default(),
            written: None,
        }
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// RAM the guest has now: its size less the pages it gave back.
    pub fn resident(&self) -> u64 {
        self.len() - self.balloon.given_pages() * crate::balloon::PAGE
    }

    /// The whole of RAM as a slice, for the loaders while no vCPU of the guest runs. Only for RAM
    /// wholly in its block (`hypervisor::VmHw::boot` makes it so before loading).
    pub fn bytes(&mut self) -> &mut [u8] {
        assert!(
            self.balloon.is_pristine(),
            "guest RAM with pages given back handed to a loader"
        );
        // Whatever the loader writes, everything is to be sent again.
        self.wrote(0, self.len);
        // SAFETY: the block is this guest's (`new`) and wholly backs its RAM (checked above),
        // and `&mut self` is the only access to it from Keel meanwhile; the guest does not run
        // while it is being loaded.
        unsafe { core::slice::from_raw_parts_mut(self.base, self.len) }
    }

    /// The offset of the guest-physical range [gpa, gpa+len) if it lies wholly in RAM.
    fn range(&self, gpa: u64, len: usize) -> Option<usize> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.len as u64).then_some(gpa as usize)
    }

    /// True if [gpa, gpa+len) lies wholly in RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|n| self.range(gpa, n).is_some())
    }

    /// Calls `f(host pointer, offset in the range, length)` for each piece of [gpa, gpa+len) on
    /// one backing frame, if the range lies wholly in RAM the guest has (no page given back);
    /// None, and no call, otherwise.
    fn pieces(&self, gpa: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> Option<()> {
        use crate::balloon::PAGE;
        let at = self.range(gpa, len)?;
        if self.balloon.is_pristine() {
            // SAFETY: in bounds (checked above) of the block this view owns.
            f(unsafe { self.base.add(at) }, 0, len);
            return Some(());
        }
        if len == 0 {
            return Some(());
        }
        let last = (gpa + len as u64 - 1) / PAGE;
        if (gpa / PAGE..=last).any(|p| self.balloon.is_given(p)) {
            return None;
        }
        let mut done = 0;
        while done < len {
            let a = gpa + done as u64;
            let n = (len - done).min((PAGE - a % PAGE) as usize);
            let ptr = match self.balloon.moved(a / PAGE) {
                // SAFETY: the frame is the guest's (`balloon`), 4 KiB long; a % PAGE + n <= PAGE.
                Some(frame) => unsafe { frame.ptr.add((a % PAGE) as usize) },
                // SAFETY: in bounds of the block, on a page backed by it.
                None => unsafe { self.base.add(a as usize) },
            };
            f(ptr, done, n);
            done += n;
        }
        Some(())
    }

    /// Copies guest-physical [gpa, gpa+buf.len()) into `buf`; None (and `buf` untouched) if the
    /// range is not wholly RAM the guest has.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Option<()> {
        let out = buf.as_mut_ptr();
        self.pieces(gpa, buf.len(), |src, off, n| {
            // SAFETY: `pieces` gives pointers to n bytes this view owns; off + n <= buf.len(). A
            // byte copy through the raw pointer forms no reference to memory other CPUs may write.
            unsafe { core::ptr::copy_nonoverlapping(src, out.add(off), n) }
        })
    }

    /// Copies `data` to guest-physical `gpa`; None (and nothing written) if the range is not
    /// wholly RAM the guest has.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Option<()> {
        self.pieces(gpa, data.len(), |dst, off, n| {
            // SAFETY: as in `read`.
            unsafe { core::ptr::copy_nonoverlapping(data.as_ptr().add(off), dst, n) }
        })?;
        self.wrote(gpa, data.len());
        Some(())
    }

    /// Zeroes page `gpa` of the block (a page taken back onto its own frame, `balloon`).
    pub(crate) fn zero_home_page(&mut self, gpa: u64) {
        use crate::balloon::PAGE;
        if let Some(at) = self.range(gpa & !(PAGE - 1), PAGE as usize) {
            // SAFETY: in bounds of the block, whose frame the caller just got back for the guest.
            unsafe { core::ptr::write_bytes(self.base.add(at), 0, PAGE as usize) };
            self.wrote(at as u64, PAGE as usize);
        }
    }

    /// The guest-physical range [gpa, gpa+len) copied out, if it lies wholly in RAM.
    pub fn slice(&self, gpa: u64, len: u64) -> Option<alloc::vec::Vec<u8>> {
        let mut v = alloc::vec![0u8; usize::try_from(len).ok()?];
        self.read(gpa, &mut v)?;
        Some(v)
    }

    pub fn read_u32(&self, gpa: u64) -> Option<u32> {
        self.read_array(gpa).map(u32::from_le_bytes)
    }

    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        self.read_array(gpa).map(u64::from_le_bytes)
    }

    /// The `N` bytes at `gpa`, as [`GuestRam::read`] reads them. While the guest has given no
    /// page back (its RAM is then the one block) in one unaligned load, without `read`'s copy:
    /// the walks of the guest's page tables and the MMIO emulator's instruction fetch read
    /// this way.
    #[inline]
    pub fn read_array<const N: usize>(&self, gpa: u64) -> Option<[u8; N]> {
        if self.balloon.is_pristine() {
            let at = self.range(gpa, N)?;
            // SAFETY: in bounds (checked above) of the block this view owns, all of it the
            // guest's (no page given back). A load through the raw pointer forms no reference
            // to memory other CPUs may write.
            return Some(unsafe { core::ptr::read_unaligned(self.base.add(at).cast::<[u8; N]>()) });
        }
        let mut b = [0; N];
        self.read(gpa, &mut b)?;
        Some(b)
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Option<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Starts (a fresh, empty log) or ends logging the pages Keel writes, for a live migration
    /// (`runloop::migrate`): the EPT's dirty flags see only the guest's own writes, made through
    /// its EPT (SDM 29.3.5), not Keel's through its own mapping.
    pub fn log_writes(&mut self, on: bool) {
        self.written = on.then(|| {
            let words = (self.len as u64).div_ceil(PAGE_BYTES * 64);
            (0..words).map(|_| AtomicU64::new(0)).collect()
        });
    }

    /// Calls `page` for every page (guest-physical address / 4096) Keel wrote since the log
    /// began or was last taken, in order, and empties the log.
    pub fn take_written(&self, page: &mut dyn FnMut(u64)) {
        for (w, word) in self.written.iter().flat_map(|log| log.iter()).enumerate() {
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                page(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
    }

    /// Logs a write to `[gpa, gpa + len)` (in RAM) when a migration asked for it.
    fn wrote(&self, gpa: u64, len: usize) {
        let Some(log) = &self.written else {
            return;
        };
        if len == 0 {
            return;
        }
        for p in gpa / PAGE_BYTES..=(gpa + len as u64 - 1) / PAGE_BYTES {
            if let Some(word) = log.get((p / 64) as usize) {
                word.fetch_or(1 << (p % 64), Ordering::SeqCst);
            }
        }
    }

    /// Sets `bits` in the byte at `gpa` with one atomic read-modify-write, as the CPU sets the
    /// accessed and dirty flags of a paging entry (a locked operation, SDM 4.8): another vCPU
    /// updating the same entry meanwhile loses nothing. None if `gpa` is not RAM the guest has.
    pub fn fetch_or_u8(&self, gpa: u64, bits: u8) -> Option<()> {
        self.pieces(gpa, 1, |at, _, _| {
            // SAFETY: a byte this view owns; AtomicU8 has the alignment and size of u8, and every
            // access Keel makes to guest RAM is a raw copy or this atomic.
            let byte = unsafe { &*(at as *const core::sync::atomic::AtomicU8) };
            byte.fetch_or(bits, core::sync::atomic::Ordering::SeqCst);
        })?;
        self.wrote(gpa, 1);
        Some(())
    }
}

/// What all vCPUs of one guest share: its RAM, its virtual platform (the shared devices and the
/// interrupt fabric), its clock and the requests it made of Keel. The hardware behind it (EPT, RAM
/// block, bitmaps) is `hypervisor::VmHw`'s.
pub struct Vm {
    pub id: u32,
    pub name: String,
    pub ram: GuestRam,
    pub platform: Platform,
    /// Set by the PRINT_STATS hypercall; Keel prints the table after the exit.
    pub stats_requested: bool,
    /// Added to the host TSC to give the guest's virtual time: every guest's clock starts near 0
    /// when it is created, and its device timers run on that clock. Each vCPU's TSC adds its own
    /// `tsc_adjust` (the VMCS TSC offset, SDM 26.3, is [`Vcpu::vmcs_tsc_offset`]).
    pub tsc_offset: u64,
    /// The latest of its virtual time ([`Vm::now`]) Keel has used from another host CPU (a wake,
    /// an IPI, a key) or at an exit: an exit's wait for the run loop's lock is taken off its
    /// clock only down to here, so the clock never goes back behind what was seen
    /// (`RunLoop::exited`). Set back with the clock at a boot or a restore.
    pub clock_seen: u64,
    /// Its answers to the CPUID leaves that depend on nothing it changes (`exits::cpuid`).
    pub cpuid: crate::exits::cpuid::CpuidTable,
}

/// One virtual CPU of a guest: its registers between exits, the control-register rules, the MSRs
/// Keel emulates or switches for it, its event queue, its TSC adjustment, its run state and its
/// accounts. Its VMCS and the registers VMX does not switch are its hardware half
/// (`hypervisor::VcpuHw`).
pub struct Vcpu {
    /// Its number in the guest, 0 for the bootstrap processor; also its APIC ID.
    pub index: usize,
    pub regs: GuestRegs,
    pub state: RunState,
    /// Halted by a HLT executed with RFLAGS.IF = 0: a maskable interrupt does not end that halt,
    /// only an NMI or INIT does (SDM Vol. 2A HLT; Vol. 3A 9.1.1). Meaningful while `state` is
    /// [`RunState::Halted`].
    pub halted_masked: bool,
    pub stats: GuestStats,
    /// Emulated MSRs (IA32_APIC_BASE is the local APIC's, in the VM's platform).
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    /// The CR0/CR4 bits VMX forces for this vCPU and the checks on guest writes.
    pub cr0_rules: crate::vmx::cr::GuestCr,
    pub cr4_rules: crate::vmx::cr::GuestCr,
    /// The vCPU's XCR0, loaded before it runs.
    pub xcr0: u64,
    /// Exceptions, NMIs and interrupts owed to the vCPU at its next VM entries.
    pub events: crate::exits::events::EventQueue,
    /// IA32_TSC_ADJUST (SDM 17.17.3): what the guest added to this vCPU's TSC with WRMSR. Its TSC
    /// is the VM's clock plus this ([`Vcpu::vmcs_tsc_offset`]); the devices keep the VM's clock.
    pub tsc_adjust: u64,
    /// IA32_SPEC_CTRL as the guest last wrote it (`exits::msr`); the run loop loads it into the
    /// real MSR whenever this vCPU runs.
    pub spec_ctrl: u64,
    /// The pages of APIC virtualization, when this guest runs with it (`vmx::apicv`): the CPU
    /// owns the TPR then, and `exits::apicv` keeps `platform`'s local APIC in step with it.
    pub apicv: Option<crate::vmx::apicv::VirtualApic>,
}

impl Vcpu {
    /// A vCPU at power-on with the CR rules of `caps`.
    pub fn new(index: usize, caps: &crate::vmx::VmxCaps) -> Self {
        Self {
            index,
            regs: GuestRegs::default(),
            state: RunState::Runnable,
            halted_masked: false,
            stats: GuestStats::default(),
            cr0_rules: crate::vmx::cr::GuestCr::cr0(caps, true),
            cr4_rules: crate::vmx::cr::GuestCr::cr4(caps),
            misc_enable: crate::exits::msr::MISC_ENABLE_DEFAULT,
            mtrr_def_type: 0,
            xcr0: 1,
            events: Default::default(),
            tsc_adjust: 0,
            spec_ctrl: 0,
            apicv: None,
        }
    }

    /// Back to the power-on values of everything Keel emulates for the vCPU (registers, MSRs,
    /// XCR0, events); its CR rules and accounts stay.
    pub fn reset(&mut self) {
        self.regs = GuestRegs::default();
        self.state = RunState::Runnable;
        self.halted_masked = false;
        self.misc_enable = crate::exits::msr::MISC_ENABLE_DEFAULT;
        self.mtrr_def_type = 0;
        self.xcr0 = 1;
        self.events = Default::default();
        self.tsc_adjust = 0;
        self.spec_ctrl = 0;
    }

    /// The VMCS TSC offset: the VM's clock (`vm_offset`, [`Vm::tsc_offset`]) plus this vCPU's
    /// IA32_TSC_ADJUST.
    pub fn vmcs_tsc_offset(&self, vm_offset: u64) -> u64 {
        vm_offset.wrapping_add(self.tsc_adjust)
    }
}

/// A management request that does not fit the guest's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlError {
    AlreadyStopped,
    NotPaused,
    AlreadyPaused,
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::AlreadyStopped => "the guest has stopped",
            Self::NotPaused => "the guest is not paused",
            Self::AlreadyPaused => "the guest is already paused",
        })
    }
}

impl RunState {
    /// Pause: the guest keeps all its state but is not scheduled.
    pub fn pause(&mut self) -> Result<(), ControlError> {
        *self = match self {
            RunState::Runnable => RunState::Paused { halted: false },
            RunState::Halted => RunState::Paused { halted: true },
            RunState::Paused { .. } => return Err(ControlError::AlreadyPaused),
            RunState::Stopped(_) => return Err(ControlError::AlreadyStopped),
            // Nothing to pause: it stays waiting (no vCPU of a paused guest sends it a SIPI).
            RunState::WaitForSipi => RunState::WaitForSipi,
        };
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), ControlError> {
        *self = match self {
            RunState::Paused { halted: true } => RunState::Halted,
            RunState::Paused { halted: false } => RunState::Runnable,
            RunState::Stopped(_) => return Err(ControlError::AlreadyStopped),
            _ => return Err(ControlError::NotPaused),
        };
        Ok(())
    }

    /// Stop for good (a running, halted or paused guest).
    pub fn stop(&mut self, reason: StopReason) -> Result<(), ControlError> {
        if matches!(self, RunState::Stopped(_)) {
            return Err(ControlError::AlreadyStopped);
        }
        *self = RunState::Stopped(reason);
        Ok(())
    }

    pub fn is_live(&self) -> bool {
        !matches!(self, RunState::Stopped(_))
    }
}

impl Vm {
    /// The guest's virtual time at host TSC `host_tsc`: the clock its devices run on, which is
    /// a vCPU's TSC less that vCPU's own IA32_TSC_ADJUST.
    pub fn now(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.tsc_offset)
    }

    /// [`Vm::now`], noted as seen ([`Vm::clock_seen`]).
    pub fn now_seen(&mut self, host_tsc: u64) -> u64 {
        let t = self.now(host_tsc);
        self.clock_seen = self.clock_seen.max(t);
        t
    }

    /// The host TSC at which the guest's first timer falls due (its platform's earliest
    /// deadline), if one is set.
    pub fn first_timer(&self) -> Option<u64> {
        self.platform.next_deadline().map(|d| self.host_time(d))
    }

    /// The host TSC at which the guest's virtual time ([`Vm::now`]) reads `guest_tsc`.
    pub fn host_time(&self, guest_tsc: u64) -> u64 {
        guest_tsc.wrapping_sub(self.tsc_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RAM of `pages` pages on the heap, this test's alone.
    fn test_ram(pages: usize) -> GuestRam {
        let mem: &'static mut [u8] = alloc::vec![0u8; pages * 4096].leak();
        // SAFETY: the leaked buffer belongs to this test alone.
        unsafe { GuestRam::new(mem, 0x100_0000) }
    }

    fn written(ram: &GuestRam) -> alloc::vec::Vec<u64> {
        let mut pages = alloc::vec::Vec::new();
        ram.take_written(&mut |p| pages.push(p));
        pages
    }

    /// Keel's own writes into a guest's RAM (an emulated instruction's operand, a task switch,
    /// a hypercall's answer, a page the balloon gives back zeroed) do not go through the EPT,
    /// so its dirty flags never see them: while a migration logs them, each such write puts its
    /// pages in the set the next round sends.
    #[test]
    fn keel_writes_while_logged_are_in_the_next_round() {
        let mut ram = test_ram(16);
        ram.write(0x1000, b"before").unwrap();
        ram.log_writes(true);
        assert!(written(&ram).is_empty(), "the log starts empty");
        ram.write(0x3005, b"x").unwrap();
        ram.write_u64(0x4ffc, u64::MAX).unwrap(); // across pages 4 and 5
        ram.fetch_or_u8(0x9000, 0x20).unwrap(); // a guest paging entry's accessed flag
        assert_eq!(written(&ram), [3, 4, 5, 9]);
        assert!(written(&ram).is_empty(), "taken once");
        // A write after the round's collection is in the next round.
        ram.write(0xa000, &[1; 8]).unwrap();
        assert_eq!(written(&ram), [10]);
        // A refused write (past the end) marks nothing; a page zeroed for the balloon does.
        assert_eq!(ram.write(0xfffc, &[0; 8]), None);
        ram.zero_home_page(0x7123);
        assert_eq!(written(&ram), [7]);
        // A loader's view of the whole RAM: every page.
        let _ = ram.bytes();
        assert_eq!(written(&ram).len(), 16);
        // The migration over: nothing is logged.
        ram.log_writes(false);
        ram.write(0x2000, b"after").unwrap();
        assert!(written(&ram).is_empty());
    }

    /// `read_array` reads what `read` reads, in RAM and at its end (none past it).
    #[test]
    fn read_array_reads_as_read_does() {
        let ram = test_ram(2);
        ram.write(0x1ff8, b"last8byt").unwrap();
        ram.write(0x0ffc, b"acrosspg").unwrap();
        assert_eq!(ram.read_array(0x1ff8), Some(*b"last8byt"));
        assert_eq!(ram.read_array(0x0ffc), Some(*b"acrosspg"));
        assert_eq!(ram.read_u64(0x0ffc), Some(u64::from_le_bytes(*b"acrosspg")));
        assert_eq!(ram.read_u32(0x1ffc), Some(u32::from_le_bytes(*b"8byt")));
        assert_eq!(ram.read_array::<8>(0x1ff9), None, "one byte past the end");
        assert_eq!(ram.read_array::<4>(u64::MAX - 1), None);
    }

    #[test]
    fn pause_resume_stop() {
        let mut s = RunState::Halted;
        s.pause().unwrap();
        assert_eq!(s, RunState::Paused { halted: true });
        assert_eq!(s.pause(), Err(ControlError::AlreadyPaused));
        s.resume().unwrap();
        assert_eq!(s, RunState::Halted, "a paused HLT goes back to waiting");
        let mut r = RunState::Runnable;
        assert_eq!(r.resume(), Err(ControlError::NotPaused));
        r.pause().unwrap();
        r.stop(StopReason::Killed("operator".into())).unwrap();
        assert!(!r.is_live());
        assert_eq!(r.resume(), Err(ControlError::AlreadyStopped));
        assert_eq!(
            r.stop(StopReason::TripleFault),
            Err(ControlError::AlreadyStopped)
        );
    }

    #[test]
    fn exits_by_reason_most_frequent_first() {
        let mut s = GuestStats::default();
        assert_eq!(s.exits_by_reason(), "none");
        s.exits[10] = 3;
        s.exits[30] = 7;
        s.exits[12] = 3;
        assert_eq!(s.exits_by_reason(), "I/O instruction 7, CPUID 3, HLT 3");
        assert_eq!(s.total_exits(), 13);
    }

    #[test]
    fn exit_cycles_sum_count_and_max() {
        let mut s = GuestStats::default();
        assert_eq!(s.average_exit_cycles(10), None);
        s.record_exit_cycles(10, 1000);
        s.record_exit_cycles(10, 3000);
        s.record_exit_cycles(500, 1);
        assert_eq!(s.average_exit_cycles(10), Some(2000));
        assert_eq!(s.exit_cycles_max[10], 3000);
        assert_eq!(s.average_exit_cycles(500), None, "out of range is ignored");
    }

    #[test]
    fn status_of_each_ending() {
        assert_eq!(StopReason::DebugExit(0x21).status(), 0x21);
        assert_eq!(StopReason::Shutdown(3).status(), 7);
        assert_eq!(StopReason::TripleFault.status(), 0);
        let off = StopReason::Board(crate::devices::PowerEvent::SoftOff);
        assert_eq!(off.status(), 0);
        assert_eq!(alloc::format!("{off}"), "powered off (ACPI S5)");
    }
}
