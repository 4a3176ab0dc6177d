//! stargz-fuse-manager: holds the daemon's FUSE layer mounts in a process of their own,
//! so they keep serving running containers while `containerd-stargz-grpc` restarts.
//!
//! Started (detached) by the daemon when none answers on its socket; speaks the
//! line-delimited JSON protocol of the `fuse_manager` module. SIGINT, SIGTERM or a
//! `shutdown` request unmount everything and exit.

// The daemon's config parsing, of which the manager reads only the fs and registry parts.
#[allow(dead_code)]
#[path = "config.rs"]
mod config;
#[allow(dead_code)]
#[path = "fuse_manager.rs"]
mod fuse_manager;
#[allow(dead_code)]
#[path = "metrics.rs"]
mod metrics;
#[path = "preopen.rs"]
mod preopen;
#[allow(dead_code)]
#[path = "remote.rs"]
mod remote;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use snapshotter::RemoteFs;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::DaemonConfig;
use crate::fuse_manager::{Request, Response, PID_NAME};
use crate::remote::FuseRemote;

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

fn main() -> Result<()> {
    remote::keep_large_buffers_mapped();
    let args = Args::parse();
    // Socket, pid file and cache are root's alone from the moment they exist.
    // SAFETY: umask(2) only sets this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its stderr is a log file.
        .with_ansi(false)
        .init();
    let digest = fuse_manager::config_digest(&args.config);
    let cfg = DaemonConfig::load(&args.config, false)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let res = runtime.block_on(run(&args, cfg, digest));
    if let Err(e) = &res {
        tracing::error!(error = %format!("{e:#}"), "FUSE manager failed");
    }
    // Fetch threads of lazily detached mounts may still be busy; do not wait for them.
    std::process::exit(i32::from(res.is_err()))
}

/// Binds `path`, unless another manager already answers there.
async fn bind(path: &Path) -> Result<UnixListener> {
    if UnixStream::connect(path).await.is_ok() {
        anyhow::bail!("another FUSE manager serves {}", path.display());
    }
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale {}", path.display()))
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn run(args: &Args, cfg: DaemonConfig, digest: String) -> Result<()> {
    // Bound first: a second manager gives up before it touches anything.
    let listener = bind(&args.address).await?;
    let metrics = metrics::DaemonMetrics::default();
    let remote = match FuseRemote::new(cfg.fs, cfg.registry, &args.root.join("stargz"), &metrics) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            let _ = std::fs::remove_file(&args.address);
            return Err(e);
        }
    };
    let pid_file = args.root.join(PID_NAME);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    tracing::info!(address = %args.address.display(), pid = std::process::id(), "serving");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                match conn {
                    Ok((stream, _)) => {
                        let (remote, stop_tx, digest) = (remote.clone(), stop_tx.clone(), digest.clone());
                        tokio::spawn(async move {
                            if let Err(e) = serve_one(stream, &remote, &digest, &stop_tx).await {
                                tracing::debug!(error = %e, "connection ended");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "accept failed"),
                }
            }
            _ = stop_rx.recv() => break,
            _ = sigint.recv() => { remote.unmount_all().await; break; }
            _ = sigterm.recv() => { remote.unmount_all().await; break; }
            _ = sighup.recv() => tracing::info!("SIGHUP ignored"),
        }
    }
    tracing::info!("exiting");
    let _ = std::fs::remove_file(&args.address);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

async fn serve_one(
    mut stream: UnixStream,
    remote: &FuseRemote,
    digest: &str,
    stop: &tokio::sync::mpsc::Sender<()>,
) -> Result<()> {
    let (rd, mut wr) = stream.split();
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let (resp, exit) = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(req, remote, digest).await,
        Err(e) => (
            Response::from_result(Err(format!("bad request: {e}"))),
            false,
        ),
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.flush().await?;
    if exit {
        // The client waits for the connection to close: keep it open until exit.
        let _ = stop.send(()).await;
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// The answer to one request, and whether the manager exits after sending it.
async fn handle(req: Request, remote: &FuseRemote, digest: &str) -> (Response, bool) {
    let none = HashMap::new();
    match req {
        Request::Status => (
            Response {
                pid: Some(std::process::id()),
                config_digest: Some(digest.to_string()),
                ..Response::ok()
            },
            false,
        ),
        Request::Mount { mountpoint, labels } => {
            let res = remote.mount(&mountpoint, &labels).await;
            match &res {
                Ok(()) => tracing::info!(mountpoint = %mountpoint.display(), "mounted"),
                Err(e) => {
                    tracing::info!(mountpoint = %mountpoint.display(), error = %e, "mount failed")
                }
            }
            (Response::from_result(res), false)
        }
        Request::Check { mountpoint } => (
            Response::from_result(remote.check(&mountpoint, &none).await),
            false,
        ),
        Request::Unmount { mountpoint } => {
            let res = remote.unmount(&mountpoint).await;
            tracing::info!(mountpoint = %mountpoint.display(), ok = res.is_ok(), "unmounted");
            (Response::from_result(res), false)
        }
        Request::List => (
            Response {
                mounts: remote.mounted().into_iter().map(|(p, _)| p).collect(),
                ..Response::ok()
            },
            false,
        ),
        Request::Metrics => (
            Response {
                text: Some(remote.metrics_text()),
                ..Response::ok()
            },
            false,
        ),
        Request::Shutdown => {
            let failed = remote.unmount_all().await;
            tracing::info!(failed, "shutdown requested: unmounted everything");
            let res = if failed == 0 {
                Ok(())
            } else {
                Err(format!("{failed} unmounts failed"))
            };
            (Response::from_result(res), true)
        }
    }
}
