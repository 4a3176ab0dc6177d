//! A layer pushed to a real registry on loopback, mounted through the registry client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fs::{Config, RegistryFetcher};

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
