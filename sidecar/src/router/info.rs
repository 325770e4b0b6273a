//! `INFO`: the sidecar's own sections (it is the client's server), with
//! `keyspace` summed over every primary.

use super::*;

/// `INFO`'s sections in Redis's order, by lower-case name.
const ORDER: &[&str] = &[
    "server",
    "clients",
    "persistence",
    "replication",
    "cluster",
    "keyspace",
    "cache",
];

/// `db0:keys=…,expires=…,avg_ttl=…` of one node's `INFO keyspace`.
fn db0(text: &str) -> Option<(u64, u64, u64)> {
    let line = text.lines().find_map(|l| l.trim_end().strip_prefix("db0:"))?;
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
            let keyspace = if wanted.contains(&"keyspace") {
                Some(this.keyspace(up).await)
            } else {
                None
            };
            let body = wanted
                .iter()
                .filter_map(|&name| Some((name, this.info_section(name, keyspace.as_deref())?)))
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

    /// `INFO keyspace` of every primary, summed (a node that does not
    /// answer is left out).
    async fn keyspace(&self, up: Proto) -> String {
        let cmd = resp::command_bytes(&["INFO", "keyspace"]);
        let futs = self.primaries().into_iter().map(|n| {
            let cmd = cmd.clone();
            async move { n.request(up, cmd, 1).await }
        });
        let nodes: Vec<(u64, u64, u64)> = join_all(futs)
            .await
            .into_iter()
            .filter_map(|r| r.ok()?.pop())
            .filter_map(|raw| match resp::parse(&raw) {
                Ok(Frame::Bulk(b) | Frame::Verbatim(b)) => db0(&String::from_utf8_lossy(&b)),
                _ => None,
            })
            .collect();
        keyspace(&nodes)
    }

    /// One section's lines (`None`: the sidecar has no such section now).
    fn info_section(&self, name: &str, keyspace: Option<&str>) -> Option<String> {
        Some(match name {
            "server" => {
                let mut s = String::new();
                // The version the cluster's nodes report (clients check features by it).
                if let Some(v) = self.registry.redis_version() {
                    s.push_str(&format!("redis_version:{v}\r\n"));
                }
                s.push_str("redis_mode:standalone\r\n");
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
            // Client libraries read these on connect (ioredis waits for loading:0).
            "persistence" => "loading:0\r\n".to_string(),
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
            "keyspace" => keyspace?.to_string(),
            "cache" => format!("cache_bytes:{}\r\n", self.cache.as_ref()?.weighted_size()),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyspace_line_sums_the_nodes_lines() {
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
}
