//! A first-fit allocator of physical ranges.
//!
//! Keel needs two shapes of physical memory: single 4 KiB frames (VMCS regions, EPT tables, bitmaps)
//! and large contiguous, 2 MiB-aligned blocks (guest RAM, so EPT can use large pages). A sorted list
//! of free ranges serves both and gives memory back when a guest is destroyed, which the planned
//! balloon hypercall and guest restart need.

use crate::machine::PhysRange;
use alloc::vec::Vec;

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug)]
pub struct FrameAllocator {
    /// Free ranges, sorted by start, never adjacent (merged on free).
    free: Vec<PhysRange>,
    total: u64,
}

impl FrameAllocator {
    pub const fn empty() -> Self {
        Self {
            free: Vec::new(),
            total: 0,
        }
    }

    pub fn new(usable: &[PhysRange]) -> Self {
        let mut a = Self::empty();
        a.add(usable);
        a
    }

    /// Adds usable RAM to the pool.
    pub fn add(&mut self, usable: &[PhysRange]) {
        let a = self;
        for r in usable {
            let start = align_up(r.start, PAGE_SIZE);
            let end = r.end & !(PAGE_SIZE - 1);
            // Never hand out page 0: a null physical address is a bug magnet.
            let start = start.max(PAGE_SIZE);
            if end > start {
                a.total += end - start;
                a.free_range(start, end - start);
            }
        }
    }

    /// Allocates `size` bytes aligned to `align` (both multiples of 4 KiB; align a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        self.alloc_below(size, align, u64::MAX)
    }

    /// Like [`Self::alloc`], but the block must end at or below `limit` (an AP's start-up code
    /// must lie below 1 MiB).
    pub fn alloc_below(&mut self, size: u64, align: u64, limit: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two() && size.is_multiple_of(PAGE_SIZE) && size > 0);
        for i in 0..self.free.len() {
            let r = self.free[i];
            let start = align_up(r.start, align);
            let end = start.checked_add(size)?;
            if end > limit {
                return None;
            }
            if end > r.end {
                continue;
            }
            self.cut(i, start, end);
            return Some(start);
        }
        None
    }

    pub fn alloc_page(&mut self) -> Option<u64> {
        self.alloc(PAGE_SIZE, PAGE_SIZE)
    }

    /// Returns a range to the pool, merging with its neighbours.
    pub fn free_range(&mut self, start: u64, size: u64) {
        let end = start + size;
        let i = self.free.partition_point(|r| r.start < start);
        debug_assert!(
            i == 0 || self.free[i - 1].end <= start,
            "double free at {start:#x}"
        );
        debug_assert!(
            i == self.free.len() || end <= self.free[i].start,
            "double free at {start:#x}"
        );
        let merge_prev = i > 0 && self.free[i - 1].end == start;
        let merge_next = i < self.free.len() && self.free[i].start == end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.free[i - 1].end = self.free[i].end;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].end = end,
            (false, true) => self.free[i].start = start,
            (false, false) => self.free.insert(i, PhysRange { start, end }),
        }
    }

    /// Takes `[start, start + size)` out of the pool if all of it is free there (a ballooned page
    /// taken back onto its own frame).
    pub fn claim(&mut self, start: u64, size: u64) -> bool {
        let i = self.free.partition_point(|r| r.end <= start);
        let end = start + size;
        match self.free.get(i) {
            Some(r) if r.start <= start && end <= r.end => {
                self.cut(i, start, end);
                true
            }
            _ => false,
        }
    }

    /// Takes [start, end) out of free range `i`, which holds it: what is left of the range
    /// before and after it stays free.
    fn cut(&mut self, i: usize, start: u64, end: u64) {
        let r = self.free[i];
        let head = PhysRange {
            start: r.start,
            end: start,
        };
        let tail = PhysRange {
            start: end,
            end: r.end,
        };
        match (head.is_empty(), tail.is_empty()) {
            (true, true) => {
                self.free.remove(i);
            }
            (false, true) => self.free[i] = head,
            (true, false) => self.free[i] = tail,
            (false, false) => {
                self.free[i] = head;
                self.free.insert(i + 1, tail);
            }
        }
    }

    /// The largest block `alloc(.., align)` could hand out now.
    pub fn largest_block(&self, align: u64) -> u64 {
        self.free
            .iter()
            .map(|r| r.end.saturating_sub(align_up(r.start, align)))
            .max()
            .unwrap_or(0)
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|r| r.len()).sum()
    }

    pub fn total_bytes(&self) -> u64 {
        self.total
    }
}

fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn alloc_over(ranges: &[(u64, u64)]) -> FrameAllocator {
        let v: Vec<PhysRange> = ranges
            .iter()
            .map(|&(s, e)| PhysRange { start: s, end: e })
            .collect();
        FrameAllocator::new(&v)
    }

    #[test]
    fn pages_and_aligned_blocks() {
        let mut a = alloc_over(&[(0x1000, 0x9f000), (MB, 64 * MB)]);
        assert_eq!(a.total_bytes(), 0x9e000 + 63 * MB);
        let p = a.alloc_page().unwrap();
        assert_eq!(p, 0x1000);
        let big = a.alloc(16 * MB, 2 * MB).unwrap();
        assert_eq!(big % (2 * MB), 0);
        assert!(big >= MB && big + 16 * MB <= 64 * MB);
        // The gap left below the aligned block is still usable.
        let before = a.free_bytes();
        a.free_range(big, 16 * MB);
        assert_eq!(a.free_bytes(), before + 16 * MB);
        a.free_range(p, PAGE_SIZE);
        assert_eq!(a.free_bytes(), a.total_bytes());
        assert_eq!(a.free.len(), 2, "frees merge back into the original ranges");
    }

    #[test]
    fn below_a_limit() {
        let mut a = alloc_over(&[(MB, 64 * MB)]);
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, MB), None);
        let mut a = alloc_over(&[(0x8000, 0x9000), (0x9_f000, 0xa_0000), (MB, 64 * MB)]);
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, MB), Some(0x8000));
        assert_eq!(a.alloc_below(2 * PAGE_SIZE, PAGE_SIZE, MB), None);
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, MB), Some(0x9_f000));
        assert_eq!(a.alloc_below(PAGE_SIZE, PAGE_SIZE, MB), None);
        assert_eq!(a.alloc_page(), Some(MB));
    }

    #[test]
    fn claim_takes_a_given_frame_if_free() {
        let mut a = alloc_over(&[(MB, 4 * MB)]);
        assert!(a.claim(2 * MB, PAGE_SIZE));
        assert!(!a.claim(2 * MB, PAGE_SIZE), "taken already");
        assert!(!a.claim(8 * MB, PAGE_SIZE), "not in the pool");
        assert!(a.claim(MB, PAGE_SIZE) && a.claim(4 * MB - PAGE_SIZE, PAGE_SIZE));
        assert_eq!(a.free_bytes(), 3 * MB - 3 * PAGE_SIZE);
        assert_eq!(a.largest_block(PAGE_SIZE), 2 * MB - 2 * PAGE_SIZE);
        assert_eq!(
            a.largest_block(2 * MB),
            0,
            "no 2M-aligned start with room after it"
        );
        a.free_range(2 * MB, PAGE_SIZE);
        assert_eq!(a.largest_block(2 * MB), 2 * MB - PAGE_SIZE);
    }

    #[test]
    fn exhaustion_and_page_zero() {
        let mut a = alloc_over(&[(0, 3 * PAGE_SIZE)]);
        assert_eq!(a.alloc_page(), Some(PAGE_SIZE));
        assert_eq!(a.alloc_page(), Some(2 * PAGE_SIZE));
        assert_eq!(a.alloc_page(), None);
        assert_eq!(a.alloc(2 * MB, 2 * MB), None);
    }
}
