//! `XREAD` and `XREADGROUP` over streams of several slots, which one Redis
//! server answers and Redis Cluster refuses with `CROSSSLOT`: an event
//! consumer reading `orders` and `payments` in one call.
//!
//! One server checks every stream (its type, the group, the ID) in the
//! order they are named, then reads each, then, with `BLOCK` and nothing
//! read, waits until a stream gets an entry past its ID. Here each stream
//! is read by a command of its own (so a stream named twice is two reads,
//! and each reply and error is known to be its stream's):
//!
//! 1. `XREADGROUP` is first checked stream by stream without delivering
//!    an entry (see [`StreamRead::check`]): Redis checks the options, the
//!    type, the group and the ID. The first error in the client's order is
//!    the reply, and nothing was delivered.
//! 2. Every stream is read with the client's options, per slot inside one
//!    `MULTI`/`EXEC` (where `BLOCK` does not block but its value is
//!    checked), all slots at once; for `XREAD … BLOCK` each `$` is read in
//!    the same transaction as its stream's last ID (`0-0` for none), so no
//!    entry added later is missed. `XREAD`'s first error in the client's
//!    order is the reply; otherwise the streams that had entries, in the
//!    client's order; nil when none had.
//! 3. With `BLOCK`, as for the blocking pops (`pop_across.rs`): the first
//!    stream's read blocks for at most [`ROUND`] (100 ms) on the client's
//!    blocking connection (an entry added there wakes it at once), then each other
//!    stream is read once, until one has entries (the reply is that one
//!    stream, as when one server wakes a client) or the timeout passes. A
//!    stream that became another type keeps an `XREAD` waiting; for
//!    `XREADGROUP` it, or a deleted stream, answers `UNBLOCKED`, and a
//!    destroyed group `NOGROUP`, in Redis's words for a blocked client.
//!
//! What differs from one server: the reads are not one atomic step; an
//! `XREADGROUP` whose check passed but whose read of one stream then fails
//! (the group destroyed in between) answers the other streams' entries, so
//! none is lost; entries added to a stream other than the first while
//! waiting are found within [`ROUND`]; a stream deleted and made again
//! between two reads is not seen as deleted; the check creates the
//! consumer even when a later stream's check fails.
//!
//! [`ROUND`]: super::pop_across::ROUND

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;

use super::pop_across::Rounds;
use super::{Router, err, nil_array};
use crate::blocking::BlockingCell;
use crate::commands::Kind;
use crate::resp::{self, Frame};
use crate::slot;
use crate::upstream::Proto;

/// The ID before the greatest: no pending entry lies past it. (The greatest
/// itself is how Redis stores `>`, and past it a read would wrap to `0-0`.)
const PAST_ALL: &[u8] = b"18446744073709551615-18446744073709551614";

/// A stream read whose streams span slots.
#[derive(Debug)]
pub(super) struct StreamRead {
    name: Bytes,
    group: bool,
    /// The client's options as given, `BLOCK` too.
    options: Vec<Bytes>,
    /// The options without `BLOCK` and its value.
    waiting: Vec<Bytes>,
    /// In the client's order.
    streams: Vec<Stream>,
}

#[derive(Debug, Clone)]
struct Stream {
    key: Bytes,
    id: Bytes,
    slot: u16,
}

/// What one stream's read answered.
enum Got {
    Nil,
    /// The stream's name and entries, as Redis sent them.
    Entries(Frame, Frame),
    Error(Bytes),
}

/// One step of the wait.
enum Waited {
    Reply(Bytes),
    /// The stream is of another type: an `XREAD` waits on.
    NotReady,
    Nothing,
}

impl StreamRead {
    /// The read of `args` (an `XREAD`, or an `XREADGROUP` when `group`),
    /// whose streams are at `keys` (as [`crate::commands::key_indices`]
    /// finds them: right after `STREAMS`, one ID each after them).
    pub(super) fn of(group: bool, args: &[Bytes], keys: &[usize]) -> Option<StreamRead> {
        let (&first, &last) = (keys.first()?, keys.last()?);
        let ids = args.get(last + 1..)?;
        if first < 2 || ids.len() != keys.len() || last + 1 - first != keys.len() {
            return None;
        }
        let options = args[1..first - 1].to_vec();
        // Word by word as Redis reads them (a group named `block` is a
        // group); the first try checks them, so later tries may trust them.
        let (mut waiting, mut i) = (Vec::new(), 0);
        while i < options.len() {
            let word = &options[i];
            let takes = if word.eq_ignore_ascii_case(b"group") {
                3
            } else if word.eq_ignore_ascii_case(b"count") || word.eq_ignore_ascii_case(b"block") {
                2
            } else {
                1
            };
            let end = (i + takes).min(options.len());
            if !word.eq_ignore_ascii_case(b"block") {
                waiting.extend(options[i..end].iter().cloned());
            }
            i = end;
        }
        let streams = keys
            .iter()
            .zip(ids)
            .map(|(&k, id)| Stream {
                key: args[k].clone(),
                id: id.clone(),
                slot: slot::slot(&args[k]),
            })
            .collect();
        Some(StreamRead {
            name: args[0].clone(),
            group,
            options,
            waiting,
            streams,
        })
    }

    /// The read of one stream: `options`, then `more`, then the stream.
    fn command(&self, options: &[Bytes], more: &[Bytes], key: &Bytes, id: &Bytes) -> Vec<Bytes> {
        let mut cmd = Vec::with_capacity(options.len() + more.len() + 4);
        cmd.push(self.name.clone());
        cmd.extend(options.iter().cloned());
        cmd.extend(more.iter().cloned());
        cmd.extend([Bytes::from_static(b"STREAMS"), key.clone(), id.clone()]);
        cmd
    }

    /// The commands that check a stream as `XREADGROUP` does, without
    /// delivering an entry: the client's options on the consumer's pending
    /// entries past [`PAST_ALL`] (none: no entry's delivery count moves),
    /// which checks the options, the type and the group; then its ID, as
    /// `XREADGROUP` reads a `$` (an error, before it reads anything) and as
    /// `XREAD` reads any other (the same parser).
    fn check(&self, s: &Stream) -> Vec<Vec<Bytes>> {
        let mut cmds = vec![self.command(&self.options, &[], &s.key, &Bytes::from_static(PAST_ALL))];
        match s.id.as_ref() {
            b">" => {}
            b"$" => cmds.push(self.command(&self.options, &[], &s.key, &s.id)),
            _ => {
                let xread = [
                    Bytes::from_static(b"XREAD"),
                    Bytes::from_static(b"COUNT"),
                    Bytes::from_static(b"1"),
                ];
                cmds.push(
                    [
                        &xread[..],
                        &[Bytes::from_static(b"STREAMS"), s.key.clone(), s.id.clone()],
                    ]
                    .concat(),
                );
            }
        }
        cmds
    }

    /// The slots, in the order their first stream is named, each with its
    /// streams' indices.
    fn by_slot(&self) -> Vec<(u16, Vec<usize>)> {
        let mut slots: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            match slots.iter_mut().find(|(slot, _)| *slot == s.slot) {
                Some((_, of)) => of.push(i),
                None => slots.push((s.slot, vec![i])),
            }
        }
        slots
    }
}

/// One stream's read reply.
fn got(reply: Bytes) -> Got {
    let pair = match resp::parse(&reply) {
        Ok(Frame::NullArray | Frame::Null | Frame::NullBulk) => return Got::Nil,
        Ok(Frame::Error(_) | Frame::BulkError(_)) => return Got::Error(reply),
        Ok(Frame::Array(mut items)) if items.len() == 1 => match items.pop() {
            Some(Frame::Array(kv)) if kv.len() == 2 => {
                let mut kv = kv.into_iter();
                kv.next().zip(kv.next())
            }
            _ => None,
        },
        Ok(Frame::Map(mut pairs)) if pairs.len() == 1 => pairs.pop(),
        _ => None,
    };
    match pair {
        Some((name, entries)) => Got::Entries(name, entries),
        None => Got::Error(err("ERR cachetier: unexpected reply to a stream read")),
    }
}

/// The replies in an `EXEC` reply, or its error for each of `n` commands.
fn exec_replies(exec: Bytes, n: usize) -> Vec<Bytes> {
    match resp::parse(&exec) {
        Ok(Frame::Array(items)) if items.len() == n => items.iter().map(Frame::to_bytes).collect(),
        Ok(Frame::Error(_) | Frame::BulkError(_)) => vec![exec; n],
        _ => vec![err("ERR cachetier: unexpected reply to a stream read's EXEC"); n],
    }
}

/// The last ID in an `XREVRANGE … COUNT 1` reply; `0-0` for none.
fn last_id(reply: &Bytes) -> Option<Bytes> {
    match resp::parse(reply).ok()? {
        Frame::Array(entries) => match entries.first() {
            None => Some(Bytes::from_static(b"0-0")),
            Some(Frame::Array(entry)) => match entry.first()? {
                Frame::Bulk(id) => Some(id.clone()),
                _ => None,
            },
            Some(_) => None,
        },
        _ => None,
    }
}

/// One reply of the streams that had entries, as Redis merges them.
fn merge(entries: Vec<(Frame, Frame)>, up: Proto) -> Bytes {
    if entries.is_empty() {
        return nil_array(up);
    }
    let frame = if up == Proto::Resp3 {
        Frame::Map(entries)
    } else {
        Frame::Array(
            entries
                .into_iter()
                .map(|(k, v)| Frame::Array(vec![k, v]))
                .collect(),
        )
    };
    frame.to_bytes()
}

fn unblocked() -> Bytes {
    err("UNBLOCKED the stream key no longer exists")
}

impl Router {
    /// Run `read`; `block` is the client's `BLOCK` (`None`: not blocking;
    /// `Some(None)`: for ever).
    pub(super) async fn xread_across_slots(
        self: &Arc<Self>,
        mut read: StreamRead,
        block: Option<Option<Duration>>,
        cell: &BlockingCell,
        up: Proto,
    ) -> Bytes {
        self.metrics.stream_reads_across_slots.inc();
        if read.group
            && let Some(e) = self.check_groups(&read, up).await
        {
            return e;
        }
        let resolve = !read.group && block.is_some();
        let (mut entries, mut errors) = (Vec::new(), Vec::new());
        for (i, got) in self.first_read(&mut read, resolve, up).await {
            match got {
                Got::Nil => {}
                Got::Entries(name, list) => entries.push((i, name, list)),
                Got::Error(e) => errors.push((i, e)),
            }
        }
        entries.sort_by_key(|(i, _, _)| *i);
        // XREAD's reads take nothing: its first error is the answer, as
        // one server's checks come before its reads. XREADGROUP's check
        // passed: what it read is not dropped.
        if (!read.group || entries.is_empty())
            && let Some((_, e)) = errors.into_iter().min_by_key(|(i, _)| *i)
        {
            return e;
        }
        if !entries.is_empty() {
            return merge(entries.into_iter().map(|(_, k, v)| (k, v)).collect(), up);
        }
        match block {
            Some(block) => self.wait_streams(&read, block, cell, up).await,
            None => nil_array(up),
        }
    }

    /// Check each stream of an `XREADGROUP` without taking entries: the
    /// first error in the client's order.
    async fn check_groups(self: &Arc<Self>, read: &StreamRead, up: Proto) -> Option<Bytes> {
        let slots = read.by_slot();
        let runs = slots.iter().map(|(slot, of)| {
            // Each command with its stream's index.
            let (owners, cmds): (Vec<usize>, Vec<Vec<Bytes>>) = of
                .iter()
                .flat_map(|&i| read.check(&read.streams[i]).into_iter().map(move |c| (i, c)))
                .unzip();
            async move {
                let replies = exec_replies(self.exec_block(&cmds, Some(*slot), up).await, cmds.len());
                owners.into_iter().zip(replies)
            }
        });
        let mut errors: Vec<(usize, Bytes)> = Vec::new();
        for (i, reply) in join_all(runs).await.into_iter().flatten() {
            if reply.starts_with(b"-") || reply.starts_with(b"!") {
                errors.push((i, reply));
            }
        }
        errors.into_iter().min_by_key(|(i, _)| *i).map(|(_, e)| e)
    }

    /// Read every stream once, per slot in one transaction, all slots at
    /// once: each stream's index and reply. `resolve`: read each `$` as its
    /// stream's last ID too, for the wait.
    async fn first_read(
        self: &Arc<Self>,
        read: &mut StreamRead,
        resolve: bool,
        up: Proto,
    ) -> Vec<(usize, Got)> {
        let slots = read.by_slot();
        let snapshot: &StreamRead = read;
        let runs = slots.iter().map(|(slot, of)| {
            let mut cmds = Vec::with_capacity(of.len() * 2);
            for &i in of {
                let s = &snapshot.streams[i];
                if resolve && s.id.as_ref() == b"$" {
                    let word = |w: &'static [u8]| Bytes::from_static(w);
                    cmds.push(vec![
                        word(b"XREVRANGE"),
                        s.key.clone(),
                        word(b"+"),
                        word(b"-"),
                        word(b"COUNT"),
                        word(b"1"),
                    ]);
                }
                cmds.push(snapshot.command(&snapshot.options, &[], &s.key, &s.id));
            }
            async move { exec_replies(self.exec_block(&cmds, Some(*slot), up).await, cmds.len()) }
        });
        let mut out = Vec::with_capacity(read.streams.len());
        let mut resolved = Vec::new();
        for ((_, of), replies) in slots.iter().zip(join_all(runs).await) {
            let mut replies = replies.into_iter();
            for &i in of {
                if resolve && read.streams[i].id.as_ref() == b"$" {
                    let last = replies.next().as_ref().and_then(last_id);
                    resolved.push((i, last));
                }
                out.push((i, got(replies.next().unwrap_or_default())));
            }
        }
        for (i, last) in resolved {
            match last {
                Some(id) => read.streams[i].id = id,
                // Its read failed too (another type), and that error is
                // the reply.
                None => out.push((
                    i,
                    Got::Error(err("ERR cachetier: could not read a stream's last ID")),
                )),
            }
        }
        out
    }

    /// Wait for an entry past each stream's ID, until `block` passes.
    async fn wait_streams(
        self: &Arc<Self>,
        read: &StreamRead,
        block: Option<Duration>,
        cell: &BlockingCell,
        up: Proto,
    ) -> Bytes {
        let Some((first, rest)) = read.streams.split_first() else {
            return nil_array(up);
        };
        let kind = if read.group { Kind::Write } else { Kind::Read };
        let rounds = Rounds::new(block);
        loop {
            let Some(wait) = rounds.next() else {
                return nil_array(up);
            };
            let ms = Bytes::from(wait.as_millis().max(1).to_string());
            let more = [Bytes::from_static(b"BLOCK"), ms];
            let cmd = resp::command_bytes(&read.command(&read.waiting, &more, &first.key, &first.id));
            let reply = self.blocking(cell, first.slot, cmd, Some(wait), up).await;
            match self.waited(read, first, reply, up).await {
                Waited::Reply(r) => return r,
                Waited::NotReady => tokio::time::sleep(wait).await,
                Waited::Nothing => {}
            }
            for s in rest {
                let cmd = resp::command_bytes(&read.command(&read.waiting, &[], &s.key, &s.id));
                let reply = self.single_via(s.slot, kind, true, cmd, up, None).await;
                if let Waited::Reply(r) = self.waited(read, s, reply, up).await {
                    return r;
                }
            }
        }
    }

    /// What one read while waiting means for the client.
    async fn waited(self: &Arc<Self>, read: &StreamRead, s: &Stream, reply: Bytes, up: Proto) -> Waited {
        let e = match got(reply.clone()) {
            Got::Nil => return Waited::Nothing,
            Got::Entries(..) => return Waited::Reply(reply),
            Got::Error(e) => e,
        };
        let wrong_type = e.starts_with(b"-WRONGTYPE");
        if !read.group {
            return if wrong_type {
                Waited::NotReady
            } else {
                Waited::Reply(e)
            };
        }
        if wrong_type {
            return Waited::Reply(unblocked());
        }
        if !e.starts_with(b"-NOGROUP No such key") {
            return Waited::Reply(e);
        }
        // The stream or its group went while the client waited.
        let cmd = resp::command_bytes(&[&b"EXISTS"[..], &s.key]);
        match &self.single_via(s.slot, Kind::Read, true, cmd, up, None).await[..] {
            b":0\r\n" => Waited::Reply(unblocked()),
            b":1\r\n" => Waited::Reply(err(
                "NOGROUP the consumer group this client was blocked on no longer exists",
            )),
            _ => Waited::Reply(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::args;

    fn text(cmd: Vec<Bytes>) -> String {
        cmd.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn each_stream_is_read_alone_with_the_clients_options() {
        let a = args(&[
            "XREADGROUP",
            "GROUP",
            "block",
            "c",
            "BLOCK",
            "0",
            "NOACK",
            "STREAMS",
            "s1",
            "s2",
            "s1",
            ">",
            "0",
            ">",
        ]);
        let read = StreamRead::of(true, &a, &[8, 9, 10]).expect("a read");
        assert_eq!(text(read.waiting.clone()), "GROUP block c NOACK");
        let s = &read.streams;
        assert_eq!(
            text(read.command(&read.options, &[], &s[1].key, &s[1].id)),
            "XREADGROUP GROUP block c BLOCK 0 NOACK STREAMS s2 0"
        );
        // The check delivers nothing: no new entry, no pending one again.
        let check = |s: &Stream| read.check(s).into_iter().map(text).collect::<Vec<_>>();
        let past =
            "XREADGROUP GROUP block c BLOCK 0 NOACK STREAMS s1 18446744073709551615-18446744073709551614";
        assert_eq!(check(&s[0]), [past]);
        assert_eq!(check(&s[2]), [past]);
        assert_eq!(
            check(&s[1]),
            [past.replace("s1", "s2"), "XREAD COUNT 1 STREAMS s2 0".to_string()]
        );
        let (s1, s2) = (slot::slot(b"s1"), slot::slot(b"s2"));
        assert_ne!(s1, s2);
        assert_eq!(read.by_slot(), [(s1, vec![0, 2]), (s2, vec![1])]);
        let d = args(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s1", "s2", "$", ">"]);
        let read = StreamRead::of(true, &d, &[5, 6]).expect("a read");
        assert_eq!(
            read.check(&read.streams[0])
                .into_iter()
                .map(text)
                .collect::<Vec<_>>(),
            [
                "XREADGROUP GROUP g c STREAMS s1 18446744073709551615-18446744073709551614",
                "XREADGROUP GROUP g c STREAMS s1 $"
            ]
        );
    }

    #[test]
    fn a_reply_names_its_stream_and_entries() {
        let r2 = Bytes::from_static(b"*1\r\n*2\r\n$1\r\ns\r\n*0\r\n");
        let r3 = Bytes::from_static(b"%1\r\n$1\r\ns\r\n*0\r\n");
        for r in [r2, r3] {
            let Got::Entries(name, entries) = got(r) else {
                panic!("entries expected");
            };
            assert_eq!(
                (name, entries),
                (Frame::Bulk(Bytes::from_static(b"s")), Frame::Array(vec![]))
            );
        }
        assert!(matches!(got(Bytes::from_static(b"*-1\r\n")), Got::Nil));
        assert!(matches!(
            got(Bytes::from_static(b"-WRONGTYPE x\r\n")),
            Got::Error(_)
        ));
        assert!(matches!(
            got(Bytes::from_static(b"*2\r\n*0\r\n*0\r\n")),
            Got::Error(_)
        ));
    }

    #[test]
    fn entries_merge_as_redis_replies_them() {
        let e = |n: &'static [u8]| (Frame::Bulk(Bytes::from_static(n)), Frame::Array(vec![]));
        assert_eq!(
            &merge(vec![e(b"s1"), e(b"s1")], Proto::Resp2)[..],
            b"*2\r\n*2\r\n$2\r\ns1\r\n*0\r\n*2\r\n$2\r\ns1\r\n*0\r\n"
        );
        assert_eq!(
            &merge(vec![e(b"s2")], Proto::Resp3)[..],
            b"%1\r\n$2\r\ns2\r\n*0\r\n"
        );
        assert_eq!(&merge(vec![], Proto::Resp2)[..], b"*-1\r\n");
        assert_eq!(&merge(vec![], Proto::Resp3)[..], b"_\r\n");
    }

    #[test]
    fn the_last_id_is_the_newest_entrys_or_zero() {
        let one = Bytes::from_static(b"*1\r\n*2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
        assert_eq!(last_id(&one), Some(Bytes::from_static(b"5-1")));
        assert_eq!(
            last_id(&Bytes::from_static(b"*0\r\n")),
            Some(Bytes::from_static(b"0-0"))
        );
        assert_eq!(last_id(&Bytes::from_static(b"-WRONGTYPE x\r\n")), None);
    }
}
