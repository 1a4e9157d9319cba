//! rustls server and client configurations for the mesh.
//!
//! Both are TLS 1.3 only (every peer is a Signpost sidecar, so there is no
//! old client to keep working), use the ring provider only, take their own
//! certificate from a [`CertHolder`] so renewals apply on the next
//! handshake, and verify peers with this crate's identity verifiers.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};

use crate::bundle::TrustBundle;
use crate::error::CertError;
use crate::holder::CertHolder;
use crate::identity::Identity;
use crate::verify::{ClientAuth, ClientIdentityVerifier, ServerIdentityVerifier};

/// ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The default ALPN list, most preferred first: `h2`, then `http/1.1`. The
/// sidecar appends its own value for opaque TCP tunnels.
pub fn default_alpn() -> Vec<Vec<u8>> {
    vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
}

/// The crypto provider every config here uses: ring, explicitly, because
/// rustls panics when more than one provider is compiled in and none is
/// installed as the process default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config for a sidecar's inbound side.
///
/// Clients must chain to `bundle` and carry an identity in `zone`; with
/// [`ClientAuth::Required`] a client without a certificate is refused.
/// Read the caller's identity after the handshake with
/// [`crate::peer_identity`].
pub fn server_config(
    bundle: &TrustBundle,
    zone: &str,
    certs: Arc<CertHolder>,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, CertError> {
    let verifier = ClientIdentityVerifier::new(bundle, zone, client_auth)?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(CertError::Tls)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(certs);
    config.alpn_protocols = alpn;
    // No resumption: every connection runs the full handshake, so each one
    // re-verifies the peer against the current bundle and presents the
    // current certificate. Mesh connections are pooled and long-lived, so
    // the saved round trip is not worth stale identities.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config for reaching `expected` (the sidecar builds one per
/// upstream service): the server must chain to `bundle` and prove exactly
/// `expected`. The client presents the certificate in `certs`.
pub fn client_config(
    bundle: &TrustBundle,
    expected: Identity,
    certs: Arc<CertHolder>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, CertError> {
    let verifier = ServerIdentityVerifier::new(bundle, expected)?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(CertError::Tls)?
        .dangerous()
        // "Dangerous" only in rustls' sense of replacing its default
        // verifier; ours verifies the chain with rustls' own webpki code.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(certs);
    config.alpn_protocols = alpn;
    // See server_config: no resumption, so rotations apply at once.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}
