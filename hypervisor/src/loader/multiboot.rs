//! Multiboot 1 kernels, loaded as the Multiboot Specification 0.6.96 describes (section numbers
//! below are that document's).
//!
//! - The header (3.1.1) is a 32-bit aligned `magic, flags, checksum` triple with
//!   `magic + flags + checksum == 0` mod 2^32, wholly inside the first 8192 bytes of the image.
//! - Flags 0-15 are requirements (3.1.2): Keel provides bit 0 (modules page aligned: always) and
//!   bit 1 (memory information: always) and refuses any other, e.g. bit 2 (video mode).
//! - Flag 16 (the "a.out kludge", 3.1.3): the header's address fields say where the image goes;
//!   otherwise the image must be an ELF file whose `PT_LOAD` segments are loaded as in [`super::elf`].
//! - Modules are copied after the kernel, each at a page boundary, in manifest order; each
//!   module's string is its archive name.
//! - Machine state (3.2): EAX = 0x2BADB002, EBX = physical address of the multiboot info (3.3),
//!   32-bit protected mode with flat 4 GiB CS (0x08) and data segments (0x10), paging off,
//!   interrupts off. Keel also gives a valid GDTR and a stack (ESP = top of RAM - 4 KiB), which the
//!   spec leaves undefined: a kernel must not rely on them.
//!
//! The info structure lives at [`super::MULTIBOOT_INFO_ADDR`] with the memory map, module list and
//! strings after it; the command line is at [`super::CMDLINE_ADDR`], passed as written in the
//! manifest (no image name in front).

use super::elf::{self, ElfImage};
use super::{
    read_u32, GuestRam, InitialState, LoadError, LoadRequest, BOOT_AREA, MIN_RAM,
    MULTIBOOT_INFO_ADDR,
};

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

/// Info structure flags Keel sets (3.3).
pub const INFO_MEMORY: u32 = 1 << 0;
pub const INFO_CMDLINE: u32 = 1 << 2;
pub const INFO_MODS: u32 = 1 << 3;
pub const INFO_MMAP: u32 = 1 << 6;
pub const INFO_LOADER_NAME: u32 = 1 << 9;

/// Offsets in the multiboot info structure (3.3).
pub mod info {
    pub const FLAGS: u64 = 0;
    pub const MEM_LOWER: u64 = 4;
    pub const MEM_UPPER: u64 = 8;
    pub const CMDLINE: u64 = 16;
    pub const MODS_COUNT: u64 = 20;
    pub const MODS_ADDR: u64 = 24;
    pub const MMAP_LENGTH: u64 = 44;
    pub const MMAP_ADDR: u64 = 48;
    pub const BOOT_LOADER_NAME: u64 = 64;
    /// The structure is 116 bytes up to the framebuffer fields; Keel reserves 128.
    pub const SIZE: u64 = 128;
}

/// Memory map entry types (3.3): 1 = available RAM, 2 = reserved.
pub const MMAP_AVAILABLE: u32 = 1;
pub const MMAP_RESERVED: u32 = 2;
/// Each entry: size (u32, not counting itself), base (u64), length (u64), type (u32).
pub const MMAP_ENTRY_SIZE: u64 = 24;
pub const MMAP_ADDR: u64 = MULTIBOOT_INFO_ADDR + info::SIZE;
/// Module list: 16 bytes per module (mod_start, mod_end, string, reserved).
pub const MODS_ADDR: u64 = MMAP_ADDR + 0x80;
pub const MOD_ENTRY_SIZE: u64 = 16;
pub const LOADER_NAME: &str = "Keel";
/// The legacy PC hole: 640 KiB to 1 MiB is reported reserved (VGA memory and ROMs on a PC).
const LOW_MEMORY_END: u64 = 0xa_0000;
const HIGH_MEMORY_START: u64 = 0x10_0000;
const PAGE: u64 = 0x1000;

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

/// Loads the image as the address fields say (3.1.3); returns (entry, end of bss).
fn place_aout(
    ram: &mut GuestRam,
    image: &[u8],
    header_offset: usize,
    a: &AoutAddresses,
) -> Result<(u64, u64), LoadError> {
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
    ram.check_free("image", load_addr, mem_end - load_addr)?;
    // In range: file_start + load_len <= image.len() was checked above.
    let data = &image[file_start as usize..(file_start + load_len) as usize];
    ram.write("image", load_addr, data)?;
    ram.zero("bss", load_end, mem_end - load_end)?;
    let entry = u64::from(a.entry_addr);
    if !(load_addr..mem_end).contains(&entry) {
        return Err(LoadError::EntryOutsideImage { entry });
    }
    Ok((entry, mem_end))
}

fn align_up(x: u64) -> Option<u64> {
    Some(x.checked_add(PAGE - 1)? & !(PAGE - 1))
}

/// Loads a multiboot kernel and its modules and writes the multiboot info.
pub fn load(ram: &mut [u8], req: &LoadRequest) -> Result<InitialState, LoadError> {
    let mut ram = GuestRam::new(ram);
    ram.require(MIN_RAM)?;
    let header = find_header(req.image)?;
    let (entry, kernel_end) = match &header.addresses {
        Some(a) => place_aout(&mut ram, req.image, header.offset, a)?,
        None => {
            let elf: ElfImage = elf::parse(req.image)?;
            let placed = elf::place_segments(&mut ram, &elf, req.image)?;
            (placed.entry, placed.end)
        }
    };
    if entry > u64::from(u32::MAX) {
        return Err(LoadError::EntryOutsideImage { entry });
    }
    ram.write_gdt()?;
    let cmdline = ram.write_cmdline(&req.cfg.cmdline)?;

    // Strings go after the module list, up to the end of the boot area.
    let mods_len = (req.modules.len() as u64)
        .checked_mul(MOD_ENTRY_SIZE)
        .ok_or(LoadError::BootInfoFull)?;
    let mut strings = StringArea {
        next: MODS_ADDR + mods_len,
    };
    let loader_name = strings.push(&mut ram, LOADER_NAME)?;

    let mut next = align_up(kernel_end).ok_or(LoadError::BootInfoFull)?;
    for (i, (name, data)) in req.modules.iter().enumerate() {
        let size = data.len() as u64;
        ram.check_free("module", next, size)?;
        ram.write("module", next, data)?;
        let string = strings.push(&mut ram, name)?;
        let entry = MODS_ADDR + MOD_ENTRY_SIZE * i as u64;
        ram.write_u32(entry, next as u32)?; // < RAM size <= 3 GiB: fits
        ram.write_u32(entry + 4, (next + size) as u32)?;
        ram.write_u32(entry + 8, string)?;
        ram.write_u32(entry + 12, 0)?;
        next = align_up(next + size).ok_or(LoadError::BootInfoFull)?;
    }

    let ram_len = ram.len();
    let map = [
        (0, LOW_MEMORY_END, MMAP_AVAILABLE),
        (
            LOW_MEMORY_END,
            HIGH_MEMORY_START - LOW_MEMORY_END,
            MMAP_RESERVED,
        ),
        (
            HIGH_MEMORY_START,
            ram_len - HIGH_MEMORY_START,
            MMAP_AVAILABLE,
        ),
    ];
    for (i, (base, len, kind)) in map.iter().enumerate() {
        let e = MMAP_ADDR + MMAP_ENTRY_SIZE * i as u64;
        ram.write_u32(e, (MMAP_ENTRY_SIZE - 4) as u32)?;
        ram.write_u64(e + 4, *base)?;
        ram.write_u64(e + 12, *len)?;
        ram.write_u32(e + 20, *kind)?;
    }

    let base = MULTIBOOT_INFO_ADDR;
    ram.zero("multiboot info", base, info::SIZE)?;
    let flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    let fields = [
        (info::FLAGS, flags),
        (info::MEM_LOWER, (LOW_MEMORY_END / 1024) as u32),
        (
            info::MEM_UPPER,
            ((ram_len - HIGH_MEMORY_START) / 1024) as u32,
        ),
        (info::CMDLINE, cmdline as u32),
        (info::MODS_COUNT, req.modules.len() as u32),
        (info::MODS_ADDR, MODS_ADDR as u32),
        (
            info::MMAP_LENGTH,
            (MMAP_ENTRY_SIZE * map.len() as u64) as u32,
        ),
        (info::MMAP_ADDR, MMAP_ADDR as u32),
        (info::BOOT_LOADER_NAME, loader_name),
    ];
    for (off, v) in fields {
        ram.write_u32(base + off, v)?;
    }

    Ok(InitialState {
        rip: entry,
        rax: u64::from(BOOTLOADER_MAGIC),
        rbx: base,
        ..InitialState::protected(ram_len)
    })
}

/// Bump allocator for NUL-terminated strings in the rest of the boot area.
struct StringArea {
    next: u64,
}

impl StringArea {
    /// Writes `s` and returns its address, or `BootInfoFull` when it does not fit.
    fn push(&mut self, ram: &mut GuestRam, s: &str) -> Result<u32, LoadError> {
        let addr = self.next;
        let room = BOOT_AREA.end.saturating_sub(addr);
        if s.len() as u64 >= room {
            return Err(LoadError::BootInfoFull);
        }
        ram.write_cstr(addr, s, usize::MAX)?;
        self.next = addr + s.len() as u64 + 1;
        Ok(addr as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::elf::build::{elf, put32, Seg};
    use crate::loader::elf::EM_386;
    use crate::loader::test_util::{config, cstr_at, u32_at, u64_at};
    use crate::loader::{CpuMode, CMDLINE_ADDR, GDT_ADDR, GDT_ENTRIES};
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

    #[test]
    fn elf_kernel_gets_machine_state_and_info() {
        let img = elf_kernel();
        let modules: [(&str, &[u8]); 2] = [("initrd.img", &[7; 5000]), ("second", b"abc")];
        let (s, ram) = run(&img, &modules, RAM).unwrap();
        assert_eq!(s.mode, CpuMode::Protected);
        assert_eq!(
            (s.rip, s.rax, s.rbx),
            (0x10_000c, 0x2bad_b002, MULTIBOOT_INFO_ADDR)
        );
        assert_eq!((s.cr0, s.rflags), (0x31, 2));
        assert_eq!((s.code_selector, s.data_selector), (0x08, 0x10));
        assert_eq!((s.gdtr_base, s.gdtr_limit), (GDT_ADDR, 31));
        assert_eq!(u64_at(&ram, GDT_ADDR + 16), GDT_ENTRIES[2]);

        let info = |off| u32_at(&ram, MULTIBOOT_INFO_ADDR + off);
        assert_eq!(info(info::FLAGS), 0x24d);
        assert_eq!(info(info::MEM_LOWER), 640);
        assert_eq!(info(info::MEM_UPPER), 15 * 1024);
        assert_eq!(u64::from(info(info::CMDLINE)), CMDLINE_ADDR);
        assert_eq!(cstr_at(&ram, CMDLINE_ADDR), "console=ttyS0 hi");
        assert_eq!(cstr_at(&ram, info(info::BOOT_LOADER_NAME).into()), "Keel");

        // Kernel ends at 0x100000 + 32 + 0x3000: modules start at the next page.
        assert_eq!(info(info::MODS_COUNT), 2);
        let mods = u64::from(info(info::MODS_ADDR));
        let m = |i: u64, f: u64| u32_at(&ram, mods + 16 * i + f);
        assert_eq!((m(0, 0), m(0, 4)), (0x10_4000, 0x10_4000 + 5000));
        assert_eq!(cstr_at(&ram, m(0, 8).into()), "initrd.img");
        assert_eq!((m(1, 0), m(1, 4)), (0x10_6000, 0x10_6003));
        assert_eq!(cstr_at(&ram, m(1, 8).into()), "second");
        assert_eq!(&ram[0x10_6000..0x10_6003], b"abc");
        assert!(ram[0x10_4000..0x10_4000 + 5000].iter().all(|&b| b == 7));

        let mmap = u64::from(info(info::MMAP_ADDR));
        assert_eq!(info(info::MMAP_LENGTH), 72);
        let expect = [
            (0, 0xa_0000, 1),
            (0xa_0000, 0x6_0000, 2),
            (0x10_0000, RAM - 0x10_0000, 1),
        ];
        for (i, (base, len, kind)) in expect.into_iter().enumerate() {
            let e = mmap + 24 * i as u64;
            assert_eq!(u32_at(&ram, e), 20);
            assert_eq!(u64_at(&ram, e + 4), base);
            assert_eq!(u64_at(&ram, e + 12), len);
            assert_eq!(u32_at(&ram, e + 20), kind);
        }
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
        assert_eq!(u32_at(&ram, MULTIBOOT_INFO_ADDR + info::MODS_COUNT), 0);

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
        // The whole 104-byte file is loaded (load_end_addr 0).
        assert_eq!(
            with([0x9008, 0x9000, 0, 0, 0x9000]),
            LoadError::Overlaps {
                what: "image",
                addr: 0x9000,
                size: 104,
                area: "boot structures",
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
        let big = vec![0u8; 15 << 20];
        // The kernel ends at 0x103020; the module starts at the next page.
        assert_eq!(
            run(&img, &[("big", &big)], RAM).unwrap_err(),
            LoadError::OutsideRam {
                what: "module",
                addr: 0x10_4000,
                size: 15 << 20
            }
        );
        let name: String = "n".repeat(4000);
        let many: Vec<(&str, &[u8])> = (0..3).map(|_| (name.as_str(), &b""[..])).collect();
        assert_eq!(run(&img, &many, RAM).unwrap_err(), LoadError::BootInfoFull);
        let lots: Vec<(&str, &[u8])> = (0..600).map(|_| ("m", &b"x"[..])).collect();
        assert_eq!(run(&img, &lots, RAM).unwrap_err(), LoadError::BootInfoFull);
        let ok: Vec<(&str, &[u8])> = (0..100).map(|_| ("m", &b"x"[..])).collect();
        let (_, ram) = run(&img, &ok, RAM).unwrap();
        assert_eq!(u32_at(&ram, MULTIBOOT_INFO_ADDR + info::MODS_COUNT), 100);
    }

    /// Every truncation of a valid multiboot ELF kernel, and every byte of it set to 0x00, 0xff,
    /// 0x80 and 0x7f, gives exactly the error the damaged part calls for (the ELF headers as the
    /// ELF loader reads them, the multiboot header's magic, flags and checksum), or the load the
    /// change describes (state and every byte of RAM).
    #[test]
    fn mangled_images_give_the_exact_error_or_load() {
        use crate::loader::elf::mangle::{expected, expected_ram, field_at, good_loads, Field};
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
                        expected(false, &good, 1, ENTRY, field, value, MEM).map(|(rip, placed)| {
                            let ram = if field == Field::Ignored {
                                good_ram.clone()
                            } else {
                                expected_ram(&good_ram, &loads, &bad, &placed)
                            };
                            (rip, ram)
                        })
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
