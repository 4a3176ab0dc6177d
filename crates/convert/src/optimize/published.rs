//! The learned-prefetch record an optimization yields for the image it wrote: per
//! converted layer, the files the workload read in first-access order and, for each,
//! the byte ranges read (recorded through the trace mounts), so a daemon pulling the
//! optimized image prefetches the bytes the workload needs rather than the whole files
//! the landmark region holds.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use registry::{Digest, Platform};
use remote_layer::prefetch_record::{Record, MAX_FILES_PER_LAYER, MAX_RANGES_PER_FILE};

use crate::optimize::record::RecordEntry;
use crate::ConvertReport;

/// Files read through one source layer, in first-read order, each with the byte ranges
/// read from it (sorted, disjoint).
pub type ReadRanges = Vec<(String, Vec<Range<u64>>)>;

/// The record of what the workload read, addressed to the image manifest `report`
/// wrote for this host and to its converted layers; `None` when the conversion wrote
/// no manifest for this host or nothing was read. `entries` gives the order (fanotify's
/// first accesses) and `ranges` the bytes, per source layer digest; files only the
/// trace mounts saw follow the ordered ones.
pub fn prefetch_record(
    report: &ConvertReport,
    layer_digests: &[Digest],
    entries: &[RecordEntry],
    ranges: &HashMap<Digest, ReadRanges>,
) -> Option<Record> {
    let image = host_manifest(report)?;
    let converted: HashMap<&Digest, &Digest> = report
        .layers
        .iter()
        .map(|l| (&l.source, &l.digest))
        .collect();
    let mut rec = Record::new(&image);
    for (index, source) in layer_digests.iter().enumerate() {
        let Some(target) = converted.get(source) else {
            continue;
        };
        let target = target.to_string();
        let mut paths: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let read = ranges.get(source);
        let ordered = entries
            .iter()
            .filter(|e| e.layer_index == Some(index))
            .map(|e| e.path.as_str());
        let traced = read.into_iter().flatten().map(|(p, _)| p.as_str());
        for p in ordered.chain(traced) {
            if paths.len() >= MAX_FILES_PER_LAYER {
                break;
            }
            if seen.insert(p) {
                paths.push(p.to_string());
            }
        }
        if paths.is_empty() {
            continue;
        }
        let mut layer_ranges = BTreeMap::new();
        for (p, rs) in read.into_iter().flatten() {
            if !seen.contains(p.as_str()) || rs.is_empty() {
                continue;
            }
            if let Some(kept) = bounded(rs) {
                layer_ranges.insert(p.clone(), kept);
            }
        }
        if !layer_ranges.is_empty() {
            rec.ranges.insert(target.clone(), layer_ranges);
        }
        rec.layers.insert(target, paths);
    }
    if rec.layers.is_empty() {
        return None;
    }
    // What the daemons will check; a record that fails here is not published.
    match rec.check(&image) {
        Ok(()) => Some(rec),
        Err(e) => {
            tracing::warn!(error = %e, "the optimization's prefetch record is not valid; none written");
            None
        }
    }
}

/// `rs` as the record keeps them: sorted, merged, non-empty; `None` (the file counts as
/// read whole) past [`MAX_RANGES_PER_FILE`].
fn bounded(rs: &[Range<u64>]) -> Option<Vec<[u64; 2]>> {
    let mut sorted: Vec<Range<u64>> = rs.iter().filter(|r| r.start < r.end).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<[u64; 2]> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start <= last[1] => last[1] = last[1].max(r.end),
            _ => out.push([r.start, r.end]),
        }
    }
    (!out.is_empty() && out.len() <= MAX_RANGES_PER_FILE).then_some(out)
}

/// The digest of the image manifest written for this host: the only one, or the one
/// whose platform matches.
fn host_manifest(report: &ConvertReport) -> Option<Digest> {
    let host = Platform::host();
    match report.manifests.as_slice() {
        [] => None,
        [only] if only.platform.is_none() => Some(only.digest.clone()),
        many => many
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| host.matches(p)))
            .map(|d| d.digest.clone()),
    }
}

#[cfg(test)]
#[allow(
    clippy::single_range_in_vec_init,
    reason = "one-range lists of byte ranges are what is being tested"
)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn report(manifest: Digest, layers: &[(Digest, Digest)]) -> ConvertReport {
        ConvertReport {
            digest: manifest.clone(),
            media_type: registry::OCI_MANIFEST.into(),
            manifests: vec![registry::Descriptor {
                digest: manifest,
                ..registry::Descriptor::for_bytes(registry::OCI_MANIFEST, b"{}")
            }],
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, (s, d))| crate::LayerEvent {
                    index: i + 1,
                    total: layers.len(),
                    source: s.clone(),
                    outcome: crate::Outcome::Converted,
                    digest: d.clone(),
                    size: 1,
                    uploaded: true,
                    elapsed: std::time::Duration::ZERO,
                })
                .collect(),
            toc_image: None,
        }
    }

    fn entry(path: &str, layer: usize) -> RecordEntry {
        RecordEntry {
            path: path.into(),
            manifest_digest: None,
            layer_index: Some(layer),
        }
    }

    #[test]
    fn record_names_converted_layers_in_access_order_with_ranges() {
        let (s0, s1, d0, d1, m) = (
            digest('a'),
            digest('b'),
            digest('c'),
            digest('d'),
            digest('e'),
        );
        let rep = report(
            m.clone(),
            &[(s0.clone(), d0.clone()), (s1.clone(), d1.clone())],
        );
        let entries = vec![
            entry("bin/app", 1),
            entry("lib/libc.so", 0),
            entry("big.dat", 1),
        ];
        let mut ranges = HashMap::new();
        ranges.insert(
            s1.clone(),
            vec![
                (
                    "big.dat".to_string(),
                    vec![8192..12288, 0..4096, 4096..6000],
                ),
                ("bin/app".to_string(), [0..100].to_vec()),
                ("etc/traced-only".to_string(), [0..10].to_vec()),
            ],
        );
        let rec = prefetch_record(&rep, &[s0, s1], &entries, &ranges).unwrap();
        assert_eq!(rec.image, m.to_string());
        assert_eq!(rec.layers[&d0.to_string()], ["lib/libc.so"]);
        assert_eq!(
            rec.layers[&d1.to_string()],
            ["bin/app", "big.dat", "etc/traced-only"]
        );
        let big = rec.ranges_of(&d1.to_string(), "big.dat").unwrap();
        assert_eq!(big, [[0, 6000], [8192, 12288]]);
        assert!(!rec.ranges.contains_key(&d0.to_string()));
        // What a daemon accepts.
        Record::parse(&rec.to_json(), &m).unwrap();
    }

    #[test]
    fn too_many_ranges_mean_the_whole_file() {
        let many: Vec<Range<u64>> = (0..(MAX_RANGES_PER_FILE as u64 + 1))
            .map(|i| i * 10..i * 10 + 1)
            .collect();
        assert_eq!(bounded(&many), None);
        assert_eq!(bounded(&[5..5]), None);
        assert_eq!(bounded(&[0..2, 1..3]), Some(vec![[0, 3]]));
    }

    #[test]
    fn no_manifest_for_this_host_means_no_record() {
        let (s0, d0, m) = (digest('a'), digest('c'), digest('e'));
        let mut rep = report(m, &[(s0.clone(), d0)]);
        rep.manifests[0].platform = Some(Platform::parse("plan9/mips").unwrap());
        assert!(prefetch_record(&rep, &[s0], &[entry("x", 0)], &HashMap::new()).is_none());
        rep.manifests.clear();
        assert!(prefetch_record(&rep, &[], &[], &HashMap::new()).is_none());
    }
}
