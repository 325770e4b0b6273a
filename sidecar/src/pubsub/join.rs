//! Keyspace mirror links the upkeep opens in the background
//! ([`super::keyspace`]): a primary that joined the cluster, or a replica
//! promoted, after the client subscribed. Opening one never holds up the
//! client: its connection is made while the client's other links keep
//! delivering, and a node that accepts TCP and never answers costs that
//! node's mirror only. A link passes three stages:
//!
//! 1. connecting: the TCP connect and handshake, polled with the client's
//!    other links;
//! 2. connected: waiting for the client's subscription confirmations to be
//!    all in, so that the plain link's names it is subscribed with are
//!    current;
//! 3. confirming: subscribed, until its node confirms (within the response
//!    timeout); it gets the client's later subscription commands too, and
//!    its keyspace messages go to the client meanwhile.
//!
//! A confirmed link becomes one of the subscriber's mirrors. A failed one
//! is closed, and its node is tried again after a wait that doubles up to
//! [`MAX_WAIT`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::link::Link;
use crate::resp;

pub(super) type Connect = Pin<Box<dyn Future<Output = Result<Link, String>> + Send>>;

/// The first wait before a node whose mirror failed is tried again.
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A client's mirror links being opened, and its nodes waiting to be
/// tried again.
#[derive(Default)]
pub(super) struct Joins {
    connecting: Vec<(String, Connect)>,
    connected: Vec<Link>,
    confirming: Vec<(Link, Instant)>,
    /// Per node: when it may be tried again, and the wait after that.
    retry: HashMap<String, (Instant, Duration)>,
}

impl Joins {
    /// Whether a link to `addr` is being opened, or its node is waiting
    /// to be tried again.
    pub(super) fn busy(&self, addr: &str, now: Instant) -> bool {
        self.connecting.iter().any(|(a, _)| a == addr)
            || self.connected.iter().any(|l| l.addr == addr)
            || self.confirming.iter().any(|(l, _)| l.addr == addr)
            || self.retry.get(addr).is_some_and(|(at, _)| *at > now)
    }

    /// Start opening a link to `addr` with `connect`.
    pub(super) fn start(&mut self, addr: String, connect: Connect) {
        self.connecting.push((addr, connect));
    }

    /// Nothing is being opened.
    pub(super) fn is_empty(&self) -> bool {
        self.connecting.is_empty() && self.connected.is_empty() && self.confirming.is_empty()
    }

    /// Close every link being opened (the waits stay).
    pub(super) fn clear(&mut self) {
        self.connecting.clear();
        self.connected.clear();
        self.confirming.clear();
    }

    /// Close the links whose node `gone` says is no longer a primary.
    pub(super) fn retain(&mut self, gone: impl Fn(&str) -> bool) {
        self.connecting.retain(|(a, _)| !gone(a));
        self.connected.retain(|l| !gone(&l.addr));
        self.confirming.retain(|(l, _)| !gone(&l.addr));
    }

    /// Ready when a connect finished or a confirming link has data (cancel
    /// safe). A failed connect or a lost link is closed here, never
    /// reported: it is no reason to close the client.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut ready = false;
        let mut i = 0;
        while i < self.connecting.len() {
            let Poll::Ready(done) = self.connecting[i].1.as_mut().poll(cx) else {
                i += 1;
                continue;
            };
            let (addr, _) = self.connecting.swap_remove(i);
            match done {
                Ok(link) => self.connected.push(link),
                Err(e) => self.failed(addr, &e),
            }
            ready = true;
        }
        let mut i = 0;
        while i < self.confirming.len() {
            match self.confirming[i].0.poll_read(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(Ok(())) => {
                    ready = true;
                    i += 1;
                }
                Poll::Ready(Err(e)) => {
                    let (link, _) = self.confirming.swap_remove(i);
                    self.failed(link.addr, &e.to_string());
                }
            }
        }
        if ready { Poll::Ready(()) } else { Poll::Pending }
    }

    /// Subscribe the connected links with `replay` (the plain link's
    /// keyspace names; called with every confirmation in); they have the
    /// response timeout to confirm.
    pub(super) async fn subscribe(&mut self, replay: &[Vec<Bytes>], timeout: Duration) {
        for mut link in std::mem::take(&mut self.connected) {
            let mut raw = BytesMut::new();
            for args in replay {
                resp::encode_command(args, &mut raw);
            }
            match tokio::time::timeout(timeout, link.forward(&raw)).await {
                Ok(Ok(())) => self.confirming.push((link, Instant::now() + timeout)),
                Ok(Err(e)) => self.failed(link.addr, &e.to_string()),
                Err(_) => self.failed(link.addr, "the subscribe write timed out"),
            }
        }
    }

    /// Send a client's subscription command on the confirming links too;
    /// they confirm it behind their replay. A link whose write fails is
    /// closed.
    pub(super) async fn forward(&mut self, raw: &[u8], timeout: Duration) {
        let mut kept = Vec::with_capacity(self.confirming.len());
        for (mut link, deadline) in std::mem::take(&mut self.confirming) {
            match tokio::time::timeout(timeout, link.forward(raw)).await {
                Ok(Ok(())) => kept.push((link, deadline)),
                Ok(Err(e)) => self.failed(link.addr, &e.to_string()),
                Err(_) => self.failed(link.addr, "the subscribe write timed out"),
            }
        }
        self.confirming = kept;
    }

    /// Move what the confirming links sent into `out` (their keyspace
    /// messages; see [`Link::drain_mirror`]), close those past their
    /// deadline or broken, and hand over the links that confirmed
    /// everything.
    pub(super) fn drain(&mut self, out: &mut BytesMut) -> Vec<Link> {
        let now = Instant::now();
        let mut done = Vec::new();
        for (mut link, deadline) in std::mem::take(&mut self.confirming) {
            if let Err(e) = link.drain_mirror(out) {
                self.failed(link.addr, &e.to_string());
            } else if link.settled() {
                self.retry.remove(&link.addr);
                done.push(link);
            } else if deadline <= now {
                self.failed(link.addr, "no confirmation within the response timeout");
            } else {
                self.confirming.push((link, deadline));
            }
        }
        done
    }

    /// Forget the waits of nodes `known` says are no longer in the cluster.
    pub(super) fn forget_gone(&mut self, known: impl Fn(&str) -> bool) {
        self.retry.retain(|addr, _| known(addr));
    }

    /// A link to `addr` failed: try it again after its next wait.
    pub(super) fn failed(&mut self, addr: String, error: &str) {
        let wait = self.retry.get(&addr).map_or(FIRST_WAIT, |(_, w)| *w);
        tracing::debug!(node = %addr, error, wait = ?wait, "keyspace mirror not opened; trying again later");
        self.retry
            .insert(addr, (Instant::now() + wait, (wait * 2).min(MAX_WAIT)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_node_that_fails_waits_longer_each_time_up_to_the_bound() {
        let mut joins = Joins::default();
        let mut waits = Vec::new();
        for _ in 0..8 {
            joins.failed("n:1".into(), "refused");
            let start = Instant::now();
            assert!(joins.busy("n:1", start));
            let (at, _) = joins.retry["n:1"];
            waits.push((at - start).as_secs());
            tokio::time::advance(at - start).await;
            assert!(!joins.busy("n:1", Instant::now()));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(!joins.busy("n:2", Instant::now()));
    }
}
