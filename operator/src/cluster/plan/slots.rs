//! Slot stages: finish or roll back open slots, assign unowned slots.

use super::*;

pub(super) fn fix_open_slots(ctx: &Ctx<'_>, out: &mut Plan) {
    let view = ctx.input.view;
    let by_id = |id: &str| view.nodes.iter().find(|v| ctx.id(v) == Some(id));
    let usable_master = |v: &NodeView| ctx.usable(v) && v.reported().is_some_and(|r| r.myself.master);
    let mut handled = std::collections::BTreeSet::new();
    for v in &view.nodes {
        let (Some(r), Some(me)) = (v.reported(), ctx.target(v)) else {
            continue;
        };
        for (slot, to_id) in &r.myself.migrating {
            if !handled.insert(*slot) {
                continue;
            }
            let dest = by_id(to_id);
            match dest.filter(|t| usable_master(t)).and_then(|t| ctx.target(t)) {
                // A node that does not own the slot has nothing to migrate:
                // its MIGRATING state is left over and is cleared.
                Some(to) if r.myself.owns(*slot) => out.actions.push(Action::FinishMigration {
                    slot: *slot,
                    from: me.clone(),
                    to,
                }),
                // One slow answer is not a dead destination: keys may already
                // be there, and rolling back would hide them.
                None if dest.is_some_and(|t| t.reported().is_none() && !ctx.is_failed(t)) => {
                    out.waiting.push(format!(
                        "slot {slot} is migrating from {} to a node that did not answer; waiting until it answers or is Failed",
                        me.name
                    ));
                }
                _ => out.actions.push(Action::AbortMigration {
                    slot: *slot,
                    node: me.clone(),
                    peer: to_id.clone(),
                }),
            }
        }
    }
    for v in &view.nodes {
        let (Some(r), Some(me)) = (v.reported(), ctx.target(v)) else {
            continue;
        };
        for (slot, from_id) in &r.myself.importing {
            if !handled.insert(*slot) {
                continue;
            }
            // Finish from whoever owns the slot now: the recorded source, or —
            // if the source died mid-migration and was failed over — its
            // promoted replica, so the keys already moved here stay served.
            let owner = ctx.index.owners()[usize::from(*slot)].as_deref();
            let source = by_id(from_id)
                .filter(|s| usable_master(s))
                .filter(|s| s.reported().is_some_and(|sr| sr.myself.owns(*slot)))
                .or_else(|| owner.and_then(by_id).filter(|o| usable_master(o)))
                .filter(|s| ctx.id(s) != Some(me.id.as_str()))
                .and_then(|s| ctx.target(s));
            let owner_down = owner.is_some_and(|o| o != me.id && by_id(o).is_none_or(|v| !usable_master(v)));
            match source {
                Some(from) => out.actions.push(Action::FinishMigration {
                    slot: *slot,
                    from,
                    to: me.clone(),
                }),
                None if owner_down => out.waiting.push(format!(
                    "slot {slot} is importing on {} but its owner is down; waiting for its failover",
                    me.name
                )),
                None => out.actions.push(Action::AbortMigration {
                    slot: *slot,
                    node: me.clone(),
                    peer: from_id.clone(),
                }),
            }
        }
    }
}

pub(super) fn assign_unowned(ctx: &Ctx<'_>, out: &mut Plan) {
    let unowned: Vec<u16> = (0..SLOTS)
        .filter(|&s| ctx.index.owners()[usize::from(s)].is_none())
        .collect();
    if unowned.is_empty() {
        return;
    }
    let shards = ctx.input.tier.shards;
    let mut primaries = Vec::new();
    for shard in 0..shards {
        match ctx
            .primary_of(shard)
            .filter(|p| ctx.usable(p))
            .and_then(|p| ctx.target(p))
        {
            Some(t) => primaries.push(t),
            None => {
                out.waiting
                    .push(format!("shard {shard} has no usable primary to take slots"));
                return;
            }
        }
    }
    if unowned.len() == usize::from(SLOTS) {
        for (node, range) in primaries.into_iter().zip(even_split(shards)) {
            out.actions.push(Action::AddSlots {
                node,
                ranges: vec![range],
            });
        }
        return;
    }
    // Some slots lost their owner (a shard lost every node): give them to the
    // primaries with the fewest slots, in contiguous chunks.
    let mut counts: Vec<(usize, Target)> = primaries
        .into_iter()
        .map(|t| (ctx.slot_count(&t.id), t))
        .collect();
    let mut assigned: BTreeMap<String, (Target, Vec<u16>)> = BTreeMap::new();
    for slot in unowned {
        counts.sort_by_key(|(n, t)| (*n, t.name.clone()));
        let Some((n, t)) = counts.first_mut() else { return };
        *n += 1;
        assigned
            .entry(t.id.clone())
            .or_insert_with(|| (t.clone(), Vec::new()))
            .1
            .push(slot);
    }
    for (_, (node, slots)) in assigned {
        out.actions.push(Action::AddSlots {
            node,
            ranges: ranges(&slots),
        });
    }
}
