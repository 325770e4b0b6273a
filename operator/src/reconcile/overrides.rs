//! `spec.podOverrides`: the user's strategic-merge patch over the pod
//! template the operator built, applied last, so no pod setting we did not
//! model leaves a user stuck.
//!
//! This is the subset of Kubernetes' strategic merge that a pod template
//! needs, with the API's own merge keys: maps merge recursively, `null`
//! removes a field, lists with a merge key (`containers`, `volumes`, `env`, …
//! by `name`; `volumeMounts` by `mountPath`; `ports` by `containerPort`)
//! merge item by item, every other list is replaced. Directives: `$patch:
//! delete` on a list item removes it, `$patch: replace` on a map replaces it,
//! `$patch: delete` on a map removes it. Other directives (`$retainKeys`,
//! `$setElementOrder`, `$deleteFromPrimitiveList`) are refused by name
//! rather than silently ignored.

use cachetier_crds::validate::Invalid;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{Map, Value};

use crate::cluster::error::Error;

/// The merge key of a list field of a pod template, by field name (the
/// names are unambiguous within a pod template).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// `template` with `patch` merged into it; the result must still be a pod
/// template.
pub(super) fn apply(template: &PodTemplateSpec, patch: &Value) -> Result<PodTemplateSpec, Error> {
    let invalid = |detail: String| {
        Error::Invalid(Invalid {
            problems: vec![format!("spec.podOverrides: {detail}")],
        })
    };
    if !patch.is_object() {
        return Err(invalid("must be an object shaped like a pod template".into()));
    }
    let mut merged = serde_json::to_value(template).map_err(|e| Error::Render(e.to_string()))?;
    merge_value(&mut merged, patch, "").map_err(invalid)?;
    serde_json::from_value(merged).map_err(|e| invalid(format!("the patched pod template is not valid: {e}")))
}

fn merge_value(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => merge_map(t, p, path),
        (t, p) => {
            *t = strip_directives(p, path)?;
            Ok(())
        }
    }
}

fn merge_map(target: &mut Map<String, Value>, patch: &Map<String, Value>, path: &str) -> Result<(), String> {
    if let Some(directive) = patch.get("$patch") {
        match directive.as_str() {
            Some("replace") => {
                let mut rest = patch.clone();
                rest.remove("$patch");
                *target = match strip_directives(&Value::Object(rest), path)? {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                return Ok(());
            }
            Some("merge") => {}
            other => {
                return Err(format!(
                    "{path}: unsupported $patch directive {other:?} on an object"
                ));
            }
        }
    }
    for (key, value) in patch {
        let here = format!("{path}.{key}");
        if key == "$patch" {
            continue;
        }
        if key.starts_with('$') {
            return Err(format!("{here}: directive {key} is not supported"));
        }
        if value.is_null() {
            target.remove(key);
            continue;
        }
        if value.get("$patch").and_then(Value::as_str) == Some("delete") {
            target.remove(key);
            continue;
        }
        match (target.get_mut(key), value) {
            (Some(Value::Array(t)), Value::Array(p)) => match merge_key(key) {
                Some(k) => merge_list(t, p, k, &here)?,
                None => *t = strip_list(p, &here)?,
            },
            (Some(t), p) => merge_value(t, p, &here)?,
            (None, p) => {
                target.insert(key.clone(), strip_directives(p, &here)?);
            }
        }
    }
    Ok(())
}

fn merge_list(target: &mut Vec<Value>, patch: &[Value], key: &str, path: &str) -> Result<(), String> {
    for item in patch {
        let Some(id) = item.get(key) else {
            return Err(format!("{path}: every item needs its merge key `{key}`"));
        };
        let here = format!("{path}[{key}={id}]");
        let at = target.iter().position(|t| t.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (at, delete) {
            (Some(i), true) => {
                target.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => merge_value(&mut target[i], item, &here)?,
            (None, false) => target.push(strip_directives(item, &here)?),
        }
    }
    Ok(())
}

fn strip_list(items: &[Value], path: &str) -> Result<Vec<Value>, String> {
    items.iter().map(|v| strip_directives(v, path)).collect()
}

/// A value inserted as a whole: directives in it have nothing to act on,
/// except that `null` fields are dropped (as the API server would).
fn strip_directives(value: &Value, path: &str) -> Result<Value, String> {
    Ok(match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                if k == "$patch" && matches!(v.as_str(), Some("replace" | "merge")) {
                    continue;
                }
                if k.starts_with('$') {
                    return Err(format!("{path}.{k}: directive not supported here"));
                }
                if !v.is_null() {
                    out.insert(k.clone(), strip_directives(v, &format!("{path}.{k}"))?);
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(strip_list(items, path)?),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn template() -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "x"}, "annotations": {"a": "1"}},
            "spec": {
                "containers": [{
                    "name": "redis", "image": "redis:7.2",
                    "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    "ports": [{"containerPort": 6379, "name": "redis"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]
                }],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "tolerations": [{"key": "a", "operator": "Exists"}]
            }
        }))
        .unwrap()
    }

    fn patched(patch: Value) -> Value {
        serde_json::to_value(apply(&template(), &patch).unwrap()).unwrap()
    }

    #[test]
    fn keyed_lists_merge_by_item_and_other_lists_are_replaced() {
        let out = patched(json!({"spec": {
            "containers": [
                {"name": "redis", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]},
                {"name": "exporter", "image": "oliver006/redis_exporter:v1.62.0"}
            ],
            "tolerations": [{"key": "b", "operator": "Exists"}],
            "hostNetwork": false
        }}));
        let containers = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[0]["image"], "redis:7.2", "untouched fields stay");
        assert_eq!(
            containers[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
        assert_eq!(containers[1]["name"], "exporter");
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "b", "operator": "Exists"}])
        );
        assert_eq!(out["spec"]["hostNetwork"], false);
    }

    #[test]
    fn null_and_delete_directives_remove_and_replace_swaps_a_map() {
        let out = patched(json!({
            "metadata": {"annotations": {"$patch": "replace", "b": "2"}},
            "spec": {
                "containers": [{"name": "redis",
                    "env": [{"name": "A", "$patch": "delete"}],
                    "volumeMounts": [{"mountPath": "/scratch", "name": "scratch"}]}],
                "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory"}}],
                "tolerations": null
            }
        }));
        assert_eq!(out["metadata"]["annotations"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["labels"], json!({"app": "x"}));
        let redis = &out["spec"]["containers"][0];
        assert_eq!(redis["env"], json!([{"name": "B", "value": "2"}]));
        assert_eq!(redis["volumeMounts"].as_array().unwrap().len(), 2);
        assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 2);
        assert!(out["spec"].get("tolerations").is_none());
    }

    #[test]
    fn a_patch_that_breaks_the_template_or_uses_an_unknown_directive_is_refused_with_the_path() {
        let err = apply(&template(), &json!({"spec": {"containers": "oops"}})).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.podOverrides: the patched pod template is not valid"),
            "{err}"
        );
        let err = apply(&template(), &json!({"spec": {"$retainKeys": ["containers"]}})).unwrap_err();
        assert!(
            err.to_string()
                .contains(".spec.$retainKeys: directive $retainKeys is not supported"),
            "{err}"
        );
        let err = apply(&template(), &json!({"spec": {"containers": [{"image": "x"}]}})).unwrap_err();
        assert!(
            err.to_string().contains("every item needs its merge key `name`"),
            "{err}"
        );
        let err = apply(&template(), &json!(["not", "an", "object"])).unwrap_err();
        assert!(err.to_string().contains("must be an object"), "{err}");
    }
}
