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

use crate::resp;
use crate::topology::Registry;
use crate::upstream::{Node, Proto};

/// What a replica's `INFO` says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub is_replica: bool,
    pub link_up: bool,
    pub sync_in_progress: bool,
    pub loading: bool,
    pub offset: Option<u64>,
    /// `master_repl_offset` (meaningful on primaries).
    pub master_offset: Option<u64>,
}

pub fn parse_info(text: &str) -> ReplicaInfo {
    let mut r = ReplicaInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.trim_end().split_once(':') else {
            continue;
        };
        match k {
            "role" => r.is_replica = v == "slave",
            "master_link_status" => r.link_up = v == "up",
            "master_sync_in_progress" => r.sync_in_progress = v != "0",
            "loading" | "async_loading" => r.loading |= v != "0",
            "slave_repl_offset" => r.offset = v.parse().ok(),
            "master_repl_offset" => r.master_offset = v.parse().ok(),
            _ => {}
        }
    }
    r
}

/// What a replica may serve, from its last poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadState {
    /// No reads: loading, syncing, lagging, unknown, or not polled yet.
    Closed = 0,
    /// In stable sync (or promoted, see [`replica_state`]): takes reads.
    Serving = 1,
    /// Complete but cut off from its primary ([`replica_is_orphaned`]): reads
    /// only while the primary itself is out of rotation (see `balance.rs`).
    LastResort = 2,
}

/// The read state of a node in a shard's replica list, from its `INFO`.
pub fn replica_state(info: &ReplicaInfo, primary_offset: Option<u64>, max_lag: u64) -> ReadState {
    // A "replica" that reports role:master was promoted by a failover the
    // topology has not caught up with: it holds the shard's freshest data.
    if !info.is_replica || replica_may_serve(info, primary_offset, max_lag) {
        ReadState::Serving
    } else if replica_is_orphaned(info) {
        ReadState::LastResort
    } else {
        ReadState::Closed
    }
}

/// A replica that is complete but cut off from its primary: not loading, not
/// syncing, link down. It gets no reads while its primary serves; when the
/// primary is itself down it is the freshest copy there is, and serving it
/// beats failing every read of the shard until a failover.
pub fn replica_is_orphaned(info: &ReplicaInfo) -> bool {
    info.is_replica && !info.link_up && !info.sync_in_progress && !info.loading && info.offset.is_some()
}

/// The gate decision for one replica given its primary's offset.
pub fn replica_may_serve(info: &ReplicaInfo, primary_offset: Option<u64>, max_lag: u64) -> bool {
    if !info.is_replica || !info.link_up || info.sync_in_progress || info.loading {
        return false;
    }
    match (primary_offset, info.offset) {
        (Some(p), Some(r)) => p.saturating_sub(r) <= max_lag,
        // Without the primary's offset, trust a healthy link.
        (None, Some(_)) => true,
        (_, None) => false,
    }
}

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

async fn poll_or_skip(node: Arc<Node>) -> Option<ReplicaInfo> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const SYNCING: &str = "# Replication\r\nrole:slave\r\nmaster_link_status:down\r\nmaster_sync_in_progress:1\r\nslave_repl_offset:0\r\n# Persistence\r\nloading:0\r\n";
    const GOOD: &str = "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nmaster_sync_in_progress:0\r\nslave_repl_offset:1000\r\n# Persistence\r\nloading:0\r\n";

    #[test]
    fn a_syncing_replica_may_not_serve() {
        let info = parse_info(SYNCING);
        assert!(info.sync_in_progress && !info.link_up);
        assert!(!replica_may_serve(&info, Some(0), 1024));
    }

    #[test]
    fn an_in_sync_replica_serves_until_it_lags_too_far() {
        let info = parse_info(GOOD);
        assert!(replica_may_serve(&info, Some(1500), 1024));
        assert!(!replica_may_serve(&info, Some(1000 + 1025), 1024));
        let loading = parse_info(&GOOD.replace("loading:0", "loading:1"));
        assert!(!replica_may_serve(&loading, Some(1000), 1024));
    }

    #[test]
    fn only_a_complete_replica_cut_off_from_its_primary_is_orphaned() {
        let cut_off = parse_info(&GOOD.replace("master_link_status:up", "master_link_status:down"));
        assert!(!replica_may_serve(&cut_off, Some(1000), 1024));
        assert!(replica_is_orphaned(&cut_off));
        assert!(
            !replica_is_orphaned(&parse_info(SYNCING)),
            "a syncing replica has no complete copy"
        );
        assert!(
            !replica_is_orphaned(&parse_info(GOOD)),
            "a linked replica is simply serving"
        );
        let loading = parse_info(&cut_off_text().replace("loading:0", "loading:1"));
        assert!(!replica_is_orphaned(&loading));
    }

    #[test]
    fn the_read_state_combines_gate_orphan_and_promotion() {
        let cut_off = parse_info(&cut_off_text());
        assert_eq!(
            replica_state(&parse_info(GOOD), Some(1000), 1024),
            ReadState::Serving
        );
        assert_eq!(replica_state(&cut_off, Some(1000), 1024), ReadState::LastResort);
        assert_eq!(
            replica_state(&parse_info(SYNCING), Some(0), 1024),
            ReadState::Closed
        );
        let promoted = parse_info("# Replication\r\nrole:master\r\nmaster_repl_offset:5\r\n");
        assert_eq!(replica_state(&promoted, None, 1024), ReadState::Serving);
    }

    fn cut_off_text() -> String {
        GOOD.replace("master_link_status:up", "master_link_status:down")
    }
}
