//! Shared pieces of the `ctr-remote` and `containerd-stargz-grpc` binaries: logging
//! set-up and the blob-level commands.

pub mod blob;
pub mod image;
pub mod mount;

/// Starts `tracing` output on stderr at `level` (overridden by `RUST_LOG`).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
