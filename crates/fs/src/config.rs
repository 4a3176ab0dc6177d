//! Filesystem configuration, read from the `[fs]`-level keys of the daemon's TOML file.
//!
//! Key names and defaults follow the reference snapshotter's configuration so existing
//! files keep working.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default wait for prefetch before a mount is reported ready.
pub const DEFAULT_PREFETCH_TIMEOUT_SEC: u64 = 10;
/// Default FUSE attribute/entry cache lifetime: a day. A layer never changes, so the
/// kernel may keep its names, attributes and missing names for as long as it likes; the
/// reference's default is 1 s, which sends every walk of a tree back to user space.
pub const DEFAULT_FUSE_TIMEOUT_SEC: u64 = 24 * 60 * 60;
/// Default bound of the head fetched alongside a layer's TOC: what a second connection
/// carries while the tail arrives without holding the tail (and so the TOC) up much.
pub const DEFAULT_SPECULATIVE_HEAD_KIB: u64 = 1024;
/// Default number of concurrent background fetches per layer.
pub const DEFAULT_MAX_CONCURRENCY: usize = 2;

/// Where decompressed chunks are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheType {
    /// On disk under the cache directory, with a memory LRU in front.
    #[default]
    Directory,
    /// Only in the memory LRU.
    Memory,
}

/// `[directory_cache]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DirectoryCacheConfig {
    /// Entries kept in the memory LRU in front of the directory.
    pub max_lru_cache_entry: usize,
    /// Kept for compatibility; files are opened per access.
    pub max_cache_fds: usize,
    /// Write cache files before replying to the read that fetched them.
    pub sync_add: bool,
    /// Kept for compatibility.
    pub direct: bool,
    /// Bytes the memory LRU may hold (not in the reference; bounds memory by size).
    pub max_memory_bytes: u64,
    /// Not a reference key: MiB the cache directory may hold before least recently used
    /// files are removed; 0 = unbounded; unset = 10% of the cache filesystem, at most
    /// 20 GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size_mib: Option<u64>,
    /// Not a reference key: cache files unused for this many seconds are removed;
    /// 0 = no age bound.
    pub max_age_sec: u64,
}

impl Default for DirectoryCacheConfig {
    fn default() -> Self {
        DirectoryCacheConfig {
            max_lru_cache_entry: 10,
            max_cache_fds: 10,
            sync_add: false,
            direct: true,
            max_memory_bytes: 64 << 20,
            max_size_mib: None,
            max_age_sec: 0,
        }
    }
}

/// `[fuse]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FuseConfig {
    /// Seconds the kernel may cache attributes.
    pub attr_timeout: u64,
    /// Seconds the kernel may cache name lookups, found and missing; 0 caches nothing.
    pub entry_timeout: u64,
    /// Open fully cached files with FUSE passthrough when the kernel supports it.
    pub passthrough: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            attr_timeout: DEFAULT_FUSE_TIMEOUT_SEC,
            entry_timeout: DEFAULT_FUSE_TIMEOUT_SEC,
            passthrough: true,
        }
    }
}

/// Filesystem settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Cache of fetched blob data; `directory` or `memory`.
    pub http_cache_type: CacheType,
    /// Cache of decompressed file data; `directory` or `memory`.
    pub filesystem_cache_type: CacheType,
    pub prefetch_timeout_sec: u64,
    pub noprefetch: bool,
    pub no_background_fetch: bool,
    pub allow_no_verification: bool,
    pub disable_verification: bool,
    /// Concurrent background fetches per layer.
    pub max_concurrency: usize,
    /// Not a reference key: milliseconds without prioritized work (mounts, prefetch,
    /// reads) in any layer before background fetch runs.
    pub background_fetch_quiet_msec: u64,
    /// Not a reference key: the largest read-ahead (KiB of blob) for a reader walking a
    /// layer in the order its files are stored; 0 turns sequential read-ahead off.
    pub sequential_readahead_kib: u64,
    /// Not a reference key: the most KiB at the start of a layer (its prioritized files,
    /// as the descriptor's `prefetch-end` annotation says) fetched in parallel with its
    /// TOC rather than after it; 0 turns this off.
    pub speculative_head_kib: u64,
    pub directory_cache: DirectoryCacheConfig,
    pub fuse: FuseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_cache_type: CacheType::Directory,
            filesystem_cache_type: CacheType::Directory,
            prefetch_timeout_sec: DEFAULT_PREFETCH_TIMEOUT_SEC,
            noprefetch: false,
            no_background_fetch: false,
            allow_no_verification: false,
            disable_verification: false,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            background_fetch_quiet_msec: crate::priority::DEFAULT_QUIET.as_millis() as u64,
            sequential_readahead_kib: crate::readahead::DEFAULT_MAX_WINDOW >> 10,
            speculative_head_kib: DEFAULT_SPECULATIVE_HEAD_KIB,
            directory_cache: DirectoryCacheConfig::default(),
            fuse: FuseConfig::default(),
        }
    }
}

impl Config {
    /// Parses the TOML form; unknown keys are ignored so a whole daemon file can be given.
    pub fn from_toml(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        Ok(cfg)
    }

    /// Chunks go to disk when either cache type asks for a directory.
    pub fn uses_directory_cache(&self) -> bool {
        self.filesystem_cache_type == CacheType::Directory
            || self.http_cache_type == CacheType::Directory
    }

    pub(crate) fn background_workers(&self) -> usize {
        self.max_concurrency.clamp(1, 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_keys() {
        let cfg = Config::from_toml(
            r#"
            noprefetch = true
            no_background_fetch = true
            prefetch_timeout_sec = 3
            filesystem_cache_type = "memory"
            max_concurrency = 4
            some_unknown_key = 1
            [directory_cache]
            max_lru_cache_entry = 100
            max_size_mib = 512
            max_age_sec = 86400
            [fuse]
            attr_timeout = 5
            entry_timeout = 6
            passthrough = false
            "#,
        )
        .expect("valid config");
        assert!(cfg.noprefetch && cfg.no_background_fetch);
        assert_eq!(cfg.prefetch_timeout_sec, 3);
        assert_eq!(cfg.filesystem_cache_type, CacheType::Memory);
        assert_eq!(cfg.http_cache_type, CacheType::Directory);
        assert_eq!(cfg.directory_cache.max_lru_cache_entry, 100);
        assert_eq!(cfg.directory_cache.max_size_mib, Some(512));
        assert_eq!(cfg.directory_cache.max_age_sec, 86400);
        assert_eq!(cfg.fuse.attr_timeout, 5);
        assert_eq!(cfg.fuse.entry_timeout, 6);
        assert!(!cfg.fuse.passthrough);
        assert_eq!(cfg.max_concurrency, 4);
    }

    #[test]
    fn defaults_match_reference() {
        let cfg = Config::from_toml("").expect("empty config");
        assert_eq!(cfg.prefetch_timeout_sec, 10);
        // Unlike the reference's 1 s: layers are immutable, so the kernel keeps metadata.
        assert_eq!(cfg.fuse.attr_timeout, 86_400);
        assert_eq!(cfg.fuse.entry_timeout, 86_400);
        assert_eq!(cfg.max_concurrency, 2);
        assert!(!cfg.allow_no_verification);
        assert_eq!(
            cfg.directory_cache.max_size_mib, None,
            "sized from the filesystem"
        );
        assert_eq!(cfg.directory_cache.max_age_sec, 0);
        // Off in the reference; on here, and each mount falls back by itself when the
        // kernel lacks FUSE passthrough.
        assert!(cfg.fuse.passthrough);
    }
}
