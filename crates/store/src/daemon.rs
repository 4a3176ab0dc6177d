//! The `stargz-store` process: logging, configuration, credentials, the hand-off
//! socket, the layer manager, the store's FUSE mount, an optional metrics endpoint,
//! systemd readiness, and an orderly exit on SIGINT or SIGTERM.

use std::convert::Infallible;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::auth::{default_auth_files, AuthFilesKeychain, Credentials, HandoffKeychain};
use crate::config::{StoreConfig, DEFAULT_CONFIG};
use crate::manager::{LayerManager, ManagerOptions};

/// The state directory when `--root` is not given.
pub const DEFAULT_ROOT: &str = "/var/lib/stargz-store";
/// How often layers nobody uses are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the store is mounted (containers/storage's `additionallayerstores` path).
    pub mountpoint: PathBuf,
    pub config: PathBuf,
    /// State directory: cache, layer mounts, the hand-off socket.
    pub root: PathBuf,
    /// The hand-off socket (default `<root>/store.sock`).
    pub addr: Option<PathBuf>,
    pub log_level: String,
}

/// The reference's level names, as a tracing filter.
fn filter_of(level: &str) -> String {
    match level {
        "fatal" | "panic" => "error".into(),
        "warning" => "warn".into(),
        other => other.into(),
    }
}

/// Sets up logging and the runtime and serves until SIGINT or SIGTERM.
pub fn run_process(opts: Options) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter_of(&opts.log_level))
        .with_context(|| format!("--log-level {:?}", opts.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let explicit = opts.config != Path::new(DEFAULT_CONFIG);
    let cfg = StoreConfig::load(&opts.config, explicit)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(opts, cfg))
}

/// Tells systemd we are ready when it asked (Type=notify).
fn sd_notify(state: &[u8]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let res = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let p = path.to_string_lossy();
        if let Some(abs) = p.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())?;
            sock.send_to_addr(state, &addr)?;
        } else {
            sock.send_to(state, &*p)?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

async fn run(opts: Options, cfg: StoreConfig) -> Result<()> {
    // Before anything is mounted: a signal that comes early still unmounts.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    std::fs::create_dir_all(&opts.root)
        .with_context(|| format!("creating {}", opts.root.display()))?;
    std::fs::create_dir_all(&opts.mountpoint)
        .with_context(|| format!("creating {}", opts.mountpoint.display()))?;

    let handoff = Arc::new(HandoffKeychain::default());
    let addr = opts
        .addr
        .clone()
        .unwrap_or_else(|| opts.root.join("store.sock"));
    crate::control::serve(&addr, handoff.clone())?;

    let files = AuthFilesKeychain::new(default_auth_files());
    tracing::info!(files = ?files.files(), "registry credentials from auth files");
    let mut others: Vec<Arc<dyn registry::Keychain>> = Vec::new();
    if let Some(k) = cfg.kubeconfig_keychain.start() {
        tracing::info!("registry credentials from Kubernetes secrets (kubeconfig keychain)");
        others.push(Arc::new(k));
    }
    let credentials = Arc::new(Credentials {
        handoff,
        files,
        others,
    });

    let fs_metrics = fs::FsMetrics::default();
    let registry_metrics = registry::RegistryMetrics::default();
    if let Some(address) = &cfg.metrics_address {
        serve_metrics(address, fs_metrics.clone(), registry_metrics.clone()).await?;
    }
    let rt = tokio::runtime::Handle::current();
    let manager = LayerManager::new(
        rt.clone(),
        ManagerOptions {
            root: opts.root.clone(),
            fs: cfg.fs,
            registry: cfg.registry,
            credentials,
            metrics: fs_metrics,
            registry_metrics,
        },
    )?;
    let storefs = crate::storefs::StoreFs::new(manager.clone(), rt);
    let mountpoint = opts.mountpoint.clone();
    let mount = tokio::task::spawn_blocking(move || crate::storefs::mount(storefs, &mountpoint))
        .await?
        .with_context(|| format!("mounting the store at {}", opts.mountpoint.display()))?;
    tracing::info!(mountpoint = %opts.mountpoint.display(), root = %opts.root.display(), "serving");
    sd_notify(b"READY=1");

    let sweeper = {
        let manager = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let m = manager.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || m.sweep()).await {
                    if n > 0 {
                        tracing::info!(layers = n, "unused layers unmounted");
                    }
                }
            }
        })
    };

    tokio::select! {
        _ = sigint.recv() => tracing::info!("SIGINT: exiting"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: exiting"),
    }
    sd_notify(b"STOPPING=1");
    sweeper.abort();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = mount.unmount() {
            tracing::warn!(error = %e, "unmounting the store failed");
        }
        manager.shutdown();
    })
    .await?;
    let _ = std::fs::remove_file(&addr);
    Ok(())
}

/// Serves the `fs` and `registry` metrics as Prometheus text on `GET /metrics`.
async fn serve_metrics(
    address: &str,
    fs_metrics: fs::FsMetrics,
    registry_metrics: registry::RegistryMetrics,
) -> Result<()> {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("metrics_address {address:?}: binding"))?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics on /metrics");
    let text = Arc::new(move || {
        let mut reg = prometheus_client::registry::Registry::default();
        fs_metrics.register(&mut reg);
        registry_metrics.register(&mut reg);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let text = text.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let text = text.clone();
                    async move {
                        let mut r = if req.uri().path() == "/metrics" {
                            Response::new(Full::new(Bytes::from(text())))
                        } else {
                            Response::new(Full::new(Bytes::from_static(b"not found\n")))
                        };
                        if req.uri().path() != "/metrics" {
                            *r.status_mut() = StatusCode::NOT_FOUND;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}
