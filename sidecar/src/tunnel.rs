//! Opaque TCP tunnels: `--upstream db=127.0.0.1:15432` opens a local port
//! whose connections are carried to service `db` over mesh TLS.
//!
//! The bytes are not parsed (databases, caches, anything over TCP). The
//! tunnel negotiates the [`crate::tls::ALPN_TCP`] protocol so the peer's
//! inbound side pipes the bytes to its app instead of reading HTTP. Each
//! connection picks an endpoint at random, by weight (per-connection
//! balancing: connections are long-lived, so request-level P2C does not
//! apply), trying another one when the connection fails.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use signpost_control_plane::model::ServiceName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::discovery::{Endpoint, Resolution, Resolve};
use crate::outbound::endpoint::Connect;

/// Endpoints tried per connection before giving up on it.
const ATTEMPTS: usize = 3;

/// One upstream tunnel listener.
pub struct Tunnel {
    service: ServiceName,
    resolver: Arc<dyn Resolve>,
    connector: Arc<dyn Connect>,
    connect_timeout: Duration,
    cached: Mutex<Option<(Resolution, Instant)>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("service", &self.service)
            .finish()
    }
}

/// Picks an endpoint with probability proportional to its weight, skipping
/// those in `tried` while others remain.
pub fn pick(endpoints: &[Endpoint], tried: &[SocketAddr], rng: &mut impl Rng) -> Option<Endpoint> {
    let fresh: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| !tried.contains(&e.addr))
        .collect();
    let pool: Vec<&Endpoint> = if fresh.is_empty() {
        endpoints.iter().collect()
    } else {
        fresh
    };
    let total: u64 = pool.iter().map(|e| u64::from(e.weight.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut at = rng.random_range(0..total);
    for e in pool {
        let w = u64::from(e.weight.max(1));
        if at < w {
            return Some(*e);
        }
        at -= w;
    }
    None
}

impl Tunnel {
    /// A tunnel to `service`, connecting with `connector` (mesh TLS with the
    /// tunnel ALPN).
    pub fn new(
        service: ServiceName,
        resolver: Arc<dyn Resolve>,
        connector: Arc<dyn Connect>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            service,
            resolver,
            connector,
            connect_timeout,
            cached: Mutex::default(),
        })
    }

    /// The endpoints: the last answer when there is one (resolved again in
    /// the background once its TTL is over, so a connection never waits on
    /// DNS, and DNS being down costs nothing while the answer holds),
    /// otherwise a fresh one.
    async fn endpoints(self: &Arc<Self>) -> Vec<Endpoint> {
        let now = Instant::now();
        let cached = self
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(res, at)| {
                (
                    res.endpoints.clone(),
                    now.saturating_duration_since(*at) >= res.ttl,
                )
            });
        if let Some((endpoints, stale)) = cached
            && !endpoints.is_empty()
        {
            if stale {
                let this = self.clone();
                tokio::spawn(async move { this.resolve(Instant::now()).await });
            }
            return endpoints;
        }
        self.resolve(now).await
    }

    async fn resolve(&self, now: Instant) -> Vec<Endpoint> {
        match self.resolver.resolve(&self.service).await {
            Ok(res) => {
                let endpoints = res.endpoints.clone();
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((res, now));
                endpoints
            }
            Err(err) => {
                warn!(%err, "tunnel: resolution failed; using the last answer");
                self.cached
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|(r, _)| r.endpoints.clone())
                    .unwrap_or_default()
            }
        }
    }

    /// Accepts local connections until `stop`; open tunnels end with their
    /// connections (or when the process exits).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        warn!(%err, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let this = self.clone();
            let span = info_span!("tunnel", service = %self.service, client = %peer);
            tokio::spawn(async move { this.carry(stream).await }.instrument(span));
        }
    }

    /// Carries one local connection (a TCP connection to the tunnel port,
    /// or the bytes of a `CONNECT` to a mesh name) to an endpoint.
    pub async fn carry<I>(self: &Arc<Self>, mut local: I)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let endpoints = self.endpoints().await;
        if endpoints.is_empty() {
            warn!("no healthy instance; closing the connection");
            let _ = local.shutdown().await;
            return;
        }
        let mut tried = Vec::new();
        for _ in 0..ATTEMPTS.min(endpoints.len().max(1)) {
            let Some(ep) = pick(&endpoints, &tried, &mut rand::rng()) else {
                break;
            };
            tried.push(ep.addr);
            let connect =
                tokio::time::timeout(self.connect_timeout, self.connector.connect(ep.addr));
            let mut remote = match connect.await {
                Ok(Ok(io)) => io,
                Ok(Err(err)) => {
                    warn!(%err, "tunnel connect failed; trying another endpoint");
                    continue;
                }
                Err(_) => {
                    warn!(endpoint = %ep.addr, "tunnel connect timed out");
                    continue;
                }
            };
            match tokio::io::copy_bidirectional(&mut local, &mut remote).await {
                Ok((up, down)) => debug!(endpoint = %ep.addr, up, down, "tunnel closed"),
                Err(err) => debug!(endpoint = %ep.addr, %err, "tunnel ended with an error"),
            }
            return;
        }
        warn!("no endpoint accepted the tunnel; closing the connection");
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn pick_follows_weights_and_skips_tried() {
        let a = Endpoint {
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 100,
        };
        let b = Endpoint {
            addr: "127.0.0.2:1".parse().unwrap(),
            weight: 300,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b_count = 0;
        for _ in 0..1000 {
            if pick(&[a, b], &[], &mut rng).unwrap() == b {
                b_count += 1;
            }
        }
        assert!(
            (650..850).contains(&b_count),
            "b picked {b_count} times of 1000"
        );
        for _ in 0..20 {
            assert_eq!(pick(&[a, b], &[b.addr], &mut rng).unwrap(), a);
        }
        assert!(pick(&[], &[], &mut rng).is_none());
    }
}
