//! Each CPU's own GDT and TSS. The TSS carries separate interrupt stacks (IST) for #DF, NMI and #MC
//! so that those are reported even when the current stack is broken. Every CPU's GDT has the same
//! layout, so the selectors are the same everywhere; the TSS (and its stacks) is per CPU, as a
//! busy TSS cannot be shared (SDM Vol. 3A 8.2.2).
//!
//! The boot CPU's tables are static (they are loaded before Keel has a heap); an AP's are built
//! by [`CpuTables::for_ap`] before it is started.

use crate::mm;
use alloc::boxed::Box;
use core::arch::asm;
use spin::Lazy;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

pub const DOUBLE_FAULT_IST: u16 = 0;
pub const NMI_IST: u16 = 1;
pub const MACHINE_CHECK_IST: u16 = 2;
const IST_COUNT: usize = 3;
const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; IST_STACK_SIZE]);
static mut BOOT_IST_STACKS: [Stack; IST_COUNT] = [const { Stack([0; IST_STACK_SIZE]) }; IST_COUNT];

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

/// One CPU's descriptor tables.
pub struct CpuTables {
    gdt: GlobalDescriptorTable,
    selectors: Selectors,
    tss: &'static TaskStateSegment,
}

impl CpuTables {
    fn new(tss: &'static TaskStateSegment) -> Self {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        Self {
            gdt,
            selectors: Selectors {
                code,
                data,
                tss: tss_sel,
            },
            tss,
        }
    }

    /// Tables for an AP, with IST stacks from the frame allocator. They live as long as Keel.
    pub fn for_ap() -> Option<&'static Self> {
        let size = (IST_COUNT * IST_STACK_SIZE) as u64;
        let pa = mm::FRAMES.lock().alloc(size, mm::PAGE_SIZE)?;
        let base = mm::phys_to_virt(pa) as u64;
        let tss = Box::leak(Box::new(tss_with_stacks(|i| {
            base + ((i + 1) * IST_STACK_SIZE) as u64
        })));
        Some(Box::leak(Box::new(Self::new(tss))))
    }

    /// Loads these tables on the calling CPU: GDTR, the segment registers, TR.
    pub fn load(&'static self) {
        self.gdt.load();
        let s = &self.selectors;
        // SAFETY: the selectors come from the GDT just loaded; its TSS descriptor is not busy
        // (each CPU loads its own tables once).
        unsafe {
            CS::set_reg(s.code);
            SS::set_reg(s.data);
            DS::set_reg(s.data);
            ES::set_reg(s.data);
            load_tss(s.tss);
        }
    }

    pub fn tss_base(&self) -> u64 {
        self.tss as *const TaskStateSegment as u64
    }
}

/// A TSS whose IST slot `i` points at `top(i)`.
fn tss_with_stacks(top: impl Fn(usize) -> u64) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    // The TSS is a packed struct, so its IST slots are written by index, not through references.
    #[allow(clippy::needless_range_loop)]
    for i in 0..IST_COUNT {
        tss.interrupt_stack_table[i] = VirtAddr::new(top(i));
    }
    tss
}

static BOOT_TSS: Lazy<TaskStateSegment> = Lazy::new(|| {
    tss_with_stacks(|i| {
        // SAFETY: only the address of the static stack is taken; the boot CPU is its only user.
        let base = unsafe { core::ptr::addr_of!(BOOT_IST_STACKS[i]) } as u64;
        base + IST_STACK_SIZE as u64
    })
});

static BOOT_TABLES: Lazy<CpuTables> = Lazy::new(|| CpuTables::new(&BOOT_TSS));

/// Loads the boot CPU's tables.
pub fn init() {
    boot_tables().load();
}

pub fn boot_tables() -> &'static CpuTables {
    &BOOT_TABLES
}

/// The selectors, the same on every CPU.
pub fn selectors() -> &'static Selectors {
    &BOOT_TABLES.selectors
}

/// The calling CPU's GDT base (SGDT), for the VMCS host-state area.
pub fn gdt_base() -> u64 {
    x86_64::instructions::tables::sgdt().base.as_u64()
}

/// The calling CPU's TSS base, for the VMCS host-state area: read from the TSS descriptor that TR
/// selects in the current GDT (SDM Vol. 3A 8.2.3: a 16-byte system descriptor in IA-32e mode).
pub fn tss_base() -> u64 {
    let tr: u16;
    // SAFETY: STR only reads the task register.
    unsafe { asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    let at = gdt_base() + u64::from(tr & !7);
    // SAFETY: TR selects a TSS descriptor of the loaded GDT (set by `CpuTables::load`), which
    // lives as long as Keel; its 16 bytes are readable.
    let d: [u8; 16] = unsafe { (at as *const [u8; 16]).read_unaligned() };
    let low =
        u64::from(d[2]) | u64::from(d[3]) << 8 | u64::from(d[4]) << 16 | u64::from(d[7]) << 24;
    let high = u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]]));
    low | high << 32
}
