//! A vCPU captured, written out, read back and restored into a fresh vCPU is the same vCPU; a
//! state that is cut, corrupted, newer or meant for another CPU is refused before anything
//! changes.

use super::*;
use crate::exits::Exception;
use crate::loader::InitialState;
use crate::vmx::cr::GuestCr;
use crate::vmx::{FakeVmcs, Segment, VmxCaps};
use alloc::vec;

/// Skylake-like: x87, SSE, AVX (component 2 at 576, 256 bytes), MPX hidden, AVX-512 (5-7).
fn layout() -> XsaveLayout {
    XsaveLayout {
        xsave: true,
        supported: 0b1110_0111,
        components: vec![
            (2, 576, 256),
            (5, 1088, 64),
            (6, 1152, 512),
            (7, 1664, 1024),
        ],
    }
}

fn env() -> CpuEnv {
    let caps = VmxCaps::bochs_skylake_x();
    CpuEnv {
        xsave: layout(),
        spec_ctrl_bits: 0b111,
        cr_masks: (GuestCr::cr0(&caps, true).mask(), GuestCr::cr4(&caps).mask()),
    }
}

/// A fresh vCPU and its VMCS as `VmHw::boot` leaves an application processor.
fn fresh() -> (FakeVmcs, Vcpu, SwitchedRegs, Vec<u8>) {
    let caps = VmxCaps::bochs_skylake_x();
    let vcpu = Vcpu::new(1, &caps);
    let mut v = FakeVmcs::new();
    let init = InitialState::startup_ipi(0);
    crate::vcpu::write_guest_state(&mut v, &init, &vcpu.cr0_rules, &vcpu.cr4_rules);
    (v, vcpu, SwitchedRegs::default(), vec![0u8; 4096])
}

/// A vCPU in the middle of its work: long mode, registers, MSRs, AVX state, a queued #GP and a
/// held interrupt, halted.
fn busy() -> (FakeVmcs, Vcpu, SwitchedRegs, Vec<u8>) {
    let (mut v, mut vcpu, mut sw, mut area) = fresh();
    v.write(GuestNat::Rip, 0xffff_8000_0010_2345);
    v.write(GuestNat::Rsp, 0xffff_8000_0020_0000);
    v.write(GuestNat::Cr3, 0x1234_5000);
    v.write(Guest64::Ia32Efer, 0xd01);
    v.write(Segment::Tr.base(), 0xffff_8000_0000_9000);
    v.write(Guest32::InterruptibilityState, 1);
    v.write(GuestNat::Dr7, 0x401);
    v.update(Control32::EntryControls, |c| c | IA32E);
    v.update(Control32::PrimaryProcBasedControls, |c| {
        c | PrimaryControls::NMI_WINDOW_EXITING.bits()
    });
    v.write(ControlNat::Cr4ReadShadow, 0x406a0);
    v.write(
        ControlNat::Cr0GuestHostMask,
        GuestCr::cr0(&VmxCaps::bochs_skylake_x(), true).mask(),
    );
    v.write(
        ControlNat::Cr4GuestHostMask,
        GuestCr::cr4(&VmxCaps::bochs_skylake_x()).mask(),
    );
    for i in 0..16u8 {
        vcpu.regs.set(i, 0x1111 * u64::from(i) + 7);
    }
    vcpu.state = RunState::Halted;
    vcpu.xcr0 = 0b111;
    vcpu.tsc_adjust = 12345;
    vcpu.spec_ctrl = 1;
    vcpu.misc_enable |= 1 << 18;
    vcpu.events.exception(Exception {
        vector: 13,
        error_code: Some(0),
    });
    sw.msrs = [
        0xffff_8000_0000_1000,
        0x23_0010_0000_0000,
        0xffff_8000_0000_2000,
        0,
        0x4700,
        3,
    ];
    sw.cr2 = 0xdead_b000;
    sw.debug = [0x1000, 0x2000, 0, 0, 0xffff_0ff1];
    area[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
    area[160] = 0x55; // XMM0
    area[LEGACY..LEGACY + 8].copy_from_slice(&0b111u64.to_le_bytes());
    area[600] = 0xaa; // YMM_Hi128 of YMM1
    (v, vcpu, sw, area)
}

fn bytes(s: &VcpuState) -> Vec<u8> {
    let mut w = Writer::new();
    s.save(&mut w);
    w.into_bytes()
}

fn captured(v: &FakeVmcs, vcpu: &Vcpu, sw: &SwitchedRegs, area: &[u8]) -> VcpuState {
    VcpuState::capture(v, vcpu, sw, area, &layout()).expect("a live vCPU is captured")
}

#[test]
fn a_restored_vcpu_captures_to_the_same_bytes() {
    let (v, vcpu, sw, area) = busy();
    let first = bytes(&captured(&v, &vcpu, &sw, &area));
    let state = VcpuState::load(&mut Reader::new(&first)).expect("its own state reads back");
    state.check(&env()).expect("and fits this CPU");
    // Into a VMCS with Keel's controls only, as `VmHw` restores: no guest state at all.
    let (_, mut vcpu2, mut sw2, mut area2) = fresh();
    let mut v2 = FakeVmcs::new();
    state.apply(&mut v2, &mut vcpu2, &mut sw2, &mut area2);
    assert_eq!(bytes(&captured(&v2, &vcpu2, &sw2, &area2)), first);
    assert_eq!(v2.read(GuestNat::Rip), 0xffff_8000_0010_2345);
    assert_eq!(vcpu2.regs, vcpu.regs);
    assert_eq!(vcpu2.events, vcpu.events, "the queued #GP is still owed");
    assert_eq!(vcpu2.state, RunState::Halted);
    assert_eq!(sw2, sw);
    assert_ne!(v2.read(Control32::EntryControls) & IA32E, 0, "long mode");
    assert_eq!(area2[600], 0xaa, "the AVX upper halves came along");
}

#[test]
fn only_the_components_xcr0_enables_are_saved() {
    let (v, mut vcpu, sw, mut area) = busy();
    area[1100] = 0x77; // component 5 (opmask), which XCR0 = 0b111 does not enable
    area[LEGACY..LEGACY + 8].copy_from_slice(&0b10_0111u64.to_le_bytes());
    let s = captured(&v, &vcpu, &sw, &area);
    assert_eq!(s.xsave.bytes.len(), 576 + 256);
    assert_eq!(s.xsave.components, vec![(2, 576, 256)]);
    let (mut v2, mut vcpu2, mut sw2, mut area2) = fresh();
    s.apply(&mut v2, &mut vcpu2, &mut sw2, &mut area2);
    assert_eq!(area2[1100], 0);
    assert_eq!(
        area2[LEGACY], 0b111,
        "XSTATE_BV keeps only what XCR0 enables"
    );
    vcpu.xcr0 = 1;
    assert_eq!(captured(&v, &vcpu, &sw, &area).xsave.bytes.len(), 576);
}

#[test]
fn a_paused_vcpu_saves_the_state_it_resumes_to_and_a_stopped_one_none() {
    let (v, mut vcpu, sw, area) = busy();
    vcpu.state = RunState::Paused { halted: true };
    assert_eq!(captured(&v, &vcpu, &sw, &area).run, SavedRun::Halted);
    vcpu.state = RunState::Stopped(crate::guest::StopReason::TripleFault);
    assert!(VcpuState::capture(&v, &vcpu, &sw, &area, &layout()).is_none());
}

#[test]
fn cut_corrupted_and_newer_states_are_refused() {
    let (v, vcpu, sw, area) = busy();
    let good = bytes(&captured(&v, &vcpu, &sw, &area));
    for cut in [0, 5, 10, good.len() / 2, good.len() - 1] {
        assert!(
            VcpuState::load(&mut Reader::new(&good[..cut])).is_err(),
            "cut at {cut}"
        );
    }
    let mut newer = good.clone();
    newer[4] = 2;
    assert!(matches!(
        VcpuState::load(&mut Reader::new(&newer)),
        Err(StateError::Version { found: 2, .. })
    ));
    // The run state byte: after the header (10) and the index (4).
    let mut bad = good.clone();
    bad[14] = 9;
    assert_eq!(
        VcpuState::load(&mut Reader::new(&bad)),
        Err(StateError::Invalid("an unknown SavedRun"))
    );
}

#[track_caller]
fn refused(change: impl FnOnce(&mut VcpuState), why: &str) {
    let (v, vcpu, sw, area) = busy();
    let mut s = captured(&v, &vcpu, &sw, &area);
    change(&mut s);
    match s.check(&env()) {
        Err(StateError::Invalid(w)) => assert!(w.contains(why), "{w}"),
        other => panic!("accepted or refused otherwise: {other:?}"),
    }
}

#[test]
fn state_this_cpu_cannot_take_is_refused() {
    refused(|s| s.xcr0 = 0b1_1000_0111, "components this CPU lacks");
    refused(|s| s.xcr0 = 0b11, "XCR0 does not enable");
    refused(
        |s| {
            s.xsave.bytes.pop();
        },
        "wrong size",
    );
    refused(|s| s.xsave.components[0].1 = 832, "lies elsewhere");
    refused(|s| s.xsave.bytes[MXCSR + 2] = 1, "MXCSR");
    refused(|s| s.xsave.bytes[LEGACY + 8] = 1, "reserved bytes");
    refused(|s| s.switched.msrs[2] = 0x8000_0000_0000, "SYSCALL");
    refused(|s| s.switched.msrs[5] = 1 << 32, "TSC_AUX");
    refused(|s| s.switched.debug[4] = 1 << 40, "DR6");
    refused(|s| s.spec_ctrl = 8, "SPEC_CTRL");
    refused(|s| s.cr_masks.0 ^= 1 << 5, "CR0/CR4 rules");
    refused(|s| s.fields.pop().map(|_| ()).unwrap_or(()), "VMCS fields");
    refused(|s| s.xsave.xsave = false, "FXSAVE");
}
