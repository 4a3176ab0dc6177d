//! The daemon's [`RemoteFs`]: eStargz layers fetched from their registry and served through the `fs` crate's FUSE mounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use snapshotter::{LayerInfo, RemoteFs};

use crate::metrics::DaemonMetrics;
use crate::preopen::LayerPool;

/// Mounts eStargz layers lazily; one [`fs::MountHandle`] per mount point.
pub struct FuseRemote {
    cfg: fs::Config,
    layers: LayerPool,
    mounts: Mutex<HashMap<PathBuf, fs::MountHandle>>,
    metrics: DaemonMetrics,
}

impl FuseRemote {
    pub fn new(
        cfg: fs::Config,
        reg: registry::RegistryConfig,
        cache_dir: &Path,
        metrics: &DaemonMetrics,
    ) -> anyhow::Result<FuseRemote> {
        let keychain: Arc<dyn registry::Keychain> =
            Arc::new(registry::DockerConfigKeychain::from_env());
        let client = registry::Client::with_metrics(reg, keychain, metrics.registry.clone())?;
        std::fs::create_dir_all(cache_dir)?;
        let cache = fs::ChunkCache::from_config(&cfg, cache_dir, Some(&metrics.fs))?;
        Ok(FuseRemote {
            layers: LayerPool::new(client, cfg.clone(), cache),
            cfg,
            mounts: Mutex::default(),
            metrics: metrics.clone(),
        })
    }

    /// This process's metrics (layers, FUSE, cache, registry) in Prometheus text form.
    // The FUSE manager answers scrapes with it; the daemon encodes its own handle.
    #[allow(dead_code)]
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, fs::MountHandle>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RemoteFs for FuseRemote {
    async fn mount(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
    ) -> Result<(), String> {
        let info = LayerInfo::from_labels(labels).ok_or("no remote layer labels")?;
        // Mounting again over a live mount is a no-op; a dead one is cleared first so
        // its session's unmount cannot later hit the new mount.
        let stale = {
            let mut handles = self.handles();
            match handles.get(mountpoint).map(|h| h.check()) {
                Some(Ok(())) => return Ok(()),
                Some(Err(_)) => handles.remove(mountpoint),
                None => None,
            }
        };
        if let Some(h) = stale {
            let _ = tokio::task::spawn_blocking(move || h.unmount()).await;
        }
        let layer = self.layers.open(&info).await?;
        let (cfg, mp, metrics) = (
            self.cfg.clone(),
            mountpoint.to_path_buf(),
            self.metrics.fs.clone(),
        );
        let handle = tokio::task::spawn_blocking(move || {
            let pool = fs::FetchPool::shared()?;
            let opts = fs::MountOptions {
                cfg: &cfg,
                metrics: Some(&metrics),
                pool: &pool,
            };
            fs::mount(layer, &mp, &opts)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.handles().insert(mountpoint.to_path_buf(), handle);
        Ok(())
    }

    async fn check(&self, mountpoint: &Path, _: &HashMap<String, String>) -> Result<(), String> {
        match self.handles().get(mountpoint) {
            Some(h) => h.check().map_err(|e| e.to_string()),
            None => Err("not mounted by this process".into()),
        }
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), String> {
        let Some(h) = self.handles().remove(mountpoint) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || h.unmount())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

// Used by the stargz-fuse-manager binary, which shares this module.
#[allow(dead_code)]
impl FuseRemote {
    /// Mount points currently mounted, with the blob bytes each has local.
    pub fn mounted(&self) -> Vec<(PathBuf, u64)> {
        let mut v: Vec<_> = self
            .handles()
            .iter()
            .map(|(p, h)| (p.clone(), h.fetched_bytes()))
            .collect();
        v.sort();
        v
    }

    /// Unmounts everything; returns how many unmounts failed.
    pub async fn unmount_all(&self) -> usize {
        let handles: Vec<_> = self.handles().drain().collect();
        let mut failed = 0;
        for (mp, h) in handles {
            let res = tokio::task::spawn_blocking(move || h.unmount()).await;
            if !matches!(res, Ok(Ok(()))) {
                tracing::warn!(mountpoint = %mp.display(), "unmount failed");
                failed += 1;
            }
        }
        failed
    }
}

/// What the daemon runs with: FUSE layers in a FUSE manager process or in this one,
/// or none when disabled or unavailable.
pub enum DaemonRemote {
    Manager(Arc<crate::fuse_manager::ManagerClient>),
    Fuse(Box<FuseRemote>),
    Disabled(snapshotter::NoRemote),
}

impl RemoteFs for DaemonRemote {
    async fn mount(&self, mp: &Path, labels: &HashMap<String, String>) -> Result<(), String> {
        match self {
            DaemonRemote::Manager(m) => m.mount(mp, labels).await,
            DaemonRemote::Fuse(f) => f.mount(mp, labels).await,
            DaemonRemote::Disabled(n) => n.mount(mp, labels).await,
        }
    }
    async fn check(&self, mp: &Path, labels: &HashMap<String, String>) -> Result<(), String> {
        match self {
            DaemonRemote::Manager(m) => m.check(mp, labels).await,
            DaemonRemote::Fuse(f) => f.check(mp, labels).await,
            DaemonRemote::Disabled(n) => n.check(mp, labels).await,
        }
    }
    async fn unmount(&self, mp: &Path) -> Result<(), String> {
        match self {
            DaemonRemote::Manager(m) => m.unmount(mp).await,
            DaemonRemote::Fuse(f) => f.unmount(mp).await,
            DaemonRemote::Disabled(n) => n.unmount(mp).await,
        }
    }
    async fn mounted(&self) -> Result<Vec<PathBuf>, String> {
        match self {
            DaemonRemote::Manager(m) => m.mounted().await,
            // In-process mounts never outlive a restart.
            DaemonRemote::Fuse(_) | DaemonRemote::Disabled(_) => Ok(Vec::new()),
        }
    }
}

/// Every FUSE session thread allocates a zeroed 16 MiB request buffer. With glibc's
/// dynamic mmap threshold, after the first large frees those buffers come from malloc
/// arenas and get zeroed page by page, so each one stays resident (about 16 MiB per
/// thread, four threads per mounted layer). A fixed threshold keeps them as fresh,
/// untouched mappings, resident only as far as requests fill them.
pub fn keep_large_buffers_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}
