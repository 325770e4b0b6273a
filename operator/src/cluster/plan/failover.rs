//! Stage 1: promote a replica of a failed primary when Redis did not (see
//! docs/cluster.md, "Failover").

use super::*;

pub(super) fn failover(ctx: &Ctx<'_>, out: &mut Plan) {
    hand_over_terminating(ctx, out);
    if !out.actions.is_empty() {
        return;
    }
    let grace = ctx.input.tier.timing.node_timeout + ctx.input.tier.timing.failover_margin;
    for shard in ctx.pool_shards() {
        let Some(primary) = ctx.primary_of(shard) else {
            continue;
        };
        let Some(primary_id) = ctx.id(primary) else {
            continue;
        };
        if ctx.slot_count(primary_id) == 0 || !ctx.is_failed(primary) {
            continue;
        }
        // Only the cluster's own verdict justifies forcing: a primary that
        // only the operator cannot reach keeps serving (the status says so).
        if !ctx.input.view.cluster_flags_failed(primary_id) {
            out.waiting.push(format!(
                "primary {} does not answer the operator, but the cluster does not flag it failed; nothing is forced",
                primary.pool.name
            ));
            continue;
        }
        if ctx.failed_for(primary) < grace {
            out.waiting.push(format!(
                "primary {} failed; giving Redis Cluster until {grace:?} to promote a replica",
                primary.pool.name
            ));
            continue;
        }
        let replicas = ctx.input.view.nodes.iter().filter(|v| {
            v.reported()
                .is_some_and(|r| r.myself.replica && r.myself.master_id.as_deref() == Some(primary_id))
        });
        let best = ctx.heir(replicas, Some(shard));
        match best.and_then(|v| ctx.target(v)) {
            Some(to) => out.actions.push(Action::Failover {
                shard,
                from: primary.pool.name.clone(),
                to,
                kind: FailoverKind::Takeover,
            }),
            None => out.waiting.push(format!(
                "primary {} failed and has no healthy replica",
                primary.pool.name
            )),
        }
    }
    // Waiting for Redis to promote must not stall everything else.
    if out.actions.is_empty() {
        out.waiting.clear();
    }
}

/// A slot-owning primary whose pod is being deleted (a drain, `kubectl
/// delete pod`, a node going away) still answers during its pre-stop pause:
/// it hands over to an in-sync replica with a graceful `CLUSTER FAILOVER`
/// (no write is lost) instead of leaving Redis to notice it gone.
fn hand_over_terminating(ctx: &Ctx<'_>, out: &mut Plan) {
    for shard in ctx.pool_shards() {
        let Some(primary) = ctx.primary_of(shard) else {
            continue;
        };
        if !primary.pool.terminating || !ctx.index.answers(primary) || ctx.index.owned_by(primary) == 0 {
            continue;
        }
        if let Some(to) = ctx.in_sync_heir(primary).and_then(|v| ctx.target(v)) {
            out.actions.push(Action::Failover {
                shard,
                from: primary.pool.name.clone(),
                to,
                kind: FailoverKind::Graceful,
            });
        }
    }
}
