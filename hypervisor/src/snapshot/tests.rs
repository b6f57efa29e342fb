//! A snapshot written and parsed back gives the same guest; every kind of damage and every
//! mismatch is refused with its reason.

use super::*;
use crate::devices::board::Board;
use crate::devices::Platform;
use crate::guest::Vcpu;
use crate::vcpu_state::SwitchedRegs;
use crate::vmx::{FakeVmcs, GuestNat, Vmcs, VmxCaps};
use alloc::vec;

pub(crate) const MEMORY: u64 = 256 << 10;
const TSC_HZ: u64 = 10_000_000;

pub(crate) fn fingerprint() -> Fingerprint {
    Fingerprint {
        cpuid: vec![
            (0, 0, [0x16, 1, 2, 3]),
            (1, 0, [0x50654, 0, 0x7ffa_fbbf, 0xbfeb_fbff]),
        ],
        xsave: XsaveLayout {
            xsave: true,
            supported: 0b111,
            components: vec![(2, 576, 256)],
        },
    }
}

pub(crate) fn vcpu_state(index: usize, rip: u64) -> VcpuState {
    let caps = VmxCaps::bochs_skylake_x();
    let vcpu = Vcpu::new(index, &caps);
    let mut v = FakeVmcs::new();
    crate::vcpu::write_guest_state(
        &mut v,
        &crate::loader::InitialState::startup_ipi(0),
        &vcpu.cr0_rules,
        &vcpu.cr4_rules,
    );
    v.write(GuestNat::Rip, rip);
    let area = vec![0u8; 4096];
    VcpuState::capture(
        &v,
        &vcpu,
        &SwitchedRegs::default(),
        &area,
        &fingerprint().xsave,
    )
    .expect("live")
}

fn ram() -> Vec<u8> {
    let mut ram = vec![0u8; MEMORY as usize];
    ram[0x1000..0x1010].copy_from_slice(b"counting: 000042");
    ram[0x3_fff8] = 0x99; // the last page
    ram
}

pub(crate) fn guest() -> GuestInfo {
    GuestInfo {
        name: "counter".into(),
        kind: "elf".into(),
        memory: MEMORY,
        vcpus: 2,
        tsc_hz: TSC_HZ,
        clock: 123_456_789,
    }
}

pub(crate) fn platform_bytes() -> Vec<u8> {
    let mut w = Writer::new();
    Platform::for_board(Board::pc(MEMORY, 2), TSC_HZ).save(&mut w);
    w.into_bytes()
}

fn stream() -> Vec<u8> {
    let ram = ram();
    write(
        "0.1.0",
        &fingerprint(),
        &guest(),
        |gpa, buf| buf.copy_from_slice(&ram[gpa as usize..gpa as usize + PAGE_SIZE]),
        &platform_bytes(),
        &[vcpu_state(0, 0x10_0000), vcpu_state(1, 0x2000)],
        0,
    )
}

#[test]
fn a_snapshot_parses_back_to_the_guest_it_was() {
    let s = stream();
    // Two pages of data out of 64: the zero pages are left out.
    assert!(s.len() < 3 * PAGE_SIZE + 4096, "{} bytes", s.len());
    let mut state = Writer::new();
    vcpu_state(0, 0).save(&mut state);
    let state = platform_bytes().len() + 2 * state.bytes().len();
    assert!(estimate(2, state) >= s.len(), "the estimate covers it");
    let snap = parse(&s, &fingerprint()).expect("its own snapshot");
    assert_eq!(snap.guest, guest());
    assert_eq!(snap.keel_version, "0.1.0");
    assert_eq!(snap.pages.len(), 2);
    let mut back = vec![0u8; MEMORY as usize];
    for (gpa, data) in &snap.pages {
        back[*gpa as usize..*gpa as usize + PAGE_SIZE].copy_from_slice(data);
    }
    assert_eq!(back, ram());
    assert_eq!(snap.platform, &platform_bytes()[..]);
    let mut p = Platform::for_board(Board::pc(MEMORY, 2), TSC_HZ);
    p.restore(&mut Reader::new(snap.platform))
        .expect("the platform restores");
    assert_eq!(snap.vcpus[1].fields, vcpu_state(1, 0x2000).fields);
    assert_eq!(describe(&s).expect("describes").1, guest());
}

/// The stream with its END checksum made right again after `change`.
fn resealed(change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut s = stream();
    s.truncate(s.len() - END_LEN);
    change(&mut s);
    let crc = crc32(&s);
    let mut w = Writer::new();
    w.section(*b"END ", 1, |w| w.put(&crc));
    s.extend_from_slice(w.bytes());
    s
}

#[track_caller]
fn refused(s: &[u8], why: &str) {
    match parse(s, &fingerprint()) {
        Ok(_) => panic!("accepted a snapshot that should say: {why}"),
        Err(e) => assert!(alloc::format!("{e}").contains(why), "{e}"),
    }
}

#[test]
fn damage_is_refused_with_its_reason() {
    let good = stream();
    let mut bad = good.clone();
    bad[0] = b'X';
    refused(&bad, "bad magic");
    let mut bad = good.clone();
    bad[8] = 2;
    refused(&bad, "format version 2; this Keel reads version 1");
    for cut in [10, good.len() / 2, good.len() - 1] {
        refused(&good[..cut], "");
    }
    refused(&good[..good.len() - 1], "cut off");
    // A flipped bit in a page: the whole stream's checksum says so first.
    let at = good
        .windows(16)
        .position(|w| w == b"counting: 000042")
        .unwrap();
    let mut bad = good.clone();
    bad[at + 15] ^= 1;
    refused(&bad, "checksum mismatch: the snapshot says");
    // With the whole checksum forged, the page's own catches it.
    let bad = resealed(|s| s[at + 15] ^= 1);
    refused(&bad, "checksum mismatch in the page at 0x1000");
    // A vCPU state of a newer layout.
    let vcpu = good.windows(4).rposition(|w| w == b"VCPU").unwrap();
    let bad = resealed(|s| s[vcpu + 4] = 9);
    refused(&bad, "`VCPU` state of version 9");
}

#[test]
fn a_snapshot_for_another_cpu_is_refused() {
    let s = stream();
    let mut here = fingerprint();
    here.cpuid[1].2[2] &= !(1 << 28); // no AVX
    match parse(&s, &here) {
        Err(e @ SnapshotError::CpuDiffers { leaf: 1, .. }) => {
            assert!(alloc::format!("{e}").starts_with("CPU features differ: CPUID.(EAX=0x1,ECX=0)"))
        }
        other => panic!("{other:?}"),
    }
    let mut here = fingerprint();
    here.xsave.supported = 0b11;
    assert_eq!(parse(&s, &here).err(), Some(SnapshotError::XsaveDiffers));
}

#[test]
fn crc32_is_the_ieee_one() {
    // The check value of CRC-32/ISO-HDLC.
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32_update(crc32(b"1234"), b"56789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn base64_round_trips_and_refuses_junk() {
    for n in 0..10 {
        let data: Vec<u8> = (0..n).map(|i| (i * 37 + 250) as u8).collect();
        let text = base64::encode(&data);
        assert_eq!(base64::decode(&text), Some(data), "{text}");
    }
    assert_eq!(base64::encode(b"Keel"), "S2VlbA==");
    assert_eq!(base64::decode("S2VlbA=="), Some(b"Keel".to_vec()));
    for bad in ["S2VlbA=", "S2V!bA==", "S2==bA==", "===="] {
        assert_eq!(base64::decode(bad), None, "{bad}");
    }
}
