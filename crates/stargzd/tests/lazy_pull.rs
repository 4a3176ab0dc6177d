//! End to end lazy pull: eStargz images pushed to docker-registry, pulled with Debian's
//! `ctr-remote image rpull` through a real containerd 1.6 into our daemon, then run with
//! runc; checks laziness, whiteouts, daemon restarts and the fallback for plain gzip layers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const NS: &str = "lazy";

fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// A missing prerequisite fails under CI=true and skips loudly otherwise.
fn require(paths: &[&str]) -> bool {
    for p in paths {
        if !Path::new(p).exists() {
            let msg = format!(
                "prerequisite {p} missing (apt-get install -y containerd runc docker-registry busybox-static stargz-snapshotter fuse3)"
            );
            assert!(!ci(), "{msg}");
            eprintln!("\n!!!!!!!! SKIPPING TEST: {msg} !!!!!!!!\n");
            return false;
        }
    }
    true
}

fn prerequisites() -> bool {
    require(&[
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/ctr-remote",
        "/usr/sbin/runc",
        "/usr/bin/containerd-shim-runc-v2",
        "/bin/busybox",
        "/usr/bin/docker-registry",
        "/dev/fuse",
    ])
}

fn mounts_under(dir: &Path) -> Vec<(String, String)> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let point = l.split(' ').nth(4)?.to_string();
            // The filesystem type follows the " - " separator.
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?.to_string();
            Some((point, fstype))
        })
        .filter(|(m, _)| m.starts_with(&prefix))
        .collect()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` and waits for the process to exit (killing it after 10 s).
fn stop(c: &mut Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    unsafe { libc::kill(c.id() as i32, sig) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
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
        // containerd first so it stops its shims while the snapshotter still answers.
        if let Some(mut c) = self.containerd.take() {
            stop(&mut c, libc::SIGTERM);
        }
        if let Some(mut c) = self.daemon.take() {
            stop(&mut c, libc::SIGINT);
        }
        for (m, _) in mounts_under(&self.dir).into_iter().rev() {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: a valid C string; detaching a mount we made under our own dir.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Env {
    fn start() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("stargzd-lazy-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        // No prefetch and no background fetch: what is fetched is what the workload read.
        std::fs::write(
            dir.join("stargz.toml"),
            "noprefetch = true\nno_background_fetch = true\n",
        )
        .unwrap();
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
            .arg(&self.snap_root)
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
            self.wait_reconnected();
        }
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
            stop(&mut c, sig);
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
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn run(&self, img: &str, id: &str, script: &str) -> String {
        self.ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "stargz",
            img,
            id,
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ])
    }

    fn fuse_mounts(&self) -> Vec<String> {
        mounts_under(&self.snap_root)
            .into_iter()
            .filter(|(_, t)| t.starts_with("fuse"))
            .map(|(m, _)| m)
            .collect()
    }

    fn logs(&self) -> String {
        format!(
            "--- stargz.log (tail)\n{}\n--- containerd.log (tail)\n{}",
            tail(&self.dir.join("stargz.log"), 80),
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
    let out = estargz::build::build(
        tar,
        &mut blob,
        &estargz::build::BuildOptions {
            // Random data does not compress; level 1 keeps the test fast.
            codec: estargz::compress::Codec::Gzip { level: 1 },
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

    let mut env = Env::start();
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

    let mut env = Env::start();
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
    });
}
