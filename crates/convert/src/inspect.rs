//! Read-only views of an image: per-layer format, TOC digest, prioritized
//! file count and sizes, and a layer's raw TOC. Only the tail of each layer
//! is read (ranged requests against a registry).

use registry::{Descriptor, Digest, Manifest, Platform};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::Store;

/// One layer as found.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// `estargz`, `zstd:chunked`, `stargz` (legacy footer) or `plain` (no TOC found).
    pub format: String,
    /// Digest of the TOC read from the blob.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toc_digest: Option<oci_digest::Digest>,
    /// The `containerd.io/snapshot/stargz/toc.digest` annotation, as written
    /// (it is input, shown even when it is not a digest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotated_toc_digest: Option<String>,
    /// TOC entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<usize>,
    /// Files placed before `.prefetch.landmark` (0 without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prioritized_files: Option<usize>,
    /// The `io.containers.estargz.uncompressed-size` annotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
    /// Why the TOC could not be read, if it looked like it should have been.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One image manifest.
#[derive(Clone, Debug, Serialize)]
pub struct ManifestReport {
    pub digest: Digest,
    pub media_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub config: Digest,
    pub layers: Vec<LayerReport>,
}

/// An image.
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    pub image: String,
    pub digest: Digest,
    pub media_type: String,
    pub manifests: Vec<ManifestReport>,
}

/// A layer's TOC.
#[derive(Clone, Debug)]
pub struct TocInfo {
    pub digest: oci_digest::Digest,
    /// The TOC JSON exactly as stored.
    pub json: Vec<u8>,
}

/// The image manifests of `src` (every platform when `platform` is `None`).
async fn manifests(
    src: &Store,
    platform: Option<&Platform>,
) -> Result<(
    registry::FetchedManifest,
    Vec<(Option<Descriptor>, registry::FetchedManifest)>,
)> {
    let root = src.root().await?;
    let list = match root.parse()? {
        Manifest::Image(_) => vec![(None, root.clone())],
        Manifest::Index(idx) => {
            let mut out = Vec::new();
            for d in idx.manifests {
                if d.media_type != registry::OCI_MANIFEST
                    && d.media_type != registry::DOCKER_MANIFEST
                {
                    continue;
                }
                if let Some(want) = platform {
                    if !d.platform.as_ref().is_some_and(|p| want.matches(p)) {
                        continue;
                    }
                }
                let f = src.manifest(&d).await?;
                out.push((Some(d), f));
            }
            out
        }
    };
    Ok((root, list))
}

/// Reads a layer's TOC, failing if it has none.
async fn read_toc(src: &Store, desc: &Descriptor) -> Result<estargz::RawToc> {
    let src = src.clone();
    let desc = desc.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || -> Result<estargz::RawToc> {
        let blob = src.blob_source(&desc)?;
        // Read only when the footer says the TOC lives in the image's TOC image.
        let (store, layer) = (src.clone(), desc.digest.clone());
        let external: estargz::ExternalTocFn = std::sync::Arc::new(move || {
            handle
                .block_on(crate::external_toc::fetch_external_toc(&store, &layer))
                .map_err(std::io::Error::other)
        });
        let opts = estargz::OpenOptions {
            tail_size: 64 << 10,
            external_toc: Some(external),
            ..Default::default()
        };
        Ok(estargz::read_toc(blob.as_ref(), &opts)?)
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
}

/// Reports every layer of the image at `src`.
pub async fn inspect(src: &Store, platform: Option<&Platform>) -> Result<ImageReport> {
    let (root, list) = manifests(src, platform).await?;
    let mut out = Vec::new();
    for (desc, f) in list {
        let m = match f.parse()? {
            Manifest::Image(m) => m,
            Manifest::Index(_) => continue,
        };
        let mut layers = Vec::new();
        for l in &m.layers {
            layers.push(inspect_layer(src, l).await);
        }
        out.push(ManifestReport {
            digest: f.digest.clone(),
            media_type: f.media_type.clone(),
            platform: desc.and_then(|d| d.platform).map(|p| p.to_string()),
            config: m.config.digest.clone(),
            layers,
        });
    }
    Ok(ImageReport {
        image: src.describe(),
        digest: root.digest,
        media_type: root.media_type,
        manifests: out,
    })
}

async fn inspect_layer(src: &Store, l: &Descriptor) -> LayerReport {
    let ann = l.annotations.clone().unwrap_or_default();
    let get = |k: &str| ann.get(k).cloned();
    let mut r = LayerReport {
        digest: l.digest.clone(),
        media_type: l.media_type.clone(),
        size: l.size,
        format: "plain".into(),
        toc_digest: None,
        annotated_toc_digest: get(estargz::TOC_DIGEST_ANNOTATION),
        entries: None,
        prioritized_files: None,
        uncompressed_size: get(estargz::UNCOMPRESSED_SIZE_ANNOTATION).and_then(|s| s.parse().ok()),
        error: None,
    };
    match read_toc(src, l).await {
        Ok(raw) => {
            r.format = match raw.footer {
                estargz::Footer::Estargz { .. } => "estargz",
                estargz::Footer::Legacy { .. } => "stargz",
                estargz::Footer::ExternalToc { .. } => "estargz (external TOC)",
                estargz::Footer::ZstdChunked { .. } => "zstd:chunked",
            }
            .into();
            match raw.digest.parse() {
                Ok(d) => r.toc_digest = Some(d),
                Err(e) => r.error = Some(e.to_string()),
            }
            match estargz::Toc::from_json(&raw.json) {
                Ok(toc) => {
                    r.entries = Some(toc.entries.len());
                    r.prioritized_files = Some(prioritized_count(&toc));
                }
                Err(e) => r.error = Some(e.to_string()),
            }
        }
        Err(e) => {
            // A layer that claims a TOC but has none is worth telling about.
            if r.annotated_toc_digest.is_some() {
                r.error = Some(e.to_string());
            }
        }
    }
    r
}

/// Regular files and other entries placed before `.prefetch.landmark`.
fn prioritized_count(toc: &estargz::Toc) -> usize {
    let names: Vec<&str> = toc
        .entries
        .iter()
        .map(|e| e.name.trim_start_matches("./"))
        .collect();
    match names.iter().position(|n| *n == estargz::PREFETCH_LANDMARK) {
        Some(end) => toc.entries[..end]
            .iter()
            .filter(|e| e.kind == estargz::EntryType::Reg)
            .count(),
        None => 0,
    }
}

/// The TOC of the layer `layer` of the image at `src`.
pub async fn get_toc(src: &Store, layer: &Digest) -> Result<TocInfo> {
    let (_, list) = manifests(src, None).await?;
    let mut found: Option<Descriptor> = None;
    for (_, f) in &list {
        if let Manifest::Image(m) = f.parse()? {
            if let Some(d) = m.layers.iter().find(|d| &d.digest == layer) {
                found = Some(d.clone());
                break;
            }
        }
    }
    let desc = found.ok_or_else(|| Error::LayerNotFound {
        digest: layer.to_string(),
    })?;
    let raw = read_toc(src, &desc).await?;
    Ok(TocInfo {
        digest: raw
            .digest
            .parse()
            .map_err(|e: oci_digest::ParseDigestError| Error::bad("TOC", e.to_string()))?,
        json: raw.json,
    })
}
