//! Spec edits that must reach running nodes (see `settings.rs`).
//!
//! Runtime settings get one `CONFIG SET` per node as soon as a node reports
//! a different value. Restart-only settings are rolled out one node at a
//! time, and only while the whole tier is settled (this stage runs after
//! `settle`): a replica is replaced (destroyed, then created again by the
//! `create` stage with the new settings; it full-syncs from its primary); a
//! primary first hands over with a graceful `CLUSTER FAILOVER` to an in-sync
//! replica and is then replaced as a replica. The same "graceful replace" is
//! what image upgrades and pod evictions use on Kubernetes.

use super::{Action, Ctx, FailoverKind, Plan, Removal};
use crate::cluster::settings;
use crate::cluster::view::NodeView;

/// `CONFIG SET` on every reachable node whose runtime settings differ.
pub(super) fn configure(ctx: &Ctx<'_>, out: &mut Plan) {
    let want = settings::desired(ctx.input.tier);
    for v in &ctx.input.view.nodes {
        let (Some(r), Some(node)) = (v.reported(), ctx.target(v)) else {
            continue;
        };
        let (runtime, _) = settings::drift(&want, &r.config);
        if !runtime.is_empty() {
            out.actions.push(Action::SetConfig {
                node,
                settings: runtime,
            });
        }
    }
}

fn in_sync(v: &NodeView) -> bool {
    v.reported()
        .is_some_and(|r| r.myself.master || (r.repl.link_up && !r.repl.sync_in_progress && !r.repl.loading))
}

/// Replaces, one node at a time, nodes whose restart-only settings differ or
/// whose backend definition is outdated (a new image on Kubernetes).
pub(super) fn restart_rollout(ctx: &Ctx<'_>, out: &mut Plan) {
    let want = settings::desired(ctx.input.tier);
    let stale: Vec<(&NodeView, Vec<String>)> = ctx
        .input
        .view
        .nodes
        .iter()
        .filter_map(|v| {
            let mut restart = v
                .reported()
                .map(|r| settings::drift(&want, &r.config).1)
                .unwrap_or_default();
            if v.pool.outdated {
                restart.push("its pod template (image or pod settings)".to_string());
            }
            (!restart.is_empty()).then_some((v, restart))
        })
        .collect();
    if stale.is_empty() {
        return;
    }
    if let Some(p) = ctx.input.view.pending.first() {
        out.waiting.push(format!(
            "restart-only settings wait until {} runs ({})",
            p.name, p.detail
        ));
        return;
    }
    if let Some(v) = ctx
        .input
        .view
        .nodes
        .iter()
        .find(|v| !ctx.usable(v) || !in_sync(v))
    {
        out.waiting.push(format!(
            "restart-only settings wait until {} is serving again",
            v.pool.name
        ));
        return;
    }
    let owns = |v: &NodeView| ctx.id(v).is_some_and(|id| ctx.slot_count(id) > 0);
    // Replicas (and slot-less masters) first.
    if let Some((v, keys)) = stale.iter().find(|(v, _)| !owns(v)) {
        out.actions.push(Action::DestroyNode {
            name: v.pool.name.clone(),
            shard: v.pool.shard,
            id: ctx.id(v).map(str::to_string),
            reason: Removal::Restarted {
                settings: keys.join(","),
            },
        });
        return;
    }
    let Some((primary, keys)) = stale.first() else {
        return;
    };
    let heir = ctx.in_sync_heir(primary).and_then(|o| ctx.target(o));
    match heir {
        Some(to) => out.actions.push(Action::Failover {
            shard: primary.pool.shard,
            from: primary.pool.name.clone(),
            to,
            kind: FailoverKind::Graceful,
        }),
        None => out.waiting.push(format!(
            "{} needs a restart for {} but has no in-sync replica to hand over to",
            primary.pool.name,
            keys.join(", ")
        )),
    }
}
