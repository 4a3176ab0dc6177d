//! `TraceMount`: a real FUSE mount of a layer directory that shows the layer as it is
//! (types, modes, owners, devices, symlinks, xattrs), refuses writes, records the byte
//! ranges read, and stacks under overlayfs with whiteouts and opaque directories
//! working.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]
#![allow(
    clippy::single_range_in_vec_init,
    reason = "a file read once is one range, in a list of ranges"
)]

use std::ffi::CString;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use convert::optimize::TraceMount;

const MIB: u64 = 1024 * 1024;

/// Root and /dev/fuse, or a skip (a failure under CI=true).
fn fuse_ready(test: &str) -> bool {
    let dev = Path::new("/dev/fuse").exists();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if dev && root {
        return true;
    }
    let msg = format!("{test}: FUSE unavailable (/dev/fuse: {dev}, root: {root})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {msg}");
    false
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let (c, k) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a buffer with its length.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let (c, k) = (cpath(p), CString::new(name).unwrap());
    let mut v = vec![0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer with its length.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    (n >= 0).then(|| {
        v.truncate(n as usize);
        v
    })
}

fn list_xattrs(p: &Path) -> Vec<String> {
    let c = cpath(p);
    let mut v = vec![0u8; 1024];
    // SAFETY: a NUL-terminated path and a buffer with its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    assert!(n >= 0, "listxattr {}", p.display());
    v.truncate(n as usize);
    let mut names: Vec<String> = v
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    names
}

fn mknod_whiteout(p: &Path) {
    let c = cpath(p);
    // SAFETY: a NUL-terminated path; a 0/0 character device is overlayfs' whiteout.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) };
    assert_eq!(rc, 0, "mknod {}", p.display());
}

fn mounted(dir: &Path) -> bool {
    let want = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == want.to_str())
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn big_data() -> Vec<u8> {
    (0..3 * MIB)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// security.capability v2 with CAP_NET_BIND_SERVICE permitted and effective.
fn file_caps() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// The layer: a 3 MiB file, a small one (owned by 1234:5678, with file capabilities),
/// a symlink, a subdirectory, a whiteout and an opaque directory.
fn make_layer(src: &Path) {
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::create_dir_all(src.join("opq")).unwrap();
    std::fs::write(src.join("big"), big_data()).unwrap();
    std::fs::write(src.join("small.txt"), b"small and whole\n").unwrap();
    std::fs::write(src.join("sub/inner"), b"never read\n").unwrap();
    std::os::unix::fs::symlink("small.txt", src.join("link")).unwrap();
    mknod_whiteout(&src.join("gone"));
    set_xattr(&src.join("opq"), "trusted.overlay.opaque", b"y");
    std::os::unix::fs::chown(src.join("small.txt"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(src.join("small.txt"), PermissionsExt::from_mode(0o640)).unwrap();
    set_xattr(&src.join("small.txt"), "security.capability", &file_caps());
    std::fs::set_permissions(src.join("sub"), PermissionsExt::from_mode(0o751)).unwrap();
}

fn total(r: &[Range<u64>]) -> u64 {
    r.iter().map(|r| r.end - r.start).sum()
}

fn assert_canonical(path: &str, r: &[Range<u64>]) {
    assert!(!r.is_empty(), "{path}: no ranges");
    for x in r {
        assert!(x.start < x.end, "{path}: empty range in {r:?}");
    }
    for w in r.windows(2) {
        assert!(
            w[0].end < w[1].start,
            "{path}: not sorted and merged: {r:?}"
        );
    }
}

#[test]
fn shows_the_layer_as_it_is_and_records_what_is_read() {
    if !fuse_ready("shows_the_layer_as_it_is_and_records_what_is_read") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    make_layer(&src);
    let mnt = d.path().join("mnt");
    let t = TraceMount::mount(&src, &mnt).unwrap();
    assert!(mounted(&mnt));

    assert_eq!(
        listing(&mnt),
        ["big", "gone", "link", "opq", "small.txt", "sub"]
    );
    // Every entry's lstat matches the source's, except the inode number and device.
    for name in [
        "big",
        "gone",
        "link",
        "opq",
        "small.txt",
        "sub",
        "sub/inner",
        "",
    ] {
        let (a, b) = (
            std::fs::symlink_metadata(src.join(name)).unwrap(),
            std::fs::symlink_metadata(mnt.join(name)).unwrap(),
        );
        assert_eq!(a.mode(), b.mode(), "{name}: mode");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{name}: owner");
        assert_eq!(a.nlink(), b.nlink(), "{name}: nlink");
        assert_eq!(a.rdev(), b.rdev(), "{name}: rdev");
        assert_eq!(a.size(), b.size(), "{name}: size");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "{name}: mtime"
        );
    }
    // readdir's file types.
    for e in std::fs::read_dir(&mnt).unwrap() {
        let e = e.unwrap();
        let want = std::fs::symlink_metadata(src.join(e.file_name()))
            .unwrap()
            .file_type();
        assert_eq!(e.file_type().unwrap(), want, "{:?}", e.file_name());
    }
    let gone = std::fs::symlink_metadata(mnt.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert_eq!(
        std::fs::read_link(mnt.join("link")).unwrap(),
        Path::new("small.txt")
    );
    assert_eq!(
        get_xattr(&mnt.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(get_xattr(&mnt.join("sub"), "trusted.overlay.opaque"), None);
    assert_eq!(
        get_xattr(&mnt.join("small.txt"), "security.capability"),
        Some(file_caps())
    );
    assert_eq!(list_xattrs(&mnt.join("small.txt")), ["security.capability"]);
    assert_eq!(list_xattrs(&mnt.join("opq")), ["trusted.overlay.opaque"]);
    assert_eq!(listing(&mnt.join("sub")), ["inner"]);
    assert_eq!(
        std::fs::read(mnt.join("small.txt")).unwrap(),
        b"small and whole\n"
    );

    // Read-only.
    let err = std::fs::write(mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(std::fs::remove_file(mnt.join("small.txt")).is_err());

    // 4 KiB at 2 MiB of the big file.
    let mut buf = vec![0u8; 4096];
    let f = std::fs::File::open(mnt.join("big")).unwrap();
    f.read_exact_at(&mut buf, 2 * MIB).unwrap();
    drop(f);
    assert_eq!(buf, big_data()[2 * MIB as usize..2 * MIB as usize + 4096]);

    let ranges = t.finish().unwrap();
    assert!(!mounted(&mnt), "still mounted after finish");
    let paths: Vec<&str> = ranges.iter().map(|(p, _)| p.as_str()).collect();
    // small.txt was read first (through both its name and the symlink: one inode).
    assert_eq!(paths, ["small.txt", "big"], "{ranges:?}");
    for (p, r) in &ranges {
        assert_canonical(p, r);
    }
    assert_eq!(ranges[0].1, [0..16]);
    let big = &ranges[1].1;
    assert!(
        big.iter()
            .any(|r| r.start <= 2 * MIB && 2 * MIB + 4096 <= r.end),
        "{big:?}"
    );
    // Readahead widens the read, but not to the whole file.
    assert!(total(big) < 3 * MIB, "{big:?}");
    assert!(big.iter().all(|r| r.end <= 3 * MIB), "{big:?}");
    eprintln!("4 KiB at 2 MiB read as {big:?} ({} bytes)", total(big));

    // A whole read is one range, the whole file.
    let t = TraceMount::mount(&src, &mnt).unwrap();
    assert_eq!(std::fs::read(mnt.join("big")).unwrap(), big_data());
    // Through mmap: page faults are reads too.
    let f = std::fs::File::open(mnt.join("sub/inner")).unwrap();
    // SAFETY: a private read-only mapping of a file nobody changes.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    assert_eq!(&map[..], b"never read\n");
    drop(map);
    drop(f);
    let ranges = t.finish().unwrap();
    assert_eq!(
        ranges,
        [
            ("big".to_string(), vec![0..3 * MIB]),
            ("sub/inner".to_string(), vec![0..11])
        ]
    );
}

/// An overlay with both lower layers served by trace mounts.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lowers_top_first: &[&Path], target: &Path) -> Overlay {
        std::fs::create_dir_all(target).unwrap();
        let lower = lowers_top_first
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(format!("lowerdir={lower}").as_str()),
        )
        .unwrap();
        Overlay(target.to_path_buf())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn overlay_over_trace_mounts_honours_whiteouts_and_opaque_dirs() {
    if !fuse_ready("overlay_over_trace_mounts_honours_whiteouts_and_opaque_dirs") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (lower, upper) = (d.path().join("l0"), d.path().join("l1"));
    for p in ["d", "keep"] {
        std::fs::create_dir_all(lower.join(p)).unwrap();
    }
    std::fs::write(lower.join("a.txt"), b"lower a\n").unwrap();
    std::fs::write(lower.join("gone.txt"), b"deleted above\n").unwrap();
    std::fs::write(lower.join("d/old.txt"), b"hidden by the opaque dir\n").unwrap();
    std::fs::write(lower.join("keep/low.txt"), b"merged\n").unwrap();
    std::fs::write(lower.join("shadowed.txt"), b"lower copy\n").unwrap();
    for p in ["d", "keep"] {
        std::fs::create_dir_all(upper.join(p)).unwrap();
    }
    mknod_whiteout(&upper.join("gone.txt"));
    set_xattr(&upper.join("d"), "trusted.overlay.opaque", b"y");
    std::fs::write(upper.join("d/new.txt"), b"new\n").unwrap();
    std::fs::write(upper.join("keep/up.txt"), b"merged too\n").unwrap();
    std::fs::write(upper.join("shadowed.txt"), b"upper copy\n").unwrap();

    let tl = TraceMount::mount(&lower, &d.path().join("t0")).unwrap();
    let tu = TraceMount::mount(&upper, &d.path().join("t1")).unwrap();
    let root = d.path().join("root");
    let ov = Overlay::mount(&[tu.path(), tl.path()], &root);

    assert_eq!(listing(&root), ["a.txt", "d", "keep", "shadowed.txt"]);
    assert!(!root.join("gone.txt").exists());
    assert_eq!(listing(&root.join("d")), ["new.txt"]);
    assert!(!root.join("d/old.txt").exists());
    assert_eq!(listing(&root.join("keep")), ["low.txt", "up.txt"]);
    assert_eq!(std::fs::read(root.join("a.txt")).unwrap(), b"lower a\n");
    assert_eq!(
        std::fs::read(root.join("shadowed.txt")).unwrap(),
        b"upper copy\n"
    );
    assert_eq!(
        std::fs::read(root.join("keep/low.txt")).unwrap(),
        b"merged\n"
    );
    assert_eq!(std::fs::read(root.join("d/new.txt")).unwrap(), b"new\n");

    drop(ov);
    let lower_read = tl.finish().unwrap();
    let upper_read = tu.finish().unwrap();
    assert_eq!(
        lower_read,
        [
            ("a.txt".to_string(), vec![0..8]),
            ("keep/low.txt".to_string(), vec![0..7]),
        ]
    );
    assert_eq!(
        upper_read,
        [
            ("shadowed.txt".to_string(), vec![0..11]),
            ("d/new.txt".to_string(), vec![0..4]),
        ]
    );
}
