//! Unpacking a blob into a directory, through the index, so that names are already
//! validated and nothing is written outside the destination.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::error::{Error, Result};
use crate::reader::{BlobSource, NodeId, NodeKind, Reader, ROOT};

/// Options for [`extract`].
#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// Apply uid/gid (needs root).
    pub chown: bool,
}

/// Extracts every file of the blob under `dest`, which must not exist or be empty.
/// Device nodes need root; where mknod fails they are skipped with a warning.
pub fn extract(
    reader: &Reader,
    src: &dyn BlobSource,
    dest: &Path,
    opts: &ExtractOptions,
) -> Result<usize> {
    fs::create_dir_all(dest)
        .map_err(|e| Error::io_at(format!("creating {}", dest.display()), e))?;
    if fs::read_dir(dest)
        .map_err(|e| Error::io_at(format!("reading {}", dest.display()), e))?
        .next()
        .is_some()
    {
        return Err(Error::InvalidOption(format!(
            "{} is not empty",
            dest.display()
        )));
    }
    let mut first_path: HashMap<NodeId, PathBuf> = HashMap::new();
    let mut count = 0;
    let mut dirs = Vec::new();
    let mut stack = vec![(ROOT, dest.to_path_buf())];
    while let Some((dir, dir_path)) = stack.pop() {
        dirs.push((dir, dir_path.clone()));
        for (name, &id) in &reader.index.node(dir).children {
            let path = dir_path.join(name);
            let node = reader.index.node(id);
            let io = |e| Error::io_at(format!("creating {}", path.display()), e);
            if let Some(existing) = first_path.get(&id) {
                fs::hard_link(existing, &path).map_err(io)?;
                count += 1;
                continue;
            }
            match node.kind {
                NodeKind::Dir => {
                    fs::create_dir(&path).map_err(io)?;
                    stack.push((id, path.clone()));
                }
                NodeKind::Reg => {
                    // Chunk by chunk: a large file never sits in memory whole.
                    let file = fs::File::create(&path).map_err(io)?;
                    let mut out = std::io::BufWriter::new(file);
                    reader.copy_file(src, id, &mut out)?;
                    std::io::Write::flush(&mut out).map_err(io)?;
                }
                NodeKind::Symlink => symlink(&node.link_target, &path).map_err(io)?,
                NodeKind::Char | NodeKind::Block | NodeKind::Fifo => {
                    let kind = match node.kind {
                        NodeKind::Char => SFlag::S_IFCHR,
                        NodeKind::Block => SFlag::S_IFBLK,
                        _ => SFlag::S_IFIFO,
                    };
                    let c = cstr(&path)?;
                    let dev = makedev(node.dev_major.into(), node.dev_minor.into());
                    let perm = Mode::from_bits_truncate(node.mode & 0o7777);
                    if let Err(e) = mknod(c.as_c_str(), kind, perm, dev) {
                        tracing::warn!(path = %path.display(), error = %std::io::Error::from(e), "cannot create device or fifo; skipped");
                        continue;
                    }
                }
            }
            if node.kind != NodeKind::Dir {
                apply_attrs(&path, node, opts)?;
            }
            first_path.insert(id, path);
            count += 1;
        }
    }
    // Directories last, deepest first, so their permissions do not block the writes.
    for (id, path) in dirs.into_iter().rev() {
        apply_attrs(&path, reader.index.node(id), opts)?;
    }
    Ok(count)
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidOption(format!("{} has a NUL byte", p.display())))
}

fn apply_attrs(path: &Path, node: &crate::reader::Node, opts: &ExtractOptions) -> Result<()> {
    let io = |e| Error::io_at(format!("setting attributes of {}", path.display()), e);
    let c = cstr(path)?;
    for (k, v) in &node.xattrs {
        let Ok(key) = CString::new(k.as_bytes()) else {
            continue;
        };
        // SAFETY: `c` and `key` are NUL-terminated strings that outlive the call, and
        // `v` is a live buffer passed with its own length; nix has no xattr calls.
        let rc =
            unsafe { libc::lsetxattr(c.as_ptr(), key.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if rc != 0 {
            tracing::warn!(path = %path.display(), xattr = %k, error = %std::io::Error::last_os_error(), "cannot set xattr");
        }
    }
    if opts.chown {
        std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid)).map_err(io)?;
    }
    if node.kind != NodeKind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(node.mode)).map_err(io)?;
    }
    let t = TimeSpec::new(node.mtime as libc::time_t, 0);
    // Times are best effort, as before: a failure leaves the extraction time.
    let _ = utimensat(
        AT_FDCWD,
        c.as_c_str(),
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    );
    Ok(())
}
