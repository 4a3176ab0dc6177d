//! The store's FUSE tree, laid out as containers/storage's additional layer store
//! expects: `<mountpoint>/<base64(image ref)>/<layer digest>/{diff,info,blob}`, plus
//! the `use` file and `rmdir` of a layer directory by which containers/storage declares
//! and releases use.
//!
//! `diff` is a symlink to the layer's own lazily fetched mount under the pool directory
//! (the kernel follows it when containers/storage stats the path and when overlayfs
//! resolves the lower directories); `info` is the JSON containers/storage decodes; `blob`
//! reads the compressed blob from the registry (`podman push`). A base64 reference
//! may contain `/`: the components before the digest are joined back into one.
//!
//! Lookups that go to the network run on blocking tasks, so the FUSE threads keep
//! answering; blob reads run on the fs crate's fetch pool.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};
use tracing::{debug, info, warn};

use crate::manager::{LayerManager, Unavailable};

/// Kernel cache lifetime of names and attributes, as in the reference.
const TTL: Duration = Duration::from_secs(1);
/// Longest base64 image reference accepted (a reference is at most 4 KiB).
const MAX_B64: usize = 8192;
/// Most inodes held at once; beyond it lookups fail until the kernel forgets some.
const MAX_NODES: usize = 1 << 20;
const ROOT: u64 = 1;

/// Names inside a layer directory.
pub const DIFF: &str = "diff";
pub const INFO: &str = "info";
pub const BLOB: &str = "blob";
pub const USE: &str = "use";

#[derive(Clone, Debug)]
enum Node {
    Root,
    /// An image reference's directory.
    Ref {
        reference: String,
    },
    Layer {
        reference: String,
        name: String,
    },
    Info {
        data: Arc<Vec<u8>>,
    },
    Diff {
        target: PathBuf,
    },
    Blob {
        reference: String,
        name: String,
        size: u64,
    },
}

struct Entry {
    node: Node,
    key: (u64, String),
    lookups: u64,
}

#[derive(Default)]
struct Nodes {
    by_ino: HashMap<u64, Entry>,
    by_name: HashMap<(u64, String), u64>,
    next: u64,
}

impl Nodes {
    /// Records a lookup of `name` in `parent` resolving to `node`; the same name keeps
    /// its inode while the kernel remembers it.
    fn insert(&mut self, parent: u64, name: &str, node: Node) -> Option<u64> {
        let key = (parent, name.to_string());
        if let Some(&ino) = self.by_name.get(&key) {
            if let Some(e) = self.by_ino.get_mut(&ino) {
                e.node = node;
                e.lookups += 1;
                return Some(ino);
            }
        }
        if self.by_ino.len() >= MAX_NODES {
            return None;
        }
        self.next = self.next.max(ROOT) + 1;
        let ino = self.next;
        self.by_name.insert(key.clone(), ino);
        self.by_ino.insert(
            ino,
            Entry {
                node,
                key,
                lookups: 1,
            },
        );
        Some(ino)
    }

    fn forget(&mut self, ino: u64, n: u64) {
        let gone = match self.by_ino.get_mut(&ino) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(n);
                e.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(e) = self.by_ino.remove(&ino) {
                if self.by_name.get(&e.key) == Some(&ino) {
                    self.by_name.remove(&e.key);
                }
            }
        }
    }
}

fn locked(m: &Mutex<Nodes>) -> MutexGuard<'_, Nodes> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The image reference `b64` encodes, if it decodes to a valid one.
fn decode_ref(b64: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let s = String::from_utf8(raw).ok()?;
    registry::Reference::parse(&s).ok()?;
    Some(s)
}

fn is_digest(name: &str) -> bool {
    registry::Digest::parse(name).is_ok()
}

/// Owner and times every node shows.
#[derive(Clone, Copy)]
struct Base {
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl Base {
    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, perm, size, nlink) = match node {
            Node::Root | Node::Ref { .. } | Node::Layer { .. } => {
                (FileType::Directory, 0o500, 0, 2)
            }
            Node::Info { data } => (FileType::RegularFile, 0o400, data.len() as u64, 1),
            Node::Blob { size, .. } => (FileType::RegularFile, 0o400, *size, 1),
            Node::Diff { target } => (FileType::Symlink, 0o777, target.as_os_str().len() as u64, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Registers `node` as `name` in `parent` and answers the lookup with it.
    fn reply(&self, nodes: &Mutex<Nodes>, parent: u64, name: &str, node: Node, reply: ReplyEntry) {
        let ino = locked(nodes).insert(parent, name, node.clone());
        match ino {
            Some(ino) => reply.entry(&TTL, &self.attr(ino, &node), Generation(0)),
            None => reply.error(Errno::ENFILE),
        }
    }
}

/// The store's filesystem, served by a multi-threaded FUSE session.
pub struct StoreFs {
    manager: Arc<LayerManager>,
    rt: tokio::runtime::Handle,
    nodes: Arc<Mutex<Nodes>>,
    base: Base,
}

impl StoreFs {
    pub fn new(manager: Arc<LayerManager>, rt: tokio::runtime::Handle) -> StoreFs {
        // SAFETY: getuid(2)/getgid(2) cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        StoreFs {
            manager,
            rt,
            nodes: Arc::default(),
            base: Base {
                uid,
                gid,
                started: SystemTime::now(),
            },
        }
    }

    fn node(&self, ino: u64) -> Option<Node> {
        if ino == ROOT {
            return Some(Node::Root);
        }
        locked(&self.nodes).by_ino.get(&ino).map(|e| e.node.clone())
    }

    /// `diff`, `info` and `blob`, which may need the registry: answered from a
    /// blocking task.
    fn lookup_layer_file(
        &self,
        parent: u64,
        reference: String,
        name: String,
        file: &str,
        reply: ReplyEntry,
    ) {
        let (manager, nodes, base, file) = (
            self.manager.clone(),
            self.nodes.clone(),
            self.base,
            file.to_string(),
        );
        self.rt.spawn_blocking(move || {
            let node = match file.as_str() {
                INFO => manager.info(&reference, &name).map(|data| Node::Info {
                    data: Arc::new(data),
                }),
                DIFF => manager.layer(&reference, &name).map(|s| Node::Diff {
                    target: s.dir.clone(),
                }),
                _ => manager.layer(&reference, &name).map(|s| Node::Blob {
                    reference: reference.clone(),
                    name: name.clone(),
                    size: s.blob_size,
                }),
            };
            match node {
                Ok(node) => base.reply(&nodes, parent, &file, node, reply),
                Err(e) => {
                    log_unavailable(&reference, &name, &e);
                    reply.error(Errno::ENOENT)
                }
            }
        });
    }
}

fn log_unavailable(reference: &str, name: &str, e: &Unavailable) {
    match e {
        // Plain layers are expected: containers/storage pulls them itself.
        Unavailable::NotLazy { .. } | Unavailable::NotInImage(_) => {
            debug!(image = %reference, layer = %name, reason = %e, "layer not served lazily")
        }
        _ => warn!(image = %reference, layer = %name, error = %e, "layer not served lazily"),
    }
}

impl Filesystem for StoreFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let parent = parent.0;
        let Some(dir) = self.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match dir {
            Node::Root => {
                // Base64 of an ASCII reference never holds a '/', so one component
                // names the image.
                let Some(reference) = (name.len() <= MAX_B64).then(|| decode_ref(name)).flatten()
                else {
                    return reply.error(Errno::ENOENT);
                };
                let node = Node::Ref { reference };
                self.base.reply(&self.nodes, parent, name, node, reply)
            }
            Node::Ref { reference } => {
                if !is_digest(name) {
                    return reply.error(Errno::ENOENT);
                }
                let node = Node::Layer {
                    reference,
                    name: name.to_string(),
                };
                self.base.reply(&self.nodes, parent, name, node, reply)
            }
            Node::Layer {
                reference,
                name: layer,
            } => match name {
                DIFF | INFO | BLOB => self.lookup_layer_file(parent, reference, layer, name, reply),
                // Absent by design: creating it is how use is declared.
                _ => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOTDIR),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 != ROOT {
            locked(&self.nodes).forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino.0) {
            Some(n) => reply.attr(&TTL, &self.base.attr(ino.0, &n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino.0) {
            Some(Node::Diff { target }) => {
                use std::os::unix::ffi::OsStrExt as _;
                reply.data(target.as_os_str().as_bytes())
            }
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match (self.node(parent.0), name.to_str()) {
            (Some(Node::Layer { reference, name }), Some(USE)) => {
                let n = self.manager.use_layer(&reference, &name);
                info!(image = %reference, layer = %name, uses = n, "layer marked as in use");
                // The file never exists; the attempt is the message.
                reply.error(Errno::ENOENT)
            }
            (Some(_), _) => reply.error(Errno::EROFS),
            (None, _) => reply.error(Errno::ENOENT),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (Some(Node::Ref { reference }), Some(name)) = (self.node(parent.0), name.to_str())
        else {
            return reply.error(Errno::EROFS);
        };
        match self.manager.release(&reference, name) {
            Some(n) => info!(image = %reference, layer = %name, uses = n, "layer released"),
            None => debug!(image = %reference, layer = %name, "release of a layer not in use"),
        }
        // The directory stays; ENOENT tells containers/storage the release was heard.
        reply.error(Errno::ENOENT)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // Regular files: always ready.
        reply.poll(events)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Attribute flags and the like: none here.
        reply.error(Errno::ENOTTY)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino.0) {
            // The content of both never changes under the same inode.
            Some(Node::Info { .. } | Node::Blob { .. }) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.node(ino.0) {
            Some(Node::Info { data }) => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                reply.data(&data[start..end])
            }
            Some(Node::Blob {
                reference, name, ..
            }) => {
                let manager = self.manager.clone();
                self.manager.fetch_pool().spawn(move || {
                    let res = manager
                        .layer(&reference, &name)
                        .map_err(|e| e.to_string())
                        .and_then(|s| s.read_blob(offset, size).map_err(|e| e.to_string()));
                    match res {
                        Ok(data) => reply.data(&data),
                        Err(e) => {
                            warn!(image = %reference, layer = %name, error = %e, "blob read failed");
                            reply.error(Errno::EIO)
                        }
                    }
                });
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino.0) {
            Some(Node::Root | Node::Ref { .. } | Node::Layer { .. }) => {
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        // Nothing is listed: every name is made on lookup, as in the reference.
        let entries: [(&str, FileType); 2] =
            [(".", FileType::Directory), ("..", FileType::Directory)];
        for (i, (name, kind)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096)
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.node(ino.0) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

/// A mounted store; dropping it unmounts.
pub struct StoreMount {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl StoreMount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for StoreMount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmounting the store failed");
            }
        }
    }
}

/// FUSE request threads of the store's tree (lookups that wait go to blocking tasks).
const FUSE_THREADS: usize = 4;

/// Mounts `fs` at `mountpoint`, detaching a dead mount a previous run left there.
pub fn mount(fs: StoreFs, mountpoint: &Path) -> std::io::Result<StoreMount> {
    use fuser::{MountOption, SessionACL};
    for m in crate::manager::mounts_under(mountpoint) {
        if m == mountpoint {
            info!(mountpoint = %m.display(), "detaching the mount of a previous run");
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("stargzstore".into()),
        MountOption::Subtype("stargzstore".into()),
        MountOption::DefaultPermissions,
    ];
    // Podman runs as root, CRI-O too; rootless engines share the store's user namespace.
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(FUSE_THREADS);
    let session = fuser::Session::new(fs, mountpoint, &cfg)?.spawn()?;
    info!(mountpoint = %mountpoint.display(), "store mounted");
    Ok(StoreMount {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn names() {
        let r = "127.0.0.1:5000/a/b:v1";
        let b64 = base64::engine::general_purpose::STANDARD.encode(r);
        assert_eq!(decode_ref(&b64).as_deref(), Some(r));
        assert_eq!(decode_ref("not base64!"), None);
        assert_eq!(
            decode_ref(&base64::engine::general_purpose::STANDARD.encode("UP/x")),
            None
        );
        assert!(is_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_digest("sha256:zz"));
    }

    #[test]
    fn inodes_live_while_the_kernel_remembers_them() {
        let mut n = Nodes::default();
        let a = n.insert(ROOT, "x", Node::Root).unwrap();
        assert_eq!(n.insert(ROOT, "x", Node::Root), Some(a));
        let b = n.insert(a, "y", Node::Root).unwrap();
        assert_ne!(a, b);
        n.forget(a, 1);
        assert!(n.by_ino.contains_key(&a));
        n.forget(a, 1);
        assert!(!n.by_ino.contains_key(&a));
        assert!(!n.by_name.contains_key(&(ROOT, "x".to_string())));
        let c = n.insert(ROOT, "x", Node::Root).unwrap();
        assert_ne!(c, a);
    }
}
