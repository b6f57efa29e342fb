//! A hostile guest cannot hurt Keel: boots Keel in Bochs with attacking guests next to a witness
//! (tests/guests/manifests/hostile.toml, the guests in tests/guests/hostile64, described in
//! docs/SECURITY.md) and checks that Keel stays up, that the witness computes the right checksum,
//! and that every attacker gets its documented outcome.
//!
//! One Bochs boot of about 15 s (29 guests), plus two of their own: the interrupt storm, and
//! the sweep of guest-physical memory (about a minute); every test below asserts on it. Run them alone with
//! `cargo itest hostile`.

use keel_tests::{shared_boot, BootSpec, Emulator, Firmware, Manifest, Outcome};
use std::collections::BTreeMap;
use std::time::Duration;

static HOSTILE: BootSpec = BootSpec {
    name: "bochs-hostile",
    manifest: Manifest::File("tests/guests/manifests/hostile.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: Some(Duration::from_secs(240)),
};

static SWEEP: BootSpec = BootSpec {
    name: "bochs-hostile-sweep",
    manifest: Manifest::File("tests/guests/manifests/hostile-sweep.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: Some(Duration::from_secs(600)),
};

/// The interrupt storm alone with a witness: if the storm makes Keel hang, the other attacks'
/// results still come in.
static STORM: BootSpec = BootSpec {
    name: "bochs-hostile-storm",
    manifest: Manifest::File("tests/guests/manifests/hostile-storm.toml"),
    emulator: Emulator::Bochs,
    firmware: Firmware::Bios,
    timeout: Some(Duration::from_secs(90)),
};

/// Exit status of a guest that wrote 0x30 to the debug-exit port: every case as documented.
const OK_STATUS: u32 = (0x30 << 1) | 1;

/// `keel: guest NAME ended: debug-exit status <status>`.
#[track_caller]
fn expect_ended(boot: &Outcome, guest: &str, status: u32) {
    boot.expect_line(&format!(
        "keel: guest {guest} ended: debug-exit status {status:#x}"
    ));
}

/// `keel: error: guest NAME stopped: <reason>`.
#[track_caller]
fn expect_stopped(boot: &Outcome, guest: &str, reason: &str) {
    boot.expect_line(&format!("keel: error: guest {guest} stopped: {reason}"));
}

/// The witness's algorithm (tests/guests/hostile64/src/witness.rs and rng.rs), computed here
/// independently: SplitMix64-seeded xorshift64* fills 8192 words, `rounds` FNV-style rounds
/// rewrite them, the words are folded into the checksum.
pub(crate) fn witness_checksum(rounds: u64) -> u64 {
    let mut z = 0x5749_544e_4553_5321u64.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut x = z ^ (z >> 31);
    let mut buf: Vec<u64> = (0..8192)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        })
        .collect();
    let mut h = 0u64;
    for r in 0..rounds {
        for w in buf.iter_mut() {
            h = (h ^ *w)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(29)
                .wrapping_add(r);
            *w = w.rotate_left(7) ^ h;
        }
    }
    buf.iter().fold(h, |c, &w| c.rotate_left(1) ^ w)
}

/// `rounds=` of the witnesses in hostile.toml and fuzz.toml.
pub(crate) const WITNESS_ROUNDS: u64 = 48;

/// Keel ran to its end with every guest done (`keel: exit status 1`), and printed none of the
/// lines it prints when Keel itself fails (`keel_tests::KEEL_FAILURE_MARKERS`).
#[track_caller]
pub(crate) fn expect_keel_unhurt(boot: &Outcome) {
    boot.expect_keel_unhurt();
}

#[test]
fn keel_survives_every_attack() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_line("keel: running 32 guests");
    expect_keel_unhurt(&boot);
}

#[test]
fn witness_computes_the_right_checksum() {
    let boot = shared_boot(&HOSTILE);
    let want = witness_checksum(WITNESS_ROUNDS);
    boot.expect_guest_line("witness", &format!("witness: checksum={want:#018x} ok"));
    expect_ended(&boot, "witness", OK_STATUS);
}

#[test]
fn sse_state_does_not_cross_guests() {
    let boot = shared_boot(&HOSTILE);
    // The witness keeps a pattern in XMM0-15 while `sse` fills them with its own and yields.
    boot.expect_guest_line("witness-xmm", "witness: xmm intact");
    let want = witness_checksum(WITNESS_ROUNDS);
    boot.expect_guest_line("witness-xmm", &format!("witness: checksum={want:#018x} ok"));
    boot.expect_guest_line("sse", "hostile64: sse leaks=0 rounds=200");
}

#[test]
fn debug_registers_stay_with_their_guest() {
    let boot = shared_boot(&HOSTILE);
    // Each of two guests finds the power-on values (the second after letting the first write its
    // own), then keeps its own DR0-DR3, DR6 and DR7 across 40 yields to the other. The first also
    // takes the #DB of a data breakpoint and of DR7.GD armed before an exit, of I/O breakpoints
    // on ports Keel emulates, of a data breakpoint on the byte an (emulated) INSB stores, and the
    // single-step trap right after a CPUID run with RFLAGS.TF set.
    for guest in ["dr-a", "dr-b"] {
        boot.expect_guest_line(guest, "hostile64: debugregs reset=6/6 ok");
        boot.expect_guest_line(guest, "hostile64: debugregs kept=40/40 ok");
    }
    boot.expect_guest_line("dr-a", "hostile64: debugregs traps=8/8 ok");
    // The second dies once with all six set; restarted, it must find the power-on values again.
    boot.expect_in_order(&[
        "[dr-b] hostile64: debugregs dies with DR0-DR3, DR6, DR7 set",
        "keel: error: guest dr-b stopped: ",
        "[dr-b] hostile64: cmdline=attack=debugregs seed=2 rounds=40 settle=4 die=1 restart=1",
        "[dr-b] hostile64: debugregs reset=6/6 ok",
        "[dr-b] hostile64: debugregs kept=40/40 ok",
        "[dr-b] hostile64: debugregs traps=0/0 ok",
    ]);
    expect_ended(&boot, "dr-a", OK_STATUS);
    expect_ended(&boot, "dr-b", OK_STATUS);
}

#[test]
fn vmx_instructions_raise_ud() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("vmx", "hostile64: vmx ud=13/13 ok");
    expect_ended(&boot, "vmx", OK_STATUS);
}

#[test]
fn self_nmis_arrive_once_and_injected_faults_push_rf() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_in_order(&[
        "[events] hostile64: events nmi sent=8 received=8",
        "[events] hostile64: events nmi in handler: inside=1 total=2 nested=0",
        // Keel's #UD and #GP push RF = 1 as the CPU's own faults do; INT3, a trap, does not.
        "[events] hostile64: events rf ud2=1 gp=1 int3=0 vmxon=1 wrmsr=1",
        "[events] hostile64: events step nop=1,bs=1,rip+1 cpuid=1,bs=1,rip+2",
        "[events] hostile64: events cases=15/15 ok",
    ]);
    expect_ended(&boot, "events", OK_STATUS);
}

#[test]
fn owned_and_reserved_control_register_bits_raise_gp() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("cr", "hostile64: cr gp=17/17 ok");
    expect_ended(&boot, "cr", OK_STATUS);
}

#[test]
fn vmx_and_unknown_msrs_raise_gp() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("msr", "hostile64: msr gp=76/76 ok");
    expect_ended(&boot, "msr", OK_STATUS);
}

/// Every MSR a CPUID feature implies answers exactly when CPUID advertises the feature, and the
/// advertised behaviours hold (TSC_ADJUST, SPEC_CTRL, XSS, EFER.LME, APIC_BASE.EN, RDPMC).
#[test]
fn cpuid_and_msrs_agree() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("cpuidmsr", "hostile64: cpuidmsr agree=125/125 ok");
    expect_ended(&boot, "cpuidmsr", OK_STATUS);
}

/// The local APIC in x2APIC mode through RDMSR/WRMSR (mode transitions, registers, #GP cases,
/// SELF IPI, ICR, timer, EOI), and CPUID 0x15/0x16/0x40000010 against the TSC and LAPIC timer
/// rates the guest measures with the PIT (within 1%).
#[test]
fn x2apic_and_the_timing_leaves() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("x2apic", "hostile64: x2apic cases=50/50 ok");
    expect_ended(&boot, "x2apic", OK_STATUS);
}

#[test]
fn invalid_xcr0_values_raise_gp() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("xsetbv", "hostile64: xsetbv gp=13/13 ok");
    expect_ended(&boot, "xsetbv", OK_STATUS);
}

#[test]
fn invd_and_wbinvd_complete() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("cache", "hostile64: cache completed=6/6 ok");
    expect_ended(&boot, "cache", OK_STATUS);
}

/// The ports a device claims (docs/HYPERCALLS.md, "Ports every guest sees"); 0xf4-0xf7 are not
/// probed.
fn claimed(port: u32) -> bool {
    matches!(
        port,
        0x20..=0x21
            | 0x40..=0x43
            | 0x61
            | 0x70..=0x71
            | 0x80
            | 0xa0..=0xa1
            | 0xe9
            | 0x3f8..=0x3ff
            | 0x4d0..=0x4d1
            // The board's i8042, fw_cfg, ACPI PM blocks and PCI configuration ports.
            | 0x60
            | 0x64
            | 0x510..=0x511
            | 0x600..=0x605
            | 0x608..=0x60b
            | 0xcf8..=0xcff
    )
}

fn parse_hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

#[test]
fn unclaimed_ports_read_all_ones_and_nothing_breaks() {
    let boot = shared_boot(&HOSTILE);
    let mut not_ones = Vec::new();
    for line in boot.guest_lines("ports") {
        if let Some(list) = line.strip_prefix("hostile64: ports not-ones ") {
            for entry in list.split(' ') {
                let port = entry.split('=').next().and_then(parse_hex);
                match port {
                    Some(p) if claimed(p) => not_ones.push(p),
                    _ => boot.fail(&format!("port {entry} is unclaimed but did not read 0xff")),
                }
            }
        }
    }
    let total = 0x10000 - 4;
    boot.expect_guest_line(
        "ports",
        &format!(
            "hostile64: ports in ones={}/{total}",
            total - not_ones.len()
        ),
    );
    boot.expect_in_order(&[
        "[ports] hostile64: ports out done",
        "[ports] hostile64: ports wide=11/11 ok",
    ]);
    expect_ended(&boot, "ports", OK_STATUS);
}

#[test]
fn string_io_respects_the_guests_page_tables() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("stringio", "hostile64: stringio pf=13/13 ok");
    expect_ended(&boot, "stringio", OK_STATUS);
}

#[test]
fn hypercall_flood_gets_only_documented_answers() {
    let boot = shared_boot(&HOSTILE);
    let line = boot.expect_guest_line("hypercalls", "hostile64: hypercalls calls=3000 ");
    if !line.ends_with(" bad=0") {
        boot.fail(&format!("some hypercalls got a wrong answer: {line}"));
    }
    boot.expect_guest_line("hypercalls", "hostile64: hypercalls results=3000/3000 ok");
    expect_ended(&boot, "hypercalls", OK_STATUS);
}

#[test]
fn a_spinning_guest_with_interrupts_off_does_not_starve_the_witness() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_in_order(&[
        "[spin] hostile64: spin 40000000 cycles with interrupts off",
        "keel: guest witness ended: debug-exit status 0x61",
        "[spin] hostile64: spin done",
        "keel: guest spin ended: debug-exit status 0x61",
    ]);
}

#[test]
fn an_interrupt_storm_does_not_starve_the_witness() {
    let boot = shared_boot(&STORM);
    expect_keel_unhurt(&boot);
    boot.expect_in_order(&[
        "[storm] hostile64: storm for 20000000 cycles",
        "keel: guest witness ended: debug-exit status 0x61",
        "[storm] hostile64: storm pit=",
    ]);
    let want = witness_checksum(WITNESS_ROUNDS);
    boot.expect_guest_line("witness", &format!("witness: checksum={want:#018x} ok"));
    expect_ended(&boot, "storm", OK_STATUS);
}

#[test]
fn apic_and_ioapic_abuse_stays_inside_the_guest() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_in_order(&[
        "[apic] hostile64: apic accesses=1295 ipis=533 self=1",
        "[apic] hostile64: apic movdqu to the ICR",
    ]);
    expect_stopped(
        &boot,
        "apic",
        "killed: MMIO access to 0xfee00300 by an instruction Keel does not emulate",
    );
}

#[test]
fn mmio_through_a_mov_with_an_absolute_address_is_emulated() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("moffs", "hostile64: moffs mmio=3/3 ok");
    expect_ended(&boot, "moffs", OK_STATUS);
}

#[test]
fn mmio_from_16_bit_code_follows_the_operand_and_address_size_prefixes() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("mmio16", "hostile64: mmio16 mmio=5/5 ok");
    expect_ended(&boot, "mmio16", OK_STATUS);
}

/// The TPR through CR8 and the xAPIC page: one register, and an interrupt it held back arrives
/// as soon as it drops, whether the CPU keeps the TPR (APIC virtualization, the TPR threshold)
/// or Keel emulates every access (`apicv = "off"`).
#[test]
fn the_tpr_behaves_the_same_with_and_without_apic_virtualization() {
    let boot = shared_boot(&HOSTILE);
    for guest in ["tpr", "tpr-emul"] {
        boot.expect_guest_line(guest, "hostile64: tpr checks=7/7 ok");
        expect_ended(&boot, guest, OK_STATUS);
    }
    boot.expect_guest_line("mmio16-emul", "hostile64: mmio16 mmio=5/5 ok");
    expect_ended(&boot, "mmio16-emul", OK_STATUS);
    boot.expect_line("APIC virtualization: TPR shadow + virtualized APIC accesses");
    for guest in ["tpr-emul", "mmio16-emul"] {
        boot.expect_line(&format!("{guest}: APIC virtualization off"));
    }
}

#[test]
fn an_idt_on_the_apic_page_does_not_make_keel_emulate_the_wrong_instructions() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("idtmmio", "hostile64: idtmmio");
    // The #GP's delivery reads its gate (vector 13, 16 bytes each) from the APIC page: an EPT
    // violation with valid IDT-vectoring information. The access is the delivery's, not the
    // faulting load's: Keel must stop the guest saying so (exits/ept.rs), neither emulate the
    // load (naming `[8b, 06, ...]`) nor skip to the instructions after it (`[0f, 0b, ...]`).
    expect_stopped(
        &boot,
        "idtmmio",
        "killed: event delivery touched guest-physical 0xfee000d0, which is device memory \
         (IDT, GDT or stack outside RAM)",
    );
}

#[test]
fn hlt_with_interrupts_off_stops_only_that_guest() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("hltcli", "hostile64: cli hlt");
    expect_stopped(
        &boot,
        "hltcli",
        "HLT with interrupts disabled and no way to wake up",
    );
}

#[test]
fn a_triple_fault_stops_only_that_guest() {
    let boot = shared_boot(&HOSTILE);
    boot.expect_guest_line("triple", "long64: triple");
    expect_stopped(&boot, "triple", "triple fault");
}

#[test]
fn memory_outside_ram_is_neither_keels_nor_another_guests() {
    let boot = shared_boot(&HOSTILE);
    // Guest RAM is 4 MiB; Keel's kernel is loaded at 16 MiB host-physical and the first guests'
    // RAM starts a few MiB above it; the last one is just below MAXPHYADDR.
    for (guest, access, addr) in [
        ("probe-ramend", "read", "0x400000"),
        ("probe-keel", "write", "0x1000000"),
        ("probe-guest", "write", "0x1800000"),
        ("probe-exec", "read", "0x8000000"),
        ("probe-4g", "read", "0x100000000"),
    ] {
        expect_stopped(
            &boot,
            guest,
            &format!("{access} of guest-physical {addr}, which is neither RAM nor a device"),
        );
    }
    let line = boot.expect_guest_line("probe-top", "hostile64: probe 2049 read ");
    let addr = line.rsplit(' ').next().unwrap_or_default();
    expect_stopped(
        &boot,
        "probe-top",
        &format!("read of guest-physical {addr}, which is neither RAM nor a device"),
    );
    boot.expect_no_line("survived");
}

/// The emulated IOAPIC and local APIC pages: the only guest-physical addresses outside RAM that
/// answer (for loads and stores; an instruction fetch from them stops the guest).
fn device_page(addr: u64) -> bool {
    matches!(addr & !0xfff, 0xfec0_0000 | 0xfee0_0000)
}

#[test]
fn every_2mib_step_outside_ram_stops_the_guest() {
    let boot = shared_boot(&SWEEP);
    expect_keel_unhurt(&boot);
    // n -> (how, address). A probe that survives (a device page) is followed by the next one in
    // the same life, which the next life probes again: duplicates are expected.
    let mut probes: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    for l in boot.guest_lines("probe-sweep") {
        let Some(rest) = l.strip_prefix("hostile64: probe ") else {
            continue;
        };
        let w: Vec<&str> = rest.split(' ').collect();
        let [n, how, addr] = w[..] else { continue };
        if !["read", "write", "exec"].contains(&how) {
            continue;
        }
        let (Ok(n), Some(addr)) = (
            n.parse::<u64>(),
            addr.strip_prefix("0x")
                .and_then(|a| u64::from_str_radix(a, 16).ok()),
        ) else {
            boot.fail(&format!("unreadable probe line `{l}`"))
        };
        // 2046 steps from 4 MiB to 4 GiB, then 4 GiB, 4 GiB + 2 MiB, 64 GiB, MAXPHYADDR - 2 MiB.
        let want = if n < 2046 {
            0x40_0000 + n * 0x20_0000
        } else {
            addr
        };
        if addr != want {
            boot.fail(&format!("probe {n} of {addr:#x}, expected {want:#x}"));
        }
        probes.insert(n, (how.to_string(), addr));
    }
    if !probes.keys().copied().eq(0..2050) {
        boot.fail(&format!(
            "{} distinct probes, expected 0..2050",
            probes.len()
        ));
    }
    for (n, (how, addr)) in &probes {
        if device_page(*addr) && how != "exec" {
            boot.expect_guest_line("probe-sweep", &format!("hostile64: probe {n} survived"));
        } else {
            let access = if how == "write" { "write" } else { "read" };
            expect_stopped(
                &boot,
                "probe-sweep",
                &format!("{access} of guest-physical {addr:#x}, which is neither RAM nor a device"),
            );
        }
    }
    boot.expect_guest_line("probe-sweep", "hostile64: probe sweep done");
    expect_ended(&boot, "probe-sweep", OK_STATUS);
    let want = witness_checksum(WITNESS_ROUNDS);
    boot.expect_guest_line("witness", &format!("witness: checksum={want:#018x} ok"));
}
