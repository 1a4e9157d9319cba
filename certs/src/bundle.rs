//! The trust bundle: the root certificates every workload trusts.
//!
//! A bundle holds one or more roots so that a CA can be rotated: during the
//! overlap the bundle carries both the old and the new root, and certificates
//! from either verify.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

use crate::error::CertError;

/// PEM tag of an X.509 certificate.
const CERTIFICATE_TAG: &str = "CERTIFICATE";

/// The set of root CA certificates a workload trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle of the given roots; each must be a CA certificate, and there
    /// must be at least one.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        if roots.is_empty() {
            return Err(bad_certificate(
                None,
                "a trust bundle needs at least one root",
            ));
        }
        let mut bundle = Self { roots: Vec::new() };
        for root in roots {
            bundle.push(root)?;
        }
        Ok(bundle)
    }

    /// Parses one or more PEM `CERTIFICATE` blocks, e.g. the answer of
    /// `GET /v1/ca/roots`.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        Self::new(decode_certificates(pem, None)?)
    }

    /// The roots as concatenated PEM blocks.
    pub fn to_pem(&self) -> String {
        encode_certificates(&self.roots)
    }

    /// The roots, DER-encoded, in the order they were added.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Adds a root (e.g. the next CA during a rotation); a root already in
    /// the bundle is not added twice.
    pub fn push(&mut self, root: CertificateDer<'static>) -> Result<(), CertError> {
        check_is_ca(&root)?;
        if !self.roots.contains(&root) {
            self.roots.push(root);
        }
        Ok(())
    }

    /// Adds every root of `other` that this bundle lacks.
    pub fn merge(&mut self, other: &TrustBundle) {
        for root in &other.roots {
            if !self.roots.contains(root) {
                self.roots.push(root.clone());
            }
        }
    }

    /// The roots as a rustls trust store.
    pub(crate) fn root_store(&self) -> Result<RootCertStore, CertError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone()).map_err(CertError::Tls)?;
        }
        Ok(store)
    }
}

/// Refuses anything that is not a parseable CA certificate: an end-entity
/// certificate in the bundle would silently trust only itself.
fn check_is_ca(der: &CertificateDer<'_>) -> Result<(), CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad_certificate(None, &format!("cannot parse root: {e}")))?;
    if !cert.is_ca() {
        return Err(bad_certificate(
            None,
            &format!("{} is not a CA certificate", cert.subject()),
        ));
    }
    Ok(())
}

fn bad_certificate(path: Option<&Path>, reason: &str) -> CertError {
    CertError::BadCertificate {
        path: path.map(Path::to_path_buf),
        reason: reason.to_owned(),
    }
}

/// Encodes certificates as concatenated PEM blocks.
pub(crate) fn encode_certificates(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|der| pem::Pem::new(CERTIFICATE_TAG, der.as_ref()))
        .collect();
    // LF line endings: the PEM goes into JSON and files on Unix hosts.
    pem::encode_many_config(
        &blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Decodes every PEM `CERTIFICATE` block; any other block, or none at all,
/// is an error.
pub(crate) fn decode_certificates(
    text: &str,
    path: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let blocks =
        pem::parse_many(text).map_err(|e| bad_certificate(path, &format!("not PEM: {e}")))?;
    if blocks.is_empty() {
        return Err(bad_certificate(path, "no PEM CERTIFICATE block found"));
    }
    blocks
        .into_iter()
        .map(|block| {
            if block.tag() == CERTIFICATE_TAG {
                Ok(CertificateDer::from(block.into_contents()))
            } else {
                Err(bad_certificate(
                    path,
                    &format!("unexpected PEM block {:?}", block.tag()),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;

    #[test]
    fn pem_round_trip_keeps_every_root() {
        let old = Ca::generate_in_memory().unwrap();
        let new = Ca::generate_in_memory().unwrap();
        let mut bundle = old.trust_bundle();
        bundle.merge(&new.trust_bundle());
        bundle.merge(&new.trust_bundle());
        assert_eq!(bundle.roots().len(), 2);

        let pem = bundle.to_pem();
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert_eq!(TrustBundle::from_pem(&pem).unwrap(), bundle);
    }

    #[test]
    fn refuses_empty_garbage_and_leaf_certificates() {
        assert!(matches!(
            TrustBundle::from_pem(""),
            Err(CertError::BadCertificate { .. })
        ));
        assert!(matches!(
            TrustBundle::from_pem("hello"),
            Err(CertError::BadCertificate { .. })
        ));
        let ca = Ca::generate_in_memory().unwrap();
        let id = crate::Identity::new("user", "z").unwrap();
        let leaf = ca
            .issue(&id, std::time::Duration::from_secs(60))
            .unwrap()
            .certified_key()
            .cert[0]
            .clone();
        assert!(matches!(
            TrustBundle::new(vec![leaf]),
            Err(CertError::BadCertificate { .. })
        ));
    }
}
