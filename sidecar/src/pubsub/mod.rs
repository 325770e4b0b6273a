//! A client's subscriptions (`SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE` and
//! their unsubscribes) on upstream connections of its own, so that the
//! client sees what one Redis 7 server would send it.
//!
//! Connections ([`link`]): ordinary channels and patterns share one, to a
//! random primary (Redis Cluster broadcasts every `PUBLISH` to every node,
//! so one node hears every channel); shard channels get one per shard they
//! are on, to its slot's primary (`SPUBLISH` reaches that shard only). They
//! are kept apart, not shared: a connection then holds one kind only, so
//! the count of each confirmation is unambiguous and a shard's connection
//! can close when its last shard channel goes. They are opened in the
//! client's protocol at the first command that needs them and live as long
//! as the client (or until `RESET`); a shard connection left with no
//! channel is closed. Everything Redis sends — confirmations, messages,
//! RESP3 pushes, the RESP2 subscribed-mode `PING` reply — is copied to the
//! client a whole frame at a time, in the order it arrives ([`subscriber`]).
//!
//! Counts (checked against redis-server 7.0.15): `ssubscribe` and
//! `sunsubscribe` confirmations count the client's shard channels,
//! `(p)(un)subscribe` ones its channels plus patterns; RESP2 subscribed mode
//! lasts while either is above 0. A shard node counts only its own shard
//! channels, so the sidecar adds those of the client's other shard
//! connections. `SUNSUBSCRIBE` with no channel goes to every shard
//! connection with channels; with none anywhere (likewise `UNSUBSCRIBE` and
//! `PUNSUBSCRIBE` with no ordinary connection) the sidecar answers
//! `[kind, nil, 0]` itself, as Redis does. An `SSUBSCRIBE` of channels of
//! several slots goes to its first channel's node, which answers
//! `CROSSSLOT` as Redis Cluster does (a single server would accept it).
//!
//! When a subscribed shard channel's slot moves, Redis unsubscribes the
//! client on its own; the sidecar then closes the client's connection (as
//! when its node goes away), so its reconnect subscribes again at the new
//! owner. A `MOVED` to an `SSUBSCRIBE` is handled the same way.
//!
//! Order: a subscription command is sent once everything the client sent
//! before it has its reply, and once the other connections have confirmed
//! what was sent on them (a shard command: every connection, as its own is
//! known only from its channel); behind each one the sidecar sends a
//! `PING <marker>` of its own and swallows its reply, so it knows when the
//! command's confirmations are all in and what the subscription counts are.
//! Until then the client's next other command waits, and then, in RESP2
//! with subscriptions left, it gets Redis's subscribed-mode error (only
//! subscription commands, `PING`, `QUIT` and `RESET` are allowed there).

mod join;
pub mod keyspace;
mod link;
mod subscriber;

use bytes::{Bytes, BytesMut};

use crate::resp::{Frame, Request};

pub use subscriber::{Subscriber, forward, read};

/// What the client loop does with a request, given the subscription state.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a subscription matter: the ordinary path.
    Ordinary,
    /// Wait: earlier replies or subscription confirmations are outstanding.
    Hold,
    /// Send it on the subscription connection.
    Forward,
    /// Answer it with [`subscribed_mode_error`] (RESP2 subscribed mode).
    Refuse,
}

/// The subscription commands that go on the client's own connection.
fn is_subscription_command(name: &[u8]) -> bool {
    [
        "subscribe",
        "psubscribe",
        "unsubscribe",
        "punsubscribe",
        "ssubscribe",
        "sunsubscribe",
    ]
    .iter()
    .any(|c| name.eq_ignore_ascii_case(c.as_bytes()))
}

/// A shard-channel command: its channel's slot decides the node.
pub fn is_shard_command(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"ssubscribe") || name.eq_ignore_ascii_case(b"sunsubscribe")
}

/// Allowed in RESP2 subscribed mode besides the subscription commands.
fn allowed_when_subscribed(name: &[u8]) -> bool {
    ["ping", "quit", "reset"]
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c.as_bytes()))
}

/// Redis's own words for a command refused in RESP2 subscribed mode (an
/// unknown or malformed command is refused for that first, as in Redis).
pub fn subscribed_mode_error(req: &Request) -> Bytes {
    let args: Vec<&[u8]> = (0..req.argc()).filter_map(|i| req.arg(i)).collect();
    let msg = crate::commands::refusal(&args).unwrap_or_else(|| {
        let name = String::from_utf8_lossy(req.name()).to_ascii_lowercase();
        Bytes::from(format!(
            "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
            crate::arity::full_name(&name, req.arg(1))
        ))
    });
    let mut b = BytesMut::new();
    Frame::Error(msg).encode(&mut b);
    b.freeze()
}

/// Which count a confirmation carries: Redis 7.0 counts a client's shard
/// channels apart from its channels and patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Shard,
}

/// The subscription count a (un)subscribe confirmation reports, and which.
fn confirmation(frame: &Frame) -> Option<(Kind, i64)> {
    let items = match frame {
        Frame::Array(items) | Frame::Push(items) => items,
        _ => return None,
    };
    match items.as_slice() {
        [Frame::Bulk(kind), _, Frame::Integer(n)] if is_subscription_command(kind) => {
            let k = if is_shard_command(kind) {
                Kind::Shard
            } else {
                Kind::Plain
            };
            Some((k, *n))
        }
        _ => None,
    }
}

fn error_frame(msg: &str) -> Bytes {
    let mut b = BytesMut::new();
    Frame::Error(Bytes::copy_from_slice(msg.as_bytes())).encode(&mut b);
    b.freeze()
}

/// Decide a request's [`Step`]. `idle`: nothing of this client is waiting
/// for a reply on the ordinary path.
pub fn step(sub: Option<&Subscriber>, proto: u8, name: &[u8], idle: bool) -> Step {
    let settled = sub.is_none_or(Subscriber::settled);
    if is_subscription_command(name) {
        // Its replies must follow the confirmations of earlier commands on
        // other links; a shard channel's link is known only from the
        // channel, so a shard command waits for all of them.
        let ready = match sub {
            None => true,
            Some(s) if is_shard_command(name) => s.settled(),
            Some(s) => s.shards_settled(),
        };
        return if idle && ready { Step::Forward } else { Step::Hold };
    }
    let Some(sub) = sub else {
        return Step::Ordinary;
    };
    if !settled {
        return Step::Hold;
    }
    if proto == 2 && sub.subscribed() {
        if name.eq_ignore_ascii_case(b"ping") {
            return if idle { Step::Forward } else { Step::Hold };
        }
        if !allowed_when_subscribed(name) {
            return if idle { Step::Refuse } else { Step::Hold };
        }
    }
    Step::Ordinary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> Request {
        Request::of(args)
    }

    #[test]
    fn subscription_commands_wait_for_earlier_replies_then_go_upstream() {
        assert_eq!(step(None, 2, b"SUBSCRIBE", false), Step::Hold);
        assert_eq!(step(None, 2, b"subscribe", true), Step::Forward);
        assert_eq!(step(None, 2, b"GET", true), Step::Ordinary);
    }

    #[test]
    fn the_subscribed_mode_error_is_worded_like_redis() {
        // As redis-server 7.0.15 words them.
        let refused = |a: &[&str]| String::from_utf8_lossy(&subscribed_mode_error(&req(a))).into_owned();
        let context =
            "only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context";
        assert_eq!(
            refused(&["GET", "k"]),
            format!("-ERR Can't execute 'get': {context}\r\n")
        );
        assert_eq!(
            refused(&["PUBSUB", "NUMSUB", "ch"]),
            format!("-ERR Can't execute 'pubsub|numsub': {context}\r\n")
        );
        assert_eq!(
            refused(&["GET"]),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert!(refused(&["FROBNICATE"]).starts_with("-ERR unknown command 'FROBNICATE'"));
    }

    #[test]
    fn confirmations_carry_the_subscription_count() {
        let f = Frame::Array(vec![
            Frame::Bulk(Bytes::from_static(b"unsubscribe")),
            Frame::Bulk(Bytes::from_static(b"ch")),
            Frame::Integer(0),
        ]);
        assert_eq!(confirmation(&f), Some((Kind::Plain, 0)));
        let m = Frame::Push(vec![
            Frame::Bulk(Bytes::from_static(b"message")),
            Frame::Bulk(Bytes::from_static(b"ch")),
            Frame::Bulk(Bytes::from_static(b"hi")),
        ]);
        assert_eq!(confirmation(&m), None);
    }
}
