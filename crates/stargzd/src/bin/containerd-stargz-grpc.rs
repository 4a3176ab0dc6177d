//! containerd-stargz-grpc: serves the stargz snapshotter to containerd over a unix socket.

use std::path::PathBuf;

use clap::Parser;
use stargzd::daemon::{self, DEFAULT_CONFIG};

#[derive(Parser, Debug)]
#[command(
    name = "containerd-stargz-grpc",
    version,
    about = "Stargz remote snapshotter for containerd"
)]
struct Args {
    /// Unix socket to serve the Snapshots API on.
    #[arg(
        long,
        default_value = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
    )]
    address: PathBuf,
    /// TOML configuration file (a missing default file means defaults).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// State directory: metadata, snapshots and caches.
    #[arg(long, default_value = "/var/lib/containerd-stargz-grpc")]
    root: PathBuf,
    /// trace, debug, info, warn or error (or a tracing filter directive).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    daemon::run_process(daemon::Options {
        address: args.address,
        config: args.config,
        root: args.root,
        log_level: args.log_level,
    })
}
