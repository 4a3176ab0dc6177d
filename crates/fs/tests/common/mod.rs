//! Test fixtures: tar building with an expectation model, blob building, FUSE
//! availability checks, mount guards and fetcher wrappers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use fs::{Fetcher, FileFetcher};

/// True when FUSE can be used; otherwise skips loudly, or fails under CI=true.
pub fn fuse_ready(test: &str) -> bool {
    let dev = Path::new("/dev/fuse").exists();
    let tool = std::process::Command::new("fusermount3")
        .arg("-V")
        .output()
        .is_ok();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if dev && tool && root {
        return true;
    }
    let msg =
        format!("{test}: FUSE unavailable (/dev/fuse: {dev}, fusermount3: {tool}, root: {root})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {msg}");
    false
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Reg(Vec<u8>),
    Symlink(String),
    Hardlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    pub fn new(path: &str, kind: Kind) -> Entry {
        let mode = match kind {
            Kind::Dir => 0o755,
            _ => 0o644,
        };
        Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: BTreeMap::new(),
        }
    }
    pub fn mode(mut self, m: u32) -> Entry {
        self.mode = m;
        self
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, t: u64) -> Entry {
        self.mtime = t;
        self
    }
    pub fn xattr(mut self, k: &str, v: &[u8]) -> Entry {
        self.xattrs.insert(k.into(), v.to_vec());
        self
    }
}

pub fn make_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let pax: Vec<(String, Vec<u8>)> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("pax");
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(e.mode);
        h.set_uid(e.uid as u64);
        h.set_gid(e.gid as u64);
        h.set_mtime(e.mtime);
        h.set_size(0);
        let mut data: &[u8] = &[];
        let name = match e.kind {
            Kind::Dir => format!("{}/", e.path),
            _ => e.path.clone(),
        };
        match &e.kind {
            Kind::Dir => h.set_entry_type(tar::EntryType::Directory),
            Kind::Reg(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                data = d;
            }
            Kind::Symlink(t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(t).expect("link");
            }
            Kind::Hardlink(t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name(t).expect("link");
            }
            Kind::Char(ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*ma).expect("major");
                h.set_device_minor(*mi).expect("minor");
            }
            Kind::Block(ma, mi) => {
                h.set_entry_type(tar::EntryType::Block);
                h.set_device_major(*ma).expect("major");
                h.set_device_minor(*mi).expect("minor");
            }
            Kind::Fifo => h.set_entry_type(tar::EntryType::Fifo),
        }
        b.append_data(&mut h, name, data).expect("append");
    }
    b.into_inner().expect("finish tar")
}

pub struct Blob {
    pub path: PathBuf,
    /// The descriptor without a tail hint (the first read is the default one).
    pub desc: fs::LayerDesc,
    /// The descriptor annotations the builder wrote.
    pub annotations: std::collections::BTreeMap<String, String>,
    pub _dir: tempfile::TempDir,
}

pub fn make_blob(entries: &[Entry], chunk_size: u64, prioritized: &[&str]) -> Blob {
    make_blob_with(
        entries,
        estargz::BuildOptions {
            chunk_size,
            prioritized_files: prioritized.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
}

pub fn make_blob_with(entries: &[Entry], opts: estargz::BuildOptions) -> Blob {
    let tar = make_tar(entries);
    let mut out = Vec::new();
    let built = estargz::build(&tar[..], &mut out, &opts).expect("build blob");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("layer.blob");
    std::fs::write(&path, &out).expect("write blob");
    Blob {
        path,
        desc: fs::LayerDesc {
            digest: built.blob_digest,
            size: built.blob_size,
            toc_digest: Some(built.toc_digest),
            toc_tail: None,
        },
        annotations: built.annotations,
        _dir: dir,
    }
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Unmounts whatever is still mounted at its path when dropped, even after a panic.
pub struct MountGuard(pub PathBuf);
impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Counts requests and can be made to fail.
pub struct TestFetcher {
    pub inner: FileFetcher,
    pub requests: AtomicU64,
    pub fail: AtomicBool,
    /// Milliseconds to stall requests for ranges starting at offset 0.
    pub stall_head_ms: AtomicU64,
    /// Panic in every request while set (as a bug in a fetcher would).
    pub panic: AtomicBool,
}

impl TestFetcher {
    pub fn open(path: &Path) -> Arc<TestFetcher> {
        Arc::new(TestFetcher {
            inner: FileFetcher::open(path).expect("open blob"),
            requests: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            stall_head_ms: AtomicU64::new(0),
            panic: AtomicBool::new(false),
        })
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Fetcher for TestFetcher {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_ranges(&self, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if self.panic.load(Ordering::SeqCst) {
            panic!("injected fetcher panic");
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "injected failure after retries",
            ));
        }
        let stall = self.stall_head_ms.load(Ordering::SeqCst);
        if stall > 0 && ranges.first().is_some_and(|r| r.start == 0) {
            std::thread::sleep(std::time::Duration::from_millis(stall));
        }
        self.inner.read_ranges(ranges)
    }
}

pub fn lxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 65536];
    // SAFETY: both names are NUL-terminated and `buf` is writable for `buf.len()` bytes.
    let r = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

pub fn lxattr_names(path: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut buf = vec![0u8; 65536];
    // SAFETY: `p` is NUL-terminated and `buf` is writable for `buf.len()` bytes.
    let r =
        unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r <= 0 {
        return Vec::new();
    }
    buf.truncate(r as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}
