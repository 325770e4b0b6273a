//! Tests against a real Kubernetes API server. They run only when `KUBECONFIG`
//! points at a cluster (kind, k3d, a real one) and print `SKIPPED …` otherwise.

// Test helpers: a panic with the unwrapped error is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use cachetier_e2e::{Kubectl, kubernetes, repo_root};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn install_crd(kubectl: Kubectl) {
    let out = kubectl
        .run(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "crds/cachetier.yaml",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "applying the CRD failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kubectl
        .run(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/cachetiers.cachetier.io",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "the CRD never became Established: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_api_server_accepts_the_crd_and_every_example() {
    let Some(kubectl) = kubernetes("the_api_server_accepts_the_crd_and_every_example") else {
        return;
    };
    install_crd(kubectl);
    for file in yaml_files("crds/examples") {
        let path = file.to_string_lossy().into_owned();
        let out = kubectl.run(&["apply", "--dry-run=server", "-f", &path]).unwrap();
        assert!(
            out.status.success(),
            "{path} was rejected: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The same invalid examples the crds crate rejects client-side must be rejected
/// by the API server, with the message each file names in `# server-expect:`.
#[test]
fn the_api_server_rejects_every_invalid_example_with_its_message() {
    let Some(kubectl) = kubernetes("the_api_server_rejects_every_invalid_example_with_its_message") else {
        return;
    };
    install_crd(kubectl);
    for file in yaml_files("crds/examples/invalid") {
        let text = std::fs::read_to_string(&file).unwrap();
        if text.lines().any(|l| l.starts_with("# server-skip: ")) {
            continue;
        }
        // Schema messages are the API server's own words (`# server-expect:`);
        // CEL messages are ours, so the client-side `# expect:` lines apply.
        // A CEL refusal's field path and message are separate fragments:
        // some Kubernetes versions print the value's type between them
        // (`spec.x: Invalid value: "object": message`), others do not.
        let mut expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# server-expect: "))
            .collect();
        if expected.is_empty() {
            expected = text
                .lines()
                .filter_map(|l| l.strip_prefix("# expect: "))
                .collect();
        }
        let path = file.to_string_lossy().into_owned();
        let out = kubectl.run(&["apply", "--dry-run=server", "-f", &path]).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path} was accepted by the API server");
        for fragment in expected {
            assert!(
                stderr.contains(fragment.trim_end()),
                "{path}: expected {fragment:?} in {stderr:?}"
            );
        }
        // `# server-never:` names words that must not be in the refusal (e.g. a
        // CEL conversion error beside the schema's own pattern message).
        for fragment in text.lines().filter_map(|l| l.strip_prefix("# server-never: ")) {
            assert!(
                !stderr.contains(fragment.trim_end()),
                "{path}: {fragment:?} must not be in {stderr:?}"
            );
        }
    }
}
