//! The node-pool abstraction: where nodes come from. The core asks a pool to
//! ensure the node for (shard, ordinal) exists, to destroy one, and to list
//! what exists; local mode backs it with processes, Kubernetes with pods.
//!
//! The contract is asynchronous: [`NodePool::ensure`] only *requests* a node
//! and returns at once; a requested node that does not run yet (a Pending pod,
//! a process still starting) is listed as [`PendingNode`], "expected, not
//! present", so a slow start never blocks the rest of a round. A node is its
//! name plus an incarnation (pod UID, process start), never its address:
//! addresses are read again from every listing.
//!
//! A pool knows which shard a node was created for, not what role it has now:
//! roles, slots and replication are observed from Redis itself.

use std::future::Future;
use std::net::SocketAddr;

use super::config::TierConfig;
use crate::Result;

/// One node as the pool knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolNode {
    /// Stable name: `{tier}-{shard}-{ordinal}` (the pod name on Kubernetes).
    pub name: String,
    /// The shard the node was created for.
    pub shard: u32,
    /// Position within its shard; ordinal 0 is the shard's first primary.
    pub ordinal: u32,
    /// Where clients reach it.
    pub addr: SocketAddr,
    /// Its cluster bus port (`CLUSTER MEET` needs it when it is not port + 10000).
    pub bus_port: u16,
    /// Hostname the node announces to the cluster, when the backend has one.
    pub hostname: Option<String>,
    /// Process id (local backend only), for tests that stop or kill a node.
    pub pid: Option<u32>,
    /// The backend runs this node from an outdated definition (Kubernetes: a
    /// pod of an older StatefulSet revision, e.g. a previous image). The core
    /// replaces it gracefully, one node at a time, like a restart-only setting.
    pub outdated: bool,
    /// This life of the node (Kubernetes: the pod UID; local: the process
    /// start). A node recreated under the same name has a new incarnation,
    /// and nothing learned about the old one (health, connections) applies.
    pub incarnation: String,
    /// The node is going away (a pod being deleted): it still answers, so it
    /// is observed, but it is never chosen as a primary or a sync source and
    /// it is not requested again until it is gone.
    pub terminating: bool,
}

impl PoolNode {
    /// The name the node announces to the cluster (`cluster-announce-hostname`,
    /// shown in `CLUSTER NODES`): its hostname (a pod's DNS name), else its
    /// pool name. This is how an old cluster id is matched to the name that
    /// now runs a new node.
    pub fn announced(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }
}

/// A node that was requested but does not run yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingNode {
    /// Its name, as [`node_name`] builds it.
    pub name: String,
    /// The shard it was requested for.
    pub shard: u32,
    /// Its position within the shard.
    pub ordinal: u32,
    /// Why it does not run yet, in the backend's words (e.g. `Unschedulable:
    /// 0/3 nodes are available`), for the tier's status.
    pub detail: String,
}

/// What a pool holds right now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    /// Nodes that run and have an address (including terminating ones).
    pub nodes: Vec<PoolNode>,
    /// Nodes requested but not running yet.
    pub pending: Vec<PendingNode>,
}

impl Listing {
    /// Whether the pool has (or expects) a node for (`shard`, `ordinal`).
    pub fn has(&self, shard: u32, ordinal: u32) -> bool {
        self.nodes
            .iter()
            .any(|n| (n.shard, n.ordinal) == (shard, ordinal))
            || self
                .pending
                .iter()
                .any(|n| (n.shard, n.ordinal) == (shard, ordinal))
    }
}

/// The name of the node for (shard, ordinal) of tier `tier`.
pub fn node_name(tier: &str, shard: u32, ordinal: u32) -> String {
    format!("{tier}-{shard}-{ordinal}")
}

/// Creates, destroys and lists the nodes of one tier.
pub trait NodePool: Send + Sync {
    /// Requests the node for (`shard`, `ordinal`) with `tier`'s settings and
    /// returns at once, without waiting for it to run: it is listed as
    /// pending until it does. Requesting a node that exists or is already
    /// requested changes nothing (two reconcilers may ask at once); a new one
    /// is empty and knows no other node. An error says the request itself
    /// failed, or the previous attempt to start this node did.
    fn ensure(&self, tier: &TierConfig, shard: u32, ordinal: u32) -> impl Future<Output = Result<()>> + Send;

    /// Stops the node named `name` and releases what it used. Destroying a node
    /// that does not exist is not an error.
    fn destroy(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Every node of the tier that runs, and every one requested but not yet
    /// running.
    fn list(&self) -> impl Future<Output = Result<Listing>> + Send;
}
