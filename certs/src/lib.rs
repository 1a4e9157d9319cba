//! The mesh certificate authority.
//!
//! This crate is responsible for Signpost's identities: generating and loading
//! the root CA, signing workload CSRs for SPIFFE identities
//! (`spiffe://<zone>/svc/<service>`), the trust bundle, and rustls client and
//! server configurations that verify a peer's identity. It is a leaf: it knows
//! nothing of the catalog, the store or the network.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
