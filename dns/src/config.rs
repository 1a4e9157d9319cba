//! The DNS server's settings and their defaults.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

/// Default listen address: `signpost server --dev` serves DNS here, a
/// port that needs no privileges.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5353";

/// Default zone.
pub const DEFAULT_ZONE: &str = "xingren.host";

/// Default answer TTL, 5 s: short enough that clients drop a dead instance
/// quickly, long enough that a busy client does not re-query on every
/// request.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// Largest UDP payload we answer with, whatever the client offers: 1232
/// bytes fits in one IPv6 packet on any link with a 1280-byte MTU, so
/// answers are never fragmented (DNS Flag Day 2020). Clients that need more
/// records ask over TCP.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1232;

/// How long a forwarded query may take before the client gets SERVFAIL:
/// well under a stub resolver's own timeout (5 s in glibc), so the client
/// hears a clear failure instead of timing out.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an idle TCP connection is kept open.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a [`crate::DnsServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Address for UDP and TCP (port 0 picks a free port, for tests).
    pub listen: SocketAddr,
    /// The zone served, e.g. `xingren.host` (a trailing dot is optional).
    pub zone: String,
    /// TTL of answers.
    pub ttl: Duration,
    /// TTL of negative answers and the SOA minimum; `None` means `ttl`, so
    /// that a name registered just after a miss shows up as fast as a
    /// change to an existing one.
    pub negative_ttl: Option<Duration>,
    /// Resolvers that names outside the zone are forwarded to; empty turns
    /// forwarding off (such queries are REFUSED).
    pub upstreams: Vec<SocketAddr>,
    /// Clients allowed to have names outside the zone resolved.
    pub allow_recursion: Vec<IpNet>,
    /// Number of UDP sockets sharing the port (SO_REUSEPORT), each with its
    /// own receive loop; 0 means one per available core.
    pub udp_sockets: usize,
    /// The server's own address, published as the glue of `ns.<zone>`.
    pub ns_address: Option<IpAddr>,
    /// Cap of the UDP payload size (see [`DEFAULT_MAX_UDP_PAYLOAD`]); at
    /// least 512.
    pub max_udp_payload: u16,
    /// Bound on a forwarded query (see [`DEFAULT_FORWARD_TIMEOUT`]).
    pub forward_timeout: Duration,
    /// Idle timeout of TCP connections.
    pub tcp_idle_timeout: Duration,
    /// Answer at most this many records of a set over UDP, picked by
    /// weight, never with TC (Consul's `a_record_limit`: load spread over a
    /// subset per answer). `None`, the default, answers by the DNS rules: a
    /// set that does not fit is not sent, and TC makes the client ask again
    /// over TCP (RFC 2181 §9).
    pub udp_answer_limit: Option<u16>,
    /// Clients that get answers at all (`--allow-query`); others get
    /// REFUSED. `None`, the default, answers everyone, as an authoritative
    /// server does.
    pub allow_query: Option<Vec<IpNet>>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5353)),
            zone: DEFAULT_ZONE.to_string(),
            ttl: DEFAULT_TTL,
            negative_ttl: None,
            upstreams: Vec::new(),
            allow_recursion: default_allow_recursion(),
            udp_sockets: 0,
            ns_address: None,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            forward_timeout: DEFAULT_FORWARD_TIMEOUT,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            udp_answer_limit: None,
            allow_query: None,
        }
    }
}

/// The networks allowed to recurse by default: loopback and the private
/// ranges (RFC 1918, RFC 4193). An open resolver on the internet would be
/// an amplification tool; hosts inside the fleet are who puts us in their
/// resolv.conf.
pub fn default_allow_recursion() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}

/// The nameservers of the host's `/etc/resolv.conf` (port 53), minus the
/// server's own addresses in `own`, so that it never forwards to itself.
/// An unreadable file gives no upstreams (forwarding off).
pub fn default_upstreams(own: &[IpAddr]) -> Vec<SocketAddr> {
    let text = match std::fs::read_to_string("/etc/resolv.conf") {
        Ok(text) => text,
        Err(err) => {
            tracing::warn!(%err, "cannot read /etc/resolv.conf: no upstream resolvers");
            return Vec::new();
        }
    };
    parse_resolv_conf(&text)
        .into_iter()
        .filter(|ip| !own.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The `nameserver` addresses of a resolv.conf text, in order, without
/// duplicates. IPv6 zone ids (`fe80::1%eth0`) are dropped with the address:
/// a link-local upstream cannot be reached without its interface.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok())
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver  ::1 # local\n\
                    nameserver fe80::1%eth0\nnameserver 10.0.0.2\noptions ndots:2\nnameserver\n";
        let ips = parse_resolv_conf(text);
        assert_eq!(
            ips,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn default_recursion_ranges_are_private() {
        let nets = default_allow_recursion();
        assert_eq!(nets.len(), 6);
        let allowed = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            nets.iter().any(|n| n.contains(&ip))
        };
        assert!(allowed("127.0.0.1"));
        assert!(allowed("::1"));
        assert!(allowed("172.31.255.1"));
        assert!(allowed("fd00::5"));
        assert!(!allowed("8.8.8.8"));
        assert!(!allowed("172.32.0.1"));
        assert!(!allowed("2001:db8::1"));
    }
}
