//! The Kubernetes objects a CacheTier becomes, built by pure functions.
//!
//! Given a validated CacheTier (with `metadata.namespace` and `metadata.uid` as
//! the API server set them), [`desired`] returns every object the operator
//! applies with server-side apply: the tier's ConfigMap (redis.conf), a
//! headless Service (stable per-pod DNS names, the core's node identity), a
//! client Service, and per shard a StatefulSet and a PodDisruptionBudget. All
//! are owned by the CacheTier, so deleting it deletes them.
//!
//! Nothing here sees a client: the controller applies what this returns, and
//! golden files (`operator/tests/golden/`) pin what it builds. Not here: when a
//! pod restarts (the core's graceful replace decides), or what the cluster looks
//! like inside (observed from Redis).

#[cfg(test)]
mod golden;
mod names;
mod objects;
mod overrides;
mod pod;

pub use names::{
    FIELD_MANAGER, SHARD_LABEL, TIER_LABEL, client_service_name, config_map_name, headless_service_name,
    node_dns_name, shard_name,
};
pub use pod::{DATA_VOLUME, SERVING_CONDITION, secret_env};

use cachetier_crds::CacheTier;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::Serialize;

use crate::cluster::TierConfig;
use crate::cluster::error::Error;

/// One object the tier is made of.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Desired {
    /// The tier's redis.conf.
    ConfigMap(ConfigMap),
    /// The headless or the client Service.
    Service(Box<Service>),
    /// One shard's pods.
    StatefulSet(Box<StatefulSet>),
    /// One shard's disruption budget.
    PodDisruptionBudget(PodDisruptionBudget),
}

impl Desired {
    /// `Kind/name`, for logs and Events.
    pub fn describe(&self) -> String {
        let (kind, name) = match self {
            Self::ConfigMap(o) => ("ConfigMap", o.metadata.name.as_deref()),
            Self::Service(o) => ("Service", o.metadata.name.as_deref()),
            Self::StatefulSet(o) => ("StatefulSet", o.metadata.name.as_deref()),
            Self::PodDisruptionBudget(o) => ("PodDisruptionBudget", o.metadata.name.as_deref()),
        };
        format!("{kind}/{}", name.unwrap_or(""))
    }
}

/// Operator-wide defaults for what a tier's spec leaves unset (set by the
/// operator's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// The Redis image of a tier without `spec.image` (`--redis-image`).
    pub redis_image: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            redis_image: cachetier_crds::DEFAULT_IMAGE.to_string(),
        }
    }
}

/// Every object of `tier`, in apply order (config and Services before the pods
/// that use them).
pub fn desired(tier: &CacheTier, defaults: &Defaults) -> Result<Vec<Desired>, Error> {
    let ctx = names::Context::of(tier, defaults)?;
    let config = TierConfig::from_tier(tier)?;
    let mut out = vec![
        Desired::ConfigMap(objects::config_map(&ctx, &config)),
        Desired::Service(Box::new(objects::headless_service(&ctx))),
        Desired::Service(Box::new(objects::client_service(&ctx))),
    ];
    for shard in 0..config.shards {
        out.push(Desired::StatefulSet(Box::new(pod::stateful_set(
            &ctx, tier, shard,
        )?)));
        out.push(Desired::PodDisruptionBudget(objects::pod_disruption_budget(
            &ctx, tier, shard,
        )));
    }
    Ok(out)
}

/// The StatefulSet of one shard, as [`desired`] builds it (the node pool
/// creates a new shard's StatefulSet with it).
pub fn shard_stateful_set(tier: &CacheTier, shard: u32, defaults: &Defaults) -> Result<StatefulSet, Error> {
    let ctx = names::Context::of(tier, defaults)?;
    pod::stateful_set(&ctx, tier, shard)
}

/// `objects` as one multi-document YAML stream (what `cachetier-operator
/// render` prints and the golden files hold).
pub fn to_yaml(objects: &[Desired]) -> Result<String, Error> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        let yaml = yaml_serde::to_string(object).map_err(|e| Error::Render(e.to_string()))?;
        for line in yaml.lines() {
            out.push_str(&quote_yaml11_booleans(line));
            out.push('\n');
        }
    }
    Ok(out)
}

/// The emitter writes YAML 1.2, where `on` is a string; kubectl and most YAML
/// tools read YAML 1.1, where an unquoted `on`/`off`/`yes`/`no` is a boolean
/// (Redis's ACL rule `on` would become `true`). Quote such scalars. (The
/// controller sends JSON, which has no such ambiguity.)
fn quote_yaml11_booleans(line: &str) -> String {
    const WORDS: [&str; 8] = ["on", "off", "yes", "no", "On", "Off", "Yes", "No"];
    for prefix in ["- ", ": "] {
        if let Some(at) = line.rfind(prefix) {
            let value = &line[at + prefix.len()..];
            if WORDS.contains(&value) && (prefix == ": " || line[..at].trim().is_empty()) {
                return format!("{}{prefix}'{value}'", &line[..at]);
            }
        }
    }
    line.to_string()
}

#[cfg(test)]
#[test]
fn yaml_11_booleans_are_quoted_and_nothing_else_changes() {
    assert_eq!(quote_yaml11_booleans("    - on"), "    - 'on'");
    assert_eq!(quote_yaml11_booleans("  enabled: off"), "  enabled: 'off'");
    assert_eq!(quote_yaml11_booleans("    - only"), "    - only");
    assert_eq!(quote_yaml11_booleans("  note: a - on"), "  note: a - on");
}

/// Namespace of a manifest rendered without one.
pub const RENDER_NAMESPACE: &str = "default";
/// UID in the owner references of an offline render.
pub const RENDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// Validates a CacheTier manifest and renders its objects as YAML, offline:
/// a missing namespace becomes [`RENDER_NAMESPACE`], the owner UID
/// [`RENDER_UID`].
pub fn render_manifest(text: &str, defaults: &Defaults) -> Result<String, Error> {
    let mut tier = cachetier_crds::validate::parse_manifest(text)?;
    tier.metadata
        .namespace
        .get_or_insert_with(|| RENDER_NAMESPACE.to_string());
    tier.metadata.uid.get_or_insert_with(|| RENDER_UID.to_string());
    to_yaml(&desired(&tier, defaults)?)
}
