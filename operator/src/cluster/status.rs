//! Status: the `CacheTierStatus` of a tier, computed from one observation, the
//! probe results and the current plan — never from what the operator believes
//! it did. Also the read gate (`serving`) and sync-loop detection.
//!
//! Not responsible for publishing the status (Kubernetes writes it to the API,
//! local mode prints it).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use cachetier_crds::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, CacheTierStatus, EvictionRecord,
    FailoverRecord, NodeHealth, NodeRole, NodeStatus, Phase, ShardStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use super::config::TierConfig;
use super::health::{AUTH_ERROR, HealthRecord};
use super::plan::{Action, FailoverKind, Plan, Removal, ranges};
use super::view::{ClusterView, NodeView, SLOTS};

/// Condition type: some replica keeps restarting its full sync.
pub const CONDITION_SYNC_LOOP: &str = "SyncLoop";

/// Full-sync restarts within [`SYNC_LOOP_WINDOW`] that count as a loop.
pub const SYNC_LOOP_RESTARTS: usize = 3;
/// Window of sync-loop detection.
pub const SYNC_LOOP_WINDOW: Duration = Duration::from_secs(600);

/// Remembers when each replica started a full sync, to detect a replica whose
/// sync keeps restarting (replication buffers too small for the write rate).
#[derive(Debug, Default)]
pub struct SyncTracker {
    syncing: HashMap<String, bool>,
    starts: HashMap<String, VecDeque<Instant>>,
}

impl SyncTracker {
    /// Records one observation made at `now`.
    pub fn observe(&mut self, view: &ClusterView, now: Instant) {
        for v in &view.nodes {
            let Some(r) = v.reported() else { continue };
            let syncing = r.myself.replica && r.repl.sync_in_progress;
            let was = self.syncing.insert(v.pool.name.clone(), syncing).unwrap_or(false);
            if syncing && !was {
                self.starts.entry(v.pool.name.clone()).or_default().push_back(now);
            }
        }
        for starts in self.starts.values_mut() {
            while starts
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > SYNC_LOOP_WINDOW)
            {
                starts.pop_front();
            }
        }
        self.starts
            .retain(|name, s| !s.is_empty() && self.syncing.contains_key(name));
    }

    /// Replicas that started a full sync [`SYNC_LOOP_RESTARTS`] times or more
    /// within the window, with the count.
    pub fn looping(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .starts
            .iter()
            .filter(|(_, s)| s.len() >= SYNC_LOOP_RESTARTS)
            .map(|(n, s)| (n.clone(), s.len()))
            .collect();
        out.sort();
        out
    }
}

/// What happened recently, recorded by the reconciler as it happened.
#[derive(Debug, Default, Clone)]
pub struct Events {
    /// The most recent failover.
    pub last_failover: Option<FailoverRecord>,
    /// The most recent eviction.
    pub last_eviction: Option<EvictionRecord>,
    /// Keys that could not be moved; their slots stay open until they can.
    pub stuck_keys: Vec<crate::cluster::execute::StuckKey>,
}

/// RFC 3339 time of now.
pub fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

impl Events {
    /// Records a failover that the operator executed, or saw Redis do.
    pub fn failover(&mut self, shard: u32, from: &str, to: &str, reason: &str) {
        self.last_failover = Some(FailoverRecord {
            time: now_rfc3339(),
            shard: i32::try_from(shard).unwrap_or(i32::MAX),
            from: from.to_string(),
            to: to.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Records what an executed action means for the status.
    pub fn executed(&mut self, action: &Action) {
        match action {
            Action::Failover {
                shard,
                from,
                to,
                kind,
                ..
            } => {
                let reason = match kind {
                    FailoverKind::Takeover => "Forced",
                    FailoverKind::Graceful => "Planned",
                };
                self.failover(*shard, from, &to.name, reason);
            }
            Action::DestroyNode {
                name,
                shard,
                reason: Removal::Evicted { failed_for },
                ..
            } => {
                self.last_eviction = Some(EvictionRecord {
                    time: now_rfc3339(),
                    shard: i32::try_from(*shard).unwrap_or(i32::MAX),
                    node: name.clone(),
                    reason: format!("Failed for {failed_for:?}"),
                });
            }
            _ => {}
        }
    }
}

/// Name of the node owning the most slots in each shard: the shard's primary.
pub fn shard_primaries(view: &ClusterView) -> HashMap<u32, String> {
    let owners = view.slot_owners();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in owners.iter().flatten() {
        *count.entry(id.as_str()).or_default() += 1;
    }
    let mut best: HashMap<u32, (usize, String)> = HashMap::new();
    for v in &view.nodes {
        let Some(id) = view.id_of(&v.pool) else { continue };
        let n = count.get(id.as_str()).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let e = best.entry(v.pool.shard).or_insert((0, String::new()));
        if n > e.0 {
            *e = (n, v.pool.name.clone());
        }
    }
    best.into_iter().map(|(s, (_, n))| (s, n)).collect()
}

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

fn node_status(
    input: &StatusInput<'_>,
    v: &NodeView,
    id: Option<&str>,
    owned: usize,
    primary_offset: Option<i64>,
) -> NodeStatus {
    let health = input.health.get(&v.pool.addr);
    let state = health.map_or(NodeHealth::Unknown, |h| h.state);
    let hearsay = || {
        id.and_then(|id| {
            input
                .view
                .nodes
                .iter()
                .filter_map(NodeView::reported)
                .flat_map(|r| r.others.iter())
                .find(|l| l.id == id)
        })
    };
    let role = match v.reported() {
        Some(r) if r.myself.master => NodeRole::Primary,
        Some(r) if r.myself.replica => NodeRole::Replica,
        Some(_) => NodeRole::Unknown,
        None => match hearsay() {
            Some(l) if l.master && owned > 0 => NodeRole::Primary,
            Some(l) if l.replica => NodeRole::Replica,
            _ => NodeRole::Unknown,
        },
    };
    let mut lag = None;
    // The operator cannot reach it, yet the cluster sees it alive: a
    // partition between the operator and the node, not a dead node.
    let only_operator = id.is_some_and(|id| input.view.cluster_sees_alive(id));
    let auth_error = health
        .and_then(|h| h.last_error.clone())
        .filter(|e| state == NodeHealth::Failed && e.starts_with(AUTH_ERROR));
    let not_serving: Option<String> = match (v.reported(), state) {
        _ if auth_error.is_some() => auth_error.map(|e| format!("configuration error: {e}")),
        (None, _) | (_, NodeHealth::Failed) if only_operator => {
            Some("unreachable by the operator only; the cluster still sees it".into())
        }
        (None, _) => Some("unreachable".into()),
        (_, NodeHealth::Failed) => Some("failed health probes".into()),
        (_, NodeHealth::Unknown) => Some("not probed yet".into()),
        (Some(r), _) if r.repl.loading => Some("loading its dataset".into()),
        (Some(_), _) if role == NodeRole::Primary => (owned == 0).then(|| "owns no slots".into()),
        (Some(r), _) if role == NodeRole::Replica => {
            lag = primary_offset.map(|p| (p - r.repl.offset).max(0));
            if r.repl.sync_in_progress {
                Some("sync in progress".into())
            } else if !r.repl.link_up {
                Some("link to primary down".into())
            } else {
                match lag {
                    None => Some("primary unreachable".into()),
                    Some(l) if l > i64::try_from(input.tier.max_lag_bytes).unwrap_or(i64::MAX) => {
                        Some(format!("lag {l} bytes over {}", input.tier.max_lag_bytes))
                    }
                    Some(_) => None,
                }
            }
        }
        _ => Some("not part of the cluster yet".into()),
    };
    NodeStatus {
        name: v.pool.name.clone(),
        address: v.pool.addr.to_string(),
        node_id: id.map(str::to_string),
        role,
        health: state,
        rtt_micros: health
            .and_then(|h| h.rtt)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        lag_bytes: lag,
        serving: not_serving.is_none(),
        reason: not_serving,
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

    let mut shard_ids: Vec<u32> = view.nodes.iter().map(|v| v.pool.shard).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::fixture::*;

    fn status_of(fx: &Fx, tier: &TierConfig) -> CacheTierStatus {
        let view = fx.view();
        let plan = fx.plan(tier);
        compute(StatusInput {
            tier,
            view: &view,
            health: &fx.health,
            plan: &plan,
            events: &Events::default(),
            sync_loops: &[],
            previous: None,
        })
    }

    fn healthy_3x1() -> Fx {
        let mut fx = Fx::tier_3x1().all_healthy();
        for s in 0..3 {
            fx = fx.repl(s, 0, |r| r.offset = 100);
        }
        fx
    }

    fn cond<'a>(s: &'a CacheTierStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_healthy_tier_is_ready_with_every_replica_serving() {
        let s = status_of(&healthy_3x1(), &tier(3, 1));
        assert_eq!(s.phase, Some(Phase::Ready));
        assert_eq!(
            (s.ready.as_deref(), s.slots_covered, s.current_shards),
            (Some("6/6"), 16384, 3)
        );
        assert_eq!(s.shards[1].slots, vec!["5462-10922".to_string()]);
        let replica = &s.shards[1].nodes[1];
        assert_eq!(
            (replica.role, replica.serving, replica.lag_bytes),
            (NodeRole::Replica, true, Some(0))
        );
        assert_eq!(replica.rtt_micros, Some(100));
        assert_eq!(cond(&s, CONDITION_READY).status, "True");
        assert_eq!(cond(&s, CONDITION_PROGRESSING).reason, "Converged");
        assert_eq!(cond(&s, CONDITION_DEGRADED).status, "False");
        assert_eq!(cond(&s, CONDITION_SYNC_LOOP).status, "False");
    }

    #[test]
    fn a_replica_serves_only_with_its_link_up_no_sync_no_loading_and_lag_within_the_gate() {
        let t = tier(3, 1);
        type Change = fn(&mut crate::cluster::view::ReplInfo);
        let cases: [(&str, Change); 4] = [
            ("sync in progress", |r| r.sync_in_progress = true),
            ("link to primary down", |r| r.link_up = false),
            ("loading its dataset", |r| r.loading = true),
            ("lag", |r| r.offset = -(2 << 20)),
        ];
        for (reason, change) in cases {
            let s = status_of(&healthy_3x1().repl(2, 1, change), &t);
            let node = &s.shards[2].nodes[1];
            assert!(!node.serving, "{reason}");
            assert!(
                node.reason.as_deref().unwrap().starts_with(reason),
                "{:?}",
                node.reason
            );
            assert_eq!(s.phase, Some(Phase::Degraded));
            assert_eq!(cond(&s, CONDITION_DEGRADED).reason, "NodesNotReady");
        }
        // Lag exactly at the gate still serves.
        let s = status_of(&healthy_3x1().repl(2, 1, |r| r.offset = 100 - (1 << 20)), &t);
        assert!(s.shards[2].nodes[1].serving);
        assert_eq!(s.shards[2].nodes[1].lag_bytes, Some(1 << 20));
    }

    #[test]
    fn a_failed_primary_leaves_its_slots_unserved_and_the_tier_unavailable() {
        let s = status_of(
            &healthy_3x1().failed(0, 0, tokio::time::Instant::now()),
            &tier(3, 1),
        );
        assert_eq!(s.phase, Some(Phase::Unavailable));
        assert_eq!(s.slots_covered, 16384 - 5462);
        assert_eq!(cond(&s, CONDITION_READY).reason, "SlotsNotServed");
        assert_eq!(cond(&s, CONDITION_DEGRADED).reason, "NodeFailed");
        let dead = &s.shards[0].nodes[0];
        assert_eq!(
            (dead.health, dead.serving, dead.role),
            (NodeHealth::Failed, false, NodeRole::Primary)
        );
    }

    #[test]
    fn a_tier_with_more_shards_wanted_is_scaling() {
        let s = status_of(&healthy_3x1(), &tier(5, 1));
        assert_eq!(s.phase, Some(Phase::Scaling));
        assert_eq!(cond(&s, CONDITION_PROGRESSING).reason, "CreatingNodes");
        assert_eq!(s.total_nodes, 10);
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let t = tier(3, 1);
        let first = status_of(&healthy_3x1(), &t);
        let fx = healthy_3x1();
        let view = fx.view();
        let plan = fx.plan(&t);
        let second = compute(StatusInput {
            tier: &t,
            view: &view,
            health: &fx.health,
            plan: &plan,
            events: &Events::default(),
            sync_loops: &[("t-0-1".into(), 3)],
            previous: Some(&first),
        });
        assert_eq!(
            cond(&second, CONDITION_READY).last_transition_time,
            cond(&first, CONDITION_READY).last_transition_time
        );
        assert_eq!(cond(&second, CONDITION_SYNC_LOOP).status, "True");
        assert!(
            cond(&second, CONDITION_SYNC_LOOP)
                .message
                .contains("t-0-1 restarted its full sync 3 times")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_restarting_its_full_sync_three_times_within_the_window_is_a_sync_loop() {
        let mut tracker = SyncTracker::default();
        let syncing = Fx::tier_3x1().repl(1, 1, |r| r.sync_in_progress = true).view();
        let idle = Fx::tier_3x1().view();
        for round in 0..3 {
            tracker.observe(&syncing, Instant::now());
            tokio::time::advance(Duration::from_secs(30)).await;
            tracker.observe(&idle, Instant::now());
            tokio::time::advance(Duration::from_secs(30)).await;
            let expected = if round == 2 {
                vec![("t-1-1".to_string(), 3)]
            } else {
                vec![]
            };
            assert_eq!(tracker.looping(), expected, "after {} restarts", round + 1);
        }
        // A long stable stretch clears it.
        tokio::time::advance(SYNC_LOOP_WINDOW).await;
        tracker.observe(&idle, Instant::now());
        assert!(tracker.looping().is_empty());
    }
}
