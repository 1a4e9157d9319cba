//! The catalog model: services, instances, health and service settings, and
//! the validation rules of ../shared/CONTRACT.md.
//!
//! Every value here is valid by construction: names are checked when they are
//! parsed, and a [`Registration`] (what a client sends) only becomes an
//! [`Instance`] (what is stored) through [`Registration::validate`].

use std::collections::BTreeMap;

use litemap::LiteMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;

/// Names nobody may take: `tag` is the label of tag subsets
/// (`<tag>.tag.<svc>.Z`), so an instance or service called `tag` would make
/// those names ambiguous.
const RESERVED: &[&str] = &["tag"];

/// Default instance weight, as in DNS SRV practice (and Consul's default).
pub const DEFAULT_WEIGHT: u16 = 100;

/// Shortest TTL a registration may ask for: below one second a heartbeat
/// could not keep up with round trips to etcd, and etcd leases count whole
/// seconds.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// Longest TTL: an instance that has not been heard of for a day is gone.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// At most this many `meta` keys per instance.
pub const MAX_META_KEYS: usize = 64;
/// At most this many bytes in a `meta` key.
pub const MAX_META_KEY_BYTES: usize = 128;
/// At most this many bytes in a `meta` value (and `key=value` must also
/// fit in one 255-byte TXT string, which is the tighter rule).
pub const MAX_META_VALUE_BYTES: usize = 512;
/// At most this many tags per instance.
pub const MAX_TAGS: usize = 64;
/// At most this many named ports per instance.
pub const MAX_PORTS: usize = 64;
/// At most this many bytes in a whole instance record (as stored): every
/// instance is held by every control plane and DNS replica, and one page of
/// a catalog read holds a thousand of them.
pub const MAX_INSTANCE_BYTES: usize = 16 * 1024;

/// Check interval when none is given: Consul's usual 10 s.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Check timeout when none is given.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a name was refused. Each message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name was empty.
    #[error("{kind} name is empty: names are DNS labels of 1 to 63 characters")]
    Empty {
        /// What was being named ("service", "instance", "tag", ...).
        kind: &'static str,
    },
    /// The name is longer than a DNS label may be.
    #[error(
        "{kind} name {name:?} is {len} characters long: names are DNS labels of 1 to 63 characters"
    )]
    TooLong {
        /// What was being named.
        kind: &'static str,
        /// The name as given.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The name holds a character outside `a-z 0-9 -`.
    #[error("{kind} name {name:?} contains {ch:?}: names may only contain a-z, 0-9 and '-'")]
    InvalidChar {
        /// What was being named.
        kind: &'static str,
        /// The name as given.
        name: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// The name starts or ends with a hyphen.
    #[error(
        "{kind} name {name:?} starts or ends with '-': names must start and end with a letter or digit"
    )]
    HyphenEdge {
        /// What was being named.
        kind: &'static str,
        /// The name as given.
        name: String,
    },
    /// The name is reserved.
    #[error(
        "{kind} name {name:?} is reserved: `tag` names the tag subsets in DNS (<tag>.tag.<service>)"
    )]
    Reserved {
        /// What was being named.
        kind: &'static str,
        /// The name as given.
        name: String,
    },
}

/// Checks `raw` against the label rule and returns it lower-cased.
pub fn validate_label(kind: &'static str, raw: &str) -> Result<String, NameError> {
    let name = raw.to_ascii_lowercase();
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_LABEL {
        return Err(NameError::TooLong {
            kind,
            len: name.chars().count(),
            name: raw.to_string(),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::InvalidChar {
            kind,
            name: raw.to_string(),
            ch,
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::HyphenEdge {
            kind,
            name: raw.to_string(),
        });
    }
    if RESERVED.contains(&name.as_str()) {
        return Err(NameError::Reserved {
            kind,
            name: raw.to_string(),
        });
    }
    Ok(name)
}

macro_rules! label_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(std::sync::Arc<str>);

        impl $ty {
            /// Validates and lower-cases `raw`.
            pub fn new(raw: &str) -> Result<Self, NameError> {
                validate_label($kind, raw).map(|s| Self(s.into()))
            }

            /// The name, lower-case.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(&s)
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0.to_string()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Hash and Eq are the inner `str`'s, so maps keyed by the name can
        // be searched with a `&str`. The name is shared, not copied, by its
        // clones: the catalog holds each service's and instance's name once
        // however many maps are keyed by it.
        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

label_type!(
    /// A service name: a DNS label (`user` in `user.xingren.host`).
    ServiceName,
    "service"
);
label_type!(
    /// An instance id, unique within its service: a DNS label
    /// (`u1` in `u1.user.xingren.host`).
    InstanceId,
    "instance"
);

/// A string shared by its clones. Tags, metadata and port names repeat
/// across a fleet's instances (`version=1.4.2` on hundreds of them), so the
/// catalog holds each distinct one once ([`Interner`]) and an instance
/// holds a pointer to it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(std::sync::Arc<str>);

impl Text {
    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text::from(s))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// The distinct [`Text`]s of a catalog, each held once.
///
/// Strings no instance holds any more are dropped when the set has doubled
/// since it was last swept, so the sweep costs O(1) per string interned.
#[derive(Debug, Clone, Default)]
pub struct Interner {
    set: std::collections::HashSet<Text>,
    swept_at: usize,
}

/// Sets smaller than this are never swept: a sweep would free little.
const INTERNER_SWEEP_FLOOR: usize = 1024;

impl Interner {
    /// The shared copy of `text`.
    pub fn intern(&mut self, text: &Text) -> Text {
        if let Some(known) = self.set.get(text.as_str()) {
            return known.clone();
        }
        if self.set.len() >= INTERNER_SWEEP_FLOOR.max(2 * self.swept_at) {
            // Held only by the set: no instance has it.
            self.set.retain(|t| std::sync::Arc::strong_count(&t.0) > 1);
            self.swept_at = self.set.len();
        }
        self.set.insert(text.clone());
        text.clone()
    }

    /// Holds `instance`'s tags, metadata and port names once: replaces
    /// each with the shared copy, in containers of their exact size.
    pub fn intern_instance(&mut self, instance: &mut Instance) {
        instance.tags = instance.tags.iter().map(|t| self.intern(t)).collect();
        let meta: Vec<(Text, Text)> = instance
            .meta
            .iter()
            .map(|(k, v)| (self.intern(k), self.intern(v)))
            .collect();
        instance.meta = LiteMap::from_sorted_store_unchecked(meta);
        let ports: Vec<(Text, u16)> = instance
            .ports
            .iter()
            .map(|(k, v)| (self.intern(k), *v))
            .collect();
        instance.ports = LiteMap::from_sorted_store_unchecked(ports);
    }

    /// Number of distinct strings held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Why a registration, a check or a service config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A name broke the label rule.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `address` is not an IP address.
    #[error(
        "address {0:?} is not an IP address (e.g. 10.0.0.5 or fd00::5): Signpost serves addresses, not host names"
    )]
    Address(String),
    /// `address` is an IP no instance can be reached at.
    #[error("address {0} is {1}: register the address callers should connect to")]
    AddressKind(IpAddr, &'static str),
    /// A port is out of range.
    #[error("{field} {value} is out of range: ports are 1 to 65535")]
    Port {
        /// Which field (`port`, `ports.http`).
        field: String,
        /// The value given.
        value: i64,
    },
    /// The weight is out of range.
    #[error("weight {0} is out of range: weights are 1 to 65535")]
    Weight(i64),
    /// A duration did not parse.
    #[error("{field} {value:?} is not a duration (write it like \"10s\", \"500ms\" or \"1m\")")]
    Duration {
        /// Which field.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// The TTL is too short or too long.
    #[error("ttl {0:?} is out of range: a ttl is 1s to 24h")]
    TtlRange(String),
    /// A check names neither or both of `http` and `tcp`.
    #[error(
        "check needs exactly one of \"http\" (a path like \"/health\", or a URL on the instance's address) or \"tcp\" (\":PORT\" or \"ADDRESS:PORT\"); \"port\" goes only with an http path"
    )]
    CheckKind,
    /// A check target is not usable.
    #[error("check target {0:?} is not valid: {1}")]
    CheckTarget(String, &'static str),
    /// A check interval or timeout is out of range.
    #[error("check {field} {value:?} is out of range: {rule}")]
    CheckTiming {
        /// `interval` or `timeout`.
        field: &'static str,
        /// The value given.
        value: String,
        /// The rule broken.
        rule: &'static str,
    },
    /// Text holds a control character.
    #[error("{what} contains the control character {ch:?}: control characters are not allowed")]
    Control {
        /// What held it (`meta key "k"`, `meta value of "k"`).
        what: String,
        /// The first one found.
        ch: char,
    },
    /// A metadata key or value cannot be served as a TXT string.
    #[error("meta {0:?}: {1}")]
    Meta(String, &'static str),
    /// Past one of the size limits.
    #[error("{what} is {got}: the limit is {limit}")]
    TooLarge {
        /// What was counted (`"the number of meta keys"`).
        what: String,
        /// Its count or size.
        got: usize,
        /// The limit.
        limit: usize,
    },
}

/// `Err` naming the limit when `got` is past `limit`.
fn at_most(what: impl Into<String>, got: usize, limit: usize) -> Result<(), ValidationError> {
    if got > limit {
        return Err(ValidationError::TooLarge {
            what: what.into(),
            got,
            limit,
        });
    }
    Ok(())
}

/// The first 32 characters of `text`, for naming an oversized key in a
/// message without echoing all of it.
fn truncated(text: &str) -> String {
    match text.char_indices().nth(32) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Refuses addresses no caller could use: unspecified (`0.0.0.0`, `::`),
/// multicast, broadcast and link-local (`169.254.0.0/16`, `fe80::/10`, which
/// mean something else on every host's links). IPv4-mapped IPv6 addresses
/// are judged as the IPv4 address they carry.
pub fn check_address(address: IpAddr) -> Result<(), ValidationError> {
    let refuse = |rule| Err(ValidationError::AddressKind(address, rule));
    match address.to_canonical() {
        IpAddr::V4(v4) if v4.is_unspecified() => refuse("unspecified (0.0.0.0)"),
        IpAddr::V4(v4) if v4.is_broadcast() => refuse("the broadcast address"),
        IpAddr::V4(v4) if v4.is_multicast() => refuse("multicast (224.0.0.0/4)"),
        IpAddr::V4(v4) if v4.is_link_local() => refuse("link-local (169.254.0.0/16)"),
        IpAddr::V6(v6) if v6.is_unspecified() => refuse("unspecified (::)"),
        IpAddr::V6(v6) if v6.is_multicast() => refuse("multicast (ff00::/8)"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => refuse("link-local (fe80::/10)"),
        _ => Ok(()),
    }
}

/// Refuses control characters (newlines, NUL, escape sequences) in text
/// that ends up in DNS TXT records, logs and terminals.
fn no_control(what: &str, text: &str) -> Result<(), ValidationError> {
    match text.chars().find(|c| c.is_control()) {
        Some(ch) => Err(ValidationError::Control {
            what: what.to_string(),
            ch,
        }),
        None => Ok(()),
    }
}

/// Parses a humantime duration, naming the field on failure.
pub fn parse_duration(field: &'static str, value: &str) -> Result<Duration, ValidationError> {
    humantime::parse_duration(value.trim()).map_err(|_| ValidationError::Duration {
        field,
        value: value.to_string(),
    })
}

fn port(field: impl Into<String>, value: i64) -> Result<u16, ValidationError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ValidationError::Port {
            field: field.into(),
            value,
        }),
    }
}

/// What a client sends to register an instance
/// (`PUT /v1/services/{svc}/instances/{id}`).
///
/// Numbers are taken as `i64` so that `0`, `-1` and `70000` get the message of
/// the rule they break instead of a generic parse error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The instance's IP address.
    pub address: String,
    /// Its main port.
    pub port: i64,
    /// Named ports (`{"http": 8080}`), served as `_<name>._tcp.<svc>.Z`.
    #[serde(default)]
    pub ports: BTreeMap<String, i64>,
    /// Tags, served as `<tag>.tag.<svc>.Z`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata, served as TXT `key=value`.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// SRV weight and balancing weight, 1 to 65535.
    #[serde(default)]
    pub weight: Option<i64>,
    /// Lease TTL (`"10s"`); absent means the instance stays until deregistered.
    #[serde(default)]
    pub ttl: Option<String>,
    /// An active health check run by the control plane.
    #[serde(default)]
    pub check: Option<CheckSpec>,
}

/// A health check as a client writes it. It probes the instance itself:
/// `http` is a path (`"/health"`, probed on the instance's address and
/// `port`, default its main port) or a URL whose host is the instance's
/// address; `tcp` is `":PORT"` or `"ADDRESS:PORT"` with the instance's
/// address. Other hosts are refused unless the server allows them
/// (`--check-allow`); host names are refused, since what they resolve to
/// can change after the check was accepted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// `GET` this path or URL; 2xx is passing.
    #[serde(default)]
    pub http: Option<String>,
    /// Connect to this `:port` or `address:port`; a connection is passing.
    #[serde(default)]
    pub tcp: Option<String>,
    /// The port an `http` path is probed on (default the instance's port).
    #[serde(default)]
    pub port: Option<i64>,
    /// How often (default 10s, at least 1s).
    #[serde(default)]
    pub interval: Option<String>,
    /// How long a probe may take (default 2s, at most the interval).
    #[serde(default)]
    pub timeout: Option<String>,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckTarget {
    /// An HTTP URL; 2xx is passing.
    Http(String),
    /// A `host:port`; an accepted connection is passing.
    Tcp(String),
}

impl CheckTarget {
    /// The IP address the probe connects to, when the target names one
    /// (every target accepted since checks must name their instance's
    /// address; older records may hold a host name).
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            CheckTarget::Http(url) => {
                let uri: http::Uri = url.parse().ok()?;
                let host = uri.host()?;
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            }
            CheckTarget::Tcp(hostport) => hostport
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip()),
        }
    }
}

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What to probe.
    #[serde(flatten)]
    pub target: CheckTarget,
    /// How often.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one probe may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl CheckSpec {
    /// Validates the check of an instance at `address`, main port `port`,
    /// and makes its target absolute. The target's host is an IP address;
    /// whether it may differ from `address` is the server's call
    /// ([`CheckTarget::ip`]).
    pub fn validate(&self, address: IpAddr, port: u16) -> Result<Check, ValidationError> {
        let target_err =
            |target: &str, rule| ValidationError::CheckTarget(target.to_string(), rule);
        if self.port.is_some() && !self.http.as_deref().is_some_and(|h| h.starts_with('/')) {
            return Err(ValidationError::CheckKind);
        }
        let target = match (&self.http, &self.tcp) {
            (Some(path), None) if path.starts_with('/') => {
                let port = match self.port {
                    Some(p) => self::port("check.port", p)?,
                    None => port,
                };
                let url = format!("http://{}{path}", std::net::SocketAddr::new(address, port));
                let uri: http::Uri = url
                    .parse()
                    .map_err(|_| target_err(path, "not a URL path"))?;
                if uri.path_and_query().map(|p| p.as_str()) != Some(path.as_str()) {
                    return Err(target_err(path, "not a URL path"));
                }
                CheckTarget::Http(url)
            }
            (Some(url), None) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|_| target_err(url, "not a URL or a path starting with '/'"))?;
                if uri.scheme_str() != Some("http") {
                    return Err(target_err(url, "only http:// URLs can be probed"));
                }
                let Some(authority) = uri.authority() else {
                    return Err(target_err(url, "the URL has no host"));
                };
                if authority.as_str().contains('@') {
                    return Err(target_err(
                        url,
                        "a user name or password in a check URL is not allowed (it would be shown to every reader of the catalog)",
                    ));
                }
                let target = CheckTarget::Http(url.clone());
                if target.ip().is_none() {
                    return Err(target_err(
                        url,
                        "the host must be the instance's IP address, not a host name (or give a path: \"/health\")",
                    ));
                }
                target
            }
            (None, Some(hostport)) => {
                let absolute = match hostport.strip_prefix(':') {
                    Some(p) => match p.parse::<u16>() {
                        Ok(p) if p != 0 => std::net::SocketAddr::new(address, p).to_string(),
                        _ => return Err(target_err(hostport, "expected :PORT or ADDRESS:PORT")),
                    },
                    None => match hostport.parse::<std::net::SocketAddr>() {
                        Ok(a) if a.port() != 0 => a.to_string(),
                        _ => {
                            return Err(target_err(
                                hostport,
                                "expected :PORT or ADDRESS:PORT with the instance's IP address",
                            ));
                        }
                    },
                };
                CheckTarget::Tcp(absolute)
            }
            _ => return Err(ValidationError::CheckKind),
        };
        let interval = match &self.interval {
            Some(s) => parse_duration("check.interval", s)?,
            None => DEFAULT_CHECK_INTERVAL,
        };
        if interval < Duration::from_secs(1) {
            return Err(ValidationError::CheckTiming {
                field: "interval",
                value: self.interval.clone().unwrap_or_default(),
                rule: "at least 1s",
            });
        }
        let timeout = match &self.timeout {
            Some(s) => parse_duration("check.timeout", s)?,
            None => DEFAULT_CHECK_TIMEOUT.min(interval),
        };
        if timeout.is_zero() || timeout > interval {
            return Err(ValidationError::CheckTiming {
                field: "timeout",
                value: self.timeout.clone().unwrap_or_default(),
                rule: "more than 0 and at most the interval",
            });
        }
        Ok(Check {
            target,
            interval,
            timeout,
        })
    }
}

/// A registered instance, as stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its service.
    pub service: ServiceName,
    /// Its id within the service.
    pub id: InstanceId,
    /// Its address.
    pub address: IpAddr,
    /// Its main port.
    pub port: u16,
    /// Named ports.
    #[serde(default)]
    pub ports: LiteMap<Text, u16>,
    /// Tags (DNS labels).
    #[serde(default)]
    pub tags: Vec<Text>,
    /// Metadata.
    #[serde(default)]
    pub meta: LiteMap<Text, Text>,
    /// Weight, 1 to 65535.
    pub weight: u16,
    /// Lease TTL, if the instance must heartbeat.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// Active health check (boxed: most instances have none, and every
    /// instance is held by every control plane and replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Box<Check>>,
    /// When it was registered.
    #[serde(with = "humantime_serde")]
    pub registered: SystemTime,
}

impl Registration {
    /// Validates the registration for `service`/`id`.
    pub fn validate(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Instance, ValidationError> {
        let address: IpAddr = self
            .address
            .trim()
            .parse()
            .map_err(|_| ValidationError::Address(self.address.clone()))?;
        check_address(address)?;
        let main_port = port("port", self.port)?;
        at_most("the number of named ports", self.ports.len(), MAX_PORTS)?;
        at_most("the number of tags", self.tags.len(), MAX_TAGS)?;
        at_most("the number of meta keys", self.meta.len(), MAX_META_KEYS)?;
        let mut ports = LiteMap::new();
        for (name, value) in &self.ports {
            let label = Text::from(validate_label("port", name)?);
            ports.insert(label, port(format!("ports.{name}"), *value)?);
        }
        let mut tags = Vec::with_capacity(self.tags.len());
        for tag in &self.tags {
            let tag = Text::from(validate_label("tag", tag)?);
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        for (key, value) in &self.meta {
            at_most(
                format!("the size of meta key {:?} in bytes", truncated(key)),
                key.len(),
                MAX_META_KEY_BYTES,
            )?;
            at_most(
                format!("the size of meta value {:?} in bytes", truncated(key)),
                value.len(),
                MAX_META_VALUE_BYTES,
            )?;
            no_control(&format!("meta key {:?}", truncated(key)), key)?;
            no_control(&format!("meta value of {:?}", truncated(key)), value)?;
            if key.is_empty() || key.contains('=') {
                return Err(ValidationError::Meta(
                    key.clone(),
                    "keys must be non-empty and contain no '='",
                ));
            }
            // One TXT character-string holds 255 bytes (RFC 1035 §3.3).
            if key.len() + 1 + value.len() > 255 {
                return Err(ValidationError::Meta(
                    key.clone(),
                    "key=value must fit in 255 bytes (one DNS TXT string)",
                ));
            }
        }
        let weight = match self.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => match u16::try_from(w) {
                Ok(w) if w != 0 => w,
                _ => return Err(ValidationError::Weight(w)),
            },
        };
        let ttl = match &self.ttl {
            None => None,
            Some(raw) => {
                let ttl = parse_duration("ttl", raw)?;
                if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
                    return Err(ValidationError::TtlRange(raw.clone()));
                }
                Some(ttl)
            }
        };
        let check = self
            .check
            .as_ref()
            .map(|c| c.validate(address, main_port))
            .transpose()?
            .map(Box::new);
        let instance = Instance {
            service: service.clone(),
            id: id.clone(),
            address,
            port: main_port,
            ports,
            tags,
            meta: self
                .meta
                .iter()
                .map(|(k, v)| (Text::from(k.as_str()), Text::from(v.as_str())))
                .collect(),
            weight,
            ttl,
            check,
            registered: SystemTime::now(),
        };
        let stored = serde_json::to_vec(&instance).map_or(usize::MAX, |json| json.len());
        at_most(
            "the instance record's size in bytes",
            stored,
            MAX_INSTANCE_BYTES,
        )?;
        Ok(instance)
    }
}

/// Whether an instance should get traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// It answers its check.
    Passing,
    /// It failed its check twice in a row.
    Critical,
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthStatus::Passing => "passing",
            HealthStatus::Critical => "critical",
        })
    }
}

/// The result of an instance's health check, stored next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Passing or critical.
    pub status: HealthStatus,
    /// What the probe saw ("HTTP 200", "connection refused").
    #[serde(default)]
    pub output: String,
    /// Since when the status holds.
    #[serde(with = "humantime_serde")]
    pub since: SystemTime,
}

/// How the sidecar's inbound treats connections without mesh TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Mesh TLS and plain connections on the same port; plain callers have no
    /// identity. The default, as in Istio and Linkerd, so a service can join
    /// the mesh before all its callers have.
    #[default]
    Permissive,
    /// Mesh TLS with a client certificate only.
    Strict,
}

/// Per-service settings (`PUT /v1/services/{svc}/config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Services allowed to call this one; empty means any mesh identity.
    #[serde(default)]
    pub allow: Vec<ServiceName>,
    /// Strict or permissive mTLS.
    #[serde(default)]
    pub mtls: MtlsMode,
}

/// A service token as stored (under its hash; the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The one service this token may act for.
    pub service: ServiceName,
    /// When it was created.
    #[serde(with = "humantime_serde")]
    pub created: SystemTime,
    /// A non-secret id to list and revoke the token by. Records made before
    /// accessors existed have none; they are known by the start of their
    /// key's hash instead (see [`crate::tokens::TokenCache`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub accessor: String,
    /// When it stops being accepted, if it was made with a `ttl`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires: Option<SystemTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registration {
        Registration {
            address: "10.0.0.5".into(),
            port: 8080,
            ..Default::default()
        }
    }

    fn validate(r: &Registration) -> Result<Instance, ValidationError> {
        r.validate(
            &ServiceName::new("user").unwrap(),
            &InstanceId::new("u1").unwrap(),
        )
    }

    #[test]
    fn names_are_lowercased_labels() {
        assert_eq!(ServiceName::new("User-2").unwrap().as_str(), "user-2");
        assert!(matches!(ServiceName::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(
            ServiceName::new(&"a".repeat(64)),
            Err(NameError::TooLong { .. })
        ));
        assert!(ServiceName::new(&"a".repeat(63)).is_ok());
        assert!(matches!(
            ServiceName::new("user_x"),
            Err(NameError::InvalidChar { ch: '_', .. })
        ));
        assert!(matches!(
            ServiceName::new("user.x"),
            Err(NameError::InvalidChar { ch: '.', .. })
        ));
        assert!(matches!(
            ServiceName::new("-user"),
            Err(NameError::HyphenEdge { .. })
        ));
        assert!(matches!(
            ServiceName::new("user-"),
            Err(NameError::HyphenEdge { .. })
        ));
        assert!(matches!(
            InstanceId::new("TAG"),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            ServiceName::new("tag"),
            Err(NameError::Reserved { .. })
        ));
    }

    #[test]
    fn name_errors_name_the_rule() {
        let msg = ServiceName::new("Bad_Name").unwrap_err().to_string();
        assert!(msg.contains("a-z, 0-9 and '-'"), "{msg}");
        let msg = ServiceName::new("tag").unwrap_err().to_string();
        assert!(msg.contains("reserved"), "{msg}");
    }

    #[test]
    fn names_deserialize_through_validation() {
        let ok: ServiceName = serde_json::from_str("\"Order\"").unwrap();
        assert_eq!(ok.as_str(), "order");
        assert!(serde_json::from_str::<ServiceName>("\"a b\"").is_err());
    }

    #[test]
    fn valid_registration_fills_defaults() {
        let inst = validate(&reg()).unwrap();
        assert_eq!(inst.weight, DEFAULT_WEIGHT);
        assert_eq!(inst.ttl, None);
        assert_eq!(inst.port, 8080);
        assert_eq!(inst.address, "10.0.0.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn bad_registrations_name_their_rule() {
        let mut r = reg();
        r.address = "user.example".into();
        assert!(matches!(validate(&r), Err(ValidationError::Address(_))));

        for bad in [0, -1, 65536, 70000] {
            let mut r = reg();
            r.port = bad;
            assert!(
                matches!(validate(&r), Err(ValidationError::Port { .. })),
                "{bad}"
            );
        }
        let mut r = reg();
        r.ports.insert("http".into(), 0);
        assert!(matches!(validate(&r), Err(ValidationError::Port { .. })));
        let mut r = reg();
        r.ports.insert("h_ttp".into(), 80);
        assert!(matches!(validate(&r), Err(ValidationError::Name(_))));

        for bad in [0, -5, 65536] {
            let mut r = reg();
            r.weight = Some(bad);
            assert!(
                matches!(validate(&r), Err(ValidationError::Weight(_))),
                "{bad}"
            );
        }
        let mut r = reg();
        r.weight = Some(65535);
        assert!(validate(&r).is_ok());

        for (bad, want_range) in [("500ms", true), ("0s", true), ("2d", true), ("soon", false)] {
            let mut r = reg();
            r.ttl = Some(bad.into());
            match validate(&r) {
                Err(ValidationError::TtlRange(_)) => assert!(want_range, "{bad}"),
                Err(ValidationError::Duration { .. }) => assert!(!want_range, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let mut r = reg();
        r.ttl = Some("1s".into());
        assert_eq!(validate(&r).unwrap().ttl, Some(Duration::from_secs(1)));

        let mut r = reg();
        r.tags = vec!["v1.2".into()];
        assert!(matches!(validate(&r), Err(ValidationError::Name(_))));

        let mut r = reg();
        r.meta.insert("a=b".into(), "c".into());
        assert!(matches!(validate(&r), Err(ValidationError::Meta(..))));
    }

    #[test]
    fn unusable_addresses_and_control_characters_are_refused() {
        for bad in [
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.2.3",
            "ff02::1",
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.1.1",
            "::ffff:0.0.0.0",
        ] {
            let mut r = reg();
            r.address = bad.into();
            let err = validate(&r).unwrap_err();
            assert!(
                matches!(err, ValidationError::AddressKind(..)),
                "{bad}: {err:?}"
            );
        }
        for good in ["10.0.0.1", "127.0.0.1", "fd00::5", "2001:db8::1", "::1"] {
            let mut r = reg();
            r.address = good.into();
            assert!(validate(&r).is_ok(), "{good}");
        }
        for (k, v) in [
            ("k", "a\nb"),
            ("k", "\u{1b}[31m"),
            ("k\u{0}", "v"),
            ("k", "\u{7f}"),
        ] {
            let mut r = reg();
            r.meta.insert(k.into(), v.into());
            let err = validate(&r).unwrap_err();
            assert!(matches!(err, ValidationError::Control { .. }), "{err:?}");
            assert!(err.to_string().contains("control character"), "{err}");
        }
        let mut r = reg();
        r.tags = vec!["a\tb".into()];
        assert!(matches!(validate(&r), Err(ValidationError::Name(_))));
        // Non-ASCII text that is not control is fine.
        let mut r = reg();
        r.meta.insert("zone".into(), "Zürich 東京".into());
        assert!(validate(&r).is_ok());
    }

    #[test]
    fn checks_validate() {
        let addr: IpAddr = "10.0.0.5".parse().unwrap();
        let v = |spec: CheckSpec| spec.validate(addr, 8080);
        let ok = v(CheckSpec {
            http: Some("http://10.0.0.5:8080/health".into()),
            interval: Some("5s".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.interval, Duration::from_secs(5));
        assert_eq!(ok.timeout, DEFAULT_CHECK_TIMEOUT);

        let both = CheckSpec {
            http: Some("http://a/".into()),
            tcp: Some("a:1".into()),
            ..Default::default()
        };
        assert_eq!(v(both), Err(ValidationError::CheckKind));
        assert_eq!(v(CheckSpec::default()), Err(ValidationError::CheckKind));
        for (http, tcp) in [
            (None, Some("nohost")),
            (None, Some("db.internal:5432")),
            (None, Some(":0")),
            (Some("https://10.0.0.5/"), None),
            (Some("http://app.internal/health"), None),
            (Some("http://admin:s3cret@10.0.0.5:8080/health"), None),
            (Some("health"), None),
        ] {
            let spec = CheckSpec {
                http: http.map(String::from),
                tcp: tcp.map(String::from),
                ..Default::default()
            };
            let err = v(spec).unwrap_err();
            assert!(
                matches!(err, ValidationError::CheckTarget(..)),
                "{http:?} {tcp:?}: {err:?}"
            );
            if http.is_some_and(|h| h.contains('@')) {
                assert!(err.to_string().contains("password"), "{err}");
            }
        }
        // Relative targets are made absolute on the instance's address.
        let path = v(CheckSpec {
            http: Some("/health?deep=1".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            path.target,
            CheckTarget::Http("http://10.0.0.5:8080/health?deep=1".into())
        );
        let other_port = v(CheckSpec {
            http: Some("/ready".into()),
            port: Some(9000),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            other_port.target,
            CheckTarget::Http("http://10.0.0.5:9000/ready".into())
        );
        let tcp = v(CheckSpec {
            tcp: Some(":5432".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(tcp.target, CheckTarget::Tcp("10.0.0.5:5432".into()));
        assert_eq!(tcp.target.ip(), Some(addr));
        let v6 = CheckSpec {
            http: Some("/h".into()),
            ..Default::default()
        }
        .validate("fd00::5".parse().unwrap(), 80)
        .unwrap();
        assert_eq!(v6.target, CheckTarget::Http("http://[fd00::5]:80/h".into()));
        assert_eq!(v6.target.ip(), "fd00::5".parse().ok());
        // `port` only goes with a path.
        assert_eq!(
            v(CheckSpec {
                tcp: Some(":1".into()),
                port: Some(2),
                ..Default::default()
            }),
            Err(ValidationError::CheckKind)
        );
        let long_timeout = CheckSpec {
            tcp: Some("10.0.0.5:1".into()),
            interval: Some("1s".into()),
            timeout: Some("5s".into()),
            ..Default::default()
        };
        assert!(matches!(
            v(long_timeout),
            Err(ValidationError::CheckTiming { .. })
        ));
    }

    #[test]
    fn old_check_records_still_load() {
        // As stored before checks had to name their instance's address.
        let json = r#"{"service":"user","id":"u1","address":"10.0.0.5","port":80,"weight":100,
            "check":{"http":"http://app.internal:8080/health","interval":"10s","timeout":"2s"},
            "registered":"2026-01-01T00:00:00Z"}"#;
        let inst: Instance = serde_json::from_str(json).unwrap();
        let check = inst.check.unwrap();
        assert_eq!(
            check.target,
            CheckTarget::Http("http://app.internal:8080/health".into())
        );
        assert_eq!(check.target.ip(), None);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<Registration>(
            r#"{"address": "10.0.0.1", "port": 80, "colour": "red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn instance_round_trips_through_json() {
        let mut r = reg();
        r.ttl = Some("10s".into());
        r.check = Some(CheckSpec {
            tcp: Some("10.0.0.5:8080".into()),
            ..Default::default()
        });
        let inst = validate(&r).unwrap();
        let json = serde_json::to_string(&inst).unwrap();
        let back: Instance = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ttl, inst.ttl);
        assert_eq!(back.check, inst.check);
    }

    #[test]
    fn interned_instances_share_their_strings() {
        let mut r = reg();
        r.tags = vec!["v1".into()];
        r.meta.insert("version".into(), "1.4.2".into());
        r.ports.insert("http".into(), 8081);
        let mut strings = Interner::default();
        let mut a = validate(&r).unwrap();
        // Equal strings, held apart until interned.
        let mut b = a.clone();
        b.tags = vec![Text::from("v1")];
        b.meta = [(Text::from("version"), Text::from("1.4.2"))]
            .into_iter()
            .collect();
        strings.intern_instance(&mut a);
        strings.intern_instance(&mut b);
        assert!(std::sync::Arc::ptr_eq(&a.tags[0].0, &b.tags[0].0));
        let (ka, va) = a.meta.iter().next().unwrap();
        let (kb, vb) = b.meta.iter().next().unwrap();
        assert!(std::sync::Arc::ptr_eq(&ka.0, &kb.0));
        assert!(std::sync::Arc::ptr_eq(&va.0, &vb.0));
        assert_eq!(a, b);
        assert_eq!(b.ports.get("http"), Some(&8081));
        assert_eq!(strings.len(), 4);
    }

    #[test]
    fn strings_no_instance_holds_are_swept() {
        let mut strings = Interner::default();
        // Held by nobody but the set once interned.
        for i in 0..10 * INTERNER_SWEEP_FLOOR {
            strings.intern(&Text::from(format!("v{i}")));
        }
        assert!(
            strings.len() <= 2 * INTERNER_SWEEP_FLOOR,
            "{}",
            strings.len()
        );
        // A string still held survives every sweep.
        let kept = strings.intern(&Text::from("kept"));
        for i in 0..10 * INTERNER_SWEEP_FLOOR {
            strings.intern(&Text::from(format!("w{i}")));
        }
        assert!(std::sync::Arc::ptr_eq(
            &strings.intern(&Text::from("kept")).0,
            &kept.0
        ));
    }
}
