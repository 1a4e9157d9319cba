//! The mesh certificate authority.
//!
//! This crate is responsible for Signpost's identities: generating and loading
//! the root CA, signing workload CSRs for SPIFFE identities
//! (`spiffe://<zone>/svc/<service>`), the trust bundle, and rustls client and
//! server configurations that verify a peer's identity. It is a leaf: it knows
//! nothing of the catalog, the store or the network.
//!
//! The pieces, by module:
//!
//! - [`Identity`] — a service's identity in a zone, parsed from and
//!   formatted to its URI.
//! - [`Ca`] — the root CA on disk (`ca.pem`, `ca-key.pem`) or in memory for
//!   `--dev`; [`Ca::sign_csr`] signs a workload's CSR for the identity the
//!   *caller* names, never one the CSR asks for. [`TrustBundle`] holds the
//!   roots workloads trust (more than one during a CA rotation).
//! - [`WorkloadKey`] and [`WorkloadCert`] — the workload's key, its CSR, and
//!   the returned chain paired with the key for rustls.
//! - [`CertHolder`] — the current certificate, swapped on renewal without
//!   touching established connections, and [`CertHolder::run_renewal`],
//!   which renews at two thirds of the lifetime.
//! - [`server_config`] / [`client_config`] — TLS 1.3 mTLS configs whose
//!   verifiers check the chain against the bundle and then the peer's
//!   identity; [`peer_identity`] reads the caller's identity after the
//!   handshake for authorization.
//! - [`classify`] — why a handshake failed ([`HandshakeFailure`]), by error
//!   type, for metrics.
//!
//! It is not responsible for deciding *who* may get a certificate (the
//! control plane authenticates the requester and passes the identity) nor
//! for *which* callers a service accepts (the sidecar applies the
//! allow-list to [`peer_identity`]).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use signpost_certs::{Ca, CertHolder, ClientAuth, Identity, WorkloadCert, WorkloadKey};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = Ca::generate_in_memory()?;
//! let user = Identity::parse("spiffe://xingren.host/svc/user")?;
//!
//! // The workload makes a key and a CSR; the CA signs it for the identity
//! // the control plane authenticated.
//! let key = WorkloadKey::generate()?;
//! let issued = ca.sign_csr(&key.csr_pem()?, &user, Duration::from_secs(24 * 3600))?;
//! let holder = Arc::new(CertHolder::new(WorkloadCert::new(&key, &issued)?));
//!
//! let bundle = ca.trust_bundle();
//! let inbound = signpost_certs::server_config(
//!     &bundle,
//!     user.zone(),
//!     holder.clone(),
//!     ClientAuth::Required,
//!     signpost_certs::default_alpn(),
//! )?;
//! let order = Identity::new("order", "xingren.host")?;
//! let outbound =
//!     signpost_certs::client_config(&bundle, order, holder, signpost_certs::default_alpn())?;
//! # let _ = (inbound, outbound);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

mod bundle;
mod ca;
mod config;
mod error;
mod failure;
mod holder;
mod identity;
mod verify;
mod workload;

#[cfg(test)]
mod tests;

pub use bundle::TrustBundle;
pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CA_VALIDITY, CLOCK_SKEW, Ca, IssuedCert, MAX_CERT_TTL, MIN_CERT_TTL,
};
pub use config::{
    ALPN_H2, ALPN_HTTP1, client_config, crypto_provider, default_alpn, server_config,
};
pub use error::CertError;
pub use failure::{HandshakeFailure, classify, classify_io, rustls_error, verify_error};
pub use holder::CertHolder;
pub use identity::{Identity, IdentityError};
pub use verify::{
    ClientAuth, ClientIdentityVerifier, ServerIdentityVerifier, VerifyError, identity_from_cert,
    peer_identity,
};
pub use workload::{WorkloadCert, WorkloadKey};
