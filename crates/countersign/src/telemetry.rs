//! Structured logs: human-readable by default, JSON with `--log-format json`; level from `RUST_LOG`
//! (default `info`). Secrets never reach a log line; payloads only at debug.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
