//! A benchmark run: loads every image variant into a registry, moves the registry
//! behind a shaped link, then takes the samples (fresh containerd and daemons each
//! time, modes in random order) and records one JSON line per sample.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::corpus::{self, Built, Workload};
use crate::env::{self, Bins, Proc, Stack};

/// Which image variant a mode pulls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Legacy,
    EstargzNoopt,
    EstargzOpt,
    Zstd,
    RefConverted,
}

impl Variant {
    fn tag(self) -> &'static str {
        match self {
            Variant::Legacy => "legacy",
            Variant::EstargzNoopt => "esgz-noopt",
            Variant::EstargzOpt => "esgz",
            Variant::Zstd => "zstdchunked",
            Variant::RefConverted => "refconv",
        }
    }
}

/// A mode: an image variant on a snapshotter.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub name: &'static str,
    pub variant: Variant,
    pub snapshotter: &'static str,
    /// Run the workload once first on another fresh node, unmeasured, and start the
    /// measured one with only what our daemon learned from it (its `learned/` records).
    pub learned: bool,
}

pub const MODES: &[Mode] = &[
    Mode {
        name: "legacy",
        variant: Variant::Legacy,
        snapshotter: "overlayfs",
        learned: false,
    },
    // The plain gzip image through our snapshotter: its layers are not eStargz, so the
    // daemon pulls them in full (`full_pull`) instead of containerd.
    Mode {
        name: "legacy-stargz",
        variant: Variant::Legacy,
        snapshotter: "stargz",
        learned: false,
    },
    Mode {
        name: "estargz-noopt",
        variant: Variant::EstargzNoopt,
        snapshotter: "stargz",
        learned: false,
    },
    Mode {
        name: "estargz",
        variant: Variant::EstargzOpt,
        snapshotter: "stargz",
        learned: false,
    },
    Mode {
        name: "zstdchunked",
        variant: Variant::Zstd,
        snapshotter: "stargz",
        learned: false,
    },
    Mode {
        name: "ref-estargz-noopt",
        variant: Variant::EstargzNoopt,
        snapshotter: "stargz-ref",
        learned: false,
    },
    Mode {
        name: "ref-estargz",
        variant: Variant::EstargzOpt,
        snapshotter: "stargz-ref",
        learned: false,
    },
    Mode {
        name: "reference-converted",
        variant: Variant::RefConverted,
        snapshotter: "stargz",
        learned: false,
    },
    Mode {
        name: "ref-reference-converted",
        variant: Variant::RefConverted,
        snapshotter: "stargz-ref",
        learned: false,
    },
    Mode {
        name: "estargz-learned",
        variant: Variant::EstargzNoopt,
        snapshotter: "stargz",
        learned: true,
    },
];

pub fn mode(name: &str) -> Result<Mode> {
    MODES
        .iter()
        .find(|m| m.name == name)
        .copied()
        .with_context(|| format!("unknown mode {name:?}"))
}

/// One sample (or one skipped mode).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub image: String,
    pub mode: String,
    pub profile: String,
    pub sample: usize,
    #[serde(default)]
    pub skipped: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub pull_s: f64,
    #[serde(default)]
    pub create_s: f64,
    #[serde(default)]
    pub run_s: f64,
    #[serde(default)]
    pub line_seen: Option<String>,
    /// Bytes the registry side sent over the link from pull start until the line.
    #[serde(default)]
    pub bytes: u64,
    /// Of those, sent during the pull and during the create phase.
    #[serde(default)]
    pub bytes_pull: u64,
    #[serde(default)]
    pub bytes_create: u64,
    #[serde(default)]
    pub rss_ours_kib: Option<u64>,
    #[serde(default)]
    pub rss_ref_kib: Option<u64>,
}

impl Record {
    pub fn total_s(&self) -> f64 {
        self.pull_s + self.create_s + self.run_s
    }
    pub fn ok(&self) -> bool {
        self.skipped.is_none() && self.error.is_none()
    }
}

/// What the physical limit needs per image.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Needed {
    /// Compressed bytes of prioritized files + TOCs + manifest + config.
    pub bytes: u64,
    pub layers: usize,
    /// Which optimized image it came from.
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub command: String,
    pub profile: String,
    pub rtt_ms: u64,
    pub rate_mbit: u64,
    pub samples: usize,
    pub images: Vec<String>,
    pub modes: Vec<String>,
    pub machine: String,
    pub kernel: String,
    pub versions: Vec<String>,
    pub load_start: String,
    pub load_end: String,
    pub started: String,
    pub needed: std::collections::BTreeMap<String, Needed>,
    pub notes: Vec<String>,
}

pub struct Options {
    pub profile: String,
    pub samples: usize,
    pub images: Vec<String>,
    pub modes: Vec<String>,
    pub cache_dir: PathBuf,
    pub work_dir: PathBuf,
    pub out_dir: PathBuf,
    pub bins: Bins,
    pub debian_ctr_remote: PathBuf,
    pub optimize_period: u64,
    pub run_timeout: Duration,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn json_args(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

/// Does our ctr-remote have `image optimize` yet?
pub fn ours_can_optimize(cli: &Path) -> bool {
    Command::new(cli)
        .args(["image", "optimize", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pushes every variant of `img` the modes need into the registry at `reg`; returns
/// the variants that could not be made, with why.
fn load_image(
    opts: &Options,
    prep: &Stack,
    reg: &str,
    img: &Built,
    variants: &[Variant],
    dir: &Path,
) -> Vec<(Variant, String)> {
    let mut failed = Vec::new();
    let src = format!("oci:{}:latest", img.layout.display());
    let dst = |v: Variant| format!("{reg}/{}:{}", img.name, v.tag());
    let cli = opts.bins.ours_cli.display().to_string();
    let wl = &img.workload;
    for &v in variants {
        tracing::info!(image = %img.name, variant = v.tag(), "loading");
        let r: Result<()> = (|| {
            match v {
                Variant::Legacy => {
                    env::run_ok(Command::new("skopeo").args([
                        "copy",
                        "-q",
                        "--dest-tls-verify=false",
                        &src,
                        &format!("docker://{}", dst(v)),
                    ]))?;
                }
                Variant::EstargzNoopt | Variant::Zstd => {
                    let flag = if v == Variant::Zstd {
                        "--zstdchunked"
                    } else {
                        "--estargz"
                    };
                    env::run_ok(Command::new(&cli).args([
                        "image",
                        "convert",
                        flag,
                        "--oci",
                        "--plain-http",
                        &src,
                        &dst(v),
                    ]))?;
                }
                Variant::EstargzOpt => {
                    if !ours_can_optimize(&opts.bins.ours_cli) {
                        bail!("optimize unavailable");
                    }
                    let mut c = Command::new(&cli);
                    c.arg("-a").arg(&prep.sock).args(["-n", env::NAMESPACE]);
                    c.args(["image", "optimize", "--oci", "--plain-http"])
                        .args(["--entrypoint", &json_args(&wl.args[..1])])
                        .args(["--args", &json_args(&wl.args[1..])])
                        .args(["--wait-on-line", &wl.expect])
                        .args(["--period", &opts.optimize_period.to_string()])
                        .arg("--record-out")
                        .arg(dir.join(format!("{}-ours.record", img.name)))
                        .args([&src, &dst(v)]);
                    env::run_ok(&mut c)?;
                }
                Variant::RefConverted => {
                    let deb = opts.debian_ctr_remote.display().to_string();
                    let legacy = dst(Variant::Legacy);
                    env::run_ok(
                        prep.tool(&deb)
                            .args(["images", "pull", "--plain-http", &legacy]),
                    )?;
                    env::run_ok(
                        prep.tool(&deb)
                            .args(["image", "optimize", "--oci"])
                            .args(["--entrypoint", &json_args(&wl.args[..1])])
                            .args(["--args", &json_args(&wl.args[1..])])
                            .args(["--period", &opts.optimize_period.to_string()])
                            .arg("--record-out")
                            .arg(dir.join(format!("{}-ref.record", img.name)))
                            .args([&legacy, &dst(v)]),
                    )?;
                    env::run_ok(prep.ctr().args(["images", "push", "--plain-http", &dst(v)]))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!(image = %img.name, variant = v.tag(), "not available: {e:#}");
            failed.push((v, format!("{e:#}")));
        }
    }
    failed
}

/// Bytes the workload needs from an optimized image: per layer the data before the
/// prefetch landmark plus the TOC and footer; plus manifest and config.
fn needed_bytes(storage: &Path, reg: &str, name: &str, tag: &str) -> Result<Needed> {
    let raw = env::run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reg}/{name}:{tag}"),
    ]))?;
    let m: serde_json::Value = serde_json::from_str(&raw)?;
    let mut bytes = raw.len() as u64 + m["config"]["size"].as_u64().unwrap_or(0);
    let layers = m["layers"].as_array().context("manifest without layers")?;
    for l in layers {
        let d = l["digest"].as_str().context("layer without digest")?;
        let hex = d.trim_start_matches("sha256:");
        let path = storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let blob = estargz::FileBlob::open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let size = estargz::BlobSource::size(&blob);
        let toc = estargz::read_toc(&blob, &Default::default())?;
        let parsed = estargz::Toc::from_json(&toc.json)?;
        let ix = estargz::Index::build(&parsed, toc.range.start)?;
        bytes += ix.prefetch_end.unwrap_or(0) + (size - toc.range.start);
    }
    Ok(Needed {
        bytes,
        layers: layers.len(),
        source: tag.into(),
    })
}

fn sh_out(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    env::run_ok(cmd)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Starts the task and waits for the workload's line on stdout or stderr.
fn run_until_line(
    stack: &Stack,
    id: &str,
    wl: &Workload,
    timeout: Duration,
) -> Result<(f64, String)> {
    let t = Instant::now();
    let mut child = stack
        .ctr()
        .args(["tasks", "start", id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("ctr tasks start")?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().context("stdout")?);
    let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().context("stderr")?);
    for r in [out, err] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    let mut seen = Vec::new();
    let found = loop {
        let left = timeout.saturating_sub(t.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(&wl.expect) {
                    break Some((t.elapsed().as_secs_f64(), line));
                }
                seen.push(line);
            }
            Err(_) => break None,
        }
    };
    if wl.server || found.is_none() {
        let _ = stack
            .ctr()
            .args(["tasks", "kill", "-s", "SIGKILL", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.wait();
    for r in readers {
        let _ = r.join();
    }
    match found {
        Some(f) => Ok(f),
        None => bail!(
            "no line containing {:?} within {timeout:?}; output: {}",
            wl.expect,
            seen[seen.len().saturating_sub(10)..].join(" | ")
        ),
    }
}

/// What one sample runs, and where.
struct SampleSpec<'a> {
    reference: &'a str,
    mode: &'a Mode,
    workload: &'a Workload,
    rpull: &'a Path,
    server_ns: &'a str,
    timeout: Duration,
}

fn sample(stack: &Stack, spec: &SampleSpec, rec: &mut Record) -> Result<()> {
    let SampleSpec {
        reference,
        mode,
        workload: wl,
        rpull,
        server_ns,
        timeout,
    } = *spec;
    let b0 = env::server_tx_bytes(server_ns)?;
    // containerd's own pull for overlayfs; the snapshotter labels (as the CRI sets
    // them) through rpull otherwise.
    rec.pull_s = if mode.snapshotter == "overlayfs" {
        timed(stack.ctr().args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            mode.snapshotter,
            reference,
        ]))?
    } else {
        timed(stack.tool(&rpull.display().to_string()).args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            mode.snapshotter,
            reference,
        ]))?
    };
    let b1 = env::server_tx_bytes(server_ns)?;
    rec.bytes_pull = b1.saturating_sub(b0);
    let id = "hb";
    rec.create_s = timed(
        stack
            .ctr()
            // `--`: ctr would take a workload's `-c` for its own flag.
            .args([
                "containers",
                "create",
                "--snapshotter",
                mode.snapshotter,
                "--",
                reference,
                id,
            ])
            .args(&wl.args),
    )?;
    rec.bytes_create = env::server_tx_bytes(server_ns)?.saturating_sub(b1);
    let (run_s, line) = run_until_line(stack, id, wl, timeout)?;
    rec.run_s = run_s;
    rec.line_seen = Some(line);
    rec.bytes = env::server_tx_bytes(server_ns)?.saturating_sub(b0);
    Ok(())
}

/// The unmeasured first run of a learned mode: on a fresh node, pulls and runs the
/// workload, waits for our daemon to write what the container read (the record is
/// written when the learning window closes), and keeps a copy of those records in
/// `seed` for the measured run.
fn teach(
    opts: &Options,
    bins: &Bins,
    client_ns: &str,
    reg: &str,
    spec: &SampleSpec,
    seed: &Path,
) -> Result<()> {
    let dir = opts.work_dir.join("teach");
    let stack = Stack::start(&dir, bins, Some(client_ns), reg)?;
    let mut scratch = Record {
        image: String::new(),
        mode: String::new(),
        profile: String::new(),
        sample: 0,
        skipped: None,
        error: None,
        pull_s: 0.0,
        create_s: 0.0,
        run_s: 0.0,
        line_seen: None,
        bytes: 0,
        bytes_pull: 0,
        bytes_create: 0,
        rss_ours_kib: None,
        rss_ref_kib: None,
    };
    sample(&stack, spec, &mut scratch).context("the unmeasured first run")?;
    let ran = std::time::Instant::now();
    let learned = dir.join("ours-root").join(env::LEARNED_DIR);
    let has_record = || {
        fs::read_dir(&learned).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    };
    env::wait_until("a learned record", Duration::from_secs(60), has_record)?;
    // Each layer's list is written when its own window closes (the daemon's default
    // `learn_window_sec`, 10 s after that layer's first read), so the first write may
    // hold only the layers read first: wait until every window is over and written.
    let all_written = Duration::from_secs(10 + 3);
    if let Some(left) = all_written.checked_sub(ran.elapsed()) {
        std::thread::sleep(left);
    }
    let _ = fs::remove_dir_all(seed);
    fs::create_dir_all(seed)?;
    for e in fs::read_dir(&learned)? {
        let e = e?;
        fs::copy(e.path(), seed.join(e.file_name()))?;
    }
    drop(stack);
    Ok(())
}

pub fn run(opts: &Options, command_line: &str) -> Result<Vec<Record>> {
    let profile = linkshape::Profile::named(&opts.profile)?;
    let modes: Vec<Mode> = opts.modes.iter().map(|m| mode(m)).collect::<Result<_>>()?;
    let mut notes = Vec::new();
    let mut bins = opts.bins.clone();
    if bins.ref_daemon.as_ref().is_some_and(|p| !p.exists()) {
        notes.push(format!(
            "reference daemon not found at {}: its modes are skipped",
            bins.ref_daemon
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
        bins.ref_daemon = None;
    }
    if !bins.ours_extra_config.trim().is_empty() {
        notes.push(format!(
            "our daemon ran with extra configuration: `{}`",
            bins.ours_extra_config
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    let needs_ref = modes.iter().any(|m| m.snapshotter == "stargz-ref");
    if !needs_ref {
        bins.ref_daemon = None;
    }
    let mut variants: Vec<Variant> = vec![Variant::Legacy];
    for m in &modes {
        if !variants.contains(&m.variant) {
            variants.push(m.variant);
        }
    }
    // The physical limit needs an optimized image even when no mode runs one.
    let want_limit =
        !variants.contains(&Variant::EstargzOpt) && !variants.contains(&Variant::RefConverted);
    if want_limit && ours_can_optimize(&bins.ours_cli) {
        variants.push(Variant::EstargzOpt);
    }

    let mut built = Vec::new();
    for name in &opts.images {
        built.push(corpus::build(&opts.cache_dir, &corpus::recipe(name)?)?);
    }

    let _ = fs::remove_dir_all(&opts.work_dir);
    fs::create_dir_all(&opts.work_dir)?;
    fs::create_dir_all(&opts.out_dir)?;
    let storage = opts.work_dir.join("registry-storage");
    let started = sh_out("date -u +%Y-%m-%dT%H:%M:%SZ");
    let load_start = sh_out("cat /proc/loadavg");

    // Load: a loopback registry and a plain containerd for the converters that need one.
    let mut unavailable: Vec<(String, Variant, String)> = Vec::new();
    let mut needed = std::collections::BTreeMap::new();
    {
        let port = free_port()?;
        let reg = format!("127.0.0.1:{port}");
        let _registry =
            env::start_registry(&opts.work_dir.join("load-registry"), &storage, &reg, None)?;
        let prep_bins = Bins {
            ref_daemon: None,
            ..bins.clone()
        };
        let prep = Stack::start(&opts.work_dir.join("prep"), &prep_bins, None, &reg)?;
        for img in &built {
            for (v, why) in load_image(opts, &prep, &reg, img, &variants, &opts.work_dir) {
                unavailable.push((img.name.clone(), v, why));
            }
            let have = |v: Variant| {
                variants.contains(&v)
                    && !unavailable
                        .iter()
                        .any(|(n, u, _)| n == &img.name && *u == v)
            };
            let src = if have(Variant::EstargzOpt) {
                Some(Variant::EstargzOpt)
            } else if have(Variant::RefConverted) {
                Some(Variant::RefConverted)
            } else {
                None
            };
            if let Some(v) = src {
                match needed_bytes(&storage, &reg, &img.name, v.tag()) {
                    Ok(n) => {
                        needed.insert(img.name.clone(), n);
                    }
                    Err(e) => notes.push(format!("{}: no physical limit: {e:#}", img.name)),
                }
            } else {
                notes.push(format!(
                    "{}: no optimized image, so no physical limit",
                    img.name
                ));
            }
        }
        drop(prep);
    }

    // Per process, so concurrent runs (parallel tests) do not collide.
    let link = linkshape::Link::up(&format!("hb{}", std::process::id()), profile)?;
    let reg = format!("{}:5000", link.server_addr);
    let _registry = env::start_registry(
        &opts.work_dir.join("registry"),
        &storage,
        &reg,
        Some(&link.server_ns),
    )?;

    let results_path = opts.out_dir.join(format!("{}.jsonl", opts.profile));
    let mut results = fs::File::create(&results_path)?;
    let mut records = Vec::new();
    let mut emit = |r: Record, records: &mut Vec<Record>| -> Result<()> {
        writeln!(results, "{}", serde_json::to_string(&r)?)?;
        results.flush()?;
        records.push(r);
        Ok(())
    };
    let mut rng = rand::rng();
    for s in 0..opts.samples {
        for img in &built {
            let mut order = modes.clone();
            order.shuffle(&mut rng);
            for m in order {
                let mut rec = Record {
                    image: img.name.clone(),
                    mode: m.name.into(),
                    profile: opts.profile.clone(),
                    sample: s,
                    skipped: None,
                    error: None,
                    pull_s: 0.0,
                    create_s: 0.0,
                    run_s: 0.0,
                    line_seen: None,
                    bytes: 0,
                    bytes_pull: 0,
                    bytes_create: 0,
                    rss_ours_kib: None,
                    rss_ref_kib: None,
                };
                let skip = if m.snapshotter == "stargz-ref" && bins.ref_daemon.is_none() {
                    Some("reference daemon unavailable".to_string())
                } else {
                    unavailable
                        .iter()
                        .find(|(n, v, _)| n == &img.name && *v == m.variant)
                        .map(|(_, _, why)| why.clone())
                };
                if let Some(why) = skip {
                    if s == 0 {
                        rec.skipped = Some(format!("skipped: {why}"));
                        emit(rec, &mut records)?;
                    }
                    continue;
                }
                tracing::info!(image = %img.name, mode = m.name, sample = s, "sample");
                let dir = opts.work_dir.join("sample");
                let reference = format!("{reg}/{}:{}", img.name, m.variant.tag());
                let spec = SampleSpec {
                    reference: &reference,
                    mode: &m,
                    workload: &img.workload,
                    rpull: &opts.debian_ctr_remote,
                    server_ns: &link.server_ns,
                    timeout: opts.run_timeout,
                };
                let seed = opts.work_dir.join("learned-seed");
                let taught = if m.learned {
                    teach(opts, &bins, &link.client_ns, &reg, &spec, &seed)
                } else {
                    Ok(())
                };
                let stack = Stack::start_seeded(
                    &dir,
                    &bins,
                    Some(&link.client_ns),
                    &reg,
                    m.learned.then_some(seed.as_path()),
                )?;
                let r = taught.and_then(|()| sample(&stack, &spec, &mut rec));
                rec.rss_ours_kib = stack.ours_peak_rss_kib();
                rec.rss_ref_kib = stack.reference.as_ref().and_then(Proc::peak_rss_kib);
                if let Err(e) = r {
                    tracing::warn!(image = %img.name, mode = m.name, "sample failed: {e:#}");
                    rec.error = Some(format!("{e:#}\n{}", stack.logs()));
                }
                if let Some(logs) = std::env::var_os("HELLOBENCH_LOG_DIR") {
                    let to = Path::new(&logs)
                        .join(format!("{}-{}-{}.log", img.name, m.name, rec.sample));
                    let _ = fs::create_dir_all(&logs);
                    let _ = fs::copy(dir.join("ours.log"), &to);
                    let _ = fs::copy(
                        dir.join("ours-root").join("fuse-manager.log"),
                        to.with_extension("manager.log"),
                    );
                }
                drop(stack);
                tracing::info!(
                    image = %img.name, mode = m.name, pull = rec.pull_s, create = rec.create_s,
                    run = rec.run_s, bytes = rec.bytes, "sample done"
                );
                emit(rec, &mut records)?;
            }
        }
    }
    drop(_registry);
    drop(link);

    let versions = vec![
        sh_out("containerd --version"),
        sh_out("runc --version | head -1"),
        sh_out("docker-registry --version"),
        format!(
            "ours: {}",
            sh_out(&format!("{} --version", bins.ours_daemon.display()))
        ),
        format!(
            "reference: {}",
            bins.ref_daemon
                .as_ref()
                .map(|b| sh_out(&format!("{} --version 2>&1", b.display())))
                .unwrap_or_else(|| "not run".into())
        ),
        format!(
            "Debian ctr-remote: {}",
            sh_out("dpkg-query -W -f '${Version}' stargz-snapshotter")
        ),
    ];
    for (n, v, why) in &unavailable {
        notes.push(format!(
            "{n}: variant {} unavailable: {}",
            v.tag(),
            why.lines().next().unwrap_or("")
        ));
    }
    let meta = Meta {
        command: command_line.into(),
        profile: opts.profile.clone(),
        rtt_ms: profile.rtt.as_millis() as u64,
        rate_mbit: profile.rate_mbit,
        samples: opts.samples,
        images: opts.images.clone(),
        modes: opts.modes.clone(),
        machine: format!(
            "{} ({} CPUs, {})",
            sh_out("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'"),
            sh_out("nproc"),
            sh_out("free -g | awk '/Mem:/ {print $2 \" GiB RAM\"}'")
        ),
        kernel: sh_out("uname -srm"),
        versions,
        load_start,
        load_end: sh_out("cat /proc/loadavg"),
        started,
        needed,
        notes,
    };
    fs::write(
        opts.out_dir.join(format!("{}-meta.json", opts.profile)),
        serde_json::to_vec_pretty(&meta)?,
    )?;
    let _ = fs::remove_dir_all(&opts.work_dir);
    Ok(records)
}
