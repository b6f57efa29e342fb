//! Multiboot 1 kernels, loaded as the Multiboot Specification 0.6.96 describes (section numbers
//! below are that document's).
//!
//! - The header (3.1.1) is a 32-bit aligned `magic, flags, checksum` triple with
//!   `magic + flags + checksum == 0` mod 2^32, wholly inside the first 8192 bytes of the image.
//! - Flags 0-15 are requirements (3.1.2): Keel provides bit 0 (modules page aligned: always) and
//!   bit 1 (memory information: always) and refuses any other, e.g. bit 2 (video mode).
//! - Flag 16 (the "a.out kludge", 3.1.3): the header's address fields say where the image goes;
//!   otherwise the image must be an ELF file whose `PT_LOAD` segments are loaded as in [`super::elf`].
//! - Placement is QEMU's (`-kernel`, hw/i386/multiboot.c and its option ROM, as QEMU 7.2 with
//!   SeaBIOS does it; see docs/GUESTS.md): the memory map at [`MMAP_ADDR`] (0x9000) and the info
//!   structure at [`INFO_ADDR`] (0x9500) are written first; then one block starting at the
//!   kernel's lowest address is written over RAM: the kernel (bss zeroed), padded to a page; the
//!   module list; the module strings, the kernel's command line (`<image name> <cmdline>`, as
//!   QEMU passes `<kernel file> <-append text>`) and the loader name; padding to a page; each
//!   module, padded to a page. A kernel loaded low enough for that block to cover 0x9000-0x9558
//!   (any kernel at 0x8000, say) overwrites its own memory map and info structure, exactly as
//!   under QEMU; Keel refuses nothing for it.
//! - The memory map is SeaBIOS's e820 table under QEMU for an Intel CPU: RAM 0-0x9fc00, the
//!   EBDA and 0xf0000-0xfffff reserved, RAM from 1 MiB up to [`FIRMWARE_SIZE`] below the top of
//!   RAM, that top area reserved, and the BIOS flash below 4 GiB reserved. Keel keeps what it needs
//!   to enter the kernel (a GDT, the initial stack) in that reserved top area, where SeaBIOS keeps
//!   its own tables; nothing of Keel's lies in low RAM. The kernel and its modules may go anywhere
//!   in RAM except that area.
//! - Machine state (3.2): EAX = 0x2BADB002, EBX = [`INFO_ADDR`], 32-bit protected mode with flat
//!   4 GiB CS (0x08) and data segments (0x10) from a GDT laid out like QEMU's (null, code32,
//!   data, code16, data16), CR0 = PE|ET (0x11, what QEMU enters with), paging and interrupts off.
//!   ESP points into the reserved top area, 4 KiB below the top (the spec leaves ESP undefined).

use super::elf::{self, ElfImage};
use super::{
    initial_stack_top, read_u32, CpuMode, GuestRam, InitialState, LoadError, LoadRequest,
    CODE32_SELECTOR, CR0_ET, CR0_PE, DATA_SELECTOR, MIN_RAM,
};
use alloc::vec;
use alloc::vec::Vec;

/// Header magic (3.1.2).
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// EAX at entry (3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in this many bytes at the start of the image (3.1.1).
pub const HEADER_SEARCH: usize = 8192;
/// Header flag bits (3.1.2).
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
pub const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
const SUPPORTED_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;

/// Info structure flags Keel sets (3.3): QEMU's set, 0x24f.
pub const INFO_MEMORY: u32 = 1 << 0;
pub const INFO_BOOT_DEVICE: u32 = 1 << 1;
pub const INFO_CMDLINE: u32 = 1 << 2;
pub const INFO_MODS: u32 = 1 << 3;
pub const INFO_MMAP: u32 = 1 << 6;
pub const INFO_LOADER_NAME: u32 = 1 << 9;
/// "No BIOS drive" with every partition field 0xff (3.3), the value QEMU passes.
pub const BOOT_DEVICE: u32 = 0x8000_ffff;

/// Offsets in the multiboot info structure (3.3).
pub mod info {
    pub const FLAGS: u64 = 0;
    pub const MEM_LOWER: u64 = 4;
    pub const MEM_UPPER: u64 = 8;
    pub const BOOT_DEVICE: u64 = 12;
    pub const CMDLINE: u64 = 16;
    pub const MODS_COUNT: u64 = 20;
    pub const MODS_ADDR: u64 = 24;
    pub const MMAP_LENGTH: u64 = 44;
    pub const MMAP_ADDR: u64 = 48;
    pub const BOOT_LOADER_NAME: u64 = 64;
    /// The fields up to the APM table pointer: what QEMU writes (88 bytes).
    pub const SIZE: u64 = 88;
}

/// Where QEMU's option ROM stores the memory map (read with INT 15h E820) and the info structure.
pub const MMAP_ADDR: u64 = 0x9000;
pub const INFO_ADDR: u64 = 0x9500;
/// Memory map entry types (3.3): 1 = available RAM, 2 = reserved.
pub const MMAP_AVAILABLE: u32 = 1;
pub const MMAP_RESERVED: u32 = 2;
/// Each entry: size (u32, not counting itself), base (u64), length (u64), type (u32).
pub const MMAP_ENTRY_SIZE: u64 = 24;
/// Module list: 16 bytes per module (mod_start, mod_end, string, reserved).
pub const MOD_ENTRY_SIZE: u64 = 16;
/// As long as QEMU's "qemu", so every address after it is the same.
pub const LOADER_NAME: &str = "Keel";
/// Conventional memory as INT 12h reports it under SeaBIOS: 639 KiB, the EBDA above it.
pub const EBDA_START: u64 = 0x9_fc00;
const LOW_MEMORY_END: u64 = 0xa_0000;
/// The BIOS area SeaBIOS reports reserved below 1 MiB.
const BIOS_AREA: u64 = 0xf_0000;
const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The top of RAM SeaBIOS keeps for itself and reports reserved; Keel keeps its GDT (at the
/// start) and the initial stack (4 KiB below the top) there.
pub const FIRMWARE_SIZE: u64 = 0x2_0000;
/// The BIOS flash mapped below 4 GiB, reported reserved.
const FLASH: (u64, u64) = (0xfffc_0000, 0x4_0000);
const PAGE: u64 = 0x1000;

/// QEMU's option-ROM GDT: null, code32 0x08, data 0x10, 16-bit code 0x18, 16-bit data 0x20. The
/// two Keel loads have the accessed bit set, as the CPU leaves them (and as the VMCS access
/// rights must be, SDM 26.3.1.2).
pub const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_9e00_0000_ffff,
    0x0000_9200_0000_ffff,
];

/// The reserved top area of a guest with `ram_len` bytes of RAM.
pub fn firmware_area(ram_len: u64) -> core::ops::Range<u64> {
    ram_len.saturating_sub(FIRMWARE_SIZE)..ram_len
}

/// A multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the magic in the image.
    pub offset: usize,
    pub flags: u32,
    /// The a.out kludge fields, when flag 16 is set.
    pub addresses: Option<AoutAddresses>,
}

/// Header fields 12-28 (3.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AoutAddresses {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// Finds and checks the multiboot header.
pub fn find_header(image: &[u8]) -> Result<Header, LoadError> {
    let window = &image[..image.len().min(HEADER_SEARCH)];
    let mut bad_checksum = None;
    for offset in (0..window.len()).step_by(4) {
        if read_u32(window, offset) != Some(HEADER_MAGIC) {
            continue;
        }
        let (Some(flags), Some(checksum)) =
            (read_u32(window, offset + 4), read_u32(window, offset + 8))
        else {
            break;
        };
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            bad_checksum.get_or_insert(offset);
            continue;
        }
        let unsupported = flags & 0xffff & !SUPPORTED_REQUIRED;
        if unsupported != 0 {
            return Err(LoadError::UnsupportedMultibootFlags(unsupported));
        }
        let addresses = if flags & FLAG_AOUT_KLUDGE != 0 {
            let field = |i: usize| {
                read_u32(window, offset + 12 + 4 * i)
                    .ok_or(LoadError::BadAoutKludge("header truncated"))
            };
            Some(AoutAddresses {
                header_addr: field(0)?,
                load_addr: field(1)?,
                load_end_addr: field(2)?,
                bss_end_addr: field(3)?,
                entry_addr: field(4)?,
            })
        } else {
            None
        };
        return Ok(Header {
            offset,
            flags,
            addresses,
        });
    }
    Err(match bad_checksum {
        Some(offset) => LoadError::BadMultibootChecksum { offset },
        None => LoadError::NoMultibootHeader,
    })
}

/// Where the a.out kludge fields (3.1.3) put the image.
struct AoutLayout {
    /// The file bytes copied to `load`.
    file: core::ops::Range<usize>,
    load: u64,
    /// One past the bss.
    mem_end: u64,
    entry: u64,
}

fn aout_layout(
    image: &[u8],
    header_offset: usize,
    a: &AoutAddresses,
) -> Result<AoutLayout, LoadError> {
    let (header_addr, load_addr) = (u64::from(a.header_addr), u64::from(a.load_addr));
    if load_addr > header_addr {
        return Err(LoadError::BadAoutKludge("load_addr is above header_addr"));
    }
    // "The offset in the OS image file at which to start loading is defined by the offset at
    // which the header was found, minus (header_addr - load_addr)."
    let file_start = (header_offset as u64)
        .checked_sub(header_addr - load_addr)
        .ok_or(LoadError::BadAoutKludge("text would start before the file"))?;
    let file_len = image.len() as u64 - file_start; // file_start <= header_offset < len
    let load_len = match a.load_end_addr {
        0 => file_len,
        end if u64::from(end) < load_addr => {
            return Err(LoadError::BadAoutKludge("load_end_addr is below load_addr"))
        }
        end => u64::from(end) - load_addr,
    };
    if load_len > file_len {
        return Err(LoadError::BadAoutKludge("load_end_addr runs past the file"));
    }
    let load_end = load_addr + load_len;
    let mem_end = match a.bss_end_addr {
        0 => load_end,
        end if u64::from(end) < load_end => {
            return Err(LoadError::BadAoutKludge(
                "bss_end_addr is below load_end_addr",
            ))
        }
        end => u64::from(end),
    };
    let entry = u64::from(a.entry_addr);
    if !(load_addr..mem_end).contains(&entry) {
        return Err(LoadError::EntryOutsideImage { entry });
    }
    // In range: file_start + load_len <= image.len() was checked above.
    Ok(AoutLayout {
        file: file_start as usize..(file_start + load_len) as usize,
        load: load_addr,
        mem_end,
        entry,
    })
}

fn align_up(x: u64) -> Option<u64> {
    Some(x.checked_add(PAGE - 1)? & !(PAGE - 1))
}

/// Where everything of one multiboot load goes (see the module comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The kernel's lowest address: the start of the block written over RAM.
    pub kernel_start: u64,
    /// The module list, right after the kernel padded to a page.
    pub mods_addr: u64,
    /// Each module's string, then the kernel's command line, then the loader name.
    pub module_strings: Vec<u64>,
    pub cmdline: u64,
    pub loader_name: u64,
    /// Each module's address (page aligned).
    pub modules: Vec<u64>,
    /// One past the block (page aligned).
    pub end: u64,
}

impl Layout {
    /// QEMU's arithmetic: room for the strings is the length of the kernel's file name, of the
    /// `-append` text and of the whole `-initrd` argument (the module strings joined by commas,
    /// a comma inside one written twice), each plus one.
    fn new(
        kernel_start: u64,
        kernel_end: u64,
        image_name: &str,
        cmdline: &str,
        modules: &[(&str, &[u8])],
    ) -> Option<Self> {
        // QEMU builds the block in a buffer and pads to pages counted from the block's start.
        let page_after = |addr: u64| kernel_start.checked_add(align_up(addr - kernel_start)?);
        let n = modules.len() as u64;
        let mods_addr = page_after(kernel_end)?;
        let strings = mods_addr.checked_add(n.checked_mul(MOD_ENTRY_SIZE)?)?;
        let initrd_arg = match n {
            0 => 0,
            _ => {
                let joined: usize = modules
                    .iter()
                    .map(|(s, _)| s.len() + s.matches(',').count())
                    .sum();
                joined as u64 + n // n - 1 commas and a NUL
            }
        };
        let room = (image_name.len() as u64 + 1) + (cmdline.len() as u64 + 1) + initrd_arg;
        let mut next = strings;
        let module_strings = modules
            .iter()
            .map(|(s, _)| {
                let at = next;
                next += s.len() as u64 + 1;
                at
            })
            .collect();
        let cmdline_addr = next;
        let loader_name = strings.checked_add(room)?;
        let mut next = page_after(loader_name.checked_add(LOADER_NAME.len() as u64 + 1)?)?;
        let mut at = Vec::with_capacity(modules.len());
        for (_, data) in modules {
            at.push(next);
            next = page_after(next.checked_add(data.len() as u64)?)?;
        }
        Some(Self {
            kernel_start,
            mods_addr,
            module_strings,
            cmdline: cmdline_addr,
            loader_name,
            modules: at,
            end: next,
        })
    }
}

/// The memory map of a guest with `ram_len` bytes (see the module comment): (base, length, type).
pub fn memory_map(ram_len: u64) -> [(u64, u64, u32); 6] {
    let top = firmware_area(ram_len).start;
    [
        (0, EBDA_START, MMAP_AVAILABLE),
        (EBDA_START, LOW_MEMORY_END - EBDA_START, MMAP_RESERVED),
        (BIOS_AREA, HIGH_MEMORY_START - BIOS_AREA, MMAP_RESERVED),
        (HIGH_MEMORY_START, top - HIGH_MEMORY_START, MMAP_AVAILABLE),
        (top, FIRMWARE_SIZE, MMAP_RESERVED),
        (FLASH.0, FLASH.1, MMAP_RESERVED),
    ]
}

/// Loads a multiboot kernel and its modules and writes the multiboot info.
pub fn load(ram: &mut [u8], req: &LoadRequest) -> Result<InitialState, LoadError> {
    let ram_len = ram.len() as u64;
    let mut ram = GuestRam::with_reserved(ram, vec![(firmware_area(ram_len), "firmware area")]);
    ram.require(MIN_RAM)?;
    let header = find_header(req.image)?;
    enum Kernel {
        Aout(AoutLayout),
        Elf(ElfImage),
    }
    let (kernel, start, end) = match &header.addresses {
        Some(a) => {
            let l = aout_layout(req.image, header.offset, a)?;
            let (start, end) = (l.load, l.mem_end);
            ram.check_free("image", start, end - start)?;
            (Kernel::Aout(l), start, end)
        }
        None => {
            let elf: ElfImage = elf::parse(req.image)?;
            // Each segment inside RAM and below the firmware area, so is the whole extent
            // (QEMU's: lowest address to highest end; `parse` gives at least one segment).
            for s in &elf.segments {
                ram.check_free("segment", s.paddr, s.memsz)?;
            }
            let start = elf.segments.iter().map(|s| s.paddr).min().unwrap_or(0);
            let end = elf
                .segments
                .iter()
                .map(|s| s.paddr.saturating_add(s.memsz))
                .max()
                .unwrap_or(0);
            (Kernel::Elf(elf), start, end)
        }
    };
    let layout = Layout::new(start, end, &req.cfg.image, &req.cfg.cmdline, req.modules)
        .ok_or(LoadError::BootInfoFull)?;
    ram.check_free("modules and boot information", end, layout.end - end)?;

    // First what QEMU's option ROM writes before it copies the kernel: the info structure and
    // the memory map (SeaBIOS' E820 table).
    let map = memory_map(ram_len);
    for (i, (base, len, kind)) in map.iter().enumerate() {
        let e = MMAP_ADDR + MMAP_ENTRY_SIZE * i as u64;
        ram.write_u32(e, (MMAP_ENTRY_SIZE - 4) as u32)?;
        ram.write_u64(e + 4, *base)?;
        ram.write_u64(e + 12, *len)?;
        ram.write_u32(e + 20, *kind)?;
    }
    ram.zero("multiboot info", INFO_ADDR, info::SIZE)?;
    let flags =
        INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    // Below 4 GiB: the block ends inside RAM, which the manifest keeps below 4 GiB.
    let fields = [
        (info::FLAGS, flags),
        (info::MEM_LOWER, (EBDA_START / 1024) as u32),
        (info::MEM_UPPER, (map[3].1 / 1024) as u32),
        (info::BOOT_DEVICE, BOOT_DEVICE),
        (info::CMDLINE, layout.cmdline as u32),
        (info::MODS_COUNT, req.modules.len() as u32),
        (info::MODS_ADDR, layout.mods_addr as u32),
        (
            info::MMAP_LENGTH,
            (MMAP_ENTRY_SIZE * map.len() as u64) as u32,
        ),
        (info::MMAP_ADDR, MMAP_ADDR as u32),
        (info::BOOT_LOADER_NAME, layout.loader_name as u32),
    ];
    for (off, v) in fields {
        ram.write_u32(INFO_ADDR + off, v)?;
    }

    // Then the block: kernel, padding, module list, strings, modules; every byte of it written.
    ram.zero("image", start, layout.end - start)?;
    let entry = match &kernel {
        Kernel::Aout(l) => {
            ram.write("image", l.load, &req.image[l.file.clone()])?;
            l.entry
        }
        Kernel::Elf(elf) => elf::place_segments(&mut ram, elf, req.image)?.entry,
    };
    if entry > u64::from(u32::MAX) {
        return Err(LoadError::EntryOutsideImage { entry });
    }
    for (i, (name, data)) in req.modules.iter().enumerate() {
        let (at, string) = (layout.modules[i], layout.module_strings[i]);
        ram.write("module", at, data)?;
        ram.write_cstr(string, name, usize::MAX)?;
        let e = layout.mods_addr + MOD_ENTRY_SIZE * i as u64;
        ram.write_u32(e, at as u32)?;
        ram.write_u32(e + 4, (at + data.len() as u64) as u32)?;
        ram.write_u32(e + 8, string as u32)?;
        ram.write_u32(e + 12, 0)?;
    }
    ram.write_cstr(layout.cmdline, &req.cfg.image, usize::MAX)?;
    let space = layout.cmdline + req.cfg.image.len() as u64;
    ram.write("string", space, b" ")?;
    ram.write_cstr(space + 1, &req.cfg.cmdline, usize::MAX)?;
    ram.write_cstr(layout.loader_name, LOADER_NAME, usize::MAX)?;

    let gdt = firmware_area(ram_len).start;
    for (i, d) in GDT.iter().enumerate() {
        ram.write_u64(gdt + 8 * i as u64, *d)?;
    }
    Ok(InitialState {
        rip: entry,
        rsp: initial_stack_top(ram_len),
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: INFO_ADDR,
        cr0: CR0_PE | CR0_ET,
        gdtr_base: gdt,
        gdtr_limit: (GDT.len() * 8 - 1) as u16,
        code_selector: CODE32_SELECTOR,
        data_selector: DATA_SELECTOR,
        ..InitialState::new(CpuMode::Protected)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::build::{elf, put32, Seg};
    use crate::loader::elf::mangle::{expected_ram, Load};
    use crate::loader::elf::EM_386;
    use crate::loader::test_util::{config, cstr_at, u32_at, u64_at};
    use crate::loader::CpuMode;
    use crate::manifest::GuestKind;
    use alloc::string::String;
    use alloc::vec;
    use alloc::vec::Vec;

    const RAM: u64 = 16 << 20;

    fn header(flags: u32, addresses: Option<[u32; 5]>) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(
            &0u32
                .wrapping_sub(HEADER_MAGIC)
                .wrapping_sub(flags)
                .to_le_bytes(),
        );
        for a in addresses.into_iter().flatten() {
            h.extend_from_slice(&a.to_le_bytes());
        }
        h
    }

    /// An ELF32 kernel at 1 MiB whose text starts with a multiboot header.
    fn elf_kernel() -> Vec<u8> {
        let mut text = header(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO, None);
        text.extend_from_slice(&[0xf4; 20]);
        elf(
            false,
            EM_386,
            0x10_000c,
            &[Seg::at(0x10_0000, &text, 0x3000)],
        )
    }

    fn run(
        image: &[u8],
        modules: &[(&str, &[u8])],
        memory: u64,
    ) -> Result<(InitialState, Vec<u8>), LoadError> {
        let cfg = config(GuestKind::Multiboot, memory, "console=ttyS0 hi");
        let mut ram = vec![0u8; memory as usize];
        let req = LoadRequest {
            cfg: &cfg,
            image,
            modules,
            guest_id: 2,
        };
        crate::loader::load(&mut ram, &req).map(|s| (s, ram))
    }

    /// An a.out-kludge kernel of `len` bytes loaded at `load`, header at offset 0, entry at
    /// offset 32, no bss: the shape of the probe kernel run under QEMU for these tests.
    fn aout_kernel(load: u32, len: usize) -> Vec<u8> {
        let end = load + len as u32;
        let mut img = header(FLAG_AOUT_KLUDGE | FLAG_MEMORY_INFO | FLAG_PAGE_ALIGN, None);
        for f in [load, load, 0, end, load + 32] {
            img.extend_from_slice(&f.to_le_bytes());
        }
        img.resize(len, 0x90);
        img
    }

    /// Loads into `memory` bytes of RAM filled with `fill`, as image `name` with `cmdline`.
    fn load_named(
        image: &[u8],
        name: &str,
        cmdline: &str,
        modules: &[(&str, &[u8])],
        memory: u64,
        fill: u8,
    ) -> Result<(InitialState, Vec<u8>), LoadError> {
        let mut cfg = config(GuestKind::Multiboot, memory, cmdline);
        cfg.image = String::from(name);
        let mut ram = vec![fill; memory as usize];
        let req = LoadRequest {
            cfg: &cfg,
            image,
            modules,
            guest_id: 2,
        };
        crate::loader::load(&mut ram, &req).map(|s| (s, ram))
    }

    /// What QEMU 7.2 (SeaBIOS, `-cpu qemu64,vendor=GenuineIntel -m 32`) gave a probe kernel of
    /// 0x121 bytes at 1 MiB run as `-kernel p.bin -append "a b c" -initrd "m1 x y,m2"`, with
    /// m1 = "hello" and m2 = "xyz12": every value below was read back by that kernel.
    #[test]
    fn layout_and_info_equal_qemus() {
        let img = aout_kernel(0x10_0000, 0x121);
        let modules: [(&str, &[u8]); 2] = [("m1 x y", b"hello"), ("m2", b"xyz12")];
        let (s, ram) = load_named(&img, "p.bin", "a b c", &modules, 32 << 20, 0).unwrap();
        assert_eq!(s.mode, CpuMode::Protected);
        assert_eq!((s.rip, s.rax, s.rbx), (0x10_0020, 0x2bad_b002, 0x9500));
        assert_eq!((s.cr0, s.rflags), (0x11, 2));
        assert_eq!((s.code_selector, s.data_selector), (0x08, 0x10));
        // Keel's GDT and stack are in the reserved top 128 KiB (QEMU's GDT is in its option
        // ROM at 0xcb2b8, a hole of the map); same limit, same descriptors.
        assert_eq!((s.gdtr_base, s.gdtr_limit), (0x1fe_0000, 0x27));
        assert_eq!(s.rsp, 0x1ff_f000);
        for (i, d) in GDT.iter().enumerate() {
            assert_eq!(u64_at(&ram, 0x1fe_0000 + 8 * i as u64), *d);
        }

        let info: Vec<u32> = (0..22).map(|i| u32_at(&ram, 0x9500 + 4 * i)).collect();
        let mut want = [0u32; 22];
        want[..8].copy_from_slice(&[
            0x24f,
            0x27f,
            0x7b80,
            0x8000_ffff,
            0x10_102a,
            2,
            0x10_1000,
            0,
        ]);
        want[11] = 0x90; // mmap_length: 6 entries
        want[12] = 0x9000;
        want[16] = 0x10_1036; // boot_loader_name
        assert_eq!(info, want);
        assert_eq!(cstr_at(&ram, 0x10_102a), "p.bin a b c");
        assert_eq!(cstr_at(&ram, 0x10_1036), "Keel");
        let mods: Vec<u32> = (0..8).map(|i| u32_at(&ram, 0x10_1000 + 4 * i)).collect();
        assert_eq!(
            mods,
            [0x10_2000, 0x10_2005, 0x10_1020, 0, 0x10_3000, 0x10_3005, 0x10_1027, 0]
        );
        assert_eq!(cstr_at(&ram, 0x10_1020), "m1 x y");
        assert_eq!(cstr_at(&ram, 0x10_1027), "m2");
        assert_eq!(&ram[0x10_2000..0x10_2006], b"hello\0");
        assert_eq!(&ram[0x10_3000..0x10_3006], b"xyz12\0");
        assert_eq!(&ram[0x10_0000..0x10_0121], &img[..]);

        let expect: [(u64, u64, u32); 6] = [
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x400, 2),
            (0xf_0000, 0x1_0000, 2),
            (0x10_0000, 0x1ee_0000, 1),
            (0x1fe_0000, 0x2_0000, 2),
            (0xfffc_0000, 0x4_0000, 2),
        ];
        for (i, (base, len, kind)) in expect.into_iter().enumerate() {
            let e = 0x9000 + 24 * i as u64;
            assert_eq!(u32_at(&ram, e), 20);
            assert_eq!((u64_at(&ram, e + 4), u64_at(&ram, e + 12)), (base, len));
            assert_eq!(u32_at(&ram, e + 20), kind);
        }
        // Nothing else below 1 MiB: the map, the info structure and nothing of Keel's.
        let low: Vec<usize> = (0..0x10_0000)
            .filter(|&a| ram[a] != 0 && !(0x9000..0x9090).contains(&a))
            .filter(|&a| !(0x9500..0x9558).contains(&a))
            .collect();
        assert_eq!(low, Vec::<usize>::new());
    }

    /// QEMU loads a kernel at 0x8000 and writes its block (kernel page, then the module list
    /// and strings at 0x9000) over the map and info it stored first: the kernel gets EBX =
    /// 0x9500 pointing at zeros (flags 0). Keel loads it the same way, byte for byte.
    #[test]
    fn kernel_at_0x8000_loads_as_under_qemu() {
        let img = aout_kernel(0x8000, 0x121);
        let modules: [(&str, &[u8]); 2] = [("m1 x y", b"hello"), ("m2", b"xyz12")];
        let (s, ram) = load_named(&img, "p8.bin", "a b", &modules, 32 << 20, 0).unwrap();
        assert_eq!((s.rip, s.rbx), (0x8020, 0x9500));
        assert_eq!(&ram[0x8000..0x8121], &img[..]);
        assert!(ram[0x9500..0x9558].iter().all(|&b| b == 0), "info zeroed");
        let mods: Vec<u32> = (0..8).map(|i| u32_at(&ram, 0x9000 + 4 * i)).collect();
        assert_eq!(mods, [0xa000, 0xa005, 0x9020, 0, 0xb000, 0xb005, 0x9027, 0]);
        assert_eq!(cstr_at(&ram, 0x902a), "p8.bin a b");
        // Strings room: 7 + 4 + 10 ("m1 x y,m2" and its NUL) = 21 bytes.
        assert_eq!(cstr_at(&ram, 0x9020 + 21), "Keel");
        assert_eq!(&ram[0xa000..0xa005], b"hello");
    }

    /// A kernel at 1 MiB that keeps its state in low memory (a page at 0x2000 here) finds it as
    /// it was: below 1 MiB the loader writes only the map (0x9000) and the info (0x9500).
    #[test]
    fn low_memory_is_the_kernels() {
        let img = aout_kernel(0x10_0000, 0x121);
        let (_, ram) = load_named(&img, "k", "", &[("m", b"x")], 16 << 20, 0xa5).unwrap();
        let touched: Vec<usize> = (0..0x10_0000).filter(|&a| ram[a] != 0xa5).collect();
        let expect: Vec<usize> = (0x9000..0x9090).chain(0x9500..0x9558).collect();
        assert_eq!(touched.len(), expect.len());
        assert!(touched.iter().all(|a| expect.contains(a)));
        // Without -append the command line is the file name and a space, as QEMU's "%s %s".
        assert_eq!(cstr_at(&ram, u64::from(u32_at(&ram, 0x9510))), "k ");
    }

    /// An ELF kernel's block runs from its lowest segment to its highest end; the module list
    /// follows at the next page counted from that start (QEMU pads inside its buffer).
    #[test]
    fn elf_kernel_with_a_low_segment() {
        let mut text = header(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO, None);
        text.extend_from_slice(&[0xf4; 20]);
        let data = [0x5a; 16];
        let img = elf(
            false,
            EM_386,
            0x10_000c,
            &[Seg::at(0x2010, &data, 0), Seg::at(0x10_0000, &text, 0x3000)],
        );
        let (s, ram) = run(&img, &[("second", b"abc")], RAM).unwrap();
        assert_eq!((s.rip, s.rbx), (0x10_000c, 0x9500));
        assert_eq!(&ram[0x2010..0x2020], &data);
        // Block start 0x2010, end 0x103020: module list at 0x2010 + 0x102000, the module a
        // page later (after the strings).
        assert_eq!(u32_at(&ram, 0x10_4010), 0x10_5010);
        assert_eq!(cstr_at(&ram, u64::from(u32_at(&ram, 0x10_4018))), "second");
        assert_eq!(&ram[0x10_5010..0x10_5013], b"abc");
        // The block covers 0x9000-0x9558: QEMU's map and info are overwritten by its gap.
        assert_eq!(u32_at(&ram, 0x9500), 0);
    }

    #[test]
    fn aout_kludge_places_raw_image() {
        // A raw image: 16 bytes of padding, the header at offset 16, code after it. Linked so
        // that file offset 0 is at 0x200000; 0x100 bytes of bss after the file.
        let mut img = vec![0xeeu8; 16];
        let load = 0x20_0000u32;
        let flags = FLAG_AOUT_KLUDGE | FLAG_MEMORY_INFO;
        img.extend(header(flags, Some([load + 16, load, 0, 0, load + 48])));
        img.extend_from_slice(&[0x90; 16]);
        let end = load + img.len() as u32;
        // The address fields are not covered by the checksum: patch them now.
        put32(&mut img, 36, end);
        put32(&mut img, 40, end + 0x100);
        let (s, ram) = run(&img, &[], RAM).unwrap();
        assert_eq!(s.rip, 0x20_0030);
        assert_eq!(&ram[0x20_0000..0x20_0000 + img.len()], &img[..]);
        assert_eq!(u32_at(&ram, INFO_ADDR + info::MODS_COUNT), 0);

        // load_end_addr limits what is copied.
        let mut short = img.clone();
        put32(&mut short, 36, load + 52);
        let (_, ram) = run(&short, &[], RAM).unwrap();
        assert_eq!(ram[0x20_0000 + 51], 0x90);
        assert_eq!(ram[0x20_0000 + 52], 0);
    }

    #[test]
    fn aout_kludge_rejections() {
        let load = 0x20_0000u32;
        let with = |f: [u32; 5]| {
            let mut img = vec![0u8; 8];
            img.extend(header(FLAG_AOUT_KLUDGE, Some(f)));
            img.extend_from_slice(&[0x90; 64]);
            run(&img, &[], RAM).map(|_| ()).unwrap_err()
        };
        let kludge = |why| LoadError::BadAoutKludge(why);
        assert_eq!(
            with([load, load + 4, 0, 0, load]),
            kludge("load_addr is above header_addr")
        );
        assert_eq!(
            with([load + 64, load, 0, 0, load]),
            kludge("text would start before the file")
        );
        assert_eq!(
            with([load + 8, load, load - 1, 0, load]),
            kludge("load_end_addr is below load_addr")
        );
        assert_eq!(
            with([load + 8, load, load + 0x1000, 0, load]),
            kludge("load_end_addr runs past the file")
        );
        assert_eq!(
            with([load + 8, load, load + 16, load + 8, load]),
            kludge("bss_end_addr is below load_end_addr")
        );
        assert_eq!(
            with([load + 8, load, 0, 0, load + 0x1000]),
            LoadError::EntryOutsideImage {
                entry: u64::from(load) + 0x1000
            }
        );
        // The whole 104-byte file is loaded (load_end_addr 0); low RAM is the kernel's, the
        // top 128 KiB are not.
        assert!(run(
            &{
                let mut img = vec![0u8; 8];
                img.extend(header(
                    FLAG_AOUT_KLUDGE,
                    Some([0x1008, 0x1000, 0, 0, 0x1000]),
                ));
                img.extend_from_slice(&[0x90; 64]);
                img
            },
            &[],
            RAM
        )
        .is_ok());
        assert_eq!(
            with([0xfe_0008, 0xfe_0000, 0, 0, 0xfe_0000]),
            LoadError::Overlaps {
                what: "image",
                addr: 0xfe_0000,
                size: 104,
                area: "firmware area",
            }
        );
        assert_eq!(
            with([0xfff0_0008, 0xfff0_0000, 0, 0, 0xfff0_0000]),
            LoadError::OutsideRam {
                what: "image",
                addr: 0xfff0_0000,
                size: 104
            }
        );
        // Truncated kludge fields.
        let mut img = vec![0u8; 8];
        img.extend(header(FLAG_AOUT_KLUDGE, None));
        img.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(run(&img, &[], RAM).unwrap_err(), kludge("header truncated"));
    }

    #[test]
    fn header_search_rules() {
        assert_eq!(
            find_header(&[0; 100]).unwrap_err(),
            LoadError::NoMultibootHeader
        );
        // Misaligned header: not found.
        let mut img = vec![0u8; 2];
        img.extend(header(0, None));
        assert_eq!(find_header(&img).unwrap_err(), LoadError::NoMultibootHeader);
        // Past the first 8192 bytes: not found.
        let mut img = vec![0u8; 8192];
        img.extend(header(0, None));
        assert_eq!(find_header(&img).unwrap_err(), LoadError::NoMultibootHeader);
        // A bad checksum is reported unless a good header follows.
        let mut img = header(0, None);
        img[8] ^= 1;
        assert_eq!(
            find_header(&img).unwrap_err(),
            LoadError::BadMultibootChecksum { offset: 0 }
        );
        img.extend(header(FLAG_PAGE_ALIGN, None));
        assert_eq!(find_header(&img).unwrap().offset, 12);
        assert_eq!(
            find_header(&header(FLAG_VIDEO_MODE | FLAG_MEMORY_INFO, None)).unwrap_err(),
            LoadError::UnsupportedMultibootFlags(FLAG_VIDEO_MODE)
        );
        // Optional flags (16-31) other than the kludge are ignored.
        assert!(find_header(&header(1 << 20, None)).is_ok());
        // Magic at the very end, flags missing.
        assert_eq!(
            find_header(&HEADER_MAGIC.to_le_bytes()).unwrap_err(),
            LoadError::NoMultibootHeader
        );
        // Without the kludge the image must be ELF.
        assert_eq!(
            run(&header(0, None), &[], RAM).unwrap_err(),
            LoadError::NotElf
        );
    }

    #[test]
    fn modules_must_fit() {
        let img = elf_kernel();
        // The kernel ends at 0x103020: module list at 0x104000, strings, the module at
        // 0x105000. 16 MiB of RAM: the firmware area starts at 0xfe0000.
        let fits = vec![1u8; 0xfe_0000 - 0x10_5000];
        let (_, ram) = run(&img, &[("big", &fits)], RAM).unwrap();
        assert_eq!(u32_at(&ram, 0x10_4004), 0xfe_0000);
        let over = vec![1u8; 0xfe_0000 - 0x10_5000 + 1];
        assert_eq!(
            run(&img, &[("big", &over)], RAM).unwrap_err(),
            LoadError::Overlaps {
                what: "modules and boot information",
                addr: 0x10_3020,
                size: 0xfe_1000 - 0x10_3020,
                area: "firmware area",
            }
        );
        let big = vec![0u8; 15 << 20];
        assert_eq!(
            run(&img, &[("big", &big)], RAM).unwrap_err(),
            LoadError::OutsideRam {
                what: "modules and boot information",
                addr: 0x10_3020,
                size: 0x10_5000 + (15 << 20) - 0x10_3020,
            }
        );
        // Strings have no limit of their own (QEMU's neither): 600 modules with long names.
        let name: String = "n".repeat(4000);
        let lots: Vec<(&str, &[u8])> = (0..600).map(|_| (name.as_str(), &b"x"[..])).collect();
        let (_, ram) = run(&img, &lots, RAM).unwrap();
        assert_eq!(u32_at(&ram, INFO_ADDR + info::MODS_COUNT), 600);
        assert_eq!(
            cstr_at(&ram, u64::from(u32_at(&ram, 0x10_4000 + 599 * 16 + 8))),
            name
        );
    }

    /// Every truncation of a valid multiboot ELF kernel, and every byte of it set to 0x00, 0xff,
    /// 0x80 and 0x7f, gives exactly the error the damaged part calls for (the ELF headers as the
    /// ELF loader reads them, the multiboot header's magic, flags and checksum), or the load the
    /// change describes (state and every byte of RAM).
    /// The RAM a load of the one-segment `placed` must leave, from the good load's RAM: the good
    /// block (segment, padding, strings) removed, the info's three pointers to the block moved,
    /// the new block written: zeros, the segment as [`expected_ram`] places it, the strings.
    fn moved_block(
        good_ram: &[u8],
        good: &[Load],
        image: &[u8],
        placed: &[Option<Load>],
    ) -> Vec<u8> {
        const CMDLINE: &str = "console=ttyS0 hi";
        let block = |l: &Load| Layout::new(l.paddr, l.paddr + l.memsz, "t.img", CMDLINE, &[]);
        let old = block(&good[0]).unwrap();
        let mut ram = good_ram.to_vec();
        ram[old.kernel_start as usize..old.end as usize].fill(0);
        let Some(new_load) = placed[0] else {
            unreachable!("one segment, present")
        };
        let new = block(&new_load).unwrap();
        for (off, v) in [
            (info::CMDLINE, new.cmdline),
            (info::MODS_ADDR, new.mods_addr),
            (info::BOOT_LOADER_NAME, new.loader_name),
        ] {
            ram[(INFO_ADDR + off) as usize..][..4].copy_from_slice(&(v as u32).to_le_bytes());
        }
        ram[new.kernel_start as usize..new.end as usize].fill(0);
        let mut ram = expected_ram(&ram, &[], image, placed);
        for (at, s) in [
            (new.cmdline, "t.img console=ttyS0 hi"),
            (new.loader_name, "Keel"),
        ] {
            ram[at as usize..][..s.len()].copy_from_slice(s.as_bytes());
        }
        ram
    }

    #[test]
    fn mangled_images_give_the_exact_error_or_load() {
        use crate::loader::elf::mangle::{expected, field_at, good_loads, Field};
        const MEM: u64 = 2 << 20;
        const ENTRY: u64 = 0x10_000c;
        let good = elf_kernel();
        let (good_state, good_ram) = run(&good, &[], MEM).unwrap();
        let loads = good_loads(&good, false, 1);
        // The multiboot header opens the segment's file bytes: magic, flags, checksum, code.
        let mb = loads[0].offset as usize;
        let seg_end = mb + loads[0].filesz as usize;
        assert_eq!(seg_end, good.len());
        for len in 0..good.len() {
            let want = if len < mb + 12 {
                LoadError::NoMultibootHeader
            } else {
                LoadError::SegmentOutsideImage {
                    offset: mb as u64,
                    size: loads[0].filesz,
                }
            };
            assert_eq!(
                run(&good[..len], &[], MEM).map(|_| ()),
                Err(want),
                "{len} bytes"
            );
        }
        for i in 0..good.len() {
            for v in [0x00, 0xff, 0x80, 0x7f] {
                if v == good[i] {
                    continue;
                }
                let mut bad = good.clone();
                bad[i] = v;
                let got = run(&bad, &[], MEM);
                let what = alloc::format!("byte {i} = {v:#x}");
                let want = match i {
                    _ if i < mb => {
                        let (field, at, width) = field_at(false, i);
                        let mut raw = [0u8; 8];
                        raw[..width].copy_from_slice(&bad[at..at + width]);
                        let value = u64::from_le_bytes(raw);
                        let areas = [(firmware_area(MEM), "firmware area")];
                        expected(false, &good, 1, ENTRY, field, value, MEM, &areas).map(
                            |(rip, placed)| {
                                let ram = if field == Field::Ignored {
                                    good_ram.clone()
                                } else {
                                    moved_block(&good_ram, &loads, &bad, &placed)
                                };
                                (rip, ram)
                            },
                        )
                    }
                    _ if i < mb + 4 => Err(LoadError::NoMultibootHeader),
                    _ if i < mb + 12 => Err(LoadError::BadMultibootChecksum { offset: mb }),
                    _ => {
                        let mut ram = good_ram.clone();
                        ram[(loads[0].paddr as usize) + (i - mb)] = v;
                        Ok((ENTRY, ram))
                    }
                };
                match want {
                    Err(e) => assert_eq!(got.map(|_| ()), Err(e), "{what}"),
                    Ok((rip, want_ram)) => {
                        let (state, ram) = got.unwrap_or_else(|e| panic!("{what}: {e}"));
                        let want_state = InitialState {
                            rip,
                            ..good_state.clone()
                        };
                        assert_eq!(state, want_state, "{what}");
                        assert!(ram == want_ram, "{what}: RAM differs");
                    }
                }
            }
        }
    }
}
