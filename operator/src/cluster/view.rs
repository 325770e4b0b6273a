//! Observation: what every node of the pool says about the cluster, right now.
//!
//! [`observe`] asks each node for `CLUSTER NODES`, `CLUSTER INFO` and
//! `INFO replication`/`persistence`, and [`ClusterView`] answers the questions the
//! planner and the status ask (who owns a slot, which slots are open, who
//! replicates whom). Nothing here remembers earlier observations or decides what
//! to do.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use futures_util::future::join_all;

use super::conn::Conns;
use super::pool::{Listing, PendingNode, PoolNode};
use crate::{Error, Result};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeLine {
    /// Node id (40 hex characters).
    pub id: String,
    /// Client address (`ip:port`), when the node has one.
    pub addr: Option<SocketAddr>,
    /// Announced hostname, when set.
    pub hostname: Option<String>,
    /// `myself` flag.
    pub myself: bool,
    /// `master` flag.
    pub master: bool,
    /// `slave` flag.
    pub replica: bool,
    /// `fail?` flag (this node suspects it).
    pub pfail: bool,
    /// `fail` flag (the cluster agreed it failed).
    pub fail: bool,
    /// `handshake` or `noaddr` flag: not a settled member yet.
    pub handshake: bool,
    /// The primary this node replicates.
    pub master_id: Option<String>,
    /// Config epoch: the higher claim on a slot wins.
    pub config_epoch: u64,
    /// Whether the cluster bus link is connected.
    pub connected: bool,
    /// Owned slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
    /// Slots this node is migrating, with the target node id (myself line only).
    pub migrating: Vec<(u16, String)>,
    /// Slots this node is importing, with the source node id (myself line only).
    pub importing: Vec<(u16, String)>,
}

impl NodeLine {
    /// Number of slots owned.
    pub fn slot_count(&self) -> u32 {
        self.slots.iter().map(|(a, b)| u32::from(b - a) + 1).sum()
    }

    /// Whether the node owns `slot`.
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// Parses the output of `CLUSTER NODES`.
pub fn parse_cluster_nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

fn parse_slot(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|&n| n < SLOTS)
        .ok_or_else(|| format!("bad slot `{s}`"))
}

fn parse_line(line: &str) -> Result<NodeLine, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return Err(format!("short CLUSTER NODES line `{line}`"));
    }
    let mut node = NodeLine {
        id: fields[0].to_string(),
        ..NodeLine::default()
    };
    // ip:port@cport[,hostname]
    let (endpoint, hostname) = match fields[1].split_once(',') {
        Some((e, h)) => (e, Some(h.to_string()).filter(|h| !h.is_empty())),
        None => (fields[1], None),
    };
    node.hostname = hostname;
    let client = endpoint.split('@').next().unwrap_or("");
    node.addr = client.parse().ok().filter(|a: &SocketAddr| a.port() != 0);
    for flag in fields[2].split(',') {
        match flag {
            "myself" => node.myself = true,
            "master" => node.master = true,
            "slave" => node.replica = true,
            "fail?" => node.pfail = true,
            "fail" => node.fail = true,
            "handshake" | "noaddr" => node.handshake = true,
            _ => {}
        }
    }
    node.master_id = Some(fields[3].to_string()).filter(|m| m != "-");
    node.config_epoch = fields[6]
        .parse()
        .map_err(|_| format!("bad config epoch in `{line}`"))?;
    node.connected = fields[7] == "connected";
    for slot in &fields[8..] {
        if let Some(inner) = slot.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            if let Some((s, id)) = inner.split_once("->-") {
                node.migrating.push((parse_slot(s)?, id.to_string()));
            } else if let Some((s, id)) = inner.split_once("-<-") {
                node.importing.push((parse_slot(s)?, id.to_string()));
            }
        } else if let Some((a, b)) = slot.split_once('-') {
            node.slots.push((parse_slot(a)?, parse_slot(b)?));
        } else {
            let s = parse_slot(slot)?;
            node.slots.push((s, s));
        }
    }
    Ok(node)
}

/// Replication and loading state from `INFO replication` + `INFO persistence`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplInfo {
    /// `role:master`.
    pub is_master: bool,
    /// `master_link_status:up` (replicas).
    pub link_up: bool,
    /// `master_sync_in_progress:1` (replicas).
    pub sync_in_progress: bool,
    /// `loading:1`.
    pub loading: bool,
    /// Replication offset: `master_repl_offset` of a primary, or the offset a
    /// replica has processed (`slave_repl_offset`).
    pub offset: i64,
    /// `repl_backlog_active:1`: a replica has this once it completed a sync
    /// (an idle primary's offset can stay 0, so the offset cannot tell).
    pub synced: bool,
    /// Keys in db 0 (`INFO keyspace`).
    pub keys: u64,
}

/// Parses `INFO` text (any sections) into [`ReplInfo`].
pub fn parse_repl_info(text: &str) -> ReplInfo {
    let map: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(':'))
        .collect();
    let is_master = map.get("role") == Some(&"master");
    let offset_key = if is_master {
        "master_repl_offset"
    } else {
        "slave_repl_offset"
    };
    ReplInfo {
        is_master,
        link_up: map.get("master_link_status") == Some(&"up"),
        sync_in_progress: map.get("master_sync_in_progress") == Some(&"1"),
        loading: map.get("loading") == Some(&"1"),
        offset: map.get(offset_key).and_then(|v| v.parse().ok()).unwrap_or(0),
        synced: map.get("repl_backlog_active") == Some(&"1"),
        keys: map
            .get("db0")
            .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("keys=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    }
}

/// What one reachable node reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    /// The node's own line (`myself`).
    pub myself: NodeLine,
    /// Every other node it knows.
    pub others: Vec<NodeLine>,
    /// `cluster_state:ok`.
    pub state_ok: bool,
    /// Replication state.
    pub repl: ReplInfo,
    /// The node's `CONFIG GET` answer for the settings the spec sets.
    pub config: BTreeMap<String, String>,
}

impl Reported {
    /// Whether this node knows `id` as a settled member (not in handshake).
    pub fn knows(&self, id: &str) -> bool {
        self.myself.id == id || self.others.iter().any(|n| n.id == id && !n.handshake)
    }
}

/// A pool node and what it said (or why it said nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// The pool's record of the node.
    pub pool: PoolNode,
    /// Its report, or the error that prevented one.
    pub report: Result<Reported, String>,
}

impl NodeView {
    /// The report, when the node answered.
    pub fn reported(&self) -> Option<&Reported> {
        self.report.as_ref().ok()
    }
}

/// The observed cluster: every pool node's report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// One entry per running pool node, in pool order.
    pub nodes: Vec<NodeView>,
    /// Nodes the pool was asked for that do not run yet: expected, not
    /// present. Nothing waits for them; they are not asked for again.
    pub pending: Vec<PendingNode>,
}

impl ClusterView {
    /// Every line any reachable node reported, the node's own line preferred
    /// over hearsay, keyed by id.
    pub fn all_lines(&self) -> BTreeMap<String, NodeLine> {
        let mut out: BTreeMap<String, NodeLine> = BTreeMap::new();
        for r in self.nodes.iter().filter_map(NodeView::reported) {
            for line in &r.others {
                if line.handshake {
                    continue;
                }
                // `others` never holds a `myself` line (report() splits it off);
                // those are inserted below and win over hearsay.
                let replace = match out.get(&line.id) {
                    None => true,
                    Some(old) => line.config_epoch > old.config_epoch,
                };
                if replace {
                    out.insert(line.id.clone(), line.clone());
                }
            }
        }
        for r in self.nodes.iter().filter_map(NodeView::reported) {
            out.insert(r.myself.id.clone(), r.myself.clone());
        }
        out
    }

    /// The owner of every slot: among all claims (a node's own line, or what
    /// others say of an unreachable node), the one with the highest config epoch.
    pub fn slot_owners(&self) -> Vec<Option<String>> {
        let lines = self.all_lines();
        let mut owners: Vec<Option<(u64, &str)>> = vec![None; usize::from(SLOTS)];
        for line in lines.values() {
            for &(a, b) in &line.slots {
                for s in a..=b {
                    let cell = &mut owners[usize::from(s)];
                    if cell.is_none_or(|(epoch, _)| line.config_epoch > epoch) {
                        *cell = Some((line.config_epoch, line.id.as_str()));
                    }
                }
            }
        }
        owners
            .into_iter()
            .map(|o| o.map(|(_, id)| id.to_string()))
            .collect()
    }

    /// Whether the cluster itself agrees that `id` failed: a majority of the
    /// reachable slot-owning primaries (other than `id`) flag it `fail` or
    /// `fail?`. Redis's own failure detection, not the operator's probes, is
    /// what tells a dead node from one only the operator cannot reach. `fail?`
    /// counts because with two shards Redis can never reach a `fail` verdict
    /// (that needs a majority of all primaries, the dead one included).
    pub fn cluster_flags_failed(&self, id: &str) -> bool {
        let voters: Vec<&Reported> = self
            .nodes
            .iter()
            .filter_map(NodeView::reported)
            .filter(|r| r.myself.master && !r.myself.slots.is_empty() && r.myself.id != id)
            .collect();
        let flagged = voters
            .iter()
            .filter(|r| r.others.iter().any(|l| l.id == id && (l.fail || l.pfail)))
            .count();
        !voters.is_empty() && flagged * 2 > voters.len()
    }

    /// Whether some reachable node still sees `id` alive (known, neither
    /// `fail?` nor `fail`).
    pub fn cluster_sees_alive(&self, id: &str) -> bool {
        self.nodes
            .iter()
            .filter_map(NodeView::reported)
            .flat_map(|r| r.others.iter())
            .any(|l| l.id == id && !l.pfail && !l.fail && !l.handshake)
    }

    /// The node id of a pool node: its own report, or what others say about its address.
    pub fn id_of(&self, node: &PoolNode) -> Option<String> {
        if let Some(view) = self.nodes.iter().find(|v| v.pool.name == node.name)
            && let Some(r) = view.reported()
        {
            return Some(r.myself.id.clone());
        }
        // Unreachable: the most recent claim by another node about this
        // address, or about the name it announces (the operator may reach
        // the node at another address than the cluster does).
        self.nodes
            .iter()
            .filter_map(NodeView::reported)
            .flat_map(|r| r.others.iter())
            .filter(|l| !l.handshake)
            .filter(|l| l.addr == Some(node.addr) || l.hostname.as_deref() == Some(node.announced()))
            .max_by_key(|l| (l.addr == Some(node.addr), l.config_epoch))
            .map(|l| l.id.clone())
    }
}

/// Asks every pool node for its view of the cluster (and its values of
/// `config_keys`), concurrently. A node that does not answer within the
/// connections' timeout is reported as unreachable.
pub async fn observe(conns: &mut Conns, listing: Listing, config_keys: &[String]) -> ClusterView {
    let futures = listing.nodes.iter().map(|node| {
        let node = node.clone();
        let mut local = conns.split_for(node.addr);
        async move {
            let report = report(&mut local, node.addr, config_keys)
                .await
                .map_err(|e| e.to_string());
            (NodeView { pool: node, report }, local)
        }
    });
    let mut nodes = Vec::new();
    for (view, local) in join_all(futures).await {
        conns.adopt(view.pool.addr, local);
        nodes.push(view);
    }
    ClusterView {
        nodes,
        pending: listing.pending,
    }
}

/// One pipeline: `CLUSTER NODES`, `CLUSTER INFO`, `INFO`, `CONFIG GET keys…`.
async fn report(conns: &mut Conns, addr: SocketAddr, config_keys: &[String]) -> Result<Reported> {
    let mut cmds = vec![
        redis::cmd("CLUSTER").arg("NODES").to_owned(),
        redis::cmd("CLUSTER").arg("INFO").to_owned(),
        redis::cmd("INFO")
            .arg("replication")
            .arg("persistence")
            .arg("keyspace")
            .to_owned(),
    ];
    if !config_keys.is_empty() {
        cmds.push(redis::cmd("CONFIG").arg("GET").arg(config_keys).to_owned());
    }
    let mut replies = conns.pipeline(addr, &cmds).await?.into_iter();
    let mut text = |command: &str| -> Result<String> {
        let value = replies.next().ok_or_else(|| Error::Protocol {
            addr,
            command: command.into(),
            detail: "no reply".into(),
        })?;
        value
            .and_then(|v| redis::from_redis_value::<String>(v).map_err(redis::RedisError::from))
            .map_err(|source| Error::Command {
                addr,
                command: command.into(),
                source,
            })
    };
    let nodes = text("CLUSTER NODES")?;
    let info = text("CLUSTER INFO")?;
    let repl = text("INFO")?;
    // An old server that refuses several keys in one CONFIG GET only loses
    // the drift check, never the observation.
    let config: BTreeMap<String, String> = replies
        .next()
        .and_then(Result::ok)
        .and_then(|v| redis::from_redis_value::<HashMap<String, String>>(v).ok())
        .map(|m| m.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect())
        .unwrap_or_default();
    let lines = parse_cluster_nodes(&nodes).map_err(|detail| Error::Protocol {
        addr,
        command: "CLUSTER NODES".into(),
        detail,
    })?;
    let (mine, others): (Vec<NodeLine>, Vec<NodeLine>) = lines.into_iter().partition(|l| l.myself);
    let myself = mine.into_iter().next().ok_or_else(|| Error::Protocol {
        addr,
        command: "CLUSTER NODES".into(),
        detail: "no `myself` line".into(),
    })?;
    Ok(Reported {
        myself,
        others,
        state_ok: info.lines().any(|l| l.trim_end() == "cluster_state:ok"),
        repl: parse_repl_info(&repl),
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,db-1 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461-<-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1] [100->-292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f]
6ec23923021cf3ffec47632106199cb7f496ce01 :0@0 master,fail,noaddr - 1426238316232 1426238316232 0 disconnected
";

    #[test]
    fn cluster_nodes_lines_parse_with_hostnames_ranges_and_open_slots() {
        let lines = parse_cluster_nodes(NODES).unwrap();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0].hostname.as_deref(), Some("db-1"));
        assert!(lines[0].replica);
        assert_eq!(
            lines[0].master_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert_eq!(lines[1].slots, vec![(5461, 10922)]);
        assert_eq!(lines[1].slot_count(), 5462);
        let me = &lines[3];
        assert!(me.myself && me.master);
        assert_eq!(
            me.importing,
            vec![(5461, "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1".into())]
        );
        assert_eq!(
            me.migrating,
            vec![(100, "292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f".into())]
        );
        assert!(lines[4].fail && lines[4].handshake && lines[4].addr.is_none());
    }

    #[test]
    fn garbage_in_cluster_nodes_is_an_error_not_a_panic() {
        assert!(parse_cluster_nodes("abc 1.2.3.4:5 master").is_err());
        assert!(parse_cluster_nodes("a b c d e f notanumber x").is_err());
        assert!(parse_cluster_nodes("a 1.2.3.4:5@6 master - 0 0 1 connected 99999").is_err());
    }

    #[test]
    fn replica_info_reports_link_sync_loading_and_offset() {
        let info = "# Replication\r\nrole:slave\r\nmaster_link_status:down\r\nmaster_sync_in_progress:1\r\nslave_repl_offset:42\r\n# Persistence\r\nloading:0\r\n";
        let r = parse_repl_info(info);
        assert!(!r.is_master && !r.link_up && r.sync_in_progress && !r.loading);
        assert_eq!(r.offset, 42);
        let p = parse_repl_info("role:master\nmaster_repl_offset:1000\nloading:1\n");
        assert!(p.is_master && p.loading);
        assert_eq!(p.offset, 1000);
    }
}
