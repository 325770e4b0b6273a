//! The parts of a CacheTier spec: auth, health probing, the read gate, the
//! sidecar and its local cache, persistence, the disruption budget.

use kube::KubeSchema;
use kube::core::Duration;
use serde::{Deserialize, Serialize};

use super::*;

/// Credentials for the tier, read from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Name of the Secret, in the tier's namespace, that holds the credentials.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key in the Secret whose value is the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
    /// Key in the Secret whose value is the ACL user name. Without it the
    /// `default` user is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: Option<String>,
}

fn default_password_key() -> String {
    "password".to_string()
}

/// Node health probing and the replacement of failed nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = duration_rule(
        "probeInterval",
        "duration(self.probeInterval) >= duration('100ms') && duration(self.probeInterval) <= duration('1m')",
        "health.probeInterval must be between 100ms and 1m",
    ),
    validation = duration_rule(
        "responseTimeout",
        "duration(self.responseTimeout) >= duration('10ms') && duration(self.responseTimeout) <= duration('30s')",
        "health.responseTimeout must be between 10ms and 30s",
    ),
    validation = duration_rule(
        "evictAfter",
        "duration(self.evictAfter) >= duration('10s')",
        "health.evictAfter must be at least 10s: shorter would replace replicas on a blip",
    )
)]
pub struct HealthSpec {
    /// How often every node is probed (TCP connect + PING). Durations in this
    /// resource are Go durations: `500ms`, `1s`, `5m`, `1h30m`.
    #[serde(default = "one_second")]
    #[schemars(length(min = 1, max = 32), regex(pattern = DURATION_PATTERN))]
    pub probe_interval: Duration,
    /// A node that has not answered a probe within this time has failed that
    /// probe; the sidecar closes an upstream connection whose oldest request has
    /// waited this long. The published lesson: no reply within one second means
    /// the connection is bad, not slow.
    #[serde(default = "one_second")]
    #[schemars(length(min = 1, max = 32), regex(pattern = DURATION_PATTERN))]
    pub response_timeout: Duration,
    /// Consecutive failed probes after which a node is Failed (before that it is
    /// Suspect).
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 10))]
    pub failure_threshold: i32,
    /// How long a Failed replica may stay before it is removed from the cluster
    /// and replaced by a fresh replica of the same shard.
    #[serde(default = "default_evict_after")]
    #[schemars(length(min = 1, max = 32), regex(pattern = DURATION_PATTERN))]
    pub evict_after: Duration,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            probe_interval: one_second(),
            response_timeout: one_second(),
            failure_threshold: default_failure_threshold(),
            evict_after: default_evict_after(),
        }
    }
}

fn one_second() -> Duration {
    std::time::Duration::from_secs(1).into()
}

fn default_failure_threshold() -> i32 {
    3
}

fn default_evict_after() -> Duration {
    std::time::Duration::from_secs(300).into()
}

/// When a replica may serve reads. A replica that is loading its dataset, doing a
/// full sync, has its link to the primary down, or lags further than
/// `maxLagBytes` serves **no** reads until it has caught up: sending reads to a
/// recovering replica is what made failed replicas fail again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadGateSpec {
    /// Largest replication lag, in bytes of the replication stream, at which a
    /// replica still serves reads.
    #[serde(default = "default_max_lag_bytes")]
    #[schemars(range(min = 0))]
    pub max_lag_bytes: i64,
}

impl Default for ReadGateSpec {
    fn default() -> Self {
        Self {
            max_lag_bytes: default_max_lag_bytes(),
        }
    }
}

fn default_max_lag_bytes() -> i64 {
    1024 * 1024
}

/// Where the sidecar sends reads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ReadPolicy {
    /// A uniformly random serving replica per request (not per connection).
    #[default]
    Random,
    /// Two random serving replicas; the one with fewer requests in flight.
    BestOfTwo,
    /// Every read goes to the shard's primary.
    Primary,
    /// Replicas only; the primary serves a read only when no replica is serving
    /// (counted in a metric).
    ReplicasOnly,
}

/// The proxy injected next to application containers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Port on localhost where the application connects with a plain Redis client.
    #[serde(default = "default_sidecar_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Where reads go.
    #[serde(default)]
    pub read_policy: ReadPolicy,
    /// Read your own writes: after a client writes a key, its reads of that
    /// key's slot go to the primary until a replica has caught up with the write,
    /// so a client never reads an older value than the one it just wrote. Turn
    /// off only where stale reads right after a write are acceptable.
    #[serde(default = "default_true")]
    pub read_your_writes: bool,
    /// A MULTI/EXEC whose keys span hash slots (a Django or Laravel cache's
    /// set-many) runs as one transaction per slot, each atomic on its node
    /// but not with the others, and WATCH may name keys of several slots (RQ
    /// does). Turn off to refuse such transactions and watches with
    /// CROSSSLOT, as Redis Cluster does.
    #[serde(default = "default_true")]
    pub split_transactions: bool,
    /// The in-process cache for hot keys.
    #[serde(default)]
    pub local_cache: LocalCacheSpec,
    /// Compute resources of the sidecar container (at most 16 requests and 16
    /// limits, each quantity at most 32 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = crate::bounds::resource_requirements)]
    pub resources: Option<ResourceRequirements>,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        Self {
            port: default_sidecar_port(),
            read_policy: ReadPolicy::default(),
            read_your_writes: true,
            split_transactions: true,
            local_cache: LocalCacheSpec::default(),
            resources: None,
        }
    }
}

fn default_sidecar_port() -> i32 {
    6379
}

fn default_true() -> bool {
    true
}

/// The sidecar's local cache: hot keys under the configured prefixes are served
/// from memory for at most `ttl`. Entries are invalidated by writes through the
/// sidecar and, through Redis server-assisted tracking, by anyone else's writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.enabled || (has(self.keyPrefixes) && size(self.keyPrefixes) > 0)")
        .message("sidecar.localCache.enabled needs at least one keyPrefixes entry: only opted-in prefixes are cached")
        .field_path(".keyPrefixes"),
    validation = duration_rule(
        "ttl",
        "duration(self.ttl) > duration('0s') && duration(self.ttl) <= duration('1h')",
        "sidecar.localCache.ttl must be more than 0s and at most 1h",
    )
)]
pub struct LocalCacheSpec {
    /// Turns the local cache on.
    #[serde(default)]
    pub enabled: bool,
    /// Key prefixes whose values may be cached, e.g. `product:`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub key_prefixes: Vec<String>,
    /// Longest time an entry is served from the local cache (at most 1h).
    #[serde(default = "default_cache_ttl")]
    #[schemars(length(min = 1, max = 32), regex(pattern = DURATION_PATTERN))]
    pub ttl: Duration,
    /// Upper bound of the cache's size in bytes (keys and values).
    #[serde(default = "default_cache_max_bytes")]
    #[schemars(range(min = 1024))]
    pub max_bytes: i64,
}

impl Default for LocalCacheSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            key_prefixes: Vec::new(),
            ttl: default_cache_ttl(),
            max_bytes: default_cache_max_bytes(),
        }
    }
}

fn default_cache_ttl() -> Duration {
    std::time::Duration::from_secs(60).into()
}

fn default_cache_max_bytes() -> i64 {
    64 * 1024 * 1024
}

/// One PersistentVolumeClaim per Redis node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceSpec {
    /// Size of each node's volume, like `maxMemory` (`8Gi`). With `appendonly`
    /// or `save` on, allow a few times `maxMemory` (rewrites need room).
    #[schemars(length(min = 1, max = 32), regex(pattern = MEMORY_PATTERN))]
    pub size: String,

    /// StorageClass of the volumes; the cluster's default class without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// The PodDisruptionBudget of the tier's pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// How many of the tier's pods a voluntary disruption (node drain) may take
    /// down at once.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
        }
    }
}

fn default_max_unavailable() -> i32 {
    1
}
