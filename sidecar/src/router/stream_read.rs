//! What a stream read over several slots sends and how it reads the
//! replies (`stream_across.rs` runs it): the client's `XREAD`/`XREADGROUP`
//! taken apart into one command per stream, the checks that read nothing,
//! and the replies merged back as one server gives them.

use std::time::Duration;

use bytes::Bytes;

use super::{err, nil_array};
use crate::resp::{self, Frame};
use crate::slot;
use crate::upstream::Proto;

/// How `XREADGROUP` refuses a `$`: after the options, the type and the
/// group are checked, before anything is read.
const DOLLAR_REFUSED: &[u8] = b"-ERR The $ ID is meaningless";

/// How many entries per stream Redis hands a client it wakes, when the
/// client named no positive `COUNT` (`XREAD_BLOCKED_DEFAULT_COUNT`).
pub(super) const WOKEN_COUNT: i64 = 1000;

/// A stream read whose streams span slots.
#[derive(Debug)]
pub(super) struct StreamRead {
    pub(super) name: Bytes,
    pub(super) group: bool,
    /// The client's options as given, `BLOCK` too.
    pub(super) options: Vec<Bytes>,
    /// The options without `BLOCK`, `COUNT` and their values.
    pub(super) waiting: Vec<Bytes>,
    /// The `COUNT` of a read while waiting: the client's, or
    /// [`WOKEN_COUNT`].
    pub(super) wait_count: Bytes,
    /// In the client's order.
    pub(super) streams: Vec<Stream>,
    /// An `XREADGROUP`'s group when Redis surely takes its options (see
    /// [`plain_group`]).
    plain_group: Option<Bytes>,
}

#[derive(Debug, Clone)]
pub(super) struct Stream {
    pub(super) key: Bytes,
    pub(super) id: Bytes,
    pub(super) slot: u16,
}

/// What one stream's read answered.
pub(super) enum Got {
    Nil,
    /// The stream's name and entries, as Redis sent them.
    Entries(Frame, Frame),
    Error(Bytes),
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
        let (mut waiting, mut count, mut i) = (Vec::new(), None, 0);
        while i < options.len() {
            let word = &options[i];
            let (count_word, block_word) = (
                word.eq_ignore_ascii_case(b"count"),
                word.eq_ignore_ascii_case(b"block"),
            );
            let takes = if word.eq_ignore_ascii_case(b"group") {
                3
            } else if count_word || block_word {
                2
            } else {
                1
            };
            let end = (i + takes).min(options.len());
            if count_word {
                count = options.get(i + 1).and_then(|c| resp::int_arg(c));
            } else if !block_word {
                waiting.extend(options[i..end].iter().cloned());
            }
            i = end;
        }
        let wait_count = Bytes::from(count.filter(|&c| c > 0).unwrap_or(WOKEN_COUNT).to_string());
        let streams = keys
            .iter()
            .zip(ids)
            .map(|(&k, id)| Stream {
                key: args[k].clone(),
                id: id.clone(),
                slot: slot::slot(&args[k]),
            })
            .collect();
        let plain_group = if group { plain_group(&options) } else { None };
        Some(StreamRead {
            name: args[0].clone(),
            group,
            options,
            waiting,
            wait_count,
            streams,
            plain_group,
        })
    }

    /// The read of one stream: `options`, then `more`, then the stream.
    pub(super) fn command(&self, options: &[Bytes], more: &[Bytes], key: &Bytes, id: &Bytes) -> Vec<Bytes> {
        let mut cmd = Vec::with_capacity(options.len() + more.len() + 4);
        cmd.push(self.name.clone());
        cmd.extend(options.iter().cloned());
        cmd.extend(more.iter().cloned());
        cmd.extend([Bytes::from_static(b"STREAMS"), key.clone(), id.clone()]);
        cmd
    }

    /// The commands that check a stream as `XREADGROUP` does, without
    /// delivering an entry or creating a consumer: the client's options
    /// with a `$` for the stream, which Redis refuses after it checked the
    /// options, the type and the group (its own errors if one fails); then
    /// an ID other than `>` or `$` as `XREAD` reads it (the same parser).
    pub(super) fn check(&self, s: &Stream) -> Vec<Vec<Bytes>> {
        // Named as often as XREADGROUP's arity needs (7 words), so that a
        // call without GROUP gets Redis's "Missing GROUP option".
        let times = (7usize.saturating_sub(self.options.len() + 2)).div_ceil(2).max(1);
        let mut probe = vec![self.name.clone()];
        probe.extend(self.options.iter().cloned());
        probe.push(Bytes::from_static(b"STREAMS"));
        probe.extend(std::iter::repeat_n(s.key.clone(), times));
        probe.extend(std::iter::repeat_n(Bytes::from_static(b"$"), times));
        let mut cmds = vec![probe];
        if s.id.as_ref() != b"$" {
            cmds.extend(id_check(s));
        }
        cmds
    }

    /// Whether stream `s` is checked by [`Self::quiet_check`].
    pub(super) fn is_quiet(&self, s: &Stream) -> bool {
        self.plain_group.is_some() && s.id.as_ref() != b"$"
    }

    /// The commands that check a stream without an error reply when
    /// nothing is wrong (a consumer polling in a loop would otherwise show
    /// as a steady error rate on the nodes), each of constant cost: the
    /// group (`XPENDING … - + 0`: nothing listed), the node taking writes
    /// as `XREADGROUP` needs (`XACK … 0-0`: a write that acknowledges
    /// nothing and is not replicated), and an ID other than `>` as `XREAD`
    /// reads it. `None` when the options or the ID need [`Self::check`]'s
    /// probe.
    pub(super) fn quiet_check(&self, s: &Stream) -> Option<Vec<Vec<Bytes>>> {
        let group = self.plain_group.as_ref().filter(|_| self.is_quiet(s))?;
        let word = Bytes::from_static;
        let (key, group) = (s.key.clone(), group.clone());
        let mut cmds = vec![
            vec![
                word(b"XPENDING"),
                key.clone(),
                group.clone(),
                word(b"-"),
                word(b"+"),
                word(b"0"),
            ],
            vec![word(b"XACK"), key, group, word(b"0-0")],
        ];
        cmds.extend(id_check(s));
        Some(cmds)
    }

    /// What the replies to [`Self::quiet_check`] say: `Ok(None)` Redis
    /// would read the stream, `Ok(Some)` its error (the ID's); `Err` when
    /// the stream, its group or the node's writes are not as they should
    /// be, for the probe to word.
    pub(super) fn quiet_verdict(replies: &[Bytes]) -> Result<Option<Bytes>, ()> {
        match replies {
            [pending, ack, id @ ..] if !is_error(pending) && !is_error(ack) => {
                Ok(id.first().filter(|r| is_error(r)).cloned())
            }
            _ => Err(()),
        }
    }

    /// The read of one stream while waiting: with [`Self::wait_count`]
    /// and, when given, `BLOCK ms`.
    pub(super) fn waiting_read(&self, s: &Stream, block: Option<Duration>) -> Bytes {
        let mut more = vec![Bytes::from_static(b"COUNT"), self.wait_count.clone()];
        if let Some(wait) = block {
            more.push(Bytes::from_static(b"BLOCK"));
            more.push(Bytes::from(wait.as_millis().max(1).to_string()));
        }
        resp::command_bytes(&self.command(&self.waiting, &more, &s.key, &s.id))
    }

    /// The slots, in the order their first stream is named, each with its
    /// streams' indices.
    pub(super) fn by_slot(&self) -> Vec<(u16, Vec<usize>)> {
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

/// The command that checks stream `s`'s ID as `XREADGROUP` reads one (the
/// same parser as `XREAD`'s), reading at most one entry; none for `>`
/// (and a `$` is the caller's to judge).
fn id_check(s: &Stream) -> Option<Vec<Bytes>> {
    let word = Bytes::from_static;
    (s.id.as_ref() != b">").then(|| {
        vec![
            word(b"XREAD"),
            word(b"COUNT"),
            word(b"1"),
            word(b"STREAMS"),
            s.key.clone(),
            s.id.clone(),
        ]
    })
}

/// One stream's read reply.
pub(super) fn got(reply: Bytes) -> Got {
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
pub(super) fn exec_replies(exec: Bytes, n: usize) -> Vec<Bytes> {
    match resp::parse(&exec) {
        Ok(Frame::Array(items)) if items.len() == n => items.iter().map(Frame::to_bytes).collect(),
        // A command refused as it was queued (a node that takes no writes:
        // NOREPLICAS, MISCONF) answers its own error, as outside MULTI.
        Ok(Frame::Error(_) | Frame::BulkError(_)) => vec![super::pop_across::queued_error(exec); n],
        _ => vec![err("ERR cachetier: unexpected reply to a stream read's EXEC"); n],
    }
}

/// The group of XREADGROUP `options` that Redis surely takes (a `GROUP`
/// with both names, integer `COUNT`s, `BLOCK`s not negative, `NOACK`, and
/// nothing else; the last `GROUP` counts), else `None`.
fn plain_group(options: &[Bytes]) -> Option<Bytes> {
    let (mut i, mut group) = (0, None);
    let integer = |at: usize| options.get(at).and_then(|v| resp::int_arg(v));
    while i < options.len() {
        let word = &options[i];
        if word.eq_ignore_ascii_case(b"group") && i + 2 < options.len() {
            group = Some(options[i + 1].clone());
            i += 3;
        // BLOCK up to 2^62 ms: Redis 7.0 takes any, 7.2 refuses ones that
        // overflow when added to the time.
        } else if (word.eq_ignore_ascii_case(b"count") && integer(i + 1).is_some())
            || (word.eq_ignore_ascii_case(b"block")
                && integer(i + 1).is_some_and(|b| (0..1 << 62).contains(&b)))
        {
            i += 2;
        } else if word.eq_ignore_ascii_case(b"noack") {
            i += 1;
        } else {
            return None;
        }
    }
    group
}

fn is_error(reply: &[u8]) -> bool {
    reply.starts_with(b"-") || reply.starts_with(b"!")
}

/// What one server answers for stream `s`, from the replies to its
/// [`StreamRead::check`]; `None` when it would read it.
pub(super) fn check_error(s: &Stream, replies: Vec<Bytes>) -> Option<Bytes> {
    let mut replies = replies.into_iter();
    let probe = replies.next()?;
    if !probe.starts_with(DOLLAR_REFUSED) {
        return is_error(&probe).then_some(probe);
    }
    if s.id.as_ref() == b"$" {
        return Some(probe);
    }
    replies.next().filter(|r| is_error(r))
}

/// The stream's last generated ID (what `$` stands for) in an `XINFO
/// STREAM` reply; `0-0` for a stream that does not exist.
pub(super) fn last_generated(reply: &Bytes) -> Option<Bytes> {
    let fields = match resp::parse(reply).ok()? {
        Frame::Error(e) if e.starts_with(b"ERR no such key") => return Some(Bytes::from_static(b"0-0")),
        Frame::Map(pairs) => pairs,
        Frame::Array(items) => {
            let mut items = items.into_iter();
            std::iter::from_fn(|| items.next().zip(items.next())).collect()
        }
        _ => return None,
    };
    fields.into_iter().find_map(|(name, value)| match (name, value) {
        (Frame::Bulk(n) | Frame::Simple(n), Frame::Bulk(id) | Frame::Simple(id))
            if n.as_ref() == b"last-generated-id" =>
        {
            Some(id)
        }
        _ => None,
    })
}

/// One reply of the streams that had entries, as Redis merges them.
pub(super) fn merge(entries: Vec<(Frame, Frame)>, up: Proto) -> Bytes {
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
        // The check reads nothing: a `$` Redis refuses once it checked the
        // options, type and group; then the ID alone.
        let check = |s: &Stream| read.check(s).into_iter().map(text).collect::<Vec<_>>();
        let probe = "XREADGROUP GROUP block c BLOCK 0 NOACK STREAMS s1 $";
        assert_eq!(check(&s[0]), [probe]);
        assert_eq!(check(&s[2]), [probe]);
        assert_eq!(
            check(&s[1]),
            [
                probe.replace("s1", "s2"),
                "XREAD COUNT 1 STREAMS s2 0".to_string()
            ]
        );
        let (s1, s2) = (slot::slot(b"s1"), slot::slot(b"s2"));
        assert_ne!(s1, s2);
        assert_eq!(read.by_slot(), [(s1, vec![0, 2]), (s2, vec![1])]);
        // A wait's reads take at most 1000 entries, as Redis hands a
        // client it wakes.
        let wait = |r: &StreamRead, b| {
            String::from_utf8_lossy(&r.waiting_read(&r.streams[0], b)).replace("\r\n", " ")
        };
        assert_eq!(
            wait(&read, Some(Duration::from_millis(100))),
            "*12 $10 XREADGROUP $5 GROUP $5 block $1 c $5 NOACK $5 COUNT $4 1000 $5 BLOCK $3 100 $7 STREAMS $2 s1 $1 > "
        );
        // Without GROUP, the check still has XREADGROUP's arity.
        let g = args(&["XREADGROUP", "COUNT", "5", "STREAMS", "s1", "s2", ">", ">"]);
        let read = StreamRead::of(true, &g, &[4, 5]).expect("a read");
        assert_eq!(check_of(&read, 0), ["XREADGROUP COUNT 5 STREAMS s1 s1 $ $"]);
        assert_eq!(
            wait(&read, None),
            "*6 $10 XREADGROUP $5 COUNT $1 5 $7 STREAMS $2 s1 $1 > "
        );
        let g = args(&["XREADGROUP", "STREAMS", "s1", "s2", ">", ">"]);
        let read = StreamRead::of(true, &g, &[2, 3]).expect("a read");
        assert_eq!(check_of(&read, 0), ["XREADGROUP STREAMS s1 s1 s1 $ $ $"]);
        let c = args(&[
            "XREAD", "COUNT", "0", "COUNT", "-1", "STREAMS", "s1", "s2", "0", "0",
        ]);
        let read = StreamRead::of(false, &c, &[6, 7]).expect("a read");
        assert_eq!(
            wait(&read, None),
            "*6 $5 XREAD $5 COUNT $4 1000 $7 STREAMS $2 s1 $1 0 "
        );
    }

    #[test]
    fn a_plain_read_is_checked_by_its_groups() {
        let plain = |words: &[&str]| plain_group(&args(words));
        let g = Some(Bytes::from_static(b"g"));
        assert_eq!(
            plain(&["GROUP", "g", "c", "COUNT", "-1", "BLOCK", "0", "noack"]),
            g
        );
        assert_eq!(plain(&["GROUP", "x", "c", "group", "g", "c"]), g);
        for bad in [
            &["COUNT", "1"][..],
            &["GROUP", "g", "c", "BLOCK", "-1"],
            &["GROUP", "g", "c", "COUNT", "01"],
            &["GROUP", "g", "c", "FOO"],
            &["GROUP", "g"],
        ] {
            assert_eq!(plain(bad), None, "{bad:?}");
        }
        let a = args(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s1", "s2", ">", "0"]);
        let read = StreamRead::of(true, &a, &[5, 6]).expect("a read");
        let quiet = |i: usize| {
            read.quiet_check(&read.streams[i])
                .map(|c| c.into_iter().map(text).collect::<Vec<_>>())
        };
        assert_eq!(
            quiet(0),
            Some(vec![
                "XPENDING s1 g - + 0".to_string(),
                "XACK s1 g 0-0".to_string()
            ])
        );
        assert_eq!(
            quiet(1).map(|c| c[2].clone()),
            Some("XREAD COUNT 1 STREAMS s2 0".to_string())
        );
        let b = |r: &'static [u8]| Bytes::from_static(r);
        let (empty, zero, bad_id) = (b(b"*0\r\n"), b(b":0\r\n"), b(b"-ERR Invalid stream ID\r\n"));
        assert_eq!(
            StreamRead::quiet_verdict(&[empty.clone(), zero.clone()]),
            Ok(None)
        );
        assert_eq!(
            StreamRead::quiet_verdict(&[empty.clone(), zero.clone(), bad_id.clone()]),
            Ok(Some(bad_id))
        );
        let nogroup = b(b"-NOGROUP No such key 's1' or consumer group 'g'\r\n");
        assert_eq!(StreamRead::quiet_verdict(&[nogroup, zero]), Err(()));
        let refused = b(b"-NOREPLICAS Not enough good replicas to write.\r\n");
        assert_eq!(StreamRead::quiet_verdict(&[empty, refused]), Err(()));
        let d = args(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s1", "s2", "$", ">"]);
        let read = StreamRead::of(true, &d, &[5, 6]).expect("a read");
        assert!(read.quiet_check(&read.streams[0]).is_none());
    }

    fn check_of(read: &StreamRead, i: usize) -> Vec<String> {
        read.check(&read.streams[i]).into_iter().map(text).collect()
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
    fn dollar_is_the_last_generated_id_or_zero() {
        // Redis 7.0's XINFO STREAM of a stream whose only entry, 5-1, was
        // deleted: `$` is still 5-1.
        let fields = "$6\r\nlength\r\n:0\r\n$17\r\nlast-generated-id\r\n$3\r\n5-1\r\n$6\r\ngroups\r\n:0\r\n";
        let r2 = Bytes::from(format!("*6\r\n{fields}"));
        let r3 = Bytes::from(format!("%3\r\n{fields}"));
        for r in [r2, r3] {
            assert_eq!(last_generated(&r), Some(Bytes::from_static(b"5-1")));
        }
        let none = Bytes::from_static(b"-ERR no such key\r\n");
        assert_eq!(last_generated(&none), Some(Bytes::from_static(b"0-0")));
        assert_eq!(last_generated(&Bytes::from_static(b"-WRONGTYPE x\r\n")), None);
    }
}
