//! One tracking client's pending feed messages: filled by the hub (only
//! with what concerns the client), emptied by the client's task, which is
//! woken only when something is put in.
//!
//! What is pending is kept merged, not as a list of messages: the keys to
//! invalidate (each once) and which of the hub-wide messages came. The
//! order between them does not matter to the client: it takes everything
//! pending before it reads on, a key it no longer remembers is a no-op,
//! and a flush invalidates whatever it remembers. So a client that does
//! not read (whose pushes wait) holds at most its own remembered keys
//! here, which the hub's budgets already bound, not a message per write.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::Invalidation;

/// Keys a client may have pending before it is sent a flush instead (a
/// `BCAST` client, whose keys are every key written under its prefixes,
/// or one that stopped reading).
pub(super) const BACKLOG: usize = 4096;

/// Pending keys checked one by one for a repeat; past this many, by a set.
const SCAN_KEYS: usize = 32;

#[derive(Debug, Default)]
pub(super) struct Mailbox(Mutex<Inbox>);

#[derive(Debug, Default)]
struct Inbox {
    keys: Vec<Bytes>,
    /// The pending keys, once there are more than [`SCAN_KEYS`].
    index: Option<HashSet<Bytes>>,
    flushed: bool,
    unseen: bool,
    shed: bool,
    /// More than [`BACKLOG`] keys came unread: they were dropped, and the
    /// client is to drop everything it cached.
    lagged: bool,
    waker: Option<Waker>,
}

/// What the client takes out of its mailbox.
#[derive(Debug)]
pub(super) enum Taken {
    Message(Invalidation),
    /// It fell more than [`BACKLOG`] keys behind.
    Lagged,
}

impl Mailbox {
    /// Put `inv` in; returns the client's waker, to be woken once the
    /// caller has let go of its own locks.
    #[must_use]
    pub(super) fn put(&self, inv: &Invalidation) -> Option<Waker> {
        let mut inbox = crate::lock(&self.0);
        match inv {
            // The flush it will take covers everything.
            _ if inbox.lagged => return None,
            Invalidation::Keys(keys) => inbox.add(keys),
            Invalidation::Flushed => inbox.flushed = true,
            Invalidation::Unseen => inbox.unseen = true,
            Invalidation::Shed => inbox.shed = true,
        }
        inbox.waker.take()
    }

    pub(super) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Taken> {
        let mut inbox = crate::lock(&self.0);
        if let Some(taken) = inbox.take() {
            return Poll::Ready(taken);
        }
        match &inbox.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Inbox {
    fn add(&mut self, keys: &[Bytes]) {
        for k in keys {
            let repeat = match &mut self.index {
                Some(index) => !index.insert(k.clone()),
                None => self.keys.contains(k),
            };
            if repeat {
                continue;
            }
            self.keys.push(k.clone());
            if self.keys.len() > BACKLOG {
                self.keys = Vec::new();
                self.index = None;
                self.lagged = true;
                return;
            }
            if self.index.is_none() && self.keys.len() > SCAN_KEYS {
                self.index = Some(self.keys.iter().cloned().collect());
            }
        }
    }

    /// The next thing pending, the hub-wide messages first.
    fn take(&mut self) -> Option<Taken> {
        if std::mem::take(&mut self.lagged) {
            return Some(Taken::Lagged);
        }
        let inv = if std::mem::take(&mut self.flushed) {
            Invalidation::Flushed
        } else if std::mem::take(&mut self.unseen) {
            Invalidation::Unseen
        } else if std::mem::take(&mut self.shed) {
            Invalidation::Shed
        } else if !self.keys.is_empty() {
            self.index = None;
            let keys: Arc<[Bytes]> = std::mem::take(&mut self.keys).into();
            Invalidation::Keys(keys)
        } else {
            return None;
        };
        Some(Taken::Message(inv))
    }
}
