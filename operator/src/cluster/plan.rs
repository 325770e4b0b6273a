//! Planning: from the desired tier and the observed cluster, the next steps.
//!
//! [`plan`] is a pure function. It never talks to Redis and has no memory: the
//! same observation always gives the same plan, so an operator that crashed at
//! any point and started again picks up exactly where the cluster is. Steps come
//! in a fixed order of urgency — failover, missing nodes, meeting, open slots,
//! unowned slots, replication, removals, rebalancing — and a plan stops at the
//! first stage that has work, because later stages assume the earlier ones hold.
//! Executing the steps is `execute`'s job.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use cachetier_crds::NodeHealth;
use tokio::time::Instant;

use super::config::TierConfig;
use super::health::HealthRecord;
use super::index::Index;
use super::view::{ClusterView, NodeView, SLOTS};

/// A node the plan refers to, by name, address and cluster id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Pool name.
    pub name: String,
    /// Client address.
    pub addr: SocketAddr,
    /// Redis Cluster node id.
    pub id: String,
}

/// Why a node is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// A replica Failed for longer than `evictAfter`.
    Evicted {
        /// How long it had been Failed.
        failed_for: Duration,
    },
    /// Its shard is beyond `spec.shards` and owns no slots any more.
    ShardRemoved,
    /// Its ordinal is beyond `spec.replicasPerShard`.
    ReplicaRemoved,
    /// Replaced to take restart-only settings; the create stage starts it again.
    Restarted {
        /// The settings that need the restart.
        settings: String,
    },
}

/// How a replica is promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverKind {
    /// `CLUSTER FAILOVER`: the primary is alive, hand over without losing writes.
    Graceful,
    /// `CLUSTER FAILOVER TAKEOVER`: the primary is gone and Redis did not promote.
    Takeover,
}

/// One step of convergence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the pool for the node (shard, ordinal).
    CreateNode {
        /// Shard.
        shard: u32,
        /// Ordinal.
        ordinal: u32,
    },
    /// Destroy a pool node, then make every node forget it.
    DestroyNode {
        /// Pool name.
        name: String,
        /// Shard it belonged to.
        shard: u32,
        /// Its cluster id, when known.
        id: Option<String>,
        /// Why.
        reason: Removal,
    },
    /// Make every node forget a cluster member that belongs to no pool node.
    Forget {
        /// The stale node id.
        id: String,
    },
    /// `CLUSTER MEET` from `node` to `peer`.
    Meet {
        /// The node that sends the meet.
        node: SocketAddr,
        /// The node it meets.
        peer: SocketAddr,
    },
    /// `CLUSTER REPLICATE`: make `node` a replica of `primary`.
    Replicate {
        /// The future replica.
        node: Target,
        /// Its primary.
        primary: Target,
    },
    /// `FLUSHALL` on a master that owns no slot but holds keys, so that it
    /// can replicate (cache tiers only).
    Flush {
        /// The node.
        node: Target,
    },
    /// `CLUSTER ADDSLOTSRANGE` on a primary.
    AddSlots {
        /// The primary.
        node: Target,
        /// Inclusive ranges.
        ranges: Vec<(u16, u16)>,
    },
    /// Finish a migration left open: move the slot's remaining keys and assign
    /// it to `to` everywhere.
    FinishMigration {
        /// The slot.
        slot: u16,
        /// Current owner.
        from: Target,
        /// Importing node.
        to: Target,
    },
    /// Roll back an open slot whose counterpart is gone (`SETSLOT STABLE`).
    AbortMigration {
        /// The slot.
        slot: u16,
        /// The node with the open state.
        node: Target,
        /// The id it was seen migrating to or importing from: the rollback
        /// happens only if the slot is still open towards this node.
        peer: String,
    },
    /// Move slots from one primary to another, one slot at a time.
    MigrateSlots {
        /// Source primary.
        from: Target,
        /// Destination primary.
        to: Target,
        /// The slots, in order.
        slots: Vec<u16>,
    },
    /// `CONFIG SET` of runtime settings on one node.
    SetConfig {
        /// The node.
        node: Target,
        /// (name, value) pairs.
        settings: Vec<(String, String)>,
    },
    /// Promote `to`, a replica of shard `shard`'s primary `from`.
    Failover {
        /// Shard.
        shard: u32,
        /// The current primary's name.
        from: String,
        /// The replica to promote.
        to: Target,
        /// Graceful or forced.
        kind: FailoverKind,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateNode { shard, ordinal } => write!(f, "create node {shard}-{ordinal}"),
            Self::DestroyNode { name, reason, .. } => write!(f, "destroy {name} ({reason:?})"),
            Self::Forget { id } => write!(f, "forget stale node {id}"),
            Self::Meet { node, peer } => write!(f, "meet {node} -> {peer}"),
            Self::Replicate { node, primary } => write!(f, "{} replicates {}", node.name, primary.name),
            Self::Flush { node } => write!(f, "flush {}, which holds keys but owns no slot", node.name),
            Self::AddSlots { node, ranges } => {
                write!(f, "add {} slot range(s) to {}", ranges.len(), node.name)
            }
            Self::FinishMigration { slot, from, to } => {
                write!(f, "finish migrating slot {slot} {} -> {}", from.name, to.name)
            }
            Self::AbortMigration { slot, node, .. } => {
                write!(f, "roll back open slot {slot} on {}", node.name)
            }
            Self::MigrateSlots { from, to, slots } => {
                write!(f, "migrate {} slot(s) {} -> {}", slots.len(), from.name, to.name)
            }
            Self::SetConfig { node, settings } => {
                let keys: Vec<&str> = settings.iter().map(|(k, _)| k.as_str()).collect();
                write!(f, "set {} on {}", keys.join(", "), node.name)
            }
            Self::Failover { from, to, kind, .. } => write!(f, "{kind:?} failover {from} -> {}", to.name),
        }
    }
}

/// The next steps, and why the planner is holding back, if it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Steps to execute in order.
    pub actions: Vec<Action>,
    /// Conditions the planner waits for (e.g. gossip to spread).
    pub waiting: Vec<String>,
}

impl Plan {
    /// Nothing to do and nothing to wait for.
    pub fn is_converged(&self) -> bool {
        self.actions.is_empty() && self.waiting.is_empty()
    }
}

/// What the planner looks at.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The desired tier.
    pub tier: &'a TierConfig,
    /// The observed cluster.
    pub view: &'a ClusterView,
    /// Probe results by address.
    pub health: &'a HashMap<SocketAddr, HealthRecord>,
    /// The time of the observation.
    pub now: Instant,
}

/// Slots per shard for `shards` shards: the first `16384 % shards` get one more.
pub fn even_split(shards: u32) -> Vec<(u16, u16)> {
    let n = shards.max(1);
    let base = u32::from(SLOTS) / n;
    let extra = u32::from(SLOTS) % n;
    let mut start = 0u32;
    (0..n)
        .map(|i| {
            let len = base + u32::from(i < extra);
            let range = (start as u16, (start + len).saturating_sub(1) as u16);
            start += len;
            range
        })
        .collect()
}

/// Compresses sorted slots into inclusive ranges.
pub fn ranges(slots: &[u16]) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &s in slots {
        match out.last_mut() {
            Some((_, end)) if u32::from(*end) + 1 == u32::from(s) => *end = s,
            _ => out.push((s, s)),
        }
    }
    out
}

struct Ctx<'a> {
    input: PlanInput<'a>,
    index: &'a Index<'a>,
}

impl<'a> Ctx<'a> {
    fn new(input: PlanInput<'a>, index: &'a Index<'a>) -> Self {
        Self { input, index }
    }

    fn id(&self, v: &NodeView) -> Option<&'a str> {
        self.index.id(v)
    }

    fn target(&self, v: &NodeView) -> Option<Target> {
        Some(Target {
            name: v.pool.name.clone(),
            addr: v.pool.addr,
            id: self.id(v)?.to_string(),
        })
    }

    fn health(&self, v: &NodeView) -> Option<&'a HealthRecord> {
        self.index.health(v)
    }

    fn is_failed(&self, v: &NodeView) -> bool {
        self.index.is_failed(v)
    }

    fn failed_for(&self, v: &NodeView) -> Duration {
        self.health(v)
            .filter(|h| h.state == NodeHealth::Failed)
            .map_or(Duration::ZERO, |h| h.failed_for(self.input.now))
    }

    /// Whether `v` answers, is not failed and is not going away.
    fn usable(&self, v: &NodeView) -> bool {
        self.index.usable(v)
    }

    fn slot_count(&self, id: &str) -> usize {
        self.index.slot_count(id)
    }

    fn owned_slots(&self, id: &str) -> Vec<u16> {
        self.index.owned_slots(id)
    }

    fn nodes_of(&self, shard: u32) -> impl Iterator<Item = &'a NodeView> {
        self.index.nodes_of(shard)
    }

    fn pool_shards(&self) -> Vec<u32> {
        self.index.pool_shards()
    }

    fn primary_of(&self, shard: u32) -> Option<&'a NodeView> {
        self.index.primary_of(shard)
    }

    /// The replica to promote among `candidates`: usable, with a completed
    /// sync (a non-zero offset or an active backlog), the highest offset
    /// first, then one of `shard` when one is preferred.
    fn heir(
        &self,
        candidates: impl Iterator<Item = &'a NodeView>,
        shard: Option<u32>,
    ) -> Option<&'a NodeView> {
        candidates
            .filter(|v| self.usable(v))
            .filter(|v| v.reported().is_some_and(|r| r.repl.synced || r.repl.offset > 0))
            .max_by_key(|v| {
                (
                    v.reported().map_or(0, |r| r.repl.offset),
                    Some(v.pool.shard) == shard,
                )
            })
    }

    /// The replica a live `primary` hands over to with a graceful `CLUSTER
    /// FAILOVER`: usable, replicating it with the link up, not syncing or
    /// loading, the highest offset first.
    fn in_sync_heir(&self, primary: &NodeView) -> Option<&'a NodeView> {
        let pid = self.id(primary)?;
        self.input
            .view
            .nodes
            .iter()
            .filter(|o| self.usable(o))
            .filter(|o| {
                o.reported().is_some_and(|r| {
                    r.myself.master_id.as_deref() == Some(pid)
                        && r.repl.link_up
                        && !r.repl.sync_in_progress
                        && !r.repl.loading
                })
            })
            .max_by_key(|o| o.reported().map_or(0, |r| r.repl.offset))
    }

    fn wanted(&self, v: &NodeView) -> bool {
        v.pool.shard < self.input.tier.shards && v.pool.ordinal <= self.input.tier.replicas_per_shard
    }
}

/// Computes the next steps towards `input.tier` from `input.view`.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let index = Index::new(input.view, input.health);
    plan_with(input, &index)
}

/// [`plan`], reading the round's [`Index`] of `input.view` (which the
/// status reads too).
pub fn plan_with<'a>(input: PlanInput<'a>, index: &'a Index<'a>) -> Plan {
    let ctx = Ctx::new(input, index);
    let mut out = Plan::default();
    let stages: [fn(&Ctx<'_>, &mut Plan); 13] = [
        failover::failover,
        orphans::orphaned,
        members::create_missing,
        members::forget_stale,
        members::meet,
        rollout::configure,
        slots::fix_open_slots,
        slots::assign_unowned,
        roles::replicate,
        roles::remove,
        balance::rebalance,
        balance::settle,
        rollout::restart_rollout,
    ];
    for stage in stages {
        stage(&ctx, &mut out);
        if !out.actions.is_empty() || !out.waiting.is_empty() {
            break;
        }
    }
    // Nothing else to do, but requested nodes do not run yet: not converged.
    if out.is_converged()
        && let Some(p) = ctx.input.view.pending.first()
    {
        let others = match ctx.input.view.pending.len() - 1 {
            0 => String::new(),
            n => format!(", and {n} more node(s)"),
        };
        out.waiting
            .push(format!("{} is pending ({}){others}", p.name, p.detail));
    }
    out
}

mod balance;
mod failover;
mod members;
mod orphans;
mod roles;
mod rollout;
mod slots;
#[cfg(test)]
mod tests;
