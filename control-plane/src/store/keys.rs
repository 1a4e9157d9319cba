//! The key layout of ../shared/ARCHITECTURE.md, in one place.
//!
//! ```text
//! <prefix>services/<service>/instances/<id>   JSON Instance (under a lease when it has a ttl)
//! <prefix>services/<service>/health/<id>      JSON Health
//! <prefix>services/<service>/config           JSON ServiceConfig
//! <prefix>tokens/<sha256 hex>                 JSON TokenRecord
//! <prefix>ca/...                              CA roots, public parts
//! <prefix>checkers/<candidate>                health checker membership (leased)
//! <prefix>election/<name>                     elections: health-checker/<shard>, compactor
//! ```

use crate::model::{InstanceId, ServiceName};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/signpost/";

/// Builds and parses keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// An instance record.
    Instance(ServiceName, InstanceId),
    /// A health record.
    Health(ServiceName, InstanceId),
    /// A service's settings.
    Config(ServiceName),
    /// A token record, by hash.
    Token(String),
    /// Something else under the prefix (elections, CA, or keys this version
    /// does not know).
    Other,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// Keys under `prefix`; a missing trailing `/` is added.
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// The prefix itself (everything Signpost stores).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix of every service key.
    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }

    /// An instance key.
    pub fn instance(&self, svc: &ServiceName, id: &InstanceId) -> String {
        format!("{}services/{svc}/instances/{id}", self.prefix)
    }

    /// A health key.
    pub fn health(&self, svc: &ServiceName, id: &InstanceId) -> String {
        format!("{}services/{svc}/health/{id}", self.prefix)
    }

    /// A service config key.
    pub fn config(&self, svc: &ServiceName) -> String {
        format!("{}services/{svc}/config", self.prefix)
    }

    /// A token key.
    pub fn token(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.prefix)
    }

    /// The prefix of the CA's public parts.
    pub fn ca(&self) -> String {
        format!("{}ca/", self.prefix)
    }

    /// The prefix of the health checkers' memberships
    /// ([`crate::shards`]).
    pub fn checkers(&self) -> String {
        format!("{}checkers/", self.prefix)
    }

    /// An election's key prefix.
    pub fn election(&self, name: &str) -> String {
        format!("{}election/{name}", self.prefix)
    }

    /// Classifies `key`. Keys with names that break the label rule (written
    /// by something other than Signpost) are [`KeyKind::Other`].
    pub fn parse(&self, key: &str) -> KeyKind {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return KeyKind::Other;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["services", svc, "instances", id] => {
                match (ServiceName::new(svc), InstanceId::new(id)) {
                    (Ok(s), Ok(i)) => KeyKind::Instance(s, i),
                    _ => KeyKind::Other,
                }
            }
            ["services", svc, "health", id] => match (ServiceName::new(svc), InstanceId::new(id)) {
                (Ok(s), Ok(i)) => KeyKind::Health(s, i),
                _ => KeyKind::Other,
            },
            ["services", svc, "config"] => match ServiceName::new(svc) {
                Ok(s) => KeyKind::Config(s),
                Err(_) => KeyKind::Other,
            },
            ["tokens", hash] if !hash.is_empty() => KeyKind::Token((*hash).to_string()),
            _ => KeyKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("/signpost");
        let svc = ServiceName::new("user").unwrap();
        let id = InstanceId::new("u1").unwrap();
        assert_eq!(
            keys.instance(&svc, &id),
            "/signpost/services/user/instances/u1"
        );
        assert_eq!(
            keys.parse(&keys.instance(&svc, &id)),
            KeyKind::Instance(svc.clone(), id.clone())
        );
        assert_eq!(
            keys.parse(&keys.health(&svc, &id)),
            KeyKind::Health(svc.clone(), id)
        );
        assert_eq!(keys.parse(&keys.config(&svc)), KeyKind::Config(svc));
        assert_eq!(keys.parse(&keys.token("ab")), KeyKind::Token("ab".into()));
        assert_eq!(keys.parse("/other/services/user/config"), KeyKind::Other);
        assert_eq!(
            keys.parse("/signpost/services/Bad_Name/config"),
            KeyKind::Other
        );
    }
}
