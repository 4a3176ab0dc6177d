//! `ctr-remote blob ...`: build, verify, inspect and extract single eStargz or
//! zstd:chunked blobs, for pipelines that produce layers without a registry.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use estargz::{BuildOptions, Codec, FileBlob, OpenOptions, Reader};

#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Build an eStargz (or zstd:chunked) blob from a tar or tar.gz.
    Build(BuildArgs),
    /// Verify a blob: footer, TOC digest, every chunk and file, the whole stream, and
    /// optionally the tar it was built from.
    Verify(VerifyArgs),
    /// Print a blob's TOC JSON.
    Toc(TocArgs),
    /// Extract a blob's files into a new directory.
    Extract(ExtractArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Input tar or tar.gz ("-" for standard input).
    pub input: PathBuf,
    /// Output blob.
    pub output: PathBuf,
    /// Build zstd:chunked instead of eStargz.
    #[arg(long)]
    pub zstdchunked: bool,
    /// Compression level (gzip 0-9, default 9; zstd 1-22, default 3).
    #[arg(long = "level", alias = "estargz-compression-level")]
    pub level: Option<i32>,
    /// Largest chunk of a regular file, in bytes.
    #[arg(long = "chunk-size", alias = "estargz-chunk-size", default_value_t = estargz::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Small files share a compressed member until it holds this many bytes (0: off).
    #[arg(
        long = "min-chunk-size",
        alias = "estargz-min-chunk-size",
        default_value_t = 0
    )]
    pub min_chunk_size: u64,
    /// File listing the paths to prioritize, in order: one path per line, or the JSON
    /// lines `{"path": ...}` that `image optimize --record-out` writes.
    #[arg(long = "prioritized-files", alias = "estargz-record-in")]
    pub prioritized_files: Option<PathBuf>,
    /// Skip prioritized paths missing from the tar instead of failing.
    #[arg(long)]
    pub allow_missing: bool,
    /// Compression threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub blob: PathBuf,
    /// Expected TOC digest (sha256:...).
    #[arg(long)]
    pub toc_digest: Option<String>,
    /// The tar the blob was built from; every entry must match it.
    #[arg(long)]
    pub tar: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TocArgs {
    pub blob: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    pub blob: PathBuf,
    /// Destination directory (created; must be empty).
    pub dest: PathBuf,
    /// Expected TOC digest (sha256:...).
    #[arg(long)]
    pub toc_digest: Option<String>,
    /// Apply file owners (needs root).
    #[arg(long)]
    pub chown: bool,
}

pub fn run(cmd: BlobCommand) -> Result<()> {
    match cmd {
        BlobCommand::Build(a) => build(a),
        BlobCommand::Verify(a) => verify(a),
        BlobCommand::Toc(a) => toc(a),
        BlobCommand::Extract(a) => extract(a),
    }
}

/// Reads a prioritized-files list: plain lines, or JSON lines with a `path` field.
pub fn read_path_list(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let p = if line.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
            match v.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None => bail!("{}:{}: no \"path\" field", path.display(), n + 1),
            }
        } else {
            line.to_string()
        };
        if seen.insert(p.clone()) {
            out.push(p);
        }
    }
    Ok(out)
}

fn build(a: BuildArgs) -> Result<()> {
    let codec = if a.zstdchunked {
        Codec::Zstd {
            level: a.level.unwrap_or(3),
        }
    } else {
        let level = a.level.unwrap_or(9);
        Codec::Gzip {
            level: u32::try_from(level)
                .map_err(|_| anyhow::anyhow!("gzip level {level} is not in 0..=9"))?,
        }
    };
    let prioritized_files = match &a.prioritized_files {
        Some(p) => read_path_list(p)?,
        None => Vec::new(),
    };
    let opts = BuildOptions {
        codec,
        chunk_size: a.chunk_size,
        min_chunk_size: a.min_chunk_size,
        prioritized_files,
        allow_missing_prioritized: a.allow_missing,
        threads: a.threads,
        ..BuildOptions::default()
    };
    let tmp = a.output.with_extension("partial");
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let result = if a.input.as_os_str() == "-" {
        estargz::build(io::stdin().lock(), &mut out, &opts)
    } else {
        let mut file =
            File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?;
        let mut magic = [0u8; 2];
        let gzipped = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        if gzipped || !file.metadata()?.is_file() {
            let file =
                File::open(&a.input).with_context(|| format!("opening {}", a.input.display()))?;
            estargz::build(file, &mut out, &opts)
        } else {
            // A plain tar on disk is read in place; no need to copy it first.
            estargz::build_from_file(&file, &mut out, &opts)
        }
    }
    .with_context(|| format!("building a blob from {}", a.input.display()));
    let result = result.and_then(|r| {
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(r)
    });
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &a.output)
        .with_context(|| format!("renaming to {}", a.output.display()))?;
    for m in &r.missing_prioritized {
        tracing::warn!(path = %m, "prioritized file not found in the tar");
    }
    if a.json {
        let v = serde_json::json!({
            "blobDigest": r.blob_digest,
            "blobSize": r.blob_size,
            "diffID": r.diff_id,
            "uncompressedSize": r.uncompressed_size,
            "tocDigest": r.toc_digest,
            "entries": r.toc.entries.len(),
            "annotations": r.annotations,
            "missingPrioritized": r.missing_prioritized,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("blob digest:       {}", r.blob_digest);
        println!("blob size:         {}", r.blob_size);
        println!("diffID:            {}", r.diff_id);
        println!("uncompressed size: {}", r.uncompressed_size);
        println!("TOC digest:        {}", r.toc_digest);
        println!("TOC entries:       {}", r.toc.entries.len());
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let src = FileBlob::open(&a.blob).with_context(|| format!("opening {}", a.blob.display()))?;
    let mut tar_file = match &a.tar {
        Some(p) => Some(BufReader::new(
            File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => None,
    };
    let tar: Option<&mut dyn Read> = tar_file.as_mut().map(|t| t as &mut dyn Read);
    let r = estargz::verify_blob(&src, a.toc_digest.as_deref(), tar)
        .with_context(|| format!("verifying {}", a.blob.display()))?;
    if a.json {
        let v = serde_json::json!({
            "ok": true,
            "format": format!("{:?}", r.footer),
            "tocDigest": r.toc_digest,
            "diffID": r.diff_id,
            "uncompressedSize": r.uncompressed_size,
            "entries": r.entries,
            "regularFiles": r.regular_files,
            "chunks": r.chunks,
            "comparedWithTar": r.compared_with_tar,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("OK: {:?}", r.footer);
        println!("TOC digest: {}", r.toc_digest);
        println!("diffID:     {}", r.diff_id);
        println!(
            "{} entries, {} regular files, {} chunks verified",
            r.entries, r.regular_files, r.chunks
        );
        if let Some(n) = r.compared_with_tar {
            println!("{n} entries match the original tar");
        }
    }
    Ok(())
}

fn toc(a: TocArgs) -> Result<()> {
    let src = FileBlob::open(&a.blob).with_context(|| format!("opening {}", a.blob.display()))?;
    let raw = estargz::read_toc(&src, &OpenOptions::default())
        .with_context(|| format!("reading the TOC of {}", a.blob.display()))?;
    let mut out = io::stdout().lock();
    out.write_all(&raw.json)?;
    out.write_all(b"\n")?;
    Ok(())
}

fn extract(a: ExtractArgs) -> Result<()> {
    let src = FileBlob::open(&a.blob).with_context(|| format!("opening {}", a.blob.display()))?;
    let opts = OpenOptions {
        expected_toc_digest: a.toc_digest.clone(),
        ..OpenOptions::default()
    };
    let reader =
        Reader::open(&src, &opts).with_context(|| format!("opening {}", a.blob.display()))?;
    let n = estargz::extract(
        &reader,
        &src,
        &a.dest,
        &estargz::ExtractOptions { chown: a.chown },
    )
    .with_context(|| format!("extracting into {}", a.dest.display()))?;
    println!("extracted {n} entries into {}", a.dest.display());
    Ok(())
}
