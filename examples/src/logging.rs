//! Log set-up shared by the example binaries.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sends plain log lines to stderr, level from `RUST_LOG` (default `info`,
/// so a demo shows one line per request without any set-up).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `try_init`: a second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in journald or
        // `kubectl logs`.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// This host's name (a pod's name in Kubernetes), used as the default
/// instance id; `unknown` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}
