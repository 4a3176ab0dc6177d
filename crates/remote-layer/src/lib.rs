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
    pub const PREFETCH_END: &str = "io.github.stargz-rs.prefetch-end";
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
