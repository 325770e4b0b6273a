//! Small ways a plain client expects the sidecar to act like one Redis 7
//! server (issue 9, items 8, 10, 12 and 13), against real redis-server
//! processes. One test binary, a file per concern.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod blocking;
mod clients;
mod errors;
mod scripts;
mod session;
mod streams;
mod tracking;
mod watch;
