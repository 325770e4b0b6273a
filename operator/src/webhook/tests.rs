//! Golden AdmissionReviews: each `operator/tests/webhook/<case>.request.json`
//! is answered as `<case>.response.json` says (the patch decoded, for
//! reading). Tiers as in the injection tests: `product-cache` and
//! `realtime-stock` in namespace `shop`. Regenerate with
//! `CACHETIER_UPDATE_GOLDEN=1 cargo test -p cachetier-operator webhook`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cachetier_crds::CacheTier;
use serde_json::Value;

use super::admit;
use crate::inject::SidecarTemplate;

fn tiers() -> Vec<Arc<CacheTier>> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/examples");
    ["minimal.yaml", "full.yaml"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(examples.join(f)).unwrap();
            let mut tier = cachetier_crds::validate::parse_manifest(&text).unwrap();
            tier.metadata.namespace = Some("shop".into());
            Arc::new(tier)
        })
        .collect()
}

fn answer(request: &str) -> Value {
    let tiers = tiers();
    let review = serde_json::from_str(request).unwrap();
    let image = SidecarTemplate::new("cachetier/sidecar:0.1.0");
    let out = admit(review, &image, |ns, name| {
        tiers
            .iter()
            .find(|t| t.metadata.namespace.as_deref() == Some(ns) && t.metadata.name.as_deref() == Some(name))
            .cloned()
    });
    let mut value = serde_json::to_value(&out).unwrap();
    // The patch travels as bytes; decode it so the golden file reads as JSON.
    if let Some(bytes) = value["response"].get("patch").cloned() {
        let raw: Vec<u8> = serde_json::from_value(bytes).unwrap();
        value["response"]["patch"] = serde_json::from_slice(&raw).unwrap();
    }
    value
}

#[test]
fn every_golden_admission_review_gets_its_expected_response() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook");
    let update = std::env::var_os("CACHETIER_UPDATE_GOLDEN").is_some();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".request.json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut stale = Vec::new();
    for file in files {
        let got = answer(&std::fs::read_to_string(&file).unwrap());
        assert_eq!(
            got["response"]["allowed"],
            true,
            "{}: every pod is admitted",
            file.display()
        );
        let expected = PathBuf::from(file.to_string_lossy().replace(".request.json", ".response.json"));
        let rendered = format!("{}\n", serde_json::to_string_pretty(&got).unwrap());
        if update {
            std::fs::write(&expected, rendered).unwrap();
        } else if std::fs::read_to_string(&expected).ok().as_deref() != Some(rendered.as_str()) {
            stale.push(expected.display().to_string());
        }
    }
    assert!(stale.is_empty(), "responses differ from {stale:?}");
}

#[test]
fn a_body_that_is_no_admission_review_is_refused_as_invalid() {
    let review =
        serde_json::from_str(r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#).unwrap();
    let out = admit(review, &SidecarTemplate::new("x"), |_, _| None);
    let value = serde_json::to_value(&out).unwrap();
    assert_eq!(value["response"]["allowed"], false);
}
