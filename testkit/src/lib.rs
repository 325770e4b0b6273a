//! Test tools shared by the cachetier crates. Nothing here is used outside
//! tests.

pub mod relay;

pub use relay::{Cut, Relay};
