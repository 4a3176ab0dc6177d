//! stargz-store: serves eStargz layers lazily to containers/storage as an additional
//! layer store mounted at the given directory.

use std::path::PathBuf;

use clap::Parser;
use stargz_store::config::DEFAULT_CONFIG;
use stargz_store::daemon::{self, DEFAULT_ROOT};

#[derive(Parser, Debug)]
#[command(
    name = "stargz-store",
    version,
    about = "Additional layer store for Podman, CRI-O and Buildah with lazy pulling of eStargz"
)]
struct Args {
    /// Path to the configuration file (a missing default file means defaults).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Logging level: trace, debug, info, warn, error (fatal and panic mean error), or
    /// a tracing filter directive.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Root directory: cache, layer mounts and the credential socket.
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Socket the credential hand-off listens on (default `<root>/store.sock`).
    #[arg(long)]
    addr: Option<PathBuf>,
    /// Where to mount the store (the path in `additionallayerstores`).
    mountpoint: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    daemon::run_process(daemon::Options {
        mountpoint: args.mountpoint,
        config: args.config,
        root: args.root,
        addr: args.addr,
        log_level: args.log_level,
    })
}
