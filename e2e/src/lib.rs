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

impl Kubectl {
    /// Runs `kubectl ARGS…`: its stdout, or what went wrong (for the polls of
    /// [`wait_for`], where one failed call, an API server's moment of
    /// `etcdserver: request timed out`, is worth another look).
    pub fn get(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .run(args)
            .map_err(|e| format!("cannot run kubectl {args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs `kubectl ARGS…`, panicking with its stderr when it fails; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.get(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `kubectl ARGS…` with `stdin` as its standard input (e.g. `apply -f -`).
    pub fn ok_with_stdin(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .args(args)
            .current_dir(repo_root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kubectl {args:?}: {e}"));
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// What the operator end-to-end tests need beside a cluster, from the
/// environment (documented in `e2e/README.md`).
#[derive(Debug, Clone)]
pub struct OperatorEnv {
    /// `CACHETIER_OPERATOR_IMAGE`: repository:tag of the operator image the cluster can pull.
    pub operator_image: String,
    /// `CACHETIER_SIDECAR_IMAGE`: repository:tag of the sidecar image.
    pub sidecar_image: String,
    /// `CACHETIER_OPERATOR_NAMESPACE` (default `cachetier-system`).
    pub operator_namespace: String,
    /// `CACHETIER_E2E_NAMESPACE` (default `cachetier-e2e`): where tiers and apps go.
    pub namespace: String,
    /// `HELM` (default `helm`, or `.tools/bin/helm` when that exists).
    pub helm: PathBuf,
}

impl OperatorEnv {
    /// Reads the environment; panics naming what is missing, because a run
    /// against a real cluster without images cannot test anything.
    pub fn from_env() -> Self {
        let need = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
                panic!("{name} is not set: the operator e2e tests install the chart with the images you built (see e2e/README.md)")
            })
        };
        let or = |name: &str, default: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        let local_helm = repo_root().join(".tools/bin/helm");
        let helm = std::env::var_os("HELM").map(PathBuf::from).unwrap_or_else(|| {
            if local_helm.exists() {
                local_helm
            } else {
                PathBuf::from("helm")
            }
        });
        Self {
            operator_image: need("CACHETIER_OPERATOR_IMAGE"),
            sidecar_image: need("CACHETIER_SIDECAR_IMAGE"),
            operator_namespace: or("CACHETIER_OPERATOR_NAMESPACE", "cachetier-system"),
            namespace: or("CACHETIER_E2E_NAMESPACE", "cachetier-e2e"),
            helm,
        }
    }

    /// Runs helm, panicking with its stderr when it fails.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = Command::new(&self.helm)
            .args(args)
            .current_dir(repo_root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", self.helm.display()));
        assert!(
            out.status.success(),
            "helm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Splits `repository:tag` (the tag after the last colon that follows the
/// last slash).
pub fn split_image(image: &str) -> (&str, &str) {
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], &image[slash + i + 1..]),
        None => (image, "latest"),
    }
}

/// Polls `check` every two seconds until it returns `Some`, or panics after
/// `timeout` naming `what` and the last observation.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => {
                panic!("{what}: not after {timeout:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_secs(2)),
        }
    }
}
