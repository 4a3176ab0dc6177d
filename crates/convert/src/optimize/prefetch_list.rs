//! `--prefetch-list`: the record built from a list of paths and glob patterns instead
//! of a workload run, as the reference's does. Each layer's tar is listed; a path is
//! attributed to the topmost layer that holds it, unless a whiteout above deletes it;
//! a pattern (`*`, `?`, `[...]`, and `**` across directories) takes every path of the
//! image it matches.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;

use registry::{Digest, Manifest, Platform};

use crate::error::{Error, Result};
use crate::layer::{decompressed, detect};
use crate::optimize::record::RecordEntry;
use crate::Store;

/// Most lines read from a prefetch list.
const MAX_LINES: usize = 100_000;
/// Most tar entries listed per layer.
const MAX_ENTRIES: usize = 2_000_000;

/// The lines of a prefetch list: trimmed, blank lines and `#` comments dropped.
pub fn read_prefetch_list(text: &str) -> Result<Vec<String>> {
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if lines.len() > MAX_LINES {
        return Err(Error::Options(format!(
            "the prefetch list has {} entries, over {MAX_LINES}",
            lines.len()
        )));
    }
    Ok(lines)
}

/// `name` as the reference cleans entry names: relative, `.` and `..` resolved.
fn clean(name: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => out.push(p),
        }
    }
    out.join("/")
}

/// One path segment against one pattern segment: `*`, `?`, `[...]` (`!`/`^` negates,
/// ranges), `\` escapes.
fn segment_match(pat: &[char], name: &[char]) -> bool {
    match pat.split_first() {
        None => name.is_empty(),
        Some(('*', rest)) => (0..=name.len()).any(|i| segment_match(rest, &name[i..])),
        Some(('?', rest)) => !name.is_empty() && segment_match(rest, &name[1..]),
        Some(('[', rest)) => {
            let Some((&c, tail)) = name.split_first() else {
                return false;
            };
            let (negate, mut body) = match rest.first() {
                Some('!') | Some('^') => (true, &rest[1..]),
                _ => (false, rest),
            };
            let mut matched = false;
            let mut first = true;
            loop {
                match body.split_first() {
                    None => return false,
                    Some((']', after)) if !first => {
                        body = after;
                        break;
                    }
                    Some((&lo, after)) => {
                        let (lo, after) = if lo == '\\' {
                            match after.split_first() {
                                Some((&e, a)) => (e, a),
                                None => return false,
                            }
                        } else {
                            (lo, after)
                        };
                        if after.len() >= 2 && after[0] == '-' && after[1] != ']' {
                            if lo <= c && c <= after[1] {
                                matched = true;
                            }
                            body = &after[2..];
                        } else {
                            if lo == c {
                                matched = true;
                            }
                            body = after;
                        }
                    }
                }
                first = false;
            }
            matched != negate && segment_match(body, tail)
        }
        Some(('\\', rest)) => match rest.split_first() {
            Some((e, r)) => name.first() == Some(e) && segment_match(r, &name[1..]),
            None => false,
        },
        Some((p, rest)) => name.first() == Some(p) && segment_match(rest, &name[1..]),
    }
}

/// Whether `name` matches `pattern`, segment by segment; a `**` segment matches any
/// number of segments (doublestar's meaning).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(pat: &[&str], name: &[&str]) -> bool {
        match pat.split_first() {
            None => name.is_empty(),
            Some((&"**", rest)) => (0..=name.len()).any(|i| go(rest, &name[i..])),
            Some((p, rest)) => match name.split_first() {
                Some((n, nrest)) => {
                    let pc: Vec<char> = p.chars().collect();
                    let nc: Vec<char> = n.chars().collect();
                    segment_match(&pc, &nc) && go(rest, nrest)
                }
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let n: Vec<&str> = name.split('/').collect();
    go(&p, &n)
}

/// The names a layer's tar holds, cleaned.
async fn layer_names(
    src: &Store,
    desc: &registry::Descriptor,
    workdir: &std::path::Path,
) -> Result<HashSet<String>> {
    let blob = src.fetch_blob(desc, workdir).await?;
    let path = blob.path().to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<HashSet<String>> {
        let r = decompressed(&path, detect(&path)?)?;
        let names = list_tar(r).map_err(|e| Error::io(format!("listing {}", path.display()), e));
        drop(blob);
        names
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
}

fn list_tar(r: Box<dyn Read>) -> std::io::Result<HashSet<String>> {
    let mut out = HashSet::new();
    let mut archive = tar::Archive::new(r);
    for entry in archive.entries()? {
        let entry = entry?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        out.insert(clean(&name));
        if out.len() > MAX_ENTRIES {
            return Err(std::io::Error::other(format!(
                "more than {MAX_ENTRIES} entries in one layer"
            )));
        }
    }
    Ok(out)
}

/// The topmost layer showing `name`: `None` when absent or deleted by a whiteout.
fn providing(layers: &[HashSet<String>], name: &str) -> Option<usize> {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => ("", name),
    };
    let join = |d: &str, b: &str| {
        if d.is_empty() {
            b.to_string()
        } else {
            format!("{d}/{b}")
        }
    };
    let wh = join(dir, &format!(".wh.{base}"));
    let opaque = join(dir, ".wh..wh..opq");
    for i in (0..layers.len()).rev() {
        if layers[i].contains(name) {
            return Some(i);
        }
        if layers[i].contains(&wh) || layers[i].contains(&opaque) {
            return None;
        }
    }
    None
}

/// The record the list gives for this host's manifest of `src`: (manifest digest,
/// its layers' digests, entries in list order).
pub async fn record_from_list(
    src: &Store,
    list: &[String],
    workdir: &std::path::Path,
) -> Result<(Digest, Vec<Digest>, Vec<RecordEntry>)> {
    let root = src.root().await?;
    let fetched = match root.parse()? {
        Manifest::Image(_) => root,
        Manifest::Index(idx) => {
            let host = Platform::host();
            let desc = idx
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| host.matches(p)))
                .ok_or_else(|| Error::NoPlatform {
                    image: src.describe(),
                    wanted: host.to_string(),
                })?;
            src.manifest(desc).await?
        }
    };
    let manifest = match fetched.parse()? {
        Manifest::Image(m) => *m,
        Manifest::Index(_) => return Err(Error::bad(src.describe(), "an index inside an index")),
    };
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for d in &manifest.layers {
        layers.push(layer_names(src, d, workdir).await?);
    }
    let all: BTreeSet<&String> = layers.iter().flatten().collect();
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    let mut record = |name: &str, entries: &mut Vec<RecordEntry>| {
        if name.is_empty() || !seen.insert(name.to_string()) {
            return;
        }
        match providing(&layers, name) {
            Some(i) => entries.push(RecordEntry {
                path: name.to_string(),
                manifest_digest: Some(fetched.digest.to_string()),
                layer_index: Some(i),
            }),
            None => tracing::debug!(path = name, "not in the image (or deleted); skipped"),
        }
    };
    for line in list {
        let pattern = clean(line);
        if line.contains(['*', '?', '[']) {
            let matched: Vec<&String> = all
                .iter()
                .copied()
                .filter(|n| glob_match(&pattern, n))
                .collect();
            if matched.is_empty() {
                tracing::warn!(pattern = %line, "glob pattern matched no files");
            }
            for n in matched {
                record(n, &mut entries);
            }
        } else {
            record(&pattern, &mut entries);
        }
    }
    Ok((
        fetched.digest.clone(),
        manifest.layers.iter().map(|l| l.digest.clone()).collect(),
        entries,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_doublestar() {
        assert!(glob_match("usr/bin/*", "usr/bin/ls"));
        assert!(!glob_match("usr/bin/*", "usr/bin/x/ls"));
        assert!(glob_match("usr/**/ls", "usr/bin/ls"));
        assert!(glob_match("usr/**/ls", "usr/ls"));
        assert!(glob_match("**", "a/b/c"));
        assert!(glob_match("lib/libc.so.?", "lib/libc.so.6"));
        assert!(glob_match("data/[a-c].txt", "data/b.txt"));
        assert!(!glob_match("data/[!a-c].txt", "data/b.txt"));
        assert!(glob_match("data/[!a-c].txt", "data/z.txt"));
        assert!(!glob_match("etc/*.conf", "etc/sub/x.conf"));
        assert_eq!(clean("/./a/../b//c"), "b/c");
    }

    #[test]
    fn whiteouts_hide_lower_layers() {
        let l = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        let layers = vec![
            l(&["bin/sh", "etc/a", "d/x"]),
            l(&["etc/.wh.a", "d/.wh..wh..opq", "etc/b"]),
            l(&["bin/sh"]),
        ];
        assert_eq!(providing(&layers, "bin/sh"), Some(2));
        assert_eq!(providing(&layers, "etc/a"), None);
        assert_eq!(providing(&layers, "d/x"), None);
        assert_eq!(providing(&layers, "etc/b"), Some(1));
        assert_eq!(providing(&layers, "nope"), None);
    }
}
