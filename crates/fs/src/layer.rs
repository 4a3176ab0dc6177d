//! One opened layer: its verified TOC and index, the mapping from file reads to chunks,
//! on-demand fetching (coalesced, deduplicated across readers, verified), prefetch,
//! low-priority background fetch and the fetched-bytes accounting behind the state file.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use estargz::{Compression, Index, NodeId, NodeKind, OpenOptions, Reader};
use sha2::{Digest as _, Sha256};
use tracing::{debug, error, info, warn};

use crate::cache::{ChunkCache, Key};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fetcher::{Fetcher, SourceAdapter};
use crate::readahead::Stream;

/// First read at the end of the blob: big enough that most TOCs come with the footer.
pub const TAIL_READ: u64 = 512 << 10;
/// Neighbouring missing chunks closer than this are fetched in one range.
const COALESCE_GAP: u64 = 32 << 10;
/// Target size of one background fetch request.
const WINDOW_BYTES: u64 = 4 << 20;

/// What the daemon knows about a layer from its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    /// `sha256:...` of the blob.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// The `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub toc_digest: Option<String>,
}

/// A chunk of a file: (node, index in its chunk list).
type ChunkRef = (NodeId, usize);

/// A run of the blob fetched by one background request: its byte range and its chunks,
/// as a range of [`Layer::order`].
struct Window {
    range: Range<u64>,
    chunks: Range<usize>,
}

type SlotResult = std::result::Result<Arc<Vec<u8>>, String>;

/// One chunk being fetched; later readers of the same chunk wait here.
#[derive(Default)]
struct Slot {
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
/// reader bails out early, so no waiter is left hanging.
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

/// Disjoint byte ranges with their total length.
#[derive(Default)]
struct RangeSet {
    map: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.map.remove(&s);
            self.total -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        self.total += end - start;
    }
}

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
    complete: AtomicBool,
    stop: AtomicBool,
    prefetched: AtomicU64,
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
            tail_size: TAIL_READ,
            expected_toc_digest: expected.clone(),
            ..OpenOptions::default()
        };
        // Footer and TOC come from the cache only when a TOC digest vouches for them.
        let trusted_cache = expected
            .is_some()
            .then_some((cache.as_ref(), desc.digest.as_str()));
        let mut src = SourceAdapter {
            fetcher: fetcher.as_ref(),
            read: Mutex::new(Vec::new()),
            cache: trusted_cache,
        };
        let mut opened = Reader::open(&src, &opts);
        if opened.is_err() && trusted_cache.is_some() {
            cache.drop_ranges(&desc.digest);
            src = SourceAdapter {
                fetcher: fetcher.as_ref(),
                read: Mutex::new(Vec::new()),
                cache: trusted_cache,
            };
            opened = Reader::open(&src, &opts);
        }
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
        let mut coverage = RangeSet::default();
        for r in src.read.into_inner().unwrap_or_default() {
            coverage.insert(r);
        }
        let payload_end = reader.payload_end();
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
            complete: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            prefetched: AtomicU64::new(0),
        })
    }

    pub fn desc(&self) -> &LayerDesc {
        &self.desc
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// Blob bytes that are local (fetched, or found in the cache).
    pub fn fetched_bytes(&self) -> u64 {
        self.coverage
            .lock()
            .map(|c| c.total.min(self.blob_size))
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

    fn key_of(&self, (id, i): ChunkRef) -> Key {
        let c = &self.index.node(id).chunks[i];
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
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        for (i, c) in chunks.iter().enumerate() {
            let key = self.key_of((id, first + i));
            let from = offset.saturating_sub(c.file_offset);
            let to = end.saturating_sub(c.file_offset).min(c.size);
            if to <= from {
                return None;
            }
            match self.cache.get_mem(&key) {
                Some(d) => out.extend_from_slice(d.get(from as usize..to as usize)?),
                None => out.extend(self.cache.read_verified(&key, from, (to - from) as usize)?),
            }
        }
        Some(out)
    }

    /// Bytes `offset..offset+size` of file `id` (shorter at the end of the file),
    /// fetching and verifying whatever is not cached.
    pub fn read(&self, id: NodeId, offset: u64, size: u32) -> Result<Vec<u8>> {
        let node = self.regular(id)?;
        let first = first_chunk(node, offset);
        let chunks = node.chunks_for(offset, u64::from(size));
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let _busy = self.cache.priority().busy();
        if let Some(data) = self.read_local(id, node, first, offset, size, chunks) {
            return Ok(data);
        }
        let refs: Vec<ChunkRef> = (first..first + chunks.len()).map(|i| (id, i)).collect();
        let datas = self
            .fill(&refs, None, true)
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
        let Some(node) = self.index.get(id).filter(|n| n.kind == NodeKind::Reg) else {
            return Vec::new();
        };
        let first = first_chunk(node, offset);
        let chunks = node.chunks_for(offset, len);
        let (Some(a), Some(b)) = (chunks.first(), chunks.last()) else {
            return Vec::new();
        };
        let last = first + chunks.len() - 1;
        let local = || {
            cached.unwrap_or_else(|| {
                self.cache.contains(&self.key_of((id, first)))
                    && self.cache.contains(&self.key_of((id, last)))
            })
        };
        self.readahead
            .access(a.blob_offset..b.blob_end, self.payload_end, local)
    }

    /// Fetches the chunks starting in blob range `range` that are neither cached nor
    /// being fetched, as reading does (verified, deduplicated), in as few requests as
    /// their layout allows. Failures only cost the read-ahead: readers fetch again.
    pub fn read_ahead(&self, range: Range<u64>) {
        if self.stop.load(Ordering::SeqCst) || self.is_complete() {
            return;
        }
        let _busy = self.cache.priority().busy();
        let blob_offset = |r: &ChunkRef| self.index.node(r.0).chunks[r.1].blob_offset;
        let from = self.order.partition_point(|r| blob_offset(r) < range.start);
        let mut refs: Vec<ChunkRef> = self.order[from..]
            .iter()
            .take_while(|r| blob_offset(r) < range.end)
            .filter(|&&r| !self.cache.contains(&self.key_of(r)))
            .copied()
            .collect();
        if let Ok(map) = self.inflight.lock() {
            refs.retain(|&r| !map.contains_key(&self.key_of(r)));
        }
        if refs.is_empty() {
            return;
        }
        let started = Instant::now();
        let chunks = refs.len();
        for res in self.fill(&refs, None, false) {
            if let Err(e) = res {
                debug!(layer = %self.desc.digest, error = %e, "read-ahead failed");
                return;
            }
        }
        debug!(layer = %self.desc.digest, from = range.start, to = range.end, chunks,
            elapsed_ms = started.elapsed().as_millis() as u64, "read ahead");
    }

    /// Makes sure each chunk in `refs` is cached and returns its bytes. Missing chunks are
    /// claimed (others wait for them instead of fetching again), fetched either as
    /// `window` in one request or as coalesced ranges, decoded and verified.
    fn fill(
        &self,
        refs: &[ChunkRef],
        window: Option<Range<u64>>,
        retry_shared: bool,
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
            if let Some(d) = self.cache.get(&key, self.verify && self.has_digest(r)) {
                states.push(St::Ready(d));
                continue;
            }
            let Ok(mut map) = self.inflight.lock() else {
                states.push(St::Failed(Error::Shared("in-flight table poisoned".into())));
                continue;
            };
            if let Some(slot) = map.get(&key) {
                states.push(St::Wait(slot.clone(), r));
            } else if let Some(d) = self.cache.get_mem(&key) {
                states.push(St::Ready(d));
            } else {
                let slot = Arc::new(Slot::default());
                map.insert(key, slot.clone());
                claims.slots.insert(key, slot);
                mine.push((r, key));
                states.push(St::Mine(key));
            }
        }

        let mut got: HashMap<Key, Result<Arc<Vec<u8>>>> = HashMap::new();
        if !mine.is_empty() {
            let ranges = match window {
                Some(w) => vec![w],
                None => estargz::coalesce(
                    mine.iter()
                        .map(|&((id, i), _)| self.index.node(id).chunks[i].blob_range())
                        .collect(),
                    COALESCE_GAP,
                ),
            };
            match ranges.as_slice() {
                [one] => self.fill_streamed(one, &mine, &mut claims, &mut got),
                _ => self.fill_ranges(&ranges, &mine, &mut claims, &mut got),
            }
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
                    Err(_) if retry_shared => self.fill_one(r),
                    Err(e) => Err(Error::Shared(e)),
                },
            })
            .collect()
    }

    /// Fetches `ranges` in one request and decodes the claimed chunks once all arrived.
    fn fill_ranges(
        &self,
        ranges: &[Range<u64>],
        mine: &[(ChunkRef, Key)],
        claims: &mut Claims<'_>,
        got: &mut HashMap<Key, Result<Arc<Vec<u8>>>>,
    ) {
        match self.fetch(ranges) {
            Err(e) => {
                error!(layer = %self.desc.digest, error = %e, "fetch failed");
                let msg = e.to_string();
                for (_, key) in mine {
                    claims.finish(key, Err(msg.clone()));
                }
                for (_, key) in mine {
                    got.insert(*key, Err(e.duplicate()));
                }
            }
            Ok(parts) => {
                for &(r, key) in mine {
                    let res = self.decode(r, key, ranges, &parts);
                    claims.finish(
                        &key,
                        res.as_ref().map(Arc::clone).map_err(|e| e.to_string()),
                    );
                    got.insert(key, res);
                }
            }
        }
    }

    /// Fetches one range and decodes each claimed chunk as soon as its bytes are in, so
    /// readers waiting for the front of a large window get it before the rest arrives.
    fn fill_streamed(
        &self,
        range: &Range<u64>,
        mine: &[(ChunkRef, Key)],
        claims: &mut Claims<'_>,
        got: &mut HashMap<Key, Result<Arc<Vec<u8>>>>,
    ) {
        let chunk = |r: ChunkRef| &self.index.node(r.0).chunks[r.1];
        let mut order: Vec<(ChunkRef, Key)> = Vec::with_capacity(mine.len());
        for &(r, key) in mine {
            let c = chunk(r);
            if c.blob_offset < range.start || c.blob_end > range.end {
                let res = Err(self.corrupt(r, "chunk lies outside the fetched ranges".into()));
                claims.finish(&key, Err("chunk lies outside the fetched ranges".into()));
                got.insert(key, res);
            } else {
                order.push((r, key));
            }
        }
        order.sort_by_key(|&(r, _)| (chunk(r).blob_end, chunk(r).blob_offset));
        let started = Instant::now();
        let mut buf: Vec<u8> = Vec::with_capacity((range.end - range.start) as usize);
        let mut next = 0usize;
        let res = self
            .fetcher
            .read_range_streaming(range.clone(), &mut |off, piece| {
                let have = range.start + buf.len() as u64;
                let piece_end = off + piece.len() as u64;
                if off > have || piece_end > range.end {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the fetcher returned bytes out of order",
                    ));
                }
                if piece_end <= have {
                    // Repeated by a retried attempt.
                    return Ok(());
                }
                buf.extend_from_slice(&piece[(have - off) as usize..]);
                while let Some(&(r, key)) = order.get(next) {
                    let c = chunk(r);
                    if c.blob_end > piece_end {
                        break;
                    }
                    let from = (c.blob_offset - range.start) as usize;
                    let to = (c.blob_end - range.start) as usize;
                    let res = self.decode_bytes(r, key, &buf[from..to]);
                    claims.finish(
                        &key,
                        res.as_ref().map(Arc::clone).map_err(|e| e.to_string()),
                    );
                    got.insert(key, res);
                    next += 1;
                }
                if let Ok(mut cov) = self.coverage.lock() {
                    cov.insert(range.start..piece_end);
                }
                Ok(())
            });
        let what = || {
            format!(
                "bytes {}-{} of layer {}",
                range.start, range.end, self.desc.digest
            )
        };
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
        debug!(layer = %self.desc.digest, bytes = range.end - range.start,
            elapsed_ms = started.elapsed().as_millis() as u64, "fetched");
    }

    fn fill_one(&self, r: ChunkRef) -> Result<Arc<Vec<u8>>> {
        self.fill(&[r], None, false)
            .pop()
            .unwrap_or_else(|| Err(Error::Shared("chunk was not fetched".into())))
    }

    fn has_digest(&self, (id, i): ChunkRef) -> bool {
        self.index.node(id).chunks[i].digest.is_some()
    }

    fn fetch(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let what = || format!("{} range(s) of layer {}", ranges.len(), self.desc.digest);
        let started = Instant::now();
        let parts = self
            .fetcher
            .read_ranges(ranges)
            .map_err(|source| Error::Fetch {
                what: what(),
                source,
            })?;
        let ok = parts.len() == ranges.len()
            && parts
                .iter()
                .zip(ranges)
                .all(|(p, r)| p.len() as u64 == r.end - r.start);
        if !ok {
            return Err(Error::Fetch {
                what: what(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the fetcher returned ranges of the wrong length",
                ),
            });
        }
        if let Ok(mut cov) = self.coverage.lock() {
            for r in ranges {
                cov.insert(r.clone());
            }
        }
        debug!(layer = %self.desc.digest, ranges = ranges.len(),
            elapsed_ms = started.elapsed().as_millis() as u64, "fetched");
        Ok(parts)
    }

    fn corrupt(&self, (id, i): ChunkRef, reason: String) -> Error {
        let node = self.index.node(id);
        let c = &node.chunks[i];
        error!(layer = %self.desc.digest, file = %node.path, chunk_offset = c.file_offset,
            blob_offset = c.blob_offset, %reason, "refusing a corrupt chunk");
        Error::CorruptChunk {
            layer: self.desc.digest.clone(),
            file: node.path.clone(),
            file_offset: c.file_offset,
            reason,
        }
    }

    fn decode(
        &self,
        r: ChunkRef,
        key: Key,
        ranges: &[Range<u64>],
        parts: &[Bytes],
    ) -> Result<Arc<Vec<u8>>> {
        let c = &self.index.node(r.0).chunks[r.1];
        let Some((range, part)) = ranges
            .iter()
            .zip(parts)
            .find(|(range, _)| range.start <= c.blob_offset && c.blob_end <= range.end)
        else {
            return Err(self.corrupt(r, "chunk lies outside the fetched ranges".into()));
        };
        let from = (c.blob_offset - range.start) as usize;
        let to = (c.blob_end - range.start) as usize;
        self.decode_bytes(r, key, &part[from..to])
    }

    /// Decompresses and verifies one chunk from its compressed bytes and caches it.
    fn decode_bytes(&self, r: ChunkRef, key: Key, compressed: &[u8]) -> Result<Arc<Vec<u8>>> {
        let node = self.index.node(r.0);
        let c = &node.chunks[r.1];
        let data = estargz::decode_chunk(self.compression, compressed, c, &node.path, self.verify)
            .map_err(|e| self.corrupt(r, e.to_string()))?;
        if data.len() as u64 != c.size {
            return Err(self.corrupt(
                r,
                format!("decoded {} bytes, expected {}", data.len(), c.size),
            ));
        }
        let data = Arc::new(data);
        if let Err(e) = self.cache.put(key, data.clone()) {
            warn!(error = %e, "could not store a chunk in the cache");
        }
        Ok(data)
    }

    /// Fetches the prioritized files (blob range `0..prefetch_end`) in one request and
    /// caches every chunk in it. Does nothing for layers without a prefetch landmark.
    pub fn prefetch(&self) -> Result<()> {
        let Some(end) = self.index.prefetch_end else {
            return Ok(());
        };
        let _busy = self.cache.priority().busy();
        let mut wend = end;
        let mut refs = Vec::new();
        for w in &self.windows {
            for &r in &self.order[w.chunks.clone()] {
                let c = &self.index.node(r.0).chunks[r.1];
                if c.blob_offset < end {
                    wend = wend.max(c.blob_end);
                    refs.push(r);
                }
            }
        }
        let started = Instant::now();
        for res in self.fill(&refs, Some(0..wend), false) {
            res?;
        }
        self.prefetched
            .store(wend.min(self.blob_size), Ordering::Relaxed);
        info!(layer = %self.desc.digest, bytes = wend, chunks = refs.len(),
            elapsed_ms = started.elapsed().as_millis() as u64, "prefetch done");
        Ok(())
    }

    /// Fetches the rest of the layer in large windows with `workers` threads, each window
    /// only once no prioritized work (of any layer sharing the cache) has run for the
    /// quiet period. Returns whether the whole layer is now local.
    pub fn background_fetch(&self, workers: usize) -> bool {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..workers.max(1) {
                s.spawn(|| loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(w) = self.windows.get(i) else {
                        return;
                    };
                    if !self.cache.priority().wait_quiet(&self.stop) {
                        return;
                    }
                    let chunks = &self.order[w.chunks.clone()];
                    if chunks.iter().all(|&r| self.cache.contains(&self.key_of(r))) {
                        if let Ok(mut cov) = self.coverage.lock() {
                            cov.insert(w.range.clone());
                        }
                        continue;
                    }
                    for res in self.fill(chunks, Some(w.range.clone()), false) {
                        if let Err(e) = res {
                            warn!(layer = %self.desc.digest, error = %e, "background fetch failed");
                            failed.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                });
            }
        });
        let done = !failed.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst);
        if done {
            self.complete.store(true, Ordering::SeqCst);
            // Everything else in the blob (TOC, footer, landmarks) holds no file data.
            if let Ok(mut cov) = self.coverage.lock() {
                cov.insert(0..self.blob_size);
            }
            info!(layer = %self.desc.digest, "layer is fully local");
        }
        done
    }

    /// A local file that already holds exactly the content of regular file `id`, for
    /// FUSE passthrough: the cached chunk itself when one chunk is the whole file (most
    /// files, and no copy at all), else a whole-file copy made by [`Layer::materialize`].
    pub fn backing_file(&self, id: NodeId) -> Option<PathBuf> {
        let node = self.regular(id).ok()?;
        if let [only] = node.chunks.as_slice() {
            if only.file_offset == 0 && only.size == node.size {
                return self.cache.chunk_file(&self.key_of((id, 0)));
            }
        }
        let path = self.cache.file_path(&node.digest?)?;
        std::fs::metadata(&path)
            .is_ok_and(|m| m.len() == node.size)
            .then_some(path)
    }

    /// Whether [`Layer::materialize`] would build a whole-file copy of `id` without the
    /// network: a disk cache, several chunks (one chunk is its own backing file), all of
    /// them cached. Cheap checks first: this runs on the FUSE open path.
    pub fn materializable(&self, id: NodeId) -> bool {
        self.cache.dir().is_some()
            && self.regular(id).is_ok_and(|node| {
                node.chunks.len() > 1
                    && (0..node.chunks.len()).all(|i| self.cache.contains(&self.key_of((id, i))))
            })
    }

    /// A local file holding exactly the content of regular file `id`, assembled from
    /// the cache if every chunk is there; for FUSE passthrough.
    pub fn materialize(&self, id: NodeId) -> Option<PathBuf> {
        let node = self.regular(id).ok()?;
        let digest = node.digest?;
        let path = self.cache.file_path(&digest)?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == node.size) {
            return Some(path);
        }
        let keys: Vec<Key> = (0..node.chunks.len())
            .map(|i| self.key_of((id, i)))
            .collect();
        if !keys.iter().all(|k| self.cache.contains(k)) {
            return None;
        }
        // Chunks stream from the cache into the file; memory stays at one chunk.
        let pieces = keys.iter().map(|k| self.cache.get(k, self.verify));
        match self.cache.put_file(&digest, pieces) {
            Ok(Some(p)) => Some(p),
            Ok(None) => {
                error!(layer = %self.desc.digest, file = %node.path,
                    "could not assemble the file from its cached chunks");
                None
            }
            Err(e) => {
                warn!(error = %e, "could not store a whole file");
                None
            }
        }
    }
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
    let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
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

/// Lists every chunk in blob order and cuts the blob's data into contiguous windows of
/// about [`WINDOW_BYTES`], never splitting a compressed member, covering `0..payload_end`.
fn plan_windows(index: &Index, payload_end: u64) -> (Vec<ChunkRef>, Vec<Window>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges() {
        let mut s = RangeSet::default();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(s.total, 20);
        s.insert(15..35);
        assert_eq!(s.total, 30);
        s.insert(0..5);
        s.insert(5..10);
        assert_eq!(s.total, 40);
        assert_eq!(s.map.len(), 1);
    }
}
