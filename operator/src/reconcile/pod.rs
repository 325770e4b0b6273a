//! One shard's StatefulSet and the Redis pod it runs.
//!
//! `podManagementPolicy: Parallel` creates a shard's pods at once (the core
//! joins them); `updateStrategy: OnDelete` leaves restarts to the core's
//! graceful replace (replicas first, a primary after a failover), never to the
//! StatefulSet controller. `replicas` is left out on purpose: the Kubernetes
//! node pool owns it (under its own field manager), because only the core
//! knows when a node may go (after a failover, after its slots moved).

use std::collections::BTreeMap;

use cachetier_crds::{AntiAffinity, CacheTier, PersistenceSpec};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, Lifecycle, LifecycleHandler, LocalObjectReference, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodReadinessGate,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext,
    SleepAction, TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::names::{BUS_PORT, Context, REDIS_PORT, config_map_name, headless_service_name, shard_name};
use super::objects::{DATA_DIR, REDIS_CONF_KEY};
use super::overrides;
use crate::cluster::error::Error;

/// The pod condition the operator sets once a node serves (its slots, or reads
/// as an in-sync replica); the pod is Ready only then.
pub const SERVING_CONDITION: &str = "cachetier.io/serving";
/// UID and GID of the `redis` user in the official Redis images.
const REDIS_UID: i64 = 999;
/// The volume of Redis's data directory (and the claim template's name: a
/// node's claim is `data-{pod}`).
pub const DATA_VOLUME: &str = "data";
/// Where the ConfigMap is mounted.
const CONFIG_DIR: &str = "/etc/cachetier";
/// How long a terminating Redis keeps serving, so the cluster (and the core)
/// notice and promote a replica before the process exits.
const PRE_STOP_SECONDS: i64 = 5;
/// Grace period of a Redis pod: the pre-stop pause plus a clean shutdown.
const TERMINATION_GRACE_SECONDS: i64 = 30;

/// The StatefulSet of `shard`, with `spec.podOverrides` merged into its pod
/// template last (the operator's labels still win: the selector needs them).
pub(super) fn stateful_set(ctx: &Context, tier: &CacheTier, shard: u32) -> Result<StatefulSet, Error> {
    let mut set = base_stateful_set(ctx, tier, shard);
    if let (Some(patch), Some(spec)) = (&tier.spec.pod_overrides, set.spec.as_mut()) {
        let mut template = overrides::apply(&spec.template, patch)?;
        let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .extend(ctx.shard_labels(shard));
        spec.template = template;
    }
    Ok(set)
}

fn base_stateful_set(ctx: &Context, tier: &CacheTier, shard: u32) -> StatefulSet {
    let labels = ctx.shard_labels(shard);
    StatefulSet {
        metadata: ctx.meta(shard_name(&ctx.name, shard), labels.clone()),
        spec: Some(StatefulSetSpec {
            service_name: Some(headless_service_name(&ctx.name)),
            pod_management_policy: Some("Parallel".to_string()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                ..StatefulSetUpdateStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(ctx.shard_selector(shard)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels(tier, labels)),
                    annotations: (!tier.spec.pod_annotations.is_empty())
                        .then(|| tier.spec.pod_annotations.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(ctx, tier, shard)),
            },
            volume_claim_templates: tier.spec.persistence.as_ref().map(|p| vec![data_claim(ctx, p)]),
            // The operator, not the StatefulSet, decides when a node's data
            // may go: a replaced node gets a fresh volume (the pool deletes
            // the claim), a removed one or a deleted tier leaves none behind.
            persistent_volume_claim_retention_policy: tier.spec.persistence.as_ref().map(|_| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".to_string()),
                    when_scaled: Some("Delete".to_string()),
                }
            }),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The claim template of a node's data directory.
fn data_claim(ctx: &Context, persistence: &PersistenceSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            labels: Some(ctx.tier_selector()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: persistence.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(persistence.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// The user's pod labels under the operator's own (which win).
fn pod_labels(tier: &CacheTier, own: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = tier.spec.pod_labels.clone();
    labels.extend(own);
    labels
}

fn pod_spec(ctx: &Context, tier: &CacheTier, shard: u32) -> PodSpec {
    let spec = &tier.spec;
    let mut volumes = vec![Volume {
        name: "config".to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(&ctx.name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    // With persistence, the claim template provides `data`.
    if spec.persistence.is_none() {
        volumes.push(Volume {
            name: DATA_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
    PodSpec {
        containers: vec![redis_container(ctx, tier)],
        volumes: Some(volumes),
        readiness_gates: Some(vec![PodReadinessGate {
            condition_type: SERVING_CONDITION.to_string(),
        }]),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(REDIS_UID),
            run_as_group: Some(REDIS_UID),
            fs_group: Some(REDIS_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        // Pods reach Redis by IP and DNS; nothing in the pod needs the API.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        affinity: spec
            .affinity
            .clone()
            .or_else(|| default_affinity(ctx, spec.anti_affinity, shard)),
        node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        topology_spread_constraints: (!spec.topology_spread_constraints.is_empty())
            .then(|| spec.topology_spread_constraints.clone()),
        priority_class_name: spec.priority_class_name.clone(),
        image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
            spec.image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect()
        }),
        ..PodSpec::default()
    }
}

/// Preferred (not required) anti-affinity, so a small cluster still schedules
/// every pod.
fn default_affinity(ctx: &Context, mode: AntiAffinity, shard: u32) -> Option<Affinity> {
    let selector = match mode {
        AntiAffinity::Shard => ctx.shard_selector(shard),
        AntiAffinity::Tier => ctx.tier_selector(),
        AntiAffinity::None => return None,
    };
    Some(Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    topology_key: "kubernetes.io/hostname".to_string(),
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector),
                        ..LabelSelector::default()
                    }),
                    ..PodAffinityTerm::default()
                },
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    })
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// An environment variable from a key of a Secret (a password never goes into
/// a ConfigMap or an argument in plain text).
pub fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// `redis-server <conf> --<per-pod setting> …`. The pod's DNS name comes from
/// the downward API (`$(POD_NAME)`), the password from the Secret through an
/// environment variable: neither is in the ConfigMap.
fn redis_args(ctx: &Context, tier: &CacheTier) -> (Vec<String>, Vec<EnvVar>) {
    let hostname = format!(
        "$(POD_NAME).{}.$(POD_NAMESPACE).svc",
        headless_service_name(&ctx.name)
    );
    let mut args = vec![
        format!("{CONFIG_DIR}/{REDIS_CONF_KEY}"),
        "--cluster-announce-hostname".to_string(),
        hostname,
        "--cluster-announce-ip".to_string(),
        "$(POD_IP)".to_string(),
    ];
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
    ];
    if let Some(auth) = &tier.spec.auth {
        env.push(secret_env(
            "REDIS_PASSWORD",
            &auth.secret_name,
            &auth.password_key,
        ));
        match &auth.username_key {
            // The default user with a password.
            None => args.extend(["--requirepass", "$(REDIS_PASSWORD)"].map(String::from)),
            // An ACL user with every permission and the default user off, as
            // the core's redis.conf does in local mode; as arguments, each one
            // token, so a password may hold spaces.
            Some(user_key) => {
                env.push(secret_env("REDIS_USERNAME", &auth.secret_name, user_key));
                args.extend(
                    [
                        "--user",
                        "$(REDIS_USERNAME)",
                        "on",
                        ">$(REDIS_PASSWORD)",
                        "~*",
                        "&*",
                        "+@all",
                        "--user",
                        "default",
                        "off",
                        "--masteruser",
                        "$(REDIS_USERNAME)",
                    ]
                    .map(String::from),
                );
            }
        }
        args.extend(["--masterauth", "$(REDIS_PASSWORD)"].map(String::from));
    }
    (args, env)
}

fn tcp_probe(period: i32, failures: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("redis".to_string()),
            ..TCPSocketAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn redis_container(ctx: &Context, tier: &CacheTier) -> Container {
    let (args, env) = redis_args(ctx, tier);
    Container {
        name: "redis".to_string(),
        image: Some(ctx.redis_image.clone()),
        command: Some(vec!["redis-server".to_string()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("redis".to_string()),
                container_port: REDIS_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("cluster-bus".to_string()),
                container_port: BUS_PORT,
                protocol: Some("TCP".to_string()),
                ..ContainerPort::default()
            },
        ]),
        resources: tier.spec.resources.clone(),
        // Alive means "accepts TCP": a replica in a full sync is alive and must
        // not be restarted for being busy. Serving is the readiness gate's job,
        // set by the operator from what it observes; the TCP readiness probe
        // only keeps a pod that stopped accepting connections out of the
        // client Service at once.
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..tcp_probe(10, 6)
        }),
        readiness_probe: Some(tcp_probe(2, 2)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_string(),
                mount_path: CONFIG_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: DATA_VOLUME.to_string(),
                mount_path: DATA_DIR.to_string(),
                ..VolumeMount::default()
            },
        ]),
        working_dir: Some(DATA_DIR.to_string()),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Defaults, SHARD_LABEL};

    fn tier(extra: &str) -> CacheTier {
        let yaml = format!(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {{name: t, namespace: ns, uid: u-1}}\nspec: {{shards: 2, maxMemory: 1Gi{extra}}}\n"
        );
        cachetier_crds::validate::parse_manifest(&yaml).unwrap()
    }

    #[test]
    fn a_shard_spreads_over_nodes_by_default_and_the_knob_changes_the_scope() {
        let t = tier("");
        let ctx = Context::of(&t, &Defaults::default()).unwrap();
        let affinity = default_affinity(&ctx, AntiAffinity::Shard, 1).unwrap();
        let term = &affinity
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0];
        let labels = term
            .pod_affinity_term
            .label_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(labels.get(SHARD_LABEL).map(String::as_str), Some("1"));
        let tier_wide = default_affinity(&ctx, AntiAffinity::Tier, 1).unwrap();
        let term = &tier_wide
            .pod_anti_affinity
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .unwrap()[0];
        assert!(
            !term
                .pod_affinity_term
                .label_selector
                .clone()
                .unwrap()
                .match_labels
                .unwrap()
                .contains_key(SHARD_LABEL)
        );
        assert!(default_affinity(&ctx, AntiAffinity::None, 1).is_none());
    }

    #[test]
    fn the_password_reaches_redis_from_the_secret_and_never_appears_in_plain_text() {
        let t = tier(", auth: {secretName: s, usernameKey: user}");
        let ctx = Context::of(&t, &Defaults::default()).unwrap();
        let (args, env) = redis_args(&ctx, &t);
        assert!(
            args.windows(3)
                .any(|w| w == ["--user", "$(REDIS_USERNAME)", "on"])
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--masteruser", "$(REDIS_USERNAME)"])
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--masterauth", "$(REDIS_PASSWORD)"])
        );
        assert!(
            !args.iter().any(|a| a == "--requirepass"),
            "an ACL user, not the default user's password"
        );
        let plain = tier(", auth: {secretName: s}");
        let (args, _) = redis_args(&Context::of(&plain, &Defaults::default()).unwrap(), &plain);
        assert!(
            args.windows(2)
                .any(|w| w == ["--requirepass", "$(REDIS_PASSWORD)"])
        );
        let password = env.iter().find(|e| e.name == "REDIS_PASSWORD").unwrap();
        let key = password
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((key.name.as_str(), key.key.as_str()), ("s", "password"));
    }

    #[test]
    fn the_operators_labels_win_over_the_users_pod_labels() {
        let t = tier(", podLabels: {cachetier.io/tier: other, team: a}");
        let set = stateful_set(&Context::of(&t, &Defaults::default()).unwrap(), &t, 0).unwrap();
        let labels = set.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["cachetier.io/tier"], "t");
        assert_eq!(labels["team"], "a");
    }
}
