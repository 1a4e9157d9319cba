//! `grpc-echo`: a demo gRPC service (`signpost.echo.v1.Echo`) over plain
//! HTTP/2, answering which instance served each call.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use signpost_examples::{grpc, logging, serve};
use tracing::info;

/// Demo gRPC echo service for Signpost: unary, server-, client- and
/// bidirectional streaming calls, each naming the instance that served it.
#[derive(Debug, Parser)]
#[command(name = "grpc-echo", version)]
struct Args {
    /// Address to serve gRPC (HTTP/2 without TLS) on. Loopback by default:
    /// its sidecar, on the same host, is what peers reach.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,

    /// Instance id, answered in every reply and the `x-instance` trailer
    /// (default: the host name, which is the pod name in Kubernetes).
    #[arg(long, env = "INSTANCE_ID")]
    id: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    logging::init();
    let id = args.id.unwrap_or_else(logging::hostname);
    let listener = serve::bind(args.listen).await?;
    info!(addr = %listener.local_addr()?, instance = %id, "grpc-echo serving");
    grpc::serve(listener, id, serve::shutdown_signal())
        .await
        .context("grpc-echo stopped")?;
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
    fn defaults_to_loopback_9090() {
        let args = Args::try_parse_from(["grpc-echo", "--id", "e1"]).expect("parses");
        assert_eq!(args.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(args.id.as_deref(), Some("e1"));
    }
}
