//! `XREAD`/`XREADGROUP` over streams of several slots: what one Redis
//! server answers, where Redis Cluster says `CROSSSLOT`.

use std::time::Duration;

use cachetier_sidecar::Sidecar;

use crate::support::{self, Cluster, Raw, config};

/// `orders`, `payments` and `users` are on three different primaries.
const SCRIPT: &[&[&str]] = &[
    &["XADD", "orders", "1-1", "f", "a"],
    &["XADD", "payments", "2-1", "f", "b"],
    &["XADD", "payments", "2-2", "f", "c"],
    &["XREAD", "STREAMS", "orders", "payments", "users", "0", "0", "0"],
    // Merged in the order the streams are named; COUNT per stream.
    &[
        "XREAD", "COUNT", "1", "STREAMS", "users", "payments", "orders", "0", "0", "0",
    ],
    &["XREAD", "STREAMS", "orders", "payments", "1-1", "2-2"],
    &[
        "XREAD", "BLOCK", "100", "STREAMS", "orders", "payments", "1-1", "2-2",
    ],
    &["XREAD", "BLOCK", "100", "STREAMS", "orders", "payments", "$", "$"],
    &["SET", "str", "x"],
    &["XREAD", "STREAMS", "orders", "str", "0", "0"],
    &["XGROUP", "CREATE", "orders", "g", "0"],
    &["XGROUP", "CREATE", "payments", "g", "0"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "COUNT",
        "1",
        "STREAMS",
        "orders",
        "payments",
        ">",
        ">",
    ],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "STREAMS",
        "orders",
        "payments",
        ">",
        ">",
    ],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "BLOCK",
        "100",
        "STREAMS",
        "orders",
        "payments",
        ">",
        ">",
    ],
    // History: every stream's pending entries, empty ones too.
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c1",
        "STREAMS",
        "payments",
        "orders",
        "0",
        "0",
    ],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c2",
        "STREAMS",
        "orders",
        "payments",
        "0",
        "0",
    ],
    &["XPENDING", "payments", "g"],
    &[
        "XREADGROUP",
        "GROUP",
        "nog",
        "c1",
        "STREAMS",
        "orders",
        "payments",
        ">",
        ">",
    ],
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
        let mut frames = Vec::new();
        for addr in [standalone.addr(), sidecar.local_addr().to_string()] {
            let mut c = Raw::connect(&addr).await;
            c.send(&["HELLO", hello]).await;
            c.frame().await;
            c.send(&["DEL", "orders", "payments", "users", "str"]).await;
            c.frame().await;
            let mut got = Vec::new();
            for cmd in SCRIPT {
                c.send(cmd).await;
                got.push((
                    cmd.join(" "),
                    String::from_utf8_lossy(&c.frame().await).into_owned(),
                ));
            }
            frames.push(got);
        }
        for (redis, ours) in frames[0].iter().zip(&frames[1]) {
            assert_eq!(redis, ours, "RESP{hello}");
        }
    }
    assert!(sidecar.metrics().stream_reads_across_slots.get() >= 2 * 10);
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
    let _: String = redis::cmd("XADD")
        .arg("payments")
        .arg("*")
        .arg("old")
        .arg("1")
        .query_async(&mut producer)
        .await
        .unwrap();
    let mut c = Raw::connect(&sidecar.local_addr().to_string()).await;
    let first = cluster.by_addr(&cluster.shard_of("orders").0);
    for (stream, other) in [("payments", "orders"), ("orders", "payments")] {
        c.send(&[
            "XREAD", "BLOCK", "5000", "STREAMS", "orders", "payments", "$", "$",
        ])
        .await;
        support::eventually(
            "the consumer waits on the first stream",
            Duration::from_secs(5),
            || first.info_field("clients", "blocked_clients").as_deref() == Some("1"),
        )
        .await;
        let added = std::time::Instant::now();
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("new")
            .arg(stream)
            .query_async(&mut producer)
            .await
            .unwrap();
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
