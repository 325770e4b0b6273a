//! One shared upstream connection: its queue of requests awaiting replies,
//! the writer and reader tasks, and the response watchdog (see the parent
//! module's doc).

use super::*;
use crate::inbox::Delivery;

pub(super) type ReplyTx = oneshot::Sender<Result<Vec<Bytes>, UpstreamError>>;

/// Where a request's replies go: a channel of its own (a request awaited by
/// a future), or its client's inbox (requests sent straight from the
/// client's task, one reply each; see `inbox.rs`). An inbox sink stands for
/// a run of consecutive pipeline positions from the `u64` on, one per reply:
/// a client's pipelined commands queued back to back on one connection share
/// one entry and one reference on the inbox.
pub(super) enum Sink {
    Channel(ReplyTx),
    Inbox(Arc<Inbox>, u64),
}

impl Sink {
    /// Fail the sink's `replies` outstanding replies.
    pub(super) fn fail(self, why: UpstreamError, replies: usize) {
        match self {
            Sink::Channel(tx) => {
                let _ = tx.send(Err(why));
            }
            Sink::Inbox(inbox, first) => {
                let mut failed: Vec<Delivery> = (first..first + replies as u64)
                    .map(|seq| (seq, Err(why.clone())))
                    .collect();
                inbox.push_all(&mut failed);
            }
        }
    }
}

/// Where a request about to be queued sends its replies: a sink of its own,
/// or a place in a client's inbox, borrowed so that joining the run before
/// it costs no reference on the inbox.
pub(super) enum ReplyTo<'a> {
    Sink(Sink),
    Inbox(&'a Arc<Inbox>, u64),
}

/// A request to queue: its bytes are copied into the outbox, so a request
/// sent at once from the client's task lends them (`B = &[u8]`) where one
/// that may be retried owns them (`B = Bytes`).
pub(super) struct Request<'a, B = Bytes> {
    pub(super) bytes: B,
    pub(super) replies: usize,
    pub(super) to: ReplyTo<'a>,
}

pub(super) struct Pending {
    /// Replies this entry stands for: those in `got` and those still to
    /// come (an inbox run's delivered ones are gone from it, and from its
    /// sink's first position).
    pub(super) expected: usize,
    pub(super) got: Vec<Bytes>,
    pub(super) sink: Sink,
    pub(super) sent: Instant,
}

pub(super) struct ConnState {
    pub(super) pending: Mutex<VecDeque<Pending>>,
    /// Requests queued for the writer, bytes and reply sinks in order.
    pub(super) outbox: Mutex<Outbox>,
    /// Wakes the writer when the outbox goes from empty to non-empty.
    pub(super) queued: tokio::sync::Notify,
    pub(super) dead: AtomicBool,
    pub(super) closed: watch::Sender<bool>,
    /// The node's count of replies written for and not yet read, which the
    /// read balance compares: updated under `pending`'s lock, once per
    /// batch written and once per pass of replies read.
    pub(super) in_flight: Arc<AtomicUsize>,
}

/// What senders have queued and the writer has not taken yet. The writer
/// swaps it with an empty one of its own, so both buffers are reused.
#[derive(Default)]
pub(super) struct Outbox {
    bytes: BytesMut,
    sinks: Vec<(Sink, usize)>,
}

impl ConnState {
    pub(super) fn new(closed: watch::Sender<bool>, in_flight: Arc<AtomicUsize>) -> ConnState {
        ConnState {
            pending: Mutex::new(VecDeque::new()),
            outbox: Mutex::new(Outbox::default()),
            queued: tokio::sync::Notify::new(),
            dead: AtomicBool::new(false),
            closed,
            in_flight,
        }
    }

    /// Mark dead and fail everything outstanding. Idempotent.
    pub(super) fn close(&self, why: &UpstreamError) {
        self.dead.store(true, Ordering::SeqCst);
        self.closed.send_replace(true);
        // Under the outbox's lock: a sender either queued before this (and
        // is failed here) or sees `dead` and gets its request back.
        let queued = std::mem::take(&mut lock(&self.outbox).sinks);
        let drained: Vec<Pending> = {
            let mut p = lock(&self.pending);
            // Replies already in `got` were counted out when they came.
            let outstanding: usize = p.iter().map(|p| p.expected - p.got.len()).sum();
            self.in_flight.fetch_sub(outstanding, Ordering::Relaxed);
            p.drain(..).collect()
        };
        for p in drained {
            p.sink.fail(why.clone(), p.expected);
        }
        for (sink, replies) in queued {
            sink.fail(why.clone(), replies);
        }
    }
}

#[derive(Clone)]
pub(super) struct Conn {
    /// Unique per connection: [`Turn`]s compare it to keep a client's order.
    pub(super) id: u64,
    pub(super) state: Arc<ConnState>,
}

/// Queue `req` on `conn`, marking `turn` sent there; gives the request back
/// when the connection is dead.
pub(super) fn send_in_turn<'a, B: AsRef<[u8]>>(
    conn: &Conn,
    req: Request<'a, B>,
    turn: Option<&Turn>,
    write: bool,
) -> Result<(), Request<'a, B>> {
    if write && let Some(t) = turn {
        t.note_write();
    }
    let was_empty = {
        let mut o = lock(&conn.state.outbox);
        if conn.state.dead.load(Ordering::SeqCst) {
            return Err(req);
        }
        let was_empty = o.sinks.is_empty();
        o.bytes.extend_from_slice(req.bytes.as_ref());
        match req.to {
            ReplyTo::Inbox(inbox, seq) => match o.sinks.last_mut() {
                // The next place of the run queued last: join it.
                Some((Sink::Inbox(last, first), n))
                    if Arc::ptr_eq(last, inbox) && *first + *n as u64 == seq =>
                {
                    *n += 1;
                }
                _ => o.sinks.push((Sink::Inbox(inbox.clone(), seq), 1)),
            },
            ReplyTo::Sink(sink) => o.sinks.push((sink, req.replies.max(1))),
        }
        was_empty
    };
    if was_empty {
        conn.state.queued.notify_one();
    }
    if let Some(t) = turn {
        t.sent(conn.id, write);
    }
    Ok(())
}

/// Write whatever is queued, in one write per pass: the requests of every
/// client that queued meanwhile share it.
pub(super) async fn writer(mut wr: OwnedWriteHalf, state: Arc<ConnState>) {
    let mut closed = state.closed.subscribe();
    let mut batch = Outbox::default();
    loop {
        std::mem::swap(&mut *lock(&state.outbox), &mut batch);
        if batch.sinks.is_empty() {
            tokio::select! {
                () = state.queued.notified() => continue,
                _ = closed.changed() => break,
            }
        }
        {
            // One clock read per batch: every request in it is sent by the same write.
            let sent = Instant::now();
            let mut p = lock(&state.pending);
            if state.dead.load(Ordering::SeqCst) {
                drop(p);
                for (sink, replies) in batch.sinks.drain(..) {
                    sink.fail(UpstreamError::Closed("connection closed".into()), replies);
                }
                break;
            }
            let replies: usize = batch.sinks.iter().map(|(_, n)| n).sum();
            state.in_flight.fetch_add(replies, Ordering::Relaxed);
            p.extend(batch.sinks.drain(..).map(|(sink, expected)| Pending {
                expected,
                got: Vec::new(),
                sink,
                sent,
            }));
        }
        if let Err(e) = wr.write_all(&batch.bytes).await {
            state.close(&UpstreamError::Closed(e.to_string()));
            break;
        }
        batch.bytes.clear();
        // A buffer grown by one huge request is not kept for ever.
        if batch.bytes.capacity() > 1 << 20 {
            batch.bytes = BytesMut::new();
        }
    }
}

pub(super) async fn reader(
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
    // The last read brought bytes: the node was alive then, and the time
    // this task then spent delivering them is the sidecar's, not the
    // node's silence (a long batch under load, or a 1 GB burst of replies,
    // must not look like a silent node).
    let mut fresh = false;
    // Reused across passes: the requests completed by one pass, and a run
    // of replies for one client's inbox.
    let mut done: Vec<Done> = Vec::new();
    let mut run: Vec<crate::inbox::Delivery> = Vec::new();
    let latency = latency.local();
    // One timer for the connection's life, re-armed only when it fires: the
    // deadline of the oldest request never moves earlier (requests are
    // answered in order, and bytes arriving only push it later), so a timer
    // that fires early just finds the real deadline and waits for it; with
    // nothing outstanding it fires every `timeout` and finds nothing. So a
    // request's silence is judged at its exact deadline without a wake-up
    // per batch or a timer per pass.
    let watchdog = tokio::time::sleep(timeout);
    tokio::pin!(watchdog);
    let why = loop {
        // Match every complete reply already buffered (one lock for all),
        // then deliver them.
        let bad = match_replies(&mut buf, &mut checker, &state, &mut done);
        deliver(&mut done, &mut run, &latency);
        if let Some(e) = bad {
            break e;
        }
        if std::mem::take(&mut fresh) {
            last_bytes = Instant::now();
        }
        tokio::select! {
            // Bytes already waiting are read before the deadline is judged.
            biased;
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break UpstreamError::Closed("eof".into()),
                // Bytes arriving are life, even mid-way through a large reply.
                Ok(_) => fresh = true,
                Err(e) => break UpstreamError::Closed(e.to_string()),
            },
            () = &mut watchdog => {
                let now = Instant::now();
                match silence_deadline(&state, &node, last_bytes, timeout) {
                    Some(d) if d <= now => break UpstreamError::Timeout,
                    // Early: wait for the real deadline, judging again at
                    // least every `timeout` (a slow command's bound may end).
                    Some(d) => watchdog.as_mut().reset(d.min(now + timeout).into()),
                    None => watchdog.as_mut().reset((now + timeout).into()),
                }
            }
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

/// Replies read for one sink: all of a request's, or those of an inbox
/// run that came in by the end of a pass.
pub(super) struct Done {
    sink: Sink,
    sent: Instant,
    got: Vec<Bytes>,
    /// The reply of a lone one-reply request to an inbox (no vector for it).
    single: Option<Bytes>,
}

/// Take every complete reply off the front of `buf` and match it to its
/// request; a protocol error or a reply with no request ends the connection.
fn match_replies(
    buf: &mut BytesMut,
    checker: &mut resp::Checker,
    state: &ConnState,
    done: &mut Vec<Done>,
) -> Option<UpstreamError> {
    let mut p = lock(&state.pending);
    let mut matched = 0;
    let bad = loop {
        let n = match checker.check(buf) {
            Ok(Some(n)) => n,
            Ok(None) => break None,
            Err(e) => break Some(UpstreamError::Protocol(e.to_string())),
        };
        let raw = buf.split_to(n).freeze();
        if raw.first() == Some(&b'>') {
            // Out-of-band RESP3 push (none are requested on data
            // connections); not a reply to anything.
            continue;
        }
        let Some(front) = p.front_mut() else {
            break Some(UpstreamError::Protocol("reply with no request".into()));
        };
        matched += 1;
        let single = front.expected == 1 && front.got.is_empty() && matches!(front.sink, Sink::Inbox(..));
        let kept = if single {
            Some(raw)
        } else {
            front.got.push(raw);
            None
        };
        if (single || front.got.len() >= front.expected)
            && let Some(complete) = p.pop_front()
        {
            done.push(Done {
                sink: complete.sink,
                sent: complete.sent,
                got: complete.got,
                single: kept,
            });
        }
    };
    // The part of an inbox run that is in goes now; the rest follows.
    if let Some(front) = p.front_mut()
        && let Sink::Inbox(inbox, first) = &mut front.sink
        && !front.got.is_empty()
    {
        let got = std::mem::take(&mut front.got);
        let sink = Sink::Inbox(inbox.clone(), *first);
        *first += got.len() as u64;
        front.expected -= got.len();
        done.push(Done {
            sink,
            sent: front.sent,
            got,
            single: None,
        });
    }
    state.in_flight.fetch_sub(matched, Ordering::Relaxed);
    bad
}

/// Hand completed requests their replies; consecutive replies for one
/// client's inbox go in under one lock and one wake-up.
fn deliver(
    done: &mut Vec<Done>,
    run: &mut Vec<crate::inbox::Delivery>,
    latency: &prometheus::local::LocalHistogram,
) {
    if done.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut run_inbox: Option<Arc<Inbox>> = None;
    for d in done.drain(..) {
        let waited = now.saturating_duration_since(d.sent).as_secs_f64();
        // One observation per request: an inbox run's replies are one each.
        let requests = match (&d.sink, &d.single) {
            (Sink::Inbox(..), None) => d.got.len(),
            _ => 1,
        };
        for _ in 0..requests {
            latency.observe(waited);
        }
        match d.sink {
            Sink::Inbox(inbox, first) => {
                if let Some(other) = run_inbox.take_if(|r| !Arc::ptr_eq(r, &inbox)) {
                    other.push_all(run);
                }
                run_inbox.get_or_insert(inbox);
                match d.single {
                    Some(raw) => run.push((first, Ok(raw))),
                    None => run.extend((first..).zip(d.got).map(|(seq, raw)| (seq, Ok(raw)))),
                }
            }
            Sink::Channel(tx) => {
                let _ = tx.send(Ok(d.got));
            }
        }
    }
    if let Some(inbox) = run_inbox {
        inbox.push_all(run);
    }
    // One set of atomic updates per pass, not per reply.
    latency.flush();
}

/// When the oldest outstanding request counts as unanswered: `timeout`
/// after it was sent or after the node's last bytes, whichever is later, and
/// not before a known-slow command running on the node reaches its bound.
pub(super) fn silence_deadline(
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
