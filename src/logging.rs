//! Logging set-up: plain or JSON lines on stderr, level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; `default_level` applies when `RUST_LOG`
/// is unset.
pub fn init(format: Format, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        Format::Plain => builder.try_init(),
        Format::Json => builder.json().try_init(),
    };
    if let Err(err) = result {
        eprintln!("warning: logging not initialised: {err}");
    }
}
