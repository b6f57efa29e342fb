//! Ballooning: a guest gives pages of its RAM back to Keel and takes them again
//! (docs/HYPERCALLS.md, "Giving memory back").
//!
//! A guest's RAM is one contiguous host block (`hypervisor::VmHw`), mapped in its EPT. A page the
//! guest gives (BALLOON_GIVE) leaves its EPT (INVEPT follows, SDM 29.4.3.1) and its host frame goes
//! back to Keel's pool, where another guest may get it. A page it takes again (BALLOON_TAKE) gets
//! its old frame back when that is still free, else any free frame ("moved"): either way zeroed
//! and mapped again. [`PageMap`] remembers which pages are given and which moved, and
//! `guest::GuestRam`'s accessors follow it: Keel never reads or writes a given page for the guest
//! (a hypercall buffer there is EFAULT), and reaches a moved page through its own frame.
//!
//! A guest that touches a page it gave away takes an EPT violation there; Keel stops it with a
//! logged reason (`exits::ept`): a balloon driver that frees memory it still uses is a bug a user
//! wants to see, not data silently read as zeros.
//!
//! Everything here works through [`TableAlloc`] and [`Pool`], so the tests below run it against
//! heap tables and a fake pool.

use crate::abi::{status, BALLOON_MAX_PAGES};
use crate::ept::{Ept, EptPerms, MemType, StaleTranslations, TableAlloc};
use crate::guest::GuestRam;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Balloon pages are 4 KiB.
pub const PAGE: u64 = 4096;

/// A host frame outside the guest's block backing one of its pages: its address and where Keel
/// sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub hpa: u64,
    pub ptr: *mut u8,
}

/// Which pages of a guest's RAM are given back or backed by a frame outside its block, and the
/// balloon target Keel set.
#[derive(Debug, Default)]
pub struct PageMap {
    /// One bit per page, set while it is given; empty until the first page is.
    given: Vec<u64>,
    given_count: u64,
    /// Pages taken back onto another frame than their own.
    moved: BTreeMap<u64, Frame>,
    /// How many pages Keel asks the guest to have given in all (`balloon NAME SIZE`).
    pub target: u64,
    /// A GIVE or TAKE the guest made, checked, for the run loop to carry out after the exit (the
    /// EPT is the hardware's, `runloop::Cpu::balloon`), and whether its caller runs 64-bit code.
    pub pending: Option<(Request, bool)>,
    /// Since the operator last set the target: the GIVE and TAKE calls carried out, Keel's cycles
    /// for them, and whether Keel still owes the line saying the guest reached it (one line per
    /// target, so that a guest cannot fill Keel's console with balloon calls).
    pub round: Round,
}

/// The calls of one balloon round (`PageMap::round`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub calls: u64,
    pub cycles: u64,
    pub announce: bool,
}

impl PageMap {
    /// The operator asks for `target` pages given back in all: a new round.
    pub fn set_target(&mut self, target: u64) {
        self.target = target;
        self.round = Round {
            calls: 0,
            cycles: 0,
            announce: true,
        };
    }

    /// Counts a call Keel carried out in `cycles`; true when it completed the round (the guest
    /// has given what the target asks, and Keel has not said so yet).
    pub fn count_call(&mut self, cycles: u64) -> bool {
        self.round.calls += 1;
        self.round.cycles += cycles;
        let done = self.round.announce && self.given_count == self.target;
        if done {
            self.round.announce = false;
        }
        done
    }
}

impl PageMap {
    /// True when every page is backed by its own frame of the block (the accessors' fast path).
    pub fn is_pristine(&self) -> bool {
        self.given_count == 0 && self.moved.is_empty()
    }

    pub fn is_given(&self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        self.given.get(w).is_some_and(|word| word >> b & 1 != 0)
    }

    /// Pages given and not taken again.
    pub fn given_pages(&self) -> u64 {
        self.given_count
    }

    /// Where Keel reaches page `page` when it has moved.
    pub fn moved(&self, page: u64) -> Option<Frame> {
        self.moved.get(&page).copied()
    }

    fn set_given(&mut self, page: u64, given: bool) {
        let (w, b) = ((page / 64) as usize, page % 64);
        if self.given.len() <= w {
            self.given.resize(w + 1, 0);
        }
        let was = self.given[w] >> b & 1 != 0;
        if given {
            self.given[w] |= 1 << b;
        } else {
            self.given[w] &= !(1 << b);
        }
        match (was, given) {
            (false, true) => self.given_count += 1,
            (true, false) => self.given_count -= 1,
            _ => {}
        }
    }
}

/// Keel's pool of host frames, as ballooning uses it (`mm::FRAMES` in the kernel).
pub trait Pool {
    /// Gives `len` bytes at `hpa` back to the pool.
    fn free(&mut self, hpa: u64, len: u64);
    /// Takes the frame at `hpa` out of the pool if it is free there.
    fn claim(&mut self, hpa: u64) -> bool;
    /// Any free frame, zeroed.
    fn alloc(&mut self) -> Option<Frame>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Give,
    Take,
}

/// A GIVE or TAKE whose arguments passed [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub gpa: u64,
    pub pages: u64,
}

/// Checks a GIVE or TAKE of `pages` pages at guest-physical `gpa` against the guest's RAM:
/// EINVAL for an unaligned address, no pages, more than [`BALLOON_MAX_PAGES`] or a range not
/// wholly RAM; EFAULT for a GIVE of a page already given; EEXIST for a TAKE of a page the guest
/// has.
pub fn check(op: Op, gpa: u64, pages: u64, ram: &GuestRam) -> Result<Request, u64> {
    if !gpa.is_multiple_of(PAGE) || pages == 0 || pages > BALLOON_MAX_PAGES {
        return Err(status::EINVAL);
    }
    let end = gpa
        .checked_add(pages * PAGE)
        .filter(|&e| e <= ram.len())
        .ok_or(status::EINVAL)?;
    let map = &ram.balloon;
    let mut range = gpa / PAGE..end / PAGE;
    match op {
        Op::Give if range.any(|p| map.is_given(p)) => Err(status::EFAULT),
        Op::Take if range.any(|p| !map.is_given(p)) => Err(status::EEXIST),
        _ => Ok(Request { op, gpa, pages }),
    }
}

/// What a GIVE or TAKE did: its status for the guest, and the EPT whose cached translations must
/// go before the guest runs again (INVEPT, `vmx::FlushPolicy::for_ept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Outcome {
    pub status: u64,
    pub stale: Option<StaleTranslations>,
}

const RWX: EptPerms = EptPerms::RWX;

/// Carries out a checked request: all of it, or nothing (and an error status).
pub fn apply<A: TableAlloc>(
    req: Request,
    ram: &mut GuestRam,
    ept: &mut Ept<A>,
    pool: &mut dyn Pool,
) -> Outcome {
    match req.op {
        Op::Give => give(req, ram, ept, pool),
        Op::Take => take(req, ram, ept, pool),
    }
}

fn give<A: TableAlloc>(
    req: Request,
    ram: &mut GuestRam,
    ept: &mut Ept<A>,
    pool: &mut dyn Pool,
) -> Outcome {
    let len = req.pages * PAGE;
    let stale = match ept.unmap(req.gpa, len) {
        Ok(stale) => stale,
        Err(_) => {
            // Only a split can fail (no table for it), at an end of the range: whatever went is
            // mapped again as it was, and the guest keeps its pages.
            for p in 0..req.pages {
                let gpa = req.gpa + p * PAGE;
                if ept.translate(gpa).is_none() {
                    let _ = ept.map(gpa, backing(ram, gpa), PAGE, RWX, MemType::WriteBack);
                }
            }
            return no_memory(ept);
        }
    };
    for p in 0..req.pages {
        let gpa = req.gpa + p * PAGE;
        let page = gpa / PAGE;
        match ram.balloon.moved.remove(&page) {
            Some(frame) => pool.free(frame.hpa, PAGE),
            None => pool.free(ram.hpa + gpa, PAGE),
        }
        ram.balloon.set_given(page, true);
    }
    Outcome {
        status: status::OK,
        stale: Some(stale),
    }
}

/// ENOMEM after the EPT changed and was put back: what the processor cached meanwhile goes too.
fn no_memory<A: TableAlloc>(ept: &Ept<A>) -> Outcome {
    Outcome {
        status: status::ENOMEM,
        stale: Some(StaleTranslations { eptp: ept.eptp() }),
    }
}

/// The host frame behind guest-physical `gpa` (a page the guest has).
fn backing(ram: &GuestRam, gpa: u64) -> u64 {
    match ram.balloon.moved(gpa / PAGE) {
        Some(f) => f.hpa,
        None => ram.hpa + (gpa & !(PAGE - 1)),
    }
}

fn take<A: TableAlloc>(
    req: Request,
    ram: &mut GuestRam,
    ept: &mut Ept<A>,
    pool: &mut dyn Pool,
) -> Outcome {
    // Frames first (each its own again if still free), then the EPT entries; any failure gives
    // back what this call got, so the guest's state is as before.
    let mut got: Vec<(u64, Option<Frame>)> = Vec::with_capacity(req.pages as usize);
    let undo = |got: &[(u64, Option<Frame>)], pool: &mut dyn Pool, ram: &GuestRam| {
        for &(gpa, frame) in got {
            match frame {
                Some(f) => pool.free(f.hpa, PAGE),
                None => pool.free(ram.hpa + gpa, PAGE),
            }
        }
    };
    for p in 0..req.pages {
        let gpa = req.gpa + p * PAGE;
        if pool.claim(ram.hpa + gpa) {
            ram.zero_home_page(gpa);
            got.push((gpa, None));
        } else if let Some(f) = pool.alloc() {
            got.push((gpa, Some(f)));
        } else {
            undo(&got, pool, ram);
            return Outcome {
                status: status::ENOMEM,
                stale: None,
            };
        }
    }
    for (k, &(gpa, frame)) in got.iter().enumerate() {
        let hpa = frame.map_or(ram.hpa + gpa, |f| f.hpa);
        if ept.map(gpa, hpa, PAGE, RWX, MemType::WriteBack).is_err() {
            for &(done, _) in &got[..k] {
                let _ = ept.unmap(done, PAGE);
            }
            undo(&got, pool, ram);
            return no_memory(ept);
        }
    }
    for (gpa, frame) in got {
        let page = gpa / PAGE;
        if let Some(f) = frame {
            ram.balloon.moved.insert(page, f);
        }
        ram.balloon.set_given(page, false);
    }
    // Entries were only filled where none was present: nothing cached is stale (SDM 29.4.3.1).
    Outcome {
        status: status::OK,
        stale: None,
    }
}

/// Gives all of a guest's RAM back to the pool (it was killed or ended): the pages of its block
/// it still has and its moved frames (a given page's frame is in the pool already); its EPT no
/// longer maps RAM. The caller invalidates the returned EPTP and replaces the guest's `GuestRam`.
/// If the EPT cannot be changed, nothing is freed (no guest may keep a mapping of a frame in the
/// pool).
pub fn release<A: TableAlloc>(
    ram: &mut GuestRam,
    ept: &mut Ept<A>,
    pool: &mut dyn Pool,
) -> Result<Option<StaleTranslations>, crate::ept::EptError> {
    let stale = if ram.is_empty() {
        None
    } else {
        Some(ept.unmap(0, ram.len())?)
    };
    let pages = ram.len() / PAGE;
    // The block's frame of a given page is in the pool already, and a moved page's may be
    // another guest's now.
    let away = |p: u64| ram.balloon.is_given(p) || ram.balloon.moved.contains_key(&p);
    let mut p = 0;
    while p < pages {
        if away(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < pages && !away(p) {
            p += 1;
        }
        pool.free(ram.hpa + start * PAGE, (p - start) * PAGE);
    }
    for (_, f) in core::mem::take(&mut ram.balloon.moved) {
        pool.free(f.hpa, PAGE);
    }
    ram.balloon = PageMap::default();
    Ok(stale)
}

/// `balloon NAME SIZE`: the guest should keep `keep` bytes of its `ram` bytes; returns the target
/// in pages to give back, or why not.
pub fn target_for(keep: u64, ram: u64) -> Result<u64, alloc::string::String> {
    if keep > ram {
        return Err(alloc::format!(
            "the guest has only {} KiB of RAM",
            ram >> 10
        ));
    }
    if !keep.is_multiple_of(PAGE) {
        return Err("the size must be a multiple of 4K".into());
    }
    Ok((ram - keep) / PAGE)
}

/// A pool for tests of ballooning's users.
#[cfg(test)]
pub(crate) mod fake {
    use super::{Frame, Pool, PAGE};
    use alloc::collections::BTreeSet;
    use alloc::vec::Vec;

    /// A pool of frames with made-up addresses: the frames it holds, and heap pages for the
    /// ones it hands out.
    pub struct FakePool {
        pub free: BTreeSet<u64>,
        next: u64,
        pub limit: usize,
        pages: Vec<&'static mut [u8; 4096]>,
    }

    impl FakePool {
        pub fn new() -> Self {
            Self {
                free: BTreeSet::new(),
                next: 0x9000_0000,
                limit: usize::MAX,
                pages: Vec::new(),
            }
        }
        pub fn free_bytes(&self) -> u64 {
            self.free.len() as u64 * PAGE
        }
    }

    impl Pool for FakePool {
        fn free(&mut self, hpa: u64, len: u64) {
            for p in (hpa..hpa + len).step_by(PAGE as usize) {
                assert!(self.free.insert(p), "frame {p:#x} freed twice");
            }
        }
        fn claim(&mut self, hpa: u64) -> bool {
            self.free.remove(&hpa)
        }
        fn alloc(&mut self) -> Option<Frame> {
            if self.pages.len() >= self.limit {
                return None;
            }
            let page: &'static mut [u8; 4096] =
                alloc::boxed::Box::leak(alloc::boxed::Box::new([0; 4096]));
            let ptr = page.as_mut_ptr();
            self.pages.push(page);
            self.next += PAGE;
            Some(Frame {
                hpa: self.next,
                ptr,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakePool;
    use super::*;
    use crate::ept::FakeTables;
    use alloc::collections::BTreeSet;

    const MB: u64 = 1 << 20;
    /// The guest's block's host-physical address in these tests.
    const HOME: u64 = 0x4000_0000;

    fn guest(size: u64) -> (GuestRam, Ept<FakeTables>) {
        let mem: &'static mut [u8] = alloc::vec![0u8; size as usize].leak();
        // SAFETY: the leaked buffer belongs to this test alone.
        let ram = unsafe { GuestRam::new(mem, HOME) };
        let mut ept = Ept::new(FakeTables::new(), false).unwrap();
        ept.map(0, HOME, size, RWX, MemType::WriteBack).unwrap();
        (ram, ept)
    }

    fn req(op: Op, gpa: u64, pages: u64, ram: &GuestRam) -> Request {
        check(op, gpa, pages, ram).unwrap()
    }

    #[test]
    fn arguments_are_checked() {
        let (mut ram, mut ept) = guest(4 * MB);
        let mut pool = FakePool::new();
        let end = 4 * MB;
        assert_eq!(check(Op::Give, 0x1001, 1, &ram), Err(status::EINVAL));
        assert_eq!(check(Op::Give, 0x1000, 0, &ram), Err(status::EINVAL));
        assert_eq!(
            check(Op::Give, 0, BALLOON_MAX_PAGES + 1, &ram),
            Err(status::EINVAL)
        );
        assert_eq!(check(Op::Give, end - PAGE, 2, &ram), Err(status::EINVAL));
        assert_eq!(check(Op::Give, end, 1, &ram), Err(status::EINVAL));
        assert_eq!(check(Op::Give, !0xfff, 512, &ram), Err(status::EINVAL));
        assert_eq!(check(Op::Take, 0x1000, 1, &ram), Err(status::EEXIST));
        let r = req(Op::Give, 0x2000, 2, &ram);
        assert_eq!(apply(r, &mut ram, &mut ept, &mut pool).status, status::OK);
        assert_eq!(
            check(Op::Give, 0x1000, 2, &ram),
            Err(status::EFAULT),
            "0x2000 is given"
        );
        assert_eq!(
            check(Op::Take, 0x2000, 3, &ram),
            Err(status::EEXIST),
            "0x4000 is not"
        );
        assert!(check(Op::Take, 0x3000, 1, &ram).is_ok());
        assert!(check(Op::Give, end - PAGE, 1, &ram).is_ok());
    }

    #[test]
    fn given_pages_leave_the_ept_and_go_to_the_pool() {
        let (mut ram, mut ept) = guest(4 * MB);
        let mut pool = FakePool::new();
        ram.write(0x30_0000, b"keep").unwrap();
        // Two pages in the middle of the first 2 MiB page: it is split.
        let r = req(Op::Give, 0x10_0000, 2, &ram);
        let out = apply(r, &mut ram, &mut ept, &mut pool);
        assert_eq!(out.status, status::OK);
        assert_eq!(
            out.stale,
            Some(StaleTranslations { eptp: ept.eptp() }),
            "INVEPT owed"
        );
        assert_eq!(ept.translate(0x10_0000), None);
        assert_eq!(ept.translate(0x10_1fff), None);
        assert_eq!(
            ept.translate(0x10_2000).map(|t| t.0),
            Some(HOME + 0x10_2000)
        );
        assert_eq!(ept.translate(0xf_f000).map(|t| t.0), Some(HOME + 0xf_f000));
        assert_eq!(
            pool.free,
            BTreeSet::from([HOME + 0x10_0000, HOME + 0x10_1000])
        );
        assert_eq!(ram.balloon.given_pages(), 2);
        // Keel's accessors refuse the given pages, and only those.
        assert_eq!(ram.read_u32(0x10_0ffc), None);
        assert_eq!(ram.write(0x10_1000, b"x"), None);
        assert_eq!(
            ram.slice(0xf_fffe, 4),
            None,
            "a range that runs into a given page"
        );
        assert!(ram.fetch_or_u8(0x10_0000, 1).is_none());
        assert!(ram.read_u32(0xf_fffc).is_some());
        assert_eq!(ram.slice(0x30_0000, 4).as_deref(), Some(&b"keep"[..]));
        assert_eq!(ram.read_array(0x30_0000), Some(*b"keep"));
        assert_eq!(ram.read_array::<8>(0x10_1ffc), None);
    }

    #[test]
    fn taken_pages_come_back_zeroed_on_their_own_or_a_fresh_frame() {
        let (mut ram, mut ept) = guest(4 * MB);
        let mut pool = FakePool::new();
        ram.write(0x5000, &[0xaa; 8192]).unwrap();
        let r = req(Op::Give, 0x5000, 2, &ram);
        assert_eq!(apply(r, &mut ram, &mut ept, &mut pool).status, status::OK);
        // Another guest took page 0x6000's frame meanwhile: that page moves.
        assert!(pool.claim(HOME + 0x6000));
        let r = req(Op::Take, 0x5000, 2, &ram);
        let out = apply(r, &mut ram, &mut ept, &mut pool);
        assert_eq!(
            out,
            Outcome {
                status: status::OK,
                stale: None
            }
        );
        assert_eq!(ram.balloon.given_pages(), 0);
        assert_eq!(ept.translate(0x5000).map(|t| t.0), Some(HOME + 0x5000));
        let moved = ram.balloon.moved(6).expect("page 6 moved");
        assert_eq!(ept.translate(0x6008).map(|t| t.0), Some(moved.hpa + 8));
        assert!(pool.free.is_empty());
        // Both read as zeros, and Keel's accessors reach the moved page through its frame,
        // across the page boundary too.
        assert_eq!(ram.slice(0x5ffc, 8).as_deref(), Some(&[0u8; 8][..]));
        ram.write(0x5ffe, b"abcd").unwrap();
        assert_eq!(ram.slice(0x5ffe, 4).as_deref(), Some(&b"abcd"[..]));
        // SAFETY: the fake pool's page, alive for the test.
        assert_eq!(unsafe { *moved.ptr.add(1) }, b'd');
        assert!(!ram.balloon.is_pristine());
        // Given again, the moved frame goes back to the pool, not the home one.
        let r = req(Op::Give, 0x6000, 1, &ram);
        assert_eq!(apply(r, &mut ram, &mut ept, &mut pool).status, status::OK);
        assert_eq!(pool.free, BTreeSet::from([moved.hpa]));
        assert_eq!(ram.balloon.moved(6), None);
    }

    #[test]
    fn a_take_without_memory_takes_nothing() {
        let (mut ram, mut ept) = guest(4 * MB);
        let mut pool = FakePool::new();
        let r = req(Op::Give, 0x8000, 3, &ram);
        assert_eq!(apply(r, &mut ram, &mut ept, &mut pool).status, status::OK);
        // Two of the three frames went to other guests and the pool has no other.
        assert!(pool.claim(HOME + 0x9000) && pool.claim(HOME + 0xa000));
        pool.limit = 0;
        let r = req(Op::Take, 0x8000, 3, &ram);
        let out = apply(r, &mut ram, &mut ept, &mut pool);
        assert_eq!(out.status, status::ENOMEM);
        assert_eq!(ram.balloon.given_pages(), 3);
        assert_eq!(
            pool.free,
            BTreeSet::from([HOME + 0x8000]),
            "its frame back in the pool"
        );
        assert_eq!(ept.translate(0x8000), None);
    }

    #[test]
    fn a_give_that_cannot_split_keeps_the_pages() {
        let mem: &'static mut [u8] = alloc::vec![0u8; 4 * MB as usize].leak();
        // SAFETY: the leaked buffer belongs to this test alone.
        let mut ram = unsafe { GuestRam::new(mem, HOME) };
        // The PML4, PDPT and PD that map the two 2 MiB pages, and no table to split one with.
        let mut tables = FakeTables::new();
        tables.limit = 3;
        let mut ept = Ept::new(tables, false).unwrap();
        ept.map(0, HOME, 4 * MB, RWX, MemType::WriteBack).unwrap();
        let mut pool = FakePool::new();
        let r = req(Op::Give, 0x1000, 1, &ram);
        let out = apply(r, &mut ram, &mut ept, &mut pool);
        assert_eq!(out.status, status::ENOMEM);
        assert_eq!(ram.balloon.given_pages(), 0);
        assert!(pool.free.is_empty());
        assert_eq!(ept.translate(0x1000).map(|t| t.0), Some(HOME + 0x1000));
    }

    #[test]
    fn release_gives_back_every_frame_once() {
        let (mut ram, mut ept) = guest(4 * MB);
        let mut pool = FakePool::new();
        let r = req(Op::Give, 0x20_0000, 16, &ram);
        assert_eq!(apply(r, &mut ram, &mut ept, &mut pool).status, status::OK);
        assert!(pool.claim(HOME + 0x20_0000));
        let r = req(Op::Take, 0x20_0000, 1, &ram);
        assert_eq!(apply(r, &mut ram, &mut ept, &mut pool).status, status::OK);
        let moved = ram.balloon.moved(0x200).unwrap();
        let stale = release(&mut ram, &mut ept, &mut pool);
        assert_eq!(stale, Ok(Some(StaleTranslations { eptp: ept.eptp() })));
        // The block (less the frame another guest holds) and the moved frame; FakePool panics
        // on a double free.
        assert_eq!(pool.free_bytes(), 4 * MB);
        assert!(pool.free.contains(&moved.hpa) && !pool.free.contains(&(HOME + 0x20_0000)));
        assert_eq!(ept.translate(0), None);
        assert_eq!(ept.translate(0x3f_f000), None);
        assert!(ram.balloon.is_pristine());
    }

    #[test]
    fn a_round_is_announced_once_when_the_target_is_reached() {
        let mut map = PageMap::default();
        assert!(!map.count_call(5), "no target set: nothing to say");
        map.set_target(2);
        map.set_given(7, true);
        assert!(!map.count_call(10), "1 of 2");
        map.set_given(8, true);
        assert!(map.count_call(20));
        assert_eq!(
            map.round,
            Round {
                calls: 2,
                cycles: 30,
                announce: false
            }
        );
        map.set_given(8, false);
        map.count_call(1);
        map.set_given(8, true);
        assert!(
            !map.count_call(1),
            "said once per target, however the guest goes on"
        );
    }

    #[test]
    fn targets_in_pages() {
        assert_eq!(target_for(8 * MB, 16 * MB), Ok(2048));
        assert_eq!(target_for(16 * MB, 16 * MB), Ok(0));
        assert!(target_for(17 * MB, 16 * MB)
            .unwrap_err()
            .contains("16384 KiB"));
        assert!(target_for(4097, 16 * MB).is_err());
    }
}
