//! The `toc-tail` annotation the builder writes: exactly the bytes at the blob's end a
//! reader needs for footer and TOC, so that one read of that size opens the blob, for
//! both codecs and for a TOC kept outside the blob.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

use std::sync::{Arc, Mutex};

use estargz::{
    BlobSource, BuildOptions, Codec, OpenOptions, Reader, MANIFEST_POSITION_ANNOTATION,
    TOC_TAIL_ANNOTATION,
};

fn tar_of(n: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let data: Vec<u8> = (0..200 + i % 300)
            .map(|j| (j.wrapping_mul(2654435761).wrapping_add(i) >> 7) as u8)
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, format!("d{}/f{i}", i % 10), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

/// A blob in memory that notes every read asked of it.
struct Logged {
    blob: Vec<u8>,
    reads: Mutex<Vec<(u64, usize)>>,
}

impl BlobSource for Logged {
    fn size(&self) -> u64 {
        self.blob.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.reads.lock().unwrap().push((offset, len));
        self.blob.read_at(offset, len)
    }
}

#[test]
fn one_read_of_the_annotated_tail_opens_the_blob() {
    for codec in [Codec::Gzip { level: 6 }, Codec::Zstd { level: 3 }] {
        let mut blob = Vec::new();
        let opts = BuildOptions {
            codec,
            ..Default::default()
        };
        let out = estargz::build(&tar_of(3000)[..], &mut blob, &opts).unwrap();
        let tail: u64 = out.annotations[TOC_TAIL_ANNOTATION].parse().unwrap();
        let r = Reader::open(&blob, &OpenOptions::default()).unwrap();
        assert_eq!(tail, blob.len() as u64 - r.toc_range.start, "{codec:?}");
        // Big enough that the default first read would not hold it.
        assert!(tail > 64 << 10, "{codec:?}: {tail}");
        if let Codec::Zstd { .. } = codec {
            // zstd:chunked's own position annotation says the same.
            let position = &out.annotations[MANIFEST_POSITION_ANNOTATION];
            let offset: u64 = position.split(':').next().unwrap().parse().unwrap();
            assert_eq!(blob.len() as u64 - offset, tail);
        }

        let src = Logged {
            blob: blob.clone(),
            reads: Mutex::default(),
        };
        let opts = OpenOptions {
            tail_size: tail,
            expected_toc_digest: Some(out.toc_digest.clone()),
            ..OpenOptions::default()
        };
        let r = Reader::open(&src, &opts).unwrap();
        assert!(r.index.lookup("d3/f13").is_some());
        assert_eq!(
            *src.reads.lock().unwrap(),
            vec![(blob.len() as u64 - tail, tail as usize)],
            "{codec:?}"
        );

        // One byte short: a second read brings the TOC.
        let src = Logged {
            blob,
            reads: Mutex::default(),
        };
        let opts = OpenOptions {
            tail_size: tail - 1,
            expected_toc_digest: Some(out.toc_digest.clone()),
            ..OpenOptions::default()
        };
        Reader::open(&src, &opts).unwrap();
        assert_eq!(src.reads.lock().unwrap().len(), 2, "{codec:?}");
    }
}

#[test]
fn an_external_toc_leaves_only_the_footer_at_the_end() {
    let mut blob = Vec::new();
    let opts = BuildOptions {
        codec: Codec::Gzip { level: 6 },
        external_toc: true,
        ..Default::default()
    };
    let out = estargz::build(&tar_of(50)[..], &mut blob, &opts).unwrap();
    let tail: u64 = out.annotations[TOC_TAIL_ANNOTATION].parse().unwrap();
    assert_eq!(tail, estargz::EXTERNAL_TOC_FOOTER_SIZE as u64);
    let toc = out.external_toc.unwrap();
    let opts = OpenOptions {
        tail_size: tail,
        expected_toc_digest: Some(out.toc_digest),
        external_toc: Some(Arc::new(move || Ok(toc.clone()))),
        ..OpenOptions::default()
    };
    let src = Logged {
        blob,
        reads: Mutex::default(),
    };
    Reader::open(&src, &opts).unwrap();
    assert_eq!(src.reads.lock().unwrap().len(), 1);
}
