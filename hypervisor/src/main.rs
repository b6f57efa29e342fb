//! Keel's kernel entry point. On the build host this file compiles to an empty program so that
//! `cargo test`/`cargo build` of the workspace work; the real kernel is built for
//! `x86_64-unknown-none` (see docs/BOOTING.md).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("keel is a bare-metal kernel: build it with `cargo kernel` and run it with `cargo keel run`");
}

#[cfg(target_os = "none")]
mod kernel {
    use bootloader_api::config::{BootloaderConfig, Mapping};
    use bootloader_api::{entry_point, BootInfo};
    use keel::arch::{self, ExitCode};
    use keel::{fatal, info};

    pub static BOOTLOADER_CONFIG: BootloaderConfig = {
        let mut config = BootloaderConfig::new_default();
        config.mappings.physical_memory = Some(Mapping::Dynamic);
        config.kernel_stack_size = 256 * 1024;
        config
    };

    entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

    fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
        arch::serial::init();
        info!("Keel {} starting", env!("CARGO_PKG_VERSION"));
        arch::gdt::init();
        arch::idt::init();
        let machine = match arch::boot::machine_from_boot_info(boot_info) {
            Ok(m) => m,
            Err(e) => {
                fatal!("{e}");
                arch::exit(ExitCode::NoGuests)
            }
        };
        keel::hypervisor::run(machine)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        // SAFETY: Keel stops after this; nothing else will take the log lock.
        unsafe { keel::log::force_unlock() };
        match info.location() {
            Some(l) => fatal!("PANIC at {}:{}: {}", l.file(), l.line(), info.message()),
            None => fatal!("PANIC: {}", info.message()),
        }
        arch::exit(ExitCode::Panic)
    }
}
