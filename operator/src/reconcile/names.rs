//! Names, labels and the owner reference every object of a tier shares. One
//! place, so the controller, the pool backend and the sidecar's seeds agree.

use std::collections::BTreeMap;

use cachetier_crds::validate::Invalid;
use cachetier_crds::{CacheTier, GROUP, VERSION};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::Defaults;
use crate::cluster::error::Error;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "cachetier-operator";
/// Label naming the tier an object belongs to.
pub const TIER_LABEL: &str = "cachetier.io/tier";
/// Label naming the shard of a pod, StatefulSet or PDB.
pub const SHARD_LABEL: &str = "cachetier.io/shard";

/// Client port of every Redis container.
pub const REDIS_PORT: i32 = 6379;
/// Cluster bus port of every Redis container.
pub const BUS_PORT: i32 = 16379;

/// The ConfigMap holding the tier's redis.conf.
pub fn config_map_name(tier: &str) -> String {
    format!("{tier}-config")
}

/// The headless Service whose per-pod DNS names identify nodes.
pub fn headless_service_name(tier: &str) -> String {
    format!("{tier}-nodes")
}

/// The client Service (every serving node of the tier).
pub fn client_service_name(tier: &str) -> String {
    tier.to_string()
}

/// The StatefulSet and PDB of one shard; its pods are `{tier}-{shard}-{ordinal}`,
/// the core's node names.
pub fn shard_name(tier: &str, shard: u32) -> String {
    format!("{tier}-{shard}")
}

/// A node's stable DNS name: `{pod}.{headless}.{namespace}.svc`.
pub fn node_dns_name(tier: &str, namespace: &str, pod: &str) -> String {
    format!("{pod}.{}.{namespace}.svc", headless_service_name(tier))
}

/// What every builder needs to know about the tier's identity.
#[derive(Debug, Clone)]
pub(super) struct Context {
    pub name: String,
    pub namespace: String,
    /// `spec.image`, or the operator's default.
    pub redis_image: String,
    owner: OwnerReference,
}

impl Context {
    /// The tier's name, namespace and owner reference; a tier without a UID has
    /// not been stored by an API server, and owning objects by it would orphan
    /// them.
    pub fn of(tier: &CacheTier, defaults: &Defaults) -> Result<Self, Error> {
        let missing = |field: &str| Invalid {
            problems: vec![format!(
                "metadata.{field}: Required value (set by the API server)"
            )],
        };
        let name = tier.metadata.name.clone().ok_or_else(|| missing("name"))?;
        let namespace = tier
            .metadata
            .namespace
            .clone()
            .ok_or_else(|| missing("namespace"))?;
        let uid = tier.metadata.uid.clone().ok_or_else(|| missing("uid"))?;
        let owner = OwnerReference {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: "CacheTier".to_string(),
            name: name.clone(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(Self {
            name,
            namespace,
            redis_image: tier
                .spec
                .image
                .clone()
                .unwrap_or_else(|| defaults.redis_image.clone()),
            owner,
        })
    }

    /// Labels of every object of the tier.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), "cachetier".to_string()),
            ("app.kubernetes.io/instance".to_string(), self.name.clone()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                FIELD_MANAGER.to_string(),
            ),
            ("app.kubernetes.io/component".to_string(), "redis".to_string()),
            (TIER_LABEL.to_string(), self.name.clone()),
        ])
    }

    /// Labels of one shard's objects and pods.
    pub fn shard_labels(&self, shard: u32) -> BTreeMap<String, String> {
        let mut labels = self.labels();
        labels.insert(SHARD_LABEL.to_string(), shard.to_string());
        labels
    }

    /// Selector of every pod of the tier.
    pub fn tier_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TIER_LABEL.to_string(), self.name.clone())])
    }

    /// Selector of one shard's pods.
    pub fn shard_selector(&self, shard: u32) -> BTreeMap<String, String> {
        let mut selector = self.tier_selector();
        selector.insert(SHARD_LABEL.to_string(), shard.to_string());
        selector
    }

    /// Metadata of an object named `name` with `labels`, owned by the tier.
    pub fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}
