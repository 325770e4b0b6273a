//! The RBAC rules in `operator/rbac/` grant exactly what the controller and the
//! webhook call:
//! the calls are read from the controller's own source, so adding a call
//! without its permission (or keeping a permission no call needs) fails here.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

/// (resource, verb) pairs, resource as `group/resource` (`/pods` for core).
type Grants = BTreeSet<(String, String)>;

fn resource_of(kind: &str) -> &'static str {
    match kind {
        "CacheTier" => "cachetier.io/cachetiers",
        "StatefulSet" => "apps/statefulsets",
        "Service" => "/services",
        "ConfigMap" => "/configmaps",
        "PodDisruptionBudget" => "policy/poddisruptionbudgets",
        "Pod" => "/pods",
        other => panic!("the controller uses {other}: add it to resource_of and to operator/rbac/"),
    }
}

fn add(out: &mut Grants, resource: &str, verbs: &[&str]) {
    for verb in verbs {
        out.insert((resource.to_string(), verb.to_string()));
    }
}

/// The typed APIs the controller and webhook call methods on, by variable.
const FIELDS: [(&str, &str); 6] = [
    ("self.pods", "/pods"),
    ("self.claims", "/persistentvolumeclaims"),
    ("self.sets", "apps/statefulsets"),
    ("self.pdbs", "policy/poddisruptionbudgets"),
    ("secrets", "/secrets"),
    (
        "configurations",
        "admissionregistration.k8s.io/mutatingwebhookconfigurations",
    ),
];
/// Client calls and the verb each needs.
const CALLS: [(&str, &str); 7] = [
    (".get_opt(", "get"),
    (".get(", "get"),
    (".list(", "list"),
    (".patch(", "patch"),
    (".delete(", "delete"),
    (".create(", "create"),
    (".replace(", "update"),
];

/// Every `.rs` file under `dir`, in subdirectories too.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Drops comment lines and puts each `.call(` that starts a line at the end of
/// the line before.
fn join_chains(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let trimmed = line.trim_start();
        if trimmed.starts_with('.') {
            out.push_str(trimmed);
        } else {
            out.push('\n');
            out.push_str(line);
        }
    }
    out
}

/// Every API call the controller's source makes.
fn calls() -> Grants {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Grants::new();
    let mut files = Vec::new();
    for dir in ["controller", "webhook"] {
        rust_files(&src.join(dir), &mut files);
    }
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains("tests") {
            continue;
        }
        // Join call chains split over lines (`self.sets\n    .patch(`).
        let raw = std::fs::read_to_string(&path).unwrap();
        let text = join_chains(&raw);
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            // Watched (the controller's reflectors list and watch; owners are fetched by get).
            if line.starts_with("let tiers: Api<CacheTier>") {
                add(&mut out, resource_of("CacheTier"), &["get", "list", "watch"]);
            }
            for marker in [".owns(scoped::<", ".watches(scoped::<"] {
                for rest in line.split(marker).skip(1) {
                    let kind = rest.split('>').next().unwrap();
                    add(&mut out, resource_of(kind), &["get", "list", "watch"]);
                }
            }
            // Server-side apply of an object that does not exist yet
            // creates it, and the API server then checks `create` too.
            for rest in line.split("apply::<").skip(1) {
                add(
                    &mut out,
                    resource_of(rest.split('>').next().unwrap()),
                    &["patch", "create"],
                );
            }
            if line.contains("self.sets.patch(") && line.contains("Patch::Apply(") {
                add(&mut out, "apps/statefulsets", &["create"]);
            }
            if line.contains("api.patch_status(") {
                add(&mut out, "cachetier.io/cachetiers/status", &["patch"]);
            }
            if line.contains("pods.patch_status(") {
                add(&mut out, "/pods/status", &["patch"]);
            }
            for (field, resource) in FIELDS {
                for (call, verb) in CALLS {
                    if line.contains(&format!("{field}{call}")) {
                        add(&mut out, resource, &[verb]);
                    }
                }
            }
        }
        if text.contains("Recorder::new(") {
            add(&mut out, "events.k8s.io/events", &["create", "patch"]);
        }
        if text.contains("LeaseManagerBuilder::new(") {
            add(
                &mut out,
                "coordination.k8s.io/leases",
                &["get", "create", "patch", "delete"],
            );
        }
    }
    // Owner references with `blockOwnerDeletion: true` need `update` on the
    // owner's finalizers where the OwnerReferencesPermissionEnforcement
    // admission plugin runs (OpenShift, hardened clusters).
    let names = std::fs::read_to_string(src.join("reconcile/names.rs")).unwrap();
    if names.contains("block_owner_deletion: Some(true)") {
        add(&mut out, "cachetier.io/cachetiers/finalizers", &["update"]);
    }
    out
}

/// Every (resource, verb) the RBAC files grant.
fn granted() -> Grants {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac/clusterrole.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Grants::new();
    for doc in text.split("\n---\n") {
        let role: Value = yaml_serde::from_str(doc).unwrap();
        for rule in role["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        out.insert((
                            format!("{}/{}", group.as_str().unwrap(), resource.as_str().unwrap()),
                            verb.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_rules_cover_every_api_call_the_controller_makes() {
    let calls = calls();
    let granted = granted();
    assert!(
        calls.len() >= 20,
        "the source scan found too few calls: {calls:?}"
    );
    let missing: Vec<_> = calls.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "calls without a permission in operator/rbac/: {missing:?}"
    );
    let unused: Vec<_> = granted.difference(&calls).collect();
    assert!(
        unused.is_empty(),
        "permissions no call needs (least privilege): {unused:?}"
    );
}
