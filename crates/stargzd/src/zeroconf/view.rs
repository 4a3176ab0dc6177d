//! The image's root filesystem as containerd will assemble it, seen through the TOCs of
//! its layers: the top layer wins, `.wh.NAME` hides NAME below, `.wh..wh..opq` hides
//! everything below a directory, and symlinks are followed inside the image root.
//!
//! Names come from TOCs of untrusted images: walks are bounded (symlinks followed,
//! components, name lengths), `..` stops at the root, and nothing here touches the host.

use std::collections::{BTreeSet, VecDeque};

use estargz::{Index, NodeId, NodeKind};

/// Most symlinks followed in one resolution, as the kernel's `MAXSYMLINKS` is 40.
pub const MAX_SYMLINKS: usize = 40;
/// Most path components one resolution walks (the link targets' included).
const MAX_COMPONENTS: usize = 4096;
/// Longest path or link target taken, as `PATH_MAX`.
const MAX_PATH: usize = 4096;
/// Most names one directory listing returns.
const MAX_LISTING: usize = 4096;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// A file of the merged view: which layer holds it and its node there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Found {
    /// Position of the layer, 0 = bottom.
    pub layer: usize,
    pub node: NodeId,
}

/// A resolved path: where it ended up and the clean path (no leading `/`) it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub found: Found,
    pub path: String,
}

/// The layers of one image, bottom first.
pub struct MergedView<'a> {
    layers: Vec<&'a Index>,
}

impl<'a> MergedView<'a> {
    pub fn new(layers: Vec<&'a Index>) -> Self {
        MergedView { layers }
    }

    pub fn node(&self, f: Found) -> Option<&'a estargz::Node> {
        self.layers.get(f.layer)?.get(f.node)
    }

    /// The entry at `path` (clean, relative to the root, no symlink followed), if the
    /// merged view shows one.
    pub fn lookup(&self, path: &str) -> Option<Found> {
        if path.is_empty() {
            return Some(Found {
                layer: self.layers.len().checked_sub(1)?,
                node: self.layers.last()?.root(),
            });
        }
        let parts: Vec<&str> = path.split('/').collect();
        for (layer, ix) in self.layers.iter().enumerate().rev() {
            if let Some(node) = ix.lookup(path) {
                return Some(Found { layer, node });
            }
            if hides_below(ix, &parts) {
                return None;
            }
        }
        None
    }

    /// Follows `path` (absolute, or relative to the root) through symlinks, the last
    /// component's included, to a regular file.
    pub fn resolve_file(&self, path: &str) -> Option<Resolved> {
        let r = self.resolve(path, true)?;
        (self.node(r.found)?.kind == NodeKind::Reg).then_some(r)
    }

    /// Whether `path`, symlinks followed, is a directory.
    pub fn is_dir(&self, path: &str) -> bool {
        self.resolve(path, true)
            .and_then(|r| self.node(r.found))
            .is_some_and(|n| n.kind == NodeKind::Dir)
    }

    /// Follows `path` through symlinks; the last component's too when `follow_last`.
    /// Relative link targets are taken from the link's directory, absolute ones from
    /// the image root; `..` never climbs above the root. `None` when a component is
    /// missing, not a directory, or the walk passes its bounds (a loop ends there).
    pub fn resolve(&self, path: &str, follow_last: bool) -> Option<Resolved> {
        if path.len() > MAX_PATH {
            return None;
        }
        let mut queue: VecDeque<String> = path.split('/').map(str::to_string).collect();
        let mut cur: Vec<String> = Vec::new();
        let mut links = 0usize;
        let mut walked = 0usize;
        while let Some(c) = queue.pop_front() {
            walked += 1;
            if walked > MAX_COMPONENTS {
                return None;
            }
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    cur.pop();
                    continue;
                }
                _ => {}
            }
            let mut next = cur.join("/");
            if !next.is_empty() {
                next.push('/');
            }
            next.push_str(&c);
            let found = self.lookup(&next)?;
            let node = self.node(found)?;
            let last = queue.iter().all(|c| c.is_empty() || c == ".");
            if node.kind == NodeKind::Symlink && (!last || follow_last) {
                links += 1;
                let target = node.link_target.as_str();
                if links > MAX_SYMLINKS || target.is_empty() || target.len() > MAX_PATH {
                    return None;
                }
                if target.starts_with('/') {
                    cur.clear();
                }
                for part in target.split('/').rev() {
                    queue.push_front(part.to_string());
                }
                continue;
            }
            if !last && node.kind != NodeKind::Dir {
                return None;
            }
            cur.push(c);
        }
        let path = cur.join("/");
        let found = self.lookup(&path)?;
        Some(Resolved { found, path })
    }

    /// Names in the directory at `path` (symlinks followed) across the layers, whiteouts
    /// and opaque directories applied; at most 4096.
    pub fn list_dir(&self, path: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Some(dir) = self.resolve(path, true) else {
            return out;
        };
        let parts: Vec<&str> = if dir.path.is_empty() {
            Vec::new()
        } else {
            dir.path.split('/').collect()
        };
        let mut hidden = BTreeSet::new();
        for ix in self.layers[..=dir.found.layer.min(self.layers.len() - 1)]
            .iter()
            .rev()
        {
            let Some(id) = (if dir.path.is_empty() {
                Some(ix.root())
            } else {
                ix.lookup(&dir.path)
            }) else {
                if hides_below(ix, &parts) {
                    break;
                }
                continue;
            };
            let node = ix.node(id);
            if node.kind != NodeKind::Dir {
                break;
            }
            for name in node.children.keys() {
                if let Some(gone) = name.strip_prefix(WHITEOUT_PREFIX) {
                    hidden.insert(gone.to_string());
                } else if !hidden.contains(name) && out.len() < MAX_LISTING {
                    out.insert(name.clone());
                }
            }
            if node.children.contains_key(OPAQUE_MARKER) {
                break;
            }
        }
        out
    }
}

/// Whether layer `ix`, which has no entry at `parts`, hides the lower layers' entry:
/// a whiteout of the path or of a parent, an opaque parent, or a parent that is no
/// directory.
fn hides_below(ix: &Index, parts: &[&str]) -> bool {
    let mut prefix = String::new();
    for (i, name) in parts.iter().enumerate() {
        let parent = prefix.clone();
        let dir = if parent.is_empty() {
            Some(ix.root())
        } else {
            ix.lookup(&parent)
        };
        if let Some(dir) = dir {
            let d = ix.node(dir);
            if d.kind != NodeKind::Dir {
                return true;
            }
            if d.children.contains_key(&format!("{WHITEOUT_PREFIX}{name}")) {
                return true;
            }
            // An opaque root means nothing: no layer below shows through a root.
            if d.children.contains_key(OPAQUE_MARKER) && !parent.is_empty() {
                return true;
            }
        }
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(name);
        if i + 1 < parts.len() {
            if let Some(id) = ix.lookup(&prefix) {
                if ix.node(id).kind != NodeKind::Dir {
                    return true;
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is a failed assertion"
    )]

    use super::*;

    enum E<'a> {
        Dir(&'a str),
        File(&'a str, &'a [u8]),
        Link(&'a str, &'a str),
    }

    fn index(entries: &[E]) -> Index {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1);
            match e {
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                E::File(p, d) => {
                    h.set_mode(0o755);
                    h.set_size(d.len() as u64);
                    b.append_data(&mut h, p, *d).unwrap();
                }
                E::Link(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, t).unwrap();
                }
            }
        }
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        estargz::build(&tar[..], &mut blob, &estargz::BuildOptions::default()).unwrap();
        estargz::Reader::open(&blob, &estargz::OpenOptions::default())
            .unwrap()
            .index
    }

    fn path_of(v: &MergedView, p: &str) -> Option<(usize, String)> {
        v.resolve_file(p).map(|r| (r.found.layer, r.path))
    }

    #[test]
    fn top_layer_wins_and_whiteouts_hide() {
        let l0 = index(&[
            E::Dir("bin"),
            E::File("bin/a", b"low"),
            E::File("bin/b", b"low"),
            E::Dir("opt/x"),
            E::File("opt/x/keep", b"low"),
        ]);
        let l1 = index(&[
            E::Dir("bin"),
            E::File("bin/a", b"high"),
            E::File("bin/.wh.b", b""),
            E::Dir("opt/x"),
            E::File("opt/x/.wh..wh..opq", b""),
            E::File("opt/x/new", b"high"),
        ]);
        let v = MergedView::new(vec![&l0, &l1]);
        assert_eq!(path_of(&v, "/bin/a"), Some((1, "bin/a".into())));
        assert_eq!(path_of(&v, "/bin/b"), None);
        assert_eq!(path_of(&v, "/opt/x/keep"), None);
        assert_eq!(path_of(&v, "opt/x/new"), Some((1, "opt/x/new".into())));
        let names: Vec<String> = v.list_dir("/bin").into_iter().collect();
        assert_eq!(names, vec!["a".to_string()]);
        assert!(!v.list_dir("/opt/x").contains("keep"));
        // Without the upper layer the lower files are there.
        let v0 = MergedView::new(vec![&l0]);
        assert_eq!(path_of(&v0, "/bin/b"), Some((0, "bin/b".into())));
        assert_eq!(path_of(&v0, "/opt/x/keep"), Some((0, "opt/x/keep".into())));
    }

    #[test]
    fn whited_out_directory_hides_its_files() {
        let l0 = index(&[E::Dir("usr/lib"), E::File("usr/lib/libc.so.6", b"x")]);
        let l1 = index(&[E::Dir("usr"), E::File("usr/.wh.lib", b"")]);
        let v = MergedView::new(vec![&l0, &l1]);
        assert_eq!(path_of(&v, "/usr/lib/libc.so.6"), None);
        // A file replacing a directory hides it too.
        let l2 = index(&[E::File("usr", b"not a dir")]);
        let v = MergedView::new(vec![&l0, &l2]);
        assert_eq!(path_of(&v, "/usr/lib/libc.so.6"), None);
    }

    #[test]
    fn symlink_chains_across_layers_and_loops() {
        let l0 = index(&[
            E::Dir("usr/lib/x86_64-linux-gnu"),
            E::File("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", b"ld"),
            E::Link("lib", "usr/lib"),
        ]);
        let l1 = index(&[
            E::Dir("lib64"),
            E::Link(
                "lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
            E::Dir("usr/bin"),
            E::Link(
                "usr/bin/rel",
                "../../lib/./x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
            E::Link("usr/bin/up", "../../../../../../lib64/ld-linux-x86-64.so.2"),
            E::Link("loop/a", "b"),
            E::Link("loop/b", "/loop/a"),
            E::Link("self", "self"),
        ]);
        let v = MergedView::new(vec![&l0, &l1]);
        let want = Some((
            0,
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".to_string(),
        ));
        assert_eq!(path_of(&v, "/lib64/ld-linux-x86-64.so.2"), want);
        assert_eq!(path_of(&v, "/usr/bin/rel"), want);
        // `..` stops at the root: no way out of the image.
        assert_eq!(path_of(&v, "/usr/bin/up"), want);
        assert_eq!(path_of(&v, "/loop/a"), None);
        assert_eq!(path_of(&v, "/self"), None);
        // Not following the last link gives the link itself.
        let r = v.resolve("/lib64/ld-linux-x86-64.so.2", false).unwrap();
        assert_eq!(v.node(r.found).unwrap().kind, NodeKind::Symlink);
    }
}
