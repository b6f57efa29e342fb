//! `weight NAME N` and `cap NAME P%|off`: a guest's claim on the CPU changed while it runs
//! (`sched::Shares`; docs/SCHEDULING.md, "Weights and caps").

use super::{err, find, ok, Form, MonitorTarget, Reply, Value};
use crate::sched::{Share, WEIGHT_MAX};
use alloc::string::String;
use alloc::vec::Vec;

/// Runs `weight` or `cap` (`cmd`) with the rest of its line in `words`.
pub(super) fn command<'a>(
    cmd: &str,
    mut words: impl Iterator<Item = &'a str>,
    target: &mut dyn MonitorTarget,
    form: Form,
) -> Reply {
    let usage = match cmd {
        "weight" => "weight NAME N (1 to 64)",
        _ => "cap NAME P% (1% to 100%) or cap NAME off",
    };
    let (Some(name), Some(value), None) = (words.next(), words.next(), words.next()) else {
        return err(form, alloc::format!("usage: {usage}"));
    };
    let guests = target.guests();
    let Some(g) = find(&guests, name) else {
        return err(form, alloc::format!("no guest {name:?} (see list)"));
    };
    let mut share = g.share;
    match cmd {
        "weight" => match value.parse::<u32>() {
            Ok(w) if (1..=WEIGHT_MAX).contains(&w) => share.weight = w,
            _ => {
                return err(
                    form,
                    alloc::format!("weight must be a number from 1 to {WEIGHT_MAX}, not `{value}`"),
                )
            }
        },
        _ => match parse_cap(value) {
            Some(cap) => share.cap_percent = cap,
            None => {
                return err(
                    form,
                    alloc::format!(
                        "cap must be a percentage from 1% to 100% or off, not `{value}`"
                    ),
                )
            }
        },
    }
    if let Err(e) = target.set_share(g.id, share) {
        return err(form, alloc::format!("{cmd} {}: {e}", g.name));
    }
    let mut fields = alloc::vec![("guest", Value::Str(g.name.clone()))];
    self::fields(share, &mut fields);
    ok(
        form,
        alloc::format!(
            "{}: weight {}, cap {}",
            g.name,
            share.weight,
            cap_text(share)
        ),
        fields,
    )
}

/// `25%` or `off` (`Some(None)`); `None` if it is neither.
fn parse_cap(value: &str) -> Option<Option<u32>> {
    if value == "off" {
        return Some(None);
    }
    let n: u32 = value.strip_suffix('%').unwrap_or(value).parse().ok()?;
    (1..=100).contains(&n).then_some(Some(n))
}

/// The cap as `list` and `stats` show it: `25%`, or `-` for none.
pub(super) fn cap_text(share: Share) -> String {
    match share.cap_percent {
        Some(c) => alloc::format!("{c}%"),
        None => "-".into(),
    }
}

/// The JSON fields of a share: `weight`, and `cap_percent` when the guest is capped.
pub(super) fn fields(share: Share, out: &mut Vec<(&'static str, Value)>) {
    out.push(("weight", Value::Num(u64::from(share.weight))));
    if let Some(c) = share.cap_percent {
        out.push(("cap_percent", Value::Num(u64::from(c))));
    }
}
