//! Execution: one planned [`Action`] against Redis and the node pool.
//!
//! Each action is written to be safe to repeat and safe to interrupt: an
//! operator killed in the middle leaves the cluster in a state that the next
//! observation recognises (an open slot, a node not yet met) and the next plan
//! finishes. Nothing here decides *what* to do.

use std::net::SocketAddr;

use redis::Cmd;
use tracing::{debug, warn};

use super::config::TierConfig;
use super::conn::Conns;
use super::plan::{Action, FailoverKind, Target};
use super::pool::NodePool;
use super::view::{ClusterView, parse_cluster_nodes};
use crate::{Error, Result};

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
            return migrate_slots(conns, tier, reach, from, to, &[*slot]).await;
        }
        Action::MigrateSlots { from, to, slots } => {
            return migrate_slots(conns, tier, reach, from, to, slots).await;
        }
        Action::AbortMigration { slot, node } => {
            conns
                .query::<()>(
                    node.addr,
                    redis::cmd("CLUSTER").arg("SETSLOT").arg(*slot).arg("STABLE"),
                )
                .await?;
        }
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

fn setslot(slot: u16, state: &str, id: &str) -> Cmd {
    redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(state)
        .arg(id)
        .to_owned()
}

/// Moves `slots` from `from` to `to`, in pipelines: mark every slot
/// IMPORTING on `to` and MIGRATING on `from`, move each slot's keys in batches
/// bounded in keys and bytes, then assign to `to` only the slots that were
/// really set MIGRATING on `from` and hold no key there any more — on `to`
/// first (so it serves them), then on `from`, then on every other primary.
/// A slot whose MIGRATING failed (`from` is no longer its owner) is never
/// assigned: that would hand another node's slot to `to`. Every step tolerates
/// having been done already, and an interruption leaves open slots that the
/// next plan finishes.
async fn migrate_slots(
    conns: &mut Conns,
    tier: &TierConfig,
    reach: &Reach,
    from: &Target,
    to: &Target,
    slots: &[u16],
) -> Result<Outcome> {
    let importing: Vec<Cmd> = slots.iter().map(|&s| setslot(s, "IMPORTING", &from.id)).collect();
    for (slot, outcome) in slots.iter().zip(conns.pipeline(to.addr, &importing).await?) {
        if let Err(e) = outcome {
            debug!(slot, error = %e, "importing not set (already owner?)");
        }
    }
    let migrating: Vec<Cmd> = slots.iter().map(|&s| setslot(s, "MIGRATING", &to.id)).collect();
    let mut pending = Vec::new();
    for (&slot, outcome) in slots.iter().zip(conns.pipeline(from.addr, &migrating).await?) {
        match outcome {
            Ok(_) => pending.push(slot),
            Err(e) => debug!(slot, error = %e, "migrating not set (no longer the owner?); not assigning it"),
        }
    }
    let mut outcome = Outcome::default();
    let mut drained = Vec::new();
    while !pending.is_empty() {
        let mut more = Vec::new();
        for (slot, keys) in list_keys(conns, tier, from, &pending).await? {
            if keys.is_empty() {
                drained.push(slot);
                continue;
            }
            let full = keys.len() >= tier.timing.migrate_batch.max(1);
            match move_keys(conns, tier, from, to, slot, keys).await? {
                Some(stuck) => outcome.stuck.push(stuck),
                // While a slot is migrating, writes of keys the source lacks are
                // redirected (ASK): no new key appears, so a short batch was the last.
                None if full => more.push(slot),
                None => drained.push(slot),
            }
        }
        pending = more;
    }
    let still_ours = still_migrating_to(conns, from, to, &drained).await?;
    let empty = empty_slots(conns, from, &still_ours).await?;
    assign(conns, reach, from, to, &empty).await?;
    Ok(outcome)
}

/// The slots of `slots` that `from` still migrates to `to`: another
/// operator may have re-targeted one meanwhile (its keys then went
/// elsewhere), and assigning it to `to` would orphan them.
async fn still_migrating_to(
    conns: &mut Conns,
    from: &Target,
    to: &Target,
    slots: &[u16],
) -> Result<Vec<u16>> {
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    let text: String = conns.query(from.addr, redis::cmd("CLUSTER").arg("NODES")).await?;
    let lines = parse_cluster_nodes(&text).map_err(|detail| Error::Protocol {
        addr: from.addr,
        command: "CLUSTER NODES".into(),
        detail,
    })?;
    let Some(me) = lines.into_iter().find(|l| l.myself) else {
        return Ok(Vec::new());
    };
    Ok(slots
        .iter()
        .copied()
        .filter(|s| me.migrating.iter().any(|(m, id)| m == s && id == &to.id))
        .collect())
}

/// Up to `migrate_batch` key names of each slot on `from`.
async fn list_keys(
    conns: &mut Conns,
    tier: &TierConfig,
    from: &Target,
    slots: &[u16],
) -> Result<Vec<(u16, Vec<Vec<u8>>)>> {
    let batch = tier.timing.migrate_batch.max(1);
    let listing: Vec<Cmd> = slots
        .iter()
        .map(|&s| {
            redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(s)
                .arg(batch)
                .to_owned()
        })
        .collect();
    let listed = conns.pipeline(from.addr, &listing).await?;
    slots
        .iter()
        .zip(listed)
        .map(|(&slot, outcome)| {
            let keys: Vec<Vec<u8>> = outcome
                .and_then(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
                .map_err(|source| Error::Command {
                    addr: from.addr,
                    command: "CLUSTER GETKEYSINSLOT".into(),
                    source,
                })?;
            Ok((slot, keys))
        })
        .collect()
}

/// Splits `keys` into runs of at most [`MIGRATE_MAX_BYTES`] (by `MEMORY USAGE`).
async fn byte_bounded(conns: &mut Conns, from: &Target, keys: Vec<Vec<u8>>) -> Result<Vec<Vec<Vec<u8>>>> {
    let usage: Vec<Cmd> = keys
        .iter()
        .map(|k| {
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(k)
                .arg("SAMPLES")
                .arg(0)
                .to_owned()
        })
        .collect();
    let sizes = conns.pipeline(from.addr, &usage).await?;
    let mut runs: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut bytes = 0u64;
    for (key, size) in keys.into_iter().zip(sizes) {
        // A key deleted meanwhile reports nil: it costs nothing to move.
        let size = size
            .ok()
            .and_then(|v| redis::from_redis_value::<Option<u64>>(v).ok().flatten())
            .unwrap_or(0);
        match runs.last_mut() {
            Some(run) if bytes.saturating_add(size) <= MIGRATE_MAX_BYTES => {
                bytes = bytes.saturating_add(size);
                run.push(key);
            }
            _ => {
                bytes = size;
                runs.push(vec![key]);
            }
        }
    }
    Ok(runs)
}

/// Moves `keys` of `slot`; a batch that fails is retried key by key, and the
/// first key that fails on its own is returned as stuck (the slot stays open).
/// Only a failure to reach `from` at all is an error.
async fn move_keys(
    conns: &mut Conns,
    tier: &TierConfig,
    from: &Target,
    to: &Target,
    slot: u16,
    keys: Vec<Vec<u8>>,
) -> Result<Option<StuckKey>> {
    for run in byte_bounded(conns, from, keys).await? {
        if migrate(conns, tier, from, to, &run).await.is_ok() {
            continue;
        }
        for key in run {
            match migrate(conns, tier, from, to, std::slice::from_ref(&key)).await {
                Ok(()) => {}
                Err(e @ Error::Connect { .. }) => return Err(e),
                Err(e) => {
                    let key = String::from_utf8_lossy(&key).into_owned();
                    warn!(slot, %key, error = %e, "key cannot be moved; the slot stays open");
                    return Ok(Some(StuckKey {
                        slot,
                        key,
                        error: e.to_string(),
                    }));
                }
            }
        }
    }
    Ok(None)
}

async fn migrate(
    conns: &mut Conns,
    tier: &TierConfig,
    from: &Target,
    to: &Target,
    keys: &[Vec<u8>],
) -> Result<()> {
    let timeout_ms = u64::try_from(tier.timing.migrate_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut cmd = redis::cmd("MIGRATE");
    cmd.arg(to.addr.ip().to_string())
        .arg(to.addr.port())
        .arg("")
        .arg(0)
        .arg(timeout_ms)
        .arg("REPLACE");
    match &tier.auth {
        Some(a) => match &a.username {
            Some(user) => cmd.arg("AUTH2").arg(user).arg(&a.password),
            None => cmd.arg("AUTH").arg(&a.password),
        },
        None => &mut cmd,
    };
    cmd.arg("KEYS").arg(keys);
    let _: redis::Value = conns
        .query_within(from.addr, &cmd, tier.timing.migrate_timeout + conns.timeout())
        .await?;
    Ok(())
}

/// The slots of `slots` that hold no key on `from`.
async fn empty_slots(conns: &mut Conns, from: &Target, slots: &[u16]) -> Result<Vec<u16>> {
    let count: Vec<Cmd> = slots
        .iter()
        .map(|&s| redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(s).to_owned())
        .collect();
    let counts = conns.pipeline(from.addr, &count).await?;
    Ok(slots
        .iter()
        .zip(counts)
        .filter(|(_, n)| matches!(n, Ok(redis::Value::Int(0))))
        .map(|(&s, _)| s)
        .collect())
}

/// `SETSLOT … NODE to` on `to`, `from`, then every other primary.
async fn assign(conns: &mut Conns, reach: &Reach, from: &Target, to: &Target, slots: &[u16]) -> Result<()> {
    let assign: Vec<Cmd> = slots.iter().map(|&s| setslot(s, "NODE", &to.id)).collect();
    for (&slot, outcome) in slots.iter().zip(conns.pipeline(to.addr, &assign).await?) {
        outcome.map_err(|source| Error::Command {
            addr: to.addr,
            command: format!("CLUSTER SETSLOT {slot} NODE"),
            source,
        })?;
    }
    for (slot, outcome) in slots.iter().zip(conns.pipeline(from.addr, &assign).await?) {
        if let Err(e) = outcome {
            warn!(slot, node = %from.name, error = %e, "source did not take the new owner; gossip will tell it");
        }
    }
    let others: Vec<SocketAddr> = reach
        .masters
        .iter()
        .copied()
        .filter(|a| *a != to.addr && *a != from.addr)
        .collect();
    // Concurrently, each on the cached connection to its node (as observe does).
    let broadcasts = others.iter().map(|&addr| {
        let mut local = conns.split_for(addr);
        let assign = &assign;
        async move {
            let outcome = local.pipeline(addr, assign).await;
            (addr, outcome, local)
        }
    });
    for (addr, outcome, local) in futures_util::future::join_all(broadcasts).await {
        conns.adopt(addr, local);
        if let Err(e) = outcome {
            debug!(%addr, error = %e, "owners not broadcast; gossip will tell it");
        }
    }
    Ok(())
}
