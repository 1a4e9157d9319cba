//! The `order` service: made-up orders, each with its user fetched from the
//! `user` service — through the sidecar when `http_proxy` is set, which is
//! the whole mesh from an app's point of view.
//!
//! | request | answer |
//! |---|---|
//! | `GET /orders/{id}` | 200 `{"id": 3, "item": "book", "user": {...}, "served_by": "<instance>"}` |
//! | ... when the user call fails | 502 `{"error": {"code": "upstream_...", "upstream_status": 503, "signpost_error": "...", ...}}` |
//! | `GET /orders/abc` | 400 `{"error": {"code": "invalid_id", ...}}` |
//! | `GET /health` | 200 `ok` (does not call `user`: a dead peer must not make this instance look dead) |
//! | anything else | 404 (405 for another method on a known path), JSON error |

use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use serde::Serialize;
use serde_json::Value;
use tracing::warn;

use crate::response::{ApiError, Body, json, parse_id, text};
use crate::serve::Handler;

/// The header a Signpost sidecar puts on answers it made up itself (no
/// healthy instance, timeout, refused by policy), so they can be told from
/// the peer app's own errors.
pub const SIGNPOST_ERROR_HEADER: &str = "x-signpost-error";

/// Default base URL of the user service: a bare service name, which the
/// sidecar resolves in the mesh zone (`user.xingren.host`).
pub const DEFAULT_USER_URL: &str = "http://user";

/// Default limit for a whole user call. Longer than the sidecar's own 30 s
/// request timeout, so a slow peer shows up as the sidecar's 504 (with its
/// `x-signpost-error`) rather than as this app giving up first.
pub const DEFAULT_USER_TIMEOUT: Duration = Duration::from_secs(35);

/// Largest user answer read; anything bigger is not a user.
const MAX_USER_BODY: usize = 64 * 1024;

/// Longest piece of a failed upstream answer echoed in an error.
const MAX_ECHOED_BODY: usize = 1024;

/// Items, picked by order id (order 3 is a book).
const ITEMS: [&str; 10] = [
    "pen", "cup", "map", "book", "lamp", "kite", "mug", "hat", "sock", "bell",
];

/// How `order` reaches `user`.
#[derive(Debug, Clone)]
pub struct OrderConfig {
    /// This instance's id, answered as `served_by`.
    pub instance: String,
    /// Base URL of the user service (`http://user`); `/users/{id}` is
    /// appended.
    pub user_url: String,
    /// HTTP proxy to send user calls through (the sidecar's outbound port);
    /// `None` calls `user_url` directly.
    pub proxy: Option<String>,
    /// Limit for a whole user call.
    pub timeout: Duration,
}

impl OrderConfig {
    /// Calls `user_url` directly, with the default timeout.
    pub fn new(instance: impl Into<String>, user_url: impl Into<String>) -> Self {
        Self {
            instance: instance.into(),
            user_url: user_url.into(),
            proxy: None,
            timeout: DEFAULT_USER_TIMEOUT,
        }
    }
}

/// The proxy the environment asks for: `http_proxy`, else `HTTP_PROXY`
/// (lower case first, as curl does), ignoring empty values.
pub fn proxy_from_env() -> Option<String> {
    ["http_proxy", "HTTP_PROXY"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

/// Why an [`OrderService`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--user-url` is not an `http://` URL.
    #[error("--user-url {url:?} is not usable: {reason}")]
    UserUrl {
        /// The URL given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The proxy URL is not usable.
    #[error("http_proxy {url:?} is not usable: {source}")]
    Proxy {
        /// The URL given.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why the call to `user` failed. Each becomes a 502 whose JSON says which.
#[derive(Debug, thiserror::Error)]
pub enum UserCallError {
    /// No answer: connection refused or reset, or the timeout ran out.
    #[error("cannot reach the user service at {url}{via}: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// ` via proxy P` when a proxy was used.
        via: String,
        /// The error chain, one line.
        reason: String,
        /// Whether it was the timeout.
        timeout: bool,
    },
    /// An answer, but not a 2xx one.
    #[error("the user service answered {status} for {url}{}", signpost_error.as_ref().map(|e| format!(", from the mesh (x-signpost-error: {e})")).unwrap_or_default())]
    Status {
        /// The URL called.
        url: String,
        /// The status received.
        status: StatusCode,
        /// The sidecar's `x-signpost-error`, when it made the answer up.
        signpost_error: Option<String>,
        /// The start of the answer's body.
        body: Value,
    },
    /// A 2xx answer whose body is not a JSON user.
    #[error("the user service at {url} answered {status} with a body that is not JSON: {reason}")]
    BadBody {
        /// The URL called.
        url: String,
        /// The status received.
        status: StatusCode,
        /// Why the body was refused.
        reason: String,
    },
}

impl UserCallError {
    /// The 502 answer: `code` says which failure, and the fields a person
    /// needs to tell a mesh error from the user app's own.
    pub fn to_api_error(&self) -> ApiError {
        let message = self.to_string();
        match self {
            UserCallError::Unreachable { url, timeout, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                if *timeout {
                    "upstream_timeout"
                } else {
                    "upstream_unreachable"
                },
                message,
            )
            .with("upstream_url", url.as_str())
            .with("upstream_status", Value::Null)
            .with("signpost_error", Value::Null),
            UserCallError::Status {
                url,
                status,
                signpost_error,
                body,
            } => ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
                .with("upstream_url", url.as_str())
                .with("upstream_status", status.as_u16())
                .with("signpost_error", signpost_error.clone())
                .with("upstream_body", body.clone()),
            UserCallError::BadBody { url, status, .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "upstream_bad_body", message)
                    .with("upstream_url", url.as_str())
                    .with("upstream_status", status.as_u16())
                    .with("signpost_error", Value::Null)
            }
        }
    }
}

/// An order, as `GET /orders/{id}` answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Order {
    /// The id asked for.
    pub id: u64,
    /// What was ordered.
    pub item: &'static str,
    /// The user's JSON, as the user service answered it.
    pub user: Value,
    /// The instance id of the order process that answered.
    pub served_by: String,
}

/// The `order` service's routes and its client for `user`.
#[derive(Debug, Clone)]
pub struct OrderService {
    instance: String,
    user_url: String,
    proxy: Option<String>,
    client: reqwest::Client,
}

impl OrderService {
    /// Builds the service; fails on an unusable URL.
    pub fn new(config: OrderConfig) -> Result<Self, ConfigError> {
        let user_url = config.user_url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&user_url).map_err(|e| ConfigError::UserUrl {
            url: config.user_url.clone(),
            reason: e.to_string(),
        })?;
        if parsed.scheme() != "http" {
            return Err(ConfigError::UserUrl {
                url: config.user_url.clone(),
                reason: "only http:// is supported (the sidecar does the TLS)".into(),
            });
        }
        let builder = reqwest::Client::builder()
            .timeout(config.timeout)
            // Fail fast when the sidecar (or user) is not listening at all.
            .connect_timeout(Duration::from_secs(2));
        let builder = match &config.proxy {
            // Explicit, rather than reqwest's own reading of the
            // environment, so tests and `--user-url` runs are not routed
            // through whatever proxy the machine has set.
            Some(proxy) => builder.proxy(
                reqwest::Proxy::http(proxy)
                    .map_err(|source| ConfigError::Proxy {
                        url: proxy.clone(),
                        source,
                    })?
                    .no_proxy(reqwest::NoProxy::from_env()),
            ),
            None => builder.no_proxy(),
        };
        Ok(Self {
            instance: config.instance,
            user_url,
            proxy: config.proxy,
            client: builder.build().map_err(ConfigError::Client)?,
        })
    }

    /// The user id an order belongs to: `order % 10 + 1`, so the orders
    /// spread over users 1 to 10.
    pub fn user_of(order: u64) -> u64 {
        order % 10 + 1
    }

    /// Fetches user `id` from the user service.
    pub async fn fetch_user(&self, id: u64) -> Result<Value, UserCallError> {
        let url = format!("{}/users/{id}", self.user_url);
        let unreachable = |err: reqwest::Error| UserCallError::Unreachable {
            url: url.clone(),
            via: self
                .proxy
                .as_ref()
                .map(|p| format!(" via proxy {p}"))
                .unwrap_or_default(),
            timeout: err.is_timeout(),
            reason: error_chain(&err),
        };
        let mut rsp = self
            .client
            .get(&url)
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(unreachable)?;
        let status = rsp.status();
        let signpost_error = header_text(rsp.headers(), SIGNPOST_ERROR_HEADER);
        let body = read_limited(&mut rsp, MAX_USER_BODY).await;
        if !status.is_success() {
            return Err(UserCallError::Status {
                url,
                status,
                signpost_error,
                body: echo_body(&body.unwrap_or_default()),
            });
        }
        let body = body.map_err(|reason| UserCallError::BadBody {
            url: url.clone(),
            status,
            reason,
        })?;
        serde_json::from_slice(&body).map_err(|e| UserCallError::BadBody {
            url,
            status,
            reason: e.to_string(),
        })
    }

    async fn order(&self, id: u64) -> Result<Order, UserCallError> {
        let user = self.fetch_user(Self::user_of(id)).await?;
        Ok(Order {
            id,
            item: ITEMS[(id % ITEMS.len() as u64) as usize],
            user,
            served_by: self.instance.clone(),
        })
    }

    async fn route(&self, method: &Method, path: &str) -> Result<Response<Body>, ApiError> {
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        let order_id = match segments[..] {
            ["health"] => None,
            ["orders", raw] if !raw.is_empty() => Some(raw),
            _ => return Err(ApiError::not_found(path)),
        };
        if method != Method::GET && method != Method::HEAD {
            return Err(ApiError::method_not_allowed(method));
        }
        let Some(raw) = order_id else {
            return Ok(text(StatusCode::OK, "ok"));
        };
        let id = parse_id("order", raw)?;
        match self.order(id).await {
            Ok(order) => Ok(json(StatusCode::OK, &order)),
            Err(err) => {
                warn!(order = id, error = %err, "user call failed");
                Err(err.to_api_error())
            }
        }
    }
}

impl Handler for OrderService {
    async fn handle(&self, req: Request<()>) -> Response<Body> {
        self.route(req.method(), req.uri().path())
            .await
            .unwrap_or_else(ApiError::into_response)
    }
}

/// A header's value as text (lossy: it came from the network).
fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// An error and its sources on one line: reqwest's own message alone
/// ("error sending request") hides the cause a person needs.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Reads at most `limit` bytes of body; more is an error.
async fn read_limited(rsp: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match rsp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(format!("the body is larger than {limit} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(err) => return Err(format!("cannot read the body: {}", error_chain(&err))),
        }
    }
}

/// The body of a failed answer, for the error JSON: as JSON when it is
/// JSON (the user app's own error), else the start of it as text.
fn echo_body(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        return value;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim_end();
    let mut shown: String = text.chars().take(MAX_ECHOED_BODY).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    Value::String(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::text;
    use crate::serve::serve;
    use crate::user::UserService;
    use http::HeaderValue;
    use serde_json::json;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    /// A server running `handler` on a free loopback port; stops when the
    /// returned sender is dropped.
    async fn start<H: Handler>(handler: H) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            handler,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        (addr, stop)
    }

    /// A free port with nothing listening on it.
    /// A loopback address that refuses connections for as long as the
    /// returned socket lives: bound, so no other test can take the port,
    /// but not listening. (A listener bound and dropped frees the port for
    /// whichever parallel test binds next.)
    fn dead_port() -> (tokio::net::TcpSocket, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        (socket, addr)
    }

    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Value) {
        let rsp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .expect("order answers");
        let status = rsp.status();
        let bytes = rsp.bytes().await.expect("body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    fn order_service(user_url: String, proxy: Option<String>) -> OrderService {
        OrderService::new(OrderConfig {
            proxy,
            timeout: Duration::from_secs(5),
            ..OrderConfig::new("o1", user_url)
        })
        .expect("order service")
    }

    #[tokio::test]
    async fn an_order_carries_its_user_from_the_user_service() {
        let (user, _stop_user) = start(UserService::new("u1")).await;
        let (order, _stop_order) = start(order_service(format!("http://{user}/"), None)).await;

        let (status, body) = get(order, "/orders/3").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            json!({
                "id": 3,
                "item": "book",
                "user": {"id": 4, "name": "user-4", "served_by": "u1"},
                "served_by": "o1",
            })
        );
    }

    #[tokio::test]
    async fn user_down_is_a_502_with_a_json_error() {
        let (_held, user) = dead_port();
        let (order, _stop) = start(order_service(format!("http://{user}"), None)).await;

        let (status, body) = get(order, "/orders/3").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        let error = &body["error"];
        assert_eq!(error["code"], "upstream_unreachable", "{body}");
        assert_eq!(error["upstream_url"], format!("http://{user}/users/4"));
        assert_eq!(error["upstream_status"], Value::Null);
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(&user.to_string()), "{message}");
    }

    /// Stands in for a sidecar: answers every request as a proxy would,
    /// recording the request target and Host it got.
    struct FakeSidecar {
        seen: tokio::sync::mpsc::UnboundedSender<(String, String)>,
        answer: fn() -> Response<Body>,
    }

    impl Handler for FakeSidecar {
        async fn handle(&self, req: Request<()>) -> Response<Body> {
            let host = header_text(req.headers(), "host").unwrap_or_default();
            let _ = self.seen.send((req.uri().to_string(), host));
            (self.answer)()
        }
    }

    /// A fake sidecar answering every request with `answer`; the receiver
    /// gets each request's URI and `Host`.
    async fn fake_sidecar(
        answer: fn() -> Response<Body>,
    ) -> (
        SocketAddr,
        oneshot::Sender<()>,
        tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    ) {
        let (seen, requests) = tokio::sync::mpsc::unbounded_channel();
        let (addr, stop) = start(FakeSidecar { seen, answer }).await;
        (addr, stop, requests)
    }

    /// An order service whose calls to user go through the proxy `proxy`.
    async fn order_via(proxy: SocketAddr) -> (SocketAddr, oneshot::Sender<()>) {
        start(order_service(
            DEFAULT_USER_URL.into(),
            Some(format!("http://{proxy}")),
        ))
        .await
    }

    #[tokio::test]
    async fn with_a_proxy_the_user_call_is_absolute_form_with_host_user() {
        let (proxy, _stop_proxy, mut requests) =
            fake_sidecar(|| json(StatusCode::OK, &UserService::new("u9").user(8))).await;
        let (order, _stop) = order_via(proxy).await;

        let (status, body) = get(order, "/orders/17").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["user"]["served_by"], "u9");
        assert_eq!(
            requests.recv().await,
            Some(("http://user/users/8".to_string(), "user".to_string()))
        );
    }

    #[tokio::test]
    async fn a_mesh_error_is_a_502_naming_the_status_and_x_signpost_error() {
        let (proxy, _stop_proxy, _requests) = fake_sidecar(|| {
            let mut rsp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy instance of user\n",
            );
            rsp.headers_mut().insert(
                SIGNPOST_ERROR_HEADER,
                HeaderValue::from_static("no healthy instance of user"),
            );
            rsp
        })
        .await;
        let (order, _stop) = order_via(proxy).await;

        let (status, body) = get(order, "/orders/1").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        let error = &body["error"];
        assert_eq!(error["code"], "upstream_error");
        assert_eq!(error["upstream_status"], 503);
        assert_eq!(error["signpost_error"], "no healthy instance of user");
        assert_eq!(error["upstream_body"], "no healthy instance of user");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("from the mesh"), "{message}");
    }

    #[tokio::test]
    async fn an_app_error_from_user_is_passed_on_without_signpost_error() {
        let (proxy, _stop_proxy, _requests) = fake_sidecar(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "db_down",
                "database down",
            )
            .into_response()
        })
        .await;
        let (order, _stop) = order_via(proxy).await;

        let (status, body) = get(order, "/orders/1").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert_eq!(body["error"]["upstream_status"], 500);
        assert_eq!(body["error"]["signpost_error"], Value::Null);
        assert_eq!(body["error"]["upstream_body"]["error"]["code"], "db_down");
    }

    #[tokio::test]
    async fn the_sidecar_itself_down_names_the_proxy() {
        let (_held, proxy) = dead_port();
        let (order, _stop) = order_via(proxy).await;

        let (status, body) = get(order, "/orders/1").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
        assert_eq!(body["error"]["code"], "upstream_unreachable");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("via proxy http://{proxy}")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn health_does_not_depend_on_user() {
        let (_held, user) = dead_port();
        let (order, _stop) = start(order_service(format!("http://{user}"), None)).await;
        assert_eq!(get(order, "/health").await, (StatusCode::OK, json!("ok")));
    }

    #[tokio::test]
    async fn bad_ids_and_paths_are_json_errors() {
        let (_held, user) = dead_port();
        let (order, _stop) = start(order_service(format!("http://{user}"), None)).await;
        let (status, body) = get(order, "/orders/abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "invalid_id");
        let (status, body) = get(order, "/users/1").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
    }

    #[test]
    fn only_http_user_urls_are_accepted() {
        for bad in ["user", "https://user", "ftp://user"] {
            assert!(
                matches!(
                    OrderService::new(OrderConfig::new("o1", bad)),
                    Err(ConfigError::UserUrl { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn orders_spread_over_users_one_to_ten() {
        assert_eq!(OrderService::user_of(3), 4);
        assert_eq!(OrderService::user_of(9), 10);
        assert_eq!(OrderService::user_of(10), 1);
        assert_eq!(OrderService::user_of(u64::MAX), u64::MAX % 10 + 1);
    }

    #[test]
    fn long_text_bodies_are_cut() {
        let body = "x".repeat(5000);
        match echo_body(body.as_bytes()) {
            Value::String(s) => assert_eq!(s.chars().count(), MAX_ECHOED_BODY + 1),
            other => panic!("expected text, got {other}"),
        }
    }
}
