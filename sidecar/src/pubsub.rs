//! A client's subscriptions (`SUBSCRIBE`, `PSUBSCRIBE`, `UNSUBSCRIBE`,
//! `PUNSUBSCRIBE`) on a connection of its own to one primary.
//!
//! Redis Cluster broadcasts every `PUBLISH` to every node, so one node's
//! connection hears every channel. The connection is opened at the client's
//! first subscription command, in the client's protocol, and lives as long as
//! the client (or until `RESET`). Everything Redis sends on it —
//! confirmations, messages, RESP3 pushes, the RESP2 subscribed-mode `PING`
//! reply — is copied to the client as it is, so the frames are Redis's own.
//!
//! `SSUBSCRIBE`/`SUNSUBSCRIBE` go to the primary of their channel's slot:
//! the first subscription command of a client picks the node (a random
//! primary for the others), and a shard channel of another shard on the
//! same client connection is refused. When a subscribed shard channel's
//! slot moves, Redis unsubscribes the client on its own; the sidecar then
//! closes the client's connection (as when its node goes away), so its
//! reconnect subscribes again at the new owner.
//!
//! Order: a subscription command is sent once everything the client sent
//! before it has its reply; behind each one the sidecar sends a
//! `PING <marker>` of its own and swallows its reply, so it knows when the
//! command's confirmations are all in and what the subscription count is.
//! Until then the client's next other command waits, and then, in RESP2
//! with subscriptions left, it gets Redis's subscribed-mode error (only
//! subscription commands, `PING`, `QUIT` and `RESET` are allowed there).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::connect::{self, Proto};
use crate::error::UpstreamError;
use crate::resp::{self, Frame, Limits};

/// What the client loop does with a request, given the subscription state.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not a subscription matter: the ordinary path.
    Ordinary,
    /// Wait: earlier replies or subscription confirmations are outstanding.
    Hold,
    /// Send it on the subscription connection.
    Forward,
    /// Answer it with this error (RESP2 subscribed mode).
    Refuse(Bytes),
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

/// Redis's own words for a command refused in RESP2 subscribed mode.
pub fn subscribed_mode_error(name: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    let msg = format!(
        "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
        String::from_utf8_lossy(name).to_ascii_lowercase()
    );
    Frame::Error(Bytes::from(msg)).encode(&mut b);
    b.freeze()
}

/// A client's subscription connection and what the sidecar knows of it.
pub struct Subscriber {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    checker: resp::Checker,
    proto: u8,
    /// The node it is connected to.
    pub addr: String,
    /// Channels and patterns, as the latest confirmation counted them.
    count: i64,
    /// Shard channels (Redis counts them apart).
    shard_count: i64,
    /// Marker tokens sent and not yet answered, oldest first.
    markers: VecDeque<Bytes>,
    next_marker: u64,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("count", &self.count)
            .field("markers", &self.markers.len())
            .finish()
    }
}

impl Subscriber {
    /// Open the connection to `addr` in the client's protocol `proto`.
    pub async fn open(
        addr: &str,
        proto: u8,
        timeout: std::time::Duration,
        auth: Option<&crate::config::Credentials>,
    ) -> Result<Subscriber, UpstreamError> {
        let up = if proto == 3 { Proto::Resp3 } else { Proto::Resp2 };
        let (rd, wr, buf) = connect::handshake(addr, up, timeout, auth).await?;
        Ok(Subscriber {
            rd,
            wr,
            buf,
            checker: resp::Checker::new(Limits::upstream()),
            proto,
            addr: addr.to_string(),
            count: 0,
            shard_count: 0,
            markers: VecDeque::new(),
            next_marker: 0,
        })
    }

    /// Subscribed (RESP2 restrictions apply) as far as the last settled
    /// confirmation says.
    pub fn subscribed(&self) -> bool {
        self.count > 0 || self.shard_count > 0
    }

    /// Every forwarded command has all its confirmations.
    pub fn settled(&self) -> bool {
        self.markers.is_empty()
    }

    /// Send the client's command `raw`, then a marker.
    pub async fn forward(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.next_marker += 1;
        let token = Bytes::from(format!("cachetier-pubsub-marker-{}", self.next_marker));
        let mut out = BytesMut::from(raw);
        resp::encode_command(&[&b"PING"[..], &token[..]], &mut out);
        self.markers.push_back(token);
        self.wr.write_all(&out).await
    }

    /// Read what the node sent (cancel safe); an error or EOF ends it.
    pub async fn read(&mut self) -> Result<(), UpstreamError> {
        match self.rd.read_buf(&mut self.buf).await {
            Ok(0) => Err(UpstreamError::Closed("eof".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(UpstreamError::Closed(e.to_string())),
        }
    }

    /// Move every complete frame into the client's `out`, except marker
    /// replies, noting subscription counts.
    pub fn drain(&mut self, out: &mut BytesMut) -> Result<(), UpstreamError> {
        loop {
            let n = match self.checker.check(&self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(()),
                Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
            };
            let raw = self.buf.split_to(n).freeze();
            let frame = resp::parse(&raw).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            if self.is_marker(&frame) {
                self.markers.pop_front();
                continue;
            }
            // SSUBSCRIBE sent by a stale slot map: the same remedy.
            if let Frame::Error(e) = &frame
                && (e.starts_with(b"MOVED ") || e.starts_with(b"ASK "))
            {
                return Err(UpstreamError::Moved(String::from_utf8_lossy(e).into_owned()));
            }
            match confirmation_count(&frame) {
                // Every command the client sends is followed by a marker, so
                // a confirmation with none outstanding is Redis's own: a
                // shard channel's slot moved to another node. One server
                // never does that; close the client as if its node went
                // away, and its reconnect subscribes at the new owner.
                Some((true, _)) if self.markers.is_empty() => {
                    return Err(UpstreamError::Moved(
                        "a subscribed shard channel's slot moved to another node".into(),
                    ));
                }
                Some((true, n)) => self.shard_count = n,
                Some((false, n)) => self.count = n,
                None => {}
            }
            out.extend_from_slice(&raw);
        }
    }

    fn is_marker(&self, frame: &Frame) -> bool {
        let Some(token) = self.markers.front() else {
            return false;
        };
        match frame {
            Frame::Bulk(b) => b == token,
            // RESP2 subscribed mode answers PING with ["pong", arg].
            Frame::Array(items) if self.proto == 2 => {
                matches!(items.as_slice(), [Frame::Bulk(p), Frame::Bulk(b)] if p.eq_ignore_ascii_case(b"pong") && b == token)
            }
            _ => false,
        }
    }
}

/// The subscription count a (un)subscribe confirmation reports, and whether
/// it counts shard channels.
fn confirmation_count(frame: &Frame) -> Option<(bool, i64)> {
    let items = match frame {
        Frame::Array(items) | Frame::Push(items) => items,
        _ => return None,
    };
    match items.as_slice() {
        [Frame::Bulk(kind), _, Frame::Integer(n)] if is_subscription_command(kind) => {
            Some((is_shard_command(kind), *n))
        }
        _ => None,
    }
}

/// Decide a request's [`Step`]. `idle`: nothing of this client is waiting
/// for a reply on the ordinary path.
pub fn step(sub: Option<&Subscriber>, proto: u8, name: &[u8], idle: bool) -> Step {
    let settled = sub.is_none_or(Subscriber::settled);
    if is_subscription_command(name) {
        return if idle { Step::Forward } else { Step::Hold };
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
            return if idle {
                Step::Refuse(subscribed_mode_error(name))
            } else {
                Step::Hold
            };
        }
    }
    Step::Ordinary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_commands_wait_for_earlier_replies_then_go_upstream() {
        assert_eq!(step(None, 2, b"SUBSCRIBE", false), Step::Hold);
        assert_eq!(step(None, 2, b"subscribe", true), Step::Forward);
        assert_eq!(step(None, 2, b"GET", true), Step::Ordinary);
    }

    #[test]
    fn the_subscribed_mode_error_is_worded_like_redis() {
        assert_eq!(
            &subscribed_mode_error(b"GET")[..],
            &b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"[..]
        );
    }

    #[test]
    fn confirmations_carry_the_subscription_count() {
        let f = Frame::Array(vec![
            Frame::Bulk(Bytes::from_static(b"unsubscribe")),
            Frame::Bulk(Bytes::from_static(b"ch")),
            Frame::Integer(0),
        ]);
        assert_eq!(confirmation_count(&f), Some((false, 0)));
        let m = Frame::Push(vec![
            Frame::Bulk(Bytes::from_static(b"message")),
            Frame::Bulk(Bytes::from_static(b"ch")),
            Frame::Bulk(Bytes::from_static(b"hi")),
        ]);
        assert_eq!(confirmation_count(&m), None);
    }
}
