//! The HTTP front of the outbound side: what the app talks to.
//!
//! The app sends plain HTTP/1.1 here, either as to a forward proxy
//! (`GET http://user/users/1`, what clients send with `http_proxy` set) or
//! straight to the port with a `Host` header (`Host: user.xingren.host`).
//! The host decides the route:
//!
//! - `user` or `user.<zone>` (any port): the mesh destination `user`, over
//!   the balanced, retried, mTLS stack of [`super::Destinations`];
//! - anything else (another domain, an IP address, `localhost`): forwarded
//!   as plain HTTP to that host, outside the mesh, so `http_proxy` can be
//!   set for a whole process without breaking its other calls.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{Instrument, debug, info_span};

use super::{Destination, Destinations};
use crate::body::{self, BoxError, ProxyBody, Replay};
use crate::deadline::Timers;
use crate::error::{ProxyError, SidecarError};
use crate::metrics::{Direction, Metrics, RequestMetrics};
use crate::serve;

/// Header listing the sidecars that sent a request out of the mesh (their
/// ids), to refuse a request that comes back to the sidecar that sent it.
pub const HOP_HEADER: HeaderName = HeaderName::from_static("x-signpost-hop");

/// Label used in metrics for calls that leave the mesh: one label, not one
/// per host, so a crawler cannot explode the metric's cardinality.
pub const EXTERNAL: &str = "external";

/// Where an app's request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// A mesh service: its label, lower-case, not yet checked against the
    /// label rules (a known destination needs no check; see
    /// [`super::Destinations::get`]).
    Mesh(Cow<'a, str>),
    /// A host outside the mesh: the request's own authority.
    External,
}

/// The authority a request names: its URI's (absolute form) or its `Host`.
pub fn requested_authority(uri: &Uri, headers: &HeaderMap) -> Result<Authority, ProxyError> {
    if let Some(a) = uri.authority() {
        return Ok(a.clone());
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            ProxyError::BadRequest(
                "no destination: send an absolute URL (http://user/...) or a Host header".into(),
            )
        })?;
    host.parse::<Authority>()
        .map_err(|e| ProxyError::BadRequest(format!("invalid Host {host:?}: {e}")))
}

/// Decides the route of a request for `authority`. `zone` is lower-case
/// without the trailing dot (see [`normalize_zone`]).
pub fn target<'a>(zone: &str, authority: &'a Authority) -> Result<Target<'a>, ProxyError> {
    let raw = authority.host().trim_end_matches('.');
    // Host names arrive lower-case almost always: copy only when not.
    let host: Cow<'a, str> = if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(raw.to_ascii_lowercase())
    } else {
        Cow::Borrowed(raw)
    };
    // An IPv6 address comes bracketed in an authority, and an IPv4 one
    // starts with a digit: names are not parsed as addresses for nothing.
    let ipv4 = host.starts_with(|c: char| c.is_ascii_digit())
        && host.parse::<std::net::Ipv4Addr>().is_ok();
    if host.starts_with('[') || host == "localhost" || ipv4 {
        return Ok(Target::External);
    }
    let in_zone = host
        .strip_suffix(zone)
        .and_then(|rest| rest.strip_suffix('.'));
    let label_len = match in_zone {
        Some(rest) if rest.contains('.') => {
            return Err(ProxyError::BadRequest(format!(
                "{host}: only service names (<service>.{zone}) are routed through the mesh"
            )));
        }
        Some(rest) => rest.len(),
        None if !host.contains('.') => host.len(),
        None => return Ok(Target::External),
    };
    Ok(Target::Mesh(match host {
        Cow::Borrowed(h) => Cow::Borrowed(&h[..label_len]),
        Cow::Owned(mut h) => {
            h.truncate(label_len);
            Cow::Owned(h)
        }
    }))
}

/// The zone as [`target`] compares it: lower-case, no trailing dot. Done
/// once when the proxy is made, not per request.
pub fn normalize_zone(zone: &str) -> String {
    zone.trim_end_matches('.').to_ascii_lowercase()
}

const HOPS: usize = 9;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy ones: never forwarded,
/// and forbidden in HTTP/2. Names, not strings, so that removing them does
/// not parse each name again on every request.
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
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
        "trailer" => Some(6),
        "transfer-encoding" => Some(7),
        "upgrade" => Some(8),
        _ => None,
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`.
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
}

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

/// Settings of the outbound front.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// This sidecar's id, for the loop guard.
    pub id: String,
    /// The mesh zone.
    pub zone: String,
    /// Limit for a whole request (retries included) until response headers.
    pub request_timeout: Duration,
    /// Limit for connecting to a host outside the mesh.
    pub connect_timeout: Duration,
}

/// The outbound HTTP proxy.
pub struct OutboundProxy {
    config: OutboundConfig,
    /// This sidecar's id as the hop header carries it.
    hop: HeaderValue,
    destinations: Arc<Destinations>,
    external: Client<HttpConnector, ProxyBody>,
    /// Requests that left the mesh.
    external_requests: RequestMetrics,
    /// Requests refused before a destination was known.
    unrouted_requests: RequestMetrics,
    /// The request timeouts' timers.
    timers: Arc<Timers>,
}

impl std::fmt::Debug for OutboundProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundProxy")
            .field("config", &self.config)
            .finish()
    }
}

impl OutboundProxy {
    /// A proxy routing mesh calls through `destinations`.
    pub fn new(
        mut config: OutboundConfig,
        destinations: Arc<Destinations>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, SidecarError> {
        config.zone = normalize_zone(&config.zone);
        let hop = HeaderValue::from_str(&config.id).map_err(|_| {
            SidecarError::Config(format!(
                "sidecar id {:?} cannot be a header value",
                config.id
            ))
        })?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let external = Client::builder(TokioExecutor::new()).build(http);
        Ok(Arc::new(Self {
            config,
            hop,
            destinations,
            external,
            external_requests: metrics.requests_of(Direction::Outbound, EXTERNAL),
            unrouted_requests: metrics.requests_of(Direction::Outbound, "-"),
            timers: Timers::new(),
        }))
    }

    /// Serves the app's connections on `listener` until `stop`, then drains.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        drain: Duration,
    ) {
        serve::accept_loop(
            "outbound",
            listener,
            stop,
            drain,
            move |stream, peer, closing| {
                let this = self.clone();
                async move {
                    // `handle` owns its handle on the proxy, so its future
                    // needs no wrapper (each is ~2 KB, moved when made).
                    serve::serve_http(stream, closing, move |req| this.clone().handle(req)).await;
                }
                .instrument(info_span!("outbound_conn", client = %peer))
            },
        )
        .await;
    }

    /// Handles one request from the app.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let (requests, result) = self.route(req).await;
        let rsp = result.unwrap_or_else(|err| {
            debug!(error = %err, "answered by the sidecar");
            err.into_response()
        });
        requests.record(rsp.status().as_u16(), started.elapsed());
        rsp
    }

    /// The answer, and the metrics it counts in.
    async fn route(
        &self,
        mut req: Request<Incoming>,
    ) -> (RequestMetrics, Result<Response<ProxyBody>, ProxyError>) {
        let unrouted = |err| (self.unrouted_requests.clone(), Err(err));
        if req.method() == Method::CONNECT {
            return unrouted(ProxyError::BadRequest(
                "CONNECT is not supported: call http:// URLs through the sidecar (the mesh encrypts them)".into(),
            ));
        }
        let authority = match requested_authority(req.uri(), req.headers()) {
            Ok(authority) => authority,
            Err(err) => return unrouted(err),
        };
        let to = match target(&self.config.zone, &authority) {
            Ok(to) => to,
            Err(err) => return unrouted(err),
        };
        // The loop guard. Only a request that leaves the mesh can come back
        // here without passing an app (a peer's inbound strips the hop
        // header, as it must: an app's calls are new requests), so only
        // those carry this sidecar's id onward.
        let looped = match to {
            Target::Mesh(_) => passed_through(req.headers(), &self.config.id),
            Target::External => !enter_hop(req.headers_mut(), &self.config.id, &self.hop),
        };
        if looped {
            return unrouted(ProxyError::Loop {
                id: self.config.id.clone(),
            });
        }
        let dest = match to {
            Target::Mesh(label) => match self.destinations.get(&label) {
                Ok(dest) => Some(dest),
                Err(e) => {
                    return unrouted(ProxyError::BadRequest(format!(
                        "{label:?} is not a service name: {e}"
                    )));
                }
            },
            Target::External => None,
        };
        let (mut parts, incoming) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        match dest {
            Some(dest) => {
                let span = info_span!("outbound", service = %dest.name, method = %parts.method, path = %path.path());
                let result = self
                    .call_mesh(&dest, parts, path, incoming)
                    .instrument(span)
                    .await;
                (dest.requests().clone(), result)
            }
            None => {
                let span = info_span!("outbound", external = %authority, method = %parts.method);
                let result = self
                    .call_external(authority, parts, path, incoming)
                    .instrument(span)
                    .await;
                (self.external_requests.clone(), result)
            }
        }
    }

    async fn call_mesh(
        &self,
        dest: &Destination,
        mut parts: http::request::Parts,
        path: PathAndQuery,
        incoming: Incoming,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let timeout = self.config.request_timeout;
        let name = || dest.name.to_string();
        let limit = self.destinations.config().max_pending;
        let work = async {
            let state = match dest.resolved_now() {
                Some(state) => state,
                // Boxed, so that the rare wait does not grow every request's future.
                None => Box::pin(dest.resolved()).await,
            };
            if state.endpoints == 0 {
                return Err(ProxyError::NoHealthyInstance {
                    service: name(),
                    dns: state.error,
                });
            }
            let (body, replay) = body::buffer(incoming).await.map_err(|e| {
                ProxyError::BadRequest(format!("cannot read the request body: {e}"))
            })?;
            // The peer sees the logical name as :authority; the port the app
            // used means nothing to it.
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(dest.authority(&self.config.zone).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "{}.{} is not a valid authority",
                    dest.name, self.config.zone
                ))
            })?);
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
            parts.headers.remove(header::HOST);
            parts.version = Version::HTTP_2;
            let mut req = Request::from_parts(parts, body);
            // An empty body is replayed without a copy (see `RetryPolicy`):
            // no extension map to allocate for most requests.
            if let Some(bytes) = replay.filter(|b| !b.is_empty()) {
                req.extensions_mut().insert(Replay(bytes));
            }
            // Boxed as a plain `Send` future: awaiting the stack's future
            // directly trips rustc's higher-ranked `Send` inference
            // (rust-lang/rust#102211) once this runs inside `tokio::spawn`.
            let call: Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>> =
                Box::pin(dest.service().oneshot(req));
            call.await
                .map_err(|e| ProxyError::from_stack(&name(), &e, limit))
        };
        let mut rsp =
            self.timers
                .timeout(timeout, work)
                .await
                .map_err(|_| ProxyError::Timeout {
                    service: name(),
                    after: timeout,
                })??;
        strip_hop_by_hop(rsp.headers_mut());
        *rsp.version_mut() = Version::HTTP_11;
        Ok(rsp)
    }

    async fn call_external(
        &self,
        authority: Authority,
        mut parts: http::request::Parts,
        path: PathAndQuery,
        incoming: Incoming,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let name = authority.host().to_string();
        parts.uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        parts.version = Version::HTTP_11;
        let req = Request::from_parts(parts, body::boxed(incoming));
        let timeout = self.config.request_timeout;
        let rsp = self
            .timers
            .timeout(timeout, self.external.request(req))
            .await
            .map_err(|_| ProxyError::Timeout {
                service: name.clone(),
                after: timeout,
            })?
            .map_err(|e| ProxyError::BadGateway {
                service: name.clone(),
                reason: innermost(&e),
            })?;
        let mut rsp = rsp.map(body::boxed);
        strip_hop_by_hop(rsp.headers_mut());
        Ok(rsp)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn route(uri: &str, host: Option<&str>) -> Result<Target<'static>, ProxyError> {
        let uri: Uri = uri.parse().unwrap();
        let mut headers = HeaderMap::new();
        if let Some(h) = host {
            headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        let authority = requested_authority(&uri, &headers)?;
        Ok(match target("xingren.host", &authority)? {
            Target::Mesh(label) => Target::Mesh(Cow::Owned(label.into_owned())),
            Target::External => Target::External,
        })
    }

    fn mesh(name: &str) -> Target<'static> {
        Target::Mesh(Cow::Owned(name.to_string()))
    }

    #[test]
    fn names_route_to_the_mesh_or_out() {
        assert_eq!(route("http://user/users/1", None).unwrap(), mesh("user"));
        assert_eq!(
            route("http://user.xingren.host:8080/x", None).unwrap(),
            mesh("user")
        );
        assert_eq!(
            route("/users/1", Some("USER.xingren.host.")).unwrap(),
            mesh("user")
        );
        assert_eq!(route("/", Some("user")).unwrap(), mesh("user"));
        for (uri, host) in [
            ("http://example.com/", None),
            ("http://10.1.2.3:80/", None),
            ("/", Some("localhost:8080")),
            ("http://[::1]:8080/", None),
            ("/", Some("10.1.2.3")),
        ] {
            assert_eq!(
                route(uri, host).unwrap(),
                Target::External,
                "{uri} {host:?}"
            );
        }
        assert_eq!(route("/", Some("2fa:80")).unwrap(), mesh("2fa"));
        assert!(route("/", None).is_err());
        assert!(route("http://u1.user.xingren.host/", None).is_err());
    }

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
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let also = [HeaderName::from_static("x-absent"), HOP_HEADER];
        strip_hop_by_hop_and(&mut headers, &also);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }
}
