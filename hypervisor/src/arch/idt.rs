//! Keel's IDT: every CPU exception prints what happened and halts (a fault in Keel is a Keel bug);
//! the LAPIC timer, kick and spurious vectors and the NMI (a kick, `arch::smp::kick`) have real
//! handlers.

use super::{cpu, gdt, lapic};
use spin::Lazy;
use x86_64::registers::rflags::RFlags;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

pub const TIMER_VECTOR: u8 = 0x30;
/// The IPI that wakes a CPU from its idle HLT (`arch::smp::kick`).
pub const KICK_VECTOR: u8 = 0x31;
pub const SPURIOUS_VECTOR: u8 = 0xff;

fn report(name: &str, error: Option<u64>, frame: &InterruptStackFrame) -> ! {
    // SAFETY: we are about to halt; nothing else will use the logger's lock holder.
    unsafe { crate::log::force_unlock() };
    crate::fatal!("CPU exception in Keel: {name}");
    if let Some(e) = error {
        crate::fatal!("  error code {e:#x}");
    }
    crate::fatal!(
        "  rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} ss {:#x}",
        frame.instruction_pointer.as_u64(),
        frame.code_segment.0,
        frame.cpu_flags.bits(),
        frame.stack_pointer.as_u64(),
        frame.stack_segment.0
    );
    crate::fatal!(
        "  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x}",
        cpu::read_cr0(),
        cpu::read_cr2(),
        cpu::read_cr3(),
        cpu::read_cr4()
    );
    super::exit(super::ExitCode::Panic)
}

macro_rules! plain {
    ($name:ident, $text:expr) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame) {
            report($text, None, &frame)
        }
    };
}
macro_rules! with_code {
    ($name:ident, $text:expr) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame, code: u64) {
            report($text, Some(code), &frame)
        }
    };
}

plain!(divide_error, "#DE divide error");
plain!(debug, "#DB debug");
plain!(breakpoint, "#BP breakpoint");
plain!(overflow, "#OF overflow");
plain!(bound_range, "#BR bound range exceeded");
plain!(invalid_opcode, "#UD invalid opcode");
plain!(device_not_available, "#NM device not available");
with_code!(invalid_tss, "#TS invalid TSS");
with_code!(segment_not_present, "#NP segment not present");
with_code!(stack_segment, "#SS stack-segment fault");
with_code!(general_protection, "#GP general protection");
plain!(x87, "#MF x87 floating point");
with_code!(alignment_check, "#AC alignment check");
plain!(simd, "#XM SIMD floating point");
plain!(virtualization, "#VE virtualization exception");
with_code!(control_protection, "#CP control protection");

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, code: u64) -> ! {
    report("#DF double fault", Some(code), &frame)
}
extern "x86-interrupt" fn machine_check(frame: InterruptStackFrame) -> ! {
    report("#MC machine check", None, &frame)
}
extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    report("#PF page fault (address in cr2)", Some(code.bits()), &frame)
}
extern "x86-interrupt" fn timer(_frame: InterruptStackFrame) {
    lapic::on_timer_interrupt();
}
extern "x86-interrupt" fn spurious(_frame: InterruptStackFrame) {}
/// HLT's opcode.
const HLT: u8 = 0xf4;

/// An NMI in Keel: a kick from another CPU (`arch::smp::kick`), on its own IST stack, made a
/// pending fixed self-IPI. One that came between the STI and the HLT of an `sti; hlt` (the STI
/// shadow may or may not hold NMIs back, SDM Vol. 2B "STI") would return to the HLT with the
/// self-IPI taken first and the CPU then asleep with its kick spent: the return goes past the
/// HLT instead, as the kick's wake-up would have. Every HLT of Keel with interrupts on is such a
/// sleep, and its caller looks again at what woke it.
extern "x86-interrupt" fn nmi(mut frame: InterruptStackFrame) {
    super::smp::on_kick_nmi();
    let rip = frame.instruction_pointer;
    // SAFETY: `rip` is where Keel was interrupted: an instruction of Keel's own code, mapped.
    let at_hlt = unsafe { rip.as_ptr::<u8>().read_volatile() } == HLT;
    if at_hlt && frame.cpu_flags.contains(RFlags::INTERRUPT_FLAG) {
        // SAFETY: the return address moves past a one-byte HLT to the next instruction.
        unsafe {
            frame
                .as_mut()
                .update(|f| f.instruction_pointer = rip + 1u64)
        };
    }
}
extern "x86-interrupt" fn kick(_frame: InterruptStackFrame) {
    super::smp::on_kick();
}

static IDT: Lazy<InterruptDescriptorTable> = Lazy::new(|| {
    let mut idt = InterruptDescriptorTable::new();
    idt.divide_error.set_handler_fn(divide_error);
    idt.debug.set_handler_fn(debug);
    idt.breakpoint.set_handler_fn(breakpoint);
    idt.overflow.set_handler_fn(overflow);
    idt.bound_range_exceeded.set_handler_fn(bound_range);
    idt.invalid_opcode.set_handler_fn(invalid_opcode);
    idt.device_not_available
        .set_handler_fn(device_not_available);
    idt.invalid_tss.set_handler_fn(invalid_tss);
    idt.segment_not_present.set_handler_fn(segment_not_present);
    idt.stack_segment_fault.set_handler_fn(stack_segment);
    idt.general_protection_fault
        .set_handler_fn(general_protection);
    idt.page_fault.set_handler_fn(page_fault);
    idt.x87_floating_point.set_handler_fn(x87);
    idt.alignment_check.set_handler_fn(alignment_check);
    idt.simd_floating_point.set_handler_fn(simd);
    idt.virtualization.set_handler_fn(virtualization);
    idt.cp_protection_exception
        .set_handler_fn(control_protection);
    // SAFETY: the IST indices name stacks that gdt::init installed in the TSS.
    unsafe {
        idt.double_fault
            .set_handler_fn(double_fault)
            .set_stack_index(gdt::DOUBLE_FAULT_IST);
        idt.non_maskable_interrupt
            .set_handler_fn(nmi)
            .set_stack_index(gdt::NMI_IST);
        idt.machine_check
            .set_handler_fn(machine_check)
            .set_stack_index(gdt::MACHINE_CHECK_IST);
    }
    idt[TIMER_VECTOR].set_handler_fn(timer);
    idt[SPURIOUS_VECTOR].set_handler_fn(spurious);
    idt[KICK_VECTOR].set_handler_fn(kick);
    idt
});

pub fn init() {
    IDT.load();
}

pub fn idt_base() -> u64 {
    &*IDT as *const InterruptDescriptorTable as u64
}
