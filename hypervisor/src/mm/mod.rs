//! Physical memory management: a range allocator over the machine's usable RAM, and the one place
//! that knows how Keel reaches physical memory (the bootloader maps all of it at a fixed offset).

pub mod frame;

pub use frame::{FrameAllocator, PAGE_SIZE};

use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// Keel's physical memory. Everything that needs frames (VMCS regions, EPT tables, guest RAM) takes
/// them from here.
pub static FRAMES: Mutex<FrameAllocator> = Mutex::new(FrameAllocator::empty());

static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);

pub fn set_phys_offset(offset: u64) {
    PHYS_OFFSET.store(offset, Ordering::Relaxed);
}

/// The virtual address at which Keel sees physical address `pa`.
pub fn phys_to_virt(pa: u64) -> *mut u8 {
    (PHYS_OFFSET.load(Ordering::Relaxed) + pa) as *mut u8
}

/// Allocates one zeroed 4 KiB frame. The caller owns it until it calls [`free_pages`]; prefer
/// [`OwnedPages`], which cannot forget to.
pub fn alloc_zeroed_page() -> Option<u64> {
    let pa = FRAMES.lock().alloc_page()?;
    // SAFETY: the frame was just allocated, so nothing else references it; the physical-memory
    // mapping covers all usable RAM.
    unsafe { core::ptr::write_bytes(phys_to_virt(pa), 0, PAGE_SIZE as usize) };
    Some(pa)
}

/// Gives `size` bytes at `pa` (allocated from [`FRAMES`]) back to the pool.
pub fn free_pages(pa: u64, size: u64) {
    FRAMES.lock().free_range(pa, size);
}

/// A block of physical memory that belongs to one value: dropping it gives the block back, so a
/// guest that fails half-way through its set-up (or is destroyed) cannot keep what it was given.
#[derive(Debug)]
pub struct OwnedPages {
    pa: u64,
    size: u64,
}

impl OwnedPages {
    /// `size` bytes aligned to `align` (both multiples of 4 KiB), contents as they were.
    pub fn alloc(size: u64, align: u64) -> Option<Self> {
        let pa = FRAMES.lock().alloc(size, align)?;
        Some(Self { pa, size })
    }

    /// One zeroed 4 KiB frame.
    pub fn zeroed_page() -> Option<Self> {
        Some(Self {
            pa: alloc_zeroed_page()?,
            size: PAGE_SIZE,
        })
    }

    pub fn pa(&self) -> u64 {
        self.pa
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The block's address and size, no longer given back on drop: the caller frees it (in parts,
    /// as ballooning does, `hypervisor::VmHw::release_ram`).
    pub fn into_raw(self) -> (u64, u64) {
        let this = core::mem::ManuallyDrop::new(self);
        (this.pa, this.size)
    }
}

impl Drop for OwnedPages {
    fn drop(&mut self) {
        free_pages(self.pa, self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::PhysRange;

    /// The only test that touches the global pool: it adds a range no host memory backs (nothing
    /// here writes through `phys_to_virt`) and checks that blocks come back on drop.
    #[test]
    fn owned_pages_go_back_on_drop() {
        const MB: u64 = 1 << 20;
        FRAMES.lock().add(&[PhysRange {
            start: 0x40_0000_0000,
            end: 0x40_0000_0000 + 64 * MB,
        }]);
        let free = || FRAMES.lock().free_bytes();
        let before = free();
        let big = OwnedPages::alloc(48 * MB, 2 * MB).expect("48 MiB of 64");
        assert_eq!(big.size(), 48 * MB);
        assert_eq!(big.pa() % (2 * MB), 0);
        assert_eq!(free(), before - 48 * MB);
        assert!(
            OwnedPages::alloc(48 * MB, 2 * MB).is_none(),
            "only 16 MiB left"
        );
        drop(big);
        assert_eq!(free(), before);
        let again = OwnedPages::alloc(48 * MB, 2 * MB).expect("the 48 MiB came back");
        assert_eq!(again.size(), 48 * MB);
    }
}
