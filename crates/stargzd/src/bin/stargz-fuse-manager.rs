//! stargz-fuse-manager: holds the daemon's FUSE layer mounts in a process of their own,
//! so they keep serving running containers while `containerd-stargz-grpc` restarts.

use std::path::PathBuf;

use clap::Parser;
use stargzd::fuse_manager as server;

#[derive(Parser, Debug)]
#[command(
    name = "stargz-fuse-manager",
    version,
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
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    server::run_process(server::Options {
        address: args.address,
        root: args.root,
        config: args.config,
        log_level: args.log_level,
    })
}
