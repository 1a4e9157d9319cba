//! Sorting TLS handshake failures by reason, for logs and the sidecar's
//! "handshake failures by reason" metric.
//!
//! The classification is by error type, never by message text: rustls'
//! certificate errors, the [`VerifyError`] our verifiers attach, and the
//! alerts a peer sends when it refuses us.

use std::fmt;

use rustls::{AlertDescription, CertificateError};

use crate::verify::VerifyError;

/// Why a TLS handshake failed, coarsely, as a stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's chain does not lead to a root in our trust bundle (another
    /// mesh, or a CA we no longer trust).
    UnknownCa,
    /// The peer's certificate is outside its validity period: expired, or
    /// not yet valid (TLS reports both as `certificate_expired`, and both
    /// usually mean a stopped renewal or a wrong clock).
    Expired,
    /// The peer proved another identity than expected, one from another
    /// zone, or none at all.
    WrongIdentity,
    /// A server requiring client certificates got none.
    NoClientCert,
    /// Anything else: protocol errors, unsupported algorithms, I/O.
    Other,
}

impl HandshakeFailure {
    /// The reason as a metric label value, e.g. `unknown_ca`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::WrongIdentity => "wrong_identity",
            Self::NoClientCert => "no_client_cert",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies a handshake error.
///
/// The side that refused the handshake sees the precise error; the side
/// that was refused sees only the alert the other sent, which is classified
/// where it is unambiguous (`unknown_ca`, `certificate_expired`,
/// `certificate_required`). An identity mismatch travels as the generic
/// `certificate_unknown` alert, so on the refused side it counts as
/// [`HandshakeFailure::Other`].
pub fn classify(err: &rustls::Error) -> HandshakeFailure {
    match err {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => HandshakeFailure::Expired,
            CertificateError::Other(_) => match verify_error(err) {
                Some(VerifyError::BadCertificate { .. }) | None => HandshakeFailure::Other,
                Some(_) => HandshakeFailure::WrongIdentity,
            },
            _ => HandshakeFailure::Other,
        },
        rustls::Error::NoCertificatesPresented => HandshakeFailure::NoClientCert,
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA => HandshakeFailure::UnknownCa,
            AlertDescription::CertificateExpired => HandshakeFailure::Expired,
            AlertDescription::CertificateRequired => HandshakeFailure::NoClientCert,
            _ => HandshakeFailure::Other,
        },
        _ => HandshakeFailure::Other,
    }
}

/// Classifies an I/O error from tokio-rustls, which carries the
/// [`rustls::Error`] inside; any other I/O error is
/// [`HandshakeFailure::Other`].
pub fn classify_io(err: &std::io::Error) -> HandshakeFailure {
    rustls_error(err).map_or(HandshakeFailure::Other, classify)
}

/// The [`rustls::Error`] inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The [`VerifyError`] one of this crate's verifiers attached to a rustls
/// error, if any: it says which identity was expected and which presented.
pub fn verify_error(err: &rustls::Error) -> Option<&VerifyError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            other.0.downcast_ref::<VerifyError>()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use rustls::OtherError;
    use std::sync::Arc;

    #[test]
    fn classifies_each_reason() {
        let wrong = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(VerifyError::WrongIdentity {
                expected: Identity::new("user", "z").unwrap(),
                presented: Identity::new("order", "z").unwrap(),
            }),
        )));
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                HandshakeFailure::UnknownCa,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                HandshakeFailure::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidYet),
                HandshakeFailure::Expired,
            ),
            (wrong, HandshakeFailure::WrongIdentity),
            (
                rustls::Error::NoCertificatesPresented,
                HandshakeFailure::NoClientCert,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                HandshakeFailure::UnknownCa,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                HandshakeFailure::NoClientCert,
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateUnknown),
                HandshakeFailure::Other,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                HandshakeFailure::Other,
            ),
            (rustls::Error::HandshakeNotComplete, HandshakeFailure::Other),
        ];
        for (err, want) in cases {
            assert_eq!(classify(&err), want, "{err:?}");
        }
    }

    #[test]
    fn sees_through_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        );
        assert_eq!(classify_io(&io), HandshakeFailure::NoClientCert);
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify_io(&plain), HandshakeFailure::Other);
    }

    #[test]
    fn labels_are_stable() {
        assert_eq!(HandshakeFailure::UnknownCa.to_string(), "unknown_ca");
        assert_eq!(HandshakeFailure::NoClientCert.as_str(), "no_client_cert");
    }
}
