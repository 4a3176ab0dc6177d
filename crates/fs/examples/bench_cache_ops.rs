//! Cost of single chunk cache operations on a directory cache, in nanoseconds per
//! operation: what the cache's bookkeeping (size index, least-recently-used order) adds
//! to a write, a read of a cached chunk answered from its file (the FUSE read path with
//! passthrough off) and the lookup of a chunk file for passthrough. See
//! docs/benchmarks/fs.md, "Cost of the cache bookkeeping".
//!
//! `bench_cache_ops DIR [CHUNKS] [PASSES]` writes CHUNKS (default 2,000) chunks of
//! 64 KiB into a fresh cache under DIR, then reads each PASSES (default 20) times whole
//! and looks each file up as often; prints one line of CPU time per operation (this
//! thread's, so a loaded machine's waiting does not count): the fastest pass and the
//! median pass.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::sync::Arc;

use fs::ChunkCache;

const CHUNK: usize = 64 << 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: bench_cache_ops DIR [CHUNKS] [PASSES]");
        std::process::exit(2);
    };
    let chunks: usize = args.get(1).map_or(2_000, |s| s.parse().expect("CHUNKS"));
    let passes: usize = args.get(2).map_or(20, |s| s.parse().expect("PASSES"));
    let chunks = chunks.clamp(1, 100_000);
    let passes = passes.clamp(1, 1_000);
    let tmp = tempfile::tempdir_in(dir).expect("temp dir");
    // A memory LRU of one chunk: every read below goes to the chunk's file.
    let cache = ChunkCache::directory(tmp.path().join("cache"), CHUNK as u64).expect("cache");
    let keys: Vec<[u8; 32]> = (0..chunks as u64)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&i.to_le_bytes());
            k[8..16].copy_from_slice(&0x5eed_u64.to_le_bytes());
            k
        })
        .collect();
    let data = Arc::new(vec![7u8; CHUNK]);
    let t = cpu_ns();
    for k in &keys {
        cache.put(*k, data.clone()).expect("put");
    }
    let put_ns = (cpu_ns() - t) as f64 / chunks as f64;

    let mut read_ns = Vec::new();
    let mut file_ns = Vec::new();
    for _ in 0..passes {
        let t = cpu_ns();
        for k in &keys {
            let got = read_verified(&cache, k);
            assert_eq!(got.map(|v| v.len()), Some(CHUNK), "cached chunk read");
        }
        read_ns.push((cpu_ns() - t) as f64 / chunks as f64);
        let t = cpu_ns();
        for k in &keys {
            assert!(cache.verified_chunk_file(k).is_some(), "chunk file");
        }
        file_ns.push((cpu_ns() - t) as f64 / chunks as f64);
    }
    let min_med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("{:.0} / {:.0}", v[0], v[v.len() / 2])
    };
    println!(
        "chunks {chunks} x {} KiB, passes {passes}, CPU ns per op (fastest / median pass): \
         put {put_ns:.0}, read 64 KiB {}, chunk file lookup {}",
        CHUNK >> 10,
        min_med(read_ns),
        min_med(file_ns)
    );
}

/// CPU time this thread has used, in nanoseconds.
fn cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A whole cached chunk read from its file, as a FUSE read of it is answered.
fn read_verified(cache: &ChunkCache, key: &[u8; 32]) -> Option<Vec<u8>> {
    cache.read_verified(key, None, 0, CHUNK)
}
