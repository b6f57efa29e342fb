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

/// Allocates one zeroed 4 KiB frame.
pub fn alloc_zeroed_page() -> Option<u64> {
    let pa = FRAMES.lock().alloc_page()?;
    // SAFETY: the frame was just allocated, so nothing else references it; the physical-memory
    // mapping covers all usable RAM.
    unsafe { core::ptr::write_bytes(phys_to_virt(pa), 0, PAGE_SIZE as usize) };
    Some(pa)
}
