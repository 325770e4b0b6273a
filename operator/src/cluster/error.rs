//! The crate's one error type. Each variant is a distinct failure class, and
//! [`Error::label`] names it for metrics and logs.

use std::net::SocketAddr;
use std::time::Duration;

/// Everything that can go wrong while managing a tier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TCP or Redis handshake with a node failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The node.
        addr: SocketAddr,
        /// What the client reported.
        #[source]
        source: redis::RedisError,
    },
    /// A node did not answer within the allowed time (a silent node).
    #[error("{addr} did not answer `{command}` within {timeout:?}")]
    Timeout {
        /// The node.
        addr: SocketAddr,
        /// The command that went unanswered.
        command: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A node answered a command with an error.
    #[error("`{command}` on {addr} failed: {source}")]
    Command {
        /// The node.
        addr: SocketAddr,
        /// The command.
        command: String,
        /// The error Redis (or the client) reported.
        #[source]
        source: redis::RedisError,
    },
    /// A node answered something this code cannot interpret.
    #[error("unexpected reply from {addr} to `{command}`: {detail}")]
    Protocol {
        /// The node.
        addr: SocketAddr,
        /// The command.
        command: String,
        /// What was wrong with the reply.
        detail: String,
    },
    /// The `redis-server` binary is not installed.
    #[error("redis-server not found (looked for `{binary}`): install it with `apt-get install redis-server`")]
    RedisServerMissing {
        /// The program name or path that was looked up.
        binary: String,
    },
    /// A local node process could not be started or did not come up.
    #[error("cannot start node {name}: {detail}")]
    NodeStart {
        /// The node's name.
        name: String,
        /// What happened, including the tail of its log when there is one.
        detail: String,
    },
    /// No free port pair (client port + cluster bus port) was found.
    #[error("no free port pair for a new node: {detail}")]
    NoFreePort {
        /// Where the search stopped.
        detail: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The CacheTier is invalid (schema, CEL rules, or a value this code cannot use).
    #[error(transparent)]
    Invalid(#[from] cachetier_crds::validate::Invalid),
    /// The sidecar in front of a local tier could not start.
    #[error("sidecar: {detail}")]
    Sidecar {
        /// What went wrong, naming the address or setting involved.
        detail: String,
    },
    /// A Kubernetes API call failed.
    #[error("{context}: {source}")]
    Kubernetes {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),
    /// The Secret that `spec.auth` names is missing or lacks a key (the
    /// tier waits for it; retried, since creating the Secret changes no tier).
    #[error("spec.auth: {0}")]
    AuthSecret(String),
    /// A Kubernetes object could not be rendered (a bug, not a user error).
    #[error("cannot render a Kubernetes object: {0}")]
    Render(String),
    /// The operation was asked to stop before it finished.
    #[error("gave up after {waited:?}: {what}")]
    Deadline {
        /// What did not happen in time.
        what: String,
        /// How long we waited.
        waited: Duration,
    },
}

impl Error {
    /// A failed Kubernetes API call, saying what was being done.
    pub fn kubernetes(context: impl Into<String>, source: kube::Error) -> Self {
        Self::Kubernetes {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// A short, stable name of the failure class, for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Command { .. } => "command",
            Self::Protocol { .. } => "protocol",
            Self::RedisServerMissing { .. } => "redis_server_missing",
            Self::NodeStart { .. } => "node_start",
            Self::NoFreePort { .. } => "no_free_port",
            Self::Io { .. } => "io",
            Self::Invalid(_) => "invalid",
            Self::Sidecar { .. } => "sidecar",
            Self::Deadline { .. } => "deadline",
            Self::Render(_) => "render",
            Self::Kubernetes { .. } => "kubernetes",
            Self::Lease(_) => "lease",
            Self::AuthSecret(_) => "auth_secret",
        }
    }

    /// Whether retrying later may succeed (everything but a bad spec or a
    /// missing binary).
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Invalid(_) | Self::RedisServerMissing { .. })
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
