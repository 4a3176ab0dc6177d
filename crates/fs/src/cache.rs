//! The chunk cache: decompressed, verified chunks keyed by their sha256, in a
//! byte-bounded memory LRU in front of an optional content-addressed directory
//! (`<dir>/<2 hex>/<64 hex>`), plus whole files (`<dir>/files/<64 hex>`) for passthrough.
//! A whole-file copy replaces the chunk files of its file: their bytes are then read out
//! of the copy ([`InFile`]), so each byte is on disk once. The directory survives
//! restarts and may be shared by every layer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};
use tracing::warn;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::{CacheCounters, FsMetrics};
use crate::priority::{Priority, DEFAULT_QUIET};

/// Cache key: the chunk's sha256 (or a synthetic one for unverified chunks).
pub type Key = [u8; 32];

/// Where a chunk's bytes sit in the whole-file copy of the file it belongs to: that
/// file's sha256 and size, and the chunk's offset and length in it. Only the layer
/// knows this (the cache is keyed by content), so it passes it along with the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFile {
    pub file: [u8; 32],
    pub file_size: u64,
    pub offset: u64,
    pub len: u64,
}

struct Lru {
    max_bytes: u64,
    bytes: u64,
    tick: u64,
    entries: HashMap<Key, (Arc<Vec<u8>>, u64)>,
    order: BTreeMap<u64, Key>,
}

impl Lru {
    fn get(&mut self, key: &Key) -> Option<Arc<Vec<u8>>> {
        let tick = self.tick + 1;
        let (data, t) = self.entries.get_mut(key)?;
        self.order.remove(t);
        *t = tick;
        self.tick = tick;
        self.order.insert(tick, *key);
        Some(data.clone())
    }

    fn put(&mut self, key: Key, data: Arc<Vec<u8>>) {
        let len = data.len() as u64;
        if len > self.max_bytes {
            return;
        }
        if let Some((old, t)) = self.entries.remove(&key) {
            self.order.remove(&t);
            self.bytes -= old.len() as u64;
        }
        while self.bytes + len > self.max_bytes {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&victim) {
                self.bytes -= old.len() as u64;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.entries.insert(key, (data, self.tick));
        self.bytes += len;
    }
}

/// A file of the cache directory as the size index names it. Chunks and whole-file
/// copies, nearly all of its files, go by their 32-byte digest rather than a path: a
/// large cache holds hundreds of thousands of files, and each name is kept twice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Name {
    Chunk(Key),
    File([u8; 32]),
    Other(Box<Path>),
}

impl Name {
    /// The name of `path`, a file of the cache directory `dir`.
    fn of(dir: &Path, path: &Path) -> Name {
        let parsed = || {
            let key = parse_key(path.file_name()?.to_str()?)?;
            let parent = path.parent()?;
            if parent.parent()? != dir {
                return None;
            }
            match parent.file_name()?.to_str()? {
                "files" => Some(Name::File(key)),
                shard if shard == hex::encode(&key[..1]) => Some(Name::Chunk(key)),
                _ => None,
            }
        };
        parsed().unwrap_or_else(|| Name::Other(path.into()))
    }

    fn path(&self, dir: &Path) -> PathBuf {
        match self {
            Name::Chunk(k) => {
                let hex = hex::encode(k);
                dir.join(&hex[..2]).join(hex)
            }
            Name::File(k) => dir.join("files").join(hex::encode(k)),
            Name::Other(p) => p.to_path_buf(),
        }
    }
}

/// What the cache directory holds on disk, for the size bound: each file's length and
/// when it was last used, in memory only (seeded from the files' mtimes at open).
struct DiskIndex {
    /// Bytes the directory may hold; 0 = unbounded.
    limit: u64,
    /// Files unused for this long are removed; `None` = no age bound.
    max_age: Option<Duration>,
    bytes: u64,
    tick: u64,
    entries: HashMap<Name, DiskEntry>,
    order: BTreeMap<u64, Name>,
}

struct DiskEntry {
    len: u64,
    tick: u64,
    used: SystemTime,
}

impl DiskIndex {
    fn touch(&mut self, name: &Name) {
        let tick = self.tick + 1;
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        if let Some(p) = self.order.remove(&e.tick) {
            self.order.insert(tick, p);
        }
        e.tick = tick;
        e.used = SystemTime::now();
        self.tick = tick;
    }

    fn insert(&mut self, name: Name, len: u64, used: SystemTime) {
        self.remove(&name);
        self.tick += 1;
        self.order.insert(self.tick, name.clone());
        self.entries.insert(
            name,
            DiskEntry {
                len,
                tick: self.tick,
                used,
            },
        );
        self.bytes += len;
    }

    fn remove(&mut self, name: &Name) {
        if let Some(old) = self.entries.remove(name) {
            self.order.remove(&old.tick);
            self.bytes -= old.len;
        }
    }

    /// Takes out of the index, least recently used first, the files that must go to
    /// bring it under its bounds, sparing `keep` (the file just written).
    fn victims(&mut self, keep: Option<&Name>) -> Vec<Name> {
        let mut out = Vec::new();
        let too_old = self
            .max_age
            .and_then(|age| SystemTime::now().checked_sub(age));
        let mut spared = Vec::new();
        while let Some((&tick, path)) = self.order.first_key_value() {
            let over = self.limit > 0 && self.bytes > self.limit;
            let old = too_old.is_some_and(|t| self.entries.get(path).is_some_and(|e| e.used < t));
            if !over && !old {
                break;
            }
            let Some(name) = self.order.remove(&tick) else {
                break;
            };
            if keep == Some(&name) {
                spared.push((tick, name));
                continue;
            }
            if let Some(e) = self.entries.remove(&name) {
                self.bytes -= e.len;
            }
            out.push(name);
        }
        for (tick, name) in spared {
            self.order.insert(tick, name);
        }
        out
    }
}

/// Default bound of the cache directory: a tenth of its filesystem, at most this.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 20 << 30;

/// Memory LRU plus optional directory. Cheap to share behind an `Arc`.
///
/// Every layer of a process shares its cache, so the cache also carries the
/// [`Priority`] gate between their prioritized and background fetches.
pub struct ChunkCache {
    mem: Mutex<Lru>,
    dir: Option<PathBuf>,
    /// Chunks whose disk copy this process wrote or hashed: parts of them may be read
    /// straight from the file without hashing the whole chunk again.
    verified: Mutex<HashSet<Key>>,
    /// Whole-file copies (by file digest) this process wrote or hashed: only these are
    /// handed to the kernel for passthrough, which serves them without any check.
    verified_files: Mutex<HashSet<[u8; 32]>>,
    /// Chunks inside whole-file copies an earlier process left (file digest, offsets of
    /// the chunks) whose bytes this process hashed: read again without hashing.
    verified_slices: Mutex<HashMap<[u8; 32], HashSet<u64>>>,
    /// Sizes and last uses of the directory's files, for its size and age bounds.
    disk: Mutex<DiskIndex>,
    priority: Arc<Priority>,
    counters: CacheCounters,
}

impl ChunkCache {
    /// A cache that only lives in memory, bounded to `max_bytes`.
    pub fn memory(max_bytes: u64) -> ChunkCache {
        ChunkCache {
            mem: Mutex::new(Lru {
                max_bytes,
                bytes: 0,
                tick: 0,
                entries: HashMap::new(),
                order: BTreeMap::new(),
            }),
            dir: None,
            verified: Mutex::new(HashSet::new()),
            verified_files: Mutex::new(HashSet::new()),
            verified_slices: Mutex::new(HashMap::new()),
            disk: Mutex::new(DiskIndex {
                limit: 0,
                max_age: None,
                bytes: 0,
                tick: 0,
                entries: HashMap::new(),
                order: BTreeMap::new(),
            }),
            priority: Priority::new(DEFAULT_QUIET),
            counters: CacheCounters::default(),
        }
    }

    /// The cache `cfg` asks for: on disk under `dir`, or memory only, with its
    /// background quiet period, counting hits and misses into `metrics` if given.
    pub fn from_config(
        cfg: &Config,
        dir: &Path,
        metrics: Option<&FsMetrics>,
    ) -> Result<Arc<ChunkCache>> {
        let mem = cfg.directory_cache.max_memory_bytes;
        let mut cache = if cfg.uses_directory_cache() {
            ChunkCache::directory(dir, mem)?
        } else {
            ChunkCache::memory(mem)
        };
        if let Some(m) = metrics {
            cache = cache.with_metrics(m);
        }
        if cfg.uses_directory_cache() {
            let dc = &cfg.directory_cache;
            let limit = match dc.max_size_mib {
                Some(mib) => mib.saturating_mul(1 << 20),
                None => default_disk_limit(dir),
            };
            let age = (dc.max_age_sec > 0).then(|| Duration::from_secs(dc.max_age_sec));
            cache = cache.with_disk_bounds(limit, age);
        }
        let quiet = Duration::from_millis(cfg.background_fetch_quiet_msec);
        let cache = cache.with_background_quiet(quiet);
        // `max_concurrency` bounds background windows over every layer sharing this
        // cache, as the reference's background task manager does.
        cache.priority.set_background_limit(cfg.background_limit());
        Ok(Arc::new(cache))
    }

    /// Sets how long background fetch waits after the last prioritized work.
    pub fn with_background_quiet(mut self, quiet: Duration) -> ChunkCache {
        self.priority = Priority::new(quiet);
        self
    }

    /// The gate every layer using this cache fetches through.
    pub fn priority(&self) -> &Arc<Priority> {
        &self.priority
    }

    /// Counts hits and misses into `metrics` from now on.
    pub fn with_metrics(mut self, metrics: &FsMetrics) -> ChunkCache {
        self.counters = metrics.cache_counters();
        self.update_gauges();
        self
    }

    /// Bounds the directory to `limit` bytes (0 = unbounded) and, if given, removes
    /// files unused for `max_age`; least recently used files go first. Applies at once
    /// to what an earlier process left.
    pub fn with_disk_bounds(self, limit: u64, max_age: Option<Duration>) -> ChunkCache {
        if let Ok(mut d) = self.disk.lock() {
            d.limit = limit;
            d.max_age = max_age;
        }
        self.evict(None);
        self
    }

    /// Bytes of files in the cache directory, its bound (0 = none) and how many files
    /// were removed to keep to it.
    pub fn disk_usage(&self) -> (u64, u64, u64) {
        let (bytes, limit) = self.disk.lock().map_or((0, 0), |d| (d.bytes, d.limit));
        (bytes, limit, self.counters.evictions.get())
    }

    fn update_gauges(&self) {
        let (bytes, limit, _) = self.disk_usage();
        self.counters
            .disk_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.counters
            .disk_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Notes a file just written into the directory and removes what its bounds no
    /// longer allow.
    fn record(&self, path: &Path, len: u64) {
        let name = self.name(path);
        if let Ok(mut d) = self.disk.lock() {
            d.insert(name.clone(), len, SystemTime::now());
        }
        self.evict(Some(&name));
    }

    fn name(&self, path: &Path) -> Name {
        Name::of(self.dir.as_deref().unwrap_or(Path::new("")), path)
    }

    /// Marks a file as just used.
    fn touch(&self, name: &Name) {
        if let Ok(mut d) = self.disk.lock() {
            d.touch(name);
        }
    }

    /// Removes a cache file and forgets it.
    fn remove(&self, path: &Path) {
        let _ = fs::remove_file(path);
        let name = self.name(path);
        if let Ok(mut d) = self.disk.lock() {
            d.remove(&name);
        }
        self.forget(&name);
        self.update_gauges();
    }

    /// Drops what this process remembers as verified about a file that is gone, so
    /// that memory follows the directory (a node may write millions of chunks over
    /// its life) and a later file under the same name is checked again.
    fn forget(&self, name: &Name) {
        match name {
            Name::Chunk(key) => {
                if let Ok(mut v) = self.verified.lock() {
                    v.remove(key);
                }
            }
            Name::File(digest) => {
                if let Ok(mut v) = self.verified_files.lock() {
                    v.remove(digest);
                }
                if let Ok(mut v) = self.verified_slices.lock() {
                    v.remove(digest);
                }
            }
            Name::Other(_) => {}
        }
    }

    fn evict(&self, keep: Option<&Name>) {
        let victims = self
            .disk
            .lock()
            .map(|mut d| d.victims(keep))
            .unwrap_or_default();
        // Unlinked outside the lock; a reader holding one open keeps its bytes, and
        // one opening it next finds it missing and fetches the chunk again.
        let dir = self.dir.as_deref().unwrap_or(Path::new(""));
        for v in &victims {
            let path = v.path(dir);
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.counters.evictions.inc();
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), error = %e, "cannot evict a cache file"),
            };
            self.forget(v);
        }
        self.update_gauges();
    }

    /// A cache in `dir` (created if missing) with a memory LRU of `max_mem_bytes`.
    pub fn directory(dir: impl Into<PathBuf>, max_mem_bytes: u64) -> Result<ChunkCache> {
        let dir = dir.into();
        fs::create_dir_all(dir.join("files")).map_err(|e| cache_err(&dir, e))?;
        let found = scan(&dir);
        // Cached bytes are served without a second hash (passthrough): only root may
        // touch them.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| cache_err(&dir, e))?;
        let mut c = ChunkCache::memory(max_mem_bytes);
        c.dir = Some(dir);
        if let Ok(mut d) = c.disk.lock() {
            for (name, len, mtime) in found {
                d.insert(name, len, mtime);
            }
        }
        Ok(c)
    }

    /// The cache directory, if this cache has one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn chunk_path(&self, key: &Key) -> Option<PathBuf> {
        let hex = hex::encode(key);
        Some(self.dir.as_ref()?.join(&hex[..2]).join(hex))
    }

    /// Path a whole file with sha256 `digest` is (or would be) stored at.
    pub fn file_path(&self, digest: &[u8; 32]) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join("files").join(hex::encode(digest)))
    }

    /// The on-disk copy of a chunk, if there is one. Its bytes were verified when it
    /// was stored.
    pub fn chunk_file(&self, key: &Key) -> Option<PathBuf> {
        self.chunk_path(key).filter(|p| p.exists())
    }

    /// The on-disk copy of a chunk if this process wrote it or checked its bytes: safe
    /// to hand to the kernel for passthrough.
    pub fn verified_chunk_file(&self, key: &Key) -> Option<PathBuf> {
        if !self.verified.lock().ok()?.contains(key) {
            return None;
        }
        let path = self.chunk_file(key)?;
        self.touch(&Name::Chunk(*key));
        Some(path)
    }

    /// Checks a chunk's disk copy against its key (when `check` is set; chunks without
    /// a digest are trusted as the read path trusts them) and remembers it as verified.
    /// A damaged copy is removed, so the chunk is fetched again. Whether the copy is
    /// now verified.
    pub fn verify_chunk_file(&self, key: &Key, check: bool) -> bool {
        if self.verified.lock().is_ok_and(|v| v.contains(key)) {
            return true;
        }
        let Some(path) = self.chunk_path(key) else {
            return false;
        };
        let Ok(data) = fs::read(&path) else {
            return false;
        };
        if check && <[u8; 32]>::from(Sha256::digest(&data)) != *key {
            warn!(path = %path.display(), "cached chunk is damaged; dropping it");
            self.remove(&path);
            return false;
        }
        self.mark_verified(*key);
        true
    }

    /// The whole-file copy with sha256 `digest` and length `size`, if this process
    /// wrote it or checked it ([`ChunkCache::verify_file`]): safe for passthrough.
    pub fn verified_file(&self, digest: &[u8; 32], size: u64) -> Option<PathBuf> {
        if !self.verified_files.lock().ok()?.contains(digest) {
            return None;
        }
        let path = self.file_path(digest)?;
        if !fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return None;
        }
        self.touch(&Name::File(*digest));
        Some(path)
    }

    /// Hashes a whole-file copy left by an earlier process. A copy that matches is
    /// remembered as verified and returned; a damaged or short one is removed.
    pub fn verify_file(&self, digest: &[u8; 32], size: u64) -> Option<PathBuf> {
        if let Some(p) = self.verified_file(digest, size) {
            return Some(p);
        }
        let path = self.file_path(digest)?;
        let mut f = fs::File::open(&path).ok()?;
        let mut hasher = Sha256::new();
        let good = io::copy(&mut f, &mut hasher)
            .is_ok_and(|n| n == size && <[u8; 32]>::from(hasher.finalize()) == *digest);
        if !good {
            warn!(path = %path.display(), "cached whole file is damaged; dropping it");
            self.remove(&path);
            return None;
        }
        if let Ok(mut v) = self.verified_files.lock() {
            v.insert(*digest);
        }
        if let Ok(mut v) = self.verified_slices.lock() {
            v.remove(digest);
        }
        Some(path)
    }

    /// The chunk from memory only: never touches the disk.
    pub fn get_mem(&self, key: &Key) -> Option<Arc<Vec<u8>>> {
        let found = self.mem.lock().ok()?.get(key);
        match found {
            Some(_) => self.counters.memory_hit.inc(),
            None => self.counters.memory_miss.inc(),
        };
        found
    }

    /// The chunk from memory or disk: its own file, else its slice of the whole-file
    /// copy `at` of the file it belongs to. Disk bytes not yet checked by this process
    /// are hashed when `verify` is set; a damaged file is removed and the chunk
    /// reported as missing.
    pub fn get(&self, key: &Key, verify: bool, at: Option<&InFile>) -> Option<Arc<Vec<u8>>> {
        if let Some(d) = self.get_mem(key) {
            return Some(d);
        }
        let found = self
            .read_chunk_file(key, verify)
            .or_else(|| at.and_then(|at| self.read_slice(key, at, verify)));
        let Some(data) = found else {
            self.counters.disk_miss.inc();
            return None;
        };
        self.counters.disk_hit.inc();
        let data = Arc::new(data);
        if let Ok(mut mem) = self.mem.lock() {
            mem.put(*key, data.clone());
        }
        Some(data)
    }

    fn read_chunk_file(&self, key: &Key, verify: bool) -> Option<Vec<u8>> {
        let path = self.chunk_path(key)?;
        let data = fs::read(&path).ok()?;
        if verify {
            let got: [u8; 32] = Sha256::digest(&data).into();
            if &got != key {
                warn!(path = %path.display(), "cached chunk is damaged; dropping it");
                self.remove(&path);
                return None;
            }
        }
        self.touch(&Name::Chunk(*key));
        self.mark_verified(*key);
        Some(data)
    }

    /// Whether this process wrote or hashed the bytes of slice `at`.
    fn slice_trusted(&self, at: &InFile) -> bool {
        self.verified_files
            .lock()
            .is_ok_and(|v| v.contains(&at.file))
            || self
                .verified_slices
                .lock()
                .is_ok_and(|v| v.get(&at.file).is_some_and(|s| s.contains(&at.offset)))
    }

    /// Chunk `key` read out of the whole-file copy `at` names. A copy of the wrong size,
    /// or whose slice does not hash to `key` (when `verify` asks and the copy is not
    /// known good), is damaged: it is removed, and its chunks are fetched again.
    fn read_slice(&self, key: &Key, at: &InFile, verify: bool) -> Option<Vec<u8>> {
        let path = self.file_path(&at.file)?;
        let f = fs::File::open(&path).ok()?;
        let end = at.offset.checked_add(at.len)?;
        let size = f.metadata().ok()?.len();
        // Sizes come from the TOC: nothing is allocated before the copy on disk is
        // known to hold that many bytes.
        if size != at.file_size || end > size {
            warn!(path = %path.display(), size, expected = at.file_size,
                "cached whole file has the wrong size; dropping it");
            self.remove(&path);
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(at.len).ok()?];
        if let Err(e) = f.read_exact_at(&mut buf, at.offset) {
            warn!(path = %path.display(), error = %e, "cannot read a cached whole file; dropping it");
            self.remove(&path);
            return None;
        }
        if verify && !self.slice_trusted(at) {
            if <[u8; 32]>::from(Sha256::digest(&buf)) != *key {
                warn!(path = %path.display(), offset = at.offset,
                    "cached whole file is damaged; dropping it");
                self.remove(&path);
                return None;
            }
            if let Ok(mut v) = self.verified_slices.lock() {
                v.entry(at.file).or_default().insert(at.offset);
            }
        }
        self.touch(&Name::File(at.file));
        Some(buf)
    }

    fn mark_verified(&self, key: Key) {
        if self.dir.is_some() {
            if let Ok(mut v) = self.verified.lock() {
                v.insert(key);
            }
        }
    }

    /// `len` bytes at `offset` of a chunk's disk copy (its own file, else its slice `at`
    /// of a whole-file copy), read without loading or hashing the whole chunk, if this
    /// process already wrote or verified that copy (the directory is root-only, as for
    /// passthrough). `None` otherwise, or when the file no longer holds those bytes.
    pub fn read_verified(
        &self,
        key: &Key,
        at: Option<&InFile>,
        offset: u64,
        len: usize,
    ) -> Option<Vec<u8>> {
        let end = offset.checked_add(len as u64)?;
        if self.verified.lock().ok()?.contains(key) {
            let path = self.chunk_path(key)?;
            let mut buf = vec![0u8; len];
            let read = fs::File::open(&path).and_then(|f| f.read_exact_at(&mut buf, offset));
            match read {
                Ok(()) => {
                    self.counters.disk_hit.inc();
                    self.touch(&Name::Chunk(*key));
                    return Some(buf);
                }
                Err(_) => {
                    if let Ok(mut v) = self.verified.lock() {
                        v.remove(key);
                    }
                }
            }
        }
        let at = at?;
        if end > at.len || !self.slice_trusted(at) {
            return None;
        }
        let path = self.file_path(&at.file)?;
        let mut buf = vec![0u8; len];
        let read =
            fs::File::open(&path).and_then(|f| f.read_exact_at(&mut buf, at.offset + offset));
        match read {
            Ok(()) => {
                self.counters.disk_hit.inc();
                self.touch(&Name::File(at.file));
                Some(buf)
            }
            Err(_) => {
                self.forget(&Name::File(at.file));
                None
            }
        }
    }

    /// Whether the chunk is in memory or on disk (its own file, or the whole-file copy
    /// `at`), without reading it.
    pub fn contains(&self, key: &Key, at: Option<&InFile>) -> bool {
        if self
            .mem
            .lock()
            .map(|m| m.entries.contains_key(key))
            .unwrap_or(false)
        {
            return true;
        }
        self.chunk_path(key).is_some_and(|p| p.exists())
            || at
                .and_then(|at| self.file_path(&at.file))
                .is_some_and(|p| p.exists())
    }

    /// Stores a chunk in memory and, with a directory, on disk (atomically and durably).
    pub fn put(&self, key: Key, data: Arc<Vec<u8>>) -> Result<()> {
        self.put_with(key, data, true)
    }

    /// [`ChunkCache::put`]; with `durable` false the file is renamed into place without
    /// fsync. Only for chunks whose later reads hash them against their digest: after a
    /// power cut such a file may be empty or damaged, fails that check and is fetched
    /// again. (An fsync per chunk costs milliseconds each on common disks: thousands of
    /// small files in one prefetch spent seconds in them.)
    pub fn put_with(&self, key: Key, data: Arc<Vec<u8>>, durable: bool) -> Result<()> {
        if let Ok(mut mem) = self.mem.lock() {
            mem.put(key, data.clone());
        }
        if let Some(path) = self.chunk_path(&key) {
            if !path.exists() {
                // Marked first: the file may be handed out as soon as it has its name.
                self.mark_verified(key);
                if durable {
                    write_atomic(&path, &data)?;
                } else {
                    write_atomic_unsynced(&path, &data)?;
                }
                self.record(&path, data.len() as u64);
            }
        }
        Ok(())
    }

    fn range_prefix(blob: &str) -> String {
        let safe: String = blob
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{safe}-")
    }

    fn range_path(&self, blob: &str, offset: u64, len: usize) -> Option<PathBuf> {
        let name = format!("{}{offset}-{len}", Self::range_prefix(blob));
        Some(self.dir.as_ref()?.join("ranges").join(name))
    }

    /// Raw blob bytes (footer and TOC) stored by [`ChunkCache::put_range`]. They are
    /// trusted only as far as the TOC digest check that follows them.
    ///
    /// Without a range stored for exactly these bytes, they are pieced together from
    /// the blob's other stored ranges: the first read at a blob's end is sized from
    /// hints that may differ from one open to the next (a 512 KiB read before, the
    /// annotated TOC size now), and a reopen must not go to the network for that.
    pub fn get_range(&self, blob: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        if let Ok(data) = fs::read(self.range_path(blob, offset, len)?) {
            if data.len() == len {
                return Some(data);
            }
        }
        self.pieced_range(blob, offset, len)
    }

    /// `offset..offset + len` of `blob` out of its stored ranges, if they cover it.
    fn pieced_range(&self, blob: &str, offset: u64, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len as u64)?;
        let dir = self.dir.as_ref()?.join("ranges");
        let prefix = Self::range_prefix(blob);
        // (start, end, file) of every stored range of the blob that touches the request.
        let mut stored: Vec<(u64, u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(&dir).ok()?.flatten() {
            let name = e.file_name();
            let Some((o, l)) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|r| r.split_once('-'))
            else {
                continue;
            };
            let (Ok(o), Ok(l)) = (o.parse::<u64>(), l.parse::<u64>()) else {
                continue;
            };
            let Some(e_end) = o.checked_add(l) else {
                continue;
            };
            if o < end && e_end > offset {
                stored.push((o, e_end, e.path()));
            }
        }
        let mut out = Vec::with_capacity(len);
        let mut at = offset;
        while at < end {
            // The stored range that holds `at` and reaches furthest.
            let (start, stop, path) = stored
                .iter()
                .filter(|(s, e, _)| *s <= at && *e > at)
                .max_by_key(|(_, e, _)| *e)?;
            let data = fs::read(path).ok()?;
            if data.len() as u64 != stop - start {
                return None;
            }
            let upto = (*stop).min(end);
            out.extend_from_slice(&data[(at - start) as usize..(upto - start) as usize]);
            at = upto;
        }
        Some(out)
    }

    pub fn put_range(&self, blob: &str, offset: u64, data: &[u8]) -> Result<()> {
        if let Some(path) = self.range_path(blob, offset, data.len()) {
            // Checked against the TOC digest whenever read: no fsync needed.
            write_atomic_unsynced(&path, data)?;
            self.record(&path, data.len() as u64);
        }
        Ok(())
    }

    /// Forgets the raw ranges of a blob, e.g. after they failed verification.
    pub fn drop_ranges(&self, blob: &str) {
        let Some(dir) = self.dir.as_ref().map(|d| d.join("ranges")) else {
            return;
        };
        let prefix = Self::range_prefix(blob);
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    self.remove(&e.path());
                }
            }
        }
    }

    /// Writes a whole file for passthrough piece by piece, checking its sha256 before it
    /// becomes visible, then removes the files of its `chunks`: from now on their bytes
    /// are read out of the copy. `None` without a directory or when the content does not
    /// match.
    pub fn put_file(
        &self,
        digest: &[u8; 32],
        chunks: &[Key],
        pieces: impl IntoIterator<Item = Option<Arc<Vec<u8>>>>,
    ) -> Result<Option<PathBuf>> {
        let Some(path) = self.file_path(digest) else {
            return Ok(None);
        };
        let parent = path
            .parent()
            .ok_or_else(|| cache_err(&path, io::Error::other("no parent directory")))?;
        let mut tmp = temp_file_in(parent)?;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        for piece in pieces {
            let Some(piece) = piece else {
                return Ok(None);
            };
            hasher.update(piece.as_slice());
            len += piece.len() as u64;
            tmp.write_all(&piece).map_err(|e| cache_err(&path, e))?;
        }
        let got: [u8; 32] = hasher.finalize().into();
        if &got != digest {
            return Ok(None);
        }
        // Marked first: the copy may be handed out as soon as it has its name, and
        // nothing else can appear under that name (a damaged copy is removed first).
        if let Ok(mut v) = self.verified_files.lock() {
            v.insert(*digest);
        }
        persist_durably(tmp, &path)?;
        self.record(&path, len);
        self.drop_chunk_files(chunks);
        Ok(Some(path))
    }

    /// Removes the chunk files of `keys` (those there are): a whole-file copy holding
    /// their bytes replaces them. Only once the copy is durable, so a crash leaves the
    /// bytes in one place or both, never in none.
    pub fn drop_chunk_files(&self, keys: &[Key]) {
        for k in keys {
            if let Some(p) = self.chunk_path(k).filter(|p| p.exists()) {
                self.remove(&p);
            }
        }
    }
}

/// A 64-hex-digit file name as the key it stands for.
fn parse_key(name: &str) -> Option<Key> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(name, &mut key).ok()?;
    Some(key)
}

fn cache_err(path: &Path, source: io::Error) -> Error {
    Error::Cache {
        path: path.display().to_string(),
        source,
    }
}

/// Prefix of every file the cache is still writing. Such a file is never read, and one
/// left behind by a crash is removed when the cache is next opened.
pub const TEMP_PREFIX: &str = ".tmp-";

fn temp_file_in(parent: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(parent)
        .map_err(|e| cache_err(parent, e))
}

/// Makes a fully written temp file visible at `path` so that after a crash the name
/// holds either nothing or all of the bytes: data reaches the disk before the rename,
/// and the rename itself before this returns.
fn persist_durably(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    tmp.as_file().sync_all().map_err(|e| cache_err(path, e))?;
    tmp.persist(path).map_err(|e| cache_err(path, e.error))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| cache_err(dir, e))
}

/// Temp file in the same directory, then rename: readers see nothing or everything.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .ok_or_else(|| cache_err(path, io::Error::other("no parent directory")))?;
    if !parent.exists() {
        fs::create_dir_all(parent).map_err(|e| cache_err(parent, e))?;
        // The new directory's own entry must survive a crash too.
        if let Some(grand) = parent.parent() {
            sync_dir(grand)?;
        }
    }
    let mut tmp = temp_file_in(parent)?;
    tmp.write_all(data).map_err(|e| cache_err(path, e))?;
    persist_durably(tmp, path)
}

/// [`write_atomic`] without fsync: readers see nothing or everything while the machine
/// runs; after a power cut the name may hold a damaged file, so only for data that is
/// checked against a digest before every use.
fn write_atomic_unsynced(path: &Path, data: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .ok_or_else(|| cache_err(path, io::Error::other("no parent directory")))?;
    if !parent.exists() {
        fs::create_dir_all(parent).map_err(|e| cache_err(parent, e))?;
    }
    let mut tmp = temp_file_in(parent)?;
    tmp.write_all(data).map_err(|e| cache_err(path, e))?;
    tmp.persist(path).map_err(|e| cache_err(path, e.error))?;
    Ok(())
}

/// Removes temp files a killed process left in the cache directory and its
/// subdirectories (one level: chunk shards, `files/`, `ranges/`), and lists every other
/// file with its length and mtime, oldest first.
fn scan(dir: &Path) -> Vec<(Name, u64, SystemTime)> {
    let mut found = Vec::new();
    let mut swept = 0usize;
    let mut visit = |e: fs::DirEntry| {
        if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            if fs::remove_file(e.path()).is_ok() {
                swept += 1;
            }
        } else if let Ok(m) = e.metadata() {
            if m.is_file() {
                found.push((
                    Name::of(dir, &e.path()),
                    m.len(),
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ));
            }
        }
    };
    let Ok(top) = fs::read_dir(dir) else {
        return found;
    };
    for e in top.flatten() {
        if e.file_type().is_ok_and(|k| k.is_dir()) {
            if let Ok(sub) = fs::read_dir(e.path()) {
                sub.flatten().for_each(&mut visit);
            }
        } else {
            visit(e);
        }
    }
    if swept > 0 {
        tracing::info!(dir = %dir.display(), swept, "removed unfinished cache files");
    }
    found.sort_by_key(|f| f.2);
    found
}

/// A tenth of the filesystem holding `dir`, at most [`DEFAULT_MAX_DISK_BYTES`];
/// unbounded if the filesystem cannot be asked.
fn default_disk_limit(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => (s.blocks().saturating_mul(s.fragment_size()) / 10).min(DEFAULT_MAX_DISK_BYTES),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot size the cache filesystem; cache unbounded");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &[u8]) -> Key {
        Sha256::digest(b).into()
    }

    #[test]
    fn opening_sweeps_unfinished_writes_and_writes_are_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..=255u8).cycle().take(50_000).collect();
        let k = key(&data);
        let hex = hex::encode(k);
        {
            let c = ChunkCache::directory(dir.path(), 0).expect("cache");
            c.put(k, Arc::new(data.clone())).expect("put");
            c.put_range("sha256:ab", 7, b"footer").expect("range");
            let whole = c
                .put_file(&k, &[], [Some(Arc::new(data.clone()))])
                .expect("file");
            assert!(whole.is_some());
        }
        // What a process killed mid-write leaves behind.
        let strays = [
            dir.path()
                .join(&hex[..2])
                .join(format!("{TEMP_PREFIX}chunk")),
            dir.path().join("files").join(format!("{TEMP_PREFIX}whole")),
            dir.path()
                .join("ranges")
                .join(format!("{TEMP_PREFIX}range")),
            dir.path().join(format!("{TEMP_PREFIX}top")),
        ];
        for s in &strays {
            fs::write(s, b"half").expect("stray");
        }
        let c = ChunkCache::directory(dir.path(), 0).expect("cache");
        for s in &strays {
            assert!(!s.exists(), "{} swept", s.display());
        }
        assert_eq!(
            fs::read(dir.path().join(&hex[..2]).join(&hex)).expect("chunk"),
            data
        );
        assert_eq!(
            fs::read(dir.path().join("files").join(&hex)).expect("file"),
            data
        );
        assert_eq!(
            c.get_range("sha256:ab", 7, 6).as_deref(),
            Some(&b"footer"[..])
        );
        assert_eq!(c.get(&k, true, None).as_deref(), Some(&data));
    }

    #[test]
    fn a_whole_file_copy_replaces_its_chunk_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000]).collect();
        let whole: Vec<u8> = parts.concat();
        let file: [u8; 32] = Sha256::digest(&whole).into();
        let keys: Vec<Key> = parts.iter().map(|p| key(p)).collect();
        let at = |i: usize| InFile {
            file,
            file_size: 3000,
            offset: i as u64 * 1000,
            len: 1000,
        };
        let chunk_path = |k: &Key| {
            let hex = hex::encode(k);
            dir.path().join(&hex[..2]).join(hex)
        };
        {
            let c = ChunkCache::directory(dir.path(), 0).expect("cache");
            for (k, p) in keys.iter().zip(&parts) {
                c.put(*k, Arc::new(p.clone())).expect("put");
            }
            let pieces = keys.iter().map(|k| c.get(k, true, None));
            assert!(c.put_file(&file, &keys, pieces).expect("file").is_some());
            assert!(
                keys.iter().all(|k| !chunk_path(k).exists()),
                "chunk files left"
            );
            assert_eq!(c.disk_usage().0, 3000, "the copy alone is accounted");
            // Written by this process: read without hashing.
            assert_eq!(
                c.read_verified(&keys[1], Some(&at(1)), 10, 20).as_deref(),
                Some(&parts[1][10..30])
            );
            assert!(c.contains(&keys[2], Some(&at(2))));
            assert!(!c.contains(&keys[2], None));
        }
        let c = ChunkCache::directory(dir.path(), 0).expect("cache");
        // A new process hashes a slice before it reads it without hashing.
        assert_eq!(c.read_verified(&keys[1], Some(&at(1)), 0, 10), None);
        assert_eq!(
            c.get(&keys[1], true, Some(&at(1))).as_deref(),
            Some(&parts[1])
        );
        assert_eq!(
            c.read_verified(&keys[1], Some(&at(1)), 0, 10).as_deref(),
            Some(&parts[1][..10])
        );
        assert_eq!(c.read_verified(&keys[2], Some(&at(2)), 0, 10), None);
        // A damaged slice condemns the copy: it is removed and forgotten.
        let path = dir.path().join("files").join(hex::encode(file));
        let mut bytes = fs::read(&path).expect("copy");
        bytes[2500] ^= 1;
        fs::write(&path, bytes).expect("damage");
        assert_eq!(c.get(&keys[2], true, Some(&at(2))), None);
        assert!(!path.exists());
        assert_eq!(c.disk_usage().0, 0);
        assert_eq!(c.read_verified(&keys[1], Some(&at(1)), 0, 10), None);
        // So does a copy of the wrong size.
        fs::write(&path, &whole[..2000]).expect("short copy");
        assert_eq!(c.get(&keys[0], true, Some(&at(0))), None);
        assert!(!path.exists());
    }

    #[test]
    fn directory_keeps_to_its_bounds_least_recently_used_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100]).collect();
        let path = |d: &[u8]| {
            let hex = hex::encode(key(d));
            dir.path().join(&hex[..2]).join(hex)
        };
        {
            let c = ChunkCache::directory(dir.path(), 0)
                .expect("cache")
                .with_disk_bounds(250, None);
            c.put(key(&chunks[0]), Arc::new(chunks[0].clone()))
                .expect("put");
            c.put(key(&chunks[1]), Arc::new(chunks[1].clone()))
                .expect("put");
            // A use makes chunk 0 the most recent: chunk 1 goes first.
            assert!(c.get(&key(&chunks[0]), true, None).is_some());
            c.put(key(&chunks[2]), Arc::new(chunks[2].clone()))
                .expect("put");
            assert!(path(&chunks[0]).exists() && path(&chunks[2]).exists());
            assert!(!path(&chunks[1]).exists(), "least recently used evicted");
            assert!(
                c.get(&key(&chunks[1]), true, None).is_none(),
                "a miss, not an error"
            );
            assert_eq!(c.disk_usage(), (200, 250, 1));
        }
        // A smaller bound applies at once to what an earlier process left.
        let c = ChunkCache::directory(dir.path(), 0)
            .expect("cache")
            .with_disk_bounds(150, None);
        assert_eq!(c.disk_usage().0, 100);
        // Files unused for longer than the age bound go too.
        let c = c.with_disk_bounds(0, Some(Duration::from_millis(30)));
        std::thread::sleep(Duration::from_millis(60));
        c.put(key(&chunks[3]), Arc::new(chunks[3].clone()))
            .expect("put");
        assert_eq!(c.disk_usage().0, 100);
        assert!(path(&chunks[3]).exists());
        assert!(!path(&chunks[0]).exists() && !path(&chunks[2]).exists());
    }

    #[test]
    fn disk_size_bound_and_evictions_are_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = FsMetrics::default();
        let c = ChunkCache::directory(dir.path(), 0)
            .expect("cache")
            .with_metrics(&m)
            .with_disk_bounds(150, None);
        c.put(key(b"a"), Arc::new(vec![1; 100])).expect("put");
        c.put(key(b"b"), Arc::new(vec![2; 100])).expect("put");
        let text = m.encode();
        for line in [
            "stargz_fs_chunk_cache_disk_size_bytes 100",
            "stargz_fs_chunk_cache_disk_limit_bytes 150",
            "stargz_fs_chunk_cache_evictions_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn index_names_are_digests_where_the_layout_allows() {
        let dir = Path::new("/c");
        let k = key(b"x");
        let hex = hex::encode(k);
        let chunk = dir.join(&hex[..2]).join(&hex);
        let file = dir.join("files").join(&hex);
        assert_eq!(Name::of(dir, &chunk), Name::Chunk(k));
        assert_eq!(Name::of(dir, &file), Name::File(k));
        assert_eq!(Name::Chunk(k).path(dir), chunk);
        assert_eq!(Name::File(k).path(dir), file);
        // Anything else keeps its path: a misplaced chunk, a range, another tree.
        for other in [
            dir.join("00").join(&hex),
            dir.join("ranges").join("sha256-ab-0-10"),
            Path::new("/d").join(&hex[..2]).join(&hex),
        ] {
            assert_eq!(Name::of(dir, &other), Name::Other(other.clone().into()));
            assert_eq!(Name::of(dir, &other).path(dir), other);
        }
    }

    #[test]
    fn lru_evicts_oldest_by_bytes() {
        let c = ChunkCache::memory(10);
        c.put(key(b"a"), Arc::new(vec![0; 4])).expect("put");
        c.put(key(b"b"), Arc::new(vec![0; 4])).expect("put");
        assert!(c.get_mem(&key(b"a")).is_some());
        c.put(key(b"c"), Arc::new(vec![0; 4])).expect("put");
        assert!(c.get_mem(&key(b"b")).is_none(), "b was least recently used");
        assert!(c.get_mem(&key(b"a")).is_some());
        assert!(c.get_mem(&key(b"c")).is_some());
    }

    #[test]
    fn directory_survives_and_detects_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = b"hello chunk".to_vec();
        let k = key(&data);
        {
            let c = ChunkCache::directory(dir.path(), 1 << 20).expect("cache");
            c.put(k, Arc::new(data.clone())).expect("put");
        }
        let c = ChunkCache::directory(dir.path(), 1 << 20).expect("cache");
        let mode = fs::metadata(dir.path()).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "cache directory is root-only");
        assert_eq!(c.get(&k, true, None).as_deref(), Some(&data));
        let hex = hex::encode(k);
        let path = dir.path().join(&hex[..2]).join(&hex);
        fs::write(&path, b"damaged").expect("write");
        let c = ChunkCache::directory(dir.path(), 1 << 20).expect("cache");
        assert!(c.get(&k, true, None).is_none());
        assert!(!path.exists());
    }

    #[test]
    fn partial_reads_only_of_chunks_this_process_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let k = key(&data);
        {
            let c = ChunkCache::directory(dir.path(), 1 << 20).expect("cache");
            c.put(k, Arc::new(data.clone())).expect("put");
            assert_eq!(
                c.read_verified(&k, None, 100, 50).as_deref(),
                Some(&data[100..150])
            );
        }
        // A new process has not hashed the file yet: no shortcut until it has.
        let c = ChunkCache::directory(dir.path(), 0).expect("cache");
        assert_eq!(c.read_verified(&k, None, 100, 50), None);
        assert_eq!(c.get(&k, true, None).as_deref(), Some(&data));
        assert_eq!(
            c.read_verified(&k, None, 9_990, 10).as_deref(),
            Some(&data[9_990..])
        );
        // A file that lost bytes is not trusted any more.
        assert_eq!(c.read_verified(&k, None, 9_995, 10), None);
        let hex = hex::encode(k);
        fs::write(dir.path().join(&hex[..2]).join(&hex), b"short").expect("write");
        assert_eq!(c.read_verified(&k, None, 0, 10), None);
        assert_eq!(
            c.read_verified(&k, None, 0, 5),
            None,
            "forgotten after a failed read"
        );
        // A memory-only cache has no files to read.
        let m = ChunkCache::memory(1 << 20);
        m.put(k, Arc::new(data.clone())).expect("put");
        assert_eq!(m.read_verified(&k, None, 0, 10), None);
    }
}
