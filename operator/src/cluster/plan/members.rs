//! Membership stages: create missing nodes, forget stale members, meet.

use super::*;

pub(super) fn create_missing(ctx: &Ctx<'_>, out: &mut Plan) {
    let tier = ctx.input.tier;
    for shard in 0..tier.shards {
        for ordinal in 0..=tier.replicas_per_shard {
            let view = ctx.input.view;
            let exists = view
                .nodes
                .iter()
                .any(|v| v.pool.shard == shard && v.pool.ordinal == ordinal)
                || view
                    .pending
                    .iter()
                    .any(|p| p.shard == shard && p.ordinal == ordinal);
            if !exists {
                out.actions.push(Action::CreateNode { shard, ordinal });
            }
        }
    }
}

pub(super) fn forget_stale(ctx: &Ctx<'_>, out: &mut Plan) {
    let known: Vec<&String> = ctx.index.ids().values().collect();
    for (id, line) in ctx.input.view.all_lines() {
        if !known.contains(&&id) && line.slots.is_empty() {
            out.actions.push(Action::Forget { id });
        }
    }
}

pub(super) fn meet(ctx: &Ctx<'_>, out: &mut Plan) {
    let reachable: Vec<&NodeView> = ctx
        .input
        .view
        .nodes
        .iter()
        .filter(|v| v.reported().is_some())
        .collect();
    let Some(anchor) = reachable.iter().max_by_key(|v| {
        (
            ctx.id(v).map_or(0, |id| ctx.slot_count(id)),
            std::cmp::Reverse(v.pool.shard),
        )
    }) else {
        return;
    };
    let (Some(anchor_report), Some(anchor_id)) = (anchor.reported(), ctx.id(anchor)) else {
        return;
    };
    for v in &reachable {
        let (Some(r), Some(id)) = (v.reported(), ctx.id(v)) else {
            continue;
        };
        if id == anchor_id || anchor_report.knows(id) {
            continue;
        }
        // A node the cluster forgot still knows the cluster, so it would never
        // meet anyone itself: the anchor meets it instead.
        let (node, peer) = if r.knows(anchor_id) {
            (anchor.pool.addr, v.pool.addr)
        } else {
            (v.pool.addr, anchor.pool.addr)
        };
        out.actions.push(Action::Meet { node, peer });
    }
    if !out.actions.is_empty() {
        return;
    }
    // Everyone reachable must know everyone reachable before slots or replicas
    // are assigned: `CLUSTER REPLICATE` and `SETSLOT` name nodes by id. A node
    // that forgot a peer which still knows it ignores gossip about that peer
    // for a minute (Redis's forget ban), so one-sided pairs meet directly, a
    // few per round.
    let mut unknown = None;
    for a in &reachable {
        for b in &reachable {
            if let (Some(ra), Some(ida), Some(idb)) = (a.reported(), ctx.id(a), ctx.id(b))
                && !ra.knows(idb)
            {
                unknown.get_or_insert_with(|| format!("{} does not know {} yet", a.pool.name, b.pool.name));
                if b.reported().is_some_and(|rb| rb.knows(ida)) && out.actions.len() < MEETS_PER_ROUND {
                    out.actions.push(Action::Meet {
                        node: a.pool.addr,
                        peer: b.pool.addr,
                    });
                }
            }
        }
    }
    if out.actions.is_empty()
        && let Some(w) = unknown
    {
        out.waiting.push(w);
    }
}

/// Most one-sided MEETs planned per round (gossip usually closes such gaps
/// by itself within a moment; the MEETs are for nodes a forget ban blocks).
const MEETS_PER_ROUND: usize = 8;
