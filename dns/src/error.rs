//! Why the DNS server could not start or stopped.

use std::io;
use std::net::SocketAddr;

use hickory_server::net::NetError;

/// An error of the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The zone is not a domain name.
    #[error("zone {zone:?} is not a valid domain name: {reason}")]
    InvalidZone {
        /// The zone as configured.
        zone: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid DNS setting `{setting}`: {reason}")]
    InvalidConfig {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The address is already taken by another process.
    #[error(
        "cannot serve DNS on {addr} ({proto}): the address is already in use \
         (is another DNS server running there? choose another address)"
    )]
    AddrInUse {
        /// The address.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        proto: &'static str,
    },
    /// Binding a socket failed for another reason (permissions: ports
    /// below 1024 need root or CAP_NET_BIND_SERVICE).
    #[error("cannot bind DNS {proto} socket on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// "UDP" or "TCP".
        proto: &'static str,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The socket to an upstream resolver could not be opened.
    #[error("cannot set up forwarding to the upstream resolver {addr}: {source}")]
    Upstream {
        /// The upstream.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// A listener stopped unexpectedly.
    #[error("DNS server stopped: {0}")]
    Serve(#[source] NetError),
    /// A UDP receive loop ended while the server was running.
    #[error("DNS server stopped: a UDP receive loop ended unexpectedly (see the log)")]
    UdpStopped,
}
