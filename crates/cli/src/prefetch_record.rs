//! `ctr-remote image prefetch-record push|pull`: publishes a node's learned-prefetch
//! record of an image as an OCI artifact in the image's repository (so other nodes'
//! daemons find it), or fetches one into a daemon's root.
//!
//! The artifact is an OCI image manifest with `artifactType`
//! [`prefetch_record::MEDIA_TYPE`], the empty config, one layer (the record's JSON, same
//! media type) and `subject` the image's manifest; it is tagged
//! `<alg>-<hex>.sgz-prefetch` after the image's manifest digest, because registries
//! without the referrers API cannot list it by subject.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use registry::{Descriptor, Digest, ImageManifest, Platform, PushBlobOptions, Reference};
use remote_layer::prefetch_record::{self, Record, MAX_RECORD_BYTES};

use crate::common::{client_for, RegistryArgs};
use crate::place::{self, Place};

/// The reference daemon's default root, where `learned/` lives.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd-stargz-grpc";
/// The OCI empty descriptor's media type and content, the config of artifacts.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY: &[u8] = b"{}";

#[derive(Debug, Subcommand)]
pub enum PrefetchRecordCommand {
    /// Push this node's learned-prefetch record of IMAGE to IMAGE's repository.
    Push(PushArgs),
    /// Fetch IMAGE's learned-prefetch record from its repository into the daemon's root.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The image (a registry reference; docker:// is accepted).
    pub reference: String,
    /// The snapshotter daemon's root directory (records are under learned/).
    #[arg(long, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Platform of the image's manifest (os/arch[/variant]); default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(short = 'u', long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image (a registry reference; docker:// is accepted).
    pub reference: String,
    /// The snapshotter daemon's root directory (the record goes under learned/).
    #[arg(long, default_value = DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Platform of the image's manifest (os/arch[/variant]); default: this host's.
    #[arg(long)]
    pub platform: Option<String>,
    /// Replace a record the root already has.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(short = 'u', long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

pub async fn run(cmd: PrefetchRecordCommand) -> Result<()> {
    match cmd {
        PrefetchRecordCommand::Push(a) => push(a).await,
        PrefetchRecordCommand::Pull(a) => pull(a).await,
    }
}

fn reference_of(s: &str) -> Result<Reference> {
    let name = s.strip_prefix(place::REGISTRY_PREFIX).unwrap_or(s);
    Reference::parse(name).with_context(|| format!("{s:?} is not a registry reference"))
}

fn platform_of(p: &Option<String>) -> Result<Platform> {
    match p {
        Some(p) => Platform::parse(p).with_context(|| format!("--platform {p}")),
        None => Ok(Platform::host()),
    }
}

fn record_path(root: &Path, image: &Digest) -> PathBuf {
    root.join("learned")
        .join(prefetch_record::file_name_for(image))
}

async fn push(a: PushArgs) -> Result<()> {
    let reference = reference_of(&a.reference)?;
    let platform = platform_of(&a.platform)?;
    let client = client_for(
        &a.registry,
        a.user.as_deref(),
        &[&Place::Registry(reference.clone())],
    )?;
    let img = client
        .resolve_image(&reference, &platform)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let path = record_path(&a.root, &img.digest);
    let meta = std::fs::metadata(&path).with_context(|| {
        format!(
            "no learned-prefetch record of {reference} ({}) at {}",
            img.digest,
            path.display()
        )
    })?;
    if meta.len() > MAX_RECORD_BYTES {
        bail!(
            "{} is {} bytes, over {MAX_RECORD_BYTES}",
            path.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let rec = Record::parse(&bytes, &img.digest)
        .with_context(|| format!("checking {}", path.display()))?;
    let (target, digest) = publish(&client, &reference, &img, bytes).await?;
    eprintln!(
        "pushed the learned-prefetch record of {} ({} layers, {} files) as {target}",
        img.digest,
        rec.layers.len(),
        rec.file_count()
    );
    println!("{digest}");
    Ok(())
}

/// Pushes `record` (a record's JSON, checked by the caller) as the artifact about
/// `img` in `reference`'s repository, tagged after `img`'s digest; returns the tag's
/// reference and the artifact manifest's digest.
pub async fn publish(
    client: &registry::Client,
    reference: &Reference,
    img: &registry::ResolvedImage,
    record: Vec<u8>,
) -> Result<(Reference, Digest)> {
    let bytes = record;
    let opts = PushBlobOptions::default();
    client
        .push_blob(reference, Bytes::from_static(EMPTY), &opts)
        .await
        .context("pushing the empty config")?;
    let (layer_digest, _) = client
        .push_blob(reference, Bytes::from(bytes.clone()), &opts)
        .await
        .context("pushing the record")?;
    let subject = Descriptor {
        media_type: img
            .manifest
            .media_type
            .clone()
            .unwrap_or_else(|| registry::OCI_MANIFEST.to_string()),
        ..Descriptor::for_bytes(registry::OCI_MANIFEST, &img.raw)
    };
    let mut layer = Descriptor::for_bytes(prefetch_record::MEDIA_TYPE, &bytes);
    layer.digest = layer_digest;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(registry::OCI_MANIFEST.to_string()),
        config: Descriptor::for_bytes(EMPTY_MEDIA_TYPE, EMPTY),
        layers: vec![layer],
        annotations: None,
        subject: Some(subject),
        artifact_type: Some(prefetch_record::MEDIA_TYPE.to_string()),
    };
    let tag = prefetch_record::tag_for(&img.digest);
    let target = reference.at_tag(&tag)?;
    let (digest, _) = client
        .push_manifest_json(&target, registry::OCI_MANIFEST, &manifest)
        .await
        .with_context(|| format!("pushing {target}"))?;
    Ok((target, digest))
}

async fn pull(a: PullArgs) -> Result<()> {
    let reference = reference_of(&a.reference)?;
    let platform = platform_of(&a.platform)?;
    let client = client_for(
        &a.registry,
        a.user.as_deref(),
        &[&Place::Registry(reference.clone())],
    )?;
    let img = client
        .resolve_image(&reference, &platform)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let path = record_path(&a.root, &img.digest);
    if path.exists() && !a.force {
        bail!(
            "{} exists (this node has its own record); --force replaces it",
            path.display()
        );
    }
    let target = reference.at_tag(&prefetch_record::tag_for(&img.digest))?;
    let fetched = client
        .get_manifest(&target)
        .await
        .with_context(|| format!("fetching {target}"))?;
    let registry::Manifest::Image(m) = fetched.parse()? else {
        bail!("{target} is an index, not a learned-prefetch record");
    };
    if m.artifact_type.as_deref() != Some(prefetch_record::MEDIA_TYPE) {
        bail!("{target} has artifactType {:?}", m.artifact_type);
    }
    if m.subject.as_ref().map(|s| &s.digest) != Some(&img.digest) {
        bail!("{target} is not about {}", img.digest);
    }
    let layer = m
        .layers
        .iter()
        .find(|l| l.media_type == prefetch_record::MEDIA_TYPE)
        .with_context(|| format!("{target} has no record layer"))?;
    if layer.size > MAX_RECORD_BYTES {
        bail!(
            "record of {target} is {} bytes, over {MAX_RECORD_BYTES}",
            layer.size
        );
    }
    let bytes = client
        .blob_reader(&target, layer.digest.clone(), Some(layer.size))
        .read_all()
        .await
        .with_context(|| format!("fetching the record of {target}"))?;
    let rec = Record::parse(&bytes, &img.digest).with_context(|| format!("checking {target}"))?;
    let dir = a.root.join("learned");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".pull.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&rec.to_json())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    eprintln!(
        "stored the learned-prefetch record of {} ({} files) at {}",
        img.digest,
        rec.file_count(),
        path.display()
    );
    Ok(())
}
