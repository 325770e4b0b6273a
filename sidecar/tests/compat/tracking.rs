//! Client-side caching (`CLIENT TRACKING`) through the sidecar: the pushes
//! one Redis server sends, in an order a client-side cache can trust.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;

use crate::support::{self, Cluster, Raw, client, config, cut_tracking};

fn invalidate(keys: &[&str]) -> Bytes {
    let mut out = format!(">2\r\n$10\r\ninvalidate\r\n*{}\r\n", keys.len());
    for k in keys {
        out += &format!("${}\r\n{k}\r\n", k.len());
    }
    Bytes::from(out)
}

const FLUSH: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// A RESP3 connection with tracking on (`options` after `ON`).
async fn tracking(addr: &str, options: &[&str]) -> Raw {
    let mut t = Raw::connect(addr).await;
    t.send(&["HELLO", "3"]).await;
    t.frame().await;
    let mut cmd = vec!["CLIENT", "TRACKING", "ON"];
    cmd.extend_from_slice(options);
    t.send(&cmd).await;
    assert_eq!(t.frame().await, Bytes::from_static(b"+OK\r\n"));
    t
}

/// `$session` on a tracking connection to `$key`'s node, then on one
/// through the sidecar: Redis's frames, the sidecar's, and the sidecar
/// connection.
macro_rules! against_redis {
    ($session:ident, $cluster:expr, $sidecar:expr, $writer:expr, $key:expr) => {{
        let (owner, _) = $cluster.shard_of($key);
        let mut direct = tracking(&owner, &[]).await;
        let redis = $session(&mut direct, $writer, $key).await;
        let mut t = tracking(&$sidecar.local_addr().to_string(), &[]).await;
        let ours = $session(&mut t, $writer, $key).await;
        (redis, ours, t)
    }};
}

/// Frames until none comes for `quiet`.
async fn until_quiet(t: &mut Raw, quiet: Duration) -> Vec<Bytes> {
    let mut got = Vec::new();
    while let Ok(f) = tokio::time::timeout(quiet, t.frame()).await {
        got.push(f);
    }
    got
}

/// The session a client-side cache has with its server for one key.
async fn session(t: &mut Raw, writer: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Bytes> {
    let mut got = Vec::new();
    let _: () = writer.set(key, "v1").await.unwrap();
    t.send(&["GET", key]).await;
    got.push(t.frame().await);
    let _: () = writer.set(key, "v2").await.unwrap();
    got.push(t.frame().await);
    // Not read since: no push, as from Redis.
    let _: () = writer.set(key, "v3").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    t.send(&["PING"]).await;
    got.push(t.frame().await);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracking_client_is_sent_what_one_redis_server_sends() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut writer = client(&sidecar).await;
    let (redis, ours, mut t) = against_redis!(session, cluster, sidecar, &mut writer, "k");
    assert_eq!(ours, redis, "sidecar, then the key's node");
    assert_eq!(ours[1], invalidate(&["k"]));

    // Its reads went to primaries only (a replica may be behind an
    // invalidation already sent).
    assert_eq!(
        replica_gets(&cluster, &mut t, 50).await,
        0,
        "a tracking client's reads go to primaries"
    );

    // BCAST with prefixes: every change under them, read or not.
    let mut b = tracking(&sidecar.local_addr().to_string(), &["BCAST", "PREFIX", "p:"]).await;
    for k in ["p:1", "q:1", "p:2"] {
        let _: () = writer.set(k, "x").await.unwrap();
    }
    let mut named: Vec<Bytes> = Vec::new();
    for f in until_quiet(&mut b, Duration::from_millis(300)).await {
        match cachetier_sidecar::resp::parse(&f).unwrap() {
            cachetier_sidecar::resp::Frame::Push(items) => match &items[1] {
                cachetier_sidecar::resp::Frame::Array(keys) => {
                    for k in keys {
                        if let cachetier_sidecar::resp::Frame::Bulk(k) = k {
                            named.push(k.clone());
                        }
                    }
                }
                other => panic!("keys, not {other:?}"),
            },
            other => panic!("a push, not {other:?}"),
        }
    }
    named.sort();
    assert_eq!(
        named,
        vec![Bytes::from_static(b"p:1"), Bytes::from_static(b"p:2")]
    );

    // `CLIENT INFO` shows the mode, as Redis does (`flags=t`, `flags=tB`).
    for (c, flags) in [(&mut t, "t"), (&mut b, "tB")] {
        c.send(&["CLIENT", "INFO"]).await;
        let line = String::from_utf8_lossy(&c.frame().await).into_owned();
        assert!(line.contains(&format!(" flags={flags} ")), "{line}");
        assert!(line.contains(" redir=0 "), "{line}");
    }
    sidecar.shutdown().await;
}

/// A read, then a `BLPOP` that waits while another client changes the key
/// read, then a push that serves it: every frame the tracking client gets.
async fn blocked(t: &mut Raw, writer: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Bytes> {
    let queue = format!("{{{key}}}queue");
    let mut got = Vec::new();
    let _: () = writer.set(key, "v1").await.unwrap();
    t.send(&["GET", key]).await;
    got.push(t.frame().await);
    t.send(&["BLPOP", &queue, "10"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _: () = writer.set(key, "v2").await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(2), t.frame()).await;
    got.push(heard.unwrap_or_else(|_| Bytes::from_static(b"(nothing while blocked)")));
    let _: () = writer.rpush(&queue, "job").await.unwrap();
    got.push(t.frame().await);
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_blocked_in_blpop_hears_invalidations_at_once() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut writer = client(&sidecar).await;
    let (redis, ours, _t) = against_redis!(blocked, cluster, sidecar, &mut writer, "b");
    assert_eq!(ours, redis, "sidecar, then the key's node");
    assert_eq!(ours[1], invalidate(&["b"]));
    sidecar.shutdown().await;
}

/// `MULTI`, a queued `GET`, a write by another client, `EXEC`, another
/// write: every frame the tracking client gets.
async fn transaction(t: &mut Raw, writer: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Bytes> {
    let _: () = writer.set(key, "v1").await.unwrap();
    let mut got = Vec::new();
    for cmd in [&["MULTI"][..], &["GET", key]] {
        t.send(cmd).await;
        got.push(t.frame().await);
    }
    let _: () = writer.set(key, "v2").await.unwrap();
    got.extend(until_quiet(t, Duration::from_millis(200)).await);
    t.send(&["EXEC"]).await;
    got.push(t.frame().await);
    let _: () = writer.set(key, "v3").await.unwrap();
    got.extend(until_quiet(t, Duration::from_millis(300)).await);
    got
}

/// Redis tracks a transaction's reads when `EXEC` runs them: a read
/// remembered when it was queued, and invalidated before `EXEC`, left the
/// value `EXEC` returned cached for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_reads_are_tracked_when_exec_runs_them() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut writer = client(&sidecar).await;
    let (redis, ours, _t) = against_redis!(transaction, cluster, sidecar, &mut writer, "tx");
    assert_eq!(ours, redis, "sidecar, then the key's node");
    assert_eq!(redis.last(), Some(&invalidate(&["tx"])));
    sidecar.shutdown().await;
}

/// A client-side cache of one key, kept as a client library keeps it.
struct Cached {
    value: Option<Bytes>,
}

impl Cached {
    fn apply(&mut self, frame: &Bytes, key: &str) {
        if frame.as_ref() == FLUSH || *frame == invalidate(&[key]) {
            self.value = None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_reply_overtakes_the_invalidation_of_a_later_write() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let addr = sidecar.local_addr().to_string();
    let mut t = tracking(&addr, &[]).await;
    let mut writer = client(&sidecar).await;
    let _: () = writer.set("hot", 0).await.unwrap();
    let writes = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_secs(3);
        let mut last = 0;
        while last < 20_000 && Instant::now() < until {
            last += 1;
            let _: () = writer.set("hot", last).await.unwrap();
        }
        last
    });
    // Read whenever the cache is empty; take pushes as they come.
    let mut cache = Cached { value: None };
    let mut reads = 0;
    while !writes.is_finished() {
        if cache.value.is_none() {
            t.send(&["GET", "hot"]).await;
            reads += 1;
            loop {
                let f = t.frame().await;
                if f.starts_with(b"$") {
                    cache.value = Some(f);
                    break;
                }
                cache.apply(&f, "hot");
            }
        } else if let Ok(f) = tokio::time::timeout(Duration::from_millis(20), t.frame()).await {
            cache.apply(&f, "hot");
        }
    }
    let last = writes.await.unwrap();
    for f in until_quiet(&mut t, Duration::from_millis(500)).await {
        cache.apply(&f, "hot");
    }
    let fresh = Bytes::from(format!("${}\r\n{last}\r\n", last.to_string().len()));
    eprintln!("{last} writes, {reads} reads");
    assert!(
        cache.value.as_ref().is_none_or(|v| *v == fresh),
        "a cached value outlived its invalidation: {:?}, Redis has {last}",
        cache.value
    );
    assert!(reads > 100, "the race was exercised ({reads} reads)");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_feed_sends_a_flush_and_the_feeds_close_with_the_last_tracking_client() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let addr = sidecar.local_addr().to_string();
    let mut t = tracking(&addr, &[]).await;
    t.send(&["GET", "k"]).await;
    t.frame().await;
    let (owner, _) = cluster.shard_of("k");
    cut_tracking(cluster.by_addr(&owner));
    // A flush when the feed is lost: every key read, by name (Lettuce's
    // cache cannot take a null invalidate). A key read before the feed is
    // back (it waits 200 ms at least) may change unseen: another flush.
    assert_eq!(t.frame().await, invalidate(&["k"]));
    t.send(&["GET", "k"]).await;
    assert_eq!(t.frame().await, Bytes::from_static(b"_\r\n"));
    assert_eq!(t.frame().await, invalidate(&["k"]));
    // Followed again: a read, a write, its push.
    t.send(&["GET", "k"]).await;
    t.frame().await;
    let mut writer = client(&sidecar).await;
    let _: () = writer.set("k", "v").await.unwrap();
    assert_eq!(t.frame().await, invalidate(&["k"]));
    let (_, metrics) = support::http_get(sidecar.metrics_addr().unwrap(), "/metrics").await;
    assert!(
        metrics.contains("cachetier_sidecar_tracking_flushes_total{reason=\"feed_lost\"} 1"),
        "{metrics}"
    );

    drop(t);
    support::eventually("no feed once nobody tracks", Duration::from_secs(5), || {
        feeds(&cluster).iter().all(|&n| n == 0)
    })
    .await;
    sidecar.shutdown().await;
}

/// An `OPTIN` session (rueidis turns this mode on for every connection):
/// a read without `CLIENT CACHING yes` is not tracked; one after it is.
async fn optin_session(t: &mut Raw, writer: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Bytes> {
    let mut got = Vec::new();
    let _: () = writer.set(key, "v1").await.unwrap();
    // On the replicas too: the sidecar reads the untracked GET there.
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async(writer)
        .await
        .unwrap();
    t.send(&["GET", key]).await;
    got.push(t.frame().await);
    let _: () = writer.set(key, "v2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    t.send(&["PING"]).await;
    got.push(t.frame().await);
    // rueidis's DoCache: CACHING yes, then the read in a transaction.
    for cmd in [
        &["CLIENT", "CACHING", "YES"][..],
        &["MULTI"],
        &["PTTL", key],
        &["GET", key],
        &["EXEC"],
    ] {
        t.send(cmd).await;
        got.push(t.frame().await);
    }
    let _: () = writer.set(key, "v3").await.unwrap();
    got.push(t.frame().await);
    got
}

/// How many of `n` GETs of distinct keys on `t` the replicas served.
async fn replica_gets(cluster: &Cluster, t: &mut Raw, n: usize) -> u64 {
    cluster.reset_stats();
    for i in 0..n {
        t.send(&["GET", &format!("r{i}")]).await;
        t.frame().await;
    }
    (cluster.nodes.iter())
        .filter(|n| n.info_field("replication", "role").as_deref() == Some("slave"))
        .map(|n| n.calls("get"))
        .sum()
}

/// Counts, per node, the `BCAST` tracking connections (the sidecar's feeds).
fn feeds(cluster: &Cluster) -> Vec<usize> {
    (cluster.nodes.iter())
        .filter(|n| n.info_field("replication", "role").as_deref() == Some("master"))
        .map(|n| {
            n.cli(&["CLIENT", "LIST"])
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .any(|f| f.starts_with("flags=") && f.contains('B'))
                })
                .count()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optin_clients_untracked_reads_are_read_like_any_other_clients() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(support::hot_cache_config(&cluster, 1 << 20))
        .await
        .unwrap();
    support::all_serving(&sidecar).await;
    let addr = sidecar.local_addr().to_string();
    let mut writer = client(&sidecar).await;
    // The local cache's own feeds (one per primary), up before we look.
    support::eventually("the local cache's feeds", Duration::from_secs(5), || {
        feeds(&cluster).iter().all(|&n| n == 1)
    })
    .await;

    // Tracking on in OPTIN mode starts no feed of its own.
    let mut t = tracking(&addr, &["OPTIN"]).await;
    // Its untracked reads go to replicas, as any client's, and hit the
    // local cache.
    assert_eq!(
        replica_gets(&cluster, &mut t, 30).await,
        30,
        "untracked reads are read from replicas"
    );
    let _: () = writer.set("hot:1", "x").await.unwrap();
    let hits = || async {
        let (_, m) = support::http_get(sidecar.metrics_addr().unwrap(), "/metrics").await;
        (m.lines())
            .find_map(|l| {
                l.strip_prefix("cachetier_sidecar_cache_hits_total ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let before = hits().await;
    for _ in 0..20 {
        t.send(&["GET", "hot:1"]).await;
        assert_eq!(t.frame().await, Bytes::from_static(b"$1\r\nx\r\n"));
    }
    assert!(
        hits().await > before,
        "untracked reads are served from the local cache"
    );
    assert_eq!(feeds(&cluster), vec![1, 1, 1], "no feed for an OPTIN client yet");

    // The session against the key's own node: frame for frame the same.
    let key = "k";
    let (owner, _) = cluster.shard_of(key);
    let mut direct = tracking(&owner, &["OPTIN"]).await;
    let redis = optin_session(&mut direct, &mut writer, key).await;
    let ours = optin_session(&mut t, &mut writer, key).await;
    assert_eq!(ours, redis, "sidecar, then the key's node");
    assert_eq!(ours.last(), Some(&invalidate(&[key])));
    // Its first tracked read started the tracking feeds.
    assert_eq!(feeds(&cluster), vec![2, 2, 2]);
    sidecar.shutdown().await;
}
