//! Sidecar injection: the decision the mutating webhook makes for one Pod, as
//! a pure function from the Pod (and the CacheTiers it names) to either a JSON
//! patch or a named reason to leave it alone.
//!
//! Opt-in only. A pod labelled `cachetier.io/inject: <tier>` (a tier in the
//! pod's namespace, or `<namespace>.<tier>`) gets one sidecar on the tier's
//! `spec.sidecar.port`; the annotation `cachetier.io/tiers:
//! "product-cache=6379,stock-cache=6380"` asks for one sidecar per tier, each on
//! its own localhost port. `cachetier.io/inject: disabled` opts out. A pod that
//! already has its sidecars is left unchanged, so the decision is idempotent.
//!
//! Not here: TLS, the HTTP server and the AdmissionReview envelope (the
//! webhook server), or where CacheTiers come from (the caller looks them up).

mod container;

pub use container::{SidecarTemplate, sidecar_container};

use std::fmt;
use std::sync::Arc;

use cachetier_crds::CacheTier;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// The opt-in label, naming the tier.
pub const INJECT_LABEL: &str = "cachetier.io/inject";
/// The label value that opts a pod out.
pub const DISABLED: &str = "disabled";
/// Several tiers: `name=port,name=port`.
pub const TIERS_ANNOTATION: &str = "cachetier.io/tiers";
/// Set on a pod the webhook left alone, saying why.
pub const SKIPPED_ANNOTATION: &str = "cachetier.io/inject-skipped";
/// Set on a pod that got sidecars, naming their tiers.
pub const INJECTED_ANNOTATION: &str = "cachetier.io/injected";

/// Why the webhook left a pod unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// No `cachetier.io/inject` label (the webhook's objectSelector should not
    /// even have sent it).
    NotOptedIn,
    /// `cachetier.io/inject: disabled`.
    OptedOut,
    /// Every sidecar the pod asks for is already there.
    AlreadyInjected,
    /// The label or annotation does not parse.
    Malformed(String),
    /// A named tier does not exist.
    TierNotFound(String),
}

impl Skip {
    /// A short stable name, for metrics and the skip annotation.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotOptedIn => "not-opted-in",
            Self::OptedOut => "opted-out",
            Self::AlreadyInjected => "already-injected",
            Self::Malformed(_) => "malformed",
            Self::TierNotFound(_) => "tier-not-found",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOptedIn => write!(f, "the pod has no {INJECT_LABEL} label"),
            Self::OptedOut => write!(f, "{INJECT_LABEL}: {DISABLED}"),
            Self::AlreadyInjected => write!(f, "the pod already has its cachetier sidecars"),
            Self::Malformed(why) => write!(f, "cannot inject: {why}"),
            Self::TierNotFound(tier) => write!(f, "cannot inject: CacheTier {tier} does not exist"),
        }
    }
}

/// What the webhook does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit the pod with this JSON patch (RFC 6902 operations).
    Patch(Vec<Value>),
    /// Admit it unchanged. Where the pod asked for a sidecar, `annotate` is a
    /// patch recording the reason on the pod, and the reason becomes an
    /// admission warning.
    Skip {
        /// Why.
        reason: Skip,
        /// The patch that records the reason (empty when nothing was asked).
        annotate: Vec<Value>,
    },
}

/// One sidecar the pod asks for: the tier's namespace and name, and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    namespace: String,
    name: String,
    port: Option<u16>,
}

/// Decides for `pod` (in `namespace`); `tier` looks a CacheTier up by
/// namespace and name.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    sidecar: &SidecarTemplate,
    tier: impl Fn(&str, &str) -> Option<Arc<CacheTier>>,
) -> Decision {
    let wanted = match wanted(pod, namespace) {
        Ok(w) => w,
        Err(reason) => return skip(pod, reason),
    };
    let existing = existing_containers(pod);
    let mut containers = Vec::new();
    for (index, w) in wanted.iter().enumerate() {
        let Some(found) = tier(&w.namespace, &w.name) else {
            return skip(pod, Skip::TierNotFound(format!("{}/{}", w.namespace, w.name)));
        };
        let port = w
            .port
            .unwrap_or_else(|| u16::try_from(found.spec.sidecar.port).unwrap_or(6379));
        let container = sidecar_container(&found, &w.namespace, port, index, sidecar);
        if !existing.contains(&container.name) {
            containers.push(container);
        }
    }
    if containers.is_empty() {
        return Decision::Skip {
            reason: Skip::AlreadyInjected,
            annotate: Vec::new(),
        };
    }
    let tiers: Vec<String> = wanted
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    let mut ops = Vec::new();
    let has_init = pod.spec.as_ref().is_some_and(|s| s.init_containers.is_some());
    if !has_init {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": []}));
    }
    // Native sidecars go first, so they are up before any other init container
    // or the application needs Redis.
    for (i, container) in containers.iter().enumerate() {
        ops.push(json!({"op": "add", "path": format!("/spec/initContainers/{i}"), "value": container}));
    }
    ops.extend(annotation_ops(pod, INJECTED_ANNOTATION, &tiers.join(",")));
    Decision::Patch(ops)
}

fn skip(pod: &Pod, reason: Skip) -> Decision {
    let annotate = match reason {
        Skip::NotOptedIn | Skip::OptedOut | Skip::AlreadyInjected => Vec::new(),
        _ => annotation_ops(pod, SKIPPED_ANNOTATION, &reason.to_string()),
    };
    Decision::Skip { reason, annotate }
}

/// The sidecars `pod` asks for, from its label and annotation.
fn wanted(pod: &Pod, namespace: &str) -> Result<Vec<Wanted>, Skip> {
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .ok_or(Skip::NotOptedIn)?;
    if label == DISABLED {
        return Err(Skip::OptedOut);
    }
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TIERS_ANNOTATION));
    let Some(list) = annotation else {
        return Ok(vec![tier_ref(label, namespace, None)?]);
    };
    let mut out: Vec<Wanted> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, port) = entry
            .split_once('=')
            .ok_or_else(|| Skip::Malformed(format!("{TIERS_ANNOTATION} entry {entry:?} is not NAME=PORT")))?;
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Skip::Malformed(format!("{TIERS_ANNOTATION}: {port:?} is not a port")))?;
        if out.iter().any(|w| w.port == Some(port)) {
            return Err(Skip::Malformed(format!(
                "{TIERS_ANNOTATION}: port {port} is used twice"
            )));
        }
        out.push(tier_ref(name.trim(), namespace, Some(port))?);
    }
    if out.is_empty() {
        return Err(Skip::Malformed(format!("{TIERS_ANNOTATION} names no tier")));
    }
    Ok(out)
}

/// `name` (in the pod's namespace) or `namespace.name`.
fn tier_ref(text: &str, namespace: &str, port: Option<u16>) -> Result<Wanted, Skip> {
    let (ns, name) = text.split_once('.').unwrap_or((namespace, text));
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !valid(ns) || !valid(name) {
        return Err(Skip::Malformed(format!(
            "{text:?} is not a tier name or NAMESPACE.NAME"
        )));
    }
    Ok(Wanted {
        namespace: ns.to_string(),
        name: name.to_string(),
        port,
    })
}

fn existing_containers(pod: &Pod) -> Vec<String> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| c.name.clone())
        .collect()
}

/// Sets one annotation, creating the map when the pod has none.
fn annotation_ops(pod: &Pod, key: &str, value: &str) -> Vec<Value> {
    let path = format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    );
    if pod.metadata.annotations.is_some() {
        vec![json!({"op": "add", "path": path, "value": value})]
    } else {
        vec![json!({"op": "add", "path": "/metadata/annotations", "value": {key: value}})]
    }
}

#[cfg(test)]
mod tests;
