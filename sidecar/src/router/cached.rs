//! Reads the local cache answers: a fresh hit without a future, a miss
//! filled in the client's order (`../cache.rs` keeps the entries).

use super::*;
use crate::resp::ArgList;

impl Router {
    /// Answer a cacheable read from the local cache without creating a
    /// future, if its entry is fresh. Only for a client with nothing else in
    /// flight (the caller checks) and no MULTI/WATCH state, so no earlier
    /// command of the same client can still be about to invalidate it.
    pub fn try_cached(
        &self,
        st: &mut ClientState,
        req: &resp::Request,
        arrived: std::time::Instant,
        metrics: &mut ClientMetrics,
    ) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        // A tracked read reads around the cache (`client_cache.rs`).
        if st.session.in_multi() || st.watch.is_active() || (st.tracker.is_some() && st.order.primary_reads())
        {
            return None;
        }
        let info = st.recent.lookup(req.arg(0)?)?;
        let variant = self.cache_variant(info, req)?;
        // One clock read for the entry's expiry and the hit's latency
        // (since the request's bytes arrived).
        let now = tokio::time::Instant::now();
        let key = CacheKey {
            variant,
            proto: st.session.proto,
            key: req.arg_bytes(1)?,
            field: if variant == Variant::HGet {
                req.arg_bytes(2)?
            } else {
                Bytes::new()
            },
        };
        let value = cache.try_hit_at(&key, now)?;
        if let Some(view) = &st.view {
            view.command(info.id);
        }
        metrics.record(
            self,
            info,
            &value,
            now.into_std().saturating_duration_since(arrived),
        );
        Some(value)
    }

    /// The keys a write touches that the local cache covers.
    pub(super) fn touched_keys(&self, info: &CommandInfo, args: &[Bytes], keys: &[usize]) -> Vec<Bytes> {
        match &self.cache {
            Some(cache) if info.kind == Kind::Write => keys
                .iter()
                .filter(|&&i| cache.covers(&args[i]))
                .map(|&i| args[i].clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    pub(super) fn cache_variant<A: ArgList + ?Sized>(&self, info: &CommandInfo, args: &A) -> Option<Variant> {
        let cache = self.cache.as_ref()?;
        let variant = match (info.name, args.argc()) {
            ("get", 2) => Variant::Get,
            ("hgetall", 2) => Variant::HGetAll,
            ("hget", 3) => Variant::HGet,
            _ => return None,
        };
        cache.covers(args.arg(1)?).then_some(variant)
    }

    /// A cacheable read at its place in the client's order: once everything
    /// before it has been sent (so a write before it has invalidated the key
    /// and removed older fills) a hit is taken; a miss joins or starts the
    /// key's shared fill once only reads are still in flight before it.
    pub(super) async fn cached_read(
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
            // The key's own remaining life bounds the entry (Redis may be
            // late expiring it); read right behind the value, same node.
            let cmd = resp::command_bytes(&args);
            let pttl = resp::command_bytes(&[&b"PTTL"[..], &args[1][..]]);
            let (reply, life) = tokio::join!(
                this.single_via(slot, Kind::Read, true, cmd, up, Some(&mut fill_turn)),
                this.single_via(slot, Kind::Read, true, pttl, up, None),
            );
            fill_turn.finish().await;
            (reply, cache::life_from_pttl(&life))
        };
        match cache.lookup(key, tracked, fill).await {
            Lookup::Hit(value) => value,
            Lookup::Fill { stage, value } => {
                // Sent once the fill is: only reads are before it, so the
                // connection does not matter (a read after a run of reads).
                stage.wait_for(|s| s != Stage::Waiting).await;
                turn.sent(0, false);
                LocalCache::fill_result(value).await
            }
        }
    }
}
