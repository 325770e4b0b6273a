//! `CacheTier.status`: what the operator observed. Everything here is computed
//! from observation of the running cluster, never from memory of what the
//! operator did.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the tier serves reads and writes for every slot.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the operator is changing the tier (bootstrap, reshard, replacing a node).
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: the tier serves, but with less redundancy or capacity than asked for.
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Observed state of a CacheTier.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheTierStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// One-word summary of the tier's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Standard conditions: `Ready`, `Progressing`, `Degraded` (and
    /// `SyncLoop` when a replica keeps restarting its full sync).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Shards that currently own slots (the scale subresource's current count).
    #[serde(default)]
    pub current_shards: i32,

    /// Label selector of the tier's pods (for the scale subresource and HPAs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Nodes that are Healthy and in their intended role.
    #[serde(default)]
    pub ready_nodes: i32,

    /// Nodes the spec asks for.
    #[serde(default)]
    pub total_nodes: i32,

    /// `readyNodes/totalNodes`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Hash slots (of 16384) owned by a reachable primary.
    #[serde(default)]
    pub slots_covered: i32,

    /// Per-shard detail: primary, replicas, slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,

    /// The most recent failover the operator saw or forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<FailoverRecord>,

    /// The most recent eviction of a failed replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_eviction: Option<EvictionRecord>,
}

/// One-word summary of a tier.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// Nodes are being created and the cluster formed.
    Bootstrapping,
    /// Every slot is served and every node is healthy.
    Ready,
    /// Slots are moving between shards, or replicas are being added or removed.
    Scaling,
    /// Every slot is served, but some node is failed or missing.
    Degraded,
    /// Some slot is not served.
    Unavailable,
    /// The spec is invalid; nothing is changed until it is fixed.
    Invalid,
}

/// One shard: a primary, its replicas and its slots.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard index (0-based, stable across failovers).
    pub index: i32,
    /// Slot ranges the shard owns, e.g. `0-5460`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<String>,
    /// The shard's nodes, primary first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
}

/// One Redis node as observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Pod name (Kubernetes) or process name (local mode).
    pub name: String,
    /// `host:port` clients use.
    pub address: String,
    /// Redis Cluster node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Role in the cluster.
    pub role: NodeRole,
    /// Result of the operator's probes.
    pub health: NodeHealth,
    /// Round-trip time of the last successful probe, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_micros: Option<i64>,
    /// Replicas only: bytes of the replication stream not yet applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// Whether the node may serve reads now (for a replica: link up, not syncing,
    /// not loading, lag within `readGate.maxLagBytes`).
    pub serving: bool,
    /// Why a node does not serve, e.g. `sync in progress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Role of a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum NodeRole {
    /// Owns slots and takes writes.
    Primary,
    /// Replicates a primary and may serve reads.
    Replica,
    /// Not (yet) part of the cluster.
    #[default]
    Unknown,
}

/// Health of a node from the operator's probes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum NodeHealth {
    /// The last probe succeeded.
    Healthy,
    /// The last probe failed, fewer than `failureThreshold` in a row.
    Suspect,
    /// `failureThreshold` or more probes in a row failed.
    Failed,
    /// Not probed yet.
    #[default]
    Unknown,
}

/// A failover: a replica became primary of a shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// When the operator saw it, RFC 3339.
    pub time: String,
    /// Shard index.
    pub shard: i32,
    /// The failed or demoted primary.
    pub from: String,
    /// The promoted replica.
    pub to: String,
    /// `Automatic` (Redis Cluster promoted), `Forced` (operator TAKEOVER) or `Planned`.
    pub reason: String,
}

/// An eviction: a failed replica was removed and replaced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvictionRecord {
    /// When, RFC 3339.
    pub time: String,
    /// Shard index.
    pub shard: i32,
    /// The evicted node.
    pub node: String,
    /// Why, e.g. `Failed for 5m0s`.
    pub reason: String,
}
