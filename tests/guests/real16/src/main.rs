//! real16: a flat 16-bit real-mode guest, all assembly (src/real16.s). Keel's flat loader enters
//! it at 0000:7C00 with interrupts off; it prints the standard lines through COM1 and exits via
//! port 0xf4 with 0x10. The first sector is also a BIOS boot sector that loads the rest of the
//! image, so `tests/guests/qemu-smoke.sh` can boot it in plain QEMU from a disk.
#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("real16.s"), options(att_syntax));

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
