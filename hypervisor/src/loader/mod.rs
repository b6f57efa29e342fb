//! Guest loaders: put a guest image into guest RAM and say how its virtual CPU starts.
//!
//! Guest RAM is handed in as one byte slice covering guest-physical `0..len`. A loader writes the
//! image and whatever boot structures its convention needs, and returns an [`InitialState`] that
//! the VMX layer turns into VMCS guest state. Four kinds exist, one file each:
//!
//! - [`flat`]: a raw binary entered in 16-bit real mode, like a BIOS boot sector;
//! - [`elf`]: an ELF32 kernel entered in protected mode or an ELF64 kernel entered in long mode;
//! - [`multiboot`]: a multiboot 1 kernel, entered as the multiboot specification says;
//! - [`linux`]: a Linux kernel (packed by keel-boot from a bzImage or vmlinux), entered by the
//!   x86 64-bit boot protocol with its own layout below 1 MiB (see that module).
//!
//! Nothing here trusts the image: every offset and size read from it is checked, and a malformed
//! image is a [`LoadError`], never a panic. On error the RAM contents are unspecified; the caller
//! drops the guest. The loaders write only the image, its bss and their boot structures, so the
//! caller hands in zeroed RAM (it must anyway, so no host data leaks into a guest).
//!
//! # Guest-physical layout of the boot structures (ELF)
//!
//! ```text
//! 0x0000 - 0x0fff   untouched (the real-mode IVT/BDA area for flat guests)
//! 0x1000 - 0x1fff   GDT: null, code32 0x08, data 0x10, code64 0x18
//! 0x2000 - 0x2fff   command line, NUL-terminated, at most 4095 bytes
//! 0x3000 - 0x3fff   PML4            (ELF64 only)
//! 0x4000 - 0x4fff   PDPT            (ELF64 only)
//! 0x5000 - 0x8fff   4 page directories, identity map of 0..4 GiB in 2 MiB pages (ELF64 only)
//! top - 0x11000 .. top   initial stack (64 KiB) and a 4 KiB reserve at the very top
//! ```
//!
//! ELF images may not overlap `0x1000..0xb000` nor the stack area. Multiboot kernels get QEMU's
//! layout instead, with nothing of Keel's in low RAM (see [`multiboot`]). docs/GUESTS.md is the
//! user-facing copy of both. Linux guests use their own layout (0x90000-0x9ffff,
//! e820-reserved; see [`linux`]).

pub mod elf;
pub mod flat;
pub mod linux;
pub mod multiboot;

use crate::manifest::{GuestConfig, GuestKind};
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

/// The processor mode a guest starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode (CR0.PE = 0); needs the "unrestricted guest" VM-execution control.
    Real,
    /// 32-bit protected mode, paging off, flat segments.
    Protected,
    /// IA-32e (long) mode with 64-bit code, paging on with identity page tables.
    Long,
}

/// The virtual CPU state a loader asks for. Registers not listed (RBP, R8-R15, FS/GS bases, DR7,
/// ...) start at zero; IDTR is base 0 limit 0x3ff in real mode (the IVT) and limit 0 otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialState {
    pub mode: CpuMode,
    pub rip: u64,
    pub rsp: u64,
    /// Normally 0x2 (only the reserved bit 1): interrupts off.
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    /// The CR0 the guest should see (VMX fixed bits are the caller's business).
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Protected/long mode: a GDT the loader wrote into guest RAM with flat segments
    /// ([`GDT_ENTRIES`] at [`GDT_ADDR`]). Real mode: 0 and 0.
    pub gdtr_base: u64,
    pub gdtr_limit: u16,
    /// Protected/long mode: a selector into that GDT. Real mode: the CS segment value (the
    /// segment base is `code_selector << 4`).
    pub code_selector: u16,
    /// Protected/long mode: the selector for DS, ES, FS, GS and SS. Real mode: 0 (DS = ES = SS
    /// = FS = GS = 0).
    pub data_selector: u16,
}

impl InitialState {
    /// An application processor started by a STARTUP IPI with `vector` (SDM 8.4.4.1, 10.6.1):
    /// real mode at CS:IP = (vector << 8):0, so the first instruction is at vector << 12, with
    /// the rest of the state INIT leaves (SDM 9.1.1, Table 9-1: CR0 60000010H, the other
    /// registers 0 but RFLAGS' reserved bit and EDX, which holds the processor signature; Keel
    /// leaves it 0 as it does for its other entry points).
    pub fn startup_ipi(vector: u8) -> Self {
        let mut s = Self::new(CpuMode::Real);
        s.code_selector = u16::from(vector) << 8;
        s.cr0 = 0x6000_0010;
        s
    }

    /// All-zero registers except RFLAGS' reserved bit: the base the loaders fill in.
    fn new(mode: CpuMode) -> Self {
        Self {
            mode,
            rip: 0,
            rsp: 0,
            rflags: RFLAGS_RESERVED,
            rax: 0,
            rbx: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            cr0: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            gdtr_base: 0,
            gdtr_limit: 0,
            code_selector: 0,
            data_selector: 0,
        }
    }

    /// Flat 32-bit protected mode on the loader's GDT, paging off.
    fn protected(ram_len: u64) -> Self {
        Self {
            cr0: CR0_PE | CR0_ET | CR0_NE,
            gdtr_base: GDT_ADDR,
            gdtr_limit: GDT_LIMIT,
            code_selector: CODE32_SELECTOR,
            data_selector: DATA_SELECTOR,
            rsp: initial_stack_top(ram_len),
            ..Self::new(CpuMode::Protected)
        }
    }
}

/// What to load: the guest's manifest entry, its image and (multiboot only) its modules.
pub struct LoadRequest<'a> {
    pub cfg: &'a GuestConfig,
    pub image: &'a [u8],
    /// (name, contents) of each module, in manifest order.
    pub modules: &'a [(&'a str, &'a [u8])],
    pub guest_id: u32,
}

/// Why an image cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// A snapshot is restored (`crate::snapshot`), never loaded.
    IsSnapshot,
    RamTooSmall {
        needed: u64,
        have: u64,
    },
    EmptyImage,
    /// Modules were given to a kind that has no way to pass them (only multiboot does).
    ModulesNotSupported,
    NotElf,
    BadElf(&'static str),
    UnsupportedElf {
        class: u8,
        machine: u16,
    },
    NoLoadableSegment,
    /// A segment's file bytes lie past the end of the image.
    SegmentOutsideImage {
        offset: u64,
        size: u64,
    },
    /// Something would land outside guest RAM.
    OutsideRam {
        what: &'static str,
        addr: u64,
        size: u64,
    },
    /// Something would land on the loader's boot structures or the initial stack.
    Overlaps {
        what: &'static str,
        addr: u64,
        size: u64,
        area: &'static str,
    },
    /// The entry point is not inside anything the loader loaded.
    EntryOutsideImage {
        entry: u64,
    },
    /// A flat image must sit above the IVT and BIOS data area and below 1 MiB.
    FlatOutOfRange {
        addr: u64,
        size: u64,
    },
    NoMultibootHeader,
    BadMultibootChecksum {
        offset: usize,
    },
    /// Header flags in the "required" range (bits 0-15) that Keel does not provide.
    UnsupportedMultibootFlags(u32),
    BadAoutKludge(&'static str),
    CmdlineTooLong {
        len: usize,
        max: usize,
    },
    CmdlineHasNul,
    /// The multiboot info, module list and strings do not fit their area.
    BootInfoFull,
    /// A Linux kernel image that Keel cannot use.
    BadLinux(&'static str),
    /// A bzImage whose boot protocol is older than `linux::MIN_PROTOCOL`.
    LinuxProtocol(u16),
    /// A Linux initrd larger than the RAM between the kernel (its `init_size`) and the lower of
    /// the end of RAM and the kernel's `initrd_addr_max`.
    InitrdTooBig {
        size: u64,
        room: u64,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IsSnapshot => write!(f, "a snapshot is restored, not loaded"),
            Self::RamTooSmall { needed, have } => {
                write!(f, "guest RAM of {have:#x} bytes is too small, need {needed:#x}")
            }
            Self::EmptyImage => write!(f, "the image is empty"),
            Self::ModulesNotSupported => write!(f, "only multiboot guests take modules"),
            Self::NotElf => write!(f, "the image is not an ELF file"),
            Self::BadElf(why) => write!(f, "bad ELF image: {why}"),
            Self::UnsupportedElf { class, machine } => write!(
                f,
                "unsupported ELF class {class} / machine {machine} (need ELF32 EM_386 or ELF64 EM_X86_64)"
            ),
            Self::NoLoadableSegment => write!(f, "the ELF image has no PT_LOAD segment"),
            Self::SegmentOutsideImage { offset, size } => write!(
                f,
                "segment data at file offset {offset:#x} (+{size:#x}) lies outside the image"
            ),
            Self::OutsideRam { what, addr, size } => write!(
                f,
                "{what} at {addr:#x} (+{size:#x}) lies outside guest RAM"
            ),
            Self::Overlaps {
                what,
                addr,
                size,
                area,
            } => write!(f, "{what} at {addr:#x} (+{size:#x}) overlaps the {area}"),
            Self::EntryOutsideImage { entry } => {
                write!(f, "entry point {entry:#x} is not inside the loaded image")
            }
            Self::FlatOutOfRange { addr, size } => write!(
                f,
                "flat image at {addr:#x} (+{size:#x}) must lie within {FLAT_MIN_LOAD:#x}..{REAL_MODE_LIMIT:#x}"
            ),
            Self::NoMultibootHeader => write!(
                f,
                "no multiboot header (magic {:#x}) in the first {} bytes",
                multiboot::HEADER_MAGIC,
                multiboot::HEADER_SEARCH
            ),
            Self::BadMultibootChecksum { offset } => {
                write!(f, "multiboot header at offset {offset:#x} has a bad checksum")
            }
            Self::UnsupportedMultibootFlags(bits) => {
                write!(f, "multiboot header requires unsupported features {bits:#x}")
            }
            Self::BadAoutKludge(why) => write!(f, "bad multiboot address fields: {why}"),
            Self::CmdlineTooLong { len, max } => {
                write!(f, "command line of {len} bytes is longer than {max}")
            }
            Self::CmdlineHasNul => write!(f, "command line contains a NUL byte"),
            Self::BootInfoFull => write!(f, "multiboot modules and strings do not fit the info area"),
            Self::BadLinux(why) => write!(f, "bad Linux kernel: {why}"),
            Self::LinuxProtocol(v) => write!(
                f,
                "Linux boot protocol {}.{:02} is older than {}.{:02} (no 64-bit entry point)",
                v >> 8,
                v & 0xff,
                linux::MIN_PROTOCOL >> 8,
                linux::MIN_PROTOCOL & 0xff
            ),
            Self::InitrdTooBig { size, room } => write!(
                f,
                "initrd of {size:#x} bytes does not fit the {room:#x} bytes of RAM between the \
                 kernel's init_size and its initrd_addr_max or the end of RAM"
            ),
        }
    }
}

/// Loads `req.image` into `ram` according to `req.cfg.kind`.
pub fn load(ram: &mut [u8], req: &LoadRequest) -> Result<InitialState, LoadError> {
    match req.cfg.kind {
        GuestKind::Flat => flat::load(ram, req),
        GuestKind::Elf => elf::load(ram, req),
        GuestKind::Multiboot => multiboot::load(ram, req),
        GuestKind::Linux => linux::load(ram, req),
        GuestKind::Snapshot => Err(LoadError::IsSnapshot),
    }
}

// ---- Layout (see the table in the module comment) ----

pub const GDT_ADDR: u64 = 0x1000;
pub const CMDLINE_ADDR: u64 = 0x2000;
/// Longest command line, not counting the terminating NUL.
pub const CMDLINE_MAX: usize = 4095;
pub const PML4_ADDR: u64 = 0x3000;
pub const PDPT_ADDR: u64 = 0x4000;
/// First of the four page directories (0x5000, 0x6000, 0x7000, 0x8000).
pub const PD_ADDR: u64 = 0x5000;
/// The area ELF images must leave alone.
pub const BOOT_AREA: Range<u64> = 0x1000..0xb000;
/// Bytes left unused at the very top of RAM, above the initial stack.
pub const STACK_TOP_RESERVE: u64 = 0x1000;
/// Size of the initial stack area below the reserve; images may not overlap it.
pub const STACK_SIZE: u64 = 0x10000;
/// ELF and multiboot guests need at least this much RAM (the 1 MiB PC area plus room above).
pub const MIN_RAM: u64 = 2 << 20;
/// Flat images must start above the real-mode IVT (0..0x400) and BIOS data area (0x400..0x500).
pub const FLAT_MIN_LOAD: u64 = 0x500;
/// Flat images must end below 1 MiB, the real-mode address space.
pub const REAL_MODE_LIMIT: u64 = 0x10_0000;

// ---- The GDT shared by the ELF and multiboot loaders ----

pub const CODE32_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const CODE64_SELECTOR: u16 = 0x18;
/// Null, 32-bit code, data, 64-bit code; base 0, limit 4 GiB (G = 1), DPL 0. The type fields have
/// the accessed bit set (0xb code, 0x3 data) so they equal what the VMCS guest access rights must
/// hold for a usable segment (SDM 26.3.1.2) and the CPU never writes the GDT to set it.
/// Descriptor format: SDM Vol. 3A 3.4.5; the L bit (53) makes the last one 64-bit code (5.2.1).
pub const GDT_ENTRIES: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00af_9b00_0000_ffff,
];
pub const GDT_LIMIT: u16 = (GDT_ENTRIES.len() * 8 - 1) as u16;

// ---- Architectural bits (SDM Vol. 3A 2.5, 2.2.1) ----

pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// RSP for ELF and multiboot guests: 16-byte aligned, [`STACK_TOP_RESERVE`] below the top.
pub fn initial_stack_top(ram_len: u64) -> u64 {
    ram_len.saturating_sub(STACK_TOP_RESERVE) & !0xf
}

/// The stack area images must not overlap: `STACK_SIZE` below the stack top up to the end of RAM.
fn stack_area(ram_len: u64) -> Range<u64> {
    initial_stack_top(ram_len).saturating_sub(STACK_SIZE)..ram_len
}

// ---- Guest RAM access with every bound checked ----

/// Guest RAM as the loaders see it: writes are checked against its length and, for image data,
/// against the reserved areas.
pub(crate) struct GuestRam<'a> {
    bytes: &'a mut [u8],
    /// The areas image data may not overlap ([`Self::check_free`]), each with its name.
    reserved: Vec<(Range<u64>, &'static str)>,
}

impl<'a> GuestRam<'a> {
    /// RAM whose reserved areas are the ELF and flat loaders' boot area and initial stack.
    pub(crate) fn new(bytes: &'a mut [u8]) -> Self {
        let len = bytes.len() as u64;
        let reserved = alloc::vec![
            (BOOT_AREA, "boot structures"),
            (stack_area(len), "initial stack"),
        ];
        Self { bytes, reserved }
    }

    /// RAM with the given reserved areas instead (the multiboot loader's own layout).
    pub(crate) fn with_reserved(
        bytes: &'a mut [u8],
        reserved: Vec<(Range<u64>, &'static str)>,
    ) -> Self {
        Self { bytes, reserved }
    }

    pub(crate) fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The byte range `addr..addr+size` of RAM, or `OutsideRam` naming `what`.
    fn range(&self, what: &'static str, addr: u64, size: u64) -> Result<Range<usize>, LoadError> {
        let outside = LoadError::OutsideRam { what, addr, size };
        let end = addr.checked_add(size).ok_or(outside.clone())?;
        if end > self.len() {
            return Err(outside);
        }
        // Both fit in usize: they are at most the slice length.
        Ok(addr as usize..end as usize)
    }

    pub(crate) fn write(
        &mut self,
        what: &'static str,
        addr: u64,
        data: &[u8],
    ) -> Result<(), LoadError> {
        let r = self.range(what, addr, data.len() as u64)?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }

    pub(crate) fn zero(
        &mut self,
        what: &'static str,
        addr: u64,
        size: u64,
    ) -> Result<(), LoadError> {
        let r = self.range(what, addr, size)?;
        self.bytes[r].fill(0);
        Ok(())
    }

    pub(crate) fn write_u32(&mut self, addr: u64, v: u32) -> Result<(), LoadError> {
        self.write("boot structure", addr, &v.to_le_bytes())
    }

    pub(crate) fn write_u64(&mut self, addr: u64, v: u64) -> Result<(), LoadError> {
        self.write("boot structure", addr, &v.to_le_bytes())
    }

    /// Checks that `addr..addr+size` is inside RAM and clear of the reserved areas.
    pub(crate) fn check_free(
        &self,
        what: &'static str,
        addr: u64,
        size: u64,
    ) -> Result<(), LoadError> {
        self.range(what, addr, size)?;
        let end = addr + size; // cannot overflow: checked by `range`
        for (area, name) in self.reserved.iter().cloned() {
            if size != 0 && addr < area.end && area.start < end {
                return Err(LoadError::Overlaps {
                    what,
                    addr,
                    size,
                    area: name,
                });
            }
        }
        Ok(())
    }

    /// Writes the shared GDT at [`GDT_ADDR`].
    pub(crate) fn write_gdt(&mut self) -> Result<(), LoadError> {
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            self.write_u64(GDT_ADDR + 8 * i as u64, *d)?;
        }
        Ok(())
    }

    /// Writes `cmdline` NUL-terminated at [`CMDLINE_ADDR`]; returns that address.
    pub(crate) fn write_cmdline(&mut self, cmdline: &str) -> Result<u64, LoadError> {
        self.write_cstr(CMDLINE_ADDR, cmdline, CMDLINE_MAX)?;
        Ok(CMDLINE_ADDR)
    }

    /// Writes `s` plus a NUL at `addr`, refusing strings longer than `max` or holding a NUL.
    pub(crate) fn write_cstr(&mut self, addr: u64, s: &str, max: usize) -> Result<(), LoadError> {
        if s.len() > max {
            return Err(LoadError::CmdlineTooLong { len: s.len(), max });
        }
        if s.as_bytes().contains(&0) {
            return Err(LoadError::CmdlineHasNul);
        }
        self.write("string", addr, s.as_bytes())?;
        self.write("string", addr + s.len() as u64, &[0])
    }

    /// Refuses RAM smaller than [`MIN_RAM`] (ELF and multiboot guests).
    pub(crate) fn require(&self, needed: u64) -> Result<(), LoadError> {
        if self.len() < needed {
            return Err(LoadError::RamTooSmall {
                needed,
                have: self.len(),
            });
        }
        Ok(())
    }
}

// ---- Little-endian reads from untrusted images ----

pub(crate) fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

pub(crate) fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::manifest::{GuestConfig, GuestKind};
    use alloc::string::{String, ToString};
    use alloc::vec::Vec;

    pub fn config(kind: GuestKind, memory: u64, cmdline: &str) -> GuestConfig {
        GuestConfig {
            name: "t".to_string(),
            kind,
            image: "t.img".to_string(),
            memory,
            cmdline: cmdline.to_string(),
            load: crate::manifest::DEFAULT_FLAT_LOAD,
            entry: crate::manifest::DEFAULT_FLAT_LOAD,
            modules: Vec::<String>::new(),
            restart: 0,
            vcpus: 1,
            cpus: None,
            weight: 1,
            cap: None,
            refuse: false,
            apicv: Some(true),
            on_demand: false,
            autostart: true,
        }
    }

    pub fn u32_at(ram: &[u8], addr: u64) -> u32 {
        super::read_u32(ram, addr as usize).expect("address inside test RAM")
    }

    pub fn u64_at(ram: &[u8], addr: u64) -> u64 {
        super::read_u64(ram, addr as usize).expect("address inside test RAM")
    }

    /// The NUL-terminated string at `addr`.
    pub fn cstr_at(ram: &[u8], addr: u64) -> &str {
        let tail = &ram[addr as usize..];
        let end = tail.iter().position(|&b| b == 0).expect("NUL terminator");
        core::str::from_utf8(&tail[..end]).expect("UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn gdt_descriptors_are_flat() {
        // Limit 0xfffff with G = 1 and base 0 in every non-null descriptor.
        for d in &GDT_ENTRIES[1..] {
            assert_eq!(d & 0xffff, 0xffff);
            assert_eq!((d >> 48) & 0xf, 0xf);
            assert_eq!((d >> 16) & 0xff_ffff, 0);
            assert_eq!(d >> 56, 0);
            assert_ne!(d & (1 << 47), 0, "present");
            assert_ne!(d & (1 << 55), 0, "granularity");
        }
        // D/B = 1 and L = 0 for code32, D/B = 0 and L = 1 for code64.
        let code32 = GDT_ENTRIES[usize::from(CODE32_SELECTOR / 8)];
        let code64 = GDT_ENTRIES[usize::from(CODE64_SELECTOR / 8)];
        assert_eq!((code32 >> 53) & 3, 0b10);
        assert_eq!((code64 >> 53) & 3, 0b01);
        assert_eq!(GDT_LIMIT, 31);
    }

    #[test]
    fn checked_ram_writes() {
        let mut bytes = vec![0u8; 0x20_0000];
        let mut ram = GuestRam::new(&mut bytes);
        assert!(ram.write("x", 0x1f_fffe, &[1, 2]).is_ok());
        assert!(matches!(
            ram.write("x", 0x1f_ffff, &[1, 2]),
            Err(LoadError::OutsideRam { .. })
        ));
        assert!(matches!(
            ram.zero("x", u64::MAX, 2),
            Err(LoadError::OutsideRam { .. })
        ));
        assert!(ram.check_free("x", 0x10_0000, 0x1000).is_ok());
        assert!(ram.check_free("x", 0xb000, 0x1000).is_ok());
        assert!(ram.check_free("x", 0x0, 0x1000).is_ok());
        let e = ram.check_free("x", 0xa000, 0x2000).unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::Overlaps {
                    area: "boot structures",
                    ..
                }
            ),
            "{e}"
        );
        // The stack area is the top 0x11000 bytes of RAM.
        assert!(ram.check_free("x", 0x1e_e000, 0x1000).is_ok());
        let e = ram.check_free("x", 0x1e_f000, 0x10).unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::Overlaps {
                    area: "initial stack",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(initial_stack_top(0x20_0000), 0x1f_f000);
    }

    #[test]
    fn cmdline_limits() {
        let mut bytes = vec![0xffu8; 0x4000];
        let mut ram = GuestRam::new(&mut bytes);
        assert_eq!(ram.write_cmdline("a b"), Ok(CMDLINE_ADDR));
        assert_eq!(test_util::cstr_at(&bytes, CMDLINE_ADDR), "a b");
        let mut ram = GuestRam::new(&mut bytes);
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert_eq!(
            ram.write_cmdline(&long),
            Err(LoadError::CmdlineTooLong {
                len: CMDLINE_MAX + 1,
                max: CMDLINE_MAX
            })
        );
        assert_eq!(ram.write_cmdline("a\0b"), Err(LoadError::CmdlineHasNul));
        assert!(ram.write_cmdline(&long[1..]).is_ok());
    }

    #[test]
    fn reads_reject_short_input() {
        assert_eq!(read_u16(&[1, 2], 0), Some(0x0201));
        assert_eq!(read_u16(&[1, 2], 1), None);
        assert_eq!(read_u32(&[1, 2, 3], 0), None);
        assert_eq!(read_u64(&[0; 8], usize::MAX), None);
    }

    #[test]
    fn errors_display() {
        let e = LoadError::Overlaps {
            what: "segment",
            addr: 0x1000,
            size: 0x10,
            area: "boot structures",
        };
        assert_eq!(
            alloc::format!("{e}"),
            "segment at 0x1000 (+0x10) overlaps the boot structures"
        );
    }
}
