//! End-to-end test support for cachetier.
//!
//! Two kinds of end-to-end test live in this crate's `tests/`: those that run a
//! whole local tier on this machine (always run), and those that need a real
//! Kubernetes cluster (run only when `KUBECONFIG` names one; otherwise they say
//! clearly that they were skipped). This library holds what both share; it is
//! not used outside tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The Kubernetes cluster the tests may use, if any: `Some` only when
/// `KUBECONFIG` is set, names an existing file and `kubectl` is on the PATH.
/// When it returns `None` it prints why, so a skipped test is never silent.
pub fn kubernetes(test: &str) -> Option<Kubectl> {
    let Some(config) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) else {
        eprintln!(
            "SKIPPED {test}: KUBECONFIG is not set (point it at kind, k3d or a real cluster to run it)"
        );
        return None;
    };
    let config = PathBuf::from(config);
    if !config.exists() {
        eprintln!("SKIPPED {test}: KUBECONFIG={} does not exist", config.display());
        return None;
    }
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED {test}: KUBECONFIG is set but kubectl is not on the PATH");
        return None;
    }
    Some(Kubectl)
}

/// Runs `kubectl` against the cluster `KUBECONFIG` names.
#[derive(Debug, Clone, Copy)]
pub struct Kubectl;

impl Kubectl {
    /// Runs `kubectl ARGS…` and returns its output, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("kubectl")
            .args(args)
            .current_dir(repo_root())
            .output()
    }
}
