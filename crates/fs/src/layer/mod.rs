//! One opened layer: its verified TOC and index and the mapping from file reads to
//! chunks. The work behind a read lives in the submodules: in-flight fills and chunk
//! decoding (`fill`), named start-up files fetched in one batch (`files`), prefetch, read-ahead and background windows (`windows`), the set of
//! fetched blob bytes behind the state file (`coverage`), whole-file copies for
//! passthrough (`materialize`), and the size of the first read at the blob's end (`tail`).

mod coverage;
mod files;
mod fill;
mod materialize;
mod tail;
mod windows;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use estargz::{Compression, Index, NodeId, NodeKind, OpenOptions, Reader};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use crate::cache::{ChunkCache, Key};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetcher::{Fetcher, SourceAdapter};
use crate::head::{Head, HeadFetcher, MAX_SPECULATIVE_HEAD};
use crate::metrics::{FsMetrics, LayerGauges, LayerOps, Op};
use crate::readahead::Stream;

use coverage::RangeSet;
use files::PrefetchPlan;
pub use files::{FilesPrefetched, PlannedFile, MAX_BATCH_FILES};
use fill::Slot;
pub use tail::{tail_read, TailSizes, MAX_TAIL_READ, MIN_TAIL_READ, TAIL_READ};
use windows::{plan_windows, Window, Work};

/// Most bytes reserved up front for one answer or one fetch: sizes come from the TOC,
/// the kernel or the fetcher, so memory beyond this grows only with bytes that arrived.
const PREALLOC_CAP: u64 = 8 << 20;

/// What the daemon knows about a layer from its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    /// `sha256:...` of the blob.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// The `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: Option<String>,
    /// Bytes at the end of the blob thought to hold its TOC and footer (the
    /// descriptor's `toc-tail` or zstd:chunked manifest position, or a size remembered
    /// from the repository's other layers; see [`TailSizes`]); `None`: unknown. Sizes
    /// the first read, bounded by [`tail_read`]; a wrong value costs a second read.
    pub toc_tail: Option<u64>,
}

/// A chunk of a file: (node, index in its chunk list).
type ChunkRef = (NodeId, usize);

/// An opened layer. Share it behind an `Arc`; every method takes `&self`.
pub struct Layer {
    desc: LayerDesc,
    index: Index,
    compression: Compression,
    fetcher: Arc<dyn Fetcher>,
    cache: Arc<ChunkCache>,
    verify: bool,
    blob_size: u64,
    inflight: Mutex<HashMap<Key, Arc<Slot>>>,
    coverage: Mutex<RangeSet>,
    /// Every chunk of the layer in blob order.
    order: Vec<ChunkRef>,
    windows: Vec<Window>,
    readahead: Stream,
    /// End of the file data in the blob (TOC and footer follow).
    payload_end: u64,
    /// Where the TOC starts in the blob (the footer, for a TOC kept outside the blob).
    toc_start: u64,
    /// Prefetch covers blob bytes `0..prefetch_end`: up to the prefetch landmark, or
    /// without one `prefetch_size` bytes; none with the no-prefetch landmark.
    prefetch_end: Option<u64>,
    /// Set before the prefetch starts: fetch these files (or byte ranges of them)
    /// instead of `0..prefetch_end`.
    prefetch_plan: OnceLock<PrefetchPlan>,
    complete: AtomicBool,
    stop: AtomicBool,
    prefetched: AtomicU64,
    /// Prefetch and background runs started on the fetch pool.
    work: Mutex<Work>,
    work_changed: Condvar,
    /// The blob's first bytes, fetched alongside the TOC, until the prefetch took them.
    head: Option<Arc<Head>>,
    open_timings: OpenTimings,
    /// Set once the layer is given a metrics handle.
    metrics: OnceLock<LayerOps>,
}

/// How long the phases of [`Layer::open`] took.
struct OpenTimings {
    /// Until the first read (the blob's tail, footer included) was in.
    footer: Duration,
    /// Until the last read (the TOC's end) was in.
    toc: Duration,
    /// Parsing and indexing the TOC after that.
    deserialize: Duration,
}

/// Bytes of a layer's head to fetch in parallel with its footer and TOC (see
/// [`Layer::open_with_head`]): `hint`, the descriptor's `prefetch-end` annotation (0: no
/// prioritized files), up to `speculative_head_kib`. Nothing without a hint: a guessed
/// head costs more in bytes the prefetch never needed than it saves in round trips
/// (docs/benchmarks/fs.md, "Start-up"). 0 when prefetch is off.
pub fn speculative_head(cfg: &Config, hint: Option<u64>) -> u64 {
    if cfg.noprefetch {
        return 0;
    }
    hint.unwrap_or(0)
        .min(cfg.speculative_head_kib.saturating_mul(1024))
        .min(MAX_SPECULATIVE_HEAD)
}

impl Layer {
    /// Reads footer and TOC through `fetcher`, checks the TOC against the descriptor's
    /// TOC digest and indexes the layer. Without a TOC digest the layer is refused unless
    /// `allow_no_verification` (or `disable_verification`) is set.
    pub fn open(
        fetcher: Arc<dyn Fetcher>,
        desc: LayerDesc,
        cfg: &Config,
        cache: Arc<ChunkCache>,
    ) -> Result<Layer> {
        Self::open_with(fetcher, desc, cfg, cache, None, 0)
    }

    /// As [`Layer::open`]; `external_toc` supplies the TOC of a blob whose footer says
    /// it is stored outside (in the image's TOC image), and is called only then.
    pub fn open_with_external_toc(
        fetcher: Arc<dyn Fetcher>,
        desc: LayerDesc,
        cfg: &Config,
        cache: Arc<ChunkCache>,
        external_toc: Option<estargz::ExternalTocFn>,
    ) -> Result<Layer> {
        Self::open_with(fetcher, desc, cfg, cache, external_toc, 0)
    }

    /// [`Layer::open`], fetching the first `head` bytes of the blob (where prioritized
    /// files live; see [`speculative_head`]) in parallel with the footer and TOC rather
    /// than after them, so that the prefetch finds them arrived or arriving. The fetch
    /// starts with the layer's first network read, so a layer whose TOC is cached fetches
    /// nothing ahead. The bytes are held until the prefetch has decoded every chunk that
    /// lies wholly in them, even in a layer without prioritized files. `head` is bounded
    /// by 32 MiB and by the part of the blob before the TOC read.
    pub fn open_with_head(
        fetcher: Arc<dyn Fetcher>,
        desc: LayerDesc,
        cfg: &Config,
        cache: Arc<ChunkCache>,
        head: u64,
    ) -> Result<Layer> {
        Self::open_with(fetcher, desc, cfg, cache, None, head)
    }

    /// Both of the above: an external TOC source and a speculative head.
    pub fn open_with(
        fetcher: Arc<dyn Fetcher>,
        desc: LayerDesc,
        cfg: &Config,
        cache: Arc<ChunkCache>,
        external_toc: Option<estargz::ExternalTocFn>,
        head: u64,
    ) -> Result<Layer> {
        let tail = tail_read(desc.toc_tail, fetcher.size());
        let head = head
            .min(MAX_SPECULATIVE_HEAD)
            .min(fetcher.size().saturating_sub(tail));
        let (fetcher, head) = if head > 0 {
            let h = Head::new(head);
            let f: Arc<dyn Fetcher> = Arc::new(HeadFetcher::new(fetcher, h.clone()));
            (f, Some(h))
        } else {
            (fetcher, None)
        };
        let res = Layer::open_inner(fetcher, desc, cfg, cache, external_toc, head.clone(), tail);
        if let Some(h) = &head {
            match &res {
                Ok(_) => h.drop_if_unstarted(),
                Err(_) => h.release(),
            }
        }
        res
    }

    fn open_inner(
        fetcher: Arc<dyn Fetcher>,
        desc: LayerDesc,
        cfg: &Config,
        cache: Arc<ChunkCache>,
        external_toc: Option<estargz::ExternalTocFn>,
        head: Option<Arc<Head>>,
        tail: u64,
    ) -> Result<Layer> {
        let _busy = cache.priority().busy();
        let expected = if cfg.disable_verification {
            None
        } else {
            desc.toc_digest.clone()
        };
        if expected.is_none() && !cfg.disable_verification && !cfg.allow_no_verification {
            return Err(Error::NoVerification {
                layer: desc.digest.clone(),
            });
        }
        if fetcher.size() != desc.size {
            warn!(layer = %desc.digest, descriptor = desc.size, fetched = fetcher.size(),
                "blob size differs from the descriptor; using the fetched size");
        }
        let opts = OpenOptions {
            tail_size: tail,
            expected_toc_digest: expected.clone(),
            external_toc,
            ..OpenOptions::default()
        };
        // Footer and TOC come from the cache only when a TOC digest vouches for them.
        let trusted_cache = expected
            .is_some()
            .then_some((cache.as_ref(), desc.digest.as_str()));
        let started = Instant::now();
        let mut src = SourceAdapter::new(fetcher.as_ref(), trusted_cache);
        let mut opened = Reader::open(&src, &opts);
        if opened.is_err() && trusted_cache.is_some() {
            cache.drop_ranges(&desc.digest);
            src = SourceAdapter::new(fetcher.as_ref(), trusted_cache);
            opened = Reader::open(&src, &opts);
        }
        let parsed = Instant::now();
        let reader = opened.map_err(|e| match e {
            estargz::Error::IoAt { context, source } => Error::Fetch {
                what: format!("{context} of layer {}", desc.digest),
                source,
            },
            estargz::Error::Io(source) => Error::Fetch {
                what: format!("TOC of layer {}", desc.digest),
                source,
            },
            source => Error::Format {
                layer: desc.digest.clone(),
                source,
            },
        })?;
        let (footer_done, toc_done) = src
            .finished
            .lock()
            .ok()
            .and_then(|f| *f)
            .unwrap_or((started, started));
        let open_timings = OpenTimings {
            footer: footer_done.duration_since(started),
            toc: toc_done.duration_since(started),
            deserialize: parsed.duration_since(toc_done),
        };
        let mut coverage = RangeSet::default();
        for r in src.read.into_inner().unwrap_or_default() {
            coverage.insert(r);
        }
        let payload_end = reader.payload_end();
        let prefetch_end = if reader.index.no_prefetch_landmark {
            None
        } else {
            reader.index.prefetch_end.or_else(|| {
                cfg.prefetch_bytes(None)
                    .map(|n| n.min(payload_end))
                    .filter(|&n| n > 0)
            })
        };
        let (order, windows) = plan_windows(&reader.index, payload_end);
        info!(layer = %desc.digest, files = reader.index.len(), toc = %reader.toc_digest,
            "layer opened");
        Ok(Layer {
            compression: reader.compression(),
            blob_size: fetcher.size(),
            index: reader.index,
            desc,
            fetcher,
            cache,
            verify: !cfg.disable_verification,
            inflight: Mutex::new(HashMap::new()),
            coverage: Mutex::new(coverage),
            order,
            windows,
            readahead: Stream::new(cfg.sequential_readahead_kib.saturating_mul(1024)),
            payload_end,
            toc_start: reader.toc_range.start,
            prefetch_end,
            prefetch_plan: OnceLock::new(),
            complete: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            prefetched: AtomicU64::new(0),
            work: Mutex::new(Work::default()),
            work_changed: Condvar::new(),
            open_timings,
            metrics: OnceLock::new(),
            head,
        })
    }

    /// Records into `metrics` from now on (the first handle given wins), starting with
    /// how long the open took.
    pub fn observe_with(&self, metrics: &FsMetrics) {
        let mut fresh = false;
        self.metrics.get_or_init(|| {
            fresh = true;
            metrics.layer_ops(&self.desc.digest)
        });
        if fresh {
            let t = &self.open_timings;
            let layer = &self.desc.digest;
            metrics.observe_ms(Op::FooterGet, layer, t.footer);
            metrics.observe_ms(Op::TocGet, layer, t.toc);
            metrics.observe_ms(Op::TocDeserialize, layer, t.deserialize);
        }
    }

    pub fn desc(&self) -> &LayerDesc {
        &self.desc
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Bytes at the end of the blob holding its TOC and footer (just the footer for a
    /// TOC kept outside the blob): what the first read of a like layer should take
    /// (see [`TailSizes::learn`]).
    pub fn toc_tail(&self) -> u64 {
        self.blob_size.saturating_sub(self.toc_start)
    }

    /// The blob range `0..end` prefetch fetches, if any: the prefetch landmark's
    /// offset, else `prefetch_size`, never with the no-prefetch landmark.
    pub fn prefetch_end(&self) -> Option<u64> {
        self.prefetch_end
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Blob bytes that are local (fetched, or found in the cache).
    pub fn fetched_bytes(&self) -> u64 {
        self.coverage
            .lock()
            .map(|c| c.total().min(self.blob_size))
            .unwrap_or(0)
    }

    /// Size of the blob as the registry (or file) reports it.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// Blob bytes covered by a finished prefetch (0 before, or without a landmark).
    pub fn prefetched_bytes(&self) -> u64 {
        self.prefetched.load(Ordering::Relaxed)
    }

    /// Whether every chunk of the layer is in the cache.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    /// Asks background work to stop at its next step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn add_coverage(&self, r: Range<u64>) {
        if let Ok(mut cov) = self.coverage.lock() {
            cov.insert(r);
        }
    }

    /// The state file's content: `{"digest","size","fetchedSize","fetchedPercent"}`.
    pub fn state_json(&self) -> Vec<u8> {
        let fetched = self.fetched_bytes();
        let percent = if self.blob_size == 0 {
            100.0
        } else {
            fetched as f64 * 100.0 / self.blob_size as f64
        };
        let v = serde_json::json!({
            "digest": self.desc.digest,
            "size": self.blob_size,
            "fetchedSize": fetched,
            "fetchedPercent": percent,
        });
        let mut out = serde_json::to_vec(&v).unwrap_or_default();
        out.push(b'\n');
        out
    }

    fn chunk(&self, (id, i): ChunkRef) -> &estargz::Chunk {
        &self.index.node(id).chunks[i]
    }

    fn key_of(&self, r: ChunkRef) -> Key {
        let c = self.chunk(r);
        match c.digest {
            Some(d) => d,
            None => {
                let mut h = Sha256::new();
                h.update(self.desc.digest.as_bytes());
                h.update(c.blob_offset.to_le_bytes());
                h.update(c.inner_offset.to_le_bytes());
                h.update(c.size.to_le_bytes());
                h.finalize().into()
            }
        }
    }

    /// Whether chunk `r` is in the cache: in memory, in its own file, or in the
    /// whole-file copy of its file.
    fn has_local(&self, r: ChunkRef) -> bool {
        self.cache
            .contains(&self.key_of(r), self.in_file(r).as_ref())
    }

    fn regular(&self, id: NodeId) -> Result<&estargz::Node> {
        self.index
            .get(id)
            .filter(|n| n.kind == NodeKind::Reg)
            .ok_or(Error::NotAFile(u64::from(id) + 1))
    }

    /// Bytes `offset..offset+size` of file `id` if every chunk is in the memory cache or
    /// already verified on disk: no network and no hashing, so FUSE threads may answer
    /// with it directly.
    pub fn read_cached(&self, id: NodeId, offset: u64, size: u32) -> Option<Vec<u8>> {
        let node = self.regular(id).ok()?;
        let first = first_chunk(node, offset);
        let chunks = node.chunks_for(offset, u64::from(size));
        if chunks.is_empty() {
            return Some(Vec::new());
        }
        self.read_local(id, node, first, offset, size, chunks)
    }

    /// The read from chunks in memory or already verified on disk, taking only the
    /// requested bytes of each: a 4 KiB read of a cached 4 MiB chunk reads 4 KiB.
    fn read_local(
        &self,
        id: NodeId,
        node: &estargz::Node,
        first: usize,
        offset: u64,
        size: u32,
        chunks: &[estargz::Chunk],
    ) -> Option<Vec<u8>> {
        let end = offset.saturating_add(u64::from(size)).min(node.size);
        let mut out = Vec::with_capacity(prealloc(end.saturating_sub(offset)));
        for (i, c) in chunks.iter().enumerate() {
            let key = self.key_of((id, first + i));
            let from = offset.saturating_sub(c.file_offset);
            let to = end.saturating_sub(c.file_offset).min(c.size);
            if to <= from {
                return None;
            }
            match self.cache.get_mem(&key) {
                Some(d) => out.extend_from_slice(d.get(from as usize..to as usize)?),
                None => {
                    let at = self.in_file((id, first + i));
                    let len = (to - from) as usize;
                    out.extend(self.cache.read_verified(&key, at.as_ref(), from, len)?);
                }
            }
        }
        Some(out)
    }

    /// Bytes `offset..offset+size` of file `id` (shorter at the end of the file),
    /// fetching and verifying whatever is not cached.
    pub fn read(&self, id: NodeId, offset: u64, size: u32) -> Result<Vec<u8>> {
        // Even a cached read is prioritized work: background fetch waits for quiet.
        let _busy = self.cache.priority().busy();
        if let Some(data) = self.read_cached(id, offset, size) {
            return Ok(data);
        }
        self.read_missed(id, offset, size)
    }

    /// [`Layer::read`] after [`Layer::read_cached`] missed: goes straight to the fill,
    /// which looks at the cache once more per chunk (some may be on disk unverified, or
    /// have arrived meanwhile) and fetches the rest.
    pub(crate) fn read_missed(&self, id: NodeId, offset: u64, size: u32) -> Result<Vec<u8>> {
        let node = self.regular(id)?;
        let first = first_chunk(node, offset);
        let chunks = node.chunks_for(offset, u64::from(size));
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let _busy = self.cache.priority().busy();
        let refs: Vec<ChunkRef> = (first..first + chunks.len()).map(|i| (id, i)).collect();
        let datas = self
            .fill(&refs, None, true, true)
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        assemble(
            node,
            offset,
            size,
            chunks,
            datas.iter().map(|d| d.as_slice()),
        )
    }
}

impl LayerGauges for Layer {
    fn digest(&self) -> &str {
        &self.desc.digest
    }
    fn blob_size(&self) -> u64 {
        Layer::blob_size(self)
    }
    fn fetched_bytes(&self) -> u64 {
        Layer::fetched_bytes(self)
    }
    fn prefetched_bytes(&self) -> u64 {
        Layer::prefetched_bytes(self)
    }
}

/// Capacity to reserve for `len` bytes that are not here yet.
fn prealloc(len: u64) -> usize {
    len.min(PREALLOC_CAP) as usize
}

fn first_chunk(node: &estargz::Node, offset: u64) -> usize {
    node.chunks
        .partition_point(|c| c.file_offset + c.size <= offset)
}

fn assemble<'a>(
    node: &estargz::Node,
    offset: u64,
    size: u32,
    chunks: &[estargz::Chunk],
    datas: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<u8>> {
    let end = offset.saturating_add(u64::from(size)).min(node.size);
    let mut out = Vec::with_capacity(prealloc(end.saturating_sub(offset)));
    for (c, d) in chunks.iter().zip(datas) {
        let from = offset.saturating_sub(c.file_offset) as usize;
        let to = (end - c.file_offset).min(c.size) as usize;
        let piece = d.get(from..to).ok_or_else(|| Error::CorruptChunk {
            layer: String::new(),
            file: node.path.clone(),
            file_offset: c.file_offset,
            reason: "cached chunk is shorter than the TOC says".into(),
        })?;
        out.extend_from_slice(piece);
    }
    Ok(out)
}
