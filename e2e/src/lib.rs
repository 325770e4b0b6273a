//! End-to-end test support for cachetier.
