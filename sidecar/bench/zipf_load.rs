//! A bounded zipfian GET load for `bench/remote.sh` (issue 9, item 16):
//! `--clients` connections, each sending `GET <prefix><k>` with `k` drawn
//! from a Zipf distribution over `--keys` keys (exponent `--zipf-s`), in
//! batches of `--pipeline`, until `--requests` in all were answered or
//! `--max-seconds` passed. Prints one line: requests, throughput, p50/p99
//! latency of a batch (send to last reply).
//!
//! ```sh
//! cargo run --release -p cachetier-sidecar --example zipf_load -- \
//!     --port 7601 --requests 200000 --clients 50 --keys 10000 --zipf-s 0.99
//! ```
//!
//! `--fill` first SETs every key to a `--value-bytes` value (on that port).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::SeedableRng;

#[derive(Clone)]
struct Args {
    port: u16,
    requests: u64,
    clients: usize,
    keys: usize,
    s: f64,
    pipeline: usize,
    prefix: String,
    max: Duration,
    fill: bool,
    value_bytes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 0,
        requests: 100_000,
        clients: 50,
        keys: 10_000,
        s: 0.99,
        pipeline: 1,
        prefix: "key:".into(),
        max: Duration::from_secs(60),
        fill: false,
        value_bytes: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--fill" {
            a.fill = true;
            continue;
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--port" => a.port = u16::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--requests" => a.requests = num(&v)?,
            "--clients" => a.clients = usize::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--keys" => a.keys = usize::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--pipeline" => a.pipeline = usize::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--value-bytes" => a.value_bytes = usize::try_from(num(&v)?).map_err(|e| e.to_string())?,
            "--max-seconds" => a.max = Duration::from_secs(num(&v)?),
            "--zipf-s" => a.s = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?,
            "--prefix" => a.prefix = v,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.port == 0 || a.clients == 0 || a.keys == 0 || a.pipeline == 0 {
        return Err("--port, and non-zero --clients, --keys, --pipeline are required".into());
    }
    Ok(a)
}

/// Cumulative Zipf weights over ranks 1..=n: rank r has weight 1/r^s.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|r| {
            acc += 1.0 / (r as f64).powf(s);
            acc
        })
        .collect();
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

fn command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply of a GET or SET (`$n`, `$-1`, `+...`, `-...`, `:n`);
/// an error reply is an error.
fn read_reply(r: &mut BufReader<TcpStream>, line: &mut String) -> Result<(), String> {
    line.clear();
    r.read_line(line).map_err(|e| e.to_string())?;
    match line.as_bytes().first() {
        Some(b'$') => {
            let n: i64 = line[1..]
                .trim_end()
                .parse()
                .map_err(|_| format!("bad header {line:?}"))?;
            if let Ok(n) = usize::try_from(n) {
                let mut body = vec![0u8; n + 2];
                r.read_exact(&mut body).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        Some(b'+' | b':') => Ok(()),
        Some(b'-') => Err(format!("error reply: {}", line.trim_end())),
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

fn fill(a: &Args) -> Result<(), String> {
    let stream = TcpStream::connect(("127.0.0.1", a.port)).map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let value = vec![b'v'; a.value_bytes];
    let mut line = String::new();
    for chunk in (0..a.keys).collect::<Vec<_>>().chunks(100) {
        let mut out = Vec::new();
        for k in chunk {
            out.extend(command(&[b"SET", format!("{}{k}", a.prefix).as_bytes(), &value]));
        }
        w.write_all(&out).map_err(|e| e.to_string())?;
        for _ in chunk {
            read_reply(&mut r, &mut line)?;
        }
    }
    Ok(())
}

fn client(a: &Args, cdf: &[f64], left: &AtomicU64, deadline: Instant, seed: u64) -> Result<Vec<u32>, String> {
    let stream = TcpStream::connect(("127.0.0.1", a.port)).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut line = String::new();
    let mut latencies_us = Vec::new();
    let batch = a.pipeline as u64;
    while Instant::now() < deadline
        && left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(batch))
            .is_ok()
    {
        let mut out = Vec::new();
        for _ in 0..a.pipeline {
            let u: f64 = rng.random();
            let k = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
            out.extend(command(&[b"GET", format!("{}{k}", a.prefix).as_bytes()]));
        }
        let start = Instant::now();
        w.write_all(&out).map_err(|e| e.to_string())?;
        for _ in 0..a.pipeline {
            read_reply(&mut r, &mut line)?;
        }
        latencies_us.push(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    Ok(latencies_us)
}

fn main() -> Result<(), String> {
    let a = parse_args()?;
    if a.fill {
        return fill(&a);
    }
    let cdf = Arc::new(zipf_cdf(a.keys, a.s));
    let left = Arc::new(AtomicU64::new(a.requests));
    let start = Instant::now();
    let deadline = start + a.max;
    let threads: Vec<_> = (0..a.clients)
        .map(|i| {
            let (a, cdf, left) = (a.clone(), cdf.clone(), left.clone());
            std::thread::spawn(move || client(&a, &cdf, &left, deadline, i as u64 + 1))
        })
        .collect();
    let mut lat = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(l)) => lat.extend(l),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a client thread panicked".into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let done = lat.len() as u64 * a.pipeline as u64;
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
        lat.get(i).map_or(0.0, |&us| f64::from(us) / 1000.0)
    };
    println!(
        "requests {done} in {secs:.2} s: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms{}",
        done as f64 / secs,
        pct(0.50),
        pct(0.99),
        if done < a.requests {
            " (stopped at --max-seconds)"
        } else {
            ""
        }
    );
    Ok(())
}
