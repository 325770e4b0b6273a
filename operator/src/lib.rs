//! The cachetier operator as a library: the Redis Cluster management core
//! ([`cluster`]) and local mode ([`local`]), which runs a CacheTier on
//! `redis-server` processes on this machine.
//!
//! The core knows nothing about Kubernetes: it drives a cluster through the
//! [`cluster::NodePool`] trait, which local mode implements with processes and the
//! Kubernetes controller (a later part of this crate) will implement with pods.
//! The `cachetier-operator` binary (`main.rs`) is a thin command-line shell over it.

pub mod backoff;
#[cfg(test)]
mod chart_tests;
pub mod cluster;
pub mod controller;
pub mod inject;
pub mod local;
pub mod reconcile;
pub mod webhook;

pub use cluster::error::{Error, Result};
