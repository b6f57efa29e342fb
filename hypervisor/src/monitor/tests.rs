//! The monitor driven through a fake target: what each command shows and does, in both forms.

use super::*;
use alloc::vec;

/// Two guests; records what the monitor asked of it.
struct FakeTarget {
    clock: u64,
    guests: Vec<GuestView>,
    done: Vec<(usize, Control)>,
    quit: bool,
    /// The migration steps asked for, as `Debug` text.
    migrated: Vec<String>,
    /// Host CPUs running vCPUs.
    cpus: u64,
}

const HZ: u64 = 1_000_000;

fn view(id: usize, name: &str, state: State) -> GuestView {
    GuestView {
        id,
        name: name.into(),
        state,
        stop_reason: None,
        vcpus: 1,
        memory: 16 << 20,
        stats: GuestStats::default(),
        share: crate::sched::Share::default(),
    }
}

impl FakeTarget {
    fn new() -> Self {
        Self {
            clock: 0,
            guests: vec![
                view(0, "alpha", State::Running),
                view(1, "beta", State::Halted),
            ],
            done: Vec::new(),
            quit: false,
            migrated: Vec::new(),
            cpus: 1,
        }
    }
}

impl MonitorTarget for FakeTarget {
    fn now(&mut self) -> u64 {
        self.clock
    }

    fn tsc_hz(&self) -> u64 {
        HZ
    }

    fn host_cpus(&self) -> u64 {
        self.cpus
    }

    fn guests(&self) -> Vec<GuestView> {
        self.guests.clone()
    }

    fn regs(&mut self, id: usize) -> Result<Vec<(&'static str, u64)>, String> {
        match id {
            0 => Ok(vec![("rax", 0x1234), ("rip", 0x7c00)]),
            _ => Err("the guest has stopped".into()),
        }
    }

    fn control(&mut self, id: usize, op: Control) -> Result<(), String> {
        if op == Control::Resume && self.guests[id].state != State::Paused {
            return Err("the guest is not paused".into());
        }
        self.done.push((id, op));
        if op == Control::Pause {
            self.guests[id].state = State::Paused;
        }
        Ok(())
    }

    fn quit(&mut self) {
        self.quit = true;
    }

    fn set_share(&mut self, id: usize, share: crate::sched::Share) -> Result<(), String> {
        self.guests[id].share = share;
        Ok(())
    }

    fn migrate(&mut self, op: crate::migrate::Op<'_>) -> Result<crate::migrate::Answer, String> {
        use crate::migrate::{Answer, Op};
        self.migrated.push(alloc::format!("{op:?}"));
        match op {
            Op::Read { offset } => Ok(Answer {
                message: String::new(),
                fields: vec![("offset", offset), ("end", 0)],
                data: Some(b"KEELSNAP".to_vec()),
            }),
            Op::End => Err("the snapshot is cut off (no end mark); migration abandoned".into()),
            _ => Ok(Answer {
                message: "fine".into(),
                fields: vec![("round", 1)],
                data: None,
            }),
        }
    }
}

fn run(m: &mut Monitor, t: &mut FakeTarget, line: &str, form: Form) -> Reply {
    m.execute(line, t, form)
}

#[test]
fn list_shows_cpu_share_and_exit_rate_since_the_last_list() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    // In the first half second alpha ran 0.25 s and exited 1000 times.
    t.clock = HZ / 2;
    t.guests[0].stats.cpu_cycles = HZ / 4;
    t.guests[0].stats.exits[10] = 1000;
    let r = run(&mut m, &mut t, "list", Form::Text);
    assert!(!r.failed);
    let lines: Vec<&str> = r.text.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.text);
    assert!(lines[0].contains("cpu %") && lines[0].contains("exits/s"));
    let alpha: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        alpha,
        ["0", "alpha", "running", "1", "16", "M", "50.0", "2000", "1", "-"]
    );
    // The next list counts from here: alpha idle for a second, beta ran 10%.
    t.clock += HZ;
    t.guests[1].stats.cpu_cycles = HZ / 10;
    let r = run(&mut m, &mut t, "list", Form::Json);
    assert_eq!(
        r.text,
        "{\"ok\":true,\"guests\":[\
         {\"id\":0,\"name\":\"alpha\",\"state\":\"running\",\"vcpus\":1,\"memory\":16777216,\"cpu_permille\":0,\"exits_per_s\":0,\"cpu_cycles\":250000,\"keel_cycles\":0,\"halted_cycles\":0,\"weight\":1},\
         {\"id\":1,\"name\":\"beta\",\"state\":\"halted\",\"vcpus\":1,\"memory\":16777216,\"cpu_permille\":100,\"exits_per_s\":0,\"cpu_cycles\":100000,\"keel_cycles\":0,\"halted_cycles\":0,\"weight\":1}],\"tsc\":1500000}\n"
    );
}

/// With several host CPUs `list` shows a guest's CPU time as a share of all of theirs, the
/// measure its cap is in: a guest capped at 10% shows at most 10%.
#[test]
fn list_shows_cpu_time_as_a_share_of_every_host_cpu() {
    let mut t = FakeTarget::new();
    t.cpus = 4;
    let mut m = Monitor::new(0);
    // In one second alpha's two vCPUs ran 0.4 s each: 0.8 of 4 CPU-seconds.
    t.clock = HZ;
    t.guests[0].vcpus = 2;
    t.guests[0].stats.cpu_cycles = HZ * 8 / 10;
    let r = run(&mut m, &mut t, "list", Form::Text);
    let alpha: Vec<&str> = r.text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(alpha[6], "20.0", "{}", r.text);
}

#[test]
fn commands_reach_the_named_guest_by_name_or_id() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    let r = run(&mut m, &mut t, "pause beta", Form::Json);
    assert_eq!(r.text, "{\"ok\":true,\"guest\":\"beta\"}\n");
    let r = run(&mut m, &mut t, "resume 1", Form::Text);
    assert_eq!(r.text, "beta resumed\n");
    for (cmd, op) in [
        ("kill", Control::Kill),
        ("restart", Control::Restart),
        ("start", Control::Start),
        ("console", Control::Console),
    ] {
        assert!(!run(&mut m, &mut t, &alloc::format!("{cmd} alpha"), Form::Json).failed);
        assert_eq!(t.done.last(), Some(&(0, op)));
    }
    assert_eq!(t.done[..2], [(1, Control::Pause), (1, Control::Resume)]);
}

#[test]
fn errors_say_what_is_wrong_and_change_nothing() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    for (line, msg) in [
        ("pause gamma", "no guest \\\"gamma\\\" (see list)"),
        ("pause", "pause needs a guest: pause NAME"),
        ("list all", "list takes no argument"),
        ("stats alpha beta", "stats: unexpected \\\"beta\\\""),
        (
            "frobnicate",
            "unknown command \\\"frobnicate\\\" (help lists them)",
        ),
        ("resume alpha", "resume alpha: the guest is not paused"),
        ("regs beta", "regs beta: the guest has stopped"),
    ] {
        let r = run(&mut m, &mut t, line, Form::Json);
        assert!(r.failed, "{line}");
        assert_eq!(
            r.text,
            alloc::format!("{{\"ok\":false,\"error\":\"{msg}\"}}\n")
        );
    }
    assert!(t.done.is_empty());
    let r = run(&mut m, &mut t, "pause gamma", Form::Text);
    assert_eq!(r.text, "error: no guest \"gamma\" (see list)\n");
}

#[test]
fn stats_gives_counts_and_cycles_per_exit_kind() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    let s = &mut t.guests[0].stats;
    s.exits[10] = 3; // CPUID
    s.record_exit_cycles(10, 900);
    s.record_exit_cycles(10, 1100);
    s.exits[12] = 5; // HLT: ends the slice, untimed
    s.interrupts_injected = 7;
    s.halted_cycles = HZ * 2;
    let r = run(&mut m, &mut t, "stats alpha", Form::Text);
    let lines: Vec<&str> = r.text.lines().collect();
    assert!(
        lines[0].starts_with("alpha (running): 8 exits"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("7 interrupts injected") && lines[0].contains("halted 2000 ms"));
    assert!(
        lines[0].contains(" ms, memory in use 16384 K, weight"),
        "{}",
        lines[0]
    );
    let hlt: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(hlt, ["HLT", "5", "-", "-"]);
    let cpuid: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(cpuid, ["CPUID", "3", "1000", "1100"]);
    let j = run(&mut m, &mut t, "stats 0", Form::Json).text;
    assert!(j.starts_with("{\"ok\":true,\"guest\":\"alpha\",\"state\":\"running\",\"exits_total\":8,\"exits\":[{\"reason\":\"HLT\",\"number\":12,\"count\":5,\"timed\":0},{\"reason\":\"CPUID\",\"number\":10,\"count\":3,\"timed\":2,\"avg_cycles\":1000,\"max_cycles\":1100}],\"interrupts_injected\":7,\"halted_cycles\":2000000,"), "{j}");
    assert!(
        j.contains(",\"tsc_hz\":1000000,\"memory\":16777216,"),
        "{j}"
    );
}

/// `weight` and `cap` change a guest's share; `list` and `stats` show it; bad values are refused
/// with the reason and change nothing.
#[test]
fn weight_and_cap_change_a_guests_share() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    let r = run(&mut m, &mut t, "weight beta 3", Form::Json);
    assert_eq!(r.text, "{\"ok\":true,\"guest\":\"beta\",\"weight\":3}\n");
    let r = run(&mut m, &mut t, "cap 1 25%", Form::Text);
    assert_eq!(r.text, "beta: weight 3, cap 25%\n");
    assert_eq!(
        t.guests[1].share,
        crate::sched::Share {
            weight: 3,
            cap_percent: Some(25)
        }
    );
    let list = run(&mut m, &mut t, "list", Form::Text).text;
    let beta: Vec<&str> = list.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(beta[8..], ["3", "25%"], "{list}");
    let j = run(&mut m, &mut t, "stats beta", Form::Json).text;
    assert!(j.ends_with(",\"weight\":3,\"cap_percent\":25}\n"), "{j}");
    assert!(run(&mut m, &mut t, "stats beta", Form::Text)
        .text
        .lines()
        .next()
        .unwrap()
        .ends_with("weight 3, cap 25%"));
    let r = run(&mut m, &mut t, "cap beta off", Form::Json);
    assert_eq!(r.text, "{\"ok\":true,\"guest\":\"beta\",\"weight\":3}\n");
    assert_eq!(t.guests[1].share.cap_percent, None);
    for (line, msg) in [
        (
            "weight beta 0",
            "weight must be a number from 1 to 64, not `0`",
        ),
        (
            "weight beta 65",
            "weight must be a number from 1 to 64, not `65`",
        ),
        ("weight beta", "usage: weight NAME N (1 to 64)"),
        (
            "cap beta 0%",
            "cap must be a percentage from 1% to 100% or off, not `0%`",
        ),
        (
            "cap beta 101",
            "cap must be a percentage from 1% to 100% or off, not `101`",
        ),
        (
            "cap beta 10% x",
            "usage: cap NAME P% (1% to 100%) or cap NAME off",
        ),
        ("cap gamma 10%", "no guest \\\"gamma\\\" (see list)"),
    ] {
        let r = run(&mut m, &mut t, line, Form::Json);
        assert!(r.failed, "{line}");
        assert_eq!(
            r.text,
            alloc::format!("{{\"ok\":false,\"error\":\"{msg}\"}}\n"),
            "{line}"
        );
    }
    assert_eq!(t.guests[1].share.weight, 3);
}

#[test]
fn regs_help_top_and_quit() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    let r = run(&mut m, &mut t, "regs alpha", Form::Json);
    assert_eq!(
        r.text,
        "{\"ok\":true,\"guest\":\"alpha\",\"regs\":{\"rax\":4660,\"rip\":31744}}\n"
    );
    let r = run(&mut m, &mut t, "regs alpha", Form::Text);
    assert!(r.text.contains("rip    0x0000000000007c00"), "{}", r.text);
    let h = run(&mut m, &mut t, "help", Form::Text).text;
    for (cmd, _) in HELP {
        assert!(h.contains(cmd), "{cmd}");
    }
    assert!(run(&mut m, &mut t, "top", Form::Text).top);
    assert!(!run(&mut m, &mut t, "top", Form::Json).top);
    assert!(!t.quit);
    assert_eq!(
        run(&mut m, &mut t, "quit", Form::Json).text,
        "{\"ok\":true,\"quit\":true}\n"
    );
    assert!(t.quit);
    // An empty line is no command and no error.
    assert_eq!(run(&mut m, &mut t, "  ", Form::Text).text, "");
}

#[test]
fn json_strings_are_escaped() {
    let mut t = FakeTarget::new();
    t.guests[0].name = "a\"b\\c\u{1}".into();
    let mut m = Monitor::new(0);
    let r = run(&mut m, &mut t, "pause 0", Form::Json);
    assert_eq!(r.text, "{\"ok\":true,\"guest\":\"a\\\"b\\\\c\\u0001\"}\n");
}

#[test]
fn the_prompt_opens_and_closes_and_lets_the_focus_keys_through() {
    let mut p = Prompt::default();
    assert_eq!(p.key(b'x'), PromptKey::Pass(b'x'));
    assert_eq!(p.key(crate::focus::ESCAPE), PromptKey::None);
    assert_eq!(p.key(b'2'), PromptKey::Prefixed(b'2'));
    p.key(crate::focus::ESCAPE);
    assert_eq!(p.key(b'c'), PromptKey::Opened);
    assert!(p.is_open());
    let keys: Vec<PromptKey> = b"lisx\x7ft\r".iter().map(|&b| p.key(b)).collect();
    assert_eq!(
        keys,
        [
            PromptKey::Echo(b'l'),
            PromptKey::Echo(b'i'),
            PromptKey::Echo(b's'),
            PromptKey::Echo(b'x'),
            PromptKey::Erase,
            PromptKey::Echo(b't'),
            PromptKey::Line("list".into()),
        ]
    );
    // Ctrl-A s still works at the prompt; Ctrl-A Ctrl-A is a literal for the focus.
    p.key(crate::focus::ESCAPE);
    assert_eq!(p.key(b's'), PromptKey::Prefixed(b's'));
    assert_eq!(p.key(0x7f), PromptKey::None, "nothing to erase");
    for b in b"exit" {
        p.key(*b);
    }
    assert_eq!(p.key(b'\n'), PromptKey::Closed);
    assert_eq!(p.key(b'a'), PromptKey::Pass(b'a'));
    p.key(crate::focus::ESCAPE);
    p.key(b'c');
    p.key(crate::focus::ESCAPE);
    assert_eq!(p.key(b'c'), PromptKey::Closed);
}

#[test]
fn channel_lines_and_overlong_ones() {
    let mut r = LineReader::default();
    let got: Vec<ChannelLine> = b"list\r\n\npause a\n"
        .iter()
        .filter_map(|&b| r.push(b))
        .collect();
    assert_eq!(
        got,
        [
            ChannelLine::Command("list".into()),
            ChannelLine::Command("pause a".into())
        ]
    );
    let long = [b'x'; CHANNEL_LINE_MAX + 5];
    assert!(long.iter().all(|&b| r.push(b).is_none()));
    assert_eq!(r.push(b'\n'), Some(ChannelLine::TooLong));
    assert_eq!(
        too_long().text,
        "{\"ok\":false,\"error\":\"line longer than 8192 bytes\"}\n"
    );
    // The next line is whole again.
    b"help".iter().for_each(|&b| assert!(r.push(b).is_none()));
    assert_eq!(r.push(b'\n'), Some(ChannelLine::Command("help".into())));
}

/// A target with a balloon and a memory pool: records the `balloon` requests it gets.
struct BalloonTarget {
    base: FakeTarget,
    asked: Vec<(usize, u64)>,
}

impl MonitorTarget for BalloonTarget {
    fn now(&mut self) -> u64 {
        self.base.now()
    }
    fn tsc_hz(&self) -> u64 {
        HZ
    }
    fn guests(&self) -> Vec<GuestView> {
        self.base.guests()
    }
    fn regs(&mut self, id: usize) -> Result<Vec<(&'static str, u64)>, String> {
        self.base.regs(id)
    }
    fn control(&mut self, id: usize, op: Control) -> Result<(), String> {
        self.base.control(id, op)
    }
    fn quit(&mut self) {
        self.base.quit()
    }
    fn set_share(&mut self, id: usize, share: crate::sched::Share) -> Result<(), String> {
        self.base.set_share(id, share)
    }
    fn balloon(&mut self, id: usize, keep: u64) -> Result<BalloonView, String> {
        let ram = self.base.guests[id].memory;
        if keep > ram {
            return Err("the guest has only 16384 KiB of RAM".into());
        }
        self.asked.push((id, keep));
        Ok(BalloonView {
            target_pages: (ram - keep) / 4096,
            given_pages: 0,
            resident: ram,
        })
    }
    fn memory_pool(&self) -> Option<(u64, u64)> {
        Some((7 << 20, 56 << 20))
    }
}

#[test]
fn balloon_sets_a_target_and_list_shows_the_pool() {
    let mut t = BalloonTarget {
        base: FakeTarget::new(),
        asked: Vec::new(),
    };
    let mut m = Monitor::new(0);
    let r = m.execute("balloon beta 8M", &mut t, Form::Json);
    assert_eq!(
        r.text,
        "{\"ok\":true,\"guest\":\"beta\",\"target_pages\":2048,\"given_pages\":0,\"memory\":16777216}\n"
    );
    let r = m.execute("balloon 0 12M", &mut t, Form::Text);
    assert_eq!(
        r.text,
        "alpha: balloon target 12288 K: 1024 pages to give back (0 given, 16384 K in use)\n"
    );
    assert_eq!(t.asked, [(1, 8 << 20), (0, 12 << 20)]);
    for (line, error) in [
        (
            "balloon beta",
            "balloon needs a guest and a size: balloon NAME 8M",
        ),
        (
            "balloon beta 8M 9M",
            "balloon needs a guest and a size: balloon NAME 8M",
        ),
        ("balloon nobody 8M", "no guest \"nobody\" (see list)"),
        (
            "balloon beta lots",
            "balloon beta: \"lots\" is not a size like 8M",
        ),
        (
            "balloon beta 20M",
            "balloon beta: the guest has only 16384 KiB of RAM",
        ),
    ] {
        let r = m.execute(line, &mut t, Form::Text);
        assert!(r.failed, "{line}");
        assert_eq!(r.text, alloc::format!("error: {error}\n"), "{line}");
    }
    assert_eq!(t.asked.len(), 2, "refused requests never reach the target");
    let r = m.execute("list", &mut t, Form::Text);
    assert!(
        r.text.ends_with("memory for guests: 7 M free of 56 M\n"),
        "{}",
        r.text
    );
    let r = m.execute("list", &mut t, Form::Json);
    assert!(
        r.text
            .ends_with("],\"tsc\":0,\"memory_free\":7340032,\"memory_total\":58720256}\n"),
        "{}",
        r.text
    );
}

#[test]
fn migrate_commands_reach_the_target_as_steps() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    let r = run(&mut m, &mut t, "migrate-read 6144", Form::Json);
    assert_eq!(
        r.text,
        alloc::format!(
            "{{\"ok\":true,\"offset\":6144,\"end\":0,\"crc32\":{},\"data\":\"S0VFTFNOQVA=\"}}\n",
            crate::snapshot::crc32(b"KEELSNAP")
        )
    );
    let r = run(&mut m, &mut t, "migrate-out beta", Form::Text);
    assert_eq!(r.text, "fine\n");
    let keel = alloc::format!("migrate-data {} S0VFTA==", crate::snapshot::crc32(b"KEEL"));
    run(&mut m, &mut t, &keel, Form::Json);
    run(&mut m, &mut t, "migrate-next", Form::Json);
    assert_eq!(
        t.migrated,
        [
            "Read { offset: 6144 }",
            "Out { id: 1 }",
            "Data([75, 69, 69, 76])",
            "Next"
        ]
    );
    // The target's refusal is the reply, with the command.
    let r = run(&mut m, &mut t, "migrate-end", Form::Json);
    assert!(r.failed);
    assert!(
        r.text.contains("migrate-end: the snapshot is cut off"),
        "{}",
        r.text
    );
}

#[test]
fn the_bulk_disk_steps_reach_the_target() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    for line in [
        "migrate-out beta snapshot",
        "migrate-out beta snapshot paused",
        "migrate-read 4096 disk",
        "migrate-in beta check",
        "migrate-data-disk 1048576 3735928559",
    ] {
        let r = run(&mut m, &mut t, line, Form::Json);
        assert!(!r.failed, "{line}: {}", r.text);
    }
    assert_eq!(
        t.migrated,
        [
            "Snapshot { id: 1, resume: true }",
            "Snapshot { id: 1, resume: false }",
            "ReadDisk { offset: 4096 }",
            "Check { id: 1 }",
            "DataDisk { len: 1048576, crc: 3735928559 }",
        ]
    );
}

#[test]
fn malformed_migrate_commands_never_reach_the_target() {
    let mut t = FakeTarget::new();
    let mut m = Monitor::new(0);
    for (line, why) in [
        ("migrate-data 1 not*base64", "not base64"),
        ("migrate-data 1 S0VFTA==", "damaged line"),
        ("migrate-data S0VFTA==", "wrong arguments"),
        ("migrate-read", "wrong arguments"),
        ("migrate-read ten", "needs an offset"),
        ("migrate-out", "wrong arguments"),
        ("migrate-out gamma", "no guest"),
        ("migrate-next now", "wrong arguments"),
        ("migrate-sideways", "wrong arguments"),
        ("migrate-read 0 tape", "wrong arguments"),
        ("migrate-out beta snapshot later", "wrong arguments"),
        ("migrate-in beta verify", "wrong arguments"),
        ("migrate-data-disk 10", "wrong arguments"),
        ("migrate-data-disk ten 5", "a length and a CRC-32"),
        ("migrate-data-disk 10 4294967296", "a length and a CRC-32"),
    ] {
        let r = run(&mut m, &mut t, line, Form::Json);
        assert!(r.failed && r.text.contains(why), "{line}: {}", r.text);
    }
    assert!(t.migrated.is_empty(), "{:?}", t.migrated);
}
