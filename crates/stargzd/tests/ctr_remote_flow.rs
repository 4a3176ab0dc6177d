//! The reference's ctr-remote.md flows, verbatim, with this workspace's `ctr-remote`
//! against a real registry, containerd and our daemon: `image pull`, `image optimize
//! --oci`, `image push --plain-http`, `image rpull --plain-http`, `run`; and images
//! converted with `--estargz-external-toc` (TOC in the `-esgztoc` image) mounted lazily.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed assertion"
)]

mod common;

use common::{detach_mounts, fuse_mounts, require, sha, stop, wait_for};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where images are converted (the "build host").
const BUILD_NS: &str = "build";
/// Where they are pulled lazily and run (the "other host").
const RUN_NS: &str = "run";
/// A third host, with no snapshots from the others.
const ORPHAN_NS: &str = "orphan";

fn prerequisites() -> bool {
    require(
        &[
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/sbin/runc",
            "/usr/bin/containerd-shim-runc-v2",
            "/bin/busybox",
            "/usr/bin/docker-registry",
            "/dev/fuse",
        ],
        "containerd runc docker-registry busybox-static fuse3",
    )
}

/// containerd with our daemon as its `stargz` snapshotter, in a scratch directory.
struct Env {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    daemon: Option<Child>,
    containerd: Option<Child>,
    snap_root: PathBuf,
    sock: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.containerd.is_some() {
            for ns in [BUILD_NS, RUN_NS, ORPHAN_NS] {
                let tasks = self.ctr(ns, &["task", "ls", "-q"]).unwrap_or_default();
                for id in tasks.lines() {
                    let _ = self.ctr(ns, &["task", "kill", "-s", "SIGKILL", id.trim()]);
                    let _ = self.ctr(ns, &["task", "rm", "-f", id.trim()]);
                    let _ = self.ctr(ns, &["container", "rm", id.trim()]);
                }
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        if let Ok(text) = std::fs::read_to_string(self.snap_root.join("fuse-manager.pid")) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&*self.snap_root.to_string_lossy()) {
                    // SAFETY: kill(2) on the FUSE manager this test's daemon started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        detach_mounts(&self.dir);
    }
}

impl Env {
    fn start() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-flow-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        // No prefetch, no background fetch: what is fetched is what the workload read.
        std::fs::write(
            dir.join("stargz.toml"),
            "noprefetch = true\nno_background_fetch = true\n",
        )
        .unwrap();
        let snap_sock = dir.join("run/stargz.sock");
        let snap_root = dir.join("stargz-root");
        let log = std::fs::File::create(dir.join("stargz.log")).unwrap();
        let daemon = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
            .arg("--address")
            .arg(&snap_sock)
            .arg("--root")
            .arg(&snap_root)
            .arg("--config")
            .arg(dir.join("stargz.toml"))
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for(&snap_sock, "containerd-stargz-grpc");
        let d = dir.display();
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
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
            ),
        )
        .unwrap();
        let containerd = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        let env = Env {
            sock: dir.join("containerd.sock"),
            snap_root,
            dir,
            _tmp: tmp,
            daemon: Some(daemon),
            containerd: Some(containerd),
        };
        wait_for(&env.sock, "containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.ctr(BUILD_NS, &["version"]).is_err() {
            assert!(Instant::now() < deadline, "containerd not answering");
            std::thread::sleep(Duration::from_millis(100));
        }
        env
    }

    fn tool(&self, bin: &Path, ns: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(bin)
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{} {args:?}: {text}", bin.display()))
        }
    }

    fn ctr(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        self.tool(Path::new("/usr/bin/ctr"), ns, args)
    }

    /// This workspace's `ctr-remote`, built beside the daemon.
    fn ours(&self, ns: &str, args: &[&str]) -> String {
        let bin =
            Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
        assert!(
            bin.exists(),
            "{} missing: build the workspace first (cargo build --workspace)",
            bin.display()
        );
        self.tool(&bin, ns, args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        let tail = |p: PathBuf| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let l: Vec<&str> = t.lines().collect();
            l[l.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "--- stargz.log\n{}\n--- fuse-manager.log\n{}\n--- containerd.log\n{}",
            tail(self.dir.join("stargz.log")),
            tail(self.snap_root.join("fuse-manager.log")),
            tail(self.dir.join("containerd.log"))
        )
    }

    /// Daemon and FUSE manager logs, whole.
    fn daemon_logs(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(self.dir.join("stargz.log")).unwrap_or_default(),
            std::fs::read_to_string(self.snap_root.join("fuse-manager.log")).unwrap_or_default()
        )
    }
}

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

/// Layer 1: busybox and 8 MiB the workload never reads. Layer 2: `/etc/x`.
fn image_tars() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let junk: Vec<Vec<u8>> = (0..8)
        .map(|i| testenv::random_bytes(1 << 20, 300 + i))
        .collect();
    let names: Vec<String> = (0..junk.len()).map(|i| format!("junk/f{i}")).collect();
    let mut files: Vec<(&str, Option<&[u8]>, u32)> = vec![
        ("bin", None, 0o755),
        ("bin/busybox", Some(&busybox), 0o755),
        ("junk", None, 0o755),
    ];
    for (n, d) in names.iter().zip(&junk) {
        files.push((n, Some(d), 0o644));
    }
    vec![
        tar_of(&files),
        tar_of(&[
            ("etc", None, 0o755),
            ("etc/x", Some(b"x from layer two\n"), 0o644),
        ]),
    ]
}

/// Pushes a plain gzip image of `tars` (its workload cats /etc/x) as `repo:v1`.
async fn push_plain(reg: &testenv::Registry, repo: &str, tars: &[Vec<u8>]) -> String {
    let base = reg.base_url();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for t in tars {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(t).unwrap();
        let blob = gz.finish().unwrap();
        let d = testenv::push_blob(&base, repo, &blob).await;
        descs.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": blob.len()}),
        );
        diff_ids.push(sha(t));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "cat", "/etc/x"]},
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

const SCRIPT: &str = "cat /etc/x; cat /.stargz-snapshotter/*.json";

/// The run printed /etc/x and both layers' state files; busybox was read, the junk not.
fn check_run(out: &str) {
    assert!(out.starts_with("x from layer two\n"), "{out}");
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no state in {out:?}"));
    let states: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<serde_json::Value>()
        .map(|v| v.unwrap())
        .collect();
    assert_eq!(states.len(), 2, "one state file per remote layer: {out}");
    let big = states
        .iter()
        .max_by_key(|s| s["size"].as_u64().unwrap())
        .unwrap();
    let (size, fetched) = (
        big["size"].as_u64().unwrap(),
        big["fetchedSize"].as_u64().unwrap(),
    );
    assert!(size > 8 << 20, "{big}");
    assert!(fetched < size / 2, "layer fetched eagerly: {big}");
}

/// Pulls `img` lazily into the run namespace with our rpull (`extra` flags) and
/// runs the script in it.
fn rpull_and_run(env: &Env, img: &str, id: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["image", "rpull", "--plain-http"];
    args.extend_from_slice(extra);
    args.push(img);
    let pulled = env.ours(RUN_NS, &args);
    let out = env
        .ctr(
            RUN_NS,
            &[
                "run",
                "--rm",
                "--snapshotter",
                "stargz",
                img,
                id,
                "/bin/busybox",
                "sh",
                "-c",
                SCRIPT,
            ],
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", env.logs()));
    (pulled, out)
}

/// ctr-remote.md, verbatim: pull, optimize --oci, push --plain-http; then, on the
/// "other host", rpull --plain-http and run with the stargz snapshotter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_flow_pull_optimize_push_rpull_run() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let src = push_plain(&reg, "flow/src", &image_tars()).await;
    let dst = format!("{}/flow/dst:esgz", reg.host());
    let env = Env::start();

    env.ours(BUILD_NS, &["image", "pull", "--plain-http", &src]);
    let out = env.ours(BUILD_NS, &["image", "optimize", "--oci", &src, &dst]);
    assert!(out.contains("file(s) prioritized"), "{out}");
    // The result is an image of containerd's store, with the files the workload
    // read (busybox, /etc/x) prioritized.
    let ls = env.ctr(BUILD_NS, &["images", "ls", "-q"]).unwrap();
    assert!(ls.lines().any(|l| l == dst), "{ls}");
    let ins: serde_json::Value =
        serde_json::from_str(&env.ours(BUILD_NS, &["image", "inspect", "--json", &dst])).unwrap();
    let layers = ins["manifests"][0]["layers"].as_array().unwrap();
    assert!(
        layers
            .iter()
            .all(|l| l["prioritized_files"].as_u64() >= Some(1)),
        "{ins}"
    );
    env.ours(BUILD_NS, &["image", "push", "--plain-http", &dst]);

    let (pulled, run) = rpull_and_run(&env, &dst, "flow1", &[]);
    assert!(pulled.contains("2 layer(s) remote, 0 unpacked"), "{pulled}");
    check_run(&run);
    assert!(fuse_mounts(&env.snap_root).len() >= 2);
    // `ctr-remote run` is ctr's, as in the document.
    let hello = env.ours(
        RUN_NS,
        &[
            "run",
            "--rm",
            "--snapshotter=stargz",
            &dst,
            "flow2",
            "/bin/busybox",
            "echo",
            "hello",
        ],
    );
    assert_eq!(hello.trim(), "hello");
}

/// Images converted with --estargz-external-toc (in containerd and registry to
/// registry, with and without --estargz-keep-diff-id) mount lazily: the daemon takes
/// each layer's TOC from the `-esgztoc` image. Without that image the layers are
/// unpacked instead, and the image still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_toc_images_mount_lazily() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let host = reg.host();
    let src = push_plain(&reg, "ext/src", &image_tars()).await;
    let env = Env::start();

    // In containerd, then pushed with its TOC image.
    let dst = format!("{host}/ext/dst:esgz");
    env.ours(BUILD_NS, &["image", "pull", "--plain-http", &src]);
    let out = env.ours(
        BUILD_NS,
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-external-toc",
            &src,
            &dst,
        ],
    );
    assert!(
        out.contains(&format!("extra image: {dst}-esgztoc")),
        "{out}"
    );
    env.ours(BUILD_NS, &["image", "push", "--plain-http", &dst]);
    env.ours(
        BUILD_NS,
        &["image", "push", "--plain-http", &format!("{dst}-esgztoc")],
    );
    let (pulled, run) = rpull_and_run(&env, &dst, "ext1", &[]);
    assert!(pulled.contains("2 layer(s) remote, 0 unpacked"), "{pulled}");
    check_run(&run);
    assert!(
        env.daemon_logs().contains("fetching the external TOC"),
        "{}",
        env.logs()
    );

    // Registry to registry, diff IDs kept; pulled with containerd's own labels.
    let keep = format!("{host}/ext/keep:1");
    env.ours(
        BUILD_NS,
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-external-toc",
            "--estargz-keep-diff-id",
            &format!("docker://{src}"),
            &keep,
        ],
    );
    let (pulled, run) = rpull_and_run(&env, &keep, "ext2", &["--use-containerd-labels"]);
    assert!(pulled.contains("2 layer(s) remote, 0 unpacked"), "{pulled}");
    check_run(&run);

    // An external-TOC image whose TOC image was never pushed: unpacked, and it still
    // runs. Its layers are new to the node (one more at the bottom changes every chain
    // id): a chain already committed from the images above would be taken as it is.
    let mut tars = image_tars();
    tars.insert(0, tar_of(&[("orphan.txt", Some(b"orphan\n"), 0o644)]));
    let src2 = push_plain(&reg, "ext/src2", &tars).await;
    let orphan = format!("{host}/ext/orphan:1");
    env.ours(BUILD_NS, &["image", "pull", "--plain-http", &src2]);
    env.ours(
        BUILD_NS,
        &[
            "image",
            "convert",
            "--estargz",
            "--oci",
            "--estargz-external-toc",
            &src2,
            &orphan,
        ],
    );
    env.ours(BUILD_NS, &["image", "push", "--plain-http", &orphan]);
    let pulled = env.ours(ORPHAN_NS, &["image", "rpull", "--plain-http", &orphan]);
    assert!(pulled.contains("0 layer(s) remote"), "{pulled}");
    let out = env
        .ctr(
            ORPHAN_NS,
            &[
                "run",
                "--rm",
                "--snapshotter",
                "stargz",
                &orphan,
                "ext3",
                "/bin/busybox",
                "cat",
                "/etc/x",
            ],
        )
        .unwrap();
    assert_eq!(out, "x from layer two\n");
}
