//! `ctr-remote image ...`: convert images to eStargz / zstd:chunked in containerd's
//! image store, between registries and OCI layouts (see [`crate::place`] for which),
//! read a layer's TOC digest, inspect an image's layers and pull lazily. Other
//! `image` subcommands (`pull`, `push`, `ls`...) are handed to `ctr` by the binary.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use convert::{ConvertOptions, Store, Target};
use registry::{Digest, Platform};

use crate::common::{client_for, parse_platforms, progress_printer, report, Endpoints};
pub use crate::common::{FormatArgs, RegistryArgs};
pub use crate::place::Containerd;
use crate::place::{self, Place, PlaceArgs};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Convert an image; SOURCE and TARGET are containerd images, docker://REF or oci:DIR[:TAG].
    Convert(ConvertArgs),
    /// Print the TOC digest of a layer: a blob of containerd's content store, or of an image.
    GetTocDigest(GetTocArgs),
    /// Show an image's layers, formats, TOC digests, prioritized files and sizes.
    Inspect(InspectArgs),
    /// Pull an image into containerd, leaving eStargz layers to the remote snapshotter.
    Rpull(RpullArgs),
    /// Run the image's workload, record the files it reads, and convert with them prioritized.
    Optimize(Box<crate::optimize::OptimizeArgs>),
    /// Publish or fetch an image's learned-prefetch record (an OCI artifact tagged
    /// after the image's manifest digest).
    #[command(subcommand)]
    PrefetchRecord(crate::prefetch_record::PrefetchRecordCommand),
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source: an image in containerd's store, docker://REF or oci:DIR[:TAG].
    pub source: String,
    /// Target: a plain name goes where the source is (containerd's store, else the
    /// registry); docker://REF, containerd://NAME or oci:DIR[:TAG] say where.
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
    /// Paths to prioritize (eStargz): JSON lines {"path": ...} as `optimize --record-out`
    /// writes, or one path per line.
    #[arg(long, value_name = "FILE")]
    pub estargz_record_in: Option<PathBuf>,
    /// With --estargz-external-toc: keep every layer's tar stream as it is (no
    /// landmark, no reordering), so diff IDs do not change.
    #[arg(long)]
    pub estargz_keep_diff_id: bool,
    /// Paths to prioritize (zstd:chunked), same format as --estargz-record-in.
    #[arg(long, value_name = "FILE")]
    pub zstdchunked_record_in: Option<PathBuf>,
    /// Largest chunk of a regular file in bytes, zstd:chunked (0: the default, 4 MiB).
    #[arg(long, default_value_t = 0)]
    pub zstdchunked_chunk_size: u64,
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
    pub place: PlaceArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(short = 'u', long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct GetTocArgs {
    /// With one argument, the digest of a layer blob in containerd's content store (as
    /// the reference). With two, an image (containerd name, docker://REF or
    /// oci:DIR[:TAG]) and the digest of one of its layers.
    #[arg(value_name = "LAYER_DIGEST | IMAGE")]
    pub first: String,
    /// The layer's digest, when the first argument is an image.
    #[arg(value_name = "LAYER_DIGEST")]
    pub layer: Option<String>,
    /// Print the TOC JSON (tab-indented) instead of its digest.
    #[arg(long)]
    pub dump_toc: bool,
    /// Accepted for compatibility; the format is detected from the footer.
    #[arg(long)]
    pub zstdchunked: bool,
    /// A plain IMAGE is a registry reference (same as docker://IMAGE).
    #[arg(long)]
    pub from_registry: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(short = 'u', long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An image in containerd's store, docker://REF or oci:DIR[:TAG].
    pub image: String,
    /// Only this platform of an index.
    #[arg(long)]
    pub platform: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// A plain IMAGE is a registry reference (same as docker://IMAGE).
    #[arg(long)]
    pub from_registry: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(short = 'u', long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct RpullArgs {
    /// The image to pull (a registry reference; docker:// is accepted).
    pub reference: String,
    /// Snapshotter to prepare layers with (empty: stargz).
    #[arg(long, env = "CONTAINERD_SNAPSHOTTER", default_value = "stargz")]
    pub snapshotter: String,
    /// Ask the snapshotter not to verify layer contents.
    #[arg(long)]
    pub skip_content_verify: bool,
    /// Describe layers with containerd's CRI labels (containerd.io/snapshot/cri.*)
    /// instead of the stargz ones.
    #[arg(long)]
    pub use_containerd_labels: bool,
    /// Label of the image record, KEY=VALUE; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Not supported: pulling from IPFS.
    #[arg(long, hide = true)]
    pub ipfs: bool,
    /// Platform to pull (os/arch[/variant]); default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Directory for layers fetched for unpacking (default: the system temp dir).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(short = 'u', long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

pub fn run(cmd: ImageCommand, containerd: &Containerd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cmd {
            ImageCommand::Convert(a) => convert_cmd(a, containerd).await,
            ImageCommand::GetTocDigest(a) => get_toc_cmd(a, containerd).await,
            ImageCommand::Inspect(a) => inspect_cmd(a, containerd).await,
            ImageCommand::Rpull(a) => rpull_cmd(a, containerd).await,
            ImageCommand::Optimize(a) => crate::optimize::optimize_cmd(*a, containerd).await,
            ImageCommand::PrefetchRecord(c) => crate::prefetch_record::run(c).await,
        }
    })
}

async fn convert_cmd(a: ConvertArgs, containerd: &Containerd) -> Result<()> {
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
    if a.estargz && !a.format.oci {
        tracing::warn!("option --estargz should be used in conjunction with --oci");
    }
    if a.estargz_keep_diff_id && !a.format.estargz_external_toc {
        bail!("option --estargz-keep-diff-id must be used with --estargz-external-toc");
    }
    if a.estargz_keep_diff_id && a.estargz_record_in.is_some() {
        bail!("option --estargz-keep-diff-id conflicts with --estargz-record-in");
    }
    if a.format.estargz_external_toc && a.reuse {
        bail!("--estargz-external-toc can't be used with --reuse (every layer's TOC must go to the TOC image)");
    }
    let mut layer = a.format.layer_options(target)?;
    layer.reuse = a.reuse;
    layer.keep_diff_id = a.estargz_keep_diff_id;
    let record_in = match target {
        Target::ZstdChunked => {
            if a.estargz_record_in.is_some() && a.zstdchunked_record_in.is_none() {
                tracing::warn!("--estargz-record-in is read for zstd:chunked as well; the reference reads --zstdchunked-record-in there");
            }
            a.zstdchunked_record_in
                .as_ref()
                .or(a.estargz_record_in.as_ref())
        }
        _ => {
            if a.zstdchunked_record_in.is_some() {
                tracing::warn!("--zstdchunked-record-in is ignored without --zstdchunked");
            }
            a.estargz_record_in.as_ref()
        }
    };
    if let Some(p) = record_in {
        layer.prioritized_files = crate::blob::read_path_list(p)?;
    }
    if target == Target::ZstdChunked && a.zstdchunked_chunk_size != 0 {
        layer.chunk_size = a.zstdchunked_chunk_size;
    }
    let platforms = parse_platforms(&a.platforms)?;

    let ends = Endpoints::open(
        &a.source,
        &a.target,
        &a.place,
        &a.registry,
        a.user.as_deref(),
        containerd,
    )
    .await?;
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
    let result = convert::convert(&ends.src, &ends.dst, &opts)
        .await
        .with_context(|| format!("converting {} to {}", a.source, a.target));
    let dst = ends.dst.clone();
    ends.close().await;
    let r = result?;
    report(&dst, &r, "");
    Ok(())
}

/// A source image's store for the read-only commands.
async fn open_source(
    image: &str,
    from_registry: bool,
    registry: &RegistryArgs,
    user: Option<&str>,
    containerd: &Containerd,
) -> Result<(Store, Option<containerd_pull::ContainerdSession>)> {
    let p = place::source(image, from_registry)?;
    let client = client_for(registry, user, &[&p])?;
    let (mut stores, session) = place::open_stores(&[&p], &client, containerd).await?;
    if let (Place::Containerd(name), Some(s)) = (&p, &session) {
        place::require_image(s, name, &containerd.namespace).await?;
    }
    Ok((stores.pop().context("no store")?, session))
}

/// Prints a TOC as the reference's `--dump-toc` does: indented with tabs.
fn print_toc_json(json: &[u8]) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(json).context("the TOC is not JSON")?;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    serde::Serialize::serialize(&v, &mut ser)?;
    out.push(b'\n');
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}

async fn get_toc_cmd(a: GetTocArgs, containerd: &Containerd) -> Result<()> {
    let Some(layer_arg) = &a.layer else {
        return get_toc_content(&a, containerd).await;
    };
    let layer = Digest::parse(layer_arg).with_context(|| format!("layer digest {layer_arg:?}"))?;
    let (store, session) = open_source(
        &a.first,
        a.from_registry,
        &a.registry,
        a.user.as_deref(),
        containerd,
    )
    .await?;
    let toc = convert::get_toc(&store, &layer)
        .await
        .with_context(|| format!("reading the TOC of {layer} in {}", a.first));
    if let Some(s) = session {
        s.close().await;
    }
    let toc = toc?;
    if a.dump_toc {
        print_toc_json(&toc.json)?;
    } else {
        println!("{}", toc.digest);
    }
    Ok(())
}

/// The reference's form: the layer is a blob of containerd's content store.
async fn get_toc_content(a: &GetTocArgs, containerd: &Containerd) -> Result<()> {
    let digest = Digest::parse(&a.first).with_context(|| {
        format!(
            "{:?} is not a digest (get-toc-digest LAYER_DIGEST reads containerd's content store; \
             get-toc-digest IMAGE LAYER_DIGEST reads an image)",
            a.first
        )
    })?;
    let session =
        containerd_pull::ContainerdSession::connect(&containerd.address, &containerd.namespace)
            .await
            .with_context(|| format!("connecting to containerd at {}", containerd.address))?;
    let result = async {
        let size = session.content_size(&digest).await?.with_context(|| {
            format!(
                "{digest} is not in containerd's content store (namespace {})",
                containerd.namespace
            )
        })?;
        let src = session.content_source(&digest, size)?;
        tokio::task::spawn_blocking(move || {
            let opts = estargz::OpenOptions {
                tail_size: 64 << 10,
                ..Default::default()
            };
            estargz::read_toc(src.as_ref(), &opts)
        })
        .await
        .context("reading the TOC")?
        .map_err(|e| match e {
            estargz::Error::ExternalToc => anyhow::anyhow!(
                "{digest} keeps its TOC in its image's TOC image (external TOC): use \
                 get-toc-digest IMAGE {digest}"
            ),
            e => anyhow::Error::new(e).context(format!("reading the TOC of {digest}")),
        })
    }
    .await;
    session.close().await;
    let raw = result?;
    if a.dump_toc {
        print_toc_json(&raw.json)?;
    } else {
        println!("{}", raw.digest);
    }
    Ok(())
}

async fn inspect_cmd(a: InspectArgs, containerd: &Containerd) -> Result<()> {
    let platform = a
        .platform
        .as_deref()
        .map(|p| Platform::parse(p).with_context(|| format!("--platform {p}")))
        .transpose()?;
    let (store, session) = open_source(
        &a.image,
        a.from_registry,
        &a.registry,
        a.user.as_deref(),
        containerd,
    )
    .await?;
    let report = convert::inspect(&store, platform.as_ref())
        .await
        .with_context(|| format!("inspecting {}", a.image));
    if let Some(s) = session {
        s.close().await;
    }
    let report = report?;
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

/// `--label KEY=VALUE` flags as a map (a bare KEY gets an empty value, as ctr does).
fn parse_labels(labels: &[String]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

async fn rpull_cmd(a: RpullArgs, containerd: &Containerd) -> Result<()> {
    if a.ipfs {
        bail!("--ipfs is not supported: pull from a registry");
    }
    let name = a
        .reference
        .strip_prefix(place::REGISTRY_PREFIX)
        .unwrap_or(&a.reference);
    let reference = registry::Reference::parse(name)
        .with_context(|| format!("rpull takes a registry reference, not {:?}", a.reference))?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p).with_context(|| format!("--platform {p}"))?,
        None => Platform::host(),
    };
    let loc = Place::Registry(reference.clone());
    let client = client_for(&a.registry, a.user.as_deref(), &[&loc])?;
    if a.skip_content_verify {
        tracing::warn!(image = %reference, "content verification disabled");
    }
    let opts = containerd_pull::RpullOptions {
        address: containerd.address.clone(),
        namespace: containerd.namespace.clone(),
        snapshotter: if a.snapshotter.is_empty() {
            "stargz".to_string()
        } else {
            a.snapshotter.clone()
        },
        platform,
        skip_content_verify: a.skip_content_verify,
        containerd_labels: a.use_containerd_labels,
        image_labels: parse_labels(&a.labels),
        prefetch_size: containerd_pull::DEFAULT_PREFETCH_SIZE,
    };
    let workdir = a.workdir.clone().unwrap_or_else(std::env::temp_dir);
    eprintln!("fetching {reference}...");
    let r = containerd_pull::rpull(&client, &reference, &opts, &workdir)
        .await
        .with_context(|| format!("pulling {} into containerd", a.reference))?;
    eprintln!(
        "done: {} layer(s) remote, {} unpacked, {} already present, {} pulled in full by the snapshotter; top snapshot {}",
        r.remote, r.unpacked, r.existing, r.filled, r.chain_id
    );
    println!("{}", r.manifest);
    Ok(())
}
