//! Learned prefetch: what a workload read first from an image's layers on this node
//! (or on another node, through the registry) is fetched ahead the next time the image
//! is mounted.
//!
//! * Recording: each mount notes the regular files opened or read during
//!   `learn_window_sec` after its first access ([`fs::AccessLog`]); when the window
//!   closes or the mount goes away, the paths are written under the image's manifest
//!   digest to `<root>/learned/<alg>-<hex>.json` ([`Record`]). Per layer, a list
//!   already on disk is kept unless the new one holds more files: a later run that
//!   found most files cached (or that did less) must not shrink what a full start-up
//!   needs. At most [`MAX_RECORDS`] records are kept, the oldest written removed first.
//! * Use: when an image's layers are opened (the first Prepare opens them all), its
//!   record is read (from disk, else once from the registry's
//!   `sha256-<hex>.sgz-prefetch` tag) and each layer's recorded files are fetched in
//!   one batch ([`fs::Layer::prefetch_files`]), all layers in parallel, off the
//!   Prepare path. For a layer with converter-prioritized files (a prefetch landmark)
//!   the record's files and ranges replace the prioritized region as what the layer's
//!   own prefetch fetches ([`Learned::plan_layer`], applied as the layer opens): the
//!   record holds what a workload read, the region the whole files an optimizer saw
//!   opened (`ctr-remote image optimize` publishes such a record beside the image).
//!
//! A record is untrusted input: its bounds are checked as it is parsed, and paths not
//! in the layer's TOC (or not regular files) are ignored.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use futures::future::{BoxFuture, FutureExt, Shared};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use registry::{Digest, Reference};
use remote_layer::prefetch_record::{self, Record, MAX_RECORD_BYTES};
use serde::Deserialize;
use tracing::{debug, info, warn};

/// Most records kept under `learned/`.
pub const MAX_RECORDS: usize = 1000;
/// How long one look-up of an image's record (disk, then registry) serves the Prepares
/// of one pull.
const LOOKUP_TTL: Duration = Duration::from_secs(60);
/// How often a mount's window is checked for having closed.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Directory under the daemon's root.
pub const DIR_NAME: &str = "learned";

/// The learned-prefetch keys (top level of the daemon's config; ours).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct LearnedConfig {
    /// Seconds after a mount's first access during which the files read are recorded;
    /// 0 turns recording off.
    pub learn_window_sec: u64,
    /// Fetch an image's recorded files ahead when its layers are opened.
    pub learned_prefetch: bool,
    /// Most MiB of blob one layer's learned prefetch fetches.
    pub learned_prefetch_max_mib: u64,
    /// Without a local record, look the image's record up once in its registry.
    pub learned_prefetch_from_registry: bool,
}

impl Default for LearnedConfig {
    fn default() -> Self {
        LearnedConfig {
            learn_window_sec: 10,
            learned_prefetch: true,
            learned_prefetch_max_mib: 512,
            learned_prefetch_from_registry: true,
        }
    }
}

impl LearnedConfig {
    /// The keys from the config file's text (other keys are skipped).
    pub fn parse(text: &str) -> Result<LearnedConfig, toml::de::Error> {
        toml::from_str(text)
    }
}

/// Per path of one layer, the `[start, end)` ranges read from it (large files only).
pub type FileRanges = std::collections::BTreeMap<String, Vec<[u64; 2]>>;

/// `stargz_learned_prefetch_files_total` and `_bytes_total`.
#[derive(Clone, Default)]
pub struct LearnedMetrics {
    files: Counter,
    bytes: Counter,
    records: Counter,
}

impl LearnedMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("stargz_learned");
        sub.register(
            "prefetch_files",
            "Files fetched ahead from learned-prefetch records",
            self.files.clone(),
        );
        sub.register(
            "prefetch_bytes",
            "Blob bytes fetched ahead from learned-prefetch records",
            self.bytes.clone(),
        );
        sub.register(
            "records_written",
            "Learned-prefetch records written (recorded here or taken from a registry)",
            self.records.clone(),
        );
    }
}

type Lookup = Shared<BoxFuture<'static, Option<Arc<Record>>>>;

/// A layer to prefetch once it is open: its blob digest and its opening.
pub type LayerOpening = (String, BoxFuture<'static, Option<Arc<fs::Layer>>>);

/// Records and applies learned prefetch for one process's mounts.
pub struct Learned {
    cfg: LearnedConfig,
    dir: PathBuf,
    metrics: LearnedMetrics,
    /// One writer at a time: a record is read, merged and replaced.
    write: Mutex<()>,
    lookups: Mutex<HashMap<String, (Instant, Lookup)>>,
    /// Layers whose learned prefetch ran, per (image, layer digest): an opened layer
    /// several Prepares hand over is prefetched once.
    applied: Mutex<HashMap<(String, String), Weak<fs::Layer>>>,
    tmp_seq: AtomicU64,
    /// Recordings whose record is not written yet.
    watching: Arc<AtomicU64>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Learned {
    pub fn new(cfg: LearnedConfig, root: &Path, metrics: LearnedMetrics) -> Learned {
        Learned {
            cfg,
            dir: root.join(DIR_NAME),
            metrics,
            write: Mutex::default(),
            lookups: Mutex::default(),
            applied: Mutex::default(),
            tmp_seq: AtomicU64::new(0),
            watching: Arc::default(),
        }
    }

    /// Waits up to `max` for the recordings of mounts that went away to be written:
    /// called after unmounting everything, before the process exits.
    pub async fn settle(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while self.watching.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where a mount notes its first files, unless recording is off.
    pub fn recorder(&self) -> Option<Arc<fs::AccessLog>> {
        (self.cfg.learn_window_sec > 0).then(|| {
            Arc::new(fs::AccessLog::new(
                Duration::from_secs(self.cfg.learn_window_sec),
                prefetch_record::MAX_FILES_PER_LAYER,
            ))
        })
    }

    /// Waits (on a task) for `log`'s window to close or its mount to go away, then
    /// writes what it recorded for `layer` under `image`.
    pub fn watch(self: &Arc<Self>, image: Digest, layer: Arc<fs::Layer>, log: Arc<fs::AccessLog>) {
        let this = self.clone();
        struct Watching(Arc<AtomicU64>);
        impl Drop for Watching {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.watching.fetch_add(1, Ordering::SeqCst);
        let watching = Watching(self.watching.clone());
        tokio::spawn(async move {
            let _watching = watching;
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The mount holds the other reference to the log until it ends.
            while !log.closed_at(Instant::now()) && Arc::strong_count(&log) > 1 {
                tick.tick().await;
            }
            let index = layer.index();
            let mut paths: Vec<String> = Vec::new();
            let mut ranges = FileRanges::new();
            for (id, read) in log.files_with_ranges() {
                let Some(node) = index.get(id) else {
                    continue;
                };
                if let Some(read) = read {
                    ranges.insert(
                        node.path.clone(),
                        read.iter().map(|r| [r.start, r.end]).collect(),
                    );
                }
                paths.push(node.path.clone());
            }
            if paths.is_empty() {
                return;
            }
            let digest = layer.desc().digest.clone();
            drop(layer);
            let res = tokio::task::spawn_blocking(move || {
                let n = paths.len();
                this.save_layer(&image, &digest, paths, ranges)
                    .map(|kept| (kept, n, image, digest))
            })
            .await;
            match res {
                Ok(Ok((true, n, image, layer))) => {
                    info!(image = %image, layer = %layer, files = n, "learned-prefetch record written")
                }
                Ok(Ok((false, n, image, layer))) => {
                    debug!(image = %image, layer = %layer, files = n,
                        "learned-prefetch record kept: the one on disk has as many files")
                }
                Ok(Err(e)) => warn!(error = %e, "cannot write a learned-prefetch record"),
                Err(e) => warn!(error = %e, "learned-prefetch record writer failed"),
            }
        });
    }

    fn path_of(&self, image: &Digest) -> PathBuf {
        self.dir.join(prefetch_record::file_name_for(image))
    }

    /// Merges `paths` (and the read ranges of its large files) for `layer` into
    /// `image`'s record: written when the record has no list for the layer or a shorter
    /// one. Returns whether it wrote.
    pub fn save_layer(
        &self,
        image: &Digest,
        layer: &str,
        paths: Vec<String>,
        ranges: FileRanges,
    ) -> std::io::Result<bool> {
        let _w = locked(&self.write);
        let mut rec = self.load_local(image).unwrap_or_else(|| Record::new(image));
        if rec
            .layers
            .get(layer)
            .is_some_and(|old| old.len() >= paths.len())
        {
            return Ok(false);
        }
        rec.layers.insert(layer.to_string(), paths);
        if ranges.is_empty() {
            rec.ranges.remove(layer);
        } else {
            rec.ranges.insert(layer.to_string(), ranges);
        }
        rec.created = prefetch_record::now_secs();
        if rec.check(image).is_err() {
            return Ok(false);
        }
        self.write_record(image, &rec)?;
        locked(&self.lookups).remove(&image.to_string());
        Ok(true)
    }

    /// Writes `rec` as `image`'s record (temp file, fsync, rename), then removes the
    /// oldest records past [`MAX_RECORDS`].
    fn write_record(&self, image: &Digest, rec: &Record) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        let path = self.path_of(image);
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            prefetch_record::file_name_for(image),
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&rec.to_json())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res?;
        self.metrics.records.inc();
        self.prune();
        Ok(())
    }

    /// Removes the oldest records while more than [`MAX_RECORDS`] are kept.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut records: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                let t = e.metadata().ok()?.modified().ok()?;
                Some((t, e.path()))
            })
            .collect();
        if records.len() <= MAX_RECORDS {
            return;
        }
        records.sort();
        let excess = records.len() - MAX_RECORDS;
        for (_, p) in records.into_iter().take(excess) {
            debug!(path = %p.display(), "removing the oldest learned-prefetch record");
            let _ = std::fs::remove_file(p);
        }
    }

    /// `image`'s record on disk, if there is a valid one; a broken one is warned
    /// about and ignored.
    fn load_local(&self, image: &Digest) -> Option<Record> {
        let path = self.path_of(image);
        let f = std::fs::File::open(&path).ok()?;
        let mut bytes = Vec::new();
        use std::io::Read;
        if let Err(e) = f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes) {
            warn!(path = %path.display(), error = %e, "learned-prefetch record unreadable; ignored");
            return None;
        }
        match Record::parse(&bytes, image) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "learned-prefetch record ignored");
                None
            }
        }
    }

    /// Starts fetching the recorded files of the layers of `image` as each one opens
    /// (on tasks: the caller goes on at once). Does nothing without a record.
    pub fn image_opening(
        self: &Arc<Self>,
        client: registry::Client,
        reference: Reference,
        image: Digest,
        layers: Vec<LayerOpening>,
    ) {
        if !self.cfg.learned_prefetch || layers.is_empty() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let Some(rec) = this.record(client, reference, &image).await else {
                return;
            };
            let mut tasks = Vec::new();
            for (digest, opening) in layers {
                let Some(paths) = rec.layers.get(&digest).cloned() else {
                    continue;
                };
                let ranges = rec.ranges.get(&digest).cloned().unwrap_or_default();
                let (this, image) = (this.clone(), image.clone());
                tasks.push(tokio::spawn(async move {
                    let layer = opening.await?;
                    tokio::task::spawn_blocking(move || {
                        this.apply_layer(&image, &layer, &paths, &ranges)
                    })
                    .await
                    .ok()
                    .flatten()
                }));
            }
            let (mut layers, mut files, mut bytes) = (0, 0, 0);
            for t in tasks {
                if let Ok(Some(done)) = t.await {
                    layers += 1;
                    files += done.files;
                    bytes += done.bytes_fetched;
                }
            }
            if layers > 0 {
                info!(image = %image, layers, files, bytes, "learned prefetch applied");
            }
        });
    }

    /// The shared look-up of `image`'s record (disk, else registry), for layers that
    /// must know it before their prefetch starts; `None` when learned prefetch is off.
    pub fn lookup(
        self: &Arc<Self>,
        client: registry::Client,
        reference: Reference,
        image: Digest,
    ) -> Option<BoxFuture<'static, Option<Arc<Record>>>> {
        if !self.cfg.learned_prefetch {
            return None;
        }
        let this = self.clone();
        Some(async move { this.record(client, reference, &image).await }.boxed())
    }

    /// Makes `layer`'s own prefetch fetch what `rec` names for it instead of its
    /// prioritized region, when the layer has one and the record lists the layer;
    /// returns whether it did. Call before the layer's prefetch starts.
    pub fn plan_layer(&self, rec: &Record, layer: &fs::Layer) -> bool {
        let digest = layer.desc().digest.clone();
        if layer.index().prefetch_end.is_none() {
            return false;
        }
        let Some(paths) = rec.layers.get(&digest) else {
            return false;
        };
        let ranges = rec.ranges.get(&digest).cloned().unwrap_or_default();
        let files = planned_files(layer, paths, &ranges);
        let count = files.len();
        let max = self.cfg.learned_prefetch_max_mib.saturating_mul(1 << 20);
        let planned = layer.plan_prefetch(files, max);
        if planned {
            info!(layer = %digest, files = count, ranged = ranges.len(),
                "prefetch follows the learned record instead of the prioritized region");
        }
        planned
    }

    /// Fetches `layer`'s recorded files in one batch, once per opened layer.
    fn apply_layer(
        &self,
        image: &Digest,
        layer: &Arc<fs::Layer>,
        paths: &[String],
        ranges: &FileRanges,
    ) -> Option<fs::FilesPrefetched> {
        let digest = layer.desc().digest.clone();
        if layer.index().prefetch_end.is_some() {
            // Its own prefetch carries the record (see `plan_layer`) or the region.
            debug!(layer = %digest, "layer has prioritized files; left to its own prefetch");
            return None;
        }
        {
            let mut applied = locked(&self.applied);
            applied.retain(|_, w| w.strong_count() > 0);
            let key = (image.to_string(), digest.clone());
            if applied
                .get(&key)
                .and_then(Weak::upgrade)
                .is_some_and(|l| Arc::ptr_eq(&l, layer))
            {
                return None;
            }
            applied.insert(key, Arc::downgrade(layer));
        }
        let files = planned_files(layer, paths, ranges);
        let max = self.cfg.learned_prefetch_max_mib.saturating_mul(1 << 20);
        match layer.prefetch_file_ranges(&files, max) {
            Ok(done) => {
                self.metrics.files.inc_by(done.files as u64);
                self.metrics.bytes.inc_by(done.bytes_fetched);
                Some(done)
            }
            Err(e) => {
                warn!(layer = %digest, error = %e, "learned prefetch failed; reads fetch on demand");
                None
            }
        }
    }

    /// Whether `image` has a record to prefetch from (on disk, else in its registry
    /// when that is allowed); shares the look-up [`Learned::image_opening`] makes.
    pub fn has_record(
        self: &Arc<Self>,
        client: registry::Client,
        reference: Reference,
        image: Digest,
    ) -> BoxFuture<'static, bool> {
        match self.lookup(client, reference, image) {
            Some(record) => record.map(|r| r.is_some()).boxed(),
            None => futures::future::ready(false).boxed(),
        }
    }

    /// `image`'s record: on disk, else (when allowed) from the registry, stored on
    /// disk then. One look-up per image serves the Prepares of a pull.
    async fn record(
        self: &Arc<Self>,
        client: registry::Client,
        reference: Reference,
        image: &Digest,
    ) -> Option<Arc<Record>> {
        let lookup = {
            let mut map = locked(&self.lookups);
            let now = Instant::now();
            map.retain(|_, (t, _)| now.duration_since(*t) < LOOKUP_TTL);
            match map.get(&image.to_string()) {
                Some((_, l)) => l.clone(),
                None => {
                    let (this, image2) = (self.clone(), image.clone());
                    let handle = tokio::runtime::Handle::current();
                    // The registry client's futures are not Send: drive them on a
                    // blocking thread, as the manifest look-up does.
                    let task = tokio::task::spawn_blocking(move || {
                        if let Some(r) = this.load_local(&image2) {
                            return Some(Arc::new(r));
                        }
                        if !this.cfg.learned_prefetch_from_registry {
                            return None;
                        }
                        match handle.block_on(fetch_remote(&client, &reference, &image2)) {
                            Ok(Some(r)) => {
                                let _w = locked(&this.write);
                                if this.load_local(&image2).is_none() {
                                    if let Err(e) = this.write_record(&image2, &r) {
                                        warn!(error = %e, "cannot store a learned-prefetch record");
                                    }
                                }
                                info!(image = %image2, files = r.file_count(),
                                    "learned-prefetch record taken from the registry");
                                Some(Arc::new(r))
                            }
                            Ok(None) => {
                                debug!(image = %image2, "no learned-prefetch record in the registry");
                                None
                            }
                            Err(e) => {
                                warn!(image = %image2, error = %e,
                                    "learned-prefetch record from the registry ignored");
                                None
                            }
                        }
                    });
                    let l = async move { task.await.ok().flatten() }.boxed().shared();
                    map.insert(image.to_string(), (now, l.clone()));
                    l
                }
            }
        };
        lookup.await
    }
}

/// The regular files of `layer` among the recorded `paths`, each with its recorded
/// ranges (none: read whole); other paths are skipped with a debug line.
fn planned_files(layer: &fs::Layer, paths: &[String], ranges: &FileRanges) -> Vec<fs::PlannedFile> {
    let index = layer.index();
    let files: Vec<fs::PlannedFile> = paths
        .iter()
        .filter_map(|p| index.lookup(p).map(|id| (id, p)))
        .filter(|&(id, _)| index.node(id).kind == estargz::NodeKind::Reg)
        .map(|(id, p)| {
            let read = ranges
                .get(p)
                .map(|rs| rs.iter().map(|&[a, b]| a..b).collect());
            (id, read)
        })
        .collect();
    let unknown = paths.len() - files.len();
    if unknown > 0 {
        debug!(layer = %layer.desc().digest, unknown,
            "recorded paths not regular files of the layer; ignored");
    }
    files
}

/// The record pushed for `image` under its `sha256-<hex>.sgz-prefetch` tag in the
/// image's repository: `None` when there is none (404).
pub async fn fetch_remote(
    client: &registry::Client,
    reference: &Reference,
    image: &Digest,
) -> Result<Option<Record>, String> {
    let tag_ref = reference
        .at_tag(&prefetch_record::tag_for(image))
        .map_err(|e| e.to_string())?;
    // Bounded (the client's manifest limit) and checked against the digest the
    // registry names.
    let fetched = match client.get_manifest_if_exists(&tag_ref).await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("{tag_ref}: {e}")),
    };
    let registry::Manifest::Image(m) = fetched.parse().map_err(|e| e.to_string())? else {
        return Err(format!("{tag_ref} is an index, not a record"));
    };
    let typed = m.artifact_type.as_deref() == Some(prefetch_record::MEDIA_TYPE);
    if !typed {
        return Err(format!(
            "{tag_ref} has artifactType {:?}, not {}",
            m.artifact_type,
            prefetch_record::MEDIA_TYPE
        ));
    }
    if m.subject.as_ref().map(|s| &s.digest) != Some(image) {
        return Err(format!("{tag_ref} is not about image {image}"));
    }
    let layer = m
        .layers
        .iter()
        .find(|l| l.media_type == prefetch_record::MEDIA_TYPE)
        .ok_or_else(|| format!("{tag_ref} has no record layer"))?;
    if layer.size > MAX_RECORD_BYTES {
        return Err(format!(
            "record in {tag_ref} is {} bytes, over {MAX_RECORD_BYTES}",
            layer.size
        ));
    }
    let bytes = client
        .blob_reader(&tag_ref, layer.digest.clone(), Some(layer.size))
        .read_all()
        .await
        .map_err(|e| format!("record blob of {tag_ref}: {e}"))?;
    if Digest::sha256(&bytes) != layer.digest || bytes.len() as u64 != layer.size {
        return Err(format!(
            "record blob of {tag_ref} does not match its digest"
        ));
    }
    Record::parse(&bytes, image)
        .map(Some)
        .map_err(|e| format!("{tag_ref}: {e}"))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_and_defaults() {
        let d = LearnedConfig::parse("noprefetch = true\n[fuse]\npassthrough = false\n").unwrap();
        assert_eq!(d, LearnedConfig::default());
        assert_eq!(d.learn_window_sec, 10);
        assert!(d.learned_prefetch && d.learned_prefetch_from_registry);
        let c = LearnedConfig::parse(
            "learn_window_sec = 0\nlearned_prefetch = false\nlearned_prefetch_max_mib = 8\n\
             learned_prefetch_from_registry = false\n",
        )
        .unwrap();
        assert_eq!(
            c,
            LearnedConfig {
                learn_window_sec: 0,
                learned_prefetch: false,
                learned_prefetch_max_mib: 8,
                learned_prefetch_from_registry: false,
            }
        );
        let l = Learned::new(c, Path::new("/nonexistent"), LearnedMetrics::default());
        assert!(l.recorder().is_none(), "a 0 s window records nothing");
        assert!(LearnedConfig::parse("learn_window_sec = -1\n").is_err());
    }

    #[test]
    fn keeps_the_longer_list_and_bounds_the_records() {
        let tmp = tempfile::tempdir().unwrap();
        let l = Learned::new(
            LearnedConfig::default(),
            tmp.path(),
            LearnedMetrics::default(),
        );
        let image = Digest::sha256(b"image");
        let layer = Digest::sha256(b"layer").to_string();
        assert!(l
            .save_layer(
                &image,
                &layer,
                vec!["a".into(), "b".into()],
                FileRanges::new()
            )
            .unwrap());
        assert!(!l
            .save_layer(&image, &layer, vec!["c".into()], FileRanges::new())
            .unwrap());
        assert!(l
            .save_layer(
                &image,
                &layer,
                vec!["c".into(), "a".into(), "b".into()],
                FileRanges::new()
            )
            .unwrap());
        let rec = l.load_local(&image).unwrap();
        assert_eq!(rec.layers[&layer], vec!["c", "a", "b"]);
        let dir = tmp.path().join(DIR_NAME);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&l.path_of(&image)), 0o600);
        // A broken record reads as none and is replaced by the next write.
        std::fs::write(l.path_of(&image), b"{broken").unwrap();
        assert!(l.load_local(&image).is_none());
        assert!(l
            .save_layer(&image, &layer, vec!["x".into()], FileRanges::new())
            .unwrap());

        for i in 0..(MAX_RECORDS + 5) {
            let img = Digest::sha256(format!("img{i}").as_bytes());
            l.save_layer(&img, &layer, vec!["f".into()], FileRanges::new())
                .unwrap();
        }
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(n, MAX_RECORDS);
    }
}
