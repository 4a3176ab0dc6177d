//! The daemon (`containerd-stargz-grpc`): serves the stargz snapshotter to containerd
//! over a unix socket, with layers mounted by a FUSE manager, in this process, or not
//! at all.
//!
//! Built on `tokio` (runtime, signals), `tracing-subscriber` (logs), `toml` (config),
//! `hyper` and `prometheus-client` (metrics endpoint) and `anyhow`, with the
//! workspace's `snapshotter`, `fs`, `registry` and `remote-layer`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use remote_layer::{MountError, RemoteLayer};
use snapshotter::{NoRemote, RemoteFs, Served, Snapshotter};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::DaemonConfig;
use crate::cri::CriProxy;
use crate::fullpull::{FullPull, Verification};
use crate::logging::LogFormat;
use crate::manager::client::ManagerClient;
use crate::manager::launch::Launch;
use crate::metrics::{self, DaemonMetrics};
use crate::remote::{keep_large_buffers_mapped, FuseRemote};

/// The configuration file read when `--config` is not given; missing, it means defaults.
pub const DEFAULT_CONFIG: &str = "/etc/containerd-stargz-grpc/config.toml";

/// The daemon's command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Unix socket to serve the Snapshots API on.
    pub address: PathBuf,
    /// TOML configuration file (a missing [`DEFAULT_CONFIG`] means defaults).
    pub config: PathBuf,
    /// State directory: metadata, snapshots and caches.
    pub root: PathBuf,
    /// trace, debug, info, warn, error, fatal or panic (or a tracing filter directive).
    pub log_level: String,
    /// Text or JSON log lines.
    pub log_format: LogFormat,
}

/// Sets up logging and the runtime and serves until SIGINT or SIGTERM.
pub fn run_process(opts: Options) -> Result<()> {
    keep_large_buffers_mapped();
    crate::logging::init(&opts.log_level, opts.log_format)?;
    let explicit = opts.config != Path::new(DEFAULT_CONFIG);
    let cfg = DaemonConfig::load(&opts.config, explicit)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run(opts, cfg))
}

/// What the daemon runs with: FUSE layers in a FUSE manager process or in this one,
/// or none when disabled or unavailable.
pub enum DaemonRemote {
    Manager(Arc<ManagerClient>),
    Fuse(Box<FuseRemote>),
    Disabled(NoRemote),
}

impl RemoteFs for DaemonRemote {
    async fn mount(&self, mp: &Path, layer: &RemoteLayer) -> Result<(), MountError> {
        match self {
            DaemonRemote::Manager(m) => m.mount(mp, layer).await,
            DaemonRemote::Fuse(f) => f.mount(mp, layer).await,
            DaemonRemote::Disabled(n) => n.mount(mp, layer).await,
        }
    }
    async fn check(&self, mp: &Path) -> Result<(), MountError> {
        match self {
            DaemonRemote::Manager(m) => m.check(mp).await,
            DaemonRemote::Fuse(f) => f.check(mp).await,
            DaemonRemote::Disabled(n) => n.check(mp).await,
        }
    }
    async fn unmount(&self, mp: &Path) -> Result<(), MountError> {
        match self {
            DaemonRemote::Manager(m) => m.unmount(mp).await,
            DaemonRemote::Fuse(f) => f.unmount(mp).await,
            DaemonRemote::Disabled(n) => n.unmount(mp).await,
        }
    }
    async fn mounted(&self) -> Result<Vec<PathBuf>, MountError> {
        match self {
            DaemonRemote::Manager(m) => m.mounted().await,
            // In-process mounts never outlive a restart.
            DaemonRemote::Fuse(_) | DaemonRemote::Disabled(_) => Ok(Vec::new()),
        }
    }
}

/// The daemon's [`DaemonRemote`] with the layers that fall back to containerd's pull
/// counted (`stargz_layer_fallbacks_total`), and the layers that cannot be mounted
/// lazily downloaded and unpacked here when `full_pull` is on.
pub struct Counted {
    pub remote: DaemonRemote,
    pub fallbacks: metrics::FallbackMetrics,
    pub full: Option<Arc<FullPull>>,
}

impl RemoteFs for Counted {
    async fn provide(&self, dir: &Path, layer: &RemoteLayer) -> Result<Served, MountError> {
        let Some(full) = &self.full else {
            return self
                .remote
                .mount(dir, layer)
                .await
                .map(|()| Served::Mounted);
        };
        full.ahead(layer);
        // Refused lazily anyway (no TOC digest to check it against): no round trip to
        // the registry to learn so.
        if layer.toc_digest.is_none() && full.verification().refuses_without_toc(layer) {
            return full.fill(dir, layer).await.map(|()| Served::Filled);
        }
        match self.remote.mount(dir, layer).await {
            Ok(()) => Ok(Served::Mounted),
            Err(e @ (MountError::NotEstargz(_) | MountError::Unverifiable(_))) => {
                tracing::info!(layer = %layer.digest, kind = e.kind(), error = %e,
                    "layer cannot be mounted lazily; pulling it in full");
                full.fill(dir, layer).await.map(|()| Served::Filled)
            }
            Err(e) => Err(e),
        }
    }
    async fn mount(&self, mp: &Path, layer: &RemoteLayer) -> Result<(), MountError> {
        self.remote.mount(mp, layer).await
    }
    async fn check(&self, mp: &Path) -> Result<(), MountError> {
        self.remote.check(mp).await
    }
    async fn unmount(&self, mp: &Path) -> Result<(), MountError> {
        self.remote.unmount(mp).await
    }
    async fn mounted(&self) -> Result<Vec<PathBuf>, MountError> {
        self.remote.mounted().await
    }
    fn fell_back(&self, reason: &MountError) {
        self.fallbacks.record(reason);
    }
}

/// What the daemon mounts layers with, per config: nothing, a FUSE manager (the
/// default), or FUSE sessions inside the daemon (`[fuse_manager] enable = false`, or
/// when the manager cannot be started). The manager client is returned too, so
/// SIGINT can stop it.
pub async fn daemon_remote(
    cfg: DaemonConfig,
    opts: &Options,
    metrics: &DaemonMetrics,
    cri: Option<Arc<registry::CriKeychain>>,
) -> (DaemonRemote, Option<Arc<ManagerClient>>) {
    if cfg.disable_remote_snapshots {
        tracing::info!("remote snapshots disabled by config");
        return (DaemonRemote::Disabled(NoRemote), None);
    }
    if cfg.fuse_manager.enable {
        let mut launch = Launch::new(
            &cfg.fuse_manager,
            &opts.address,
            &opts.root,
            &opts.config,
            &opts.log_level,
        );
        launch.log_format = opts.log_format;
        let client = Arc::new(ManagerClient::new(launch));
        match client.ensure_running().await {
            Ok(pid) => {
                tracing::info!(pid, "layers are mounted by the FUSE manager");
                client.warn_if_config_changed(&opts.config).await;
                return (DaemonRemote::Manager(client.clone()), Some(client));
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"),
                "FUSE manager unavailable; mounting in this process (mounts end with it)"),
        }
    }
    let remote = cfg.keychain(cri).and_then(|keychain| {
        FuseRemote::new(
            cfg.fs,
            cfg.registry,
            keychain,
            &opts.root.join("stargz"),
            metrics,
            (cfg.learned.clone(), &opts.root),
        )
    });
    match remote {
        Ok(f) => (DaemonRemote::Fuse(Box::new(f)), None),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "remote snapshots unavailable; every layer will be downloaded");
            (DaemonRemote::Disabled(NoRemote), None)
        }
    }
}

/// The daemon's full pulls, unless `full_pull = false` or remote snapshots are off
/// (then containerd pulls every layer). They run in this process: it owns the
/// snapshot directories the layers are moved into.
fn full_pull(
    cfg: &DaemonConfig,
    opts: &Options,
    metrics: &DaemonMetrics,
    cri: Option<Arc<registry::CriKeychain>>,
) -> Option<Arc<FullPull>> {
    if !cfg.full_pull || cfg.disable_remote_snapshots {
        return None;
    }
    let verification = Verification {
        disabled: cfg.fs.disable_verification,
        allow_none: cfg.fs.allow_no_verification,
    };
    let res = cfg.keychain(cri).and_then(|keychain| {
        let client = registry::Client::with_metrics(
            cfg.registry.clone(),
            keychain,
            metrics.registry.clone(),
        )?;
        client.warm_up();
        Ok(FullPull::new(
            client,
            &opts.root.join("fullpull"),
            verification,
        )?)
    });
    match res {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "full pulls unavailable; containerd pulls layers that are not eStargz");
            None
        }
    }
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

async fn run(args: Options, cfg: DaemonConfig) -> Result<()> {
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    let metrics = metrics::DaemonMetrics::default();
    let metrics_address = cfg.metrics_address.clone().filter(|_| !cfg.no_prometheus);
    if cfg.metrics_address.is_some() && cfg.no_prometheus {
        tracing::info!("no_prometheus is set; metrics_address ignored");
    }
    let allow_invalid_mounts_on_restart = cfg.allow_invalid_mounts_on_restart;
    // One store: this process records into it, and reads it when it mounts layers
    // itself; a FUSE manager reads the file it is kept in.
    let cri_store = cfg.cri_credentials(&args.root);
    let cri = match &cri_store {
        Some(store) => {
            let backend = cfg.cri_keychain.image_service_path();
            tracing::info!(backend = %backend.display(), "CRI image service proxied (cri keychain)");
            Some(Arc::new(CriProxy::new(&backend, store.clone())?))
        }
        None => None,
    };
    let cri_listen = cfg
        .cri_keychain
        .listen_path
        .clone()
        .filter(|p| !p.as_os_str().is_empty() && *p != args.address);
    let full = full_pull(&cfg, &args, &metrics, cri_store.clone());
    let (remote, fuse_manager) = daemon_remote(cfg, &args, &metrics, cri_store).await;
    if let Some(addr) = &metrics_address {
        // With a FUSE manager the layers, their fetches and the cache live there.
        let source = match &fuse_manager {
            Some(m) => metrics::Source::Manager(m.clone(), metrics.fallbacks.clone()),
            None => metrics::Source::Local(metrics.clone()),
        };
        metrics::serve(addr, source).await?;
    }
    let mut sn_opts = snapshotter::Options::new(args.root.join("snapshotter"));
    sn_opts.allow_invalid_mounts_on_restart = allow_invalid_mounts_on_restart;
    let remote = Counted {
        remote,
        fallbacks: metrics.fallbacks.clone(),
        full,
    };
    let sn = Arc::new(Snapshotter::open(sn_opts, remote)?);
    // As the reference: a remote snapshot that cannot be mounted again stops the start
    // unless allow_invalid_mounts_on_restart says to go on without it.
    let restored = sn
        .restore_remote()
        .await
        .context("restoring remote snapshots")?;
    tracing::info!(restored, "remote snapshots restored");
    let listener = snapshotter::bind(&args.address)?;
    let mut routes =
        tonic::service::Routes::new(snapshotter::Service::new(sn.clone()).into_server());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut cri_server = None;
    if let Some(p) = &cri {
        match &cri_listen {
            None => routes = routes.add_service(p.v1()).add_service(p.v1alpha2()),
            Some(path) => {
                let l = snapshotter::bind(path)?;
                tracing::info!(address = %path.display(), "serving the CRI image service");
                let own = tonic::service::Routes::new(p.v1()).add_service(p.v1alpha2());
                cri_server = Some((path.clone(), tokio::spawn(serve(own, l, stop_rx.clone()))));
            }
        }
    }
    tracing::info!(address = %args.address.display(), root = %args.root.display(), "serving");
    sd_notify_ready();

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let server = tokio::spawn(serve(routes, listener, stop_rx));
    // SIGTERM leaves the mounts to a FUSE manager that keeps serving them; mounts of
    // this process would die with it, so they are unmounted, as the reference does.
    let unmount = tokio::select! {
        _ = sigint.recv() => { tracing::info!("SIGINT: unmounting remote snapshots and exiting"); true }
        _ = sigterm.recv() => {
            if fuse_manager.is_some() {
                tracing::info!("SIGTERM: exiting, mounts stay with the FUSE manager");
                false
            } else {
                tracing::info!("SIGTERM: unmounting remote snapshots (no FUSE manager holds them) and exiting");
                true
            }
        }
    };
    let _ = stop_tx.send(true);
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
    if let Some((path, task)) = cri_server {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Serves gRPC `routes` on `listener` until `stop` turns true.
async fn serve(
    routes: tonic::service::Routes,
    listener: tokio::net::UnixListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let res = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "gRPC server failed");
    }
}
