//! The FUSE manager process (`stargz-fuse-manager`): holds the daemon's FUSE layer
//! mounts in a process of their own, so they keep serving running containers while
//! `containerd-stargz-grpc` restarts.
//!
//! Started (detached) by the daemon when none answers on its socket; speaks the
//! protocol of [`crate::manager::protocol`]. SIGINT, SIGTERM or a `shutdown` request
//! unmount everything and exit; so does losing its socket or its root directory (an
//! administrator wiped the daemon's state while the daemon was stopped): nothing could
//! reach this manager again, and its mounts would serve a state that is gone.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use snapshotter::RemoteFs;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{config_digest, DaemonConfig};
use crate::manager::launch::PID_NAME;
use crate::manager::protocol::{Request, Response};
use crate::metrics::DaemonMetrics;
use crate::remote::{keep_large_buffers_mapped, FuseRemote};

/// The manager's command line, as [`crate::manager::launch::Launch`] passes it.
#[derive(Clone, Debug)]
pub struct Options {
    /// Unix socket to serve the manager protocol on (created 0600, directory 0700).
    pub address: PathBuf,
    /// The daemon's state directory: the chunk cache is under `stargz/`.
    pub root: PathBuf,
    /// The daemon's TOML configuration (a missing file means defaults).
    pub config: PathBuf,
    /// A level name or tracing filter directive.
    pub log_level: String,
    /// Text or JSON log lines.
    pub log_format: crate::logging::LogFormat,
}

/// Runs the manager until it is told to stop, then exits the process: fetch threads
/// of lazily detached mounts may still be busy, and nothing waits for them. Returns
/// only when it cannot start (log level, config).
pub fn run_process(opts: Options) -> Result<()> {
    keep_large_buffers_mapped();
    // Socket, pid file and cache are root's alone from the moment they exist.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Its stderr is a log file: no colours (stderr is no terminal).
    crate::logging::init(&opts.log_level, opts.log_format)?;
    let digest = config_digest(&opts.config);
    let cfg = DaemonConfig::load(&opts.config, false)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let res = runtime.block_on(run(&opts, cfg, digest));
    if let Err(e) = &res {
        tracing::error!(error = %format!("{e:#}"), "FUSE manager failed");
    }
    std::process::exit(i32::from(res.is_err()))
}

/// How often the manager checks that its socket and root directory are still there.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The identity of the socket file this manager created.
fn socket_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Why the manager should give up, if it should: nobody can reach it any more. A wiped
/// root keeps the directories of busy mount points, so its own pid file is the sign.
fn orphaned(args: &Options, socket: Option<(u64, u64)>) -> Option<&'static str> {
    if !args.root.is_dir() {
        return Some("its root directory is gone");
    }
    let pid = std::fs::read_to_string(args.root.join(PID_NAME)).unwrap_or_default();
    if pid.trim() != std::process::id().to_string() {
        return Some("its pid file was removed or replaced");
    }
    if socket_id(&args.address) != socket {
        return Some("its socket was removed or replaced");
    }
    None
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

async fn run(args: &Options, cfg: DaemonConfig, digest: String) -> Result<()> {
    // Bound first: a second manager gives up before it touches anything.
    let listener = bind(&args.address).await?;
    let metrics = DaemonMetrics::default();
    // Credentials the daemon captured from CRI pulls, read from the file it keeps.
    let cri = cfg.cri_credentials(&args.root);
    let remote = cfg.keychain(cri).and_then(|keychain| {
        FuseRemote::new(
            cfg.fs,
            cfg.registry,
            keychain,
            &args.root.join("stargz"),
            &metrics,
            (cfg.learned.clone(), &args.root),
        )
    });
    let remote = match remote {
        Ok(r) => Arc::new(r),
        Err(e) => {
            let _ = std::fs::remove_file(&args.address);
            return Err(e);
        }
    };
    let socket = socket_id(&args.address);
    let pid_file = args.root.join(PID_NAME);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = watch.tick() => {
                if let Some(why) = orphaned(args, socket) {
                    let failed = remote.unmount_all().await;
                    tracing::warn!(reason = why, root = %args.root.display(),
                        address = %args.address.display(), failed,
                        "orphaned: unmounted everything; exiting");
                    break;
                }
            }
        }
    }
    tracing::info!("exiting");
    // A socket or pid file another manager has put in their place is not ours to remove.
    if socket_id(&args.address) == socket {
        let _ = std::fs::remove_file(&args.address);
    }
    let ours = std::fs::read_to_string(&pid_file)
        .is_ok_and(|t| t.trim() == std::process::id().to_string());
    if ours {
        let _ = std::fs::remove_file(&pid_file);
    }
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
            Response::from_result(Err(remote_layer::MountError::Other(format!(
                "bad request: {e}"
            )))),
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
    match req {
        Request::Status => (
            Response {
                pid: Some(std::process::id()),
                config_digest: Some(digest.to_string()),
                state: Some(remote.state_counts()),
                ..Response::ok()
            },
            false,
        ),
        Request::Mount { mountpoint, layer } => {
            let res = remote.mount(&mountpoint, &layer).await;
            match &res {
                Ok(()) => tracing::info!(mountpoint = %mountpoint.display(), "mounted"),
                Err(e) => tracing::info!(mountpoint = %mountpoint.display(), kind = e.kind(),
                    error = %e, "mount failed"),
            }
            (Response::from_result(res), false)
        }
        Request::Check { mountpoint } => (
            Response::from_result(remote.check(&mountpoint).await),
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
                Err(remote_layer::MountError::Other(format!(
                    "{failed} unmounts failed"
                )))
            };
            (Response::from_result(res), true)
        }
    }
}
