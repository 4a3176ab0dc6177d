//! `ctr-remote image ...`: convert images to eStargz / zstd:chunked between
//! registries and OCI layouts, read a layer's TOC digest, and inspect an image's
//! layers. Other `image` subcommands are handed to `ctr` by the binary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use convert::{ConvertOptions, Location, Store, Target};
use registry::{Digest, Platform};

use crate::common::{client_for, open, parse_platforms, progress_printer};
pub use crate::common::{FormatArgs, RegistryArgs};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Convert an image (registry reference or oci:DIR[:TAG]) into another location.
    Convert(ConvertArgs),
    /// Print the TOC digest of a layer of an image.
    GetTocDigest(GetTocArgs),
    /// Show an image's layers, formats, TOC digests, prioritized files and sizes.
    Inspect(InspectArgs),
    /// Pull an image into containerd, leaving eStargz layers to the remote snapshotter.
    Rpull(RpullArgs),
    /// Run the image's workload, record the files it reads, and convert with them prioritized.
    Optimize(Box<crate::optimize::OptimizeArgs>),
}

/// containerd connection settings given as global flags.
#[derive(Debug, Clone)]
pub struct Containerd {
    pub address: String,
    pub namespace: String,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source: a registry reference or oci:DIR[:TAG].
    pub source: String,
    /// Target: a registry reference or oci:DIR[:TAG].
    pub target: String,
    /// Convert layers to eStargz.
    #[arg(long)]
    pub estargz: bool,
    /// Convert layers to zstd:chunked (implies OCI media types).
    #[arg(long)]
    pub zstdchunked: bool,
    /// Convert compressed layers to uncompressed tars.
    #[arg(long)]
    pub uncompress: bool,
    #[command(flatten)]
    pub format: FormatArgs,
    /// Paths to prioritize: JSON lines {"path": ...} as `optimize --record-out`
    /// writes, or one path per line.
    #[arg(long, value_name = "FILE")]
    pub estargz_record_in: Option<PathBuf>,
    /// Keep layers that already are in the wanted format (same digest).
    #[arg(long)]
    pub reuse: bool,
    /// Platform to convert (os/arch[/variant]); repeatable. Default: this host's.
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// Convert every platform of an index.
    #[arg(long)]
    pub all_platforms: bool,
    /// Layers converted at once.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Directory for temporary blobs (default: the system temp dir).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct GetTocArgs {
    /// The image holding the layer: a registry reference or oci:DIR[:TAG].
    pub image: String,
    /// The layer's digest.
    pub layer: String,
    /// Print the TOC JSON instead of its digest.
    #[arg(long)]
    pub dump_toc: bool,
    /// Accepted for compatibility; the format is detected from the footer.
    #[arg(long)]
    pub zstdchunked: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A registry reference or oci:DIR[:TAG].
    pub image: String,
    /// Only this platform of an index.
    #[arg(long)]
    pub platform: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct RpullArgs {
    /// The image to pull (a registry reference).
    pub reference: String,
    /// Snapshotter to prepare layers with.
    #[arg(long, default_value = "stargz")]
    pub snapshotter: String,
    /// Ask the snapshotter not to verify layer contents.
    #[arg(long)]
    pub skip_content_verify: bool,
    /// Platform to pull (os/arch[/variant]); default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Directory for layers fetched for unpacking (default: the system temp dir).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn run(cmd: ImageCommand, containerd: &Containerd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cmd {
            ImageCommand::Convert(a) => convert_cmd(a).await,
            ImageCommand::GetTocDigest(a) => get_toc_cmd(a).await,
            ImageCommand::Inspect(a) => inspect_cmd(a).await,
            ImageCommand::Rpull(a) => rpull_cmd(a, containerd).await,
            ImageCommand::Optimize(a) => crate::optimize::optimize_cmd(*a).await,
        }
    })
}

async fn convert_cmd(a: ConvertArgs) -> Result<()> {
    let target = match (a.estargz, a.zstdchunked, a.uncompress) {
        (true, true, _) => bail!("--estargz and --zstdchunked exclude each other"),
        (true, _, true) | (_, true, true) => {
            bail!("--uncompress cannot be combined with --estargz or --zstdchunked")
        }
        (true, false, false) => Target::Estargz,
        (false, true, false) => Target::ZstdChunked,
        (false, false, true) => Target::Uncompressed,
        (false, false, false) => Target::Keep,
    };
    if target == Target::Keep && !a.format.oci {
        bail!("no conversion asked for: use --estargz, --zstdchunked, --uncompress or --oci");
    }
    if a.zstdchunked && !a.format.oci {
        tracing::warn!("--zstdchunked writes OCI media types (zstd layers have no Docker type)");
    }
    let mut layer = a.format.layer_options(target)?;
    layer.reuse = a.reuse;
    if let Some(p) = &a.estargz_record_in {
        layer.prioritized_files = crate::blob::read_path_list(p)?;
    }
    let platforms = parse_platforms(&a.platforms)?;

    let src_loc = open(&a.source)?;
    let dst_loc = open(&a.target)?;
    let client = client_for(&a.registry, &[&src_loc, &dst_loc])?;
    let src = Store::open(&src_loc, &client);
    let dst = Store::open(&dst_loc, &client);

    let opts = ConvertOptions {
        layer,
        oci: a.format.oci,
        platforms,
        all_platforms: a.all_platforms,
        jobs: a.jobs.max(1),
        workdir: a.workdir.clone(),
        progress: Some(progress_printer()),
        layer_prioritized: None,
    };
    let report = convert::convert(&src, &dst, &opts)
        .await
        .with_context(|| format!("converting {} to {}", a.source, a.target))?;
    eprintln!(
        "wrote {} ({}, {} manifest(s))",
        dst.describe(),
        report.media_type,
        report.manifests.len()
    );
    println!("{}", report.digest);
    Ok(())
}

async fn get_toc_cmd(a: GetTocArgs) -> Result<()> {
    let loc = open(&a.image)?;
    let layer = Digest::parse(&a.layer).with_context(|| format!("layer digest {:?}", a.layer))?;
    let client = client_for(&a.registry, &[&loc])?;
    let store = Store::open(&loc, &client);
    let toc = convert::get_toc(&store, &layer)
        .await
        .with_context(|| format!("reading the TOC of {layer} in {}", a.image))?;
    if a.dump_toc {
        let v: serde_json::Value =
            serde_json::from_slice(&toc.json).context("the TOC is not JSON")?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", toc.digest);
    }
    Ok(())
}

async fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let loc = open(&a.image)?;
    let platform = a
        .platform
        .as_deref()
        .map(|p| Platform::parse(p).with_context(|| format!("--platform {p}")))
        .transpose()?;
    let client = client_for(&a.registry, &[&loc])?;
    let store = Store::open(&loc, &client);
    let report = convert::inspect(&store, platform.as_ref())
        .await
        .with_context(|| format!("inspecting {}", a.image))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} {} {}",
        report.image, report.media_type, report.digest
    )?;
    for m in &report.manifests {
        writeln!(
            out,
            "manifest {} {}{}",
            m.digest,
            m.media_type,
            m.platform
                .as_ref()
                .map(|p| format!(" platform={p}"))
                .unwrap_or_default()
        )?;
        for l in &m.layers {
            writeln!(
                out,
                "  {} {} size={} format={}{}{}{}{}",
                l.digest,
                l.media_type,
                l.size,
                l.format,
                l.toc_digest
                    .as_ref()
                    .map(|d| format!(" toc={d}"))
                    .unwrap_or_default(),
                l.prioritized_files
                    .map(|n| format!(" prioritized={n}"))
                    .unwrap_or_default(),
                l.uncompressed_size
                    .map(|n| format!(" uncompressed={n}"))
                    .unwrap_or_default(),
                l.error
                    .as_ref()
                    .map(|e| format!(" error={e:?}"))
                    .unwrap_or_default(),
            )?;
        }
    }
    Ok(())
}

async fn rpull_cmd(a: RpullArgs, containerd: &Containerd) -> Result<()> {
    let loc = open(&a.reference)?;
    let Location::Registry(reference) = &loc else {
        bail!("rpull takes a registry reference, not {}", a.reference);
    };
    let platform = match &a.platform {
        Some(p) => Platform::parse(p).with_context(|| format!("--platform {p}"))?,
        None => Platform::host(),
    };
    let client = client_for(&a.registry, &[&loc])?;
    let opts = containerd_pull::RpullOptions {
        address: containerd.address.clone(),
        namespace: containerd.namespace.clone(),
        snapshotter: a.snapshotter.clone(),
        platform,
        skip_content_verify: a.skip_content_verify,
    };
    let workdir = a.workdir.clone().unwrap_or_else(std::env::temp_dir);
    eprintln!("fetching {reference}...");
    let r = containerd_pull::rpull(&client, reference, &opts, &workdir)
        .await
        .with_context(|| format!("pulling {} into containerd", a.reference))?;
    eprintln!(
        "done: {} layer(s) remote, {} unpacked, {} already present; top snapshot {}",
        r.remote, r.unpacked, r.existing, r.chain_id
    );
    println!("{}", r.manifest);
    Ok(())
}
