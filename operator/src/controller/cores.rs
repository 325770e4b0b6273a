//! One cluster core per tier: a [`Reconciler`] over a [`KubePool`] in its own
//! task, fed spec changes through a watch channel, publishing the status it
//! computes. Kept by object reference; stopped when the tier is deleted or
//! this replica loses the lease (an aborted core is the core's crash-recovery
//! path: the next leader's core starts from a fresh observation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cachetier_crds::{CacheTier, CacheTierStatus};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::pool::KubePool;
use crate::cluster::error::Error;
use crate::cluster::{Reconciler, TierConfig};

#[derive(Debug)]
struct Core {
    pool: Arc<KubePool>,
    spec: watch::Sender<TierConfig>,
    status: watch::Receiver<Option<CacheTierStatus>>,
    task: JoinHandle<()>,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The cores of every tier this replica leads.
#[derive(Debug, Default)]
pub struct Cores {
    running: Mutex<HashMap<ObjectRef<CacheTier>, Core>>,
    swept: Mutex<Vec<ObjectRef<CacheTier>>>,
}

impl Cores {
    /// Starts the tier's core if it has none, hands it the current spec, and
    /// returns the latest status it computed (none before its first round).
    pub fn ensure(&self, client: kube::Client, tier: &CacheTier) -> Result<Option<CacheTierStatus>, Error> {
        let config = TierConfig::from_tier(tier)?;
        let key = ObjectRef::from_obj(tier);
        let mut running = crate::controller::lock(&self.running);
        if let Some(core) = running.get(&key).filter(|c| !c.task.is_finished()) {
            core.pool.update(tier.clone());
            core.spec.send_if_modified(|current| {
                let changed = *current != config;
                *current = config.clone();
                changed
            });
            return Ok(core.status.borrow().clone());
        }
        let pool = Arc::new(KubePool::new(client, tier.clone()));
        let mut reconciler = Reconciler::new(pool.clone(), config.clone());
        let status = reconciler.subscribe();
        let (spec, specs) = watch::channel(config);
        let task = tokio::spawn(async move { reconciler.run(specs).await });
        running.insert(
            key,
            Core {
                pool,
                spec,
                status,
                task,
            },
        );
        Ok(None)
    }

    /// Stops the tier's core.
    pub fn stop(&self, key: &ObjectRef<CacheTier>) {
        crate::controller::lock(&self.running).remove(key);
    }

    /// Stops every core at once (the lease was lost).
    pub fn stop_all(&self) {
        crate::controller::lock(&self.running).clear();
    }

    /// Stops the cores of tiers not in `alive` (deleted while we were not looking).
    pub fn retain(&self, alive: &[ObjectRef<CacheTier>]) {
        let mut swept = Vec::new();
        crate::controller::lock(&self.running).retain(|k, _| {
            let keep = alive.contains(k);
            if !keep {
                swept.push(k.clone());
            }
            keep
        });
        crate::controller::lock(&self.swept).extend(swept);
    }

    /// The tiers [`Cores::retain`] stopped since the last call.
    pub fn stopped_since_last_sweep(&self) -> Vec<ObjectRef<CacheTier>> {
        std::mem::take(&mut *crate::controller::lock(&self.swept))
    }

    /// How many cores run.
    pub fn len(&self) -> usize {
        crate::controller::lock(&self.running).len()
    }

    /// Whether none runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
