//! Heap held per instance by a DNS replica's data: the catalog state, its
//! snapshot and the answer index, counted by a global allocator that tracks
//! live bytes and live allocations. It prints figures instead of asserting
//! them (RSS goals are measured by `integration/bench/scale.sh`); run with
//!
//! ```text
//! cargo test --release -p signpost-dns --test memory -- --ignored --nocapture
//! ```
//!
//! The catalog is the benchmark's: services of two instances, each with a
//! tag and two meta keys.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use common::{Fill, instance, test_config};
use signpost_control_plane::catalog::Catalog;
use signpost_control_plane::store::Keys;
use signpost_dns::DnsServer;

/// The system allocator, counting what is live.
struct Counting;

static BYTES: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` with the same arguments; the
// counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> (isize, isize) {
    (
        BYTES.load(Ordering::Relaxed),
        BLOCKS.load(Ordering::Relaxed),
    )
}

fn report(what: &str, before: (isize, isize), after: (isize, isize), n: usize) {
    let bytes = (after.0 - before.0) as f64 / n as f64;
    let blocks = (after.1 - before.1) as f64 / n as f64;
    // glibc: 8 bytes of header per chunk, sizes rounded up to 16, 32 at least.
    println!("{what:<28} {bytes:7.0} B/instance in {blocks:5.2} allocations");
}

#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn heap_per_instance() {
    const N: usize = 20_000;
    let mut fill = Fill::default();
    let start = live();
    for i in 0..N {
        let mut inst = instance(
            &format!("s{}", i / 2),
            &format!("i{}", i % 2),
            &format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
            8080,
        );
        inst.tags = vec!["v1".into()];
        inst.meta.insert("version".into(), "1.4.2".into());
        inst.meta.insert("zone".into(), "a".into());
        fill.put(&inst);
    }
    let state = live();
    report("catalog state", start, state, N);
    let catalog = Catalog::new(Keys::default());
    catalog.publish(&mut fill.state);
    let snapshot = live();
    report("+ snapshot", state, snapshot, N);
    let server = DnsServer::new(test_config(), catalog.clone()).expect("server starts");
    let index = live();
    report("+ index", snapshot, index, N);
    report("all", start, index, N);
    drop(server);
}
