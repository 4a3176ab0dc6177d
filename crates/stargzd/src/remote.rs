//! The daemon's [`RemoteFs`]: eStargz layers fetched from their registry and served through the `fs` crate's FUSE mounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use snapshotter::{LayerInfo, RemoteFs};

use crate::metrics::DaemonMetrics;

/// Mounts eStargz layers lazily; one [`fs::MountHandle`] per mount point.
pub struct FuseRemote {
    cfg: fs::Config,
    client: registry::Client,
    cache: Arc<fs::ChunkCache>,
    mounts: Mutex<HashMap<PathBuf, fs::MountHandle>>,
    metrics: fs::FsMetrics,
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
        let cache = fs::observed_cache_from_config(&cfg, cache_dir, &metrics.fs)?;
        Ok(FuseRemote {
            cfg,
            client,
            cache,
            mounts: Mutex::default(),
            metrics: metrics.fs.clone(),
        })
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
        let layer = LayerInfo::from_labels(labels).ok_or("no remote layer labels")?;
        let reference = registry::Reference::parse(&layer.image_ref).map_err(|e| e.to_string())?;
        let digest = registry::Digest::parse(&layer.digest).map_err(|e| e.to_string())?;
        let reader = self.client.blob_reader(&reference, digest, None);
        let (cfg, cache, mp, metrics) = (
            self.cfg.clone(),
            self.cache.clone(),
            mountpoint.to_path_buf(),
            self.metrics.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        let toc_digest = layer.toc_digest.clone();
        // The registry reader's futures are not Send, so the whole mount runs on a
        // blocking thread that drives them with the runtime handle.
        let handle = tokio::task::spawn_blocking(move || {
            let fetcher = handle
                .block_on(fs::RegistryFetcher::new(reader, handle.clone()))
                .map_err(|e| format!("blob {}: {e}", layer.digest))?;
            let desc = fs::LayerDesc {
                digest: layer.digest.clone(),
                size: fs::Fetcher::size(&fetcher),
                toc_digest,
            };
            fs::mount_observed(Arc::new(fetcher), desc, &mp, &cfg, cache, &metrics)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
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

/// What the daemon runs with: FUSE layers, or none when disabled or unavailable.
pub enum DaemonRemote {
    Fuse(FuseRemote),
    Disabled(snapshotter::NoRemote),
}

impl RemoteFs for DaemonRemote {
    async fn mount(&self, mp: &Path, labels: &HashMap<String, String>) -> Result<(), String> {
        match self {
            DaemonRemote::Fuse(f) => f.mount(mp, labels).await,
            DaemonRemote::Disabled(n) => n.mount(mp, labels).await,
        }
    }
    async fn check(&self, mp: &Path, labels: &HashMap<String, String>) -> Result<(), String> {
        match self {
            DaemonRemote::Fuse(f) => f.check(mp, labels).await,
            DaemonRemote::Disabled(n) => n.check(mp, labels).await,
        }
    }
    async fn unmount(&self, mp: &Path) -> Result<(), String> {
        match self {
            DaemonRemote::Fuse(f) => f.unmount(mp).await,
            DaemonRemote::Disabled(n) => n.unmount(mp).await,
        }
    }
}
