//! Measures how long opening a layer takes once its footer and TOC bytes are local
//! (the CPU part of a Prepare): `layer_open_time LAYER.tar [ROUNDS]` converts the
//! layer to eStargz in a temporary file, then opens it through a file fetcher with a
//! memory cache, as the daemon does through the registry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark example: a panic ends the measurement"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fs::{ChunkCache, Config, FileFetcher, Layer, LayerDesc};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: layer_open_time LAYER.tar [ROUNDS]")?;
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(10);
    let input = std::fs::File::open(&path)?;
    let dir = tempfile::tempdir()?;
    let blob = dir.path().join("blob");
    let out = estargz::build(
        input,
        std::fs::File::create(&blob)?,
        &estargz::BuildOptions::default(),
    )?;
    let toc_tail = out
        .annotations
        .get(estargz::TOC_TAIL_ANNOTATION)
        .and_then(|t| t.parse().ok());
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let desc = LayerDesc {
                digest: out.blob_digest.clone(),
                size: out.blob_size,
                toc_digest: Some(out.toc_digest.clone()),
                toc_tail,
            };
            let fetcher = Arc::new(FileFetcher::open(&blob).expect("blob"));
            let cache = Arc::new(ChunkCache::memory(64 << 20));
            let started = Instant::now();
            let layer = Layer::open(fetcher, desc, &Config::default(), cache).expect("open");
            let took = started.elapsed();
            std::hint::black_box(&layer);
            took
        })
        .collect();
    times.sort();
    println!(
        "{{\"entries\": {}, \"rounds\": {rounds}, \"median_ms\": {:.2}, \"min_ms\": {:.2}}}",
        out.toc.entries.len(),
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
    Ok(())
}
