//! The learned-prefetch record: per layer of one image (named by its manifest digest),
//! the regular files a workload read first after the mount, in order of first access,
//! and for large files the byte ranges it read (a workload that maps a big file and
//! touches a few pages of it needs those pages, not the file).
//! The daemon keeps one per image under `<root>/learned/`, and the same JSON travels
//! between nodes as the one layer of an OCI artifact tagged after the image's digest.
//!
//! A record is untrusted input wherever it comes from: [`Record::parse`] bounds its
//! size, its layer count, its list lengths and its paths, and refuses the whole record
//! on any violation (a record that breaks one bound was not written by a daemon).

use std::collections::BTreeMap;

use oci_digest::Digest;
use serde::{Deserialize, Serialize};

/// `artifactType` of the record's manifest and media type of its one layer.
pub const MEDIA_TYPE: &str = "application/vnd.stargz-rs.prefetch-record.v1+json";
/// Appended to `<alg>-<hex>` of the image's manifest digest to name the tag the record
/// is pushed under (the OCI 1.1 referrers tag schema's style, for registries without a
/// referrers API).
pub const TAG_SUFFIX: &str = ".sgz-prefetch";
/// The format this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest record accepted, in bytes (file or registry blob).
pub const MAX_RECORD_BYTES: u64 = 4 << 20;
/// Most layers one record may name.
pub const MAX_LAYERS: usize = 1024;
/// Most files recorded per layer.
pub const MAX_FILES_PER_LAYER: usize = 16_384;
/// Longest path accepted.
pub const MAX_PATH_BYTES: usize = 4096;
/// Most read ranges recorded for one file.
pub const MAX_RANGES_PER_FILE: usize = 1024;

/// One image's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// [`VERSION`].
    pub version: u32,
    /// Manifest digest of the image (the platform manifest the layers come from).
    pub image: String,
    /// When the record was last written, seconds since the Unix epoch.
    pub created: u64,
    /// Per layer blob digest: TOC paths (no leading `/`) in order of first access.
    pub layers: BTreeMap<String, Vec<String>>,
    /// Per layer blob digest and path (one of that layer's `layers` paths): the
    /// `[start, end)` byte ranges of the file that were read, sorted and disjoint. A
    /// file listed without ranges was needed whole. Absent in records written before
    /// ranges were kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ranges: BTreeMap<String, BTreeMap<String, Vec<[u64; 2]>>>,
}

/// Why a record was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is {0} bytes, over {MAX_RECORD_BYTES}")]
    TooLarge(u64),
    #[error("record is not valid JSON: {0}")]
    Json(String),
    #[error("record version {0} is not {VERSION}")]
    Version(u32),
    #[error("record names {0} layers, over {MAX_LAYERS}")]
    TooManyLayers(usize),
    #[error("record has an invalid digest {0:?}")]
    Digest(String),
    #[error("record lists {count} files for layer {layer}, over {MAX_FILES_PER_LAYER}")]
    TooManyFiles { layer: String, count: usize },
    #[error("record has an unsafe path {0:?}")]
    Path(String),
    #[error("record is for image {found}, not {want}")]
    WrongImage { found: String, want: String },
    #[error("record has bad read ranges for {path:?} of layer {layer}: {why}")]
    Ranges {
        layer: String,
        path: String,
        why: &'static str,
    },
}

/// The tag a record for `image` (a manifest digest) is pushed under:
/// `sha256-<hex>.sgz-prefetch`.
pub fn tag_for(image: &Digest) -> String {
    format!("{}-{}{TAG_SUFFIX}", image.algorithm(), image.hex())
}

/// The file name of the local record of `image`: `sha256-<hex>.json`.
pub fn file_name_for(image: &Digest) -> String {
    format!("{}-{}.json", image.algorithm(), image.hex())
}

/// Whether `p` is a relative path of plain components: no `..`, no `.`, no empty
/// component, no NUL, not absolute, bounded.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PATH_BYTES
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != ".." && c != ".")
}

impl Record {
    /// A new record for `image`, stamped now.
    pub fn new(image: &Digest) -> Record {
        Record {
            version: VERSION,
            image: image.to_string(),
            created: now_secs(),
            layers: BTreeMap::new(),
            ranges: BTreeMap::new(),
        }
    }

    /// Parses and checks a record for `image`; see the module docs for the bounds.
    pub fn parse(bytes: &[u8], image: &Digest) -> Result<Record, RecordError> {
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len() as u64));
        }
        let r: Record =
            serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
        r.check(image)?;
        Ok(r)
    }

    /// Checks the bounds [`Record::parse`] enforces.
    pub fn check(&self, image: &Digest) -> Result<(), RecordError> {
        if self.version != VERSION {
            return Err(RecordError::Version(self.version));
        }
        if self.image != image.to_string() {
            return Err(RecordError::WrongImage {
                found: self.image.chars().take(200).collect(),
                want: image.to_string(),
            });
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(RecordError::TooManyLayers(self.layers.len()));
        }
        for (layer, files) in &self.layers {
            if Digest::parse(layer).is_err() {
                return Err(RecordError::Digest(layer.chars().take(200).collect()));
            }
            if files.len() > MAX_FILES_PER_LAYER {
                return Err(RecordError::TooManyFiles {
                    layer: layer.clone(),
                    count: files.len(),
                });
            }
            if let Some(p) = files.iter().find(|p| !safe_path(p)) {
                return Err(RecordError::Path(p.chars().take(200).collect()));
            }
        }
        for (layer, per_file) in &self.ranges {
            let bad = |path: &str, why| RecordError::Ranges {
                layer: layer.chars().take(200).collect(),
                path: path.chars().take(200).collect(),
                why,
            };
            let Some(files) = self.layers.get(layer) else {
                return Err(bad("", "layer has no file list"));
            };
            if per_file.len() > files.len() {
                return Err(bad("", "more ranged files than files"));
            }
            for (path, ranges) in per_file {
                if !files.contains(path) {
                    return Err(bad(path, "file not in the layer's list"));
                }
                if ranges.is_empty() || ranges.len() > MAX_RANGES_PER_FILE {
                    return Err(bad(path, "empty or too many ranges"));
                }
                let mut last_end = 0u64;
                for (i, [start, end]) in ranges.iter().enumerate() {
                    if start >= end || (i > 0 && *start <= last_end) {
                        return Err(bad(path, "ranges not sorted, disjoint and non-empty"));
                    }
                    last_end = *end;
                }
            }
        }
        Ok(())
    }

    /// The read ranges kept for `path` of `layer` (`None`: the whole file).
    pub fn ranges_of(&self, layer: &str, path: &str) -> Option<&[[u64; 2]]> {
        self.ranges
            .get(layer)
            .and_then(|m| m.get(path))
            .map(Vec::as_slice)
    }

    /// The record as JSON (what [`Record::parse`] reads).
    pub fn to_json(&self) -> Vec<u8> {
        // A map of strings to string lists always serializes.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Files recorded in all layers.
    pub fn file_count(&self) -> usize {
        self.layers.values().map(Vec::len).sum()
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Digest {
        Digest::sha256(b"manifest")
    }

    fn layer() -> String {
        Digest::sha256(b"layer").to_string()
    }

    #[test]
    fn round_trips_and_names_the_tag() {
        let mut r = Record::new(&image());
        r.layers
            .insert(layer(), vec!["bin/sh".into(), "etc/x".into()]);
        let back = Record::parse(&r.to_json(), &image()).unwrap();
        assert_eq!(back, r);
        assert!(
            !String::from_utf8_lossy(&r.to_json()).contains("ranges"),
            "a record without ranges reads as before"
        );
        r.ranges
            .entry(layer())
            .or_default()
            .insert("etc/x".into(), vec![[0, 4096], [1 << 20, (1 << 20) + 8192]]);
        let back = Record::parse(&r.to_json(), &image()).unwrap();
        assert_eq!(back.ranges_of(&layer(), "etc/x").map(<[_]>::len), Some(2));
        assert_eq!(back.ranges_of(&layer(), "bin/sh"), None);
        let tag = tag_for(&image());
        assert!(tag.starts_with("sha256-") && tag.ends_with(".sgz-prefetch"));
        assert_eq!(tag.len(), 7 + 64 + TAG_SUFFIX.len());
        assert!(tag.len() <= 128, "tags are at most 128 characters");
    }

    #[test]
    fn refuses_hostile_ranges() {
        let mut r = Record::new(&image());
        r.layers.insert(layer(), vec!["f".into()]);
        for bad in [
            vec![],
            vec![[5, 5]],
            vec![[10, 5]],
            vec![[0, 10], [5, 20]],
            vec![[0, 10], [10, 20]],
            vec![[20, 30], [0, 10]],
            (0..MAX_RANGES_PER_FILE as u64 + 1)
                .map(|i| [i * 10, i * 10 + 1])
                .collect(),
        ] {
            r.ranges
                .insert(layer(), BTreeMap::from([("f".into(), bad)]));
            assert!(
                matches!(
                    Record::parse(&r.to_json(), &image()),
                    Err(RecordError::Ranges { .. })
                ),
                "{:?}",
                r.ranges
            );
        }
        r.ranges.insert(
            layer(),
            BTreeMap::from([("not-listed".into(), vec![[0, 1]])]),
        );
        assert!(Record::parse(&r.to_json(), &image()).is_err());
        r.ranges.clear();
        r.ranges.insert(
            Digest::sha256(b"other").to_string(),
            BTreeMap::from([("f".into(), vec![[0, 1]])]),
        );
        assert!(Record::parse(&r.to_json(), &image()).is_err());
    }

    #[test]
    fn refuses_hostile_records() {
        let mut r = Record::new(&image());
        r.layers.insert(layer(), vec!["../etc/shadow".into()]);
        assert!(matches!(
            Record::parse(&r.to_json(), &image()),
            Err(RecordError::Path(_))
        ));
        for bad in ["/abs", "a//b", "a/./b", "", "a/\0"] {
            r.layers.insert(layer(), vec![bad.into()]);
            assert!(Record::parse(&r.to_json(), &image()).is_err(), "{bad:?}");
        }
        r.layers
            .insert(layer(), vec!["f".into(); MAX_FILES_PER_LAYER + 1]);
        assert!(matches!(
            Record::parse(&r.to_json(), &image()),
            Err(RecordError::TooManyFiles { .. })
        ));
        r.layers.clear();
        r.layers.insert("sha256:nothex".into(), vec![]);
        assert!(matches!(
            Record::parse(&r.to_json(), &image()),
            Err(RecordError::Digest(_))
        ));
        assert!(matches!(
            Record::parse(b"{not json", &image()),
            Err(RecordError::Json(_))
        ));
        let other = Record::new(&Digest::sha256(b"other"));
        assert!(matches!(
            Record::parse(&other.to_json(), &image()),
            Err(RecordError::WrongImage { .. })
        ));
        let huge = vec![b' '; MAX_RECORD_BYTES as usize + 1];
        assert!(matches!(
            Record::parse(&huge, &image()),
            Err(RecordError::TooLarge(_))
        ));
    }
}
