//! Execution: one planned [`Action`] against Redis and the node pool.
//!
//! Each action is written to be safe to repeat and safe to interrupt: an
//! operator killed in the middle leaves the cluster in a state that the next
//! observation recognises (an open slot, a node not yet met) and the next plan
//! finishes. Nothing here decides *what* to do.

use std::net::SocketAddr;

use tracing::debug;

use super::config::TierConfig;
use super::conn::Conns;
use super::plan::{Action, FailoverKind};
use super::pool::NodePool;
use super::view::ClusterView;
use crate::Result;

mod migrate;

/// Where an action may need to reach besides its own nodes.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Every node that answered the last observation.
    pub reachable: Vec<SocketAddr>,
    /// Every reachable primary (receives `SETSLOT … NODE`).
    pub masters: Vec<SocketAddr>,
    /// Cluster bus port of each pool node's client address.
    pub bus_ports: Vec<(SocketAddr, u16)>,
}

impl Reach {
    /// Takes the reachable nodes and primaries from an observation.
    pub fn from_view(view: &ClusterView) -> Self {
        let mut reach = Self::default();
        for v in &view.nodes {
            reach.bus_ports.push((v.pool.addr, v.pool.bus_port));
            if let Some(r) = v.reported() {
                reach.reachable.push(v.pool.addr);
                if r.myself.master {
                    reach.masters.push(v.pool.addr);
                }
            }
        }
        reach
    }
}

/// Executes `action`.
pub async fn execute<P: NodePool>(
    pool: &P,
    conns: &mut Conns,
    tier: &TierConfig,
    reach: &Reach,
    action: &Action,
) -> Result<Outcome> {
    debug!(%action, "executing");
    match action {
        Action::CreateNode { shard, ordinal } => {
            pool.ensure(tier, *shard, *ordinal).await?;
        }
        Action::DestroyNode { name, id, .. } => {
            let addr = pool
                .list()
                .await?
                .nodes
                .into_iter()
                .find(|n| &n.name == name)
                .map(|n| n.addr);
            pool.destroy(name).await?;
            if let Some(addr) = addr {
                conns.drop_connection(addr);
            }
            if let Some(id) = id {
                forget_everywhere(conns, reach, id, addr).await;
            }
        }
        Action::Forget { id } => forget_everywhere(conns, reach, id, None).await,
        Action::Meet { node, peer } => {
            let bus = reach
                .bus_ports
                .iter()
                .find(|(a, _)| a == peer)
                .map_or(peer.port().saturating_add(10000), |(_, b)| *b);
            let cmd = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg(peer.ip().to_string())
                .arg(peer.port())
                .arg(bus)
                .to_owned();
            // Fails while a handshake with the peer is in progress (or the
            // address is bad): not progress, the reconciler backs off.
            conns.query::<()>(*node, &cmd).await?;
        }
        Action::Replicate { node, primary } => {
            conns
                .query::<()>(node.addr, redis::cmd("CLUSTER").arg("REPLICATE").arg(&primary.id))
                .await?;
        }
        Action::Flush { node } => {
            conns.query::<()>(node.addr, &redis::cmd("FLUSHALL")).await?;
        }
        Action::AddSlots { node, ranges } => {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("ADDSLOTSRANGE");
            for (a, b) in ranges {
                cmd.arg(*a).arg(*b);
            }
            conns.query::<()>(node.addr, &cmd).await?;
        }
        Action::FinishMigration { slot, from, to } => {
            return migrate::finish(conns, tier, reach, from, to, *slot).await;
        }
        Action::MigrateSlots { from, to, slots } => {
            return migrate::migrate_slots(conns, tier, reach, from, to, slots, migrate::Fence::Import).await;
        }
        Action::AbortMigration { slot, node, peer } => migrate::abort(conns, node, peer, *slot).await?,
        Action::SetConfig { node, settings } => {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("SET");
            for (k, v) in settings {
                cmd.arg(k).arg(v);
            }
            conns.query::<()>(node.addr, &cmd).await?;
        }
        Action::Failover { to, kind, .. } => {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("FAILOVER");
            if *kind == FailoverKind::Takeover {
                cmd.arg("TAKEOVER");
            }
            conns.query::<()>(to.addr, &cmd).await?;
        }
    }
    Ok(Outcome::default())
}

async fn forget_everywhere(conns: &mut Conns, reach: &Reach, id: &str, except: Option<SocketAddr>) {
    for &addr in reach.reachable.iter().filter(|a| Some(**a) != except) {
        // Fails on the node itself and on nodes that never knew it; both fine.
        if let Err(e) = conns
            .query::<()>(addr, redis::cmd("CLUSTER").arg("FORGET").arg(id))
            .await
        {
            debug!(%addr, error = %e, "forget skipped");
        }
    }
}

/// Most bytes (by `MEMORY USAGE`) one `MIGRATE` call carries; a single key
/// larger than this moves alone.
pub const MIGRATE_MAX_BYTES: u64 = 8 << 20;

/// A key that could not be moved even on its own (e.g. too large for the
/// `MIGRATE` timeout): its slot stays open and the tier reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckKey {
    /// The slot left open.
    pub slot: u16,
    /// The key (lossy UTF-8).
    pub key: String,
    /// Why it did not move.
    pub error: String,
}

/// What executing an action left for the status to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Keys that could not be moved.
    pub stuck: Vec<StuckKey>,
}
