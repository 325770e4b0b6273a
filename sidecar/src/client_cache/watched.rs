//! The keys some tracking client of the sidecar wants invalidations for,
//! so the feeds pass on only those: a write nobody read wakes no tracking
//! client (measured before: each tracking client's task woke for every
//! write to the tier, about 1 400 instructions per write per client;
//! BENCHMARKS.md, 2026-12-07).
//!
//! A default-mode client's keys are counted while it remembers them; while
//! any `BCAST` client tracks, every key passes (it wants them by prefix).
//! A key is counted before the read that names it is sent, so an
//! invalidation of a write that could make that read stale, which the
//! node sends only after running the read, always finds it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

#[derive(Debug, Default)]
pub(super) struct Watched {
    /// Per key, how many trackers remember it. Its entries cost about 48
    /// bytes per distinct key beyond what the trackers count
    /// (`ENTRY_BYTES`): bounded with theirs.
    keys: Mutex<HashMap<Bytes, u32>>,
    /// `BCAST` trackers alive.
    bcast: AtomicUsize,
}

impl Watched {
    pub(super) fn watch<'a>(&self, keys: impl IntoIterator<Item = &'a Bytes>) {
        let mut watched = crate::lock(&self.keys);
        for k in keys {
            *watched.entry(k.clone()).or_default() += 1;
        }
    }

    pub(super) fn unwatch<'a>(&self, keys: impl IntoIterator<Item = &'a Bytes>) {
        let mut watched = crate::lock(&self.keys);
        for k in keys {
            if let Some(n) = watched.get_mut(k.as_ref()) {
                *n -= 1;
                if *n == 0 {
                    watched.remove(k.as_ref());
                }
            }
        }
    }

    pub(super) fn bcast_started(&self) {
        self.bcast.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn bcast_ended(&self) {
        self.bcast.fetch_sub(1, Ordering::Relaxed);
    }

    /// The keys of `keys` some tracker wants.
    pub(super) fn wanted(&self, keys: Vec<Bytes>) -> Vec<Bytes> {
        if self.bcast.load(Ordering::Relaxed) > 0 {
            return keys;
        }
        let watched = crate::lock(&self.keys);
        keys.into_iter()
            .filter(|k| watched.contains_key(k.as_ref()))
            .collect()
    }

    /// How many distinct keys are watched.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        crate::lock(&self.keys).len()
    }
}
