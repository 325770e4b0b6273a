//! The crate's one error type, [`Error`] (variant names double as metric
//! labels), and [`UpstreamError`], the kind of upstream failure that
//! [`Error::Upstream`] wraps and that request paths classify (retry a read,
//! fail a write).

use std::net::SocketAddr;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no seed node answered CLUSTER SHARDS with a usable topology ({0})")]
    NoTopology(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("upstream {addr}: {kind}")]
    Upstream { addr: String, kind: UpstreamError },
    #[error("metrics registry")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Error::Bind { .. } => "bind",
            Error::NoTopology(_) => "no_topology",
            Error::Config(_) => "config",
            Error::Upstream { .. } => "upstream",
            Error::Metrics(_) => "metrics",
        }
    }
}

/// Why an upstream request got no reply. The caller decides what the client
/// sees: reads may be retried elsewhere, writes get an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("no reply within the response timeout (watchdog closed the connection)")]
    Timeout,
    #[error("connection lost: {0}")]
    Closed(String),
    #[error("protocol error in reply: {0}")]
    Protocol(String),
    /// The node no longer serves a slot the connection depends on (a
    /// subscriber's shard channel moved): the topology is stale.
    #[error("slot moved: {0}")]
    Moved(String),
}

impl UpstreamError {
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Closed(_) => "closed",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Moved(_) => "moved",
        }
    }
}
