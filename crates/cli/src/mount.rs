//! `ctr-remote layer mount`: serve one layer of an image (or a local eStargz blob)
//! lazily through FUSE at a directory, in the foreground, until Ctrl-C or SIGTERM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fs::{Config, Fetcher, FileFetcher, LayerDesc, RegistryFetcher};
use registry::{Client, Digest, Platform, Reference};
use sha2::{Digest as _, Sha256};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

/// How often the foreground loop checks that the mount is still in place.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  ctr-remote layer mount --plain-http localhost:5000/app:v1 --layer 0 /mnt/l0\n  \
                  ctr-remote layer mount --blob layer.tar.gz /mnt/l0"
)]
pub struct MountArgs {
    /// `REF MOUNTPOINT`, or only `MOUNTPOINT` with --blob.
    #[arg(value_name = "[REF] MOUNTPOINT", num_args = 1..=2, required = true)]
    pub targets: Vec<String>,
    /// Mount a local blob instead of an image's layer.
    #[arg(long, value_name = "FILE", conflicts_with = "layer")]
    pub blob: Option<PathBuf>,
    /// Which layer of REF: its index (0 = bottom) or its digest (a unique prefix will do).
    #[arg(long, value_name = "N|DIGEST")]
    pub layer: Option<String>,
    /// TOC digest to verify against (default: the layer's
    /// containerd.io/snapshot/stargz/toc.digest annotation; for --blob, computed).
    #[arg(long, value_name = "DIGEST")]
    pub toc_digest: Option<String>,
    /// Use plain HTTP for REF's registry (loopback hosts always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASS")]
    pub user: Option<String>,
    /// Platform to pick from an index (os/arch[/variant]; default: this host's).
    #[arg(long)]
    pub platform: Option<String>,
    /// Filesystem configuration (TOML, the snapshotter's key names).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Chunk cache directory (default: a temporary directory removed on exit).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Where the layer comes from, once arguments are checked.
enum Source {
    Blob(PathBuf),
    Image { reference: String, layer: String },
}

pub fn run(args: MountArgs) -> Result<()> {
    let (source, mountpoint) = split_targets(&args)?;
    let cfg = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            Config::from_toml(&text).with_context(|| format!("parsing config {}", p.display()))?
        }
        None => Config::default(),
    };
    // The registry client and RegistryFetcher need a runtime for the whole mount; FUSE
    // and mount() itself stay on plain threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    let (fetcher, desc): (Arc<dyn Fetcher>, LayerDesc) = match &source {
        Source::Blob(path) => blob_source(path, args.toc_digest.clone())?,
        Source::Image { reference, layer } => {
            rt.block_on(image_source(&args, reference, layer, rt.handle()))?
        }
    };

    // Keep the temporary cache alive until after unmount; dropping it removes it.
    let (cache_dir, _tmp_cache) = match &args.cache_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating cache directory {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("stargz-cache-")
                .tempdir()
                .context("creating a temporary cache directory")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let cache = fs::ChunkCache::from_config(&cfg, &cache_dir, None)
        .with_context(|| format!("opening cache {}", cache_dir.display()))?;
    std::fs::create_dir_all(&mountpoint)
        .with_context(|| format!("creating mountpoint {}", mountpoint.display()))?;

    // Take SIGINT/SIGTERM over before mounting, so a Ctrl-C during prefetch still ends
    // in a clean unmount instead of leaving a dead FUSE mount behind.
    let (term, int) = {
        let _in_rt = rt.enter();
        (
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        )
    };
    let size = desc.size;
    let digest = desc.digest.clone();
    let pool = fs::FetchPool::shared().context("starting the fetch threads")?;
    let layer = fs::Layer::open(fetcher, desc, &cfg, cache)
        .with_context(|| format!("opening layer {digest}"))?;
    let opts = fs::MountOptions {
        cfg: &cfg,
        metrics: None,
        pool: &pool,
    };
    let handle = fs::mount(Arc::new(layer), &mountpoint, &opts)
        .with_context(|| format!("mounting layer {digest} at {}", mountpoint.display()))?;
    println!("mounted {digest} at {}", handle.mountpoint().display());
    info!(layer = %digest, cache = %cache_dir.display(), "serving until Ctrl-C or SIGTERM");

    let waited = rt.block_on(wait_for_stop(&handle, term, int));
    let fetched = handle.fetched_bytes();
    let complete = handle.layer().is_complete();
    let unmounted = handle
        .unmount()
        .with_context(|| format!("unmounting {}", mountpoint.display()));
    println!(
        "fetched {fetched} of {size} bytes{}",
        if complete { " (layer complete)" } else { "" }
    );
    waited.and(unmounted)
}

/// Sorts the positional arguments into source and mountpoint.
fn split_targets(args: &MountArgs) -> Result<(Source, PathBuf)> {
    match (&args.blob, args.targets.as_slice()) {
        (Some(blob), [mnt]) => Ok((Source::Blob(blob.clone()), PathBuf::from(mnt))),
        (Some(_), _) => bail!("with --blob give only the MOUNTPOINT"),
        (None, [reference, mnt]) => {
            let layer = args
                .layer
                .clone()
                .context("--layer N|DIGEST is required with an image reference")?;
            Ok((
                Source::Image {
                    reference: reference.clone(),
                    layer,
                },
                PathBuf::from(mnt),
            ))
        }
        (None, _) => bail!("give REF and MOUNTPOINT, or --blob FILE and MOUNTPOINT"),
    }
}

fn blob_source(path: &Path, toc_digest: Option<String>) -> Result<(Arc<dyn Fetcher>, LayerDesc)> {
    let fetcher =
        FileFetcher::open(path).with_context(|| format!("opening blob {}", path.display()))?;
    let size = fetcher.size();
    let digest = file_sha256(path)?;
    let toc_digest = match toc_digest {
        Some(d) => d,
        None => {
            // A digest read from the blob itself only proves the TOC is intact, not
            // that it is the TOC someone published.
            let blob = estargz::FileBlob::open(path)
                .with_context(|| format!("opening blob {}", path.display()))?;
            let raw = estargz::read_toc(&blob, &estargz::OpenOptions::default())
                .with_context(|| format!("reading the TOC of {}", path.display()))?;
            warn!(toc_digest = %raw.digest,
                "no --toc-digest given; trusting the TOC digest computed from the blob");
            raw.digest
        }
    };
    let desc = LayerDesc {
        digest,
        size,
        toc_digest: Some(toc_digest),
        // A local file: its first read costs no round trip.
        toc_tail: None,
    };
    Ok((Arc::new(fetcher), desc))
}

/// `sha256:<hex>` of a file, streamed.
fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

async fn image_source(
    args: &MountArgs,
    reference: &str,
    layer: &str,
    handle: &tokio::runtime::Handle,
) -> Result<(Arc<dyn Fetcher>, LayerDesc)> {
    let r = Reference::parse(reference).with_context(|| format!("parsing {reference:?}"))?;
    let client = client_for(args, &r)?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).with_context(|| format!("parsing platform {p:?}"))?,
        None => Platform::host(),
    };
    let image = client
        .resolve_image(&r, &platform)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let layers = &image.manifest.layers;
    let chosen = match layer.parse::<usize>() {
        Ok(i) => layers.get(i).with_context(|| {
            format!(
                "{reference} has {} layers; --layer {i} is out of range",
                layers.len()
            )
        })?,
        Err(_) => {
            let want = layer.strip_prefix("sha256:").unwrap_or(layer);
            let mut hits = layers.iter().filter(|d| d.digest.hex().starts_with(want));
            match (hits.next(), hits.next()) {
                (Some(d), None) if !want.is_empty() => d,
                (Some(_), Some(_)) => bail!("--layer {layer} matches more than one layer"),
                _ => bail!("{reference} has no layer {layer}"),
            }
        }
    };
    let toc_digest = args.toc_digest.clone().or_else(|| {
        chosen
            .annotations
            .as_ref()
            .and_then(|a| a.get(estargz::TOC_DIGEST_ANNOTATION))
            .cloned()
    });
    if toc_digest.is_none() {
        warn!(layer = %chosen.digest,
            "the layer has no TOC digest annotation; the mount needs allow_no_verification");
    }
    let digest: Digest = chosen.digest.clone();
    info!(layer = %digest, size = chosen.size, media_type = %chosen.media_type, "layer chosen");
    let reader = client.blob_reader(&r, digest.clone(), Some(chosen.size));
    let fetcher = RegistryFetcher::with_size(reader, handle.clone(), chosen.size);
    let desc = LayerDesc {
        digest: digest.to_string(),
        size: chosen.size,
        toc_digest,
        toc_tail: chosen
            .annotations
            .as_ref()
            .and_then(|a| remote_layer::annotation::toc_tail(a, chosen.size)),
    };
    Ok((Arc::new(fetcher), desc))
}

fn client_for(args: &MountArgs, r: &Reference) -> Result<Client> {
    let plain = args.plain_http.then(|| r.registry());
    crate::registry_client(plain, args.user.as_deref())
}

/// Waits for SIGINT/SIGTERM, or returns an error if the mount disappears underneath.
async fn wait_for_stop(handle: &fs::MountHandle, mut term: Signal, mut int: Signal) -> Result<()> {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: unmounting"); return Ok(()); }
            _ = int.recv() => { info!("interrupted: unmounting"); return Ok(()); }
            _ = tick.tick() => {
                // Someone may have unmounted it (fusermount -u); stop instead of idling.
                handle.check().context("the mount went away")?;
            }
        }
    }
}
