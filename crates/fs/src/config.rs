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
/// Default bound of the head fetched alongside a layer's TOC: the whole prioritized
/// region of most layers, so that it comes as one flow started with the TOC's instead of
/// a head and a remainder asked for once the layer is open (measured against 1 MiB in
/// docs/benchmarks/hellobench.md: equal bytes, start-up 2–10 % shorter).
pub const DEFAULT_SPECULATIVE_HEAD_KIB: u64 = 4096;
/// Default bound of the start-up files fetched for an image without prioritized files.
pub const DEFAULT_ZERO_CONFIG_PREFETCH_MAX_MIB: u64 = 64;
/// Default number of background fetches in flight in a process.
pub const DEFAULT_MAX_CONCURRENCY: usize = 2;
/// Most background windows in flight in a process, whatever `max_concurrency` says.
pub const MAX_BACKGROUND_LIMIT: usize = 64;
/// Default lifetime of a layer opened ahead of its mount, as in the reference.
pub const DEFAULT_RESOLVE_RESULT_ENTRY_TTL_SEC: u64 = 120;

/// Where decompressed chunks are kept. As in the reference, `memory` means memory and
/// any other value (`directory`, `""`, anything) means the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", from = "String")]
pub enum CacheType {
    /// On disk under the cache directory, with a memory LRU in front.
    #[default]
    Directory,
    /// Only in the memory LRU.
    Memory,
}

impl From<String> for CacheType {
    fn from(s: String) -> CacheType {
        if s == "memory" {
            CacheType::Memory
        } else {
            CacheType::Directory
        }
    }
}

/// `[directory_cache]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DirectoryCacheConfig {
    /// Kept for compatibility (the memory LRU is bounded by `max_memory_bytes`).
    pub max_lru_cache_entry: i64,
    /// Kept for compatibility; files are opened per access.
    pub max_cache_fds: i64,
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
    /// Seconds the kernel may cache attributes; 0 = the default (a day), negative = no
    /// caching (see [`FuseConfig::attr_ttl`]).
    pub attr_timeout: i64,
    /// Seconds the kernel may cache name lookups, found and missing; as `attr_timeout`.
    pub entry_timeout: i64,
    /// Open fully cached files with FUSE passthrough when the kernel supports it.
    pub passthrough: bool,
}

impl FuseConfig {
    /// `attr_timeout` as the reference reads it: 0 means the default (a day here).
    pub fn attr_ttl(&self) -> std::time::Duration {
        secs_or_default(self.attr_timeout, DEFAULT_FUSE_TIMEOUT_SEC)
    }

    /// `entry_timeout` as the reference reads it: 0 means the default (a day here).
    pub fn entry_ttl(&self) -> std::time::Duration {
        secs_or_default(self.entry_timeout, DEFAULT_FUSE_TIMEOUT_SEC)
    }
}

/// Seconds from a config value where 0 means `default` and a negative value none,
/// as the reference turns its integer durations into time.
fn secs_or_default(v: i64, default: u64) -> std::time::Duration {
    std::time::Duration::from_secs(match v {
        0 => default,
        n if n < 0 => 0,
        n => n.unsigned_abs(),
    })
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            attr_timeout: DEFAULT_FUSE_TIMEOUT_SEC as i64,
            entry_timeout: DEFAULT_FUSE_TIMEOUT_SEC as i64,
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
    /// Longest wait for prefetch at mount; 0 = 10 s, as the reference.
    pub prefetch_timeout_sec: i64,
    /// Bytes from the start of a layer to prefetch when it has no prefetch landmark
    /// (the `containerd.io/snapshot/remote/stargz.prefetch` label wins); 0 = none.
    pub prefetch_size: i64,
    /// A prefetch larger than this many bytes no longer holds up the mount (it goes
    /// on in the background); 0 = always wait (up to `prefetch_timeout_sec`).
    pub prefetch_async_size: i64,
    /// Seconds a layer opened ahead of its mount (with its manifest lookup) is kept
    /// for that mount; 0 = 120, as in the reference.
    pub resolve_result_entry_ttl_sec: i64,
    pub noprefetch: bool,
    pub no_background_fetch: bool,
    pub allow_no_verification: bool,
    pub disable_verification: bool,
    /// Background fetches in flight at once, over every layer of the process (the
    /// reference's meaning); each layer runs up to this many workers.
    pub max_concurrency: i64,
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
    /// Not a reference key: for an image none of whose layers records prioritized files,
    /// the daemon works out the files its container opens at start (entrypoint, its
    /// interpreter and libraries, runtime files) and fetches them before the container
    /// runs. Off with `noprefetch` too.
    pub zero_config_prefetch: bool,
    /// Not a reference key: the most MiB of compressed blob data that prefetch fetches
    /// per image.
    pub zero_config_prefetch_max_mib: u64,
    pub directory_cache: DirectoryCacheConfig,
    pub fuse: FuseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_cache_type: CacheType::Directory,
            filesystem_cache_type: CacheType::Directory,
            prefetch_timeout_sec: DEFAULT_PREFETCH_TIMEOUT_SEC as i64,
            prefetch_size: 0,
            // Ours: no prefetch holds up a mount (its chunks are claimed at once, so the
            // container's reads wait for its bytes rather than fetch them again).
            prefetch_async_size: 1,
            resolve_result_entry_ttl_sec: 0,
            noprefetch: false,
            no_background_fetch: false,
            allow_no_verification: false,
            disable_verification: false,
            max_concurrency: DEFAULT_MAX_CONCURRENCY as i64,
            background_fetch_quiet_msec: crate::priority::DEFAULT_QUIET.as_millis() as u64,
            sequential_readahead_kib: crate::readahead::DEFAULT_MAX_WINDOW >> 10,
            speculative_head_kib: DEFAULT_SPECULATIVE_HEAD_KIB,
            zero_config_prefetch: true,
            zero_config_prefetch_max_mib: DEFAULT_ZERO_CONFIG_PREFETCH_MAX_MIB,
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
        self.background_limit().clamp(1, 8)
    }

    /// `max_concurrency` as the reference reads it (0 or less: the default, 2), at
    /// most [`MAX_BACKGROUND_LIMIT`].
    pub fn background_limit(&self) -> usize {
        match usize::try_from(self.max_concurrency) {
            Ok(0) | Err(_) => DEFAULT_MAX_CONCURRENCY,
            Ok(n) => n.min(MAX_BACKGROUND_LIMIT),
        }
    }

    /// `prefetch_timeout_sec` as the reference reads it: 0 means the default (10 s).
    pub fn prefetch_timeout(&self) -> std::time::Duration {
        secs_or_default(self.prefetch_timeout_sec, DEFAULT_PREFETCH_TIMEOUT_SEC)
    }

    /// How long a layer opened ahead waits for its mount.
    pub fn resolve_result_ttl(&self) -> std::time::Duration {
        let secs = match self.resolve_result_entry_ttl_sec {
            n if n > 0 => n.unsigned_abs(),
            _ => DEFAULT_RESOLVE_RESULT_ENTRY_TTL_SEC,
        };
        std::time::Duration::from_secs(secs)
    }

    /// The prefetch size to use without a prefetch landmark: `label` (the snapshot's
    /// prefetch label) if given, else `prefetch_size`; `None` when that is not positive.
    pub fn prefetch_bytes(&self, label: Option<u64>) -> Option<u64> {
        let n = label.unwrap_or_else(|| self.prefetch_size.max(0).unsigned_abs());
        (n > 0).then_some(n)
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
    fn cache_types_as_the_reference() {
        for (v, want) in [
            ("memory", CacheType::Memory),
            ("directory", CacheType::Directory),
            ("", CacheType::Directory),
            ("disk", CacheType::Directory),
            ("Memory", CacheType::Directory),
        ] {
            let cfg = Config::from_toml(&format!(
                "http_cache_type = {v:?}\nfilesystem_cache_type = {v:?}\n"
            ))
            .expect("any string is accepted");
            assert_eq!(cfg.http_cache_type, want, "{v:?}");
            assert_eq!(
                cfg.uses_directory_cache(),
                want == CacheType::Directory,
                "{v:?}"
            );
        }
        assert!(Config::from_toml("http_cache_type = 1\n").is_err());
    }

    #[test]
    fn prefetch_sizes_and_ttl() {
        let cfg = Config::from_toml("prefetch_size = 4096\nresolve_result_entry_ttl_sec = 7\n")
            .expect("valid");
        assert_eq!(cfg.prefetch_bytes(None), Some(4096));
        assert_eq!(cfg.prefetch_bytes(Some(10)), Some(10));
        assert_eq!(cfg.prefetch_bytes(Some(0)), None);
        assert_eq!(cfg.resolve_result_ttl(), std::time::Duration::from_secs(7));
        let d = Config::default();
        assert_eq!(d.prefetch_bytes(None), None);
        assert_eq!(d.resolve_result_ttl(), std::time::Duration::from_secs(120));
        let neg = Config::from_toml("prefetch_size = -1\n").expect("valid");
        assert_eq!(neg.prefetch_bytes(None), None);
    }

    #[test]
    fn zero_means_default_as_in_the_reference() {
        use std::time::Duration;
        let cfg = Config::from_toml(
            "prefetch_timeout_sec = 0\nmax_concurrency = 0\n[fuse]\nattr_timeout = 0\nentry_timeout = -1\n\
             [directory_cache]\nmax_lru_cache_entry = -1\n",
        )
        .expect("the reference accepts these");
        assert_eq!(cfg.prefetch_timeout(), Duration::from_secs(10));
        assert_eq!(cfg.background_limit(), 2);
        assert_eq!(
            cfg.fuse.attr_ttl(),
            Duration::from_secs(DEFAULT_FUSE_TIMEOUT_SEC)
        );
        assert_eq!(cfg.fuse.entry_ttl(), Duration::ZERO);
        let cfg = Config::from_toml("prefetch_timeout_sec = 3\nmax_concurrency = 100000\n")
            .expect("valid");
        assert_eq!(cfg.prefetch_timeout(), Duration::from_secs(3));
        assert_eq!(cfg.background_limit(), MAX_BACKGROUND_LIMIT);
        assert_eq!(cfg.background_workers(), 8);
        assert_eq!(
            Config::from_toml("max_concurrency = -3\n")
                .expect("valid")
                .background_limit(),
            2
        );
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
