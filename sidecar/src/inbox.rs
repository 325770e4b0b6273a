//! A client connection's inbox: where upstream connection readers drop the
//! replies of the client's requests that were sent straight from its task
//! (the direct path of `router/direct.rs`), tagged with their place in the
//! client's pipeline.
//!
//! One inbox per client instead of one channel per request: a reply costs a
//! lock and a push, and a batch of replies read at once wakes the client
//! once (the waker is taken by the first push and put back when the client
//! next finds the inbox empty). This module does no I/O.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::error::UpstreamError;
use crate::lock;

/// One reply (or the failure that stands for it) and its pipeline position.
pub type Delivery = (u64, Result<Bytes, UpstreamError>);

#[derive(Debug, Default)]
pub struct Inbox {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    replies: Vec<Delivery>,
    waker: Option<Waker>,
    /// The client has gone: later replies are dropped on arrival, not kept
    /// (a client that went away with a long pipeline in flight would
    /// otherwise have every reply held until the last one arrived).
    closed: bool,
}

impl Inbox {
    /// Deliver every reply of `replies` (emptied), in order, and wake the
    /// client; dropped if it has gone.
    pub fn push_all(&self, replies: &mut Vec<Delivery>) {
        let waker = {
            let mut s = lock(&self.state);
            if s.closed {
                replies.clear();
                return;
            }
            s.replies.append(replies);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The client has gone: drop what was delivered and whatever arrives.
    pub fn close(&self) {
        let dropped = {
            let mut s = lock(&self.state);
            s.closed = true;
            s.waker = None;
            std::mem::take(&mut s.replies)
        };
        drop(dropped);
    }

    /// Move every delivered reply into `into` (ready), or register to be
    /// woken by the next delivery (pending).
    pub fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<Delivery>) -> Poll<()> {
        let mut s = lock(&self.state);
        if s.replies.is_empty() {
            if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        std::mem::swap(&mut s.replies, into);
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_waiting_client_is_woken_by_a_delivery_and_takes_the_whole_batch() {
        let inbox = Arc::new(Inbox::default());
        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                std::future::poll_fn(|cx| inbox.poll_take(cx, &mut got)).await;
                got
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing delivered yet");
        inbox.push_all(&mut vec![(7, Ok(Bytes::from_static(b"+OK\r\n")))]);
        inbox.push_all(&mut vec![(8, Err(UpstreamError::Timeout))]);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(got.len(), 2, "both deliveries");
        assert_eq!(got[0].0, 7);
        assert_eq!(got[1], (8, Err(UpstreamError::Timeout)));
    }

    #[test]
    fn a_closed_inbox_keeps_nothing() {
        let inbox = Inbox::default();
        inbox.push_all(&mut vec![(1, Ok(Bytes::from_static(b"+OK\r\n")))]);
        inbox.close();
        inbox.push_all(&mut vec![(2, Ok(Bytes::from_static(b"+OK\r\n")))]);
        assert!(lock(&inbox.state).replies.is_empty());
    }
}
