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

use super::LoadError;
use alloc::vec::Vec;

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
        if end < 0x264 || end > SETUP_HEADER_OFFSET + MAX_SETUP_LEN || end > image.len() {
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
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
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
}
