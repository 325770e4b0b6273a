//! Prometheus metrics and the `/metrics`, `/livez`, `/readyz` HTTP endpoints,
//! served on their own port so scraping never competes with the Redis port.
//!
//! Label values are bounded: command names come from the shipped command
//! table (unknown commands are counted as `unknown`), node labels are
//! `HOST:PORT` of cluster members.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

use crate::error::{Error, Result};

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// All of the sidecar's metrics, registered in a private registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Client requests by command and outcome (`ok`, or `error` for any error reply).
    pub requests: IntCounterVec,
    /// Client-side latency by command.
    pub latency: HistogramVec,
    /// Upstream request latency by node.
    pub upstream_latency: HistogramVec,
    /// Upstream failures by node and reason (`timeout`, `closed`, `connect`, `protocol`).
    pub upstream_errors: IntCounterVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_evictions: IntCounter,
    pub cache_bytes: IntGauge,
    pub cache_entries: IntGauge,
    /// Entries dropped by invalidation, by source (`own_write`, `tracking`, `tracking_lost`, `flush`).
    pub cache_invalidations: IntCounterVec,
    /// Client requests that waited on another request's identical upstream fetch.
    pub coalesced: IntCounter,
    pub watchdog_closures: IntCounterVec,
    /// 1 when the node takes reads (healthy and, for replicas, gate open).
    pub node_serving: IntGaugeVec,
    /// Reads that wanted a replica but fell back to the primary.
    pub primary_fallbacks: IntCounter,
    /// Reads sent to a primary because the client wrote the slot and no
    /// replica has caught up past that write yet (read-your-writes).
    pub read_your_writes_primary_reads: IntCounter,
    /// Reads retried on another node after an upstream failure.
    pub read_retries: IntCounter,
    /// Writes sent again because their primary knew no owner for the slot.
    pub write_retries: IntCounter,
    /// Transactions whose keys spanned slots, run as one per slot.
    pub split_transactions: IntCounter,
    pub pops_across_slots: IntCounter,
    pub stream_reads_across_slots: IntCounter,
    /// Topology refreshes by result (`ok`, `error`).
    pub topology_refreshes: IntCounterVec,
    pub redirects: IntCounterVec,
    pub client_connections: IntGauge,
    /// Client connections accepted (`INFO`'s `total_connections_received`).
    pub client_connections_accepted: IntCounter,
    /// Clients disconnected for not reading their replies (output limit).
    pub output_limit_closes: IntCounter,
    /// Clients with `CLIENT TRACKING` on.
    pub tracking_clients: IntGauge,
    /// `invalidate` pushes sent to tracking clients (a flush counts as one).
    pub tracking_pushes: IntCounter,
    /// Flushes sent to tracking clients, by reason.
    pub tracking_flushes: IntCounterVec,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("cachetier_sidecar".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Client requests by command and outcome"),
            &["command", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Client request latency")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["command"],
        )?;
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new("upstream_duration_seconds", "Upstream request latency by node")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["node"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new("upstream_errors_total", "Upstream failures by node and reason"),
            &["node", "reason"],
        )?;
        let cache_hits = IntCounter::new("cache_hits_total", "Local cache hits")?;
        let cache_misses = IntCounter::new("cache_misses_total", "Local cache misses")?;
        let cache_evictions = IntCounter::new("cache_evictions_total", "Entries evicted for size or TTL")?;
        let cache_bytes = IntGauge::new("cache_bytes", "Weighted size of the local cache")?;
        let cache_entries = IntGauge::new("cache_entries", "Entries in the local cache")?;
        let cache_invalidations = IntCounterVec::new(
            Opts::new("cache_invalidations_total", "Local cache invalidations by source"),
            &["source"],
        )?;
        let coalesced = IntCounter::new(
            "cache_coalesced_total",
            "Requests served by another request's upstream fetch",
        )?;
        let watchdog_closures = IntCounterVec::new(
            Opts::new(
                "watchdog_closures_total",
                "Upstream connections closed by the response watchdog",
            ),
            &["node"],
        )?;
        let node_serving = IntGaugeVec::new(
            Opts::new("node_serving", "1 if the node currently takes reads"),
            &["node", "role"],
        )?;
        let primary_fallbacks = IntCounter::new(
            "primary_fallbacks_total",
            "Reads sent to a primary because no replica was serving",
        )?;
        let read_your_writes_primary_reads = IntCounter::new(
            "read_your_writes_primary_reads_total",
            "Reads sent to a primary because the client wrote the slot and no replica had caught up",
        )?;
        let read_retries = IntCounter::new(
            "read_retries_total",
            "Reads retried on another node after a failure",
        )?;
        let write_retries = IntCounter::new(
            "write_retries_total",
            "Writes sent again because their primary refused them with CLUSTERDOWN Hash slot not served",
        )?;
        let split_transactions = IntCounter::new(
            "split_transactions_total",
            "MULTI/EXEC transactions whose keys spanned slots, run as one transaction per slot",
        )?;
        let pops_across_slots = IntCounter::new(
            "blocking_pops_across_slots_total",
            "Blocking pops (BLPOP, BRPOP, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP) whose keys spanned slots",
        )?;
        let stream_reads_across_slots = IntCounter::new(
            "stream_reads_across_slots_total",
            "XREAD/XREADGROUP calls whose streams spanned slots",
        )?;
        let topology_refreshes = IntCounterVec::new(
            Opts::new("topology_refreshes_total", "Topology refreshes by result"),
            &["result"],
        )?;
        let redirects = IntCounterVec::new(
            Opts::new("redirects_total", "MOVED/ASK redirects followed"),
            &["kind"],
        )?;
        let client_connections = IntGauge::new("client_connections", "Open client connections")?;
        let client_connections_accepted =
            IntCounter::new("client_connections_accepted_total", "Client connections accepted")?;
        let output_limit_closes = IntCounter::new(
            "client_output_limit_closes_total",
            "Clients disconnected because their unread replies passed the output limit",
        )?;
        let tracking_clients =
            IntGauge::new("tracking_clients", "Client connections with CLIENT TRACKING on")?;
        let tracking_pushes = IntCounter::new(
            "tracking_pushes_total",
            "Invalidation pushes sent to clients with CLIENT TRACKING on",
        )?;
        let tracking_flushes = IntCounterVec::new(
            Opts::new(
                "tracking_flushes_total",
                "Flushes (null invalidations) sent to tracking clients, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(tracking_clients.clone()))?;
        registry.register(Box::new(tracking_pushes.clone()))?;
        registry.register(Box::new(tracking_flushes.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(upstream_latency.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(cache_hits.clone()))?;
        registry.register(Box::new(cache_misses.clone()))?;
        registry.register(Box::new(cache_evictions.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_invalidations.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(watchdog_closures.clone()))?;
        registry.register(Box::new(node_serving.clone()))?;
        registry.register(Box::new(primary_fallbacks.clone()))?;
        registry.register(Box::new(read_retries.clone()))?;
        registry.register(Box::new(write_retries.clone()))?;
        registry.register(Box::new(split_transactions.clone()))?;
        registry.register(Box::new(pops_across_slots.clone()))?;
        registry.register(Box::new(stream_reads_across_slots.clone()))?;
        registry.register(Box::new(read_your_writes_primary_reads.clone()))?;
        registry.register(Box::new(topology_refreshes.clone()))?;
        registry.register(Box::new(redirects.clone()))?;
        registry.register(Box::new(client_connections.clone()))?;
        registry.register(Box::new(client_connections_accepted.clone()))?;
        registry.register(Box::new(output_limit_closes.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            upstream_latency,
            upstream_errors,
            cache_hits,
            cache_misses,
            cache_evictions,
            cache_bytes,
            cache_entries,
            cache_invalidations,
            coalesced,
            watchdog_closures,
            node_serving,
            primary_fallbacks,
            read_retries,
            write_retries,
            split_transactions,
            pops_across_slots,
            stream_reads_across_slots,
            read_your_writes_primary_reads,
            topology_refreshes,
            redirects,
            client_connections,
            client_connections_accepted,
            output_limit_closes,
            tracking_clients,
            tracking_pushes,
            tracking_flushes,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

fn respond(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/livez" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" if metrics.is_ready() => (StatusCode::OK, "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "topology not known yet\n".to_string(),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Bind the metrics listener; the returned future serves until dropped.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let fut = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = respond(&metrics, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    };
    Ok((local, fut))
}
