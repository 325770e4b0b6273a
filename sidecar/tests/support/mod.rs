//! Real Redis Cluster fixtures for the sidecar's integration tests.
//!
//! Starts `redis-server` processes with `cluster-enabled yes` on free
//! 127.0.0.1 ports, joins them with `redis-cli --cluster create`, waits until
//! the cluster is healthy and every replica is in sync, and kills exactly the
//! processes it started when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Ports come from a per-binary counter in 20000..25000; the cluster bus
/// port is set explicitly to port + 20000 (40000..45000) so it never collides.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

pub fn next_port() -> u16 {
    if NEXT_PORT.load(Ordering::SeqCst) == 0 {
        let base = 20000 + (std::process::id() % 40) as u16 * 100;
        let _ = NEXT_PORT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let mut p = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        if p >= 25000 {
            NEXT_PORT.store(20000, Ordering::SeqCst);
            p = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        }
        if free(p) && free(p + 20000) {
            return p;
        }
    }
}

/// One `redis-server` process this test started.
pub struct RedisNode {
    pub port: u16,
    child: Child,
    dir: PathBuf,
    password: Option<String>,
}

impl RedisNode {
    pub fn start(extra: &[&str]) -> RedisNode {
        RedisNode::start_with(extra, None)
    }

    /// A node with `requirepass`/`masterauth` set to `password`.
    pub fn start_with(extra: &[&str], password: Option<&str>) -> RedisNode {
        let port = next_port();
        let auth: Vec<&str> = match password {
            Some(p) => vec!["--requirepass", p, "--masterauth", p],
            None => Vec::new(),
        };
        let dir = std::env::temp_dir().join(format!("cachetier-sidecar-test-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &(port + 20000).to_string(),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
                "--dir",
                dir.to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--logfile",
                "redis.log",
            ])
            .args(extra)
            .args(&auth)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let node = RedisNode {
            port,
            child,
            dir,
            password: password.map(str::to_string),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.cli(&["PING"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis-server on {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run redis-cli against this node and return its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(p) = &self.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd.args(args).output().expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A field of `INFO` (e.g. `master_link_status`).
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let text = self.cli(&["INFO", section]);
        info_field(&text, field)
    }

    /// `calls` of `cmdstat_<cmd>` in `INFO commandstats`.
    pub fn calls(&self, cmd: &str) -> u64 {
        calls(&self.cli(&["INFO", "commandstats"]), cmd)
    }

    pub fn node_id(&self) -> String {
        self.cli(&["CLUSTER", "MYID"]).trim().to_string()
    }

    /// SIGSTOP / SIGCONT this process (only ever a pid this fixture spawned).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

pub fn info_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(&format!("{field}:"))
            .map(str::to_string)
    })
}

pub fn calls(info: &str, cmd: &str) -> u64 {
    info_field(info, &format!("cmdstat_{cmd}"))
        .and_then(|v| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("calls=").and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        // Resume first in case a test stopped it, then kill our own child.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `masters` shards with `replicas` replicas each.
pub struct Cluster {
    pub nodes: Vec<RedisNode>,
}

impl Cluster {
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        Cluster::start_with(masters, replicas, None)
    }

    /// A cluster whose nodes require `password`.
    pub fn start_with(masters: usize, replicas: usize, password: Option<&str>) -> Cluster {
        Cluster::start_opts(masters, replicas, password, &[])
    }

    /// A cluster with extra `redis-server` arguments on every node.
    pub fn start_opts(masters: usize, replicas: usize, password: Option<&str>, extra: &[&str]) -> Cluster {
        let n = masters * (1 + replicas);
        let nodes: Vec<RedisNode> = (0..n).map(|_| RedisNode::start_with(extra, password)).collect();
        let mut args: Vec<String> = Vec::new();
        if let Some(p) = password {
            args.extend(["-a".into(), p.into(), "--no-auth-warning".into()]);
        }
        args.extend(["--cluster".into(), "create".into()]);
        args.extend(nodes.iter().map(RedisNode::addr));
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("redis-cli").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Cluster { nodes };
        cluster.wait_healthy(n, masters * replicas);
        cluster
    }

    fn wait_healthy(&self, n: usize, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Replicas are assigned after the slots; until every node agrees
            // on its role the layout is still settling.
            let roles = self
                .nodes
                .iter()
                .filter(|node| node.info_field("replication", "role").as_deref() == Some("slave"))
                .count();
            let seen = self.nodes.iter().all(|node| {
                node.cli(&["CLUSTER", "NODES"])
                    .lines()
                    .filter(|l| l.split_whitespace().nth(2).is_some_and(|f| f.contains("slave")))
                    .count()
                    == replicas
            });
            let ok = self.nodes.iter().all(|node| {
                let info = node.cli(&["CLUSTER", "INFO"]);
                let state_ok = info_field(&info, "cluster_state").as_deref() == Some("ok");
                let known =
                    info_field(&info, "cluster_known_nodes").and_then(|v| v.parse::<usize>().ok()) == Some(n);
                let repl = node.cli(&["INFO", "replication"]);
                let synced = match info_field(&repl, "role").as_deref() {
                    Some("slave") => info_field(&repl, "master_link_status").as_deref() == Some("up"),
                    _ => true,
                };
                state_ok && known && synced
            });
            if ok && roles == replicas && seen {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn seeds(&self) -> Vec<String> {
        vec![self.nodes[0].addr()]
    }

    pub fn by_addr(&self, addr: &str) -> &RedisNode {
        self.nodes
            .iter()
            .find(|n| n.addr() == addr)
            .expect("node of this cluster")
    }

    /// Start migrating `key`'s slot from its owner to another primary
    /// (`IMPORTING`/`MIGRATING`) and move `key` itself, as a reshard does
    /// mid-way; returns (source, destination, slot).
    pub fn migrate_key(&self, key: &str) -> (&RedisNode, &RedisNode, String) {
        let (from, _) = self.shard_of(key);
        let from = self.by_addr(&from);
        let to = self
            .nodes
            .iter()
            .find(|n| n.port != from.port && n.info_field("replication", "role").as_deref() == Some("master"))
            .unwrap();
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
        (from, to, slot)
    }

    /// The primary and replicas that own `key`, by address.
    pub fn shard_of(&self, key: &str) -> (String, Vec<String>) {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        let text = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        let mut primary = None;
        let mut primary_id = String::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            let owns = slot_ranges(&f[8..]).iter().any(|&(a, b)| a <= slot && slot <= b);
            if owns {
                primary = Some(f[1].split('@').next().unwrap().to_string());
                primary_id = f[0].to_string();
            }
        }
        let replicas = text
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f.len() > 3 && f[3] == primary_id).then(|| f[1].split('@').next().unwrap().to_string())
            })
            .collect();
        (primary.unwrap(), replicas)
    }

    /// The slot ranges `primary` (an address) serves.
    pub fn slots_of(&self, primary: &str) -> Vec<(u16, u16)> {
        let text = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<&str>>())
            .find(|f| f.len() > 1 && f[1].split('@').next() == Some(primary))
            .map(|f| slot_ranges(f.get(8..).unwrap_or_default()))
            .unwrap_or_default()
    }

    pub fn reset_stats(&self) {
        for n in &self.nodes {
            n.cli(&["CONFIG", "RESETSTAT"]);
        }
    }
}

/// A sidecar configuration pointed at `cluster`, listening on a free port.
/// The slot ranges of a `CLUSTER NODES` line's slot fields (`5`, `0-5460`;
/// an open migration's `[..]` entry is not a range).
fn slot_ranges(fields: &[&str]) -> Vec<(u16, u16)> {
    fields
        .iter()
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => r.parse().ok().map(|s| (s, s)),
        })
        .collect()
}

pub fn config(cluster: &Cluster) -> cachetier_sidecar::Config {
    cachetier_sidecar::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        seeds: cluster.seeds(),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        gate_interval: Duration::from_millis(200),
        ..cachetier_sidecar::Config::default()
    }
}

/// [`config`] with the local cache on for keys under `hot:` (60 s TTL,
/// at most `max_bytes`).
pub fn hot_cache_config(cluster: &Cluster, max_bytes: u64) -> cachetier_sidecar::Config {
    let mut cfg = config(cluster);
    cfg.cache = cachetier_sidecar::CacheConfig {
        prefixes: vec!["hot:".into()],
        ttl: Duration::from_secs(60),
        max_bytes,
    };
    cfg
}

/// Kill the broadcast-tracking client(s) on `node` (the sidecar's tracking links).
pub fn cut_tracking(node: &RedisNode) {
    let clients = node.cli(&["CLIENT", "LIST"]);
    let ids: Vec<&str> = clients
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|f| f.starts_with("flags=") && f.contains('B'))
        })
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert!(!ids.is_empty(), "a broadcast-tracking client on {}", node.addr());
    for id in ids {
        node.cli(&["CLIENT", "KILL", "ID", id]);
    }
}

/// Wait (bounded) until `cond` holds.
pub async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until every replica's read gate is open.
pub async fn all_serving(sidecar: &cachetier_sidecar::Sidecar) {
    eventually("all nodes serving", Duration::from_secs(10), || {
        let s = sidecar.node_states();
        !s.is_empty() && s.iter().all(|n| n.healthy && n.gate_open)
    })
    .await;
}

/// A plain (non-cluster) client of the sidecar. Its response timeout must
/// exceed the sidecar's own (1 s): a read stalled on a silent node is retried
/// elsewhere after that second, and the client should see the retry succeed.
pub async fn client_of(addr: std::net::SocketAddr) -> redis::aio::MultiplexedConnection {
    let url = format!("redis://{addr}/");
    let mut con = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    con.set_response_timeout(Duration::from_secs(5));
    con
}

pub async fn client(sidecar: &cachetier_sidecar::Sidecar) -> redis::aio::MultiplexedConnection {
    client_of(sidecar.local_addr()).await
}

/// Writes `script` (raw RESP or inline commands) on a new connection and
/// returns every byte answered until the server closes the connection or
/// stays silent for 300 ms (at most 5 s in all).
pub async fn exchange(addr: &str, script: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(script).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// One HTTP/1.0 GET against the metrics port; returns (status line, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// A process a test spawned, killed if the test ends (or fails) first.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A `kB` field (`VmRSS`, `VmHWM`, ...) of `/proc/<pid>/status`; `pid` may be
/// `self`.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A raw RESP connection, as redis-py or redis-cli speak it.
pub struct Raw {
    pub s: tokio::net::TcpStream,
    pub buf: bytes::BytesMut,
}

impl Raw {
    pub async fn connect(addr: &str) -> Raw {
        Raw {
            s: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: bytes::BytesMut::new(),
        }
    }

    pub async fn send(&mut self, args: &[&str]) {
        tokio::io::AsyncWriteExt::write_all(&mut self.s, &cachetier_sidecar::resp::command_bytes(args))
            .await
            .unwrap();
    }

    /// The next frame, as raw bytes (within 5 s).
    pub async fn frame(&mut self) -> bytes::Bytes {
        let mut checker = cachetier_sidecar::resp::Checker::new(cachetier_sidecar::resp::Limits::upstream());
        loop {
            if let Some(n) = checker.check(&self.buf).unwrap() {
                return self.buf.split_to(n).freeze();
            }
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_buf(&mut self.s, &mut self.buf),
            );
            let n = read.await.expect("a frame within 5 s").unwrap();
            assert!(n > 0, "connection closed");
        }
    }

    pub async fn frames(&mut self, n: usize) -> Vec<bytes::Bytes> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.frame().await);
        }
        out
    }
}
