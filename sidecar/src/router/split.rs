//! Cross-slot `MGET`/`MSET`/`DEL`/`UNLINK`/`EXISTS`/`TOUCH`: split per slot
//! (cached `MGET` keys through the local cache) and merged in argument order.

use super::*;

impl Router {
    /// Split a cross-slot MGET/MSET/DEL/UNLINK/EXISTS/TOUCH per slot and merge.
    /// The whole command is ordered by its caller; each part gets a turn of
    /// its own only for read-your-writes and the retry rule.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn split(
        self: &Arc<Self>,
        info: &'static CommandInfo,
        args: &[Bytes],
        keys: &[usize],
        slots: &[u16],
        up: Proto,
        proto: u8,
        whole: &Turn,
    ) -> Bytes {
        let Some(split) = info.split else {
            return err("CROSSSLOT Keys in request don't hash to the same slot");
        };
        let name = &args[0];
        let per_key = if split == Split::AllOk { 2 } else { 1 };
        // Group key positions by slot, keeping first-seen order.
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        let mut cached: Vec<usize> = Vec::new();
        for (pos, (&ki, &s)) in keys.iter().zip(slots).enumerate() {
            // A tracking client reads around the cache (`client_cache.rs`).
            let in_cache = !whole.primary_reads() && self.cache.as_ref().is_some_and(|c| c.covers(&args[ki]));
            if split == Split::Array && in_cache {
                cached.push(pos);
                continue;
            }
            match groups.iter_mut().find(|(gs, _)| *gs == s) {
                Some((_, v)) => v.push(pos),
                None => groups.push((s, vec![pos])),
            }
        }
        let (kind, to_primary) = (info.kind, commands::reads_on_primary(info.name));
        let group_futs = groups.iter().map(|(s, positions)| {
            let mut sub: Vec<&[u8]> = vec![name];
            for &pos in positions {
                let ki = keys[pos];
                for a in &args[ki..ki + per_key] {
                    sub.push(a);
                }
            }
            let cmd = resp::command_bytes(&sub);
            let this = self.clone();
            let s = *s;
            let mut part = whole.part();
            async move {
                let reply = this
                    .single_via(s, kind, to_primary, cmd, up, Some(&mut part))
                    .await;
                part.finish().await;
                reply
            }
        });
        let cached_futs = cached.iter().map(|&pos| {
            let this = self.clone();
            let key = args[keys[pos]].clone();
            let s = slots[pos];
            async move {
                let get = vec![Bytes::from_static(b"GET"), key];
                // The MGET is ordered as a whole; its parts need no turn of
                // their own.
                let (mut turn, _) = Turn::detached();
                let reply = this.cached_read(Variant::Get, get, s, up, proto, &mut turn).await;
                turn.finish().await;
                reply
            }
        });
        let (replies, cached_replies) =
            futures_util::future::join(join_all(group_futs), join_all(cached_futs)).await;
        match split {
            Split::Array => {
                let mut out: Vec<Option<Bytes>> = vec![None; keys.len()];
                for ((_, positions), reply) in groups.iter().zip(&replies) {
                    if reply.starts_with(b"-") {
                        return reply.clone();
                    }
                    let Ok(Frame::Array(items)) = resp::parse(reply) else {
                        return err("ERR cachetier: unexpected MGET reply from upstream");
                    };
                    if items.len() != positions.len() {
                        return err("ERR cachetier: MGET reply length mismatch");
                    }
                    for (&pos, item) in positions.iter().zip(items) {
                        out[pos] = Some(item.to_bytes());
                    }
                }
                for (&pos, reply) in cached.iter().zip(cached_replies) {
                    // MGET answers nil for a key holding another type; the
                    // per-key GET it was served by says WRONGTYPE instead.
                    if reply.starts_with(b"-WRONGTYPE") {
                        continue;
                    }
                    if reply.starts_with(b"-") {
                        return reply;
                    }
                    out[pos] = Some(reply);
                }
                let mut buf = BytesMut::new();
                buf.extend_from_slice(format!("*{}\r\n", out.len()).as_bytes());
                for item in out {
                    match item {
                        Some(b) => buf.extend_from_slice(&b),
                        None => null(proto).encode(&mut buf),
                    }
                }
                buf.freeze()
            }
            Split::AllOk => {
                for r in &replies {
                    if !r.starts_with(b"+") {
                        return r.clone();
                    }
                }
                ok()
            }
            Split::Sum => {
                let mut total: i64 = 0;
                for r in &replies {
                    match resp::parse(r) {
                        Ok(Frame::Integer(i)) => total += i,
                        _ => return r.clone(),
                    }
                }
                encode(&Frame::Integer(total))
            }
        }
    }
}
