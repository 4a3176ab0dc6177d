//! The [`RemoteFs`] that mounts in this process: eStargz layers fetched from their
//! registry and served through the `fs` crate's FUSE mounts. The FUSE manager serves
//! with it, and so does the daemon when it runs without one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use remote_layer::{MountError, RemoteLayer};
use snapshotter::RemoteFs;

use crate::classify;
use crate::learned::{Learned, LearnedConfig};
use crate::manager::protocol::StateCounts;
use crate::metrics::DaemonMetrics;
use crate::preopen::LayerPool;

/// Mounts eStargz layers lazily; one [`fs::MountHandle`] per mount point.
pub struct FuseRemote {
    cfg: fs::Config,
    layers: LayerPool,
    mounts: Mutex<HashMap<PathBuf, fs::MountHandle>>,
    /// One mount, check-and-replace or unmount per mount point at a time: an unmount
    /// waits for a mount still under way (its caller may have given up), and two
    /// mounts of one point never stack. Entries live while somebody holds or waits.
    busy: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    metrics: DaemonMetrics,
    learned: Arc<Learned>,
}

/// Held while one mount point is mounted, checked or unmounted.
struct PointGuard<'a> {
    remote: &'a FuseRemote,
    point: PathBuf,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for PointGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut busy = locked(&self.remote.busy);
        // Clones are only made under the map lock, so one left means nobody waits.
        if busy
            .get(&self.point)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            busy.remove(&self.point);
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FuseRemote {
    pub fn new(
        cfg: fs::Config,
        reg: registry::RegistryConfig,
        keychain: Arc<dyn registry::Keychain>,
        cache_dir: &Path,
        metrics: &DaemonMetrics,
        learned: (LearnedConfig, &Path),
    ) -> anyhow::Result<FuseRemote> {
        let client = registry::Client::with_metrics(reg, keychain, metrics.registry.clone())?;
        client.warm_up();
        std::fs::create_dir_all(cache_dir)?;
        let cache = fs::ChunkCache::from_config(&cfg, cache_dir, Some(&metrics.fs))?;
        let (learned_cfg, root) = learned;
        let learned = Arc::new(Learned::new(learned_cfg, root, metrics.learned.clone()));
        Ok(FuseRemote {
            layers: LayerPool::new(client, cfg.clone(), cache, metrics.fs.clone())
                .with_learned(learned.clone()),
            learned,
            cfg,
            mounts: Mutex::default(),
            busy: Mutex::default(),
            metrics: metrics.clone(),
        })
    }

    /// This process's metrics (layers, FUSE, cache, registry) in Prometheus text form.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode_layers()
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, fs::MountHandle>> {
        locked(&self.mounts)
    }

    async fn point(&self, mountpoint: &Path) -> PointGuard<'_> {
        let m = locked(&self.busy)
            .entry(mountpoint.to_path_buf())
            .or_default()
            .clone();
        PointGuard {
            remote: self,
            point: mountpoint.to_path_buf(),
            guard: Some(m.lock_owned().await),
        }
    }

    /// How much per-layer state this process holds right now.
    pub fn state_counts(&self) -> StateCounts {
        let (opening, manifests) = self.layers.counts();
        StateCounts {
            mounts: self.handles().len(),
            busy: locked(&self.busy).len(),
            opening,
            manifests,
        }
    }
}

impl RemoteFs for FuseRemote {
    async fn mount(&self, mountpoint: &Path, layer: &RemoteLayer) -> Result<(), MountError> {
        let _point = self.point(mountpoint).await;
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
        let started = std::time::Instant::now();
        let opened = self.layers.open(layer).await?;
        let log = self.learned.recorder();
        let (cfg, mp, metrics, log2, layer2) = (
            self.cfg.clone(),
            mountpoint.to_path_buf(),
            self.metrics.fs.clone(),
            log.clone(),
            opened.clone(),
        );
        let handle = tokio::task::spawn_blocking(move || {
            let pool = fs::FetchPool::shared()?;
            let opts = fs::MountOptions {
                cfg: &cfg,
                metrics: Some(&metrics),
                pool: &pool,
            };
            fs::mount_recording(layer2, &mp, &opts, log2)
        })
        .await
        .map_err(|e| MountError::Other(e.to_string()))?
        .map_err(|e| classify::fs_error(&e))?;
        // As the reference times a mount: without the wait for prefetch.
        let took = started.elapsed().saturating_sub(handle.prefetch_waited());
        self.metrics
            .fs
            .observe_ms(fs::metrics::Op::Mount, &layer.digest.to_string(), took);
        self.handles().insert(mountpoint.to_path_buf(), handle);
        if let Some(log) = log {
            match self.layers.image_digest(&layer.image_ref).await {
                Some(image) => self.learned.watch(image, opened, log),
                None => tracing::debug!(image = %layer.image_ref,
                    "image digest unknown; the files this mount reads are not recorded"),
            }
        }
        Ok(())
    }

    async fn check(&self, mountpoint: &Path) -> Result<(), MountError> {
        match self.handles().get(mountpoint) {
            Some(h) => h.check().map_err(|e| MountError::NotMounted(e.to_string())),
            None => Err(MountError::NotMounted("not mounted by this process".into())),
        }
    }

    async fn unmount(&self, mountpoint: &Path) -> Result<(), MountError> {
        let _point = self.point(mountpoint).await;
        let Some(h) = self.handles().remove(mountpoint) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || h.unmount())
            .await
            .map_err(|e| MountError::Other(e.to_string()))?
            .map_err(|e| MountError::Other(e.to_string()))
    }
}

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
        // The records of what those mounts' workloads read are written before the
        // process goes.
        self.learned.settle(std::time::Duration::from_secs(2)).await;
        failed
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
