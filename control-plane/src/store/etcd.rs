//! The production store: etcd through `etcd-client`.
//!
//! # Connecting and failing over
//!
//! [`EtcdStore::connect`] checks the endpoint URLs but does not touch the
//! network: etcd-client's channels connect lazily, on the first request. So
//! a control plane starts while etcd is still down and answers 503
//! ([`StoreError::is_unavailable`]) until etcd comes.
//!
//! etcd-client spreads requests over every endpoint it is given, but does not
//! steer away from a dead one. So the store talks to **one** endpoint at a
//! time; when an operation fails because that endpoint is unreachable or
//! slow, it rebuilds the client on the next endpoint (a fresh connection,
//! bounded by `connect_timeout`) and retries, within the operation's
//! `op_timeout` budget. Retrying is safe: puts write the same value, deletes
//! and keep-alives are idempotent, and a retried lease grant at worst leaks a
//! lease that nobody renews, which etcd expires after its TTL.
//!
//! # Backing off
//!
//! When every endpoint has been tried and none answers (etcd is down, or
//! has no quorum), the store stops switching endpoints for a while, with
//! exponential backoff and jitter up to [`MAX_SWITCH_BACKOFF`]: operations
//! meanwhile fail at once on the current connection, so callers get their
//! 503 fast and a fleet of replicas does not storm etcd as it comes back.
//! Losing and regaining etcd are logged once each, not per operation.
//!
//! # Security
//!
//! Write access to etcd is control of the mesh (tokens, CA roots, every
//! instance), so production etcd runs with TLS, client certificates and
//! authentication: [`EtcdOptions::tls`] and [`EtcdOptions::credentials`].
//! Credentials are presented lazily, on the first operation of each
//! connection, so that a store still starts while etcd is down.
//!
//! # Bounded time
//!
//! Every operation is bounded by `op_timeout` with `tokio::time::timeout`,
//! so callers never hang when etcd is down or partitioned; the exceptions
//! are the long-lived calls: a watch stream (its start is bounded; a dead
//! connection is then detected by HTTP/2 keep-alive) and `campaign`, which
//! waits for leadership by design but gives up when its lease cannot be
//! renewed for a TTL.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaderKey, PutOptions, ResignOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
    WatchResponse,
};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{
    Backoff, KeyValue, Leadership, LeaseId, Revision, Store, StoreError, WatchBatch, WatchEvent,
    WatchStream, lease_seconds,
};

/// The key `ping` reads by default: any key works, a count-only read of one
/// key is the cheapest request that still needs a leader (it is
/// linearizable). With etcd authentication, use a key the user may read
/// ([`EtcdOptions::ping_key`]).
pub const PING_KEY: &str = "\0signpost/ping";

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Endpoints (`http://127.0.0.1:2379`); tried in order, failing over.
    pub endpoints: Vec<String>,
    /// Time limit for connecting to one endpoint.
    pub connect_timeout: Duration,
    /// Time limit for one operation, failover included.
    pub op_timeout: Duration,
    /// Keys per page of a range read ([`Store::range_pages`]).
    pub page_size: usize,
    /// TLS to etcd; the endpoints must then be `https://`.
    pub tls: Option<EtcdTls>,
    /// A user to authenticate as, when etcd has authentication enabled.
    pub credentials: Option<EtcdCredentials>,
    /// The key [`Store::ping`] reads (never written): with authentication,
    /// one under the prefix the user may read, e.g. `/signpost/ping`.
    pub ping_key: String,
}

/// TLS to etcd: the CA that signed etcd's certificates, and the client
/// certificate to present when etcd runs with `--client-cert-auth`.
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM certificate(s) of the CA that signed etcd's server certificates.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and PEM private key of this client.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// An etcd user and its password.
#[derive(Clone)]
pub struct EtcdCredentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// The longest pause between endpoint switches once every endpoint has
/// failed: etcd back (or a quorum regained) is noticed within about this
/// long, and an outage costs a few reconnects per replica, not hundreds.
pub const MAX_SWITCH_BACKOFF: Duration = Duration::from_secs(2);

/// The first such pause.
const FIRST_SWITCH_BACKOFF: Duration = Duration::from_millis(100);

/// Keys per page of a range read: with instance records at most 16 KiB,
/// a page stays well under [`MAX_MESSAGE`].
pub const PAGE_SIZE: usize = 1000;

/// The largest answer taken from etcd (tonic's default is 4 MiB). A page
/// that is larger anyway (records written before the size limits) is read
/// again in smaller pages.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

impl Default for EtcdOptions {
    /// etcd's default local endpoint; 1 s to connect (a loopback or LAN
    /// connect takes milliseconds, so longer only delays failover) and 3 s
    /// per operation (a healthy cluster answers in milliseconds; 3 s rides
    /// out a leader election, which takes about one election timeout, 1 s).
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            connect_timeout: Duration::from_secs(1),
            op_timeout: Duration::from_secs(3),
            page_size: PAGE_SIZE,
            tls: None,
            credentials: None,
            ping_key: PING_KEY.to_string(),
        }
    }
}

/// The etcd-backed store. Cloning gives another handle to the same
/// connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.opts.endpoints)
            .field("current", &self.inner.opts.endpoints.get(current.index))
            .finish()
    }
}

struct Inner {
    opts: EtcdOptions,
    current: Mutex<Current>,
    /// Whether the last operation reached etcd: losing and regaining it
    /// are logged once each.
    reachable: AtomicBool,
    /// Clients built by failovers, for tests and the curious.
    reconnects: AtomicU64,
}

/// The client in use. `generation` changes with every failover, so that
/// several operations failing at once move to the next endpoint only once.
struct Current {
    generation: u64,
    index: usize,
    client: Client,
    /// Set once the client has authenticated (when credentials are given).
    authenticated: Arc<OnceCell<()>>,
    /// Switches since etcd last answered; past one round of the
    /// endpoints, switching backs off.
    failed_switches: u32,
    /// No switch before this instant (backing off).
    hold_until: Option<Instant>,
    backoff: Backoff,
}

impl EtcdStore {
    /// A store on `opts.endpoints`. Does not wait for etcd: it fails only
    /// for a configuration error (no endpoint, or an invalid URL).
    pub async fn connect(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Other("no etcd endpoint given".to_string()));
        }
        for endpoint in &opts.endpoints {
            match (endpoint.starts_with("https://"), opts.tls.is_some()) {
                (true, false) => {
                    return Err(StoreError::Other(format!(
                        "etcd endpoint {endpoint} is https:// but no CA was given to check \
                         its certificate (--etcd-cacert)"
                    )));
                }
                (false, true) => {
                    return Err(StoreError::Other(format!(
                        "etcd endpoint {endpoint} is not https:// but TLS options were given \
                         (--etcd-cacert, --etcd-cert): use https:// URLs"
                    )));
                }
                _ => {}
            }
        }
        if let Some(tls) = &opts.tls {
            // tonic reports a bad PEM only at connect time, deep in a
            // transport error; check it now, where the flag can be named.
            if !contains_pem_certificate(&tls.ca_pem) {
                return Err(StoreError::Other(
                    "the etcd CA (--etcd-cacert) holds no PEM certificate".to_string(),
                ));
            }
            if let Some((cert, key)) = &tls.client {
                if !contains_pem_certificate(cert) {
                    return Err(StoreError::Other(
                        "the etcd client certificate (--etcd-cert) holds no PEM certificate"
                            .to_string(),
                    ));
                }
                if !String::from_utf8_lossy(key).contains("PRIVATE KEY-----") {
                    return Err(StoreError::Other(
                        "the etcd client key (--etcd-key) holds no PEM private key".to_string(),
                    ));
                }
            }
        }
        // Build a client for every endpoint once, so a bad URL is reported
        // now rather than at failover time. Building does no I/O.
        let mut first = None;
        for endpoint in &opts.endpoints {
            let client = build_client(endpoint, &opts).await?;
            first.get_or_insert(client);
        }
        let client = first.ok_or_else(|| StoreError::Other("no etcd endpoint given".into()))?;
        tracing::debug!(endpoints = ?opts.endpoints, "etcd store ready (connects lazily)");
        Ok(Self {
            inner: Arc::new(Inner {
                opts,
                current: Mutex::new(Current {
                    generation: 0,
                    index: 0,
                    client,
                    authenticated: Arc::new(OnceCell::new()),
                    failed_switches: 0,
                    hold_until: None,
                    backoff: Backoff::new(FIRST_SWITCH_BACKOFF, MAX_SWITCH_BACKOFF),
                }),
                reachable: AtomicBool::new(true),
                reconnects: AtomicU64::new(0),
            }),
        })
    }

    /// How many times the store has built a new connection to fail over
    /// (bounded by the backoff while etcd is away).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// The options this store was built with.
    pub fn options(&self) -> &EtcdOptions {
        &self.inner.opts
    }

    /// One page of a range read: at most `limit` keys from `from` up to
    /// `end` (exclusive), at `revision` (0: the current one).
    async fn page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: Revision,
        limit: usize,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        self.inner
            .run("range", |c| {
                let opts = GetOptions::new()
                    .with_range(end)
                    .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
                    .with_revision(revision);
                async move {
                    let mut kv = c.kv_client().max_decoding_message_size(MAX_MESSAGE);
                    kv.get(from, Some(opts))
                        .await
                        .map_err(|e| map_range_err(e, revision))
                }
            })
            .await
    }
}

/// Connection options for one endpoint.
///
/// No per-request `with_timeout`: it would also cut long-lived calls (a
/// campaign waiting for leadership); `tokio::time::timeout` bounds each
/// operation instead. HTTP/2 keep-alive every 10 s detects a dead connection
/// under a watch; not more often, and not while idle, because etcd hangs up
/// on clients that ping more than every 5 s or without an open stream.
fn connect_options(opts: &EtcdOptions) -> ConnectOptions {
    let options = ConnectOptions::new()
        .with_connect_timeout(opts.connect_timeout)
        .with_keep_alive(Duration::from_secs(10), opts.op_timeout)
        .with_keep_alive_while_idle(false)
        // A member cut off from its cluster refuses watches and keep-alives
        // instead of serving stale data; we then fail over.
        .with_require_leader(true)
        // etcd's simple tokens expire (5 min by default): authenticate
        // again when one is refused. The credentials themselves are set on
        // first use, see `Inner::authenticate`.
        .with_auto_token_refresh(true);
    match &opts.tls {
        Some(tls) => {
            let mut config =
                TlsOptions::new().ca_certificate(Certificate::from_pem(tls.ca_pem.clone()));
            if let Some((cert, key)) = &tls.client {
                config = config.identity(Identity::from_pem(cert.clone(), key.clone()));
            }
            options.with_tls(config)
        }
        None => options,
    }
}

fn contains_pem_certificate(pem: &[u8]) -> bool {
    String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----")
}

/// A gRPC status's message and the errors under it: a failed connection
/// is "transport error" at the top, and the cause (refused, a certificate
/// the server did not accept) is what an operator needs.
fn status_text(status: &tonic::Status) -> String {
    with_causes(
        status.message().to_string(),
        std::error::Error::source(status),
    )
}

/// An error with its sources, `a: b: c`, for the same reason.
fn with_sources(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

fn with_causes(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

async fn build_client(endpoint: &str, opts: &EtcdOptions) -> Result<Client, StoreError> {
    let connect = Client::connect([endpoint], Some(connect_options(opts)));
    match tokio::time::timeout(opts.connect_timeout, connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(StoreError::Other(format!(
            "invalid etcd endpoint {endpoint:?}: {e}"
        ))),
        Err(_) => Err(StoreError::Timeout(opts.connect_timeout)),
    }
}

/// Maps an etcd-client error; lease-specific codes are mapped by callers.
fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => match status.code() {
            // Unavailable: refused connections, no leader, etcd's own
            // "request timed out". Cancelled and Unknown: a connection torn
            // down mid-request. All mean "try again, maybe elsewhere".
            Code::Unavailable | Code::Cancelled | Code::Unknown => {
                StoreError::Unavailable(status_text(&status))
            }
            Code::DeadlineExceeded => {
                StoreError::Unavailable(format!("etcd deadline exceeded: {}", status.message()))
            }
            Code::PermissionDenied | Code::Unauthenticated => StoreError::Other(format!(
                "etcd refused the request ({:?}: {}): check --etcd-user and its role's \
                 permissions on the key prefix",
                status.code(),
                status.message()
            )),
            _ => StoreError::Other(format!("{:?}: {}", status.code(), status.message())),
        },
        E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(with_sources(&e)),
        other => StoreError::Other(other.to_string()),
    }
}

/// Maps an error of a range read at `revision`: a compacted revision, or
/// an answer over [`MAX_MESSAGE`].
fn map_range_err(e: etcd_client::Error, revision: Revision) -> StoreError {
    match &e {
        etcd_client::Error::GRpcStatus(status) if status.code() == Code::OutOfRange => {
            if status.message().contains("compacted") {
                StoreError::Compacted {
                    requested: revision,
                    compact_revision: revision,
                }
            } else {
                StoreError::TooLarge(status.message().to_string())
            }
        }
        _ => map_err(e),
    }
}

/// The end of the key range of everything under `prefix`: the prefix with
/// its last byte below 0xff raised by one (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// Maps an error of a request naming `lease`: etcd answers NotFound for a
/// lease that expired or was revoked.
fn map_lease_err(e: etcd_client::Error, lease: LeaseId) -> StoreError {
    match &e {
        etcd_client::Error::GRpcStatus(status) if status.code() == Code::NotFound => {
            StoreError::LeaseNotFound(lease)
        }
        _ => map_err(e),
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Other("etcd response without a header".to_string()))
}

fn to_key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        // Keys written by Signpost are UTF-8; anything else is someone
        // else's key and is classified as `Other` above us anyway.
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    }
}

impl Inner {
    fn client(&self) -> (u64, Client, Arc<OnceCell<()>>) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (
            current.generation,
            current.client.clone(),
            current.authenticated.clone(),
        )
    }

    /// The current client, authenticated if credentials are configured.
    async fn ready_client(&self) -> (u64, Result<Client, StoreError>) {
        let (generation, client, authenticated) = self.client();
        let ready = tokio::time::timeout(
            self.opts.op_timeout,
            self.authenticate(&client, &authenticated),
        )
        .await
        .unwrap_or(Err(StoreError::Timeout(self.opts.op_timeout)));
        (generation, ready.map(|()| client))
    }

    /// Authenticates `client` once (its clones share the token).
    async fn authenticate(
        &self,
        client: &Client,
        authenticated: &OnceCell<()>,
    ) -> Result<(), StoreError> {
        let Some(creds) = &self.opts.credentials else {
            return Ok(());
        };
        authenticated
            .get_or_try_init(|| async {
                let mut client = client.clone();
                let user = Some((creds.user.clone(), creds.password.clone()));
                match client.update_user(user).await {
                    Ok(()) => Ok(()),
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.code() == Code::FailedPrecondition =>
                    {
                        // etcd without authentication refuses to
                        // authenticate; requests go through anyway.
                        tracing::warn!(
                            user = %creds.user,
                            "etcd has authentication disabled; --etcd-user is not used"
                        );
                        Ok(())
                    }
                    Err(etcd_client::Error::GRpcStatus(status))
                        if status.code() == Code::InvalidArgument =>
                    {
                        Err(StoreError::Other(format!(
                            "etcd refused user {:?}: {} (check --etcd-user and \
                             --etcd-password-file)",
                            creds.user,
                            status.message()
                        )))
                    }
                    Err(e) => Err(map_err(e)),
                }
            })
            .await
            .map(|_| ())
    }

    /// Notes that etcd answered: ends any backoff, and says so once.
    fn reached(&self) {
        if self.reachable.load(Ordering::Relaxed) {
            return;
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.failed_switches = 0;
        current.hold_until = None;
        current.backoff.reset();
        let endpoint = self.opts.endpoints.get(current.index).cloned();
        drop(current);
        if self.reachable.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::info!(endpoint = ?endpoint, "etcd: reachable again");
    }

    /// Notes that an operation could not reach etcd, saying so once.
    fn unreachable(&self, error: &StoreError) {
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                endpoints = ?self.opts.endpoints,
                %error,
                "etcd: unreachable; operations fail until it answers, reconnecting with backoff"
            );
        }
    }

    /// Moves to the next endpoint with a fresh connection, unless another
    /// operation already did since `failed` was handed out, or the store is
    /// backing off after a whole round of endpoints failed.
    async fn fail_over(&self, failed: u64) {
        let next = {
            let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current.generation != failed {
                return;
            }
            if current.hold_until.is_some_and(|t| Instant::now() < t) {
                return;
            }
            (current.index + 1) % self.opts.endpoints.len()
        };
        let endpoint = &self.opts.endpoints[next];
        match build_client(endpoint, &self.opts).await {
            Ok(client) => {
                let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
                if current.generation == failed {
                    let failed_switches = current.failed_switches + 1;
                    // Every endpoint tried since etcd last answered: wait
                    // before the next round.
                    let hold_until = (failed_switches as usize >= self.opts.endpoints.len())
                        .then(|| Instant::now() + current.backoff.next_wait());
                    let backoff = current.backoff.clone();
                    *current = Current {
                        generation: failed + 1,
                        index: next,
                        client,
                        authenticated: Arc::new(OnceCell::new()),
                        failed_switches,
                        hold_until,
                        backoff,
                    };
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(endpoint = %endpoint, ?hold_until, "etcd: switched endpoint");
                }
            }
            Err(e) => {
                tracing::debug!(endpoint = %endpoint, error = %e, "etcd: cannot switch endpoint");
                let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
                if current.generation == failed {
                    let wait = current.backoff.next_wait();
                    current.hold_until = Some(Instant::now() + wait);
                }
            }
        }
    }

    /// Runs `op` on the current client, failing over and retrying while it
    /// reports the store unreachable, all within `op_timeout`.
    async fn run<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let budget = self.opts.op_timeout;
        let deadline = Instant::now() + budget;
        // One try per endpoint, plus one so that a single endpoint gets a
        // retry on a fresh connection (e.g. right after etcd restarted).
        let attempts = self.opts.endpoints.len() + 1;
        let mut last = StoreError::Timeout(budget);
        for attempt in 1..=attempts {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // Keep half of what is left for the next endpoint, unless this
            // is the last try: a hung endpoint must not eat the whole budget.
            let slice = if attempt == attempts {
                deadline - now
            } else {
                (deadline - now) / 2
            };
            let (generation, client, authenticated) = self.client();
            let try_op = async {
                self.authenticate(&client, &authenticated).await?;
                op(client.clone()).await
            };
            match tokio::time::timeout(slice, try_op).await {
                Ok(Ok(v)) => {
                    self.reached();
                    return Ok(v);
                }
                Ok(Err(e)) if e.is_unavailable() => {
                    tracing::debug!(op = what, attempt, error = %e, "etcd: unreachable, failing over");
                    last = e;
                }
                Ok(Err(e)) => {
                    // A refusal is an answer: etcd is there.
                    self.reached();
                    return Err(e);
                }
                Err(_) => {
                    tracing::debug!(op = what, attempt, ?slice, "etcd: slow, failing over");
                    last = StoreError::Timeout(budget);
                }
            }
            self.fail_over(generation).await;
        }
        tracing::debug!(op = what, error = %last, "etcd operation failed");
        self.unreachable(&last);
        Err(last)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner
            .run("get", |mut c| async move {
                let resp = c.get(key, None).await.map_err(map_err)?;
                Ok(resp.kvs().first().map(to_key_value))
            })
            .await
    }

    async fn range_pages(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        // The first page reads the current revision; the others read at it.
        let mut revision = 0;
        let mut limit = self.inner.opts.page_size.max(1);
        loop {
            let page = self.page(&from, &end, revision, limit).await;
            let page = match page {
                Ok(page) => page,
                Err(StoreError::TooLarge(_)) if limit > 1 => {
                    limit = limit.div_ceil(2);
                    tracing::debug!(
                        limit,
                        "etcd: a range page was too large, reading smaller ones"
                    );
                    continue;
                }
                Err(err) => return Err(err),
            };
            if revision == 0 {
                revision = header_revision(page.header())?;
            }
            let Some(last) = page.kvs().last() else {
                return Ok(revision);
            };
            // etcd returns keys in key order; the next page starts just
            // after the last key.
            from = last.key().to_vec();
            from.push(0);
            let more = page.more();
            each(page.kvs().iter().map(to_key_value).collect());
            if !more {
                return Ok(revision);
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let value = &value;
        self.inner
            .run("put", |mut c| async move {
                let opts = lease.map(|l| PutOptions::new().with_lease(l));
                let resp = c
                    .put(key, value.clone(), opts)
                    .await
                    .map_err(|e| match lease {
                        Some(l) => map_lease_err(e, l),
                        None => map_err(e),
                    })?;
                header_revision(resp.header())
            })
            .await
    }

    async fn put_if_present(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        guard: &str,
    ) -> Result<bool, StoreError> {
        let value = &value;
        self.inner
            .run("put_if_present", |mut c| async move {
                let opts = lease.map(|l| PutOptions::new().with_lease(l));
                // "The guard exists" is "its create revision is above 0".
                let txn = Txn::new()
                    .when([Compare::create_revision(guard, CompareOp::Greater, 0)])
                    .and_then([TxnOp::put(key, value.clone(), opts)]);
                let resp = c.txn(txn).await.map_err(|e| match lease {
                    Some(l) => map_lease_err(e, l),
                    None => map_err(e),
                })?;
                Ok(resp.succeeded())
            })
            .await
    }

    async fn delete(&self, keys: &[String]) -> Result<usize, StoreError> {
        // etcd refuses a txn touching one key twice.
        let unique: BTreeSet<&String> = keys.iter().collect();
        if unique.is_empty() {
            return Ok(0);
        }
        let unique = &unique;
        self.inner
            .run("delete", |mut c| async move {
                let ops: Vec<TxnOp> = unique
                    .iter()
                    .map(|k| TxnOp::delete(k.as_str(), None))
                    .collect();
                let resp = c.txn(Txn::new().and_then(ops)).await.map_err(map_err)?;
                let deleted: i64 = resp
                    .op_responses()
                    .iter()
                    .map(|r| match r {
                        TxnOpResponse::Delete(d) => d.deleted(),
                        _ => 0,
                    })
                    .sum();
                Ok(usize::try_from(deleted).unwrap_or(0))
            })
            .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = lease_seconds(ttl);
        // A retry after a lost answer may grant a second lease; the first
        // is never renewed and etcd expires it after `ttl`.
        self.inner
            .run("grant_lease", |mut c| async move {
                let resp = c.lease_grant(secs, None).await.map_err(map_err)?;
                Ok(resp.id())
            })
            .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        self.inner
            .run("keep_alive", |mut c| async move {
                // etcd-client opens the keep-alive stream with one renewal
                // and checks its answer (TTL 0 = lease gone), but hides the
                // TTL; one more renewal on the same stream reports it.
                let (mut keeper, mut stream) =
                    c.lease_keep_alive(lease).await.map_err(|e| match e {
                        etcd_client::Error::LeaseKeepAliveError(_) => {
                            StoreError::LeaseNotFound(lease)
                        }
                        etcd_client::Error::WatchError(msg) => StoreError::Unavailable(msg),
                        e => map_lease_err(e, lease),
                    })?;
                keeper.keep_alive().await.map_err(map_err)?;
                match stream.message().await.map_err(map_err)? {
                    Some(resp) if resp.ttl() > 0 => {
                        Ok(Duration::from_secs(resp.ttl().unsigned_abs()))
                    }
                    Some(_) => Err(StoreError::LeaseNotFound(lease)),
                    None => Err(StoreError::Unavailable(
                        "etcd closed the keep-alive stream".to_string(),
                    )),
                }
            })
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner
            .run("revoke_lease", |mut c| async move {
                match c
                    .lease_revoke(lease)
                    .await
                    .map_err(|e| map_lease_err(e, lease))
                {
                    Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let opts = &opts;
        // Start the watch and wait for etcd's "created" answer within the
        // budget, so an unreachable etcd is an error now, not a silent
        // stream.
        let (stream, created) = self
            .inner
            .run("watch", |c| async move {
                let mut stream = c
                    .watch_client()
                    .max_decoding_message_size(MAX_MESSAGE)
                    .watch(prefix, Some(opts.clone()))
                    .await
                    .map_err(map_err)?;
                match stream.message().await.map_err(map_err)? {
                    Some(created) => Ok((stream, created)),
                    None => Err(StoreError::Unavailable(
                        "etcd closed the watch before creating it".to_string(),
                    )),
                }
            })
            .await?;
        let mut cursor = WatchCursor {
            stream: Some(stream),
            next: from,
        };
        // etcd 3.4 reports a compacted start revision in a separate answer
        // after "created"; newer versions may fold it into "created".
        if let Some(Err(e)) = cursor.handle(created) {
            return Err(e);
        }
        Ok(Box::pin(futures::stream::unfold(
            cursor,
            WatchCursor::next_batch,
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let result = self
            .inner
            .run("compact", |mut c| async move {
                match c.compact(revision, None).await {
                    Ok(_) => Ok(true),
                    // OutOfRange: already compacted, or a future revision.
                    Err(etcd_client::Error::GRpcStatus(s)) if s.code() == Code::OutOfRange => {
                        Ok(false)
                    }
                    Err(e) => Err(map_err(e)),
                }
            })
            .await?;
        if result {
            return Ok(());
        }
        // Tell the two apart like the memory store does: compacting what is
        // already compacted is done; a future revision is an error.
        let current = self.ping().await?;
        if revision <= current {
            Ok(())
        } else {
            Err(StoreError::Other(format!(
                "cannot compact revision {revision}: the current revision is {current}"
            )))
        }
    }

    async fn campaign(
        &self,
        name: &str,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Leadership, StoreError> {
        let lease = self.grant_lease(ttl).await?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        // From here on, dropping `guard` (an error, or the caller giving up
        // on the campaign) withdraws the candidate by revoking its lease.
        let mut guard = Resigner {
            store: self.clone(),
            lease,
            leader: None,
            stop: stop.clone(),
        };
        tokio::spawn(keep_lease_alive(
            self.clone(),
            lease,
            Duration::from_secs(lease_seconds(ttl).unsigned_abs()),
            lost.clone(),
            stop,
        ));
        // Short waits: a campaign retried late is a checker missing after
        // etcd comes back; the cap keeps an outage to about one retry per
        // second per election.
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        loop {
            let (generation, client) = self.inner.ready_client().await;
            let mut client = match client {
                Ok(client) => client,
                Err(e) if e.is_unavailable() => {
                    self.inner.fail_over(generation).await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => continue,
                        _ = lost.cancelled() => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            // Not bounded by op_timeout: it waits for the current leader to
            // go. It ends early when our lease cannot be renewed.
            let attempt = tokio::select! {
                r = client.campaign(name, candidate, lease) => r,
                _ = lost.cancelled() => {
                    return Err(StoreError::Unavailable(format!(
                        "lost lease {lease:x} while campaigning in {name}"
                    )));
                }
            };
            match attempt.map_err(|e| map_lease_err(e, lease)) {
                Ok(mut resp) => {
                    guard.leader = resp.take_leader();
                    tracing::info!(election = name, candidate, "elected");
                    return Ok(Leadership::new(lost, Box::new(guard)));
                }
                // Campaigning again with the same lease reuses the same
                // candidate key, so retrying elsewhere is safe.
                Err(e) if e.is_unavailable() => {
                    tracing::debug!(election = name, error = %e, "campaign interrupted; retrying");
                    self.inner.fail_over(generation).await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = lost.cancelled() => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn ping(&self) -> Result<Revision, StoreError> {
        let key = self.inner.opts.ping_key.as_str();
        self.inner
            .run("ping", |mut c| async move {
                let resp = c
                    .get(key, Some(GetOptions::new().with_count_only()))
                    .await
                    .map_err(map_err)?;
                header_revision(resp.header())
            })
            .await
    }
}

/// Where one watch stream is. `stream` is `None` once the watch has ended.
struct WatchCursor {
    stream: Option<etcd_client::WatchStream>,
    /// The next revision expected: what a watch would have to restart from.
    next: Revision,
}

impl WatchCursor {
    /// Turns one etcd answer into a batch, an error, or nothing (an answer
    /// without events: "created" or a progress notice).
    fn handle(&mut self, resp: WatchResponse) -> Option<Result<WatchBatch, StoreError>> {
        if resp.compact_revision() > 0 {
            self.stream = None;
            return Some(Err(StoreError::Compacted {
                requested: self.next,
                compact_revision: resp.compact_revision(),
            }));
        }
        if resp.canceled() {
            self.stream = None;
            return Some(Err(StoreError::Unavailable(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ))));
        }
        if resp.events().is_empty() {
            return None;
        }
        let events: Vec<WatchEvent> = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                Some(match ev.event_type() {
                    EventType::Put => WatchEvent::Put(to_key_value(kv)),
                    EventType::Delete => WatchEvent::Delete {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        mod_revision: kv.mod_revision(),
                    },
                })
            })
            .collect();
        let revision = events.iter().map(event_revision).max().unwrap_or(self.next);
        self.next = revision + 1;
        Some(Ok(WatchBatch { revision, events }))
    }

    async fn next_batch(mut self) -> Option<(Result<WatchBatch, StoreError>, Self)> {
        loop {
            let stream = self.stream.as_mut()?;
            let item = match stream.message().await {
                Ok(Some(resp)) => self.handle(resp),
                Ok(None) => {
                    self.stream = None;
                    Some(Err(StoreError::Unavailable(
                        "etcd closed the watch".to_string(),
                    )))
                }
                Err(e) => {
                    self.stream = None;
                    Some(Err(map_err(e)))
                }
            };
            if let Some(item) = item {
                return Some((item, self));
            }
        }
    }
}

fn event_revision(e: &WatchEvent) -> Revision {
    match e {
        WatchEvent::Put(kv) => kv.mod_revision,
        WatchEvent::Delete { mod_revision, .. } => *mod_revision,
    }
}

/// Renews an election lease every third of its TTL until `stop`. Cancels
/// `lost` when the lease is gone, or could not be renewed for a whole TTL
/// (then etcd has expired it and another candidate may lead).
async fn keep_lease_alive(
    store: EtcdStore,
    lease: LeaseId,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let expires = renewed + ttl;
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout_at(expires, store.keep_alive(lease)) => r,
        };
        match result {
            Ok(Ok(_)) => renewed = Instant::now(),
            Ok(Err(StoreError::LeaseNotFound(_))) => {
                tracing::warn!(
                    lease = format_args!("{lease:x}"),
                    "election lease gone; leadership lost"
                );
                lost.cancel();
                return;
            }
            Ok(Err(e)) if Instant::now() < expires => {
                // The store logs losing etcd once; this repeats each period.
                tracing::debug!(lease = format_args!("{lease:x}"), error = %e, "cannot renew election lease; retrying");
            }
            Ok(Err(_)) | Err(_) => {
                // With etcd unreachable every election goes at once, and
                // the store has said so; otherwise this one is news.
                if store.inner.reachable.load(Ordering::Relaxed) {
                    tracing::warn!(
                        lease = format_args!("{lease:x}"),
                        "election lease not renewed for its TTL; leadership lost"
                    );
                } else {
                    tracing::debug!(
                        lease = format_args!("{lease:x}"),
                        "election lease not renewed for its TTL; leadership lost"
                    );
                }
                lost.cancel();
                return;
            }
        }
    }
}

/// Held by [`Leadership`]: on drop, stops the keep-alive, resigns and
/// revokes the lease (in a spawned task, since drop cannot await).
struct Resigner {
    store: EtcdStore,
    lease: LeaseId,
    leader: Option<LeaderKey>,
    stop: CancellationToken,
}

impl Drop for Resigner {
    fn drop(&mut self) {
        self.stop.cancel();
        let store = self.store.clone();
        let lease = self.lease;
        let leader = self.leader.take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left (shutdown): the lease, no longer renewed,
            // expires after its TTL and frees the election then.
            return;
        };
        runtime.spawn(async move {
            if let Some(leader) = leader {
                let op_timeout = store.inner.opts.op_timeout;
                let resign = async {
                    let (_, client) = store.inner.ready_client().await;
                    client?
                        .resign(Some(ResignOptions::new().with_leader(leader)))
                        .await
                        .map_err(map_err)
                };
                if let Ok(Err(e)) = tokio::time::timeout(op_timeout, resign).await {
                    tracing::debug!(error = %e, "resign failed; revoking the lease anyway");
                }
            }
            // Revoking deletes the candidate key too, whether or not the
            // resign went through.
            match store.revoke_lease(lease).await {
                Ok(()) => {}
                Err(e) if e.is_unavailable() => {
                    tracing::debug!(lease = format_args!("{lease:x}"), error = %e, "cannot revoke election lease; it will expire");
                }
                Err(e) => {
                    tracing::warn!(lease = format_args!("{lease:x}"), error = %e, "cannot revoke election lease; it will expire");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::{EtcdProcess, eventually};

    fn opts(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            connect_timeout: Duration::from_secs(1),
            op_timeout: Duration::from_secs(3),
            page_size: PAGE_SIZE,
            ..EtcdOptions::default()
        }
    }

    /// A loopback port with nothing listening (bound, then released).
    fn dead_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let etcd = EtcdProcess::spawn().await;
        // Pages of three keys, so that every range read of the suite pages.
        let store = EtcdStore::connect(EtcdOptions {
            page_size: 3,
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap();
        crate::store::conformance::run_all(Arc::new(store), "/conformance/").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paged_read_is_one_revision_while_writes_go_on() {
        let etcd = EtcdProcess::spawn().await;
        let store = EtcdStore::connect(EtcdOptions {
            page_size: 2,
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap();
        let mut created = Vec::new();
        for i in 0..20 {
            let key = format!("/paged/k{i:03}");
            created.push((key.clone(), store.put(&key, vec![], None).await.unwrap()));
        }
        // A writer adds keys between the pages (they sort among the ones
        // already there), and rewrites old ones.
        let stop = CancellationToken::new();
        let writer = tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move {
                let mut written = Vec::new();
                for i in 0..10_000 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let key = format!("/paged/k{:03}-new", i % 20);
                    let rev = store.put(&key, vec![], None).await.unwrap();
                    written.push((key, rev));
                    store.put("/paged/k000", vec![1], None).await.unwrap();
                }
                written
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut seen = Vec::new();
        let mut pages = 0;
        let revision = store
            .range_pages("/paged/", &mut |page| {
                pages += 1;
                seen.extend(page);
            })
            .await
            .unwrap();
        stop.cancel();
        let written = writer.await.unwrap();
        assert!(pages >= 10, "{pages} pages of at most 2 keys");
        assert!(
            written.iter().any(|(_, rev)| *rev > revision),
            "the writer did not write during the read"
        );
        assert!(seen.iter().all(|kv| kv.mod_revision <= revision));
        let mut expected: Vec<String> = created
            .into_iter()
            .chain(written.into_iter().filter(|(_, rev)| *rev <= revision))
            .map(|(key, _)| key)
            .collect();
        expected.sort();
        expected.dedup();
        let keys: Vec<String> = seen.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, expected, "the read at {revision}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_at_a_compacted_revision_says_compacted() {
        let etcd = EtcdProcess::spawn().await;
        let store = EtcdStore::connect(opts(vec![etcd.endpoint()]))
            .await
            .unwrap();
        let old = store.put("/c/k", vec![1], None).await.unwrap();
        let new = store.put("/c/k", vec![2], None).await.unwrap();
        store.compact(new).await.unwrap();
        let err = store
            .page(b"/c/", &prefix_end(b"/c/"), old, 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Compacted { requested, .. } if requested == old),
            "{err}"
        );
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[tokio::test]
    async fn connect_does_not_need_etcd() {
        let store = EtcdStore::connect(opts(vec![dead_endpoint()]))
            .await
            .unwrap();
        let started = Instant::now();
        let err = store.ping().await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn connect_refuses_bad_urls() {
        assert!(EtcdStore::connect(opts(vec![])).await.is_err());
        assert!(
            EtcdStore::connect(opts(vec!["http://[::1".into()]))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn fails_over_past_a_dead_endpoint() {
        let etcd = EtcdProcess::spawn().await;
        let store = EtcdStore::connect(opts(vec![dead_endpoint(), etcd.endpoint()]))
            .await
            .unwrap();
        let rev = store.put("/failover/k", b"v".to_vec(), None).await.unwrap();
        assert!(rev > 0);
        assert_eq!(store.get("/failover/k").await.unwrap().unwrap().value, b"v");
        let mut watch = store.watch("/failover/", rev).await.unwrap();
        let batch =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut watch))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        assert_eq!(batch.revision, rev);
    }

    /// A loopback endpoint that accepts connections and never answers: a
    /// hung or partitioned member, the case a refused port does not cover.
    async fn hung_endpoint() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (endpoint, task)
    }

    #[tokio::test]
    async fn fails_over_past_a_hung_endpoint() {
        let etcd = EtcdProcess::spawn().await;
        let (hung, task) = hung_endpoint().await;
        let o = opts(vec![hung, etcd.endpoint()]);
        let op_timeout = o.op_timeout;
        let store = EtcdStore::connect(o).await.unwrap();
        let started = Instant::now();
        let rev = store.put("/hung/k", b"v".to_vec(), None).await.unwrap();
        assert!(
            started.elapsed() < op_timeout,
            "failover took {:?}",
            started.elapsed()
        );
        // Later operations stay on the healthy endpoint.
        let started = Instant::now();
        assert_eq!(store.ping().await.unwrap(), rev);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ping went back to the hung endpoint"
        );
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn etcd_down_then_back() {
        let mut etcd = EtcdProcess::spawn().await;
        let o = opts(vec![etcd.endpoint()]);
        let limit = o.op_timeout + Duration::from_secs(1);
        let store = EtcdStore::connect(o).await.unwrap();
        let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        store
            .put("/down/k", b"1".to_vec(), Some(lease))
            .await
            .unwrap();
        let mut watch = store.watch("/down/", 0).await.unwrap();

        etcd.stop();

        // Every operation fails fast and says "unavailable", never hangs.
        let checks: Vec<(&str, Result<(), StoreError>)> = vec![
            ("get", store.get("/down/k").await.map(drop)),
            ("range", store.range("/down/").await.map(drop)),
            ("put", store.put("/down/k", vec![], None).await.map(drop)),
            ("delete", store.delete(&["/down/k".into()]).await.map(drop)),
            (
                "grant",
                store.grant_lease(Duration::from_secs(5)).await.map(drop),
            ),
            ("keep_alive", store.keep_alive(lease).await.map(drop)),
            ("ping", store.ping().await.map(drop)),
            ("watch", store.watch("/down/", 0).await.map(drop)),
        ];
        for (what, result) in checks {
            match result {
                Err(e) => assert!(e.is_unavailable(), "{what}: {e}"),
                Ok(()) => panic!("{what} succeeded with etcd down"),
            }
        }
        for what in ["get", "put", "keep_alive"] {
            let started = Instant::now();
            let result = tokio::time::timeout(limit, async {
                match what {
                    "get" => store.get("/down/k").await.map(drop),
                    "put" => store.put("/down/k", vec![], None).await.map(drop),
                    _ => store.keep_alive(lease).await.map(drop),
                }
            })
            .await;
            assert!(result.is_ok(), "{what} hung past op_timeout + 1 s");
            assert!(started.elapsed() < limit);
        }
        // The open watch reports the loss instead of going quiet.
        let item = tokio::time::timeout(
            Duration::from_secs(15),
            futures::StreamExt::next(&mut watch),
        )
        .await
        .expect("watch noticed nothing");
        match item {
            Some(Err(e)) => assert!(e.is_unavailable(), "{e}"),
            None => {}
            Some(Ok(b)) => panic!("unexpected batch {b:?}"),
        }

        etcd.start().await;
        let back = eventually(
            Duration::from_secs(10),
            Duration::from_millis(200),
            || async { store.ping().await.is_ok() },
        )
        .await;
        assert!(back, "store did not recover after etcd came back");
        assert_eq!(store.get("/down/k").await.unwrap().unwrap().value, b"1");
        assert!(store.keep_alive(lease).await.unwrap() > Duration::ZERO);
        store.put("/down/k2", b"2".to_vec(), None).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_with_client_certificates() {
        let etcd = EtcdProcess::spawn_tls().await;
        let files = etcd.tls_files().unwrap();
        let good = EtcdStore::connect(EtcdOptions {
            tls: Some(files.options()),
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap();
        let rev = good.put("/tls/k", b"v".to_vec(), None).await.unwrap();
        assert_eq!(good.get("/tls/k").await.unwrap().unwrap().value, b"v");
        assert_eq!(good.ping().await.unwrap(), rev);

        // The right CA but no client certificate: etcd refuses the
        // handshake, the store says so and never hangs.
        let anonymous = EtcdStore::connect(EtcdOptions {
            tls: Some(EtcdTls {
                client: None,
                ..files.options()
            }),
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap();
        let started = Instant::now();
        let err = anonymous.put("/tls/k", vec![], None).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));

        // A CA that did not sign etcd's certificate.
        let other = tempfile::tempdir().unwrap();
        let stranger = crate::testing::EtcdTlsFiles::generate(other.path());
        let untrusting = EtcdStore::connect(EtcdOptions {
            tls: Some(EtcdTls {
                ca_pem: stranger.options().ca_pem,
                ..files.options()
            }),
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap();
        let err = untrusting.ping().await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        assert_eq!(good.get("/tls/k").await.unwrap().unwrap().value, b"v");

        // Plain HTTP to it, and TLS to an http:// URL, are refused up front.
        let plain = etcd.endpoint().replace("https://", "http://");
        let err = EtcdStore::connect(EtcdOptions {
            tls: Some(files.options()),
            ..opts(vec![plain])
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("use https://"), "{err}");
        let err = EtcdStore::connect(opts(vec![etcd.endpoint()]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--etcd-cacert"), "{err}");
        let err = EtcdStore::connect(EtcdOptions {
            tls: Some(EtcdTls {
                ca_pem: b"not a certificate".to_vec(),
                client: None,
            }),
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--etcd-cacert"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn authentication_with_a_user_limited_to_the_prefix() {
        let etcd = EtcdProcess::spawn().await;
        etcd.enable_auth("signpost", "signpost-secret", "/signpost/")
            .await;

        let as_user = |user: &str, password: &str| EtcdOptions {
            credentials: Some(EtcdCredentials {
                user: user.to_string(),
                password: password.to_string(),
            }),
            ping_key: "/signpost/ping".to_string(),
            ..opts(vec![etcd.endpoint()])
        };
        let store = EtcdStore::connect(as_user("signpost", "signpost-secret"))
            .await
            .unwrap();
        let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
        let rev = store
            .put("/signpost/k", b"v".to_vec(), Some(lease))
            .await
            .unwrap();
        assert_eq!(store.ping().await.unwrap(), rev);
        let mut watch = store.watch("/signpost/", rev).await.unwrap();
        let batch =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut watch))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        assert_eq!(batch.revision, rev);
        let leader = store
            .campaign("/signpost/election/auth", "a", Duration::from_secs(2))
            .await
            .unwrap();
        assert!(!leader.lost.is_cancelled());
        // The elected compactor's request: allowed to a non-root user.
        store.compact(rev).await.unwrap();

        // Outside its prefix: refused, with a message naming the cause.
        let err = store.put("/other/k", vec![], None).await.unwrap_err();
        assert!(!err.is_unavailable(), "{err}");
        assert!(err.to_string().contains("permission denied"), "{err}");

        // A wrong password, and no user at all.
        let wrong = EtcdStore::connect(as_user("signpost", "guess"))
            .await
            .unwrap();
        let err = wrong.put("/signpost/k", vec![], None).await.unwrap_err();
        assert!(
            err.to_string().contains("etcd refused user \"signpost\""),
            "{err}"
        );
        let anonymous = EtcdStore::connect(EtcdOptions {
            ping_key: "/signpost/ping".to_string(),
            ..opts(vec![etcd.endpoint()])
        })
        .await
        .unwrap();
        let err = anonymous
            .put("/signpost/k", vec![], None)
            .await
            .unwrap_err();
        assert!(!err.is_unavailable(), "{err}");
        assert_eq!(store.get("/signpost/k").await.unwrap().unwrap().value, b"v");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_costs_few_reconnects_and_recovers() {
        let mut etcd = EtcdProcess::spawn().await;
        let store = EtcdStore::connect(opts(vec![etcd.endpoint(), dead_endpoint()]))
            .await
            .unwrap();
        store.put("/outage/k", b"1".to_vec(), None).await.unwrap();
        etcd.stop();
        // 20 callers, each retrying every 20 ms for 5 s: thousands of
        // failed operations.
        let outage = Duration::from_secs(5);
        let started = Instant::now();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut failed = 0u32;
                    while started.elapsed() < outage {
                        if store.ping().await.is_err() {
                            failed += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    failed
                })
            })
            .collect();
        let mut failed = 0;
        for caller in callers {
            failed += caller.await.unwrap();
        }
        let reconnects = store.reconnects();
        assert!(failed > 1000, "only {failed} failed operations");
        // Backoff 0.1, 0.2, 0.4, 0.8, 1.6, 2, 2 s (each at least half):
        // at most about a dozen switches in 5 s, not one per operation.
        assert!(
            (2..=14).contains(&reconnects),
            "{reconnects} reconnects for {failed} failed operations"
        );
        etcd.start().await;
        let back = eventually(
            MAX_SWITCH_BACKOFF * 3,
            Duration::from_millis(100),
            || async { store.ping().await.is_ok() },
        )
        .await;
        assert!(back, "store did not recover after etcd came back");
        assert_eq!(store.get("/outage/k").await.unwrap().unwrap().value, b"1");
    }

    #[tokio::test]
    async fn compacted_watch_reports_compacted() {
        let etcd = EtcdProcess::spawn().await;
        let store = EtcdStore::connect(opts(vec![etcd.endpoint()]))
            .await
            .unwrap();
        let r1 = store.put("/compact/k", b"1".to_vec(), None).await.unwrap();
        let r2 = store.put("/compact/k", b"2".to_vec(), None).await.unwrap();
        store.compact(r2).await.unwrap();
        // Compacting again, or below, is not an error; the future is.
        store.compact(r1).await.unwrap();
        assert!(store.compact(r2 + 100).await.is_err());

        let err = match store.watch("/compact/", r1).await {
            Err(e) => e,
            Ok(mut s) => {
                tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut s))
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap_err()
            }
        };
        assert_eq!(
            err,
            StoreError::Compacted {
                requested: r1,
                compact_revision: r2
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leadership_is_lost_when_etcd_goes_away() {
        let mut etcd = EtcdProcess::spawn().await;
        let store = EtcdStore::connect(opts(vec![etcd.endpoint()]))
            .await
            .unwrap();
        let leader = store
            .campaign("/election/lost", "a", Duration::from_secs(1))
            .await
            .unwrap();
        etcd.stop();
        let lost = tokio::time::timeout(Duration::from_secs(5), leader.lost.cancelled()).await;
        assert!(lost.is_ok(), "leadership not reported lost with etcd down");
    }
}
