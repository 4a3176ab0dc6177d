//! Opening an image's eStargz layers ahead of their Prepare calls.
//!
//! containerd prepares an image's layers one after the other, each waiting for its
//! mount. One manifest lookup tells every layer's size and TOC digest, so the TOC fetch,
//! the index and the prefetch of all of them start at the first Prepare and run in
//! parallel; each later Prepare then finds its layer open (or on its way).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use registry::{Digest, Reference};
use remote_layer::{annotation, MountError, RemoteLayer};
use tracing::{debug, info, warn};

use crate::classify;

type Opening = Shared<BoxFuture<'static, Result<Arc<fs::Layer>, MountError>>>;
type Resolving = Shared<BoxFuture<'static, Result<Arc<Vec<registry::Descriptor>>, MountError>>>;

/// How long a layer opened ahead waits for its Prepare before it is dropped.
const UNCLAIMED_TTL: Duration = Duration::from_secs(300);
/// How long one manifest lookup serves the Prepares of the same image.
const MANIFEST_TTL: Duration = Duration::from_secs(60);

/// Key of an opening layer: blob digest and the TOC digest it is checked against.
type LayerKey = (String, String);

/// Layers being opened (or opened) before anything mounts them.
pub struct LayerPool {
    client: registry::Client,
    cfg: fs::Config,
    cache: Arc<fs::ChunkCache>,
    manifests: Mutex<HashMap<String, (Instant, Resolving)>>,
    opening: Mutex<HashMap<LayerKey, (Instant, Opening)>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LayerPool {
    pub fn new(client: registry::Client, cfg: fs::Config, cache: Arc<fs::ChunkCache>) -> Self {
        LayerPool {
            client,
            cfg,
            cache,
            manifests: Mutex::default(),
            opening: Mutex::default(),
        }
    }

    /// The layer `info` describes, opened and checked against the TOC digest of its
    /// labels. Starts opening the image's other eStargz layers on the way.
    pub async fn open(&self, info: &RemoteLayer) -> Result<Arc<fs::Layer>, MountError> {
        self.expire();
        let reference = Reference::parse(&info.image_ref)
            .map_err(|e| MountError::InvalidLabels(e.to_string()))?;
        let digest = info.digest.clone();
        let mut size = None;
        let mut hint = None;
        match self.manifest(&info.image_ref, &reference).await {
            Ok(layers) => {
                for d in layers.iter() {
                    if d.digest == digest {
                        size = Some(d.size);
                        hint = prefetch_end_hint(d);
                        continue;
                    }
                    let listed = info.layers.is_empty()
                        || info.layers.iter().any(|l| *l == d.digest.to_string());
                    let toc = d
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(annotation::TOC_DIGEST))
                        .cloned();
                    if listed && toc.is_some() {
                        // Runs on its own; the pool keeps the handle for that layer's mount.
                        drop(self.start(
                            &reference,
                            d.digest.clone(),
                            Some(d.size),
                            toc,
                            prefetch_end_hint(d),
                        ));
                    }
                }
            }
            Err(e) => debug!(image = %info.image_ref, error = %e,
                "no manifest; opening only the requested layer"),
        }
        // This layer is checked against the TOC digest containerd gave, never the one
        // the manifest carries now (the tag may have moved since the pull).
        let opening = self.start(&reference, digest, size, info.toc_digest.clone(), hint);
        locked(&self.opening).remove(&key(&info.digest.to_string(), &info.toc_digest));
        opening.await
    }

    /// Layers opened ahead and not claimed yet, and remembered manifests; expired
    /// entries are dropped first.
    pub fn counts(&self) -> (usize, usize) {
        self.expire();
        (locked(&self.opening).len(), locked(&self.manifests).len())
    }

    fn expire(&self) {
        let now = Instant::now();
        locked(&self.opening).retain(|_, (t, _)| now.duration_since(*t) < UNCLAIMED_TTL);
        locked(&self.manifests).retain(|_, (t, _)| now.duration_since(*t) < MANIFEST_TTL);
    }

    /// The layers of the image, for this host's platform; one lookup per image at a time.
    async fn manifest(
        &self,
        image_ref: &str,
        reference: &Reference,
    ) -> Result<Arc<Vec<registry::Descriptor>>, MountError> {
        let resolving = {
            let mut map = locked(&self.manifests);
            match map.get(image_ref) {
                Some((_, r)) => r.clone(),
                None => {
                    let (client, reference) = (self.client.clone(), reference.clone());
                    let handle = tokio::runtime::Handle::current();
                    // The registry client's futures are not Send: drive them on a
                    // blocking thread.
                    let task = tokio::task::spawn_blocking(move || {
                        handle
                            .block_on(client.resolve_image(&reference, &registry::Platform::host()))
                            .map(|img| Arc::new(img.manifest.layers))
                            .map_err(|e| classify::registry_error(&e))
                    });
                    let r = async move { task.await.map_err(joined)? }.boxed().shared();
                    map.insert(image_ref.to_string(), (Instant::now(), r.clone()));
                    r
                }
            }
        };
        resolving.await
    }

    /// Starts opening a layer unless it is already on its way; prefetch follows the open
    /// on the fetch pool, so a mount that comes later finds the prioritized files cached
    /// or arriving.
    fn start(
        &self,
        reference: &Reference,
        digest: Digest,
        size: Option<u64>,
        toc_digest: Option<String>,
        head_hint: Option<u64>,
    ) -> Opening {
        let k = key(&digest.to_string(), &toc_digest);
        let mut map = locked(&self.opening);
        if let Some((_, o)) = map.get(&k) {
            return o.clone();
        }
        let reader = self.client.blob_reader(reference, digest.clone(), size);
        let (cfg, cache) = (self.cfg.clone(), self.cache.clone());
        let handle = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            let fetcher = match size {
                Some(s) => fs::RegistryFetcher::with_size(reader, handle.clone(), s),
                None => handle
                    .block_on(fs::RegistryFetcher::new(reader, handle.clone()))
                    .map_err(|e| classify::io_error(&e).context(format!("blob {digest}")))?,
            };
            let desc = fs::LayerDesc {
                digest: digest.to_string(),
                size: fs::Fetcher::size(&fetcher),
                toc_digest,
            };
            // The head (prioritized files) is asked for alongside the TOC: no round trip
            // of the link goes by idle between the two.
            let head = fs::speculative_head(&cfg, head_hint);
            let layer = fs::Layer::open_with_head(Arc::new(fetcher), desc, &cfg, cache, head)
                .map_err(|e| classify::fs_error(&e))?;
            let layer = Arc::new(layer);
            if !cfg.noprefetch {
                // The mount starts it too; it runs once either way.
                match fs::FetchPool::shared() {
                    Ok(pool) => layer.start_prefetch(&pool),
                    Err(e) => warn!(error = %e, "cannot start prefetch; the mount will do it"),
                }
            }
            info!(layer = %digest, "layer opened ahead of its mount");
            Ok(layer)
        });
        let opening = async move { task.await.map_err(joined)? }.boxed().shared();
        map.insert(k, (Instant::now(), opening.clone()));
        opening
    }
}

/// The `prefetch-end` annotation this project's converter writes (bytes at the start of
/// the blob holding the prioritized files; 0 for none), if the descriptor has a valid one.
fn prefetch_end_hint(d: &registry::Descriptor) -> Option<u64> {
    d.annotations
        .as_ref()?
        .get(annotation::PREFETCH_END)?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&end| end <= d.size)
}

/// A task that panicked or was cancelled.
fn joined(e: tokio::task::JoinError) -> MountError {
    MountError::Other(e.to_string())
}

fn key(digest: &str, toc_digest: &Option<String>) -> LayerKey {
    (digest.to_string(), toc_digest.clone().unwrap_or_default())
}
