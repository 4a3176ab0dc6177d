//! Mounting a layer: the FUSE session on its own threads, the worker runtime for reads
//! that must fetch, prefetch before the mount is reported ready, background fetch after,
//! and unmounting when the handle goes away.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, SessionACL};
use tracing::{info, warn};

use crate::cache::ChunkCache;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetcher::Fetcher;
use crate::fusefs::{is_mounted, FuseLayer, FuseOpts};
use crate::layer::{Layer, LayerDesc};
use crate::metrics::FsMetrics;

/// FUSE request threads per mount.
const FUSE_THREADS: usize = 4;
/// Upper bound on reads waiting for fetches at once, per mount.
const MAX_FETCH_THREADS: usize = 64;
/// Longest `unmount` waits for the FUSE session to end.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

/// The chunk cache a configuration asks for: on disk under `dir`, or memory only.
pub fn cache_from_config(cfg: &Config, dir: &Path) -> Result<Arc<ChunkCache>> {
    Ok(Arc::new(build_cache(cfg, dir)?))
}

/// [`cache_from_config`], counting hits and misses into `metrics`.
pub fn observed_cache_from_config(
    cfg: &Config,
    dir: &Path,
    metrics: &FsMetrics,
) -> Result<Arc<ChunkCache>> {
    Ok(Arc::new(build_cache(cfg, dir)?.with_metrics(metrics)))
}

fn build_cache(cfg: &Config, dir: &Path) -> Result<ChunkCache> {
    let mem = cfg.directory_cache.max_memory_bytes;
    let cache = if cfg.uses_directory_cache() {
        ChunkCache::directory(dir, mem)?
    } else {
        ChunkCache::memory(mem)
    };
    let quiet = Duration::from_millis(cfg.background_fetch_quiet_msec);
    Ok(cache.with_background_quiet(quiet))
}

/// Opens the layer behind `fetcher` and mounts it read-only at `mountpoint`. Returns once
/// the mount answers requests and prefetch finished (or `prefetch_timeout_sec` passed).
///
/// Blocking: call it from a plain thread or `spawn_blocking`.
pub fn mount(
    fetcher: Arc<dyn Fetcher>,
    desc: LayerDesc,
    mountpoint: &Path,
    cfg: &Config,
    cache: Arc<ChunkCache>,
) -> Result<MountHandle> {
    let layer = Arc::new(Layer::open(fetcher, desc, cfg, cache)?);
    mount_layer(layer, mountpoint, cfg)
}

/// [`mount`], with the layer's gauges and FUSE latency recorded into `metrics` until
/// the handle unmounts.
pub fn mount_observed(
    fetcher: Arc<dyn Fetcher>,
    desc: LayerDesc,
    mountpoint: &Path,
    cfg: &Config,
    cache: Arc<ChunkCache>,
    metrics: &FsMetrics,
) -> Result<MountHandle> {
    let layer = Arc::new(Layer::open(fetcher, desc, cfg, cache)?);
    mount_layer_inner(layer, mountpoint, cfg, Some(metrics))
}

/// Mounts an already opened layer.
pub fn mount_layer(layer: Arc<Layer>, mountpoint: &Path, cfg: &Config) -> Result<MountHandle> {
    mount_layer_inner(layer, mountpoint, cfg, None)
}

/// [`mount_layer`], recording the mount's FUSE operations and layer gauges into `metrics`.
pub fn mount_layer_observed(
    layer: Arc<Layer>,
    mountpoint: &Path,
    cfg: &Config,
    metrics: &FsMetrics,
) -> Result<MountHandle> {
    mount_layer_inner(layer, mountpoint, cfg, Some(metrics))
}

fn mount_layer_inner(
    layer: Arc<Layer>,
    mountpoint: &Path,
    cfg: &Config,
    metrics: Option<&FsMetrics>,
) -> Result<MountHandle> {
    // mountinfo lists canonical paths; `check` compares against this one.
    let mountpoint = &std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.into());
    let mount_err = |source: std::io::Error| Error::Mount {
        mountpoint: mountpoint.display().to_string(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(MAX_FETCH_THREADS)
        .thread_name("stargz-fetch")
        .enable_all()
        .build()
        .map_err(mount_err)?;
    let opts = FuseOpts {
        attr_ttl: Duration::from_secs(cfg.fuse.attr_timeout),
        entry_ttl: Duration::from_secs(cfg.fuse.entry_timeout),
        passthrough: cfg.fuse.passthrough,
    };
    let passthrough_opens = Arc::new(AtomicU64::new(0));
    let fs = FuseLayer::new(
        layer.clone(),
        opts,
        runtime.handle().clone(),
        passthrough_opens.clone(),
        metrics.map(FsMetrics::fuse_ops),
    );
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("stargz".into()),
        MountOption::Subtype("stargz".into()),
        MountOption::DefaultPermissions,
        MountOption::Suid,
        MountOption::Dev,
    ];
    fcfg.acl = SessionACL::All;
    fcfg.n_threads = Some(FUSE_THREADS);
    fcfg.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &fcfg).map_err(mount_err)?;
    let session = session.spawn().map_err(mount_err)?;
    info!(layer = %layer.desc().digest, mountpoint = %mountpoint.display(), "mounted");
    if let Some(m) = metrics {
        m.layer_mounted(mountpoint, &layer);
    }

    let (ready_tx, ready_rx) = mpsc::channel();
    let worker = {
        let layer = layer.clone();
        let prefetch = !cfg.noprefetch && layer.index().prefetch_end.is_some();
        let background = !cfg.no_background_fetch;
        let workers = cfg.background_workers();
        std::thread::Builder::new()
            .name("stargz-bg".into())
            .spawn(move || {
                if prefetch {
                    if let Err(e) = layer.prefetch() {
                        warn!(layer = %layer.desc().digest, error = %e, "prefetch failed");
                    }
                }
                let _ = ready_tx.send(());
                if background {
                    layer.background_fetch(workers);
                }
            })
            .map_err(mount_err)?
    };
    let handle = MountHandle {
        session: Some(session),
        layer,
        mountpoint: mountpoint.to_path_buf(),
        runtime: Some(runtime),
        _worker: worker,
        passthrough_opens,
        metrics: metrics.cloned(),
    };
    if !cfg.noprefetch && handle.layer.index().prefetch_end.is_some() {
        let timeout = Duration::from_secs(cfg.prefetch_timeout_sec);
        if ready_rx.recv_timeout(timeout).is_err() {
            warn!(layer = %handle.layer.desc().digest, "prefetch still running; mount proceeds");
        }
    }
    Ok(handle)
}

/// A mounted layer. Dropping it unmounts.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    layer: Arc<Layer>,
    mountpoint: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    _worker: std::thread::JoinHandle<()>,
    passthrough_opens: Arc<AtomicU64>,
    metrics: Option<FsMetrics>,
}

impl MountHandle {
    pub fn layer(&self) -> &Arc<Layer> {
        &self.layer
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Ok while the session serves requests and the mount is in place.
    pub fn check(&self) -> Result<()> {
        let alive = self
            .session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished());
        if alive && is_mounted(&self.mountpoint) {
            Ok(())
        } else {
            Err(Error::Mount {
                mountpoint: self.mountpoint.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the FUSE session is gone",
                ),
            })
        }
    }

    /// Blob bytes that are local.
    pub fn fetched_bytes(&self) -> u64 {
        self.layer.fetched_bytes()
    }

    /// Opens answered with FUSE passthrough to a cached file.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }

    /// Unmounts (lazily, so busy files do not block it) and waits for the session.
    pub fn unmount(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(m) = self.metrics.take() {
            m.layer_unmounted(&self.mountpoint);
        }
        self.layer.stop();
        let res = match self.session.take() {
            Some(s) => {
                // A lazily detached mount with files still open keeps its session until
                // they close; wait a while, then let the session thread finish on its own.
                let (tx, rx) = mpsc::channel();
                let spawned = std::thread::Builder::new()
                    .name("stargz-umount".into())
                    .spawn(move || {
                        let _ = tx.send(s.umount_and_join());
                    });
                let res = match spawned {
                    Ok(_) => rx.recv_timeout(UNMOUNT_WAIT).unwrap_or_else(|_| {
                        warn!(mountpoint = %self.mountpoint.display(),
                            "FUSE session still busy after unmount; leaving it to finish");
                        Ok(())
                    }),
                    Err(e) => Err(e),
                };
                res.map_err(|source| Error::Mount {
                    mountpoint: self.mountpoint.display().to_string(),
                    source,
                })
            }
            None => Ok(()),
        };
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        res
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            warn!(error = %e, "unmount failed");
        }
    }
}
