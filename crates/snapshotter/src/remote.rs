//! The remote-layer hook: the [`RemoteFs`] trait a snapshotter mounts remote layers
//! through (or has them unpacked by), [`Served`], and [`NoRemote`], which mounts none.

use std::future::Future;
use std::path::{Path, PathBuf};

use remote_layer::{MountError, RemoteLayer};

/// How the layer of a Prepare was provided by [`RemoteFs::provide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// Mounted at the snapshot's directory and fetched lazily: a remote snapshot,
    /// checked by Mounts and mounted again after a restart.
    Mounted,
    /// Downloaded and unpacked into the snapshot's directory: from then on an ordinary
    /// local layer, with nothing mounted and nothing to restore.
    Filled,
}

/// A filesystem that can serve a layer at a mount point without downloading it first.
pub trait RemoteFs: Send + Sync + 'static {
    /// Provides the layer of a Prepare in `dir` (an empty directory): mounted lazily,
    /// or, when the filesystem can do better than a fallback to containerd's own pull,
    /// filled with the unpacked layer. Only a Prepare calls this; a remote snapshot is
    /// mounted again with [`RemoteFs::mount`]. By default, a mount.
    fn provide(
        &self,
        dir: &Path,
        layer: &RemoteLayer,
    ) -> impl Future<Output = Result<Served, MountError>> + Send {
        async move { self.mount(dir, layer).await.map(|()| Served::Mounted) }
    }
    /// Mounts `layer` at `mountpoint` (an empty directory).
    fn mount(
        &self,
        mountpoint: &Path,
        layer: &RemoteLayer,
    ) -> impl Future<Output = Result<(), MountError>> + Send;
    /// Whether the mount at `mountpoint` is still being served.
    fn check(&self, mountpoint: &Path) -> impl Future<Output = Result<(), MountError>> + Send;
    /// Unmounts `mountpoint`; nothing mounted there is fine. A mount of the same
    /// point still under way (its caller may have given up on it) is waited for and
    /// then unmounted, so the two never leave a mount behind.
    fn unmount(&self, mountpoint: &Path) -> impl Future<Output = Result<(), MountError>> + Send;
    /// Mount points served right now, for filesystems whose mounts can outlive this
    /// process (they are reconciled with the metadata on restore). None by default.
    fn mounted(&self) -> impl Future<Output = Result<Vec<PathBuf>, MountError>> + Send {
        std::future::ready(Ok(Vec::new()))
    }
    /// A Prepare of a layer falls back to an ordinary pull (a full download) for
    /// `reason`: the snapshotter has logged it, the filesystem may count it.
    fn fell_back(&self, reason: &MountError) {
        let _ = reason;
    }
}

/// A [`RemoteFs`] that never mounts anything: every layer is downloaded by containerd.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoRemote;

impl RemoteFs for NoRemote {
    async fn mount(&self, _: &Path, _: &RemoteLayer) -> Result<(), MountError> {
        Err(MountError::Disabled)
    }
    async fn check(&self, _: &Path) -> Result<(), MountError> {
        Err(MountError::Disabled)
    }
    async fn unmount(&self, _: &Path) -> Result<(), MountError> {
        Ok(())
    }
}

/// Lets callers keep a handle on the filesystem they give the snapshotter.
impl<T: RemoteFs> RemoteFs for std::sync::Arc<T> {
    fn provide(
        &self,
        dir: &Path,
        layer: &RemoteLayer,
    ) -> impl Future<Output = Result<Served, MountError>> + Send {
        (**self).provide(dir, layer)
    }
    fn mount(
        &self,
        mountpoint: &Path,
        layer: &RemoteLayer,
    ) -> impl Future<Output = Result<(), MountError>> + Send {
        (**self).mount(mountpoint, layer)
    }
    fn check(&self, mountpoint: &Path) -> impl Future<Output = Result<(), MountError>> + Send {
        (**self).check(mountpoint)
    }
    fn unmount(&self, mountpoint: &Path) -> impl Future<Output = Result<(), MountError>> + Send {
        (**self).unmount(mountpoint)
    }
    fn mounted(&self) -> impl Future<Output = Result<Vec<PathBuf>, MountError>> + Send {
        (**self).mounted()
    }
    fn fell_back(&self, reason: &MountError) {
        (**self).fell_back(reason)
    }
}
