//! Role stages: attach replicas to their shard's primary; evict and remove nodes.

use super::*;

pub(super) fn replicate(ctx: &Ctx<'_>, out: &mut Plan) {
    for shard in ctx.pool_shards() {
        let Some(primary) = ctx.primary_of(shard) else {
            continue;
        };
        let Some(primary_t) = ctx.target(primary) else {
            continue;
        };
        let primary_has_data = ctx.slot_count(&primary_t.id) > 0;
        for v in ctx.nodes_of(shard) {
            if v.pool.name == primary.pool.name || !ctx.usable(v) {
                continue;
            }
            let (Some(r), Some(me)) = (v.reported(), ctx.target(v)) else {
                continue;
            };
            let right_primary = r.myself.master_id.as_deref() == Some(primary_t.id.as_str());
            let empty_master = r.myself.master && ctx.slot_count(&me.id) == 0;
            // A replica of a slot owner holds that shard's data: re-pointing it
            // to a primary without slots (e.g. a node that came back empty)
            // would make it drop the data.
            let follows_owner = r.myself.replica
                && r.myself
                    .master_id
                    .as_deref()
                    .is_some_and(|m| ctx.slot_count(m) > 0);
            if follows_owner && !primary_has_data && !right_primary {
                out.waiting.push(format!(
                    "{} replicates a slot owner; not re-pointing it to {}, which owns no slot",
                    v.pool.name, primary.pool.name
                ));
                continue;
            }
            if (r.myself.replica && !right_primary) || empty_master {
                // `CLUSTER REPLICATE` refuses a master holding keys. It owns no
                // slot, so its keys are served by nobody: a cache drops them.
                if empty_master && r.repl.keys > 0 {
                    if !ctx.input.tier.is_cache() {
                        out.waiting.push(format!(
                            "{} holds {} keys but owns no slot; the tier persists data (redisConfig), so it is not flushed: empty or remove it",
                            v.pool.name, r.repl.keys
                        ));
                        continue;
                    }
                    out.actions.push(Action::Flush { node: me.clone() });
                }
                if r.knows(&primary_t.id) {
                    out.actions.push(Action::Replicate {
                        node: me,
                        primary: primary_t.clone(),
                    });
                } else {
                    out.waiting
                        .push(format!("{} does not know {} yet", v.pool.name, primary.pool.name));
                }
            }
        }
    }
}

pub(super) fn remove(ctx: &Ctx<'_>, out: &mut Plan) {
    let tier = ctx.input.tier;
    let destroy = |v: &NodeView, reason: Removal| Action::DestroyNode {
        name: v.pool.name.clone(),
        shard: v.pool.shard,
        id: ctx.id(v).map(str::to_string),
        reason,
    };
    for v in &ctx.input.view.nodes {
        let owns = ctx.id(v).is_some_and(|id| ctx.slot_count(id) > 0);
        let failed_for = ctx.failed_for(v);
        if failed_for < tier.health.evict_after || !ctx.is_failed(v) {
            continue;
        }
        // A node the cluster still sees alive is only cut off from the
        // operator: evicting it would destroy a working node.
        if ctx.id(v).is_some_and(|id| ctx.input.view.cluster_sees_alive(id)) {
            continue;
        }
        // A failed slot owner is replaced only when its shard has nobody left
        // to promote (a cache accepts the data loss; the slots are reassigned).
        let shard_has_help = ctx
            .nodes_of(v.pool.shard)
            .any(|o| o.pool.name != v.pool.name && ctx.usable(o));
        if !owns || !shard_has_help {
            out.actions.push(destroy(v, Removal::Evicted { failed_for }));
        }
    }
    if !out.actions.is_empty() {
        return;
    }
    // Replicas beyond replicasPerShard; a primary among them hands over first.
    for shard in 0..tier.shards {
        let primary = ctx.primary_of(shard);
        for v in ctx
            .nodes_of(shard)
            .filter(|v| v.pool.ordinal > tier.replicas_per_shard)
        {
            let is_primary = primary.is_some_and(|p| p.pool.name == v.pool.name);
            if !is_primary {
                out.actions.push(destroy(v, Removal::ReplicaRemoved));
                continue;
            }
            let Some(pid) = ctx.id(v) else { continue };
            let heir = ctx
                .nodes_of(shard)
                .filter(|o| ctx.wanted(o) && ctx.usable(o))
                .filter(|o| {
                    o.reported()
                        .is_some_and(|r| r.myself.master_id.as_deref() == Some(pid) && r.repl.link_up)
                })
                .max_by_key(|o| o.reported().map_or(0, |r| r.repl.offset))
                .and_then(|o| ctx.target(o));
            match heir {
                Some(to) => out.actions.push(Action::Failover {
                    shard,
                    from: v.pool.name.clone(),
                    to,
                    kind: FailoverKind::Graceful,
                }),
                None => out.waiting.push(format!(
                    "{} is to be removed but no in-sync replica can take over yet",
                    v.pool.name
                )),
            }
        }
    }
    // Shards beyond spec.shards, once their slots have moved away.
    for shard in ctx.pool_shards().into_iter().filter(|&s| s >= tier.shards) {
        let empty = ctx
            .nodes_of(shard)
            .all(|v| ctx.id(v).is_none_or(|id| ctx.slot_count(id) == 0));
        if empty {
            // Replicas first, so none is left replicating a destroyed primary.
            let mut nodes: Vec<&NodeView> = ctx.nodes_of(shard).collect();
            let primary_name = ctx.primary_of(shard).map(|p| p.pool.name.clone());
            nodes.sort_by_key(|v| Some(&v.pool.name) == primary_name.as_ref());
            for v in nodes {
                out.actions.push(destroy(v, Removal::ShardRemoved));
            }
        }
    }
}
