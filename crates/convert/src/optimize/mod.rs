//! Optimization: run the image's workload in a sandbox (overlayfs rootfs of the
//! unpacked layers, runc), record the files it reads with fanotify, then convert
//! with each layer's accessed files prioritized in access order.
//!
//! - `rootfs` unpacks layers and mounts the overlay.
//! - `sandbox` generates the runtime bundle and runs runc.
//! - `recorder` watches file accesses.
//! - `tracefs` serves each layer to the overlay through FUSE, noting the byte ranges
//!   read of every file (`record_ranges`).
//! - `record` reads and writes the access record (JSON lines).
//! - `cni` attaches the workload to a CNI network (`--cni`).
//! - `cdi` exposes GPUs described by CDI specs (`--gpus`).

mod cdi;
mod cni;
mod prefetch_list;
mod published;
mod record;
mod recorder;
mod rootfs;
mod sandbox;
mod tracefs;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use registry::{Digest, Manifest, Platform};

use crate::error::{Error, Result};
use crate::{convert, ConvertOptions, ConvertReport, Store};
pub use cni::{
    plugin_dir_or_fallback as cni_plugin_dir_or_fallback,
    DEFAULT_PLUGIN_DIR as DEFAULT_CNI_PLUGIN_DIR,
};
pub use prefetch_list::{glob_match, read_prefetch_list};
pub use published::{prefetch_record, ReadRanges};
pub use record::{read_record, write_record, RecordEntry};
pub use rootfs::unpack_layer;
pub use sandbox::{MountSpec, StopWhen, Workload};
pub use tracefs::{TraceMount, MAX_RANGES_PER_FILE, MAX_READAHEAD};

/// How to optimize an image.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// How to convert (format, levels, platforms...).
    pub convert: ConvertOptions,
    pub workload: Workload,
    pub stop: StopWhen,
    /// `false` converts without running anything.
    pub optimize: bool,
    /// Attach the workload to a CNI network instead of one with only `lo`.
    pub cni: Option<CniOptions>,
    /// GPUs to expose: devices `nvidia.com/gpu=<name>` of the CDI specs, by name
    /// (an index, or `all`).
    pub gpus: Vec<String>,
    /// Prioritize these paths and glob patterns instead of running the workload
    /// (`--prefetch-list`).
    pub prefetch_list: Option<Vec<String>>,
    /// Serve each layer to the workload through a FUSE mount that notes the byte
    /// ranges read of every file ([`OptimizeReport::ranges`]).
    pub record_ranges: bool,
}

/// Where the CNI network configuration and plugins are.
#[derive(Clone, Debug)]
pub struct CniOptions {
    /// The first `.conflist`/`.conf`/`.json` here (lexical order) is the network.
    pub conf_dir: PathBuf,
    pub plugin_dir: PathBuf,
}

/// What an optimization produced.
#[derive(Clone, Debug)]
pub struct OptimizeReport {
    pub convert: ConvertReport,
    /// Accessed files, in first-access order (empty without a run).
    pub record: Vec<RecordEntry>,
    /// What the workload read, for the daemons' learned prefetch of the image written
    /// (see [`prefetch_record`]); `None` without a run.
    pub prefetch_record: Option<remote_layer::prefetch_record::Record>,
    /// Per layer of the image run, bottom first: the byte ranges read of its files
    /// (empty without a run, without `record_ranges`, or without /dev/fuse).
    pub ranges: Vec<LayerRanges>,
}

/// The files read through one source layer, in first-read order, each with the byte
/// ranges the kernel read: sorted, disjoint, merged, kernel readahead included, at
/// most [`MAX_RANGES_PER_FILE`] per file. A file is listed under the layer whose copy
/// was read, which is the topmost layer that has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRanges {
    /// The source layer's digest.
    pub layer: Digest,
    /// Paths relative to the layer's root, without a leading '/'.
    pub files: Vec<(String, Vec<Range<u64>>)>,
}

/// What a run of the workload found.
struct Analysis {
    manifest_digest: Digest,
    layer_digests: Vec<Digest>,
    entries: Vec<RecordEntry>,
    ranges: Vec<LayerRanges>,
}

/// Runs the workload of `src`'s image for this host, then converts `src` into
/// `dst` with the accessed files prioritized.
pub async fn optimize(src: &Store, dst: &Store, opts: &OptimizeOptions) -> Result<OptimizeReport> {
    let host = Platform::host();
    let run = opts.optimize
        && (opts.convert.all_platforms
            || opts.convert.platforms.is_empty()
            || opts.convert.platforms.iter().any(|p| p.matches(&host)));
    if opts.optimize && !run {
        tracing::warn!(%host, "the selected platforms exclude this host's; converting without optimization");
    }
    let mut record = Vec::new();
    let mut ranges = Vec::new();
    let mut layer_digests = Vec::new();
    let mut convert_opts = opts.convert.clone();
    if let Some(list) = &opts.prefetch_list {
        if !opts.optimize {
            return Err(Error::Options(
                "--no-optimize and --prefetch-list cannot be used together".into(),
            ));
        }
        let workdir = opts
            .convert
            .workdir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let (manifest_digest, layer_digests, entries) =
            prefetch_list::record_from_list(src, list, &workdir).await?;
        tracing::info!(manifest = %manifest_digest, files = entries.len(), "prefetch list recorded");
        convert_opts.layer_prioritized = Some(Arc::new(per_layer(&layer_digests, &entries)));
        record = entries;
    } else if run {
        check_prerequisites(opts)?;
        let gpu_edits = if opts.gpus.is_empty() {
            None
        } else {
            Some(cdi::resolve(cdi::GPU_KIND, &opts.gpus, &cdi::spec_dirs())?)
        };
        let a = analyze(src, opts, gpu_edits.as_ref()).await?;
        let per_layer = per_layer(&a.layer_digests, &a.entries);
        tracing::info!(manifest = %a.manifest_digest, files = a.entries.len(), layers = per_layer.len(), "workload recorded");
        if opts.record_ranges {
            let files: usize = a.ranges.iter().map(|l| l.files.len()).sum();
            let bytes: u64 = a
                .ranges
                .iter()
                .flat_map(|l| &l.files)
                .flat_map(|(_, r)| r)
                .map(|r| r.end - r.start)
                .sum();
            tracing::info!(files, bytes, "read ranges recorded");
        }
        convert_opts.layer_prioritized = Some(Arc::new(per_layer));
        record = a.entries;
        ranges = a.ranges;
        layer_digests = a.layer_digests;
    }
    let report = convert(src, dst, &convert_opts).await?;
    // Only a run of the workload says what was read (a prefetch list names files).
    let prefetch_record = (!layer_digests.is_empty())
        .then(|| {
            let read: HashMap<Digest, ReadRanges> = ranges
                .iter()
                .map(|l: &LayerRanges| (l.layer.clone(), l.files.clone()))
                .collect();
            prefetch_record(&report, &layer_digests, &record, &read)
        })
        .flatten();
    Ok(OptimizeReport {
        convert: report,
        record,
        ranges,
        prefetch_record,
    })
}

/// The record's paths per source layer, in first-access order.
fn per_layer(layer_digests: &[Digest], entries: &[RecordEntry]) -> HashMap<Digest, Vec<String>> {
    let mut out: HashMap<Digest, Vec<String>> = HashMap::new();
    for e in entries {
        if let Some(d) = e.layer_index.and_then(|i| layer_digests.get(i)) {
            let list = out.entry(d.clone()).or_default();
            if !list.contains(&e.path) {
                list.push(e.path.clone());
            }
        }
    }
    out
}

fn check_prerequisites(opts: &OptimizeOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    if opts.cni.is_some() && opts.workload.net_host {
        return Err(Error::Options(
            "--cni and --net-host exclude each other".into(),
        ));
    }
    if opts.workload.terminal && !opts.workload.stdin {
        return Err(Error::Options("-t/--terminal needs -i".into()));
    }
    if opts.workload.terminal && matches!(opts.stop, StopWhen::Signal) {
        return Err(Error::Options(
            "--wait-on-signal cannot be used with --terminal".into(),
        ));
    }
    Ok(())
}

/// Runs the workload and returns what it read.
async fn analyze(
    src: &Store,
    opts: &OptimizeOptions,
    gpu_edits: Option<&cdi::ContainerEdits>,
) -> Result<Analysis> {
    let runc = sandbox::find_runc()?;
    let root = src.root().await?;
    let fetched = match root.parse()? {
        Manifest::Image(_) => root,
        Manifest::Index(idx) => {
            let host = Platform::host();
            let desc = idx
                .manifests
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| host.matches(p)))
                .ok_or_else(|| Error::NoPlatform {
                    image: src.describe(),
                    wanted: host.to_string(),
                })?;
            src.manifest(desc).await?
        }
    };
    let manifest = match fetched.parse()? {
        Manifest::Image(m) => *m,
        Manifest::Index(_) => {
            return Err(Error::bad(src.describe(), "an index inside an index"));
        }
    };
    let config_bytes = src.blob_bytes(&manifest.config.digest).await?;
    let config: serde_json::Value = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::bad(format!("config {}", manifest.config.digest), e.to_string()))?;
    let image = sandbox::ImageRunConfig::from_config(&config);

    let workdir = opts
        .convert
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("optimize-")
        .tempdir_in(&workdir)
        .map_err(|e| Error::io(format!("creating a directory in {}", workdir.display()), e))?;
    let base = tmp.path().to_path_buf();

    // Unpack every layer (fetched two at a time) before mounting.
    let mut layer_dirs: Vec<PathBuf> = Vec::new();
    let layer_digests: Vec<Digest> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    for (i, desc) in manifest.layers.iter().enumerate() {
        let dir = base.join("l").join(i.to_string());
        let blob = src.fetch_blob(desc, &base).await?;
        let blob_path = blob.path().to_path_buf();
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            let r = rootfs::unpack_layer(&blob_path, &d);
            drop(blob);
            r
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        layer_dirs.push(dir);
    }

    let bundle = base.join("b");
    let rootfs_dir = bundle.join("rootfs");
    let etc_dir = base.join("etc");
    std::fs::create_dir_all(&etc_dir)
        .map_err(|e| Error::io(format!("creating {}", etc_dir.display()), e))?;
    // Declared before the overlay, so that on every path out of here the overlay
    // stacked on them is unmounted (dropped) first.
    let mut traces: Vec<tracefs::TraceMount> = Vec::new();
    // Without FUSE the run still records which files are read, as it did before
    // ranges were recorded.
    let record_ranges = opts.record_ranges && {
        let fuse = std::path::Path::new("/dev/fuse").exists();
        if !fuse {
            tracing::warn!("/dev/fuse is missing: recording which files are read, not which bytes");
        }
        fuse
    };
    let lowers = if record_ranges {
        let mut lowers = Vec::new();
        for (i, dir) in layer_dirs.iter().enumerate() {
            let (d, m) = (dir.clone(), base.join("t").join(i.to_string()));
            let t = tokio::task::spawn_blocking(move || tracefs::TraceMount::mount(&d, &m))
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
            lowers.push(t.path().to_path_buf());
            traces.push(t);
        }
        lowers
    } else {
        layer_dirs.clone()
    };
    let overlay = rootfs::Overlay::mount(&lowers, &base.join("u"), &base.join("w"), &rootfs_dir)?;
    sandbox::write_etc(&opts.workload, &etc_dir)?;
    let mut spec = sandbox::build_spec(&image, &opts.workload, overlay.path(), &etc_dir)?;
    if let Some(edits) = gpu_edits {
        cdi::apply(edits, &mut spec)?;
    }

    let state_dir = base.join("runc");
    let id = format!(
        "optimize-{}",
        base.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("x")
            .trim_start_matches("optimize-")
    );
    // Declared before the container so that it is dropped (DEL, namespace
    // removed) after the container is deleted, on every path out of here.
    let network = match &opts.cni {
        Some(c) => {
            let (conf_dir, plugin_dir, netns_name) =
                (c.conf_dir.clone(), c.plugin_dir.clone(), id.clone());
            let att = tokio::task::spawn_blocking(move || {
                cni::Attachment::attach(&conf_dir, &plugin_dir, &netns_name)
            })
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
            sandbox::join_netns(&mut spec, att.netns_path())?;
            Some(att)
        }
        None => None,
    };
    spec.save(bundle.join("config.json"))
        .map_err(|e| Error::Sandbox(format!("writing config.json: {e}")))?;
    let recorder = recorder::Recorder::start(overlay.path())?;
    let wait_line = match &opts.stop {
        StopWhen::Line(l) => Some(l.as_str()),
        _ => None,
    };
    let mut container =
        sandbox::Container::start(&runc, &state_dir, &bundle, &id, &opts.workload, wait_line)?;
    let ended = container.run_until(&opts.stop).await;
    let paths = recorder.stop();
    let output = container.output();
    drop(container);
    if let Some(n) = network {
        if let Err(e) = tokio::task::spawn_blocking(move || n.detach())
            .await
            .map_err(|e| Error::Task(e.to_string()))?
        {
            tracing::warn!(error = %e, "detaching the CNI network");
        }
    }
    overlay.unmount()?;
    // Each waits for its FUSE session to end: all at once.
    let finishing: Vec<_> = traces
        .into_iter()
        .map(|t| tokio::task::spawn_blocking(move || t.finish()))
        .collect();
    let mut ranges = Vec::new();
    for (f, layer) in finishing.into_iter().zip(&layer_digests) {
        let files = f.await.map_err(|e| Error::Task(e.to_string()))??;
        ranges.push(LayerRanges {
            layer: layer.clone(),
            files,
        });
    }
    match ended? {
        sandbox::Ended::Exited(status) if !status.success() => {
            return Err(Error::WorkloadFailed {
                status: status.to_string(),
                output,
            });
        }
        _ => {}
    }

    let entries = paths
        .into_iter()
        .filter_map(|p| {
            let layer = rootfs::providing_layer(&layer_dirs, &p)?;
            Some(RecordEntry {
                path: p,
                manifest_digest: Some(fetched.digest.to_string()),
                layer_index: Some(layer),
            })
        })
        .collect();
    Ok(Analysis {
        manifest_digest: fetched.digest.clone(),
        layer_digests,
        entries,
        ranges,
    })
}
