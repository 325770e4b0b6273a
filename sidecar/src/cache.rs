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
//!   when it drops, the entries it covered are flushed (see `tracking.rs`);
//! * an entry lives at most its key's own remaining TTL (`PTTL`, read with
//!   the fill), so a key Redis is slow to expire is not served past it;
//! * invalidation is per key: every fill of a key gets an [`Alive`] flag,
//!   indexed by key, that its entry shares; an invalidation clears the key's
//!   flags synchronously, so a fill that raced it is not kept and its entry,
//!   if already in, is unservable at once. Writes of other keys leave an
//!   entry alone however many there are.
//!
//! Concurrent identical misses are coalesced: the first starts one upstream
//! fetch in a task, the others wait on its result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::lock;
use crate::metrics::Metrics;
use crate::order::{StageRx, Turn};
use crate::slot;

/// Which read a cached reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Get,
    HGetAll,
    HGet,
}

#[derive(Debug, Clone, Eq)]
pub struct CacheKey {
    pub variant: Variant,
    /// RESP version of the reply (HGETALL differs between 2 and 3).
    pub proto: u8,
    pub key: Bytes,
    /// The hash field for `HGET`, empty otherwise.
    pub field: Bytes,
}

// Equality compares the keys' bytes in a plain loop: for keys this short,
// glibc's `memcmp` (called by `Bytes`' `==`) was 11 % of a cache hit's CPU
// time at `-P 16` (perf, cpu-clock), the loop does not show.
impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.variant == other.variant
            && self.proto == other.proto
            && short_eq(&self.key, &other.key)
            && short_eq(&self.field, &other.field)
    }
}

// As derived; written out only because `eq` is.
impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.variant.hash(state);
        self.proto.hash(state);
        self.key.hash(state);
        self.field.hash(state);
    }
}

fn short_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

impl CacheKey {
    /// The same key in allocations of its own. A key built from a request
    /// shares the client's read buffer (and a reply the upstream
    /// connection's): kept in the cache, it would keep that whole buffer
    /// alive, up to the largest request or reply it ever held, and the
    /// cache's byte bound would bound nothing.
    fn detached(&self) -> CacheKey {
        CacheKey {
            variant: self.variant,
            proto: self.proto,
            key: Bytes::copy_from_slice(&self.key),
            field: Bytes::copy_from_slice(&self.field),
        }
    }

    fn weight(&self, value: &Bytes) -> u32 {
        let w = self.key.len() + self.field.len() + value.len() + 64;
        u32::try_from(w).unwrap_or(u32::MAX)
    }
}

/// Cleared when the key is invalidated: shared by a fill and the entry it
/// inserts, so an invalidation at any time after the fill started makes its
/// value unservable at once (before the write that caused it is even sent).
type Alive = Arc<AtomicBool>;

#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
    alive: Alive,
    /// The TTL bound, on tokio's clock (so it is testable with paused time);
    /// moka's own TTL, on its clock, reclaims the memory.
    expires: tokio::time::Instant,
}
type Waiter = watch::Receiver<Option<Bytes>>;

impl Entry {
    fn servable(&self) -> bool {
        self.servable_at(tokio::time::Instant::now())
    }

    fn servable_at(&self, now: tokio::time::Instant) -> bool {
        self.alive.load(Ordering::SeqCst) && now < self.expires
    }
}

/// What a fill brings back: the reply, and at most how long it may be kept
/// (`None`: the cache's TTL). See [`life_from_pttl`].
pub type Filled = (Bytes, Option<Duration>);

/// The bound a key's `PTTL` reply puts on its entry: its remaining life, none
/// for a key without a TTL (or without the key: a nil reply), and zero (do
/// not keep) for a reply that is not a number.
pub fn life_from_pttl(reply: &[u8]) -> Option<Duration> {
    let n = reply
        .strip_prefix(b":")
        .and_then(|r| r.strip_suffix(b"\r\n"))
        .and_then(|r| std::str::from_utf8(r).ok())
        .and_then(|r| r.parse::<i64>().ok());
    match n {
        Some(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        Some(-1 | -2) => None,
        _ => Some(Duration::ZERO),
    }
}

/// A fill in flight: its askers join it until an invalidation of its key.
struct InFlight {
    value: Waiter,
    stage: StageRx,
}

/// What [`LocalCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Bytes),
    /// A shared fill: `stage` says when its request is queued upstream,
    /// `value` delivers its reply.
    Fill {
        stage: StageRx,
        value: Waiter,
    },
}

pub struct LocalCache {
    /// Hashed with aHash, keyed at random per process like the default
    /// SipHash (keys come from clients) but cheaper: a hit at `-P 1` went
    /// from 7.05k to 6.72k instructions (callgrind, BENCHMARKS.md).
    cache: moka::future::Cache<CacheKey, Entry, ahash::RandomState>,
    ttl: Duration,
    /// Bumped by flushes: a fill that started before a flush is not kept.
    fill_gen: AtomicU64,
    prefixes: Vec<Vec<u8>>,
    /// The [`Alive`] flags of every fill and entry of each key (all variants
    /// and fields), pruned of the ones nothing holds any more.
    alive: Mutex<HashMap<Bytes, Vec<Alive>>>,
    inflight: Mutex<HashMap<CacheKey, InFlight>>,
    /// The entries hit lately, read without moka's bookkeeping (`front.rs`).
    front: front::Front,
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
            .build_with_hasher(ahash::RandomState::new());
        Arc::new(LocalCache {
            cache,
            ttl: cfg.ttl.min(CacheConfig::MAX_TTL),
            prefixes: cfg.prefixes.iter().map(|p| p.as_bytes().to_vec()).collect(),
            fill_gen: AtomicU64::new(0),
            alive: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            front: front::Front::default(),
            metrics,
        })
    }

    pub fn prefixes(&self) -> &[Vec<u8>] {
        &self.prefixes
    }

    pub fn covers(&self, key: &[u8]) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// A new [`Alive`] flag for a fill of `key`, indexed so an invalidation
    /// of the key finds it.
    fn new_alive(&self, key: &Bytes) -> Alive {
        let alive = Arc::new(AtomicBool::new(true));
        let mut map = lock(&self.alive);
        // Copied: `key` is the request's (see `CacheKey::detached`). Once
        // per fill, and fills are rare.
        let flags = map.entry(Bytes::copy_from_slice(key)).or_default();
        // Flags only the index still holds belong to fills that were not
        // kept or entries moka dropped.
        flags.retain(|f| Arc::strong_count(f) > 1 && f.load(Ordering::SeqCst));
        flags.push(alive.clone());
        alive
    }

    /// A fresh entry for `key`, without waiting: the client task's fast path
    /// (no per-request future). Same freshness rules as [`Self::get_or_fetch`];
    /// `None` (counted nowhere) sends the caller down the ordinary path, which
    /// counts the miss.
    pub fn try_hit(&self, key: &CacheKey) -> Option<Bytes> {
        self.try_hit_at(key, tokio::time::Instant::now())
    }

    /// [`Self::try_hit`] at `now`, which the caller read for the hit's
    /// latency too (clock reads were 9 % of a hit's CPU samples).
    pub fn try_hit_at(&self, key: &CacheKey, now: tokio::time::Instant) -> Option<Bytes> {
        use futures_util::FutureExt;
        if let Some(value) = self.front.get(key, now) {
            self.metrics.cache_hits.inc();
            return Some(value);
        }
        // moka's `get` completes on its first poll; if it ever did not, the
        // ordinary path answers instead.
        let e = self.cache.get(key).now_or_never().flatten()?;
        if e.servable_at(now) {
            self.metrics.cache_hits.inc();
            self.front.offer(key, &e);
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
        F: Future<Output = Filled> + Send + 'static,
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
        Fut: Future<Output = Filled> + Send + 'static,
    {
        let mut rechecked = false;
        loop {
            if let Some(e) = self.cache.get(&key).await
                && e.servable()
            {
                self.metrics.cache_hits.inc();
                return Lookup::Hit(e.value);
            }
            let mut inflight = lock(&self.inflight);
            if let Some(f) = inflight.get(&key) {
                self.metrics.cache_misses.inc();
                self.metrics.coalesced.inc();
                return Lookup::Fill {
                    stage: f.stage.clone(),
                    value: f.value.clone(),
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
            // Before the fill is joinable, so an invalidation from now on
            // reaches it.
            let alive = self.new_alive(&key.key);
            let (tx, rx) = watch::channel(None);
            let (turn, stage) = Turn::detached();
            let fill = InFlight {
                value: rx.clone(),
                stage: stage.clone(),
            };
            inflight.insert(key.clone(), fill);
            drop(inflight);
            self.spawn_fill(key, cacheable, tx, alive, fetch(turn));
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
    /// get the value) and keep its result unless an invalidation or a flush
    /// raced it, for at most the cache TTL and the key's own remaining life.
    fn spawn_fill<Fut>(
        self: &Arc<Self>,
        key: CacheKey,
        cacheable: bool,
        tx: watch::Sender<Option<Bytes>>,
        alive: Alive,
        fetch: Fut,
    ) where
        Fut: Future<Output = Filled> + Send + 'static,
    {
        let gen_at_start = self.fill_gen.load(Ordering::SeqCst);
        let this = self.clone();
        tokio::spawn(async move {
            // The key's PTTL was read after this instant: counting its life
            // from here errs on the short side.
            let started = tokio::time::Instant::now();
            let (value, key_life) = fetch.await;
            let ok = !value.starts_with(b"-");
            let life = key_life.map_or(this.ttl, |l| l.min(this.ttl));
            let unchanged = |c: &LocalCache| {
                alive.load(Ordering::SeqCst) && c.fill_gen.load(Ordering::SeqCst) == gen_at_start
            };
            if cacheable && ok && !life.is_zero() && unchanged(&this) {
                // Copied out of the buffers they were read into (see
                // `CacheKey::detached`).
                let entry = Entry {
                    value: Bytes::copy_from_slice(&value),
                    alive: alive.clone(),
                    expires: started + life,
                };
                this.cache.insert(key.detached(), entry).await;
                // A flush between the check and the insert wins (an
                // invalidation clears `alive`, which the entry shares).
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
                    .is_some_and(|f| f.value.same_channel(&tx.subscribe()))
                {
                    inflight.remove(&key);
                }
            }
            tx.send_replace(Some(value));
        });
    }

    /// Make every entry for `key` (and only `key`) unservable at once and
    /// racing fetches discard their result. Synchronous, so a write can call
    /// it before it is sent and a read pipelined behind that write cannot see
    /// the old value.
    pub fn bump(&self, key: &[u8]) {
        if let Some(flags) = lock(&self.alive).remove(key) {
            flags.iter().for_each(|f| f.store(false, Ordering::SeqCst));
        }
        lock(&self.inflight).retain(|k, _| k.key.as_ref() != key);
    }

    /// [`LocalCache::bump`], then drop the entries to free their memory
    /// (`HGET` entries, one per field, are left to the TTL and the byte
    /// bound: finding them would take a scan).
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
    }

    /// Make every entry whose key hashes into `slots` (a shard whose tracking
    /// connection dropped), or every entry when `slots` is `None`,
    /// unservable at once, and drop them.
    pub fn flush(&self, slots: Option<Vec<(u16, u16)>>, source: &str) {
        self.fill_gen.fetch_add(1, Ordering::SeqCst);
        lock(&self.inflight).clear();
        let in_ranges = |ranges: &[(u16, u16)], key: &[u8]| {
            let s = slot::slot(key);
            ranges.iter().any(|&(a, b)| a <= s && s <= b)
        };
        {
            let mut map = lock(&self.alive);
            map.retain(|key, flags| {
                let hit = slots.as_deref().is_none_or(|r| in_ranges(r, key));
                if hit {
                    flags.iter().for_each(|f| f.store(false, Ordering::SeqCst));
                }
                !hit
            });
        }
        // Its entries are unservable already (their flags are cleared);
        // this frees them.
        self.front.clear();
        match slots {
            None => self.cache.invalidate_all(),
            Some(ranges) => {
                let _ = self
                    .cache
                    .invalidate_entries_if(move |k, _| in_ranges(&ranges, &k.key));
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
        // Flags only the index holds: fills not kept, entries moka dropped.
        lock(&self.alive).retain(|_, flags| {
            flags.retain(|f| Arc::strong_count(f) > 1 && f.load(Ordering::SeqCst));
            !flags.is_empty()
        });
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

mod front;
#[cfg(test)]
mod tests;
