//! Measures registration → visible in DNS: registers one new service at a
//! time through the API and polls the DNS server over UDP until each new address
//! is in the answer. Prints the median, p99 and max.
//!
//! ```text
//! reg_latency <api-url> <dns-addr> [count] [token] [prefix]
//! ```
//!
//! Each registration is a new service `<prefix><i>` (default prefix `lat`)
//! with one instance at an address of 10.250.0.0/16.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use signpost_integration::probe::resolves_to;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: reg_latency <api-url> <dns-addr> [count] [token] [prefix]");
        std::process::exit(2);
    }
    let api = args[1].trim_end_matches('/').to_string();
    let dns: SocketAddr = match args[2].parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad dns address {:?}: {e}", args[2]);
            std::process::exit(2);
        }
    };
    let count: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(200);
    let token = args.get(4).cloned().filter(|t| !t.is_empty());
    let prefix = args.get(5).map_or("lat", String::as_str);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let http = reqwest::Client::new();
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let mut latencies = Vec::with_capacity(count as usize);
    let mut writes = Vec::with_capacity(count as usize);
    for i in 0..count {
        let addr = Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250) as u8 + 1);
        let body = serde_json::json!({"address": addr.to_string(), "port": 80});
        let mut req = http
            .put(format!("{api}/v1/services/{prefix}{i}/instances/l1"))
            .json(&body);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        let started = Instant::now();
        let resp = rt.block_on(req.send());
        match resp {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => panic!("register failed: {}", r.status()),
            Err(e) => panic!("register failed: {e}"),
        }
        writes.push(started.elapsed());
        let deadline = started + Duration::from_secs(5);
        let name = format!("{prefix}{i}.xingren.host");
        loop {
            if resolves_to(
                &sock,
                dns,
                (i as u16, &name),
                addr,
                Duration::from_millis(200),
            ) {
                latencies.push(started.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "l{i} not visible in DNS within 5 s"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let summary = |mut v: Vec<Duration>| {
        v.sort();
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
        format!(
            "median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        )
    };
    println!(
        "registration -> visible in DNS over {count} registrations: {}",
        summary(latencies)
    );
    // The API answers a write once etcd has committed it (an fsync of its
    // WAL) and this server's catalog shows it: most of the above when
    // etcd's disk is slow.
    println!(
        "  of which the API write (etcd commit): {}",
        summary(writes)
    );
}
