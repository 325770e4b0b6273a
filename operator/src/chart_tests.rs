//! The chart's dashboard and alerts query only metrics the code exports.
//!
//! The operator's metric names are read from a live registry (every series
//! observed once); the sidecar's from its metrics source, where each name is
//! a string literal under the `cachetier_sidecar` namespace.

use std::collections::BTreeSet;
use std::path::Path;

use cachetier_crds::{CacheTierStatus, FailoverRecord, NodeStatus, Phase, ShardStatus};

use crate::controller::metrics::Metrics;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
}

/// Every `cachetier_*` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("cachetier_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn operator_names() -> BTreeSet<String> {
    let metrics = Metrics::new().unwrap();
    metrics.reconcile_failed("invalid");
    drop(metrics.reconcile_started());
    let status = CacheTierStatus {
        phase: Some(Phase::Ready),
        shards: vec![ShardStatus {
            nodes: vec![NodeStatus {
                name: "n".into(),
                rtt_micros: Some(5),
                ..NodeStatus::default()
            }],
            ..ShardStatus::default()
        }],
        last_failover: Some(FailoverRecord {
            time: "t".into(),
            shard: 0,
            from: "a".into(),
            to: "b".into(),
            reason: "r".into(),
        }),
        last_eviction: Some(cachetier_crds::EvictionRecord {
            time: "t".into(),
            shard: 0,
            node: "a".into(),
            reason: "r".into(),
        }),
        ..CacheTierStatus::default()
    };
    metrics.observe_tier("ns", "t", &status, None);
    names_in(&metrics.render())
}

fn sidecar_names() -> BTreeSet<String> {
    let source = std::fs::read_to_string(root().join("sidecar/src/metrics.rs")).unwrap();
    let mut out = BTreeSet::new();
    // `…::new("name"` and `Opts::new("name"` / `HistogramOpts::new("name"`.
    for chunk in source.split("new(").skip(1) {
        let chunk = chunk.trim_start();
        if let Some(stripped) = chunk.strip_prefix('"') {
            let name: String = stripped.chars().take_while(|c| *c != '"').collect();
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                let full = format!("cachetier_sidecar_{name}");
                for suffix in ["", "_bucket", "_sum", "_count"] {
                    out.insert(format!("{full}{suffix}"));
                }
            }
        }
    }
    out
}

#[test]
fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let exported: BTreeSet<String> = operator_names().into_iter().chain(sidecar_names()).collect();
    assert!(
        exported.contains("cachetier_sidecar_cache_hits_total"),
        "{exported:?}"
    );
    assert!(
        exported.contains("cachetier_tier_failovers_total"),
        "{exported:?}"
    );
    for file in [
        "charts/cachetier/files/dashboard.json",
        "charts/cachetier/files/alerts.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let used = names_in(&text);
        assert!(!used.is_empty(), "{file} queries no metric");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics nothing exports: {unknown:?}"
        );
    }
}
