//! Hostile traffic against a running server: random and mutated datagrams,
//! garbage and stalled TCP connections. Afterwards the server must still
//! answer a valid query over UDP and TCP.

mod common;

use std::time::Duration;

use common::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

async fn still_answers(addr: std::net::SocketAddr) {
    let (udp, _) = udp_exchange(
        addr,
        &query_message("user.xingren.host.", RecordType::A, None, false),
    )
    .await;
    assert_eq!(udp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(udp.answers.len(), 2);
    let tcp = tcp_exchange(
        addr,
        &query_message("user.xingren.host.", RecordType::SRV, None, false),
    )
    .await;
    assert_eq!(tcp.answers.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_stop_the_server() {
    let server = start(test_config(), &standard_fill()).await;
    let seed = query_message("user.xingren.host.", RecordType::SRV, Some(1232), true)
        .to_vec()
        .unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = SmallRng::seed_from_u64(0xD15EA5E);
    let mut buf = [0u8; 2048];
    for i in 0..3000 {
        let packet: Vec<u8> = if i % 3 == 0 {
            (0..rng.random_range(0..512))
                .map(|_| rng.random())
                .collect()
        } else {
            let mut p = seed.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
            }
            p.truncate(rng.random_range(0..=p.len()));
            p
        };
        socket.send_to(&packet, server.addr).await.unwrap();
        // Drain replies as they come so the socket buffer never fills.
        while let Ok((_, _)) = socket.try_recv_from(&mut buf) {}
        if i % 200 == 0 {
            tokio::task::yield_now().await;
        }
    }
    still_answers(server.addr).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_stalled_tcp_do_not_block_others() {
    let server = start(test_config(), &standard_fill()).await;
    let mut rng = SmallRng::seed_from_u64(0xBAD7C9);

    // A connection that promises 65535 bytes and sends three, then stalls.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(&[0xFF, 0xFF, 1, 2, 3]).await.unwrap();
    // A connection that opens and says nothing.
    let _silent = TcpStream::connect(server.addr).await.unwrap();

    // Connections that send random frames, then close.
    for _ in 0..30 {
        let mut conn = TcpStream::connect(server.addr).await.unwrap();
        let body: Vec<u8> = (0..rng.random_range(0..300))
            .map(|_| rng.random())
            .collect();
        let mut framed = (body.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        // A zero-length frame, too.
        framed.extend_from_slice(&[0, 0]);
        // The server may close first: a write error is fine here.
        let _ = conn.write_all(&framed).await;
    }

    still_answers(server.addr).await;
    drop(stalled);
    server.stop().await;
}

#[tokio::test]
async fn idle_tcp_connections_are_closed() {
    let config = signpost_dns::DnsConfig {
        tcp_idle_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let server = start(config, &standard_fill()).await;
    let mut conn = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed =
        tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read(&mut conn, &mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    server.stop().await;
}
