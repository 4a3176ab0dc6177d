//! The remote-layer hook: the [`RemoteFs`] trait, the labels that describe a remote layer, and a no-op implementation.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};

/// Label containerd sets on Prepare naming the committed snapshot it wants.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
/// Set on snapshots whose `fs` directory is a remote mount.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Layer labels set by the CRI plugin (`disable_snapshot_annotations = false`).
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Layer labels set by stargz-aware clients.
pub const LABEL_STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const LABEL_STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
/// Digest of the layer's table of contents (eStargz).
pub const LABEL_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Uncompressed digest of the layer, as stargz tooling sets it.
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/snapshot/stargz/uncompressed.digest";

/// The remote layer a Prepare asks for, read from its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// Image reference (`host/repo:tag` or `@digest`).
    pub image_ref: String,
    /// Digest of the compressed layer blob.
    pub digest: String,
    /// Comma-separated digests of the image's other layers, for prefetch.
    pub layers: Vec<String>,
    pub toc_digest: Option<String>,
    pub uncompressed_digest: Option<String>,
}

impl LayerInfo {
    /// The layer described by `labels`, preferring the stargz labels over the CRI ones.
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<LayerInfo> {
        let pick = |a: &str, b: &str| {
            labels
                .get(a)
                .or_else(|| labels.get(b))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let image_ref = pick(LABEL_STARGZ_REFERENCE, LABEL_CRI_IMAGE_REF)?;
        let digest = pick(LABEL_STARGZ_DIGEST, LABEL_CRI_LAYER_DIGEST)?;
        let layers = pick(LABEL_STARGZ_LAYERS, LABEL_CRI_IMAGE_LAYERS)
            .map(|s| {
                s.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Some(LayerInfo {
            image_ref,
            digest,
            layers,
            toc_digest: labels.get(LABEL_TOC_DIGEST).cloned(),
            uncompressed_digest: labels.get(LABEL_UNCOMPRESSED).cloned(),
        })
    }
}

/// A filesystem that can serve a layer at a mount point without downloading it first.
///
/// Errors are plain strings: the snapshotter only logs them and falls back.
pub trait RemoteFs: Send + Sync + 'static {
    /// Mounts the layer described by `labels` at `mountpoint` (an empty directory).
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Whether the mount at `mountpoint` is still being served.
    fn check(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Unmounts `mountpoint`.
    fn unmount(&self, mountpoint: &Path) -> impl Future<Output = Result<(), String>> + Send;
    /// Mount points served right now, for filesystems whose mounts can outlive this
    /// process (they are reconciled with the metadata on restore). None by default.
    fn mounted(&self) -> impl Future<Output = Result<Vec<PathBuf>, String>> + Send {
        std::future::ready(Ok(Vec::new()))
    }
}

/// A [`RemoteFs`] that never mounts anything: every layer is downloaded by containerd.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRemote;

impl RemoteFs for NoRemote {
    async fn mount(&self, _: &Path, _: &HashMap<String, String>) -> Result<(), String> {
        Err("remote snapshots are disabled".into())
    }
    async fn check(&self, _: &Path, _: &HashMap<String, String>) -> Result<(), String> {
        Err("remote snapshots are disabled".into())
    }
    async fn unmount(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
}

/// Lets callers keep a handle on the filesystem they give the snapshotter.
impl<T: RemoteFs> RemoteFs for std::sync::Arc<T> {
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
    ) -> impl Future<Output = Result<(), String>> + Send {
        (**self).mount(mountpoint, labels)
    }
    fn check(
        &self,
        mountpoint: &Path,
        labels: &HashMap<String, String>,
    ) -> impl Future<Output = Result<(), String>> + Send {
        (**self).check(mountpoint, labels)
    }
    fn unmount(&self, mountpoint: &Path) -> impl Future<Output = Result<(), String>> + Send {
        (**self).unmount(mountpoint)
    }
    fn mounted(&self) -> impl Future<Output = Result<Vec<PathBuf>, String>> + Send {
        (**self).mounted()
    }
}
