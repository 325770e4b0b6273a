//! The controller's reconcile: a thin driver over pure steps. Validate (an
//! invalid spec changes nothing and says why), build the desired objects,
//! server-side apply them, hand the spec to the tier's cluster core, publish
//! the status it computes, record Events for what changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachetier_crds::validate::Invalid;
use cachetier_crds::{CacheTier, CacheTierStatus};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::cores::Cores;
use super::metrics::Metrics;
use super::report;
use crate::cluster::error::Error;
use crate::reconcile::{self, Desired, FIELD_MANAGER, SERVING_CONDITION};

/// How often a tier is reconciled with no change (status refresh, drift repair).
pub const RESYNC: Duration = Duration::from_secs(15);
/// How often an unchanged status is rewritten anyway.
const STATUS_REFRESH: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The controller's metrics.
    pub metrics: Arc<Metrics>,
    /// Whether this replica holds the lease; a standby acts on nothing.
    pub leader: watch::Receiver<bool>,
    /// The cluster core of each tier (`None`: wiring tests without Redis).
    pub cores: Option<Cores>,
    /// The last status written per tier, and when.
    written: Mutex<HashMap<ObjectRef<CacheTier>, (CacheTierStatus, tokio::time::Instant)>>,
    /// The serving condition last set on each pod, by (namespace, name,
    /// address, node id): a pod recreated under the same name has a new
    /// address (and, without persistence, a new node id), so it is marked
    /// again.
    serving: Mutex<HashMap<PodKey, bool>>,
    /// What a tier's spec leaves unset.
    defaults: reconcile::Defaults,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context; `cores` drives Redis (leave it out in wiring tests).
    pub fn new(
        client: kube::Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        leader: watch::Receiver<bool>,
        cores: Option<Cores>,
    ) -> Self {
        Self {
            client,
            recorder,
            metrics,
            leader,
            cores,
            written: Mutex::new(HashMap::new()),
            serving: Mutex::new(HashMap::new()),
            defaults: reconcile::Defaults::default(),
        }
    }

    /// Forgets which pods were marked serving (the lease was lost: another
    /// replica may have changed them since).
    pub fn forget_serving(&self) {
        crate::controller::lock(&self.serving).clear();
    }

    /// The same context with the operator's defaults for unset spec fields.
    pub fn with_defaults(mut self, defaults: reconcile::Defaults) -> Self {
        self.defaults = defaults;
        self
    }
}

/// A pod as the serving cache knows it: namespace, name, address, node id.
type PodKey = (String, String, String, Option<String>);

/// Reconciles one CacheTier.
pub async fn reconcile(tier: Arc<CacheTier>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::requeue(RESYNC));
    }
    let timer = ctx.metrics.reconcile_started();
    let result = reconcile_leader(&tier, &ctx).await;
    timer.observe_duration();
    result
}

async fn reconcile_leader(tier: &CacheTier, ctx: &Context) -> Result<Action, Error> {
    let name = tier.name_any();
    let key = ObjectRef::from_obj(tier);
    if tier.meta().deletion_timestamp.is_some() {
        if let Some(cores) = &ctx.cores {
            cores.stop(&key);
        }
        ctx.metrics
            .forget_tier(&tier.namespace().unwrap_or_default(), &name);
        return Ok(Action::await_change());
    }
    if let Err(invalid) = cachetier_crds::validate::validate(tier) {
        ctx.metrics.reconcile_failed("invalid");
        report_invalid(tier, ctx, &key, &invalid).await?;
        return Ok(Action::await_change());
    }
    // The spec passed validation; building can still refuse it (a
    // podOverrides patch that leaves an invalid pod template).
    let objects = match reconcile::desired(tier, &ctx.defaults) {
        Err(Error::Invalid(invalid)) => {
            ctx.metrics.reconcile_failed("invalid");
            report_invalid(tier, ctx, &key, &invalid).await?;
            return Ok(Action::await_change());
        }
        other => other?,
    };
    apply_all(&ctx.client, tier, &objects).await?;
    let computed = match &ctx.cores {
        Some(cores) => cores.ensure(ctx.client.clone(), tier).await?,
        None => None,
    };
    // Before the core's first round, say that the tier is being built.
    let generation = tier.meta().generation;
    let status =
        computed.unwrap_or_else(|| report::bootstrapping(tier.status.as_ref(), &tier.spec, generation));
    ctx.metrics.observe_tier(
        &tier.namespace().unwrap_or_default(),
        &name,
        &status,
        tier.status.as_ref(),
    );
    // Every node's readiness gate, from the whole status (the published one
    // lists only the nodes worth a look on a large tier).
    mark_serving(tier, ctx, &status).await?;
    let status = report::publishable(status, &name);
    let next = report::next_look(&status, generation, RESYNC);
    publish(tier, ctx, &key, status).await?;
    Ok(Action::requeue(next))
}

/// `error_policy`: transient failures retry with a short backoff; every failure
/// is counted by its class.
pub fn error_policy(tier: Arc<CacheTier>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.label());
    warn!(tier = %tier.name_any(), error = %error, "reconcile failed");
    if error.is_transient() {
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::await_change()
    }
}

async fn report_invalid(
    tier: &CacheTier,
    ctx: &Context,
    key: &ObjectRef<CacheTier>,
    invalid: &Invalid,
) -> Result<(), Error> {
    let previous = tier.status.as_ref();
    let status = report::invalid_status(previous, invalid, &tier.name_any(), tier.meta().generation);
    publish(tier, ctx, key, status).await
}

/// Server-side applies every object. StatefulSets only for the shards the
/// spec asks for: a shard being removed keeps its StatefulSet until the core
/// has moved its slots away and the pool deletes it.
async fn apply_all(client: &kube::Client, tier: &CacheTier, objects: &[Desired]) -> Result<(), Error> {
    let namespace = tier.namespace().unwrap_or_default();
    for object in objects {
        match object {
            Desired::ConfigMap(o) => apply::<ConfigMap>(client, &namespace, o).await?,
            Desired::Service(o) => apply::<Service>(client, &namespace, o.as_ref()).await?,
            Desired::StatefulSet(o) => apply::<StatefulSet>(client, &namespace, o.as_ref()).await?,
            Desired::PodDisruptionBudget(o) => apply::<PodDisruptionBudget>(client, &namespace, o).await?,
        }
    }
    Ok(())
}

async fn apply<K>(client: &kube::Client, namespace: &str, object: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|e| Error::kubernetes(format!("applying {} {name}", K::kind(&())), e))?;
    Ok(())
}

/// Writes `status` when it changed (or at a slow period), and records the
/// Events the change is worth.
async fn publish(
    tier: &CacheTier,
    ctx: &Context,
    key: &ObjectRef<CacheTier>,
    status: CacheTierStatus,
) -> Result<(), Error> {
    let previous = {
        let written = crate::controller::lock(&ctx.written);
        written.get(key).cloned()
    };
    let previous_status = previous.as_ref().map(|(s, _)| s).or(tier.status.as_ref());
    let stale = previous
        .as_ref()
        .is_none_or(|(_, at)| at.elapsed() > STATUS_REFRESH);
    if !report::changed(previous_status, &status) && !stale {
        return Ok(());
    }
    let events = report::events_between(previous_status, &status);
    let api: Api<CacheTier> = Api::namespaced(ctx.client.clone(), &tier.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "cachetier.io/v1alpha1", "kind": "CacheTier", "status": status});
    api.patch_status(
        &tier.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| Error::kubernetes(format!("writing the status of CacheTier {}", tier.name_any()), e))?;
    crate::controller::lock(&ctx.written).insert(key.clone(), (status, tokio::time::Instant::now()));
    for event in events {
        record(tier, ctx, &event).await;
    }
    Ok(())
}

/// Sets each pod's `cachetier.io/serving` condition (its readiness gate) to
/// what the core observed, where it changed: a pod is Ready only while it
/// serves, so the client Service and PodDisruptionBudgets count what serves.
async fn mark_serving(tier: &CacheTier, ctx: &Context, status: &CacheTierStatus) -> Result<(), Error> {
    let namespace = tier.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for node in status.shards.iter().flat_map(|s| s.nodes.iter()) {
        if node.address.is_empty() {
            continue; // pending: no pod running to mark
        }
        let key = (
            namespace.clone(),
            node.name.clone(),
            node.address.clone(),
            node.node_id.clone(),
        );
        if crate::controller::lock(&ctx.serving).get(&key) == Some(&node.serving) {
            continue;
        }
        let condition = json!({"status": {"conditions": [{
            "type": SERVING_CONDITION,
            "status": if node.serving { "True" } else { "False" },
            "reason": if node.serving { "Serving" } else { "NotServing" },
            "message": node.reason.clone().unwrap_or_default(),
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        }]}});
        match pods
            .patch_status(&node.name, &PatchParams::default(), &Patch::Strategic(&condition))
            .await
        {
            Ok(_) => {
                crate::controller::lock(&ctx.serving).insert(key, node.serving);
            }
            // The pod is gone (replaced): nothing to mark.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(Error::kubernetes(
                    format!("setting {SERVING_CONDITION} on pod {}", node.name),
                    e,
                ));
            }
        }
    }
    Ok(())
}

async fn record(tier: &CacheTier, ctx: &Context, event: &Event) {
    info!(tier = %tier.name_any(), reason = %event.reason, note = ?event.note, "event");
    if let Err(e) = ctx.recorder.publish(event, &tier.object_ref(&())).await {
        warn!(tier = %tier.name_any(), error = %e, "cannot record an Event");
    }
}
