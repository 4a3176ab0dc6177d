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
pub use footer::{Compression, Footer, EXTERNAL_TOC_FOOTER_SIZE, MAX_FOOTER_SIZE};
pub use names::clean_name;
pub use reader::{
    decode_chunk, max_compressed_len, read_toc, BlobSource, Chunk, ExternalTocFn, FileBlob, Index,
    Node, NodeId, NodeKind, OpenOptions, RawToc, Reader, DEFAULT_MAX_INDEX_BYTES,
    DEFAULT_MAX_TOC_ENTRIES, MAX_CHUNK_SIZE, MAX_INNER_OFFSET,
};
pub use toc::{EntryType, Toc, TocEntry, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK};
pub use verify::{verify_blob, verify_blob_with, VerifyReport};

/// A ustar header for a regular file, for tests that hand-craft hostile blobs.
#[doc(hidden)]
pub use tarfmt::synthetic_file_header;

// The layer annotations this format writes; their names are defined once, in
// `remote-layer`, with the labels that carry them to the snapshotter.
/// Where the prioritized files end in the blob (not a reference annotation).
pub use remote_layer::annotation::PREFETCH_END as PREFETCH_END_ANNOTATION;
/// Layer annotation holding the TOC digest.
pub use remote_layer::annotation::TOC_DIGEST as TOC_DIGEST_ANNOTATION;
/// Bytes at the end of the blob holding TOC and footer (not a reference annotation).
pub use remote_layer::annotation::TOC_TAIL as TOC_TAIL_ANNOTATION;
/// Layer annotation holding the size of the decompressed layer.
pub use remote_layer::annotation::UNCOMPRESSED_SIZE as UNCOMPRESSED_SIZE_ANNOTATION;
/// zstd:chunked: sha256 of the compressed TOC.
pub use remote_layer::annotation::ZSTD_CHUNKED_MANIFEST_CHECKSUM as MANIFEST_CHECKSUM_ANNOTATION;
/// zstd:chunked: `offset:compressed size:size:1` of the TOC.
pub use remote_layer::annotation::ZSTD_CHUNKED_MANIFEST_POSITION as MANIFEST_POSITION_ANNOTATION;
