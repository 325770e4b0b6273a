//! The tier as the core needs it: sizes, memory, health and timing settings
//! taken from a validated `CacheTierSpec`, plus the redis.conf every node gets.
//!
//! Responsible for the replication buffer sizing rule (see `docs/cluster.md`)
//! and for which settings the operator owns. Not responsible for validating the
//! spec (that is `cachetier_crds::validate`) or for where a node runs (the pool).

use std::collections::BTreeMap;
use std::time::Duration;

use cachetier_crds::CacheTier;
use cachetier_crds::validate::Invalid;

use crate::Result;

/// Probe settings (`spec.health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// How often every node is probed.
    pub probe_interval: Duration,
    /// A probe not answered within this time has failed.
    pub response_timeout: Duration,
    /// Consecutive failed probes that make a node Failed.
    pub failure_threshold: u32,
    /// How long a Failed replica stays before it is replaced.
    pub evict_after: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            failure_threshold: 3,
            evict_after: Duration::from_secs(300),
        }
    }
}

/// Timings that are not part of the API but that tests shorten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `cluster-node-timeout` of every node.
    pub node_timeout: Duration,
    /// Extra time Redis Cluster gets to promote a replica on its own before the
    /// operator forces a `CLUSTER FAILOVER TAKEOVER`.
    pub failover_margin: Duration,
    /// Pause between reconcile rounds once the tier has converged.
    pub resync_interval: Duration,
    /// Keys moved per `MIGRATE` call.
    pub migrate_batch: usize,
    /// Timeout Redis applies to one `MIGRATE` call.
    pub migrate_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            node_timeout: Duration::from_secs(5),
            failover_margin: Duration::from_secs(5),
            resync_interval: Duration::from_millis(500),
            migrate_batch: 200,
            migrate_timeout: Duration::from_secs(10),
        }
    }
}

/// Credentials every node requires and every operator connection presents
/// (`spec.auth`; the controller reads them from the Secret, local mode from
/// an environment variable or a file).
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    /// ACL user; `None` is Redis's `default` user (`requirepass`).
    pub username: Option<String>,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Everything the core needs to know about one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierConfig {
    /// `metadata.name`; node names start with it.
    pub name: String,
    /// `metadata.generation`, echoed as `observedGeneration`.
    pub generation: Option<i64>,
    /// Desired shard count.
    pub shards: u32,
    /// Desired replicas per shard.
    pub replicas_per_shard: u32,
    /// `maxmemory` of every node, in bytes.
    pub max_memory_bytes: u64,
    /// `maxmemory-policy`, as redis.conf spells it.
    pub max_memory_policy: String,
    /// The user's extra redis.conf settings (already validated).
    pub redis_config: BTreeMap<String, String>,
    /// Probe settings.
    pub health: HealthConfig,
    /// Largest lag, in bytes, at which a replica still serves reads.
    pub max_lag_bytes: u64,
    /// Internal timings.
    pub timing: Timing,
    /// Credentials, when `spec.auth` is set and resolved.
    pub auth: Option<Auth>,
}

impl TierConfig {
    /// Takes the settings of a validated CacheTier, with default [`Timing`].
    pub fn from_tier(tier: &CacheTier) -> Result<Self> {
        let spec = &tier.spec;
        let invalid = |p: &str| Invalid {
            problems: vec![p.to_string()],
        };
        let nonneg = |d: &kube::core::Duration, field: &str| -> Result<Duration> {
            if d.is_negative() {
                return Err(invalid(&format!("{field}: must not be negative")).into());
            }
            Ok(Duration::from(*d))
        };
        Ok(Self {
            name: tier.metadata.name.clone().unwrap_or_default(),
            generation: tier.metadata.generation,
            shards: u32::try_from(spec.shards).map_err(|_| invalid("spec.shards: must be positive"))?,
            replicas_per_shard: u32::try_from(spec.replicas_per_shard)
                .map_err(|_| invalid("spec.replicasPerShard: must not be negative"))?,
            max_memory_bytes: spec
                .max_memory_bytes()
                .ok_or_else(|| invalid("spec.maxMemory: too large"))?,
            max_memory_policy: spec.max_memory_policy.as_redis().to_string(),
            redis_config: spec.redis_config.clone(),
            health: HealthConfig {
                probe_interval: nonneg(&spec.health.probe_interval, "spec.health.probeInterval")?,
                response_timeout: nonneg(&spec.health.response_timeout, "spec.health.responseTimeout")?,
                failure_threshold: u32::try_from(spec.health.failure_threshold)
                    .map_err(|_| invalid("spec.health.failureThreshold: must be positive"))?
                    .max(1),
                evict_after: nonneg(&spec.health.evict_after, "spec.health.evictAfter")?,
            },
            max_lag_bytes: u64::try_from(spec.read_gate.max_lag_bytes).unwrap_or(0),
            timing: Timing::default(),
            // Resolving `spec.auth` (a Secret, or a local file) is the caller's job.
            auth: None,
        })
    }

    /// Whether the tier only caches: no persistence enabled through
    /// `redisConfig` (the operator itself writes `save ""` and
    /// `appendonly no`). Only then may a node's stray keys be flushed.
    pub fn is_cache(&self) -> bool {
        let set = |key: &str| {
            self.redis_config
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.trim().trim_matches('"').to_ascii_lowercase())
        };
        set("appendonly").is_none_or(|v| v != "yes") && set("save").is_none_or(|v| v.is_empty())
    }

    /// Nodes the spec asks for.
    pub fn total_nodes(&self) -> u32 {
        self.shards * (1 + self.replicas_per_shard)
    }
}

/// Replication backlog for a node with `max_memory` bytes of data: a tenth of
/// the dataset, between 1 MiB (Redis's default) and 1 GiB. Big enough that a
/// replica which drops its link for a few seconds under heavy writes resumes with
/// a partial sync instead of a full one.
pub fn repl_backlog_bytes(max_memory: u64) -> u64 {
    (max_memory / 10).clamp(1 << 20, 1 << 30)
}

/// `client-output-buffer-limit replica` for a node with `max_memory` bytes of
/// data, as (hard, soft, soft seconds). During a full sync the primary buffers
/// every write that arrives while the snapshot is transferred and loaded; if that
/// buffer hits the limit, the replica is disconnected and the sync starts over,
/// forever. The hard limit is the whole dataset (never below Redis's 256 MiB
/// default), the soft limit half of it (never below 64 MiB) sustained for 120 s.
pub fn replica_output_buffer_limit(max_memory: u64) -> (u64, u64, u64) {
    (max_memory.max(256 << 20), (max_memory / 2).max(64 << 20), 120)
}

/// Where one node listens and how it names itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEndpoint {
    /// Address to bind.
    pub bind: String,
    /// Client port.
    pub port: u16,
    /// Cluster bus port.
    pub bus_port: u16,
    /// Stable hostname announced to the cluster, when the backend has one.
    pub hostname: Option<String>,
    /// Whether clients should be redirected by hostname rather than IP (only
    /// when the hostname resolves for clients, e.g. a pod's DNS name).
    pub prefer_hostname: bool,
}

/// The redis.conf of one node. Settings the operator owns come first; the
/// user's `redisConfig` lines follow, so they win where Redis allows both.
pub fn render_redis_conf(tier: &TierConfig, endpoint: &NodeEndpoint, dir: &str) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| {
        out.push_str(k);
        out.push(' ');
        out.push_str(v);
        out.push('\n');
    };
    let user_sets = |key: &str| tier.redis_config.keys().any(|k| k.eq_ignore_ascii_case(key));
    line("port", &endpoint.port.to_string());
    line("bind", &endpoint.bind);
    line("daemonize", "no");
    line("dir", &quote(dir));
    line("logfile", "\"\"");
    line("cluster-enabled", "yes");
    line("cluster-config-file", "nodes.conf");
    line("cluster-port", &endpoint.bus_port.to_string());
    line(
        "cluster-node-timeout",
        &tier.timing.node_timeout.as_millis().to_string(),
    );
    // The operator places replicas itself; Redis moving them between shards
    // would fight it.
    line("cluster-allow-replica-migration", "no");
    // A cache keeps serving the slots it has while one shard is failing over.
    line("cluster-require-full-coverage", "no");
    if let Some(host) = &endpoint.hostname {
        line("cluster-announce-hostname", host);
        let preferred = if endpoint.prefer_hostname {
            "hostname"
        } else {
            "ip"
        };
        line("cluster-preferred-endpoint-type", preferred);
    }
    line("maxmemory", &tier.max_memory_bytes.to_string());
    line("maxmemory-policy", &tier.max_memory_policy);
    if !user_sets("repl-backlog-size") {
        line(
            "repl-backlog-size",
            &repl_backlog_bytes(tier.max_memory_bytes).to_string(),
        );
    }
    let (hard, soft, secs) = replica_output_buffer_limit(tier.max_memory_bytes);
    line(
        "client-output-buffer-limit",
        &format!("replica {hard} {soft} {secs}"),
    );
    line("save", "\"\"");
    line("appendonly", "no");
    if let Some(auth) = &tier.auth {
        match &auth.username {
            None => line("requirepass", &quote(&auth.password)),
            Some(user) => {
                let acl = format!(
                    "{} on {} ~* &* +@all",
                    quote(user),
                    quote(&format!(">{}", auth.password))
                );
                line("user", &acl);
                line("user", "default off");
                line("masteruser", &quote(user));
            }
        }
        line("masterauth", &quote(&auth.password));
    }
    for (k, v) in &tier.redis_config {
        line(k, v);
    }
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier() -> TierConfig {
        let yaml = "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec: {shards: 3, maxMemory: 2Gi}\n";
        let tier = cachetier_crds::validate::parse_manifest(yaml).unwrap();
        TierConfig::from_tier(&tier).unwrap()
    }

    #[test]
    fn spec_defaults_become_the_documented_health_settings() {
        let cfg = tier();
        assert_eq!(cfg.shards, 3);
        assert_eq!(cfg.replicas_per_shard, 1);
        assert_eq!(cfg.max_memory_bytes, 2 << 30);
        assert_eq!(cfg.health, HealthConfig::default());
        assert_eq!(cfg.max_lag_bytes, 1 << 20);
        assert_eq!(cfg.total_nodes(), 6);
    }

    #[test]
    fn replication_buffers_grow_with_max_memory_and_never_drop_below_redis_defaults() {
        assert_eq!(repl_backlog_bytes(8 << 20), 1 << 20);
        assert_eq!(repl_backlog_bytes(2 << 30), (2 << 30) / 10);
        assert_eq!(repl_backlog_bytes(100 << 30), 1 << 30);
        assert_eq!(replica_output_buffer_limit(16 << 20), (256 << 20, 64 << 20, 120));
        assert_eq!(replica_output_buffer_limit(4 << 30), (4 << 30, 2 << 30, 120));
    }

    #[test]
    fn redis_config_is_appended_and_overrides_the_backlog_size() {
        let mut cfg = tier();
        cfg.redis_config.insert("repl-backlog-size".into(), "64mb".into());
        cfg.redis_config.insert("hz".into(), "20".into());
        let endpoint = NodeEndpoint {
            bind: "127.0.0.1".into(),
            port: 7000,
            bus_port: 17000,
            hostname: Some("t-0-0".into()),
            prefer_hostname: false,
        };
        let conf = render_redis_conf(&cfg, &endpoint, "/tmp/x");
        assert!(conf.contains("cluster-port 17000\n"));
        assert!(conf.contains("maxmemory 2147483648\n"));
        assert!(conf.contains("cluster-announce-hostname t-0-0\ncluster-preferred-endpoint-type ip\n"));
        assert!(conf.contains("client-output-buffer-limit replica 2147483648 1073741824 120\n"));
        assert!(conf.ends_with("hz 20\nrepl-backlog-size 64mb\n"));
        assert_eq!(conf.matches("repl-backlog-size").count(), 1);
        assert!(conf.contains("save \"\"\nappendonly no\n"));
    }

    #[test]
    fn auth_makes_every_node_require_the_password_and_replicate_with_it() {
        let mut cfg = tier();
        let endpoint = NodeEndpoint {
            bind: "127.0.0.1".into(),
            port: 7000,
            bus_port: 17000,
            hostname: None,
            prefer_hostname: false,
        };
        cfg.auth = Some(Auth {
            username: None,
            password: "p \"q".into(),
        });
        let conf = render_redis_conf(&cfg, &endpoint, "/tmp/x");
        assert!(
            conf.contains("requirepass \"p \\\"q\"\nmasterauth \"p \\\"q\"\n"),
            "{conf}"
        );
        cfg.auth = Some(Auth {
            username: Some("app".into()),
            password: "pw".into(),
        });
        let conf = render_redis_conf(&cfg, &endpoint, "/tmp/x");
        assert!(conf.contains("user \"app\" on \">pw\" ~* &* +@all\nuser default off\nmasteruser \"app\"\nmasterauth \"pw\"\n"), "{conf}");
        assert!(
            !format!("{:?}", cfg.auth).contains("pw\""),
            "Debug must not print the password"
        );
    }

    #[test]
    fn a_tier_is_a_cache_unless_redis_config_turns_persistence_on() {
        let mut cfg = tier();
        assert!(cfg.is_cache());
        cfg.redis_config.insert("save".into(), "\"\"".into());
        assert!(cfg.is_cache());
        cfg.redis_config.insert("appendonly".into(), "yes".into());
        assert!(!cfg.is_cache());
        cfg.redis_config.remove("appendonly");
        cfg.redis_config.insert("save".into(), "900 1".into());
        assert!(!cfg.is_cache());
    }
}
