//! The Kubernetes node pool against kube's mock API server.

use serde_json::{Value, json};

use super::*;
use crate::controller::mock::{self, Handle, bounded};

fn pool() -> (KubePool, Handle) {
    pool_with(json!({"shards": 1, "maxMemory": "1Gi"}))
}

fn pool_with(spec: Value) -> (KubePool, Handle) {
    let (client, handle) = mock::client();
    let tier: CacheTier = serde_json::from_value(json!({
        "apiVersion": "cachetier.io/v1alpha1", "kind": "CacheTier",
        "metadata": {"name": "t", "namespace": "ns", "uid": "u"},
        "spec": spec
    }))
    .unwrap();
    (
        KubePool::new(client, tier, reconcile::Defaults::default()),
        handle,
    )
}

fn pod(name: &str, ip: Option<&str>, deleting: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": {
            "cachetier.io/tier": "t", "cachetier.io/shard": "0",
            "controller-revision-hash": if name == "t-0-0" { "t-0-old" } else { "t-0-new" }
        }},
        "spec": {"containers": []},
        "status": {"phase": if ip.is_some() { "Running" } else { "Pending" }}
    });
    if let Some(ip) = ip {
        pod["status"]["podIP"] = json!(ip);
    }
    if deleting {
        pod["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
    }
    pod
}

async fn answer(handle: &mut Handle, body: Value) -> (String, String) {
    let (method, uri, _, send) = mock::next(handle).await;
    mock::respond(send, 200, &body);
    (method, uri)
}

#[tokio::test]
async fn pods_map_to_running_pending_and_terminating_nodes_named_by_their_dns_name() {
    let (pool, mut handle) = pool();
    let listing = tokio::spawn(async move { pool.list().await });
    let mut unschedulable = pod("t-0-2", None, false);
    unschedulable["status"]["conditions"] = json!([{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient memory."
    }]);
    let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        pod("t-0-1", Some("10.1.0.8"), false),
        pod("t-0-0", Some("10.1.0.7"), false),
        unschedulable,
        pod("t-0-3", Some("10.1.0.9"), true),
        pod("t-0-5", None, true),
    ]});
    let (method, uri) = answer(&mut handle, list).await;
    assert_eq!(method, "GET");
    assert!(uri.contains("labelSelector=cachetier.io%2Ftier%3Dt"), "{uri}");
    let sets = json!({"apiVersion": "apps/v1", "kind": "StatefulSetList", "metadata": {}, "items": [{
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "t-0", "namespace": "ns", "labels": {"cachetier.io/tier": "t", "cachetier.io/shard": "0"}},
        "spec": {"replicas": 5, "selector": {}, "serviceName": "t-nodes", "template": {}},
        "status": {"replicas": 4, "updateRevision": "t-0-new"}
    }]});
    let (_, uri) = answer(&mut handle, sets).await;
    assert!(
        uri.starts_with("/apis/apps/v1/namespaces/ns/statefulsets?"),
        "{uri}"
    );
    let listing = bounded(listing).await.unwrap();
    let nodes: Vec<_> = listing
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.addr.to_string(),
                n.terminating,
                n.incarnation.as_str(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("t-0-0", "10.1.0.7:6379".to_string(), false, "uid-t-0-0"),
            ("t-0-1", "10.1.0.8:6379".to_string(), false, "uid-t-0-1"),
            ("t-0-3", "10.1.0.9:6379".to_string(), true, "uid-t-0-3"),
        ],
        "a pod being deleted still answers until it is gone: observed, marked terminating"
    );
    assert_eq!(listing.nodes[0].hostname.as_deref(), Some("t-0-0.t-nodes.ns.svc"));
    let outdated: Vec<bool> = listing.nodes.iter().map(|n| n.outdated).collect();
    assert_eq!(
        outdated,
        [true, false, false],
        "t-0-0 runs the StatefulSet's old revision"
    );
    let pending: Vec<_> = listing
        .pending
        .iter()
        .map(|p| (p.name.as_str(), p.detail.as_str()))
        .collect();
    assert_eq!(
        pending,
        [
            (
                "t-0-2",
                "Unschedulable: 0/3 nodes are available: 3 Insufficient memory."
            ),
            ("t-0-4", "pod not created yet by StatefulSet t-0"),
        ],
        "a Pending pod and an ordinal the replicas cover without a pod are expected, not present; \
         a pod going away without an address is neither"
    );
}

fn set(replicas: i32) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "t-0", "namespace": "ns"},
           "spec": {"replicas": replicas, "selector": {}, "serviceName": "t-nodes", "template": {}}})
}

#[tokio::test]
async fn destroying_a_middle_node_deletes_its_pod_and_the_last_one_scales_down() {
    let (pool, mut handle) = pool();
    let p = pool.clone();
    let middle = tokio::spawn(async move { p.destroy("t-0-1").await });
    assert_eq!(answer(&mut handle, set(3)).await.0, "GET");
    let (method, uri) = answer(&mut handle, pod("t-0-1", None, true)).await;
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("DELETE", "/api/v1/namespaces/ns/pods/t-0-1?")
    );
    bounded(middle).await.unwrap();

    let p = pool.clone();
    let last = tokio::spawn(async move { p.destroy("t-0-2").await });
    assert_eq!(answer(&mut handle, set(3)).await.0, "GET");
    let (method, uri) = answer(&mut handle, set(2)).await;
    assert_eq!(method, "PATCH");
    assert!(
        uri.starts_with("/apis/apps/v1/namespaces/ns/statefulsets/t-0?")
            && uri.contains("fieldManager=cachetier-operator-pool"),
        "{uri}"
    );
    bounded(last).await.unwrap();
}

fn persistent() -> (KubePool, Handle) {
    pool_with(json!({"shards": 1, "maxMemory": "1Gi", "persistence": {"size": "4Gi"}}))
}

fn claim(name: &str, deleting: bool) -> Value {
    let mut claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "ns", "labels": {"cachetier.io/tier": "t"}},
        "spec": {}});
    if deleting {
        claim["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
        claim["metadata"]["finalizers"] = json!(["kubernetes.io/pvc-protection"]);
    }
    claim
}

#[tokio::test]
async fn replacing_a_node_with_persistence_deletes_its_volume_claim_then_its_pod() {
    let (pool, mut handle) = persistent();
    let p = pool.clone();
    let middle = tokio::spawn(async move { p.destroy("t-0-1").await });
    assert_eq!(answer(&mut handle, set(3)).await.0, "GET");
    let (method, uri) = answer(&mut handle, claim("data-t-0-1", true)).await;
    assert_eq!(
        (method.as_str(), uri.as_str()),
        (
            "DELETE",
            "/api/v1/namespaces/ns/persistentvolumeclaims/data-t-0-1?"
        ),
        "the claim of the replaced pod, not another one"
    );
    let (method, uri) = answer(&mut handle, pod("t-0-1", None, true)).await;
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("DELETE", "/api/v1/namespaces/ns/pods/t-0-1?")
    );
    bounded(middle).await.unwrap();
}

#[tokio::test]
async fn a_pending_pod_whose_volume_claim_is_being_deleted_is_deleted_to_unblock_both() {
    let (pool, mut handle) = persistent();
    let listing = tokio::spawn(async move { pool.list().await });
    let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
        pod("t-0-0", Some("10.1.0.7"), false),
        pod("t-0-1", None, false),
        pod("t-0-2", None, false),
    ]});
    answer(&mut handle, pods).await;
    let sets = json!({"apiVersion": "apps/v1", "kind": "StatefulSetList", "metadata": {}, "items": []});
    answer(&mut handle, sets).await;
    let claims = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {}, "items": [
        claim("data-t-0-0", false), claim("data-t-0-1", true), claim("data-t-0-2", false),
    ]});
    let (method, uri) = answer(&mut handle, claims).await;
    assert_eq!(method, "GET");
    assert!(
        uri.starts_with("/api/v1/namespaces/ns/persistentvolumeclaims?"),
        "{uri}"
    );
    let (method, uri) = answer(&mut handle, pod("t-0-1", None, true)).await;
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("DELETE", "/api/v1/namespaces/ns/pods/t-0-1?"),
        "only the pod stuck on a claim being deleted"
    );
    let listing = bounded(listing).await.unwrap();
    let pending: Vec<&str> = listing.pending.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pending, ["t-0-1", "t-0-2"]);
    assert!(
        listing.pending[0].detail.contains("volume claim"),
        "{:?}",
        listing.pending
    );
}

#[test]
fn node_names_parse_back_to_shard_and_ordinal_even_with_dashes_in_the_tier() {
    assert_eq!(parse_node("product-cache", "product-cache-2-1"), Some((2, 1)));
    assert_eq!(parse_node("product-cache", "product-cache-x-1"), None);
    assert_eq!(parse_node("product-cache", "other-2-1"), None);
}
