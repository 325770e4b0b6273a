//! Keyspace notifications (`__keyspace@0__:<key>`, `__keyevent@0__:<event>`)
//! are published by the node where the key changes, to its own subscribers
//! only: unlike `PUBLISH`, Redis Cluster does not broadcast them. A client
//! that subscribes to them through the sidecar therefore gets "mirror"
//! links to every other primary besides its plain link; from a mirror only
//! keyspace messages reach the client (everything else a mirror hears, the
//! plain link delivers already).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::resp::{Frame, Request};

const PREFIXES: [&[u8]; 2] = [b"__keyspace@", b"__keyevent@"];

/// Whether `req` (a `SUBSCRIBE` or `PSUBSCRIBE`) names a channel, or a
/// pattern that may match one, of keyspace notifications.
pub(super) fn wants_mirrors(req: &Request) -> bool {
    let name = req.name();
    let test: fn(&[u8]) -> bool = if name.eq_ignore_ascii_case(b"subscribe") {
        is_keyspace_channel
    } else if name.eq_ignore_ascii_case(b"psubscribe") {
        pattern_may_match
    } else {
        return false;
    };
    (1..req.argc()).filter_map(|i| req.arg(i)).any(test)
}

fn is_keyspace_channel(channel: &[u8]) -> bool {
    PREFIXES.iter().any(|p| channel.starts_with(p))
}

/// Whether the glob `pattern` may match a keyspace channel: its literal
/// start (up to the first special character) and one of the prefixes agree
/// as far as the shorter goes. Erring towards yes only costs connections.
fn pattern_may_match(pattern: &[u8]) -> bool {
    let literal = pattern
        .iter()
        .position(|b| matches!(b, b'*' | b'?' | b'[' | b'\\'))
        .map_or(pattern, |i| &pattern[..i]);
    PREFIXES.iter().any(|p| {
        let n = literal.len().min(p.len());
        literal[..n] == p[..n]
    })
}

/// A `message` or `pmessage` (RESP2 array or RESP3 push) on a keyspace
/// channel.
pub(super) fn is_keyspace_message(frame: &Frame) -> bool {
    let items = match frame {
        Frame::Array(items) | Frame::Push(items) => items,
        _ => return false,
    };
    match items.as_slice() {
        [Frame::Bulk(kind), Frame::Bulk(channel), _] if kind.eq_ignore_ascii_case(b"message") => {
            is_keyspace_channel(channel)
        }
        [Frame::Bulk(kind), _, Frame::Bulk(channel), _] if kind.eq_ignore_ascii_case(b"pmessage") => {
            is_keyspace_channel(channel)
        }
        _ => false,
    }
}

/// The subscriptions every mirror link of the sidecar holds, by channel and
/// by pattern: each is a subscriber on its node, which `PUBSUB NUMSUB` and
/// `NUMPAT` count, and one server would not.
#[derive(Debug, Default)]
pub struct MirrorCounts {
    channels: Mutex<HashMap<Bytes, i64>>,
    patterns: Mutex<HashMap<Bytes, i64>>,
}

impl MirrorCounts {
    /// Mirror links subscribed to `channel`.
    pub fn channel(&self, channel: &[u8]) -> i64 {
        lock(&self.channels).get(channel).copied().unwrap_or(0)
    }

    /// Mirror subscriptions to patterns, a pattern once per link.
    pub fn patterns(&self) -> i64 {
        lock(&self.patterns).values().sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn add(map: &Mutex<HashMap<Bytes, i64>>, key: &Bytes, n: i64) {
    let mut map = lock(map);
    let count = map.entry(key.clone()).or_default();
    *count += n;
    if *count <= 0 {
        map.remove(key);
    }
}

/// One mirror link's share of [`MirrorCounts`], kept from its node's
/// confirmations and taken back when the link goes.
#[derive(Debug)]
pub(super) struct MirrorShare {
    counts: Arc<MirrorCounts>,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
}

impl MirrorShare {
    pub(super) fn new(counts: Arc<MirrorCounts>) -> Self {
        Self {
            counts,
            channels: HashSet::new(),
            patterns: HashSet::new(),
        }
    }

    /// Notes a (un)subscribe confirmation the link's node sent.
    pub(super) fn confirmed(&mut self, frame: &Frame) {
        let items = match frame {
            Frame::Array(items) | Frame::Push(items) => items,
            _ => return,
        };
        let [Frame::Bulk(kind), Frame::Bulk(name), Frame::Integer(_)] = items.as_slice() else {
            return;
        };
        let kind = kind.to_ascii_lowercase();
        let (set, map, on) = match kind.as_slice() {
            b"subscribe" => (&mut self.channels, &self.counts.channels, true),
            b"unsubscribe" => (&mut self.channels, &self.counts.channels, false),
            b"psubscribe" => (&mut self.patterns, &self.counts.patterns, true),
            b"punsubscribe" => (&mut self.patterns, &self.counts.patterns, false),
            _ => return,
        };
        if on && set.insert(name.clone()) {
            add(map, name, 1);
        } else if !on && set.remove(name) {
            add(map, name, -1);
        }
    }
}

impl Drop for MirrorShare {
    fn drop(&mut self) {
        for c in &self.channels {
            add(&self.counts.channels, c, -1);
        }
        for p in &self.patterns {
            add(&self.counts.patterns, p, -1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> Request {
        Request::of(args)
    }

    #[test]
    fn keyspace_channels_and_patterns_that_may_match_them_want_mirrors() {
        assert!(wants_mirrors(&req(&["SUBSCRIBE", "news", "__keyevent@0__:set"])));
        assert!(!wants_mirrors(&req(&["SUBSCRIBE", "news", "__key"])));
        for pattern in [
            "*",
            "__keyspace@0__:user:*",
            "__key*",
            "_?keyevent*",
            "[_]*",
            "__keyevent@0__:del",
        ] {
            assert!(wants_mirrors(&req(&["PSUBSCRIBE", pattern])), "{pattern}");
        }
        for pattern in ["news.*", "__other*", "k?"] {
            assert!(!wants_mirrors(&req(&["PSUBSCRIBE", pattern])), "{pattern}");
        }
        assert!(!wants_mirrors(&req(&["UNSUBSCRIBE", "__keyevent@0__:set"])));
    }

    #[test]
    fn a_mirror_share_counts_what_its_node_confirmed_until_it_goes() {
        let bulk = |s: &'static str| Frame::Bulk(Bytes::from_static(s.as_bytes()));
        let confirm = |kind, name| Frame::Array(vec![bulk(kind), bulk(name), Frame::Integer(1)]);
        let counts = Arc::new(MirrorCounts::default());
        let mut a = MirrorShare::new(counts.clone());
        let mut b = MirrorShare::new(counts.clone());
        a.confirmed(&confirm("subscribe", "__keyevent@0__:set"));
        a.confirmed(&confirm("subscribe", "__keyevent@0__:set"));
        b.confirmed(&confirm("subscribe", "__keyevent@0__:set"));
        a.confirmed(&confirm("psubscribe", "*"));
        assert_eq!((counts.channel(b"__keyevent@0__:set"), counts.patterns()), (2, 1));
        a.confirmed(&confirm("punsubscribe", "*"));
        drop(b);
        assert_eq!((counts.channel(b"__keyevent@0__:set"), counts.patterns()), (1, 0));
        drop(a);
        assert_eq!(counts.channel(b"__keyevent@0__:set"), 0);
    }

    #[test]
    fn only_keyspace_messages_pass_a_mirror() {
        let bulk = |s: &'static str| Frame::Bulk(Bytes::from_static(s.as_bytes()));
        let message = Frame::Array(vec![bulk("message"), bulk("__keyevent@0__:set"), bulk("k")]);
        let pmessage = Frame::Push(vec![
            bulk("pmessage"),
            bulk("*"),
            bulk("__keyspace@0__:k"),
            bulk("set"),
        ]);
        let broadcast = Frame::Array(vec![bulk("message"), bulk("news"), bulk("hi")]);
        let confirmation = Frame::Array(vec![
            bulk("subscribe"),
            bulk("__keyevent@0__:set"),
            Frame::Integer(1),
        ]);
        assert!(is_keyspace_message(&message));
        assert!(is_keyspace_message(&pmessage));
        assert!(!is_keyspace_message(&broadcast));
        assert!(!is_keyspace_message(&confirmation));
    }
}
