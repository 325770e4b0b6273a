//! The sidecar against real Redis Clusters on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;
use support::{Cluster, all_serving, client, config, eventually, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_clients_see_the_cluster_as_one_redis_server() {
    let cluster = Cluster::start(3, 1);
    // Replica reads are eventually consistent (a GET right after a SET may
    // reach a replica that has not applied it yet); this test checks command
    // semantics, so it reads from primaries. Balancing has its own tests.
    let cfg = cachetier_sidecar::Config {
        read_policy: cachetier_sidecar::ReadPolicy::Primary,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let mut c = client(&sidecar).await;

    // Strings, hashes, lists, sets, sorted sets.
    let _: () = c.set("s:1", "v1").await.unwrap();
    assert_eq!(c.get::<_, String>("s:1").await.unwrap(), "v1");
    assert_eq!(c.incr::<_, _, i64>("counter", 5).await.unwrap(), 5);
    let _: () = c.hset_multiple("h:1", &[("a", "1"), ("b", "2")]).await.unwrap();
    let h: HashMap<String, String> = c.hgetall("h:1").await.unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(c.hget::<_, _, String>("h:1", "b").await.unwrap(), "2");
    let _: () = c.rpush("l:1", &["x", "y", "z"]).await.unwrap();
    assert_eq!(
        c.lrange::<_, Vec<String>>("l:1", 0, -1).await.unwrap(),
        vec!["x", "y", "z"]
    );
    let _: () = c.sadd("set:1", &["a", "b", "a"]).await.unwrap();
    assert_eq!(c.scard::<_, i64>("set:1").await.unwrap(), 2);
    let _: () = c
        .zadd_multiple("z:1", &[(1.0, "one"), (2.0, "two")])
        .await
        .unwrap();
    assert_eq!(
        c.zrange::<_, Vec<String>>("z:1", 0, -1).await.unwrap(),
        vec!["one", "two"]
    );

    // Cross-slot MSET / MGET / EXISTS / DEL are split and merged in order.
    let pairs: Vec<(String, String)> = (0..20).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
    let _: () = c.mset(&pairs).await.unwrap();
    let keys: Vec<String> = pairs
        .iter()
        .map(|(k, _)| k.clone())
        .chain(["missing".to_string()])
        .collect();
    let vals: Vec<Option<String>> = c.mget(&keys).await.unwrap();
    assert_eq!(vals.len(), 21);
    for (i, v) in vals.iter().take(20).enumerate() {
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()));
    }
    assert_eq!(vals[20], None);
    assert_eq!(c.exists::<_, i64>(&keys).await.unwrap(), 20);
    assert_eq!(c.del::<_, i64>(&keys[..10]).await.unwrap(), 10);

    // Other cross-slot commands are refused like Redis Cluster does.
    let e = redis::cmd("RENAME")
        .arg("k11")
        .arg("k12")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().to_uppercase().contains("CROSSSLOT"), "{e}");

    // A pipeline keeps reply order.
    let mut pipe = redis::pipe();
    for i in 0..200 {
        pipe.cmd("SET").arg(format!("p{i}")).arg(i).ignore();
        pipe.cmd("GET").arg(format!("p{i}"));
    }
    let got: Vec<i64> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(got, (0..200).collect::<Vec<i64>>());

    // A transaction on one slot is pinned to its primary.
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg("{tx}a")
        .cmd("INCRBY")
        .arg("{tx}b")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((a, b), (1, 10));

    // Server-wide commands behave as one server.
    let dbsize: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    let mut all: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await.unwrap();
    assert_eq!(all.len() as i64, dbsize);
    let mut scanned = Vec::new();
    let mut cursor: u64 = 0;
    for _ in 0..10_000 {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(50)
            .query_async(&mut c)
            .await
            .unwrap();
        scanned.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    all.sort();
    scanned.sort();
    scanned.dedup();
    assert_eq!(scanned, all, "SCAN walks every shard");
    let rk: Option<String> = redis::cmd("RANDOMKEY").query_async(&mut c).await.unwrap();
    assert!(rk.is_some());
    assert_eq!(
        redis::cmd("PING").query_async::<String>(&mut c).await.unwrap(),
        "PONG"
    );
    assert_eq!(
        redis::cmd("ECHO")
            .arg("hi")
            .query_async::<String>(&mut c)
            .await
            .unwrap(),
        "hi"
    );
    let _: () = redis::cmd("SELECT").arg(0).query_async(&mut c).await.unwrap();
    assert!(
        redis::cmd("SELECT")
            .arg(1)
            .query_async::<()>(&mut c)
            .await
            .is_err()
    );
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("app")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        redis::cmd("CLIENT")
            .arg("GETNAME")
            .query_async::<String>(&mut c)
            .await
            .unwrap(),
        "app"
    );
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    assert!(info.contains("cachetier_shards:3"), "{info}");
    let time: Vec<String> = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    assert_eq!(time.len(), 2);

    // redis-cli, plain, through the sidecar.
    let port = sidecar.local_addr().port().to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "cli:key", "hello"]), "OK");
    assert_eq!(cli(&["GET", "cli:key"]), "hello");
    assert_eq!(cli(&["MGET", "cli:key", "k15"]), "hello\nv15");
    assert_eq!(cli(&["HGET", "h:1", "a"]), "1");

    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    assert_eq!(redis::cmd("DBSIZE").query_async::<i64>(&mut c).await.unwrap(), 0);

    // Health and metrics.
    let maddr = sidecar.metrics_addr().unwrap();
    let (status, _) = http_get(maddr, "/readyz").await;
    assert!(status.contains("200"), "{status}");
    let (_, body) = http_get(maddr, "/metrics").await;
    assert!(
        body.contains("cachetier_sidecar_requests_total{command=\"get\",outcome=\"ok\"}"),
        "{body}"
    );
    assert!(body.contains("cachetier_sidecar_topology_refreshes_total"));
    sidecar.shutdown().await;
}

async fn raw_exchange(addr: std::net::SocketAddr, send: &[u8]) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(send).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .is_ok();
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors_and_do_not_disturb_other_clients() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let addr = sidecar.local_addr();
    let mut bystander = client(&sidecar).await;
    let _: () = bystander.set("steady", "1").await.unwrap();

    let (reply, closed) = raw_exchange(addr, b"*1\r\n$abc\r\n").await;
    assert!(reply.starts_with("-ERR Protocol error"), "{reply}");
    assert!(closed);
    let (reply, closed) = raw_exchange(addr, b"*1\r\n$99999999999\r\n").await;
    assert!(reply.contains("exceeds the limit"), "{reply}");
    assert!(closed);
    let (reply, _) = raw_exchange(addr, &b"*1\r\n".repeat(100)).await;
    assert!(reply.contains("nesting deeper"), "{reply}");
    let long_inline = format!("GET {}\r\n", "x".repeat(100_000));
    let (reply, _) = raw_exchange(addr, long_inline.as_bytes()).await;
    // Redis's words for it (its inline limit is 64 KiB too).
    assert_eq!(reply, "-ERR Protocol error: too big inline request\r\n");

    // Unknown commands: a clear error, the connection stays usable.
    let e = redis::cmd("FROBNICATE")
        .arg("x")
        .query_async::<()>(&mut bystander)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown command"), "{e}");
    // (Blocking commands and WAIT are served now, see tests/compat/ and
    // tests/fidelity.rs; WAITAOF is refused, saying why.)
    let e = redis::cmd("WAITAOF")
        .arg(0)
        .arg(1)
        .arg(0)
        .query_async::<()>(&mut bystander)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("WAITAOF"), "{e}");
    // (Pub/sub is served now, see tests/pubsub.rs.)

    // Inline commands (telnet style) work.
    let (reply, _) = raw_exchange(addr, b"PING\r\nQUIT\r\n").await;
    assert_eq!(reply, "+PONG\r\n+OK\r\n");

    // A client that sends a long pipeline and disconnects mid-way.
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = Vec::new();
        for i in 0..2000 {
            req.extend_from_slice(format!("*2\r\n$3\r\nGET\r\n$4\r\nk{:03}\r\n", i % 1000).as_bytes());
        }
        s.write_all(&req[..req.len() / 2 + 7]).await.unwrap();
        drop(s);
    }
    for i in 0..100 {
        let v: String = bystander.get("steady").await.unwrap();
        assert_eq!(v, "1", "request {i}");
    }
    sidecar.shutdown().await;
}

/// Read `key` through the sidecar from `tasks` concurrent loops until `stop`
/// or `max` reads; returns (reads, errors).
fn read_load(
    sidecar: &Sidecar,
    key: &'static str,
    tasks: usize,
    max: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    use std::sync::atomic::Ordering;
    let addr = sidecar.local_addr();
    tokio::spawn(async move {
        let con = support::client_of(addr).await;
        let per_task = max / tasks;
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let mut con = con.clone();
            let stop = stop.clone();
            handles.push(tokio::spawn(async move {
                let (mut ok, mut errors) = (0, 0);
                for _ in 0..per_task {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match con.get::<_, Option<String>>(key).await {
                        Ok(Some(_)) => ok += 1,
                        _ => errors += 1,
                    }
                }
                (ok, errors)
            }));
        }
        let mut total = (0, 0);
        for h in handles {
            let (o, e) = h.await.unwrap();
            total.0 += o;
            total.1 += e;
        }
        total
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_policy_gives_each_of_three_replicas_a_third_of_30k_reads() {
    let cluster = Cluster::start(3, 3);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("balanced", "v").await.unwrap();
    let (primary, replicas) = cluster.shard_of("balanced");
    assert_eq!(replicas.len(), 3);
    cluster.reset_stats();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, errors) = read_load(&sidecar, "balanced", 30, 30_000, stop).await.unwrap();
    assert_eq!((ok, errors), (30_000, 0));
    let counts: Vec<u64> = replicas.iter().map(|r| cluster.by_addr(r).calls("get")).collect();
    assert_eq!(
        cluster.by_addr(&primary).calls("get"),
        0,
        "reads stay off the primary"
    );
    assert_eq!(counts.iter().sum::<u64>(), 30_000, "{counts:?}");
    for n in &counts {
        assert!(
            (9_100..=10_900).contains(n),
            "each replica within 1/3 ± 3%: {counts:?}"
        );
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_leaves_rotation_within_1_2s_and_reads_keep_succeeding() {
    use std::sync::atomic::Ordering;
    let cluster = Cluster::start(3, 2);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("steady-read", "v").await.unwrap();
    let (_, replicas) = cluster.shard_of("steady-read");
    let victim = cluster.by_addr(&replicas[0]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = read_load(&sidecar, "steady-read", 8, 2_000_000, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    victim.signal("-STOP");
    let stopped_at = Instant::now();
    let victim_addr = victim.addr();
    let out = |s: &Sidecar| {
        s.node_states()
            .iter()
            .any(|n| n.addr == victim_addr && !n.healthy)
    };
    eventually("stopped replica out of rotation", Duration::from_secs(3), || {
        out(&sidecar)
    })
    .await;
    let took = stopped_at.elapsed();
    assert!(
        took <= Duration::from_millis(1200),
        "left rotation after {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;

    victim.signal("-CONT");
    eventually("resumed replica back in rotation", Duration::from_secs(5), || {
        sidecar
            .node_states()
            .iter()
            .any(|n| n.addr == victim_addr && n.healthy && n.gate_open)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, errors) = load.await.unwrap();
    assert!(ok > 1_000, "the load ran: {ok}");
    assert_eq!(errors, 0, "no read failed while the replica was stopped");
    assert!(
        sidecar
            .metrics()
            .watchdog_closures
            .with_label_values(&[victim_addr.as_str()])
            .get()
            >= 1
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_in_full_resync_receives_no_reads_until_it_is_in_sync() {
    use std::sync::atomic::Ordering;
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let _: () = c.set("resync-key", "v").await.unwrap();
    let (primary, _) = cluster.shard_of("resync-key");
    let primary = cluster.by_addr(&primary);
    // Hold the full sync open until the sidecar has seen the syncing replica
    // for a while: the topology it reads learns of the new node by gossip,
    // which can take seconds on a loaded machine. Lowering the delay later
    // releases the pending sync (Redis re-checks it every replication cron).
    primary.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "60"]);
    let fresh = support::RedisNode::start(&[]);
    fresh.cli(&[
        "CLUSTER",
        "MEET",
        "127.0.0.1",
        &primary.port.to_string(),
        &(primary.port + 20000).to_string(),
    ]);
    let pid = primary.node_id();
    eventually("new node knows the primary", Duration::from_secs(10), || {
        fresh.cli(&["CLUSTER", "NODES"]).contains(&pid)
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = read_load(&sidecar, "resync-key", 4, 10_000_000, stop.clone());
    let reply = fresh.cli(&["CLUSTER", "REPLICATE", &pid]);
    assert!(reply.contains("OK"), "{reply}");
    let fresh_addr = fresh.addr();

    // Replication state and command counts from one INFO call, so they
    // describe the same instant.
    let in_sync_and_gets = || {
        let info = fresh.cli(&["INFO", "everything"]);
        let in_sync = support::info_field(&info, "master_link_status").as_deref() == Some("up")
            && support::info_field(&info, "master_sync_in_progress").as_deref() == Some("0");
        (in_sync, support::calls(&info, "get"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut polls_while_syncing_and_known = 0;
    while polls_while_syncing_and_known < 10 {
        let _ = sidecar.refresh_topology().await;
        let known = sidecar.node_states().iter().any(|n| n.addr == fresh_addr);
        let (in_sync, gets) = in_sync_and_gets();
        assert!(!in_sync, "the full sync finished before it was released");
        assert_eq!(gets, 0, "a syncing replica served a read");
        if known {
            polls_while_syncing_and_known += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar never learned of the new replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    primary.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"]);
    loop {
        let _ = sidecar.refresh_topology().await;
        let (in_sync, gets) = in_sync_and_gets();
        if in_sync {
            break;
        }
        assert_eq!(gets, 0, "a syncing replica served a read");
        assert!(Instant::now() < deadline, "resync did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once in sync the gate opens and the replica takes its share.
    eventually("synced replica serves reads", Duration::from_secs(10), || {
        fresh.calls("get") > 0
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (_, errors) = load.await.unwrap();
    assert_eq!(errors, 0);
    sidecar.shutdown().await;
}

fn cache_config(cluster: &Cluster) -> cachetier_sidecar::Config {
    support::hot_cache_config(cluster, 64 * 1024)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cache_hits_after_a_miss_and_any_write_evicts_the_entry() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(cache_config(&cluster)).await.unwrap();
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("hot:item", "v1").await.unwrap();
    warm(&sidecar, &mut c, "hot:item").await;
    cluster.reset_stats();
    for _ in 0..100 {
        assert_eq!(c.get::<_, String>("hot:item").await.unwrap(), "v1");
    }
    let upstream_gets: u64 = cluster.nodes.iter().map(|n| n.calls("get")).sum();
    assert_eq!(upstream_gets, 0, "hits are served locally");

    // A write through the sidecar evicts at once (read-your-writes).
    let _: () = c.set("hot:item", "v2").await.unwrap();
    assert_eq!(c.get::<_, String>("hot:item").await.unwrap(), "v2");

    // Also inside one pipeline: the GET behind the SET sees the SET.
    warm(&sidecar, &mut c, "hot:item").await;
    let (v,): (String,) = redis::pipe()
        .cmd("SET")
        .arg("hot:item")
        .arg("v2b")
        .ignore()
        .cmd("GET")
        .arg("hot:item")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "v2b");
    // Hits answered in place ahead of a write, and the read behind it, keep
    // the pipeline's order and see the write.
    warm(&sidecar, &mut c, "hot:item").await;
    let (a, b, d): (String, String, String) = redis::pipe()
        .cmd("GET")
        .arg("hot:item")
        .cmd("GET")
        .arg("hot:item")
        .cmd("SET")
        .arg("hot:item")
        .arg("v2c")
        .ignore()
        .cmd("GET")
        .arg("hot:item")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((a.as_str(), b.as_str(), d.as_str()), ("v2b", "v2b", "v2c"));

    // A write by another client directly on the primary evicts via tracking.
    warm(&sidecar, &mut c, "hot:item").await;
    let (primary, _) = cluster.shard_of("hot:item");
    let written = Instant::now();
    cluster.by_addr(&primary).cli(&["SET", "hot:item", "v3"]);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if c.get::<_, String>("hot:item").await.unwrap() == "v3" {
            break;
        }
        assert!(Instant::now() < deadline, "foreign write was never seen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        written.elapsed() < Duration::from_millis(500),
        "evicted after {:?}",
        written.elapsed()
    );

    // If the tracking connection drops, the entries it covered are flushed
    // (a change made while it is down would otherwise never be seen).
    warm(&sidecar, &mut c, "hot:item").await;
    let lost_before = sidecar
        .metrics()
        .cache_invalidations
        .with_label_values(&["tracking_lost"])
        .get();
    let primary_node = cluster.by_addr(&primary);
    let clients = primary_node.cli(&["CLIENT", "LIST"]);
    let tracking_id = clients
        .lines()
        .find(|l| {
            l.split_whitespace()
                .any(|f| f.starts_with("flags=") && f.contains('B'))
        })
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .expect("a broadcast-tracking client on the primary")
        .to_string();
    primary_node.cli(&["CLIENT", "KILL", "ID", &tracking_id]);
    primary_node.cli(&["SET", "hot:item", "v4"]);
    eventually(
        "tracking loss flushed the shard's entries",
        Duration::from_secs(3),
        || {
            sidecar
                .metrics()
                .cache_invalidations
                .with_label_values(&["tracking_lost"])
                .get()
                > lost_before
        },
    )
    .await;
    assert_eq!(c.get::<_, String>("hot:item").await.unwrap(), "v4");

    // Hashes: HGET and HGETALL are cached and evicted the same way.
    let _: () = c.hset("hot:h", "f", "1").await.unwrap();
    assert_eq!(c.hget::<_, _, String>("hot:h", "f").await.unwrap(), "1");
    assert_eq!(c.hget::<_, _, String>("hot:h", "f").await.unwrap(), "1");
    let _: () = c.hset("hot:h", "f", "2").await.unwrap();
    assert_eq!(c.hget::<_, _, String>("hot:h", "f").await.unwrap(), "2");
    let all: HashMap<String, String> = c.hgetall("hot:h").await.unwrap();
    assert_eq!(all.get("f").map(String::as_str), Some("2"));

    // MGET mixes cached and uncached keys, in order.
    let _: () = c.set("cold:x", "c").await.unwrap();
    let v: Vec<Option<String>> = c.mget(&["hot:item", "cold:x", "hot:none"]).await.unwrap();
    assert_eq!(v, vec![Some("v4".into()), Some("c".into()), None]);

    // The byte budget holds under many large values.
    let big = "x".repeat(2048);
    for i in 0..100 {
        let k = format!("hot:big{i}");
        let _: () = c.set(&k, &big).await.unwrap();
        let _: String = c.get(&k).await.unwrap();
    }
    let bytes = sidecar.cache_bytes().await.unwrap();
    assert!(bytes <= 64 * 1024, "cache holds {bytes} bytes");
    let (_, body) = http_get(sidecar.metrics_addr().unwrap(), "/metrics").await;
    for name in [
        "cache_hits_total",
        "cache_misses_total",
        "cache_evictions_total",
        "cache_invalidations_total",
        "node_serving",
    ] {
        assert!(
            body.contains(&format!("cachetier_sidecar_{name}")),
            "{name} exported"
        );
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_identical_misses_cost_one_upstream_get() {
    let cluster = Cluster::start(3, 0);
    // Written before the sidecar exists, so no tracking invalidation for it
    // can arrive late and evict the entry the spike fills.
    let (primary, _) = cluster.shard_of("hot:{spike}");
    cluster.by_addr(&primary).cli(&["SET", "hot:{spike}", "restock"]);
    let sidecar = Sidecar::bind(cache_config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    // Tracking must be up for the key's shard before the entry may be kept;
    // a key with the same hash tag proves it without touching the spike key.
    warm(&sidecar, &mut c, "hot:{spike}warmup").await;
    cluster.reset_stats();
    let mut cons = Vec::new();
    for _ in 0..10 {
        cons.push(client(&sidecar).await);
    }
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut con = cons[i % 10].clone();
        tasks.push(tokio::spawn(async move {
            con.get::<_, String>("hot:{spike}").await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), "restock");
    }
    let upstream_gets: u64 = cluster.nodes.iter().map(|n| n.calls("get")).sum();
    let (_, metrics) = http_get(sidecar.metrics_addr().unwrap(), "/metrics").await;
    let diag: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("watchdog")
                    || l.contains("retries")
                    || l.contains("invalidations")
                    || l.contains("coalesced")
                    || l.contains("cache_misses")
                    || l.contains("upstream_errors"))
        })
        .collect();
    assert_eq!(upstream_gets, 1, "{diag:#?}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_and_ask_during_a_slot_migration_are_followed_transparently() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let key = "migrating-key";
    assert_eq!(c.incr::<_, _, i64>(key, 1).await.unwrap(), 1);
    let (_, to, slot) = cluster.migrate_key(key);
    let to_id = to.node_id();

    // The key now lives on the importing node: the old owner answers ASK.
    assert_eq!(c.incr::<_, _, i64>(key, 1).await.unwrap(), 2);
    assert!(sidecar.metrics().redirects.with_label_values(&["ask"]).get() >= 1);

    for n in &cluster.nodes {
        n.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
    }
    // The slot moved for good: MOVED is followed and the topology refreshed.
    assert_eq!(c.incr::<_, _, i64>(key, 1).await.unwrap(), 3);
    assert!(sidecar.metrics().redirects.with_label_values(&["moved"]).get() >= 1);
    assert_eq!(c.get::<_, i64>(key).await.unwrap(), 3);
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_silent_primary_fails_clearly_instead_of_hanging() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let _: () = c.set("w-key", "1").await.unwrap();
    let (primary, _) = cluster.shard_of("w-key");
    let primary = cluster.by_addr(&primary);
    primary.signal("-STOP");
    let started = Instant::now();
    let e = c.set::<_, _, ()>("w-key", "2").await.unwrap_err();
    let took = started.elapsed();
    primary.signal("-CONT");
    assert!(e.to_string().contains("may or may not have been applied"), "{e}");
    assert!(took < Duration::from_millis(1500), "failed after {took:?}");
    // After the node answers again, writes work.
    eventually("primary back in rotation", Duration::from_secs(5), || {
        sidecar.node_states().iter().all(|n| n.healthy)
    })
    .await;
    let _: () = c.set("w-key", "3").await.unwrap();
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_already_read_then_stops_accepting() {
    let cluster = Cluster::start(3, 0);
    // A port from the test's own range, so no other listener can take it
    // over after shutdown and make the final connect succeed.
    let cfg = cachetier_sidecar::Config {
        listen: format!("127.0.0.1:{}", support::next_port()).parse().unwrap(),
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let addr = sidecar.local_addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = Vec::new();
    for _ in 0..100 {
        req.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$4\r\nnone\r\n");
    }
    s.write_all(&req).await.unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    // The client waits idle once answered: shutdown must wake it, not wait
    // out the drain timeout (5 s) and abort it.
    // Bounded, so a shutdown that never returns fails here instead of hanging.
    let started = Instant::now();
    let finished = tokio::time::timeout(Duration::from_secs(10), sidecar.shutdown()).await;
    assert!(
        finished.is_ok() && started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?} (finished: {}): an idle client was not told to stop",
        started.elapsed(),
        finished.is_ok()
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let replies = 1 + rest.windows(5).filter(|w| w == b"$-1\r\n").count();
    assert_eq!(replies, 100, "every request read before shutdown is answered");
    assert_refused_after_shutdown(addr).await;
}

/// The closed listener's port refuses connections within a second, and no
/// connection made before that is answered.
///
/// A refusal is not required at the first try: the test binary spawns
/// redis-server and redis-cli from other tests at the same time, and a child
/// between fork and exec holds a copy of every descriptor of this process,
/// the listener included, so the kernel may complete a handshake on a
/// listener the sidecar has already closed; that connection is reset when the
/// child execs. A sidecar still listening answers `INFO` and is never refused.
async fn assert_refused_after_shutdown(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let Ok(mut again) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let _ = again.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").await;
        let mut who = vec![0u8; 300];
        let n = tokio::time::timeout(Duration::from_millis(200), again.read(&mut who))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        assert!(
            n == 0,
            "still accepting on {addr} after shutdown; it answers: {:?}",
            String::from_utf8_lossy(&who[..n])
        );
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections 1 s after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_resp3_clients_and_exits_cleanly_on_sigterm() {
    let bin = env!("CARGO_BIN_EXE_cachetier-sidecar");
    // A bad flag value: exit status 2, and what stderr says.
    let refused = |args: &[&str]| {
        let bad = std::process::Command::new(bin).args(args).output().unwrap();
        assert_eq!(bad.status.code(), Some(2), "{args:?}");
        String::from_utf8_lossy(&bad.stderr).into_owned()
    };
    let stderr = refused(&["--seed", "127.0.0.1:1", "--read-policy", "fastest"]);
    assert!(
        stderr.contains("--read-policy")
            && stderr.contains("CACHETIER_READ_POLICY")
            && stderr.contains("bestOfTwo"),
        "{stderr}"
    );
    let stderr = refused(&["--seed", "127.0.0.1:1", "--log-format", "yaml"]);
    assert!(
        stderr.contains("--log-format") && stderr.contains("json"),
        "{stderr}"
    );
    let bad = std::process::Command::new(bin)
        .env("CACHETIER_SEEDS", "no-port")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HOST:PORT"));

    let cluster = Cluster::start(3, 0);
    let port = support::next_port();
    let mport = support::next_port();
    // Its logs, as a container runtime keeps them: not a terminal.
    let logs = std::env::temp_dir().join(format!("cachetier-sidecar-logs-{}-{port}", std::process::id()));
    let log_file = std::fs::File::create(&logs).unwrap();
    // Killed if the test fails before SIGTERM.
    let mut guard = support::KillOnDrop(
        std::process::Command::new(bin)
            .env("CACHETIER_SEEDS", cluster.seeds().join(","))
            .env("CACHETIER_LISTEN", format!("127.0.0.1:{port}"))
            .env("CACHETIER_METRICS", format!("127.0.0.1:{mport}"))
            .env_remove("NO_COLOR")
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
    );
    let child = &mut guard.0;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    eventually("binary listening", Duration::from_secs(10), || {
        cli(&["PING"]) == "PONG"
    })
    .await;
    assert_eq!(cli(&["HSET", "r3", "f", "v"]), "1");
    // After HELLO 3 replies are RESP3-typed: HGETALL is a map.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    raw.write_all(b"HELLO 3\r\nHGETALL r3\r\nQUIT\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with('%'), "HELLO 3 answers with a map: {text}");
    assert!(text.contains("%1\r\n$1\r\nf\r\n$1\r\nv\r\n"), "{text}");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "sidecar did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "{code:?}");
    let logged = std::fs::read_to_string(&logs).unwrap();
    let _ = std::fs::remove_file(&logs);
    assert!(logged.contains("listening"), "{logged}");
    assert!(
        !logged.contains('\x1b'),
        "terminal colour codes in logs that go to a file: {logged:?}"
    );

    // JSON logs, one object per line, as the operator's.
    let log_file = std::fs::File::create(&logs).unwrap();
    let json = support::KillOnDrop(
        std::process::Command::new(bin)
            .env("CACHETIER_SEEDS", cluster.seeds().join(","))
            .env("CACHETIER_LISTEN", "127.0.0.1:0")
            .env("CACHETIER_METRICS", "127.0.0.1:0")
            .env("CACHETIER_LOG_FORMAT", "json")
            .stdout(log_file)
            .spawn()
            .unwrap(),
    );
    let read_logs = || std::fs::read_to_string(&logs).unwrap_or_default();
    eventually("JSON logs", Duration::from_secs(10), || {
        read_logs().contains("listening")
    })
    .await;
    // Stopped first: no line is half written when they are read.
    drop(json);
    let logged = read_logs();
    let _ = std::fs::remove_file(&logs);
    assert!(
        logged
            .lines()
            .all(|l| l.starts_with("{\"timestamp\":") && l.ends_with('}')),
        "{logged}"
    );
    let listening = logged
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_default();
    assert!(
        listening.contains("\"level\":\"INFO\"")
            && listening.contains("\"message\":\"cachetier sidecar listening\""),
        "{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_tier_is_reached_with_the_tiers_credentials() {
    let cluster = Cluster::start_with(3, 1, Some("s3cret"));
    let mut cfg = cache_config(&cluster);
    cfg.auth = Some(cachetier_sidecar::config::Credentials {
        username: None,
        password: "s3cret".into(),
    });
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    // Topology, read-gate polls and tracking all authenticate.
    all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let _: () = c.set("hot:secure", "v").await.unwrap();
    warm(&sidecar, &mut c, "hot:secure").await;
    assert_eq!(c.get::<_, String>("hot:secure").await.unwrap(), "v");
    // Applications configured with the tier's password keep working.
    let _: () = redis::cmd("AUTH")
        .arg("s3cret")
        .query_async(&mut c)
        .await
        .unwrap();
    let e = redis::cmd("AUTH")
        .arg("wrong")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().to_uppercase().contains("WRONGPASS"), "{e}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_multi_exec_aborts_when_a_watched_key_changes() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let mut other = client(&sidecar).await;
    let _: () = c.set("{acct}balance", 10).await.unwrap();

    // Unchallenged: the optimistic transaction commits.
    let _: () = redis::cmd("WATCH")
        .arg("{acct}balance")
        .query_async(&mut c)
        .await
        .unwrap();
    let balance: i64 = c.get("{acct}balance").await.unwrap();
    assert_eq!(balance, 10, "reads under WATCH come from the primary");
    let _: () = redis::cmd("MULTI").query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("{acct}balance")
        .arg(balance + 5)
        .query_async(&mut c)
        .await
        .unwrap();
    let done: redis::Value = redis::cmd("EXEC").query_async(&mut c).await.unwrap();
    assert!(
        matches!(done, redis::Value::Array(ref v) if v.len() == 1),
        "{done:?}"
    );

    // Another client changes the key between WATCH and EXEC: EXEC aborts.
    let _: () = redis::cmd("WATCH")
        .arg("{acct}balance")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = other.set("{acct}balance", 99).await.unwrap();
    let _: () = redis::cmd("MULTI").query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("{acct}balance")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    let aborted: redis::Value = redis::cmd("EXEC").query_async(&mut c).await.unwrap();
    assert_eq!(aborted, redis::Value::Nil);
    let mut primary_reader = support::client_of(sidecar.local_addr()).await;
    let _: () = redis::cmd("WATCH")
        .arg("{acct}balance")
        .query_async(&mut primary_reader)
        .await
        .unwrap();
    assert_eq!(primary_reader.get::<_, i64>("{acct}balance").await.unwrap(), 99);

    // Keys of other slots while watching (and WATCH across slots): see
    // `compat watch::`.
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_on_the_promoted_replica_after_a_failover() {
    let cluster = Cluster::start_opts(3, 1, None, &["--cluster-node-timeout", "1000"]);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let _: () = c.set("fo-key", "before").await.unwrap();
    let (primary, replicas) = cluster.shard_of("fo-key");
    let old = cluster.by_addr(&primary);
    old.signal("-STOP");
    let stopped = Instant::now();
    let mut failed_writes = 0;
    loop {
        match c.set::<_, _, ()>("fo-key", "after").await {
            Ok(()) => break,
            Err(_) => failed_writes += 1,
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "writes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stopped.elapsed();
    old.signal("-CONT");
    assert!(
        failed_writes > 0,
        "the primary really was unavailable for a while"
    );
    let promoted = sidecar
        .node_states()
        .into_iter()
        .find(|n| n.primary && n.addr == replicas[0]);
    assert!(promoted.is_some(), "the sidecar routes to the promoted replica");
    assert_eq!(c.get::<_, String>("fo-key").await.unwrap(), "after");
    eprintln!("writes resumed {took:?} after the primary stopped ({failed_writes} failed attempts)");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_counted_once_by_command_and_outcome_before_its_reply() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(support::hot_cache_config(&cluster, 1 << 20))
        .await
        .unwrap();
    let mut c = client(&sidecar).await;
    let m = sidecar.metrics();
    let count = |cmd: &str, outcome: &str| m.requests.with_label_values(&[cmd, outcome]).get();
    let samples = |cmd: &str| m.latency.with_label_values(&[cmd]).get_sample_count();
    let _: () = c.set("hot:a", "v").await.unwrap();
    let _: () = c.set("plain:s", "not a number").await.unwrap();
    let (gets, get_samples, incr_errors) = (count("get", "ok"), samples("get"), count("incrby", "error"));
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.get(format!("plain:{i}"));
    }
    let _: Vec<Option<String>> = pipe.query_async(&mut c).await.unwrap();
    for _ in 0..10 {
        let v: String = c.get("hot:a").await.unwrap();
        assert_eq!(v, "v");
    }
    for _ in 0..5 {
        // The redis crate sends INCRBY.
        let r: redis::RedisResult<i64> = c.incr("plain:s", 1).await;
        assert!(r.is_err());
    }
    // Read at once: a reply is only written after its count is published.
    assert_eq!(
        count("get", "ok") - gets,
        110,
        "direct GETs, the fill and the cache hits"
    );
    assert_eq!(samples("get") - get_samples, 110);
    assert_eq!(count("incrby", "error") - incr_errors, 5);
    sidecar.shutdown().await;
}
