//! Client-side validation of CacheTier manifests with the CRD's own rules.
//!
//! An API server validates a CacheTier against the CRD's OpenAPI schema (types,
//! ranges, enums, patterns) and its CEL rules (`x-kubernetes-validations`). Local
//! mode has no API server, and the operator wants to refuse a spec that slipped
//! past an older CRD, so this module applies the same schema and the same CEL
//! rules — taken from the generated CRD, not restated — and reports problems in
//! the same words. It also rejects unknown fields, as `kubectl apply` does by
//! default (strict field validation).

use std::fmt;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::Value;

use crate::{CacheTier, GROUP, OPERATOR_OWNED_SETTINGS, VERSION};

/// Why a CacheTier was refused: every problem found, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// One line per problem, e.g. `spec.shards: 0 is less than the minimum of 1`.
    pub problems: Vec<String>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid CacheTier: {}", self.problems.join("; "))
    }
}

impl std::error::Error for Invalid {}

impl Invalid {
    fn one(problem: impl Into<String>) -> Self {
        Self {
            problems: vec![problem.into()],
        }
    }
}

/// The CRD's `openAPIV3Schema`, computed once.
pub(crate) fn crd_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = CacheTier::crd();
        crd.spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .map(whole_number_bounds)
            .unwrap_or(Value::Null)
    })
}

/// schemars writes integer bounds as floats (`minimum: 1.0`); as integers the
/// messages read "less than the minimum of 1", as a user wrote it.
fn whole_number_bounds(mut schema: Value) -> Value {
    fn walk(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    if matches!(key.as_str(), "minimum" | "maximum")
                        && let Some(f) = child.as_f64()
                        && f.fract() == 0.0
                        && f.abs() < 9.0e15
                    {
                        *child = Value::from(f as i64);
                    } else {
                        walk(child);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut schema);
    schema
}

/// Parses a CacheTier manifest (YAML or JSON) and validates it as an API server
/// with strict field validation would. Defaults are applied.
pub fn parse_manifest(text: &str) -> Result<CacheTier, Invalid> {
    let value: Value =
        yaml_serde::from_str(text).map_err(|e| Invalid::one(format!("not a YAML document: {e}")))?;
    parse_value(value)
}

/// Like [`parse_manifest`], from an already parsed document.
pub fn parse_value(value: Value) -> Result<CacheTier, Invalid> {
    let expected_api_version = format!("{GROUP}/{VERSION}");
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != expected_api_version || kind != "CacheTier" {
        return Err(Invalid::one(format!(
            "expected apiVersion {expected_api_version} and kind CacheTier, found apiVersion {api_version:?} and kind {kind:?}"
        )));
    }
    if value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err(Invalid::one("metadata.name: Required value"));
    }
    let mut problems = Vec::new();
    unknown_fields(crd_schema(), &value, "", &mut problems);
    problems.extend(schema_problems(&value));
    if !problems.is_empty() {
        return Err(Invalid { problems });
    }
    let tier: CacheTier = serde_json::from_value(value).map_err(|e| Invalid::one(e.to_string()))?;
    // The schema was checked above; the rules see the defaulted object, as on
    // an API server (defaulting comes before CEL).
    let defaulted = serde_json::to_value(&tier).map_err(|e| Invalid::one(e.to_string()))?;
    let problems = rule_problems(&tier, &defaulted);
    if problems.is_empty() {
        Ok(tier)
    } else {
        Err(Invalid { problems })
    }
}

/// Validates a CacheTier (defaults already applied) against the CRD's schema and
/// CEL rules, plus the checks that CEL cannot express cheaply.
pub fn validate(tier: &CacheTier) -> Result<(), Invalid> {
    let value = serde_json::to_value(tier).map_err(|e| Invalid::one(e.to_string()))?;
    let mut problems = schema_problems(&value);
    problems.extend(rule_problems(tier, &value));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid { problems })
    }
}

/// The CEL rules, evaluated on `value` (the serialized `tier`), and the
/// checks CEL cannot express cheaply.
fn rule_problems(tier: &CacheTier, value: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(errors) = Validator::new().validate(crd_schema(), value, None) {
        problems.extend(errors.into_vec().into_iter().map(|e| e.to_string()));
    }
    // The CEL rule matches directive names as written; redis.conf is
    // case-insensitive, so catch `PORT` and `Cluster-Enabled` here too (a CEL
    // `lowerAscii()` on unbounded map keys would blow the API server's cost budget).
    let owned: Vec<&str> = tier
        .spec
        .redis_config
        .keys()
        .filter(|k| k.to_ascii_lowercase() != k.as_str())
        .filter(|k| {
            let lower = k.to_ascii_lowercase();
            OPERATOR_OWNED_SETTINGS.contains(&lower.as_str()) || lower.starts_with("cluster-")
        })
        .map(String::as_str)
        .collect();
    if !owned.is_empty() {
        problems.push(format!(
            "spec.redisConfig: redisConfig may not set settings the operator owns: {}",
            owned.join(", ")
        ));
    }
    problems
}

/// Type, range, enum and pattern problems, with dotted field paths.
fn schema_problems(value: &Value) -> Vec<String> {
    static VALIDATOR: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    let Some(validator) = VALIDATOR.get_or_init(|| {
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(crd_schema())
            .ok()
    }) else {
        return vec!["internal error: the CRD schema does not compile".to_string()];
    };
    validator
        .iter_errors(value)
        .map(|e| {
            let path = dotted(&e.instance_path().to_string());
            if path.is_empty() {
                e.to_string()
            } else {
                format!("{path}: {e}")
            }
        })
        .collect()
}

/// `/spec/sidecar/port` → `spec.sidecar.port`; `/spec/tolerations/0` → `spec.tolerations[0]`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').filter(|p| !p.is_empty()) {
        if part.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

/// Fields the schema does not know, reported as `kubectl apply` reports them.
fn unknown_fields(schema: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                // apiVersion, kind and metadata are checked by the API server itself, not the CRD schema.
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(key)) {
                    unknown_fields(sub, child, &child_path, problems);
                } else if let Some(sub) = additional.filter(|a| a.is_object()) {
                    unknown_fields(sub, child, &child_path, problems);
                } else if props.is_some() || additional == Some(&Value::Bool(false)) {
                    problems.push(format!("{child_path}: unknown field \"{key}\""));
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (i, child) in items.iter().enumerate() {
                    unknown_fields(sub, child, &format!("{path}[{i}]"), problems);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
    }

    fn yaml_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn every_example_is_a_valid_cache_tier() {
        let files = yaml_files(&examples_dir());
        assert!(
            files.len() >= 2,
            "expected a minimal and a full example, found {files:?}"
        );
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            if let Err(e) = parse_manifest(&text) {
                panic!("{} should be valid: {e}", file.display());
            }
        }
    }

    #[test]
    fn the_minimal_example_gets_the_documented_defaults() {
        let text = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
        let tier = parse_manifest(&text).unwrap();
        assert_eq!(tier.spec.replicas_per_shard, 1);
        assert_eq!(tier.spec.max_memory_policy.as_redis(), "allkeys-lru");
        assert_eq!(
            tier.spec.health.response_timeout,
            std::time::Duration::from_secs(1)
        );
        assert_eq!(tier.spec.health.probe_interval, std::time::Duration::from_secs(1));
        assert_eq!(tier.spec.sidecar.port, 6379);
        assert_eq!(
            tier.spec.sidecar.local_cache.ttl,
            std::time::Duration::from_secs(60)
        );
        assert!(!tier.spec.sidecar.local_cache.enabled);
    }

    /// Each file in `examples/invalid/` breaks one rule and names, in leading
    /// comments `# expect: TEXT`, fragments of the message a user must see.
    #[test]
    fn every_invalid_example_is_rejected_with_its_expected_message() {
        let files = yaml_files(&examples_dir().join("invalid"));
        assert!(
            files.len() >= 10,
            "expected one invalid example per rule, found {}",
            files.len()
        );
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let expected: Vec<&str> = text.lines().map_while(|l| l.strip_prefix("# expect: ")).collect();
            assert!(
                !expected.is_empty(),
                "{} lacks a '# expect: ' first line",
                file.display()
            );
            match parse_manifest(&text) {
                Ok(_) => panic!(
                    "{} was accepted; expected an error containing {expected:?}",
                    file.display()
                ),
                Err(e) => {
                    let msg = e.to_string();
                    for expect in expected {
                        assert!(
                            msg.contains(expect),
                            "{}: expected an error containing {expect:?}, got {msg:?}",
                            file.display()
                        );
                    }
                }
            }
        }
    }

    /// The minimal example, defaulted, as the JSON an API server's CEL rules see.
    fn defaulted_minimal() -> Value {
        let text = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
        serde_json::to_value(parse_manifest(&text).unwrap()).unwrap()
    }

    /// An API server runs the CEL rules even on a value the schema's pattern
    /// already refused; an unguarded `duration('soon')` then adds a "type
    /// conversion error" to the pattern message.
    #[test]
    fn a_malformed_duration_gets_no_cel_error_beside_the_pattern_message() {
        for pointer in [
            "/spec/health/probeInterval",
            "/spec/health/responseTimeout",
            "/spec/health/evictAfter",
            "/spec/sidecar/localCache/ttl",
        ] {
            let mut value = defaulted_minimal();
            *value.pointer_mut(pointer).unwrap() = Value::from("soon");
            let cel = Validator::new().validate(crd_schema(), &value, None);
            assert!(cel.is_ok(), "{pointer}: {:?}", cel.err().map(|e| e.into_vec()));
            assert!(
                !schema_problems(&value).is_empty(),
                "{pointer}: the pattern must refuse it"
            );
        }
    }

    #[test]
    fn the_memory_headroom_rule_compares_quantities_in_any_unit() {
        let mut value = defaulted_minimal();
        value["spec"]["maxMemory"] = Value::from("1Gi");
        value["spec"]["resources"] = serde_json::json!({"limits": {"memory": "1500M"}});
        assert!(Validator::new().validate(crd_schema(), &value, None).is_ok());
        value["spec"]["resources"]["limits"]["memory"] = Value::from("1000M");
        let errors = Validator::new().validate(crd_schema(), &value, None).unwrap_err();
        let text = format!("{:?}", errors.into_vec());
        assert!(
            text.contains("maxMemory must be below resources.limits.memory"),
            "{text}"
        );
    }

    #[test]
    fn integer_bounds_read_as_integers_in_messages() {
        let text = std::fs::read_to_string(examples_dir().join("invalid/shards-zero.yaml")).unwrap();
        let problems = parse_manifest(&text).unwrap_err().problems;
        assert_eq!(
            problems,
            vec!["spec.shards: 0 is less than the minimum of 1".to_string()]
        );
    }

    #[test]
    fn field_paths_read_like_kubectl_paths() {
        assert_eq!(dotted("/spec/sidecar/port"), "spec.sidecar.port");
        assert_eq!(dotted("/spec/tolerations/0/key"), "spec.tolerations[0].key");
        assert_eq!(dotted(""), "");
    }

    #[test]
    fn uppercase_operator_owned_settings_are_rejected_too() {
        let text = std::fs::read_to_string(examples_dir().join("minimal.yaml")).unwrap();
        let mut tier = parse_manifest(&text).unwrap();
        tier.spec.redis_config.insert("PORT".into(), "1".into());
        tier.spec.redis_config.insert("hz".into(), "20".into());
        let err = validate(&tier).unwrap_err().to_string();
        assert!(err.contains("operator owns: PORT"), "{err}");
        assert!(!err.contains("hz"), "{err}");
    }

    #[test]
    fn the_checked_in_crd_is_exactly_the_generated_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cachetier.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap();
        assert!(
            checked_in == crate::crd_yaml().unwrap(),
            "crds/cachetier.yaml is stale: run `cargo run -p cachetier-operator -- crd > crds/cachetier.yaml`"
        );
    }

    /// `kubectl explain cachetier.spec.health` must read well: every property of
    /// the schema, ours and the embedded Kubernetes types alike, has a description.
    #[test]
    fn every_field_of_the_crd_has_a_description() {
        fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    let child = format!("{path}.{name}");
                    let top_level =
                        path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                    if !top_level
                        && sub
                            .get("description")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                    {
                        missing.push(child.clone());
                    }
                    walk(sub, &child, missing);
                }
            }
            for key in ["items", "additionalProperties"] {
                if let Some(sub) = schema.get(key).filter(|s| s.is_object()) {
                    walk(sub, path, missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(crd_schema(), "", &mut missing);
        assert!(missing.is_empty(), "fields without a description: {missing:?}");
    }
}
