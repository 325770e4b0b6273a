//! `INFO`: the sidecar's own sections (it is the client's server), with
//! `keyspace` and `memory` summed over every primary, and `stats` the
//! sidecar's own counts beside the nodes' summed hits, misses, expiries and
//! evictions.

use std::collections::HashMap;

use super::*;

/// `INFO`'s sections in Redis's order, by lower-case name.
const ORDER: &[&str] = &[
    "server",
    "clients",
    "memory",
    "persistence",
    "stats",
    "replication",
    "cluster",
    "keyspace",
    "cache",
];

/// The sections made of the nodes' own figures.
const FROM_NODES: &[&str] = &["memory", "stats", "keyspace"];

/// What the nodes answered to `INFO memory stats keyspace`, by role.
#[derive(Debug, Default)]
struct Nodes {
    primaries: Vec<HashMap<String, String>>,
    replicas: Vec<HashMap<String, String>>,
}

impl Nodes {
    /// `field` summed over the primaries, or over every node.
    fn sum(&self, field: &str, replicas_too: bool) -> u64 {
        let replicas = if replicas_too { &self.replicas[..] } else { &[] };
        self.primaries
            .iter()
            .chain(replicas)
            .filter_map(|n| n.get(field)?.parse::<u64>().ok())
            .fold(0, u64::saturating_add)
    }
}

/// The `field:value` lines of an `INFO` reply.
fn fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What `INFO server` tells of this sidecar's process (the server its
/// clients talk to); client test suites and dashboards read `arch_bits`,
/// `process_id`, `run_id` and the uptime. What cannot change is found once.
#[derive(Debug)]
pub(super) struct Process {
    started: std::time::Instant,
    /// 40 random hex digits chosen at start, as Redis's.
    run_id: String,
    os: String,
    executable: String,
}

impl Process {
    pub(super) fn new() -> Process {
        Process {
            started: std::time::Instant::now(),
            run_id: (0..40)
                .map(|_| char::from(b"0123456789abcdef"[usize::from(rand::random::<u8>() % 16)]))
                .collect(),
            os: os_name(),
            executable: std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// Its fields of Redis's `server` section, in Redis's order.
    fn fields(&self, tcp_port: u16) -> String {
        let uptime = self.started.elapsed().as_secs();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        format!(
            "os:{}\r\narch_bits:{}\r\nmultiplexing_api:epoll\r\nprocess_id:{}\r\n\
             run_id:{}\r\ntcp_port:{tcp_port}\r\nserver_time_usec:{now}\r\n\
             uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\
             executable:{}\r\nconfig_file:\r\n",
            self.os,
            usize::BITS,
            std::process::id(),
            self.run_id,
            uptime / 86_400,
            self.executable,
        )
    }
}

/// `Linux 6.1.0-13-amd64 x86_64`, as Redis's `os` field reads.
fn os_name() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    match (
        read("/proc/sys/kernel/ostype"),
        read("/proc/sys/kernel/osrelease"),
    ) {
        (Ok(t), Ok(r)) => format!("{t} {r} {}", std::env::consts::ARCH),
        _ => format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    }
}

/// Bytes as Redis's `INFO` writes them for people (`1.18M`).
fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut scale = 1024f64;
    for unit in UNITS {
        if (n as f64) < scale * 1024.0 {
            return format!("{:.2}{unit}", n as f64 / scale);
        }
        scale *= 1024.0;
    }
    format!("{n}B")
}

/// The tier's `memory` section: the primaries' figures summed (the data
/// a client sees), the eviction policy as the first primary reports it.
fn memory(nodes: &Nodes) -> String {
    let mut s = String::new();
    for field in ["used_memory", "used_memory_rss", "used_memory_peak"] {
        let n = nodes.sum(field, false);
        s.push_str(&format!("{field}:{n}\r\n{field}_human:{}\r\n", human(n)));
    }
    s.push_str(&format!(
        "used_memory_dataset:{}\r\n",
        nodes.sum("used_memory_dataset", false)
    ));
    // 0 is no limit: a tier with an unlimited primary has none either.
    let unlimited = nodes
        .primaries
        .iter()
        .any(|n| n.get("maxmemory").is_some_and(|m| m == "0"));
    let max = if unlimited {
        0
    } else {
        nodes.sum("maxmemory", false)
    };
    s.push_str(&format!("maxmemory:{max}\r\nmaxmemory_human:{}\r\n", human(max)));
    if let Some(policy) = nodes.primaries.iter().find_map(|n| n.get("maxmemory_policy")) {
        s.push_str(&format!("maxmemory_policy:{policy}\r\n"));
    }
    s
}

/// The figures of a `db0` line's value (`keys=…,expires=…,avg_ttl=…`).
fn db0_fields(line: &str) -> Option<(u64, u64, u64)> {
    let mut keys = None;
    let mut expires = None;
    let mut ttl = None;
    for field in line.split(',') {
        match field.split_once('=') {
            Some(("keys", v)) => keys = v.parse().ok(),
            Some(("expires", v)) => expires = v.parse().ok(),
            Some(("avg_ttl", v)) => ttl = v.parse().ok(),
            _ => {}
        }
    }
    Some((keys?, expires.unwrap_or(0), ttl.unwrap_or(0)))
}

/// The tier's `db0` line from each node's: keys and expires summed, the
/// average TTL weighted by each node's volatile keys; none when empty (as
/// Redis shows no line for an empty database).
fn keyspace(nodes: &[(u64, u64, u64)]) -> String {
    let keys: u64 = nodes.iter().map(|n| n.0).sum();
    let expires: u64 = nodes.iter().map(|n| n.1).sum();
    if keys == 0 {
        return String::new();
    }
    let weighted: u128 = nodes.iter().map(|n| u128::from(n.1) * u128::from(n.2)).sum();
    let ttl = if expires == 0 {
        0
    } else {
        weighted / u128::from(expires)
    };
    format!("db0:keys={keys},expires={expires},avg_ttl={ttl}\r\n")
}

impl Router {
    /// `INFO [section …]`: those asked for (all for none, `all`,
    /// `everything`, `default`), a blank line between, as Redis gives them;
    /// an unknown section adds nothing.
    pub(super) fn info(
        self: &Arc<Self>,
        info: &'static CommandInfo,
        asked: &[Bytes],
        up: Proto,
        proto: u8,
    ) -> Action {
        let asked: Vec<String> = asked
            .iter()
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        let every = asked.is_empty()
            || asked
                .iter()
                .any(|a| matches!(a.as_str(), "all" | "everything" | "default"));
        let wanted: Vec<&'static str> = ORDER
            .iter()
            .copied()
            .filter(|n| every || asked.iter().any(|a| a == n))
            .collect();
        let this = self.clone();
        self.timed(info, async move {
            let nodes = if wanted.iter().any(|w| FROM_NODES.contains(w)) {
                Some(this.node_infos(up, wanted.contains(&"stats")).await)
            } else {
                None
            };
            let body = wanted
                .iter()
                .filter_map(|&name| Some((name, this.info_section(name, nodes.as_ref())?)))
                .map(|(name, body)| {
                    let mut title = name.to_string();
                    if let Some(first) = title.get_mut(..1) {
                        first.make_ascii_uppercase();
                    }
                    format!("# {title}\r\n{body}")
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            encode(&text(proto, body))
        })
    }

    /// `INFO memory stats keyspace` of every primary in rotation, and of
    /// every replica in rotation when `replicas` (only `stats` sums theirs);
    /// a node that does not answer is left out.
    async fn node_infos(&self, up: Proto, replicas: bool) -> Nodes {
        let cmd = resp::command_bytes(&["INFO", "memory", "stats", "keyspace"]);
        let (primaries, replicas) = self.in_rotation(replicas);
        let (primaries, replicas) = futures_util::join!(
            Router::ask_each(primaries, &cmd, up),
            Router::ask_each(replicas, &cmd, up)
        );
        let parse = |replies: Vec<Bytes>| -> Vec<HashMap<String, String>> {
            (replies.iter())
                .filter_map(|raw| match resp::parse(raw) {
                    Ok(Frame::Bulk(b) | Frame::Verbatim(b)) => Some(fields(&String::from_utf8_lossy(&b))),
                    _ => None,
                })
                .collect()
        };
        Nodes {
            primaries: parse(primaries),
            replicas: parse(replicas),
        }
    }

    /// One section's lines (`None`: the sidecar has no such section now).
    fn info_section(&self, name: &str, nodes: Option<&Nodes>) -> Option<String> {
        Some(match name {
            "server" => {
                let mut s = String::new();
                // The version the cluster's nodes report (clients check features by it).
                if let Some(v) = self.registry.redis_version() {
                    s.push_str(&format!("redis_version:{v}\r\n"));
                }
                s.push_str("redis_mode:standalone\r\n");
                s.push_str(&self.process.fields(self.config.listen.port()));
                s.push_str(&format!(
                    "cachetier_sidecar_version:{}\r\n",
                    env!("CARGO_PKG_VERSION")
                ));
                s.push_str(&format!("read_policy:{}\r\n", self.config.read_policy.as_str()));
                s
            }
            "clients" => {
                let blocked = crate::blocking::MAX_BLOCKING - self.blocking_permits.available_permits();
                format!(
                    "connected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:{blocked}\r\n",
                    self.clients.len(),
                    self.config.max_clients
                )
            }
            "memory" => memory(nodes?),
            // Client libraries read these on connect (ioredis waits for loading:0).
            "persistence" => "loading:0\r\n".to_string(),
            "stats" => self.stats(nodes?),
            "replication" => "role:master\r\nconnected_slaves:0\r\n".to_string(),
            "cluster" => {
                let topo = self.registry.current();
                let mut s = format!("cluster_enabled:0\r\ncachetier_shards:{}\r\n", topo.shards.len());
                for (i, shard) in topo.shards.iter().enumerate() {
                    let replicas: Vec<String> = shard
                        .replicas
                        .iter()
                        .map(|r| {
                            format!(
                                "{}={}",
                                r.addr,
                                if r.serving_replica() { "serving" } else { "gated" }
                            )
                        })
                        .collect();
                    s.push_str(&format!(
                        "shard{i}:primary={}{},replicas={}\r\n",
                        shard.primary.addr,
                        if shard.primary.is_healthy() { "" } else { "(down)" },
                        replicas.join(";")
                    ));
                }
                s
            }
            "keyspace" => {
                let db0s: Vec<(u64, u64, u64)> = nodes?
                    .primaries
                    .iter()
                    .filter_map(|n| db0_fields(n.get("db0")?))
                    .collect();
                keyspace(&db0s)
            }
            "cache" => format!("cache_bytes:{}\r\n", self.cache.as_ref()?.weighted_size()),
            _ => return None,
        })
    }

    /// The `stats` section: connections and commands are the sidecar's own
    /// (its clients'); hits and misses are every node's (replicas serve
    /// reads), expiries and evictions the primaries'.
    fn stats(&self, nodes: &Nodes) -> String {
        let connections = self.metrics.client_connections_accepted.get();
        use prometheus::core::Collector;
        let commands: u64 = Collector::collect(&self.metrics.requests)
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum();
        format!(
            "total_connections_received:{connections}\r\ntotal_commands_processed:{commands}\r\n\
             expired_keys:{}\r\nevicted_keys:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\n",
            nodes.sum("expired_keys", false),
            nodes.sum("evicted_keys", false),
            nodes.sum("keyspace_hits", true),
            nodes.sum("keyspace_misses", true),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyspace_line_sums_the_nodes_lines() {
        // A node's `INFO keyspace`, read as the sidecar reads it.
        let db0 = |text: &str| fields(text).get("db0").and_then(|v| db0_fields(v));
        assert_eq!(
            db0("# Keyspace\r\ndb0:keys=5,expires=2,avg_ttl=100\r\n"),
            Some((5, 2, 100))
        );
        assert_eq!(db0("# Keyspace\r\n"), None);
        assert_eq!(
            keyspace(&[(5, 2, 100), (3, 2, 300), (0, 0, 0)]),
            "db0:keys=8,expires=4,avg_ttl=200\r\n"
        );
        assert_eq!(keyspace(&[]), "", "an empty database has no line, as in Redis");
    }

    #[test]
    fn memory_is_the_primaries_summed_and_written_as_redis_does() {
        assert_eq!(human(1000), "1000B");
        assert_eq!(human(1_237_000), "1.18M");
        assert_eq!(human(3 << 30), "3.00G");
        let node = |used: &str, max: &str| {
            fields(&format!(
                "used_memory:{used}\r\nmaxmemory:{max}\r\nmaxmemory_policy:allkeys-lru\r\n"
            ))
        };
        let nodes = Nodes {
            primaries: vec![node("1048576", "1073741824"), node("2097152", "1073741824")],
            replicas: vec![node("9999999", "1073741824")],
        };
        let text = memory(&nodes);
        for line in [
            "used_memory:3145728\r\nused_memory_human:3.00M\r\n",
            "maxmemory:2147483648\r\nmaxmemory_human:2.00G\r\n",
            "maxmemory_policy:allkeys-lru\r\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text:?}");
        }
        assert_eq!(nodes.sum("used_memory", true), 3145728 + 9999999);
    }
}
