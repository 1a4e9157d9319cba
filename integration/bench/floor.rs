//! The floor under the sidecar benchmark: the same two hops as sidecars A
//! and B, on the same libraries (tokio's current-thread runtime, hyper 1's
//! HTTP/1, the `h2` crate, rustls with ring, TLS 1.3 with client
//! certificates), and nothing else — no discovery, balancing, retries,
//! limits, timeouts, ejection, metrics or allow-list. What it costs per
//! request is what those libraries cost; what a sidecar costs above it is
//! Signpost's. `integration/bench/sidecar.sh` runs it as the `floor` path.
//!
//! ```text
//! signpost-bench-floor outbound LISTEN PEER CA CERT KEY   # plain HTTP/1.1 in, mTLS HTTP/2 out
//! signpost-bench-floor inbound  LISTEN APP  CA CERT KEY   # mTLS HTTP/2 in, HTTP/1.1 out
//! ```
//!
//! The outbound sends every request to PEER over one HTTP/2 connection and
//! checks PEER's certificate for the name `b`, as the benchmark's HAProxy
//! certificates have it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::header::{CONNECTION, HOST};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, next, ca, cert, key] = args.as_slice() else {
        bail!("usage: signpost-bench-floor outbound|inbound LISTEN NEXT CA CERT KEY");
    };
    let listen: SocketAddr = listen.parse().context("LISTEN")?;
    let next: SocketAddr = next.parse().context("NEXT")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c)?;
    }
    let tls = Credentials {
        roots: Arc::new(roots),
        certs: certs(cert)?,
        key: private_key(key)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match mode.as_str() {
        "outbound" => runtime.block_on(outbound(listen, next, tls)),
        "inbound" => runtime.block_on(inbound(listen, next, tls)),
        other => bail!("unknown mode {other:?}: outbound or inbound"),
    }
}

/// The CA to trust, and this side's certificate chain and key.
struct Credentials {
    roots: Arc<rustls::RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn certs(path: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<_, _>>()
        .with_context(|| format!("read {path}"))
}

fn private_key(path: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .with_context(|| format!("read {path}"))?
        .with_context(|| format!("no private key in {path}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTP/2 response body as an `http_body::Body`, giving the window back
/// as data is read. The sidecar has its own (`sidecar/src/transport/http2.rs`);
/// this one is repeated so that the floor holds no Signpost code.
struct RecvBody(h2::RecvStream);

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        Poll::Ready(match ready!(self.0.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = self.0.flow_control().release_capacity(data.len());
                Some(Ok(Frame::data(data)))
            }
            Some(Err(err)) => Some(Err(err)),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

type OutboundBody = Either<RecvBody, Full<Bytes>>;

fn error(status: StatusCode, why: impl std::fmt::Display) -> Response<OutboundBody> {
    let mut rsp = Response::new(Either::Right(Full::new(Bytes::from(format!("{why}\n")))));
    *rsp.status_mut() = status;
    rsp
}

async fn outbound(listen: SocketAddr, peer: SocketAddr, tls: Credentials) -> anyhow::Result<()> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(tls.roots)
        .with_client_auth_cert(tls.certs, tls.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(peer)
        .await
        .with_context(|| format!("connect {peer}"))?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("b")?, tcp)
        .await
        .context("TLS handshake")?;
    let (send, connection) = h2::client::handshake(tls)
        .await
        .context("HTTP/2 handshake")?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("peer connection: {err}");
        }
    });
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let send = send.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let send = send.clone();
            async move { Ok::<_, Infallible>(forward(send, req).await.unwrap_or_else(|rsp| rsp)) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request out over HTTP/2: origin-form with `Host` becomes
/// `https://<host><path>`. Bodies are not sent (the benchmark sends GETs).
async fn forward(
    send: h2::client::SendRequest<Bytes>,
    req: Request<Incoming>,
) -> Result<Response<OutboundBody>, Response<OutboundBody>> {
    let (mut parts, _body) = req.into_parts();
    let host = parts
        .headers
        .remove(HOST)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "no Host"))?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme("https")
        .authority(host.as_bytes())
        .path_and_query(path)
        .build()
        .map_err(|err| error(StatusCode::BAD_REQUEST, err))?;
    let bad_gateway = |err: h2::Error| error(StatusCode::BAD_GATEWAY, err);
    let mut send = send.ready().await.map_err(bad_gateway)?;
    let (rsp, _) = send
        .send_request(Request::from_parts(parts, ()), true)
        .map_err(bad_gateway)?;
    let rsp = rsp.await.map_err(bad_gateway)?;
    Ok(rsp.map(|body| Either::Left(RecvBody(body))))
}

/// Idle HTTP/1.1 connections to the app.
type Pool = Arc<Mutex<Vec<http1::SendRequest<Empty<Bytes>>>>>;

async fn inbound(listen: SocketAddr, app: SocketAddr, tls: Credentials) -> anyhow::Result<()> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(tls.roots, provider())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.certs, tls.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let pool = Pool::default();
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (acceptor, pool) = (acceptor.clone(), pool.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let Ok(mut connection) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((req, respond))) = connection.accept().await {
                tokio::spawn(answer(app, pool.clone(), req, respond));
            }
        });
    }
}

/// One stream: to the app as HTTP/1.1 on an idle connection (or a new
/// one), the response back on the stream.
async fn answer(
    app: SocketAddr,
    pool: Pool,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let result: anyhow::Result<()> = async {
        let (mut parts, _body) = req.into_parts();
        let host = parts
            .uri
            .authority()
            .context("no :authority")?
            .as_str()
            .parse()?;
        parts.headers.insert(HOST, host);
        parts.uri = Uri::from(parts.uri.path_and_query().context("no :path")?.clone());
        let idle = pool
            .lock()
            .map_err(|_| anyhow::anyhow!("pool poisoned"))?
            .pop();
        let mut sender = match idle {
            Some(sender) => sender,
            None => {
                let tcp = TcpStream::connect(app).await?;
                tcp.set_nodelay(true)?;
                let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(connection);
                sender
            }
        };
        let rsp = sender
            .send_request(Request::from_parts(parts, Empty::new()))
            .await?;
        pool.lock()
            .map_err(|_| anyhow::anyhow!("pool poisoned"))?
            .push(sender);
        let (mut parts, mut body) = rsp.into_parts();
        // Connection-specific headers are not allowed in HTTP/2.
        parts.headers.remove(CONNECTION);
        parts.headers.remove("keep-alive");
        let end = body.is_end_stream();
        let mut send = respond.send_response(Response::from_parts(parts, ()), end)?;
        if end {
            return Ok(());
        }
        // One frame behind, so the last one carries END_STREAM.
        let mut last: Option<Bytes> = None;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data()
                && let Some(previous) = last.replace(data)
            {
                send.send_data(previous, false)?;
            }
        }
        send.send_data(last.unwrap_or_default(), true)?;
        Ok(())
    }
    .await;
    if let Err(err) = result {
        eprintln!("stream: {err:#}");
    }
}
