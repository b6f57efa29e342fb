//! Keel's own page tables (the ones the bootloader built): translating addresses and mapping device
//! MMIO such as the local APIC, which the physical-memory mapping may not cover.

use crate::mm;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::mapper::{MapToError, Translate};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

fn mapper() -> OffsetPageTable<'static> {
    let offset = VirtAddr::new(mm::phys_to_virt(0) as u64);
    let (frame, _) = Cr3::read();
    // SAFETY: the bootloader maps all physical memory at `offset`, and Keel runs single-threaded
    // while it edits its tables.
    unsafe {
        let table = &mut *(offset + frame.start_address().as_u64()).as_mut_ptr::<PageTable>();
        OffsetPageTable::new(table, offset)
    }
}

struct Frames;

// SAFETY: frames come from Keel's allocator, which never hands out a frame twice.
unsafe impl FrameAllocator<Size4KiB> for Frames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        mm::alloc_zeroed_page().map(|pa| PhysFrame::containing_address(PhysAddr::new(pa)))
    }
}

/// The physical address `virt` maps to; `None` if it is unmapped or not canonical.
pub fn virt_to_phys(virt: u64) -> Option<u64> {
    mapper()
        .translate_addr(VirtAddr::try_new(virt).ok()?)
        .map(|p| p.as_u64())
}

/// Maps `size` bytes of device memory at `pa` uncached, at `phys_offset + pa`, and returns the
/// virtual address. Pages already mapped (for example by the physical-memory mapping) are kept.
pub fn map_mmio(pa: u64, size: u64) -> u64 {
    let mut m = mapper();
    let virt = mm::phys_to_virt(pa) as u64;
    let mut off = 0;
    while off < size {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt + off));
        let frame = PhysFrame::containing_address(PhysAddr::new(pa + off));
        let flags = PageTableFlags::PRESENT
            | PageTableFlags::WRITABLE
            | PageTableFlags::NO_CACHE
            | PageTableFlags::WRITE_THROUGH
            | PageTableFlags::NO_EXECUTE;
        // SAFETY: the frame is device memory that nothing else maps at this address.
        match unsafe { m.map_to(page, frame, flags, &mut Frames) } {
            Ok(flush) => flush.flush(),
            Err(MapToError::PageAlreadyMapped(_)) | Err(MapToError::ParentEntryHugePage) => {}
            Err(MapToError::FrameAllocationFailed) => {
                panic!("out of memory mapping MMIO at {pa:#x}")
            }
        }
        off += 4096;
    }
    virt
}

/// Maps the page at physical `pa` at virtual address `pa` as well (writable, executable), for
/// code that runs while paging is being turned on (an AP's start-up trampoline). Fails if that
/// virtual address already maps something else.
pub fn map_identity(pa: u64) -> Result<(), &'static str> {
    let mut m = mapper();
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(pa));
    match m.translate_addr(VirtAddr::new(pa)) {
        Some(p) if p.as_u64() == pa => return Ok(()),
        Some(_) => return Err("its virtual address is in use"),
        None => {}
    }
    let frame = PhysFrame::containing_address(PhysAddr::new(pa));
    // SAFETY: the virtual page is unused (checked above) and the frame belongs to the caller.
    match unsafe {
        m.map_to(
            page,
            frame,
            PageTableFlags::PRESENT | PageTableFlags::WRITABLE,
            &mut Frames,
        )
    } {
        Ok(flush) => {
            flush.flush();
            Ok(())
        }
        Err(MapToError::FrameAllocationFailed) => Err("no memory for page tables"),
        Err(_) => Err("a large page covers its virtual address"),
    }
}

/// Removes a mapping made by [`map_identity`].
pub fn unmap_identity(pa: u64) {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(pa));
    if let Ok((_, flush)) = mapper().unmap(page) {
        flush.flush();
    }
}
