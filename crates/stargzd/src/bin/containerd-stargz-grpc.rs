//! containerd-stargz-grpc: serves the stargz snapshotter to containerd over a unix socket.

use std::path::PathBuf;

use clap::Parser;
use stargzd::daemon::{self, DEFAULT_CONFIG};
use stargzd::logging::{go_style_args, LogFormat, VERSION};

#[derive(Parser, Debug)]
#[command(
    name = "containerd-stargz-grpc",
    version = VERSION,
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
    /// trace, debug, info, warn, error, fatal or panic (or a tracing filter directive).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log lines as text or as JSON objects (the reference's format).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    // The reference's flags are Go flags: `-address` works as well as `--address`.
    let argv = go_style_args(
        std::env::args_os(),
        &[
            "address",
            "config",
            "root",
            "log-level",
            "log-format",
            "version",
            "help",
        ],
    );
    let args = Args::parse_from(argv);
    daemon::run_process(daemon::Options {
        address: args.address,
        config: args.config,
        root: args.root,
        log_level: args.log_level,
        log_format: args.log_format,
    })
}
