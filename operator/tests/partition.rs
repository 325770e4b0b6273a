//! The operator's view of the network is not the cluster's: the operator
//! reaches one node through a TCP relay (`cachetier-testkit`) that the test
//! cuts, while the nodes keep talking to each other directly.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cachetier_crds::Phase;
use cachetier_operator::cluster::{Listing, NodePool, Reconciler};
use cachetier_testkit::{Cut, Relay};
use support::*;
use tokio::time::Instant;

fn own_line(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("myself"))
        .unwrap_or_default()
        .to_string()
}

/// Slow-ish: about 15 s (the partition lasts past every failover bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_only_the_operator_cannot_reach_keeps_its_slots_and_the_tier_says_why() {
    let inner = pool("part");
    let t = tier("part", 2, 1);
    let status = Reconciler::new(inner.clone(), t.clone())
        .converge(Duration::from_secs(60))
        .await
        .unwrap();
    let primary = status.shards[0].nodes[0].name.clone();
    let real: SocketAddr = status.shards[0].nodes[0].address.parse().unwrap();
    let direct: Vec<SocketAddr> = inner.list().await.unwrap().nodes.iter().map(|n| n.addr).collect();
    // The operator reaches the primary through a relay the test can cut.
    let relay = Relay::start(real).await.unwrap();
    let through = relay.addr();
    let name = primary.clone();
    let pool = Arc::new(Tweaked {
        inner: inner.clone(),
        tweak: move |listing: &mut Listing| {
            for n in listing.nodes.iter_mut().filter(|n| n.name == name) {
                n.addr = through;
            }
        },
    });
    let mut rec = Reconciler::new(pool.clone(), t.clone());
    rec.converge(Duration::from_secs(30)).await.unwrap();
    let mut client = ClusterClient::new(direct.clone()).await;
    for i in 0..500 {
        client.set(&format!("p:{i}"), "v").await.unwrap();
    }

    relay.cut(Cut::Blackhole);
    let cut = Instant::now();
    let bound = t.health.response_timeout * t.health.failure_threshold
        + t.health.probe_interval
        + t.timing.node_timeout
        + t.timing.failover_margin;
    let mut written = 500;
    let mut last = None;
    while cut.elapsed() < bound + Duration::from_secs(3) {
        let round = rec.round().await.unwrap();
        last = Some(round.status);
        for _ in 0..20 {
            client.set(&format!("p:{written}"), "v").await.unwrap();
            written += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = own_line(&query_string(real, &["CLUSTER", "NODES"]).await);
    assert!(
        line.contains("master") && line.contains(" 0-"),
        "{primary} lost its slots: {line}"
    );
    let status = last.unwrap();
    assert_eq!(status.phase, Some(Phase::Degraded), "{status:?}");
    let degraded = status.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert!(
        degraded.message.contains(&primary) && degraded.message.contains("unreachable by the operator only"),
        "{degraded:?}"
    );

    relay.restore();
    rec.converge(Duration::from_secs(30)).await.unwrap();
    let line = own_line(&query_string(real, &["CLUSTER", "NODES"]).await);
    assert!(
        line.contains(" 0-"),
        "{primary} lost its slots after the partition: {line}"
    );
    let mut client = ClusterClient::new(direct).await;
    for i in 0..written {
        assert_eq!(
            client.get(&format!("p:{i}")).await.unwrap().as_deref(),
            Some("v"),
            "p:{i} lost"
        );
    }
    inner.shutdown().await;
}
