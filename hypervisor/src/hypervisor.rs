//! The top of Keel on real hardware: bring the CPU into VMX operation, build the guests the ramdisk
//! asks for and run them until they have all ended.

use crate::arch::{self, lapic, vmx, ExitCode};
use crate::machine::MachineInfo;
use crate::{fatal, info};

/// Keel's own tick rate (Hz).
pub const TICK_HZ: u64 = 100;

pub fn run(machine: MachineInfo) -> ! {
    info!(
        "firmware {:?}, {} MiB usable RAM in {} ranges, ramdisk {}",
        machine.firmware,
        machine.usable_bytes() >> 20,
        machine.usable.len(),
        match machine.ramdisk {
            Some(r) => alloc::format!("{} KiB at {:#x}", r.len() >> 10, r.start),
            None => alloc::string::String::from("none"),
        }
    );
    report_cpu();
    let cal = lapic::init(TICK_HZ);
    info!(
        "LAPIC {} timer calibrated: TSC {} kHz, APIC timer {} kHz, tick {} Hz",
        lapic::id(),
        cal.tsc_hz / 1000,
        cal.apic_timer_hz / 1000,
        TICK_HZ
    );
    match vmx::enable() {
        Ok(region) => info!("VMXON ok (region at {region:#x})"),
        Err(e) => {
            fatal!("{e}");
            arch::exit(match e {
                vmx::EnableError::NoVmx => ExitCode::NoVmx,
                vmx::EnableError::DisabledInFirmware => ExitCode::VmxDisabledInFirmware,
                _ => ExitCode::VmxSetupFailed,
            })
        }
    }
    arch::exit(ExitCode::Completed)
}

fn report_cpu() {
    let id = raw_cpuid::CpuId::new();
    let vendor = id.get_vendor_info();
    let brand = id.get_processor_brand_string();
    let (family, model) = id
        .get_feature_info()
        .map(|f| (f.family_id(), f.model_id()))
        .unwrap_or((0, 0));
    info!(
        "CPU {} {} family {family:#x} model {model:#x}",
        vendor.as_ref().map(|v| v.as_str()).unwrap_or("?"),
        brand.as_ref().map(|b| b.as_str().trim()).unwrap_or("")
    );
}
