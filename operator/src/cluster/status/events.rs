//! What the status remembers between rounds (sync-loop detection, the most
//! recent events) and who is each shard's primary.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use cachetier_crds::{EvictionRecord, FailoverRecord};
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::cluster::index::Index;
use crate::cluster::plan::{Action, FailoverKind, Removal};
use crate::cluster::view::ClusterView;

/// Condition type: some replica keeps restarting its full sync.
pub const CONDITION_SYNC_LOOP: &str = "SyncLoop";

/// Full-sync restarts within [`SYNC_LOOP_WINDOW`] that count as a loop.
pub const SYNC_LOOP_RESTARTS: usize = 3;
/// Window of sync-loop detection.
pub const SYNC_LOOP_WINDOW: Duration = Duration::from_secs(600);

/// Remembers when each replica started a full sync, to detect a replica whose
/// sync keeps restarting (replication buffers too small for the write rate).
#[derive(Debug, Default)]
pub struct SyncTracker {
    syncing: HashMap<String, bool>,
    starts: HashMap<String, VecDeque<Instant>>,
}

impl SyncTracker {
    /// Records one observation made at `now`.
    pub fn observe(&mut self, view: &ClusterView, now: Instant) {
        for v in &view.nodes {
            let Some(r) = v.reported() else { continue };
            let syncing = r.myself.replica && r.repl.sync_in_progress;
            let was = self.syncing.insert(v.pool.name.clone(), syncing).unwrap_or(false);
            if syncing && !was {
                self.starts.entry(v.pool.name.clone()).or_default().push_back(now);
            }
        }
        for starts in self.starts.values_mut() {
            while starts
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > SYNC_LOOP_WINDOW)
            {
                starts.pop_front();
            }
        }
        self.starts
            .retain(|name, s| !s.is_empty() && self.syncing.contains_key(name));
    }

    /// Replicas that started a full sync [`SYNC_LOOP_RESTARTS`] times or more
    /// within the window, with the count.
    pub fn looping(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .starts
            .iter()
            .filter(|(_, s)| s.len() >= SYNC_LOOP_RESTARTS)
            .map(|(n, s)| (n.clone(), s.len()))
            .collect();
        out.sort();
        out
    }
}

/// What happened recently, recorded by the reconciler as it happened.
#[derive(Debug, Default, Clone)]
pub struct Events {
    /// The most recent failover.
    pub last_failover: Option<FailoverRecord>,
    /// The most recent eviction.
    pub last_eviction: Option<EvictionRecord>,
    /// Keys that could not be moved; their slots stay open until they can.
    pub stuck_keys: Vec<crate::cluster::execute::StuckKey>,
}

/// RFC 3339 time of now.
pub fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

impl Events {
    /// Records a failover that the operator executed, or saw Redis do.
    pub fn failover(&mut self, shard: u32, from: &str, to: &str, reason: &str) {
        self.last_failover = Some(FailoverRecord {
            time: now_rfc3339(),
            shard: i32::try_from(shard).unwrap_or(i32::MAX),
            from: from.to_string(),
            to: to.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Records what an executed action means for the status.
    pub fn executed(&mut self, action: &Action) {
        match action {
            Action::Failover {
                shard,
                from,
                to,
                kind,
                ..
            } => {
                let reason = match kind {
                    FailoverKind::Takeover => "Forced",
                    FailoverKind::Graceful => "Planned",
                };
                self.failover(*shard, from, &to.name, reason);
            }
            Action::DestroyNode {
                name,
                shard,
                reason: Removal::Evicted { failed_for },
                ..
            } => {
                self.last_eviction = Some(EvictionRecord {
                    time: now_rfc3339(),
                    shard: i32::try_from(*shard).unwrap_or(i32::MAX),
                    node: name.clone(),
                    reason: format!("Failed for {failed_for:?}"),
                });
            }
            _ => {}
        }
    }
}

/// Name of the node owning the most slots in each shard: the shard's primary.
pub fn shard_primaries(index: &Index<'_>) -> HashMap<u32, String> {
    index
        .pool_shards()
        .into_iter()
        .filter_map(|shard| Some((shard, index.slot_owner_of(shard)?.pool.name.clone())))
        .collect()
}
