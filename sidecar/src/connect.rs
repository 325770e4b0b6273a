//! Opening upstream connections: the handshake every connection starts
//! with, connections owned by one client or one command ([`Dedicated`]:
//! WATCH, blocking and known-slow commands), and one-shot commands on a fresh
//! connection (topology discovery).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::UpstreamError;
use crate::resp::{self, Frame, Limits};

/// RESP protocol version of an upstream connection (index into `Node::conns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Resp2 = 0,
    Resp3 = 1,
}

/// The commands that open every upstream connection (data, WATCH, blocking,
/// slow, topology, tracking): `AUTH` with the tier's credentials, then
/// `HELLO 3` for RESP3. Encodes them into `out`; returns how many replies
/// they produce (each must not be an error).
pub fn opening(auth: Option<&crate::config::Credentials>, proto: Proto, out: &mut BytesMut) -> usize {
    let mut n = 0;
    if let Some(auth) = auth {
        resp::encode_command(&auth.auth_command(), out);
        n += 1;
    }
    if proto == Proto::Resp3 {
        resp::encode_command(&["HELLO", "3"], out);
        n += 1;
    }
    n
}

/// Connect and prepare a connection: `HELLO 3` for RESP3 and `READONLY` so a
/// replica serves reads for its slots instead of answering MOVED.
pub(crate) async fn handshake(
    addr: &str,
    proto: Proto,
    timeout: Duration,
    auth: Option<&crate::config::Credentials>,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, BytesMut), UpstreamError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::Connect("connect timed out".into()))?
        .map_err(|e| UpstreamError::Connect(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::new();
    let expected = opening(auth, proto, &mut out) + 1;
    resp::encode_command(&["READONLY"], &mut out);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let fut = async {
        wr.write_all(&out)
            .await
            .map_err(|e| UpstreamError::Closed(e.to_string()))?;
        for _ in 0..expected {
            let raw = read_frame(&mut rd, &mut buf).await?;
            if let Some(err) = resp::error_text(&raw) {
                return Err(UpstreamError::Protocol(String::from_utf8_lossy(err).into_owned()));
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| UpstreamError::Timeout)??;
    Ok((rd, wr, buf))
}

pub(crate) async fn read_frame(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<Bytes, UpstreamError> {
    let mut checker = resp::Checker::new(Limits::upstream());
    loop {
        match checker.check(buf) {
            Ok(Some(n)) => return Ok(buf.split_to(n).freeze()),
            Ok(None) => {}
            Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
        }
        let n = rd
            .read_buf(buf)
            .await
            .map_err(|e| UpstreamError::Closed(e.to_string()))?;
        if n == 0 {
            return Err(UpstreamError::Closed("eof".into()));
        }
    }
}

/// A connection owned by one client or one command (a `WATCH … EXEC`
/// transaction, a blocking command, a known-slow command): strictly one call
/// at a time, each bounded by `timeout` (the response timeout unless the
/// owner sets its own); after any failure it refuses further calls (for
/// WATCH: the watch is lost).
pub struct Dedicated {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    /// Bound on each call.
    pub timeout: Duration,
    broken: bool,
}

impl std::fmt::Debug for Dedicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedicated").field("broken", &self.broken).finish()
    }
}

impl Dedicated {
    pub async fn open(
        addr: &str,
        proto: Proto,
        timeout: Duration,
        auth: Option<&crate::config::Credentials>,
    ) -> Result<Dedicated, UpstreamError> {
        let (rd, wr, buf) = handshake(addr, proto, timeout, auth).await?;
        Ok(Dedicated {
            rd,
            wr,
            buf,
            timeout,
            broken: false,
        })
    }

    pub async fn call(&mut self, bytes: &[u8], replies: usize) -> Result<Vec<Bytes>, UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Closed(
                "an earlier call on this WATCH connection failed".into(),
            ));
        }
        let Dedicated { rd, wr, buf, .. } = self;
        let fut = async {
            wr.write_all(bytes)
                .await
                .map_err(|e| UpstreamError::Closed(e.to_string()))?;
            let mut out = Vec::with_capacity(replies);
            for _ in 0..replies {
                out.push(read_frame(rd, buf).await?);
            }
            Ok(out)
        };
        let result = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout),
        };
        if result.is_err() {
            self.broken = true;
        }
        result
    }
}

/// One command on a fresh connection (topology discovery), bounded by `timeout`.
pub async fn oneshot_command(
    addr: &str,
    args: &[&str],
    timeout: Duration,
    auth: Option<&crate::config::Credentials>,
) -> Result<Frame, UpstreamError> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let (mut rd, mut wr) = stream.into_split();
        let mut out = BytesMut::new();
        let opened = opening(auth, Proto::Resp2, &mut out);
        resp::encode_command(args, &mut out);
        wr.write_all(&out)
            .await
            .map_err(|e| UpstreamError::Closed(e.to_string()))?;
        let mut buf = BytesMut::new();
        for _ in 0..opened {
            let raw = read_frame(&mut rd, &mut buf).await?;
            if let Some(err) = resp::error_text(&raw) {
                return Err(UpstreamError::Protocol(String::from_utf8_lossy(err).into_owned()));
            }
        }
        let raw = read_frame(&mut rd, &mut buf).await?;
        resp::parse(&raw).map_err(|e| UpstreamError::Protocol(e.to_string()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}
