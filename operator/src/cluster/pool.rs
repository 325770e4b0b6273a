//! The node-pool abstraction: where nodes come from. The core asks a pool to
//! create the node for (shard, ordinal), to destroy one, and to list what
//! exists; local mode backs it with processes, Kubernetes with pods.
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
}

/// The name of the node for (shard, ordinal) of tier `tier`.
pub fn node_name(tier: &str, shard: u32, ordinal: u32) -> String {
    format!("{tier}-{shard}-{ordinal}")
}

/// Creates, destroys and lists the nodes of one tier.
pub trait NodePool: Send + Sync {
    /// Ensures the node for (`shard`, `ordinal`) runs with `tier`'s settings
    /// and returns once it accepts connections. A node of that name that
    /// already runs is returned unchanged (two reconcilers may ask at once);
    /// a new one is empty and knows no other node.
    fn create(
        &self,
        tier: &TierConfig,
        shard: u32,
        ordinal: u32,
    ) -> impl Future<Output = Result<PoolNode>> + Send;

    /// Stops the node named `name` and releases what it used. Destroying a node
    /// that does not exist is not an error.
    fn destroy(&self, name: &str) -> impl Future<Output = Result<()>> + Send;

    /// Every node of the tier that exists (running or not).
    fn list(&self) -> impl Future<Output = Result<Vec<PoolNode>>> + Send;
}
