//! The lazy reader: finds the footer and TOC of a blob through positioned reads, builds
//! the file index, and maps any byte range of any file to the compressed ranges that
//! hold it, verifying every chunk it decompresses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use crate::compress::decompress_range;
use crate::digest::{format_sha256, parse_sha256, sha256_digest};
use crate::error::{Error, Result};
use crate::footer::{Compression, Footer, MAX_FOOTER_SIZE};
use crate::names::{base_of, clean_name, parent_of};
use crate::tarfmt::TarScanner;
use crate::toc::{
    parse_modtime, EntryType, Toc, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};

/// Random access to a blob: a local file, a buffer, or (elsewhere) a registry blob.
pub trait BlobSource: Send + Sync {
    /// Total size of the blob in bytes.
    fn size(&self) -> u64;
    /// Exactly `len` bytes starting at `offset`; short data is an error.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

impl BlobSource for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        start
            .checked_add(len)
            .and_then(|end| self.get(start..end))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the blob",
                )
            })
    }
}

impl BlobSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.as_slice().read_at(offset, len)
    }
}

/// A blob in a local file.
pub struct FileBlob {
    file: File,
    size: u64,
}

impl FileBlob {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBlob { file, size })
    }
}

impl BlobSource for FileBlob {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Supplies the compressed TOC of a blob whose footer says the TOC is stored outside
/// it: the gzip member holding the `stargz.index.json` tar entry, exactly as the
/// reference's TOC image stores it. Called at most once per open, from the opening
/// thread; it may block.
pub type ExternalTocFn = Arc<dyn Fn() -> io::Result<Vec<u8>> + Send + Sync>;

/// Limits and checks applied when opening a blob.
#[derive(Clone)]
pub struct OpenOptions {
    /// Bytes read from the end of the blob in the first request. Larger values may
    /// bring the whole TOC in the same round trip.
    pub tail_size: u64,
    /// Largest TOC accepted, compressed or not.
    pub max_toc_size: u64,
    /// When set, the TOC must have this digest.
    pub expected_toc_digest: Option<String>,
    /// Most TOC entries a layer may have; past it the layer is refused while parsing.
    pub max_entries: usize,
    /// Most memory (estimated) the file index of one layer may take.
    pub max_index_bytes: u64,
    /// Where the TOC comes from when the footer says it is not in the blob; without
    /// it such a blob is refused with [`Error::ExternalToc`].
    pub external_toc: Option<ExternalTocFn>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("tail_size", &self.tail_size)
            .field("max_toc_size", &self.max_toc_size)
            .field("expected_toc_digest", &self.expected_toc_digest)
            .field("max_entries", &self.max_entries)
            .field("max_index_bytes", &self.max_index_bytes)
            .field("external_toc", &self.external_toc.is_some())
            .finish()
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            tail_size: MAX_FOOTER_SIZE as u64,
            max_toc_size: 256 << 20,
            expected_toc_digest: None,
            max_entries: DEFAULT_MAX_TOC_ENTRIES,
            max_index_bytes: DEFAULT_MAX_INDEX_BYTES,
            external_toc: None,
        }
    }
}

/// Largest chunk accepted: a reader allocates this much for one chunk. The builder's
/// default is 4 MiB; a layer with a larger chunk is refused when it is opened.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Largest `innerOffset` accepted: how far into its decompressed member a chunk may
/// start. Members shared by small files stay far below it; the bytes before a chunk
/// are decompressed (and thrown away) on every read, so this bounds that work.
pub const MAX_INNER_OFFSET: u64 = 64 << 20;

/// Default for [`OpenOptions::max_entries`].
pub const DEFAULT_MAX_TOC_ENTRIES: usize = 500_000;

/// Default for [`OpenOptions::max_index_bytes`].
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 256 << 20;

/// Most compressed bytes that can hold `n` decompressed bytes of one member, for any
/// sane encoder: stored deflate blocks or raw zstd blocks add a few bytes per block,
/// plus header and trailer slack. A chunk's fetch range is capped at this, so a gap in
/// the blob (or a lying footer) never turns into a huge fetch.
pub fn max_compressed_len(n: u64) -> u64 {
    n.saturating_add(n / 64).saturating_add(256 << 10)
}

/// The TOC as found in a blob, before indexing.
#[derive(Debug, Clone)]
pub struct RawToc {
    pub footer: Footer,
    pub json: Vec<u8>,
    pub digest: String,
    /// Compressed TOC range in the blob (empty, at the footer, for an external TOC).
    pub range: Range<u64>,
}

/// Reads footer and TOC: one positioned read of the tail, and a second one only when
/// the TOC does not fit in it.
pub fn read_toc(src: &dyn BlobSource, opts: &OpenOptions) -> Result<RawToc> {
    let size = src.size();
    let tail_len = opts.tail_size.max(MAX_FOOTER_SIZE as u64).min(size);
    if tail_len < crate::footer::EXTERNAL_TOC_FOOTER_SIZE as u64 {
        return Err(Error::BlobTooSmall { size });
    }
    let tail_start = size - tail_len;
    let tail = src
        .read_at(tail_start, tail_len as usize)
        .map_err(|e| Error::io_at("reading the blob's footer", e))?;
    let footer = Footer::detect(&tail, size)?;
    let range = footer.toc_range(size)?;
    let csize = range.end - range.start;
    if csize > opts.max_toc_size {
        return Err(Error::TocTooLarge {
            size: csize,
            limit: opts.max_toc_size,
        });
    }
    let compressed = if footer.is_external() {
        let provide = opts.external_toc.as_ref().ok_or(Error::ExternalToc)?;
        let toc = provide().map_err(|e| Error::io_at("fetching the external TOC", e))?;
        if toc.len() as u64 > opts.max_toc_size {
            return Err(Error::TocTooLarge {
                size: toc.len() as u64,
                limit: opts.max_toc_size,
            });
        }
        toc
    } else if range.start >= tail_start {
        tail[(range.start - tail_start) as usize..(range.end - tail_start) as usize].to_vec()
    } else {
        src.read_at(range.start, csize as usize)
            .map_err(|e| Error::io_at("reading the TOC", e))?
    };
    let bad = |reason: String| Error::BadToc {
        offset: range.start,
        reason,
    };
    let json = match footer {
        Footer::ZstdChunked { toc_size, .. } => {
            if toc_size > opts.max_toc_size {
                return Err(Error::TocTooLarge {
                    size: toc_size,
                    limit: opts.max_toc_size,
                });
            }
            // The footer's size is a claim: grow with the data rather than trust it.
            let mut out = Vec::with_capacity(toc_size.min(1 << 20) as usize);
            zstd::stream::read::Decoder::new(&compressed[..])
                .and_then(|mut d| {
                    d.window_log_max(27)?;
                    d.take(toc_size + 1).read_to_end(&mut out)
                })
                .map_err(|e| bad(format!("zstd: {e}")))?;
            if out.len() as u64 != toc_size {
                return Err(bad(format!(
                    "TOC inflates to {} bytes, footer says {toc_size}",
                    out.len()
                )));
            }
            out
        }
        _ => {
            let gz = flate2::read::GzDecoder::new(&compressed[..]);
            let mut limited = gz.take(opts.max_toc_size + 4096);
            let mut scanner = TarScanner::new(&mut limited);
            let entry = scanner
                .next_entry()
                .map_err(|e| bad(format!("TOC member: {e}")))?
                .ok_or_else(|| bad("TOC member holds no tar entry".into()))?;
            if clean_name(&entry.name).ok().as_deref() != Some(TOC_TAR_NAME) {
                return Err(bad(format!(
                    "TOC member holds {:?}, not {TOC_TAR_NAME}",
                    entry.name
                )));
            }
            if entry.size > opts.max_toc_size {
                return Err(Error::TocTooLarge {
                    size: entry.size,
                    limit: opts.max_toc_size,
                });
            }
            // The tar header's size is a claim: read in steps rather than trust it.
            let mut json = Vec::new();
            let mut left = entry.size;
            while left > 0 {
                let n = left.min(1 << 20) as usize;
                let at = json.len();
                json.resize(at + n, 0);
                scanner
                    .read_data(&mut json[at..])
                    .map_err(|e| bad(format!("TOC member: {e}")))?;
                left -= n as u64;
            }
            json
        }
    };
    let digest = sha256_digest(&json);
    if let Some(expected) = &opts.expected_toc_digest {
        if *expected != digest {
            return Err(Error::TocDigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
    }
    Ok(RawToc {
        footer,
        json,
        digest,
        range,
    })
}

/// Index of a node in an [`Index`].
pub type NodeId = u32;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    Reg,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// One piece of a regular file and where its compressed bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Bytes of file data in the chunk.
    pub size: u64,
    /// Start of the member holding the chunk.
    pub blob_offset: u64,
    /// End of the compressed range to fetch (the next member start that holds data).
    pub blob_end: u64,
    /// Offset of the chunk's data in the decompressed member.
    pub inner_offset: u64,
    pub digest: Option<[u8; 32]>,
}

impl Chunk {
    pub fn blob_range(&self) -> Range<u64> {
        self.blob_offset..self.blob_end
    }
}

/// A file, directory or other inode of the layer.
#[derive(Debug, Clone)]
pub struct Node {
    /// Clean path of the node's first name ("" for the root).
    pub path: String,
    pub kind: NodeKind,
    pub size: u64,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user_name: String,
    pub group_name: String,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub link_target: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of the whole file, for regular files.
    pub digest: Option<[u8; 32]>,
    pub chunks: Vec<Chunk>,
    /// Children by name, for directories.
    pub children: BTreeMap<String, NodeId>,
    pub nlink: u32,
    pub parent: NodeId,
}

impl Node {
    fn new(path: String, kind: NodeKind, parent: NodeId) -> Self {
        Node {
            path,
            kind,
            size: 0,
            mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            mtime: 0,
            link_target: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
            children: BTreeMap::new(),
            nlink: 1,
            parent,
        }
    }

    /// The chunks that hold bytes `offset..offset+len` of the file.
    pub fn chunks_for(&self, offset: u64, len: u64) -> &[Chunk] {
        if len == 0 || offset >= self.size {
            return &[];
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = self
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        let last = self.chunks.partition_point(|c| c.file_offset < end);
        &self.chunks[first..last.max(first)]
    }
}

/// The file tree of a layer, built from its TOC.
#[derive(Debug, Clone)]
pub struct Index {
    nodes: Vec<Node>,
    by_path: HashMap<String, NodeId>,
    /// Blob offset of `.prefetch.landmark`'s data: prioritized files lie before it.
    pub prefetch_end: Option<u64>,
    /// The layer says nothing is worth prefetching.
    pub no_prefetch_landmark: bool,
    /// Estimated bytes the index takes, and the most it may.
    mem: u64,
    mem_limit: u64,
}

/// Estimated bookkeeping cost of a map entry (hash or tree), beyond its key and value.
const MAP_ENTRY_OVERHEAD: u64 = 48;

pub const ROOT: NodeId = 0;

impl Index {
    /// Builds the tree. `payload_end` is where compressed file data ends (the TOC's start).
    pub fn build(toc: &Toc, payload_end: u64) -> Result<Index> {
        Self::build_with_budget(toc, payload_end, DEFAULT_MAX_INDEX_BYTES)
    }

    /// As [`Index::build`], refusing the layer once the index would take more than
    /// `max_bytes` (estimated: nodes, names, xattrs, chunks and lookup tables).
    pub fn build_with_budget(toc: &Toc, payload_end: u64, max_bytes: u64) -> Result<Index> {
        let mut ix = Index {
            nodes: vec![Node::new(String::new(), NodeKind::Dir, ROOT)],
            by_path: HashMap::from([(String::new(), ROOT)]),
            prefetch_end: None,
            no_prefetch_landmark: false,
            mem: 0,
            mem_limit: max_bytes,
        };
        ix.nodes[ROOT as usize].nlink = 2;
        let mut current_reg: Option<NodeId> = None;
        let mut links: BTreeMap<String, (usize, String)> = BTreeMap::new();
        let mut landmark_offset = None;
        for (i, e) in toc.entries.iter().enumerate() {
            let fail = |reason: String| Error::BadEntry {
                index: i,
                name: e.name.clone(),
                reason,
            };
            if e.kind == EntryType::Chunk {
                let reg = current_reg
                    .ok_or_else(|| fail("chunk without a regular file before it".into()))?;
                let node = &mut ix.nodes[reg as usize];
                if !e.name.is_empty()
                    && clean_name(&e.name).ok().as_deref() != Some(node.path.as_str())
                {
                    return Err(fail(format!(
                        "chunk follows {:?}, a different file",
                        node.path
                    )));
                }
                let size = if e.chunk_size != 0 {
                    e.chunk_size
                } else {
                    node.size
                        .checked_sub(e.chunk_offset)
                        .ok_or_else(|| fail("chunk offset past the end of the file".into()))?
                };
                node.chunks
                    .push(chunk_of(e, size, payload_end).map_err(fail)?);
                ix.charge(std::mem::size_of::<Chunk>() as u64)?;
                continue;
            }
            current_reg = None;
            let path = clean_name(&e.name).map_err(fail)?;
            if path == PREFETCH_LANDMARK || path == NO_PREFETCH_LANDMARK {
                if path == PREFETCH_LANDMARK && e.size > 0 {
                    landmark_offset = Some(e.offset);
                }
                ix.no_prefetch_landmark |= path == NO_PREFETCH_LANDMARK;
                continue;
            }
            links.remove(&path);
            if path.is_empty() {
                if e.kind != EntryType::Dir {
                    return Err(fail("the root must be a directory".into()));
                }
                apply_metadata(&mut ix.nodes[ROOT as usize], e).map_err(fail)?;
                continue;
            }
            let parent = ix
                .dir_for(parent_of(&path))
                .map_err(|err| entry_error(err, &fail))?;
            if e.kind == EntryType::Hardlink {
                let target =
                    clean_name(&e.link_name).map_err(|r| fail(format!("hardlink target: {r}")))?;
                ix.detach(&path);
                links.insert(path, (i, target));
                continue;
            }
            let kind = match e.kind {
                EntryType::Dir => NodeKind::Dir,
                EntryType::Reg => NodeKind::Reg,
                EntryType::Symlink => NodeKind::Symlink,
                EntryType::Char => NodeKind::Char,
                EntryType::Block => NodeKind::Block,
                EntryType::Fifo => NodeKind::Fifo,
                EntryType::Hardlink | EntryType::Chunk => unreachable!("handled above"),
            };
            let id = match ix.by_path.get(&path).copied() {
                Some(id)
                    if ix.nodes[id as usize].kind == NodeKind::Dir && kind == NodeKind::Dir =>
                {
                    id
                }
                existing => {
                    // Last entry wins: a duplicate replaces the earlier node in place.
                    let node = Node::new(path.clone(), kind, parent);
                    match existing {
                        Some(id) if ix.nodes[id as usize].path == path => {
                            ix.nodes[id as usize] = node;
                            id
                        }
                        _ => {
                            ix.detach(&path);
                            ix.push_child(parent, base_of(&path), node, path.clone())?
                        }
                    }
                }
            };
            let node = &mut ix.nodes[id as usize];
            apply_metadata(node, e).map_err(fail)?;
            let extra = (node.user_name.len() + node.group_name.len() + e.link_name.len()) as u64
                + node
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.len() + v.len()) as u64 + MAP_ENTRY_OVERHEAD)
                    .sum::<u64>()
                + std::mem::size_of::<Chunk>() as u64;
            node.size = if kind == NodeKind::Reg { e.size } else { 0 };
            if kind == NodeKind::Symlink {
                node.link_target = e.link_name.clone();
            }
            if kind == NodeKind::Reg {
                node.digest = match e.digest.as_str() {
                    "" => None,
                    d => Some(parse_sha256(d).map_err(|err| fail(err.to_string()))?),
                };
                if e.size > 0 {
                    if e.chunk_offset != 0 {
                        return Err(fail("first chunk does not start at offset 0".into()));
                    }
                    let size = if e.chunk_size != 0 {
                        e.chunk_size
                    } else {
                        e.size
                    };
                    node.chunks
                        .push(chunk_of(e, size, payload_end).map_err(fail)?);
                }
                current_reg = Some(id);
            }
            ix.charge(extra)?;
        }
        // Links may point at other links. Each link is resolved by walking its chain
        // to a real node once; every link on the way is attached as the walk unwinds,
        // so later walks stop at it and the whole pass is linear in the links.
        let names: Vec<String> = links.keys().cloned().collect();
        for start in names {
            if ix.by_path.contains_key(&start) {
                continue;
            }
            let mut chain: Vec<(String, usize)> = Vec::new();
            let mut on_chain: HashSet<&str> = HashSet::new();
            let mut cur = start.as_str();
            let id = loop {
                if let Some(&id) = ix.by_path.get(cur) {
                    break id;
                }
                let Some((i, target)) = links.get(cur) else {
                    let (_, i) = chain.last().cloned().unwrap_or((String::new(), 0));
                    return Err(Error::BadEntry {
                        index: i,
                        name: toc.entries[i].name.clone(),
                        reason: format!("hardlink target {cur:?} does not exist"),
                    });
                };
                if !on_chain.insert(cur) {
                    return Err(Error::BadEntry {
                        index: *i,
                        name: toc.entries[*i].name.clone(),
                        reason: format!(
                            "hardlink target {target:?} does not exist (the links form a loop)"
                        ),
                    });
                }
                chain.push((cur.to_string(), *i));
                cur = target.as_str();
            };
            for (path, i) in chain.into_iter().rev() {
                let fail = |reason: String| Error::BadEntry {
                    index: i,
                    name: toc.entries[i].name.clone(),
                    reason,
                };
                if ix.nodes[id as usize].kind == NodeKind::Dir {
                    return Err(fail("hardlink to a directory".into()));
                }
                let parent = ix
                    .dir_for(parent_of(&path))
                    .map_err(|err| entry_error(err, &fail))?;
                ix.charge(2 * path.len() as u64 + 2 * MAP_ENTRY_OVERHEAD)?;
                ix.nodes[parent as usize]
                    .children
                    .insert(base_of(&path).to_string(), id);
                ix.nodes[id as usize].nlink = ix.nodes[id as usize].nlink.saturating_add(1);
                ix.by_path.insert(path, id);
            }
        }
        ix.finish(payload_end)?;
        // The prioritized files end at the landmark; a landmark far past the last of
        // their chunks (a gap the TOC digest does not vouch for) is cut back to it.
        ix.prefetch_end = landmark_offset
            .filter(|&o| o > 0 && o <= payload_end)
            .and_then(|o| {
                ix.nodes
                    .iter()
                    .flat_map(|n| n.chunks.iter())
                    .filter(|c| c.blob_offset < o)
                    .map(|c| c.blob_end.min(o))
                    .max()
            });
        Ok(ix)
    }

    /// Checks chunk coverage, computes each chunk's compressed end and link counts.
    fn finish(&mut self, payload_end: u64) -> Result<()> {
        let mut starts: Vec<u64> = self
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter().map(|c| c.blob_offset))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        let end_of = |off: u64| -> u64 {
            let i = starts.partition_point(|&s| s <= off);
            starts.get(i).copied().unwrap_or(payload_end)
        };
        let mut subdirs = vec![0u32; self.nodes.len()];
        for (id, n) in self.nodes.iter().enumerate() {
            if n.kind == NodeKind::Dir
                && id as NodeId != ROOT
                && self.by_path.get(&n.path) == Some(&(id as NodeId))
            {
                subdirs[n.parent as usize] += 1;
            }
        }
        for (id, n) in self.nodes.iter_mut().enumerate() {
            if n.kind == NodeKind::Dir {
                n.nlink = 2 + subdirs[id];
            }
            let mut expect = 0u64;
            for c in &mut n.chunks {
                if c.file_offset != expect {
                    return Err(Error::BadChunk {
                        file: n.path.clone(),
                        file_offset: c.file_offset,
                        blob_offset: c.blob_offset,
                        reason: format!(
                            "chunk starts at {} but the previous one ends at {expect}",
                            c.file_offset
                        ),
                    });
                }
                expect = c.file_offset + c.size;
                // The next member start, but never more than the chunk can need.
                let need = max_compressed_len(c.inner_offset.saturating_add(c.size));
                c.blob_end = end_of(c.blob_offset).min(c.blob_offset.saturating_add(need));
            }
            if expect != n.size && n.kind == NodeKind::Reg && !n.chunks.is_empty() {
                return Err(Error::BadChunk {
                    file: n.path.clone(),
                    file_offset: expect,
                    blob_offset: 0,
                    reason: format!("chunks cover {expect} bytes of a {}-byte file", n.size),
                });
            }
            if n.kind == NodeKind::Reg && n.size > 0 && n.chunks.is_empty() {
                return Err(Error::BadChunk {
                    file: n.path.clone(),
                    file_offset: 0,
                    blob_offset: 0,
                    reason: "non-empty file without data".into(),
                });
            }
        }
        Ok(())
    }

    /// The directory at `path`, created (as an implicit directory) if missing. Errors
    /// are a budget overrun, or [`Error::Mismatch`] saying what is wrong with the path.
    /// Iterative: a name may have thousands of components.
    fn dir_for(&mut self, path: &str) -> Result<NodeId> {
        let mut missing: Vec<&str> = Vec::new();
        let mut cur = path;
        let mut id = loop {
            if let Some(&id) = self.by_path.get(cur) {
                if self.nodes[id as usize].kind != NodeKind::Dir {
                    return Err(Error::Mismatch(format!(
                        "parent {cur:?} is not a directory"
                    )));
                }
                break id;
            }
            missing.push(cur);
            cur = parent_of(cur);
        };
        for p in missing.into_iter().rev() {
            let node = Node::new(p.to_string(), NodeKind::Dir, id);
            id = self.push_child(id, base_of(p), node, p.to_string())?;
        }
        Ok(id)
    }

    /// Adds `bytes` to the index's estimated size; past the budget the layer is refused.
    fn charge(&mut self, bytes: u64) -> Result<()> {
        self.mem = self.mem.saturating_add(bytes);
        if self.mem > self.mem_limit {
            return Err(Error::TocBudget {
                what: "index memory (bytes)".into(),
                limit: self.mem_limit,
            });
        }
        Ok(())
    }

    fn push_child(
        &mut self,
        parent: NodeId,
        base: &str,
        node: Node,
        path: String,
    ) -> Result<NodeId> {
        let id = NodeId::try_from(self.nodes.len()).map_err(|_| Error::BadToc {
            offset: 0,
            reason: "too many entries".into(),
        })?;
        // The node, its path twice (node and lookup table), its name in the parent.
        self.charge(
            std::mem::size_of::<Node>() as u64
                + 2 * path.len() as u64
                + base.len() as u64
                + 2 * MAP_ENTRY_OVERHEAD,
        )?;
        self.nodes.push(node);
        self.nodes[parent as usize]
            .children
            .insert(base.to_string(), id);
        self.by_path.insert(path, id);
        Ok(id)
    }

    /// Removes the name `path` from its parent (an earlier duplicate).
    fn detach(&mut self, path: &str) {
        if let Some(id) = self.by_path.remove(path) {
            let parent = self.nodes[id as usize].parent;
            if let Some(p) = self.by_path.get(parent_of(path)).copied() {
                self.nodes[p as usize].children.remove(base_of(path));
            } else {
                self.nodes[parent as usize].children.remove(base_of(path));
            }
            if self.nodes[id as usize].path != path {
                let n = &mut self.nodes[id as usize];
                n.nlink = n.nlink.saturating_sub(1);
            }
        }
    }

    pub fn root(&self) -> NodeId {
        ROOT
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    /// Looks a path up (any spelling `clean_name` accepts).
    pub fn lookup(&self, path: &str) -> Option<NodeId> {
        self.by_path.get(&clean_name(path).ok()?).copied()
    }

    pub fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.nodes.get(dir as usize)?.children.get(name).copied()
    }

    /// Number of nodes (inodes), the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// All nodes with their ids.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().map(|(i, n)| (i as NodeId, n))
    }

    /// Every path with the node it names (hardlinks give several paths for one node).
    pub fn paths(&self) -> impl Iterator<Item = (&str, NodeId)> {
        self.by_path.iter().map(|(p, &id)| (p.as_str(), id))
    }
}

fn chunk_of(
    e: &crate::toc::TocEntry,
    size: u64,
    payload_end: u64,
) -> std::result::Result<Chunk, String> {
    if size == 0 || size > MAX_CHUNK_SIZE {
        return Err(format!(
            "chunk size {size} is out of range (1..={MAX_CHUNK_SIZE})"
        ));
    }
    if e.offset == 0 || e.offset >= payload_end {
        return Err(format!(
            "chunk offset {} is outside the blob's data (..{payload_end})",
            e.offset
        ));
    }
    if e.inner_offset > MAX_INNER_OFFSET {
        return Err(format!(
            "inner offset {} is out of range (..={MAX_INNER_OFFSET})",
            e.inner_offset
        ));
    }
    let digest = match e.chunk_digest.as_str() {
        "" => None,
        d => Some(parse_sha256(d).map_err(|err| err.to_string())?),
    };
    Ok(Chunk {
        file_offset: e.chunk_offset,
        size,
        blob_offset: e.offset,
        blob_end: payload_end,
        inner_offset: e.inner_offset,
        digest,
    })
}

/// An error of an entry's path: budget overruns stay typed, the rest names the entry.
fn entry_error(err: Error, fail: &dyn Fn(String) -> Error) -> Error {
    match err {
        Error::TocBudget { .. } => err,
        Error::Mismatch(reason) => fail(reason),
        other => fail(other.to_string()),
    }
}

fn apply_metadata(n: &mut Node, e: &crate::toc::TocEntry) -> std::result::Result<(), String> {
    n.mode = e.mode & 0o7777;
    n.uid = u32::try_from(e.uid).map_err(|_| format!("uid {} is out of range", e.uid))?;
    n.gid = u32::try_from(e.gid).map_err(|_| format!("gid {} is out of range", e.gid))?;
    n.user_name = e.user_name.clone();
    n.group_name = e.group_name.clone();
    n.mtime = if e.mod_time.is_empty() {
        0
    } else {
        parse_modtime(&e.mod_time)
            .ok_or_else(|| format!("modtime {:?} is not RFC 3339", e.mod_time))?
    };
    n.dev_major = u32::try_from(e.dev_major).map_err(|_| "devMajor out of range".to_string())?;
    n.dev_minor = u32::try_from(e.dev_minor).map_err(|_| "devMinor out of range".to_string())?;
    n.xattrs = e.xattrs.clone();
    Ok(())
}

/// An opened blob: footer, TOC digest and file index.
#[derive(Debug, Clone)]
pub struct Reader {
    pub footer: Footer,
    pub blob_size: u64,
    pub toc_digest: String,
    pub toc_range: Range<u64>,
    pub index: Index,
}

impl Reader {
    /// Reads footer and TOC from `src`, verifies the TOC digest when one is expected,
    /// and builds the index.
    pub fn open(src: &dyn BlobSource, opts: &OpenOptions) -> Result<Reader> {
        let (reader, _) = Self::open_with_toc(src, opts)?;
        Ok(reader)
    }

    /// As [`Reader::open`], also returning the parsed TOC.
    pub fn open_with_toc(src: &dyn BlobSource, opts: &OpenOptions) -> Result<(Reader, Toc)> {
        let mut raw = read_toc(src, opts)?;
        let toc = Toc::from_json_limited(&raw.json, opts.max_entries)?;
        // The JSON is not needed once parsed: free it before the index grows.
        raw.json = Vec::new();
        let index = Index::build_with_budget(&toc, payload_end(&raw.footer), opts.max_index_bytes)?;
        Ok((
            Reader {
                footer: raw.footer,
                blob_size: src.size(),
                toc_digest: raw.digest,
                toc_range: raw.range,
                index,
            },
            toc,
        ))
    }

    pub fn compression(&self) -> Compression {
        self.footer.compression()
    }

    /// Where compressed file data ends.
    pub fn payload_end(&self) -> u64 {
        payload_end(&self.footer)
    }

    /// Reads `len` bytes at `offset` of file `id`, fetching and verifying each chunk.
    pub fn read_range(
        &self,
        src: &dyn BlobSource,
        id: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let node = self
            .index
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("inode {id}")))?;
        let end = offset.saturating_add(len).min(node.size);
        // The size is the TOC's claim: reserve at most one chunk's worth up front.
        let mut out = Vec::with_capacity(end.saturating_sub(offset).min(MAX_CHUNK_SIZE) as usize);
        for chunk in node.chunks_for(offset, len) {
            let compressed = src
                .read_at(
                    chunk.blob_offset,
                    (chunk.blob_end - chunk.blob_offset) as usize,
                )
                .map_err(|e| Error::io_at(format!("fetching a chunk of {:?}", node.path), e))?;
            let data = decode_chunk(self.compression(), &compressed, chunk, &node.path, true)?;
            let from = offset.saturating_sub(chunk.file_offset) as usize;
            let to = (end - chunk.file_offset).min(chunk.size) as usize;
            out.extend_from_slice(&data[from..to]);
        }
        Ok(out)
    }

    /// Reads a whole file and checks it against its digest as well.
    pub fn read_file(&self, src: &dyn BlobSource, id: NodeId) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.copy_file(src, id, &mut out)?;
        Ok(out)
    }

    /// Streams a whole file into `w` one chunk at a time, so memory stays at one chunk
    /// whatever the file's size, checking every chunk and then the file's digest.
    /// On a mismatch the bytes before the bad chunk have already been written.
    pub fn copy_file(&self, src: &dyn BlobSource, id: NodeId, w: &mut dyn Write) -> Result<u64> {
        let node = self
            .index
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("inode {id}")))?;
        let mut hash = Sha256::new();
        let mut written = 0u64;
        for chunk in &node.chunks {
            let data = self.read_range(src, id, chunk.file_offset, chunk.size)?;
            hash.update(&data);
            w.write_all(&data)
                .map_err(|e| Error::io_at(format!("writing {:?}", node.path), e))?;
            written += data.len() as u64;
        }
        if let Some(want) = node.digest {
            let got: [u8; 32] = hash.finalize().into();
            if got != want {
                return Err(Error::DigestMismatch {
                    what: format!("file {:?}", node.path),
                    expected: format_sha256(&want),
                    actual: format_sha256(&got),
                });
            }
        }
        Ok(written)
    }
}

fn payload_end(footer: &Footer) -> u64 {
    match footer {
        Footer::ZstdChunked { toc_offset, .. } => toc_offset.saturating_sub(8),
        f => f.toc_offset(),
    }
}

/// Decompresses one chunk from its compressed range and checks its digest. With
/// `verify`, a chunk without a digest is refused rather than trusted.
pub fn decode_chunk(
    compression: Compression,
    compressed: &[u8],
    chunk: &Chunk,
    file: &str,
    verify: bool,
) -> Result<Vec<u8>> {
    let bad = |reason: String| Error::BadChunk {
        file: file.to_string(),
        file_offset: chunk.file_offset,
        blob_offset: chunk.blob_offset,
        reason,
    };
    let data = decompress_range(
        compression,
        compressed,
        chunk.inner_offset,
        chunk.size as usize,
    )
    .map_err(|e| bad(format!("cannot decompress: {e}")))?;
    match chunk.digest {
        Some(want) => {
            let got: [u8; 32] = Sha256::digest(&data).into();
            if got != want {
                return Err(bad(format!(
                    "chunkDigest mismatch: expected {}, computed {}",
                    format_sha256(&want),
                    format_sha256(&got)
                )));
            }
        }
        None if verify => return Err(bad("chunk has no chunkDigest to verify against".into())),
        None => {}
    }
    Ok(data)
}
