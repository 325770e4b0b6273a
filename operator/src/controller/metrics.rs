//! The controller's Prometheus metrics and its `/metrics`, `/livez`, `/readyz`
//! endpoints. Failure counters are labelled by error class ([`Error::label`]),
//! a bounded set.
//!
//! [`Error::label`]: crate::cluster::error::Error::label

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
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
    ready: AtomicBool,
}

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
        Ok(Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            tiers,
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
