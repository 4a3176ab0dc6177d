//! Snapshot lifecycle on disk: directories under `ROOT/snapshots/<id>`, overlayfs mount specs, remote layers.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use futures::stream::{self, StreamExt};
use remote_layer::{label, Fallback, MountError, RemoteLayer};

use crate::error::{Error, Result};
use crate::filter::{Fields, Filter};
use crate::remote::{RemoteFs, Served};
use crate::store::{Kind, Record, Store, Usage};

/// A mount containerd performs to get a snapshot's root filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// A snapshot as the Snapshots API describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

impl Info {
    fn new(name: String, r: Record) -> Info {
        Info {
            name,
            parent: r.parent,
            kind: r.kind,
            labels: r.labels,
            created: r.created,
            updated: r.updated,
        }
    }
}

/// Options of a [`Snapshotter`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Root directory: `metadata.db` and `snapshots/`.
    pub root: PathBuf,
    /// How many remote snapshots to remount at once on start.
    pub restore_concurrency: usize,
    /// `[snapshotter] allow_invalid_mounts_on_restart`: a remote snapshot that cannot
    /// be mounted again at start is logged and skipped instead of failing the start.
    pub allow_invalid_mounts_on_restart: bool,
}

impl Options {
    pub fn new(root: impl Into<PathBuf>) -> Options {
        Options {
            root: root.into(),
            restore_concurrency: 4,
            allow_invalid_mounts_on_restart: false,
        }
    }
}

/// One lock per snapshot directory: a check-and-remount, a remote mount being
/// committed, and a removal of the same layer never interleave. An entry lives only
/// while somebody holds or waits for it.
#[derive(Default)]
struct LayerLocks(Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>);

/// Held while a snapshot's remote mount is checked, changed or removed.
struct LayerGuard {
    locks: Arc<LayerLocks>,
    id: u64,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl LayerLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<tokio::sync::Mutex<()>>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn lock(self: &Arc<Self>, id: u64) -> LayerGuard {
        let m = self.map().entry(id).or_default().clone();
        LayerGuard {
            locks: self.clone(),
            id,
            guard: Some(m.lock_owned().await),
        }
    }
}

impl Drop for LayerGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map();
        // Clones are only made under the map lock, so one left means nobody waits.
        if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.id);
        }
    }
}

/// Unmounts a remote layer whose Prepare was dropped (containerd cancelled the call or
/// its deadline passed) before the snapshot was committed: nobody will ever use that
/// mount. Disarmed once the Prepare has an outcome.
struct CancelGuard<R: RemoteFs> {
    remote: Arc<R>,
    store: Arc<Store>,
    locks: Arc<LayerLocks>,
    ns: String,
    target: String,
    id: u64,
    fs: PathBuf,
    armed: bool,
}

impl<R: RemoteFs> Drop for CancelGuard<R> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            detach(&self.fs);
            return;
        };
        let (remote, store, locks) = (self.remote.clone(), self.store.clone(), self.locks.clone());
        let (ns, target, id, fs) = (
            std::mem::take(&mut self.ns),
            std::mem::take(&mut self.target),
            self.id,
            std::mem::take(&mut self.fs),
        );
        rt.spawn(async move {
            let _layer = locks.lock(id).await;
            // A commit already under way when the call was dropped keeps its mount.
            let committed = blocking(move || Ok(store.get(&ns, &target)?.is_some_and(|r| r.id == id)))
                .await
                .unwrap_or(false);
            if committed {
                return;
            }
            tracing::info!(mountpoint = %fs.display(), "Prepare cancelled before its remote layer was committed; unmounting it");
            // The remote waits for its mount of the same point that is still under way.
            if let Err(e) = remote.unmount(&fs).await {
                tracing::warn!(mountpoint = %fs.display(), error = %e, "unmounting the layer of a cancelled Prepare failed");
            }
            detach(&fs);
        });
    }
}

/// The snapshotter: metadata in [`Store`], layers in directories, remote layers through `R`.
pub struct Snapshotter<R: RemoteFs> {
    root: PathBuf,
    store: Arc<Store>,
    remote: Arc<R>,
    index_off: bool,
    userxattr: bool,
    restore_concurrency: usize,
    allow_invalid_mounts_on_restart: bool,
    locks: Arc<LayerLocks>,
    /// Held shared while a snapshot's directory and record are created, exclusively by
    /// Cleanup: a directory whose record is not committed yet is never taken for an
    /// orphan.
    dirs: Arc<RwLock<()>>,
    tmp_seq: AtomicU64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir(path).map_err(|e| Error::io("create directory", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("chmod", path, e))
}

/// Detaches whatever is mounted at `path`; nothing mounted is fine.
fn detach(path: &Path) {
    if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_ok() {
        tracing::info!(path = %path.display(), "detached a leftover mount");
    }
}

/// Whether a remote layer may be mounted in the snapshot's directory: a committed
/// remote snapshot, or an active one whose Prepare tried a remote mount (it may have
/// been cancelled before the commit).
fn has_remote_mount(rec: &Record) -> bool {
    rec.labels.contains_key(label::REMOTE)
        || (rec.kind == Kind::Active && rec.labels.contains_key(label::TARGET_SNAPSHOT_REF))
}

/// du-like usage: allocated bytes and inodes, hard links counted once, not crossing mounts.
pub fn disk_usage(path: &Path) -> Result<Usage> {
    let top = std::fs::symlink_metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let dev = top.dev();
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            // Files may vanish while a container runs; du ignores them too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("stat", &p, e)),
        };
        if !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += (md.blocks() as i64) * 512;
        if md.is_dir() && md.dev() == dev {
            let rd = std::fs::read_dir(&p).map_err(|e| Error::io("read directory", &p, e))?;
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("read directory", &p, e))?;
                stack.push(ent.path());
            }
        }
    }
    Ok(usage)
}

/// Whether containerd would add `userxattr`: only inside a user namespace, and never on tmpfs.
fn needs_userxattr(root: &Path) -> bool {
    let in_userns = std::fs::read_to_string("/proc/self/uid_map")
        .map(|m| {
            let f: Vec<&str> = m.split_whitespace().collect();
            !(f.len() == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295")
        })
        .unwrap_or(false);
    if !in_userns {
        return false;
    }
    !nix::sys::statfs::statfs(root)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

impl<R: RemoteFs> Snapshotter<R> {
    /// Opens the snapshotter at `opts.root`, creating its layout.
    pub fn open(opts: Options, remote: R) -> Result<Snapshotter<R>> {
        let root = opts.root;
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(|e| Error::io("create directory", root.join("snapshots"), e))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod", &root, e))?;
        let store = Store::open(&root.join("metadata.db"))?;
        Ok(Snapshotter {
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            userxattr: needs_userxattr(&root),
            root,
            store: Arc::new(store),
            remote: Arc::new(remote),
            restore_concurrency: opts.restore_concurrency.max(1),
            allow_invalid_mounts_on_restart: opts.allow_invalid_mounts_on_restart,
            locks: Arc::default(),
            dirs: Arc::default(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The remote filesystem.
    pub fn remote(&self) -> &R {
        &self.remote
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// Creates an active snapshot; may return AlreadyExists when a remote
    /// layer was mounted and committed under the `containerd.io/snapshot.ref` target.
    pub async fn prepare(
        &self,
        ns: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let rec = self
            .create(ns, key, parent, labels.clone(), Kind::Active)
            .await?;
        // The labels are parsed here, once; the remote filesystem gets the result.
        if let Some(target) = labels.get(label::TARGET_SNAPSHOT_REF) {
            match RemoteLayer::from_labels(&labels) {
                Ok(layer) => {
                    if let Some(err) = self
                        .try_remote(ns, key, target, &layer, &rec, labels.clone())
                        .await
                    {
                        return Err(err);
                    }
                }
                // A layer containerd unpacks (it names the snapshot it will commit)
                // without the labels saying where to fetch it: a plain pull, or the
                // CRI plugin with snapshot annotations disabled.
                Err(e) => {
                    let e = MountError::InvalidLabels(e.to_string());
                    tracing::warn!(key, target = %target, kind = e.kind(), error = %e,
                        "no remote layer labels; falling back to an ordinary pull");
                    self.remote.fell_back(&e);
                }
            }
        }
        self.mounts_of(ns, &rec).await
    }

    /// Mounts the remote layer into the new snapshot and commits it as `target`.
    /// `Some(AlreadyExists)` on success; `None` to carry on with a normal snapshot.
    async fn try_remote(
        &self,
        ns: &str,
        key: &str,
        target: &str,
        layer: &RemoteLayer,
        rec: &Record,
        mut labels: HashMap<String, String>,
    ) -> Option<Error> {
        if self.adopt_target(ns, key, target, rec).await {
            return Some(Error::AlreadyExists(target.to_string()));
        }
        let fs = self.fs_dir(rec.id);
        let _layer = self.locks.lock(rec.id).await;
        let mut cancel = CancelGuard {
            remote: self.remote.clone(),
            store: self.store.clone(),
            locks: self.locks.clone(),
            ns: ns.to_string(),
            target: target.to_string(),
            id: rec.id,
            fs: fs.clone(),
            armed: true,
        };
        let served = match self.remote.provide(&fs, layer).await {
            Ok(s) => s,
            Err(e) => {
                cancel.armed = false;
                // Either way containerd downloads this layer; the kind says whether a
                // later Prepare of it may mount it remotely after all. One line per layer,
                // loud: a full pull where a lazy one was expected is worth noticing.
                match e.fallback() {
                    Fallback::Pull => tracing::warn!(key, layer = %layer.digest,
                    image = %layer.image_ref, kind = e.kind(), error = %e,
                    "remote mount failed; falling back to an ordinary pull"),
                    Fallback::Retry => tracing::warn!(key, layer = %layer.digest,
                    image = %layer.image_ref, kind = e.kind(), error = %e,
                    "remote mount failed for a passing reason; falling back to an ordinary pull"),
                }
                self.remote.fell_back(&e);
                return None;
            }
        };
        let store = self.store.clone();
        let (ns2, key2, target2) = (ns.to_string(), key.to_string(), target.to_string());
        let res = match served {
            // A remote snapshot: restored, checked and remounted by its label.
            Served::Mounted => {
                labels.insert(label::REMOTE.to_string(), "remote snapshot".to_string());
                blocking(move || {
                    store.commit(&ns2, &key2, &target2, labels, Some(Usage::default()))
                })
                .await
            }
            // An ordinary layer on disk: committed as containerd's own unpack would be.
            Served::Filled => {
                let dir = fs.clone();
                blocking(move || {
                    let usage = disk_usage(&dir)?;
                    store.commit(&ns2, &key2, &target2, labels, Some(usage))
                })
                .await
            }
        };
        cancel.armed = false;
        match res {
            Ok(_) => {
                match served {
                    Served::Mounted => {
                        tracing::info!(target, layer = %layer.digest, "remote snapshot committed")
                    }
                    Served::Filled => {
                        tracing::info!(target, layer = %layer.digest, "unpacked layer committed")
                    }
                }
                Some(Error::AlreadyExists(target.to_string()))
            }
            Err(e) => {
                tracing::warn!(key, target, error = %e, "committing remote snapshot failed; falling back");
                match served {
                    Served::Mounted => {
                        if let Err(e) = self.remote.unmount(&fs).await {
                            tracing::warn!(path = %fs.display(), error = %e, "unmounting remote layer failed");
                        }
                    }
                    // containerd unpacks into this directory next: it must be empty.
                    Served::Filled => {
                        let dir = fs.clone();
                        let emptied = blocking(move || {
                            std::fs::remove_dir_all(&dir)
                                .and_then(|()| std::fs::create_dir(&dir))
                                .map_err(|e| Error::io("empty directory", &dir, e))
                        })
                        .await;
                        if let Err(e) = emptied {
                            return Some(e);
                        }
                    }
                }
                None
            }
        }
    }

    /// Whether `target` is already committed here on the same parent as the new
    /// snapshot `key`; then `key` is removed again. That happens when the answer to the
    /// Prepare that committed the target was lost (the daemon was killed in between, so
    /// containerd never recorded it), or when two pulls of one layer race. containerd
    /// takes AlreadyExists from here as it does after a remote mount and records the
    /// existing target, so the layer is neither mounted a second time nor downloaded.
    async fn adopt_target(&self, ns: &str, key: &str, target: &str, rec: &Record) -> bool {
        let store = self.store.clone();
        let (ns2, target2) = (ns.to_string(), target.to_string());
        let existing = blocking(move || store.get(&ns2, &target2)).await;
        let same =
            matches!(&existing, Ok(Some(t)) if t.kind == Kind::Committed && t.parent == rec.parent);
        if !same {
            return false;
        }
        match self.remove(ns, key).await {
            Ok(()) => {
                tracing::info!(key, target, "target already committed; adopting it");
                true
            }
            Err(e) => {
                tracing::warn!(key, target, error = %e, "cannot drop the snapshot of a Prepare whose target exists");
                false
            }
        }
    }

    /// Creates a read-only view of `parent`.
    pub async fn view(
        &self,
        ns: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let rec = self.create(ns, key, parent, labels, Kind::View).await?;
        self.mounts_of(ns, &rec).await
    }

    async fn create(
        &self,
        ns: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Record> {
        let name = format!(
            "new-{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = self.root.join("snapshots").join(&name);
        let snaps = self.root.join("snapshots");
        let store = self.store.clone();
        let dirs = self.dirs.clone();
        let (ns, key, parent) = (ns.to_string(), key.to_string(), parent.to_string());
        blocking(move || {
            let _creating = dirs.read().unwrap_or_else(|p| p.into_inner());
            let res = (|| {
                mkdir(&tmp, 0o700)?;
                mkdir(&tmp.join("fs"), 0o755)?;
                if kind == Kind::Active {
                    mkdir(&tmp.join("work"), 0o711)?;
                }
                store.create(&ns, &key, kind, &parent, labels, |id| {
                    if !parent.is_empty() {
                        // Keep the owner of the parent's root, as containerd does for user namespaces.
                        if let Some(p) = store.get(&ns, &parent)? {
                            let pfs = snaps.join(p.id.to_string()).join("fs");
                            if let Ok(md) = std::fs::metadata(&pfs) {
                                std::os::unix::fs::chown(
                                    tmp.join("fs"),
                                    Some(md.uid()),
                                    Some(md.gid()),
                                )
                                .map_err(|e| Error::io("chown", tmp.join("fs"), e))?;
                            }
                        }
                    }
                    let dst = snaps.join(id.to_string());
                    std::fs::rename(&tmp, &dst).map_err(|e| Error::io("rename", &dst, e))
                })
            })();
            if res.is_err() && tmp.exists() {
                if let Err(e) = std::fs::remove_dir_all(&tmp) {
                    tracing::warn!(path = %tmp.display(), error = %e, "removing temporary directory failed");
                }
            }
            res
        })
        .await
    }

    /// The mounts of an existing active or view snapshot.
    pub async fn mounts(&self, ns: &str, key: &str) -> Result<Vec<Mount>> {
        let rec = self.get(ns, key).await?;
        self.mounts_of(ns, &rec).await
    }

    async fn get(&self, ns: &str, key: &str) -> Result<Record> {
        let store = self.store.clone();
        let (ns, key) = (ns.to_string(), key.to_string());
        blocking(move || store.require(&ns, &key)).await
    }

    async fn mounts_of(&self, ns: &str, rec: &Record) -> Result<Vec<Mount>> {
        let store = self.store.clone();
        let (ns2, parent) = (ns.to_string(), rec.parent.clone());
        let ancestors = blocking(move || store.ancestors(&ns2, &parent)).await?;
        for (name, a) in &ancestors {
            if a.labels.contains_key(label::REMOTE) {
                self.ensure_remote(name, a).await?;
            }
        }
        Ok(self.mount_spec(
            rec,
            &ancestors.iter().map(|(_, r)| r.id).collect::<Vec<_>>(),
        ))
    }

    /// Checks a remote layer and remounts it when its server is gone.
    /// Serialized per layer: concurrent callers find the layer remounted by the first
    /// and neither unmounts the other's mount nor stacks a second one.
    async fn ensure_remote(&self, name: &str, rec: &Record) -> Result<()> {
        let fs = self.fs_dir(rec.id);
        let _layer = self.locks.lock(rec.id).await;
        let Err(e) = self.remote.check(&fs).await else {
            return Ok(());
        };
        tracing::warn!(snapshot = name, kind = e.kind(), error = %e, "remote layer unhealthy; remounting");
        if let Err(e) = self.remote.unmount(&fs).await {
            tracing::debug!(error = %e, "unmount before remount");
        }
        detach(&fs);
        self.remount(&fs, rec).await.map_err(|e| {
            Error::Unavailable(format!(
                "remote layer of snapshot {name:?} is unavailable ({}, {}): {e}",
                e.kind(),
                e.fallback().as_str()
            ))
        })
    }

    /// Mounts a committed remote snapshot's layer again, from its stored labels.
    async fn remount(&self, fs: &Path, rec: &Record) -> Result<(), MountError> {
        let layer = RemoteLayer::from_labels(&rec.labels)
            .map_err(|e| MountError::InvalidLabels(e.to_string()))?;
        self.remote.mount(fs, &layer).await
    }

    /// containerd's overlay snapshotter layout: bind for no parents (and read-only
    /// views of one parent), overlay otherwise with parents newest first.
    fn mount_spec(&self, rec: &Record, parent_ids: &[u64]) -> Vec<Mount> {
        let path = |id: u64| self.fs_dir(id).to_string_lossy().into_owned();
        if parent_ids.is_empty() {
            let ro = if rec.kind == Kind::View { "ro" } else { "rw" };
            return vec![Mount {
                kind: "bind".into(),
                source: path(rec.id),
                target: String::new(),
                options: vec![ro.into(), "rbind".into()],
            }];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if self.userxattr {
            options.push("userxattr".to_string());
        }
        if rec.kind == Kind::Active {
            options.push(format!(
                "workdir={}",
                self.dir(rec.id).join("work").to_string_lossy()
            ));
            options.push(format!("upperdir={}", path(rec.id)));
        } else if parent_ids.len() == 1 {
            return vec![Mount {
                kind: "bind".into(),
                source: path(parent_ids[0]),
                target: String::new(),
                options: vec!["ro".into(), "rbind".into()],
            }];
        }
        let lower: Vec<String> = parent_ids.iter().map(|&id| path(id)).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }

    /// Commits active `key` as `name`, measuring its usage once.
    pub async fn commit(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let rec = self.get(ns, key).await?;
        let store = self.store.clone();
        let fs = self.fs_dir(rec.id);
        let (ns, name, key) = (ns.to_string(), name.to_string(), key.to_string());
        blocking(move || {
            let usage = disk_usage(&fs)?;
            store.commit(&ns, &key, &name, labels, Some(usage))
        })
        .await?;
        Ok(())
    }

    /// Removes a snapshot without children: metadata first, then its directory. The
    /// children check, the unmount of its remote layer and the deletion of the record
    /// are one metadata transaction, so a child created meanwhile never finds its
    /// parent unmounted.
    pub async fn remove(&self, ns: &str, key: &str) -> Result<()> {
        let first = self.get(ns, key).await?;
        let _layer = self.locks.lock(first.id).await;
        let store = self.store.clone();
        let remote = self.remote.clone();
        let snaps = self.root.join("snapshots");
        let rt = tokio::runtime::Handle::current();
        let (ns2, key2) = (ns.to_string(), key.to_string());
        let rec = blocking(move || {
            store.remove_with(&ns2, &key2, |rec| {
                if rec.id != first.id {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {key2:?} was replaced while being removed"
                    )));
                }
                if !has_remote_mount(rec) {
                    return Ok(());
                }
                let fs = snaps.join(rec.id.to_string()).join("fs");
                rt.block_on(remote.unmount(&fs))
                    .map_err(|e| Error::Remote(format!("unmounting {}: {e}", fs.display())))
            })
        })
        .await?;
        let dir = self.dir(rec.id);
        blocking(move || {
            detach(&dir.join("fs"));
            // The metadata is gone already; a leftover directory is Cleanup's job.
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "removing snapshot directory failed; cleanup will retry");
            }
            Ok(())
        })
        .await
    }

    /// The info of `key`.
    pub async fn stat(&self, ns: &str, key: &str) -> Result<Info> {
        Ok(Info::new(key.to_string(), self.get(ns, key).await?))
    }

    /// Updates labels of `info.name`. `paths` as containerd's fieldpaths:
    /// empty or `labels` replaces all labels, `labels.KEY` sets or deletes one.
    pub async fn update(&self, ns: &str, info: Info, paths: Vec<String>) -> Result<Info> {
        let store = self.store.clone();
        let ns = ns.to_string();
        let name = info.name.clone();
        let rec = blocking(move || {
            store.update(&ns, &info.name, |rec| {
                if paths.is_empty() {
                    rec.labels = info.labels.clone();
                    return Ok(());
                }
                for p in &paths {
                    if p == "labels" {
                        rec.labels = info.labels.clone();
                    } else if let Some(k) = p.strip_prefix("labels.") {
                        match info.labels.get(k) {
                            Some(v) => {
                                rec.labels.insert(k.to_string(), v.clone());
                            }
                            None => {
                                rec.labels.remove(k);
                            }
                        }
                    } else {
                        return Err(Error::InvalidArgument(format!(
                            "cannot update {p:?} field on snapshot {:?}",
                            info.name
                        )));
                    }
                }
                Ok(())
            })
        })
        .await?;
        Ok(Info::new(name, rec))
    }

    /// Disk usage: stored at commit for committed snapshots, measured now otherwise.
    pub async fn usage(&self, ns: &str, key: &str) -> Result<Usage> {
        let rec = self.get(ns, key).await?;
        if rec.kind == Kind::Committed {
            if let Some(u) = rec.usage {
                return Ok(u);
            }
        }
        let fs = self.fs_dir(rec.id);
        blocking(move || disk_usage(&fs)).await
    }

    /// Snapshots of `ns` passing the containerd `filters`.
    pub async fn list(&self, ns: &str, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse(filters)?;
        let store = self.store.clone();
        let ns = ns.to_string();
        let all = blocking(move || store.list(&ns)).await?;
        Ok(all
            .into_iter()
            .filter(|(k, r)| {
                filter.matches(&Fields {
                    name: k,
                    parent: &r.parent,
                    kind: r.kind.as_str(),
                    labels: &r.labels,
                })
            })
            .map(|(k, r)| Info::new(k, r))
            .collect())
    }

    /// Removes snapshot directories that have no metadata; returns how many.
    pub async fn cleanup(&self) -> Result<usize> {
        let store = self.store.clone();
        let snaps = self.root.join("snapshots");
        let dirs = self.dirs.clone();
        blocking(move || {
            let _no_creates = dirs.write().unwrap_or_else(|p| p.into_inner());
            let ids: HashSet<String> = store
                .all()?
                .into_iter()
                .map(|(_, _, r)| r.id.to_string())
                .collect();
            let mut removed = 0;
            let rd =
                std::fs::read_dir(&snaps).map_err(|e| Error::io("read directory", &snaps, e))?;
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("read directory", &snaps, e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if ids.contains(&name) {
                    continue;
                }
                let p = ent.path();
                detach(&p.join("fs"));
                match std::fs::remove_dir_all(&p) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(path = %p.display(), error = %e, "cleanup failed"),
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn remote_records(&self) -> Result<Vec<(String, String, Record)>> {
        let store = self.store.clone();
        let all = blocking(move || store.all()).await?;
        Ok(all
            .into_iter()
            .filter(|(_, _, r)| r.labels.contains_key(label::REMOTE))
            .collect())
    }

    /// Remounts every remote snapshot recorded in the store (after a restart) whose
    /// mount is not still served (a FUSE manager that outlived the previous process
    /// keeps serving them). Returns how many are served.
    ///
    /// A snapshot that cannot be mounted again fails the whole restore with an error
    /// naming it, unless `allow_invalid_mounts_on_restart` is set: then it is logged
    /// and left for Mounts to retry (or for the user to remove).
    pub async fn restore_remote(&self) -> Result<usize> {
        let recs = self.remote_records().await?;
        // A mount still served for a snapshot that is gone (removed, or never
        // committed because the previous process stopped mid-Prepare) is dropped.
        // Compared canonically: the root may be spelled differently from last time.
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let wanted: HashSet<PathBuf> = recs
            .iter()
            .map(|(_, _, r)| canonical(&self.fs_dir(r.id)))
            .collect();
        match self.remote.mounted().await {
            Ok(live) => {
                for mp in live.into_iter().filter(|m| !wanted.contains(&canonical(m))) {
                    tracing::info!(mountpoint = %mp.display(), "unmounting a remote mount with no snapshot");
                    if let Err(e) = self.remote.unmount(&mp).await {
                        tracing::warn!(mountpoint = %mp.display(), error = %e, "unmount failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing remote mounts failed"),
        }
        let results: Vec<(String, Result<(), MountError>)> = stream::iter(recs)
            .map(|(ns, key, rec)| async move {
                let fs = self.fs_dir(rec.id);
                let _layer = self.locks.lock(rec.id).await;
                if self.remote.check(&fs).await.is_ok() {
                    tracing::debug!(namespace = %ns, snapshot = %key, "remote snapshot still served");
                    return (key, Ok(()));
                }
                // Whatever is there was served by a process that is gone.
                detach(&fs);
                let res = self.remount(&fs, &rec).await;
                (key, res)
            })
            .buffer_unordered(self.restore_concurrency)
            .collect()
            .await;
        let mut served = 0;
        let mut failed = Vec::new();
        for (key, res) in results {
            match res {
                Ok(()) => served += 1,
                Err(e) if self.allow_invalid_mounts_on_restart => {
                    tracing::warn!(snapshot = %key, kind = e.kind(), error = %e,
                        "restoring remote snapshot failed; allowed by allow_invalid_mounts_on_restart: \
                         Mounts retries it, or remove the snapshot");
                }
                Err(e) => failed.push(format!("{key:?} ({}): {e}", e.kind())),
            }
        }
        if !failed.is_empty() {
            return Err(Error::Unavailable(format!(
                "cannot restore remote snapshot(s) {}; set [snapshotter] \
                 allow_invalid_mounts_on_restart = true to start anyway",
                failed.join("; ")
            )));
        }
        Ok(served)
    }

    /// Unmounts every remote snapshot (on SIGINT shutdown).
    pub async fn unmount_all(&self) -> Result<()> {
        for (_, key, rec) in self.remote_records().await? {
            let fs = self.fs_dir(rec.id);
            if let Err(e) = self.remote.unmount(&fs).await {
                tracing::warn!(snapshot = %key, error = %e, "unmount failed");
            }
        }
        Ok(())
    }
}
