//! Whole-blob verification: every chunk against its digest, every file against its
//! digest, the decompressed stream against the TOC, and optionally everything against
//! the tar the blob was built from.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::footer::{Compression, Footer};
use crate::names::clean_name;
use crate::reader::{BlobSource, NodeKind, OpenOptions, Reader};
use crate::tarfmt::{TarEntry, TarKind, TarScanner};
use crate::toc::{
    parse_modtime, EntryType, Toc, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
};

/// What a successful verification found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub footer: Footer,
    pub toc_digest: String,
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub entries: usize,
    pub regular_files: usize,
    pub chunks: usize,
    /// Entries compared with the original tar, when one was given.
    pub compared_with_tar: Option<usize>,
}

/// Sequential reads over a [`BlobSource`].
pub struct SourceReader<'a> {
    src: &'a dyn BlobSource,
    pos: u64,
    end: u64,
}

impl<'a> SourceReader<'a> {
    pub fn new(src: &'a dyn BlobSource, start: u64, end: u64) -> Self {
        SourceReader {
            src,
            pos: start,
            end,
        }
    }
}

impl Read for SourceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64).min(1 << 20) as usize;
        if n == 0 {
            return Ok(0);
        }
        let data = self.src.read_at(self.pos, n)?;
        buf[..n].copy_from_slice(&data);
        self.pos += n as u64;
        Ok(n)
    }
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Verifies a blob completely. `original_tar`, when given, is the tar it was built
/// from: every entry must match it, both ways.
pub fn verify_blob(
    src: &dyn BlobSource,
    expected_toc_digest: Option<&str>,
    original_tar: Option<&mut dyn Read>,
) -> Result<VerifyReport> {
    let opts = OpenOptions {
        expected_toc_digest: expected_toc_digest.map(str::to_string),
        ..OpenOptions::default()
    };
    verify_blob_with(src, &opts, original_tar)
}

/// As [`verify_blob`], opening the blob with `opts` (an expected TOC digest, the
/// source of an external TOC, limits).
pub fn verify_blob_with(
    src: &dyn BlobSource,
    opts: &OpenOptions,
    original_tar: Option<&mut dyn Read>,
) -> Result<VerifyReport> {
    let (reader, toc) = Reader::open_with_toc(src, opts)?;
    let mut regular_files = 0;
    let mut chunks = 0;
    for (id, node) in reader.index.nodes() {
        if node.kind != NodeKind::Reg {
            continue;
        }
        regular_files += 1;
        chunks += node.chunks.len();
        reader.copy_file(src, id, &mut io::sink())?;
    }

    // The decompressed stream must be a tar whose entries are the TOC's, in order.
    let stream_end = match reader.footer {
        Footer::ZstdChunked { .. } => reader.payload_end(),
        f => src.size() - f.size() as u64,
    };
    let raw = SourceReader::new(src, 0, stream_end);
    let decompressed: Box<dyn Read + '_> = match reader.compression() {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(raw)?),
    };
    let mut hashing = HashingReader {
        inner: decompressed,
        hash: Sha256::new(),
        count: 0,
    };
    {
        let mut scanner = TarScanner::new(&mut hashing);
        let expected: Vec<_> = toc
            .entries
            .iter()
            .filter(|e| e.kind != EntryType::Chunk)
            .collect();
        let mut i = 0;
        while let Some(t) = scanner
            .next_entry()
            .map_err(|e| Error::Mismatch(format!("decompressed stream: {e}")))?
        {
            if reader.compression() == Compression::Gzip
                && i == expected.len()
                && clean_name(&t.name).ok().as_deref() == Some(TOC_TAR_NAME)
            {
                continue;
            }
            let e = expected.get(i).ok_or_else(|| {
                Error::Mismatch(format!(
                    "decompressed stream has entry {:?} beyond the TOC",
                    t.name
                ))
            })?;
            if e.name != t.name || e.kind != EntryType::from(t.kind) || e.size != t.size {
                return Err(Error::Mismatch(format!(
                    "stream entry {i} is {:?} ({:?}, {} bytes) but the TOC says {:?} ({}, {} bytes)",
                    t.name, t.kind, t.size, e.name, e.kind.as_str(), e.size
                )));
            }
            i += 1;
        }
        if i != expected.len() {
            return Err(Error::Mismatch(format!(
                "decompressed stream holds {i} entries, the TOC {}",
                expected.len()
            )));
        }
    }
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| Error::Mismatch(format!("decompressed stream: {e}")))?;
    let diff_id = format!("sha256:{}", hex::encode(hashing.hash.finalize()));

    let compared_with_tar = match original_tar {
        Some(tar) => Some(compare_with_tar(&toc, tar)?),
        None => None,
    };
    Ok(VerifyReport {
        footer: reader.footer,
        toc_digest: reader.toc_digest.clone(),
        diff_id,
        uncompressed_size: hashing.count,
        entries: toc.entries.len(),
        regular_files,
        chunks,
        compared_with_tar,
    })
}

/// Compares the TOC with the original tar (duplicates: last wins) both ways; returns
/// how many entries were compared.
pub fn compare_with_tar(toc: &Toc, tar: &mut dyn Read) -> Result<usize> {
    let mut scanner = TarScanner::new(tar);
    let mut original: HashMap<String, (TarEntry, Option<String>)> = HashMap::new();
    while let Some(e) = scanner.next_entry()? {
        let name = clean_name(&e.name)
            .map_err(|r| Error::Mismatch(format!("original tar entry {:?}: {r}", e.name)))?;
        if name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK || name == TOC_TAR_NAME {
            continue;
        }
        let digest = if e.kind == TarKind::Reg {
            let mut h = Sha256::new();
            let mut left = e.size;
            let mut buf = vec![0u8; 1 << 20];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                scanner.read_data(&mut buf[..n])?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
            Some(format!("sha256:{}", hex::encode(h.finalize())))
        } else {
            None
        };
        original.insert(name, (e, digest));
    }
    // A TOC may list a name twice (a lossless build keeps the tar's duplicates);
    // readers take the last, so only the last is held against the tar's last.
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, e) in toc.entries.iter().enumerate() {
        if e.kind != EntryType::Chunk {
            if let Ok(n) = clean_name(&e.name) {
                last.insert(n, i);
            }
        }
    }
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    let mut users: HashMap<u64, String> = HashMap::new();
    let mut groups: HashMap<u64, String> = HashMap::new();
    for (i, e) in toc.entries.iter().enumerate() {
        if e.kind == EntryType::Chunk {
            continue;
        }
        let name = clean_name(&e.name)
            .map_err(|r| Error::Mismatch(format!("TOC entry {:?}: {r}", e.name)))?;
        if !e.user_name.is_empty() {
            users.insert(e.uid, e.user_name.clone());
        }
        if !e.group_name.is_empty() {
            groups.insert(e.gid, e.group_name.clone());
        }
        if name == PREFETCH_LANDMARK || name == NO_PREFETCH_LANDMARK {
            continue;
        }
        if last.get(&name) != Some(&i) {
            continue;
        }
        let (t, digest) = original.get(&name).ok_or_else(|| {
            Error::Mismatch(format!("TOC entry {name:?} is not in the original tar"))
        })?;
        let mut diffs = Vec::new();
        let mut check = |what: &str, ok: bool, got: String, want: String| {
            if !ok {
                diffs.push(format!("{what}: blob {got}, tar {want}"));
            }
        };
        check(
            "type",
            e.kind == EntryType::from(t.kind),
            e.kind.as_str().into(),
            format!("{:?}", t.kind),
        );
        check(
            "mode",
            e.mode == t.mode,
            format!("{:o}", e.mode),
            format!("{:o}", t.mode),
        );
        check("uid", e.uid == t.uid, e.uid.to_string(), t.uid.to_string());
        check("gid", e.gid == t.gid, e.gid.to_string(), t.gid.to_string());
        check(
            "size",
            e.size == t.size,
            e.size.to_string(),
            t.size.to_string(),
        );
        let user = users.get(&e.uid).cloned().unwrap_or_default();
        check(
            "userName",
            t.user_name.is_empty() || user == t.user_name,
            user.clone(),
            t.user_name.clone(),
        );
        let group = groups.get(&e.gid).cloned().unwrap_or_default();
        check(
            "groupName",
            t.group_name.is_empty() || group == t.group_name,
            group.clone(),
            t.group_name.clone(),
        );
        let mtime = if e.mod_time.is_empty() {
            0
        } else {
            parse_modtime(&e.mod_time).unwrap_or(-1)
        };
        check(
            "mtime",
            mtime == t.mtime,
            mtime.to_string(),
            t.mtime.to_string(),
        );
        if matches!(t.kind, TarKind::Symlink | TarKind::Hardlink) {
            check(
                "linkName",
                e.link_name == t.link_name,
                e.link_name.clone(),
                t.link_name.clone(),
            );
        }
        if matches!(t.kind, TarKind::Char | TarKind::Block) {
            check(
                "devMajor",
                e.dev_major == t.dev_major,
                e.dev_major.to_string(),
                t.dev_major.to_string(),
            );
            check(
                "devMinor",
                e.dev_minor == t.dev_minor,
                e.dev_minor.to_string(),
                t.dev_minor.to_string(),
            );
        }
        check(
            "xattrs",
            e.xattrs == t.xattrs,
            format!("{:?}", e.xattrs),
            format!("{:?}", t.xattrs),
        );
        if let Some(d) = digest {
            check("digest", &e.digest == d, e.digest.clone(), d.clone());
        }
        if !diffs.is_empty() {
            return Err(Error::Mismatch(format!(
                "entry {name:?} differs from the original tar: {}",
                diffs.join("; ")
            )));
        }
        seen.insert(name, ());
    }
    for name in original.keys() {
        if !name.is_empty() && !seen.contains_key(name) {
            return Err(Error::Mismatch(format!(
                "original tar entry {name:?} is missing from the TOC"
            )));
        }
    }
    Ok(seen.len())
}
