//! A lazily fetched eStargz layer served read-only through FUSE.
//!
//! [`Layer::open`] opens a layer through a [`Fetcher`] (a local file, or a registry blob
//! via [`RegistryFetcher`]) and verifies its TOC against the descriptor's TOC digest;
//! [`mount`] serves it at a mount point. File data is fetched chunk by chunk on first read, verified
//! against the TOC's chunk digests, and kept in a [`ChunkCache`]. Prioritized files are
//! prefetched before the mount is reported ready, and the rest of the layer is fetched in
//! the background until the layer is fully local.
//!
//! The mount looks like an unpacked layer to overlayfs: `.wh.NAME` files appear as 0/0
//! character devices named `NAME`, and `.wh..wh..opq` becomes the
//! `trusted.overlay.opaque=y` xattr of its directory. The hidden directory
//! `/.stargz-snapshotter` holds `<layer digest>.json` with the fetch progress.
//!
//! With [`mount_recording`], the regular files a workload opens during a window
//! after the mount's first access are noted in an [`AccessLog`] (learned prefetch).
//!
//! Everything that may wait on the network (reads that miss, read-ahead, prefetch,
//! background windows) runs on one [`FetchPool`] of plain threads per process, shared by
//! all mounts; fs creates no runtime. [`FsMetrics`] collects Prometheus metrics of the
//! mounts given it in their [`MountOptions`].
//!
//! Built on `fuser` (FUSE protocol, multi-threaded sessions, passthrough), `tokio` (only
//! to hand registry reads to the process's runtime), the workspace's `estargz` (TOC, index,
//! chunk decoding) and `registry` crates, `prometheus-client`, `sha2`, `serde`/`toml`, `tempfile`,
//! `thiserror` and `tracing`.

pub mod cache;
pub mod config;
pub mod error;
pub mod fetcher;
mod fusefs;
mod head;
pub mod layer;
pub mod learn;
pub mod metrics;
mod mount;
pub mod pool;
pub mod priority;
mod readahead;

pub use cache::ChunkCache;
pub use config::{CacheType, Config, DirectoryCacheConfig, FuseConfig};
pub use error::{Error, Result};
pub use fetcher::{Fetcher, FileFetcher, RegistryFetcher};
pub use fusefs::STATE_DIR;
pub use layer::{
    speculative_head, tail_read, FilesPrefetched, Layer, LayerDesc, PlannedFile, TailSizes,
    MAX_TAIL_READ, MIN_TAIL_READ, TAIL_READ,
};
pub use learn::AccessLog;
pub use metrics::FsMetrics;
pub use mount::{mount, mount_recording, MountHandle, MountOptions};
pub use pool::FetchPool;
