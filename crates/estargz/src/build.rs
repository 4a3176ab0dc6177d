//! The builder: turns a tar stream into an eStargz or zstd:chunked blob, compressing
//! members on every core while keeping the output independent of the thread count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::compress::{compress_member, Codec};
use crate::digest::sha256_digest;
use crate::error::{Error, Result};
use crate::footer::{Footer, SKIPPABLE_FRAME_MAGIC};
use crate::names::clean_name;
use crate::tarfmt::{padded, synthetic_file_header, TarEntry, TarKind, TarScanner};
use crate::toc::{
    format_modtime, EntryType, Toc, TocEntry, LANDMARK_CONTENTS, NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK, TOC_TAR_NAME,
};
use crate::{
    MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION, PREFETCH_END_ANNOTATION,
    TOC_DIGEST_ANNOTATION, TOC_TAIL_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION,
};

/// Default size of a chunk of a regular file: 4 MiB, as the reference.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// How to build a blob.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub codec: Codec,
    /// Largest number of file bytes in one member.
    pub chunk_size: u64,
    /// When non-zero, small files share a member until it holds this many bytes
    /// (entries then carry `innerOffset`).
    pub min_chunk_size: u64,
    /// Files to place first, in this order, followed by `.prefetch.landmark`.
    pub prioritized_files: Vec<String>,
    /// Skip prioritized files that are not in the tar instead of failing.
    pub allow_missing_prioritized: bool,
    /// Compression threads; 0 means one per core.
    pub threads: usize,
    /// Leave the TOC out of the blob (gzip only): the blob ends with the 46-byte
    /// external-TOC footer and the compressed TOC is returned in
    /// [`BuildOutput::external_toc`], for a separate TOC image (the reference's
    /// `--estargz-external-toc`).
    pub external_toc: bool,
    /// Keep the tar stream byte for byte (the reference's `--estargz-keep-diff-id`):
    /// entries in their order, duplicates, headers, padding and trailer as they are,
    /// no landmark. The decompressed blob is the input tar, so the layer keeps its
    /// diff ID. Needs `external_toc` and no prioritized files.
    pub lossless: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            codec: Codec::Gzip { level: 9 },
            chunk_size: DEFAULT_CHUNK_SIZE,
            min_chunk_size: 0,
            prioritized_files: Vec::new(),
            allow_missing_prioritized: false,
            threads: 0,
            external_toc: false,
            lossless: false,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// `sha256:...` of the blob.
    pub blob_digest: String,
    pub blob_size: u64,
    /// `sha256:...` of the decompressed stream.
    pub diff_id: String,
    pub uncompressed_size: u64,
    /// `sha256:...` of the TOC JSON.
    pub toc_digest: String,
    pub toc: Toc,
    /// Layer annotations to put on the descriptor.
    pub annotations: BTreeMap<String, String>,
    /// Prioritized files that were not found (only with `allow_missing_prioritized`).
    pub missing_prioritized: Vec<String>,
    /// With [`BuildOptions::external_toc`]: the compressed TOC (a gzip member holding
    /// the `stargz.index.json` tar entry), which the blob does not contain.
    pub external_toc: Option<Vec<u8>>,
}

/// Builds from any tar or tar.gz stream, spooling it to a temporary file first
/// (prioritized files and duplicate names need two passes).
pub fn build(input: impl Read, out: impl Write, opts: &BuildOptions) -> Result<BuildOutput> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let head = input
        .fill_buf()
        .map_err(|e| Error::io_at("reading the input tar", e))?;
    let gzipped = head.len() >= 3 && head[..3] == [0x1f, 0x8b, 0x08];
    let mut spool =
        tempfile::tempfile().map_err(|e| Error::io_at("creating a temporary file", e))?;
    let copied = if gzipped {
        io::copy(&mut flate2::read::MultiGzDecoder::new(input), &mut spool)
    } else {
        io::copy(&mut input, &mut spool)
    };
    copied.map_err(|e| Error::io_at("spooling the input tar", e))?;
    build_from_file(&spool, out, opts)
}

/// Where an output entry's header and data come from.
enum Source {
    Tar(TarEntry),
    Landmark(&'static str),
}

impl Source {
    fn kind(&self) -> TarKind {
        match self {
            Source::Tar(e) => e.kind,
            Source::Landmark(_) => TarKind::Reg,
        }
    }
    fn size(&self) -> u64 {
        match self {
            Source::Tar(e) => e.size,
            Source::Landmark(_) => 1,
        }
    }
}

/// Builds from an uncompressed tar file, read with positioned reads.
pub fn build_from_file(input: &File, out: impl Write, opts: &BuildOptions) -> Result<BuildOutput> {
    opts.codec.validate()?;
    if opts.chunk_size == 0 {
        return Err(Error::InvalidOption("chunk size must be positive".into()));
    }
    // Readers refuse larger chunks; a blob they cannot open is not worth writing.
    if opts.chunk_size > crate::reader::MAX_CHUNK_SIZE
        || opts.min_chunk_size > crate::reader::MAX_INNER_OFFSET
    {
        return Err(Error::InvalidOption(format!(
            "chunk size {} or minimum chunk size {} is over the reader's limit of {} bytes",
            opts.chunk_size,
            opts.min_chunk_size,
            crate::reader::MAX_CHUNK_SIZE
        )));
    }
    if opts.external_toc && !matches!(opts.codec, Codec::Gzip { .. }) {
        return Err(Error::InvalidOption(
            "an external TOC is only defined for gzip (eStargz) blobs".into(),
        ));
    }
    if opts.lossless && !opts.external_toc {
        return Err(Error::InvalidOption(
            "keeping the diff ID needs an external TOC: a TOC inside the blob changes the stream"
                .into(),
        ));
    }
    if opts.lossless && !opts.prioritized_files.is_empty() {
        return Err(Error::InvalidOption(
            "keeping the diff ID cannot reorder files: no prioritized files".into(),
        ));
    }
    let (order, missing) = if opts.lossless {
        (plan_lossless(input)?, Vec::new())
    } else {
        plan_order(input, opts)?
    };
    let threads = if opts.threads == 0 {
        rayon::current_num_threads()
    } else {
        opts.threads
    };
    // One thread compresses inline; the default shares rayon's global pool, so that
    // converting many layers does not start threads per layer.
    let pool = match opts.threads {
        0 | 1 => None,
        n => Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| Error::InvalidOption(format!("thread pool: {e}")))?,
        ),
    };
    let compress_batch = |batch: &[Vec<u8>]| -> Result<Vec<Vec<u8>>> {
        let par = || {
            batch
                .par_iter()
                .map(|m| compress_member(opts.codec, m))
                .collect()
        };
        match (&pool, opts.threads) {
            (_, 1) => batch
                .iter()
                .map(|m| compress_member(opts.codec, m))
                .collect(),
            (Some(pool), _) => pool.install(par),
            (None, _) => par(),
        }
    };
    // Large batches keep every core busy even when member sizes vary a lot.
    let batch_bytes = (opts.chunk_size as usize)
        .saturating_mul(threads * 4)
        .max(32 << 20);

    let mut writer = CountingWriter::new(out);
    let mut member_offsets: Vec<u64> = Vec::new();
    let (tx, rx) = mpsc::sync_channel::<Vec<Vec<u8>>>(2);
    let produced = std::thread::scope(|scope| -> Result<Produced> {
        let producer = scope.spawn(|| produce_members(input, &order, opts, batch_bytes, tx));
        let mut consume = || -> Result<()> {
            for batch in rx.iter() {
                let compressed = compress_batch(&batch)?;
                for c in compressed {
                    member_offsets.push(writer.count);
                    writer
                        .write_all(&c)
                        .map_err(|e| Error::io_at("writing the blob", e))?;
                }
            }
            Ok(())
        };
        let consumed = consume();
        drop(rx);
        let produced = producer
            .join()
            .map_err(|_| Error::Io(io::Error::other("member producer panicked")))?;
        consumed?;
        produced
    })?;

    let Produced {
        mut entries,
        entry_members,
        mut diff_hash,
        mut uncompressed_size,
    } = produced;
    for (entry, member) in entries.iter_mut().zip(&entry_members) {
        if let Some(m) = member {
            entry.offset = member_offsets[*m];
        }
    }
    let toc = Toc {
        version: 1,
        entries,
    };
    let toc_json = toc.to_json()?;
    let toc_digest = sha256_digest(&toc_json);
    let mut annotations = BTreeMap::new();
    let toc_start = writer.count;
    let mut external_toc = None;
    // Where a reader's TOC read starts: the TOC's first byte, or the footer when the
    // TOC is kept out of the blob.
    let mut toc_read_start = toc_start;
    match opts.codec {
        Codec::Gzip { .. } if opts.external_toc => {
            // The TOC member as it would sit in the blob, kept apart: it is neither in
            // the blob nor in its decompressed stream (and so not in the diff ID).
            let mut member = synthetic_file_header(TOC_TAR_NAME, toc_json.len() as u64).to_vec();
            member.extend_from_slice(&toc_json);
            member.resize(512 + padded(toc_json.len() as u64) as usize + 1024, 0);
            external_toc = Some(compress_member(opts.codec, &member)?);
            let footer = Footer::ExternalToc {
                payload_end: toc_start,
            };
            writer
                .write_all(&footer.encode())
                .map_err(|e| Error::io_at("writing the footer", e))?;
        }
        Codec::Gzip { .. } => {
            let mut member = synthetic_file_header(TOC_TAR_NAME, toc_json.len() as u64).to_vec();
            member.extend_from_slice(&toc_json);
            member.resize(512 + padded(toc_json.len() as u64) as usize + 1024, 0);
            diff_hash.update(&member);
            uncompressed_size += member.len() as u64;
            let compressed = compress_member(opts.codec, &member)?;
            writer
                .write_all(&compressed)
                .map_err(|e| Error::io_at("writing the TOC", e))?;
            let footer = Footer::Estargz {
                toc_offset: toc_start,
            };
            writer
                .write_all(&footer.encode())
                .map_err(|e| Error::io_at("writing the footer", e))?;
        }
        Codec::Zstd { level } => {
            let compressed = zstd::bulk::compress(&toc_json, level)?;
            writer
                .write_all(&SKIPPABLE_FRAME_MAGIC)
                .map_err(|e| Error::io_at("writing the TOC", e))?;
            writer
                .write_all(&(compressed.len() as u32).to_le_bytes())
                .map_err(|e| Error::io_at("writing the TOC", e))?;
            writer
                .write_all(&compressed)
                .map_err(|e| Error::io_at("writing the TOC", e))?;
            let toc_offset = toc_start + 8;
            toc_read_start = toc_offset;
            let footer = Footer::ZstdChunked {
                toc_offset,
                toc_compressed_size: compressed.len() as u64,
                toc_size: toc_json.len() as u64,
            };
            writer
                .write_all(&footer.encode())
                .map_err(|e| Error::io_at("writing the footer", e))?;
            annotations.insert(
                MANIFEST_CHECKSUM_ANNOTATION.to_string(),
                sha256_digest(&compressed),
            );
            annotations.insert(
                MANIFEST_POSITION_ANNOTATION.to_string(),
                format!("{}:{}:{}:1", toc_offset, compressed.len(), toc_json.len()),
            );
        }
    }
    writer
        .flush()
        .map_err(|e| Error::io_at("flushing the blob", e))?;
    annotations.insert(TOC_DIGEST_ANNOTATION.to_string(), toc_digest.clone());
    // 0 says there are no prioritized files, so a reader fetches nothing ahead.
    annotations.insert(
        PREFETCH_END_ANNOTATION.to_string(),
        toc.prefetch_end_hint(toc_start).unwrap_or(0).to_string(),
    );
    annotations.insert(
        TOC_TAIL_ANNOTATION.to_string(),
        (writer.count - toc_read_start).to_string(),
    );
    annotations.insert(
        UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
        uncompressed_size.to_string(),
    );
    Ok(BuildOutput {
        blob_digest: format!("sha256:{}", hex::encode(writer.hash.finalize())),
        blob_size: writer.count,
        diff_id: format!("sha256:{}", hex::encode(diff_hash.finalize())),
        uncompressed_size,
        toc_digest,
        toc,
        annotations,
        missing_prioritized: missing,
        external_toc,
    })
}

/// Every entry in tar order, duplicates included, for a lossless build.
fn plan_lossless(input: &File) -> Result<Vec<Source>> {
    let mut scanner = TarScanner::new(BufReader::with_capacity(
        256 << 10,
        PositionedReader {
            file: input,
            pos: 0,
        },
    ));
    let mut order = Vec::new();
    while let Some(e) = scanner.next_entry()? {
        let clean = clean_name(&e.name).map_err(|reason| Error::BadTar {
            offset: e.header_start,
            reason: format!("entry {:?}: {reason}", e.name),
        })?;
        if clean == TOC_TAR_NAME {
            // Dropping it would change the stream, keeping it would shadow the real TOC.
            return Err(Error::BadTar {
                offset: e.header_start,
                reason: format!(
                    "the tar already holds {TOC_TAR_NAME}; it cannot be kept byte for byte"
                ),
            });
        }
        if e.kind != TarKind::Reg && e.stored_size != 0 {
            return Err(Error::BadTar {
                offset: e.header_start,
                reason: format!(
                    "{:?} is not a regular file but claims {} bytes of data",
                    e.name, e.stored_size
                ),
            });
        }
        order.push(Source::Tar(e));
    }
    Ok(order)
}

/// Reads the tar's headers and decides the output order: prioritized files (with their
/// parents and hardlink targets) and a landmark first, then everything else in tar
/// order; for duplicate names the last entry wins.
fn plan_order(input: &File, opts: &BuildOptions) -> Result<(Vec<Source>, Vec<String>)> {
    let mut scanner = TarScanner::new(BufReader::with_capacity(
        256 << 10,
        PositionedReader {
            file: input,
            pos: 0,
        },
    ));
    let mut slots: Vec<Option<TarEntry>> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    while let Some(e) = scanner.next_entry()? {
        let clean = clean_name(&e.name).map_err(|reason| Error::BadTar {
            offset: e.header_start,
            reason: format!("entry {:?}: {reason}", e.name),
        })?;
        if clean == PREFETCH_LANDMARK || clean == NO_PREFETCH_LANDMARK || clean == TOC_TAR_NAME {
            continue;
        }
        if e.kind != TarKind::Reg && e.stored_size != 0 {
            // Readers disagree on whether such data exists; refuse rather than guess.
            return Err(Error::BadTar {
                offset: e.header_start,
                reason: format!(
                    "{:?} is not a regular file but claims {} bytes of data",
                    e.name, e.stored_size
                ),
            });
        }
        if clean.is_empty() && e.kind != TarKind::Dir {
            return Err(Error::BadTar {
                offset: e.header_start,
                reason: format!("entry {:?} names the root but is not a directory", e.name),
            });
        }
        if let Some(old) = by_name.insert(clean, slots.len()) {
            slots[old] = None;
        }
        slots.push(Some(e));
    }

    let mut order = Vec::new();
    let mut missing = Vec::new();
    let mut moved = HashSet::new();
    for name in &opts.prioritized_files {
        let clean = clean_name(name).map_err(|reason| {
            Error::InvalidOption(format!("prioritized file {name:?}: {reason}"))
        })?;
        match move_with_dependencies(&clean, &mut slots, &by_name, &mut moved, &mut order, 0) {
            Ok(()) => {}
            Err(Error::PrioritizedNotFound(_)) if opts.allow_missing_prioritized => {
                missing.push(name.clone())
            }
            Err(Error::PrioritizedNotFound(_)) => {
                return Err(Error::PrioritizedNotFound(name.clone()))
            }
            Err(e) => return Err(e),
        }
    }
    if opts.prioritized_files.is_empty() {
        order.insert(0, Source::Landmark(NO_PREFETCH_LANDMARK));
    } else {
        order.push(Source::Landmark(PREFETCH_LANDMARK));
    }
    order.extend(slots.into_iter().flatten().map(Source::Tar));
    Ok((order, missing))
}

fn move_with_dependencies(
    name: &str,
    slots: &mut [Option<TarEntry>],
    by_name: &HashMap<String, usize>,
    moved: &mut HashSet<String>,
    order: &mut Vec<Source>,
    depth: usize,
) -> Result<()> {
    // Hardlink chains can loop in a hostile tar; no honest one is this deep.
    if depth > 256 {
        return Err(Error::InvalidOption(format!(
            "hardlink chain through {name:?} is too deep"
        )));
    }
    let slot = by_name.get(name).copied();
    let present = slot.is_some_and(|i| slots[i].is_some());
    if name.is_empty() {
        if let Some(i) = slot {
            if let Some(e) = slots[i].take() {
                order.push(Source::Tar(e));
            }
        }
        return Ok(());
    }
    if !present && !moved.contains(name) {
        return Err(Error::PrioritizedNotFound(name.to_string()));
    }
    let parent = match name.rfind('/') {
        Some(i) => &name[..i],
        None => "",
    };
    // A parent without its own entry is implied by the reader; nothing to move.
    match move_with_dependencies(parent, slots, by_name, moved, order, depth + 1) {
        Ok(()) | Err(Error::PrioritizedNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    if let Some(i) = slot {
        if let Some(Some(e)) = slots.get(i) {
            if e.kind == TarKind::Hardlink {
                let target = clean_name(&e.link_name).map_err(|reason| Error::BadTar {
                    offset: e.header_start,
                    reason: format!("hardlink target {:?}: {reason}", e.link_name),
                })?;
                move_with_dependencies(&target, slots, by_name, moved, order, depth + 1)?;
            }
        }
        if let Some(e) = slots[i].take() {
            moved.insert(name.to_string());
            order.push(Source::Tar(e));
        }
    }
    Ok(())
}

struct Produced {
    entries: Vec<TocEntry>,
    entry_members: Vec<Option<usize>>,
    diff_hash: Sha256,
    uncompressed_size: u64,
}

/// Lays the entries out into members (uncompressed), hashing the stream as it goes,
/// and hands them to the compressor in batches.
fn produce_members(
    input: &File,
    order: &[Source],
    opts: &BuildOptions,
    batch_bytes: usize,
    tx: mpsc::SyncSender<Vec<Vec<u8>>>,
) -> Result<Produced> {
    let mut p = Producer {
        tx,
        batch: Vec::new(),
        batch_len: 0,
        batch_bytes,
        members: 0,
        cur: Vec::new(),
        diff_hash: Sha256::new(),
        uncompressed_size: 0,
    };
    let mut entries = Vec::with_capacity(order.len());
    let mut entry_members = Vec::with_capacity(order.len());
    let mut last_user: HashMap<u64, String> = HashMap::new();
    let mut last_group: HashMap<u64, String> = HashMap::new();
    // Lossless: the next input byte not yet copied. Whatever lies between two
    // entries' data (padding, extension and global headers) goes out as it is.
    let mut copied = 0u64;
    for src in order {
        let mut entry = match src {
            Source::Tar(e) => {
                let from = if opts.lossless {
                    copied
                } else {
                    e.header_start
                };
                let start = p.cur.len();
                let hlen = usize::try_from(e.data_start - from).map_err(|_| Error::BadTar {
                    offset: from,
                    reason: "header too large".into(),
                })?;
                p.cur.resize(start + hlen, 0);
                read_exact_at(input, &mut p.cur[start..], from)?;
                copied = e.data_start + e.size;
                toc_entry_for(e, &mut last_user, &mut last_group)
            }
            Source::Landmark(name) => {
                p.cur.extend_from_slice(&synthetic_file_header(name, 1));
                let mut t = TocEntry::new(*name, EntryType::Reg);
                t.size = 1;
                t
            }
        };
        if src.kind() != TarKind::Reg {
            entries.push(entry);
            entry_members.push(None);
            continue;
        }
        let size = src.size();
        let mut file_hash = Sha256::new();
        let first = entries.len();
        let mut written = 0u64;
        while written < size {
            let remain = size - written;
            let len = remain.min(opts.chunk_size);
            if remain >= opts.chunk_size {
                entry.chunk_size = opts.chunk_size;
            }
            // Data never starts in the blob's first member: readers take offset 0 to
            // mean "no data", as the reference does.
            if opts.min_chunk_size == 0
                || p.members == 0
                || p.cur.len() as u64 >= opts.min_chunk_size
            {
                p.finish_member()?;
            }
            entry.chunk_offset = written;
            entry.inner_offset = p.cur.len() as u64;
            let start = p.cur.len();
            p.cur.resize(start + len as usize, 0);
            match src {
                Source::Tar(e) => {
                    read_exact_at(input, &mut p.cur[start..], e.data_start + written)?
                }
                Source::Landmark(_) => p.cur[start] = LANDMARK_CONTENTS,
            }
            let data = &p.cur[start..];
            file_hash.update(data);
            entry.chunk_digest = sha256_digest(data);
            entries.push(entry);
            entry_members.push(Some(p.members));
            written += len;
            entry = TocEntry::new(entries[first].name.clone(), EntryType::Chunk);
        }
        if size == 0 {
            entries.push(entry);
            entry_members.push(None);
        }
        entries[first].digest = format!("sha256:{}", hex::encode(file_hash.finalize()));
        if !opts.lossless {
            let padded_len = p.cur.len() + (padded(size) - size) as usize;
            p.cur.resize(padded_len, 0);
        }
    }
    if opts.lossless {
        // The end-of-archive blocks and anything after them, as they were.
        let len = input
            .metadata()
            .map_err(|e| Error::io_at("reading the tar's size", e))?
            .len();
        let mut at = copied;
        while at < len {
            let n = (len - at).min(1 << 20) as usize;
            let start = p.cur.len();
            p.cur.resize(start + n, 0);
            read_exact_at(input, &mut p.cur[start..], at)?;
            at += n as u64;
            if p.cur.len() as u64 >= opts.chunk_size {
                p.finish_member()?;
            }
        }
    }
    p.finish_member()?;
    p.flush_batch()?;
    Ok(Produced {
        entries,
        entry_members,
        diff_hash: p.diff_hash,
        uncompressed_size: p.uncompressed_size,
    })
}

fn toc_entry_for(
    e: &TarEntry,
    last_user: &mut HashMap<u64, String>,
    last_group: &mut HashMap<u64, String>,
) -> TocEntry {
    // Like the reference, a user or group name is written only when it changes for its id.
    let if_changed = |map: &mut HashMap<u64, String>, id: u64, name: &str| -> String {
        if name.is_empty() || map.get(&id).is_some_and(|n| n == name) {
            return String::new();
        }
        map.insert(id, name.to_string());
        name.to_string()
    };
    let kind = EntryType::from(e.kind);
    let mut t = TocEntry::new(e.name.clone(), kind);
    t.size = e.size;
    t.mode = e.mode;
    t.uid = e.uid;
    t.gid = e.gid;
    t.user_name = if_changed(last_user, e.uid, &e.user_name);
    t.group_name = if_changed(last_group, e.gid, &e.group_name);
    t.mod_time = format_modtime(e.mtime);
    t.xattrs = e.xattrs.clone();
    if matches!(e.kind, TarKind::Symlink | TarKind::Hardlink) {
        t.link_name = e.link_name.clone();
    }
    if matches!(e.kind, TarKind::Char | TarKind::Block) {
        t.dev_major = e.dev_major;
        t.dev_minor = e.dev_minor;
    }
    t
}

struct Producer {
    tx: mpsc::SyncSender<Vec<Vec<u8>>>,
    batch: Vec<Vec<u8>>,
    batch_len: usize,
    batch_bytes: usize,
    /// Index of the member `cur` will become.
    members: usize,
    cur: Vec<u8>,
    diff_hash: Sha256,
    uncompressed_size: u64,
}

impl Producer {
    fn finish_member(&mut self) -> Result<()> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let member = std::mem::take(&mut self.cur);
        self.diff_hash.update(&member);
        self.uncompressed_size += member.len() as u64;
        self.batch_len += member.len();
        self.batch.push(member);
        self.members += 1;
        if self.batch_len >= self.batch_bytes || self.batch.len() >= 8192 {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch_len = 0;
        self.tx
            .send(std::mem::take(&mut self.batch))
            .map_err(|_| Error::Io(io::Error::other("blob writer stopped")))
    }
}

fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    f.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::BadTar {
            offset,
            reason: "archive ends inside an entry".into(),
        },
        _ => Error::io_at(format!("reading the tar at offset {offset}"), e),
    })
}

/// Reads a file from the start with positioned reads, whatever its cursor says.
struct PositionedReader<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
    hash: Sha256,
}

impl<W: Write> CountingWriter<W> {
    fn new(inner: W) -> Self {
        CountingWriter {
            inner,
            count: 0,
            hash: Sha256::new(),
        }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
