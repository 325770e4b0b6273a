//! Status: the `CacheTierStatus` of a tier, computed from one observation, the
//! probe results and the current plan — never from what the operator believes
//! it did. Also the read gate (`serving`) and sync-loop detection.
//!
//! Not responsible for publishing the status (Kubernetes writes it to the API,
//! local mode prints it).

use std::collections::HashMap;
use std::net::SocketAddr;

use cachetier_crds::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, CacheTierStatus, NodeHealth, NodeRole,
    NodeStatus, Phase, ShardStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::config::TierConfig;
use super::health::{AUTH_ERROR, HealthRecord};
use super::plan::{Action, FailoverKind, Plan, Removal, ranges};
use super::pool::PendingNode;
use super::view::{ClusterView, NodeView, SLOTS};

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
    /// The observation.
    pub view: &'a ClusterView,
    /// Probe results.
    pub health: &'a HashMap<SocketAddr, HealthRecord>,
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

fn condition(
    previous: Option<&CacheTierStatus>,
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// Computes the tier's status.
pub fn compute(input: StatusInput<'_>) -> CacheTierStatus {
    let view = input.view;
    let tier = input.tier;
    let owners = view.slot_owners();
    let mut count: HashMap<&str, Vec<u16>> = HashMap::new();
    for (slot, id) in owners.iter().enumerate() {
        if let Some(id) = id {
            count.entry(id.as_str()).or_default().push(slot as u16);
        }
    }
    let ids: HashMap<&str, Option<String>> = view
        .nodes
        .iter()
        .map(|v| (v.pool.name.as_str(), view.id_of(&v.pool)))
        .collect();
    let id_of = |v: &NodeView| ids.get(v.pool.name.as_str()).cloned().flatten();
    let owned = |v: &NodeView| {
        id_of(v)
            .and_then(|id| count.get(id.as_str()).map(Vec::len))
            .unwrap_or(0)
    };
    let usable = |v: &NodeView| {
        v.reported().is_some()
            && input
                .health
                .get(&v.pool.addr)
                .is_none_or(|h| h.state != NodeHealth::Failed)
    };

    // A primary only the operator cannot reach still serves its clients.
    let serves = |v: &NodeView| usable(v) || id_of(v).is_some_and(|id| view.cluster_sees_alive(&id));
    let slots_covered: usize = view.nodes.iter().filter(|v| serves(v)).map(owned).sum();
    let any_owned = owners.iter().any(Option::is_some);

    let mut shard_ids: Vec<u32> = view
        .nodes
        .iter()
        .map(|v| v.pool.shard)
        .chain(view.pending.iter().map(|p| p.shard))
        .collect();
    shard_ids.sort_unstable();
    shard_ids.dedup();
    let mut shards = Vec::new();
    let mut ready_nodes = 0usize;
    let mut not_ready: Vec<String> = Vec::new();
    for shard in shard_ids {
        let mut members: Vec<&NodeView> = view.nodes.iter().filter(|v| v.pool.shard == shard).collect();
        members.sort_by_key(|v| (std::cmp::Reverse(owned(v)), v.pool.ordinal));
        let primary = members.first().copied().filter(|p| owned(p) > 0);
        let primary_id = primary.and_then(id_of);
        let primary_offset = primary.and_then(|p| p.reported()).map(|r| r.repl.offset);
        let mut nodes = Vec::new();
        for v in &members {
            let id = id_of(v);
            let mut st = node_status(&input, v, id.as_deref(), owned(v), primary_offset);
            let in_role = match st.role {
                NodeRole::Primary => owned(v) > 0,
                NodeRole::Replica => {
                    primary_id.is_some()
                        && v.reported().and_then(|r| r.myself.master_id.clone()) == primary_id
                }
                NodeRole::Unknown => false,
            };
            if st.role == NodeRole::Replica && !in_role && st.serving {
                st.serving = false;
                st.reason = Some("replicates another shard".into());
            }
            let wanted = shard < tier.shards && v.pool.ordinal <= tier.replicas_per_shard;
            if wanted && in_role && st.health == NodeHealth::Healthy && st.serving {
                ready_nodes += 1;
            } else if wanted {
                not_ready.push(format!(
                    "{}: {}",
                    st.name,
                    st.reason.clone().unwrap_or_else(|| "not in its role yet".into())
                ));
            }
            nodes.push(st);
        }
        for p in view.pending.iter().filter(|p| p.shard == shard) {
            let st = pending_status(p);
            if shard < tier.shards && p.ordinal <= tier.replicas_per_shard {
                not_ready.push(format!(
                    "{}: {}",
                    p.name,
                    st.reason.as_deref().unwrap_or_default()
                ));
            }
            nodes.push(st);
        }
        let slots = primary
            .and_then(id_of)
            .and_then(|id| {
                count
                    .get(id.as_str())
                    .map(|s| ranges(s).iter().map(range_text).collect())
            })
            .unwrap_or_default();
        shards.push(ShardStatus {
            index: i32::try_from(shard).unwrap_or(i32::MAX),
            slots,
            nodes,
        });
    }
    let total_nodes = tier.total_nodes() as usize;
    let missing = total_nodes.saturating_sub(ready_nodes + not_ready.len());
    if missing > 0 {
        not_ready.push(format!("{missing} node(s) not created yet"));
    }
    let current_shards = count.len();

    let resharding = input.plan.actions.iter().any(|a| {
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
    }) || (any_owned && current_shards != tier.shards as usize);
    let all_ok = view
        .nodes
        .iter()
        .filter_map(NodeView::reported)
        .all(|r| r.state_ok);
    let covered = slots_covered == usize::from(SLOTS);
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
    } else if ready_nodes < total_nodes || !all_ok {
        Phase::Degraded
    } else {
        Phase::Ready
    };

    let generation = tier.generation;
    let prev = input.previous;
    let mut conditions = vec![if covered && all_ok {
        condition(
            prev,
            generation,
            CONDITION_READY,
            true,
            "AllSlotsServed",
            "every slot is served".into(),
        )
    } else if covered {
        let failing: Vec<&str> = view
            .nodes
            .iter()
            .filter(|v| v.reported().is_some_and(|r| !r.state_ok))
            .map(|v| v.pool.name.as_str())
            .collect();
        condition(
            prev,
            generation,
            CONDITION_READY,
            false,
            "ClusterStateNotOk",
            format!("cluster_state is not ok on {}", failing.join(", ")),
        )
    } else if !any_owned {
        condition(
            prev,
            generation,
            CONDITION_READY,
            false,
            "Bootstrapping",
            "the cluster is being formed".into(),
        )
    } else {
        condition(
            prev,
            generation,
            CONDITION_READY,
            false,
            "SlotsNotServed",
            format!("{slots_covered} of {SLOTS} slots are served by a reachable primary"),
        )
    }];
    let stuck = input.events.stuck_keys.first();
    conditions.push(match (input.plan.actions.first(), input.plan.waiting.first()) {
        _ if stuck.is_some() => {
            let k = stuck.map_or_else(String::new, |k| {
                format!("slot {}: key {:?} cannot be moved: {}", k.slot, k.key, k.error)
            });
            let more = input.events.stuck_keys.len() - 1;
            let message = if more > 0 {
                format!("{k} (+{more} more)")
            } else {
                k
            };
            condition(
                prev,
                generation,
                CONDITION_PROGRESSING,
                true,
                "KeyCannotMove",
                message,
            )
        }
        (Some(a), _) => {
            let reason = match a {
                Action::CreateNode { .. } => "CreatingNodes",
                Action::DestroyNode { .. } | Action::Forget { .. } => "RemovingNodes",
                Action::Meet { .. } => "JoiningNodes",
                Action::Replicate { .. } | Action::Flush { .. } => "AttachingReplicas",
                Action::AddSlots { .. } => "AssigningSlots",
                Action::MigrateSlots { .. }
                | Action::FinishMigration { .. }
                | Action::AbortMigration { .. } => "Resharding",
                Action::Failover { .. } => "FailingOver",
                Action::SetConfig { .. } => "Reconfiguring",
            };
            let more = input.plan.actions.len() - 1;
            let message = if more > 0 {
                format!("{a} (+{more} more)")
            } else {
                a.to_string()
            };
            condition(prev, generation, CONDITION_PROGRESSING, true, reason, message)
        }
        (None, Some(w)) => condition(
            prev,
            generation,
            CONDITION_PROGRESSING,
            true,
            "Waiting",
            w.clone(),
        ),
        (None, None) => condition(
            prev,
            generation,
            CONDITION_PROGRESSING,
            false,
            "Converged",
            "the cluster matches the spec".into(),
        ),
    });
    conditions.push(if not_ready.is_empty() {
        condition(
            prev,
            generation,
            CONDITION_DEGRADED,
            false,
            "AllNodesReady",
            "every node is ready".into(),
        )
    } else {
        let failed = view.nodes.iter().any(|v| {
            input
                .health
                .get(&v.pool.addr)
                .is_some_and(|h| h.state == NodeHealth::Failed)
        });
        let auth = input.health.values().any(|h| {
            h.state == NodeHealth::Failed
                && h.last_error.as_deref().is_some_and(|e| e.starts_with(AUTH_ERROR))
        });
        let reason = if auth {
            "AuthenticationFailed"
        } else if failed {
            "NodeFailed"
        } else {
            "NodesNotReady"
        };
        condition(
            prev,
            generation,
            CONDITION_DEGRADED,
            true,
            reason,
            not_ready.join("; "),
        )
    });
    conditions.push(if input.sync_loops.is_empty() {
        condition(
            prev,
            generation,
            CONDITION_SYNC_LOOP,
            false,
            "NoSyncLoop",
            "no replica is stuck in full syncs".into(),
        )
    } else {
        let who: Vec<String> = input
            .sync_loops
            .iter()
            .map(|(n, c)| format!("{n} restarted its full sync {c} times"))
            .collect();
        condition(
            prev,
            generation,
            CONDITION_SYNC_LOOP,
            true,
            "FullSyncRestarting",
            format!(
                "{} within {:?}: raise repl-backlog-size / client-output-buffer-limit replica",
                who.join("; "),
                SYNC_LOOP_WINDOW
            ),
        )
    });

    CacheTierStatus {
        observed_generation: generation,
        phase: Some(phase),
        conditions,
        current_shards: i32::try_from(current_shards).unwrap_or(i32::MAX),
        selector: None,
        ready_nodes: i32::try_from(ready_nodes).unwrap_or(i32::MAX),
        total_nodes: i32::try_from(total_nodes).unwrap_or(i32::MAX),
        ready: Some(format!("{ready_nodes}/{total_nodes}")),
        slots_covered: i32::try_from(slots_covered).unwrap_or(i32::MAX),
        shards,
        last_failover: input.events.last_failover.clone(),
        last_eviction: input.events.last_eviction.clone(),
    }
}
