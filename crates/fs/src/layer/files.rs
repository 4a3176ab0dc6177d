//! Prefetch of a named set of files: whole files (or the chunks holding given byte
//! ranges of them) fetched together in one batch, for start-up lists worked out from
//! an image (its entrypoint and what that loads) or learned from earlier runs, rather
//! than recorded into the blob's order by a converter.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use estargz::{NodeId, NodeKind};
use tracing::{debug, info};

use super::{ChunkRef, Layer};
use crate::error::Result;

/// Most files one batch takes; lists come from image configs and records on disk.
pub const MAX_BATCH_FILES: usize = 16_384;

/// A regular file to prefetch, with the byte ranges of it wanted (sorted; `None`: all).
pub type PlannedFile = (NodeId, Option<Vec<Range<u64>>>);

/// What a layer's prefetch fetches instead of its prioritized region, when known before
/// the prefetch starts (see [`Layer::plan_prefetch`]).
pub(super) struct PrefetchPlan {
    pub(super) files: Vec<PlannedFile>,
    pub(super) max_bytes: u64,
}

/// A plan whose chunks span this many tenths of the prioritized region (or more) is
/// declined: the region then comes in one request.
const PLAN_MOST_TENTHS: u64 = 8;

/// Whether chunk `c` holds some of `ranges` (sorted) of its file; every chunk without.
fn chunk_wanted(c: &estargz::Chunk, ranges: Option<&[Range<u64>]>) -> bool {
    ranges.is_none_or(|rs| {
        let end = c.file_offset.saturating_add(c.size);
        // The first range ending after the chunk's start must begin before its end.
        let i = rs.partition_point(|r| r.end <= c.file_offset);
        rs.get(i).is_some_and(|r| r.start < end)
    })
}

/// What [`Layer::prefetch_files`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilesPrefetched {
    /// Regular files whose chunks were asked for (cached ones included).
    pub files: usize,
    /// Chunks that were not cached yet and were fetched.
    pub chunks_fetched: usize,
    /// Compressed blob bytes those chunks span.
    pub bytes_fetched: u64,
    /// Files left out because the batch would have passed `max_bytes` or
    /// [`MAX_BATCH_FILES`].
    pub skipped: usize,
}

impl Layer {
    /// Makes sure every chunk of the regular files `ids` is cached, fetching the missing
    /// ones together: their blob ranges go to the fetcher in one call (neighbouring
    /// ranges merged; the registry client puts many in one multi-range request), in blob
    /// order, each chunk verified as it arrives. Other ids (directories, links, unknown
    /// ids) are ignored. Files are taken in the order given until the missing chunks
    /// would pass `max_bytes` of the blob; the rest is left to on-demand reads. Runs on
    /// the calling thread as prioritized work (background fetch stays quiet meanwhile).
    pub fn prefetch_files(&self, ids: &[NodeId], max_bytes: u64) -> Result<FilesPrefetched> {
        let whole: Vec<(NodeId, Option<Vec<Range<u64>>>)> =
            ids.iter().map(|&id| (id, None)).collect();
        self.prefetch_file_ranges(&whole, max_bytes)
    }

    /// Makes the layer's prefetch (started later by [`Layer::start_prefetch`]) fetch
    /// `files` as [`Layer::prefetch_file_ranges`] does, instead of the blob's prioritized
    /// region: a record of what a workload read names fewer bytes than the whole files a
    /// converter put first. The rest of the region is left to reads and the background
    /// fetch. Returns `false`, changing nothing, once the prefetch has started, when a
    /// plan was given before, or when the plan's chunks span most of the region (one
    /// contiguous request for it then costs no more than the scattered ranges).
    pub fn plan_prefetch(&self, files: Vec<PlannedFile>, max_bytes: u64) -> bool {
        let region = self.prefetch_end.unwrap_or(0);
        let planned = self.planned_bytes(&files);
        if region > 0 && planned.saturating_mul(10) >= region.saturating_mul(PLAN_MOST_TENTHS) {
            debug!(layer = %self.desc.digest, planned, region,
                "the plan covers most of the prioritized region; prefetching the region");
            return false;
        }
        // Held so a prefetch cannot start between the check and the set.
        let work = self.work();
        if work.prefetch_started() {
            return false;
        }
        self.prefetch_plan
            .set(PrefetchPlan { files, max_bytes })
            .is_ok()
    }

    /// Compressed bytes of the chunks `files` names (cached or not).
    pub fn planned_bytes(&self, files: &[PlannedFile]) -> u64 {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        for (id, ranges) in files.iter().take(MAX_BATCH_FILES) {
            let Some(node) = self.index.get(*id) else {
                continue;
            };
            if node.kind != NodeKind::Reg || !seen.insert(*id) {
                continue;
            }
            for c in node.chunks.iter() {
                if chunk_wanted(c, ranges.as_deref()) {
                    total = total.saturating_add(c.blob_end.saturating_sub(c.blob_offset));
                }
            }
        }
        total
    }

    /// Whether a plan replaces the prioritized region as what the prefetch fetches.
    pub fn has_prefetch_plan(&self) -> bool {
        self.prefetch_plan.get().is_some()
    }

    /// [`Layer::prefetch_files`], where a file given with byte ranges (sorted) has only
    /// the chunks that hold some of those bytes fetched.
    pub fn prefetch_file_ranges(
        &self,
        files: &[PlannedFile],
        max_bytes: u64,
    ) -> Result<FilesPrefetched> {
        let _busy = self.cache.priority().busy();
        let started = Instant::now();
        let mut done = FilesPrefetched::default();
        let mut seen = std::collections::HashSet::new();
        let mut refs: Vec<ChunkRef> = Vec::new();
        let mut budget = max_bytes;
        for (id, ranges) in files {
            let id = *id;
            let Some(node) = self.index.get(id) else {
                continue;
            };
            if node.kind != NodeKind::Reg || node.chunks.is_empty() || !seen.insert(id) {
                continue;
            }
            if seen.len() > MAX_BATCH_FILES {
                done.skipped += 1;
                continue;
            }
            let missing: Vec<ChunkRef> = (0..node.chunks.len())
                .filter(|&i| chunk_wanted(&node.chunks[i], ranges.as_deref()))
                .map(|i| (id, i))
                .filter(|&r| !self.is_cached(r))
                .collect();
            let bytes: u64 = missing
                .iter()
                .map(|&r| {
                    let c = self.chunk(r);
                    c.blob_end.saturating_sub(c.blob_offset)
                })
                .sum();
            if bytes > budget {
                done.skipped += 1;
                continue;
            }
            budget -= bytes;
            done.files += 1;
            done.bytes_fetched += bytes;
            done.chunks_fetched += missing.len();
            refs.extend(missing);
        }
        if refs.is_empty() {
            debug!(layer = %self.desc.digest, files = done.files, "start-up files already cached");
            return Ok(done);
        }
        refs.sort_by_key(|&r| self.chunk(r).blob_offset);
        for res in self.fill(&refs, None, false, true) {
            res?;
        }
        self.prefetched
            .fetch_add(done.bytes_fetched, Ordering::Relaxed);
        info!(layer = %self.desc.digest, files = done.files, chunks = done.chunks_fetched,
            bytes = done.bytes_fetched, skipped = done.skipped,
            elapsed_ms = started.elapsed().as_millis() as u64, "start-up files prefetched");
        Ok(done)
    }

    /// Whether every chunk of file `id` holding some of `ranges` (sorted file byte
    /// ranges; `None`: the whole file) is cached, so that reading those bytes needs no
    /// network.
    pub fn file_cached(&self, id: NodeId, ranges: Option<&[Range<u64>]>) -> bool {
        let Some(node) = self.index.get(id) else {
            return false;
        };
        node.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| chunk_wanted(c, ranges))
            .all(|(i, _)| self.is_cached((id, i)))
    }

    /// Whether a chunk is in the memory or disk cache (not verified here: the read
    /// that serves it verifies).
    fn is_cached(&self, r: ChunkRef) -> bool {
        let key = self.key_of(r);
        self.cache.get_mem(&key).is_some() || self.cache.contains(&key, self.in_file(r).as_ref())
    }
}
