//! The Redis Cluster management core: observe the cluster, plan the next steps
//! towards the spec, execute them; probe every node's health; compute the
//! tier's status. It drives nodes only through [`NodePool`] and knows nothing
//! about Kubernetes or processes.
//!
//! Module map: [`view`] observes, [`plan`] decides (pure), [`execute`] acts,
//! [`reconcile`] loops over the three ([`stuck`] paces retries of keys that
//! did not move), [`health`] probes, [`status`] reports,
//! [`config`] turns a spec into settings and redis.conf, [`pool`] is the
//! backend abstraction, [`conn`] bounds every Redis call by a timeout.

pub mod config;
pub mod conn;
pub mod error;
pub mod execute;
#[cfg(test)]
pub(crate) mod fixture;
pub mod health;
pub mod index;
pub mod plan;
pub mod pool;
pub mod reconcile;
pub mod settings;
pub mod status;
pub mod stuck;
pub mod view;

pub use config::{HealthConfig, TierConfig, Timing};
pub use plan::{Action, Plan};
pub use pool::{Listing, NodePool, PendingNode, PoolNode};
pub use reconcile::{Reconciler, Round};
