//! `signpost sidecar`: the per-instance proxy.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use signpost_control_plane::model::{InstanceId, ServiceName};
use signpost_sidecar::SidecarConfig;
use signpost_sidecar::config::{AppProtocol, Egress};
use tokio_util::sync::CancellationToken;

/// `signpost sidecar` flags.
#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// The service this instance belongs to.
    #[arg(long, env = "SIGNPOST_SERVICE")]
    pub service: String,

    /// Instance id (default: <service>-<address with dashes>-<inbound port>).
    #[arg(long, env = "SIGNPOST_ID")]
    pub id: Option<String>,

    /// The address other sidecars reach this one at (registered in DNS).
    #[arg(long, env = "SIGNPOST_ADDRESS")]
    pub address: IpAddr,

    /// The app's address (plain HTTP).
    #[arg(long, env = "SIGNPOST_APP")]
    pub app: SocketAddr,

    /// Path of the app's health endpoint (e.g. /health), probed every few
    /// seconds and reported to the control plane.
    #[arg(long)]
    pub app_health: Option<String>,

    /// Where mTLS from other sidecars arrives.
    #[arg(long, default_value = "0.0.0.0:15006")]
    pub inbound: SocketAddr,

    /// The HTTP proxy for the app (`http_proxy=http://127.0.0.1:15001`).
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,

    /// Admin: /metrics, /ready, /live.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,

    /// A plain TCP port tunnelled to a service over mTLS: NAME=ADDR
    /// (e.g. db=127.0.0.1:15432); repeatable.
    #[arg(long = "upstream", value_name = "NAME=ADDR")]
    pub upstreams: Vec<String>,

    /// Control plane URL.
    #[arg(long, env = "SIGNPOST_ADDR", default_value = "http://127.0.0.1:8500")]
    pub control_plane: String,

    /// Signpost DNS server used for discovery (not the system resolver).
    #[arg(long, env = "SIGNPOST_DNS", default_value = "127.0.0.1:5353")]
    pub dns: SocketAddr,

    /// File holding this service's token.
    #[arg(long, env = "SIGNPOST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The zone.
    #[arg(long, env = "SIGNPOST_ZONE", default_value = "xingren.host")]
    pub zone: String,

    /// Registration TTL; heartbeats go at a third of it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// Time limit for a response's headers, counted from the end of the
    /// request body (a slow upload is not cut by it); a smaller
    /// `grpc-timeout` on a call wins, counted from its start.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// A request body from the app that sends nothing this long is cut
    /// (gRPC streams, which may idle on purpose, are not).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,

    /// How the local app is spoken to: `auto` (the caller's protocol:
    /// HTTP/2 for callers that sent HTTP/2, such as gRPC), `http1` or
    /// `http2` (h2c) for an app that speaks only one.
    #[arg(long, default_value = "auto", value_parser = parse_app_protocol)]
    pub app_protocol: AppProtocol,

    /// How often the trust bundle is fetched again; a handshake that meets
    /// an unknown CA fetches it at once, and a bundle that no longer holds
    /// this sidecar's CA gets it a new certificate at once.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub bundle_refresh: Duration,

    /// Whether the app's calls may leave the mesh (plain HTTP to other
    /// hosts, CONNECT tunnels): `allow` or `deny` (403).
    #[arg(long, default_value = "allow", value_parser = parse_egress)]
    pub egress: Egress,

    /// How long in-flight requests may take to finish on shutdown.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,

    /// How long to keep serving after deregistering on shutdown, so callers
    /// see the DNS change (one DNS TTL).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub linger: Duration,

    /// Threads that run the proxy (default: the CPUs this process may use,
    /// by its affinity and cgroup quota). With 1, a single-threaded
    /// scheduler: no work stealing, no wake-ups across threads.
    #[arg(long, env = "SIGNPOST_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

fn parse_app_protocol(s: &str) -> Result<AppProtocol, String> {
    s.parse()
}

fn parse_egress(s: &str) -> Result<Egress, String> {
    match s {
        "allow" => Ok(Egress::Allow),
        "deny" => Ok(Egress::Deny),
        other => Err(format!("{other:?}: use allow or deny")),
    }
}

impl SidecarArgs {
    /// The threads to run: `--threads`, or the CPUs available.
    pub fn threads(&self) -> usize {
        match self.threads {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Runs the sidecar until SIGINT/SIGTERM, then deregisters and drains.
pub async fn run(args: SidecarArgs) -> Result<()> {
    let service = ServiceName::new(&args.service).context("--service")?;
    let id = match &args.id {
        Some(id) => InstanceId::new(id).context("--id")?,
        None => {
            let addr = args.address.to_string().replace(['.', ':'], "-");
            InstanceId::new(&format!("{service}-{addr}-{}", args.inbound.port()))
                .context("cannot derive an instance id: pass --id")?
        }
    };
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("SIGNPOST_TOKEN").ok(),
    };
    let mut upstreams = Vec::new();
    for spec in &args.upstreams {
        let Some((name, addr)) = spec.split_once('=') else {
            bail!("--upstream {spec:?}: expected NAME=ADDR, e.g. db=127.0.0.1:15432");
        };
        let name = ServiceName::new(name).with_context(|| format!("--upstream {spec:?}"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("--upstream {spec:?}: {addr:?} is not host:port"))?;
        upstreams.push((name, addr));
    }
    let mut config = SidecarConfig::new(
        service,
        id,
        args.address,
        args.app,
        args.control_plane.clone(),
        args.dns,
    );
    config.app_health = args.app_health.clone();
    config.inbound = args.inbound;
    config.outbound = args.outbound;
    config.admin = args.admin;
    config.upstreams = upstreams;
    config.token = token;
    config.zone = args.zone.clone();
    config.ttl = args.ttl;
    config.request_timeout = args.request_timeout;
    config.body_idle_timeout = args.body_idle_timeout;
    config.app_protocol = args.app_protocol;
    config.egress = args.egress;
    config.bundle_refresh = args.bundle_refresh;
    config.drain = args.drain;
    config.shutdown_linger = args.linger;

    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        tracing::info!("signal received: deregistering and draining");
        signal.cancel();
    });
    signpost_sidecar::run(config, shutdown)
        .await
        .context("sidecar failed")
}
