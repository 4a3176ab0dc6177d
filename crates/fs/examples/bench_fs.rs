//! Benchmark of lazily fetched FUSE layers (run by bench/fs/run.sh as root; needs
//! `/dev/fuse`, `ip`, `docker-registry`, `curl`). See docs/benchmarks/fs.md.
//!
//! Subcommands:
//! - `prepare WORK SRC` builds `WORK/layer.blob` (eStargz of the tree at SRC) and
//!   `WORK/small.blob` (100,000 small files).
//! - `mount100k WORK` mounts `small.blob` from local disk and reports mount time and RSS.
//! - `net WORK SERVER_NS SERVER_ADDR RATE_MBIT` runs inside the client namespace of a
//!   shaped link: starts docker-registry in SERVER_NS, then measures cold reads vs curl,
//!   warm sequential throughput and 4 KiB random read latency vs local disk, and the
//!   mount time of the 100k-file layer over the link. With `BENCH_FS_ROWS=cache` it
//!   runs only the rows the chunk cache's bookkeeping can move (curl once, cold reads
//!   from local disk, parallel with background fetch and sequential without, all warm
//!   rows), for A/B runs of two builds (bench/fs/cache-ab.sh).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fs::{ChunkCache, Config, FetchPool, Fetcher, FileFetcher, Layer, LayerDesc, MountHandle};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Parallel readers in the cold-read runs: roughly what a container start issues.
const READERS: usize = 8;
/// A cold-read run that takes longer than this is cut off and reported as partial.
const READ_DEADLINE: Duration = Duration::from_secs(90);
/// Files of at least this size make up the warm throughput and latency set.
const LARGE_FILE: u64 = 4 << 20;
/// 4 KiB reads per latency measurement.
const LAT_SAMPLES: usize = 20_000;
/// 4 KiB reads per first-touch latency measurement (each may go to the daemon).
const FIRST_TOUCH_SAMPLES: usize = 2_000;
/// Repetitions of each cold-read run and of each warm mount.
const REPS: usize = 2;
const WARM_REPS: usize = 3;
const SMALL_FILES: usize = 100_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("prepare") if args.len() == 3 => prepare(Path::new(&args[1]), Path::new(&args[2])),
        Some("mount100k") if args.len() == 2 => mount100k(Path::new(&args[1])),
        Some("net") if args.len() == 5 => match args[4].parse() {
            Ok(rate) => net(Path::new(&args[1]), &args[2], &args[3], rate),
            Err(e) => Err(format!("rate {:?}: {e}", args[4]).into()),
        },
        Some("push-image") if args.len() == 3 => push_image(Path::new(&args[1]), &args[2], "layer"),
        Some("push-image") if args.len() == 4 => push_image(Path::new(&args[1]), &args[2], &args[3]),
        Some("read") if args.len() == 3 => match args[2].parse() {
            Ok(n) => read_cmd(Path::new(&args[1]), n),
            Err(e) => Err(format!("readers {:?}: {e}", args[2]).into()),
        },
        Some("warm") if args.len() == 2 => warm_cmd(Path::new(&args[1])),
        Some("first-read") if args.len() == 2 => first_read_cmd(Path::new(&args[1])),
        Some("first-touch") if args.len() == 2 => first_touch_cmd(Path::new(&args[1])),
        _ => Err("usage: bench_fs prepare WORK SRC | mount100k WORK | \
                  net WORK SERVER_NS SERVER_ADDR RATE_MBIT | push-image WORK HOST:PORT [layer|small] | \
                  read DIR READERS | warm DIR | first-read DIR | first-touch DIR"
            .into()),
    };
    if let Err(e) = res {
        eprintln!("bench_fs: {e}");
        std::process::exit(1);
    }
}

/// What `prepare` wrote next to a blob: the descriptor fields the mount needs.
fn write_desc(path: &Path, out: &estargz::BuildOutput) -> Res<()> {
    let v = serde_json::json!({
        "digest": out.blob_digest,
        "size": out.blob_size,
        "toc_digest": out.toc_digest,
        "uncompressed": out.uncompressed_size,
        "diff_id": out.diff_id,
        "annotations": out.annotations,
    });
    std::fs::write(path, serde_json::to_vec(&v)?)?;
    Ok(())
}

fn read_desc(path: &Path) -> Res<LayerDesc> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(LayerDesc {
        digest: v["digest"].as_str().ok_or("digest")?.to_string(),
        size: v["size"].as_u64().ok_or("size")?,
        toc_digest: v["toc_digest"].as_str().map(str::to_string),
        toc_tail: None,
    })
}

fn build_blob(tar: &std::fs::File, out: &Path) -> Res<estargz::BuildOutput> {
    let f = std::io::BufWriter::new(std::fs::File::create(out)?);
    Ok(estargz::build_from_file(
        tar,
        f,
        &estargz::BuildOptions::default(),
    )?)
}

fn prepare(work: &Path, src: &Path) -> Res<()> {
    std::fs::create_dir_all(work)?;
    if !work.join("layer.json").exists() {
        let t = Instant::now();
        let mut tar = tempfile::tempfile_in(work)?;
        {
            let mut b = tar::Builder::new(std::io::BufWriter::new(&mut tar));
            // Symlinks stay symlinks, as in an image layer.
            b.follow_symlinks(false);
            let name = src.file_name().ok_or("SRC has no name")?;
            append_sorted(&mut b, src, Path::new(name))?;
            b.into_inner()?.flush()?;
        }
        let out = build_blob(&tar, &work.join("layer.blob"))?;
        write_desc(&work.join("layer.json"), &out)?;
        eprintln!(
            "layer: {} files, {} MiB -> {} MiB blob in {:.1}s",
            out.toc.entries.len(),
            out.uncompressed_size >> 20,
            out.blob_size >> 20,
            t.elapsed().as_secs_f64()
        );
    }
    if !work.join("small.json").exists() {
        let t = Instant::now();
        let mut tar = tempfile::tempfile_in(work)?;
        {
            let mut b = tar::Builder::new(std::io::BufWriter::new(&mut tar));
            let mut seed = 1u64;
            for i in 0..SMALL_FILES {
                if i % 100 == 0 {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, format!("d{:04}/", i / 100), std::io::empty())?;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let len = 64 + (seed % 448) as usize;
                let data: Vec<u8> = (0..len).map(|j| (seed >> (j % 56)) as u8).collect();
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(len as u64);
                b.append_data(
                    &mut h,
                    format!("d{:04}/file{:06}.txt", i / 100, i),
                    &data[..],
                )?;
            }
            b.into_inner()?.flush()?;
        }
        let out = build_blob(&tar, &work.join("small.blob"))?;
        write_desc(&work.join("small.json"), &out)?;
        eprintln!(
            "small: {} entries -> {} KiB blob in {:.1}s",
            out.toc.entries.len(),
            out.blob_size >> 10,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Pushes `NAME.blob` (`layer`: the tree, `small`: the 100k-file layer) as the only
/// layer of `HOST/bench/NAME:v1` (OCI, TOC digest annotation), for daemons that pull
/// images rather than blobs.
fn push_image(work: &Path, host: &str, name: &str) -> Res<()> {
    if !matches!(name, "layer" | "small") {
        return Err(format!("unknown layer {name:?}").into());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join(format!("{name}.json")))?)?;
    let diff_id = v["diff_id"]
        .as_str()
        .ok_or("layer.json has no diff_id; re-run prepare")?;
    let annotations: std::collections::BTreeMap<String, String> =
        serde_json::from_value(v["annotations"].clone())?;
    let mut rcfg = registry::RegistryConfig::default();
    rcfg.resolver.host.insert(
        host.to_string(),
        registry::HostConfig {
            self_: Some(registry::MirrorConfig {
                insecure: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let client = registry::Client::new(rcfg, Arc::new(registry::Anonymous))?;
    let r = registry::Reference::parse(&format!("{host}/bench/{name}:v1"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let blob = bytes::Bytes::from(std::fs::read(work.join(format!("{name}.blob")))?);
        let size = blob.len() as u64;
        let opts = registry::PushBlobOptions::default();
        let (layer_digest, _) = client.push_blob(&r, blob, &opts).await?;
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }))?;
        let config_len = config.len() as u64;
        let (config_digest, _) = client
            .push_blob(&r, bytes::Bytes::from(config), &opts)
            .await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest.to_string(), "size": config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest.to_string(), "size": size,
                        "annotations": annotations}],
        });
        client
            .push_manifest_json(&r, "application/vnd.oci.image.manifest.v1+json", &manifest)
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    println!("pushed {host}/bench/{name}:v1");
    Ok(())
}

/// Reads every file under `dir` with `readers` threads (any mount, e.g. another daemon's).
fn read_cmd(dir: &Path, readers: usize) -> Res<()> {
    let t = Instant::now();
    let files = walk(dir)?;
    let (s, bytes, done, errors) = read_all(&files, readers);
    println!(
        "read x{readers}: walk+read {:.2}s (read {s:.2}s), {done}/{} files, {:.1} MiB{}",
        t.elapsed().as_secs_f64(),
        files.len(),
        bytes as f64 / (1 << 20) as f64,
        errors
            .first()
            .map(|e| format!(", error {e}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Sequential throughput of the large files under `dir` (first read and re-read) and
/// 4 KiB read latency, as in the warm part of `net`.
fn warm_cmd(dir: &Path) -> Res<()> {
    let mut files: Vec<(PathBuf, u64)> = walk(dir)?
        .into_iter()
        .filter(|(_, n)| *n >= LARGE_FILE)
        .collect();
    files.sort_by_key(|(_, n)| *n);
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let (s, b, done, _) = read_all(&files, 1);
    let re: Vec<f64> = (0..3)
        .map(|_| {
            let (s, b, ..) = read_all(&files, 1);
            mib_s(b, s)
        })
        .collect();
    let (p50, p99) = latency(&paths, LAT_SAMPLES)?;
    println!(
        "warm: {done} files, first read {:.0} MiB/s, re-read median {:.0} MiB/s [{}], \
         4k p50 {p50:.2}us p99 {p99:.2}us",
        mib_s(b, s),
        median(re.clone()),
        fmt_runs(&re)
    );
    Ok(())
}

/// The large files under `dir` (the warm set), smallest first.
fn large_files(dir: &Path) -> Res<Vec<(PathBuf, u64)>> {
    let mut files: Vec<(PathBuf, u64)> = walk(dir)?
        .into_iter()
        .filter(|(_, n)| *n >= LARGE_FILE)
        .collect();
    files.sort_by_key(|(_, n)| *n);
    Ok(files)
}

/// One sequential read of the warm set: meant for a mount whose page cache was just
/// dropped while the daemon's own cache stays warm.
fn first_read_cmd(dir: &Path) -> Res<()> {
    let files = large_files(dir)?;
    let (s, b, done, _) = read_all(&files, 1);
    println!("first read: {done} files, {:.0} MiB/s", mib_s(b, s));
    Ok(())
}

/// 4 KiB random reads of the warm set that find nothing in the page cache of the mount.
fn first_touch_cmd(dir: &Path) -> Res<()> {
    let paths: Vec<PathBuf> = large_files(dir)?.into_iter().map(|(p, _)| p).collect();
    let (p50, p99) = latency(&paths, FIRST_TOUCH_SAMPLES)?;
    println!("first touch: 4k p50 {p50:.1}us p99 {p99:.1}us ({FIRST_TOUCH_SAMPLES} reads)");
    Ok(())
}

/// (VmRSS, VmHWM) of this process in KiB.
fn rss_kib() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Every regular file under `root` with its size, in the order of [`walk_into`].
fn walk(root: &Path) -> Res<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    walk_into(root, &mut out)?;
    Ok(out)
}

/// Regular files under `dir` depth first in name order: the order `tar` and image
/// builders (a name-sorted walk) store them in, and `cp -r` or `tar c` read them back.
fn walk_into(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Res<()> {
    let mut entries = std::fs::read_dir(dir)?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk_into(&e.path(), out)?;
        } else if ft.is_file() {
            out.push((e.path(), e.metadata()?.len()));
        }
    }
    Ok(())
}

/// Appends `path` as `name` and, for a directory, everything under it depth first in
/// name order, as an image builder's sorted walk would.
fn append_sorted<W: Write>(b: &mut tar::Builder<W>, path: &Path, name: &Path) -> Res<()> {
    b.append_path_with_name(path, name)?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        let mut entries = std::fs::read_dir(path)?.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            append_sorted(b, &e.path(), &name.join(e.file_name()))?;
        }
    }
    Ok(())
}

fn mount_at(
    fetcher: Arc<dyn Fetcher>,
    desc: &LayerDesc,
    mnt: &Path,
    cfg: &Config,
    cache_dir: &Path,
) -> Res<MountHandle> {
    std::fs::create_dir_all(mnt)?;
    let cache = ChunkCache::from_config(cfg, cache_dir, None)?;
    let layer = Layer::open(fetcher, desc.clone(), cfg, cache)?;
    let pool = FetchPool::shared()?;
    let opts = fs::MountOptions {
        cfg,
        metrics: None,
        pool: &pool,
    };
    Ok(fs::mount(Arc::new(layer), mnt, &opts)?)
}

fn mount100k(work: &Path) -> Res<()> {
    let desc = read_desc(&work.join("small.json"))?;
    let tmp = tempfile::tempdir_in(work)?;
    let cfg = Config {
        no_background_fetch: true,
        ..Config::default()
    };
    let before = rss_kib();
    let t = Instant::now();
    let fetcher = Arc::new(FileFetcher::open(work.join("small.blob"))?);
    let h = mount_at(
        fetcher,
        &desc,
        &tmp.path().join("mnt"),
        &cfg,
        &tmp.path().join("cache"),
    )?;
    let mount_s = t.elapsed().as_secs_f64();
    let after_mount = rss_kib();
    let t = Instant::now();
    let files = walk(h.mountpoint())?;
    let walk_s = t.elapsed().as_secs_f64();
    let after_walk = rss_kib();
    h.unmount()?;
    println!(
        "mount100k: files={} mount_s={mount_s:.3} rss_before_kib={} rss_after_mount_kib={} \
         walk_s={walk_s:.3} rss_after_walk_kib={} hwm_kib={}",
        files.len(),
        before.0,
        after_mount.0,
        after_walk.0,
        after_walk.1
    );
    Ok(())
}

/// Reads every file whole with `readers` threads; returns (seconds, bytes, files done).
fn read_all(files: &[(PathBuf, u64)], readers: usize) -> (f64, u64, usize, Vec<String>) {
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let done = AtomicUsize::new(0);
    let errors = std::sync::Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..readers {
            s.spawn(|| {
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    if t.elapsed() > READ_DEADLINE {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((p, _)) = files.get(i) else { return };
                    let r = std::fs::File::open(p).and_then(|mut f| {
                        let mut n = 0u64;
                        loop {
                            let k = f.read(&mut buf)?;
                            if k == 0 {
                                return Ok(n);
                            }
                            n += k as u64;
                        }
                    });
                    match r {
                        Ok(n) => {
                            bytes.fetch_add(n, Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if let Ok(mut v) = errors.lock() {
                                v.push(format!("{}: {e}", p.display()));
                            }
                        }
                    }
                }
            });
        }
    });
    (
        t.elapsed().as_secs_f64(),
        bytes.into_inner(),
        done.into_inner(),
        errors.into_inner().unwrap_or_default(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fmt_runs(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

/// 4 KiB preads at pseudo-random offsets of `files`; returns (p50 µs, p99 µs).
fn latency(files: &[PathBuf], n: usize) -> Res<(f64, f64)> {
    let handles: Vec<(std::fs::File, u64)> = files
        .iter()
        .map(|p| {
            let f = std::fs::File::open(p)?;
            let len = f.metadata()?.len();
            Ok((f, len))
        })
        .collect::<Res<_>>()?;
    let mut buf = [0u8; 4096];
    let mut seed = 99u64;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (f, len) = &handles[(seed % handles.len() as u64) as usize];
        // 4 KiB aligned, like page-sized application reads.
        let off = ((seed >> 8) % (len / 4096).max(1)) * 4096;
        let t = Instant::now();
        f.read_at(&mut buf, off)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok((
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    ))
}

struct Registry {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        // `ip netns exec` execs the registry, so this is the registry's own pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(work: &Path, ns: &str, addr: &str, port: u16) -> Res<Registry> {
    let dir = tempfile::tempdir_in(work)?;
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  \
             filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}:{port}\n",
            dir.path().join("storage").display()
        ),
    )?;
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "docker-registry", "serve"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let reg = Registry { child, _dir: dir };
    let started = Instant::now();
    while std::net::TcpStream::connect((addr, port)).is_err() {
        if started.elapsed() > Duration::from_secs(15) {
            return Err("registry did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(reg)
}

fn net(work: &Path, ns: &str, addr: &str, rate_mbit: u64) -> Res<()> {
    let cache_rows = std::env::var("BENCH_FS_ROWS").is_ok_and(|v| v == "cache");
    let port = 5000;
    let _reg = start_registry(work, ns, addr, port)?;
    let host = format!("{addr}:{port}");
    let base = format!("http://{host}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let desc = read_desc(&work.join("layer.json"))?;
    let small = read_desc(&work.join("small.json"))?;
    let layer_blob = std::fs::read(work.join("layer.blob"))?;
    let small_blob = std::fs::read(work.join("small.blob"))?;
    // Pushing goes through the shaped link too; it is setup, not measured.
    let t = Instant::now();
    rt.block_on(async {
        testenv::push_blob(&base, "bench/layer", &layer_blob).await;
        testenv::push_blob(&base, "bench/layer", &small_blob).await;
    });
    drop((layer_blob, small_blob));
    eprintln!("pushed in {:.1}s", t.elapsed().as_secs_f64());

    let mut rcfg = registry::RegistryConfig::default();
    rcfg.resolver.host.insert(
        host.clone(),
        registry::HostConfig {
            self_: Some(registry::MirrorConfig {
                insecure: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let reference = registry::Reference::parse(&format!("{host}/bench/layer:x"))?;
    // A fresh client per mount so no run starts on another run's warm connections.
    let fetcher_for = |d: &LayerDesc| -> Res<Arc<dyn Fetcher>> {
        let client = registry::Client::new(rcfg.clone(), Arc::new(registry::Anonymous))?;
        let reader = client.blob_reader(
            &reference,
            registry::Digest::parse(&d.digest)?,
            Some(d.size),
        );
        Ok(Arc::new(fs::RegistryFetcher::with_size(
            reader,
            rt.handle().clone(),
            d.size,
        )))
    };
    let link_s = (desc.size * 8) as f64 / (rate_mbit as f64 * 1e6);
    println!(
        "layer blob {} ({:.1} MiB), link transfer time at {rate_mbit} Mbit/s: {link_s:.2}s",
        desc.digest,
        desc.size as f64 / (1 << 20) as f64
    );

    // --- curl over the same link ---
    let mut curl = Vec::new();
    for _ in 0..if cache_rows { 1 } else { 3 } {
        let out = std::process::Command::new("curl")
            .args(["-s", "-f", "-o", "/dev/null", "-w", "%{time_total}"])
            .arg(format!("{base}/v2/bench/layer/blobs/{}", desc.digest))
            .output()?;
        if !out.status.success() {
            return Err("curl failed".into());
        }
        curl.push(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace(',', ".")
                .parse::<f64>()?,
        );
    }
    let curl_s = median(curl.clone());
    println!("curl whole blob: median {curl_s:.2}s [{}]", fmt_runs(&curl));

    // --- (a) cold reads ---
    // The same reads from the blob on local disk: what decompression, verification and
    // FUSE cost without any network, i.e. the floor under the link figures.
    let src_files = {
        let mut runs = Vec::new();
        let mut n = 0;
        for _ in 0..REPS {
            let tmp = tempfile::tempdir_in(work)?;
            let cfg = Config {
                no_background_fetch: true,
                ..Config::default()
            };
            let t = Instant::now();
            let h = mount_at(
                Arc::new(FileFetcher::open(work.join("layer.blob"))?),
                &desc,
                &tmp.path().join("mnt"),
                &cfg,
                &tmp.path().join("cache"),
            )?;
            let files = walk(h.mountpoint())?;
            let (_, bytes, done, _) = read_all(&files, READERS);
            runs.push(t.elapsed().as_secs_f64());
            n = files.len();
            if done < n {
                println!("  local blob read cut off: {done}/{n}");
            }
            h.unmount()?;
            println!(
                "  local blob: {:.1} MiB of files",
                bytes as f64 / (1 << 20) as f64
            );
        }
        println!(
            "cold parallel x8 from the blob on local disk (no network): median {:.2}s [{}]",
            median(runs.clone()),
            fmt_runs(&runs)
        );
        n
    };
    let mut warm_cache: Option<tempfile::TempDir> = None;
    for (name, readers, background, readahead) in [
        ("parallel x8, background fetch on", READERS, true, true),
        ("parallel x8, background fetch off", READERS, false, true),
        ("sequential, background fetch on", 1, true, true),
        ("sequential, background fetch off", 1, false, true),
        (
            "sequential, background fetch and read-ahead off",
            1,
            false,
            false,
        ),
    ] {
        if cache_rows && readers == 1 && (background || !readahead) {
            continue;
        }
        let mut runs = Vec::new();
        for rep in 0..REPS {
            let tmp = tempfile::tempdir_in(work)?;
            let mut cfg = Config {
                no_background_fetch: !background,
                ..Config::default()
            };
            if !readahead {
                cfg.sequential_readahead_kib = 0;
            }
            let t = Instant::now();
            let h = mount_at(
                fetcher_for(&desc)?,
                &desc,
                &tmp.path().join("mnt"),
                &cfg,
                &tmp.path().join("cache"),
            )?;
            let mount_s = t.elapsed().as_secs_f64();
            let files = walk(h.mountpoint())?;
            let (read_s, bytes, done, errors) = read_all(&files, readers);
            let total = t.elapsed().as_secs_f64();
            runs.push(total);
            println!(
                "  cold {name} #{rep}: mount {mount_s:.2}s + read {read_s:.2}s = {total:.2}s, \
                 {done}/{} files, {:.1} MiB, fetched {:.1} MiB{}",
                files.len(),
                bytes as f64 / (1 << 20) as f64,
                h.fetched_bytes() as f64 / (1 << 20) as f64,
                if done < files.len() { " (CUT OFF)" } else { "" }
            );
            for e in errors.iter().take(3) {
                println!("  read error: {e}");
            }
            if files.len() != src_files {
                println!("  file count differs: {} vs {src_files}", files.len());
            }
            if background && warm_cache.is_none() {
                let t = Instant::now();
                while !h.layer().is_complete() && t.elapsed() < Duration::from_secs(120) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                println!(
                    "  layer complete {:.2}s after the reads",
                    t.elapsed().as_secs_f64()
                );
                h.unmount()?;
                warm_cache = Some(tmp);
            } else {
                h.unmount()?;
            }
        }
        let m = median(runs.clone());
        println!(
            "cold {name}: median {m:.2}s [{}], ratio to curl {:.2}, to link time {:.2}",
            fmt_runs(&runs),
            m / curl_s,
            m / link_s
        );
    }
    let warm_cache = warm_cache.ok_or("no warm cache")?;

    // --- (b) and (c): warm throughput and latency against local disk ---
    let local = tempfile::tempdir_in(work)?;
    {
        // The same files on local disk, copied out of the layer; reading them below
        // leaves them in the page cache, like the cache files behind the mount.
        let h = mount_at(
            Arc::new(FileFetcher::open(work.join("layer.blob"))?),
            &desc,
            &local.path().join("mnt"),
            &Config::default(),
            &warm_cache.path().join("cache"),
        )?;
        let big: Vec<(PathBuf, u64)> = walk(h.mountpoint())?
            .into_iter()
            .filter(|(_, n)| *n >= LARGE_FILE)
            .collect();
        for (i, (p, _)) in big.iter().enumerate() {
            std::fs::copy(p, local.path().join(format!("f{i}")))?;
        }
        h.unmount()?;
    }
    let mut local_files: Vec<(PathBuf, u64)> = walk(local.path())?
        .into_iter()
        .filter(|(p, _)| !p.starts_with(local.path().join("mnt")))
        .collect();
    local_files.sort_by_key(|(_, n)| *n);
    let big_bytes: u64 = local_files.iter().map(|(_, n)| n).sum();
    read_all(&local_files, 1);
    let local_runs: Vec<f64> = (0..5)
        .map(|_| {
            let (s, b, ..) = read_all(&local_files, 1);
            mib_s(b, s)
        })
        .collect();
    let local_mibs = median(local_runs.clone());
    let local_paths: Vec<PathBuf> = local_files.iter().map(|(p, _)| p.clone()).collect();
    let (lp50, lp99) = latency(&local_paths, LAT_SAMPLES)?;
    println!(
        "warm set: {} files >= {} MiB, {:.1} MiB",
        local_files.len(),
        LARGE_FILE >> 20,
        big_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "local disk (page cache): seq median {local_mibs:.0} MiB/s [{}], 4k p50 {lp50:.2}us p99 {lp99:.2}us",
        fmt_runs(&local_runs)
    );

    for passthrough in [false, true] {
        let mut cfg = Config::default();
        cfg.fuse.passthrough = passthrough;
        // Fresh mounts, so every first read starts with an empty page cache for the
        // FUSE inodes, sharing one chunk cache as a daemon's mounts do. The first mount
        // is reported on its own: it is the first in this process to load (and hash)
        // the chunks the cold run left on disk, and with passthrough it also builds the
        // whole-file copies.
        let cache = ChunkCache::from_config(&cfg, &warm_cache.path().join("cache"), None)?;
        let pool = FetchPool::shared()?;
        let (mut first, mut again, mut fp50, mut fp99, mut wp50, mut wp99) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for rep in 0..WARM_REPS + 1 {
            let mnt = warm_cache.path().join(format!("m{passthrough}{rep}"));
            std::fs::create_dir_all(&mnt)?;
            let layer = Layer::open(fetcher_for(&desc)?, desc.clone(), &cfg, cache.clone())?;
            let opts = fs::MountOptions {
                cfg: &cfg,
                metrics: None,
                pool: &pool,
            };
            let h = fs::mount(Arc::new(layer), &mnt, &opts)?;
            let mut files: Vec<(PathBuf, u64)> = walk(&mnt)?
                .into_iter()
                .filter(|(_, n)| *n >= LARGE_FILE)
                .collect();
            files.sort_by_key(|(_, n)| *n);
            let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
            if rep % 2 == 1 {
                // Every other mount measures first-touch latency instead: 4 KiB reads
                // that find nothing in the FUSE inode's page cache.
                let (p50, p99) = latency(&paths, FIRST_TOUCH_SAMPLES)?;
                fp50.push(p50);
                fp99.push(p99);
            }
            let (s, b, done, errors) = read_all(&files, 1);
            let re = read_all(&files, 1);
            let (p50, p99) = latency(&paths, LAT_SAMPLES)?;
            println!(
                "  warm passthrough={passthrough} mount #{rep}: first read {:.0} MiB/s, \
                 re-read {:.0} MiB/s, 4k p50 {p50:.2}us p99 {p99:.2}us, passthrough opens {}, \
                 {done} files, net fetched {:.1} MiB{}",
                mib_s(b, s),
                mib_s(re.1, re.0),
                h.passthrough_opens(),
                h.fetched_bytes() as f64 / (1 << 20) as f64,
                errors
                    .first()
                    .map(|e| format!(" error {e}"))
                    .unwrap_or_default()
            );
            h.unmount()?;
            if rep == 0 {
                println!(
                    "warm passthrough={passthrough}, first mount of the process: {:.0} MiB/s",
                    mib_s(b, s)
                );
                continue;
            }
            first.push(mib_s(b, s));
            again.push(mib_s(re.1, re.0));
            wp50.push(p50);
            wp99.push(p99);
        }
        let f = median(first.clone());
        let a = median(again.clone());
        println!(
            "warm passthrough={passthrough}: seq first read median {f:.0} MiB/s [{}] = {:.0}% of local; \
             re-read {a:.0} MiB/s = {:.0}%; 4k warm p50 {:.2}us p99 {:.2}us; \
             4k first touch p50 {:.1}us p99 {:.1}us",
            fmt_runs(&first),
            100.0 * f / local_mibs,
            100.0 * a / local_mibs,
            median(wp50),
            median(wp99),
            median(fp50),
            median(fp99),
        );
    }

    // --- mount time of the 100k-file layer over the link ---
    for _ in 0..if cache_rows { 0 } else { REPS } {
        let tmp = tempfile::tempdir_in(work)?;
        let cfg = Config {
            no_background_fetch: true,
            ..Config::default()
        };
        let t = Instant::now();
        let h = mount_at(
            fetcher_for(&small)?,
            &small,
            &tmp.path().join("mnt"),
            &cfg,
            &tmp.path().join("cache"),
        )?;
        let mount_s = t.elapsed().as_secs_f64();
        println!(
            "100k-file layer over the link: mount {mount_s:.2}s (blob {} KiB, fetched {} KiB)",
            small.size >> 10,
            h.fetched_bytes() >> 10
        );
        h.unmount()?;
    }
    Ok(())
}
