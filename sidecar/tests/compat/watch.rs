//! `WATCH` of keys of several slots (RQ watches a job's dependencies and
//! then writes keys of other slots): what one Redis server answers.

use cachetier_sidecar::Sidecar;

use crate::support::{self, Cluster, Raw, config};

/// Two clients' commands, in order: `(client, command)`.
type Script = &'static [(usize, &'static [&'static str])];

/// Keys `a`, `b` and `c` are on three different primaries.
const SCRIPT: Script = &[
    (0, &["MSET", "a", "1", "b", "2", "c", "3"]),
    // One WATCH over slots; reads of a watched and an unwatched slot.
    (0, &["WATCH", "a", "b"]),
    (0, &["GET", "a"]),
    (0, &["GET", "c"]),
    (0, &["MULTI"]),
    (0, &["SET", "a", "10"]),
    (0, &["SET", "c", "30"]),
    (0, &["INCR", "b"]),
    (0, &["PING"]),
    (0, &["EXEC"]),
    (0, &["MGET", "a", "b", "c"]),
    // A key of a watched slot without commands changes: nothing runs.
    (0, &["WATCH", "a"]),
    (0, &["WATCH", "b"]),
    (1, &["SET", "b", "99"]),
    (0, &["MULTI"]),
    (0, &["SET", "a", "11"]),
    (0, &["SET", "c", "31"]),
    (0, &["EXEC"]),
    (0, &["MGET", "a", "b", "c"]),
    // A key of a watched slot with commands changes: nothing runs.
    (0, &["WATCH", "a", "b"]),
    (1, &["SET", "a", "77"]),
    (0, &["MULTI"]),
    (0, &["SET", "a", "12"]),
    (0, &["SET", "b", "12"]),
    (0, &["SET", "c", "32"]),
    (0, &["EXEC"]),
    (0, &["MGET", "a", "b", "c"]),
    // UNWATCH and DISCARD let go of every slot.
    (0, &["WATCH", "a", "b"]),
    (0, &["UNWATCH"]),
    (1, &["SET", "a", "1"]),
    (0, &["MULTI"]),
    (0, &["SET", "a", "2"]),
    (0, &["EXEC"]),
    (0, &["WATCH", "b", "c"]),
    (0, &["MULTI"]),
    (0, &["DISCARD"]),
    (1, &["SET", "c", "5"]),
    (0, &["MULTI"]),
    (0, &["SET", "c", "6"]),
    (0, &["EXEC"]),
    // Only keyless commands under a WATCH of two slots.
    (0, &["WATCH", "a", "c"]),
    (0, &["MULTI"]),
    (0, &["PING"]),
    (0, &["EXEC"]),
    // A watched key that changed, then was set back, still aborts.
    (0, &["WATCH", "c", "b"]),
    (1, &["SET", "c", "6"]),
    (0, &["MULTI"]),
    (0, &["SET", "a", "0"]),
    (0, &["EXEC"]),
    (0, &["MGET", "a", "b", "c"]),
    // Commands of several slots under WATCH (arq: `EXISTS` of a job and
    // its result), split as outside it; the client's own write to a
    // watched key aborts its transaction, as on one server.
    (0, &["WATCH", "a"]),
    (0, &["EXISTS", "a", "b", "c", "nokey"]),
    (0, &["MGET", "a", "c", "nokey"]),
    (0, &["UNWATCH"]),
    (0, &["WATCH", "a", "b"]),
    (0, &["MSET", "a", "5", "c", "6"]),
    (0, &["MULTI"]),
    (0, &["SET", "b", "1"]),
    (0, &["EXEC"]),
    (0, &["DEL", "c", "nokey", "b"]),
    (0, &["MGET", "a", "b", "c"]),
    // RESET lets go of every watched slot (and the protocol: last).
    (0, &["WATCH", "a", "b"]),
    (0, &["RESET"]),
    (1, &["SET", "a", "3"]),
    (0, &["MULTI"]),
    (0, &["SET", "c", "7"]),
    (0, &["EXEC"]),
];

/// Send each command on `c` and check its reply, byte for byte.
async fn expect(c: &mut Raw, steps: &[(&[&str], &str)]) {
    for (cmd, want) in steps {
        c.send(cmd).await;
        assert_eq!(String::from_utf8_lossy(&c.frame().await), *want, "{cmd:?}");
    }
}

async fn run(addrs: [String; 2], hello: &str) -> Vec<(String, String)> {
    let mut clients = Vec::new();
    for addr in &addrs {
        let mut c = Raw::connect(addr).await;
        c.send(&["HELLO", hello]).await;
        c.frame().await;
        clients.push(c);
    }
    let mut got = Vec::new();
    for (who, cmd) in SCRIPT {
        clients[*who].send(cmd).await;
        let frame = clients[*who].frame().await;
        got.push((
            format!("{who}: {}", cmd.join(" ")),
            String::from_utf8_lossy(&frame).into_owned(),
        ));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_across_slots_answers_as_one_server_does() {
    let cluster = Cluster::start(3, 0);
    let nodes: std::collections::HashSet<String> =
        ["a", "b", "c"].iter().map(|k| cluster.shard_of(k).0).collect();
    assert_eq!(nodes.len(), 3, "the keys should be on three primaries");
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    for hello in ["2", "3"] {
        let redis = run([standalone.addr(), standalone.addr()], hello).await;
        let ours = run(
            [sidecar.local_addr().to_string(), sidecar.local_addr().to_string()],
            hello,
        )
        .await;
        for (r, o) in redis.iter().zip(&ours) {
            assert_eq!(r, o, "RESP{hello}");
        }
    }
    sidecar.shutdown().await;
}

/// Optimistic increments of keys of two slots by two clients at once: no
/// update of either key is lost. A transaction whose watched parts race
/// another's within the microseconds between their `EXEC`s may run in part;
/// its reply then says which slots' parts were applied, and each key's
/// count says that too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_watched_transactions_across_slots_lose_no_update() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let addr = sidecar.local_addr();
    let applied = |text: &str, key: &str| {
        let slot = cachetier_sidecar::slot::slot(key.as_bytes()).to_string();
        let list = text.rsplit_once("the parts of slots [").map_or("", |(_, l)| l);
        list.split(']')
            .next()
            .unwrap_or("")
            .split(", ")
            .any(|s| s == slot)
    };
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(tokio::spawn(async move {
            let mut c = support::client_of(addr).await;
            // Full commits, and parts applied alone, of `a` and `b`.
            let (mut done, mut alone) = (0, [0, 0]);
            while done < 50 {
                let _: () = redis::cmd("WATCH")
                    .arg("a")
                    .arg("b")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let get = |k: &'static str| redis::cmd("GET").arg(k).clone();
                let a: Option<i64> = get("a").query_async(&mut c).await.unwrap();
                let b: Option<i64> = get("b").query_async(&mut c).await.unwrap();
                let _: () = redis::cmd("MULTI").query_async(&mut c).await.unwrap();
                let _: () = redis::cmd("SET")
                    .arg("a")
                    .arg(a.unwrap_or(0) + 1)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let _: () = redis::cmd("SET")
                    .arg("b")
                    .arg(b.unwrap_or(0) + 1)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                match redis::cmd("EXEC").query_async::<redis::Value>(&mut c).await {
                    Ok(redis::Value::Nil) => {}
                    Ok(redis::Value::Array(v)) if v.len() == 2 => done += 1,
                    Ok(other) => panic!("EXEC answered {other:?}"),
                    Err(e) => {
                        let text = e.to_string();
                        assert!(text.contains("were applied"), "{text}");
                        alone[0] += usize::from(applied(&text, "a"));
                        alone[1] += usize::from(applied(&text, "b"));
                    }
                }
            }
            alone
        }));
    }
    let mut alone = [0, 0];
    for w in workers {
        let [a, b] = w.await.unwrap();
        alone = [alone[0] + a, alone[1] + b];
    }
    let mut c = support::client_of(addr).await;
    let (a, b): (usize, usize) = redis::pipe().get("a").get("b").query_async(&mut c).await.unwrap();
    assert_eq!(
        (a, b),
        (100 + alone[0], 100 + alone[1]),
        "parts applied alone: {alone:?}"
    );
    sidecar.shutdown().await;
}

/// With `--split-transactions false`, a WATCH stays in one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_split_transactions_a_watch_stays_in_one_slot() {
    let cluster = Cluster::start(3, 0);
    let mut cfg = config(&cluster);
    cfg.split_transactions = false;
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let mut c = support::client(&sidecar).await;
    let e = redis::cmd("WATCH")
        .arg("a")
        .arg("b")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().to_uppercase().contains("CROSSSLOT"), "{e}");
    let _: () = redis::cmd("WATCH")
        .arg("{acct}x")
        .query_async(&mut c)
        .await
        .unwrap();
    let e = redis::cmd("WATCH")
        .arg("b")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already watching"), "{e}");
    let e = redis::cmd("GET")
        .arg("elsewhere")
        .query_async::<Option<String>>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().to_uppercase().contains("CROSSSLOT"), "{e}");
    let _: () = redis::cmd("UNWATCH").query_async(&mut c).await.unwrap();
    let _: Option<String> = redis::cmd("GET")
        .arg("elsewhere")
        .query_async(&mut c)
        .await
        .unwrap();
    sidecar.shutdown().await;
}

/// A watched key that expired before `EXEC` aborts the transaction, as on
/// one server, even before Redis deletes it (active expiry off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_key_that_expired_aborts_exec() {
    let cluster = Cluster::start_opts(3, 0, None, &["--enable-debug-command", "yes"]);
    for node in &cluster.nodes {
        assert_eq!(node.cli(&["DEBUG", "SET-ACTIVE-EXPIRE", "0"]).trim(), "OK");
    }
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    expect(
        &mut c,
        &[
            (&["SET", "a", "1", "PX", "1000"][..], "+OK\r\n"),
            (&["SET", "b", "1"], "+OK\r\n"),
            (&["WATCH", "a", "b"], "+OK\r\n"),
        ],
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    expect(
        &mut c,
        &[
            (&["MULTI"][..], "+OK\r\n"),
            (&["SET", "b", "2"], "+QUEUED\r\n"),
            (&["EXEC"], "*-1\r\n"),
            (&["GET", "b"], "$1\r\n1\r\n"),
        ],
    )
    .await;
    sidecar.shutdown().await;
}

/// A WATCH past the slot limit is refused whole; the client is left
/// watching what it watched before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_past_the_slot_limit_is_refused_whole() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    let mut seen = std::collections::HashSet::new();
    let keys: Vec<String> = (0..)
        .map(|i| format!("lim:{i}"))
        .filter(|k| seen.insert(cachetier_sidecar::slot::slot(k.as_bytes())))
        .take(cachetier_sidecar::router::MAX_WATCHED_SLOTS + 1)
        .collect();
    let mut watch = vec!["WATCH"];
    watch.extend(keys.iter().map(String::as_str));
    c.send(&watch).await;
    let refused = String::from_utf8_lossy(&c.frame().await).into_owned();
    assert!(refused.contains("at most 16 slots"), "{refused}");
    // Nothing was watched: a WATCH of one more slot is taken.
    c.send(&["WATCH", "lim:other"]).await;
    assert_eq!(&c.frame().await[..], b"+OK\r\n");
    c.send(&["UNWATCH"]).await;
    assert_eq!(&c.frame().await[..], b"+OK\r\n");
    let mut other = Raw::connect(&sidecar.local_addr().to_string()).await;
    other.send(&["SET", &keys[0], "x"]).await;
    other.frame().await;
    expect(
        &mut c,
        &[
            (&["MULTI"][..], "+OK\r\n"),
            (&["SET", &keys[0], "y"], "+QUEUED\r\n"),
            (&["EXEC"], "*1\r\n+OK\r\n"),
        ],
    )
    .await;
    sidecar.shutdown().await;
}

/// A client's write under WATCH (of a watched slot or another) is read
/// back by its next read after UNWATCH, while the replica catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_watch_is_read_back_after_unwatch() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut c = support::client(&sidecar).await;
    // Large values take the replica a while to apply.
    let big = "x".repeat(8 << 20);
    for i in 0..6 {
        let value = format!("{i}{big}");
        let watched = if i % 2 == 0 { "a" } else { "c" };
        let _: () = redis::cmd("WATCH")
            .arg(watched)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg("c")
            .arg(&value)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("UNWATCH").query_async(&mut c).await.unwrap();
        let got: Option<String> = redis::cmd("GET").arg("c").query_async(&mut c).await.unwrap();
        assert!(
            got.as_deref() == Some(value.as_str()),
            "round {i}: read an older value"
        );
    }
    sidecar.shutdown().await;
}

/// A blocking command under WATCH waits as long as it says, as on one
/// server (not cut off at the WATCH connection's response timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_command_under_watch_waits_its_own_timeout() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    c.send(&["WATCH", "a"]).await;
    assert_eq!(&c.frame().await[..], b"+OK\r\n");
    let asked = std::time::Instant::now();
    c.send(&["BLPOP", "a", "1.5"]).await;
    assert_eq!(&c.frame().await[..], b"*-1\r\n");
    assert!(asked.elapsed() >= std::time::Duration::from_millis(1500));
    // Across slots too (keys of two primaries).
    c.send(&["BLPOP", "b", "a", "0.2"]).await;
    assert_eq!(&c.frame().await[..], b"*-1\r\n");
    // The watch holds: an unchanged key lets EXEC run.
    expect(
        &mut c,
        &[
            (&["MULTI"][..], "+OK\r\n"),
            (&["SET", "a", "1"], "+QUEUED\r\n"),
            (&["EXEC"], "*1\r\n+OK\r\n"),
        ],
    )
    .await;
    sidecar.shutdown().await;
}
