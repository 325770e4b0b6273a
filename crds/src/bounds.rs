//! Size bounds on the embedded Kubernetes types a CEL rule reads.
//!
//! The API server estimates every CEL rule's worst-case cost from the
//! `maxLength`, `maxItems` and `maxProperties` of what the rule can reach, and
//! refuses the whole CRD when a rule (or all of them together) is over budget.
//! `ResourceRequirements` comes from k8s-openapi without any bound, so these
//! schemars transforms add them where our schema embeds it.

use schemars::Schema;
use serde_json::{Value, json};

/// Most entries in `requests` or `limits` (cpu, memory, ephemeral-storage,
/// hugepages-*, extended resources: a real container uses a handful).
pub const MAX_RESOURCE_ENTRIES: u64 = 16;
/// Longest quantity string (`1536Mi`, `2.5`, `100m`).
pub const MAX_QUANTITY_LENGTH: u64 = 32;
/// Most `redisConfig` entries.
pub const MAX_REDIS_CONFIG_ENTRIES: u64 = 64;
/// Longest `redisConfig` value.
pub const MAX_REDIS_CONFIG_VALUE_LENGTH: u64 = 1024;

/// The shape of a Kubernetes quantity, as the API server parses it.
const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Bounds `requests`, `limits` and `claims` of a `ResourceRequirements`.
pub fn resource_requirements(schema: &mut Schema) {
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for key in ["requests", "limits"] {
        if let Some(map) = props.get_mut(key).and_then(Value::as_object_mut) {
            map.insert("maxProperties".into(), json!(MAX_RESOURCE_ENTRIES));
            if let Some(quantity) = map.get_mut("additionalProperties").and_then(Value::as_object_mut) {
                quantity.insert("maxLength".into(), json!(MAX_QUANTITY_LENGTH));
                quantity.insert("pattern".into(), json!(QUANTITY_PATTERN));
            }
        }
    }
    if let Some(claims) = props.get_mut("claims").and_then(Value::as_object_mut) {
        claims.insert("maxItems".into(), json!(MAX_RESOURCE_ENTRIES));
        let fields = claims
            .get_mut("items")
            .and_then(|items| items.get_mut("properties"))
            .and_then(Value::as_object_mut);
        if let Some(fields) = fields {
            for field in fields.values_mut().filter_map(Value::as_object_mut) {
                field.insert("maxLength".into(), json!(253));
            }
        }
    }
}

/// Bounds the `redisConfig` map: entries and value length.
pub fn redis_config(schema: &mut Schema) {
    let Some(map) = schema.as_object_mut() else {
        return;
    };
    map.insert("maxProperties".into(), json!(MAX_REDIS_CONFIG_ENTRIES));
    if let Some(value) = map.get_mut("additionalProperties").and_then(Value::as_object_mut) {
        value.insert("maxLength".into(), json!(MAX_REDIS_CONFIG_VALUE_LENGTH));
    }
}

/// An object whose fields the API server keeps as sent (no schema below it):
/// `podOverrides`, which takes any part of a pod template. No CEL rule reads
/// it, so it needs no bounds.
pub fn free_form_object(_: &mut schemars::SchemaGenerator) -> Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}
