//! The workload side: a key pair, its CSR, and the certificate the CA
//! returned paired with that key for rustls.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::bundle::decode_certificates;
use crate::ca::IssuedCert;
use crate::config::crypto_provider;
use crate::error::CertError;
use crate::identity::Identity;
use crate::verify::identity_from_cert;

/// A workload's private key (ECDSA P-256). It never leaves the workload:
/// only its CSR is sent to the CA.
pub struct WorkloadKey {
    key: KeyPair,
}

impl fmt::Debug for WorkloadKey {
    // Hand-written so that the private key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generates a new ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, CertError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        Ok(Self { key })
    }

    /// A PEM CSR for this key. It names no identity: the CA decides the
    /// identity from the caller's credentials, so there is nothing to ask for.
    pub fn csr_pem(&self) -> Result<String, CertError> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "signpost workload");
        params.distinguished_name = name;
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(CertError::Generate)
    }

    /// The key pair, for signing in tests without a CSR round trip.
    #[cfg(test)]
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }

    /// The private key, PKCS#8 DER, for rustls.
    fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// A workload certificate chain paired with its private key, ready for
/// rustls, plus the facts the renewal loop and metrics need.
#[derive(Debug)]
pub struct WorkloadCert {
    certified: Arc<CertifiedKey>,
    identity: Identity,
    not_before: SystemTime,
    expires: SystemTime,
    serial: Vec<u8>,
    /// When this workload got the certificate; see [`WorkloadCert::renewal_start`].
    received: SystemTime,
}

impl WorkloadCert {
    /// Pairs the CA's answer with the key whose CSR it signed.
    ///
    /// Fails with [`CertError::KeyMismatch`] when the certificate is for
    /// another key, and [`CertError::BadCertificate`] when the chain does not
    /// parse or carries no identity.
    pub fn new(key: &WorkloadKey, issued: &IssuedCert) -> Result<Self, CertError> {
        Self::from_chain_pem(key, &issued.chain_pem)
    }

    /// Like [`WorkloadCert::new`], from the PEM chain alone (as the HTTP API
    /// returns it).
    pub fn from_chain_pem(key: &WorkloadKey, chain_pem: &str) -> Result<Self, CertError> {
        let chain = decode_certificates(chain_pem, None)?;
        let bad = |reason: String| CertError::BadCertificate { path: None, reason };
        let leaf = chain.first().ok_or_else(|| bad("empty chain".to_owned()))?;
        let identity = identity_from_cert(leaf).map_err(|e| bad(e.to_string()))?;
        let (not_before, expires, serial) = {
            let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
                .map_err(|e| bad(format!("cannot parse: {e}")))?;
            let validity = parsed.validity();
            (
                SystemTime::from(validity.not_before.to_datetime()),
                SystemTime::from(validity.not_after.to_datetime()),
                parsed.raw_serial().to_vec(),
            )
        };
        let certified = CertifiedKey::from_der(chain, key.private_key_der(), &crypto_provider())
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch { path: None },
                other => CertError::Tls(other),
            })?;
        Ok(Self {
            certified: Arc::new(certified),
            identity,
            not_before,
            expires,
            serial,
            received: SystemTime::now(),
        })
    }

    /// The chain and signing key in rustls' form.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }

    /// The identity the certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The certificate's not-before time.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The certificate's not-after time.
    pub fn expires(&self) -> SystemTime {
        self.expires
    }

    /// Where the renewal schedule counts the lifetime from: when the
    /// workload received the certificate, or its not-before if later. Not
    /// the not-before alone, because the CA back-dates that by a minute for
    /// clock skew, which would make a short-lived certificate look two
    /// thirds used the moment it arrives.
    pub fn renewal_start(&self) -> SystemTime {
        self.received.max(self.not_before)
    }

    /// The certificate's serial number, big-endian bytes.
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use std::time::Duration;

    #[test]
    fn pairs_an_issued_chain_with_its_key() {
        let ca = Ca::generate_in_memory().unwrap();
        let id = Identity::new("user", "xingren.host").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_csr(&key.csr_pem().unwrap(), &id, Duration::from_secs(600))
            .unwrap();
        let cert = WorkloadCert::new(&key, &issued).unwrap();
        assert_eq!(cert.identity(), &id);
        assert_eq!(cert.expires(), issued.expires);
        assert!(cert.not_before() < cert.expires());
        assert_eq!(cert.certified_key().cert.len(), 2);
        cert.certified_key().keys_match().unwrap();
        assert!(!cert.serial().is_empty());
    }

    #[test]
    fn refuses_a_chain_for_another_key() {
        let ca = Ca::generate_in_memory().unwrap();
        let id = Identity::new("user", "xingren.host").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let other = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_csr(&key.csr_pem().unwrap(), &id, Duration::from_secs(600))
            .unwrap();
        assert!(matches!(
            WorkloadCert::new(&other, &issued),
            Err(CertError::KeyMismatch { .. })
        ));
        assert!(matches!(
            WorkloadCert::from_chain_pem(&key, "garbage"),
            Err(CertError::BadCertificate { .. })
        ));
    }

    #[test]
    fn debug_output_hides_the_key() {
        let key = WorkloadKey::generate().unwrap();
        assert_eq!(format!("{key:?}"), "WorkloadKey { .. }");
    }
}
