//! Blocking commands on a connection of the client's own (item 10).

use std::time::Duration;

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;

use crate::support::{self, Cluster, client, config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brpop_worker_loop_works_unchanged_and_stalls_nobody() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let (primary, _) = cluster.shard_of("{q}jobs");
    let mut worker = client(&sidecar).await;
    let mut producer = client(&sidecar).await;
    let mut other = client(&sidecar).await;
    // Blocks longer than the response timeout on an empty list: nil, no error.
    let none: Option<(String, String)> = redis::cmd("BLPOP")
        .arg("{q}empty")
        .arg(1.5)
        .query_async(&mut worker)
        .await
        .unwrap();
    assert_eq!(none, None);
    let jobs = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..200 {
            let job: Option<(String, String)> = redis::cmd("BRPOP")
                .arg("{q}jobs")
                .arg(2)
                .query_async(&mut worker)
                .await
                .unwrap();
            if let Some((_, j)) = job {
                got.push(j);
            }
            if got.len() == 100 {
                break;
            }
        }
        got
    });
    for batch in 0..10 {
        // While the worker waits, the same primary answers everyone else.
        for _ in 0..5 {
            let _: Option<String> = other.get("{q}other").await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for j in 0..10 {
            let _: () = producer.lpush("{q}jobs", batch * 10 + j).await.unwrap();
        }
    }
    let got = jobs.await.unwrap();
    assert_eq!(got, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    // XREAD BLOCK: times out with nil, or returns what is there.
    let nothing: redis::Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(1200)
        .arg("STREAMS")
        .arg("{q}stream")
        .arg("$")
        .query_async(&mut producer)
        .await
        .unwrap();
    assert_eq!(nothing, redis::Value::Nil);
    let _: String = redis::cmd("XADD")
        .arg("{q}stream")
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async(&mut other)
        .await
        .unwrap();
    let entry: redis::Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(0)
        .arg("STREAMS")
        .arg("{q}stream")
        .arg("0")
        .query_async(&mut producer)
        .await
        .unwrap();
    assert!(format!("{entry:?}").contains("{q}stream"), "{entry:?}");
    assert_eq!(
        sidecar
            .metrics()
            .watchdog_closures
            .with_label_values(&[primary.as_str()])
            .get(),
        0
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_client_that_goes_away_releases_its_blocking_connection() {
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let primary = cluster.by_addr(&cluster.shard_of("{q}gone").0);
    let blocked = || {
        primary
            .info_field("clients", "blocked_clients")
            .unwrap_or_default()
    };
    for round in 0..3 {
        let mut gone = tokio::net::TcpStream::connect(sidecar.local_addr())
            .await
            .unwrap();
        gone.write_all(b"*3\r\n$5\r\nBRPOP\r\n$7\r\n{q}gone\r\n$1\r\n0\r\n")
            .await
            .unwrap();
        support::eventually(
            "the worker is blocked on the primary",
            Duration::from_secs(5),
            || blocked() == "1",
        )
        .await;
        // The worker dies: Redis forgets a gone client's blocked command,
        // and so must the sidecar (its connection to the primary closes).
        drop(gone);
        let since = std::time::Instant::now();
        support::eventually(
            &format!("round {round}: nobody is blocked on the primary"),
            Duration::from_secs(2),
            || blocked() == "0",
        )
        .await;
        assert!(
            since.elapsed() < Duration::from_secs(1),
            "took {:?}",
            since.elapsed()
        );
    }
    sidecar.shutdown().await;
}

/// A blocking pop over keys of several slots (a Celery worker's priority
/// queues, an RQ worker's queues): what one Redis server answers, frame by
/// frame, in RESP2 and RESP3, where Redis Cluster says `CROSSSLOT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pops_across_slots_answer_as_one_server_does() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    // The queues are on three different nodes.
    let nodes: std::collections::HashSet<String> = ["celery", "q:c", "q:e"]
        .iter()
        .map(|k| cluster.shard_of(k).0)
        .collect();
    assert_eq!(nodes.len(), 3, "the keys should be on three primaries");
    let script: &[&[&str]] = &[
        &["RPUSH", "q:c", "a", "b"],
        &["SET", "q:e", "x"],
        &["ZADD", "z:1", "1", "m1", "2", "m2"],
        // The first key is empty, the second holds elements.
        &["BRPOP", "celery", "q:c", "1"],
        &["BLPOP", "celery", "q:c", "1"],
        // None holds any: nil at the timeout.
        &["BRPOP", "celery", "q:c", "0.2"],
        // A key of another type before one that holds elements.
        &["RPUSH", "q:c", "c"],
        &["BLPOP", "celery", "q:e", "q:c", "1"],
        &[
            "BLMPOP", "1", "3", "celery", "q:none", "q:c", "RIGHT", "COUNT", "5",
        ],
        &["BLMPOP", "0.1", "2", "celery", "q:c", "LEFT"],
        &["BZPOPMIN", "q:none", "z:1", "celery", "1"],
        &["BZMPOP", "1", "2", "q:none", "z:1", "MAX", "COUNT", "2"],
        &["BZPOPMAX", "z:1", "celery", "0.1"],
        // Redis words the argument errors.
        &["BRPOP", "celery", "q:c", "soon"],
        &["BRPOP", "celery", "q:c", "-1"],
        &["BLMPOP", "1", "2", "celery", "q:c", "SIDEWAYS"],
        &["BZMPOP", "1", "2", "celery", "z:1", "MIN", "COUNT", "0"],
        // Arguments a form for one key would read otherwise.
        &["BLMPOP", "1", "02", "celery", "q:c", "LEFT"],
        &["BZMPOP", "1", "+2", "celery", "z:1", "MIN"],
        &["BLMPOP", "1", "2", "celery", "q:c"],
        &["BRPOP", "celery", "q:c", "1e19"],
        &["LLEN", "q:c"],
        &["EXISTS", "celery", "z:1"],
    ];
    for hello in ["2", "3"] {
        let mut frames = Vec::new();
        for addr in [standalone.addr(), sidecar.local_addr().to_string()] {
            let mut c = support::Raw::connect(&addr).await;
            c.send(&["HELLO", hello]).await;
            c.frame().await;
            c.send(&["DEL", "q:c", "q:e", "z:1"]).await;
            c.frame().await;
            let mut got = Vec::new();
            for cmd in script {
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
    assert!(sidecar.metrics().pops_across_slots.get() >= 2 * 12);
    sidecar.shutdown().await;
}

/// A worker blocked on queues of several nodes gets every element pushed to
/// any of them exactly once, the first queue's at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_blocked_on_queues_of_several_nodes_gets_each_job_once() {
    use std::time::Instant;
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let queues = ["celery", "q:c", "q:e"];
    let mut worker = client(&sidecar).await;
    let mut producer = client(&sidecar).await;
    // Nothing to pop: nil at the client's timeout, not before.
    let asked = Instant::now();
    let none: Option<(String, String)> = redis::cmd("BRPOP")
        .arg(&queues[..])
        .arg(0.3)
        .query_async(&mut worker)
        .await
        .unwrap();
    assert_eq!(none, None);
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "{:?}",
        asked.elapsed()
    );
    let jobs = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 30 {
            let job: Option<(String, String)> = redis::cmd("BRPOP")
                .arg(&queues[..])
                .arg(5)
                .query_async(&mut worker)
                .await
                .unwrap();
            let Some((queue, job)) = job else { break };
            got.push((queue, job, Instant::now()));
        }
        got
    });
    let mut sent = Vec::new();
    let mut pushed_at = std::collections::HashMap::new();
    for i in 0..30 {
        // Every third job to the first queue, once the worker waits.
        tokio::time::sleep(Duration::from_millis(if i % 3 == 0 { 150 } else { 20 })).await;
        let queue = queues[i % 3];
        pushed_at.insert(i.to_string(), Instant::now());
        let _: () = producer.lpush(queue, i).await.unwrap();
        sent.push((queue.to_string(), i.to_string()));
    }
    let got = tokio::time::timeout(Duration::from_secs(20), jobs)
        .await
        .expect("the worker finishes")
        .unwrap();
    // How long a job pushed to the first queue waited for the worker: a
    // wake, not a find on the next 100 ms round (that would take 50 ms
    // at the median; a wake takes a few).
    let mut first_waits: Vec<Duration> = got
        .iter()
        .filter(|(queue, _, _)| queue == "celery")
        .map(|(_, job, at)| at.saturating_duration_since(pushed_at[job]))
        .collect();
    first_waits.sort();
    let mut got: Vec<(String, String)> = got.into_iter().map(|(q, j, _)| (q, j)).collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
    let lens: Vec<u64> = redis::pipe()
        .llen(queues[0])
        .llen(queues[1])
        .llen(queues[2])
        .query_async(&mut producer)
        .await
        .unwrap();
    assert_eq!(lens, [0, 0, 0]);
    assert_eq!(first_waits.len(), 10);
    assert!(first_waits[5] < Duration::from_millis(45), "{first_waits:?}");
    sidecar.shutdown().await;
}

/// A key that takes another type while a client waits on it does not end
/// the wait: one server serves the next key that gets an element.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_changes_type_during_the_wait_keeps_the_client_waiting() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut worker = client(&sidecar).await;
    let mut other = client(&sidecar).await;
    let waiting = tokio::spawn(async move {
        let r: redis::Value = redis::cmd("BLPOP")
            .arg("celery")
            .arg("q:c")
            .arg(3)
            .query_async(&mut worker)
            .await
            .unwrap();
        r
    });
    let first = cluster.by_addr(&cluster.shard_of("celery").0);
    support::eventually(
        "the worker waits on the first key",
        Duration::from_secs(5),
        || first.info_field("clients", "blocked_clients").as_deref() == Some("1"),
    )
    .await;
    let _: () = other.set("celery", "x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: () = other.rpush("q:c", "y").await.unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(
        format!("{r:?}"),
        format!(
            "{:?}",
            redis::Value::Array(vec![
                redis::Value::BulkString(b"q:c".to_vec()),
                redis::Value::BulkString(b"y".to_vec()),
            ])
        )
    );
    sidecar.shutdown().await;
}

/// A client blocked for ever on keys of several slots that goes away stops
/// the sidecar's tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_blocked_across_slots_that_goes_away_stops_the_tries() {
    use tokio::io::AsyncWriteExt;
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let second = cluster.by_addr(&cluster.shard_of("q:c").0);
    let mut gone = tokio::net::TcpStream::connect(sidecar.local_addr())
        .await
        .unwrap();
    gone.write_all(&cachetier_sidecar::resp::command_bytes(&[
        "BLPOP", "celery", "q:c", "0",
    ]))
    .await
    .unwrap();
    support::eventually("the second queue is tried", Duration::from_secs(5), || {
        second.calls("exec") >= 3
    })
    .await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = second.calls("exec");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(second.calls("exec"), after, "tried after the client left");
    sidecar.shutdown().await;
}

/// A RESP3 client's pop that times out gets RESP3's nil, also when the
/// keys it waits on took another type meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_pop_across_slots_times_out_with_resp3_nil() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut c = support::Raw::connect(&sidecar.local_addr().to_string()).await;
    c.send(&["HELLO", "3"]).await;
    c.frame().await;
    c.send(&["BLPOP", "celery", "q:c", "1"]).await;
    let first = cluster.by_addr(&cluster.shard_of("celery").0);
    support::eventually(
        "the client waits on the first key",
        Duration::from_secs(5),
        || first.info_field("clients", "blocked_clients").as_deref() == Some("1"),
    )
    .await;
    let mut other = client(&sidecar).await;
    let _: () = other.set("q:c", "x").await.unwrap();
    assert_eq!(&c.frame().await[..], b"_\r\n");
    sidecar.shutdown().await;
}
