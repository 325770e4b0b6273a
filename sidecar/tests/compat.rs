//! Small ways a plain client expects the sidecar to act like one Redis 7
//! server (issue 9, items 8 and 12), against real redis-server processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;
use support::{Cluster, client, config, http_get};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_the_upstream_redis_version() {
    let cluster = Cluster::start(3, 0);
    let version = cluster.nodes[0].info_field("server", "redis_version").unwrap();
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let info: String = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    assert!(info.contains(&format!("redis_version:{version}\r\n")), "{info}");
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
async fn argument_errors_are_redis_own_and_config_get_is_answered() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    for (numkeys, wording) in [("0", "numkeys"), ("2", "Number of keys")] {
        let e = redis::cmd("SINTERCARD")
            .arg(numkeys)
            .arg("a")
            .query_async::<i64>(&mut c)
            .await
            .unwrap_err();
        assert!(e.to_string().contains(wording), "Redis's own wording: {e}");
    }
    let got: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got[0], "maxmemory-policy");
    let e = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async::<()>(&mut c)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("redisConfig"), "{e}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_get_the_errors_redis_gives_them() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut c = client(&sidecar).await;
    let mut node = support::client_of(cluster.nodes[0].addr().parse().unwrap()).await;
    // The sidecar's arity table is the server's own.
    let names: Vec<&str> = cachetier_sidecar::commands::all().map(|i| i.name).collect();
    let infos: Vec<redis::Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg(&names)
        .query_async(&mut node)
        .await
        .unwrap();
    for (name, value) in names.iter().zip(&infos) {
        let arity = match value {
            redis::Value::Array(a) => match a.get(1) {
                Some(redis::Value::Int(n)) => Some(*n as i32),
                _ => None,
            },
            _ => None,
        };
        assert_eq!(cachetier_sidecar::arity::of(name), arity, "{name}");
    }
    // Whatever the sidecar answers or routes itself, errors read as Redis's.
    let reply = |r: redis::RedisResult<redis::Value>| match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => e.to_string(),
    };
    for line in [
        "SET k",
        "GET",
        "CLIENT",
        "CLIENT SETNAME",
        "CLIENT NOSUCH",
        "CLIENT ID x",
        "CONFIG NOSUCH",
        "CONFIG RESETSTAT x",
        "COMMAND COUNT x",
        "SCRIPT NOSUCH",
        "PUBSUB NOSUCH",
        "FUNCTION NOSUCH",
        "HELLO x",
        "HELLO 02",
        "HELLO 3 FOO",
        "HELLO 3 AUTH a",
        "AUTH a b c",
        "AUTH x",
        "AUTH default x",
        "AUTH bob x",
        "READONLY x",
        "MULTI x",
        "EXEC x",
        "DISCARD x",
        "UNWATCH x",
        "RANDOMKEY x",
        "DBSIZE x",
        "SELECT x",
        "PING a b",
        "ECHO",
        "WAIT 1",
        "ROLE x",
    ] {
        let args: Vec<&str> = line.split(' ').collect();
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        let (ours, redis) = (cmd.query_async(&mut c).await, cmd.query_async(&mut node).await);
        assert_eq!(reply(ours), reply(redis), "{line}");
    }
    // A command Redis refuses inside MULTI is refused at once, and EXEC
    // aborts (as it does for one the sidecar does not know).
    for bad in [&["SET", "k"][..], &["NOSUCHCMD"]] {
        let mut replies = Vec::new();
        for conn in [&mut c, &mut node] {
            let () = redis::cmd("MULTI").query_async(conn).await.unwrap();
            let queued = redis::cmd(bad[0])
                .arg(&bad[1..])
                .query_async::<redis::Value>(conn)
                .await;
            let exec = redis::cmd("EXEC").query_async::<redis::Value>(conn).await;
            replies.push((queued.is_err(), reply(exec)));
        }
        assert_eq!(replies[0], replies[1], "{bad:?}");
        assert!(
            replies[0].0 && replies[0].1.contains("Transaction discarded"),
            "{replies:?}"
        );
    }
    sidecar.shutdown().await;
}

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
    let (from, _) = cluster.shard_of(key);
    let from = cluster.by_addr(&from);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let slot = from.cli(&["CLUSTER", "KEYSLOT", key]).trim().to_string();
    let (from_id, to_id) = (from.node_id(), to.node_id());
    assert!(
        to.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
            .contains("OK")
    );
    assert!(
        from.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
            .contains("OK")
    );
    let port = to.port.to_string();
    let migrated = from.cli(&["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", key]);
    assert!(migrated.contains("OK"), "{migrated}");
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

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
}

async fn client_list(c: &mut redis::aio::MultiplexedConnection, args: &[&str]) -> Vec<String> {
    let text: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg(args)
        .query_async(c)
        .await
        .unwrap();
    text.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_list_info_and_kill_describe_the_sidecars_own_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let mut admin = client(&sidecar).await;
    let mut alpha = client(&sidecar).await;
    let () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg("alpha")
        .query_async(&mut alpha)
        .await
        .unwrap();
    let _: Option<String> = alpha.get("k").await.unwrap();
    let alpha_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut alpha)
        .await
        .unwrap();
    // CLIENT INFO: Redis's fields, in Redis's order, for this connection.
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async(&mut alpha)
        .await
        .unwrap();
    let names = |l: &str| {
        l.split(' ')
            .filter_map(|f| f.split_once('='))
            .map(|(k, _)| k.to_string())
            .collect::<Vec<_>>()
    };
    let redis_info = cluster.nodes[0].cli(&["CLIENT", "INFO"]);
    assert_eq!(
        names(info.trim_end()),
        names(redis_info.trim_end()),
        "{info} / {redis_info}"
    );
    assert_eq!(field(info.trim_end(), "id"), Some(alpha_id.to_string().as_str()));
    assert_eq!(field(info.trim_end(), "name"), Some("alpha"));
    assert_eq!(field(info.trim_end(), "cmd"), Some("client|info"));
    // CLIENT LIST: every client of the sidecar, with what it did last.
    let lines = client_list(&mut admin, &[]).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let alpha_line = lines.iter().find(|l| field(l, "name") == Some("alpha")).unwrap();
    assert_eq!(field(alpha_line, "cmd"), Some("client"), "{alpha_line}");
    // A subscriber is of type pubsub, with its flag and count.
    let mut sub = tokio::net::TcpStream::connect(sidecar.local_addr())
        .await
        .unwrap();
    sub.write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sub.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"*3\r\n$9\r\nsubscribe"), "{:?}", &buf[..n]);
    let pubsub = client_list(&mut admin, &["TYPE", "pubsub"]).await;
    assert_eq!(pubsub.len(), 1, "{pubsub:?}");
    assert_eq!(
        (field(&pubsub[0], "flags"), field(&pubsub[0], "sub")),
        (Some("P"), Some("1"))
    );
    assert_eq!(client_list(&mut admin, &["TYPE", "normal"]).await.len(), 2);
    // CLIENT KILL by id: a count, and the connection closes at once.
    let n: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(alpha_id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(
        alpha.get::<_, Option<String>>("k").await.is_err(),
        "a killed client is closed"
    );
    // The old form, by address: +OK, then "No such client".
    let sub_addr = field(&client_list(&mut admin, &["TYPE", "pubsub"]).await[0], "addr")
        .unwrap()
        .to_string();
    let () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg(&sub_addr)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(sub.read(&mut buf).await.unwrap(), 0, "the subscriber is closed");
    let e = redis::cmd("CLIENT")
        .arg("KILL")
        .arg(&sub_addr)
        .query_async::<()>(&mut admin)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("No such client"), "{e}");
    // Closed connections leave the list.
    let mut left = client_list(&mut admin, &[]).await;
    for _ in 0..40 {
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = client_list(&mut admin, &[]).await;
    }
    assert_eq!(left.len(), 1, "{left:?}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_at_its_output_limit_and_others_carry_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(3, 0);
    let cfg = cachetier_sidecar::Config {
        client_output_limit: 8 << 20,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let mut other = client(&sidecar).await;
    let _: () = other.set("big:out", "x".repeat(256 << 10)).await.unwrap();
    let before = support::proc_status_kib("self", "VmHWM");
    // 4000 GETs of 256 KiB (1 GB of replies), never read.
    let mut greedy = tokio::net::TcpStream::connect(sidecar.local_addr())
        .await
        .unwrap();
    let (owner, _) = cluster.shard_of("big:out");
    let owner = cluster.by_addr(&owner);
    let gets_before = owner.calls("get");
    let get = b"*2\r\n$3\r\nGET\r\n$7\r\nbig:out\r\n".repeat(4000);
    greedy.write_all(&get).await.unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let t = std::time::Instant::now();
        let v: String = other.get("big:out").await.unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(v.len(), 256 << 10);
    }
    support::eventually("the greedy client is closed", Duration::from_secs(20), || {
        sidecar.metrics().output_limit_closes.get() == 1
    })
    .await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), greedy.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(received.len() < 4000 * (256 << 10), "{} bytes", received.len());
    // The other client's requests share the upstream connection with the
    // greedy one's: what it waits behind is bounded by how many requests
    // one client may have in flight (256 of 256 KiB here, not all 4000).
    let greedy_gets = owner.calls("get") - gets_before - 50;
    assert!(
        greedy_gets <= 300,
        "{greedy_gets} of the greedy client's GETs reached Redis"
    );
    eprintln!("slowest GET of the other client: {slowest:?}");
    let grown_mib = (support::proc_status_kib("self", "VmHWM") - before) / 1024;
    assert!(grown_mib < 256, "peak RSS grew by {grown_mib} MiB");
    let pong: String = redis::cmd("PING").query_async(&mut other).await.unwrap();
    assert_eq!(pong, "PONG");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_max_clients_are_told_so_and_closed() {
    use tokio::io::AsyncReadExt;
    let cluster = Cluster::start(3, 0);
    let cfg = cachetier_sidecar::Config {
        max_clients: 2,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let mut a = client(&sidecar).await;
    let b = client(&sidecar).await;
    let _: String = redis::cmd("PING").query_async(&mut a).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(sidecar.local_addr())
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "-ERR max number of clients reached\r\n");
    drop(b);
    support::eventually("a place is free again", Duration::from_secs(5), || {
        sidecar.metrics().client_connections.get() == 1
    })
    .await;
    let mut again = client(&sidecar).await;
    let _: String = redis::cmd("PING").query_async(&mut again).await.unwrap();
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_query_limit_is_refused_and_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(3, 0);
    let cfg = cachetier_sidecar::Config {
        client_query_limit: 1 << 20,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(sidecar.local_addr())
        .await
        .unwrap();
    // One SET whose value (4 MiB) never completes within the limit.
    s.write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4194304\r\n")
        .await
        .unwrap();
    let chunk = vec![b'x'; 64 << 10];
    for _ in 0..32 {
        if s.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.contains("client query limit"), "{reply}");
    sidecar.shutdown().await;
}
