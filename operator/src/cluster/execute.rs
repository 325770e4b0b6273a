//! Execution: one planned [`Action`] against Redis and the node pool.
//!
//! Each action is written to be safe to repeat and safe to interrupt: an
//! operator killed in the middle leaves the cluster in a state that the next
//! observation recognises (an open slot, a node not yet met) and the next plan
//! finishes. Nothing here decides *what* to do.

use std::net::SocketAddr;

use tracing::{debug, warn};

use super::config::TierConfig;
use super::conn::Conns;
use super::plan::{Action, FailoverKind, Target};
use super::pool::NodePool;
use super::view::ClusterView;
use crate::Result;

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
) -> Result<()> {
    debug!(%action, "executing");
    match action {
        Action::CreateNode { shard, ordinal } => {
            pool.create(tier, *shard, *ordinal).await?;
        }
        Action::DestroyNode { name, id, .. } => {
            let addr = pool
                .list()
                .await?
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
            // A handshake already in progress makes MEET fail; that is progress too.
            if let Err(e) = conns.query::<()>(*node, &cmd).await {
                debug!(error = %e, "meet not sent");
            }
        }
        Action::Replicate { node, primary } => {
            conns
                .query::<()>(node.addr, redis::cmd("CLUSTER").arg("REPLICATE").arg(&primary.id))
                .await?;
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
            migrate_slot(conns, tier, reach, from, to, *slot).await?;
        }
        Action::MigrateSlots { from, to, slots } => {
            for slot in slots {
                migrate_slot(conns, tier, reach, from, to, *slot).await?;
            }
        }
        Action::AbortMigration { slot, node } => {
            conns
                .query::<()>(
                    node.addr,
                    redis::cmd("CLUSTER").arg("SETSLOT").arg(*slot).arg("STABLE"),
                )
                .await?;
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
    Ok(())
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

/// Moves one slot from `from` to `to`: mark both ends, move the keys in
/// batches, then assign the slot to `to` — on `to` first (so it starts serving
/// it), then on `from`, then on every other primary. Every step tolerates
/// having been done already.
async fn migrate_slot(
    conns: &mut Conns,
    tier: &TierConfig,
    reach: &Reach,
    from: &Target,
    to: &Target,
    slot: u16,
) -> Result<()> {
    let setslot = |state: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .to_owned()
    };
    if let Err(e) = conns.query::<()>(to.addr, &setslot("IMPORTING", &from.id)).await {
        debug!(slot, error = %e, "importing not set (already owner?)");
    }
    let migrating = conns.query::<()>(from.addr, &setslot("MIGRATING", &to.id)).await;
    if let Err(e) = &migrating {
        debug!(slot, error = %e, "migrating not set (no longer the owner?)");
    }
    if migrating.is_ok() {
        let batch = tier.timing.migrate_batch.max(1);
        let timeout_ms = tier.timing.migrate_timeout.as_millis();
        loop {
            let keys: Vec<Vec<u8>> = conns
                .query(
                    from.addr,
                    redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(batch),
                )
                .await?;
            if keys.is_empty() {
                break;
            }
            let mut cmd = redis::cmd("MIGRATE");
            cmd.arg(to.addr.ip().to_string())
                .arg(to.addr.port())
                .arg("")
                .arg(0)
                .arg(timeout_ms as u64)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys);
            let _: redis::Value = conns
                .query_within(from.addr, &cmd, tier.timing.migrate_timeout + conns.timeout())
                .await?;
        }
    }
    conns.query::<()>(to.addr, &setslot("NODE", &to.id)).await?;
    if let Err(e) = conns.query::<()>(from.addr, &setslot("NODE", &to.id)).await {
        warn!(slot, node = %from.name, error = %e, "source did not take the new owner; gossip will tell it");
    }
    for &addr in reach
        .masters
        .iter()
        .filter(|a| **a != to.addr && **a != from.addr)
    {
        if let Err(e) = conns.query::<()>(addr, &setslot("NODE", &to.id)).await {
            debug!(slot, %addr, error = %e, "owner not broadcast; gossip will tell it");
        }
    }
    Ok(())
}
