//! Client-side caching through the sidecar: `CLIENT TRACKING`.
//!
//! A RESP3 client that turns tracking on gets Redis's `invalidate` pushes for
//! the keys it read, as from one server. The nodes cannot track the client
//! itself (its reads share connections with every other client's), so:
//!
//! - one invalidation feed per current primary (`tracking.rs`, `BCAST` with
//!   no prefix: every key) is shared by this sidecar's tracking clients, and
//!   kept only while at least one client tracks (an `OPTIN` one: from its
//!   first `CLIENT CACHING yes`);
//! - each tracking client remembers the keys its tracked reads named
//!   ([`Tracker`]) and is sent a push for those (in `BCAST` mode: for its
//!   prefixes);
//! - its tracked reads go to primaries and around the local cache, so no
//!   value it is handed is older than an invalidation it was already sent
//!   (its untracked ones, in `OPTIN` or `OPTOUT` mode, are read as any
//!   client's);
//! - a push is queued behind every reply the client is waiting for when the
//!   push arrives, so a read that ran before a write has its reply delivered
//!   before that write's invalidation, as on one connection;
//! - when a feed starts or fails, when a slot changes hands, when a client
//!   falls behind the feed, when it remembers more than
//!   [`MAX_KEY_BYTES`] of keys, and when the tracking clients together
//!   remember more than [`MAX_HUB_KEY_BYTES`] and it holds more than its
//!   share, the client is sent a flush: an
//!   `invalidate` of every key it read since the last one (a null
//!   `invalidate` in `BCAST` mode, where the sidecar does not know them;
//!   Redis sends a null one only for `FLUSHALL`, and Lettuce's cache
//!   cannot take it).
//!
//! What differs from Redis: a client may be sent invalidations Redis would
//! not send (keys its scripts named, its own writes under
//! `NOLOOP`), which a client-side cache takes as a no-op; a push waits
//! behind a slow script or an `XREAD … BLOCK` the client is waiting for
//! (Redis sends it at once, as the sidecar does to a client waiting only
//! in `BLPOP`-like commands or `WAIT`); `REDIRECT` (how RESP2 clients receive
//! invalidations) is refused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::resp::Frame;
use crate::topology::Topology;
use crate::upstream::Node;

mod mailbox;
mod options;
mod watched;
use mailbox::{Mailbox, Taken};
pub use options::{Change, Options, parse};

/// Memory one client's tracking may use for the keys it remembers before
/// they are all invalidated and it starts over (Redis bounds its table
/// with `tracking-table-max-keys`).
pub const MAX_KEY_BYTES: usize = 4 * 1024 * 1024;

/// Memory every tracking client of the sidecar together may use for the
/// keys they remember (about a million short keys, the size of Redis's
/// default `tracking-table-max-keys`). Past it, each client holding more
/// than an equal share is sent a flush and starts over.
pub const MAX_HUB_KEY_BYTES: usize = 64 * 1024 * 1024;

/// What a remembered key costs beyond its bytes (its `Bytes`, its heap
/// block, its table slot), counted against [`MAX_KEY_BYTES`].
const ENTRY_BYTES: usize = 64;

/// What remembering `key` counts against the budgets.
fn cost(key: &[u8]) -> usize {
    key.len() + ENTRY_BYTES
}

/// Keys named by one push of a client's invalidate-everything.
const PUSH_KEYS: usize = 1024;

/// How often, at most, the trackers are told to shed while over
/// [`MAX_HUB_KEY_BYTES`] (each needs a moment to hear it).
const SHED_INTERVAL: Duration = Duration::from_millis(100);

/// What the feeds tell the tracking clients.
#[derive(Debug, Clone)]
pub enum Invalidation {
    Keys(Arc<[Bytes]>),
    /// A node was flushed (`FLUSHALL`): every tracking client is told, as
    /// Redis tells them.
    Flushed,
    /// Something may have changed unseen (a feed started or failed, a slot
    /// changed hands, the client fell behind): a client that read anything
    /// since its last flush drops everything.
    Unseen,
    /// The tracking clients remember more than the hub's budget: each one
    /// holding more than an equal share of it drops everything.
    Shed,
}

/// The feeds' side, shared by every tracking client of the sidecar.
#[derive(Debug)]
pub struct Hub {
    /// The trackers and the keys each wants: where the feeds' messages go.
    watched: watched::Watched,
    /// Primaries whose feed is established.
    established: std::sync::Mutex<HashSet<String>>,
    /// Woken when a feed is established or a tracker ends.
    changed: Notify,
    /// Woken when a client starts needing the feeds.
    wake: Notify,
    /// Trackers that need the feeds: all but `OPTIN` ones that have not
    /// yet asked for a read to be tracked (rueidis turns `OPTIN` tracking
    /// on for every connection; the feeds cost every write to the tier).
    feeders: AtomicUsize,
    /// The bytes every tracker's remembered keys cost, and their bound.
    key_bytes: AtomicUsize,
    max_key_bytes: usize,
    /// When the last [`Invalidation::Shed`] was sent, and whether a look
    /// at the total is due when [`SHED_INTERVAL`] has passed since.
    shed_at: std::sync::Mutex<Option<Instant>>,
    shed_later: AtomicBool,
    metrics: Metrics,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Arc<Hub> {
        Hub::with_budget(metrics, MAX_HUB_KEY_BYTES)
    }

    /// A hub whose trackers together remember at most `max_key_bytes` of
    /// keys (beyond what one command names).
    fn with_budget(metrics: Metrics, max_key_bytes: usize) -> Arc<Hub> {
        Arc::new(Hub {
            watched: watched::Watched::default(),
            established: std::sync::Mutex::default(),
            changed: Notify::new(),
            wake: Notify::new(),
            feeders: AtomicUsize::new(0),
            key_bytes: AtomicUsize::new(0),
            max_key_bytes,
            shed_at: std::sync::Mutex::default(),
            shed_later: AtomicBool::new(false),
            metrics,
        })
    }

    /// Tracker `id` remembers these keys too (new to it): they are
    /// watched, and counted against the budget.
    fn remembered(self: &Arc<Self>, id: watched::Id, keys: &[Bytes]) {
        if keys.is_empty() {
            return;
        }
        self.watched.watch(id, keys);
        let n: usize = keys.iter().map(|k| cost(k)).sum();
        self.key_bytes.fetch_add(n, Ordering::Relaxed);
        self.shed_if_over();
    }

    /// The trackers remember more than the budget.
    fn over(&self) -> bool {
        self.key_bytes.load(Ordering::Relaxed) > self.max_key_bytes
    }

    /// Past the budget, tell the trackers to shed, at most every
    /// [`SHED_INTERVAL`]: within it, the look is made again once it ends
    /// (so the total does not stay over when nothing else happens).
    fn shed_if_over(self: &Arc<Self>) {
        let total = self.key_bytes.load(Ordering::Relaxed);
        if total <= self.max_key_bytes {
            return;
        }
        let mut shed_at = crate::lock(&self.shed_at);
        match shed_at.map(|at| at.elapsed()) {
            Some(since) if since < SHED_INTERVAL => {
                if !self.shed_later.swap(true, Ordering::Relaxed) {
                    let (hub, wait) = (self.clone(), SHED_INTERVAL - since);
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        hub.shed_later.store(false, Ordering::Relaxed);
                        hub.shed_if_over();
                    });
                }
            }
            _ => {
                *shed_at = Some(Instant::now());
                tracing::info!(
                    bytes = total,
                    "tracking clients remember too many keys; the largest are sent a flush"
                );
                self.send(Invalidation::Shed);
            }
        }
    }

    /// Tracker `id` forgot these keys (it remembered each).
    fn forgot<'a>(&self, id: watched::Id, keys: impl IntoIterator<Item = &'a Bytes> + Clone) {
        if keys.clone().into_iter().next().is_none() {
            return;
        }
        self.watched.unwatch(id, keys.clone());
        let n: usize = keys.into_iter().map(|k| cost(k)).sum();
        self.key_bytes.fetch_sub(n, Ordering::Relaxed);
    }

    /// What one tracker may keep when the trackers are over the budget.
    fn share(&self) -> usize {
        self.max_key_bytes / self.watched.clients().max(1)
    }

    /// Every primary of `topo` has an established feed.
    fn covers(&self, topo: &Topology) -> bool {
        let established = crate::lock(&self.established);
        topo.shards.iter().all(|s| established.contains(&s.primary.addr))
    }

    /// Wait (at most `timeout`, and while `tracker` tracks) until every
    /// current primary has a feed, so a client that turned tracking on
    /// misses no invalidation from then. A primary whose feed comes later
    /// sends a flush then.
    pub async fn covering(&self, registry: &crate::topology::Registry, timeout: Duration, tracker: Weak<()>) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if tracker.strong_count() == 0 || self.covers(&registry.current()) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Tell every tracker.
    fn send(&self, inv: Invalidation) {
        self.watched.to_all(inv);
    }

    fn unseen(&self, reason: &str) {
        self.metrics.tracking_flushes.with_label_values(&[reason]).inc();
        self.send(Invalidation::Unseen);
    }
}

impl crate::tracking::Feed for Hub {
    fn prefixes(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }

    fn wanted(&self) -> bool {
        self.feeders.load(Ordering::Relaxed) > 0
    }

    fn woken(&self) -> impl Future<Output = ()> + Send {
        self.wake.notified()
    }

    fn established(&self, node: &Node) {
        crate::lock(&self.established).insert(node.addr.clone());
        // Whatever changed while it was not followed.
        self.unseen("feed_established");
        self.changed.notify_waiters();
    }

    fn ended(&self, node: &Node) {
        crate::lock(&self.established).remove(&node.addr);
    }

    fn lost(&self, node: &Node, _slots: Vec<(u16, u16)>, why: &str) {
        tracing::warn!(node = %node.addr, %why, "client-tracking feed lost; tracking clients are sent a flush");
        self.unseen("feed_lost");
    }

    fn moved(&self, _slots: Vec<(u16, u16)>) {
        // A new owner may hold older values (a failover loses the writes
        // its replica had not received).
        self.unseen("topology");
    }

    async fn invalidate(&self, keys: Option<&[Frame]>) {
        match keys {
            Some(keys) => {
                let keys: Vec<Bytes> = keys
                    .iter()
                    .filter_map(|k| match k {
                        Frame::Bulk(k) => Some(k.clone()),
                        _ => None,
                    })
                    .collect();
                self.watched.deliver(&keys);
            }
            None => {
                self.metrics
                    .tracking_flushes
                    .with_label_values(&["flushed"])
                    .inc();
                self.send(Invalidation::Flushed);
            }
        }
    }
}

/// One client's tracking: its options and the keys its reads named.
#[derive(Debug)]
pub struct Tracker {
    hub: Arc<Hub>,
    /// Lives as long as the tracker (see [`Hub::covering`]).
    alive: Arc<()>,
    /// Its number in the hub's table, and where the hub puts its messages.
    id: watched::Id,
    mailbox: Arc<Mailbox>,
    pub options: Options,
    keys: HashSet<Bytes>,
    key_bytes: usize,
    /// Anything was read since the last flush (so a flush means something).
    read_any: bool,
    /// Counted in [`Hub::feeders`].
    feeding: bool,
    /// `CLIENT CACHING` was given, for the command after it.
    pub caching: bool,
    /// A command that ends `caching` has run.
    caching_used: bool,
}

impl Tracker {
    /// Start tracking: the feeds are kept while a tracker lives.
    pub fn start(hub: &Arc<Hub>, options: Options) -> Tracker {
        let mailbox = Arc::new(Mailbox::default());
        let bcast = options.bcast.then_some(options.prefixes.as_slice());
        let id = hub.watched.join(mailbox.clone(), bcast);
        hub.metrics.tracking_clients.inc();
        let mut tracker = Tracker {
            hub: hub.clone(),
            alive: Arc::new(()),
            id,
            mailbox,
            options,
            keys: HashSet::new(),
            key_bytes: 0,
            read_any: false,
            feeding: false,
            caching: false,
            caching_used: false,
        };
        if !tracker.options.optin {
            tracker.feed();
        }
        tracker
    }

    /// `CLIENT TRACKING ON` again, with `options` (checked against the
    /// current ones: a `BCAST` client stays one, and may add prefixes).
    pub fn set_options(&mut self, options: Options) {
        if options.bcast {
            self.hub.watched.set_prefixes(self.id, &options.prefixes);
        }
        self.options = options;
    }

    /// This tracker needs the feeds from now on (until it ends). Returns
    /// whether that is new: then its next tracked read should wait for
    /// [`Hub::covering`].
    pub fn feed(&mut self) -> bool {
        if std::mem::replace(&mut self.feeding, true) {
            return false;
        }
        self.hub.feeders.fetch_add(1, Ordering::Relaxed);
        // Kept as a permit when the feeds already run: one extra look.
        self.hub.wake.notify_one();
        true
    }

    /// Whether the command about to run (after [`Tracker::next_command`])
    /// is tracked: its keys remembered, its reads sent to primaries and
    /// around the local cache. In `OPTIN` mode only after `CLIENT CACHING
    /// yes`, in `OPTOUT` mode unless after `CLIENT CACHING no`, as Redis
    /// tracks them; an untracked read is read like any other client's.
    pub fn tracks_now(&self) -> bool {
        let o = &self.options;
        if o.optin {
            self.caching
        } else if o.optout {
            !self.caching
        } else {
            true
        }
    }

    /// A handle that dies with the tracker.
    pub fn alive(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }

    /// A command is about to run. As in Redis, `CLIENT CACHING` lasts
    /// until a command runs that `keeps` it not (any but a `CLIENT`
    /// subcommand, `MULTI` and the commands it queues).
    pub fn next_command(&mut self, keeps: bool) {
        if self.caching_used {
            self.caching = false;
            self.caching_used = false;
        }
        if self.caching && !keeps {
            self.caching_used = true;
        }
    }

    /// `CLIENT CACHING yes|no` (`yes`: true), checked as Redis checks it.
    pub fn set_caching(&mut self, yes: bool) -> Result<(), &'static str> {
        if yes && !self.options.optin {
            return Err("ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.");
        }
        if !yes && !self.options.optout {
            return Err("ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode.");
        }
        self.caching = true;
        self.caching_used = false;
        Ok(())
    }

    /// Remember the keys one command read. Returns the pushes to send
    /// before its reply when remembering them would pass
    /// [`MAX_KEY_BYTES`]: everything remembered so far is invalidated first
    /// (then only these keys are remembered).
    pub fn read(&mut self, keys: &[Bytes]) -> Vec<Bytes> {
        let mut out = Vec::new();
        if keys.is_empty() {
            return out;
        }
        if !self.options.bcast {
            let more: usize = (keys.iter())
                .filter(|k| !self.keys.contains(*k))
                .map(|k| cost(k))
                .sum();
            if self.key_bytes + more > MAX_KEY_BYTES {
                self.hub
                    .metrics
                    .tracking_flushes
                    .with_label_values(&["too_many_keys"])
                    .inc();
                self.forget_all(&mut out);
            }
            let mut new = Vec::new();
            for k in keys {
                if !self.keys.contains(k) {
                    // A copy: a slice would keep the request's buffer alive.
                    let k = Bytes::copy_from_slice(k.as_ref());
                    self.key_bytes += cost(&k);
                    self.keys.insert(k.clone());
                    new.push(k);
                }
            }
            self.hub.remembered(self.id, &new);
        }
        self.read_any = true;
        self.hub.metrics.tracking_pushes.inc_by(out.len() as u64);
        out
    }

    /// Invalidate whatever the client may have cached, and forget it: the
    /// keys it read, by name (in pushes of at most [`PUSH_KEYS`]), or in
    /// `BCAST` mode, where no keys are remembered, a null `invalidate`.
    /// Names, not a null push, where they are known: Lettuce's cache
    /// cannot take a null one (Redis sends it only for `FLUSHALL`).
    fn forget_all(&mut self, out: &mut Vec<Bytes>) {
        let bcast = self.options.bcast;
        let keys: Vec<Bytes> = self.clear().into_iter().collect();
        if bcast {
            out.push(push(None));
        } else {
            for chunk in keys.chunks(PUSH_KEYS) {
                out.push(push(Some(chunk.to_vec())));
            }
        }
    }

    /// Forget every key, and return them. A new table: a cleared one keeps
    /// its largest size.
    fn clear(&mut self) -> HashSet<Bytes> {
        let keys = std::mem::take(&mut self.keys);
        self.hub.forgot(self.id, &keys);
        self.key_bytes = 0;
        self.read_any = false;
        keys
    }

    /// The next feed message for this client.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Invalidation> {
        self.mailbox.poll_take(cx).map(|taken| match taken {
            Taken::Message(inv) => inv,
            Taken::Lagged => {
                (self.hub.metrics.tracking_flushes)
                    .with_label_values(&["lagged"])
                    .inc();
                Invalidation::Unseen
            }
        })
    }

    /// The next feed message for this client.
    pub async fn recv(&mut self) -> Invalidation {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The pushes `inv` means for this client; the keys named are no longer
    /// remembered (as in Redis, a key is tracked again when read again).
    pub fn pushes(&mut self, inv: &Invalidation, out: &mut Vec<Bytes>) {
        match inv {
            // As Redis sends it for `FLUSHALL`.
            Invalidation::Flushed => {
                self.clear();
                out.push(push(None));
            }
            // Nothing read since the last flush: nothing of it is cached.
            Invalidation::Unseen if !self.read_any => {}
            Invalidation::Unseen => self.forget_all(out),
            Invalidation::Shed => {
                // Heard late, the total may be back under the budget.
                if self.hub.over() && self.key_bytes > self.hub.share() {
                    self.hub
                        .metrics
                        .tracking_flushes
                        .with_label_values(&["shed"])
                        .inc();
                    self.forget_all(out);
                }
            }
            // The hub passes a BCAST client only keys under its prefixes.
            Invalidation::Keys(keys) if self.options.bcast => {
                if !keys.is_empty() {
                    out.push(push(Some(keys.to_vec())));
                }
            }
            Invalidation::Keys(keys) => {
                let mut forgotten = Vec::new();
                for k in keys.iter() {
                    if self.keys.remove(k) {
                        self.key_bytes -= cost(k);
                        out.push(push(Some(vec![k.clone()])));
                        forgotten.push(k.clone());
                    }
                }
                self.hub.forgot(self.id, &forgotten);
            }
        }
        let sent = out.len() as u64;
        self.hub.metrics.tracking_pushes.inc_by(sent);
    }

    /// `CLIENT TRACKINGINFO`'s flags.
    pub fn flags(&self) -> Vec<&'static str> {
        let o = &self.options;
        let mut flags = vec!["on"];
        if o.bcast {
            flags.push("bcast");
        }
        if o.optin {
            flags.push("optin");
            if self.caching {
                flags.push("caching-yes");
            }
        }
        if o.optout {
            flags.push("optout");
            if self.caching {
                flags.push("caching-no");
            }
        }
        if o.noloop {
            flags.push("noloop");
        }
        flags
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.clear();
        self.hub.watched.leave(self.id);
        if self.feeding {
            self.hub.feeders.fetch_sub(1, Ordering::Relaxed);
        }
        self.hub.metrics.tracking_clients.dec();
        self.alive = Arc::new(());
        self.hub.changed.notify_waiters();
    }
}

/// An `invalidate` push: these keys, or (`None`) everything.
fn push(keys: Option<Vec<Bytes>>) -> Bytes {
    let keys = match keys {
        Some(keys) => Frame::Array(keys.into_iter().map(Frame::Bulk).collect()),
        None => Frame::Null,
    };
    let mut out = BytesMut::new();
    Frame::Push(vec![Frame::Bulk(Bytes::from_static(b"invalidate")), keys]).encode(&mut out);
    out.freeze()
}

#[cfg(test)]
mod tests;
