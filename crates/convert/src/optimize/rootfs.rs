//! The workload's root filesystem: each layer unpacked into its own directory
//! with whiteouts in overlayfs' form, stacked read-only under a scratch upper
//! directory with overlayfs. Unmounted on drop.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};
use crate::layer;

const OPAQUE_MARKER: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";

/// Unpacks the layer blob at `blob` (gzip, zstd or plain tar) into `dest`,
/// turning `.wh.NAME` into a 0/0 character device and `.wh..wh..opq` into the
/// `trusted.overlay.opaque=y` attribute of its directory.
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<()> {
    let io = |what: String| move |e| Error::io(what, e);
    std::fs::create_dir_all(dest).map_err(io(format!("creating {}", dest.display())))?;
    let compression = layer::detect(blob)?;
    let mut archive = tar::Archive::new(layer::decompressed(blob, compression)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let what = format!("unpacking {}", blob.display());
    for entry in archive.entries().map_err(io(what.clone()))? {
        let mut entry = entry.map_err(io(what.clone()))?;
        let name = entry.path().map_err(io(what.clone()))?.into_owned();
        let Some(file_name) = name.file_name().and_then(|n| n.to_str()) else {
            entry.unpack_in(dest).map_err(io(what.clone()))?;
            continue;
        };
        if !file_name.starts_with(WHITEOUT_PREFIX) {
            entry.unpack_in(dest).map_err(io(what.clone()))?;
            continue;
        }
        // Whiteouts are applied by this code, not tar's: every directory on the way is
        // opened relative to its parent without following symlinks, and the change is
        // made relative to that directory, so an image's `x -> /etc` never leads to
        // the host.
        let parent_rel = name.parent().unwrap_or(Path::new(""));
        let dir = open_dir_beneath(dest, parent_rel, true)
            .map_err(|e| Error::bad(&what, format!("whiteout {name:?}: {e}")))?;
        if file_name == OPAQUE_MARKER {
            fset_xattr(&dir, "trusted.overlay.opaque", b"y")
                .map_err(|e| Error::io(format!("marking {parent_rel:?} opaque"), e))?;
        } else {
            let hidden = &file_name[WHITEOUT_PREFIX.len()..];
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(Error::bad(
                    &what,
                    format!("whiteout {name:?} names no file"),
                ));
            }
            let c = CString::new(hidden)
                .map_err(|_| Error::bad(&what, format!("whiteout {name:?} has a NUL byte")))?;
            // SAFETY: a valid directory fd and a NUL-terminated name; unlinkat removes
            // the entry itself (a symlink is removed, never followed).
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
            // SAFETY: as above; mknodat creates the 0/0 device in that directory only.
            let rc = unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), libc::S_IFCHR, 0) };
            if rc != 0 {
                return Err(Error::io(
                    format!("creating whiteout {}", parent_rel.join(hidden).display()),
                    std::io::Error::last_os_error(),
                ));
            }
        }
    }
    Ok(())
}

/// Opens directory `rel` under `root` one component at a time, each relative to the
/// one before with `O_NOFOLLOW`, creating missing ones when `create`. A symlink or a
/// non-directory on the way is an error: nothing outside `root` is ever reached.
fn open_dir_beneath(root: &Path, rel: &Path, create: bool) -> std::io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    let mut cur = open_at(
        libc::AT_FDCWD,
        &cstring(root.as_os_str().as_bytes())?,
        flags,
    )?;
    for c in rel.components() {
        let part = match c {
            Component::Normal(p) => cstring(p.as_bytes())?,
            Component::CurDir | Component::RootDir => continue,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "path climbs out with \"..\"",
                ))
            }
        };
        let next = match open_at(cur.as_raw_fd(), &part, flags | libc::O_NOFOLLOW) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                // SAFETY: a valid directory fd and a NUL-terminated name.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), part.as_ptr(), 0o755) } != 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                open_at(cur.as_raw_fd(), &part, flags | libc::O_NOFOLLOW)
            }
            other => other,
        };
        cur = next.map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{:?} is a symlink or not a directory",
                    String::from_utf8_lossy(part.as_bytes())
                ),
            ),
            _ => e,
        })?;
    }
    Ok(cur)
}

fn open_at(dir: RawFd, name: &CString, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: `dir` is AT_FDCWD or a directory fd we own; `name` is NUL-terminated.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cstring(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

fn fset_xattr(fd: &OwnedFd, key: &str, value: &[u8]) -> std::io::Result<()> {
    let k = cstring(key.as_bytes())?;
    // SAFETY: a valid fd, a NUL-terminated name and a buffer with its length.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `base/rel` when `rel` has only normal components.
fn safe_join(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// An overlayfs mount of unpacked layers; unmounted when dropped.
#[derive(Debug)]
pub struct Overlay {
    target: PathBuf,
    mounted: bool,
}

impl Overlay {
    /// Mounts `lowers` (bottom layer first) under a writable `upper` at `target`.
    pub fn mount(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<Overlay> {
        for d in [upper, work, target] {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        // An image with no layers still needs one lower directory.
        let empty = work.with_extension("empty");
        let mut lower_list: Vec<String> = lowers.iter().rev().map(|p| escape(p)).collect();
        if lower_list.is_empty() {
            std::fs::create_dir_all(&empty)
                .map_err(|e| Error::io(format!("creating {}", empty.display()), e))?;
            lower_list.push(escape(&empty));
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower_list.join(":"),
            escape(upper),
            escape(work)
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| {
            Error::Sandbox(format!(
                "mounting overlayfs at {} ({} layers): {e}",
                target.display(),
                lowers.len()
            ))
        })?;
        Ok(Overlay {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting a failure.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        umount2(&self.target, MntFlags::MNT_DETACH)
            .map_err(|e| Error::Sandbox(format!("unmounting {}: {e}", self.target.display())))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %self.target.display(), error = %e, "cannot unmount the workload's rootfs");
            }
        }
    }
}

/// Overlayfs splits its options at ',' and lowers at ':'.
fn escape(p: &Path) -> String {
    p.to_string_lossy()
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

/// Index (bottom first) of the topmost unpacked layer holding `rel`, the path
/// of a file read through the overlay.
pub fn providing_layer(layers: &[PathBuf], rel: &str) -> Option<usize> {
    let rel = Path::new(rel);
    let name = cstring(rel.file_name()?.as_bytes()).ok()?;
    safe_join(Path::new(""), rel)?;
    layers.iter().enumerate().rev().find_map(|(i, dir)| {
        // Looked up without following the layer's symlinks: a workload's path never
        // reaches outside the unpacked layer.
        let parent = open_dir_beneath(dir, rel.parent().unwrap_or(Path::new("")), false).ok()?;
        // SAFETY: an all-zero stat is a valid value to be overwritten by fstatat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid directory fd, a NUL-terminated name and a stat buffer.
        let rc = unsafe {
            libc::fstatat(
                parent.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return None;
        }
        // A whiteout means no lower layer shows the file either.
        if st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0 {
            return Some(None);
        }
        Some(Some(i))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(names: &[&str]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for name in names {
            let mut h = tar::Header::new_ustar();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            b.append_data(&mut h, name, &b"x"[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_what_overlayfs_reads() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var("CI").is_err(), "needs root under CI");
            eprintln!("SKIPPED: whiteouts need root (mknod, trusted xattrs)");
            return;
        }
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let blob = d.path().join("layer.tar");
        std::fs::write(
            &blob,
            tar_of(&["etc/.wh.gone", "var/.wh..wh..opq", "var/kept"]),
        )
        .unwrap();
        let dest = d.path().join("l");
        unpack_layer(&blob, &dest).unwrap();
        let gone = std::fs::symlink_metadata(dest.join("etc/gone")).unwrap();
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert!(!dest.join("etc/.wh.gone").exists());
        assert!(!dest.join("var/.wh..wh..opq").exists());
        assert_eq!(std::fs::read(dest.join("var/kept")).unwrap(), b"x");
        let c = CString::new(dest.join("var").as_os_str().as_bytes()).unwrap();
        let k = CString::new("trusted.overlay.opaque").unwrap();
        let mut v = [0u8; 4];
        // SAFETY: valid strings and a buffer with its length.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert_eq!(n, 1);
        assert_eq!(v[0], b'y');
        assert_eq!(
            providing_layer(std::slice::from_ref(&dest), "etc/gone"),
            None
        );
        assert!(unpack_layer(&write_bad(d.path()), &d.path().join("bad")).is_err());
    }

    fn write_bad(dir: &Path) -> PathBuf {
        let mut raw = tar_of(&["a/.wh.x"]);
        // A whiteout that climbs out of the layer directory must be refused.
        raw[..7].copy_from_slice(b"../.wh.");
        let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
        h.set_cksum();
        raw[..512].copy_from_slice(h.as_bytes());
        let p = dir.join("bad.tar");
        std::fs::write(&p, raw).unwrap();
        p
    }

    #[test]
    fn topmost_layer_wins() {
        let d = tempfile::tempdir().unwrap();
        let layers: Vec<PathBuf> = (0..3).map(|i| d.path().join(i.to_string())).collect();
        for l in &layers {
            std::fs::create_dir_all(l.join("etc")).unwrap();
        }
        std::fs::write(layers[0].join("etc/a"), "0").unwrap();
        std::fs::write(layers[1].join("etc/a"), "1").unwrap();
        std::fs::write(layers[0].join("etc/b"), "0").unwrap();
        assert_eq!(providing_layer(&layers, "etc/a"), Some(1));
        assert_eq!(providing_layer(&layers, "etc/b"), Some(0));
        assert_eq!(providing_layer(&layers, "etc/c"), None);
        assert_eq!(providing_layer(&layers, "../etc/a"), None);
    }
}
