//! Slots left open because a key in them could not be moved, and when to try
//! each again.
//!
//! A key fails to move for lasting reasons (a value too large for the
//! destination's `proto-max-bulk-len`, or for `MIGRATE`'s timeout) and for
//! passing ones (a timeout while a node is briefly busy, a dropped
//! connection, a destination that does not know the slot map yet). The
//! executor cannot tell them apart, so a slot is tried again after a backoff
//! that starts short and doubles with every failure: a passing failure costs
//! about a second (it used to stop the reshard for a fixed minute: the
//! planner finishes open slots before it moves others), and a lasting one
//! costs one `MIGRATE` timeout per minute at most, not one per round.
//!
//! The record of a slot stays while the slot is open, so the status keeps
//! reporting the key between attempts. This module does no I/O.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::execute::StuckKey;

/// Wait before the first retry of a slot whose key did not move.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Longest wait between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Wait after the `attempts`-th failure in a row: 1 s doubling, at most 60 s.
pub fn retry_after(attempts: u32) -> Duration {
    crate::backoff::doubling(FIRST_RETRY, attempts, MAX_RETRY)
}

#[derive(Debug)]
struct Stuck {
    key: StuckKey,
    attempts: u32,
    retry_at: Instant,
}

/// The open slots whose key did not move, by slot.
#[derive(Debug, Default)]
pub struct StuckSlots {
    slots: HashMap<u16, Stuck>,
}

impl StuckSlots {
    /// `key` did not move at `now` (again, if its slot has a record).
    pub fn record(&mut self, key: StuckKey, now: Instant) {
        let attempts = self.slots.get(&key.slot).map_or(0, |s| s.attempts) + 1;
        let retry_at = now + retry_after(attempts);
        self.slots.insert(
            key.slot,
            Stuck {
                key,
                attempts,
                retry_at,
            },
        );
    }

    /// Should work on `slot` wait at `now`?
    pub fn holds(&self, slot: u16, now: Instant) -> bool {
        self.slots.get(&slot).is_some_and(|s| now < s.retry_at)
    }

    /// Forget every slot that is no longer open.
    pub fn keep_open(&mut self, open: &[u16]) {
        self.slots.retain(|slot, _| open.contains(slot));
    }

    /// The keys that did not move, for the status (by slot).
    pub fn keys(&self) -> Vec<StuckKey> {
        let mut keys: Vec<StuckKey> = self.slots.values().map(|s| s.key.clone()).collect();
        keys.sort_by_key(|k| k.slot);
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: u16) -> StuckKey {
        StuckKey {
            slot,
            key: format!("k{slot}"),
            error: "IOERR".into(),
        }
    }

    #[test]
    fn a_slot_whose_key_failed_once_is_tried_again_after_a_second_not_a_minute() {
        let mut stuck = StuckSlots::default();
        let t0 = Instant::now();
        stuck.record(key(7), t0);
        assert!(stuck.holds(7, t0 + Duration::from_millis(900)));
        assert!(!stuck.holds(7, t0 + Duration::from_millis(1001)));
        assert!(!stuck.holds(8, t0), "only the stuck slot waits");
    }

    #[test]
    fn each_failure_in_a_row_doubles_the_wait_up_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        let mut stuck = StuckSlots::default();
        let t0 = Instant::now();
        stuck.record(key(7), t0);
        let t1 = t0 + Duration::from_secs(1);
        stuck.record(key(7), t1);
        assert!(stuck.holds(7, t1 + Duration::from_millis(1900)));
        assert!(!stuck.holds(7, t1 + Duration::from_secs(2)));
    }

    #[test]
    fn the_record_stays_while_the_slot_is_open_and_goes_with_it() {
        let mut stuck = StuckSlots::default();
        let t0 = Instant::now();
        stuck.record(key(9), t0);
        stuck.record(key(7), t0);
        stuck.keep_open(&[7, 9]);
        let slots: Vec<u16> = stuck.keys().iter().map(|k| k.slot).collect();
        assert_eq!(slots, [7, 9], "reported between attempts too");
        stuck.keep_open(&[9]);
        let slots: Vec<u16> = stuck.keys().iter().map(|k| k.slot).collect();
        assert_eq!(slots, [9]);
        // A slot that closed and fails again later starts from the short wait.
        stuck.record(key(7), t0);
        assert!(!stuck.holds(7, t0 + Duration::from_millis(1001)));
    }
}
