//! The Kubernetes controller (`cachetier-operator run`): turns each CacheTier
//! into its objects (from [`crate::reconcile`]), runs the tier's cluster core on
//! a pod-backed [`pool::KubePool`], and reports status and Events.
//!
//! High availability: every replica watches, only the holder of a
//! `coordination.k8s.io/v1` Lease acts. A replica that loses the lease stops
//! every cluster core at once and reconciles nothing until it leads again; a
//! standby takes over within the lease duration.
//!
//! Not here: what the objects look like ([`crate::reconcile`]) or how the
//! cluster converges ([`crate::cluster`]).

pub mod cores;
pub mod metrics;
#[cfg(test)]
mod mock;
pub mod pool;
#[cfg(test)]
mod rbac_tests;
pub mod reconcile;
pub mod report;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use cachetier_crds::CacheTier;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{info, warn};

use self::cores::Cores;
use self::metrics::Metrics;
use self::reconcile::{Context, error_policy, reconcile};
use crate::cluster::error::Error;
use crate::reconcile::{FIELD_MANAGER, TIER_LABEL};

/// A poison-tolerant lock: a panicked holder leaves plain data behind.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How `run` is set up.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where `/metrics`, `/livez` and `/readyz` are served.
    pub metrics: SocketAddr,
    /// Watch CacheTiers in this namespace only (all namespaces when `None`).
    pub namespace: Option<String>,
    /// Namespace of the leader-election Lease.
    pub lease_namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    pub identity: String,
    /// Lease duration in seconds: how long a standby waits for a silent leader.
    pub lease_seconds: u64,
    /// The sidecar-injection webhook, when this replica serves it.
    pub webhook: Option<WebhookOptions>,
    /// What a tier's spec leaves unset (`--redis-image`).
    pub defaults: crate::reconcile::Defaults,
}

/// How the webhook is served.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// HTTPS address.
    pub addr: SocketAddr,
    /// Where its certificate comes from.
    pub certificate: crate::webhook::tls::Source,
    /// The sidecar image it injects.
    pub sidecar_image: String,
    /// The injected sidecars' log format (`--sidecar-log-format`, by
    /// default the operator's own).
    pub log_format: String,
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(options: RunOptions) -> Result<(), Error> {
    let client = kube::Client::try_default().await.map_err(|e| {
        Error::kubernetes(
            "connecting to the API server (in-cluster config or KUBECONFIG)",
            e,
        )
    })?;
    let metrics = Arc::new(Metrics::new().map_err(|e| Error::Render(e.to_string()))?);
    tokio::spawn(metrics::serve(options.metrics, metrics.clone()).await?);

    let lease = LeaseManagerBuilder::new(client.clone(), &options.lease_name)
        .with_namespace(&options.lease_namespace)
        .with_identity(&options.identity)
        .with_duration(options.lease_seconds)
        .with_grace(options.lease_seconds.div_ceil(3).max(1))
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (leader, lease_task) = lease.watch().await;

    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: Some(options.identity.clone()),
    };
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Recorder::new(client.clone(), reporter),
            metrics.clone(),
            leader.clone(),
            Some(Cores::new(options.defaults.clone())),
        )
        .with_defaults(options.defaults.clone()),
    );
    tokio::spawn(follow_leadership(leader, ctx.clone()));

    let ns = options.namespace.as_deref();
    let tiers: Api<CacheTier> = scoped(&client, ns);
    let owned = watcher::Config::default().labels(TIER_LABEL);
    let controller = Controller::new(tiers, watcher::Config::default());
    if let Some(webhook) = &options.webhook {
        start_webhook(&client, webhook, controller.store()).await?;
    }
    tokio::spawn(sweep_deleted(controller.store(), ctx.clone()));
    let controller = controller
        .owns(scoped::<StatefulSet>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned.clone())
        .owns(scoped::<ConfigMap>(&client, ns), owned.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), owned.clone())
        // A pod's phase and IP matter to the core: reconcile its tier.
        .watches(scoped::<Pod>(&client, ns), owned, |pod: Pod| {
            let tier = pod.metadata.labels.as_ref()?.get(TIER_LABEL)?.clone();
            Some(ObjectRef::<CacheTier>::new(&tier).within(pod.metadata.namespace.as_deref()?))
        })
        .shutdown_on_signal();
    metrics.set_ready(true);
    info!(identity = %options.identity, "controller started");
    controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|outcome| async move {
            if let Err(e) = outcome {
                warn!(error = %e, "controller");
            }
        })
        .await;
    metrics.set_ready(false);
    if let Some(cores) = &ctx.cores {
        cores.stop_all();
    }
    lease_task.abort();
    info!("controller stopped");
    Ok(())
}

/// Loads (or makes) the webhook's certificate, publishes its CA, and serves.
/// Every replica serves the webhook, leader or not.
async fn start_webhook(
    client: &kube::Client,
    options: &WebhookOptions,
    tiers: kube::runtime::reflector::Store<CacheTier>,
) -> Result<(), Error> {
    use crate::webhook::tls;
    let pem = tls::load(client, &options.certificate).await?;
    let certs = tls::Certificates::new(pem)?;
    let mut published = true;
    if let tls::Source::Generated { configuration, .. } = &options.certificate {
        // A missing configuration (webhook not installed) is not fatal here:
        // keep_current retries soon and logs.
        if let Err(e) = tls::publish_ca(client, configuration, &certs.ca()).await {
            warn!(error = %e, "cannot write the webhook caBundle yet");
            published = false;
        }
    }
    let sidecar = crate::inject::SidecarTemplate {
        image: options.sidecar_image.clone(),
        log_format: options.log_format.clone(),
    };
    tokio::spawn(crate::webhook::serve(options.addr, certs.clone(), sidecar, tiers).await?);
    tokio::spawn(tls::keep_current(
        client.clone(),
        options.certificate.clone(),
        certs,
        std::time::Duration::from_secs(600),
        published,
    ));
    Ok(())
}

/// An API for `K` in `namespace`, or in every namespace.
fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Stops the cores of tiers that were deleted. Nothing reconciles a deleted
/// object (owner references delete its pods), so its core must not keep
/// creating nodes for it.
async fn sweep_deleted(store: kube::runtime::reflector::Store<CacheTier>, ctx: Arc<Context>) {
    let Some(cores) = &ctx.cores else {
        return;
    };
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let alive: Vec<ObjectRef<CacheTier>> = store
            .state()
            .iter()
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect();
        cores.retain(&alive);
        for key in cores.stopped_since_last_sweep() {
            if let Some(ns) = &key.namespace {
                ctx.metrics.forget_tier(ns, &key.name);
            }
            info!(tier = %key.name, "tier deleted: its cluster core stopped");
        }
    }
}

/// Stops every cluster core the moment the lease is lost, and keeps the
/// leader and tiers gauges current.
async fn follow_leadership(mut leader: tokio::sync::watch::Receiver<bool>, ctx: Arc<Context>) {
    loop {
        let leading = *leader.borrow_and_update();
        ctx.metrics.leader.set(i64::from(leading));
        if !leading {
            ctx.forget_serving();
            if let Some(cores) = &ctx.cores {
                if !cores.is_empty() {
                    warn!("lost the lease: stopping every cluster core");
                }
                cores.stop_all();
            }
        }
        ctx.metrics.tiers.set(
            ctx.cores
                .as_ref()
                .map_or(0, |c| i64::try_from(c.len()).unwrap_or(0)),
        );
        if leader.changed().await.is_err() {
            return;
        }
    }
}
