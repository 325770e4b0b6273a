//! Per-client execution order: a client's commands take effect in the order
//! it sent them, as on one Redis server, although they run as concurrent
//! futures over shared upstream connections, a spawned cache fill, the
//! WATCH connection and split per-slot parts.
//!
//! Every command that leaves the sidecar holds a [`Turn`]: a link in a chain
//! to the client's previous such command. A command may send its request
//! once its predecessor is [`Stage::Done`] (replied, and so has everything
//! before it), or when the predecessor is [`Stage::Sent`] on the very
//! upstream connection this command is about to use: one connection
//! executes in the order it is written to. Anything else (another node,
//! another connection, a split or a fan-out) waits for the predecessor's
//! reply. Reads need no order among themselves: a run of reads spreads over
//! replicas freely ([`Stage::ReadsSent`]). Pipelines to one node therefore
//! stay pipelined, and nothing can overtake a command on another path.
//!
//! A read retried on another node after a failure could observe a write the
//! client sent after it; such a retry is refused instead
//! ([`Turn::later_write_sent`]).
//!
//! This module does no I/O: it only orders.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::Instant;

use crate::written::RecentWrites;
pub use crate::written::{ReadFloor, Unreplicated};

/// How far a command has got, as its successor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not sent yet, or sending again after a redirect or a retry.
    Waiting,
    /// Its request is queued on upstream connection `id`, and every earlier
    /// command of the client is either done or queued before it there.
    Sent(u64),
    /// A read that is queued somewhere, and every earlier command is either
    /// done or such a read: reads need no order among themselves, so a read
    /// after it may go anywhere; a write must wait for it to be done.
    ReadsSent,
    /// Replied, and so has every earlier command.
    Done,
}

impl Stage {
    fn encode(self) -> u64 {
        match self {
            Stage::Waiting => 0,
            Stage::ReadsSent => 1,
            Stage::Done => 2,
            Stage::Sent(conn) => conn.saturating_add(3),
        }
    }

    fn decode(v: u64) -> Stage {
        match v {
            0 => Stage::Waiting,
            1 => Stage::ReadsSent,
            2 => Stage::Done,
            conn => Stage::Sent(conn - 3),
        }
    }
}

/// One turn's [`Stage`], published to whoever follows it: the next turn of
/// its client and, for a shared cache fill, the fill's askers. Every command
/// has one, so it costs one allocation, and a change nobody waits for costs
/// one atomic store (no lock, no wake-up).
#[derive(Debug, Default)]
struct StageCell {
    stage: AtomicU64,
    /// Set (under the lock) while `wakers` may be non-empty.
    has_waiters: AtomicBool,
    wakers: std::sync::Mutex<Vec<Waker>>,
}

impl StageCell {
    fn set(&self, stage: Stage) {
        self.stage.store(stage.encode(), Ordering::SeqCst);
        // SeqCst on both sides: if this load misses a waiter's flag, that
        // waiter's re-check of `stage` (made after setting the flag) comes
        // after our store in the single SeqCst order, so it sees the stage.
        if self.has_waiters.load(Ordering::SeqCst) {
            let wakers = {
                let mut w = crate::lock(&self.wakers);
                self.has_waiters.store(false, Ordering::SeqCst);
                std::mem::take(&mut *w)
            };
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

/// A handle on a turn's stage: read it, or wait until it satisfies a
/// condition. A turn dropped without finishing counts as [`Stage::Done`]
/// (its client has gone).
#[derive(Debug, Clone)]
pub struct StageRx(Arc<StageCell>);

impl StageRx {
    pub fn get(&self) -> Stage {
        Stage::decode(self.0.stage.load(Ordering::SeqCst))
    }

    /// Wait until the stage satisfies `pred`.
    pub async fn wait_for(&self, pred: impl Fn(Stage) -> bool) {
        std::future::poll_fn(|cx| {
            if pred(self.get()) {
                return Poll::Ready(());
            }
            {
                let mut w = crate::lock(&self.0.wakers);
                // A future polled again while it waits (a `join!` sibling
                // woke it) registers once; a waker whose future went away
                // stays until the next change, which wakes it for nothing.
                if !w.iter().any(|k| k.will_wake(cx.waker())) {
                    w.push(cx.waker().clone());
                }
                self.0.has_waiters.store(true, Ordering::SeqCst);
            }
            if pred(self.get()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// What all of one client's turns share.
#[derive(Debug, Default)]
pub struct ClientOrder {
    /// Sequence number of the latest write of this client that was sent.
    last_write_sent: AtomicU64,
    next_seq: AtomicU64,
    /// Slots this client wrote lately, for read-your-writes routing.
    writes: RecentWrites,
    /// Every read goes to a primary (`CLIENT TRACKING` is on: a replica's
    /// value may be older than an invalidation the client was sent).
    primary_reads: AtomicBool,
}

/// Marks slots written while alive (see [`ClientOrder::writing`]).
#[derive(Debug)]
pub struct WriteMark {
    client: Arc<ClientOrder>,
    /// The first slot, and any others (a single-slot write, the common
    /// case, allocates nothing).
    first: u16,
    rest: Vec<u16>,
    /// Already ended by [`WriteMark::end_at`].
    ended: bool,
}

impl WriteMark {
    fn slots(&self) -> impl Iterator<Item = u16> + '_ {
        std::iter::once(self.first).chain(self.rest.iter().copied())
    }

    /// The write was answered by `now` (a clock read the caller shares
    /// among replies; no earlier than this reply's arrival).
    pub fn end_at(mut self, now: Instant) {
        self.client.writes.end(self.slots(), now);
        self.ended = true;
    }
}

impl Drop for WriteMark {
    fn drop(&mut self) {
        if !self.ended {
            self.client.writes.end(self.slots(), Instant::now());
        }
    }
}

/// Runs once, at the moment a turn's request is queued upstream.
type OnSent = Box<dyn FnOnce() + Send>;

/// One command's place in its client's order.
pub struct Turn {
    seq: u64,
    prev: Option<StageRx>,
    me: StageRx,
    client: Arc<ClientOrder>,
    /// The command's reads go to primaries (its client's, when the turn
    /// was taken: a tracked read of a tracking client).
    primary_reads: bool,
    on_sent: std::sync::Mutex<Option<OnSent>>,
    /// `on_sent` holds something: most turns have nothing to run, and a
    /// plain load is cheaper than the lock.
    has_on_sent: AtomicBool,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("seq", &self.seq)
            .field("stage", &self.me.get())
            .finish()
    }
}

impl ClientOrder {
    /// A write of `slots` is about to be sent; the mark ends it when dropped
    /// (after the reply, or when the client goes away).
    /// `slots` must not be empty (a keyed write has a key).
    pub fn writing(self: &Arc<Self>, slots: &[u16]) -> WriteMark {
        let first = slots.first().copied().unwrap_or_default();
        let mut rest: Vec<u16> = Vec::new();
        if slots.iter().any(|&s| s != first) {
            rest = slots.iter().copied().filter(|&s| s != first).collect();
            rest.sort_unstable();
            rest.dedup();
        }
        let mark = WriteMark {
            client: self.clone(),
            first,
            rest,
            ended: false,
        };
        self.writes.begin(mark.slots());
        mark
    }

    /// Whether the reads of the client's next command go to a primary.
    pub fn primary_reads(&self) -> bool {
        self.primary_reads.load(Ordering::Relaxed)
    }

    /// Set before the client's next command takes its turn.
    pub fn set_primary_reads(&self, on: bool) {
        self.primary_reads.store(on, Ordering::Relaxed);
    }

    /// What a read of `slot` must see, if this client wrote it lately.
    pub fn read_floor(&self, slot: u16) -> Option<ReadFloor> {
        self.writes.read_floor(slot)
    }

    /// Every replica of `slot` has caught up past `floor`.
    pub fn forget(&self, slot: u16, floor: ReadFloor) {
        self.writes.forget(slot, floor);
    }

    /// Where this client's writes may not be on every replica yet.
    pub fn unreplicated(&self) -> Unreplicated {
        self.writes.unreplicated()
    }

    #[cfg(test)]
    fn tracked_slots(&self) -> usize {
        self.writes.tracked_slots()
    }

    /// The next turn after `last` (the previous turn's stage, if any);
    /// returns the turn and the receiver the next command will wait on.
    pub fn next(self: &Arc<Self>, last: Option<StageRx>) -> (Turn, StageRx) {
        let prev = last.filter(|p| p.get() != Stage::Done);
        let me = StageRx(Arc::new(StageCell::default()));
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
        (
            Turn {
                seq,
                prev,
                me: me.clone(),
                client: self.clone(),
                primary_reads: self.primary_reads(),
                on_sent: std::sync::Mutex::new(None),
                has_on_sent: AtomicBool::new(false),
            },
            me,
        )
    }
}

impl Turn {
    /// A turn with nothing before it and no client (a cache fill shared by
    /// several clients, or a part of a command already ordered as a whole).
    pub fn detached() -> (Turn, StageRx) {
        Arc::new(ClientOrder::default()).next(None)
    }

    /// The turn's predecessor was a command without upstream work after all:
    /// hand its predecessor back so the chain stays intact.
    pub fn into_prev(mut self) -> Option<StageRx> {
        self.prev.take()
    }

    fn prev_stage(&self) -> Stage {
        self.prev.as_ref().map_or(Stage::Done, StageRx::get)
    }

    /// May this command's request (a write, or a read) be queued on
    /// connection `conn` now?
    pub fn may_send_on(&self, conn: u64, write: bool) -> bool {
        match self.prev_stage() {
            Stage::Done => true,
            Stage::Sent(c) => c == conn,
            Stage::ReadsSent => !write,
            Stage::Waiting => false,
        }
    }

    pub fn prev_is_done(&self) -> bool {
        self.prev_stage() == Stage::Done
    }

    /// Is everything before this turn done or a read already sent?
    pub fn only_reads_before(&self) -> bool {
        matches!(self.prev_stage(), Stage::Done | Stage::ReadsSent)
    }

    /// Wait until every earlier command of the client has its reply. A
    /// dropped predecessor (its client is gone) counts as done.
    pub async fn prev_done(&mut self) {
        if let Some(p) = self.prev.take() {
            p.wait_for(|s| s == Stage::Done).await;
        }
    }

    /// Wait until the predecessor has at least been sent.
    pub async fn prev_sent(&mut self) {
        if let Some(p) = self.prev.as_ref() {
            p.wait_for(|s| s != Stage::Waiting).await;
        }
    }

    /// Run `f` when the request is queued (a write invalidates the local
    /// cache's entries there: every earlier command has been sent, so their
    /// fills have taken their epochs, and nothing later has looked yet).
    pub fn on_sent(&self, f: impl FnOnce() + Send + 'static) {
        *crate::lock(&self.on_sent) = Some(Box::new(f));
        self.has_on_sent.store(true, Ordering::Release);
    }

    /// The request (a write, or a read) was queued on connection `conn`.
    pub fn sent(&self, conn: u64, write: bool) {
        if self.has_on_sent.load(Ordering::Acquire)
            && let Some(f) = crate::lock(&self.on_sent).take()
        {
            f();
        }
        let stage = match self.prev_stage() {
            Stage::Done | Stage::ReadsSent if !write => Stage::ReadsSent,
            _ => Stage::Sent(conn),
        };
        self.me.0.set(stage);
    }

    /// Take the predecessor's stage as ours: a command answered without
    /// upstream work at this point of the order (a cache hit).
    pub fn same_as_prev(&self) {
        let s = self.prev_stage();
        if s != Stage::Done {
            self.me.0.set(s);
        }
    }

    /// About to send again (redirect, retry): successors must wait for us.
    pub fn resending(&self) {
        self.me.0.set(Stage::Waiting);
    }

    /// A write of this turn is about to be queued.
    pub fn note_write(&self) {
        self.client.last_write_sent.fetch_max(self.seq, Ordering::SeqCst);
    }

    /// Has a write sent after this command already been queued? Then a
    /// retry of this read elsewhere might observe it.
    pub fn later_write_sent(&self) -> bool {
        self.client.last_write_sent.load(Ordering::SeqCst) > self.seq
    }

    /// A turn for one part of this command (a split's per-slot request):
    /// the same place in the order and client, nothing before it, since the
    /// whole command is ordered by this turn.
    pub fn part(&self) -> Turn {
        Turn {
            seq: self.seq,
            prev: None,
            me: StageRx(Arc::new(StageCell::default())),
            client: self.client.clone(),
            primary_reads: self.primary_reads,
            on_sent: std::sync::Mutex::new(None),
            has_on_sent: AtomicBool::new(false),
        }
    }

    pub fn client(&self) -> &Arc<ClientOrder> {
        &self.client
    }

    /// Whether this command's reads go to primaries.
    pub fn primary_reads(&self) -> bool {
        self.primary_reads
    }

    /// The command has its reply: done once everything before it is.
    pub async fn finish(mut self) {
        self.prev_done().await;
        self.me.0.set(Stage::Done);
    }
}

impl Drop for Turn {
    /// A turn that goes away unfinished (its client went away, or its
    /// command needed no upstream work) holds nobody up.
    fn drop(&mut self) {
        if self.me.get() != Stage::Done {
            self.me.0.set(Stage::Done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_turn_may_share_only_its_predecessors_connection_until_that_is_done() {
        let client = Arc::new(ClientOrder::default());
        let (first, rx) = client.next(None);
        let (mut second, _rx2) = client.next(Some(rx));
        assert!(!second.may_send_on(7, true), "predecessor not sent yet");
        first.sent(7, true);
        assert!(second.may_send_on(7, true));
        assert!(
            !second.may_send_on(8, false),
            "another connection could overtake it"
        );
        first.finish().await;
        assert!(second.may_send_on(8, true));
        second.prev_done().await;
    }

    #[tokio::test]
    async fn reads_spread_freely_but_a_write_waits_for_the_reads_before_it() {
        let client = Arc::new(ClientOrder::default());
        let (r1, rx1) = client.next(None);
        let (r2, rx2) = client.next(Some(rx1));
        let (w, _) = client.next(Some(rx2));
        r1.sent(1, false);
        assert!(
            r2.may_send_on(2, false),
            "a read after a read may use another node"
        );
        r2.sent(2, false);
        assert!(!w.may_send_on(2, true), "a write waits until the reads are done");
        r1.finish().await;
        r2.finish().await;
        assert!(w.may_send_on(3, true));
    }

    #[tokio::test]
    async fn a_read_knows_when_a_later_write_was_sent() {
        let client = Arc::new(ClientOrder::default());
        let (read, rx) = client.next(None);
        let (write, _) = client.next(Some(rx));
        assert!(!read.later_write_sent());
        write.note_write();
        assert!(read.later_write_sent());
        assert!(!write.later_write_sent());
    }

    #[tokio::test]
    async fn a_part_writes_at_its_commands_place_not_after_the_commands_behind_it() {
        let client = Arc::new(ClientOrder::default());
        let (whole, rx) = client.next(None);
        let (later_read, _) = client.next(Some(rx));
        whole.part().note_write();
        assert!(
            !later_read.later_write_sent(),
            "the split write came before the read"
        );
    }

    #[test]
    fn a_written_slot_needs_the_primary_until_the_write_is_replied_then_a_caught_up_replica() {
        let client = Arc::new(ClientOrder::default());
        assert_eq!(client.read_floor(7), None);
        let mark = client.writing(&[7, 7]);
        assert_eq!(client.read_floor(7), Some(ReadFloor::Pending));
        drop(mark);
        let Some(floor @ ReadFloor::RepliedAt(_)) = client.read_floor(7) else {
            panic!("a replied write sets a floor");
        };
        client.forget(7, floor);
        assert_eq!(client.read_floor(7), None);
    }

    #[test]
    fn a_write_ended_at_a_shared_clock_read_keeps_that_instant_and_ends_once() {
        let client = Arc::new(ClientOrder::default());
        let first = client.writing(&[7]);
        let second = client.writing(&[7]);
        let at = Instant::now();
        first.end_at(at);
        // One of the two writes is still in flight.
        assert_eq!(client.read_floor(7), Some(ReadFloor::Pending));
        second.end_at(at);
        // Ending again on drop would have moved the floor to a later clock
        // read (or taken away a later write's pending count).
        assert_eq!(client.read_floor(7), Some(ReadFloor::RepliedAt(at)));
    }

    #[test]
    fn a_client_writing_every_slot_keeps_a_bounded_record_and_every_floor() {
        let client = Arc::new(ClientOrder::default());
        let pending = client.writing(&[3]);
        let before = Instant::now();
        for slot in 0..16384 {
            drop(client.writing(&[slot]));
        }
        assert!(
            client.tracked_slots() <= crate::written::TRACKED_SLOTS,
            "{} slots tracked",
            client.tracked_slots()
        );
        // Forgotten or not, no written slot may be read from a replica that
        // has not caught up past its write, and the one in flight needs
        // the primary.
        for slot in (0..16384).filter(|&s| s != 3) {
            match client.read_floor(slot) {
                Some(ReadFloor::RepliedAt(at)) => assert!(at >= before, "slot {slot}"),
                other => panic!("slot {slot}: {other:?}"),
            }
        }
        assert_eq!(client.read_floor(3), Some(ReadFloor::Pending));
        drop(pending);
    }

    #[tokio::test]
    async fn a_waiting_successor_wakes_when_its_predecessor_is_sent_then_done() {
        let client = Arc::new(ClientOrder::default());
        let (first, rx) = client.next(None);
        let (mut second, _) = client.next(Some(rx));
        let waiter = tokio::spawn(async move {
            second.prev_sent().await;
            let sent = second.prev_stage();
            second.prev_done().await;
            sent
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing was sent yet");
        first.sent(4, true);
        first.finish().await;
        let sent = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        assert!(matches!(sent, Stage::Sent(4) | Stage::Done), "{sent:?}");
    }

    #[test]
    fn every_stage_survives_its_encoding() {
        for s in [
            Stage::Waiting,
            Stage::ReadsSent,
            Stage::Done,
            Stage::Sent(0),
            Stage::Sent(1),
            Stage::Sent(1 << 40),
        ] {
            assert_eq!(Stage::decode(s.encode()), s);
        }
    }

    #[tokio::test]
    async fn a_finished_or_dropped_predecessor_is_not_waited_for() {
        let client = Arc::new(ClientOrder::default());
        let (first, rx) = client.next(None);
        first.finish().await;
        let (second, rx2) = client.next(Some(rx));
        assert!(second.prev_is_done());
        drop(second);
        let (mut third, _) = client.next(Some(rx2));
        third.prev_done().await;
        assert!(third.prev_is_done());
    }
}
