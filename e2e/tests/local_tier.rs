//! The whole product on one machine, as a newcomer meets it: local mode runs a
//! CacheTier from a manifest, the sidecar sits in front of it, and a plain
//! (non-cluster) Redis client talks to the sidecar while the tier is resharded
//! by editing the manifest and a primary is killed. Real redis-server
//! processes throughout.

// Test helpers: a panic with the unwrapped error is the failure report.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use cachetier_operator::local::{LocalOptions, SidecarOptions, run_until};
use redis::aio::MultiplexedConnection;

/// Ports of this test binary: nodes from BASE, bus ports at +OFFSET.
const BASE_PORT: u16 = 36000;
const BUS_OFFSET: u16 = 1000;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn manifest(shards: u32) -> String {
    format!(
        "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata:\n  name: e2e\nspec:\n  shards: {shards}\n  replicasPerShard: 1\n  maxMemory: 64Mi\n  redisConfig:\n    repl-diskless-sync-delay: \"0\"\n"
    )
}

async fn connect(addr: SocketAddr) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client.get_multiplexed_async_connection_with_config(&config).await
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: not within {limit:?}");
}

/// `CLUSTER NODES` as `node` answers it.
async fn cluster_nodes(node: SocketAddr) -> Option<String> {
    let mut conn = tokio::time::timeout(Duration::from_secs(2), connect(node))
        .await
        .ok()?
        .ok()?;
    redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .ok()
}

/// As one node's `CLUSTER NODES` shows the cluster: primaries that own
/// slots, whether any slot is half-migrated, and the fewest slots any owner
/// has.
fn layout_of(nodes: &str) -> (usize, bool, usize) {
    let mut owners = 0;
    let mut open = false;
    let mut fewest = usize::MAX;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        open |= fields.iter().skip(8).any(|f| f.starts_with('['));
        if fields.len() > 8 && fields[2].contains("master") && !fields[2].contains("fail") {
            owners += 1;
            let slots: usize = fields[8..]
                .iter()
                .filter(|f| !f.starts_with('['))
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
                    None => 1,
                })
                .sum();
            fewest = fewest.min(slots);
        }
    }
    (owners, open, fewest)
}

/// Whether every replica the cluster knows has finished its sync with its primary.
async fn replicas_in_sync(seed: SocketAddr) -> bool {
    let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_secs(2), connect(seed)).await else {
        return false;
    };
    let Ok(nodes) = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async::<String>(&mut conn)
        .await
    else {
        return false;
    };
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 || !fields[2].contains("slave") {
            continue;
        }
        let Some(addr) = fields[1]
            .split('@')
            .next()
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            return false;
        };
        let Ok(mut replica) = connect(addr).await else {
            return false;
        };
        let Ok(info) = redis::cmd("INFO")
            .arg("replication")
            .query_async::<String>(&mut replica)
            .await
        else {
            return false;
        };
        if !info.contains("master_link_status:up") || info.contains("master_sync_in_progress:1") {
            return false;
        }
    }
    true
}

async fn node_pid(node: SocketAddr) -> Option<u32> {
    let mut conn = connect(node).await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}

async fn primary_of(node: SocketAddr, key: &str) -> Option<SocketAddr> {
    let mut conn = connect(node).await.ok()?;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await
        .ok()?;
    let slots: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .ok()?;
    let redis::Value::Array(ranges) = slots else {
        return None;
    };
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            continue;
        };
        let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi)), Some(redis::Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        if (*lo..=*hi).contains(&slot)
            && let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                (primary.first(), primary.get(1))
        {
            return format!("{}:{port}", String::from_utf8_lossy(host)).parse().ok();
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_through_the_sidecar_survives_a_live_reshard_and_a_killed_primary() {
    let dir = std::env::temp_dir().join(format!("cachetier-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tier.yaml");
    std::fs::write(&file, manifest(3)).unwrap();

    let sidecar: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut options = LocalOptions::new(&file);
    options.base_port = BASE_PORT;
    options.bus_port_offset = BUS_OFFSET;
    options.watch_interval = Duration::from_millis(200);
    options.sidecar = Some(SidecarOptions {
        port: Some(sidecar.port()),
        metrics: None,
        auth: None,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(run_until(options, |_seeds| async {}, async {
        let _ = stop_rx.await;
    }));

    // The sidecar answers once the tier is Ready.
    wait_for("the sidecar answers PING", Duration::from_secs(90), || async {
        match tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = connect(sidecar).await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        {
            Ok(Ok(pong)) => pong == "PONG",
            _ => false,
        }
    })
    .await;
    let mut app = connect(sidecar).await.unwrap();
    for i in 0..2000 {
        let _: () = redis::cmd("SET")
            .arg(format!("k:{i}"))
            .arg(i)
            .query_async(&mut app)
            .await
            .unwrap();
    }
    let values: Vec<Option<i64>> = redis::cmd("MGET")
        .arg((0..2000).map(|i| format!("k:{i}")).collect::<Vec<_>>())
        .query_async(&mut app)
        .await
        .unwrap();
    assert!(
        values.iter().enumerate().all(|(i, v)| *v == Some(i as i64)),
        "every key reads back through the sidecar"
    );

    // Reshard 3 -> 4 by editing the manifest, with the client reading and
    // writing through the sidecar the whole time. Every request must succeed
    // and every value read must be right. A read may miss (nil) while its slot
    // moves: a replica does not know a slot is MIGRATING, so it answers nil
    // for a key already moved instead of redirecting (Redis Cluster
    // behaviour; a cache client treats it as a miss). Misses are counted and
    // printed, and no key may be missing once the reshard is done.
    std::fs::write(&file, manifest(4)).unwrap();
    let seed: SocketAddr = ([127, 0, 0, 1], BASE_PORT).into();
    let start = Instant::now();
    let mut errors = Vec::new();
    let mut misses = 0usize;
    let mut round = 0u64;
    let mut layout = None;
    // Sampled every 200 pairs, and at least every second (a pair can take
    // long while slots move), with the answer kept for the failure report.
    let (mut sampled, mut last_nodes) = (Instant::now(), None);
    loop {
        let i = round % 2000;
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("k:{i}"))
            .arg(i)
            .query_async(&mut app)
            .await;
        let get: redis::RedisResult<Option<i64>> = redis::cmd("GET")
            .arg(format!("k:{i}"))
            .query_async(&mut app)
            .await;
        if let Err(e) = set {
            errors.push(format!("SET k:{i}: {e}"));
        }
        match get {
            Ok(Some(v)) if v == i as i64 => {}
            Ok(None) => misses += 1,
            other => errors.push(format!("GET k:{i}: {other:?}")),
        }
        round += 1;
        if round.is_multiple_of(200) || sampled.elapsed() > Duration::from_secs(1) {
            sampled = Instant::now();
            last_nodes = cluster_nodes(seed).await;
            layout = last_nodes.as_deref().map(layout_of);
            if let Some((4, false, fewest)) = layout
                && fewest >= 16384 / 4 - 1
            {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the reshard to 4 balanced shards did not finish in 120 s; last seen (owners, open slot, fewest slots): \
             {layout:?}, {:?} ago; {round} SET+GET pairs, {misses} misses, {} errors (first: {:?}); the seed's \
             CLUSTER NODES then:\n{}",
            sampled.elapsed(),
            errors.len(),
            errors.first(),
            last_nodes.as_deref().unwrap_or("(no answer)")
        );
    }
    eprintln!(
        "reshard done after {round} SET+GET pairs through the sidecar; {misses} GETs missed while slots moved"
    );
    assert!(
        errors.is_empty(),
        "{} client errors during the reshard, first: {:?}",
        errors.len(),
        errors.first()
    );

    // Let the new shard's replica finish its first sync (until then the
    // read gate rightly sends that shard's reads to its primary), and give the
    // sidecar's gate one poll to see it. Then no key may be missing.
    wait_for("every replica is in sync", Duration::from_secs(60), || {
        replicas_in_sync(seed)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let values: Vec<Option<i64>> = redis::cmd("MGET")
        .arg((0..2000).map(|i| format!("k:{i}")).collect::<Vec<_>>())
        .query_async(&mut app)
        .await
        .unwrap();
    let lost: Vec<usize> = (0..2000).filter(|&i| values[i] != Some(i as i64)).collect();
    assert!(lost.is_empty(), "keys lost or wrong after the reshard: {lost:?}");

    // SIGKILL the primary that owns k:0. Reads keep succeeding (replicas
    // serve them); writes to its slots come back once a replica is promoted.
    let victim = primary_of(seed, "k:0").await.expect("k:0 has a primary");
    let pid = node_pid(victim).await.expect("the primary reports its pid");
    let killed = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let start = Instant::now();
    let mut read_errors = Vec::new();
    let mut writes_back = None;
    while start.elapsed() < Duration::from_secs(60) {
        match redis::cmd("GET")
            .arg("k:0")
            .query_async::<Option<i64>>(&mut app)
            .await
        {
            Ok(Some(0)) => {}
            other => read_errors.push(format!("{other:?}")),
        }
        let write: redis::RedisResult<()> = redis::cmd("SET").arg("k:0").arg(0).query_async(&mut app).await;
        if write.is_ok() && start.elapsed() > Duration::from_millis(100) {
            writes_back = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        read_errors.is_empty(),
        "reads failed after the primary died: {read_errors:?}"
    );
    let writes_back = writes_back.expect("writes to the dead primary's slots came back within 60 s");
    eprintln!("writes resumed {writes_back:?} after the primary was killed");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("local mode stops within 30 s")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
