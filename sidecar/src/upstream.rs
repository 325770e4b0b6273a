//! Upstream nodes and their pipelined connections, with the response watchdog.
//!
//! Each node has one long-lived connection per protocol version that every
//! client request multiplexes onto: requests are written back to back and
//! replies matched in order. The connection's reader tracks the *oldest*
//! outstanding request; if it waits longer than the response timeout the
//! connection is closed, every request on it fails with
//! [`UpstreamError::Timeout`], and the node leaves rotation until a fresh
//! connection answers a probe. Lesson 1 of PRODUCT.md: a node that is silent
//! but not dead must not stall its clients.
//!
//! What happens to the failed requests (retry a read elsewhere, fail a write)
//! is the caller's decision; this module never retries.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

use crate::lock;
use crate::order::Turn;
use crate::replica::ReadState;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{oneshot, watch};

use crate::connect::handshake;
pub use crate::connect::{Dedicated, Proto, oneshot_command, opening};
use crate::error::UpstreamError;
use crate::inbox::Inbox;
use crate::metrics::Metrics;
use crate::resp::{self, Limits};

mod conn;
use conn::{Conn, ConnState, ReplyTo, Request, Sink, reader, send_in_turn, writer};

static NEXT_CONN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Settings shared by every node.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub response_timeout: Duration,
    /// Bound on a command known to be slow (scripts, `KEYS`, `FLUSHALL`…),
    /// which runs on a connection of its own.
    pub slow_timeout: Duration,
    pub metrics: Metrics,
    pub auth: Option<crate::config::Credentials>,
}

/// One Redis node as the sidecar sees it.
pub struct Node {
    pub addr: String,
    settings: UpstreamSettings,
    /// This node's series of the upstream latency histogram, resolved once.
    latency: prometheus::Histogram,
    /// False after a watchdog closure or connect failure, until a probe succeeds.
    healthy: AtomicBool,
    /// Replica read gate, a [`ReadState`] (see `gate.rs`); starts `Closed` so
    /// a new replica gets no reads before its first successful poll.
    read_state: AtomicU8,
    /// Replies its shared connections wait for (see `ConnState::in_flight`).
    in_flight: Arc<AtomicUsize>,
    probing: AtomicBool,
    /// Set when the node leaves the topology; stops probes.
    retired: AtomicBool,
    /// A primary whose `CLIENT TRACKING` connection is established: the local
    /// cache may keep entries for its slots (see `cache.rs`).
    pub tracked: AtomicBool,
    /// A replica holds everything its primary had at this instant (from the
    /// read gate's offset polls): read-your-writes routing (`order.rs`).
    caught_up: Mutex<Option<Instant>>,
    conns: [Mutex<Option<Conn>>; 2],
    connecting: [tokio::sync::Mutex<()>; 2],
    /// Known-slow commands running on this node, and until when at most.
    busy: Mutex<(usize, Option<Instant>)>,
    /// Idle connections for known-slow commands, per protocol.
    slow_pool: [Mutex<Vec<Dedicated>>; 2],
    this: Weak<Node>,
}

/// Why [`Node::send_now`] could not queue a request.
enum NotNow {
    /// No live connection (yet): connect, then send.
    NoConnection,
    /// The client's previous command is not where this one may follow it.
    OutOfTurn,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("addr", &self.addr)
            .field("healthy", &self.is_healthy())
            .field("gate_open", &self.gate_open())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Node {
    pub fn new(addr: String, settings: UpstreamSettings) -> Arc<Node> {
        let latency = settings
            .metrics
            .upstream_latency
            .with_label_values(&[addr.as_str()]);
        Arc::new_cyclic(|this| Node {
            addr,
            settings,
            latency,
            healthy: AtomicBool::new(true),
            read_state: AtomicU8::new(ReadState::Closed as u8),
            in_flight: Arc::new(AtomicUsize::new(0)),
            probing: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            tracked: AtomicBool::new(false),
            caught_up: Mutex::new(None),
            conns: [Mutex::new(None), Mutex::new(None)],
            connecting: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
            busy: Mutex::new((0, None)),
            slow_pool: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
            this: this.clone(),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn read_state(&self) -> ReadState {
        match self.read_state.load(Ordering::Relaxed) {
            s if s == ReadState::Serving as u8 => ReadState::Serving,
            s if s == ReadState::LastResort as u8 => ReadState::LastResort,
            _ => ReadState::Closed,
        }
    }

    pub fn set_read_state(&self, state: ReadState) {
        self.read_state.store(state as u8, Ordering::Relaxed);
    }

    pub fn gate_open(&self) -> bool {
        self.read_state() == ReadState::Serving
    }

    pub fn set_gate(&self, open: bool) {
        self.set_read_state(if open {
            ReadState::Serving
        } else {
            ReadState::Closed
        });
    }

    /// The replica holds everything its primary had at `at`.
    pub fn set_caught_up(&self, at: Instant) {
        let mut c = lock(&self.caught_up);
        if c.is_none_or(|t| t < at) {
            *c = Some(at);
        }
    }

    /// Does the replica hold everything its primary had at `at`?
    pub fn caught_up_since(&self, at: Instant) -> bool {
        lock(&self.caught_up).is_some_and(|t| t > at)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// May this node take reads as a replica?
    pub fn serving_replica(&self) -> bool {
        self.is_healthy() && self.gate_open()
    }

    /// May this node take reads when its primary is down? (See [`ReadState`].)
    pub fn last_resort_replica(&self) -> bool {
        self.is_healthy() && self.read_state() == ReadState::LastResort
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Close connections and stop background work: the node left the
    /// topology. Its metric series go too, so a churning cluster does not
    /// grow the exposition without bound.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        let m = &self.settings.metrics;
        let addr = self.addr.as_str();
        let _ = m.upstream_latency.remove_label_values(&[addr]);
        let _ = m.watchdog_closures.remove_label_values(&[addr]);
        for role in ["primary", "replica"] {
            let _ = m.node_serving.remove_label_values(&[addr, role]);
        }
        for reason in ["connect", "timeout", "closed", "protocol"] {
            let _ = m.upstream_errors.remove_label_values(&[addr, reason]);
        }
        for slot in &self.conns {
            if let Some(c) = lock(slot).take() {
                c.state
                    .close(&UpstreamError::Closed("node left the topology".into()));
            }
        }
    }

    /// Send `bytes` (holding `replies` commands) and wait for all their replies.
    pub async fn request(
        &self,
        proto: Proto,
        bytes: Bytes,
        replies: usize,
    ) -> Result<Vec<Bytes>, UpstreamError> {
        self.request_in(proto, bytes, replies, None, false).await
    }

    /// [`Node::request`] in a client's order: queued only where `turn`
    /// allows (see `order.rs`), marking the turn sent on that connection.
    pub async fn request_in(
        &self,
        proto: Proto,
        bytes: Bytes,
        replies: usize,
        turn: Option<&mut Turn>,
        write: bool,
    ) -> Result<Vec<Bytes>, UpstreamError> {
        // Latency is observed by the connection's reader (write of the batch
        // to read of the reply, one clock read per batch, not per request).
        let result = match self.enqueue(proto, bytes, replies, turn, write).await {
            Ok(rx) => match rx.await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Closed("connection task ended".into())),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    /// The live shared connection for `proto`, if there is one.
    fn current(&self, proto: Proto) -> Option<Conn> {
        lock(&self.conns[proto as usize])
            .as_ref()
            .filter(|c| !c.state.dead.load(Ordering::SeqCst))
            .cloned()
    }

    /// Queue `req` on this node's live connection for `proto` at once, if
    /// `turn` allows it there; under the slot's lock (queueing never waits)
    /// rather than cloning the connection handle per request. Hands the
    /// request back with the reason otherwise.
    fn send_now<'a, B: AsRef<[u8]>>(
        &self,
        proto: Proto,
        req: Request<'a, B>,
        turn: Option<&Turn>,
        write: bool,
    ) -> Result<(), (Request<'a, B>, NotNow)> {
        let slot = lock(&self.conns[proto as usize]);
        let Some(c) = slot.as_ref().filter(|c| !c.state.dead.load(Ordering::SeqCst)) else {
            return Err((req, NotNow::NoConnection));
        };
        if !turn.is_none_or(|t| t.may_send_on(c.id, write)) {
            return Err((req, NotNow::OutOfTurn));
        }
        send_in_turn(c, req, turn, write).map_err(|r| (r, NotNow::NoConnection))
    }

    pub(crate) fn count_error(&self, e: &UpstreamError) {
        self.settings
            .metrics
            .upstream_errors
            .with_label_values(&[self.addr.as_str(), e.label()])
            .inc();
    }

    async fn enqueue(
        &self,
        proto: Proto,
        bytes: Bytes,
        replies: usize,
        mut turn: Option<&mut Turn>,
        write: bool,
    ) -> Result<oneshot::Receiver<Result<Vec<Bytes>, UpstreamError>>, UpstreamError> {
        let (tx, rx) = oneshot::channel();
        let mut req = Request {
            bytes,
            replies,
            to: ReplyTo::Sink(Sink::Channel(tx)),
        };
        for _ in 0..3 {
            match self.send_now(proto, req, turn.as_deref(), write) {
                Ok(()) => return Ok(rx),
                Err((r, NotNow::OutOfTurn)) => {
                    req = r;
                    if let Some(t) = turn.as_deref_mut() {
                        t.prev_done().await;
                    }
                    continue;
                }
                Err((r, NotNow::NoConnection)) => req = r,
            }
            let conn = match self.current(proto) {
                Some(c) => c,
                // Boxed: the handshake's state machine is large and only
                // needed when (re)connecting, not on every request.
                None => Box::pin(self.connect_shared(proto)).await?,
            };
            if let Some(t) = turn.as_deref_mut()
                && !t.may_send_on(conn.id, write)
            {
                t.prev_done().await;
            }
            match send_in_turn(&conn, req, turn.as_deref(), write) {
                Ok(()) => return Ok(rx),
                Err(r) => req = r,
            }
        }
        Err(UpstreamError::Closed("connection closed while sending".into()))
    }

    async fn connect_shared(&self, proto: Proto) -> Result<Conn, UpstreamError> {
        let idx = proto as usize;
        let _g = self.connecting[idx].lock().await;
        if let Some(c) = self.current(proto) {
            return Ok(c);
        }
        match self.open(proto).await {
            Ok(c) => {
                *lock(&self.conns[idx]) = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.mark_down();
                Err(e)
            }
        }
    }

    async fn open(&self, proto: Proto) -> Result<Conn, UpstreamError> {
        let timeout = self.settings.response_timeout;
        let (rd, wr, buf) = handshake(&self.addr, proto, timeout, self.settings.auth.as_ref()).await?;
        let (closed, _) = watch::channel(false);
        let state = Arc::new(ConnState::new(closed, self.in_flight.clone()));
        tokio::spawn(writer(wr, state.clone()));
        tokio::spawn(reader(
            rd,
            buf,
            state.clone(),
            self.this.clone(),
            timeout,
            self.latency.clone(),
        ));
        Ok(Conn {
            id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
            state,
        })
    }

    /// While a known-slow command runs here (up to its bound), the node's
    /// shared connections are not judged silent: Redis is single-threaded,
    /// so everything else waits behind the command.
    fn busy_until(&self) -> Option<Instant> {
        match *lock(&self.busy) {
            (n, until) if n > 0 => until,
            _ => None,
        }
    }

    /// Run a command known to be slow on a connection of its own, bounded by
    /// the slow-command timeout rather than the response timeout.
    pub async fn slow_request(
        &self,
        proto: Proto,
        bytes: Bytes,
        replies: usize,
    ) -> Result<Vec<Bytes>, UpstreamError> {
        struct Busy<'a>(&'a Node);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                let mut b = lock(&self.0.busy);
                b.0 = b.0.saturating_sub(1);
            }
        }
        // Never tighter than the ordinary bound.
        let bound = self.settings.slow_timeout.max(self.settings.response_timeout);
        let pooled = lock(&self.slow_pool[proto as usize]).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let timeout = self.settings.response_timeout;
                Dedicated::open(&self.addr, proto, timeout, self.settings.auth.as_ref()).await?
            }
        };
        conn.timeout = bound;
        let _busy = {
            let mut b = lock(&self.busy);
            let until = Instant::now() + bound;
            b.0 += 1;
            b.1 = Some(b.1.map_or(until, |u| u.max(until)));
            Busy(self)
        };
        let result = conn.call(&bytes, replies).await;
        if result.is_ok() {
            let mut pool = lock(&self.slow_pool[proto as usize]);
            if pool.len() < 4 {
                pool.push(conn);
            }
        }
        result
    }

    fn is_current(&self, state: &Arc<ConnState>) -> bool {
        self.conns
            .iter()
            .any(|c| lock(c).as_ref().is_some_and(|c| Arc::ptr_eq(&c.state, state)))
    }

    /// Install `conn` as the connection for `proto`, closing the one it
    /// replaces (marked dead first, so its end is not taken for a failure).
    fn install(&self, proto: Proto, conn: Option<Conn>) {
        let old = std::mem::replace(&mut *lock(&self.conns[proto as usize]), conn);
        if let Some(old) = old {
            old.state.dead.store(true, Ordering::SeqCst);
            old.state
                .close(&UpstreamError::Closed("replaced after a probe".into()));
        }
    }

    /// Take the node out of rotation and start probing it.
    pub fn mark_down(&self) {
        // A replica coming back must pass a fresh read-gate poll too (it may
        // have fallen behind while it was silent).
        self.read_state.store(ReadState::Closed as u8, Ordering::SeqCst);
        if self.healthy.swap(false, Ordering::SeqCst) {
            tracing::warn!(node = %self.addr, "node out of rotation");
        }
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(node) = self.this.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if node.retired.load(Ordering::Relaxed) {
                    break;
                }
                // The handshake (READONLY) is the probe: it needs a reply within
                // the response timeout, which a stopped process cannot give even
                // though its kernel still accepts the TCP connection.
                if let Ok(conn) = node.open(Proto::Resp2).await {
                    node.install(Proto::Resp2, Some(conn));
                    node.install(Proto::Resp3, None);
                    // Probing ends before the node is healthy again, so a
                    // failure from here on starts a new probe instead of
                    // being swallowed by this one.
                    node.probing.store(false, Ordering::SeqCst);
                    node.healthy.store(true, Ordering::SeqCst);
                    tracing::info!(node = %node.addr, "node back in rotation after a successful probe");
                    return;
                }
            }
            node.probing.store(false, Ordering::SeqCst);
        });
    }
}

/// A client task's handles on the shared connections it sends to straight
/// from its task (`router/direct.rs`): a connection is looked up under its
/// node's lock once, not per request. A handle stays good while its
/// connection lives (a connection leaves its node only dead), and the cache
/// empties when the topology changes, so it keeps no node alive for long.
#[derive(Default)]
pub struct ConnCache {
    generation: u64,
    entries: Vec<(Arc<Node>, Proto, Conn)>,
}

impl std::fmt::Debug for ConnCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnCache")
            .field("generation", &self.generation)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// Handles one client keeps at most (a client of a big cluster that
/// touches every node keeps looking some up).
const CACHED_CONNS: usize = 32;

impl ConnCache {
    /// Queue a one-reply request for a client's inbox (position `seq`) at
    /// once, from the client's own task, if `node`'s connection for `proto`
    /// is up and `turn` allows it there; false (nothing sent) otherwise, and
    /// the caller takes the awaited path, which connects and waits as
    /// needed. The reply, or the failure, reaches the inbox. `generation`
    /// is that of the client's topology snapshot.
    #[allow(clippy::too_many_arguments)]
    pub fn send_direct(
        &mut self,
        generation: u64,
        node: &Arc<Node>,
        proto: Proto,
        bytes: &[u8],
        turn: &Turn,
        write: bool,
        inbox: &Arc<Inbox>,
        seq: u64,
    ) -> bool {
        let Some(i) = self.live(generation, node, proto) else {
            return false;
        };
        let conn = &self.entries[i].2;
        if !turn.may_send_on(conn.id, write) {
            return false;
        }
        let req = Request {
            bytes,
            replies: 1,
            to: ReplyTo::Inbox(inbox, seq),
        };
        if send_in_turn(conn, req, Some(turn), write).is_err() {
            self.entries.swap_remove(i);
            return false;
        }
        true
    }

    /// The index of a live handle on `node`'s connection for `proto`,
    /// looked up again when the cached one died.
    fn live(&mut self, generation: u64, node: &Arc<Node>, proto: Proto) -> Option<usize> {
        if self.generation != generation {
            self.generation = generation;
            self.entries.clear();
        }
        let cached = self
            .entries
            .iter()
            .position(|(n, p, _)| *p == proto && Arc::ptr_eq(n, node));
        if let Some(i) = cached {
            if !self.entries[i].2.state.dead.load(Ordering::SeqCst) {
                return Some(i);
            }
            self.entries.swap_remove(i);
        }
        let conn = node.current(proto)?;
        if self.entries.len() >= CACHED_CONNS {
            self.entries.clear();
        }
        self.entries.push((node.clone(), proto, conn));
        Some(self.entries.len() - 1)
    }
}
