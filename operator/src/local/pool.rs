//! The local node pool: each node is a `redis-server` process on this machine
//! with its own directory under one temporary root, its own client port and an
//! explicit cluster bus port (so bus ports never collide with client ports).
//!
//! Responsible for starting, stopping and listing processes and for cleaning up
//! after them (also on drop). Not responsible for cluster membership: a new
//! node is an empty, lonely master until the core makes it part of the cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::cluster::config::{NodeEndpoint, TierConfig, render_redis_conf};
use crate::cluster::health::probe;
use crate::cluster::pool::{Listing, NodePool, PendingNode, PoolNode, node_name};
use crate::{Error, Result};

/// Hands out (client port, bus port) pairs for new nodes.
pub trait PortSource: Send + Sync + fmt::Debug {
    /// The next free pair, or `None` when the range is exhausted.
    fn next_pair(&self) -> Option<(u16, u16)>;
}

/// Whether nothing listens on `port` of 127.0.0.1 right now.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Ports from `base` upward; the bus port is the client port + `bus_offset`.
/// Pairs where either port is taken are skipped.
#[derive(Debug)]
pub struct SequentialPorts {
    next: AtomicU32,
    end: u32,
    bus_offset: u16,
}

impl SequentialPorts {
    /// Ports `base..end`, bus ports at `+bus_offset`.
    pub fn new(base: u16, end: u16, bus_offset: u16) -> Self {
        Self {
            next: AtomicU32::new(u32::from(base)),
            end: u32::from(end),
            bus_offset,
        }
    }
}

impl PortSource for SequentialPorts {
    fn next_pair(&self) -> Option<(u16, u16)> {
        loop {
            let port = self.next.fetch_add(1, Ordering::Relaxed);
            if port >= self.end {
                return None;
            }
            let port = u16::try_from(port).ok()?;
            let bus = port.checked_add(self.bus_offset)?;
            if port_is_free(port) && port_is_free(bus) {
                return Some((port, bus));
            }
        }
    }
}

/// How local nodes are started.
#[derive(Debug, Clone)]
pub struct LocalPoolOptions {
    /// The `redis-server` program (looked up in `PATH` when it has no `/`).
    pub redis_server: PathBuf,
    /// Where ports come from.
    pub ports: Arc<dyn PortSource>,
    /// Parent of the pool's temporary root (default: the system temp dir).
    pub temp_parent: Option<PathBuf>,
    /// How long a new process may take to answer `PING` before its start
    /// counts as failed.
    pub start_timeout: Duration,
}

impl LocalPoolOptions {
    /// `redis-server` from `PATH`, ports from `base_port` upward, bus ports at
    /// client port + `bus_offset`.
    pub fn new(base_port: u16, bus_offset: u16) -> Self {
        let end = u16::MAX.saturating_sub(bus_offset);
        Self {
            redis_server: PathBuf::from("redis-server"),
            ports: Arc::new(SequentialPorts::new(base_port, end, bus_offset)),
            temp_parent: None,
            start_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct LocalNode {
    node: PoolNode,
    child: Child,
    dir: PathBuf,
    /// When it first answered `PING`; `None` while it is starting.
    started: Option<Instant>,
    /// When its process was started.
    since: Instant,
}

/// A pool of `redis-server` processes on 127.0.0.1.
#[derive(Debug)]
pub struct LocalPool {
    tier: String,
    binary: PathBuf,
    ports: Arc<dyn PortSource>,
    root: PathBuf,
    start_timeout: Duration,
    nodes: Mutex<BTreeMap<String, LocalNode>>,
    /// Names whose process is being started right now.
    creating: Mutex<std::collections::BTreeSet<String>>,
    /// Why the last start of a name failed, until its next `ensure`.
    failures: Mutex<BTreeMap<String, String>>,
}

/// Finds `program` the way a shell would.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

static POOLS: AtomicU32 = AtomicU32::new(0);

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

impl LocalPool {
    /// A pool for tier `tier`. Fails with [`Error::RedisServerMissing`] when
    /// the binary is not installed.
    pub fn new(tier: &str, options: LocalPoolOptions) -> Result<Self> {
        let binary = find_program(&options.redis_server).ok_or_else(|| Error::RedisServerMissing {
            binary: options.redis_server.display().to_string(),
        })?;
        let parent = options.temp_parent.clone().unwrap_or_else(std::env::temp_dir);
        let root = parent.join(format!(
            "cachetier-{tier}-{}-{}",
            std::process::id(),
            POOLS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&root).map_err(io(format!("cannot create {}", root.display())))?;
        Ok(Self {
            tier: tier.to_string(),
            binary,
            ports: options.ports,
            root,
            start_timeout: options.start_timeout,
            nodes: Mutex::new(BTreeMap::new()),
            creating: Mutex::new(std::collections::BTreeSet::new()),
            failures: Mutex::new(BTreeMap::new()),
        })
    }

    /// The directory holding every node's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, LocalNode>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the process of `name` is still running.
    pub fn is_running(&self, name: &str) -> bool {
        let mut nodes = self.lock();
        nodes
            .get_mut(name)
            .is_some_and(|n| matches!(n.child.try_wait(), Ok(None)))
    }

    /// Stops every process and removes every directory, including the root.
    pub async fn shutdown(&self) {
        let nodes: Vec<LocalNode> = std::mem::take(&mut *self.lock()).into_values().collect();
        for mut n in nodes {
            stop(&mut n).await;
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn stop(node: &mut LocalNode) {
    let _ = node.child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), node.child.wait()).await;
    let _ = tokio::fs::remove_dir_all(&node.dir).await;
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        // Children are spawned with kill_on_drop; the directories go here.
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Releases a name reserved for creation when the creation ends (or is dropped).
struct Creating<'a> {
    pool: &'a LocalPool,
    name: String,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.pool
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// How long a listing waits for a starting process's `PING`.
const START_PROBE: Duration = Duration::from_millis(200);

impl LocalPool {
    /// Waits until `name` runs and accepts connections (tests and tools
    /// that need a node right after [`NodePool::ensure`]).
    pub async fn wait_running(&self, name: &str, timeout: Duration) -> Result<PoolNode> {
        let deadline = Instant::now() + timeout;
        loop {
            let listing = self.list().await?;
            if let Some(node) = listing.nodes.into_iter().find(|n| n.name == name) {
                return Ok(node);
            }
            if let Some(detail) = self.failure(name) {
                return Err(Error::NodeStart {
                    name: name.to_string(),
                    detail,
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NodeStart {
                    name: name.to_string(),
                    detail: format!("not running after {timeout:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn failures(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failure(&self, name: &str) -> Option<String> {
        self.failures().get(name).cloned()
    }

    /// Starts the process of a new, empty node and records it as starting.
    async fn start(&self, tier: &TierConfig, name: String, shard: u32, ordinal: u32) -> Result<()> {
        let (port, bus_port) = self.ports.next_pair().ok_or_else(|| Error::NoFreePort {
            detail: format!("while creating {name}"),
        })?;
        let dir = self.root.join(format!("{name}-{port}"));
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("cannot create {}", dir.display())))?;
        let endpoint = NodeEndpoint {
            bind: "127.0.0.1".into(),
            port,
            bus_port,
            hostname: Some(name.clone()),
            // The name does not resolve on this machine: redirect by IP.
            prefer_hostname: false,
        };
        let conf = render_redis_conf(tier, &endpoint, &dir.display().to_string());
        let conf_path = dir.join("redis.conf");
        tokio::fs::write(&conf_path, conf)
            .await
            .map_err(io(format!("cannot write {}", conf_path.display())))?;
        let log = std::fs::File::create(dir.join("redis.log")).map_err(io("cannot create redis.log"))?;
        let log_err = log.try_clone().map_err(io("cannot open redis.log"))?;
        let child = Command::new(&self.binary)
            .arg(&conf_path)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::RedisServerMissing {
                        binary: self.binary.display().to_string(),
                    }
                } else {
                    Error::NodeStart {
                        name: name.clone(),
                        detail: e.to_string(),
                    }
                }
            })?;
        let pid = child.id();
        let node = PoolNode {
            name: name.clone(),
            shard,
            ordinal,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            bus_port,
            hostname: Some(name.clone()),
            pid,
            outdated: false,
            incarnation: format!("pid {} port {port}", pid.unwrap_or(0)),
            terminating: false,
        };
        let previous = self.lock().insert(
            name,
            LocalNode {
                node,
                child,
                dir,
                started: None,
                since: Instant::now(),
            },
        );
        if let Some(mut old) = previous {
            stop(&mut old).await;
        }
        Ok(())
    }

    /// Checks every starting process: one that answers runs from now on; one
    /// that exited or did not answer within the start timeout is removed and
    /// its failure kept for the next [`NodePool::ensure`] of its name.
    async fn settle_starting(&self) {
        let starting: Vec<(String, SocketAddr)> = self
            .lock()
            .values()
            .filter(|n| n.started.is_none())
            .map(|n| (n.node.name.clone(), n.node.addr))
            .collect();
        let probes = starting.iter().map(|(_, addr)| probe(*addr, START_PROBE));
        let answers = futures_util::future::join_all(probes).await;
        let mut failed = Vec::new();
        {
            let mut nodes = self.lock();
            for ((name, _), answer) in starting.iter().zip(answers) {
                let Some(n) = nodes.get_mut(name) else { continue };
                if let Ok(Some(status)) = n.child.try_wait() {
                    let detail = format!("exited with {status}: {}", log_tail(&n.dir));
                    failed.push((name.clone(), detail));
                } else if answer.is_ok() {
                    n.started = Some(Instant::now());
                } else if n.since.elapsed() > self.start_timeout {
                    let detail = format!(
                        "no answer on {} within {:?}: {}",
                        n.node.addr,
                        self.start_timeout,
                        log_tail(&n.dir)
                    );
                    failed.push((name.clone(), detail));
                }
            }
        }
        for (name, detail) in failed {
            let removed = self.lock().remove(&name);
            if let Some(mut node) = removed {
                stop(&mut node).await;
            }
            self.failures().insert(name, detail);
        }
    }
}

impl NodePool for LocalPool {
    /// Requests the node: a running or starting node of that name is left
    /// as it is (two operators may both ask for it); a dead one is replaced
    /// by a new, empty process on a new port, which is listed as pending
    /// until it answers `PING`. The failure of the previous start of this
    /// name is returned once, instead of starting again.
    async fn ensure(&self, tier: &TierConfig, shard: u32, ordinal: u32) -> Result<()> {
        let name = node_name(&self.tier, shard, ordinal);
        if let Some(n) = self.lock().get_mut(&name)
            && matches!(n.child.try_wait(), Ok(None))
        {
            return Ok(());
        }
        if let Some(detail) = self.failures().remove(&name) {
            return Err(Error::NodeStart { name, detail });
        }
        if !self
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone())
        {
            // Another caller is starting it right now.
            return Ok(());
        }
        let _reserved = Creating {
            pool: self,
            name: name.clone(),
        };
        self.start(tier, name, shard, ordinal).await
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let removed = self.lock().remove(name);
        if let Some(mut node) = removed {
            stop(&mut node).await;
        }
        Ok(())
    }

    async fn list(&self) -> Result<Listing> {
        self.settle_starting().await;
        let mut listing = Listing::default();
        for n in self.lock().values() {
            if n.started.is_some() {
                listing.nodes.push(n.node.clone());
            } else {
                listing.pending.push(PendingNode {
                    name: n.node.name.clone(),
                    shard: n.node.shard,
                    ordinal: n.node.ordinal,
                    detail: format!(
                        "starting for {:?} (pid {})",
                        n.since.elapsed(),
                        n.node.pid.unwrap_or(0)
                    ),
                });
            }
        }
        Ok(listing)
    }
}
