//! `grpc-call`: calls the Echo gRPC service, directly or through a sidecar,
//! for the demo (which instance answers each call) and for benchmarks
//! (open-loop load at a fixed rate).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use signpost_examples::grpc::{
    self, EchoClient, EchoRequest, INSTANCE_TRAILER, StreamRequest, bench,
};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The header a sidecar adds to an answer it made up itself (no healthy
/// instance, timeout, refused by policy), naming why.
const SIGNPOST_ERROR: &str = "x-signpost-error";

/// Calls the Echo gRPC service (`grpc-echo`), by default through the local
/// sidecar's outbound port. `--target`, `--authority` and `--timeout` go
/// before or after the command.
#[derive(Debug, Parser)]
#[command(name = "grpc-call", version)]
struct Args {
    /// Address to connect to: the local sidecar's outbound port, or a
    /// grpc-echo directly.
    #[arg(long, global = true, default_value = "127.0.0.1:15001")]
    target: SocketAddr,

    /// The service to call, sent as `:authority`, e.g.
    /// `grpc-echo.xingren.host` (default: the target address, for calling
    /// a grpc-echo directly).
    #[arg(long, global = true)]
    authority: Option<String>,

    /// Each call's deadline, sent to the server as `grpc-timeout`.
    #[arg(long, global = true, default_value = "10s")]
    timeout: humantime::Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Unary calls on one channel: a line per call with the instance that
    /// answered, then (for `--count` above 1) the calls per instance.
    Unary(UnaryArgs),
    /// One server-streaming call: messages and bytes received, how long.
    Stream(StreamArgs),
    /// Unary calls at a fixed rate, open loop, on one channel: one line of
    /// counts and latency percentiles.
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct UnaryArgs {
    /// The message to echo.
    #[arg(long, default_value = "hello")]
    message: String,

    /// Calls to make, one after another, on one HTTP/2 connection: the mesh
    /// balances each call, not the connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,

    /// Payload bytes in each request.
    #[arg(long, default_value_t = 0)]
    size: usize,

    /// Ask the server to sleep this long before answering.
    #[arg(long, default_value_t = 0)]
    sleep_ms: u32,

    /// Ask the server to answer with this gRPC status code (0: succeed).
    #[arg(long, default_value_t = 0)]
    fail_code: u32,
}

#[derive(Debug, clap::Args)]
struct StreamArgs {
    /// Replies to ask for.
    #[arg(long, default_value_t = 10)]
    count: u32,

    /// Payload bytes in each reply (at most 1 MiB).
    #[arg(long, default_value_t = 1024)]
    size: u32,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Calls a second, offered whether or not earlier calls have answered.
    #[arg(long, value_parser = parse_rate)]
    rate: f64,

    /// How long to offer them (`10s`, `1m`); `rate * duration` calls in all.
    #[arg(long)]
    duration: humantime::Duration,

    /// Calls in flight at most; a call due while all are busy waits, and the
    /// wait counts in its latency.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,

    /// Payload bytes in each request.
    #[arg(long, default_value_t = 0)]
    size: usize,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a positive number of calls a second"
        )),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let authority = args
        .authority
        .clone()
        .unwrap_or_else(|| args.target.to_string());
    let channel = grpc::endpoint(args.target, &authority)?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach {} (is the sidecar, or grpc-echo, listening there?)",
                args.target
            )
        })?;
    let client = EchoClient::new(channel);
    let timeout = *args.timeout;
    match args.command {
        Command::Unary(unary_args) => unary(client, timeout, unary_args).await,
        Command::Stream(stream_args) => stream(client, timeout, stream_args).await,
        Command::Bench(bench_args) => {
            let load = bench::Load {
                rate: bench_args.rate,
                duration: *bench_args.duration,
                concurrency: usize::try_from(bench_args.concurrency).unwrap_or(usize::MAX),
                timeout,
                request: EchoRequest {
                    message: "bench".to_string(),
                    payload: Bytes::from(vec![0; bench_args.size]),
                    ..EchoRequest::default()
                },
            };
            eprintln!(
                "offering {} calls/s for {} to {} as {authority}, at most {} in flight",
                load.rate, bench_args.duration, args.target, load.concurrency
            );
            run_bench(client, &load).await
        }
    }
}

async fn unary(mut client: EchoClient<Channel>, timeout: Duration, args: UnaryArgs) -> Result<()> {
    let template = EchoRequest {
        message: args.message,
        payload: Bytes::from(vec![0; args.size]),
        sleep_ms: args.sleep_ms,
        fail_code: args.fail_code,
    };
    let mut by_instance = BTreeMap::<String, u64>::new();
    let mut failed = Vec::new();
    for n in 1..=args.count {
        let mut request = Request::new(template.clone());
        request.set_timeout(timeout);
        match client.unary(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                println!("instance={} message={}", reply.instance, reply.message);
                *by_instance.entry(reply.instance).or_default() += 1;
            }
            Err(status) => {
                // A single call's failure is the error message itself.
                if args.count > 1 {
                    eprintln!("call {n}: {}", describe(&status));
                }
                failed.push(status);
            }
        }
    }
    if args.count > 1 {
        let counts: Vec<String> = by_instance
            .iter()
            .map(|(instance, calls)| format!("{instance}:{calls}"))
            .collect();
        println!(
            "calls={} errors={} by_instance={}",
            args.count,
            failed.len(),
            counts.join(",")
        );
    }
    match failed.as_slice() {
        [] => Ok(()),
        [status] if args.count == 1 => bail!("the call failed: {}", describe(status)),
        [first, ..] => bail!(
            "{} of {} calls failed; the first: {}",
            failed.len(),
            args.count,
            describe(first)
        ),
    }
}

async fn stream(
    mut client: EchoClient<Channel>,
    timeout: Duration,
    args: StreamArgs,
) -> Result<()> {
    let mut request = Request::new(StreamRequest {
        count: args.count,
        size: args.size,
    });
    request.set_timeout(timeout);
    let started = Instant::now();
    let mut replies = client
        .server_stream(request)
        .await
        .map_err(|status| anyhow::anyhow!("the call failed: {}", describe(&status)))?
        .into_inner();
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut instance = String::new();
    loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                messages += 1;
                bytes += reply.payload.len() as u64;
                if instance.is_empty() {
                    instance = reply.instance;
                }
            }
            Ok(None) => break,
            Err(status) => bail!(
                "the stream failed after {messages} messages ({bytes} bytes): {}",
                describe(&status)
            ),
        }
    }
    let elapsed = started.elapsed();
    let mib_per_s = bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9);
    println!(
        "instance={instance} messages={messages} bytes={bytes} elapsed_ms={:.3} mib_per_s={mib_per_s:.1}",
        elapsed.as_secs_f64() * 1e3
    );
    if messages != u64::from(args.count) {
        bail!(
            "the stream ended after {messages} of {} messages",
            args.count
        );
    }
    Ok(())
}

async fn run_bench(client: EchoClient<Channel>, load: &bench::Load) -> Result<()> {
    let report = bench::run(client, load).await;
    println!("{report}");
    if let Some(status) = &report.first_error {
        bail!(
            "{} of {} calls failed; the first: {}",
            report.errors,
            report.calls,
            describe(status)
        );
    }
    if report.unsent > 0 {
        bail!(
            "{} calls were never sent: all {} slots stayed busy to the end (raise --concurrency or lower --rate)",
            report.unsent,
            load.concurrency
        );
    }
    Ok(())
}

/// A failed call in a line: the code, the message, and who answered — the
/// sidecar (with `x-signpost-error`) or an instance (with `x-instance`).
fn describe(status: &Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        text.push_str(": ");
        text.push_str(status.message());
    }
    let header = |name: &str| status.metadata().get(name).and_then(|v| v.to_str().ok());
    if let Some(why) = header(SIGNPOST_ERROR) {
        text.push_str(&format!(
            " (answered by the sidecar: {SIGNPOST_ERROR}: {why})"
        ));
    } else if let Some(instance) = header(INSTANCE_TRAILER) {
        text.push_str(&format!(" (answered by instance {instance})"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use tonic::Code;
    use tonic::metadata::MetadataValue;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn unary_defaults_to_the_sidecar_outbound_port() {
        let args = Args::try_parse_from([
            "grpc-call",
            "--authority",
            "grpc-echo.xingren.host",
            "unary",
            "--message",
            "hi",
        ])
        .expect("parses");
        assert_eq!(args.target.to_string(), "127.0.0.1:15001");
        assert_eq!(*args.timeout, Duration::from_secs(10));
        let Command::Unary(unary) = args.command else {
            panic!("not unary: {:?}", args.command);
        };
        assert_eq!((unary.message.as_str(), unary.count), ("hi", 1));
    }

    #[test]
    fn bench_takes_rate_duration_and_concurrency() {
        let args =
            Args::try_parse_from(["grpc-call", "bench", "--rate", "2000", "--duration", "10s"])
                .expect("parses");
        let Command::Bench(bench) = args.command else {
            panic!("not bench: {:?}", args.command);
        };
        assert_eq!(bench.rate, 2000.0);
        assert_eq!(*bench.duration, Duration::from_secs(10));
        assert_eq!(bench.concurrency, 256);
        let args = Args::try_parse_from([
            "grpc-call",
            "bench",
            "--rate",
            "1",
            "--duration",
            "1s",
            "--timeout",
            "50ms",
        ])
        .expect("global flags parse after the command");
        assert_eq!(*args.timeout, Duration::from_millis(50));
        for bad in ["0", "-5", "fast", "inf"] {
            assert!(
                Args::try_parse_from(["grpc-call", "bench", "--rate", bad, "--duration", "1s"])
                    .is_err(),
                "rate {bad} accepted"
            );
        }
    }

    #[test]
    fn describe_names_who_answered() {
        let mut status = Status::new(Code::Unavailable, "no healthy instance");
        status.metadata_mut().insert(
            SIGNPOST_ERROR,
            MetadataValue::from_static("no healthy instance of grpc-echo"),
        );
        assert_eq!(
            describe(&status),
            "Unavailable: no healthy instance (answered by the sidecar: x-signpost-error: no healthy instance of grpc-echo)"
        );
        let mut status = Status::new(Code::NotFound, "");
        status
            .metadata_mut()
            .insert(INSTANCE_TRAILER, MetadataValue::from_static("e1"));
        assert_eq!(describe(&status), "NotFound (answered by instance e1)");
    }
}
