//! A TCP relay that adds a fixed one-way delay in each direction: the
//! "remote node" of `bench/remote.sh` (issue 9, item 16). Bench tooling only;
//! the sidecar knows nothing of it.
//!
//! ```sh
//! cargo run --release -p cachetier-sidecar --example delay_relay -- \
//!     --listen 127.0.0.1:7601 --target 127.0.0.1:7600 --delay-us 250
//! ```
//!
//! Each byte is delivered `delay` after it was read, in order, and reading
//! goes on meanwhile (a pipelined link, not a stop-and-wait one).
//!
//! Plain threads, not tokio: tokio's timer has millisecond granularity (a
//! 250 µs `sleep` lasts up to 1.25 ms), while `std::thread::sleep` overshoots
//! by the kernel's timer slack only (about 50–60 µs), and the last 100 µs
//! are waited out with `yield_now`. Two threads per
//! direction of each connection (one reads, one delivers when due); the
//! sidecar opens a handful of upstream connections, the load generator one
//! per client. Stops on SIGTERM, or after `--max-seconds` (default one hour).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Args {
    listen: SocketAddr,
    target: SocketAddr,
    delay: Duration,
    max: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut target = None;
    let mut delay = Duration::from_micros(250);
    let mut max = Duration::from_secs(3600);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => listen = Some(value.parse().map_err(|e| bad(&e))?),
            "--target" => target = Some(value.parse().map_err(|e| bad(&e))?),
            "--delay-us" => delay = Duration::from_micros(value.parse().map_err(|e| bad(&e))?),
            "--max-seconds" => max = Duration::from_secs(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        target: target.ok_or("--target is required")?,
        delay,
        max,
    })
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    let listener = TcpListener::bind(args.listen).map_err(|e| format!("bind {}: {e}", args.listen))?;
    let max = args.max;
    std::thread::spawn(move || {
        std::thread::sleep(max);
        eprintln!("delay_relay: --max-seconds reached");
        std::process::exit(0);
    });
    for client in listener.incoming() {
        match client {
            Ok(client) => {
                let (target, delay) = (args.target, args.delay);
                std::thread::spawn(move || {
                    if let Err(e) = relay(client, target, delay) {
                        eprintln!("delay_relay: {e}");
                    }
                });
            }
            Err(e) => eprintln!("delay_relay: accept: {e}"),
        }
    }
    Ok(())
}

fn relay(client: TcpStream, target: SocketAddr, delay: Duration) -> std::io::Result<()> {
    let server = TcpStream::connect(target)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let up = pump(client.try_clone()?, server.try_clone()?, delay);
    let down = pump(server, client, delay);
    let _ = up.join();
    let _ = down.join();
    Ok(())
}

/// Reads `from` as data arrives and hands each chunk, stamped with its
/// delivery time, to a thread that writes it to `to` when due. An end of
/// either side shuts both down, so the other direction ends too.
fn pump(mut from: TcpStream, to: TcpStream, delay: Duration) -> std::thread::JoinHandle<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || deliver(rx, to));
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
        drop(tx);
        let _ = writer.join();
        let _ = from.shutdown(Shutdown::Both);
    })
}

/// Sleep until shortly before `due` (the kernel's timer slack would
/// overshoot it), then yield until it is there.
fn wait_until(due: Instant) {
    const SLACK: Duration = Duration::from_micros(100);
    let now = Instant::now();
    if due > now + SLACK {
        std::thread::sleep(due - now - SLACK);
    }
    while Instant::now() < due {
        std::thread::yield_now();
    }
}

fn deliver(rx: mpsc::Receiver<(Instant, Vec<u8>)>, mut to: TcpStream) {
    while let Ok((due, chunk)) = rx.recv() {
        wait_until(due);
        if to.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
