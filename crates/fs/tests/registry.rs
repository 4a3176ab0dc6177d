//! A layer pushed to a real registry on loopback, mounted through the registry client:
//! reads, background fetch, what the cache directory holds after a whole layer was
//! read, and the head of a blob fetched alongside its TOC, seen in a front's request log.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fs::{Config, RegistryFetcher};

/// A registry on loopback holding one pushed blob, and a client to read it through.
struct Pushed {
    reg: testenv::Registry,
    rt: tokio::runtime::Runtime,
    client: registry::Client,
}

impl Pushed {
    fn start(blob: &Blob, repo: &str) -> Option<Pushed> {
        let reg = testenv::Registry::start(testenv::RegistryOpts::default())?;
        let bytes = std::fs::read(&blob.path).expect("blob");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let digest = rt.block_on(testenv::push_blob(&reg.base_url(), repo, &bytes));
        assert_eq!(digest, blob.desc.digest);
        let client = registry::Client::new(
            registry::RegistryConfig::default(),
            Arc::new(registry::Anonymous),
        )
        .expect("client");
        Some(Pushed { reg, rt, client })
    }

    fn fetcher(&self, blob: &Blob, repo: &str) -> Arc<RegistryFetcher> {
        let reference = registry::Reference::parse(&format!("{}/{repo}:latest", self.reg.host()))
            .expect("reference");
        let reader = self.client.blob_reader(
            &reference,
            registry::Digest::parse(&blob.desc.digest).expect("digest"),
            Some(blob.desc.size),
        );
        Arc::new(RegistryFetcher::with_size(
            reader,
            self.rt.handle().clone(),
            blob.desc.size,
        ))
    }
}

/// Bytes of the files under `dir`, and the names of any still being written.
fn dir_usage(dir: &Path, temps: &mut Vec<String>) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let m = e.metadata().expect("stat");
        if m.is_dir() {
            total += dir_usage(&e.path(), temps);
        } else {
            if e.file_name()
                .to_string_lossy()
                .starts_with(fs::cache::TEMP_PREFIX)
            {
                temps.push(e.path().display().to_string());
            }
            total += m.len();
        }
    }
    total
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Reading every file of a layer, through user space and then (with passthrough)
/// through the whole-file copies its reads lead to, leaves each byte in the cache
/// directory once: a file's copy replaces its chunk files.
#[test]
fn a_read_layer_is_on_disk_once() {
    if !fuse_ready("a_read_layer_is_on_disk_once") {
        return;
    }
    init_tracing();
    let chunk = 256u64 << 10;
    let mut entries = vec![Entry::new("big", Kind::Dir), Entry::new("small", Kind::Dir)];
    for i in 0..8u64 {
        let len = (2 << 20) + i as usize * 200_000;
        entries.push(Entry::new(
            &format!("big/f{i}"),
            Kind::Reg(pseudo_random(len, 3000 + i)),
        ));
    }
    for i in 0..10u64 {
        entries.push(Entry::new(
            &format!("small/f{i}"),
            Kind::Reg(pseudo_random(10_000 + i as usize * 5000, 3100 + i)),
        ));
    }
    let files: Vec<(&str, &[u8])> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Reg(d) => Some((e.path.as_str(), d.as_slice())),
            _ => None,
        })
        .collect();
    let data_bytes: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let multi = files.iter().filter(|(_, d)| d.len() as u64 > chunk).count();
    let blob = make_blob(&entries, chunk, &[]);
    let Some(pushed) = Pushed::start(&blob, "fs/once") else {
        return;
    };
    for passthrough in [false, true] {
        let mut cfg = Config {
            noprefetch: true,
            no_background_fetch: true,
            ..Config::default()
        };
        cfg.fuse.passthrough = passthrough;
        let cache_dir = tempfile::tempdir().expect("tempdir");
        let mnt_dir = tempfile::tempdir().expect("tempdir");
        let _guard = MountGuard(mnt_dir.path().to_path_buf());
        let cache = fs::ChunkCache::from_config(&cfg, cache_dir.path(), None).expect("cache");
        let layer = fs::Layer::open(
            pushed.fetcher(&blob, "fs/once"),
            blob.desc.clone(),
            &cfg,
            cache,
        )
        .expect("open");
        let pool = fs::FetchPool::shared().expect("pool");
        let opts = fs::MountOptions {
            cfg: &cfg,
            metrics: None,
            pool: &pool,
        };
        let handle = fs::mount(Arc::new(layer), mnt_dir.path(), &opts).expect("mount");
        let read_all = || {
            for (path, want) in &files {
                let got = std::fs::read(mnt_dir.path().join(path)).expect("read");
                assert!(got == *want, "{path} differs (passthrough {passthrough})");
            }
        };
        read_all();
        if passthrough {
            // Opens of fully cached multi-chunk files have their copies assembled.
            let copies = cache_dir.path().join("files");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                read_all();
                let mut temps = Vec::new();
                dir_usage(&copies, &mut temps);
                if count_files(&copies) == multi && temps.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "whole-file copies never assembled"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            read_all();
            assert!(
                handle.passthrough_opens() >= files.len() as u64,
                "{} passthrough opens",
                handle.passthrough_opens()
            );
        }
        // Read-ahead may still be writing what it fetched ahead of the last reads. Once
        // it is done, the size bound counts exactly what is on disk.
        let deadline = Instant::now() + Duration::from_secs(10);
        let on_disk = loop {
            let mut temps = Vec::new();
            let on_disk = dir_usage(cache_dir.path(), &mut temps);
            let (accounted, _, _) = handle.layer().cache().disk_usage();
            if temps.is_empty() && accounted == on_disk {
                break on_disk;
            }
            assert!(
                Instant::now() < deadline,
                "unfinished cache files: {temps:?}; {accounted} bytes accounted, {on_disk} on disk"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // Metadata: the blob's tail kept for the TOC (at most one 512 KiB read).
        let metadata = fs::layer::TAIL_READ + (64 << 10);
        eprintln!(
            "passthrough {passthrough}: {on_disk} bytes on disk for {data_bytes} bytes of files"
        );
        assert!(
            on_disk <= data_bytes + data_bytes / 10 + metadata,
            "passthrough {passthrough}: {on_disk} bytes on disk for {data_bytes} bytes of files"
        );
        handle.unmount().expect("unmount");
    }
}

#[test]
fn mount_through_registry_blob_reader() {
    if !fuse_ready("mount_through_registry_blob_reader") {
        return;
    }
    init_tracing();
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let mut entries = vec![Entry::new("data", Kind::Dir)];
    for i in 0..12u64 {
        entries.push(Entry::new(
            &format!("data/f{i}"),
            Kind::Reg(pseudo_random(150_000 + i as usize * 1000, 500 + i)),
        ));
    }
    let blob = make_blob(&entries, 64 << 10, &["data/f4"]);
    let bytes = std::fs::read(&blob.path).expect("blob");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let digest = rt.block_on(testenv::push_blob(&reg.base_url(), "fs/layer", &bytes));
    assert_eq!(digest, blob.desc.digest);

    let client = registry::Client::new(
        registry::RegistryConfig::default(),
        Arc::new(registry::Anonymous),
    )
    .expect("client");
    let reference =
        registry::Reference::parse(&format!("{}/fs/layer:latest", reg.host())).expect("reference");
    let reader = client.blob_reader(
        &reference,
        registry::Digest::parse(&digest).expect("digest"),
        Some(blob.desc.size),
    );
    let fetcher = Arc::new(RegistryFetcher::with_size(
        reader,
        rt.handle().clone(),
        blob.desc.size,
    ));

    let mnt_dir = tempfile::tempdir().expect("tempdir");
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let _guard = MountGuard(mnt_dir.path().to_path_buf());
    let cfg = Config::default();
    let cache = fs::ChunkCache::from_config(&cfg, cache_dir.path(), None).expect("cache");
    let layer = fs::Layer::open(fetcher, blob.desc.clone(), &cfg, cache).expect("open");
    let pool = fs::FetchPool::shared().expect("pool");
    let opts = fs::MountOptions {
        cfg: &cfg,
        metrics: None,
        pool: &pool,
    };
    let handle = fs::mount(Arc::new(layer), mnt_dir.path(), &opts).expect("mount");
    for e in &entries[1..] {
        let Kind::Reg(d) = &e.kind else { continue };
        let got = std::fs::read(mnt_dir.path().join(&e.path)).expect("read");
        assert!(got == *d, "{} differs", e.path);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handle.layer().is_complete() {
        assert!(Instant::now() < deadline, "background fetch stalled");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(handle.fetched_bytes(), blob.desc.size);
    handle.check().expect("alive");
    handle.unmount().expect("unmount");
    drop(rt);
}

/// Blob GETs the front answered, as (first byte, received, answered).
fn blob_gets(front: &testenv::Front, size: u64) -> Vec<(u64, Instant, Instant)> {
    let log = front.stats.log.lock().expect("log");
    log.iter()
        .filter(|l| l.method == "GET" && l.path.contains("/blobs/sha256:"))
        .filter_map(|l| Some((l.range_start(size)?, l.received, l.answered)))
        .collect()
}

/// Opens the layer through a front that holds every blob request 300 ms (a slow link's
/// round trip), with a speculative head of `head` bytes, and runs its prefetch.
fn open_and_prefetch(
    rt: &tokio::runtime::Runtime,
    reg: &testenv::Registry,
    blob: &Blob,
    head: u64,
) -> (Arc<fs::Layer>, testenv::Front, Duration) {
    let front = rt.block_on(testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        blob_delay_ms: 300,
        ..Default::default()
    }));
    let client = registry::Client::new(
        registry::RegistryConfig::default(),
        Arc::new(registry::Anonymous),
    )
    .expect("client");
    let reference =
        registry::Reference::parse(&format!("{}/fs/head:latest", front.host())).expect("reference");
    let reader = client.blob_reader(
        &reference,
        registry::Digest::parse(&blob.desc.digest).expect("digest"),
        Some(blob.desc.size),
    );
    let fetcher = Arc::new(RegistryFetcher::with_size(
        reader,
        rt.handle().clone(),
        blob.desc.size,
    ));
    let cfg = Config {
        no_background_fetch: true,
        ..Config::default()
    };
    let cache = fs::ChunkCache::memory(64 << 20);
    let started = Instant::now();
    let layer = fs::Layer::open_with_head(fetcher, blob.desc.clone(), &cfg, Arc::new(cache), head)
        .expect("open");
    let layer = Arc::new(layer);
    let pool = fs::FetchPool::shared().expect("pool");
    layer.start_prefetch(&pool);
    assert!(
        layer.wait_prefetch(Duration::from_secs(30)),
        "prefetch done"
    );
    (layer, front, started.elapsed())
}

#[test]
fn head_is_fetched_alongside_the_toc() {
    init_tracing();
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let mut entries = vec![Entry::new("data", Kind::Dir)];
    for i in 0..16u64 {
        entries.push(Entry::new(
            &format!("data/f{i:02}"),
            Kind::Reg(pseudo_random(120_000, 900 + i)),
        ));
    }
    let prioritized = ["data/f03", "data/f07", "data/f11"];
    let blob = make_blob(&entries, 64 << 10, &prioritized);
    let bytes = std::fs::read(&blob.path).expect("blob");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(testenv::push_blob(&reg.base_url(), "fs/head", &bytes));
    let size = blob.desc.size;

    // The hint our converter writes: where the prioritized files end.
    let src = estargz::FileBlob::open(&blob.path).expect("open");
    let (r, toc) =
        estargz::Reader::open_with_toc(&src, &estargz::OpenOptions::default()).expect("reader");
    let hint = toc
        .prefetch_end_hint(r.payload_end())
        .expect("prioritized files");
    assert!(hint > 300_000 && hint + fs::layer::TAIL_READ < size);
    let head = fs::speculative_head(&Config::default(), Some(hint));
    assert_eq!(head, hint);

    let (layer, front, with_head) = open_and_prefetch(&rt, &reg, &blob, head);
    let gets = blob_gets(&front, size);
    let tail = gets.iter().find(|g| g.0 > hint).expect("tail request");
    let heads: Vec<_> = gets.iter().filter(|g| g.0 == 0).collect();
    assert_eq!(heads.len(), 1, "the head is fetched once: {gets:?}");
    assert!(
        heads[0].1 < tail.2,
        "the head request came in while the tail request was in flight"
    );
    assert_eq!(gets.len(), 2, "tail and head, nothing more: {gets:?}");
    // The prioritized files are cached: reading them fetches nothing.
    for p in prioritized {
        let id = layer.index().lookup(p).expect("file");
        let want = entries.iter().find(|e| e.path == p).expect("entry");
        let Kind::Reg(data) = &want.kind else {
            unreachable!()
        };
        assert_eq!(&layer.read(id, 0, 200_000).expect("read"), data, "{p}");
    }
    assert_eq!(
        blob_gets(&front, size).len(),
        2,
        "reads went to the network"
    );

    // Without the head, the prefetch asks only once the TOC is in.
    let (_layer, front, without_head) = open_and_prefetch(&rt, &reg, &blob, 0);
    let gets = blob_gets(&front, size);
    let tail = gets.iter().find(|g| g.0 > hint).expect("tail request");
    let prefetch = gets.iter().find(|g| g.0 == 0).expect("prefetch request");
    assert!(prefetch.1 >= tail.2, "the prefetch waited for the TOC");
    // One held round trip less: 300 ms, less scheduling noise.
    assert!(
        without_head > with_head + Duration::from_millis(200),
        "with head {with_head:?}, without {without_head:?}"
    );
    drop(rt);
}

/// Distinct client connections among the blob GETs the front answered.
fn blob_connections(front: &testenv::Front) -> std::collections::HashSet<std::net::SocketAddr> {
    let log = front.stats.log.lock().expect("log");
    log.iter()
        .filter(|l| l.method == "GET" && l.path.contains("/blobs/sha256:"))
        .map(|l| l.peer.expect("peer address logged"))
        .collect()
}

/// A process reads every layer through one registry client, so one pool of connections
/// per registry host: a layer opened after another finds the first one's connections
/// idle and takes them instead of opening new ones (a new TCP connection would cost a
/// round trip and start slow again).
#[test]
fn layers_of_a_process_share_warm_connections() {
    init_tracing();
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let front = rt.block_on(testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    }));
    let mut blobs = Vec::new();
    for n in 0..3u64 {
        let mut entries = vec![Entry::new("data", Kind::Dir)];
        for i in 0..8u64 {
            entries.push(Entry::new(
                &format!("data/f{i}"),
                Kind::Reg(pseudo_random(100_000, 7_000 + n * 100 + i)),
            ));
        }
        let blob = make_blob(&entries, 64 << 10, &["data/f2", "data/f5"]);
        let bytes = std::fs::read(&blob.path).expect("blob");
        rt.block_on(testenv::push_blob(&reg.base_url(), "fs/conns", &bytes));
        blobs.push((blob, entries));
    }
    let client = registry::Client::new(
        registry::RegistryConfig::default(),
        Arc::new(registry::Anonymous),
    )
    .expect("client");
    let reference = registry::Reference::parse(&format!("{}/fs/conns:latest", front.host()))
        .expect("reference");
    let cfg = Config {
        no_background_fetch: true,
        ..Config::default()
    };
    let pool = fs::FetchPool::shared().expect("pool");
    // Each layer in turn: open (with the speculative head the daemon asks for, two
    // requests at once), prefetch, read every file.
    let gets_before = |front: &testenv::Front| {
        front
            .stats
            .log
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.path.contains("/blobs/sha256:"))
            .count()
    };
    for (n, (blob, entries)) in blobs.iter().enumerate() {
        let reader = client.blob_reader(
            &reference,
            registry::Digest::parse(&blob.desc.digest).expect("digest"),
            Some(blob.desc.size),
        );
        let fetcher = Arc::new(RegistryFetcher::with_size(
            reader,
            rt.handle().clone(),
            blob.desc.size,
        ));
        let src = estargz::FileBlob::open(&blob.path).expect("open");
        let (r, toc) =
            estargz::Reader::open_with_toc(&src, &estargz::OpenOptions::default()).expect("toc");
        let head = fs::speculative_head(&cfg, toc.prefetch_end_hint(r.payload_end()));
        assert!(head > 0);
        let cache = Arc::new(fs::ChunkCache::memory(64 << 20));
        let layer = Arc::new(
            fs::Layer::open_with_head(fetcher, blob.desc.clone(), &cfg, cache, head).expect("open"),
        );
        layer.start_prefetch(&pool);
        assert!(
            layer.wait_prefetch(Duration::from_secs(30)),
            "prefetch done"
        );
        for e in &entries[1..] {
            let Kind::Reg(d) = &e.kind else { continue };
            let id = layer.index().lookup(&e.path).expect("file");
            assert!(
                layer.read(id, 0, d.len() as u32).expect("read") == *d,
                "{} differs",
                e.path
            );
        }
        let conns = blob_connections(&front);
        assert!(
            conns.len() <= 2,
            "layer {n}: {} blob requests over {} connections: {conns:?}",
            gets_before(&front),
            conns.len()
        );
    }
    assert!(
        gets_before(&front) >= 3 * 3,
        "tail, head and reads of every layer went through the front"
    );
    drop(rt);
}
