//! platform32: a multiboot 1 kernel that reads the PC platform the way a kernel written for
//! `qemu-system-x86_64 -kernel` does, and prints what it finds, one fact per line: the ACPI tables
//! (RSDP found by scanning the BIOS area, every table's checksum, the MADT's entries, the FADT's
//! PM blocks, `\_S5` in the DSDT), the PM timer, PCI configuration mechanism #1, QEMU's fw_cfg and
//! the i8042. Then it powers the machine off the way such kernels end QEMU: `outw(0x604, 0x2000)`
//! (ACPI PM1a_CNT, SLP_EN with SLP_TYP 0); if that returns, it exits through port 0xf4 with 0x3f.
//!
//! With `reset=i8042` or `reset=cf9` on its command line it tests a reset instead: it leaves a
//! marker in CMOS RAM (index 0x40, battery-backed: it survives a reset on a PC, in QEMU and in
//! Keel), prints `resetting via X` and resets the machine through the i8042 (command 0xFE) or the
//! reset control register (0xCF9 = 6); booted again, it finds the marker, clears it, prints
//! `back from a reset via X` and exits through port 0xf4 with 0x15.
//!
//! It runs under QEMU TCG and under Keel; tests/guests/README.md ("platform32") lists which lines
//! agree between the two and which differ by design.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use guest_common::console::{c_str, Printable};
use guest_common::cpu::{self, inb, outb};
use guest_common::{say, EXIT_FAILURE};

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
platform32_stack:
    .skip 0x10000
platform32_stack_top:
    .popsection

    .pushsection .text.start, "ax"
    .globl _start
_start:
    mov esp, offset platform32_stack_top
    push ebx
    push eax
    call {main}
    ud2
    .popsection
"#,
    main = sym platform32_main,
);

fn outw(port: u16, v: u16) {
    // SAFETY: port I/O touches no memory.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) }
}

fn outl(port: u16, v: u32) {
    // SAFETY: port I/O touches no memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) }
}

fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port I/O touches no memory.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) }
    v
}

/// Physical memory, read as bytes (paging is off: addresses are physical).
fn byte(addr: u32) -> u8 {
    // SAFETY: the addresses read are the BIOS area and ACPI tables, RAM on both platforms.
    unsafe { (addr as usize as *const u8).read_volatile() }
}

fn u16_at(addr: u32) -> u16 {
    u16::from_le_bytes([byte(addr), byte(addr + 1)])
}

fn u32_at(addr: u32) -> u32 {
    u32::from_le_bytes([byte(addr), byte(addr + 1), byte(addr + 2), byte(addr + 3)])
}

fn bytes<const N: usize>(addr: u32) -> [u8; N] {
    core::array::from_fn(|i| byte(addr + i as u32))
}

fn sum(addr: u32, len: u32) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(byte(addr + i)))
}

/// The RSDP: "RSD PTR " on a 16-byte boundary in 0xE0000-0xFFFFF with a valid checksum.
fn find_rsdp() -> Option<u32> {
    (0xe_0000..0x10_0000)
        .step_by(16)
        .find(|&a| bytes::<8>(a) == *b"RSD PTR " && sum(a, 20) == 0)
}

/// Checks a table's checksum and prints its signature and length; returns its length.
fn table(addr: u32) -> u32 {
    let len = u32_at(addr + 4);
    let ok = if sum(addr, len) == 0 { "ok" } else { "BAD" };
    say!(
        "table {} len={} rev={} checksum {}",
        Printable(&bytes::<4>(addr)),
        len,
        byte(addr + 8),
        ok
    );
    len
}

struct Tables {
    fadt: Option<u32>,
    madt: Option<u32>,
}

fn acpi() -> Tables {
    let mut t = Tables {
        fadt: None,
        madt: None,
    };
    let Some(rsdp) = find_rsdp() else {
        say!("acpi rsdp not found");
        return t;
    };
    say!("acpi rsdp found");
    let rev = byte(rsdp + 15);
    say!(
        "acpi rsdp rev={} oem={}",
        rev,
        Printable(&bytes::<6>(rsdp + 9))
    );
    // ACPI 2.0+: the XSDT (its table addresses are 64 bits; these are under 4 GiB).
    let (root, entry) = if rev >= 2 && sum(rsdp, 36) == 0 && u32_at(rsdp + 28) == 0 {
        (u32_at(rsdp + 24), 8)
    } else {
        (u32_at(rsdp + 16), 4)
    };
    let len = table(root);
    for i in 0..(len.saturating_sub(36) / entry) {
        let at = u32_at(root + 36 + i * entry);
        table(at);
        match &bytes::<4>(at) {
            b"FACP" => t.fadt = Some(at),
            b"APIC" => t.madt = Some(at),
            _ => {}
        }
    }
    t
}

fn madt(at: u32) {
    say!(
        "madt lapic_addr={:#x} pcat_compat={}",
        u32_at(at + 36),
        u32_at(at + 40) & 1
    );
    let end = at + u32_at(at + 4);
    let mut e = at + 44;
    while e + 2 <= end && byte(e + 1) >= 2 {
        match byte(e) {
            0 => say!(
                "madt cpu uid={} apic_id={} enabled={}",
                byte(e + 2),
                byte(e + 3),
                u32_at(e + 4) & 1
            ),
            1 => say!(
                "madt ioapic id={} addr={:#x} gsi_base={}",
                byte(e + 2),
                u32_at(e + 4),
                u32_at(e + 8)
            ),
            2 => {
                let (irq, gsi) = (byte(e + 3), u32_at(e + 4));
                if irq == 0 {
                    say!("madt irq0 gsi={}", gsi);
                }
                say!(
                    "madt override irq={} gsi={} flags={:#x}",
                    irq,
                    gsi,
                    u16_at(e + 8)
                )
            }
            4 => say!("madt nmi uid={:#x} lint={}", byte(e + 2), byte(e + 5)),
            other => say!("madt entry type={}", other),
        }
        e += u32::from(byte(e + 1));
    }
}

/// `\_S5`'s first package element (SLP_TYPa) in the DSDT's AML, if it is there in the simple
/// form both QEMU and Keel write: NameOp "_S5_" PackageOp PkgLength NumElements element.
fn s5_slp_typ(dsdt: u32) -> Option<u8> {
    let len = u32_at(dsdt + 4);
    let at = (dsdt + 36..dsdt + len.saturating_sub(8)).find(|&a| bytes::<4>(a) == *b"_S5_")?;
    if byte(at - 1) != 0x08 || byte(at + 4) != 0x12 {
        return None;
    }
    // One-byte PkgLength (bits 7:6 = 0), then NumElements.
    let first = at + 7;
    match byte(first) {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a => Some(byte(first + 1)),
        _ => None,
    }
}

fn fadt(at: u32) -> u16 {
    let (evt, cnt, tmr) = (u32_at(at + 56), u32_at(at + 64), u32_at(at + 76));
    say!(
        "fadt sci={} pm1a_evt={:#x} pm1a_cnt={:#x} pm_tmr={:#x} pm_tmr_len={}",
        u16_at(at + 46),
        evt,
        cnt,
        tmr,
        byte(at + 91)
    );
    let flags = u32_at(at + 112);
    say!(
        "fadt flags={:#x} tmr_val_ext={} smi_cmd={:#x}",
        flags,
        flags >> 8 & 1,
        u32_at(at + 48)
    );
    if u32_at(at + 4) >= 129 && flags & (1 << 10) != 0 {
        say!(
            "fadt reset_reg space={} addr={:#x} value={:#x}",
            byte(at + 116),
            u32_at(at + 120),
            byte(at + 128)
        );
    }
    let dsdt = u32_at(at + 40);
    if dsdt != 0 {
        table(dsdt);
        match s5_slp_typ(dsdt) {
            Some(t) => say!("dsdt _S5 slp_typ={}", t),
            None => say!("dsdt _S5 not found"),
        }
    }
    say!("pm1 sci_en={}", inb(cnt as u16) & 1);
    tmr as u16
}

/// The PM timer advances (within a bounded number of reads).
fn pm_timer(port: u16) {
    let t0 = inl(port);
    let moved = (0..1_000_000).any(|_| inl(port) != t0);
    say!("pm timer advances={}", if moved { "yes" } else { "NO" });
}

/// Waits one second by the ACPI PM timer (3.579545 MHz, 24 bits) before a power-off or reset is
/// called failed. QEMU acts on both from its main loop, not at the write itself, so a vCPU can
/// run on for a moment after the write; a machine that really ignored it runs on for the second.
fn settle() {
    const PM_TMR: u16 = 0x608;
    const ONE_SECOND: u32 = 3_579_545;
    let mut last = inl(PM_TMR) & 0xff_ffff;
    let mut waited = 0u32;
    while waited < ONE_SECOND {
        let now = inl(PM_TMR) & 0xff_ffff;
        waited += now.wrapping_sub(last) & 0xff_ffff;
        last = now;
    }
}

fn pci_read(bus: u32, dev: u32, func: u32, reg: u32) -> u32 {
    outl(0xcf8, 1 << 31 | bus << 16 | dev << 11 | func << 8 | reg);
    inl(0xcfc)
}

fn pci() {
    outl(0xcf8, 0x8000_0000);
    say!("pci conf1 address={:#x}", inl(0xcf8));
    let id = pci_read(0, 0, 0, 0);
    let class = pci_read(0, 0, 0, 8) >> 8;
    say!(
        "pci 00:00.0 id={:04x}:{:04x} class={:06x}",
        id & 0xffff,
        id >> 16,
        class
    );
    say!("pci 00:1f.0 id={:08x}", pci_read(0, 31, 0, 0));
    say!("pci 01:00.0 id={:08x}", pci_read(1, 0, 0, 0));
}

fn fw_cfg_read(key: u16, out: &mut [u8]) {
    outw(0x510, key);
    for b in out {
        *b = inb(0x511);
    }
}

fn fw_cfg() {
    let mut sig = [0u8; 4];
    fw_cfg_read(0x00, &mut sig);
    say!("fw_cfg signature={}", Printable(&sig));
    let mut v = [0u8; 8];
    fw_cfg_read(0x01, &mut v[..4]);
    say!("fw_cfg id={}", u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
    fw_cfg_read(0x05, &mut v[..2]);
    say!("fw_cfg cpus={}", u16::from_le_bytes([v[0], v[1]]));
    fw_cfg_read(0x0f, &mut v[..2]);
    say!("fw_cfg max_cpus={}", u16::from_le_bytes([v[0], v[1]]));
    fw_cfg_read(0x03, &mut v);
    say!("fw_cfg ram={}", u64::from_le_bytes(v));
    fw_cfg_read(0x19, &mut v[..4]);
    say!(
        "fw_cfg files={}",
        u32::from_be_bytes([v[0], v[1], v[2], v[3]])
    );
}

/// Waits for the i8042's output buffer and reads it (None after a bounded wait).
fn i8042_read() -> Option<u8> {
    (0..100_000).find(|_| inb(0x64) & 1 != 0).map(|_| inb(0x60))
}

fn i8042_command(cmd: u8) -> Option<u8> {
    outb(0x64, cmd);
    i8042_read()
}

fn hex(v: Option<u8>) -> u32 {
    v.map_or(0x100, u32::from)
}

fn i8042() {
    while inb(0x64) & 1 != 0 {
        inb(0x60);
    }
    say!("i8042 selftest={:02x}", hex(i8042_command(0xaa)));
    say!("i8042 kbd_test={:02x}", hex(i8042_command(0xab)));
    // Disable the keyboard's interrupt (nothing here takes it), then reset the keyboard.
    let ctr = i8042_command(0x20).unwrap_or(0);
    outb(0x64, 0x60);
    outb(0x60, ctr & !3);
    outb(0x60, 0xff);
    let (ack, bat) = (i8042_read(), i8042_read());
    say!("i8042 kbd_reset={:02x} {:02x}", hex(ack), hex(bat));
}

/// Exit code after a reset came back.
const EXIT_RESET_DONE: u8 = 0x15;
/// The CMOS RAM byte the reset test marks, and the marker.
const CMOS_MARK: u8 = 0x40;
const MARK: u8 = 0xa5;

fn cmos_write(index: u8, v: u8) {
    outb(0x70, index);
    outb(0x71, v);
}

fn cmos_read(index: u8) -> u8 {
    outb(0x70, index);
    inb(0x71)
}

/// The multiboot command line (multiboot spec 3.3: flags bit 2, `cmdline` at offset 16).
fn cmdline(magic: u32, info: u32) -> &'static [u8] {
    if magic != 0x2bad_b002 || u32_at(info) & (1 << 2) == 0 {
        return &[];
    }
    // SAFETY: the loader's NUL-terminated command line, left alone (paging is off).
    unsafe { c_str(u32_at(info + 16) as usize as *const u8, 4096) }
}

/// The `reset=` test; does not return.
fn reset_test(via: &[u8]) -> ! {
    let via = Printable(via);
    if cmos_read(CMOS_MARK) == MARK {
        cmos_write(CMOS_MARK, 0);
        say!("back from a reset via {}", via);
        cpu::exit(EXIT_RESET_DONE);
    }
    cmos_write(CMOS_MARK, MARK);
    say!("resetting via {}", via);
    match via.0 {
        b"i8042" => outb(0x64, 0xfe),
        b"cf9" => outb(0xcf9, 0x06),
        _ => say!("unknown reset method"),
    }
    settle();
    say!("still running after the reset");
    cmos_write(CMOS_MARK, 0);
    cpu::exit(EXIT_FAILURE)
}

extern "C" fn platform32_main(magic: u32, info: u32) -> ! {
    guest_common::checks::init("platform32");
    say!("hello from protected mode");
    let line = cmdline(magic, info);
    if let Some(at) = line.windows(6).position(|w| w == b"reset=") {
        let rest = &line[at + 6..];
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        reset_test(&rest[..end]);
    }
    let t = acpi();
    if let Some(m) = t.madt {
        madt(m);
    }
    if let Some(f) = t.fadt {
        let tmr = fadt(f);
        pm_timer(tmr);
    }
    pci();
    fw_cfg();
    i8042();
    say!("powering off");
    outw(0x604, 0x2000);
    settle();
    say!("still running after ACPI power-off");
    cpu::exit(EXIT_FAILURE)
}
