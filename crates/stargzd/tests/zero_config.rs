//! Zero-config prefetch end to end: an unoptimized eStargz image whose entrypoint is
//! the host's dynamically linked `ls`, its loader and libraries spread over three
//! layers with padding the workload never reads, pulled lazily with `ctr-remote image
//! rpull` through a real containerd into our daemon behind a request-logging front.
//! Before any container runs, the registry has been asked for the program, its loader
//! and its libraries (and not the padding); the container then prints its listing with
//! next to no further requests. With `zero_config_prefetch = false` nothing is fetched
//! ahead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, require, sha, stop, wait_for};

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "zeroconf";
const LOG_LINE: &str = "zero-config prefetch: start-up files fetched";
const MULTIARCH: &str = "usr/lib/x86_64-linux-gnu";
const LIBS: &[&str] = &[
    "libc.so.6",
    "libselinux.so.1",
    "libpcre2-8.so.0",
    "ld-linux-x86-64.so.2",
];

fn prerequisites() -> bool {
    let host_ok = std::env::consts::ARCH == "x86_64"
        && LIBS
            .iter()
            .all(|l| std::path::Path::new(&format!("/{MULTIARCH}/{l}")).exists());
    if !host_ok {
        assert!(
            !common::ci(),
            "zero-config test needs an x86_64 host with ls's libraries in /{MULTIARCH}"
        );
        return false;
    }
    require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/ctr-remote",
            "/usr/sbin/runc",
            "/usr/bin/containerd-shim-runc-v2",
            "/usr/bin/docker-registry",
            "/usr/bin/ls",
            "/dev/fuse",
        ],
        "containerd runc docker-registry stargz-snapshotter fuse3 coreutils",
    )
}

/// containerd and our daemon (mounts in the daemon, so its log has everything) in a
/// scratch directory, stopped and unmounted on drop.
struct Env {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    daemon: Option<Child>,
    containerd: Option<Child>,
    sock: PathBuf,
    snap_root: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            for id in self.ctr(&["task", "ls", "-q"]).unwrap_or_default().lines() {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id.trim()]);
                std::thread::sleep(Duration::from_millis(300));
                let _ = self.ctr(&["task", "rm", "-f", id.trim()]);
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        detach_mounts(&self.dir);
    }
}

impl Env {
    fn start(config: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-zeroconf-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        // No background fetch: what is fetched is what was asked for.
        std::fs::write(
            dir.join("stargz.toml"),
            format!("no_background_fetch = true\n{config}\n[fuse_manager]\nenable = false\n"),
        )
        .unwrap();
        let snap_sock = dir.join("run/stargz.sock");
        let snap_root = dir.join("stargz-root");
        let daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
            .arg("--address")
            .arg(&snap_sock)
            .arg("--root")
            .arg(&snap_root)
            .arg("--config")
            .arg(dir.join("stargz.toml"))
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stargz.log")).unwrap())
            .spawn()
            .unwrap();
        let mut env = Env {
            sock: dir.join("containerd.sock"),
            dir,
            _tmp: tmp,
            daemon: Some(daemon),
            containerd: None,
            snap_root,
        };
        wait_for(&snap_sock, "containerd-stargz-grpc");
        let d = env.dir.display();
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
            s = snap_sock.display()
        );
        std::fs::write(env.dir.join("containerd.toml"), cfg).unwrap();
        env.containerd = Some(
            Command::new("/usr/bin/containerd")
                .arg("--config")
                .arg(env.dir.join("containerd.toml"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(env.dir.join("containerd.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for(&env.sock, "containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.ctr(&["version"]).is_err() {
            assert!(Instant::now() < deadline, "containerd not answering");
            std::thread::sleep(Duration::from_millis(100));
        }
        env
    }

    fn tool(&self, bin: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(bin)
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", NS])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr");
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(so)
        } else {
            Err(format!(
                "{bin} {args:?}: {so}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        self.tool("/usr/bin/ctr", args)
    }

    fn rpull(&self, img: &str) {
        self.tool(
            "/usr/bin/ctr-remote",
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "stargz",
                img,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs the image's own process (its Entrypoint and Cmd) and returns its output.
    /// `ctr run` can return before the last of a container's output reached it: a run
    /// whose output is not `want` is run again (reading the same files).
    fn run_image(&self, img: &str, id: &str, want: &str) -> String {
        let mut out = String::new();
        for attempt in 0..3 {
            let name = format!("{id}-{attempt}");
            out = self
                .ctr(&["run", "--rm", "--snapshotter", "stargz", img, &name])
                .unwrap_or_else(|e| panic!("{e}"));
            if out == want {
                break;
            }
            eprintln!("output of {name}: {out:?}");
        }
        out
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stargz.log")).unwrap_or_default()
    }

    /// Runs `f`, printing the daemon's log when it panics.
    fn checked(&mut self, f: impl FnOnce(&mut Env)) {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if let Err(p) = res {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- stargz.log (tail)\n{}",
                lines[lines.len().saturating_sub(120)..].join("\n")
            );
            eprintln!("(daemon root {})", self.snap_root.display());
            std::panic::resume_unwind(p);
        }
    }
}

/// `(path, bytes | None for a directory, symlink target)`.
type Entry = (String, Option<Vec<u8>>, Option<String>);

fn dir(p: &str) -> Entry {
    (p.to_string(), None, None)
}
fn file(p: &str, d: Vec<u8>) -> Entry {
    (p.to_string(), Some(d), None)
}
fn link(p: &str, t: &str) -> Entry {
    (p.to_string(), None, Some(t.to_string()))
}

/// One pushed layer: its blob and the blob ranges of each of its files.
struct Layer {
    blob: Vec<u8>,
    diff_id: String,
    annotations: serde_json::Map<String, serde_json::Value>,
}

impl Layer {
    fn build(entries: &[Entry]) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, target) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_mode(0o755);
            h.set_size(0);
            if let Some(t) = target {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, path, t).unwrap();
            } else if let Some(d) = data {
                h.set_size(d.len() as u64);
                b.append_data(&mut h, path, &d[..]).unwrap();
            } else {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
        }
        let tar = b.into_inner().unwrap();
        let mut blob = Vec::new();
        let out = estargz::build(
            &tar[..],
            &mut blob,
            &estargz::BuildOptions {
                codec: estargz::Codec::Gzip { level: 1 },
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

    fn digest(&self) -> String {
        sha(&self.blob)
    }

    /// The blob ranges holding `path`'s data.
    fn ranges(&self, path: &str) -> Vec<Range<u64>> {
        let r = estargz::Reader::open(&self.blob, &estargz::OpenOptions::default()).unwrap();
        let id = r
            .index
            .lookup(path)
            .unwrap_or_else(|| panic!("{path} not in layer"));
        r.index
            .node(id)
            .chunks
            .iter()
            .map(|c| c.blob_range())
            .collect()
    }
}

/// The image: the host's `ls` as entrypoint on PATH (a decoy in an earlier PATH
/// directory whited out), its loader behind two symlinks, its libraries in two lower
/// layers, each layer with padding no one reads.
struct Image {
    layers: Vec<Layer>,
    /// `(layer, path)` the start needs.
    needed: Vec<(usize, String)>,
    /// `(layer, path)` nobody reads.
    padding: Vec<(usize, String)>,
}

fn image() -> Image {
    let host = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let pad = |seed| testenv::random_bytes(3 << 20, seed);
    let l0 = vec![
        dir("usr/lib/x86_64-linux-gnu"),
        link("lib", "usr/lib"),
        dir("lib64"),
        link(
            "lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
        file(
            &format!("{MULTIARCH}/libc.so.6"),
            host(&format!("/{MULTIARCH}/libc.so.6")),
        ),
        file("pad/zero", pad(1)),
        dir("data"),
        file("data/from-bottom", b"bottom\n".to_vec()),
        file("pad/zero-tail", pad(2)),
    ];
    let mut l1 = vec![dir("usr/lib/x86_64-linux-gnu")];
    for lib in &LIBS[1..] {
        l1.push(file(
            &format!("{MULTIARCH}/{lib}"),
            host(&format!("/{MULTIARCH}/{lib}")),
        ));
    }
    l1.extend([
        dir("usr/local/bin"),
        file("usr/local/bin/ls", testenv::random_bytes(1 << 20, 3)),
        file("pad/one", pad(4)),
    ]);
    let l2 = vec![
        dir("usr/local/bin"),
        file("usr/local/bin/.wh.ls", Vec::new()),
        dir("usr/bin"),
        file("usr/bin/ls", host("/usr/bin/ls")),
        dir("etc"),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
        file("etc/group", b"root:x:0:\n".to_vec()),
        dir("data"),
        file("data/from-top", b"top\n".to_vec()),
        file("pad/two", pad(5)),
    ];
    let mut needed = vec![(2, "usr/bin/ls".to_string())];
    needed.push((0, format!("{MULTIARCH}/libc.so.6")));
    for lib in &LIBS[1..] {
        needed.push((1, format!("{MULTIARCH}/{lib}")));
    }
    Image {
        layers: vec![Layer::build(&l0), Layer::build(&l1), Layer::build(&l2)],
        needed,
        padding: vec![
            (0, "pad/zero".into()),
            (1, "usr/local/bin/ls".into()),
            (1, "pad/one".into()),
        ],
    }
}

async fn push(reg_base: &str, repo: &str, img: &Image) {
    let mut descs = Vec::new();
    for l in &img.layers {
        let d = testenv::push_blob(reg_base, repo, &l.blob).await;
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": l.blob.len(),
            "annotations": l.annotations,
        }));
    }
    let diff_ids: Vec<&str> = img.layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["ls"],
            "Cmd": ["/data"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = testenv::push_blob(reg_base, repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let st = reqwest::Client::new()
        .put(format!("{reg_base}/v2/{repo}/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201, "push manifest");
}

/// Blob byte ranges the front was asked for so far, by blob digest.
fn requested(
    front: &testenv::Front,
    sizes: &HashMap<String, u64>,
) -> HashMap<String, Vec<Range<u64>>> {
    let log = front.stats.log.lock().unwrap().clone();
    let mut out: HashMap<String, Vec<Range<u64>>> = HashMap::new();
    for l in log.iter().filter(|l| l.method == "GET") {
        let Some((_, digest)) = l.path.split_once("/blobs/") else {
            continue;
        };
        let Some(&size) = sizes.get(digest) else {
            continue;
        };
        let ranges = out.entry(digest.to_string()).or_default();
        let Some(spec) = l.range.as_deref().and_then(|r| r.strip_prefix("bytes=")) else {
            ranges.push(0..size);
            continue;
        };
        for part in spec.split(',').map(str::trim) {
            let (a, b) = part.split_once('-').unwrap();
            let r = if a.is_empty() {
                size.saturating_sub(b.parse().unwrap())..size
            } else if b.is_empty() {
                a.parse().unwrap()..size
            } else {
                a.parse().unwrap()..b.parse::<u64>().unwrap() + 1
            };
            ranges.push(r);
        }
    }
    out
}

/// Fraction of `want`'s bytes inside `got`.
fn covered(want: &[Range<u64>], got: &[Range<u64>]) -> f64 {
    let total: u64 = want.iter().map(|r| r.end - r.start).sum();
    if total == 0 {
        return 1.0;
    }
    let mut inside = 0;
    for w in want {
        // Bytes of `w` in the union of `got`, counted point by point over merged ranges.
        let mut parts: Vec<Range<u64>> = got
            .iter()
            .filter(|g| g.start < w.end && g.end > w.start)
            .map(|g| g.start.max(w.start)..g.end.min(w.end))
            .collect();
        parts.sort_by_key(|r| r.start);
        let mut end = w.start;
        for p in parts {
            let from = p.start.max(end);
            if p.end > from {
                inside += p.end - from;
                end = p.end;
            }
        }
    }
    inside as f64 / total as f64
}

fn blob_gets(front: &testenv::Front) -> usize {
    front
        .stats
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.method == "GET" && l.path.contains("/blobs/"))
        .count()
}

/// What `ls /data` prints in the image.
const LISTING: &str = "from-bottom\nfrom-top\n";

async fn setup(repo: &str) -> Option<(testenv::Registry, testenv::Front, Image, String)> {
    if !prerequisites() {
        return None;
    }
    let reg = testenv::Registry::start(testenv::RegistryOpts::default())?;
    let img = image();
    push(&reg.base_url(), repo, &img).await;
    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let reference = format!("{}/{repo}:v1", front.host());
    Some((reg, front, img, reference))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_files_fetched_before_the_container_runs() {
    let Some((_reg, front, img, reference)) = setup("zeroconf/on").await else {
        return;
    };
    let sizes: HashMap<String, u64> = img
        .layers
        .iter()
        .map(|l| (l.digest(), l.blob.len() as u64))
        .collect();
    let mut env = Env::start("zero_config_prefetch = true\nzero_config_prefetch_max_mib = 64\n");
    env.checked(|env| {
        env.rpull(&reference);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !env.log().contains(LOG_LINE) {
            assert!(Instant::now() < deadline, "no zero-config prefetch logged");
            std::thread::sleep(Duration::from_millis(100));
        }
        let line = env
            .log()
            .lines()
            .find(|l| l.contains(LOG_LINE))
            .unwrap()
            .to_string();
        eprintln!("{line}");
        assert!(line.contains("INFO"), "{line}");
        // Before any container: the program, its loader and its libraries were asked
        // for, the padding and the whited-out decoy were not.
        let got = requested(&front, &sizes);
        for (layer, path) in &img.needed {
            let l = &img.layers[*layer];
            let c = covered(&l.ranges(path), got.get(&l.digest()).map_or(&[], |v| v));
            assert!(c >= 1.0, "{path} fetched {:.0}% before the run", c * 100.0);
        }
        for (layer, path) in &img.padding {
            let l = &img.layers[*layer];
            let c = covered(&l.ranges(path), got.get(&l.digest()).map_or(&[], |v| v));
            assert!(
                c < 0.25,
                "{path} fetched {:.0}% though nobody reads it",
                c * 100.0
            );
        }
        let before = blob_gets(&front);
        let out = env.run_image(&reference, "zc-on", LISTING);
        assert_eq!(out, LISTING);
        let further = blob_gets(&front) - before;
        eprintln!("blob requests during the run: {further}");
        assert!(further <= 2, "{further} blob requests during the run");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turned_off_fetches_nothing_ahead() {
    let Some((_reg, front, img, reference)) = setup("zeroconf/off").await else {
        return;
    };
    let sizes: HashMap<String, u64> = img
        .layers
        .iter()
        .map(|l| (l.digest(), l.blob.len() as u64))
        .collect();
    let mut env = Env::start("zero_config_prefetch = false\n");
    env.checked(|env| {
        env.rpull(&reference);
        std::thread::sleep(Duration::from_secs(3));
        assert!(!env.log().contains(LOG_LINE));
        let libc = &img.layers[0];
        let libc_ranges = libc.ranges(&format!("{MULTIARCH}/libc.so.6"));
        let got = requested(&front, &sizes);
        let c = covered(&libc_ranges, got.get(&libc.digest()).map_or(&[], |v| v));
        assert!(
            c < 0.25,
            "libc fetched {:.0}% with the prefetch off",
            c * 100.0
        );
        let out = env.run_image(&reference, "zc-off", LISTING);
        assert_eq!(out, LISTING);
        // The run itself reads libc: the check above would have seen it fetched.
        let got = requested(&front, &sizes);
        let c = covered(&libc_ranges, got.get(&libc.digest()).map_or(&[], |v| v));
        assert!(c > 0.5, "libc fetched {:.0}% by the run", c * 100.0);
    });
}
