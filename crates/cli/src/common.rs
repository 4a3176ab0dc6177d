//! Flags and helpers every `ctr-remote image` subcommand shares (registry access,
//! layer format flags, the stores a conversion reads and writes, progress and
//! result lines), kept apart so `image` and `optimize` both depend on this module
//! and not on each other.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use convert::{ConvertReport, LayerEvent, LayerOptions, Store, Target};
use registry::{Client, Digest, Platform};

use crate::place::{self, Containerd, Place, PlaceArgs};

/// Registry access shared by the image subcommands (`ctr`'s registry flags).
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    /// Use plain HTTP for the registries named (loopback hosts always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Skip TLS certificate verification of registries.
    #[arg(short = 'k', long)]
    pub skip_verify: bool,
    /// CA bundle (PEM) trusted for registries, on top of the system roots.
    #[arg(long, value_name = "FILE")]
    pub tlscacert: Option<PathBuf>,
    /// Client certificate (PEM) for registries that ask for one (with --tlskey).
    #[arg(long, value_name = "FILE", requires = "tlskey")]
    pub tlscert: Option<PathBuf>,
    /// Key (PEM) of --tlscert.
    #[arg(long, value_name = "FILE", requires = "tlscert")]
    pub tlskey: Option<PathBuf>,
    /// containerd's hosts directory (<dir>/<host>/hosts.toml): mirrors, CAs, headers.
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
    /// Accepted for ctr compatibility and ignored (a warning says so): OAuth refresh
    /// tokens come from the docker config's identitytoken.
    #[arg(long, value_name = "TOKEN", hide = true)]
    pub refresh: Option<String>,
    /// Accepted for ctr compatibility and ignored (use --log-level debug).
    #[arg(long, hide = true)]
    pub http_dump: bool,
    /// Accepted for ctr compatibility and ignored (use --log-level debug).
    #[arg(long, hide = true)]
    pub http_trace: bool,
}

impl RegistryArgs {
    /// The client settings these flags give; warns about the ones ignored.
    pub(crate) fn client_options(&self) -> crate::ClientOptions {
        if self.refresh.is_some() {
            tracing::warn!(
                "--refresh is ignored: refresh tokens come from the docker config (identitytoken)"
            );
        }
        if self.http_dump || self.http_trace {
            tracing::warn!("--http-dump and --http-trace are ignored: use --log-level debug");
        }
        crate::ClientOptions {
            skip_verify: self.skip_verify,
            ca_file: self.tlscacert.clone(),
            client_cert: self.tlscert.clone().zip(self.tlskey.clone()),
            hosts_dir: self.hosts_dir.clone(),
        }
    }
}

/// How converted layers are written, shared by `convert` and `optimize`.
#[derive(Debug, Args, Clone)]
pub struct FormatArgs {
    /// Write OCI media types instead of Docker ones.
    #[arg(long)]
    pub oci: bool,
    /// eStargz gzip level (0-9, default 9).
    #[arg(long)]
    pub estargz_compression_level: Option<i32>,
    /// Largest chunk of a regular file in bytes, eStargz (0: the default, 4 MiB).
    #[arg(long, default_value_t = 0)]
    pub estargz_chunk_size: u64,
    /// Small files share a compressed member until it holds this many bytes (0: off).
    #[arg(long, default_value_t = 0)]
    pub estargz_min_chunk_size: u64,
    /// Compression threads per layer (0: every core). The output does not depend on it.
    #[arg(long, default_value_t = 0)]
    pub estargz_parallelism: usize,
    /// Accepted for compatibility and ignored (a warning says so): layers are
    /// decompressed in-process.
    #[arg(long, visible_alias = "GH", value_name = "HELPER")]
    pub estargz_gzip_helper: Option<String>,
    /// Keep each layer's TOC out of its blob, in a separate image named TARGET's tag
    /// plus "-esgztoc" (push both to the same registry).
    #[arg(long)]
    pub estargz_external_toc: bool,
    /// zstd:chunked compression level (default 3).
    #[arg(long)]
    pub zstdchunked_compression_level: Option<i32>,
}

impl FormatArgs {
    /// The layer options these flags give for `target` (everything else at its default).
    pub(crate) fn layer_options(&self, target: Target) -> Result<LayerOptions> {
        if self.estargz_gzip_helper.is_some() {
            tracing::warn!("--estargz-gzip-helper is ignored: layers are decompressed in-process");
        }
        let gzip_level = match self.estargz_compression_level {
            Some(l) if target == Target::Estargz => {
                u32::try_from(l).ok().filter(|l| *l <= 9).with_context(|| {
                    format!("--estargz-compression-level {l} is not a gzip level (0-9)")
                })?
            }
            _ => 9,
        };
        if target == Target::ZstdChunked && self.estargz_compression_level.is_some() {
            tracing::warn!("--estargz-compression-level does not apply to zstd:chunked; use --zstdchunked-compression-level");
        }
        let zstd_level = self.zstdchunked_compression_level.unwrap_or(3);
        if self.estargz_external_toc && target != Target::Estargz {
            bail!("--estargz-external-toc needs eStargz layers (--estargz, not --zstdchunked)");
        }
        Ok(LayerOptions {
            target,
            gzip_level,
            zstd_level,
            chunk_size: if self.estargz_chunk_size == 0 {
                estargz::DEFAULT_CHUNK_SIZE
            } else {
                self.estargz_chunk_size
            },
            min_chunk_size: self.estargz_min_chunk_size,
            prioritized_files: Vec::new(),
            reuse: false,
            threads: self.estargz_parallelism,
            external_toc: self.estargz_external_toc,
            keep_diff_id: false,
        })
    }
}

/// `--platform` values parsed.
pub(crate) fn parse_platforms(values: &[String]) -> Result<Vec<Platform>> {
    values
        .iter()
        .map(|p| Platform::parse(p).with_context(|| format!("--platform {p}")))
        .collect()
}

/// The registry client for a command: plain HTTP for the registries of `places`
/// when `--plain-http` is given.
pub(crate) fn client_for(
    args: &RegistryArgs,
    user: Option<&str>,
    places: &[&Place],
) -> Result<Client> {
    let hosts: Vec<&str> = places
        .iter()
        .filter_map(|p| p.registry_host())
        .filter(|_| args.plain_http)
        .collect();
    crate::registry_client_with(hosts, user, &args.client_options())
}

/// Prints one line per finished layer on stderr.
pub(crate) fn progress_printer() -> convert::ProgressFn {
    let terminal = std::io::stderr().is_terminal();
    Arc::new(move |e: &LayerEvent| {
        let line = format!(
            "layer {}/{} {} -> {} {} ({} bytes{}, {:.1}s)",
            e.index,
            e.total,
            short(&e.source),
            short(&e.digest),
            e.outcome,
            e.size,
            if e.uploaded {
                ", written"
            } else {
                ", already present"
            },
            e.elapsed.as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        let _ = if terminal {
            writeln!(err, "\r{line}")
        } else {
            writeln!(err, "{line}")
        };
    })
}

fn short(d: &Digest) -> String {
    let s = d.to_string();
    s.chars().take(19).collect()
}

/// Where a conversion reads and writes: the stores and the containerd session, if any.
pub(crate) struct Endpoints {
    pub src: Store,
    pub dst: Store,
    pub session: Option<containerd_pull::ContainerdSession>,
}

impl Endpoints {
    /// Resolves SOURCE and TARGET by the rule of [`crate::place`] and opens them; a
    /// containerd source must exist.
    pub(crate) async fn open(
        source: &str,
        target: &str,
        place: &PlaceArgs,
        registry: &RegistryArgs,
        user: Option<&str>,
        containerd: &Containerd,
    ) -> Result<Endpoints> {
        let src = place::source(source, place.from_registry)?;
        let dst = place::target(target, &src, place.to_registry)?;
        let client = client_for(registry, user, &[&src, &dst])?;
        let (mut stores, session) = place::open_stores(&[&src, &dst], &client, containerd).await?;
        if let (Place::Containerd(name), Some(s)) = (&src, &session) {
            place::require_image(s, name, &containerd.namespace).await?;
        }
        let dst_store = stores.pop().context("no target store")?;
        let src_store = stores.pop().context("no source store")?;
        Ok(Endpoints {
            src: src_store,
            dst: dst_store,
            session,
        })
    }

    /// Ends the containerd lease (what was written is now kept by image records).
    pub(crate) async fn close(self) {
        if let Some(s) = self.session {
            s.close().await;
        }
    }
}

/// Prints what a conversion wrote: the TOC image as the reference does
/// (`extra image: NAME`) and the digest on stdout, a summary on stderr.
pub(crate) fn report(dst: &Store, r: &ConvertReport, extra: &str) {
    eprintln!(
        "wrote {} ({}, {} manifest(s){extra})",
        dst.describe(),
        r.media_type,
        r.manifests.len(),
    );
    if let Some(t) = &r.toc_image {
        println!("extra image: {}", t.name);
    }
    println!("{}", r.digest);
}
