//! Flags and helpers every `ctr-remote image` subcommand shares (registry access,
//! layer format flags, image locations, progress lines), kept apart so `image`
//! and `optimize` both depend on this module and not on each other.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use convert::{LayerEvent, LayerOptions, Location, Target};
use registry::{Client, Digest, Platform};

/// Registry access shared by the image subcommands.
#[derive(Debug, Args, Clone)]
pub struct RegistryArgs {
    /// Use plain HTTP for the registries named (loopback hosts always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry credentials as user:password (otherwise ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASS")]
    pub user: Option<String>,
}

/// How converted layers are written, shared by `convert` and `optimize`.
#[derive(Debug, Args, Clone)]
pub struct FormatArgs {
    /// Write OCI media types instead of Docker ones.
    #[arg(long)]
    pub oci: bool,
    /// Compression level (gzip 0-9, default 9; with --zstdchunked a zstd level, default 3).
    #[arg(long)]
    pub estargz_compression_level: Option<i32>,
    /// Largest chunk of a regular file in bytes (0: the default, 4 MiB).
    #[arg(long, default_value_t = 0)]
    pub estargz_chunk_size: u64,
    /// Small files share a compressed member until it holds this many bytes (0: off).
    #[arg(long, default_value_t = 0)]
    pub estargz_min_chunk_size: u64,
}

impl FormatArgs {
    /// The layer options these flags give for `target` (everything else at its default).
    pub(crate) fn layer_options(&self, target: Target) -> Result<LayerOptions> {
        let gzip_level = match self.estargz_compression_level {
            Some(l) if target == Target::Estargz => {
                u32::try_from(l).ok().filter(|l| *l <= 9).with_context(|| {
                    format!("--estargz-compression-level {l} is not a gzip level (0-9)")
                })?
            }
            _ => 9,
        };
        let zstd_level = match self.estargz_compression_level {
            Some(l) if target == Target::ZstdChunked => l,
            _ => 3,
        };
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
            threads: 0,
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

pub(crate) fn client_for(args: &RegistryArgs, locations: &[&Location]) -> Result<Client> {
    let hosts: Vec<String> = locations
        .iter()
        .filter_map(|l| match l {
            Location::Registry(r) if args.plain_http => Some(r.registry().to_string()),
            _ => None,
        })
        .collect();
    crate::registry_client(hosts.iter().map(String::as_str), args.user.as_deref())
}

pub(crate) fn open(s: &str) -> Result<Location> {
    Location::parse(s).with_context(|| format!("parsing image location {s:?}"))
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
