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
