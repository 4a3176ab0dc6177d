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
use crate::early_tail::{EarlyTail, TailFilled};
use crate::learned::Learned;

type Opening = Shared<BoxFuture<'static, Result<Arc<fs::Layer>, MountError>>>;
type Resolving = Shared<BoxFuture<'static, Result<Arc<Resolved>, MountError>>>;

/// An image's manifest as resolved for this host: its digest (which names the image's
/// learned-prefetch record) and the manifest (config and layers).
struct Resolved {
    digest: Digest,
    manifest: registry::ImageManifest,
}

/// Most layers besides the requested one whose endpoint look-up starts before the
/// manifest is in: the labels' list is outside input.
const MAX_EARLY_PROBES: usize = 32;

/// How long one manifest lookup serves the Prepares of the same image.
const MANIFEST_TTL: Duration = Duration::from_secs(60);

/// Key of an opening layer: blob digest and the TOC digest it is checked against.
type LayerKey = (String, String);

/// Layers being opened (or opened) before anything mounts them.
pub struct LayerPool {
    client: registry::Client,
    cfg: fs::Config,
    cache: Arc<fs::ChunkCache>,
    metrics: fs::FsMetrics,
    manifests: Mutex<HashMap<String, (Instant, Resolving)>>,
    opening: Mutex<HashMap<LayerKey, (Instant, Opening)>>,
    zeroconf: crate::zeroconf::ZeroConfig,
    learned: Option<Arc<Learned>>,
    /// TOC sizes seen per repository, for layers whose descriptor tells none.
    tails: Arc<fs::TailSizes>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LayerPool {
    pub fn new(
        client: registry::Client,
        cfg: fs::Config,
        cache: Arc<fs::ChunkCache>,
        metrics: fs::FsMetrics,
    ) -> Self {
        LayerPool {
            client,
            cfg,
            cache,
            metrics,
            manifests: Mutex::default(),
            opening: Mutex::default(),
            zeroconf: crate::zeroconf::ZeroConfig::default(),
            learned: None,
            tails: Arc::default(),
        }
    }

    /// Hands the layers of each image opened to `learned` for its prefetch.
    pub fn with_learned(mut self, learned: Arc<Learned>) -> Self {
        self.learned = Some(learned);
        self
    }

    /// The manifest digest of the image `image_ref` names (the remembered look-up, or
    /// a new one).
    pub async fn image_digest(&self, image_ref: &str) -> Option<Digest> {
        let reference = Reference::parse(image_ref).ok()?;
        let resolved = self.manifest(image_ref, &reference).await.ok()?;
        Some(resolved.digest.clone())
    }

    /// The layer `info` describes, opened and checked against the TOC digest of its
    /// labels. Starts opening the image's other eStargz layers on the way, and hands
    /// them all to learned prefetch (which never holds this call up).
    pub async fn open(&self, info: &RemoteLayer) -> Result<Arc<fs::Layer>, MountError> {
        self.expire();
        let reference = Reference::parse(&info.image_ref)
            .map_err(|e| MountError::InvalidLabels(e.to_string()))?;
        let digest = info.digest.clone();
        let cfg = layer_config(&self.cfg, info);
        let mut size = None;
        let mut hint = None;
        let mut tail = None;
        // The image's eStargz layers being opened, bottom first (`None`: this one).
        let mut image_layers: Vec<Option<Opening>> = Vec::new();
        let mut ahead = Vec::new();
        // The endpoint look-ups (which endpoint has the blob, and its size) of this
        // layer and of the others its labels list go out beside the manifest's instead
        // of after it: one round trip less before each TOC.
        let mut early: HashMap<String, Arc<registry::BlobReader>> = std::iter::once(digest.clone())
            .chain(
                info.layers
                    .iter()
                    .filter_map(|l| Digest::parse(l).ok())
                    .filter(|d| *d != digest)
                    .take(MAX_EARLY_PROBES),
            )
            .filter_map(|d| Some((d.to_string(), self.early_reader(&reference, &d)?)))
            .collect();
        // This layer's tail goes out now, as a suffix read that needs no size, instead
        // of after the manifest: the layer's TOC (which its mount waits for) arrives a
        // round trip sooner. It tells the blob's size too, so it needs no probe. Only a
        // layer with a TOC digest in its labels is eStargz for sure; a plain layer's
        // tail would be read for nothing.
        let repository = repository_key(&reference);
        let early_tail = early
            .get(&digest.to_string())
            .filter(|_| info.toc_digest.is_some())
            .map(|reader| {
                // Sized by the layer's own `toc-tail` label when containerd passed it
                // on, else by what this repository's layers needed before.
                let len = self
                    .tails
                    .hint(&repository, info.toc_tail)
                    .unwrap_or(fs::TAIL_READ)
                    .clamp(fs::MIN_TAIL_READ, fs::MAX_TAIL_READ);
                EarlyTail::start(reader.clone(), len)
            });
        probe(
            early
                .iter()
                .filter(|(d, _)| early_tail.is_none() || **d != digest.to_string())
                .map(|(_, r)| r.clone())
                .collect(),
        );
        let resolved = self.manifest(&info.image_ref, &reference).await;
        let record = match (&self.learned, &resolved) {
            (Some(learned), Ok(resolved)) => learned
                .lookup(
                    self.client.clone(),
                    reference.clone(),
                    resolved.digest.clone(),
                )
                .map(|f| RecordLookup {
                    learned: learned.clone(),
                    record: f.shared(),
                }),
            _ => None,
        };
        match &resolved {
            Ok(resolved) => {
                for d in resolved.manifest.layers.iter() {
                    if d.digest == digest {
                        image_layers.push(None);
                        size = Some(d.size);
                        hint = prefetch_end_hint(d);
                        tail = toc_tail_hint(d);
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
                        let opening = self.start(
                            &reference,
                            Blob {
                                reader: early.remove(&d.digest.to_string()),
                                digest: d.digest.clone(),
                                size: Some(d.size),
                                tail: None,
                            },
                            toc,
                            Hints {
                                head: prefetch_end_hint(d),
                                toc_tail: toc_tail_hint(d),
                                record: record.clone(),
                            },
                            &cfg,
                        );
                        image_layers.push(Some(opening.clone()));
                        ahead.push((d.digest.to_string(), opening));
                    }
                }
            }
            Err(e) => debug!(image = %info.image_ref, error = %e,
                "no manifest; opening only the requested layer"),
        }
        // This layer is checked against the TOC digest containerd gave, never the one
        // the manifest carries now (the tag may have moved since the pull).
        let opening = self.start(
            &reference,
            Blob {
                reader: early.remove(&digest.to_string()),
                digest: digest.clone(),
                size,
                tail: early_tail,
            },
            info.toc_digest.clone(),
            Hints {
                head: hint,
                toc_tail: tail,
                record,
            },
            &cfg,
        );
        locked(&self.opening).remove(&key(&info.digest.to_string(), &info.toc_digest));
        if let Ok(resolved) = &resolved {
            let layers = image_layers
                .into_iter()
                .map(|o| o.unwrap_or_else(|| opening.clone()))
                .collect();
            // What a learned record names is what the workload read; zero-config's
            // guesses would only add parsing and bytes beside it.
            let learned_instead = match &self.learned {
                Some(l) => l.has_record(
                    self.client.clone(),
                    reference.clone(),
                    resolved.digest.clone(),
                ),
                None => futures::future::ready(false).boxed(),
            };
            self.zeroconf.start(
                &cfg,
                &self.client,
                &reference,
                &resolved.manifest.config,
                layers,
                learned_instead,
                &self.metrics,
            );
        }
        if let (Some(learned), Ok(resolved)) = (&self.learned, &resolved) {
            ahead.push((info.digest.to_string(), opening.clone()));
            let layers = ahead
                .into_iter()
                .map(|(d, o)| (d, o.map(Result::ok).boxed()))
                .collect();
            learned.image_opening(
                self.client.clone(),
                reference.clone(),
                resolved.digest.clone(),
                layers,
            );
        }
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
        // `resolve_result_entry_ttl_sec`: how long a layer opened ahead waits for its
        // Prepare before it is dropped.
        let ttl = self.cfg.resolve_result_ttl();
        locked(&self.opening).retain(|_, (t, _)| now.duration_since(*t) < ttl);
        locked(&self.manifests).retain(|_, (t, _)| now.duration_since(*t) < MANIFEST_TTL);
    }

    /// The layers of the image, for this host's platform; one lookup per image at a time.
    async fn manifest(
        &self,
        image_ref: &str,
        reference: &Reference,
    ) -> Result<Arc<Resolved>, MountError> {
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
                            .map(|img| {
                                Arc::new(Resolved {
                                    digest: img.digest,
                                    manifest: img.manifest,
                                })
                            })
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

    /// A new reader for `digest`, unless the layer is already opening (its reader has
    /// looked its endpoint up).
    fn early_reader(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Option<Arc<registry::BlobReader>> {
        let d = digest.to_string();
        if locked(&self.opening)
            .keys()
            .any(|(opening, _)| *opening == d)
        {
            return None;
        }
        Some(Arc::new(self.client.blob_reader(
            reference,
            digest.clone(),
            None,
        )))
    }

    /// Starts opening a layer unless it is already on its way; prefetch follows the open
    /// on the fetch pool, so a mount that comes later finds the prioritized files cached
    /// or arriving.
    fn start(
        &self,
        reference: &Reference,
        blob: Blob,
        toc_digest: Option<String>,
        hints: Hints,
        cfg: &fs::Config,
    ) -> Opening {
        let Blob {
            digest,
            size,
            reader: early,
            tail: early_tail,
        } = blob;
        let k = key(&digest.to_string(), &toc_digest);
        let mut map = locked(&self.opening);
        if let Some((_, o)) = map.get(&k) {
            return o.clone();
        }
        let reader = early
            .unwrap_or_else(|| Arc::new(self.client.blob_reader(reference, digest.clone(), size)));
        if let Some(s) = size {
            reader.know_size(s);
        }
        let (cfg, cache, metrics) = (cfg.clone(), self.cache.clone(), self.metrics.clone());
        let tails = self.tails.clone();
        let repository = repository_key(reference);
        let handle = tokio::runtime::Handle::current();
        let toc_source = external_toc_source(
            self.client.clone(),
            reference.clone(),
            digest.clone(),
            handle.clone(),
        );
        let task = tokio::task::spawn_blocking(move || {
            // Without the manifest's size, the early tail's reply tells it.
            let size = match size.or_else(|| early_tail.as_ref()?.wait(&handle).map(|(s, _)| s)) {
                Some(s) => s,
                None => {
                    let started = Instant::now();
                    let s = handle.block_on(reader.size());
                    let layer = digest.to_string();
                    metrics.observe_ms(fs::metrics::Op::HeaderGet, &layer, started.elapsed());
                    s.map_err(|e| classify::registry_error(&e).context(format!("blob {digest}")))?
                }
            };
            let fetcher = fs::RegistryFetcher::shared(reader, handle.clone(), size);
            if toc_digest.is_none() && !cfg.disable_verification && !cfg.allow_no_verification {
                return Err(without_toc_digest(&fetcher, &digest));
            }
            let desc = fs::LayerDesc {
                digest: digest.to_string(),
                size: fs::Fetcher::size(&fetcher),
                toc_digest,
                toc_tail: tails.hint(&repository, hints.toc_tail),
            };
            // The head (prioritized files) is asked for alongside the TOC: no round trip
            // of the link goes by idle between the two.
            let head = fs::speculative_head(&cfg, hints.head);
            let (fetcher, filled): (Arc<dyn fs::Fetcher>, _) = match early_tail {
                Some(t) => {
                    let f = Arc::new(TailFilled::new(fetcher, t, handle.clone()));
                    (f.clone(), Some(f))
                }
                None => (Arc::new(fetcher), None),
            };
            let opened = fs::Layer::open_with(fetcher, desc, &cfg, cache, Some(toc_source), head);
            if let Some(f) = filled {
                f.release();
            }
            let layer = opened.map_err(|e| classify::fs_error(&e))?;
            tails.learn(&repository, layer.toc_tail());
            let layer = Arc::new(layer);
            layer.observe_with(&metrics);
            if !cfg.noprefetch {
                // The mount starts it too; it runs once either way.
                match (fs::FetchPool::shared(), &hints.record) {
                    (Ok(pool), Some(lookup)) => lookup.start_prefetch(&handle, &layer, pool),
                    (Ok(pool), None) => layer.start_prefetch(&pool),
                    (Err(e), _) => warn!(error = %e, "cannot start prefetch; the mount will do it"),
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

/// The blob of a layer to open: its digest, its size when the manifest told it, and a
/// reader whose endpoint look-up went out early, if one did.
struct Blob {
    digest: Digest,
    size: Option<u64>,
    reader: Option<Arc<registry::BlobReader>>,
    /// Its tail, asked for before the manifest came (see [`EarlyTail`]).
    tail: Option<EarlyTail>,
}

/// Starts the endpoint look-ups of `readers`, all on one blocking thread (the registry
/// client's futures are not Send). A failure is met again, and reported, by the
/// opening's first read.
fn probe(readers: Vec<Arc<registry::BlobReader>>) {
    if readers.is_empty() {
        return;
    }
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        handle.block_on(futures::future::join_all(readers.iter().map(|r| r.size())));
    });
}

/// Why a layer without a TOC digest is not served: it is no eStargz at all (a plain
/// layer, the common case), or an eStargz layer that cannot be verified. One read of
/// the blob's tail tells them apart, so the fallback names the reason that helps.
fn without_toc_digest(fetcher: &fs::RegistryFetcher, digest: &Digest) -> MountError {
    let size = fs::Fetcher::size(fetcher);
    let tail = size.min(estargz::MAX_FOOTER_SIZE as u64);
    let range = size - tail..size;
    let bytes = match fs::Fetcher::read_ranges(fetcher, std::slice::from_ref(&range)) {
        Ok(mut parts) if parts.len() == 1 => parts.remove(0),
        Ok(_) => return MountError::Other(format!("blob {digest}: short read of its tail")),
        Err(e) => return classify::io_error(&e).context(format!("blob {digest}")),
    };
    match estargz::Footer::detect(&bytes, size) {
        Err(e) => MountError::NotEstargz(format!("layer {digest}: {e}")),
        Ok(_) => MountError::Unverifiable(format!(
            "eStargz layer {digest} has no TOC digest annotation \
             (allow_no_verification serves such layers unverified)"
        )),
    }
}

/// The filesystem settings for the layers one Prepare opens, from its labels as the
/// reference reads them: an unverifiable layer (no TOC digest) only with both
/// `allow_no_verification` and the `stargz.skipverify` label, and the `stargz.prefetch`
/// label's size instead of `prefetch_size` for layers without a prefetch landmark.
pub(crate) fn layer_config(base: &fs::Config, info: &RemoteLayer) -> fs::Config {
    let mut cfg = base.clone();
    cfg.allow_no_verification = base.allow_no_verification && info.skip_verify;
    if let Some(n) = info.prefetch_size {
        cfg.prefetch_size = i64::try_from(n).unwrap_or(i64::MAX);
    }
    cfg
}

/// Most bytes of one external TOC fetched (the reader's own TOC limit).
const MAX_EXTERNAL_TOC: u64 = 256 << 20;

/// Where the TOC of a blob built with an external TOC comes from: the image's TOC
/// image (`<tag>-esgztoc` in the same repository), whose layer annotated with the
/// blob's digest holds it, as the reference snapshotter finds it. Only called when
/// the blob's footer says so, on the opening (blocking) thread.
fn external_toc_source(
    client: registry::Client,
    reference: Reference,
    digest: Digest,
    handle: tokio::runtime::Handle,
) -> estargz::ExternalTocFn {
    Arc::new(move || {
        handle
            .block_on(fetch_external_toc(&client, &reference, &digest))
            .map_err(std::io::Error::other)
    })
}

async fn fetch_external_toc(
    client: &registry::Client,
    reference: &Reference,
    digest: &Digest,
) -> Result<Vec<u8>, String> {
    let tag = reference
        .tag()
        .ok_or_else(|| format!("{reference} has no tag to name its TOC image after"))?;
    let toc_ref = reference
        .at_tag(&format!("{tag}{}", remote_layer::TOC_IMAGE_SUFFIX))
        .map_err(|e| e.to_string())?;
    let img = client
        .resolve_image(&toc_ref, &registry::Platform::host())
        .await
        .map_err(|e| format!("TOC image {toc_ref}: {e}"))?;
    let want = digest.to_string();
    let layer = img
        .manifest
        .layers
        .iter()
        .find(|l| {
            l.annotations
                .as_ref()
                .and_then(|a| a.get(annotation::EXTERNAL_TOC_LAYER_DIGEST))
                .is_some_and(|d| *d == want)
        })
        .ok_or_else(|| format!("TOC image {toc_ref} has no TOC for layer {digest}"))?;
    if layer.size > MAX_EXTERNAL_TOC {
        return Err(format!(
            "TOC of layer {digest} in {toc_ref} is {} bytes, over {MAX_EXTERNAL_TOC}",
            layer.size
        ));
    }
    debug!(layer = %digest, toc_image = %toc_ref, "fetching the external TOC");
    let bytes = client
        .blob_reader(&toc_ref, layer.digest.clone(), Some(layer.size))
        .read_all()
        .await
        .map_err(|e| format!("TOC of layer {digest} in {toc_ref}: {e}"))?;
    Ok(bytes.to_vec())
}

/// The `prefetch-end` annotation this project's converter writes (bytes at the start of
/// the blob holding the prioritized files; 0 for none), if the descriptor has a valid one.
fn prefetch_end_hint(d: &registry::Descriptor) -> Option<u64> {
    annotation::prefetch_end(d.annotations.as_ref()?, d.size)
}

/// Bytes at the end of the blob holding TOC and footer, as the descriptor tells
/// (`toc-tail`, or zstd:chunked's manifest position); the open bounds it.
fn toc_tail_hint(d: &registry::Descriptor) -> Option<u64> {
    annotation::toc_tail(d.annotations.as_ref()?, d.size)
}

/// The key [`fs::TailSizes`] remembers a repository's tails by.
fn repository_key(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// What a layer's descriptor says about where to read first.
#[derive(Clone)]
struct Hints {
    /// Bytes at the blob's start holding the prioritized files (`prefetch-end`).
    head: Option<u64>,
    /// Bytes at the blob's end holding TOC and footer.
    toc_tail: Option<u64>,
    /// The image's learned-prefetch record, waited for (briefly) before a layer with
    /// prioritized files starts its prefetch.
    record: Option<RecordLookup>,
}

/// One image's learned-prefetch record on its way, shared by its layers' openings.
#[derive(Clone)]
struct RecordLookup {
    learned: Arc<Learned>,
    record: Shared<BoxFuture<'static, Option<Arc<remote_layer::prefetch_record::Record>>>>,
}

/// Longest a layer's prefetch waits for the image's record: the look-up runs beside the
/// TOC's fetch, so it is normally in by then; a registry slow to say it has none must
/// not hold the prioritized files back for long.
const RECORD_WAIT: Duration = Duration::from_millis(500);

impl RecordLookup {
    /// Starts `layer`'s prefetch on `pool`: for a layer with prioritized files, once the
    /// record (if any) has planned it. The layer's opening (and so its Prepare) does not
    /// wait for the record: the prefetch is held meanwhile, a mount's start with it.
    fn start_prefetch(
        &self,
        handle: &tokio::runtime::Handle,
        layer: &Arc<fs::Layer>,
        pool: fs::FetchPool,
    ) {
        if layer.index().prefetch_end.is_none() || !layer.hold_prefetch() {
            layer.start_prefetch(&pool);
            return;
        }
        /// Releases the held prefetch on every way out, a dropped task included.
        struct Release(Arc<fs::Layer>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.release_prefetch();
            }
        }
        let (this, layer) = (self.clone(), layer.clone());
        handle.spawn(async move {
            let release = Release(layer.clone());
            match tokio::time::timeout(RECORD_WAIT, this.record.clone()).await {
                Ok(Some(rec)) => {
                    this.learned.plan_layer(&rec, &layer);
                }
                Ok(None) => {}
                Err(_) => debug!(layer = %layer.desc().digest,
                    "learned-prefetch record not in yet; prefetching the prioritized region"),
            }
            drop(release);
            layer.start_prefetch(&pool);
        });
    }
}

/// A task that panicked or was cancelled.
fn joined(e: tokio::task::JoinError) -> MountError {
    MountError::Other(e.to_string())
}

fn key(digest: &str, toc_digest: &Option<String>) -> LayerKey {
    (digest.to_string(), toc_digest.clone().unwrap_or_default())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]
mod tests {
    use super::*;

    fn anonymous_pool(cfg: fs::Config) -> LayerPool {
        let client = registry::Client::new(
            registry::RegistryConfig::default(),
            Arc::new(registry::Anonymous),
        )
        .expect("client");
        LayerPool::new(
            client,
            cfg,
            Arc::new(fs::ChunkCache::memory(8 << 20)),
            fs::FsMetrics::default(),
        )
    }

    /// The labels of the Prepare for layer `digest` of the image at `image_ref`.
    fn image_layer(
        image_ref: String,
        digest: Digest,
        layers: &[String],
        toc_digest: Option<String>,
    ) -> RemoteLayer {
        RemoteLayer {
            image_ref,
            digest,
            layers: layers.to_vec(),
            toc_digest,
            uncompressed_digest: None,
            uncompressed_size: None,
            skip_verify: false,
            prefetch_size: None,
            toc_tail: None,
        }
    }

    /// The requested layer's tail is asked for with a suffix range while the manifest
    /// is still on its way, and the open takes its TOC from that reply: the layer
    /// opens with no other request for the blob's end, and with no HEAD for its size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tail_goes_out_before_the_manifest_comes() {
        let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
            return;
        };
        let mut tar = tar::Builder::new(Vec::new());
        for i in 0..40u64 {
            let data = testenv::random_bytes(20_000, 100 + i);
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, format!("f{i:02}"), &data[..])
                .unwrap();
        }
        let tar = tar.into_inner().unwrap();
        let mut blob = Vec::new();
        let built =
            estargz::build(&tar[..], &mut blob, &estargz::BuildOptions::default()).expect("build");
        let pushed = testenv::push_image(
            &reg.base_url(),
            "early/tail",
            "v1",
            std::slice::from_ref(&blob),
        )
        .await;
        let front = testenv::Front::start(testenv::FrontOpts {
            upstream: reg.base_url(),
            manifest_delay_ms: 400,
            ..Default::default()
        })
        .await;
        let pool = anonymous_pool(fs::Config {
            noprefetch: true,
            ..fs::Config::default()
        });
        let digest = pushed.layer_digests[0].clone();
        let info = image_layer(
            format!("{}/early/tail:v1", front.host()),
            Digest::parse(&digest).expect("digest"),
            &pushed.layer_digests,
            Some(built.toc_digest.clone()),
        );
        let layer = pool.open(&info).await.expect("open");
        assert!(layer.index().len() > 40);
        let log = front.stats.log.lock().expect("log").clone();
        let manifest = log
            .iter()
            .find(|l| l.path.contains("/manifests/"))
            .expect("manifest request");
        let for_blob: Vec<_> = log.iter().filter(|l| l.path.ends_with(&digest)).collect();
        let first = for_blob.first().expect("a request for the blob");
        assert!(
            first
                .range
                .as_deref()
                .is_some_and(|r| r.starts_with("bytes=-")),
            "the first request is no suffix read: {for_blob:?}"
        );
        assert!(
            first.received < manifest.answered,
            "the tail was asked for after the manifest came: {log:?}"
        );
        assert_eq!(
            for_blob.len(),
            1,
            "more requests for the blob: {for_blob:?}"
        );
    }

    /// A layer without a TOC digest in its labels may be no eStargz at all: its tail is
    /// not read ahead (the refusal reads only the footer's bytes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_layer_without_toc_digest_gets_no_early_tail() {
        let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
            return;
        };
        let layers = [testenv::random_bytes(700_000, 7)];
        let pushed = testenv::push_image(&reg.base_url(), "early/plain", "v1", &layers).await;
        let front = testenv::Front::start(testenv::FrontOpts {
            upstream: reg.base_url(),
            ..Default::default()
        })
        .await;
        let pool = anonymous_pool(fs::Config::default());
        let info = image_layer(
            format!("{}/early/plain:v1", front.host()),
            Digest::parse(&pushed.layer_digests[0]).expect("digest"),
            &pushed.layer_digests,
            None,
        );
        assert!(pool.open(&info).await.is_err());
        let log = front.stats.log.lock().expect("log").clone();
        let blob: Vec<_> = log
            .iter()
            .filter(|l| l.path.ends_with(pushed.layer_digests[0].as_str()))
            .collect();
        assert!(!blob.is_empty(), "{log:?}");
        assert!(
            blob.iter()
                .all(|l| !l.range.as_deref().is_some_and(|r| r.starts_with("bytes=-"))),
            "a plain layer's tail was read ahead: {blob:?}"
        );
    }

    /// At the first Prepare, every listed layer's endpoint look-up is on the wire while
    /// the manifest is still on its way: the TOC reads that follow the manifest find
    /// their endpoint and size known.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_endpoint_look_ups_go_out_beside_the_manifest() {
        let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
            return;
        };
        let layers = [
            testenv::random_bytes(50_000, 1),
            testenv::random_bytes(60_000, 2),
        ];
        let pushed = testenv::push_image(&reg.base_url(), "early/probe", "v1", &layers).await;
        let front = testenv::Front::start(testenv::FrontOpts {
            upstream: reg.base_url(),
            manifest_delay_ms: 400,
            ..Default::default()
        })
        .await;
        let pool = anonymous_pool(fs::Config::default());
        let info = image_layer(
            format!("{}/early/probe:v1", front.host()),
            Digest::parse(&pushed.layer_digests[0]).expect("digest"),
            &pushed.layer_digests,
            Some(format!("sha256:{}", "0".repeat(64))),
        );
        // The blobs are no eStargz: the opening fails, after the look-ups this is about.
        let opened = pool.open(&info).await;
        assert!(opened.is_err());
        let log = front.stats.log.lock().expect("log").clone();
        let manifest = log
            .iter()
            .find(|l| l.path.contains("/manifests/"))
            .expect("manifest request");
        for d in &pushed.layer_digests {
            let first = log
                .iter()
                .find(|l| l.path.ends_with(d.as_str()))
                .unwrap_or_else(|| panic!("no request for {d}: {log:?}"));
            assert!(
                first.received < manifest.answered,
                "layer {d} was first asked for after the manifest came: {log:?}"
            );
        }
    }
}
