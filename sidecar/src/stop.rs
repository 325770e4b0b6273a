//! The shutdown signal the accept loop and every client connection wait on.
//!
//! A client task polls it each time it waits, so once per request when the
//! client does not pipeline. tokio's `watch::Receiver::changed` takes a
//! lock on every poll; here a poll that finds nothing new costs an atomic
//! load and a waker comparison, and the lock is taken only when the task's
//! waker changes (in practice once per connection).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::lock;

#[derive(Debug, Default)]
pub struct Stop {
    stopped: AtomicBool,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    next_id: u64,
    wakers: HashMap<u64, Waker>,
}

impl Stop {
    pub fn new() -> Arc<Stop> {
        Arc::new(Stop::default())
    }

    /// Stop: every waiter's [`Stopped`] resolves, now and from now on.
    pub fn trigger(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = lock(&self.waiters).wakers.drain().map(|(_, w)| w).collect();
        for w in wakers {
            w.wake();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// A future that resolves once [`Stop::trigger`] has been called. Keep it
    /// (pinned) for as long as it is waited on: each new one registers anew.
    pub fn stopped(self: &Arc<Self>) -> Stopped {
        Stopped {
            stop: self.clone(),
            id: None,
            registered: None,
        }
    }
}

#[derive(Debug)]
pub struct Stopped {
    stop: Arc<Stop>,
    /// This waiter's key in `waiters`, once it has registered.
    id: Option<u64>,
    /// The waker last registered, to tell whether the task's has changed.
    registered: Option<Waker>,
}

impl Future for Stopped {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.stop.is_stopped() {
            return Poll::Ready(());
        }
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let this = &mut *self;
        {
            let mut waiters = lock(&this.stop.waiters);
            let id = *this.id.get_or_insert_with(|| {
                waiters.next_id += 1;
                waiters.next_id
            });
            waiters.wakers.insert(id, cx.waker().clone());
        }
        this.registered = Some(cx.waker().clone());
        // `trigger` may have drained the waiters just before this one was
        // inserted; it set the flag first, so the flag says so now.
        if this.stop.is_stopped() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.stop.waiters).wakers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_waiter_wakes_on_trigger_and_later_ones_resolve_at_once() {
        let stop = Stop::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = stop.clone();
                tokio::spawn(async move { s.stopped().await })
            })
            .collect();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            waiters.iter().all(|w| !w.is_finished()),
            "resolved before the trigger"
        );
        stop.trigger();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("a waiter was not woken")
                .expect("waiter panicked");
        }
        tokio::time::timeout(Duration::from_millis(10), stop.stopped())
            .await
            .expect("a waiter made after the trigger did not resolve");
    }

    #[tokio::test]
    async fn a_dropped_waiter_leaves_no_waker_behind() {
        let stop = Stop::new();
        let mut fut = Box::pin(stop.stopped());
        for _ in 0..2 {
            // Polled twice by the same task: one registration.
            let pending = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_pending())).await;
            assert!(pending);
        }
        assert_eq!(lock(&stop.waiters).wakers.len(), 1);
        drop(fut);
        assert!(lock(&stop.waiters).wakers.is_empty());
    }
}
