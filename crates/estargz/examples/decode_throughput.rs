//! Measures single-threaded decompress+verify throughput of a blob's chunks, the work
//! a lazy read does after its bytes arrive: `decode_throughput BLOB`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark example: a panic ends the measurement"
)]

use std::time::Instant;

use estargz::{decode_chunk, OpenOptions, Reader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: decode_throughput BLOB")?;
    let blob = std::fs::read(&path)?;
    let reader = Reader::open(&blob, &OpenOptions::default())?;
    let mut bytes = 0u64;
    let mut chunks = 0u64;
    let start = Instant::now();
    for (_, node) in reader.index.nodes() {
        for c in &node.chunks {
            let compressed = &blob[c.blob_offset as usize..c.blob_end as usize];
            let data = decode_chunk(reader.compression(), compressed, c, &node.path, true)?;
            bytes += data.len() as u64;
            chunks += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"chunks\": {chunks}, \"bytes\": {bytes}, \"seconds\": {secs:.3}, \"mbPerSec\": {:.1}}}",
        bytes as f64 / secs / 1e6
    );
    Ok(())
}
