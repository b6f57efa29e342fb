//! The run loop's side of the load policy (`crate::policy`): it holds the on-demand guests
//! paused until the policy starts them, measures the load at the end of each window, and
//! carries out the policy's decisions, each one logged with the load that made it.

use super::{Cpu, RunLoop, Slot};
use crate::guest::RunState;
use crate::info;
use crate::policy::{Action, Decision, Op, Policy, Seen};
use alloc::string::String;
use alloc::vec::Vec;

impl<C: Cpu> RunLoop<C> {
    /// Puts the on-demand guests under `policy`: they wait, paused before their first
    /// instruction, until it starts them.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        let cfg = policy.config();
        info!(
            "policy: on-demand guests start under {}% load and are {} over {}%, the load measured over {}",
            cfg.start_below,
            match cfg.action {
                Action::Pause => "paused",
                Action::Stop => "stopped",
            },
            cfg.stop_above,
            crate::policy::window_text(cfg.window_ms)
        );
        let managed: Vec<usize> = policy.guests().collect();
        for i in managed {
            if self.slots.get(i).is_some_and(Slot::live) && self.pause(i).is_ok() {
                info!(
                    "policy: {} waits for the load to be under {}%",
                    self.slots[i].vm.name, cfg.start_below
                );
            }
        }
        self.policy = Some(policy);
        self
    }

    /// The hook in each turn of the loop: at the end of a policy window, the load over it and
    /// what the policy does about it. True when it looked (and may have started or stopped a
    /// guest).
    pub(super) fn policy_turn(&mut self, now: u64) -> bool {
        if !self.policy.as_ref().is_some_and(|p| p.due(now)) {
            return false;
        }
        let Some(mut policy) = self.policy.take() else {
            return false;
        };
        // Time on the guests: in them and in Keel for their exits (all of it outside idle sleep),
        // as a share of the machine's (every host CPU's, as weights and caps are).
        let busy = self
            .slots
            .iter()
            .flat_map(|s| &s.vcpus)
            .map(|v| v.stats.cpu_cycles.saturating_add(v.stats.keel_cycles))
            .fold(0u64, u64::saturating_add)
            / self.hosts.len().max(1) as u64;
        let slots = &self.slots;
        let decision = policy.tick(now, busy, |i| slots.get(i).map_or(Seen::Stopped, seen));
        if let Some(d) = decision {
            let done = self.carry_out(&d);
            if let Err(e) = &done {
                info!(
                    "policy: could not {} {}: {e}",
                    op_name(d.op),
                    self.slots[d.guest].vm.name
                );
            }
            policy.done(&d, done.is_ok());
        }
        self.policy = Some(policy);
        true
    }

    fn carry_out(&mut self, d: &Decision) -> Result<(), String> {
        let s = self.slots.get(d.guest).ok_or("no such guest")?;
        info!("policy: {}", d.describe(&s.vm.name));
        match (d.op, seen(s)) {
            (Op::Start, Seen::Paused) => self.resume(d.guest),
            (Op::Start, Seen::Stopped) => self.reboot(d.guest),
            (Op::Start, Seen::Active) => Ok(()),
            (Op::Pause, _) => self.pause(d.guest),
            (Op::Stop, _) => self.stop_for_good(d.guest, "policy"),
        }
    }
}

/// What the policy sees of a guest: its bootstrap processor's state.
fn seen<V>(s: &Slot<V>) -> Seen {
    match s.bsp().state {
        RunState::Paused { .. } => Seen::Paused,
        RunState::Stopped(_) => Seen::Stopped,
        _ => Seen::Active,
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Start => "start",
        Op::Pause => "pause",
        Op::Stop => "stop",
    }
}
