//! The replica read gate (lesson 2 of PRODUCT.md): a replica that is loading,
//! doing a full sync, has its link to the primary down, or lags it by more than
//! `max_lag_bytes` receives **zero** reads until it is back in stable sync.
//!
//! # How the sidecar learns it, and what that costs
//!
//! Each sidecar polls `INFO replication` (plus the `loading` flag from
//! `INFO persistence`) on every node once per `gate_interval` (default 1 s),
//! over the node's existing pipelined data connection, so no extra
//! connections are opened and the poll is itself covered by the watchdog.
//! Primaries are polled too, for `master_repl_offset`, to compute lag.
//!
//! Cost at 100 nodes × 1000 sidecars, 1 s interval: each node answers 1000
//! `INFO` calls per second (one per sidecar), i.e. 100 000 per second across
//! the tier. `INFO replication persistence` is about 1 KiB and takes roughly
//! 10–20 µs of Redis CPU, so ≈1–2 % of one core per node and ≈1 MB/s of
//! egress per node — small next to a node serving ~1M requests/s, and it
//! buys sub-second reaction without depending on the operator. Each sidecar
//! sends 100 polls/s, negligible. If that is too much, raise `gate_interval`
//! (the cost is linear in 1/interval); a future option is to consume the
//! operator's published per-node `serving` flags instead and poll only on
//! suspicion.
//!
//! A new replica starts with its gate closed, so it receives no reads until
//! its first poll shows it in sync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::replica::{ReadState, ReplicaInfo, parse_info, replica_state};
use crate::resp;
use crate::topology::Registry;
use crate::upstream::{Node, Proto};

/// `INFO replication persistence` of `node`, on its data connection.
async fn poll(node: &Node) -> Option<ReplicaInfo> {
    let cmd = resp::command_bytes(&["INFO", "replication", "persistence"]);
    let replies = node.request(Proto::Resp2, cmd, 1).await.ok()?;
    let raw = replies.into_iter().next()?;
    let frame = resp::parse(&raw).ok()?;
    let resp::Frame::Bulk(body) = frame else {
        return None;
    };
    Some(parse_info(&String::from_utf8_lossy(&body)))
}

/// As [`poll`], but nothing for a node out of rotation.
pub(crate) async fn poll_or_skip(node: Arc<Node>) -> Option<ReplicaInfo> {
    // A node out of rotation is being probed; do not pile requests onto it.
    if !node.is_healthy() {
        return None;
    }
    poll(&node).await
}

/// Poll every shard's nodes each `interval` and open or close replica gates.
///
/// The same polls tell read-your-writes routing how far each replica has
/// caught up: the primary's offset is polled after the round started, so a
/// replica whose offset reaches it (in this round, or in the next one) holds
/// everything the primary had when the round started.
pub async fn run(registry: Arc<Registry>, interval: Duration, max_lag: u64) {
    // Per primary: the previous round's start and the primary's offset then.
    let mut previous: std::collections::HashMap<String, (Instant, u64)> = Default::default();
    loop {
        let topo = registry.current();
        let started = Instant::now();
        let mut shard_jobs = Vec::new();
        for shard in &topo.shards {
            let primary = shard.primary.clone();
            let replicas = shard.replicas.clone();
            let registry = registry.clone();
            let before = previous.get(&primary.addr).copied();
            shard_jobs.push(async move {
                let p = poll_or_skip(primary.clone());
                let rs = futures_util::future::join_all(replicas.iter().cloned().map(poll_or_skip));
                let (p, rs) = futures_util::future::join(p, rs).await;
                let primary_offset = p.and_then(|p| p.master_offset);
                for (node, info) in replicas.iter().zip(&rs) {
                    let offset = info.as_ref().and_then(|i| i.offset);
                    caught_up(node, offset, before, primary_offset.map(|o| (started, o)));
                }
                for (node, info) in replicas.iter().zip(rs) {
                    // A promoted replica: the slot map needs a refresh now.
                    if info.as_ref().is_some_and(|i| !i.is_replica) {
                        registry.request_refresh();
                    }
                    let state = info
                        .as_ref()
                        .map_or(ReadState::Closed, |i| replica_state(i, primary_offset, max_lag));
                    if node.read_state() != state {
                        tracing::info!(node = %node.addr, ?state, ?info, "replica read gate changed");
                    }
                    node.set_read_state(state);
                }
                primary_offset.map(|o| (primary.addr.clone(), (started, o)))
            });
        }
        let offsets = futures_util::future::join_all(shard_jobs).await;
        previous = offsets.into_iter().flatten().collect();
        drop(topo);
        tokio::time::sleep(interval).await;
    }
}

/// Record how far `replica` (at `offset`) has caught up, given the primary's
/// offset at earlier round starts.
fn caught_up(
    replica: &Node,
    offset: Option<u64>,
    before: Option<(Instant, u64)>,
    now: Option<(Instant, u64)>,
) {
    let Some(offset) = offset else {
        return;
    };
    for (at, primary_offset) in [before, now].into_iter().flatten() {
        if offset >= primary_offset {
            replica.set_caught_up(at);
        }
    }
}

/// Publish node states as metrics (called periodically).
pub fn export(registry: &Registry, metrics: &crate::metrics::Metrics) {
    let topo = registry.current();
    for shard in &topo.shards {
        let addr = shard.primary.addr.as_str();
        metrics
            .node_serving
            .with_label_values(&[addr, "primary"])
            .set(i64::from(shard.primary.is_healthy()));
        // A node that changed role keeps one series, not both.
        let _ = metrics.node_serving.remove_label_values(&[addr, "replica"]);
        for r in &shard.replicas {
            let addr = r.addr.as_str();
            metrics
                .node_serving
                .with_label_values(&[addr, "replica"])
                .set(i64::from(r.serving_replica()));
            let _ = metrics.node_serving.remove_label_values(&[addr, "primary"]);
        }
    }
}
