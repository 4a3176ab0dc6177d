//! Measures how long opening a layer takes once its bytes are in memory (footer, TOC
//! decompression, digest check, JSON parse and index), the CPU part of a Prepare:
//! `toc_open_time LAYER.tar.gz [ROUNDS]` converts the layer to eStargz in memory first.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark example: a panic ends the measurement"
)]

use std::time::{Duration, Instant};

use estargz::{build, BuildOptions, OpenOptions, Reader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: toc_open_time LAYER.tar.gz [ROUNDS]")?;
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(10);
    let input = flate2::read::GzDecoder::new(std::fs::File::open(&path)?);
    let mut blob = Vec::new();
    let out = build(input, &mut blob, &BuildOptions::default())?;
    let opts = OpenOptions {
        expected_toc_digest: Some(out.toc_digest.clone()),
        ..OpenOptions::default()
    };
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let started = Instant::now();
            let reader = Reader::open(&blob, &opts).expect("open");
            std::hint::black_box(&reader);
            started.elapsed()
        })
        .collect();
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "{{\"entries\": {}, \"blob_bytes\": {}, \"rounds\": {rounds}, \"median_ms\": {:.2}, \"min_ms\": {:.2}}}",
        out.toc.entries.len(),
        blob.len(),
        median.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3
    );
    Ok(())
}
