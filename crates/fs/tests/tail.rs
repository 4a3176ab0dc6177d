//! The first read of a layer at its blob's end, sized from the descriptor (our
//! converter's `toc-tail`, zstd:chunked's manifest position) or from a size remembered
//! for the repository, seen in the request log of a front before a real registry on
//! loopback: one request of exactly the TOC and footer, and wrong hints that still open.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use fs::{Config, RegistryFetcher};
use remote_layer::annotation::{toc_tail, TOC_TAIL, ZSTD_CHUNKED_MANIFEST_POSITION};

/// A layer of `n` small files: its TOC, one entry (and two digests) per file, is far
/// bigger than the default first read once `n` is in the thousands.
fn many_files(n: u64, seed: u64, codec: estargz::Codec) -> (Blob, Vec<Entry>) {
    let mut entries: Vec<Entry> = (0..16)
        .map(|d| Entry::new(&format!("d{d:02}"), Kind::Dir))
        .collect();
    for i in 0..n {
        entries.push(Entry::new(
            &format!("d{:02}/file-{seed}-{i:05}", i % 16),
            Kind::Reg(pseudo_random(60 + (i % 200) as usize, seed * 1_000_000 + i)),
        ));
    }
    let blob = make_blob_with(
        &entries,
        estargz::BuildOptions {
            codec,
            ..Default::default()
        },
    );
    (blob, entries)
}

/// Where the blob's TOC starts, read from the blob itself.
fn toc_start(blob: &Blob) -> u64 {
    let src = estargz::FileBlob::open(&blob.path).expect("blob");
    estargz::read_toc(&src, &estargz::OpenOptions::default())
        .expect("TOC")
        .range
        .start
}

/// A registry on loopback, and the blobs pushed to it.
struct Env {
    reg: testenv::Registry,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn start(blobs: &[(&Blob, &str)]) -> Option<Env> {
        init_tracing();
        let reg = testenv::Registry::start(testenv::RegistryOpts::default())?;
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        for (blob, repo) in blobs {
            let bytes = std::fs::read(&blob.path).expect("blob");
            let digest = rt.block_on(testenv::push_blob(&reg.base_url(), repo, &bytes));
            assert_eq!(digest, blob.desc.digest);
        }
        Some(Env { reg, rt })
    }

    /// Opens `blob` of `repo` with `desc` through a fresh front; the opened layer, the
    /// `Range` headers of the blob GETs the open made, and the front (later reads of
    /// the layer go through it).
    fn open(&self, blob: &Blob, repo: &str, desc: fs::LayerDesc) -> Opened {
        self.open_cached(blob, repo, desc, fs::ChunkCache::memory(64 << 20))
    }

    /// [`Env::open`] with `cache`.
    fn open_cached(
        &self,
        blob: &Blob,
        repo: &str,
        desc: fs::LayerDesc,
        cache: fs::ChunkCache,
    ) -> Opened {
        let front = self.rt.block_on(testenv::Front::start(testenv::FrontOpts {
            upstream: self.reg.base_url(),
            ..Default::default()
        }));
        let client = registry::Client::new(
            registry::RegistryConfig::default(),
            Arc::new(registry::Anonymous),
        )
        .expect("client");
        let reference = registry::Reference::parse(&format!("{}/{repo}:latest", front.host()))
            .expect("reference");
        let reader = client.blob_reader(
            &reference,
            registry::Digest::parse(&blob.desc.digest).expect("digest"),
            Some(blob.desc.size),
        );
        let fetcher = Arc::new(RegistryFetcher::with_size(
            reader,
            self.rt.handle().clone(),
            blob.desc.size,
        ));
        let cfg = Config {
            noprefetch: true,
            no_background_fetch: true,
            ..Config::default()
        };
        let layer = fs::Layer::open(fetcher, desc, &cfg, Arc::new(cache)).expect("open");
        let log = front.stats.log.lock().expect("log");
        let ranges = log
            .iter()
            .filter(|l| l.method == "GET" && l.path.contains("/blobs/sha256:"))
            .map(|l| l.range.clone().unwrap_or_else(|| "(whole blob)".into()))
            .collect();
        drop(log);
        (layer, ranges, front)
    }
}

type Opened = (fs::Layer, Vec<String>, testenv::Front);

/// The layer reads its files right (through chunks fetched after the open).
fn reads_right(layer: &fs::Layer, entries: &[Entry]) {
    for e in entries.iter().step_by(997) {
        if let Kind::Reg(data) = &e.kind {
            let id = layer.index().lookup(&e.path).expect("file");
            assert_eq!(
                &layer.read(id, 0, 1 << 20).expect("read"),
                data,
                "{}",
                e.path
            );
        }
    }
}

fn with_tail(blob: &Blob, annotations: &BTreeMap<String, String>) -> fs::LayerDesc {
    fs::LayerDesc {
        toc_tail: toc_tail(annotations, blob.desc.size),
        ..blob.desc.clone()
    }
}

fn range(from: u64, size: u64) -> String {
    format!("bytes={from}-{}", size - 1)
}

#[test]
fn the_annotated_tail_is_one_request_of_exactly_toc_and_footer() {
    let (blob, entries) = many_files(14000, 1, estargz::Codec::Gzip { level: 6 });
    let Some(env) = Env::start(&[(&blob, "tail/annotated")]) else {
        return;
    };
    let size = blob.desc.size;
    let tail: u64 = blob.annotations[TOC_TAIL].parse().expect("toc-tail");
    assert_eq!(tail, size - toc_start(&blob));
    assert!(
        tail > fs::layer::TAIL_READ + (64 << 10) && tail < size,
        "TOC and footer {tail} of {size}"
    );

    let (layer, ranges, _front) =
        env.open(&blob, "tail/annotated", with_tail(&blob, &blob.annotations));
    assert_eq!(ranges, vec![range(size - tail, size)]);
    assert_eq!(layer.toc_tail(), tail);
    reads_right(&layer, &entries);

    // Without the annotation: the default read, then the TOC.
    let (_, ranges, _) = env.open(&blob, "tail/annotated", blob.desc.clone());
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], range(size - fs::layer::TAIL_READ, size));
}

#[test]
fn wrong_tail_annotations_still_open() {
    let (blob, entries) = many_files(14000, 2, estargz::Codec::Gzip { level: 6 });
    let Some(env) = Env::start(&[(&blob, "tail/wrong")]) else {
        return;
    };
    let size = blob.desc.size;
    let tail = size - toc_start(&blob);
    let default = range(size - fs::layer::TAIL_READ, size);
    let cases: [(&str, Vec<String>); 7] = [
        // Not a tail at all: ignored, the default read.
        ("0", vec![default.clone()]),
        ("lots", vec![default.clone()]),
        ("-1", vec![default.clone()]),
        // Too small: the footer first, then the TOC.
        ("1", vec![range(size - 51, size)]),
        ("5000", vec![range(size - 5000, size)]),
        // Larger than the blob: the whole blob, in one request.
        ("99999999999", vec![range(0, size)]),
        (&format!("{}", size + 1), vec![range(0, size)]),
    ];
    for (value, first) in cases {
        let mut a = blob.annotations.clone();
        a.insert(TOC_TAIL.into(), value.into());
        let (layer, ranges, _front) = env.open(&blob, "tail/wrong", with_tail(&blob, &a));
        assert_eq!(ranges[0], first[0], "toc-tail {value}: {ranges:?}");
        let want = if first[0] == range(0, size) { 1 } else { 2 };
        assert_eq!(ranges.len(), want, "toc-tail {value}: {ranges:?}");
        if want == 2 {
            // The second read is the TOC alone.
            assert_eq!(ranges[1], format!("bytes={}-{}", size - tail, size - 52));
        }
        assert_eq!(layer.toc_tail(), tail);
        reads_right(&layer, &entries);
    }
}

#[test]
fn zstd_chunked_tail_comes_from_the_manifest_position() {
    let (blob, entries) = many_files(14000, 3, estargz::Codec::Zstd { level: 3 });
    let Some(env) = Env::start(&[(&blob, "tail/zstd")]) else {
        return;
    };
    let size = blob.desc.size;
    let position = blob.annotations[ZSTD_CHUNKED_MANIFEST_POSITION].clone();
    let offset: u64 = position.split(':').next().unwrap().parse().unwrap();
    assert_eq!(offset, toc_start(&blob));
    assert!(size - offset > fs::layer::TAIL_READ + (64 << 10));
    // As another tool writes it: the manifest position and no `toc-tail`.
    let mut a = blob.annotations.clone();
    a.remove(TOC_TAIL);
    let (layer, ranges, _front) = env.open(&blob, "tail/zstd", with_tail(&blob, &a));
    assert_eq!(ranges, vec![range(offset, size)]);
    reads_right(&layer, &entries);
}

#[test]
fn a_repository_teaches_its_tail_to_its_next_layer() {
    let (first, _) = many_files(14000, 4, estargz::Codec::Gzip { level: 6 });
    let (second, entries) = many_files(13000, 5, estargz::Codec::Gzip { level: 6 });
    let repo = "tail/remembered";
    let Some(env) = Env::start(&[(&first, repo), (&second, repo)]) else {
        return;
    };
    let tails = fs::TailSizes::new();
    let key = format!("{}/{repo}", env.reg.host());
    // Neither layer carries an annotation (converted by another tool).
    let desc = fs::LayerDesc {
        toc_tail: tails.hint(&key, None),
        ..first.desc.clone()
    };
    let (layer, ranges, _front) = env.open(&first, repo, desc);
    assert_eq!(ranges.len(), 2, "nothing known yet: {ranges:?}");
    tails.learn(&key, layer.toc_tail());
    assert_eq!(layer.toc_tail(), first.desc.size - toc_start(&first));

    let size = second.desc.size;
    let tail = size - toc_start(&second);
    assert!(tail > fs::layer::TAIL_READ);
    let desc = fs::LayerDesc {
        toc_tail: tails.hint(&key, None),
        ..second.desc.clone()
    };
    let guess = desc.toc_tail.expect("a remembered size");
    let (layer, ranges, _front) = env.open(&second, repo, desc);
    assert_eq!(ranges, vec![range(size - guess, size)]);
    assert!(size - guess <= size - tail);
    reads_right(&layer, &entries);
    // Another repository learns nothing from this one.
    assert_eq!(tails.hint(&format!("{}/other", env.reg.host()), None), None);
}

/// Footer and TOC kept in a directory cache serve a reopen whose first read is sized
/// differently (the 512 KiB read of a version without the hint, the annotated size now,
/// or a remembered size that changed): the reopen fetches nothing.
#[test]
fn a_reopen_with_another_tail_size_needs_no_network() {
    let (blob, entries) = many_files(14000, 6, estargz::Codec::Gzip { level: 6 });
    let Some(env) = Env::start(&[(&blob, "tail/reopen")]) else {
        return;
    };
    let hinted = with_tail(&blob, &blob.annotations);
    assert!(hinted.toc_tail.is_some());
    let unhinted = blob.desc.clone();
    for (first, then) in [(&unhinted, &hinted), (&hinted, &unhinted)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = || fs::ChunkCache::directory(dir.path(), 1 << 20).expect("cache");
        let (_, ranges, _) = env.open_cached(&blob, "tail/reopen", first.clone(), cache());
        assert!(!ranges.is_empty());
        let (layer, ranges, _front) = env.open_cached(&blob, "tail/reopen", then.clone(), cache());
        assert_eq!(
            ranges,
            Vec::<String>::new(),
            "{:?} after {:?}",
            then.toc_tail,
            first.toc_tail
        );
        reads_right(&layer, &entries);
    }
}
