//! A guest that keeps writing while its RAM is sent arrives whole, in rounds; lost replies are
//! read again; damage, a cut-off stream and a guest of another size are refused with the reason.

use super::*;
use crate::snapshot::tests::{fingerprint, guest, platform_bytes, vcpu_state, MEMORY};
use crate::snapshot::write_guest;
use alloc::vec;

const PAGES: u64 = MEMORY / PAGE_SIZE as u64;
/// A `migrate-read` reply's bytes.
const CHUNK: usize = 3072;

/// A guest's RAM, page by page.
#[derive(Clone, PartialEq, Eq)]
struct Ram(Vec<[u8; PAGE_SIZE]>);

impl Ram {
    fn new() -> Self {
        let mut r = Ram(vec![[0; PAGE_SIZE]; PAGES as usize]);
        for n in [1, 2, 7, 40, PAGES - 1] {
            r.write(n, n as u8 + 1);
        }
        r
    }

    /// The guest writes `byte` into page `n`: the page is dirty.
    fn write(&mut self, n: u64, byte: u8) {
        self.0[n as usize][(n as usize * 13) % PAGE_SIZE] = byte;
        self.0[n as usize][100] = byte;
    }
}

impl Source for Ram {
    fn read_page(&mut self, n: u64, buf: &mut [u8; PAGE_SIZE]) {
        buf.copy_from_slice(&self.0[n as usize]);
    }
}

impl Sink for Ram {
    fn write_page(&mut self, n: u64, data: Option<&[u8]>) {
        match data {
            Some(d) => self.0[n as usize].copy_from_slice(d),
            None => self.0[n as usize] = [0; PAGE_SIZE],
        }
    }
}

fn zeroed() -> Ram {
    Ram(vec![[0; PAGE_SIZE]; PAGES as usize])
}

fn sender() -> Sender {
    let mut g = guest();
    g.clock = 0;
    Sender::new("0.1.0", &fingerprint(), &g)
}

fn receiver() -> Receiver {
    Receiver::new(MEMORY, 2, fingerprint())
}

/// The state the final step sends: the guest again with its clock at the pause, the platform,
/// both vCPUs.
fn state(clock: u64) -> Vec<u8> {
    let mut w = Writer::new();
    write_guest(&mut w, &GuestInfo { clock, ..guest() });
    w.raw(&platform_bytes());
    snapshot::write_vcpus(&mut w, &[vcpu_state(0, 0x1000), vcpu_state(1, 0x2000)]);
    w.into_bytes()
}

/// Reads the current round to its end (the reader's loop), handing each chunk to `rx`; calls
/// `between` after each chunk (the guest runs meanwhile). Returns the chunks read.
fn read_round(
    tx: &mut Sender,
    ram: &mut Ram,
    rx: &mut Receiver,
    target: &mut Ram,
    mut between: impl FnMut(&mut Ram, usize),
) -> usize {
    let mut chunks = 0;
    loop {
        let offset = tx.base;
        let data = tx.read(ram, offset, CHUNK).unwrap().to_vec();
        if data.is_empty() {
            return chunks;
        }
        rx.feed(&data, target).unwrap();
        // Acknowledge: the next read starts after these bytes.
        tx.read(ram, offset + data.len() as u64, 0).unwrap();
        chunks += 1;
        between(ram, chunks);
    }
}

#[test]
fn a_guest_writing_during_the_rounds_arrives_whole() {
    let mut ram = Ram::new();
    let mut target = zeroed();
    let mut tx = sender();
    let mut rx = receiver();
    let mut dirty = PageSet::empty(PAGES);
    // Round 0 while the guest runs: it writes page 3 (not yet sent), page 1 (already sent) and
    // zeroes page 7.
    read_round(&mut tx, &mut ram, &mut rx, &mut target, |ram, chunk| {
        if chunk == 1 {
            ram.write(3, 0x33);
            ram.write(1, 0x11);
            ram.0[7] = [0; PAGE_SIZE];
            [3, 1, 7].iter().for_each(|&n| dirty.insert(n));
        }
    });
    assert_eq!(tx.rounds()[0].pages, 5, "the five pages that are not zero");
    assert!(target != ram, "pages written during round 0 differ");
    // Round 1: the three dirty pages; the guest writes page 40 meanwhile.
    assert_eq!(tx.next_round(&dirty).unwrap(), 3);
    let mut dirty = PageSet::empty(PAGES);
    read_round(&mut tx, &mut ram, &mut rx, &mut target, |ram, _| {
        ram.write(40, 0x40);
        dirty.insert(40);
    });
    assert_eq!(tx.rounds()[1].pages, 3);
    // The final step, the guest paused: page 40 and the state.
    assert_eq!(tx.finish(&dirty, state(777)).unwrap(), 1);
    read_round(&mut tx, &mut ram, &mut rx, &mut target, |_, _| {});
    assert!(tx.ended());
    assert!(rx.ended());
    assert!(target == ram, "every page as the guest left it");
    assert_eq!(
        target.0[7], [0; PAGE_SIZE],
        "the zeroed page came as a zero record"
    );
    assert_eq!(tx.round(), 2);
    assert_eq!(tx.resent(), 3, "pages 1, 7 and 40 went twice");
    assert_eq!(rx.pages(), 5 + 3 + 1);
    assert_eq!(rx.received(), tx.made());
    // The state is a snapshot with no pages, the clock the one at the pause.
    let stream = rx.state().unwrap();
    let snap = snapshot::parse(&stream, &fingerprint()).unwrap();
    assert!(snap.pages.is_empty());
    assert_eq!(snap.guest.clock, 777);
    assert_eq!(snap.vcpus.len(), 2);
    assert_eq!(snap.vcpus[1], vcpu_state(1, 0x2000));
}

#[test]
fn the_whole_stream_is_a_snapshot() {
    let mut ram = Ram::new();
    let mut tx = sender();
    let mut all = Vec::new();
    let mut dirty = PageSet::empty(PAGES);
    dirty.insert(2);
    let mut offset = 0;
    let mut step = |tx: &mut Sender, ram: &mut Ram, all: &mut Vec<u8>| loop {
        let data = tx.read(ram, offset, CHUNK).unwrap().to_vec();
        if data.is_empty() {
            break;
        }
        offset += data.len() as u64;
        all.extend_from_slice(&data);
    };
    step(&mut tx, &mut ram, &mut all);
    tx.next_round(&dirty).unwrap();
    step(&mut tx, &mut ram, &mut all);
    tx.finish(&PageSet::empty(PAGES), state(5)).unwrap();
    step(&mut tx, &mut ram, &mut all);
    let snap = snapshot::parse(&all, &fingerprint()).unwrap();
    assert_eq!(snap.pages.len(), 6, "5 in round 0, page 2 again in round 1");
    assert_eq!(snap.guest.clock, 5);
}

#[test]
fn a_snapshot_stream_through_a_small_disk_is_the_guest_whole() {
    use crate::ata::SECTOR;
    use crate::bulk::{self, tests::MemDisk};
    let mut ram = Ram::new();
    let mut g = guest();
    g.clock = 9;
    // The sender: the paused guest's stream, read a disk's worth (8 KiB) at a time; the
    // receiver takes each piece off the other disk.
    let mut tx = Sender::snapshot("0.1.0", &fingerprint(), &g, state(9));
    let mut rx = receiver();
    let mut target = zeroed();
    let (mut a, mut b) = (MemDisk(vec![0; 17 * SECTOR]), MemDisk(vec![0; 17 * SECTOR]));
    let mut offset = 0;
    let mut pieces = 0;
    while !tx.ended() {
        let cap = bulk::capacity(&a);
        let data = tx.read(&mut ram, offset, cap).unwrap();
        let crc = bulk::put(&mut a, offset, data).unwrap();
        let len = data.len() as u32;
        // The host copies the piece from A's disk to B's.
        b.0.copy_from_slice(&a.0);
        let (h, piece) = bulk::take(&mut b, len, crc).unwrap();
        assert_eq!(h.offset, offset);
        rx.feed(&piece, &mut target).unwrap();
        offset += u64::from(len);
        pieces += 1;
    }
    assert!(pieces > 2, "a stream larger than the disk goes in pieces");
    assert!(tx.finishing(), "a snapshot has no rounds");
    assert!(rx.ended());
    assert!(target == ram, "every page");
    assert_eq!(rx.pages(), 5, "zero pages are left out");
    let state = rx.state().unwrap();
    let snap = snapshot::parse(&state, &fingerprint()).unwrap();
    assert_eq!(snap.guest.clock, 9);
}

#[test]
fn a_lost_reply_is_read_again_and_old_bytes_are_gone() {
    let mut ram = Ram::new();
    let mut tx = sender();
    let first = tx.read(&mut ram, 0, CHUNK).unwrap().to_vec();
    assert_eq!(first.len(), CHUNK);
    assert_eq!(
        tx.read(&mut ram, 0, CHUNK).unwrap(),
        &first[..],
        "asked again"
    );
    let second = tx.read(&mut ram, CHUNK as u64, CHUNK).unwrap().to_vec();
    assert_ne!(second, first);
    let made = tx.made();
    assert_eq!(
        tx.read(&mut ram, 0, CHUNK),
        Err(MigrateError::Offset {
            asked: 0,
            from: CHUNK as u64,
            to: made
        })
    );
    let past = tx.made() + 1;
    assert!(matches!(
        tx.read(&mut ram, past, CHUNK),
        Err(MigrateError::Offset { .. })
    ));
}

/// The stream of `ram` in one piece, with its final state.
fn whole_stream(ram: &mut Ram) -> Vec<u8> {
    let mut tx = sender();
    tx.finish(&PageSet::empty(PAGES), state(9)).unwrap();
    let mut all = Vec::new();
    loop {
        let data = tx.read(ram, all.len() as u64, CHUNK).unwrap().to_vec();
        if data.is_empty() {
            return all;
        }
        all.extend_from_slice(&data);
    }
}

#[test]
fn a_damaged_page_is_refused_where_it_is() {
    let mut ram = Ram::new();
    let mut all = whole_stream(&mut ram);
    // The first page's data (page 1): head, then the PAGE section header, count, record head.
    let at = all
        .windows(4)
        .position(|w| w == b"PAGE")
        .expect("a page section")
        + 10
        + 4
        + 8
        + 1
        + 4
        + 100;
    all[at] ^= 1;
    let mut target = zeroed();
    let mut rx = receiver();
    assert_eq!(
        rx.feed(&all, &mut target),
        Err(MigrateError::Stream(SnapshotError::PageChecksum {
            gpa: 0x1000
        }))
    );
}

#[test]
fn damaged_state_fails_the_end_checksum_and_nothing_is_applied() {
    let mut ram = Ram::new();
    let mut all = whole_stream(&mut ram);
    let vcpu = all.windows(4).rposition(|w| w == b"VCPU").unwrap();
    all[vcpu + 40] ^= 0x80;
    let mut rx = receiver();
    let fed = rx.feed(&all, &mut zeroed());
    assert!(
        matches!(
            fed,
            Err(MigrateError::Stream(SnapshotError::Checksum { .. }))
        ),
        "{fed:?}"
    );
    assert!(!rx.ended());
    assert_eq!(rx.state(), Err(MigrateError::Stream(SnapshotError::NoEnd)));
}

#[test]
fn a_cut_off_stream_has_no_state() {
    let mut ram = Ram::new();
    let all = whole_stream(&mut ram);
    let mut rx = receiver();
    let mut target = zeroed();
    rx.feed(&all[..all.len() - 20], &mut target).unwrap();
    assert!(!rx.ended());
    assert_eq!(rx.state(), Err(MigrateError::Stream(SnapshotError::NoEnd)));
    // Every page came before the cut.
    assert!(target == ram);
}

#[test]
fn bytes_after_the_end_are_refused() {
    let mut ram = Ram::new();
    let mut all = whole_stream(&mut ram);
    all.extend_from_slice(b"more");
    let mut rx = receiver();
    assert_eq!(rx.feed(&all, &mut zeroed()), Err(MigrateError::AfterEnd));
}

#[test]
fn a_guest_of_another_size_is_refused_before_any_page() {
    let mut ram = Ram::new();
    let all = whole_stream(&mut ram);
    let mut rx = Receiver::new(2 * MEMORY, 2, fingerprint());
    let mut target = Ram(vec![[0; PAGE_SIZE]; 2 * PAGES as usize]);
    assert_eq!(
        rx.feed(&all, &mut target),
        Err(MigrateError::Stream(SnapshotError::MemoryMismatch {
            snapshot: MEMORY,
            guest: 2 * MEMORY
        }))
    );
    assert_eq!(rx.pages(), 0);
    let mut rx = Receiver::new(MEMORY, 1, fingerprint());
    assert!(matches!(
        rx.feed(&all, &mut zeroed()),
        Err(MigrateError::Stream(SnapshotError::VcpusMismatch { .. }))
    ));
}

#[test]
fn another_cpu_is_refused_at_the_header() {
    let mut ram = Ram::new();
    let all = whole_stream(&mut ram);
    let mut other = fingerprint();
    other.cpuid[1].2[2] ^= 1 << 28;
    let mut rx = Receiver::new(MEMORY, 2, other);
    assert!(matches!(
        rx.feed(&all[..200], &mut zeroed()),
        Err(MigrateError::Stream(SnapshotError::CpuDiffers {
            leaf: 1,
            ..
        }))
    ));
}

#[test]
fn a_damaged_section_length_is_refused() {
    let mut ram = Ram::new();
    let mut all = whole_stream(&mut ram);
    let page = all.windows(4).position(|w| w == b"PAGE").unwrap();
    all[page + 9] = 0x7f;
    let mut rx = receiver();
    assert!(matches!(
        rx.feed(&all, &mut zeroed()),
        Err(MigrateError::SectionTooLarge { tag, .. }) if &tag == b"PAGE"
    ));
}

#[test]
fn no_rounds_after_the_final_step() {
    let mut tx = sender();
    tx.finish(&PageSet::empty(PAGES), state(1)).unwrap();
    assert!(tx.finishing());
    assert_eq!(
        tx.next_round(&PageSet::empty(PAGES)),
        Err(MigrateError::Finishing)
    );
    assert_eq!(
        tx.finish(&PageSet::empty(PAGES), state(1)),
        Err(MigrateError::Finishing)
    );
}

#[test]
fn page_sets() {
    let mut s = PageSet::empty(130);
    assert!(s.is_empty());
    for n in [0, 63, 64, 129, 500] {
        s.insert(n);
    }
    assert_eq!(s.len(), 4, "500 is past the guest");
    assert_eq!(s.next_from(1), Some(63));
    assert_eq!(s.next_from(65), Some(129));
    assert_eq!(s.next_from(130), None);
    assert_eq!(PageSet::full(130).len(), 130);
}

#[test]
fn rounds_stop_when_few_pages_are_dirty_or_after_the_last_round() {
    assert!(!converged(0, 100));
    assert!(converged(0, SMALL_ROUND));
    assert!(!converged(MAX_ROUNDS - 2, SMALL_ROUND + 1));
    assert!(converged(MAX_ROUNDS - 1, 10_000));
}
