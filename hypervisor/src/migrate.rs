//! Live migration's stream, on both sides, without the hardware: [`Sender`] makes the snapshot
//! stream of a running guest in pre-copy rounds, page sections straight from its RAM as the
//! reader asks for them; [`Receiver`] takes such a stream apart as it arrives, writes each page
//! (CRC-checked) into the target guest's RAM and keeps the guest's state until the stream's end
//! checksum checks. The run loop drives them (`runloop::migrate`); docs/SNAPSHOTS.md, "Live
//! migration", describes the protocol for users.
//!
//! The stream is the snapshot format (`snapshot`): the head, then round 0 (every page that is
//! not zero) and further rounds (the pages written since the previous round began; a page that
//! became zero is a zero-page record), all as PAGE sections; then, once the guest is paused, the
//! last round, the guest section again (its clock at the pause), the platform, the vCPUs and the
//! end mark. Neither side holds more of it than one chunk and one section.

use crate::snapshot::{self, Fingerprint, GuestInfo, SnapshotError, PAGE_SIZE};
use crate::state::{StateError, Writer};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// A set of a guest's pages (by number: guest-physical address / 4 KiB), one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    bits: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// No page of a guest of `pages` pages.
    pub fn empty(pages: u64) -> Self {
        Self {
            bits: alloc::vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Every page.
    pub fn full(pages: u64) -> Self {
        let mut s = Self::empty(pages);
        (0..pages).for_each(|n| s.insert(n));
        s
    }

    /// Adds page `n`; a page past the guest's end is ignored.
    pub fn insert(&mut self, n: u64) {
        if n < self.pages {
            self.bits[(n / 64) as usize] |= 1 << (n % 64);
        }
    }

    pub fn contains(&self, n: u64) -> bool {
        n < self.pages && self.bits[(n / 64) as usize] & (1 << (n % 64)) != 0
    }

    fn remove(&mut self, n: u64) {
        if n < self.pages {
            self.bits[(n / 64) as usize] &= !(1 << (n % 64));
        }
    }

    pub fn len(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The first page in the set from `n` on.
    fn next_from(&self, n: u64) -> Option<u64> {
        let mut at = n;
        while at < self.pages {
            let word = self.bits[(at / 64) as usize] >> (at % 64);
            if word != 0 {
                return Some(at + u64::from(word.trailing_zeros()));
            }
            at = (at / 64 + 1) * 64;
        }
        None
    }

    /// Adds every page of `other`.
    fn union(&mut self, other: &PageSet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
}

/// The sending guest's RAM.
pub trait Source {
    /// Page `n` (guest-physical `n * 4096`) into `buf`; a page the guest does not have (given
    /// back by its balloon) reads as zeros.
    fn read_page(&mut self, n: u64, buf: &mut [u8; PAGE_SIZE]);
}

/// The target guest's RAM, zeroed before the first page comes.
pub trait Sink {
    /// Writes page `n`; `None` is a page that is all zero.
    fn write_page(&mut self, n: u64, data: Option<&[u8]>);
}

/// Why a migration step was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateError {
    /// A read at an offset the sender no longer (or not yet) has.
    Offset { asked: u64, from: u64, to: u64 },
    /// `next` or `final` after the final step began.
    Finishing,
    /// `done` before the reader took the stream to its end mark.
    NotRead { sent: u64 },
    /// More stream after the end mark.
    AfterEnd,
    /// A section larger than any the format has: a damaged length.
    SectionTooLarge { tag: [u8; 4], len: u32 },
    /// A section where another was due.
    Unexpected { tag: [u8; 4], after: &'static str },
    /// The stream's own refusal (checksums, CPU, sizes, layouts).
    Stream(SnapshotError),
}

impl From<SnapshotError> for MigrateError {
    fn from(e: SnapshotError) -> Self {
        Self::Stream(e)
    }
}

impl From<StateError> for MigrateError {
    fn from(e: StateError) -> Self {
        Self::Stream(e.into())
    }
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Offset { asked, from, to } => write!(
                f,
                "no stream at offset {asked}: the sender has bytes {from} to {to}"
            ),
            Self::Finishing => write!(f, "the final step has begun: no more rounds"),
            Self::NotRead { sent } => write!(
                f,
                "the stream has not been read to its end ({sent} bytes so far)"
            ),
            Self::AfterEnd => write!(f, "bytes after the stream's end mark"),
            Self::SectionTooLarge { tag, len } => write!(
                f,
                "a `{}` section of {len} bytes (damaged: none is that large)",
                String::from_utf8_lossy(tag)
            ),
            Self::Unexpected { tag, after } => {
                write!(f, "a `{}` section {after}", String::from_utf8_lossy(tag))
            }
            Self::Stream(e) => write!(f, "{e}"),
        }
    }
}

/// What one round sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Page records (data and zero pages).
    pub pages: u64,
    /// Bytes of the stream made in the round (for the last one, with the state and end mark).
    pub bytes: u64,
}

/// The sending side of a migration: the stream of one guest, made as it is read.
pub struct Sender {
    /// The pages still to go in this round, and where the round has got to.
    todo: PageSet,
    cursor: u64,
    /// Pages sent at least once (a page sent again is "resent").
    sent: PageSet,
    resent: u64,
    /// Made and not yet acknowledged: `buf[0]` is the stream's byte `base`.
    buf: Vec<u8>,
    base: u64,
    /// CRC-32 of every byte made so far.
    crc: u32,
    /// The guest's state (GUES again, PLAT, VCPUs), which follows the last round's pages.
    tail: Option<Vec<u8>>,
    ended: bool,
    rounds: Vec<Round>,
}

impl Sender {
    /// The stream of a guest of `guest.memory` bytes: its head, then round 0 (every page that
    /// is not zero). The caller has cleared the guest's dirty flags before the first read.
    pub fn new(keel_version: &str, fingerprint: &Fingerprint, guest: &GuestInfo) -> Self {
        let pages = guest.memory / PAGE_SIZE as u64;
        let mut w = Writer::new();
        snapshot::write_head(&mut w, keel_version, fingerprint, guest);
        let mut s = Self {
            todo: PageSet::full(pages),
            cursor: 0,
            sent: PageSet::empty(pages),
            resent: 0,
            buf: Vec::new(),
            base: 0,
            crc: 0,
            tail: None,
            ended: false,
            rounds: alloc::vec![Round::default()],
        };
        s.push(w.bytes());
        s
    }

    /// The stream of a paused guest in one go, its snapshot: the head, every page that is not
    /// zero, then `state` (as for [`Sender::finish`]) and the end mark. No rounds follow: it is
    /// a snapshot stream made from the guest's RAM as it is read, never held whole.
    pub fn snapshot(
        keel_version: &str,
        fingerprint: &Fingerprint,
        guest: &GuestInfo,
        state: Vec<u8>,
    ) -> Self {
        let mut s = Self::new(keel_version, fingerprint, guest);
        s.tail = Some(state);
        s
    }

    /// The round being sent (0 first).
    pub fn round(&self) -> u32 {
        self.rounds.len() as u32 - 1
    }

    /// Every round so far.
    pub fn rounds(&self) -> &[Round] {
        &self.rounds
    }

    /// Page records that repeated a page sent in an earlier round.
    pub fn resent(&self) -> u64 {
        self.resent
    }

    /// Pages of this round not yet made into the stream.
    pub fn left(&self) -> u64 {
        self.todo.len()
    }

    /// The stream's length so far.
    pub fn made(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Whether the end mark is made and `read` handed it out.
    pub fn ended(&self) -> bool {
        self.ended && self.buf.is_empty()
    }

    /// Whether the final step began.
    pub fn finishing(&self) -> bool {
        self.tail.is_some() || self.ended
    }

    /// Up to `len` bytes of the stream from `offset`, which is where the previous read began
    /// (asked again: its reply was lost) or where it ended (the previous bytes arrived and are
    /// dropped). Empty when this round is all read (or the stream ended): the caller starts the
    /// next round or the final step.
    pub fn read(
        &mut self,
        src: &mut dyn Source,
        offset: u64,
        len: usize,
    ) -> Result<&[u8], MigrateError> {
        if offset < self.base || offset > self.made() {
            return Err(MigrateError::Offset {
                asked: offset,
                from: self.base,
                to: self.made(),
            });
        }
        self.buf.drain(..(offset - self.base) as usize);
        self.base = offset;
        self.fill(src, len);
        Ok(&self.buf[..len.min(self.buf.len())])
    }

    /// Starts the next round: the pages in `dirty` (written since the previous round began) go
    /// again, with any of this round not read yet.
    pub fn next_round(&mut self, dirty: &PageSet) -> Result<u64, MigrateError> {
        if self.finishing() {
            return Err(MigrateError::Finishing);
        }
        self.todo.union(dirty);
        self.cursor = 0;
        self.rounds.push(Round::default());
        Ok(self.todo.len())
    }

    /// The final step, the guest paused: the last round (`dirty` and what is left of this one),
    /// then `state` (`snapshot::write_guest` with the clock at the pause, the platform, every
    /// vCPU) and the end mark.
    pub fn finish(&mut self, dirty: &PageSet, state: Vec<u8>) -> Result<u64, MigrateError> {
        let pages = self.next_round(dirty)?;
        self.tail = Some(state);
        Ok(pages)
    }

    fn push(&mut self, bytes: &[u8]) {
        self.crc = snapshot::crc32_update(self.crc, bytes);
        self.buf.extend_from_slice(bytes);
        if let Some(r) = self.rounds.last_mut() {
            r.bytes += bytes.len() as u64;
        }
    }

    /// Makes stream until `want` bytes wait, the round is all made or the stream ended.
    fn fill(&mut self, src: &mut dyn Source, want: usize) {
        let zero_skipped = self.round() == 0;
        while self.buf.len() < want && !self.ended {
            let mut batch: Vec<(u64, Option<[u8; PAGE_SIZE]>)> = Vec::new();
            while batch.len() < snapshot::PAGES_PER_SECTION {
                let Some(n) = self.todo.next_from(self.cursor) else {
                    break;
                };
                self.cursor = n + 1;
                self.todo.remove(n);
                let mut page = [0u8; PAGE_SIZE];
                src.read_page(n, &mut page);
                let zero = page.iter().all(|&b| b == 0);
                if zero && zero_skipped {
                    // The target's RAM starts zeroed.
                    continue;
                }
                if self.sent.contains(n) {
                    self.resent += 1;
                }
                self.sent.insert(n);
                batch.push((n, (!zero).then_some(page)));
            }
            if !batch.is_empty() {
                let records: Vec<(u64, Option<&[u8]>)> = batch
                    .iter()
                    .map(|(n, d)| (n * PAGE_SIZE as u64, d.as_ref().map(|d| &d[..])))
                    .collect();
                let mut w = Writer::new();
                snapshot::write_pages(&mut w, &records);
                self.push(w.bytes());
                if let Some(r) = self.rounds.last_mut() {
                    r.pages += batch.len() as u64;
                }
                continue;
            }
            // The round is all made: the state and the end follow the last one.
            let Some(tail) = self.tail.take() else {
                break;
            };
            self.push(&tail);
            let mut w = Writer::new();
            snapshot::write_end(&mut w, self.crc);
            self.push(w.bytes());
            self.ended = true;
        }
    }
}

/// The largest section a stream has: a PAGE section of 16 pages is 66 KiB, a vCPU a few KiB.
const SECTION_MAX: u32 = 256 * 1024;
/// A section's header: tag, version, length.
const SECTION_HEADER: usize = 10;

/// Where the receiver is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Magic and format version next.
    Start,
    /// HEAD next.
    Head,
    /// GUES next.
    Guest,
    /// PAGE sections, or the guest section again, or the platform.
    Pages,
    /// The platform came: vCPUs, then the end.
    State,
    Ended,
}

/// The receiving side: the stream as it arrives, in pieces of any size.
pub struct Receiver {
    /// The guest it is received into: its RAM size and vCPUs, the CPU it runs on.
    memory: u64,
    vcpus: u32,
    here: Fingerprint,
    stage: Stage,
    /// Bytes that came and do not make a whole section yet.
    pending: Vec<u8>,
    received: u64,
    /// CRC-32 of every byte taken so far (up to the end mark).
    crc: u32,
    /// Kept for the state at the end: magic and version, HEAD, the guest section (the last one
    /// that came), the platform and vCPUs.
    head: Vec<u8>,
    guest: Option<(GuestInfo, Vec<u8>)>,
    state: Vec<u8>,
    vcpus_seen: u32,
    pages: u64,
}

impl Receiver {
    /// A receiver for a guest of `memory` bytes and `vcpus` vCPUs on this CPU (`here`).
    pub fn new(memory: u64, vcpus: u32, here: Fingerprint) -> Self {
        Self {
            memory,
            vcpus,
            here,
            stage: Stage::Start,
            pending: Vec::new(),
            received: 0,
            crc: 0,
            head: Vec::new(),
            guest: None,
            state: Vec::new(),
            vcpus_seen: 0,
            pages: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Page records written so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether the end mark came and checked.
    pub fn ended(&self) -> bool {
        self.stage == Stage::Ended
    }

    /// Takes the next bytes of the stream: every whole page section in them is checked and
    /// written to `sink`. An error leaves the stream unusable (the caller abandons it).
    pub fn feed(&mut self, data: &[u8], sink: &mut dyn Sink) -> Result<(), MigrateError> {
        if self.stage == Stage::Ended && !data.is_empty() {
            return Err(MigrateError::AfterEnd);
        }
        self.received += data.len() as u64;
        self.pending.extend_from_slice(data);
        let mut pending = core::mem::take(&mut self.pending);
        let mut at = 0;
        let mut taken = Ok(());
        loop {
            match self.take(&pending[at..], sink) {
                Ok(Some(used)) => at += used,
                Ok(None) => break,
                Err(e) => {
                    taken = Err(e);
                    break;
                }
            }
            if self.stage == Stage::Ended && at < pending.len() {
                taken = Err(MigrateError::AfterEnd);
                break;
            }
        }
        pending.drain(..at);
        self.pending = pending;
        taken
    }

    /// Takes one unit (the magic and version, or a section) from the front of `bytes`: how many
    /// bytes it used, `None` if it is not all there yet.
    fn take(&mut self, bytes: &[u8], sink: &mut dyn Sink) -> Result<Option<usize>, MigrateError> {
        if self.stage == Stage::Ended {
            return Ok(None);
        }
        if self.stage == Stage::Start {
            let start = snapshot::MAGIC.len() + 2;
            if bytes.len() < start {
                return Ok(None);
            }
            if bytes[..snapshot::MAGIC.len()] != snapshot::MAGIC {
                return Err(SnapshotError::BadMagic.into());
            }
            let version = u16::from_le_bytes([bytes[8], bytes[9]]);
            if version != snapshot::FORMAT_VERSION {
                return Err(SnapshotError::Format {
                    found: version,
                    supported: snapshot::FORMAT_VERSION,
                }
                .into());
            }
            self.absorb(&bytes[..start]);
            self.head.extend_from_slice(&bytes[..start]);
            self.stage = Stage::Head;
            return Ok(Some(start));
        }
        if bytes.len() < SECTION_HEADER {
            return Ok(None);
        }
        let tag = [bytes[0], bytes[1], bytes[2], bytes[3]];
        let len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]);
        if len > SECTION_MAX {
            return Err(MigrateError::SectionTooLarge { tag, len });
        }
        let whole = SECTION_HEADER + len as usize;
        if bytes.len() < whole {
            return Ok(None);
        }
        self.section(tag, &bytes[..whole], sink)?;
        Ok(Some(whole))
    }

    fn absorb(&mut self, bytes: &[u8]) {
        self.crc = snapshot::crc32_update(self.crc, bytes);
    }

    /// One whole section.
    fn section(
        &mut self,
        tag: [u8; 4],
        section: &[u8],
        sink: &mut dyn Sink,
    ) -> Result<(), MigrateError> {
        let unexpected = |after| Err(MigrateError::Unexpected { tag, after });
        match (&tag, self.stage) {
            (b"END ", Stage::State) if self.vcpus_seen == self.vcpus => {
                let stored = crate::state::Reader::new(section)
                    .section(*b"END ", 1, |r, _| r.get::<u32>())?;
                if stored != self.crc {
                    return Err(SnapshotError::Checksum {
                        stored,
                        computed: self.crc,
                    }
                    .into());
                }
                self.stage = Stage::Ended;
                return Ok(());
            }
            (b"END ", _) => return Err(SnapshotError::NoEnd.into()),
            (b"HEAD", Stage::Head) => {
                snapshot::read_head(section, &self.here)?;
                self.head.extend_from_slice(section);
                self.stage = Stage::Guest;
            }
            (b"GUES", Stage::Guest) => {
                let guest = snapshot::read_guest(section)?;
                if guest.memory != self.memory {
                    return Err(SnapshotError::MemoryMismatch {
                        snapshot: guest.memory,
                        guest: self.memory,
                    }
                    .into());
                }
                if guest.vcpus != self.vcpus {
                    return Err(SnapshotError::VcpusMismatch {
                        snapshot: guest.vcpus,
                        guest: self.vcpus,
                    }
                    .into());
                }
                self.guest = Some((guest, section.to_vec()));
                self.stage = Stage::Pages;
            }
            (b"GUES", Stage::Pages) => {
                let again = snapshot::read_guest(section)?;
                let Some((first, _)) = &self.guest else {
                    return unexpected("before the first guest section");
                };
                snapshot::check_same_guest(first, &again)?;
                self.guest = Some((again, section.to_vec()));
            }
            (b"PAGE", Stage::Pages) => {
                for (gpa, data) in snapshot::read_pages(section, self.memory)? {
                    sink.write_page(gpa / PAGE_SIZE as u64, data);
                    self.pages += 1;
                }
            }
            (b"PLAT", Stage::Pages) => {
                self.state.extend_from_slice(section);
                self.stage = Stage::State;
            }
            (b"VCPU", Stage::State) if self.vcpus_seen < self.vcpus => {
                self.state.extend_from_slice(section);
                self.vcpus_seen += 1;
            }
            (_, Stage::Head) => return unexpected("where the header was due"),
            (_, Stage::Guest) => return unexpected("where the guest section was due"),
            (_, Stage::Pages) => return unexpected("among the pages"),
            _ => return unexpected("after the vCPUs"),
        }
        self.absorb(section);
        Ok(())
    }

    /// The stream's state as a snapshot with no pages (they are in the guest's RAM already), for
    /// the restore that starts the guest: only once the end mark came and checked.
    pub fn state(&self) -> Result<Vec<u8>, MigrateError> {
        let Some((_, guest)) = &self.guest else {
            return Err(SnapshotError::NoEnd.into());
        };
        if self.stage != Stage::Ended {
            return Err(SnapshotError::NoEnd.into());
        }
        let mut w = Writer::new();
        w.raw(&self.head);
        w.raw(guest);
        w.raw(&self.state);
        let crc = snapshot::crc32(w.bytes());
        snapshot::write_end(&mut w, crc);
        Ok(w.into_bytes())
    }
}

/// One step of the migration protocol (the control channel's `migrate-*` commands;
/// docs/SNAPSHOTS.md, "Live migration").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// On the sending Keel: start migrating guest `id` out (round 0 while it runs).
    Out { id: usize },
    /// The stream from `offset` (`migrate-read OFFSET`).
    Read { offset: u64 },
    /// The next round: the pages written since the last one began.
    Next,
    /// Pause the guest; the last round and its state follow.
    Final,
    /// On the sending Keel: the guest runs on the other one; stop it here for good. On the
    /// receiving one: nothing (it started at `End`).
    Done,
    /// Give up: the sending Keel resumes the guest; the receiving one releases its RAM.
    Abort,
    /// On the sending Keel: guest `id`'s snapshot as a stream (`Sender::snapshot`): paused now,
    /// read with `Read`/`ReadDisk`; `Done` (or `Abort`) resumes it if `resume`.
    Snapshot { id: usize, resume: bool },
    /// The stream from `offset` onto the bulk disk (`migrate-read OFFSET disk`): as much as one
    /// piece holds.
    ReadDisk { offset: u64 },
    /// On the receiving Keel: take the stream into guest `id` (not running).
    In { id: usize },
    /// On the receiving Keel: check a stream for guest `id` (running or not) whole, writing
    /// nothing: a restore checks the snapshot so before it replaces the guest.
    Check { id: usize },
    /// The next bytes of the stream from the bulk disk: `len` bytes with CRC-32 `crc`.
    DataDisk { len: u32, crc: u32 },
    /// The next bytes of the stream.
    Data(&'a [u8]),
    /// The stream is whole: apply the state and start the guest.
    End,
}

/// A step's answer: the message for people, numbers for the host tool, and stream bytes for a
/// read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub message: String,
    pub fields: Vec<(&'static str, u64)>,
    pub data: Option<Vec<u8>>,
}

/// Bytes of stream per `migrate-read` reply (4 KiB of base64 on the line).
pub const CHUNK: usize = 3072;

/// When the host stops the rounds: once a round has at most this many pages to send (the last
/// round then goes with the guest paused)...
pub const SMALL_ROUND: u64 = 8;
/// ... or after this many rounds, however many pages the guest keeps writing.
pub const MAX_ROUNDS: u32 = 6;

/// Whether the rounds should stop for the final step: after round `round` found `dirty` pages.
pub fn converged(round: u32, dirty: u64) -> bool {
    dirty <= SMALL_ROUND || round + 1 >= MAX_ROUNDS
}

#[cfg(test)]
mod tests;
