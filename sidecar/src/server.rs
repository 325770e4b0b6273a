//! Client connections and the sidecar's lifecycle.
//!
//! Each client connection is one task: it parses as many pipelined commands
//! as are buffered, starts each one (they run concurrently), and writes the
//! replies strictly in request order (`pipeline.rs`). The common command is
//! sent upstream from this task and answered through the client's inbox
//! (`router/direct.rs`); the rest run as futures. A local-cache hit of a
//! client with nothing else in flight is answered in place (no future; see
//! `Router::try_cached`): a hot key costs one read and one write, as it
//! would from Redis itself. A protocol error is answered with one `-ERR` and
//! the connection is closed; nothing a client sends can affect another
//! client's connection.
//!
//! Shutdown: stop accepting, let every connection finish the requests it has
//! already read (up to `drain_timeout`), then close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::cache::LocalCache;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::gate;
use crate::metrics::{self, Metrics};
use crate::pipeline::Pipeline;
use crate::pubsub::{self, Step, Subscriber};
use crate::resp::{self, Frame};
use crate::router::{ClientState, Router};
use crate::stop::Stop;
use crate::topology::Registry;
use crate::tracking;
use crate::upstream::UpstreamSettings;

/// Most requests one client may have in flight before the sidecar stops
/// reading from it (backpressure instead of unbounded buffering). Its
/// requests share upstream connections with everyone else's, so this also
/// bounds what another client's request can wait behind: with 4096, a
/// client pipelining 1 GB of 256 KiB GETs it never reads held the others'
/// GETs 0.4–0.7 s each (a test at 5 s failed under load); with 256, under
/// 0.1 s. A pipeline of 256 keeps any one client's throughput at what a
/// round trip allows.
const MAX_PIPELINE: usize = 256;

/// Reply bytes waiting for a client above which its requests are not read.
const READ_PAUSE: usize = 1024 * 1024;

/// A running sidecar. Dropping it does not stop it; call [`Sidecar::shutdown`].
#[derive(Debug)]
pub struct Sidecar {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    router: Arc<Router>,
    stop: Arc<Stop>,
    accept: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

/// The state of one upstream node, as the sidecar sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub addr: String,
    pub primary: bool,
    /// False while the watchdog has it out of rotation.
    pub healthy: bool,
    /// Replicas: the read gate is open. Primaries: always true.
    pub gate_open: bool,
    /// The local cache's tracking connection to it is established (only a
    /// current primary's can be; entries of its slots may be cached).
    pub tracked: bool,
    /// Replies its shared connections are waiting for (what the
    /// `bestOfTwo` read policy compares).
    pub in_flight: usize,
}

impl Sidecar {
    /// The address of the primary this sidecar routes `slot` to now (tests
    /// and diagnostics: a MOVED is followed at once, the map follows soon).
    pub fn slot_owner(&self, slot: u16) -> Option<String> {
        let topo = self.router.registry.current();
        topo.shard(slot).map(|s| s.primary.addr.clone())
    }

    /// Validate `config`, discover the topology (a failure is logged and
    /// retried in the background; `/readyz` says when it is known), bind the
    /// listener and the metrics server, and start serving.
    pub async fn bind(config: Config) -> Result<Sidecar> {
        config.validate()?;
        let metrics = Metrics::new()?;
        let settings = UpstreamSettings {
            response_timeout: config.response_timeout,
            slow_timeout: config.slow_command_timeout,
            metrics: metrics.clone(),
            auth: config.auth.clone(),
        };
        let registry = Registry::new(config.seeds.clone(), settings, metrics.clone());
        if let Err(e) = registry.refresh().await {
            tracing::warn!(error = %e, "initial topology discovery failed; retrying in the background");
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let mut background = Vec::new();
        let metrics_addr = match config.metrics {
            Some(addr) => {
                let (bound, fut) = metrics::serve(addr, metrics.clone()).await?;
                background.push(tokio::spawn(fut));
                Some(bound)
            }
            None => None,
        };
        let cache = if config.cache.prefixes.is_empty() {
            None
        } else {
            Some(LocalCache::new(&config.cache, metrics.clone()))
        };
        // The port actually bound (`INFO`'s `tcp_port` when asked for port 0).
        let bound = Config {
            listen: local_addr,
            ..config.clone()
        };
        let router = Arc::new(Router::new(
            registry.clone(),
            bound,
            metrics.clone(),
            cache.clone(),
        ));
        // Until the first topology is known, retry quickly.
        {
            let registry = registry.clone();
            let interval = config.topology_refresh;
            background.push(tokio::spawn(async move {
                while !registry.current().is_known() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = registry.refresh().await;
                }
                registry.run_refresh(interval).await;
            }));
        }
        background.push(tokio::spawn(gate::run(
            registry.clone(),
            config.gate_interval,
            config.max_lag_bytes,
        )));
        if let Some(cache) = &cache {
            background.push(tokio::spawn(tracking::run(
                cache.clone(),
                registry.clone(),
                config.response_timeout,
                config.auth.clone(),
            )));
        }
        // Idle until a client turns CLIENT TRACKING on.
        background.push(tokio::spawn(tracking::run(
            router.tracking.clone(),
            registry.clone(),
            config.response_timeout,
            config.auth.clone(),
        )));
        {
            let registry = registry.clone();
            let metrics = metrics.clone();
            let cache = cache.clone();
            background.push(tokio::spawn(async move {
                loop {
                    gate::export(&registry, &metrics);
                    if let Some(c) = &cache {
                        c.export().await;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        let stop = Stop::new();
        let accept = tokio::spawn(accept_loop(
            listener,
            router.clone(),
            stop.clone(),
            config.drain_timeout,
        ));
        tracing::info!(%local_addr, ?metrics_addr, "cachetier sidecar listening");
        Ok(Sidecar {
            local_addr,
            metrics_addr,
            router,
            stop,
            accept,
            background,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.router.metrics
    }

    /// True once a topology has been discovered.
    pub fn is_ready(&self) -> bool {
        self.router.registry.current().is_known()
    }

    /// Every node in the current topology with its rotation and gate state.
    pub fn node_states(&self) -> Vec<NodeState> {
        let topo = self.router.registry.current();
        let mut out = Vec::new();
        for shard in &topo.shards {
            out.push(NodeState {
                addr: shard.primary.addr.clone(),
                primary: true,
                healthy: shard.primary.is_healthy(),
                gate_open: true,
                tracked: shard.primary.tracked.load(std::sync::atomic::Ordering::SeqCst),
                in_flight: shard.primary.in_flight(),
            });
            for r in &shard.replicas {
                out.push(NodeState {
                    addr: r.addr.clone(),
                    primary: false,
                    healthy: r.is_healthy(),
                    gate_open: r.gate_open(),
                    tracked: r.tracked.load(std::sync::atomic::Ordering::SeqCst),
                    in_flight: r.in_flight(),
                });
            }
        }
        out
    }

    /// Total weight (bytes) of the local cache after pending maintenance, or
    /// `None` when no prefixes are cached.
    pub async fn cache_bytes(&self) -> Option<u64> {
        let cache = self.router.cache.as_ref()?;
        cache.run_pending_tasks().await;
        Some(cache.weighted_size())
    }

    /// Re-read the topology now (tests and the operator's local mode use this
    /// after changing the cluster).
    pub async fn refresh_topology(&self) -> Result<()> {
        self.router.registry.refresh().await
    }

    /// Stop accepting, drain in-flight requests (bounded by the configured
    /// drain timeout), stop background work.
    pub async fn shutdown(self) {
        self.stop.trigger();
        let _ = self.accept.await;
        for h in &self.background {
            h.abort();
        }
        self.router.registry.retire_all();
    }
}

/// Run until `shutdown` resolves, then drain and return.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let sidecar = Sidecar::bind(config).await?;
    shutdown.await;
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    sidecar.shutdown().await;
    Ok(())
}

async fn accept_loop(listener: TcpListener, router: Arc<Router>, stop: Arc<Stop>, drain: Duration) {
    let mut clients = JoinSet::new();
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((mut stream, _)) if clients.len() >= router.config.max_clients => {
                    // Like Redis at maxclients: say why, then close.
                    clients.spawn(async move {
                        let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
                        let _ = stream.shutdown().await;
                    });
                }
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    clients.spawn(serve_client(stream, router.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
            () = &mut stopped => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(drain, async { while clients.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            remaining = clients.len(),
            "drain timeout: closing remaining client connections"
        );
        clients.abort_all();
    }
}

async fn serve_client(stream: TcpStream, router: Arc<Router>, stop: Arc<Stop>) {
    router.metrics.client_connections.inc();
    router.metrics.client_connections_accepted.inc();
    let mut st = ClientState::default();
    let registered = register(&router, &stream, st.id);
    st.view = Some(registered.client.clone());
    let (mut rd, mut wr) = stream.into_split();
    let limits = router.config.limits;
    let output_limit = usize::try_from(router.config.client_output_limit).unwrap_or(usize::MAX);
    let query_limit = usize::try_from(router.config.client_query_limit).unwrap_or(usize::MAX);
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut pending = Pipeline::default();
    let mut checker = resp::Checker::for_requests(limits);
    let mut reading = !stop.is_stopped();
    // The client's subscription connection, once it subscribes (`pubsub.rs`),
    // and a request waiting for its turn there.
    let mut sub: Option<Subscriber> = None;
    let mut held: Option<resp::Request> = None;
    // One future for the whole connection: a new one would register anew.
    let stopped = stop.stopped();
    tokio::pin!(stopped);
    let killed = registered.client.kill.stopped();
    tokio::pin!(killed);
    loop {
        while (reading || held.is_some()) && pending.len() < MAX_PIPELINE && out.len() < READ_PAUSE {
            let parsed = match held.take() {
                Some(req) => Ok(Some(req)),
                None if !reading => break,
                None => resp::parse_request_with(&mut inbuf, &mut checker, &limits),
            };
            let parsed = match parsed {
                Ok(Some(req)) => {
                    let name = req.name();
                    // Inside MULTI the router queues or refuses it.
                    let step = if st.session.in_multi() {
                        Step::Ordinary
                    } else {
                        pubsub::step(sub.as_ref(), st.session.proto, name, pending.is_empty())
                    };
                    // The router notes the commands it sees; these stop here.
                    if matches!(step, Step::Forward | Step::Refuse) {
                        if let Some(info) = crate::commands::lookup(name) {
                            registered.client.command(info.id);
                        }
                        // A command ran: it ends `CLIENT CACHING`, as in Redis.
                        if let Some(t) = st.tracker.as_mut() {
                            t.next_command(false);
                        }
                    }
                    let reset = name.eq_ignore_ascii_case(b"reset");
                    match step {
                        Step::Ordinary => {
                            if reset {
                                // Closing it ends every subscription, as RESET does.
                                sub = None;
                                show_subscriptions(&registered.client, None);
                            }
                            Ok(Some(req))
                        }
                        Step::Hold => {
                            held = Some(req);
                            break;
                        }
                        Step::Refuse => {
                            if !st.session.silenced() {
                                out.extend_from_slice(&pubsub::subscribed_mode_error(&req));
                            }
                            continue;
                        }
                        Step::Forward => {
                            // Boxed, as the upkeep below: rare, and its
                            // state would enlarge every client's future.
                            let silent = st.session.silenced();
                            Box::pin(pubsub::forward(
                                &router,
                                &mut sub,
                                st.session.proto,
                                &req,
                                silent,
                                &mut out,
                            ))
                            .await;
                            show_subscriptions(&registered.client, sub.as_ref());
                            continue;
                        }
                    }
                }
                other => other,
            };
            match parsed {
                // Nothing of this client in flight: a local-cache hit is
                // answered straight into the output buffer, with no future.
                Ok(Some(req))
                    if pending.is_empty()
                        && st.tracker.is_none()
                        && let Some(hit) =
                            router.try_cached(&mut st, &req, pending.arrived(), pending.metrics()) =>
                {
                    if !st.session.silenced() {
                        out.extend_from_slice(&hit);
                    }
                }
                Ok(Some(req)) => {
                    // CLIENT TRACKING: whether the command is tracked (its
                    // keys remembered, its reads around the local cache),
                    // and the flush to send before its reply, if
                    // remembering its keys started over.
                    let (mut pushes, mut tracked) = (Vec::new(), false);
                    if st.tracker.is_some() {
                        (pushes, tracked) = router.tracked_read(&mut st, &req);
                        // Not tracked (OPTIN, OPTOUT): the local cache may
                        // answer it as any client's.
                        if !tracked
                            && pending.is_empty()
                            && pushes.is_empty()
                            && let Some(hit) =
                                router.try_cached(&mut st, &req, pending.arrived(), pending.metrics())
                        {
                            if !st.session.silenced() {
                                out.extend_from_slice(&hit);
                            }
                            continue;
                        }
                    }
                    pushes.into_iter().for_each(|p| pending.push_reply(p));
                    let action = router.dispatch(&mut st, req, Some(pending.place()));
                    let open = pending.push(action);
                    if tracked {
                        pending.tracked_last();
                    }
                    if st.session.silenced() {
                        pending.silence_last();
                    }
                    if !open {
                        reading = false;
                    }
                }
                // Refused as Redis refuses it, silently under CLIENT REPLY.
                Ok(None) if inbuf.len() > query_limit => {
                    if !st.session.quiet() {
                        pending.push_reply(error_frame(
                            "ERR cachetier: request larger than the client query limit; closing the connection",
                        ));
                    }
                    reading = false;
                }
                Ok(None) => break,
                Err(e) => {
                    if !st.session.quiet() {
                        pending.push_reply(error_frame(&e.client_error()));
                    }
                    reading = false;
                }
            }
        }
        if !reading && held.is_none() && pending.is_empty() && out.is_empty() {
            break;
        }
        // Gone (or closing) while a command waits on other clients: Redis
        // drops a gone client's blocked command, and so does this (its
        // blocking connection closes with the client's state).
        if !reading && out.is_empty() && pending.front_is_blocking() {
            break;
        }
        pending.metrics().flush();
        // Pushes wait while the client has this many replies unread
        // (or its output is that far behind): a client that does not read
        // falls behind the feed and is sent one flush, not every push.
        let room = pending.len() < 2 * MAX_PIPELINE && out.len() < READ_PAUSE;
        tokio::select! {
            // In this order: replies already in are collected (all of them,
            // so they leave in one write), then written, before more is
            // read. No branch stays ready for ever (each drains or is
            // bounded), so none starves another.
            biased;
            // Replies keep moving into the output buffer while a write waits
            // for a client that does not read, so the limit below sees them.
            () = pending.front_ready(&router), if !pending.is_empty() => {
                while out.len() <= output_limit && let Some(r) = pending.pop_ready() {
                    out.extend_from_slice(&r);
                }
                if past_output_limit(&router, &out, output_limit, "client") {
                    break;
                }
            }
            w = wr.write(&out), if !out.is_empty() => match w {
                Ok(n) if n > 0 => out.advance(n),
                _ => break,
            },
            // Not while a request waits for its turn (bounded input).
            r = rd.read_buf(&mut inbuf), if reading && held.is_none() && pending.len() < MAX_PIPELINE && out.len() < READ_PAUSE => match r {
                // The client half-closed: answer what it sent, then close.
                Ok(0) => reading = false,
                Ok(_) => registered.client.active(pending.arrived_now()),
                Err(_) => break,
            },
            r = pubsub::read(&mut sub), if sub.is_some() && out.len() <= output_limit => {
                let drained = match (r, sub.as_mut()) {
                    (Ok(()), Some(s)) => match s.drain(&mut out) {
                        Ok(()) => {
                            // Boxed: its state (connects, timeouts) would
                            // otherwise enlarge every client's future, which
                            // cost every request about 90 instructions.
                            Box::pin(s.upkeep(&router)).await;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Ok(()),
                };
                show_subscriptions(&registered.client, sub.as_ref());
                if let Err(e) = drained {
                    if matches!(e, crate::error::UpstreamError::Moved(_)) {
                        router.registry.request_refresh();
                    }
                    tracing::debug!(error = %e, "subscription connection lost; closing the client");
                    break;
                }
                if past_output_limit(&router, &out, output_limit, "subscriber") {
                    break;
                }
            }
            // Polled until it fires once: `reading` never turns true again.
            () = &mut stopped, if reading => reading = false,
            // CLIENT KILL from another client: closed at once, as in Redis.
            // One branch with the tracking feed: a branch more would cost
            // every request (about 40 instructions at -P 1).
            side = killed_or_tracked(&mut killed, &mut st.tracker, room) => match side {
                Side::Killed => break,
                // CLIENT TRACKING: each push leaves after every reply the
                // client waits for now (a read that ran before a write is
                // answered before that write's invalidation), but not after
                // a blocking command whose keys are not tracked: Redis sends
                // it to a blocked client at once. Bounded: a client that
                // falls behind the feed is sent a flush instead.
                Side::Tracked(inv) => {
                    if let Some(t) = st.tracker.as_mut() {
                        let mut pushes = Vec::new();
                        t.pushes(&inv, &mut pushes);
                        if st.session.proto != 3 {
                            // A RESP2 client is sent no pushes.
                        } else if pending.waits_only_on_others() {
                            pushes.iter().for_each(|p| out.extend_from_slice(p));
                            if past_output_limit(&router, &out, output_limit, "client") {
                                break;
                            }
                        } else {
                            pushes.into_iter().for_each(|p| pending.push_reply(p));
                        }
                    }
                }
            },
        }
    }
    // Out of CLIENT LIST before the client can see the close.
    drop(registered);
    let _ = wr.shutdown().await;
    router.metrics.client_connections.dec();
}

/// The client's unread output passed its limit: counted and logged; the
/// connection is to close.
fn past_output_limit(router: &Router, out: &BytesMut, limit: usize, who: &str) -> bool {
    if out.len() <= limit {
        return false;
    }
    router.metrics.output_limit_closes.inc();
    tracing::warn!(
        bytes = out.len(),
        "{who} output limit reached; closing the connection"
    );
    true
}

/// What woke a client's loop besides its own I/O.
enum Side {
    Killed,
    Tracked(crate::client_cache::Invalidation),
}

/// `CLIENT KILL`, or the next message of the client's invalidation feed
/// (never while it does not track, or while `room` is false).
fn killed_or_tracked<'a, K: Future<Output = ()>>(
    killed: &'a mut std::pin::Pin<&mut K>,
    tracker: &'a mut Option<Box<crate::client_cache::Tracker>>,
    room: bool,
) -> impl Future<Output = Side> + 'a {
    use std::task::Poll;
    std::future::poll_fn(move |cx| {
        if killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Side::Killed);
        }
        match tracker {
            Some(t) if room => t.poll_recv(cx).map(Side::Tracked),
            _ => Poll::Pending,
        }
    })
}

/// Enter a new connection in `CLIENT LIST`.
fn register(router: &Router, stream: &TcpStream, id: u64) -> crate::clients::Registered {
    use std::os::fd::AsRawFd;
    let fd = i64::from(stream.as_raw_fd());
    router
        .clients
        .register(id, stream.peer_addr().ok(), stream.local_addr().ok(), fd)
}

/// What `CLIENT LIST` shows of the client's subscriptions.
fn show_subscriptions(client: &crate::clients::Client, sub: Option<&Subscriber>) {
    let (plain, shard) = sub.map_or((0, 0), Subscriber::counts);
    client.subscriptions(plain, shard);
}

fn error_frame(msg: &str) -> bytes::Bytes {
    let mut b = BytesMut::new();
    Frame::Error(bytes::Bytes::copy_from_slice(msg.as_bytes())).encode(&mut b);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn the_entry_points_can_be_spawned_on_a_multi_threaded_runtime() {
        let run_fut = run(Config::default(), std::future::pending::<()>());
        assert_send(&run_fut);
        let bind_fut = Sidecar::bind(Config::default());
        assert_send(&bind_fut);
    }
}
