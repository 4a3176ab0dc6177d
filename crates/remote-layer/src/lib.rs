//! The remote-layer protocol shared by the snapshotter, the daemon and the FUSE manager:
//! every label and annotation name, the typed description of a layer to mount lazily,
//! and the typed reasons such a mount fails.
//!
//! * [`label`]: snapshot labels containerd, the CRI plugin and `ctr-remote` set on a
//!   Prepare, and the one the snapshotter sets on a remote snapshot.
//! * [`annotation`]: layer descriptor annotations written by the converters.
//! * [`RemoteLayer`]: the layer a Prepare asks for, parsed once from its labels.
//! * [`MountError`]: why a remote mount failed, and through [`MountError::fallback`]
//!   what the snapshotter does about it.
//! * [`prefetch_record`]: the learned-prefetch record the daemon keeps per image and
//!   `ctr-remote` publishes as an OCI artifact.
//!
//! Only `serde`/`serde_json` (the FUSE manager's requests and answers carry these
//! types; records are JSON) and `thiserror`.

mod failure;
mod layer;
pub mod prefetch_record;

pub use failure::{Fallback, MountError};
pub use layer::{LabelError, RemoteLayer};

/// Layer descriptor annotations (OCI manifests), as the converters write them.
pub mod annotation {
    /// Digest of the layer's table of contents (eStargz and zstd:chunked).
    pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
    /// Size of the decompressed layer, in bytes.
    pub const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
    /// zstd:chunked: sha256 of the compressed TOC.
    pub const ZSTD_CHUNKED_MANIFEST_CHECKSUM: &str = "io.containers.zstd-chunked.manifest-checksum";
    /// zstd:chunked: `offset:compressed size:size:1` of the TOC.
    pub const ZSTD_CHUNKED_MANIFEST_POSITION: &str = "io.containers.zstd-chunked.manifest-position";
    /// On a layer of a TOC image: the digest of the eStargz blob whose TOC it holds.
    pub const EXTERNAL_TOC_LAYER_DIGEST: &str = "containerd.io/snapshot/stargz/layer.digest";
    /// Not the reference's: where the prioritized files end in the blob (the offset of
    /// its prefetch landmark), as a decimal number of bytes. Written by this project's
    /// converter so that a snapshotter can fetch them together with the TOC.
    ///
    /// This project's annotations are named under `containerd.io/snapshot/`: containerd
    /// hands a layer's annotations with that prefix to the snapshotter as labels of its
    /// Prepare, so they are known before the manifest is fetched again.
    pub const PREFETCH_END: &str = "containerd.io/snapshot/stargz-rs.prefetch-end";
    /// Not the reference's: how many bytes at the end of the blob hold its TOC and
    /// footer (the blob size minus the TOC's offset), as a decimal number. Written by
    /// this project's converter so that a snapshotter reads footer and TOC in one
    /// request of the right size. A hint only: the TOC digest still checks what is read.
    pub const TOC_TAIL: &str = "containerd.io/snapshot/stargz-rs.toc-tail";
    /// [`PREFETCH_END`] as images converted by earlier versions name it (still read).
    pub const LEGACY_PREFETCH_END: &str = "io.github.stargz-rs.prefetch-end";
    /// [`TOC_TAIL`] as images converted by earlier versions name it (still read).
    pub const LEGACY_TOC_TAIL: &str = "io.github.stargz-rs.toc-tail";
    /// The prefix of annotations that containerd passes to a snapshotter as labels.
    pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

    /// A positive decimal number of bytes from the first of `keys` present.
    fn bytes(
        annotations: &std::collections::BTreeMap<String, String>,
        keys: &[&str],
    ) -> Option<u64> {
        keys.iter()
            .find_map(|k| annotations.get(*k))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&n| n > 0)
    }

    /// Where the prioritized files end ([`PREFETCH_END`], or its legacy name), if the
    /// value could be right for a blob of `blob_size` bytes.
    pub fn prefetch_end(
        annotations: &std::collections::BTreeMap<String, String>,
        blob_size: u64,
    ) -> Option<u64> {
        bytes(annotations, &[PREFETCH_END, LEGACY_PREFETCH_END]).filter(|&end| end <= blob_size)
    }

    /// Bytes at the end of a blob of `blob_size` bytes that hold its TOC and footer, as
    /// the descriptor's `annotations` tell: [`TOC_TAIL`], else the offset in
    /// [`ZSTD_CHUNKED_MANIFEST_POSITION`]. Values that cannot be right (unparsable, 0,
    /// an offset past the blob) count as absent; a tail larger than the blob is kept
    /// as given, for the reader to bound.
    pub fn toc_tail(
        annotations: &std::collections::BTreeMap<String, String>,
        blob_size: u64,
    ) -> Option<u64> {
        let annotated = bytes(annotations, &[TOC_TAIL, LEGACY_TOC_TAIL]);
        annotated.or_else(|| {
            let position = annotations.get(ZSTD_CHUNKED_MANIFEST_POSITION)?;
            let offset = position.split(':').next()?.trim().parse::<u64>().ok()?;
            blob_size.checked_sub(offset).filter(|&n| n > 0)
        })
    }
}

/// Appended to an image's tag to name its TOC image, which holds the TOCs of layers
/// converted with an external TOC (one gzip layer per eStargz layer, annotated with
/// [`annotation::EXTERNAL_TOC_LAYER_DIGEST`]). `host/repo:v1` has `host/repo:v1-esgztoc`.
pub const TOC_IMAGE_SUFFIX: &str = "-esgztoc";

/// Snapshot labels of the remote-snapshotter protocol.
pub mod label {
    /// Set by containerd on Prepare: the committed snapshot name it wants (chain id).
    pub const TARGET_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
    /// Set by the snapshotter on snapshots whose `fs` directory is a remote mount.
    pub const REMOTE: &str = "containerd.io/snapshot/remote";

    /// `ctr-remote` (and stargz-aware clients): the image reference.
    pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
    /// `ctr-remote`: digest of the compressed layer blob.
    pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
    /// `ctr-remote`: comma-separated digests of the image's layers from this one on.
    pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
    /// `ctr-remote --skip-content-verify`: present when the client asks to skip verification.
    pub const STARGZ_SKIP_VERIFY: &str = "containerd.io/snapshot/remote/stargz.skipverify";
    /// Bytes of the layer to prefetch, as a decimal number.
    pub const STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";

    /// CRI plugin (`disable_snapshot_annotations = false`): the image reference.
    pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
    /// CRI plugin: digest of the compressed layer blob.
    pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
    /// CRI plugin: comma-separated digests of the image's layers.
    pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

    /// The layer's TOC digest, copied from its descriptor annotation.
    pub const TOC_DIGEST: &str = super::annotation::TOC_DIGEST;
    /// The layer's uncompressed size, copied from its descriptor annotation.
    pub const UNCOMPRESSED_SIZE: &str = super::annotation::UNCOMPRESSED_SIZE;
    /// Uncompressed digest of the layer (diff id), as stargz tooling sets it.
    pub const UNCOMPRESSED_DIGEST: &str = "containerd.io/snapshot/stargz/uncompressed.digest";
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::annotation::{toc_tail, TOC_TAIL, ZSTD_CHUNKED_MANIFEST_POSITION};

    fn annotations(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn toc_tail_comes_from_the_annotation_first() {
        let a = annotations(&[
            (TOC_TAIL, " 700000 "),
            (ZSTD_CHUNKED_MANIFEST_POSITION, "9000000:1000:5000:1"),
        ]);
        assert_eq!(toc_tail(&a, 10_000_000), Some(700_000));
        // Larger than the blob: kept, the reader bounds it by the blob.
        let a = annotations(&[(TOC_TAIL, "99999999999")]);
        assert_eq!(toc_tail(&a, 1000), Some(99_999_999_999));
    }

    /// Images converted before the annotations moved under `containerd.io/snapshot/`
    /// keep their hints; the current name wins when both are there.
    #[test]
    fn legacy_names_are_still_read() {
        use super::annotation::{prefetch_end, LEGACY_PREFETCH_END, LEGACY_TOC_TAIL, PREFETCH_END};
        let a = annotations(&[(LEGACY_TOC_TAIL, "4096"), (LEGACY_PREFETCH_END, "777")]);
        assert_eq!(toc_tail(&a, 10_000), Some(4096));
        assert_eq!(prefetch_end(&a, 10_000), Some(777));
        let a = annotations(&[
            (LEGACY_TOC_TAIL, "4096"),
            (TOC_TAIL, "5000"),
            (PREFETCH_END, "800"),
            (LEGACY_PREFETCH_END, "777"),
        ]);
        assert_eq!(toc_tail(&a, 10_000), Some(5000));
        assert_eq!(prefetch_end(&a, 10_000), Some(800));
        // A prioritized region past the blob's end cannot be right.
        assert_eq!(prefetch_end(&a, 700), None);
        assert!(TOC_TAIL.starts_with(super::annotation::INHERITED_PREFIX));
        assert!(PREFETCH_END.starts_with(super::annotation::INHERITED_PREFIX));
    }

    #[test]
    fn toc_tail_from_the_zstd_chunked_manifest_position() {
        let a = annotations(&[(ZSTD_CHUNKED_MANIFEST_POSITION, "9000000:1000:5000:1")]);
        assert_eq!(toc_tail(&a, 10_000_000), Some(1_000_000));
        // A bad `toc-tail` does not hide a good position.
        let a = annotations(&[
            (TOC_TAIL, "lots"),
            (ZSTD_CHUNKED_MANIFEST_POSITION, "9000000:1000:5000:1"),
        ]);
        assert_eq!(toc_tail(&a, 10_000_000), Some(1_000_000));
    }

    #[test]
    fn impossible_values_count_as_absent() {
        for (k, v) in [
            (TOC_TAIL, "0"),
            (TOC_TAIL, "-5"),
            (TOC_TAIL, "12kb"),
            (TOC_TAIL, ""),
            (TOC_TAIL, "340282366920938463463374607431768211456"),
            (ZSTD_CHUNKED_MANIFEST_POSITION, "10000000:1:1:1"),
            (ZSTD_CHUNKED_MANIFEST_POSITION, "20000000:1:1:1"),
            (ZSTD_CHUNKED_MANIFEST_POSITION, "x:1:1:1"),
            (ZSTD_CHUNKED_MANIFEST_POSITION, ""),
        ] {
            assert_eq!(
                toc_tail(&annotations(&[(k, v)]), 10_000_000),
                None,
                "{k}={v}"
            );
        }
        assert_eq!(toc_tail(&BTreeMap::new(), 10_000_000), None);
    }
}
