//! The eStargz and zstd:chunked layer formats.
//!
//! An eStargz blob is a valid tar.gz in which every file (and every chunk of a large
//! file) is its own gzip member, followed by a table of contents (TOC) and a footer
//! that points at it, so any file can be fetched alone with a ranged read and checked
//! against the digests the TOC records. zstd:chunked is the same idea with zstd frames.
//!
//! - [`build()`] turns a tar into a blob, compressing on every core.
//! - [`Reader`] opens a blob through any [`BlobSource`] (a file, a buffer, a registry)
//!   with one or two positioned reads and indexes its files.
//! - [`verify_blob`] checks everything, optionally against the original tar.
//!
//! The crate is synchronous and knows nothing of networks or FUSE.

mod build;
mod compress;
mod digest;
mod error;
mod extract;
mod footer;
mod names;
mod reader;
mod tarfmt;
mod toc;
mod verify;

pub use build::{build, build_from_file, BuildOptions, BuildOutput, DEFAULT_CHUNK_SIZE};
pub use compress::{compress_member, Codec};
pub use error::{Error, Result};
pub use extract::{extract, ExtractOptions};
pub use footer::{Compression, Footer};
pub use names::clean_name;
pub use reader::{
    decode_chunk, read_toc, BlobSource, Chunk, FileBlob, Index, Node, NodeId, NodeKind,
    OpenOptions, RawToc, Reader, MAX_CHUNK_SIZE,
};
pub use toc::{EntryType, Toc, TocEntry, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
pub use verify::{verify_blob, VerifyReport};

/// A ustar header for a regular file, for tests that hand-craft hostile blobs.
#[doc(hidden)]
pub use tarfmt::synthetic_file_header;

/// Layer annotation holding the TOC digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Layer annotation holding the size of the decompressed layer.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked: sha256 of the compressed TOC.
pub const MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked: `offset:compressed size:size:1` of the TOC.
pub const MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";
