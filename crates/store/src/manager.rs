//! The layers the store serves: image manifests and configs per reference, each eStargz
//! (or zstd:chunked) layer opened against its TOC digest and mounted lazily by the `fs`
//! crate under the pool directory, the `info` containers/storage reads, and the use
//! counts containers/storage keeps through the `use` file and `rmdir`.
//!
//! Everything here blocks: callers are FUSE request threads or blocking tasks. Registry
//! calls are driven on the process's tokio runtime through its handle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use registry::{Descriptor, Reference};
use remote_layer::annotation;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::auth::Credentials;

/// How long a manifest and config serve lookups of the same reference.
const IMAGE_TTL: Duration = Duration::from_secs(120);
/// How long a failed resolution is remembered before it is tried again.
const FAILURE_TTL: Duration = Duration::from_secs(10);
/// How long a layer nobody declared use of stays mounted.
pub const UNUSED_TTL: Duration = Duration::from_secs(300);
/// Largest image config read.
const MAX_CONFIG: u64 = 8 << 20;
/// Most layers of one image opened ahead of their lookups.
const MAX_LAYERS: usize = 1024;
/// The mount point inside each layer's directory under the pool.
const MOUNT_DIR: &str = "diff";
/// Most registry clients kept (one per repository, for per-repository credentials).
const MAX_CLIENTS: usize = 256;

/// containers/storage's compression numbers (`pkg/archive`).
const COMPRESSION_GZIP: i32 = 2;
const COMPRESSION_ZSTD: i32 = 4;

/// Why a layer is not served; containers/storage then pulls it the ordinary way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error("invalid image reference {0:?}")]
    Reference(String),
    #[error("{0}")]
    Registry(String),
    #[error("layer {0} is not in the image")]
    NotInImage(String),
    #[error("layer {digest} is not lazily servable: {reason}")]
    NotLazy { digest: String, reason: String },
    #[error("mounting layer {digest}: {reason}")]
    Mount { digest: String, reason: String },
}

/// A layer of an image, by image reference and the name containers/storage looks it
/// up by (the blob digest, or the TOC digest in newer containers/storage).
pub type LayerKey = (String, String);

/// What the store knows about one image reference.
pub struct ImageInfo {
    reference: Reference,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
    preopened: AtomicBool,
}

struct ImageSlot {
    created: Instant,
    value: OnceLock<Result<Arc<ImageInfo>, Unavailable>>,
}

/// How containers/storage names a layer in a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NamedBy {
    Blob,
    Toc,
}

/// `info` as containers/storage decodes it into its `Layer`: the blob's digest and
/// size and the layer's diff id (containers/storage 1.43, Podman 4.x), or its TOC
/// digest and expected diff id (newer versions, which look layers up by TOC digest).
#[derive(Serialize)]
struct LayerInfo<'a> {
    #[serde(
        rename = "compressed-diff-digest",
        skip_serializing_if = "Option::is_none"
    )]
    compressed_digest: Option<&'a str>,
    #[serde(rename = "compressed-size", skip_serializing_if = "Option::is_none")]
    compressed_size: Option<u64>,
    #[serde(rename = "diff-digest", skip_serializing_if = "Option::is_none")]
    diff_digest: Option<&'a str>,
    #[serde(rename = "diff-size", skip_serializing_if = "Option::is_none")]
    diff_size: Option<i64>,
    compression: i32,
    #[serde(rename = "toc-digest", skip_serializing_if = "Option::is_none")]
    toc_digest: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flags: Option<HashMap<&'static str, &'a str>>,
}

impl ImageInfo {
    /// The layer `name` names, how, and its position.
    fn find(&self, name: &str) -> Option<(usize, &Descriptor, NamedBy)> {
        let by_blob = self
            .layers
            .iter()
            .enumerate()
            .find(|(_, d)| d.digest.to_string() == name)
            .map(|(i, d)| (i, d, NamedBy::Blob));
        by_blob.or_else(|| {
            self.layers
                .iter()
                .enumerate()
                .find(|(_, d)| toc_digest(d).is_some_and(|t| t == name))
                .map(|(i, d)| (i, d, NamedBy::Toc))
        })
    }

    fn info_json(&self, i: usize, d: &Descriptor, by: NamedBy) -> Vec<u8> {
        let compression = if d.media_type.contains("zstd") {
            COMPRESSION_ZSTD
        } else {
            COMPRESSION_GZIP
        };
        let diff_id = self.diff_ids.get(i).map(String::as_str);
        let digest = d.digest.to_string();
        let info = match by {
            NamedBy::Blob => LayerInfo {
                compressed_digest: Some(&digest),
                compressed_size: Some(d.size),
                diff_digest: diff_id,
                diff_size: d
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotation::UNCOMPRESSED_SIZE))
                    .and_then(|s| s.parse::<i64>().ok())
                    .filter(|s| *s >= 0),
                compression,
                toc_digest: None,
                flags: None,
            },
            NamedBy::Toc => LayerInfo {
                compressed_digest: None,
                compressed_size: None,
                diff_digest: None,
                diff_size: Some(-1),
                compression,
                toc_digest: toc_digest(d),
                flags: diff_id.map(|id| HashMap::from([("expected-layer-diffid", id)])),
            },
        };
        let mut out = serde_json::to_vec(&info).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

fn toc_digest(d: &Descriptor) -> Option<&str> {
    d.annotations
        .as_ref()
        .and_then(|a| a.get(annotation::TOC_DIGEST))
        .map(String::as_str)
}

/// A layer that is open and mounted under the pool directory.
pub struct Served {
    /// The JSON `info` file.
    pub info: Vec<u8>,
    /// The blob digest.
    pub digest: String,
    pub blob_size: u64,
    /// The mount point of the layer's filesystem (what `diff` links to).
    pub dir: PathBuf,
    fetcher: Arc<dyn fs::Fetcher>,
    layer: Arc<fs::Layer>,
    mount: Mutex<Option<fs::MountHandle>>,
}

impl Served {
    /// `len` bytes of the compressed blob from `offset` (fewer at its end).
    pub fn read_blob(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let end = offset.saturating_add(u64::from(len)).min(self.blob_size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut parts = self
            .fetcher
            .read_ranges(std::slice::from_ref(&(offset..end)))?;
        Ok(parts.pop().map(|b| b.to_vec()).unwrap_or_default())
    }

    /// Blob bytes that are local.
    pub fn fetched_bytes(&self) -> u64 {
        self.layer.fetched_bytes()
    }

    /// Unmounts unless the mount is busy (a container's overlay uses it, or files in
    /// it are open); true when it is gone.
    ///
    /// The directory holding the mount is renamed away first, so no path walk through
    /// `diff` can reach the mount (or the empty directory under it) while it goes: a
    /// walk that got there before holds the mount, the unmount then fails with EBUSY,
    /// and the directory is put back.
    fn unmount_if_idle(&self) -> bool {
        let mut mount = lock(&self.mount);
        let Some(handle) = mount.take() else {
            return true;
        };
        let home = self.dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let away = home.with_extension("released");
        let moved = std::fs::rename(&home, &away).is_ok();
        let target = if moved {
            away.join(MOUNT_DIR)
        } else {
            self.dir.clone()
        };
        match nix::mount::umount2(&target, nix::mount::MntFlags::empty()) {
            Err(nix::errno::Errno::EBUSY) => {
                if moved {
                    if let Err(e) = std::fs::rename(&away, &home) {
                        warn!(dir = %away.display(), error = %e, "cannot put a busy layer mount back");
                    }
                }
                *mount = Some(handle);
                false
            }
            res => {
                if let Err(e) = res {
                    warn!(layer = %self.digest, dir = %target.display(), error = %e,
                        "unmounting the layer failed");
                }
                // The session ends with the connection; its own unmount finds nothing.
                drop(handle);
                let gone = if moved { &away } else { &home };
                let _ = std::fs::remove_dir(gone.join(MOUNT_DIR));
                let _ = std::fs::remove_dir(gone);
                info!(layer = %self.digest, "layer unmounted");
                true
            }
        }
    }
}

struct LayerEntry {
    created: Instant,
    state: OnceLock<Result<Arc<Served>, Unavailable>>,
    uses: Mutex<Uses>,
}

#[derive(Default)]
struct Uses {
    count: u32,
    /// When the count last went to zero (or the entry was made).
    idle_since: Option<Instant>,
    ever_used: bool,
}

/// What the store runs with.
pub struct ManagerOptions {
    pub root: PathBuf,
    pub fs: fs::Config,
    pub registry: registry::RegistryConfig,
    pub credentials: Arc<Credentials>,
    pub metrics: fs::FsMetrics,
    pub registry_metrics: registry::RegistryMetrics,
}

/// One layer's state, for logs, tests and the metrics endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerStatus {
    pub reference: String,
    pub name: String,
    pub dir: PathBuf,
    pub uses: u32,
    pub fetched: u64,
    pub size: u64,
}

/// The layers of every image the store was asked about.
pub struct LayerManager {
    rt: tokio::runtime::Handle,
    cfg: fs::Config,
    registry: registry::RegistryConfig,
    credentials: Arc<Credentials>,
    metrics: fs::FsMetrics,
    registry_metrics: registry::RegistryMetrics,
    cache: Arc<fs::ChunkCache>,
    pool: fs::FetchPool,
    pool_dir: PathBuf,
    next_mount: AtomicU64,
    clients: Mutex<HashMap<(String, String), registry::Client>>,
    images: Mutex<HashMap<String, Arc<ImageSlot>>>,
    layers: Mutex<HashMap<LayerKey, Arc<LayerEntry>>>,
    /// Set by [`LayerManager::shutdown`]: no new mounts.
    closed: AtomicBool,
    /// TOC sizes seen per repository, for layers whose descriptor tells none.
    tails: fs::TailSizes,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LayerManager {
    /// Sets up the cache under `<root>/cache` and the pool of layer mounts under
    /// `<root>/pool`, detaching mounts a previous run left there.
    pub fn new(rt: tokio::runtime::Handle, opts: ManagerOptions) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let pool_dir = opts.root.join("pool");
        let cache_dir = opts.root.join("cache");
        for d in [&opts.root, &pool_dir, &cache_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        set_mode(&pool_dir, 0o711)?;
        clean_pool(&pool_dir);
        let cache = fs::ChunkCache::from_config(&opts.fs, &cache_dir, Some(&opts.metrics))
            .context("opening the cache")?;
        Ok(Arc::new(LayerManager {
            rt,
            cfg: opts.fs,
            registry: opts.registry,
            credentials: opts.credentials,
            metrics: opts.metrics,
            registry_metrics: opts.registry_metrics,
            cache,
            pool: fs::FetchPool::shared().context("starting the fetch pool")?,
            pool_dir,
            next_mount: AtomicU64::new(1),
            clients: Mutex::default(),
            images: Mutex::default(),
            layers: Mutex::default(),
            closed: AtomicBool::new(false),
            tails: fs::TailSizes::new(),
        }))
    }

    /// The fetch pool the layers' reads run on; blob reads of the store run there too.
    pub fn fetch_pool(&self) -> &fs::FetchPool {
        &self.pool
    }

    /// The registry client for `r`'s repository, with credentials for it.
    fn client(&self, r: &Reference) -> Result<registry::Client, Unavailable> {
        let key = (r.registry().to_string(), r.repository().to_string());
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let keychain = Arc::new(
            self.credentials
                .for_repository(r.registry(), r.repository()),
        );
        let c = registry::Client::with_metrics(
            self.registry.clone(),
            keychain,
            self.registry_metrics.clone(),
        )
        .map_err(|e| Unavailable::Registry(e.to_string()))?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// Manifest (for this host's platform) and config of `reference`, fetched once per
    /// [`IMAGE_TTL`].
    pub fn image(&self, reference: &str) -> Result<Arc<ImageInfo>, Unavailable> {
        let slot = {
            let mut images = lock(&self.images);
            let now = Instant::now();
            images.retain(|_, s| {
                let ttl = match s.value.get() {
                    Some(Err(_)) => FAILURE_TTL,
                    _ => IMAGE_TTL,
                };
                now.duration_since(s.created) < ttl
            });
            images
                .entry(reference.to_string())
                .or_insert_with(|| {
                    Arc::new(ImageSlot {
                        created: now,
                        value: OnceLock::new(),
                    })
                })
                .clone()
        };
        slot.value
            .get_or_init(|| self.fetch_image(reference))
            .clone()
    }

    fn fetch_image(&self, reference: &str) -> Result<Arc<ImageInfo>, Unavailable> {
        let r =
            Reference::parse(reference).map_err(|_| Unavailable::Reference(reference.into()))?;
        let client = self.client(&r)?;
        let reg = |e: registry::Error| Unavailable::Registry(format!("{reference}: {e}"));
        let img = self
            .rt
            .block_on(client.resolve_image(&r, &registry::Platform::host()))
            .map_err(reg)?;
        let config = &img.manifest.config;
        if config.size > MAX_CONFIG {
            return Err(Unavailable::Registry(format!(
                "{reference}: image config of {} bytes is larger than {MAX_CONFIG}",
                config.size
            )));
        }
        let bytes = self
            .rt
            .block_on(
                client
                    .blob_reader(&r, config.digest.clone(), Some(config.size))
                    .read_all(),
            )
            .map_err(reg)?;
        #[derive(serde::Deserialize)]
        struct Rootfs {
            #[serde(default)]
            diff_ids: Vec<String>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            rootfs: Rootfs,
        }
        let cfg: Config = serde_json::from_slice(&bytes)
            .map_err(|e| Unavailable::Registry(format!("{reference}: image config: {e}")))?;
        if cfg.rootfs.diff_ids.len() != img.manifest.layers.len() {
            return Err(Unavailable::Registry(format!(
                "{reference}: {} layers but {} diff ids",
                img.manifest.layers.len(),
                cfg.rootfs.diff_ids.len()
            )));
        }
        debug!(image = %reference, layers = img.manifest.layers.len(), "manifest and config fetched");
        Ok(Arc::new(ImageInfo {
            reference: r,
            layers: img.manifest.layers,
            diff_ids: cfg.rootfs.diff_ids,
            preopened: AtomicBool::new(false),
        }))
    }

    /// The `info` of layer `name` of `reference`.
    pub fn info(&self, reference: &str, name: &str) -> Result<Vec<u8>, Unavailable> {
        if let Some(e) = self.entry_if_any(reference, name) {
            if let Some(Ok(s)) = e.state.get() {
                return Ok(s.info.clone());
            }
        }
        let image = self.image(reference)?;
        let (i, d, by) = image
            .find(name)
            .ok_or_else(|| Unavailable::NotInImage(name.into()))?;
        Ok(image.info_json(i, d, by))
    }

    fn entry_if_any(&self, reference: &str, name: &str) -> Option<Arc<LayerEntry>> {
        lock(&self.layers)
            .get(&(reference.to_string(), name.to_string()))
            .cloned()
    }

    fn entry(&self, reference: &str, name: &str) -> Arc<LayerEntry> {
        let mut layers = lock(&self.layers);
        let key = (reference.to_string(), name.to_string());
        // A failure is tried again once it has aged.
        if layers.get(&key).is_some_and(|e| {
            matches!(e.state.get(), Some(Err(_))) && e.created.elapsed() >= FAILURE_TTL
        }) {
            layers.remove(&key);
        }
        layers
            .entry(key)
            .or_insert_with(|| {
                Arc::new(LayerEntry {
                    created: Instant::now(),
                    state: OnceLock::new(),
                    uses: Mutex::new(Uses {
                        idle_since: Some(Instant::now()),
                        ..Uses::default()
                    }),
                })
            })
            .clone()
    }

    /// Layer `name` of `reference`, opened, verified and mounted; the first call
    /// resolves it (and starts the image's other lazy layers), later ones wait for
    /// that or get its result.
    pub fn layer(
        self: &Arc<Self>,
        reference: &str,
        name: &str,
    ) -> Result<Arc<Served>, Unavailable> {
        loop {
            let entry = self.entry(reference, name);
            let res = entry
                .state
                .get_or_init(|| self.resolve(reference, name))
                .clone();
            // A layer unmounted by the sweeper between lookup and here: start over.
            if let Ok(s) = &res {
                if lock(&s.mount).is_none() {
                    let mut layers = lock(&self.layers);
                    let key = (reference.to_string(), name.to_string());
                    if layers.get(&key).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                        layers.remove(&key);
                    }
                    continue;
                }
            }
            return res;
        }
    }

    fn resolve(self: &Arc<Self>, reference: &str, name: &str) -> Result<Arc<Served>, Unavailable> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Unavailable::Mount {
                digest: name.into(),
                reason: "the store is shutting down".into(),
            });
        }
        let image = self.image(reference)?;
        let (i, d, by) = image
            .find(name)
            .ok_or_else(|| Unavailable::NotInImage(name.into()))?;
        let not_lazy = |reason: String| Unavailable::NotLazy {
            digest: d.digest.to_string(),
            reason,
        };
        if !image.preopened.swap(true, Ordering::SeqCst) {
            self.open_others(reference, &image, name);
        }
        let toc = toc_digest(d).map(str::to_string);
        if toc.is_none() && !self.cfg.allow_no_verification {
            return Err(not_lazy("no TOC digest annotation".into()));
        }
        let client = self.client(&image.reference)?;
        let reader = client.blob_reader(&image.reference, d.digest.clone(), Some(d.size));
        let fetcher = Arc::new(fs::RegistryFetcher::with_size(
            reader,
            self.rt.clone(),
            d.size,
        ));
        let repository = format!(
            "{}/{}",
            image.reference.registry(),
            image.reference.repository()
        );
        let described = d
            .annotations
            .as_ref()
            .and_then(|a| annotation::toc_tail(a, d.size));
        let desc = fs::LayerDesc {
            digest: d.digest.to_string(),
            size: d.size,
            toc_digest: toc,
            toc_tail: self.tails.hint(&repository, described),
        };
        let layer = fs::Layer::open(fetcher.clone(), desc, &self.cfg, self.cache.clone())
            .map_err(|e| not_lazy(e.to_string()))?;
        self.tails.learn(&repository, layer.toc_tail());
        let layer = Arc::new(layer);
        if !self.cfg.noprefetch {
            layer.start_prefetch(&self.pool);
        }
        let n = self.next_mount.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .pool_dir
            .join(format!(
                "{n}-{}",
                &d.digest.hex()[..d.digest.hex().len().min(16)]
            ))
            .join(MOUNT_DIR);
        let mount_err = |reason: String| Unavailable::Mount {
            digest: d.digest.to_string(),
            reason,
        };
        std::fs::create_dir_all(&dir).map_err(|e| mount_err(format!("{}: {e}", dir.display())))?;
        let opts = fs::MountOptions {
            cfg: &self.cfg,
            metrics: Some(&self.metrics),
            pool: &self.pool,
        };
        let handle = fs::mount(layer.clone(), &dir, &opts).map_err(|e| {
            let _ = std::fs::remove_dir(&dir);
            if let Some(home) = dir.parent() {
                let _ = std::fs::remove_dir(home);
            }
            mount_err(e.to_string())
        })?;
        info!(image = %reference, layer = %d.digest, dir = %dir.display(), "layer mounted");
        Ok(Arc::new(Served {
            info: image.info_json(i, d, by),
            digest: d.digest.to_string(),
            blob_size: d.size,
            dir,
            fetcher,
            layer,
            mount: Mutex::new(Some(handle)),
        }))
    }

    /// Opens and mounts the image's other lazy layers in the background, as
    /// containers/storage looks them up one after the other.
    fn open_others(self: &Arc<Self>, reference: &str, image: &ImageInfo, name: &str) {
        for d in image.layers.iter().take(MAX_LAYERS) {
            let digest = d.digest.to_string();
            if digest == name || toc_digest(d).is_none_or(|t| t == name) {
                continue;
            }
            let (me, reference) = (self.clone(), reference.to_string());
            self.rt.spawn_blocking(move || {
                if let Err(e) = me.layer(&reference, &digest) {
                    debug!(image = %reference, layer = %digest, error = %e, "not opened ahead");
                }
            });
        }
    }

    /// containers/storage declared use of a layer (created its `use` file).
    pub fn use_layer(&self, reference: &str, name: &str) -> u32 {
        let entry = self.entry(reference, name);
        let mut uses = lock(&entry.uses);
        uses.count = uses.count.saturating_add(1);
        uses.ever_used = true;
        uses.idle_since = None;
        uses.count
    }

    /// containers/storage released a layer (removed its directory). At no use left the
    /// layer is unmounted, unless something still holds its mount. `None` when the
    /// layer was not in use.
    pub fn release(&self, reference: &str, name: &str) -> Option<u32> {
        let entry = self.entry_if_any(reference, name)?;
        let left = {
            let mut uses = lock(&entry.uses);
            if uses.count == 0 {
                return None;
            }
            uses.count -= 1;
            if uses.count == 0 {
                uses.idle_since = Some(Instant::now());
            }
            uses.count
        };
        if left == 0 {
            self.drop_if_idle(reference, name, &entry);
        }
        Some(left)
    }

    /// Unmounts and forgets `entry` if nothing uses it; true when it is gone.
    fn drop_if_idle(&self, reference: &str, name: &str, entry: &Arc<LayerEntry>) -> bool {
        if lock(&entry.uses).count > 0 {
            return false;
        }
        let gone = match entry.state.get() {
            Some(Ok(s)) => s.unmount_if_idle(),
            Some(Err(_)) => true,
            // Still being resolved.
            None => false,
        };
        if gone {
            let mut layers = lock(&self.layers);
            let key = (reference.to_string(), name.to_string());
            if layers.get(&key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                layers.remove(&key);
            }
        }
        gone
    }

    /// Drops layers nobody uses: those released earlier whose mount was busy then,
    /// and those never used within [`UNUSED_TTL`] (opened ahead, or found again through
    /// containers/storage's links after a restart: their mounts stay while busy).
    pub fn sweep(&self) -> usize {
        self.sweep_older_than(UNUSED_TTL)
    }

    /// [`LayerManager::sweep`] with another idle time; returns how many layers went.
    pub fn sweep_older_than(&self, idle: Duration) -> usize {
        let entries: Vec<(LayerKey, Arc<LayerEntry>)> = lock(&self.layers)
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let mut dropped = 0;
        for ((reference, name), entry) in entries {
            let candidate = {
                let uses = lock(&entry.uses);
                // Released layers go as soon as their mount is free.
                uses.count == 0
                    && (uses.ever_used || uses.idle_since.is_some_and(|t| t.elapsed() >= idle))
            };
            if candidate && self.drop_if_idle(&reference, &name, &entry) {
                dropped += 1;
            }
        }
        dropped
    }

    /// Every mounted layer.
    pub fn status(&self) -> Vec<LayerStatus> {
        let mut v: Vec<LayerStatus> = lock(&self.layers)
            .iter()
            .filter_map(|((reference, name), e)| {
                let s = e.state.get()?.as_ref().ok()?;
                lock(&s.mount).as_ref()?;
                Some(LayerStatus {
                    reference: reference.clone(),
                    name: name.clone(),
                    dir: s.dir.clone(),
                    uses: lock(&e.uses).count,
                    fetched: s.fetched_bytes(),
                    size: s.blob_size,
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.reference, &a.name).cmp(&(&b.reference, &b.name)));
        v
    }

    /// Stops mounting and detaches every layer mount, all at once: each waits a while
    /// for a busy session.
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let entries: Vec<Arc<LayerEntry>> = lock(&self.layers).drain().map(|(_, e)| e).collect();
        let mut waits = Vec::new();
        for e in entries {
            let Some(Ok(s)) = e.state.get().cloned() else {
                continue;
            };
            let handle = lock(&s.mount).take();
            let Some(handle) = handle else {
                continue;
            };
            let spawned = std::thread::Builder::new()
                .name("stargz-unmount".into())
                .spawn(move || {
                    if let Err(err) = handle.unmount() {
                        warn!(dir = %s.dir.display(), error = %err, "unmount failed");
                    }
                    let _ = std::fs::remove_dir(&s.dir);
                    if let Some(home) = s.dir.parent() {
                        let _ = std::fs::remove_dir(home);
                    }
                });
            match spawned {
                Ok(t) => waits.push(t),
                Err(err) => warn!(error = %err, "cannot start an unmount thread"),
            }
        }
        for t in waits {
            let _ = t.join();
        }
    }
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("chmod {}: {e}", p.display()))
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.to_string_lossy().into_owned();
    let mut v: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| {
            m == &prefix
                || m.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .map(PathBuf::from)
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Detaches the layer mounts a previous run left (their connections died with it;
/// containers still running on them keep what they hold) and removes their directories.
fn clean_pool(pool_dir: &Path) {
    for m in mounts_under(pool_dir) {
        if m == pool_dir {
            continue;
        }
        match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => info!(dir = %m.display(), "detached a layer mount of a previous run"),
            Err(e) => warn!(dir = %m.display(), error = %e, "cannot detach a stale layer mount"),
        }
    }
    if let Ok(rd) = std::fs::read_dir(pool_dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir(e.path().join(MOUNT_DIR));
            let _ = std::fs::remove_dir(e.path());
        }
    }
}
