//! Client commands: register, deregister, services, instances, token.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use signpost_control_plane::client::Client;
use signpost_control_plane::model::{CheckSpec, InstanceId, Registration, ServiceName};

/// Where the control plane is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Control plane URL.
    #[arg(
        long,
        env = "SIGNPOST_ADDR",
        default_value = "http://127.0.0.1:8500",
        value_name = "URL"
    )]
    pub control_plane: String,

    /// Token for writes (a service token, or the admin token).
    #[arg(long, env = "SIGNPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.control_plane, self.token.clone())?)
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// `signpost register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name (a DNS label).
    pub service: String,
    /// Instance id, unique within the service (a DNS label).
    #[arg(long)]
    pub id: String,
    /// The instance's IP address.
    #[arg(long)]
    pub address: String,
    /// The instance's port.
    #[arg(long, allow_negative_numbers = true)]
    pub port: i64,
    /// A named port, NAME=PORT (served as _NAME._tcp.<service>); repeatable.
    #[arg(long = "named-port", value_parser = parse_meta, value_name = "NAME=PORT")]
    pub ports: Vec<(String, String)>,
    /// A tag (served as <tag>.tag.<service>); repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata KEY=VALUE (served as TXT); repeatable.
    #[arg(long = "meta", value_parser = parse_meta, value_name = "KEY=VALUE")]
    pub meta: Vec<(String, String)>,
    /// Weight, 1 to 65535 (default 100).
    #[arg(long, allow_negative_numbers = true)]
    pub weight: Option<i64>,
    /// TTL ("10s"): the instance must heartbeat within it. Without it the
    /// instance stays until deregistered.
    #[arg(long)]
    pub ttl: Option<String>,
    /// HTTP health check: a path ("/health", probed on the instance's
    /// address and port) or a URL on the instance's address.
    #[arg(long, conflicts_with = "check_tcp", value_name = "PATH|URL")]
    pub check_http: Option<String>,
    /// TCP health check: ":PORT" or "ADDRESS:PORT" with the instance's
    /// address.
    #[arg(long, value_name = ":PORT|ADDRESS:PORT")]
    pub check_tcp: Option<String>,
    /// Health check interval (default 10s).
    #[arg(long)]
    pub check_interval: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `signpost register`: registers, prints what was stored.
pub async fn register(a: RegisterArgs) -> Result<()> {
    let svc = ServiceName::new(&a.service)?;
    let id = InstanceId::new(&a.id)?;
    let mut ports = BTreeMap::new();
    for (name, port) in &a.ports {
        let port: i64 = port
            .parse()
            .with_context(|| format!("--named-port {name}={port}: the port is not a number"))?;
        ports.insert(name.clone(), port);
    }
    let check = if a.check_http.is_some() || a.check_tcp.is_some() {
        Some(CheckSpec {
            http: a.check_http.clone(),
            tcp: a.check_tcp.clone(),
            port: None,
            interval: a.check_interval.clone(),
            timeout: None,
        })
    } else {
        None
    };
    let reg = Registration {
        address: a.address.clone(),
        port: a.port,
        ports,
        tags: a.tags.clone(),
        meta: a.meta.iter().cloned().collect(),
        weight: a.weight,
        ttl: a.ttl.clone(),
        check,
    };
    let inst = a.client.client()?.register(&svc, &id, &reg).await?;
    let ttl = inst
        .ttl
        .map(|t| format!(", ttl {}", humantime::format_duration(t)))
        .unwrap_or_default();
    println!(
        "registered {id}.{svc} at {}:{} (weight {}{ttl})",
        inst.address, inst.port, inst.weight
    );
    if inst.ttl.is_some() {
        println!(
            "heartbeat with: curl -X PUT {}/v1/services/{svc}/instances/{id}/heartbeat",
            a.client.control_plane.trim_end_matches('/')
        );
    }
    Ok(())
}

/// `signpost deregister`.
#[derive(Debug, Args)]
pub struct DeregisterArgs {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `signpost deregister`.
pub async fn deregister(a: DeregisterArgs) -> Result<()> {
    let svc = ServiceName::new(&a.service)?;
    let id = InstanceId::new(&a.id)?;
    a.client.client()?.deregister(&svc, &id).await?;
    println!("deregistered {id}.{svc}");
    Ok(())
}

/// Prints rows as aligned columns (the last column is not padded).
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `signpost services`.
pub async fn services(a: ClientArgs) -> Result<()> {
    let list = a.client()?.services().await?;
    let rows: Vec<Vec<String>> = list
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.to_string(),
                format!("{}/{}", s.healthy, s.total),
                if s.tags.is_empty() {
                    "-".into()
                } else {
                    s.tags.join(",")
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no services registered");
        return Ok(());
    }
    print_table(&["SERVICE", "HEALTHY/TOTAL", "TAGS"], &rows);
    Ok(())
}

/// `signpost instances`.
#[derive(Debug, Args)]
pub struct InstancesArgs {
    /// Service name.
    pub service: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn age(since: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(since)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `signpost instances <svc>`.
pub async fn instances(a: InstancesArgs) -> Result<()> {
    let svc = ServiceName::new(&a.service)?;
    let view = a
        .client
        .client()?
        .service(&svc, None, Duration::ZERO)
        .await?;
    if view.instances.is_empty() {
        println!("no instances of {svc}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = view
        .instances
        .iter()
        .map(|i| {
            vec![
                i.instance.id.to_string(),
                i.instance.address.to_string(),
                i.instance.port.to_string(),
                i.health.status.to_string(),
                if i.instance.tags.is_empty() {
                    "-".into()
                } else {
                    i.instance.tags.join(",")
                },
                age(i.instance.registered),
            ]
        })
        .collect();
    print_table(&["ID", "ADDRESS", "PORT", "HEALTH", "TAGS", "AGE"], &rows);
    Ok(())
}

/// `signpost token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token that may register a service and get its certificate.
    Create(TokenCreateArgs),
    /// List service tokens: accessor, service, created, expires (never the
    /// tokens themselves).
    List(ClientArgs),
    /// Revoke a token by its accessor; every control plane refuses it within
    /// a second.
    Revoke(TokenRevokeArgs),
}

/// `signpost token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The service the token acts for.
    #[arg(long)]
    pub service: String,
    /// How long the token is accepted ("720h", 1m to 87600h); without it,
    /// until revoked.
    #[arg(long)]
    pub ttl: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `signpost token create`: prints the token alone on stdout, so scripts can
/// capture it.
pub async fn token_create(a: TokenCreateArgs) -> Result<()> {
    let svc = ServiceName::new(&a.service)?;
    let reply = a.client.client()?.create_token(&svc, a.ttl.clone()).await?;
    println!("{}", reply.token);
    let expires = reply
        .expires
        .map(|e| format!(", expires {}", humantime::format_rfc3339_seconds(e)))
        .unwrap_or_default();
    eprintln!(
        "token for service {} (accessor {}{expires}; shown once, only its hash is stored)",
        reply.service, reply.accessor
    );
    Ok(())
}

/// `signpost token list`.
pub async fn token_list(a: ClientArgs) -> Result<()> {
    let list = a.client()?.list_tokens().await?;
    if list.tokens.is_empty() {
        println!("no service tokens");
        return Ok(());
    }
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = list
        .tokens
        .iter()
        .map(|t| {
            vec![
                t.accessor.clone(),
                t.service.to_string(),
                humantime::format_rfc3339_seconds(t.created).to_string(),
                match t.expires {
                    None => "never".into(),
                    Some(e) if e <= now => {
                        format!("{} (expired)", humantime::format_rfc3339_seconds(e))
                    }
                    Some(e) => humantime::format_rfc3339_seconds(e).to_string(),
                },
            ]
        })
        .collect();
    print_table(&["ACCESSOR", "SERVICE", "CREATED", "EXPIRES"], &rows);
    Ok(())
}

/// `signpost token revoke`.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's accessor (from `signpost token list`).
    pub accessor: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `signpost token revoke ACCESSOR`.
pub async fn token_revoke(a: TokenRevokeArgs) -> Result<()> {
    a.client.client()?.revoke_token(&a.accessor).await?;
    println!("revoked token {}", a.accessor);
    Ok(())
}
