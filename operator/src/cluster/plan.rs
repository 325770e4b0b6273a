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
            Self::AddSlots { node, ranges } => {
                write!(f, "add {} slot range(s) to {}", ranges.len(), node.name)
            }
            Self::FinishMigration { slot, from, to } => {
                write!(f, "finish migrating slot {slot} {} -> {}", from.name, to.name)
            }
            Self::AbortMigration { slot, node } => write!(f, "roll back open slot {slot} on {}", node.name),
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
    owners: Vec<Option<String>>,
    by_owner: HashMap<String, Vec<u16>>,
    ids: HashMap<String, String>,
}

impl<'a> Ctx<'a> {
    fn new(input: PlanInput<'a>) -> Self {
        let owners = input.view.slot_owners();
        let ids = input
            .view
            .nodes
            .iter()
            .filter_map(|v| input.view.id_of(&v.pool).map(|id| (v.pool.name.clone(), id)))
            .collect();
        let mut by_owner: HashMap<String, Vec<u16>> = HashMap::new();
        for (slot, owner) in owners.iter().enumerate() {
            if let Some(id) = owner {
                by_owner.entry(id.clone()).or_default().push(slot as u16);
            }
        }
        Self {
            input,
            owners,
            by_owner,
            ids,
        }
    }

    fn id(&self, v: &NodeView) -> Option<&str> {
        self.ids.get(&v.pool.name).map(String::as_str)
    }

    fn target(&self, v: &NodeView) -> Option<Target> {
        Some(Target {
            name: v.pool.name.clone(),
            addr: v.pool.addr,
            id: self.id(v)?.to_string(),
        })
    }

    fn health(&self, v: &NodeView) -> Option<&HealthRecord> {
        self.input.health.get(&v.pool.addr)
    }

    fn is_failed(&self, v: &NodeView) -> bool {
        self.health(v).is_some_and(|h| h.state == NodeHealth::Failed)
    }

    fn failed_for(&self, v: &NodeView) -> Duration {
        self.health(v)
            .filter(|h| h.state == NodeHealth::Failed)
            .map_or(Duration::ZERO, |h| h.failed_for(self.input.now))
    }

    /// Healthy by probe and answering commands.
    fn usable(&self, v: &NodeView) -> bool {
        v.reported().is_some() && !self.is_failed(v)
    }

    fn slot_count(&self, id: &str) -> usize {
        self.by_owner.get(id).map_or(0, Vec::len)
    }

    fn owned_slots(&self, id: &str) -> Vec<u16> {
        self.by_owner.get(id).cloned().unwrap_or_default()
    }

    fn nodes_of(&self, shard: u32) -> impl Iterator<Item = &'a NodeView> {
        self.input
            .view
            .nodes
            .iter()
            .filter(move |v| v.pool.shard == shard)
    }

    fn pool_shards(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = self.input.view.nodes.iter().map(|v| v.pool.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// The primary of a shard: its node owning the most slots; with none, its
    /// lowest-ordinal reachable master that replicates nobody.
    fn primary_of(&self, shard: u32) -> Option<&'a NodeView> {
        let owning = self
            .nodes_of(shard)
            .filter_map(|v| Some((v, self.slot_count(self.id(v)?))))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(v, n)| (n, std::cmp::Reverse(v.pool.ordinal)));
        if let Some((v, _)) = owning {
            return Some(v);
        }
        self.nodes_of(shard)
            .filter(|v| self.usable(v))
            .filter(|v| {
                v.reported()
                    .is_some_and(|r| r.myself.master && r.myself.master_id.is_none())
            })
            .min_by_key(|v| v.pool.ordinal)
    }

    fn wanted(&self, v: &NodeView) -> bool {
        v.pool.shard < self.input.tier.shards && v.pool.ordinal <= self.input.tier.replicas_per_shard
    }
}

/// Computes the next steps towards `input.tier` from `input.view`.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let ctx = Ctx::new(input);
    let mut out = Plan::default();
    let stages: [fn(&Ctx<'_>, &mut Plan); 13] = [
        failover,
        orphans::orphaned,
        create_missing,
        forget_stale,
        meet,
        rollout::configure,
        fix_open_slots,
        assign_unowned,
        replicate,
        remove,
        rebalance,
        settle,
        rollout::restart_rollout,
    ];
    for stage in stages {
        stage(&ctx, &mut out);
        if !out.actions.is_empty() || !out.waiting.is_empty() {
            break;
        }
    }
    out
}

fn failover(ctx: &Ctx<'_>, out: &mut Plan) {
    let grace = ctx.input.tier.timing.node_timeout + ctx.input.tier.timing.failover_margin;
    for shard in ctx.pool_shards() {
        let Some(primary) = ctx.primary_of(shard) else {
            continue;
        };
        let Some(primary_id) = ctx.id(primary) else {
            continue;
        };
        if ctx.slot_count(primary_id) == 0 || !ctx.is_failed(primary) {
            continue;
        }
        // Only the cluster's own verdict justifies forcing: a primary that
        // only the operator cannot reach keeps serving (the status says so).
        if !ctx.input.view.cluster_flags_failed(primary_id) {
            out.waiting.push(format!(
                "primary {} does not answer the operator, but the cluster does not flag it failed; nothing is forced",
                primary.pool.name
            ));
            continue;
        }
        if ctx.failed_for(primary) < grace {
            out.waiting.push(format!(
                "primary {} failed; giving Redis Cluster until {grace:?} to promote a replica",
                primary.pool.name
            ));
            continue;
        }
        let best = ctx
            .input
            .view
            .nodes
            .iter()
            .filter(|v| ctx.usable(v))
            // The candidate must have completed a sync.
            .filter(|v| {
                v.reported().is_some_and(|r| {
                    r.myself.replica
                        && r.myself.master_id.as_deref() == Some(primary_id)
                        && (r.repl.synced || r.repl.offset > 0)
                })
            })
            .max_by_key(|v| (v.reported().map_or(0, |r| r.repl.offset), v.pool.shard == shard));
        match best.and_then(|v| ctx.target(v)) {
            Some(to) => out.actions.push(Action::Failover {
                shard,
                from: primary.pool.name.clone(),
                to,
                kind: FailoverKind::Takeover,
            }),
            None => out.waiting.push(format!(
                "primary {} failed and has no healthy replica",
                primary.pool.name
            )),
        }
    }
    // Waiting for Redis to promote must not stall everything else.
    if out.actions.is_empty() {
        out.waiting.clear();
    }
}

fn create_missing(ctx: &Ctx<'_>, out: &mut Plan) {
    let tier = ctx.input.tier;
    for shard in 0..tier.shards {
        for ordinal in 0..=tier.replicas_per_shard {
            let exists = ctx
                .input
                .view
                .nodes
                .iter()
                .any(|v| v.pool.shard == shard && v.pool.ordinal == ordinal);
            if !exists {
                out.actions.push(Action::CreateNode { shard, ordinal });
            }
        }
    }
}

fn forget_stale(ctx: &Ctx<'_>, out: &mut Plan) {
    let known: Vec<&String> = ctx.ids.values().collect();
    for (id, line) in ctx.input.view.all_lines() {
        if !known.contains(&&id) && line.slots.is_empty() {
            out.actions.push(Action::Forget { id });
        }
    }
}

fn meet(ctx: &Ctx<'_>, out: &mut Plan) {
    let reachable: Vec<&NodeView> = ctx
        .input
        .view
        .nodes
        .iter()
        .filter(|v| v.reported().is_some())
        .collect();
    let Some(anchor) = reachable.iter().max_by_key(|v| {
        (
            ctx.id(v).map_or(0, |id| ctx.slot_count(id)),
            std::cmp::Reverse(v.pool.shard),
        )
    }) else {
        return;
    };
    let (Some(anchor_report), Some(anchor_id)) = (anchor.reported(), ctx.id(anchor)) else {
        return;
    };
    for v in &reachable {
        let (Some(r), Some(id)) = (v.reported(), ctx.id(v)) else {
            continue;
        };
        if id == anchor_id || anchor_report.knows(id) {
            continue;
        }
        // A node the cluster forgot still knows the cluster, so it would never
        // meet anyone itself: the anchor meets it instead.
        let (node, peer) = if r.knows(anchor_id) {
            (anchor.pool.addr, v.pool.addr)
        } else {
            (v.pool.addr, anchor.pool.addr)
        };
        out.actions.push(Action::Meet { node, peer });
    }
    if !out.actions.is_empty() {
        return;
    }
    // Everyone reachable must know everyone reachable before slots or replicas
    // are assigned: `CLUSTER REPLICATE` and `SETSLOT` name nodes by id. A node
    // that forgot a peer which still knows it ignores gossip about that peer
    // for a minute (Redis's forget ban), so one-sided pairs meet directly, a
    // few per round.
    let mut unknown = None;
    for a in &reachable {
        for b in &reachable {
            if let (Some(ra), Some(ida), Some(idb)) = (a.reported(), ctx.id(a), ctx.id(b))
                && !ra.knows(idb)
            {
                unknown.get_or_insert_with(|| format!("{} does not know {} yet", a.pool.name, b.pool.name));
                if b.reported().is_some_and(|rb| rb.knows(ida)) && out.actions.len() < MEETS_PER_ROUND {
                    out.actions.push(Action::Meet {
                        node: a.pool.addr,
                        peer: b.pool.addr,
                    });
                }
            }
        }
    }
    if out.actions.is_empty()
        && let Some(w) = unknown
    {
        out.waiting.push(w);
    }
}

/// Most one-sided MEETs planned per round (gossip usually closes such gaps
/// by itself within a moment; the MEETs are for nodes a forget ban blocks).
const MEETS_PER_ROUND: usize = 8;

fn fix_open_slots(ctx: &Ctx<'_>, out: &mut Plan) {
    let view = ctx.input.view;
    let by_id = |id: &str| view.nodes.iter().find(|v| ctx.id(v) == Some(id));
    let usable_master = |v: &NodeView| ctx.usable(v) && v.reported().is_some_and(|r| r.myself.master);
    let mut handled = std::collections::BTreeSet::new();
    for v in &view.nodes {
        let (Some(r), Some(me)) = (v.reported(), ctx.target(v)) else {
            continue;
        };
        for (slot, to_id) in &r.myself.migrating {
            if !handled.insert(*slot) {
                continue;
            }
            let dest = by_id(to_id);
            match dest.filter(|t| usable_master(t)).and_then(|t| ctx.target(t)) {
                // A node that does not own the slot has nothing to migrate:
                // its MIGRATING state is left over and is cleared.
                Some(to) if r.myself.owns(*slot) => out.actions.push(Action::FinishMigration {
                    slot: *slot,
                    from: me.clone(),
                    to,
                }),
                // One slow answer is not a dead destination: keys may already
                // be there, and rolling back would hide them.
                None if dest.is_some_and(|t| t.reported().is_none() && !ctx.is_failed(t)) => {
                    out.waiting.push(format!(
                        "slot {slot} is migrating from {} to a node that did not answer; waiting until it answers or is Failed",
                        me.name
                    ));
                }
                _ => out.actions.push(Action::AbortMigration {
                    slot: *slot,
                    node: me.clone(),
                }),
            }
        }
    }
    for v in &view.nodes {
        let (Some(r), Some(me)) = (v.reported(), ctx.target(v)) else {
            continue;
        };
        for (slot, from_id) in &r.myself.importing {
            if !handled.insert(*slot) {
                continue;
            }
            // Finish from whoever owns the slot now: the recorded source, or —
            // if the source died mid-migration and was failed over — its
            // promoted replica, so the keys already moved here stay served.
            let owner = ctx.owners[usize::from(*slot)].as_deref();
            let source = by_id(from_id)
                .filter(|s| usable_master(s))
                .filter(|s| s.reported().is_some_and(|sr| sr.myself.owns(*slot)))
                .or_else(|| owner.and_then(by_id).filter(|o| usable_master(o)))
                .filter(|s| ctx.id(s) != Some(me.id.as_str()))
                .and_then(|s| ctx.target(s));
            let owner_down = owner.is_some_and(|o| o != me.id && by_id(o).is_none_or(|v| !usable_master(v)));
            match source {
                Some(from) => out.actions.push(Action::FinishMigration {
                    slot: *slot,
                    from,
                    to: me.clone(),
                }),
                None if owner_down => out.waiting.push(format!(
                    "slot {slot} is importing on {} but its owner is down; waiting for its failover",
                    me.name
                )),
                None => out.actions.push(Action::AbortMigration {
                    slot: *slot,
                    node: me.clone(),
                }),
            }
        }
    }
}

fn assign_unowned(ctx: &Ctx<'_>, out: &mut Plan) {
    let unowned: Vec<u16> = (0..SLOTS)
        .filter(|&s| ctx.owners[usize::from(s)].is_none())
        .collect();
    if unowned.is_empty() {
        return;
    }
    let shards = ctx.input.tier.shards;
    let mut primaries = Vec::new();
    for shard in 0..shards {
        match ctx
            .primary_of(shard)
            .filter(|p| ctx.usable(p))
            .and_then(|p| ctx.target(p))
        {
            Some(t) => primaries.push(t),
            None => {
                out.waiting
                    .push(format!("shard {shard} has no usable primary to take slots"));
                return;
            }
        }
    }
    if unowned.len() == usize::from(SLOTS) {
        for (node, range) in primaries.into_iter().zip(even_split(shards)) {
            out.actions.push(Action::AddSlots {
                node,
                ranges: vec![range],
            });
        }
        return;
    }
    // Some slots lost their owner (a shard lost every node): give them to the
    // primaries with the fewest slots, in contiguous chunks.
    let mut counts: Vec<(usize, Target)> = primaries
        .into_iter()
        .map(|t| (ctx.slot_count(&t.id), t))
        .collect();
    let mut assigned: BTreeMap<String, (Target, Vec<u16>)> = BTreeMap::new();
    for slot in unowned {
        counts.sort_by_key(|(n, t)| (*n, t.name.clone()));
        let Some((n, t)) = counts.first_mut() else { return };
        *n += 1;
        assigned
            .entry(t.id.clone())
            .or_insert_with(|| (t.clone(), Vec::new()))
            .1
            .push(slot);
    }
    for (_, (node, slots)) in assigned {
        out.actions.push(Action::AddSlots {
            node,
            ranges: ranges(&slots),
        });
    }
}

fn replicate(ctx: &Ctx<'_>, out: &mut Plan) {
    for shard in ctx.pool_shards() {
        let Some(primary) = ctx.primary_of(shard) else {
            continue;
        };
        let Some(primary_t) = ctx.target(primary) else {
            continue;
        };
        let primary_has_data = ctx.slot_count(&primary_t.id) > 0;
        for v in ctx.nodes_of(shard) {
            if v.pool.name == primary.pool.name || !ctx.usable(v) {
                continue;
            }
            let (Some(r), Some(me)) = (v.reported(), ctx.target(v)) else {
                continue;
            };
            let right_primary = r.myself.master_id.as_deref() == Some(primary_t.id.as_str());
            let empty_master = r.myself.master && ctx.slot_count(&me.id) == 0;
            // A replica of a slot owner holds that shard's data: re-pointing it
            // to a primary without slots (e.g. a node that came back empty)
            // would make it drop the data.
            let follows_owner = r.myself.replica
                && r.myself
                    .master_id
                    .as_deref()
                    .is_some_and(|m| ctx.slot_count(m) > 0);
            if follows_owner && !primary_has_data && !right_primary {
                out.waiting.push(format!(
                    "{} replicates a slot owner; not re-pointing it to {}, which owns no slot",
                    v.pool.name, primary.pool.name
                ));
                continue;
            }
            if (r.myself.replica && !right_primary) || empty_master {
                if r.knows(&primary_t.id) {
                    out.actions.push(Action::Replicate {
                        node: me,
                        primary: primary_t.clone(),
                    });
                } else {
                    out.waiting
                        .push(format!("{} does not know {} yet", v.pool.name, primary.pool.name));
                }
            }
        }
    }
}

fn remove(ctx: &Ctx<'_>, out: &mut Plan) {
    let tier = ctx.input.tier;
    let destroy = |v: &NodeView, reason: Removal| Action::DestroyNode {
        name: v.pool.name.clone(),
        shard: v.pool.shard,
        id: ctx.id(v).map(str::to_string),
        reason,
    };
    for v in &ctx.input.view.nodes {
        let owns = ctx.id(v).is_some_and(|id| ctx.slot_count(id) > 0);
        let failed_for = ctx.failed_for(v);
        if failed_for < tier.health.evict_after || !ctx.is_failed(v) {
            continue;
        }
        // A node the cluster still sees alive is only cut off from the
        // operator: evicting it would destroy a working node.
        if ctx.id(v).is_some_and(|id| ctx.input.view.cluster_sees_alive(id)) {
            continue;
        }
        // A failed slot owner is replaced only when its shard has nobody left
        // to promote (a cache accepts the data loss; the slots are reassigned).
        let shard_has_help = ctx
            .nodes_of(v.pool.shard)
            .any(|o| o.pool.name != v.pool.name && ctx.usable(o));
        if !owns || !shard_has_help {
            out.actions.push(destroy(v, Removal::Evicted { failed_for }));
        }
    }
    if !out.actions.is_empty() {
        return;
    }
    // Replicas beyond replicasPerShard; a primary among them hands over first.
    for shard in 0..tier.shards {
        let primary = ctx.primary_of(shard);
        for v in ctx
            .nodes_of(shard)
            .filter(|v| v.pool.ordinal > tier.replicas_per_shard)
        {
            let is_primary = primary.is_some_and(|p| p.pool.name == v.pool.name);
            if !is_primary {
                out.actions.push(destroy(v, Removal::ReplicaRemoved));
                continue;
            }
            let Some(pid) = ctx.id(v) else { continue };
            let heir = ctx
                .nodes_of(shard)
                .filter(|o| ctx.wanted(o) && ctx.usable(o))
                .filter(|o| {
                    o.reported()
                        .is_some_and(|r| r.myself.master_id.as_deref() == Some(pid) && r.repl.link_up)
                })
                .max_by_key(|o| o.reported().map_or(0, |r| r.repl.offset))
                .and_then(|o| ctx.target(o));
            match heir {
                Some(to) => out.actions.push(Action::Failover {
                    shard,
                    from: v.pool.name.clone(),
                    to,
                    kind: FailoverKind::Graceful,
                }),
                None => out.waiting.push(format!(
                    "{} is to be removed but no in-sync replica can take over yet",
                    v.pool.name
                )),
            }
        }
    }
    // Shards beyond spec.shards, once their slots have moved away.
    for shard in ctx.pool_shards().into_iter().filter(|&s| s >= tier.shards) {
        let empty = ctx
            .nodes_of(shard)
            .all(|v| ctx.id(v).is_none_or(|id| ctx.slot_count(id) == 0));
        if empty {
            // Replicas first, so none is left replicating a destroyed primary.
            let mut nodes: Vec<&NodeView> = ctx.nodes_of(shard).collect();
            let primary_name = ctx.primary_of(shard).map(|p| p.pool.name.clone());
            nodes.sort_by_key(|v| Some(&v.pool.name) == primary_name.as_ref());
            for v in nodes {
                out.actions.push(destroy(v, Removal::ShardRemoved));
            }
        }
    }
}

fn rebalance(ctx: &Ctx<'_>, out: &mut Plan) {
    let tier = ctx.input.tier;
    if orphans::has_orphans(ctx) {
        out.waiting
            .push("some slots are owned by a node that is no pool node; rebalancing waits".into());
        return;
    }
    // (shard, primary, count)
    let mut shards: Vec<(u32, Target, usize)> = Vec::new();
    for shard in ctx.pool_shards() {
        let Some(p) = ctx.primary_of(shard) else { continue };
        let Some(t) = ctx.target(p) else { continue };
        let n = ctx.slot_count(&t.id);
        if shard >= tier.shards && n == 0 {
            continue;
        }
        if !ctx.usable(p) {
            out.waiting.push(format!(
                "primary {} is not usable; rebalancing waits",
                p.pool.name
            ));
            return;
        }
        // A node answers -CLUSTERDOWN until it reports ok (Redis keeps a new
        // node failed for its first seconds): no slot moves to it before.
        if p.reported().is_some_and(|r| !r.state_ok) {
            out.waiting.push(format!(
                "{} does not report cluster_state:ok yet; rebalancing waits",
                p.pool.name
            ));
            return;
        }
        shards.push((shard, t, n));
    }
    let desired: Vec<&(u32, Target, usize)> = shards.iter().filter(|s| s.0 < tier.shards).collect();
    if desired.len() < tier.shards as usize {
        out.waiting.push("not every shard has a primary yet".into());
        return;
    }
    let total = u32::from(SLOTS) as usize;
    let n = desired.len();
    // The remainder goes to the shards that already have the most, so a
    // balanced cluster never moves a slot.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(desired[i].2), desired[i].0));
    let mut target: HashMap<u32, usize> = HashMap::new();
    for (rank, &i) in order.iter().enumerate() {
        target.insert(desired[i].0, total / n + usize::from(rank < total % n));
    }
    let balanced = shards.iter().all(|(s, _, c)| {
        target.get(s).is_some_and(|t| c.abs_diff(*t) <= 1) || (*s >= tier.shards && *c == 0)
    });
    let within_one = {
        let counts: Vec<usize> = desired.iter().map(|d| d.2).collect();
        let max = counts.iter().max().copied().unwrap_or(0);
        let min = counts.iter().min().copied().unwrap_or(0);
        max - min <= 1 && shards.iter().all(|(s, _, c)| *s < tier.shards || *c == 0)
    };
    if balanced && within_one {
        return;
    }
    let mut surplus: Vec<(Target, Vec<u16>)> = Vec::new();
    let mut deficit: Vec<(Target, usize)> = Vec::new();
    for (s, t, c) in &shards {
        let want = target.get(s).copied().unwrap_or(0);
        if *c > want {
            let mut owned = ctx.owned_slots(&t.id);
            // Give away from the top of the range, keeping ranges contiguous.
            let keep = owned.len() - (c - want);
            let give = owned.split_off(keep);
            surplus.push((t.clone(), give));
        } else if *c < want {
            deficit.push((t.clone(), want - c));
        }
    }
    // Each source spreads over every destination (scale-in empties a shard into
    // all remaining shards, not into one).
    surplus.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.name.cmp(&b.0.name)));
    for (from, mut give) in surplus {
        while !give.is_empty() {
            deficit.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name.cmp(&b.0.name)));
            let Some((to, need)) = deficit.first_mut() else {
                break;
            };
            if *need == 0 {
                break;
            }
            // Small chunks interleave destinations so each gets its share.
            let take = (*need).min(give.len()).min(64);
            let slots = give.drain(..take).collect();
            *need -= take;
            match out.actions.last_mut() {
                Some(Action::MigrateSlots {
                    from: f,
                    to: t,
                    slots: existing,
                }) if f.id == from.id && t.id == to.id => existing.extend::<Vec<u16>>(slots),
                _ => out.actions.push(Action::MigrateSlots {
                    from: from.clone(),
                    to: to.clone(),
                    slots,
                }),
            }
        }
    }
}

/// Nothing left to do, but the cluster is converged only once every node
/// agrees that it serves (`cluster_state:ok`) — gossip takes a moment.
fn settle(ctx: &Ctx<'_>, out: &mut Plan) {
    // With `cluster-require-full-coverage no` a node reports ok even while its
    // slot map is incomplete, so every node's map must also match the owners.
    let owned: BTreeMap<&str, usize> = ctx
        .by_owner
        .iter()
        .map(|(id, s)| (id.as_str(), s.len()))
        .collect();
    for v in &ctx.input.view.nodes {
        let Some(r) = v.reported() else { continue };
        if !r.state_ok {
            out.waiting
                .push(format!("{} does not report cluster_state:ok yet", v.pool.name));
            return;
        }
        let seen: BTreeMap<&str, usize> = std::iter::once(&r.myself)
            .chain(r.others.iter())
            .filter(|l| !l.slots.is_empty())
            .map(|l| (l.id.as_str(), l.slot_count() as usize))
            .collect();
        if seen != owned {
            out.waiting
                .push(format!("{} has not learned the slot map yet", v.pool.name));
            return;
        }
        // Every replica must be known as the replica of its primary (clients
        // discover replicas this way, and a manual failover needs it).
        for other in ctx.input.view.nodes.iter().filter_map(NodeView::reported) {
            let me = &other.myself;
            if me.replica
                && let Some(line) = r.others.iter().find(|l| l.id == me.id)
                && line.master_id != me.master_id
            {
                out.waiting
                    .push(format!("{} has not learned the replicas yet", v.pool.name));
                return;
            }
        }
    }
}

mod orphans;
mod rollout;
#[cfg(test)]
mod tests;
