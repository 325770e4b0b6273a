//! From a parsed client command to a reply: key extraction, slot routing,
//! read balancing with one retry, MOVED/ASK, cross-slot split and merge, the
//! local cache, server-wide fan-out and pinned transactions.
//!
//! Every function here returns the raw reply bytes the client will see;
//! failures become RESP errors that say what the sidecar did. This file
//! holds dispatch, the client's state and single-slot routing (with the
//! cache and read-your-writes); `server.rs` the commands a server answers
//! about itself and the fan-outs, `transaction.rs` MULTI/EXEC and WATCH,
//! `split.rs` cross-slot split and merge, `../blocking.rs` blocking commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use rand::Rng;
use rand::seq::SliceRandom;

use crate::balance;
use crate::blocking::BlockingCell;
use crate::cache::{self, CacheKey, LocalCache, Lookup, Variant};
use crate::commands::{self, CommandInfo, KeyError, Kind, Split};
use crate::config::Config;
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::order::{ClientOrder, ReadFloor, Stage, StageRx, Turn};
use crate::resp::{self, Frame};
use crate::slot;
use crate::topology::Registry;
use crate::upstream::{Node, Proto};

mod pubsub_query;
mod server;
mod split;
mod transaction;

const MAX_REDIRECTS: usize = 5;

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Per-client-connection state that changes how later commands are answered.
#[derive(Debug)]
pub struct ClientState {
    pub id: u64,
    pub proto: u8,
    pub name: Option<Bytes>,
    /// Commands queued since MULTI.
    pub multi: Option<Vec<Vec<Bytes>>>,
    /// A command queued inside MULTI was refused: EXEC must abort.
    pub multi_failed: bool,
    /// Active `WATCH`: the client's keyed commands run on a connection of
    /// its own to the watched slot's primary until EXEC, DISCARD or UNWATCH.
    pub watch: Option<Arc<Watch>>,
    /// Keeps the client's commands in the order it sent them (`order.rs`).
    order: Arc<ClientOrder>,
    /// The stage of the client's latest command that went upstream.
    last: Option<StageRx>,
    /// The client's connection for blocking commands (`blocking.rs`).
    blocking: BlockingCell,
}

/// A client's WATCH connection, opened on first use.
#[derive(Debug)]
pub struct Watch {
    slot: u16,
    conn: tokio::sync::Mutex<Option<crate::upstream::Dedicated>>,
}

impl Default for ClientState {
    fn default() -> Self {
        Self {
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            proto: 2,
            name: None,
            multi: None,
            multi_failed: false,
            watch: None,
            order: Arc::new(ClientOrder::default()),
            last: None,
            blocking: BlockingCell::default(),
        }
    }
}

impl ClientState {
    fn upstream_proto(&self) -> Proto {
        if self.proto == 3 {
            Proto::Resp3
        } else {
            Proto::Resp2
        }
    }
}

/// The boxed reply future a client connection queues in pipeline order.
pub type ReplyFuture = std::pin::Pin<Box<dyn Future<Output = Bytes> + Send>>;

/// What the connection does with one parsed command.
pub enum Action {
    Reply(Bytes),
    Later(ReplyFuture),
    /// Reply, then close the connection (QUIT).
    Close(Bytes),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Reply(b) => f.debug_tuple("Reply").field(b).finish(),
            Action::Later(_) => f.write_str("Later"),
            Action::Close(b) => f.debug_tuple("Close").field(b).finish(),
        }
    }
}

fn err(msg: impl AsRef<str>) -> Bytes {
    let mut out = BytesMut::new();
    Frame::Error(Bytes::copy_from_slice(msg.as_ref().as_bytes())).encode(&mut out);
    out.freeze()
}

fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

fn encode(f: &Frame) -> Bytes {
    f.to_bytes()
}

fn null(proto: u8) -> Frame {
    if proto == 3 { Frame::Null } else { Frame::NullBulk }
}

fn map(proto: u8, pairs: Vec<(Frame, Frame)>) -> Frame {
    if proto == 3 {
        Frame::Map(pairs)
    } else {
        Frame::Array(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect())
    }
}

fn bulk(s: &str) -> Frame {
    Frame::Bulk(Bytes::copy_from_slice(s.as_bytes()))
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

/// Metric handles of one command, resolved once so the request path does
/// not hash label values.
#[derive(Debug, Clone)]
struct CommandMetrics {
    ok: prometheus::IntCounter,
    error: prometheus::IntCounter,
    latency: prometheus::Histogram,
}

impl CommandMetrics {
    /// Count a reply (an error reply as an error) and its latency.
    fn record(m: Option<&Self>, reply: &[u8], start: std::time::Instant) {
        if let Some(m) = m {
            if reply.starts_with(b"-") {
                m.error.inc();
            } else {
                m.ok.inc();
            }
            m.latency.observe(start.elapsed().as_secs_f64());
        }
    }
}

/// Shared by every client connection.
#[derive(Debug)]
pub struct Router {
    pub registry: Arc<Registry>,
    pub config: Config,
    pub metrics: Metrics,
    pub cache: Option<Arc<LocalCache>>,
    /// Resolved on a command's first use, so unused commands export nothing.
    per_command: Vec<std::sync::OnceLock<Arc<CommandMetrics>>>,
    /// Bounds the blocking connections of all clients (`blocking.rs`).
    pub(crate) blocking_permits: Arc<tokio::sync::Semaphore>,
}

impl Router {
    pub fn new(
        registry: Arc<Registry>,
        config: Config,
        metrics: Metrics,
        cache: Option<Arc<LocalCache>>,
    ) -> Router {
        let per_command = (0..commands::count())
            .map(|_| std::sync::OnceLock::new())
            .collect();
        Router {
            registry,
            config,
            metrics,
            cache,
            per_command,
            blocking_permits: crate::blocking::permits(),
        }
    }

    /// Decide what to do with one command. Connection-state commands are
    /// applied here, synchronously, so later pipelined commands see them.
    pub fn dispatch(self: &Arc<Self>, st: &mut ClientState, req: resp::Request) -> Action {
        let resp::Request { raw, args } = req;
        let Some(name) = args.first() else {
            return Action::Reply(err("ERR empty command"));
        };
        let Some(info) = commands::lookup(name) else {
            self.metrics
                .requests
                .with_label_values(&["unknown", "error"])
                .inc();
            let shown: String = String::from_utf8_lossy(name).chars().take(64).collect();
            return Action::Reply(err(format!(
                "ERR unknown command '{shown}': the cachetier sidecar does not know how to route it"
            )));
        };
        let (turn, next) = st.order.next(st.last.take());
        st.last = Some(next);
        let mut turn = Some(turn);
        let action = self.dispatch_inner(st, info, args, raw, &mut turn);
        match (action, turn) {
            // The keyed paths took the turn and order themselves.
            (action, None) => action,
            // Anything else that goes upstream runs after everything before
            // it has its reply, and everything after it waits for its reply.
            (Action::Later(fut), Some(mut turn)) => Action::Later(Box::pin(async move {
                turn.prev_done().await;
                let reply = fut.await;
                turn.finish().await;
                reply
            })),
            // Answered here: no place in the upstream order.
            (action, Some(turn)) => {
                st.last = turn.into_prev();
                action
            }
        }
    }

    /// Answer a cacheable read from the local cache without creating a
    /// future, if its entry is fresh. Only for a client with nothing else in
    /// flight (the caller checks) and no MULTI/WATCH state, so no earlier
    /// command of the same client can still be about to invalidate it.
    pub fn try_cached(&self, st: &ClientState, req: &resp::Request) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        if st.multi.is_some() || st.watch.is_some() {
            return None;
        }
        let info = commands::lookup(req.args.first()?)?;
        let variant = self.cache_variant(info, &req.args)?;
        let start = std::time::Instant::now();
        let key = CacheKey {
            variant,
            proto: st.proto,
            key: req.args[1].clone(),
            field: if variant == Variant::HGet {
                req.args[2].clone()
            } else {
                Bytes::new()
            },
        };
        let value = cache.try_hit(&key)?;
        let m = self
            .per_command
            .get(info.id)
            .map(|cell| cell.get_or_init(|| self.command_metrics(info)));
        CommandMetrics::record(m.map(|m| &**m), &value, start);
        Some(value)
    }

    fn command_metrics(&self, info: &'static CommandInfo) -> Arc<CommandMetrics> {
        Arc::new(CommandMetrics {
            ok: self.metrics.requests.with_label_values(&[info.name, "ok"]),
            error: self.metrics.requests.with_label_values(&[info.name, "error"]),
            latency: self.metrics.latency.with_label_values(&[info.name]),
        })
    }

    fn dispatch_inner(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: Vec<Bytes>,
        raw: Bytes,
        turn: &mut Option<Turn>,
    ) -> Action {
        if st.multi.is_some() {
            return self.queue_in_multi(st, info, args);
        }
        if st.watch.is_some()
            && let Some(action) = self.on_watch(st, info, &args, &raw)
        {
            return action;
        }
        let proto = st.proto;
        match info.kind {
            Kind::Unsupported(reason) => {
                self.count(info.name, "error");
                Action::Reply(err(format!("ERR {reason}")))
            }
            Kind::Server => self.server_command(st, info, args),
            Kind::AnyPrimary => {
                let this = self.clone();
                let up = st.upstream_proto();
                self.timed(info, async move {
                    this.any_primary(resp::command_bytes(&args), up).await
                })
            }
            Kind::Read | Kind::Write => {
                let this = self.clone();
                let up = st.upstream_proto();
                let Some(mut turn) = turn.take() else {
                    return Action::Reply(err("ERR cachetier: command without a place in order"));
                };
                let blocking = st.blocking.clone();
                // As `timed`, written out: the request's future is built in
                // its box's async block instead of being moved into
                // `timed`'s (two copies of a ~1 KiB state per request).
                let m = self.handles(info);
                Action::Later(Box::pin(async move {
                    let start = std::time::Instant::now();
                    let reply = this.keyed(info, args, raw, up, proto, &mut turn, &blocking).await;
                    turn.finish().await;
                    CommandMetrics::record(m.as_deref(), &reply, start);
                    reply
                }))
            }
        }
    }

    fn count(&self, name: &str, outcome: &str) {
        self.metrics.requests.with_label_values(&[name, outcome]).inc();
    }

    fn timed<F>(self: &Arc<Self>, info: &'static CommandInfo, fut: F) -> Action
    where
        F: Future<Output = Bytes> + Send + 'static,
    {
        let m = self.handles(info);
        Action::Later(Box::pin(async move {
            let start = std::time::Instant::now();
            let reply = fut.await;
            CommandMetrics::record(m.as_deref(), &reply, start);
            reply
        }))
    }

    /// The command's metric handles, resolved on its first use.
    fn handles(&self, info: &'static CommandInfo) -> Option<Arc<CommandMetrics>> {
        self.per_command
            .get(info.id)
            .map(|cell| cell.get_or_init(|| self.command_metrics(info)).clone())
    }

    /// Route a keyed command by its slot(s).
    #[allow(clippy::too_many_arguments)]
    async fn keyed(
        self: Arc<Self>,
        info: &'static CommandInfo,
        args: Vec<Bytes>,
        raw: Bytes,
        up: Proto,
        proto: u8,
        turn: &mut Turn,
        blocking: &BlockingCell,
    ) -> Bytes {
        let keys = match commands::key_indices(info, &args) {
            Ok(k) => k,
            // The sidecar cannot find the keys: Redis words the error (it
            // checks the arguments, and refuses keys of a slot it does not
            // own, so nothing runs on the wrong node).
            Err(KeyError::WrongArity) => {
                turn.prev_done().await;
                return Box::pin(self.on_primary(None, resp::command_bytes(&args), up, false)).await;
            }
        };
        if keys.is_empty() {
            turn.prev_done().await;
            let cmd = resp::command_bytes(&args);
            if commands::is_slow(info.name) {
                return Box::pin(self.on_primary(None, cmd, up, true)).await;
            }
            return Box::pin(self.any_primary(cmd, up)).await;
        }
        let touched = self.touched_keys(info, &args, &keys);
        if let Some(cache) = &self.cache
            && !touched.is_empty()
        {
            // Invalidate as the write is queued (see `Turn::on_sent`); a
            // split write is ordered as a whole and invalidates once it runs.
            let (cache, keys) = (cache.clone(), touched.clone());
            turn.on_sent(move || keys.iter().for_each(|k| cache.bump(k)));
        }
        let slots: Vec<u16> = keys.iter().map(|&i| slot::slot(&args[i])).collect();
        let same = slots.iter().all(|&s| s == slots[0]);
        // Reads of these slots after this write must see it (read-your-writes).
        let _written =
            (info.kind == Kind::Write && self.config.read_your_writes).then(|| turn.client().writing(&slots));
        let cached_mget = info.split == Some(Split::Array)
            && self
                .cache
                .as_ref()
                .is_some_and(|c| keys.iter().any(|&i| c.covers(&args[i])));
        // The split and cached paths are boxed so that their large state
        // machines do not inflate (and get copied with) every request's future.
        let reply = if let Some(block) = commands::block_timeout(info.name, &args) {
            // On the client's own connection: ordered as a whole.
            turn.prev_done().await;
            if same {
                Box::pin(self.blocking(blocking, slots[0], raw, block, up)).await
            } else {
                err("CROSSSLOT Keys in request don't hash to the same slot")
            }
        } else if commands::is_slow(info.name) {
            // On a connection of its own: ordered as a whole.
            turn.prev_done().await;
            if let Some(cache) = &self.cache {
                touched.iter().for_each(|k| cache.bump(k));
            }
            if same {
                Box::pin(self.on_primary(Some(slots[0]), raw, up, true)).await
            } else {
                err("CROSSSLOT Keys in request don't hash to the same slot")
            }
        } else if !same || cached_mget {
            match info.split {
                Some(split) => {
                    // Several parts on several connections: ordered as a whole.
                    turn.prev_done().await;
                    if let Some(cache) = &self.cache {
                        touched.iter().for_each(|k| cache.bump(k));
                    }
                    Box::pin(self.split(split, &args, &keys, &slots, up, proto, turn)).await
                }
                None => err("CROSSSLOT Keys in request don't hash to the same slot"),
            }
        } else if let Some(variant) = self.cache_variant(info, &args) {
            Box::pin(
                self.clone()
                    .cached_read(variant, args.clone(), slots[0], up, proto, turn),
            )
            .await
        } else {
            // A cursor is only meaningful on the node that issued it (each
            // process seeds its hash tables differently): iterate on the
            // key's primary.
            let cursor = matches!(info.name, "hscan" | "sscan" | "zscan");
            self.single_via(slots[0], info.kind, cursor, raw, up, Some(turn))
                .await
        };
        if let Some(cache) = &self.cache {
            for k in &touched {
                Box::pin(cache.invalidate(k, "own_write")).await;
            }
        }
        reply
    }

    /// The keys a write touches that the local cache covers.
    fn touched_keys(&self, info: &CommandInfo, args: &[Bytes], keys: &[usize]) -> Vec<Bytes> {
        match &self.cache {
            Some(cache) if info.kind == Kind::Write => keys
                .iter()
                .filter(|&&i| cache.covers(&args[i]))
                .map(|&i| args[i].clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    fn cache_variant(&self, info: &CommandInfo, args: &[Bytes]) -> Option<Variant> {
        let cache = self.cache.as_ref()?;
        let variant = match (info.name, args.len()) {
            ("get", 2) => Variant::Get,
            ("hgetall", 2) => Variant::HGetAll,
            ("hget", 3) => Variant::HGet,
            _ => return None,
        };
        cache.covers(&args[1]).then_some(variant)
    }

    /// A cacheable read at its place in the client's order: once everything
    /// before it has been sent (so a write before it has invalidated the key
    /// and removed older fills) a hit is taken; a miss joins or starts the
    /// key's shared fill once only reads are still in flight before it.
    async fn cached_read(
        self: Arc<Self>,
        variant: Variant,
        args: Vec<Bytes>,
        slot: u16,
        up: Proto,
        proto: u8,
        turn: &mut Turn,
    ) -> Bytes {
        let Some(cache) = self.cache.clone() else {
            let cmd = resp::command_bytes(&args);
            return self
                .single_via(slot, Kind::Read, false, cmd, up, Some(turn))
                .await;
        };
        turn.prev_sent().await;
        let key = CacheKey {
            variant,
            proto,
            key: args[1].clone(),
            field: if variant == Variant::HGet {
                args[2].clone()
            } else {
                Bytes::new()
            },
        };
        if let Some(hit) = cache.try_hit(&key) {
            turn.same_as_prev();
            return hit;
        }
        if !turn.only_reads_before() {
            // A write before it is still in flight: a fill could overtake it
            // on another connection, so wait for it.
            turn.prev_done().await;
        }
        let tracked = self
            .registry
            .current()
            .shard(slot)
            .is_some_and(|s| s.primary.tracked.load(Ordering::SeqCst));
        let this = self.clone();
        let fill = move |mut fill_turn: Turn| async move {
            // Fills read the primary: invalidations come from the primary,
            // and a lagging replica could hand us a value older than the last
            // invalidation, which would then stick until the TTL. Fills are
            // rare (one per key per change), so the primary's cost is small.
            // The key's own remaining life bounds the entry (Redis may be
            // late expiring it); read right behind the value, same node.
            let cmd = resp::command_bytes(&args);
            let pttl = resp::command_bytes(&[&b"PTTL"[..], &args[1][..]]);
            let (reply, life) = tokio::join!(
                this.single_via(slot, Kind::Read, true, cmd, up, Some(&mut fill_turn)),
                this.single_via(slot, Kind::Read, true, pttl, up, None),
            );
            fill_turn.finish().await;
            (reply, cache::life_from_pttl(&life))
        };
        match cache.lookup(key, tracked, fill).await {
            Lookup::Hit(value) => value,
            Lookup::Fill { stage, value } => {
                // Sent once the fill is: only reads are before it, so the
                // connection does not matter (a read after a run of reads).
                stage.wait_for(|s| s != Stage::Waiting).await;
                turn.sent(0, false);
                LocalCache::fill_result(value).await
            }
        }
    }

    /// Send one command for `slot`, following MOVED/ASK and retrying a failed
    /// read once on another node.
    pub async fn single(self: &Arc<Self>, slot: u16, kind: Kind, cmd: Bytes, up: Proto) -> Bytes {
        self.single_via(slot, kind, false, cmd, up, None).await
    }

    /// [`Router::single`] at the place `turn` gives it in its client's order
    /// (none: the caller ordered it as a whole), optionally forcing a read to
    /// the primary. A read forced to the primary is not retried elsewhere: a
    /// replica may not have what the primary was asked for.
    async fn single_via(
        self: &Arc<Self>,
        slot: u16,
        kind: Kind,
        to_primary: bool,
        cmd: Bytes,
        up: Proto,
        mut turn: Option<&mut Turn>,
    ) -> Bytes {
        let mut redirect: Option<(Arc<Node>, bool)> = None;
        let mut avoid: Option<Arc<Node>> = None;
        let mut retried = to_primary;
        for attempt in 0..MAX_REDIRECTS {
            if attempt > 0
                && let Some(t) = turn.as_deref_mut()
            {
                // Whatever was queued behind our first attempt has its reply
                // by now; what comes next must wait for this one.
                t.resending();
                t.prev_done().await;
            }
            let floor = match turn.as_deref() {
                Some(t) if kind == Kind::Read && !to_primary && self.config.read_your_writes => {
                    t.client().read_floor(slot).map(|f| (t.client().clone(), f))
                }
                _ => None,
            };
            let (node, asking) = match redirect.take() {
                Some(r) => r,
                None => match self.pick(slot, kind, to_primary, avoid.as_ref(), floor) {
                    Some(n) => (n, false),
                    None => {
                        self.registry.request_refresh();
                        if attempt + 1 < MAX_REDIRECTS {
                            // Refreshes are at most every 500 ms: wait long
                            // enough (about 1.2 s in all) for one to land.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            continue;
                        }
                        return err(format!(
                            "CLUSTERDOWN Hash slot {slot} is not served (topology unknown or incomplete)"
                        ));
                    }
                },
            };
            let (bytes, n) = if asking {
                let mut b = BytesMut::from(&resp::command_bytes(&["ASKING"])[..]);
                b.extend_from_slice(&cmd);
                (b.freeze(), 2)
            } else {
                (cmd.clone(), 1)
            };
            let write = kind != Kind::Read;
            match node.request_in(up, bytes, n, turn.as_deref_mut(), write).await {
                Ok(mut replies) => {
                    let reply = replies.pop().unwrap_or_default();
                    if let Some(target) = redirect_target(&reply, b"MOVED ") {
                        self.metrics.redirects.with_label_values(&["moved"]).inc();
                        self.registry.request_refresh();
                        redirect = Some((self.registry.node(&target), false));
                        continue;
                    }
                    if let Some(target) = redirect_target(&reply, b"ASK ") {
                        self.metrics.redirects.with_label_values(&["ask"]).inc();
                        redirect = Some((self.registry.node(&target), true));
                        continue;
                    }
                    if reply.starts_with(b"-TRYAGAIN") && attempt + 1 < MAX_REDIRECTS {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    // A node that does not (yet) know the slot map, is still
                    // loading, or lost its primary cannot answer; another
                    // node of the shard may: a read retries as after a failure.
                    if !is_node_state_error(&reply) || kind != Kind::Read || retried {
                        return reply;
                    }
                }
                Err(ref e) if kind != Kind::Read || retried => {
                    self.registry.request_refresh();
                    return upstream_error(&node.addr, kind, e);
                }
                Err(ref e) if turn.as_deref().is_some_and(|t| t.later_write_sent()) => {
                    self.registry.request_refresh();
                    return err(format!(
                        "ERR cachetier: read failed on {} ({e}) and was not retried: a write this connection sent after it was already sent, and a retry could observe it",
                        node.addr
                    ));
                }
                Err(_) => {}
            }
            if turn.as_deref().is_some_and(|t| t.later_write_sent()) {
                return err(format!(
                    "ERR cachetier: {} could not serve the read, which was not retried: a write this connection sent after it was already sent, and a retry could observe it",
                    node.addr
                ));
            }
            // Retry a read once, elsewhere (reads are idempotent), and learn
            // the layout soon: a failing node may mean a failover is under way.
            self.registry.request_refresh();
            retried = true;
            self.metrics.read_retries.inc();
            avoid = Some(node);
        }
        err("ERR cachetier: too many MOVED/ASK redirects")
    }

    /// The node for a command of `slot`. `floor`: the client wrote the slot,
    /// so a read may only use a replica that has caught up past that write.
    fn pick(
        &self,
        slot: u16,
        kind: Kind,
        to_primary: bool,
        avoid: Option<&Arc<Node>>,
        floor: Option<(Arc<ClientOrder>, ReadFloor)>,
    ) -> Option<Arc<Node>> {
        let topo = self.registry.current();
        let shard = topo.shard(slot)?;
        if kind != Kind::Read || to_primary {
            return Some(shard.primary.clone());
        }
        let eligible: Vec<Arc<Node>>;
        let replicas = match floor {
            None => &shard.replicas,
            // The primary is out of rotation: availability first, as before
            // read-your-writes (its own write would fail now too).
            Some(_) if !shard.primary.is_healthy() => &shard.replicas,
            Some((client, floor)) => {
                eligible = match floor {
                    ReadFloor::Pending => Vec::new(),
                    ReadFloor::RepliedAt(at) => shard
                        .replicas
                        .iter()
                        .filter(|r| r.caught_up_since(at))
                        .cloned()
                        .collect(),
                };
                if eligible.len() == shard.replicas.len() {
                    client.forget(slot, floor);
                    &shard.replicas
                } else if eligible.is_empty() && self.config.read_policy != crate::config::ReadPolicy::Primary
                {
                    self.metrics.read_your_writes_primary_reads.inc();
                    return Some(shard.primary.clone());
                } else {
                    &eligible
                }
            }
        };
        let p = balance::pick(
            self.config.read_policy,
            self.config.reads_include_primary,
            &shard.primary,
            replicas,
            avoid,
            &mut rand::rng(),
        );
        if p.fallback && self.config.read_policy != crate::config::ReadPolicy::Primary {
            self.metrics.primary_fallbacks.inc();
        }
        Some(p.node.clone())
    }

    async fn any_primary(self: &Arc<Self>, cmd: Bytes, up: Proto) -> Bytes {
        let primaries = self.primaries();
        let Some(node) = primaries
            .get(rand::rng().random_range(0..primaries.len().max(1)))
            .cloned()
        else {
            self.registry.request_refresh();
            return err("CLUSTERDOWN cachetier: topology not known yet");
        };
        match node.request(up, cmd, 1).await {
            Ok(mut r) => r.pop().unwrap_or_default(),
            Err(e) => upstream_error(&node.addr, Kind::Write, &e),
        }
    }

    /// `cmd` on `slot`'s primary (any primary without a slot), following
    /// MOVED/ASK; a known-slow command on a connection of its own.
    async fn on_primary(self: &Arc<Self>, slot: Option<u16>, cmd: Bytes, up: Proto, slow: bool) -> Bytes {
        let mut target: Option<(Arc<Node>, bool)> = None;
        for _ in 0..MAX_REDIRECTS {
            let (node, asking) = match (target.take(), slot) {
                (Some(t), _) => t,
                (None, Some(s)) => match self.registry.current().shard(s) {
                    Some(sh) => (sh.primary.clone(), false),
                    None => return err(format!("CLUSTERDOWN Hash slot {s} is not served")),
                },
                (None, None) => {
                    let primaries = self.primaries();
                    match primaries.get(rand::rng().random_range(0..primaries.len().max(1))) {
                        Some(n) => (n.clone(), false),
                        None => return err("CLUSTERDOWN cachetier: topology not known yet"),
                    }
                }
            };
            let (bytes, n) = if asking {
                let mut b = BytesMut::from(&resp::command_bytes(&["ASKING"])[..]);
                b.extend_from_slice(&cmd);
                (b.freeze(), 2)
            } else {
                (cmd.clone(), 1)
            };
            let result = if slow {
                node.slow_request(up, bytes, n).await
            } else {
                node.request(up, bytes, n).await
            };
            match result {
                Ok(mut r) => {
                    let reply = r.pop().unwrap_or_default();
                    if let Some(t) = redirect_target(&reply, b"MOVED ") {
                        self.registry.request_refresh();
                        target = Some((self.registry.node(&t), false));
                    } else if let Some(t) = redirect_target(&reply, b"ASK ") {
                        target = Some((self.registry.node(&t), true));
                    } else {
                        return reply;
                    }
                }
                Err(e) => return upstream_error(&node.addr, Kind::Write, &e),
            }
        }
        err("ERR cachetier: too many MOVED/ASK redirects")
    }

    fn primaries(&self) -> Vec<Arc<Node>> {
        self.registry
            .current()
            .shards
            .iter()
            .map(|s| s.primary.clone())
            .collect()
    }

    /// Send `cmd` to every primary (a known-slow one on connections of its
    /// own); Err carries the first error reply.
    async fn fan_out(self: &Arc<Self>, cmd: Bytes, up: Proto, slow: bool) -> Result<Vec<Bytes>, Bytes> {
        let primaries = self.primaries();
        if primaries.is_empty() {
            self.registry.request_refresh();
            return Err(err("CLUSTERDOWN cachetier: topology not known yet"));
        }
        let futs = primaries.iter().map(|n| {
            let cmd = cmd.clone();
            async move {
                let r = if slow {
                    n.slow_request(up, cmd, 1).await
                } else {
                    n.request(up, cmd, 1).await
                };
                (n.addr.clone(), r)
            }
        });
        let mut out = Vec::new();
        for (addr, r) in join_all(futs).await {
            match r {
                Ok(mut r) => {
                    let reply = r.pop().unwrap_or_default();
                    if reply.starts_with(b"-") {
                        return Err(reply);
                    }
                    out.push(reply);
                }
                Err(e) => return Err(upstream_error(&addr, Kind::Write, &e)),
            }
        }
        Ok(out)
    }
}

/// `-MOVED 3999 127.0.0.1:6381` → `127.0.0.1:6381`.
fn redirect_target(reply: &[u8], kind: &[u8]) -> Option<String> {
    let text = resp::error_text(reply)?;
    let rest = text.strip_prefix(kind)?;
    let s = std::str::from_utf8(rest).ok()?;
    let addr = s.split_whitespace().nth(1)?;
    // Redis may send ":port" when it does not know its own address.
    if addr.starts_with(':') {
        return None;
    }
    Some(addr.to_string())
}

fn upstream_error(addr: &str, kind: Kind, e: &UpstreamError) -> Bytes {
    match (kind, e) {
        (Kind::Read, _) | (_, UpstreamError::Connect(_)) => {
            err(format!("ERR cachetier: upstream {addr} unavailable: {e}"))
        }
        _ => err(format!(
            "ERR cachetier: upstream {addr} failed during a write ({e}); the write may or may not have been applied and was not retried"
        )),
    }
}

/// Error replies that say "not this node, not now" rather than anything about
/// the command: `CLUSTERDOWN` (the node's slot map is incomplete), `LOADING`,
/// `MASTERDOWN` (a replica cut off from its primary with stale reads disabled).
fn is_node_state_error(reply: &[u8]) -> bool {
    [&b"-CLUSTERDOWN"[..], b"-LOADING", b"-MASTERDOWN"]
        .iter()
        .any(|p| reply.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_and_ask_replies_name_their_target() {
        assert_eq!(
            redirect_target(b"-MOVED 3999 127.0.0.1:6381\r\n", b"MOVED "),
            Some("127.0.0.1:6381".into())
        );
        assert_eq!(
            redirect_target(b"-ASK 1 10.0.0.1:7000\r\n", b"ASK "),
            Some("10.0.0.1:7000".into())
        );
        assert_eq!(redirect_target(b"-ERR nope\r\n", b"MOVED "), None);
        assert_eq!(redirect_target(b"+OK\r\n", b"MOVED "), None);
    }
}
