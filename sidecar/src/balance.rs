//! Read balancing: which node of a shard serves a read.
//!
//! Lesson 3 of PRODUCT.md: clients that chose "the fastest connection" sent
//! most reads to one replica. Here every read draws afresh — uniformly among
//! the shard's *serving* replicas (healthy per the watchdog, open per the read
//! gate) — so load spreads evenly regardless of connection timing, and a
//! replica that stops serving simply stops being drawn.
//!
//! Under `random` the primary is not a candidate unless
//! `reads_include_primary` is set: it already carries every write, and
//! replicas exist to take reads. When no replica serves, every policy falls
//! back to the primary (an unavailable read would be worse than a loaded
//! primary) and the fallback is counted. When the primary is out of rotation
//! too (it died, and no failover has happened yet), a replica that is
//! complete but cut off from it ("orphaned", see `gate.rs`) serves the read:
//! slightly stale data beats failing every read of the shard.

use rand::Rng;

use crate::config::ReadPolicy;

/// What balancing needs to know about a node.
pub trait Candidate {
    fn serving_replica(&self) -> bool;
    /// A replica that may serve only when the primary cannot (see module docs).
    fn last_resort_replica(&self) -> bool;
    fn is_healthy(&self) -> bool;
    fn in_flight(&self) -> usize;
    fn same(&self, other: &Self) -> bool;
}

impl Candidate for std::sync::Arc<crate::upstream::Node> {
    fn serving_replica(&self) -> bool {
        crate::upstream::Node::serving_replica(self)
    }
    fn last_resort_replica(&self) -> bool {
        crate::upstream::Node::last_resort_replica(self)
    }
    fn is_healthy(&self) -> bool {
        crate::upstream::Node::is_healthy(self)
    }
    fn in_flight(&self) -> usize {
        crate::upstream::Node::in_flight(self)
    }
    fn same(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(self, other)
    }
}

/// The node chosen for one read.
#[derive(Debug)]
pub struct Pick<'a, N> {
    pub node: &'a N,
    /// True when a replica was wanted but none was serving.
    pub fallback: bool,
}

/// Choose a node for a read. `avoid` is a node that just failed this request
/// (the retry must go elsewhere if anything else serves).
pub fn pick<'a, N: Candidate, R: Rng + ?Sized>(
    policy: ReadPolicy,
    include_primary: bool,
    primary: &'a N,
    replicas: &'a [N],
    avoid: Option<&N>,
    rng: &mut R,
) -> Pick<'a, N> {
    let usable = |n: &N| avoid.is_none_or(|a| !n.same(a));
    let primary_usable = primary.is_healthy() && usable(primary);
    if policy == ReadPolicy::Primary {
        return Pick {
            node: primary,
            fallback: false,
        };
    }
    let with_primary = policy == ReadPolicy::Random && include_primary && primary_usable;
    let serving = |n: &&N| n.serving_replica() && usable(n);
    let count = replicas.iter().filter(serving).count() + usize::from(with_primary);
    let nth = |i: usize| -> &'a N { replicas.iter().filter(serving).nth(i).unwrap_or(primary) };
    match count {
        0 if !primary_usable => {
            let last_resort = |n: &&N| n.last_resort_replica() && usable(n);
            let orphans = replicas.iter().filter(last_resort).count();
            let node = match orphans {
                0 => primary,
                n => replicas
                    .iter()
                    .filter(last_resort)
                    .nth(rng.random_range(0..n))
                    .unwrap_or(primary),
            };
            Pick { node, fallback: true }
        }
        0 => Pick {
            node: primary,
            fallback: true,
        },
        1 => Pick {
            node: nth(0),
            fallback: false,
        },
        _ => {
            let ia = rng.random_range(0..count);
            let a = nth(ia);
            if policy != ReadPolicy::BestOfTwo {
                return Pick {
                    node: a,
                    fallback: false,
                };
            }
            // Second draw distinct from the first.
            let mut j = rng.random_range(0..count - 1);
            if j >= ia {
                j += 1;
            }
            let b = nth(j);
            let node = if b.in_flight() < a.in_flight() { b } else { a };
            Pick {
                node,
                fallback: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[derive(Debug)]
    struct N {
        id: usize,
        serving: bool,
        orphaned: bool,
        healthy: bool,
        in_flight: usize,
    }

    impl Candidate for N {
        fn serving_replica(&self) -> bool {
            self.serving
        }
        fn last_resort_replica(&self) -> bool {
            self.orphaned && self.healthy
        }
        fn is_healthy(&self) -> bool {
            self.healthy
        }
        fn in_flight(&self) -> usize {
            self.in_flight
        }
        fn same(&self, other: &Self) -> bool {
            self.id == other.id
        }
    }

    fn n(id: usize, serving: bool, in_flight: usize) -> N {
        N {
            id,
            serving,
            orphaned: false,
            healthy: true,
            in_flight,
        }
    }

    #[test]
    fn random_policy_spreads_reads_evenly_over_serving_replicas() {
        let primary = n(0, true, 0);
        let replicas = [n(1, true, 0), n(2, true, 0), n(3, false, 0), n(4, true, 0)];
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0usize; 5];
        for _ in 0..30_000 {
            let p = pick(ReadPolicy::Random, false, &primary, &replicas, None, &mut rng);
            counts[p.node.id] += 1;
        }
        assert_eq!(counts[0], 0);
        assert_eq!(counts[3], 0, "a gated replica gets zero reads");
        for id in [1, 2, 4] {
            assert!((9_500..=10_500).contains(&counts[id]), "{counts:?}");
        }
    }

    #[test]
    fn no_serving_replica_falls_back_to_the_primary_and_says_so() {
        let primary = n(0, true, 0);
        let replicas = [n(1, false, 0)];
        let mut rng = StdRng::seed_from_u64(1);
        for policy in [
            ReadPolicy::Random,
            ReadPolicy::ReplicasOnly,
            ReadPolicy::BestOfTwo,
        ] {
            let p = pick(policy, false, &primary, &replicas, None, &mut rng);
            assert_eq!(p.node.id, 0);
            assert!(p.fallback);
        }
    }

    #[test]
    fn a_retry_avoids_the_node_that_just_failed() {
        let primary = n(0, true, 0);
        let replicas = [n(1, true, 0), n(2, true, 0)];
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let p = pick(
                ReadPolicy::Random,
                false,
                &primary,
                &replicas,
                Some(&replicas[0]),
                &mut rng,
            );
            assert_eq!(p.node.id, 2);
        }
    }

    #[test]
    fn best_of_two_prefers_the_less_busy_replica() {
        let primary = n(0, true, 0);
        let replicas = [n(1, true, 100), n(2, true, 0)];
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..100 {
            let p = pick(ReadPolicy::BestOfTwo, false, &primary, &replicas, None, &mut rng);
            assert_eq!(p.node.id, 2);
        }
    }

    #[test]
    fn primary_policy_and_include_primary_use_the_primary() {
        let primary = n(0, true, 0);
        let replicas = [n(1, true, 0)];
        let mut rng = StdRng::seed_from_u64(9);
        let p = pick(ReadPolicy::Primary, false, &primary, &replicas, None, &mut rng);
        assert_eq!(p.node.id, 0);
        let hits = (0..1000)
            .filter(|_| {
                pick(ReadPolicy::Random, true, &primary, &replicas, None, &mut rng)
                    .node
                    .id
                    == 0
            })
            .count();
        assert!((400..600).contains(&hits), "{hits}");
    }

    #[test]
    fn an_orphaned_replica_serves_only_while_its_primary_is_down() {
        let mut primary = n(0, true, 0);
        let mut orphan = n(1, false, 0);
        orphan.orphaned = true;
        let replicas = [orphan, n(2, false, 0)];
        let mut rng = StdRng::seed_from_u64(11);
        let p = pick(ReadPolicy::Random, false, &primary, &replicas, None, &mut rng);
        assert_eq!(p.node.id, 0, "a live primary beats a cut-off replica");
        primary.healthy = false;
        for _ in 0..100 {
            let p = pick(ReadPolicy::Random, false, &primary, &replicas, None, &mut rng);
            assert_eq!(
                p.node.id, 1,
                "a syncing replica never serves, an orphaned one does"
            );
            assert!(p.fallback);
        }
        primary.healthy = true;
        let p = pick(
            ReadPolicy::Random,
            false,
            &primary,
            &replicas,
            Some(&primary),
            &mut rng,
        );
        assert_eq!(
            p.node.id, 1,
            "a retry after the primary failed goes to the orphan"
        );
    }
}
