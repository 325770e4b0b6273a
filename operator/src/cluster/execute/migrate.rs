//! Live slot migration, fenced so that any number of reconcilers may run it
//! at once.
//!
//! Every change of a slot's state goes through [`fence`]: a script that
//! reads the node's own `CLUSTER NODES` line and changes the slot only if it
//! is still in the state the step expects, atomically on that node. The
//! source's `MIGRATING` state is the claim: only the owner, and only while
//! no migration of the slot to another node is open, starts migrating it,
//! so two reconcilers that picked different destinations never both move
//! keys; the one whose claim lost rolls back its destination's `IMPORTING`
//! (if no key arrived there) and leaves the slot to the winner. A
//! destination takes the slot only while it imports it and only after the
//! source, still migrating to it, holds no key; the source gives it away
//! only to the node it migrates to; other primaries learn the owner only if
//! they neither own the slot nor have it open. A reconciler running the same
//! migration as another one simply helps it (`MIGRATE … REPLACE` of a moved
//! key is a no-op).

use std::net::SocketAddr;
use std::sync::LazyLock;

use redis::Cmd;
use tracing::{debug, warn};

use super::{MIGRATE_MAX_BYTES, Outcome, Reach, StuckKey};
use crate::cluster::config::TierConfig;
use crate::cluster::conn::Conns;
use crate::cluster::plan::Target;
use crate::{Error, Result};

/// The compare-and-set script (`fence.lua`).
const FENCE: &str = include_str!("fence.lua");

static FENCE_SHA: LazyLock<String> = LazyLock::new(|| redis::Script::new(FENCE).get_hash().to_string());

/// One fenced step of a migration, run by `fence.lua` on one node for a set
/// of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// On the destination: `IMPORTING` from the peer (the source), unless it
    /// imports the slot from another node.
    Import,
    /// On the destination of a finish: `IMPORTING` from the peer, whatever
    /// it imported before (e.g. from a source that died and was failed over).
    Retarget,
    /// On the source, the claim: `MIGRATING` to the peer, only if it owns the
    /// slot and migrates it nowhere else.
    Migrate,
    /// On the source, read-only: migrating to the peer.
    Towards,
    /// On the source, read-only: still migrating to the peer, no key left.
    Drained,
    /// On the destination: `SETSLOT NODE` itself, only while importing.
    Take,
    /// On the source: `SETSLOT NODE` peer, only if migrating to it and empty.
    Give,
    /// On another primary: `SETSLOT NODE` peer, unless it owns the slot or
    /// has it open.
    Tell,
    /// On the destination of a lost claim: `STABLE`, only if still importing
    /// from the peer and no key arrived.
    Unimport,
    /// Roll back a slot open towards the peer (an importer holding keys of a
    /// slot it does not own takes it instead).
    Abort,
    /// On the destination of a finish from the peer, which does not migrate
    /// the slot to it: an import from another node that brought no key is
    /// dropped (`STABLE`) instead of finished.
    Leftover,
}

impl Fence {
    fn op(self) -> &'static str {
        match self {
            Self::Import => "import",
            Self::Retarget => "retarget",
            Self::Towards => "towards",
            Self::Migrate => "migrate",
            Self::Drained => "drained",
            Self::Take => "take",
            Self::Give => "give",
            Self::Tell => "tell",
            Self::Unimport => "unimport",
            Self::Abort => "abort",
            Self::Leftover => "leftover",
        }
    }
}

fn fence_cmd(step: Fence, peer: &str, slots: &[u16]) -> Cmd {
    redis::cmd("EVALSHA")
        .arg(FENCE_SHA.as_str())
        .arg(0)
        .arg(step.op())
        .arg(peer)
        .arg(slots)
        .to_owned()
}

/// Runs `step` for `slots` on `addr` (towards `peer`, a node id) and returns
/// each slot's status: `"ok"` when the step was done (or already held),
/// otherwise why not. Loads the script on a node that does not have it.
pub(crate) async fn fence(
    conns: &mut Conns,
    addr: SocketAddr,
    step: Fence,
    peer: &str,
    slots: &[u16],
) -> Result<Vec<(u16, String)>> {
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    let cmd = fence_cmd(step, peer, slots);
    let statuses: Vec<String> = match conns.query(addr, &cmd).await {
        Err(Error::Command { source, .. })
            if source.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            let _: String = conns
                .query(addr, redis::cmd("SCRIPT").arg("LOAD").arg(FENCE))
                .await?;
            conns.query(addr, &cmd).await?
        }
        other => other?,
    };
    if statuses.len() != slots.len() {
        return Err(Error::Protocol {
            addr,
            command: format!("fence {}", step.op()),
            detail: format!("{} statuses for {} slots", statuses.len(), slots.len()),
        });
    }
    Ok(slots.iter().copied().zip(statuses).collect())
}

/// The slots whose status is `"ok"`; a refused `SETSLOT` is an error.
fn done(addr: SocketAddr, step: Fence, statuses: Vec<(u16, String)>) -> Result<Vec<u16>> {
    let mut ok = Vec::new();
    for (slot, status) in statuses {
        match status.as_str() {
            "ok" => ok.push(slot),
            s if s.starts_with("refused") => {
                return Err(Error::Protocol {
                    addr,
                    command: format!("CLUSTER SETSLOT {slot} ({})", step.op()),
                    detail: status,
                });
            }
            _ => debug!(slot, %addr, step = step.op(), %status, "fenced step not taken"),
        }
    }
    Ok(ok)
}

/// Rolls back `slot` on `node`, only if it is still open towards `peer`
/// (another reconciler may have re-opened it towards another node since).
pub(crate) async fn abort(conns: &mut Conns, node: &Target, peer: &str, slot: u16) -> Result<()> {
    let statuses = fence(conns, node.addr, Fence::Abort, peer, &[slot]).await?;
    done(node.addr, Fence::Abort, statuses).map(drop)
}

/// Finishes the migration of `slot` from `from` (its owner) to `to`, which
/// has it open. Unless `from` already migrates it to `to`, an import on `to`
/// from another node that brought no key is a claim that lost to another
/// destination (or a source that died before sending anything): it is
/// dropped instead, so a slot that reached its destination is not moved
/// again. Otherwise `to` imports from `from` now (keys already moved there
/// from a source that was failed over stay served).
pub(super) async fn finish(
    conns: &mut Conns,
    tier: &TierConfig,
    reach: &Reach,
    from: &Target,
    to: &Target,
    slot: u16,
) -> Result<Outcome> {
    let towards = fence(conns, from.addr, Fence::Towards, &to.id, &[slot]).await?;
    if done(from.addr, Fence::Towards, towards)?.is_empty() {
        let kept = fence(conns, to.addr, Fence::Leftover, &from.id, &[slot]).await?;
        if done(to.addr, Fence::Leftover, kept)?.is_empty() {
            return Ok(Outcome::default());
        }
    }
    migrate_slots(conns, tier, reach, from, to, &[slot], Fence::Retarget).await
}

/// Moves `slots` from `from` to `to`: claim each slot (`IMPORTING` on `to`,
/// then the fenced `MIGRATING` on `from`), move the claimed slots' keys in
/// batches bounded in keys and bytes, then hand over each slot that `from`
/// still migrates to `to` and that holds no key there: `to` takes it
/// (bumping its epoch, so some node claims it at every instant), `from`
/// gives it, every other primary is told. A slot whose claim failed (`from`
/// is not its owner any more, or migrates it elsewhere) is never assigned.
/// Every step tolerates having been done already, by this reconciler or
/// another, and an interruption leaves open slots that the next plan
/// finishes. `import` is [`Fence::Import`], or [`Fence::Retarget`] to finish.
pub(super) async fn migrate_slots(
    conns: &mut Conns,
    tier: &TierConfig,
    reach: &Reach,
    from: &Target,
    to: &Target,
    slots: &[u16],
    import: Fence,
) -> Result<Outcome> {
    let mut importing = Vec::new();
    for (slot, status) in fence(conns, to.addr, import, &from.id, slots).await? {
        match status.as_str() {
            "ok" => importing.push(slot),
            // `to` owns it already, imports it from another node, or does
            // not know `from` yet.
            _ => debug!(slot, node = %to.name, %status, "importing not set; not migrating it"),
        }
    }
    let claims = fence(conns, from.addr, Fence::Migrate, &to.id, &importing).await?;
    let lost: Vec<u16> = claims
        .iter()
        .filter(|(_, s)| s != "ok")
        .map(|(slot, _)| *slot)
        .collect();
    let mut pending = done(from.addr, Fence::Migrate, claims)?;
    debug!(from = %from.name, to = %to.name, ?pending, ?lost, "slots claimed");
    if !lost.is_empty() {
        // Another migration holds these slots: leave them to it.
        let undone = fence(conns, to.addr, Fence::Unimport, &from.id, &lost).await?;
        done(to.addr, Fence::Unimport, undone)?;
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
    hand_over(conns, reach, from, to, &drained).await?;
    Ok(outcome)
}

/// The fenced `SETSLOT … NODE to`: on `to` first, then `from`, then every
/// other primary (concurrently; gossip covers one that misses it).
async fn hand_over(
    conns: &mut Conns,
    reach: &Reach,
    from: &Target,
    to: &Target,
    slots: &[u16],
) -> Result<()> {
    let empty = done(
        from.addr,
        Fence::Drained,
        fence(conns, from.addr, Fence::Drained, &to.id, slots).await?,
    )?;
    let taken = fence(conns, to.addr, Fence::Take, &from.id, &empty).await?;
    let owned: Vec<u16> = taken
        .iter()
        .filter(|(_, s)| s == "owner")
        .map(|(slot, _)| *slot)
        .collect();
    let taken = done(to.addr, Fence::Take, taken)?;
    debug!(from = %from.name, to = %to.name, ?taken, ?owned, "slots taken");
    let give: Vec<u16> = taken.iter().chain(&owned).copied().collect();
    match fence(conns, from.addr, Fence::Give, &to.id, &give).await {
        Ok(statuses) => {
            for (slot, status) in statuses.iter().filter(|(_, s)| s != "ok") {
                debug!(slot, node = %from.name, %status, "source did not give the slot; gossip will tell it");
            }
        }
        Err(e) => {
            warn!(node = %from.name, error = %e, "source did not take the new owner; gossip will tell it")
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
        let taken = &taken;
        async move {
            let outcome = fence(&mut local, addr, Fence::Tell, &to.id, taken).await;
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
