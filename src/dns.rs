//! DNS flags shared by `signpost server` and `signpost dns`, and the
//! `signpost dns` replica: its own store watch, DNS only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use signpost_control_plane::catalog::Catalog;
use signpost_control_plane::store::{EtcdStore, Keys, Store};
use signpost_dns::{DnsConfig, DnsServer, default_allow_recursion, default_upstreams};
use tokio_util::sync::CancellationToken;

/// DNS flags.
#[derive(Debug, Clone, Args)]
pub struct DnsArgs {
    /// Address for DNS over UDP and TCP.
    #[arg(long = "dns", env = "SIGNPOST_DNS", default_value = "127.0.0.1:5353")]
    pub listen: SocketAddr,

    /// TTL of DNS answers: short enough that clients drop a dead instance
    /// quickly, long enough that a busy client does not re-query every
    /// request.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// Upstream resolvers for names outside the zone, comma-separated
    /// (ip or ip:port). Default: the nameservers of /etc/resolv.conf, minus
    /// this server's own address.
    #[arg(long, value_delimiter = ',')]
    pub upstream: Vec<String>,

    /// Clients allowed to have names outside the zone resolved (CIDRs,
    /// comma-separated). Default: loopback and private ranges.
    #[arg(long, value_delimiter = ',')]
    pub allow_recursion: Vec<String>,

    /// UDP sockets sharing the port (SO_REUSEPORT); 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub udp_sockets: usize,

    /// Over UDP, answer at most N records of a set, picked by weight, and
    /// never set TC: a different subset per answer spreads load (Consul's
    /// `a_record_limit`). Default: by the DNS rules, a set that does not
    /// fit is not sent and TC sends the client to TCP, which gets every
    /// record that fits in 64 KiB.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub udp_answer_limit: Option<u16>,

    /// Clients that get DNS answers at all (CIDRs, comma-separated); others
    /// get REFUSED. Default: everyone.
    #[arg(
        long,
        env = "SIGNPOST_ALLOW_QUERY",
        value_delimiter = ',',
        value_name = "CIDRS"
    )]
    pub allow_query: Vec<String>,
}

/// Parses CIDRs (a bare address is one host) for `flag`.
fn parse_cidrs(flag: &str, raw: &[String]) -> Result<Vec<ipnet::IpNet>> {
    raw.iter()
        .map(|s| {
            s.trim()
                .parse()
                .or_else(|_| s.trim().parse::<IpAddr>().map(ipnet::IpNet::from))
                .with_context(|| format!("{flag} {s:?} is not a CIDR (e.g. 10.0.0.0/8)"))
        })
        .collect()
}

impl DnsArgs {
    /// The DNS server configuration for `zone`.
    pub fn config(&self, zone: &str) -> Result<DnsConfig> {
        let own: Vec<IpAddr> = vec![self.listen.ip()];
        let upstreams = if self.upstream.is_empty() {
            default_upstreams(&own)
        } else {
            self.upstream
                .iter()
                .map(|s| {
                    s.parse::<SocketAddr>()
                        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .with_context(|| {
                            format!("--upstream {s:?} is not an address (ip or ip:port)")
                        })
                })
                .collect::<Result<Vec<_>>>()?
        };
        if let Some(own) = upstreams.iter().find(|u| **u == self.listen) {
            anyhow::bail!("--upstream {own} is this server itself: it would forward to itself");
        }
        let allow_recursion = if self.allow_recursion.is_empty() {
            default_allow_recursion()
        } else {
            parse_cidrs("--allow-recursion", &self.allow_recursion)?
        };
        let allow_query = if self.allow_query.is_empty() {
            None
        } else {
            Some(parse_cidrs("--allow-query", &self.allow_query)?)
        };
        Ok(DnsConfig {
            listen: self.listen,
            zone: zone.to_string(),
            ttl: self.ttl,
            upstreams,
            allow_recursion,
            udp_sockets: self.udp_sockets,
            udp_answer_limit: self.udp_answer_limit,
            ns_address: (!self.listen.ip().is_unspecified()).then_some(self.listen.ip()),
            allow_query,
            ..DnsConfig::default()
        })
    }
}

/// `signpost dns` flags.
#[derive(Debug, Args)]
pub struct DnsReplicaArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "SIGNPOST_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,

    /// The DNS zone.
    #[arg(long, env = "SIGNPOST_ZONE", default_value = "xingren.host")]
    pub zone: String,

    /// Key prefix in etcd.
    #[arg(long, default_value = "/signpost/")]
    pub prefix: String,

    /// Address for Prometheus metrics (`/metrics`) and readiness
    /// (`/readyz`: 503 until the catalog was read from etcd once), off when
    /// absent.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,

    #[command(flatten)]
    pub etcd_security: crate::etcd::EtcdSecurityArgs,

    #[command(flatten)]
    pub dns: DnsArgs,
}

/// Runs a DNS-only replica until SIGINT/SIGTERM.
pub async fn run_replica(args: DnsReplicaArgs) -> Result<()> {
    let keys = Keys::new(&args.prefix);
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(args.etcd_security.options(&args.etcd, &args.prefix)?)
            .await
            .with_context(|| format!("cannot use etcd at {}", args.etcd.join(",")))?,
    );
    let catalog = Catalog::new(keys);
    let server = DnsServer::new(args.dns.config(&args.zone)?, catalog.clone())
        .with_context(|| format!("cannot serve DNS on {}", args.dns.listen))?;
    let cancel = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    server.register_metrics(&mut registry);
    let addr = server.local_addr();
    let watch = tokio::spawn(catalog.clone().run(store.clone(), cancel.clone()));
    if let Some(metrics_addr) = args.metrics {
        // Ready once the catalog was loaded: from then on DNS answers from
        // it, also while etcd is away; before, names in the zone get
        // SERVFAIL.
        let loaded = catalog.clone();
        let ready = move || loaded.snapshot().is_loaded();
        crate::metrics::serve(metrics_addr, registry, ready, cancel.clone()).await?;
    }
    println!(
        "signpost dns (etcd: {}), zone {}",
        args.etcd.join(","),
        args.zone
    );
    println!("  DNS      {addr} (UDP and TCP)");
    println!(
        "  try      dig @{} -p {} user.{} SRV",
        addr.ip(),
        addr.port(),
        args.zone
    );
    // Serving before the first sync is safe: until then names in the zone
    // are answered SERVFAIL, which no client caches as an answer.
    let dns = tokio::spawn(server.run(cancel.clone()));
    if !catalog.wait_synced(Duration::from_secs(3)).await {
        let checked = crate::etcd::check_reachable(
            &*store,
            &args.etcd,
            "names in the zone are answered SERVFAIL",
        )
        .await;
        if checked.is_err() {
            cancel.cancel();
        }
        checked?;
    }
    crate::server::shutdown_signal().await;
    cancel.cancel();
    let _ = watch.await;
    match dns.await {
        Ok(result) => result.context("DNS server failed"),
        Err(err) => Err(anyhow::anyhow!("DNS server task failed: {err}")),
    }
}
