//! `cargo keel migrate NAME --from SOCKET_A --to SOCKET_B`: live migration of a guest between two
//! running Keels, driven over their control channels (docs/SNAPSHOTS.md, "Live migration").
//!
//! Round 0 and the rounds after it are read from A while the guest runs there and written to B
//! as they come; once a round finds few pages dirty (or after `keel::migrate::MAX_ROUNDS`
//! rounds) A pauses the guest and sends the last pages and its state; B checks the end mark and
//! starts it; then A stops it for good. If B fails on the way (socket closed, an error reply,
//! no reply), A is told `migrate-abort` and the guest runs on there.

use crate::control::{self, field};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// One Keel's control channel: a command line in, its reply line out.
pub trait Channel {
    fn ask(&mut self, command: &str) -> Result<String>;
}

/// The control socket of a `cargo keel run --control PATH`.
pub struct Socket<'a> {
    pub path: &'a Path,
    pub timeout: Duration,
}

impl Channel for Socket<'_> {
    fn ask(&mut self, command: &str) -> Result<String> {
        control::request(self.path, command, self.timeout)
    }
}

/// One pre-copy round as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundReport {
    pub pages: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// What a migration took.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub rounds: Vec<RoundReport>,
    /// Page records that repeated a page of an earlier round.
    pub resent: u64,
    pub bytes: u64,
    /// From A's pause to B's start, in wall time.
    pub downtime: Duration,
    /// A's TSC from the pause to `migrate-done` (in Bochs: instructions).
    pub paused_tsc: u64,
    /// The guest's clock at the pause on A and at its start on B (its own time: they are equal
    /// when no time of its own went missing).
    pub clock_a: u64,
    pub clock_b: u64,
    pub total: Duration,
}

/// How often a line is tried again after a reply that was damaged on the serial line.
const TRIES: u32 = 12;
/// Stream bytes per `migrate-data` line (1 KiB of base64). Short lines: the control channel's
/// flow control keeps bytes from being lost to COM2 overruns, but a line damaged for any other
/// reason is refused by its CRC-32 and sent again whole.
const LINE_BYTES: usize = 768;

fn num(reply: &str, key: &str) -> Result<u64> {
    field(reply, key)?
        .parse()
        .with_context(|| format!("Keel's {key} is not a number: {reply}"))
}

/// How the stream's bytes travel between the Keels (the commands go over the control channels
/// either way).
#[derive(Debug, Clone, Copy)]
pub enum Transport<'p> {
    /// In base64 on the control channels.
    Serial,
    /// Through both Keels' bulk disks (`cargo keel run --bulk FILE`): A's and B's files.
    Disk { a: &'p Path, b: &'p Path },
}

/// Migrates guest `name` from `a` to `b`, printing each round with `log`.
pub fn migrate(
    name: &str,
    a: &mut dyn Channel,
    b: &mut dyn Channel,
    log: &mut dyn FnMut(&str),
) -> Result<Report> {
    migrate_over(name, a, b, Transport::Serial, log)
}

/// [`migrate`] with the stream's bytes going by `transport`.
pub fn migrate_over(
    name: &str,
    a: &mut dyn Channel,
    b: &mut dyn Channel,
    transport: Transport<'_>,
    log: &mut dyn FnMut(&str),
) -> Result<Report> {
    let start = Instant::now();
    let begun = a.ask(&format!("migrate-out {name}"))?;
    field(&begun, "round").context("A refused to migrate the guest out")?;
    let went = b
        .ask(&format!("migrate-in {name}"))
        .and_then(|r| field(&r, "id").map(|_| ()));
    if let Err(e) = went {
        return Err(abort_a(a, e.context("B refused to take the guest")));
    }
    match stream(name, a, b, transport, log, start) {
        Ok(report) => Ok(report),
        Err(Failure::B(e)) => {
            let _ = b.ask("migrate-abort");
            Err(abort_a(a, e))
        }
        Err(Failure::A(e)) => {
            let _ = b.ask("migrate-abort");
            let _ = a.ask("migrate-abort");
            Err(e.context("A failed; both sides were told to abort"))
        }
    }
}

/// Tells A to abort (the guest runs on there) and says so with `e`.
fn abort_a(a: &mut dyn Channel, e: anyhow::Error) -> anyhow::Error {
    match a.ask("migrate-abort") {
        Ok(r) if control::describe(&r).is_ok() => {
            e.context("the migration was aborted; the guest runs on at A")
        }
        Ok(r) => e.context(format!("the migration failed and A refused to abort: {r}")),
        Err(abort) => e.context(format!(
            "the migration failed and A could not be told to abort: {abort:#}"
        )),
    }
}

/// Which side a failure came from.
enum Failure {
    A(anyhow::Error),
    B(anyhow::Error),
}

fn stream(
    name: &str,
    a: &mut dyn Channel,
    b: &mut dyn Channel,
    transport: Transport<'_>,
    log: &mut dyn FnMut(&str),
    start: Instant,
) -> std::result::Result<Report, Failure> {
    let mut offset = 0u64;
    let mut rounds = Vec::new();
    let mut paused: Option<(Instant, u64)> = None;
    loop {
        let round_start = Instant::now();
        let mut bytes = 0u64;
        let (pages, ended) = loop {
            let (reply, data) = match transport {
                Transport::Serial => read(a, offset)
                    .and_then(|r| chunk(&r).map(|d| (r, d)))
                    .map_err(Failure::A)?,
                Transport::Disk { a: disk, .. } => {
                    let mut k = crate::bulk::Keel {
                        channel: &mut *a,
                        bulk: disk,
                    };
                    crate::bulk::read(&mut k, offset).map_err(Failure::A)?
                }
            };
            if data.is_empty() {
                let pages = num(&reply, "sent").map_err(Failure::A)?;
                break (pages, num(&reply, "end").map_err(Failure::A)? == 1);
            }
            match transport {
                Transport::Serial => {
                    for (k, piece) in data.chunks(LINE_BYTES).enumerate() {
                        write(b, piece, offset + (k * LINE_BYTES) as u64).map_err(Failure::B)?;
                    }
                }
                Transport::Disk { b: disk, .. } => {
                    let mut k = crate::bulk::Keel {
                        channel: &mut *b,
                        bulk: disk,
                    };
                    crate::bulk::write(&mut k, offset, &data).map_err(Failure::B)?;
                }
            }
            offset += data.len() as u64;
            bytes += data.len() as u64;
        };
        let r = RoundReport {
            pages,
            bytes,
            elapsed: round_start.elapsed(),
        };
        log(&format!(
            "round {}: {} pages, {} bytes, {:.1} s",
            rounds.len(),
            r.pages,
            r.bytes,
            r.elapsed.as_secs_f64()
        ));
        rounds.push(r);
        if ended || paused.is_some() {
            break;
        }
        let next = a.ask("migrate-next").map_err(Failure::A)?;
        let dirty = num(&next, "pages").map_err(Failure::A)?;
        let round = num(&next, "round").map_err(Failure::A)? as u32;
        if keel::migrate::converged(round, dirty) {
            let fin = a.ask("migrate-final").map_err(Failure::A)?;
            let clock = num(&fin, "clock").map_err(Failure::A)?;
            paused = Some((Instant::now(), clock));
            log(&format!(
                "{name} paused on A: the last round and its state follow"
            ));
        }
    }
    let Some((paused_at, clock_a)) = paused else {
        return Err(Failure::A(anyhow::anyhow!(
            "A ended the stream before the final step"
        )));
    };
    let end = b
        .ask("migrate-end")
        .and_then(|r| num(&r, "clock"))
        .map_err(|e| Failure::B(e.context("B did not start the guest")))?;
    let downtime = paused_at.elapsed();
    // B runs the guest: A only lets its copy go. Its reply carries the figures.
    let done = a
        .ask("migrate-done")
        .context("B runs the guest, but A did not confirm it stopped its copy (`cargo keel ctl kill` it there)")
        .map_err(Failure::A)?;
    let get = |k| num(&done, k).map_err(Failure::A);
    Ok(Report {
        rounds,
        resent: get("resent")?,
        bytes: get("bytes")?,
        downtime,
        paused_tsc: get("paused_tsc")?,
        clock_a,
        clock_b: end,
        total: start.elapsed(),
    })
}

/// The stream bytes of a `migrate-read` reply, checked against its CRC-32.
fn chunk(reply: &str) -> Result<Vec<u8>> {
    let data = keel::snapshot::base64::decode(&field(reply, "data")?)
        .ok_or_else(|| anyhow::anyhow!("a chunk that is not base64"))?;
    anyhow::ensure!(
        u64::from(keel::snapshot::crc32(&data)) == num(reply, "crc32")?,
        "a chunk damaged on the way (CRC-32 differs)"
    );
    Ok(data)
}

/// `migrate-read OFFSET` on A, asked again when the reply was damaged or lost.
fn read(a: &mut dyn Channel, offset: u64) -> Result<String> {
    let mut tries = 0;
    loop {
        let reply = a.ask(&format!("migrate-read {offset}")).and_then(|r| {
            anyhow::ensure!(num(&r, "offset")? == offset, "a chunk for another offset");
            chunk(&r)?;
            Ok(r)
        });
        match reply {
            Err(e) if tries < TRIES => {
                tries += 1;
                eprintln!("keel-boot: migrate-read at {offset}: {e:#}; asking again");
            }
            r => return r,
        }
    }
}

/// `migrate-data CRC32 BASE64` on B: sent again when B says the line came damaged (it then took
/// none of it); B's count must come to `offset` + the chunk.
fn write(b: &mut dyn Channel, data: &[u8], offset: u64) -> Result<()> {
    let line = format!(
        "migrate-data {} {}",
        keel::snapshot::crc32(data),
        keel::snapshot::base64::encode(data)
    );
    let want = offset + data.len() as u64;
    let mut tries = 0;
    loop {
        let reply = match b.ask(&line) {
            Ok(r) => r,
            // The line's end was lost: B still holds the start of it. An empty line ends it (B
            // answers that it is damaged) and the line goes again; B's count then says whether
            // it had come after all.
            Err(e) if tries < TRIES && e.to_string().contains("no reply") => {
                tries += 1;
                eprintln!("keel-boot: migrate-data at {offset}: {e:#}; ending the line and sending it again");
                let _ = b.ask("");
                continue;
            }
            Err(e) => return Err(e),
        };
        match control::describe(&reply) {
            Ok(_) => {
                let got = num(&reply, "received")?;
                if got != want {
                    bail!("B has {got} bytes of the stream, {want} were sent");
                }
                return Ok(());
            }
            // B's own refusals of the stream end the migration there ("... migration
            // abandoned"); any other error is the line damaged on the way (not base64, its CRC,
            // its start lost into another command), and B took none of it.
            Err(e) if tries < TRIES && !e.contains("migration abandoned") => {
                tries += 1;
                eprintln!("keel-boot: migrate-data at {offset}: {e}; sending it again");
            }
            Err(e) => bail!("B refused the stream: {e}"),
        }
    }
}

/// The report for people.
pub fn describe(name: &str, r: &Report) -> String {
    let resent_rounds: u64 = r.rounds.iter().skip(1).map(|x| x.pages).sum();
    format!(
        "{name} migrated: {} rounds ({} pages in round 0, {resent_rounds} after; {} pages resent), \
         {} bytes; downtime {:.1} s (A's TSC {} while paused; the guest's clock {} at the pause, \
         {} at its start on B); total {:.1} s",
        r.rounds.len(),
        r.rounds.first().map_or(0, |x| x.pages),
        r.resent,
        r.bytes,
        r.downtime.as_secs_f64(),
        r.paused_tsc,
        r.clock_a,
        r.clock_b,
        r.total.as_secs_f64()
    )
}

#[cfg(test)]
mod tests;
