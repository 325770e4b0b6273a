//! The direct path: the common command (one slot, no local cache, no
//! blocking or slow form, no read-your-writes floor to respect) is queued
//! on its node's shared connection from the client's own task, and its
//! reply comes back through the client's inbox (`inbox.rs`). No future, no
//! reply channel, no task per command: at `-P 16` this is most of what the
//! sidecar does per request.
//!
//! It is the first attempt of [`Router::single_via`], made synchronously:
//! the same node choice, the same place in the client's order (the command
//! holds its [`Turn`], sent only where `Turn::may_send_on` allows), the same
//! read-your-writes mark. When the first attempt is not the last (a
//! redirect, `TRYAGAIN`, a node-state error on a read, a failed
//! connection, or a connection this turn may not use yet), the command
//! continues on the awaited path from exactly where it is.

use super::*;
use crate::inbox::Inbox;
use crate::order::WriteMark;

/// Where a command sent directly delivers its reply.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub inbox: &'a Arc<Inbox>,
    /// Its position in the client's pipeline.
    pub seq: u64,
    /// When the request's bytes arrived: its latency's start.
    pub arrived: std::time::Instant,
}

/// A command sent directly, awaiting its reply in the client's inbox.
#[derive(Debug)]
pub struct Direct {
    turn: Turn,
    node: Arc<Node>,
    cmd: Bytes,
    slot: u16,
    to_primary: bool,
    up: Proto,
    /// Read-your-writes: the slot counts as written until the reply.
    written: Option<WriteMark>,
    info: &'static CommandInfo,
    start: std::time::Instant,
}

/// What a direct command's delivery becomes.
pub enum Outcome {
    /// The client's reply. The turn ends once the reply leaves in order.
    Reply(Bytes, Turn),
    /// The first attempt was not the last: the rest runs as a future.
    Resume(ReplyFuture),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reply(b, _) => f.debug_tuple("Reply").field(b).finish(),
            Outcome::Resume(_) => f.write_str("Resume"),
        }
    }
}

impl Router {
    /// Send `req` directly if it is the common case and its connection is
    /// up and free for it; otherwise `req` comes back (with `turn`
    /// untouched) for the awaited path.
    pub(super) fn try_direct(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        req: resp::Request,
        turn: &mut Option<Turn>,
        place: Place<'_>,
    ) -> Result<Direct, resp::Request> {
        let Some(t) = turn.as_ref() else {
            return Err(req);
        };
        let Some((slot, to_primary)) = self.direct_slot(info, &req, t) else {
            return Err(req);
        };
        let topo = st.topology.get(&self.registry);
        let Some(node) = self.pick_from(topo, slot, info.kind, to_primary, None, None) else {
            return Err(req);
        };
        let up = st.upstream_proto();
        let write = info.kind == Kind::Write;
        let written = (write && self.config.read_your_writes).then(|| t.client().writing(&[slot]));
        // The bytes are copied into the connection's queue; the request's
        // wire form stays here for a retry.
        let generation = st.topology.generation();
        if !st
            .conns
            .send_direct(generation, &node, up, &req.raw, t, write, place.inbox, place.seq)
        {
            return Err(req);
        }
        let Some(turn) = turn.take() else {
            return Err(req);
        };
        Ok(Direct {
            turn,
            node,
            cmd: req.raw,
            slot,
            to_primary,
            up,
            written,
            info,
            start: place.arrived,
        })
    }

    /// The slot of a command the direct path may send (and whether it must
    /// go to the primary), or `None` when it takes another path.
    fn direct_slot(&self, info: &'static CommandInfo, req: &resp::Request, t: &Turn) -> Option<(u16, bool)> {
        if commands::is_slow(info.name) || commands::block_timeout(info.name, req).is_some() {
            return None;
        }
        // Cached keys take the cache's paths (fills, invalidation).
        let cached = |key: &[u8]| self.cache.as_ref().is_some_and(|c| c.covers(key));
        let mut keys = commands::range_keys(info, req)?;
        let first = req.arg(keys.next()?)?;
        let slot = slot::slot(first);
        if cached(first) {
            return None;
        }
        for i in keys {
            let key = req.arg(i)?;
            if slot::slot(key) != slot || cached(key) {
                return None;
            }
        }
        let to_primary = commands::reads_on_primary(info.name) || t.primary_reads();
        let write = info.kind == Kind::Write;
        if !write && !to_primary && self.config.read_your_writes && t.client().read_floor(slot).is_some() {
            return None;
        }
        Some((slot, to_primary))
    }

    /// The reply (or failure) of a direct command has arrived, by `now`.
    pub fn direct_delivered(
        self: &Arc<Self>,
        d: Direct,
        result: Result<Bytes, UpstreamError>,
        metrics: &mut ClientMetrics,
        now: std::time::Instant,
    ) -> Outcome {
        if let Err(e) = &result {
            d.node.count_error(e);
        }
        let result = match result {
            Ok(reply) if !self.needs_another_attempt(&reply, d.info.kind) => {
                metrics.record(self, d.info, &reply, now.saturating_duration_since(d.start));
                // `now` is no earlier than the reply: a floor at least as
                // strict as its own instant.
                if let Some(w) = d.written {
                    w.end_at(now);
                }
                return Outcome::Reply(reply, d.turn);
            }
            other => other,
        };
        let this = self.clone();
        Outcome::Resume(Box::pin(async move {
            let Direct {
                mut turn,
                node,
                cmd,
                slot,
                to_primary,
                up,
                written,
                info,
                start,
            } = d;
            let first = Some((node, result));
            let reply = this
                .single_from(slot, info.kind, to_primary, cmd, up, Some(&mut turn), first)
                .await;
            drop(written);
            turn.finish().await;
            CommandMetrics::record(this.handles(info).as_deref(), &reply, start);
            reply
        }))
    }

    /// Would [`Router::single_from`] try again after this reply?
    fn needs_another_attempt(&self, reply: &[u8], kind: Kind) -> bool {
        reply.first() == Some(&b'-')
            && (redirect_target(reply, b"MOVED ").is_some()
                || redirect_target(reply, b"ASK ").is_some()
                || reply.starts_with(b"-TRYAGAIN")
                || (kind == Kind::Read && route::is_node_state_error(reply))
                || (kind != Kind::Read && route::is_unserved_slot(reply)))
    }
}
