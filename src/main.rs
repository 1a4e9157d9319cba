//! `signpost`: the one binary. It parses arguments and wires the libraries
//! together; all behaviour lives in the crates (`signpost-control-plane`,
//! `signpost-dns`, `signpost-sidecar`, `signpost-certs`).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;
mod dns;
mod etcd;
mod logging;
mod metrics;
mod server;
mod sidecar;

/// DNS-based service discovery and sidecar mesh.
///
/// Services register with the control plane, which keeps them in etcd and
/// serves them as DNS (`dig user.xingren.host`); a sidecar next to each
/// instance balances, retries and speaks mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "signpost", version, propagate_version = true)]
struct Args {
    /// Log format: plain or json (level from RUST_LOG).
    #[arg(
        long,
        global = true,
        env = "SIGNPOST_LOG_FORMAT",
        default_value = "plain"
    )]
    log_format: logging::Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane: HTTP API, DNS, catalog, health checks, CA.
    Server(server::ServerArgs),
    /// Run a DNS-only replica with its own etcd watch.
    Dns(dns::DnsReplicaArgs),
    /// Run the sidecar next to one service instance.
    Sidecar(sidecar::SidecarArgs),
    /// Register an instance.
    Register(cli::RegisterArgs),
    /// Deregister an instance.
    Deregister(cli::DeregisterArgs),
    /// List services with healthy/total instance counts.
    Services(cli::ClientArgs),
    /// List a service's instances.
    Instances(cli::InstancesArgs),
    /// Manage service tokens.
    #[command(subcommand)]
    Token(cli::TokenCommand),
    /// Manage the mesh CA.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a root CA (ECDSA P-256) in DIR; refuses if one is there.
    Init {
        /// Directory for ca.pem and ca-key.pem (the key is written mode 0600).
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

fn ca_init(dir: &std::path::Path) -> anyhow::Result<()> {
    signpost_certs::Ca::init(dir)?;
    println!(
        "created a root CA in {}: {} (public) and {} (private, mode 0600)",
        dir.display(),
        signpost_certs::CA_CERT_FILE,
        signpost_certs::CA_KEY_FILE
    );
    println!("use it with: signpost server --ca-dir {}", dir.display());
    Ok(())
}

/// The async runtime for `command`. A sidecar on one thread (`--threads`,
/// by default the CPUs it may use: beside an app, often one) runs a
/// single-threaded scheduler, as Linkerd's proxy does; with more, a worker
/// per thread. Everything else runs a worker per CPU.
fn runtime_builder(command: &Command) -> tokio::runtime::Builder {
    match command {
        Command::Sidecar(a) if a.threads() == 1 => tokio::runtime::Builder::new_current_thread(),
        Command::Sidecar(a) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(a.threads());
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let is_server = matches!(
        args.command,
        Command::Server(_) | Command::Dns(_) | Command::Sidecar(_)
    );
    logging::init(args.log_format, if is_server { "info" } else { "warn" });
    let runtime = match runtime_builder(&args.command).enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Command::Server(a) => server::run(a).await,
            Command::Dns(a) => dns::run_replica(a).await,
            Command::Sidecar(a) => sidecar::run(a).await,
            Command::Register(a) => cli::register(a).await,
            Command::Deregister(a) => cli::deregister(a).await,
            Command::Services(a) => cli::services(a).await,
            Command::Instances(a) => cli::instances(a).await,
            Command::Token(cli::TokenCommand::Create(a)) => cli::token_create(a).await,
            Command::Token(cli::TokenCommand::List(a)) => cli::token_list(a).await,
            Command::Token(cli::TokenCommand::Revoke(a)) => cli::token_revoke(a).await,
            Command::Ca(CaCommand::Init { dir }) => ca_init(&dir),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
