//! Keyspace notifications (`__keyspace@0__:<key>`, `__keyevent@0__:<event>`)
//! are published by the node where the key changes, to its own subscribers
//! only: unlike `PUBLISH`, Redis Cluster does not broadcast them. A client
//! that subscribes to them through the sidecar therefore gets "mirror"
//! links to every other primary besides its plain link; from a mirror only
//! keyspace messages reach the client (everything else a mirror hears, the
//! plain link delivers already).

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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

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
