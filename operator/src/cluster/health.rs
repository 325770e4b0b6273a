//! Health probing: every node gets a TCP connect + `PING` every probe interval,
//! each under the response timeout, and a small state machine turns the
//! outcomes into Healthy → Suspect → Failed.
//!
//! A failed probe is retried after `min(probeInterval, responseTimeout)` rather
//! than a full interval, so a node that accepts TCP but never answers (SIGSTOP)
//! is Failed within `responseTimeout × failureThreshold + probeInterval`.
//! This module only measures; what to do about a failed node is the planner's.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cachetier_crds::NodeHealth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::{Auth, HealthConfig};

/// The probe history of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRecord {
    /// Current state.
    pub state: NodeHealth,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Round-trip time of the last successful probe.
    pub rtt: Option<Duration>,
    /// When the node became Failed (cleared when it recovers).
    pub failed_since: Option<Instant>,
    /// Why the last probe failed.
    pub last_error: Option<String>,
}

impl Default for HealthRecord {
    fn default() -> Self {
        Self {
            state: NodeHealth::Unknown,
            consecutive_failures: 0,
            rtt: None,
            failed_since: None,
            last_error: None,
        }
    }
}

impl HealthRecord {
    /// Applies one probe outcome observed at `now`.
    pub fn record(&mut self, outcome: Result<Duration, String>, now: Instant, failure_threshold: u32) {
        match outcome {
            Ok(rtt) => {
                self.state = NodeHealth::Healthy;
                self.consecutive_failures = 0;
                self.rtt = Some(rtt);
                self.failed_since = None;
                self.last_error = None;
            }
            Err(e) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some(e);
                if self.consecutive_failures >= failure_threshold.max(1) {
                    if self.state != NodeHealth::Failed {
                        self.failed_since = Some(now);
                    }
                    self.state = NodeHealth::Failed;
                } else {
                    self.state = NodeHealth::Suspect;
                }
            }
        }
    }

    /// How long the node has been Failed at `now` (zero if it is not).
    pub fn failed_for(&self, now: Instant) -> Duration {
        self.failed_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

/// One probe: connect, send `PING`, expect `+PONG` — all within `timeout`.
/// Returns the round-trip time of the whole exchange.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        stream
            .write_all(b"PING\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 7 {
            let n = stream
                .read(&mut buf[got..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".to_string());
            }
            got += n;
        }
        // `+PONG` normally; `-LOADING` means up but not usable yet, which is
        // still an answer: loading is the read gate's business, not health's.
        match buf[0] {
            b'+' | b'-' => Ok(()),
            _ => Err(format!(
                "unexpected reply {:?}",
                String::from_utf8_lossy(&buf[..got])
            )),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no reply within {timeout:?}")),
    }
}

/// Why a probe failed when the node answered but refused the credentials:
/// a configuration error (wrong or missing password), not a dead node.
pub const AUTH_ERROR: &str = "authentication";

fn bulk(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", s.len()).as_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// A health probe that presents `auth` first: `AUTH [user] password` then
/// `PING`, all within `timeout`. `-NOAUTH` or `-WRONGPASS` (with or without
/// credentials) fails it with an [`AUTH_ERROR`] message; any other reply
/// to `PING` is an answer, as in [`probe`].
pub async fn probe_as(addr: SocketAddr, timeout: Duration, auth: Option<&Auth>) -> Result<Duration, String> {
    let start = Instant::now();
    let mut request = Vec::new();
    let replies = match auth {
        Some(a) => {
            let n = if a.username.is_some() { 3 } else { 2 };
            request.extend_from_slice(format!("*{n}\r\n").as_bytes());
            bulk(&mut request, b"AUTH");
            if let Some(user) = &a.username {
                bulk(&mut request, user.as_bytes());
            }
            bulk(&mut request, a.password.as_bytes());
            2
        }
        None => 1,
    };
    request.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        // Simple replies are one line each; keep at most 1 KiB.
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while buf.windows(2).filter(|w| w == b"\r\n").count() < replies {
            let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > 1024 {
                return Err("reply too long".to_string());
            }
        }
        let text = String::from_utf8_lossy(&buf);
        for line in text.split("\r\n").take(replies) {
            if line.starts_with("-NOAUTH") || line.starts_with("-WRONGPASS") || line.starts_with("-ERR AUTH")
            {
                return Err(format!("{AUTH_ERROR}: {line}"));
            }
            if !line.starts_with(['+', '-']) {
                return Err(format!("unexpected reply {line:?}"));
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no reply within {timeout:?}")),
    }
}

type Records = Arc<Mutex<HashMap<SocketAddr, HealthRecord>>>;

fn lock(records: &Records) -> MutexGuard<'_, HashMap<SocketAddr, HealthRecord>> {
    // A panic while holding this lock leaves plain data behind; keep using it.
    records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Probes a changing set of nodes in the background, one task per node.
#[derive(Debug)]
pub struct HealthMonitor {
    config: HealthConfig,
    auth: Option<Auth>,
    records: Records,
    tasks: HashMap<SocketAddr, JoinHandle<()>>,
}

impl HealthMonitor {
    /// A monitor probing nothing yet.
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            auth: None,
            records: Arc::default(),
            tasks: HashMap::new(),
        }
    }

    /// Changes the probe settings; running probes restart with them.
    pub fn set_config(&mut self, config: HealthConfig) {
        if config != self.config {
            self.config = config;
            self.restart();
        }
    }

    /// Changes the credentials probes present; running probes restart.
    pub fn set_auth(&mut self, auth: Option<Auth>) {
        if auth != self.auth {
            self.auth = auth;
            self.restart();
        }
    }

    /// Restarts every probe with the current settings.
    fn restart(&mut self) {
        let targets: Vec<SocketAddr> = self.tasks.keys().copied().collect();
        for (_, task) in self.tasks.drain() {
            task.abort();
        }
        self.track(&targets);
    }

    /// Probes exactly `targets` from now on: starts probing new addresses and
    /// forgets addresses no longer listed.
    pub fn track(&mut self, targets: &[SocketAddr]) {
        let wanted: HashSet<SocketAddr> = targets.iter().copied().collect();
        self.tasks.retain(|addr, task| {
            let keep = wanted.contains(addr);
            if !keep {
                task.abort();
            }
            keep
        });
        lock(&self.records).retain(|addr, _| wanted.contains(addr));
        for &addr in &wanted {
            if self.tasks.contains_key(&addr) {
                continue;
            }
            let records = self.records.clone();
            let config = self.config;
            let auth = self.auth.clone();
            lock(&records).entry(addr).or_default();
            self.tasks
                .insert(addr, tokio::spawn(probe_loop(addr, config, auth, records)));
        }
    }

    /// Forgets what was learned about `addr` (another node now has that
    /// address); the next [`track`](Self::track) probes it afresh.
    pub fn forget(&mut self, addr: SocketAddr) {
        if let Some(task) = self.tasks.remove(&addr) {
            task.abort();
        }
        lock(&self.records).remove(&addr);
    }

    /// The current record of every tracked node.
    pub fn snapshot(&self) -> HashMap<SocketAddr, HealthRecord> {
        lock(&self.records).clone()
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn probe_loop(addr: SocketAddr, config: HealthConfig, auth: Option<Auth>, records: Records) {
    let retry = config.probe_interval.min(config.response_timeout);
    loop {
        let start = Instant::now();
        let outcome = probe_as(addr, config.response_timeout, auth.as_ref()).await;
        let failed = outcome.is_err();
        {
            let mut map = lock(&records);
            let Some(record) = map.get_mut(&addr) else { return };
            record.record(outcome, Instant::now(), config.failure_threshold);
        }
        let pause = if failed { retry } else { config.probe_interval };
        tokio::time::sleep_until(start + pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_go_suspect_then_failed_and_one_success_heals() {
        let mut r = HealthRecord::default();
        assert_eq!(r.state, NodeHealth::Unknown);
        let t0 = Instant::now();
        r.record(Err("timeout".into()), t0, 3);
        assert_eq!(r.state, NodeHealth::Suspect);
        r.record(Err("timeout".into()), t0, 3);
        assert_eq!(r.state, NodeHealth::Suspect);
        tokio::time::advance(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        r.record(Err("timeout".into()), t1, 3);
        assert_eq!(r.state, NodeHealth::Failed);
        assert_eq!(r.failed_since, Some(t1));
        tokio::time::advance(Duration::from_secs(5)).await;
        r.record(Err("timeout".into()), Instant::now(), 3);
        assert_eq!(
            r.failed_since,
            Some(t1),
            "failing longer does not restart the clock"
        );
        assert_eq!(r.failed_for(Instant::now()), Duration::from_secs(5));
        r.record(Ok(Duration::from_micros(80)), Instant::now(), 3);
        assert_eq!(r.state, NodeHealth::Healthy);
        assert_eq!(r.failed_for(Instant::now()), Duration::ZERO);
        assert_eq!(r.rtt, Some(Duration::from_micros(80)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_that_never_answers_fails_the_probe_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts (the kernel completes the handshake) but never replies: a SIGSTOPped node.
        let start = Instant::now();
        let outcome = probe(addr, Duration::from_millis(300)).await;
        assert!(outcome.unwrap_err().contains("no reply"));
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        drop(listener);
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_one_fails_on_the_first_miss() {
        let mut r = HealthRecord::default();
        r.record(Err("refused".into()), Instant::now(), 1);
        assert_eq!(r.state, NodeHealth::Failed);
    }
}
