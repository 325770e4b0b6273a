//! Transactions: `MULTI` queued in the sidecar and sent as one block to the
//! slot's primary (following MOVED/ASK/TRYAGAIN); `WATCH` is in `watch.rs`,
//! transactions across slots in `cross_slot.rs`.

use super::*;

impl Router {
    pub(super) fn queue_in_multi(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: Vec<Bytes>,
    ) -> Action {
        match info.name {
            "exec" => {
                let exec = st.session.exec();
                // EXEC unwatches, whatever it does.
                let watches = st.watch.take();
                let cmds = match exec {
                    Exec::Run(cmds) => cmds,
                    Exec::Aborted => {
                        return Action::Reply(err(
                            "EXECABORT Transaction discarded because of previous errors.",
                        ));
                    }
                    Exec::NotInMulti => return Action::Reply(err("ERR EXEC without MULTI")),
                };
                if !watches.is_empty() {
                    return self.exec_watched(st, info, watches, cmds);
                }
                let this = self.clone();
                let up = st.upstream_proto();
                let order = self.config.read_your_writes.then(|| st.order.clone());
                self.timed(info, async move { this.exec(cmds, up, order).await })
            }
            "discard" => {
                st.session.discard();
                // DISCARD also unwatches; dropping the connection does that.
                st.watch.clear();
                Action::Reply(ok())
            }
            "multi" => Action::Reply(match st.session.multi() {
                Ok(()) => ok(),
                Err(e) => err(e),
            }),
            // Refused, but the transaction goes on (Redis's own check).
            "watch" => Action::Reply(err("ERR WATCH inside MULTI is not allowed")),
            // They act at once, as in Redis: RESET ends the transaction and
            // any WATCH, QUIT closes the connection.
            "reset" | "quit" => self.server_command(st, info, args),
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
                    // The same on every node: they run in the transaction,
                    // on its node, as on one Redis server.
                    Kind::Server if matches!(info.name, "ping" | "echo" | "select" | "unwatch") => None,
                    Kind::Server => Some(format!(
                        "ERR cachetier: '{}' cannot run inside MULTI through the sidecar: \
                         the sidecar answers it or sends it to every primary, \
                         and a transaction runs on one node",
                        info.name
                    )),
                };
                match refusal {
                    Some(e) => {
                        st.session.refuse_queued();
                        Action::Reply(err(e))
                    }
                    None => {
                        let limit = usize::try_from(self.config.client_query_limit).unwrap_or(usize::MAX);
                        if st.session.queue(args, limit) {
                            Action::Reply(Bytes::from_static(b"+QUEUED\r\n"))
                        } else {
                            Action::Reply(err(
                                "ERR cachetier: transaction larger than the client query limit; EXEC will abort",
                            ))
                        }
                    }
                }
            }
        }
    }

    /// Run a queued transaction as one contiguous MULTI..EXEC block on the
    /// slot's primary. The block is written back to back on the shared
    /// connection, so no other client's command can land inside it.
    pub(super) async fn exec(
        self: Arc<Self>,
        cmds: Vec<Vec<Bytes>>,
        up: Proto,
        order: Option<Arc<ClientOrder>>,
    ) -> Bytes {
        if cmds.is_empty() {
            return encode(&Frame::Array(Vec::new()));
        }
        let mut slots: Vec<u16> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut touched: Vec<Bytes> = Vec::new();
        for args in &cmds {
            let Some(info) = args.first().and_then(|n| commands::lookup(n)) else {
                continue;
            };
            if let Ok(keys) = commands::key_indices(info, args) {
                for i in keys {
                    let s = slot::slot(&args[i]);
                    if seen.insert(s) {
                        slots.push(s);
                    }
                    if let Some(c) = &self.cache
                        && c.covers(&args[i])
                    {
                        c.bump(&args[i]);
                        touched.push(args[i].clone());
                    }
                }
            }
        }
        let _written = order.filter(|_| !slots.is_empty()).map(|o| o.writing(&slots));
        // Planned per slot only when its keys span slots: the usual
        // transaction pays for no plan.
        let across = match slots.len() {
            0 | 1 => None,
            _ => self.exec_across_slots(&cmds, up).await,
        };
        let reply = match across {
            Some(reply) => reply,
            None => self.exec_block(&cmds, slots.first().copied(), up).await,
        };
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
    pub(super) fn tx_block(cmds: &[Vec<Bytes>], asking: bool) -> (Bytes, usize) {
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
    pub(super) async fn exec_block(
        self: &Arc<Self>,
        cmds: &[Vec<Bytes>],
        slot: Option<u16>,
        up: Proto,
    ) -> Bytes {
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
