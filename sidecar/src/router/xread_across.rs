//! `XREAD` and `XREADGROUP` over streams of several slots, which one Redis
//! server answers and Redis Cluster refuses with `CROSSSLOT`: an event
//! consumer reading `orders` and `payments` in one call.
//!
//! Without `BLOCK`, the read runs per slot (each part with the same options,
//! its streams and their IDs), all at once, and the replies are merged in
//! the order the client named the streams; nil when none has entries.
//!
//! With `BLOCK`, as a blocking pop across slots does (`pop_across.rs`): a
//! `$` is first read as the stream's last entry's ID (`XREVRANGE … COUNT
//! 1`; `0-0` for a missing or empty stream: no entry lies between it and
//! the stream's last ID), so no entry added between two tries is missed;
//! then every part is tried without blocking, and while none has entries,
//! the first stream's slot's part blocks for at most [`ROUND`] on the
//! client's blocking connection (an entry added there wakes it at once) and
//! the other parts are tried again, until the client's timeout.
//!
//! What differs from one server: the parts are not one atomic read; an
//! `XREADGROUP` whose part on one slot fails (`NOGROUP`, `WRONGTYPE`) after
//! another part read entries answers the error, and those entries stay
//! pending for the consumer (`XPENDING`, `XCLAIM`); entries added to a later
//! stream are found within [`ROUND`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;

use super::pop_across::ROUND;
use super::{Router, err};
use crate::blocking::BlockingCell;
use crate::commands::Kind;
use crate::resp::{self, Frame};
use crate::slot;
use crate::upstream::Proto;

/// A stream read split by slot.
#[derive(Debug)]
pub(super) struct StreamRead {
    name: Bytes,
    kind: Kind,
    /// The options before `STREAMS`, without `BLOCK` and its value.
    options: Vec<Bytes>,
    /// Each stream, its ID, and its slot, in the client's order.
    streams: Vec<(Bytes, Bytes, u16)>,
    /// The slots, in the order their first stream was named.
    slots: Vec<u16>,
}

impl StreamRead {
    /// The read of `args`, whose stream keys are at `keys` (as
    /// [`crate::commands::key_indices`] finds them: right after `STREAMS`).
    pub(super) fn of(kind: Kind, args: &[Bytes], keys: &[usize]) -> Option<StreamRead> {
        let (&first, &last) = (keys.first()?, keys.last()?);
        let ids = args.get(last + 1..)?;
        if first < 2 || ids.len() != keys.len() {
            return None;
        }
        // The options, word by word as Redis reads them (a group named
        // `block` is a group).
        let given = &args[1..first - 1];
        let mut options = Vec::new();
        let mut i = 0;
        while i < given.len() {
            let word = &given[i];
            let takes = if word.eq_ignore_ascii_case(b"group") {
                3
            } else if word.eq_ignore_ascii_case(b"count") || word.eq_ignore_ascii_case(b"block") {
                2
            } else {
                1
            };
            let end = (i + takes).min(given.len());
            if !word.eq_ignore_ascii_case(b"block") {
                options.extend(given[i..end].iter().cloned());
            }
            i = end;
        }
        let streams: Vec<(Bytes, Bytes, u16)> = keys
            .iter()
            .zip(ids)
            .map(|(&k, id)| (args[k].clone(), id.clone(), slot::slot(&args[k])))
            .collect();
        let mut slots: Vec<u16> = Vec::new();
        for &(_, _, s) in &streams {
            if !slots.contains(&s) {
                slots.push(s);
            }
        }
        Some(StreamRead {
            name: args[0].clone(),
            kind,
            options,
            streams,
            slots,
        })
    }

    /// The read of `slot`'s streams, blocking for `block` when given.
    fn part(&self, slot: u16, block: Option<Duration>) -> Vec<Bytes> {
        let mut cmd = vec![self.name.clone()];
        cmd.extend(self.options.iter().cloned());
        if let Some(b) = block {
            cmd.push(Bytes::from_static(b"BLOCK"));
            cmd.push(Bytes::from(b.as_millis().max(1).to_string()));
        }
        cmd.push(Bytes::from_static(b"STREAMS"));
        let mine: Vec<&(Bytes, Bytes, u16)> = self.streams.iter().filter(|s| s.2 == slot).collect();
        cmd.extend(mine.iter().map(|s| s.0.clone()));
        cmd.extend(mine.iter().map(|s| s.1.clone()));
        cmd
    }
}

/// The entries per stream in a read's reply (RESP2 array of pairs or RESP3
/// map); `Ok(None)` for nil; `Err` for an error or another reply.
fn entries(reply: &Bytes) -> Result<Option<Vec<(Bytes, Bytes)>>, Bytes> {
    let pairs = match resp::parse(reply) {
        Ok(Frame::NullArray | Frame::Null | Frame::NullBulk) => return Ok(None),
        Ok(Frame::Map(pairs)) => pairs,
        Ok(Frame::Array(items)) => {
            let mut pairs = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Frame::Array(mut kv) if kv.len() == 2 => {
                        let v = kv.pop().unwrap_or(Frame::Null);
                        let k = kv.pop().unwrap_or(Frame::Null);
                        pairs.push((k, v));
                    }
                    _ => return Err(reply.clone()),
                }
            }
            pairs
        }
        _ => return Err(reply.clone()),
    };
    let mut out = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        match k {
            Frame::Bulk(name) | Frame::Simple(name) => out.push((name, v.to_bytes())),
            _ => return Err(reply.clone()),
        }
    }
    Ok(Some(out))
}

/// One reply from the parts' entries, in the order of `streams`.
fn merge(streams: &[(Bytes, Bytes, u16)], got: &[(Bytes, Bytes)], up: Proto) -> Bytes {
    let mut ordered: Vec<&(Bytes, Bytes)> = Vec::with_capacity(got.len());
    for (name, _, _) in streams {
        if let Some(e) = got.iter().find(|(n, _)| n == name)
            && !ordered.iter().any(|(n, _)| n == name)
        {
            ordered.push(e);
        }
    }
    let mut out = BytesMut::new();
    if ordered.is_empty() {
        let nil = if up == Proto::Resp3 {
            Frame::Null
        } else {
            Frame::NullArray
        };
        nil.encode(&mut out);
        return out.freeze();
    }
    let head = if up == Proto::Resp3 { '%' } else { '*' };
    out.extend_from_slice(format!("{head}{}\r\n", ordered.len()).as_bytes());
    for (name, entries) in ordered {
        if up != Proto::Resp3 {
            out.extend_from_slice(b"*2\r\n");
        }
        Frame::Bulk(name.clone()).encode(&mut out);
        out.extend_from_slice(entries);
    }
    out.freeze()
}

impl Router {
    /// Run `read` (streams of several slots); `block`: the client's
    /// `BLOCK` (`None`: not blocking; `Some(None)`: for ever).
    pub(super) async fn xread_across_slots(
        self: &Arc<Self>,
        mut read: StreamRead,
        block: Option<Option<Duration>>,
        cell: &BlockingCell,
        up: Proto,
    ) -> Bytes {
        self.metrics.stream_reads_across_slots.inc();
        let Some(block) = block else {
            return self.try_parts(&read, &read.slots, up).await.unwrap_or_else(|e| e);
        };
        if read.kind == Kind::Read
            && let Err(e) = self.resolve_last_ids(&mut read, up).await
        {
            return e;
        }
        let nil = merge(&[], &[], up);
        if let Some(reply) = self
            .try_parts(&read, &read.slots, up)
            .await
            .ok()
            .filter(|r| r != &nil)
        {
            return reply;
        }
        let deadline = block.and_then(|b| Instant::now().checked_add(b));
        let forever = deadline.is_none();
        let Some((&first, rest)) = read.slots.split_first() else {
            return nil;
        };
        loop {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(ROUND),
                None => ROUND,
            };
            if wait < Duration::from_millis(1) && !forever {
                return nil;
            }
            let cmd = resp::command_bytes(&read.part(first, Some(wait)));
            let reply = self.blocking(cell, first, cmd, Some(wait), up).await;
            if reply != nil {
                return reply;
            }
            match self.try_parts(&read, rest, up).await {
                Ok(r) if r == nil => {}
                Ok(r) | Err(r) => return r,
            }
        }
    }

    /// Read `slots`' parts at once, without blocking: the merged reply, or
    /// (`Err`) the first part's error.
    async fn try_parts(
        self: &Arc<Self>,
        read: &StreamRead,
        slots: &[u16],
        up: Proto,
    ) -> Result<Bytes, Bytes> {
        // On primaries: the parts run outside the client's turn, so a
        // replica could miss the client's own XADD.
        let runs = slots.iter().map(|&s| {
            let cmd = resp::command_bytes(&read.part(s, None));
            self.single_via(s, read.kind, true, cmd, up, None)
        });
        let mut got = Vec::new();
        for reply in join_all(runs).await {
            if let Some(e) = entries(&reply)? {
                got.extend(e);
            }
        }
        Ok(merge(&read.streams, &got, up))
    }

    /// Each `$` as the ID of its stream's last entry (`0-0` for none).
    async fn resolve_last_ids(self: &Arc<Self>, read: &mut StreamRead, up: Proto) -> Result<(), Bytes> {
        for (key, id, s) in read.streams.iter_mut() {
            if id.as_ref() != b"$" {
                continue;
            }
            let cmd = resp::command_bytes(&[&b"XREVRANGE"[..], key, b"+", b"-", b"COUNT", b"1"]);
            let reply = self.single_via(*s, Kind::Read, true, cmd, up, None).await;
            *id = match resp::parse(&reply) {
                Ok(Frame::Array(items)) => match items.first() {
                    Some(Frame::Array(entry)) => match entry.first() {
                        Some(Frame::Bulk(last)) => last.clone(),
                        _ => return Err(err("ERR cachetier: unexpected XREVRANGE reply")),
                    },
                    _ => Bytes::from_static(b"0-0"),
                },
                _ if reply.starts_with(b"-") => return Err(reply),
                _ => return Err(err("ERR cachetier: unexpected XREVRANGE reply")),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    fn text(cmd: Vec<Bytes>) -> String {
        cmd.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn each_slot_reads_its_streams_with_the_options_but_block() {
        let a = args(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "BLOCK",
            "0",
            "COUNT",
            "2",
            "STREAMS",
            "s1",
            "s2",
            ">",
            ">",
        ]);
        let read = StreamRead::of(Kind::Write, &a, &[9, 10]).expect("a read");
        let (s1, s2) = (slot::slot(b"s1"), slot::slot(b"s2"));
        assert_ne!(s1, s2);
        assert_eq!(read.slots, [s1, s2]);
        assert_eq!(
            text(read.part(s2, None)),
            "XREADGROUP GROUP g c COUNT 2 STREAMS s2 >"
        );
        assert_eq!(
            text(read.part(s1, Some(Duration::from_millis(100)))),
            "XREADGROUP GROUP g c COUNT 2 BLOCK 100 STREAMS s1 >"
        );
        let g = args(&[
            "XREADGROUP",
            "GROUP",
            "block",
            "c",
            "NOACK",
            "STREAMS",
            "s1",
            "s2",
            ">",
            ">",
        ]);
        let read = StreamRead::of(Kind::Write, &g, &[6, 7]).expect("a read");
        assert_eq!(
            text(read.part(s1, None)),
            "XREADGROUP GROUP block c NOACK STREAMS s1 >"
        );
        let x = args(&["XREAD", "STREAMS", "s1", "s2", "0", "$"]);
        let read = StreamRead::of(Kind::Read, &x, &[2, 3]).expect("a read");
        assert_eq!(text(read.part(s2, None)), "XREAD STREAMS s2 $");
    }

    #[test]
    fn parts_merge_in_the_order_the_streams_were_named() {
        let a = args(&["XREAD", "STREAMS", "s1", "s2", "0", "0"]);
        let read = StreamRead::of(Kind::Read, &a, &[2, 3]).expect("a read");
        let e = |n: &str| {
            (
                Bytes::copy_from_slice(n.as_bytes()),
                Bytes::from_static(b"*0\r\n"),
            )
        };
        let got = [e("s2"), e("s1")];
        assert_eq!(
            &merge(&read.streams, &got, Proto::Resp2)[..],
            b"*2\r\n*2\r\n$2\r\ns1\r\n*0\r\n*2\r\n$2\r\ns2\r\n*0\r\n"
        );
        assert_eq!(
            &merge(&read.streams, &got[..1], Proto::Resp3)[..],
            b"%1\r\n$2\r\ns2\r\n*0\r\n"
        );
        assert_eq!(&merge(&read.streams, &[], Proto::Resp2)[..], b"*-1\r\n");
        assert_eq!(&merge(&read.streams, &[], Proto::Resp3)[..], b"_\r\n");
    }
}
