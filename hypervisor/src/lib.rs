//! Keel: a bare-metal VT-x hypervisor.
//!
//! The crate has two halves. Everything that is *logic* (VMCS field and control computations, EPT
//! building, exit decoding and handlers, device models, the scheduler, loaders, the ramdisk format)
//! lives in modules that compile for the build host too, so `cargo test` exercises it against fakes
//! of the hardware. Only [`arch`] touches the machine, and it is compiled for the bare-metal target
//! alone. See docs/ARCHITECTURE.md for the map.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(target_os = "none", feature(abi_x86_interrupt))]

extern crate alloc;

pub mod abi;
pub mod acpi;
pub mod archive;
pub mod ata;
pub mod balloon;
pub mod bulk;
pub mod credit;
pub mod devices;
pub mod ept;
pub mod exits;
pub mod firmware;
pub mod focus;
pub mod gmem;
pub mod guest;
pub mod loader;
pub mod log;
pub mod machine;
pub mod manifest;
pub mod migrate;
pub mod mm;
pub mod mmio;
pub mod monitor;
pub mod policy;
pub mod runloop;
pub mod sched;
pub mod smp;
pub mod snapshot;
pub mod state;
pub mod ticket;
pub mod vcpu;
pub mod vcpu_state;
pub mod vmx;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod hypervisor;
