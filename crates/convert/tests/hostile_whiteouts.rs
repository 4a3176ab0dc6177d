//! Whiteouts in a hostile layer: `.wh.NAME` and `.wh..wh..opq` under a path that
//! goes through the image's own symlink must never reach the host the symlink names.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::path::Path;

use convert::optimize::unpack_layer;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A tar: symlinks `(name, target)` first, then empty files `names` (the whiteouts).
fn tar_with(links: &[(&str, &str)], files: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, target) in links {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, name, target).unwrap();
    }
    for name in files {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

fn canary(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("file"), b"canary").unwrap();
    dir.join("file")
}

fn opaque(dir: &Path) -> bool {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let k = std::ffi::CString::new("trusted.overlay.opaque").unwrap();
    let mut v = [0u8; 4];
    // SAFETY: valid strings and a buffer with its length.
    unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) > 0 }
}

#[test]
fn whiteouts_through_image_symlinks_never_touch_the_host() {
    if !is_root() {
        assert!(std::env::var("CI").is_err(), "needs root under CI");
        eprintln!("SKIPPED: whiteouts need root (mknod, trusted xattrs)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let host1 = d.path().join("host/canary-dir");
    let host2 = d.path().join("host/canary2");
    let f1 = canary(&host1);
    let f2 = canary(&host2);
    let climb = "../".repeat(12) + host1.to_str().unwrap();
    type Case<'a> = (Vec<(&'a str, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (vec![("x", host1.display().to_string())], vec!["x/.wh.file"]),
        (
            vec![("y", host2.display().to_string())],
            vec!["y/.wh..wh..opq"],
        ),
        // Through a relative link that climbs out, and a link higher up the path.
        (vec![("r", climb)], vec!["r/.wh.file"]),
        (
            vec![("a", host1.parent().unwrap().display().to_string())],
            vec!["a/canary-dir/.wh.file", "a/canary2/.wh..wh..opq"],
        ),
    ];
    for (i, (links, files)) in cases.iter().enumerate() {
        let links: Vec<(&str, &str)> = links.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let blob = d.path().join(format!("layer{i}.tar"));
        std::fs::write(&blob, tar_with(&links, files)).unwrap();
        let dest = d.path().join(format!("unpacked{i}"));
        let err = unpack_layer(&blob, &dest).expect_err("a whiteout through a symlink is refused");
        assert!(err.to_string().contains("symlink"), "case {i}: {err:?}");
        assert_eq!(std::fs::read(&f1).unwrap(), b"canary", "case {i}");
        assert_eq!(std::fs::read(&f2).unwrap(), b"canary", "case {i}");
        assert!(!opaque(&host2), "case {i}: host dir marked opaque");
        assert!(!opaque(&host1), "case {i}: host dir marked opaque");
    }
    // Ordinary whiteouts still work next to a symlink that is not on their path.
    let blob = d.path().join("ok.tar");
    std::fs::write(
        &blob,
        tar_with(
            &[("x", host1.to_str().unwrap())],
            &["etc/.wh.gone", "var/.wh..wh..opq"],
        ),
    )
    .unwrap();
    let dest = d.path().join("ok");
    unpack_layer(&blob, &dest).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let gone = std::fs::symlink_metadata(dest.join("etc/gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert!(opaque(&dest.join("var")));
    assert_eq!(std::fs::read(&f1).unwrap(), b"canary");
}
