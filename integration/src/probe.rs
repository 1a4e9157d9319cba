//! A bare DNS probe for the benchmark tools: a hand-built A query and a check
//! that an answer holds an address. The tools poll with it in tight loops, so
//! it stays a byte buffer and a socket, with no resolver in between.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// A DNS query for `name` type A, with id `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Whether the A answer in `resp` holds `addr` (a plain byte search for the
/// 4-byte RDATA after an A record header is enough for these tools).
pub fn answer_has(resp: &[u8], addr: Ipv4Addr) -> bool {
    let ancount = resp
        .get(6..8)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    ancount > 0
        && resp
            .windows(6)
            .any(|w| w[..2] == [0, 4] && w[2..] == addr.octets())
}

/// One UDP round trip: `name` A to `server`, whether the answer holds
/// `addr`. An answer later than `wait` is a no.
pub fn resolves_to(
    sock: &UdpSocket,
    server: SocketAddr,
    (id, name): (u16, &str),
    addr: Ipv4Addr,
    wait: Duration,
) -> bool {
    let mut buf = [0u8; 4096];
    if sock.set_read_timeout(Some(wait)).is_err() || sock.send_to(&query(id, name), server).is_err()
    {
        return false;
    }
    matches!(sock.recv(&mut buf), Ok(n) if answer_has(&buf[..n], addr))
}
