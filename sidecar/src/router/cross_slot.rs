//! A `MULTI` … `EXEC` whose keys span slots (`--split-transactions`, on
//! by default): Redis Cluster runs a transaction in one slot only, so the
//! sidecar runs one transaction per slot, all at once, and answers one
//! `EXEC` reply in the client's order. Cache batching does this (Django's
//! `cache.set_many` is `MULTI`, `MSET` of many keys, an `EXPIRE` each,
//! `EXEC`; Laravel's `putMany` a `MULTI` of `SETEX`).
//!
//! What one server would do differently: each slot's commands run
//! atomically on their node, but not with the other slots' (another client
//! may see one slot's effects before another's), and when one slot's
//! transaction fails the others may have run (the reply says so). A
//! multi-key command that spans slots is split as outside a transaction
//! (`MGET`, `MSET`, `DEL`, `UNLINK`, `EXISTS`, `TOUCH`); any other one
//! that does gets `-CROSSSLOT`. Commands without keys run with the first
//! slot's. A transaction across slots that holds `PUBLISH`, `SPUBLISH` or
//! a script or function (which may publish) gets `-CROSSSLOT`: a message
//! would not keep its place among the other slots' commands.

use std::collections::HashMap;

use super::*;

/// Where one queued command runs.
#[derive(Debug, PartialEq)]
enum Parts {
    /// Whole, in group `group` at position `at`.
    One { group: usize, at: usize },
    /// Split per slot (its `split` merge), `keys` keys in all.
    Split {
        split: Split,
        keys: usize,
        pieces: Vec<Piece>,
    },
}

/// One slot's part of a split command: where it runs, and which of the
/// command's keys (by position) it carries.
#[derive(Debug, PartialEq)]
struct Piece {
    group: usize,
    at: usize,
    positions: Vec<usize>,
}

/// The transaction as one transaction per slot.
#[derive(Debug, PartialEq)]
struct Plan {
    /// Per slot, in the order the slots first appear: its commands.
    groups: Vec<(u16, Vec<Vec<Bytes>>)>,
    /// Per queued command, where it runs.
    parts: Vec<Parts>,
    /// Each slot's group (a transaction can hold many: no scan per command).
    index: HashMap<u16, usize>,
    /// It holds a command with effects others see beyond its keys
    /// ([`EFFECTS`]), whose place among the other slots' commands would
    /// not hold.
    effects: bool,
}

/// Commands whose effects others see beyond their keys' values: a message
/// (`PUBLISH`, `SPUBLISH`, or one a script or function sends).
const EFFECTS: &[&str] = &[
    "publish",
    "spublish",
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
];

impl Plan {
    fn group(&mut self, slot: u16) -> usize {
        let next = self.groups.len();
        let g = *self.index.entry(slot).or_insert(next);
        if g == next {
            self.groups.push((slot, Vec::new()));
        }
        g
    }

    /// Add `args` to `slot`'s group; where it landed.
    fn push(&mut self, slot: u16, args: Vec<Bytes>) -> (usize, usize) {
        let group = self.group(slot);
        let cmds = &mut self.groups[group].1;
        cmds.push(args);
        (group, cmds.len() - 1)
    }
}

/// The keys of a queued command (none for an unknown one: refused when
/// queued).
fn keys_of(args: &[Bytes]) -> (Option<&'static CommandInfo>, Vec<usize>) {
    let info = args.first().and_then(|n| commands::lookup(n));
    let keys = match info.map(|i| commands::key_indices(i, args)) {
        Some(Ok(keys)) => keys,
        _ => Vec::new(),
    };
    (info, keys)
}

/// The slot of the first key of `cmds`.
fn first_slot(cmds: &[Vec<Bytes>]) -> Option<u16> {
    cmds.iter().find_map(|args| {
        let (_, keys) = keys_of(args);
        keys.first().map(|&k| slot::slot(&args[k]))
    })
}

/// Plan `cmds` (already checked when queued), or the reply that refuses
/// them. `None` when they fit one slot (the usual single transaction).
fn plan(cmds: &[Vec<Bytes>]) -> Result<Option<Plan>, Bytes> {
    let Some(first) = first_slot(cmds) else {
        return Ok(None);
    };
    let plan = plan_all(cmds, first)?;
    Ok((plan.groups.len() > 1).then_some(plan))
}

/// Plan `cmds` per slot, however many slots they use; commands without
/// keys run with the first key's slot, or `fallback`'s when none has keys.
fn plan_all(cmds: &[Vec<Bytes>], fallback: u16) -> Result<Plan, Bytes> {
    let crossslot = || err("CROSSSLOT Keys in request don't hash to the same slot");
    let mut plan = Plan {
        groups: Vec::new(),
        parts: Vec::new(),
        index: HashMap::new(),
        effects: false,
    };
    // Commands without keys run with the first slot's, in their place.
    let first = first_slot(cmds).unwrap_or(fallback);
    for args in cmds {
        let (info, keys) = keys_of(args);
        let slots: Vec<u16> = keys.iter().map(|&k| slot::slot(&args[k])).collect();
        if info.is_some_and(|i| EFFECTS.contains(&i.name)) {
            plan.effects = true;
        }
        let one = slots.first().copied().unwrap_or(first);
        if slots.iter().all(|&s| s == one) {
            let (group, at) = plan.push(one, args.clone());
            plan.parts.push(Parts::One { group, at });
            continue;
        }
        let Some(split) = info.and_then(|i| i.split) else {
            return Err(crossslot());
        };
        let per_key = if split == Split::AllOk { 2 } else { 1 };
        let mut by_slot: Vec<(u16, Vec<usize>)> = Vec::new();
        let mut at: HashMap<u16, usize> = HashMap::new();
        for (pos, &s) in slots.iter().enumerate() {
            let i = *at.entry(s).or_insert(by_slot.len());
            if i == by_slot.len() {
                by_slot.push((s, Vec::new()));
            }
            by_slot[i].1.push(pos);
        }
        let mut pieces = Vec::new();
        for (s, positions) in by_slot {
            let mut sub = vec![args[0].clone()];
            for &pos in &positions {
                let k = keys[pos];
                sub.extend(args[k..k + per_key].iter().cloned());
            }
            let (group, at) = plan.push(s, sub);
            pieces.push(Piece { group, at, positions });
        }
        plan.parts.push(Parts::Split {
            split,
            keys: keys.len(),
            pieces,
        });
    }
    Ok(plan)
}

/// The client's `EXEC` reply from each slot's replies (in `plan`'s group
/// order), in `proto`.
fn merge(plan: &Plan, replies: &[Vec<Bytes>], proto: u8) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(format!("*{}\r\n", plan.parts.len()).as_bytes());
    for part in &plan.parts {
        out.extend_from_slice(&merge_part(part, replies, proto));
    }
    out.freeze()
}

/// One queued command's reply from its slots' replies.
fn merge_part(part: &Parts, replies: &[Vec<Bytes>], proto: u8) -> Bytes {
    let at = |g: usize, i: usize| replies.get(g).and_then(|r| r.get(i)).cloned();
    let reply = match part {
        Parts::One { group, at: i } => at(*group, *i),
        Parts::Split { split, keys, pieces } => {
            let got: Option<Vec<(&Piece, Bytes)>> =
                pieces.iter().map(|p| at(p.group, p.at).map(|r| (p, r))).collect();
            got.map(|got| merge_split(*split, *keys, &got, proto))
        }
    };
    reply.unwrap_or_else(|| err("ERR cachetier: a reply of a command across slots is missing"))
}

/// One split command's reply from its pieces', as outside a transaction.
fn merge_split(split: Split, keys: usize, got: &[(&Piece, Bytes)], proto: u8) -> Bytes {
    if let Some((_, e)) = got.iter().find(|(_, r)| r.starts_with(b"-")) {
        return e.clone();
    }
    match split {
        Split::AllOk => got
            .iter()
            .find(|(_, r)| !r.starts_with(b"+"))
            .map_or_else(ok, |(_, r)| r.clone()),
        Split::Sum => {
            let mut total: i64 = 0;
            for (_, r) in got {
                match resp::parse(r) {
                    Ok(Frame::Integer(i)) => total = total.saturating_add(i),
                    _ => return r.clone(),
                }
            }
            encode(&Frame::Integer(total))
        }
        Split::Array => {
            let mut values: Vec<Option<Bytes>> = vec![None; keys];
            for (piece, r) in got {
                let Ok(Frame::Array(items)) = resp::parse(r) else {
                    return r.clone();
                };
                for (&pos, item) in piece.positions.iter().zip(items) {
                    if let Some(v) = values.get_mut(pos) {
                        *v = Some(item.to_bytes());
                    }
                }
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(format!("*{keys}\r\n").as_bytes());
            for v in values {
                match v {
                    Some(b) => out.extend_from_slice(&b),
                    None => null(proto).encode(&mut out),
                }
            }
            out.freeze()
        }
    }
}

/// One slot's `EXEC` reply.
enum SlotExec {
    /// Its commands' replies.
    Ran(Vec<Bytes>),
    /// Nil: a key it watched changed.
    Aborted,
    /// An error (or no reply), and its text.
    Failed(String),
}

fn slot_exec(exec: &Bytes) -> SlotExec {
    match resp::parse(exec) {
        Ok(Frame::Array(items)) => SlotExec::Ran(items.iter().map(Frame::to_bytes).collect()),
        Ok(Frame::NullArray | Frame::Null) => SlotExec::Aborted,
        _ => SlotExec::Failed(
            resp::error_text(exec)
                .map(|t| String::from_utf8_lossy(t).into_owned())
                .unwrap_or_else(|| "no reply".into()),
        ),
    }
}

/// Whether a `CLIENT INFO` reply (RESP2 bulk or RESP3 verbatim) shows
/// the connection's watched keys changed (flag `d`: its `EXEC` would fail).
/// `None`: not such a reply.
fn watch_dirty(info: &[u8]) -> Option<bool> {
    let at = info.windows(7).position(|w| w == b" flags=")? + 7;
    let flags = info[at..].split(|&b| b == b' ').next()?;
    Some(flags.contains(&b'd'))
}

/// The refusal of a transaction across slots that holds a command whose
/// effects others see beyond its keys ([`EFFECTS`]).
fn effects_refusal() -> Bytes {
    err(
        "CROSSSLOT Keys in request don't hash to the same slot (a transaction across slots runs as one per slot, \
         and cannot hold PUBLISH, SPUBLISH or a script: its messages would not keep their place among the other slots' commands)",
    )
}

/// The reply when `slot`'s part failed after `ran`'s parts were applied.
fn partial(slots: usize, slot: u16, why: &str, ran: &[u16]) -> Bytes {
    err(format!(
        "ERR cachetier: this transaction spans {slots} slots and ran as one transaction per slot; \
         slot {slot}'s did not run ({why}), and the parts of slots {ran:?} were applied"
    ))
}

impl Router {
    /// Run `cmds` as one transaction per slot when their keys span slots
    /// and `--split-transactions` allows it. `None`: they fit one slot.
    pub(super) async fn exec_across_slots(self: &Arc<Self>, cmds: &[Vec<Bytes>], up: Proto) -> Option<Bytes> {
        let plan = match plan(cmds) {
            Ok(None) => return None,
            Err(e) => return Some(e),
            Ok(Some(_)) if !self.config.split_transactions => {
                return Some(err(
                    "CROSSSLOT Keys in request don't hash to the same slot (a transaction through the sidecar must stay in one slot)",
                ));
            }
            Ok(Some(plan)) if plan.effects => return Some(effects_refusal()),
            Ok(Some(plan)) => plan,
        };
        self.metrics.split_transactions.inc();
        let runs = plan
            .groups
            .iter()
            .map(|(slot, group)| self.exec_block(group, Some(*slot), up));
        let execs = join_all(runs).await;
        let mut replies = Vec::with_capacity(execs.len());
        for ((slot, _), exec) in plan.groups.iter().zip(&execs) {
            match slot_exec(exec) {
                SlotExec::Ran(r) => replies.push(r),
                failed => {
                    let why = match failed {
                        SlotExec::Failed(why) => why,
                        _ => "no reply".into(),
                    };
                    return Some(err(format!(
                        "ERR cachetier: this transaction spans {} slots and ran as one transaction per slot; \
                         slot {slot}'s failed ({why}), and the others' may have been applied",
                        plan.groups.len()
                    )));
                }
            }
        }
        let proto = if up == Proto::Resp3 { 3 } else { 2 };
        Some(merge(&plan, &replies, proto))
    }

    /// A command whose keys span slots while the client watches keys
    /// (arq's `EXISTS` of a job and its result under `WATCH`): split as
    /// outside `WATCH`, each slot's part on its watched connection or, for
    /// a slot not watched, on its primary (never a replica: the optimistic
    /// read must not be stale).
    pub(super) async fn split_under_watch(
        self: &Arc<Self>,
        watches: &[Arc<super::Watch>],
        args: Vec<Bytes>,
        up: Proto,
    ) -> Bytes {
        let Some(fallback) = watches.first().map(|w| w.slot) else {
            return err("ERR cachetier: no watched slot");
        };
        let plan = match plan_all(std::slice::from_ref(&args), fallback) {
            Ok(plan) => plan,
            Err(e) => return e,
        };
        let runs = plan.groups.iter().map(|(slot, cmds)| async move {
            let mut replies = Vec::with_capacity(cmds.len());
            for cmd in cmds {
                let bytes = resp::command_bytes(cmd);
                replies.push(match watches.iter().find(|w| w.slot == *slot) {
                    Some(w) => self.on_watch_conn(w, bytes, 1, up).await,
                    None => self.on_primary(Some(*slot), bytes, up, false).await,
                });
            }
            replies
        });
        let replies = join_all(runs).await;
        let proto = if up == Proto::Resp3 { 3 } else { 2 };
        match plan.parts.first() {
            Some(part) => merge_part(part, &replies, proto),
            None => err("ERR cachetier: nothing to run"),
        }
    }

    /// `EXEC` of a watched transaction whose watched slots and commands'
    /// slots are not one. First every watched slot's connection is asked
    /// whether its watched keys changed (`EXISTS` of them, so an expired
    /// one counts, then `CLIENT INFO`, which shows flag `d`; asking keeps
    /// the watch): if one did, the reply is nil, as from Redis,
    /// and nothing ran. Then the watched slots with commands run their parts
    /// on their connections, all at once, where Redis checks the keys again;
    /// once all of them ran, the other slots' parts run on their primaries.
    /// A watched key that changes in the moment between the check and the
    /// parts' `EXEC`s aborts its part only: the reply is nil if no part ran,
    /// else an error saying which parts were applied; a key of a watched
    /// slot without commands that changes then goes unseen. The parts are
    /// not atomic with each other (see the module's doc).
    pub(super) async fn exec_watched_across_slots(
        self: &Arc<Self>,
        watches: &[Arc<super::Watch>],
        cmds: &[Vec<Bytes>],
        up: Proto,
    ) -> Bytes {
        let Some(fallback) = watches.first().map(|w| w.slot) else {
            return err("ERR cachetier: no watched slot");
        };
        let plan = match plan_all(cmds, fallback) {
            Ok(plan) if plan.effects && plan.groups.len() > 1 => return effects_refusal(),
            Ok(plan) => plan,
            Err(e) => return e,
        };
        self.metrics.split_transactions.inc();
        let mut all: Vec<u16> = plan.groups.iter().map(|(s, _)| *s).collect();
        all.extend(
            watches
                .iter()
                .map(|w| w.slot)
                .filter(|s| !plan.index.contains_key(s)),
        );
        let slots = all.len();
        let group_of = |w: &super::Watch| plan.index.get(&w.slot).copied();
        // A watched key that expired shows only once looked up: EXISTS
        // deletes it, which marks the watch (as EXEC's own check would).
        let checks = watches.iter().map(|w| {
            let keys = w.keys();
            let n = 1 + usize::from(!keys.is_empty());
            let mut bytes = BytesMut::new();
            if !keys.is_empty() {
                let mut exists = vec![Bytes::from_static(b"EXISTS")];
                exists.extend(keys);
                resp::encode_command(&exists, &mut bytes);
            }
            resp::encode_command(&["CLIENT", "INFO"], &mut bytes);
            self.on_watch_conn(w, bytes.freeze(), n, up)
        });
        for info in join_all(checks).await {
            match watch_dirty(&info) {
                Some(false) => {}
                Some(true) => return nil_array(up),
                None if info.starts_with(b"-") => return info,
                None => return err("ERR cachetier: a watched slot's connection did not describe itself"),
            }
        }
        // The watched slots with commands, and their group.
        let with: Vec<(&Arc<super::Watch>, usize)> = watches
            .iter()
            .filter_map(|w| group_of(w).map(|g| (w, g)))
            .collect();
        let runs = with.iter().map(|&(w, g)| {
            let (block, n) = Self::tx_block(&plan.groups[g].1, false);
            self.on_watch_conn(w, block, n, up)
        });
        let execs = join_all(runs).await;
        let mut replies: Vec<Option<Vec<Bytes>>> = vec![None; plan.groups.len()];
        let mut ran: Vec<u16> = Vec::new();
        let mut refused: Option<(u16, Bytes, SlotExec)> = None;
        for (&(w, g), exec) in with.iter().zip(execs) {
            match slot_exec(&exec) {
                SlotExec::Ran(r) => {
                    replies[g] = Some(r);
                    ran.push(w.slot);
                }
                other => refused = refused.or(Some((w.slot, exec, other))),
            }
        }
        match refused {
            Some((_, exec, _)) if ran.is_empty() => return exec,
            Some((slot, _, outcome)) => {
                let why = match outcome {
                    SlotExec::Failed(why) => why,
                    _ => "a key it watched changed".to_string(),
                };
                return partial(slots, slot, &why, &ran);
            }
            None => {}
        }
        let rest: Vec<usize> = (0..plan.groups.len()).filter(|&g| replies[g].is_none()).collect();
        let runs = rest
            .iter()
            .map(|&g| self.exec_block(&plan.groups[g].1, Some(plan.groups[g].0), up));
        let execs = join_all(runs).await;
        let mut failed = None;
        for (&g, exec) in rest.iter().zip(&execs) {
            match slot_exec(exec) {
                SlotExec::Ran(r) => {
                    replies[g] = Some(r);
                    ran.push(plan.groups[g].0);
                }
                SlotExec::Aborted => failed = Some((plan.groups[g].0, "no reply".to_string())),
                SlotExec::Failed(why) => failed = Some((plan.groups[g].0, why)),
            }
        }
        if let Some((slot, why)) = failed {
            return partial(slots, slot, &why, &ran);
        }
        let replies: Vec<Vec<Bytes>> = replies.into_iter().map(Option::unwrap_or_default).collect();
        let proto = if up == Proto::Resp3 { 3 } else { 2 };
        merge(&plan, &replies, proto)
    }
}

#[cfg(test)]
mod tests;
