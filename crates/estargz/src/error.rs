//! The error type of the format crate: every way a blob, a TOC or a tar can be wrong.

use std::io;

/// Everything that can go wrong while building, opening, reading or verifying a blob.
///
/// Variants say what is wrong and where (an offset, an entry name, a chunk), so a
/// caller can log the error as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("I/O error while {context}: {source}")]
    IoAt {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("blob of {size} bytes is too small to hold a footer")]
    BlobTooSmall { size: u64 },
    #[error("no eStargz, legacy stargz or zstd:chunked footer found in the last {checked} bytes")]
    NoFooter { checked: u64 },
    #[error("invalid footer: {0}")]
    BadFooter(String),
    #[error("the blob's TOC is stored outside it (external TOC) and no source for it was given")]
    ExternalToc,
    #[error("TOC at offset {offset} is invalid: {reason}")]
    BadToc { offset: u64, reason: String },
    #[error("TOC JSON is invalid: {0}")]
    TocJson(#[from] serde_json::Error),
    #[error("TOC is {size} bytes, over the limit of {limit}")]
    TocTooLarge { size: u64, limit: u64 },
    #[error("layer refused: its TOC holds more {what} than the per-layer budget of {limit}")]
    TocBudget { what: String, limit: u64 },
    #[error("TOC digest mismatch: expected {expected}, computed {actual}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("entry {index} ({name:?}) is invalid: {reason}")]
    BadEntry {
        index: usize,
        name: String,
        reason: String,
    },
    #[error(
        "chunk of {file:?} at file offset {file_offset} (blob offset {blob_offset}): {reason}"
    )]
    BadChunk {
        file: String,
        file_offset: u64,
        blob_offset: u64,
        reason: String,
    },
    #[error("digest mismatch for {what}: expected {expected}, computed {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    BadDigest(String),
    #[error("tar input is invalid at offset {offset}: {reason}")]
    BadTar { offset: u64, reason: String },
    #[error("prioritized file {0:?} is not in the tar")]
    PrioritizedNotFound(String),
    #[error("no such file in the layer: {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io_at(context: impl Into<String>, source: io::Error) -> Self {
        Error::IoAt {
            context: context.into(),
            source,
        }
    }
}
