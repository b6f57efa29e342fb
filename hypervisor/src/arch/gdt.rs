//! Keel's own GDT and TSS. The TSS carries separate interrupt stacks (IST) for #DF, NMI and #MC so
//! that those are reported even when the current stack is broken.

use spin::Lazy;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

pub const DOUBLE_FAULT_IST: u16 = 0;
pub const NMI_IST: u16 = 1;
pub const MACHINE_CHECK_IST: u16 = 2;
const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; IST_STACK_SIZE]);
static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK_SIZE]) }; 3];

static TSS: Lazy<TaskStateSegment> = Lazy::new(|| {
    let mut tss = TaskStateSegment::new();
    // The TSS is a packed struct, so its IST slots are written by index, not through references.
    #[allow(clippy::needless_range_loop)]
    for i in 0..3 {
        // SAFETY: only the address of the static stack is taken; the CPU is its only user.
        let base = unsafe { core::ptr::addr_of!(IST_STACKS[i]) } as u64;
        tss.interrupt_stack_table[i] = VirtAddr::new(base + IST_STACK_SIZE as u64);
    }
    tss
});

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static GDT: Lazy<(GlobalDescriptorTable, Selectors)> = Lazy::new(|| {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(&TSS));
    (gdt, Selectors { code, data, tss })
});

pub fn init() {
    GDT.0.load();
    let s = &GDT.1;
    // SAFETY: the selectors come from the GDT just loaded.
    unsafe {
        CS::set_reg(s.code);
        SS::set_reg(s.data);
        DS::set_reg(s.data);
        ES::set_reg(s.data);
        load_tss(s.tss);
    }
}

pub fn selectors() -> &'static Selectors {
    &GDT.1
}

/// (base, limit) of the GDT, for the VMCS host-state area.
pub fn gdt_base() -> u64 {
    let ptr = &GDT.0 as *const GlobalDescriptorTable;
    ptr as u64
}

pub fn tss_base() -> u64 {
    &*TSS as *const TaskStateSegment as u64
}
