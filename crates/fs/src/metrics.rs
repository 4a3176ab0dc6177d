//! Prometheus metrics of the layer filesystem: per-layer size and fetch progress, mounts
//! alive, FUSE operation latency and chunk cache hits, behind one cloneable [`FsMetrics`].
//!
//! Names follow the reference daemon's `stargz_fs_` namespace where a metric of the same
//! meaning exists there (`layer_size`, `layer_fetched_size`, `layer_prefetch_size`,
//! `operation_duration_microseconds`). Layer gauges are read from the live layers at scrape
//! time, so they are exact and vanish as soon as a layer is unmounted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
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

/// The metrics of every layer mounted with this handle. Clones share everything; a
/// default handle counts but is exposed nowhere until [`FsMetrics::register`].
#[derive(Clone)]
pub struct FsMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    mounts: Mutex<BTreeMap<PathBuf, Weak<dyn LayerGauges>>>,
    fuse: HistogramFamily,
    /// Requests per operation, in the order of `FUSE_OPS` (histograms do not tell).
    fuse_counts: Arc<[AtomicU64; FUSE_OPS.len()]>,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    cache_disk_bytes: Gauge,
    cache_disk_limit: Gauge,
    cache_evictions: Counter,
}

impl Default for FsMetrics {
    fn default() -> Self {
        FsMetrics {
            inner: Arc::new(Inner {
                mounts: Mutex::default(),
                fuse: HistogramFamily::new_with_constructor(latency_histogram),
                fuse_counts: Arc::default(),
                cache_hits: Family::default(),
                cache_misses: Family::default(),
                cache_disk_bytes: Gauge::default(),
                cache_disk_limit: Gauge::default(),
                cache_evictions: Counter::default(),
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
            "Latency of FUSE operations, by operation type",
            Unit::Other("microseconds".into()),
            self.inner.fuse.clone(),
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
        reg.register_collector(Box::new(LayerCollector(self.inner.clone())));
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

    pub(crate) fn layer_unmounted(&self, mountpoint: &Path) {
        if let Ok(mut m) = self.inner.mounts.lock() {
            m.remove(mountpoint);
        }
    }

    fn live_layers(&self) -> Vec<LiveLayer> {
        live_layers(&self.inner)
    }

    pub(crate) fn fuse_ops(&self) -> FuseOpMetrics {
        FuseOpMetrics {
            histograms: FUSE_OPS.map(|(_, name)| {
                self.inner
                    .fuse
                    .get_or_create(&OpLabels {
                        operation_type: name,
                    })
                    .clone()
            }),
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

/// One histogram per FUSE operation, resolved once per mount so timing costs no lookup.
#[derive(Clone)]
pub(crate) struct FuseOpMetrics {
    histograms: [Histogram; FUSE_OPS.len()],
    counts: Arc<[AtomicU64; FUSE_OPS.len()]>,
}

impl FuseOpMetrics {
    /// A timer that records into `op`'s histogram when dropped (after the reply).
    pub(crate) fn time(&self, op: FuseOp) -> OpTimer {
        let idx = FUSE_OPS.iter().position(|(o, _)| *o == op).unwrap_or(0);
        self.counts[idx].fetch_add(1, Ordering::Relaxed);
        OpTimer {
            histogram: self.histograms[idx].clone(),
            started: Instant::now(),
        }
    }
}

pub(crate) struct OpTimer {
    histogram: Histogram,
    started: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        self.histogram
            .observe(self.started.elapsed().as_secs_f64() * 1e6);
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
