//! Headers both sides of the sidecar handle: hop-by-hop headers, the mesh's
//! own headers, upgrades and size limits.

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

/// Header listing the sidecars that sent a request out of the mesh (their
/// ids), to refuse a request that comes back to the sidecar that sent it.
pub const HOP_HEADER: HeaderName = HeaderName::from_static("x-signpost-hop");

/// Header the outbound sets on a request its app sent as HTTP/1.x, which
/// crosses the mesh as HTTP/2: the peer's inbound gives it to its app as
/// HTTP/1.1 again (as linkerd's `l5d-orig-proto`). Absent: the app sent
/// HTTP/2, and the peer's app gets HTTP/2.
pub const ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("x-signpost-orig-proto");

/// The largest request header section the sidecar takes, on HTTP/1.1 and
/// HTTP/2 alike, counted as HTTP/2 counts it (name + value + 32 per field):
/// 64 KiB, as hyper's HTTP/1 default and Envoy's `max_request_headers_kb`
/// maximum allow. Past it: 431 with `x-signpost-error`.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The size of a header section as HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`
/// counts it (RFC 9113 §6.5.2).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

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

const HOPS: usize = 8;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones: never forwarded,
/// and forbidden in HTTP/2. `Trailer` is not one (RFC 9110 §6.6.2): it
/// travels end to end, and hyper sends HTTP/1.1 trailers only when it is
/// there. `TE: trailers` is kept too (see [`strip_hop_by_hop`]). Names, not strings, so that removing them does
/// not parse each name again on every request.
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The position of `name` in [`HOP_BY_HOP`]. A match on the name's text
/// (always lower-case) compiles to a switch on its length: comparing each
/// name with nine `HeaderName`s cost ~1k instructions per message.
fn hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authenticate" => Some(3),
        "proxy-authorization" => Some(4),
        "te" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`,
/// but for `TE: trailers`: the one value HTTP/2 allows, which tells a
/// server that the client takes trailers (gRPC needs it; an HTTP/1.1
/// server sends trailers only then).
///
/// Most messages carry none, and most others only `Connection: keep-alive`:
/// one pass over the names finds which are present, and only those are
/// removed; only a `Connection` token naming another header is parsed.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop_and(headers, &[]);
}

/// [`strip_hop_by_hop`], and also removes the headers named in `also`,
/// found in the same pass over the names: a removal hashes the name, and
/// the headers stripped are seldom there.
pub fn strip_hop_by_hop_and<const N: usize>(headers: &mut HeaderMap, also: &[HeaderName; N]) {
    let mut present = [false; HOPS];
    let mut also_present = [false; N];
    for name in headers.keys() {
        if let Some(i) = hop_index(name) {
            present[i] = true;
        } else {
            for (other, seen) in also.iter().zip(also_present.iter_mut()) {
                *seen |= name == other;
            }
        }
    }
    for (other, seen) in also.iter().zip(also_present) {
        if seen {
            headers.remove(other);
        }
    }
    if !present.contains(&true) {
        return;
    }
    let te_trailers = present[TE]
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
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The position of `TE` in [`HOP_BY_HOP`].
const TE: usize = 5;

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
    fn hop_index_follows_the_hop_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_index(&header::HOST), None);
        assert_eq!(hop_index(&HeaderName::from_static("x-te")), None);
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
        let also = [HeaderName::from_static("x-absent"), HOP_HEADER];
        strip_hop_by_hop_and(&mut headers, &also);
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
