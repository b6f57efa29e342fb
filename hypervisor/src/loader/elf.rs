//! ELF kernels: ELF32 (EM_386) entered in 32-bit protected mode, ELF64 (EM_X86_64) entered in
//! long mode on identity page tables the loader builds.
//!
//! Format facts are from the System V gABI ("ELF Header", "Program Header") and its i386 and
//! x86-64 supplements. Only `ET_EXEC` images are accepted: nothing is relocated. Each `PT_LOAD`
//! segment is copied to its physical address `p_paddr`, and `p_memsz - p_filesz` bytes after it
//! are zeroed (bss).
//!
//! Entry convention (docs/GUESTS.md):
//! - RIP/EIP = `e_entry`, translated to a physical address through the segment that contains it
//!   (so an image linked with `p_vaddr != p_paddr` still starts at the right byte);
//! - RDI/EDI = guest-physical address of the NUL-terminated command line ([`super::CMDLINE_ADDR`]);
//! - RSI/ESI = RAM size in bytes;
//! - RSP/ESP = top of RAM minus [`super::STACK_TOP_RESERVE`], 16-byte aligned (as it is before a
//!   `call`, so an assembly entry should `call` into compiled code); 64 KiB below it are free;
//! - interrupts off (RFLAGS = 0x2), no IDT (IDTR limit 0): the guest installs its own.
//! - ELF32: CR0 = PE|ET|NE, paging off, CS = 0x08 and DS/ES/FS/GS/SS = 0x10, flat 4 GiB.
//! - ELF64: CR0 = PG|PE|ET|NE, CR4 = PAE, EFER = LME|LMA, CR3 = [`super::PML4_ADDR`], CS = 0x18
//!   (64-bit), data 0x10. The page tables identity-map 0..4 GiB with 2 MiB pages; pages holding
//!   RAM are write-back, every other page (the LAPIC at 0xfee00000, the IOAPIC at 0xfec00000, the
//!   rest of the hole) is uncached (PCD|PWT).

use super::{
    read_u16, read_u32, read_u64, GuestRam, InitialState, LoadError, LoadRequest, CODE64_SELECTOR,
    CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, MIN_RAM, PDPT_ADDR, PD_ADDR, PML4_ADDR,
};
use alloc::vec::Vec;

pub const EM_386: u16 = 3;
pub const EM_X86_64: u16 = 62;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
const PN_XNUM: u16 = 0xffff;
const EHDR32_SIZE: usize = 52;
const EHDR64_SIZE: usize = 64;
const PHDR32_SIZE: usize = 32;
const PHDR64_SIZE: usize = 56;

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub filesz: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub memsz: u64,
}

/// The parts of an ELF file a loader needs, all fields validated against the file size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    pub is_64: bool,
    pub machine: u16,
    pub entry: u64,
    pub segments: Vec<Segment>,
}

/// Does `image` start with the ELF magic?
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// Parses the ELF and program headers. Checks that each segment's file bytes are inside the image
/// and that `p_filesz <= p_memsz`; where segments go is checked when loading.
pub fn parse(image: &[u8]) -> Result<ElfImage, LoadError> {
    if !is_elf(image) {
        return Err(LoadError::NotElf);
    }
    let class = *image.get(4).ok_or(LoadError::NotElf)?;
    let machine = read_u16(image, 18).ok_or(LoadError::BadElf("truncated ELF header"))?;
    let is_64 = match (class, machine) {
        (ELFCLASS32, EM_386) => false,
        (ELFCLASS64, EM_X86_64) => true,
        _ => return Err(LoadError::UnsupportedElf { class, machine }),
    };
    let hdr_size = if is_64 { EHDR64_SIZE } else { EHDR32_SIZE };
    if image.len() < hdr_size {
        return Err(LoadError::BadElf("truncated ELF header"));
    }
    if image[5] != ELFDATA2LSB {
        return Err(LoadError::BadElf("not little-endian"));
    }
    if image[6] != EV_CURRENT {
        return Err(LoadError::BadElf("unknown ELF version"));
    }
    if read_u16(image, 16) != Some(ET_EXEC) {
        return Err(LoadError::BadElf("not an executable (ET_EXEC)"));
    }
    let field = |v: Option<u64>| v.ok_or(LoadError::BadElf("truncated ELF header"));
    let (entry, phoff, phentsize, phnum) = if is_64 {
        (
            field(read_u64(image, 24))?,
            field(read_u64(image, 32))?,
            field(read_u16(image, 54).map(u64::from))?,
            field(read_u16(image, 56).map(u64::from))?,
        )
    } else {
        (
            field(read_u32(image, 24).map(u64::from))?,
            field(read_u32(image, 28).map(u64::from))?,
            field(read_u16(image, 42).map(u64::from))?,
            field(read_u16(image, 44).map(u64::from))?,
        )
    };
    if phnum == u64::from(PN_XNUM) {
        return Err(LoadError::BadElf("extended program header numbering"));
    }
    let min_phent = if is_64 { PHDR64_SIZE } else { PHDR32_SIZE };
    if phentsize < min_phent as u64 {
        return Err(LoadError::BadElf("program header entries too small"));
    }
    let table_end = phentsize
        .checked_mul(phnum)
        .and_then(|len| len.checked_add(phoff))
        .ok_or(LoadError::BadElf("program header table outside the file"))?;
    if table_end > image.len() as u64 {
        return Err(LoadError::BadElf("program header table outside the file"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        // In range: phoff + phnum * phentsize <= image.len() was checked above.
        let ph = &image[(phoff + i * phentsize) as usize..(phoff + (i + 1) * phentsize) as usize];
        let bad = LoadError::BadElf("truncated program header");
        if read_u32(ph, 0).ok_or(bad.clone())? != PT_LOAD {
            continue;
        }
        let seg = if is_64 {
            Segment {
                offset: read_u64(ph, 8).ok_or(bad.clone())?,
                vaddr: read_u64(ph, 16).ok_or(bad.clone())?,
                paddr: read_u64(ph, 24).ok_or(bad.clone())?,
                filesz: read_u64(ph, 32).ok_or(bad.clone())?,
                memsz: read_u64(ph, 40).ok_or(bad)?,
            }
        } else {
            let f = |off| read_u32(ph, off).map(u64::from).ok_or(bad.clone());
            Segment {
                offset: f(4)?,
                vaddr: f(8)?,
                paddr: f(12)?,
                filesz: f(16)?,
                memsz: f(20)?,
            }
        };
        if seg.filesz > seg.memsz {
            return Err(LoadError::BadElf(
                "segment file size exceeds its memory size",
            ));
        }
        let in_file = seg
            .offset
            .checked_add(seg.filesz)
            .is_some_and(|end| end <= image.len() as u64);
        if !in_file {
            return Err(LoadError::SegmentOutsideImage {
                offset: seg.offset,
                size: seg.filesz,
            });
        }
        if seg.memsz != 0 {
            segments.push(seg);
        }
    }
    if segments.is_empty() {
        return Err(LoadError::NoLoadableSegment);
    }
    Ok(ElfImage {
        is_64,
        machine,
        entry,
        segments,
    })
}

/// Where a loaded image ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// The entry point as a physical address.
    pub entry: u64,
    /// One past the highest byte any segment occupies (bss included).
    pub end: u64,
}

/// Copies every segment of `elf` to its physical address and zeroes its bss, after checking that
/// all of them fit in RAM clear of the boot structures and the stack.
pub(crate) fn place_segments(
    ram: &mut GuestRam,
    elf: &ElfImage,
    image: &[u8],
) -> Result<Placed, LoadError> {
    for s in &elf.segments {
        ram.check_free("segment", s.paddr, s.memsz)?;
    }
    let mut end = 0;
    for s in &elf.segments {
        // Offsets were checked against the image in `parse`, addresses against RAM above.
        let data = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        ram.write("segment", s.paddr, data)?;
        ram.zero("bss", s.paddr + s.filesz, s.memsz - s.filesz)?;
        end = end.max(s.paddr + s.memsz);
    }
    let entry = elf
        .segments
        .iter()
        .find(|s| s.vaddr <= elf.entry && elf.entry - s.vaddr < s.memsz)
        .map(|s| s.paddr + (elf.entry - s.vaddr))
        .ok_or(LoadError::EntryOutsideImage { entry: elf.entry })?;
    Ok(Placed { entry, end })
}

/// Loads an ELF32 or ELF64 guest (see the module comment for the entry convention).
pub fn load(ram: &mut [u8], req: &LoadRequest) -> Result<InitialState, LoadError> {
    if !req.modules.is_empty() {
        return Err(LoadError::ModulesNotSupported);
    }
    let mut ram = GuestRam::new(ram);
    ram.require(MIN_RAM)?;
    let elf = parse(req.image)?;
    let placed = place_segments(&mut ram, &elf, req.image)?;
    ram.write_gdt()?;
    let cmdline = ram.write_cmdline(&req.cfg.cmdline)?;
    let mut state = InitialState {
        rip: placed.entry,
        rdi: cmdline,
        rsi: ram.len(),
        ..InitialState::protected(ram.len())
    };
    if elf.is_64 {
        write_identity_map(&mut ram, PML4_ADDR)?;
        state.mode = super::CpuMode::Long;
        state.cr0 |= CR0_PG;
        state.cr3 = PML4_ADDR;
        state.cr4 = CR4_PAE;
        state.efer = EFER_LME | EFER_LMA;
        state.code_selector = CODE64_SELECTOR;
    } else if placed.entry > u64::from(u32::MAX) {
        // Unreachable for a valid ELF32 (32-bit fields), kept as a guard.
        return Err(LoadError::EntryOutsideImage {
            entry: placed.entry,
        });
    }
    Ok(state)
}

// ---- Identity page tables for long mode (SDM Vol. 3A 4.5, tables 4-15 to 4-18) ----

pub const PTE_PRESENT: u64 = 1 << 0;
pub const PTE_WRITABLE: u64 = 1 << 1;
pub const PTE_PWT: u64 = 1 << 3;
pub const PTE_PCD: u64 = 1 << 4;
/// In a page-directory entry: maps a 2 MiB page instead of pointing to a page table.
pub const PTE_PAGE_SIZE: u64 = 1 << 7;
const PAGE_2M: u64 = 2 << 20;
/// Page directories written: one per GiB of the identity map.
pub const IDENTITY_MAP_GIB: u64 = 4;

/// Bytes of page tables [`write_identity_map`] writes: PML4, PDPT and the page directories.
pub const IDENTITY_MAP_BYTES: u64 = (2 + IDENTITY_MAP_GIB) * 0x1000;

// The ELF64 layout (loader/mod.rs) is the identity map written at PML4_ADDR.
const _: () = assert!(PDPT_ADDR == PML4_ADDR + 0x1000 && PD_ADDR == PML4_ADDR + 0x2000);

/// PML4[0] -> PDPT, PDPT[0..4] -> four page directories of 2 MiB pages covering 0..4 GiB; the
/// PML4 at `pml4`, the PDPT in the next page and the page directories after it
/// ([`IDENTITY_MAP_BYTES`] in all).
pub(crate) fn write_identity_map(ram: &mut GuestRam, pml4: u64) -> Result<(), LoadError> {
    let pdpt = pml4 + 0x1000;
    ram.write_u64(pml4, pdpt | PTE_PRESENT | PTE_WRITABLE)?;
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = pdpt + 0x1000 + gib * 0x1000;
        ram.write_u64(pdpt + gib * 8, pd | PTE_PRESENT | PTE_WRITABLE)?;
        for i in 0..512 {
            let addr = (gib * 512 + i) * PAGE_2M;
            ram.write_u64(pd + i * 8, identity_pde(addr, ram.len()))?;
        }
    }
    Ok(())
}

/// The page-directory entry mapping the 2 MiB page at `addr`: write-back RAM, or uncached
/// (PCD|PWT, SDM 11.12.3 with the default PAT) for device and unbacked addresses.
pub fn identity_pde(addr: u64, ram_len: u64) -> u64 {
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE;
    if addr < ram_len {
        addr | flags
    } else {
        addr | flags | PTE_PCD | PTE_PWT
    }
}

/// A small ELF writer for the loader tests.
#[cfg(test)]
pub(crate) mod build {
    use alloc::vec;
    use alloc::vec::Vec;

    pub struct Seg {
        pub vaddr: u64,
        pub paddr: u64,
        pub data: Vec<u8>,
        pub memsz: u64,
    }

    impl Seg {
        /// Identity-linked segment with `bss` zero bytes after `data`.
        pub fn at(addr: u64, data: &[u8], bss: u64) -> Self {
            Self {
                vaddr: addr,
                paddr: addr,
                data: data.to_vec(),
                memsz: data.len() as u64 + bss,
            }
        }
    }

    /// An ET_EXEC image: header, program headers (a PT_NOTE first, then one PT_LOAD per
    /// segment), then the segment bytes.
    pub fn elf(is_64: bool, machine: u16, entry: u64, segs: &[Seg]) -> Vec<u8> {
        let (ehsize, phsize) = if is_64 { (64, 56) } else { (52, 32) };
        let phnum = segs.len() + 1;
        let mut out = vec![0u8; ehsize + phsize * phnum];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = if is_64 { 2 } else { 1 };
        out[5] = 1;
        out[6] = 1;
        put16(&mut out, 16, 2);
        put16(&mut out, 18, machine);
        put32(&mut out, 20, 1);
        if is_64 {
            put64(&mut out, 24, entry);
            put64(&mut out, 32, ehsize as u64);
            put16(&mut out, 52, ehsize as u16);
            put16(&mut out, 54, phsize as u16);
            put16(&mut out, 56, phnum as u16);
        } else {
            put32(&mut out, 24, entry as u32);
            put32(&mut out, 28, ehsize as u32);
            put16(&mut out, 40, ehsize as u16);
            put16(&mut out, 42, phsize as u16);
            put16(&mut out, 44, phnum as u16);
        }
        // Program header 0: PT_NOTE (4), must be skipped.
        put32(&mut out, ehsize, 4);
        for (i, s) in segs.iter().enumerate() {
            let offset = out.len() as u64;
            out.extend_from_slice(&s.data);
            let ph = ehsize + phsize * (i + 1);
            put32(&mut out, ph, 1);
            if is_64 {
                put64(&mut out, ph + 8, offset);
                put64(&mut out, ph + 16, s.vaddr);
                put64(&mut out, ph + 24, s.paddr);
                put64(&mut out, ph + 32, s.data.len() as u64);
                put64(&mut out, ph + 40, s.memsz);
            } else {
                put32(&mut out, ph + 4, offset as u32);
                put32(&mut out, ph + 8, s.vaddr as u32);
                put32(&mut out, ph + 12, s.paddr as u32);
                put32(&mut out, ph + 16, s.data.len() as u32);
                put32(&mut out, ph + 20, s.memsz as u32);
            }
        }
        out
    }

    /// Offset of program header `i` (0 is the PT_NOTE, 1 the first PT_LOAD).
    pub fn phdr(is_64: bool, i: usize) -> usize {
        if is_64 {
            64 + 56 * i
        } else {
            52 + 32 * i
        }
    }

    pub fn put16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// A model of what the loader must make of an image made by [`build::elf`] with one header field
/// changed, for the tests that mangle images (here and in the multiboot loader).
#[cfg(test)]
pub(crate) mod mangle {
    use super::build::phdr;
    use super::{EM_386, EM_X86_64};
    use crate::loader::test_util::{u32_at, u64_at};
    use crate::loader::LoadError;
    use alloc::vec::Vec;

    /// The fields of the test image's headers, as the mangling tests see them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Field {
        /// Bytes the loader does not read (identification padding, e_version, e_flags, section
        /// header fields, p_flags, p_align, all of the PT_NOTE header but its type).
        Ignored,
        Magic,
        Class,
        Data,
        Version,
        Type,
        Machine,
        Entry,
        PhOff,
        PhEntSize,
        PhNum,
        /// A field of the program header of PT_LOAD segment `k` (0 or 1).
        Load(usize, SegField),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SegField {
        Type,
        Offset,
        Vaddr,
        Paddr,
        Filesz,
        Memsz,
        Ignored,
    }

    /// The field byte `i` of an image made by [`super::build::elf`] belongs to, with its offset and
    /// width.
    pub fn field_at(is_64: bool, i: usize) -> (Field, usize, usize) {
        use Field as F;
        // Word-sized fields: 8 bytes in ELF64, 4 in ELF32 (the 64-bit header is the 32-bit one
        // with wider entry, phoff and shoff, so phentsize/phnum move from 42 to 54).
        let w = if is_64 { 8 } else { 4 };
        let phentsize_at = if is_64 { 54 } else { 42 };
        let header = [
            (0, 4, F::Magic),
            (4, 1, F::Class),
            (5, 1, F::Data),
            (6, 1, F::Version),
            (16, 2, F::Type),
            (18, 2, F::Machine),
            (24, w, F::Entry),
            (24 + w, w, F::PhOff),
            (phentsize_at, 2, F::PhEntSize),
            (phentsize_at + 2, 2, F::PhNum),
        ];
        // A program header: p_type, then (ELF64: after p_flags) offset, vaddr, paddr, filesz,
        // memsz, one word each.
        let first = if is_64 { 8 } else { 4 };
        let ph = [
            (0, 4, SegField::Type),
            (first, w, SegField::Offset),
            (first + w, w, SegField::Vaddr),
            (first + 2 * w, w, SegField::Paddr),
            (first + 3 * w, w, SegField::Filesz),
            (first + 4 * w, w, SegField::Memsz),
        ];
        if i < phdr(is_64, 0) {
            return header
                .iter()
                .find(|(at, len, _)| (*at..at + len).contains(&i))
                .map_or((F::Ignored, i, 1), |&(at, len, f)| (f, at, len));
        }
        let k = (i - phdr(is_64, 0)) / (phdr(is_64, 1) - phdr(is_64, 0));
        let base = phdr(is_64, k);
        let (f, at, len) = ph
            .iter()
            .find(|(at, len, _)| (base + at..base + at + len).contains(&i))
            .map_or((SegField::Ignored, i - base, 1), |&(at, len, f)| {
                (f, at, len)
            });
        match k {
            // The PT_NOTE: only its type is read, and no byte value in the sweep makes it PT_LOAD.
            0 => (F::Ignored, i, 1),
            _ => (F::Load(k - 1, f), base + at, len),
        }
    }

    /// A PT_LOAD as the loader should read it from a mangled image.
    #[derive(Clone, Copy)]
    pub struct Load {
        pub offset: u64,
        pub vaddr: u64,
        pub paddr: u64,
        pub filesz: u64,
        pub memsz: u64,
    }

    /// The `n` PT_LOADs of an image made by [`super::build::elf`], as its headers say.
    pub fn good_loads(good: &[u8], is_64: bool, n: usize) -> Vec<Load> {
        (1..=n)
            .map(|k| {
                let ph = phdr(is_64, k);
                let f = |off64: usize, off32: usize| {
                    if is_64 {
                        u64_at(good, (ph + off64) as u64)
                    } else {
                        u64::from(u32_at(good, (ph + off32) as u64))
                    }
                };
                Load {
                    offset: f(8, 4),
                    vaddr: f(16, 8),
                    paddr: f(24, 12),
                    filesz: f(32, 16),
                    memsz: f(40, 20),
                }
            })
            .collect()
    }

    /// What loading `good` (made by [`super::build::elf`] with `n` segments and entry point
    /// `entry`) with `field` set to `value` must give: the exact error, or the entry point and the
    /// segments as they must land in RAM. Each rule is the ELF specification's meaning of the field
    /// and the loader's documented checks, in the order the loader makes them.
    #[allow(clippy::too_many_arguments)]
    pub fn expected(
        is_64: bool,
        good: &[u8],
        n: usize,
        mut entry: u64,
        field: Field,
        value: u64,
        ram: u64,
        reserved: &[(core::ops::Range<u64>, &'static str)],
    ) -> Result<(u64, Vec<Option<Load>>), LoadError> {
        let (class, machine) = if is_64 { (2, EM_X86_64) } else { (1, EM_386) };
        let mut loads: Vec<Option<Load>> =
            good_loads(good, is_64, n).into_iter().map(Some).collect();
        let ph_size = (phdr(is_64, 1) - phdr(is_64, 0)) as u64;
        let ph_table = |phoff: u64, entsize: u64, num: u64| {
            entsize
                .checked_mul(num)
                .and_then(|l| l.checked_add(phoff))
                .is_none_or(|end| end > good.len() as u64)
        };
        let bad = LoadError::BadElf;
        match field {
            Field::Ignored => {}
            Field::Magic => return Err(LoadError::NotElf),
            Field::Class => {
                return Err(LoadError::UnsupportedElf {
                    class: value as u8,
                    machine,
                })
            }
            Field::Data => return Err(bad("not little-endian")),
            Field::Version => return Err(bad("unknown ELF version")),
            Field::Type => return Err(bad("not an executable (ET_EXEC)")),
            Field::Machine => {
                return Err(LoadError::UnsupportedElf {
                    class,
                    machine: value as u16,
                })
            }
            Field::Entry => entry = value,
            Field::PhOff => {
                if ph_table(value, ph_size, n as u64 + 1) {
                    return Err(bad("program header table outside the file"));
                }
                // Elsewhere in this image the "headers" are segment data and file offsets,
                // none of them PT_LOAD (checked by hand for the values swept).
                return Err(LoadError::NoLoadableSegment);
            }
            Field::PhEntSize => {
                if value < ph_size {
                    return Err(bad("program header entries too small"));
                }
                assert!(
                    ph_table(phdr(is_64, 0) as u64, value, n as u64 + 1),
                    "unmodelled: {value}"
                );
                return Err(bad("program header table outside the file"));
            }
            Field::PhNum => {
                if value == 0xffff {
                    return Err(bad("extended program header numbering"));
                }
                if ph_table(phdr(is_64, 0) as u64, ph_size, value) {
                    return Err(bad("program header table outside the file"));
                }
                assert_eq!(value, 0, "unmodelled");
                return Err(LoadError::NoLoadableSegment);
            }
            Field::Load(k, f) => {
                let Some(l) = loads[k].as_mut() else {
                    unreachable!()
                };
                match f {
                    SegField::Ignored => {}
                    SegField::Type => loads[k] = None,
                    SegField::Offset => l.offset = value,
                    SegField::Vaddr => l.vaddr = value,
                    SegField::Paddr => l.paddr = value,
                    SegField::Filesz => l.filesz = value,
                    SegField::Memsz => l.memsz = value,
                }
            }
        }
        // Parsing: each segment's sizes and file bytes, in header order.
        for l in loads.iter().flatten() {
            if l.filesz > l.memsz {
                return Err(bad("segment file size exceeds its memory size"));
            }
            if l.offset
                .checked_add(l.filesz)
                .is_none_or(|e| e > good.len() as u64)
            {
                return Err(LoadError::SegmentOutsideImage {
                    offset: l.offset,
                    size: l.filesz,
                });
            }
        }
        // A segment that occupies no memory is left out.
        for l in loads.iter_mut() {
            if l.is_some_and(|l| l.memsz == 0) {
                *l = None;
            }
        }
        if loads.iter().all(Option::is_none) {
            return Err(LoadError::NoLoadableSegment);
        }
        // Placing: inside RAM, clear of the reserved areas.
        for l in loads.iter().flatten() {
            let (addr, size) = (l.paddr, l.memsz);
            let what = "segment";
            if addr.checked_add(size).is_none_or(|e| e > ram) {
                return Err(LoadError::OutsideRam { what, addr, size });
            }
            for (area, name) in reserved.iter().cloned() {
                if addr < area.end && area.start < addr + size {
                    return Err(LoadError::Overlaps {
                        what,
                        addr,
                        size,
                        area: name,
                    });
                }
            }
        }
        let rip = loads
            .iter()
            .flatten()
            .find(|l| l.vaddr <= entry && entry - l.vaddr < l.memsz)
            .map(|l| l.paddr + (entry - l.vaddr))
            .ok_or(LoadError::EntryOutsideImage { entry })?;
        Ok((rip, loads))
    }

    /// The ELF loader's reserved areas in `ram` bytes: the boot structures and the stack.
    pub fn elf_areas(ram: u64) -> [(core::ops::Range<u64>, &'static str); 2] {
        [
            (crate::loader::BOOT_AREA, "boot structures"),
            (ram - 0x11000..ram, "initial stack"),
        ]
    }

    /// The RAM a load of `loads` from `image` must leave, given the RAM of the good load
    /// (`good_ram`, whose segments are `good`): the good segments removed, these written.
    pub fn expected_ram(
        good_ram: &[u8],
        good: &[Load],
        image: &[u8],
        loads: &[Option<Load>],
    ) -> Vec<u8> {
        let mut ram = good_ram.to_vec();
        for l in good {
            ram[l.paddr as usize..(l.paddr + l.memsz) as usize].fill(0);
        }
        for l in loads.iter().flatten() {
            let at = l.paddr as usize;
            let data = &image[l.offset as usize..(l.offset + l.filesz) as usize];
            ram[at..at + data.len()].copy_from_slice(data);
            ram[at + data.len()..(l.paddr + l.memsz) as usize].fill(0);
        }
        ram
    }
}

#[cfg(test)]
mod tests {
    use super::build::{elf, phdr, put64, Seg};
    use super::*;
    use crate::loader::test_util::{config, cstr_at, u64_at};
    use crate::loader::{CpuMode, CMDLINE_ADDR, GDT_ADDR, GDT_ENTRIES};
    use crate::manifest::{GuestConfig, GuestKind};
    use alloc::vec;

    const RAM: u64 = 16 << 20;

    fn run(image: &[u8], cfg: &GuestConfig, ram: &mut [u8]) -> Result<InitialState, LoadError> {
        let req = LoadRequest {
            cfg,
            image,
            modules: &[],
            guest_id: 0,
        };
        crate::loader::load(ram, &req)
    }

    fn load_with(image: &[u8], memory: u64) -> Result<(InitialState, Vec<u8>), LoadError> {
        let cfg = config(GuestKind::Elf, memory, "mode=good x");
        let mut ram = vec![0u8; memory as usize];
        run(image, &cfg, &mut ram).map(|s| (s, ram))
    }

    fn two_segments(is_64: bool, machine: u16) -> Vec<u8> {
        elf(
            is_64,
            machine,
            0x20_0010,
            &[
                Seg::at(0x20_0000, &[0x90; 0x40], 0),
                Seg::at(0x30_0000, &[1, 2, 3, 4], 0x2000),
            ],
        )
    }

    #[test]
    fn elf64_enters_long_mode_on_identity_tables() {
        let img = two_segments(true, EM_X86_64);
        let cfg = config(GuestKind::Elf, RAM, "mode=good x");
        let mut ram = vec![0u8; RAM as usize];
        // Dirty the bss to see it zeroed.
        ram[0x30_0004..0x30_2004].fill(0xaa);
        let s = run(&img, &cfg, &mut ram).unwrap();
        assert_eq!(s.mode, CpuMode::Long);
        assert_eq!(s.rip, 0x20_0010);
        assert_eq!((s.rdi, s.rsi, s.rsp), (CMDLINE_ADDR, RAM, RAM - 0x1000));
        assert_eq!(s.rflags, 2);
        assert_eq!(s.cr0, 0x8000_0031);
        assert_eq!((s.cr3, s.cr4, s.efer), (PML4_ADDR, 0x20, 0x500));
        assert_eq!((s.gdtr_base, s.gdtr_limit), (GDT_ADDR, 31));
        assert_eq!((s.code_selector, s.data_selector), (0x18, 0x10));
        assert_eq!(cstr_at(&ram, CMDLINE_ADDR), "mode=good x");
        assert_eq!(&ram[0x20_0000..0x20_0040], &[0x90; 0x40]);
        assert_eq!(&ram[0x30_0000..0x30_0004], &[1, 2, 3, 4]);
        assert!(ram[0x30_0004..0x30_2004].iter().all(|&b| b == 0));
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            assert_eq!(u64_at(&ram, GDT_ADDR + 8 * i as u64), *d);
        }
        // PML4[0] -> PDPT, PDPT[i] -> PD i, nothing else present.
        assert_eq!(u64_at(&ram, PML4_ADDR), PDPT_ADDR | 3);
        assert_eq!(u64_at(&ram, PML4_ADDR + 8), 0);
        for i in 0..4 {
            assert_eq!(u64_at(&ram, PDPT_ADDR + 8 * i), (PD_ADDR + 0x1000 * i) | 3);
        }
        assert_eq!(u64_at(&ram, PDPT_ADDR + 32), 0);
        let pde = |addr: u64| u64_at(&ram, PD_ADDR + (addr >> 21) * 8);
        assert_eq!(pde(0), 0x83);
        assert_eq!(pde(RAM - (2 << 20)), (RAM - (2 << 20)) | 0x83);
        assert_eq!(pde(RAM), RAM | 0x9b, "first page past RAM is uncached");
        assert_eq!(pde(0x4000_0000), 0x4000_0000 | 0x9b);
        assert_eq!(pde(0xfec0_0000), 0xfec0_0000 | 0x9b, "IOAPIC");
        assert_eq!(pde(0xfee0_0000), 0xfee0_0000 | 0x9b, "LAPIC");
        assert_eq!(pde(0xffe0_0000), 0xffe0_0000 | 0x9b);
    }

    #[test]
    fn elf32_enters_protected_mode_without_paging() {
        let img = two_segments(false, EM_386);
        let (s, ram) = load_with(&img, RAM).unwrap();
        assert_eq!(s.mode, CpuMode::Protected);
        assert_eq!(s.rip, 0x20_0010);
        assert_eq!(s.cr0, 0x31);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!((s.code_selector, s.data_selector), (0x08, 0x10));
        assert_eq!((s.rdi, s.rsi), (CMDLINE_ADDR, RAM));
        assert_eq!(&ram[0x30_0000..0x30_0004], &[1, 2, 3, 4]);
        assert_eq!(u64_at(&ram, PML4_ADDR), 0, "no page tables for ELF32");
        assert_eq!(u64_at(&ram, GDT_ADDR + 8), GDT_ENTRIES[1]);
    }

    #[test]
    fn entry_is_translated_through_its_segment() {
        // A higher-half kernel: linked at 0xffffffff80200000, loaded at 2 MiB.
        let seg = Seg {
            vaddr: 0xffff_ffff_8020_0000,
            paddr: 0x20_0000,
            data: vec![0xcc; 16],
            memsz: 0x1000,
        };
        let img = elf(true, EM_X86_64, 0xffff_ffff_8020_0800, &[seg]);
        let (s, _) = load_with(&img, RAM).unwrap();
        assert_eq!(s.rip, 0x20_0800);
        // An entry past the segment's memory size is refused.
        let seg = Seg::at(0x20_0000, &[0xcc; 16], 0);
        let img = elf(true, EM_X86_64, 0x20_0010, &[seg]);
        assert_eq!(
            load_with(&img, RAM).unwrap_err(),
            LoadError::EntryOutsideImage { entry: 0x20_0010 }
        );
    }

    #[test]
    fn rejects_wrong_files() {
        assert_eq!(load_with(b"MZ\x90\0", RAM).unwrap_err(), LoadError::NotElf);
        assert_eq!(load_with(b"\x7fELF", RAM).unwrap_err(), LoadError::NotElf);
        let good = two_segments(true, EM_X86_64);
        assert_eq!(
            load_with(&good[..40], RAM).unwrap_err(),
            LoadError::BadElf("truncated ELF header")
        );
        for (is_64, machine) in [(true, EM_386), (false, EM_X86_64), (false, 40)] {
            let img = two_segments(is_64, machine);
            let class = if is_64 { 2 } else { 1 };
            assert_eq!(
                load_with(&img, RAM).unwrap_err(),
                LoadError::UnsupportedElf { class, machine }
            );
        }
        let mut big_endian = good.clone();
        big_endian[5] = 2;
        assert_eq!(
            load_with(&big_endian, RAM).unwrap_err(),
            LoadError::BadElf("not little-endian")
        );
        let mut dynamic = good.clone();
        dynamic[16] = 3; // ET_DYN
        assert_eq!(
            load_with(&dynamic, RAM).unwrap_err(),
            LoadError::BadElf("not an executable (ET_EXEC)")
        );
        let mut table_out = good.clone();
        put64(&mut table_out, 32, good.len() as u64 - 8);
        assert_eq!(
            load_with(&table_out, RAM).unwrap_err(),
            LoadError::BadElf("program header table outside the file")
        );
        let no_load = elf(true, EM_X86_64, 0, &[]);
        assert_eq!(
            load_with(&no_load, RAM).unwrap_err(),
            LoadError::NoLoadableSegment
        );
    }

    #[test]
    fn rejects_bad_segments() {
        let good = two_segments(true, EM_X86_64);
        let ph = phdr(true, 1);
        let mut data_out = good.clone();
        put64(&mut data_out, ph + 32, 0x10_0000); // p_filesz past the end
        put64(&mut data_out, ph + 40, 0x10_0000);
        assert_eq!(
            load_with(&data_out, RAM).unwrap_err(),
            LoadError::SegmentOutsideImage {
                offset: 232,
                size: 0x10_0000
            }
        );
        let mut file_gt_mem = good.clone();
        put64(&mut file_gt_mem, ph + 40, 1);
        assert_eq!(
            load_with(&file_gt_mem, RAM).unwrap_err(),
            LoadError::BadElf("segment file size exceeds its memory size")
        );
        let mut wrapping = good.clone();
        put64(&mut wrapping, ph + 24, u64::MAX - 8);
        assert_eq!(
            load_with(&wrapping, RAM).unwrap_err(),
            LoadError::OutsideRam {
                what: "segment",
                addr: u64::MAX - 8,
                size: 0x40
            }
        );
        // The second segment's bss reaches past 4 MiB of RAM.
        let img = elf(
            true,
            EM_X86_64,
            0x20_0000,
            &[
                Seg::at(0x20_0000, &[0; 16], 0),
                Seg::at(0x3f_f000, &[1], 0x2000),
            ],
        );
        assert_eq!(
            load_with(&img, 4 << 20).unwrap_err(),
            LoadError::OutsideRam {
                what: "segment",
                addr: 0x3f_f000,
                size: 0x2001
            }
        );
        let low = elf(false, EM_386, 0x8000, &[Seg::at(0x8000, &[0; 16], 0)]);
        assert_eq!(
            load_with(&low, RAM).unwrap_err(),
            LoadError::Overlaps {
                what: "segment",
                addr: 0x8000,
                size: 16,
                area: "boot structures",
            }
        );
        let high = elf(false, EM_386, 0xff_8000, &[Seg::at(0xff_8000, &[0; 16], 0)]);
        assert_eq!(
            load_with(&high, RAM).unwrap_err(),
            LoadError::Overlaps {
                what: "segment",
                addr: 0xff_8000,
                size: 16,
                area: "initial stack",
            }
        );
        assert_eq!(
            load_with(&good, 1 << 20).unwrap_err(),
            LoadError::RamTooSmall {
                needed: 2 << 20,
                have: 1 << 20
            }
        );
    }

    #[test]
    fn rejects_modules_and_long_cmdlines() {
        let img = two_segments(true, EM_X86_64);
        let mut cfg = config(GuestKind::Elf, RAM, "");
        let mut ram = vec![0u8; RAM as usize];
        let req = LoadRequest {
            cfg: &cfg,
            image: &img,
            modules: &[("m", b"x")],
            guest_id: 0,
        };
        assert_eq!(
            crate::loader::load(&mut ram, &req).unwrap_err(),
            LoadError::ModulesNotSupported
        );
        cfg.cmdline = "y".repeat(5000);
        assert_eq!(
            run(&img, &cfg, &mut ram).unwrap_err(),
            LoadError::CmdlineTooLong {
                len: 5000,
                max: 4095
            }
        );
    }

    /// Every truncation of a valid image, and every byte of its headers set to 0x00, 0xff, 0x80
    /// and 0x7f, gives exactly the error the damaged field calls for, or the load the changed
    /// field describes (entry point, state and every byte of RAM).
    #[test]
    fn mangled_images_give_the_exact_error_or_load() {
        use super::mangle::{elf_areas, expected, expected_ram, field_at, good_loads, Field};
        const MEM: u64 = 4 << 20;
        const ENTRY: u64 = 0x20_0010;
        let cfg = config(GuestKind::Elf, MEM, "");
        for (is_64, machine) in [(true, EM_X86_64), (false, EM_386)] {
            let good = two_segments(is_64, machine);
            let loads = good_loads(&good, is_64, 2);
            let mut good_ram = vec![0u8; MEM as usize];
            let good_state = run(&good, &cfg, &mut good_ram).unwrap();
            let header_len = if is_64 { EHDR64_SIZE } else { EHDR32_SIZE };
            let table_end = phdr(is_64, 3);
            let seg_end = |k: usize| (loads[k].offset + loads[k].filesz) as usize;
            for len in 0..good.len() {
                let want = match len {
                    0..=4 => LoadError::NotElf,
                    _ if len < header_len => LoadError::BadElf("truncated ELF header"),
                    _ if len < table_end => {
                        LoadError::BadElf("program header table outside the file")
                    }
                    _ => {
                        let k = if len < seg_end(0) { 0 } else { 1 };
                        LoadError::SegmentOutsideImage {
                            offset: loads[k].offset,
                            size: loads[k].filesz,
                        }
                    }
                };
                let mut ram = vec![0u8; MEM as usize];
                assert_eq!(run(&good[..len], &cfg, &mut ram), Err(want), "{len} bytes");
            }
            // Every field at its largest value (the overflow paths).
            for i in 0..table_end {
                let (field, at, width) = field_at(is_64, i);
                if at != i || field == Field::Ignored {
                    continue;
                }
                let mut bad = good.clone();
                bad[at..at + width].fill(0xff);
                let value = u64::MAX >> (64 - 8 * width);
                let mut ram = vec![0u8; MEM as usize];
                let want = expected(is_64, &good, 2, ENTRY, field, value, MEM, &elf_areas(MEM))
                    .map(|(rip, _)| InitialState {
                        rip,
                        ..good_state.clone()
                    });
                assert_eq!(run(&bad, &cfg, &mut ram), want, "{field:?} = {value:#x}");
            }
            for i in 0..table_end {
                for v in [0x00, 0xff, 0x80, 0x7f] {
                    let mut bad = good.clone();
                    bad[i] = v;
                    let (mut field, at, width) = field_at(is_64, i);
                    if v == good[i] {
                        field = Field::Ignored; // unchanged
                    }
                    let mut raw = [0u8; 8];
                    raw[..width].copy_from_slice(&bad[at..at + width]);
                    let value = u64::from_le_bytes(raw);
                    let mut ram = vec![0u8; MEM as usize];
                    let got = run(&bad, &cfg, &mut ram);
                    let what = alloc::format!("byte {i} ({field:?}) = {v:#x}");
                    match expected(is_64, &good, 2, ENTRY, field, value, MEM, &elf_areas(MEM)) {
                        Err(e) => assert_eq!(got, Err(e), "{what}"),
                        Ok((rip, placed)) => {
                            let want = InitialState {
                                rip,
                                ..good_state.clone()
                            };
                            assert_eq!(got, Ok(want), "{what}");
                            let want_ram = expected_ram(&good_ram, &loads, &bad, &placed);
                            assert!(ram == want_ram, "{what}: RAM differs");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn identity_pde_caching() {
        assert_eq!(identity_pde(0, 1 << 20), 0x83, "partial first page is RAM");
        assert_eq!(identity_pde(2 << 20, 2 << 20), (2 << 20) | 0x9b);
    }
}
