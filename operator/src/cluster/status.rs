//! Status: the `CacheTierStatus` of a tier, computed from one observation, the
//! probe results and the current plan — never from what the operator believes
//! it did. Also the read gate (`serving`) and sync-loop detection.
//!
//! Not responsible for publishing the status (Kubernetes writes it to the API,
//! local mode prints it).

use cachetier_crds::{CacheTierStatus, NodeHealth, NodeRole, NodeStatus, Phase, ShardStatus};

use super::config::TierConfig;
use super::index::Index;
use super::plan::{Action, FailoverKind, Plan, Removal, ranges};
use super::pool::PendingNode;
use super::view::{NodeView, SLOTS};

mod conditions;
mod events;
mod node;
#[cfg(test)]
mod tests;

pub use events::*;
use node::node_status;

/// Everything the status is computed from.
#[derive(Debug, Clone, Copy)]
pub struct StatusInput<'a> {
    /// The desired tier.
    pub tier: &'a TierConfig,
    /// The round's index of the observation and the probe results (shared
    /// with the planner).
    pub index: &'a Index<'a>,
    /// The plan made from this observation.
    pub plan: &'a Plan,
    /// Recent events.
    pub events: &'a Events,
    /// Replicas in a sync loop.
    pub sync_loops: &'a [(String, usize)],
    /// The previous status, to keep condition transition times.
    pub previous: Option<&'a CacheTierStatus>,
}

/// A node requested from the pool that does not run yet.
fn pending_status(p: &PendingNode) -> NodeStatus {
    NodeStatus {
        name: p.name.clone(),
        address: String::new(),
        node_id: None,
        role: NodeRole::Unknown,
        health: NodeHealth::Unknown,
        rtt_micros: None,
        lag_bytes: None,
        serving: false,
        reason: Some(format!("pending: {}", p.detail)),
    }
}

fn range_text(&(a, b): &(u16, u16)) -> String {
    if a == b { a.to_string() } else { format!("{a}-{b}") }
}

/// The shards as observed, and who in them is not ready (and why).
struct Shards {
    list: Vec<ShardStatus>,
    ready_nodes: usize,
    not_ready: Vec<String>,
}

/// Computes the tier's status.
pub fn compute(input: StatusInput<'_>) -> CacheTierStatus {
    let index = input.index;
    let view = input.index.view();
    let tier = input.tier;
    // A primary only the operator cannot reach still serves its clients.
    let serves = |v: &NodeView| index.answers(v) || index.id(v).is_some_and(|id| view.cluster_sees_alive(id));
    let slots_covered: usize = view
        .nodes
        .iter()
        .filter(|v| serves(v))
        .map(|v| index.owned_by(v))
        .sum();
    let any_owned = index.owners().iter().any(Option::is_some);
    let mut shards = shards(&input);
    let total_nodes = tier.total_nodes() as usize;
    let missing = total_nodes.saturating_sub(shards.ready_nodes + shards.not_ready.len());
    if missing > 0 {
        shards
            .not_ready
            .push(format!("{missing} node(s) not created yet"));
    }
    let current_shards = index.by_owner().len();
    let all_ok = view
        .nodes
        .iter()
        .filter_map(NodeView::reported)
        .all(|r| r.state_ok);
    let covered = slots_covered == usize::from(SLOTS);
    let resharding = is_resharding(input.plan) || (any_owned && current_shards != tier.shards as usize);
    let phase = if !any_owned {
        Phase::Bootstrapping
    } else if !covered {
        Phase::Unavailable
    } else if !all_ok
        && view
            .nodes
            .iter()
            .filter_map(NodeView::reported)
            .all(|r| !r.state_ok)
    {
        Phase::Bootstrapping
    } else if resharding {
        Phase::Scaling
    } else if shards.ready_nodes < total_nodes || !all_ok {
        Phase::Degraded
    } else {
        Phase::Ready
    };
    let conditions = vec![
        conditions::ready(&input, covered, all_ok, any_owned, slots_covered),
        conditions::progressing(&input),
        conditions::degraded(&input, &shards.not_ready),
        conditions::sync_loop(&input),
    ];
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    CacheTierStatus {
        observed_generation: tier.generation,
        phase: Some(phase),
        conditions,
        current_shards: count(current_shards),
        selector: None,
        ready_nodes: count(shards.ready_nodes),
        total_nodes: count(total_nodes),
        ready: Some(format!("{}/{total_nodes}", shards.ready_nodes)),
        slots_covered: count(slots_covered),
        shards: shards.list,
        last_failover: input.events.last_failover.clone(),
        last_eviction: input.events.last_eviction.clone(),
    }
}

/// Whether the plan moves slots or removes nodes (the tier is scaling).
fn is_resharding(plan: &Plan) -> bool {
    plan.actions.iter().any(|a| {
        matches!(
            a,
            Action::MigrateSlots { .. }
                | Action::FinishMigration { .. }
                | Action::AbortMigration { .. }
                | Action::DestroyNode {
                    reason: Removal::ShardRemoved | Removal::ReplicaRemoved,
                    ..
                }
                | Action::Failover {
                    kind: FailoverKind::Graceful,
                    ..
                }
        )
    })
}

/// Every shard with a running or pending node: its primary first, its
/// slots, and each node's status.
fn shards(input: &StatusInput<'_>) -> Shards {
    let index = input.index;
    let tier = input.tier;
    let mut shard_ids: Vec<u32> = index.pool_shards();
    shard_ids.extend(input.index.view().pending.iter().map(|p| p.shard));
    shard_ids.sort_unstable();
    shard_ids.dedup();
    let mut out = Shards {
        list: Vec::new(),
        ready_nodes: 0,
        not_ready: Vec::new(),
    };
    for shard in shard_ids {
        let primary = index.slot_owner_of(shard);
        let mut members: Vec<&NodeView> = index.nodes_of(shard).collect();
        members.sort_by_key(|v| (std::cmp::Reverse(index.owned_by(v)), v.pool.ordinal));
        let primary_id = primary.and_then(|p| index.id(p));
        let primary_offset = primary.and_then(|p| p.reported()).map(|r| r.repl.offset);
        let mut nodes = Vec::new();
        for v in members {
            let owned = index.owned_by(v);
            let mut st = node_status(input, v, index.id(v), owned, primary_offset);
            let in_role = match st.role {
                NodeRole::Primary => owned > 0,
                NodeRole::Replica => {
                    primary_id.is_some()
                        && v.reported().and_then(|r| r.myself.master_id.as_deref()) == primary_id
                }
                NodeRole::Unknown => false,
            };
            if st.role == NodeRole::Replica && !in_role && st.serving {
                st.serving = false;
                st.reason = Some("replicates another shard".into());
            }
            if v.pool.terminating {
                st.serving = false;
                st.reason = Some("terminating (its pod is being deleted)".into());
            }
            let wanted = shard < tier.shards && v.pool.ordinal <= tier.replicas_per_shard;
            if wanted && in_role && st.health == NodeHealth::Healthy && st.serving {
                out.ready_nodes += 1;
            } else if wanted {
                out.not_ready.push(format!(
                    "{}: {}",
                    st.name,
                    st.reason.clone().unwrap_or_else(|| "not in its role yet".into())
                ));
            }
            nodes.push(st);
        }
        for p in input.index.view().pending.iter().filter(|p| p.shard == shard) {
            let st = pending_status(p);
            if shard < tier.shards && p.ordinal <= tier.replicas_per_shard {
                out.not_ready.push(format!(
                    "{}: {}",
                    p.name,
                    st.reason.as_deref().unwrap_or_default()
                ));
            }
            nodes.push(st);
        }
        let slots = primary_id
            .map(|id| ranges(&index.owned_slots(id)).iter().map(range_text).collect())
            .unwrap_or_default();
        out.list.push(ShardStatus {
            index: i32::try_from(shard).unwrap_or(i32::MAX),
            slots,
            nodes,
        });
    }
    out
}
