//! From a parsed client command to a reply: key extraction, slot routing,
//! read balancing with one retry, MOVED/ASK, cross-slot split and merge, the
//! local cache, server-wide fan-out and pinned transactions.
//!
//! Every function here returns the raw reply bytes the client will see;
//! failures become RESP errors that say what the sidecar did.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use rand::Rng;
use rand::seq::SliceRandom;

use crate::balance;
use crate::blocking::BlockingCell;
use crate::cache::{CacheKey, LocalCache, Lookup, Variant};
use crate::commands::{self, CommandInfo, KeyError, Kind, Split};
use crate::config::Config;
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::order::{ClientOrder, ReadFloor, Stage, Turn};
use crate::resp::{self, Frame};
use crate::slot;
use crate::topology::Registry;
use crate::upstream::{Node, Proto};

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
    last: Option<tokio::sync::watch::Receiver<Stage>>,
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
        if let Some(cell) = self.per_command.get(info.id) {
            let m = cell.get_or_init(|| self.command_metrics(info));
            m.ok.inc();
            m.latency.observe(start.elapsed().as_secs_f64());
        }
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
                self.timed(info, async move {
                    let reply = this.keyed(info, args, raw, up, proto, &mut turn, &blocking).await;
                    turn.finish().await;
                    reply
                })
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
        let m = self
            .per_command
            .get(info.id)
            .map(|cell| cell.get_or_init(|| self.command_metrics(info)).clone());
        Action::Later(Box::pin(async move {
            let start = std::time::Instant::now();
            let reply = fut.await;
            if let Some(m) = m {
                if reply.starts_with(b"-") {
                    m.error.inc();
                } else {
                    m.ok.inc();
                }
                m.latency.observe(start.elapsed().as_secs_f64());
            }
            reply
        }))
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
        let _written = (info.kind == Kind::Write && self.config.read_your_writes)
            .then(|| turn.client().writing(slots.clone()));
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
                    let order = turn.client().clone();
                    Box::pin(self.split(split, &args, &keys, &slots, up, proto, &order)).await
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
            let cmd = resp::command_bytes(&args);
            let reply = this
                .single_via(slot, Kind::Read, true, cmd, up, Some(&mut fill_turn))
                .await;
            fill_turn.finish().await;
            reply
        };
        match cache.lookup(key, tracked, fill).await {
            Lookup::Hit(value) => value,
            Lookup::Fill { mut stage, value } => {
                // Sent once the fill is: only reads are before it, so the
                // connection does not matter (a read after a run of reads).
                let _ = stage.wait_for(|s| *s != Stage::Waiting).await;
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

    /// Split a cross-slot MGET/MSET/DEL/UNLINK/EXISTS/TOUCH per slot and merge.
    /// The whole command is ordered by its caller; each part gets a turn of
    /// its own only for read-your-writes and the retry rule.
    #[allow(clippy::too_many_arguments)]
    async fn split(
        self: &Arc<Self>,
        split: Split,
        args: &[Bytes],
        keys: &[usize],
        slots: &[u16],
        up: Proto,
        proto: u8,
        order: &Arc<ClientOrder>,
    ) -> Bytes {
        let name = &args[0];
        let per_key = if split == Split::AllOk { 2 } else { 1 };
        // Group key positions by slot, keeping first-seen order.
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        let mut cached: Vec<usize> = Vec::new();
        for (pos, (&ki, &s)) in keys.iter().zip(slots).enumerate() {
            if split == Split::Array && self.cache.as_ref().is_some_and(|c| c.covers(&args[ki])) {
                cached.push(pos);
                continue;
            }
            match groups.iter_mut().find(|(gs, _)| *gs == s) {
                Some((_, v)) => v.push(pos),
                None => groups.push((s, vec![pos])),
            }
        }
        let kind = if split == Split::Array
            || name.eq_ignore_ascii_case(b"exists")
            || name.eq_ignore_ascii_case(b"touch")
        {
            Kind::Read
        } else {
            Kind::Write
        };
        let group_futs = groups.iter().map(|(s, positions)| {
            let mut sub: Vec<&[u8]> = vec![name];
            for &pos in positions {
                let ki = keys[pos];
                for a in &args[ki..ki + per_key] {
                    sub.push(a);
                }
            }
            let cmd = resp::command_bytes(&sub);
            let this = self.clone();
            let s = *s;
            let (mut part, _) = order.next(None);
            async move {
                let reply = this.single_via(s, kind, false, cmd, up, Some(&mut part)).await;
                part.finish().await;
                reply
            }
        });
        let cached_futs = cached.iter().map(|&pos| {
            let this = self.clone();
            let key = args[keys[pos]].clone();
            let s = slots[pos];
            async move {
                let get = vec![Bytes::from_static(b"GET"), key];
                // The MGET is ordered as a whole; its parts need no turn of
                // their own.
                let (mut turn, _) = Turn::detached();
                let reply = this.cached_read(Variant::Get, get, s, up, proto, &mut turn).await;
                turn.finish().await;
                reply
            }
        });
        let (replies, cached_replies) =
            futures_util::future::join(join_all(group_futs), join_all(cached_futs)).await;
        match split {
            Split::Array => {
                let mut out: Vec<Option<Bytes>> = vec![None; keys.len()];
                for ((_, positions), reply) in groups.iter().zip(&replies) {
                    if reply.starts_with(b"-") {
                        return reply.clone();
                    }
                    let Ok(Frame::Array(items)) = resp::parse(reply) else {
                        return err("ERR cachetier: unexpected MGET reply from upstream");
                    };
                    if items.len() != positions.len() {
                        return err("ERR cachetier: MGET reply length mismatch");
                    }
                    for (&pos, item) in positions.iter().zip(items) {
                        out[pos] = Some(item.to_bytes());
                    }
                }
                for (&pos, reply) in cached.iter().zip(cached_replies) {
                    // MGET answers nil for a key holding another type; the
                    // per-key GET it was served by says WRONGTYPE instead.
                    if reply.starts_with(b"-WRONGTYPE") {
                        continue;
                    }
                    if reply.starts_with(b"-") {
                        return reply;
                    }
                    out[pos] = Some(reply);
                }
                let mut buf = BytesMut::new();
                buf.extend_from_slice(format!("*{}\r\n", out.len()).as_bytes());
                for item in out {
                    match item {
                        Some(b) => buf.extend_from_slice(&b),
                        None => null(proto).encode(&mut buf),
                    }
                }
                buf.freeze()
            }
            Split::AllOk => {
                for r in &replies {
                    if !r.starts_with(b"+") {
                        return r.clone();
                    }
                }
                ok()
            }
            Split::Sum => {
                let mut total: i64 = 0;
                for r in &replies {
                    match resp::parse(r) {
                        Ok(Frame::Integer(i)) => total += i,
                        _ => return r.clone(),
                    }
                }
                encode(&Frame::Integer(total))
            }
        }
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

    fn server_command(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: Vec<Bytes>,
    ) -> Action {
        let proto = st.proto;
        let up = st.upstream_proto();
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        let this = self.clone();
        let reply = |b: Bytes| {
            this.count(info.name, if b.starts_with(b"-") { "error" } else { "ok" });
            Action::Reply(b)
        };
        match info.name {
            "ping" => match args.len() {
                1 => reply(Bytes::from_static(b"+PONG\r\n")),
                2 => reply(encode(&Frame::Bulk(args[1].clone()))),
                _ => reply(err("ERR wrong number of arguments for 'ping' command")),
            },
            "echo" if args.len() == 2 => reply(encode(&Frame::Bulk(args[1].clone()))),
            "echo" => reply(err("ERR wrong number of arguments for 'echo' command")),
            "quit" => {
                self.count(info.name, "ok");
                Action::Close(ok())
            }
            "select" => match args.get(1).map(|a| a.as_ref()) {
                Some(b"0") if args.len() == 2 => reply(ok()),
                _ => reply(err("ERR cachetier: Redis Cluster has only database 0 (SELECT 0)")),
            },
            "readonly" | "readwrite" => reply(ok()),
            "auth" => reply(self.check_auth(&args[1..])),
            "hello" => reply(self.hello(st, &args)),
            "reset" => {
                st.proto = 2;
                st.name = None;
                st.multi = None;
                st.multi_failed = false;
                // Unwatches: dropping the WATCH connection does that.
                st.watch = None;
                reply(Bytes::from_static(b"+RESET\r\n"))
            }
            "client" => reply(self.client(st, &sub, &args)),
            "command" => reply(match sub.as_str() {
                "COUNT" => encode(&Frame::Integer(commands::count() as i64)),
                // The sidecar's table carries routing facts, not Redis' command
                // documentation; clients that ask get an empty answer and
                // fall back to sending commands as typed.
                "" | "DOCS" | "LIST" => encode(&Frame::Array(Vec::new())),
                "INFO" => encode(&Frame::Array(
                    args[2..].iter().map(|_| Frame::NullArray).collect(),
                )),
                _ => err(format!("ERR cachetier: COMMAND {sub} is not supported")),
            }),
            "info" => reply(encode(&Frame::Bulk(Bytes::from(self.info_text())))),
            "unwatch" => reply(ok()),
            "watch" => self.watch_command(st, info, &args, &resp::command_bytes(&args)),
            "multi" => {
                st.multi = Some(Vec::new());
                st.multi_failed = false;
                reply(ok())
            }
            "exec" => reply(err("ERR EXEC without MULTI")),
            "discard" => reply(err("ERR DISCARD without MULTI")),
            "config" => match sub.as_str() {
                // Every node of a tier runs the same configuration.
                "GET" => self.timed(info, async move {
                    this.on_primary(None, resp::command_bytes(&args), up, false).await
                }),
                "SET" => reply(err(
                    "ERR cachetier: CONFIG SET is not proxied: set Redis parameters in the CacheTier's spec.redisConfig, which the operator applies to every node",
                )),
                _ => reply(err(format!(
                    "ERR cachetier: CONFIG {sub} is administrative and not proxied; run it against a Redis node directly"
                ))),
            },
            "dbsize" | "flushall" | "flushdb" | "keys" | "scan" | "randomkey" | "script" | "function" => {
                self.timed(info, async move { this.fanned(info.name, args, up, proto).await })
            }
            _ => reply(err(format!("ERR cachetier: '{}' is not supported", info.name))),
        }
    }

    fn hello(&self, st: &mut ClientState, args: &[Bytes]) -> Bytes {
        // Check everything first: a failed HELLO changes nothing, as in Redis.
        let mut proto = st.proto;
        let mut name = None;
        let mut i = 1;
        if let Some(v) = args.get(1) {
            match v.as_ref() {
                b"2" => proto = 2,
                b"3" => proto = 3,
                _ => return err("NOPROTO unsupported protocol version"),
            }
            i = 2;
        }
        while i < args.len() {
            match upper(&args[i]).as_str() {
                "SETNAME" if i + 1 < args.len() => {
                    name = Some(args[i + 1].clone());
                    i += 2;
                }
                "AUTH" if i + 2 < args.len() => {
                    let r = self.check_auth(&args[i + 1..i + 3]);
                    if r.starts_with(b"-") {
                        return r;
                    }
                    i += 3;
                }
                _ => return err("ERR syntax error in HELLO"),
            }
        }
        st.proto = proto;
        if name.is_some() {
            st.name = name;
        }
        let p = st.proto;
        encode(&map(
            p,
            vec![
                (bulk("server"), bulk("redis")),
                // The upstream's version; a guess only before any node answered.
                (
                    bulk("version"),
                    bulk(&self.registry.redis_version().unwrap_or_else(|| "7.0.0".into())),
                ),
                (bulk("proto"), Frame::Integer(i64::from(p))),
                (bulk("id"), Frame::Integer(st.id as i64)),
                (bulk("mode"), bulk("standalone")),
                (bulk("role"), bulk("master")),
                (bulk("modules"), Frame::Array(Vec::new())),
            ],
        ))
    }

    /// `AUTH [user] password` from a client: accepted when it matches the
    /// sidecar's own upstream credentials (apps keep their configuration),
    /// refused otherwise, like Redis would.
    fn check_auth(&self, args: &[Bytes]) -> Bytes {
        let Some(creds) = &self.config.auth else {
            return err(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            );
        };
        let (user, pass) = match args {
            [p] => (None, p),
            [u, p] => (Some(u), p),
            _ => return err("ERR wrong number of arguments for 'auth' command"),
        };
        let user_ok = match (user, &creds.username) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(u), None) => u.as_ref() == b"default",
            (Some(u), Some(c)) => u.as_ref() == c.as_bytes(),
        };
        if user_ok && pass.as_ref() == creds.password.as_bytes() {
            ok()
        } else {
            err("WRONGPASS invalid username-password pair or user is disabled.")
        }
    }

    fn client(&self, st: &mut ClientState, sub: &str, args: &[Bytes]) -> Bytes {
        match sub {
            "SETNAME" if args.len() == 3 => {
                if args[2].iter().any(|&b| b == b' ' || b == b'\n') {
                    return err("ERR Client names cannot contain spaces, newlines or special characters.");
                }
                st.name = if args[2].is_empty() {
                    None
                } else {
                    Some(args[2].clone())
                };
                ok()
            }
            "GETNAME" => match &st.name {
                Some(n) => encode(&Frame::Bulk(n.clone())),
                None => encode(&null(st.proto)),
            },
            "ID" => encode(&Frame::Integer(st.id as i64)),
            // Client libraries announce themselves; nothing to do with it.
            "SETINFO" => ok(),
            "INFO" => {
                let name = st
                    .name
                    .as_ref()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .unwrap_or_default();
                encode(&Frame::Bulk(Bytes::from(format!(
                    "id={} name={} db=0 resp={}\n",
                    st.id, name, st.proto
                ))))
            }
            _ => err(format!(
                "ERR cachetier: CLIENT {sub} is not supported by the sidecar"
            )),
        }
    }

    fn info_text(&self) -> String {
        let topo = self.registry.current();
        let mut s = String::new();
        s.push_str("# Server\r\n");
        // The version the cluster's nodes report (clients check features by it).
        if let Some(v) = self.registry.redis_version() {
            s.push_str(&format!("redis_version:{v}\r\n"));
        }
        s.push_str("redis_mode:standalone\r\n");
        s.push_str(&format!(
            "cachetier_sidecar_version:{}\r\n",
            env!("CARGO_PKG_VERSION")
        ));
        s.push_str(&format!("read_policy:{}\r\n", self.config.read_policy.as_str()));
        // Client libraries read these on connect (ioredis waits for loading:0).
        s.push_str("# Persistence\r\nloading:0\r\n");
        s.push_str("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n");
        s.push_str(&format!(
            "# Cluster\r\ncluster_enabled:0\r\ncachetier_shards:{}\r\n",
            topo.shards.len()
        ));
        for (i, shard) in topo.shards.iter().enumerate() {
            let replicas: Vec<String> = shard
                .replicas
                .iter()
                .map(|r| {
                    format!(
                        "{}={}",
                        r.addr,
                        if r.serving_replica() { "serving" } else { "gated" }
                    )
                })
                .collect();
            s.push_str(&format!(
                "shard{i}:primary={}{},replicas={}\r\n",
                shard.primary.addr,
                if shard.primary.is_healthy() { "" } else { "(down)" },
                replicas.join(";")
            ));
        }
        if let Some(c) = &self.cache {
            s.push_str(&format!("# Cache\r\ncache_bytes:{}\r\n", c.weighted_size()));
        }
        s
    }

    async fn fanned(self: Arc<Self>, name: &'static str, args: Vec<Bytes>, up: Proto, proto: u8) -> Bytes {
        let cmd = resp::command_bytes(&args);
        match name {
            "dbsize" => match self.fan_out(cmd, up, false).await {
                Ok(rs) => {
                    let mut total = 0i64;
                    for r in rs {
                        if let Ok(Frame::Integer(i)) = resp::parse(&r) {
                            total += i;
                        }
                    }
                    encode(&Frame::Integer(total))
                }
                Err(e) => e,
            },
            "flushall" | "flushdb" => {
                if let Some(c) = &self.cache {
                    c.flush(None, "flush");
                }
                match self.fan_out(cmd, up, true).await {
                    Ok(_) => ok(),
                    Err(e) => e,
                }
            }
            "keys" => match self.fan_out(cmd, up, true).await {
                Ok(rs) => {
                    let mut all = Vec::new();
                    for r in rs {
                        if let Ok(Frame::Array(items)) | Ok(Frame::Set(items)) = resp::parse(&r) {
                            all.extend(items);
                        }
                    }
                    encode(&Frame::Array(all))
                }
                Err(e) => e,
            },
            "randomkey" => {
                let mut primaries = self.primaries();
                primaries.shuffle(&mut rand::rng());
                for n in primaries {
                    match n.request(up, cmd.clone(), 1).await {
                        Ok(mut r) => {
                            let reply = r.pop().unwrap_or_default();
                            if reply.starts_with(b"$") && !reply.starts_with(b"$-1") {
                                return reply;
                            }
                        }
                        Err(e) => return upstream_error(&n.addr, Kind::Read, &e),
                    }
                }
                encode(&null(proto))
            }
            "scan" => self.scan(args, up).await,
            "script" => self.script(args, cmd, up).await,
            "function" => self.function(args, cmd, up).await,
            _ => err("ERR cachetier: unsupported"),
        }
    }

    /// SCAN over every shard. The cursor packs the shard index into the low
    /// 14 bits and the node's own cursor above it; a node cursor of 0 moves
    /// to the next shard's primary. Shards are ordered by first slot, so the
    /// walk is stable while the topology is; a reshard mid-walk may repeat or
    /// skip keys (Redis' own SCAN guarantees hold per node only).
    async fn scan(self: Arc<Self>, args: Vec<Bytes>, up: Proto) -> Bytes {
        let Some(cursor) = args
            .get(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u64>().ok())
        else {
            return err("ERR invalid cursor");
        };
        let primaries = self.primaries();
        if primaries.is_empty() {
            return err("CLUSTERDOWN cachetier: topology not known yet");
        }
        let mut shard = (cursor & 0x3FFF) as usize;
        let mut node_cursor = cursor >> 14;
        if shard >= primaries.len() {
            return err("ERR invalid cursor");
        }
        loop {
            let mut sub: Vec<Bytes> = vec![Bytes::from_static(b"SCAN"), Bytes::from(node_cursor.to_string())];
            sub.extend(args[2..].iter().cloned());
            let node = &primaries[shard];
            let reply = match node.request(up, resp::command_bytes(&sub), 1).await {
                Ok(mut r) => r.pop().unwrap_or_default(),
                Err(e) => return upstream_error(&node.addr, Kind::Read, &e),
            };
            let Ok(Frame::Array(mut parts)) = resp::parse(&reply) else {
                return reply;
            };
            if parts.len() != 2 {
                return err("ERR cachetier: unexpected SCAN reply");
            }
            let keys = parts.pop().unwrap_or(Frame::Array(Vec::new()));
            let next = match parts.pop() {
                Some(Frame::Bulk(b)) => std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0),
                _ => 0,
            };
            let out_cursor = if next != 0 {
                if next >= (1 << 50) {
                    return err("ERR cachetier: node cursor too large to combine");
                }
                (next << 14) | shard as u64
            } else if shard + 1 < primaries.len() {
                shard += 1;
                node_cursor = 0;
                // An empty page from a finished shard: keep going so the
                // client does not see many empty pages.
                if matches!(&keys, Frame::Array(k) if k.is_empty()) {
                    continue;
                }
                shard as u64
            } else {
                0
            };
            return encode(&Frame::Array(vec![
                Frame::Bulk(Bytes::from(out_cursor.to_string())),
                keys,
            ]));
        }
    }

    /// `FUNCTION`: changes go to every primary (so `FCALL` works on any
    /// key); reads of the library set come from one primary.
    async fn function(self: Arc<Self>, args: Vec<Bytes>, cmd: Bytes, up: Proto) -> Bytes {
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        match sub.as_str() {
            "LOAD" | "DELETE" | "FLUSH" | "RESTORE" => match self.fan_out(cmd, up, true).await {
                Ok(mut rs) => rs.pop().unwrap_or_else(ok),
                Err(e) => e,
            },
            // A function runs on one node; kill it wherever it runs.
            "KILL" => {
                let futs = self.primaries().into_iter().map(|n| {
                    let cmd = cmd.clone();
                    async move { n.slow_request(up, cmd, 1).await }
                });
                let replies: Vec<Bytes> = join_all(futs)
                    .await
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter_map(|mut r| r.pop())
                    .collect();
                match replies.iter().find(|r| r.starts_with(b"+")) {
                    Some(r) => r.clone(),
                    None => replies
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| err("CLUSTERDOWN cachetier: no primary answered")),
                }
            }
            _ => self.on_primary(None, cmd, up, false).await,
        }
    }

    async fn script(self: Arc<Self>, args: Vec<Bytes>, cmd: Bytes, up: Proto) -> Bytes {
        let sub = args.get(1).map(|a| upper(a)).unwrap_or_default();
        match sub.as_str() {
            "LOAD" | "FLUSH" => match self.fan_out(cmd, up, true).await {
                Ok(mut rs) => rs.pop().unwrap_or_else(ok),
                Err(e) => e,
            },
            "EXISTS" => match self.fan_out(cmd, up, false).await {
                Ok(rs) => {
                    let mut acc: Option<Vec<i64>> = None;
                    for r in rs {
                        let Ok(Frame::Array(items)) = resp::parse(&r) else {
                            return r;
                        };
                        let v: Vec<i64> = items
                            .iter()
                            .map(|f| matches!(f, Frame::Integer(1)) as i64)
                            .collect();
                        acc = Some(match acc {
                            None => v,
                            Some(a) => a.iter().zip(&v).map(|(x, y)| x & y).collect(),
                        });
                    }
                    encode(&Frame::Array(
                        acc.unwrap_or_default().into_iter().map(Frame::Integer).collect(),
                    ))
                }
                Err(e) => e,
            },
            _ => err(format!("ERR cachetier: SCRIPT {sub} is not supported")),
        }
    }

    /// Run `bytes` (holding `replies` commands) on the client's WATCH
    /// connection. Like every path but the keyed ones it is ordered as a
    /// whole (see [`Router::dispatch`]): after everything the client sent
    /// before it has its reply.
    fn watch_call(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        watch: Arc<Watch>,
        bytes: Bytes,
        replies: usize,
        touched: Vec<Bytes>,
    ) -> Action {
        let this = self.clone();
        let up = st.upstream_proto();
        self.timed(info, async move {
            if let Some(cache) = &this.cache {
                touched.iter().for_each(|k| cache.bump(k));
            }
            let reply = this.on_watch_conn(&watch, bytes, replies, up).await;
            if let Some(cache) = &this.cache {
                for k in &touched {
                    cache.invalidate(k, "own_write").await;
                }
            }
            reply
        })
    }

    async fn on_watch_conn(&self, watch: &Watch, bytes: Bytes, replies: usize, up: Proto) -> Bytes {
        let mut conn = watch.conn.lock().await;
        if conn.is_none() {
            let Some(addr) = self
                .registry
                .current()
                .shard(watch.slot)
                .map(|s| s.primary.addr.clone())
            else {
                return err(format!("CLUSTERDOWN Hash slot {} is not served", watch.slot));
            };
            match crate::upstream::Dedicated::open(
                &addr,
                up,
                self.config.response_timeout,
                self.config.auth.as_ref(),
            )
            .await
            {
                Ok(c) => *conn = Some(c),
                Err(e) => return upstream_error(&addr, Kind::Write, &e),
            }
        }
        let Some(c) = conn.as_mut() else {
            return err("ERR cachetier: WATCH connection unavailable");
        };
        match c.call(&bytes, replies).await {
            Ok(mut r) => {
                let last = r.pop().unwrap_or_default();
                if redirect_target(&last, b"MOVED ").is_some() || redirect_target(&last, b"ASK ").is_some() {
                    self.registry.request_refresh();
                    return err("ERR cachetier: the watched slot moved during WATCH; retry the transaction");
                }
                if last.starts_with(b"-EXECABORT")
                    && let Some(first) = r.iter().skip(1).find(|x| x.starts_with(b"-"))
                {
                    let why = resp::error_text(first)
                        .map(|t| String::from_utf8_lossy(t).into_owned())
                        .unwrap_or_default();
                    return err(format!(
                        "EXECABORT Transaction discarded because of previous errors: {why}"
                    ));
                }
                last
            }
            Err(e) => err(format!(
                "ERR cachetier: WATCH connection failed ({e}); the watch is lost and a transaction in flight may or may not have been applied"
            )),
        }
    }

    /// Slot shared by every key of `args`, or the error reply to send.
    fn single_slot(info: &CommandInfo, args: &[Bytes]) -> Result<Option<u16>, Bytes> {
        let keys = commands::key_indices(info, args).map_err(|_| {
            err(format!(
                "ERR wrong number of arguments for '{}' command",
                info.name
            ))
        })?;
        let mut slot = None;
        for i in keys {
            let s = slot::slot(&args[i]);
            if slot.is_some_and(|x| x != s) {
                return Err(err("CROSSSLOT Keys in request don't hash to the same slot"));
            }
            slot = Some(s);
        }
        Ok(slot)
    }

    /// Commands while a WATCH is active. `None`: handle as usual (local
    /// commands, MULTI).
    fn on_watch(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: &[Bytes],
        raw: &Bytes,
    ) -> Option<Action> {
        let watch = st.watch.clone()?;
        match info.kind {
            Kind::Read | Kind::Write => {
                let slot = match Self::single_slot(info, args) {
                    Ok(s) => s,
                    Err(e) => return Some(Action::Reply(e)),
                };
                if let Some(s) = slot
                    && s != watch.slot
                {
                    return Some(Action::Reply(err(format!(
                        "CROSSSLOT cachetier: while WATCH is active, commands must use keys of the watched slot {} (this one uses slot {s})",
                        watch.slot
                    ))));
                }
                let keys = commands::key_indices(info, args).unwrap_or_default();
                let touched = self.touched_keys(info, args, &keys);
                Some(self.watch_call(st, info, watch, raw.clone(), 1, touched))
            }
            Kind::AnyPrimary => Some(self.watch_call(st, info, watch, raw.clone(), 1, Vec::new())),
            Kind::Server => match info.name {
                "watch" => Some(self.watch_command(st, info, args, raw)),
                "unwatch" => {
                    st.watch = None;
                    Some(self.watch_call(st, info, watch, raw.clone(), 1, Vec::new()))
                }
                _ => None,
            },
            Kind::Unsupported(_) => None,
        }
    }

    fn watch_command(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: &[Bytes],
        raw: &Bytes,
    ) -> Action {
        let slot = match Self::single_slot(info, args) {
            Ok(Some(s)) => s,
            Ok(None) => return Action::Reply(err("ERR wrong number of arguments for 'watch' command")),
            Err(e) => return Action::Reply(e),
        };
        let watch = match &st.watch {
            Some(w) if w.slot != slot => {
                return Action::Reply(err(format!(
                    "CROSSSLOT cachetier: all WATCHed keys must be in one slot (already watching slot {})",
                    w.slot
                )));
            }
            Some(w) => w.clone(),
            None => {
                let w = Arc::new(Watch {
                    slot,
                    conn: tokio::sync::Mutex::new(None),
                });
                st.watch = Some(w.clone());
                w
            }
        };
        self.watch_call(st, info, watch, raw.clone(), 1, Vec::new())
    }

    fn queue_in_multi(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: Vec<Bytes>,
    ) -> Action {
        match info.name {
            "exec" => {
                let cmds = st.multi.take().unwrap_or_default();
                let failed = std::mem::take(&mut st.multi_failed);
                let watch = st.watch.take();
                if failed {
                    return Action::Reply(err("EXECABORT Transaction discarded because of previous errors."));
                }
                if let Some(watch) = watch {
                    let mark = self
                        .config
                        .read_your_writes
                        .then(|| st.order.writing(vec![watch.slot]));
                    return self.exec_watched(st, info, watch, cmds, mark);
                }
                let this = self.clone();
                let up = st.upstream_proto();
                let order = self.config.read_your_writes.then(|| st.order.clone());
                self.timed(info, async move { this.exec(cmds, up, order).await })
            }
            "discard" => {
                st.multi = None;
                st.multi_failed = false;
                // DISCARD also unwatches; dropping the connection does that.
                st.watch = None;
                Action::Reply(ok())
            }
            "multi" => Action::Reply(err("ERR MULTI calls can not be nested")),
            _ => {
                let refusal = match info.kind {
                    Kind::Read | Kind::Write => match commands::key_indices(info, &args) {
                        Ok(_) => None,
                        Err(_) => Some(format!(
                            "ERR wrong number of arguments for '{}' command",
                            info.name
                        )),
                    },
                    Kind::Unsupported(reason) => Some(format!("ERR {reason}")),
                    Kind::AnyPrimary => None,
                    Kind::Server => Some(format!(
                        "ERR cachetier: '{}' cannot run inside MULTI through the sidecar",
                        info.name
                    )),
                };
                match refusal {
                    Some(e) => {
                        st.multi_failed = true;
                        Action::Reply(err(e))
                    }
                    None => {
                        if let Some(q) = st.multi.as_mut() {
                            q.push(args);
                        }
                        Action::Reply(Bytes::from_static(b"+QUEUED\r\n"))
                    }
                }
            }
        }
    }

    /// EXEC after WATCH: the queued block runs on the WATCH connection, where
    /// Redis checks the watched keys.
    fn exec_watched(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        watch: Arc<Watch>,
        cmds: Vec<Vec<Bytes>>,
        mark: Option<crate::order::WriteMark>,
    ) -> Action {
        let mut block = BytesMut::new();
        let mut touched = Vec::new();
        resp::encode_command(&["MULTI"], &mut block);
        for args in &cmds {
            if let Some(ci) = args.first().and_then(|n| commands::lookup(n)) {
                match Self::single_slot(ci, args) {
                    Ok(Some(s)) if s != watch.slot => {
                        return Action::Reply(err(
                            "CROSSSLOT Keys in request don't hash to the same slot (a watched transaction must stay in the watched slot)",
                        ));
                    }
                    Err(e) => return Action::Reply(e),
                    _ => {}
                }
                if let (Some(cache), Ok(keys)) = (&self.cache, commands::key_indices(ci, args)) {
                    touched.extend(
                        keys.iter()
                            .filter(|&&i| cache.covers(&args[i]))
                            .map(|&i| args[i].clone()),
                    );
                }
            }
            resp::encode_command(args, &mut block);
        }
        resp::encode_command(&["EXEC"], &mut block);
        let action = self.watch_call(st, info, watch, block.freeze(), cmds.len() + 2, touched);
        match action {
            // The transaction's writes count as pending until its reply.
            Action::Later(fut) => Action::Later(Box::pin(async move {
                let reply = fut.await;
                drop(mark);
                reply
            })),
            other => other,
        }
    }

    /// Run a queued transaction as one contiguous MULTI..EXEC block on the
    /// slot's primary. The block is written back to back on the shared
    /// connection, so no other client's command can land inside it.
    async fn exec(
        self: Arc<Self>,
        cmds: Vec<Vec<Bytes>>,
        up: Proto,
        order: Option<Arc<ClientOrder>>,
    ) -> Bytes {
        if cmds.is_empty() {
            return encode(&Frame::Array(Vec::new()));
        }
        let mut slot: Option<u16> = None;
        let mut touched: Vec<Bytes> = Vec::new();
        for args in &cmds {
            let Some(info) = args.first().and_then(|n| commands::lookup(n)) else {
                continue;
            };
            if let Ok(keys) = commands::key_indices(info, args) {
                for i in keys {
                    let s = slot::slot(&args[i]);
                    if slot.is_some_and(|x| x != s) {
                        return err(
                            "CROSSSLOT Keys in request don't hash to the same slot (a transaction through the sidecar must stay in one slot)",
                        );
                    }
                    slot = Some(s);
                    if let Some(c) = &self.cache
                        && c.covers(&args[i])
                    {
                        c.bump(&args[i]);
                        touched.push(args[i].clone());
                    }
                }
            }
        }
        let _written = order.zip(slot).map(|(o, s)| o.writing(vec![s]));
        let reply = self.exec_block(&cmds, slot, up).await;
        if let Some(c) = &self.cache {
            for k in &touched {
                c.invalidate(k, "own_write").await;
            }
        }
        reply
    }

    /// `MULTI`, the queued commands, `EXEC` as one block, preceded by
    /// `ASKING` when `asking` (Redis keeps the flag for a whole `MULTI`).
    /// Returns the block and how many replies it produces.
    fn tx_block(cmds: &[Vec<Bytes>], asking: bool) -> (Bytes, usize) {
        let mut block = BytesMut::new();
        if asking {
            resp::encode_command(&["ASKING"], &mut block);
        }
        resp::encode_command(&["MULTI"], &mut block);
        for args in cmds {
            resp::encode_command(args, &mut block);
        }
        resp::encode_command(&["EXEC"], &mut block);
        (block.freeze(), cmds.len() + 2 + usize::from(asking))
    }

    /// Run a transaction on its slot's primary, following MOVED, ASK (the
    /// slot is migrating and its keys are on the importing node) and
    /// TRYAGAIN (keys split mid-migration) as a single command would.
    async fn exec_block(self: &Arc<Self>, cmds: &[Vec<Bytes>], slot: Option<u16>, up: Proto) -> Bytes {
        let mut target: Option<Arc<Node>> = None;
        let mut asking = false;
        for attempt in 0..MAX_REDIRECTS {
            let (block, n) = Self::tx_block(cmds, asking);
            let node = match (&target, slot) {
                (Some(n), _) => n.clone(),
                (None, Some(s)) => match self.registry.current().shard(s) {
                    Some(sh) => sh.primary.clone(),
                    None => return err(format!("CLUSTERDOWN Hash slot {s} is not served")),
                },
                (None, None) => match self.primaries().into_iter().next() {
                    Some(n) => n,
                    None => return err("CLUSTERDOWN cachetier: topology not known yet"),
                },
            };
            match node.request(up, block, n).await {
                Ok(replies) => {
                    let moved = replies.iter().find_map(|r| redirect_target(r, b"MOVED "));
                    if let Some(addr) = moved {
                        self.registry.request_refresh();
                        target = Some(self.registry.node(&addr));
                        asking = false;
                        continue;
                    }
                    if let Some(addr) = replies.iter().find_map(|r| redirect_target(r, b"ASK ")) {
                        self.metrics.redirects.with_label_values(&["ask"]).inc();
                        target = Some(self.registry.node(&addr));
                        asking = true;
                        continue;
                    }
                    if replies.iter().any(|r| r.starts_with(b"-TRYAGAIN")) && attempt + 1 < MAX_REDIRECTS {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let last = replies.last().cloned().unwrap_or_default();
                    // A command refused at queue time aborts EXEC; surface its
                    // reason with the abort.
                    if last.starts_with(b"-EXECABORT")
                        && let Some(first) =
                            replies[1..replies.len() - 1].iter().find(|r| r.starts_with(b"-"))
                    {
                        let why = resp::error_text(first)
                            .map(|t| String::from_utf8_lossy(t).into_owned())
                            .unwrap_or_default();
                        return err(format!(
                            "EXECABORT Transaction discarded because of previous errors: {why}"
                        ));
                    }
                    return last;
                }
                Err(e) => return upstream_error(&node.addr, Kind::Write, &e),
            }
        }
        err("ERR cachetier: too many MOVED redirects for a transaction")
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
