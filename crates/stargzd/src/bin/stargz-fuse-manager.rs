//! stargz-fuse-manager: holds the daemon's FUSE layer mounts in a process of their own,
//! so they keep serving running containers while `containerd-stargz-grpc` restarts.

use std::path::PathBuf;

use clap::Parser;
use stargzd::fuse_manager as server;
use stargzd::logging::{go_style_args, LogFormat, VERSION};

#[derive(Parser, Debug)]
#[command(
    name = "stargz-fuse-manager",
    version = VERSION,
    about = "Holds stargz FUSE layer mounts across restarts of containerd-stargz-grpc"
)]
struct Args {
    /// Unix socket to serve the manager protocol on (created 0600, directory 0700).
    #[arg(long)]
    address: PathBuf,
    /// The daemon's state directory: the chunk cache is under `stargz/`.
    #[arg(long)]
    root: PathBuf,
    /// The daemon's TOML configuration (a missing file means defaults).
    #[arg(long)]
    config: PathBuf,
    /// trace, debug, info, warn, error, fatal or panic (or a tracing filter directive).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log lines as text or as JSON objects (the reference's format).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
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
    server::run_process(server::Options {
        address: args.address,
        root: args.root,
        config: args.config,
        log_level: args.log_level,
        log_format: args.log_format,
    })
}
