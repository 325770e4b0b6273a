//! Hand-built observations for unit tests of the planner and the status:
//! no Redis, no time passing except through `Instant`s handed in.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::time::Instant;

use super::config::TierConfig;
use super::health::HealthRecord;
use super::plan::{Plan, PlanInput, even_split, plan};
use super::pool::{PendingNode, PoolNode};
use super::view::{ClusterView, NodeLine, NodeView, ReplInfo, Reported};

pub fn tier(shards: u32, replicas: u32) -> TierConfig {
    TierConfig {
        name: "t".into(),
        generation: None,
        shards,
        replicas_per_shard: replicas,
        max_memory_bytes: 64 << 20,
        max_memory_policy: "allkeys-lru".into(),
        redis_config: Default::default(),
        health: Default::default(),
        max_lag_bytes: 1 << 20,
        timing: Default::default(),
        auth: None,
    }
}

pub fn addr(shard: u32, ordinal: u32) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + (shard * 10 + ordinal) as u16))
}

pub fn id(shard: u32, ordinal: u32) -> String {
    format!("{:0>40}", shard * 10 + ordinal + 1)
}

pub fn name(shard: u32, ordinal: u32) -> String {
    format!("t-{shard}-{ordinal}")
}

/// A hand-built cluster: every node reachable and knowing every other one
/// unless said otherwise.
#[derive(Default)]
pub struct Fx {
    pub lines: Vec<(u32, u32, NodeLine, ReplInfo)>,
    pub unreachable: Vec<(u32, u32)>,
    /// Nodes the cluster itself flags `fail` (others' lines of them).
    pub dead: Vec<(u32, u32)>,
    pub loners: Vec<(u32, u32)>,
    pub stale: Vec<NodeLine>,
    pub health: HashMap<SocketAddr, HealthRecord>,
    /// Nodes the pool reports as running an outdated definition.
    pub outdated: Vec<(u32, u32)>,
    /// Nodes the pool was asked for that do not run yet.
    pub pending: Vec<(u32, u32)>,
    /// Nodes the pool reports as going away.
    pub terminating: Vec<(u32, u32)>,
    /// Nodes announce DNS names (`t-1-0.t-nodes.ns.svc`), as on Kubernetes,
    /// instead of their pool names.
    pub dns_names: bool,
}

impl Fx {
    pub fn node(mut self, shard: u32, ordinal: u32, f: impl FnOnce(&mut NodeLine, &mut ReplInfo)) -> Self {
        let mut line = NodeLine {
            id: id(shard, ordinal),
            addr: Some(addr(shard, ordinal)),
            master: true,
            connected: true,
            config_epoch: u64::from(shard * 10 + ordinal),
            ..NodeLine::default()
        };
        let mut repl = ReplInfo {
            is_master: true,
            ..ReplInfo::default()
        };
        f(&mut line, &mut repl);
        self.lines.push((shard, ordinal, line, repl));
        self
    }

    pub fn primary(self, shard: u32, ordinal: u32, slots: &[(u16, u16)]) -> Self {
        let slots = slots.to_vec();
        self.node(shard, ordinal, move |l, _| l.slots = slots)
    }

    pub fn empty(self, shard: u32, ordinal: u32) -> Self {
        self.node(shard, ordinal, |_, _| {})
    }

    pub fn replica(self, shard: u32, ordinal: u32, of: (u32, u32), offset: i64) -> Self {
        self.node(shard, ordinal, move |l, r| {
            l.master = false;
            l.replica = true;
            l.master_id = Some(id(of.0, of.1));
            r.is_master = false;
            r.link_up = true;
            r.offset = offset;
            r.synced = offset > 0;
        })
    }

    /// A healthy 3-shard tier with one replica per shard.
    pub fn tier_3x1() -> Self {
        let split = even_split(3);
        let mut fx = Fx::default();
        for s in 0..3 {
            fx = fx.primary(s, 0, &[split[s as usize]]).replica(s, 1, (s, 0), 100);
        }
        fx
    }

    /// The node is dead: Failed by the probes since `since`, unreachable,
    /// and flagged `fail` by every other node.
    pub fn failed(mut self, shard: u32, ordinal: u32, since: Instant) -> Self {
        self.dead.push((shard, ordinal));
        self.cut_off(shard, ordinal, since)
    }

    /// Only the operator cannot reach the node: Failed by the probes since
    /// `since` and unreachable, while the cluster still sees it alive.
    pub fn cut_off(mut self, shard: u32, ordinal: u32, since: Instant) -> Self {
        let mut r = HealthRecord::default();
        for _ in 0..3 {
            r.record(Err("no reply".into()), since, 3);
        }
        self.health.insert(addr(shard, ordinal), r);
        self.unreachable.push((shard, ordinal));
        self
    }

    pub fn view(&self) -> ClusterView {
        let mut nodes = Vec::new();
        for (shard, ordinal, line, repl) in &self.lines {
            let pool = PoolNode {
                name: name(*shard, *ordinal),
                shard: *shard,
                ordinal: *ordinal,
                addr: addr(*shard, *ordinal),
                bus_port: addr(*shard, *ordinal).port() + 10000,
                hostname: self
                    .dns_names
                    .then(|| format!("{}.t-nodes.ns.svc", name(*shard, *ordinal))),
                pid: None,
                outdated: self.outdated.contains(&(*shard, *ordinal)),
                incarnation: String::new(),
                terminating: self.terminating.contains(&(*shard, *ordinal)),
            };
            let report = if self.unreachable.contains(&(*shard, *ordinal)) {
                Err("unreachable".to_string())
            } else {
                let mut myself = line.clone();
                myself.myself = true;
                let others = if self.loners.contains(&(*shard, *ordinal)) {
                    Vec::new()
                } else {
                    self.lines
                        .iter()
                        .filter(|(s, o, _, _)| (s, o) != (shard, ordinal))
                        .filter(|(s, o, _, _)| !self.loners.contains(&(*s, *o)))
                        .map(|(s, o, l, _)| {
                            let mut l = l.clone();
                            l.migrating.clear();
                            l.importing.clear();
                            if self.dead.contains(&(*s, *o)) {
                                l.fail = true;
                                l.connected = false;
                            }
                            l
                        })
                        .chain(self.stale.iter().cloned())
                        .collect()
                };
                Ok(Reported {
                    myself,
                    others,
                    state_ok: true,
                    repl: repl.clone(),
                    config: Default::default(),
                })
            };
            nodes.push(NodeView { pool, report });
        }
        ClusterView {
            nodes,
            pending: self
                .pending
                .iter()
                .map(|&(shard, ordinal)| PendingNode {
                    name: name(shard, ordinal),
                    shard,
                    ordinal,
                    detail: "Unschedulable".into(),
                })
                .collect(),
        }
    }

    pub fn plan_at(&self, tier: &TierConfig, now: Instant) -> Plan {
        plan(PlanInput {
            tier,
            view: &self.view(),
            health: &self.health,
            now,
        })
    }

    pub fn plan(&self, tier: &TierConfig) -> Plan {
        self.plan_at(tier, Instant::now())
    }
}

impl Fx {
    /// Every node answered its probes.
    pub fn all_healthy(mut self) -> Self {
        for (s, o, _, _) in &self.lines {
            if self.unreachable.contains(&(*s, *o)) {
                continue;
            }
            let mut r = HealthRecord::default();
            r.record(Ok(std::time::Duration::from_micros(100)), Instant::now(), 3);
            self.health.insert(addr(*s, *o), r);
        }
        self
    }

    /// Changes the replication state of one node.
    pub fn repl(mut self, shard: u32, ordinal: u32, f: impl FnOnce(&mut ReplInfo)) -> Self {
        if let Some((_, _, _, r)) = self
            .lines
            .iter_mut()
            .find(|(s, o, _, _)| (*s, *o) == (shard, ordinal))
        {
            f(r);
        }
        self
    }
}
