//! Which tracking client wants which key, as Redis's tracking table: a feed
//! message wakes only the clients that read one of its keys (measured
//! before: each tracking client's task woke for every write to the tier,
//! about 1 500 instructions per write per client; then, with a count per
//! key, every client for each write of a key any of them read;
//! BENCHMARKS.md, 2026-12-07).
//!
//! A default-mode client is entered for each key while it remembers it;
//! a `BCAST` client wants every key under its prefixes (all of them for
//! `BCAST` alone, whose one prefix is "").
//! A key is entered before the read that names it is sent, so an
//! invalidation of a write that could make that read stale, which the
//! node sends only after running the read, always finds it.
//!
//! Keys are entered by a 64-bit hash of their name, not a copy: two keys
//! that share one only wake a client that remembers one of them, which
//! then finds the other is not its own and sends nothing for it.
//!
//! Messages are put in the mailboxes under the table's lock (the clients
//! are woken after it), so no message for a key can miss a client that
//! entered it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use bytes::Bytes;

use super::Invalidation;
use super::mailbox::Mailbox;

/// A tracking client's number in the table (reused once it is gone).
pub(super) type Id = usize;

/// A table this much larger than its entries is given back (a cleared
/// client's keys leave it).
const SHRINK_AT: usize = 4;

#[derive(Debug, Default)]
pub(super) struct Watched {
    table: Mutex<Table>,
    hasher: RandomState,
    /// Tests: every key has the same hash.
    #[cfg(test)]
    pub(super) collide: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Table {
    /// Per client id, its mailbox (`None`: a free id).
    clients: Vec<Option<Arc<Mailbox>>>,
    free: Vec<Id>,
    live: usize,
    /// Per key hash, the default-mode clients remembering the key: a
    /// 24-byte entry in a table up to twice the size it needs (about 30
    /// to 55 bytes a distinct key, more for a key several clients read),
    /// beyond what the clients count (its name and `ENTRY_BYTES`, 64):
    /// less again than the hub's budget.
    keys: HashMap<u64, Owners>,
    /// `BCAST` clients, and the prefixes each wants ("": every key).
    bcast: Vec<(Id, Vec<Bytes>)>,
}

/// The clients of one key hash, in id order (an id twice for a client
/// that remembers two keys of the same hash).
#[derive(Debug)]
// Boxed, a thin pointer: the value stays 16 bytes for the common `One`.
#[allow(clippy::box_collection)]
enum Owners {
    One(Id),
    Many(Box<Vec<Id>>),
}

impl Owners {
    fn ids(&self) -> &[Id] {
        match self {
            Owners::One(id) => std::slice::from_ref(id),
            Owners::Many(ids) => ids,
        }
    }

    fn add(&mut self, id: Id) {
        match self {
            Owners::One(only) => {
                let pair = if *only <= id {
                    vec![*only, id]
                } else {
                    vec![id, *only]
                };
                *self = Owners::Many(Box::new(pair));
            }
            Owners::Many(ids) => {
                let at = ids.partition_point(|&i| i <= id);
                ids.insert(at, id);
            }
        }
    }

    /// Drop one entry of `id`; whether any are left.
    fn remove(&mut self, id: Id) -> bool {
        match self {
            Owners::One(only) => *only != id,
            Owners::Many(ids) => {
                if let Ok(at) = ids.binary_search(&id) {
                    ids.remove(at);
                }
                if let [only] = ids[..] {
                    *self = Owners::One(only);
                }
                !self.ids().is_empty()
            }
        }
    }
}

impl Table {
    fn mailbox(&self, id: Id) -> Option<&Arc<Mailbox>> {
        self.clients.get(id)?.as_ref()
    }
}

impl Watched {
    /// A client starts tracking (a `BCAST` one: with these prefixes): its id.
    pub(super) fn join(&self, mailbox: Arc<Mailbox>, bcast: Option<&[Bytes]>) -> Id {
        let mut t = crate::lock(&self.table);
        let id = match t.free.pop() {
            Some(id) => {
                t.clients[id] = Some(mailbox);
                id
            }
            None => {
                t.clients.push(Some(mailbox));
                t.clients.len() - 1
            }
        };
        t.live += 1;
        if let Some(prefixes) = bcast {
            t.bcast.push((id, prefixes.to_vec()));
        }
        id
    }

    /// `BCAST` client `id` now wants these prefixes.
    pub(super) fn set_prefixes(&self, id: Id, prefixes: &[Bytes]) {
        let mut t = crate::lock(&self.table);
        if let Some((_, p)) = t.bcast.iter_mut().find(|(b, _)| *b == id) {
            *p = prefixes.to_vec();
        }
    }

    /// A client stopped tracking (it has unwatched every key it watched).
    pub(super) fn leave(&self, id: Id) {
        let mut t = crate::lock(&self.table);
        if let Some(slot) = t.clients.get_mut(id)
            && slot.take().is_some()
        {
            t.live -= 1;
            t.free.push(id);
            t.bcast.retain(|(b, _)| *b != id);
        }
    }

    /// How many clients track.
    pub(super) fn clients(&self) -> usize {
        crate::lock(&self.table).live
    }

    pub(super) fn watch<'a>(&self, id: Id, keys: impl IntoIterator<Item = &'a Bytes>) {
        let mut t = crate::lock(&self.table);
        for k in keys {
            let h = self.hash(k);
            t.keys
                .entry(h)
                .and_modify(|o| o.add(id))
                .or_insert(Owners::One(id));
        }
    }

    pub(super) fn unwatch<'a>(&self, id: Id, keys: impl IntoIterator<Item = &'a Bytes>) {
        let mut t = crate::lock(&self.table);
        for k in keys {
            let h = self.hash(k);
            if let Some(owners) = t.keys.get_mut(&h)
                && !owners.remove(id)
            {
                t.keys.remove(&h);
            }
        }
        if t.keys.capacity() > 1024 && t.keys.len() * SHRINK_AT < t.keys.capacity() {
            let len = t.keys.len();
            t.keys.shrink_to(2 * len);
        }
    }

    /// Put `inv` in every client's mailbox.
    pub(super) fn to_all(&self, inv: Invalidation) {
        let wakers: Vec<Waker> = {
            let t = crate::lock(&self.table);
            t.clients.iter().flatten().filter_map(|m| m.put(&inv)).collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Put in each client's mailbox the keys of `keys` it wants. They are
    /// copied: the feed's names are slices of its read buffer, which a
    /// pending key would keep alive.
    pub(super) fn deliver(&self, keys: &[Bytes]) {
        if keys.is_empty() {
            return;
        }
        let mut wakers: Vec<Waker> = Vec::new();
        {
            let t = crate::lock(&self.table);
            // Each key copied once, when someone wants it.
            let mut copies: Vec<Option<Bytes>> = vec![None; keys.len()];
            let mut copy = |i: usize| {
                copies[i]
                    .get_or_insert_with(|| Bytes::copy_from_slice(&keys[i]))
                    .clone()
            };
            // Each BCAST client, the keys under its prefixes (so a large
            // write elsewhere does not fill its mailbox); one list shared
            // by those that want every key (`BCAST` alone: prefix "").
            let mut all: Option<Invalidation> = None;
            for (id, prefixes) in &t.bcast {
                let Some(mailbox) = t.mailbox(*id) else {
                    continue;
                };
                let inv = if prefixes.is_empty() || prefixes.iter().any(|p| p.is_empty()) {
                    (all.get_or_insert_with(|| Invalidation::Keys((0..keys.len()).map(&mut copy).collect())))
                        .clone()
                } else {
                    let mine: Arc<[Bytes]> = (0..keys.len())
                        .filter(|&i| prefixes.iter().any(|p| keys[i].starts_with(p)))
                        .map(&mut copy)
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    Invalidation::Keys(mine)
                };
                wakers.extend(mailbox.put(&inv));
            }
            let mut each: BTreeMap<Id, Vec<Bytes>> = BTreeMap::new();
            for (i, k) in keys.iter().enumerate() {
                let Some(owners) = t.keys.get(&self.hash(k)) else {
                    continue;
                };
                let k = copy(i);
                let mut last = None;
                for &id in owners.ids() {
                    if last != Some(id) {
                        each.entry(id).or_default().push(k.clone());
                        last = Some(id);
                    }
                }
            }
            for (id, keys) in each {
                if let Some(mailbox) = t.mailbox(id) {
                    wakers.extend(mailbox.put(&Invalidation::Keys(keys.into())));
                }
            }
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    fn hash(&self, key: &[u8]) -> u64 {
        #[cfg(test)]
        if self.collide.load(std::sync::atomic::Ordering::Relaxed) {
            return 0;
        }
        self.hasher.hash_one(key)
    }

    /// How many distinct key hashes are watched.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        crate::lock(&self.table).keys.len()
    }
}
