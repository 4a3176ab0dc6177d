//! The layer API without FUSE: formats, shared members, verification switches.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]
#![allow(
    clippy::single_range_in_vec_init,
    reason = "one-range lists of byte ranges are what is being tested"
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fs::{ChunkCache, Config, Layer};

fn entries() -> Vec<Entry> {
    let mut v = vec![Entry::new("d", Kind::Dir)];
    for i in 0..40u64 {
        let len = [0usize, 1, 700, 5_000, 70_000, 200_000][i as usize % 6];
        v.push(Entry::new(
            &format!("d/f{i}"),
            Kind::Reg(pseudo_random(len, 1000 + i)),
        ));
    }
    v
}

fn read_all_and_compare(layer: &Layer, entries: &[Entry]) {
    for e in entries {
        let Kind::Reg(d) = &e.kind else { continue };
        let id = layer.index().lookup(&e.path).expect("in index");
        let whole = layer.read(id, 0, d.len() as u32 + 10).expect("read");
        assert!(whole == *d, "{} differs", e.path);
        if d.len() > 100 {
            let mid = d.len() as u64 / 3;
            let part = layer.read(id, mid, 77).expect("read part");
            assert!(part == d[mid as usize..mid as usize + 77]);
        }
    }
}

fn open(blob: &Blob, cfg: &Config) -> (Arc<TestFetcher>, Arc<Layer>) {
    let fetcher = TestFetcher::open(&blob.path);
    // No quiet period: these tests run background fetch right after opening.
    let cache = Arc::new(ChunkCache::memory(64 << 20).with_background_quiet(Duration::ZERO));
    let layer = Layer::open(fetcher.clone(), blob.desc.clone(), cfg, cache).expect("open");
    (fetcher, Arc::new(layer))
}

fn pool() -> fs::FetchPool {
    fs::FetchPool::shared().expect("pool")
}

/// The layer of `blob` at the default configuration, to share between threads.
fn shared_layer(fetcher: Arc<dyn fs::Fetcher>, blob: &Blob, cache: ChunkCache) -> Arc<Layer> {
    let layer = Layer::open(
        fetcher,
        blob.desc.clone(),
        &Config::default(),
        Arc::new(cache),
    );
    Arc::new(layer.expect("open"))
}

/// Background fetch of a layer holds off while reads keep coming, and fills the layer
/// once they stopped for the quiet period.
#[test]
fn background_fetch_waits_until_reads_quiet_down() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &[]);
    let fetcher = TestFetcher::open(&blob.path);
    let cache = ChunkCache::memory(64 << 20).with_background_quiet(Duration::from_millis(1500));
    let layer = shared_layer(fetcher.clone(), &blob, cache);
    let bg = {
        let layer = layer.clone();
        std::thread::spawn(move || layer.background_fetch(&pool(), 2))
    };
    let fetched = |layer: &Layer| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&layer.state_json()).expect("json");
        v["fetchedSize"].as_u64().expect("fetchedSize")
    };
    let one_file = {
        let id = layer.index().lookup("d/f4").expect("f4");
        layer.read(id, 0, 10).expect("read");
        fetched(&layer)
    };
    // A second of reads of the same (cached) file: the layer is never quiet.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let id = layer.index().lookup("d/f4").expect("f4");
        layer.read(id, 0, 10).expect("read");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fetched(&layer),
        one_file,
        "background fetch ran while reads went on"
    );
    assert!(!layer.is_complete());
    assert!(
        bg.join().expect("background thread"),
        "background fetch failed"
    );
    assert!(layer.is_complete());
    assert!(fetched(&layer) > one_file);
}

#[test]
fn zstd_chunked_layer_reads() {
    init_tracing();
    let e = entries();
    let blob = make_blob_with(
        &e,
        estargz::BuildOptions {
            codec: estargz::Codec::Zstd { level: 3 },
            chunk_size: 64 << 10,
            ..Default::default()
        },
    );
    let (_, layer) = open(&blob, &Config::default());
    read_all_and_compare(&layer, &e);
}

#[test]
fn small_files_sharing_members_read_correctly() {
    init_tracing();
    let e = entries();
    let blob = make_blob_with(
        &e,
        estargz::BuildOptions {
            chunk_size: 64 << 10,
            min_chunk_size: 16 << 10,
            ..Default::default()
        },
    );
    let (_, layer) = open(&blob, &Config::default());
    read_all_and_compare(&layer, &e);
    assert!(layer.background_fetch(&pool(), 2));
    assert_eq!(layer.fetched_bytes(), blob.desc.size);
}

#[test]
fn disable_verification_still_reads() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &[]);
    let mut desc = blob.desc.clone();
    desc.toc_digest = None;
    let cfg = Config {
        disable_verification: true,
        ..Config::default()
    };
    let fetcher = TestFetcher::open(&blob.path);
    let layer =
        Layer::open(fetcher, desc, &cfg, Arc::new(ChunkCache::memory(64 << 20))).expect("open");
    read_all_and_compare(&layer, &e);
}

#[test]
fn background_fetch_fills_every_chunk_then_reads_are_local() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &[]);
    let (fetcher, layer) = open(&blob, &Config::default());
    assert!(layer.background_fetch(&pool(), 3));
    assert!(layer.is_complete());
    let before = fetcher.requests();
    read_all_and_compare(&layer, &e);
    assert_eq!(fetcher.requests(), before);
    let v: serde_json::Value = serde_json::from_slice(&layer.state_json()).expect("json");
    assert_eq!(v["fetchedPercent"].as_f64(), Some(100.0));
}

#[test]
fn fetch_errors_are_reported_not_hung() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &[]);
    let (fetcher, layer) = open(&blob, &Config::default());
    fetcher
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let id = layer.index().lookup("d/f4").expect("f4");
    let err = layer.read(id, 0, 100).expect_err("fails");
    assert!(matches!(err, fs::Error::Fetch { .. }), "{err}");
    assert!(!layer.background_fetch(&pool(), 2));
    assert!(!layer.is_complete());
}

#[test]
fn cached_toc_is_reused_and_replaced_when_damaged() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(ChunkCache::directory(dir.path(), 1 << 20).expect("cache"));
    let cfg = Config::default();
    let f1 = TestFetcher::open(&blob.path);
    Layer::open(f1.clone(), blob.desc.clone(), &cfg, cache.clone()).expect("open");
    assert_eq!(f1.requests(), 1);

    let f2 = TestFetcher::open(&blob.path);
    Layer::open(f2.clone(), blob.desc.clone(), &cfg, cache.clone()).expect("reopen");
    assert_eq!(f2.requests(), 0, "footer and TOC come from the cache");

    for entry in std::fs::read_dir(dir.path().join("ranges")).expect("ranges") {
        let p = entry.expect("entry").path();
        let mut d = std::fs::read(&p).expect("read");
        let n = d.len();
        d[n - 100] ^= 0xff;
        std::fs::write(&p, d).expect("damage");
    }
    let f3 = TestFetcher::open(&blob.path);
    let layer = Layer::open(f3.clone(), blob.desc.clone(), &cfg, cache).expect("recovers");
    assert_eq!(f3.requests(), 1, "a damaged cached TOC is fetched again");
    read_all_and_compare(&layer, &e);
}

#[test]
fn handles_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<fs::MountHandle>();
    send_sync::<Layer>();
    send_sync::<ChunkCache>();
    send_sync::<fs::RegistryFetcher>();
}

/// Hands a range over in two halves and holds the second back until released (or for
/// at most 20 s, so a broken build fails instead of hanging).
struct HalvesFetcher {
    inner: fs::FileFetcher,
    release: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    first_half_sent: std::sync::atomic::AtomicBool,
}

impl fs::Fetcher for HalvesFetcher {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_ranges(&self, ranges: &[std::ops::Range<u64>]) -> std::io::Result<Vec<bytes::Bytes>> {
        self.inner.read_ranges(ranges)
    }
    fn read_ranges_streaming(
        &self,
        ranges: &[std::ops::Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let [range] = ranges else {
            return self.inner.read_ranges_streaming(ranges, sink);
        };
        let data = self
            .inner
            .read_ranges(std::slice::from_ref(range))?
            .remove(0);
        let half = data.len() / 2;
        sink(range.start, &data[..half])?;
        self.first_half_sent
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let released = self.release.lock().expect("lock");
        let _unused = self
            .cv
            .wait_timeout_while(released, Duration::from_secs(20), |r| !*r)
            .expect("wait");
        sink(range.start + half as u64, &data[half..])
    }
}

/// The chunks at the front of a large fetch are readable while the rest is still on
/// its way.
#[test]
fn front_of_a_window_is_readable_before_the_window_completes() {
    init_tracing();
    let e: Vec<Entry> = (0..20u64)
        .map(|i| {
            Entry::new(
                &format!("p{i:02}"),
                Kind::Reg(pseudo_random(50_000, 70 + i)),
            )
        })
        .collect();
    let names: Vec<String> = e.iter().map(|e| e.path.clone()).collect();
    let prioritized: Vec<&str> = names.iter().map(String::as_str).collect();
    let blob = make_blob(&e, 64 << 10, &prioritized);
    let fetcher = Arc::new(HalvesFetcher {
        inner: fs::FileFetcher::open(&blob.path).expect("blob"),
        release: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
        first_half_sent: std::sync::atomic::AtomicBool::new(false),
    });
    let layer = shared_layer(fetcher.clone(), &blob, ChunkCache::memory(64 << 20));
    assert!(layer.index().prefetch_end.is_some());
    let prefetch = {
        let layer = layer.clone();
        std::thread::spawn(move || layer.prefetch())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fetcher
        .first_half_sent
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        assert!(Instant::now() < deadline, "prefetch never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The first prioritized file lies in the first half of the prefetch window.
    let Kind::Reg(want) = &e[0].kind else {
        panic!("not a file")
    };
    let id = layer.index().lookup("p00").expect("p00");
    let got = layer.read(id, 0, want.len() as u32).expect("read");
    assert!(&got == want);
    assert!(
        !*fetcher.release.lock().expect("lock"),
        "the read waited for the whole window"
    );
    *fetcher.release.lock().expect("lock") = true;
    fetcher.cv.notify_all();
    prefetch.join().expect("prefetch thread").expect("prefetch");
    let Kind::Reg(last) = &e[19].kind else {
        panic!("not a file")
    };
    let id = layer.index().lookup("p19").expect("p19");
    assert!(&layer.read(id, 0, last.len() as u32).expect("read") == last);
}

/// Reads that walk the prefetched files while the prefetch still streams them in are
/// not misses to read ahead of: no read-ahead range comes back until the prefetch ends.
#[test]
fn no_read_ahead_while_the_prefetch_streams_in() {
    init_tracing();
    let e: Vec<Entry> = (0..20u64)
        .map(|i| {
            Entry::new(
                &format!("p{i:02}"),
                Kind::Reg(pseudo_random(50_000, 90 + i)),
            )
        })
        .collect();
    let names: Vec<String> = e.iter().map(|e| e.path.clone()).collect();
    let prioritized: Vec<&str> = names.iter().map(String::as_str).collect();
    let blob = make_blob(&e, 64 << 10, &prioritized[..10]);
    let fetcher = Arc::new(HalvesFetcher {
        inner: fs::FileFetcher::open(&blob.path).expect("blob"),
        release: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
        first_half_sent: std::sync::atomic::AtomicBool::new(false),
    });
    let layer = shared_layer(fetcher.clone(), &blob, ChunkCache::memory(64 << 20));
    let walk = |layer: &Layer| -> usize {
        (0..20)
            .map(|i| {
                let id = layer.index().lookup(&format!("p{i:02}")).expect("file");
                layer.note_access(id, 0, 50_000, Some(false)).len()
            })
            .sum()
    };
    let pool = pool();
    layer.start_prefetch(&pool);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fetcher
        .first_half_sent
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        assert!(Instant::now() < deadline, "prefetch never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(walk(&layer), 0, "read ahead while the prefetch streams in");
    *fetcher.release.lock().expect("lock") = true;
    fetcher.cv.notify_all();
    assert!(
        layer.wait_prefetch(Duration::from_secs(20)),
        "prefetch ended"
    );
    // The same walk on a fresh layer with no prefetch running does read ahead.
    let idle = shared_layer(
        Arc::new(fs::FileFetcher::open(&blob.path).expect("blob")),
        &blob,
        ChunkCache::memory(64 << 20),
    );
    assert!(walk(&idle) > 0, "a walk in blob order reads ahead");
}

/// However many callers start the prefetch (a mount, the daemon opening the layer
/// ahead of it), it runs once; `wait_prefetch` sees it end.
#[test]
fn prefetch_runs_once_however_many_start_it() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &["d/f4", "d/f5", "d/f10"]);
    let fetcher = TestFetcher::open(&blob.path);
    let layer = shared_layer(fetcher.clone(), &blob, ChunkCache::memory(64 << 20));
    let after_open = fetcher.requests();
    assert!(
        layer.wait_prefetch(Duration::ZERO),
        "nothing runs before a start"
    );
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| layer.start_prefetch(&pool()));
        }
    });
    assert!(
        layer.wait_prefetch(Duration::from_secs(20)),
        "prefetch ended"
    );
    assert_eq!(fetcher.requests(), after_open + 1, "one prefetch request");
    assert!(layer.prefetched_bytes() > 0);
    layer.start_prefetch(&pool());
    assert!(layer.wait_prefetch(Duration::from_secs(20)));
    assert_eq!(
        fetcher.requests(),
        after_open + 1,
        "a late start is a no-op"
    );
}

#[test]
fn speculative_head_follows_the_hint_within_bounds() {
    let cfg = Config::default();
    // No annotation: nothing is guessed.
    assert_eq!(fs::speculative_head(&cfg, None), 0);
    assert_eq!(fs::speculative_head(&cfg, Some(0)), 0);
    assert_eq!(fs::speculative_head(&cfg, Some(300_000)), 300_000);
    assert_eq!(fs::speculative_head(&cfg, Some(50 << 20)), 4 << 20);
    let off = Config {
        speculative_head_kib: 0,
        ..Config::default()
    };
    assert_eq!(fs::speculative_head(&off, Some(300_000)), 0);
    let noprefetch = Config {
        noprefetch: true,
        ..Config::default()
    };
    assert_eq!(fs::speculative_head(&noprefetch, Some(300_000)), 0);
    let big = Config {
        speculative_head_kib: 1 << 20,
        ..Config::default()
    };
    assert_eq!(fs::speculative_head(&big, Some(u64::MAX)), 32 << 20);
}

#[test]
fn a_speculative_head_serves_the_prefetch_and_is_bounded_by_the_blob() {
    let e = entries();
    let names: Vec<String> = (0..40).step_by(5).map(|i| format!("d/f{i}")).collect();
    let prioritized: Vec<&str> = names.iter().map(String::as_str).collect();
    let blob = make_blob(&e, 64 << 10, &prioritized);
    let fetcher = TestFetcher::open(&blob.path);
    let cfg = Config {
        no_background_fetch: true,
        ..Config::default()
    };
    // Larger than the blob: cut to the part before the tail read, and still correct.
    let layer = Arc::new(
        Layer::open_with_head(
            fetcher.clone(),
            blob.desc.clone(),
            &cfg,
            Arc::new(ChunkCache::memory(64 << 20)),
            u64::MAX,
        )
        .expect("open"),
    );
    let pool = fs::FetchPool::shared().expect("pool");
    layer.start_prefetch(&pool);
    assert!(layer.wait_prefetch(Duration::from_secs(30)));
    let after_prefetch = fetcher.requests();
    // Tail, head, and at most the part of the prefetch beyond the head.
    assert!(after_prefetch <= 3, "{after_prefetch} requests");
    for p in &prioritized {
        let id = layer.index().lookup(p).expect("file");
        let want = e.iter().find(|x| x.path == *p).expect("entry");
        let Kind::Reg(data) = &want.kind else {
            unreachable!()
        };
        assert_eq!(&layer.read(id, 0, 1 << 20).expect("read"), data, "{p}");
    }
    assert_eq!(
        fetcher.requests(),
        after_prefetch,
        "prioritized files fetched again"
    );
}

/// A named set of files is fetched in one fetcher call, verified and cached: reading
/// them afterwards makes no request, a second batch fetches nothing, the byte budget is
/// kept, and directories or unknown ids are ignored.
#[test]
fn named_files_are_fetched_in_one_batch() {
    init_tracing();
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &[]);
    let (fetcher, layer) = open(&blob, &Config::default());
    let wanted: Vec<&Entry> = e
        .iter()
        .filter(|x| matches!(&x.kind, Kind::Reg(d) if d.len() >= 5_000))
        .step_by(2)
        .collect();
    let mut ids: Vec<_> = wanted
        .iter()
        .map(|x| layer.index().lookup(&x.path).expect("in index"))
        .collect();
    ids.push(layer.index().lookup("d").expect("dir"));
    ids.push(u32::MAX as _);
    let before = fetcher.requests();
    let done = layer.prefetch_files(&ids, u64::MAX).expect("prefetch");
    assert_eq!(
        fetcher.requests() - before,
        1,
        "one fetcher call for the batch"
    );
    assert_eq!(done.files, wanted.len());
    assert!(done.chunks_fetched >= wanted.len());
    assert!(done.bytes_fetched > 0);
    let after_batch = fetcher.requests();
    for x in &wanted {
        let Kind::Reg(d) = &x.kind else { continue };
        let id = layer.index().lookup(&x.path).expect("in index");
        assert!(layer.read(id, 0, d.len() as u32).expect("read") == *d);
    }
    assert_eq!(
        fetcher.requests(),
        after_batch,
        "reads served from the batch"
    );
    let again = layer
        .prefetch_files(&ids, u64::MAX)
        .expect("prefetch again");
    assert_eq!((again.chunks_fetched, again.bytes_fetched), (0, 0));
    assert_eq!(fetcher.requests(), after_batch);

    // A budget smaller than any file fetches nothing and says what it left out.
    let (fetcher2, layer2) = open(&blob, &Config::default());
    let before = fetcher2.requests();
    let small = layer2.prefetch_files(&ids, 100).expect("prefetch");
    assert_eq!((small.files, small.skipped), (0, wanted.len()));
    assert_eq!(fetcher2.requests(), before);
}

/// A plan given before the prefetch starts replaces the prioritized region: the layer's
/// prefetch fetches the planned files (of a file given with ranges, the chunks holding
/// them) and not the rest of the region; a plan after the start is refused.
#[test]
fn a_plan_replaces_the_prioritized_region() {
    init_tracing();
    let e = entries();
    // f4 70,000 bytes, f5 and f11 200,000 bytes, f10 70,000: all prioritized.
    let blob = make_blob(&e, 64 << 10, &["d/f4", "d/f5", "d/f10", "d/f11"]);
    let data = |p: &str| -> Vec<u8> {
        match &e.iter().find(|x| x.path == p).expect("entry").kind {
            Kind::Reg(d) => d.clone(),
            _ => unreachable!(),
        }
    };
    let fetcher = TestFetcher::open(&blob.path);
    let layer = shared_layer(fetcher.clone(), &blob, ChunkCache::memory(64 << 20));
    let id = |p: &str| layer.index().lookup(p).expect("in index");
    assert!(layer.plan_prefetch(
        vec![
            (id("d/f4"), None),
            (id("d/f5"), Some([130_000..131_000].to_vec()))
        ],
        u64::MAX
    ));
    assert!(layer.has_prefetch_plan());
    assert!(
        !layer.plan_prefetch(vec![(id("d/f10"), None)], u64::MAX),
        "one plan per layer"
    );
    layer.start_prefetch(&pool());
    assert!(layer.wait_prefetch(Duration::from_secs(20)));
    assert!(
        !layer.plan_prefetch(vec![(id("d/f10"), None)], u64::MAX),
        "a plan after the start is refused"
    );
    let after_prefetch = fetcher.requests();
    // Planned bytes are here.
    assert_eq!(
        layer.read(id("d/f4"), 0, 1 << 20).expect("read"),
        data("d/f4")
    );
    let f5 = data("d/f5");
    assert_eq!(
        layer.read(id("d/f5"), 130_000, 1000).expect("read"),
        f5[130_000..131_000]
    );
    assert_eq!(
        fetcher.requests(),
        after_prefetch,
        "planned bytes fetched again"
    );
    // The rest of the region is not: the unplanned file and f5's other chunks fetch.
    assert_eq!(
        layer.read(id("d/f10"), 0, 1 << 20).expect("read"),
        data("d/f10")
    );
    assert!(
        fetcher.requests() > after_prefetch,
        "unplanned file was prefetched"
    );
    let before = fetcher.requests();
    assert_eq!(layer.read(id("d/f5"), 0, 1000).expect("read"), f5[..1000]);
    assert!(
        fetcher.requests() > before,
        "f5's first chunk was prefetched"
    );

    // A plan spanning most of the region is declined: the region comes in one request.
    let fetcher = TestFetcher::open(&blob.path);
    let layer = shared_layer(fetcher.clone(), &blob, ChunkCache::memory(64 << 20));
    let id = |p: &str| layer.index().lookup(p).expect("in index");
    let most: Vec<fs::PlannedFile> = ["d/f4", "d/f5", "d/f11"]
        .iter()
        .map(|p| (id(p), None))
        .collect();
    assert!(
        !layer.plan_prefetch(most, u64::MAX),
        "plan over most of the region"
    );
    assert!(!layer.has_prefetch_plan());
    let after_open = fetcher.requests();
    layer.start_prefetch(&pool());
    assert!(layer.wait_prefetch(Duration::from_secs(20)));
    assert_eq!(
        fetcher.requests(),
        after_open + 1,
        "the region in one request"
    );
    assert_eq!(
        layer.read(id("d/f10"), 0, 1 << 20).expect("read"),
        data("d/f10")
    );
    assert_eq!(
        fetcher.requests(),
        after_open + 1,
        "the whole region prefetched"
    );
}

/// A held prefetch does not start until released (a start asked for meanwhile runs
/// then), and waiting for the prefetch waits for the release too.
#[test]
fn a_held_prefetch_starts_at_its_release() {
    let e = entries();
    let blob = make_blob(&e, 64 << 10, &["d/f4", "d/f5"]);
    let fetcher = TestFetcher::open(&blob.path);
    let layer = shared_layer(fetcher.clone(), &blob, ChunkCache::memory(64 << 20));
    let after_open = fetcher.requests();
    assert!(layer.hold_prefetch());
    layer.start_prefetch(&pool());
    assert!(
        !layer.wait_prefetch(Duration::from_millis(300)),
        "a held prefetch counts as pending"
    );
    assert_eq!(fetcher.requests(), after_open, "a held prefetch fetched");
    layer.release_prefetch();
    assert!(layer.wait_prefetch(Duration::from_secs(20)));
    assert_eq!(
        fetcher.requests(),
        after_open + 1,
        "the start asked for ran"
    );
    assert!(!layer.hold_prefetch(), "held after the start");
}
