//! The DNS server.
//!
//! This crate is responsible for answering the Signpost zone from the latest
//! catalog snapshot (never calling the store per query) and for forwarding
//! names outside the zone to upstream resolvers, so that a host can put it in
//! resolv.conf. It does not talk to etcd itself: it is handed a catalog.
//!
//! Every snapshot the [`Catalog`](signpost_control_plane::catalog::Catalog)
//! publishes is turned into an index of ready-made record sets (one hash
//! lookup per query), each record also pre-encoded as wire bytes. UDP is
//! served by one receive/answer thread per socket (several sockets share the
//! port with SO_REUSEPORT) that answers common queries straight from those
//! bytes and hands anything unusual to the hickory handler; hickory-server
//! runs the TCP listener.
//!
//! The answer rules so live in two places: the hickory path
//! (`handler.rs`, `response.rs`), which every query can take, and the UDP
//! fast path (`fast/respond.rs`), which answers the common ones from the
//! pre-encoded bytes. A change to what an answer holds goes into both; the
//! differential tests in `fast/tests.rs` (every row of the answer table,
//! then random and mutated queries, through both paths) fail when they
//! disagree.
//!
//! Decisions a user can observe, beyond ../shared/CONTRACT.md:
//!
//! - `<id>.<svc>.Z` answers the instance's address whatever its health (the
//!   name picks one instance); the service, tag and port names list healthy
//!   instances only. A name exists while any instance carries it, so an
//!   all-unhealthy service or tag is NODATA, not NXDOMAIN.
//! - Reverse names of instance addresses answer PTR with AA set. Any other
//!   reverse name (or another type at a known one) is treated like every
//!   name outside the zone: forwarded for clients allowed to recurse that
//!   set RD, REFUSED otherwise.
//! - UDP answers are capped at the client's EDNS size and at
//!   [`DnsConfig::max_udp_payload`] (1232 by default), 512 without EDNS.
//!   A set that does not fit is not sent and TC is set (RFC 2181 §9);
//!   under [`DnsConfig::udp_answer_limit`] at most that many records, drawn
//!   by weight, without TC. Over TCP, as many as fit in 64 KiB, by weight.
//! - Zone transfers (AXFR, IXFR over TCP) are for clients in
//!   [`DnsConfig::allow_transfer`] only, REFUSED for others; the zone sent
//!   is what queries answer, the serial the catalog revision; NOTIFY goes
//!   to [`DnsConfig::notify`] when the serial changes. Over UDP an IXFR
//!   gets the SOA alone, an AXFR REFUSED.
//! - Classes other than IN (but CHAOS, below) are REFUSED, other opcodes
//!   NOTIMP, several questions FORMERR, EDNS versions above 0 BADVERS.
//!   NOTIMP and FORMERR carry `qr rd` only, as Knot's do (no RA, no CD);
//!   DO is copied back in the OPT record (RFC 3225 §3).
//! - CHAOS TXT `id.server` and `hostname.bind` answer the replica's id
//!   ([`DnsConfig::nsid`], also sent as NSID to queries that ask, RFC
//!   5001); `version.bind` answers [`DnsConfig::version_string`], REFUSED
//!   when unset; any other CHAOS name is REFUSED.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

mod config;
mod error;
mod fast;
mod forward;
mod handler;
mod identity;
mod index;
mod metrics;
mod name;
mod notify;
mod response;
mod select;
mod server;
mod transfer;
mod wire;

#[cfg(any(test, feature = "test-support"))]
pub mod testing;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod table_tests;

pub use config::{
    DEFAULT_FORWARD_TIMEOUT, DEFAULT_LISTEN, DEFAULT_MAX_FORWARDS, DEFAULT_MAX_UDP_PAYLOAD,
    DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_TTL, DEFAULT_ZONE, DnsConfig, default_allow_recursion,
    default_nsid, default_upstreams, parse_resolv_conf,
};
pub use error::DnsError;
pub use server::DnsServer;
