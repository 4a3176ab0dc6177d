//! The crate's error type.

use std::io;

/// Everything that can go wrong opening, mounting or reading a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fetching {what}: {source}")]
    Fetch {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: {source}")]
    Format {
        layer: String,
        #[source]
        source: estargz::Error,
    },
    #[error("layer {layer} has no TOC digest to verify against (mounting it anyway needs allow_no_verification, and the stargz.skipverify label on its snapshot)")]
    NoVerification { layer: String },
    #[error(
        "layer {layer}, file {file:?}: chunk at file offset {file_offset} is corrupt: {reason}"
    )]
    CorruptChunk {
        layer: String,
        file: String,
        file_offset: u64,
        reason: String,
    },
    #[error("another reader failed to fetch this chunk: {0}")]
    Shared(String),
    #[error("cache I/O at {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mounting at {mountpoint}: {source}")]
    Mount {
        mountpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("starting the fetch pool's threads: {0}")]
    Pool(#[source] io::Error),
    #[error("inode {0} is not a regular file of this layer")]
    NotAFile(u64),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A copy for each of several readers that hit the same failure; I/O sources keep
    /// their kind and message.
    pub(crate) fn duplicate(&self) -> Error {
        let io = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            Error::Fetch { what, source } => Error::Fetch {
                what: what.clone(),
                source: io(source),
            },
            Error::CorruptChunk {
                layer,
                file,
                file_offset,
                reason,
            } => Error::CorruptChunk {
                layer: layer.clone(),
                file: file.clone(),
                file_offset: *file_offset,
                reason: reason.clone(),
            },
            other => Error::Shared(other.to_string()),
        }
    }
}
