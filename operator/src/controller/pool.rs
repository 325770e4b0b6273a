//! The Kubernetes [`NodePool`]: a node is a pod `{tier}-{shard}-{ordinal}` of
//! the shard's StatefulSet, reached by its pod IP and named in the cluster by
//! its stable DNS name.
//!
//! The core decides when nodes come and go; this pool carries it out on the
//! StatefulSets. It owns only `spec.replicas` (under its own field manager,
//! [`POOL_FIELD_MANAGER`]); the controller owns the rest of each StatefulSet.
//! Creating a node applies the shard's StatefulSet if it is missing and raises
//! its replicas; destroying the highest ordinal lowers them (the last one
//! deletes the StatefulSet); destroying another ordinal deletes the pod, which
//! the StatefulSet recreates empty under the same name.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use cachetier_crds::CacheTier;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::cluster::config::TierConfig;
use crate::cluster::error::Error;
use crate::cluster::pool::{Listing, NodePool, PendingNode, PoolNode, node_name};
use crate::reconcile::{self, FIELD_MANAGER, SHARD_LABEL, TIER_LABEL};

/// The field manager of the pool's `spec.replicas` patches.
pub const POOL_FIELD_MANAGER: &str = "cachetier-operator-pool";
/// The label the StatefulSet controller puts on a pod: its revision.
const REVISION_LABEL: &str = "controller-revision-hash";
/// How a pending node without a pod is described.
const NOT_CREATED: &str = "pod not created yet";
/// Redis client port in every pod.
const REDIS_PORT: u16 = 6379;
/// Cluster bus port in every pod.
const BUS_PORT: u16 = 16379;

/// The pods of one tier.
#[derive(Debug, Clone)]
pub struct KubePool {
    pods: Api<Pod>,
    claims: Api<PersistentVolumeClaim>,
    sets: Api<StatefulSet>,
    pdbs: Api<PodDisruptionBudget>,
    namespace: String,
    /// The latest CacheTier, for building a shard's StatefulSet on demand.
    tier: Arc<RwLock<CacheTier>>,
    /// The core creates a shard's nodes in parallel; their read-then-raise of
    /// `replicas` must not interleave (a later "1" would undo an earlier "2").
    scaling: Arc<tokio::sync::Mutex<()>>,
    /// What the tier's spec leaves unset, for building StatefulSets.
    defaults: reconcile::Defaults,
}

impl KubePool {
    /// A pool for `tier` (as stored by the API server).
    pub fn new(client: kube::Client, tier: CacheTier, defaults: reconcile::Defaults) -> Self {
        let namespace = tier.metadata.namespace.clone().unwrap_or_default();
        Self {
            pods: Api::namespaced(client.clone(), &namespace),
            claims: Api::namespaced(client.clone(), &namespace),
            sets: Api::namespaced(client.clone(), &namespace),
            pdbs: Api::namespaced(client, &namespace),
            namespace,
            tier: Arc::new(RwLock::new(tier)),
            scaling: Arc::new(tokio::sync::Mutex::new(())),
            defaults,
        }
    }

    /// Makes `tier` the one new StatefulSets are built from.
    pub fn update(&self, tier: CacheTier) {
        if let Ok(mut current) = self.tier.write() {
            *current = tier;
        }
    }

    fn tier_name(&self) -> String {
        self.tier
            .read()
            .ok()
            .and_then(|t| t.metadata.name.clone())
            .unwrap_or_default()
    }

    fn current_tier(&self) -> Result<CacheTier, Error> {
        self.tier
            .read()
            .map(|t| t.clone())
            .map_err(|_| Error::Render("tier lock poisoned".into()))
    }

    async fn set_replicas(&self, name: &str, replicas: i32) -> Result<(), Error> {
        let patch = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name}, "spec": {"replicas": replicas}});
        let params = PatchParams::apply(POOL_FIELD_MANAGER).force();
        self.sets
            .patch(name, &params, &Patch::Apply(&patch))
            .await
            .map_err(|e| Error::kubernetes(format!("scaling StatefulSet {name} to {replicas}"), e))?;
        Ok(())
    }

    fn persistent(&self) -> bool {
        self.tier.read().is_ok_and(|t| t.spec.persistence.is_some())
    }

    async fn delete_pod(&self, name: &str) -> Result<(), Error> {
        match self.pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kubernetes(format!("deleting pod {name}"), e)),
        }
    }

    async fn delete_claim(&self, pod: &str) -> Result<(), Error> {
        let claim = claim_name(pod);
        match self.claims.delete(&claim, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kubernetes(format!("deleting volume claim {claim}"), e)),
        }
    }

    /// A pod recreated while its old claim was still being deleted waits
    /// for ever: the claim is kept while a pod names it, and the pod cannot
    /// start without it. Deleting such a pending pod lets the claim go; the
    /// StatefulSet then creates both anew. Returns the pods deleted.
    async fn unblock_claims(&self, tier: &str, pending: &[PendingNode]) -> Result<Vec<String>, Error> {
        let waiting: Vec<&PendingNode> = pending
            .iter()
            .filter(|p| !p.detail.starts_with(NOT_CREATED))
            .collect();
        if waiting.is_empty() || !self.persistent() {
            return Ok(Vec::new());
        }
        let claims = self
            .claims
            .list(&ListParams::default().labels(&format!("{TIER_LABEL}={tier}")))
            .await
            .map_err(|e| Error::kubernetes("listing the tier's volume claims", e))?;
        let usable = |pod: &str| {
            claims.items.iter().any(|c| {
                c.metadata.name.as_deref() == Some(claim_name(pod).as_str())
                    && c.metadata.deletion_timestamp.is_none()
            })
        };
        let mut deleted = Vec::new();
        for p in waiting.into_iter().filter(|p| !usable(&p.name)) {
            self.delete_pod(&p.name).await?;
            deleted.push(p.name.clone());
        }
        Ok(deleted)
    }

    /// What `pod` is to the core: a node (running, or terminating but still
    /// answering), a pending node, or nothing (not one of this tier's nodes,
    /// or going away without an address). `revisions` maps a shard to its
    /// StatefulSet's update revision: a pod of another revision is outdated
    /// (the template changed, e.g. a new image; `OnDelete` leaves replacing
    /// it to the core's graceful replace).
    fn classify(&self, pod: &Pod, revisions: &BTreeMap<u32, String>) -> Option<Listed> {
        let name = pod.metadata.name.clone()?;
        let labels = pod.metadata.labels.as_ref()?;
        let shard: u32 = labels.get(SHARD_LABEL)?.parse().ok()?;
        let ordinal: u32 = name.rsplit('-').next()?.parse().ok()?;
        let tier = labels.get(TIER_LABEL)?;
        if name != node_name(tier, shard, ordinal) {
            return None;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ip: Option<IpAddr> = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok());
        let Some(ip) = ip.filter(|_| running) else {
            if terminating {
                return None;
            }
            return Some(Listed::Pending(PendingNode {
                detail: pending_detail(pod),
                name,
                shard,
                ordinal,
            }));
        };
        let outdated = match (labels.get(REVISION_LABEL), revisions.get(&shard)) {
            (Some(have), Some(want)) => have != want,
            _ => false,
        };
        Some(Listed::Node(PoolNode {
            outdated,
            hostname: Some(reconcile::node_dns_name(tier, &self.namespace, &name)),
            incarnation: pod.metadata.uid.clone().unwrap_or_default(),
            terminating,
            name,
            shard,
            ordinal,
            addr: SocketAddr::new(ip, REDIS_PORT),
            bus_port: BUS_PORT,
            pid: None,
        }))
    }
}

/// A pod as the core sees it.
enum Listed {
    Node(PoolNode),
    Pending(PendingNode),
}

/// Why a pod does not run yet, from its status: a failed scheduling
/// condition, a waiting container's reason, or its phase.
fn pending_detail(pod: &Pod) -> String {
    let Some(status) = pod.status.as_ref() else {
        return "pod has no status yet".into();
    };
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        let reason = c.reason.as_deref().unwrap_or("not scheduled");
        return match c.message.as_deref() {
            Some(m) => format!("{reason}: {m}"),
            None => reason.to_string(),
        };
    }
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find_map(|w| w.reason.clone());
    let phase = status.phase.as_deref().unwrap_or("Unknown");
    match waiting {
        Some(reason) => format!("{phase}: {reason}"),
        None => format!("pod {phase}, no IP yet"),
    }
}

/// The volume claim of a pod's data directory (`{template}-{pod}`).
fn claim_name(pod: &str) -> String {
    format!("{}-{pod}", reconcile::DATA_VOLUME)
}

/// (shard, ordinal) from a node name `{tier}-{shard}-{ordinal}`.
fn parse_node(tier: &str, name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix(tier)?.strip_prefix('-')?;
    let (shard, ordinal) = rest.split_once('-')?;
    Some((shard.parse().ok()?, ordinal.parse().ok()?))
}

impl NodePool for KubePool {
    /// Applies the shard's StatefulSet if it is missing and raises its
    /// replicas to cover `ordinal`; the StatefulSet controller creates the
    /// pod, which is listed as pending until it runs.
    async fn ensure(&self, _tier: &TierConfig, shard: u32, ordinal: u32) -> Result<(), Error> {
        let tier = self.tier_name();
        let set_name = reconcile::shard_name(&tier, shard);
        let _scaling = self.scaling.lock().await;
        let existing = self
            .sets
            .get_opt(&set_name)
            .await
            .map_err(|e| Error::kubernetes(&set_name, e))?;
        let replicas = match existing {
            Some(set) => set.spec.and_then(|s| s.replicas).unwrap_or(1),
            None => {
                let set = reconcile::shard_stateful_set(&self.current_tier()?, shard, &self.defaults)?;
                let params = PatchParams::apply(FIELD_MANAGER).force();
                self.sets
                    .patch(&set_name, &params, &Patch::Apply(&set))
                    .await
                    .map_err(|e| Error::kubernetes(format!("creating StatefulSet {set_name}"), e))?;
                0
            }
        };
        let wanted = i32::try_from(ordinal + 1).unwrap_or(i32::MAX);
        if replicas < wanted {
            self.set_replicas(&set_name, wanted).await?;
        }
        Ok(())
    }

    async fn destroy(&self, name: &str) -> Result<(), Error> {
        let tier = self.tier_name();
        let Some((shard, ordinal)) = parse_node(&tier, name) else {
            return Ok(());
        };
        let set_name = reconcile::shard_name(&tier, shard);
        let _scaling = self.scaling.lock().await;
        let Some(set) = self
            .sets
            .get_opt(&set_name)
            .await
            .map_err(|e| Error::kubernetes(&set_name, e))?
        else {
            return Ok(());
        };
        let replicas = set.spec.and_then(|s| s.replicas).unwrap_or(1);
        let last = u32::try_from(replicas).unwrap_or(0).saturating_sub(1);
        if ordinal == 0 && replicas <= 1 {
            // The shard is gone: its StatefulSet and its disruption budget.
            self.sets
                .delete(&set_name, &DeleteParams::foreground())
                .await
                .map_err(|e| Error::kubernetes(format!("deleting StatefulSet {set_name}"), e))?;
            match self.pdbs.delete(&set_name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(Error::kubernetes(
                        format!("deleting PodDisruptionBudget {set_name}"),
                        e,
                    ));
                }
            }
        } else if ordinal == last {
            self.set_replicas(&set_name, replicas - 1).await?;
        } else {
            // Replaced empty: its volume goes first (it is kept until the pod
            // is gone), so the StatefulSet recreates the pod with a new one.
            if self.persistent() {
                self.delete_claim(name).await?;
            }
            self.delete_pod(name).await?;
        }
        Ok(())
    }

    async fn list(&self) -> Result<Listing, Error> {
        let tier = self.tier_name();
        let selector = format!("{TIER_LABEL}={tier}");
        let pods = self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| Error::kubernetes("listing the tier's pods", e))?;
        let sets = self
            .sets
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| Error::kubernetes("listing the tier's StatefulSets", e))?;
        let revisions: BTreeMap<u32, String> = sets
            .items
            .iter()
            .filter_map(|set| {
                let shard = set.metadata.labels.as_ref()?.get(SHARD_LABEL)?.parse().ok()?;
                Some((shard, set.status.as_ref()?.update_revision.clone()?))
            })
            .collect();
        let mut listing = Listing::default();
        for pod in &pods.items {
            match self.classify(pod, &revisions) {
                Some(Listed::Node(n)) => listing.nodes.push(n),
                Some(Listed::Pending(p)) => listing.pending.push(p),
                None => {}
            }
        }
        // Ordinals a StatefulSet's replicas cover but whose pod does not
        // exist yet are requested, not missing.
        for set in &sets.items {
            let Some(shard) = set
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SHARD_LABEL)?.parse::<u32>().ok())
            else {
                continue;
            };
            let replicas = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            for ordinal in 0..u32::try_from(replicas).unwrap_or(0) {
                let name = node_name(&tier, shard, ordinal);
                let listed = pods
                    .items
                    .iter()
                    .any(|p| p.metadata.name.as_deref() == Some(name.as_str()));
                if !listed {
                    listing.pending.push(PendingNode {
                        detail: format!(
                            "{NOT_CREATED} by StatefulSet {}",
                            reconcile::shard_name(&tier, shard)
                        ),
                        name,
                        shard,
                        ordinal,
                    });
                }
            }
        }
        for name in self.unblock_claims(&tier, &listing.pending).await? {
            if let Some(p) = listing.pending.iter_mut().find(|p| p.name == name) {
                p.detail =
                    "its volume claim was being deleted: pod deleted so that both are recreated".into();
            }
        }
        listing.nodes.sort_by_key(|n| (n.shard, n.ordinal));
        listing.pending.sort_by_key(|n| (n.shard, n.ordinal));
        Ok(listing)
    }
}

#[cfg(test)]
mod tests;
