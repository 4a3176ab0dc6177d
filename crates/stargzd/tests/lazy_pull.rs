//! End to end lazy pull: eStargz images pushed to docker-registry, pulled with Debian's
//! `ctr-remote image rpull` through a real containerd 1.6 into our daemon, then run with
//! runc; checks laziness, whiteouts, daemon restarts and the fallback for plain gzip layers.
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

use sha2::{Digest, Sha256};

const NS: &str = "lazy";
/// base64 of `user:not-for-logs`.
const SECRET_AUTH: &str = "dXNlcjpub3QtZm9yLWxvZ3M=";

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

/// containerd plus our daemon in a scratch directory; everything is stopped and
/// every mount under the directory detached on drop, even when a test panics.
struct Env {
    dir: PathBuf,
    _tmp: tempfile::TempDir,
    daemon: Option<Child>,
    containerd: Option<Child>,
    snap_sock: PathBuf,
    snap_root: PathBuf,
    sock: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Containers a failed test left running, then containerd, so it stops its shims
        // while the snapshotter still answers.
        if self.containerd.is_some() {
            for id in self.ctr(&["task", "ls", "-q"]).unwrap_or_default().lines() {
                self.kill_task(id.trim());
            }
        }
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT, Duration::from_secs(10));
        }
        // A FUSE manager the daemon did not stop (killed daemon, failed test).
        if let Some(pid) = self.manager_pid() {
            // SAFETY: kill(2) on the manager this test's daemon started (checked by cmdline).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        detach_mounts(&self.dir);
    }
}

impl Env {
    /// containerd and the daemon, with `config` added to the daemon's config file.
    fn start(config: &str) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-lazy-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        // No prefetch and no background fetch: what is fetched is what the workload read.
        // Defaults the test's own config does not set.
        let defaults: String = ["noprefetch = true\n", "no_background_fetch = true\n"]
            .iter()
            .filter(|l| !config.contains(l.split(" =").next().unwrap_or_default()))
            .copied()
            .collect();
        std::fs::write(dir.join("stargz.toml"), format!("{defaults}{config}")).unwrap();
        let mut env = Env {
            snap_sock: dir.join("run/stargz.sock"),
            snap_root: dir.join("stargz-root"),
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
        let daemon = self.spawn_daemon();
        self.daemon = Some(daemon);
        wait_for(&self.snap_sock, "containerd-stargz-grpc");
        if self.containerd.is_some() {
            self.wait_reconnected();
        }
    }

    /// Starts the daemon process without waiting for it to serve.
    fn spawn_daemon(&mut self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stargz.log"))
            .unwrap();
        let _ = std::fs::remove_file(&self.snap_sock);
        // Credentials for a host the tests never use: they must reach the FUSE manager
        // through the environment and never appear on a command line or in a log.
        let docker = self.dir.join("docker");
        std::fs::create_dir_all(&docker).unwrap();
        std::fs::write(
            docker.join("config.json"),
            format!(r#"{{"auths":{{"unused.invalid":{{"auth":"{SECRET_AUTH}"}}}}}}"#),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
            .env("DOCKER_CONFIG", &docker)
            .arg("--address")
            .arg(&self.snap_sock)
            .arg("--root")
            .arg(&self.snap_root)
            .arg("--config")
            .arg(self.dir.join("stargz.toml"))
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// containerd's gRPC client backs off after the daemon went away and fails calls
    /// fast meanwhile; wait until it talks to the new process again.
    fn wait_reconnected(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = self.ctr(&["snapshot", "--snapshotter", "stargz", "ls"]) {
            assert!(
                Instant::now() < deadline,
                "containerd did not reconnect: {e}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the daemon with `sig` (SIGTERM leaves the FUSE mounts, SIGINT unmounts them).
    fn stop_daemon(&mut self, sig: i32) {
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, sig, Duration::from_secs(10));
        }
    }

    /// The pid of the live FUSE manager serving this daemon root, if any.
    fn manager_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.snap_root.join("fuse-manager.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        alive(pid, &self.snap_root).then_some(pid)
    }

    /// Kills a running container's task and removes the task and the container.
    fn kill_task(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ctr(&["task", "rm", id]).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr(&["task", "rm", "-f", id]);
        let _ = self.ctr(&["container", "rm", id]);
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

    fn ok(&self, args: &[&str]) -> String {
        self.ctr(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rpull(&self, img: &str) -> String {
        self.try_rpull(img).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_rpull(&self, img: &str) -> Result<String, String> {
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
    }

    /// Panics unless the daemon process is still running.
    fn assert_daemon_alive(&mut self) {
        let status = self.daemon.as_mut().map(|d| d.try_wait());
        assert!(
            matches!(status, Some(Ok(None))),
            "daemon not running: {status:?}"
        );
    }

    /// Removes the image and waits until garbage collection removed every snapshot.
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

    /// `image rpull` with this workspace's own `ctr-remote`, built beside the daemon.
    fn rpull_ours(&self, img: &str) -> String {
        let bin =
            Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
        assert!(
            bin.exists(),
            "{} missing: build the workspace first (cargo build --workspace)",
            bin.display()
        );
        let out = Command::new(&bin)
            .arg("-a")
            .arg(&self.sock)
            .args([
                "-n",
                NS,
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "stargz",
                img,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run ctr-remote");
        // Progress and the summary go to stderr, the image digest to stdout.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "ctr-remote image rpull {img}: {text}");
        text
    }

    /// Runs `script` in a new container and returns its output. `ctr run` can return
    /// before the last of a container's output reached it; the script ends with a marker
    /// line, and a run whose output lacks it is run again (reading the same files, so
    /// what the layers fetched does not change).
    fn run(&self, img: &str, id: &str, script: &str) -> String {
        const END: &str = "__script_end__";
        let script = format!("{script}; echo {END}");
        let mut out = String::new();
        for attempt in 0..3 {
            let name = if attempt == 0 {
                id.to_string()
            } else {
                format!("{id}-again{attempt}")
            };
            out = self.ok(&[
                "run",
                "--rm",
                "--snapshotter",
                "stargz",
                img,
                &name,
                "/bin/busybox",
                "sh",
                "-c",
                &script,
            ]);
            if let Some(body) = out.strip_suffix(&format!("{END}\n")) {
                return body.to_string();
            }
            eprintln!("output of {name} came back cut short: {out:?}");
        }
        out
    }

    fn fuse_mounts(&self) -> Vec<String> {
        fuse_mounts(&self.snap_root)
    }

    fn logs(&self) -> String {
        format!(
            "--- stargz.log (tail)\n{}\n--- fuse-manager.log (tail)\n{}\n--- containerd.log (tail)\n{}",
            tail(&self.dir.join("stargz.log"), 80),
            tail(&self.snap_root.join("fuse-manager.log"), 60),
            tail(&self.dir.join("containerd.log"), 40)
        )
    }

    /// Runs `f`, printing both daemons' logs when it panics.
    fn checked(&mut self, f: impl FnOnce(&mut Env)) {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if let Err(p) = res {
            eprintln!("{}", self.logs());
            std::panic::resume_unwind(p);
        }
    }
}

/// Whether `pid` runs (not a zombie) a stargz-fuse-manager for `root`.
fn alive(pid: i32, root: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesized command name.
    let running = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    running && cmdline.contains("stargz-fuse-manager") && cmdline.contains(&*root.to_string_lossy())
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An uncompressed tar of `files`; a `None` body is a directory.
fn tar_of(files: &[(&str, Option<&[u8]>, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(*mode);
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

/// A layer blob ready to push, with its descriptor annotations.
struct Layer {
    blob: Vec<u8>,
    diff_id: String,
    annotations: serde_json::Map<String, serde_json::Value>,
}

fn estargz_layer(tar: &[u8]) -> Layer {
    let mut blob = Vec::new();
    let out = estargz::build(
        tar,
        &mut blob,
        &estargz::BuildOptions {
            // Random data does not compress; level 1 keeps the test fast.
            codec: estargz::Codec::Gzip { level: 1 },
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let annotations = out
        .annotations
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    Layer {
        blob,
        diff_id: out.diff_id,
        annotations,
    }
}

fn gzip_layer(tar: &[u8]) -> Layer {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    Layer {
        blob: gz.finish().unwrap(),
        diff_id: sha(tar),
        annotations: serde_json::Map::new(),
    }
}

/// Pushes the layers, a config naming their diff ids, and an OCI manifest as `repo:v1`.
async fn push(reg: &testenv::Registry, repo: &str, layers: &[Layer]) -> String {
    let base = reg.base_url();
    let mut descs = Vec::new();
    for l in layers {
        let d = testenv::push_blob(&base, repo, &l.blob).await;
        let mut desc = serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d,
            "size": l.blob.len(),
        });
        if !l.annotations.is_empty() {
            desc["annotations"] = serde_json::Value::Object(l.annotations.clone());
        }
        descs.push(desc);
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

/// Layer 1: busybox, a file layer 2 deletes, and megabytes the workload never reads.
/// Layer 2: `/etc/x` and a whiteout of `/deleted`.
fn image_tars() -> (Vec<u8>, Vec<u8>) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let junk: Vec<Vec<u8>> = (0..8)
        .map(|i| testenv::random_bytes(1 << 20, 100 + i))
        .collect();
    let names: Vec<String> = (0..junk.len()).map(|i| format!("junk/f{i}")).collect();
    let mut files: Vec<(&str, Option<&[u8]>, u32)> = vec![
        ("bin", None, 0o755),
        ("bin/busybox", Some(&busybox), 0o755),
        ("etc", None, 0o755),
        ("deleted", Some(b"should be gone\n"), 0o644),
        ("junk", None, 0o755),
    ];
    for (n, d) in names.iter().zip(&junk) {
        files.push((n, Some(d), 0o644));
    }
    let t1 = tar_of(&files);
    let t2 = tar_of(&[
        ("etc", None, 0o755),
        ("etc/x", Some(b"x from layer two\n"), 0o644),
        (".wh.deleted", Some(b""), 0o644),
    ]);
    (t1, t2)
}

// ls reports on stderr, which `ctr run` output interleaves; fold it in so it can be checked.
const SCRIPT: &str = "cat /etc/x; ls /deleted 2>&1 || true; cat /.stargz-snapshotter/*.json";

/// The state files the script printed: one `{digest,size,fetchedSize,..}` object per layer.
fn states(out: &str) -> Vec<serde_json::Value> {
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no state JSON in {out:?}"));
    serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<serde_json::Value>()
        .map(|v| v.unwrap_or_else(|e| panic!("state JSON in {out:?}: {e}")))
        .collect()
}

fn check_run(out: &str, big_digest: &str) {
    eprintln!("container output:\n{out}");
    assert!(out.starts_with("x from layer two\n"), "{out}");
    assert!(!out.contains("should be gone"), "{out}");
    assert!(
        out.contains("/deleted: No such file or directory"),
        "whited-out file still listed: {out}"
    );
    let st = states(out);
    assert_eq!(st.len(), 2, "one state file per remote layer: {out}");
    let big = st
        .iter()
        .find(|s| s["digest"] == big_digest)
        .unwrap_or_else(|| panic!("no state for {big_digest}: {out}"));
    let size = big["size"].as_u64().unwrap();
    let fetched = big["fetchedSize"].as_u64().unwrap();
    assert!(size > 8 << 20, "{big}");
    // busybox is read; the 8 MiB of junk must not be.
    assert!(fetched < size / 2, "layer fetched eagerly: {big}");
}

fn check_remote_snapshots(env: &Env) {
    let ls = env.ok(&["snapshot", "--snapshotter", "stargz", "ls"]);
    let committed: Vec<&str> = ls
        .lines()
        .skip(1)
        .filter(|l| l.contains("Committed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(committed.len(), 2, "{ls}");
    for key in committed {
        let info = env.ok(&["snapshot", "--snapshotter", "stargz", "info", key]);
        assert!(info.contains("containerd.io/snapshot/remote"), "{info}");
    }
    let fuse = env.fuse_mounts();
    assert!(
        fuse.len() >= 2,
        "FUSE mounts under the daemon root: {fuse:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_pull_run_and_restart() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let (l1, l2) = (estargz_layer(&t1), estargz_layer(&t2));
    let big_digest = sha(&l1.blob);
    let upper_digest = sha(&l2.blob);
    let img = push(&reg, "lazy/img", &[l1, l2]).await;

    // Mounts inside the daemon: the path without a FUSE manager.
    let mut env = Env::start("[fuse_manager]\nenable = false\n");
    env.checked(|env| {
        env.rpull(&img);
        check_remote_snapshots(env);
        // The first Prepare looked the image up and opened the upper layer ahead of its
        // own Prepare.
        let log = std::fs::read_to_string(env.dir.join("stargz.log")).unwrap();
        assert!(
            log.lines().any(|l| l.contains("layer opened ahead of its mount")
                && l.contains(&upper_digest)),
            "upper layer not opened ahead"
        );
        assert_eq!(
            env.manager_pid(),
            None,
            "FUSE manager started though disabled"
        );
        let out = env.run(&img, "c1", SCRIPT);
        check_run(&out, &big_digest);

        // SIGTERM keeps the records; the new process mounts them again.
        env.stop_daemon(libc::SIGTERM);
        env.start_daemon();
        let out = env.run(&img, "c2", SCRIPT);
        check_run(&out, &big_digest);
        check_remote_snapshots(env);

        // SIGINT unmounts first; a restart still serves the pulled image.
        env.stop_daemon(libc::SIGINT);
        assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());
        env.start_daemon();
        let out = env.run(&img, "c3", SCRIPT);
        check_run(&out, &big_digest);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_gzip_image_falls_back() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let img = push(&reg, "plain/img", &[gzip_layer(&t1), gzip_layer(&t2)]).await;

    // Without the daemon's own full pull, containerd downloads the layers.
    let mut env = Env::start("full_pull = false\n");
    env.checked(|env| {
        env.rpull(&img);
        let out = env.run(&img, "p1", "cat /etc/x; ls /deleted 2>&1 || true; ls /junk");
        assert!(out.starts_with("x from layer two\n"), "{out}");
        assert!(out.contains("/deleted: No such file or directory"), "{out}");
        assert!(out.contains("f7"), "{out}");
        assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());
        let ls = env.ok(&["snapshot", "--snapshotter", "stargz", "ls"]);
        for key in ls
            .lines()
            .skip(1)
            .filter(|l| l.contains("Committed"))
            .filter_map(|l| l.split_whitespace().next())
        {
            let info = env.ok(&["snapshot", "--snapshotter", "stargz", "info", key]);
            assert!(!info.contains("containerd.io/snapshot/remote\""), "{info}");
        }
        // The fallback names why, once per layer, as a warning: the layers are no
        // eStargz (their tails were checked since they carry no TOC digest).
        let log = std::fs::read_to_string(env.dir.join("stargz.log")).unwrap();
        let fallbacks: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("falling back to an ordinary pull"))
            .collect();
        assert_eq!(fallbacks.len(), 2, "{log}");
        for l in fallbacks {
            assert!(
                l.contains("WARN") && l.contains(r#"kind="not_estargz""#),
                "{l}"
            );
        }
    });
}

/// Our own `ctr-remote image rpull`: eStargz layers become remote snapshots (only what
/// the workload reads is fetched), plain gzip layers are downloaded and unpacked by the
/// daemon (`full_pull`), so rpull itself unpacks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_rpull_mounts_estargz_and_unpacks_plain() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let (l1, l2) = (estargz_layer(&t1), estargz_layer(&t2));
    let big_digest = sha(&l1.blob);
    let lazy = push(&reg, "ours/lazy", &[l1, l2]).await;
    let plain = push(&reg, "ours/plain", &[gzip_layer(&t1), gzip_layer(&t2)]).await;

    let mut env = Env::start("");
    env.checked(|env| {
        let out = env.rpull_ours(&lazy);
        assert!(out.contains("2 layer(s) remote, 0 unpacked"), "{out}");
        check_remote_snapshots(env);
        check_run(&env.run(&lazy, "o1", SCRIPT), &big_digest);

        let out = env.rpull_ours(&plain);
        assert!(
            out.contains("0 layer(s) remote, 0 unpacked, 0 already present, 2 pulled in full"),
            "{out}"
        );
        let out = env.run(
            &plain,
            "o2",
            "cat /etc/x; ls /deleted 2>&1 || true; ls /junk",
        );
        assert!(out.starts_with("x from layer two\n"), "{out}");
        assert!(out.contains("/deleted: No such file or directory"), "{out}");
        assert!(out.contains("f7"), "{out}");
    });
}

impl Env {
    /// `ctr-remote doctor` of this workspace against this environment's containerd and
    /// daemon; returns whether it passed, and what it printed.
    fn doctor(&self, extra: &[&str]) -> (bool, String) {
        self.doctor_with(&self.dir.join("containerd.toml"), extra)
    }

    fn doctor_with(&self, containerd_config: &Path, extra: &[&str]) -> (bool, String) {
        let bin =
            Path::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc")).with_file_name("ctr-remote");
        let out = Command::new(&bin)
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", NS, "doctor", "--containerd-config"])
            .arg(containerd_config)
            .arg("--snapshotter-address")
            .arg(&self.snap_sock)
            .arg("--snapshotter-config")
            .arg(self.dir.join("stargz.toml"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr-remote doctor");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// `ctr-remote doctor` on a working node passes and proves lazy pulling with a test
/// pull it cleans up after; each broken piece (a plain image, a containerd config
/// without the proxy plugin, kubelet aimed at a keychain that is off, a stopped
/// daemon) fails with a message that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_what_is_wrong_with_a_node() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let lazy = push(
        &reg,
        "doctor/lazy",
        &[estargz_layer(&t1), estargz_layer(&t2)],
    )
    .await;
    let plain = push(&reg, "doctor/plain", &[gzip_layer(&t1), gzip_layer(&t2)]).await;

    let mut env = Env::start("");
    env.checked(|env| {
        let no_kubelet = env.dir.join("no-kubelet.yaml");
        let kubelet = ["--kubelet-config", no_kubelet.to_str().unwrap()];
        let (ok, out) = env.doctor(&[&kubelet[..], &["--plain-http", "--image", &lazy]].concat());
        assert!(ok, "{out}");
        assert!(out.contains("all 2 layer(s) mounted lazily"), "{out}");
        assert!(out.contains("has snapshotter \"stargz\""), "{out}");
        assert!(out.contains("the CRI plugin is disabled"), "{out}");
        assert!(out.contains("skip  kubelet"), "{out}");
        assert!(!out.contains("FAIL"), "{out}");
        // The test pull left nothing behind in containerd.
        let ns = env.ok(&["namespaces", "ls"]);
        assert!(!ns.contains("stargz-doctor"), "{ns}");

        let (ok, out) = env.doctor(&[&kubelet[..], &["--plain-http", "--image", &plain]].concat());
        assert!(!ok, "{out}");
        assert!(
            out.contains("none of 2 layer(s) was mounted lazily"),
            "{out}"
        );

        // kubelet sends image calls to the snapshotter, whose CRI keychain is off.
        let kubelet_cfg = env.dir.join("kubelet.yaml");
        std::fs::write(
            &kubelet_cfg,
            format!(
                "kind: KubeletConfiguration\nimageServiceEndpoint: unix://{}\n",
                env.snap_sock.display()
            ),
        )
        .unwrap();
        let (ok, out) = env.doctor(&["--kubelet-config", kubelet_cfg.to_str().unwrap()]);
        assert!(!ok, "{out}");
        assert!(out.contains("[cri_keychain] is off"), "{out}");

        // A containerd config that lacks the proxy plugin.
        let bare = env.dir.join("bare.toml");
        std::fs::write(&bare, "version = 2\n").unwrap();
        let (ok, out) = env.doctor_with(&bare, &kubelet);
        assert!(!ok, "{out}");
        assert!(out.contains("has no [proxy_plugins.stargz]"), "{out}");
        assert!(
            out.contains("disable_snapshot_annotations is not false"),
            "{out}"
        );
    });
    env.stop_daemon(libc::SIGINT);
    let (ok, out) = env.doctor(&["--kubelet-config", "/nonexistent"]);
    assert!(!ok, "{out}");
    assert!(out.contains("the snapshotter is not running"), "{out}");
}

fn sha_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// The junk files of [`image_tars`]' first layer, by index: their sha256 in hex.
fn junk_sums() -> Vec<String> {
    (0..8)
        .map(|i| sha_hex(&testenv::random_bytes(1 << 20, 100 + i)))
        .collect()
}

/// `fetchedSize` of the layer `digest` as the running container `id` sees it.
/// Output of `args` run in the task `id`. `ctr task exec` now and then returns before
/// the exec's output reached it (empty stdout, exit 0): ask again under a new exec id.
fn exec_output(env: &Env, id: &str, exec_id: &str, args: &[&str]) -> String {
    let mut out = String::new();
    for attempt in 0..3 {
        let eid = format!("{exec_id}-{attempt}");
        let mut full = vec!["task", "exec", "--exec-id", eid.as_str(), id];
        full.extend_from_slice(args);
        out = env.ok(&full);
        if !out.trim().is_empty() {
            break;
        }
    }
    out
}

fn fetched_in(env: &Env, id: &str, exec_id: &str, digest: &str) -> u64 {
    let out = exec_output(
        env,
        id,
        exec_id,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "cat /.stargz-snapshotter/*.json",
        ],
    );
    let st = states(&out);
    let s = st
        .iter()
        .find(|s| s["digest"] == digest)
        .unwrap_or_else(|| panic!("no state for {digest}: {out}"));
    s["fetchedSize"].as_u64().unwrap()
}

/// Reads `/junk/f{n}` (never read before) inside the running container `id` and checks
/// its bytes, and that they were fetched by that read: the mount is live and lazy.
fn read_unfetched(env: &Env, id: &str, n: usize, digest: &str, sums: &[String]) {
    let before = fetched_in(env, id, &format!("st{n}a"), digest);
    let path = format!("/junk/f{n}");
    let out = exec_output(
        env,
        id,
        &format!("read{n}"),
        &["/bin/busybox", "sha256sum", &path],
    );
    assert_eq!(out.trim(), format!("{}  {path}", sums[n]), "{path} in {id}");
    let after = fetched_in(env, id, &format!("st{n}b"), digest);
    assert!(
        after >= before + (1 << 20),
        "{path} was not fetched by the read: {before} -> {after}"
    );
}

/// The running container's own loop: every read of `/junk/f0` so far had the right bytes.
fn check_loop(env: &Env, id: &str, exec_id: &str, sums: &[String]) {
    let tasks = env.ok(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING")),
        "{tasks}"
    );
    let out = exec_output(env, id, exec_id, &["/bin/busybox", "cat", "/sums"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "the loop has not read yet");
    for l in lines {
        assert_eq!(l, format!("{}  /junk/f0", sums[0]), "loop read: {out}");
    }
}

/// A new container of the image runs and reads a junk file it has not read before.
fn run_new(env: &Env, img: &str, id: &str, n: usize, sums: &[String]) {
    let out = env.run(
        img,
        id,
        &format!("cat /etc/x; ls /deleted 2>&1 || true; /bin/busybox sha256sum /junk/f{n}"),
    );
    assert!(out.starts_with("x from layer two\n"), "{out}");
    assert!(out.contains("/deleted: No such file or directory"), "{out}");
    assert!(out.contains(&format!("{}  /junk/f{n}", sums[n])), "{out}");
}

fn wait_gone(env: &Env, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid, &env.snap_root) {
        assert!(
            Instant::now() < deadline,
            "FUSE manager {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With the FUSE manager (the default), a running container keeps reading its lazily
/// mounted files, fetched or not, while the daemon is stopped with SIGTERM or killed,
/// and new containers start after each restart; a killed manager is replaced on the
/// next run; SIGINT unmounts everything and stops the manager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_container_survives_daemon_restarts() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let (l1, l2) = (estargz_layer(&t1), estargz_layer(&t2));
    let big = sha(&l1.blob);
    let img = push(&reg, "survive/img", &[l1, l2]).await;
    let sums = junk_sums();

    // The junk files are read in storage order (busybox, f0, f1, ...) and each read must
    // be the one that fetches its file, so sequential read-ahead stays off here.
    let mut env = Env::start("sequential_readahead_kib = 0\n");
    env.checked(|env| {
        env.rpull(&img);
        check_remote_snapshots(env);
        let manager = env.manager_pid().expect("no FUSE manager after the pull");
        let environ = std::fs::read(format!("/proc/{manager}/environ")).unwrap();
        let docker = format!("DOCKER_CONFIG={}", env.dir.join("docker").display());
        assert!(
            environ.split(|b| *b == 0).any(|v| v == docker.as_bytes()),
            "the manager does not see the daemon's DOCKER_CONFIG"
        );
        env.ok(&[
            "run",
            "-d",
            "--snapshotter",
            "stargz",
            &img,
            "long",
            "/bin/busybox",
            "sh",
            "-c",
            "while :; do /bin/busybox sha256sum /junk/f0 >> /sums 2>&1; /bin/busybox sleep 1; done",
        ]);
        read_unfetched(env, "long", 1, &big, &sums);

        // SIGTERM: the daemon goes, the mounts stay served.
        env.stop_daemon(libc::SIGTERM);
        read_unfetched(env, "long", 2, &big, &sums);
        check_loop(env, "long", "loop1", &sums);
        env.start_daemon();
        assert_eq!(env.manager_pid(), Some(manager), "the manager was replaced");
        run_new(env, &img, "n1", 3, &sums);
        read_unfetched(env, "long", 4, &big, &sums);

        // SIGKILL: the same.
        env.stop_daemon(libc::SIGKILL);
        read_unfetched(env, "long", 5, &big, &sums);
        check_loop(env, "long", "loop2", &sums);
        // The kept manager still serves with the config it started with: the daemon says so.
        let mut cfg = std::fs::read_to_string(env.dir.join("stargz.toml")).unwrap();
        cfg.push_str("# edited\n");
        std::fs::write(env.dir.join("stargz.toml"), cfg).unwrap();
        env.start_daemon();
        let log = std::fs::read_to_string(env.dir.join("stargz.log")).unwrap();
        assert!(
            log.contains("another version of the config file"),
            "no warning"
        );
        assert_eq!(env.manager_pid(), Some(manager), "the manager was replaced");
        run_new(env, &img, "n2", 6, &sums);
        check_remote_snapshots(env);
        env.kill_task("long");

        // The manager killed under a running daemon: the next run remounts through a new one.
        // SAFETY: kill(2) on the manager process found through its pid file and cmdline.
        unsafe { libc::kill(manager, libc::SIGKILL) };
        wait_gone(env, manager);
        run_new(env, &img, "n3", 7, &sums);
        let second = env
            .manager_pid()
            .expect("no FUSE manager after the remount");
        assert_ne!(second, manager);
        check_remote_snapshots(env);

        // SIGINT: no mounts and no manager left; the next start serves the image again.
        env.stop_daemon(libc::SIGINT);
        assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());
        wait_gone(env, second);
        assert_eq!(env.manager_pid(), None);
        env.start_daemon();
        run_new(env, &img, "n4", 7, &sums);
        let third = env
            .manager_pid()
            .expect("no FUSE manager after SIGINT and start");
        let cmdline = std::fs::read(format!("/proc/{third}/cmdline")).unwrap();
        for text in [
            String::from_utf8_lossy(&cmdline).into_owned(),
            std::fs::read_to_string(env.dir.join("stargz.log")).unwrap(),
            std::fs::read_to_string(env.snap_root.join("fuse-manager.log")).unwrap(),
        ] {
            assert!(!text.contains(SECRET_AUTH) && !text.contains("not-for-logs"));
        }
    });
}

/// Samples of `name` in a Prometheus text exposition: (label text, value).
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The value of `name` for the series whose labels contain `label`.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(l, _)| l.contains(label))
        .map(|(_, v)| v)
}

async fn scrape(addr: &str) -> String {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_lazy_pull_and_cleanup() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let (l1, l2) = (estargz_layer(&t1), estargz_layer(&t2));
    let big_digest = sha(&l1.blob);
    let img = push(&reg, "metrics/img", &[l1, l2]).await;
    let addr = format!("127.0.0.1:{}", testenv::free_port());

    let mut env = Env::start(&format!("metrics_address = \"{addr}\"\n"));
    let rt = tokio::runtime::Handle::current();
    env.checked(|env| {
        env.rpull(&img);
        let out = env.run(&img, "m1", SCRIPT);
        check_run(&out, &big_digest);
        let text = tokio::task::block_in_place(|| rt.block_on(scrape(&addr)));
        let fail = |what: &str| -> String { format!("{what}\n--- /metrics\n{text}") };

        // Layer gauges agree with the state files the container read; nothing reads
        // in between (no background fetch), so the figures are the same.
        for st in states(&out) {
            let digest = st["digest"].as_str().unwrap();
            let label = format!("digest=\"{digest}\"");
            let size = sample(&text, "stargz_fs_layer_size_bytes", &label);
            assert_eq!(size, st["size"].as_f64(), "{}", fail("layer size"));
            let fetched = sample(&text, "stargz_fs_layer_fetched_size_bytes", &label);
            assert_eq!(fetched, st["fetchedSize"].as_f64(), "{}", fail("fetched"));
            let prefetched = sample(&text, "stargz_fs_layer_prefetch_size_bytes", &label);
            assert_eq!(prefetched, Some(0.0), "{}", fail("noprefetch"));
        }
        let mounts = sample(&text, "stargz_fs_mounts", "");
        assert_eq!(mounts, Some(2.0), "{}", fail("mounts"));
        for op in ["fuse_lookup", "fuse_read", "fuse_getattr"] {
            let n = sample(
                &text,
                "stargz_fs_operation_duration_microseconds_count",
                &format!("operation_type=\"{op}\""),
            );
            assert!(n.unwrap_or(0.0) > 0.0, "{}", fail(op));
        }
        let misses = sample(&text, "stargz_fs_chunk_cache_misses_total", "memory");
        assert!(misses.unwrap_or(0.0) > 0.0, "{}", fail("cache misses"));
        let hits = sample(&text, "stargz_fs_chunk_cache_hits_total", "memory");
        assert!(hits.unwrap_or(0.0) > 0.0, "{}", fail("cache hits"));
        // The daemon never reads manifests (containerd hands it the layer descriptors).
        let ranges = sample(
            &text,
            "stargz_registry_requests_total",
            "kind=\"blob_range\"",
        );
        assert!(
            ranges.unwrap_or(0.0) > 0.0,
            "{}",
            fail("blob range requests")
        );
        let errors: f64 = samples(&text, "stargz_registry_request_errors_total")
            .iter()
            .map(|(_, v)| v)
            .sum();
        assert_eq!(errors, 0.0, "{}", fail("registry errors"));

        // Removing the image unmounts both layers: no mounts, no snapshot directories,
        // and the layer series are gone from the endpoint.
        env.remove_image_and_wait_empty(&img);
        assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());
        let left: Vec<_> = std::fs::read_dir(env.snap_root.join("snapshotter/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "snapshot directories left: {left:?}");
        let text = tokio::task::block_in_place(|| rt.block_on(scrape(&addr)));
        assert_eq!(sample(&text, "stargz_fs_mounts", ""), Some(0.0), "{text}");
        assert!(
            samples(&text, "stargz_fs_layer_size_bytes").is_empty(),
            "{text}"
        );
        env.assert_daemon_alive();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_reads_as_eio() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let bad = testenv::random_bytes(256 << 10, 7);
    let t1 = tar_of(&[
        ("bin", None, 0o755),
        ("bin/busybox", Some(&busybox), 0o755),
        ("good.txt", Some(b"good file\n"), 0o644),
        ("bad.bin", Some(&bad), 0o644),
    ]);
    let layer = estargz_layer(&t1);
    // Damage the middle of bad.bin's compressed chunk; the TOC and footer stay intact.
    let reader = estargz::Reader::open(&layer.blob, &estargz::OpenOptions::default()).unwrap();
    let node = reader.index.node(reader.index.lookup("bad.bin").unwrap());
    let chunk = &node.chunks[0];
    let mid = ((chunk.blob_offset + chunk.blob_end) / 2) as usize;
    let digest = sha(&layer.blob);
    let img = push(&reg, "corrupt/img", &[layer]).await;
    let path = reg.blob_data_path(digest.trim_start_matches("sha256:"));
    let mut stored = std::fs::read(&path).unwrap();
    for b in &mut stored[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &stored).unwrap();

    let mut env = Env::start("");
    env.checked(|env| {
        env.rpull(&img);
        let out = env.run(
            &img,
            "x1",
            // The image has no /tmp: cat's complaint goes to stdout, its data nowhere.
            "cat /good.txt; if cat /bad.bin 2>&1 >/dev/null; then echo READ-OK; \
             else echo READ-FAILED; fi; cat /good.txt",
        );
        eprintln!("container output:\n{out}");
        assert!(out.starts_with("good file\n"), "{out}");
        assert!(out.contains("READ-FAILED"), "{out}");
        assert!(out.contains("Input/output error"), "{out}");
        assert!(out.trim_end().ends_with("good file"), "{out}");
        env.assert_daemon_alive();
        // Reads are served by the FUSE manager, which logs to its own file.
        let log = std::fs::read_to_string(env.snap_root.join("fuse-manager.log"))
            .unwrap_or_default()
            + &std::fs::read_to_string(env.dir.join("stargz.log")).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("bad.bin") && l.contains(&digest))
            .unwrap_or_else(|| panic!("no log line names the layer and file:\n{log}"));
        assert!(line.contains("chunk_offset"), "{line}");
        // The daemon still serves the next container.
        let out = env.run(&img, "x2", "cat /good.txt");
        assert_eq!(out.trim(), "good file");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_fails_the_pull_then_recovers() {
    if !prerequisites() {
        return;
    }
    let Some(mut reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let (l1, l2) = (estargz_layer(&t1), estargz_layer(&t2));
    let big_digest = sha(&l1.blob);
    let img = push(&reg, "down/img", &[l1, l2]).await;

    let mut env = Env::start("");
    env.checked(|env| {
        reg.stop();
        let err = env.try_rpull(&img).unwrap_err();
        assert!(
            err.contains("connection refused") || err.contains(&reg.host()),
            "unclear error: {err}"
        );
        env.assert_daemon_alive();
        assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());

        reg.restart();
        env.rpull(&img);
        let out = env.run(&img, "d1", SCRIPT);
        check_run(&out, &big_digest);
    });
}

#[test]
fn bad_config_exits_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "noprefetch = true\nmax_concurrency = \"lots\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-stargz-grpc"))
        .arg("--address")
        .arg(dir.path().join("s.sock"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a bad config: {err}");
    assert!(
        err.contains("max_concurrency") && err.contains("line 2"),
        "{err}"
    );
    assert!(!dir.path().join("s.sock").exists());
}

/// As the reference: a restart that cannot mount a remote snapshot again (its registry
/// is gone) refuses to start, naming the snapshot; `[snapshotter]
/// allow_invalid_mounts_on_restart = true` starts anyway, and the layer is mounted
/// again on use once its registry is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_refuses_unrestorable_snapshots_unless_allowed() {
    if !prerequisites() {
        return;
    }
    let Some(mut reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let (l1, l2) = (estargz_layer(&t1), estargz_layer(&t2));
    let big_digest = sha(&l1.blob);
    let img = push(&reg, "restore/img", &[l1, l2]).await;

    let mut env = Env::start("");
    env.checked(|env| {
        env.rpull(&img);
        check_remote_snapshots(env);
        let ls = env.ok(&["snapshot", "--snapshotter", "stargz", "ls"]);
        let keys: Vec<String> = ls
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        // SIGINT unmounts everything; with the registry gone nothing can be remounted.
        env.stop_daemon(libc::SIGINT);
        reg.stop();
        let mut daemon = env.spawn_daemon();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = daemon.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = daemon.kill();
                panic!("the daemon started with unrestorable remote snapshots");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(!status.success(), "{status}");
        let log = std::fs::read_to_string(env.dir.join("stargz.log")).unwrap();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("allow_invalid_mounts_on_restart"))
            .unwrap_or_else(|| {
                panic!(
                    "no error naming the option:\n{}",
                    tail(&env.dir.join("stargz.log"), 20)
                )
            });
        assert!(
            keys.iter().any(|k| last.contains(k.as_str())),
            "the error names no snapshot of {keys:?}: {last}"
        );
        assert!(!env.snap_sock.exists(), "a refused start left its socket");

        let mut cfg = std::fs::read_to_string(env.dir.join("stargz.toml")).unwrap();
        cfg.push_str("[snapshotter]\nallow_invalid_mounts_on_restart = true\n");
        std::fs::write(env.dir.join("stargz.toml"), cfg).unwrap();
        env.start_daemon();
        env.assert_daemon_alive();
        let log = std::fs::read_to_string(env.dir.join("stargz.log")).unwrap();
        assert!(
            log.contains("allowed by allow_invalid_mounts_on_restart"),
            "no warning"
        );
        reg.restart();
        let out = env.run(&img, "r1", SCRIPT);
        check_run(&out, &big_digest);
    });
}

/// A FUSE manager whose daemon state was wiped while the daemon was stopped unmounts
/// its layers and exits instead of running forever; over several cycles no manager is
/// left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_fuse_manager_unmounts_and_exits() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let img = push(
        &reg,
        "orphan/img",
        &[estargz_layer(&t1), estargz_layer(&t2)],
    )
    .await;
    let mut managers = Vec::new();
    for cycle in 0..3 {
        let mut env = Env::start("");
        env.checked(|env| {
            env.rpull(&img);
            check_remote_snapshots(env);
            let pid = env.manager_pid().expect("no FUSE manager");
            managers.push((pid, env.snap_root.clone()));
            // SIGTERM leaves the manager and its mounts, as on a daemon upgrade.
            env.stop_daemon(libc::SIGTERM);
            assert!(alive(pid, &env.snap_root));
            assert!(env.fuse_mounts().len() >= 2, "{:?}", env.fuse_mounts());
            if cycle == 1 {
                // Only the manager's socket goes (its run directory was wiped).
                std::fs::remove_dir_all(env.snap_sock.parent().unwrap()).unwrap();
            } else {
                // rm -rf as an administrator would: busy mount points stay behind.
                let _ = Command::new("rm")
                    .arg("-rf")
                    .arg(&env.snap_root)
                    .stderr(Stdio::null())
                    .status();
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while alive(pid, &env.snap_root) {
                assert!(
                    Instant::now() < deadline,
                    "cycle {cycle}: the orphaned manager {pid} still runs"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                env.fuse_mounts().is_empty(),
                "cycle {cycle}: mounts left: {:?}",
                env.fuse_mounts()
            );
        });
    }
    let left: Vec<_> = managers.iter().filter(|(p, r)| alive(*p, r)).collect();
    assert!(left.is_empty(), "managers left running: {left:?}");
}

/// The FUSE manager's `status` answer.
fn manager_status(env: &Env) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(env.dir.join("run/fuse-manager.sock"))
        .expect("connect to the FUSE manager");
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pulling and removing an image again and again leaves no per-layer state in the
/// FUSE manager (mounts, per-mount-point locks, layers opened ahead), and its memory
/// stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_layers_leave_no_state_in_the_manager() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let img = push(&reg, "churn/img", &[estargz_layer(&t1), estargz_layer(&t2)]).await;
    let mut env = Env::start("");
    env.checked(|env| {
        let mut first_rss = 0;
        const CYCLES: usize = 10;
        for cycle in 0..CYCLES {
            env.rpull(&img);
            check_remote_snapshots(env);
            let st = manager_status(env);
            assert_eq!(st["state"]["mounts"], 2, "{st}");
            env.remove_image_and_wait_empty(&img);
            assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());
            let st = manager_status(env);
            let state = &st["state"];
            assert_eq!(state["mounts"], 0, "cycle {cycle}: {st}");
            assert_eq!(state["busy"], 0, "cycle {cycle}: {st}");
            assert_eq!(state["opening"], 0, "cycle {cycle}: {st}");
            assert!(
                state["manifests"].as_u64().unwrap() <= 1,
                "cycle {cycle}: {st}"
            );
            let pid = env.manager_pid().expect("no FUSE manager");
            if cycle == 0 {
                first_rss = rss_kib(pid);
            }
            if cycle == CYCLES - 1 {
                let last = rss_kib(pid);
                eprintln!(
                    "FUSE manager RSS after 1 cycle: {first_rss} KiB, after {CYCLES} \
                     ({} layer mounts): {last} KiB",
                    2 * CYCLES
                );
                assert!(
                    last < first_rss + 32 * 1024,
                    "manager RSS grew from {first_rss} KiB to {last} KiB"
                );
            }
        }
    });
}

/// Removing the last snapshot of a layer stops its background fetch: the registry sees
/// no request for it afterwards, while a kept layer is fetched in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_stops_background_fetch() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let (t1, t2) = image_tars();
    let img = push(
        &reg,
        "bgstop/img",
        &[estargz_layer(&t1), estargz_layer(&t2)],
    )
    .await;
    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let img = img.replace(&reg.host(), &front.host());
    let requests = || testenv::FrontStats::get(&front.stats.requests);
    // The background fetch starts once reads have been quiet for 3 s.
    let mut env = Env::start("no_background_fetch = false\nbackground_fetch_quiet_msec = 3000\n");
    env.checked(|env| {
        env.rpull(&img);
        env.remove_image_and_wait_empty(&img);
        assert!(env.fuse_mounts().is_empty(), "{:?}", env.fuse_mounts());
        let after_removal = requests();
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(
            requests(),
            after_removal,
            "a removed layer was still fetched"
        );

        // The control: a layer that stays is fetched in the background.
        env.rpull(&img);
        let pulled = requests();
        let deadline = Instant::now() + Duration::from_secs(20);
        while requests() == pulled {
            assert!(
                Instant::now() < deadline,
                "no background fetch of a kept layer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// A layer whose TOC is bigger than the default first read (thousands of small files),
/// converted by our builder: the daemon's first read at its end, sized by the layer's
/// `toc-tail` annotation, is one request of exactly the TOC and footer. The annotation
/// reaches the Prepare as a label (rpull passes it on as containerd's unpacker does),
/// so that read is the suffix read sent before the manifest is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotated_toc_comes_in_one_request() {
    if !prerequisites() {
        return;
    }
    let Some(reg) = testenv::Registry::start(testenv::RegistryOpts::default()) else {
        return;
    };
    let bodies: Vec<(String, Vec<u8>)> = (0..14_000u32)
        .map(|i| {
            let body = (0..60 + i % 200)
                .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 9) as u8)
                .collect();
            (format!("d{:02}/f{i:05}", i % 16), body)
        })
        .collect();
    let mut files: Vec<(&str, Option<&[u8]>, u32)> = Vec::new();
    let dirs: Vec<String> = (0..16).map(|d| format!("d{d:02}")).collect();
    for d in &dirs {
        files.push((d, None, 0o755));
    }
    for (name, body) in &bodies {
        files.push((name, Some(body), 0o644));
    }
    let layer = estargz_layer(&tar_of(&files));
    let size = layer.blob.len() as u64;
    let digest = sha(&layer.blob);
    let tail: u64 = layer.annotations[remote_layer::annotation::TOC_TAIL]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tail > (512 << 10) + (64 << 10) && tail < size,
        "{tail} of {size}"
    );
    let img = push(&reg, "tail/img", &[layer]).await;
    let front = testenv::Front::start(testenv::FrontOpts {
        upstream: reg.base_url(),
        ..Default::default()
    })
    .await;
    let img = img.replace(&reg.host(), &front.host());
    let mut env = Env::start("");
    env.checked(|env| {
        env.rpull(&img);
        let log = front.stats.log.lock().unwrap();
        // Reads of the layer's TOC or footer: those that end past the TOC's start
        // (a suffix read `bytes=-N` ends at the blob's end).
        let toc_reads: Vec<String> = log
            .iter()
            .filter(|l| l.method == "GET" && l.path.ends_with(&format!("/blobs/{digest}")))
            .filter_map(|l| {
                let r = l
                    .range
                    .clone()
                    .unwrap_or_else(|| format!("bytes=0-{}", size - 1));
                if r.starts_with("bytes=-") {
                    return Some(r);
                }
                let end: u64 = r.rsplit('-').next()?.parse().ok()?;
                (end >= size - tail).then_some(r)
            })
            .collect();
        assert_eq!(
            toc_reads,
            vec![format!("bytes=-{tail}")],
            "TOC and footer in one request, sized by the label"
        );
    });
}
