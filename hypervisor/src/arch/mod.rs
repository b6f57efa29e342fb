//! The thin hardware layer: everything that executes privileged instructions or touches physical
//! devices lives here and is compiled only for the bare-metal target. The rest of the crate sees it
//! through small traits (`vmx::VmcsAccess`, `ept::TableAlloc`, `log::Sink`) so it can be tested on
//! the build host.

pub mod ata;
pub mod boot;
pub mod com2;
pub mod cpu;
pub mod gdt;
pub mod host;
pub mod idt;
pub mod lapic;
pub mod paging;
pub mod serial;
pub mod smp;
pub mod vmcs;
pub mod vmx;

/// Why Keel stops the machine; the code is written to QEMU's isa-debug-exit port, so the emulator's
/// exit status is `(code << 1) | 1`. docs/BOOTING.md lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Every guest ran to its end.
    Completed = 0x00,
    NoVmx = 0x10,
    VmxDisabledInFirmware = 0x11,
    VmxSetupFailed = 0x12,
    NoGuests = 0x13,
    Panic = 0x1f,
    /// The operator's `quit` with no guest failed: the one success. Keel prints status 0;
    /// QEMU's isa-debug-exit cannot end with 0, so QEMU itself exits with 3 ((1 << 1) | 1).
    Quit = 0x01,
}

/// Ends the run: prints the status line the tools parse, then leaves the emulator (QEMU's
/// isa-debug-exit, then Bochs' shutdown port) and halts if neither is present (real hardware).
pub fn exit(code: ExitCode) -> ! {
    let status = ((code as u32) << 1) | 1;
    let status = if code == ExitCode::Quit { 0 } else { status };
    crate::info!("exit status {status}");
    serial::drain();
    // SAFETY: port writes to emulator debug devices; on real hardware these ports are unused.
    unsafe {
        cpu::outb(crate::abi::port::DEBUG_EXIT, code as u8);
        for b in b"Shutdown" {
            cpu::outb(0x8900, *b);
        }
    }
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
