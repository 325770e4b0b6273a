//! The compact status table local mode prints: one line per node with role,
//! slots, health, RTT, replication lag and whether it serves reads.

use cachetier_crds::{CacheTierStatus, NodeRole};

fn slot_count(ranges: &[String]) -> u32 {
    ranges
        .iter()
        .map(|r| match r.split_once('-') {
            Some((a, b)) => {
                b.parse::<u32>()
                    .unwrap_or(0)
                    .saturating_sub(a.parse().unwrap_or(0))
                    + 1
            }
            None => 1,
        })
        .sum()
}

fn rtt(micros: Option<i64>) -> String {
    match micros {
        None => "-".into(),
        Some(us) if us < 1000 => format!("{us}µs"),
        Some(us) => format!("{:.1}ms", us as f64 / 1000.0),
    }
}

/// How to reach a node with a cluster-aware client: `redis-cli -c -h … -p …`.
pub fn cluster_connect(addr: &str) -> String {
    format!("redis-cli -c -h {} -p {}", host(addr), port(addr))
}

/// Renders `status` of tier `name`; `connect` is the command line that reaches
/// the tier (the sidecar's, or a node's with a cluster-aware client).
pub fn render(name: &str, status: &CacheTierStatus, connect: Option<&str>) -> String {
    let mut out = String::new();
    let phase = status.phase.map_or("-".to_string(), |p| format!("{p:?}"));
    out.push_str(&format!(
        "{name}  phase={phase}  ready={}  slots={}/16384  shards={}\n",
        status.ready.as_deref().unwrap_or("-"),
        status.slots_covered,
        status.current_shards,
    ));
    if let Some(connect) = connect {
        out.push_str(&format!("connect: {connect}\n"));
    }
    out.push_str(&format!(
        "{:<24} {:<8} {:>6} {:<8} {:>8} {:>9} {}\n",
        "NODE", "ROLE", "SLOTS", "HEALTH", "RTT", "LAG", "SERVING"
    ));
    for shard in &status.shards {
        let slots = slot_count(&shard.slots);
        for node in &shard.nodes {
            let role = match node.role {
                NodeRole::Primary => "primary",
                NodeRole::Replica => "replica",
                NodeRole::Unknown => "-",
            };
            let slots = if node.role == NodeRole::Primary && shard.nodes.first() == Some(node) {
                slots.to_string()
            } else {
                "-".into()
            };
            let serving = if node.serving {
                "yes".to_string()
            } else {
                format!("no ({})", node.reason.as_deref().unwrap_or("?"))
            };
            out.push_str(&format!(
                "{:<24} {:<8} {:>6} {:<8} {:>8} {:>9} {}\n",
                format!("{} {}", node.name, node.address.rsplit(':').next().unwrap_or("")),
                role,
                slots,
                format!("{:?}", node.health),
                rtt(node.rtt_micros),
                node.lag_bytes.map_or("-".into(), |l| l.to_string()),
                serving
            ));
        }
    }
    for c in &status.conditions {
        if (c.type_ == "Ready" && c.status == "False") || (c.type_ != "Ready" && c.status == "True") {
            out.push_str(&format!("{}: {} — {}\n", c.type_, c.reason, c.message));
        }
    }
    out
}

fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').map_or("", |(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cachetier_crds::{NodeHealth, NodeStatus, Phase, ShardStatus};

    #[test]
    fn the_table_shows_one_line_per_node_and_where_to_connect() {
        let status = CacheTierStatus {
            phase: Some(Phase::Ready),
            ready: Some("2/2".into()),
            slots_covered: 16384,
            current_shards: 1,
            shards: vec![ShardStatus {
                index: 0,
                slots: vec!["0-16383".into()],
                nodes: vec![
                    NodeStatus {
                        name: "t-0-0".into(),
                        address: "127.0.0.1:7000".into(),
                        role: NodeRole::Primary,
                        health: NodeHealth::Healthy,
                        rtt_micros: Some(85),
                        serving: true,
                        ..NodeStatus::default()
                    },
                    NodeStatus {
                        name: "t-0-1".into(),
                        address: "127.0.0.1:7001".into(),
                        role: NodeRole::Replica,
                        health: NodeHealth::Healthy,
                        rtt_micros: Some(1500),
                        lag_bytes: Some(0),
                        serving: false,
                        reason: Some("sync in progress".into()),
                        ..NodeStatus::default()
                    },
                ],
            }],
            ..CacheTierStatus::default()
        };
        let text = render("t", &status, Some(&cluster_connect("127.0.0.1:7000")));
        assert!(
            text.contains("connect: redis-cli -c -h 127.0.0.1 -p 7000"),
            "{text}"
        );
        assert!(text.contains("16384"));
        assert!(text.contains("85µs") && text.contains("1.5ms"));
        assert!(text.contains("no (sync in progress)"));
        assert_eq!(text.lines().count(), 5);
    }
}
