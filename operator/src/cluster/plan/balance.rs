//! The last stages: rebalance slots across shards, then wait for the cluster
//! to settle.

use super::*;

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
pub(super) fn settle(ctx: &Ctx<'_>, out: &mut Plan) {
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
