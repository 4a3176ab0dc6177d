//! containerd-stargz-grpc: serves the stargz snapshotter to containerd over a unix socket.
//!
//! Built on `clap` (flags), `tokio` (runtime, signals), `tracing-subscriber` (logs),
//! `toml` (config), `hyper` and `prometheus-client` (metrics endpoint) and `anyhow`, with the workspace's `snapshotter`, `fs` and `registry`.

mod config;
mod fuse_manager;
mod metrics;
mod preopen;
mod remote;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use snapshotter::{Options, Snapshotter};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::DaemonConfig;

const DEFAULT_CONFIG: &str = "/etc/containerd-stargz-grpc/config.toml";

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

/// Tells systemd we are ready when it asked (Type=notify).
fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let res = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let p = path.to_string_lossy();
        if let Some(abs) = p.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())?;
            sock.send_to_addr(b"READY=1", &addr)?;
        } else {
            sock.send_to(b"READY=1", &*p)?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

fn main() -> Result<()> {
    remote::keep_large_buffers_mapped();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let explicit = args.config != std::path::Path::new(DEFAULT_CONFIG);
    let cfg = DaemonConfig::load(&args.config, explicit)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run(args, cfg))
}

async fn run(args: Args, cfg: DaemonConfig) -> Result<()> {
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    let metrics = metrics::DaemonMetrics::default();
    let metrics_address = cfg.metrics_address.clone().filter(|_| !cfg.no_prometheus);
    if cfg.metrics_address.is_some() && cfg.no_prometheus {
        tracing::info!("no_prometheus is set; metrics_address ignored");
    }
    let (remote, fuse_manager) = fuse_manager::daemon_remote(
        cfg,
        &args.address,
        &args.root,
        &args.config,
        &args.log_level,
        &metrics,
    )
    .await;
    if let Some(addr) = &metrics_address {
        // With a FUSE manager the layers, their fetches and the cache live there.
        let source = match &fuse_manager {
            Some(m) => metrics::Source::Manager(m.clone()),
            None => metrics::Source::Local(metrics.clone()),
        };
        metrics::serve(addr, source).await?;
    }
    let sn = Arc::new(Snapshotter::open(
        Options::new(args.root.join("snapshotter")),
        remote,
    )?);
    match sn.restore_remote().await {
        Ok(n) => tracing::info!(restored = n, "remote snapshots restored"),
        Err(e) => tracing::warn!(error = %e, "restoring remote snapshots failed"),
    }
    let listener = snapshotter::bind(&args.address)?;
    tracing::info!(address = %args.address.display(), root = %args.root.display(), "serving");
    sd_notify_ready();

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
    let server = tokio::spawn(snapshotter::serve(sn.clone(), listener, async move {
        let _ = rx.await;
    }));
    let unmount = tokio::select! {
        _ = sigint.recv() => { tracing::info!("SIGINT: unmounting remote snapshots and exiting"); true }
        _ = sigterm.recv() => { tracing::info!("SIGTERM: exiting, mounts stay"); false }
    };
    let _ = tx.send(unmount);
    if unmount {
        sn.unmount_all().await?;
        if let Some(m) = &fuse_manager {
            if let Err(e) = m.shutdown().await {
                tracing::warn!(error = %format!("{e:#}"), "stopping the FUSE manager failed");
            }
        }
    }
    // In-flight requests get a moment; containerd retries on its side.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    let _ = std::fs::remove_file(&args.address);
    Ok(())
}
