//! Conversion of one layer blob held in a local file: to eStargz, to
//! zstd:chunked, or to an uncompressed tar, or recognising a blob that is
//! already in the wanted format. Synchronous; callers run it on a blocking thread.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use estargz::{BuildOptions, Codec, Compression, FileBlob, OpenOptions, Reader};
use registry::Digest;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// What layers become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// eStargz (gzip).
    Estargz,
    /// zstd:chunked.
    ZstdChunked,
    /// Plain tar.
    Uncompressed,
    /// Layers are left as they are (only media types may change).
    Keep,
}

/// How to convert a layer.
#[derive(Clone, Debug)]
pub struct LayerOptions {
    pub target: Target,
    pub gzip_level: u32,
    pub zstd_level: i32,
    pub chunk_size: u64,
    pub min_chunk_size: u64,
    pub prioritized_files: Vec<String>,
    /// Keep blobs that are already in the target format.
    pub reuse: bool,
    /// Compression threads for one layer; 0 means one per core.
    pub threads: usize,
    /// eStargz only: keep each layer's TOC out of its blob, for a separate TOC image
    /// (`--estargz-external-toc`).
    pub external_toc: bool,
    /// With `external_toc`: keep the tar stream as it is, so diff IDs do not change
    /// (`--estargz-keep-diff-id`).
    pub keep_diff_id: bool,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            target: Target::Estargz,
            gzip_level: 9,
            zstd_level: 3,
            chunk_size: estargz::DEFAULT_CHUNK_SIZE,
            min_chunk_size: 0,
            prioritized_files: Vec::new(),
            reuse: false,
            threads: 0,
            external_toc: false,
            keep_diff_id: false,
        }
    }
}

/// The compression a blob's first bytes show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobCompression {
    Gzip,
    Zstd,
    /// Neither: taken to be a plain tar.
    Plain,
}

/// The compression of the resulting blob, which picks its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerFormat {
    Gzip,
    Zstd,
    Tar,
}

/// What happened to a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new blob was made.
    Converted,
    /// Already in the target format; the blob is kept.
    Reused,
    /// Left alone.
    Unchanged,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Converted => "converted",
            Outcome::Reused => "reused",
            Outcome::Unchanged => "unchanged",
        })
    }
}

/// The result of converting one blob.
#[derive(Debug)]
pub struct Converted {
    pub outcome: Outcome,
    /// The blob's format when it is known to have changed or been checked.
    pub format: Option<LayerFormat>,
    /// The new blob (the original one unless `outcome` is `Converted`).
    pub digest: Digest,
    pub size: u64,
    /// `sha256:` of the decompressed blob, when computed.
    pub diff_id: Option<String>,
    /// Annotations to set on the descriptor; the format-specific ones it had
    /// are dropped first.
    pub annotations: BTreeMap<String, String>,
    /// The new blob's bytes, when a new blob was made.
    pub file: Option<tempfile::NamedTempFile>,
    /// The compressed TOC, when it was kept out of the blob.
    pub external_toc: Option<Vec<u8>>,
}

/// Annotations this crate owns and rewrites on every converted layer.
pub const FORMAT_ANNOTATIONS: [&str; 6] = [
    estargz::TOC_DIGEST_ANNOTATION,
    estargz::PREFETCH_END_ANNOTATION,
    estargz::TOC_TAIL_ANNOTATION,
    estargz::UNCOMPRESSED_SIZE_ANNOTATION,
    estargz::MANIFEST_CHECKSUM_ANNOTATION,
    estargz::MANIFEST_POSITION_ANNOTATION,
];

/// Looks at a blob's magic number.
pub fn detect(path: &Path) -> Result<BlobCompression> {
    let mut f = open(path)?;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
    Ok(if got >= 3 && head[..3] == [0x1f, 0x8b, 0x08] {
        BlobCompression::Gzip
    } else if got == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
        BlobCompression::Zstd
    } else {
        BlobCompression::Plain
    })
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))
}

/// The decompressed stream of a blob.
pub(crate) fn decompressed(path: &Path, c: BlobCompression) -> Result<Box<dyn Read>> {
    let f = BufReader::with_capacity(1 << 20, open(path)?);
    Ok(match c {
        BlobCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(f)),
        BlobCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(f)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?,
        ),
        BlobCompression::Plain => Box::new(f),
    })
}

/// sha256 and length of everything `r` yields, copying it to `out` when given.
fn digest_stream(mut r: impl Read, mut out: Option<&mut dyn Write>) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        if let Some(w) = out.as_deref_mut() {
            w.write_all(&buf[..n])?;
        }
        n_total += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n_total))
}

#[cfg(test)]
fn file_digest(path: &Path) -> Result<(Digest, u64)> {
    let (d, n) = digest_stream(open(path)?, None)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok((Digest::parse(&d).map_err(registry::Error::from)?, n))
}

/// Converts the blob at `path` (whose digest and size are `digest`, `size`),
/// writing any new blob into `workdir`.
pub fn convert_blob(
    path: &Path,
    digest: &Digest,
    size: u64,
    opts: &LayerOptions,
    workdir: &Path,
) -> Result<Converted> {
    let compression = detect(path)?;
    let unchanged = || Converted {
        outcome: Outcome::Unchanged,
        format: None,
        digest: digest.clone(),
        size,
        diff_id: None,
        annotations: BTreeMap::new(),
        file: None,
        external_toc: None,
    };
    let wanted = match opts.target {
        Target::Keep => return Ok(unchanged()),
        Target::Uncompressed => {
            if compression == BlobCompression::Plain {
                return Ok(unchanged());
            }
            let mut tmp = tempfile::NamedTempFile::new_in(workdir)
                .map_err(|e| Error::io("creating a temporary file", e))?;
            let (diff_id, n) = {
                let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
                let r = digest_stream(decompressed(path, compression)?, Some(&mut w))
                    .and_then(|r| w.flush().map(|_| r))
                    .map_err(|e| Error::io(format!("decompressing {}", path.display()), e))?;
                r
            };
            return Ok(Converted {
                outcome: Outcome::Converted,
                format: Some(LayerFormat::Tar),
                digest: Digest::parse(&diff_id).map_err(registry::Error::from)?,
                size: n,
                diff_id: Some(diff_id),
                annotations: BTreeMap::new(),
                file: Some(tmp),
                external_toc: None,
            });
        }
        Target::Estargz => Compression::Gzip,
        Target::ZstdChunked => Compression::Zstd,
    };

    if opts.reuse && !opts.external_toc {
        if let Some(c) = reuse(path, digest, size, compression, wanted)? {
            return Ok(c);
        }
    }

    let codec = match wanted {
        Compression::Gzip => Codec::Gzip {
            level: opts.gzip_level,
        },
        Compression::Zstd => Codec::Zstd {
            level: opts.zstd_level,
        },
    };
    let build_opts = BuildOptions {
        codec,
        chunk_size: opts.chunk_size,
        min_chunk_size: opts.min_chunk_size,
        prioritized_files: opts.prioritized_files.clone(),
        // One record file serves every layer: each holds only some of the paths.
        allow_missing_prioritized: true,
        threads: opts.threads,
        external_toc: opts.external_toc,
        lossless: opts.keep_diff_id,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(workdir)
        .map_err(|e| Error::io("creating a temporary file", e))?;
    let out = {
        let w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        // The builder recognises gzip itself; zstd input is decoded here.
        let input: Box<dyn Read> = match compression {
            BlobCompression::Zstd => decompressed(path, compression)?,
            _ => Box::new(open(path)?),
        };
        estargz::build(input, w, &build_opts)?
    };
    let (new_digest, new_size) = (
        Digest::parse(&out.blob_digest).map_err(registry::Error::from)?,
        out.blob_size,
    );
    Ok(Converted {
        outcome: Outcome::Converted,
        format: Some(match wanted {
            Compression::Gzip => LayerFormat::Gzip,
            Compression::Zstd => LayerFormat::Zstd,
        }),
        digest: new_digest,
        size: new_size,
        diff_id: Some(out.diff_id),
        annotations: out.annotations,
        file: Some(tmp),
        external_toc: out.external_toc,
    })
}

/// The annotations of a blob that already is eStargz / zstd:chunked in the
/// wanted compression, or `None` when it is not.
fn reuse(
    path: &Path,
    digest: &Digest,
    size: u64,
    compression: BlobCompression,
    wanted: Compression,
) -> Result<Option<Converted>> {
    let blob =
        FileBlob::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let raw = match estargz::read_toc(&blob, &OpenOptions::default()) {
        Ok(raw) if raw.footer.compression() == wanted => raw,
        Ok(_) => return Ok(None),
        Err(e) => {
            tracing::debug!(%digest, error = %e, "not an eStargz blob");
            return Ok(None);
        }
    };
    // A footer alone proves little: the TOC must also index cleanly.
    let (reader, toc) = match Reader::open_with_toc(&blob, &OpenOptions::default()) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(%digest, error = %e, "footer found but the TOC does not index");
            return Ok(None);
        }
    };
    let (diff_id, uncompressed) = digest_stream(decompressed(path, compression)?, None)
        .map_err(|e| Error::io(format!("decompressing {}", path.display()), e))?;
    let mut annotations = BTreeMap::new();
    annotations.insert(
        estargz::TOC_DIGEST_ANNOTATION.to_string(),
        raw.digest.clone(),
    );
    annotations.insert(
        estargz::UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
        uncompressed.to_string(),
    );
    annotations.insert(
        estargz::PREFETCH_END_ANNOTATION.to_string(),
        toc.prefetch_end_hint(reader.payload_end())
            .unwrap_or(0)
            .to_string(),
    );
    annotations.insert(
        estargz::TOC_TAIL_ANNOTATION.to_string(),
        (estargz::BlobSource::size(&blob) - raw.range.start).to_string(),
    );
    if wanted == Compression::Zstd {
        let compressed = estargz::BlobSource::read_at(
            &blob,
            raw.range.start,
            (raw.range.end - raw.range.start) as usize,
        )
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        annotations.insert(
            estargz::MANIFEST_CHECKSUM_ANNOTATION.to_string(),
            format!("sha256:{}", hex::encode(Sha256::digest(&compressed))),
        );
        annotations.insert(
            estargz::MANIFEST_POSITION_ANNOTATION.to_string(),
            format!(
                "{}:{}:{}:1",
                raw.range.start,
                compressed.len(),
                raw.json.len()
            ),
        );
    }
    Ok(Some(Converted {
        outcome: Outcome::Reused,
        format: Some(match wanted {
            Compression::Gzip => LayerFormat::Gzip,
            Compression::Zstd => LayerFormat::Zstd,
        }),
        digest: digest.clone(),
        size,
        diff_id: Some(diff_id),
        annotations,
        file: None,
        external_toc: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar")
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    }

    fn stored(dir: &Path, data: &[u8]) -> (std::path::PathBuf, Digest) {
        let d = Digest::sha256(data);
        let p = dir.join(d.hex());
        std::fs::write(&p, data).expect("write");
        (p, d)
    }

    #[test]
    fn converts_and_reuses_both_formats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar = tar_with(&[("a.txt", b"hello"), ("b/c.bin", &[7u8; 300_000])]);
        let (p, d) = stored(dir.path(), &gzip(&tar));
        for target in [Target::Estargz, Target::ZstdChunked] {
            let opts = LayerOptions {
                target,
                threads: 1,
                ..Default::default()
            };
            let c = convert_blob(&p, &d, 0, &opts, dir.path()).expect("convert");
            assert_eq!(c.outcome, Outcome::Converted);
            // eStargz rewrites the tar (landmarks, TOC), so the diffID is new.
            let diff = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
            assert_ne!(c.diff_id.as_deref(), Some(diff.as_str()));
            let file = c.file.as_ref().expect("new blob");
            let (again, _) = file_digest(file.path()).expect("digest");
            assert_eq!(again, c.digest);
            // The tail hint names exactly the TOC and footer.
            let blob = FileBlob::open(file.path()).expect("blob");
            let raw = estargz::read_toc(&blob, &OpenOptions::default()).expect("TOC");
            assert_eq!(
                c.annotations[estargz::TOC_TAIL_ANNOTATION],
                (c.size - raw.range.start).to_string(),
                "{target:?}"
            );

            let reuse_opts = LayerOptions {
                reuse: true,
                ..opts.clone()
            };
            let r = convert_blob(file.path(), &c.digest, c.size, &reuse_opts, dir.path())
                .expect("reuse");
            assert_eq!(r.outcome, Outcome::Reused);
            assert_eq!(r.digest, c.digest);
            assert_eq!(r.annotations, c.annotations, "{target:?}");
            assert_eq!(r.diff_id, c.diff_id);
        }
    }

    #[test]
    fn uncompresses_and_keeps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar = tar_with(&[("x", b"data")]);
        let (p, d) = stored(dir.path(), &gzip(&tar));
        let opts = LayerOptions {
            target: Target::Uncompressed,
            ..Default::default()
        };
        let c = convert_blob(&p, &d, 1, &opts, dir.path()).expect("convert");
        assert_eq!(c.digest, Digest::sha256(&tar));
        assert_eq!(c.format, Some(LayerFormat::Tar));
        let (pt, dt) = stored(dir.path(), &tar);
        let u = convert_blob(&pt, &dt, 1, &opts, dir.path()).expect("plain");
        assert_eq!(u.outcome, Outcome::Unchanged);
        let reuse = LayerOptions {
            reuse: true,
            ..Default::default()
        };
        // A plain tar.gz is not eStargz: it gets converted.
        let c = convert_blob(&p, &d, 1, &reuse, dir.path()).expect("convert");
        assert_eq!(c.outcome, Outcome::Converted);
    }
}
