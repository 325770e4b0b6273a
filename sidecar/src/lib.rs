//! The cachetier sidecar: a per-pod proxy that makes a Redis Cluster look like a
//! single Redis server on localhost. Not yet implemented.
