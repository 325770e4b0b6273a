//! `XREAD`/`XREADGROUP` over streams of several slots: what one Redis
//! server answers, where Redis Cluster says `CROSSSLOT`.

use std::time::Duration;

use cachetier_sidecar::Sidecar;

use crate::support::{self, Cluster, Raw, config};

/// A command's words: split at spaces, but a `"quoted"` word (a script)
/// is one.
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let (word, tail) = match rest.strip_prefix('"') {
            Some(quoted) => quoted
                .split_once("\" ")
                .unwrap_or((quoted.trim_end_matches('"'), "")),
            None => rest.split_once(' ').unwrap_or((rest, "")),
        };
        out.push(word);
        rest = tail;
    }
    out
}

/// `orders`, `payments` and `users` are on three different primaries.
const SCRIPT: &[&str] = &[
    "XADD orders 1-1 f a",
    "XADD payments 2-1 f b",
    "XADD payments 2-2 f c",
    "XREAD STREAMS orders payments users 0 0 0",
    // Merged in the order the streams are named; COUNT per stream.
    "XREAD COUNT 1 STREAMS users payments orders 0 0 0",
    "XREAD STREAMS orders payments 1-1 2-2",
    "XREAD BLOCK 100 STREAMS orders payments 1-1 2-2",
    "XREAD BLOCK 100 STREAMS orders payments $ $",
    // A stream named twice is read twice.
    "XADD orders 1-2 f d",
    "XREAD STREAMS orders payments orders 0 0 1-1",
    "XREAD STREAMS orders payments orders 1-2 2-2 1-1",
    // Redis words the options' errors, BLOCK's too.
    "XREAD BLOCK -1 STREAMS orders payments 0 0",
    "XREAD BLOCK 1.5 STREAMS orders payments 0 0",
    "XREAD BLOCK abc STREAMS orders payments 0 0",
    "XREAD COUNT x STREAMS orders payments 0 0",
    "XREAD STREAMS orders payments > 0",
    "XREAD STREAMS orders payments 0",
    // The first stream in the client's order with an error names it,
    // whichever node holds it.
    "SET str x",
    "XREAD STREAMS orders str 0 0",
    "XREAD STREAMS orders str orders 0 0 bad",
    "XREAD STREAMS orders payments str 0 bad 0",
    "XREAD BLOCK 100 STREAMS orders str $ $",
    "XGROUP CREATE orders g 0",
    "XGROUP CREATE payments g 0",
    "XREADGROUP GROUP g c1 COUNT 1 STREAMS orders payments > >",
    "XREADGROUP GROUP g c1 STREAMS orders payments > >",
    "XREADGROUP GROUP g c1 BLOCK 100 STREAMS orders payments > >",
    // History: every stream's pending entries, empty ones too; history
    // and new entries in one call.
    "XREADGROUP GROUP g c1 STREAMS payments orders 0 0",
    "XREADGROUP GROUP g c2 STREAMS orders payments 0 0",
    "XADD payments 2-3 f e",
    "XREADGROUP GROUP g c2 STREAMS orders payments 0 >",
    "XPENDING payments g",
    "XREADGROUP GROUP nog c1 STREAMS orders payments > >",
    "XREADGROUP GROUP g c1 STREAMS orders payments $ >",
    "XREADGROUP GROUP g c1 BLOCK -5 STREAMS orders payments > >",
    "XREADGROUP STREAMS orders payments > >",
    "XREADGROUP COUNT 1 STREAMS orders payments > >",
    "XREADGROUP NOACK STREAMS orders payments > >",
    "XREADGROUP STREAMS orders payments users > > >",
    // A failing stream after one with new entries takes none of them,
    // NOACK or not: they are still there to read.
    "XADD orders 1-5 f n",
    "XREADGROUP GROUP g c3 NOACK STREAMS orders users > >",
    "XREADGROUP GROUP g c3 STREAMS orders str > >",
    "XREADGROUP GROUP g c3 NOACK STREAMS orders payments > >",
    "XPENDING orders g",
    // A consumer exists where a stream was served to it, and no longer
    // read creates one.
    "XREADGROUP GROUP g c9 BLOCK 100 STREAMS orders payments > >",
    "XREADGROUP GROUP g c10 STREAMS orders payments 0 0",
    "XINFO GROUPS orders",
    "XINFO GROUPS payments",
    // Under WATCH as without it.
    "WATCH orders",
    "XREAD COUNT 1 STREAMS orders payments 0 0",
    "XREADGROUP GROUP g c4 COUNT 1 STREAMS orders payments 0 0",
    "UNWATCH",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reads_across_slots_answer_as_one_server_does() {
    let cluster = Cluster::start(3, 0);
    let nodes: std::collections::HashSet<String> = ["orders", "payments", "users"]
        .iter()
        .map(|k| cluster.shard_of(k).0)
        .collect();
    assert_eq!(nodes.len(), 3, "the streams should be on three primaries");
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    for hello in ["2", "3"] {
        let (mut frames, mut deliveries) = (Vec::new(), Vec::new());
        for addr in [standalone.addr(), sidecar.local_addr().to_string()] {
            let mut c = Raw::connect(&addr).await;
            c.send(&["HELLO", hello]).await;
            c.frame().await;
            c.send(&["DEL", "orders", "payments", "users", "str"]).await;
            c.frame().await;
            let mut got = Vec::new();
            for line in SCRIPT {
                c.send(&words(line)).await;
                got.push((*line, String::from_utf8_lossy(&c.frame().await).into_owned()));
            }
            frames.push(got);
            deliveries.push(delivery_counts(&addr).await);
        }
        for (redis, ours) in frames[0].iter().zip(&frames[1]) {
            assert_eq!(redis, ours, "RESP{hello}");
        }
        assert_eq!(
            deliveries[0], deliveries[1],
            "RESP{hello}: times each entry was delivered"
        );
    }
    // Reads that succeed cost the nodes no error reply (a consumer polling
    // in a loop would show as a steady error rate).
    let primaries = ["orders", "payments"].map(|k| cluster.by_addr(&cluster.shard_of(k).0));
    let errors = || primaries.map(|n| n.info_field("stats", "total_error_replies"));
    let before = errors();
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    for line in [
        "XREADGROUP GROUP g c1 STREAMS orders payments > >",
        "XREADGROUP GROUP g c1 COUNT 2 NOACK STREAMS orders payments 0 >",
        "XREADGROUP GROUP g c1 BLOCK 50 STREAMS orders payments > >",
    ] {
        c.send(&words(line)).await;
        let reply = c.frame().await;
        assert!(!reply.starts_with(b"-"), "{line}: {reply:?}");
    }
    assert_eq!(errors(), before);
    assert!(sidecar.metrics().stream_reads_across_slots.get() >= 2 * 20);
    sidecar.shutdown().await;
}

/// A node that takes no writes (too few replicas for
/// `min-replicas-to-write`) refuses the whole XREADGROUP, as one server
/// does, and no other node hands out an entry meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_takes_no_writes_refuses_the_whole_group_read() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    let users = cluster.by_addr(&cluster.shard_of("users").0);
    let script = [
        "XREADGROUP GROUP g c STREAMS orders payments users > > >",
        "XPENDING orders g",
        "XINFO GROUPS payments",
    ];
    let mut got = Vec::new();
    for (addr, node) in [
        (standalone.addr(), &standalone),
        (sidecar.local_addr().to_string(), users),
    ] {
        let mut c = Raw::connect(&addr).await;
        for stream in ["orders", "payments", "users"] {
            for line in [
                format!("DEL {stream}"),
                format!("XADD {stream} 1-1 f v"),
                format!("XGROUP CREATE {stream} g 0"),
            ] {
                c.send(&words(&line)).await;
                c.frame().await;
            }
        }
        node.cli(&["CONFIG", "SET", "min-replicas-to-write", "1"]);
        let mut replies = Vec::new();
        for line in script {
            c.send(&words(line)).await;
            replies.push(String::from_utf8_lossy(&c.frame().await).into_owned());
        }
        node.cli(&["CONFIG", "SET", "min-replicas-to-write", "0"]);
        got.push(replies);
    }
    assert!(got[0][0].starts_with("-NOREPLICAS"), "{:?}", got[0]);
    assert_eq!(got[0], got[1]);
    sidecar.shutdown().await;
}

/// Each pending entry of both streams' group with its consumer and the
/// times it was delivered (the idle times vary).
async fn delivery_counts(addr: &str) -> Vec<(String, String, u64)> {
    let mut c = support::client_of(addr.parse().unwrap()).await;
    let mut out = Vec::new();
    for stream in ["orders", "payments"] {
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg("g")
            .arg("-")
            .arg("+")
            .arg(100)
            .query_async(&mut c)
            .await
            .unwrap();
        out.extend(pending.into_iter().map(|(id, consumer, _, n)| (id, consumer, n)));
    }
    out
}

/// A step of a two-client script: client 0 waits in a read while client 1
/// changes the streams.
enum Step {
    /// Client 0 sends a read and does not wait for its reply.
    Wait(&'static str),
    /// Client 1 runs a command.
    Change(&'static str),
    /// Client 0's reply.
    Reply,
}

use Step::{Change, Reply, Wait};

/// `orders` is the stream a read blocks on; `payments` is read between
/// those waits.
const WHILE_BLOCKED: &[Step] = &[
    Change("XGROUP CREATE orders g $ MKSTREAM"),
    Change("XGROUP CREATE payments g $ MKSTREAM"),
    // XREADGROUP: a stream deleted, its group destroyed, or the stream
    // replaced by another type ends the wait with Redis's errors.
    Wait("XREADGROUP GROUP g c BLOCK 5000 STREAMS orders payments > >"),
    Change("DEL payments"),
    Reply,
    Change("XGROUP CREATE payments g $ MKSTREAM"),
    Wait("XREADGROUP GROUP g c BLOCK 5000 STREAMS orders payments > >"),
    Change("XGROUP DESTROY payments g"),
    Reply,
    Change("DEL payments"),
    Change("XGROUP CREATE payments g $ MKSTREAM"),
    Wait("XREADGROUP GROUP g c BLOCK 5000 STREAMS orders payments > >"),
    Change("SET payments x"),
    Reply,
    // The stream the read blocks on, deleted.
    Change("DEL payments"),
    Change("XGROUP CREATE payments g $ MKSTREAM"),
    Wait("XREADGROUP GROUP g c BLOCK 5000 STREAMS orders payments > >"),
    Change("DEL orders"),
    Reply,
    // XREAD waits on through a change of type, for an entry past the
    // last one when it was called.
    Change("DEL payments"),
    Change("XADD orders 1-1 f v"),
    Change("XADD payments 2-1 f v"),
    Wait("XREAD BLOCK 5000 STREAMS orders payments $ $"),
    Change("SET payments x"),
    Change("DEL payments"),
    Change("XADD payments 2-1 f v"),
    Change("XADD payments 3-1 f v"),
    Reply,
    Wait("XREAD BLOCK 5000 STREAMS orders payments $ $"),
    Change("DEL orders"),
    Change("LPUSH orders x"),
    Change("XADD payments 4-1 f v"),
    Reply,
    Wait("XREAD BLOCK 300 STREAMS orders payments $ $"),
    Reply,
    // Woken, a client gets at most 1000 entries of a stream (its COUNT if
    // it gave one).
    Change("DEL orders payments"),
    Wait("XREAD BLOCK 5000 STREAMS orders payments $ $"),
    Change("EVAL \"for i=1,1500 do redis.call('XADD',KEYS[1],'10-'..i,'f','v') end\" 1 payments"),
    Reply,
    // A stream named twice waits from its first ID.
    Change("XADD orders 3-0 f v"),
    Wait("XREAD BLOCK 700 STREAMS orders payments orders 5-0 $ $"),
    Change("XADD orders 4-0 f v"),
    Reply,
    Wait("XREAD BLOCK 700 STREAMS payments orders orders $ 5-0 $"),
    Change("XADD orders 4-1 f v"),
    Reply,
    // `$` is the last ID the stream generated, not its last entry's.
    Change("DEL payments"),
    Change("XADD payments 5-0 f v"),
    Change("XDEL payments 5-0"),
    Wait("XREAD BLOCK 700 STREAMS orders payments $ $"),
    Change("XSETID payments 1-0"),
    Change("XADD payments 2-0 f v"),
    Reply,
];

async fn run_blocked(addr: &str, hello: &str) -> Vec<String> {
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = Raw::connect(addr).await;
        c.send(&["HELLO", hello]).await;
        c.frame().await;
        clients.push(c);
    }
    clients[1].send(&["DEL", "orders", "payments"]).await;
    clients[1].frame().await;
    let mut got = Vec::new();
    for step in WHILE_BLOCKED {
        match step {
            Wait(line) => {
                clients[0].send(&words(line)).await;
                // Past a round of the sidecar's wait (100 ms).
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Change(line) => {
                clients[1].send(&words(line)).await;
                clients[1].frame().await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Reply => got.push(String::from_utf8_lossy(&clients[0].frame().await).into_owned()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_changed_while_a_read_waits_answer_as_one_server_does() {
    let cluster = Cluster::start(3, 0);
    assert_ne!(cluster.shard_of("orders").0, cluster.shard_of("payments").0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    for hello in ["2", "3"] {
        let redis = run_blocked(&standalone.addr(), hello).await;
        let ours = run_blocked(&sidecar.local_addr().to_string(), hello).await;
        assert_eq!(redis.len(), ours.len());
        for (i, (r, o)) in redis.iter().zip(&ours).enumerate() {
            assert_eq!(r, o, "RESP{hello}, reply {i}");
        }
    }
    sidecar.shutdown().await;
}

/// A consumer blocked on streams of several nodes gets each new entry, the
/// first stream's at once, and none added while it waited is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_blocked_on_streams_of_several_nodes_gets_each_new_entry() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut producer = support::client(&sidecar).await;
    let xadd = |stream: &str, field: &str| {
        redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(field)
            .arg(stream)
            .clone()
    };
    let _: String = xadd("payments", "old").query_async(&mut producer).await.unwrap();
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    let first = cluster.by_addr(&cluster.shard_of("orders").0);
    for (stream, other) in [("payments", "orders"), ("orders", "payments")] {
        c.send(&words("XREAD BLOCK 5000 STREAMS orders payments $ $"))
            .await;
        support::eventually(
            "the consumer waits on the first stream",
            Duration::from_secs(5),
            || first.info_field("clients", "blocked_clients").as_deref() == Some("1"),
        )
        .await;
        let added = std::time::Instant::now();
        let id: String = xadd(stream, "new").query_async(&mut producer).await.unwrap();
        let reply = String::from_utf8_lossy(&c.frame().await).into_owned();
        assert!(
            reply.contains(&id) && reply.contains(stream) && !reply.contains(other),
            "{reply}"
        );
        assert!(!reply.contains("old"), "{reply}");
        if stream == "orders" {
            assert!(
                added.elapsed() < Duration::from_millis(90),
                "{:?}",
                added.elapsed()
            );
        }
    }
    sidecar.shutdown().await;
}
