//! The kernel keeps a layer's metadata: a second walk of a mounted tree (directly and
//! under overlayfs, as containerd stacks it), stats of missing names included, sends no
//! lookup or getattr to the FUSE layer, while short configured timeouts are honoured.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fs::{ChunkCache, Config, FsMetrics};

/// Between two walks: longer than the 1 s the reference lets the kernel cache.
const PAUSE: Duration = Duration::from_millis(1500);

/// A small tree shaped like a toolchain: nested directories, headers, shared objects
/// with version symlinks, a directory symlink, and a whiteout.
fn tree() -> Vec<Entry> {
    let mut v = vec![
        Entry::new("usr", Kind::Dir),
        Entry::new("usr/lib", Kind::Dir),
        Entry::new("usr/include", Kind::Dir),
        Entry::new("usr/bin", Kind::Dir),
        Entry::new("usr/bin/cc", Kind::Reg(pseudo_random(3000, 1))).mode(0o755),
        Entry::new("usr/bin/gcc", Kind::Symlink("cc".into())),
        Entry::new("lib", Kind::Symlink("usr/lib".into())),
        Entry::new("usr/lib/.wh.removed.so", Kind::Reg(Vec::new())),
    ];
    for d in 0..12 {
        v.push(Entry::new(&format!("usr/include/d{d}"), Kind::Dir));
        v.push(Entry::new(&format!("usr/include/d{d}/sub"), Kind::Dir));
        for f in 0..15 {
            let len = (d * 131 + f * 17) % 900;
            v.push(Entry::new(
                &format!("usr/include/d{d}/h{f}.h"),
                Kind::Reg(pseudo_random(len, (d * 100 + f) as u64)),
            ));
            v.push(Entry::new(
                &format!("usr/include/d{d}/sub/i{f}.h"),
                Kind::Reg(pseudo_random(len / 2, (d * 100 + f + 50) as u64)),
            ));
        }
    }
    for l in 0..20 {
        v.push(Entry::new(
            &format!("usr/lib/libx{l}.so.1.0"),
            Kind::Reg(pseudo_random(2000, 1000 + l)),
        ));
        v.push(Entry::new(
            &format!("usr/lib/libx{l}.so.1"),
            Kind::Symlink(format!("libx{l}.so.1.0")),
        ));
    }
    v
}

/// What an interpreter's start looks like to the filesystem: list every directory,
/// stat every entry (following symlinks too), and probe names that are not there.
/// Returns how many paths were looked at, so a walk that saw nothing fails.
fn walk(root: &Path) -> usize {
    fn go(dir: &Path, seen: &mut usize) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let m = std::fs::symlink_metadata(&p)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            *seen += 1;
            if m.file_type().is_symlink() {
                std::fs::metadata(&p).expect("stat through the symlink");
            }
            if m.is_dir() {
                go(&p, seen);
            }
        }
        for missing in ["__init__.py", "missing.so", "x.pyc"] {
            assert!(std::fs::symlink_metadata(dir.join(missing)).is_err());
        }
        // A whiteout of this layer hides its name: it must stay hidden, cached or not.
        let _ = std::fs::symlink_metadata(dir.join(".wh.removed.so"));
    }
    let mut seen = 0;
    go(root, &mut seen);
    seen
}

struct Counts {
    lookup: u64,
    getattr: u64,
    readlink: u64,
    readdir: u64,
    opendir: u64,
}

fn counts(m: &FsMetrics) -> Counts {
    Counts {
        lookup: m.fuse_op_count("fuse_lookup"),
        getattr: m.fuse_op_count("fuse_getattr"),
        readlink: m.fuse_op_count("fuse_readlink"),
        readdir: m.fuse_op_count("fuse_readdir") + m.fuse_op_count("fuse_readdirplus"),
        opendir: m.fuse_op_count("fuse_opendir"),
    }
}

struct Mounted {
    handle: Option<fs::MountHandle>,
    mnt: PathBuf,
    metrics: FsMetrics,
    _guard: MountGuard,
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.unmount();
        }
    }
}

fn mount(blob: &Blob, cfg: &Config) -> Mounted {
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let mnt_dir = tempfile::tempdir().expect("tempdir");
    let mnt = mnt_dir.path().to_path_buf();
    let guard = MountGuard(mnt.clone());
    let cache = ChunkCache::from_config(cfg, cache_dir.path(), None).expect("cache");
    let layer = fs::Layer::open(TestFetcher::open(&blob.path), blob.desc.clone(), cfg, cache)
        .expect("open");
    let metrics = FsMetrics::default();
    let pool = fs::FetchPool::shared().expect("pool");
    let opts = fs::MountOptions {
        cfg,
        metrics: Some(&metrics),
        pool: &pool,
    };
    let handle = fs::mount(Arc::new(layer), &mnt, &opts).expect("mount");
    Mounted {
        handle: Some(handle),
        mnt,
        metrics,
        _guard: guard,
        _dirs: vec![mnt_dir, cache_dir],
    }
}

fn quiet_config() -> Config {
    Config {
        noprefetch: true,
        no_background_fetch: true,
        ..Config::default()
    }
}

/// Overlayfs over `lower` (`top:...:bottom`) with an empty upper layer, as containerd
/// mounts a container.
fn overlay(lower: &str) -> (MountGuard, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (upper, work, merged) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).expect("mkdir");
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower,
        upper.display(),
        work.display()
    );
    let st = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .expect("run mount");
    assert!(st.success(), "overlay mount failed");
    (MountGuard(merged.clone()), merged, dir)
}

#[test]
fn second_walk_sends_no_lookups_or_getattrs() {
    if !fuse_ready("second_walk_sends_no_lookups_or_getattrs") {
        return;
    }
    init_tracing();
    let blob = make_blob(&tree(), 64 << 10, &[]);
    let m = mount(&blob, &quiet_config());

    let seen = walk(&m.mnt);
    assert!(seen > 400, "the walk saw {seen} paths");
    let first = counts(&m.metrics);
    assert!(first.readdir > 0, "the first walk lists directories");
    // Longer than the reference's 1 s timeouts, which would send everything back.
    std::thread::sleep(PAUSE);
    assert_eq!(walk(&m.mnt), seen);
    let second = counts(&m.metrics);
    assert_eq!(second.lookup, first.lookup, "lookups on the second walk");
    assert_eq!(second.getattr, first.getattr, "getattrs on the second walk");
    // A cached link target lives in the page cache, where a page used once is among
    // the first reclaimed when memory runs short (as during the whole test suite): a
    // few may be read again, but without the cache every one would be.
    let reread = second.readlink - first.readlink;
    assert!(
        reread * 2 < first.readlink,
        "symlinks read again: {reread} of {}",
        first.readlink
    );
    assert_eq!(second.readdir, first.readdir, "directories listed again");
    assert_eq!(second.opendir, first.opendir, "directories opened again");
    // Whiteouts still look like whiteouts (0/0 character devices) after caching.
    let wh = std::fs::symlink_metadata(m.mnt.join("usr/lib/removed.so")).expect("whiteout");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &wh.file_type()
    ));

    // The same under overlayfs, the way a container sees two layers: this one on top
    // of a base layer whose file its whiteout hides.
    let base = make_blob(
        &[
            Entry::new("usr", Kind::Dir),
            Entry::new("usr/lib", Kind::Dir),
            Entry::new("usr/lib/removed.so", Kind::Reg(b"gone".to_vec())),
            Entry::new("usr/lib/base.so", Kind::Reg(b"base".to_vec())),
            Entry::new("etc", Kind::Dir),
            Entry::new("etc/os-release", Kind::Reg(b"ID=test\n".to_vec())),
        ],
        64 << 10,
        &[],
    );
    let b = mount(&base, &quiet_config());
    let lower = format!("{}:{}", m.mnt.display(), b.mnt.display());
    let (_g, merged, _dir) = overlay(&lower);
    assert!(walk(&merged) > 400);
    let before = (counts(&m.metrics), counts(&b.metrics));
    std::thread::sleep(PAUSE);
    walk(&merged);
    let after = (counts(&m.metrics), counts(&b.metrics));
    for (before, after) in [(&before.0, &after.0), (&before.1, &after.1)] {
        assert_eq!(after.lookup, before.lookup, "lookups through overlayfs");
        assert_eq!(after.getattr, before.getattr, "getattrs through overlayfs");
    }
    assert!(
        !merged.join("usr/lib/removed.so").exists(),
        "whiteout applied"
    );
    assert_eq!(
        std::fs::read(merged.join("etc/os-release")).expect("base layer"),
        b"ID=test\n"
    );
    assert_eq!(
        std::fs::read(merged.join("usr/bin/gcc")).expect("read through symlink"),
        pseudo_random(3000, 1)
    );
}

#[test]
fn configured_negative_timeouts_cache_nothing() {
    if !fuse_ready("configured_negative_timeouts_cache_nothing") {
        return;
    }
    init_tracing();
    let blob = make_blob(&tree(), 64 << 10, &[]);
    let mut cfg = quiet_config();
    // As in the reference, 0 means the default and a negative value no caching.
    cfg.fuse.attr_timeout = -1;
    cfg.fuse.entry_timeout = -1;
    let m = mount(&blob, &cfg);
    walk(&m.mnt);
    let first = counts(&m.metrics);
    walk(&m.mnt);
    let second = counts(&m.metrics);
    // Every name is looked up again, missing ones included (3 probes per directory).
    assert!(
        second.lookup - first.lookup > 400,
        "lookups on the second walk: {}",
        second.lookup - first.lookup
    );
}
