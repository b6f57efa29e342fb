//! qk32: a multiboot test kernel written for QEMU (`qemu-system-x86_64 -kernel qk32.elf -initrd
//! "M1 args,M2" -append "..." -device isa-debug-exit,iobase=0xf4,iosize=4`), against what QEMU
//! and the Multiboot Specification 0.6.96 document and nothing of Keel's: tests/tests/
//! qemu_kernels.rs runs it under QEMU (TCG) and under Keel and compares what it prints.
//!
//! It loads at 1 MiB and keeps its descriptor tables and TSSs in low memory (0x2000-0x31ff), set
//! up before it reads the multiboot information; prints the command line, the info flags and
//! memory sizes, the memory map and each module (string, size, FNV-1a hash of its bytes); takes a
//! double fault through a task gate (a #GP whose IDT entry is not present gives #NP, and #NP on
//! top of #GP is #DF), reports from the #DF task, returns with IRET to the faulting task past the
//! instruction, checks the low tables are intact, reads the RTC and the PIT, probes for other CPUs
//! with INIT-SIPI-SIPI through the local APIC, and writes 0x2a to the isa-debug-exit port (status
//! 0x55).
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::fmt::{self, Write};

const EXIT_DONE: u8 = 0x2a;
const EXIT_FAILURE: u8 = 0x3e;
const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

/// Low-memory state: GDT, IDT, the main task's TSS and the #DF task's TSS, its stack below 0x7000.
const GDT: usize = 0x2000;
const IDT: usize = 0x2800;
const TSS_MAIN: usize = 0x3000;
const TSS_DF: usize = 0x3100;
const DF_STACK_TOP: u32 = 0x7000;
const SEL_CODE: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_TSS_MAIN: u16 = 0x18;
const SEL_TSS_DF: u16 = 0x20;
/// Descriptors: flat code and data (SDM Vol. 3A 3.4.5), 32-bit available TSSs of 104 bytes.
const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00cf_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    tss_descriptor(TSS_MAIN as u64),
    tss_descriptor(TSS_DF as u64),
];
const IDT_ENTRIES: usize = 32;

const fn tss_descriptor(base: u64) -> u64 {
    0x67 | ((base & 0xff_ffff) << 16) | (0x89 << 40) | ((base >> 24) << 56)
}

global_asm!(
    r#"
    .pushsection .multiboot, "a"
    .balign 4
    .long 0x1badb002
    .long 0x00000003
    .long -(0x1badb002 + 0x00000003)
    .popsection

    .pushsection .bss.stack, "aw", @nobits
    .balign 16
qk32_stack:
    .skip 0x4000
qk32_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    mov esp, offset qk32_stack_top
    push ebx
    push eax
    call {main}
    ud2

    // Loads a selector past the GDT's limit into DS: #GP. Its IDT entry is not present (#NP
    // while delivering #GP: a double fault), and the #DF task's IRET comes back to qk32_resume.
    .globl qk32_trigger
qk32_trigger:
    mov ax, 0x48
    .globl qk32_fault
qk32_fault:
    mov ds, ax
    .globl qk32_resume
qk32_resume:
    mov ax, 0x10
    mov ds, ax
    ret

    // The #DF task: its stack holds the error code.
    .globl qk32_df_entry
qk32_df_entry:
    pop eax
    push eax
    call {df}
    add esp, 4
    iretd
    jmp qk32_df_entry
    .popsection
"#,
    main = sym qk32_main,
    df = sym qk32_double_fault,
);

extern "C" {
    fn qk32_trigger();
    fn qk32_fault();
    fn qk32_resume();
    fn qk32_df_entry();
}

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the PC devices this kernel drives (COM1, RTC, PIT, debug exit).
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack)) }
    v
}

/// COM1, polled: wait for the transmit holding register to be empty (LSR bit 5).
struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            while inb(0x3fd) & 0x20 == 0 {}
            outb(0x3f8, b);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(Com1, "qk32: {}", format_args!($($t)*));
    }};
}

fn exit(code: u8) -> ! {
    outb(0xf4, code);
    loop {
        // SAFETY: halting with interrupts off; only reached if the exit port is missing.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    say!("panic");
    exit(EXIT_FAILURE)
}

fn read32(addr: usize) -> u32 {
    // SAFETY: paging is off; `addr` is a multiboot structure, a module or this kernel's own low
    // state, all in RAM.
    unsafe { (addr as *const u32).read_volatile() }
}

fn write32(addr: usize, v: u32) {
    // SAFETY: only this kernel's low state (0x2000-0x31ff) is written.
    unsafe { (addr as *mut u32).write_volatile(v) }
}

fn read64(addr: usize) -> u64 {
    u64::from(read32(addr)) | (u64::from(read32(addr + 4)) << 32)
}

fn write64(addr: usize, v: u64) {
    write32(addr, v as u32);
    write32(addr + 4, (v >> 32) as u32);
}

/// A NUL-terminated string of at most 256 bytes, non-ASCII bytes as '?'.
struct CStr(usize);

impl fmt::Display for CStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in 0..256 {
            // SAFETY: multiboot strings lie in RAM, NUL-terminated.
            let b = unsafe { ((self.0 + i) as *const u8).read_volatile() };
            if b == 0 {
                break;
            }
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            f.write_fmt(format_args!("{c}"))?;
        }
        Ok(())
    }
}

/// Offsets in the 32-bit TSS (SDM Vol. 3A Figure 8-2).
const TSS_LINK: usize = 0x00;
const TSS_EIP: usize = 0x20;
const TSS_EFLAGS: usize = 0x24;
const TSS_ESP: usize = 0x38;
const TSS_SEGMENTS: usize = 0x48;
const TSS_IOMAP: usize = 0x64;

fn setup_low_state() {
    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        write64(GDT + 8 * i, *d);
    }
    for i in 0..IDT_ENTRIES {
        write64(IDT + 8 * i, 0);
    }
    // Vector 8: a task gate (type 5, present, DPL 0) to the #DF task's TSS (SDM 6.11).
    write64(IDT + 8 * 8, (u64::from(SEL_TSS_DF) << 16) | (0x85 << 40));
    for tss in [TSS_MAIN, TSS_DF] {
        for off in (0..0x68).step_by(4) {
            write32(tss + off, 0);
        }
        write32(tss + TSS_IOMAP, 0x68 << 16);
    }
    write32(TSS_DF + TSS_EIP, qk32_df_entry as *const () as usize as u32);
    write32(TSS_DF + TSS_EFLAGS, 0x2);
    write32(TSS_DF + TSS_ESP, DF_STACK_TOP);
    for (i, sel) in [SEL_DATA, SEL_CODE, SEL_DATA, SEL_DATA, SEL_DATA, SEL_DATA]
        .into_iter()
        .enumerate()
    {
        write32(TSS_DF + TSS_SEGMENTS + 4 * i, u32::from(sel));
    }
    let gdtr: [u16; 3] = [(GDT_ENTRIES.len() * 8 - 1) as u16, GDT as u16, 0];
    let idtr: [u16; 3] = [(IDT_ENTRIES * 8 - 1) as u16, IDT as u16, 0];
    // SAFETY: the tables were just written; CS is reloaded with a far return to the same code.
    unsafe {
        asm!(
            "lgdt [{g}]",
            "lidt [{i}]",
            "push 0x08",
            "lea eax, [2f]",
            "push eax",
            "retf",
            "2:",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov fs, ax",
            "mov gs, ax",
            "mov ss, ax",
            "mov ax, 0x18",
            "ltr ax",
            g = in(reg) gdtr.as_ptr(),
            i = in(reg) idtr.as_ptr(),
            out("eax") _,
        );
    }
}

fn task_register() -> u16 {
    let tr: u16;
    // SAFETY: STR only reads TR.
    unsafe { asm!("str {0:x}", out(reg) tr, options(nomem, nostack)) };
    tr
}

fn eflags() -> u32 {
    let f: u32;
    // SAFETY: reads EFLAGS through the stack.
    unsafe { asm!("pushfd", "pop {}", out(reg) f) };
    f
}

fn cr0() -> u32 {
    let v: u32;
    // SAFETY: reading CR0 has no side effect.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Runs in the #DF task (SDM 8.3): reports, then points the faulting task past its instruction.
extern "C" fn qk32_double_fault(error_code: u32) {
    let link = read32(TSS_DF + TSS_LINK) as u16;
    say!(
        "double fault task: tr={:#x} link={:#x} error={:#x} nt={} ts={}",
        task_register(),
        link,
        error_code,
        (eflags() >> 14) & 1,
        (cr0() >> 3) & 1
    );
    let saved_eip = read32(TSS_MAIN + TSS_EIP);
    say!(
        "faulting task: eip at the fault={} cs={:#x} ds={:#x} busy={}",
        saved_eip == qk32_fault as *const () as usize as u32,
        read32(TSS_MAIN + TSS_SEGMENTS + 4),
        read32(TSS_MAIN + TSS_SEGMENTS + 12),
        (read64(GDT + usize::from(SEL_TSS_MAIN)) >> 41) & 1
    );
    write32(TSS_MAIN + TSS_EIP, qk32_resume as *const () as usize as u32);
}

/// FNV-1a, 32 bits.
fn fnv1a(start: usize, end: usize) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for a in start..end {
        // SAFETY: a module's bytes, in RAM.
        let b = unsafe { (a as *const u8).read_volatile() };
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h
}

fn print_info(info: usize) {
    let flags = read32(info);
    say!("flags={:#x}", flags);
    if flags & 1 != 0 {
        say!(
            "mem_lower={} mem_upper={}",
            read32(info + 4),
            read32(info + 8)
        );
    }
    if flags & (1 << 2) != 0 {
        say!("argv: {}", CStr(read32(info + 16) as usize));
    }
    if flags & (1 << 6) != 0 {
        let (len, addr) = (read32(info + 44) as usize, read32(info + 48) as usize);
        let mut e = addr;
        while e < addr + len {
            say!(
                "mmap {:#x} +{:#x} type {}",
                read64(e + 4),
                read64(e + 12),
                read32(e + 20)
            );
            e += read32(e) as usize + 4;
        }
    }
    if flags & (1 << 3) != 0 {
        let (count, mods) = (read32(info + 20) as usize, read32(info + 24) as usize);
        say!("modules={}", count);
        for i in 0..count.min(8) {
            let m = mods + 16 * i;
            let (start, end) = (read32(m) as usize, read32(m + 4) as usize);
            say!(
                "module '{}' size={} fnv={:#010x} page_aligned={}",
                CStr(read32(m + 8) as usize),
                end.wrapping_sub(start),
                fnv1a(start, end),
                start % 4096 == 0
            );
        }
    }
}

fn cmos(index: u8) -> u8 {
    outb(0x70, index);
    inb(0x71)
}

/// The RTC's time fields are valid in the format status register B gives (bit 2: binary).
fn check_rtc() {
    while cmos(0x0a) & 0x80 != 0 {}
    let binary = cmos(0x0b) & 0x04 != 0;
    let valid = |v: u8, max: u8| {
        if binary {
            v < max
        } else {
            v & 0xf < 10 && (v >> 4) * 10 + (v & 0xf) < max
        }
    };
    let (s, m, h) = (cmos(0x00), cmos(0x02), cmos(0x04) & 0x7f);
    say!(
        "rtc: time fields valid={}",
        valid(s, 60) && valid(m, 60) && valid(h, 24)
    );
}

/// PIT channel 0 in mode 2 from 0x10000: its latched count goes down.
fn check_pit() {
    outb(0x43, 0x34);
    outb(0x40, 0);
    outb(0x40, 0);
    let read = || {
        outb(0x43, 0x00);
        let lo = inb(0x40);
        let hi = inb(0x40);
        u16::from_le_bytes([lo, hi])
    };
    let first = read();
    let mut later = first;
    for _ in 0..100_000 {
        later = read();
        if later != first {
            break;
        }
    }
    say!("pit: counter moves={}", later != first);
}

/// The local APIC (SDM Vol. 3A 11.4, 11.6.1; QEMU's is at its reset base 0xFEE00000).
const APIC: usize = 0xfee0_0000;
const APIC_ID: usize = APIC + 0x20;
const APIC_VERSION: usize = APIC + 0x30;
const APIC_SVR: usize = APIC + 0xf0;
const APIC_ESR: usize = APIC + 0x280;
const APIC_ICR_LOW: usize = APIC + 0x300;
const APIC_ICR_HIGH: usize = APIC + 0x310;
/// ICR: all excluding self (19:18 = 11b), level assert (14), INIT (10:8 = 101b) or start-up
/// (110b) with vector 0x08 (the APs would start at 0x8000).
const INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
const SIPI_ALL_BUT_SELF: u32 = 0x000c_4608;
const ICR_BUSY: u32 = 1 << 12;
/// A real-mode AP entry at 0x8000 that would set this byte: `mov byte [0x7ff0], 1; cli; hlt`.
const AP_FLAG: usize = 0x7ff0;
const AP_TRAMPOLINE: [u8; 9] = [0xc6, 0x06, 0xf0, 0x7f, 0x01, 0xfa, 0xf4, 0xeb, 0xfd];

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR of an architectural MSR the CPU has (IA32_APIC_BASE, CPUID.1:EDX.APIC).
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writes IA32_APIC_BASE back with the value it had.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
            options(nomem, nostack))
    };
}

fn apic_read(addr: usize) -> u32 {
    // SAFETY: paging is off; the APIC page is MMIO, not RAM this kernel owns.
    unsafe { (addr as *const u32).read_volatile() }
}

fn apic_write(addr: usize, v: u32) {
    // SAFETY: as in `apic_read`.
    unsafe { (addr as *mut u32).write_volatile(v) }
}

/// A short wait between IPIs (the MP specification's INIT and SIPI delays on real hardware).
fn ipi_delay() {
    for _ in 0..200 {
        inb(0x80);
    }
}

/// The SMP probe of a kernel written for QEMU: IA32_APIC_BASE, the APIC's ID and version, then
/// INIT, SIPI, SIPI to all excluding self. With one CPU every command is accepted, the ICR reads
/// idle afterwards, no error is recorded and no AP runs the trampoline.
fn check_apic() {
    let base = rdmsr(0x1b);
    wrmsr(0x1b, base);
    say!(
        "apic: base={:#x} id={:#x} version={:#x}",
        rdmsr(0x1b),
        apic_read(APIC_ID),
        apic_read(APIC_VERSION)
    );
    for (i, b) in AP_TRAMPOLINE.iter().enumerate() {
        // SAFETY: 0x7ff0-0x8008 is free RAM below QEMU's multiboot structures (0x9000).
        unsafe { ((0x8000 + i) as *mut u8).write_volatile(*b) };
    }
    // SAFETY: as above.
    unsafe { (AP_FLAG as *mut u8).write_volatile(0) };
    apic_write(APIC_SVR, 0x1ff);
    apic_write(APIC_ESR, 0);
    let mut icr = [0u32; 3];
    for (i, command) in [INIT_ALL_BUT_SELF, SIPI_ALL_BUT_SELF, SIPI_ALL_BUT_SELF]
        .into_iter()
        .enumerate()
    {
        apic_write(APIC_ICR_HIGH, 0);
        apic_write(APIC_ICR_LOW, command);
        icr[i] = apic_read(APIC_ICR_LOW);
        ipi_delay();
    }
    apic_write(APIC_ESR, 0);
    let busy = icr.iter().any(|v| v & ICR_BUSY != 0);
    // SAFETY: as above.
    let started = unsafe { (AP_FLAG as *const u8).read_volatile() };
    say!(
        "apic: init-sipi-sipi icr={:#x},{:#x},{:#x} busy={} esr={:#x} aps started={}",
        icr[0],
        icr[1],
        icr[2],
        busy,
        apic_read(APIC_ESR),
        started
    );
}

extern "C" fn qk32_main(magic: u32, info: usize) -> ! {
    // Low state first: a loader that left its own structures at 0x2000 would lose them here.
    setup_low_state();
    say!("hello, magic={:#x}", magic);
    if magic != BOOTLOADER_MAGIC {
        exit(EXIT_FAILURE);
    }
    print_info(info);
    say!("double fault next: tr={:#x}", task_register());
    // SAFETY: qk32_trigger faults, and the #DF task returns to its end with the registers of
    // this task restored by the task switch.
    unsafe { qk32_trigger() };
    say!(
        "back in the main task: tr={:#x} nt={} df task busy={}",
        task_register(),
        (eflags() >> 14) & 1,
        (read64(GDT + usize::from(SEL_TSS_DF)) >> 41) & 1
    );
    // SAFETY: CLTS only clears CR0.TS, which the task switch set.
    unsafe { asm!("clts", options(nomem, nostack)) };
    let intact = GDT_ENTRIES
        .iter()
        .enumerate()
        .all(|(i, d)| read64(GDT + 8 * i) & !(0xf << 40) == d & !(0xf << 40));
    say!("low state at 0x2000 intact={}", intact);
    check_rtc();
    check_pit();
    check_apic();
    say!("done");
    exit(EXIT_DONE)
}
