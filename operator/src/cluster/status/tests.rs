//! The status against hand-built observations.

use std::time::Duration;

use cachetier_crds::{
    CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, CacheTierStatus, NodeHealth, NodeRole, Phase,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use tokio::time::Instant;

use super::*;
use crate::cluster::fixture::*;

fn status_of(fx: &Fx, tier: &TierConfig) -> CacheTierStatus {
    let view = fx.view();
    let plan = fx.plan(tier);
    let index = Index::new(&view, &fx.health);
    compute(StatusInput {
        tier,
        index: &index,
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
    let index = Index::new(&view, &fx.health);
    let second = compute(StatusInput {
        tier: &t,
        index: &index,
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

#[test]
fn a_terminating_node_does_not_count_as_ready_even_while_it_answers() {
    let mut fx = healthy_3x1();
    fx.terminating.push((1, 1));
    let s = status_of(&fx, &tier(3, 1));
    assert_eq!(s.ready.as_deref(), Some("5/6"));
    let node = s.shards[1].nodes.iter().find(|n| n.name == "t-1-1").unwrap();
    assert!(!node.serving);
    assert!(
        node.reason.as_deref().unwrap().starts_with("terminating"),
        "{node:?}"
    );
    assert_ne!(s.phase, Some(Phase::Ready));
}
