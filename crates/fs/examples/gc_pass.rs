//! Cost of the chunk cache's garbage collection over a large cache directory (run by
//! bench/fs/gc.sh; see docs/snapshotter.md, Cache lifecycle).
//!
//! `gc_pass DIR TOTAL_MIB FILE_KIB [real]` fills DIR with TOTAL_MIB of cache files of
//! FILE_KIB each, laid out as chunk files (`<2 hex>/<64 hex>`), sparse unless `real`
//! is given, with ascending mtimes (the order of last use a restarted cache starts
//! from), and syncs. It then opens DIR as a cache (the scan that sweeps temp files and indexes
//! every file), times 4 KiB reads of a cached chunk on the FUSE fast path (each one
//! moves the chunk to the front of the index) against the full index and against an
//! empty one, and sets a bound of a tenth of the bytes: one pass evicts the other nine
//! tenths, oldest first. Prints one JSON object.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fs::ChunkCache;
use sha2::{Digest as _, Sha256};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Fast-path reads timed per index.
const READS: u32 = 200_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.as_slice() {
        [dir, total, file] => run(Path::new(dir), total, file, false),
        [dir, total, file, real] if real == "real" => run(Path::new(dir), total, file, true),
        _ => Err("usage: gc_pass DIR TOTAL_MIB FILE_KIB [real]".into()),
    };
    if let Err(e) = res {
        eprintln!("gc_pass: {e}");
        std::process::exit(1);
    }
}

fn key(i: u64) -> [u8; 32] {
    Sha256::digest(i.to_le_bytes()).into()
}

fn run(dir: &Path, total_mib: &str, file_kib: &str, real: bool) -> Res<()> {
    let total: u64 = total_mib.parse::<u64>()? << 20;
    let file: u64 = file_kib.parse::<u64>()? << 10;
    if file == 0 || total < file {
        return Err("TOTAL_MIB must hold at least one file of FILE_KIB".into());
    }
    let count = total / file;
    std::fs::create_dir_all(dir)?;
    let base = SystemTime::now() - Duration::from_secs(count + 3600);
    let t = Instant::now();
    let block = vec![0x5au8; file as usize];
    for b in 0..=255u8 {
        std::fs::create_dir_all(dir.join(hex::encode([b])))?;
    }
    for i in 0..count {
        let hex = hex::encode(key(i));
        let path = dir.join(&hex[..2]).join(&hex);
        let f = std::fs::File::create(&path)?;
        if real {
            std::io::Write::write_all(&mut &f, &block)?;
        } else {
            f.set_len(file)?;
        }
        f.set_modified(base + Duration::from_secs(i))?;
    }
    // Written back before anything is timed, as a cache left by an earlier run would be:
    // unlinking files still under writeback costs far more.
    nix::unistd::sync();
    let build = t.elapsed();

    let rss_before = rss_kib();
    let t = Instant::now();
    let cache = ChunkCache::directory(dir, 0)?;
    let open = t.elapsed();
    let (indexed, _, _) = cache.disk_usage();
    let index_kib = rss_kib().saturating_sub(rss_before);

    let read_full = fast_reads(&cache)?;
    let empty = tempfile::tempdir()?;
    let read_empty = fast_reads(&ChunkCache::directory(empty.path(), 0)?)?;

    let limit = total / 10;
    let t = Instant::now();
    let cache = cache.with_disk_bounds(limit, None);
    let pass = t.elapsed();
    let (after, _, evicted) = cache.disk_usage();

    let out = serde_json::json!({
        "files": count,
        "file_bytes": file,
        "total_bytes": count * file,
        "sparse": !real,
        "build_s": build.as_secs_f64(),
        "open_index_ms": open.as_secs_f64() * 1e3,
        "indexed_bytes": indexed,
        "index_rss_kib": index_kib,
        "limit_bytes": limit,
        "pass_ms": pass.as_secs_f64() * 1e3,
        "pass_evicted_files": evicted,
        "bytes_after_pass": after,
        "fast_read_full_index_us": read_full.as_secs_f64() * 1e6,
        "fast_read_empty_index_us": read_empty.as_secs_f64() * 1e6,
    });
    println!("{out}");
    Ok(())
}

/// This process's resident memory.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Mean time of a 4 KiB read of a cached chunk without hashing, as a FUSE thread
/// answers a read: the file read plus the move to the front of the index.
fn fast_reads(cache: &ChunkCache) -> Res<Duration> {
    let data: Vec<u8> = (0..65_536u32).map(|i| i as u8).collect();
    let k: [u8; 32] = Sha256::digest(&data).into();
    cache.put(k, Arc::new(data))?;
    let t = Instant::now();
    for i in 0..READS {
        let off = u64::from(i % 15) * 4096;
        let got = cache.read_verified(&k, None, off, 4096);
        assert!(got.is_some_and(|d| d.len() == 4096));
    }
    Ok(t.elapsed() / READS)
}
