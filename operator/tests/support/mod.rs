//! Test support: ports, short-timed tiers, local pools, a small cluster-aware
//! client that follows MOVED/ASK, and process signals for nodes a test started.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cachetier_operator::cluster::{HealthConfig, Listing, NodePool, TierConfig, Timing};
use cachetier_operator::local::pool::port_is_free;
use cachetier_operator::local::{LocalPool, LocalPoolOptions, PortSource};
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Client ports 25000–29999 from one counter per test binary; bus ports at
/// +20000 (45000–49999). Both checked free by binding.
#[derive(Debug)]
pub struct TestPorts;

static NEXT_PORT: AtomicU32 = AtomicU32::new(25000);

impl PortSource for TestPorts {
    fn next_pair(&self) -> Option<(u16, u16)> {
        loop {
            let port = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
            if port >= 30000 {
                return None;
            }
            let port = port as u16;
            let bus = port + 20000;
            if port_is_free(port) && port_is_free(bus) {
                return Some((port, bus));
            }
        }
    }
}

/// A tier with test timings: node timeout 1.5 s, probes every 200 ms.
pub fn tier(name: &str, shards: u32, replicas: u32) -> TierConfig {
    let mut redis_config = std::collections::BTreeMap::new();
    redis_config.insert("repl-diskless-sync-delay".to_string(), "0".to_string());
    TierConfig {
        name: name.to_string(),
        generation: Some(1),
        shards,
        replicas_per_shard: replicas,
        max_memory_bytes: 64 << 20,
        max_memory_policy: "noeviction".into(),
        redis_config,
        health: HealthConfig {
            probe_interval: Duration::from_millis(200),
            response_timeout: Duration::from_millis(200),
            failure_threshold: 3,
            evict_after: Duration::from_secs(3600),
        },
        max_lag_bytes: 1 << 20,
        timing: Timing {
            node_timeout: Duration::from_millis(1500),
            failover_margin: Duration::from_millis(1500),
            resync_interval: Duration::from_millis(100),
            migrate_batch: 100,
            migrate_timeout: Duration::from_secs(5),
        },
        auth: None,
    }
}

pub fn pool_options() -> LocalPoolOptions {
    let mut o = LocalPoolOptions::new(25000, 20000);
    o.ports = Arc::new(TestPorts);
    o
}

pub fn pool(name: &str) -> Arc<LocalPool> {
    Arc::new(
        LocalPool::new(name, pool_options())
            .expect("redis-server is installed (apt-get install redis-server)"),
    )
}

/// Sends a signal to a process this test's pool started.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig} {pid}");
}

pub async fn conn(addr: SocketAddr) -> MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}/"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub async fn query_string(addr: SocketAddr, args: &[&str]) -> String {
    let mut c = conn(addr).await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    tokio::time::timeout(Duration::from_secs(5), cmd.query_async::<String>(&mut c))
        .await
        .expect("answer within 5 s")
        .unwrap()
}

/// CRC16/XMODEM, as Redis Cluster hashes keys.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match key.find('{') {
        Some(open) => match key[open + 1..].find('}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % 16384
}

/// A minimal cluster-aware client: routes by slot, follows MOVED (updating its
/// map) and ASK (ASKING on the target), and refreshes its map from a seed when
/// a node it knew is gone. Counts what it followed.
pub struct ClusterClient {
    seeds: Vec<SocketAddr>,
    password: Option<String>,
    slots: Vec<Option<SocketAddr>>,
    conns: HashMap<SocketAddr, MultiplexedConnection>,
    pub moved: u64,
    pub asked: u64,
    pub refreshes: u64,
}

fn redirect(e: &RedisError) -> Option<(bool, SocketAddr)> {
    let ask = matches!(e.kind(), ErrorKind::Server(ServerErrorKind::Ask));
    let (addr, _) = e.redirect_node()?;
    Some((ask, addr.parse().ok()?))
}

impl ClusterClient {
    pub async fn new(seeds: Vec<SocketAddr>) -> Self {
        Self::with_password(seeds, None).await
    }

    /// A client that authenticates every connection with `password`.
    pub async fn with_password(seeds: Vec<SocketAddr>, password: Option<String>) -> Self {
        let mut c = Self {
            seeds,
            password,
            slots: vec![None; 16384],
            conns: HashMap::new(),
            moved: 0,
            asked: 0,
            refreshes: 0,
        };
        c.refresh().await;
        c
    }

    async fn conn(&mut self, addr: SocketAddr) -> Result<MultiplexedConnection, RedisError> {
        if let Some(c) = self.conns.get(&addr) {
            return Ok(c.clone());
        }
        let mut info = redis::IntoConnectionInfo::into_connection_info(format!("redis://{addr}/"))?;
        if let Some(p) = &self.password {
            info = info
                .clone()
                .set_redis_settings(info.redis_settings().clone().set_password(p));
        }
        let client = redis::Client::open(info)?;
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let c = client.get_multiplexed_async_connection_with_config(&cfg).await?;
        self.conns.insert(addr, c.clone());
        Ok(c)
    }

    /// Reloads the slot map from the first seed that answers CLUSTER SLOTS.
    pub async fn refresh(&mut self) {
        self.refreshes += 1;
        let seeds = self.seeds.clone();
        for seed in seeds {
            let Ok(mut c) = self.conn(seed).await else {
                self.conns.remove(&seed);
                continue;
            };
            let Ok(v) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut c)
                .await
            else {
                continue;
            };
            let redis::Value::Array(ranges) = v else { continue };
            for range in ranges {
                let redis::Value::Array(items) = range else {
                    continue;
                };
                let (
                    Some(redis::Value::Int(a)),
                    Some(redis::Value::Int(b)),
                    Some(redis::Value::Array(primary)),
                ) = (items.first(), items.get(1), items.get(2))
                else {
                    continue;
                };
                let (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) =
                    (primary.first(), primary.get(1))
                else {
                    continue;
                };
                let Ok(addr) = format!("{}:{port}", String::from_utf8_lossy(host)).parse::<SocketAddr>()
                else {
                    continue;
                };
                for s in *a..=*b {
                    self.slots[s as usize] = Some(addr);
                }
            }
            return;
        }
    }

    pub fn set_seeds(&mut self, seeds: Vec<SocketAddr>) {
        self.seeds = seeds;
    }

    async fn run<T: redis::FromRedisValue>(&mut self, key: &str, cmd: redis::Cmd) -> Result<T, String> {
        let slot = key_slot(key) as usize;
        let mut target = self.slots[slot];
        let mut asking = false;
        for attempt in 0..16 {
            let Some(addr) = target else {
                self.refresh().await;
                target = self.slots[slot];
                continue;
            };
            let mut c = match self.conn(addr).await {
                Ok(c) => c,
                Err(_) => {
                    // The node is gone (scaled in): refresh the map and retry.
                    self.conns.remove(&addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.refresh().await;
                    target = self.slots[slot];
                    continue;
                }
            };
            let result: Result<T, RedisError> = if asking {
                let mut p = redis::pipe();
                p.cmd("ASKING").ignore().add_command(cmd.clone());
                p.query_async::<(T,)>(&mut c).await.map(|(v,)| v)
            } else {
                cmd.query_async(&mut c).await
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) => match redirect(&e) {
                    Some((true, to)) => {
                        self.asked += 1;
                        target = Some(to);
                        asking = true;
                    }
                    Some((false, to)) => {
                        self.moved += 1;
                        self.slots[slot] = Some(to);
                        target = Some(to);
                        asking = false;
                        // Nodes that disagree for a moment (gossip after a
                        // failover) redirect back and forth: as a cluster
                        // client does, wait a little and re-read the map
                        // instead of spending every attempt at once.
                        if attempt >= 3 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            self.refresh().await;
                            target = self.slots[slot].or(Some(to));
                        }
                    }
                    None if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
                        self.conns.remove(&addr);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        self.refresh().await;
                        target = self.slots[slot];
                        asking = false;
                    }
                    None => {
                        // What the node believed, for a failure to be read
                        // without a rerun.
                        let nodes: String = redis::cmd("CLUSTER")
                            .arg("NODES")
                            .query_async(&mut c)
                            .await
                            .unwrap_or_default();
                        return Err(format!(
                            "{key}: {e} (from {addr}, attempt {attempt}); its CLUSTER NODES:\n{nodes}"
                        ));
                    }
                },
            }
        }
        Err(format!("{key}: too many redirects"))
    }

    pub async fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        self.run::<()>(key, cmd).await
    }

    /// `WAIT replicas timeout_ms` on the connection that carried the last
    /// write of `key` (the one to its slot's current owner): how many
    /// replicas acknowledged this client's writes there.
    pub async fn wait_replicated(
        &mut self,
        key: &str,
        replicas: u32,
        timeout_ms: u64,
    ) -> Result<u32, String> {
        let addr = self.slots[key_slot(key) as usize].ok_or("no owner known")?;
        let mut c = self.conn(addr).await.map_err(|e| e.to_string())?;
        redis::cmd("WAIT")
            .arg(replicas)
            .arg(timeout_ms)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn get(&mut self, key: &str) -> Result<Option<String>, String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.run(key, cmd).await
    }
}

/// Every node's open (importing/migrating) slots, from its own CLUSTER NODES line.
pub async fn open_slots(addrs: &[SocketAddr]) -> Vec<String> {
    let mut open = Vec::new();
    for &a in addrs {
        let nodes = query_string(a, &["CLUSTER", "NODES"]).await;
        for line in nodes.lines().filter(|l| l.contains("myself")) {
            for word in line.split_whitespace().filter(|w| w.starts_with('[')) {
                open.push(format!("{a}: {word}"));
            }
        }
    }
    open
}

impl ClusterClient {
    /// Writes `bench:<i>` = `value` for i in `range` with one pipeline of up to
    /// `batch` SETs per node at a time (routing by the current slot map).
    pub async fn load_pipelined(&mut self, range: std::ops::Range<usize>, value: &str, batch: usize) {
        let mut per_node: HashMap<SocketAddr, Vec<String>> = HashMap::new();
        for i in range {
            let key = format!("bench:{i}");
            let addr = self.slots[key_slot(&key) as usize].expect("slot map covers every slot");
            let keys = per_node.entry(addr).or_default();
            keys.push(key);
            if keys.len() >= batch {
                let keys = std::mem::take(keys);
                self.pipe_set(addr, &keys, value).await;
            }
        }
        for (addr, keys) in per_node {
            self.pipe_set(addr, &keys, value).await;
        }
    }

    async fn pipe_set(&mut self, addr: SocketAddr, keys: &[String], value: &str) {
        let mut c = self.conn(addr).await.expect("node reachable");
        let mut p = redis::pipe();
        for k in keys {
            p.cmd("SET").arg(k).arg(value).ignore();
        }
        let _: () = p.query_async(&mut c).await.expect("pipelined SETs");
    }
}

/// The local pool as the operator sees it through `tweak`, which edits every
/// listing (another address for a node, a wrong bus port, …).
pub struct Tweaked<F> {
    pub inner: Arc<LocalPool>,
    pub tweak: F,
}

impl<F: Fn(&mut Listing) + Send + Sync> NodePool for Tweaked<F> {
    async fn ensure(&self, tier: &TierConfig, shard: u32, ordinal: u32) -> cachetier_operator::Result<()> {
        self.inner.ensure(tier, shard, ordinal).await
    }
    async fn destroy(&self, name: &str) -> cachetier_operator::Result<()> {
        self.inner.destroy(name).await
    }
    async fn list(&self) -> cachetier_operator::Result<Listing> {
        let mut listing = self.inner.list().await?;
        (self.tweak)(&mut listing);
        Ok(listing)
    }
}
