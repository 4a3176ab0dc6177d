//! Filling chunks: claiming the missing ones so concurrent readers of a chunk share one
//! fetch, asking the fetcher for their blob ranges (the fetcher merges neighbours), and
//! decoding and verifying each chunk as soon as its bytes are in.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tracing::{debug, error, warn};

use super::{prealloc, ChunkRef, Layer};
use crate::cache::Key;
use crate::error::{Error, Result};

/// Largest compressed span of one chunk accepted from a TOC: the format caps a chunk at
/// 512 MiB of file data, and compression adds little to that.
const MAX_CHUNK_SPAN: u64 = (512 << 20) + (64 << 20);
/// Most bytes held back at once while a fetch streams in: the chunk being completed
/// plus the piece that completes it.
const MAX_BUFFERED: u64 = MAX_CHUNK_SPAN + (64 << 20);

type SlotResult = std::result::Result<Arc<Vec<u8>>, String>;

/// One chunk being fetched; later readers of the same chunk wait here.
#[derive(Default)]
pub(super) struct Slot {
    state: Mutex<Option<SlotResult>>,
    cv: Condvar,
}

impl Slot {
    fn set(&self, r: SlotResult) {
        if let Ok(mut s) = self.state.lock() {
            if s.is_none() {
                *s = Some(r);
            }
        }
        self.cv.notify_all();
    }

    fn wait(&self) -> SlotResult {
        let mut s = self
            .state
            .lock()
            .map_err(|_| "chunk slot poisoned".to_string())?;
        loop {
            if let Some(r) = s.as_ref() {
                return r.clone();
            }
            s = self
                .cv
                .wait(s)
                .map_err(|_| "chunk slot poisoned".to_string())?;
        }
    }
}

/// The chunks this reader claimed: completed one by one, and failed on drop if the
/// reader bails out early (or panics), so no waiter is left hanging.
struct Claims<'a> {
    layer: &'a Layer,
    slots: HashMap<Key, Arc<Slot>>,
}

impl Claims<'_> {
    fn finish(&mut self, key: &Key, r: SlotResult) {
        if let Some(slot) = self.slots.remove(key) {
            slot.set(r);
            if let Ok(mut map) = self.layer.inflight.lock() {
                map.remove(key);
            }
        }
    }
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        let keys: Vec<Key> = self.slots.keys().copied().collect();
        for k in keys {
            self.finish(&k, Err("fetch abandoned".into()));
        }
    }
}

type Got = HashMap<Key, Result<Arc<Vec<u8>>>>;

impl Layer {
    /// Makes sure each chunk in `refs` is cached and returns its bytes. With
    /// `check_cache`, the cache is looked at first (the caller has not yet); missing
    /// chunks are claimed (others wait for them instead of fetching again) and fetched
    /// either as `window` or as their own blob ranges, then decoded and verified.
    /// `on_demand` marks a read a process waits for: a chunk whose shared fetch failed
    /// is tried once more on its own, and the fetch counts as on demand in the metrics.
    pub(super) fn fill(
        &self,
        refs: &[ChunkRef],
        window: Option<Range<u64>>,
        on_demand: bool,
        check_cache: bool,
    ) -> Vec<Result<Arc<Vec<u8>>>> {
        enum St {
            Ready(Arc<Vec<u8>>),
            Wait(Arc<Slot>, ChunkRef),
            Mine(Key),
            Failed(Error),
        }
        let mut claims = Claims {
            layer: self,
            slots: HashMap::new(),
        };
        let mut states = Vec::with_capacity(refs.len());
        let mut mine: Vec<(ChunkRef, Key)> = Vec::new();
        for &r in refs {
            let key = self.key_of(r);
            if check_cache {
                let verify = self.verify && self.has_digest(r);
                if let Some(d) = self.cache.get(&key, verify, self.in_file(r).as_ref()) {
                    states.push(St::Ready(d));
                    continue;
                }
            }
            let Ok(mut map) = self.inflight.lock() else {
                states.push(St::Failed(Error::Shared("in-flight table poisoned".into())));
                continue;
            };
            if let Some(slot) = map.get(&key) {
                states.push(St::Wait(slot.clone(), r));
            } else if let Some(d) = self.cache.get_mem(&key) {
                // Filled by a fetch that ended since the cache was looked at.
                states.push(St::Ready(d));
            } else {
                let slot = Arc::new(Slot::default());
                map.insert(key, slot.clone());
                claims.slots.insert(key, slot);
                mine.push((r, key));
                states.push(St::Mine(key));
            }
        }

        let mut got: Got = HashMap::new();
        if !mine.is_empty() {
            // A window is one contiguous request; when another fetch (a prefetch still
            // streaming in) holds some of its chunks, only this fetch's own chunks are
            // asked for, so those bytes do not cross the link twice.
            let shared = states.iter().any(|s| matches!(s, St::Wait(..)));
            let ranges = match window {
                Some(w) if !shared => vec![w],
                _ => chunk_ranges(mine.iter().map(|&(r, _)| self.chunk(r).blob_range())),
            };
            self.fetch_and_decode(&ranges, &mine, &mut claims, &mut got, on_demand);
        }

        states
            .into_iter()
            .map(|st| match st {
                St::Ready(d) => Ok(d),
                St::Failed(e) => Err(e),
                St::Mine(key) => match got.get(&key) {
                    Some(Ok(d)) => Ok(d.clone()),
                    Some(Err(e)) => Err(e.duplicate()),
                    None => Err(Error::Shared("chunk was not fetched".into())),
                },
                // Someone else's fetch failed (perhaps a large background window); try
                // this chunk once on our own before giving up.
                St::Wait(slot, r) => match slot.wait() {
                    Ok(d) => Ok(d),
                    Err(_) if on_demand => self.fill_one(r),
                    Err(e) => Err(Error::Shared(e)),
                },
            })
            .collect()
    }

    fn fill_one(&self, r: ChunkRef) -> Result<Arc<Vec<u8>>> {
        self.fill(&[r], None, false, true)
            .pop()
            .unwrap_or_else(|| Err(Error::Shared("chunk was not fetched".into())))
    }

    fn has_digest(&self, r: ChunkRef) -> bool {
        self.chunk(r).digest.is_some()
    }

    /// Fetches `ranges` (sorted, disjoint) in one fetcher call and decodes each claimed
    /// chunk as soon as its bytes are in, so readers waiting for the front of a large
    /// window get it before the rest arrives. Bytes no remaining chunk needs are let go
    /// as the fetch goes on.
    fn fetch_and_decode(
        &self,
        ranges: &[Range<u64>],
        mine: &[(ChunkRef, Key)],
        claims: &mut Claims<'_>,
        got: &mut Got,
        on_demand: bool,
    ) {
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
            return;
        };
        let (start, end) = (first.start, last.end);
        let mut order: Vec<(ChunkRef, Key)> = Vec::with_capacity(mine.len());
        for &(r, key) in mine {
            let c = self.chunk(r);
            let inside = ranges
                .iter()
                .any(|g| g.start <= c.blob_offset && c.blob_end <= g.end);
            let reason = if !inside {
                Some("chunk lies outside the fetched ranges".to_string())
            } else if c.blob_end - c.blob_offset > MAX_CHUNK_SPAN {
                Some(format!(
                    "compressed chunk of {} bytes exceeds {MAX_CHUNK_SPAN}",
                    c.blob_end - c.blob_offset
                ))
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    claims.finish(&key, Err(reason.clone()));
                    got.insert(key, Err(self.corrupt(r, reason)));
                }
                None => order.push((r, key)),
            }
        }
        order.sort_by_key(|&(r, _)| (self.chunk(r).blob_end, self.chunk(r).blob_offset));
        // Lowest blob offset still needed from each position of `order` on: bytes below
        // it may be dropped.
        let mut needed_from = vec![u64::MAX; order.len() + 1];
        for i in (0..order.len()).rev() {
            needed_from[i] = needed_from[i + 1].min(self.chunk(order[i].0).blob_offset);
        }
        let started = Instant::now();
        // `buf` holds blob bytes `base..base + buf.len()`.
        let mut base = start;
        let mut buf: Vec<u8> = Vec::with_capacity(prealloc(first.end - first.start));
        let mut next = 0usize;
        let skipped = "the fetcher skipped the chunk's bytes";
        let mut received = 0u64;
        let res = self
            .fetcher
            .read_ranges_streaming(ranges, &mut |off, piece| {
                let piece_end = off.saturating_add(piece.len() as u64);
                received = received.saturating_add(piece.len() as u64);
                if off < start || piece_end > end {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the fetcher returned bytes outside the ranges asked for",
                    ));
                }
                let have = base + buf.len() as u64;
                if piece_end <= have {
                    // Repeated by a retried attempt.
                    return Ok(());
                }
                if off > have {
                    // The fetcher moved on to a later range.
                    buf.clear();
                    base = off;
                }
                let have = base + buf.len() as u64;
                if piece_end - base > MAX_BUFFERED {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "too many bytes held back for one chunk",
                    ));
                }
                buf.extend_from_slice(&piece[(have - off) as usize..]);
                while let Some(&(r, key)) = order.get(next) {
                    let c = self.chunk(r);
                    if c.blob_end > piece_end {
                        break;
                    }
                    let res = if c.blob_offset < base {
                        Err(self.corrupt(r, skipped.into()))
                    } else {
                        let from = (c.blob_offset - base) as usize;
                        let to = (c.blob_end - base) as usize;
                        self.decode_bytes(r, key, &buf[from..to])
                    };
                    claims.finish(
                        &key,
                        res.as_ref().map(Arc::clone).map_err(|e| e.to_string()),
                    );
                    got.insert(key, res);
                    next += 1;
                }
                let keep = needed_from[next].min(base + buf.len() as u64);
                if keep > base {
                    buf.drain(..(keep - base) as usize);
                    base = keep;
                }
                self.add_coverage(off..piece_end);
                Ok(())
            });
        if let Some(m) = self.metrics.get() {
            m.registry_get
                .observe(started.elapsed().as_secs_f64() * 1e3);
            if on_demand {
                m.fetches.inc_by(1);
                m.fetched
                    .inc_by(i64::try_from(received).unwrap_or(i64::MAX));
            }
        }
        let what = || format!("bytes {start}-{end} of layer {}", self.desc.digest);
        let failure = match res {
            Err(source) => Some(Error::Fetch {
                what: what(),
                source,
            }),
            Ok(()) if next < order.len() => Some(Error::Fetch {
                what: what(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the fetcher returned fewer bytes than asked",
                ),
            }),
            Ok(()) => None,
        };
        if let Some(e) = failure {
            error!(layer = %self.desc.digest, error = %e, "fetch failed");
            let msg = e.to_string();
            for &(_, key) in &order[next..] {
                claims.finish(&key, Err(msg.clone()));
                got.insert(key, Err(e.duplicate()));
            }
        }
        debug!(layer = %self.desc.digest, ranges = ranges.len(), bytes = end - start,
            elapsed_ms = started.elapsed().as_millis() as u64, "fetched");
    }

    pub(super) fn corrupt(&self, r: ChunkRef, reason: String) -> Error {
        let node = self.index.node(r.0);
        let c = self.chunk(r);
        error!(layer = %self.desc.digest, file = %node.path, chunk_offset = c.file_offset,
            blob_offset = c.blob_offset, %reason, "refusing a corrupt chunk");
        Error::CorruptChunk {
            layer: self.desc.digest.clone(),
            file: node.path.clone(),
            file_offset: c.file_offset,
            reason,
        }
    }

    /// Decompresses and verifies one chunk from its compressed bytes and caches it.
    fn decode_bytes(&self, r: ChunkRef, key: Key, compressed: &[u8]) -> Result<Arc<Vec<u8>>> {
        let node = self.index.node(r.0);
        let c = self.chunk(r);
        let data = estargz::decode_chunk(self.compression, compressed, c, &node.path, self.verify)
            .map_err(|e| self.corrupt(r, e.to_string()))?;
        if data.len() as u64 != c.size {
            return Err(self.corrupt(
                r,
                format!("decoded {} bytes, expected {}", data.len(), c.size),
            ));
        }
        let data = Arc::new(data);
        // A chunk that every later read hashes against its digest needs no fsync: after a
        // power cut a damaged file fails that check and is fetched again. Only chunks
        // that nothing checks (no digest, or verification off) are written durably.
        let checked_later = self.verify && self.has_digest(r);
        if let Err(e) = self.cache.put_with(key, data.clone(), !checked_later) {
            warn!(error = %e, "could not store a chunk in the cache");
        }
        Ok(data)
    }
}

/// The blob ranges of some chunks, sorted, with overlaps (chunks sharing a compressed
/// member) folded together. Neighbours are left apart: merging them across gaps is the
/// fetcher's call.
fn chunk_ranges(ranges: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges.filter(|r| !r.is_empty()).collect();
    v.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_fold_overlaps_but_not_gaps() {
        let got = chunk_ranges([30..40, 0..10, 0..10, 5..12, 12..20, 50..50].into_iter());
        assert_eq!(got, vec![0..12, 12..20, 30..40]);
    }
}
