//! Keyspace notifications (`__keyspace@0__:<key>`, `__keyevent@0__:<event>`)
//! are published by the node where the key changes, to its own subscribers
//! only: unlike `PUBLISH`, Redis Cluster does not broadcast them. A client
//! that subscribes to them through the sidecar therefore gets "mirror"
//! links to every other primary besides its plain link; from a mirror only
//! keyspace messages reach the client (everything else a mirror hears, the
//! plain link delivers already). As the cluster changes, the subscriber's
//! upkeep gives a primary with no link a mirror subscribed from the plain
//! link's [`Names`] (opened in the background: [`super::join`]), and
//! closes a mirror whose node is no longer a primary. The mirrors close
//! when the client leaves its last keyspace subscription.

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

/// The channels and patterns a link's node confirmed it holds, from its
/// (un)subscribe confirmations.
#[derive(Debug, Default)]
pub(super) struct Names {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    /// How many of them are keyspace channels or patterns that may match one.
    keyspace: usize,
}

/// What a confirmation changed in [`Names`].
enum Change {
    Channel(Bytes, bool),
    Pattern(Bytes, bool),
}

impl Names {
    /// Note a confirmation; what it changed, if anything.
    fn confirmed(&mut self, frame: &Frame) -> Option<Change> {
        let items = match frame {
            Frame::Array(items) | Frame::Push(items) => items,
            _ => return None,
        };
        let [Frame::Bulk(kind), Frame::Bulk(name), Frame::Integer(_)] = items.as_slice() else {
            return None;
        };
        let kind = kind.to_ascii_lowercase();
        let (set, on, channel) = match kind.as_slice() {
            b"subscribe" => (&mut self.channels, true, true),
            b"unsubscribe" => (&mut self.channels, false, true),
            b"psubscribe" => (&mut self.patterns, true, false),
            b"punsubscribe" => (&mut self.patterns, false, false),
            _ => return None,
        };
        let changed = if on {
            set.insert(name.clone())
        } else {
            set.remove(name)
        };
        let keyspace = if channel {
            is_keyspace_channel(name)
        } else {
            pattern_may_match(name)
        };
        if changed && keyspace {
            self.keyspace = if on {
                self.keyspace + 1
            } else {
                self.keyspace.saturating_sub(1)
            };
        }
        match (changed, channel) {
            (false, _) => None,
            (true, true) => Some(Change::Channel(name.clone(), on)),
            (true, false) => Some(Change::Pattern(name.clone(), on)),
        }
    }

    /// Note a confirmation the node sent.
    pub(super) fn note(&mut self, frame: &Frame) {
        self.confirmed(frame);
    }

    /// Whether any of these is a keyspace channel or a pattern that may
    /// match one.
    pub(super) fn has_keyspace(&self) -> bool {
        self.keyspace > 0
    }

    /// The commands that subscribe a new mirror link to what of these
    /// keyspace notifications may reach: a `SUBSCRIBE` of the keyspace
    /// channels and a `PSUBSCRIBE` of the patterns that may match one, each
    /// only when there is something to name.
    pub(super) fn replay(&self) -> Vec<Vec<Bytes>> {
        let command = |name: &'static [u8], set: &HashSet<Bytes>, keep: fn(&[u8]) -> bool| {
            let mut args: Vec<Bytes> = set.iter().filter(|n| keep(n)).cloned().collect();
            args.sort();
            (!args.is_empty()).then(|| {
                args.insert(0, Bytes::from_static(name));
                args
            })
        };
        [
            command(b"SUBSCRIBE", &self.channels, is_keyspace_channel),
            command(b"PSUBSCRIBE", &self.patterns, pattern_may_match),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// One mirror link's share of [`MirrorCounts`], kept from its node's
/// confirmations and taken back when the link goes.
#[derive(Debug)]
pub(super) struct MirrorShare {
    counts: Arc<MirrorCounts>,
    names: Names,
}

impl MirrorShare {
    pub(super) fn new(counts: Arc<MirrorCounts>) -> Self {
        Self {
            counts,
            names: Names::default(),
        }
    }

    /// Notes a (un)subscribe confirmation the link's node sent.
    pub(super) fn confirmed(&mut self, frame: &Frame) {
        match self.names.confirmed(frame) {
            Some(Change::Channel(name, on)) => add(&self.counts.channels, &name, if on { 1 } else { -1 }),
            Some(Change::Pattern(name, on)) => add(&self.counts.patterns, &name, if on { 1 } else { -1 }),
            None => {}
        }
    }
}

impl Drop for MirrorShare {
    fn drop(&mut self) {
        for c in &self.names.channels {
            add(&self.counts.channels, c, -1);
        }
        for p in &self.names.patterns {
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
    fn a_new_mirror_is_subscribed_to_the_keyspace_names_only() {
        let bulk = |s: &'static str| Frame::Bulk(Bytes::from_static(s.as_bytes()));
        let confirm = |kind, name| Frame::Push(vec![bulk(kind), bulk(name), Frame::Integer(1)]);
        let mut names = Names::default();
        assert!(names.replay().is_empty() && !names.has_keyspace());
        for (kind, name) in [
            ("subscribe", "news"),
            ("subscribe", "__keyevent@0__:set"),
            ("subscribe", "__keyevent@0__:del"),
            ("psubscribe", "news.*"),
            ("psubscribe", "__keyspace@0__:user:*"),
            ("unsubscribe", "__keyevent@0__:del"),
        ] {
            names.note(&confirm(kind, name));
        }
        assert!(names.has_keyspace());
        let words = |c: &Vec<Bytes>| {
            c.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
        };
        let replay: Vec<Vec<String>> = names.replay().iter().map(words).collect();
        assert_eq!(
            replay,
            vec![
                vec!["SUBSCRIBE", "__keyevent@0__:set"],
                vec!["PSUBSCRIBE", "__keyspace@0__:user:*"]
            ]
        );
        names.note(&confirm("unsubscribe", "__keyevent@0__:set"));
        names.note(&confirm("punsubscribe", "__keyspace@0__:user:*"));
        assert!(!names.has_keyspace() && names.replay().is_empty());
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
