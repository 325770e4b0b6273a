//! Cluster topology: which shard owns each slot, and each shard's primary and
//! replicas. Discovered from the seeds with `CLUSTER SHARDS`, re-read
//! periodically and whenever a request meets a MOVED.
//!
//! Requests always read the current snapshot (an `Arc` swap under a short
//! lock); a refresh builds a new snapshot on the side and swaps it in, so it
//! never blocks a request. Node objects are kept across refreshes by address,
//! so their connections, health and read-gate state survive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::lock;
use crate::metrics::Metrics;
use crate::resp::Frame;
use crate::slot::SLOTS;
use crate::upstream::{self, Node, UpstreamSettings};

#[derive(Debug)]
pub struct Shard {
    pub primary: Arc<Node>,
    pub replicas: Vec<Arc<Node>>,
    /// Inclusive slot ranges.
    pub slots: Vec<(u16, u16)>,
}

/// One immutable snapshot of the cluster layout.
#[derive(Debug)]
pub struct Topology {
    /// Ordered by first slot, so indexes are stable across equal snapshots
    /// (the SCAN cursor relies on that).
    pub shards: Vec<Shard>,
    /// Shard index per slot; empty (every slot unassigned) before the first
    /// topology, so a new client's [`Snapshot`] costs no allocation.
    slot_map: Vec<u16>,
}

const UNASSIGNED: u16 = u16::MAX;

impl Topology {
    pub fn empty() -> Self {
        Topology {
            shards: Vec::new(),
            slot_map: Vec::new(),
        }
    }

    pub fn shard_index(&self, slot: u16) -> Option<usize> {
        match self.slot_map.get(usize::from(slot)) {
            Some(&i) if i != UNASSIGNED => Some(usize::from(i)),
            _ => None,
        }
    }

    pub fn shard(&self, slot: u16) -> Option<&Shard> {
        self.shard_index(slot).and_then(|i| self.shards.get(i))
    }

    pub fn is_known(&self) -> bool {
        !self.shards.is_empty()
    }

    /// Whether `addr` is one of the map's nodes.
    pub fn knows(&self, addr: &str) -> bool {
        self.shards
            .iter()
            .any(|s| s.primary.addr == addr || s.replicas.iter().any(|r| r.addr == addr))
    }

    /// Whether the node at `addr` is known not to be a primary: it is a
    /// replica, or absent from a map of every slot. A partial map (the best
    /// the registry could find; see [`Registry::refresh`]) need not show
    /// every primary, so absence from it says nothing.
    pub fn not_a_primary(&self, addr: &str) -> bool {
        let replica = self
            .shards
            .iter()
            .any(|s| s.replicas.iter().any(|r| r.addr == addr));
        let primary = self.shards.iter().any(|s| s.primary.addr == addr);
        replica || (self.is_complete() && !primary)
    }

    /// Every slot has a shard: the map shows every primary.
    pub fn is_complete(&self) -> bool {
        self.slot_map.len() == usize::from(SLOTS) && !self.slot_map.contains(&UNASSIGNED)
    }
}

/// Shard layout as parsed from `CLUSTER SHARDS`, before nodes are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub slots: Vec<(u16, u16)>,
    pub primary: String,
    pub replicas: Vec<String>,
}

impl ShardSpec {
    /// Every slot the shard claims (ranges clamped to the slot space).
    fn slot_iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.slots.iter().flat_map(|&(a, b)| a..=b.min(SLOTS - 1))
    }
}

/// One task's copy of the current topology, re-read only when the registry
/// installed a new one: a plain load per request instead of the registry's
/// lock and a reference count. Nodes' health lives in the nodes, so the
/// copy is never staler than the topology itself.
#[derive(Debug)]
pub struct Snapshot {
    generation: u64,
    topo: Arc<Topology>,
}

impl Default for Snapshot {
    /// Stale from the start: no registry generation is `u64::MAX`.
    fn default() -> Self {
        Snapshot {
            generation: u64::MAX,
            topo: Arc::new(Topology::empty()),
        }
    }
}

impl Snapshot {
    /// The registry generation of the copy (as of the last `get`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn get(&mut self, registry: &Registry) -> &Arc<Topology> {
        let generation = registry.generation.load(std::sync::atomic::Ordering::Acquire);
        if self.generation != generation {
            self.generation = generation;
            self.topo = registry.current();
        }
        &self.topo
    }
}

/// Holds the current topology and every node object, and refreshes them.
#[derive(Debug)]
pub struct Registry {
    current: RwLock<Arc<Topology>>,
    /// Bumped after each change of `current` (see [`Snapshot`]).
    generation: std::sync::atomic::AtomicU64,
    nodes: Mutex<HashMap<String, Arc<Node>>>,
    seeds: Vec<String>,
    settings: UpstreamSettings,
    metrics: Metrics,
    refresh_now: Notify,
    last_refresh: Mutex<Option<Instant>>,
    /// When a refresh last succeeded.
    last_ok: Mutex<Option<Instant>>,
    /// `redis_version` of the cluster's nodes, learned on the first refresh.
    version: Mutex<Option<String>>,
}

impl Registry {
    pub fn new(seeds: Vec<String>, settings: UpstreamSettings, metrics: Metrics) -> Arc<Self> {
        Arc::new(Registry {
            current: RwLock::new(Arc::new(Topology::empty())),
            generation: std::sync::atomic::AtomicU64::new(0),
            nodes: Mutex::new(HashMap::new()),
            seeds,
            settings,
            metrics,
            refresh_now: Notify::new(),
            last_refresh: Mutex::new(None),
            last_ok: Mutex::new(None),
            version: Mutex::new(None),
        })
    }

    pub fn current(&self) -> Arc<Topology> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Ask for a refresh soon (after a MOVED); returns immediately.
    pub fn request_refresh(&self) {
        self.refresh_now.notify_one();
    }

    /// A node object for `addr`, created on first use (MOVED/ASK targets may
    /// not be in the snapshot yet).
    pub fn node(&self, addr: &str) -> Arc<Node> {
        let mut nodes = lock(&self.nodes);
        nodes
            .entry(addr.to_string())
            .or_insert_with(|| Node::new(addr.to_string(), self.settings.clone()))
            .clone()
    }

    /// Read `CLUSTER SHARDS` from the known primaries and the seeds and install
    /// the first answer that covers every slot (or else the most complete one).
    pub async fn refresh(&self) -> Result<()> {
        *lock(&self.last_refresh) = Some(Instant::now());
        let mut candidates: Vec<String> = self
            .current()
            .shards
            .iter()
            .map(|s| s.primary.addr.clone())
            .collect();
        for s in &self.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let timeout = self.settings.response_timeout.max(Duration::from_secs(1));
        let mut last_err = String::from("no seeds configured");
        // A node that has just joined, or has not yet heard of a slot move, can
        // answer with a partial map. Take the first answer that covers every
        // slot; failing that, the one that covers the most.
        let mut best: Option<(usize, Vec<ShardSpec>)> = None;
        for addr in candidates {
            match upstream::oneshot_command(
                &addr,
                &["CLUSTER", "SHARDS"],
                timeout,
                self.settings.auth.as_ref(),
            )
            .await
            {
                Ok(frame) => match parse_shards(&frame, host_of(&addr)) {
                    Ok(specs) if !specs.is_empty() => {
                        let covered = slots_covered(&specs);
                        if covered == usize::from(SLOTS) {
                            best = Some((covered, specs));
                            break;
                        }
                        last_err = format!("{addr}: covers {covered} of {SLOTS} slots");
                        if best.as_ref().is_none_or(|(c, _)| covered > *c) {
                            best = Some((covered, specs));
                        }
                    }
                    Ok(_) => last_err = format!("{addr}: no shards with slots"),
                    Err(e) => last_err = format!("{addr}: {e}"),
                },
                Err(e) => last_err = format!("{addr}: {e}"),
            }
        }
        if let Some((_, specs)) = best {
            if lock(&self.version).is_none()
                && let Some(primary) = specs.first().map(|s| s.primary.clone())
            {
                self.learn_version(&primary, timeout).await;
            }
            self.install(specs);
            *lock(&self.last_ok) = Some(Instant::now());
            self.metrics.topology_refreshes.with_label_values(&["ok"]).inc();
            self.metrics.set_ready(true);
            return Ok(());
        }
        self.metrics
            .topology_refreshes
            .with_label_values(&["error"])
            .inc();
        Err(Error::NoTopology(last_err))
    }

    /// The upstream nodes' `redis_version`, once known.
    pub fn redis_version(&self) -> Option<String> {
        lock(&self.version).clone()
    }

    async fn learn_version(&self, addr: &str, timeout: Duration) {
        let info =
            upstream::oneshot_command(addr, &["INFO", "server"], timeout, self.settings.auth.as_ref()).await;
        if let Ok(Frame::Bulk(b) | Frame::Verbatim(b)) = info {
            let text = String::from_utf8_lossy(&b);
            let v = text
                .lines()
                .find_map(|l| l.trim_end().strip_prefix("redis_version:"))
                .map(str::to_string);
            *lock(&self.version) = v;
        }
    }

    /// Close every node's connections and stop their probes (shutdown).
    pub fn retire_all(&self) {
        for (_, n) in lock(&self.nodes).drain() {
            n.retire();
        }
    }

    fn install(&self, mut specs: Vec<ShardSpec>) {
        let old_primaries: Vec<String> = self
            .current()
            .shards
            .iter()
            .map(|s| s.primary.addr.clone())
            .collect();
        specs.sort_by_key(|s| s.slots.iter().map(|r| r.0).min().unwrap_or(0));
        let mut slot_map = vec![UNASSIGNED; usize::from(SLOTS)];
        let mut shards = Vec::with_capacity(specs.len());
        let mut nodes = lock(&self.nodes);
        let mut live: HashMap<String, Arc<Node>> = HashMap::new();
        let mut get = |addr: &str| -> Arc<Node> {
            let n = nodes
                .entry(addr.to_string())
                .or_insert_with(|| Node::new(addr.to_string(), self.settings.clone()))
                .clone();
            live.insert(addr.to_string(), n.clone());
            n
        };
        for (i, spec) in specs.into_iter().enumerate() {
            for s in spec.slot_iter() {
                slot_map[usize::from(s)] = i as u16;
            }
            let primary = get(&spec.primary);
            // A primary's reads are never gated.
            primary.set_gate(true);
            let replicas = spec
                .replicas
                .iter()
                .map(|r| {
                    let n = get(r);
                    // A demoted primary must pass the read gate like any replica.
                    if old_primaries.contains(r) {
                        n.set_gate(false);
                    }
                    n
                })
                .collect();
            shards.push(Shard {
                primary,
                replicas,
                slots: spec.slots,
            });
        }
        let gone: Vec<String> = nodes.keys().filter(|k| !live.contains_key(*k)).cloned().collect();
        for addr in gone {
            if let Some(n) = nodes.remove(&addr) {
                n.retire();
                let _ = self.metrics.node_serving.remove_label_values(&[&addr, "replica"]);
                let _ = self.metrics.node_serving.remove_label_values(&[&addr, "primary"]);
            }
        }
        drop(nodes);
        let topo = Arc::new(Topology { shards, slot_map });
        match self.current.write() {
            Ok(mut g) => *g = topo,
            Err(p) => *p.into_inner() = topo,
        }
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Background loop: refresh every `interval`, and soon after a MOVED or an
    /// upstream failure (at most every 500 ms).
    pub async fn run_refresh(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.refresh_now.notified() => {
                    let since = lock(&self.last_refresh).map(|t| t.elapsed());
                    if let Some(since) = since {
                        let min = Duration::from_millis(500);
                        if since < min {
                            tokio::time::sleep(min - since).await;
                        }
                    }
                }
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "topology refresh failed; keeping the previous topology");
                // Lost: no answer for three intervals (at least 3 s). Not
                // ready until a refresh succeeds again.
                let stale = (interval * 3).max(Duration::from_secs(3));
                if lock(&self.last_ok).is_none_or(|t| t.elapsed() > stale) {
                    self.metrics.set_ready(false);
                }
            }
        }
    }
}

/// Map-like frames come as RESP2 flat arrays or RESP3 maps.
fn pairs(f: &Frame) -> Option<Vec<(&Frame, &Frame)>> {
    match f {
        Frame::Map(p) => Some(p.iter().map(|(k, v)| (k, v)).collect()),
        Frame::Array(items) if items.len() % 2 == 0 => {
            Some(items.chunks(2).map(|c| (&c[0], &c[1])).collect())
        }
        _ => None,
    }
}

fn text(f: &Frame) -> Option<String> {
    match f {
        Frame::Bulk(b) | Frame::Simple(b) | Frame::Verbatim(b) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        Frame::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn get<'a>(pairs: &[(&'a Frame, &'a Frame)], key: &str) -> Option<&'a Frame> {
    pairs
        .iter()
        .find(|(k, _)| matches!(k, Frame::Bulk(b) | Frame::Simple(b) if b.as_ref() == key.as_bytes()))
        .map(|(_, v)| *v)
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// Distinct slots the shards claim.
fn slots_covered(specs: &[ShardSpec]) -> usize {
    let mut seen = vec![false; usize::from(SLOTS)];
    for s in specs.iter().flat_map(ShardSpec::slot_iter) {
        seen[usize::from(s)] = true;
    }
    seen.into_iter().filter(|&c| c).count()
}

/// Parse a `CLUSTER SHARDS` reply. Nodes reported as `failed` are left out;
/// `loading` nodes are kept (the read gate keeps reads off them). A node that
/// does not know its own address (a single-node cluster that never met a
/// peer reports an empty `ip`) is reached at `asked_host`, the host we asked.
pub fn parse_shards(f: &Frame, asked_host: &str) -> std::result::Result<Vec<ShardSpec>, String> {
    let Frame::Array(shards) = f else {
        if let Frame::Error(e) = f {
            return Err(String::from_utf8_lossy(e).into_owned());
        }
        return Err("CLUSTER SHARDS reply is not an array".into());
    };
    let mut out = Vec::new();
    for shard in shards {
        let p = pairs(shard).ok_or("shard is not a map")?;
        let slots = match get(&p, "slots") {
            Some(Frame::Array(s)) => s
                .chunks(2)
                .filter_map(|c| match c {
                    [Frame::Integer(a), Frame::Integer(b)] => Some((*a as u16, *b as u16)),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        let Some(Frame::Array(nodes)) = get(&p, "nodes") else {
            return Err("shard without nodes".into());
        };
        let mut primary = None;
        let mut replicas = Vec::new();
        for n in nodes {
            let np = pairs(n).ok_or("node is not a map")?;
            let field = |k: &str| get(&np, k).and_then(text).unwrap_or_default();
            if field("health") == "failed" {
                continue;
            }
            let host = match (field("endpoint").as_str(), field("ip").as_str()) {
                ("" | "?", "" | "?") => asked_host.to_string(),
                ("" | "?", ip) => ip.to_string(),
                (e, _) => e.to_string(),
            };
            let port = field("port");
            if host.is_empty() || port.is_empty() || port == "0" {
                continue;
            }
            let addr = format!("{host}:{port}");
            if field("role") == "master" {
                primary = Some(addr);
            } else {
                replicas.push(addr);
            }
        }
        if slots.is_empty() {
            continue;
        }
        let Some(primary) = primary else {
            continue;
        };
        out.push(ShardSpec {
            slots,
            primary,
            replicas,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn b(s: &str) -> Frame {
        Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn node(ip: &str, port: i64, role: &str, health: &str) -> Frame {
        Frame::Array(vec![
            b("id"),
            b("x"),
            b("port"),
            Frame::Integer(port),
            b("ip"),
            b(ip),
            b("endpoint"),
            b(ip),
            b("role"),
            b(role),
            b("replication-offset"),
            Frame::Integer(1),
            b("health"),
            b(health),
        ])
    }

    #[test]
    fn only_a_replica_or_a_node_absent_from_a_full_map_is_not_a_primary() {
        let settings = UpstreamSettings {
            response_timeout: std::time::Duration::from_secs(1),
            slow_timeout: std::time::Duration::from_secs(10),
            metrics: crate::metrics::Metrics::new().unwrap(),
            auth: None,
        };
        let registry = Registry::new(Vec::new(), settings.clone(), settings.metrics.clone());
        let spec = |slots, primary: &str, replica: &str| ShardSpec {
            slots: vec![slots],
            primary: primary.into(),
            replicas: vec![replica.into()],
        };
        registry.install(vec![spec((0, 8191), "a:1", "a:2")]);
        let partial = registry.current();
        assert!(partial.not_a_primary("a:2"));
        assert!(!partial.not_a_primary("a:1") && !partial.not_a_primary("b:1"));
        registry.install(vec![
            spec((0, 8191), "a:1", "a:2"),
            spec((8192, 16383), "b:1", "b:2"),
        ]);
        let full = registry.current();
        assert!(full.not_a_primary("c:1") && full.not_a_primary("b:2"));
        assert!(!full.not_a_primary("a:1") && !full.not_a_primary("b:1"));
    }

    #[test]
    fn cluster_shards_reply_becomes_shard_specs_without_failed_nodes() {
        let reply = Frame::Array(vec![Frame::Array(vec![
            b("slots"),
            Frame::Array(vec![
                Frame::Integer(0),
                Frame::Integer(5460),
                Frame::Integer(6000),
                Frame::Integer(6001),
            ]),
            b("nodes"),
            Frame::Array(vec![
                node("10.0.0.1", 7000, "master", "online"),
                node("10.0.0.2", 7001, "replica", "online"),
                node("10.0.0.3", 7002, "replica", "failed"),
                node("10.0.0.4", 7003, "replica", "loading"),
            ]),
        ])]);
        let specs = parse_shards(&reply, "seed").unwrap();
        assert_eq!(
            specs,
            vec![ShardSpec {
                slots: vec![(0, 5460), (6000, 6001)],
                primary: "10.0.0.1:7000".into(),
                replicas: vec!["10.0.0.2:7001".into(), "10.0.0.4:7003".into()],
            }]
        );
    }
}
