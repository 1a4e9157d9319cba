//! `signpost server`: the control plane (API, catalog, health checks).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use prometheus_client::registry::Registry;
use signpost_certs::Ca;
use signpost_control_plane::api::auth::AuthConfig;
use signpost_control_plane::api::certs::CertAuthority;
use signpost_control_plane::api::{ApiPolicy, ConnectionLimits};
use signpost_control_plane::catalog::Catalog;
use signpost_control_plane::server::{ControlPlane, ControlPlaneOptions};
use signpost_control_plane::store::{EtcdStore, Keys, MemoryStore, Store};
use signpost_dns::DnsServer;
use tokio_util::sync::CancellationToken;

/// `signpost server` flags.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "SIGNPOST_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        conflicts_with = "dev"
    )]
    pub etcd: Vec<String>,

    /// Development mode: in-memory store, writes from loopback need no token.
    #[arg(long)]
    pub dev: bool,

    /// Address of the HTTP API.
    #[arg(long, env = "SIGNPOST_API", default_value = "127.0.0.1:8500")]
    pub api: SocketAddr,

    /// File holding the admin token (required unless --dev).
    #[arg(long, env = "SIGNPOST_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The DNS zone (also the SPIFFE trust domain of certificates).
    #[arg(long, env = "SIGNPOST_ZONE", default_value = "xingren.host")]
    pub zone: String,

    /// Directory of the mesh CA (`signpost ca init --dir DIR`). In --dev, a
    /// CA is made in a temporary directory when this is absent.
    #[arg(long, env = "SIGNPOST_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Lifetime of workload certificates (10s to 30d).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,

    /// Key prefix in etcd.
    #[arg(long, default_value = "/signpost/")]
    pub prefix: String,

    /// etcd history to keep: one elected control plane compacts older
    /// revisions (at least 1m; 0 turns it off, for an etcd that compacts
    /// itself with --auto-compaction-retention).
    #[arg(long, default_value = "1h", value_parser = compaction_retention)]
    pub etcd_compaction: Duration,

    /// Networks health checks may probe besides the instance's own
    /// address, comma-separated CIDRs (default: none, a check probes only
    /// its instance).
    #[arg(long, value_delimiter = ',', value_name = "CIDRS")]
    pub check_allow: Vec<ipnet::IpNet>,

    /// How long an API client may take to send a request's headers, and
    /// how long an idle keep-alive connection is kept.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,

    /// Open API connections per client IP (as Consul's
    /// http_max_conns_per_client); more are closed at once.
    #[arg(long, default_value_t = 200)]
    pub http_max_conns_per_client: usize,

    /// Open API connections in all; more are closed at once.
    #[arg(long, default_value_t = 10_000)]
    pub http_max_conns: usize,

    /// Who may read the catalog, service configs and metrics over the API:
    /// `open` (anyone who reaches it) or `token` (a valid token, any).
    #[arg(long, value_enum, default_value = "open")]
    pub acl_read: ReadAcl,

    #[command(flatten)]
    pub etcd_security: crate::etcd::EtcdSecurityArgs,

    #[command(flatten)]
    pub dns: crate::dns::DnsArgs,
}

/// `--acl-read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadAcl {
    /// Reads need no token (as Consul's default_policy=allow).
    Open,
    /// Reads need a valid token (as Consul's default_policy=deny).
    Token,
}

/// Runs until SIGINT or SIGTERM: reads the credentials, opens the store
/// and the CA, starts DNS and the control plane, says where they listen,
/// then on the signal stops both.
pub async fn run(args: ServerArgs) -> Result<()> {
    let auth = auth_config(&args)?;
    let store = open_store(&args).await?;
    let (ca, _ca_tmp) = load_ca(&args)?;
    let cancel = CancellationToken::new();
    let (cp, dns) = start(&args, store.clone(), auth, ca.clone(), cancel.clone()).await?;
    let dns_addr = dns.local_addr();
    let dns_task = tokio::spawn(dns.run(cancel.clone()));
    announce(&args, &cp, &*store, ca.is_some(), dns_addr).await?;

    shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    cp.join().await;
    match dns_task.await {
        Ok(result) => result.context("DNS server failed"),
        Err(err) => Err(anyhow::anyhow!("DNS server task failed: {err}")),
    }
}

/// Who may write: the admin token from `--admin-token-file` (at least 16
/// characters), or none in `--dev`, where loopback writes need no token.
fn auth_config(args: &ServerArgs) -> Result<AuthConfig> {
    let admin_token = match &args.admin_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the admin token file {}", path.display()))?;
            let token = token.trim().to_string();
            if token.len() < 16 {
                bail!(
                    "the admin token in {} is {} characters long; use at least 16 (e.g. `openssl rand -hex 32 > {}`)",
                    path.display(),
                    token.len(),
                    path.display()
                );
            }
            Some(token)
        }
        None if args.dev => None,
        None => bail!(
            "signpost server needs an admin token: pass --admin-token-file FILE \
             (e.g. `openssl rand -hex 32 > admin.token`), or run with --dev"
        ),
    };
    Ok(match &admin_token {
        Some(t) => AuthConfig::with_admin_token(t, args.dev),
        None => AuthConfig {
            admin_hash: None,
            dev: true,
        },
    })
}

/// The in-memory store in `--dev`, etcd otherwise.
async fn open_store(args: &ServerArgs) -> Result<Arc<dyn Store>> {
    if args.dev {
        return Ok(Arc::new(MemoryStore::new()));
    }
    let opts = args.etcd_security.options(&args.etcd, &args.prefix)?;
    let store = EtcdStore::connect(opts).await.with_context(|| {
        format!(
            "cannot use etcd at {} (is etcd running? `signpost server --dev` needs none)",
            args.etcd.join(",")
        )
    })?;
    Ok(Arc::new(store))
}

/// Binds DNS (first, so a taken port is reported before anything runs) and
/// starts the control plane over one catalog; the DNS server is returned
/// for the caller to run.
async fn start(
    args: &ServerArgs,
    store: Arc<dyn Store>,
    auth: AuthConfig,
    ca: Option<Arc<CertAuthority>>,
    cancel: CancellationToken,
) -> Result<(ControlPlane, DnsServer)> {
    let keys = Keys::new(&args.prefix);
    let mut registry = Registry::default();
    let catalog = Catalog::new(keys.clone());
    let dns = DnsServer::new(args.dns.config(&args.zone)?, catalog.clone())
        .with_context(|| format!("cannot serve DNS on {}", args.dns.listen))?;
    dns.register_metrics(&mut registry);
    let candidate = format!("{}@{}", hostname(), args.api);
    let cp = ControlPlane::start(
        ControlPlaneOptions {
            api: args.api,
            store,
            keys,
            auth,
            candidate,
            ca,
            compaction: (!args.etcd_compaction.is_zero()).then_some(args.etcd_compaction),
            api_policy: ApiPolicy {
                check_allow: args.check_allow.clone(),
                limits: ConnectionLimits {
                    header_read_timeout: args.http_header_timeout,
                    per_client: args.http_max_conns_per_client,
                    total: args.http_max_conns,
                },
                read_needs_token: args.acl_read == ReadAcl::Token,
            },
        },
        registry,
        Some(catalog),
        cancel,
    )
    .await?;
    Ok((cp, dns))
}

/// Prints where the server listens and how to try it; with etcd, first
/// waits briefly for the catalog's first sync and fails with the reason
/// when etcd cannot be reached.
async fn announce(
    args: &ServerArgs,
    cp: &ControlPlane,
    store: &dyn Store,
    has_ca: bool,
    dns_addr: SocketAddr,
) -> Result<()> {
    if args.dev {
        println!("signpost server (dev mode: in-memory store, loopback writes need no token)");
    } else {
        println!("signpost server (etcd: {})", args.etcd.join(","));
        if !cp.catalog.wait_synced(Duration::from_secs(3)).await {
            crate::etcd::check_reachable(
                store,
                &args.etcd,
                "the API answers 503 to writes and DNS answers SERVFAIL",
            )
            .await?;
        }
    }
    println!("  API      http://{}", cp.api_addr);
    match (has_ca, &args.ca_dir) {
        (true, Some(dir)) => println!(
            "  CA       {} (certificates for {})",
            dir.display(),
            humantime::format_duration(args.cert_ttl)
        ),
        (true, None) => println!(
            "  CA       temporary (dev), certificates for {}",
            humantime::format_duration(args.cert_ttl)
        ),
        (false, _) => println!("  CA       none: POST /v1/certs answers 503 (pass --ca-dir)"),
    }
    println!("  DNS      {dns_addr} (UDP and TCP), zone {}", args.zone);
    println!(
        "  try      signpost register user --id u1 --address 127.0.0.1 --port 8080 && dig @{} -p {} user.{} SRV",
        dns_addr.ip(),
        dns_addr.port(),
        args.zone
    );
    Ok(())
}

/// Parses `--etcd-compaction`: 0, or at least a minute (a shorter history
/// would have every watcher that lags a moment read the catalog again).
fn compaction_retention(raw: &str) -> Result<Duration, String> {
    let retention = humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration (write it like \"1h\" or \"30m\"): {e}"))?;
    if !retention.is_zero() && retention < Duration::from_secs(60) {
        return Err(format!(
            "{raw}: keep at least 1m of etcd history (0 turns compaction off)"
        ));
    }
    Ok(retention)
}

/// Loads the CA from --ca-dir, or makes a temporary one in --dev. The
/// returned TempDir must live as long as the server.
fn load_ca(args: &ServerArgs) -> Result<(Option<Arc<CertAuthority>>, Option<tempfile::TempDir>)> {
    let (ca, tmp) = match &args.ca_dir {
        Some(dir) => (
            Ca::load(dir).with_context(|| {
                format!(
                    "cannot load the CA from {} (make one with `signpost ca init --dir {}`)",
                    dir.display(),
                    dir.display()
                )
            })?,
            None,
        ),
        None if args.dev => {
            let tmp = tempfile::tempdir().context("cannot make a temporary CA directory")?;
            (
                Ca::init(tmp.path()).context("cannot make the dev CA")?,
                Some(tmp),
            )
        }
        None => {
            tracing::warn!("no --ca-dir: this control plane will not issue certificates");
            return Ok((None, None));
        }
    };
    Ok((
        Some(Arc::new(CertAuthority {
            ca,
            zone: args.zone.clone(),
            cert_ttl: args.cert_ttl,
        })),
        tmp,
    ))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "signpost".into())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
