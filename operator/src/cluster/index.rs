//! One round's answers to the questions the planner and the status both ask
//! of an observation: who owns each slot, which cluster id each pool node
//! has, whether a node is usable, and which node is a shard's primary.
//! Built once per round from the view and the probe results; both read it,
//! so they never disagree on a tie-break.

use std::collections::HashMap;
use std::net::SocketAddr;

use cachetier_crds::NodeHealth;

use super::health::HealthRecord;
use super::view::{ClusterView, NodeView};

/// The slot map and node identities of one observation.
#[derive(Debug, Clone)]
pub struct Index<'a> {
    view: &'a ClusterView,
    health: &'a HashMap<SocketAddr, HealthRecord>,
    /// The owner of every slot (highest config epoch wins).
    owners: Vec<Option<String>>,
    /// Slots by owner id.
    by_owner: HashMap<String, Vec<u16>>,
    /// Cluster id by pool name.
    ids: HashMap<String, String>,
}

impl<'a> Index<'a> {
    /// Indexes `view`, with `health` for what "usable" means.
    pub fn new(view: &'a ClusterView, health: &'a HashMap<SocketAddr, HealthRecord>) -> Self {
        let owners = view.slot_owners();
        let ids = view
            .nodes
            .iter()
            .filter_map(|v| view.id_of(&v.pool).map(|id| (v.pool.name.clone(), id)))
            .collect();
        let mut by_owner: HashMap<String, Vec<u16>> = HashMap::new();
        for (slot, owner) in owners.iter().enumerate() {
            if let Some(id) = owner {
                by_owner.entry(id.clone()).or_default().push(slot as u16);
            }
        }
        Self {
            view,
            health,
            owners,
            by_owner,
            ids,
        }
    }

    /// The observation indexed.
    pub fn view(&self) -> &'a ClusterView {
        self.view
    }

    /// The owner of every slot.
    pub fn owners(&self) -> &[Option<String>] {
        &self.owners
    }

    /// Slots by owner id.
    pub fn by_owner(&self) -> &HashMap<String, Vec<u16>> {
        &self.by_owner
    }

    /// Cluster id by pool name.
    pub fn ids(&self) -> &HashMap<String, String> {
        &self.ids
    }

    /// The cluster id of `v`, when it is known.
    pub fn id(&self, v: &NodeView) -> Option<&str> {
        self.ids.get(&v.pool.name).map(String::as_str)
    }

    /// Slots `id` owns.
    pub fn slot_count(&self, id: &str) -> usize {
        self.by_owner.get(id).map_or(0, Vec::len)
    }

    /// Slots `v` owns.
    pub fn owned_by(&self, v: &NodeView) -> usize {
        self.id(v).map_or(0, |id| self.slot_count(id))
    }

    /// The slots `id` owns, ascending.
    pub fn owned_slots(&self, id: &str) -> Vec<u16> {
        self.by_owner.get(id).cloned().unwrap_or_default()
    }

    /// Every probe record, by address.
    pub fn records(&self) -> &'a HashMap<SocketAddr, HealthRecord> {
        self.health
    }

    /// The probe record of `v`.
    pub fn health(&self, v: &NodeView) -> Option<&'a HealthRecord> {
        self.health.get(&v.pool.addr)
    }

    /// Whether the probes declared `v` Failed.
    pub fn is_failed(&self, v: &NodeView) -> bool {
        self.health(v).is_some_and(|h| h.state == NodeHealth::Failed)
    }

    /// Whether `v` answers and is not Failed (it may be going away).
    pub fn answers(&self, v: &NodeView) -> bool {
        v.reported().is_some() && !self.is_failed(v)
    }

    /// Whether `v` answers, is not Failed and is not going away: a node
    /// the planner may promote, sync from or move slots to.
    pub fn usable(&self, v: &NodeView) -> bool {
        self.answers(v) && !v.pool.terminating
    }

    /// The pool nodes of `shard`.
    pub fn nodes_of(&self, shard: u32) -> impl Iterator<Item = &'a NodeView> {
        self.view.nodes.iter().filter(move |v| v.pool.shard == shard)
    }

    /// The shards that have at least one running node, ascending.
    pub fn pool_shards(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = self.view.nodes.iter().map(|v| v.pool.shard).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// The node of `shard` owning the most slots (the lower ordinal on a
    /// tie), when one owns any.
    pub fn slot_owner_of(&self, shard: u32) -> Option<&'a NodeView> {
        self.nodes_of(shard)
            .map(|v| (v, self.owned_by(v)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(v, n)| (n, std::cmp::Reverse(v.pool.ordinal)))
            .map(|(v, _)| v)
    }

    /// The primary of a shard: its node owning the most slots; with none,
    /// its lowest-ordinal usable master that replicates nobody.
    pub fn primary_of(&self, shard: u32) -> Option<&'a NodeView> {
        self.slot_owner_of(shard).or_else(|| {
            self.nodes_of(shard)
                .filter(|v| self.usable(v))
                .filter(|v| {
                    v.reported()
                        .is_some_and(|r| r.myself.master && r.myself.master_id.is_none())
                })
                .min_by_key(|v| v.pool.ordinal)
        })
    }
}
