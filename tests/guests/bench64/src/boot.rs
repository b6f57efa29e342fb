//! bench64-boot: the BIOS boot sector of the bare benchmark image (`bench64-bare.img`, made by
//! build.sh). All assembly, in src/boot.s; see there for what it does.
#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
