//! A gRPC echo service, to test and demo gRPC through the sidecar mesh.
//!
//! The server ([`serve`]) speaks plain HTTP/2 (h2c, prior knowledge), which
//! is what a local app behind a sidecar speaks; the client side
//! ([`channel`], [`echo_client`]) connects to one address — a sidecar's
//! outbound port — while naming another service in `:authority`, which is
//! what the mesh routes by. Every reply says which instance served it
//! ([`EchoReply::instance`]) and what the server saw of the call (the
//! authority, the deadline), and every call carries the trailer
//! [`INSTANCE_TRAILER`], so a test can tell balancing, routing and
//! metadata apart. The RPCs and their knobs are in `proto/echo.proto`.
//!
//! It is not part of Signpost and knows nothing of it: no TLS, no
//! registration, no retries.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use signpost_examples::grpc::{self, EchoRequest};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // Through the local sidecar's outbound port, to the grpc-echo service.
//! let outbound: SocketAddr = "127.0.0.1:15001".parse()?;
//! let mut client = grpc::echo_client(outbound, "grpc-echo.xingren.host").await?;
//! let reply = client
//!     .unary(EchoRequest { message: "hi".into(), ..Default::default() })
//!     .await?;
//! println!("{} answered {}", reply.get_ref().instance, reply.get_ref().message);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, InvalidUri, Uri};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tracing::{info, warn};

use crate::serve::DEFAULT_DRAIN;

pub mod bench;
mod metadata;
mod service;

pub use metadata::{ECHO_HEADER, INSTANCE_TRAILER};
pub use proto::echo_client::EchoClient;
pub use proto::{EchoReply, EchoRequest, StreamRequest};
pub use service::{EchoService, MAX_STREAM_PAYLOAD};

/// The code generated from `proto/echo.proto` (package `signpost.echo.v1`):
/// the messages, `echo_client::EchoClient` and `echo_server::{Echo,
/// EchoServer}`.
pub mod proto {
    tonic::include_proto!("signpost.echo.v1");
}

/// How long a client waits for a TCP connection. The target is normally a
/// sidecar on the same host, which accepts at once or refuses at once; this
/// only bounds a target that drops packets.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong serving or connecting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The instance id cannot be sent as a header value (the `x-instance`
    /// trailer): it holds control characters.
    #[error("instance id {id:?} cannot be sent in the x-instance trailer")]
    InvalidId {
        /// The id.
        id: String,
        /// Why it is not a header value.
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    /// The authority is not a `host[:port]`.
    #[error("invalid authority {authority:?} (want host or host:port)")]
    InvalidAuthority {
        /// The authority as given.
        authority: String,
        /// Why it does not parse.
        #[source]
        source: InvalidUri,
    },
    /// The target address does not make an endpoint URI.
    #[error("invalid target {target}")]
    InvalidTarget {
        /// The target.
        target: SocketAddr,
        /// tonic's complaint.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting to the target failed (refused, timed out, HTTP/2
    /// handshake failed).
    #[error("cannot connect to {target}")]
    Connect {
        /// The target.
        target: SocketAddr,
        /// What failed; its sources hold the OS error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server stopped with an error.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Serves Echo on `listener` as instance `id` until `shutdown` resolves,
/// then drains for up to [`DEFAULT_DRAIN`]; see [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    id: impl Into<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    serve_with(listener, EchoService::new(id), shutdown, DEFAULT_DRAIN).await
}

/// Serves `service` on `listener` over plain HTTP/2 until `shutdown`
/// resolves. Then it stops accepting, sends GOAWAY so clients move to
/// another instance, and waits up to `drain` for calls in flight to finish;
/// calls still open after that end with the runtime (when the binary
/// exits). Keep a clone of `service` to read [`EchoService::calls`].
pub async fn serve_with(
    listener: TcpListener,
    service: EchoService,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), Error> {
    let instance = HeaderValue::from_str(service.id()).map_err(|source| Error::InvalidId {
        id: service.id().to_string(),
        source,
    })?;
    // Replies are a few small writes; without NODELAY, Nagle holds the last
    // one until the client's delayed ACK, ~40 ms per call.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        .layer(metadata::MetadataLayer::new(instance))
        .add_service(proto::echo_server::EchoServer::new(service))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });
    tokio::pin!(server);
    tokio::pin!(shutdown);
    tokio::select! {
        result = &mut server => return result.map_err(Error::Serve),
        () = &mut shutdown => {}
    }
    info!(?drain, "shutting down: no longer accepting; draining");
    let _ = stop.send(());
    match tokio::time::timeout(drain, server).await {
        Ok(result) => result.map_err(Error::Serve)?,
        Err(_) => warn!("drain time over; leaving remaining calls"),
    }
    info!("stopped");
    Ok(())
}

/// An endpoint that connects to `target` but sends `authority` as every
/// call's `:authority`, the name of the service called: how an app calls a
/// service through its sidecar's outbound port. Returned unconnected so a
/// caller can add settings or connect lazily.
pub fn endpoint(target: SocketAddr, authority: &str) -> Result<Endpoint, Error> {
    let invalid = |source| Error::InvalidAuthority {
        authority: authority.to_string(),
        source,
    };
    // Parsed as an authority first: a URI would also take "a/b" or "a?b"
    // and quietly send only the "a".
    let checked: Authority = authority.parse().map_err(invalid)?;
    let origin: Uri = format!("http://{checked}").parse().map_err(invalid)?;
    let endpoint = Endpoint::from_shared(format!("http://{target}"))
        .map_err(|source| Error::InvalidTarget { target, source })?;
    Ok(endpoint
        .origin(origin)
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true))
}

/// A channel connected to `target`, calling `authority`; see [`endpoint`].
/// One channel is one HTTP/2 connection: calls on it (and its clones) are
/// multiplexed, which is what per-call balancing in the mesh is about.
pub async fn channel(target: SocketAddr, authority: &str) -> Result<Channel, Error> {
    endpoint(target, authority)?
        .connect()
        .await
        .map_err(|source| Error::Connect { target, source })
}

/// An Echo client on a new [`channel`] to `target`, calling `authority`.
pub async fn echo_client(
    target: SocketAddr,
    authority: &str,
) -> Result<EchoClient<Channel>, Error> {
    Ok(EchoClient::new(channel(target, authority).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_rejects_an_authority_with_a_path() {
        let target: SocketAddr = "127.0.0.1:15001".parse().expect("addr");
        for bad in ["", "a/b", "a b", "http://a"] {
            assert!(
                matches!(endpoint(target, bad), Err(Error::InvalidAuthority { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(endpoint(target, "grpc-echo.xingren.host").is_ok());
        assert!(endpoint(target, "grpc-echo:9090").is_ok());
    }

    #[test]
    fn endpoint_takes_ipv6_targets() {
        let target: SocketAddr = "[::1]:15001".parse().expect("addr");
        let endpoint = endpoint(target, "grpc-echo").expect("endpoint");
        assert_eq!(endpoint.uri().to_string(), "http://[::1]:15001/");
    }
}
