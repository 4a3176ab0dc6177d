//! `ctr-remote image optimize`: flags compatible with the reference, turned into
//! [`convert::optimize::OptimizeOptions`]; the work happens in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use convert::optimize::{CniOptions, MountSpec, OptimizeOptions, StopWhen, Workload};
use convert::{ConvertOptions, Store, Target};

use crate::common::{parse_platforms, progress_printer, Endpoints, FormatArgs, RegistryArgs};
use crate::place::{Containerd, PlaceArgs};

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    /// Source: an image in containerd's store, docker://REF or oci:DIR[:TAG].
    pub source: String,
    /// Target: a plain name goes where the source is (containerd's store, else the
    /// registry); docker://REF, containerd://NAME or oci:DIR[:TAG] say where.
    pub target: String,
    /// Reuse layers that already are eStargz and that the workload did not read.
    #[arg(long)]
    pub reuse: bool,
    /// Platform to convert (os/arch[/variant]); repeatable. Only this host's is optimized.
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// Convert every platform of an index (only this host's is optimized).
    #[arg(long)]
    pub all_platforms: bool,
    /// Keep the workload running until SIGINT (Ctrl-C) instead of --period.
    #[arg(long)]
    pub wait_on_signal: bool,
    /// Stop recording at the first line the workload prints that contains this text
    /// (stdout or stderr); --period is then ignored, as in the reference.
    #[arg(long, value_name = "LINE")]
    pub wait_on_line: Option<String>,
    /// Convert without running the workload.
    #[arg(long)]
    pub no_optimize: bool,
    /// Prioritize the paths and glob patterns (*, ?, [...], **) listed in FILE, one
    /// per line, instead of running the workload.
    #[arg(long, value_name = "FILE")]
    pub prefetch_list: Option<PathBuf>,
    /// Write the accessed files as JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    pub record_out: Option<PathBuf>,
    /// Do not push the learned-prefetch record (the files and byte ranges the workload
    /// read) beside an optimized image in a registry.
    #[arg(long)]
    pub no_prefetch_record: bool,
    /// Write the learned-prefetch record (JSON, as daemons keep them under learned/)
    /// to this file.
    #[arg(long, value_name = "FILE")]
    pub prefetch_record_out: Option<PathBuf>,
    #[command(flatten)]
    pub format: FormatArgs,
    /// Use zstd:chunked instead of eStargz (needs --oci).
    #[arg(long)]
    pub zstdchunked: bool,
    /// Attach a terminal to the workload (needs -i).
    #[arg(short = 't', long = "terminal")]
    pub terminal: bool,
    /// Attach stdin to the workload.
    #[arg(short = 'i')]
    pub stdin: bool,
    /// Seconds to record file accesses.
    #[arg(long, default_value_t = 10)]
    pub period: u64,
    /// User (and group) to run the workload as: user[:group], names or ids.
    #[arg(long)]
    pub user: Option<String>,
    /// Working directory of the workload.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Arguments replacing the image's Cmd (JSON array).
    #[arg(long, value_name = "JSON")]
    pub args: Option<String>,
    /// Entrypoint replacing the image's (JSON array).
    #[arg(long, value_name = "JSON")]
    pub entrypoint: Option<String>,
    /// Environment variable KEY=VALUE added to or overriding the image's; repeatable.
    #[arg(long)]
    pub env: Vec<String>,
    /// File of KEY=VALUE lines added to the environment.
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Extra mount: type=bind,source=...,destination=...,options=a:b; repeatable.
    #[arg(long)]
    pub mount: Vec<String>,
    /// Comma-separated nameservers for the workload's /etc/resolv.conf.
    #[arg(long, default_value = "8.8.8.8")]
    pub dns_nameservers: String,
    /// Comma-separated search domains for /etc/resolv.conf.
    #[arg(long, default_value = "")]
    pub dns_search_domains: String,
    /// Comma-separated options for /etc/resolv.conf.
    #[arg(long, default_value = "")]
    pub dns_options: String,
    /// Comma-separated host:IP entries for /etc/hosts.
    #[arg(long, default_value = "")]
    pub add_hosts: String,
    /// Attach the workload to a CNI network (interface eth0 in its own network
    /// namespace) configured by the first *.conflist/*.conf/*.json file of
    /// --cni-plugin-conf-dir in lexical order.
    #[arg(long)]
    pub cni: bool,
    /// CNI network configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_plugin_conf_dir: PathBuf,
    /// CNI plugin directory; when the default does not exist, /usr/lib/cni (where
    /// Debian's containernetworking-plugins installs them) is used.
    #[arg(long, default_value = convert::optimize::DEFAULT_CNI_PLUGIN_DIR)]
    pub cni_plugin_dir: PathBuf,
    /// GPUs to expose: comma-separated indices or "all", each the CDI device
    /// nvidia.com/gpu=NAME of a spec in /etc/cdi or /var/run/cdi ($CDI_SPEC_DIRS,
    /// colon-separated, replaces these directories). Without such a spec (no GPU set
    /// up, e.g. by `nvidia-ctk cdi generate`) the command fails saying so.
    #[arg(long, value_name = "INDICES|all")]
    pub gpus: Option<String>,
    /// Share the host's network namespace.
    #[arg(long)]
    pub net_host: bool,
    /// Layers converted at once.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Directory for temporary blobs and the workload's rootfs (default: the system temp dir).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    #[command(flatten)]
    pub place: PlaceArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Registry credentials as user:password (--user names the workload's user here).
    #[arg(long, value_name = "USER:PASS")]
    pub registry_user: Option<String>,
}

/// `--gpus` as CDI device names: "all", or the indices listed.
fn gpu_names(s: &Option<String>) -> Result<Vec<String>> {
    let Some(s) = s.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    if s == "all" {
        return Ok(vec!["all".to_string()]);
    }
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>()
                .map(|n| n.to_string())
                .with_context(|| format!("--gpus {s:?}: {p:?} is neither an index nor \"all\""))
        })
        .collect()
}

fn json_array(flag: &str, s: &Option<String>) -> Result<Option<Vec<String>>> {
    s.as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| {
            serde_json::from_str::<Vec<String>>(s)
                .with_context(|| format!("--{flag} must be a JSON array of strings, got {s:?}"))
        })
        .transpose()
}

fn comma_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

fn workload(a: &OptimizeArgs) -> Result<Workload> {
    let mut env = Vec::new();
    if let Some(f) = &a.env_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading --env-file {}", f.display()))?;
        env.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    env.extend(a.env.iter().cloned());
    let mounts = a
        .mount
        .iter()
        .map(|m| MountSpec::parse(m).with_context(|| format!("--mount {m}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Workload {
        entrypoint: json_array("entrypoint", &a.entrypoint)?,
        args: json_array("args", &a.args)?,
        env,
        user: a.user.clone(),
        cwd: a.cwd.clone(),
        mounts,
        terminal: a.terminal,
        stdin: a.stdin,
        net_host: a.net_host,
        add_hosts: comma_list(&a.add_hosts),
        dns_nameservers: comma_list(&a.dns_nameservers),
        dns_search_domains: comma_list(&a.dns_search_domains),
        dns_options: comma_list(&a.dns_options),
    })
}

pub async fn optimize_cmd(a: OptimizeArgs, containerd: &Containerd) -> Result<()> {
    if a.zstdchunked && !a.format.oci {
        bail!("--zstdchunked must be used with --oci");
    }
    if a.no_optimize && a.prefetch_list.is_some() {
        bail!("--no-optimize and --prefetch-list cannot be used together");
    }
    if a.format.estargz_external_toc && a.reuse {
        bail!("\"estargz-external-toc\" can't be used with \"reuse\" flag");
    }
    let gpus = gpu_names(&a.gpus)?;
    if a.wait_on_signal && a.wait_on_line.is_some() {
        bail!("--wait-on-signal and --wait-on-line exclude each other");
    }
    let target = if a.zstdchunked {
        Target::ZstdChunked
    } else {
        Target::Estargz
    };
    let mut layer = a.format.layer_options(target)?;
    layer.reuse = a.reuse;
    let platforms = parse_platforms(&a.platforms)?;
    let stop = if a.wait_on_signal {
        StopWhen::Signal
    } else if let Some(l) = &a.wait_on_line {
        StopWhen::Line(l.clone())
    } else {
        StopWhen::Period(Duration::from_secs(a.period))
    };
    let workload = workload(&a)?;

    let ends = Endpoints::open(
        &a.source,
        &a.target,
        &a.place,
        &a.registry,
        a.registry_user.as_deref(),
        containerd,
    )
    .await?;
    let result = run(
        &a, &ends.src, &ends.dst, layer, platforms, stop, workload, gpus,
    )
    .await;
    let dst = ends.dst.clone();
    ends.close().await;
    let report = result?;
    if let Some(out) = &a.record_out {
        convert::optimize::write_record(out, &report.record)
            .with_context(|| format!("writing --record-out {}", out.display()))?;
    }
    crate::common::report(
        &dst,
        &report.convert,
        &format!(", {} file(s) prioritized", report.record.len()),
    );
    if let Some(rec) = &report.prefetch_record {
        if let Some(out) = &a.prefetch_record_out {
            std::fs::write(out, rec.to_json())
                .with_context(|| format!("writing --prefetch-record-out {}", out.display()))?;
        }
        if !a.no_prefetch_record {
            publish_record(&dst, rec).await?;
        }
    }
    Ok(())
}

/// Pushes the optimization's learned-prefetch record beside the image it wrote, when
/// that image is in a registry (daemons look it up there on their first pull).
async fn publish_record(dst: &Store, rec: &remote_layer::prefetch_record::Record) -> Result<()> {
    let Some((client, reference)) = dst.as_registry() else {
        return Ok(());
    };
    let img = client
        .resolve_image(reference, &registry::Platform::host())
        .await
        .with_context(|| format!("resolving {reference} to publish its prefetch record"))?;
    if img.digest.to_string() != rec.image {
        bail!(
            "{reference} resolves to {}, not the optimized image {}; prefetch record not pushed",
            img.digest,
            rec.image
        );
    }
    let (target, _) = crate::prefetch_record::publish(client, reference, &img, rec.to_json())
        .await
        .context("pushing the prefetch record")?;
    eprintln!(
        "pushed the prefetch record ({} files, {} with byte ranges) as {target}",
        rec.file_count(),
        rec.ranges.values().map(|r| r.len()).sum::<usize>()
    );
    Ok(())
}

#[allow(
    clippy::too_many_arguments,
    reason = "the pieces of one command, built above"
)]
async fn run(
    a: &OptimizeArgs,
    src: &Store,
    dst: &Store,
    layer: convert::LayerOptions,
    platforms: Vec<registry::Platform>,
    stop: StopWhen,
    workload: Workload,
    gpus: Vec<String>,
) -> Result<convert::optimize::OptimizeReport> {
    let prefetch_list = match &a.prefetch_list {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading --prefetch-list {}", p.display()))?;
            let list = convert::optimize::read_prefetch_list(&text)?;
            if list.is_empty() {
                tracing::warn!("prefetch list is empty");
            }
            Some(list)
        }
        None => None,
    };
    let opts = OptimizeOptions {
        convert: ConvertOptions {
            layer,
            oci: a.format.oci,
            platforms,
            all_platforms: a.all_platforms,
            jobs: a.jobs.max(1),
            workdir: a.workdir.clone(),
            progress: Some(progress_printer()),
            layer_prioritized: None,
        },
        workload,
        stop,
        optimize: !a.no_optimize,
        cni: a.cni.then(|| CniOptions {
            conf_dir: a.cni_plugin_conf_dir.clone(),
            plugin_dir: convert::optimize::cni_plugin_dir_or_fallback(&a.cni_plugin_dir),
        }),
        gpus,
        prefetch_list,
        record_ranges: true,
    };
    // Ctrl-C drops the work in progress, whose guards delete the container,
    // unmount the rootfs and remove temporary files. With --wait-on-signal the
    // first one only ends the recording.
    // SIGTERM (a supervisor or `kill`) cleans up the same way.
    let work = convert::optimize::optimize(src, dst, &opts);
    tokio::pin!(work);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut stops_left = usize::from(a.wait_on_signal);
    let report = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = sigterm.recv() => {
                bail!("terminated; the workload was stopped and its rootfs removed");
            }
            _ = tokio::signal::ctrl_c() => {
                if stops_left == 0 {
                    bail!("interrupted; the workload was stopped and its rootfs removed");
                }
                stops_left -= 1;
            }
        }
    }
    .with_context(|| format!("optimizing {} into {}", a.source, a.target))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_take_indices_or_all() {
        assert_eq!(gpu_names(&Some("all".into())).unwrap(), ["all"]);
        assert_eq!(gpu_names(&Some("0, 2".into())).unwrap(), ["0", "2"]);
        assert!(gpu_names(&None).unwrap().is_empty());
        let err = gpu_names(&Some("0,x".into())).unwrap_err().to_string();
        assert!(err.contains("\"x\""), "{err}");
    }
}
