//! A TCP relay on 127.0.0.1 between a test's client (e.g. the operator) and
//! a target (e.g. one Redis node), which the test can cut and restore, or
//! slow down by a fixed one-way delay per direction.
//!
//! Cut modes model the two ways a network partition looks to a client:
//! [`Cut::Refuse`] — every connection is dropped and new ones are closed at
//! once (a dead host that answers with RST); [`Cut::Blackhole`] — connections
//! are accepted and kept but nothing is forwarded (a host that "accepts TCP
//! and never answers", a silent partition). [`Relay::restore`] resumes
//! forwarding; data held during a blackhole is then delivered, as TCP
//! retransmission would after the partition heals.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How a cut relay treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Drop every connection; close new ones at once.
    Refuse,
    /// Accept and hold connections, forward nothing.
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Cut(Cut),
}

#[derive(Debug, Default, Clone, Copy)]
struct Delays {
    /// Client → target.
    up: Duration,
    /// Target → client.
    down: Duration,
}

#[derive(Debug)]
struct Shared {
    mode: watch::Sender<Mode>,
    delays: Mutex<Delays>,
}

impl Shared {
    fn delays(&self) -> MutexGuard<'_, Delays> {
        self.delays.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running relay; dropping it stops it and every connection.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        // Connections watch the mode; a refusing relay drops them.
        self.shared.mode.send_replace(Mode::Cut(Cut::Refuse));
    }
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Forward);
        let shared = Arc::new(Shared {
            mode,
            delays: Mutex::new(Delays::default()),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Ok(Self { addr, shared, accept })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the relay (see [`Cut`]).
    pub fn cut(&self, how: Cut) {
        self.shared.mode.send_replace(Mode::Cut(how));
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.shared.mode.send_replace(Mode::Forward);
    }

    /// Delays every byte by `up` on its way to the target and by `down` on
    /// its way back (applies to data read from now on).
    pub fn set_delay(&self, up: Duration, down: Duration) {
        *self.shared.delays() = Delays { up, down };
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *shared.mode.borrow() == Mode::Cut(Cut::Refuse) {
            drop(client);
            continue;
        }
        tokio::spawn(connection(client, target, shared.clone()));
    }
}

/// Waits until the relay forwards; `false` if it refuses meanwhile.
async fn forwarding(mode: &mut watch::Receiver<Mode>) -> bool {
    let Ok(m) = mode.wait_for(|m| *m != Mode::Cut(Cut::Blackhole)).await else {
        return false;
    };
    *m == Mode::Forward
}

async fn connection(client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    // A blackholed relay holds the client without even reaching the target.
    if !forwarding(&mut mode).await {
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let up = pump(client_r, server_w, shared.clone(), true);
    let down = pump(server_r, client_w, shared.clone(), false);
    // Either direction ending (EOF, error, refusal) ends the connection.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies one direction: reads chunks, stamps each with its delivery time,
/// and a writer delivers them in order once due and while forwarding.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: Arc<Shared>, upstream: bool) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader_shared = shared.clone();
    let reader = async move {
        let mut mode = reader_shared.mode.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if !forwarding(&mut mode).await {
                return;
            }
            let n = tokio::select! {
                n = from.read(&mut buf) => n,
                _ = mode.changed() => continue,
            };
            let Ok(n @ 1..) = n else { return };
            let d = *reader_shared.delays();
            let delay = if upstream { d.up } else { d.down };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        let mut mode = shared.mode.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if !forwarding(&mut mode).await || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer drains what the reader queued before its EOF; a refusal
    // ends both at once.
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests;
