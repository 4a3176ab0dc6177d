//! Real FUSE mounts of built blobs: tree walk against the tar, overlayfs stacking,
//! corruption, failing fetchers, concurrency, prefetch/background fetch accounting.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fs::{ChunkCache, Config, Fetcher};

fn fixture_entries() -> Vec<Entry> {
    let mut v = vec![
        Entry::new("etc", Kind::Dir),
        Entry::new("etc/hosts", Kind::Reg(b"127.0.0.1 localhost\n".to_vec()))
            .owner(1000, 1001)
            .mtime(1_600_000_123),
        Entry::new(
            "etc/passwd",
            Kind::Reg(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
        )
        .mode(0o600),
        Entry::new("etc/link-to-hosts", Kind::Hardlink("etc/hosts".into())),
        Entry::new("bin", Kind::Dir).mode(0o750),
        Entry::new("bin/tool", Kind::Reg(pseudo_random(300_000, 7))).mode(0o4755),
        Entry::new("bin/sh", Kind::Symlink("tool".into())),
        Entry::new("bin/abs", Kind::Symlink("/etc/hosts".into())),
        Entry::new("dev", Kind::Dir),
        Entry::new("dev/null", Kind::Char(1, 3)).mode(0o666),
        Entry::new("dev/loop0", Kind::Block(7, 0))
            .mode(0o660)
            .owner(0, 6),
        Entry::new("dev/big", Kind::Char(300, 70_000)),
        Entry::new("dev/pipe", Kind::Fifo).mode(0o620),
        Entry::new("attrs", Kind::Dir).xattr("user.dirattr", b"d"),
        Entry::new("attrs/file", Kind::Reg(b"x".to_vec()))
            .xattr("user.one", b"1")
            .xattr("user.two", &[0, 1, 2, 255])
            .xattr(
                "security.capability",
                &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        Entry::new("gone", Kind::Dir),
        Entry::new("gone/.wh.removed", Kind::Reg(Vec::new())),
        Entry::new("opq", Kind::Dir),
        Entry::new("opq/.wh..wh..opq", Kind::Reg(Vec::new())),
        Entry::new("opq/kept", Kind::Reg(b"kept".to_vec())),
        Entry::new("empty", Kind::Reg(Vec::new())),
        Entry::new("many", Kind::Dir),
    ];
    for i in 0..150 {
        let len = (i * 37) % 5000;
        v.push(
            Entry::new(
                &format!("many/f{i:03}"),
                Kind::Reg(pseudo_random(len, i as u64)),
            )
            .mtime(1_650_000_000 + i as u64),
        );
    }
    v
}

struct Expect {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    data: Option<Vec<u8>>,
    link: Option<String>,
    rdev: Option<(u32, u32)>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// What each visible path of the mount should look like.
fn expectations(entries: &[Entry]) -> BTreeMap<String, Expect> {
    let mut out = BTreeMap::new();
    let by_path: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
    for e in entries {
        let base = e.path.rsplit('/').next().unwrap_or(&e.path);
        if base == ".wh..wh..opq" {
            continue;
        }
        let (path, e) = if let Some(real) = base.strip_prefix(".wh.") {
            let parent = &e.path[..e.path.len() - base.len()];
            out.insert(
                format!("{parent}{real}"),
                Expect {
                    kind: "char",
                    mode: 0,
                    uid: e.uid,
                    gid: e.gid,
                    mtime: e.mtime as i64,
                    data: None,
                    link: None,
                    rdev: Some((0, 0)),
                    xattrs: BTreeMap::new(),
                },
            );
            continue;
        } else if let Kind::Hardlink(t) = &e.kind {
            (
                e.path.clone(),
                *by_path.get(t.as_str()).expect("hardlink target"),
            )
        } else {
            (e.path.clone(), e)
        };
        let (kind, data, link, rdev) = match &e.kind {
            Kind::Dir => ("dir", None, None, None),
            Kind::Reg(d) => ("file", Some(d.clone()), None, None),
            Kind::Symlink(t) => ("symlink", None, Some(t.clone()), None),
            Kind::Char(a, b) => ("char", None, None, Some((*a, *b))),
            Kind::Block(a, b) => ("block", None, None, Some((*a, *b))),
            Kind::Fifo => ("fifo", None, None, None),
            Kind::Hardlink(_) => unreachable!(),
        };
        let mut xattrs = e.xattrs.clone();
        if entries
            .iter()
            .any(|o| o.path == format!("{}/.wh..wh..opq", e.path))
        {
            xattrs.insert("trusted.overlay.opaque".into(), b"y".to_vec());
        }
        out.insert(
            path,
            Expect {
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime as i64,
                data,
                link,
                rdev,
                xattrs,
            },
        );
    }
    out
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "other"
    }
}

fn walk(root: &Path, rel: &str, out: &mut BTreeSet<String>) {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    for e in std::fs::read_dir(&dir).expect("read_dir") {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if e.file_type().expect("file type").is_dir() {
            walk(root, &path, out);
        }
        out.insert(path);
    }
}

fn test_config() -> Config {
    Config {
        no_background_fetch: true,
        noprefetch: true,
        ..Config::default()
    }
}

struct Mounted {
    handle: Option<fs::MountHandle>,
    mnt: PathBuf,
    _guard: MountGuard,
    _dirs: Vec<tempfile::TempDir>,
}

impl Mounted {
    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.unmount();
        }
    }
}

fn mount_with(fetcher: Arc<dyn Fetcher>, blob: &Blob, cfg: &Config) -> Mounted {
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let mut m = mount_cached(fetcher, blob, cfg, cache_dir.path());
    m._dirs.push(cache_dir);
    m
}

fn mount_cached(fetcher: Arc<dyn Fetcher>, blob: &Blob, cfg: &Config, cache_dir: &Path) -> Mounted {
    let cache = ChunkCache::from_config(cfg, cache_dir, None).expect("cache");
    mount_on_cache(fetcher, blob, cfg, cache)
}

fn mount_on_cache(
    fetcher: Arc<dyn Fetcher>,
    blob: &Blob,
    cfg: &Config,
    cache: Arc<ChunkCache>,
) -> Mounted {
    let mnt_dir = tempfile::tempdir().expect("tempdir");
    let mnt = mnt_dir.path().to_path_buf();
    let guard = MountGuard(mnt.clone());
    let layer = fs::Layer::open(fetcher, blob.desc.clone(), cfg, cache).expect("open");
    let pool = fs::FetchPool::shared().expect("pool");
    let opts = fs::MountOptions {
        cfg,
        metrics: None,
        pool: &pool,
    };
    let handle = fs::mount(Arc::new(layer), &mnt, &opts).expect("mount");
    Mounted {
        handle: Some(handle),
        mnt,
        _guard: guard,
        _dirs: vec![mnt_dir],
    }
}

#[test]
fn walk_matches_tar() {
    if !fuse_ready("walk_matches_tar") {
        return;
    }
    init_tracing();
    let entries = fixture_entries();
    let blob = make_blob(&entries, 64 << 10, &[]);
    let m = mount_with(TestFetcher::open(&blob.path), &blob, &test_config());
    let want = expectations(&entries);

    let mut seen = BTreeSet::new();
    walk(&m.mnt, "", &mut seen);
    let want_paths: BTreeSet<String> = want.keys().cloned().collect();
    assert_eq!(seen, want_paths, "listing differs from the tar");

    let hosts_ino = std::fs::metadata(m.path("etc/hosts")).expect("stat").ino();
    for (path, e) in &want {
        let p = m.path(path);
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|err| panic!("{path}: {err}"));
        assert_eq!(kind_of(&md), e.kind, "{path}: kind");
        assert_eq!(md.mode() & 0o7777, e.mode, "{path}: mode");
        assert_eq!((md.uid(), md.gid()), (e.uid, e.gid), "{path}: owner");
        assert_eq!(md.mtime(), e.mtime, "{path}: mtime");
        if let Some((ma, mi)) = e.rdev {
            let rdev = md.rdev();
            assert_eq!(
                (libc::major(rdev), libc::minor(rdev)),
                (ma, mi),
                "{path}: rdev"
            );
        }
        if let Some(t) = &e.link {
            assert_eq!(
                std::fs::read_link(&p).expect("readlink").to_string_lossy(),
                t.as_str()
            );
            assert_eq!(md.len(), t.len() as u64);
        }
        if let Some(d) = &e.data {
            assert_eq!(md.len(), d.len() as u64, "{path}: size");
            let got = std::fs::read(&p).expect("read");
            assert!(got == *d, "{path}: content differs");
        }
        let names: BTreeSet<String> = lxattr_names(&p).into_iter().collect();
        let want_names: BTreeSet<String> = e.xattrs.keys().cloned().collect();
        assert_eq!(names, want_names, "{path}: xattr names");
        for (k, v) in &e.xattrs {
            assert_eq!(lxattr(&p, k).as_ref(), Some(v), "{path}: xattr {k}");
        }
    }

    let link = std::fs::metadata(m.path("etc/link-to-hosts")).expect("stat");
    assert_eq!(link.ino(), hosts_ino, "hardlinks share an inode");
    assert_eq!(link.nlink(), 2);

    // Random access into the multi-chunk file, across chunk boundaries.
    let tool = pseudo_random(300_000, 7);
    let mut f = std::fs::File::open(m.path("bin/tool")).expect("open");
    for &(off, len) in &[
        (65_530u64, 20usize),
        (0, 1),
        (131_000, 70_000),
        (299_990, 10),
    ] {
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.read_exact(&mut buf).expect("read");
        assert!(buf == tool[off as usize..off as usize + len]);
    }

    // The state directory: hidden, reachable, current.
    let state = m.path(".stargz-snapshotter");
    assert!(state.is_dir());
    let json_path = state.join(format!("{}.json", blob.desc.digest));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("state json")).expect("json");
    assert_eq!(v["digest"], blob.desc.digest.as_str());
    assert_eq!(v["size"], blob.desc.size);
    assert!(v["fetchedSize"].as_u64().expect("fetchedSize") > 0);
    assert!(v["fetchedPercent"].as_f64().expect("percent") > 0.0);
    let names: Vec<String> = std::fs::read_dir(&state)
        .expect("read state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("{}.json", blob.desc.digest)]);

    assert!(
        std::fs::write(m.path("etc/new"), b"x").is_err(),
        "read-only"
    );
    m.handle.as_ref().expect("handle").check().expect("alive");
}

fn two_layers() -> (Vec<Entry>, Vec<Entry>) {
    let lower = vec![
        Entry::new("a", Kind::Dir),
        Entry::new("a/x", Kind::Reg(b"lower x".to_vec())),
        Entry::new("a/y", Kind::Reg(b"lower y".to_vec())),
        Entry::new("d", Kind::Dir),
        Entry::new("d/old", Kind::Reg(b"old".to_vec())),
        Entry::new("d/sub", Kind::Dir),
        Entry::new("d/sub/deep", Kind::Reg(b"deep".to_vec())),
        Entry::new("keep", Kind::Reg(b"keep".to_vec())),
        Entry::new("replaced", Kind::Reg(b"lower".to_vec())),
    ];
    let upper = vec![
        Entry::new("a", Kind::Dir),
        Entry::new("a/.wh.x", Kind::Reg(Vec::new())),
        Entry::new("d", Kind::Dir),
        Entry::new("d/.wh..wh..opq", Kind::Reg(Vec::new())),
        Entry::new("d/new", Kind::Reg(b"new".to_vec())),
        Entry::new("replaced", Kind::Reg(b"upper".to_vec())),
        Entry::new("added", Kind::Reg(b"added".to_vec())),
    ];
    (lower, upper)
}

#[test]
fn overlay_stacks_layers() {
    if !fuse_ready("overlay_stacks_layers") {
        return;
    }
    init_tracing();
    let (lower_e, upper_e) = two_layers();
    let lower_b = make_blob(&lower_e, 64 << 10, &[]);
    let upper_b = make_blob(&upper_e, 64 << 10, &[]);
    // The lower layer is fully local and served with passthrough underneath overlayfs.
    let mut lower_cfg = Config::default();
    lower_cfg.fuse.passthrough = true;
    let lower = mount_with(TestFetcher::open(&lower_b.path), &lower_b, &lower_cfg);
    wait_complete(&lower);
    let upper = mount_with(TestFetcher::open(&upper_b.path), &upper_b, &test_config());
    let dest_dir = tempfile::tempdir().expect("tempdir");
    let dest = dest_dir.path().to_path_buf();
    let _guard = MountGuard(dest.clone());
    let opts = format!("lowerdir={}:{}", upper.mnt.display(), lower.mnt.display());
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&dest)
        .status()
        .expect("run mount");
    assert!(st.success(), "overlay mount failed");

    let mut seen = BTreeSet::new();
    walk(&dest, "", &mut seen);
    let want: BTreeSet<String> = ["a", "a/y", "d", "d/new", "keep", "replaced", "added"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seen, want);
    assert_eq!(
        std::fs::read(dest.join("replaced")).expect("read"),
        b"upper"
    );
    assert_eq!(std::fs::read(dest.join("a/y")).expect("read"), b"lower y");
    assert_eq!(std::fs::read(dest.join("keep")).expect("read"), b"keep");
    assert!(!dest.join("a/x").exists());
    assert!(!dest.join("d/old").exists());
    assert!(!dest.join("d/sub/deep").exists());
    let lower_handle = lower.handle.as_ref().expect("handle");
    assert!(
        lower_handle.passthrough_opens() >= 2,
        "lower files opened with passthrough"
    );

    let st = std::process::Command::new("umount")
        .arg(&dest)
        .status()
        .expect("umount");
    assert!(st.success());
}

/// Compressed range of the first chunk of `path`, from the blob's TOC.
fn chunk_range(blob: &Blob, path: &str) -> std::ops::Range<u64> {
    let src = estargz::FileBlob::open(&blob.path).expect("open");
    let r = estargz::Reader::open(&src, &estargz::OpenOptions::default()).expect("reader");
    let id = r.index.lookup(path).expect("in index");
    r.index.node(id).chunks[0].blob_range()
}

#[test]
fn corrupt_chunk_is_eio_and_logged() {
    if !fuse_ready("corrupt_chunk_is_eio_and_logged") {
        return;
    }
    init_tracing();
    let entries = vec![
        Entry::new("good", Kind::Reg(pseudo_random(100_000, 1))),
        Entry::new("bad", Kind::Reg(pseudo_random(100_000, 2))),
    ];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let r = chunk_range(&blob, "bad");
    let mut bytes = std::fs::read(&blob.path).expect("read blob");
    let mid = ((r.start + r.end) / 2) as usize;
    bytes[mid] ^= 0x55;
    std::fs::write(&blob.path, &bytes).expect("write blob");

    let m = mount_with(TestFetcher::open(&blob.path), &blob, &test_config());
    let err = std::fs::read(m.path("bad")).expect_err("corrupt data must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(
        std::fs::read(m.path("good")).expect("good file"),
        pseudo_random(100_000, 1)
    );
    // The second chunk of the damaged file is intact.
    let mut f = std::fs::File::open(m.path("bad")).expect("open");
    f.seek(SeekFrom::Start(70_000)).expect("seek");
    let mut buf = vec![0u8; 1000];
    f.read_exact(&mut buf).expect("intact chunk");
    assert!(buf == pseudo_random(100_000, 2)[70_000..71_000]);
}

#[test]
fn failing_fetcher_is_eio_not_hang() {
    if !fuse_ready("failing_fetcher_is_eio_not_hang") {
        return;
    }
    init_tracing();
    let entries = vec![
        Entry::new("first", Kind::Reg(pseudo_random(50_000, 3))),
        Entry::new("second", Kind::Reg(pseudo_random(50_000, 4))),
    ];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let fetcher = TestFetcher::open(&blob.path);
    let m = mount_with(fetcher.clone(), &blob, &test_config());
    assert_eq!(
        std::fs::read(m.path("first")).expect("read"),
        pseudo_random(50_000, 3)
    );
    fetcher
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let t = Instant::now();
    let err = std::fs::read(m.path("second")).expect_err("fetch fails");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(t.elapsed() < Duration::from_secs(10));
    // Cached data needs no fetch. Drop the page cache so the read reaches the daemon.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", b"1");
    assert_eq!(
        std::fs::read(m.path("first")).expect("cached read"),
        pseudo_random(50_000, 3)
    );
    fetcher
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        std::fs::read(m.path("second")).expect("recovered"),
        pseudo_random(50_000, 4)
    );
}

/// A panic while fetching for one read ends that read with EIO; the fetch pool, the
/// mount and the chunk's in-flight claim all survive it.
#[test]
fn a_panic_while_fetching_is_eio_and_the_mount_goes_on() {
    if !fuse_ready("a_panic_while_fetching_is_eio_and_the_mount_goes_on") {
        return;
    }
    init_tracing();
    let entries = vec![
        Entry::new("a", Kind::Reg(pseudo_random(50_000, 5))),
        Entry::new("b", Kind::Reg(pseudo_random(50_000, 6))),
    ];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let fetcher = TestFetcher::open(&blob.path);
    let m = mount_with(fetcher.clone(), &blob, &test_config());
    fetcher
        .panic
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let t = Instant::now();
    let err = std::fs::read(m.path("a")).expect_err("the fetch panicked");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(t.elapsed() < Duration::from_secs(10));
    fetcher
        .panic
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The same chunk again (its claim was released) and another file.
    assert_eq!(
        std::fs::read(m.path("a")).expect("read after the panic"),
        pseudo_random(50_000, 5)
    );
    assert_eq!(
        std::fs::read(m.path("b")).expect("other file"),
        pseudo_random(50_000, 6)
    );
    m.handle
        .as_ref()
        .expect("handle")
        .check()
        .expect("mount alive");
}

#[test]
fn concurrent_random_reads() {
    if !fuse_ready("concurrent_random_reads") {
        return;
    }
    init_tracing();
    let mut entries = vec![Entry::new("d", Kind::Dir)];
    for i in 0..40u64 {
        let len = match i % 4 {
            0 => 400_000,
            1 => 70_000,
            2 => 3_000,
            _ => 150_000,
        };
        entries.push(Entry::new(
            &format!("d/f{i}"),
            Kind::Reg(pseudo_random(len, 100 + i)),
        ));
    }
    let blob = make_blob(&entries, 64 << 10, &[]);
    let fetcher = TestFetcher::open(&blob.path);
    let m = mount_with(fetcher.clone(), &blob, &test_config());
    let files: Vec<(PathBuf, Vec<u8>)> = entries[1..]
        .iter()
        .map(|e| match &e.kind {
            Kind::Reg(d) => (m.path(&e.path), d.clone()),
            _ => unreachable!(),
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..24u64 {
            let files = &files;
            s.spawn(move || {
                let mut x = t * 7919 + 1;
                let mut next = move |n: u64| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) % n.max(1)
                };
                for _ in 0..150 {
                    let (p, d) = &files[next(files.len() as u64) as usize];
                    let off = next(d.len() as u64);
                    let len = 1 + next(200_000).min(d.len() as u64 - off - 1);
                    let mut f = std::fs::File::open(p).expect("open");
                    f.seek(SeekFrom::Start(off)).expect("seek");
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact(&mut buf).expect("read");
                    assert!(
                        buf == d[off as usize..(off + len) as usize],
                        "{p:?} @{off}+{len}"
                    );
                }
            });
        }
    });
    eprintln!("concurrent reads used {} fetches", fetcher.requests());
}

fn state(m: &Mounted, blob: &Blob) -> serde_json::Value {
    let p = m
        .path(".stargz-snapshotter")
        .join(format!("{}.json", blob.desc.digest));
    serde_json::from_slice(&std::fs::read(p).expect("state")).expect("json")
}

#[test]
fn prefetch_then_background_fetch_goes_local() {
    if !fuse_ready("prefetch_then_background_fetch_goes_local") {
        return;
    }
    init_tracing();
    let mut entries = vec![Entry::new("app", Kind::Dir)];
    for i in 0..30u64 {
        entries.push(Entry::new(
            &format!("app/f{i}"),
            Kind::Reg(pseudo_random(120_000, 200 + i)),
        ));
    }
    let blob = make_blob(&entries, 64 << 10, &["app/f3", "app/f7"]);
    let fetcher = TestFetcher::open(&blob.path);
    let cfg = Config {
        max_concurrency: 2,
        ..Config::default()
    };
    let m = mount_with(fetcher.clone(), &blob, &cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = state(&m, &blob);
        if v["fetchedPercent"].as_f64() == Some(100.0) {
            assert_eq!(v["fetchedSize"], blob.desc.size);
            break;
        }
        assert!(Instant::now() < deadline, "background fetch stalled at {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Bytes count as fetched when they arrive; the layer is complete once every
    // window is also decoded and stored.
    wait_complete(&m);
    let handle = m.handle.as_ref().expect("handle");
    assert_eq!(handle.fetched_bytes(), blob.desc.size);
    let before = fetcher.requests();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", b"1");
    for e in &entries[1..] {
        let Kind::Reg(d) = &e.kind else { continue };
        assert!(std::fs::read(m.path(&e.path)).expect("read") == *d);
    }
    assert_eq!(fetcher.requests(), before, "a local layer must not fetch");
}

#[test]
fn prefetch_fetches_prioritized_files_in_one_request() {
    init_tracing();
    let mut entries = vec![];
    for i in 0..10u64 {
        entries.push(Entry::new(
            &format!("f{i}"),
            Kind::Reg(pseudo_random(90_000, 300 + i)),
        ));
    }
    let blob = make_blob(&entries, 64 << 10, &["f1", "f2", "f5"]);
    let fetcher = TestFetcher::open(&blob.path);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(ChunkCache::directory(dir.path(), 1 << 20).expect("cache"));
    let layer = fs::Layer::open(
        fetcher.clone(),
        blob.desc.clone(),
        &Config::default(),
        cache,
    )
    .expect("open");
    let after_open = fetcher.requests();
    assert_eq!(after_open, 1, "footer and a small TOC come in one read");
    layer.prefetch().expect("prefetch");
    assert_eq!(fetcher.requests(), after_open + 1);
    let f1 = layer.index().lookup("f1").expect("f1");
    let f5 = layer.index().lookup("f5").expect("f5");
    for id in [f1, f5] {
        let data = layer.read(id, 0, 200_000).expect("read");
        assert_eq!(data.len(), 90_000);
    }
    assert_eq!(
        fetcher.requests(),
        after_open + 1,
        "prioritized files are cached"
    );
    let f0 = layer.index().lookup("f0").expect("f0");
    assert_eq!(
        layer.read(f0, 10, 100).expect("read"),
        pseudo_random(90_000, 300)[10..110]
    );
    assert_eq!(fetcher.requests(), after_open + 2);
}

#[test]
fn verification_is_required_and_checked() {
    init_tracing();
    let blob = make_blob(&[Entry::new("f", Kind::Reg(b"hi".to_vec()))], 64 << 10, &[]);
    let cache = Arc::new(ChunkCache::memory(1 << 20));
    let fetcher = TestFetcher::open(&blob.path);
    let mut desc = blob.desc.clone();
    desc.toc_digest = None;
    let err = fs::Layer::open(
        fetcher.clone(),
        desc.clone(),
        &Config::default(),
        cache.clone(),
    )
    .err()
    .expect("refused");
    assert!(matches!(err, fs::Error::NoVerification { .. }), "{err}");
    let cfg = Config {
        allow_no_verification: true,
        ..Config::default()
    };
    fs::Layer::open(fetcher.clone(), desc.clone(), &cfg, cache.clone()).expect("allowed");
    desc.toc_digest = Some(format!("sha256:{}", "0".repeat(64)));
    let err = fs::Layer::open(fetcher, desc, &Config::default(), cache)
        .err()
        .expect("wrong digest");
    assert!(matches!(err, fs::Error::Format { .. }), "{err}");
}

#[test]
fn concurrent_readers_of_one_chunk_fetch_it_once() {
    init_tracing();
    let blob = make_blob(
        &[Entry::new("f", Kind::Reg(pseudo_random(60_000, 9)))],
        64 << 10,
        &[],
    );
    let fetcher = TestFetcher::open(&blob.path);
    let cache = Arc::new(ChunkCache::memory(1 << 20));
    let layer = fs::Layer::open(
        fetcher.clone(),
        blob.desc.clone(),
        &Config::default(),
        cache,
    )
    .expect("open");
    let id = layer.index().lookup("f").expect("f");
    let before = fetcher.requests();
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                let d = layer.read(id, 100, 1000).expect("read");
                assert!(d == pseudo_random(60_000, 9)[100..1100]);
            });
        }
    });
    assert_eq!(fetcher.requests(), before + 1);
}

/// Readers of one chunk whose reads run as jobs on the shared fetch pool, as FUSE
/// misses do, still share one fetch.
#[test]
fn pool_readers_of_one_chunk_fetch_it_once() {
    init_tracing();
    let blob = make_blob(
        &[Entry::new("f", Kind::Reg(pseudo_random(60_000, 10)))],
        64 << 10,
        &[],
    );
    let fetcher = TestFetcher::open(&blob.path);
    let cache = Arc::new(ChunkCache::memory(1 << 20));
    let layer = fs::Layer::open(
        fetcher.clone(),
        blob.desc.clone(),
        &Config::default(),
        cache,
    )
    .expect("open");
    let layer = Arc::new(layer);
    let id = layer.index().lookup("f").expect("f");
    let before = fetcher.requests();
    let pool = fs::FetchPool::new(8, 64).expect("pool");
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..16 {
        let (layer, tx) = (layer.clone(), tx.clone());
        pool.spawn(move || {
            let _ = tx.send(layer.read(id, 100, 1000).map_err(|e| e.to_string()));
        });
    }
    for _ in 0..16 {
        let d = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("job ran")
            .expect("read");
        assert!(d == pseudo_random(60_000, 10)[100..1100]);
    }
    assert_eq!(fetcher.requests(), before + 1);
}

#[test]
fn passthrough_serves_fully_cached_files() {
    if !fuse_ready("passthrough_serves_fully_cached_files") {
        return;
    }
    init_tracing();
    let entries = vec![
        Entry::new("big", Kind::Reg(pseudo_random(500_000, 11))),
        Entry::new("small", Kind::Reg(b"tiny".to_vec())),
    ];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let fetcher = TestFetcher::open(&blob.path);
    let cfg = Config::default();
    assert!(cfg.fuse.passthrough, "passthrough is on by default");
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let m = mount_cached(fetcher.clone(), &blob, &cfg, cache_dir.path());
    let handle = m.handle.as_ref().expect("handle");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !handle.layer().is_complete() {
        assert!(Instant::now() < deadline, "background fetch stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = fetcher.requests();
    // A one-chunk file is backed by its cached chunk: passthrough from the first open,
    // with no whole-file copy.
    assert_eq!(std::fs::read(m.path("small")).expect("read"), b"tiny");
    assert_eq!(
        handle.passthrough_opens(),
        1,
        "one-chunk file not passed through"
    );
    let files_dir = cache_dir.path().join("files");
    assert_eq!(std::fs::read_dir(&files_dir).expect("files dir").count(), 0);
    // A multi-chunk file is answered from user space at once while its whole-file copy
    // is assembled in the background; later opens pass through.
    assert!(std::fs::read(m.path("big")).expect("read") == pseudo_random(500_000, 11));
    assert_eq!(
        handle.passthrough_opens(),
        1,
        "first open of a multi-chunk file"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    // A copy still being written sits there under a temp name first.
    let copies = || {
        std::fs::read_dir(&files_dir)
            .expect("files dir")
            .flatten()
            .filter(|e| {
                !e.file_name()
                    .to_string_lossy()
                    .starts_with(fs::cache::TEMP_PREFIX)
            })
            .count()
    };
    while copies() == 0 {
        assert!(Instant::now() < deadline, "whole-file copy never assembled");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..2 {
        assert!(std::fs::read(m.path("big")).expect("read") == pseudo_random(500_000, 11));
        assert_eq!(std::fs::read(m.path("small")).expect("read"), b"tiny");
    }
    eprintln!("passthrough opens: {}", handle.passthrough_opens());
    assert_eq!(
        handle.passthrough_opens(),
        5,
        "fully cached files should be opened with passthrough"
    );
    assert_eq!(fetcher.requests(), before);
}

#[test]
fn passthrough_off_serves_from_user_space() {
    if !fuse_ready("passthrough_off_serves_from_user_space") {
        return;
    }
    init_tracing();
    let entries = vec![Entry::new("small", Kind::Reg(b"tiny".to_vec()))];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let mut cfg = Config::default();
    cfg.fuse.passthrough = false;
    let m = mount_with(TestFetcher::open(&blob.path), &blob, &cfg);
    wait_complete(&m);
    assert_eq!(std::fs::read(m.path("small")).expect("read"), b"tiny");
    let handle = m.handle.as_ref().expect("handle");
    assert_eq!(handle.passthrough_opens(), 0);
}

fn wait_complete(m: &Mounted) {
    let handle = m.handle.as_ref().expect("handle");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !handle.layer().is_complete() {
        assert!(Instant::now() < deadline, "background fetch stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn many_files(n: u64, len: usize, seed: u64) -> Vec<Entry> {
    (0..n)
        .map(|i| Entry::new(&format!("f{i}"), Kind::Reg(pseudo_random(len, seed + i))))
        .collect()
}

#[test]
fn prefetch_timeout_bounds_mount() {
    if !fuse_ready("prefetch_timeout_bounds_mount") {
        return;
    }
    init_tracing();
    let entries = many_files(6, 150_000, 600);
    let blob = make_blob(&entries, 64 << 10, &["f0", "f1"]);
    let fetcher = TestFetcher::open(&blob.path);
    fetcher
        .stall_head_ms
        .store(3000, std::sync::atomic::Ordering::SeqCst);
    // The reference's waiting mount (ours does not wait by default).
    let cfg = Config {
        prefetch_timeout_sec: 1,
        prefetch_async_size: 0,
        no_background_fetch: true,
        ..Config::default()
    };
    let t = Instant::now();
    let m = mount_with(fetcher.clone(), &blob, &cfg);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "mount waited {took:?}"
    );
    // A prioritized file joins the running prefetch instead of fetching again.
    let Kind::Reg(d) = &entries[0].kind else {
        unreachable!()
    };
    assert!(std::fs::read(m.path("f0")).expect("read") == *d);
    assert_eq!(fetcher.requests(), 2, "TOC read and one prefetch request");
}

#[test]
fn warm_disk_cache_needs_no_fetch_after_restart() {
    if !fuse_ready("warm_disk_cache_needs_no_fetch_after_restart") {
        return;
    }
    init_tracing();
    let entries = many_files(8, 150_000, 700);
    let blob = make_blob(&entries, 64 << 10, &[]);
    let cache_dir = tempfile::tempdir().expect("tempdir");
    {
        let m = mount_cached(
            TestFetcher::open(&blob.path),
            &blob,
            &Config::default(),
            cache_dir.path(),
        );
        wait_complete(&m);
    }
    let fetcher = TestFetcher::open(&blob.path);
    let m = mount_cached(fetcher.clone(), &blob, &Config::default(), cache_dir.path());
    wait_complete(&m);
    for e in &entries {
        let Kind::Reg(d) = &e.kind else { continue };
        assert!(std::fs::read(m.path(&e.path)).expect("read") == *d);
    }
    assert_eq!(fetcher.requests(), 0, "a local layer never fetches again");
    assert_eq!(state(&m, &blob)["fetchedPercent"].as_f64(), Some(100.0));
}

/// Once whole-file copies replaced their files' chunks, a restart finds every chunk in
/// them: nothing is fetched, with passthrough or without, and the chunk files stay gone.
#[test]
fn whole_file_copies_serve_chunks_after_restart() {
    if !fuse_ready("whole_file_copies_serve_chunks_after_restart") {
        return;
    }
    init_tracing();
    let entries = many_files(6, 200_000, 750);
    let blob = make_blob(&entries, 64 << 10, &[]);
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let files_dir = cache_dir.path().join("files");
    let chunk_files = || {
        std::fs::read_dir(cache_dir.path())
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().len() == 2)
            .map(|e| std::fs::read_dir(e.path()).expect("ls shard").count())
            .sum::<usize>()
    };
    {
        let m = mount_cached(
            TestFetcher::open(&blob.path),
            &blob,
            &Config::default(),
            cache_dir.path(),
        );
        wait_complete(&m);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(&files_dir).expect("ls").count() < entries.len() {
            assert!(
                Instant::now() < deadline,
                "whole-file copies never assembled"
            );
            for e in &entries {
                let Kind::Reg(d) = &e.kind else { continue };
                assert!(std::fs::read(m.path(&e.path)).expect("read") == *d);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(chunk_files(), 0, "copies replace the chunk files");
    for passthrough in [false, true] {
        let fetcher = TestFetcher::open(&blob.path);
        let mut cfg = Config::default();
        cfg.fuse.passthrough = passthrough;
        let m = mount_cached(fetcher.clone(), &blob, &cfg, cache_dir.path());
        wait_complete(&m);
        for _ in 0..3 {
            for e in &entries {
                let Kind::Reg(d) = &e.kind else { continue };
                assert!(std::fs::read(m.path(&e.path)).expect("read") == *d);
            }
        }
        // Seek into the middle of a file: a part of one chunk, read out of the copy.
        let Kind::Reg(d) = &entries[2].kind else {
            unreachable!()
        };
        let mut f = std::fs::File::open(m.path(&entries[2].path)).expect("open");
        f.seek(SeekFrom::Start(100_000)).expect("seek");
        let mut part = vec![0u8; 5000];
        f.read_exact(&mut part).expect("read");
        assert!(part == d[100_000..105_000]);
        assert_eq!(
            fetcher.requests(),
            0,
            "passthrough {passthrough}: fetched again"
        );
        assert_eq!(
            chunk_files(),
            0,
            "passthrough {passthrough}: chunk files came back"
        );
        let opens = m.handle.as_ref().expect("handle").passthrough_opens();
        assert_eq!(opens > 0, passthrough, "{opens} passthrough opens");
    }
}

#[test]
fn memory_cache_writes_nothing_to_disk() {
    if !fuse_ready("memory_cache_writes_nothing_to_disk") {
        return;
    }
    init_tracing();
    let entries = many_files(4, 100_000, 800);
    let blob = make_blob(&entries, 64 << 10, &[]);
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config {
        http_cache_type: fs::CacheType::Memory,
        filesystem_cache_type: fs::CacheType::Memory,
        ..Config::default()
    };
    let m = mount_cached(TestFetcher::open(&blob.path), &blob, &cfg, cache_dir.path());
    wait_complete(&m);
    for e in &entries {
        let Kind::Reg(d) = &e.kind else { continue };
        assert!(std::fs::read(m.path(&e.path)).expect("read") == *d);
    }
    assert_eq!(
        std::fs::read_dir(cache_dir.path()).expect("ls").count(),
        0,
        "memory cache must not write files"
    );
}

#[test]
fn check_notices_an_external_unmount() {
    if !fuse_ready("check_notices_an_external_unmount") {
        return;
    }
    init_tracing();
    let blob = make_blob(&many_files(1, 10, 900), 64 << 10, &[]);
    let m = mount_with(TestFetcher::open(&blob.path), &blob, &test_config());
    let handle = m.handle.as_ref().expect("handle");
    handle.check().expect("alive");
    let st = std::process::Command::new("umount")
        .arg("-l")
        .arg(&m.mnt)
        .status()
        .expect("umount");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.check().is_ok() {
        assert!(
            Instant::now() < deadline,
            "check still reports a live mount"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Files `f000`, `f001`, ... of `len` pseudo-random bytes each (seeds from `seed`).
fn numbered_files(n: usize, len: usize, seed: u64) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            Entry::new(
                &format!("f{i:03}"),
                Kind::Reg(pseudo_random(len, seed + i as u64)),
            )
        })
        .collect()
}

/// Requests a mount with `readahead_kib` makes while its files are read in `order`.
fn requests_for_reads(blob: &Blob, entries: &[Entry], order: &[usize], readahead_kib: u64) -> u64 {
    let fetcher = TestFetcher::open(&blob.path);
    let cfg = Config {
        sequential_readahead_kib: readahead_kib,
        ..test_config()
    };
    let m = mount_with(fetcher.clone(), blob, &cfg);
    let before = fetcher.requests();
    for &i in order {
        let e = &entries[i];
        let Kind::Reg(want) = &e.kind else {
            panic!("not a file")
        };
        let got = std::fs::read(m.path(&e.path)).expect("read");
        assert!(&got == want, "{} differs", e.path);
    }
    fetcher.requests() - before
}

/// A reader walking the layer in the order its files are stored gets them ahead of it
/// in a few large requests; without read-ahead, or reading out of order, every file
/// costs a request of its own.
#[test]
fn sequential_walk_reads_ahead_in_blob_order() {
    if !fuse_ready("sequential_walk_reads_ahead_in_blob_order") {
        return;
    }
    init_tracing();
    let n = 300;
    let entries = numbered_files(n, 20_000, 500);
    let blob = make_blob(&entries, 64 << 10, &[]);
    let in_order: Vec<usize> = (0..n).collect();
    // Jumps of about 2 MB through the blob: never a sequential stream.
    let scattered: Vec<usize> = (0..n).map(|i| i * 101 % n).collect();

    let ahead = requests_for_reads(&blob, &entries, &in_order, 8 << 10);
    assert!(
        ahead < n as u64 / 10,
        "{ahead} requests for {n} files read in order"
    );
    let off = requests_for_reads(&blob, &entries, &in_order, 0);
    assert_eq!(off, n as u64, "without read-ahead each file is one request");
    let random = requests_for_reads(&blob, &entries, &scattered, 8 << 10);
    eprintln!("requests: in order {ahead}, without read-ahead {off}, scattered {random}");
    assert_eq!(random, n as u64, "out-of-order reads fetched ahead");
}

/// A program picking every third file in storage order (PAM's modules, a server's
/// data files) is no walk: each file it reads is a request of its own and nothing is
/// fetched ahead of it; reading every file in the same order is read ahead.
#[test]
fn picking_files_in_order_reads_nothing_ahead() {
    if !fuse_ready("picking_files_in_order_reads_nothing_ahead") {
        return;
    }
    init_tracing();
    let n = 300;
    let entries = numbered_files(n, 4_000, 1_700);
    let blob = make_blob(&entries, 64 << 10, &[]);
    let every_third: Vec<usize> = (0..n).step_by(3).collect();
    let picked = requests_for_reads(&blob, &entries, &every_third, 8 << 10);
    assert_eq!(
        picked,
        every_third.len() as u64,
        "files picked here and there were fetched ahead"
    );
    let in_order: Vec<usize> = (0..n).collect();
    let walked = requests_for_reads(&blob, &entries, &in_order, 8 << 10);
    assert!(walked < n as u64 / 10, "{walked} requests for a walk");
}

/// A reader taking one directory's files in order has the rest of that directory
/// fetched ahead, not the next directory's files: reading one of those afterwards is
/// a request of its own (a walk that goes on into the next directory is read ahead
/// across directories, `sequential_walk_reads_ahead_in_blob_order`).
#[test]
fn read_ahead_in_one_directory_ends_with_it() {
    if !fuse_ready("read_ahead_in_one_directory_ends_with_it") {
        return;
    }
    init_tracing();
    let mut entries = vec![Entry::new("a", Kind::Dir), Entry::new("b", Kind::Dir)];
    for dir in ["a", "b"] {
        for i in 0..20u64 {
            let seed = 7_000 + i + u64::from(dir == "b") * 100;
            entries.push(Entry::new(
                &format!("{dir}/f{i:02}"),
                Kind::Reg(pseudo_random(8_000, seed)),
            ));
        }
    }
    let blob = make_blob(&entries, 64 << 10, &[]);
    let fetcher = TestFetcher::open(&blob.path);
    let cfg = Config {
        sequential_readahead_kib: 8 << 10,
        ..test_config()
    };
    let m = mount_with(fetcher.clone(), &blob, &cfg);
    let before = fetcher.requests();
    let read = |path: &str| {
        let e = entries.iter().find(|e| e.path == path).expect("entry");
        let Kind::Reg(want) = &e.kind else {
            panic!("not a file")
        };
        assert!(
            &std::fs::read(m.path(path)).expect("read") == want,
            "{path} differs"
        );
    };
    for i in 0..20 {
        read(&format!("a/f{i:02}"));
    }
    // Let read-ahead still on the way land.
    std::thread::sleep(Duration::from_millis(300));
    let after_a = fetcher.requests();
    assert!(
        after_a - before < 10,
        "{} requests for a/ read in order",
        after_a - before
    );
    // b/f05 must be fetched now (its read, and maybe a window after it, as the walk
    // went on into b/), not have come with a/.
    read("b/f05");
    assert!(
        fetcher.requests() > after_a,
        "b/f05 was fetched ahead with a/"
    );
}

/// Reading prefetched files in storage order needs nothing from the network, so it
/// must not read ahead into the files after them.
#[test]
fn prefetched_files_read_in_order_fetch_nothing_more() {
    if !fuse_ready("prefetched_files_read_in_order_fetch_nothing_more") {
        return;
    }
    init_tracing();
    let entries: Vec<Entry> = (0..200)
        .map(|i| {
            Entry::new(
                &format!("f{i:03}"),
                Kind::Reg(pseudo_random(20_000, 900 + i as u64)),
            )
        })
        .collect();
    let names: Vec<String> = entries[..100].iter().map(|e| e.path.clone()).collect();
    let prioritized: Vec<&str> = names.iter().map(String::as_str).collect();
    let blob = make_blob(&entries, 64 << 10, &prioritized);
    let fetcher = TestFetcher::open(&blob.path);
    // The mount waits for the prefetch, so the requests after it are the reads' own.
    let cfg = Config {
        noprefetch: false,
        prefetch_async_size: 0,
        ..test_config()
    };
    let m = mount_with(fetcher.clone(), &blob, &cfg);
    let after_prefetch = fetcher.requests();
    for e in &entries[..100] {
        let Kind::Reg(want) = &e.kind else {
            panic!("not a file")
        };
        assert!(&std::fs::read(m.path(&e.path)).expect("read") == want);
    }
    assert_eq!(
        fetcher.requests(),
        after_prefetch,
        "reads of prefetched files fetched more"
    );
}

/// Reads `rel` whole: the right bytes or EIO, never short or wrong data.
fn read_right_or_eio(m: &Mounted, rel: &str, want: &[u8]) {
    match std::fs::read(m.path(rel)) {
        Ok(got) => assert!(
            got == want,
            "{rel}: {} bytes read, {} expected, or wrong content",
            got.len(),
            want.len()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{rel}: {e}"),
    }
}

#[test]
fn damaged_cache_files_are_never_served() {
    if !fuse_ready("damaged_cache_files_are_never_served") {
        return;
    }
    init_tracing();
    let one = pseudo_random(40_000, 901);
    let multi = pseudo_random(300_000, 902);
    let entries = vec![
        Entry::new("one", Kind::Reg(one.clone())),
        Entry::new("multi", Kind::Reg(multi.clone())),
    ];
    let blob = make_blob(&entries, 64 << 10, &[]);
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let hex = |d: &[u8]| {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(d))
    };
    let (one_hex, multi_hex) = (hex(&one), hex(&multi));
    let chunk_of_one = cache_dir.path().join(&one_hex[..2]).join(&one_hex);
    let copy_of_multi = cache_dir.path().join("files").join(&multi_hex);
    {
        let m = mount_cached(
            TestFetcher::open(&blob.path),
            &blob,
            &Config::default(),
            cache_dir.path(),
        );
        wait_complete(&m);
        read_right_or_eio(&m, "multi", &multi);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !copy_of_multi.exists() {
            assert!(Instant::now() < deadline, "whole-file copy never assembled");
            read_right_or_eio(&m, "multi", &multi);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for passthrough in [true, false] {
        // What a crash or a bad disk leaves behind between two runs.
        std::fs::File::options()
            .write(true)
            .open(&chunk_of_one)
            .expect("chunk file")
            .set_len(0)
            .expect("truncate");
        let mut bytes = std::fs::read(&copy_of_multi).expect("whole-file copy");
        bytes[150_000] ^= 0x40;
        std::fs::write(&copy_of_multi, bytes).expect("damage copy");

        let mut cfg = test_config();
        cfg.fuse.passthrough = passthrough;
        let m = mount_cached(TestFetcher::open(&blob.path), &blob, &cfg, cache_dir.path());
        for _ in 0..6 {
            read_right_or_eio(&m, "one", &one);
            read_right_or_eio(&m, "multi", &multi);
            std::thread::sleep(Duration::from_millis(100));
        }
        let opens = m.handle.as_ref().expect("handle").passthrough_opens();
        if passthrough {
            assert!(
                opens >= 4,
                "repaired files pass through again ({opens} opens)"
            );
        } else {
            assert_eq!(opens, 0);
        }
        // The damaged chunk was fetched again; with passthrough the damaged whole-file
        // copy was replaced by a good one too (without, copies are never made or used).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(std::fs::read(&chunk_of_one).is_ok_and(|d| d == one)
            && (!passthrough || std::fs::read(&copy_of_multi).is_ok_and(|d| d == multi)))
        {
            assert!(Instant::now() < deadline, "cache never repaired");
            read_right_or_eio(&m, "one", &one);
            read_right_or_eio(&m, "multi", &multi);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Bytes of the files under `dir` (cache files and any in-progress temp file).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let m = e.metadata().expect("stat");
        total += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

#[test]
fn bounded_cache_evicts_and_the_layer_keeps_working() {
    if !fuse_ready("bounded_cache_evicts_and_the_layer_keeps_working") {
        return;
    }
    init_tracing();
    let chunk = 64u64 << 10;
    // 40 files of two chunks each: about 4x the 1 MiB bound.
    let entries = many_files(40, 100_000, 1300);
    let blob = make_blob(&entries, chunk, &[]);
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config();
    cfg.fuse.passthrough = false;
    cfg.directory_cache.max_size_mib = Some(1);
    cfg.directory_cache.max_memory_bytes = 0;
    cfg.sequential_readahead_kib = 0;
    let limit = 1u64 << 20;
    let cache = ChunkCache::from_config(&cfg, cache_dir.path(), None).expect("cache");
    let fetcher = TestFetcher::open(&blob.path);
    let mut fetched = Vec::new();
    for round in 0..2 {
        // A fresh mount each round: its reads reach the layer, not the page cache.
        let m = mount_on_cache(fetcher.clone(), &blob, &cfg, cache.clone());
        let before = fetcher.requests();
        for e in &entries {
            let Kind::Reg(d) = &e.kind else { continue };
            assert!(
                std::fs::read(m.path(&e.path)).expect("read") == *d,
                "{}",
                e.path
            );
            let on_disk = dir_bytes(cache_dir.path());
            assert!(
                on_disk <= limit + chunk,
                "round {round}, {}: {on_disk} bytes on disk",
                e.path
            );
        }
        fetched.push(fetcher.requests() - before);
    }
    let (bytes, bound, evictions) = cache.disk_usage();
    assert_eq!(bound, limit);
    assert!(bytes <= limit, "{bytes} bytes accounted");
    assert!(evictions > 0, "nothing evicted");
    // What was evicted is simply fetched again.
    assert!(fetched[1] > 0, "requests per round: {fetched:?}");
}
