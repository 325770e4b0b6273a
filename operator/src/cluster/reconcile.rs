//! The reconciler: a thin driver that repeats observe → plan → execute.
//!
//! It keeps connections, the health monitor and a record of recent events
//! (for the status), but nothing it keeps is used to decide what to do: every
//! round plans from a fresh observation. Dropping a [`Reconciler`] at any await
//! point and starting a new one is the crash-recovery path, and it is tested.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cachetier_crds::{CacheTierStatus, Phase};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::config::TierConfig;
use super::conn::Conns;
use super::execute::{Outcome, Reach, execute};
use super::health::{HealthMonitor, HealthRecord};
use super::index::Index;
use super::plan::{Action, FailoverKind, Plan, PlanInput, plan_with};
use super::pool::{NodePool, PoolNode};
use super::settings;
use super::status::{self, Events, StatusInput, SyncTracker};
use super::stuck::StuckSlots;
use super::view::{ClusterView, observe};
use crate::{Error, Result};

/// Longest a round keeps executing planned steps before it observes again, so
/// that a long reshard does not delay noticing a failure.
const ROUND_BUDGET: Duration = Duration::from_secs(2);

/// Slots moved per pipelined migration step.
const MIGRATE_CHUNK: usize = 32;

/// The outcome of one round.
#[derive(Debug)]
pub struct Round {
    /// What was observed.
    pub view: ClusterView,
    /// What was planned from it.
    pub plan: Plan,
    /// The status computed from the observation (before executing the plan).
    pub status: CacheTierStatus,
    /// Steps executed this round.
    pub executed: usize,
    /// The step that failed, if one did (the round stops there).
    pub error: Option<Error>,
}

/// Drives one tier towards its spec.
#[derive(Debug)]
pub struct Reconciler<P> {
    pool: Arc<P>,
    tier: TierConfig,
    conns: Conns,
    health: HealthMonitor,
    sync: SyncTracker,
    events: Events,
    primaries: HashMap<u32, String>,
    /// Open slots whose key did not move, and when to try each again.
    stuck: StuckSlots,
    /// The `CONFIG SET` steps of the previous round, by description.
    last_configs: std::collections::HashSet<String>,
    /// Which node (name, incarnation) each address belonged to last round.
    identities: HashMap<SocketAddr, (String, String)>,
    /// Graceful failovers requested, by the heir's cluster id, and when.
    graceful: Requested<String>,
    /// `CLUSTER MEET`s sent, by (node, peer), and when.
    met: Requested<(SocketAddr, SocketAddr)>,
    status_tx: watch::Sender<Option<CacheTierStatus>>,
}

/// How long Redis runs a manual failover (`CLUSTER FAILOVER`) before it
/// gives up (its `CLUSTER_MF_TIMEOUT`). A second request meanwhile would
/// restart it, and every restart sends the old primary another round of
/// bus messages from a node that still calls itself a replica: one that
/// arrives after the promotion makes the old primary drop the shard's slots
/// until the next ping, and clients routed there get `CLUSTERDOWN`.
const MANUAL_FAILOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `CLUSTER MEET` is given before it is sent again: Redis
/// completes the handshake in its next cluster cron ticks (every 100 ms),
/// and until the planner sees it done it plans the same MEET every round.
const MEET_REPEAT: Duration = Duration::from_secs(1);

/// Requests that are not repeated while Redis may still be carrying out
/// the first: what each named, and when it was sent.
#[derive(Debug)]
struct Requested<K>(HashMap<K, Instant>);

impl<K: std::hash::Hash + Eq> Requested<K> {
    fn new() -> Self {
        Self(HashMap::new())
    }

    /// `key` was requested less than `within` ago.
    fn recent(&self, key: &K, within: Duration) -> bool {
        self.0.get(key).is_some_and(|at| at.elapsed() < within)
    }

    /// `key` was requested now; entries older than `within` are dropped.
    fn note(&mut self, key: K, within: Duration) {
        self.0.retain(|_, at| at.elapsed() < within);
        self.0.insert(key, Instant::now());
    }
}

/// Pause after the `n`-th failing round in a row: 100 ms doubling, at most 2 s.
pub fn error_backoff(n: u32) -> Duration {
    crate::backoff::doubling(Duration::from_millis(100), n, Duration::from_secs(2))
}

/// Timeout of the reconciler's commands: the probe timeout, at least 200 ms.
fn conn_timeout(tier: &TierConfig) -> Duration {
    tier.health.response_timeout.max(Duration::from_millis(200))
}

impl<P: NodePool> Reconciler<P> {
    /// A reconciler for `tier` on `pool`. It starts with no memory: its first
    /// round sees whatever the pool and the cluster hold.
    pub fn new(pool: Arc<P>, tier: TierConfig) -> Self {
        let conns = Conns::with_auth(conn_timeout(&tier), tier.auth.clone());
        let mut health = HealthMonitor::new(tier.health);
        health.set_auth(tier.auth.clone());
        let (status_tx, _) = watch::channel(None);
        Self {
            pool,
            tier,
            conns,
            health,
            sync: SyncTracker::default(),
            events: Events::default(),
            primaries: HashMap::new(),
            stuck: StuckSlots::default(),
            last_configs: std::collections::HashSet::new(),
            identities: HashMap::new(),
            graceful: Requested::new(),
            met: Requested::new(),
            status_tx,
        }
    }

    /// The desired tier.
    pub fn tier(&self) -> &TierConfig {
        &self.tier
    }

    /// Changes the desired tier; the next round works towards it.
    pub fn set_tier(&mut self, tier: TierConfig) {
        self.health.set_config(tier.health);
        self.health.set_auth(tier.auth.clone());
        // Keep the cached connections (e.g. mid-reshard) unless their timeout
        // or credentials change.
        if self.conns.timeout() != conn_timeout(&tier) || tier.auth != self.tier.auth {
            self.conns = Conns::with_auth(conn_timeout(&tier), tier.auth.clone());
        }
        self.tier = tier;
    }

    /// Receives every status this reconciler computes.
    pub fn subscribe(&self) -> watch::Receiver<Option<CacheTierStatus>> {
        self.status_tx.subscribe()
    }

    /// The latest probe results, by node address.
    pub fn health(&self) -> HashMap<SocketAddr, HealthRecord> {
        self.health.snapshot()
    }

    /// The pool this reconciler drives.
    pub fn pool(&self) -> &Arc<P> {
        &self.pool
    }

    /// Lists the pool, starts probing new nodes and observes the cluster.
    pub async fn observe(&mut self) -> Result<ClusterView> {
        let listing = self.pool.list().await?;
        self.follow_identities(&listing.nodes);
        let addrs: Vec<SocketAddr> = listing.nodes.iter().map(|n| n.addr).collect();
        self.health.track(&addrs);
        let keys: Vec<String> = settings::desired(&self.tier).into_keys().collect();
        Ok(observe(&mut self.conns, listing, &keys).await)
    }

    /// Health records and connections belong to a node (name and
    /// incarnation), not to an address: when an address now belongs to
    /// another node (a pod IP reused, a port handed out again), what was
    /// learned about the old one is dropped before anything reads it.
    fn follow_identities(&mut self, nodes: &[PoolNode]) {
        let now: HashMap<SocketAddr, (String, String)> = nodes
            .iter()
            .map(|n| (n.addr, (n.name.clone(), n.incarnation.clone())))
            .collect();
        for (addr, identity) in &now {
            if self.identities.get(addr).is_some_and(|before| before != identity) {
                debug!(tier = %self.tier.name, %addr, node = %identity.0, "address now belongs to another node");
                self.health.forget(*addr);
                self.conns.drop_connection(*addr);
            }
        }
        self.identities = now;
    }

    /// One round: observe, plan, publish the status, execute the plan (for
    /// at most [`ROUND_BUDGET`]).
    pub async fn round(&mut self) -> Result<Round> {
        let view = self.observe().await?;
        let now = Instant::now();
        let health = self.health.snapshot();
        self.sync.observe(&view, now);
        // One index of the observation for the plan, the status and the
        // failover record.
        let index = Index::new(&view, &health);
        self.notice_failovers(&index);
        self.forget_unstuck(&view);
        let plan = plan_with(
            PlanInput {
                tier: &self.tier,
                view: &view,
                health: &health,
                now,
            },
            &index,
        );
        let previous = self.status_tx.borrow().clone();
        let loops = self.sync.looping();
        let status = status::compute(StatusInput {
            tier: &self.tier,
            index: &index,
            plan: &plan,
            events: &self.events,
            sync_loops: &loops,
            previous: previous.as_ref(),
        });
        self.status_tx.send_replace(Some(status.clone()));

        let reach = Reach::from_view(&view);
        let started = Instant::now();
        let mut executed = 0;
        let mut error = None;
        // Nodes are requested in parallel (a 99-node tier should not wait for
        // 99 API calls one after another); a request returns at once and the
        // node is listed as pending until it runs, so nothing here waits for
        // a node to start.
        let creates: Vec<&Action> = plan
            .actions
            .iter()
            .filter(|a| matches!(a, Action::CreateNode { .. }))
            .collect();
        let creating = creates.iter().map(|a| {
            let pool = self.pool.clone();
            let tier = &self.tier;
            async move {
                let Action::CreateNode { shard, ordinal } = a else {
                    return Ok(());
                };
                info!(tier = %tier.name, "{a}");
                pool.ensure(tier, *shard, *ordinal).await
            }
        });
        for outcome in futures_util::future::join_all(creating).await {
            match outcome {
                Ok(()) => executed += 1,
                Err(e) => {
                    warn!(tier = %self.tier.name, error = %e, "requesting a node failed; will re-observe");
                    error = Some(e);
                }
            }
        }
        let mut configs = std::collections::HashSet::new();
        'steps: for action in plan
            .actions
            .iter()
            .filter(|a| !matches!(a, Action::CreateNode { .. }))
        {
            // A long migration is executed in small chunks so the budget applies.
            let steps: Vec<Action> = match action {
                Action::FinishMigration { slot, .. } if self.stuck.holds(*slot, now) => Vec::new(),
                Action::MigrateSlots { from, to, slots } => slots
                    .iter()
                    .copied()
                    .filter(|s| !self.stuck.holds(*s, now))
                    .collect::<Vec<u16>>()
                    .chunks(MIGRATE_CHUNK)
                    .map(|chunk| Action::MigrateSlots {
                        slots: chunk.to_vec(),
                        from: from.clone(),
                        to: to.clone(),
                    })
                    .collect(),
                other => vec![other.clone()],
            };
            for step in &steps {
                if started.elapsed() > ROUND_BUDGET {
                    break 'steps;
                }
                let graceful = match step {
                    Action::Failover {
                        to,
                        kind: FailoverKind::Graceful,
                        ..
                    } => Some(to.id.clone()),
                    _ => None,
                };
                if let Some(heir) = &graceful
                    && self.graceful.recent(heir, MANUAL_FAILOVER_TIMEOUT)
                {
                    debug!(tier = %self.tier.name, step = %step, "failover already requested; waiting for it");
                    continue;
                }
                let meet = match step {
                    Action::Meet { node, peer } => Some((*node, *peer)),
                    _ => None,
                };
                if let Some(pair) = &meet
                    && self.met.recent(pair, MEET_REPEAT)
                {
                    continue;
                }
                if !matches!(step, Action::MigrateSlots { .. } | Action::FinishMigration { .. }) {
                    info!(tier = %self.tier.name, "{step}");
                }
                // A setting Redis reports in another form than the spec would be
                // set again every round: the repeat is done but is not progress,
                // so the loop pauses instead of spinning.
                let config = matches!(step, Action::SetConfig { .. }).then(|| step.to_string());
                let repeat = config.as_ref().is_some_and(|c| self.last_configs.contains(c));
                if let Some(c) = config {
                    configs.insert(c);
                }
                match execute(self.pool.as_ref(), &mut self.conns, &self.tier, &reach, step).await {
                    Ok(Outcome { stuck }) => {
                        if let Some(heir) = graceful {
                            self.graceful.note(heir, MANUAL_FAILOVER_TIMEOUT);
                        }
                        if let Some(pair) = meet {
                            self.met.note(pair, MEET_REPEAT);
                        }
                        if repeat {
                            warn!(tier = %self.tier.name, step = %step, "setting still differs after CONFIG SET");
                        } else {
                            executed += 1;
                        }
                        self.events.executed(step);
                        for key in stuck {
                            self.stuck.record(key, Instant::now());
                        }
                        self.events.stuck_keys = self.stuck.keys();
                    }
                    // MEETs are independent of each other: one that fails
                    // does not stop the others, but none counts as progress.
                    Err(e) if matches!(step, Action::Meet { .. }) => {
                        debug!(tier = %self.tier.name, step = %step, error = %e, "meet failed");
                        error = Some(e);
                    }
                    Err(e) => {
                        warn!(tier = %self.tier.name, step = %step, error = %e, "step failed; will re-observe");
                        error = Some(e);
                        break 'steps;
                    }
                }
            }
        }
        self.last_configs = configs;
        Ok(Round {
            view,
            plan,
            status,
            executed,
            error,
        })
    }

    /// Drops stuck-key records of slots that are no longer open.
    fn forget_unstuck(&mut self, view: &ClusterView) {
        let open: Vec<u16> = view
            .nodes
            .iter()
            .filter_map(|v| v.reported())
            .flat_map(|r| r.myself.migrating.iter().map(|(s, _)| *s))
            .collect();
        self.stuck.keep_open(&open);
        self.events.stuck_keys = self.stuck.keys();
    }

    fn notice_failovers(&mut self, index: &Index<'_>) {
        let now = status::shard_primaries(index);
        for (shard, name) in &now {
            if let Some(before) = self.primaries.get(shard)
                && before != name
            {
                let recorded = self
                    .events
                    .last_failover
                    .as_ref()
                    .is_some_and(|f| f.shard == *shard as i32 && &f.to == name);
                if !recorded {
                    self.events.failover(*shard, before, name, "Automatic");
                }
            }
        }
        self.primaries.extend(now);
    }

    /// Runs rounds until the plan is empty and the tier is Ready, pausing
    /// briefly between rounds that only wait. Fails after `deadline`.
    pub async fn converge(&mut self, deadline: Duration) -> Result<CacheTierStatus> {
        let start = Instant::now();
        loop {
            let round = self.round().await?;
            if round.plan.is_converged() && round.status.phase == Some(Phase::Ready) {
                return Ok(round.status);
            }
            if start.elapsed() > deadline {
                return Err(Error::Deadline {
                    what: format!(
                        "tier {} did not converge (phase {:?}, plan {:?})",
                        self.tier.name, round.status.phase, round.plan
                    ),
                    waited: deadline,
                });
            }
            if round.executed == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Reconciles forever: rounds back to back while there is work, one every
    /// `timing.resync_interval` once converged. Takes tier changes from `tiers`.
    pub async fn run(&mut self, mut tiers: watch::Receiver<TierConfig>) {
        let mut failures = 0u32;
        loop {
            let latest = tiers.borrow_and_update().clone();
            if latest != self.tier {
                let tier = latest;
                info!(tier = %tier.name, shards = tier.shards, replicas = tier.replicas_per_shard, "spec changed");
                self.set_tier(tier);
            }
            let outcome = self.round().await;
            // A failed step is retried after a pause that doubles with every
            // failing round in a row, so it cannot make this loop spin.
            failures = match &outcome {
                Ok(r) if r.error.is_none() => 0,
                _ => failures.saturating_add(1),
            };
            let pause = match outcome {
                Ok(r) if r.error.is_some() => error_backoff(failures),
                Ok(r) if r.executed > 0 => Duration::ZERO,
                Ok(r) if r.plan.is_converged() => self.tier.timing.resync_interval,
                Ok(_) => Duration::from_millis(50),
                Err(e) => {
                    warn!(tier = %self.tier.name, error = %e, "round failed");
                    error_backoff(failures).max(Duration::from_millis(500))
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = tiers.changed() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_rounds_back_off_doubling_from_100_ms_up_to_2_s() {
        let pauses: Vec<u64> = (1..=8).map(|n| error_backoff(n).as_millis() as u64).collect();
        assert_eq!(pauses, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(error_backoff(u32::MAX), Duration::from_secs(2));
    }
}
