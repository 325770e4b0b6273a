//! The cachetier sidecar: a per-pod proxy that makes a Redis Cluster look like
//! one plain Redis server on localhost, so applications need no cluster-aware
//! client.
//!
//! It is responsible for the data path: the RESP codec ([`resp`]), slot
//! routing ([`slot`], [`commands`], [`router`]), topology discovery
//! ([`topology`]), read balancing over healthy replicas ([`balance`]), the
//! response watchdog ([`upstream`]), the replica read gate ([`gate`], whose
//! pure decisions live in [`replica`]), each client's execution order and
//! read-your-writes state ([`order`]), blocking commands on a client's own
//! connection ([`blocking`]), the local hot-key cache with server-assisted
//! invalidation ([`cache`], fed by [`tracking`]), client-side caching
//! (`CLIENT TRACKING`, [`client_cache`]), and its own metrics ([`metrics`]). It is *not* responsible for the cluster itself:
//! creating, scaling, failing over or repairing nodes is the operator's job;
//! the sidecar only observes the cluster and routes around trouble.
//!
//! Embed it with [`Sidecar::bind`] (returns a handle with the bound address)
//! or [`run`] (serves until a shutdown future resolves).

pub mod arity;
pub mod balance;
pub mod blocking;
pub mod cache;
pub mod client_cache;
pub mod clients;
pub mod commands;
pub mod config;
pub mod connect;
pub mod error;
pub mod gate;
pub mod inbox;
pub mod logs;
pub mod metrics;
pub mod order;
pub mod pipeline;
pub mod pubsub;
pub mod replica;
pub mod resp;
pub mod router;
pub mod server;
pub mod session;
pub mod slot;
pub mod stop;
pub mod topology;
pub mod tracking;
pub mod upstream;
pub mod written;

pub use config::{CacheConfig, Config, ReadPolicy};
pub use error::{Error, Result};
pub use server::{NodeState, Sidecar, run};

/// Locks a mutex, taking the data even if a panicking thread poisoned it: every
/// mutex here guards plain state that stays consistent between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
