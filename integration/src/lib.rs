//! End-to-end test support.
//!
//! This crate holds the end-to-end tests (in `tests/`) that start a real etcd,
//! real `signpost` processes and real clients, plus the helpers they share.
//! It is never shipped.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
