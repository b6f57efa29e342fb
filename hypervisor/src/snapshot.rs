//! The snapshot stream: a whole guest (its configuration, its RAM, its platform, every vCPU and
//! its clock) as one versioned, checksummed byte stream, written by [`write`] and taken apart,
//! checked whole, by [`parse`] before anything of a guest is replaced. docs/SNAPSHOTS.md describes
//! the format for users.
//!
//! ```text
//! "KEELSNAP"  format version (u16)
//! HEAD  Keel's version, the CPU fingerprint (the CPUID leaves the guest sees, the XSAVE layout)
//! GUES  name, kind, memory size, vCPUs, guest TSC rate, the guest's clock when it stopped
//! PAGE  (any number) pages: guest-physical address, CRC-32, 4096 bytes (or "zero page")
//! PLAT  the platform (`devices::Platform::save`: interrupt fabric, local APICs, devices)
//! VCPU  (one per vCPU, in order) `vcpu_state::VcpuState`
//! END   CRC-32 of every byte before this section
//! ```
//!
//! Sections are `crate::state` sections (tag, version, length), so each part is refused on its
//! own terms (a newer layout, a cut-off stream). A snapshot leaves out the pages that are all
//! zero (the RAM of a restored guest starts zeroed). Pages come before the state so that live
//! migration can reuse the format: rounds of PAGE sections while the guest runs (a page it
//! zeroed travels as a zero-page record), then the state of the stopped guest.

use crate::state::{Reader, StateError, Writer};
use crate::vcpu_state::{VcpuState, XsaveLayout};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub const MAGIC: [u8; 8] = *b"KEELSNAP";
pub const FORMAT_VERSION: u16 = 1;
pub const PAGE_SIZE: usize = 4096;
/// Pages per PAGE section (64 KiB of data): one checksummed batch.
const BATCH: usize = 16;
/// The END section: tag, version, length and the CRC-32.
const END_LEN: usize = 4 + 2 + 4 + 4;
/// The largest snapshot Keel makes or takes: it is held whole in Keel's heap while it travels.
pub const STREAM_MAX: usize = 2 << 20;
/// A page record: address, kind, CRC-32 and the bytes.
const PAGE_RECORD: usize = 8 + 1 + 4 + PAGE_SIZE;

/// The size of a snapshot with `pages` data pages and `state` bytes of platform and vCPU state
/// (within a few bytes per section).
pub fn estimate(pages: usize, state: usize) -> usize {
    1024 + state + pages * PAGE_RECORD + pages.div_ceil(BATCH) * 16
}

/// What the guest sees of the CPU: a restore on a CPU that differs is refused, since the guest
/// chose its code paths by these features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// (leaf, subleaf, [EAX, EBX, ECX, EDX]) as the guest's CPUID answers them.
    pub cpuid: Vec<(u32, u32, [u32; 4])>,
    pub xsave: XsaveLayout,
}

crate::codec_struct!(XsaveLayout {
    xsave,
    supported,
    components
});
crate::codec_struct!(Fingerprint { cpuid, xsave });

/// The leaves of the fingerprint: vendor and maximum leaf, the feature flags (1, 7), the
/// extended-state enumeration (0DH: the size for the current XCR0 in EBX is left out, it is
/// Keel's), the extended features and the address sizes.
pub const FINGERPRINT_LEAVES: [(u32, u32); 7] = [
    (0, 0),
    (1, 0),
    (7, 0),
    (0xd, 0),
    (0xd, 1),
    (0x8000_0001, 0),
    (0x8000_0008, 0),
];

/// The fingerprint of the CPU a guest with the execution controls `primary` and `secondary` and
/// `cpus` vCPUs sees on `host` (`exits::cpuid::policy`, as vCPU 0 with its APIC enabled and
/// XSAVE turned on), with the extended-state layout `xsave`. The sizes CPUID.0DH reports for the
/// XCR0 loaded now (EBX of subleaves 0 and 1) are left out: they are whichever guest's ran last.
pub fn fingerprint(
    host: &dyn crate::exits::Host,
    primary: u32,
    secondary: u32,
    cpus: u32,
    xsave: XsaveLayout,
) -> Fingerprint {
    let f = crate::exits::cpuid::GuestFeatures {
        cr4: 1 << 18,
        apic_enabled: true,
        primary,
        secondary,
        tsc_hz: 0,
        apic_id: 0,
        cpus,
    };
    let cpuid = FINGERPRINT_LEAVES
        .iter()
        .map(|&(leaf, subleaf)| {
            let mut r = crate::exits::cpuid::policy(host, leaf, subleaf, &f);
            if leaf == 0xd {
                r[1] = 0;
            }
            (leaf, subleaf, r)
        })
        .collect();
    Fingerprint { cpuid, xsave }
}

/// Base64 (RFC 4648, with padding): how the snapshot stream travels in the control channel's
/// JSON lines.
pub mod base64 {
    use alloc::string::String;
    use alloc::vec::Vec;

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn value(c: u8) -> Option<u32> {
        ALPHABET.iter().position(|&a| a == c).map(|p| p as u32)
    }

    /// None if `text` is not padded base64.
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let t = text.as_bytes();
        if !t.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(t.len() / 4 * 3);
        for (k, q) in t.chunks(4).enumerate() {
            let last = k + 1 == t.len() / 4;
            let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &q[..4 - pad] {
                n = n << 6 | value(c)?;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }
}

/// The guest a snapshot is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    pub name: String,
    /// Its manifest kind (`flat`, `elf`, ...), for people.
    pub kind: String,
    /// RAM in bytes.
    pub memory: u64,
    pub vcpus: u32,
    /// The rate of the guest's TSC, which its device models count by.
    pub tsc_hz: u64,
    /// The guest's clock (`guest::Vm::now`) when it stopped for the snapshot: a restored guest's
    /// clock goes on from here.
    pub clock: u64,
}
crate::codec_struct!(GuestInfo {
    name,
    kind,
    memory,
    vcpus,
    tsc_hz,
    clock
});

#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    keel_version: String,
    fingerprint: Fingerprint,
}
crate::codec_struct!(Head {
    keel_version,
    fingerprint
});

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    BadMagic,
    Format {
        found: u16,
        supported: u16,
    },
    /// The stream does not end with its END section: cut off.
    NoEnd,
    Checksum {
        stored: u32,
        computed: u32,
    },
    PageChecksum {
        gpa: u64,
    },
    BadPage {
        gpa: u64,
    },
    CpuDiffers {
        leaf: u32,
        subleaf: u32,
        here: [u32; 4],
        snapshot: [u32; 4],
    },
    XsaveDiffers,
    MemoryMismatch {
        snapshot: u64,
        guest: u64,
    },
    VcpusMismatch {
        snapshot: u32,
        guest: u32,
    },
    TooLarge {
        size: usize,
        max: usize,
    },
    State(StateError),
}

impl From<StateError> for SnapshotError {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => write!(f, "not a Keel snapshot (bad magic)"),
            Self::Format { found, supported } => write!(
                f,
                "snapshot format version {found}; this Keel reads version {supported}"
            ),
            Self::NoEnd => write!(f, "the snapshot is cut off (no end mark)"),
            Self::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch: the snapshot says {stored:#010x}, its bytes give {computed:#010x} (corrupted)"
            ),
            Self::PageChecksum { gpa } => {
                write!(f, "checksum mismatch in the page at {gpa:#x} (corrupted)")
            }
            Self::BadPage { gpa } => write!(f, "a page at {gpa:#x}, outside the guest's RAM"),
            Self::CpuDiffers {
                leaf,
                subleaf,
                here,
                snapshot,
            } => write!(
                f,
                "CPU features differ: CPUID.(EAX={leaf:#x},ECX={subleaf}) is {here:08x?} here, {snapshot:08x?} in the snapshot"
            ),
            Self::XsaveDiffers => write!(f, "CPU features differ: the XSAVE features or layout"),
            Self::MemoryMismatch { snapshot, guest } => write!(
                f,
                "memory size mismatch: the snapshot has {} KiB, the guest {} KiB",
                snapshot >> 10,
                guest >> 10
            ),
            Self::VcpusMismatch { snapshot, guest } => write!(
                f,
                "vCPU count mismatch: the snapshot has {snapshot}, the guest {guest}"
            ),
            Self::TooLarge { size, max } => write!(
                f,
                "a snapshot of {} KiB; this Keel takes at most {} KiB",
                size >> 10,
                max >> 10
            ),
            Self::State(e) => write!(f, "{e}"),
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), table-driven.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// The CRC-32 of the bytes behind `crc` (a `crc32` result, 0 for none) followed by `data`.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// A page record's kind.
const PAGE_DATA: u8 = 1;
const PAGE_ZERO: u8 = 0;

/// Writes a snapshot: `read_page(gpa, buf)` gives the guest's page at `gpa`; the pages that are
/// all zero are left out. `platform` is the PLAT section (`Platform::save`).
pub fn write(
    keel_version: &str,
    fingerprint: &Fingerprint,
    guest: &GuestInfo,
    mut read_page: impl FnMut(u64, &mut [u8]),
    platform: &[u8],
    vcpus: &[VcpuState],
    capacity: usize,
) -> Vec<u8> {
    let mut w = Writer::with_capacity(capacity);
    write_head(&mut w, keel_version, fingerprint, guest);
    let mut batch: Vec<(u64, [u8; PAGE_SIZE])> = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    let pages = guest.memory / PAGE_SIZE as u64;
    for n in 0..pages {
        let gpa = n * PAGE_SIZE as u64;
        read_page(gpa, &mut page);
        if page.iter().any(|&b| b != 0) {
            batch.push((gpa, page));
        }
        if batch.len() == BATCH || (n + 1 == pages && !batch.is_empty()) {
            let refs: Vec<(u64, Option<&[u8]>)> =
                batch.iter().map(|(g, d)| (*g, Some(&d[..]))).collect();
            write_pages(&mut w, &refs);
            batch.clear();
        }
    }
    w.raw(platform);
    write_vcpus(&mut w, vcpus);
    let crc = crc32(w.bytes());
    write_end(&mut w, crc);
    w.into_bytes()
}

/// The start of a stream: magic, format version, HEAD and GUES.
pub fn write_head(
    w: &mut Writer,
    keel_version: &str,
    fingerprint: &Fingerprint,
    guest: &GuestInfo,
) {
    w.raw(&MAGIC);
    w.put(&FORMAT_VERSION);
    let head = Head {
        keel_version: keel_version.into(),
        fingerprint: fingerprint.clone(),
    };
    crate::state::save_whole(w, *b"HEAD", 1, &head);
    crate::state::save_whole(w, *b"GUES", 1, guest);
}

/// A GUES section on its own: a live migration's stream repeats it after its pages with the
/// guest's clock at the pause (the first one goes out before the clock is known).
pub fn write_guest(w: &mut Writer, guest: &GuestInfo) {
    crate::state::save_whole(w, *b"GUES", 1, guest);
}

/// Every vCPU's VCPU section, in order.
pub fn write_vcpus(w: &mut Writer, vcpus: &[VcpuState]) {
    for v in vcpus {
        v.save(w);
    }
}

/// The END section: `crc` is the CRC-32 of every byte before it.
pub fn write_end(w: &mut Writer, crc: u32) {
    w.section(*b"END ", 1, |w| w.put(&crc));
}

/// Pages per PAGE section (64 KiB of data): one checksummed batch.
pub const PAGES_PER_SECTION: usize = BATCH;

/// One PAGE section: the count, then each page's address, kind, CRC-32 and (for a data page)
/// its bytes; `None` is a page that is all zero now (a zero-page record).
pub fn write_pages(w: &mut Writer, pages: &[(u64, Option<&[u8]>)]) {
    w.section(*b"PAGE", 1, |w| {
        w.put(&(pages.len() as u32));
        for &(gpa, data) in pages {
            w.put(&gpa);
            match data {
                Some(data) => {
                    w.put(&PAGE_DATA);
                    w.put(&crc32(data));
                    w.raw(data);
                }
                None => {
                    w.put(&PAGE_ZERO);
                    w.put(&crc32(&ZERO_PAGE));
                }
            }
        }
    });
}

/// Page records: (guest-physical address, bytes or `None` for a page that is all zero).
pub type PageRecords<'a> = Vec<(u64, Option<&'a [u8]>)>;

/// The pages of one PAGE section (`body`: the section's bytes after its header), each checked
/// against `memory` (the guest's RAM size) and its CRC-32: (address, bytes or `None` for a zero
/// page).
pub fn read_pages<'a>(section: &'a [u8], memory: u64) -> Result<PageRecords<'a>, SnapshotError> {
    let mut r = Reader::new(section);
    let mut pages = Vec::new();
    r.section(*b"PAGE", 1, |r, _| {
        let n = r.get::<u32>()?;
        for _ in 0..n {
            let gpa: u64 = r.get()?;
            let kind: u8 = r.get()?;
            let crc: u32 = r.get()?;
            let data: Option<&'a [u8]> = match kind {
                PAGE_DATA => Some(r.raw(PAGE_SIZE)?),
                PAGE_ZERO => None,
                _ => return Err(StateError::Invalid("an unknown page kind")),
            };
            pages.push((gpa, crc, data));
        }
        Ok(())
    })?;
    pages
        .into_iter()
        .map(|(gpa, crc, data)| {
            if gpa % PAGE_SIZE as u64 != 0 || gpa >= memory {
                return Err(SnapshotError::BadPage { gpa });
            }
            if crc32(data.unwrap_or(&ZERO_PAGE)) != crc {
                return Err(SnapshotError::PageChecksum { gpa });
            }
            Ok((gpa, data))
        })
        .collect()
}

/// Checks a HEAD section (whole, header included) against this CPU (`here`): its Keel version.
pub fn read_head(section: &[u8], here: &Fingerprint) -> Result<String, SnapshotError> {
    let head: Head = Reader::new(section).section(*b"HEAD", 1, |r, _| r.get())?;
    compare(here, &head.fingerprint)?;
    Ok(head.keel_version)
}

/// A GUES section (whole, header included).
pub fn read_guest(section: &[u8]) -> Result<GuestInfo, SnapshotError> {
    let guest: GuestInfo = Reader::new(section).section(*b"GUES", 1, |r, _| r.get())?;
    if !guest.memory.is_multiple_of(PAGE_SIZE as u64) || guest.vcpus == 0 {
        return Err(StateError::Invalid("a guest of no vCPU or of partial pages").into());
    }
    Ok(guest)
}

/// A repeated GUES section must describe the same guest; only its clock may differ.
pub fn check_same_guest(first: &GuestInfo, again: &GuestInfo) -> Result<(), SnapshotError> {
    let clockless = |g: &GuestInfo| GuestInfo {
        clock: 0,
        ..g.clone()
    };
    if clockless(first) != clockless(again) {
        return Err(StateError::Invalid("a second guest section for another guest").into());
    }
    Ok(())
}

/// A snapshot taken apart and checked: every checksum, every section's layout, the CPU it needs.
#[derive(Debug, Clone)]
pub struct Snapshot<'a> {
    pub keel_version: String,
    pub guest: GuestInfo,
    /// (guest-physical address, bytes) of every page that is not zero.
    pub pages: Vec<(u64, &'a [u8])>,
    /// The PLAT section, for `Platform::restore`.
    pub platform: &'a [u8],
    pub vcpus: Vec<VcpuState>,
}

/// The next section whole (header included), whatever its tag.
fn take_section<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], StateError> {
    let mut peek = r.clone();
    peek.raw(6)?;
    let len: u32 = peek.get()?;
    r.raw(10 + len as usize)
}

/// Reads the magic, version and the end mark and checks the whole stream's CRC.
fn outer(stream: &[u8]) -> Result<Reader<'_>, SnapshotError> {
    if stream.len() < MAGIC.len() || stream[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let mut r = Reader::new(&stream[MAGIC.len()..]);
    let version: u16 = r.get().map_err(|_| SnapshotError::NoEnd)?;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Format {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if stream.len() < MAGIC.len() + 2 + END_LEN {
        return Err(SnapshotError::NoEnd);
    }
    let (body, end) = stream.split_at(stream.len() - END_LEN);
    let stored = Reader::new(end)
        .section(*b"END ", 1, |r, _| r.get::<u32>())
        .map_err(|_| SnapshotError::NoEnd)?;
    let computed = crc32(body);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    Ok(Reader::new(&body[MAGIC.len() + 2..]))
}

/// The header and guest sections of a snapshot, without checking it against a CPU: what the
/// packer shows about a snapshot image.
pub fn describe(stream: &[u8]) -> Result<(String, GuestInfo), SnapshotError> {
    let mut r = outer(stream)?;
    let head: Head = r.section(*b"HEAD", 1, |r, _| r.get())?;
    let guest: GuestInfo = r.section(*b"GUES", 1, |r, _| r.get())?;
    Ok((head.keel_version, guest))
}

/// Takes `stream` apart and checks all of it: its checksums, every section, and that it fits
/// this CPU (`here`). Nothing is changed anywhere; the caller applies the result.
pub fn parse<'a>(stream: &'a [u8], here: &Fingerprint) -> Result<Snapshot<'a>, SnapshotError> {
    let mut r = outer(stream)?;
    let head: Head = r.section(*b"HEAD", 1, |r, _| r.get())?;
    compare(here, &head.fingerprint)?;
    let mut guest = read_guest(take_section(&mut r)?)?;
    let mut pages = Vec::new();
    while r.clone().get::<[u8; 4]>()? == *b"PAGE" {
        for (gpa, data) in read_pages(take_section(&mut r)?, guest.memory)? {
            pages.push((gpa, data.unwrap_or(&ZERO_PAGE)));
        }
    }
    // A live migration's stream gives the guest again after its pages, with its final clock.
    if r.clone().get::<[u8; 4]>()? == *b"GUES" {
        let again = read_guest(take_section(&mut r)?)?;
        check_same_guest(&guest, &again)?;
        guest = again;
    }
    let checked = pages;
    let platform = {
        let rest = r.clone();
        r.section(*b"PLAT", 1, |r, _| {
            let n = r.remaining();
            r.raw(n).map(|_| ())
        })?;
        let used = rest.remaining() - r.remaining();
        let mut copy = rest;
        copy.raw(used)?
    };
    let mut vcpus = Vec::new();
    for i in 0..guest.vcpus {
        let v = VcpuState::load(&mut r)?;
        if v.index != i {
            return Err(StateError::Invalid("vCPU states out of order").into());
        }
        vcpus.push(v);
    }
    if r.remaining() != 0 {
        return Err(StateError::Trailing {
            section: *b"END ",
            left: r.remaining(),
        }
        .into());
    }
    Ok(Snapshot {
        keel_version: head.keel_version,
        guest,
        pages: checked,
        platform,
        vcpus,
    })
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Refuses a snapshot made for a CPU whose features the guest sees differ from this one's.
fn compare(here: &Fingerprint, snapshot: &Fingerprint) -> Result<(), SnapshotError> {
    for &(leaf, subleaf, there) in &snapshot.cpuid {
        let mine = here
            .cpuid
            .iter()
            .find(|(l, s, _)| (*l, *s) == (leaf, subleaf))
            .map_or([0; 4], |e| e.2);
        if mine != there {
            return Err(SnapshotError::CpuDiffers {
                leaf,
                subleaf,
                here: mine,
                snapshot: there,
            });
        }
    }
    if here.xsave != snapshot.xsave {
        return Err(SnapshotError::XsaveDiffers);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
