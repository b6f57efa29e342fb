//! A test bed for the exit handlers: a fake VMCS, a guest with a little RAM and a fake host CPU.

use super::{apply, dispatch, Action, ExitContext, Host};
use crate::devices::Platform;
use crate::guest::{GuestRam, Vcpu, Vm};
use crate::vmx::VmxCaps;
use crate::vmx::{
    ExitReason, FakeVmcs, Guest32, ReadOnly32, ReadOnlyNat, Vmcs, VmcsAccess, VmcsField,
};
use alloc::string::String;

/// A small xorshift generator for randomized tests: the same pseudo-random sequences on every
/// run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (not 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub struct FakeHost {
    /// Leaves that answer differently from [`FakeHost::cpuid`]'s defaults: (leaf, subleaf).
    pub leaves: alloc::vec::Vec<((u32, u32), [u32; 4])>,
    pub interrupts: alloc::vec::Vec<u8>,
    pub nmis: u32,
    pub cr2: u64,
    /// The guest's DR0-DR3.
    pub dr: [u64; 4],
}

impl Host for FakeHost {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        if let Some(&(_, v)) = self.leaves.iter().find(|(k, _)| *k == (leaf, subleaf)) {
            return v;
        }
        match (leaf, subleaf) {
            // A CPU with every leaf-7 and XSAVE feature, so that the tests see each one Keel
            // hides or keeps.
            (7, 0) => return [2, u32::MAX, u32::MAX, u32::MAX],
            (7, 1) | (7, 2) => return [u32::MAX; 4],
            // x87, SSE, AVX, MPX (3, 4), AVX-512.
            (0xd, 0) => return [0xff, 0x340, 0xa80, 0],
            // XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD; supervisor states PT (8) and CET (11, 12).
            (0xd, 1) => return [0x1f, 0x340, 0x1900, 0],
            // LAHF, LZCNT, PREFETCHW; SYSCALL, NX, 1-GiB pages, RDTSCP, LM.
            (0x8000_0001, 0) => return [0, 0, 0x121, 0x2c10_0800],
            _ => {}
        }
        match leaf {
            // Bochs' corei7_skylake_x leaf 1 (PLATFORM.md): VMX set, plus x2APIC and MONITOR, and OSXSAVE as Keel's own CR4 has it.
            1 => [0x50654, 0x0001_0800, 0x7ffa_f3bf, 0xbfeb_fbff],
            4 => [0x1c00_4121, 0x01c0_003f, 0x3f, 0],
            // 39 physical and 48 linear address bits.
            0x8000_0008 => [0x3027, 0, 0, 0],
            _ => [leaf ^ 0x5a5a, subleaf, leaf, 7],
        }
    }
    fn xcr0_supported(&self) -> u64 {
        0xff
    }
    fn host_interrupt(&mut self, vector: u8) {
        self.interrupts.push(vector);
    }
    fn host_nmi(&mut self) {
        self.nmis += 1;
    }
    fn set_guest_cr2(&mut self, value: u64) {
        self.cr2 = value;
    }
    fn breakpoint_addresses(&self) -> [u64; 4] {
        self.dr
    }
}

pub struct TestBed {
    pub vmcs: FakeVmcs,
    pub vcpu: Vcpu,
    pub vm: Vm,
    pub host: FakeHost,
}

/// A vCPU of the guest the bed is not running now ([`TestBed::swap`]).
pub struct Sibling {
    pub vmcs: FakeVmcs,
    pub vcpu: Vcpu,
}

/// A TSC deadline the LAPIC timer tests write at `now` (`value` picks): disarmed, passed, or
/// up to 4,000 ticks ahead.
pub fn random_deadline(value: u64, now: u64) -> u64 {
    match value % 4 {
        0 => 0,
        1 => now.saturating_sub(value >> 40),
        _ => now + (value >> 20) % 4000,
    }
}

pub const TEST_RAM: usize = 1 << 20;
pub const TEST_TSC_HZ: u64 = 10_000_000;

impl TestBed {
    /// The run loop's short way after a preemption-timer exit for the LAPIC timer's `shot`
    /// (`runloop::run_piece`): the checks, then the post at `now`.
    pub fn fire_timer(&mut self, now: u64, shot: &crate::devices::TimerShot) -> bool {
        super::apicv::timer_may_fire(&self.vmcs, &self.vcpu, &self.vm)
            && super::apicv::fire_timer_now(&mut self.vmcs, &mut self.vcpu, &mut self.vm, now, shot)
    }

    pub fn new() -> Self {
        let mem: &'static mut [u8] = alloc::vec![0u8; TEST_RAM].leak();
        let vm = Vm {
            id: 3,
            name: String::from("test"),
            // SAFETY: the leaked buffer belongs to this test alone.
            ram: unsafe { GuestRam::new(mem, 0x100_0000) },
            platform: Platform::new(TEST_TSC_HZ),
            stats_requested: false,
            tsc_offset: 0,
            clock_seen: 0,
            cpuid: Default::default(),
        };
        let vcpu = Vcpu::new(0, &VmxCaps::bochs_skylake_x());
        Self {
            vmcs: FakeVmcs::new(),
            vcpu,
            vm,
            host: FakeHost {
                leaves: alloc::vec::Vec::new(),
                interrupts: alloc::vec::Vec::new(),
                nmis: 0,
                cr2: 0,
                dr: [0; 4],
            },
        }
    }

    /// A guest with `cpus` vCPUs (local APICs 0..cpus-1); the bed runs vCPU 0, and
    /// [`TestBed::swap`] runs another in its place.
    pub fn smp(cpus: u8) -> Self {
        let mut t = Self::new();
        t.vm.platform = Platform::for_board(crate::devices::board::Board::pc(0, cpus), TEST_TSC_HZ);
        t
    }

    /// vCPU `index` of the guest, with its own VMCS, for [`TestBed::swap`].
    pub fn sibling(index: usize) -> Sibling {
        Sibling {
            vmcs: FakeVmcs::new(),
            vcpu: Vcpu::new(index, &VmxCaps::bochs_skylake_x()),
        }
    }

    /// The bed runs `s`'s vCPU from now on (`run`, `enter` and the helpers act for it), and `s`
    /// holds the one it ran.
    pub fn swap(&mut self, s: &mut Sibling) {
        core::mem::swap(&mut self.vmcs, &mut s.vmcs);
        core::mem::swap(&mut self.vcpu, &mut s.vcpu);
    }

    /// Marks the guest as running 64-bit code: IA-32e mode (CR0.PE and PG, EFER.LME and LMA)
    /// and CS.L (SDM 3.4.5: CS.L counts only in IA-32e mode).
    pub fn long_mode(&mut self) {
        use crate::vmx::{Guest64, GuestNat};
        let cr0 = self.vmcs.read(GuestNat::Cr0);
        self.vmcs.write(GuestNat::Cr0, cr0 | 1 | 1 << 31);
        let efer = self.vmcs.read(Guest64::Ia32Efer);
        self.vmcs.write(Guest64::Ia32Efer, efer | 1 << 8 | 1 << 10);
        self.vmcs.write(Guest32::CsAccessRights, 0xa09b);
    }

    /// Marks the guest as running real-mode code (unrestricted guest, CR0.PE = 0) at CS base
    /// `cs_base`, IP `ip`.
    pub fn real_mode(&mut self, cs_base: u64, ip: u64) {
        use crate::vmx::GuestNat;
        self.vmcs.write(GuestNat::Cr0, 0x10);
        self.vmcs.write(GuestNat::Rflags, 2);
        self.vmcs.write(GuestNat::CsBase, cs_base);
        self.vmcs.write(Guest32::CsAccessRights, 0x9b);
        self.vmcs.write(GuestNat::Rip, ip);
    }

    pub fn set_qualification(&mut self, q: u64) {
        self.vmcs
            .write_raw(ReadOnlyNat::ExitQualification.encoding(), q);
    }

    pub fn set_instruction_length(&mut self, len: u32) {
        self.vmcs
            .write_raw(ReadOnly32::ExitInstructionLength.encoding(), len as u64);
    }

    pub fn set_instruction_info(&mut self, info: u32) {
        self.vmcs
            .write_raw(ReadOnly32::ExitInstructionInfo.encoding(), info as u64);
    }

    /// Simulates one exit of the given reason: dispatch, then apply the action.
    pub fn run(&mut self, reason: ExitReason) -> Action {
        // SDM 25.8.3: every VM exit clears the valid bit of the VM-entry interruption information.
        let entry = self.vmcs.read(crate::vmx::Control32::EntryInterruptionInfo);
        self.vmcs.write_raw(
            crate::vmx::Control32::EntryInterruptionInfo.encoding(),
            (entry & !(1 << 31)) as u64,
        );
        self.vmcs
            .write_raw(ReadOnly32::ExitReason.encoding(), reason.number() as u64);
        let mut cx = ExitContext {
            vmcs: &mut self.vmcs,
            vcpu: &mut self.vcpu,
            vm: &mut self.vm,
            host: &mut self.host,
            now: 0,
        };
        let action = dispatch(&mut cx);
        apply(&mut self.vmcs, &mut self.vcpu, &action);
        action
    }

    /// What the run loop does right before the next VM entry: offer the platform's pending
    /// interrupts and commit one event to the VMCS. `Err` is a reason to stop the guest instead.
    pub fn enter(&mut self) -> Result<(), crate::guest::StopReason> {
        super::apicv::take_unread(&self.vmcs, &mut self.vcpu, &mut self.vm);
        super::inject_pending_interrupt(&mut self.vmcs, &mut self.vcpu, &mut self.vm);
        super::apicv::before_entry(&mut self.vmcs, &mut self.vcpu, &mut self.vm);
        super::events::commit(&mut self.vmcs, &mut self.vcpu)
    }

    /// Gives the guest APIC virtualization with `features`: its two pages (leaked, this test's
    /// alone) and the controls Keel computes for Bochs.
    pub fn enable_apicv(&mut self, features: crate::vmx::apicv::ApicvFeatures) {
        use crate::vmx::Control32;
        let page = || -> &'static mut [u8; 4096] {
            alloc::boxed::Box::leak(alloc::boxed::Box::new([0u8; 4096]))
        };
        // SAFETY: a leaked page that belongs to this test alone.
        let a = unsafe { crate::vmx::apicv::VirtualApic::new(page(), 0x7000, 0x8000, features) };
        let caps = VmxCaps::bochs_skylake_x();
        let c = crate::vcpu::compute_controls(&caps).unwrap();
        let (primary, secondary) = features.apply(&caps, c.primary, c.secondary).unwrap();
        self.vmcs
            .write(Control32::PrimaryProcBasedControls, primary);
        self.vmcs
            .write(Control32::SecondaryProcBasedControls, secondary);
        a.write_fields(&mut self.vmcs);
        self.vcpu.apicv = Some(a);
    }

    /// A bed whose guest has the TPR shadow, virtualized APIC accesses and virtual-interrupt
    /// delivery, its local APIC software-enabled.
    pub fn with_virtual_interrupt_delivery() -> Self {
        let mut t = Self::new();
        t.enable_apicv(crate::vmx::apicv::ApicvFeatures {
            tpr_shadow: true,
            virtualize_apic_accesses: true,
            virtual_interrupt_delivery: true,
            ..Default::default()
        });
        t.enable_lapic();
        t
    }

    /// Software-enables the local APIC of the vCPU the bed runs (SVR bit 8, spurious vector
    /// 0xFF).
    pub fn enable_lapic(&mut self) {
        let base = crate::devices::lapic::LAPIC_BASE;
        let c = self.vcpu.index;
        self.vm.platform.mmio_write(c, base + 0xf0, 4, 0x1ff, 0);
    }

    /// One of the random changes the LAPIC timer tests make to vCPU 0's timer through its xAPIC
    /// page, `kind` 0-3 (`value` picks within it): the LVT entry (0 or 1: one-shot, periodic or
    /// TSC-deadline mode, masked now and then, a legal or an illegal vector), the initial count
    /// (2), the divide configuration (3).
    pub fn change_lapic_timer(&mut self, kind: u64, value: u64, now: u64) {
        let (offset, v) = match kind {
            0 | 1 => {
                let vector = [0x08, 0x30, 0x31, 0xec, 0xff][(value % 5) as usize];
                let mode = (value >> 8) % 3;
                let masked = u64::from((value >> 12).is_multiple_of(5));
                (0x320, vector | mode << 17 | masked << 16)
            }
            2 => (0x380, 1 + (value >> 16) % 3000),
            _ => (0x3e0, [0, 1, 2, 3, 8, 9, 0xa, 0xb][(value % 8) as usize]),
        };
        let base = crate::devices::lapic::LAPIC_BASE;
        self.vm.platform.mmio_write(0, base + offset, 4, v, now);
    }

    /// A fixed self-IPI of `vector` through the ICR (shorthand self).
    pub fn self_ipi(&mut self, vector: u8) {
        let base = crate::devices::lapic::LAPIC_BASE;
        self.vm
            .platform
            .mmio_write(0, base + 0x300, 4, 1 << 18 | u64::from(vector), 0);
    }

    /// Programs the guest's 8259A (ICW1-ICW4: edge-triggered, cascaded with a slave on IRQ2,
    /// vector base 0x20, 8086 mode; then every IRQ masked but IRQ0) and the PIT's channel 0
    /// (mode 2, the rate generator, count 100), then lets 10 ms pass: the PIT's IRQ0 is pending
    /// at the 8259A, vector 0x20.
    pub fn raise_pit_irq0(&mut self) {
        let pic = [
            (0x20u16, 0x11u32),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0x21, 0xfe),
        ];
        let pit = [(0x43, 0x34), (0x40, 100), (0x40, 0)];
        for (port, v) in pic.into_iter().chain(pit) {
            assert!(self.vm.platform.io_write(port, 1, v, 0), "port {port:#x}");
        }
        self.vm.platform.advance(TEST_TSC_HZ / 100);
    }

    /// The external interrupt the last [`TestBed::enter`] wrote to the VM-entry fields, if any.
    pub fn injected(&self) -> Option<u8> {
        let info = crate::vmx::InterruptionInfo(
            self.vmcs.read(crate::vmx::Control32::EntryInterruptionInfo),
        );
        (info.valid() && info.kind() == crate::vmx::InterruptionType::External)
            .then(|| info.vector())
    }
}
