//! A DNS server over a synthetic catalog, for load tests (dnsperf).
//!
//! ```text
//! cargo run --release -p signpost-dns --example bench_server -- 127.0.0.1:5399 50 20
//! dnsperf -s 127.0.0.1 -p 5399 -d queries.txt -l 10
//! ```
//! Arguments: listen address, number of services, instances per service.
//! Services are `svc0`..`svcN`, instances `i0`..`iM` on 10.x.y.z.

use std::time::SystemTime;

use signpost_control_plane::catalog::{Catalog, CatalogState};
use signpost_control_plane::model::{Instance, InstanceId, ServiceName};
use signpost_control_plane::store::{KeyValue, Keys};
use signpost_dns::{DnsConfig, DnsServer};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:5399".into())
        .parse()?;
    let services: u32 = args.next().map_or(Ok(50), |s| s.parse())?;
    let per_service: u32 = args.next().map_or(Ok(20), |s| s.parse())?;

    let keys = Keys::default();
    let mut state = CatalogState::new();
    let mut rev = 0;
    for s in 0..services {
        for i in 0..per_service {
            rev += 1;
            let n = s * per_service + i;
            let inst = Instance {
                service: ServiceName::new(&format!("svc{s}"))?,
                id: InstanceId::new(&format!("i{i}"))?,
                address: format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255).parse()?,
                port: 8080,
                ports: [("http".into(), 8081)].into_iter().collect(),
                tags: vec!["v1".into()],
                meta: Default::default(),
                weight: 100,
                ttl: None,
                check: None,
                registered: SystemTime::now(),
            };
            let kv = KeyValue {
                key: keys.instance(&inst.service, &inst.id),
                value: serde_json::to_vec(&inst)?,
                create_revision: rev,
                mod_revision: rev,
                lease: None,
            };
            state.put(&keys, &kv);
        }
    }
    let catalog = Catalog::new(keys);
    catalog.publish(&mut state);
    let server = DnsServer::new(
        DnsConfig {
            listen,
            ..DnsConfig::default()
        },
        catalog,
    )?;
    eprintln!(
        "serving {services} services x {per_service} instances on {}",
        server.local_addr()
    );
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    server.run(cancel).await?;
    Ok(())
}
