//! The slots one client wrote lately, for read-your-writes routing: a read
//! of such a slot must not go to a replica that may lack the write.
//!
//! A slot's record ends when a read of it finds every replica caught up
//! ([`RecentWrites::forget`]). A client that writes many slots and reads few
//! of them back (random keys) would otherwise keep a record of every slot
//! it ever wrote, up to 16384 per connection: at `-P 16` the lookups in
//! such maps (50 clients, 26 MB) took 31 % of the sidecar's CPU. So at most
//! [`TRACKED_SLOTS`] replied writes keep a record of their own; when that
//! fills, they are folded into one floor for every slot without a record
//! (the latest of their reply instants), which asks more of a replica than
//! each slot's own floor did, never less. Writes still in flight always keep
//! their record (bounded by the client's requests in flight).
//!
//! This module does no I/O.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::lock;

/// Replied writes with a record of their own, per client.
pub const TRACKED_SLOTS: usize = 64;

/// What a read of a slot this client wrote must see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFloor {
    /// A write of the slot is in flight: only the primary will have it.
    Pending,
    /// A replica must hold everything its primary had at this instant
    /// (`Node::caught_up_since`), which includes the write.
    RepliedAt(Instant),
}

/// The slots where a write of this client may not be on every replica yet
/// (what `WAIT` must wait for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreplicated {
    /// These slots (none: every write of the client is on every replica).
    Slots(Vec<u16>),
    /// Records were folded: any slot may be.
    Any,
}

#[derive(Debug, Default)]
pub struct RecentWrites {
    inner: Mutex<Inner>,
    /// Something is recorded (kept under `inner`'s lock): a read of a
    /// client that wrote nothing lately does not take the lock.
    any: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    /// At most one entry per slot.
    slots: HashMap<u16, Written, SlotHash>,
    /// The floor of every slot without an entry, once records were folded.
    older: Option<Instant>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Written {
    /// Writes of the slot sent and not yet replied.
    pending: u32,
    /// When the latest reply arrived.
    replied: Option<Instant>,
}

impl Inner {
    /// Fold every replied record into `older`, if the records are full.
    fn make_room(&mut self) {
        if self.slots.len() < TRACKED_SLOTS {
            return;
        }
        let mut older = self.older;
        self.slots.retain(|_, w| {
            if w.pending > 0 {
                return true;
            }
            older = older.max(w.replied);
            false
        });
        self.older = older;
    }
}

impl RecentWrites {
    /// Writes of `slots` are about to be sent.
    pub fn begin(&self, slots: impl Iterator<Item = u16>) {
        let mut inner = lock(&self.inner);
        for s in slots {
            if !inner.slots.contains_key(&s) {
                inner.make_room();
            }
            inner.slots.entry(s).or_default().pending += 1;
        }
        self.mark_any();
    }

    /// The writes of `slots` begun earlier were answered (or abandoned) at
    /// `now`.
    pub fn end(&self, slots: impl Iterator<Item = u16>, now: Instant) {
        let mut inner = lock(&self.inner);
        for s in slots {
            // Present: an entry with a write in flight is never folded.
            let w = inner.slots.entry(s).or_default();
            w.pending = w.pending.saturating_sub(1);
            w.replied = Some(now);
        }
        self.mark_any();
    }

    /// Only changed under `inner`'s lock, held by the caller: already true
    /// needs no (costly) sequentially consistent store.
    fn mark_any(&self) {
        if !self.any.load(Ordering::Relaxed) {
            self.any.store(true, Ordering::SeqCst);
        }
    }

    /// What a read of `slot` must see, if this client wrote it lately.
    pub fn read_floor(&self, slot: u16) -> Option<ReadFloor> {
        if !self.any.load(Ordering::SeqCst) {
            return None;
        }
        let inner = lock(&self.inner);
        // A slot's own entry is later than `older` (which holds only
        // writes folded before it was written again).
        match inner.slots.get(&slot) {
            Some(w) if w.pending > 0 => Some(ReadFloor::Pending),
            Some(w) => w.replied.map(ReadFloor::RepliedAt),
            None => inner.older.map(ReadFloor::RepliedAt),
        }
    }

    /// Every replica of `slot` has caught up past `floor`, read from
    /// [`Self::read_floor`] (the folded floor is shared by every slot, so
    /// it stays).
    pub fn forget(&self, slot: u16, floor: ReadFloor) {
        let mut inner = lock(&self.inner);
        if let Some(w) = inner.slots.get(&slot)
            && w.pending == 0
            && w.replied.map(ReadFloor::RepliedAt) == Some(floor)
        {
            inner.slots.remove(&slot);
            let any = !inner.slots.is_empty() || inner.older.is_some();
            self.any.store(any, Ordering::SeqCst);
        }
    }

    /// Where this client's writes may not be on every replica yet: a
    /// record ends only once every replica caught up past it.
    pub fn unreplicated(&self) -> Unreplicated {
        let inner = lock(&self.inner);
        if inner.older.is_some() {
            return Unreplicated::Any;
        }
        let mut slots: Vec<u16> = inner.slots.keys().copied().collect();
        slots.sort_unstable();
        Unreplicated::Slots(slots)
    }

    #[cfg(test)]
    pub fn tracked_slots(&self) -> usize {
        lock(&self.inner).slots.len()
    }
}

/// Hashes a slot number with one multiplication. The keys are slot numbers,
/// at most 16384 distinct ones, so a client choosing its keys cannot flood a
/// bucket the way it could with strings: SipHash buys nothing here.
#[derive(Debug, Default, Clone, Copy)]
struct SlotHash;

impl std::hash::BuildHasher for SlotHash {
    type Hasher = SlotHasher;
    fn build_hasher(&self) -> SlotHasher {
        SlotHasher(0)
    }
}

#[derive(Debug)]
struct SlotHasher(u64);

impl std::hash::Hasher for SlotHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing spreads the bits to the top, where the table
        // takes its control bits from.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_keeps_writes_in_flight_and_raises_the_shared_floor_only() {
        let w = RecentWrites::default();
        w.begin([1].into_iter());
        let t0 = Instant::now();
        for s in 2..(1 + TRACKED_SLOTS as u16) {
            w.begin([s].into_iter());
            w.end([s].into_iter(), t0);
        }
        // Full (slot 1 and 63 replied): the next new slot folds the replied ones.
        w.begin([9000].into_iter());
        assert_eq!(w.tracked_slots(), 2, "slot 1 (in flight) and 9000");
        assert_eq!(w.read_floor(1), Some(ReadFloor::Pending));
        assert_eq!(w.read_floor(9000), Some(ReadFloor::Pending));
        assert_eq!(w.read_floor(5), Some(ReadFloor::RepliedAt(t0)));
        assert_eq!(
            w.read_floor(12345),
            Some(ReadFloor::RepliedAt(t0)),
            "never written: the shared floor"
        );
        // The shared floor is not forgotten by one slot's read.
        w.forget(5, ReadFloor::RepliedAt(t0));
        assert_eq!(w.read_floor(5), Some(ReadFloor::RepliedAt(t0)));
        let t1 = Instant::now();
        w.end([9000].into_iter(), t1);
        assert_eq!(w.read_floor(9000), Some(ReadFloor::RepliedAt(t1)));
        w.forget(9000, ReadFloor::RepliedAt(t1));
        assert_eq!(w.read_floor(9000), Some(ReadFloor::RepliedAt(t0)));
        assert_eq!(w.unreplicated(), Unreplicated::Any, "folded: any slot");
    }

    #[test]
    fn unreplicated_slots_are_the_recorded_ones_until_every_replica_caught_up() {
        let w = RecentWrites::default();
        assert_eq!(w.unreplicated(), Unreplicated::Slots(vec![]));
        let t0 = Instant::now();
        w.begin([7, 3].into_iter());
        assert_eq!(w.unreplicated(), Unreplicated::Slots(vec![3, 7]), "in flight");
        w.end([7, 3].into_iter(), t0);
        assert_eq!(w.unreplicated(), Unreplicated::Slots(vec![3, 7]), "replied");
        w.forget(3, ReadFloor::RepliedAt(t0));
        assert_eq!(
            w.unreplicated(),
            Unreplicated::Slots(vec![7]),
            "slot 3 is on every replica"
        );
    }
}
