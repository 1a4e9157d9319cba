//! The crate's error type for CA, signing and configuration failures.
//!
//! Handshake-time failures are not here: rustls reports those as
//! [`rustls::Error`], which [`crate::classify`] sorts into
//! [`crate::HandshakeFailure`].

use std::path::PathBuf;
use std::time::Duration;

use crate::identity::IdentityError;

/// Why a CA, signing or configuration operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file of the CA could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `Ca::init` found an existing CA file and refused to overwrite it:
    /// overwriting a key would orphan every certificate it signed.
    #[error(
        "{path} already exists; refusing to overwrite an existing CA (load it instead, or choose an empty folder)"
    )]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// `Ca::load` found no CA file where it looked.
    #[error("{path} not found; create a CA first with `signpost ca init --dir <DIR>`")]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// The CA's private key file could not be parsed.
    #[error("{path}: not a usable private key: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A certificate (CA file, trust bundle or issued chain) could not be
    /// parsed or is not of the expected kind.
    #[error("invalid certificate{}: {reason}", .path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    BadCertificate {
        /// The file it came from, when there was one.
        path: Option<PathBuf>,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key does not belong to the certificate it was paired with.
    #[error("the private key does not match the certificate{}", .path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    KeyMismatch {
        /// The certificate file, when there was one.
        path: Option<PathBuf>,
    },
    /// The CSR is not PEM, not a CSR, uses an unsupported algorithm or
    /// extension, or its self-signature does not verify. The caller's fault
    /// (an HTTP API answers 400).
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr {
        /// What is wrong with it.
        reason: String,
    },
    /// The requested certificate lifetime is outside the allowed range. The
    /// caller's fault (an HTTP API answers 400).
    #[error("certificate lifetime {ttl:?} is out of range ({min:?} to {max:?})")]
    InvalidTtl {
        /// The requested lifetime.
        ttl: Duration,
        /// The shortest allowed lifetime.
        min: Duration,
        /// The longest allowed lifetime.
        max: Duration,
    },
    /// A service name, zone or identity URI is invalid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Key generation or certificate signing failed inside rcgen.
    #[error("certificate generation failed: {0}")]
    Generate(#[source] rcgen::Error),
    /// rustls refused a key or configuration.
    #[error("TLS configuration failed: {0}")]
    Tls(#[source] rustls::Error),
    /// rustls could not build a certificate verifier from the trust bundle.
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

impl CertError {
    /// True when the error is the requester's fault (malformed CSR, bad
    /// lifetime, bad identity), so an API should answer 400 rather than 500.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Self::InvalidCsr { .. } | Self::InvalidTtl { .. } | Self::Identity(_)
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
