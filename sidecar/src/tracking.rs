//! Invalidation feeds: one `CLIENT TRACKING … BCAST` connection per current
//! primary, for whatever [`Feed`] wants the nodes' invalidations. The local
//! cache has one (see `cache.rs` for what it does with it); clients that turn
//! on `CLIENT TRACKING` share another (`client_cache.rs`).
//!
//! How long a possibly-stale entry can be served after a tracking failure is
//! the time it takes to notice the failure: an EOF or a reset is noticed at
//! once; a half-open link (no FIN, no RST: a dead peer, a dropped route) by
//! a `PING` sent every quarter of the response timeout that must be answered
//! within the response timeout, so within 1.25 × `--response-timeout`. On
//! notice, the node stops being `tracked` and every entry of the slots it
//! owned (when its session started and now, so slots gained in a reshard are
//! covered) becomes unservable at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cache::LocalCache;
use crate::config::Credentials;
use crate::resp::{self, Frame, Limits};
use crate::slot::SLOTS;
use crate::topology::{Registry, Snapshot, Topology};
use crate::upstream::{self, Node, Proto};

/// What a feed's owner does with what the nodes say and with the feed's
/// failures.
pub(crate) trait Feed: Send + Sync + 'static {
    /// The `PREFIX`es to ask for (none: every key).
    fn prefixes(&self) -> Vec<Vec<u8>>;
    /// Whether the feed is wanted now (while not, no connection is kept).
    fn wanted(&self) -> bool {
        true
    }
    /// Resolves when [`Feed::wanted`] may have turned true.
    fn woken(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
    /// `node`'s session is established: its invalidations arrive from now.
    fn established(&self, node: &Node);
    /// `node`'s session is over, or never was (aborted or failed): from now
    /// on its invalidations may be missed until a new session is established.
    fn ended(&self, node: &Node);
    /// `node`'s session failed; `slots` are those it owned when the session
    /// started and now.
    fn lost(&self, node: &Node, slots: Vec<(u16, u16)>, why: &str);
    /// These slots changed hands (failover, reshard).
    fn moved(&self, slots: Vec<(u16, u16)>);
    /// An `invalidate` push: these keys changed, or (`None`) every key did.
    fn invalidate(&self, keys: Option<&[Frame]>) -> impl Future<Output = ()> + Send;
}

impl Feed for LocalCache {
    fn prefixes(&self) -> Vec<Vec<u8>> {
        LocalCache::prefixes(self).to_vec()
    }

    fn established(&self, node: &Node) {
        node.tracked.store(true, Ordering::SeqCst);
    }

    fn ended(&self, node: &Node) {
        node.tracked.store(false, Ordering::SeqCst);
    }

    fn lost(&self, node: &Node, slots: Vec<(u16, u16)>, why: &str) {
        tracing::warn!(node = %node.addr, %why, "tracking connection lost; flushing the entries it covered");
        self.flush(Some(slots), "tracking_lost");
    }

    fn moved(&self, slots: Vec<(u16, u16)>) {
        // A slot that changed hands may have entries its new owner's
        // tracking never covered: they go.
        self.flush(Some(slots), "topology");
    }

    async fn invalidate(&self, keys: Option<&[Frame]>) {
        match keys {
            Some(keys) => {
                for k in keys {
                    if let Frame::Bulk(k) = k {
                        LocalCache::invalidate(self, k, "tracking").await;
                    }
                }
            }
            None => self.flush(None, "tracking"),
        }
    }
}

/// A session task: aborted when dropped, and its node's invalidations are
/// not followed from then on (a demoted primary must not count as tracked
/// when it is promoted again, before its new session is established).
struct Session<F: Feed> {
    task: tokio::task::JoinHandle<()>,
    node: Arc<Node>,
    feed: Arc<F>,
}

impl<F: Feed> Drop for Session<F> {
    fn drop(&mut self) {
        self.task.abort();
        self.feed.ended(&self.node);
    }
}

/// The slots `addr` is primary of in the current topology.
fn slots_of(registry: &Registry, addr: &str) -> Vec<(u16, u16)> {
    registry
        .current()
        .shards
        .iter()
        .filter(|s| s.primary.addr == addr)
        .flat_map(|s| s.slots.iter().copied())
        .collect()
}

/// Who owns each slot: a hash of its primary's address (0: nobody).
fn owners(topo: &Topology) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let mut owner = vec![0u64; usize::from(SLOTS)];
    for shard in &topo.shards {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        shard.primary.addr.hash(&mut h);
        let id = h.finish() | 1;
        for &(a, b) in &shard.slots {
            for s in a..=b {
                if let Some(o) = owner.get_mut(usize::from(s)) {
                    *o = id;
                }
            }
        }
    }
    owner
}

/// The slot ranges whose owner differs between two [`owners`] maps.
fn moved_slots(old: &[u64], new: &[u64]) -> Vec<(u16, u16)> {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for (s, (o, n)) in (0..SLOTS).zip(old.iter().zip(new)) {
        if o == n {
            continue;
        }
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => ranges.push((s, s)),
        }
    }
    ranges
}

/// Keep one tracking connection per current primary while `feed` wants them.
pub(crate) async fn run<F: Feed>(
    feed: Arc<F>,
    registry: Arc<Registry>,
    timeout: Duration,
    auth: Option<Credentials>,
) {
    // Dropping the map (this task aborted on shutdown) aborts every session.
    let mut sessions: HashMap<String, Session<F>> = HashMap::new();
    let mut last_owners: Vec<u64> = Vec::new();
    // Slot owners are compared only when the registry installed a new
    // topology (16384 slots: not every 200 ms).
    let mut snapshot = Snapshot::default();
    loop {
        if !feed.wanted() {
            sessions.clear();
            last_owners.clear();
            snapshot = Snapshot::default();
            tokio::select! {
                () = feed.woken() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let seen = snapshot.generation();
        let topo = snapshot.get(&registry).clone();
        let primaries: Vec<String> = topo.shards.iter().map(|s| s.primary.addr.clone()).collect();
        if snapshot.generation() != seen {
            let owners = owners(&topo);
            if !last_owners.is_empty() {
                let moved = moved_slots(&last_owners, &owners);
                if !moved.is_empty() {
                    feed.moved(moved);
                }
            }
            last_owners = owners;
        }
        sessions.retain(|addr, s| primaries.contains(addr) && !s.task.is_finished());
        for shard in &topo.shards {
            let addr = shard.primary.addr.clone();
            if sessions.contains_key(&addr) {
                continue;
            }
            let node = shard.primary.clone();
            feed.ended(&node);
            let task = tokio::spawn(session(
                feed.clone(),
                registry.clone(),
                node.clone(),
                shard.slots.clone(),
                timeout,
                auth.clone(),
            ));
            let feed = feed.clone();
            sessions.insert(addr, Session { task, node, feed });
        }
        drop(topo);
        tokio::select! {
            () = feed.woken() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// One tracking session and what follows its end.
async fn session<F: Feed>(
    feed: Arc<F>,
    registry: Arc<Registry>,
    node: Arc<Node>,
    mut slots: Vec<(u16, u16)>,
    timeout: Duration,
    auth: Option<Credentials>,
) {
    let why = track(&*feed, &node, timeout, auth.as_ref()).await;
    feed.ended(&node);
    // The slots it had when the session started and those it has now (a
    // reshard may have given it more since).
    slots.extend(slots_of(&registry, &node.addr));
    feed.lost(&node, slots, &why);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// How often an idle tracking connection is pinged: a quarter of the
/// response timeout, so a half-open link is noticed within 1.25 × it.
fn ping_every(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_millis(10))
}

/// One tracking session; returns why it ended.
async fn track<F: Feed>(feed: &F, node: &Node, timeout: Duration, auth: Option<&Credentials>) -> String {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(&node.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("connect: {e}"),
        Err(_) => return "connect timed out".into(),
    };
    let (mut rd, mut wr) = stream.into_split();
    let prefixes = feed.prefixes();
    let mut cmd: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"on", b"BCAST"];
    for p in &prefixes {
        cmd.push(b"PREFIX");
        cmd.push(p);
    }
    let mut out = BytesMut::new();
    // The same opening as every connection, in RESP3 for the pushes.
    let mut awaiting = upstream::opening(auth, Proto::Resp3, &mut out) + 1;
    resp::encode_command(&cmd, &mut out);
    if let Err(e) = wr.write_all(&out).await {
        return format!("write: {e}");
    }
    let mut buf = BytesMut::with_capacity(4096);
    // Resumable: a large push arriving over many reads is checked once.
    let mut checker = resp::Checker::new(Limits::upstream());
    // The handshake is the first thing that must be answered in time.
    let mut deadline = Some(tokio::time::Instant::now() + timeout);
    let mut tick = tokio::time::interval(ping_every(timeout));
    loop {
        loop {
            let n = match checker.check(&buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return format!("protocol: {e}"),
            };
            let raw = buf.split_to(n).freeze();
            let Ok(frame) = resp::parse(&raw) else {
                return "unparseable frame".into();
            };
            match frame {
                Frame::Push(items) => apply_push(feed, &items).await,
                Frame::Error(e) | Frame::BulkError(e) => {
                    return format!("error: {}", String::from_utf8_lossy(&e));
                }
                _ => {
                    if awaiting > 0 {
                        awaiting -= 1;
                        if awaiting == 0 {
                            feed.established(node);
                            tracing::debug!(node = %node.addr, "tracking established");
                        }
                    }
                    // Any reply proves liveness (PONG or the handshake).
                    if awaiting == 0 {
                        deadline = None;
                    }
                }
            }
        }
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return "eof".into(),
                Ok(_) => {}
                Err(e) => return format!("read: {e}"),
            },
            () = expired => return "no reply to PING within the response timeout".into(),
            _ = tick.tick(), if deadline.is_none() => {
                if let Err(e) = wr.write_all(&resp::command_bytes(&["PING"])).await {
                    return format!("write: {e}");
                }
                deadline = Some(tokio::time::Instant::now() + timeout);
            }
        }
    }
}

/// Hand what an `invalidate` push names to the feed's owner.
async fn apply_push<F: Feed>(feed: &F, items: &[Frame]) {
    let is_inval = matches!(items.first(), Some(Frame::Bulk(b)) if b.as_ref() == b"invalidate");
    if !is_inval {
        return;
    }
    match items.get(1) {
        Some(Frame::Array(keys)) | Some(Frame::Set(keys)) => feed.invalidate(Some(keys)).await,
        // A null key list means "everything" (FLUSHALL).
        _ => feed.invalidate(None).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_slots_that_changed_hands_count_as_moved() {
        let mut old = vec![1u64; usize::from(SLOTS)];
        old[8192..].fill(3);
        let mut new = old.clone();
        new[100] = 3;
        new[101] = 3;
        new[16383] = 5;
        assert_eq!(moved_slots(&old, &new), vec![(100, 101), (16383, 16383)]);
        assert!(moved_slots(&old, &old).is_empty());
    }

    #[tokio::test]
    async fn a_primary_whose_session_is_dropped_is_no_longer_tracked() {
        let settings = upstream::UpstreamSettings {
            response_timeout: Duration::from_secs(1),
            slow_timeout: Duration::from_secs(10),
            metrics: crate::metrics::Metrics::new().unwrap(),
            auth: None,
        };
        let node = Node::new("127.0.0.1:1".into(), settings);
        node.tracked.store(true, Ordering::SeqCst);
        // Dropped as when the node stops being a primary: its session task
        // is aborted, so nothing after `track` runs.
        let task = tokio::spawn(std::future::pending::<()>());
        let feed = LocalCache::new(
            &crate::CacheConfig::default(),
            crate::metrics::Metrics::new().unwrap(),
        );
        drop(Session {
            task,
            node: node.clone(),
            feed,
        });
        assert!(!node.tracked.load(Ordering::SeqCst));
    }

    #[test]
    fn a_half_open_tracking_link_is_noticed_within_a_quarter_more_than_the_timeout() {
        let timeout = Duration::from_secs(1);
        assert_eq!(ping_every(timeout) + timeout, Duration::from_millis(1250));
    }
}
