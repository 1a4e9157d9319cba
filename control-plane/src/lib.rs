//! The control plane.
//!
//! This crate is responsible for the catalog: the model of services,
//! instances and their health ([`model`]), the store that keeps them (etcd in
//! production, in memory for `--dev`; [`store`]), the immutable snapshots that
//! every reader uses ([`catalog`]), the HTTP API ([`api`]), the active health
//! checker ([`health`]), etcd history compaction ([`compactor`]) and access
//! tokens ([`tokens`]). It does not serve DNS
//! and does not proxy traffic: `signpost-dns` and `signpost-sidecar` read the
//! catalog this crate builds.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod catalog;
pub mod client;
pub mod compactor;
pub mod health;
pub mod model;
pub mod server;
pub mod shards;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tokens;
