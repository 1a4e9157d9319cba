//! Peer verification: the chain against the trust bundle, then the peer's
//! SPIFFE identity.
//!
//! The identity check replaces the usual hostname check: a sidecar reaches
//! `user` at whatever address DNS returned, so what matters is that the peer
//! proves `spiffe://<zone>/svc/user`, not which name was dialled.
//!
//! Identity failures are reported to rustls as
//! `Error::InvalidCertificate(CertificateError::Other(OtherError(Arc<VerifyError>)))`
//! so [`crate::classify`] can recover them by type.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};
use tracing::debug;
use x509_parser::extensions::GeneralName;

use crate::bundle::TrustBundle;
use crate::config::crypto_provider;
use crate::error::CertError;
use crate::identity::{Identity, IdentityError, validate_zone};

/// Why a peer's identity was not accepted, or could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The peer presented no certificate (e.g. a permissive server's
    /// plain-identity client).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate could not be parsed.
    #[error("cannot parse the peer certificate: {reason}")]
    BadCertificate {
        /// What the parser said.
        reason: String,
    },
    /// The certificate has no URI SAN, so it names no identity.
    #[error("the certificate carries no spiffe:// identity")]
    NoIdentity,
    /// The certificate has more than one URI SAN; SPIFFE allows exactly one,
    /// and picking one would let a CA mistake grant two identities.
    #[error("the certificate carries {count} URI SANs; exactly one is allowed")]
    AmbiguousIdentity {
        /// How many URI SANs it carries.
        count: usize,
    },
    /// The URI SAN is not a valid `spiffe://<zone>/svc/<service>`.
    #[error("the certificate's identity is invalid: {0}")]
    BadIdentity(#[from] IdentityError),
    /// The peer proved an identity other than the one the client meant to
    /// reach.
    #[error("expected peer {expected}, but it presented {presented}")]
    WrongIdentity {
        /// The identity the client meant to reach.
        expected: Identity,
        /// The identity the peer's certificate proves.
        presented: Identity,
    },
    /// The peer's identity belongs to another zone than the server's.
    #[error("peer {presented} is not in zone {zone}")]
    WrongZone {
        /// The server's zone.
        zone: String,
        /// The identity the peer's certificate proves.
        presented: Identity,
    },
}

/// Whether a server demands client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Strict mTLS: a client without a certificate is refused in the
    /// handshake.
    Required,
    /// Permissive: a client certificate is requested and verified when
    /// sent, but a client may connect without one (and then has no
    /// identity; authorization decides what it may do).
    Optional,
}

/// Reads the SPIFFE identity from a certificate's URI SAN.
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<Identity, VerifyError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| VerifyError::BadCertificate {
            reason: e.to_string(),
        })?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| VerifyError::BadCertificate {
            reason: e.to_string(),
        })?
        .ok_or(VerifyError::NoIdentity)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(VerifyError::NoIdentity),
        [uri] => Ok(Identity::parse(uri)?),
        more => Err(VerifyError::AmbiguousIdentity { count: more.len() }),
    }
}

/// The identity of the peer of an established connection, for
/// authorization after the handshake. Accepts a `&ServerConnection` or
/// `&ClientConnection` too (they dereference to [`CommonState`]).
pub fn peer_identity(conn: &CommonState) -> Result<Identity, VerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(VerifyError::NoPeerCertificate)?;
    identity_from_cert(leaf)
}

/// Wraps a [`VerifyError`] the way rustls carries custom verifier errors.
fn reject(err: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Verifies a server's certificate for a client: the chain must lead to a
/// root of the bundle, and the server must prove exactly the identity the
/// client meant to reach.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerIdentityVerifier {
    /// A verifier that accepts only `expected`, issued under `bundle`.
    pub fn new(bundle: &TrustBundle, expected: Identity) -> Result<Self, CertError> {
        Ok(Self {
            roots: Arc::new(bundle.root_store()?),
            expected,
            algorithms: crypto_provider().signature_verification_algorithms,
        })
    }

    /// The identity this verifier accepts.
    pub fn expected(&self) -> &Identity {
        &self.expected
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Ignored on purpose: the identity check below replaces the hostname
        // check (see the module docs).
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = identity_from_cert(end_entity).map_err(reject)?;
        if presented != self.expected {
            debug!(expected = %self.expected, presented = %presented, "server identity mismatch");
            return Err(reject(VerifyError::WrongIdentity {
                expected: self.expected.clone(),
                presented,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies a client's certificate for a server: the chain must lead to a
/// root of the bundle, and the client's identity must be in the server's
/// zone. Which services may call is decided after the handshake, from
/// [`peer_identity`], against the service's allow-list.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    zone: String,
}

impl ClientIdentityVerifier {
    /// A verifier for clients of `zone` issued under `bundle`.
    pub fn new(bundle: &TrustBundle, zone: &str, auth: ClientAuth) -> Result<Self, CertError> {
        let zone = validate_zone(zone)?;
        let builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(bundle.root_store()?),
            crypto_provider(),
        );
        let builder = match auth {
            ClientAuth::Required => builder,
            ClientAuth::Optional => builder.allow_unauthenticated(),
        };
        let inner = builder.build().map_err(CertError::Verifier)?;
        Ok(Self { inner, zone })
    }

    /// The zone whose identities this verifier accepts.
    pub fn zone(&self) -> &str {
        &self.zone
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = identity_from_cert(end_entity).map_err(reject)?;
        if presented.zone() != self.zone {
            debug!(zone = %self.zone, presented = %presented, "client identity from another zone");
            return Err(reject(VerifyError::WrongZone {
                zone: self.zone.clone(),
                presented,
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::string::Ia5String;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn self_signed_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    #[test]
    fn reads_the_identity_from_the_uri_san() {
        let cert = self_signed_with_sans(vec![uri("spiffe://z/svc/user")]);
        assert_eq!(
            identity_from_cert(&cert).unwrap(),
            Identity::new("user", "z").unwrap()
        );
    }

    #[test]
    fn refuses_certificates_without_exactly_one_valid_identity() {
        let none = self_signed_with_sans(vec![SanType::DnsName(
            Ia5String::try_from("user.z").unwrap(),
        )]);
        assert_eq!(identity_from_cert(&none), Err(VerifyError::NoIdentity));

        let no_san = self_signed_with_sans(vec![]);
        assert_eq!(identity_from_cert(&no_san), Err(VerifyError::NoIdentity));

        let two = self_signed_with_sans(vec![
            uri("spiffe://z/svc/user"),
            uri("spiffe://z/svc/admin"),
        ]);
        assert_eq!(
            identity_from_cert(&two),
            Err(VerifyError::AmbiguousIdentity { count: 2 })
        );

        let other = self_signed_with_sans(vec![uri("https://z/svc/user")]);
        assert!(matches!(
            identity_from_cert(&other),
            Err(VerifyError::BadIdentity(IdentityError::NotSpiffe { .. }))
        ));

        assert!(matches!(
            identity_from_cert(&CertificateDer::from(vec![1, 2, 3])),
            Err(VerifyError::BadCertificate { .. })
        ));
    }
}
