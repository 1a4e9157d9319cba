//! Service identities: `spiffe://<zone>/svc/<service>`.
//!
//! An identity names a service in a zone, never an instance: every instance of
//! `user` proves the same identity, so authorization rules ("`order` may call
//! `user`") do not change as instances come and go.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::ServerName;

/// The URI scheme of every identity (SPIFFE IDs).
const SCHEME: &str = "spiffe://";
/// The path segment that precedes the service name.
const SVC_PATH: &str = "/svc/";
/// Longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;
/// Longest DNS name in text form without the trailing dot (RFC 1035).
const MAX_NAME: usize = 253;

/// Why a string is not a valid identity, service name or zone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {uri:?} is not a spiffe:// URI (expected spiffe://<zone>/svc/<service>)")]
    NotSpiffe {
        /// The rejected input.
        uri: String,
    },
    /// The URI's path is not `/svc/<service>`.
    #[error("identity {uri:?} has no /svc/<service> path (expected spiffe://<zone>/svc/<service>)")]
    BadPath {
        /// The rejected input.
        uri: String,
    },
    /// The service name is not a DNS label.
    #[error(
        "service name {name:?} is invalid: {rule} (a service name is a DNS label: a-z, 0-9 and '-', 1 to 63 characters, not starting or ending with '-')"
    )]
    BadService {
        /// The rejected service name.
        name: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The zone is not a DNS name.
    #[error(
        "zone {zone:?} is invalid: {rule} (a zone is a DNS name: dot-separated labels of a-z, 0-9 and '-')"
    )]
    BadZone {
        /// The rejected zone.
        zone: String,
        /// The rule it breaks.
        rule: &'static str,
    },
}

/// A service's identity within a zone, `spiffe://<zone>/svc/<service>`.
///
/// Both parts are validated and lower-cased on construction, so two equal
/// identities always format to the same URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    zone: String,
    service: String,
}

impl Identity {
    /// The identity of `service` in `zone`; both are lower-cased.
    pub fn new(service: &str, zone: &str) -> Result<Self, IdentityError> {
        let service = validate_service(service)?;
        let zone = validate_zone(zone)?;
        Ok(Self { zone, service })
    }

    /// Parses `spiffe://<zone>/svc/<service>`; anything else is an error.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        // The scheme is case-insensitive (RFC 3986); the rest is lower-cased
        // by `new`, as SPIFFE trust domains are.
        let rest = uri
            .get(..SCHEME.len())
            .filter(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
            .map(|_| &uri[SCHEME.len()..])
            .ok_or_else(|| IdentityError::NotSpiffe {
                uri: uri.to_owned(),
            })?;
        let bad_path = || IdentityError::BadPath {
            uri: uri.to_owned(),
        };
        let slash = rest.find('/').ok_or_else(bad_path)?;
        let (zone, path) = rest.split_at(slash);
        let service = path.strip_prefix(SVC_PATH).ok_or_else(bad_path)?;
        // A query, fragment or deeper path would make two URIs name one
        // identity; refuse them rather than silently dropping parts.
        if service.contains(['/', '?', '#']) {
            return Err(bad_path());
        }
        Self::new(service, zone)
    }

    /// The zone, e.g. `xingren.host`.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// The service name, e.g. `user`.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The URI form, `spiffe://<zone>/svc/<service>`.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// The service's DNS name, `<service>.<zone>`; also a SAN of its
    /// certificate.
    pub fn dns_name(&self) -> String {
        format!("{}.{}", self.service, self.zone)
    }

    /// The name to hand rustls when connecting to this service.
    ///
    /// The mesh verifier checks the SPIFFE identity rather than this name, but
    /// it is still sent as SNI, which helps when reading packet captures.
    pub fn server_name(&self) -> Result<ServerName<'static>, IdentityError> {
        ServerName::try_from(self.dns_name()).map_err(|_| IdentityError::BadZone {
            zone: self.zone.clone(),
            rule: "not usable as a TLS server name",
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{SVC_PATH}{}", self.zone, self.service)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks one DNS label, returning the rule it breaks.
fn label_rule(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        Some("empty label")
    } else if label.len() > MAX_LABEL {
        Some("longer than 63 characters")
    } else if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("only a-z, 0-9 and '-' are allowed")
    } else if label.starts_with('-') || label.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    }
}

/// Validates and lower-cases a service name.
pub(crate) fn validate_service(name: &str) -> Result<String, IdentityError> {
    let lower = name.to_ascii_lowercase();
    match label_rule(&lower) {
        None => Ok(lower),
        Some(rule) => Err(IdentityError::BadService {
            name: name.to_owned(),
            rule,
        }),
    }
}

/// Validates and lower-cases a zone (one trailing dot is accepted and dropped).
pub(crate) fn validate_zone(zone: &str) -> Result<String, IdentityError> {
    let lower = zone.to_ascii_lowercase();
    let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
    let bad = |rule| IdentityError::BadZone {
        zone: zone.to_owned(),
        rule,
    };
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    if trimmed.len() > MAX_NAME {
        return Err(bad("longer than 253 characters"));
    }
    if let Some(rule) = trimmed.split('.').find_map(label_rule) {
        return Err(bad(rule));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let id = Identity::parse("spiffe://xingren.host/svc/user").unwrap();
        assert_eq!(id.zone(), "xingren.host");
        assert_eq!(id.service(), "user");
        assert_eq!(id.uri(), "spiffe://xingren.host/svc/user");
        assert_eq!(id.dns_name(), "user.xingren.host");
        assert_eq!(id, Identity::new("user", "xingren.host").unwrap());
        assert_eq!(
            "spiffe://z/svc/a-1".parse::<Identity>().unwrap().service(),
            "a-1"
        );
    }

    #[test]
    fn lower_cases_input() {
        let id = Identity::parse("SPIFFE://Xingren.Host/svc/User").unwrap();
        assert_eq!(id.to_string(), "spiffe://xingren.host/svc/user");
        assert_eq!(Identity::new("user", "xingren.host.").unwrap(), id);
    }

    #[test]
    fn refuses_other_uris() {
        assert!(matches!(
            Identity::parse("https://xingren.host/svc/user"),
            Err(IdentityError::NotSpiffe { .. })
        ));
        assert!(matches!(
            Identity::parse("spiffe"),
            Err(IdentityError::NotSpiffe { .. })
        ));
        for uri in [
            "spiffe://xingren.host",
            "spiffe://xingren.host/",
            "spiffe://xingren.host/ns/default/sa/user",
            "spiffe://xingren.host/svc/user/extra",
            "spiffe://xingren.host/svc/user?x=1",
            "spiffe://xingren.host/svc/user#frag",
        ] {
            assert!(
                matches!(Identity::parse(uri), Err(IdentityError::BadPath { .. })),
                "{uri}"
            );
        }
        assert!(matches!(
            Identity::parse("spiffe://xingren.host/svc/"),
            Err(IdentityError::BadService { .. })
        ));
        assert!(matches!(
            Identity::parse("spiffe://xingren.host/svc/-user"),
            Err(IdentityError::BadService { .. })
        ));
        assert!(matches!(
            Identity::parse("spiffe://xin_gren.host/svc/user"),
            Err(IdentityError::BadZone { .. })
        ));
        assert!(matches!(
            Identity::parse("spiffe:///svc/user"),
            Err(IdentityError::BadZone { .. })
        ));
        assert!(matches!(
            Identity::new(&"a".repeat(64), "z"),
            Err(IdentityError::BadService { .. })
        ));
        assert!(matches!(
            Identity::new("user", "a..b"),
            Err(IdentityError::BadZone { .. })
        ));
    }

    #[test]
    fn error_names_the_rule() {
        let err = Identity::new("us er", "z").unwrap_err().to_string();
        assert!(err.contains("only a-z, 0-9 and '-' are allowed"), "{err}");
    }

    #[test]
    fn server_name_is_the_dns_name() {
        let id = Identity::new("user", "xingren.host").unwrap();
        assert_eq!(
            id.server_name().unwrap(),
            ServerName::try_from("user.xingren.host").unwrap()
        );
    }
}
