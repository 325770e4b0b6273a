//! The whole product on a real Kubernetes cluster: the Helm chart installs the
//! operator, a 3×1 CacheTier becomes Ready, keys survive the loss of a primary
//! pod and a reshard 3 → 4 → 3, an opted-in pod gets the sidecar and reaches
//! the tier through localhost, an unlabelled pod is untouched, and deleting
//! the tier removes everything. Runs only when `KUBECONFIG` is set; needs the
//! images in `CACHETIER_OPERATOR_IMAGE` / `CACHETIER_SIDECAR_IMAGE` (see
//! `e2e/README.md`).

// Test helpers: a panic with the unwrapped error is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cachetier_e2e::{Kubectl, OperatorEnv, kubernetes, split_image, wait_for};

const TIER: &str = "product-cache";
const KEYS: usize = 300;
/// The image a tier is rolled to (the example's is `redis:7.2`).
const ROLLED_IMAGE: &str = "redis:7.2.5";

fn jsonpath(k: Kubectl, ns: &str, object: &str, path: &str) -> Result<String, String> {
    k.get(&["get", "-n", ns, object, "-o", &format!("jsonpath={path}")])
}

/// Ready with `shards` shards, in a status computed for the tier's current
/// spec (`observedGeneration`: a status of the spec before an edit, or
/// before `kubectl scale`, does not count).
fn wait_ready(k: Kubectl, ns: &str, shards: usize) {
    wait_for(
        &format!("CacheTier {TIER} Ready with {shards} shards"),
        Duration::from_secs(900),
        || {
            let seen = jsonpath(
                k,
                ns,
                &format!("cachetier/{TIER}"),
                "{.metadata.generation} {.status.observedGeneration} {.status.phase} {.status.currentShards}",
            )?;
            let shards = shards.to_string();
            match seen.split(' ').collect::<Vec<_>>()[..] {
                [generation, observed, "Ready", current] if generation == observed && current == shards => {
                    Ok(())
                }
                _ => Err(format!(
                    "generation, observedGeneration, phase, currentShards: {seen}"
                )),
            }
        },
    );
}

/// Every key written reads back. Waited for (a failover or the last step of
/// a reshard may still be under way when the status says Ready); a lost
/// key never comes back, so a loss still fails, naming the count.
fn all_keys_read_back(k: Kubectl, ns: &str, after: &str) {
    wait_for(
        &format!("all {KEYS} keys read back {after}"),
        Duration::from_secs(300),
        || {
            let n = count_keys(k, ns)?;
            if n == KEYS {
                Ok(())
            } else {
                Err(format!("{n} of {KEYS} keys read back"))
            }
        },
    );
}

/// Nothing is left of an earlier run that stopped half-way (its tier, at
/// whatever scale or image, and its pods): this run starts from none.
fn clean_up_earlier_runs(k: Kubectl, ns: &str) {
    delete_test_pods(k, ns);
    k.ok(&[
        "delete",
        "-n",
        ns,
        &format!("cachetier/{TIER}"),
        "--ignore-not-found",
        "--timeout=300s",
    ]);
    wait_pods_gone(k, ns);
}

/// The test's own pods are asked to go (whichever exist).
fn delete_test_pods(k: Kubectl, ns: &str) {
    k.ok(&[
        "delete",
        "-n",
        ns,
        "pod",
        "e2e-injected",
        "e2e-plain",
        "e2e-outage",
        "--ignore-not-found",
        "--wait=false",
    ]);
}

/// The tier's pods and the test's own are gone (deleted pods keep their
/// names, and so the cluster state in memory, until they end).
fn wait_pods_gone(k: Kubectl, ns: &str) {
    wait_for(
        "the pods of the tier and of the test to be gone",
        Duration::from_secs(300),
        || {
            let pods = k.get(&["get", "pods", "-n", ns, "-o", "name"])?;
            let left: Vec<&str> = pods
                .lines()
                .filter(|p| p.starts_with(&format!("pod/{TIER}-")) || p.starts_with("pod/e2e-"))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join(" "))
            }
        },
    );
}

/// Runs a shell script in the Redis container of the tier's first pod (the
/// Redis image has `sh` and `redis-cli`; `-c` follows MOVED).
fn redis_sh(k: Kubectl, ns: &str, script: &str) -> Result<String, String> {
    let pod = format!("{TIER}-0-0");
    k.get(&["exec", "-n", ns, &pod, "-c", "redis", "--", "sh", "-c", script])
}

fn write_keys(k: Kubectl, ns: &str) {
    // Each SET and its WAIT 1 share one connection (redis-cli -c follows a
    // MOVED to the key's primary and sends the WAIT there), so a key counts
    // as written only once its primary's replica has it.
    let out = redis_sh(
        k,
        ns,
        &format!(
            "for i in $(seq 1 {KEYS}); do printf 'SET key:%s %s\\nWAIT 1 2000\\n' $i $i | redis-cli -c; done"
        ),
    )
    .unwrap();
    let acked = out.lines().filter(|l| l.trim() == "1").count();
    assert_eq!(acked, KEYS, "not every write was replicated: {out}");
}

fn count_keys(k: Kubectl, ns: &str) -> Result<usize, String> {
    let out = redis_sh(
        k,
        ns,
        &format!("for i in $(seq 1 {KEYS}); do echo \"$i $(redis-cli -c get key:$i)\"; done"),
    )?;
    Ok(out
        .lines()
        .filter(|l| l.split_once(' ').is_some_and(|(i, v)| i == v))
        .count())
}

fn app_pod(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n{labels}\nspec:\n  containers:\n  - name: app\n    image: redis:7.2\n    command: [\"sleep\", \"3600\"]\n"
    )
}

#[test]
fn the_operator_runs_a_tier_through_failure_reshard_injection_and_deletion() {
    let Some(k) = kubernetes("the_operator_runs_a_tier_through_failure_reshard_injection_and_deletion")
    else {
        return;
    };
    let env = OperatorEnv::from_env();
    let (ns, ops) = (env.namespace.as_str(), env.operator_namespace.as_str());
    let (op_repo, op_tag) = split_image(&env.operator_image);
    let (sc_repo, sc_tag) = split_image(&env.sidecar_image);

    k.ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "crds/cachetier.yaml",
    ]);
    // An earlier run may have stopped with the operator scaled to zero: back
    // to the chart's two first (so helm's apply of the same value does not
    // conflict with kubectl's, and helm v3's merge, which leaves a field
    // it did not change alone, does not keep zero).
    let _ = k.run(&["scale", "-n", ops, "deployment/cachetier", "--replicas=2"]);
    env.helm(&[
        "upgrade",
        "--install",
        "cachetier",
        "charts/cachetier",
        "-n",
        ops,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
        "--set-string",
        &format!("operator.image.repository={op_repo}"),
        "--set-string",
        &format!("operator.image.tag={op_tag}"),
        "--set-string",
        &format!("sidecar.image.repository={sc_repo}"),
        "--set-string",
        &format!("sidecar.image.tag={sc_tag}"),
    ]);
    let _ = k.run(&["create", "namespace", ns]);
    clean_up_earlier_runs(k, ns);
    k.ok(&["apply", "-n", ns, "-f", "crds/examples/minimal.yaml"]);
    wait_ready(k, ns, 3);
    let listing = k.ok(&["get", "ct", "-n", ns]);
    assert!(
        listing.contains(TIER) && listing.contains("Ready") && listing.contains("6/6"),
        "{listing}"
    );
    // `kubectl get events` reads core/v1 Events, whose field is
    // `involvedObject` (`regarding` exists only in events.k8s.io/v1). The
    // operator records Events after it writes the status; an earlier
    // run's tier of the same name left its own (by uid, not this one's).
    let tier_uid = jsonpath(k, ns, &format!("cachetier/{TIER}"), "{.metadata.uid}").unwrap();
    wait_for("a Ready Event of the tier", Duration::from_secs(60), || {
        let events = k.get(&[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            &format!("involvedObject.uid={tier_uid},involvedObject.kind=CacheTier"),
        ])?;
        if events.contains("Ready") {
            Ok(())
        } else {
            Err(events)
        }
    });

    write_keys(k, ns);
    assert_eq!(count_keys(k, ns).unwrap(), KEYS);

    // Lose a primary pod: it comes back empty under its name; no replicated key is lost.
    let primary = jsonpath(
        k,
        ns,
        &format!("cachetier/{TIER}"),
        "{.status.shards[1].nodes[0].name}",
    )
    .unwrap();
    assert!(primary.starts_with(TIER), "{primary:?}");
    let uid = jsonpath(k, ns, &format!("pod/{primary}"), "{.metadata.uid}").unwrap();
    k.ok(&["delete", "pod", "-n", ns, &primary, "--wait=false"]);
    // The status must not be read before the pod is replaced: until then
    // the old one may still answer and count as ready.
    let start = std::time::Instant::now();
    loop {
        let now = k
            .run(&["get", "pod", "-n", ns, &primary, "-o", "jsonpath={.metadata.uid}"])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if now.is_some_and(|u| !u.is_empty() && u != uid) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{primary} was not recreated"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    wait_ready(k, ns, 3);
    all_keys_read_back(k, ns, &format!("after deleting primary {primary}"));

    // Reshard 3 → 4 → 3 through the scale subresource.
    k.ok(&["scale", "-n", ns, &format!("cachetier/{TIER}"), "--replicas=4"]);
    wait_ready(k, ns, 4);
    all_keys_read_back(k, ns, "after scaling to 4 shards");
    k.ok(&["scale", "-n", ns, &format!("cachetier/{TIER}"), "--replicas=3"]);
    wait_ready(k, ns, 3);
    all_keys_read_back(k, ns, "after scaling back to 3 shards");
    wait_for(
        "the fourth shard's StatefulSet to be gone",
        Duration::from_secs(300),
        || {
            let sets = k.get(&["get", "statefulsets", "-n", ns, "-o", "name"])?;
            if sets.contains(&format!("{TIER}-3")) {
                Err(sets)
            } else {
                Ok(())
            }
        },
    );

    // Injection: a labelled pod gets the sidecar and reads the tier on localhost.
    let labelled = app_pod("e2e-injected", &format!("    cachetier.io/inject: {TIER}"));
    k.ok_with_stdin(&["apply", "-n", ns, "-f", "-"], &labelled);
    let plain = app_pod("e2e-plain", "    app: plain");
    k.ok_with_stdin(&["apply", "-n", ns, "-f", "-"], &plain);
    k.ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "pod/e2e-injected",
        "pod/e2e-plain",
        "--timeout=300s",
    ]);
    let init = jsonpath(k, ns, "pod/e2e-injected", "{.spec.initContainers[*].name}").unwrap();
    assert!(
        init.contains(&format!("cachetier-{TIER}")),
        "no sidecar injected: {init:?}"
    );
    let untouched = jsonpath(k, ns, "pod/e2e-plain", "{.spec.initContainers[*].name}").unwrap();
    assert!(
        untouched.is_empty(),
        "an unlabelled pod was changed: {untouched:?}"
    );
    let value = k.ok(&[
        "exec",
        "-n",
        ns,
        "e2e-injected",
        "-c",
        "app",
        "--",
        "redis-cli",
        "-p",
        "6379",
        "get",
        "key:7",
    ]);
    assert_eq!(value.trim(), "7");
    let mget = k.ok(&[
        "exec",
        "-n",
        ns,
        "e2e-injected",
        "-c",
        "app",
        "--",
        "redis-cli",
        "-p",
        "6379",
        "mget",
        "key:1",
        "key:2",
        "key:3",
    ]);
    assert_eq!(mget.split_whitespace().collect::<Vec<_>>(), ["1", "2", "3"]);

    // A new image rolls out one pod at a time through the core's graceful
    // replace, while a client reads through the sidecar without an error.
    // (About five minutes of reads, two a second, from the start of the roll.)
    let reader_ns = ns.to_string();
    let reader = std::thread::spawn(move || {
        let script = "errors=0; for i in $(seq 1 600); do v=$(redis-cli -p 6379 get key:7); [ \"$v\" = 7 ] || errors=$((errors+1)); sleep 0.5; done; echo $errors";
        k.ok(&[
            "exec",
            "-n",
            &reader_ns,
            "e2e-injected",
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            script,
        ])
    });
    k.ok(&[
        "patch",
        "-n",
        ns,
        &format!("cachetier/{TIER}"),
        "--type=merge",
        "-p",
        &format!("{{\"spec\":{{\"image\":\"{ROLLED_IMAGE}\"}}}}"),
    ]);
    wait_for(
        "every Redis pod to run the new image",
        Duration::from_secs(1200),
        || {
            let images = k.get(&[
                "get",
                "pods",
                "-n",
                ns,
                "-l",
                &format!("cachetier.io/tier={TIER}"),
                "-o",
                "jsonpath={.items[*].spec.containers[0].image}",
            ])?;
            let all_new = !images.is_empty() && images.split_whitespace().all(|i| i == ROLLED_IMAGE);
            if all_new { Ok(()) } else { Err(images) }
        },
    );
    wait_ready(k, ns, 3);
    all_keys_read_back(k, ns, "after the rolling replace");
    let read_errors = reader.join().unwrap();
    assert_eq!(
        read_errors.trim(),
        "0",
        "reads through the sidecar failed during the rolling replace"
    );

    // An operator outage never blocks pod creation (failurePolicy Ignore).
    k.ok(&["scale", "-n", ops, "deployment/cachetier", "--replicas=0"]);
    wait_for("the operator pods to be gone", Duration::from_secs(120), || {
        let pods = k.get(&[
            "get",
            "pods",
            "-n",
            ops,
            "-l",
            "app.kubernetes.io/name=cachetier-operator",
            "-o",
            "name",
        ])?;
        if pods.trim().is_empty() { Ok(()) } else { Err(pods) }
    });
    let during_outage = app_pod("e2e-outage", &format!("    cachetier.io/inject: {TIER}"));
    k.ok_with_stdin(&["apply", "-n", ns, "-f", "-"], &during_outage);
    k.ok(&["scale", "-n", ops, "deployment/cachetier", "--replicas=2"]);

    // Deleting the tier removes everything it owns.
    delete_test_pods(k, ns);
    k.ok(&["delete", "-n", ns, &format!("cachetier/{TIER}")]);
    wait_for("the tier's objects to be gone", Duration::from_secs(300), || {
        let left = k.get(&[
            "get",
            "statefulsets,services,configmaps,pdb",
            "-n",
            ns,
            "-l",
            &format!("cachetier.io/tier={TIER}"),
            "-o",
            "name",
        ])?;
        if left.trim().is_empty() { Ok(()) } else { Err(left) }
    });
    wait_pods_gone(k, ns);
}
