//! `CacheTier.spec`: what the user asks for.
//!
//! Every field's doc comment becomes its schema description, so these comments are
//! written for the person reading `kubectl explain cachetier.spec`.

// Each `printcolumn(...)` of the derive repeats keys such as `type_ = "integer"`;
// clippy reads those as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint};
use kube::core::Rule;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::CacheTierStatus;

mod parts;
pub use parts::*;

/// Redis settings the operator owns. A `redisConfig` entry naming one of these (or
/// any `cluster-*` setting) is rejected: the operator must be able to rely on them.
pub const OPERATOR_OWNED_SETTINGS: &[&str] = &[
    "port",
    "bind",
    "dir",
    "dbfilename",
    "appendfilename",
    "daemonize",
    "pidfile",
    "logfile",
    "replicaof",
    "slaveof",
    "masterauth",
    "masteruser",
    "requirepass",
    "rename-command",
    "include",
    "maxmemory",
    "maxmemory-policy",
    "protected-mode",
    "unixsocket",
    "tls-port",
    "aclfile",
];

/// The shape of every duration in this resource (a Go duration: `500ms`, `1h30m`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// The shape of `maxMemory`: whole bytes with an optional binary or decimal suffix.
pub const MEMORY_PATTERN: &str = r"^[1-9][0-9]*(Ki|Mi|Gi|Ti|k|M|G|T)?$";

/// The CEL rule that rejects operator-owned settings in `redisConfig`. Kept in one
/// place so the list in the rule and [`OPERATOR_OWNED_SETTINGS`] cannot drift.
///
/// The rule is a key check per entry (`in` a constant list, `startsWith` a
/// constant prefix), so its cost grows with the number of entries only, which
/// the schema bounds. It matches names as written: lower-casing every key in CEL
/// is what blew the API server's cost budget, so `PORT` is caught by
/// [`crate::validate`] (the operator and local mode) instead.
fn redis_config_rule() -> Rule {
    let owned = OPERATOR_OWNED_SETTINGS
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // The message lists the offending names from the constant list (sizes known
    // to the estimator), not from the user's keys.
    Rule::new(format!(
        "self.all(k, !(k in [{owned}]) && !k.startsWith('cluster-'))"
    ))
    .message(kube::core::Message::Expression(format!(
        "'redisConfig may not set settings the operator owns: ' + ([{owned}].filter(s, s in self) \
             + (self.exists(k, k.startsWith('cluster-')) ? ['cluster-*'] : [])).join(', ')"
    )))
}

/// A CEL rule on a duration field that first checks the field's pattern, so a
/// malformed value gets only the schema's pattern message and not also a CEL
/// "type conversion error" from `duration()`.
fn duration_rule(field: &str, bounds: &str, message: &str) -> Rule {
    let pattern = DURATION_PATTERN.replace('\\', "\\\\");
    Rule::new(format!("!self.{field}.matches('{pattern}') || ({bounds})"))
        .message(message)
        .field_path(format!(".{field}"))
}

/// `maxMemory` below `resources.limits.memory`. Every value it reads is bounded
/// by the schema (`maxMemory` and each quantity at most 32 characters, `limits`
/// at most 16 entries), and `isQuantity` guards keep a malformed value to its
/// schema message. `string()` accepts a limit written as a plain integer.
fn max_memory_headroom_rule() -> Rule {
    let limit = "string(self.resources.limits.memory)";
    Rule::new(format!(
        "!has(self.resources) || !has(self.resources.limits) || !('memory' in self.resources.limits) \
         || !isQuantity(self.maxMemory) || !isQuantity({limit}) \
         || quantity(self.maxMemory).isLessThan(quantity({limit}))"
    ))
    .message(
        "maxMemory must be below resources.limits.memory: Redis needs headroom above maxmemory \
         for replication buffers and fragmentation",
    )
    .field_path(".maxMemory")
}

/// A cache layer: a Redis Cluster of `shards` × (1 primary + `replicasPerShard`
/// replicas), with a health model, a replica read gate and an optional sidecar
/// local cache for hot keys.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cachetier.io",
    version = "v1alpha1",
    kind = "CacheTier",
    namespaced,
    shortname = "ct",
    category = "cachetier",
    doc = "CacheTier is one Redis cache layer: a Redis Cluster node pool run by the cachetier operator.",
    status = "CacheTierStatus",
    derive = "PartialEq",
    cel,
    scale(
        spec_replicas_path = ".spec.shards",
        status_replicas_path = ".status.currentShards",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Shards",
        type_ = "integer",
        json_path = ".spec.shards",
        description = "Desired shard count"
    ),
    printcolumn(
        name = "Replicas/Shard",
        type_ = "integer",
        json_path = ".spec.replicasPerShard",
        description = "Replicas per shard"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready nodes / total nodes"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.sidecar.readPolicy != 'replicasOnly' || self.replicasPerShard >= 1")
        .message("sidecar.readPolicy replicasOnly needs replicasPerShard >= 1: with no replicas every read would fall back to the primary")
        .field_path(".sidecar.readPolicy"),
    validation = max_memory_headroom_rule(),
    validation = Rule::new("self.podDisruptionBudget.maxUnavailable <= self.shards * (1 + self.replicasPerShard)")
        .message("podDisruptionBudget.maxUnavailable cannot exceed the number of nodes (shards * (1 + replicasPerShard))")
        .field_path(".podDisruptionBudget.maxUnavailable"),
    // A StatefulSet's volumeClaimTemplates cannot change.
    validation = Rule::new("has(self.persistence) == has(oldSelf.persistence) && (!has(self.persistence) || self.persistence == oldSelf.persistence)")
        .message("persistence cannot be added, removed or changed on an existing tier (StatefulSet volume claims are immutable): create a new tier")
        .field_path(".persistence")
)]
pub struct CacheTierSpec {
    /// Number of shards (primaries). The 16384 hash slots are spread evenly across
    /// them. Changing it reshards the tier live; the scale subresource
    /// (`kubectl scale cachetier/NAME --replicas=N`, or an HPA) changes this field.
    #[schemars(range(min = 1, max = 1000))]
    pub shards: i32,

    /// Replicas per shard. Reads are balanced across the serving replicas of a
    /// shard; a replica also takes over when its primary fails.
    #[serde(default = "default_replicas_per_shard")]
    #[schemars(range(min = 0, max = 5))]
    pub replicas_per_shard: i32,

    /// Redis server image for the cluster nodes (Redis 7 or newer). Without
    /// it, the operator's `--redis-image` (default `redis:7.2`); changing
    /// either rolls the pods one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Compute resources of each Redis container. Set `limits.memory` above
    /// `maxMemory`: replication buffers and fragmentation live outside maxmemory.
    /// At most 16 requests and 16 limits, each quantity at most 32 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::bounds::resource_requirements)]
    pub resources: Option<ResourceRequirements>,

    /// Memory Redis may use for data on each node (`maxmemory`), as a whole number
    /// of bytes with an optional binary or decimal suffix: `512Mi`, `4Gi`, `1G`.
    /// Required: a cache without a bound is an outage waiting to happen. The
    /// replication backlog and replica output buffers are sized from it so that a
    /// full sync succeeds the first time.
    #[schemars(length(min = 1, max = 32), regex(pattern = MEMORY_PATTERN))]
    pub max_memory: String,

    /// What Redis evicts when `maxMemory` is reached (`maxmemory-policy`).
    #[serde(default)]
    pub max_memory_policy: MaxMemoryPolicy,

    /// Extra redis.conf settings, directive name to value, e.g.
    /// `{"hz": "20", "repl-backlog-size": "256mb"}`: at most 64 entries, each value
    /// at most 1024 characters. Settings the operator owns (ports, addresses, files,
    /// replication, auth, maxmemory, `cluster-*`, …) are rejected. The API server
    /// matches their names as written; the operator also refuses them in any
    /// letter case (`PORT`), with a message naming them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = crate::bounds::redis_config)]
    #[x_kube(validation = redis_config_rule())]
    pub redis_config: BTreeMap<String, String>,

    /// Password (and optionally ACL user) that clients and replicas use, read from
    /// a Secret in the tier's namespace. Without it the tier has no password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,

    /// How the operator probes node health and when it replaces failed nodes.
    #[serde(default)]
    pub health: HealthSpec,

    /// When a replica is allowed to serve reads.
    #[serde(default)]
    pub read_gate: ReadGateSpec,

    /// The proxy injected next to application containers.
    #[serde(default)]
    pub sidecar: SidecarSpec,

    /// Node labels a Redis pod's node must have (passed to the pod spec).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the Redis pods (passed to the pod spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity of the Redis pods (passed to the pod spec). Without it, the
    /// operator spreads a shard's nodes across Kubernetes nodes on a best-effort basis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Topology spread constraints of the Redis pods (passed to the pod spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,

    /// The PodDisruptionBudget the operator creates for the tier's pods.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// How the operator spreads Redis pods over Kubernetes nodes when `affinity`
    /// is not set: `shard` (default) prefers different nodes for the pods of one
    /// shard, so losing a node never takes a primary and its replicas; `tier`
    /// prefers different nodes for every pod of the tier; `none` adds nothing.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,

    /// PriorityClass of the Redis pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Secrets for pulling `image` from a private registry (names in the
    /// tier's namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub image_pull_secrets: Vec<String>,

    /// Extra labels on the Redis pods. The operator's own labels
    /// (`cachetier.io/*`, `app.kubernetes.io/*`) win over these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// Extra annotations on the Redis pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// A persistent volume per node for Redis's data directory (`nodes.conf`,
    /// and the RDB/AOF files when `redisConfig` turns on `save` or
    /// `appendonly`). Without it (the default for a cache) the directory is
    /// an `emptyDir`: a pod recreated on another node starts empty and
    /// full-syncs from its shard. With it, a restarted pod keeps its cluster
    /// identity and data; a node the operator replaces (eviction, rollout)
    /// gets a fresh volume, and scaling in or deleting the tier deletes the
    /// volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<PersistenceSpec>,

    /// Escape hatch for pod settings this spec does not model: a
    /// strategic-merge patch (as `kubectl patch --type strategic` takes it)
    /// applied last to the Redis pods' template, shaped like a pod template:
    /// `{metadata: {...}, spec: {...}}`. Lists merge by their Kubernetes key
    /// (containers, volumes and env by `name`, volumeMounts by `mountPath`,
    /// ports by `containerPort`), `null` removes a field, `$patch: delete`
    /// removes a list item and `$patch: replace` replaces a map. The
    /// operator's own labels still win, and the result must be a valid pod
    /// template. Changing the Redis container's command, ports or volumes
    /// can break the tier: prefer the modelled fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::bounds::free_form_object")]
    pub pod_overrides: Option<serde_json::Value>,
}

/// Default spreading of a tier's Redis pods over Kubernetes nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AntiAffinity {
    /// Prefer different Kubernetes nodes for the pods of one shard.
    #[default]
    Shard,
    /// Prefer different Kubernetes nodes for every pod of the tier.
    Tier,
    /// No anti-affinity from the operator.
    None,
}

fn default_replicas_per_shard() -> i32 {
    1
}

/// The Redis image used when neither `spec.image` nor the operator's
/// `--redis-image` is set.
pub const DEFAULT_IMAGE: &str = "redis:7.2";

/// Redis `maxmemory-policy`: which keys Redis evicts when memory is full.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MaxMemoryPolicy {
    /// Evict the least recently used keys (the usual choice for a cache).
    #[default]
    AllkeysLru,
    /// Evict the least frequently used keys.
    AllkeysLfu,
    /// Evict random keys.
    AllkeysRandom,
    /// Evict the least recently used keys among those with a TTL.
    VolatileLru,
    /// Evict the least frequently used keys among those with a TTL.
    VolatileLfu,
    /// Evict random keys among those with a TTL.
    VolatileRandom,
    /// Evict the keys with the nearest expiry.
    VolatileTtl,
    /// Evict nothing: writes fail once memory is full.
    Noeviction,
}

impl MaxMemoryPolicy {
    /// The value as redis.conf spells it.
    pub fn as_redis(self) -> &'static str {
        match self {
            Self::AllkeysLru => "allkeys-lru",
            Self::AllkeysLfu => "allkeys-lfu",
            Self::AllkeysRandom => "allkeys-random",
            Self::VolatileLru => "volatile-lru",
            Self::VolatileLfu => "volatile-lfu",
            Self::VolatileRandom => "volatile-random",
            Self::VolatileTtl => "volatile-ttl",
            Self::Noeviction => "noeviction",
        }
    }
}

impl CacheTierSpec {
    /// Nodes in the tier: `shards × (1 + replicasPerShard)`.
    pub fn total_nodes(&self) -> i64 {
        i64::from(self.shards) * (1 + i64::from(self.replicas_per_shard))
    }

    /// `maxMemory` in bytes. The schema pattern guarantees the shape; `None` only
    /// for a value that overflows 64 bits.
    pub fn max_memory_bytes(&self) -> Option<u64> {
        parse_memory(&self.max_memory)
    }
}

/// Parses a memory size as `maxMemory` accepts it (`512Mi`, `4Gi`, `1G`, `1000`).
pub fn parse_memory(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_with_binary_and_decimal_suffixes() {
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory("1000"), Some(1000));
        assert_eq!(parse_memory("1Pi"), None);
        assert_eq!(parse_memory("99999999999999Ti"), None);
    }
}
