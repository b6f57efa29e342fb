//! Linux kernels for `kind = linux` guests: turns a bzImage (or a vmlinux ELF) into the kernel
//! image Keel loads (`keel::loader::linux`), decompressing the payload on the host so the guest
//! starts at the kernel's own 64-bit entry instead of spending billions of emulated instructions
//! in the decompressor.
//!
//! The payload is whatever `CONFIG_KERNEL_*` the kernel was built with; the kernel's build appends
//! the decompressed size as 4 little-endian bytes (`size_append` in Linux's
//! `arch/x86/boot/compressed/Makefile`), which is checked against what comes out. Formats and the
//! crates that decode them: gzip (`miniz_oxide`), xz with the x86 BCJ filter (`lzma-rust2`),
//! LZ4 in its legacy frame (`lz4_flex`, the format Debian's 6.1 kernels use) and zstd (`ruzstd`).
//! bzip2, LZMA and LZO kernels are refused with a message naming the format.

use anyhow::{anyhow, bail, Context, Result};
use keel::loader::linux::{BzImage, KernelImage};
use std::io::Read;

/// Compression formats of a bzImage payload, told apart by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Lz4Legacy,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    /// Not compressed: the payload is the vmlinux ELF itself.
    None,
}

impl Compression {
    pub fn detect(payload: &[u8]) -> Option<Self> {
        let m = |magic: &[u8]| payload.starts_with(magic);
        Some(if m(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if m(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Self::Xz
        } else if m(&[0x02, 0x21, 0x4c, 0x18]) {
            Self::Lz4Legacy
        } else if m(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else if m(b"BZh") {
            Self::Bzip2
        } else if m(&[0x5d, 0, 0]) {
            Self::Lzma
        } else if m(&[0x89, b'L', b'Z', b'O']) {
            Self::Lzo
        } else if m(b"\x7fELF") {
            Self::None
        } else {
            return None;
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Lz4Legacy => "lz4",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Lzo => "lzo",
            Self::None => "none",
        }
    }
}

/// Upper bound on a decompressed kernel: nothing a 2 GiB guest could hold more of.
const MAX_VMLINUX: usize = 1 << 31;

/// Decompresses a bzImage payload into the vmlinux ELF.
pub fn decompress(payload: &[u8]) -> Result<(Compression, Vec<u8>)> {
    let kind = Compression::detect(payload).ok_or_else(|| {
        anyhow!(
            "unknown compression (payload starts {:02x?})",
            &payload[..payload.len().min(6)]
        )
    })?;
    if kind == Compression::None {
        return Ok((kind, payload.to_vec()));
    }
    if payload.len() < 8 {
        bail!(
            "{} payload of {} bytes is too short",
            kind.name(),
            payload.len()
        );
    }
    let (stream, size) = payload.split_at(payload.len() - 4);
    let size = u32::from_le_bytes(size.try_into().expect("4 bytes")) as usize;
    if size > MAX_VMLINUX {
        bail!("{} payload claims {size} decompressed bytes", kind.name());
    }
    let out = match kind {
        Compression::Gzip => gunzip(stream, size)?,
        Compression::Xz => {
            let mut out = Vec::with_capacity(size);
            lzma_rust2::XzReader::new(stream, false)
                .read_to_end(&mut out)
                .context("xz")?;
            out
        }
        Compression::Lz4Legacy => unlz4_legacy(stream, size)?,
        Compression::Zstd => {
            let mut out = Vec::with_capacity(size);
            ruzstd::decoding::StreamingDecoder::new(stream)
                .map_err(|e| anyhow!("zstd: {e}"))?
                .read_to_end(&mut out)
                .context("zstd")?;
            out
        }
        Compression::Bzip2 | Compression::Lzma | Compression::Lzo | Compression::None => bail!(
            "{}-compressed kernels are not supported: rebuild with CONFIG_KERNEL_GZIP, _XZ, _LZ4 or _ZSTD, or pass the vmlinux ELF",
            kind.name()
        ),
    };
    if out.len() != size {
        bail!(
            "{} payload decompressed to {} bytes, the kernel's size field says {size}",
            kind.name(),
            out.len()
        );
    }
    Ok((kind, out))
}

/// gzip (RFC 1952): skips the header's optional fields, inflates the deflate stream.
fn gunzip(stream: &[u8], size: usize) -> Result<Vec<u8>> {
    const FHCRC: u8 = 1 << 1;
    const FEXTRA: u8 = 1 << 2;
    const FNAME: u8 = 1 << 3;
    const FCOMMENT: u8 = 1 << 4;
    let short = || anyhow!("gzip header truncated");
    if stream.len() < 10 || stream[2] != 8 {
        bail!("gzip: not a deflate stream");
    }
    let flags = stream[3];
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let xlen = u16::from_le_bytes([
            *stream.get(at).ok_or_else(short)?,
            *stream.get(at + 1).ok_or_else(short)?,
        ]);
        at += 2 + usize::from(xlen);
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let nul = stream
                .get(at..)
                .and_then(|s| s.iter().position(|&b| b == 0))
                .ok_or_else(short)?;
            at += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    let body = stream.get(at..).ok_or_else(short)?;
    miniz_oxide::inflate::decompress_to_vec_with_limit(body, size.max(1))
        .map_err(|e| anyhow!("gzip: {e:?}"))
}

/// The LZ4 legacy frame (`lz4 -l`): magic 0x184c2102, then blocks, each a 32-bit compressed
/// length and an LZ4 block of at most 8 MiB decompressed. A repeated magic starts a new frame.
fn unlz4_legacy(stream: &[u8], size: usize) -> Result<Vec<u8>> {
    const MAGIC: u32 = 0x184c_2102;
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::with_capacity(size);
    let mut at = 0;
    while at + 4 <= stream.len() {
        let word = u32::from_le_bytes(stream[at..at + 4].try_into().expect("4 bytes"));
        at += 4;
        if word == MAGIC {
            continue;
        }
        let len = word as usize;
        let block = stream.get(at..at.saturating_add(len)).ok_or_else(|| {
            anyhow!("lz4: block of {len} bytes at offset {at} runs past the payload")
        })?;
        at += len;
        let start = out.len();
        if start + BLOCK > MAX_VMLINUX {
            bail!("lz4: output grows past {MAX_VMLINUX} bytes");
        }
        out.resize(start + BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| anyhow!("lz4: block at offset {}: {e}", at - len))?;
        out.truncate(start + n);
    }
    if at != stream.len() {
        bail!(
            "lz4: {} stray bytes at the end of the payload",
            stream.len() - at
        );
    }
    Ok(out)
}

/// What `prepare` made of a kernel file, for the user's information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub image: Vec<u8>,
    pub compression: Compression,
    pub vmlinux_len: usize,
    pub protocol: Option<u16>,
}

/// Turns a bzImage or a vmlinux ELF into Keel's Linux kernel image.
pub fn prepare(kernel: &[u8]) -> Result<Prepared> {
    if BzImage::is_bzimage(kernel) {
        let bz = BzImage::parse(kernel).map_err(|e| anyhow!("{e}"))?;
        let (compression, vmlinux) = decompress(bz.payload)?;
        let image = KernelImage::from_vmlinux(&vmlinux, bz.setup)
            .map_err(|e| anyhow!("the decompressed kernel: {e}"))?
            .pack();
        Ok(Prepared {
            image,
            compression,
            vmlinux_len: vmlinux.len(),
            protocol: Some(bz.protocol),
        })
    } else if kernel.starts_with(b"\x7fELF") {
        let image = KernelImage::from_vmlinux(kernel, &[])
            .map_err(|e| anyhow!("{e}"))?
            .pack();
        Ok(Prepared {
            image,
            compression: Compression::None,
            vmlinux_len: kernel.len(),
            protocol: None,
        })
    } else {
        bail!("neither a bzImage (no \"HdrS\" setup header) nor a vmlinux ELF")
    }
}

/// One line saying what `prepare` made of the kernel file `name` of `file_len` bytes.
pub fn describe(name: &str, file_len: usize, p: &Prepared) -> String {
    let mb = |n: usize| format!("{:.1} MB", n as f64 / 1e6);
    let (segments, entry) =
        KernelImage::parse(&p.image).map_or((0, 0), |k| (k.segments.len(), k.entry));
    let source = match p.protocol {
        Some(v) => format!(
            "bzImage {} (boot protocol {}.{:02}, {} payload) -> vmlinux {}",
            mb(file_len),
            v >> 8,
            v & 0xff,
            p.compression.name(),
            mb(p.vmlinux_len)
        ),
        None => format!("vmlinux {}", mb(file_len)),
    };
    format!(
        "{name}: Linux kernel: {source} -> kernel image {} ({segments} segments, 64-bit entry {entry:#x})",
        mb(p.image.len())
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keel::loader::linux::KernelImage;

    /// A minimal ELF64 vmlinux: one PT_LOAD of `text` linked at 0xffffffff81000000, loaded at
    /// physical 0x1000000, entry at its start.
    pub(crate) fn vmlinux(text: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes());
        e[18..20].copy_from_slice(&62u16.to_le_bytes());
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(text.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(text.len() as u64 + 0x1000).to_le_bytes());
        e.extend_from_slice(text);
        e
    }

    pub(crate) fn with_size(mut stream: Vec<u8>, size: usize) -> Vec<u8> {
        stream.extend_from_slice(&(size as u32).to_le_bytes());
        stream
    }

    /// The legacy LZ4 frame as `lz4 -l` writes it, from blocks compressed by lz4_flex.
    pub(crate) fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = 0x184c_2102u32.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        // Header with FNAME set, as `gzip` writes for a named file.
        let mut out = vec![0x1f, 0x8b, 8, 1 << 3, 0, 0, 0, 0, 0, 3];
        out.extend_from_slice(b"vmlinux.bin\0");
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 9));
        out.extend_from_slice(&[0; 8]); // CRC32 and ISIZE (not checked by the inflater)
        out
    }

    pub(crate) fn text() -> Vec<u8> {
        (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 & 0x3f)
            .collect()
    }

    #[test]
    fn lz4_and_gzip_payloads_decompress_to_the_kernel() {
        let elf = vmlinux(&text());
        // Blocks of 64 KiB: several blocks, like a real kernel's 8 MiB ones.
        for (want, payload) in [
            (
                Compression::Lz4Legacy,
                with_size(lz4_legacy(&elf, 64 << 10), elf.len()),
            ),
            (Compression::Gzip, with_size(gzip(&elf), elf.len())),
        ] {
            let (kind, out) = decompress(&payload).unwrap();
            assert_eq!(kind, want);
            assert!(out == elf, "{want:?} round trip");
        }
    }

    #[test]
    fn wrong_size_field_and_bad_streams_are_refused() {
        let elf = vmlinux(&text());
        let e = decompress(&with_size(lz4_legacy(&elf, 1 << 20), elf.len() + 1)).unwrap_err();
        assert!(e.to_string().contains("size field"), "{e}");
        let mut cut = lz4_legacy(&elf, 1 << 20);
        cut.truncate(cut.len() - 10);
        assert!(decompress(&with_size(cut, elf.len())).is_err());
        let e = decompress(&with_size(b"BZh91AY&SY".to_vec(), 10)).unwrap_err();
        assert!(e.to_string().contains("bzip2"), "{e}");
        assert!(decompress(b"garbage!")
            .unwrap_err()
            .to_string()
            .contains("unknown compression"));
    }

    /// A bzImage with the setup header a real one has (protocol 2.15, 64-bit entry,
    /// cmdline_size 2047, initrd_addr_max 0x7fffffff, init_size 0) and `elf` as its LZ4 payload.
    pub(crate) fn bzimage(elf: &[u8]) -> Vec<u8> {
        let payload = with_size(lz4_legacy(elf, 1 << 20), elf.len());
        let mut bz = vec![0u8; 2 * 512];
        bz[0x1f1] = 1;
        bz[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        bz[0x200] = 0xeb;
        bz[0x201] = 0x6a;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        bz[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        bz[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        bz[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.extend_from_slice(&payload);
        bz
    }

    #[test]
    fn bzimage_becomes_a_kernel_image() {
        let elf = vmlinux(&text());
        let bz = bzimage(&elf);
        let p = prepare(&bz).unwrap();
        assert_eq!(
            (p.compression, p.vmlinux_len, p.protocol),
            (Compression::Lz4Legacy, elf.len(), Some(0x020f))
        );
        let k = KernelImage::parse(&p.image).unwrap();
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.setup, &bz[0x1f1..0x26c]);
        assert_eq!(k.segments.len(), 1);
        assert_eq!(
            (k.segments[0].paddr, k.segments[0].data),
            (0x100_0000, &text()[..])
        );
        // A bare vmlinux is accepted too, with no setup header.
        let k2 = prepare(&elf).unwrap();
        assert_eq!(KernelImage::parse(&k2.image).unwrap().setup.len(), 0);
        assert!(prepare(b"MZ not a kernel").is_err());
    }
}
