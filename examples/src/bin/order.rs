//! `order`: a demo service answering `GET /orders/{id}` with an order and
//! its user, fetched from the `user` service through the sidecar named by
//! `http_proxy`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use signpost_examples::logging;
use signpost_examples::order::{DEFAULT_USER_URL, OrderConfig, OrderService, proxy_from_env};
use signpost_examples::serve::{self, DEFAULT_DRAIN};
use tracing::info;

/// Demo `order` service for Signpost: `GET /orders/{id}`, `GET /health`.
///
/// User calls go to `--user-url`; when `http_proxy` (or `HTTP_PROXY`) is
/// set they go through that proxy — the sidecar's outbound port — which
/// finds a healthy `user` instance over Signpost DNS and speaks mTLS to it.
#[derive(Debug, Parser)]
#[command(name = "order", version)]
struct Args {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,

    /// Instance id, answered as `served_by` (default: the host name).
    #[arg(long, env = "INSTANCE_ID")]
    id: Option<String>,

    /// Base URL of the user service. The bare name `user` is what the
    /// sidecar resolves in the mesh zone.
    #[arg(long, default_value = DEFAULT_USER_URL)]
    user_url: String,

    /// Limit for a whole user call ("35s", "500ms").
    #[arg(long, default_value = "35s", value_parser = humantime::parse_duration)]
    user_timeout: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    logging::init();
    let id = args.id.unwrap_or_else(logging::hostname);
    let proxy = proxy_from_env();
    let service = OrderService::new(OrderConfig {
        instance: id.clone(),
        user_url: args.user_url.clone(),
        proxy: proxy.clone(),
        timeout: args.user_timeout,
    })
    .context("cannot set up the user client")?;
    let listener = serve::bind(args.listen).await?;
    info!(
        addr = %listener.local_addr()?,
        instance = %id,
        user_url = %args.user_url,
        proxy = proxy.as_deref().unwrap_or("none (direct)"),
        "order serving"
    );
    serve::serve(listener, service, serve::shutdown_signal(), DEFAULT_DRAIN).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_call_user_by_its_bare_name() {
        let args = Args::try_parse_from(["order"]).expect("parses");
        assert_eq!(args.user_url, "http://user");
        assert_eq!(args.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(args.user_timeout, Duration::from_secs(35));
    }
}
