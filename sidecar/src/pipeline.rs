//! One client connection's outstanding replies, in the order it sent the
//! requests. A reply is filled in by whoever produces it: the router at
//! once (a local answer), a future (the awaited paths), or the client's
//! inbox (a command sent directly, `router/direct.rs`); the connection
//! writes replies out from the front as soon as they are there.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::inbox::{Delivery, Inbox};
use crate::order::Turn;
use crate::router::{Action, ClientMetrics, Direct, Outcome, Place, ReplyFuture, Router};

enum Entry {
    /// A future of `futures` will fill it.
    Running,
    /// As `Running`, for a command that waits on other clients
    /// (`Action::Blocking`); `tracked`: it is a read whose keys the
    /// client's tracking remembered (`XREAD … BLOCK`).
    Blocking { tracked: bool },
    /// Sent directly; its reply comes through the inbox.
    Direct(Direct),
    /// The reply, and the command's turn, which ends (lets commands that
    /// wait for it go) once the reply leaves in order.
    Ready(Bytes, Option<Turn>),
}

/// A future and its position, so a reply finds its entry.
struct Tagged {
    seq: u64,
    fut: ReplyFuture,
}

impl Future for Tagged {
    type Output = (u64, Bytes);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(u64, Bytes)> {
        let seq = self.seq;
        self.fut.as_mut().poll(cx).map(|b| (seq, b))
    }
}

#[derive(Default)]
pub struct Pipeline {
    /// Position of `entries[0]`.
    base: u64,
    entries: VecDeque<Entry>,
    futures: FuturesUnordered<Tagged>,
    inbox: Arc<Inbox>,
    delivered: Vec<Delivery>,
    /// The client's command metrics, published when its task waits.
    metrics: ClientMetrics,
    /// When the bytes of the requests being parsed arrived: their
    /// latency's start (one clock read per read, not per request).
    arrived: Option<Instant>,
    /// Positions whose replies are dropped (`CLIENT REPLY`), oldest first.
    silent: VecDeque<u64>,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.inbox.close();
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("base", &self.base)
            .field("entries", &self.entries.len())
            .field("futures", &self.futures.len())
            .finish()
    }
}

impl Pipeline {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes from the client arrived now (returned).
    pub fn arrived_now(&mut self) -> Instant {
        let now = Instant::now();
        self.arrived = Some(now);
        now
    }

    /// When the requests being parsed arrived (their latency's start).
    pub fn arrived(&mut self) -> Instant {
        *self.arrived.get_or_insert_with(Instant::now)
    }

    /// Where the next request's reply goes, for a command sent directly.
    pub fn place(&mut self) -> Place<'_> {
        let arrived = self.arrived();
        Place {
            inbox: &self.inbox,
            seq: self.base + self.entries.len() as u64,
            arrived,
        }
    }

    /// Queue the reply of the next request, as the router decided it.
    /// Returns false when the connection is to close after it (QUIT).
    pub fn push(&mut self, action: Action) -> bool {
        match action {
            Action::Reply(b) => self.push_reply(b),
            Action::Close(b) => {
                self.push_reply(b);
                return false;
            }
            Action::Later(fut) => self.push_future(fut, false),
            Action::Blocking(fut) => self.push_future(fut, true),
            Action::Direct(d) => self.entries.push_back(Entry::Direct(d)),
        }
        true
    }

    /// The reply of the request queued last is dropped when its turn to
    /// leave comes (`CLIENT REPLY OFF` or `SKIP`); the command still runs.
    pub fn silence_last(&mut self) {
        if let Some(last) = (self.base + self.entries.len() as u64).checked_sub(1) {
            self.silent.push_back(last);
        }
    }

    pub fn push_reply(&mut self, b: Bytes) {
        self.entries.push_back(Entry::Ready(b, None));
    }

    fn push_future(&mut self, fut: ReplyFuture, blocking: bool) {
        let seq = self.base + self.entries.len() as u64;
        self.entries.push_back(if blocking {
            Entry::Blocking { tracked: false }
        } else {
            Entry::Running
        });
        self.futures.push(Tagged { seq, fut });
    }

    /// The client's command metrics (`flush` them before waiting).
    pub fn metrics(&mut self) -> &mut ClientMetrics {
        &mut self.metrics
    }

    /// The oldest unanswered request is a command waiting on other clients
    /// (a blocking command, `WAIT`).
    pub fn front_is_blocking(&self) -> bool {
        matches!(self.entries.front(), Some(Entry::Blocking { .. }))
    }

    /// The request queued last read keys the client's tracking remembered.
    pub fn tracked_last(&mut self) {
        if let Some(Entry::Blocking { tracked }) = self.entries.back_mut() {
            *tracked = true;
        }
    }

    /// Every unanswered request is a command waiting on other clients
    /// whose keys are not tracked (`BLPOP`, a write; `WAIT`): no reply the
    /// client waits for can carry a value an invalidation sent now covers.
    pub fn waits_only_on_others(&self) -> bool {
        (self.entries.iter()).all(|e| matches!(e, Entry::Blocking { tracked: false }))
    }

    /// The front reply, if it is there.
    pub fn pop_ready(&mut self) -> Option<Bytes> {
        if !matches!(self.entries.front(), Some(Entry::Ready(..))) {
            return None;
        }
        let Some(Entry::Ready(reply, turn)) = self.entries.pop_front() else {
            return None;
        };
        let seq = self.base;
        self.base += 1;
        drop(turn);
        if self.silent.front() == Some(&seq) {
            self.silent.pop_front();
            return Some(Bytes::new());
        }
        Some(reply)
    }

    /// Wait until the front reply is there (replies behind it fill in
    /// meanwhile).
    pub async fn front_ready(&mut self, router: &Arc<Router>) {
        std::future::poll_fn(|cx| self.poll_front(cx, router)).await
    }

    fn poll_front(&mut self, cx: &mut Context<'_>, router: &Arc<Router>) -> Poll<()> {
        loop {
            let mut progressed = false;
            if self.inbox.poll_take(cx, &mut self.delivered).is_ready() {
                let mut delivered = std::mem::take(&mut self.delivered);
                // Every reply taken here arrived by now: one clock read
                // for their latencies and read-your-writes marks.
                let now = Instant::now();
                for (seq, result) in delivered.drain(..) {
                    self.delivered_one(router, seq, result, now);
                }
                self.delivered = delivered;
                progressed = true;
            }
            // An empty `FuturesUnordered` still registers the waker when
            // polled; most clients never have a future.
            while !self.futures.is_empty()
                && let Poll::Ready(Some((seq, reply))) = self.futures.poll_next_unpin(cx)
            {
                if let Some(e) = self.entry(seq) {
                    *e = Entry::Ready(reply, None);
                }
                progressed = true;
            }
            if matches!(self.entries.front(), Some(Entry::Ready(..))) {
                return Poll::Ready(());
            }
            // New futures from the inbox's deliveries have not been polled.
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    fn delivered_one(
        &mut self,
        router: &Arc<Router>,
        seq: u64,
        result: Result<Bytes, crate::error::UpstreamError>,
        now: Instant,
    ) {
        let Some(entry) = self.entry(seq) else {
            return;
        };
        let Entry::Direct(d) = std::mem::replace(entry, Entry::Running) else {
            return;
        };
        match router.direct_delivered(d, result, &mut self.metrics, now) {
            Outcome::Reply(reply, turn) => {
                if let Some(e) = self.entry(seq) {
                    *e = Entry::Ready(reply, Some(turn));
                }
            }
            Outcome::Resume(fut) => self.futures.push(Tagged { seq, fut }),
        }
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.entries.get_mut(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> Action {
        Action::Blocking(Box::pin(std::future::pending()))
    }

    #[test]
    fn only_blocking_commands_whose_keys_are_not_tracked_let_pushes_pass() {
        let mut p = Pipeline::default();
        assert!(p.waits_only_on_others(), "nothing to wait for");
        // BLPOP (a write) or WAIT.
        p.push(waiting());
        assert!(p.waits_only_on_others());
        // XREAD … BLOCK of a tracked stream: its reply may carry entries
        // older than an invalidation sent now.
        p.push(waiting());
        p.tracked_last();
        assert!(!p.waits_only_on_others());
        let mut q = Pipeline::default();
        q.push(waiting());
        q.push_reply(Bytes::from_static(b"+OK\r\n"));
        assert!(!q.waits_only_on_others(), "a reply behind it waits too");
    }
}
