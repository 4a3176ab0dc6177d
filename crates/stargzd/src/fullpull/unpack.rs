//! Unpacking a layer's tar stream into a directory as containerd's applier does for
//! overlayfs (whiteouts as 0:0 character devices, opaque directories as the
//! `trusted.overlay.opaque` xattr, owners, modes, times, xattrs, links, devices), and
//! nothing outside it: every path is walked one component at a time from the
//! directory's descriptor, never through a symbolic link, and every number the
//! archive gives is bounded before it is acted on.

use std::ffi::{CStr, CString};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Bounds on what one layer may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Entries (including long-name and PAX records).
    pub max_entries: u64,
    /// Bytes of the uncompressed stream.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 4 << 20,
            max_bytes: 256 << 30,
        }
    }
}

/// Longest path of one entry (Linux's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Longest name of one path component.
const MAX_NAME: usize = 255;
/// Largest PAX extended header.
const MAX_PAX: u64 = 1 << 20;
/// Most xattrs of one entry, and the largest value.
const MAX_XATTRS: usize = 128;
const MAX_XATTR_VALUE: usize = 64 << 10;
const BLOCK: usize = 512;

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive asks for something this unpacker will not do (a path leaving the
    /// directory, an entry through a symbolic link...).
    #[error("entry {path:?} refused: {why}")]
    Refused { path: String, why: String },
    /// The archive is not a well-formed tar stream.
    #[error("malformed tar: {0}")]
    Malformed(String),
    /// The archive is larger than [`Limits`] allow.
    #[error("over the limit: {0}")]
    Limit(String),
    /// A local write failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The stream itself failed (download, digest, decompression).
    #[error("reading the layer: {0}")]
    Read(#[source] std::io::Error),
}

/// What was unpacked.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// The uncompressed stream, counted against [`Limits::max_bytes`].
struct Counted<R> {
    inner: R,
    read: u64,
    max: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.max {
            return Err(std::io::Error::other(format!(
                "uncompressed layer over {} bytes",
                self.max
            )));
        }
        Ok(n)
    }
}

fn read_err(e: std::io::Error) -> UnpackError {
    UnpackError::Read(e)
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end before the first byte.
fn read_block<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<bool, UnpackError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(UnpackError::Malformed("stream ends inside a header".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    Ok(true)
}

/// Skips `n` bytes of the stream.
fn skip<R: Read>(r: &mut R, n: u64) -> Result<(), UnpackError> {
    let copied = std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).map_err(read_err)?;
    if copied != n {
        return Err(UnpackError::Malformed("stream ends inside an entry".into()));
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Reads a small record (long name, PAX header) of `size` bytes, at most `max`.
fn read_record<R: Read>(
    r: &mut R,
    size: u64,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, UnpackError> {
    if size > max {
        return Err(UnpackError::Limit(format!(
            "{what} of {size} bytes (most {max})"
        )));
    }
    let mut v = vec![0u8; size as usize];
    r.read_exact(&mut v).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => UnpackError::Malformed(format!("stream ends inside a {what}")),
        _ => read_err(e),
    })?;
    skip(r, padding(size))?;
    Ok(v)
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// The components of an archive path, `.` and empty ones dropped. Absolute paths and
/// `..` are refused: nothing in a layer names a place outside it.
fn components(path: &[u8]) -> Result<Vec<CString>, String> {
    if path.len() > MAX_PATH {
        return Err(format!("path of {} bytes", path.len()));
    }
    if path.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path with '..'".into()),
            c if c.len() > MAX_NAME => return Err(format!("name of {} bytes", c.len())),
            c => out.push(CString::new(c).map_err(|_| "NUL in path".to_string())?),
        }
    }
    Ok(out)
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Seconds and nanoseconds since the epoch.
type Time = (i64, i64);

/// An entry's header, with its long names and PAX records applied.
struct Entry {
    kind: tar::EntryType,
    path: Vec<u8>,
    link: Vec<u8>,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    atime: Option<(i64, i64)>,
    major: u32,
    minor: u32,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// `secs[.frac]` of a PAX time.
fn pax_time(v: &[u8]) -> Option<(i64, i64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32)
    };
    Some((secs, if secs < 0 { -nanos } else { nanos }))
}

/// A numeric header field as Go's archive/tar (containerd's reader) takes it: a blank
/// one (NULs or spaces) is 0.
fn number(parsed: std::io::Result<u64>, raw: &[u8], what: &str) -> Result<u64, UnpackError> {
    match parsed {
        Ok(n) => Ok(n),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(UnpackError::Malformed(format!("{what}: {e}"))),
    }
}

fn pax_number(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Unpacks the tar stream `r` into `root` (an existing, empty directory). The stream
/// is read to its end, so whatever checks its source makes at the end (the blob's
/// digest) have passed when this returns `Ok`.
pub fn unpack<R: Read>(r: R, root: &Path, limits: &Limits) -> Result<Stats, UnpackError> {
    let mut r = Counted {
        inner: r,
        read: 0,
        max: limits.max_bytes,
    };
    let mut u = Unpacker::open(root)?;
    let mut stats = Stats::default();
    let mut block = [0u8; BLOCK];
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax: Option<Vec<u8>> = None;
    loop {
        if !read_block(&mut r, &mut block)? {
            break;
        }
        if block.iter().all(|&b| b == 0) {
            break;
        }
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(UnpackError::Limit(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let h = tar::Header::from_byte_slice(&block);
        let stored = h
            .cksum()
            .map_err(|e| UnpackError::Malformed(format!("header checksum: {e}")))?;
        let sum: u32 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        if sum != stored {
            return Err(UnpackError::Malformed("header checksum mismatch".into()));
        }
        let old = h.as_old();
        let size = number(h.entry_size(), &old.size, "entry size")?;
        let kind = h.entry_type();
        match kind {
            tar::EntryType::GNULongName => {
                long_name = Some(trim_nul(read_record(
                    &mut r,
                    size,
                    MAX_PATH as u64 + 1,
                    "long name",
                )?));
                continue;
            }
            tar::EntryType::GNULongLink => {
                long_link = Some(trim_nul(read_record(
                    &mut r,
                    size,
                    MAX_PATH as u64 + 1,
                    "long link name",
                )?));
                continue;
            }
            tar::EntryType::XHeader => {
                pax = Some(read_record(&mut r, size, MAX_PAX, "PAX header")?);
                continue;
            }
            tar::EntryType::XGlobalHeader => {
                read_record(&mut r, size, MAX_PAX, "PAX global header")?;
                continue;
            }
            _ => {}
        }
        let mut e = Entry {
            kind,
            path: long_name
                .take()
                .unwrap_or_else(|| h.path_bytes().into_owned()),
            link: long_link
                .take()
                .or_else(|| h.link_name_bytes().map(|l| l.into_owned()))
                .unwrap_or_default(),
            size,
            mode: u32::try_from(number(h.mode().map(u64::from), &old.mode, "mode")?)
                .map_err(|_| UnpackError::Malformed("mode over 32 bits".into()))?,
            uid: u32::try_from(number(h.uid(), &old.uid, "uid")?)
                .map_err(|_| UnpackError::Malformed("uid over 32 bits".into()))?,
            gid: u32::try_from(number(h.gid(), &old.gid, "gid")?)
                .map_err(|_| UnpackError::Malformed("gid over 32 bits".into()))?,
            mtime: (
                i64::try_from(number(h.mtime(), &old.mtime, "mtime")?).unwrap_or(i64::MAX),
                0,
            ),
            atime: None,
            major: h.device_major().ok().flatten().unwrap_or(0),
            minor: h.device_minor().ok().flatten().unwrap_or(0),
            xattrs: Vec::new(),
        };
        if let Some(p) = pax.take() {
            apply_pax(&mut e, &p)?;
        }
        u.entry(&mut r, &e)?;
        stats.bytes += e.size;
    }
    u.finish()?;
    // The rest of the stream (the end-of-archive padding) is read too: the source
    // checks the blob's digest when it reaches the end.
    std::io::copy(&mut r, &mut std::io::sink()).map_err(read_err)?;
    Ok(stats)
}

fn apply_pax(e: &mut Entry, data: &[u8]) -> Result<(), UnpackError> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| UnpackError::Malformed(format!("PAX record: {e}")))?;
        let key = ext.key_bytes();
        let v = ext.value_bytes();
        match key {
            b"path" => e.path = v.to_vec(),
            b"linkpath" => e.link = v.to_vec(),
            b"size" => {
                e.size = pax_number(v).ok_or_else(|| UnpackError::Malformed("PAX size".into()))?
            }
            b"uid" => {
                e.uid = pax_number(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| UnpackError::Malformed("PAX uid".into()))?
            }
            b"gid" => {
                e.gid = pax_number(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| UnpackError::Malformed("PAX gid".into()))?
            }
            b"mtime" => {
                e.mtime = pax_time(v).ok_or_else(|| UnpackError::Malformed("PAX mtime".into()))?
            }
            b"atime" => e.atime = pax_time(v),
            k if k.starts_with(b"SCHILY.xattr.") => {
                let name = &k[b"SCHILY.xattr.".len()..];
                if e.xattrs.len() >= MAX_XATTRS || v.len() > MAX_XATTR_VALUE {
                    return Err(UnpackError::Limit("xattrs of one entry".into()));
                }
                let name = CString::new(name)
                    .map_err(|_| UnpackError::Malformed("NUL in xattr name".into()))?;
                e.xattrs.push((name, v.to_vec()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// Opens directory `name` under `dir`, never through a symbolic link.
fn open_dir_at(dir: RawFd, name: &CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: a valid C string and descriptor; the result is checked.
    let fd = cvt(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a descriptor just opened and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The unpacker's state: the root's descriptor, the last parent directory (entries
/// come grouped by directory), and the directories whose times are set at the end.
struct Unpacker {
    root: OwnedFd,
    last: Option<(Vec<CString>, OwnedFd)>,
    dir_times: Vec<(Vec<CString>, Time, Time)>,
}

const DOT: &CStr = c".";

impl Unpacker {
    fn open(root: &Path) -> Result<Unpacker, UnpackError> {
        let io = |source| UnpackError::Io {
            op: "open",
            path: root.display().to_string(),
            source,
        };
        let c = CString::new(root.as_os_str().as_encoded_bytes())
            .map_err(|_| UnpackError::Malformed("NUL in directory".into()))?;
        Ok(Unpacker {
            root: open_dir_at(libc::AT_FDCWD, &c).map_err(io)?,
            last: None,
            dir_times: Vec::new(),
        })
    }

    /// The directory `comps` names, walked from the root without following links;
    /// missing ones are created (0755, as containerd does) when `create`.
    /// The descriptor returned is the caller's own: later walks may drop the cached one.
    fn dir(
        &mut self,
        comps: &[CString],
        create: bool,
        shown: &[u8],
    ) -> Result<OwnedFd, UnpackError> {
        if comps.is_empty() {
            return self.dup(self.root.as_raw_fd(), shown);
        }
        if let Some((c, fd)) = &self.last {
            if c.as_slice() == comps {
                return self.dup(fd.as_raw_fd(), shown);
            }
        }
        let mut cur: Option<OwnedFd> = None;
        for comp in comps {
            let at = cur
                .as_ref()
                .map_or(self.root.as_raw_fd(), |f| f.as_raw_fd());
            let next = match open_dir_at(at, comp) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    // SAFETY: valid descriptor and C string.
                    cvt(unsafe { libc::mkdirat(at, comp.as_ptr(), 0o755) })
                        .and_then(|_| {
                            // SAFETY: as above; the umask must not narrow containerd's 0755.
                            cvt(unsafe { libc::fchmodat(at, comp.as_ptr(), 0o755, 0) })
                        })
                        .map_err(|source| self.io("create directory", shown, source))?;
                    open_dir_at(at, comp).map_err(|source| self.io("open", shown, source))?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    return Err(UnpackError::Refused {
                        path: show(shown),
                        why: "a parent is a symbolic link or not a directory".into(),
                    })
                }
                Err(source) => return Err(self.io("open", shown, source)),
            };
            cur = Some(next);
        }
        let fd = cur.ok_or_else(|| UnpackError::Malformed("empty path".into()))?;
        let own = self.dup(fd.as_raw_fd(), shown)?;
        self.last = Some((comps.to_vec(), fd));
        Ok(own)
    }

    fn dup(&self, fd: RawFd, shown: &[u8]) -> Result<OwnedFd, UnpackError> {
        // SAFETY: `fd` is open (the root's or the cache's); the duplicate is ours.
        let dup = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
            .map_err(|source| self.io("dup", shown, source))?;
        // SAFETY: a descriptor just created and owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(dup) })
    }

    fn io(&self, op: &'static str, path: &[u8], source: std::io::Error) -> UnpackError {
        UnpackError::Io {
            op,
            path: show(path),
            source,
        }
    }

    fn entry<R: Read>(&mut self, r: &mut R, e: &Entry) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let comps = components(&e.path).map_err(|why| UnpackError::Refused {
            path: show(&e.path),
            why,
        })?;
        let data_size = match e.kind {
            T::Regular | T::Continuous => e.size,
            // Other kinds carry no data (a hard link's size is 0 in every writer).
            _ => e.size,
        };
        let Some((name, parents)) = comps.split_last() else {
            // The root itself: its metadata only.
            if e.kind != T::Directory {
                return Err(UnpackError::Refused {
                    path: show(&e.path),
                    why: "the root is not a directory".into(),
                });
            }
            skip(r, data_size + padding(data_size))?;
            let root = self.root.as_raw_fd();
            self.meta(root, DOT, e, false)?;
            self.dir_times
                .push((Vec::new(), e.atime_or_mtime(), e.mtime));
            return Ok(());
        };
        let parent_fd = self.dir(parents, true, &e.path)?;
        let parent = parent_fd.as_raw_fd();
        let base = name.as_bytes();
        // Overlay whiteouts, as containerd converts them for an overlayfs upper dir.
        if base == b".wh..wh..opq" {
            skip(r, data_size + padding(data_size))?;
            // SAFETY: a directory descriptor, static C strings and a 1-byte value.
            cvt(unsafe {
                libc::fsetxattr(
                    parent,
                    c"trusted.overlay.opaque".as_ptr(),
                    b"y".as_ptr().cast(),
                    1,
                    0,
                )
            })
            .map_err(|source| self.io("set opaque xattr", &e.path, source))?;
            return Ok(());
        }
        if base.starts_with(b".wh..wh.") {
            return skip(r, data_size + padding(data_size));
        }
        if let Some(hidden) = base.strip_prefix(b".wh.") {
            skip(r, data_size + padding(data_size))?;
            let hidden = CString::new(hidden)
                .map_err(|_| UnpackError::Malformed("NUL in whiteout".into()))?;
            if hidden.as_bytes().is_empty() {
                return Err(UnpackError::Malformed("empty whiteout name".into()));
            }
            self.clear(parent, &hidden, false, &e.path)?;
            // SAFETY: valid descriptor and C string.
            cvt(unsafe { libc::mknodat(parent, hidden.as_ptr(), libc::S_IFCHR, 0) })
                .map_err(|source| self.io("create whiteout", &e.path, source))?;
            // SAFETY: as above.
            cvt(unsafe {
                libc::fchownat(
                    parent,
                    hidden.as_ptr(),
                    e.uid,
                    e.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map_err(|source| self.io("chown", &e.path, source))?;
            return Ok(());
        }
        let keep_dir = self.clear(parent, name, e.kind == T::Directory, &e.path)?;
        let mut is_symlink = false;
        match e.kind {
            T::Regular | T::Continuous => {
                self.write_file(r, parent, name, e)?;
                skip(r, padding(e.size))?;
            }
            T::Directory => {
                skip(r, data_size + padding(data_size))?;
                if !keep_dir {
                    // SAFETY: valid descriptor and C string.
                    cvt(unsafe { libc::mkdirat(parent, name.as_ptr(), 0o700) })
                        .map_err(|source| self.io("create directory", &e.path, source))?;
                }
                let mut all = parents.to_vec();
                all.push(name.clone());
                self.dir_times.push((all, e.atime_or_mtime(), e.mtime));
            }
            T::Symlink => {
                skip(r, data_size + padding(data_size))?;
                let target = CString::new(e.link.clone())
                    .map_err(|_| UnpackError::Malformed("NUL in link target".into()))?;
                if e.link.is_empty() || e.link.len() > MAX_PATH {
                    return Err(UnpackError::Malformed("symbolic link target length".into()));
                }
                // SAFETY: valid descriptor and C strings.
                cvt(unsafe { libc::symlinkat(target.as_ptr(), parent, name.as_ptr()) })
                    .map_err(|source| self.io("create symbolic link", &e.path, source))?;
                is_symlink = true;
            }
            T::Link => {
                skip(r, data_size + padding(data_size))?;
                let tcomps = components(&e.link).map_err(|why| UnpackError::Refused {
                    path: show(&e.path),
                    why: format!("hard link target: {why}"),
                })?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(UnpackError::Refused {
                        path: show(&e.path),
                        why: "hard link to the root".into(),
                    });
                };
                // The target's directory is resolved like any path.
                let tparent = self.dir(tparents, false, &e.link)?;
                // SAFETY: valid descriptors and C strings; 0 flags: a link to a symbolic
                // link links the link itself.
                cvt(unsafe {
                    libc::linkat(
                        tparent.as_raw_fd(),
                        tname.as_ptr(),
                        parent,
                        name.as_ptr(),
                        0,
                    )
                })
                .map_err(|source| self.io("create hard link", &e.path, source))?;
                is_symlink = self.is_symlink(parent, name, &e.path)?;
            }
            T::Char | T::Block | T::Fifo => {
                skip(r, data_size + padding(data_size))?;
                let kind = match e.kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(e.major, e.minor);
                // SAFETY: valid descriptor and C string.
                cvt(unsafe { libc::mknodat(parent, name.as_ptr(), kind | 0o600, dev) })
                    .map_err(|source| self.io("create device", &e.path, source))?;
            }
            other => {
                return Err(UnpackError::Malformed(format!(
                    "entry {:?}: unsupported type {:?}",
                    show(&e.path),
                    other
                )))
            }
        }
        self.meta(parent, name, e, is_symlink)
    }

    fn is_symlink(&self, dir: RawFd, name: &CStr, shown: &[u8]) -> Result<bool, UnpackError> {
        let st = self
            .stat(dir, name)
            .map_err(|source| self.io("stat", shown, source))?;
        Ok(st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    }

    fn stat(&self, dir: RawFd, name: &CStr) -> std::io::Result<libc::stat> {
        // SAFETY: zeroed plain-old-data, filled by the call.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and out pointer.
        cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
        Ok(st)
    }

    /// Makes room for a new entry `name`: a later entry replaces an earlier one, except
    /// that a directory stays a directory. Returns whether a directory was kept.
    fn clear(
        &mut self,
        dir: RawFd,
        name: &CStr,
        keep_dir: bool,
        shown: &[u8],
    ) -> Result<bool, UnpackError> {
        let st = match self.stat(dir, name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(source) => return Err(self.io("stat", shown, source)),
        };
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && keep_dir {
            return Ok(true);
        }
        if is_dir {
            // The cached directory may be inside the tree that goes.
            self.last = None;
            let path = format!("/proc/self/fd/{dir}/{}", name.to_string_lossy());
            // remove_dir_all never follows symbolic links inside the tree.
            std::fs::remove_dir_all(&path).map_err(|source| self.io("remove", shown, source))?;
        } else {
            // SAFETY: valid descriptor and C string.
            cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) })
                .map_err(|source| self.io("remove", shown, source))?;
        }
        Ok(false)
    }

    fn write_file<R: Read>(
        &self,
        r: &mut R,
        dir: RawFd,
        name: &CStr,
        e: &Entry,
    ) -> Result<(), UnpackError> {
        // SAFETY: valid descriptor and C string; the result is checked.
        let fd = cvt(unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        })
        .map_err(|source| self.io("create", &e.path, source))?;
        // SAFETY: a descriptor just opened and owned by nobody else.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut left = e.size;
        let mut buf = vec![0u8; (256usize << 10).min(e.size.max(1) as usize)];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => return Err(UnpackError::Malformed("stream ends inside a file".into())),
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => return Err(read_err(err)),
            };
            std::io::Write::write_all(&mut f, &buf[..n])
                .map_err(|source| self.io("write", &e.path, source))?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Owner, xattrs, mode (after the owner: chown clears setuid) and, for all but
    /// directories (set at the end, once their contents are in), times.
    fn meta(
        &self,
        dir: RawFd,
        name: &CStr,
        e: &Entry,
        is_symlink: bool,
    ) -> Result<(), UnpackError> {
        // SAFETY: valid descriptor and C string.
        cvt(unsafe { libc::fchownat(dir, name.as_ptr(), e.uid, e.gid, libc::AT_SYMLINK_NOFOLLOW) })
            .map_err(|source| self.io("chown", &e.path, source))?;
        if !e.xattrs.is_empty() {
            // The directory by its descriptor, the name not followed.
            let path = CString::new(format!("/proc/self/fd/{dir}/{}", name.to_string_lossy()))
                .map_err(|_| UnpackError::Malformed("NUL in path".into()))?;
            for (k, v) in &e.xattrs {
                if k.as_bytes().starts_with(b"trusted.overlay.") {
                    return Err(UnpackError::Refused {
                        path: show(&e.path),
                        why: "overlayfs's own xattr in the archive".into(),
                    });
                }
                // SAFETY: valid C strings and a value buffer of the given length.
                cvt(unsafe {
                    libc::lsetxattr(path.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                })
                .map_err(|source| self.io("set xattr", &e.path, source))?;
            }
        }
        if !is_symlink {
            // SAFETY: valid descriptor and C string; the entry is no symbolic link.
            cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), e.mode & 0o7777, 0) })
                .map_err(|source| self.io("chmod", &e.path, source))?;
        }
        if e.kind != tar::EntryType::Directory {
            set_times(dir, name, e.atime_or_mtime(), e.mtime)
                .map_err(|source| self.io("set times", &e.path, source))?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), UnpackError> {
        for (comps, atime, mtime) in std::mem::take(&mut self.dir_times) {
            let shown: Vec<u8> = comps
                .iter()
                .map(|c| c.as_bytes())
                .collect::<Vec<_>>()
                .join(&b'/');
            let (dir, name) = match comps.split_last() {
                None => (self.dir(&[], false, &shown)?, DOT.to_owned()),
                Some((name, parents)) => match self.dir(parents, false, &shown) {
                    Ok(d) => (d, name.clone()),
                    // Replaced by a later entry (a parent is no directory any more).
                    Err(UnpackError::Refused { .. }) => continue,
                    Err(UnpackError::Io { source, .. })
                        if source.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        continue
                    }
                    Err(e) => return Err(e),
                },
            };
            match set_times(dir.as_raw_fd(), &name, atime, mtime) {
                Ok(()) => {}
                // Replaced by a later entry.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => return Err(self.io("set times", &shown, source)),
            }
        }
        Ok(())
    }
}

impl Entry {
    /// containerd's access time: the later of the two.
    fn atime_or_mtime(&self) -> (i64, i64) {
        match self.atime {
            Some(a) if a > self.mtime => a,
            _ => self.mtime,
        }
    }
}

fn set_times(dir: RawFd, name: &CStr, atime: (i64, i64), mtime: (i64, i64)) -> std::io::Result<()> {
    let ts = |(s, n): (i64, i64)| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: n as _,
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: valid descriptor, C string and a two-element array.
    cvt(unsafe {
        libc::utimensat(
            dir,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = header(tar::EntryType::Regular, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    }

    #[test]
    fn entry_count_is_bounded() {
        let t = tar_of(|b| {
            for i in 0..5 {
                file(b, &format!("f{i}"), b"x");
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 3,
            max_bytes: 1 << 20,
        };
        let e = unpack(&t[..], dir.path(), &limits).unwrap_err();
        assert!(matches!(e, UnpackError::Limit(_)), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused() {
        // A header claiming 1 TiB followed by a few bytes: over the byte bound, or a
        // stream that ends inside the file; never an allocation of that size.
        let mut h = header(tar::EntryType::Regular, 1 << 40);
        h.set_path("huge").unwrap();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[7u8; 4096]);
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 10,
            max_bytes: 2048,
        };
        let e = unpack(&t[..], dir.path(), &limits).unwrap_err();
        assert!(matches!(e, UnpackError::Read(_)), "{e}");
        let e = unpack(
            &t[..],
            tempfile::tempdir().unwrap().path(),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Malformed(_)), "{e}");
        // A PAX header of 2 MiB is refused before it is read.
        let mut h = header(tar::EntryType::XHeader, 2 << 20);
        h.set_path("pax").unwrap();
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend_from_slice(&[b'1'; 1024]);
        let e = unpack(
            &t[..],
            tempfile::tempdir().unwrap().path(),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Limit(_)), "{e}");
    }

    #[test]
    fn nothing_is_written_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        let t = tar_of(|b| {
            let mut h = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "x", &target).unwrap();
            file(b, "x/evil", b"evil");
        });
        let dir = tempfile::tempdir().unwrap();
        let e = unpack(&t[..], dir.path(), &Limits::default()).unwrap_err();
        assert!(matches!(e, UnpackError::Refused { .. }), "{e}");
        assert!(!outside.path().join("evil").exists());
        // A hard link through the same symlink is refused too.
        let t = tar_of(|b| {
            file(b, "victim", b"v");
            let mut h = header(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "x", &target).unwrap();
            let mut h = header(tar::EntryType::Link, 0);
            b.append_link(&mut h, "x/new-link", "victim").unwrap();
        });
        let e = unpack(
            &t[..],
            tempfile::tempdir().unwrap().path(),
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, UnpackError::Refused { .. }), "{e}");
        assert!(!outside.path().join("new-link").exists());
    }

    #[test]
    fn whiteouts_become_overlay_markers() {
        let t = tar_of(|b| {
            let mut h = header(tar::EntryType::Directory, 0);
            h.set_mode(0o755);
            b.append_data(&mut h, "d/", &[][..]).unwrap();
            file(b, "d/.wh..wh..opq", b"");
            file(b, ".wh.gone", b"");
            file(b, "d/kept", b"kept");
        });
        let dir = tempfile::tempdir().unwrap();
        let stats = unpack(&t[..], dir.path(), &Limits::default()).unwrap();
        assert_eq!(stats.entries, 4);
        let md = std::fs::symlink_metadata(dir.path().join("gone")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), 0);
        assert!(!dir.path().join(".wh.gone").exists());
        let c = CString::new(dir.path().join("d").as_os_str().as_encoded_bytes()).unwrap();
        let mut v = [0u8; 4];
        // SAFETY: valid C strings and a buffer of the given length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                v.len(),
            )
        };
        assert_eq!(n, 1, "{}", std::io::Error::last_os_error());
        assert_eq!(v[0], b'y');
        assert_eq!(std::fs::read(dir.path().join("d/kept")).unwrap(), b"kept");
    }

    #[test]
    fn paths_outside_are_refused() {
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"a/../../x").is_err());
        assert!(components(b"..").is_err());
        assert_eq!(components(b"./a//b/./c").unwrap().len(), 3);
        assert!(components(b"./").unwrap().is_empty());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(pax_time(b"12"), Some((12, 0)));
        assert_eq!(pax_time(b"x"), None);
    }
}
