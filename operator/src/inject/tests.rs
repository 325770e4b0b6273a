//! Golden cases: each `operator/tests/inject/<case>.pod.yaml` is decided
//! against two tiers in namespace `shop` (`product-cache` = the minimal
//! example, `realtime-stock` = the full one, with auth and a local cache); the
//! decision must equal `<case>.expected.json`. Regenerate after an intended
//! change with `CACHETIER_UPDATE_GOLDEN=1 cargo test -p cachetier-operator inject`.

use std::path::{Path, PathBuf};

use cachetier_crds::CacheTier;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::*;

const NAMESPACE: &str = "shop";

fn tiers() -> Vec<CacheTier> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/examples");
    ["minimal.yaml", "full.yaml"]
        .iter()
        .map(|f| {
            let mut tier =
                cachetier_crds::validate::parse_manifest(&std::fs::read_to_string(examples.join(f)).unwrap())
                    .unwrap();
            tier.metadata.namespace = Some(NAMESPACE.into());
            tier
        })
        .collect()
}

fn decide_for(pod: &Pod, tiers: &[CacheTier]) -> Decision {
    decide_with(pod, tiers, &SidecarTemplate::new("cachetier/sidecar:0.1.0"))
}

/// The operator's `--log-format json`.
fn json_logs() -> SidecarTemplate {
    SidecarTemplate {
        log_format: "json".to_string(),
        ..SidecarTemplate::new("cachetier/sidecar:0.1.0")
    }
}

fn decide_with(pod: &Pod, tiers: &[CacheTier], sidecar: &SidecarTemplate) -> Decision {
    decide(pod, NAMESPACE, sidecar, |ns, name| {
        tiers
            .iter()
            .find(|t| t.metadata.namespace.as_deref() == Some(ns) && t.metadata.name.as_deref() == Some(name))
            .cloned()
            .map(std::sync::Arc::new)
    })
}

fn as_json(decision: &Decision) -> Value {
    match decision {
        Decision::Patch(ops) => json!({"patch": ops}),
        Decision::Skip { reason, annotate } => {
            json!({"skip": reason.label(), "reason": reason.to_string(), "annotate": annotate})
        }
    }
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".pod.yaml"))
        .collect();
    files.sort();
    files
}

fn read_pod(path: &Path) -> Pod {
    yaml_serde::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn every_golden_pod_gets_exactly_its_expected_decision() {
    let tiers = tiers();
    let update = std::env::var_os("CACHETIER_UPDATE_GOLDEN").is_some();
    let files = cases();
    assert!(files.len() >= 7, "expected the golden cases, found {files:?}");
    let mut stale = Vec::new();
    for file in files {
        let expected_path = PathBuf::from(file.to_string_lossy().replace(".pod.yaml", ".expected.json"));
        let got = as_json(&decide_for(&read_pod(&file), &tiers));
        let rendered = format!("{}\n", serde_json::to_string_pretty(&got).unwrap());
        if update {
            std::fs::write(&expected_path, rendered).unwrap();
        } else if std::fs::read_to_string(&expected_path).ok().as_deref() != Some(rendered.as_str()) {
            stale.push(expected_path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "decisions differ from {stale:?} (CACHETIER_UPDATE_GOLDEN=1 to regenerate, then review)"
    );
}

/// Applies the `add` operations the webhook emits (all it emits) to `doc`.
fn apply(doc: &mut Value, ops: &[Value]) {
    for op in ops {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let last = last.replace("~1", "/").replace("~0", "~");
        let target = doc.pointer_mut(parent).unwrap();
        match target {
            Value::Array(items) => items.insert(last.parse().unwrap(), op["value"].clone()),
            Value::Object(map) => {
                map.insert(last, op["value"].clone());
            }
            other => panic!("cannot add under {other}"),
        }
    }
}

#[test]
fn injecting_twice_changes_nothing_the_second_time() {
    let tiers = tiers();
    for file in cases() {
        let pod = read_pod(&file);
        let Decision::Patch(ops) = decide_for(&pod, &tiers) else {
            continue;
        };
        let mut doc = serde_json::to_value(&pod).unwrap();
        apply(&mut doc, &ops);
        let patched: Pod = serde_json::from_value(doc).unwrap();
        let again = decide_for(&patched, &tiers);
        assert!(
            matches!(again, Decision::Skip { reason: Skip::AlreadyInjected, ref annotate } if annotate.is_empty()),
            "{}: second decision {again:?}",
            file.display()
        );
        let init = patched.spec.unwrap().init_containers.unwrap();
        assert_eq!(
            init[0].restart_policy.as_deref(),
            Some("Always"),
            "{}",
            file.display()
        );
    }
}

#[test]
fn two_tiers_get_distinct_ports_and_metrics_ports() {
    let pod = read_pod(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject/two-tiers.pod.yaml"));
    let Decision::Patch(ops) = decide_for(&pod, &tiers()) else {
        panic!("expected a patch");
    };
    let containers: Vec<&Value> = ops
        .iter()
        .filter(|o| o["path"].as_str().unwrap().starts_with("/spec/initContainers/"))
        .map(|o| &o["value"])
        .collect();
    let env = |c: &Value, name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        env(containers[0], "CACHETIER_LISTEN"),
        Some(json!("127.0.0.1:6379"))
    );
    assert_eq!(
        env(containers[1], "CACHETIER_LISTEN"),
        Some(json!("127.0.0.1:6380"))
    );
    assert_ne!(
        env(containers[0], "CACHETIER_METRICS"),
        env(containers[1], "CACHETIER_METRICS")
    );
}

/// The contract with the sidecar binary: every variable the webhook sets is one
/// the sidecar reads, and every value parses (secret-sourced ones get a
/// stand-in), so an injected pod never crash-loops on its configuration.
#[test]
fn every_injected_variable_is_one_the_sidecar_accepts() {
    use cachetier_sidecar::config::Args;
    use clap::{CommandFactory, Parser};
    let command = Args::command();
    let flag_of = |env: &str| {
        command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == env))
            .and_then(|a| a.get_long().map(|l| format!("--{l}")))
    };
    for (file, sidecar) in cases()
        .into_iter()
        .flat_map(|f| [(f.clone(), SidecarTemplate::new("s")), (f, json_logs())])
    {
        let Decision::Patch(ops) = decide_with(&read_pod(&file), &tiers(), &sidecar) else {
            continue;
        };
        for op in ops.iter().filter(|o| {
            o["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/spec/initContainers/"))
        }) {
            let mut argv = vec!["cachetier-sidecar".to_string()];
            for var in op["value"]["env"].as_array().unwrap() {
                let name = var["name"].as_str().unwrap();
                let flag =
                    flag_of(name).unwrap_or_else(|| panic!("{}: the sidecar has no {name}", file.display()));
                let value = var["value"].as_str().unwrap_or("from-a-secret");
                argv.extend([flag, value.to_string()]);
            }
            if let Err(e) = Args::try_parse_from(&argv) {
                panic!("{}: the sidecar refuses {argv:?}: {e}", file.display());
            }
        }
    }
}

/// An operator logging JSON has its sidecars log JSON; with text (the
/// sidecar's default) nothing is set.
#[test]
fn the_sidecars_log_in_the_operators_format() {
    let pod = read_pod(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject/plain.pod.yaml"));
    let log_format = |decision: Decision| {
        let Decision::Patch(ops) = decision else {
            panic!("plain.pod.yaml is injected");
        };
        let env: Vec<Value> = (ops.iter())
            .filter_map(|o| o["value"]["env"].as_array())
            .flatten()
            .cloned()
            .collect();
        assert!(!env.is_empty(), "{ops:?}");
        (env.iter())
            .find(|v| v["name"] == "CACHETIER_LOG_FORMAT")
            .map(|v| v["value"].clone())
    };
    assert_eq!(
        log_format(decide_with(&pod, &tiers(), &json_logs())),
        Some(json!("json"))
    );
    assert_eq!(log_format(decide_for(&pod, &tiers())), None);
}

/// `sidecar.splitTransactions: false` reaches the sidecar, in a form it
/// accepts; the default (on) sets nothing.
#[test]
fn a_tier_that_refuses_cross_slot_transactions_tells_its_sidecars() {
    use clap::Parser;
    let pod = read_pod(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject/plain.pod.yaml"));
    let split = |tiers: &[CacheTier]| {
        let Decision::Patch(ops) = decide_for(&pod, tiers) else {
            panic!("plain.pod.yaml is injected");
        };
        (ops.iter())
            .filter_map(|o| o["value"]["env"].as_array())
            .flatten()
            .find(|v| v["name"] == "CACHETIER_SPLIT_TRANSACTIONS")
            .map(|v| v["value"].clone())
    };
    assert_eq!(split(&tiers()), None);
    let mut strict = tiers();
    for t in &mut strict {
        t.spec.sidecar.split_transactions = false;
    }
    assert_eq!(split(&strict), Some(json!("false")));
    let args = cachetier_sidecar::config::Args::try_parse_from([
        "s",
        "--seed",
        "a:1",
        "--split-transactions",
        "false",
    ])
    .unwrap();
    assert!(!args.split_transactions);
}
