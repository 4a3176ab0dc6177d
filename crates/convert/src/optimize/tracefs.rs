//! A read-only passthrough FUSE view of one unpacked layer that notes, per regular
//! file, the byte ranges the kernel reads through it (read(2) and mmap page faults
//! alike, readahead included), so that optimize learns which parts of big files a
//! workload needs and not only which files. It serves as an overlayfs lower layer.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
    SessionACL,
};

use crate::error::{Error, Result};

/// Most merged ranges kept per file. Past it, the file's ranges are widened to aligned
/// blocks of 4 KiB, then 8 KiB, 16 KiB... (doubling) until at most half as many remain;
/// later reads of that file are widened the same way. The ranges then cover all that
/// was read and some bytes around it, never less, and never past the file's end.
pub const MAX_RANGES_PER_FILE: usize = 1024;
/// The first block size ranges are widened to when a file has too many.
const FIRST_GRAIN: u64 = 4096;
/// The kernel's readahead window for these mounts (the common default, and at most what
/// the kernel offers). A smaller window would make the ranges tighter, but every small
/// read of a sequential reader would then wait on a round trip through this process.
pub const MAX_READAHEAD: u32 = 128 * 1024;
/// The tree under a trace mount never changes while it is mounted, so names and
/// attributes may stay in the kernel's caches for the whole run.
const TTL: Duration = Duration::from_secs(24 * 3600);
const FUSE_THREADS: usize = 2;
/// Longest [`TraceMount::finish`] waits for the FUSE session to end after unmounting.
const UNMOUNT_WAIT: Duration = Duration::from_secs(10);
const ROOT_INO: u64 = 1;

/// A layer directory mounted read-only through FUSE, noting what is read through it;
/// unmounted by [`TraceMount::finish`] or, failing that, when dropped.
pub struct TraceMount {
    state: Arc<State>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for TraceMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceMount")
            .field("source", &self.state.source)
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl TraceMount {
    /// Mounts a read-only view of `source` at `mountpoint` (created when missing) with
    /// `allow_other`, `default_permissions` and `ro`. Blocking: it waits for the
    /// kernel's FUSE handshake.
    pub fn mount(source: &Path, mountpoint: &Path) -> Result<TraceMount> {
        let meta = std::fs::metadata(source)
            .map_err(|e| Error::io(format!("reading {}", source.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::Options(format!(
                "{} is not a directory",
                source.display()
            )));
        }
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| Error::io(format!("creating {}", mountpoint.display()), e))?;
        // The FUSE threads resolve every request against this path, whatever the
        // process's working directory becomes.
        let source = &std::fs::canonicalize(source)
            .map_err(|e| Error::io(format!("resolving {}", source.display()), e))?;
        let state = Arc::new(State::new(source.clone()));
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            MountOption::RO,
            MountOption::FSName("stargz-trace".into()),
            MountOption::Subtype("stargz-trace".into()),
            MountOption::DefaultPermissions,
            // The overlay above decides about set-id bits and devices; this mount
            // only has to show the layer as it is.
            MountOption::Suid,
            MountOption::Dev,
        ];
        cfg.acl = SessionACL::All;
        cfg.n_threads = Some(FUSE_THREADS);
        cfg.clone_fd = true;
        let mount_err = |e: std::io::Error| {
            Error::io(
                format!(
                    "mounting a trace of {} at {}",
                    source.display(),
                    mountpoint.display()
                ),
                e,
            )
        };
        let session =
            fuser::Session::new(TraceFs(state.clone()), mountpoint, &cfg).map_err(mount_err)?;
        let session = session.spawn().map_err(mount_err)?;
        tracing::debug!(source = %source.display(), mountpoint = %mountpoint.display(), "trace mounted");
        Ok(TraceMount {
            state,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Where the view is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and returns, per regular file read (its path relative to `source`,
    /// without a leading '/'), the byte ranges read: sorted, disjoint, adjacent and
    /// overlapping ones merged, at most [`MAX_RANGES_PER_FILE`] of them. Files come in
    /// the order of their first read; files of which no byte was read (the kernel
    /// never asks for an empty file's bytes) and names that are not UTF-8 are left out.
    ///
    /// Unmount whatever is stacked on this mount (the overlay) first: until then the
    /// kernel keeps the FUSE connection, and this waits for it a while, then returns
    /// what was read so far.
    pub fn finish(mut self) -> Result<Vec<(String, Vec<Range<u64>>)>> {
        self.shutdown()?;
        Ok(self.state.ranges())
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // The session ends once the kernel drops the connection, which a lazily
        // detached mount with users left delays; wait a while on another thread.
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("trace-umount".into())
            .spawn(move || {
                let _ = tx.send(session.umount_and_join());
            });
        let res = match spawned {
            Ok(_) => match rx.recv_timeout(UNMOUNT_WAIT) {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(mountpoint = %self.mountpoint.display(),
                        "trace mount still in use after unmounting; leaving its session to end on its own");
                    Ok(())
                }
            },
            Err(e) => Err(e),
        };
        let Err(e) = res else { return Ok(()) };
        // Busy (something still has it open) or the helper thread could not start:
        // detach it, so that it goes away once its last user does.
        match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e,
                    "trace mount detached lazily");
                Ok(())
            }
            // Not a mount point (any more): the first attempt got that far.
            Err(nix::errno::Errno::EINVAL) => Ok(()),
            Err(e2) => Err(Error::io(
                format!("unmounting {} ({e})", self.mountpoint.display()),
                std::io::Error::from(e2),
            )),
        }
    }
}

impl Drop for TraceMount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "cannot unmount a trace mount");
        }
    }
}

/// An inode the kernel was told about: the path relative to the source, which never
/// changes meaning because the tree is immutable while mounted.
struct Node {
    path: Arc<Path>,
    parent: u64,
    dir: bool,
}

/// Inode numbers by path and back. Entries are only made for paths that exist (found
/// by lookup or listed by readdir), so the table is bounded by the tree; it is never
/// shrunk on forget, which saves keeping lookup counts.
struct Inodes {
    nodes: Vec<Node>,
    by_path: HashMap<Arc<Path>, u64>,
}

impl Inodes {
    fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino.checked_sub(1)?).ok()?)
    }

    fn intern(&mut self, path: PathBuf, parent: u64, dir: bool) -> u64 {
        if let Some(&ino) = self.by_path.get(path.as_path()) {
            return ino;
        }
        let path: Arc<Path> = path.into();
        self.nodes.push(Node {
            path: path.clone(),
            parent,
            dir,
        });
        let ino = self.nodes.len() as u64;
        self.by_path.insert(path, ino);
        ino
    }
}

/// The ranges read of one file: start -> end, disjoint, not touching each other.
#[derive(Debug)]
struct Ranges {
    map: BTreeMap<u64, u64>,
    /// Ranges are widened to multiples of this (1: kept as read).
    grain: u64,
    /// The file's size: widened ranges stop there.
    size: u64,
}

impl Ranges {
    fn new(size: u64) -> Ranges {
        Ranges {
            map: BTreeMap::new(),
            grain: 1,
            size,
        }
    }

    fn add(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        self.size = self.size.max(end);
        let (s, e) = self.widen(start, end);
        self.insert(s, e);
        if self.map.len() > MAX_RANGES_PER_FILE {
            self.coarsen();
        }
    }

    fn widen(&self, start: u64, end: u64) -> (u64, u64) {
        if self.grain <= 1 {
            return (start, end);
        }
        let g = self.grain;
        (
            start - start % g,
            end.div_ceil(g).saturating_mul(g).min(self.size).max(end),
        )
    }

    /// Adds `start..end`, merged with every range it overlaps or touches.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        // Ranges are disjoint, so their ends grow with their starts: walking down
        // from the last one starting at or before `end`, the touching ones come
        // first and the first that ends before `start` ends the walk.
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.map.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    fn coarsen(&mut self) {
        while self.map.len() > MAX_RANGES_PER_FILE / 2 {
            self.grain = if self.grain < FIRST_GRAIN {
                FIRST_GRAIN
            } else {
                self.grain.saturating_mul(2)
            };
            for (s, e) in std::mem::take(&mut self.map) {
                let (s, e) = self.widen(s, e);
                self.insert(s, e);
            }
        }
        tracing::debug!(
            grain = self.grain,
            ranges = self.map.len(),
            "read ranges widened"
        );
    }

    fn to_vec(&self) -> Vec<Range<u64>> {
        self.map.iter().map(|(&s, &e)| s..e).collect()
    }
}

#[derive(Default)]
struct Reads {
    /// Inodes in the order of their first read.
    order: Vec<u64>,
    files: HashMap<u64, Ranges>,
}

struct OpenFile {
    file: File,
    size: u64,
}

/// What the FUSE threads and the mount's owner share.
struct State {
    source: PathBuf,
    inodes: Mutex<Inodes>,
    reads: Mutex<Reads>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// A poisoned lock only means another FUSE thread panicked mid-request; the tables
/// stay consistent (every change is one push or insert), so go on with them.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    fn new(source: PathBuf) -> State {
        let root: Arc<Path> = Path::new("").into();
        let inodes = Inodes {
            nodes: vec![Node {
                path: root.clone(),
                parent: ROOT_INO,
                dir: true,
            }],
            by_path: HashMap::from([(root, ROOT_INO)]),
        };
        State {
            source,
            inodes: Mutex::new(inodes),
            reads: Mutex::new(Reads::default()),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The node's path relative to the source, whether it is a directory, and its parent.
    fn node(&self, ino: INodeNo) -> Option<(Arc<Path>, bool, u64)> {
        lock(&self.inodes)
            .get(ino.0)
            .map(|n| (n.path.clone(), n.dir, n.parent))
    }

    /// The source path of `rel`. The join never follows a symlink on the way: every
    /// node's parent was a directory when looked up, and the tree does not change.
    fn full(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.source.clone()
        } else {
            self.source.join(rel)
        }
    }

    fn note_read(&self, ino: u64, size: u64, start: u64, end: u64) {
        let mut reads = lock(&self.reads);
        let reads = &mut *reads;
        let ranges = reads.files.entry(ino).or_insert_with(|| {
            reads.order.push(ino);
            Ranges::new(size)
        });
        ranges.add(start, end);
    }

    fn ranges(&self) -> Vec<(String, Vec<Range<u64>>)> {
        let reads = lock(&self.reads);
        let inodes = lock(&self.inodes);
        reads
            .order
            .iter()
            .filter_map(|ino| {
                let path = inodes.get(*ino)?.path.clone();
                let Some(p) = path.to_str() else {
                    tracing::debug!(path = %path.display(), "read file's name is not UTF-8; left out");
                    return None;
                };
                let ranges = reads.files.get(ino)?.to_vec();
                Some((p.to_string(), ranges))
            })
            .collect()
    }

    fn next_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn lookup(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> std::result::Result<Option<FileAttr>, Errno> {
        let (dir, is_dir, _) = self.node(parent).ok_or(Errno::ENOENT)?;
        if !is_dir {
            return Err(Errno::ENOTDIR);
        }
        let b = name.as_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        let rel = dir.join(name);
        let meta = match std::fs::symlink_metadata(self.full(&rel)) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let ino = lock(&self.inodes).intern(rel, parent.0, meta.is_dir());
        Ok(Some(attr_of(ino, &meta)))
    }

    fn getattr(&self, ino: INodeNo) -> std::result::Result<FileAttr, Errno> {
        let (rel, _, _) = self.node(ino).ok_or(Errno::ENOENT)?;
        let meta = std::fs::symlink_metadata(self.full(&rel))?;
        Ok(attr_of(ino.0, &meta))
    }

    fn open(&self, ino: INodeNo) -> std::result::Result<u64, Errno> {
        let (rel, is_dir, _) = self.node(ino).ok_or(Errno::ENOENT)?;
        if is_dir {
            return Err(Errno::EISDIR);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.full(&rel))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(Errno::EINVAL);
        }
        let fh = self.next_fh();
        lock(&self.files).insert(
            fh,
            Arc::new(OpenFile {
                file,
                size: meta.len(),
            }),
        );
        Ok(fh)
    }

    fn read(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
    ) -> std::result::Result<Vec<u8>, Errno> {
        let open = lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)?;
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0usize;
        while filled < buf.len() {
            let at = offset.checked_add(filled as u64).ok_or(Errno::EINVAL)?;
            match open.file.read_at(&mut buf[filled..], at) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(filled);
        if filled > 0 {
            self.note_read(ino.0, open.size, offset, offset + filled as u64);
        }
        Ok(buf)
    }

    fn opendir(&self, ino: INodeNo) -> std::result::Result<u64, Errno> {
        let (rel, is_dir, parent) = self.node(ino).ok_or(Errno::ENOENT)?;
        if !is_dir {
            return Err(Errno::ENOTDIR);
        }
        let mut entries = vec![
            DirEntry {
                ino: ino.0,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        let mut listed = Vec::new();
        for e in std::fs::read_dir(self.full(&rel))? {
            let e = e?;
            // d_type, or an lstat where the filesystem gives none: never the target
            // of a symlink.
            let t = e.file_type()?;
            let Some(kind) = FileType::from_std(t) else {
                tracing::debug!(path = %e.path().display(), "entry of an unknown type left out");
                continue;
            };
            listed.push((e.file_name(), kind, t.is_dir()));
        }
        {
            let mut inodes = lock(&self.inodes);
            for (name, kind, dir) in listed {
                let child = inodes.intern(rel.join(&name), ino.0, dir);
                entries.push(DirEntry {
                    ino: child,
                    kind,
                    name,
                });
            }
        }
        let fh = self.next_fh();
        lock(&self.dirs).insert(fh, Arc::new(entries));
        Ok(fh)
    }

    fn readlink(&self, ino: INodeNo) -> std::result::Result<Vec<u8>, Errno> {
        let (rel, _, _) = self.node(ino).ok_or(Errno::ENOENT)?;
        Ok(std::fs::read_link(self.full(&rel))?
            .into_os_string()
            .into_vec())
    }

    fn xattr_path(&self, ino: INodeNo) -> std::result::Result<CString, Errno> {
        let (rel, _, _) = self.node(ino).ok_or(Errno::ENOENT)?;
        CString::new(self.full(&rel).into_os_string().into_vec()).map_err(|_| Errno::EINVAL)
    }
}

/// Calls `f(buf, len)` (an l*xattr call: the length needed for a null buffer, else
/// the bytes written) until the value fits; it may grow between the two calls.
fn xattr_call(f: impl Fn(*mut libc::c_void, usize) -> libc::ssize_t) -> std::io::Result<Vec<u8>> {
    for _ in 0..4 {
        let need = f(std::ptr::null_mut(), 0);
        if need < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize];
        if buf.is_empty() {
            return Ok(buf);
        }
        let got = f(buf.as_mut_ptr().cast(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ERANGE))
}

fn lgetxattr(path: &CString, name: &CString) -> std::io::Result<Vec<u8>> {
    xattr_call(|buf, len| {
        // SAFETY: NUL-terminated strings; `buf` is null with `len` 0, or `len`
        // writable bytes.
        unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf, len) }
    })
}

fn llistxattr(path: &CString) -> std::io::Result<Vec<u8>> {
    xattr_call(|buf, len| {
        // SAFETY: a NUL-terminated path; `buf` is null with `len` 0, or `len`
        // writable bytes.
        unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) }
    })
}

fn reply_xattr(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        match u32::try_from(data.len()) {
            Ok(n) => reply.size(n),
            Err(_) => reply.error(Errno::E2BIG),
        }
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time_of(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(nsecs).unwrap_or(0));
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.and_then(|t| t.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
}

/// FUSE's device number encoding (the kernel's `new_encode_dev`).
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn attr_of(ino: u64, m: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time_of(m.atime(), m.atime_nsec()),
        mtime: time_of(m.mtime(), m.mtime_nsec()),
        ctime: time_of(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(m.mode()),
        perm: (m.mode() & 0o7777) as u16,
        nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
        uid: m.uid(),
        gid: m.gid(),
        rdev: encode_dev(m.rdev()),
        blksize: u32::try_from(m.blksize()).unwrap_or(4096),
        flags: 0,
    }
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

struct TraceFs(Arc<State>);

impl Filesystem for TraceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        // Symlink targets never change, so the kernel may keep them in its page cache;
        // lookups in one directory need not wait for each other.
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent, name) {
            Ok(Some(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            // Node id 0 with a lifetime is a negative entry the kernel keeps: overlayfs
            // looks names up in every layer below the one that has them.
            Ok(None) => {
                reply.entry_with_ttls(&Duration::ZERO, &TTL, &negative_attr(), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.readlink(ino) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.0.open(ino) {
            // Contents never change, so the page cache stays valid across opens and a
            // reopened file is not read again (its first reads were noted already).
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(ino, fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
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
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.0.files).remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.opendir(ino) {
            // The kernel may keep listings in the directory's page cache: they never
            // change.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = lock(&self.0.dirs).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.0.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.0.source) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                u32::try_from(s.block_size()).unwrap_or(4096),
                u32::try_from(s.name_max()).unwrap_or(255),
                u32::try_from(s.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let path = match self.0.xattr_path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let Ok(name) = CString::new(name.as_bytes()) else {
            return reply.error(Errno::EINVAL);
        };
        match lgetxattr(&path, &name) {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(e.into()),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let path = match self.0.xattr_path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match llistxattr(&path) {
            Ok(v) => reply_xattr(reply, &v, size),
            Err(e) => reply.error(e.into()),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        match self.0.node(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::single_range_in_vec_init,
    reason = "one merged range, in a list of ranges"
)]
mod tests {
    use super::*;

    fn ranges(r: &Ranges) -> Vec<Range<u64>> {
        r.to_vec()
    }

    #[test]
    fn ranges_merge_overlapping_and_adjacent() {
        let mut r = Ranges::new(1000);
        r.add(10, 20);
        r.add(30, 40);
        assert_eq!(ranges(&r), [10..20, 30..40]);
        r.add(20, 30);
        assert_eq!(ranges(&r), [10..40]);
        r.add(5, 12);
        r.add(38, 50);
        r.add(60, 60);
        assert_eq!(ranges(&r), [5..50]);
        r.add(100, 200);
        r.add(0, 1000);
        assert_eq!(ranges(&r), [0..1000]);
    }

    #[test]
    fn too_many_ranges_are_widened_never_shrunk() {
        let size = 64 * 1024 * 1024;
        let mut r = Ranges::new(size);
        let mut read = Vec::new();
        // Every other 4 KiB block, then some odd slices: far more than the limit.
        for i in 0..3000u64 {
            let s = i * 8192 + (i % 7);
            read.push(s..s + 100);
            r.add(s, s + 100);
            assert!(r.map.len() <= MAX_RANGES_PER_FILE);
        }
        let got = ranges(&r);
        assert!(got.len() <= MAX_RANGES_PER_FILE);
        for w in got.windows(2) {
            assert!(w[0].end < w[1].start, "{got:?}");
        }
        for x in &read {
            assert!(
                got.iter().any(|g| g.start <= x.start && x.end <= g.end),
                "{x:?} lost"
            );
        }
        assert!(got.iter().all(|g| g.end <= size));
        // Reads after the widening are widened too.
        let before = r.map.len();
        r.add(size - 10, size - 5);
        assert!(r.map.len() <= before + 1);
        assert_eq!(ranges(&r).last().map(|g| g.end), Some(size));
    }

    #[test]
    fn devices_encode_as_the_kernel_decodes() {
        let d = libc::makedev(0x123, 0x4567);
        let e = encode_dev(d);
        assert_eq!((e & 0xfff00) >> 8, 0x123);
        assert_eq!((e & 0xff) | ((e >> 12) & 0xfff00), 0x4567);
        assert_eq!(encode_dev(0), 0);
    }
}
