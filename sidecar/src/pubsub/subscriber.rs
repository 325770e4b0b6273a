//! A client's subscriptions over several upstream connections ([`Link`]s):
//! one for its ordinary channels and patterns, one per shard it has shard
//! channels on. What they send is merged into the client's output a whole
//! frame at a time, with the shard-channel counts made the client's totals.

use bytes::{Bytes, BytesMut};
use rand::seq::SliceRandom;

use super::join::Joins;
use super::link::Link;
use super::{error_frame, is_shard_command, is_subscription_command, keyspace};
use crate::error::UpstreamError;
use crate::resp::{self, Frame};
use crate::router::Router;

/// A client's subscription connections and what the sidecar knows of them.
#[derive(Default)]
pub struct Subscriber {
    /// Ordinary channels and patterns, on a random primary (Redis Cluster
    /// broadcasts every `PUBLISH` to every node).
    plain: Option<Link>,
    /// Shard channels: one link per primary, kept while it has channels or
    /// confirmations outstanding (so at most one per shard of the cluster).
    shards: Vec<Link>,
    /// Links to every other primary, for the keyspace notifications they
    /// publish to their own subscribers only ([`super::keyspace`]): opened
    /// at the first subscription that may want them, they get every
    /// ordinary subscription command before the plain link does.
    mirrors: Vec<Link>,
    /// Mirror links the upkeep is opening ([`super::join`]).
    joins: Joins,
    /// The mirrors that deliver everything the plain link's node sends of
    /// keyspace notifications, once that node is no longer a primary (after
    /// a failover), as the upkeep last saw it: its shard's primary, or
    /// every primary when the map does not show the node yet. Empty while
    /// the node is a primary.
    plain_cover: Vec<String>,
    joins_first: bool,
    /// Where the next read starts, so no link starves the others.
    next: usize,
    /// While the plain link holds keyspace subscriptions: when to check
    /// that every primary has a link ([`Subscriber::upkeep`]), and that
    /// the check is due.
    upkeep: Option<tokio::time::Interval>,
    upkeep_due: bool,
    /// A write to a link failed: its subscriptions are in doubt, so the
    /// client is closed at the next read (as when a node goes away).
    broken: Option<String>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("plain", &self.plain.as_ref().map(|l| l.count))
            .field(
                "shards",
                &self.shards.iter().map(|l| l.shard_count).collect::<Vec<_>>(),
            )
            .field("mirrors", &self.mirrors.len())
            .finish()
    }
}

impl Subscriber {
    fn links(&self) -> impl Iterator<Item = &Link> {
        self.plain.iter().chain(self.shards.iter())
    }

    /// Subscribed (RESP2 restrictions apply) as far as the last settled
    /// confirmations say: like one server, while any count is above 0.
    pub fn subscribed(&self) -> bool {
        self.links().any(Link::subscribed)
    }

    /// Every forwarded command has all its confirmations.
    pub fn settled(&self) -> bool {
        self.links().chain(self.mirrors.iter()).all(Link::settled)
    }

    /// Every shard link is settled: an ordinary subscription command may go
    /// on the plain link behind its own outstanding ones, and its replies
    /// still come after everything earlier.
    pub(super) fn shards_settled(&self) -> bool {
        self.shards.iter().all(Link::settled)
    }

    /// Channels and patterns on the plain link, and shard channels, as
    /// the last confirmations counted them.
    pub fn counts(&self) -> (i64, i64) {
        (self.plain.as_ref().map_or(0, |l| l.count), self.shard_total())
    }

    fn shard_total(&self) -> i64 {
        self.shards.iter().map(|l| l.shard_count).sum()
    }

    /// Send a request the step said to forward (a subscription command, or
    /// a `PING` in RESP2 subscribed mode); replies it has at once (errors,
    /// Redis's answer to unsubscribing from nothing) go into `out`.
    /// `silent` (`CLIENT REPLY`): as in Redis, its errors and a `PING`'s
    /// reply are dropped; confirmations are not.
    async fn forward(
        &mut self,
        router: &Router,
        proto: u8,
        req: &resp::Request,
        silent: bool,
        out: &mut BytesMut,
    ) {
        let name = req.name().to_ascii_lowercase();
        let bare = req.argc() == 1;
        let sent = if is_shard_command(&name) {
            match req.arg(1) {
                Some(channel) => self.forward_shard(router, proto, channel, &req.raw).await,
                None if name == b"sunsubscribe" => self.sunsubscribe_all(proto, &req.raw, out).await,
                // Redis's arity error, from any node.
                None => self.forward_plain(router, proto, &req.raw, None, out).await,
            }
        } else if is_subscription_command(&name) {
            if bare && name != b"subscribe" && name != b"psubscribe" && self.plain.is_none() {
                out.extend_from_slice(&none_left(proto, &name));
                Ok(())
            } else {
                let wants = keyspace::wants_mirrors(req);
                self.forward_plain(router, proto, &req.raw, Some(wants), out)
                    .await
            }
        } else if silent {
            // A PING changes nothing: with its reply dropped, it need not go.
            Ok(())
        } else {
            self.forward_ping(router, proto, &req.raw, out).await
        };
        if let Err(b) = sent
            && !silent
        {
            out.extend_from_slice(&b);
        }
    }

    /// A shard-channel command goes to its (first) channel's slot primary;
    /// channels of other slots get that node's own CROSSSLOT, as from Redis
    /// Cluster.
    async fn forward_shard(
        &mut self,
        router: &Router,
        proto: u8,
        channel: &[u8],
        raw: &[u8],
    ) -> Result<(), Bytes> {
        let addr = {
            let topo = router.registry.current();
            match topo.shard(crate::slot::slot(channel)) {
                Some(s) => s.primary.addr.clone(),
                None => {
                    return Err(error_frame(
                        "CLUSTERDOWN cachetier: the channel's slot is not served",
                    ));
                }
            }
        };
        let i = match self.shards.iter().position(|l| l.addr == addr) {
            Some(i) => i,
            None => {
                self.shards.push(open(router, &addr, proto).await?);
                self.shards.len() - 1
            }
        };
        let link = &mut self.shards[i];
        let sent = link.forward(raw).await;
        self.note_sent(sent)
    }

    /// Ordinary channels and patterns share one link, opened on a random
    /// healthy primary at the first command that needs it. `subscription`:
    /// `Some` for an ordinary subscription command, which goes to the
    /// mirror links first (opening them when it is `Some(true)` and there
    /// are none), so that its confirmation means every node hears it.
    async fn forward_plain(
        &mut self,
        router: &Router,
        proto: u8,
        raw: &[u8],
        subscription: Option<bool>,
        out: &mut BytesMut,
    ) -> Result<(), Bytes> {
        // An idle link of the protocol the client spoke before a `HELLO`
        // would answer in the wrong one.
        if self
            .plain
            .as_ref()
            .is_some_and(|l| l.proto != proto && l.settled() && !l.subscribed())
        {
            self.plain = None;
            self.mirrors.clear();
            self.joins.clear();
        }
        if self.plain.is_none() {
            self.plain = Some(open_plain(router, proto).await?);
        }
        if subscription == Some(true) && self.mirrors.is_empty() {
            self.open_mirrors(router, proto, out).await;
        }
        if subscription.is_some() && !(self.mirrors.is_empty() && self.joins.is_empty()) {
            self.forward_mirrors(router, raw, out).await?;
        }
        let Some(link) = self.plain.as_mut() else {
            return Err(error_frame("ERR cachetier: no subscription connection"));
        };
        let sent = link.forward(raw).await;
        self.note_sent(sent)
    }

    /// RESP2 subscribed mode: a link in that mode answers `PING` as one
    /// server does there (`["pong", arg]`).
    async fn forward_ping(
        &mut self,
        router: &Router,
        proto: u8,
        raw: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Bytes> {
        let link = match self.plain.as_mut().filter(|l| l.subscribed()) {
            Some(l) => l,
            None => match self.shards.iter_mut().find(|l| l.subscribed()) {
                Some(l) => l,
                None => return self.forward_plain(router, proto, raw, None, out).await,
            },
        };
        let sent = link.forward(raw).await;
        self.note_sent(sent)
    }

    /// A mirror link to every healthy primary but the plain link's and
    /// those the upkeep is opening or waiting to try again (a primary out
    /// of rotation gets its link from the upkeep once it is back). A node
    /// whose link fails (one that accepts TCP and never answers costs the
    /// response timeout once) is left to the upkeep's next tries; the
    /// client's command goes on without it.
    async fn open_mirrors(&mut self, router: &Router, proto: u8, out: &mut BytesMut) {
        let plain = self.plain.as_ref().map(|l| l.addr.clone());
        let now = tokio::time::Instant::now();
        let addrs: Vec<String> = router
            .registry
            .current()
            .shards
            .iter()
            .map(|s| &s.primary)
            .filter(|p| p.is_healthy() && Some(&p.addr) != plain.as_ref() && !self.joins.busy(&p.addr, now))
            .map(|p| p.addr.clone())
            .collect();
        // The client's earlier keyspace subscriptions first (it may hold
        // some from when there was no other primary to mirror); the
        // command's own follows on every mirror.
        let replay = self.plain.as_ref().map(|l| l.names.replay()).unwrap_or_default();
        for addr in addrs {
            match open_mirror(router, &addr, proto, &replay, out).await {
                Ok(link) => self.mirrors.push(link),
                Err(e) => {
                    let e = String::from_utf8_lossy(&e);
                    self.joins.failed(addr, e.trim_end());
                }
            }
        }
    }

    /// Send `raw` on every mirror link and wait (at most the response
    /// timeout) for their confirmations; keyspace messages that arrive
    /// meanwhile go to `out`.
    async fn forward_mirrors(
        &mut self,
        router: &Router,
        raw: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Bytes> {
        for i in 0..self.mirrors.len() {
            let sent = self.mirrors[i].forward(raw).await;
            self.note_sent(sent)?;
        }
        // Links still being opened confirm it in their own time.
        self.joins.forward(raw, router.config.response_timeout).await;
        let settle = async {
            while !self.mirrors.iter().all(Link::settled) {
                std::future::poll_fn(|cx| {
                    for link in &mut self.mirrors {
                        if let std::task::Poll::Ready(r) = link.poll_read(cx) {
                            return std::task::Poll::Ready(r);
                        }
                    }
                    std::task::Poll::Pending
                })
                .await?;
                for link in &mut self.mirrors {
                    link.drain_mirror(out)?;
                }
            }
            Ok::<(), UpstreamError>(())
        };
        let e = match tokio::time::timeout(router.config.response_timeout, settle).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no confirmation within the response timeout".to_string(),
        };
        self.broken = Some(format!("a keyspace subscription connection failed: {e}"));
        Err(error_frame(&format!(
            "ERR cachetier: subscription connection lost: {e}"
        )))
    }

    /// `SUNSUBSCRIBE` with no channel: on every shard link that has some
    /// (each names its channels, the counts falling to 0 over all of them);
    /// with none anywhere, Redis's reply for none.
    async fn sunsubscribe_all(&mut self, proto: u8, raw: &[u8], out: &mut BytesMut) -> Result<(), Bytes> {
        if self.shard_total() == 0 {
            out.extend_from_slice(&none_left(proto, b"sunsubscribe"));
            return Ok(());
        }
        for link in self.shards.iter_mut().filter(|l| l.shard_count > 0) {
            if let Err(e) = link.forward(raw).await {
                return self.note_sent(Err(e));
            }
        }
        Ok(())
    }

    fn note_sent(&mut self, sent: std::io::Result<()>) -> Result<(), Bytes> {
        sent.map_err(|e| {
            self.broken = Some(e.to_string());
            error_frame(&format!("ERR cachetier: subscription connection lost: {e}"))
        })
    }

    /// Wait until some link has data or [`Subscriber::upkeep`] is due
    /// (cancel safe); a lost link ends it.
    async fn read(&mut self) -> Result<(), UpstreamError> {
        std::future::poll_fn(|cx| {
            if let Some(e) = &self.broken {
                return std::task::Poll::Ready(Err(UpstreamError::Closed(e.clone())));
            }
            if let Some(tick) = self.upkeep.as_mut()
                && tick.poll_tick(cx).is_ready()
            {
                self.upkeep_due = true;
                return std::task::Poll::Ready(Ok(()));
            }
            // Before the links every other call: neither starves the other.
            self.joins_first = !self.joins_first;
            if self.joins_first && self.joins.poll(cx).is_ready() {
                return std::task::Poll::Ready(Ok(()));
            }
            let n = usize::from(self.plain.is_some()) + self.shards.len() + self.mirrors.len();
            for k in 0..n {
                let i = (self.next + k) % n;
                let link = self
                    .plain
                    .iter_mut()
                    .chain(self.shards.iter_mut())
                    .chain(self.mirrors.iter_mut())
                    .nth(i);
                let Some(link) = link else { continue };
                if let std::task::Poll::Ready(r) = link.poll_read(cx) {
                    self.next = i + 1;
                    return std::task::Poll::Ready(r);
                }
            }
            if !self.joins_first && self.joins.poll(cx).is_ready() {
                return std::task::Poll::Ready(Ok(()));
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Drop the plain link's keyspace messages (a replica's copies of its
    /// primary's) while every mirror of `plain_cover` exists.
    fn note_cover(&mut self) {
        let covered = !self.plain_cover.is_empty()
            && (self.plain_cover.iter()).all(|a| self.mirrors.iter().any(|m| m.addr == *a));
        if let Some(plain) = self.plain.as_mut() {
            plain.keyspace_off = covered;
        }
    }

    /// Move every complete frame of every link into `out` (see
    /// [`Link::drain`]), then close the shard links left with nothing.
    pub fn drain(&mut self, out: &mut BytesMut) -> Result<(), UpstreamError> {
        if let Some(p) = self.plain.as_mut() {
            p.drain(out, 0)?;
        }
        for i in 0..self.shards.len() {
            let others = self.shard_total() - self.shards[i].shard_count;
            self.shards[i].drain(out, others)?;
        }
        self.shards.retain(|l| !l.settled() || l.shard_count > 0);
        for link in &mut self.mirrors {
            link.drain_mirror(out)?;
        }
        let joined = self.joins.drain(out);
        let any_joined = !joined.is_empty();
        self.mirrors.extend(joined);
        // The plain link's copies stop as soon as the mirrors deliver them,
        // not at the next check.
        if any_joined {
            self.note_cover();
        }
        let keyspace = self.plain.as_ref().is_some_and(|p| p.names.has_keyspace());
        // The client left its last keyspace subscription: nothing of the
        // mirrors reaches it any more.
        if !keyspace && self.settled() {
            self.mirrors.clear();
            self.joins.clear();
        }
        if keyspace && self.upkeep.is_none() {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + UPKEEP_EVERY, UPKEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            self.upkeep = Some(tick);
        } else if !keyspace {
            self.upkeep = None;
        }
        Ok(())
    }

    /// Keep keyspace notifications coming from every shard as the cluster
    /// changes: a primary with no link (a shard added since the client
    /// subscribed, or a replica promoted) gets a mirror, opened in the
    /// background ([`super::join`]) and subscribed to the plain link's
    /// keyspace channels and patterns; a link whose node is no longer a
    /// primary closes; and while the plain link's node is not a primary
    /// and the mirrors cover it (its primary's, or every primary's when the
    /// map does not show it yet), its own keyspace messages (a replica's
    /// copies of its primary's) are dropped for the mirrors'. Runs with every
    /// confirmation in, so the plain link's names are current: new links
    /// are subscribed at every call, the cluster is checked when due.
    pub async fn upkeep(&mut self, router: &Router) {
        if !self.settled() {
            return;
        }
        let Some(plain) = self.plain.as_ref() else {
            return;
        };
        let (plain_addr, proto) = (plain.addr.clone(), plain.proto);
        self.joins
            .subscribe(&plain.names.replay(), router.config.response_timeout)
            .await;
        if !std::mem::take(&mut self.upkeep_due) {
            return;
        }
        let topo = router.registry.current();
        // No slot map (every seed unreachable): nothing to go by, so the
        // links stay as they are.
        if !topo.is_known() {
            return;
        }
        let now = tokio::time::Instant::now();
        for p in topo.shards.iter().map(|s| &s.primary) {
            let linked = p.addr == plain_addr || self.mirrors.iter().any(|m| m.addr == p.addr);
            if p.is_healthy() && !linked && !self.joins.busy(&p.addr, now) {
                self.joins.start(p.addr.clone(), connect(router, &p.addr, proto));
            }
        }
        self.mirrors.retain(|m| !topo.not_a_primary(&m.addr));
        self.joins.retain(|addr| topo.not_a_primary(addr));
        let shard = topo
            .shards
            .iter()
            .find(|s| s.replicas.iter().any(|r| r.addr == plain_addr));
        self.plain_cover = match shard {
            Some(s) => vec![s.primary.addr.clone()],
            None if topo.not_a_primary(&plain_addr) => {
                topo.shards.iter().map(|s| s.primary.addr.clone()).collect()
            }
            None => Vec::new(),
        };
        self.note_cover();
        if topo.is_complete() {
            self.joins.forget_gone(|addr| topo.knows(addr));
        }
    }
}

/// A mirror link to `addr`, connected, not yet subscribed: the upkeep's
/// (see [`super::join`]) and [`open_mirror`]'s.
fn connect(router: &Router, addr: &str, proto: u8) -> super::join::Connect {
    let (addr, timeout) = (addr.to_string(), router.config.response_timeout);
    let (auth, counts) = (router.config.auth.clone(), router.mirrors.clone());
    Box::pin(async move {
        let mut link = Link::open(&addr, proto, timeout, auth.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        link.mirror = Some(keyspace::MirrorShare::new(counts));
        Ok(link)
    })
}

/// A mirror link to `addr`, subscribed with `replay` and confirmed within
/// the response timeout (a link that never confirms would hold the
/// client's next subscription command for ever); keyspace messages that
/// arrive meanwhile go to `out`. The error (an error reply) says why not.
async fn open_mirror(
    router: &Router,
    addr: &str,
    proto: u8,
    replay: &[Vec<Bytes>],
    out: &mut BytesMut,
) -> Result<Link, Bytes> {
    let mut link = connect(router, addr, proto)
        .await
        .map_err(|e| not_opened(addr, &e))?;
    let settle = async {
        for args in replay {
            let mut raw = BytesMut::new();
            resp::encode_command(args, &mut raw);
            link.forward(&raw).await.map_err(|e| e.to_string())?;
        }
        while !link.settled() {
            std::future::poll_fn(|cx| link.poll_read(cx))
                .await
                .map_err(|e| e.to_string())?;
            link.drain_mirror(out).map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    let e = match tokio::time::timeout(router.config.response_timeout, settle).await {
        Ok(Ok(())) => return Ok(link),
        Ok(Err(e)) => e,
        Err(_) => "no confirmation within the response timeout".into(),
    };
    Err(error_frame(&format!(
        "ERR cachetier: could not subscribe a keyspace connection to {addr}: {e}"
    )))
}

/// How often a subscriber with keyspace subscriptions checks that every
/// primary has a link.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The plain link, on a random healthy primary; one that cannot be
/// reached (or accepts TCP and never answers) gives way to the next.
async fn open_plain(router: &Router, proto: u8) -> Result<Link, Bytes> {
    let mut addrs: Vec<String> = (router.registry.current().shards.iter())
        .map(|s| &s.primary)
        .filter(|p| p.is_healthy())
        .map(|p| p.addr.clone())
        .collect();
    addrs.shuffle(&mut rand::rng());
    let mut last = error_frame("CLUSTERDOWN cachetier: no primary to subscribe on");
    for addr in addrs {
        match open(router, &addr, proto).await {
            Ok(link) => return Ok(link),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn open(router: &Router, addr: &str, proto: u8) -> Result<Link, Bytes> {
    Link::open(
        addr,
        proto,
        router.config.response_timeout,
        router.config.auth.as_ref(),
    )
    .await
    .map_err(|e| not_opened(addr, &e))
}

/// The client's error for a subscription connection to `addr` that could
/// not be opened.
fn not_opened(addr: &str, e: &dyn std::fmt::Display) -> Bytes {
    error_frame(&format!(
        "ERR cachetier: could not open a subscription connection to {addr}: {e}"
    ))
}

/// Redis's reply to an argument-less unsubscribe with nothing to leave:
/// `[kind, nil, 0]`.
fn none_left(proto: u8, kind: &[u8]) -> Bytes {
    let items = vec![
        Frame::Bulk(Bytes::copy_from_slice(kind)),
        if proto == 3 { Frame::Null } else { Frame::NullBulk },
        Frame::Integer(0),
    ];
    let mut b = BytesMut::new();
    if proto == 3 {
        Frame::Push(items)
    } else {
        Frame::Array(items)
    }
    .encode(&mut b);
    b.freeze()
}

/// Forward a request on the client's subscription connections, creating
/// its subscription state at its first one; replies it gets at once go to
/// `out`.
pub async fn forward(
    router: &Router,
    sub: &mut Option<Subscriber>,
    proto: u8,
    req: &resp::Request,
    silent: bool,
    out: &mut BytesMut,
) {
    sub.get_or_insert_with(Subscriber::default)
        .forward(router, proto, req, silent, out)
        .await;
}

/// Read from the client's subscription connections (pending for ever when
/// there are none; the select guards that).
pub async fn read(sub: &mut Option<Subscriber>) -> Result<(), UpstreamError> {
    match sub.as_mut() {
        Some(s) => s.read().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_unsubscribe_is_answered_as_redis_does() {
        assert_eq!(
            &none_left(2, b"sunsubscribe")[..],
            b"*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(
            &none_left(3, b"unsubscribe")[..],
            b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n"
        );
    }
}
