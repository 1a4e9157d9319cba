//! The per-instance sidecar proxy.
//!
//! This crate is responsible for one instance's place in the mesh: it gets a
//! certificate, registers and heartbeats the instance, accepts mutual-TLS
//! traffic inbound and proxies the app's outbound calls to peers found through
//! Signpost DNS, balancing, retrying and ejecting failing peers. It does not
//! store anything: the control plane owns the catalog.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
