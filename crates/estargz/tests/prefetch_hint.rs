//! The `prefetch-end` annotation the builder writes: exactly the blob bytes a reader
//! must fetch to have every prioritized chunk whole, for both codecs; 0 without
//! prioritized files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use estargz::{BuildOptions, Codec, OpenOptions, Reader, PREFETCH_END_ANNOTATION};

fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn files() -> Vec<(String, Vec<u8>)> {
    (0..12u32)
        .map(|i| {
            let data = (0..40_000 + i * 3_000)
                .map(|j| (j.wrapping_mul(2654435761) >> (i % 7)) as u8)
                .collect();
            (format!("d/f{i}"), data)
        })
        .collect()
}

fn build(prioritized: &[&str], codec: Codec) -> (Vec<u8>, u64) {
    let mut blob = Vec::new();
    let opts = BuildOptions {
        codec,
        chunk_size: 16 << 10,
        prioritized_files: prioritized.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let out = estargz::build(&tar_of(&files())[..], &mut blob, &opts).unwrap();
    let hint = out.annotations[PREFETCH_END_ANNOTATION].parse().unwrap();
    (blob, hint)
}

#[test]
fn hint_covers_exactly_the_prioritized_chunks() {
    for codec in [Codec::Gzip { level: 6 }, Codec::Zstd { level: 3 }] {
        let (blob, hint) = build(&["d/f5", "d/f2", "d/f9"], codec);
        let r = Reader::open(&blob, &OpenOptions::default()).unwrap();
        let end = r.index.prefetch_end.expect("prioritized files");
        // What a prefetch of the prioritized chunks reads: up to the end of the last one.
        let need = r
            .index
            .nodes()
            .flat_map(|(_, n)| n.chunks.iter())
            .filter(|c| c.blob_offset < end)
            .map(|c| c.blob_end)
            .max()
            .unwrap();
        assert_eq!(hint, need, "{codec:?}");
        assert!(
            hint < r.payload_end(),
            "{codec:?}: stops before the rest of the layer"
        );
        // Reading the TOC again gives the same value (what conversion reuses).
        let (r2, toc) = Reader::open_with_toc(&blob, &OpenOptions::default()).unwrap();
        assert_eq!(toc.prefetch_end_hint(r2.payload_end()), Some(hint));
    }
}

#[test]
fn no_prioritized_files_hint_zero() {
    for codec in [Codec::Gzip { level: 6 }, Codec::Zstd { level: 3 }] {
        let (_, hint) = build(&[], codec);
        assert_eq!(hint, 0, "{codec:?}");
    }
}
