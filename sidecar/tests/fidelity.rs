//! The sidecar behaves like one Redis server: a client's commands take
//! effect in the order it sent them, and it reads what it wrote (issue 9).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;
use support::{Cluster, all_serving, client, config};

fn cached(cluster: &Cluster, prefix: &str) -> cachetier_sidecar::Config {
    let mut cfg = config(cluster);
    cfg.cache = cachetier_sidecar::CacheConfig {
        prefixes: vec![prefix.into()],
        ttl: Duration::from_secs(60),
        max_bytes: 1 << 20,
    };
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_through_the_local_cache_executes_in_the_order_it_was_sent() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(cached(&cluster, "k:")).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    for i in 0..300 {
        let _: () = c.set("k:1", "old").await.unwrap();
        // Miss/fill, then a coalesced miss, overtaken by nothing behind them.
        let got: (String, String, String) = redis::pipe()
            .cmd("GET")
            .arg("k:1")
            .cmd("GET")
            .arg("k:1")
            .cmd("SET")
            .arg("k:1")
            .arg("new")
            .ignore()
            .cmd("GET")
            .arg("k:1")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.2.as_str()),
            ("old", "old", "new"),
            "try {i}"
        );
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merged_multi_key_commands_keep_their_place_in_a_pipeline() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(cached(&cluster, "k:")).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    for i in 0..100 {
        let _: () = redis::cmd("MSET")
            .arg(&["k:a", "a0", "x:b", "b0"])
            .query_async(&mut c)
            .await
            .unwrap();
        let (before, after): (Vec<String>, Vec<String>) = redis::pipe()
            .cmd("MGET")
            .arg(&["k:a", "x:b"])
            .cmd("MSET")
            .arg(&["k:a", "a1", "x:b", "b1"])
            .ignore()
            .cmd("MGET")
            .arg(&["k:a", "x:b"])
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(before, vec!["a0", "b0"], "try {i}");
        assert_eq!(after, vec!["a1", "b1"], "try {i}");
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_retried_after_the_watchdog_never_sees_a_later_write_of_its_client() {
    let cluster = Cluster::start(3, 1);
    let cfg = cachetier_sidecar::Config {
        read_policy: cachetier_sidecar::ReadPolicy::ReplicasOnly,
        ..config(&cluster)
    };
    let key = "retry:{r}";
    let (primary, replicas) = cluster.shard_of(key);
    cluster.by_addr(&primary).cli(&["SET", key, "old"]);
    cluster.by_addr(&primary).cli(&["WAIT", "1", "2000"]);
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let replica = cluster.by_addr(&replicas[0]);
    replica.signal("-STOP");
    // The GET waits on the stopped replica while the SET behind it is
    // applied on the primary; the watchdog then fails the GET's connection.
    let got: Vec<redis::Value> = redis::pipe()
        .ignore_errors()
        .cmd("GET")
        .arg(key)
        .cmd("SET")
        .arg(key)
        .arg("new")
        .query_async(&mut c)
        .await
        .unwrap();
    replica.signal("-CONT");
    match &got[0] {
        redis::Value::BulkString(v) => assert_eq!(v, b"old", "the read saw the write behind it"),
        redis::Value::ServerError(_) => {}
        other => panic!("unexpected reply {other:?}"),
    }
    let now: String = c.get(key).await.unwrap();
    assert_eq!(now, "new");
    sidecar.shutdown().await;
}

/// Reads `key` in a bounded loop until `stop`; returns the number of errors.
fn reader_loop(
    mut con: redis::aio::MultiplexedConnection,
    key: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut errors = 0;
        for _ in 0..1_000_000 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            if con.get::<_, Option<String>>(key).await.is_err() {
                errors += 1;
            }
        }
        errors
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_replica_is_back_within_a_second_and_stays_with_resp2_and_resp3_clients() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = Cluster::start(3, 2);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("flap", "v").await.unwrap();
    let (_, replicas) = cluster.shard_of("flap");
    let victim = cluster.by_addr(&replicas[0]);
    let victim_addr = victim.addr();
    let url3 = format!("redis://{}/?protocol=resp3", sidecar.local_addr());
    let resp3 = redis::Client::open(url3)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for _ in 0..4 {
        loads.push(reader_loop(c.clone(), "flap", stop.clone()));
        loads.push(reader_loop(resp3.clone(), "flap", stop.clone()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = |s: &Sidecar| {
        s.node_states()
            .into_iter()
            .find(|n| n.addr == victim_addr)
            .map(|n| (n.healthy, n.gate_open))
    };
    victim.signal("-STOP");
    support::eventually("stopped replica out of rotation", Duration::from_secs(3), || {
        state(&sidecar) == Some((false, false))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.signal("-CONT");
    support::eventually("resumed replica back within 1 s", Duration::from_secs(1), || {
        state(&sidecar) == Some((true, true))
    })
    .await;
    let closures = sidecar
        .metrics()
        .watchdog_closures
        .with_label_values(&[victim_addr.as_str()])
        .get();
    for _ in 0..100 {
        assert_eq!(
            state(&sidecar),
            Some((true, true)),
            "the replica stays in rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.unwrap();
    }
    assert_eq!(
        sidecar
            .metrics()
            .watchdog_closures
            .with_label_values(&[victim_addr.as_str()])
            .get(),
        closures,
        "no further watchdog closure after the resume"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_answers_nil_for_a_cached_key_that_holds_no_string_like_redis() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(cached(&cluster, "k:")).await.unwrap();
    let mut c = client(&sidecar).await;
    let _: () = c.hset("k:hash", "f", "v").await.unwrap();
    let _: () = c.set("k:str", "s").await.unwrap();
    let _: () = c.set("plain", "p").await.unwrap();
    for _ in 0..2 {
        let got: Vec<Option<String>> = c.mget(&["k:hash", "k:str", "plain", "k:none"]).await.unwrap();
        assert_eq!(got, vec![None, Some("s".into()), Some("p".into()), None]);
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_its_own_writes_while_the_replica_catches_up() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    // Large values take the replica a while to apply.
    let mut c = client(&sidecar).await;
    let big = "x".repeat(8 << 20);
    // Keys of 100 other slots of the big key's shard (so a pipeline of
    // them stays on one connection and is quick).
    let ranges = cluster.slots_of(&cluster.shard_of("ryw:big").0);
    let mut slots = std::collections::HashSet::new();
    let others: Vec<String> = (0..)
        .map(|j| format!("ryw:other:{j}"))
        .filter(|k| {
            let s = cachetier_sidecar::slot::slot(k.as_bytes());
            ranges.iter().any(|&(a, b)| a <= s && s <= b) && slots.insert(s)
        })
        .take(100)
        .collect();
    for i in 0..8 {
        let value = format!("{i}{big}");
        let _: () = c.set("ryw:big", &value).await.unwrap();
        if i % 2 == 1 {
            // Writes of 100 more slots once it is answered: more than the
            // sidecar keeps a record of each (the big key's is folded into
            // one floor for every slot), and the read must still see it.
            let mut pipe = redis::pipe();
            for k in &others {
                pipe.set(k, i).ignore();
            }
            let () = pipe.query_async(&mut c).await.unwrap();
        }
        let got: Option<String> = c.get("ryw:big").await.unwrap();
        assert!(
            got.as_deref() == Some(value.as_str()),
            "round {i}: read an older value"
        );
    }
    // Many clients, each writing then reading its own key, no pipelining.
    let mut tasks = Vec::new();
    for t in 0..20 {
        let mut con = client(&sidecar).await;
        tasks.push(tokio::spawn(async move {
            let mut stale = 0;
            for i in 0..100 {
                let key = format!("ryw:{t}:{}", i % 10);
                let _: () = con.set(&key, i).await.unwrap();
                if con.get::<_, Option<i64>>(&key).await.unwrap() != Some(i) {
                    stale += 1;
                }
            }
            stale
        }));
    }
    let mut stale = 0;
    for t in tasks {
        stale += t.await.unwrap();
    }
    assert_eq!(stale, 0, "reads that missed the client's own write");
    assert!(
        sidecar.metrics().read_your_writes_primary_reads.get() > 0,
        "the reads behind writes went to the primaries"
    );
    sidecar.shutdown().await;
}

const BUSY_1500MS: &str = "local s = redis.call('TIME') \
    while true do \
      local n = redis.call('TIME') \
      if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 1500000 then break end \
    end \
    return 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_script_is_not_a_silent_node_and_fails_nobody_elses_writes() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut script_client = client(&sidecar).await;
    let mut writer = client(&sidecar).await;
    let _: () = writer.set("{slow}warm", 1).await.unwrap();
    let script = tokio::spawn(async move {
        redis::cmd("EVAL")
            .arg(BUSY_1500MS)
            .arg(1)
            .arg("{slow}key")
            .query_async::<i64>(&mut script_client)
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..20 {
        let r: redis::RedisResult<()> = writer.set(format!("{{slow}}k{i}"), i).await;
        assert!(r.is_ok(), "write {i} failed: {r:?}");
    }
    assert_eq!(script.await.unwrap().unwrap(), 1, "the script's own reply");
    assert_eq!(
        sidecar
            .metrics()
            .watchdog_closures
            .with_label_values(&[cluster.shard_of("{slow}key").0.as_str()])
            .get(),
        0,
        "no watchdog closure for a node busy with a script"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hscan_sscan_zscan_and_touch_run_on_the_keys_primary() {
    let cluster = Cluster::start(3, 2);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let fields: Vec<(String, i64)> = (0..500).map(|i| (format!("f{i}"), i)).collect();
    let _: () = c.hset_multiple("cur:{h}", &fields).await.unwrap();
    let members: Vec<String> = fields.iter().map(|(f, _)| f.clone()).collect();
    let _: () = c.sadd("cur:{h}s", &members).await.unwrap();
    let scored: Vec<(i64, String)> = fields.iter().map(|(f, i)| (*i, f.clone())).collect();
    let _: () = c.zadd_multiple("cur:{h}z", &scored).await.unwrap();
    let (primary, _) = cluster.shard_of("cur:{h}");
    cluster.by_addr(&primary).cli(&["WAIT", "2", "2000"]);
    // Another client: the writer's own reads would go to the primary anyway.
    let mut c = client(&sidecar).await;
    cluster.reset_stats();
    let mut calls = 0;
    for (cmd, key, step) in [
        ("HSCAN", "cur:{h}", 2),
        ("SSCAN", "cur:{h}s", 1),
        ("ZSCAN", "cur:{h}z", 2),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        let mut cursor = "0".to_string();
        for _ in 0..1000 {
            let (next, items): (String, Vec<String>) = redis::cmd(cmd)
                .arg(key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(20)
                .query_async(&mut c)
                .await
                .unwrap();
            calls += 1;
            seen.extend(items.into_iter().step_by(step));
            cursor = next;
            if cursor == "0" {
                break;
            }
        }
        assert_eq!(seen.len(), 500, "{cmd} saw every element once");
    }
    let on_primary: u64 = ["hscan", "sscan", "zscan"]
        .iter()
        .map(|c| cluster.by_addr(&primary).calls(c))
        .sum();
    assert_eq!(on_primary, calls, "every cursor call went to the key's primary");

    // TOUCH refreshes the access time the primary's eviction reads, so it
    // runs there (alone, and each part of a cross-slot one).
    let other = (0..)
        .map(|i| format!("cur:{{o{i}}}"))
        .find(|k| cluster.shard_of(k).0 != primary)
        .unwrap();
    cluster.reset_stats();
    for _ in 0..10 {
        let n: i64 = redis::cmd("TOUCH")
            .arg("cur:{h}")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 1);
        let n: i64 = redis::cmd("TOUCH")
            .arg("cur:{h}")
            .arg(&other)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 1, "only cur:{{h}} exists");
    }
    let touches = |addr: &str| cluster.by_addr(addr).calls("touch");
    assert_eq!(touches(&primary), 20, "TOUCH of cur:{{h}} on its primary");
    assert_eq!(
        touches(&cluster.shard_of(&other).0),
        10,
        "TOUCH of {other} on its primary"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_reads_fall_back_to_replicas_while_its_primary_is_down() {
    let cluster = Cluster::start(3, 1);
    // One gate poll at start (gates open), none after: no replica is ever
    // known to have caught up past the write below.
    let cfg = cachetier_sidecar::Config {
        gate_interval: Duration::from_secs(120),
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("down:{d}", "v").await.unwrap();
    let (primary, _) = cluster.shard_of("down:{d}");
    let primary = cluster.by_addr(&primary);
    primary.cli(&["WAIT", "1", "2000"]);
    primary.signal("-STOP");
    let got: redis::RedisResult<Option<String>> = c.get("down:{d}").await;
    primary.signal("-CONT");
    assert_eq!(got.unwrap().as_deref(), Some("v"));
    sidecar.shutdown().await;
}

/// Forwards 127.0.0.1:<returned port> to `to`, replies in chunks with a
/// pause after each large one: a node that is slow to stream but never
/// silent for long.
async fn trickling_relay(to: u16, pause: Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut uw).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 128 * 1024];
                loop {
                    let n = match ur.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if n > 16 * 1024 {
                        tokio::time::sleep(pause).await;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_value_still_streaming_is_life_not_silence() {
    let cluster = Cluster::start(3, 0);
    let key = "big:{t}";
    let (primary, _) = cluster.shard_of(key);
    let node = cluster.by_addr(&primary);
    // The primary announces the relay as its address, so the sidecar
    // reaches it only through the relay.
    let relay = trickling_relay(node.port, Duration::from_millis(150)).await;
    let relay_addr = format!("127.0.0.1:{relay}");
    node.cli(&["CONFIG", "SET", "cluster-announce-port", &relay.to_string()]);
    support::eventually(
        "every node knows the relay address",
        Duration::from_secs(10),
        || {
            cluster
                .nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "NODES"]).contains(&format!("{relay_addr}@")))
        },
    )
    .await;
    let cfg = cachetier_sidecar::Config {
        read_policy: cachetier_sidecar::ReadPolicy::Primary,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    assert!(sidecar.node_states().iter().any(|n| n.addr == relay_addr));
    let mut c = client(&sidecar).await;
    // 2 MiB at 128 KiB per 150 ms: about 2.4 s to stream, never silent 1 s.
    let value = "v".repeat(2 << 20);
    let _: () = c.set(key, &value).await.unwrap();
    let got: Option<String> = c.get(key).await.unwrap();
    assert!(got.as_deref() == Some(value.as_str()), "the value arrived whole");
    assert_eq!(
        sidecar
            .metrics()
            .watchdog_closures
            .with_label_values(&[relay_addr.as_str()])
            .get(),
        0
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_meets_moved_keeps_its_order_and_its_replies() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let key = "moving:counter";
    let _: () = c.set(key, 1).await.unwrap();
    let (from, _) = cluster.shard_of(key);
    let from = cluster.by_addr(&from);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let slot = from.cli(&["CLUSTER", "KEYSLOT", key]).trim().to_string();
    let (from_id, to_id) = (from.node_id(), to.node_id());
    to.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
    from.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
    let port = to.port.to_string();
    let migrated = from.cli(&["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key]);
    assert!(migrated.contains("OK"), "{migrated}");
    for n in &cluster.nodes {
        n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    // The sidecar still routes the slot to its old owner: every command of
    // this pipeline meets MOVED there first, and each must still run after
    // the one before it.
    let replies: (i64, String, (), i64, String, i64) = redis::pipe()
        .incr(key, 1)
        .get(key)
        .set(key, 10)
        .incr(key, 1)
        .get(key)
        .incr(key, 5)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(replies, (2, "2".into(), (), 11, "11".into(), 16));
    assert!(sidecar.metrics().redirects.with_label_values(&["moved"]).get() >= 1);
    sidecar.shutdown().await;
}

async fn wait(
    c: &mut redis::aio::MultiplexedConnection,
    replicas: &str,
    ms: &str,
) -> redis::RedisResult<i64> {
    redis::cmd("WAIT").arg(replicas).arg(ms).query_async(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_counts_the_replicas_that_hold_the_clients_writes() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let (primary, replicas) = cluster.shard_of("wait:big");
    // Nothing written yet: the connected replicas, at once (as Redis).
    assert_eq!(wait(&mut c, "1", "0").await.unwrap(), 1);
    // Pipelined right behind a large write (the replica takes a while to
    // apply it): WAIT answers 1 only once the replica holds it.
    let mut on_replica = support::client_of(replicas[0].parse().unwrap()).await;
    let () = redis::cmd("READONLY").query_async(&mut on_replica).await.unwrap();
    let big = "x".repeat(8 << 20);
    for i in 0..6 {
        let (n,): (i64,) = redis::pipe()
            .set("wait:big", format!("{i}{big}"))
            .ignore()
            .cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 1, "round {i}");
        let head: String = redis::cmd("GETRANGE")
            .arg("wait:big")
            .arg(0)
            .arg(0)
            .query_async(&mut on_replica)
            .await
            .unwrap();
        assert_eq!(
            head,
            i.to_string(),
            "round {i}: WAIT counted a replica without the write"
        );
    }
    // More replicas than there are: the count once the timeout passes.
    let started = std::time::Instant::now();
    assert_eq!(wait(&mut c, "2", "300").await.unwrap(), 1);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // A stopped replica gets nothing new: 0 at the timeout, which a node
    // that never answers does not stretch.
    let replica = cluster.by_addr(&replicas[0]);
    replica.signal("-STOP");
    let _: () = c.set("wait:big", "later").await.unwrap();
    let started = std::time::Instant::now();
    let n = wait(&mut c, "1", "400").await;
    let took = started.elapsed();
    replica.signal("-CONT");
    assert_eq!(n.unwrap(), 0);
    assert!(took < Duration::from_millis(1200), "{took:?}");
    // Redis's own argument errors.
    let node = cluster.by_addr(&primary);
    for (n, ms) in [("a", "0"), ("0", "x"), ("0", "-1"), ("+1", "0")] {
        let e = wait(&mut c, n, ms).await.unwrap_err();
        let redis_says = node.cli(&["WAIT", n, ms]);
        let text = redis_says.trim().trim_start_matches("ERR ");
        assert!(
            e.to_string().contains(text),
            "WAIT {n} {ms}: {e} / Redis: {redis_says}"
        );
    }
    sidecar.shutdown().await;
}

/// Consecutive pipelined commands of a client share one entry on their
/// connection: replies that arrive over many reads, interleaved with
/// another client's, must each still reach its own place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_replies_spanning_many_reads_reach_their_own_places() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    // One hash tag: every command goes to one node, back to back.
    let key = |i: usize| format!("span:{{t}}:{i}");
    // Distinct contents and lengths, 64 KiB and up: a pipeline's replies
    // take many reads.
    let value = |i: usize| format!("{i}:").repeat((64 << 10) / 4 + i * 97);
    let mut setup = client(&sidecar).await;
    for i in 0..48 {
        let _: () = setup.set(key(i), value(i)).await.unwrap();
    }
    let pipeline = move |offset: usize| {
        let mut p = redis::pipe();
        for i in 0..48 {
            let i = (i + offset) % 48;
            p.get(key(i)).strlen(key(i));
        }
        p
    };
    let mut clients = Vec::new();
    for offset in [0, 17] {
        let mut c = client(&sidecar).await;
        clients.push(tokio::spawn(async move {
            for round in 0..3 {
                let replies: Vec<String> = pipeline(offset).query_async(&mut c).await.unwrap();
                assert_eq!(replies.len(), 96);
                for (n, pair) in replies.chunks(2).enumerate() {
                    let i = (n + offset) % 48;
                    assert!(
                        pair[0] == value(i),
                        "round {round}: GET {} answered another key's value",
                        key(i)
                    );
                    assert_eq!(
                        pair[1],
                        value(i).len().to_string(),
                        "round {round}: STRLEN {}",
                        key(i)
                    );
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_nothing_in_flight(&sidecar).await;
    sidecar.shutdown().await;
}

/// Every reply the nodes were waited on for has been counted in.
async fn assert_nothing_in_flight(sidecar: &Sidecar) {
    support::eventually("no node has replies in flight", Duration::from_secs(5), || {
        sidecar.node_states().iter().all(|n| n.in_flight == 0)
    })
    .await;
}

/// A connection that dies with a client's pipelined commands on it answers
/// every one of them, not only the first of the run they share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_dies_answers_every_pipelined_command_on_it() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let key = |i: usize| format!("cut:{{t}}:{i}");
    let mut c = client(&sidecar).await;
    for i in 0..64 {
        let _: () = c.set(key(i), i).await.unwrap();
    }
    let (primary, _) = cluster.shard_of(&key(0));
    let node = cluster.by_addr(&primary);
    // A client that wrote nothing: its reads take the direct path.
    let mut c = client(&sidecar).await;
    // Silent past the watchdog's second, then back.
    node.signal("-STOP");
    let resume = tokio::spawn({
        let pid = node.pid();
        async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    });
    let mut p = redis::pipe();
    p.ignore_errors();
    for i in 0..64 {
        p.get(key(i));
    }
    let replies = tokio::time::timeout(
        Duration::from_secs(20),
        p.query_async::<Vec<redis::Value>>(&mut c),
    )
    .await;
    resume.await.unwrap();
    node.signal("-CONT");
    let replies = replies
        .expect("every command of the pipeline is answered")
        .unwrap();
    assert_eq!(replies.len(), 64);
    for (i, r) in replies.iter().enumerate() {
        match r {
            redis::Value::BulkString(v) => assert_eq!(v, i.to_string().as_bytes(), "GET {}", key(i)),
            redis::Value::ServerError(_) => {}
            other => panic!("GET {}: unexpected reply {other:?}", key(i)),
        }
    }
    assert!(
        sidecar
            .metrics()
            .watchdog_closures
            .with_label_values(&[primary.as_str()])
            .get()
            >= 1
    );
    // The same client's next pipeline finds the node's new connection.
    support::eventually("the node is back in rotation", Duration::from_secs(5), || {
        sidecar.node_states().iter().all(|n| n.healthy)
    })
    .await;
    let again: Vec<String> = p.query_async(&mut c).await.unwrap();
    assert_eq!(again, (0..64).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_nothing_in_flight(&sidecar).await;
    sidecar.shutdown().await;
}

/// A primary that momentarily knows no owner for its slot (after a
/// failover a stale bus message can do that) refuses a write before
/// running it: the sidecar sends it again once the node serves the slot,
/// instead of passing `CLUSTERDOWN` to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_a_slot_its_primary_momentarily_does_not_serve_goes_again() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("unserved:k", "v0").await.unwrap();
    let (primary, _) = cluster.shard_of("unserved:k");
    let node = cluster.by_addr(&primary);
    let slot = node.cli(&["CLUSTER", "KEYSLOT", "unserved:k"]).trim().to_string();
    assert_eq!(node.cli(&["CLUSTER", "DELSLOTS", &slot]).trim(), "OK");
    let restore = {
        let (addr, slot) = (primary.clone(), slot.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let out = std::process::Command::new("redis-cli")
                .args(["-u", &format!("redis://{addr}"), "CLUSTER", "ADDSLOTS", &slot])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
    };
    let started = std::time::Instant::now();
    let set: redis::RedisResult<()> = c.set("unserved:k", "v1").await;
    assert_eq!(restore.join().unwrap(), "OK");
    set.unwrap_or_else(|e| panic!("after {:?}: {e}", started.elapsed()));
    assert_eq!(node.cli(&["GET", "unserved:k"]).trim(), "v1");
    sidecar.shutdown().await;
}
