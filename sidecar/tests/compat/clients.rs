//! The sidecar's clients: `CLIENT LIST|INFO|KILL`, and the bounds Redis
//! puts on them (output buffer, `maxclients`, query size; item 13).

use std::time::Duration;

use bytes::Bytes;
use cachetier_sidecar::Sidecar;
use redis::AsyncCommands;

use crate::support::{self, Cluster, client, config};

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
    // `cmd` as Redis shows it (redis-py's suite finds its subscriber so).
    assert_eq!(
        (
            field(&pubsub[0], "flags"),
            field(&pubsub[0], "sub"),
            field(&pubsub[0], "cmd")
        ),
        (Some("P"), Some("1"), Some("subscribe"))
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
    // A connection's own line names this command even when it is its
    // first (redis-cli's CLIENT LIST).
    let mut first = tokio::net::TcpStream::connect(sidecar.local_addr())
        .await
        .unwrap();
    first
        .write_all(b"*2\r\n$6\r\nCLIENT\r\n$4\r\nINFO\r\n")
        .await
        .unwrap();
    let mut reply = vec![0u8; 1024];
    let n = first.read(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    assert!(reply.contains(" cmd=client|info "), "{reply}");
    drop(first);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_query_limit_is_refused_and_aborts() {
    let cluster = Cluster::start(3, 0);
    let cfg = cachetier_sidecar::Config {
        client_query_limit: 1 << 20,
        ..config(&cluster)
    };
    let sidecar = Sidecar::bind(cfg).await.unwrap();
    let mut c = support::Raw::connect(&sidecar.local_addr().to_string()).await;
    c.send(&["MULTI"]).await;
    assert_eq!(c.frame().await, Bytes::from_static(b"+OK\r\n"));
    // 32 SETs of 64 KiB: 2 MiB queued, past the 1 MiB limit halfway.
    let value = "v".repeat(64 << 10);
    let mut refused = Vec::new();
    for i in 0..32 {
        c.send(&["SET", &format!("big:{i}"), &value]).await;
        let reply = c.frame().await;
        if reply != Bytes::from_static(b"+QUEUED\r\n") {
            refused.push((i, reply));
        }
    }
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (at, why) = &refused[0];
    assert!((14..18).contains(at), "refused at {at}");
    assert!(
        String::from_utf8_lossy(why).contains("client query limit"),
        "{why:?}"
    );
    c.send(&["EXEC"]).await;
    let exec = c.frame().await;
    assert!(exec.starts_with(b"-EXECABORT"), "{exec:?}");
    // Nothing of it ran; the connection goes on.
    c.send(&["EXISTS", "big:0"]).await;
    assert_eq!(c.frame().await, Bytes::from_static(b":0\r\n"));
    sidecar.shutdown().await;
}

/// The `flags` and `redir` fields of every `CLIENT INFO` in one session.
async fn flags_through(addr: &str) -> Vec<String> {
    let mut c = support::Raw::connect(addr).await;
    let script: &[&[&str]] = &[
        &["CLIENT", "INFO"],
        &["CLIENT", "NO-EVICT", "on"],
        &["CLIENT", "INFO"],
        &["HELLO", "3"],
        &["CLIENT", "TRACKING", "on"],
        &["CLIENT", "INFO"],
        &["CLIENT", "TRACKING", "off"],
        &["CLIENT", "TRACKING", "on", "BCAST"],
        &["SUBSCRIBE", "a"],
        &["CLIENT", "INFO"],
        &["RESET"],
        &["CLIENT", "INFO"],
    ];
    let mut shown = Vec::new();
    for cmd in script {
        c.send(cmd).await;
        let reply = String::from_utf8_lossy(&c.frame().await).into_owned();
        if cmd.starts_with(&["CLIENT", "INFO"]) {
            let of = |name| field(reply.trim_end(), name).unwrap_or("?").to_string();
            shown.push(format!("flags={} redir={}", of("flags"), of("redir")));
        }
    }
    shown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_info_shows_the_flags_one_redis_server_shows() {
    let cluster = Cluster::start(3, 0);
    let sidecar = Sidecar::bind(config(&cluster)).await.unwrap();
    let standalone = support::RedisNode::start(&["--cluster-enabled", "no"]);
    let redis = flags_through(&standalone.addr()).await;
    assert_eq!(flags_through(&sidecar.local_addr().to_string()).await, redis);
    // What redis-server 7.0.15 shows (RESET keeps NO-EVICT).
    assert_eq!(
        redis,
        [
            "flags=N redir=-1",
            "flags=e redir=-1",
            "flags=te redir=0",
            "flags=PtBe redir=0",
            "flags=e redir=-1"
        ]
    );
    sidecar.shutdown().await;
}
