//! Our daemon and the reference daemon (`containerd-stargz-grpc` v0.12, built from
//! Debian's Go sources by `../shared/reference/build.sh`) scraped side by side after
//! the same lazy pull: every metric name the reference exposes is exposed by ours,
//! except the Go runtime's own (`go_*`, `promhttp_*`), and so is every operation type
//! it reports in its `stargz_fs_*` families (the one it alone can report is named and
//! explained below). Snapshots are asked for over the Snapshots gRPC API with the
//! labels `ctr-remote image rpull` sets, against a real docker-registry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{ci, detach_mounts, fuse_mounts, require, sha, stop};

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use remote_layer::label;
use snapshotter::proto::snapshots as pb;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = pb::snapshots_client::SnapshotsClient<Channel>;

/// Operation types only the reference reports after this workload, and why:
/// `stargz_header_get` times its request for a blob's size, which it makes for every
/// layer; ours takes the size from the image manifest and times that request only
/// when it has to make it.
const REFERENCE_ONLY_OPERATIONS: &[&str] = &["stargz_header_get"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The reference daemon: `$STARGZ_REFERENCE_DAEMON`, else built once by
/// `shared/reference/build.sh` (the `shared/` directory next to the checkout, or
/// `$STARGZ_SHARED_DIR`) into `target/reference`.
fn reference_daemon() -> Option<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("STARGZ_REFERENCE_DAEMON") {
            return Ok(PathBuf::from(p));
        }
        let shared = std::env::var_os("STARGZ_SHARED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("../shared"));
        let script = shared.join("reference/build.sh");
        if !script.exists() {
            return Err(format!("{} not found", script.display()));
        }
        let out_dir = workspace_root().join("target/reference");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&out_dir)
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out_dir.join("containerd-stargz-grpc"))
    });
    match r {
        Ok(p) => Some(p.clone()),
        Err(e) => {
            assert!(!ci(), "the reference daemon: {e}");
            eprintln!("\n!!!!!!!! SKIPPING TEST: the reference daemon: {e} !!!!!!!!\n");
            None
        }
    }
}

/// A daemon (ours or the reference) in a scratch directory, with its metrics on a
/// loopback port; stopped with SIGINT (which unmounts) and its mounts detached on drop.
struct Daemon {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    child: Option<Child>,
    sock: PathBuf,
    root: PathBuf,
    log: PathBuf,
    metrics: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        detach_mounts(&self.dir);
    }
}

impl Daemon {
    fn start(bin: &Path, config: &str) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-metrics-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let metrics = format!("127.0.0.1:{}", testenv::free_port());
        std::fs::write(
            dir.join("config.toml"),
            format!("metrics_address = \"{metrics}\"\n{config}"),
        )
        .unwrap();
        let sock = dir.join("run/snap.sock");
        let root = dir.join("root");
        let log = dir.join("daemon.log");
        let child = Command::new(bin)
            .arg("--address")
            .arg(&sock)
            .arg("--root")
            .arg(&root)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .args(["--log-level", "debug"])
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
            metrics,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.sock.exists() {
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited ({st}):\n{}", bin.display(), d.log_text());
            }
            assert!(Instant::now() < deadline, "not serving:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

    async fn scrape(&self) -> String {
        let resp = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.text().await.unwrap()
    }
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("containerd-namespace", "metrics".parse().unwrap());
    r
}

/// Prepares every layer of the image as containerd does in a lazy pull (each on the
/// committed one below it); each must become a remote snapshot.
async fn lazy_pull(d: &Daemon, image: &str, layers: &[(String, String)]) {
    let mut c = d.client().await;
    let all: Vec<&str> = layers.iter().map(|(dg, _)| dg.as_str()).collect();
    let mut parent = String::new();
    for (i, (digest, toc)) in layers.iter().enumerate() {
        let target = format!("chain-{i}");
        let labels: HashMap<String, String> = [
            (label::TARGET_SNAPSHOT_REF, target.clone()),
            (label::STARGZ_REFERENCE, image.to_string()),
            (label::STARGZ_DIGEST, digest.clone()),
            (label::STARGZ_LAYERS, all[i..].join(",")),
            (label::TOC_DIGEST, toc.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let res = c
            .prepare(req(pb::PrepareSnapshotRequest {
                snapshotter: "stargz".into(),
                key: format!("extract-{i}"),
                parent: parent.clone(),
                labels,
            }))
            .await;
        match res {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            other => panic!("layer {i} not remote: {other:?}\n{}", d.log_text()),
        }
        parent = target;
    }
}

/// Reads every file and lists every directory under each FUSE mount of `d`.
fn read_everything(d: &Daemon) -> usize {
    fn walk(p: &Path) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                n += walk(&e.path());
            } else if t.is_file() {
                n += std::fs::read(e.path()).unwrap().len();
            }
        }
        n
    }
    let mounts = fuse_mounts(&d.root);
    assert_eq!(mounts.len(), 2, "{mounts:?}\n{}", d.log_text());
    mounts.iter().map(|m| walk(Path::new(m))).sum()
}

/// Metric names of the samples in a Prometheus text exposition (each with the
/// `operation_type` label values seen for it).
fn names(text: &str) -> HashMap<String, BTreeSet<String>> {
    let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = l.rsplit_once(' ').map_or(l, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let ops = out.entry(name.to_string()).or_default();
        if let Some(rest) = labels.split("operation_type=\"").nth(1) {
            if let Some((op, _)) = rest.split_once('"') {
                ops.insert(op.to_string());
            }
        }
    }
    out
}

fn layer(files: &[(&str, Vec<u8>)]) -> (Vec<u8>, estargz::BuildOutput) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut blob = Vec::new();
    let out = estargz::build(
        tar.as_slice(),
        &mut blob,
        &estargz::BuildOptions {
            codec: estargz::Codec::Gzip { level: 1 },
            chunk_size: 64 << 10,
            prioritized_files: vec![files[0].0.to_string()],
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    (blob, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_metric_names_are_ours_too() {
    if !require(
        &["/usr/bin/docker-registry", "/dev/fuse", "/bin/fusermount3"],
        "docker-registry fuse3",
    ) {
        return;
    }
    let Some(reference) = reference_daemon() else {
        return;
    };
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    // Two layers with a prioritized file each (so both daemons prefetch), files spanning
    // several chunks, and a directory tree to list.
    let base = reg.base_url();
    let repo = "metrics/img";
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    for l in 0..2u64 {
        let files: Vec<(String, Vec<u8>)> = (0..4u64)
            .map(|i| {
                (
                    format!("d{l}/sub{}/f{i}", i % 2),
                    testenv::random_bytes(200 << 10, 10 * l + i),
                )
            })
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        let (blob, out) = layer(&refs);
        let digest = testenv::push_blob(&base, repo, &blob).await;
        assert_eq!(digest, sha(&blob));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": blob.len(),
            "annotations": out.annotations,
        }));
        diff_ids.push(out.diff_id.clone());
        layers.push((digest, out.toc_digest.clone()));
    }
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
    assert_eq!(st.as_u16(), 201);
    let image = format!("{}/{repo}:v1", reg.host());

    // The same pull, then the same reads, through each daemon; background fetch is
    // left on in both and given time to run a window.
    let mut scraped = Vec::new();
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_containerd-stargz-grpc"));
    for (bin, config) in [
        (reference.as_path(), "metadata_store = \"memory\"\n"),
        (ours.as_path(), "background_fetch_quiet_msec = 500\n"),
    ] {
        let d = Daemon::start(bin, config);
        lazy_pull(&d, &image, &layers).await;
        let bytes = read_everything(&d);
        assert_eq!(bytes, 2 * 4 * (200 << 10));
        tokio::time::sleep(Duration::from_secs(7)).await;
        scraped.push((bin.display().to_string(), d.scrape().await, d.log_text()));
    }
    let (_, ref_text, ref_log) = &scraped[0];
    let (_, our_text, our_log) = &scraped[1];
    let theirs = names(ref_text);
    let mine = names(our_text);
    let fail = |what: String| -> String {
        format!(
            "{what}\n--- reference /metrics\n{ref_text}\n--- our /metrics\n{our_text}\n\
             --- reference log (tail)\n{}\n--- our log (tail)\n{}",
            tail(ref_log),
            tail(our_log)
        )
    };
    let go_runtime = |n: &str| n.starts_with("go_") || n.starts_with("promhttp_");
    let stargz: Vec<&String> = theirs.keys().filter(|n| n.starts_with("stargz_")).collect();
    assert!(
        stargz.len() > 5,
        "{}",
        fail("the reference exposed few stargz metrics".into())
    );
    // The comparison has something to compare: the reference's operation families,
    // with the operations this workload makes, and its process metrics.
    for (name, op) in [
        ("stargz_fs_operation_duration_milliseconds_count", "mount"),
        (
            "stargz_fs_operation_duration_milliseconds_count",
            "stargz_toc_get",
        ),
        (
            "stargz_fs_operation_duration_microseconds_count",
            "read_on_demand",
        ),
        ("stargz_fs_operation_count", "on_demand_read_access_count"),
        ("stargz_fs_bytes_served", "on_demand_bytes_served"),
        ("stargz_fs_layer_fetched_size_bytes", ""),
        ("process_resident_memory_bytes", ""),
    ] {
        let seen = theirs
            .get(name)
            .is_some_and(|ops| op.is_empty() || ops.contains(op));
        assert!(
            seen,
            "{}",
            fail(format!("the reference has no {name} {op}"))
        );
    }
    let mut listed: Vec<String> = theirs
        .iter()
        .filter(|(n, _)| !go_runtime(n))
        .map(|(n, ops)| format!("{n} {ops:?}"))
        .collect();
    listed.sort();
    eprintln!("the reference's metrics:\n  {}", listed.join("\n  "));
    let mut missing = Vec::new();
    for (name, ops) in &theirs {
        if go_runtime(name) {
            continue;
        }
        match mine.get(name) {
            None => missing.push(name.clone()),
            Some(our_ops) => {
                for op in ops {
                    if !our_ops.contains(op) && !REFERENCE_ONLY_OPERATIONS.contains(&op.as_str()) {
                        missing.push(format!("{name}{{operation_type=\"{op}\"}}"));
                    }
                }
            }
        }
    }
    missing.sort();
    assert!(
        missing.is_empty(),
        "{}",
        fail(format!("not exposed by ours: {missing:?}"))
    );
    // Ours carries the reference's `layer` label on its operation families.
    for (name, digest) in [
        (
            "stargz_fs_operation_duration_milliseconds_count",
            &layers[0].0,
        ),
        ("stargz_fs_operation_count", &layers[0].0),
        ("stargz_fs_bytes_served", &layers[1].0),
    ] {
        let label = format!("layer=\"{digest}\"");
        assert!(
            our_text
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&label)),
            "{}",
            fail(format!("{name} without {label}"))
        );
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
