//! Headers both sides of the sidecar handle: hop-by-hop headers, the mesh's
//! own headers, upgrades and size limits.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// Header listing the sidecars that sent a request out of the mesh (their
/// ids), to refuse a request that comes back to the sidecar that sent it.
pub const HOP_HEADER: HeaderName = HeaderName::from_static("x-signpost-hop");

/// Header the outbound sets on a request its app sent as HTTP/2 (value
/// `HTTP/2`): every request crosses the mesh as HTTP/2, and the peer's
/// inbound gives the app the protocol its caller spoke (the reverse of
/// linkerd's `l5d-orig-proto`). Absent: the app sent HTTP/1.x, and the
/// peer's app gets HTTP/1.1 — what a sidecar that predates the header
/// means too, and the common case that then carries nothing.
pub const ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("x-signpost-orig-proto");

/// The largest request header section the sidecar takes, on HTTP/1.1 and
/// HTTP/2 alike, counted as HTTP/2 counts it (name + value + 32 per field):
/// 64 KiB, as hyper's HTTP/1 default and Envoy's `max_request_headers_kb`
/// maximum allow. Past it: 431 with `x-signpost-error`.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The protocol an HTTP/1.1 request asks to upgrade to (`Upgrade`, with
/// `upgrade` among the `Connection` tokens), such as `websocket`.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    headers.get(header::UPGRADE).cloned()
}

/// Puts back the two headers of an upgrade that [`strip_hop_by_hop`]
/// removed: `Connection: upgrade` and `Upgrade: <protocol>`.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The innermost cause of an error, which is the one a person can act on
/// ("Connection refused" rather than "client error (Connect)").
pub fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The headers the sidecar looks at in every message, each found by one
/// pass over the names ([`Head::of`]) instead of a hashed lookup apiece:
/// most are absent from most messages, and a miss costs a lookup as much
/// as a hit does. The first [`HOPS`] are hop-by-hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Known {
    /// `connection`.
    Connection,
    /// `keep-alive`.
    KeepAlive,
    /// `proxy-connection`.
    ProxyConnection,
    /// `proxy-authenticate`.
    ProxyAuthenticate,
    /// `proxy-authorization`.
    ProxyAuthorization,
    /// `te`.
    Te,
    /// `transfer-encoding`.
    TransferEncoding,
    /// `upgrade`.
    Upgrade,
    /// `content-type`: tells gRPC calls apart.
    ContentType,
    /// `grpc-timeout`: a call's deadline.
    GrpcTimeout,
    /// `x-signpost-caller`: only an inbound vouches for callers.
    Caller,
    /// [`HOP_HEADER`].
    Hop,
    /// [`ORIG_PROTO_HEADER`].
    OrigProto,
    /// `x-signpost-not-forwarded`: only a peer's inbound says it.
    NotForwarded,
}

impl Known {
    /// The known header called `name`, if it is one. A match on the name's
    /// text (always lower-case) compiles to a switch on its length, where
    /// comparing with a list of `HeaderName`s would compare each name with
    /// every entry.
    fn of(name: &HeaderName) -> Option<Known> {
        Some(match name.as_str() {
            "connection" => Known::Connection,
            "keep-alive" => Known::KeepAlive,
            "proxy-connection" => Known::ProxyConnection,
            "proxy-authenticate" => Known::ProxyAuthenticate,
            "proxy-authorization" => Known::ProxyAuthorization,
            "te" => Known::Te,
            "transfer-encoding" => Known::TransferEncoding,
            "upgrade" => Known::Upgrade,
            "content-type" => Known::ContentType,
            "grpc-timeout" => Known::GrpcTimeout,
            "x-signpost-caller" => Known::Caller,
            "x-signpost-hop" => Known::Hop,
            "x-signpost-orig-proto" => Known::OrigProto,
            "x-signpost-not-forwarded" => Known::NotForwarded,
            _ => return None,
        })
    }

    /// The header's name.
    pub fn name(self) -> HeaderName {
        match self {
            Known::ContentType => header::CONTENT_TYPE,
            Known::GrpcTimeout => crate::deadline::GRPC_TIMEOUT,
            Known::Caller => crate::inbound::CALLER_HEADER,
            Known::Hop => HOP_HEADER,
            Known::OrigProto => ORIG_PROTO_HEADER,
            Known::NotForwarded => crate::error::NOT_FORWARDED_HEADER,
            hop => HOP_BY_HOP[usize::from(hop as u8)].clone(),
        }
    }

    fn bit(self) -> u16 {
        1 << self as u8
    }
}

/// How many of the [`Known`] headers, from the first, are hop-by-hop
/// (RFC 9110 §7.6.1, plus the proxy ones): never forwarded, and forbidden
/// in HTTP/2. `Trailer` is not one (RFC 9110 §6.6.2): it travels end to
/// end, and hyper sends HTTP/1.1 trailers only when it is there. `TE:
/// trailers` is kept too (see [`strip_hop_by_hop`]).
const HOPS: u8 = 8;

/// What the sidecar reads from a message's headers, in one pass over them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Head {
    /// The size of the header section as HTTP/2's
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` counts it (RFC 9113 §6.5.2): name +
    /// value + 32 per field.
    pub size: usize,
    /// `content-type: application/grpc*`.
    pub grpc: bool,
    /// A valid `grpc-timeout`.
    pub grpc_timeout: Option<std::time::Duration>,
    present: u16,
}

impl Head {
    /// Reads `headers`.
    pub fn of(headers: &HeaderMap) -> Head {
        let mut head = Head::default();
        for (name, value) in headers {
            head.size += name.as_str().len() + value.len() + 32;
            let Some(known) = Known::of(name) else {
                continue;
            };
            head.present |= known.bit();
            match known {
                Known::ContentType => {
                    head.grpc = value.as_bytes().starts_with(b"application/grpc");
                }
                Known::GrpcTimeout => {
                    head.grpc_timeout = crate::deadline::parse_grpc_timeout(value.as_bytes());
                }
                _ => {}
            }
        }
        head
    }

    /// Whether the message has a `known` header.
    pub fn has(&self, known: Known) -> bool {
        self.present & known.bit() != 0
    }

    /// Whether the message may ask for an upgrade: it has both headers that
    /// [`upgrade_protocol`] reads.
    pub fn may_upgrade(&self) -> bool {
        self.has(Known::Connection) && self.has(Known::Upgrade)
    }

    /// The kind of caller that sent a request with these headers.
    pub fn caller(&self) -> crate::error::Caller {
        if self.grpc {
            crate::error::Caller::Grpc
        } else {
            crate::error::Caller::Http
        }
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`,
/// but for `TE: trailers`: the one value HTTP/2 allows, which tells a
/// server that the client takes trailers (gRPC needs it; an HTTP/1.1
/// server sends trailers only then).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let head = Head::of(headers);
    strip_hop_by_hop_and(headers, &head, &[]);
}

/// [`strip_hop_by_hop`] for headers already read as `head`, also removing
/// the headers in `also`. Only the headers `head` found are removed: a
/// removal hashes the name, and most messages carry none of them, or only
/// `Connection: keep-alive`; only a `Connection` token naming another
/// header is parsed.
pub fn strip_hop_by_hop_and(headers: &mut HeaderMap, head: &Head, also: &[Known]) {
    for known in also {
        if head.has(*known) {
            headers.remove(known.name());
        }
    }
    if head.present & ((1 << HOPS) - 1) == 0 {
        return;
    }
    let te_trailers = head.has(Known::Te)
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            });
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|hop| token.eq_ignore_ascii_case(hop.as_str()))
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for i in 0..HOPS {
        if head.present & (1 << i) != 0 {
            headers.remove(HOP_BY_HOP[usize::from(i)].clone());
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The hop-by-hop names, in [`Known`]'s order: names, not strings, so that
/// removing them does not parse each name again.
static HOP_BY_HOP: [HeaderName; HOPS as usize] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether a hop header's `text` lists this sidecar (`id`).
fn lists_hop(text: &str, id: &str) -> bool {
    text.split(',').any(|hop| hop.trim() == id)
}

/// Whether the request already passed this sidecar (`id`): it looped.
pub fn passed_through(headers: &HeaderMap, id: &str) -> bool {
    headers
        .get_all(&HOP_HEADER)
        .iter()
        .any(|v| lists_hop(v.to_str().unwrap_or_default(), id))
}

/// Adds this sidecar (`id`, and `value`, the same as a header value) to the
/// hop header, unless it is there already: then the request has looped
/// back, and the answer is `false`. One map lookup for both questions.
pub fn enter_hop(headers: &mut HeaderMap, id: &str, value: &HeaderValue) -> bool {
    let mut hops = match headers.entry(HOP_HEADER) {
        // The common case: the first hop, no formatting.
        Entry::Vacant(vacant) => {
            vacant.insert(value.clone());
            return true;
        }
        Entry::Occupied(hops) => hops,
    };
    let mut joined = Vec::new();
    for v in hops.iter() {
        let text = v.to_str().unwrap_or_default();
        if lists_hop(text, id) {
            return false;
        }
        if !text.trim().is_empty() {
            joined.extend_from_slice(text.trim().as_bytes());
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(value.as_bytes());
    // Only visible ASCII went in, so this cannot fail; if it did, the hops
    // so far stay as they were.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        hops.insert(v);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_are_found_by_their_text() {
        let all = [
            Known::Connection,
            Known::KeepAlive,
            Known::ProxyConnection,
            Known::ProxyAuthenticate,
            Known::ProxyAuthorization,
            Known::Te,
            Known::TransferEncoding,
            Known::Upgrade,
            Known::ContentType,
            Known::GrpcTimeout,
            Known::Caller,
            Known::Hop,
            Known::OrigProto,
            Known::NotForwarded,
        ];
        for (i, known) in all.into_iter().enumerate() {
            assert_eq!(usize::from(known as u8), i);
            assert_eq!(Known::of(&known.name()), Some(known), "{}", known.name());
        }
        assert!(all[..usize::from(HOPS)].contains(&Known::Upgrade));
        assert_eq!(Known::of(&header::HOST), None);
        assert_eq!(Known::of(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn a_head_is_read_in_one_pass() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        headers.insert("grpc-timeout", HeaderValue::from_static("250m"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("22"));
        let head = Head::of(&headers);
        assert!(head.grpc);
        assert_eq!(head.caller(), crate::error::Caller::Grpc);
        assert_eq!(
            head.grpc_timeout,
            Some(std::time::Duration::from_millis(250))
        );
        assert!(head.has(Known::GrpcTimeout) && !head.has(Known::Connection));
        assert!(!head.may_upgrade());
        let size = "content-type".len()
            + "application/grpc+proto".len()
            + "grpc-timeout".len()
            + 4
            + 2 * "x-a".len()
            + 3
            + 4 * 32;
        assert_eq!(head.size, size);
        assert!(!Head::of(&HeaderMap::new()).grpc);
    }

    #[test]
    fn hops_are_recorded_and_loops_recognized() {
        let enter = |headers: &mut HeaderMap, id: &'static str| {
            enter_hop(headers, id, &HeaderValue::from_static(id))
        };
        let mut headers = HeaderMap::new();
        assert!(!passed_through(&headers, "o1"));
        assert!(enter(&mut headers, "o1"));
        assert!(passed_through(&headers, "o1"));
        assert!(
            !passed_through(&headers, "o"),
            "a prefix is another sidecar"
        );
        assert!(enter(&mut headers, "u1"));
        assert_eq!(headers[&HOP_HEADER], "o1, u1");
        assert!(!enter(&mut headers, "u1"), "u1 again is a loop");
        assert!(!enter(&mut headers, "o1"));
        assert_eq!(headers[&HOP_HEADER], "o1, u1", "a loop adds nothing");
        assert!(enter(&mut headers, "u"), "a prefix is another sidecar");
        assert_eq!(headers[&HOP_HEADER], "o1, u1, u");

        // Several hop headers become one list.
        let mut headers = HeaderMap::new();
        headers.append(&HOP_HEADER, HeaderValue::from_static("a"));
        headers.append(&HOP_HEADER, HeaderValue::from_static("b, c"));
        assert!(!enter(&mut headers, "c"));
        assert!(enter(&mut headers, "d"));
        assert_eq!(headers.get_all(&HOP_HEADER).iter().count(), 1);
        assert_eq!(headers[&HOP_HEADER], "a, b, c, d");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));

        // What every HTTP/1.1 app answers with.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_LENGTH));

        // With more names to strip: every value of each, hop-by-hop or not.
        let mut headers = HeaderMap::new();
        headers.append(&HOP_HEADER, HeaderValue::from_static("a"));
        headers.append(&HOP_HEADER, HeaderValue::from_static("b"));
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let head = Head::of(&headers);
        strip_hop_by_hop_and(&mut headers, &head, &[Known::Caller, Known::Hop]);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));

        // `TE: trailers` and `Trailer` travel on; an upgrade is restored.
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip, Trailers"));
        headers.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let upgrade = upgrade_protocol(&headers).unwrap();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers[header::TE], "trailers");
        assert_eq!(headers[header::TRAILER], "x-sum");
        assert!(!headers.contains_key(header::UPGRADE));
        restore_upgrade(&mut headers, upgrade);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert!(upgrade_protocol(&headers).is_some());
    }
}
