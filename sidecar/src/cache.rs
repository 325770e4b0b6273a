//! The local hot-key cache (lesson 4 of PRODUCT.md) and its invalidation.
//!
//! Only keys under configured prefixes are cached; values are the raw reply
//! bytes exactly as Redis sent them, so a hit is a memcpy into the client's
//! buffer. Entries live at most `ttl` and the whole cache is bounded in bytes
//! by a moka weigher. Cached reads: `GET`, `MGET` (per key), `HGET`, `HGETALL`.
//!
//! Freshness, beyond the published design:
//! * a write through this sidecar invalidates the key before it is sent and
//!   again when its reply arrives;
//! * every primary has a tracking connection (`HELLO 3` + `CLIENT TRACKING on
//!   BCAST PREFIX ...`) whose invalidation pushes evict keys changed by
//!   *anyone*, within milliseconds;
//! * entries are only kept for slots whose primary's tracking connection is up;
//!   when it drops, the entries it covered are flushed;
//! * a fetch that raced with an invalidation is not inserted (striped epochs).
//!
//! Concurrent identical misses are coalesced: the first starts one upstream
//! fetch in a task, the others wait on its result.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::lock;
use crate::metrics::Metrics;
use crate::order::{Stage, Turn};
use crate::resp::{self, Frame, Limits};
use crate::slot;
use crate::topology::Registry;
use crate::upstream::Node;

/// Which read a cached reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Get,
    HGetAll,
    HGet,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub variant: Variant,
    /// RESP version of the reply (HGETALL differs between 2 and 3).
    pub proto: u8,
    pub key: Bytes,
    /// The hash field for `HGET`, empty otherwise.
    pub field: Bytes,
}

impl CacheKey {
    fn weight(&self, value: &Bytes) -> u32 {
        let w = self.key.len() + self.field.len() + value.len() + 64;
        u32::try_from(w).unwrap_or(u32::MAX)
    }
}

/// Invalidation epochs are striped by key hash; an entry is served only while
/// its stripe's epoch is the one it was filled under, so a bump invalidates
/// synchronously (before the write that caused it is even sent).
const STRIPES: usize = 4096;

#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
    epoch: u64,
    /// The TTL bound, on tokio's clock (so it is testable with paused time);
    /// moka's own TTL, on its clock, reclaims the memory.
    expires: tokio::time::Instant,
}
type Waiter = watch::Receiver<Option<Bytes>>;

/// What [`LocalCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Bytes),
    /// A shared fill: `stage` says when its request is queued upstream,
    /// `value` delivers its reply.
    Fill {
        stage: watch::Receiver<Stage>,
        value: Waiter,
    },
}

pub struct LocalCache {
    cache: moka::future::Cache<CacheKey, Entry>,
    ttl: Duration,
    /// Bumped by flushes: a fill that started before a flush is not kept.
    fill_gen: AtomicU64,
    prefixes: Vec<Vec<u8>>,
    epochs: Vec<AtomicU64>,
    inflight: Mutex<HashMap<CacheKey, (Waiter, watch::Receiver<Stage>)>>,
    /// Keys that may have `HGET` entries (those need a predicate to invalidate).
    hget_keys: Mutex<HashSet<Bytes>>,
    metrics: Metrics,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCache")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

fn stripe(key: &[u8]) -> usize {
    usize::from(slot::crc16(key)) % STRIPES
}

impl LocalCache {
    pub fn new(cfg: &CacheConfig, metrics: Metrics) -> Arc<Self> {
        let evictions = metrics.cache_evictions.clone();
        let cache = moka::future::Cache::builder()
            .max_capacity(cfg.max_bytes)
            .weigher(|k: &CacheKey, v: &Entry| k.weight(&v.value))
            .time_to_live(cfg.ttl.min(CacheConfig::MAX_TTL))
            .support_invalidation_closures()
            .eviction_listener(move |_k, _v, cause| {
                if cause.was_evicted() {
                    evictions.inc();
                }
            })
            .build();
        Arc::new(LocalCache {
            cache,
            ttl: cfg.ttl.min(CacheConfig::MAX_TTL),
            prefixes: cfg.prefixes.iter().map(|p| p.as_bytes().to_vec()).collect(),
            epochs: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            fill_gen: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
            hget_keys: Mutex::new(HashSet::new()),
            metrics,
        })
    }

    pub fn prefixes(&self) -> &[Vec<u8>] {
        &self.prefixes
    }

    pub fn covers(&self, key: &[u8]) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p))
    }

    fn epoch(&self, key: &[u8]) -> u64 {
        self.epochs[stripe(key)].load(Ordering::SeqCst)
    }

    /// A fresh entry for `key`, without waiting: the client task's fast path
    /// (no per-request future). Same freshness rules as [`Self::get_or_fetch`];
    /// `None` (counted nowhere) sends the caller down the ordinary path, which
    /// counts the miss.
    pub fn try_hit(&self, key: &CacheKey) -> Option<Bytes> {
        use futures_util::FutureExt;
        // moka's `get` completes on its first poll; if it ever did not, the
        // ordinary path answers instead.
        let e = self.cache.get(key).now_or_never().flatten()?;
        if e.epoch == self.epoch(&key.key) && tokio::time::Instant::now() < e.expires {
            self.metrics.cache_hits.inc();
            Some(e.value)
        } else {
            None
        }
    }

    /// Serve `key` from the cache, or run `fetch` once for all concurrent
    /// askers. `cacheable` is false when the key's primary is not tracked; the
    /// fetch is still coalesced but its result is not kept.
    pub async fn get_or_fetch<F>(self: &Arc<Self>, key: CacheKey, cacheable: bool, fetch: F) -> Bytes
    where
        F: Future<Output = Bytes> + Send + 'static,
    {
        match self.lookup(key, cacheable, move |_turn| fetch).await {
            Lookup::Hit(v) => v,
            Lookup::Fill { value, .. } => Self::fill_result(value).await,
        }
    }

    /// A fresh entry for `key`, or the key's shared fill: joined if one is in
    /// flight, else started with `fetch`, which gets the fill's [`Turn`] to
    /// mark when its request is queued upstream (its askers' successors may
    /// follow it on that connection, see `order.rs`).
    pub async fn lookup<F, Fut>(self: &Arc<Self>, key: CacheKey, cacheable: bool, fetch: F) -> Lookup
    where
        F: FnOnce(Turn) -> Fut,
        Fut: Future<Output = Bytes> + Send + 'static,
    {
        let mut rechecked = false;
        loop {
            if let Some(e) = self.cache.get(&key).await
                && e.epoch == self.epoch(&key.key)
                && tokio::time::Instant::now() < e.expires
            {
                self.metrics.cache_hits.inc();
                return Lookup::Hit(e.value);
            }
            let mut inflight = lock(&self.inflight);
            if let Some((value, stage)) = inflight.get(&key) {
                self.metrics.cache_misses.inc();
                self.metrics.coalesced.inc();
                return Lookup::Fill {
                    stage: stage.clone(),
                    value: value.clone(),
                };
            }
            // A fetch may have finished between our cache lookup and taking
            // the lock (it inserts, then leaves the in-flight map): look again
            // once rather than fetching a second time.
            if !rechecked && self.cache.contains_key(&key) {
                drop(inflight);
                rechecked = true;
                continue;
            }
            self.metrics.cache_misses.inc();
            let (tx, rx) = watch::channel(None);
            let (turn, stage) = Turn::detached();
            inflight.insert(key.clone(), (rx.clone(), stage.clone()));
            drop(inflight);
            self.spawn_fill(key, cacheable, tx, fetch(turn));
            return Lookup::Fill { stage, value: rx };
        }
    }

    /// The fill's reply, once it arrives.
    pub async fn fill_result(mut value: Waiter) -> Bytes {
        match value.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => Bytes::from_static(b"-ERR cachetier: cache fetch was cancelled\r\n"),
        }
    }

    /// Run a fill in its own task (its askers may go away; the others still
    /// get the value) and keep its result unless an invalidation raced it.
    fn spawn_fill<Fut>(
        self: &Arc<Self>,
        key: CacheKey,
        cacheable: bool,
        tx: watch::Sender<Option<Bytes>>,
        fetch: Fut,
    ) where
        Fut: Future<Output = Bytes> + Send + 'static,
    {
        let epoch = self.epoch(&key.key);
        let gen_at_start = self.fill_gen.load(Ordering::SeqCst);
        let this = self.clone();
        tokio::spawn(async move {
            let value = fetch.await;
            let ok = !value.starts_with(b"-");
            let unchanged = |c: &LocalCache| {
                c.epoch(&key.key) == epoch && c.fill_gen.load(Ordering::SeqCst) == gen_at_start
            };
            if cacheable && ok && unchanged(&this) {
                if key.variant == Variant::HGet {
                    lock(&this.hget_keys).insert(key.key.clone());
                }
                let entry = Entry {
                    value: value.clone(),
                    epoch,
                    expires: tokio::time::Instant::now() + this.ttl,
                };
                this.cache.insert(key.clone(), entry).await;
                // An invalidation between the check and the insert wins.
                if !unchanged(&this) {
                    this.cache.invalidate(&key).await;
                }
            }
            {
                let mut inflight = lock(&this.inflight);
                // Only remove our own entry: an invalidation may have
                // replaced it with a newer fetch.
                if inflight
                    .get(&key)
                    .is_some_and(|(r, _)| r.same_channel(&tx.subscribe()))
                {
                    inflight.remove(&key);
                }
            }
            tx.send_replace(Some(value));
        });
    }

    /// Make every entry for `key` unservable at once and racing fetches
    /// discard their result. Synchronous, so a write can call it before it
    /// is sent and a read pipelined behind that write cannot see the old value.
    pub fn bump(&self, key: &[u8]) {
        self.epochs[stripe(key)].fetch_add(1, Ordering::SeqCst);
        lock(&self.inflight).retain(|k, _| k.key.as_ref() != key);
    }

    /// [`LocalCache::bump`], then drop the entries to free their memory.
    pub async fn invalidate(&self, key: &[u8], source: &str) {
        self.bump(key);
        let key = Bytes::copy_from_slice(key);
        for variant in [Variant::Get, Variant::HGetAll] {
            for proto in [2, 3] {
                let ck = CacheKey {
                    variant,
                    proto,
                    key: key.clone(),
                    field: Bytes::new(),
                };
                if self.cache.remove(&ck).await.is_some() {
                    self.metrics
                        .cache_invalidations
                        .with_label_values(&[source])
                        .inc();
                }
            }
        }
        let had_hget = lock(&self.hget_keys).remove(&key);
        if had_hget {
            let k = key.clone();
            let _ = self
                .cache
                .invalidate_entries_if(move |ck, _| ck.variant == Variant::HGet && ck.key == k);
            self.metrics
                .cache_invalidations
                .with_label_values(&[source])
                .inc();
        }
    }

    /// Drop every entry whose key hashes into `slots` (a shard whose tracking
    /// connection dropped), or everything when `slots` is `None`.
    pub fn flush(&self, slots: Option<Vec<(u16, u16)>>, source: &str) {
        self.fill_gen.fetch_add(1, Ordering::SeqCst);
        lock(&self.inflight).clear();
        match slots {
            None => {
                self.cache.invalidate_all();
                lock(&self.hget_keys).clear();
            }
            Some(ranges) => {
                let _ = self.cache.invalidate_entries_if(move |k, _| {
                    let s = slot::slot(&k.key);
                    ranges.iter().any(|&(a, b)| a <= s && s <= b)
                });
            }
        }
        self.metrics
            .cache_invalidations
            .with_label_values(&[source])
            .inc();
    }

    /// Run pending maintenance and publish size gauges.
    pub async fn export(&self) {
        self.cache.run_pending_tasks().await;
        self.metrics
            .cache_bytes
            .set(i64::try_from(self.cache.weighted_size()).unwrap_or(i64::MAX));
        self.metrics
            .cache_entries
            .set(i64::try_from(self.cache.entry_count()).unwrap_or(i64::MAX));
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep one tracking connection per current primary.
pub async fn run_tracking(
    cache: Arc<LocalCache>,
    registry: Arc<Registry>,
    timeout: Duration,
    auth: Option<crate::config::Credentials>,
) {
    // Dropping the map (this task aborted on shutdown) aborts every session.
    let mut tasks: HashMap<String, AbortOnDrop> = HashMap::new();
    let mut last_primaries: Vec<String> = Vec::new();
    loop {
        let topo = registry.current();
        let mut primaries: Vec<String> = topo.shards.iter().map(|s| s.primary.addr.clone()).collect();
        primaries.sort();
        if primaries != last_primaries && !last_primaries.is_empty() {
            // Slot ownership moved: entries may now belong to untracked shards.
            cache.flush(None, "topology");
        }
        last_primaries = primaries.clone();
        tasks.retain(|addr, h| primaries.contains(addr) && !h.0.is_finished());
        for shard in &topo.shards {
            let addr = shard.primary.addr.clone();
            if tasks.contains_key(&addr) {
                continue;
            }
            let node = shard.primary.clone();
            let slots = shard.slots.clone();
            let cache = cache.clone();
            let auth = auth.clone();
            tasks.insert(
                addr,
                AbortOnDrop(tokio::spawn(async move {
                    let why = track(&cache, &node, timeout, auth.as_ref()).await;
                    node.tracked.store(false, Ordering::SeqCst);
                    tracing::warn!(node = %node.addr, %why, "tracking connection lost; flushing the entries it covered");
                    cache.flush(Some(slots), "tracking_lost");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                })),
            );
        }
        drop(topo);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One tracking session; returns why it ended.
async fn track(
    cache: &LocalCache,
    node: &Node,
    timeout: Duration,
    auth: Option<&crate::config::Credentials>,
) -> String {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(&node.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("connect: {e}"),
        Err(_) => return "connect timed out".into(),
    };
    let (mut rd, mut wr) = stream.into_split();
    let mut cmd: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"on", b"BCAST"];
    for p in cache.prefixes() {
        cmd.push(b"PREFIX");
        cmd.push(p);
    }
    let mut out = BytesMut::new();
    // The same opening as every connection, in RESP3 for the pushes.
    let mut awaiting = crate::upstream::opening(auth, crate::upstream::Proto::Resp3, &mut out) + 1;
    resp::encode_command(&cmd, &mut out);
    if let Err(e) = wr.write_all(&out).await {
        return format!("write: {e}");
    }
    let mut buf = BytesMut::with_capacity(4096);
    // Resumable: a large push arriving over many reads is checked once.
    let mut checker = resp::Checker::new(Limits::upstream());
    let mut ping_sent: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut tick = tokio::time::interval(timeout.min(Duration::from_secs(1)));
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
                Frame::Push(items) => {
                    let is_inval =
                        matches!(items.first(), Some(Frame::Bulk(b)) if b.as_ref() == b"invalidate");
                    if !is_inval {
                        continue;
                    }
                    match items.get(1) {
                        Some(Frame::Array(keys)) | Some(Frame::Set(keys)) => {
                            for k in keys {
                                if let Frame::Bulk(k) = k {
                                    cache.invalidate(k, "tracking").await;
                                }
                            }
                        }
                        // A null key list means "everything" (FLUSHALL).
                        _ => cache.flush(None, "tracking"),
                    }
                }
                Frame::Error(e) | Frame::BulkError(e) => {
                    return format!("error: {}", String::from_utf8_lossy(&e));
                }
                _ => {
                    if awaiting > 0 {
                        awaiting -= 1;
                        if awaiting == 0 {
                            node.tracked.store(true, Ordering::SeqCst);
                            tracing::debug!(node = %node.addr, "tracking established");
                        }
                    }
                    // Any reply proves liveness (PONG or the handshake).
                    ping_sent = None;
                }
            }
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return "eof".into(),
                Ok(_) => {}
                Err(e) => return format!("read: {e}"),
            },
            _ = tick.tick() => {
                if let Some(at) = ping_sent {
                    if at.elapsed() >= timeout {
                        return "no reply to PING within the response timeout".into();
                    }
                } else {
                    if let Err(e) = wr.write_all(&resp::command_bytes(&["PING"])).await {
                        return format!("write: {e}");
                    }
                    ping_sent = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn cache(ttl: Duration, max_bytes: u64) -> Arc<LocalCache> {
        let cfg = CacheConfig {
            prefixes: vec!["hot:".into()],
            ttl,
            max_bytes,
        };
        LocalCache::new(&cfg, Metrics::new().unwrap())
    }

    fn key(k: &str) -> CacheKey {
        CacheKey {
            variant: Variant::Get,
            proto: 2,
            key: Bytes::copy_from_slice(k.as_bytes()),
            field: Bytes::new(),
        }
    }

    fn counting_fetch(
        calls: &Arc<AtomicUsize>,
        value: &'static str,
        delay: Duration,
    ) -> impl Future<Output = Bytes> + Send + 'static {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            Bytes::from_static(value.as_bytes())
        }
    }

    #[tokio::test]
    async fn concurrent_identical_misses_share_one_fetch() {
        let c = cache(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let c = c.clone();
            let f = counting_fetch(&calls, "$1\r\nv\r\n", Duration::from_millis(50));
            tasks.push(tokio::spawn(async move {
                c.get_or_fetch(key("hot:a"), true, f).await
            }));
        }
        for t in tasks {
            assert_eq!(&t.await.unwrap()[..], b"$1\r\nv\r\n");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(c.metrics.coalesced.get() >= 900, "{}", c.metrics.coalesced.get());
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_is_served_for_exactly_its_ttl() {
        let c = cache(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let read = |c: &Arc<LocalCache>| {
            let f = counting_fetch(&calls, "+v\r\n", Duration::ZERO);
            let c = c.clone();
            async move { c.get_or_fetch(key("hot:ttl"), true, f).await }
        };
        read(&c).await;
        tokio::time::advance(Duration::from_secs(59)).await;
        read(&c).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "still fresh at 59 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        read(&c).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "refetched after 60 s");
    }

    // moka's own expiry runs on its clock, not tokio's: a short real TTL
    // shows that memory is reclaimed too.
    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let c = cache(Duration::from_millis(200), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        c.get_or_fetch(
            key("hot:t"),
            true,
            counting_fetch(&calls, "+a\r\n", Duration::ZERO),
        )
        .await;
        c.get_or_fetch(
            key("hot:t"),
            true,
            counting_fetch(&calls, "+a\r\n", Duration::ZERO),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "second read is a hit");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.get_or_fetch(
            key("hot:t"),
            true,
            counting_fetch(&calls, "+a\r\n", Duration::ZERO),
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired entry is fetched again");
    }

    #[tokio::test]
    async fn a_fetch_that_races_an_invalidation_is_not_kept() {
        let c = cache(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = c.clone();
        let slow = tokio::spawn({
            let f = counting_fetch(&calls, "+old\r\n", Duration::from_millis(100));
            async move { c2.get_or_fetch(key("hot:r"), true, f).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.invalidate(b"hot:r", "own_write").await;
        slow.await.unwrap();
        let v = c
            .get_or_fetch(
                key("hot:r"),
                true,
                counting_fetch(&calls, "+new\r\n", Duration::ZERO),
            )
            .await;
        assert_eq!(&v[..], b"+new\r\n");
    }

    #[tokio::test]
    async fn a_bump_makes_the_entry_unservable_at_once() {
        let c = cache(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        c.get_or_fetch(
            key("hot:b"),
            true,
            counting_fetch(&calls, "+old\r\n", Duration::ZERO),
        )
        .await;
        c.bump(b"hot:b");
        let v = c
            .get_or_fetch(
                key("hot:b"),
                true,
                counting_fetch(&calls, "+new\r\n", Duration::ZERO),
            )
            .await;
        assert_eq!(&v[..], b"+new\r\n");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn error_replies_and_untracked_keys_are_not_cached() {
        let c = cache(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            c.get_or_fetch(
                key("hot:e"),
                true,
                counting_fetch(&calls, "-ERR x\r\n", Duration::ZERO),
            )
            .await;
            c.get_or_fetch(
                key("hot:u"),
                false,
                counting_fetch(&calls, "+v\r\n", Duration::ZERO),
            )
            .await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn the_byte_budget_bounds_the_cache() {
        let c = cache(Duration::from_secs(60), 64 * 1024);
        let value: &'static str =
            Box::leak(format!("${}\r\n{}\r\n", 1000, "x".repeat(1000)).into_boxed_str());
        let calls = Arc::new(AtomicUsize::new(0));
        for i in 0..500 {
            c.get_or_fetch(
                key(&format!("hot:{i}")),
                true,
                counting_fetch(&calls, value, Duration::ZERO),
            )
            .await;
        }
        c.run_pending_tasks().await;
        assert!(c.weighted_size() <= 64 * 1024, "{}", c.weighted_size());
        assert!(
            c.weighted_size() > 32 * 1024,
            "the budget is used: {}",
            c.weighted_size()
        );
    }
}
