//! The cachetier operator.
