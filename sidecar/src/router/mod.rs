//! From a parsed client command to a reply: key extraction, slot routing,
//! read balancing with one retry, MOVED/ASK, cross-slot split and merge, the
//! local cache, server-wide fan-out and pinned transactions.
//!
//! Every function here returns the raw reply bytes the client will see;
//! failures become RESP errors that say what the sidecar did. This file
//! holds dispatch, the client's state and keyed commands (with
//! read-your-writes); `route.rs` routing to one node (replica choice,
//! retries, MOVED/ASK) and to every primary, `cached.rs` the local cache's
//! reads and fills; `server.rs` the commands a server answers
//! about itself and the fan-outs, `transaction.rs` MULTI/EXEC, `watch.rs` WATCH,
//! `split.rs` cross-slot split and merge, `../blocking.rs` blocking commands
//! (`pop_across.rs` a blocking pop whose keys span slots, `stream_across.rs`
//! a stream read whose streams do, with its commands and replies in
//! `stream_read.rs`).

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
use crate::session::{self, Exec, Session};
use crate::slot;
use crate::topology::Registry;
use crate::upstream::{Node, Proto};

mod cached;
mod client;
mod cross_slot;
mod direct;
mod info;
mod local_metrics;
mod pop_across;
mod pubsub_query;
mod route;
mod server;
mod split;
mod stream_across;
mod stream_read;
mod transaction;
mod wait;
mod watch;

use client::{ClientReply, text};
pub use direct::{Direct, Outcome, Place};
pub use local_metrics::ClientMetrics;
use route::{redirect_target, upstream_error};
pub use watch::{MAX_WATCHED_SLOTS, Watch, Watches};

const MAX_REDIRECTS: usize = 5;

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Per-client-connection state that changes how later commands are answered.
#[derive(Debug)]
pub struct ClientState {
    pub id: u64,
    /// Protocol, name and MULTI block (`session.rs`, no I/O).
    pub session: Session,
    /// Active `WATCH`: the client's keyed commands of a watched slot run on
    /// a connection of its own to the slot's primary until EXEC, DISCARD or
    /// UNWATCH (`watch.rs`).
    pub watch: Watches,
    /// Keeps the client's commands in the order it sent them (`order.rs`).
    order: Arc<ClientOrder>,
    /// The stage of the client's latest command that went upstream.
    last: Option<StageRx>,
    /// The client's connection for blocking commands (`blocking.rs`).
    blocking: BlockingCell,
    /// `CLIENT TRACKING`, while on (`client_cache.rs`).
    pub tracker: Option<Box<crate::client_cache::Tracker>>,
    /// `CLIENT NO-EVICT on` (shown in `CLIENT LIST`; `RESET` keeps it, as
    /// in Redis 7.0).
    no_evict: bool,
    /// Its last command's table entry.
    recent: commands::Recent,
    /// Its copy of the topology (the direct path's routing).
    topology: crate::topology::Snapshot,
    /// Its handles on the connections the direct path sends on.
    conns: crate::upstream::ConnCache,
    /// What `CLIENT LIST` shows of it, once its connection registered.
    pub view: Option<Arc<crate::clients::Client>>,
}

impl Default for ClientState {
    fn default() -> Self {
        Self {
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            session: Session::default(),
            watch: Watches::default(),
            order: Arc::new(ClientOrder::default()),
            last: None,
            blocking: BlockingCell::default(),
            tracker: None,
            no_evict: false,
            recent: commands::Recent::default(),
            topology: crate::topology::Snapshot::default(),
            conns: crate::upstream::ConnCache::default(),
            view: None,
        }
    }
}

impl ClientState {
    fn upstream_proto(&self) -> Proto {
        if self.session.proto == 3 {
            Proto::Resp3
        } else {
            Proto::Resp2
        }
    }

    /// Turn `CLIENT TRACKING` on or off: its reads go to primaries while
    /// it is on (`client_cache.rs`).
    fn set_tracker(&mut self, tracker: Option<Box<crate::client_cache::Tracker>>) {
        self.order.set_primary_reads(tracker.is_some());
        self.tracker = tracker;
    }

    /// Show the session's state in `c`'s `CLIENT LIST` line.
    fn show(&self, c: &crate::clients::Client) {
        c.session(
            self.session.name.as_ref(),
            self.session.proto,
            self.session.queued(),
        );
        let bcast = self.tracker.as_ref().is_some_and(|t| t.options.bcast);
        c.tracking(self.tracker.is_some(), bcast);
        c.no_evict(self.no_evict);
    }
}

/// The boxed reply future a client connection queues in pipeline order.
pub type ReplyFuture = std::pin::Pin<Box<dyn Future<Output = Bytes> + Send>>;

/// What the connection does with one parsed command.
pub enum Action {
    Reply(Bytes),
    Later(ReplyFuture),
    /// As `Later`, for a command that waits on other clients for as long
    /// as its arguments say (a blocking command, `WAIT`): when the client
    /// goes away while it waits, its connection closes at once, as Redis
    /// drops a gone client's blocked command.
    Blocking(ReplyFuture),
    /// Sent from the client's task; the reply comes through its inbox.
    Direct(Direct),
    /// Reply, then close the connection (QUIT).
    Close(Bytes),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Reply(b) => f.debug_tuple("Reply").field(b).finish(),
            Action::Later(_) => f.write_str("Later"),
            Action::Blocking(_) => f.write_str("Blocking"),
            Action::Direct(d) => f.debug_tuple("Direct").field(d).finish(),
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

/// A command's arguments from its words, for tests.
#[cfg(test)]
fn args(words: &[&str]) -> Vec<Bytes> {
    words
        .iter()
        .map(|w| Bytes::copy_from_slice(w.as_bytes()))
        .collect()
}

/// The nil of a command whose reply is an array (EXEC aborted, a
/// blocking pop timed out), in the upstream protocol.
fn nil_array(up: Proto) -> Bytes {
    encode(&if up == Proto::Resp3 {
        Frame::Null
    } else {
        Frame::NullArray
    })
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

/// `fut`, run after every earlier command of the client has its reply;
/// every later command waits for its reply.
fn in_turn(mut turn: Turn, fut: ReplyFuture) -> ReplyFuture {
    Box::pin(async move {
        turn.prev_done().await;
        let reply = fut.await;
        turn.finish().await;
        reply
    })
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
    /// Every client connection, for `CLIENT LIST` and `CLIENT KILL`.
    pub clients: Arc<crate::clients::Clients>,
    /// What the keyspace mirror links are subscribed to (`PUBSUB` leaves them out).
    pub mirrors: Arc<crate::pubsub::keyspace::MirrorCounts>,
    /// The invalidation feeds of clients with `CLIENT TRACKING` on.
    pub tracking: Arc<crate::client_cache::Hub>,
    /// What `INFO server` tells of this process.
    process: info::Process,
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
        let tracking = crate::client_cache::Hub::new(metrics.clone());
        Router {
            registry,
            config,
            metrics,
            cache,
            per_command,
            blocking_permits: crate::blocking::permits(),
            clients: Arc::default(),
            mirrors: Arc::default(),
            tracking,
            process: info::Process::new(),
        }
    }

    /// Decide what to do with one command. Connection-state commands are
    /// applied here, synchronously, so later pipelined commands see them.
    /// With a `place` in the client's pipeline, the common command is sent
    /// at once (`direct.rs`).
    pub fn dispatch(
        self: &Arc<Self>,
        st: &mut ClientState,
        req: resp::Request,
        place: Option<Place<'_>>,
    ) -> Action {
        let Some(name) = req.arg(0) else {
            return Action::Reply(err("ERR empty command"));
        };
        let Some(info) = st.recent.lookup(name) else {
            self.metrics
                .requests
                .with_label_values(&["unknown", "error"])
                .inc();
            // Inside MULTI, as in Redis, it also aborts the transaction.
            if st.session.in_multi() {
                st.session.refuse_queued();
            }
            let args: Vec<&[u8]> = (0..req.argc()).filter_map(|i| req.arg(i)).collect();
            let mut out = BytesMut::new();
            Frame::Error(commands::unknown_command(&args)).encode(&mut out);
            return Action::Reply(out.freeze());
        };
        if let Err(e) = self.check_arity(st, info, &req) {
            return Action::Reply(e);
        }
        let (turn, next) = st.order.next(st.last.take());
        st.last = Some(next);
        let mut turn = Some(turn);
        // Before the command runs: CLIENT LIST shows it as the last one.
        if let Some(view) = &st.view {
            view.command(info.id);
        }
        let action = self.dispatch_inner(st, info, req, &mut turn, place);
        // Only these change the name, protocol or MULTI queue it shows.
        if (info.kind == Kind::Server || st.session.in_multi())
            && let Some(view) = &st.view
        {
            st.show(view);
        }
        match (action, turn) {
            // The keyed paths took the turn and order themselves.
            (action, None) => action,
            // Anything else that goes upstream runs after everything before
            // it has its reply, and everything after it waits for its reply.
            (Action::Later(fut), Some(turn)) => Action::Later(in_turn(turn, fut)),
            (Action::Blocking(fut), Some(turn)) => Action::Blocking(in_turn(turn, fut)),
            // Answered here: no place in the upstream order.
            (action, Some(turn)) => {
                st.last = turn.into_prev();
                action
            }
        }
    }

    /// Refuse a command whose argument count Redis would refuse, in
    /// Redis's words, before anything else (a refused command inside
    /// `MULTI` aborts the transaction, as in Redis).
    #[inline]
    fn check_arity(
        &self,
        st: &mut ClientState,
        info: &'static CommandInfo,
        req: &resp::Request,
    ) -> Result<(), Bytes> {
        let argc = req.argc();
        // The common case, on every request: the count fits, no subcommand.
        if info.arity.is_none_or(|a| crate::arity::fits(a, argc)) && (info.kind != Kind::Server || argc < 2) {
            return Ok(());
        }
        self.refuse_arity(st, info, req)
    }

    /// [`Self::check_arity`]'s slow half: the refusal, if any.
    #[cold]
    fn refuse_arity(
        &self,
        st: &mut ClientState,
        info: &'static CommandInfo,
        req: &resp::Request,
    ) -> Result<(), Bytes> {
        let argc = req.argc();
        let refusal = commands::wrong_arity(info, argc).or_else(|| {
            let args: Vec<&[u8]> = (0..argc).filter_map(|i| req.arg(i)).collect();
            crate::arity::check_subcommand(info.name, &args).err()
        });
        let Some(refusal) = refusal else {
            return Ok(());
        };
        self.count(info.name, "error");
        if info.name == "exec" {
            // Redis ends the transaction and says why.
            st.session.discard();
            st.watch.clear();
            let why = refusal.trim_start_matches("ERR ");
            return Err(err(format!("EXECABORT Transaction discarded because of: {why}")));
        }
        if st.session.in_multi() {
            st.session.refuse_queued();
        }
        Err(err(refusal))
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
        req: resp::Request,
        turn: &mut Option<Turn>,
        place: Option<Place<'_>>,
    ) -> Action {
        let keyed = matches!(info.kind, Kind::Read | Kind::Write);
        // The common command goes out at once, its arguments read in place
        // (MULTI queues, and WATCH sends keyed commands on its connection).
        let req = match place {
            Some(place) if keyed && !st.session.in_multi() && !st.watch.is_active() => {
                match self.try_direct(st, info, req, turn, place) {
                    Ok(direct) => return Action::Direct(direct),
                    Err(req) => req,
                }
            }
            _ => req,
        };
        let (raw, args) = req.into_parts();
        if st.session.in_multi() {
            return self.queue_in_multi(st, info, args);
        }
        if st.watch.is_active()
            && let Some(action) = self.on_watch(st, info, &args, &raw)
        {
            return action;
        }
        let proto = st.session.proto;
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
                let arrived = place.map(|p| p.arrived);
                let this = self.clone();
                let up = st.upstream_proto();
                let Some(mut turn) = turn.take() else {
                    return Action::Reply(err("ERR cachetier: command without a place in order"));
                };
                let blocking = st.blocking.clone();
                let blocks = commands::block_timeout(info.name, &args).is_some();
                // As `timed`, written out: the request's future is built in
                // its box's async block instead of being moved into
                // `timed`'s (two copies of a ~1 KiB state per request).
                let m = self.handles(info);
                let fut: ReplyFuture = Box::pin(async move {
                    let start = arrived.unwrap_or_else(std::time::Instant::now);
                    let reply = this.keyed(info, args, raw, up, proto, &mut turn, &blocking).await;
                    turn.finish().await;
                    CommandMetrics::record(m.as_deref(), &reply, start);
                    reply
                });
                if blocks {
                    Action::Blocking(fut)
                } else {
                    Action::Later(fut)
                }
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

    /// An `XREAD`/`XREADGROUP` whose streams span slots, to read per stream.
    fn stream_read(info: &CommandInfo, args: &[Bytes], keys: &[usize]) -> Option<stream_read::StreamRead> {
        let group = match info.name {
            "xread" => false,
            "xreadgroup" => true,
            _ => return None,
        };
        stream_read::StreamRead::of(group, args, keys)
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
            // Keys at fixed steps that the arguments do not fill (`MSET a 1
            // b`): what one server answers (a cluster node would first
            // refuse the keys' slots).
            Err(KeyError::WrongArity) if matches!(info.keys, commands::KeySpec::Range { .. }) => {
                return err(format!(
                    "ERR wrong number of arguments for '{}' command",
                    info.name
                ));
            }
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
        // A tracking client reads around the local cache (`client_cache.rs`).
        let around_cache = turn.primary_reads();
        let cached_mget = info.split == Some(Split::Array)
            && !around_cache
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
            } else if let Some(form) = pop_across::PopForm::of(info.name, &args, &keys) {
                Box::pin(self.pop_across_slots(form, &args, &keys, block, blocking, up)).await
            } else if let Some(read) = Self::stream_read(info, &args, &keys) {
                Box::pin(self.xread_across_slots(read, Some(block), blocking, up)).await
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
                Some(_) => {
                    // Several parts on several connections: ordered as a whole.
                    turn.prev_done().await;
                    if let Some(cache) = &self.cache {
                        touched.iter().for_each(|k| cache.bump(k));
                    }
                    Box::pin(self.split(info, &args, &keys, &slots, up, proto, turn)).await
                }
                None => match Self::stream_read(info, &args, &keys) {
                    Some(read) => {
                        turn.prev_done().await;
                        Box::pin(self.xread_across_slots(read, None, blocking, up)).await
                    }
                    None => err("CROSSSLOT Keys in request don't hash to the same slot"),
                },
            }
        } else if let Some(variant) = self.cache_variant(info, &args).filter(|_| !around_cache) {
            Box::pin(
                self.clone()
                    .cached_read(variant, args.clone(), slots[0], up, proto, turn),
            )
            .await
        } else {
            let to_primary = commands::reads_on_primary(info.name);
            self.single_via(slots[0], info.kind, to_primary, raw, up, Some(turn))
                .await
        };
        if let Some(cache) = &self.cache {
            for k in &touched {
                Box::pin(cache.invalidate(k, "own_write")).await;
            }
        }
        reply
    }
}
