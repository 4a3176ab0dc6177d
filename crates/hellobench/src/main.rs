//! `hellobench`: builds the image corpus, runs HelloBench-style samples (pull, create,
//! run until the workload's line) per image and mode over a shaped link, and reports.

mod corpus;
mod env;
mod report;
mod run;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "HelloBench-style container start-up benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

const DEFAULT_IMAGES: &str = "debian,python,node,gcc,golang,java,postgres,redis";

// Parsed once; its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Build (or find cached) the images' OCI layouts.
    Corpus {
        #[arg(long, default_value = "/var/cache/hellobench")]
        cache_dir: PathBuf,
        /// Images to build.
        #[arg(long, value_delimiter = ',', default_value = DEFAULT_IMAGES)]
        images: Vec<String>,
    },
    /// Take the samples and write PROFILE.jsonl, PROFILE-meta.json, PROFILE.md, PROFILE.png.
    Run(RunArgs),
    /// Redraw PROFILE.md and PROFILE.png from a run's records.
    Report {
        #[arg(long, default_value = "docs/benchmarks/hellobench")]
        out: PathBuf,
        #[arg(long, default_value = "wan")]
        profile: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// lan (1 ms, 1 Gbit), wan (20 ms, 100 Mbit) or slow (100 ms, 20 Mbit).
    #[arg(long, default_value = "wan")]
    profile: String,
    #[arg(long, default_value_t = 5)]
    samples: usize,
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_IMAGES)]
    images: Vec<String>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "legacy,legacy-stargz,estargz-noopt,estargz,zstdchunked,ref-estargz-noopt,ref-estargz,reference-converted,ref-reference-converted"
    )]
    modes: Vec<String>,
    /// One busybox image, one sample, lan, the modes that need no reference daemon.
    #[arg(long)]
    smoke: bool,
    #[arg(long, default_value = "/var/cache/hellobench")]
    cache_dir: PathBuf,
    /// Scratch space (wiped before and after).
    #[arg(long, default_value = "/var/tmp/hellobench")]
    work_dir: PathBuf,
    #[arg(long, default_value = "docs/benchmarks/hellobench")]
    out: PathBuf,
    /// Directory holding our containerd-stargz-grpc and ctr-remote.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The reference daemon (reference/build.sh output); its modes are skipped without it.
    #[arg(long)]
    ref_daemon: Option<PathBuf>,
    /// A TOML file whose top-level keys are added to our daemon's configuration.
    #[arg(long)]
    ours_config: Option<PathBuf>,
    /// Debian's ctr-remote (rpull for every lazy mode; the reference's converter).
    #[arg(long, default_value = "/usr/bin/ctr-remote")]
    debian_ctr_remote: PathBuf,
    /// Seconds the optimizers watch the workload.
    #[arg(long, default_value_t = 10)]
    optimize_period: u64,
    /// Longest wait for a workload's line, in seconds.
    #[arg(long, default_value_t = 600)]
    run_timeout: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    match Cli::parse().cmd {
        Cmd::Corpus { cache_dir, images } => {
            for name in images {
                let b = corpus::build(&cache_dir, &corpus::recipe(&name)?)?;
                println!("{} {}", b.name, b.layout.display());
            }
        }
        Cmd::Run(mut a) => {
            if a.smoke {
                a.profile = "lan".into();
                a.samples = 1;
                a.images = vec!["busybox".into()];
                a.modes.retain(|m| {
                    [
                        "legacy",
                        "legacy-stargz",
                        "estargz-noopt",
                        "estargz",
                        "zstdchunked",
                    ]
                    .contains(&m.as_str())
                });
            }
            let ours_daemon = a.bin_dir.join("containerd-stargz-grpc");
            let ours_cli = a.bin_dir.join("ctr-remote");
            for b in [&ours_daemon, &ours_cli] {
                if !b.exists() {
                    bail!(
                        "{} missing (cargo build --release -p stargzd -p cli)",
                        b.display()
                    );
                }
            }
            let opts = run::Options {
                profile: a.profile.clone(),
                samples: a.samples,
                images: a.images,
                modes: a.modes,
                cache_dir: a.cache_dir,
                work_dir: a.work_dir,
                out_dir: a.out.clone(),
                bins: env::Bins {
                    ours_daemon: std::path::absolute(ours_daemon)?,
                    ours_cli: std::path::absolute(ours_cli)?,
                    ref_daemon: a.ref_daemon,
                    ours_extra_config: match &a.ours_config {
                        Some(p) => std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))?,
                        None => String::new(),
                    },
                },
                debian_ctr_remote: a.debian_ctr_remote,
                optimize_period: a.optimize_period,
                run_timeout: Duration::from_secs(a.run_timeout),
            };
            let records = run::run(&opts, &command_line)?;
            let (md, png) = report::report(&a.out, &a.profile)?;
            let bad = records.iter().filter(|r| r.error.is_some()).count();
            println!("{}\n{}", md.display(), png.display());
            if bad > 0 {
                bail!("{bad} sample(s) failed; see {}", md.display());
            }
        }
        Cmd::Report { out, profile } => {
            let (md, png) = report::report(&out, &profile).context("writing the report")?;
            println!("{}\n{}", md.display(), png.display());
        }
    }
    Ok(())
}
