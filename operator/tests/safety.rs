//! Shard safety against real `redis-server` processes: nodes that come back
//! empty under their old name, slot migrations that must not steal a slot,
//! forgotten nodes that rejoin, spec edits that must reach running nodes.
//! Every test uses its own pool and ports; every wait is bounded.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use cachetier_crds::{CacheTierStatus, NodeRole, Phase};
use cachetier_operator::cluster::{NodePool as _, PoolNode, Reconciler};
use cachetier_operator::local::LocalPool;
use support::*;
use tokio::time::Instant;

fn addrs(status: &CacheTierStatus) -> Vec<SocketAddr> {
    status
        .shards
        .iter()
        .flat_map(|s| s.nodes.iter())
        .filter_map(|n| n.address.parse().ok())
        .collect()
}

async fn node_named(pool: &LocalPool, name: &str) -> PoolNode {
    pool.list()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.name == name)
        .unwrap()
}

/// Writes `k:i` = `v:i` for i in `0..n`, then waits until every primary's
/// replicas acknowledged them (`WAIT`): these keys are "acknowledged and replicated".
async fn write_replicated(status: &CacheTierStatus, n: usize) {
    let mut client = ClusterClient::new(addrs(status)).await;
    for i in 0..n {
        client.set(&format!("k:{i}"), &format!("v:{i}")).await.unwrap();
    }
    for shard in &status.shards {
        let primary: SocketAddr = shard.nodes[0].address.parse().unwrap();
        let replicas = shard.nodes.len() - 1;
        let mut c = conn(primary).await;
        let acked: usize = redis::cmd("WAIT")
            .arg(replicas)
            .arg(5000)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(acked, replicas, "{} replicas acknowledged", shard.nodes[0].name);
    }
}

/// Keys `k:0..n` that do not read back as written (missing or unreadable);
/// stops looking after 50 (unreadable keys cost a timeout each).
async fn lost_keys(seeds: Vec<SocketAddr>, n: usize) -> Vec<String> {
    let mut client = ClusterClient::new(seeds).await;
    let mut lost = Vec::new();
    for i in 0..n {
        let key = format!("k:{i}");
        match tokio::time::timeout(Duration::from_secs(1), client.get(&key)).await {
            Ok(Ok(Some(v))) if v == format!("v:{i}") => {}
            other => lost.push(format!("{key}: {other:?}")),
        }
        if lost.len() >= 50 {
            break;
        }
    }
    lost
}

async fn my_id(addr: SocketAddr) -> String {
    query_string(addr, &["CLUSTER", "MYID"]).await
}

/// Every node id that any pool node lists as owning a slot, and every id any
/// pool node mentions at all.
async fn owners_and_known(nodes: &[PoolNode]) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut owners, mut known) = (BTreeSet::new(), BTreeSet::new());
    for n in nodes {
        let text = query_string(n.addr, &["CLUSTER", "NODES"]).await;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let Some(id) = words.first() else { continue };
            known.insert(id.to_string());
            if words.len() > 8 && words[8..].iter().any(|w| !w.starts_with('[')) {
                owners.insert(id.to_string());
            }
        }
    }
    (owners, known)
}

/// Kills shard 1's primary and starts a new, empty process under the same
/// name (as a StatefulSet recreates a pod: new data, new address) — either at
/// once, before Redis could fail over, or after Redis promoted the replica.
async fn primary_restarted_empty(name: &str, before_failover: bool) {
    const KEYS: usize = 3000;
    let pool = pool(name);
    let t = tier(name, 3, 1);
    let mut rec = Reconciler::new(pool.clone(), t.clone());
    let status = rec.converge(Duration::from_secs(60)).await.unwrap();
    write_replicated(&status, KEYS).await;
    let primary_name = status.shards[1].nodes[0].name.clone();
    let survivor_name = status.shards[1].nodes[1].name.clone();
    let old = node_named(&pool, &primary_name).await;
    let old_id = my_id(old.addr).await;

    signal(old.pid.unwrap(), "KILL");
    if !before_failover {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < Duration::from_secs(30), "Redis never promoted");
            let s = rec.round().await.unwrap().status;
            if s.shards[1].nodes[0].name == survivor_name && s.slots_covered == 16384 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let reborn = pool.create(&t, 1, 0).await.unwrap();
    assert_ne!(my_id(reborn.addr).await, old_id, "the new process is a new node");

    let converged = rec.converge(Duration::from_secs(45)).await;
    let nodes = pool.list().await.unwrap();
    let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let lost = lost_keys(seeds, KEYS).await;
    assert!(
        lost.is_empty(),
        "{} (50 = at least 50) of {KEYS} keys lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
    let status = converged.unwrap();
    assert_eq!(status.phase, Some(Phase::Ready));
    let shard = &status.shards[1];
    assert_eq!(
        shard.nodes[0].name, survivor_name,
        "the survivor with data is the primary"
    );
    assert_eq!(shard.nodes[0].role, NodeRole::Primary);
    assert_eq!(
        (shard.nodes[1].name.as_str(), shard.nodes[1].role),
        (primary_name.as_str(), NodeRole::Replica)
    );
    let survivor = node_named(&pool, &survivor_name).await;
    let info = query_string(reborn.addr, &["INFO", "replication"]).await;
    assert!(
        info.contains(&format!("master_port:{}", survivor.addr.port())),
        "{info}"
    );

    let ids: BTreeSet<String> = {
        let mut ids = BTreeSet::new();
        for n in &nodes {
            ids.insert(my_id(n.addr).await);
        }
        ids
    };
    let (owners, known) = owners_and_known(&nodes).await;
    assert!(
        owners.is_subset(&ids),
        "a slot owner is no pool node: {owners:?} vs {ids:?}"
    );
    assert!(!known.contains(&old_id), "the old id {old_id} is still known");
    pool.shutdown().await;
}

/// Slow-ish: about 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_empty_before_redis_fails_over_never_wipes_its_shard() {
    primary_restarted_empty("reborn1", true).await;
}

/// Slow-ish: about 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_empty_after_redis_failed_over_joins_as_the_survivors_replica() {
    primary_restarted_empty("reborn2", false).await;
}
