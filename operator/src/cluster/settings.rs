//! Which spec settings a running node must have, and how a node's
//! `CONFIG GET` answer is compared with them.
//!
//! A spec edit of `maxMemory`, `maxMemoryPolicy` or `redisConfig` must reach
//! nodes that already run: settings Redis changes at runtime get a
//! `CONFIG SET`; the few it does not (immutable ones) need a restart, which the
//! planner rolls out one node at a time. Not responsible for deciding when:
//! that is `plan/rollout.rs`.

use std::collections::BTreeMap;

use super::config::TierConfig;

/// Settings Redis 7.0 refuses to change at runtime ("can't set immutable
/// config"): a node gets a new value only by being restarted with it.
const RESTART_ONLY: &[&str] = &[
    "databases",
    "io-threads",
    "io-threads-do-reads",
    "tcp-backlog",
    "disable-thp",
    "supervised",
    "unixsocket",
    "unixsocketperm",
    "syslog-enabled",
    "syslog-ident",
    "syslog-facility",
    "always-show-logo",
    "set-proc-title",
    "proc-title-template",
    "appendfilename",
    "appenddirname",
    "aclfile",
    "enable-protected-configs",
    "enable-debug-command",
    "enable-module-command",
];

/// Whether `key` can only change with a restart.
pub fn restart_only(key: &str) -> bool {
    RESTART_ONLY.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// The settings every running node is checked against, by lower-case name:
/// `maxmemory`, `maxmemory-policy` and every single-word `redisConfig` value.
/// Values of several words (`save "900 1"`, buffer limits) are not compared:
/// Redis reports them in its own normalised form.
pub fn desired(tier: &TierConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("maxmemory".to_string(), tier.max_memory_bytes.to_string());
    out.insert("maxmemory-policy".to_string(), tier.max_memory_policy.clone());
    for (k, v) in &tier.redis_config {
        let v = v.trim().trim_matches('"');
        if !v.contains(char::is_whitespace) && !v.is_empty() {
            out.insert(k.to_ascii_lowercase(), v.to_string());
        }
    }
    out
}

/// A memory value (`64mb`, `1gb`, `100`) in bytes, as Redis parses it.
fn bytes(v: &str) -> Option<u64> {
    let v = v.to_ascii_lowercase();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1_000_000,
        "mb" => 1 << 20,
        "g" => 1_000_000_000,
        "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Whether a node's `actual` value is the `desired` one (case, quotes and
/// memory units aside).
pub fn same(desired: &str, actual: &str) -> bool {
    let (d, a) = (desired.trim().trim_matches('"'), actual.trim().trim_matches('"'));
    if d.eq_ignore_ascii_case(a) {
        return true;
    }
    if matches!((bytes(d), bytes(a)), (Some(x), Some(y)) if x == y) {
        return true;
    }
    // Flag strings come back reordered (`notify-keyspace-events KEA` reads
    // `AKE`): the same letters in another order are the same value, or the
    // node would be reconfigured every round.
    let sorted = |v: &str| {
        let mut c: Vec<char> = v.chars().collect();
        c.sort_unstable();
        c
    };
    !d.is_empty() && d.chars().all(|c| c.is_ascii_alphabetic() || c == '$') && sorted(d) == sorted(a)
}

/// The settings of `desired` that `actual` (a node's `CONFIG GET` answer)
/// does not match, split into (runtime, restart-only). A key the node did not
/// report is not judged.
pub fn drift(
    desired: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut runtime = Vec::new();
    let mut restart = Vec::new();
    for (k, want) in desired {
        match actual.get(k) {
            Some(have) if !same(want, have) => {
                if restart_only(k) {
                    restart.push(k.clone());
                } else {
                    runtime.push((k.clone(), want.clone()));
                }
            }
            _ => {}
        }
    }
    (runtime, restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_values_compare_by_bytes_and_words_by_case() {
        assert!(same("64mb", "67108864"));
        assert!(same("1gb", "1073741824"));
        assert!(same("allkeys-LRU", "allkeys-lru"));
        assert!(same("\"yes\"", "yes"));
        assert!(!same("32mb", "67108864"));
        assert!(!same("allkeys-lru", "noeviction"));
        assert!(!same("99999999999999999999gb", "1"));
        assert!(same("KEA", "AKE"));
        assert!(!same("KEA", "AK"));
    }

    #[test]
    fn drift_splits_runtime_settings_from_restart_only_ones_and_skips_unreported_keys() {
        let mut tier = crate::cluster::fixture::tier(1, 0);
        tier.redis_config.insert("databases".into(), "4".into());
        tier.redis_config.insert("hz".into(), "20".into());
        tier.redis_config.insert("save".into(), "900 1".into());
        let want = desired(&tier);
        assert!(!want.contains_key("save"));
        let actual: BTreeMap<String, String> = [
            ("maxmemory", "67108864"),
            ("maxmemory-policy", "noeviction"),
            ("databases", "16"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (runtime, restart) = drift(&want, &actual);
        assert_eq!(
            runtime,
            vec![("maxmemory-policy".to_string(), "allkeys-lru".to_string())]
        );
        assert_eq!(restart, vec!["databases".to_string()]);
    }
}
