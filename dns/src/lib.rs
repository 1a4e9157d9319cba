//! The DNS server.
//!
//! This crate is responsible for answering the Signpost zone from the latest
//! catalog snapshot (never calling the store per query) and for forwarding
//! names outside the zone to upstream resolvers, so that a host can put it in
//! resolv.conf. It does not talk to etcd itself: it is handed a catalog.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
