//! The bulk disk's layout: how one piece of a snapshot or migration stream travels between Keel
//! and the host through a disk (`crate::ata` on the machine; a plain file on the host, which the
//! emulator attaches as the disk). docs/SNAPSHOTS.md, "The bulk disk", is the user's view.
//!
//! ```text
//! LBA 0   header: "KEELBULK", layout version (u16), stream offset (u64), length (u32), CRC-32 (u32)
//! LBA 1.. the piece's bytes, the last sector padded with zeros
//! ```
//!
//! The disk holds one piece at a time; the control channel says when a piece is there (Keel's
//! reply to `migrate-read OFFSET disk`, the host's `migrate-data-disk LEN CRC32`), and each side
//! checks the header and the CRC-32 before it takes the bytes.

use crate::ata::{Ata, AtaBus, AtaError, SECTOR};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub const MAGIC: [u8; 8] = *b"KEELBULK";
pub const VERSION: u16 = 1;
/// The header's bytes (the rest of sector 0 is zero).
pub const HEADER_LEN: usize = 8 + 2 + 8 + 4 + 4;
/// The largest piece Keel moves per command: bounded so that a command keeps the run loop (and
/// the other guests) waiting for no more than one such transfer.
pub const PIECE_MAX: usize = 1 << 20;

/// A disk as the bulk transport uses it.
pub trait Disk {
    fn sectors(&self) -> u64;
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError>;
    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), AtaError>;
    fn flush(&mut self) -> Result<(), AtaError>;
}

impl<B: AtaBus> Disk for Ata<B> {
    fn sectors(&self) -> u64 {
        Ata::sectors(self)
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
        Ata::read(self, lba, buf)
    }
    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), AtaError> {
        Ata::write(self, lba, data)
    }
    fn flush(&mut self) -> Result<(), AtaError> {
        Ata::flush(self)
    }
}

/// What sector 0 says of the piece behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Where the piece begins in its stream.
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Header {
    pub fn to_sector(self) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[..8].copy_from_slice(&MAGIC);
        s[8..10].copy_from_slice(&VERSION.to_le_bytes());
        s[10..18].copy_from_slice(&self.offset.to_le_bytes());
        s[18..22].copy_from_slice(&self.len.to_le_bytes());
        s[22..26].copy_from_slice(&self.crc.to_le_bytes());
        s
    }

    pub fn from_sector(s: &[u8]) -> Result<Self, BulkError> {
        if s.len() < HEADER_LEN || s[..8] != MAGIC {
            return Err(BulkError::NoHeader);
        }
        let version = u16::from_le_bytes([s[8], s[9]]);
        if version != VERSION {
            return Err(BulkError::Version(version));
        }
        let u32_at = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&s[10..18]);
        Ok(Self {
            offset: u64::from_le_bytes(offset),
            len: u32_at(18),
            crc: u32_at(22),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkError {
    /// Keel has no bulk disk.
    NoDisk,
    Disk(AtaError),
    /// Sector 0 holds no piece.
    NoHeader,
    Version(u16),
    /// A piece larger than [`PIECE_MAX`] or than the disk holds.
    TooLarge {
        len: usize,
        max: usize,
    },
    /// The header describes another piece than the control channel announced.
    Mismatch {
        header: Header,
        len: u32,
        crc: u32,
    },
    /// The bytes on the disk do not give the CRC-32 announced.
    Checksum {
        stored: u32,
        computed: u32,
    },
}

impl From<AtaError> for BulkError {
    fn from(e: AtaError) -> Self {
        Self::Disk(e)
    }
}

impl fmt::Display for BulkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDisk => write!(f, "this Keel has no bulk disk (cargo keel run --bulk FILE)"),
            Self::Disk(e) => write!(f, "bulk disk: {e}"),
            Self::NoHeader => write!(f, "bulk disk: no piece of a stream on it (bad magic)"),
            Self::Version(v) => write!(f, "bulk disk: layout version {v}; this Keel reads {VERSION}"),
            Self::TooLarge { len, max } => {
                write!(f, "bulk disk: a piece of {len} bytes; at most {max} fit")
            }
            Self::Mismatch { header, len, crc } => write!(
                f,
                "bulk disk: it holds {} bytes with CRC-32 {:#010x}, not the {len} bytes with {crc:#010x} announced",
                header.len, header.crc
            ),
            Self::Checksum { stored, computed } => write!(
                f,
                "bulk disk: checksum mismatch: the piece says {stored:#010x}, its bytes give {computed:#010x}"
            ),
        }
    }
}

/// The largest piece `disk` holds (at most [`PIECE_MAX`]).
pub fn capacity(disk: &dyn Disk) -> usize {
    let room = disk
        .sectors()
        .saturating_sub(1)
        .saturating_mul(SECTOR as u64);
    usize::try_from(room).unwrap_or(usize::MAX).min(PIECE_MAX)
}

/// Puts `data`, the stream's bytes from `offset`, on the disk: the bytes first, then the header,
/// then FLUSH CACHE, so that a header on the medium always describes bytes that are there.
/// Returns their CRC-32.
pub fn put(disk: &mut dyn Disk, offset: u64, data: &[u8]) -> Result<u32, BulkError> {
    let max = capacity(disk);
    if data.len() > max {
        return Err(BulkError::TooLarge {
            len: data.len(),
            max,
        });
    }
    let whole = data.len() / SECTOR * SECTOR;
    disk.write(1, &data[..whole])?;
    if whole < data.len() {
        let mut last = [0u8; SECTOR];
        last[..data.len() - whole].copy_from_slice(&data[whole..]);
        disk.write(1 + (whole / SECTOR) as u64, &last)?;
    }
    let crc = crate::snapshot::crc32(data);
    let header = Header {
        offset,
        len: data.len() as u32,
        crc,
    };
    disk.write(0, &header.to_sector())?;
    disk.flush()?;
    Ok(crc)
}

/// Takes the piece the host put on the disk, which it announced as `len` bytes with CRC-32 `crc`:
/// the header must say so and the bytes must check.
pub fn take(disk: &mut dyn Disk, len: u32, crc: u32) -> Result<(Header, Vec<u8>), BulkError> {
    let max = capacity(disk);
    if len as usize > max {
        return Err(BulkError::TooLarge {
            len: len as usize,
            max,
        });
    }
    let mut sector = [0u8; SECTOR];
    disk.read(0, &mut sector)?;
    let header = Header::from_sector(&sector)?;
    if (header.len, header.crc) != (len, crc) {
        return Err(BulkError::Mismatch { header, len, crc });
    }
    let mut data = vec![0u8; (len as usize).div_ceil(SECTOR) * SECTOR];
    disk.read(1, &mut data)?;
    data.truncate(len as usize);
    let computed = crate::snapshot::crc32(&data);
    if computed != crc {
        return Err(BulkError::Checksum {
            stored: crc,
            computed,
        });
    }
    Ok((header, data))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A disk in memory.
    pub(crate) struct MemDisk(pub Vec<u8>);

    impl Disk for MemDisk {
        fn sectors(&self) -> u64 {
            (self.0.len() / SECTOR) as u64
        }
        fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), AtaError> {
            let at = lba as usize * SECTOR;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
        fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), AtaError> {
            let at = lba as usize * SECTOR;
            self.0[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), AtaError> {
            Ok(())
        }
    }

    #[test]
    fn a_piece_goes_through_the_disk_whole_and_checked() {
        let mut d = MemDisk(vec![0; 64 * SECTOR]);
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
        let crc = put(&mut d, 777, &data).unwrap();
        assert_eq!(crc, crate::snapshot::crc32(&data));
        let (h, back) = take(&mut d, 5000, crc).unwrap();
        assert_eq!(back, data);
        assert_eq!(h.offset, 777);
        // The padding of the last sector is zero.
        assert!(d.0[SECTOR + 5000..SECTOR * 11].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_damaged_or_another_piece_is_refused() {
        let mut d = MemDisk(vec![0; 64 * SECTOR]);
        assert_eq!(take(&mut d, 10, 0).unwrap_err(), BulkError::NoHeader);
        let crc = put(&mut d, 0, &[7u8; 3000]).unwrap();
        assert!(matches!(
            take(&mut d, 2999, crc).unwrap_err(),
            BulkError::Mismatch { .. }
        ));
        d.0[SECTOR + 100] ^= 1;
        assert!(matches!(
            take(&mut d, 3000, crc).unwrap_err(),
            BulkError::Checksum { .. }
        ));
    }

    #[test]
    fn a_piece_larger_than_the_disk_is_refused_before_it_is_written() {
        let mut d = MemDisk(vec![0; 4 * SECTOR]);
        assert_eq!(capacity(&d), 3 * SECTOR);
        assert_eq!(
            put(&mut d, 0, &[1u8; 3 * SECTOR + 1]).unwrap_err(),
            BulkError::TooLarge {
                len: 3 * SECTOR + 1,
                max: 3 * SECTOR
            }
        );
        assert!(d.0.iter().all(|&b| b == 0));
    }
}
