//! Image conversion to eStargz and zstd:chunked, without containerd.
//!
//! An image is read from a registry or an OCI image layout directory
//! (`oci:DIR[:TAG]`), its layers are rebuilt in parallel through temporary files
//! with the `estargz` crate, and the new layers, configs, manifests and index are
//! written to another registry repository or layout. Registry access goes through
//! the `registry` crate and its `Descriptor`, `ImageManifest` and `ImageIndex`
//! types; configs are edited as `serde_json` values so fields this crate does not
//! know survive.
//!
//! - [`convert`] converts one image (every selected platform of an index).
//! - [`inspect`] reports an image's layers, formats and TOC digests.
//! - [`optimize`] (a namespace of its own) runs the workload, records the files it
//!   reads and converts with them prioritized.
//! - [`Store`] and [`Location`] name where images live.
//!
//! Talking to containerd is not this crate's business (`containerd-pull` does it).

mod error;
mod external_toc;
mod inspect;
mod layer;
pub mod optimize;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use registry::{
    Descriptor, Digest, FetchedManifest, ImageIndex, ImageManifest, Manifest, Platform,
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX,
    OCI_LAYER_GZIP, OCI_MANIFEST,
};

pub use error::{Error, Result};
pub use external_toc::{fetch_external_toc, TocImage, LAYER_DIGEST_ANNOTATION};
pub use inspect::{get_toc, inspect, ImageReport, LayerReport, ManifestReport, TocInfo};
pub use layer::{LayerFormat, LayerOptions, Outcome, Target};
pub use store::{ImageBackend, LocalBlob, Location, Store, REF_NAME_ANNOTATION, TOC_IMAGE_SUFFIX};

/// OCI uncompressed layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI zstd layer.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker uncompressed layer.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker foreign (non-distributable) layer, never rewritten.
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// Receives one [`LayerEvent`] per finished layer.
pub type ProgressFn = Arc<dyn Fn(&LayerEvent) + Send + Sync>;

/// How to convert an image.
#[derive(Clone)]
pub struct ConvertOptions {
    pub layer: LayerOptions,
    /// Write OCI media types even when the source uses Docker ones.
    pub oci: bool,
    /// Platforms to keep from an index; empty means the host's.
    pub platforms: Vec<Platform>,
    /// Keep every platform of an index.
    pub all_platforms: bool,
    /// Layers converted at once.
    pub jobs: usize,
    /// Where temporary blobs go (the system's temp dir when `None`).
    pub workdir: Option<PathBuf>,
    /// Called once per layer as it finishes.
    pub progress: Option<ProgressFn>,
    /// Prioritized files per source layer, replacing `layer.prioritized_files`:
    /// a layer missing from the map gets none (and `.no.prefetch.landmark`).
    pub layer_prioritized: Option<Arc<HashMap<Digest, Vec<String>>>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            layer: LayerOptions::default(),
            oci: false,
            platforms: Vec::new(),
            all_platforms: false,
            jobs: 2,
            workdir: None,
            progress: None,
            layer_prioritized: None,
        }
    }
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("layer", &self.layer)
            .field("oci", &self.oci)
            .field("platforms", &self.platforms)
            .field("all_platforms", &self.all_platforms)
            .field("jobs", &self.jobs)
            .field("layer_prioritized", &self.layer_prioritized)
            .finish()
    }
}

/// One layer finished.
#[derive(Clone, Debug)]
pub struct LayerEvent {
    /// 1-based position among the distinct layers of the conversion.
    pub index: usize,
    pub total: usize,
    pub source: Digest,
    pub outcome: Outcome,
    pub digest: Digest,
    pub size: u64,
    /// Whether the blob had to be written to the target.
    pub uploaded: bool,
    pub elapsed: Duration,
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// Digest and media type of the top manifest or index written.
    pub digest: Digest,
    pub media_type: String,
    /// The image manifests written, with their platforms when from an index.
    pub manifests: Vec<Descriptor>,
    /// Per distinct source layer: what it became.
    pub layers: Vec<LayerEvent>,
    /// With an external TOC: the TOC image written beside the image.
    pub toc_image: Option<TocImage>,
}

/// A converted layer, ready to be named in manifests.
struct DoneLayer {
    outcome: Outcome,
    format: Option<LayerFormat>,
    digest: Digest,
    size: u64,
    diff_id: Option<String>,
    annotations: BTreeMap<String, String>,
    external_toc: Option<Vec<u8>>,
}

fn is_manifest(mt: &str) -> bool {
    mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
}

/// Layer media types this crate rewrites; anything else (foreign layers,
/// artifacts, attestations) is carried over untouched.
fn is_tar_layer(mt: &str) -> bool {
    matches!(
        mt,
        OCI_LAYER_GZIP | OCI_LAYER_TAR | OCI_LAYER_ZSTD | DOCKER_LAYER_GZIP | DOCKER_LAYER_TAR
    ) || mt == "application/vnd.docker.image.rootfs.diff.tar.zstd"
}

fn layer_media_type(format: LayerFormat, oci: bool) -> &'static str {
    match (format, oci) {
        (LayerFormat::Gzip, true) => OCI_LAYER_GZIP,
        (LayerFormat::Gzip, false) => DOCKER_LAYER_GZIP,
        (LayerFormat::Tar, true) => OCI_LAYER_TAR,
        (LayerFormat::Tar, false) => DOCKER_LAYER_TAR,
        (LayerFormat::Zstd, _) => OCI_LAYER_ZSTD,
    }
}

fn to_oci_layer_type(mt: &str) -> String {
    match mt {
        DOCKER_LAYER_GZIP => OCI_LAYER_GZIP.into(),
        DOCKER_LAYER_TAR => OCI_LAYER_TAR.into(),
        DOCKER_LAYER_FOREIGN => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into()
        }
        other => other.into(),
    }
}

fn parse_manifest(f: &FetchedManifest, what: &str) -> Result<ImageManifest> {
    match f.parse()? {
        Manifest::Image(m) => Ok(*m),
        Manifest::Index(_) => Err(Error::bad(
            what,
            "an index where an image manifest was expected",
        )),
    }
}

/// Converts the image at `src` and writes the result to `dst`.
pub async fn convert(src: &Store, dst: &Store, opts: &ConvertOptions) -> Result<ConvertReport> {
    if opts.layer.target == Target::Keep && !opts.oci {
        return Err(Error::Options(
            "nothing to do: ask for eStargz, zstd:chunked, uncompressed layers or OCI media types"
                .into(),
        ));
    }
    if opts.layer.external_toc && opts.layer.target != Target::Estargz {
        return Err(Error::Options(
            "an external TOC is only defined for eStargz layers".into(),
        ));
    }
    if opts.layer.keep_diff_id && !opts.layer.external_toc {
        return Err(Error::Options(
            "keeping diff IDs needs an external TOC (--estargz-external-toc)".into(),
        ));
    }
    if opts.layer.external_toc && opts.layer.reuse {
        // Every layer must be rebuilt for its TOC to go to the TOC image.
        return Err(Error::Options(
            "an external TOC cannot be combined with reusing layers".into(),
        ));
    }
    if opts.layer.keep_diff_id
        && (!opts.layer.prioritized_files.is_empty() || opts.layer_prioritized.is_some())
    {
        return Err(Error::Options(
            "keeping diff IDs cannot be combined with prioritized files (a record)".into(),
        ));
    }
    // The TOC image is named after the target's tag: fail before converting anything.
    if opts.layer.external_toc {
        dst.toc_image()?;
    }
    let root = src.root().await?;
    let (index, images): (
        Option<ImageIndex>,
        Vec<(Option<Descriptor>, FetchedManifest)>,
    ) = match root.parse()? {
        Manifest::Image(_) => (None, vec![(None, root.clone())]),
        Manifest::Index(idx) => {
            let wanted = if opts.platforms.is_empty() {
                vec![Platform::host()]
            } else {
                opts.platforms.clone()
            };
            let mut picked = Vec::new();
            for d in &idx.manifests {
                if !is_manifest(&d.media_type) {
                    tracing::warn!(digest = %d.digest, media_type = %d.media_type, "skipping index entry that is not an image manifest");
                    continue;
                }
                let keep = opts.all_platforms
                    || d.platform
                        .as_ref()
                        .is_some_and(|p| wanted.iter().any(|w| w.matches(p)));
                if keep {
                    picked.push(d.clone());
                }
            }
            if picked.is_empty() {
                return Err(Error::NoPlatform {
                    image: src.describe(),
                    wanted: wanted
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            let fetched =
                futures::future::try_join_all(picked.iter().map(|d| src.manifest(d))).await?;
            (
                Some(idx),
                picked.into_iter().map(Some).zip(fetched).collect(),
            )
        }
    };

    let mut manifests = Vec::with_capacity(images.len());
    for (desc, f) in &images {
        manifests.push((
            desc.clone(),
            parse_manifest(f, &format!("manifest {}", f.digest))?,
        ));
    }

    // Each distinct layer is converted once, however many platforms share it.
    let mut distinct: Vec<Descriptor> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (_, m) in &manifests {
        for l in &m.layers {
            if is_tar_layer(&l.media_type) && seen.insert(l.digest.clone()) {
                distinct.push(l.clone());
            }
        }
    }
    let workdir = opts.workdir.clone().unwrap_or_else(std::env::temp_dir);
    let total = distinct.len();
    let jobs = opts.jobs.max(1);
    let mut layer_opts = opts.layer.clone();
    if layer_opts.threads == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        layer_opts.threads = (cores / jobs.min(total.max(1))).max(1);
    }
    let layer_opts = Arc::new(layer_opts);
    let results: Vec<(Digest, DoneLayer, LayerEvent)> =
        futures::stream::iter(distinct.into_iter().enumerate())
            .map(|(i, desc)| {
                let src = src.clone();
                let dst = dst.clone();
                let workdir = workdir.clone();
                let layer_opts = match &opts.layer_prioritized {
                    Some(per_layer) => {
                        let mut o = LayerOptions::clone(&layer_opts);
                        o.prioritized_files =
                            per_layer.get(&desc.digest).cloned().unwrap_or_default();
                        // A layer the workload read must be rebuilt to carry its
                        // priorities, even if it already is eStargz.
                        o.reuse &= o.prioritized_files.is_empty();
                        Arc::new(o)
                    }
                    None => layer_opts.clone(),
                };
                let progress = opts.progress.clone();
                async move {
                    let started = Instant::now();
                    let (done, uploaded) =
                        convert_one(&src, &dst, &desc, &layer_opts, &workdir).await?;
                    let ev = LayerEvent {
                        index: i + 1,
                        total,
                        source: desc.digest.clone(),
                        outcome: done.outcome,
                        digest: done.digest.clone(),
                        size: done.size,
                        uploaded,
                        elapsed: started.elapsed(),
                    };
                    if let Some(p) = &progress {
                        p(&ev);
                    }
                    Ok::<_, Error>((desc.digest, done, ev))
                }
            })
            .buffer_unordered(jobs)
            .try_collect()
            .await?;
    let mut events: Vec<LayerEvent> = results.iter().map(|r| r.2.clone()).collect();
    events.sort_by_key(|e| e.index);
    let done: HashMap<Digest, DoneLayer> = results.into_iter().map(|(d, l, _)| (d, l)).collect();

    // Blobs the manifests keep but conversion never touched (foreign layers,
    // artifacts) must exist in the target too.
    for (_, m) in &manifests {
        for l in &m.layers {
            if !done.contains_key(&l.digest) {
                copy_blob(src, dst, l, &workdir).await?;
            }
        }
    }

    let zstd = opts.layer.target == Target::ZstdChunked;
    let mut written = Vec::with_capacity(manifests.len());
    for (desc, m) in &manifests {
        let (mt, bytes) = rewrite_image(src, dst, m, &done, opts.oci || zstd).await?;
        let mut out = Descriptor::for_bytes(&mt, &bytes);
        if let Some(d) = desc {
            out.platform = d.platform.clone();
            out.annotations = d.annotations.clone();
        }
        if index.is_some() {
            dst.put_manifest(&mt, bytes).await?;
        } else {
            let digest = dst.put_root(&mt, bytes).await?;
            let toc_image = write_tocs(dst, opts, &done).await?;
            return Ok(ConvertReport {
                digest,
                media_type: mt,
                manifests: vec![out],
                layers: events,
                toc_image,
            });
        }
        written.push(out);
    }
    let Some(idx) = index else {
        return Err(Error::bad(src.describe(), "no image manifest"));
    };
    let oci_index = opts.oci || zstd || idx.media_type.as_deref() != Some(DOCKER_MANIFEST_LIST);
    let media_type = if oci_index {
        OCI_INDEX
    } else {
        DOCKER_MANIFEST_LIST
    };
    let new_index = ImageIndex {
        schema_version: 2,
        media_type: Some(media_type.to_string()),
        manifests: written.clone(),
        annotations: idx.annotations.clone(),
    };
    let bytes = Bytes::from(
        serde_json::to_vec(&new_index).map_err(|e| Error::bad("new index", e.to_string()))?,
    );
    let digest = dst.put_root(media_type, bytes).await?;
    let toc_image = write_tocs(dst, opts, &done).await?;
    Ok(ConvertReport {
        digest,
        media_type: media_type.to_string(),
        manifests: written,
        layers: events,
        toc_image,
    })
}

/// Writes the TOC image when layers were built with an external TOC. Like the
/// reference, one TOC image serves every platform converted.
async fn write_tocs(
    dst: &Store,
    opts: &ConvertOptions,
    done: &HashMap<Digest, DoneLayer>,
) -> Result<Option<TocImage>> {
    if !opts.layer.external_toc {
        return Ok(None);
    }
    let tocs: Vec<(Digest, Vec<u8>)> = done
        .values()
        .filter_map(|d| d.external_toc.clone().map(|t| (d.digest.clone(), t)))
        .collect();
    Ok(Some(external_toc::write_toc_image(dst, &tocs).await?))
}

/// Fetches, converts and stores one layer. Returns what it became and whether
/// bytes were written to the target.
async fn convert_one(
    src: &Store,
    dst: &Store,
    desc: &Descriptor,
    opts: &Arc<LayerOptions>,
    workdir: &std::path::Path,
) -> Result<(DoneLayer, bool)> {
    let local = src.fetch_blob(desc, workdir).await?;
    let path = local.path().to_path_buf();
    let (digest, size) = (desc.digest.clone(), desc.size);
    let o = opts.clone();
    let wd = workdir.to_path_buf();
    let c = tokio::task::spawn_blocking(move || layer::convert_blob(&path, &digest, size, &o, &wd))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let blob_path = match &c.file {
        Some(f) => f.path().to_path_buf(),
        None => local.path().to_path_buf(),
    };
    let uploaded = dst.put_blob_file(&c.digest, &blob_path).await?;
    tracing::info!(source = %desc.digest, digest = %c.digest, outcome = %c.outcome, uploaded, "layer done");
    Ok((
        DoneLayer {
            outcome: c.outcome,
            format: c.format,
            digest: c.digest,
            size: c.size,
            diff_id: c.diff_id,
            annotations: c.annotations,
            external_toc: c.external_toc,
        },
        uploaded,
    ))
}

async fn copy_blob(
    src: &Store,
    dst: &Store,
    desc: &Descriptor,
    workdir: &std::path::Path,
) -> Result<()> {
    if desc.urls.as_ref().is_some_and(|u| !u.is_empty()) || dst.has_blob(&desc.digest).await? {
        // Foreign layers live at their URLs; a blob the target has needs nothing.
        return Ok(());
    }
    let local = src.fetch_blob(desc, workdir).await?;
    dst.put_blob_file(&desc.digest, local.path()).await?;
    Ok(())
}

/// Writes the new config and returns the new manifest's media type and bytes.
async fn rewrite_image(
    src: &Store,
    dst: &Store,
    m: &ImageManifest,
    done: &HashMap<Digest, DoneLayer>,
    oci: bool,
) -> Result<(String, Bytes)> {
    let was_oci =
        m.media_type.as_deref() != Some(DOCKER_MANIFEST) && m.config.media_type != DOCKER_CONFIG;
    let oci = oci || was_oci;
    let mut layers = Vec::with_capacity(m.layers.len());
    let mut diff_changes: Vec<(usize, String)> = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        let mut nl = l.clone();
        match done.get(&l.digest) {
            Some(d) => {
                nl.digest = d.digest.clone();
                nl.size = d.size;
                if let Some(f) = d.format {
                    nl.media_type = layer_media_type(f, oci).to_string();
                } else if oci {
                    nl.media_type = to_oci_layer_type(&l.media_type);
                }
                if d.outcome != Outcome::Unchanged {
                    let mut a = nl.annotations.take().unwrap_or_default();
                    for k in layer::FORMAT_ANNOTATIONS {
                        a.remove(k);
                    }
                    a.extend(d.annotations.clone());
                    nl.annotations = (!a.is_empty()).then_some(a);
                }
                if let Some(id) = &d.diff_id {
                    diff_changes.push((i, id.clone()));
                }
            }
            None => {
                if oci {
                    nl.media_type = to_oci_layer_type(&l.media_type);
                }
            }
        }
        layers.push(nl);
    }

    let config_bytes = src.blob_bytes(&m.config.digest).await?;
    let mut config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::bad(format!("config {}", m.config.digest), e.to_string()))?;
    let ids = config
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(|d| d.as_array_mut())
        .ok_or_else(|| Error::bad(format!("config {}", m.config.digest), "no rootfs.diff_ids"))?;
    let mut config_changed = false;
    if !diff_changes.is_empty() {
        if ids.len() != m.layers.len() {
            return Err(Error::bad(
                format!("config {}", m.config.digest),
                format!("{} diff_ids for {} layers", ids.len(), m.layers.len()),
            ));
        }
        for (i, id) in diff_changes {
            if ids[i].as_str() != Some(id.as_str()) {
                ids[i] = serde_json::Value::String(id);
                config_changed = true;
            }
        }
    }
    let mut config_desc = m.config.clone();
    if oci && config_desc.media_type == DOCKER_CONFIG {
        config_desc.media_type = OCI_CONFIG.to_string();
    }
    if config_changed {
        let bytes = Bytes::from(
            serde_json::to_vec(&config).map_err(|e| Error::bad("new config", e.to_string()))?,
        );
        config_desc.size = bytes.len() as u64;
        config_desc.digest = dst.put_blob_bytes(bytes).await?;
    } else if !dst.has_blob(&m.config.digest).await? {
        dst.put_blob_bytes(config_bytes).await?;
    }

    let media_type = if oci { OCI_MANIFEST } else { DOCKER_MANIFEST };
    let new = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type.to_string()),
        config: config_desc,
        layers,
        annotations: m.annotations.clone(),
        subject: m.subject.clone(),
        artifact_type: m.artifact_type.clone(),
    };
    let bytes = serde_json::to_vec(&new).map_err(|e| Error::bad("new manifest", e.to_string()))?;
    Ok((media_type.to_string(), Bytes::from(bytes)))
}
