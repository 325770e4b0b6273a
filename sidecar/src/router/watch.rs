//! `WATCH`: per watched slot, a connection of the client's own to the
//! slot's primary, where Redis watches the keys; until `EXEC`, `DISCARD`,
//! `UNWATCH` or `RESET` the client's keyed commands of a watched slot run
//! there (reads too, so the optimistic read is not a stale replica read),
//! those of other slots on their primary. Keys of several slots
//! (`--split-transactions`, as RQ watches a job's dependencies) get a
//! connection each; `EXEC` then runs as in `cross_slot.rs`.

use super::*;
use crate::upstream::Dedicated;

/// Most slots one client may watch keys of at a time (a connection each).
pub const MAX_WATCHED_SLOTS: usize = 16;

/// A client's watched slots, in the order first watched.
#[derive(Debug, Default)]
pub struct Watches(Vec<Arc<Watch>>);

/// One watched slot's connection, opened on first use, and its keys.
#[derive(Debug)]
pub struct Watch {
    pub(super) slot: u16,
    conn: tokio::sync::Mutex<Option<Dedicated>>,
    keys: std::sync::Mutex<Vec<Bytes>>,
}

impl Watch {
    /// The keys the client watched in this slot.
    pub(super) fn keys(&self) -> Vec<Bytes> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Hold a write's read-your-writes `mark` until `action`'s reply.
fn held(action: Action, mark: Option<crate::order::WriteMark>) -> Action {
    match (action, mark) {
        (Action::Later(fut), Some(mark)) => Action::Later(Box::pin(async move {
            let reply = fut.await;
            drop(mark);
            reply
        })),
        (other, _) => other,
    }
}

impl Watches {
    pub fn is_active(&self) -> bool {
        !self.0.is_empty()
    }

    /// Unwatch: dropping the connections does that.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn take(&mut self) -> Vec<Arc<Watch>> {
        std::mem::take(&mut self.0)
    }

    fn get(&self, slot: u16) -> Option<Arc<Watch>> {
        self.0.iter().find(|w| w.slot == slot).cloned()
    }

    fn first(&self) -> Option<Arc<Watch>> {
        self.0.first().cloned()
    }
}

/// The keys of `args` (indices) and the slot of each, in order (the error
/// reply for a wrong arity).
fn keys_and_slots(info: &CommandInfo, args: &[Bytes]) -> Result<(Vec<usize>, Vec<u16>), Bytes> {
    let keys = commands::key_indices(info, args).map_err(|_| {
        err(format!(
            "ERR wrong number of arguments for '{}' command",
            info.name
        ))
    })?;
    let slots = keys.iter().map(|&i| slot::slot(&args[i])).collect();
    Ok((keys, slots))
}

impl Router {
    /// Run `bytes` (holding `replies` commands) on a watched slot's
    /// connection. Like every path but the keyed ones it is ordered as a
    /// whole (see [`Router::dispatch`]): after everything the client sent
    /// before it has its reply.
    pub(super) fn watch_call(
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
            let run = this.on_watch_conn(&watch, bytes, replies, up);
            this.with_touched(touched, run).await
        })
    }

    /// Run `fut`, a write of the local cache's `touched` keys, as every
    /// write runs: their entries are bumped before and invalidated after.
    pub(super) async fn with_touched(&self, touched: Vec<Bytes>, fut: impl Future<Output = Bytes>) -> Bytes {
        if let Some(cache) = &self.cache {
            touched.iter().for_each(|k| cache.bump(k));
        }
        let reply = fut.await;
        if let Some(cache) = &self.cache {
            for k in &touched {
                cache.invalidate(k, "own_write").await;
            }
        }
        reply
    }

    /// A keyed command of a slot the client does not watch, while it
    /// watches others: on the slot's primary, ordered as a whole.
    fn unwatched_call(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        slot: u16,
        raw: Bytes,
        touched: Vec<Bytes>,
    ) -> Action {
        let this = self.clone();
        let up = st.upstream_proto();
        self.timed(info, async move {
            let run = this.on_primary(Some(slot), raw, up, false);
            this.with_touched(touched, run).await
        })
    }

    pub(super) async fn on_watch_conn(
        &self,
        watch: &Watch,
        bytes: Bytes,
        replies: usize,
        up: Proto,
    ) -> Bytes {
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
            match Dedicated::open(&addr, up, self.config.response_timeout, self.config.auth.as_ref()).await {
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

    /// Commands while a WATCH is active. `None`: handle as usual (local
    /// commands, MULTI).
    pub(super) fn on_watch(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: &[Bytes],
        raw: &Bytes,
    ) -> Option<Action> {
        let first = st.watch.first()?;
        // Blocking and slow commands take their own connections as
        // usual (a WATCH connection would cut them off at the response
        // timeout); their writes mark the watched keys as anyone's do.
        if commands::block_timeout(info.name, args).is_some() || commands::is_slow(info.name) {
            return None;
        }
        match info.kind {
            Kind::Read | Kind::Write => {
                let (keys, slots) = match keys_and_slots(info, args) {
                    Ok(found) => found,
                    Err(e) => return Some(Action::Reply(e)),
                };
                let across = slots.iter().any(|&s| s != slots[0]);
                // A stream read over several slots reads as without WATCH
                // (a client's own commands count for WATCH wherever they run).
                if across && matches!(info.name, "xread" | "xreadgroup") {
                    return None;
                }
                if across && (!self.config.split_transactions || info.split.is_none()) {
                    return Some(Action::Reply(err(
                        "CROSSSLOT Keys in request don't hash to the same slot (while WATCH is active, a command's keys must be in one slot)",
                    )));
                }
                let touched = self.touched_keys(info, args, &keys);
                // Reads of these slots after this write must see it.
                let mark = (info.kind == Kind::Write && self.config.read_your_writes && !slots.is_empty())
                    .then(|| st.order.writing(&slots));
                if across {
                    let (this, up, watches) = (self.clone(), st.upstream_proto(), st.watch.0.clone());
                    let args = args.to_vec();
                    let action = self.timed(info, async move {
                        let run = this.split_under_watch(&watches, args, up);
                        this.with_touched(touched, run).await
                    });
                    return Some(held(action, mark));
                }
                let watch = match slots.first() {
                    None => first,
                    Some(&s) => match st.watch.get(s) {
                        Some(w) => w,
                        None if self.config.split_transactions => {
                            return Some(held(self.unwatched_call(st, info, s, raw.clone(), touched), mark));
                        }
                        None => {
                            return Some(Action::Reply(err(format!(
                                "CROSSSLOT cachetier: while WATCH is active, commands must use keys of the watched slot {} (this one uses slot {s})",
                                first.slot
                            ))));
                        }
                    },
                };
                Some(held(
                    self.watch_call(st, info, watch, raw.clone(), 1, touched),
                    mark,
                ))
            }
            Kind::AnyPrimary => Some(self.watch_call(st, info, first, raw.clone(), 1, Vec::new())),
            Kind::Server => match info.name {
                "watch" => Some(self.watch_command(st, info, args)),
                "unwatch" => {
                    st.watch.clear();
                    Some(self.watch_call(st, info, first, raw.clone(), 1, Vec::new()))
                }
                _ => None,
            },
            Kind::Unsupported(_) => None,
        }
    }

    /// `WATCH key …`: on each key's slot's connection, one `WATCH` per
    /// slot, in the order of the keys' slots; `+OK` once all are watched.
    pub(super) fn watch_command(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        args: &[Bytes],
    ) -> Action {
        let slots = match keys_and_slots(info, args) {
            Ok((_, s)) if s.is_empty() => {
                return Action::Reply(err("ERR wrong number of arguments for 'watch' command"));
            }
            Ok((_, s)) => s,
            Err(e) => return Action::Reply(e),
        };
        // Per slot, in order, its keys.
        let mut per_slot: Vec<(u16, Vec<Bytes>)> = Vec::new();
        for (key, &s) in args[1..].iter().zip(&slots) {
            match per_slot.iter_mut().find(|(x, _)| *x == s) {
                Some((_, keys)) => keys.push(key.clone()),
                None => per_slot.push((s, vec![key.clone()])),
            }
        }
        // Refused whole, before anything is watched.
        let new: Vec<u16> = per_slot
            .iter()
            .map(|&(s, _)| s)
            .filter(|&s| st.watch.get(s).is_none())
            .collect();
        if !self.config.split_transactions && !new.is_empty() {
            if let Some(first) = st.watch.first() {
                return Action::Reply(err(format!(
                    "CROSSSLOT cachetier: all WATCHed keys must be in one slot (already watching slot {})",
                    first.slot
                )));
            }
            if per_slot.len() > 1 {
                return Action::Reply(err("CROSSSLOT Keys in request don't hash to the same slot"));
            }
        }
        if st.watch.0.len() + new.len() > MAX_WATCHED_SLOTS {
            return Action::Reply(err(format!(
                "ERR cachetier: a client may WATCH keys of at most {MAX_WATCHED_SLOTS} slots at a time"
            )));
        }
        for slot in new {
            st.watch.0.push(Arc::new(Watch {
                slot,
                conn: tokio::sync::Mutex::new(None),
                keys: std::sync::Mutex::new(Vec::new()),
            }));
        }
        let calls: Vec<(Arc<Watch>, Bytes)> = per_slot
            .into_iter()
            .filter_map(|(s, keys)| {
                let w = st.watch.get(s)?;
                let mut known = w.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for k in &keys {
                    if !known.contains(k) {
                        known.push(k.clone());
                    }
                }
                drop(known);
                let mut cmd = vec![Bytes::from_static(b"WATCH")];
                cmd.extend(keys);
                Some((w, resp::command_bytes(&cmd)))
            })
            .collect();
        let this = self.clone();
        let up = st.upstream_proto();
        self.timed(info, async move {
            for (watch, cmd) in calls {
                let reply = this.on_watch_conn(&watch, cmd, 1, up).await;
                if !reply.starts_with(b"+") {
                    return reply;
                }
            }
            ok()
        })
    }

    /// EXEC after WATCH. The watched slots are checked where Redis checks
    /// them: when the transaction's keys are all in the one watched slot,
    /// the queued block runs on its connection; otherwise as in
    /// [`Router::exec_watched_across_slots`].
    pub(super) fn exec_watched(
        self: &Arc<Self>,
        st: &mut ClientState,
        info: &'static CommandInfo,
        watches: Vec<Arc<Watch>>,
        cmds: Vec<Vec<Bytes>>,
    ) -> Action {
        let mut slots: Vec<u16> = watches.iter().map(|w| w.slot).collect();
        let mut touched = Vec::new();
        for args in &cmds {
            if let Some(ci) = args.first().and_then(|n| commands::lookup(n)) {
                let (keys, key_slots) = match keys_and_slots(ci, args) {
                    Ok(found) => found,
                    Err(e) => return Action::Reply(e),
                };
                for x in key_slots {
                    if !slots.contains(&x) {
                        slots.push(x);
                    }
                }
                if let Some(cache) = &self.cache {
                    touched.extend(
                        keys.iter()
                            .filter(|&&i| cache.covers(&args[i]))
                            .map(|&i| args[i].clone()),
                    );
                }
            }
        }
        let mark = (self.config.read_your_writes && !slots.is_empty()).then(|| st.order.writing(&slots));
        let action = match &watches[..] {
            [watch] if slots.len() == 1 => {
                let (block, n) = Self::tx_block(&cmds, false);
                self.watch_call(st, info, watch.clone(), block, n, touched)
            }
            _ if !self.config.split_transactions => Action::Reply(err(
                "CROSSSLOT Keys in request don't hash to the same slot (a watched transaction must stay in the watched slot)",
            )),
            _ => {
                let this = self.clone();
                let up = st.upstream_proto();
                self.timed(info, async move {
                    let run = this.exec_watched_across_slots(&watches, &cmds, up);
                    this.with_touched(touched, run).await
                })
            }
        };
        // The transaction's writes count as pending until its reply.
        held(action, mark)
    }
}
