//! Fetching ahead of readers: the prefetch of prioritized files, read-ahead of readers
//! that walk the blob in order, and the background windows that make the layer fully
//! local. Prefetch and background runs are started once per layer on the fetch pool,
//! however many callers ask.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use estargz::{Index, NodeId, NodeKind};
use tracing::{debug, info, warn};

use super::{first_chunk, ChunkRef, Layer};
use crate::error::Result;
use crate::pool::FetchPool;

/// Target size of one background fetch request.
const WINDOW_BYTES: u64 = 4 << 20;

/// A run of the blob fetched by one background request: its byte range and its chunks,
/// as a range of [`Layer::order`].
pub(super) struct Window {
    pub range: Range<u64>,
    pub chunks: Range<usize>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    Running,
    Done,
}

/// Where the layer's prefetch and background fetch stand.
#[derive(Default)]
pub(super) struct Work {
    prefetch: Phase,
    /// Held by [`Layer::hold_prefetch`]: a start waits (in `start_wanted`) until
    /// [`Layer::release_prefetch`].
    held: bool,
    start_wanted: Option<FetchPool>,
    /// Background workers asked for while prefetch still runs; started after it.
    background_pending: Option<usize>,
    background: Phase,
}

impl Work {
    /// Whether the prefetch was started (running or done).
    pub(super) fn prefetch_started(&self) -> bool {
        self.prefetch != Phase::Idle
    }
}

/// One background run: the next window to take and the workers still taking them.
struct BackgroundRun {
    next: AtomicUsize,
    live: AtomicUsize,
    failed: AtomicBool,
}

impl Layer {
    pub(super) fn work(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the read-ahead of an access to `len` bytes at `offset` of file `id` (an open
    /// is an access to the whole file) and returns the blob ranges to fetch ahead of the
    /// reader, if the accesses walk the blob in order: ranges to fetch side by side with
    /// [`Layer::read_ahead`], off the reader's thread. `cached`, when known, tells whether
    /// the access was served locally.
    pub fn note_access(
        &self,
        id: NodeId,
        offset: u64,
        len: u64,
        cached: Option<bool>,
    ) -> Vec<Range<u64>> {
        if self.is_complete() {
            return Vec::new();
        }
        // While the prefetch streams the blob in, reads that wait for its chunks are not
        // misses to read ahead of: a read-ahead then fetched megabytes past the
        // prioritized files that the workload never asked for.
        if self.work().prefetch == Phase::Running {
            return Vec::new();
        }
        let Some(node) = self.index.get(id).filter(|n| n.kind == NodeKind::Reg) else {
            return Vec::new();
        };
        let first = first_chunk(node, offset);
        let chunks = node.chunks_for(offset, len);
        let (Some(a), Some(b)) = (chunks.first(), chunks.last()) else {
            return Vec::new();
        };
        let last = first + chunks.len() - 1;
        let local =
            || cached.unwrap_or_else(|| self.has_local((id, first)) && self.has_local((id, last)));
        let dir_end = || self.dir_end(node.parent).unwrap_or(u64::MAX);
        self.readahead.access(
            a.blob_offset..b.blob_end,
            self.payload_end,
            local,
            node.parent,
            dir_end,
            |gap| self.unread_files(gap),
        )
    }

    /// The chunks whose data starts in blob range `range`, in blob order.
    fn chunks_starting_in(&self, range: Range<u64>) -> impl Iterator<Item = ChunkRef> + '_ {
        let blob_offset = |r: &ChunkRef| self.chunk(*r).blob_offset;
        let from = self.order.partition_point(|r| blob_offset(r) < range.start);
        self.order[from..]
            .iter()
            .take_while(move |r| blob_offset(r) < range.end)
            .copied()
    }

    /// How many files have data starting in blob range `gap` that is neither local
    /// nor being fetched, counted up to one more than read-ahead tolerates.
    fn unread_files(&self, gap: Range<u64>) -> usize {
        /// Chunks looked at: the gap is at most read-ahead's, but tiny files are many.
        const MAX_SCANNED: usize = 512;
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let mut files: Vec<NodeId> = Vec::new();
        for r in self.chunks_starting_in(gap).take(MAX_SCANNED) {
            if files.contains(&r.0) || self.has_local(r) || inflight.contains_key(&self.key_of(r)) {
                continue;
            }
            files.push(r.0);
            if files.len() > crate::readahead::MAX_SKIPPED_FILES {
                break;
            }
        }
        files.len()
    }

    /// Where the file data of directory `dir`'s own files ends in the blob.
    fn dir_end(&self, dir: NodeId) -> Option<u64> {
        self.index
            .get(dir)?
            .children
            .values()
            .filter_map(|&c| self.index.get(c))
            .filter(|n| n.kind == NodeKind::Reg)
            .filter_map(|n| n.chunks.last().map(|c| c.blob_end))
            .max()
    }

    /// Fetches the chunks starting in blob range `range` that are neither cached nor
    /// being fetched, as reading does (verified, deduplicated), in as few requests as
    /// their layout allows. Failures only cost the read-ahead: readers fetch again.
    pub fn read_ahead(&self, range: Range<u64>) {
        if self.stopped() || self.is_complete() {
            return;
        }
        let _busy = self.cache.priority().busy();
        let mut refs: Vec<ChunkRef> = self
            .chunks_starting_in(range.clone())
            .filter(|&r| !self.has_local(r))
            .collect();
        if let Ok(map) = self.inflight.lock() {
            refs.retain(|&r| !map.contains_key(&self.key_of(r)));
        }
        if refs.is_empty() {
            return;
        }
        let started = Instant::now();
        let chunks = refs.len();
        // The cache was just looked at for these chunks.
        for res in self.fill(&refs, None, false, false) {
            if let Err(e) = res {
                debug!(layer = %self.desc.digest, error = %e, "read-ahead failed");
                return;
            }
        }
        debug!(layer = %self.desc.digest, from = range.start, to = range.end, chunks,
            elapsed_ms = started.elapsed().as_millis() as u64, "read ahead");
    }

    /// Whether the layer has anything to prefetch: prioritized files, or a speculative
    /// head that was fetched (see [`Layer::open_with_head`]).
    pub fn has_prefetch(&self) -> bool {
        self.prefetch_end.is_some()
            || self.prefetch_plan.get().is_some()
            || self.head.as_ref().is_some_and(|h| h.in_use())
    }

    /// Fetches the prioritized files (blob range `0..prefetch_end`) in one request and
    /// caches every chunk in it, on the calling thread; with a speculative head, the
    /// chunks lying wholly in it too (their bytes are here already). Does nothing for
    /// layers with neither. [`Layer::start_prefetch`] runs it once on the fetch pool.
    pub fn prefetch(&self) -> Result<()> {
        let res = self.prefetch_inner();
        if let Some(h) = &self.head {
            h.release();
        }
        res
    }

    fn prefetch_inner(&self) -> Result<()> {
        let planned = self.prefetch_plan.get();
        if let Some(plan) = planned {
            self.prefetch_file_ranges(&plan.files, plan.max_bytes)?;
        }
        // A plan stands in for the prioritized region; the head's chunks are taken all
        // the same, their bytes being here already.
        let end = match planned {
            Some(_) => 0,
            None => self.prefetch_end.unwrap_or(0),
        };
        let head = self
            .head
            .as_ref()
            .filter(|h| h.in_use())
            .map_or(0, |h| h.len());
        if end == 0 && head == 0 {
            return Ok(());
        }
        let _busy = self.cache.priority().busy();
        let mut wend = end;
        let mut refs = Vec::new();
        for w in &self.windows {
            for &r in &self.order[w.chunks.clone()] {
                let c = self.chunk(r);
                if c.blob_offset < end || c.blob_end <= head {
                    wend = wend.max(c.blob_end);
                    refs.push(r);
                }
            }
        }
        if refs.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        for res in self.fill(&refs, Some(0..wend), false, true) {
            res?;
        }
        if planned.is_none() {
            self.prefetched
                .store(wend.min(self.blob_size), Ordering::Relaxed);
        }
        info!(layer = %self.desc.digest, bytes = wend, chunks = refs.len(), head,
            elapsed_ms = started.elapsed().as_millis() as u64, "prefetch done");
        Ok(())
    }

    /// Starts the prefetch on `pool` unless it was started before (by a mount, or by
    /// whoever opened the layer ahead of its mount): it runs once per layer. A layer
    /// without a prefetch range counts as prefetched at once.
    pub fn start_prefetch(self: &Arc<Self>, pool: &FetchPool) {
        {
            let mut w = self.work();
            if w.prefetch != Phase::Idle {
                return;
            }
            if w.held {
                w.start_wanted = Some(pool.clone());
                return;
            }
            if !self.has_prefetch() {
                w.prefetch = Phase::Done;
                return;
            }
            w.prefetch = Phase::Running;
        }
        let (layer, pool2) = (self.clone(), pool.clone());
        pool.spawn(move || {
            // Marks the prefetch done even if it panics, so waiters and the background
            // fetch that follows are not held up forever.
            struct Finish(Arc<Layer>, FetchPool);
            impl Drop for Finish {
                fn drop(&mut self) {
                    self.0.prefetch_finished(&self.1);
                }
            }
            let finish = Finish(layer, pool2);
            if let Err(e) = finish.0.prefetch() {
                warn!(layer = %finish.0.desc.digest, error = %e, "prefetch failed");
            }
        });
    }

    fn prefetch_finished(self: &Arc<Self>, pool: &FetchPool) {
        let pending = {
            let mut w = self.work();
            w.prefetch = Phase::Done;
            w.background_pending.take()
        };
        self.work_changed.notify_all();
        if let Some(workers) = pending {
            self.launch_background(pool, workers);
        }
    }

    /// Waits up to `timeout` for a prefetch started by [`Layer::start_prefetch`] (or
    /// held back to be planned); returns whether none is running or held any more
    /// (finished, failed, or never started).
    pub fn wait_prefetch(&self, timeout: Duration) -> bool {
        let w = self.work();
        let busy = |w: &mut Work| w.prefetch == Phase::Running || w.held;
        let (mut w, _) = self
            .work_changed
            .wait_timeout_while(w, timeout, busy)
            .unwrap_or_else(|p| p.into_inner());
        !busy(&mut w)
    }

    /// Holds the prefetch back while what it fetches is still being decided (a record
    /// on its way, see [`Layer::plan_prefetch`]): starts asked for meanwhile wait for
    /// [`Layer::release_prefetch`]. Returns `false` once the prefetch has started.
    pub fn hold_prefetch(&self) -> bool {
        let mut w = self.work();
        if w.prefetch != Phase::Idle {
            return false;
        }
        w.held = true;
        true
    }

    /// Ends [`Layer::hold_prefetch`], starting the prefetch if a start was asked for
    /// meanwhile.
    pub fn release_prefetch(self: &Arc<Self>) {
        let wanted = {
            let mut w = self.work();
            w.held = false;
            w.start_wanted.take()
        };
        self.work_changed.notify_all();
        if let Some(pool) = wanted {
            self.start_prefetch(&pool);
        }
    }

    /// Starts fetching the rest of the layer on `pool` in large windows, at most
    /// `workers` at a time, each window only once no prioritized work (of any layer
    /// sharing the cache) has run for the quiet period. Waits for a running prefetch to
    /// end first. Does nothing while a background run is pending or running, or once
    /// the layer is complete.
    pub fn start_background(self: &Arc<Self>, pool: &FetchPool, workers: usize) {
        {
            let mut w = self.work();
            if self.is_complete()
                || w.background == Phase::Running
                || w.background_pending.is_some()
            {
                return;
            }
            if w.prefetch == Phase::Running {
                w.background_pending = Some(workers);
                return;
            }
        }
        self.launch_background(pool, workers);
    }

    fn launch_background(self: &Arc<Self>, pool: &FetchPool, workers: usize) {
        let workers = workers.max(1);
        {
            let mut w = self.work();
            if w.background == Phase::Running {
                return;
            }
            w.background = Phase::Running;
        }
        let run = Arc::new(BackgroundRun {
            next: AtomicUsize::new(0),
            live: AtomicUsize::new(workers),
            failed: AtomicBool::new(false),
        });
        for _ in 0..workers {
            let (layer, run, p) = (self.clone(), run.clone(), pool.clone());
            pool.spawn_background(move || layer.background_step(run, p));
        }
    }

    /// [`Layer::start_background`], then waits for the run to end; returns whether the
    /// whole layer is now local.
    pub fn background_fetch(self: &Arc<Self>, pool: &FetchPool, workers: usize) -> bool {
        self.start_background(pool, workers);
        let w = self.work();
        let _w = self
            .work_changed
            .wait_while(w, |w| {
                w.background == Phase::Running || w.background_pending.is_some()
            })
            .unwrap_or_else(|p| p.into_inner());
        self.is_complete()
    }

    /// One window of a background run, then the worker queues itself again: windows of
    /// every layer take turns on the pool's background threads.
    fn background_step(self: Arc<Self>, run: Arc<BackgroundRun>, pool: FetchPool) {
        /// Ends this worker unless it queued its next step; the last one out settles
        /// the run. A panic counts as a failed window.
        struct Step {
            layer: Arc<Layer>,
            run: Arc<BackgroundRun>,
            requeued: bool,
        }
        impl Drop for Step {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.run.failed.store(true, Ordering::SeqCst);
                }
                if !self.requeued && self.run.live.fetch_sub(1, Ordering::SeqCst) == 1 {
                    self.layer.background_finished(&self.run);
                }
            }
        }
        let mut step = Step {
            layer: self,
            run,
            requeued: false,
        };
        let layer = &step.layer;
        if layer.stopped() {
            return;
        }
        let i = step.run.next.fetch_add(1, Ordering::SeqCst);
        let Some(w) = layer.windows.get(i) else {
            return;
        };
        let Some(_slot) = layer.cache.priority().background_slot(&layer.stop) else {
            return;
        };
        let chunks = &layer.order[w.chunks.clone()];
        if chunks.iter().all(|&r| layer.has_local(r)) {
            layer.add_coverage(w.range.clone());
        } else {
            let started = Instant::now();
            let results = layer.fill(chunks, Some(w.range.clone()), false, true);
            if let Some(m) = layer.metrics.get() {
                m.background.observe(started.elapsed().as_secs_f64() * 1e3);
            }
            for res in results {
                if let Err(e) = res {
                    warn!(layer = %layer.desc.digest, error = %e, "background fetch failed");
                    step.run.failed.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        step.requeued = true;
        let (layer, run) = (step.layer.clone(), step.run.clone());
        let p = pool.clone();
        pool.spawn_background(move || layer.background_step(run, p));
    }

    fn background_finished(&self, run: &BackgroundRun) {
        let done = !run.failed.load(Ordering::SeqCst) && !self.stopped();
        if done {
            self.complete.store(true, Ordering::SeqCst);
            // Everything else in the blob (TOC, footer, landmarks) holds no file data.
            self.add_coverage(0..self.blob_size);
            info!(layer = %self.desc.digest, "layer is fully local");
        }
        self.work().background = Phase::Done;
        self.work_changed.notify_all();
    }
}

/// Lists every chunk in blob order and cuts the blob's data into contiguous windows of
/// about [`WINDOW_BYTES`], never splitting a compressed member, covering `0..payload_end`.
pub(super) fn plan_windows(index: &Index, payload_end: u64) -> (Vec<ChunkRef>, Vec<Window>) {
    let mut refs: Vec<(u64, u64, ChunkRef)> = Vec::new();
    for (id, node) in index.nodes() {
        if node.kind == NodeKind::Reg {
            for (i, c) in node.chunks.iter().enumerate() {
                refs.push((c.blob_offset, c.inner_offset, (id, i)));
            }
        }
    }
    refs.sort_unstable();
    let order: Vec<ChunkRef> = refs.iter().map(|&(_, _, r)| r).collect();
    let mut windows = Vec::new();
    let (mut start, mut end) = (0u64, 0u64);
    let mut first = 0usize;
    for (n, &r) in order.iter().enumerate() {
        let c = &index.node(r.0).chunks[r.1];
        if n > first && c.blob_offset >= end && c.blob_end.max(end) - start > WINDOW_BYTES {
            windows.push(Window {
                range: start..end,
                chunks: first..n,
            });
            start = end;
            first = n;
        }
        end = end.max(c.blob_end);
    }
    windows.push(Window {
        range: start..end.max(payload_end),
        chunks: first..order.len(),
    });
    (order, windows)
}
