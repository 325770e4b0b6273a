//! A rough, conservative model of how the API server prices the CRD's CEL rules.
//!
//! The API server is the real authority: it *estimates* each rule's worst-case
//! cost from the declared size bounds (`maxLength`, `maxItems`,
//! `maxProperties`) of everything the rule can reach, multiplied by how many
//! times the rule can run (the bounds of the lists and maps around it), and
//! refuses the whole CRD when one rule exceeds its per-rule limit or all rules
//! together exceed the CRD limit. Neither `kubernetes-validate` nor a local CEL
//! evaluator sees this. This module does not reimplement that estimator; it
//! checks the two things that made a real server refuse our CRD, so the next
//! rule added cannot break installation silently:
//!
//! 1. every string, list and map a rule (or its message expression) reads is
//!    bounded in the schema;
//! 2. a worst-case cost, from those bounds multiplied along the path and by the
//!    collections a macro (`all`, `exists`, `filter`, …) walks, stays far below
//!    the server's limits.

use serde_json::Value;

/// The server's per-rule estimated cost limit (`StaticEstimatedCostLimit`).
pub const SERVER_RULE_LIMIT: u64 = 10_000_000;
/// The server's limit for all rules of a CRD together.
pub const SERVER_CRD_LIMIT: u64 = 100_000_000;
/// Our model is coarse and errs high (it prices a whole map where a rule reads
/// only its keys): demand a tenfold margin below the server's limits.
pub const RULE_LIMIT: u64 = SERVER_RULE_LIMIT / 10;
/// Likewise for the whole CRD.
pub const CRD_LIMIT: u64 = SERVER_CRD_LIMIT / 10;

/// Map keys cannot be bounded in a structural schema; price them as a long
/// Kubernetes name.
const KEY_SIZE: u64 = 253;
/// The server counts a string's `maxLength` in code points and sizes it as up
/// to 4 bytes each.
const BYTES_PER_CHAR: u64 = 4;
/// Traversing a string costs a tenth of a unit per byte, as on the server
/// (`StringTraversalCostFactor`).
const TRAVERSAL_DIVISOR: u64 = 10;
/// Macros whose body runs once per element of the collection before the dot.
const MACROS: &[&str] = &["all", "exists", "exists_one", "filter", "map"];

/// One CEL expression found in the schema.
#[derive(Debug, Clone)]
pub struct Expression {
    /// Where the rule sits, e.g. `spec.health`.
    pub at: String,
    /// The rule or message expression.
    pub text: String,
    /// Estimated worst-case cost, times the runs of the rule.
    pub cost: u64,
    /// What the rule reads without a bound.
    pub unbounded: Vec<String>,
}

/// Every rule and message expression in `schema`, priced.
pub fn expressions(schema: &Value) -> Vec<Expression> {
    let mut out = Vec::new();
    walk(schema, "", 1, &mut Vec::new(), &mut out);
    out
}

fn walk(node: &Value, at: &str, runs: u64, outer_unbounded: &mut Vec<String>, out: &mut Vec<Expression>) {
    if let Some(rules) = node.get("x-kubernetes-validations").and_then(Value::as_array) {
        for rule in rules {
            for key in ["rule", "messageExpression"] {
                if let Some(text) = rule.get(key).and_then(Value::as_str) {
                    let mut priced = price(node, at, text, runs);
                    priced.unbounded.extend(outer_unbounded.iter().cloned());
                    out.push(priced);
                }
            }
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk(child, &join(at, name), runs, outer_unbounded, out);
        }
    }
    for (key, bound, suffix) in [
        ("items", "maxItems", "[*]"),
        ("additionalProperties", "maxProperties", "[*]"),
    ] {
        if let Some(child) = node.get(key).filter(|c| c.is_object()) {
            let n = node.get(bound).and_then(Value::as_u64);
            let pushed = n.is_none();
            if pushed {
                outer_unbounded.push(format!("{at} (around a rule below it)"));
            }
            walk(
                child,
                &format!("{at}{suffix}"),
                runs.saturating_mul(n.unwrap_or(1)),
                outer_unbounded,
                out,
            );
            if pushed {
                outer_unbounded.pop();
            }
        }
    }
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_string()
    } else {
        format!("{at}.{name}")
    }
}

/// Prices one expression evaluated at `node`.
fn price(node: &Value, at: &str, text: &str, runs: u64) -> Expression {
    let mut unbounded = Vec::new();
    // Every literal, operator and call costs at least one unit.
    let mut cost = text.len() as u64;
    for reference in references(text) {
        let Some(target) = resolve(node, &reference.path) else {
            continue;
        };
        let name = format!(
            "{at}: self{}",
            reference.path.iter().map(|p| format!(".{p}")).collect::<String>()
        );
        match size(target) {
            Some(bytes) => {
                // Reading, comparing or parsing the value traverses it once.
                cost = cost.saturating_add(bytes.div_ceil(TRAVERSAL_DIVISOR));
                if reference.macro_follows {
                    // The macro's body runs per element: the whole expression
                    // again, plus a traversal of the element.
                    let elements = cardinality(target).unwrap_or(1);
                    let per_element =
                        (text.len() as u64).saturating_add(element_size(target).div_ceil(TRAVERSAL_DIVISOR));
                    cost = cost.saturating_add(elements.saturating_mul(per_element));
                }
            }
            None => unbounded.push(name),
        }
    }
    Expression {
        at: at.to_string(),
        text: text.to_string(),
        cost: cost.saturating_mul(runs),
        unbounded,
    }
}

/// A `self.a.b` path in an expression, and whether a macro call follows it.
struct Reference {
    path: Vec<String>,
    macro_follows: bool,
}

/// The `self…` paths an expression reads. A path stops at a method call
/// (`self.keys.all(`): the method is not a field.
fn references(text: &str) -> Vec<Reference> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = text[i..].find("self") {
        let start = i + found;
        i = start + 4;
        if start > 0 && is_ident(bytes[start - 1]) || i < bytes.len() && is_ident(bytes[i]) {
            continue;
        }
        let mut path = Vec::new();
        let mut macro_follows = false;
        while i < bytes.len() && bytes[i] == b'.' {
            let from = i + 1;
            let mut to = from;
            while to < bytes.len() && is_ident(bytes[to]) {
                to += 1;
            }
            let ident = &text[from..to];
            if to < bytes.len() && bytes[to] == b'(' {
                macro_follows = MACROS.contains(&ident);
                break;
            }
            path.push(ident.to_string());
            i = to;
        }
        out.push(Reference { path, macro_follows });
    }
    out
}

/// The schema node a path leads to: properties by name, map values by key.
fn resolve<'a>(node: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = node;
    for part in path {
        current = match current.get("properties").and_then(|p| p.get(part)) {
            Some(child) => child,
            None => current.get("additionalProperties").filter(|a| a.is_object())?,
        };
    }
    Some(current)
}

/// How many elements a list or map holds at most.
fn cardinality(node: &Value) -> Option<u64> {
    if node.get("items").is_some() {
        node.get("maxItems").and_then(Value::as_u64)
    } else {
        node.get("maxProperties").and_then(Value::as_u64)
    }
}

fn element_size(node: &Value) -> u64 {
    let element = node
        .get("items")
        .or_else(|| node.get("additionalProperties"))
        .and_then(size)
        .unwrap_or(1);
    if node.get("additionalProperties").is_some() {
        element.saturating_add(KEY_SIZE)
    } else {
        element
    }
}

/// Worst-case serialized size of a value of `node`, or `None` when something in
/// it is unbounded. Objects with fixed properties are as large as all of them.
fn size(node: &Value) -> Option<u64> {
    let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let kind = node.get("type").and_then(Value::as_str).unwrap_or("");
    if int_or_string || kind == "string" {
        if let Some(values) = node.get("enum").and_then(Value::as_array) {
            return values
                .iter()
                .filter_map(Value::as_str)
                .map(|s| s.len() as u64)
                .max();
        }
        return node
            .get("maxLength")
            .and_then(Value::as_u64)
            .map(|n| n * BYTES_PER_CHAR);
    }
    match kind {
        "array" => {
            let n = node.get("maxItems").and_then(Value::as_u64)?;
            Some(n.saturating_mul(size(node.get("items")?)?))
        }
        "object" => {
            if let Some(value) = node.get("additionalProperties").filter(|a| a.is_object()) {
                let n = node.get("maxProperties").and_then(Value::as_u64)?;
                return Some(n.saturating_mul(size(value)?.saturating_add(KEY_SIZE)));
            }
            let props = node.get("properties").and_then(Value::as_object);
            props.map_or(Some(2), |p| p.values().map(size).sum())
        }
        _ => Some(8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd_schema() -> Value {
        crate::validate::crd_schema().clone()
    }

    #[test]
    fn every_value_a_cel_rule_reads_is_bounded_and_every_rule_is_cheap() {
        let all = expressions(&crd_schema());
        assert!(all.len() >= 10, "expected the CRD's rules, found {}", all.len());
        let mut problems = Vec::new();
        for e in &all {
            if !e.unbounded.is_empty() {
                problems.push(format!(
                    "{}: `{}` reads unbounded {:?}",
                    e.at, e.text, e.unbounded
                ));
            }
            if e.cost > RULE_LIMIT {
                problems.push(format!(
                    "{}: `{}` costs about {} (limit {RULE_LIMIT})",
                    e.at, e.text, e.cost
                ));
            }
        }
        let total: u64 = all.iter().map(|e| e.cost).sum();
        if total > CRD_LIMIT {
            problems.push(format!(
                "all rules together cost about {total} (limit {CRD_LIMIT})"
            ));
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    /// The check must catch the very defect a real API server refused: drop one
    /// bound from the generated schema and it fails.
    #[test]
    fn removing_any_bound_a_rule_relies_on_is_caught() {
        let cases = [
            "/properties/spec/properties/redisConfig/maxProperties",
            "/properties/spec/properties/maxMemory/maxLength",
            "/properties/spec/properties/resources/properties/limits/maxProperties",
            "/properties/spec/properties/resources/properties/limits/additionalProperties/maxLength",
            "/properties/spec/properties/health/properties/probeInterval/maxLength",
            "/properties/spec/properties/sidecar/properties/localCache/properties/ttl/maxLength",
            "/properties/spec/properties/sidecar/properties/localCache/properties/keyPrefixes/maxItems",
        ];
        for pointer in cases {
            let mut schema = crd_schema();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let removed = schema
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .and_then(|o| o.remove(key));
            assert!(removed.is_some(), "{pointer} is not in the generated schema");
            let caught = expressions(&schema).iter().any(|e| !e.unbounded.is_empty());
            assert!(caught, "removing {pointer} went unnoticed");
        }
    }

    #[test]
    fn the_old_unbounded_redis_config_rule_is_refused() {
        let schema = json!({
            "type": "object",
            "properties": {"redisConfig": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "x-kubernetes-validations": [{"rule": "size(self.filter(k, k.lowerAscii() in ['port'])) == 0"}]
            }}
        });
        let found = expressions(&schema);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].unbounded, vec!["redisConfig: self".to_string()]);
    }

    #[test]
    fn a_rule_inside_a_bounded_list_is_priced_per_element() {
        let rule = json!({"rule": "self.name.startsWith('a')"});
        let item = json!({
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}},
            "x-kubernetes-validations": [rule]
        });
        let one = expressions(&json!({"type": "object", "properties": {"x": item}}));
        let many = expressions(&json!({"type": "object", "properties": {
            "xs": {"type": "array", "maxItems": 100, "items": item}
        }}));
        assert_eq!(many[0].cost, one[0].cost * 100);
        let unbounded = expressions(&json!({"type": "object", "properties": {
            "xs": {"type": "array", "items": item}
        }}));
        assert!(!unbounded[0].unbounded.is_empty());
    }

    #[test]
    fn references_stop_at_method_calls_and_note_macros() {
        let refs = references("self.a.b.all(x, x > 0) && myself.c == self.d.size()");
        let paths: Vec<_> = refs.iter().map(|r| (r.path.join("."), r.macro_follows)).collect();
        assert_eq!(paths, vec![("a.b".to_string(), true), ("d".to_string(), false)]);
    }
}
