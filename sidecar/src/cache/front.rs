//! The front of the local cache: the entries that were hit lately, in a
//! plain map a hit reads with one lock and one probe. A moka read also
//! records the access for its eviction policy (a bounded channel, a
//! frequency sketch, housekeeping), which made a hit cost about a third of
//! the sidecar's instructions at `-P 16`.
//!
//! An entry here is a clone of moka's (the same value bytes and the same
//! [`Alive`] flag), so every invalidation, which clears the key's flags,
//! makes it unservable at once, exactly as it does moka's copy; its expiry
//! is the same instant. The front is bounded in entries and bytes and
//! emptied when full: hot keys come back on their next hit. Hits served
//! here are not seen by moka's policy, so moka may evict a hot key under
//! memory pressure while the front still serves it, at most
//! [`FRONT_BYTES`] beyond the cache's byte bound.

use super::*;

/// Most entries in the front.
pub(super) const FRONT_ENTRIES: usize = 1024;
/// Most value bytes in the front; larger values are served by moka only.
pub(super) const FRONT_BYTES: usize = 1 << 20;
const FRONT_VALUE_MAX: usize = 4096;

#[derive(Default)]
pub(super) struct Front {
    map: Mutex<FrontMap>,
}

#[derive(Default)]
struct FrontMap {
    entries: HashMap<CacheKey, Entry, ahash::RandomState>,
    bytes: usize,
}

impl Front {
    /// The key's value, if its entry is here and servable.
    pub(super) fn get(&self, key: &CacheKey, now: tokio::time::Instant) -> Option<Bytes> {
        let mut m = lock(&self.map);
        let e = m.entries.get(key)?;
        if e.servable_at(now) {
            return Some(e.value.clone());
        }
        if let Some(gone) = m.entries.remove(key) {
            m.bytes = m.bytes.saturating_sub(gone.value.len());
        }
        None
    }

    /// Keep a servable entry moka just hit.
    pub(super) fn offer(&self, key: &CacheKey, e: &Entry) {
        if e.value.len() > FRONT_VALUE_MAX {
            return;
        }
        let mut m = lock(&self.map);
        if m.entries.len() >= FRONT_ENTRIES || m.bytes + e.value.len() > FRONT_BYTES {
            m.entries.clear();
            m.bytes = 0;
        }
        // `key` is the request's (see `CacheKey::detached`); `e` is moka's.
        if let Some(old) = m.entries.insert(key.detached(), e.clone()) {
            m.bytes = m.bytes.saturating_sub(old.value.len());
        }
        m.bytes += e.value.len();
    }

    pub(super) fn clear(&self) {
        let mut m = lock(&self.map);
        m.entries.clear();
        m.bytes = 0;
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        lock(&self.map).entries.len()
    }
}
