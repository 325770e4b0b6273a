//! Blocking commands (`BLPOP`, `BRPOP`, `BLMOVE`, `BRPOPLPUSH`, `BLMPOP`,
//! `BZPOPMIN`, `BZPOPMAX`, `BZMPOP`, `XREAD`/`XREADGROUP … BLOCK`) on a
//! connection of the client's own to the key's primary, as `WATCH` does: they
//! never stall a connection other clients share, and the watchdog gives them
//! their own timeout plus the response timeout. The connection is kept while
//! the client lives (a worker's `BRPOP` loop reuses it), replaced when the key
//! is on another node, and closed with the client. One per client; at most
//! [`MAX_BLOCKING`] in all (clients waiting in `WAIT` count too).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};

use crate::resp;
use crate::router::Router;
use crate::upstream::{Dedicated, Proto};

/// Most blocking connections one sidecar keeps open at a time.
pub const MAX_BLOCKING: usize = 1024;

/// A client's blocking connection.
#[derive(Debug)]
pub struct BlockingConn {
    addr: String,
    proto: Proto,
    conn: Dedicated,
    _permit: OwnedSemaphorePermit,
}

/// Held by a client for its blocking commands (one at a time).
pub type BlockingCell = Arc<Mutex<Option<BlockingConn>>>;

/// The sidecar-wide bound on blocking connections.
pub fn permits() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_BLOCKING))
}

const MAX_REDIRECTS: usize = 5;

/// The reply when [`MAX_BLOCKING`] clients are blocked already.
pub(crate) fn over_limit() -> Bytes {
    err(format!(
        "ERR cachetier: {MAX_BLOCKING} clients are already blocked through this sidecar; retry later"
    ))
}

fn err(msg: impl AsRef<str>) -> Bytes {
    let mut out = BytesMut::new();
    resp::Frame::Error(Bytes::copy_from_slice(msg.as_ref().as_bytes())).encode(&mut out);
    out.freeze()
}

/// `-MOVED 3999 127.0.0.1:6381` → `127.0.0.1:6381` (also `-ASK`).
fn redirect(reply: &[u8], kind: &[u8]) -> Option<String> {
    let text = resp::error_text(reply)?;
    let rest = text.strip_prefix(kind)?;
    let addr = std::str::from_utf8(rest).ok()?.split_whitespace().nth(1)?;
    (!addr.starts_with(':')).then(|| addr.to_string())
}

impl Router {
    /// Run a blocking command for `slot` on the client's own connection;
    /// `block` is how long the command may block by its own arguments
    /// (`None`: for ever).
    pub(crate) async fn blocking(
        &self,
        cell: &BlockingCell,
        slot: u16,
        cmd: Bytes,
        block: Option<Duration>,
        up: Proto,
    ) -> Bytes {
        let mut held = cell.lock().await;
        // A year stands for "no bound": a command blocked for ever is.
        let bound = block.map_or(Duration::from_secs(365 * 86_400), |b| {
            b + self.config.response_timeout
        });
        let mut target: Option<(String, bool)> = None;
        for _ in 0..MAX_REDIRECTS {
            let (addr, asking) = match target.take() {
                Some(t) => t,
                None => match self.registry.current().shard(slot) {
                    Some(s) => (s.primary.addr.clone(), false),
                    None => return err(format!("CLUSTERDOWN Hash slot {slot} is not served")),
                },
            };
            if held.as_ref().is_none_or(|b| b.addr != addr || b.proto != up) {
                let permit = match held.take() {
                    Some(b) => b._permit,
                    None => match self.blocking_permits.clone().try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => return over_limit(),
                    },
                };
                let opened =
                    Dedicated::open(&addr, up, self.config.response_timeout, self.config.auth.as_ref()).await;
                match opened {
                    Ok(conn) => {
                        *held = Some(BlockingConn {
                            addr: addr.clone(),
                            proto: up,
                            conn,
                            _permit: permit,
                        })
                    }
                    Err(e) => return err(format!("ERR cachetier: upstream {addr} unavailable: {e}")),
                }
            }
            let Some(b) = held.as_mut() else {
                return err("ERR cachetier: blocking connection unavailable");
            };
            b.conn.timeout = bound;
            let (bytes, n) = resp::asking_if(asking, &cmd);
            match b.conn.call(&bytes, n).await {
                Ok(mut replies) => {
                    let reply = replies.pop().unwrap_or_default();
                    if let Some(to) = redirect(&reply, b"MOVED ") {
                        self.registry.request_refresh();
                        target = Some((to, false));
                    } else if let Some(to) = redirect(&reply, b"ASK ") {
                        target = Some((to, true));
                    } else {
                        return reply;
                    }
                }
                Err(e) => {
                    *held = None;
                    return err(format!(
                        "ERR cachetier: upstream {addr} failed during a blocking command ({e}); an element may or may not have been taken"
                    ));
                }
            }
        }
        err("ERR cachetier: too many MOVED/ASK redirects")
    }
}
