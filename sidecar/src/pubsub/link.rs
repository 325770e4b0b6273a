//! One upstream connection of a client's subscriptions: the ordinary
//! channels and patterns, or the shard channels of one shard.
//!
//! It reads what its node sends, swallows the replies to the sidecar's own
//! `PING <marker>`s, notes the subscription counts of the confirmations and
//! rewrites the shard-channel counts so that they count the client's shard
//! channels on every shard, not only this node's.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{Kind, confirmation};
use crate::connect::{self, Proto};
use crate::error::UpstreamError;
use crate::resp::{self, Frame, Limits};

/// A subscription connection and what the sidecar knows of it.
pub(super) struct Link {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    checker: resp::Checker,
    /// The protocol it was opened in (the client's then).
    pub(super) proto: u8,
    /// The node it is connected to.
    pub(super) addr: String,
    /// Channels and patterns, as this node's latest confirmation counted them.
    pub(super) count: i64,
    /// Shard channels (Redis 7.0 counts them apart from the others).
    pub(super) shard_count: i64,
    /// Marker tokens sent and not yet answered, oldest first.
    markers: VecDeque<Bytes>,
    next_marker: u64,
    /// A mirror link's subscriptions, counted for `PUBSUB`.
    pub(super) mirror: Option<super::keyspace::MirrorShare>,
    /// The channels and patterns this node confirmed (kept for the plain
    /// link: a mirror opened later is subscribed to its keyspace ones).
    pub(super) names: super::keyspace::Names,
    /// Keyspace messages are dropped: the node is no longer its shard's
    /// primary, and a mirror on the one that is delivers them.
    pub(super) keyspace_off: bool,
}

impl Link {
    /// Open the connection to `addr` in the client's protocol `proto`.
    pub(super) async fn open(
        addr: &str,
        proto: u8,
        timeout: std::time::Duration,
        auth: Option<&crate::config::Credentials>,
    ) -> Result<Link, UpstreamError> {
        let up = if proto == 3 { Proto::Resp3 } else { Proto::Resp2 };
        let (rd, wr, buf) = connect::handshake(addr, up, timeout, auth).await?;
        Ok(Link {
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
            mirror: None,
            names: super::keyspace::Names::default(),
            keyspace_off: false,
        })
    }

    /// Every command sent on it has all its confirmations.
    pub(super) fn settled(&self) -> bool {
        self.markers.is_empty()
    }

    /// Subscribed to anything, as far as its node said last.
    pub(super) fn subscribed(&self) -> bool {
        self.count > 0 || self.shard_count > 0
    }

    /// Send the client's command `raw`, then a marker.
    pub(super) async fn forward(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.next_marker += 1;
        let token = Bytes::from(format!("cachetier-pubsub-marker-{}", self.next_marker));
        let mut out = BytesMut::from(raw);
        resp::encode_command(&[&b"PING"[..], &token[..]], &mut out);
        self.markers.push_back(token);
        self.wr.write_all(&out).await
    }

    /// Poll a read of what the node sent (cancel safe: a read future made
    /// and dropped here loses nothing); EOF or an error ends the link.
    pub(super) fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), UpstreamError>> {
        use std::future::Future;
        let read = std::pin::pin!(self.rd.read_buf(&mut self.buf));
        read.poll(cx).map(|r| match r {
            Ok(0) => Err(UpstreamError::Closed("eof".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(UpstreamError::Closed(e.to_string())),
        })
    }

    /// Move every complete frame into the client's `out`, except marker
    /// replies, noting subscription counts. A shard-channel confirmation's
    /// count gets `other_shards` (the client's shard channels on other
    /// links) added, so the client sees its total as one server counts it.
    pub(super) fn drain(&mut self, out: &mut BytesMut, other_shards: i64) -> Result<(), UpstreamError> {
        while let Some((raw, frame)) = self.next_frame()? {
            // SSUBSCRIBE sent by a stale slot map: the same remedy.
            if let Frame::Error(e) = &frame
                && (e.starts_with(b"MOVED ") || e.starts_with(b"ASK "))
            {
                return Err(UpstreamError::Moved(String::from_utf8_lossy(e).into_owned()));
            }
            match confirmation(&frame) {
                // Every command the client sends is followed by a marker, so
                // a confirmation with none outstanding is Redis's own: a
                // shard channel's slot moved to another node. One server
                // never does that; close the client as if its node went
                // away, and its reconnect subscribes at the new owner.
                Some((Kind::Shard, _)) if self.markers.is_empty() => {
                    return Err(UpstreamError::Moved(
                        "a subscribed shard channel's slot moved to another node".into(),
                    ));
                }
                Some((Kind::Shard, n)) => {
                    self.shard_count = n;
                    out.extend_from_slice(&with_count(&raw, n + other_shards));
                    continue;
                }
                Some((Kind::Plain, n)) => {
                    self.count = n;
                    self.names.note(&frame);
                }
                None if self.keyspace_off && super::keyspace::is_keyspace_message(&frame) => continue,
                None => {}
            }
            out.extend_from_slice(&raw);
        }
        Ok(())
    }

    /// [`Link::drain`] for a mirror link ([`super::keyspace`]): only
    /// keyspace messages go to `out`; its confirmations and the broadcast
    /// messages the plain link delivers already are dropped.
    pub(super) fn drain_mirror(&mut self, out: &mut BytesMut) -> Result<(), UpstreamError> {
        while let Some((raw, frame)) = self.next_frame()? {
            if super::keyspace::is_keyspace_message(&frame) {
                out.extend_from_slice(&raw);
            } else if let Some(share) = self.mirror.as_mut() {
                share.confirmed(&frame);
            }
        }
        Ok(())
    }

    /// The next complete frame the node sent, other than a marker reply.
    fn next_frame(&mut self) -> Result<Option<(Bytes, Frame)>, UpstreamError> {
        loop {
            let n = match self.checker.check(&self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(None),
                Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
            };
            let raw = self.buf.split_to(n).freeze();
            let frame = resp::parse(&raw).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
            if self.is_marker(&frame) {
                self.markers.pop_front();
                continue;
            }
            return Ok(Some((raw, frame)));
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

/// A confirmation `raw` (its last element the integer count) with the count
/// `n`: the bytes before the count are Redis's own, unchanged.
fn with_count(raw: &Bytes, n: i64) -> Bytes {
    let body = raw.strip_suffix(b"\r\n").unwrap_or(raw);
    match body.iter().rposition(|&b| b == b':') {
        Some(colon) => {
            let mut out = BytesMut::with_capacity(raw.len() + 4);
            out.extend_from_slice(&raw[..colon]);
            out.extend_from_slice(format!(":{n}\r\n").as_bytes());
            out.freeze()
        }
        None => raw.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_rewritten_in_place_keeping_the_rest_of_the_frame() {
        let raw = Bytes::from_static(b"*3\r\n$10\r\nssubscribe\r\n$3\r\na:b\r\n:1\r\n");
        assert_eq!(
            &with_count(&raw, 12)[..],
            b"*3\r\n$10\r\nssubscribe\r\n$3\r\na:b\r\n:12\r\n"
        );
        let push = Bytes::from_static(b">3\r\n$12\r\nsunsubscribe\r\n_\r\n:0\r\n");
        assert_eq!(&with_count(&push, 0)[..], &push[..]);
    }
}
