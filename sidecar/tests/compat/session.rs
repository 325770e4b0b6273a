//! Connection state (`HELLO`, `RESET`, `ROLE`), `INFO`, readiness and
//! per-node metrics as one Redis server would show them.

use std::time::Duration;

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;

use crate::support::{self, Cluster, client, config, http_get};

fn proto_of(hello: &redis::Value) -> Option<i64> {
    let items: Vec<(redis::Value, redis::Value)> = match hello {
        redis::Value::Map(m) => m.clone(),
        redis::Value::Array(a) => a.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect(),
        _ => return None,
    };
    items.into_iter().find_map(|(k, v)| match (k, v) {
        (redis::Value::BulkString(k), redis::Value::Int(p)) if k == b"proto" => Some(p),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_commands_behave_like_redis() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;

    // PING, ECHO and SELECT 0 are queued in a transaction and answered in
    // EXEC's reply, as from one Redis server.
    let () = redis::cmd("MULTI").query_async(&mut c).await.unwrap();
    for cmd in [
        &["PING"][..],
        &["ECHO", "hi"],
        &["SELECT", "0"],
        &["SET", "{t}k", "1"],
    ] {
        let queued: String = redis::cmd(cmd[0])
            .arg(&cmd[1..])
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(queued, "QUEUED", "{cmd:?}");
    }
    let replies: Vec<String> = redis::cmd("EXEC").query_async(&mut c).await.unwrap();
    assert_eq!(replies, ["PONG", "hi", "OK", "OK"]);

    // RESET drops a WATCH: keys of another slot work again, EXEC has no MULTI.
    let _: () = redis::cmd("WATCH").arg("{a}x").query_async(&mut c).await.unwrap();
    let r: String = redis::cmd("RESET").query_async(&mut c).await.unwrap();
    assert_eq!(r, "RESET");
    let _: () = c.set("{b}y", 1).await.unwrap();
    let e = redis::cmd("EXEC").query_async::<()>(&mut c).await.unwrap_err();
    assert!(e.to_string().contains("EXEC without MULTI"), "{e}");

    // HELLO 3 with bad credentials fails and leaves the protocol alone
    // (with no password set, Redis takes any password for `default`, and
    // refuses any other user).
    let e = redis::cmd("HELLO")
        .arg(3)
        .arg("AUTH")
        .arg("bob")
        .arg("wrong")
        .query_async::<redis::Value>(&mut c)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("AUTH") || e.to_string().contains("WRONGPASS"),
        "{e}"
    );
    let hello: redis::Value = redis::cmd("HELLO").query_async(&mut c).await.unwrap();
    assert_eq!(proto_of(&hello), Some(2), "{hello:?}");

    // A numkeys no argument list can hold is an error reply, not a crash.
    let e = redis::cmd("EVAL")
        .arg("return 1")
        .arg("18446744073709551615")
        .query_async::<i64>(&mut c)
        .await
        .unwrap_err();
    assert!(e.kind() != redis::ErrorKind::Io, "{e}");
    let pong: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
    assert_eq!(pong, "PONG");
    // ROLE as a primary without replicas answers it (as HELLO and INFO say).
    let role: redis::Value = redis::cmd("ROLE").query_async(&mut c).await.unwrap();
    let mut primary = support::client_of(cluster.nodes[0].addr().parse().unwrap()).await;
    let direct: redis::Value = redis::cmd("ROLE").query_async(&mut primary).await.unwrap();
    let shape = |v: &redis::Value| match v {
        redis::Value::Array(a) => a.first().cloned(),
        _ => None,
    };
    assert_eq!(shape(&role), shape(&direct), "{role:?} / {direct:?}");

    // A stream may be called `block`.
    let _: String = redis::cmd("XADD")
        .arg("block")
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async(&mut c)
        .await
        .unwrap();
    let got: redis::Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("block")
        .arg("0")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(format!("{got:?}").contains("block"), "{got:?}");
    sidecar.shutdown().await;
}

/// `WATCH`, `UNWATCH`, a nested `MULTI`, `RESET` and `QUIT` inside a
/// transaction: byte for byte what the key's own Redis node answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_inside_multi_answers_as_redis_does() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let ours = sidecar.local_addr().to_string();
    let node = cluster.by_addr(&cluster.shard_of("{t}k").0);
    for script in [
        // WATCH is refused and the transaction kept; UNWATCH is queued.
        "MULTI\r\nWATCH {t}k\r\nSET {t}k 1\r\nUNWATCH\r\nMULTI\r\nGET {t}k\r\nEXEC\r\nGET {t}k\r\n",
        // RESET ends the transaction: nothing queued runs.
        "MULTI\r\nSET {t}k 2\r\nRESET\r\nGET {t}k\r\nEXEC\r\nPING\r\n",
        // ... and drops the WATCH taken before it.
        "WATCH {t}k\r\nMULTI\r\nRESET\r\nMULTI\r\nSET {t}k 3\r\nEXEC\r\nGET {t}k\r\n",
        // QUIT answers OK and closes; the transaction never runs.
        "MULTI\r\nSET {t}k 4\r\nQUIT\r\nGET {t}k\r\n",
        // CLIENT REPLY: OFF until ON (errors too), SKIP drops the next
        // command's reply (and does nothing while OFF), RESET turns them on.
        "CLIENT REPLY OFF\r\nSET {t}k 5\r\nGET {t}k\r\nNOSUCH\r\nCLIENT REPLY SKIP\r\nCLIENT REPLY ON\r\nGET {t}k\r\n\
         CLIENT REPLY SKIP\r\nGET {t}k\r\nPING\r\nCLIENT REPLY SKIP\r\nCLIENT REPLY SKIP\r\nGET {t}k\r\nECHO x\r\n\
         CLIENT REPLY OFF\r\nRESET\r\nPING\r\nCLIENT REPLY MAYBE\r\nCLIENT REPLY\r\n",
        // ... a SKIP in force drops RESET's reply; subscription commands
        // use a SKIP up, their confirmations are not dropped, their errors
        // and a subscribed-mode PING's reply are.
        "CLIENT REPLY SKIP\r\nRESET\r\nPING\r\n",
        "CLIENT REPLY SKIP\r\nSUBSCRIBE ch\r\nUNSUBSCRIBE ch\r\nPING\r\n",
        "CLIENT REPLY SKIP\r\nUNSUBSCRIBE\r\nPING\r\n",
        "CLIENT REPLY OFF\r\nSUBSCRIBE ch\r\nPING\r\nGET {t}k\r\nCLIENT REPLY ON\r\nRESET\r\nPING\r\n",
        // ... and a protocol error is not answered either.
        "CLIENT REPLY OFF\r\n*1\r\n$-5\r\nPING\r\n",
    ] {
        let mut replies = Vec::new();
        for addr in [&ours, &node.addr()] {
            node.cli(&["SET", "{t}k", "0"]);
            let got = support::exchange(addr, script.as_bytes()).await;
            let after = node.cli(&["GET", "{t}k"]);
            replies.push((String::from_utf8_lossy(&got).into_owned(), after));
        }
        assert_eq!(replies[0], replies[1], "{script:?}: sidecar, then Redis");
    }
    sidecar.shutdown().await;
}

/// Client test suites and dashboards read these from `INFO server`
/// (redis-py's own suite fails to start without `arch_bits`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_server_has_redis_process_fields_about_the_sidecar() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let port = sidecar.local_addr().port().to_string();
    let mut c = client(&sidecar).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .unwrap();
    let field = |name: &str| support::info_field(&info, name);
    let redis = cluster.nodes[0].cli(&["INFO", "server"]);
    for name in [
        "os",
        "arch_bits",
        "process_id",
        "run_id",
        "tcp_port",
        "uptime_in_seconds",
        "uptime_in_days",
    ] {
        assert!(support::info_field(&redis, name).is_some(), "Redis has no {name}");
        assert!(field(name).is_some(), "{name} missing from {info}");
    }
    assert_eq!(
        field("arch_bits"),
        cluster.nodes[0].info_field("server", "arch_bits")
    );
    assert_eq!(field("process_id"), Some(std::process::id().to_string()));
    assert_eq!(field("tcp_port"), Some(port));
    let run_id = field("run_id").unwrap();
    assert!(
        run_id.len() == 40 && run_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{run_id}"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_the_upstream_redis_version() {
    let cluster = Cluster::start(3, 0);
    let version = cluster.nodes[0].info_field("server", "redis_version").unwrap();
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    assert!(info.contains(&format!("redis_version:{version}\r\n")), "{info}");
    // Sections as Redis gives them: those asked for, a blank line between,
    // nothing for an unknown one.
    let mut node = support::client_of(cluster.nodes[0].addr().parse().unwrap()).await;
    let shape = |text: &str| -> Vec<String> {
        text.split("\r\n")
            .filter(|l| l.is_empty() || l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    for asked in [
        &["server", "REPLICATION"][..],
        &["persistence"],
        &["memory", "stats"],
        &["nosuch"],
    ] {
        let ours: String = redis::cmd("INFO").arg(asked).query_async(&mut c).await.unwrap();
        let redis: String = redis::cmd("INFO")
            .arg(asked)
            .query_async(&mut node)
            .await
            .unwrap();
        assert_eq!(shape(&ours), shape(&redis), "INFO {asked:?}: {ours:?}");
    }
    // The keyspace is the tier's: keys of every shard, summed.
    for k in ["ks:a", "ks:b", "ks:c", "ks:d"] {
        let _: () = c.set(k, 1).await.unwrap();
    }
    let _: () = c.set_ex("ks:e", 1, 100).await.unwrap();
    let keys: u64 = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap())
        .sum();
    let ks: String = redis::cmd("INFO")
        .arg("keyspace")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        ks.contains(&format!("db0:keys={keys},expires=1,")),
        "{keys} keys: {ks}"
    );
    // Memory is the primaries' summed; hits and misses the nodes', the
    // commands the sidecar's (this client's, published before each reply).
    let field = |text: &str, name: &str| -> u64 {
        support::info_field(text, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let memory: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(field(&memory, "used_memory") > 0, "{memory}");
    let policy = cluster.nodes[0].info_field("memory", "maxmemory_policy").unwrap();
    assert!(
        memory.contains(&format!("maxmemory_policy:{policy}\r\n")),
        "{memory}"
    );
    let mut stats = redis::cmd("INFO");
    stats.arg("stats");
    let before: String = stats.query_async(&mut c).await.unwrap();
    for k in ["ks:a", "ks:b", "ks:c", "nosuch"] {
        let _: Option<String> = c.get(k).await.unwrap();
    }
    let after: String = stats.query_async(&mut c).await.unwrap();
    let delta = |name| field(&after, name) - field(&before, name);
    assert_eq!(
        (delta("keyspace_hits"), delta("keyspace_misses")),
        (3, 1),
        "{after}"
    );
    assert_eq!(
        delta("total_commands_processed"),
        5,
        "four GETs and an INFO: {after}"
    );
    // This sidecar's connections only (other tests' sidecars run in the
    // same process).
    for _ in 0..2 {
        support::exchange(&sidecar.local_addr().to_string(), b"PING\r\n").await;
    }
    let later: String = stats.query_async(&mut c).await.unwrap();
    assert_eq!(
        field(&later, "total_connections_received") - field(&after, "total_connections_received"),
        2,
        "{later}"
    );
    let clients: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(clients.contains("connected_clients:1\r\n"), "{clients}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_false_when_the_topology_is_lost() {
    let cluster = Cluster::start(3, 0);
    let cfg = cachetier_sidecar::Config {
        topology_refresh: Duration::from_millis(200),
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let maddr = sidecar.metrics_addr().unwrap();
    assert!(http_get(maddr, "/readyz").await.0.contains("200"));
    drop(cluster);
    support::eventually("readyz says not ready", Duration::from_secs(10), || {
        !sidecar.metrics().is_ready()
    })
    .await;
    assert!(http_get(maddr, "/readyz").await.0.contains("503"));
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_leaves_the_cluster_leaves_the_metrics_too() {
    let mut cluster = Cluster::start(3, 1);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    support::all_serving(&sidecar).await;
    let maddr = sidecar.metrics_addr().unwrap();
    let i = cluster
        .nodes
        .iter()
        .position(|n| n.info_field("replication", "role").as_deref() == Some("slave"))
        .unwrap();
    let gone = cluster.nodes.remove(i);
    let (addr, id) = (gone.addr(), gone.node_id());
    support::eventually("the replica's series is exported", Duration::from_secs(5), || {
        sidecar.metrics().render().contains(&format!("node=\"{addr}\""))
    })
    .await;
    drop(gone);
    for n in &cluster.nodes {
        n.cli(&["CLUSTER", "FORGET", &id]);
    }
    sidecar.refresh_topology().await.unwrap();
    assert!(sidecar.node_states().iter().all(|n| n.addr != addr));
    let (_, body) = http_get(maddr, "/metrics").await;
    assert!(!body.contains(&format!("node=\"{addr}\"")), "{body}");
    sidecar.shutdown().await;
}
