//! The server: sockets, the UDP receive threads, hickory's TCP listener, and
//! the task that rebuilds the index whenever the catalog publishes a
//! snapshot.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::rr::Name;
use hickory_server::Server;
use prometheus_client::registry::Registry;
use signpost_control_plane::catalog::{Catalog, Snapshot};
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;

use crate::config::DnsConfig;
use crate::error::DnsError;
use crate::fast::UdpLoop;
use crate::forward::Forwarder;
use crate::handler::{Handler, Shared};
use crate::identity::Identity;
use crate::index::{Index, ZoneConfig};
use crate::metrics::Metrics;
use crate::transfer::Transfers;

/// Receive buffer asked for each UDP socket: room for a burst of a few
/// thousand queries while a core is busy (the kernel caps it at
/// `net.core.rmem_max`).
const UDP_RECV_BUFFER: usize = 4 << 20;

/// Pending TCP connections the kernel may queue.
const TCP_BACKLOG: i32 = 1024;

/// Responses queued per TCP connection before the writer waits.
const TCP_RESPONSE_BUFFER: usize = 32;

/// How many ephemeral ports to try when asked for port 0: the TCP port the
/// kernel picks may be taken for UDP by someone else.
const EPHEMERAL_BIND_ATTEMPTS: usize = 16;

/// The DNS server of one zone over one catalog.
///
/// ```no_run
/// # async fn demo(catalog: std::sync::Arc<signpost_control_plane::catalog::Catalog>) -> Result<(), signpost_dns::DnsError> {
/// use signpost_dns::{DnsConfig, DnsServer};
/// use tokio_util::sync::CancellationToken;
///
/// let server = DnsServer::new(DnsConfig::default(), catalog)?;
/// println!("dig @{} -p {} user.xingren.host SRV", server.local_addr().ip(), server.local_addr().port());
/// server.run(CancellationToken::new()).await
/// # }
/// ```
pub struct DnsServer {
    shared: Arc<Shared>,
    catalog: Arc<Catalog>,
    udp: Vec<std::net::UdpSocket>,
    tcp: std::net::TcpListener,
    local_addr: SocketAddr,
    tcp_idle_timeout: Duration,
    notify: Vec<SocketAddr>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .field("zone", &self.shared.zone.origin)
            .field("udp_sockets", &self.udp.len())
            .finish()
    }
}

impl DnsServer {
    /// Checks `config`, binds the UDP sockets and the TCP listener (so a
    /// taken port is reported here, with [`DnsError::AddrInUse`]) and builds
    /// the first index from the catalog's current snapshot. Call it inside
    /// a Tokio runtime: the sockets to the upstreams are registered with it.
    ///
    /// The binary should pass upstreams from [`crate::default_upstreams`]
    /// given its own addresses (listen and `ns_address`); an upstream equal
    /// to the listen address is dropped here anyway.
    pub fn new(config: DnsConfig, catalog: Arc<Catalog>) -> Result<Self, DnsError> {
        let origin = parse_zone(&config.zone)?;
        if config.max_udp_payload < 512 {
            return Err(DnsError::InvalidConfig {
                setting: "max_udp_payload",
                reason: format!(
                    "{} is below the 512 bytes every DNS client accepts",
                    config.max_udp_payload
                ),
            });
        }
        if config.udp_answer_limit == Some(0) {
            return Err(DnsError::InvalidConfig {
                setting: "udp_answer_limit",
                reason: "0 would answer no records; leave it unset for the DNS rules".into(),
            });
        }
        if config.max_forwards == 0 {
            return Err(DnsError::InvalidConfig {
                setting: "max_forwards",
                reason: "0 would refuse every forwarded query; leave upstreams empty to turn forwarding off".into(),
            });
        }
        let identity = Identity::new(config.nsid.clone(), config.version_string.clone()).map_err(
            |reason| DnsError::InvalidConfig {
                setting: "nsid",
                reason,
            },
        )?;
        let udp_count = match config.udp_sockets {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (tcp, udp) = bind(config.listen, udp_count)?;
        let local_addr = tcp.local_addr().map_err(|source| DnsError::Bind {
            addr: config.listen,
            proto: "TCP",
            source,
        })?;

        let upstreams: Vec<SocketAddr> = config
            .upstreams
            .iter()
            .copied()
            .filter(|up| {
                let own = is_own_address(*up, local_addr);
                if own {
                    tracing::warn!(upstream = %up, "ignoring upstream: it is this server");
                }
                !own
            })
            .collect();
        let forwarder = if upstreams.is_empty() {
            None
        } else {
            Some(Forwarder::new(
                &upstreams,
                config.forward_timeout,
                config.max_forwards,
            )?)
        };

        let zone = ZoneConfig {
            origin,
            ttl: config.ttl,
            negative_ttl: config.negative_ttl.unwrap_or(config.ttl),
            ns_address: config.ns_address,
        };
        let snapshot = catalog.snapshot();
        let index = Arc::new(Index::build(&snapshot, &zone));
        let metrics = Metrics::default();
        metrics.snapshot(index.revision, index.built);
        let transfers = Transfers::new(config.allow_transfer);
        transfers.published(&index);
        let shared = Arc::new(Shared {
            index: ArcSwap::new(index),
            zone,
            allow_recursion: config.allow_recursion,
            forwarder,
            metrics,
            max_udp_payload: config.max_udp_payload,
            udp_answer_limit: config.udp_answer_limit,
            allow_query: config.allow_query,
            identity,
            transfers,
        });
        tracing::info!(
            addr = %local_addr,
            zone = %shared.zone.origin,
            udp_sockets = udp.len(),
            upstreams = upstreams.len(),
            "DNS server bound"
        );
        Ok(Self {
            shared,
            catalog,
            udp,
            tcp,
            local_addr,
            tcp_idle_timeout: config.tcp_idle_timeout,
            notify: config.notify,
        })
    }

    /// The address the server answers on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Adds the DNS metrics (`signpost_dns_*`) to `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.shared.metrics.register(registry);
    }

    /// Serves until `cancel` fires, then stops accepting queries and
    /// returns. Snapshots the catalog publishes are answered from as soon
    /// as their index is built.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), DnsError> {
        let local_addr = self.local_addr;
        let udp_err = |source| DnsError::Bind {
            addr: local_addr,
            proto: "UDP",
            source,
        };
        // The UDP receive loops, one thread per socket. Any of them ending
        // before `cancel` (it cannot, short of a bug) stops the server
        // rather than leaving it half deaf.
        let stop = Arc::new(AtomicBool::new(false));
        let udp_down = CancellationToken::new();
        let mut threads = Vec::with_capacity(self.udp.len());
        for (i, socket) in self.udp.into_iter().enumerate() {
            UdpLoop::prepare(&socket).map_err(udp_err)?;
            let udp_loop = UdpLoop {
                shared: self.shared.clone(),
                socket: Arc::new(socket),
                runtime: tokio::runtime::Handle::current(),
                stop: stop.clone(),
            };
            let down = udp_down.clone().drop_guard();
            let thread = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    let _down = down;
                    udp_loop.run();
                })
                .map_err(udp_err)?;
            threads.push(thread);
        }

        let mut server = Server::new(Handler(self.shared.clone()));
        let listener =
            tokio::net::TcpListener::from_std(self.tcp).map_err(|source| DnsError::Bind {
                addr: local_addr,
                proto: "TCP",
                source,
            })?;
        server.register_listener(listener, self.tcp_idle_timeout, TCP_RESPONSE_BUFFER);

        let watcher = tokio::spawn(watch_catalog(
            self.catalog,
            self.shared.clone(),
            cancel.clone(),
        ));
        let notifier = (!self.notify.is_empty()).then(|| {
            tokio::spawn(crate::notify::run(
                self.shared.zone.origin.clone(),
                self.notify.clone(),
                self.shared.transfers.subscribe(),
                cancel.clone(),
            ))
        });
        let shutdown = server.shutdown_token().clone();
        let stopper = {
            let cancel = cancel.clone();
            let udp_down = udp_down.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = udp_down.cancelled() => {}
                }
                shutdown.cancel();
            })
        };
        let result = server.block_until_done().await;
        stop.store(true, Ordering::Relaxed);
        stopper.abort();
        watcher.abort();
        if let Some(notifier) = notifier {
            notifier.abort();
        }
        let joined =
            tokio::task::spawn_blocking(move || threads.into_iter().all(|t| t.join().is_ok()))
                .await
                .unwrap_or(false);
        tracing::info!(addr = %local_addr, "DNS server stopped");
        result.map_err(DnsError::Serve)?;
        if !joined || !cancel.is_cancelled() {
            return Err(DnsError::UdpStopped);
        }
        Ok(())
    }
}

/// Rebuilds the index on every new snapshot until `cancel` fires.
async fn watch_catalog(catalog: Arc<Catalog>, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut rx = catalog.subscribe();
    let mut last: Option<Arc<Snapshot>> = None;
    loop {
        let snapshot = rx.borrow_and_update().clone();
        // The catalog also notifies when only its sync state changes; the
        // same snapshot needs no new index.
        if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &snapshot)) {
            let zone = shared.zone.clone();
            let snap = snapshot.clone();
            // Building walks the instances of every changed service (all of
            // them the first time): keep it off the receive loops' workers.
            let previous = shared.index.load_full();
            let started = std::time::Instant::now();
            // Unchanged services are taken from the previous index.
            let build = move || Index::build_from(&snap, &zone, Some(&previous));
            match tokio::task::spawn_blocking(build).await {
                Ok(index) => {
                    tracing::debug!(
                        revision = index.revision,
                        build_ms = started.elapsed().as_secs_f64() * 1e3,
                        since_snapshot_ms =
                            index.built.elapsed().map_or(0.0, |d| d.as_secs_f64() * 1e3),
                        "DNS index rebuilt"
                    );
                    shared.metrics.snapshot(index.revision, index.built);
                    // The DNS-SD enumeration, which names every service,
                    // is built by the first query that asks for it: not
                    // on every change.
                    let index = Arc::new(index);
                    shared.index.store(index.clone());
                    // Kept for IXFR; secondaries are told of the new serial.
                    shared.transfers.published(&index);
                }
                Err(err) => {
                    tracing::error!(%err, "building the DNS index failed; keeping the previous one")
                }
            }
            last = Some(snapshot);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// The zone as a lower-case, fully qualified name.
fn parse_zone(zone: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidZone {
        zone: zone.to_string(),
        reason,
    };
    let mut name = Name::from_ascii(zone.trim()).map_err(|e| invalid(e.to_string()))?;
    name.set_fqdn(true);
    if name.is_root() {
        return Err(invalid(
            "the root cannot be the zone: every name would be ours and none forwarded".into(),
        ));
    }
    Ok(name.to_lowercase())
}

/// Whether forwarding to `upstream` would send a query back to ourselves.
fn is_own_address(upstream: SocketAddr, local: SocketAddr) -> bool {
    if upstream.port() != local.port() {
        return false;
    }
    let ip = upstream.ip();
    ip == local.ip() || (local.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
}

/// Binds the TCP listener, then the UDP sockets on the same port.
fn bind(
    listen: SocketAddr,
    udp_count: usize,
) -> Result<(std::net::TcpListener, Vec<std::net::UdpSocket>), DnsError> {
    let attempts = if listen.port() == 0 {
        EPHEMERAL_BIND_ATTEMPTS
    } else {
        1
    };
    let mut last_err = None;
    for _ in 0..attempts {
        let tcp = bind_tcp(listen)?;
        let addr = tcp.local_addr().map_err(|source| DnsError::Bind {
            addr: listen,
            proto: "TCP",
            source,
        })?;
        match bind_udp_group(addr, udp_count) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(err @ DnsError::AddrInUse { .. }) if listen.port() == 0 => last_err = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last_err.unwrap_or(DnsError::AddrInUse {
        addr: listen,
        proto: "UDP",
    }))
}

fn bind_error(addr: SocketAddr, proto: &'static str, source: io::Error) -> DnsError {
    if source.kind() == io::ErrorKind::AddrInUse {
        DnsError::AddrInUse { addr, proto }
    } else {
        DnsError::Bind {
            addr,
            proto,
            source,
        }
    }
}

/// The TCP listener. No SO_REUSEPORT here: the listener is what makes a
/// second server on the same port fail loudly, instead of silently
/// splitting the UDP traffic with it.
fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, DnsError> {
    let err = |e| bind_error(addr, "TCP", e);
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(TCP_BACKLOG).map_err(err)?;
    Ok(socket.into())
}

/// `count` UDP sockets on `addr` sharing it with SO_REUSEPORT: the kernel
/// spreads datagrams over them by flow hash, and each has its own receive
/// thread, so several cores receive at once.
fn bind_udp_group(addr: SocketAddr, count: usize) -> Result<Vec<std::net::UdpSocket>, DnsError> {
    (0..count.max(1))
        .map(|_| bind_udp(addr, count > 1))
        .collect()
}

fn bind_udp(addr: SocketAddr, reuse_port: bool) -> Result<std::net::UdpSocket, DnsError> {
    let err = |e| bind_error(addr, "UDP", e);
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if let Err(e) = socket.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::RecordType;
    use signpost_control_plane::store::Keys;
    use std::net::IpAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Asks `server` for `name` A from a socket bound to `from`, over UDP
    /// (the fast path) or TCP (hickory's), and returns the reply.
    async fn ask(server: SocketAddr, from: IpAddr, name: &str, tcp: bool) -> Message {
        let mut msg = Message::new(7, MessageType::Query, OpCode::Query);
        msg.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = msg.to_vec().unwrap();
        let reply = async {
            if tcp {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(from, 0)).unwrap();
                let mut stream = socket.connect(server).await.unwrap();
                let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
                stream
                    .write_all(&[&len[..], &bytes].concat())
                    .await
                    .unwrap();
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.unwrap();
                let mut buf = vec![0; usize::from(u16::from_be_bytes(len))];
                stream.read_exact(&mut buf).await.unwrap();
                buf
            } else {
                let socket = tokio::net::UdpSocket::bind(SocketAddr::new(from, 0))
                    .await
                    .unwrap();
                socket.send_to(&bytes, server).await.unwrap();
                let mut buf = vec![0; 4096];
                let n = socket.recv(&mut buf).await.unwrap();
                buf.truncate(n);
                buf
            }
        };
        let reply = tokio::time::timeout(Duration::from_secs(3), reply)
            .await
            .expect("no DNS reply within 3 s");
        Message::from_vec(&reply).unwrap()
    }

    fn test_server(catalog: Arc<Catalog>, allow_query: Option<Vec<ipnet::IpNet>>) -> DnsServer {
        let config = DnsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            udp_sockets: 1,
            allow_query,
            ..DnsConfig::default()
        };
        DnsServer::new(config, catalog).unwrap()
    }

    fn loaded(catalog: &Catalog) {
        let mut c = crate::testing::Fill::default();
        c.put(&crate::testing::instance("user", "u1", "10.0.0.1", 80));
        catalog.publish(&mut c.state);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_never_synced_answers_servfail_for_the_zone() {
        let catalog = Catalog::new(Keys::default());
        let server = test_server(catalog.clone(), None);
        let addr = server.local_addr();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.run(cancel.clone()));
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        for tcp in [false, true] {
            for name in [
                "user.xingren.host.",
                "nothing.xingren.host.",
                "xingren.host.",
            ] {
                let reply = ask(addr, me, name, tcp).await;
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::ServFail,
                    "{name} tcp={tcp}"
                );
                assert!(reply.answers.is_empty());
            }
            // Outside the zone (no upstream here): as before, REFUSED.
            let reply = ask(addr, me, "example.com.", tcp).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        }
        loaded(&catalog);
        // The index is rebuilt off the receive loops: poll, with a deadline.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut answered = false;
        while !answered && tokio::time::Instant::now() < deadline {
            answered = true;
            for tcp in [false, true] {
                let reply = ask(addr, me, "user.xingren.host.", tcp).await;
                answered &= reply.metadata.response_code == ResponseCode::NoError
                    && reply.answers.len() == 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "no answer after the first snapshot");
        for tcp in [false, true] {
            let reply = ask(addr, me, "nothing.xingren.host.", tcp).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        }
        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_outside_allow_query_are_refused() {
        let catalog = Catalog::new(Keys::default());
        loaded(&catalog);
        let only = vec!["127.0.0.2/32".parse().unwrap()];
        let server = test_server(catalog, Some(only));
        let addr = server.local_addr();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(server.run(cancel.clone()));
        let outsider: IpAddr = "127.0.0.1".parse().unwrap();
        let allowed: IpAddr = "127.0.0.2".parse().unwrap();
        for tcp in [false, true] {
            for name in ["user.xingren.host.", "xingren.host.", "example.com."] {
                let reply = ask(addr, outsider, name, tcp).await;
                assert_eq!(
                    reply.metadata.response_code,
                    ResponseCode::Refused,
                    "{name} tcp={tcp}"
                );
                assert!(reply.answers.is_empty());
            }
            let reply = ask(addr, allowed, "user.xingren.host.", tcp).await;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NoError,
                "tcp={tcp}"
            );
            assert_eq!(reply.answers.len(), 1, "tcp={tcp}");
        }
        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn zones_are_lower_case_fqdns() {
        assert_eq!(
            parse_zone("XingRen.Host").unwrap().to_ascii(),
            "xingren.host."
        );
        assert_eq!(
            parse_zone("xingren.host.").unwrap().to_ascii(),
            "xingren.host."
        );
        assert!(matches!(parse_zone("."), Err(DnsError::InvalidZone { .. })));
        assert!(matches!(
            parse_zone("a..b"),
            Err(DnsError::InvalidZone { .. })
        ));
    }

    #[test]
    fn own_address_is_never_an_upstream() {
        let local: SocketAddr = "127.0.0.1:53".parse().unwrap();
        assert!(is_own_address("127.0.0.1:53".parse().unwrap(), local));
        assert!(!is_own_address("127.0.0.1:5353".parse().unwrap(), local));
        assert!(!is_own_address("10.0.0.2:53".parse().unwrap(), local));
        let any: SocketAddr = "0.0.0.0:53".parse().unwrap();
        assert!(is_own_address("127.0.0.53:53".parse().unwrap(), any));
        assert!(!is_own_address("10.0.0.2:53".parse().unwrap(), any));
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let catalog = Catalog::new(Keys::default());
        let config = DnsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_udp_payload: 400,
            ..DnsConfig::default()
        };
        let err = DnsServer::new(config, catalog.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                DnsError::InvalidConfig {
                    setting: "max_udp_payload",
                    ..
                }
            ),
            "{err}"
        );
        let config = DnsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            zone: "bad..zone".into(),
            ..DnsConfig::default()
        };
        let err = DnsServer::new(config, catalog).unwrap_err();
        assert!(err.to_string().contains("bad..zone"), "{err}");
    }
}
