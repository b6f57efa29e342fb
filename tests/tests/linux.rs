//! Debian's cloud kernel with a busybox initramfs and two vCPUs, under Keel in Bochs next to two
//! of Keel's own guests: the test types shell commands into the Linux guest's serial console
//! (COM1 -> Keel -> the guest's 16550, receive interrupts) and checks the answers, then powers it
//! off.
//!
//! The kernel and busybox come from the host's apt archive at test time (see
//! `keel_tests::debian`); without apt or the network the test fails, naming what is missing.

use std::sync::OnceLock;
use std::time::Duration;

use keel_tests::debian::{self, LinuxFiles, INIT_MARKER};
use keel_tests::{boot_scripted_on, harness_dir, run_script, Outcome, ScriptedBoot, Step};

const MANIFEST: &str = "\
# Written by tests/tests/linux.rs: Debian's kernel first (it gets the keyboard), then two guests
# of tests/guests whose results must survive it.
[[guest]]
name = \"linux\"
kind = \"linux\"
image = \"vmlinuz\"
initrd = \"initrd\"
memory = \"192M\"
vcpus = 2
cmdline = \"console=ttyS0 cryptomgr.notests\"

[[guest]]
name = \"pm32\"
kind = \"elf\"
image = \"pm32.elf\"
memory = \"16M\"
cmdline = \"pm32 says hi\"

[[guest]]
name = \"long64\"
kind = \"elf\"
image = \"long64.elf\"
memory = \"16M\"
cmdline = \"mode=good\"
";

/// Sum of i*i for i in 0..1000 = 999 * 1000 * 1999 / 6.
const SUM_OF_SQUARES: u64 = 332_833_500;

/// Each command ends by printing `M-<n>` computed by the shell, so the line that ends a step is
/// never the echo of the command typed (which shows `$((...))`).
fn commands() -> Vec<&'static str> {
    vec![
        "echo UPTIME $(cat /proc/uptime); echo M-$((0+1))\r",
        "uname -r; echo M-$((1+1))\r",
        "grep -m1 vendor_id /proc/cpuinfo; grep -o -w -m1 hypervisor /proc/cpuinfo; echo M-$((2+1))\r",
        "cat /proc/interrupts; echo M-$((3+1))\r",
        "dmesg | grep -i -e keel -e 'ACPI: ' ; echo M-$((4+1))\r",
        "i=0; s=0; while [ $i -lt 1000 ]; do s=$((s+i*i)); i=$((i+1)); done; echo SUM=$s; echo M-$((5+1))\r",
        "grep ^processor /proc/cpuinfo; echo CPUS=$(grep -c ^processor /proc/cpuinfo); echo M-$((6+1))\r",
    ]
}

struct Run {
    files: LinuxFiles,
    outcome: Outcome,
}

fn linux_run() -> &'static Run {
    static RUN: OnceLock<Result<Run, String>> = OnceLock::new();
    let r = RUN.get_or_init(|| {
        let files = debian::linux_files(&harness_dir().join("debian"))?;
        let secs = Duration::from_secs;
        // /init's marker: ~1.1e9 Bochs instructions after power-on.
        let mut script = vec![Step::new(INIT_MARKER, commands()[0], secs(400))];
        for (i, cmd) in commands().iter().enumerate().skip(1) {
            script.push(Step::new(&format!("M-{i}"), cmd, secs(120)));
        }
        // Keel's keys: Ctrl-A 2 gives the keyboard to pm32 (ended by now: what is typed for it
        // is dropped, never reaching linux); Ctrl-A 1 gives it back.
        script.push(Step::new(
            &format!("M-{}", commands().len()),
            "\u{1}2",
            secs(120),
        ));
        script.push(Step::new(
            "keel: input goes to pm32",
            "echo LOST-$((1+1))\r\u{1}1",
            secs(60),
        ));
        script.push(Step::new(
            "keel: input goes to linux",
            "poweroff -f\r",
            secs(60),
        ));
        // Two processors: Keel runs the vCPUs on both. The guest once stalled there under load
        // with both vCPUs spinning on a kernel lock (Bochs' virtual-interrupt delivery let an
        // interrupt in with IF = 0 when a kick reached the CPU; kicks are NMIs now), and typed
        // keys were lost while no CPU read COM1 (a CPU waiting for the loop's lock reads it
        // now): docs/SECURITY.md, "Linux with two vCPUs on two host CPUs".
        let outcome = boot_scripted_on(
            ScriptedBoot {
                name: "linux-shell",
                manifest: MANIFEST,
                files: &files.dir,
                script,
                memory_mib: 512,
                timeout: secs(900),
            },
            2,
        )?;
        Ok(Run { files, outcome })
    });
    match r {
        Ok(run) => run,
        Err(e) => panic!("linux-shell: the boot could not run: {e}"),
    }
}

fn outcome() -> &'static Outcome {
    let o = &linux_run().outcome;
    o.expect_script_done();
    o
}

/// The Linux guest's output line that is exactly `text`.
#[track_caller]
fn linux_line_is(o: &Outcome, text: &str) {
    if !o.guest_lines("linux").any(|l| l.trim_end() == text) {
        o.fail(&format!("the linux guest printed no line `{text}`"));
    }
}

#[test]
fn linux_shell_answers_over_the_serial_console() {
    let o = outcome();
    linux_line_is(o, &linux_run().files.release);
    linux_line_is(o, "vendor_id\t: GenuineIntel");
    linux_line_is(o, "hypervisor");
    linux_line_is(o, &format!("SUM={SUM_OF_SQUARES}"));
    // Both vCPUs (`vcpus = 2`): started by the kernel with INIT-SIPI-SIPI, listed by /proc/cpuinfo.
    o.expect_guest_line("linux", "smp: Brought up 1 node, 2 CPUs");
    linux_line_is(o, "processor\t: 0");
    linux_line_is(o, "processor\t: 1");
    linux_line_is(o, "CPUS=2");
    // What was typed reached the shell as typed (no NUL in its echo; docs/SECURITY.md).
    if let Some(l) = o.guest_lines("linux").find(|l| l.contains('\0')) {
        o.fail(&format!("typed input reached the shell altered: {l:?}"));
    }
    // ttyS0 on IRQ 4 through the IOAPIC, edge-triggered (ISA), with interrupts counted.
    let irq4 = o
        .guest_lines("linux")
        .find(|l| l.contains("IO-APIC") && l.contains("ttyS0"))
        .unwrap_or_else(|| o.fail("/proc/interrupts has no IO-APIC line for ttyS0"));
    let fields: Vec<&str> = irq4.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"4:"), "{irq4}");
    // One count per CPU: the IOAPIC may deliver to either vCPU.
    let count: u64 = fields[1..]
        .iter()
        .map_while(|c| c.parse::<u64>().ok())
        .sum();
    assert!(count > 0, "no serial interrupts counted: {irq4}");
    assert!(irq4.contains("4-edge"), "{irq4}");
    // The kernel lists Keel's ACPI tables with their OEM ID.
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC"] {
        if !o
            .guest_lines("linux")
            .any(|l| l.contains(&format!("ACPI: {table} ")) && l.contains("KEEL"))
        {
            o.fail(&format!("no `ACPI: {table} ... KEEL` line in dmesg"));
        }
    }
}

#[test]
fn linux_powers_off_and_the_other_guests_are_intact() {
    let o = outcome();
    o.expect_line("keel: guest linux ended: powered off (ACPI S5)");
    // What was typed while pm32 had the keyboard went nowhere.
    o.expect_no_line("LOST");
    o.expect_guest_line("pm32", "cmdline=pm32 says hi ram=16777216");
    o.expect_guest_line("pm32", "pm32: done");
    o.expect_line("keel: guest pm32 ended: debug-exit status 0x23");
    o.expect_guest_line("long64", "cmdline=mode=good ram=16777216");
    o.expect_guest_line("long64", "long64: done");
    o.expect_line("keel: guest long64 ended: debug-exit status 0x27");
    o.expect_keel_unhurt();
}

/// Not a check: the figures the issue asks for, printed for the record (`--nocapture`).
#[test]
fn linux_boot_figures() {
    let o = outcome();
    for l in o.lines().filter(|l| {
        l.contains("Run /init")
            || l.contains("UPTIME")
            || l.starts_with("keel: ") && l.contains('|')
    }) {
        eprintln!("figure: {l}");
    }
    for (i, t) in o.result.script_matched_at.iter().enumerate() {
        eprintln!(
            "figure: script step {i} matched at {:.1} s wall",
            t.as_secs_f64()
        );
    }
}

/// Rounds of [`linux_stress_on_two_host_cpus`].
const STRESS_ROUNDS: usize = 40;

/// Round `r` of the stress run: a busy loop of varying length, the kernel's interrupt counts and
/// log, the 8250 driver's counters of ttyS0 (`oe:`, `fe:`, `brk:` appear once the driver saw an
/// overrun, a framing error or a break), then `ROUND-<r>.` computed by the shell (so never the
/// echo of what was typed).
fn stress_command(r: usize) -> String {
    let n = 50 + (r * 37) % 300;
    format!(
        "i=0; while [ $i -lt {n} ]; do i=$((i+1)); done; cat /proc/interrupts; dmesg | tail; grep ^0: /proc/tty/driver/serial; echo ROUND-$(({r}+0)).\r"
    )
}

/// The stress variant of the test above, ignored by default (about 10 minutes in Bochs on an
/// idle machine; `cargo itest -- linux::linux_stress --ignored --nocapture`): the Linux
/// guest's two vCPUs on two host CPUs answer 40 rounds of commands, each typed once the last
/// answer is out, then power off. Before the fixes of issue 10 this stopped in 5 of 9 boots
/// (keys lost to COM1's FIFO, or both vCPUs spinning on a guest lock with interrupts off).
#[test]
#[ignore]
fn linux_stress_on_two_host_cpus() {
    let files =
        debian::linux_files(&harness_dir().join("debian")).unwrap_or_else(|e| panic!("{e}"));
    let secs = Duration::from_secs;
    let mut script = vec![Step::new(INIT_MARKER, &stress_command(1), secs(400))];
    for r in 2..=STRESS_ROUNDS {
        script.push(Step::new(
            &format!("ROUND-{}.", r - 1),
            &stress_command(r),
            secs(120),
        ));
    }
    script.push(Step::new(
        &format!("ROUND-{STRESS_ROUNDS}."),
        "poweroff -f\r",
        secs(120),
    ));
    let o = run_script(
        ScriptedBoot {
            name: "linux-stress",
            manifest: MANIFEST,
            files: &files.dir,
            script,
            memory_mib: 512,
            timeout: secs(3000),
        },
        Some(2),
    );
    for r in 1..=STRESS_ROUNDS {
        linux_line_is(&o, &format!("ROUND-{r}."));
    }
    o.expect_line("keel: guest linux ended: powered off (ACPI S5)");
    o.expect_keel_unhurt();
    // What was typed reached the shell as typed: its echo holds no NUL (the shell survives some,
    // so the rounds above can all match with input altered; docs/SECURITY.md, "typed input
    // altered on two host CPUs").
    let altered: Vec<&str> = o
        .guest_lines("linux")
        .filter(|l| l.contains('\0'))
        .collect();
    if let Some(l) = o
        .guest_lines("linux")
        .filter(|l| l.starts_with("0: uart:"))
        .last()
    {
        eprintln!("figure: ttyS0 at the last round: {}", l.trim_end());
    }
    if !altered.is_empty() {
        o.fail(&format!(
            "{} lines of the linux guest hold NUL bytes, the first: {:?}",
            altered.len(),
            altered[0]
        ));
    }
    for (i, t) in o.result.script_matched_at.iter().enumerate() {
        eprintln!(
            "figure: stress step {i} matched at {:.1} s wall",
            t.as_secs_f64()
        );
    }
}
