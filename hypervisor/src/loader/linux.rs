//! Linux kernels (`kind = linux`): the x86 boot protocol's setup header, and the kernel image
//! Keel's ramdisk carries.
//!
//! A distribution kernel is a bzImage: a real-mode setup program, then a compressed payload whose
//! decompressor unpacks `vmlinux` (an ELF64 executable) before jumping to it. Decompressing inside
//! an emulator costs billions of instructions, so `keel-boot` does it when it packs the image: it
//! reads the setup header (Linux `Documentation/arch/x86/boot.rst`, "The real-mode kernel header"),
//! decompresses the payload (`payload_offset`/`payload_length`, protocol 2.08+), keeps the
//! `PT_LOAD` segments of the vmlinux ELF and writes them with the setup header into one
//! [`KernelImage`]. Keel then loads the segments at their physical addresses and enters the
//! kernel's 64-bit entry point directly, as the decompressor would have (boot protocol "64-bit
//! BOOT PROTOCOL": long mode, identity-mapped page tables, `%rsi` = the zero page).
//!
//! The kernel image format, little-endian throughout (version 1):
//!
//! ```text
//! 0   magic "KEELLNX1"
//! 8   u32 version (1)            12  u32 setup header length (bytes from offset 0x1f1)
//! 16  u64 64-bit entry point (physical)
//! 24  u32 number of segments     28  u32 reserved (0)
//! 32  segment table: per segment u64 physical address, u64 offset in this file,
//!     u64 bytes in the file, u64 bytes in memory (the rest is zero-filled)
//! ..  the setup header bytes, then the segments' bytes
//! ```
//!
//! Nothing in an image is trusted: [`KernelImage::parse`] checks every offset and size.
//!
//! # Loading ([`load`])
//!
//! Keel does what a boot loader and the bzImage decompressor would have done by the time the
//! decompressor jumps to the kernel (boot.rst "64-bit BOOT PROTOCOL"; the `boot_params` layout is
//! Linux `Documentation/arch/x86/zero-page.rst`):
//!
//! ```text
//! 0x00000 - 0x8ffff   RAM (e820 usable): the kernel puts its real-mode trampoline here
//! 0x90000 - 0x90fff   boot_params ("zero page"), RSI at entry        \
//! 0x91000 - 0x91fff   command line, NUL-terminated                    |
//! 0x92000 - 0x92fff   GDT: null, null, 0x10 code64, 0x18 data          | e820 reserved
//! 0x93000 - 0x98fff   PML4, PDPT, 4 page directories (0-4 GiB, 2 MiB)  |
//! 0x99000 - 0x9efff   initial stack (RSP = 0x9f000)                   |
//! 0x9fc00 - 0xfffff   EBDA, VGA hole, BIOS area (ACPI tables)         /
//! 0x100000 - end      RAM (e820 usable): the kernel's segments at their physical addresses
//!                     (16 MiB for a distribution kernel), the initrd at the top, page aligned
//! ```
//!
//! The kernel is entered in long mode at its 64-bit entry (`startup_64` of vmlinux) with
//! CS = `__BOOT_CS` (0x10), DS/ES/SS = `__BOOT_DS` (0x18), interrupts off, paging on with the
//! identity map above (it covers the kernel, the zero page, the command line and the initrd).

use super::elf::{write_identity_map, IDENTITY_MAP_BYTES};
use super::{
    CpuMode, GuestRam, InitialState, LoadError, LoadRequest, CMDLINE_MAX, CODE64_SELECTOR, CR0_ET,
    CR0_NE, CR0_PE, CR0_PG, CR4_PAE, DATA_SELECTOR, EFER_LMA, EFER_LME, GDT_ENTRIES,
};
use alloc::vec::Vec;
use core::ops::Range;

/// Offset of the setup header in a bzImage (and in `boot_params`, the "zero page").
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `boot_flag` at 0x1fe.
const BOOT_FLAG: u16 = 0xaa55;
/// `header` at 0x202: "HdrS".
const HDRS: u32 = 0x5372_6448;
/// The oldest boot protocol Keel loads: 2.12 has `xloadflags` (whether a 64-bit entry exists).
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `xloadflags` bit 0: the kernel has the legacy 64-bit entry point (boot.rst, XLF_KERNEL_64).
pub const XLF_KERNEL_64: u16 = 1 << 0;

const MAGIC: &[u8; 8] = b"KEELLNX1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const SEGMENT_ENTRY_LEN: usize = 32;
/// A setup header is at most 0x290 - 0x1f1 bytes (boot_params has room up to 0x290).
pub const MAX_SETUP_LEN: usize = 0x290 - SETUP_HEADER_OFFSET;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The fields of a bzImage's setup header that a loader reads (boot.rst, offsets from the file's
/// start, which is also their offset in `boot_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// Boot protocol version (0x206), e.g. 0x020f.
    pub protocol: u16,
    /// The header bytes from 0x1f1 to its end (0x202 + the jump offset at 0x201).
    pub setup: &'a [u8],
    /// The compressed vmlinux (`payload_offset`/`payload_length`).
    pub payload: &'a [u8],
    /// `xloadflags` (0x236).
    pub xloadflags: u16,
    /// `init_size` (0x260): memory the kernel needs from its load address during boot.
    pub init_size: u32,
    /// `pref_address` (0x258).
    pub pref_address: u64,
}

impl<'a> BzImage<'a> {
    /// Does `image` carry a setup header ("HdrS" at 0x202, boot flag 0xaa55 at 0x1fe)?
    pub fn is_bzimage(image: &[u8]) -> bool {
        u16_at(image, 0x1fe) == Some(BOOT_FLAG) && u32_at(image, 0x202) == Some(HDRS)
    }

    /// Reads the setup header and finds the payload. Refuses protocols before 2.12 (no
    /// `xloadflags`) and kernels without a 64-bit entry point.
    pub fn parse(image: &'a [u8]) -> Result<Self, LoadError> {
        if !Self::is_bzimage(image) {
            return Err(LoadError::BadLinux(
                "no setup header (boot flag 0xaa55 and \"HdrS\")",
            ));
        }
        let protocol = u16_at(image, 0x206).ok_or(LoadError::BadLinux("truncated header"))?;
        if protocol < MIN_PROTOCOL {
            return Err(LoadError::LinuxProtocol(protocol));
        }
        // The header ends where the jump at 0x200 lands: 0x202 + its 8-bit displacement.
        let end = 0x202 + usize::from(image[0x201]);
        if !(zp::MIN_HEADER_END..=SETUP_HEADER_OFFSET + MAX_SETUP_LEN).contains(&end)
            || end > image.len()
        {
            return Err(LoadError::BadLinux("setup header length out of range"));
        }
        let setup = &image[SETUP_HEADER_OFFSET..end];
        let field32 = |off| u32_at(image, off).ok_or(LoadError::BadLinux("truncated header"));
        let xloadflags = u16_at(image, 0x236).ok_or(LoadError::BadLinux("truncated header"))?;
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LoadError::BadLinux(
                "the kernel has no 64-bit entry point (xloadflags.XLF_KERNEL_64 clear)",
            ));
        }
        // The protected-mode kernel starts after the boot sector and `setup_sects` sectors
        // (0 means 4, boot.rst); payload_offset counts from there.
        let sects = match image[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let pm_start = (sects + 1) * 512;
        let offset = field32(0x248)? as usize;
        let length = field32(0x24c)? as usize;
        let payload = pm_start
            .checked_add(offset)
            .and_then(|s| Some(s..s.checked_add(length)?))
            .and_then(|r| image.get(r))
            .ok_or(LoadError::BadLinux("payload outside the file"))?;
        Ok(Self {
            protocol,
            setup,
            payload,
            xloadflags,
            init_size: field32(0x260)?,
            pref_address: u64_at(image, 0x258).ok_or(LoadError::BadLinux("truncated header"))?,
        })
    }
}

/// One piece of the kernel in guest-physical memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSegment<'a> {
    pub paddr: u64,
    pub data: &'a [u8],
    /// At least `data.len()`; the rest is zero (bss).
    pub memsz: u64,
}

/// A Linux kernel as Keel's ramdisk carries it (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage<'a> {
    /// The setup header, from `boot_params` offset 0x1f1.
    pub setup: &'a [u8],
    /// Physical address of the 64-bit entry point (`startup_64`).
    pub entry: u64,
    pub segments: Vec<KernelSegment<'a>>,
}

impl<'a> KernelImage<'a> {
    pub fn is_kernel_image(image: &[u8]) -> bool {
        image.starts_with(MAGIC)
    }

    /// Writes the image format.
    pub fn pack(&self) -> Vec<u8> {
        let table = HEADER_LEN + SEGMENT_ENTRY_LEN * self.segments.len();
        let data_len: usize = self.segments.iter().map(|s| s.data.len()).sum();
        let mut out = Vec::with_capacity(table + self.setup.len() + data_len);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.setup.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.entry.to_le_bytes());
        out.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut offset = (table + self.setup.len()) as u64;
        for s in &self.segments {
            for v in [s.paddr, offset, s.data.len() as u64, s.memsz] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            offset += s.data.len() as u64;
        }
        out.extend_from_slice(self.setup);
        for s in &self.segments {
            out.extend_from_slice(s.data);
        }
        out
    }

    /// Reads an image, checking every offset and size against the file.
    pub fn parse(image: &'a [u8]) -> Result<Self, LoadError> {
        let bad = LoadError::BadLinux;
        if !Self::is_kernel_image(image) {
            return Err(bad(
                "not a Keel Linux kernel image (pack it with `cargo keel image`)",
            ));
        }
        let truncated = || bad("kernel image truncated");
        if u32_at(image, 8).ok_or_else(truncated)? != VERSION {
            return Err(bad(
                "kernel image of another version: repack it with this keel-boot",
            ));
        }
        let setup_len = u32_at(image, 12).ok_or_else(truncated)? as usize;
        if setup_len > MAX_SETUP_LEN {
            return Err(bad("setup header too long"));
        }
        let entry = u64_at(image, 16).ok_or_else(truncated)?;
        let n = u32_at(image, 24).ok_or_else(truncated)? as usize;
        let table_end = n
            .checked_mul(SEGMENT_ENTRY_LEN)
            .and_then(|t| t.checked_add(HEADER_LEN))
            .filter(|&t| t <= image.len())
            .ok_or_else(truncated)?;
        let setup = image
            .get(table_end..table_end + setup_len)
            .ok_or_else(truncated)?;
        let mut segments = Vec::with_capacity(n);
        for i in 0..n {
            let e = HEADER_LEN + i * SEGMENT_ENTRY_LEN;
            let f = |k: usize| u64_at(image, e + 8 * k).ok_or_else(truncated);
            let (paddr, offset, filesz, memsz) = (f(0)?, f(1)?, f(2)?, f(3)?);
            if filesz > memsz {
                return Err(bad("segment larger in the file than in memory"));
            }
            let data = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(filesz).ok())
                .and_then(|(o, l)| image.get(o..o.checked_add(l)?))
                .ok_or_else(truncated)?;
            segments.push(KernelSegment { paddr, data, memsz });
        }
        if segments.is_empty() {
            return Err(bad("kernel image without segments"));
        }
        Ok(Self {
            setup,
            entry,
            segments,
        })
    }

    /// Builds the image from a vmlinux ELF64 (its `PT_LOAD` segments at their physical addresses,
    /// its entry point made physical) and a setup header (from the bzImage, or empty for a bare
    /// vmlinux: the loader then writes a minimal one).
    pub fn from_vmlinux(elf: &'a [u8], setup: &'a [u8]) -> Result<Self, LoadError> {
        let parsed = super::elf::parse(elf)?;
        if !parsed.is_64 {
            return Err(LoadError::BadLinux(
                "vmlinux is not an ELF64 x86-64 executable",
            ));
        }
        if setup.len() > MAX_SETUP_LEN {
            return Err(LoadError::BadLinux("setup header too long"));
        }
        let mut segments = Vec::new();
        let mut entry = None;
        for s in &parsed.segments {
            // In range: `elf::parse` checked offset + filesz against the file.
            let data = &elf[s.offset as usize..(s.offset + s.filesz) as usize];
            // Trailing zeros need not travel: the loader zero-fills up to `memsz` (vmlinux keeps
            // its .bss and page-aligned padding in the file, about 14 MiB of Debian's kernel).
            let data = &data[..data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)];
            // The entry point is virtual (0xffffffff81000000 + ...) or already physical; it is
            // translated by the segment that contains it.
            let delta = parsed.entry.wrapping_sub(s.vaddr);
            if delta < s.memsz {
                entry = Some(s.paddr + delta);
            } else if parsed.entry.wrapping_sub(s.paddr) < s.memsz {
                entry = Some(parsed.entry);
            }
            segments.push(KernelSegment {
                paddr: s.paddr,
                data,
                memsz: s.memsz,
            });
        }
        let entry = entry.ok_or(LoadError::BadLinux("the entry point is in no segment"))?;
        Ok(Self {
            setup,
            entry,
            segments,
        })
    }
}

// ---- Loading: the zero page, the e820 map, long mode ----

/// Where the loader's own structures go: from here to 1 MiB is e820-reserved.
pub const BOOT_AREA_START: u64 = 0x9_0000;
pub const BOOT_PARAMS_ADDR: u64 = 0x9_0000;
pub const CMDLINE_ADDR: u64 = 0x9_1000;
pub const GDT_ADDR: u64 = 0x9_2000;
/// The PML4; the PDPT and the page directories follow it.
pub const PML4_ADDR: u64 = 0x9_3000;
/// The initial stack: from `STACK_BOTTOM` up to `STACK_TOP` (24 KiB), above the page tables.
pub const STACK_BOTTOM: u64 = 0x9_9000;
pub const STACK_TOP: u64 = 0x9_f000;
/// RAM above the PC's BIOS area, where the kernel and the initrd go.
pub const HIGH_RAM_START: u64 = 0x10_0000;
const PAGE: u64 = 0x1000;
const _: () = assert!(PML4_ADDR + IDENTITY_MAP_BYTES <= STACK_BOTTOM);

/// Linux's boot GDT: `__BOOT_CS` = 0x10 (64-bit code), `__BOOT_DS` = 0x18 (data), both flat
/// (boot.rst: "__BOOT_CS must have execute/read permission, and __BOOT_DS must have read/write
/// permission"); the descriptors are the shared loader GDT's.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const LINUX_GDT: [u64; 4] = [
    0,
    0,
    GDT_ENTRIES[(CODE64_SELECTOR / 8) as usize],
    GDT_ENTRIES[(DATA_SELECTOR / 8) as usize],
];

/// `boot_params.acpi_rsdp_addr`: where Keel installs the guest's ACPI tables (`acpi::install`,
/// called by the hypervisor after the loader, in the e820-reserved BIOS area). The kernel would
/// also find the RSDP by scanning 0xE0000-0xFFFFF.
pub const ACPI_RSDP_ADDR: u64 = crate::acpi::RSDP_ADDR;

/// Offsets in `boot_params` (zero-page.rst) and its setup header (boot.rst).
mod zp {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const SETUP_DATA: usize = 0x250;
    pub const INIT_SIZE: usize = 0x260;
    /// The header must reach past `init_size` (0x260..0x264) for the loader to read it.
    pub const MIN_HEADER_END: usize = 0x264;
    pub const E820_TABLE: usize = 0x2d0;
    /// `E820_MAX_ENTRIES_ZEROPAGE`.
    pub const E820_MAX: usize = 128;
    pub const SIZE: usize = 0x1000;
}

/// `type_of_loader` 0xff: a boot loader without an assigned id (boot.rst).
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags` bit 0: the protected-mode code is loaded at 0x100000 (always, for 64-bit entry).
/// Every other bit is cleared: no KASLR done (bit 1), no QUIET (5), no heap (CAN_USE_HEAP, 7:
/// there is no real-mode setup code to use one).
pub const LOADED_HIGH: u8 = 1 << 0;
/// The minimal header for a bare vmlinux: the protocol this loader implements.
const OWN_PROTOCOL: u16 = 0x020f;
/// A bare vmlinux has no `cmdline_size`: x86's `COMMAND_LINE_SIZE` is 2048 with the NUL.
const DEFAULT_CMDLINE_SIZE: u32 = 2047;
/// A bare vmlinux has no `initrd_addr_max`: anywhere below 2 GiB (boot.rst's value for 2.03+
/// kernels is 0x37ffffff only for protocols that lack the field).
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;

/// e820 types (zero-page.rst, `E820_TYPE_RAM` and `E820_TYPE_RESERVED`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the e820 map as `boot_params` holds it: u64 address, u64 size, u32 type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map a Linux guest with `ram_len` bytes of RAM gets: low RAM up to the loader's
/// boot structures, the boot structures and the BIOS area reserved up to 1 MiB, RAM above.
pub fn e820_map(ram_len: u64) -> [E820Entry; 3] {
    [
        E820Entry {
            addr: 0,
            size: BOOT_AREA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: BOOT_AREA_START,
            size: HIGH_RAM_START - BOOT_AREA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_RAM_START,
            size: ram_len.saturating_sub(HIGH_RAM_START),
            kind: E820_RAM,
        },
    ]
}

/// The zero page being built.
struct ZeroPage([u8; zp::SIZE]);

impl ZeroPage {
    fn put(&mut self, off: usize, bytes: &[u8]) {
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32_at(&self.0, off).unwrap_or(0)
    }
}

/// `addr..addr + size`, or `OutsideRam` when it wraps.
fn span(what: &'static str, addr: u64, size: u64) -> Result<Range<u64>, LoadError> {
    let end = addr
        .checked_add(size)
        .ok_or(LoadError::OutsideRam { what, addr, size })?;
    Ok(addr..end)
}

/// Loads a Linux kernel image (and the initrd, `req.modules[0]` if given) and returns the CPU
/// state of the 64-bit boot protocol; see the module comment for the layout.
pub fn load(ram: &mut [u8], req: &LoadRequest) -> Result<InitialState, LoadError> {
    let initrd = match req.modules {
        [] => None,
        [(_, data)] => Some(*data),
        _ => return Err(LoadError::BadLinux("a Linux guest takes one initrd")),
    };
    let k = KernelImage::parse(req.image)?;
    let mut ram = GuestRam::new(ram);
    let ram_len = ram.len();

    // The zero page: the kernel's own setup header at 0x1f1, or a minimal one.
    let mut zp = ZeroPage([0; zp::SIZE]);
    if k.setup.is_empty() {
        zp.put(zp::BOOT_FLAG, &BOOT_FLAG.to_le_bytes());
        zp.put(zp::HEADER, &HDRS.to_le_bytes());
        zp.put(zp::VERSION, &OWN_PROTOCOL.to_le_bytes());
        zp.put(zp::CMDLINE_SIZE, &DEFAULT_CMDLINE_SIZE.to_le_bytes());
        zp.put(zp::INITRD_ADDR_MAX, &DEFAULT_INITRD_ADDR_MAX.to_le_bytes());
    } else {
        if SETUP_HEADER_OFFSET + k.setup.len() < zp::MIN_HEADER_END {
            return Err(LoadError::BadLinux("setup header too short"));
        }
        zp.put(SETUP_HEADER_OFFSET, k.setup);
        if !BzImage::is_bzimage(&zp.0) {
            return Err(LoadError::BadLinux(
                "no setup header (boot flag 0xaa55 and \"HdrS\")",
            ));
        }
        let protocol = u16_at(&zp.0, zp::VERSION).unwrap_or(0);
        if protocol < MIN_PROTOCOL {
            return Err(LoadError::LinuxProtocol(protocol));
        }
    }

    // The kernel's segments: above 1 MiB, none on another (whether RAM holds them is the
    // init_size check below).
    for (i, s) in k.segments.iter().enumerate() {
        let r = span("kernel segment", s.paddr, s.memsz)?;
        let overlap = |area| LoadError::Overlaps {
            what: "kernel segment",
            addr: s.paddr,
            size: s.memsz,
            area,
        };
        if s.paddr < HIGH_RAM_START {
            return Err(overlap("first MiB (boot structures and BIOS area)"));
        }
        for t in &k.segments[..i] {
            if s.paddr < t.paddr + t.memsz && t.paddr < r.end {
                return Err(overlap("another kernel segment"));
            }
        }
    }
    // Checked above: no segment wraps.
    let start = k.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
    let end = k
        .segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(0);
    if !k
        .segments
        .iter()
        .any(|s| s.paddr <= k.entry && k.entry - s.paddr < s.memsz)
    {
        return Err(LoadError::EntryOutsideImage { entry: k.entry });
    }
    // init_size: what the kernel needs from its load address before it reads the memory map
    // (at least the segments themselves).
    let init_size = u64::from(zp.get_u32(zp::INIT_SIZE));
    let needed = end.max(span("kernel (init_size)", start, init_size)?.end);
    if needed > ram_len {
        return Err(LoadError::RamTooSmall {
            needed,
            have: ram_len,
        });
    }

    // The command line, at most `cmdline_size` bytes before the NUL.
    let cmdline_max = (zp.get_u32(zp::CMDLINE_SIZE) as usize).min(CMDLINE_MAX);
    ram.write_cstr(CMDLINE_ADDR, &req.cfg.cmdline, cmdline_max)?;

    // The initrd: as high as RAM and `initrd_addr_max` allow, page aligned, above init_size.
    let (initrd_addr, initrd_size) = match initrd {
        None | Some([]) => (0, 0),
        Some(data) => {
            let size = data.len() as u64;
            let top = ram_len.min(u64::from(zp.get_u32(zp::INITRD_ADDR_MAX)) + 1);
            let floor = (needed + PAGE - 1) & !(PAGE - 1);
            let too_big = LoadError::InitrdTooBig {
                size,
                room: top.saturating_sub(floor),
            };
            let addr = top.checked_sub(size).ok_or(too_big.clone())? & !(PAGE - 1);
            if addr < floor {
                return Err(too_big);
            }
            ram.write("initrd", addr, data)?;
            (addr, size)
        }
    };

    for s in &k.segments {
        ram.write("kernel segment", s.paddr, s.data)?;
        ram.zero(
            "kernel bss",
            s.paddr + s.data.len() as u64,
            s.memsz - s.data.len() as u64,
        )?;
    }

    zp.0[zp::TYPE_OF_LOADER] = LOADER_UNDEFINED;
    zp.0[zp::LOADFLAGS] = LOADED_HIGH;
    zp.put(zp::HEAP_END_PTR, &0u16.to_le_bytes());
    zp.put(zp::SETUP_DATA, &0u64.to_le_bytes());
    zp.put(zp::CMD_LINE_PTR, &(CMDLINE_ADDR as u32).to_le_bytes());
    zp.put(zp::EXT_CMD_LINE_PTR, &0u32.to_le_bytes());
    zp.put(zp::RAMDISK_IMAGE, &(initrd_addr as u32).to_le_bytes());
    zp.put(zp::RAMDISK_SIZE, &(initrd_size as u32).to_le_bytes());
    zp.put(
        zp::EXT_RAMDISK_IMAGE,
        &((initrd_addr >> 32) as u32).to_le_bytes(),
    );
    zp.put(
        zp::EXT_RAMDISK_SIZE,
        &((initrd_size >> 32) as u32).to_le_bytes(),
    );
    zp.put(zp::ACPI_RSDP_ADDR, &ACPI_RSDP_ADDR.to_le_bytes());
    let map = e820_map(ram_len);
    const _: () = assert!(3 <= zp::E820_MAX);
    zp.0[zp::E820_ENTRIES] = map.len() as u8;
    for (i, e) in map.iter().enumerate() {
        let at = zp::E820_TABLE + 20 * i;
        zp.put(at, &e.addr.to_le_bytes());
        zp.put(at + 8, &e.size.to_le_bytes());
        zp.put(at + 16, &e.kind.to_le_bytes());
    }
    ram.write("boot_params", BOOT_PARAMS_ADDR, &zp.0)?;

    for (i, d) in LINUX_GDT.iter().enumerate() {
        ram.write_u64(GDT_ADDR + 8 * i as u64, *d)?;
    }
    write_identity_map(&mut ram, PML4_ADDR)?;
    Ok(InitialState {
        rip: k.entry,
        rsp: STACK_TOP,
        rsi: BOOT_PARAMS_ADDR,
        cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3: PML4_ADDR,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        gdtr_base: GDT_ADDR,
        gdtr_limit: (LINUX_GDT.len() * 8 - 1) as u16,
        code_selector: BOOT_CS,
        data_selector: BOOT_DS,
        ..InitialState::new(CpuMode::Long)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::build::{elf, Seg};

    /// A bzImage with the fields a loader reads: protocol 2.15, one setup sector, a payload.
    pub(crate) fn bzimage(payload: &[u8], xloadflags: u16) -> Vec<u8> {
        let mut b = vec![0u8; 2 * 512];
        b[0x1f1] = 1;
        b[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        b[0x200] = 0xeb;
        b[0x201] = 0x6a; // header ends at 0x26c
        b[0x202..0x206].copy_from_slice(&HDRS.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x300_0000u32.to_le_bytes());
        b.extend_from_slice(&[0xcc; 16]);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn bzimage_header_and_payload() {
        let img = bzimage(b"PAYLOAD!", 0x7f);
        let bz = BzImage::parse(&img).unwrap();
        assert_eq!(bz.payload, b"PAYLOAD!");
        assert_eq!(bz.protocol, 0x020f);
        assert_eq!(bz.setup.len(), 0x26c - 0x1f1);
        assert_eq!(bz.setup[0], 1, "setup_sects is the header's first byte");
        assert_eq!((bz.init_size, bz.pref_address), (0x300_0000, 0x100_0000));
    }

    #[test]
    fn bzimage_refusals() {
        let mut old = bzimage(b"x", 1);
        old[0x206..0x208].copy_from_slice(&0x0208u16.to_le_bytes());
        assert_eq!(BzImage::parse(&old), Err(LoadError::LinuxProtocol(0x0208)));
        let no64 = bzimage(b"x", 0);
        assert!(
            matches!(BzImage::parse(&no64), Err(LoadError::BadLinux(m)) if m.contains("64-bit"))
        );
        let mut cut = bzimage(b"12345678", 1);
        cut.truncate(cut.len() - 1);
        assert_eq!(
            BzImage::parse(&cut),
            Err(LoadError::BadLinux("payload outside the file"))
        );
        assert!(!BzImage::is_bzimage(b"\x7fELF"));
        assert!(BzImage::parse(&[0u8; 100]).is_err());
    }

    #[test]
    fn image_round_trip_with_physical_entry() {
        // Linked like vmlinux: virtual 0xffffffff81000000 at physical 0x1000000.
        let text = [0x90u8; 64];
        let mut segs = [
            Seg::at(0x100_0000, &text, 0),
            Seg::at(0x200_0000, &[1, 2, 3], 0x1000),
        ];
        segs[0].vaddr = 0xffff_ffff_8100_0000;
        segs[1].vaddr = 0xffff_ffff_8200_0000;
        let file = elf(true, 62, 0xffff_ffff_8100_0010, &segs);
        let setup = [7u8; 0x7b];
        let k = KernelImage::from_vmlinux(&file, &setup).unwrap();
        assert_eq!(k.entry, 0x100_0010);
        let packed = k.pack();
        let back = KernelImage::parse(&packed).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.segments[1].memsz, 3 + 0x1000);
        let zeros = elf(
            true,
            62,
            0x100_0000,
            &[Seg::at(0x100_0000, &[9, 0, 0, 0], 4)],
        );
        let z = KernelImage::from_vmlinux(&zeros, &[]).unwrap();
        assert_eq!(
            (z.segments[0].data, z.segments[0].memsz),
            (&[9u8][..], 8),
            "trailing zeros dropped"
        );
        assert_eq!(back.segments[1].data, &[1, 2, 3]);
        assert_eq!(back.setup, &setup);
    }

    #[test]
    fn damaged_images_are_refused() {
        let text = [0x90u8; 64];
        let file = elf(true, 62, 0x100_0000, &[Seg::at(0x100_0000, &text, 0)]);
        let packed = KernelImage::from_vmlinux(&file, &[]).unwrap().pack();
        for cut in [0, 8, 31, packed.len() - 1] {
            assert!(KernelImage::parse(&packed[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = packed.clone();
        v2[8] = 2;
        assert!(
            matches!(KernelImage::parse(&v2), Err(LoadError::BadLinux(m)) if m.contains("version"))
        );
        let mut huge = packed.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(KernelImage::parse(&huge).is_err());
        let mut offset = packed;
        offset[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(KernelImage::parse(&offset).is_err());
        let outside = elf(true, 62, 0x500_0000, &[Seg::at(0x100_0000, &text, 0)]);
        assert_eq!(
            KernelImage::from_vmlinux(&outside, &[]),
            Err(LoadError::BadLinux("the entry point is in no segment"))
        );
        let elf32 = elf(false, 3, 0x100_0000, &[Seg::at(0x100_0000, &text, 0)]);
        assert!(KernelImage::from_vmlinux(&elf32, &[]).is_err());
    }

    // ---- The loader ----

    use crate::loader::test_util::{config, cstr_at, u32_at as ram_u32, u64_at as ram_u64};
    use crate::manifest::GuestKind;
    use alloc::vec;

    const MIB: u64 = 1 << 20;
    const TEXT: [u8; 64] = [0x90; 64];
    const DATA: [u8; 4] = [1, 2, 3, 4];

    /// A kernel like Debian's: text at 16 MiB entered 0x200 in, data at 18 MiB with 8 KiB of
    /// bss, the setup header of [`bzimage`] (init_size 48 MiB, cmdline_size 2047,
    /// initrd_addr_max 0x7fffffff).
    fn kernel_with(setup: &[u8], segments: Vec<KernelSegment>) -> Vec<u8> {
        KernelImage {
            setup,
            entry: 0x100_0200,
            segments,
        }
        .pack()
    }

    fn segments() -> Vec<KernelSegment<'static>> {
        vec![
            KernelSegment {
                paddr: 0x100_0000,
                data: &TEXT,
                memsz: 0x1000,
            },
            KernelSegment {
                paddr: 0x120_0000,
                data: &DATA,
                memsz: 0x2004,
            },
        ]
    }

    fn setup_of(bz: &[u8]) -> Vec<u8> {
        BzImage::parse(bz).unwrap().setup.to_vec()
    }

    fn kernel() -> Vec<u8> {
        kernel_with(&setup_of(&bzimage(b"x", 1)), segments())
    }

    fn boot(
        image: &[u8],
        memory: u64,
        cmdline: &str,
        modules: &[(&str, &[u8])],
    ) -> Result<(InitialState, Vec<u8>), LoadError> {
        let cfg = config(GuestKind::Linux, memory, cmdline);
        let mut ram = vec![0u8; memory as usize];
        // Dirty the bss to see it zeroed.
        ram[0x120_0004..0x120_2004].fill(0xaa);
        let req = LoadRequest {
            cfg: &cfg,
            image,
            modules,
            guest_id: 0,
        };
        crate::loader::load(&mut ram, &req).map(|s| (s, ram))
    }

    fn e820(ram: &[u8]) -> Vec<(u64, u64, u32)> {
        let n = ram[(BOOT_PARAMS_ADDR + 0x1e8) as usize] as u64;
        (0..n)
            .map(|i| {
                let at = BOOT_PARAMS_ADDR + 0x2d0 + 20 * i;
                (
                    ram_u64(ram, at),
                    ram_u64(ram, at + 8),
                    ram_u32(ram, at + 16),
                )
            })
            .collect()
    }

    #[test]
    fn enters_the_64_bit_boot_protocol() {
        let initrd = vec![0x5a; 5000];
        let (s, ram) = boot(
            &kernel(),
            128 * MIB,
            "console=ttyS0 nokaslr",
            &[("rootfs", &initrd)],
        )
        .unwrap();
        // boot.rst 64-bit protocol: long mode, identity paging, __BOOT_CS/__BOOT_DS, IF = 0,
        // RSI = boot_params.
        assert_eq!(s.mode, CpuMode::Long);
        assert_eq!(
            (s.rip, s.rsi, s.rsp, s.rflags),
            (0x100_0200, 0x9_0000, 0x9_f000, 2)
        );
        assert_eq!((s.rdi, s.rax, s.rbx), (0, 0, 0));
        assert_eq!(
            (s.cr0, s.cr3, s.cr4, s.efer),
            (0x8000_0031, 0x9_3000, 0x20, 0x500)
        );
        assert_eq!((s.gdtr_base, s.gdtr_limit), (0x9_2000, 31));
        assert_eq!((s.code_selector, s.data_selector), (0x10, 0x18));
        let gdt: Vec<u64> = (0..4).map(|i| ram_u64(&ram, 0x9_2000 + 8 * i)).collect();
        assert_eq!(gdt, [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]);
        // PML4 -> PDPT -> 4 page directories, identity 2 MiB pages.
        assert_eq!(ram_u64(&ram, 0x9_3000), 0x9_4003);
        for i in 0..4 {
            assert_eq!(ram_u64(&ram, 0x9_4000 + 8 * i), (0x9_5000 + 0x1000 * i) | 3);
        }
        let pde = |addr: u64| ram_u64(&ram, 0x9_5000 + (addr >> 21) * 8);
        assert_eq!(pde(0), 0x83, "zero page, command line");
        assert_eq!(pde(0x100_0000), 0x100_0083, "kernel");
        assert_eq!(pde(0x7e0_0000), 0x7e0_0083, "initrd");
        assert_eq!(pde(0xfee0_0000), 0xfee0_009b, "LAPIC uncached");
        // The kernel and its bss.
        assert_eq!(&ram[0x100_0000..0x100_0040], &TEXT);
        assert!(ram[0x100_0040..0x100_1000].iter().all(|&b| b == 0));
        assert_eq!(&ram[0x120_0000..0x120_0004], &DATA);
        assert!(
            ram[0x120_0004..0x120_2004].iter().all(|&b| b == 0),
            "bss zeroed"
        );
        // The zero page: the setup header copied at 0x1f1, the loader's fields written.
        let zp = |off: u64| BOOT_PARAMS_ADDR + off;
        let bz = bzimage(b"x", 1);
        assert_eq!(ram[zp(0x1f1) as usize], 1, "setup_sects from the header");
        assert_eq!(
            &ram[zp(0x202) as usize..zp(0x208) as usize],
            &bz[0x202..0x208]
        );
        assert_eq!(ram_u32(&ram, zp(0x260)), 0x300_0000, "init_size kept");
        assert_eq!(ram[zp(0x210) as usize], 0xff, "type_of_loader");
        assert_eq!(ram[zp(0x211) as usize], 0x01, "loadflags: LOADED_HIGH only");
        assert_eq!(ram_u32(&ram, zp(0x228)), 0x9_1000, "cmd_line_ptr");
        assert_eq!(cstr_at(&ram, 0x9_1000), "console=ttyS0 nokaslr");
        assert_eq!(
            ram_u32(&ram, zp(0x218)),
            0x7ffe000,
            "ramdisk_image: top, page aligned"
        );
        assert_eq!(ram_u32(&ram, zp(0x21c)), 5000, "ramdisk_size");
        assert_eq!(&ram[0x7ffe000..0x7ffe000 + 5000], &initrd[..]);
        for ext in [0xc0, 0xc4, 0xc8] {
            assert_eq!(ram_u32(&ram, zp(ext)), 0, "ext field {ext:#x}");
        }
        assert_eq!(
            ram_u64(&ram, zp(0x70)),
            0xe_0000,
            "acpi_rsdp_addr: where Keel installs the ACPI tables"
        );
        assert_eq!(
            e820(&ram),
            [
                (0, 0x9_0000, 1),
                (0x9_0000, 0x7_0000, 2),
                (0x10_0000, 127 * MIB, 1)
            ]
        );
        // Nothing else in the zero page before the header (screen_info, apm, ... stay zero).
        assert!(ram[zp(0) as usize..zp(0x70) as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(ram[zp(0x78) as usize..zp(0xc0) as usize]
            .iter()
            .all(|&b| b == 0));
    }

    /// No initrd: ramdisk fields zero. A bare vmlinux gets a minimal header.
    #[test]
    fn bare_vmlinux_gets_a_minimal_header() {
        let (s, ram) = boot(&kernel_with(&[], segments()), 32 * MIB, "", &[]).unwrap();
        assert_eq!(s.rip, 0x100_0200);
        let zp = |off: u64| BOOT_PARAMS_ADDR + off;
        assert_eq!(u16_at(&ram, zp(0x1fe) as usize), Some(0xaa55));
        assert_eq!(&ram[zp(0x202) as usize..zp(0x206) as usize], b"HdrS");
        assert_eq!(u16_at(&ram, zp(0x206) as usize), Some(0x020f));
        assert_eq!(ram_u32(&ram, zp(0x238)), 2047, "cmdline_size");
        assert_eq!(ram_u32(&ram, zp(0x22c)), 0x7fff_ffff, "initrd_addr_max");
        assert_eq!(ram_u32(&ram, zp(0x260)), 0, "init_size not made up");
        assert_eq!((ram_u32(&ram, zp(0x218)), ram_u32(&ram, zp(0x21c))), (0, 0));
        assert_eq!(cstr_at(&ram, 0x9_1000), "");
        assert_eq!(e820(&ram)[2], (0x10_0000, 31 * MIB, 1));
    }

    /// The initrd stays below `initrd_addr_max` when RAM reaches past it.
    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mut bz = bzimage(b"x", 1);
        bz[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        let image = kernel_with(&setup_of(&bz), segments());
        let (_, ram) = boot(&image, 1 << 30, "", &[("i", &[7; 4096])]).unwrap();
        assert_eq!(ram_u32(&ram, BOOT_PARAMS_ADDR + 0x218), 0x37ff_f000);
        assert_eq!(ram[0x37ff_f000], 7);
    }

    #[test]
    fn refusals() {
        let image = kernel();
        // init_size: 16 MiB + 48 MiB must fit.
        assert_eq!(
            boot(&image, 32 * MIB, "", &[]).unwrap_err(),
            LoadError::RamTooSmall {
                needed: 64 * MIB,
                have: 32 * MIB
            }
        );
        assert!(boot(&image, 64 * MIB, "", &[]).is_ok());
        // The initrd: 64 MiB between init_size's end and the end of 128 MiB of RAM.
        let big = vec![1u8; 64 << 20];
        let (_, ram) = boot(&image, 128 * MIB, "", &[("i", &big)]).unwrap();
        assert_eq!(ram_u32(&ram, BOOT_PARAMS_ADDR + 0x218), 0x400_0000);
        let bigger = vec![1u8; (64 << 20) + 1];
        assert_eq!(
            boot(&image, 128 * MIB, "", &[("i", &bigger)]).unwrap_err(),
            LoadError::InitrdTooBig {
                size: (64 << 20) + 1,
                room: 64 * MIB
            }
        );
        assert_eq!(
            boot(&image, 64 * MIB, "", &[("i", &[1])]).unwrap_err(),
            LoadError::InitrdTooBig { size: 1, room: 0 }
        );
        assert_eq!(
            boot(&image, 64 * MIB, "", &[("i", &[1]), ("j", &[2])]).unwrap_err(),
            LoadError::BadLinux("a Linux guest takes one initrd")
        );
        // cmdline_size 2047 bounds the command line.
        assert!(boot(&image, 64 * MIB, &"c".repeat(2047), &[]).is_ok());
        assert_eq!(
            boot(&image, 64 * MIB, &"c".repeat(2048), &[]).unwrap_err(),
            LoadError::CmdlineTooLong {
                len: 2048,
                max: 2047
            }
        );
        // Segments: in RAM, above 1 MiB, apart; the entry inside one.
        let setup = setup_of(&bzimage(b"x", 1));
        let seg = |paddr, memsz| KernelSegment {
            paddr,
            data: &TEXT,
            memsz,
        };
        let entry_in = |segments: Vec<KernelSegment>| {
            let entry = segments[0].paddr;
            KernelImage {
                setup: &setup,
                entry,
                segments,
            }
            .pack()
        };
        assert_eq!(
            boot(&entry_in(vec![seg(0x9_8000, 0x1000)]), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::Overlaps {
                what: "kernel segment",
                addr: 0x9_8000,
                size: 0x1000,
                area: "first MiB (boot structures and BIOS area)"
            }
        );
        assert_eq!(
            boot(
                &entry_in(vec![seg(0x100_0000, 0x2000), seg(0x100_1000, 0x1000)]),
                64 * MIB,
                "",
                &[]
            )
            .unwrap_err(),
            LoadError::Overlaps {
                what: "kernel segment",
                addr: 0x100_1000,
                size: 0x1000,
                area: "another kernel segment"
            }
        );
        assert_eq!(
            boot(&entry_in(vec![seg(0x3ff_f000, 0x2000)]), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::RamTooSmall {
                needed: 0x3ff_f000 + 0x300_0000,
                have: 64 * MIB
            }
        );
        assert_eq!(
            boot(&entry_in(vec![seg(u64::MAX - 8, 0x40)]), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::OutsideRam {
                what: "kernel segment",
                addr: u64::MAX - 8,
                size: 0x40
            }
        );
        // A segment near the top of the address space: its init_size would wrap.
        assert_eq!(
            boot(
                &entry_in(vec![seg(u64::MAX - 0x1fff, 0x1000)]),
                64 * MIB,
                "",
                &[]
            )
            .unwrap_err(),
            LoadError::OutsideRam {
                what: "kernel (init_size)",
                addr: u64::MAX - 0x1fff,
                size: 0x300_0000
            }
        );
        let far = KernelImage {
            setup: &setup,
            entry: 0x200_0000,
            segments: segments(),
        }
        .pack();
        assert_eq!(
            boot(&far, 64 * MIB, "", &[]).unwrap_err(),
            LoadError::EntryOutsideImage { entry: 0x200_0000 }
        );
        // The header: a protocol before 2.12, a damaged one, and a raw bzImage.
        let mut old = bzimage(b"x", 1);
        let old_setup = setup_of(&old);
        old[0x206..0x208].copy_from_slice(&0x0208u16.to_le_bytes());
        let mut old_setup = old_setup;
        old_setup[0x206 - 0x1f1..0x208 - 0x1f1].copy_from_slice(&0x0208u16.to_le_bytes());
        assert_eq!(
            boot(&kernel_with(&old_setup, segments()), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::LinuxProtocol(0x0208)
        );
        let mut no_hdrs = setup.clone();
        no_hdrs[0x202 - 0x1f1] = b'X';
        assert_eq!(
            boot(&kernel_with(&no_hdrs, segments()), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::BadLinux("no setup header (boot flag 0xaa55 and \"HdrS\")")
        );
        assert_eq!(
            boot(&kernel_with(&setup[..0x50], segments()), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::BadLinux("setup header too short")
        );
        assert_eq!(
            boot(&bzimage(b"x", 1), 64 * MIB, "", &[]).unwrap_err(),
            LoadError::BadLinux("not a Keel Linux kernel image (pack it with `cargo keel image`)")
        );
    }
}
