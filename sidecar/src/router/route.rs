//! Routing to nodes: one slot's primary or a replica (the read balance, one
//! retry, MOVED/ASK), any primary, every primary; and the error replies
//! that say what the sidecar did.

use super::*;

impl Router {
    /// Send one command for `slot`, following MOVED/ASK and retrying a failed
    /// read once on another node.
    pub async fn single(self: &Arc<Self>, slot: u16, kind: Kind, cmd: Bytes, up: Proto) -> Bytes {
        self.single_via(slot, kind, false, cmd, up, None).await
    }

    /// [`Router::single`] at the place `turn` gives it in its client's order
    /// (none: the caller ordered it as a whole), optionally forcing a read to
    /// the primary. A read forced to the primary is not retried elsewhere: a
    /// replica may not have what the primary was asked for.
    pub(super) async fn single_via(
        self: &Arc<Self>,
        slot: u16,
        kind: Kind,
        to_primary: bool,
        cmd: Bytes,
        up: Proto,
        turn: Option<&mut Turn>,
    ) -> Bytes {
        self.single_from(slot, kind, to_primary, cmd, up, turn, None)
            .await
    }

    /// [`Router::single_via`], where the first attempt may already have
    /// been made (`first`: the node and its outcome; the direct path of
    /// `direct.rs` sent it from the client's task).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn single_from(
        self: &Arc<Self>,
        slot: u16,
        kind: Kind,
        to_primary: bool,
        cmd: Bytes,
        up: Proto,
        mut turn: Option<&mut Turn>,
        mut first: Option<(Arc<Node>, Result<Bytes, UpstreamError>)>,
    ) -> Bytes {
        let mut redirect: Option<(Arc<Node>, bool)> = None;
        let mut avoid: Option<Arc<Node>> = None;
        // A tracking client reads primaries only (`client_cache.rs`).
        let to_primary = to_primary || turn.as_deref().is_some_and(|t| t.primary_reads());
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
            let (node, result) = match first.take() {
                Some(made) => made,
                None => {
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
                    let (bytes, n) = resp::asking_if(asking, &cmd);
                    let write = kind != Kind::Read;
                    let r = node.request_in(up, bytes, n, turn.as_deref_mut(), write).await;
                    (node, r.map(|mut replies| replies.pop().unwrap_or_default()))
                }
            };
            match result {
                Ok(reply) => {
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
                    // A primary that momentarily counts the slot as nobody's
                    // (after a failover, a bus message from the heir sent
                    // before its promotion can arrive after it; Redis then
                    // drops the slot until the heir's next ping) refuses
                    // before running anything: a write goes again on a
                    // refreshed map, unless a later write of this client is
                    // already out (a retry would reorder their effects).
                    if kind != Kind::Read
                        && is_unserved_slot(&reply)
                        && attempt + 1 < MAX_REDIRECTS
                        && !turn.as_deref().is_some_and(|t| t.later_write_sent())
                    {
                        self.metrics.write_retries.inc();
                        self.registry.request_refresh();
                        tokio::time::sleep(Duration::from_millis(200)).await;
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
    pub(super) fn pick(
        &self,
        slot: u16,
        kind: Kind,
        to_primary: bool,
        avoid: Option<&Arc<Node>>,
        floor: Option<(Arc<ClientOrder>, ReadFloor)>,
    ) -> Option<Arc<Node>> {
        self.pick_from(&self.registry.current(), slot, kind, to_primary, avoid, floor)
    }

    /// [`Router::pick`] in a given topology.
    pub(super) fn pick_from(
        &self,
        topo: &crate::topology::Topology,
        slot: u16,
        kind: Kind,
        to_primary: bool,
        avoid: Option<&Arc<Node>>,
        floor: Option<(Arc<ClientOrder>, ReadFloor)>,
    ) -> Option<Arc<Node>> {
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

    pub(super) async fn any_primary(self: &Arc<Self>, cmd: Bytes, up: Proto) -> Bytes {
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
    pub(super) async fn on_primary(
        self: &Arc<Self>,
        slot: Option<u16>,
        cmd: Bytes,
        up: Proto,
        slow: bool,
    ) -> Bytes {
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
            let (bytes, n) = resp::asking_if(asking, &cmd);
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

    pub(super) fn primaries(&self) -> Vec<Arc<Node>> {
        self.registry
            .current()
            .shards
            .iter()
            .map(|s| s.primary.clone())
            .collect()
    }

    /// The primaries in rotation, and the replicas in rotation when
    /// `replicas` (a node out of rotation would hold a merged answer up to
    /// its timeout).
    pub(super) fn in_rotation(&self, replicas: bool) -> (Vec<Arc<Node>>, Vec<Arc<Node>>) {
        let topo = self.registry.current();
        let healthy = |n: &&Arc<Node>| n.is_healthy();
        let primaries = topo
            .shards
            .iter()
            .map(|s| &s.primary)
            .filter(healthy)
            .cloned()
            .collect();
        let replicas = (topo.shards.iter())
            .flat_map(|s| s.replicas.iter())
            .filter(|n| replicas && n.is_healthy())
            .cloned()
            .collect();
        (primaries, replicas)
    }

    /// `cmd`'s reply from each of `nodes`, best effort (for answers merged
    /// from what the nodes say): a node that fails, or answers an error, is
    /// left out.
    pub(super) async fn ask_each(nodes: Vec<Arc<Node>>, cmd: &Bytes, up: Proto) -> Vec<Bytes> {
        let futs = nodes.into_iter().map(|n| {
            let cmd = cmd.clone();
            async move { n.request(up, cmd, 1).await }
        });
        join_all(futs)
            .await
            .into_iter()
            .filter_map(|r| r.ok()?.pop())
            .filter(|reply| !reply.starts_with(b"-"))
            .collect()
    }

    /// Send `cmd` to every primary (a known-slow one on connections of its
    /// own); Err carries the first error reply.
    pub(super) async fn fan_out(
        self: &Arc<Self>,
        cmd: Bytes,
        up: Proto,
        slow: bool,
    ) -> Result<Vec<Bytes>, Bytes> {
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
pub(super) fn redirect_target(reply: &[u8], kind: &[u8]) -> Option<String> {
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

pub(super) fn upstream_error(addr: &str, kind: Kind, e: &UpstreamError) -> Bytes {
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
pub(super) fn is_node_state_error(reply: &[u8]) -> bool {
    [&b"-CLUSTERDOWN"[..], b"-LOADING", b"-MASTERDOWN"]
        .iter()
        .any(|p| reply.starts_with(p))
}

/// A node's refusal because it knows no owner for the slot.
pub(super) fn is_unserved_slot(reply: &[u8]) -> bool {
    reply.starts_with(b"-CLUSTERDOWN Hash slot not served")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn moved_and_ask_replies_name_their_target() {
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
