//! The README's main-job command runs to completion.

use std::process::Command;
use std::time::{Duration, Instant};

use signpost_integration::signpost_bin;

#[test]
fn demo_script_runs_to_completion() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = signpost_bin()
        .parent()
        .expect("the binary has a directory")
        .to_path_buf();
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(root.join("examples/demo.sh"))
        .arg("--non-interactive")
        .env("SIGNPOST_DEMO_BIN_DIR", &bin_dir)
        .env("SIGNPOST_ADDR", "")
        .output()
        .expect("run examples/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed after {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        started.elapsed()
    );
    assert!(
        stdout.contains("demo finished: all steps passed"),
        "{stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(300));
}
