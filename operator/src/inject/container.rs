//! The sidecar container injected for one tier, configured from its CacheTier.

use cachetier_crds::{CacheTier, ReadPolicy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::reconcile::{node_dns_name, secret_env, shard_name};

/// What every sidecar the webhook injects shares, from the operator's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarTemplate {
    /// The image (`--sidecar-image`).
    pub image: String,
    /// `text` or `json` logs: the operator's `--sidecar-log-format`, by
    /// default its own `--log-format`, so a cluster's cachetier logs read
    /// alike.
    pub log_format: String,
}

impl SidecarTemplate {
    /// `image`, with text logs.
    pub fn new(image: impl Into<String>) -> SidecarTemplate {
        SidecarTemplate {
            image: image.into(),
            log_format: "text".to_string(),
        }
    }
}

/// First metrics port; the sidecar for the i-th tier of a pod uses `+ i`.
pub const METRICS_PORT: u16 = 9121;
/// How many shards' first nodes are given as seeds: any one node tells the
/// sidecar the whole topology; three survive two being down.
const SEED_SHARDS: u32 = 3;
/// UID of the distroless `nonroot` user the sidecar image runs as.
const SIDECAR_UID: i64 = 65532;

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The container name of a tier's sidecar: `cachetier-<tier>`, or
/// `cachetier-<port>` where that would exceed a container name's 63 characters.
pub fn container_name(tier: &str, port: u16) -> String {
    let name = format!("cachetier-{tier}");
    if name.len() <= 63 {
        name
    } else {
        format!("cachetier-{port}")
    }
}

fn policy(p: ReadPolicy) -> &'static str {
    match p {
        ReadPolicy::Random => "random",
        ReadPolicy::BestOfTwo => "bestOfTwo",
        ReadPolicy::Primary => "primary",
        ReadPolicy::ReplicasOnly => "replicasOnly",
    }
}

/// Seeds: the first node of the first shards, by stable DNS name.
fn seeds(tier: &str, namespace: &str, shards: u32) -> String {
    (0..shards.min(SEED_SHARDS))
        .map(|s| {
            format!(
                "{}:6379",
                node_dns_name(tier, namespace, &format!("{}-0", shard_name(tier, s)))
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn config_env(
    tier: &CacheTier,
    namespace: &str,
    port: u16,
    metrics: u16,
    sidecar: &SidecarTemplate,
) -> Vec<EnvVar> {
    let name = tier.metadata.name.as_deref().unwrap_or("");
    let spec = &tier.spec;
    let timeout = std::time::Duration::from(spec.health.response_timeout);
    let mut out = vec![
        env("CACHETIER_LISTEN", format!("127.0.0.1:{port}")),
        env(
            "CACHETIER_SEEDS",
            seeds(name, namespace, u32::try_from(spec.shards).unwrap_or(1)),
        ),
        env("CACHETIER_METRICS", format!("0.0.0.0:{metrics}")),
        env("CACHETIER_READ_POLICY", policy(spec.sidecar.read_policy)),
        env("CACHETIER_RESPONSE_TIMEOUT", format!("{}ms", timeout.as_millis())),
        env(
            "CACHETIER_MAX_LAG_BYTES",
            spec.read_gate.max_lag_bytes.to_string(),
        ),
        env(
            "CACHETIER_READ_YOUR_WRITES",
            spec.sidecar.read_your_writes.to_string(),
        ),
    ];
    // The sidecar's default is to split them.
    if !spec.sidecar.split_transactions {
        out.push(env("CACHETIER_SPLIT_TRANSACTIONS", "false".to_string()));
    }
    // The sidecar's default is text.
    if sidecar.log_format != "text" {
        out.push(env("CACHETIER_LOG_FORMAT", sidecar.log_format.clone()));
    }
    let cache = &spec.sidecar.local_cache;
    if cache.enabled {
        let ttl = std::time::Duration::from(cache.ttl);
        out.push(env("CACHETIER_CACHE_PREFIXES", cache.key_prefixes.join(",")));
        out.push(env("CACHETIER_CACHE_TTL", format!("{}ms", ttl.as_millis())));
        out.push(env("CACHETIER_CACHE_MAX_BYTES", cache.max_bytes.to_string()));
    }
    if let Some(auth) = &spec.auth {
        out.push(secret_env(
            "CACHETIER_PASSWORD",
            &auth.secret_name,
            &auth.password_key,
        ));
        if let Some(user) = &auth.username_key {
            out.push(secret_env("CACHETIER_USERNAME", &auth.secret_name, user));
        }
    }
    out
}

fn http_probe(path: &str, metrics: u16, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(metrics)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The native sidecar (an init container with `restartPolicy: Always`: up
/// before the application starts, stopped after it) for `tier`, listening on
/// `127.0.0.1:port`, the `index`-th cachetier sidecar of its pod.
pub fn sidecar_container(
    tier: &CacheTier,
    namespace: &str,
    port: u16,
    index: usize,
    sidecar: &SidecarTemplate,
) -> Container {
    let name = tier.metadata.name.as_deref().unwrap_or("");
    let metrics = METRICS_PORT.saturating_add(u16::try_from(index).unwrap_or(0));
    Container {
        name: container_name(name, port),
        image: Some(sidecar.image.clone()),
        restart_policy: Some("Always".to_string()),
        env: Some(config_env(tier, namespace, port, metrics, sidecar)),
        ports: Some(vec![ContainerPort {
            name: Some(format!("ct-metrics-{index}")),
            container_port: i32::from(metrics),
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        resources: tier.spec.sidecar.resources.clone(),
        startup_probe: Some(Probe {
            failure_threshold: Some(60),
            ..http_probe("/livez", metrics, 1)
        }),
        liveness_probe: Some(http_probe("/livez", metrics, 10)),
        readiness_probe: Some(http_probe("/readyz", metrics, 2)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}
