//! Start-up benchmark of opening layers over a shaped link (run by bench/fs/startup.sh as
//! root; needs `ip`, `docker-registry`). See docs/benchmarks/fs.md, "Start-up".
//!
//! What a container start waits for before its first read: every layer of the image
//! opened (footer and TOC fetched, checked, indexed) and its prioritized files
//! prefetched, all layers at once as the daemon does at the first Prepare.
//!
//! Subcommands:
//! - `prepare WORK` builds four eStargz layers shaped like an optimized interpreter
//!   image (sizes 30, 20, 12 and 3 MiB of file data, 2 MiB, 1.5 MiB, 512 KiB and
//!   256 KiB of it prioritized) into `WORK/lN.blob` with `WORK/lN.json`.
//! - `run WORK SERVER_NS SERVER_ADDR RATE_MBIT RTT_MS ROUNDS [LAYERS...]` runs inside the
//!   client namespace of a shaped link: starts docker-registry in SERVER_NS, pushes the
//!   layers, then, for an image of the first LAYERS layers (each number given; all four
//!   by default), ROUNDS times opens and prefetches all of them with a fresh registry client
//!   (new connections) and an empty cache in each way below, taking turns:
//!   - `before`: a HEAD per blob first, no speculative head, a 512 KiB first read at
//!     the blob's end (how it was done);
//!   - `no HEAD`: the size from the manifest, no speculative head;
//!   - no HEAD, a 1 MiB head for a layer without the `prefetch-end` annotation;
//!   - no HEAD, the whole head the `prefetch-end` annotation names;
//!   - no HEAD, that head up to `speculative_head_kib`, a 512 KiB first read at the end;
//!   - no HEAD, that head up to `speculative_head_kib`, a first read at the end of the
//!     `toc-tail` annotation's size (what the daemon does; every way but `before` and
//!     the previous one reads the end so).
//! - `split SERVER_NS SERVER_ADDR RATE_MBIT RTT_MS ROUNDS [MIB...]` (client namespace of
//!   a shaped link): whether a large prefetch range comes in sooner as K parallel
//!   ranged requests than as one. Pushes a blob, then for each prefetch range of MIB
//!   MiB (4, 16, 64 by default) takes turns of K = 1, 2, 4 with a fresh registry client
//!   each: first the two reads an open makes at once (the 512 KiB tail with the TOC,
//!   the 1 MiB speculative head), then `1 MiB..MIB MiB` cut into K ranges fetched at
//!   once; reports the time to the last byte and the TCP connections left open. With
//!   `SPLIT_COLD=1` the open's reads are left out: the prefetch starts on no connection.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a panic is a failed run"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fs::{ChunkCache, Config, FetchPool, Layer, LayerDesc};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// (MiB of file data, KiB of it prioritized) per layer.
const LAYERS: [(u64, u64); 4] = [(30, 2048), (20, 1536), (12, 512), (3, 256)];
const FILE: usize = 128 << 10;

struct Shape {
    rate_mbit: u64,
    rtt_ms: u64,
    rounds: usize,
}

fn main() {
    if let Err(e) = main_res() {
        eprintln!("bench_startup: {e}");
        std::process::exit(1);
    }
}

fn main_res() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("prepare") if args.len() == 2 => prepare(Path::new(&args[1])),
        Some("run") if args.len() >= 7 => {
            let shape = Shape {
                rate_mbit: args[4].parse().map_err(|_| "RATE_MBIT")?,
                rtt_ms: args[5].parse().map_err(|_| "RTT_MS")?,
                rounds: args[6].parse().map_err(|_| "ROUNDS")?,
            };
            let images: Res<Vec<usize>> = args[7..]
                .iter()
                .map(|n| Ok(n.parse::<usize>()?.clamp(1, LAYERS.len())))
                .collect();
            images.and_then(|mut images| {
                if images.is_empty() {
                    images.push(LAYERS.len());
                }
                run(Path::new(&args[1]), &args[2], &args[3], &shape, &images)
            })
        }
        Some("split") if args.len() >= 6 => {
            let shape = Shape {
                rate_mbit: args[3].parse().map_err(|_| "RATE_MBIT")?,
                rtt_ms: args[4].parse().map_err(|_| "RTT_MS")?,
                rounds: args[5].parse().map_err(|_| "ROUNDS")?,
            };
            let sizes: Res<Vec<u64>> = args[6..]
                .iter()
                .map(|n| Ok(n.parse::<u64>()?.clamp(2, 256)))
                .collect();
            sizes.and_then(|mut sizes| {
                if sizes.is_empty() {
                    sizes = vec![4, 16, 64];
                }
                split(&args[1], &args[2], &shape, &sizes)
            })
        }
        _ => Err("usage: bench_startup prepare WORK | \
                  run WORK SERVER_NS SERVER_ADDR RATE_MBIT RTT_MS ROUNDS [LAYERS...] | \
                  split SERVER_NS SERVER_ADDR RATE_MBIT RTT_MS ROUNDS [MIB...]"
            .into()),
    };
    res
}

/// Bytes that compress about 2:1, like binaries and libraries do.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        v.extend_from_slice(&b[..4]);
        v.extend_from_slice(&[b[4] & 0x0f; 4]);
    }
    v.truncate(len);
    v
}

fn prepare(work: &Path) -> Res<()> {
    std::fs::create_dir_all(work)?;
    for (n, (mib, prio_kib)) in LAYERS.iter().enumerate() {
        let files = (mib << 20) as usize / FILE;
        let prio = (prio_kib << 10) as usize / FILE;
        let mut b = tar::Builder::new(Vec::new());
        let mut prioritized = Vec::new();
        for i in 0..files {
            let name = format!("l{n}/dir{}/file{i}", i % 16);
            let mut h = tar::Header::new_gnu();
            h.set_size(FILE as u64);
            h.set_mode(0o755);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append_data(&mut h, &name, &content(FILE, (n * 100_000 + i) as u64)[..])?;
            // Every seventh file, as a workload's files are spread over the layer.
            if i % 7 == 3 && prioritized.len() < prio {
                prioritized.push(name);
            }
        }
        let tar = b.into_inner()?;
        let mut blob = Vec::new();
        let opts = estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 6 },
            prioritized_files: prioritized,
            ..Default::default()
        };
        let out = estargz::build(&tar[..], &mut blob, &opts)?;
        std::fs::write(work.join(format!("l{n}.blob")), &blob)?;
        let v = serde_json::json!({
            "digest": out.blob_digest,
            "size": out.blob_size,
            "toc_digest": out.toc_digest,
            "annotations": out.annotations,
        });
        std::fs::write(work.join(format!("l{n}.json")), serde_json::to_vec(&v)?)?;
        println!(
            "l{n}: blob {:.1} MiB, prefetch-end {} KiB",
            out.blob_size as f64 / 1048576.0,
            out.annotations[estargz::PREFETCH_END_ANNOTATION]
                .parse::<u64>()
                .unwrap_or(0)
                >> 10
        );
    }
    Ok(())
}

struct Registry {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
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

struct Pushed {
    desc: LayerDesc,
    hint: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Before,
    NoHead,
    Fixed,
    Hinted,
    Capped,
    /// Capped, with the default 512 KiB first read instead of the `toc-tail` one.
    CappedUntailed,
}

const WAYS: [(Way, &str); 6] = [
    (Way::Before, "before (HEAD, no head, 512 KiB tail)"),
    (Way::NoHead, "no HEAD, no head"),
    (Way::Fixed, "no HEAD, 1 MiB head without hint"),
    (Way::Hinted, "no HEAD, whole hinted head"),
    (
        Way::CappedUntailed,
        "no HEAD, hinted head up to 1 MiB, 512 KiB tail",
    ),
    (
        Way::Capped,
        "no HEAD, hinted head up to 1 MiB, toc-tail (default)",
    ),
];

/// Opens and prefetches every layer at once; returns when all are ready.
fn round(
    rt: &tokio::runtime::Runtime,
    rcfg: &registry::RegistryConfig,
    reference: &registry::Reference,
    layers: &[Pushed],
    way: Way,
) -> Res<Duration> {
    let client = registry::Client::new(rcfg.clone(), Arc::new(registry::Anonymous))?;
    let cfg = Config {
        no_background_fetch: true,
        ..Config::default()
    };
    let pool = FetchPool::shared()?;
    let started = Instant::now();
    std::thread::scope(|s| -> Res<()> {
        let mut opening = Vec::new();
        for l in layers {
            let (client, cfg, pool) = (&client, &cfg, &pool);
            opening.push(s.spawn(move || -> Res<()> {
                let known = (way != Way::Before).then_some(l.desc.size);
                let reader =
                    client.blob_reader(reference, registry::Digest::parse(&l.desc.digest)?, known);
                let fetcher = Arc::new(fs::RegistryFetcher::with_size(
                    reader,
                    rt.handle().clone(),
                    l.desc.size,
                ));
                let head = match way {
                    Way::Before | Way::NoHead => 0,
                    Way::Fixed => 1 << 20,
                    Way::Hinted => l.hint,
                    Way::Capped | Way::CappedUntailed => fs::speculative_head(cfg, Some(l.hint)),
                };
                let cache = Arc::new(ChunkCache::memory(256 << 20));
                let mut desc = l.desc.clone();
                if matches!(way, Way::Before | Way::CappedUntailed) {
                    desc.toc_tail = None;
                }
                let layer = Arc::new(Layer::open_with_head(fetcher, desc, cfg, cache, head)?);
                layer.start_prefetch(pool);
                if !layer.wait_prefetch(Duration::from_secs(60)) {
                    return Err("prefetch did not finish".into());
                }
                Ok(())
            }));
        }
        for o in opening {
            o.join().map_err(|_| "open panicked")??;
        }
        Ok(())
    })?;
    Ok(started.elapsed())
}

fn run(work: &Path, ns: &str, addr: &str, shape: &Shape, images: &[usize]) -> Res<()> {
    let port = 5000;
    let _reg = start_registry(work, ns, addr, port)?;
    let host = format!("{addr}:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut layers = Vec::new();
    for n in 0..LAYERS.len() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.join(format!("l{n}.json")))?)?;
        let blob = std::fs::read(work.join(format!("l{n}.blob")))?;
        rt.block_on(testenv::push_blob(
            &format!("http://{host}"),
            "bench/startup",
            &blob,
        ));
        layers.push(Pushed {
            desc: LayerDesc {
                digest: v["digest"].as_str().ok_or("digest")?.to_string(),
                size: v["size"].as_u64().ok_or("size")?,
                toc_digest: v["toc_digest"].as_str().map(str::to_string),
                // As the daemon takes it from the descriptor.
                toc_tail: v["annotations"][estargz::TOC_TAIL_ANNOTATION]
                    .as_str()
                    .and_then(|t| t.parse().ok()),
            },
            hint: v["annotations"][estargz::PREFETCH_END_ANNOTATION]
                .as_str()
                .ok_or("hint")?
                .parse()?,
        });
    }
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
    let reference = registry::Reference::parse(&format!("{host}/bench/startup:x"))?;
    for &n in images {
        image(&rt, &rcfg, &reference, &layers[..n], shape)?;
    }
    Ok(())
}

/// Measures the ways in turns for an image of `layers`.
fn image(
    rt: &tokio::runtime::Runtime,
    rcfg: &registry::RegistryConfig,
    reference: &registry::Reference,
    layers: &[Pushed],
    shape: &Shape,
) -> Res<()> {
    // The floor: every needed byte (tails and prioritized files) at the link's rate,
    // plus one round trip to ask for them.
    let needed: u64 = layers
        .iter()
        .map(|l| l.hint + fs::tail_read(l.desc.toc_tail, l.desc.size))
        .sum();
    let floor = needed as f64 * 8.0 / (shape.rate_mbit as f64 * 1e6) + shape.rtt_ms as f64 / 1000.0;
    println!(
        "\n{} layer(s), {:.1} MiB of blobs; tails + prioritized files {:.2} MiB; link {} Mbit/s, {} ms: floor {:.3} s",
        layers.len(),
        layers.iter().map(|l| l.desc.size).sum::<u64>() as f64 / 1048576.0,
        needed as f64 / 1048576.0,
        shape.rate_mbit,
        shape.rtt_ms,
        floor
    );
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); WAYS.len()];
    // One warm-up round of each, not counted (first connections, page cache).
    for r in 0..shape.rounds + 1 {
        for (i, (way, _)) in WAYS.iter().enumerate() {
            let t = round(rt, rcfg, reference, layers, *way)?.as_secs_f64();
            if r > 0 {
                times[i].push(t);
            }
        }
    }
    println!("| way | median s | runs s | × floor |");
    println!("|---|---|---|---|");
    for (i, (_, name)) in WAYS.iter().enumerate() {
        let mut v = times[i].clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v[v.len() / 2];
        let runs: Vec<String> = times[i].iter().map(|t| format!("{t:.3}")).collect();
        println!(
            "| {name} | {med:.3} | {} | {:.2} |",
            runs.join(", "),
            med / floor
        );
    }
    Ok(())
}

/// Established TCP connections of this network namespace to `addr:port`.
fn connections_to(addr: &str, port: u16) -> usize {
    let Ok(ip) = addr.parse::<std::net::Ipv4Addr>() else {
        return 0;
    };
    // /proc/net/tcp writes the address as the little-endian u32 in hex.
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}

/// Reads `ranges` of `reader` all at once, one request each; returns the bytes read.
async fn read_parallel(
    reader: &Arc<registry::BlobReader>,
    ranges: &[std::ops::Range<u64>],
) -> Res<u64> {
    let mut tasks = Vec::new();
    for r in ranges {
        let (reader, r) = (reader.clone(), r.clone());
        tasks.push(tokio::spawn(async move {
            let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let n2 = n.clone();
            let sink: registry::RangeSink = Arc::new(move |_, piece| {
                n2.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
            });
            reader.read_range_streaming(r, sink).await?;
            Ok::<u64, registry::Error>(n.load(std::sync::atomic::Ordering::Relaxed))
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

/// `range` cut into `k` contiguous parts of (nearly) equal length.
fn tile(range: std::ops::Range<u64>, k: u64) -> Vec<std::ops::Range<u64>> {
    let len = range.end - range.start;
    (0..k)
        .map(|i| range.start + len * i / k..range.start + len * (i + 1) / k)
        .collect()
}

fn split(ns: &str, addr: &str, shape: &Shape, sizes: &[u64]) -> Res<()> {
    const HEAD: u64 = 1 << 20;
    const TAIL: u64 = fs::layer::TAIL_READ;
    let work = tempfile::tempdir_in("/var/tmp")?;
    let port = 5000;
    let _reg = start_registry(work.path(), ns, addr, port)?;
    let host = format!("{addr}:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let max = sizes.iter().copied().max().unwrap_or(4) << 20;
    let blob = content((max + HEAD + TAIL) as usize, 7);
    let size = blob.len() as u64;
    let digest = rt.block_on(testenv::push_blob(
        &format!("http://{host}"),
        "bench/split",
        &blob,
    ));
    drop(blob);
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
    let reference = registry::Reference::parse(&format!("{host}/bench/split:x"))?;
    let ks = [1u64, 2, 4];
    let cold = std::env::var("SPLIT_COLD").is_ok_and(|v| v == "1");
    let first = if cold { 0 } else { HEAD };
    println!(
        "link {} Mbit/s, {} ms; time from the open's first request to the prefetch's last byte \
         (prefetch part alone in brackets), medians of {} rounds{}",
        shape.rate_mbit,
        shape.rtt_ms,
        shape.rounds,
        if cold {
            "; cold: no open reads first"
        } else {
            ""
        }
    );
    println!("| prefetch range | K | median s (prefetch s) | runs s | connections after |");
    println!("|---|---|---|---|---|");
    for &mib in sizes {
        let end = mib << 20;
        let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ks.len()];
        let mut conns = vec![0usize; ks.len()];
        // One warm-up round, not counted.
        for r in 0..shape.rounds + 1 {
            for (i, &k) in ks.iter().enumerate() {
                let client = registry::Client::new(rcfg.clone(), Arc::new(registry::Anonymous))?;
                let reader = Arc::new(client.blob_reader(
                    &reference,
                    registry::Digest::parse(&digest)?,
                    Some(size),
                ));
                let t0 = Instant::now();
                let (opened, got) = rt.block_on(async {
                    if !cold {
                        read_parallel(&reader, &[size - TAIL..size, 0..HEAD]).await?;
                    }
                    let opened = t0.elapsed();
                    let got = read_parallel(&reader, &tile(first..end, k)).await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((opened, got))
                })?;
                let total = t0.elapsed();
                if got != end - first {
                    return Err(format!("read {got} bytes of {}", end - first).into());
                }
                if r > 0 {
                    times[i].push((total.as_secs_f64(), (total - opened).as_secs_f64()));
                    conns[i] = connections_to(addr, port);
                }
            }
        }
        for (i, &k) in ks.iter().enumerate() {
            let mut v = times[i].clone();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (med, pre) = v[v.len() / 2];
            let runs: Vec<String> = times[i].iter().map(|t| format!("{:.3}", t.0)).collect();
            println!(
                "| {mib} MiB | {k} | {med:.3} ({pre:.3}) | {} | {} |",
                runs.join(", "),
                conns[i]
            );
        }
    }
    Ok(())
}
