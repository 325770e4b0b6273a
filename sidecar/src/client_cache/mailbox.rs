//! One tracking client's queue of feed messages: filled by the hub (only
//! with what concerns the client), emptied by the client's task, which
//! is woken only when something is put in.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use super::Invalidation;

/// Feed messages a client may fall behind by before it is sent a flush.
pub(super) const BACKLOG: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct Mailbox(Mutex<Inbox>);

#[derive(Debug, Default)]
struct Inbox {
    queue: VecDeque<Invalidation>,
    /// More than [`BACKLOG`] came unread: what is queued was dropped, and
    /// the client is to drop everything it cached.
    lagged: bool,
    waker: Option<Waker>,
}

/// What the client takes out of its mailbox.
#[derive(Debug)]
pub(super) enum Taken {
    Message(Invalidation),
    /// It fell more than [`BACKLOG`] messages behind.
    Lagged,
}

impl Mailbox {
    pub(super) fn put(&self, inv: Invalidation) {
        let waker = {
            let mut inbox = crate::lock(&self.0);
            if inbox.lagged {
                // The flush it will take covers this too.
                return;
            }
            if inbox.queue.len() >= BACKLOG {
                inbox.queue = VecDeque::new();
                inbox.lagged = true;
            } else {
                inbox.queue.push_back(inv);
            }
            inbox.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(super) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Taken> {
        let mut inbox = crate::lock(&self.0);
        if std::mem::take(&mut inbox.lagged) {
            return Poll::Ready(Taken::Lagged);
        }
        if let Some(inv) = inbox.queue.pop_front() {
            return Poll::Ready(Taken::Message(inv));
        }
        match &inbox.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
