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
use tokio::sync::{mpsc, oneshot, watch};

use crate::connect::handshake;
pub use crate::connect::{Dedicated, Proto, oneshot_command, opening};
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::resp::{self, Limits};

type ReplyTx = oneshot::Sender<Result<Vec<Bytes>, UpstreamError>>;

struct Request {
    bytes: Bytes,
    replies: usize,
    tx: ReplyTx,
}

struct Pending {
    expected: usize,
    got: Vec<Bytes>,
    tx: ReplyTx,
    sent: Instant,
}

struct ConnState {
    pending: Mutex<VecDeque<Pending>>,
    dead: AtomicBool,
    closed: watch::Sender<bool>,
    /// Wakes the reader when the queue goes from empty to non-empty, so it
    /// arms the watchdog for the new oldest request.
    armed: tokio::sync::Notify,
}

impl ConnState {
    /// Mark dead and fail everything outstanding. Idempotent.
    fn close(&self, why: &UpstreamError) {
        self.dead.store(true, Ordering::SeqCst);
        self.closed.send_replace(true);
        let drained: Vec<Pending> = lock(&self.pending).drain(..).collect();
        for p in drained {
            let _ = p.tx.send(Err(why.clone()));
        }
    }
}

#[derive(Clone)]
struct Conn {
    /// Unique per connection: [`Turn`]s compare it to keep a client's order.
    id: u64,
    tx: mpsc::UnboundedSender<Request>,
    state: Arc<ConnState>,
}

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
    in_flight: AtomicUsize,
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
            in_flight: AtomicUsize::new(0),
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
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&self.in_flight);
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
            self.settings
                .metrics
                .upstream_errors
                .with_label_values(&[self.addr.as_str(), e.label()])
                .inc();
        }
        result
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
        let mut req = Request { bytes, replies, tx };
        let idx = proto as usize;
        for _ in 0..3 {
            // Fast path: send under the slot's lock (an unbounded send never
            // waits) instead of cloning the connection handle per request.
            let mut out_of_turn = false;
            {
                let slot = lock(&self.conns[idx]);
                if let Some(c) = slot.as_ref()
                    && !c.state.dead.load(Ordering::SeqCst)
                {
                    if turn.as_deref().is_none_or(|t| t.may_send_on(c.id, write)) {
                        match send_in_turn(c, req, turn.as_deref(), write) {
                            Ok(()) => return Ok(rx),
                            Err(r) => req = r,
                        }
                    } else {
                        out_of_turn = true;
                    }
                }
            }
            if out_of_turn {
                if let Some(t) = turn.as_deref_mut() {
                    t.prev_done().await;
                }
                continue;
            }
            let conn = lock(&self.conns[idx]).clone();
            let conn = match conn {
                Some(c) if !c.state.dead.load(Ordering::SeqCst) => c,
                // Boxed: the handshake's state machine is large and only
                // needed when (re)connecting, not on every request.
                _ => Box::pin(self.connect_shared(proto)).await?,
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
        if let Some(c) = lock(&self.conns[idx]).clone()
            && !c.state.dead.load(Ordering::SeqCst)
        {
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
        let state = Arc::new(ConnState {
            pending: Mutex::new(VecDeque::new()),
            dead: AtomicBool::new(false),
            closed,
            armed: tokio::sync::Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(wr, rx, state.clone()));
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
            tx,
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

/// Queue `req` on `conn`, marking `turn` sent there; gives the request back
/// (and marks the connection dead) when its writer has gone.
fn send_in_turn(conn: &Conn, req: Request, turn: Option<&Turn>, write: bool) -> Result<(), Request> {
    if write && let Some(t) = turn {
        t.note_write();
    }
    match conn.tx.send(req) {
        Ok(()) => {
            if let Some(t) = turn {
                t.sent(conn.id, write);
            }
            Ok(())
        }
        Err(mpsc::error::SendError(r)) => {
            conn.state.dead.store(true, Ordering::SeqCst);
            Err(r)
        }
    }
}

async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Request>, state: Arc<ConnState>) {
    let mut closed = state.closed.subscribe();
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = closed.changed() => break,
        };
        let mut batch = Some(first);
        let mut n = 0;
        // One clock read per batch: every request in it is sent by the same write.
        let sent = Instant::now();
        while let Some(req) = batch.take() {
            {
                let mut p = lock(&state.pending);
                if state.dead.load(Ordering::SeqCst) {
                    drop(p);
                    let _ = req
                        .tx
                        .send(Err(UpstreamError::Closed("connection closed".into())));
                } else {
                    out.extend_from_slice(&req.bytes);
                    if p.is_empty() {
                        state.armed.notify_one();
                    }
                    p.push_back(Pending {
                        expected: req.replies.max(1),
                        got: Vec::new(),
                        tx: req.tx,
                        sent,
                    });
                }
            }
            n += 1;
            if n < 256 && out.len() < 256 * 1024 {
                batch = rx.try_recv().ok();
            }
        }
        if out.is_empty() {
            continue;
        }
        if let Err(e) = wr.write_all(&out).await {
            state.close(&UpstreamError::Closed(e.to_string()));
            break;
        }
        out.clear();
    }
    // Refuse anything still queued.
    rx.close();
    while let Ok(req) = rx.try_recv() {
        let _ = req
            .tx
            .send(Err(UpstreamError::Closed("connection closed".into())));
    }
}

async fn reader(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    state: Arc<ConnState>,
    node: Weak<Node>,
    timeout: Duration,
    latency: prometheus::Histogram,
) {
    let mut closed = state.closed.subscribe();
    // Keeps its progress across reads: a huge reply is checked once, not
    // rescanned on every read.
    let mut checker = resp::Checker::new(Limits::upstream());
    let mut last_bytes = Instant::now();
    let why = loop {
        // Deliver every complete reply already buffered.
        let mut bad = None;
        let mut now = None;
        loop {
            match checker.check(&buf) {
                Ok(Some(n)) => {
                    let raw = buf.split_to(n).freeze();
                    if raw.first() == Some(&b'>') {
                        // Out-of-band RESP3 push (none are requested on data
                        // connections); not a reply to anything.
                        continue;
                    }
                    let mut p = lock(&state.pending);
                    let Some(front) = p.front_mut() else {
                        bad = Some(UpstreamError::Protocol("reply with no request".into()));
                        break;
                    };
                    front.got.push(raw);
                    if front.got.len() >= front.expected
                        && let Some(done) = p.pop_front()
                    {
                        drop(p);
                        let now = *now.get_or_insert_with(Instant::now);
                        latency.observe(now.saturating_duration_since(done.sent).as_secs_f64());
                        let _ = done.tx.send(Ok(done.got));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    bad = Some(UpstreamError::Protocol(e.to_string()));
                    break;
                }
            }
        }
        if let Some(e) = bad {
            break e;
        }
        let deadline = silence_deadline(&state, &node, last_bytes, timeout);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break UpstreamError::Closed("eof".into()),
                // Bytes arriving are life, even mid-way through a large reply.
                Ok(_) => last_bytes = Instant::now(),
                Err(e) => break UpstreamError::Closed(e.to_string()),
            },
            _ = sleep_until_opt(deadline.map(tokio::time::Instant::from_std)) => {
                // Judge again: the front may have changed, or a slow command
                // may have started on the node meanwhile.
                if silence_deadline(&state, &node, last_bytes, timeout).is_some_and(|d| d <= Instant::now()) {
                    break UpstreamError::Timeout;
                }
            }
            _ = state.armed.notified(), if deadline.is_none() => {}
            _ = closed.changed() => break UpstreamError::Closed("closed".into()),
        }
    };
    if why == UpstreamError::Timeout
        && let Some(node) = node.upgrade()
    {
        node.settings
            .metrics
            .watchdog_closures
            .with_label_values(&[node.addr.as_str()])
            .inc();
        tracing::warn!(node = %node.addr, ?timeout, "watchdog: no reply in time, closing connection");
    }
    let is_failure = matches!(why, UpstreamError::Timeout | UpstreamError::Protocol(_))
        || !state.dead.load(Ordering::SeqCst);
    state.close(&why);
    // Only the node's current connection speaks for it: the end of one the
    // probe already replaced says nothing about the node.
    if is_failure
        && let Some(node) = node.upgrade()
        && !node.retired.load(Ordering::Relaxed)
        && node.is_current(&state)
    {
        node.mark_down();
    }
}

/// When the oldest outstanding request counts as unanswered: `timeout`
/// after it was sent or after the node's last bytes, whichever is later, and
/// not before a known-slow command running on the node reaches its bound.
fn silence_deadline(
    state: &ConnState,
    node: &Weak<Node>,
    last_bytes: Instant,
    timeout: Duration,
) -> Option<Instant> {
    let sent = lock(&state.pending).front().map(|p| p.sent)?;
    let silent_from = sent.max(last_bytes) + timeout;
    let busy = node.upgrade().and_then(|n| n.busy_until());
    Some(busy.map_or(silent_from, |b| silent_from.max(b)))
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
