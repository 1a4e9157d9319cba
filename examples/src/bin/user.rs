//! `user`: a demo service answering `GET /users/{id}` with a made-up user
//! and the id of the instance that served it.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::SocketAddr;

use anyhow::Result;
use clap::Parser;
use signpost_examples::serve::{self, DEFAULT_DRAIN};
use signpost_examples::{logging, user::UserService};
use tracing::info;

/// Demo `user` service for Signpost: `GET /users/{id}`, `GET /health`.
#[derive(Debug, Parser)]
#[command(name = "user", version)]
struct Args {
    /// Address to serve HTTP on. Loopback by default: its sidecar, on the
    /// same host, is what peers reach.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Instance id, answered as `served_by` (default: the host name, which
    /// is the pod name in Kubernetes).
    #[arg(long, env = "INSTANCE_ID")]
    id: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    logging::init();
    let id = args.id.unwrap_or_else(logging::hostname);
    let listener = serve::bind(args.listen).await?;
    info!(addr = %listener.local_addr()?, instance = %id, "user serving");
    serve::serve(
        listener,
        UserService::new(id),
        serve::shutdown_signal(),
        DEFAULT_DRAIN,
    )
    .await;
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
    fn defaults_to_loopback_8080() {
        let args = Args::try_parse_from(["user", "--id", "u1"]).expect("parses");
        assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.id.as_deref(), Some("u1"));
    }
}
