//! Real rustls handshakes between the crate's server and client configs
//! over an in-memory duplex pipe: success, each refusal reason, and
//! certificate rotation under live connections.

mod handshake;
mod rotation;

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{
    Ca, CertHolder, ClientAuth, Identity, TrustBundle, WorkloadCert, WorkloadKey, client_config,
    default_alpn, server_config,
};

const ZONE: &str = "xingren.host";
const TTL: Duration = Duration::from_secs(3600);

fn id(service: &str) -> Identity {
    Identity::new(service, ZONE).unwrap()
}

fn holder(ca: &Ca, identity: &Identity) -> Arc<CertHolder> {
    Arc::new(CertHolder::new(ca.issue(identity, TTL).unwrap()))
}

/// A certificate that expired an hour ago, through the test-only signing
/// path (the public API refuses to issue one).
fn expired_holder(ca: &Ca, identity: &Identity) -> Arc<CertHolder> {
    let key = WorkloadKey::generate().unwrap();
    let now = SystemTime::now();
    let issued = ca
        .sign_public_key(
            key.key_pair(),
            identity,
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    Arc::new(CertHolder::new(WorkloadCert::new(&key, &issued).unwrap()))
}

fn server(bundle: &TrustBundle, certs: Arc<CertHolder>, auth: ClientAuth) -> ServerConfig {
    server_config(bundle, ZONE, certs, auth, default_alpn()).unwrap()
}

fn client(bundle: &TrustBundle, expected: Identity, certs: Arc<CertHolder>) -> ClientConfig {
    client_config(bundle, expected, certs, default_alpn()).unwrap()
}

/// Both ends of one handshake attempt.
struct Outcome {
    server: io::Result<server::TlsStream<DuplexStream>>,
    client: io::Result<client::TlsStream<DuplexStream>>,
}

/// Runs a handshake between the two configs over a fresh duplex pipe.
async fn handshake(server: &ServerConfig, client: &ClientConfig, target: &Identity) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(Arc::new(server.clone()));
    let connector = TlsConnector::from(Arc::new(client.clone()));
    let name = target.server_name().unwrap();
    let (server, client) = tokio::join!(
        acceptor.accept(server_io),
        connector.connect(name, client_io)
    );
    Outcome { server, client }
}

/// Sends a message each way; fails if either direction is broken.
async fn ping(
    client: &mut client::TlsStream<DuplexStream>,
    server: &mut server::TlsStream<DuplexStream>,
) -> io::Result<()> {
    client.write_all(b"ping").await?;
    client.flush().await?;
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await?;
    server.flush().await?;
    client.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"pong");
    Ok(())
}

/// The error the client sees when the server refused it: with TLS 1.3 the
/// client's handshake completes first, so the refusal arrives on read.
async fn client_error_after_handshake(
    client: io::Result<client::TlsStream<DuplexStream>>,
) -> io::Error {
    match client {
        Err(err) => err,
        Ok(mut stream) => {
            let mut buf = [0u8; 1];
            stream
                .read(&mut buf)
                .await
                .expect_err("the server should have refused the client")
        }
    }
}

/// The serial number of the peer's leaf certificate.
fn peer_serial(conn: &rustls::CommonState) -> Vec<u8> {
    let leaf = &conn.peer_certificates().unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    cert.raw_serial().to_vec()
}
