//! Controller wiring against kube's mock API server (the ApiServerVerifier
//! pattern): every request the reconcile makes is checked in order, and
//! answered as an API server would.

use std::sync::Arc;
use std::time::Duration;

use cachetier_crds::CacheTier;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::Value;
use tokio::sync::watch;

use super::metrics::Metrics;
use super::mock::{self, Handle, bounded, next, respond};
use super::reconcile::{Context, reconcile};

fn tier(extra: &str) -> CacheTier {
    let yaml = format!(
        "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {{name: t, namespace: ns, uid: uid-1, generation: 2}}\nspec: {{shards: 2, replicasPerShard: 1, maxMemory: 1Gi{extra}}}\n"
    );
    let value: Value = yaml_serde::from_str(&yaml).unwrap();
    serde_json::from_value(value).unwrap()
}

fn context(leader: bool) -> (Arc<Context>, Handle, watch::Sender<bool>) {
    context_with(leader, crate::reconcile::Defaults::default())
}

fn context_with(
    leader: bool,
    defaults: crate::reconcile::Defaults,
) -> (Arc<Context>, Handle, watch::Sender<bool>) {
    let (client, handle) = mock::client();
    let reporter = Reporter {
        controller: "cachetier-operator".into(),
        instance: Some("test".into()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let (tx, rx) = watch::channel(leader);
    let metrics = Arc::new(Metrics::new().unwrap());
    (
        Arc::new(Context::new(client, recorder, metrics, rx, None).with_defaults(defaults)),
        handle,
        tx,
    )
}

#[tokio::test]
async fn a_new_tier_is_applied_object_by_object_then_its_status_is_written() {
    let (ctx, mut handle, _leader) = context(true);
    let t = Arc::new(tier(""));
    let task = tokio::spawn(reconcile(t.clone(), ctx));
    let expected = [
        "/api/v1/namespaces/ns/configmaps/t-config",
        "/api/v1/namespaces/ns/services/t-nodes",
        "/api/v1/namespaces/ns/services/t",
        "/apis/apps/v1/namespaces/ns/statefulsets/t-0",
        "/apis/policy/v1/namespaces/ns/poddisruptionbudgets/t-0",
        "/apis/apps/v1/namespaces/ns/statefulsets/t-1",
        "/apis/policy/v1/namespaces/ns/poddisruptionbudgets/t-1",
    ];
    for path in expected {
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, "PATCH", "{uri}");
        assert!(uri.starts_with(&format!("{path}?")), "expected {path}, got {uri}");
        assert!(
            uri.contains("fieldManager=cachetier-operator") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-1", "{uri}");
        if path.contains("statefulsets") {
            assert!(
                body["spec"].get("replicas").is_none(),
                "replicas belong to the node pool: {body}"
            );
        }
        respond(send, 200, &body);
    }
    let (method, uri, body, send) = next(&mut handle).await;
    assert_eq!(method, "PATCH");
    assert!(
        uri.starts_with("/apis/cachetier.io/v1alpha1/namespaces/ns/cachetiers/t/status?"),
        "{uri}"
    );
    assert_eq!(body["status"]["phase"], "Bootstrapping");
    assert_eq!(body["status"]["selector"], "cachetier.io/tier=t");
    assert_eq!(body["status"]["observedGeneration"], 2);
    respond(send, 200, &serde_json::to_value(t.as_ref()).unwrap());
    // Bootstrapping is worth an Event.
    let (method, uri, body, send) = next(&mut handle).await;
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("POST", "/apis/events.k8s.io/v1/namespaces/ns/events?")
    );
    assert_eq!(body["reason"], "Bootstrapping");
    respond(send, 200, &body);
    let action = bounded(task).await.unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(super::reconcile::RESYNC)
    );
}

#[tokio::test]
async fn an_invalid_spec_touches_no_object_and_says_why_in_a_condition_and_an_event() {
    let (ctx, mut handle, _leader) = context(true);
    // Passes the API server's CEL rule (names are matched as written) but not
    // the operator's case-insensitive check.
    let t = Arc::new(tier(", redisConfig: {PORT: '7000'}"));
    let task = tokio::spawn(reconcile(t.clone(), ctx.clone()));
    let (method, uri, body, send) = next(&mut handle).await;
    assert_eq!(method, "PATCH");
    assert!(
        uri.starts_with("/apis/cachetier.io/v1alpha1/namespaces/ns/cachetiers/t/status?"),
        "{uri}"
    );
    assert_eq!(body["status"]["phase"], "Invalid");
    let ready = &body["status"]["conditions"][0];
    assert_eq!(
        (
            ready["type"].as_str(),
            ready["status"].as_str(),
            ready["reason"].as_str()
        ),
        (Some("Ready"), Some("False"), Some("InvalidSpec"))
    );
    assert!(
        ready["message"].as_str().unwrap().contains("operator owns: PORT"),
        "{ready}"
    );
    respond(send, 200, &serde_json::to_value(t.as_ref()).unwrap());
    let (method, _, body, send) = next(&mut handle).await;
    assert_eq!(method, "POST");
    assert_eq!(
        (body["reason"].as_str(), body["type"].as_str()),
        (Some("InvalidSpec"), Some("Warning"))
    );
    respond(send, 200, &body);
    let action = bounded(task).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    assert!(
        ctx.metrics
            .render()
            .contains("cachetier_operator_reconcile_errors_total{reason=\"invalid\"} 1")
    );
}

#[tokio::test]
async fn pod_overrides_that_break_the_pod_template_touch_no_object_and_say_why() {
    let (ctx, mut handle, _leader) = context(true);
    let t = Arc::new(tier(
        ", podOverrides: {spec: {containers: [{name: redis, ports: [{containerPort: nine}]}]}}",
    ));
    let task = tokio::spawn(reconcile(t.clone(), ctx.clone()));
    let (method, uri, body, send) = next(&mut handle).await;
    assert_eq!(method, "PATCH");
    assert!(uri.contains("/cachetiers/t/status?"), "{uri}");
    assert_eq!(body["status"]["phase"], "Invalid");
    let message = body["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.podOverrides: the patched pod template is not valid"),
        "{message}"
    );
    respond(send, 200, &serde_json::to_value(t.as_ref()).unwrap());
    let (method, _, body, send) = next(&mut handle).await;
    assert_eq!(
        (method.as_str(), body["reason"].as_str()),
        ("POST", Some("InvalidSpec"))
    );
    respond(send, 200, &body);
    let action = bounded(task).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn the_operators_redis_image_is_applied_to_a_tier_without_spec_image() {
    let mirror = crate::reconcile::Defaults {
        redis_image: "mirror.internal/redis:7.2.5".into(),
    };
    let (ctx, mut handle, _leader) = context_with(true, mirror);
    let task = tokio::spawn(reconcile(Arc::new(tier("")), ctx));
    let mut images = Vec::new();
    while images.len() < 2 {
        let (_, uri, body, send) = next(&mut handle).await;
        if uri.contains("/statefulsets/") {
            images.push(body["spec"]["template"]["spec"]["containers"][0]["image"].clone());
        }
        respond(send, 200, &body);
    }
    assert_eq!(images, ["mirror.internal/redis:7.2.5"; 2]);
    task.abort();
}

#[tokio::test]
async fn a_replica_without_the_lease_makes_no_request_at_all() {
    let (ctx, mut handle, leader) = context(true);
    leader.send_replace(false);
    let action = reconcile(Arc::new(tier("")), ctx).await.unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(super::reconcile::RESYNC)
    );
    let request = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    assert!(
        request.is_err() || request.is_ok_and(|r| r.is_none()),
        "a standby sent a request"
    );
}

/// A leader that loses its lease stops acting at once: its cluster cores are
/// stopped, and nothing they started reaches the API server afterwards.
#[tokio::test]
async fn losing_the_lease_stops_every_core_before_its_next_request() {
    let (client, mut handle) = mock::client();
    let reporter = Reporter {
        controller: "cachetier-operator".into(),
        instance: Some("test".into()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let (leader, rx) = watch::channel(true);
    let metrics = Arc::new(Metrics::new().unwrap());
    let cores = super::cores::Cores::default();
    let ctx = Arc::new(Context::new(
        client.clone(),
        recorder,
        metrics,
        rx.clone(),
        Some(cores),
    ));
    let follower = tokio::spawn(super::follow_leadership(rx, ctx.clone()));
    let t = tier("");
    let status = ctx.cores.as_ref().unwrap().ensure(client, &t).await.unwrap();
    assert!(status.is_none(), "no round has run yet");
    // The core's first round lists the tier's pods.
    let (method, uri, _, send) = next(&mut handle).await;
    assert_eq!(method, "GET");
    assert!(uri.starts_with("/api/v1/namespaces/ns/pods?"), "{uri}");
    leader.send_replace(false);
    let cores = ctx.cores.as_ref().unwrap();
    let start = tokio::time::Instant::now();
    while !cores.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(2), "the core still runs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its pending request is answered; nothing may follow it.
    respond(
        send,
        200,
        &serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
    );
    let request = tokio::time::timeout(Duration::from_millis(500), handle.next_request()).await;
    assert!(
        request.is_err() || request.is_ok_and(|r| r.is_none()),
        "a core kept talking to the API server after the lease was lost"
    );
    follower.abort();
}
