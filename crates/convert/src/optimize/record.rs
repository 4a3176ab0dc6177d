//! The access record: which files the workload touched, as JSON lines compatible
//! with the reference's `--record-out` (`{"path":..., "manifestDigest":..., "layerIndex":...}`).

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One accessed file, in first-access order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    /// Path relative to the rootfs, without a leading slash.
    pub path: String,
    /// The image manifest the layer belongs to.
    #[serde(
        rename = "manifestDigest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub manifest_digest: Option<String>,
    /// Index of the topmost layer providing the file, in the manifest's order.
    #[serde(
        rename = "layerIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub layer_index: Option<usize>,
}

/// Writes `entries` as JSON lines to `path`.
pub fn write_record(path: &Path, entries: &[RecordEntry]) -> Result<()> {
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for e in entries {
        serde_json::to_writer(&mut out, e)
            .map_err(|e| Error::Options(format!("encoding the record: {e}")))?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Reads a record written by [`write_record`] (or the reference).
pub fn read_record(path: &Path) -> Result<Vec<RecordEntry>> {
    let io = |e| Error::io(format!("reading {}", path.display()), e);
    let f = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut out = Vec::new();
    for (n, line) in f.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let e: RecordEntry = serde_json::from_str(&line)
            .map_err(|e| Error::Options(format!("{} line {}: {e}", path.display(), n + 1)))?;
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_the_reference_form() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        let entries = vec![
            RecordEntry {
                path: "bin/sh".into(),
                manifest_digest: Some("sha256:00".into()),
                layer_index: Some(0),
            },
            RecordEntry {
                path: "data/a".into(),
                manifest_digest: None,
                layer_index: None,
            },
        ];
        write_record(&p, &entries).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with(r#"{"path":"bin/sh","manifestDigest":"sha256:00","layerIndex":0}"#)
        );
        assert_eq!(read_record(&p).unwrap(), entries);
    }
}
