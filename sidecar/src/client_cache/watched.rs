//! The keys some tracking client of the sidecar wants invalidations for,
//! so the feeds pass on only those: a write nobody read wakes no tracking
//! client (measured before: each tracking client's task woke for every
//! write to the tier, about 1 500 instructions per write per client;
//! BENCHMARKS.md, 2026-12-07).
//!
//! A default-mode client's keys are counted while it remembers them; while
//! any `BCAST` client tracks, every key passes (it wants them by prefix).
//! A key is counted before the read that names it is sent, so an
//! invalidation of a write that could make that read stale, which the
//! node sends only after running the read, always finds it.
//!
//! Keys are counted by a 64-bit hash of their name, not a copy: two keys
//! that share one only wake the trackers, which then find neither among
//! their own and send nothing.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// A table this much larger than its entries is given back (a cleared
/// tracker's keys leave it).
const SHRINK_AT: usize = 4;

#[derive(Debug, Default)]
pub(super) struct Watched {
    /// Per key hash, how many trackers remember the key. About 20 bytes a
    /// distinct key, beyond what the trackers count (`ENTRY_BYTES`, 64 a
    /// key): at most a third more than the hub's budget.
    keys: Mutex<HashMap<u64, u32>>,
    hasher: RandomState,
    /// `BCAST` trackers alive.
    bcast: AtomicUsize,
}

impl Watched {
    pub(super) fn watch<'a>(&self, keys: impl IntoIterator<Item = &'a Bytes>) {
        let mut watched = crate::lock(&self.keys);
        for k in keys {
            *watched.entry(self.hasher.hash_one(k.as_ref())).or_default() += 1;
        }
    }

    pub(super) fn unwatch<'a>(&self, keys: impl IntoIterator<Item = &'a Bytes>) {
        let mut watched = crate::lock(&self.keys);
        for k in keys {
            let h = self.hasher.hash_one(k.as_ref());
            if let Some(n) = watched.get_mut(&h) {
                *n -= 1;
                if *n == 0 {
                    watched.remove(&h);
                }
            }
        }
        if watched.capacity() > 1024 && watched.len() * SHRINK_AT < watched.capacity() {
            let len = watched.len();
            watched.shrink_to(2 * len);
        }
    }

    pub(super) fn bcast_started(&self) {
        // Seen by the feed's thread before the client's next read is sent.
        self.bcast.fetch_add(1, Ordering::Release);
    }

    pub(super) fn bcast_ended(&self) {
        self.bcast.fetch_sub(1, Ordering::Release);
    }

    /// The keys of `keys` some tracker wants.
    pub(super) fn wanted(&self, keys: Vec<Bytes>) -> Vec<Bytes> {
        if self.bcast.load(Ordering::Acquire) > 0 {
            return keys;
        }
        let watched = crate::lock(&self.keys);
        (keys.into_iter())
            .filter(|k| watched.contains_key(&self.hasher.hash_one(k.as_ref())))
            .collect()
    }

    /// How many distinct keys are watched.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        crate::lock(&self.keys).len()
    }
}
