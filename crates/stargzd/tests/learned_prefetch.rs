//! Learned prefetch end to end through a real containerd 1.6, docker-registry and FUSE:
//! a workload's first reads are recorded per image, fetched in one batch per layer on
//! the next pull (before any container runs), published as an OCI artifact with our
//! `ctr-remote` and picked up from the registry by a daemon with an empty root; broken
//! records are ignored.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, require, sha, stop, wait_for};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "learn";

fn prerequisites() -> bool {
    require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/ctr-remote",
            "/usr/sbin/runc",
            "/usr/bin/containerd-shim-runc-v2",
            "/bin/busybox",
            "/usr/bin/docker-registry",
            "/dev/fuse",
        ],
        "containerd runc docker-registry busybox-static stargz-snapshotter fuse3",
    )
}

/// Our daemon (layers mounted in its own process) and a containerd using it, in a
/// scratch directory; stopped and unmounted on drop.
struct Env {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    daemon: Option<Child>,
    containerd: Option<Child>,
    snap_sock: PathBuf,
    root: PathBuf,
    sock: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            for id in self.ctr(&["task", "ls", "-q"]).unwrap_or_default().lines() {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id.trim()]);
                let _ = self.ctr(&["task", "rm", "-f", id.trim()]);
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        // A FUSE manager outlives its daemon by design.
        let pid = std::fs::read_to_string(self.root.join("fuse-manager.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("stargz-fuse-manager")
                && cmdline.contains(&*self.root.to_string_lossy())
            {
                // SAFETY: kill(2) on the manager this test's daemon started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        detach_mounts(&self.dir);
    }
}

/// Recording for 3 s; no prefetch, background fetch or read-ahead, so what is fetched
/// is what the workload read or the learned prefetch asked for.
const CONFIG: &str = "noprefetch = true\nno_background_fetch = true\n\
sequential_readahead_kib = 0\nlearn_window_sec = 3\n";

impl Env {
    /// Layers mounted in the daemon's process.
    fn start() -> Env {
        Env::start_with("[fuse_manager]\nenable = false\n")
    }

    /// With `extra` config.
    fn start_with(extra: &str) -> Env {
        Env::start_config(&format!("{CONFIG}{extra}"))
    }

    /// With the whole config `config`.
    fn start_config(config: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-learn-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("stargz.toml"), config).unwrap();
        let mut env = Env {
            snap_sock: dir.join("run/stargz.sock"),
            root: dir.join("stargz-root"),
            sock: dir.join("containerd.sock"),
            dir,
            _tmp: tmp,
            daemon: None,
            containerd: None,
        };
        env.start_daemon();
        env.start_containerd();
        env
    }

    fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stargz.log"))
            .unwrap();
        let _ = std::fs::remove_file(&self.snap_sock);
        let daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
            .arg("--address")
            .arg(&self.snap_sock)
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(self.dir.join("stargz.toml"))
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(daemon);
        wait_for(&self.snap_sock, "containerd-stargz-grpc");
        if self.containerd.is_some() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while self
                .ctr(&["snapshot", "--snapshotter", "stargz", "ls"])
                .is_err()
            {
                assert!(Instant::now() < deadline, "containerd did not reconnect");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
    }

    fn start_containerd(&mut self) {
        let d = self.dir.display();
        let cfg = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "{s}"
"#,
            s = self.snap_sock.display()
        );
        std::fs::write(self.dir.join("containerd.toml"), cfg).unwrap();
        let containerd = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(self.dir.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        self.containerd = Some(containerd);
        wait_for(&self.sock, "containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctr(&["version"]).is_err() {
            assert!(Instant::now() < deadline, "containerd not answering");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn tool(&self, bin: &Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new(bin)
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", NS])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tool");
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(so)
        } else {
            Err(format!(
                "{} {args:?}: {so}{}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        self.tool(Path::new("/usr/bin/ctr"), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.ctr(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ctr-remote image rpull`; retried while containerd's connection to a restarted
    /// daemon is still backing off (its metadata answers listings without it).
    fn rpull(&self, img: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let res = self.tool(
                Path::new("/usr/bin/ctr-remote"),
                &[
                    "image",
                    "rpull",
                    "--plain-http",
                    "--snapshotter",
                    "stargz",
                    img,
                ],
            );
            match res {
                Ok(_) => return,
                Err(e) if e.contains("Unavailable") || e.contains("unavailable") => {
                    assert!(Instant::now() < deadline, "{e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Runs `script` in a new container; returns its output.
    fn run(&self, img: &str, id: &str, script: &str) -> String {
        // runc keeps its state per namespace and id machine-wide, whichever containerd
        // runs it: tests running side by side need ids of their own.
        let unique = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = format!("{id}-{unique}");
        self.ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            img,
            &id,
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ])
    }

    /// Removes the image and waits until every snapshot (and so every mount) is gone.
    fn remove_image_and_wait_empty(&self, img: &str) {
        self.ok(&["images", "rm", "--sync", img]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ls = self.ok(&["snapshot", "--snapshotter", "stargz", "ls"]);
            if ls.lines().nth(1).is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "snapshots left: {ls}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon's log, then the FUSE manager's (which holds the layers when enabled).
    fn log(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        read(self.dir.join("stargz.log")) + &read(self.root.join("fuse-manager.log"))
    }

    /// Waits up to 30 s for a log line containing every one of `parts`; returns it.
    fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .log()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}:\n{}",
                tail(&self.log(), 60)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn record_path(&self, manifest_digest: &str) -> PathBuf {
        self.root
            .join("learned")
            .join(format!("{}.json", manifest_digest.replacen(':', "-", 1)))
    }

    /// Runs `f`, printing the logs when it panics.
    fn checked(&mut self, f: impl FnOnce(&mut Env)) {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if let Err(p) = res {
            eprintln!(
                "--- stargz.log\n{}\n--- containerd.log\n{}",
                tail(&self.log(), 120),
                tail(
                    &std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default(),
                    30
                )
            );
            std::panic::resume_unwind(p);
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An uncompressed tar of `files`; a `None` body is a directory.
fn tar_of(files: &[(&str, Option<&[u8]>, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match data {
            Some(d) => {
                h.set_size(d.len() as u64);
                b.append_data(&mut h, name, *d).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

struct Layer {
    blob: Vec<u8>,
    diff_id: String,
    annotations: serde_json::Map<String, serde_json::Value>,
}

/// An unoptimized eStargz layer: no prioritized files.
fn estargz_layer(tar: &[u8]) -> Layer {
    let mut blob = Vec::new();
    let out = estargz::build(
        tar,
        &mut blob,
        &estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 1 },
            chunk_size: CHUNK,
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    Layer {
        blob,
        diff_id: out.diff_id,
        annotations: out
            .annotations
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    }
}

/// Pushes the layers, a config and an OCI manifest as `repo:v1`; returns the
/// reference and the manifest's digest.
async fn push(reg: &testenv::Registry, repo: &str, layers: &[Layer]) -> (String, String) {
    let base = reg.base_url();
    let mut descs = Vec::new();
    for l in layers {
        let d = testenv::push_blob(&base, repo, &l.blob).await;
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": l.blob.len(),
            "annotations": l.annotations,
        }));
    }
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = testenv::push_blob(&base, repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    put_manifest(&base, repo, "v1", &manifest).await;
    (format!("{}/{repo}:v1", reg.host()), sha(&manifest))
}

async fn put_manifest(base: &str, repo: &str, tag: &str, manifest: &[u8]) {
    let st = reqwest::Client::new()
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_vec())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201, "push manifest {repo}:{tag}");
}

/// Chunk size of the test layers.
const CHUNK: u64 = 256 << 10;
/// Size of the large file the workload reads two small pieces of.
const BIG: usize = 8 << 20;
/// Where those pieces are (16 KiB each).
const BIG_PIECES: [u64; 2] = [2 << 20, 6 << 20];

/// The files the workload reads, and padding it never reads, over two layers.
struct Image {
    layers: Vec<Layer>,
    read_sums: String,
    /// Bytes of the first layer's files the workload needs whole.
    whole_bytes: u64,
}

fn image() -> Image {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let a = testenv::random_bytes(300 << 10, 1);
    let b = testenv::random_bytes(200 << 10, 2);
    let c = b"config of the app\n".to_vec();
    let big = testenv::random_bytes(BIG, 3);
    let pads: Vec<Vec<u8>> = (0..8)
        .map(|i| testenv::random_bytes(1 << 20, 10 + i))
        .collect();
    let pad_names: Vec<String> = (0..pads.len()).map(|i| format!("pad/p{i}")).collect();
    let mut f1: Vec<(&str, Option<&[u8]>, u32)> = vec![
        ("bin", None, 0o755),
        ("bin/busybox", Some(&busybox), 0o755),
        ("app", None, 0o755),
        ("app/a.dat", Some(&a), 0o644),
        ("app/big.dat", Some(&big), 0o644),
        ("pad", None, 0o755),
    ];
    for (n, d) in pad_names.iter().zip(&pads).take(6) {
        f1.push((n, Some(d), 0o644));
    }
    let mut f2: Vec<(&str, Option<&[u8]>, u32)> = vec![
        ("app", None, 0o755),
        ("app/b.dat", Some(&b), 0o644),
        ("app/c.txt", Some(&c), 0o644),
        ("pad", None, 0o755),
    ];
    for (n, d) in pad_names.iter().zip(&pads).skip(6) {
        f2.push((n, Some(d), 0o644));
    }
    let hex = |d: &[u8]| sha(d).trim_start_matches("sha256:").to_string();
    Image {
        layers: vec![estargz_layer(&tar_of(&f1)), estargz_layer(&tar_of(&f2))],
        read_sums: format!(
            "{}\n{}\n{}\n{}\n{}\n",
            hex(&a),
            hex(&b),
            hex(&c),
            hex(&big[BIG_PIECES[0] as usize..BIG_PIECES[0] as usize + (16 << 10)]),
            hex(&big[BIG_PIECES[1] as usize..BIG_PIECES[1] as usize + (16 << 10)]),
        ),
        whole_bytes: (busybox.len() + a.len()) as u64,
    }
}

const WORKLOAD: &str = "cd /app && for f in a.dat b.dat c.txt; do sha256sum $f | cut -d' ' -f1; done; \
     for s in 512 1536; do dd if=big.dat bs=4096 skip=$s count=4 2>/dev/null | sha256sum | cut -d' ' -f1; done";

/// Bytes of blob `digest` asked for by GETs in `log` (whole-blob GETs count its size).
fn blob_bytes(log: &[testenv::Logged], digest: &str, size: u64) -> u64 {
    log.iter()
        .filter(|l| l.method == "GET" && l.path.ends_with(&format!("/blobs/{digest}")))
        .map(
            |l| match l.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                None => size,
                Some(ranges) => ranges
                    .split(',')
                    .map(|r| {
                        let r = r.trim();
                        match r.strip_prefix('-') {
                            Some(n) => n.parse::<u64>().unwrap_or(size),
                            None => {
                                let (a, b) = r.split_once('-').unwrap();
                                let a: u64 = a.parse().unwrap();
                                let b: u64 = b.parse().unwrap_or(size - 1);
                                b.min(size - 1) + 1 - a
                            }
                        }
                    })
                    .sum(),
            },
        )
        .sum()
}

fn blob_gets(log: &[testenv::Logged], digests: &[String]) -> usize {
    log.iter()
        .filter(|l| {
            l.method == "GET"
                && digests
                    .iter()
                    .any(|d| l.path.ends_with(&format!("/blobs/{d}")))
        })
        .count()
}

fn take_log(front: &testenv::Front) -> Vec<testenv::Logged> {
    std::mem::take(&mut *front.stats.log.lock().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learned_on_first_run_prefetched_on_next_pull_and_shared_through_the_registry() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let img = image();
    let digests: Vec<String> = img.layers.iter().map(|l| sha(&l.blob)).collect();
    let sizes: Vec<u64> = img.layers.iter().map(|l| l.blob.len() as u64).collect();
    let (direct_ref, manifest_digest) = push(&reg, "learn/img", &img.layers).await;
    // Every blob request waits 25 ms, as over a short link, so the cost of requests
    // made while the workload runs shows in its run time.
    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        blob_delay_ms: 25,
        ..Default::default()
    })
    .await;
    let image_ref = direct_ref.replace(&reg.host(), &front.host());

    let mut env = Env::start();
    let mut first_run_gets = 0;
    let mut first_run = Duration::ZERO;
    env.checked(|env| {
        // First pull and run: nothing learned yet, the workload's reads fetch.
        env.rpull(&image_ref);
        take_log(&front);
        let started = Instant::now();
        let out = env.run(&image_ref, "c1", WORKLOAD);
        first_run = started.elapsed();
        assert_eq!(out, img.read_sums, "workload output");
        first_run_gets = blob_gets(&take_log(&front), &digests);

        // The record appears once the 3 s window closed, with the files read and no padding.
        let path = env.record_path(&manifest_digest);
        let deadline = Instant::now() + Duration::from_secs(30);
        let rec = loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let rec: serde_json::Value = serde_json::from_str(&text).unwrap();
                if rec["layers"].as_object().is_some_and(|m| m.len() == 2) {
                    break rec;
                }
            }
            assert!(Instant::now() < deadline, "no record at {}", path.display());
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!("record: {rec}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(rec["version"], 1);
        assert_eq!(rec["image"], manifest_digest.as_str());
        let files = |i: usize| -> Vec<String> {
            rec["layers"][&digests[i]]
                .as_array()
                .unwrap_or_else(|| panic!("no list for layer {i}: {rec}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let (l1, l2) = (files(0), files(1));
        assert!(l1.contains(&"bin/busybox".to_string()), "{l1:?}");
        assert!(l1.contains(&"app/a.dat".to_string()), "{l1:?}");
        assert!(l2.contains(&"app/b.dat".to_string()), "{l2:?}");
        assert!(l2.contains(&"app/c.txt".to_string()), "{l2:?}");
        // First access order: a.dat is read before b.dat, which comes before c.txt.
        let pos = |v: &[String], f: &str| v.iter().position(|x| x == f).unwrap();
        assert!(pos(&l2, "app/b.dat") < pos(&l2, "app/c.txt"), "{l2:?}");
        assert!(
            l1.iter().chain(&l2).all(|p| !p.starts_with("pad/")),
            "padding recorded: {rec}"
        );
        // Of the large file, only the ranges read: around the two pieces, nowhere else.
        let big_ranges: Vec<(u64, u64)> = rec["ranges"][&digests[0]]["app/big.dat"]
            .as_array()
            .unwrap_or_else(|| panic!("no read ranges for app/big.dat: {rec}"))
            .iter()
            .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
            .collect();
        for piece in BIG_PIECES {
            assert!(
                big_ranges
                    .iter()
                    .any(|&(s, e)| s <= piece && piece + (16 << 10) <= e),
                "piece at {piece} not in {big_ranges:?}"
            );
        }
        let ranged: u64 = big_ranges.iter().map(|(s, e)| e - s).sum();
        assert!(ranged < 2 << 20, "{ranged} bytes of app/big.dat recorded");
        assert!(
            rec["ranges"][&digests[0]].get("app/a.dat").is_none(),
            "a small file is recorded whole: {rec}"
        );

        // Remove everything, drop the chunk cache (keeping learned/), pull again.
        env.remove_image_and_wait_empty(&image_ref);
        env.stop_daemon();
        std::fs::remove_dir_all(env.root.join("stargz")).unwrap();
        env.start_daemon();
        take_log(&front);
        let pulled = Instant::now();
        env.rpull(&image_ref);
        // Before any container runs, each layer's recorded files come in one batch.
        let applied = env.wait_log(&["learned prefetch applied", &manifest_digest]);
        eprintln!(
            "second pull: {applied} ({:?} after the pull started)",
            pulled.elapsed()
        );
        for d in &digests {
            let batches = env
                .log()
                .lines()
                .filter(|l| l.contains("start-up files prefetched") && l.contains(d.as_str()))
                .count();
            assert_eq!(batches, 1, "batches for layer {d}");
        }
        let log = take_log(&front);
        for (d, size) in digests.iter().zip(&sizes) {
            let got = blob_bytes(&log, d, *size);
            eprintln!("layer {d}: {got} of {size} bytes fetched by the second pull");
            assert!(got < size / 2, "padding fetched: {got} of {size}");
        }
        // Of the large file only the chunks around its two pieces came: at most the
        // whole files, the footer and TOC read, and a few chunks.
        let first = blob_bytes(&log, &digests[0], sizes[0]);
        let bound = img.whole_bytes + fs::layer::TAIL_READ + 8 * CHUNK;
        assert!(
            first < bound,
            "{first} bytes of the first layer fetched (more than {bound}): the large file came whole"
        );
        // The container then runs without fetching (almost) anything.
        let started = Instant::now();
        let out = env.run(&image_ref, "c2", WORKLOAD);
        let second_run = started.elapsed();
        assert_eq!(out, img.read_sums, "workload output");
        let run_gets = blob_gets(&take_log(&front), &digests);
        eprintln!(
            "workload run: first {first_run:?} with {first_run_gets} blob GETs, \
             after learning {second_run:?} with {run_gets}"
        );
        assert!(
            run_gets <= 1,
            "{run_gets} blob GETs after the learned prefetch"
        );
        assert!(first_run_gets > run_gets);

        // Publish the record as an OCI artifact in the image's repository.
        let ours =
            Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
        let out = Command::new(&ours)
            .args(["image", "prefetch-record", "push", "--plain-http", "--root"])
            .arg(&env.root)
            .arg(&direct_ref)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prefetch-record push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // And back: `pull` stores the registry's copy under another root.
        let other = env.dir.join("other-root");
        let out = Command::new(&ours)
            .args(["image", "prefetch-record", "pull", "--plain-http", "--root"])
            .arg(&other)
            .arg(&direct_ref)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prefetch-record pull: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = path.file_name().unwrap();
        let pulled: serde_json::Value =
            serde_json::from_slice(&std::fs::read(other.join("learned").join(name)).unwrap())
                .unwrap();
        let local: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(pulled, local);
    });
    drop(env);

    // What the pushed artifact looks like.
    let tag = format!("{}.sgz-prefetch", manifest_digest.replacen(':', "-", 1));
    let m: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/learn/img/manifests/{tag}", reg.base_url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mt = "application/vnd.stargz-rs.prefetch-record.v1+json";
    assert_eq!(m["artifactType"], mt, "{m}");
    assert_eq!(m["subject"]["digest"], manifest_digest.as_str(), "{m}");
    assert_eq!(m["layers"][0]["mediaType"], mt, "{m}");

    // Another node, its layers in a FUSE manager and prefetch on (zero-config prefetch
    // with it): an empty root finds the record in the registry and prefetches.
    let mut env = Env::start_config(&CONFIG.replace("noprefetch = true\n", ""));
    env.checked(|env| {
        take_log(&front);
        env.rpull(&image_ref);
        env.wait_log(&[
            "learned-prefetch record taken from the registry",
            &manifest_digest,
        ]);
        env.wait_log(&["learned prefetch applied", &manifest_digest]);
        // The record stands in for zero-config prefetch's guesses.
        env.wait_log(&["learned-prefetch record found; no zero-config prefetch"]);
        assert!(
            !env.log()
                .contains("zero-config prefetch: start-up files fetched"),
            "zero-config prefetch ran beside the record"
        );
        assert!(
            env.record_path(&manifest_digest).exists(),
            "record not stored"
        );
        let log = take_log(&front);
        let lookups = log
            .iter()
            .filter(|l| l.path.ends_with(&format!("/manifests/{tag}")))
            .count();
        assert_eq!(lookups, 1, "one look-up of the record tag per pull");
        let out = env.run(&image_ref, "c3", WORKLOAD);
        assert_eq!(out, img.read_sums);
        let run_gets = blob_gets(&take_log(&front), &digests);
        assert!(
            run_gets <= 1,
            "{run_gets} blob GETs after the learned prefetch"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_records_are_ignored_and_the_pull_works() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let img = image();
    let (image_ref, manifest_digest) = push(&reg, "broken/img", &img.layers).await;
    let layer = sha(&img.layers[0].blob);
    // In the registry: a record with a huge list and a path out of the layer.
    let mut files: Vec<String> = (0..20_000).map(|i| format!("f{i}")).collect();
    files.push("../../etc/shadow".into());
    let record = serde_json::to_vec(&serde_json::json!({
        "version": 1, "image": manifest_digest, "created": 0,
        "layers": { layer.clone(): files },
    }))
    .unwrap();
    let base = reg.base_url();
    let rd = testenv::push_blob(&base, "broken/img", &record).await;
    let cd = testenv::push_blob(&base, "broken/img", b"{}").await;
    let mt = "application/vnd.stargz-rs.prefetch-record.v1+json";
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": mt,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cd, "size": 2},
        "layers": [{"mediaType": mt, "digest": rd, "size": record.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": 1},
    }))
    .unwrap();
    let tag = format!("{}.sgz-prefetch", manifest_digest.replacen(':', "-", 1));
    put_manifest(&base, "broken/img", &tag, &manifest).await;

    let mut env = Env::start();
    env.checked(|env| {
        // On disk: not JSON.
        let path = env.record_path(&manifest_digest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"version\": 1, \"layers\": [").unwrap();
        env.rpull(&image_ref);
        env.wait_log(&["learned-prefetch record ignored", "not valid JSON"]);
        env.wait_log(&[
            "learned-prefetch record from the registry ignored",
            "over 16384",
        ]);
        let out = env.run(&image_ref, "c1", WORKLOAD);
        assert_eq!(out, img.read_sums);
        assert!(
            !env.log().contains("learned prefetch applied"),
            "a broken record was applied"
        );
        // The run's own record replaces the broken file.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|v| v["layers"][&layer].is_array());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "broken record not replaced");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// The optimized image's layer digests and sizes (bottom first) and manifest digest,
/// as the registry serves `repo:tag`.
async fn manifest_of(
    reg: &testenv::Registry,
    repo: &str,
    tag: &str,
) -> (Vec<String>, Vec<u64>, String) {
    let bytes = reqwest::Client::new()
        .get(format!("{}/v2/{repo}/manifests/{tag}", reg.base_url()))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let layers = m["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers: {m}"));
    let digests = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let sizes = layers.iter().map(|l| l["size"].as_u64().unwrap()).collect();
    (digests, sizes, sha(&bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optimized_image_prefetches_the_ranges_its_optimization_published() {
    if !prerequisites() || !require(&["/usr/sbin/runc"], "runc") {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let img = image();
    let (src_ref, _) = push(&reg, "opt/src", &img.layers).await;
    let scratch = tempfile::Builder::new()
        .prefix("stargzd-optrec-")
        .tempdir()
        .unwrap();
    // Optimize with the workload that reads two 16 KiB pieces of the 8 MiB file: the
    // converter prioritizes the whole file, the published record names the pieces.
    let dst_ref = format!("{}/opt/img:v1", reg.host());
    let ours = Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
    let args = serde_json::to_string(&["-c", WORKLOAD]).unwrap();
    let out = Command::new(&ours)
        .args(["image", "optimize", "--oci", "--plain-http", "--workdir"])
        .arg(scratch.path())
        .args([
            "--estargz-chunk-size",
            &CHUNK.to_string(),
            "--entrypoint",
            r#"["/bin/busybox","sh"]"#,
            "--args",
            &args,
            &format!("docker://{src_ref}"),
            &format!("docker://{dst_ref}"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "optimize: {stderr}");
    assert!(stderr.contains("pushed the prefetch record"), "{stderr}");
    let (digests, sizes, manifest_digest) = manifest_of(&reg, "opt/img", "v1").await;
    assert_eq!(digests.len(), 2);

    // The record in the registry: what the workload read, the large file by its pieces.
    let tag = format!("{}.sgz-prefetch", manifest_digest.replacen(':', "-", 1));
    let artifact: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/opt/img/manifests/{tag}", reg.base_url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(artifact["subject"]["digest"], manifest_digest.as_str());
    let rec_digest = artifact["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let rec: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v2/opt/img/blobs/{rec_digest}", reg.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    eprintln!("published record: {rec}");
    let listed = |i: usize| -> Vec<String> {
        rec["layers"][&digests[i]]
            .as_array()
            .unwrap_or_else(|| panic!("no list for layer {i}: {rec}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(listed(0).contains(&"app/big.dat".to_string()), "{rec}");
    assert!(listed(1).contains(&"app/b.dat".to_string()), "{rec}");
    let big: Vec<(u64, u64)> = rec["ranges"][&digests[0]]["app/big.dat"]
        .as_array()
        .unwrap_or_else(|| panic!("no ranges for app/big.dat: {rec}"))
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    for piece in BIG_PIECES {
        assert!(
            big.iter()
                .any(|&(s, e)| s <= piece && piece + (16 << 10) <= e),
            "piece at {piece} not in {big:?}"
        );
    }
    assert!(
        big.iter().map(|(s, e)| e - s).sum::<u64>() < 2 << 20,
        "{big:?}"
    );

    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let image_ref = dst_ref.replace(&reg.host(), &front.host());
    // Prefetch on (the layers' own), nothing else fetching ahead.
    let config = CONFIG.replace("noprefetch = true\n", "");

    // A node whose daemon ignores records fetches the whole prioritized region.
    let whole_region;
    {
        let mut env = Env::start_config(&format!(
            "{config}learned_prefetch = false\n[fuse_manager]\nenable = false\n"
        ));
        let mut fetched = 0;
        env.checked(|env| {
            take_log(&front);
            env.rpull(&image_ref);
            env.wait_log(&["prefetch done", &digests[0]]);
            fetched = blob_bytes(&take_log(&front), &digests[0], sizes[0]);
            assert!(
                !env.log().contains("prefetch follows the learned record"),
                "record used with learned_prefetch = false"
            );
        });
        whole_region = fetched;
    }
    eprintln!("prioritized region prefetch: {whole_region} bytes of layer 0");
    assert!(whole_region > BIG as u64, "{whole_region}");

    // A node with an empty root finds the record and prefetches the pieces instead.
    let mut env = Env::start_config(&format!("{config}[fuse_manager]\nenable = false\n"));
    env.checked(|env| {
        take_log(&front);
        env.rpull(&image_ref);
        env.wait_log(&[
            "learned-prefetch record taken from the registry",
            &manifest_digest,
        ]);
        env.wait_log(&["prefetch follows the learned record", &digests[0]]);
        // The second layer's record names its whole region: that comes in one request.
        env.wait_log(&["prefetch done", &digests[1]]);
        assert!(
            !env.log()
                .lines()
                .any(|l| l.contains("prefetch follows the learned record")
                    && l.contains(digests[1].as_str())),
            "a plan covering the whole region was taken"
        );
        env.wait_log(&["start-up files prefetched", &digests[0]]);
        let log = take_log(&front);
        let fetched = blob_bytes(&log, &digests[0], sizes[0]);
        eprintln!("record-planned prefetch: {fetched} bytes of layer 0");
        let bound = img.whole_bytes + fs::layer::TAIL_READ + (1 << 20) + 8 * CHUNK;
        assert!(
            fetched < bound && fetched + (4 << 20) < whole_region,
            "{fetched} bytes of layer 0 fetched (bound {bound}, whole region {whole_region})"
        );
        // The workload then needs (almost) nothing more.
        let out = env.run(&image_ref, "c1", WORKLOAD);
        assert_eq!(out, img.read_sums, "workload output");
        let run_gets = blob_gets(&take_log(&front), &digests);
        assert!(
            run_gets <= 1,
            "{run_gets} blob GETs after the planned prefetch"
        );
    });
}
