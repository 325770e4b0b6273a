//! `spec.auth` against real `redis-server` processes: every node requires the
//! password, the operator's connections, replication and `MIGRATE`
//! authenticate, and a probe refused for its credentials is a configuration
//! error on the tier, not a healthy node.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use cachetier_crds::{CacheTierStatus, Phase};
use cachetier_operator::cluster::config::Auth;
use cachetier_operator::cluster::health::probe_as;
use cachetier_operator::cluster::{NodePool as _, Reconciler};
use support::*;

fn addrs(status: &CacheTierStatus) -> Vec<SocketAddr> {
    status
        .shards
        .iter()
        .flat_map(|s| s.nodes.iter())
        .filter_map(|n| n.address.parse().ok())
        .collect()
}

const PASSWORD: &str = "s3cret with spaces";

/// Slow-ish: about 10 s (bootstrap, then a 2 → 3 reshard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_with_a_password_requires_it_everywhere_and_still_bootstraps_replicates_and_reshards() {
    let pool = pool("auth");
    let mut t = tier("auth", 2, 1);
    t.auth = Some(Auth {
        username: None,
        password: PASSWORD.into(),
    });
    let mut rec = Reconciler::new(pool.clone(), t.clone());
    let status = rec.converge(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        status.ready.as_deref(),
        Some("4/4"),
        "replicas synced with masterauth"
    );

    let node = pool.list().await.unwrap().nodes[0].addr;
    let mut anonymous = conn(node).await;
    let refused = redis::cmd("GET")
        .arg("x")
        .query_async::<Option<String>>(&mut anonymous)
        .await;
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("NOAUTH")),
        "served without a password: {refused:?}"
    );

    let mut client = ClusterClient::with_password(addrs(&status), Some(PASSWORD.into())).await;
    for i in 0..500 {
        client.set(&format!("a:{i}"), "v").await.unwrap();
    }
    t.shards = 3;
    rec.set_tier(t.clone());
    let status = rec.converge(Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.current_shards, 3, "MIGRATE authenticated to the new shard");
    let mut client = ClusterClient::with_password(addrs(&status), Some(PASSWORD.into())).await;
    for i in 0..500 {
        assert_eq!(
            client.get(&format!("a:{i}")).await.unwrap().as_deref(),
            Some("v"),
            "a:{i} lost"
        );
    }

    // Probes: the right password is healthy; none or a wrong one is an
    // authentication error, not an answer.
    let timeout = Duration::from_secs(2);
    let right = t.auth.clone().unwrap();
    assert!(probe_as(node, timeout, Some(&right)).await.is_ok());
    let none = probe_as(node, timeout, None).await.unwrap_err();
    assert!(
        none.starts_with("authentication") && none.contains("NOAUTH"),
        "{none}"
    );
    let wrong = Auth {
        username: None,
        password: "nope".into(),
    };
    let err = probe_as(node, timeout, Some(&wrong)).await.unwrap_err();
    assert!(
        err.starts_with("authentication") && err.contains("WRONGPASS"),
        "{err}"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_with_the_wrong_password_reports_a_configuration_error_on_the_tier() {
    let pool = pool("badauth");
    let mut t = tier("badauth", 1, 0);
    t.auth = Some(Auth {
        username: None,
        password: PASSWORD.into(),
    });
    Reconciler::new(pool.clone(), t.clone())
        .converge(Duration::from_secs(60))
        .await
        .unwrap();
    t.auth = Some(Auth {
        username: None,
        password: "wrong".into(),
    });
    let mut rec = Reconciler::new(pool.clone(), t.clone());
    let start = tokio::time::Instant::now();
    let status = loop {
        let s = rec.round().await.unwrap().status;
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        if degraded.reason == "AuthenticationFailed" {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never reported: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(status.phase, Some(Phase::Ready));
    let node = &status.shards[0].nodes[0];
    assert!(!node.serving);
    assert!(
        node.reason
            .as_deref()
            .is_some_and(|r| r.contains("configuration error") && r.contains("WRONGPASS")),
        "{node:?}"
    );
    pool.shutdown().await;
}
