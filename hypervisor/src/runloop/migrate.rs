//! Live migration in the run loop: the `migrate-*` steps of the control channel, carried out on
//! the guests of this loop with `crate::migrate`'s [`Sender`] and [`Receiver`] and the hardware
//! behind [`MigrateHw`]. docs/SNAPSHOTS.md, "Live migration", is the protocol for users.
//!
//! Out of this Keel: `Out` clears the guest's dirty flags and starts round 0 while it runs;
//! `Read`s take the stream; `Next` starts a round of the pages written since the last began;
//! `Final` pauses the guest and queues the last round and its state; `Done` (the stream read to
//! its end) stops it here for good and frees its RAM; `Abort` resumes it, nothing lost. Into this
//! Keel: `In` gives the (stopped) guest fresh zeroed RAM; `Data` writes the pages as they come;
//! `End` checks the end mark, puts the state in place and starts the guest; `Abort`, or any
//! refused piece, releases the RAM and leaves the guest stopped.

use super::{Cpu, RunLoop};
use crate::bulk::BulkError;
use crate::guest::{Vcpu, Vm};
use crate::migrate::{Answer, Op, PageSet, Receiver, Sender, Source, CHUNK};
use crate::snapshot::{Fingerprint, GuestInfo, PAGE_SIZE};
use crate::{error, info};
use alloc::string::String;
use alloc::vec::Vec;

/// What live migration needs of the hardware, for a guest whose hardware share is `H`.
pub trait MigrateHw<H> {
    /// `begin`: splits the guest's RAM to 4 KiB EPT pages and clears every dirty flag; else adds
    /// to `dirty` the pages written since the last call and clears their flags. Either way the
    /// processor's cached translations are invalidated. Refused without EPT dirty flags.
    fn dirty_pages(
        &mut self,
        hw: &mut H,
        vm: &Vm,
        dirty: &mut PageSet,
        begin: bool,
    ) -> Result<(), String>;
    /// The migration ended with the guest still here (aborted, or abandoned): its RAM goes back
    /// to 2 MiB EPT pages wherever the 4 KiB ones made for tracking still map a whole 2 MiB
    /// block alike, and the processor's cached translations are invalidated. Returns how many
    /// 2 MiB pages came back.
    fn end_tracking(&mut self, hw: &mut H, vm: &Vm) -> Result<u64, String>;
    /// What a stream of the guest says of it and of this CPU, with its clock `clock`.
    fn describe(
        &mut self,
        hw: &mut H,
        vm: &Vm,
        vcpus: usize,
        clock: u64,
    ) -> Result<(Fingerprint, GuestInfo), String>;
    /// The paused guest's state for the end of the stream: the guest section with `clock`, the
    /// platform and every vCPU (switched out).
    fn state(&mut self, hw: &mut H, vm: &Vm, vcpus: &[Vcpu], clock: u64)
        -> Result<Vec<u8>, String>;
    /// Fresh RAM for a guest a stream comes into, all zero.
    fn incoming_ram(&mut self, hw: &mut H, vm: &mut Vm) -> Result<(), String>;
    /// Puts the state `stream` (a snapshot without pages: they are in its RAM) in place; returns
    /// the guest's clock.
    fn restore_state(
        &mut self,
        hw: &mut H,
        vm: &mut Vm,
        vcpus: &mut [Vcpu],
        stream: &[u8],
    ) -> Result<u64, String>;
    /// The bulk disk (docs/SNAPSHOTS.md, "The bulk disk"), if this Keel has one.
    fn bulk(&mut self) -> Option<&mut dyn crate::bulk::Disk> {
        None
    }
}

/// A migration in progress.
pub enum Migration {
    Out {
        id: usize,
        tx: Sender,
        /// The guest's epoch at the start (`Slot::epoch`): a boot since (a restart, or a reset
        /// the guest asked for) or a restore means its RAM is not what was sent.
        epoch: u32,
        /// Whether `Final` paused it (an abort resumes it only then), and the host TSC then.
        paused: Option<(bool, u64)>,
        /// A snapshot (`Op::Snapshot`): `Done` leaves the guest here.
        snapshot: bool,
    },
    In {
        id: usize,
        rx: Receiver,
        /// Only checking (`Op::Check`): nothing is written, the guest is not touched.
        check: bool,
    },
}

/// A sink that writes nothing: a stream checked before it replaces a guest.
struct Nowhere;

impl crate::migrate::Sink for Nowhere {
    fn write_page(&mut self, _: u64, _: Option<&[u8]>) {}
}

/// A guest's RAM read for the stream.
struct Ram<'a>(&'a Vm);

impl Source for Ram<'_> {
    fn read_page(&mut self, n: u64, buf: &mut [u8; PAGE_SIZE]) {
        if self.0.ram.read(n * PAGE_SIZE as u64, buf).is_none() {
            buf.fill(0);
        }
    }
}

/// A guest's RAM written from the stream.
struct Target<'a>(&'a Vm);

impl crate::migrate::Sink for Target<'_> {
    fn write_page(&mut self, n: u64, data: Option<&[u8]>) {
        let zero = [0u8; PAGE_SIZE];
        // The receiver checked the address against the guest's size.
        let _ = self
            .0
            .ram
            .write(n * PAGE_SIZE as u64, data.unwrap_or(&zero));
    }
}

fn answer(message: String, fields: Vec<(&'static str, u64)>) -> Answer {
    Answer {
        message,
        fields,
        data: None,
    }
}

impl<C: Cpu> RunLoop<C> {
    /// One step of a migration (`MonitorTarget::migrate`).
    pub(super) fn migrate_step(&mut self, op: Op<'_>) -> Result<Answer, String> {
        match op {
            Op::Out { id } => self.migrate_out(id),
            Op::Snapshot { id, resume } => self.snapshot_out(id, resume),
            Op::In { id } => self.migrate_in(id, false),
            Op::Check { id } => self.migrate_in(id, true),
            Op::Abort => self.migrate_abort(),
            op => match self.ops.migration.take() {
                None => Err("no migration begun".into()),
                Some(m) => {
                    let (m, done) = self.migrate_on(m, op);
                    self.ops.migration = m;
                    done
                }
            },
        }
    }

    fn migrate_out(&mut self, id: usize) -> Result<Answer, String> {
        if self.ops.migration.is_some() {
            return Err("a migration is in progress (migrate-abort ends it)".into());
        }
        let s = self.slots.get(id).ok_or("no such guest")?;
        if !s.live() {
            return Err("the guest is not running".into());
        }
        self.switch_out();
        let s = &mut self.slots[id];
        let hw = self
            .cpu
            .migration()
            .ok_or("live migration needs the hardware")?;
        let mut none = PageSet::empty(0);
        hw.dirty_pages(&mut s.hw, &s.vm, &mut none, true)?;
        // Keel's own writes into its RAM are dirty too: the EPT's flags do not see them.
        s.vm.ram.log_writes(true);
        let (fingerprint, guest) = hw.describe(&mut s.hw, &s.vm, s.vcpus.len(), 0)?;
        let tx = Sender::new(env!("CARGO_PKG_VERSION"), &fingerprint, &guest);
        info!("guest {}: migrating out", s.vm.name);
        let pages = guest.memory / PAGE_SIZE as u64;
        self.ops.migration = Some(Migration::Out {
            id,
            tx,
            epoch: s.epoch,
            paused: None,
            snapshot: false,
        });
        Ok(answer(
            alloc::format!("{}: round 0 of {pages} pages begun", guest.name),
            alloc::vec![("round", 0), ("pages", pages), ("chunk", CHUNK as u64)],
        ))
    }

    /// Guest `id`'s snapshot as a stream read like a migration's (`Op::Snapshot`): the guest is
    /// paused and its state taken now; its pages are read from its RAM as the stream is.
    fn snapshot_out(&mut self, id: usize, resume: bool) -> Result<Answer, String> {
        if self.ops.migration.is_some() {
            return Err("a migration is in progress (migrate-abort ends it)".into());
        }
        let s = self.slots.get(id).ok_or("no such guest")?;
        if !s.live() {
            return Err("the guest has stopped".into());
        }
        let was_paused = matches!(s.bsp().state, crate::guest::RunState::Paused { .. });
        if !was_paused {
            self.pause(id)?;
        }
        let at = self.cpu.rdtsc();
        let clock = self.paused_clock(id);
        let s = &mut self.slots[id];
        let taken = self
            .cpu
            .migration()
            .ok_or_else(|| String::from("snapshots need the hardware"))
            .and_then(|hw| {
                let (fingerprint, guest) = hw.describe(&mut s.hw, &s.vm, s.vcpus.len(), clock)?;
                let state = hw.state(&mut s.hw, &s.vm, &s.vcpus, clock)?;
                Ok((fingerprint, guest, state))
            });
        let (fingerprint, guest, state) = match taken {
            Ok(t) => t,
            Err(e) => {
                if !was_paused {
                    let _ = self.resume(id);
                }
                return Err(e);
            }
        };
        let tx = Sender::snapshot(env!("CARGO_PKG_VERSION"), &fingerprint, &guest, state);
        info!("guest {}: snapshot streaming", s.vm.name);
        self.ops.migration = Some(Migration::Out {
            id,
            tx,
            epoch: s.epoch,
            paused: Some((!was_paused && resume, at)),
            snapshot: true,
        });
        Ok(answer(
            alloc::format!(
                "{}: snapshot of {} KiB of RAM begun",
                guest.name,
                guest.memory >> 10
            ),
            alloc::vec![("clock", clock), ("chunk", CHUNK as u64)],
        ))
    }

    fn migrate_in(&mut self, id: usize, check: bool) -> Result<Answer, String> {
        if self.ops.migration.is_some() {
            return Err("a migration is in progress (migrate-abort ends it)".into());
        }
        let s = self.slots.get(id).ok_or("no such guest")?;
        if check {
            let vcpus = s.vcpus.len();
            let memory = s.vm.ram.len();
            self.switch_out();
            let s = &mut self.slots[id];
            let hw = self.cpu.migration().ok_or("snapshots need the hardware")?;
            let (here, _) = hw.describe(&mut s.hw, &s.vm, vcpus, 0)?;
            let rx = Receiver::new(memory, vcpus as u32, here);
            self.ops.migration = Some(Migration::In { id, rx, check });
            return Ok(answer(
                alloc::format!("{}: checking a stream", s.vm.name),
                alloc::vec![("id", id as u64)],
            ));
        }
        if s.vcpus.iter().any(|v| v.state.is_live()) {
            return Err(alloc::format!(
                "{} is running here: a guest comes in only to a stopped one (autostart = false, or kill it)",
                s.vm.name
            ));
        }
        self.switch_out();
        let hw = self
            .cpu
            .migration()
            .ok_or("live migration needs the hardware")?;
        let s = &mut self.slots[id];
        hw.incoming_ram(&mut s.hw, &mut s.vm)?;
        let (here, _) = hw.describe(&mut s.hw, &s.vm, s.vcpus.len(), 0)?;
        let rx = Receiver::new(s.vm.ram.len(), s.vcpus.len() as u32, here);
        info!("guest {}: migrating in", s.vm.name);
        let name = s.vm.name.clone();
        self.ops.migration = Some(Migration::In {
            id,
            rx,
            check: false,
        });
        Ok(answer(
            alloc::format!("{name}: receiving"),
            alloc::vec![("id", id as u64)],
        ))
    }

    /// A step of the migration `m` in progress: what remains of it (`None`: it is over).
    fn migrate_on(
        &mut self,
        m: Migration,
        op: Op<'_>,
    ) -> (Option<Migration>, Result<Answer, String>) {
        match m {
            Migration::Out {
                id,
                mut tx,
                epoch,
                paused,
                snapshot,
            } => {
                let s = &self.slots[id];
                if !s.live() || s.epoch != epoch {
                    // Stopped or booted afresh: the pages sent are not its RAM any more.
                    if let Some((true, _)) = paused {
                        let _ = self.resume(id);
                    }
                    self.end_tracking(id);
                    return (
                        None,
                        Err("the guest stopped or restarted: migration abandoned".into()),
                    );
                }
                let done = if snapshot && matches!(op, Op::Done) {
                    self.snapshot_done(id, &tx, paused)
                } else if snapshot && matches!(op, Op::Next | Op::Final) {
                    Err("a snapshot has no rounds".into())
                } else {
                    self.out_step(id, &mut tx, op, paused)
                };
                let keep = |paused| Migration::Out {
                    id,
                    tx,
                    epoch,
                    paused,
                    snapshot,
                };
                match done {
                    Ok((a, Step::Keep(p))) => (Some(keep(p.or(paused))), Ok(a)),
                    Ok((a, Step::Over)) => (None, Ok(a)),
                    Err(e) => (Some(keep(paused)), Err(e)),
                }
            }
            Migration::In { id, mut rx, check } => match self.in_step(id, &mut rx, op, check) {
                Ok((a, true)) => (Some(Migration::In { id, rx, check }), Ok(a)),
                Ok((a, false)) => (None, Ok(a)),
                Err(e) if check => (None, Err(alloc::format!("{e}; nothing changed"))),
                Err(e) => {
                    self.abandon_in(id);
                    (
                        None,
                        Err(alloc::format!(
                            "{e}; migration abandoned, the guest's RAM released"
                        )),
                    )
                }
            },
        }
    }

    fn out_step(
        &mut self,
        id: usize,
        tx: &mut Sender,
        op: Op<'_>,
        paused: Option<(bool, u64)>,
    ) -> Result<(Answer, Step), String> {
        let round_fields = |tx: &Sender, pages: u64| {
            alloc::vec![("round", u64::from(tx.round())), ("pages", pages)]
        };
        match op {
            Op::ReadDisk { offset } => {
                let s = &self.slots[id];
                let disk = self.cpu.migration().and_then(|hw| hw.bulk());
                let disk = disk.ok_or_else(|| alloc::format!("{}", BulkError::NoDisk))?;
                let len = crate::bulk::capacity(disk);
                let data = tx
                    .read(&mut Ram(&s.vm), offset, len)
                    .map_err(|e| alloc::format!("{e}"))?;
                let crc =
                    crate::bulk::put(disk, offset, data).map_err(|e| alloc::format!("{e}"))?;
                let n = data.len() as u64;
                let end = tx.finishing() && n == 0 || tx.ended();
                let mut a = answer(String::new(), read_fields(tx, offset, end));
                a.fields.extend([("len", n), ("crc32", u64::from(crc))]);
                Ok((a, Step::Keep(None)))
            }
            Op::Read { offset } => {
                let s = &self.slots[id];
                let data = tx
                    .read(&mut Ram(&s.vm), offset, CHUNK)
                    .map_err(|e| alloc::format!("{e}"))?
                    .to_vec();
                let end = tx.finishing() && data.is_empty() || tx.ended();
                let mut a = answer(String::new(), read_fields(tx, offset, end));
                a.data = Some(data);
                Ok((a, Step::Keep(None)))
            }
            Op::Next => {
                let dirty = self.collect_dirty(id)?;
                let pages = tx.next_round(&dirty).map_err(|e| alloc::format!("{e}"))?;
                Ok((
                    answer(
                        alloc::format!("round {}: {pages} pages", tx.round()),
                        round_fields(tx, pages),
                    ),
                    Step::Keep(None),
                ))
            }
            Op::Final => {
                if tx.finishing() {
                    return Err("the final step has begun".into());
                }
                let was_paused = matches!(
                    self.slots[id].bsp().state,
                    crate::guest::RunState::Paused { .. }
                );
                if !was_paused {
                    self.pause(id)?;
                }
                let at = self.cpu.rdtsc();
                let clock = self.paused_clock(id);
                let taken = self.collect_dirty(id).and_then(|dirty| {
                    let s = &mut self.slots[id];
                    let hw = self
                        .cpu
                        .migration()
                        .ok_or("live migration needs the hardware")?;
                    let state = hw.state(&mut s.hw, &s.vm, &s.vcpus, clock)?;
                    tx.finish(&dirty, state).map_err(|e| alloc::format!("{e}"))
                });
                let pages = match taken {
                    Ok(p) => p,
                    Err(e) => {
                        if !was_paused {
                            let _ = self.resume(id);
                        }
                        return Err(e);
                    }
                };
                let mut fields = round_fields(tx, pages);
                fields.extend([("clock", clock), ("tsc", at)]);
                Ok((
                    answer(
                        alloc::format!("paused; the last round has {pages} pages"),
                        fields,
                    ),
                    Step::Keep(Some((!was_paused, at))),
                ))
            }
            Op::Done => {
                if !tx.ended() {
                    return Err(alloc::format!(
                        "{}",
                        crate::migrate::MigrateError::NotRead { sent: tx.made() }
                    ));
                }
                let down = paused.map_or(0, |(_, at)| self.cpu.rdtsc().wrapping_sub(at));
                self.stop_for_good(id, "migrated")?;
                let s = &self.slots[id];
                info!("guest {} migrated away", s.vm.name);
                let mut fields = alloc::vec![
                    ("rounds", u64::from(tx.round()) + 1),
                    ("resent", tx.resent()),
                    ("bytes", tx.made()),
                    ("paused_tsc", down),
                ];
                fields.extend(tx.rounds().iter().map(|r| ("round_pages", r.pages)));
                Ok((
                    answer(alloc::format!("{} migrated away", s.vm.name), fields),
                    Step::Over,
                ))
            }
            _ => Err("not a step of a migration out of this Keel".into()),
        }
    }

    fn in_step(
        &mut self,
        id: usize,
        rx: &mut Receiver,
        op: Op<'_>,
        check: bool,
    ) -> Result<(Answer, bool), String> {
        let piece;
        let data = match op {
            Op::Data(data) => Some(data),
            Op::DataDisk { len, crc } => {
                let disk = self.cpu.migration().and_then(|hw| hw.bulk());
                let disk = disk.ok_or_else(|| alloc::format!("{}", BulkError::NoDisk))?;
                piece = crate::bulk::take(disk, len, crc).map_err(|e| alloc::format!("{e}"))?;
                Some(&piece.1[..])
            }
            _ => None,
        };
        if let Some(data) = data {
            let s = &self.slots[id];
            let fed = if check {
                rx.feed(data, &mut Nowhere)
            } else {
                rx.feed(data, &mut Target(&s.vm))
            };
            fed.map_err(|e| alloc::format!("{e}"))?;
            return Ok((
                answer(String::new(), alloc::vec![("received", rx.received())]),
                true,
            ));
        }
        match op {
            Op::End if check => {
                rx.state().map_err(|e| alloc::format!("{e}"))?;
                Ok((
                    answer(
                        alloc::format!("the stream checks: {} pages", rx.pages()),
                        alloc::vec![("pages", rx.pages()), ("bytes", rx.received())],
                    ),
                    false,
                ))
            }
            Op::End => {
                let state = rx.state().map_err(|e| alloc::format!("{e}"))?;
                let mut clock = 0;
                self.restore_with(id, true, |cpu, s| {
                    let hw = cpu.migration().ok_or("live migration needs the hardware")?;
                    clock = hw.restore_state(&mut s.hw, &mut s.vm, &mut s.vcpus, &state)?;
                    Ok(clock)
                })?;
                let name = self.slots[id].vm.name.clone();
                info!("guest {name} migrated in ({} pages)", rx.pages());
                Ok((
                    answer(
                        alloc::format!("{name} runs here"),
                        alloc::vec![
                            ("clock", clock),
                            ("tsc", self.cpu.rdtsc()),
                            ("pages", rx.pages()),
                            ("bytes", rx.received()),
                        ],
                    ),
                    false,
                ))
            }
            _ => Err("not a step of a migration into this Keel".into()),
        }
    }

    /// The pages guest `id` wrote since the last collection, and those Keel wrote into its RAM.
    fn collect_dirty(&mut self, id: usize) -> Result<PageSet, String> {
        self.switch_out();
        let s = &mut self.slots[id];
        let mut dirty = PageSet::empty(s.vm.ram.len() / PAGE_SIZE as u64);
        let hw = self
            .cpu
            .migration()
            .ok_or("live migration needs the hardware")?;
        hw.dirty_pages(&mut s.hw, &s.vm, &mut dirty, false)?;
        s.vm.ram.take_written(&mut |page| dirty.insert(page));
        Ok(dirty)
    }

    /// Gives up a migration into guest `id`: its RAM goes back, it stays stopped.
    fn abandon_in(&mut self, id: usize) {
        let s = &mut self.slots[id];
        self.cpu.release_ram(&mut s.hw, &mut s.vm);
        info!("guest {}: incoming migration abandoned", s.vm.name);
    }

    /// A migration out of guest `id` ended with the guest here: Keel's writes no longer logged,
    /// its EPT back to 2 MiB pages (`MigrateHw::end_tracking`), logged.
    fn end_tracking(&mut self, id: usize) {
        self.switch_out();
        let s = &mut self.slots[id];
        s.vm.ram.log_writes(false);
        let Some(hw) = self.cpu.migration() else {
            return;
        };
        match hw.end_tracking(&mut s.hw, &s.vm) {
            Ok(pages) => info!(
                "guest {}: {pages} 2 MiB EPT pages restored after the migration",
                s.vm.name
            ),
            Err(e) => error!("guest {}: {e}", s.vm.name),
        }
    }

    fn migrate_abort(&mut self) -> Result<Answer, String> {
        match self.ops.migration.take() {
            None => Err("no migration begun".into()),
            Some(Migration::In { check: true, .. }) => Ok(answer(
                "check abandoned; nothing changed".into(),
                alloc::vec![],
            )),
            Some(Migration::In { id, .. }) => {
                self.abandon_in(id);
                Ok(answer(
                    "incoming migration abandoned; the guest's RAM released".into(),
                    alloc::vec![],
                ))
            }
            Some(Migration::Out { id, paused, .. }) => {
                if let Some((true, _)) = paused {
                    self.resume(id)?;
                }
                info!(
                    "guest {}: migration aborted, it runs on",
                    self.slots[id].vm.name
                );
                self.end_tracking(id);
                Ok(answer(
                    "migration aborted; the guest runs on here".into(),
                    alloc::vec![],
                ))
            }
        }
    }
}

impl<C: Cpu> RunLoop<C> {
    /// The snapshot stream was read to its end: the guest runs on (unless it was paused before
    /// or `paused` was asked for).
    fn snapshot_done(
        &mut self,
        id: usize,
        tx: &Sender,
        paused: Option<(bool, u64)>,
    ) -> Result<(Answer, Step), String> {
        if !tx.ended() {
            return Err(alloc::format!(
                "{}",
                crate::migrate::MigrateError::NotRead { sent: tx.made() }
            ));
        }
        if let Some((true, _)) = paused {
            self.resume(id)?;
        }
        let s = &self.slots[id];
        info!(
            "guest {}: snapshot of {} bytes read out",
            s.vm.name,
            tx.made()
        );
        Ok((
            answer(
                alloc::format!("snapshot of {}: {} bytes", s.vm.name, tx.made()),
                alloc::vec![
                    ("bytes", tx.made()),
                    ("pages", tx.rounds().first().map_or(0, |r| r.pages)),
                ],
            ),
            Step::Over,
        ))
    }
}

/// A read's reply fields: where it began, the round, pages left and sent in it, the end.
fn read_fields(tx: &Sender, offset: u64, end: bool) -> Vec<(&'static str, u64)> {
    alloc::vec![
        ("offset", offset),
        ("round", u64::from(tx.round())),
        ("left", tx.left()),
        ("sent", tx.rounds().last().map_or(0, |r| r.pages)),
        ("end", u64::from(end)),
    ]
}

/// What becomes of a migration out after a step.
enum Step {
    /// It goes on; `Some` when the step paused the guest (whether it did, and the host TSC).
    Keep(Option<(bool, u64)>),
    Over,
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::fake::{FakeCpu, FakeVcpu, Op as GuestOp, Program};
    use super::super::{LoopConfig, RunLoop};
    use super::*;
    use crate::vcpu_state::XsaveLayout;

    /// Live migration's hardware on the fake CPU: the pages the test says the guest's own
    /// writes dirtied (as the EPT's flags would show them), and what the run loop asked.
    #[derive(Default)]
    pub struct FakeMigrate {
        /// Pages the processor marked dirty since the last collection.
        pub ept_dirty: Vec<u64>,
        /// Collections made, `begin` first; and ends of tracking.
        pub collections: u32,
        pub tracking_ended: u32,
    }

    impl MigrateHw<FakeVcpu> for FakeMigrate {
        fn dirty_pages(
            &mut self,
            _hw: &mut FakeVcpu,
            _vm: &Vm,
            dirty: &mut PageSet,
            begin: bool,
        ) -> Result<(), String> {
            self.collections += 1;
            for page in self.ept_dirty.drain(..) {
                if !begin {
                    dirty.insert(page);
                }
            }
            Ok(())
        }

        fn end_tracking(&mut self, _hw: &mut FakeVcpu, _vm: &Vm) -> Result<u64, String> {
            self.tracking_ended += 1;
            Ok(0)
        }

        fn describe(
            &mut self,
            _hw: &mut FakeVcpu,
            vm: &Vm,
            vcpus: usize,
            clock: u64,
        ) -> Result<(Fingerprint, GuestInfo), String> {
            let fingerprint = Fingerprint {
                cpuid: Vec::new(),
                xsave: XsaveLayout {
                    xsave: false,
                    supported: 3,
                    components: Vec::new(),
                },
            };
            let guest = GuestInfo {
                name: vm.name.clone(),
                kind: "flat".into(),
                memory: vm.ram.len(),
                vcpus: vcpus as u32,
                tsc_hz: vm.platform.tsc_hz(),
                clock,
            };
            Ok((fingerprint, guest))
        }

        fn state(
            &mut self,
            _hw: &mut FakeVcpu,
            _vm: &Vm,
            _vcpus: &[Vcpu],
            _clock: u64,
        ) -> Result<Vec<u8>, String> {
            Ok(Vec::new())
        }

        fn incoming_ram(&mut self, _hw: &mut FakeVcpu, _vm: &mut Vm) -> Result<(), String> {
            Err("not in these tests".into())
        }

        fn restore_state(
            &mut self,
            _hw: &mut FakeVcpu,
            _vm: &mut Vm,
            _vcpus: &mut [Vcpu],
            _stream: &[u8],
        ) -> Result<u64, String> {
            Err("not in these tests".into())
        }
    }

    fn config() -> LoopConfig {
        let hz = super::super::fake::TSC_HZ;
        LoopConfig::new(hz / 100, hz, Some(0), true)
    }

    /// One guest that computes, on a fake CPU that can migrate it.
    fn rig() -> RunLoop<FakeCpu> {
        let mut cpu = FakeCpu::new();
        cpu.migrate = Some(FakeMigrate::default());
        let slots = alloc::vec![cpu.guest(0, Program::compute(), 0)];
        RunLoop::new(cpu, config(), slots)
    }

    fn fake(rl: &mut RunLoop<FakeCpu>) -> &mut FakeMigrate {
        rl.cpu.migrate.as_mut().expect("a fake with migration")
    }

    fn field(a: &Answer, name: &str) -> u64 {
        a.fields
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no field {name} in {:?}", a.fields))
            .1
    }

    /// Reads the round in progress to its end; returns how many pages it sent.
    fn read_round(rl: &mut RunLoop<FakeCpu>, offset: &mut u64) -> u64 {
        loop {
            let a = rl.migrate_step(Op::Read { offset: *offset }).unwrap();
            let n = a.data.as_ref().map_or(0, |d| d.len() as u64);
            if n == 0 {
                return field(&a, "sent");
            }
            *offset += n;
        }
    }

    /// The brief of issue 13's review: a page Keel writes into the guest's RAM after a round's
    /// collection (an emulated instruction's operand, a hypercall's answer) is in the next
    /// round, though the EPT's dirty flags never see it.
    #[test]
    fn a_page_keel_writes_is_sent_again_in_the_next_round() {
        let mut rl = rig();
        rl.slots[0].vm.ram.write(0x1000, b"loaded").unwrap();
        rl.migrate_step(Op::Out { id: 0 }).unwrap();
        let mut offset = 0;
        assert_eq!(
            read_round(&mut rl, &mut offset),
            1,
            "round 0 skips zero pages"
        );
        // The guest writes page 2 (its EPT says so); Keel writes pages 7 and 8 for it.
        fake(&mut rl).ept_dirty.push(2);
        rl.slots[0].vm.ram.write(0x7ffe, &[0xab; 4]).unwrap();
        let a = rl.migrate_step(Op::Next).unwrap();
        assert_eq!(field(&a, "pages"), 3, "page 2, and 7 and 8 that Keel wrote");
        assert_eq!(read_round(&mut rl, &mut offset), 3);
        // Nothing written since: the next round is empty.
        let a = rl.migrate_step(Op::Next).unwrap();
        assert_eq!(field(&a, "pages"), 0);
    }

    /// A guest that resets itself (port 0xCF9) during a migration is booted afresh with its
    /// restart count unchanged: the pages sent are not its RAM any more, so the migration ends
    /// at the next step, and the guest runs on here.
    #[test]
    fn a_guest_reset_during_a_migration_ends_it() {
        let mut cpu = FakeCpu::new();
        cpu.migrate = Some(FakeMigrate::default());
        let program = Program {
            main: alloc::vec![GuestOp::Run(50_000), GuestOp::Out(0xcf9, 0x06)],
            ..Program::compute()
        };
        let slots = alloc::vec![cpu.guest(0, program, 0)];
        let mut rl = RunLoop::new(cpu, config(), slots);
        rl.migrate_step(Op::Out { id: 0 }).unwrap();
        let boots = rl.slots[0].hw.boots;
        while rl.slots[0].hw.boots == boots {
            assert!(rl.step(), "the guest stopped");
        }
        assert_eq!(rl.slots[0].restarts, 0, "a reset is no restart");
        let e = rl
            .migrate_step(Op::Next)
            .expect_err("the migration goes on");
        assert!(e.contains("stopped or restarted"), "{e}");
        assert_eq!(fake(&mut rl).tracking_ended, 1);
        assert!(rl.ops.migration.is_none());
        assert!(rl.slots[0].live());
    }

    #[test]
    fn an_abort_ends_the_tracking_and_the_log_of_keel_writes() {
        let mut rl = rig();
        rl.migrate_step(Op::Out { id: 0 }).unwrap();
        assert_eq!(
            fake(&mut rl).collections,
            1,
            "the dirty flags cleared at the start"
        );
        rl.migrate_step(Op::Abort).unwrap();
        assert_eq!(fake(&mut rl).tracking_ended, 1, "back to 2 MiB pages");
        rl.slots[0].vm.ram.write(0x3000, b"after").unwrap();
        let mut logged = 0;
        rl.slots[0].vm.ram.take_written(&mut |_| logged += 1);
        assert_eq!(logged, 0, "no log once the migration is over");
        assert!(rl.slots[0].live(), "the guest runs on");
    }
}
