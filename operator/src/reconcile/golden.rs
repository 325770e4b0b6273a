//! Golden files: for each example CacheTier, the objects [`super::desired`]
//! builds must equal the YAML checked in under `operator/tests/golden/`. CI
//! also runs every golden file through `kubernetes-validate --strict`.
//! After an intended change, regenerate them with
//! `CACHETIER_UPDATE_GOLDEN=1 cargo test -p cachetier-operator golden` and
//! review the diff.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// (input manifest, golden file).
fn cases() -> Vec<(PathBuf, PathBuf)> {
    let golden = root().join("tests/golden");
    let examples = root().join("../crds/examples");
    vec![
        (examples.join("minimal.yaml"), golden.join("minimal.yaml")),
        (examples.join("full.yaml"), golden.join("full.yaml")),
        (golden.join("inputs/auth.yaml"), golden.join("auth.yaml")),
        (
            golden.join("inputs/single-node.yaml"),
            golden.join("single-node.yaml"),
        ),
        (
            golden.join("inputs/overrides.yaml"),
            golden.join("overrides.yaml"),
        ),
    ]
}

#[test]
fn every_example_tier_renders_exactly_its_golden_objects() {
    let update = std::env::var_os("CACHETIER_UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for (input, golden) in cases() {
        let text = std::fs::read_to_string(&input).unwrap();
        let rendered = super::render_manifest(&text, &super::Defaults::default()).unwrap();
        if update {
            std::fs::write(&golden, &rendered).unwrap();
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(rendered.as_str()) {
            stale.push(golden.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "rendered objects differ from {stale:?}: if the change is intended, run \
         CACHETIER_UPDATE_GOLDEN=1 cargo test -p cachetier-operator golden and review the diff"
    );
}

#[test]
fn a_tier_becomes_one_statefulset_and_pdb_per_shard_owned_by_the_tier() {
    let text = std::fs::read_to_string(root().join("../crds/examples/minimal.yaml")).unwrap();
    let mut tier = cachetier_crds::validate::parse_manifest(&text).unwrap();
    tier.metadata.namespace = Some("ns".into());
    tier.metadata.uid = Some("uid-1".into());
    let objects = super::desired(&tier, &super::Defaults::default()).unwrap();
    let names: Vec<String> = objects.iter().map(super::Desired::describe).collect();
    assert_eq!(
        names,
        [
            "ConfigMap/product-cache-config",
            "Service/product-cache-nodes",
            "Service/product-cache",
            "StatefulSet/product-cache-0",
            "PodDisruptionBudget/product-cache-0",
            "StatefulSet/product-cache-1",
            "PodDisruptionBudget/product-cache-1",
            "StatefulSet/product-cache-2",
            "PodDisruptionBudget/product-cache-2",
        ]
    );
    let yaml = super::to_yaml(&objects).unwrap();
    assert_eq!(yaml.matches("uid: uid-1").count(), objects.len());
}

/// The Redis image of every StatefulSet built from `text`.
fn images(text: &str, defaults: &super::Defaults) -> Vec<String> {
    let mut tier = cachetier_crds::validate::parse_manifest(text).unwrap();
    tier.metadata.namespace = Some("ns".into());
    tier.metadata.uid = Some("uid-1".into());
    super::desired(&tier, defaults)
        .unwrap()
        .iter()
        .filter_map(|o| match o {
            super::Desired::StatefulSet(s) => s.spec.as_ref()?.template.spec.as_ref()?.containers[0]
                .image
                .clone(),
            _ => None,
        })
        .collect()
}

#[test]
fn spec_image_wins_and_without_it_the_operators_default_image_is_used() {
    let minimal = std::fs::read_to_string(root().join("../crds/examples/minimal.yaml")).unwrap();
    let full = std::fs::read_to_string(root().join("../crds/examples/full.yaml")).unwrap();
    let mirror = super::Defaults {
        redis_image: "registry.internal/redis:7.2.5".into(),
    };
    assert_eq!(images(&minimal, &super::Defaults::default()), ["redis:7.2"; 3]);
    assert_eq!(images(&minimal, &mirror), ["registry.internal/redis:7.2.5"; 3]);
    assert!(images(&full, &mirror).iter().all(|i| i == "redis:7.2"));
}

#[test]
fn pod_overrides_cannot_take_the_operators_labels_and_must_leave_a_valid_template() {
    let base = std::fs::read_to_string(root().join("tests/golden/inputs/overrides.yaml")).unwrap();
    let relabel = base.replace(
        "  podOverrides:\n    metadata:\n",
        "  podOverrides:\n    metadata:\n      labels:\n        cachetier.io/shard: \"7\"\n        team: search\n",
    );
    assert_ne!(relabel, base);
    let mut tier = cachetier_crds::validate::parse_manifest(&relabel).unwrap();
    tier.metadata.uid = Some("uid-1".into());
    let objects = super::desired(&tier, &super::Defaults::default()).unwrap();
    let Some(super::Desired::StatefulSet(set)) = objects
        .iter()
        .find(|o| matches!(o, super::Desired::StatefulSet(_)))
    else {
        panic!("no StatefulSet")
    };
    let labels = set
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(
        labels["cachetier.io/shard"], "0",
        "the selector's label stays the operator's"
    );
    assert_eq!(labels["team"], "search", "other labels pass");

    let broken = base.replace("containerPort: 9121", "containerPort: nine");
    let mut tier = cachetier_crds::validate::parse_manifest(&broken).unwrap();
    tier.metadata.uid = Some("uid-1".into());
    let err = super::desired(&tier, &super::Defaults::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.podOverrides: the patched pod template is not valid"),
        "{err}"
    );
}

#[test]
fn a_tier_the_api_server_has_not_stored_is_refused() {
    let text = std::fs::read_to_string(root().join("../crds/examples/minimal.yaml")).unwrap();
    let tier = cachetier_crds::validate::parse_manifest(&text).unwrap();
    let err = super::desired(&tier, &super::Defaults::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("metadata.namespace: Required value"), "{err}");
}

/// A free client port whose bus port (+10000) is valid too.
fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 55000 {
            return port;
        }
    }
}

/// The redis.conf of the ConfigMap and the container's arguments (downward-API
/// variables filled in) start a real Redis 7 in cluster mode, with the
/// announced hostname and the password in effect.
#[test]
fn the_rendered_config_and_arguments_start_a_real_redis_server() {
    use super::Desired;
    let text = std::fs::read_to_string(root().join("tests/golden/inputs/auth.yaml")).unwrap();
    let mut tier = cachetier_crds::validate::parse_manifest(&text).unwrap();
    tier.metadata.uid = Some("uid-1".into());
    let objects = super::desired(&tier, &super::Defaults::default()).unwrap();
    let conf = objects
        .iter()
        .find_map(|o| match o {
            Desired::ConfigMap(c) => c.data.as_ref()?.get("redis.conf").cloned(),
            _ => None,
        })
        .unwrap();
    let container = objects
        .iter()
        .find_map(|o| match o {
            Desired::StatefulSet(s) => s
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref()?
                .containers
                .first()
                .cloned(),
            _ => None,
        })
        .unwrap();
    let dir = std::env::temp_dir().join(format!("cachetier-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Redis enters `dir` as it reads the file; the pod's /data is this test's dir.
    let conf = conf.replace("dir \"/data\"", &format!("dir \"{}\"", dir.display()));
    std::fs::write(dir.join("redis.conf"), conf).unwrap();
    let port = free_port();
    let fill = |arg: &str| {
        arg.replace("$(POD_NAME)", "secure-cache-0-0")
            .replace("$(POD_NAMESPACE)", "shop")
            .replace("$(POD_IP)", "127.0.0.1")
            .replace("$(REDIS_PASSWORD)", "s3cret")
            .replace("$(REDIS_USERNAME)", "app")
            .replace(
                "/etc/cachetier/redis.conf",
                &dir.join("redis.conf").to_string_lossy(),
            )
    };
    let mut args: Vec<String> = container.args.unwrap().iter().map(|a| fill(a)).collect();
    // Only what differs between a pod and this machine: ports and address.
    let bus = (port + 10000).to_string();
    args.extend(
        [
            "--port",
            &port.to_string(),
            "--cluster-port",
            &bus,
            "--bind",
            "127.0.0.1",
        ]
        .map(String::from),
    );
    let mut server = std::process::Command::new("redis-server")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/ensure-deps.sh)");
    let cli = |extra: &[&str]| {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--no-auth-warning"])
            .args(extra)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let mut answer = String::new();
    for _ in 0..100 {
        answer = cli(&[
            "--user",
            "app",
            "--pass",
            "s3cret",
            "config",
            "get",
            "cluster-announce-hostname",
        ]);
        if answer.contains("secure-cache-0-0") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let unauthenticated = cli(&["ping"]);
    let default_user = cli(&["-a", "s3cret", "ping"]);
    let cluster = cli(&["--user", "app", "--pass", "s3cret", "cluster", "info"]);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        answer.contains("secure-cache-0-0.secure-cache-nodes.shop.svc"),
        "{answer:?}"
    );
    assert!(unauthenticated.contains("NOAUTH"), "{unauthenticated:?}");
    assert!(
        !default_user.contains("PONG"),
        "the default user must be off: {default_user:?}"
    );
    assert!(cluster.contains("cluster_state"), "{cluster:?}");
}
