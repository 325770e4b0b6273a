//! Scripts and functions: loaded on every primary, called by key, killed
//! wherever they run; a transaction during a slot migration.

use std::time::Duration;

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;

use crate::support::{self, Cluster, client, config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_kill_and_function_kill_stop_a_busy_script_wherever_it_runs() {
    // Redis takes SCRIPT KILL once a script has run this long (ms).
    let cluster = Cluster::start_opts(3, 0, None, &["--busy-reply-threshold", "100"]);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut runner = client(&sidecar).await;
    let mut admin = client(&sidecar).await;
    let spin = "local s = redis.call('TIME') while true do local n = redis.call('TIME') \
                if (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 3000000 then break end end return 1";
    let library = format!(
        "#!lua name=busylib\nredis.register_function{{function_name='spin', \
         callback=function(keys, args) {spin} end, flags={{'no-writes'}}}}"
    );
    let () = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&library)
        .query_async(&mut admin)
        .await
        .map(|_: String| ())
        .unwrap();
    for (call, body, kill) in [("EVAL", spin, "SCRIPT"), ("FCALL", "spin", "FUNCTION")] {
        let started = std::time::Instant::now();
        let mut conn = runner.clone();
        let running = tokio::spawn(async move {
            redis::cmd(call)
                .arg(body)
                .arg(1)
                .arg("{s}k")
                .query_async::<i64>(&mut conn)
                .await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let () = redis::cmd(kill)
            .arg("KILL")
            .query_async(&mut admin)
            .await
            .unwrap();
        let e = running.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("KILL"), "{call}'s client is told: {e}");
        assert!(
            started.elapsed() < Duration::from_millis(2500),
            "{call}: {:?}",
            started.elapsed()
        );
        let e = redis::cmd(kill)
            .arg("KILL")
            .query_async::<()>(&mut admin)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("No scripts in execution"),
            "{kill}: nothing left to kill: {e}"
        );
    }
    let _: i64 = redis::cmd("DBSIZE").query_async(&mut runner).await.unwrap();
    sidecar.shutdown().await;
}

const LIBRARY: &str = "#!lua name=cachetierlib\n\
    redis.register_function('settwice', function(keys, args) \
      redis.call('SET', keys[1], args[1]) return redis.call('GET', keys[1]) end)\n\
    redis.register_function{function_name='peek', callback=function(keys, args) \
      return redis.call('GET', keys[1]) end, flags={'no-writes'}}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_are_loaded_on_every_primary_and_called_by_key() {
    let cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let mut c = client(&sidecar).await;
    let name: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(LIBRARY)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(name, "cachetierlib");
    for n in &cluster.nodes {
        if n.info_field("replication", "role").as_deref() == Some("master") {
            assert!(
                n.cli(&["FUNCTION", "LIST"]).contains("cachetierlib"),
                "on {}",
                n.addr()
            );
        }
    }
    // Keys on different primaries.
    for i in 0..10 {
        let key = format!("fn:{i}");
        let v: String = redis::cmd("FCALL")
            .arg("settwice")
            .arg(1)
            .arg(&key)
            .arg(i)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, i.to_string());
        let v: String = redis::cmd("FCALL_RO")
            .arg("peek")
            .arg(1)
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(v, i.to_string());
    }
    let list: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(format!("{list:?}").contains("cachetierlib"), "{list:?}");
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg("cachetierlib")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    for n in &cluster.nodes {
        assert!(!n.cli(&["FUNCTION", "LIST"]).contains("cachetierlib"));
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_follows_ask_while_its_slot_migrates() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let key = "migrating-tx";
    assert_eq!(c.incr::<_, _, i64>(key, 1).await.unwrap(), 1);
    cluster.migrate_key(key);
    let (v,): (i64,) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, 2);
    sidecar.shutdown().await;
}
