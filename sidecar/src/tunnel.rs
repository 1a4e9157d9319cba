//! Opaque TCP tunnels: `--upstream db=127.0.0.1:15432` opens a local port
//! whose connections are carried to service `db` over mesh TLS.
//!
//! The bytes are not parsed (databases, caches, anything over TCP). The
//! tunnel negotiates the [`crate::tls::ALPN_TCP`] protocol so the peer's
//! inbound side pipes the bytes to its app instead of reading HTTP.
//!
//! A tunnel takes the outbound path of HTTP requests, balanced per
//! connection rather than per request: a service's tunnel belongs to its
//! [`crate::outbound::Destination`], whose discovery it follows, and each
//! connection is given an endpoint by tower's P2C balancer over the same
//! peak-EWMA load (here, of connecting), weights and outlier ejection
//! ([`crate::outbound::balance`], [`crate::outbound::eject`]). A peer that
//! fails HTTP requests is ejected for tunnels too, and the other way round.
//! A connection that cannot be made is tried on another endpoint. The port
//! is served by the shared accept loop ([`crate::serve::accept_loop`]): on
//! shutdown it stops accepting, lets open tunnels run for the drain time,
//! then cuts them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use signpost_control_plane::model::ServiceName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::{Service, ServiceExt};
use tracing::{Instrument, debug, info_span, warn};

use crate::body::BoxError;
use crate::discovery::{DiscoveryState, Endpoint, LastKnown, Refresh};
use crate::outbound::Destinations;
use crate::outbound::balance::{DiscoverStream, balance_changes};
use crate::outbound::eject::EjectionPool;
use crate::outbound::endpoint::{BoxFuture, BoxedIo, Connect};
use crate::outbound::shared::Shared;

/// Endpoints tried per connection before giving up on it.
const ATTEMPTS: usize = 3;

/// One endpoint of a tunnel: a new connection to it per tunnelled one.
#[derive(Clone)]
pub struct TunnelEndpoint {
    addr: SocketAddr,
    connector: Arc<dyn Connect>,
    connect_timeout: Duration,
    refresh: Refresh,
}

impl std::fmt::Debug for TunnelEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelEndpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Service<()> for TunnelEndpoint {
    type Response = BoxedIo;
    type Error = BoxError;
    type Future = BoxFuture<Result<BoxedIo, BoxError>>;

    /// Always ready: readiness belongs to ejection and the balancer.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = this.connector.connect(this.addr);
            let failed: BoxError = match tokio::time::timeout(this.connect_timeout, connect).await {
                Ok(Ok(io)) => return Ok(io),
                Ok(Err(err)) => err.into(),
                Err(_) => format!(
                    "no connection to {} within {:?}",
                    this.addr, this.connect_timeout
                )
                .into(),
            };
            // As for HTTP: a peer that is not listening has likely left,
            // and DNS may know already.
            this.refresh.request();
            Err(failed)
        })
    }
}

/// The balancer of a tunnel.
type TunnelBalance = Balance<DiscoverStream<TunnelEndpoint>, ()>;

/// The tunnel to one service; see the module.
pub struct Tunnel {
    service: ServiceName,
    state: watch::Receiver<DiscoveryState>,
    balance: Shared<TunnelBalance>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("service", &self.service)
            .finish()
    }
}

impl Tunnel {
    /// The tunnel to `service`, whose discovery publishes `state` and keeps
    /// `known` current; `pool` is the service's ejection state and
    /// `refresh` asks its discovery to resolve again. Connections are made
    /// by `connector` (mesh TLS with the tunnel ALPN).
    pub fn new(
        service: ServiceName,
        state: watch::Receiver<DiscoveryState>,
        known: LastKnown,
        pool: Arc<EjectionPool>,
        refresh: Refresh,
        connector: Arc<dyn Connect>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let mut changes = endpoint_changes(state.clone(), known);
        let balance = balance_changes(
            move |cx| changes.poll_next_unpin(cx),
            pool,
            move |endpoint: Endpoint| {
                let svc = TunnelEndpoint {
                    addr: endpoint.addr,
                    connector: connector.clone(),
                    connect_timeout,
                    refresh: refresh.clone(),
                };
                (endpoint, svc)
            },
        );
        Arc::new(Self {
            service,
            state,
            balance: Shared::new(balance),
            connect_timeout,
        })
    }

    /// How many endpoints the service has, once its first resolution came.
    async fn endpoints(&self) -> usize {
        let mut state = self.state.clone();
        match state.wait_for(|s| s.resolved).await {
            Ok(s) => s.endpoints,
            Err(_) => self.state.borrow().endpoints,
        }
    }

    /// Carries one local connection (a TCP connection to the tunnel port,
    /// or the bytes of a `CONNECT` to a mesh name) to an endpoint.
    pub async fn carry<I>(self: &Arc<Self>, mut local: I)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let endpoints = self.endpoints().await;
        if endpoints == 0 {
            warn!("no healthy instance; closing the connection");
            let _ = local.shutdown().await;
            return;
        }
        for _ in 0..ATTEMPTS.min(endpoints) {
            // The wait for a ready endpoint and the connect: each is
            // bounded by the connect timeout.
            let connect = self.balance.clone().oneshot(());
            let mut remote = match tokio::time::timeout(self.connect_timeout * 2, connect).await {
                Ok(Ok(io)) => io,
                Ok(Err(err)) => {
                    // The failure penalty steers the next pick elsewhere.
                    warn!(%err, "tunnel connect failed; trying another endpoint");
                    continue;
                }
                Err(_) => {
                    warn!("no endpoint ready for the tunnel in time");
                    continue;
                }
            };
            match tokio::io::copy_bidirectional(&mut local, &mut remote).await {
                Ok((up, down)) => debug!(up, down, "tunnel closed"),
                Err(err) => debug!(%err, "tunnel ended with an error"),
            }
            return;
        }
        warn!("no endpoint accepted the tunnel; closing the connection");
    }
}

/// The endpoint changes of a destination's discovery, as a tunnel's
/// balancer takes them: the endpoints in `known` when the tunnel is made,
/// then the differences each time `state` says discovery answered. Ends
/// with discovery.
fn endpoint_changes(
    state: watch::Receiver<DiscoveryState>,
    known: LastKnown,
) -> futures::stream::BoxStream<'static, Change<SocketAddr, Endpoint>> {
    let current: HashMap<SocketAddr, Endpoint> = HashMap::new();
    futures::stream::unfold(
        (state, known, current),
        |(mut state, known, mut current)| async move {
            loop {
                // Marked seen before `known` is read: discovery updates
                // `known` first, so an answer after this read wakes us.
                state.borrow_and_update();
                let next: HashMap<SocketAddr, Endpoint> =
                    known.get().into_iter().map(|e| (e.addr, e)).collect();
                let mut changes: Vec<_> = current
                    .keys()
                    .filter(|addr| !next.contains_key(addr))
                    .map(|addr| Change::Remove(*addr))
                    .collect();
                changes.extend(
                    next.iter()
                        .filter(|(addr, ep)| current.get(addr) != Some(ep))
                        .map(|(addr, ep)| Change::Insert(*addr, *ep)),
                );
                current = next;
                if !changes.is_empty() {
                    return Some((futures::stream::iter(changes), (state, known, current)));
                }
                state.changed().await.ok()?;
            }
        },
    )
    .flatten()
    .boxed()
}

/// Serves an `--upstream` port: each connection accepted on `listener` is
/// carried to `service` until `stop`; then open tunnels get `drain` to
/// finish before they are cut.
pub async fn serve(
    destinations: Arc<Destinations>,
    service: ServiceName,
    listener: TcpListener,
    stop: CancellationToken,
    drain: Duration,
) {
    crate::serve::accept_loop(
        "upstream",
        listener,
        stop,
        drain,
        move |stream, peer, closing| {
            // Looked up per connection: an unused destination is reaped,
            // and made again (from its last answer) by the next one.
            let tunnel = destinations.tunnel(&service);
            let span = info_span!("tunnel", service = %service, client = %peer);
            async move {
                tokio::select! {
                    () = tunnel.carry(stream) => {}
                    () = async {
                        closing.requested().await;
                        tokio::time::sleep(drain).await;
                    } => debug!("tunnel cut at the end of the drain"),
                }
            }
            .instrument(span)
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::discovery::StaticResolver;
    use crate::metrics::Metrics;
    use crate::outbound::endpoint::{ConnectError, PeerProtocol};
    use crate::outbound::{DestinationConfig, MakeConnect};

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 15006))
    }

    /// Tunnel connections in memory: to `alive`, an echo server; to any
    /// other address, "connection refused". Counts the attempts at each.
    #[derive(Default)]
    struct Peers {
        alive: Option<SocketAddr>,
        tries: std::sync::Mutex<HashMap<SocketAddr, usize>>,
        echoed: AtomicUsize,
    }

    impl Peers {
        fn tries(&self, at: SocketAddr) -> usize {
            self.tries
                .lock()
                .unwrap()
                .get(&at)
                .copied()
                .unwrap_or_default()
        }
    }

    struct Connector(Arc<Peers>);

    impl Connect for Connector {
        fn connect(&self, to: SocketAddr) -> BoxFuture<Result<BoxedIo, ConnectError>> {
            let peers = self.0.clone();
            Box::pin(async move {
                *peers.tries.lock().unwrap().entry(to).or_default() += 1;
                if peers.alive != Some(to) {
                    return Err(ConnectError::Tcp {
                        addr: to,
                        source: std::io::ErrorKind::ConnectionRefused.into(),
                    });
                }
                let (near, mut far): (DuplexStream, DuplexStream) = tokio::io::duplex(1024);
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = far.read(&mut buf).await {
                        if n == 0 || far.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        peers.echoed.fetch_add(n, Ordering::Relaxed);
                    }
                });
                Ok(Box::new(near) as BoxedIo)
            })
        }
    }

    /// Destinations whose service `db` has the endpoints `addrs`, reached
    /// through `peers`.
    fn destinations(peers: &Arc<Peers>, addrs: &[SocketAddr]) -> (Arc<Destinations>, ServiceName) {
        let db = ServiceName::new("db").unwrap();
        let resolver = StaticResolver::new(Duration::from_secs(5));
        resolver.set(&db, addrs);
        let peers = peers.clone();
        // Only tunnels connect in these tests: the HTTP connectors are made,
        // never used.
        let make: MakeConnect = Arc::new(move |_: &ServiceName, _: PeerProtocol| {
            Arc::new(Connector(peers.clone())) as Arc<dyn Connect>
        });
        let destinations = Destinations::new(
            Arc::new(resolver),
            make,
            DestinationConfig::default(),
            Metrics::new(),
        );
        (destinations, db)
    }

    /// Sends `ping` through a new tunnel and reads it back.
    async fn echo_through(tunnel: Arc<Tunnel>) {
        let (mut app, local) = tokio::io::duplex(1024);
        let carried = tokio::spawn(async move { tunnel.carry(local).await });
        app.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut back))
            .await
            .expect("no echo through the tunnel")
            .expect("the tunnel closed without an echo");
        assert_eq!(&back, b"ping");
        drop(app);
        carried.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_avoids_a_dead_peer_and_ejects_it() {
        let (dead, alive) = (addr(1), addr(2));
        let peers = Arc::new(Peers {
            alive: Some(alive),
            ..Peers::default()
        });
        let (destinations, db) = destinations(&peers, &[dead, alive]);
        for _ in 0..40 {
            echo_through(destinations.tunnel(&db)).await;
            // Past the failure penalty each time: only ejection keeps the
            // dead peer out from here.
            tokio::time::advance(Duration::from_millis(300)).await;
        }
        // A random pick tries the dead peer for about half the tunnels.
        let to_dead = peers.tries(dead);
        assert!(
            (1..=5).contains(&to_dead),
            "the dead peer was tried {to_dead} times in 40 tunnels"
        );
        assert_eq!(peers.tries(alive), 40);
        assert_eq!(peers.echoed.load(Ordering::Relaxed), 40 * 4);
    }

    /// Sends `ping` through an open tunnel and reads it back.
    async fn ping(stream: &mut tokio::net::TcpStream) {
        stream.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("no echo through the tunnel")
            .expect("the tunnel closed without an echo");
        assert_eq!(&back, b"ping");
    }

    /// An upstream port to one live peer, served until the token is
    /// cancelled and then drained for `drain`; and one tunnel open on it.
    async fn one_open_tunnel(
        drain: Duration,
    ) -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        tokio::net::TcpStream,
    ) {
        let alive = addr(2);
        let peers = Arc::new(Peers {
            alive: Some(alive),
            ..Peers::default()
        });
        let (destinations, db) = destinations(&peers, &[alive]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve(destinations, db, listener, stop.clone(), drain));
        let mut open = tokio::net::TcpStream::connect(port).await.unwrap();
        ping(&mut open).await;
        (port, stop, served, open)
    }

    #[tokio::test]
    async fn an_upstream_port_drains_its_tunnels_on_shutdown() {
        let drain = Duration::from_millis(800);
        let (port, stop, served, mut open) = one_open_tunnel(drain).await;

        let stopped = std::time::Instant::now();
        stop.cancel();
        tokio::time::sleep(drain / 4).await;
        assert!(
            !served.is_finished(),
            "the port stopped without waiting for its open tunnel"
        );
        // Still carried while draining; no new tunnel is taken.
        ping(&mut open).await;
        assert!(tokio::net::TcpStream::connect(port).await.is_err());

        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the drain did not end")
            .unwrap();
        assert!(stopped.elapsed() >= drain);
        // Cut at the end of the drain.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), open.read_to_end(&mut rest))
            .await
            .expect("the tunnel was left open after the drain");
        assert!(read.is_err() || rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn a_tunnel_closed_during_the_drain_ends_it_early() {
        let (_, stop, served, open) = one_open_tunnel(Duration::from_secs(10)).await;
        stop.cancel();
        drop(open);
        tokio::time::timeout(Duration::from_secs(3), served)
            .await
            .expect("the drain waited for a tunnel that had closed")
            .unwrap();
    }
}
