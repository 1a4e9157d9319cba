//! The loader of `integration/bench/scale.sh`.
//!
//! ```text
//! scale_load register <api-url> <token> <from> <to> [in-flight] [check-port]
//! scale_load wait <dns-addr> <index> <timeout-seconds>
//! ```
//!
//! `register` puts instances `from..to` through the API, `in-flight` (32) at
//! a time, and prints one line: `rate_last10 p50_ms p99_ms failures`, the
//! rate and latencies taken over the last 10 % of the range, so that each
//! step of the benchmark reports the cost at its own catalog size.
//!
//! `wait` polls the DNS server until instance `index` answers and prints the
//! milliseconds it took (the benchmark's cold start, once it starts a replica
//! just before).
//!
//! Instance `i` is `i<i % 2>` of service `s<i / 2>` at an address of
//! 10.0.0.0/8 that no other instance has, with a tag and two meta keys, as a
//! small real deployment would register. With `check-port`, every instance
//! is at 127.0.0.1 on that port with an HTTP check of `/health` every 10 s
//! (`integration/bench/checks.sh`).
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use futures::StreamExt;
use signpost_integration::probe::resolves_to;

fn address(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        (i / 62_500 + 1) as u8,
        (i / 250 % 250) as u8,
        (i % 250 + 1) as u8,
    )
}

fn name(i: u32) -> (String, String) {
    (format!("s{}", i / 2), format!("i{}", i % 2))
}

fn usage() -> ! {
    eprintln!(
        "usage: scale_load register <api-url> <token> <from> <to> [in-flight] [check-port]\n       scale_load wait <dns-addr> <index> <timeout-seconds>"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], n: usize) -> T {
    match args.get(n).map(|s| s.parse()) {
        Some(Ok(v)) => v,
        _ => usage(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("register") => register(
            args.get(2).cloned().unwrap_or_else(|| usage()),
            args.get(3).cloned().unwrap_or_else(|| usage()),
            arg(&args, 4),
            arg(&args, 5),
            if args.len() > 6 { arg(&args, 6) } else { 32 },
            if args.len() > 7 {
                Some(arg(&args, 7))
            } else {
                None
            },
        ),
        Some("wait") => wait(arg(&args, 2), arg(&args, 3), arg(&args, 4)),
        _ => usage(),
    }
}

fn register(
    api: String,
    token: String,
    from: u32,
    to: u32,
    in_flight: usize,
    check_port: Option<u16>,
) {
    let api = api.trim_end_matches('/').to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let http = reqwest::Client::new();
    let started = Instant::now();
    // (completed at, latency) in completion order.
    let done: Vec<(Duration, Duration, bool)> = rt.block_on(
        futures::stream::iter(from..to)
            .map(|i| {
                let (svc, id) = name(i);
                let body = match check_port {
                    None => serde_json::json!({
                        "address": address(i).to_string(),
                        "port": 8080,
                        "tags": ["v1"],
                        "meta": {"version": "1.4.2", "zone": "a"},
                    }),
                    Some(port) => serde_json::json!({
                        "address": "127.0.0.1",
                        "port": port,
                        "check": {
                            "http": format!("http://127.0.0.1:{port}/health"),
                            "interval": "10s",
                            "timeout": "2s",
                        },
                    }),
                };
                let req = http
                    .put(format!("{api}/v1/services/{svc}/instances/{id}"))
                    .bearer_auth(&token)
                    .json(&body);
                async move {
                    let sent = Instant::now();
                    let ok = match req.send().await {
                        Ok(r) if r.status().is_success() => true,
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            eprintln!("{svc}/{id}: {status} {text}");
                            false
                        }
                        Err(e) => {
                            eprintln!("{svc}/{id}: {e}");
                            false
                        }
                    };
                    (started.elapsed(), sent.elapsed(), ok)
                }
            })
            .buffer_unordered(in_flight)
            .collect(),
    );
    let failures = done.iter().filter(|d| !d.2).count();
    let tail = &done[done.len() * 9 / 10..];
    let (Some(first), Some(last)) = (tail.first(), tail.last()) else {
        println!("0 0 0 {failures}");
        return;
    };
    let span = (last.0 - first.0).as_secs_f64();
    let rate = if span > 0.0 {
        (tail.len() - 1) as f64 / span
    } else {
        0.0
    };
    let mut lat: Vec<Duration> = tail.iter().map(|d| d.1).collect();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    println!("{rate:.0} {:.1} {:.1} {failures}", pct(0.5), pct(0.99));
    if failures > 0 {
        std::process::exit(1);
    }
}

fn wait(dns: SocketAddr, index: u32, timeout: u64) {
    let started = Instant::now();
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let name = format!("{}.xingren.host", name(index).0);
    let addr = address(index);
    let mut id = 0u16;
    while started.elapsed() < Duration::from_secs(timeout) {
        id = id.wrapping_add(1);
        if resolves_to(&sock, dns, (id, &name), addr, Duration::from_millis(20)) {
            println!("{}", started.elapsed().as_millis());
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!("{name} did not answer {addr} within {timeout} s");
    std::process::exit(1);
}
