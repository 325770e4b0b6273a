//! Slots owned by a node that no pool node is ("orphans").
//!
//! On Kubernetes a StatefulSet recreates a pod under the same name with empty
//! data and a new address; locally a node restarted empty does the same. The
//! new process is a new cluster node (new id). The old id may still own its
//! shard's slots — Redis has not failed it over yet, or never will. Nothing
//! else in the plan handles such an owner, and the empty newcomer must never
//! be taken for the shard's primary: re-pointing the surviving replica to it
//! makes that replica drop its data.
//!
//! Rules (see `docs/cluster.md`, "A node that comes back empty"):
//! - an orphan owner is *gone* when the pool has a different incarnation under
//!   its announced name or address, or when a majority of the reachable
//!   slot-owning primaries flag it `fail` (or `fail?`, see
//!   `ClusterView::cluster_flags_failed`);
//! - a gone owner with a replica in the pool that completed a sync →
//!   `CLUSTER FAILOVER TAKEOVER` on the most up-to-date one;
//! - a gone owner with no replica left → forgotten everywhere, so its slots
//!   become unowned and are reassigned (the data was already lost);
//! - an owner that is not known to be gone is left alone (another operator's
//!   node, or a partition): the replicate and rebalance stages wait.

use super::{Action, Ctx, FailoverKind, Plan};
use crate::cluster::view::{NodeLine, NodeView};

/// A slot owner that is no pool node.
#[derive(Debug)]
pub(super) struct Orphan<'a> {
    /// Its cluster line (the freshest claim).
    pub line: NodeLine,
    /// Pool nodes that replicate it.
    pub replicas: Vec<&'a NodeView>,
    /// Why it is known to be gone, if it is.
    pub gone: Option<String>,
}

impl Orphan<'_> {
    /// How the orphan is named in messages: its announced name, else its id.
    pub fn label(&self) -> String {
        self.line
            .hostname
            .clone()
            .unwrap_or_else(|| self.line.id.chars().take(8).collect())
    }
}

/// Every slot owner that is no pool node's current id.
pub(super) fn orphans<'a>(ctx: &Ctx<'a>) -> Vec<Orphan<'a>> {
    let lines = ctx.input.view.all_lines();
    let pool_ids: Vec<&String> = ctx.index.ids().values().collect();
    let mut out = Vec::new();
    for (id, count) in ctx.index.by_owner().iter().map(|(id, s)| (id, s.len())) {
        if count == 0 || pool_ids.contains(&id) {
            continue;
        }
        let Some(line) = lines.get(id).cloned() else {
            continue;
        };
        let replicas: Vec<&NodeView> = ctx
            .input
            .view
            .nodes
            .iter()
            .filter(|v| {
                v.reported()
                    .is_some_and(|r| r.myself.replica && r.myself.master_id.as_deref() == Some(id.as_str()))
            })
            .collect();
        let gone = gone_because(ctx, &line);
        out.push(Orphan { line, replicas, gone });
    }
    out.sort_by(|a, b| a.line.id.cmp(&b.line.id));
    out
}

/// Why `line`'s node is known to be gone: its name or address now belongs to
/// another incarnation, or the cluster agreed it failed.
fn gone_because(ctx: &Ctx<'_>, line: &NodeLine) -> Option<String> {
    let view = ctx.input.view;
    // Only a node that answers with another id proves a new incarnation; one
    // that does not answer may be the very same node behind a partition.
    let other_id = |v: &NodeView| v.reported().is_some_and(|r| r.myself.id != line.id);
    if let Some(host) = &line.hostname
        && let Some(v) = view
            .nodes
            .iter()
            .find(|v| v.pool.announced() == host && other_id(v))
    {
        return Some(format!("{} runs as a new node", v.pool.name));
    }
    if let Some(addr) = line.addr
        && let Some(v) = view
            .nodes
            .iter()
            .find(|v| v.pool.addr == addr && v.reported().is_some())
    {
        return Some(format!("{} now runs a new node at {addr}", v.pool.name));
    }
    view.cluster_flags_failed(&line.id)
        .then(|| "a majority of the primaries flag it failing".to_string())
}

/// The stage: promote the survivor of each gone orphan, or forget an orphan
/// nobody survives. Waiting here never blocks later stages (they guard
/// themselves with [`has_orphans`]).
pub(super) fn orphaned(ctx: &Ctx<'_>, out: &mut Plan) {
    for orphan in orphans(ctx) {
        let Some(reason) = &orphan.gone else { continue };
        let best = ctx.heir(orphan.replicas.iter().copied(), None);
        if let Some(to) = best.and_then(|v| ctx.target(v).map(|t| (v.pool.shard, t))) {
            out.actions.push(Action::Failover {
                shard: to.0,
                from: orphan.label(),
                to: to.1,
                kind: FailoverKind::Takeover,
            });
        } else if orphan.replicas.is_empty() {
            out.actions.push(Action::Forget {
                id: orphan.line.id.clone(),
            });
        } else {
            out.waiting.push(format!(
                "{} is gone ({reason}) and its replicas are not usable yet",
                orphan.label()
            ));
        }
    }
    if out.actions.is_empty() {
        out.waiting.clear();
    }
}

/// Whether some slot is owned by a node that no pool node is.
pub(super) fn has_orphans(ctx: &Ctx<'_>) -> bool {
    ctx.index
        .by_owner()
        .keys()
        .any(|id| !ctx.index.ids().values().any(|p| p == id))
}
