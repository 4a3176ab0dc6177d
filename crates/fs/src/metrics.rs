//! Prometheus metrics of the layer filesystem: per-layer size and fetch progress, mounts
//! alive, FUSE operation latency and chunk cache hits, behind one cloneable [`FsMetrics`].
//!
//! Names follow the reference daemon's `stargz_fs_` namespace where a metric of the same
//! meaning exists there (`layer_size`, `layer_fetched_size`, `layer_prefetch_size`), and
//! its per-layer operation families are kept with its names and labels
//! (`operation_type`, `layer`): `operation_duration_milliseconds` (mount, registry GETs,
//! footer and TOC, prefetch wait, background windows), `operation_duration_microseconds`
//! (its `read_on_demand` and `node_readdir` beside our `fuse_*` operations),
//! `operation_count` and `bytes_served`. Layer gauges are read from the live layers at
//! scrape time, so they are exact and vanish as soon as a layer is unmounted; the
//! operation series of a layer go when its last mount does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// What the metrics read off a live layer at scrape time. Layers implement it, so this
/// module needs nothing of theirs.
pub(crate) trait LayerGauges: Send + Sync {
    fn digest(&self) -> &str;
    fn blob_size(&self) -> u64;
    fn fetched_bytes(&self) -> u64;
    fn prefetched_bytes(&self) -> u64;
}

type LiveLayer = (PathBuf, Arc<dyn LayerGauges>);

/// FUSE operations timed by [`FsMetrics`], in the order of [`FuseOpMetrics`]'s table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FuseOp {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Release,
    Opendir,
    Readdir,
    Readdirplus,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
}

/// The reference's name for the same work, observed beside ours.
fn reference_alias(op: FuseOp) -> Option<&'static str> {
    match op {
        FuseOp::Read => Some(READ_ON_DEMAND),
        FuseOp::Readdir | FuseOp::Readdirplus => Some(NODE_READDIR),
        _ => None,
    }
}

const READ_ON_DEMAND: &str = "read_on_demand";
const NODE_READDIR: &str = "node_readdir";
const READ_ACCESS_COUNT: &str = "on_demand_read_access_count";
const REGISTRY_FETCH_COUNT: &str = "on_demand_remote_registry_fetch_count";
const BYTES_SERVED: &str = "on_demand_bytes_served";
const BYTES_FETCHED: &str = "on_demand_bytes_fetched";

/// Operations timed in milliseconds, with the reference's `operation_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A layer mounted: from the mount request to the FUSE mount answering (prefetch
    /// wait excluded), as the reference times its Mount.
    Mount,
    /// A blob size request (only made when the descriptor gave no size).
    HeaderGet,
    /// Footer read at layer open.
    FooterGet,
    /// Footer and TOC read at layer open.
    TocGet,
    /// TOC parsed and indexed.
    TocDeserialize,
    /// One registry fetch of layer data.
    RemoteRegistryGet,
    /// The wait for prefetch before a mount is reported ready (layer label: the
    /// digest of nothing, as the reference labels it).
    PrefetchesCompleted,
    /// One window of background fetch.
    BackgroundFetchDownload,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Mount => "mount",
            Op::HeaderGet => "stargz_header_get",
            Op::FooterGet => "stargz_footer_get",
            Op::TocGet => "stargz_toc_get",
            Op::TocDeserialize => "stargz_toc_json_deserialize",
            Op::RemoteRegistryGet => "remote_registry_get",
            Op::PrefetchesCompleted => "all_prefetches_completed",
            Op::BackgroundFetchDownload => "background_fetch_download",
        }
    }
}

/// The `layer` label of operations that belong to no layer: the digest of nothing.
pub const NO_LAYER: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A counter exposed under its plain name (no `_total`), as the reference's
/// `stargz_fs_operation_count` is.
#[derive(Clone, Debug, Default)]
pub(crate) struct PlainCounter(Arc<AtomicU64>);

impl PlainCounter {
    pub(crate) fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for PlainCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for PlainCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The value line without a suffix; the descriptor still says counter.
        encoder.encode_gauge(&(self.get() as i64))
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

const FUSE_OPS: [(FuseOp, &str); 13] = [
    (FuseOp::Lookup, "fuse_lookup"),
    (FuseOp::Getattr, "fuse_getattr"),
    (FuseOp::Readlink, "fuse_readlink"),
    (FuseOp::Open, "fuse_open"),
    (FuseOp::Read, "fuse_read"),
    (FuseOp::Release, "fuse_release"),
    (FuseOp::Opendir, "fuse_opendir"),
    (FuseOp::Readdir, "fuse_readdir"),
    (FuseOp::Readdirplus, "fuse_readdirplus"),
    (FuseOp::Statfs, "fuse_statfs"),
    (FuseOp::Getxattr, "fuse_getxattr"),
    (FuseOp::Listxattr, "fuse_listxattr"),
    (FuseOp::Access, "fuse_access"),
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation_type: &'static str,
    layer: String,
}

impl OpLabels {
    fn new(operation_type: &'static str, layer: &str) -> OpLabels {
        OpLabels {
            operation_type,
            layer: layer.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    digest: String,
    mountpoint: String,
}

type HistogramFamily = Family<OpLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 10µs .. ~5s in ×3 steps: cached answers sit at the bottom, registry fetches at the top.
    Histogram::new(exponential_buckets(10.0, 3.0, 13))
}

fn millis_histogram() -> Histogram {
    // The reference's buckets: 1 ms .. 16 s, doubling.
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// The metrics of every layer mounted with this handle. Clones share everything; a
/// default handle counts but is exposed nowhere until [`FsMetrics::register`].
#[derive(Clone)]
pub struct FsMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    mounts: Mutex<BTreeMap<PathBuf, Weak<dyn LayerGauges>>>,
    fuse: HistogramFamily,
    millis: HistogramFamily,
    counts: Family<OpLabels, PlainCounter>,
    bytes: Family<OpLabels, Gauge>,
    /// Requests per operation, in the order of `FUSE_OPS` (histograms do not tell).
    fuse_counts: Arc<[AtomicU64; FUSE_OPS.len()]>,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    cache_disk_bytes: Gauge,
    cache_disk_limit: Gauge,
    cache_evictions: Counter,
    zero_config_files: Counter,
    zero_config_bytes: Counter,
}

impl Default for FsMetrics {
    fn default() -> Self {
        FsMetrics {
            inner: Arc::new(Inner {
                mounts: Mutex::default(),
                fuse: HistogramFamily::new_with_constructor(latency_histogram),
                millis: HistogramFamily::new_with_constructor(millis_histogram),
                counts: Family::default(),
                bytes: Family::default(),
                fuse_counts: Arc::default(),
                cache_hits: Family::default(),
                cache_misses: Family::default(),
                cache_disk_bytes: Gauge::default(),
                cache_disk_limit: Gauge::default(),
                cache_evictions: Counter::default(),
                zero_config_files: Counter::default(),
                zero_config_bytes: Counter::default(),
            }),
        }
    }
}

impl std::fmt::Debug for FsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsMetrics")
            .field("mounts", &self.mounts_alive())
            .finish()
    }
}

impl FsMetrics {
    /// Adds this handle's metrics to `registry` under the `stargz_fs_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let reg = registry.sub_registry_with_prefix("stargz_fs");
        reg.register_with_unit(
            "operation_duration",
            "Latency in microseconds of FUSE operations, by operation type and layer",
            Unit::Other("microseconds".into()),
            self.inner.fuse.clone(),
        );
        reg.register_with_unit(
            "operation_duration",
            "Latency in milliseconds of layer operations, by operation type and layer",
            Unit::Other("milliseconds".into()),
            self.inner.millis.clone(),
        );
        reg.register(
            "operation_count",
            "Operations done, by operation type and layer",
            self.inner.counts.clone(),
        );
        reg.register(
            "bytes_served",
            "Bytes served or fetched on demand, by operation type and layer",
            self.inner.bytes.clone(),
        );
        reg.register_with_unit(
            "chunk_cache_disk_size",
            "Bytes of files in the chunk cache directory",
            Unit::Bytes,
            self.inner.cache_disk_bytes.clone(),
        );
        reg.register_with_unit(
            "chunk_cache_disk_limit",
            "Bytes the chunk cache directory may hold (0: unbounded)",
            Unit::Bytes,
            self.inner.cache_disk_limit.clone(),
        );
        reg.register(
            "chunk_cache_evictions",
            "Cache files removed to keep the directory under its size or age bound",
            self.inner.cache_evictions.clone(),
        );
        reg.register(
            "chunk_cache_hits",
            "Chunk cache lookups answered, by cache tier (memory, disk)",
            self.inner.cache_hits.clone(),
        );
        reg.register(
            "chunk_cache_misses",
            "Chunk cache lookups that missed, by cache tier (memory, disk)",
            self.inner.cache_misses.clone(),
        );
        reg.register(
            "zero_config_prefetch_files",
            "Start-up files fetched ahead for images without prioritized files",
            self.inner.zero_config_files.clone(),
        );
        reg.register_with_unit(
            "zero_config_prefetch",
            "Compressed blob bytes fetched ahead for images without prioritized files",
            Unit::Bytes,
            self.inner.zero_config_bytes.clone(),
        );
        reg.register_collector(Box::new(LayerCollector(self.inner.clone())));
    }

    /// Counts one image's zero-config prefetch.
    pub fn zero_config_prefetched(&self, files: u64, bytes: u64) {
        self.inner.zero_config_files.inc_by(files);
        self.inner.zero_config_bytes.inc_by(bytes);
    }

    /// Files and bytes counted by [`FsMetrics::zero_config_prefetched`] so far.
    pub fn zero_config_totals(&self) -> (u64, u64) {
        (
            self.inner.zero_config_files.get(),
            self.inner.zero_config_bytes.get(),
        )
    }

    /// The Prometheus text exposition of this handle alone, for a process that serves
    /// mounts on behalf of another one.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// FUSE requests of one `operation_type` (e.g. `fuse_lookup`, `fuse_getattr`)
    /// answered so far by the mounts of this handle; 0 for a type never seen.
    pub fn fuse_op_count(&self, operation_type: &str) -> u64 {
        FUSE_OPS
            .iter()
            .zip(self.inner.fuse_counts.iter())
            .find(|((_, name), _)| *name == operation_type)
            .map_or(0, |(_, n)| n.load(Ordering::Relaxed))
    }

    /// Layers mounted with this handle and not yet unmounted.
    pub fn mounts_alive(&self) -> usize {
        self.live_layers().len()
    }

    pub(crate) fn layer_mounted(&self, mountpoint: &Path, layer: Weak<dyn LayerGauges>) {
        if let Ok(mut m) = self.inner.mounts.lock() {
            m.insert(mountpoint.to_path_buf(), layer);
        }
    }

    pub(crate) fn layer_unmounted(&self, mountpoint: &Path, digest: &str) {
        let still_mounted = match self.inner.mounts.lock() {
            Ok(mut m) => {
                m.remove(mountpoint);
                m.values()
                    .filter_map(Weak::upgrade)
                    .any(|l| l.digest() == digest)
            }
            Err(_) => true,
        };
        if !still_mounted {
            self.forget_layer(digest);
        }
    }

    /// Drops the operation series of `layer`, so they do not pile up over the layers a
    /// node ever mounted.
    fn forget_layer(&self, layer: &str) {
        for (_, name) in FUSE_OPS {
            self.inner.fuse.remove(&OpLabels::new(name, layer));
        }
        for name in [READ_ON_DEMAND, NODE_READDIR] {
            self.inner.fuse.remove(&OpLabels::new(name, layer));
        }
        for op in [
            Op::Mount,
            Op::HeaderGet,
            Op::FooterGet,
            Op::TocGet,
            Op::TocDeserialize,
            Op::RemoteRegistryGet,
            Op::BackgroundFetchDownload,
        ] {
            self.inner.millis.remove(&OpLabels::new(op.name(), layer));
        }
        for name in [READ_ACCESS_COUNT, REGISTRY_FETCH_COUNT] {
            self.inner.counts.remove(&OpLabels::new(name, layer));
        }
        for name in [BYTES_SERVED, BYTES_FETCHED] {
            self.inner.bytes.remove(&OpLabels::new(name, layer));
        }
    }

    /// Records how long `op` took for `layer` (a digest, or [`NO_LAYER`]).
    pub fn observe_ms(&self, op: Op, layer: &str, took: Duration) {
        self.inner
            .millis
            .get_or_create(&OpLabels::new(op.name(), layer))
            .observe(took.as_secs_f64() * 1e3);
    }

    /// The handles one layer records its fetches into, resolved once.
    pub(crate) fn layer_ops(&self, layer: &str) -> LayerOps {
        LayerOps {
            registry_get: self.millis_of(Op::RemoteRegistryGet, layer),
            background: self.millis_of(Op::BackgroundFetchDownload, layer),
            fetches: self
                .inner
                .counts
                .get_or_create(&OpLabels::new(REGISTRY_FETCH_COUNT, layer))
                .clone(),
            fetched: self
                .inner
                .bytes
                .get_or_create(&OpLabels::new(BYTES_FETCHED, layer))
                .clone(),
        }
    }

    fn millis_of(&self, op: Op, layer: &str) -> Histogram {
        self.inner
            .millis
            .get_or_create(&OpLabels::new(op.name(), layer))
            .clone()
    }

    fn live_layers(&self) -> Vec<LiveLayer> {
        live_layers(&self.inner)
    }

    pub(crate) fn fuse_ops(&self, layer: &str) -> FuseOpMetrics {
        let histogram = |name| {
            self.inner
                .fuse
                .get_or_create(&OpLabels::new(name, layer))
                .clone()
        };
        FuseOpMetrics {
            histograms: FUSE_OPS.map(|(_, name)| histogram(name)),
            aliases: FUSE_OPS.map(|(op, _)| reference_alias(op).map(histogram)),
            reads: self
                .inner
                .counts
                .get_or_create(&OpLabels::new(READ_ACCESS_COUNT, layer))
                .clone(),
            served: self
                .inner
                .bytes
                .get_or_create(&OpLabels::new(BYTES_SERVED, layer))
                .clone(),
            counts: self.inner.fuse_counts.clone(),
        }
    }

    pub(crate) fn cache_counters(&self) -> CacheCounters {
        let hit = |cache| {
            self.inner
                .cache_hits
                .get_or_create(&CacheLabels { cache })
                .clone()
        };
        let miss = |cache| {
            self.inner
                .cache_misses
                .get_or_create(&CacheLabels { cache })
                .clone()
        };
        CacheCounters {
            memory_hit: hit("memory"),
            memory_miss: miss("memory"),
            disk_hit: hit("disk"),
            disk_miss: miss("disk"),
            disk_bytes: self.inner.cache_disk_bytes.clone(),
            disk_limit: self.inner.cache_disk_limit.clone(),
            evictions: self.inner.cache_evictions.clone(),
        }
    }
}

fn live_layers(inner: &Inner) -> Vec<LiveLayer> {
    let Ok(m) = inner.mounts.lock() else {
        return Vec::new();
    };
    m.iter()
        .filter_map(|(mp, l)| Some((mp.clone(), l.upgrade()?)))
        .collect()
}

/// Counters the chunk cache bumps; unregistered ones when no handle was given.
#[derive(Clone, Default, Debug)]
pub(crate) struct CacheCounters {
    pub memory_hit: Counter,
    pub memory_miss: Counter,
    pub disk_hit: Counter,
    pub disk_miss: Counter,
    pub disk_bytes: Gauge,
    pub disk_limit: Gauge,
    pub evictions: Counter,
}

/// What one layer's fetches record into, resolved once per layer.
#[derive(Clone)]
pub(crate) struct LayerOps {
    /// Each registry fetch, in milliseconds.
    pub registry_get: Histogram,
    /// Each background window, in milliseconds.
    pub background: Histogram,
    /// Registry fetches for reads a process waits for.
    pub fetches: PlainCounter,
    /// Bytes those fetches brought.
    pub fetched: Gauge,
}

/// One histogram per FUSE operation (and the reference's name for it, where it has
/// one), resolved once per mount so timing costs no lookup.
#[derive(Clone)]
pub(crate) struct FuseOpMetrics {
    histograms: [Histogram; FUSE_OPS.len()],
    aliases: [Option<Histogram>; FUSE_OPS.len()],
    reads: PlainCounter,
    served: Gauge,
    counts: Arc<[AtomicU64; FUSE_OPS.len()]>,
}

impl FuseOpMetrics {
    /// A timer that records into `op`'s histogram when dropped (after the reply).
    pub(crate) fn time(&self, op: FuseOp) -> OpTimer {
        let idx = FUSE_OPS.iter().position(|(o, _)| *o == op).unwrap_or(0);
        if op == FuseOp::Read {
            self.reads.inc_by(1);
        }
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        OpTimer {
            histogram: self.histograms[idx].clone(),
            alias: self.aliases[idx].clone(),
            started: Instant::now(),
        }
    }

    /// Bytes a read answered with.
    pub(crate) fn served(&self, bytes: usize) {
        self.served.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

pub(crate) struct OpTimer {
    histogram: Histogram,
    alias: Option<Histogram>,
    started: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        let us = self.started.elapsed().as_secs_f64() * 1e6;
        self.histogram.observe(us);
        if let Some(h) = &self.alias {
            h.observe(us);
        }
    }
}

/// Name, help, and how to read the value off a live layer.
type LayerGauge = (&'static str, &'static str, fn(&dyn LayerGauges) -> u64);

struct LayerCollector(Arc<Inner>);

impl std::fmt::Debug for LayerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerCollector")
    }
}

impl Collector for LayerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let layers: Vec<(LayerLabels, Arc<dyn LayerGauges>)> = live_layers(&self.0)
            .into_iter()
            .map(|(mp, l)| {
                let labels = LayerLabels {
                    digest: l.digest().to_string(),
                    mountpoint: mp.display().to_string(),
                };
                (labels, l)
            })
            .collect();
        let mounts = ConstGauge::new(layers.len() as i64);
        mounts.encode(encoder.encode_descriptor(
            "mounts",
            "Layers mounted and not yet unmounted",
            None,
            mounts.metric_type(),
        )?)?;
        let gauges: [LayerGauge; 3] = [
            ("layer_size", "Total size of the layer", |l| l.blob_size()),
            (
                "layer_fetched_size",
                "Bytes of the layer that are local (fetched or found in the cache)",
                |l| l.fetched_bytes(),
            ),
            (
                "layer_prefetch_size",
                "Bytes of the layer fetched by prefetch",
                |l| l.prefetched_bytes(),
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Bytes),
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (labels, layer) in &layers {
                let g = ConstGauge::new(value(layer.as_ref()) as i64);
                g.encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}
