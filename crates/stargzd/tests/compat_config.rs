//! Our daemon started as the reference's is: with its own example configuration files
//! (the KinD node's, the documented mirror forms, header as string and list,
//! `request_timeout_sec` at both levels, every cache type value, the benchmark,
//! demo and integration files), its Go-style flags, and its snapshot labels. Each
//! config starts the daemon, ignored keys are named in one warning each, and every key
//! that changes behaviour is seen to: a memory cache writes nothing to disk, a stalled
//! mirror gives up after its request timeout, headers reach the mirror, an unverifiable
//! layer mounts only with `allow_no_verification` and the skipverify label, the
//! prefetch label and `prefetch_size` prefetch a layer without landmarks. SIGTERM
//! without a FUSE manager unmounts.
//!
//! Snapshots are asked for over the Snapshots gRPC API with the labels containerd and
//! `ctr-remote` set, against a real docker-registry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, fuse_mounts, require, sha, stop};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use remote_layer::label;
use snapshotter::proto::snapshots as pb;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = pb::snapshots_client::SnapshotsClient<Channel>;

const NS: &str = "compat";

fn prerequisites() -> bool {
    require(
        &["/usr/bin/docker-registry", "/dev/fuse", "/bin/fusermount3"],
        "docker-registry fuse3",
    )
}

/// Our daemon in a scratch directory, stopped and its mounts detached on drop.
struct Daemon {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    child: Option<Child>,
    sock: PathBuf,
    root: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        kill_fuse_manager(&self.root);
        detach_mounts(&self.dir);
    }
}

/// Kills the stargz-fuse-manager recorded in `root`'s pid file, if it still runs.
fn kill_fuse_manager(root: &Path) {
    let Ok(text) = std::fs::read_to_string(root.join("fuse-manager.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("stargz-fuse-manager") && cmdline.contains(&*root.to_string_lossy()) {
        // SAFETY: kill(2) on the manager started for this test's daemon root.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

impl Daemon {
    /// Starts the daemon with `config` as its file, Go-style single-dash flags (as the
    /// reference's systemd unit and scripts pass them) plus `extra`.
    fn start(config: &str, extra: &[&str]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-compat-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let sock = dir.join("run/stargz.sock");
        let root = dir.join("root");
        let log = dir.join("daemon.log");
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
            .arg("-address")
            .arg(&sock)
            .arg("-root")
            .arg(&root)
            .arg(format!("-config={}", dir.join("config.toml").display()))
            .args(if extra.contains(&"-log-level") {
                &[][..]
            } else {
                &["-log-level", "debug"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            _tmp: tmp,
            dir,
            child: Some(child),
            sock,
            root,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.sock.exists() {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({st}) before serving:\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon not serving:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits for the exit.
    fn signal(&mut self, sig: i32) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "no exit after signal {sig}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn client(&self) -> Client {
        let s = self.sock.clone();
        let ch = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let s = s.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
                }
            }))
            .await
            .unwrap();
        Client::new(ch)
    }

    fn fuse_mounts(&self) -> Vec<String> {
        fuse_mounts(&self.root)
    }

    /// Regular files under the chunk cache directory.
    fn cache_files(&self) -> usize {
        fn walk(p: &Path) -> usize {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| {
                    let t = e.file_type().unwrap();
                    if t.is_dir() {
                        walk(&e.path())
                    } else {
                        usize::from(t.is_file())
                    }
                })
                .sum()
        }
        walk(&self.root.join("stargz"))
    }

    /// The warning lines naming `key`.
    fn warnings_for(&self, key: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("WARN") && l.split_whitespace().any(|w| w == format!("key={key}"))
            })
            .count()
    }
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("containerd-namespace", NS.parse().unwrap());
    r
}

/// A Prepare as containerd sends it for a layer of a lazily pulled image.
async fn prepare(
    c: &mut Client,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    c.prepare(req(pb::PrepareSnapshotRequest {
        snapshotter: "stargz".into(),
        key: key.into(),
        parent: String::new(),
        labels,
    }))
    .await
    .map(drop)
}

/// The labels `ctr-remote image rpull` puts on the Prepare of `layer` of `image`,
/// with `extra` on top.
fn layer_labels(image: &str, layer: &Layer, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = [
        (
            label::TARGET_SNAPSHOT_REF,
            format!("target-{}", layer.digest),
        ),
        (label::STARGZ_REFERENCE, image.to_string()),
        (label::STARGZ_DIGEST, layer.digest.clone()),
        (label::STARGZ_LAYERS, layer.digest.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(t) = &layer.toc_digest {
        l.insert(label::TOC_DIGEST.to_string(), t.clone());
    }
    for (k, v) in extra {
        l.insert(k.to_string(), v.to_string());
    }
    l
}

/// Whether the Prepare made a remote snapshot (containerd is told it already exists)
/// rather than an empty one for containerd to unpack into.
async fn mounted_remotely(c: &mut Client, key: &str, labels: HashMap<String, String>) -> bool {
    match prepare(c, key, labels).await {
        Err(s) if s.code() == tonic::Code::AlreadyExists => true,
        Ok(()) => false,
        Err(s) => panic!("prepare {key}: {s}"),
    }
}

/// An uncompressed tar of regular files.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layer blob as pushed, its digest, and its TOC digest if its descriptor has one.
struct Layer {
    blob: Vec<u8>,
    digest: String,
    diff_id: String,
    toc_digest: Option<String>,
}

fn build(tar: &[u8]) -> (Vec<u8>, estargz::BuildOutput) {
    let mut blob = Vec::new();
    let out = estargz::build(
        tar,
        &mut blob,
        &estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 1 },
            chunk_size: 64 << 10,
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    (blob, out)
}

fn estargz_layer(tar: &[u8]) -> Layer {
    let (blob, out) = build(tar);
    Layer {
        digest: sha(&blob),
        blob,
        diff_id: out.diff_id,
        toc_digest: Some(out.toc_digest),
    }
}

/// An eStargz layer without landmarks (as older stargz tools wrote them): the builder's
/// no-prefetch landmark is dropped from the TOC, which is written again with its footer.
fn landmarkless_layer(tar: &[u8]) -> Layer {
    let (blob, out) = build(tar);
    let footer = estargz::Footer::detect(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
    let mut toc = out.toc.clone();
    toc.entries
        .retain(|e| e.name != estargz::NO_PREFETCH_LANDMARK);
    assert!(
        toc.entries.len() < out.toc.entries.len(),
        "no landmark to drop"
    );
    let json = toc.to_json().unwrap();
    let mut member =
        estargz::synthetic_file_header("stargz.index.json", json.len() as u64).to_vec();
    member.extend_from_slice(&json);
    member.resize(512 + json.len().div_ceil(512) * 512 + 1024, 0);
    let start = footer.toc_offset();
    let mut new = blob[..start as usize].to_vec();
    new.extend(estargz::compress_member(estargz::Codec::Gzip { level: 1 }, &member).unwrap());
    new.extend(estargz::Footer::Estargz { toc_offset: start }.encode());
    Layer {
        digest: sha(&new),
        blob: new,
        diff_id: out.diff_id,
        toc_digest: Some(sha(&json)),
    }
}

/// Pushes `layers` with a config and an OCI manifest as `repo:v1`; the descriptors
/// carry each layer's TOC digest annotation when it has one.
async fn push(reg: &testenv::Registry, repo: &str, layers: &[&Layer]) -> String {
    let base = reg.base_url();
    let mut descs = Vec::new();
    for l in layers {
        let d = testenv::push_blob(&base, repo, &l.blob).await;
        assert_eq!(d, l.digest);
        let mut desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": l.blob.len(),
        });
        if let Some(t) = &l.toc_digest {
            desc["annotations"] = serde_json::json!({ label::TOC_DIGEST: t });
        }
        descs.push(desc);
    }
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
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
    let st = reqwest::Client::new()
        .put(format!("{base}/v2/{repo}/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st.as_u16(), 201, "push manifest");
    format!("{}/{repo}:v1", reg.host())
}

/// Files big enough to span several chunks, with bytes that do not compress.
fn files() -> Vec<(String, Vec<u8>)> {
    (0..6)
        .map(|i| {
            (
                format!("data/f{i}"),
                testenv::random_bytes(300 << 10, 40 + i),
            )
        })
        .collect()
}

fn tar_of_files(f: &[(String, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = f.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    tar_of(&refs)
}

/// Reads every file through the single FUSE mount of `d` and checks its bytes.
fn read_through_mount(d: &Daemon, f: &[(String, Vec<u8>)]) {
    let mounts = d.fuse_mounts();
    assert_eq!(mounts.len(), 1, "{mounts:?}\n{}", d.log());
    for (name, data) in f {
        let got = std::fs::read(Path::new(&mounts[0]).join(name)).unwrap();
        assert!(got == *data, "{name} differs");
    }
}

/// The value of `name` in a Prometheus text exposition for the series whose labels
/// contain `label`.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
        (metric == name && labels.contains(label)).then(|| value.parse().ok())?
    })
}

async fn scrape(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The reference's own example files, verbatim (the KinD node image's, the overview's
/// mirror, header and timeout forms, its benchmark, demo and integration files), and
/// every cache type value: each starts the daemon, which then answers the Snapshots
/// API, and each key it does not act on is named in exactly one warning line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_example_configs_start() {
    if !prerequisites() {
        return;
    }
    let configs: &[(&str, &str, &[&str])] = &[
        (
            "script/config/etc/containerd-stargz-grpc/config.toml (KinD)",
            r#"# Append configurations for Stargz Snapshotter in TOML format.

# Enables CRI-based keychain
# Stargz Snapshotter works as a proxy of CRI.
# kubelet MUST listen stargz snapshotter's socket (unix:///run/containerd-stargz-grpc/containerd-stargz-grpc.sock)
# instead of containerd for image service.
# i.e. add `--image-service-endpoint=unix:///run/containerd-stargz-grpc/containerd-stargz-grpc.sock` option to kubelet.
[cri_keychain]
enable_keychain = true
image_service_path = "/run/containerd/containerd.sock"
"#,
            &[],
        ),
        (
            "docs/overview.md: mirrors and insecure",
            r#"# Use `mirrorhost.io` as a mirrored host of `exampleregistry.io` and
# use plain HTTP for connecting to the mirror host.
[[resolver.host."exampleregistry.io".mirrors]]
host = "mirrorhost.io"
insecure = true
request_timeout_sec = 60

# Use plain HTTP for connecting to `exampleregistry.io`.
[[resolver.host."exampleregistry.io".mirrors]]
host = "exampleregistry.io"
insecure = true
"#,
            &[],
        ),
        (
            "docs/overview.md: header (list) and global request timeout",
            r#"[[resolver.host."registry2:5000".mirrors]]
  host = "registry2:5000"
  [resolver.host."registry2:5000".mirrors.header]
    x-custom-2 = ["value3", "value4"]

[resolver]
request_timeout_sec = 300
"#,
            &[],
        ),
        (
            "header as a plain string",
            r#"[[resolver.host."registry2:5000".mirrors]]
host = "registry2:5000"
header = { x-custom-1 = "value1", x-custom-2 = ["value3", "value4"] }
"#,
            &[],
        ),
        (
            "docs/overview.md: kubeconfig keychain",
            r#"[kubeconfig_keychain]
enable_keychain = true
kubeconfig_path = "/etc/kubernetes/snapshotter/config.conf"
"#,
            &[],
        ),
        (
            "docs/overview.md: fuse manager",
            r#"[fuse_manager]
enable = true
address = "/nonexistent/fuse-manager.sock"
path = "/nonexistent/stargz-fuse-manager"
"#,
            &[],
        ),
        (
            "script/benchmark/config-containerd/.../config.toml",
            r#"# the value of noprefetch will be replaced during benchmarking
noprefetch = true
debug_address = "/run/containerd-stargz-grpc/debug.sock"
"#,
            &["debug_address"],
        ),
        (
            "script/demo/config.stargz.toml",
            r#"metrics_address = "127.0.0.1:0"
disable_verification = true
ipfs = true
# metadata_store = "db"
[[resolver.host."registry2:5000".mirrors]]
host = "registry2:5000"
insecure = true
[directory_cache]
direct = true
[snapshotter]
allow_invalid_mounts_on_restart = true
"#,
            &["ipfs", "directory_cache.direct"],
        ),
        (
            "script/integration/containerd/config.stargz.toml",
            r#"metadata_store = "memory"
ipfs = true

[fuse]
passthrough = false

[blob]
check_always = true
max_retries = 1

[[resolver.host."registry-integration.test".mirrors]]
host = "registry-alt.test:5000"
insecure = true
"#,
            &["ipfs", "blob.check_always"],
        ),
        (
            "every fs/config.go and blob key",
            r#"http_cache_type = ""
filesystem_cache_type = "directory"
resolve_result_entry_ttl_sec = 120
resolve_result_entry = 30
prefetch_size = 0
prefetch_timeout_sec = 10
prefetch_async_size = 0
noprefetch = false
no_background_fetch = false
debug = true
allow_no_verification = false
disable_verification = false
max_concurrency = 2
no_prometheus = false
log_file_access = true
metadata_store = "db"
[blob]
valid_interval = 60
check_always = false
chunk_size = 50000
fetching_timeout_sec = 300
force_single_range_mode = false
prefetch_chunk_size = 0
max_retries = 5
min_wait_msec = 30
max_wait_msec = 300000
[directory_cache]
max_lru_cache_entry = 10
max_cache_fds = 10
sync_add = false
direct = true
fadv_dontneed = true
[fuse]
attr_timeout = 1
entry_timeout = 1
passthrough = false
merge_buffer_size = 419430400
merge_worker_count = 10
[snapshotter]
allow_invalid_mounts_on_restart = false
"#,
            &[
                "resolve_result_entry",
                "debug",
                "log_file_access",
                "metadata_store",
                "blob.valid_interval",
                "blob.chunk_size",
                "directory_cache.max_lru_cache_entry",
                "directory_cache.max_cache_fds",
                "directory_cache.direct",
                "directory_cache.fadv_dontneed",
                "fuse.merge_buffer_size",
                "fuse.merge_worker_count",
            ],
        ),
        (
            "cache types: any value but memory",
            "http_cache_type = \"nonsense\"\nfilesystem_cache_type = \"\"\n",
            &[],
        ),
        (
            "cache types: memory",
            "http_cache_type = \"memory\"\nfilesystem_cache_type = \"memory\"\n",
            &[],
        ),
        (
            "zero and negative values the reference takes",
            "prefetch_timeout_sec = 0\nmax_concurrency = -1\n[fuse]\nattr_timeout = -1\n\
             [blob]\nmax_retries = -1\n[directory_cache]\nmax_cache_fds = -1\n",
            &["blob.max_retries", "directory_cache.max_cache_fds"],
        ),
        (
            "a key nobody knows",
            "no_such_key = 1\n[fuse]\nno_such_fuse_key = true\n",
            &["no_such_key", "fuse.no_such_fuse_key"],
        ),
    ];
    for (what, text, warned) in configs {
        let d = Daemon::start(text, &[]);
        let mut c = d.client().await;
        let listed = c
            .list(req(pb::ListSnapshotsRequest {
                snapshotter: "stargz".into(),
                filters: Vec::new(),
            }))
            .await;
        assert!(listed.is_ok(), "{what}: {listed:?}\n{}", d.log());
        for key in *warned {
            assert_eq!(
                d.warnings_for(key),
                1,
                "{what}: one warning for {key}\n{}",
                d.log()
            );
        }
        let all = d
            .log()
            .lines()
            .filter(|l| l.contains("config key ignored"))
            .count();
        assert_eq!(all, warned.len(), "{what}: warnings\n{}", d.log());
    }
}

/// `http_cache_type`/`filesystem_cache_type = "memory"` keep fetched data in memory
/// only; the default (or any other value) writes it under the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_writes_nothing_to_disk() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let f = files();
    let layer = estargz_layer(&tar_of_files(&f));
    let img = push(&reg, "compat/cache", &[&layer]).await;
    for (cache, on_disk) in [("memory", false), ("directory", true), ("", true)] {
        let d = Daemon::start(
            &format!(
                "http_cache_type = {cache:?}\nfilesystem_cache_type = {cache:?}\n\
                 no_background_fetch = true\n[fuse_manager]\nenable = false\n"
            ),
            &[],
        );
        let mut c = d.client().await;
        assert!(mounted_remotely(&mut c, "k1", layer_labels(&img, &layer, &[])).await);
        read_through_mount(&d, &f);
        let n = d.cache_files();
        assert_eq!(
            n > 0,
            on_disk,
            "cache type {cache:?}: {n} files\n{}",
            d.log()
        );
    }
}

/// `request_timeout_sec` per mirror and under `[resolver]`: a mirror that accepts
/// connections and never answers is given up after the timeout and the registry
/// itself serves the layer; headers given as a string or a list reach the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeouts_and_headers_at_mirrors() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let f = files();
    let layer = estargz_layer(&tar_of_files(&f));
    let img = push(&reg, "compat/timeout", &[&layer]).await;
    let host = reg.host();
    let stalled = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        never_answer: true,
        ..Default::default()
    })
    .await;
    for (what, timeouts) in [
        ("mirror", "request_timeout_sec = 1\n".to_string()),
        ("resolver", String::new()),
    ] {
        let global = if what == "resolver" {
            "[resolver]\nrequest_timeout_sec = 1\n"
        } else {
            "[resolver]\nrequest_timeout_sec = 600\n"
        };
        let d = Daemon::start(
            &format!(
                "no_background_fetch = true\n[blob]\nmax_retries = 1\n[fuse_manager]\nenable = false\n\
                 {global}[[resolver.host.\"{host}\".mirrors]]\nhost = \"{}\"\ninsecure = true\n{timeouts}",
                stalled.host()
            ),
            &[],
        );
        let mut c = d.client().await;
        let before = testenv::FrontStats::get(&stalled.stats.requests);
        let t = Instant::now();
        let remote = mounted_remotely(&mut c, "k1", layer_labels(&img, &layer, &[])).await;
        let took = t.elapsed();
        assert!(remote, "{what}: not mounted\n{}", d.log());
        assert!(
            testenv::FrontStats::get(&stalled.stats.requests) > before,
            "{what}: the mirror was never asked"
        );
        // Each request to the mirror waits 1 s (two tries); without the timeout one
        // would wait 600 s (or the default 30 s).
        assert!(
            took < Duration::from_secs(25),
            "{what}: took {took:?}\n{}",
            d.log()
        );
        read_through_mount(&d, &f);
    }

    // Headers: a mirror that refuses requests without them; the registry itself is
    // unreachable, so the layer mounts only if the mirror accepts.
    let picky = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        require_headers: vec![
            ("x-one".into(), "a".into()),
            ("x-two".into(), "b".into()),
            ("x-two".into(), "c".into()),
        ],
        ..Default::default()
    })
    .await;
    let dead = format!("127.0.0.1:{}", testenv::free_port());
    let img_dead = img.replacen(&host, &dead, 1);
    let d = Daemon::start(
        &format!(
            "no_background_fetch = true\n[blob]\nmax_retries = 1\n[fuse_manager]\nenable = false\n\
             [[resolver.host.\"{dead}\".mirrors]]\nhost = \"{}\"\ninsecure = true\n\
             header = {{ x-one = \"a\", x-two = [\"b\", \"c\"] }}\n",
            picky.host()
        ),
        &[],
    );
    let mut c = d.client().await;
    assert!(
        mounted_remotely(&mut c, "k1", layer_labels(&img_dead, &layer, &[])).await,
        "{}",
        d.log()
    );
    read_through_mount(&d, &f);
    assert!(testenv::FrontStats::get(&picky.stats.requests) > 0);
    assert_eq!(
        testenv::FrontStats::get(&picky.stats.missing_header),
        0,
        "headers not sent"
    );
}

/// A layer whose descriptor has no TOC digest mounts only with both
/// `allow_no_verification` and the `stargz.skipverify` label, as in the reference;
/// otherwise the snapshot is left for containerd to unpack (with `full_pull = false`;
/// by default the daemon unpacks it itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipverify_needs_the_label_and_the_key() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let f = files();
    let mut layer = estargz_layer(&tar_of_files(&f));
    layer.toc_digest = None;
    let img = push(&reg, "compat/unverified", &[&layer]).await;
    let skip = [(label::STARGZ_SKIP_VERIFY, "true")];
    for (allow, with_label, want) in [
        (true, false, false),
        (false, true, false),
        (true, true, true),
    ] {
        let d = Daemon::start(
            &format!(
                "allow_no_verification = {allow}\nno_background_fetch = true\n\
                 full_pull = false\n[fuse_manager]\nenable = false\n"
            ),
            &[],
        );
        let mut c = d.client().await;
        let extra: &[(&str, &str)] = if with_label { &skip } else { &[] };
        let got = mounted_remotely(&mut c, "k1", layer_labels(&img, &layer, extra)).await;
        assert_eq!(
            got,
            want,
            "allow_no_verification={allow} label={with_label}\n{}",
            d.log()
        );
        if want {
            read_through_mount(&d, &f);
        } else {
            assert!(d.fuse_mounts().is_empty());
        }
    }
}

/// A layer without landmarks is prefetched by the size of the
/// `containerd.io/snapshot/remote/stargz.prefetch` label, else by `prefetch_size`,
/// else not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_label_and_prefetch_size() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let f = files();
    let layer = landmarkless_layer(&tar_of_files(&f));
    let img = push(&reg, "compat/prefetch", &[&layer]).await;
    let addr = format!("127.0.0.1:{}", testenv::free_port());
    let digest_label = format!("digest=\"{}\"", layer.digest);
    for (config, label_size, expect) in [
        ("", None, 0u64),
        ("", Some(700_000u64), 700_000),
        ("prefetch_size = 400000\n", None, 400_000),
        ("prefetch_size = 400000\n", Some(900_000), 900_000),
    ] {
        let d = Daemon::start(
            &format!(
                "{config}metrics_address = \"{addr}\"\nno_background_fetch = true\n\
                 prefetch_async_size = 0\n[fuse_manager]\nenable = false\n"
            ),
            &[],
        );
        let mut c = d.client().await;
        let size = label_size.map(|s| s.to_string());
        let extra: Vec<(&str, &str)> = size
            .iter()
            .map(|s| (label::STARGZ_PREFETCH, s.as_str()))
            .collect();
        assert!(mounted_remotely(&mut c, "k1", layer_labels(&img, &layer, &extra)).await);
        let text = scrape(&addr).await;
        let got = sample(&text, "stargz_fs_layer_prefetch_size_bytes", &digest_label)
            .unwrap_or_else(|| panic!("no prefetch gauge\n{text}")) as u64;
        if expect == 0 {
            assert_eq!(got, 0, "{config:?} {label_size:?}");
        } else {
            // Whole chunks: up to one chunk (64 KiB of incompressible data) more.
            assert!(
                got >= expect && got < expect + (80 << 10),
                "{config:?} {label_size:?}: prefetched {got}, asked {expect}\n{}",
                d.log()
            );
        }
        drop(c);
        drop(d);
    }
}

/// Without a FUSE manager the layers are mounted in the daemon itself: SIGTERM
/// unmounts them before exiting (they would be dead mounts otherwise), as the
/// reference does; and `--version` prints the reference's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_fuse_manager_unmounts() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let f = files();
    let layer = estargz_layer(&tar_of_files(&f));
    let img = push(&reg, "compat/sigterm", &[&layer]).await;
    let mut d = Daemon::start(
        "no_background_fetch = true\n[fuse_manager]\nenable = false\n",
        &["-log-format", "json"],
    );
    let mut c = d.client().await;
    assert!(mounted_remotely(&mut c, "k1", layer_labels(&img, &layer, &[])).await);
    read_through_mount(&d, &f);
    drop(c);
    let st = d.signal(libc::SIGTERM);
    assert!(st.success(), "{st}\n{}", d.log());
    assert!(d.fuse_mounts().is_empty(), "{:?}", d.fuse_mounts());
    // The log was JSON lines with the reference's keys.
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 3);
    for l in &lines {
        for k in ["time", "level", "msg"] {
            assert!(l.get(k).is_some(), "{k} missing in {l}");
        }
    }
    assert!(lines
        .iter()
        .any(|l| l["msg"].as_str().unwrap().contains("SIGTERM")));

    let out = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
        .arg("-version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = String::from_utf8(out.stdout).unwrap();
    let words: Vec<&str> = v.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{v}");
    assert_eq!(words[0], "containerd-stargz-grpc");
    assert_eq!(words[1], concat!("v", env!("CARGO_PKG_VERSION")));
    assert!(!words[2].is_empty());
    let out = Command::new(env!("CARGO_BIN_EXE_stargz-fuse-manager"))
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8(out.stdout).unwrap();
    assert!(
        v.starts_with(concat!("stargz-fuse-manager v", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    // The reference's level names, `fatal` and `panic` included.
    for level in ["warning", "fatal", "panic"] {
        let d = Daemon::start("[fuse_manager]\nenable = false\n", &["-log-level", level]);
        drop(d);
    }
}
