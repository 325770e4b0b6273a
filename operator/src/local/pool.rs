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
use crate::cluster::pool::{NodePool, PoolNode, node_name};
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
    /// How long a new process may take to answer `PING`.
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

impl NodePool for LocalPool {
    /// Ensures the node runs: a running node of that name is returned as it
    /// is (two operators may both ask for it), a dead one is replaced by a
    /// new, empty process on a new port, and a name already being started
    /// is an error to retry.
    async fn create(&self, tier: &TierConfig, shard: u32, ordinal: u32) -> Result<PoolNode> {
        let name = node_name(&self.tier, shard, ordinal);
        if let Some(n) = self.lock().get_mut(&name)
            && matches!(n.child.try_wait(), Ok(None))
        {
            return Ok(n.node.clone());
        }
        if !self
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone())
        {
            return Err(Error::NodeStart {
                name,
                detail: "already being started".into(),
            });
        }
        let _reserved = Creating {
            pool: self,
            name: name.clone(),
        };
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
        let mut child = Command::new(&self.binary)
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
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let deadline = Instant::now() + self.start_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let detail = format!("exited with {status}: {}", log_tail(&dir));
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(Error::NodeStart { name, detail });
            }
            if probe(addr, Duration::from_millis(500)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let detail = format!(
                    "no answer on {addr} within {:?}: {}",
                    self.start_timeout,
                    log_tail(&dir)
                );
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(Error::NodeStart { name, detail });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let node = PoolNode {
            name: name.clone(),
            shard,
            ordinal,
            addr,
            bus_port,
            hostname: Some(name.clone()),
            pid: child.id(),
            outdated: false,
        };
        let previous = self.lock().insert(
            name,
            LocalNode {
                node: node.clone(),
                child,
                dir,
            },
        );
        if let Some(mut old) = previous {
            stop(&mut old).await;
        }
        Ok(node)
    }

    async fn destroy(&self, name: &str) -> Result<()> {
        let removed = self.lock().remove(name);
        if let Some(mut node) = removed {
            stop(&mut node).await;
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<PoolNode>> {
        Ok(self.lock().values().map(|n| n.node.clone()).collect())
    }
}
