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
//!    an entry: quietly where the options are plain
//!    ([`StreamRead::quiet_check`]: its group, the node's writes, its ID),
//!    else, or when one of those is wrong, by a probe Redis refuses in its
//!    own words ([`StreamRead::check`]). The first error in the client's
//!    order is the reply, and nothing was delivered.
//! 2. Every stream is read with the client's options, per slot inside one
//!    `MULTI`/`EXEC` (where `BLOCK` does not block but its value is
//!    checked), all slots at once; for `XREAD … BLOCK` each `$` is read in
//!    the same transaction as its stream's last generated ID (`XINFO
//!    STREAM`; `0-0` for none), so no
//!    entry added later is missed. `XREAD`'s first error in the client's
//!    order is the reply; otherwise the streams that had entries, in the
//!    client's order; nil when none had.
//! 3. With `BLOCK`, as for the blocking pops (`pop_across.rs`): the first
//!    stream's read blocks for at most [`ROUND`] (100 ms) on the client's
//!    blocking connection (an entry added there wakes it at once), then
//!    each other stream is read once, until one has entries (the reply is
//!    that one stream, with at most [`WOKEN_COUNT`] entries unless the
//!    client's `COUNT` says, as when one server wakes a client; a stream
//!    named twice waits from its first ID) or the timeout passes. A
//!    stream that became another type keeps an `XREAD` waiting; for
//!    `XREADGROUP` it, or a deleted stream, answers `UNBLOCKED`, and a
//!    destroyed group `NOGROUP`, in Redis's words for a blocked client.
//!
//! What differs from one server: the reads are not one atomic step; an
//! `XREADGROUP` whose check passed but whose read of one stream then fails
//! (the group destroyed in between) answers the other streams' entries, so
//! none is lost; entries added to a stream other than the first while
//! waiting are found within a round ([`ROUND`], and up to twice that: Redis
//! ends a short `BLOCK` on its 10 Hz timer); a stream deleted and made
//! again between two reads is not seen as deleted; an `XGROUP SETID` that
//! moves a group back while the client waits hands it those entries at the
//! next round, where one server waits for the next entry added.
//!
//! [`ROUND`]: super::pop_across::ROUND
//! [`WOKEN_COUNT`]: super::stream_read::WOKEN_COUNT

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;

use super::pop_across::Rounds;
use super::stream_read::{Got, Stream, StreamRead, check_error, exec_replies, got, last_generated, merge};
use super::{Router, err, nil_array};
use crate::blocking::BlockingCell;
use crate::commands::Kind;
use crate::resp;
use crate::upstream::Proto;

/// One step of the wait.
enum Waited {
    Reply(Bytes),
    /// The stream is of another type: an `XREAD` waits on.
    NotReady,
    Nothing,
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
        for got in self.first_read(&mut read, resolve, up).await {
            match got {
                Got::Nil => {}
                Got::Entries(name, list) => entries.push((name, list)),
                Got::Error(e) => errors.push(e),
            }
        }
        // XREAD's reads take nothing: its first error is the answer, as
        // one server's checks come before its reads. XREADGROUP's check
        // passed: what it read is not dropped.
        if (!read.group || entries.is_empty())
            && let Some(e) = errors.into_iter().next()
        {
            return e;
        }
        if !entries.is_empty() {
            return merge(entries, up);
        }
        match block {
            Some(block) => self.wait_streams(&read, block, cell, up).await,
            None => nil_array(up),
        }
    }

    /// Check each stream of an `XREADGROUP` without taking entries: the
    /// first error in the client's order. Quietly where it can (no error
    /// reply on a node unless the read would get one), then with the probe
    /// for the streams that need Redis's words.
    async fn check_groups(self: &Arc<Self>, read: &StreamRead, up: Proto) -> Option<Bytes> {
        let all: Vec<usize> = (0..read.streams.len()).collect();
        let quiet = |s: &Stream| read.quiet_check(s).unwrap_or_else(|| read.check(s));
        let replies = self.per_stream(read, &all, quiet, up).await;
        // Per stream: Some(its error or none), or None for the probe to say.
        let mut verdicts: Vec<Option<Option<Bytes>>> = Vec::with_capacity(all.len());
        for (s, replies) in read.streams.iter().zip(replies) {
            verdicts.push(if read.is_quiet(s) {
                StreamRead::quiet_verdict(&replies).ok()
            } else {
                Some(check_error(s, replies))
            });
        }
        // Only the streams before the first error found need the probe.
        let first_error = verdicts.iter().position(|v| matches!(v, Some(Some(_))));
        let probed: Vec<usize> = all[..first_error.unwrap_or(all.len())]
            .iter()
            .copied()
            .filter(|&i| verdicts[i].is_none())
            .collect();
        if !probed.is_empty() {
            let replies = self.per_stream(read, &probed, |s| read.check(s), up).await;
            for &i in &probed {
                verdicts[i] = Some(check_error(&read.streams[i], replies[i].clone()));
            }
        }
        verdicts.into_iter().flatten().flatten().next()
    }

    /// Run `cmds` of the streams `which`, per slot in one transaction, all
    /// slots at once: the replies of each stream's commands, by its index.
    async fn per_stream(
        self: &Arc<Self>,
        read: &StreamRead,
        which: &[usize],
        cmds: impl Fn(&Stream) -> Vec<Vec<Bytes>>,
        up: Proto,
    ) -> Vec<Vec<Bytes>> {
        let slots = read.by_slot();
        let of_stream = &cmds;
        let runs = slots.iter().map(|(slot, of)| {
            // Each command with its stream's index.
            let (owners, cmds): (Vec<usize>, Vec<Vec<Bytes>>) = of
                .iter()
                .filter(|i| which.contains(i))
                .flat_map(|&i| of_stream(&read.streams[i]).into_iter().map(move |c| (i, c)))
                .unzip();
            async move {
                if cmds.is_empty() {
                    return Vec::new();
                }
                let replies = exec_replies(self.exec_block(&cmds, Some(*slot), up).await, cmds.len());
                owners.into_iter().zip(replies).collect()
            }
        });
        let mut per_stream = vec![Vec::new(); read.streams.len()];
        for (i, reply) in join_all(runs).await.into_iter().flatten() {
            per_stream[i].push(reply);
        }
        per_stream
    }

    /// Read every stream once, per slot in one transaction, all slots at
    /// once: each stream's reply, in the client's order. `resolve`: read
    /// each `$` as its stream's last ID too, for the wait.
    async fn first_read(self: &Arc<Self>, read: &mut StreamRead, resolve: bool, up: Proto) -> Vec<Got> {
        let all: Vec<usize> = (0..read.streams.len()).collect();
        let resolving = |s: &Stream| resolve && s.id.as_ref() == b"$";
        let reads = |s: &Stream| {
            let mut cmds = Vec::with_capacity(2);
            if resolving(s) {
                let info = [Bytes::from_static(b"XINFO"), Bytes::from_static(b"STREAM")];
                cmds.push(vec![info[0].clone(), info[1].clone(), s.key.clone()]);
            }
            cmds.push(read.command(&read.options, &[], &s.key, &s.id));
            cmds
        };
        let replies = self.per_stream(read, &all, reads, up).await;
        let mut out = Vec::with_capacity(replies.len());
        for (i, mut replies) in replies.into_iter().enumerate() {
            // The read is the last command of its stream.
            let mut reply = got(replies.pop().unwrap_or_default());
            if resolving(&read.streams[i]) {
                match replies.first().and_then(last_generated) {
                    Some(id) => read.streams[i].id = id,
                    // Its read failed too (another type), and that error
                    // is the reply.
                    None if !matches!(reply, Got::Error(_)) => {
                        reply = Got::Error(err("ERR cachetier: could not read a stream's last ID"))
                    }
                    None => {}
                }
            }
            out.push(reply);
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
        // A stream named twice waits from its first ID, as on one server.
        let mut waits: Vec<&Stream> = Vec::with_capacity(read.streams.len());
        for s in &read.streams {
            if !waits.iter().any(|w| w.key == s.key) {
                waits.push(s);
            }
        }
        let Some((first, rest)) = waits.split_first() else {
            return nil_array(up);
        };
        let kind = if read.group { Kind::Write } else { Kind::Read };
        let rounds = Rounds::new(block);
        loop {
            let Some(wait) = rounds.next() else {
                return nil_array(up);
            };
            let cmd = read.waiting_read(first, Some(wait));
            let reply = self.blocking(cell, first.slot, cmd, Some(wait), up).await;
            match self.waited(read, first, reply, up).await {
                Waited::Reply(r) => return r,
                Waited::NotReady => tokio::time::sleep(wait).await,
                Waited::Nothing => {}
            }
            for s in rest {
                let cmd = read.waiting_read(s, None);
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
