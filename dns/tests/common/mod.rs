//! Shared helpers of the DNS integration tests: a catalog filled in memory,
//! a server on an ephemeral loopback port, and small DNS clients.
#![allow(dead_code)] // each test file uses its own subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use signpost_control_plane::catalog::Catalog;
use signpost_control_plane::store::Keys;
use signpost_dns::{DnsConfig, DnsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single network step of a test may take.
pub const STEP: Duration = Duration::from_secs(5);

#[allow(unused_imports)] // each test file uses its own subset
pub use signpost_dns::testing::{Fill, instance, user_and_order as standard_fill};

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub catalog: Arc<Catalog>,
    pub cancel: CancellationToken,
    pub task: JoinHandle<Result<(), signpost_dns::DnsError>>,
}

impl Running {
    /// Stops the server and checks it stopped cleanly, within a bound.
    pub async fn stop(self) {
        self.cancel.cancel();
        let result = tokio::time::timeout(STEP, self.task)
            .await
            .expect("server did not stop within 5 s")
            .expect("server task panicked");
        result.expect("server returned an error");
    }
}

/// A config on an ephemeral loopback port with two UDP sockets.
pub fn test_config() -> DnsConfig {
    DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        udp_sockets: 2,
        ..DnsConfig::default()
    }
}

/// Starts a server over a catalog holding `fill`.
pub async fn start(config: DnsConfig, fill: &Fill) -> Running {
    let catalog = Catalog::new(Keys::default());
    catalog.publish(&mut fill.state.clone());
    let server = DnsServer::new(config, catalog.clone()).expect("server starts");
    let addr = server.local_addr();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.run(cancel.clone()));
    Running {
        addr,
        catalog,
        cancel,
        task,
    }
}

/// A query message.
pub fn query_message(
    name: &str,
    qtype: RecordType,
    edns_payload: Option<u16>,
    rd: bool,
) -> Message {
    let mut msg = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg.metadata.recursion_desired = rd;
    if let Some(payload) = edns_payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        msg.edns = Some(edns);
    }
    msg
}

fn rand_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(4242);
    NEXT.fetch_add(7919, Ordering::Relaxed)
}

/// Sends `bytes` over UDP and returns the raw reply (or `None` on timeout).
pub async fn udp_exchange_raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => {
            buf.truncate(n);
            Some(buf)
        }
        _ => None,
    }
}

/// Sends `msg` over UDP; returns the reply and its size.
pub async fn udp_exchange(addr: SocketAddr, msg: &Message) -> (Message, usize) {
    let bytes = msg.to_vec().unwrap();
    let reply = udp_exchange_raw(addr, &bytes, STEP)
        .await
        .expect("no UDP reply within 5 s");
    let decoded = Message::from_vec(&reply).expect("reply decodes");
    assert_eq!(decoded.metadata.id, msg.metadata.id, "reply id");
    (decoded, reply.len())
}

/// Sends `msg` over TCP (two-byte length framing, RFC 1035 §4.2.2).
pub async fn tcp_exchange(addr: SocketAddr, msg: &Message) -> Message {
    let bytes = msg.to_vec().unwrap();
    let step = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.unwrap();
        reply
    };
    let reply = tokio::time::timeout(STEP, step)
        .await
        .expect("no TCP reply within 5 s");
    let decoded = Message::from_vec(&reply).expect("reply decodes");
    assert_eq!(decoded.metadata.id, msg.metadata.id, "reply id");
    decoded
}

/// Polls `check` every 20 ms until it returns true or 5 s pass.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
