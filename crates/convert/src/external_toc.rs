//! External TOCs (`--estargz-external-toc`): the image that holds the TOCs of an
//! image's layers (`<tag>-esgztoc`), written after a conversion and read back when a
//! blob's footer says its TOC is not inside it. The layout is the reference's: an
//! OCI manifest with an empty config and one gzip layer per eStargz layer, sorted by
//! digest, each annotated with the digest of the blob it belongs to.

use bytes::Bytes;
use registry::{
    Descriptor, Digest, ImageManifest, Manifest, Platform, OCI_LAYER_GZIP, OCI_MANIFEST,
};

use crate::error::{Error, Result};
use crate::Store;

pub use remote_layer::annotation::EXTERNAL_TOC_LAYER_DIGEST as LAYER_DIGEST_ANNOTATION;

/// The config of a TOC image: an empty OCI image config, as the reference writes it.
const EMPTY_CONFIG: &[u8] = b"{}";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Most bytes of one compressed TOC read back: the TOC limit readers apply.
const MAX_TOC_BLOB: u64 = 256 << 20;

/// The TOC image written next to a converted image.
#[derive(Clone, Debug)]
pub struct TocImage {
    /// Where it went (`host/repo:tag-esgztoc`, `oci:DIR:tag-esgztoc`, a containerd name).
    pub name: String,
    pub digest: Digest,
}

/// Writes the TOC image of the blobs in `tocs` (blob digest, compressed TOC) to `dst`.
pub(crate) async fn write_toc_image(dst: &Store, tocs: &[(Digest, Vec<u8>)]) -> Result<TocImage> {
    let store = dst.toc_image()?;
    let mut layers = Vec::with_capacity(tocs.len());
    for (blob, toc) in tocs {
        let digest = store.put_blob_bytes(Bytes::from(toc.clone())).await?;
        let mut d = Descriptor::for_bytes(OCI_LAYER_GZIP, toc);
        d.digest = digest;
        d.annotations = Some(
            [(LAYER_DIGEST_ANNOTATION.to_string(), blob.to_string())]
                .into_iter()
                .collect(),
        );
        layers.push(d);
    }
    layers.sort_by_key(|a| a.digest.to_string());
    layers.dedup_by(|a, b| a.digest == b.digest);
    let config = store
        .put_blob_bytes(Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let mut config_desc = Descriptor::for_bytes(OCI_CONFIG, EMPTY_CONFIG);
    config_desc.digest = config;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_string()),
        config: config_desc,
        layers,
        annotations: None,
        subject: None,
        artifact_type: None,
    };
    let bytes =
        serde_json::to_vec(&manifest).map_err(|e| Error::bad("TOC manifest", e.to_string()))?;
    let digest = store.put_root(OCI_MANIFEST, Bytes::from(bytes)).await?;
    Ok(TocImage {
        name: store.describe(),
        digest,
    })
}

/// The compressed TOC of blob `layer` of the image in `store`, from its TOC image.
pub async fn fetch_external_toc(store: &Store, layer: &Digest) -> Result<Vec<u8>> {
    let toc_store = store.toc_image()?;
    let root = toc_store.root().await?;
    let manifest = match root.parse()? {
        Manifest::Image(m) => *m,
        Manifest::Index(idx) => {
            let host = Platform::host();
            let d = idx
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_none_or(|p| host.matches(p)))
                .ok_or_else(|| Error::NoPlatform {
                    image: toc_store.describe(),
                    wanted: host.to_string(),
                })?;
            match toc_store.manifest(d).await?.parse()? {
                Manifest::Image(m) => *m,
                Manifest::Index(_) => {
                    return Err(Error::bad(toc_store.describe(), "an index inside an index"))
                }
            }
        }
    };
    let want = layer.to_string();
    let desc = manifest
        .layers
        .iter()
        .find(|l| {
            l.annotations
                .as_ref()
                .and_then(|a| a.get(LAYER_DIGEST_ANNOTATION))
                .is_some_and(|d| *d == want)
        })
        .ok_or_else(|| {
            Error::bad(
                toc_store.describe(),
                format!("no TOC for layer {layer} (no layer annotated {LAYER_DIGEST_ANNOTATION}={layer})"),
            )
        })?;
    if desc.size > MAX_TOC_BLOB {
        return Err(Error::bad(
            toc_store.describe(),
            format!("TOC of {layer} is {} bytes, over {MAX_TOC_BLOB}", desc.size),
        ));
    }
    Ok(toc_store.blob_bytes(&desc.digest).await?.to_vec())
}
