//! The controller's Prometheus metrics and its `/metrics`, `/livez`, `/readyz`
//! endpoints. Failure counters are labelled by error class ([`Error::label`]),
//! a bounded set.
//!
//! [`Error::label`]: crate::cluster::error::Error::label

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cachetier_crds::{CacheTierStatus, NodeHealth, Phase};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::cluster::error::Error;

/// Every metric of the controller, in a private registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounter,
    failures: IntCounterVec,
    duration: Histogram,
    /// 1 while this replica holds the lease.
    pub leader: IntGauge,
    /// Tiers whose cluster core runs here.
    pub tiers: IntGauge,
    phase: IntGaugeVec,
    nodes: IntGaugeVec,
    nodes_ready: IntGaugeVec,
    nodes_failed: IntGaugeVec,
    slots_covered: IntGaugeVec,
    node_rtt: GaugeVec,
    failovers: IntCounterVec,
    evictions: IntCounterVec,
    ready: AtomicBool,
}

const PHASES: [Phase; 6] = [
    Phase::Bootstrapping,
    Phase::Ready,
    Phase::Scaling,
    Phase::Degraded,
    Phase::Unavailable,
    Phase::Invalid,
];

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    // Names are constants below; registering a duplicate is a bug caught by the tests.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

impl Metrics {
    /// The metrics, registered.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = register(
            &registry,
            IntCounter::new(
                "cachetier_operator_reconciles_total",
                "CacheTier reconciles started",
            )?,
        );
        let failures = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachetier_operator_reconcile_errors_total",
                    "Failed reconciles by error class (invalid = a refused spec)",
                ),
                &["reason"],
            )?,
        );
        let duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "cachetier_operator_reconcile_duration_seconds",
                    "Time one reconcile took",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
        );
        let leader = register(
            &registry,
            IntGauge::new(
                "cachetier_operator_leader",
                "1 while this replica holds the lease",
            )?,
        );
        let tiers = register(
            &registry,
            IntGauge::new(
                "cachetier_operator_tiers",
                "Tiers whose cluster core runs in this replica",
            )?,
        );
        let per_tier = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            Ok(register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), &["namespace", "tier"])?,
            ))
        };
        let nodes = per_tier("cachetier_tier_nodes", "Nodes the spec asks for")?;
        let nodes_ready = per_tier(
            "cachetier_tier_nodes_ready",
            "Nodes that are healthy and in their intended role",
        )?;
        let nodes_failed = per_tier(
            "cachetier_tier_nodes_failed",
            "Nodes whose probes failed failureThreshold times in a row",
        )?;
        let slots_covered = per_tier(
            "cachetier_tier_slots_covered",
            "Hash slots (of 16384) served by a reachable primary",
        )?;
        let phase = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("cachetier_tier_phase", "1 for the tier's current phase"),
                &["namespace", "tier", "phase"],
            )?,
        );
        let node_rtt = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "cachetier_node_rtt_seconds",
                    "Round-trip time of the last successful probe",
                ),
                &["namespace", "tier", "node"],
            )?,
        );
        let failovers = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachetier_tier_failovers_total",
                    "Failovers seen (a replica became primary)",
                ),
                &["namespace", "tier"],
            )?,
        );
        let evictions = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "cachetier_tier_evictions_total",
                    "Failed replicas removed and replaced",
                ),
                &["namespace", "tier"],
            )?,
        );
        Ok(Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            tiers,
            phase,
            nodes,
            nodes_ready,
            nodes_failed,
            slots_covered,
            node_rtt,
            failovers,
            evictions,
            ready: AtomicBool::new(false),
        })
    }

    /// Counts a reconcile and times it until the returned timer is observed.
    pub fn reconcile_started(&self) -> prometheus::HistogramTimer {
        self.reconciles.inc();
        self.duration.start_timer()
    }

    /// Counts a failed reconcile by class.
    pub fn reconcile_failed(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    /// Records what a tier's status says (before per-node figures are
    /// stripped from it); `previous` tells new failovers and evictions apart.
    pub fn observe_tier(
        &self,
        namespace: &str,
        tier: &str,
        status: &CacheTierStatus,
        previous: Option<&CacheTierStatus>,
    ) {
        let labels = [namespace, tier];
        self.nodes
            .with_label_values(&labels)
            .set(i64::from(status.total_nodes));
        self.nodes_ready
            .with_label_values(&labels)
            .set(i64::from(status.ready_nodes));
        let failed = status
            .shards
            .iter()
            .flat_map(|s| s.nodes.iter())
            .filter(|n| n.health == NodeHealth::Failed)
            .count();
        self.nodes_failed
            .with_label_values(&labels)
            .set(i64::try_from(failed).unwrap_or(i64::MAX));
        self.slots_covered
            .with_label_values(&labels)
            .set(i64::from(status.slots_covered));
        for phase in PHASES {
            let name = format!("{phase:?}");
            self.phase
                .with_label_values(&[namespace, tier, name.as_str()])
                .set(i64::from(status.phase == Some(phase)));
        }
        for node in status.shards.iter().flat_map(|s| s.nodes.iter()) {
            if let Some(rtt) = node.rtt_micros {
                self.node_rtt
                    .with_label_values(&[namespace, tier, node.name.as_str()])
                    .set(rtt as f64 / 1e6);
            }
        }
        let before = previous.and_then(|p| p.last_failover.as_ref());
        if status.last_failover.is_some() && status.last_failover.as_ref() != before {
            self.failovers.with_label_values(&labels).inc();
        }
        let before = previous.and_then(|p| p.last_eviction.as_ref());
        if status.last_eviction.is_some() && status.last_eviction.as_ref() != before {
            self.evictions.with_label_values(&labels).inc();
        }
    }

    /// Drops every series of a deleted tier.
    pub fn forget_tier(&self, namespace: &str, tier: &str) {
        for vec in [
            &self.nodes,
            &self.nodes_ready,
            &self.nodes_failed,
            &self.slots_covered,
        ] {
            let _ = vec.remove_label_values(&[namespace, tier]);
        }
        for phase in PHASES {
            let name = format!("{phase:?}");
            let _ = self.phase.remove_label_values(&[namespace, tier, name.as_str()]);
        }
    }

    /// Marks the controller ready (its watches are running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match req.uri().path() {
            "/metrics" => (StatusCode::OK, self.render()),
            "/livez" => (StatusCode::OK, "ok\n".to_string()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ready\n".to_string()),
            "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_string()),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp
    }
}

/// Serves the endpoints on `addr` until the returned future is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<impl Future<Output = ()>, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("binding the metrics address {addr}"),
        source,
    })?;
    Ok(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = metrics.respond(&req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_documented_name() {
        let m = Metrics::new().unwrap();
        m.reconcile_failed("invalid");
        drop(m.reconcile_started());
        let text = m.render();
        for name in [
            "cachetier_operator_reconciles_total 1",
            "cachetier_operator_reconcile_errors_total{reason=\"invalid\"} 1",
            "cachetier_operator_reconcile_duration_seconds_count",
            "cachetier_operator_leader 0",
            "cachetier_operator_tiers 0",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
    }
}
