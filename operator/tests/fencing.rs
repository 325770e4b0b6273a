//! Two reconcilers driving one tier at once (a lease can be lost mid-step),
//! against real `redis-server` processes: migrations of the same slots to
//! different destinations, and bootstraps, that run concurrently, and the
//! leftovers a reconciler stopped between two steps leaves. The
//! 3 → 5 reshard by two reconcilers is in `safety.rs`. Every wait is bounded.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use cachetier_operator::cluster::conn::Conns;
use cachetier_operator::cluster::execute::{Reach, execute};
use cachetier_operator::cluster::plan::Target;
use cachetier_operator::cluster::{Action, NodePool as _, Reconciler};
use cachetier_operator::local::{LocalPool, seeds};
use support::*;

async fn target_of(pool: &LocalPool, name: &str) -> Target {
    let node = pool
        .list()
        .await
        .unwrap()
        .nodes
        .into_iter()
        .find(|n| n.name == name)
        .unwrap();
    Target {
        name: node.name,
        addr: node.addr,
        id: query_string(node.addr, &["CLUSTER", "MYID"]).await,
    }
}

/// The `myself` line of `addr`'s `CLUSTER NODES`.
async fn own_line(addr: SocketAddr) -> String {
    let text = query_string(addr, &["CLUSTER", "NODES"]).await;
    text.lines().find(|l| l.contains("myself")).unwrap().to_string()
}

/// Every slot a `CLUSTER NODES` line claims (its ranges, not its open slots).
fn claimed(line: &str) -> Vec<u16> {
    line.split_whitespace()
        .skip(8)
        .filter(|w| !w.starts_with('['))
        .flat_map(|w| {
            let (a, b) = w.split_once('-').unwrap_or((w, w));
            a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()
        })
        .collect()
}

async fn keys_in(addr: SocketAddr, slot: u16) -> u64 {
    let n = query_string(addr, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]).await;
    n.parse().unwrap()
}

/// Two operators planned the same 16 slots of shard 0 to different shards
/// and migrate them at the same instant. Right after (before any reconciler
/// repairs anything) each slot is whole on one node that owns it, and no
/// slot is left open: the loser's claim on the source failed and it moved
/// nothing. Four groups, so the two race in several orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_of_the_same_slots_to_different_destinations_at_once_move_each_slot_whole() {
    let pool = pool("fork");
    let t = tier("fork", 3, 0);
    let mut rec = Reconciler::new(pool.clone(), t.clone());
    let status = rec.converge(Duration::from_secs(60)).await.unwrap();
    let first: u16 = status.shards[0].slots[0]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let slots: Vec<u16> = (first..first + 64).collect();
    let mut client = ClusterClient::new(seeds(&status)).await;
    // 20 keys in each slot.
    let mut per_slot = vec![0usize; slots.len()];
    let mut keys = Vec::new();
    for i in 0..10_000_000 {
        let key = format!("f{i}");
        let Some(n) = slots.iter().position(|&s| s == key_slot(&key)) else {
            continue;
        };
        if per_slot[n] < 20 {
            per_slot[n] += 1;
            client.set(&key, "v").await.unwrap();
            keys.push(key);
        }
        if keys.len() == slots.len() * 20 {
            break;
        }
    }
    assert_eq!(keys.len(), slots.len() * 20);
    let a = target_of(&pool, &status.shards[0].nodes[0].name).await;
    let b = target_of(&pool, &status.shards[1].nodes[0].name).await;
    let c = target_of(&pool, &status.shards[2].nodes[0].name).await;
    let reach = Reach::from_view(&rec.observe().await.unwrap());
    let timeout = Duration::from_secs(2);
    let (mut conns_b, mut conns_c) = (Conns::new(timeout), Conns::new(timeout));
    for group in slots.chunks(16) {
        let to_b = Action::MigrateSlots {
            from: a.clone(),
            to: b.clone(),
            slots: group.to_vec(),
        };
        let to_c = Action::MigrateSlots {
            from: a.clone(),
            to: c.clone(),
            slots: group.to_vec(),
        };
        let (rb, rc) = tokio::join!(
            execute(pool.as_ref(), &mut conns_b, &t, &reach, &to_b),
            execute(pool.as_ref(), &mut conns_c, &t, &reach, &to_c),
        );
        rb.unwrap();
        rc.unwrap();
    }

    let nodes = [&a, &b, &c];
    let mut lines = Vec::new();
    for n in nodes {
        lines.push(own_line(n.addr).await);
    }
    for &slot in &slots {
        let mut holders = Vec::new();
        for (n, line) in nodes.iter().zip(&lines) {
            let count = keys_in(n.addr, slot).await;
            if count > 0 {
                holders.push((n.name.clone(), count, claimed(line).contains(&slot)));
            }
        }
        assert!(
            matches!(&holders[..], [(_, 20, true)]),
            "slot {slot}: keys are split or sit on a node that does not own it: {holders:?}"
        );
    }

    assert!(
        lines.iter().all(|l| !l.contains('[')),
        "slots left open: {lines:#?}"
    );

    let status = rec.converge(Duration::from_secs(30)).await.unwrap();
    let mut client = ClusterClient::new(seeds(&status)).await;
    for k in &keys {
        assert_eq!(client.get(k).await.unwrap().as_deref(), Some("v"), "{k} lost");
    }
    pool.shutdown().await;
}

/// Two reconcilers bootstrap one fresh tier at once: both create nodes,
/// meet them and add slots. Every slot ends up claimed by exactly one
/// primary, none open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reconcilers_bootstrapping_one_tier_at_once_leave_every_slot_owned_once() {
    let pool = pool("twinboot");
    let t = tier("twinboot", 3, 1);
    let mut a = Reconciler::new(pool.clone(), t.clone());
    let mut b = Reconciler::new(pool.clone(), t.clone());
    let (ra, rb) = tokio::join!(
        a.converge(Duration::from_secs(60)),
        b.converge(Duration::from_secs(60))
    );
    let status = Reconciler::new(pool.clone(), t)
        .converge(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e} (a: {ra:?}, b: {rb:?})"));
    assert_eq!(status.slots_covered, 16384);
    let mut owners = vec![0u8; 16384];
    let mut open = Vec::new();
    for node in pool.list().await.unwrap().nodes {
        let line = own_line(node.addr).await;
        if line.contains('[') {
            open.push(line.clone());
        }
        for s in claimed(&line) {
            owners[usize::from(s)] += 1;
        }
    }
    assert!(open.is_empty(), "open slots: {open:#?}");
    let wrong: Vec<usize> = (0..16384).filter(|&s| owners[s] != 1).collect();
    assert!(
        wrong.is_empty(),
        "{} slots not owned exactly once, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    pool.shutdown().await;
}

/// A slot whose keys all reached their destination, but that the source
/// gave away before the destination took it (an operator stopped between
/// the two `SETSLOT … NODE`s, or another one gave it): nobody claims it, and
/// the importer holds its keys. The importer takes it, so the keys stay
/// served; rolling its import back would hide them, and every node that
/// still maps the slot to its old owner refuses `ADDSLOTS` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_nobody_claims_whose_keys_sit_on_its_importer_is_taken_by_the_importer() {
    let pool = pool("unclaimed");
    let t = tier("unclaimed", 2, 0);
    let mut rec = Reconciler::new(pool.clone(), t.clone());
    let status = rec.converge(Duration::from_secs(60)).await.unwrap();
    let slot: u16 = status.shards[0].slots[0]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let keys: Vec<String> = (0..)
        .map(|i| format!("u{i}"))
        .filter(|k| key_slot(k) == slot)
        .take(20)
        .collect();
    let mut client = ClusterClient::new(seeds(&status)).await;
    for k in &keys {
        client.set(k, "v").await.unwrap();
    }
    let a = target_of(&pool, &status.shards[0].nodes[0].name).await;
    let b = target_of(&pool, &status.shards[1].nodes[0].name).await;
    let (mut ca, mut cb) = (conn(a.addr).await, conn(b.addr).await);
    let s = slot.to_string();
    let setslot = |state: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(&s)
            .arg(state)
            .arg(id)
            .to_owned()
    };
    let _: () = setslot("IMPORTING", &a.id).query_async(&mut cb).await.unwrap();
    let _: () = setslot("MIGRATING", &b.id).query_async(&mut ca).await.unwrap();
    let _: () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(b.addr.port())
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&keys)
        .query_async(&mut ca)
        .await
        .unwrap();
    let _: () = setslot("NODE", &b.id).query_async(&mut ca).await.unwrap();
    assert!(!claimed(&own_line(a.addr).await).contains(&slot));
    assert!(!claimed(&own_line(b.addr).await).contains(&slot));

    let status = rec.converge(Duration::from_secs(30)).await.unwrap();
    assert!(claimed(&own_line(b.addr).await).contains(&slot));
    let mut client = ClusterClient::new(seeds(&status)).await;
    for k in &keys {
        assert_eq!(client.get(k).await.unwrap().as_deref(), Some("v"), "{k} lost");
    }
    pool.shutdown().await;
}
