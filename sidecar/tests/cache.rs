//! Local-cache staleness bounds against real Redis Clusters on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;
use support::{Cluster, RedisNode, all_serving, client, cut_tracking, eventually};

fn cache_config(cluster: &Cluster) -> cachetier_sidecar::Config {
    support::hot_cache_config(cluster, 1 << 20)
}

/// Read `key` until the second read is a cache hit (tracking is established).
async fn warm(sidecar: &Sidecar, c: &mut redis::aio::MultiplexedConnection, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = sidecar.metrics().cache_hits.get();
        let _: Option<String> = c.get(key).await.unwrap();
        let _: Option<String> = c.get(key).await.unwrap();
        if sidecar.metrics().cache_hits.get() > before {
            return;
        }
        assert!(Instant::now() < deadline, "cache never hit for {key}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Read `key` through the sidecar until it is `fresh`; returns how many stale
/// reads were served and for how long.
async fn stale_reads(c: &mut redis::aio::MultiplexedConnection, key: &str, fresh: &str) -> (u32, Duration) {
    let start = Instant::now();
    let mut stale = 0;
    loop {
        let v: Option<String> = c.get(key).await.unwrap();
        if v.as_deref() == Some(fresh) {
            return (stale, start.elapsed());
        }
        stale += 1;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{key} still stale after {stale} reads: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_a_primary_gained_in_a_reshard_are_flushed_when_its_tracking_link_drops() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(cache_config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let key = "hot:resharded";
    let (from, _) = cluster.shard_of(key);
    let from = cluster.by_addr(&from);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let slot = from.cli(&["CLUSTER", "KEYSLOT", key]).trim().to_string();
    let to_id = to.node_id();
    // Wait for the sidecar's first tracking sessions before the reshard.
    let _: () = c.set("hot:before", "x").await.unwrap();
    warm(&sidecar, &mut c, "hot:before").await;
    // An empty slot moves for good between two existing primaries.
    for n in &cluster.nodes {
        n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    // The write follows MOVED; the sidecar's slot map then follows.
    let _: () = c.set(key, "v1").await.unwrap();
    let slot_n: u16 = slot.parse().unwrap();
    eventually("the slot map names the new owner", Duration::from_secs(5), || {
        sidecar.slot_owner(slot_n).as_deref() == Some(to.addr().as_str())
    })
    .await;
    // The tracking loop has seen the slot change hands (and flushed it).
    eventually("the moved slot was flushed", Duration::from_secs(5), || {
        sidecar
            .metrics()
            .cache_invalidations
            .with_label_values(&["topology"])
            .get()
            > 0
    })
    .await;
    warm(&sidecar, &mut c, key).await;

    // The new owner's tracking link drops and the key changes meanwhile.
    cut_tracking(to);
    to.cli(&["SET", key, "v2"]);
    let (stale, window) = stale_reads(&mut c, key, "v2").await;
    eprintln!("after the tracking link was cut: {stale} stale reads over {window:?}");
    // Bounded by the time to notice the loss (an EOF here): far below the
    // 60 s cache TTL a missing flush would leave it to.
    assert!(window < Duration::from_secs(1), "stale for {window:?}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_is_served_no_longer_than_its_keys_own_ttl() {
    let cluster = Cluster::start_opts(3, 0, None, &["--enable-debug-command", "yes"]);
    let sidecar = Sidecar::bind(cache_config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let key = "hot:volatile";
    let (primary, _) = cluster.shard_of(key);
    // Redis may lag expiring keys under load; with active expiry off it does
    // not expire them at all until they are accessed.
    let primary = cluster.by_addr(&primary);
    assert!(primary.cli(&["DEBUG", "SET-ACTIVE-EXPIRE", "0"]).contains("OK"));
    let _: () = c.set("hot:warmup", "x").await.unwrap();
    warm(&sidecar, &mut c, "hot:warmup").await;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("v")
        .arg("PX")
        .arg(500)
        .query_async(&mut c)
        .await
        .unwrap();
    warm(&sidecar, &mut c, key).await;
    let set_at = Instant::now();
    let deadline = set_at + Duration::from_secs(5);
    loop {
        let v: Option<String> = c.get(key).await.unwrap();
        if v.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired key still served from the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_a_cached_prefix_leave_unrelated_keys_cached() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(cache_config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let keep: Vec<String> = (0..50).map(|i| format!("hot:keep:{i}")).collect();
    for k in &keep {
        let _: () = c.set(k, "kept").await.unwrap();
    }
    for k in &keep {
        warm(&sidecar, &mut c, k).await;
    }
    // 2000 writes of other keys under the same prefix: each invalidates its
    // own key, synchronously before it is sent (and again when the primary's
    // tracking push arrives).
    let mut pipe = redis::pipe();
    for j in 0..2000 {
        pipe.cmd("SET").arg(format!("hot:churn:{j}")).arg(j).ignore();
    }
    let () = pipe.query_async(&mut c).await.unwrap();
    cluster.reset_stats();
    let hits_before = sidecar.metrics().cache_hits.get();
    for k in &keep {
        assert_eq!(c.get::<_, String>(k).await.unwrap(), "kept");
    }
    let upstream_gets: u64 = cluster.nodes.iter().map(|n| n.calls("get")).sum();
    assert_eq!(upstream_gets, 0, "every unrelated key is still a hit");
    assert_eq!(sidecar.metrics().cache_hits.get() - hits_before, 50);
    sidecar.shutdown().await;
}

/// What the sidecar says about `addr`: (is primary, is tracked).
fn role_of(sidecar: &Sidecar, addr: &str) -> Option<(bool, bool)> {
    sidecar
        .node_states()
        .into_iter()
        .find(|n| n.addr == addr)
        .map(|n| (n.primary, n.tracked))
}

/// Promote `node` (a replica, in sync) and wait until the sidecar routes to
/// it as a primary. `TAKEOVER`: the other primaries would not vote for a
/// second failover of the same shard within twice the node timeout.
async fn promote(sidecar: &Sidecar, c: &mut redis::aio::MultiplexedConnection, node: &RedisNode, key: &str) {
    assert!(node.cli(&["CLUSTER", "FAILOVER", "TAKEOVER"]).contains("OK"));
    eventually("the failover completed", Duration::from_secs(15), || {
        node.info_field("replication", "role").as_deref() == Some("master")
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while role_of(sidecar, &node.addr()).map(|r| r.0) != Some(true) {
        // A write to the moved primary gets MOVED, which refreshes the map.
        let _: redis::RedisResult<()> = c.set(key, "x").await;
        assert!(
            Instant::now() < deadline,
            "the sidecar never saw {} promoted",
            node.addr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_is_not_tracked_until_its_new_session_after_re_promotion() {
    let cluster = Cluster::start(3, 1);
    let mut cfg = cache_config(&cluster);
    // The demoted node is listed (as a replica) by the next periodic refresh.
    cfg.topology_refresh = Duration::from_secs(1);
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let key = "hot:failover";
    let (primary, replicas) = cluster.shard_of(key);
    let (old, new) = (cluster.by_addr(&primary), cluster.by_addr(&replicas[0]));
    eventually("the primary is tracked", Duration::from_secs(5), || {
        role_of(&sidecar, &primary) == Some((true, true))
    })
    .await;

    promote(&sidecar, &mut c, new, key).await;
    // Demoted: its tracking session is gone, and so is its `tracked` mark
    // (else, promoted again, it would count as tracked before a new session
    // exists and fills of its slots would be kept with nothing invalidating them).
    eventually(
        "the demoted primary is listed as a replica",
        Duration::from_secs(10),
        || role_of(&sidecar, &primary).is_some_and(|r| !r.0),
    )
    .await;
    eventually("the demoted primary is untracked", Duration::from_secs(3), || {
        role_of(&sidecar, &primary) == Some((false, false))
    })
    .await;

    // In sync with its new primary before it can take over again.
    eventually(
        "the demoted primary serves reads",
        Duration::from_secs(10),
        || {
            sidecar
                .node_states()
                .iter()
                .any(|n| n.addr == primary && n.healthy && n.gate_open)
        },
    )
    .await;
    promote(&sidecar, &mut c, old, key).await;
    eventually(
        "the re-promoted primary is tracked again",
        Duration::from_secs(5),
        || role_of(&sidecar, &primary) == Some((true, true)),
    )
    .await;
    // Its new session invalidates: a direct write is seen.
    let _: () = c.set(key, "v1").await.unwrap();
    warm(&sidecar, &mut c, key).await;
    old.cli(&["SET", key, "v2"]);
    let (stale, window) = stale_reads(&mut c, key, "v2").await;
    eprintln!("a direct write after re-promotion: {stale} stale reads over {window:?}");
    sidecar.shutdown().await;
}

/// A cached entry is its key and value, not the buffers they were read
/// into: a small entry filled right after a 1 MiB request and a 1 MiB reply
/// must not keep those buffers alive (the cache's byte bound would then
/// bound nothing). Run as its own process, so its memory is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_entries_do_not_pin_the_buffers_they_were_read_from() {
    const ROUNDS: usize = 100;
    let cluster = Cluster::start(3, 0);
    // Every key in one slot, so the fills share the upstream connection
    // that carries the 1 MiB replies.
    let node = cluster.by_addr(&cluster.shard_of("{t}").0);
    let port = support::next_port();
    let mut sidecar = support::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_cachetier-sidecar"))
            .env("CACHETIER_SEEDS", cluster.seeds().join(","))
            .env("CACHETIER_LISTEN", format!("127.0.0.1:{port}"))
            .env("CACHETIER_CACHE_PREFIXES", "hot:")
            .env("CACHETIER_CACHE_MAX_BYTES", "1MiB")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = sidecar.0.id();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    eventually("the sidecar listens", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    let mut c = support::client_of(addr).await;
    for i in 0..=ROUNDS {
        let _: () = c.set(format!("hot:{{t}}{i}"), i).await.unwrap();
    }
    let big = "x".repeat(1 << 20);
    // Until the node is tracked, fills are not kept: read one key until a
    // second read no longer reaches Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _: Option<String> = c.get("hot:{t}warm").await.unwrap();
        let before = node.calls("get");
        let _: Option<String> = c.get("hot:{t}warm").await.unwrap();
        if node.calls("get") == before {
            break;
        }
        assert!(Instant::now() < deadline, "the cache never kept an entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 1 MiB request and a 1 MiB reply, then a small read of `hot:{t}<i>`.
    let round = |i: usize| {
        let big = big.clone();
        let mut c = c.clone();
        async move {
            let _: () = c.set("{t}big", &big).await.unwrap();
            let v: String = c.get("{t}big").await.unwrap();
            assert_eq!(v.len(), big.len());
            let v: Option<usize> = c.get(format!("hot:{{t}}{i}")).await.unwrap();
            assert_eq!(v, Some(i));
        }
    };
    // The buffers' first growth is not what is measured.
    round(ROUNDS).await;
    let before = support::proc_status_kib(&pid.to_string(), "VmRSS");
    // Fills, then hits (the first hit of an entry copies it to the cache's
    // front map).
    for i in 0..ROUNDS {
        round(i).await;
    }
    let gets = node.calls("get");
    for i in 0..ROUNDS {
        round(i).await;
    }
    assert_eq!(
        node.calls("get") - gets,
        ROUNDS as u64,
        "only the 1 MiB GETs reach Redis: the small entries were kept"
    );
    let grown_mib = support::proc_status_kib(&pid.to_string(), "VmRSS").saturating_sub(before) / 1024;
    eprintln!("RSS grew by {grown_mib} MiB over {ROUNDS} fills and {ROUNDS} hits");
    assert!(
        grown_mib < 32,
        "RSS grew by {grown_mib} MiB over {ROUNDS} small fills and hits of a 1 MiB cache"
    );
    sidecar.0.kill().unwrap();
}
