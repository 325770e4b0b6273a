//! The last stages: rebalance slots across shards, then wait for the cluster
//! to settle.

use super::*;
use crate::cluster::view::Reported;

pub(super) fn rebalance(ctx: &Ctx<'_>, out: &mut Plan) {
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
    let target = targets(&desired);
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
    // Executed in reverse fill order, so a removed shard's lowest slot (the
    // origin of its blocks) moves last.
    for (from, to, slot) in moves(ctx, &shards, &target).into_iter().rev() {
        match out.actions.last_mut() {
            Some(Action::MigrateSlots {
                from: f,
                to: t,
                slots,
            }) if f.id == from.id && t.id == to.id => slots.push(slot),
            _ => out.actions.push(Action::MigrateSlots {
                from: from.clone(),
                to: to.clone(),
                slots: vec![slot],
            }),
        }
    }
}

/// Slots per desired shard: `16384 / shards`, and one more for the first
/// `16384 % shards` of those that hold more than that already (so a
/// balanced cluster never moves a slot), then of the others, in shard order.
/// Never by exact count: a reshard under way must not change any target.
fn targets(desired: &[&(u32, Target, usize)]) -> HashMap<u32, usize> {
    let total = usize::from(SLOTS);
    let n = desired.len().max(1);
    let (q, extra) = (total / n, total % n);
    let mut order: Vec<(bool, u32)> = desired.iter().map(|d| (d.2 <= q, d.0)).collect();
    order.sort_unstable();
    order
        .into_iter()
        .enumerate()
        .map(|(rank, (_, shard))| (shard, q + usize::from(rank < extra)))
        .collect()
}

/// Slots a source interleaves per destination.
const BLOCK: usize = 64;

/// Every slot to move, with its source and destination, in fill order.
///
/// The destination of a slot must not depend on how far a reshard has got:
/// two reconcilers, or one re-planning every round, then never send a slot
/// to a different shard than the first plan did (which would overfill one
/// shard and move slots back and forth between freshly bumped epochs).
/// A source gives the top of its range: all above the slots it keeps, which
/// do not change while it gives. Its given slots are cut into blocks of
/// [`BLOCK`] counted from that boundary (from its lowest slot when it keeps
/// none, which is why that one moves last); blocks are ordered by (block,
/// source shard), so every destination gets a share of every source, and
/// the destinations, in shard order, take their deficits from that order
/// one after another. A move done only removes its slot from the order and
/// one from its destination's deficit, so the rest keep their destination.
fn moves<'t>(
    ctx: &Ctx<'_>,
    shards: &'t [(u32, Target, usize)],
    target: &HashMap<u32, usize>,
) -> Vec<(&'t Target, &'t Target, u16)> {
    let mut give: Vec<(usize, u32, u16, &Target)> = Vec::new();
    let mut deficit: Vec<(&Target, usize)> = Vec::new();
    for (s, t, c) in shards {
        let want = target.get(s).copied().unwrap_or(0);
        if *c > want {
            let owned = ctx.owned_slots(&t.id);
            let keep = owned.len().saturating_sub(c - want);
            let origin = match keep.checked_sub(1) {
                Some(last) => owned[last].saturating_add(1),
                None => owned.first().copied().unwrap_or(0),
            };
            for &slot in &owned[keep..] {
                give.push((usize::from(slot.saturating_sub(origin)) / BLOCK, *s, slot, t));
            }
        } else if *c < want {
            deficit.push((t, want - c));
        }
    }
    give.sort_unstable_by_key(|&(block, shard, slot, _)| (block, shard, slot));
    let mut to = deficit
        .into_iter()
        .flat_map(|(t, need)| std::iter::repeat_n(t, need));
    give.into_iter()
        .map_while(|(_, _, slot, from)| Some((from, to.next()?, slot)))
        .collect()
}

/// Nothing left to do, but the cluster is converged only once every node
/// agrees that it serves (`cluster_state:ok`) — gossip takes a moment.
pub(super) fn settle(ctx: &Ctx<'_>, out: &mut Plan) {
    // With `cluster-require-full-coverage no` a node reports ok even while its
    // slot map is incomplete, so every node's map must also match the owners.
    let owned: BTreeMap<&str, usize> = ctx
        .index
        .by_owner()
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
            if let Some(id) = tied_dead_owner(ctx, r, &owned) {
                out.actions.push(Action::Forget { id });
                return;
            }
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

/// A node that no pool node is any more, failed in the cluster's verdict,
/// that `r` still credits with slots whose live owner claims them at the
/// same config epoch. Redis moves a slot only to a higher epoch, and a dead
/// node never resolves an epoch collision, so such a view would never
/// converge; forgetting the dead node leaves its slots unowned there, and
/// the live owner's next ping claims them. (Seen after a primary was
/// restarted empty under write load: its replica's promotion got the dead
/// primary's epoch.) A claim at a lower epoch is left to gossip.
fn tied_dead_owner(ctx: &Ctx<'_>, r: &Reported, owned: &BTreeMap<&str, usize>) -> Option<String> {
    let lines = ctx.input.view.all_lines();
    let pool_ids: Vec<&String> = ctx.index.ids().values().collect();
    r.others
        .iter()
        .filter(|l| l.fail && !owned.contains_key(l.id.as_str()) && !pool_ids.contains(&&l.id))
        .find(|l| {
            let Some(&(first, _)) = l.slots.first() else {
                return false;
            };
            let owner = ctx.index.owners().get(usize::from(first)).cloned().flatten();
            owner
                .and_then(|o| lines.get(&o))
                .is_some_and(|o| o.config_epoch == l.config_epoch)
                && ctx.input.view.cluster_flags_failed(&l.id)
        })
        .map(|l| l.id.clone())
}
