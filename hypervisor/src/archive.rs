//! The ramdisk archive: how guest images reach Keel.
//!
//! The `boot` tool packs one archive and hands it to the bootloader as the ramdisk; Keel finds it
//! through the machine description. The format is deliberately tiny so that it can be read without
//! allocation and written by any tool:
//!
//! ```text
//! offset  size  field
//! 0       8     magic  "KEELARC1"
//! 8       4     entry count N (little endian)
//! 12      4     reserved, 0
//! 16      64*N  entries: name (48 bytes, UTF-8, NUL padded), offset (u64 LE), length (u64 LE)
//! ...           file data; each offset is from the start of the archive and 16-byte aligned
//! ```
//!
//! One entry is named `manifest`: the text that says which guests to run (see [`crate::manifest`]).
//! Names are unique: [`build`] and [`Archive::parse`] refuse an archive with two entries of one
//! name (a guest image named `manifest` once made Keel boot the manifest text as the guest).

use core::fmt;

pub const MAGIC: &[u8; 8] = b"KEELARC1";
pub const HEADER_LEN: usize = 16;
pub const ENTRY_LEN: usize = 64;
pub const NAME_LEN: usize = 48;
/// The entry that holds the manifest text.
pub const MANIFEST_NAME: &str = "manifest";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveError {
    TooShort,
    BadMagic,
    EntryTableOutOfBounds,
    BadName {
        index: usize,
    },
    DataOutOfBounds {
        index: usize,
    },
    /// Entry `index` has the name of an earlier one (lookups would only ever see the first).
    DuplicateName {
        index: usize,
    },
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => write!(f, "ramdisk is shorter than the archive header"),
            Self::BadMagic => write!(f, "ramdisk does not start with the KEELARC1 magic"),
            Self::EntryTableOutOfBounds => write!(f, "archive entry table runs past the end"),
            Self::BadName { index } => {
                write!(f, "archive entry {index} has a name that is not UTF-8")
            }
            Self::DataOutOfBounds { index } => {
                write!(f, "archive entry {index} points past the end")
            }
            Self::DuplicateName { index } => {
                write!(f, "archive entry {index} has the name of an earlier entry")
            }
        }
    }
}

/// A validated view of an archive in memory.
#[derive(Clone, Copy)]
pub struct Archive<'a> {
    bytes: &'a [u8],
    count: usize,
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl<'a> Archive<'a> {
    /// Checks the header and every entry, so later lookups cannot fail on bounds.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ArchiveError> {
        if bytes.len() < HEADER_LEN {
            return Err(ArchiveError::TooShort);
        }
        if &bytes[..8] != MAGIC {
            return Err(ArchiveError::BadMagic);
        }
        let count = le_u32(&bytes[8..12]) as usize;
        let table_end = count
            .checked_mul(ENTRY_LEN)
            .and_then(|t| t.checked_add(HEADER_LEN))
            .ok_or(ArchiveError::EntryTableOutOfBounds)?;
        if table_end > bytes.len() {
            return Err(ArchiveError::EntryTableOutOfBounds);
        }
        let archive = Self { bytes, count };
        for index in 0..count {
            let raw = archive.raw_entry(index);
            let name = trim_nul(&raw[..NAME_LEN]);
            core::str::from_utf8(name).map_err(|_| ArchiveError::BadName { index })?;
            if (0..index).any(|earlier| trim_nul(&archive.raw_entry(earlier)[..NAME_LEN]) == name) {
                return Err(ArchiveError::DuplicateName { index });
            }
            let off = le_u64(&raw[NAME_LEN..]);
            let len = le_u64(&raw[NAME_LEN + 8..]);
            let end = off
                .checked_add(len)
                .ok_or(ArchiveError::DataOutOfBounds { index })?;
            if end > bytes.len() as u64 {
                return Err(ArchiveError::DataOutOfBounds { index });
            }
        }
        Ok(archive)
    }

    fn raw_entry(&self, index: usize) -> &'a [u8] {
        let start = HEADER_LEN + index * ENTRY_LEN;
        &self.bytes[start..start + ENTRY_LEN]
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries in archive order as (name, data).
    pub fn entries(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        (0..self.count).map(|i| {
            let raw = self.raw_entry(i);
            // Validated in `parse`.
            let name = core::str::from_utf8(trim_nul(&raw[..NAME_LEN])).unwrap_or("");
            let off = le_u64(&raw[NAME_LEN..]) as usize;
            let len = le_u64(&raw[NAME_LEN + 8..]) as usize;
            (name, &self.bytes[off..off + len])
        })
    }

    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.entries().find(|(n, _)| *n == name).map(|(_, d)| d)
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// Builds an archive (used by the host-side `boot` tool and by tests).
pub fn build(files: &[(&str, &[u8])]) -> Result<alloc::vec::Vec<u8>, &'static str> {
    use alloc::vec::Vec;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(files.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut data_off = align16(HEADER_LEN + files.len() * ENTRY_LEN);
    for (i, (name, data)) in files.iter().enumerate() {
        if name.len() >= NAME_LEN || name.is_empty() || name.contains('\0') {
            return Err("archive entry names must be 1..47 bytes without NUL");
        }
        if files[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err("two archive entries have the same name");
        }
        let mut n = [0u8; NAME_LEN];
        n[..name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&n);
        out.extend_from_slice(&(data_off as u64).to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        data_off = align16(data_off + data.len());
    }
    for (_, data) in files {
        out.resize(align16(out.len()), 0);
        out.extend_from_slice(data);
    }
    Ok(out)
}

fn align16(x: usize) -> usize {
    (x + 15) & !15
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = build(&[("manifest", b"guest x\n"), ("x.bin", &[1, 2, 3])]).unwrap();
        let ar = Archive::parse(&a).unwrap();
        assert_eq!(ar.len(), 2);
        assert_eq!(ar.get("manifest").unwrap(), b"guest x\n");
        assert_eq!(ar.get("x.bin").unwrap(), &[1, 2, 3]);
        assert!(ar.get("nope").is_none());
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Archive::parse(b"short").err(), Some(ArchiveError::TooShort));
        assert_eq!(
            Archive::parse(&[0u8; 32]).err(),
            Some(ArchiveError::BadMagic)
        );
        let mut a = build(&[("f", &[9; 40])]).unwrap();
        // Point the entry's data past the end.
        let len_at = HEADER_LEN + NAME_LEN + 8;
        a[len_at..len_at + 8].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(
            Archive::parse(&a).err(),
            Some(ArchiveError::DataOutOfBounds { index: 0 })
        );
        let mut b = build(&[]).unwrap();
        b[8] = 200;
        assert_eq!(
            Archive::parse(&b).err(),
            Some(ArchiveError::EntryTableOutOfBounds)
        );
    }

    /// Two entries of one name: `get` would return the first, so an image named `manifest`
    /// made Keel boot the manifest text. Both the writer and the reader refuse it.
    #[test]
    fn rejects_duplicate_names() {
        assert_eq!(
            build(&[("manifest", b"m"), ("x", b"1"), ("manifest", b"guest")]),
            Err("two archive entries have the same name")
        );
        let mut a = build(&[("manifest", b"m"), ("x", b"1"), ("manifesx", b"guest")]).unwrap();
        a[HEADER_LEN + 2 * ENTRY_LEN + 7] = b't';
        assert_eq!(
            Archive::parse(&a).err(),
            Some(ArchiveError::DuplicateName { index: 2 })
        );
        assert_eq!(
            alloc::format!("{}", ArchiveError::DuplicateName { index: 2 }),
            "archive entry 2 has the name of an earlier entry"
        );
    }

    #[test]
    fn rejects_bad_names() {
        let bad = Err("archive entry names must be 1..47 bytes without NUL");
        assert_eq!(build(&[("", b"")]), bad);
        assert_eq!(build(&[(&"n".repeat(48), b"")]), bad);
        assert_eq!(build(&[("a\0b", b"")]), bad);
        assert!(build(&[(&"n".repeat(47), b"")]).is_ok_and(|a| Archive::parse(&a).is_ok()));
    }
}
