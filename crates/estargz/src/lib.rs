//! The eStargz and zstd:chunked layer formats.
//!
//! An eStargz blob is a valid tar.gz in which every file (and every chunk of a large
//! file) is its own gzip member, followed by a table of contents (TOC) and a footer
//! that points at it, so any file can be fetched alone with a ranged read and checked
//! against the digests the TOC records. zstd:chunked is the same idea with zstd frames.
//!
//! - [`build`](build::build) turns a tar into a blob, compressing on every core.
//! - [`Reader`] opens a blob through any [`BlobSource`] (a file, a buffer, a registry)
//!   with one or two positioned reads and indexes its files.
//! - [`verify_blob`] checks everything, optionally against the original tar.
//!
//! The crate is synchronous and knows nothing of networks or FUSE.

pub mod build;
pub mod compress;
pub mod digest;
pub mod error;
pub mod extract;
pub mod footer;
pub mod names;
pub mod reader;
pub mod tarfmt;
pub mod toc;
pub mod verify;

pub use build::{build, build_from_file, BuildOptions, BuildOutput, DEFAULT_CHUNK_SIZE};
pub use compress::Codec;
pub use error::{Error, Result};
pub use footer::{Compression, Footer};
pub use reader::{
    decode_chunk, BlobSource, Chunk, FileBlob, Index, Node, NodeId, NodeKind, OpenOptions, Reader,
};
pub use toc::{EntryType, Toc, TocEntry};
pub use verify::{verify_blob, VerifyReport};

/// Layer annotation holding the TOC digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation holding the size of the decompressed layer.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked: sha256 of the compressed TOC.
pub const MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked: `offset:compressed size:size:1` of the TOC.
pub const MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";
