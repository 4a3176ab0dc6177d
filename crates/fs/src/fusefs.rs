//! The FUSE side: inode numbering, attributes, directory listings with overlayfs-style
//! whiteouts, xattrs, the state directory, and reads answered from the cache on the FUSE
//! thread or, after a fetch, from the fetch pool thread that fetched.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use estargz::{NodeId, NodeKind};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use tracing::{debug, error, info, warn};

use crate::layer::Layer;
use crate::learn::AccessLog;
use crate::metrics::{FuseOp, FuseOpMetrics, OpTimer};
use crate::pool::FetchPool;

/// Name of the state directory at the root; hidden from listings, reachable by lookup.
pub const STATE_DIR: &str = ".stargz-snapshotter";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How FUSE presents the layer.
#[derive(Debug, Clone)]
pub(crate) struct FuseOpts {
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub passthrough: bool,
}

/// Open handles of one inode. The kernel refuses (EIO) to mix passthrough and
/// user-space opens of an inode, so a file stays in the mode its open handles use
/// until they are all released.
#[derive(Default)]
struct Opens {
    backing: Option<Arc<BackingId>>,
    passthrough: usize,
    user: usize,
}

/// File handle of opens served from user space; passthrough opens get others.
const USER_FH: FileHandle = FileHandle(0);

pub(crate) struct FuseLayer {
    layer: Arc<Layer>,
    opts: FuseOpts,
    pool: FetchPool,
    /// Node is a `.wh.NAME` file shown as a whiteout device.
    whiteout: Vec<bool>,
    /// Directory holds `.wh..wh..opq`.
    opaque: Vec<bool>,
    /// Directory holds `.wh.NAME` files, so a missing name may be a whiteout.
    has_whiteouts: Vec<bool>,
    state_dir_ino: u64,
    state_file_ino: u64,
    state_file_name: String,
    passthrough_ok: AtomicBool,
    /// The kernel opens directories by itself (and then keeps their listings cached).
    no_opendir: bool,
    opens: Mutex<HashMap<u64, Opens>>,
    /// Files whose whole-file copy is being assembled.
    materializing: Arc<Mutex<HashSet<NodeId>>>,
    next_fh: AtomicU64,
    passthrough_opens: Arc<AtomicU64>,
    ops: Option<FuseOpMetrics>,
    /// Where the first files the workload opens are noted, when recording. Every read
    /// follows an open of its file through this filesystem (the kernel is not offered
    /// FUSE_NO_OPEN_SUPPORT), so the read path does not note again.
    learn: Option<Arc<AccessLog>>,
}

/// Linux's 32-bit device encoding, as FUSE carries it.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// The attributes sent with a negative entry; the kernel reads only the node id (0).
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn time_of(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

impl FuseLayer {
    pub(crate) fn new(
        layer: Arc<Layer>,
        opts: FuseOpts,
        pool: FetchPool,
        passthrough_opens: Arc<AtomicU64>,
        ops: Option<FuseOpMetrics>,
    ) -> FuseLayer {
        let index = layer.index();
        let mut whiteout = vec![false; index.len()];
        let mut opaque = vec![false; index.len()];
        let mut has_whiteouts = vec![false; index.len()];
        for (id, node) in index.nodes() {
            if node.kind != NodeKind::Dir {
                continue;
            }
            for (name, &child) in &node.children {
                if name == OPAQUE_MARKER {
                    opaque[id as usize] = true;
                } else if name.starts_with(WHITEOUT_PREFIX) {
                    whiteout[child as usize] = true;
                    has_whiteouts[id as usize] = true;
                }
            }
        }
        let n = index.len() as u64;
        FuseLayer {
            state_file_name: format!("{}.json", layer.desc().digest),
            layer,
            opts,
            pool,
            whiteout,
            opaque,
            has_whiteouts,
            state_dir_ino: n + 1,
            state_file_ino: n + 2,
            passthrough_ok: AtomicBool::new(false),
            no_opendir: false,
            opens: Mutex::new(HashMap::new()),
            materializing: Arc::default(),
            next_fh: AtomicU64::new(1),
            passthrough_opens,
            ops,
            learn: None,
        }
    }

    /// Notes the regular files opened in `log` from now on.
    pub(crate) fn record_into(&mut self, log: Option<Arc<AccessLog>>) {
        self.learn = log;
    }

    fn note_access(&self, id: NodeId) {
        if let Some(log) = &self.learn {
            log.note(id);
        }
    }

    fn timer(&self, op: FuseOp) -> Option<OpTimer> {
        self.ops.as_ref().map(|m| m.time(op))
    }

    fn node_of(&self, ino: INodeNo) -> Option<NodeId> {
        let id = NodeId::try_from(ino.0.checked_sub(1)?).ok()?;
        self.layer.index().get(id).map(|_| id)
    }

    fn kind_of(&self, id: NodeId) -> FileType {
        if self.whiteout[id as usize] {
            return FileType::CharDevice;
        }
        match self.layer.index().node(id).kind {
            NodeKind::Dir => FileType::Directory,
            NodeKind::Reg => FileType::RegularFile,
            NodeKind::Symlink => FileType::Symlink,
            NodeKind::Char => FileType::CharDevice,
            NodeKind::Block => FileType::BlockDevice,
            NodeKind::Fifo => FileType::NamedPipe,
        }
    }

    fn attr_of(&self, id: NodeId) -> FileAttr {
        let n = self.layer.index().node(id);
        let t = time_of(n.mtime);
        let wh = self.whiteout[id as usize];
        let size = match n.kind {
            _ if wh => 0,
            NodeKind::Reg => n.size,
            NodeKind::Symlink => n.link_target.len() as u64,
            NodeKind::Dir => 4096,
            _ => 0,
        };
        let rdev = match n.kind {
            NodeKind::Char | NodeKind::Block if !wh => encode_dev(n.dev_major, n.dev_minor),
            _ => 0,
        };
        FileAttr {
            ino: INodeNo(u64::from(id) + 1),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: self.kind_of(id),
            perm: if wh { 0 } else { (n.mode & 0o7777) as u16 },
            nlink: n.nlink.max(1),
            uid: n.uid,
            gid: n.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn special_attr(&self, ino: u64) -> Option<FileAttr> {
        let root = self.attr_of(self.layer.index().root());
        let (kind, perm, size, nlink) = if ino == self.state_dir_ino {
            (FileType::Directory, 0o755, 4096, 2)
        } else if ino == self.state_file_ino {
            (
                FileType::RegularFile,
                0o444,
                self.layer.state_json().len() as u64,
                1,
            )
        } else {
            return None;
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            ..root
        })
    }

    /// How long the kernel may keep the attributes of `ino`: the configured lifetime,
    /// except for the state file, whose size follows the fetch progress.
    fn attr_ttl(&self, ino: u64) -> Duration {
        if ino == self.state_file_ino {
            Duration::ZERO
        } else {
            self.opts.attr_ttl
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        match self.node_of(ino) {
            Some(id) => Some(self.attr_of(id)),
            None => self.special_attr(ino.0),
        }
    }

    fn lookup_child(&self, parent: INodeNo, name: &str) -> Option<FileAttr> {
        if parent.0 == self.state_dir_ino {
            return (name == self.state_file_name)
                .then(|| self.special_attr(self.state_file_ino))
                .flatten();
        }
        let dir = self.node_of(parent)?;
        if dir == self.layer.index().root() && name == STATE_DIR {
            return self.special_attr(self.state_dir_ino);
        }
        if name.starts_with(WHITEOUT_PREFIX) {
            return None;
        }
        let index = self.layer.index();
        let child = match index.child(dir, name) {
            Some(child) => child,
            None if self.has_whiteouts[dir as usize] => {
                index.child(dir, &format!("{WHITEOUT_PREFIX}{name}"))?
            }
            None => return None,
        };
        Some(self.attr_of(child))
    }

    /// Walks the directory entries of `ino` as shown (whiteout files renamed, the opaque
    /// marker and, at the root, the state directory hidden) from position `skip`, handing
    /// each to `add` with its position until `add` says the reply is full. Nothing is
    /// collected, so a listing continued at an offset costs no copy of what came before.
    /// `None` when `ino` is not a directory.
    fn each_entry(
        &self,
        ino: INodeNo,
        skip: usize,
        mut add: impl FnMut(usize, u64, FileType, &str) -> bool,
    ) -> Option<()> {
        if ino.0 == self.state_dir_ino {
            let fixed = [
                (self.state_dir_ino, FileType::Directory, "."),
                (1, FileType::Directory, ".."),
                (
                    self.state_file_ino,
                    FileType::RegularFile,
                    self.state_file_name.as_str(),
                ),
            ];
            for (i, (child, kind, name)) in fixed.into_iter().enumerate().skip(skip) {
                if add(i, child, kind, name) {
                    break;
                }
            }
            return Some(());
        }
        let id = self.node_of(ino)?;
        let node = self.layer.index().node(id);
        if node.kind != NodeKind::Dir {
            return None;
        }
        let dots = [
            (ino.0, FileType::Directory, "."),
            (u64::from(node.parent) + 1, FileType::Directory, ".."),
        ];
        let children = node.children.iter().filter_map(|(name, &child)| {
            if name == OPAQUE_MARKER {
                return None;
            }
            let shown = match name.strip_prefix(WHITEOUT_PREFIX) {
                Some(real) if node.children.contains_key(real) => return None,
                Some(real) => real,
                None => name.as_str(),
            };
            Some((u64::from(child) + 1, self.kind_of(child), shown))
        });
        for (i, (child, kind, name)) in dots.into_iter().chain(children).enumerate().skip(skip) {
            if add(i, child, kind, name) {
                break;
            }
        }
        Some(())
    }

    fn xattrs(&self, ino: INodeNo) -> Vec<(String, Vec<u8>)> {
        let Some(id) = self.node_of(ino) else {
            return Vec::new();
        };
        let mut v: Vec<(String, Vec<u8>)> = self
            .layer
            .index()
            .node(id)
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if self.opaque[id as usize] && !v.iter().any(|(k, _)| k == OPAQUE_XATTR) {
            v.push((OPAQUE_XATTR.into(), b"y".to_vec()));
        }
        v
    }

    fn reply_xattr(reply: ReplyXattr, data: &[u8], size: u32) {
        if size == 0 {
            reply.size(data.len() as u32);
        } else if data.len() > size as usize {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(data);
        }
    }

    /// Assembles a multi-chunk file's whole-file copy off the FUSE thread, so that this
    /// open is answered at once (through user space) and later opens go straight to the
    /// kernel.
    fn materialize_later(&self, id: NodeId) {
        if !self.layer.materializable(id) {
            return;
        }
        let started = self
            .materializing
            .lock()
            .is_ok_and(|mut busy| busy.insert(id));
        if !started {
            return;
        }
        let (layer, busy) = (self.layer.clone(), self.materializing.clone());
        let queued = self.pool.try_spawn({
            let busy = busy.clone();
            move || {
                // Cleared even if the copy panics, so a later open may try again.
                struct Done(Arc<Mutex<HashSet<NodeId>>>, NodeId);
                impl Drop for Done {
                    fn drop(&mut self) {
                        if let Ok(mut busy) = self.0.lock() {
                            busy.remove(&self.1);
                        }
                    }
                }
                let _done = Done(busy, id);
                layer.materialize(id);
            }
        });
        if !queued {
            if let Ok(mut busy) = busy.lock() {
                busy.remove(&id);
            }
        }
    }

    /// Starts fetching ahead of a reader that walks the blob in order. Read-ahead is
    /// dropped when the pool's queue is full: readers fetch for themselves.
    fn read_ahead(&self, id: NodeId, offset: u64, len: u64, cached: Option<bool>) {
        for range in self.layer.note_access(id, offset, len, cached) {
            let layer = self.layer.clone();
            if !self.pool.try_spawn(move || layer.read_ahead(range)) {
                debug!("fetch pool is full; read-ahead skipped");
            }
        }
    }

    /// Opens regular file `id` with passthrough when it is fully local and no handle
    /// of it is open through user space; otherwise through user space.
    fn open_file(&self, id: NodeId, ino: u64, reply: ReplyOpen) {
        // Layer content never changes, so the page cache stays valid across opens.
        let user_open = |opens: &mut HashMap<u64, Opens>, reply: ReplyOpen| {
            opens.entry(ino).or_default().user += 1;
            reply.opened(USER_FH, FopenFlags::FOPEN_KEEP_CACHE);
        };
        let mut opens = match self.opens.lock() {
            Ok(o) => o,
            Err(p) => p.into_inner(),
        };
        let state = opens.entry(ino).or_default();
        if let Some(id) = state.backing.clone() {
            state.passthrough += 1;
            self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            let fh = FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed));
            return reply.opened_passthrough(fh, FopenFlags::empty(), &id);
        }
        if state.user > 0 || !self.passthrough_ok.load(Ordering::SeqCst) {
            return user_open(&mut opens, reply);
        }
        let Some(path) = self.layer.backing_file(id) else {
            self.materialize_later(id);
            return user_open(&mut opens, reply);
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot open a cached file");
                return user_open(&mut opens, reply);
            }
        };
        match reply.open_backing(&file) {
            Ok(backing) => {
                let backing = Arc::new(backing);
                self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                let fh = FileHandle(self.next_fh.fetch_add(1, Ordering::Relaxed));
                reply.opened_passthrough(fh, FopenFlags::empty(), &backing);
                let state = opens.entry(ino).or_default();
                state.backing = Some(backing);
                state.passthrough = 1;
            }
            Err(e) => {
                warn!(error = %e, "passthrough refused by the kernel; serving reads in user space");
                self.passthrough_ok.store(false, Ordering::SeqCst);
                user_open(&mut opens, reply);
            }
        }
    }
}

impl Filesystem for FuseLayer {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.add_capabilities(InitFlags::FUSE_READDIRPLUS_AUTO);
        // Symlink targets never change, so the kernel may keep them in its page cache;
        // lookups in one directory need not wait for each other.
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // A kernel that can open directories without asking gives every directory
        // handle FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE once opendir answers ENOSYS: a walk
        // then sends neither opendir nor releasedir, two requests per directory.
        self.no_opendir = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        // Reads wait on the network in pool threads, so let the kernel keep more of
        // them (readahead included) outstanding than its default of 12.
        let _ = config.set_max_background(64);
        if self.opts.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough_ok.store(ok, Ordering::SeqCst);
            info!(enabled = ok, "FUSE passthrough");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.timer(FuseOp::Lookup);
        // A name that is not UTF-8 can be in no TOC, so it is as absent as any other.
        let found = name
            .to_str()
            .and_then(|name| self.lookup_child(parent, name));
        match found {
            Some(attr) => reply.entry_with_ttls(
                &self.attr_ttl(attr.ino.0),
                &self.opts.entry_ttl,
                &attr,
                Generation(0),
            ),
            // Node id 0 with a lifetime is a negative entry the kernel keeps: a name
            // missing from an immutable layer stays missing, and interpreters probe many.
            None if !self.opts.entry_ttl.is_zero() => reply.entry_with_ttls(
                &Duration::ZERO,
                &self.opts.entry_ttl,
                &negative_attr(),
                Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.timer(FuseOp::Getattr);
        match self.attr(ino) {
            Some(attr) => reply.attr(&self.attr_ttl(ino.0), &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.timer(FuseOp::Readlink);
        match self.node_of(ino).map(|id| self.layer.index().node(id)) {
            Some(n) if n.kind == NodeKind::Symlink => reply.data(n.link_target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.timer(FuseOp::Open);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if ino.0 == self.state_file_ino {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }
        let Some(id) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if self.layer.index().node(id).kind != NodeKind::Reg || self.whiteout[id as usize] {
            return reply.error(Errno::EACCES);
        }
        self.note_access(id);
        // A panic in this layer's code ends this request (the dropped reply answers
        // EIO), not the FUSE thread.
        let res = catch_unwind(AssertUnwindSafe(|| {
            self.read_ahead(id, 0, u64::MAX, None);
            self.open_file(id, ino.0, reply);
        }));
        if res.is_err() {
            error!(layer = %self.layer.desc().digest, ino = ino.0, "open panicked; answered EIO");
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
        let _timer = self.timer(FuseOp::Read);
        if ino.0 == self.state_file_ino {
            let json = self.layer.state_json();
            let start = (offset as usize).min(json.len());
            let end = start.saturating_add(size as usize).min(json.len());
            return reply.data(&json[start..end]);
        }
        let Some(id) = self.node_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(log) = &self.learn {
            if self.layer.index().node(id).size >= crate::learn::RANGED_FILE_MIN {
                log.note_read(id, offset, u64::from(size));
            }
        }
        // Verified cached bytes are answered right here; a miss goes to the fetch pool,
        // whose thread fetches and answers. A panic in either place ends this request
        // with EIO (the dropped reply answers it) and nothing else.
        let fast = catch_unwind(AssertUnwindSafe(|| {
            let cached = self.layer.read_cached(id, offset, size);
            self.read_ahead(id, offset, u64::from(size), Some(cached.is_some()));
            cached
        }));
        let cached = match fast {
            Ok(c) => c,
            Err(_) => {
                error!(layer = %self.layer.desc().digest, ino = ino.0, offset, size,
                    "read panicked; answered EIO");
                return reply.error(Errno::EIO);
            }
        };
        if let Some(data) = cached {
            if let Some(m) = &self.ops {
                m.served(data.len());
            }
            return reply.data(&data);
        }
        let (layer, ops) = (self.layer.clone(), self.ops.clone());
        self.pool.spawn(move || {
            let _timer = _timer;
            match catch_unwind(AssertUnwindSafe(|| layer.read_missed(id, offset, size))) {
                Ok(Ok(data)) => {
                    if let Some(m) = &ops {
                        m.served(data.len());
                    }
                    reply.data(&data)
                }
                Ok(Err(e)) => {
                    debug!(ino = ino.0, offset, size, error = %e, "read failed");
                    reply.error(Errno::EIO)
                }
                Err(_) => {
                    error!(layer = %layer.desc().digest, ino = ino.0, offset, size,
                        "read panicked; answered EIO");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.timer(FuseOp::Release);
        if let Ok(mut opens) = self.opens.lock() {
            if let Some(state) = opens.get_mut(&ino.0) {
                if fh == USER_FH {
                    state.user = state.user.saturating_sub(1);
                } else {
                    state.passthrough = state.passthrough.saturating_sub(1);
                    if state.passthrough == 0 {
                        state.backing = None;
                    }
                }
                if state.user == 0 && state.passthrough == 0 {
                    opens.remove(&ino.0);
                }
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.timer(FuseOp::Opendir);
        if self.no_opendir {
            return reply.error(Errno::ENOSYS);
        }
        if ino.0 == self.state_dir_ino {
            return reply.opened(FileHandle(0), FopenFlags::empty());
        }
        match self.node_of(ino).map(|id| self.layer.index().node(id).kind) {
            // The kernel keeps listings in the directory's page cache, and drops them at
            // every open that does not ask to keep it.
            Some(NodeKind::Dir) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
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
        let _timer = self.timer(FuseOp::Readdir);
        let listed = self.each_entry(ino, offset as usize, |i, child, kind, name| {
            reply.add(INodeNo(child), (i + 1) as u64, kind, name)
        });
        match listed {
            Some(()) => reply.ok(),
            None => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = self.timer(FuseOp::Readdirplus);
        let listed = self.each_entry(ino, offset as usize, |i, child, _, name| {
            let Some(attr) = self.attr(INodeNo(child)) else {
                return false;
            };
            // One lifetime covers both the name and the attributes here, so the state
            // file (whose size changes) is listed without caching either.
            let ttl = if child == self.state_file_ino {
                Duration::ZERO
            } else {
                self.opts.entry_ttl.min(self.opts.attr_ttl)
            };
            reply.add(
                INodeNo(child),
                (i + 1) as u64,
                name,
                &ttl,
                &attr,
                Generation(0),
            )
        });
        match listed {
            Some(()) => reply.ok(),
            None => reply.error(Errno::ENOTDIR),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.timer(FuseOp::Statfs);
        let index = self.layer.index();
        let bytes: u64 = index.nodes().map(|(_, n)| n.size).sum();
        reply.statfs(
            bytes.div_ceil(4096),
            0,
            0,
            index.len() as u64 + 2,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.timer(FuseOp::Getxattr);
        let want = name.as_bytes();
        match self
            .xattrs(ino)
            .into_iter()
            .find(|(k, _)| k.as_bytes() == want)
        {
            Some((_, v)) => Self::reply_xattr(reply, &v, size),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.timer(FuseOp::Listxattr);
        let mut list = Vec::new();
        for (k, _) in self.xattrs(ino) {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        Self::reply_xattr(reply, &list, size);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let _timer = self.timer(FuseOp::Access);
        if self.attr(ino).is_some() {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }
}

/// Whether `path` is a mount point of this process's namespace.
pub(crate) fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want)
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
