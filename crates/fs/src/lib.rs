//! A lazily fetched eStargz layer served read-only through FUSE.
//!
//! [`mount`] opens a layer through a [`Fetcher`] (a local file, or a registry blob via
//! [`RegistryFetcher`]), verifies its TOC against the descriptor's TOC digest, and serves
//! it at a mount point. File data is fetched chunk by chunk on first read, verified
//! against the TOC's chunk digests, and kept in a [`ChunkCache`]. Prioritized files are
//! prefetched before the mount is reported ready, and the rest of the layer is fetched in
//! the background until the layer is fully local.
//!
//! The mount looks like an unpacked layer to overlayfs: `.wh.NAME` files appear as 0/0
//! character devices named `NAME`, and `.wh..wh..opq` becomes the
//! `trusted.overlay.opaque=y` xattr of its directory. The hidden directory
//! `/.stargz-snapshotter` holds `<layer digest>.json` with the fetch progress.
//!
//! [`FsMetrics`] collects Prometheus metrics of the mounts made with [`mount_observed`].
//!
//! Built on `fuser` (FUSE protocol, multi-threaded sessions, passthrough), `tokio`
//! (worker threads for reads that must fetch), the workspace's `estargz` (TOC, index,
//! chunk decoding) and `registry` crates, `prometheus-client`, `sha2`, `serde`/`toml`, `tempfile`,
//! `thiserror` and `tracing`.

pub mod cache;
pub mod config;
pub mod error;
pub mod fetcher;
mod fusefs;
pub mod layer;
pub mod metrics;
mod mount;
pub mod priority;
mod readahead;

pub use cache::ChunkCache;
pub use config::{CacheType, Config, DirectoryCacheConfig, FuseConfig};
pub use error::{Error, Result};
pub use fetcher::{Fetcher, FileFetcher, RegistryFetcher};
pub use fusefs::STATE_DIR;
pub use layer::{Layer, LayerDesc};
pub use metrics::FsMetrics;
pub use mount::{
    cache_from_config, mount, mount_layer, mount_layer_observed, mount_observed,
    observed_cache_from_config, MountHandle,
};
