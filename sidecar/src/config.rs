//! Configuration: typed structs the library consumes, and the clap/env front end
//! the binary uses. Every flag has a `CACHETIER_*` twin; a bad value exits with a
//! message naming both and the accepted form.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

use crate::error::{Error, Result};
use crate::resp::Limits;

/// How reads pick a node within the key's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPolicy {
    /// A uniformly random serving replica per request (plus the primary when
    /// [`Config::reads_include_primary`] is set); the primary only if no replica serves.
    #[default]
    Random,
    /// Two random serving replicas; the one with fewer requests in flight.
    BestOfTwo,
    /// Always the primary (strongest consistency, no read scaling).
    Primary,
    /// Serving replicas only; the primary is used (and counted) only when none serves.
    ReplicasOnly,
}

impl ReadPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadPolicy::Random => "random",
            ReadPolicy::BestOfTwo => "bestOfTwo",
            ReadPolicy::Primary => "primary",
            ReadPolicy::ReplicasOnly => "replicasOnly",
        }
    }
}

impl FromStr for ReadPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(ReadPolicy::Random),
            "bestOfTwo" | "best-of-two" => Ok(ReadPolicy::BestOfTwo),
            "primary" => Ok(ReadPolicy::Primary),
            "replicasOnly" | "replicas-only" => Ok(ReadPolicy::ReplicasOnly),
            _ => Err("expected one of: random, bestOfTwo, primary, replicasOnly".into()),
        }
    }
}

/// Credentials the sidecar uses towards the cluster (the tier's `auth`
/// Secret). Clients of the sidecar may send the same credentials with `AUTH`;
/// they are accepted but not required (the listener is pod-local).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// ACL user; `None` means the `default` user.
    pub username: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `AUTH` command for these credentials.
    pub fn auth_command(&self) -> Vec<&str> {
        match &self.username {
            Some(u) => vec!["AUTH", u.as_str(), self.password.as_str()],
            None => vec!["AUTH", self.password.as_str()],
        }
    }
}

/// The local hot-key cache. Disabled when `prefixes` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Key prefixes whose values may be cached (`product:`...). Empty = no cache.
    pub prefixes: Vec<String>,
    /// Time to live of an entry; at most [`CacheConfig::MAX_TTL`].
    pub ttl: Duration,
    /// Total weight bound: key + reply bytes of all entries.
    pub max_bytes: u64,
}

impl CacheConfig {
    pub const MAX_TTL: Duration = Duration::from_secs(3600);
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            prefixes: Vec::new(),
            ttl: Duration::from_secs(60),
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Everything the sidecar needs to run. The operator builds this from a
/// CacheTier's `sidecar` section; the binary builds it from flags and env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where applications connect (default `127.0.0.1:6379`; port 0 picks one).
    pub listen: SocketAddr,
    /// `HOST:PORT` of one or more cluster nodes used to discover the topology.
    pub seeds: Vec<String>,
    /// Where `/metrics`, `/livez` and `/readyz` are served; `None` disables.
    pub metrics: Option<SocketAddr>,
    pub read_policy: ReadPolicy,
    /// Under [`ReadPolicy::Random`], let the primary take its share of reads too.
    /// Off by default: primaries already carry every write.
    pub reads_include_primary: bool,
    /// Watchdog: the oldest outstanding request on an upstream connection may
    /// wait this long before the connection is closed and the node leaves rotation.
    pub response_timeout: Duration,
    /// Bound on a command known to be slow (`EVAL`/`EVALSHA`/`FCALL`, `KEYS`,
    /// `FLUSHALL`/`FLUSHDB`, `SCRIPT` fan-outs): it runs on a connection of
    /// its own, and its node is not judged silent while it runs, up to this.
    pub slow_command_timeout: Duration,
    /// A replica lagging its primary by more than this many bytes gets no reads.
    pub max_lag_bytes: u64,
    /// How often each replica's `INFO replication` is polled for the read gate.
    pub gate_interval: Duration,
    /// How often the topology is re-read even without a MOVED.
    pub topology_refresh: Duration,
    /// On shutdown, how long in-flight client requests may take to finish.
    pub drain_timeout: Duration,
    /// A client's reads of a slot it has just written go to the primary
    /// until a replica has caught up past the write (see README).
    pub read_your_writes: bool,
    /// A `MULTI` … `EXEC` whose keys span slots runs as one transaction per
    /// slot, and `WATCH` may span slots (true), or both are refused with
    /// `-CROSSSLOT` (false).
    pub split_transactions: bool,
    pub cache: CacheConfig,
    /// Bounds on client requests.
    pub limits: Limits,
    /// Most client connections at once (Redis' `maxclients`); one more is
    /// told `-ERR max number of clients reached` and closed.
    pub max_clients: usize,
    /// Most reply bytes waiting for one client that does not read (Redis'
    /// `client-output-buffer-limit`); past it the client is disconnected.
    pub client_output_limit: u64,
    /// Largest request being received from one client (Redis'
    /// `client-query-buffer-limit`).
    pub client_query_limit: u64,
    /// Upstream credentials; `None` for a tier without a password.
    pub auth: Option<Credentials>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 6379)),
            seeds: Vec::new(),
            metrics: None,
            read_policy: ReadPolicy::Random,
            reads_include_primary: false,
            response_timeout: Duration::from_secs(1),
            slow_command_timeout: Duration::from_secs(10),
            max_lag_bytes: 1024 * 1024,
            gate_interval: Duration::from_secs(1),
            topology_refresh: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            read_your_writes: true,
            split_transactions: true,
            cache: CacheConfig::default(),
            limits: Limits::default(),
            max_clients: 10_000,
            client_output_limit: 1024 * 1024 * 1024,
            client_query_limit: 1024 * 1024 * 1024,
            auth: None,
        }
    }
}

impl Config {
    /// Check cross-field rules the type system cannot express.
    pub fn validate(&self) -> Result<()> {
        if self.seeds.is_empty() {
            return Err(Error::Config(
                "at least one seed is required (--seed HOST:PORT or CACHETIER_SEEDS=host1:port,host2:port)"
                    .into(),
            ));
        }
        for s in &self.seeds {
            parse_host_port(s).map_err(|e| Error::Config(format!("seed {s:?}: {e}")))?;
        }
        if self.cache.ttl.is_zero() || self.cache.ttl > CacheConfig::MAX_TTL {
            return Err(Error::Config(
                "cache TTL must be between 1ms and 1h (--cache-ttl / CACHETIER_CACHE_TTL)".into(),
            ));
        }
        if !self.cache.prefixes.is_empty() && self.cache.max_bytes < 1024 {
            return Err(Error::Config(
                "cache size must be at least 1024 bytes (--cache-max-bytes / CACHETIER_CACHE_MAX_BYTES)"
                    .into(),
            ));
        }
        if self.cache.prefixes.iter().any(String::is_empty) {
            return Err(Error::Config(
                "an empty cache prefix would cache every key; list real prefixes (--cache-prefix / CACHETIER_CACHE_PREFIXES)".into(),
            ));
        }
        if self.response_timeout.is_zero() {
            return Err(Error::Config(
                "response timeout must be positive (--response-timeout / CACHETIER_RESPONSE_TIMEOUT)".into(),
            ));
        }
        if self.max_clients == 0
            || self.client_output_limit < 1024 * 1024
            || self.client_query_limit < 1024 * 1024
        {
            return Err(Error::Config(
                "--max-clients must be at least 1 and --client-output-limit / --client-query-limit at least 1MiB (CACHETIER_MAX_CLIENTS, CACHETIER_CLIENT_OUTPUT_LIMIT, CACHETIER_CLIENT_QUERY_LIMIT)".into(),
            ));
        }
        if self.gate_interval.is_zero() {
            return Err(Error::Config(
                "the read-gate interval must be positive, e.g. 1s (--gate-interval / CACHETIER_GATE_INTERVAL)".into(),
            ));
        }
        if self.topology_refresh.is_zero() {
            return Err(Error::Config(
                "the topology refresh interval must be positive, e.g. 10s (--topology-refresh / CACHETIER_TOPOLOGY_REFRESH)"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn parse_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. redis-0.redis:6379".to_string())?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err("expected HOST:PORT, e.g. redis-0.redis:6379".into());
    }
    Ok(())
}

/// Parse a duration: Go/Kubernetes style (`500ms`, `1s`, `1.5s`, `2m`, `1h30m`;
/// units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "invalid duration {s:?}: expected e.g. 500ms, 1s, 1.5s, 2m or 1h30m (units ns, us, ms, s, m, h)"
        )
    };
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map(Duration::from_secs).map_err(|_| err());
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (num, tail) = rest.split_at(num_len);
        let n: f64 = num.parse().map_err(|_| err())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ns" => n / 1e9,
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(err()),
        };
        total += Duration::try_from_secs_f64(secs).map_err(|_| err())?;
        rest = tail;
    }
    Ok(total)
}

/// Parse a byte size: `1048576`, `64KiB`, `64MiB`, `1GiB` (also KB/MB/GB as powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let err =
        || format!("invalid size {s:?}: expected bytes with an optional KiB, MiB or GiB suffix, e.g. 64MiB");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "KB" | "k" | "K" => 1024,
        "MiB" | "MB" | "m" | "M" => 1024 * 1024,
        "GiB" | "GB" | "g" | "G" => 1024 * 1024 * 1024,
        _ => return Err(err()),
    };
    n.checked_mul(mult).ok_or_else(err)
}

fn parse_seed(s: &str) -> Result<String, String> {
    parse_host_port(s).map(|()| s.to_string())
}

fn parse_policy(s: &str) -> Result<ReadPolicy, String> {
    s.parse()
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > CacheConfig::MAX_TTL {
        return Err(format!(
            "cache TTL {s:?} out of range: expected 1ms..1h, e.g. 60s"
        ));
    }
    Ok(d)
}

/// Command-line flags; each also reads its `CACHETIER_*` environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "cachetier-sidecar",
    about = "Redis Cluster sidecar proxy: plain Redis on localhost, cluster-aware upstream"
)]
pub struct Args {
    /// Address applications connect to (HOST:PORT).
    #[arg(
        long,
        env = "CACHETIER_LISTEN",
        default_value = "127.0.0.1:6379",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// A cluster seed node HOST:PORT (repeatable; env: comma-separated).
    #[arg(long = "seed", env = "CACHETIER_SEEDS", value_delimiter = ',', value_parser = parse_seed, value_name = "HOST:PORT", required = true)]
    pub seeds: Vec<String>,
    /// Address of the metrics/health HTTP server (HOST:PORT).
    #[arg(
        long,
        env = "CACHETIER_METRICS",
        default_value = "0.0.0.0:9121",
        value_name = "ADDR"
    )]
    pub metrics: SocketAddr,
    /// random | bestOfTwo | primary | replicasOnly.
    #[arg(long, env = "CACHETIER_READ_POLICY", default_value = "random", value_parser = parse_policy)]
    pub read_policy: ReadPolicy,
    /// Under `random`, also send reads to the primary.
    #[arg(long, env = "CACHETIER_READS_INCLUDE_PRIMARY")]
    pub reads_include_primary: bool,
    /// Watchdog timeout per upstream connection (e.g. 1s, 500ms).
    #[arg(long, env = "CACHETIER_RESPONSE_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub response_timeout: Duration,
    /// Bound on known-slow commands: scripts, functions, KEYS, FLUSHALL/FLUSHDB (e.g. 10s).
    #[arg(long, env = "CACHETIER_SLOW_COMMAND_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub slow_command_timeout: Duration,
    /// Replication lag (bytes) above which a replica gets no reads (e.g. 1MiB).
    #[arg(long, env = "CACHETIER_MAX_LAG_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_lag_bytes: u64,
    /// Read-gate polling interval (e.g. 1s).
    #[arg(long, env = "CACHETIER_GATE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub gate_interval: Duration,
    /// Route a client's reads of a slot it just wrote to the primary until a
    /// replica has caught up past the write (true | false).
    #[arg(long, env = "CACHETIER_READ_YOUR_WRITES", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub read_your_writes: bool,
    /// Run a MULTI/EXEC whose keys span slots as one transaction per slot,
    /// each atomic on its node, and let WATCH span slots (true), or refuse
    /// both with CROSSSLOT (false).
    #[arg(long, env = "CACHETIER_SPLIT_TRANSACTIONS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub split_transactions: bool,
    /// Most client connections at once (like Redis' maxclients).
    #[arg(
        long,
        env = "CACHETIER_MAX_CLIENTS",
        default_value_t = 10_000,
        value_name = "N"
    )]
    pub max_clients: usize,
    /// Reply bytes one non-reading client may have waiting before it is disconnected (e.g. 1GiB).
    #[arg(long, env = "CACHETIER_CLIENT_OUTPUT_LIMIT", default_value = "1GiB", value_parser = parse_bytes)]
    pub client_output_limit: u64,
    /// Largest request one client may send (e.g. 1GiB).
    #[arg(long, env = "CACHETIER_CLIENT_QUERY_LIMIT", default_value = "1GiB", value_parser = parse_bytes)]
    pub client_query_limit: u64,
    /// Periodic topology refresh interval (e.g. 10s).
    #[arg(long, env = "CACHETIER_TOPOLOGY_REFRESH", default_value = "10s", value_parser = parse_duration)]
    pub topology_refresh: Duration,
    /// Key prefix to cache locally (repeatable; env: comma-separated).
    #[arg(
        long = "cache-prefix",
        env = "CACHETIER_CACHE_PREFIXES",
        value_delimiter = ','
    )]
    pub cache_prefixes: Vec<String>,
    /// Local cache TTL, at most 1h (e.g. 60s).
    #[arg(long, env = "CACHETIER_CACHE_TTL", default_value = "60s", value_parser = parse_ttl)]
    pub cache_ttl: Duration,
    /// Local cache size bound in bytes (e.g. 64MiB).
    #[arg(long, env = "CACHETIER_CACHE_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub cache_max_bytes: u64,
    /// ACL user for the cluster (default user when unset).
    #[arg(long, env = "CACHETIER_USERNAME", requires = "password")]
    pub username: Option<String>,
    /// Password for the cluster; prefer the environment variable (from the tier's Secret).
    #[arg(long, env = "CACHETIER_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Shutdown drain bound (e.g. 5s).
    #[arg(long, env = "CACHETIER_DRAIN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Runtime threads: 1 = one event loop on the main thread (like
    /// twemproxy), N > 1 = a work-stealing pool of N, 0 = one per CPU.
    /// Binary only: an embedder's runtime is its own. The default is 1 because
    /// it measured fastest (BENCHMARKS.md): each request crosses three tasks,
    /// and on one thread those hand-offs are queue pushes, not futex wake-ups.
    #[arg(long, env = "CACHETIER_WORKER_THREADS", default_value = "1", value_parser = parse_worker_threads, value_name = "N")]
    pub worker_threads: usize,
    /// Logs on stdout as `text` or as one `json` object per line. Binary only.
    #[arg(long, env = "CACHETIER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

fn parse_worker_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= 1024 => Ok(n),
        _ => Err(format!(
            "invalid worker thread count {s:?}: expected 0 (one per CPU), 1 (single event loop) or a number up to 1024"
        )),
    }
}

impl From<Args> for Config {
    fn from(a: Args) -> Self {
        Config {
            listen: a.listen,
            seeds: a.seeds,
            metrics: Some(a.metrics),
            read_policy: a.read_policy,
            reads_include_primary: a.reads_include_primary,
            response_timeout: a.response_timeout,
            slow_command_timeout: a.slow_command_timeout,
            max_lag_bytes: a.max_lag_bytes,
            gate_interval: a.gate_interval,
            topology_refresh: a.topology_refresh,
            drain_timeout: a.drain_timeout,
            read_your_writes: a.read_your_writes,
            split_transactions: a.split_transactions,
            cache: CacheConfig {
                prefixes: a.cache_prefixes.into_iter().filter(|p| !p.is_empty()).collect(),
                ttl: a.cache_ttl,
                max_bytes: a.cache_max_bytes,
            },
            limits: Limits::default(),
            max_clients: a.max_clients,
            client_output_limit: a.client_output_limit,
            client_query_limit: a.client_query_limit,
            auth: a.password.map(|password| Credentials {
                username: a.username,
                password,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_accept_their_documented_forms() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("1 fortnight").unwrap_err().contains("500ms"));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert!(parse_bytes("lots").unwrap_err().contains("MiB"));
        assert!(parse_ttl("2h").is_err());
    }

    #[test]
    fn zero_poll_intervals_are_refused_naming_the_flag() {
        let base = Config {
            seeds: vec!["a:1".into()],
            ..Config::default()
        };
        base.validate().unwrap();
        let gate = Config {
            gate_interval: Duration::ZERO,
            ..base.clone()
        };
        assert!(
            gate.validate()
                .unwrap_err()
                .to_string()
                .contains("--gate-interval")
        );
        let topo = Config {
            topology_refresh: Duration::ZERO,
            ..base
        };
        assert!(
            topo.validate()
                .unwrap_err()
                .to_string()
                .contains("--topology-refresh")
        );
    }

    #[test]
    fn flags_build_a_config_and_bad_values_name_the_flag() {
        let a = Args::try_parse_from([
            "x",
            "--seed",
            "a:1",
            "--seed",
            "b:2",
            "--read-policy",
            "bestOfTwo",
            "--cache-prefix",
            "p:",
        ])
        .unwrap();
        let c = Config::from(a);
        assert_eq!(c.seeds, vec!["a:1", "b:2"]);
        assert_eq!(c.read_policy, ReadPolicy::BestOfTwo);
        assert_eq!(c.cache.prefixes, vec!["p:"]);
        c.validate().unwrap();
        let tiny = Config {
            cache: CacheConfig {
                max_bytes: 10,
                ..c.cache.clone()
            },
            ..c.clone()
        };
        assert!(
            tiny.validate()
                .unwrap_err()
                .to_string()
                .contains("--cache-max-bytes")
        );
        let err = Args::try_parse_from(["x", "--seed", "a:1", "--read-policy", "fastest"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--read-policy") && msg.contains("bestOfTwo"),
            "{msg}"
        );
        let a = Args::try_parse_from(["x", "--seed", "a:1"]).unwrap();
        assert_eq!(a.worker_threads, 1, "one event loop unless asked otherwise");
        assert!(a.read_your_writes, "read-your-writes is on unless turned off");
        let a = Args::try_parse_from(["x", "--seed", "a:1", "--read-your-writes", "false"]).unwrap();
        assert!(!Config::from(a).read_your_writes);
        let a = Args::try_parse_from(["x", "--seed", "a:1"]).unwrap();
        assert!(
            a.split_transactions,
            "cross-slot transactions are split unless turned off"
        );
        let a = Args::try_parse_from(["x", "--seed", "a:1", "--split-transactions", "false"]).unwrap();
        assert!(!Config::from(a).split_transactions);
        let a = Args::try_parse_from(["x", "--seed", "a:1", "--worker-threads", "4"]).unwrap();
        assert_eq!(a.worker_threads, 4);
        let err = Args::try_parse_from(["x", "--seed", "a:1", "--worker-threads", "many"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--worker-threads") && err.contains("single event loop"),
            "{err}"
        );
        let err = Args::try_parse_from(["x", "--seed", "nope"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--seed") && err.contains("HOST:PORT"), "{err}");
    }
}
