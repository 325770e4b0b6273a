//! What the controller writes back: the status it publishes and the Events it
//! records, as pure functions of the previous and the new status.
//!
//! Status is written on meaningful change only (and at a slow period), so a
//! probe's moving round-trip time does not rewrite the object and trigger the
//! tier's own reconciles. Per-node round-trip times and lag live in metrics;
//! the status keeps roles, health, serving and reasons.

use std::time::Duration;

use cachetier_crds::validate::Invalid;
use cachetier_crds::{CONDITION_PROGRESSING, CONDITION_READY, CacheTierSpec, CacheTierStatus, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType};

use crate::reconcile::TIER_LABEL;

/// Above this many nodes, a shard's status lists its primary and the nodes
/// that are not fine only, so 1000 shards × 6 nodes stay far below etcd's
/// 1.5 MiB object limit.
pub const FULL_DETAIL_NODES: usize = 60;

/// The status as published: volatile per-node figures removed, per-node
/// detail bounded, the scale subresource's selector filled in. Its
/// `observedGeneration` stays the one it was computed for (the core's last
/// round may have run on the spec before an edit).
pub fn publishable(mut status: CacheTierStatus, tier: &str) -> CacheTierStatus {
    let nodes: usize = status.shards.iter().map(|s| s.nodes.len()).sum();
    for shard in &mut status.shards {
        if nodes > FULL_DETAIL_NODES {
            let fine = |n: &cachetier_crds::NodeStatus| {
                n.health == cachetier_crds::NodeHealth::Healthy && n.serving && n.reason.is_none()
            };
            let mut index = 0;
            shard.nodes.retain(|n| {
                index += 1;
                index == 1 || !fine(n)
            });
        }
        for node in &mut shard.nodes {
            node.rtt_micros = None;
            node.lag_bytes = None;
        }
    }
    status.selector = Some(format!("{TIER_LABEL}={tier}"));
    status
}

/// How soon a tier whose status was just written is looked at again: at
/// `resync`, or within a second while that status was computed for an
/// older spec (the core's next round runs on the new one, and
/// `observedGeneration` should not wait a whole period to catch up).
pub fn next_look(status: &CacheTierStatus, generation: Option<i64>, resync: Duration) -> Duration {
    if status.observed_generation < generation {
        CATCH_UP
    } else {
        resync
    }
}

/// [`next_look`] while the status lags the spec.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Whether `next` says something `previous` did not (condition timestamps
/// aside: they change only with a condition's status anyway).
pub fn changed(previous: Option<&CacheTierStatus>, next: &CacheTierStatus) -> bool {
    previous != Some(next)
}

/// The status of a tier whose core has not observed it yet: the last status
/// written, or Bootstrapping with the node count the spec (of `generation`)
/// asks for.
pub fn bootstrapping(
    previous: Option<&CacheTierStatus>,
    spec: &CacheTierSpec,
    generation: Option<i64>,
) -> CacheTierStatus {
    if let Some(previous) = previous.filter(|p| p.phase.is_some_and(|p| p != Phase::Invalid)) {
        return previous.clone();
    }
    let total = i32::try_from(spec.total_nodes()).unwrap_or(i32::MAX);
    CacheTierStatus {
        observed_generation: generation,
        phase: Some(Phase::Bootstrapping),
        total_nodes: total,
        ready: Some(format!("0/{total}")),
        conditions: vec![Condition {
            type_: CONDITION_PROGRESSING.to_string(),
            status: "True".to_string(),
            reason: "Bootstrapping".to_string(),
            message: "creating the tier's pods".to_string(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::now()),
        }],
        ..CacheTierStatus::default()
    }
}

/// The status of a tier whose spec is invalid: nothing else is touched.
pub fn invalid_status(
    previous: Option<&CacheTierStatus>,
    invalid: &Invalid,
    tier: &str,
    generation: Option<i64>,
) -> CacheTierStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let message = invalid.problems.join("; ");
    let since = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY && c.reason == "InvalidSpec" && c.message == message)
        .map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone());
    status.conditions.retain(|c| c.type_ != CONDITION_READY);
    status.conditions.push(Condition {
        type_: CONDITION_READY.to_string(),
        status: "False".to_string(),
        reason: "InvalidSpec".to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    });
    status.phase = Some(Phase::Invalid);
    status.observed_generation = generation;
    publishable(status, tier)
}

/// The longest Event note the API server accepts (`events.k8s.io/v1`).
const MAX_NOTE_BYTES: usize = 1024;

/// `note` cut to [`MAX_NOTE_BYTES`] at a character boundary, with `…` when
/// cut (a degraded large tier's condition message can be much longer, and
/// the API server refuses the whole Event).
fn bounded_note(mut note: String) -> String {
    const MORE: &str = "…";
    if note.len() <= MAX_NOTE_BYTES {
        return note;
    }
    let mut end = MAX_NOTE_BYTES - MORE.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push_str(MORE);
    note
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_string(),
        note: Some(bounded_note(note)),
        action: action.to_string(),
        secondary: None,
    }
}

/// The Events that the step from `previous` to `next` is worth: phase changes,
/// a new failover, a new kind of step (creating or removing nodes,
/// resharding, a rollout's replacements, reconfiguring), a new eviction.
pub fn events_between(previous: Option<&CacheTierStatus>, next: &CacheTierStatus) -> Vec<Event> {
    let mut out = Vec::new();
    let before = previous.and_then(|p| p.phase);
    if next.phase != before
        && let Some(phase) = next.phase
    {
        let (type_, reason, note) = match phase {
            Phase::Ready => (
                EventType::Normal,
                "Ready",
                "every slot is served and every node is healthy".to_string(),
            ),
            Phase::Bootstrapping => (
                EventType::Normal,
                "Bootstrapping",
                "creating nodes and forming the cluster".to_string(),
            ),
            Phase::Scaling => (
                EventType::Normal,
                "Scaling",
                "moving slots or changing replicas".to_string(),
            ),
            Phase::Degraded => (
                EventType::Warning,
                "Degraded",
                condition_message(next, "Degraded"),
            ),
            Phase::Unavailable => (
                EventType::Warning,
                "Unavailable",
                condition_message(next, CONDITION_READY),
            ),
            Phase::Invalid => (
                EventType::Warning,
                "InvalidSpec",
                condition_message(next, CONDITION_READY),
            ),
        };
        out.push(event(type_, reason, "Reconcile", note));
    }
    if let Some(f) = &next.last_failover
        && previous.and_then(|p| p.last_failover.as_ref()) != Some(f)
    {
        out.push(event(
            EventType::Warning,
            "Failover",
            "Failover",
            format!(
                "shard {}: {} replaced {} as primary ({})",
                f.shard, f.to, f.from, f.reason
            ),
        ));
    }
    if let Some(step) = new_step(previous, next)
        && !out.iter().any(|e| e.reason == step.reason)
    {
        out.push(step);
    }
    if let Some(e) = &next.last_eviction
        && previous.and_then(|p| p.last_eviction.as_ref()) != Some(e)
    {
        out.push(event(
            EventType::Warning,
            "Evicted",
            "Evict",
            format!(
                "shard {}: {} removed and replaced ({})",
                e.shard, e.node, e.reason
            ),
        ));
    }
    out
}

/// An Event when the operator starts another kind of step: the
/// `Progressing` condition's reason changed to one that acts (not
/// `Converged` or `Waiting`). Steps of one kind (a reshard's many slot
/// moves) are one Event.
fn new_step(previous: Option<&CacheTierStatus>, next: &CacheTierStatus) -> Option<Event> {
    let progressing = |s: &CacheTierStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_PROGRESSING && c.status == "True")
            .cloned()
    };
    let now = progressing(next)?;
    if matches!(now.reason.as_str(), "Converged" | "Waiting") {
        return None;
    }
    let before = previous.and_then(progressing).map(|c| c.reason);
    if before.as_deref() == Some(now.reason.as_str()) {
        return None;
    }
    let type_ = if now.reason == "KeyCannotMove" {
        EventType::Warning
    } else {
        EventType::Normal
    };
    Some(event(type_, &now.reason, "Reconcile", now.message))
}

fn condition_message(status: &CacheTierStatus, type_: &str) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachetier_crds::{FailoverRecord, NodeStatus, ShardStatus};

    #[test]
    fn an_event_note_is_cut_to_what_the_api_server_accepts_at_a_character_boundary() {
        let long = "é".repeat(1000);
        let note = bounded_note(long);
        assert!(note.len() <= MAX_NOTE_BYTES, "{}", note.len());
        assert!(note.ends_with('…'));
        assert_eq!(bounded_note("short".into()), "short");
    }

    fn status(phase: Phase) -> CacheTierStatus {
        CacheTierStatus {
            phase: Some(phase),
            shards: vec![ShardStatus {
                nodes: vec![NodeStatus {
                    name: "t-0-0".into(),
                    rtt_micros: Some(120),
                    lag_bytes: Some(0),
                    serving: true,
                    ..NodeStatus::default()
                }],
                ..ShardStatus::default()
            }],
            ..CacheTierStatus::default()
        }
    }

    #[test]
    fn a_moving_round_trip_time_does_not_rewrite_the_status() {
        let a = publishable(status(Phase::Ready), "t");
        let mut moved = status(Phase::Ready);
        moved.shards[0].nodes[0].rtt_micros = Some(9000);
        let b = publishable(moved, "t");
        assert!(!changed(Some(&a), &b));
        assert_eq!(b.selector.as_deref(), Some("cachetier.io/tier=t"));
        assert!(changed(Some(&a), &publishable(status(Phase::Degraded), "t")));
    }

    #[test]
    fn a_status_of_an_older_spec_is_looked_at_again_soon() {
        let resync = Duration::from_secs(15);
        let mut s = status(Phase::Ready);
        s.observed_generation = Some(1);
        assert_eq!(next_look(&s, Some(2), resync), CATCH_UP);
        assert_eq!(next_look(&s, Some(1), resync), resync);
    }

    #[test]
    fn a_status_computed_for_an_older_spec_keeps_that_specs_generation() {
        // The core's last round ran on generation 1; the tier is at 2.
        let mut computed = status(Phase::Ready);
        computed.observed_generation = Some(1);
        let published = publishable(computed, "t");
        assert_eq!(published.observed_generation, Some(1));
        // Before the core's first round: the spec's own.
        let tier = cachetier_crds::validate::parse_manifest(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec: {shards: 1, maxMemory: 64Mi}\n",
        )
        .unwrap();
        let fresh = bootstrapping(None, &tier.spec, Some(2));
        assert_eq!(fresh.observed_generation, Some(2));
    }

    #[test]
    fn a_thousand_shard_status_lists_only_primaries_and_troubled_nodes() {
        let node = |name: String, healthy: bool| NodeStatus {
            name,
            address: "10.0.0.1:6379".into(),
            node_id: Some("0123456789abcdef0123456789abcdef01234567".into()),
            health: if healthy {
                cachetier_crds::NodeHealth::Healthy
            } else {
                cachetier_crds::NodeHealth::Failed
            },
            serving: healthy,
            rtt_micros: Some(100),
            ..NodeStatus::default()
        };
        let shards = (0..1000)
            .map(|s| ShardStatus {
                index: s,
                slots: vec!["0-16".into()],
                nodes: (0..6)
                    .map(|o| node(format!("t-{s}-{o}"), !(s == 7 && o == 3)))
                    .collect(),
            })
            .collect();
        let status = publishable(
            CacheTierStatus {
                shards,
                ..CacheTierStatus::default()
            },
            "t",
        );
        assert_eq!(
            status.shards[0].nodes.len(),
            1,
            "only the primary of a fine shard"
        );
        assert_eq!(
            status.shards[7]
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["t-7-0", "t-7-3"]
        );
        let bytes = serde_json::to_vec(&status).unwrap().len();
        assert!(bytes < 512 * 1024, "status of 6000 nodes is {bytes} bytes");
    }

    #[test]
    fn a_phase_change_and_a_new_failover_each_become_one_event() {
        let before = status(Phase::Bootstrapping);
        let mut after = status(Phase::Ready);
        assert_eq!(events_between(Some(&before), &after).len(), 1);
        assert!(events_between(Some(&after), &after).is_empty());
        after.last_failover = Some(FailoverRecord {
            time: "now".into(),
            shard: 1,
            from: "t-1-0".into(),
            to: "t-1-1".into(),
            reason: "Automatic".into(),
        });
        let events = events_between(Some(&status(Phase::Ready)), &after);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "Failover");
    }

    fn progressing(reason: &str, message: &str) -> CacheTierStatus {
        let mut s = status(Phase::Scaling);
        s.conditions = vec![Condition {
            type_: CONDITION_PROGRESSING.into(),
            status: "True".into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: None,
        }];
        s
    }

    #[test]
    fn each_new_kind_of_step_is_one_event_and_its_repeats_are_none() {
        let resharding = progressing("Resharding", "migrate 32 slots from t-0-0 to t-3-0");
        let again = progressing("Resharding", "migrate 32 slots from t-1-0 to t-3-0");
        let restart = progressing("RemovingNodes", "destroy node t-0-1 (restart: maxmemory-policy)");
        let events = events_between(Some(&resharding), &restart);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].reason.as_str(), events[0].note.as_deref()),
            (
                "RemovingNodes",
                Some("destroy node t-0-1 (restart: maxmemory-policy)")
            )
        );
        assert!(events_between(Some(&resharding), &again).is_empty());
        assert!(events_between(Some(&resharding), &progressing("Waiting", "x")).is_empty());
    }

    #[test]
    fn an_invalid_spec_says_why_in_the_ready_condition_and_keeps_its_transition_time() {
        let invalid = Invalid {
            problems: vec!["spec.shards: 0 is less than the minimum of 1".into()],
        };
        let first = invalid_status(None, &invalid, "t", Some(3));
        let ready = &first.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(ready.observed_generation, Some(3));
        let again = invalid_status(Some(&first), &invalid, "t", Some(3));
        assert!(!changed(Some(&first), &again));
        assert_eq!(first.phase, Some(Phase::Invalid));
    }
}
