//! Rebalancing that a partly executed plan does not change: two reconcilers,
//! or one that re-plans every round, send every slot where the first plan did.

use super::*;

/// Contiguous runs of the slots owned by `cuts.len() + 1` existing shards
/// (some maybe empty), and empty primaries up to `shards`.
pub(super) fn distribution(cuts: Vec<u16>, shards: u32) -> Fx {
    let mut cuts = cuts;
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = vec![0u32];
    bounds.extend(cuts.iter().map(|&c| u32::from(c)));
    bounds.push(u32::from(SLOTS));
    let mut fx = Fx::default();
    for (i, w) in bounds.windows(2).enumerate() {
        let i = i as u32;
        if w[1] > w[0] {
            fx = fx.primary(i, 0, &[(w[0] as u16, (w[1] - 1) as u16)]);
        } else {
            fx = fx.empty(i, 0);
        }
    }
    let existing = (bounds.len() - 1) as u32;
    for s in existing..shards {
        fx = fx.empty(s, 0);
    }
    fx
}

/// Every slot a plan moves, with its source and destination, in execution order.
fn moves(p: &Plan) -> Vec<(u16, Target, Target)> {
    p.actions
        .iter()
        .flat_map(|a| match a {
            Action::MigrateSlots { from, to, slots } => {
                slots.iter().map(|&s| (s, from.clone(), to.clone())).collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

fn as_actions(moves: &[(u16, Target, Target)]) -> Vec<Action> {
    moves
        .iter()
        .map(|(slot, from, to)| Action::MigrateSlots {
            from: from.clone(),
            to: to.clone(),
            slots: vec![*slot],
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn a_partly_executed_reshard_keeps_every_remaining_slot_on_its_planned_destination(
        cuts in proptest::collection::vec(0u16..SLOTS, 1..8),
        shards in 1u32..9,
        done in 0.0f64..=1.0,
    ) {
        let mut fx = distribution(cuts, shards);
        let t = tier(shards, 0);
        let first = moves(&fx.plan(&t));
        let k = ((first.len() as f64) * done) as usize;
        apply(&mut fx, &as_actions(&first[..k]));
        // The remove stage destroys a removed shard once it is empty.
        fx.lines.retain(|(s, _, l, _)| *s < shards || l.slot_count() > 0);
        let again = moves(&fx.plan(&t));
        prop_assert!(again == first[k..], "after {} of {} moves the plan changed", k, first.len());
    }
}

#[test]
fn scaling_out_from_three_to_five_shards_half_way_plans_the_same_remaining_moves() {
    let split = even_split(3);
    let mut fx = Fx::default();
    for s in 0..3 {
        fx = fx.primary(s, 0, &[split[s as usize]]);
    }
    let mut fx = fx.empty(3, 0).empty(4, 0);
    let t = tier(5, 0);
    let first = moves(&fx.plan(&t));
    let half = first.len() / 2;
    apply(&mut fx, &as_actions(&first[..half]));
    assert!(moves(&fx.plan(&t)) == first[half..]);
}
