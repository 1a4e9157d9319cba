//! Forwarding names outside the zone to upstream resolvers, so that a host
//! can put this server alone in its resolv.conf.
//!
//! The upstream's answer records and response code are relayed (NXDOMAIN
//! stays NXDOMAIN, with the upstream's SOA); anything else that goes wrong
//! (timeout, refusal, unreachable upstream) becomes SERVFAIL within the
//! forward timeout, so the client hears a failure instead of timing out.
//!
//! At most `--max-forwards` queries wait on upstreams at once: each holds
//! a task and its buffers until the upstream answers or the timeout fires,
//! so without a bound a client allowed to recurse could grow the process
//! by asking for names a dead upstream never answers. Past the bound the
//! client gets SERVFAIL at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::Record;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use hickory_server::net::{DnsError as ProtoDnsError, NetError};
use tokio::sync::Semaphore;

use crate::error::DnsError;
use crate::metrics::ForwardResult;

/// What an upstream said.
#[derive(Debug)]
pub(crate) struct Forwarded {
    /// Response code to relay.
    pub(crate) rcode: ResponseCode,
    /// Answer records.
    pub(crate) answers: Vec<Record>,
    /// Authority records (the SOA of a negative answer).
    pub(crate) authorities: Vec<Record>,
    /// How it went, for the metrics.
    pub(crate) result: ForwardResult,
}

impl Forwarded {
    fn failed(result: ForwardResult) -> Self {
        Self {
            rcode: ResponseCode::ServFail,
            answers: Vec::new(),
            authorities: Vec::new(),
            result,
        }
    }
}

/// A resolver over the configured upstreams.
pub(crate) struct Forwarder {
    resolver: TokioResolver,
    timeout: Duration,
    /// One permit per query that may wait upstream.
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("timeout", &self.timeout)
            .field("free", &self.in_flight.available_permits())
            .finish()
    }
}

impl Forwarder {
    /// A forwarder to `upstreams`, each tried over UDP then TCP, with at
    /// most `max_in_flight` queries waiting at once.
    pub(crate) fn new(
        upstreams: &[SocketAddr],
        timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, DnsError> {
        let servers = upstreams
            .iter()
            .map(|addr| {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut ns.connections {
                    conn.port = addr.port();
                }
                ns
            })
            .collect();
        // No search domains: a forwarded name is always fully qualified.
        let config = ResolverConfig::from_parts(None, Vec::new(), servers);
        let mut builder = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
        let opts: &mut ResolverOpts = builder.options_mut();
        // Each attempt gets the whole budget; the outer timeout in
        // `forward` is what bounds the client's wait.
        opts.timeout = timeout;
        opts.attempts = 1;
        // The client asked about DNS, not about this host's /etc/hosts.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.edns0 = true;
        let resolver = builder.build().map_err(DnsError::Resolver)?;
        Ok(Self {
            resolver,
            timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight.min(Semaphore::MAX_PERMITS))),
        })
    }

    /// Resolves `query` upstream within the forward timeout, or fails at
    /// once when the bound of queries in flight is reached.
    pub(crate) async fn forward(&self, query: &Query) -> Forwarded {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Forwarded::failed(ForwardResult::Overloaded);
        };
        let mut name = query.name().clone();
        name.set_fqdn(true);
        let lookup =
            tokio::time::timeout(self.timeout, self.resolver.lookup(name, query.query_type()));
        match lookup.await {
            Err(_) => Forwarded::failed(ForwardResult::Timeout),
            Ok(Ok(lookup)) => Forwarded {
                rcode: ResponseCode::NoError,
                answers: lookup.answers().to_vec(),
                authorities: Vec::new(),
                result: ForwardResult::Answered,
            },
            Ok(Err(err)) => relay_error(err),
        }
    }
}

/// Turns a resolver error into what the client should hear.
fn relay_error(err: NetError) -> Forwarded {
    match err {
        // NXDOMAIN, or NODATA: a real answer, relayed with its SOA.
        NetError::Dns(ProtoDnsError::NoRecordsFound(no)) => Forwarded {
            rcode: no.response_code,
            answers: Vec::new(),
            authorities: no
                .soa
                .map(|soa| vec![(*soa).into_record_of_rdata()])
                .unwrap_or_default(),
            result: ForwardResult::Answered,
        },
        NetError::Timeout => Forwarded::failed(ForwardResult::Timeout),
        // An upstream that refuses us is our failure, not the client's
        // refusal: REFUSED would tell the client *we* will not serve it.
        other => {
            tracing::debug!(error = %other, "forwarding failed");
            Forwarded::failed(ForwardResult::Failed)
        }
    }
}
