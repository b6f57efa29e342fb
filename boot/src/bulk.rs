//! The host's side of Keel's bulk disk (docs/SNAPSHOTS.md, "The bulk disk"): the raw file the
//! emulator attaches as the disk, written and read in the layout of `keel::bulk` (a header
//! sector, then one piece of a stream). The control channel says when a piece is there; each
//! piece is checked against the length and CRC-32 Keel announced and against its header.

use crate::control::{self, field, Transfer};
use crate::migrate::Channel;
use anyhow::{bail, ensure, Context, Result};
use keel::bulk::{Header, PIECE_MAX};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

const SECTOR: u64 = 512;

/// The largest piece the bulk file at `path` holds.
pub fn capacity(path: &Path) -> Result<usize> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("bulk disk {}", path.display()))?
        .len();
    ensure!(
        len >= 2 * SECTOR,
        "bulk disk {} is too small ({len} bytes)",
        path.display()
    );
    Ok(usize::try_from(len - SECTOR)?.min(PIECE_MAX))
}

/// Reads the piece Keel put on the disk at `path`, which it announced as `len` bytes from stream
/// offset `offset` with CRC-32 `crc`.
pub fn read_piece(path: &Path, offset: u64, len: u64, crc: u32) -> Result<Vec<u8>> {
    let mut f = File::open(path).with_context(|| format!("bulk disk {}", path.display()))?;
    let mut sector = [0u8; SECTOR as usize];
    f.read_exact(&mut sector)
        .with_context(|| format!("bulk disk {}: no header", path.display()))?;
    let h = Header::from_sector(&sector).map_err(|e| anyhow::anyhow!("{e}"))?;
    if (h.offset, u64::from(h.len), h.crc) != (offset, len, crc) {
        bail!(
            "bulk disk {}: it holds {} bytes from {} with CRC-32 {:#010x}; Keel announced {len} from {offset} with {crc:#010x}",
            path.display(),
            h.len,
            h.offset,
            h.crc
        );
    }
    let mut data = vec![0u8; usize::try_from(len)?];
    f.read_exact(&mut data)
        .with_context(|| format!("bulk disk {}: the piece is cut off", path.display()))?;
    let computed = keel::snapshot::crc32(&data);
    ensure!(
        computed == crc,
        "bulk disk {}: the piece gives CRC-32 {computed:#010x}, Keel announced {crc:#010x}",
        path.display()
    );
    Ok(data)
}

/// Puts `data` (the stream from `offset`) on the disk at `path` for Keel to take: the bytes,
/// then the header, written through to the file. Returns the CRC-32 to announce.
pub fn write_piece(path: &Path, offset: u64, data: &[u8]) -> Result<u32> {
    ensure!(
        data.len() <= capacity(path)?,
        "a piece of {} bytes does not fit the bulk disk {}",
        data.len(),
        path.display()
    );
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("bulk disk {}", path.display()))?;
    let crc = keel::snapshot::crc32(data);
    let header = Header {
        offset,
        len: u32::try_from(data.len())?,
        crc,
    };
    f.seek(SeekFrom::Start(SECTOR))?;
    f.write_all(data)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&header.to_sector())?;
    f.sync_data()
        .with_context(|| format!("bulk disk {}", path.display()))?;
    Ok(crc)
}

/// One Keel's control channel and bulk disk.
pub struct Keel<'a> {
    pub channel: &'a mut dyn Channel,
    pub bulk: &'a Path,
}

/// `migrate-read OFFSET disk`: the next piece of the stream Keel is sending, from its disk; the
/// reply (its `end`, `round`, `sent` fields) and the bytes.
pub fn read(k: &mut Keel<'_>, offset: u64) -> Result<(String, Vec<u8>)> {
    let reply = k.channel.ask(&format!("migrate-read {offset} disk"))?;
    let len = num(&reply, "len")?;
    let crc = u32::try_from(num(&reply, "crc32")?)?;
    ensure!(
        num(&reply, "offset")? == offset,
        "a piece for another offset: {reply}"
    );
    let data = read_piece(k.bulk, offset, len, crc)?;
    Ok((reply, data))
}

/// Gives Keel the stream's bytes from `offset` through its disk (`migrate-data-disk`), in pieces
/// it holds; Keel's count must come to `offset` + `data`.
pub fn write(k: &mut Keel<'_>, offset: u64, data: &[u8]) -> Result<()> {
    let piece = capacity(k.bulk)?;
    let mut at = offset;
    for part in data.chunks(piece) {
        let crc = write_piece(k.bulk, at, part)?;
        let reply = k
            .channel
            .ask(&format!("migrate-data-disk {} {crc}", part.len()))?;
        if let Err(e) = control::describe(&reply) {
            bail!("Keel refused the stream: {e}");
        }
        at += part.len() as u64;
        let got = num(&reply, "received")?;
        ensure!(
            got == at,
            "Keel has {got} bytes of the stream, {at} were sent"
        );
    }
    Ok(())
}

/// `cargo keel ctl snapshot NAME [paused] --out FILE --bulk DISK`: the snapshot streamed from
/// the guest's RAM through the disk into `out`, checked whole (its end CRC-32) before it is
/// kept. The guest is paused while it is read out; it runs on after unless `paused`.
pub fn fetch_snapshot(k: &mut Keel<'_>, name: &str, paused: bool, out: &Path) -> Result<Transfer> {
    let start = Instant::now();
    let suffix = if paused { " paused" } else { "" };
    let begun = k
        .channel
        .ask(&format!("migrate-out {name} snapshot{suffix}"))?;
    if let Err(e) = control::describe(&begun) {
        bail!("Keel refused the snapshot: {e}");
    }
    let mut stream = Vec::new();
    let read_all = (|| -> Result<()> {
        loop {
            let (reply, data) = read(k, stream.len() as u64)?;
            stream.extend_from_slice(&data);
            if num(&reply, "end")? == 1 {
                return Ok(());
            }
            ensure!(!data.is_empty(), "Keel sent an empty piece before the end");
        }
    })();
    if let Err(e) = read_all {
        let _ = k.channel.ask("migrate-abort");
        return Err(e.context("the snapshot was abandoned; the guest is as it was"));
    }
    let done = k.channel.ask("migrate-done")?;
    if let Err(e) = control::describe(&done) {
        bail!("Keel did not end the snapshot: {e}");
    }
    keel::snapshot::describe(&stream).map_err(|e| anyhow::anyhow!("the snapshot read out: {e}"))?;
    std::fs::write(out, &stream).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(Transfer {
        bytes: stream.len(),
        elapsed: start.elapsed(),
    })
}

/// `cargo keel ctl restore NAME FILE --bulk DISK`: the snapshot in `file` goes through the disk
/// twice: once to be checked whole by Keel against the guest and this CPU (`migrate-in NAME
/// check`: nothing changes), then, the guest killed, into its fresh RAM (`migrate-in NAME`);
/// `migrate-end` puts its state in place and starts it.
pub fn send_snapshot(k: &mut Keel<'_>, name: &str, file: &Path) -> Result<Transfer> {
    let start = Instant::now();
    let stream = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    keel::snapshot::describe(&stream).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for (begin, what) in [("check", "checking"), ("", "restoring")] {
        if begin.is_empty() {
            // Checked: the guest makes way (a stopped one refuses the kill, which is fine).
            let _ = k.channel.ask(&format!("kill {name}"))?;
        }
        let begun = k
            .channel
            .ask(format!("migrate-in {name} {begin}").trim_end())?;
        if let Err(e) = control::describe(&begun) {
            bail!("Keel refused {what} the snapshot: {e}");
        }
        if let Err(e) = write(k, 0, &stream) {
            let _ = k.channel.ask("migrate-abort");
            return Err(e.context(format!("{what} the snapshot failed")));
        }
        let end = k.channel.ask("migrate-end")?;
        if let Err(e) = control::describe(&end) {
            bail!("{what} the snapshot failed: {e}");
        }
    }
    Ok(Transfer {
        bytes: stream.len(),
        elapsed: start.elapsed(),
    })
}

fn num(reply: &str, key: &str) -> Result<u64> {
    field(reply, key)?
        .parse()
        .with_context(|| format!("Keel's {key} is not a number: {reply}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_written_by_the_host_reads_back_and_a_wrong_announcement_is_refused() -> Result<()> {
        let path = std::env::temp_dir().join(format!("keel-bulk-piece-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 16 * 512])?;
        assert_eq!(capacity(&path)?, 15 * 512);
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 7) as u8).collect();
        let crc = write_piece(&path, 42, &data)?;
        assert_eq!(read_piece(&path, 42, 3000, crc)?, data);
        assert!(read_piece(&path, 43, 3000, crc).is_err());
        assert!(read_piece(&path, 42, 3000, crc ^ 1).is_err());
        assert!(write_piece(&path, 0, &vec![0u8; 15 * 512 + 1]).is_err());
        std::fs::remove_file(&path)?;
        Ok(())
    }
}
