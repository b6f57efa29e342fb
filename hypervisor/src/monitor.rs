//! Keel's monitor: the commands an operator gives a running Keel, on its console (`keel>` after
//! Ctrl-A c) and over the control channel (COM2, one JSON object per reply line).
//! docs/BOOTING.md, "The monitor", is the user's description.
//!
//! The monitor works on a [`MonitorTarget`] (the run loop, `runloop::RunLoop`; the tests' fake
//! below), so it knows nothing of VMCSs or of how guests are scheduled. [`Monitor::execute`]
//! turns one command line into a [`Reply`] in the requested [`Form`]; [`Prompt`] is the console's
//! line editor in front of the focus keys (`focus`).

use crate::guest::{GuestStats, EXIT_REASONS};
use crate::vmx::ExitReason;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

/// One guest as the monitor sees it.
#[derive(Debug, Clone)]
pub struct GuestView {
    /// Its id (manifest order from 0), which commands accept as well as its name.
    pub id: usize,
    pub name: String,
    pub state: State,
    /// Why it stopped, for a stopped guest.
    pub stop_reason: Option<String>,
    pub vcpus: u32,
    /// The RAM it has now in bytes: its size less what it gave back (ballooning), 0 when it has
    /// none (not started, or stopped: its memory went back to the pool).
    pub memory: u64,
    pub stats: GuestStats,
    /// Its weight and cap (`weight`, `cap`).
    pub share: crate::sched::Share,
}

/// A guest's run state, as shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Halted,
    Paused,
    Stopped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Halted => "halted",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

/// What a command does to one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    /// Stop it for good (no restart).
    Kill,
    /// Boot it again from its image, running or not.
    Restart,
    /// Boot a stopped guest.
    Start,
    /// Give it the keyboard (COM1 input).
    Console,
}

/// The machine the monitor operates: implemented by `runloop::RunLoop`.
pub trait MonitorTarget {
    /// The host TSC now.
    fn now(&mut self) -> u64;
    /// The host TSC rate.
    fn tsc_hz(&self) -> u64;
    /// How many host CPUs run vCPUs: `list` shows CPU time as a share of all of theirs.
    fn host_cpus(&self) -> u64 {
        1
    }
    /// Every guest, in id order.
    fn guests(&self) -> Vec<GuestView>;
    /// Guest `id`'s registers: (name, value) pairs, general-purpose registers and the VMCS's.
    fn regs(&mut self, id: usize) -> Result<Vec<(&'static str, u64)>, String>;
    /// Applies `op` to guest `id`.
    fn control(&mut self, id: usize, op: Control) -> Result<(), String>;
    /// Stops every guest and ends Keel once the reply is out.
    fn quit(&mut self);
    /// Gives guest `id` a new weight and cap (`weight NAME N`, `cap NAME P%|off`).
    fn set_share(&mut self, id: usize, share: crate::sched::Share) -> Result<(), String>;
    /// `balloon`: asks guest `id` to keep `keep` bytes of its RAM and give the rest back.
    fn balloon(&mut self, _id: usize, _keep: u64) -> Result<BalloonView, String> {
        Err("ballooning is not available".into())
    }
    /// Keel's memory for guests: (free bytes, total bytes), if known.
    fn memory_pool(&self) -> Option<(u64, u64)> {
        None
    }
    /// Takes guest `id`'s snapshot (`snapshot`) and keeps it for [`MonitorTarget::snapshot_read`]
    /// and `restore NAME`: its size and CRC-32. The guest is paused while it is taken, and runs
    /// on after if `resume`.
    fn snapshot(&mut self, id: usize, resume: bool) -> Result<(usize, u32), String> {
        let _ = (id, resume);
        Err("snapshots are not supported here".into())
    }
    /// Up to `len` bytes of the kept snapshot from `offset` (none past its end).
    fn snapshot_read(&mut self, offset: usize, len: usize) -> Result<Vec<u8>, String> {
        let _ = (offset, len);
        Err("no snapshot taken".into())
    }
    /// Starts receiving a snapshot of `size` bytes for guest `id` ([`MonitorTarget::restore_data`],
    /// then [`MonitorTarget::restore_end`]); with no size, restores the kept snapshot at once.
    fn restore_begin(
        &mut self,
        id: usize,
        size: Option<usize>,
        resume: bool,
    ) -> Result<(), String> {
        let _ = (id, size, resume);
        Err("snapshots are not supported here".into())
    }
    /// The next bytes of the snapshot being received: how many it has now.
    fn restore_data(&mut self, data: &[u8]) -> Result<usize, String> {
        let _ = data;
        Err("no restore begun".into())
    }
    /// The snapshot being received is whole: restores it.
    fn restore_end(&mut self) -> Result<(), String> {
        Err("no restore begun".into())
    }
    /// One step of a live migration (`migrate-*`).
    fn migrate(&mut self, op: crate::migrate::Op<'_>) -> Result<crate::migrate::Answer, String> {
        let _ = op;
        Err("live migration is not supported here".into())
    }
}

/// A guest's balloon after `balloon NAME SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonView {
    /// Pages Keel asks it to have given back in all.
    pub target_pages: u64,
    /// Pages it has given back so far.
    pub given_pages: u64,
    /// The RAM it has now, in bytes.
    pub resident: u64,
}

/// Bytes of a snapshot per `snapshot-read` reply (4 KiB of base64 on the line).
pub const SNAPSHOT_CHUNK: usize = 3072;

/// How a reply is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Tables and sentences for the console.
    Text,
    /// One JSON object on one line: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
    Json,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply, ending in a newline.
    pub text: String,
    /// The command failed (the text says why).
    pub failed: bool,
    /// `top`: the console shows `list` again every second until a key is typed.
    pub top: bool,
}

const HELP: &[(&str, &str)] = &[
    ("help", "this list"),
    (
        "list",
        "every guest: id, state, vCPUs, memory, CPU %, exits/s (since the last list)",
    ),
    ("top", "list, refreshed every second until a key is typed"),
    (
        "stats NAME",
        "exits by reason (count, average and max cycles), interrupts, halted time",
    ),
    ("regs NAME", "the guest's registers"),
    (
        "weight NAME N",
        "its CPU weight, 1 to 64 (N times a weight-1 vCPU's CPU time)",
    ),
    (
        "cap NAME P%|off",
        "at most P% of the machine's CPU time (every host CPU's), or no cap",
    ),
    ("pause NAME", "stop scheduling it; its clock stops"),
    (
        "resume NAME",
        "schedule it again, its timers where they were",
    ),
    ("kill NAME", "stop it for good"),
    ("restart NAME", "boot it again from its image"),
    (
        "start NAME",
        "boot a stopped guest (one with autostart = false, or killed)",
    ),
    (
        "balloon NAME SIZE",
        "ask it to keep SIZE of its RAM (like 8M) and give the rest back",
    ),
    (
        "console NAME",
        "give it the keyboard (what is typed on COM1)",
    ),
    (
        "snapshot NAME [paused]",
        "take its snapshot (kept for `restore NAME` and `cargo keel ctl snapshot`); it runs on unless `paused`",
    ),
    (
        "restore NAME [paused]",
        "replace it by the snapshot kept (`cargo keel ctl restore` sends one from a file)",
    ),
    (
        "migrate-out NAME, migrate-in NAME",
        "live migration and bulk-disk snapshots, step by step (`cargo keel migrate` and `cargo keel ctl ... --bulk` drive them; docs/SNAPSHOTS.md)",
    ),
    (
        "quit",
        "stop every guest and end Keel (status 0 when none failed)",
    ),
    ("exit", "leave the prompt (console only; Ctrl-A c too)"),
];

/// A rate sample: per guest (cpu cycles, exits) at host TSC `at`.
#[derive(Debug, Clone)]
struct Sample {
    at: u64,
    guests: Vec<(u64, u64)>,
}

/// The command interpreter. It keeps the last `list` sample, so CPU % and exits/s are over the
/// time since the previous `list` (or `top` refresh), or since Keel started.
#[derive(Debug, Clone)]
pub struct Monitor {
    last: Sample,
}

impl Monitor {
    /// A monitor whose first rates count from host TSC `start`.
    pub fn new(start: u64) -> Self {
        Self {
            last: Sample {
                at: start,
                guests: Vec::new(),
            },
        }
    }

    /// Runs one command line.
    pub fn execute(&mut self, line: &str, target: &mut dyn MonitorTarget, form: Form) -> Reply {
        if let Some(reply) = migration(line, target, form) {
            return reply;
        }
        if let Some(reply) = transfer(line, target, form) {
            return reply;
        }
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else {
            return ok(form, String::new(), Vec::new());
        };
        if matches!(cmd, "weight" | "cap") {
            return shares::command(cmd, words, target, form);
        }
        let arg = words.next();
        if cmd == "balloon" {
            return balloon(target, arg, words.next(), words.next(), form);
        }
        if let Some(extra) = words.next() {
            return err(form, alloc::format!("{cmd}: unexpected {extra:?}"));
        }
        let needs_guest = matches!(
            cmd,
            "stats" | "regs" | "pause" | "resume" | "kill" | "restart" | "start" | "console"
        );
        if !needs_guest && arg.is_some() {
            return err(form, alloc::format!("{cmd} takes no argument"));
        }
        let guests = target.guests();
        let guest = match (needs_guest, arg) {
            (false, _) => None,
            (true, None) => return err(form, alloc::format!("{cmd} needs a guest: {cmd} NAME")),
            (true, Some(a)) => match find(&guests, a) {
                Some(g) => Some(g),
                None => return err(form, alloc::format!("no guest {a:?} (see list)")),
            },
        };
        match (cmd, guest) {
            ("help", _) => help(form),
            ("list", _) => self.list(target, &guests, form),
            ("top", _) => {
                let mut r = self.list(target, &guests, form);
                r.top = form == Form::Text;
                r
            }
            ("quit", _) => {
                target.quit();
                let text = "stopping every guest; Keel ends".to_string();
                ok(form, text, alloc::vec![("quit", Value::Bool(true))])
            }
            ("stats", Some(g)) => stats(g, target.tsc_hz(), form),
            ("regs", Some(g)) => match target.regs(g.id) {
                Ok(regs) => regs_reply(g, &regs, form),
                Err(e) => err(form, alloc::format!("regs {}: {e}", g.name)),
            },
            (_, Some(g)) => {
                let op = match cmd {
                    "pause" => Control::Pause,
                    "resume" => Control::Resume,
                    "kill" => Control::Kill,
                    "restart" => Control::Restart,
                    "start" => Control::Start,
                    _ => Control::Console,
                };
                match target.control(g.id, op) {
                    Ok(()) => {
                        let done = match op {
                            Control::Pause => "paused",
                            Control::Resume => "resumed",
                            Control::Kill => "killed",
                            Control::Restart => "restarted",
                            Control::Start => "started",
                            Control::Console => "has the keyboard",
                        };
                        ok(
                            form,
                            alloc::format!("{} {done}", g.name),
                            alloc::vec![("guest", Value::Str(g.name.clone()))],
                        )
                    }
                    Err(e) => err(form, alloc::format!("{cmd} {}: {e}", g.name)),
                }
            }
            _ => err(
                form,
                alloc::format!("unknown command {cmd:?} (help lists them)"),
            ),
        }
    }

    /// `list`: one row per guest, with rates since the last sample.
    fn list(&mut self, target: &mut dyn MonitorTarget, guests: &[GuestView], form: Form) -> Reply {
        let now = target.now();
        let hz = target.tsc_hz().max(1);
        let span = now.saturating_sub(self.last.at).max(1);
        // CPU time is shown as a share of every host CPU's time, as caps are.
        let machine = u128::from(span) * u128::from(target.host_cpus().max(1));
        let rows: Vec<(&GuestView, u64, u64)> = guests
            .iter()
            .map(|g| {
                let (cpu0, exits0) = self.last.guests.get(g.id).copied().unwrap_or((0, 0));
                let cpu = g.stats.cpu_cycles.saturating_sub(cpu0);
                let exits = g.stats.total_exits().saturating_sub(exits0);
                // CPU % of the machine in tenths, exits per second.
                let permille = (cpu as u128 * 1000 / machine) as u64;
                let rate = (exits as u128 * hz as u128 / span as u128) as u64;
                (g, permille, rate)
            })
            .collect();
        self.last = Sample {
            at: now,
            guests: guests
                .iter()
                .map(|g| (g.stats.cpu_cycles, g.stats.total_exits()))
                .collect(),
        };
        match form {
            Form::Text => {
                let mut t = alloc::format!(
                    "{:>3} {:<16} {:<8} {:>5} {:>9} {:>6} {:>9} {:>6} {:>4}\n",
                    "id",
                    "name",
                    "state",
                    "vcpus",
                    "memory",
                    "cpu %",
                    "exits/s",
                    "weight",
                    "cap"
                );
                for (g, permille, rate) in rows {
                    let _ = writeln!(
                        t,
                        "{:>3} {:<16} {:<8} {:>5} {:>7} M {:>4}.{} {:>9} {:>6} {:>4}",
                        g.id,
                        g.name,
                        g.state.name(),
                        g.vcpus,
                        g.memory >> 20,
                        permille / 10,
                        permille % 10,
                        rate,
                        g.share.weight,
                        shares::cap_text(g.share)
                    );
                }
                if let Some((free, total)) = target.memory_pool() {
                    let _ = writeln!(
                        t,
                        "memory for guests: {} M free of {} M",
                        free >> 20,
                        total >> 20
                    );
                }
                text_reply(t)
            }
            Form::Json => {
                let items = rows
                    .into_iter()
                    .map(|(g, permille, rate)| {
                        let mut o = alloc::vec![
                            ("id", Value::Num(g.id as u64)),
                            ("name", Value::Str(g.name.clone())),
                            ("state", Value::Str(g.state.name().into())),
                            ("vcpus", Value::Num(g.vcpus as u64)),
                            ("memory", Value::Num(g.memory)),
                            ("cpu_permille", Value::Num(permille)),
                            ("exits_per_s", Value::Num(rate)),
                            ("cpu_cycles", Value::Num(g.stats.cpu_cycles)),
                            ("keel_cycles", Value::Num(g.stats.keel_cycles)),
                            ("halted_cycles", Value::Num(g.stats.halted_cycles)),
                        ];
                        shares::fields(g.share, &mut o);
                        if let Some(r) = &g.stop_reason {
                            o.push(("stop_reason", Value::Str(r.clone())));
                        }
                        Value::Obj(o)
                    })
                    .collect();
                // The host TSC of the sample: the time base of the cycle counts.
                let mut fields =
                    alloc::vec![("guests", Value::List(items)), ("tsc", Value::Num(now))];
                if let Some((free, total)) = target.memory_pool() {
                    fields.push(("memory_free", Value::Num(free)));
                    fields.push(("memory_total", Value::Num(total)));
                }
                json_ok(fields)
            }
        }
    }
}

/// `balloon NAME SIZE`.
fn balloon(
    target: &mut dyn MonitorTarget,
    name: Option<&str>,
    size: Option<&str>,
    extra: Option<&str>,
    form: Form,
) -> Reply {
    let (Some(name), Some(size), None) = (name, size, extra) else {
        return err(
            form,
            "balloon needs a guest and a size: balloon NAME 8M".into(),
        );
    };
    let guests = target.guests();
    let Some(g) = find(&guests, name) else {
        return err(form, alloc::format!("no guest {name:?} (see list)"));
    };
    let Some(keep) = crate::manifest::parse_size(size) else {
        return err(
            form,
            alloc::format!("balloon {}: {size:?} is not a size like 8M", g.name),
        );
    };
    match target.balloon(g.id, keep) {
        Ok(b) => ok(
            form,
            alloc::format!(
                "{}: balloon target {} K: {} pages to give back ({} given, {} K in use)",
                g.name,
                keep >> 10,
                b.target_pages,
                b.given_pages,
                b.resident >> 10
            ),
            alloc::vec![
                ("guest", Value::Str(g.name.clone())),
                ("target_pages", Value::Num(b.target_pages)),
                ("given_pages", Value::Num(b.given_pages)),
                ("memory", Value::Num(b.resident)),
            ],
        ),
        Err(e) => err(form, alloc::format!("balloon {}: {e}", g.name)),
    }
}

/// The snapshot commands, whose arguments differ from the others': `snapshot NAME [paused]`,
/// `snapshot-read OFFSET`, `restore NAME [SIZE] [paused]`, `restore-data BASE64`, `restore-end`.
/// The stream goes over the control channel in base64 chunks (docs/SNAPSHOTS.md). None for any
/// other command.
fn transfer(line: &str, target: &mut dyn MonitorTarget, form: Form) -> Option<Reply> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (&cmd, args) = words.split_first()?;
    if !matches!(
        cmd,
        "snapshot" | "snapshot-read" | "restore" | "restore-data" | "restore-end"
    ) {
        return None;
    }
    let paused = args.last() == Some(&"paused");
    let args = if paused {
        &args[..args.len() - 1]
    } else {
        args
    };
    let guests = target.guests();
    let guest = |name: Option<&&str>| match name {
        None => Err(alloc::format!("{cmd} needs a guest: {cmd} NAME")),
        Some(a) => find(&guests, a).ok_or_else(|| alloc::format!("no guest {a:?} (see list)")),
    };
    let number = |a: Option<&&str>| {
        a.and_then(|a| a.parse::<usize>().ok())
            .ok_or_else(|| alloc::format!("{cmd} needs a number"))
    };
    let done: Result<Reply, String> = match cmd {
        "snapshot" if args.len() <= 1 => guest(args.first()).and_then(|g| {
            let (size, crc) = target.snapshot(g.id, !paused)?;
            Ok(ok(
                form,
                alloc::format!(
                    "snapshot of {}: {size} bytes, CRC-32 {crc:#010x} (kept for `restore {}`)",
                    g.name,
                    g.name
                ),
                alloc::vec![
                    ("guest", Value::Str(g.name.clone())),
                    ("bytes", Value::Num(size as u64)),
                    ("crc32", Value::Num(u64::from(crc))),
                    ("chunk", Value::Num(SNAPSHOT_CHUNK as u64)),
                ],
            ))
        }),
        "snapshot-read" if args.len() == 1 => number(args.first()).and_then(|at| {
            let data = target.snapshot_read(at, SNAPSHOT_CHUNK)?;
            Ok(json_ok(alloc::vec![
                ("offset", Value::Num(at as u64)),
                ("data", Value::Str(crate::snapshot::base64::encode(&data))),
            ]))
        }),
        "restore" if args.len() <= 2 => guest(args.first()).and_then(|g| {
            let size = match args.get(1) {
                Some(_) => Some(number(args.get(1))?),
                None => None,
            };
            target.restore_begin(g.id, size, !paused)?;
            let what = if size.is_some() {
                "receiving its snapshot"
            } else {
                "restored"
            };
            Ok(ok(
                form,
                alloc::format!("{} {what}", g.name),
                alloc::vec![("guest", Value::Str(g.name.clone()))],
            ))
        }),
        "restore-data" if args.len() == 1 => crate::snapshot::base64::decode(args[0])
            .ok_or_else(|| "restore-data: not base64".into())
            .and_then(|data| target.restore_data(&data))
            .map(|n| json_ok(alloc::vec![("received", Value::Num(n as u64))])),
        "restore-end" if args.is_empty() => target
            .restore_end()
            .map(|()| ok(form, "restored".into(), alloc::vec![])),
        _ => Err(alloc::format!("{cmd}: wrong arguments (help lists them)")),
    };
    Some(done.unwrap_or_else(|e| err(form, alloc::format!("{cmd}: {e}"))))
}

/// The live-migration commands (docs/SNAPSHOTS.md, "Live migration"): `migrate-out NAME
/// [snapshot [paused]]`, `migrate-read OFFSET [disk]`, `migrate-next`, `migrate-final`,
/// `migrate-done`, `migrate-abort` on the sending Keel; `migrate-in NAME [check]`, `migrate-data
/// CRC32 BASE64`, `migrate-data-disk LEN CRC32`, `migrate-end`, `migrate-abort` on the receiving
/// one. None for any other command.
fn migration(line: &str, target: &mut dyn MonitorTarget, form: Form) -> Option<Reply> {
    use crate::migrate::Op;
    let words: Vec<&str> = line.split_whitespace().collect();
    let (&cmd, args) = words.split_first()?;
    let cmd = cmd.strip_prefix("migrate-").map(|_| cmd)?;
    let guests = target.guests();
    let guest = |name: Option<&&str>| match name {
        None => Err(alloc::format!("{cmd} needs a guest: {cmd} NAME")),
        Some(a) => find(&guests, a)
            .map(|g| g.id)
            .ok_or_else(|| alloc::format!("no guest {a:?} (see list)")),
    };
    let data;
    let op: Result<Op<'_>, String> = match (cmd, args) {
        ("migrate-out", [_]) => guest(args.first()).map(|id| Op::Out { id }),
        ("migrate-out", [_, "snapshot", rest @ ..]) if matches!(rest, [] | ["paused"]) => {
            guest(args.first()).map(|id| Op::Snapshot {
                id,
                resume: rest.is_empty(),
            })
        }
        ("migrate-in", [_]) => guest(args.first()).map(|id| Op::In { id }),
        ("migrate-in", [_, "check"]) => guest(args.first()).map(|id| Op::Check { id }),
        ("migrate-read", [at, rest @ ..]) if matches!(rest, [] | ["disk"]) => at
            .parse()
            .map(|offset| match rest {
                [] => Op::Read { offset },
                _ => Op::ReadDisk { offset },
            })
            .map_err(|_| "migrate-read needs an offset".into()),
        ("migrate-data-disk", [len, crc]) => match (len.parse(), crc.parse()) {
            (Ok(len), Ok(crc)) => Ok(Op::DataDisk { len, crc }),
            _ => Err("migrate-data-disk needs a length and a CRC-32".into()),
        },
        ("migrate-data", [crc, b64]) => {
            // The line's own CRC-32: a line the serial line damaged into other valid base64 is
            // refused here, before the stream sees it, and can be sent again.
            data = crate::snapshot::base64::decode(b64);
            match (data.as_deref(), crc.parse::<u32>()) {
                (None, _) => Err("not base64".into()),
                (Some(d), Ok(c)) if crate::snapshot::crc32(d) == c => Ok(Op::Data(d)),
                _ => Err("a damaged line (its CRC-32 differs)".into()),
            }
        }
        ("migrate-next", []) => Ok(Op::Next),
        ("migrate-final", []) => Ok(Op::Final),
        ("migrate-done", []) => Ok(Op::Done),
        ("migrate-abort", []) => Ok(Op::Abort),
        ("migrate-end", []) => Ok(Op::End),
        _ => Err("wrong arguments (help lists them)".into()),
    };
    let done = op.and_then(|op| target.migrate(op)).map(|a| {
        let mut fields: Vec<(&'static str, Value)> =
            a.fields.iter().map(|&(k, v)| (k, Value::Num(v))).collect();
        if let Some(d) = &a.data {
            fields.push(("crc32", Value::Num(u64::from(crate::snapshot::crc32(d)))));
            fields.push(("data", Value::Str(crate::snapshot::base64::encode(d))));
        }
        ok(form, a.message, fields)
    });
    Some(done.unwrap_or_else(|e| err(form, alloc::format!("{cmd}: {e}"))))
}

/// The guest a command names: by name, or by its id.
fn find<'a>(guests: &'a [GuestView], name: &str) -> Option<&'a GuestView> {
    guests
        .iter()
        .find(|g| g.name == name)
        .or_else(|| name.parse::<usize>().ok().and_then(|id| guests.get(id)))
}

fn help(form: Form) -> Reply {
    match form {
        Form::Text => {
            let mut t = String::new();
            for (cmd, what) in HELP {
                let _ = writeln!(t, "  {cmd:<14} {what}");
            }
            t.push_str("  keys: Ctrl-A c prompt on/off, Ctrl-A 1..9/n focus, Ctrl-A s/p/r stats/pause all/resume all\n");
            text_reply(t)
        }
        Form::Json => json_ok(alloc::vec![(
            "commands",
            Value::List(HELP.iter().map(|(c, _)| Value::Str((*c).into())).collect()),
        )]),
    }
}

/// `stats NAME`: exits by reason with counts and handling cycles, interrupts, halted time.
fn stats(g: &GuestView, hz: u64, form: Form) -> Reply {
    let s = &g.stats;
    let mut reasons: Vec<usize> = (0..EXIT_REASONS).filter(|&r| s.exits[r] > 0).collect();
    reasons.sort_by(|a, b| s.exits[*b].cmp(&s.exits[*a]).then(a.cmp(b)));
    let ms = |cycles: u64| (cycles as u128 * 1000 / hz.max(1) as u128) as u64;
    match form {
        Form::Text => {
            let mut t = alloc::format!(
                "{} ({}): {} exits, {} interrupts injected, halted {} ms, in the guest {} ms, in Keel {} ms, memory in use {} K, weight {}, cap {}\n",
                g.name,
                g.state.name(),
                s.total_exits(),
                s.interrupts_injected,
                ms(s.halted_cycles),
                ms(s.cpu_cycles),
                ms(s.keel_cycles),
                g.memory >> 10,
                g.share.weight,
                shares::cap_text(g.share)
            );
            let _ = writeln!(
                t,
                "  {:<28} {:>10} {:>12} {:>12}",
                "exit", "count", "avg cycles", "max cycles"
            );
            for r in reasons {
                let avg = s
                    .average_exit_cycles(r)
                    .map_or("-".to_string(), |a| a.to_string());
                let max = match s.exits_timed[r] {
                    0 => "-".to_string(),
                    _ => s.exit_cycles_max[r].to_string(),
                };
                let _ = writeln!(
                    t,
                    "  {:<28} {:>10} {:>12} {:>12}",
                    ExitReason::from_basic(r as u16).to_string(),
                    s.exits[r],
                    avg,
                    max
                );
            }
            text_reply(t)
        }
        Form::Json => {
            let exits = reasons
                .into_iter()
                .map(|r| {
                    let mut o = alloc::vec![
                        (
                            "reason",
                            Value::Str(ExitReason::from_basic(r as u16).to_string())
                        ),
                        ("number", Value::Num(r as u64)),
                        ("count", Value::Num(s.exits[r])),
                        ("timed", Value::Num(s.exits_timed[r])),
                    ];
                    if let Some(avg) = s.average_exit_cycles(r) {
                        o.push(("avg_cycles", Value::Num(avg)));
                        o.push(("max_cycles", Value::Num(s.exit_cycles_max[r])));
                    }
                    Value::Obj(o)
                })
                .collect();
            let mut fields = alloc::vec![
                ("guest", Value::Str(g.name.clone())),
                ("state", Value::Str(g.state.name().into())),
                ("exits_total", Value::Num(s.total_exits())),
                ("exits", Value::List(exits)),
                ("interrupts_injected", Value::Num(s.interrupts_injected)),
                ("halted_cycles", Value::Num(s.halted_cycles)),
                ("cpu_cycles", Value::Num(s.cpu_cycles)),
                ("keel_cycles", Value::Num(s.keel_cycles)),
                ("tsc_hz", Value::Num(hz)),
                ("memory", Value::Num(g.memory)),
            ];
            shares::fields(g.share, &mut fields);
            json_ok(fields)
        }
    }
}

fn regs_reply(g: &GuestView, regs: &[(&'static str, u64)], form: Form) -> Reply {
    match form {
        Form::Text => {
            let mut t = alloc::format!("{}:\n", g.name);
            for (i, (name, v)) in regs.iter().enumerate() {
                let _ = write!(t, "  {name:<7}{v:#018x}");
                if i % 3 == 2 || i + 1 == regs.len() {
                    t.push('\n');
                }
            }
            text_reply(t)
        }
        Form::Json => json_ok(alloc::vec![
            ("guest", Value::Str(g.name.clone())),
            (
                "regs",
                Value::Obj(regs.iter().map(|(n, v)| (*n, Value::Num(*v))).collect()),
            ),
        ]),
    }
}

/// A JSON value: enough for the monitor's replies.
#[derive(Debug, Clone)]
enum Value {
    Bool(bool),
    Num(u64),
    Str(String),
    List(Vec<Value>),
    Obj(Vec<(&'static str, Value)>),
}

impl Value {
    fn write(&self, out: &mut String) {
        match self {
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Str(s) => json_string(s, out),
            Value::List(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Value::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    json_string(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// `s` as a JSON string (RFC 8259 section 7: quote, backslash and control characters escaped).
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn text_reply(text: String) -> Reply {
    Reply {
        text,
        failed: false,
        top: false,
    }
}

fn json_ok(mut fields: Vec<(&'static str, Value)>) -> Reply {
    fields.insert(0, ("ok", Value::Bool(true)));
    let mut text = String::new();
    Value::Obj(fields).write(&mut text);
    text.push('\n');
    text_reply(text)
}

/// A success: `message` for the console, `fields` for JSON.
fn ok(form: Form, message: String, fields: Vec<(&'static str, Value)>) -> Reply {
    match form {
        Form::Text if message.is_empty() => text_reply(message),
        Form::Text => text_reply(message + "\n"),
        Form::Json => json_ok(fields),
    }
}

fn err(form: Form, message: String) -> Reply {
    let text = match form {
        Form::Text => alloc::format!("error: {message}\n"),
        Form::Json => {
            let mut t = String::new();
            Value::Obj(alloc::vec![
                ("ok", Value::Bool(false)),
                ("error", Value::Str(message)),
            ])
            .write(&mut t);
            t.push('\n');
            t
        }
    };
    Reply {
        text,
        failed: true,
        top: false,
    }
}

/// The longest command line kept (longer input is cut there).
pub const LINE_MAX: usize = 128;
/// The longest line taken from the control channel: a `restore-data` line carries 6 KiB of
/// base64.
pub const CHANNEL_LINE_MAX: usize = 8192;

/// What one byte typed on COM1 means, with the prompt in front of the focus keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptKey {
    /// For the focus: a byte for the focused guest (`focus::Focus::typed`).
    Pass(u8),
    /// For the focus: the key typed after Ctrl-A (`focus::Focus::command`).
    Prefixed(u8),
    /// The prompt opened (Ctrl-A c): show `keel> `.
    Opened,
    /// The prompt closed (Ctrl-A c, or `exit`).
    Closed,
    /// Echo this byte (typed at the prompt).
    Echo(u8),
    /// Erase the last character typed at the prompt.
    Erase,
    /// A complete command line.
    Line(String),
    /// Nothing to do.
    None,
}

/// The console's line editor: Ctrl-A c opens and closes the `keel>` prompt; the other Ctrl-A
/// keys go on working at the prompt and outside it; every other byte goes to the focused guest
/// while the prompt is closed, and to the command line while it is open.
#[derive(Debug, Default)]
pub struct Prompt {
    open: bool,
    escaped: bool,
    line: String,
}

impl Prompt {
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// What has been typed at the prompt so far.
    pub fn line(&self) -> &str {
        &self.line
    }

    /// Closes the prompt (the `console` command moves the keyboard to a guest).
    pub fn close(&mut self) {
        self.open = false;
        self.line.clear();
    }

    pub fn key(&mut self, byte: u8) -> PromptKey {
        if self.escaped {
            self.escaped = false;
            if byte == b'c' {
                self.open = !self.open;
                self.line.clear();
                return if self.open {
                    PromptKey::Opened
                } else {
                    PromptKey::Closed
                };
            }
            return PromptKey::Prefixed(byte);
        }
        if byte == crate::focus::ESCAPE {
            self.escaped = true;
            return PromptKey::None;
        }
        if !self.open {
            return PromptKey::Pass(byte);
        }
        match byte {
            b'\r' | b'\n' => {
                let line = core::mem::take(&mut self.line);
                if line.trim() == "exit" {
                    self.open = false;
                    return PromptKey::Closed;
                }
                PromptKey::Line(line)
            }
            0x08 | 0x7f => match self.line.pop() {
                Some(_) => PromptKey::Erase,
                None => PromptKey::None,
            },
            0x20..=0x7e if self.line.len() < LINE_MAX => {
                self.line.push(byte as char);
                PromptKey::Echo(byte)
            }
            _ => PromptKey::None,
        }
    }
}

/// The control channel's input: bytes from COM2 into command lines.
#[derive(Debug, Default)]
pub struct LineReader {
    line: String,
    /// The current line grew past [`CHANNEL_LINE_MAX`]: it is answered with an error, not run.
    overlong: bool,
}

/// One line from the control channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelLine {
    Command(String),
    TooLong,
}

impl LineReader {
    pub fn push(&mut self, byte: u8) -> Option<ChannelLine> {
        match byte {
            b'\n' | b'\r' => {
                let line = core::mem::take(&mut self.line);
                if core::mem::take(&mut self.overlong) {
                    return Some(ChannelLine::TooLong);
                }
                (!line.trim().is_empty()).then_some(ChannelLine::Command(line))
            }
            _ if self.line.len() >= CHANNEL_LINE_MAX => {
                self.overlong = true;
                None
            }
            0x20..=0x7e => {
                self.line.push(byte as char);
                None
            }
            _ => None,
        }
    }
}

/// The reply to a control-channel line longer than [`LINE_MAX`].
pub fn too_long() -> Reply {
    err(
        Form::Json,
        alloc::format!("line longer than {CHANNEL_LINE_MAX} bytes"),
    )
}

mod shares;
pub mod table;
#[cfg(test)]
mod tests;
