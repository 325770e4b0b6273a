//! The tier's ConfigMap, Services and PodDisruptionBudgets.

use std::collections::BTreeMap;

use cachetier_crds::CacheTier;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::names::{
    BUS_PORT, Context, REDIS_PORT, client_service_name, config_map_name, headless_service_name, shard_name,
};
use crate::cluster::TierConfig;
use crate::cluster::config::{NodeEndpoint, render_redis_conf};

/// Key of the redis.conf in the ConfigMap, and its file name in the pod.
pub(super) const REDIS_CONF_KEY: &str = "redis.conf";
/// Where Redis keeps `nodes.conf` (an emptyDir: a cache tier has no persistence).
pub(super) const DATA_DIR: &str = "/data";

/// The tier-wide redis.conf, the same renderer local mode uses, for a node
/// that listens on every address of its pod. What differs per pod (its DNS
/// name, auth from the Secret) comes from the container's arguments.
pub(super) fn config_map(ctx: &Context, config: &TierConfig) -> ConfigMap {
    let endpoint = NodeEndpoint {
        bind: "* -::*".to_string(),
        port: REDIS_PORT as u16,
        bus_port: BUS_PORT as u16,
        hostname: None,
        prefer_hostname: false,
    };
    // With every address bound, Redis's protected mode would refuse clients
    // from other pods when no password is set; the Service and NetworkPolicies
    // are the boundary on Kubernetes.
    let conf = format!(
        "{}protected-mode no\n",
        render_redis_conf(config, &endpoint, DATA_DIR)
    );
    ConfigMap {
        metadata: ctx.meta(config_map_name(&ctx.name), ctx.labels()),
        data: Some(BTreeMap::from([(REDIS_CONF_KEY.to_string(), conf)])),
        ..ConfigMap::default()
    }
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// The headless Service: a stable DNS name per pod, published before the pod is
/// ready, because the core must reach a syncing node to manage it.
pub(super) fn headless_service(ctx: &Context) -> Service {
    Service {
        metadata: ctx.meta(headless_service_name(&ctx.name), ctx.labels()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            publish_not_ready_addresses: Some(true),
            selector: Some(ctx.tier_selector()),
            ports: Some(vec![port("redis", REDIS_PORT), port("cluster-bus", BUS_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client Service: every ready (serving) node of the tier, for tools and
/// cluster-aware clients that want one seed address.
pub(super) fn client_service(ctx: &Context) -> Service {
    Service {
        metadata: ctx.meta(client_service_name(&ctx.name), ctx.labels()),
        spec: Some(ServiceSpec {
            selector: Some(ctx.tier_selector()),
            ports: Some(vec![port("redis", REDIS_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// One shard's disruption budget. `spec.podDisruptionBudget.maxUnavailable` is
/// capped at the shard's replica count (but at least 1), so a drain never takes
/// a primary and all its replicas at once where the shard has replicas.
pub(super) fn pod_disruption_budget(ctx: &Context, tier: &CacheTier, shard: u32) -> PodDisruptionBudget {
    let cap = tier.spec.replicas_per_shard.max(1);
    let max_unavailable = tier.spec.pod_disruption_budget.max_unavailable.clamp(1, cap);
    PodDisruptionBudget {
        metadata: ctx.meta(shard_name(&ctx.name, shard), ctx.shard_labels(shard)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(ctx.shard_selector(shard)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
